#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test. Tests that need the control
# plane or the PBX lab start them themselves (and fail, never skip, when they cannot).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install-deps.sh
# Build outside the checkout so a fresh clone (CI) reuses earlier compilation.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pbx-operator/target}
# A clean clone gains nothing from incremental state, which only grows the cache by gigabytes.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
start=$(date +%s)
cargo test --locked "$@"
echo "tests: finished in $(( $(date +%s) - start ))s" >&2
