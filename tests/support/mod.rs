//! Test harness: a real control plane (built from Go modules, started as processes) shared by the
//! tests of one test binary, namespaces per test, and the operator binary run as a process.
//!
//! A test that needs a server and cannot start it fails; nothing here skips.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Targets per batch of the operators this process starts. The crash and chaos tests size
/// their runs in batches of 1,000 (several batches, each kill with work left, at a few thousand
/// users); 0: the operator's default (see [`Operator::use_default_batch_size`]).
static OPERATOR_BATCH_SIZE: AtomicUsize = AtomicUsize::new(1000);

pub mod lab;
pub mod memory;
pub mod pbx;
pub mod smtp;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A control plane started for this test binary, stopped by its watchdog when the binary exits.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub admin_kubeconfig: PathBuf,
    pub user_kubeconfig: PathBuf,
    pub user_name: String,
}

static CONTROL_PLANE: OnceLock<ControlPlane> = OnceLock::new();

impl ControlPlane {
    /// Stops this test binary's kube-apiserver (etcd and its data keep running): an API server
    /// outage. Every test of the binary shares it, so only a binary whose tests all expect the
    /// outage may call this.
    pub fn stop_apiserver(&self) {
        self.apiserver("stop-apiserver");
    }

    /// Starts the kube-apiserver again on the same port, certificates and etcd, and waits until
    /// it is ready.
    pub fn start_apiserver(&self) {
        self.apiserver("start-apiserver");
    }

    fn apiserver(&self, command: &str) {
        let out = Command::new("bash")
            .arg(repo_root().join("tests/controlplane/controlplane.sh"))
            .args([command, "--dir"])
            .arg(&self.dir)
            .output()
            .expect("running tests/controlplane/controlplane.sh");
        assert!(
            out.status.success(),
            "controlplane.sh {command} failed (logs in {}): {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The control plane of this test binary, started on first use with the CRDs installed.
pub fn control_plane() -> &'static ControlPlane {
    CONTROL_PLANE.get_or_init(|| {
        let script = repo_root().join("tests/controlplane/controlplane.sh");
        // A free port can be taken by another process between choosing and binding it; a second
        // attempt on fresh ports is what a person would do too.
        let mut failed = Vec::new();
        let dir = loop {
            let dir = tempfile::Builder::new()
                .prefix("pbx-cp-")
                .tempdir()
                .expect("temp dir")
                .keep();
            let status = Command::new("bash")
                .arg(&script)
                .args(["up", "--dir"])
                .arg(&dir)
                .args(["--owner-pid", &std::process::id().to_string()])
                .status()
                .expect("running tests/controlplane/controlplane.sh");
            if status.success() {
                break dir;
            }
            failed.push(dir.display().to_string());
            assert!(
                failed.len() < 3,
                "the control plane did not start; logs are in {failed:?}"
            );
        };
        let cp = ControlPlane {
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            user_kubeconfig: dir.join("user.kubeconfig"),
            user_name: "alice".into(),
            dir,
        };
        install_crds(&cp.admin_kubeconfig);
        cp
    })
}

/// Installs the CRDs exactly as a user would: the binary's own output piped into kubectl.
fn install_crds(kubeconfig: &Path) {
    let crds = Command::new(env!("CARGO_BIN_EXE_pbx-operator"))
        .arg("crds")
        .output()
        .expect("running pbx-operator crds");
    assert!(
        crds.status.success(),
        "pbx-operator crds failed: {}",
        String::from_utf8_lossy(&crds.stderr)
    );
    kubectl_stdin(kubeconfig, &["apply", "-f", "-"], &crds.stdout);
    kubectl(
        kubeconfig,
        &[
            "wait",
            "--for",
            "condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ],
    );
}

/// Runs kubectl and returns stdout; panics with stderr when it fails.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    kubectl_stdin(kubeconfig, args, b"")
}

pub fn kubectl_stdin(kubeconfig: &Path, args: &[&str], stdin: &[u8]) -> String {
    let out = try_kubectl(kubeconfig, args, stdin);
    assert!(out.0, "kubectl {} failed: {}", args.join(" "), out.2);
    out.1
}

/// Runs kubectl; returns (success, stdout, stderr without version-skew warnings).
pub fn try_kubectl(kubeconfig: &Path, args: &[&str], stdin: &[u8]) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is installed");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("version difference between client"))
        .collect::<Vec<_>>()
        .join("\n");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

pub async fn client_for(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("readable kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("valid kubeconfig");
    Client::try_from(config).expect("client")
}

pub async fn admin() -> Client {
    client_for(&control_plane().admin_kubeconfig).await
}

pub async fn unprivileged() -> Client {
    client_for(&control_plane().user_kubeconfig).await
}

/// A fresh namespace for one test, so tests never see each other's objects.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    use k8s_openapi::api::core::v1::Namespace;
    let name = format!("{prefix}-{}", &uuid_like()[..8]);
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&Default::default(), &ns)
        .await
        .expect("create namespace");
    name
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let c = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as u128;
    format!(
        "{:016x}",
        (n ^ (c << 40)).wrapping_mul(0x9E3779B97F4A7C15) & u64::MAX as u128
    )
}
static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Polls `check` until it returns Some, or panics with `what` after `timeout`.
/// The seed of a crash test's pseudo-random kill moments: `CRASH_SEED` to replay a failure,
/// else a new one, printed so that a failure can be replayed.
pub fn crash_seed() -> u64 {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    eprintln!("CRASH_SEED={seed}");
    seed
}

pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The operator binary running as a process, killed when dropped.
pub struct Operator {
    pub child: Child,
    pub log: PathBuf,
    /// Where its /metrics, /healthz and /readyz are served.
    pub metrics_port: u16,
}

impl Operator {
    /// Operators started from now on use the operator's own default batch size (4,000), not
    /// the tests' 1,000 (benches and large-installation tests).
    pub fn use_default_batch_size() {
        OPERATOR_BATCH_SIZE.store(0, Ordering::Relaxed);
    }

