# syntax=docker/dockerfile:1
# The pbx-operator image: one binary on a distroless, non-root base.
#
#   docker build -t ghcr.io/pbx-operator/pbx-operator:0.1.0 .
#
# Stage 1 builds with the locked dependency versions; stage 2 holds only the binary (plus the glibc,
# libgcc and CA certificates of distroless/cc), runs as uid 65532 and has no shell.

ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# Only what the build reads: the manifest, the sources, and the bench the manifest names.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests/benches ./tests/benches
# The caches speed up rebuilds; the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pbx-operator \
    && install -D -m 0755 target/release/pbx-operator /out/pbx-operator \
    && /out/pbx-operator --version

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="pbx-operator" \
      org.opencontainers.image.description="Bulk PBX administration as declarative, reviewable Kubernetes resources" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/pbx-operator /usr/local/bin/pbx-operator
USER 65532:65532
ENTRYPOINT ["pbx-operator"]
CMD ["run"]
