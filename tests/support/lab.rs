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

/// One line of `lab.sh notify-times`: what a lab phone saw, and when (Unix seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct PhoneEvent {
    pub at: f64,
    /// `NOTIFY` (the first copy of one) or `REBOOTED` (the fresh REGISTER after it was accepted).
    pub what: String,
    pub extension: String,
    /// The NOTIFY's Call-ID; the REBOOTED of that restart has the same one.
    pub call_id: String,
}

impl Lab {
    pub fn start(spec: LabSpec) -> Lab {
        Lab::start_with_args(spec, &[])
    }

    /// Like [`Lab::start`], with more `lab.sh up` options (e.g. `--boot-ms 4000`).
    pub fn start_with_args(spec: LabSpec, up_args: &[&str]) -> Lab {
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
            .args(up_args)
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

    /// Moves phone `extension` (with the rest of its SIPp group): its SIPp stopped and started
    /// again on new ports with the same credentials, logging to `sipp/<group>.moved<N>.log`;
    /// returns once the registrar shows the new port, and the port.
    pub fn move_phone(&self, extension: &str) -> u16 {
        let dir = self.dir.to_string_lossy().into_owned();
        let out = self.run(&["phone-move", "--dir", &dir, "--ext", extension]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("lab.sh phone-move printed {out:?}"))
    }

    /// The NOTIFY lines of one SIPp log (`sipp/<name>.log`): (extension, Call-ID) of each, UDP
    /// retransmissions once.
    pub fn notifies_logged(&self, name: &str) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.dir.join("sipp").join(format!("{name}.log")))
            .unwrap_or_default();
        let mut out: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(1) == Some(&"NOTIFY") && fields.len() > 3 {
                let n = (fields[2].to_string(), fields[3].to_string());
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        out
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

    /// Every NOTIFY the phones received (the first copy of each; UDP retransmissions are not new
    /// NOTIFYs) and every reboot they finished (the 200 to the fresh REGISTER; it has the
    /// NOTIFY's Call-ID), in time order. Read from the SIPp logs (`DIR/sipp/*.log`), whose
    /// NOTIFY and REBOOTED lines end in SIPp's wall-clock `[timestamp]`: one clock for all SIPp
    /// processes, unlike `[clock_tick]`.
    pub fn phone_events(&self) -> Vec<PhoneEvent> {
        let mut out: Vec<PhoneEvent> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let logs = std::fs::read_dir(self.dir.join("sipp")).expect("the lab's sipp directory");
        for entry in logs.flatten() {
            if entry.path().extension().is_none_or(|e| e != "log") {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (Some(what), Some(ext), Some(call_id), Some(at)) =
                    (fields.get(1), fields.get(2), fields.get(3), fields.last())
                else {
                    continue;
                };
                if !matches!(*what, "NOTIFY" | "REBOOTED") {
                    continue;
                }
                if *what == "NOTIFY" && !seen.insert(call_id.to_string()) {
                    continue;
                }
                out.push(PhoneEvent {
                    at: at
                        .parse()
                        .unwrap_or_else(|_| panic!("no timestamp in {line:?}")),
                    what: what.to_string(),
                    extension: ext.to_string(),
                    call_id: call_id.to_string(),
                });
            }
        }
        out.sort_by(|a, b| a.at.total_cmp(&b.at));
        out
    }

    /// [`Lab::phone_events`] once `rebooted` phones have logged their REBOOTED (SIPp writes its
    /// log asynchronously: a phone the operator saw register again may not have logged it yet),
    /// or as they are after 20 s, for the caller's assertions to show.
    pub fn phone_events_after(&self, rebooted: usize) -> Vec<PhoneEvent> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let events = self.phone_events();
            let logged = events.iter().filter(|e| e.what == "REBOOTED").count();
            if logged >= rebooted || std::time::Instant::now() > deadline {
                return events;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
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

/// Everything a user has in Kamailio's tables and the phone inventory, one line per row, in a
/// stable order; `pbx.status` and the credentials (HA1, PIN hash, second factor) left out, as a
/// restore renews them. What "the user is back, byte for byte" compares.
pub async fn user_rows(pool: &sqlx::AnyPool, ext: &str) -> Vec<String> {
    use sqlx::{AssertSqlSafe, Row};
    let q = |sql: String| async move {
        sqlx::query(AssertSqlSafe(sql))
            .fetch_all(pool)
            .await
            .expect("lab database readable")
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        r.try_get::<Option<String>, _>(i)
                            .ok()
                            .flatten()
                            .or_else(|| r.try_get::<i64, _>(i).ok().map(|v| v.to_string()))
                            .or_else(|| r.try_get::<i32, _>(i).ok().map(|v| v.to_string()))
                            .unwrap_or_else(|| "NULL".into())
                    })
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect::<Vec<String>>()
    };
    let mut out = Vec::new();
    for (table, sql) in [
        (
            "subscriber",
            format!("SELECT username, domain, password FROM subscriber WHERE username = '{ext}'"),
        ),
        (
            "usr_preferences",
            format!(
                "SELECT uuid, username, domain, attribute, type, value FROM usr_preferences WHERE username = '{ext}' AND attribute NOT IN ('pbx.status', 'pbx.voicemail_pin', 'pbx.totp_secret') ORDER BY attribute, value"
            ),
        ),
        (
            "grp",
            format!("SELECT username, domain, grp FROM grp WHERE username = '{ext}' ORDER BY grp"),
        ),
        (
            "dbaliases",
            format!(
                "SELECT alias_username, alias_domain, username, domain FROM dbaliases WHERE username = '{ext}' ORDER BY id"
            ),
        ),
        (
            "pbx_phone",
            format!(
                "SELECT id, mac, vendor, model, owner_username, domain, label FROM pbx_phone WHERE owner_username = '{ext}' ORDER BY id"
            ),
        ),
    ] {
        for row in q(sql).await {
            out.push(format!("{table}: {row}"));
        }
    }
    out
}