    pub fn start(kubeconfig: &Path, extra_args: &[&str]) -> Operator {
        Operator::start_with_env(kubeconfig, extra_args, &[])
    }

    pub fn start_with_env(
        kubeconfig: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Operator {
        Operator::spawn(kubeconfig, extra_args, env, None)
    }

    /// Like [`Operator::start`], the process in `limit`'s memory cgroup from its first
    /// instruction (it joins, then execs the operator: `child.id()` is the operator).
    pub fn start_limited(
        kubeconfig: &Path,
        extra_args: &[&str],
        limit: &memory::MemoryLimit,
    ) -> Operator {
        Operator::spawn(kubeconfig, extra_args, &[], Some(&limit.procs_file()))
    }

    fn spawn(
        kubeconfig: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
        cgroup_procs: Option<&Path>,
    ) -> Operator {
        let log = control_plane()
            .dir
            .join(format!("operator-{}.log", uuid_like()));
        let file = std::fs::File::create(&log).unwrap();
        let metrics_port = free_port();
        let binary = env!("CARGO_BIN_EXE_pbx-operator");
        let mut command = match cgroup_procs {
            None => Command::new(binary),
            Some(procs) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
                    .arg(procs)
                    .arg(binary);
                sh
            }
        };
        if let Ok(raw) = std::env::var("HEAPTRACK_RAW_DIR") {
            command.env("LD_PRELOAD", "/usr/lib/heaptrack/libheaptrack_preload.so");
            command.env(
                "DUMP_HEAPTRACK_OUTPUT",
                format!("{raw}/raw-{}", uuid_like()),
            );
        }
        let batch_size = OPERATOR_BATCH_SIZE.load(Ordering::Relaxed);
        if batch_size > 0 {
            command.env("PBX_OPERATOR_BATCH_SIZE", batch_size.to_string());
        }
        let child = command
            .arg("run")
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
                "--secret-check-interval",
                "1s",
            ])
            .args(extra_args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,pbx_operator=debug")
            .envs(env.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("starting pbx-operator run");
        Operator {
            child,
            log,
            metrics_port,
        }
    }

    /// GETs a path of the operator's HTTP server; returns (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return (0, String::new());
        };
        let _ = write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal and waits for the process to exit; returns its status and how long it took.
    pub fn stop_with(
        &mut self,
        signal: &str,
        timeout: Duration,
    ) -> (std::process::ExitStatus, Duration) {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            assert!(
                start.elapsed() < timeout,
                "operator did not exit within {timeout:?} of {signal}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cleanup` (a shell command) once this test process is gone, however it ends.
pub fn watchdog(cleanup: &str) {
    let pid = std::process::id();
    let script = format!("while kill -0 {pid} 2>/dev/null; do sleep 1; done; {cleanup}");
    Command::new("setsid")
        .args(["bash", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting a watchdog");
}

/// A free TCP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The stored rows (JSON lines) of a results ConfigMap, as a user reads them: gzipped in
/// `binaryData["rows.jsonl.gz"]`. Empty when the ConfigMap has none.
pub fn results_rows(cm: &k8s_openapi::api::core::v1::ConfigMap) -> String {
    use std::io::Read;
    let Some(bytes) = cm.binary_data.as_ref().and_then(|d| d.get("rows.jsonl.gz")) else {
        return String::new();
    };
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes.0.as_slice())
        .read_to_string(&mut text)
        .expect("rows.jsonl.gz is gzip of UTF-8 text");
    text
}

/// `text` gzipped and base64-encoded, as a merge patch of `binaryData` takes it.
pub fn gzip_base64(text: &str) -> String {
    use base64::Engine as _;
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(text.as_bytes()).expect("writing to memory");
    base64::engine::general_purpose::STANDARD.encode(e.finish().expect("writing to memory"))
}
