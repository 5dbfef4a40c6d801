//! The PBX lab (tests/lab/lab.sh): a real Kamailio with PostgreSQL, MySQL or SQLite, seeded users and
//! phones, and SIPp phones. Stopped when dropped, and by a watchdog if the test binary dies.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use super::repo_root;

pub struct Lab {
    pub dir: PathBuf,
    pub env: BTreeMap<String, String>,
}

/// What to start.
#[derive(Clone, Debug)]
pub struct LabSpec {
    pub db: &'static str,
    pub users: usize,
    pub phones: usize,
    pub silent: usize,
    pub no_reboot: usize,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            db: "sqlite",
            users: 10,
            phones: 5,
            silent: 0,
            no_reboot: 0,
        }
    }
}

fn script() -> PathBuf {
    repo_root().join("tests/lab/lab.sh")
}

impl Lab {
    pub fn start(spec: LabSpec) -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("pbx-lab-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let out = Command::new("bash")
            .arg(script())
            .args(["up", "--dir"])
            .arg(&dir)
            .args([
                "--db",
                spec.db,
                "--users",
                &spec.users.to_string(),
                "--phones",
                &spec.phones.to_string(),
            ])
            .args([
                "--silent",
                &spec.silent.to_string(),
                "--no-reboot",
                &spec.no_reboot.to_string(),
            ])
            .output()
            .expect("running tests/lab/lab.sh");
        assert!(
            out.status.success(),
            "the PBX lab did not start ({}):\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        super::watchdog(&format!(
            "bash {} down --dir {}",
            script().display(),
            dir.display()
        ));
        let text = std::fs::read_to_string(dir.join("lab.env")).expect("lab.env");
        let env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        Lab { dir, env }
    }

    pub fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("lab.env has no {key}"))
    }

    pub fn db_url(&self) -> &str {
        self.get("LAB_DB_URL")
    }
    pub fn rpc_url(&self) -> &str {
        self.get("LAB_RPC_URL")
    }
    pub fn domain(&self) -> &str {
        self.get("LAB_DOMAIN")
    }

    pub fn list(&self, key: &str) -> Vec<String> {
        self.get(key)
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("bash")
            .arg(script())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lab.sh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A JSON-RPC call through the lab (string params); returns the raw answer.
    pub fn rpc(&self, args: &[&str]) -> String {
        let dir = self.dir.to_string_lossy().into_owned();
        let mut all = vec!["rpc", "--dir", &dir];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// NOTIFYs each phone received, by extension.
    pub fn notify_counts(&self) -> BTreeMap<String, u32> {
        let dir = self.dir.to_string_lossy().into_owned();
        self.run(&["notify-counts", "--dir", &dir])
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                Some((parts.next()?.to_string(), parts.next()?.parse().ok()?))
            })
            .collect()
    }

    /// When each NOTIFY reached its phone (Unix seconds, by the SIPp phones' clock) and to which
    /// extension, earliest first; retransmissions of one NOTIFY count once.
    pub fn notify_times(&self) -> Vec<(f64, String)> {
        let dir = self.dir.to_string_lossy().into_owned();
        self.run(&["notify-times", "--dir", &dir])
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                Some((parts.next()?.parse().ok()?, parts.next()?.to_string()))
            })
            .collect()
    }

    /// One REGISTER from `extension` with the lab password; the final SIP code.
    pub fn register_once(&self, extension: &str) -> u16 {
        let dir = self.dir.to_string_lossy().into_owned();
        self.run(&["sip-register", "--dir", &dir, "--ext", extension])
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Stops (false) or starts (true) the lab's PostgreSQL or MariaDB, keeping its data.
    pub fn database(&self, up: bool) {
        let dir = self.dir.to_string_lossy().into_owned();
        self.run(&[if up { "db-start" } else { "db-stop" }, "--dir", &dir]);
    }

    pub fn stop(&self) {
        let dir = self.dir.to_string_lossy().into_owned();
        let _ = Command::new("bash")
            .arg(script())
            .args(["down", "--dir", &dir])
            .status();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop();
        // A passing test leaves nothing behind (a PostgreSQL lab's data is some 350 MB, and a
        // full run starts dozens); a failing one keeps its directory and logs to look at.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
