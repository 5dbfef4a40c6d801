//! Helm for the chart tests: built once from its Go module, like the control plane, into
//! `~/.cache/pbx-operator/helm/<version>/helm` (or `$PBX_OPERATOR_CACHE/helm/<version>/helm`) and
//! reused by every later run. Building needs Go and the Go module proxy (about a minute and a half
//! on two cores with the modules downloaded; nothing afterwards).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

/// The Helm release built and used; a Helm 3 version published on the Go module proxy.
pub const VERSION: &str = "v3.22.0";

/// The path of the helm binary, built on first use.
pub fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(build)
}

fn cache_root() -> PathBuf {
    match std::env::var_os("PBX_OPERATOR_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/pbx-operator"),
    }
}

fn build() -> PathBuf {
    let dir = cache_root().join("helm").join(VERSION);
    let bin = dir.join("helm");
    if !bin.is_file() {
        std::fs::create_dir_all(&dir).expect("creating the helm cache directory");
        // A private GOBIN and a rename: two test processes building at once never see half a file.
        let gobin = dir.join(format!(".gobin-{}", std::process::id()));
        let module = format!("helm.sh/helm/v3/cmd/helm@{VERSION}");
        let ldflags = ldflags(&dir);
        eprintln!(
            "building helm {VERSION} into {} (once): GOBIN={} go install -trimpath -ldflags '{ldflags}' {module}",
            dir.display(),
            gobin.display()
        );
        let start = Instant::now();
        let status = go(&dir)
            .args(["install", "-trimpath", "-ldflags", &ldflags, &module])
            .env("GOBIN", &gobin)
            .status()
            .expect("running go (tests/install-deps.sh checks that Go is installed)");
        assert!(status.success(), "go install {module} failed");
        std::fs::rename(gobin.join("helm"), &bin).expect("moving helm into the cache");
        let _ = std::fs::remove_dir_all(&gobin);
        eprintln!("helm {VERSION} built in {}s", start.elapsed().as_secs());
    }
    let out = Command::new(&bin)
        .args(["version", "--template", "{{.Version}}"])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && version.trim() == VERSION,
        "{} is not helm {VERSION} (says {version:?}); delete it to rebuild",
        bin.display()
    );
    bin
}

/// `go` run outside any Go module, so `go install pkg@version` resolves only helm's own go.mod.
fn go(dir: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.current_dir(dir)
        .env("CGO_ENABLED", "0")
        .stdin(Stdio::null());
    cmd
}

/// What helm's Makefile sets and `go install` alone does not: the version `helm version` prints,
/// and the Kubernetes version of its client-go as the default for `helm template` and `helm lint`
/// (otherwise v1.20, which charts that require a newer Kubernetes refuse).
fn ldflags(dir: &Path) -> String {
    let out = go(dir)
        .args([
            "mod",
            "download",
            "-json",
            &format!("helm.sh/helm/v3@{VERSION}"),
        ])
        .output()
        .expect("running go mod download");
    assert!(
        out.status.success(),
        "go mod download helm.sh/helm/v3@{VERSION} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("go mod download -json");
    let go_mod = std::fs::read_to_string(
        info["GoMod"]
            .as_str()
            .expect("GoMod in go mod download -json"),
    )
    .expect("reading helm's go.mod");
    // `k8s.io/client-go v0.37.0` is Kubernetes 1.37.
    let minor = go_mod
        .lines()
        .find_map(|l| l.trim().strip_prefix("k8s.io/client-go v0."))
        .and_then(|v| v.split('.').next())
        .expect("helm's go.mod requires k8s.io/client-go v0.x");
    let mut flags = vec!["-s".to_string(), "-w".to_string()];
    flags.push(format!(
        "-X helm.sh/helm/v3/internal/version.version={VERSION}"
    ));
    flags.push("-X helm.sh/helm/v3/internal/version.gitTreeState=clean".into());
    for pkg in ["pkg/chartutil", "pkg/lint/rules"] {
        flags.push(format!("-X helm.sh/helm/v3/{pkg}.k8sVersionMajor=1"));
        flags.push(format!("-X helm.sh/helm/v3/{pkg}.k8sVersionMinor={minor}"));
    }
    flags.join(" ")
}

/// Runs helm with `args`; returns its output whatever the exit status.
pub fn try_run(args: &[&str]) -> Output {
    Command::new(helm())
        .args(args)
        // Keep helm's own config, cache and repositories out of the user's home.
        .env("HELM_CONFIG_HOME", scratch().join("config"))
        .env("HELM_CACHE_HOME", scratch().join("cache"))
        .env("HELM_DATA_HOME", scratch().join("data"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running helm: {e}"))
}

/// Runs helm with `args` and returns stdout; panics with stderr when it fails.
pub fn run(args: &[&str]) -> String {
    let out = try_run(args);
    assert!(
        out.status.success(),
        "helm {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Helm's config, cache and data directories for the tests (no repositories are ever added).
fn scratch() -> PathBuf {
    cache_root().join("helm").join("home")
}
