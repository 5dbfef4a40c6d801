//! A whole environment for one test: a namespace on the shared control plane, its own PBX lab,
//! optionally an SMTP server, a PbxConnection `acme` to that lab, and an operator watching only
//! that namespace.
#![allow(dead_code)]

use std::time::Duration;

use kube::{Api, Client};
use pbx_operator::api::{BulkUserChange, PbxConnection, Phase};
use sqlx::{AnyPool, AssertSqlSafe, Row};

use super::lab::{Lab, LabSpec};
use super::smtp::Smtp;
use super::{Operator, control_plane, eventually, kubectl_stdin};

pub struct Env {
    pub ns: String,
    pub client: Client,
    pub lab: Lab,
    pub smtp: Option<Smtp>,
    pub operator: Operator,
    pub pool: AnyPool,
}

/// One SIGKILL of [`Env::kill_mid_run`].
#[derive(Clone, Debug)]
pub struct Kill {
    /// Since the kills began.
    pub at: Duration,
    /// Phase and batches done/total, read right before the kill.
    pub before: String,
    /// The same, read after the kill with no operator running.
    pub after: String,
    /// `sql_progress` right after the kill.
    pub rows_written: String,
    /// Running with batches left before, and not finished after: the kill interrupted the run.
    pub landed_mid_run: bool,
}

impl Env {
    pub async fn start(prefix: &str, spec: LabSpec, with_smtp: bool) -> Env {
        Env::start_with(prefix, spec, with_smtp, &[]).await
    }

    /// Like [`Env::start`], with more arguments for `pbx-operator run`.
    pub async fn start_with(
        prefix: &str,
        spec: LabSpec,
        with_smtp: bool,
        run_args: &[&str],
    ) -> Env {
        Env::start_full(prefix, spec, &[], with_smtp, run_args).await
    }

    /// Like [`Env::start_with`], with more `lab.sh up` options for the lab (e.g. `--boot-ms`).
    pub async fn start_full(
        prefix: &str,
        spec: LabSpec,
        lab_args: &[&str],
        with_smtp: bool,
        run_args: &[&str],
    ) -> Env {
        let cp = control_plane();
        let client = super::admin().await;
        let ns = super::namespace(&client, prefix).await;
        let lab = Lab::start_with_args(spec, lab_args);
        let smtp = with_smtp.then(Smtp::start);
        let smtp_yaml = smtp
            .as_ref()
            .map(|s| format!("  smtp: {{ host: 127.0.0.1, port: {}, from: \"PBX <pbx@acme.test>\", tls: None }}\n", s.port))
            .unwrap_or_default();
        let manifest = format!(
            r#"apiVersion: v1
kind: Secret
metadata: {{ name: acme-pbx, namespace: {ns} }}
stringData:
  database-url: "{db}"
  rpc-url: "{rpc}"
---
apiVersion: pbx-operator.io/v1alpha1
kind: PbxConnection
metadata: {{ name: acme, namespace: {ns} }}
spec:
  domain: {domain}
  database: {{ urlSecretRef: {{ name: acme-pbx, key: database-url }} }}
  rpc: {{ urlSecretRef: {{ name: acme-pbx, key: rpc-url }} }}
{smtp_yaml}"#,
            db = lab.db_url(),
            rpc = lab.rpc_url(),
            domain = lab.domain(),
        );
        kubectl_stdin(
            &cp.admin_kubeconfig,
            &["apply", "-f", "-"],
            manifest.as_bytes(),
        );
        let mut args = vec!["--namespace", ns.as_str()];
        args.extend_from_slice(run_args);
        let operator = Operator::start(&cp.admin_kubeconfig, &args);
        sqlx::any::install_default_drivers();
        let pool = AnyPool::connect(lab.db_url()).await.unwrap();
        let env = Env {
            ns,
            client,
            lab,
            smtp,
            operator,
            pool,
        };
        let conns: Api<PbxConnection> = Api::namespaced(env.client.clone(), &env.ns);
        eventually(
            Duration::from_secs(60),
            "PbxConnection acme to be Ready",
            || async {
                let c = conns.get("acme").await.ok()?;
                let ready = c
                    .status?
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == "Ready")?;
                (ready.status == "True").then_some(())
            },
        )
        .await;
        env
    }

    /// SIGKILLs the operator and starts a fresh one, as a node failure would.
    pub fn kill_and_restart_operator(&mut self) {
        self.kill_operator();
        self.start_operator();
    }

    /// SIGKILLs the operator and leaves it down (see [`Env::start_operator`]).
    pub fn kill_operator(&mut self) {
        let _ = self.operator.child.kill();
        let _ = self.operator.child.wait();
    }

    /// Starts a fresh operator for this namespace (after [`Env::kill_operator`]).
    pub fn start_operator(&mut self) {
        self.operator = Operator::start(
            &control_plane().admin_kubeconfig,
            &["--namespace", &self.ns],
        );
    }

    /// SIGKILLs the operator `kills` times while BulkUserChange `name` runs, restarting it after
    /// each, and reports every kill. A kill is aimed only at a run that is Running with batches
    /// left and, from the second one on, only after the restarted operator recorded a batch more
    /// than at the previous kill (so every kill interrupts real work, not a start-up); then a
    /// pseudo-random pause (up to `jitter`, seeded by `seed`, so a failure can be replayed) lets
    /// it land inside a batch. It stops early when the run finished before the next kill: a
    /// caller asserts on how many kills landed mid-run.
    /// `sql_progress`, a `SELECT COUNT(*)` of rows at their new value, is recorded at each kill.
    pub async fn kill_mid_run(
        &mut self,
        name: &str,
        kills: usize,
        jitter: Duration,
        mut seed: u64,
        sql_progress: &str,
    ) -> Vec<Kill> {
        let api: Api<BulkUserChange> = Api::namespaced(self.client.clone(), &self.ns);
        let started = std::time::Instant::now();
        let status = |b: Option<BulkUserChange>| {
            let s = b.and_then(|b| b.status).unwrap_or_default();
            let (done, batches) = s
                .progress
                .as_ref()
                .map(|p| (p.done, p.batches))
                .unwrap_or((0, 0));
            (s.phase, done, batches)
        };
        let finished =
            |p: &Phase| matches!(p, Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed);
        let mut out: Vec<Kill> = Vec::new();
        let mut last_done: Option<u32> = None;
        while out.len() < kills {
            // Aim: Running, batches left, and (after a kill) a batch more recorded since.
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let (phase, done, batches) = status(api.get(name).await.ok());
                if finished(&phase) {
                    return out;
                }
                let moved_on = last_done.is_none_or(|d| done > d);
                if phase == Phase::Running && batches > 0 && done < batches && moved_on {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{name} made no progress for 2 minutes after kill {}: {phase:?} {done}/{batches}",
                    out.len()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pause = Duration::from_millis((seed >> 33) % (jitter.as_millis() as u64 + 1));
            tokio::time::sleep(pause).await;
            // Read right before the kill, read again with no operator running.
            let before = status(api.get(name).await.ok());
            if finished(&before.0) {
                return out;
            }
            self.kill_operator();
            // A request the operator sent just before it died may still be applied: let it land.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = status(api.get(name).await.ok());
            let rows = self.sql_one(sql_progress).await;
            let landed_mid_run = before.0 == Phase::Running
                && before.1 < before.2
                && !finished(&after.0)
                && after.1 < after.2;
            out.push(Kill {
                at: started.elapsed(),
                before: format!("{:?} {}/{}", before.0, before.1, before.2),
                after: format!("{:?} {}/{}", after.0, after.1, after.2),
                rows_written: rows,
                landed_mid_run,
            });
            last_done = Some(after.1);
            self.start_operator();
        }
        out
    }

    /// [`Env::kill_mid_run`] `kills` times at moments seeded by [`super::crash_seed`] (printed
    /// for a replay), asserting that every kill interrupted the running change `name`: a crash
    /// test whose change finished before its kills proves nothing.
    pub async fn kill_mid_run_every_time(
        &mut self,
        name: &str,
        kills: usize,
        jitter: Duration,
        sql_progress: &str,
    ) -> Vec<Kill> {
        let seed = super::crash_seed();
        let out = self
            .kill_mid_run(name, kills, jitter, seed, sql_progress)
            .await;
        eprintln!("SIGKILLs (seed {seed}): {out:#?}");
        assert_eq!(
            out.iter().filter(|k| k.landed_mid_run).count(),
            kills,
            "every SIGKILL must interrupt the running {name} (make it bigger if it finished first): {out:#?}"
        );
        out
    }

    /// Waits until BulkUserChange `name` has seen its latest generation and is in one of `phases`.
    pub async fn wait_buc(&self, name: &str, phases: &[Phase]) -> BulkUserChange {
        self.wait_buc_for(name, phases, Duration::from_secs(90))
            .await
    }

    /// [`Env::wait_buc`] with a timeout for large changes.
    pub async fn wait_buc_for(
        &self,
        name: &str,
        phases: &[Phase],
        timeout: Duration,
    ) -> BulkUserChange {
        let api: Api<BulkUserChange> = Api::namespaced(self.client.clone(), &self.ns);
        eventually(timeout, &format!("{name} to reach {phases:?}"), || async {
            let b = api.get(name).await.ok()?;
            let s = b.status.as_ref()?;
            (s.observed_generation == b.metadata.generation && phases.contains(&s.phase))
                .then_some(b)
        })
        .await
    }

    pub fn apply(&self, manifest: &str) {
        kubectl_stdin(
            &control_plane().admin_kubeconfig,
            &["apply", "-n", &self.ns, "-f", "-"],
            manifest.as_bytes(),
        );
    }

    /// A usr_preferences value of a user, straight from SQL.
    pub async fn attribute(&self, ext: &str, attribute: &str) -> Option<String> {
        let q = "SELECT value FROM usr_preferences WHERE username = $1 AND attribute = $2";
        let q = if self.lab.get("LAB_DB") == "mysql" {
            q.replace("$1", "?").replace("$2", "?")
        } else {
            q.to_string()
        };
        sqlx::query(AssertSqlSafe(q))
            .bind(ext)
            .bind(attribute)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
            .map(|r| r.get::<String, _>(0))
    }

    pub async fn set_attribute(&self, ext: &str, attribute: &str, value: &str) {
        let q = format!(
            "UPDATE usr_preferences SET value = '{value}' WHERE username = '{ext}' AND attribute = '{attribute}'"
        );
        let n = sqlx::query(AssertSqlSafe(q))
            .execute(&self.pool)
            .await
            .unwrap()
            .rows_affected();
        if n == 0 {
            let q = format!(
                "INSERT INTO usr_preferences (username, domain, attribute, type, value) VALUES ('{ext}', '{}', '{attribute}', 2, '{value}')",
                self.lab.domain()
            );
            sqlx::query(AssertSqlSafe(q))
                .execute(&self.pool)
                .await
                .unwrap();
        }
    }

    pub async fn sql_one(&self, q: &str) -> String {
        let row = sqlx::query(AssertSqlSafe(q.to_string()))
            .fetch_one(&self.pool)
            .await
            .unwrap();
        row.try_get::<String, _>(0)
            .or_else(|_| row.try_get::<i64, _>(0).map(|v| v.to_string()))
            .unwrap()
    }

    /// [`Env::sql_one`] of a query built by the caller.
    pub async fn sql_one_owned(&self, q: String) -> String {
        self.sql_one(&q).await
    }

    /// Runs `pbx-operator` with this environment's kubeconfig and namespace.
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pbx-operator"))
            .args(args)
            .env("KUBECONFIG", &control_plane().admin_kubeconfig)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn events(&self) -> String {
        super::kubectl(
            &control_plane().admin_kubeconfig,
            &[
                "get",
                "events",
                "-n",
                &self.ns,
                "-o",
                "custom-columns=REASON:.reason,MESSAGE:.message,NOTE:.note",
            ],
        )
    }
}
