//! Chaos: every kind of run at once against the real components (control plane, operator
//! process, Kamailio on PostgreSQL, SIPp phones, SMTP server), while the operator is SIGKILLed
//! 20 times, the PBX database is stopped in the middle of a batch, the kube-apiserver is stopped
//! and started again, and the operator is stopped gracefully once (a rolling upgrade). Then what
//! a user checks: every target once in the results, the PBX in the planned state, no mail or
//! NOTIFY twice, and every side effect either confirmed or reported Uncertain, which the retry
//! annotation then sends exactly once.
//!
//! The runs, on disjoint users of one lab (extension ranges below):
//! - `resets`, a BulkUserChange: two fields and ResetPassword (a reset mail each) on 2,000 users;
//! - `moves`, a CSV-sourced BulkUserChange of 2,000 rows; every 10th row takes the number of the
//!   user after it (number moves);
//! - `reorg`, a UserRecycle of 200 users: 100 reset, 100 handed to new people with a welcome mail;
//! - `phones`, a PhoneRestart of 200 registered SIPp phones.
//!
//! Each disruption waits until the operator made progress since the previous one, and for the
//! run it is aimed at to be going; the pause after that comes from `CHAOS_SEED` (printed; set it
//! to replay a run's pauses). Right after each disruption the runs' journals (results
//! ConfigMaps) are read for the mails and NOTIFYs they show under way: exactly the targets a
//! restarted operator must report Uncertain (a mail; a NOTIFY no fresh REGISTER confirmed, which
//! is never sent again).
//!
//! The properties are collected and asserted together at the end, so one run shows every broken
//! one. Those marked `OPERATOR DEFECT` are the operator's to fix in src, not the test's.
//!
//! The API server outage stops this binary's own control plane (each test binary has one, see
//! `support::control_plane`): keep every test of this binary ready for it, or give it its own.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use pbx_operator::api::{BulkUserChange, Outcome, Phase, PhoneRestart, UserRecycle};
use pbx_operator::engine::outbox::MAIL_FLIGHT;
use pbx_operator::plan::stored::StepState;
use pbx_operator::plan::stored::{Row, from_jsonl};
use sqlx::{AssertSqlSafe, Row as _};
use support::control_plane;
use support::lab::LabSpec;
use support::pbx::Env;

/// Phones owned by extensions PHONE_FIRST.. (the lab gives the first users the phones).
const PHONES: u32 = 200;
const PHONE_FIRST: u32 = 200;
const RESET_FIRST: u32 = 400;
const RESET_USERS: u32 = 2000;
const URC_FIRST: u32 = 2400;
const URC_USERS: u32 = 200;
/// URC_FIRST..URC_RECYCLED_FROM are only reset; the rest go to new people.
const URC_RECYCLED_FROM: u32 = 2500;
const CSV_FIRST: u32 = 2600;
const CSV_ROWS: u32 = 2000;
const USERS: u32 = CSV_FIRST + CSV_ROWS - 200;

const KILLS: usize = 20;
/// The longest pause between "the run is going" and a kill.
const JITTER_MS: u64 = 700;
const NOT_SENT_AGAIN: &str = "not sent again";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Resets,
    Moves,
    Reorg,
    Phones,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Resets, Kind::Moves, Kind::Reorg, Kind::Phones];

    fn name(self) -> &'static str {
        match self {
            Kind::Resets => "resets",
            Kind::Moves => "moves",
            Kind::Reorg => "reorg",
            Kind::Phones => "phones",
        }
    }

    /// `kind/name` for `pbx-operator results`.
    fn reference(self) -> String {
        let kind = match self {
            Kind::Resets | Kind::Moves => "bulkuserchange",
            Kind::Reorg => "userrecycle",
            Kind::Phones => "phonerestart",
        };
        format!("{kind}/{}", self.name())
    }
}

/// Where one run stands, from its status.
#[derive(Clone, Debug, Default)]
struct Run {
    phase: Option<Phase>,
    done: u32,
    batches: u32,
    run: String,
}

impl Run {
    /// Running with batches left: work in progress.
    fn mid_run(&self) -> bool {
        self.phase == Some(Phase::Running) && self.batches > 0 && self.done < self.batches
    }

    fn finished(&self) -> bool {
        matches!(
            self.phase,
            Some(Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed)
        )
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.phase {
            None => write!(f, "-"),
            Some(p) => write!(f, "{p:?} {}/{}", self.done, self.batches),
        }
    }
}

type Runs = BTreeMap<Kind, Run>;

fn show(runs: &Runs) -> String {
    Kind::ALL
        .iter()
        .map(|k| format!("{} {}", k.name(), runs.get(k).cloned().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Side effects a run's journal shows under way: mails recorded as being sent, phones whose
/// NOTIFY is recorded as sent (or about to be) and not yet confirmed.
#[derive(Clone, Debug, Default)]
struct InFlight {
    mails: BTreeSet<(Kind, String)>,
    /// Extensions.
    phones: BTreeSet<String>,
}

impl InFlight {
    fn minus(&self, other: &InFlight) -> InFlight {
        InFlight {
            mails: self.mails.difference(&other.mails).cloned().collect(),
            phones: self.phones.difference(&other.phones).cloned().collect(),
        }
    }

    fn add(&mut self, other: &InFlight) {
        self.mails.extend(other.mails.iter().cloned());
        self.phones.extend(other.phones.iter().cloned());
    }

    fn mails_of(&self, kind: Kind) -> BTreeSet<String> {
        self.mails
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, t)| t.clone())
            .collect()
    }
}

impl std::fmt::Display for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} reset mails, {} welcome mails, {} NOTIFYs",
            self.mails_of(Kind::Resets).len(),
            self.mails_of(Kind::Reorg).len(),
            self.phones.len()
        )
    }
}

/// One disruption: a SIGKILL, an outage or the graceful stop.
#[derive(Debug)]
struct Event {
    what: String,
    at: Duration,
    before: Runs,
    after: Runs,
    note: String,
    /// Under way in the journals right after it that no earlier disruption had left under
    /// way: what this one left.
    left: InFlight,
}

impl Event {
    /// The runs that were going right before and still unfinished right after.
    fn interrupted(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| {
                self.before.get(k).is_some_and(Run::mid_run)
                    && self.after.get(k).is_some_and(Run::mid_run)
            })
            .collect()
    }

    fn is_kill(&self) -> bool {
        self.what.starts_with("SIGKILL")
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hit: Vec<&str> = self.interrupted().iter().map(|k| k.name()).collect();
        write!(
            f,
            "{:>6.1}s {}: interrupted {hit:?}; before [{}]; after [{}]; left under way: {}{}",
            self.at.as_secs_f64(),
            self.what,
            show(&self.before),
            show(&self.after),
            self.left,
            if self.note.is_empty() {
                String::new()
            } else {
                format!("; {}", self.note)
            }
        )
    }
}

/// What to do next.
#[derive(Clone, Copy, Debug)]
enum Step {
    Apply(Kind),
    /// A SIGKILL, aimed at a run (another one that is going if it is over).
    Kill(Option<Kind>),
    DatabaseOutage,
    ApiServerOutage,
    Sigterm,
}

struct Chaos {
    env: Env,
    started: Instant,
    started_wall: std::time::SystemTime,
    seed: u64,
    events: Vec<Event>,
    kills: usize,
    /// Progress at the last disruption: the next waits until the operator made more.
    last_progress: u64,
    /// Every operator process's log.
    logs: Vec<PathBuf>,
    /// Everything any disruption so far found under way.
    seen_in_flight: InFlight,
    /// Properties that broke during the chaos, with evidence; asserted empty at the end.
    failures: Vec<String>,
    /// Targets of the current batch of `resets`: (batch index, extensions).
    reset_batch: Option<(u32, Vec<String>)>,
}

fn quoted(range: std::ops::Range<u32>) -> String {
    range
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn manifest(kind: Kind) -> String {
    match kind {
        Kind::Resets => format!(
            r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: {{ name: resets }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ extensions: [{}] }}
  fields:
    callGroup: {{ value: "9", lock: Open }}
    pickupGroup: {{ value: "9", lock: Open }}
  actions: [ResetPassword]
"#,
            quoted(RESET_FIRST..RESET_FIRST + RESET_USERS)
        ),
        Kind::Moves => r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: moves }
spec:
  connectionRef: { name: acme }
  source: { csv: { configMapKeyRef: { name: moves, key: changes.csv } } }
"#
        .to_string(),
        Kind::Reorg => {
            let recycle: Vec<String> = (URC_RECYCLED_FROM..URC_FIRST + URC_USERS)
                .map(|e| {
                    format!(
                        "    - {{ extension: \"{e}\", firstName: New{e}, lastName: Hire{e}, email: new{e}@acme.test }}"
                    )
                })
                .collect();
            format!(
                r#"apiVersion: pbx-operator.io/v1alpha1
kind: UserRecycle
metadata: {{ name: reorg }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ extensions: [{}] }}
  recycle:
{}
  sendWelcomeEmail: true
"#,
                quoted(URC_FIRST..URC_FIRST + URC_USERS),
                recycle.join("\n")
            )
        }
        Kind::Phones => format!(
            r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: {{ name: phones }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ extensions: [{}] }}
  rollout: {{ maxInFlight: 10, perSecond: 4 }}
  confirm: {{ timeout: 10s }}
"#,
            quoted(PHONE_FIRST..PHONE_FIRST + PHONES)
        ),
    }
}

/// The CSV of `moves`: every row sets caller ID Anonymous; every 10th row also takes the
/// primary number of the user after it (who has a row of its own that gives no number).
fn moves_csv() -> String {
    let mut csv = String::from("extension,primaryNumber,callerIdPolicy\n");
    for ext in CSV_FIRST..CSV_FIRST + CSV_ROWS {
        let take = if (ext - CSV_FIRST).is_multiple_of(10) {
            format!("+1555010{:04}", ext + 1)
        } else {
            String::new()
        };
        csv.push_str(&format!("{ext},{take},Anonymous\n"));
    }
    csv
}

/// The numbers each CSV user holds at the end: the taker the next user's, the giver none, the
/// rest what the lab seeded (every user but i % 5 == 4 owns +1555010<ext>).
fn planned_numbers(ext: u32) -> Vec<String> {
    let offset = ext - CSV_FIRST;
    if offset.is_multiple_of(10) {
        vec![format!("+1555010{:04}", ext + 1)]
    } else if offset % 10 == 1 || (ext - 200) % 5 == 4 {
        vec![]
    } else {
        vec![format!("+1555010{ext:04}")]
    }
}

/// A user whose HA1 is no longer the lab's: its password was reset (PostgreSQL's md5()).
fn rotated(password: &str) -> String {
    format!("ha1 <> md5(username || ':' || domain || ':' || '{password}')")
}

fn range_sql(range: std::ops::Range<u32>) -> String {
    format!(
        "CAST(username AS INTEGER) BETWEEN {} AND {}",
        range.start,
        range.end - 1
    )
}

impl Chaos {
    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Seconds since the chaos began, for a wall-clock time (a mail's arrival).
    fn offset(&self, t: std::time::SystemTime) -> f64 {
        t.duration_since(self.started_wall)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    fn fail(&mut self, what: String) {
        eprintln!("chaos: FAILED: {what}");
        self.failures.push(what);
    }

    async fn runs(&self) -> Runs {
        let c = &self.env.client;
        let ns = &self.env.ns;
        let mut out = Runs::new();
        let bucs: Api<BulkUserChange> = Api::namespaced(c.clone(), ns);
        for kind in [Kind::Resets, Kind::Moves] {
            let s = bucs.get(kind.name()).await.ok().and_then(|b| b.status);
            out.insert(kind, run_of(s.as_ref().map(|s| (s.phase, &s.progress))));
        }
        let urcs: Api<UserRecycle> = Api::namespaced(c.clone(), ns);
        let s = urcs.get("reorg").await.ok().and_then(|b| b.status);
        out.insert(
            Kind::Reorg,
            run_of(s.as_ref().map(|s| (s.phase, &s.progress))),
        );
        let prss: Api<PhoneRestart> = Api::namespaced(c.clone(), ns);
        let s = prss.get("phones").await.ok().and_then(|b| b.status);
        out.insert(
            Kind::Phones,
            run_of(s.as_ref().map(|s| (s.phase, &s.progress))),
        );
        out
    }

    /// A number that grows with everything the runs do: rows written, mails received, phones
    /// notified and rebooted, batches recorded. None while the database cannot be read.
    async fn progress(&self, runs: &Runs) -> Option<u64> {
        let pw = self.env.lab.get("LAB_PHONE_PASSWORD");
        let q = format!(
            "SELECT (SELECT COUNT(*) FROM subscriber WHERE {rotated}), \
             (SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '9'), \
             (SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.caller_id_policy' AND value = 'Anonymous'), \
             (SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.first_name' AND value LIKE 'New%')",
            rotated = rotated(pw)
        );
        let row = sqlx::query(AssertSqlSafe(q))
            .fetch_one(&self.env.pool)
            .await
            .ok()?;
        let sql: i64 = (0..4).map(|i| row.get::<i64, _>(i)).sum();
        let mails = self.env.smtp.as_ref().expect("SMTP").count() as u64;
        let phones = self.env.lab.phone_events().len() as u64;
        let batches: u64 = runs.values().map(|r| r.done as u64).sum();
        Some(sql as u64 + mails + phones + batches)
    }

    /// Polls until `ready` holds for the runs and the operator made progress since the last
    /// disruption.
    async fn wait_until(&self, what: &str, ready: impl Fn(&Runs) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let runs = self.runs().await;
            let progress = self.progress(&runs).await;
            if progress.is_some_and(|p| p > self.last_progress) && ready(&runs) {
                return;
            }
            let applied: Vec<&Run> = runs.values().filter(|r| r.phase.is_some()).collect();
            assert!(
                applied.is_empty() || !applied.iter().all(|r| r.finished()),
                "chaos: every run finished before {what}: the workload is too small for this machine's speed; make it bigger\n{}",
                self.events
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            assert!(
                Instant::now() < deadline,
                "chaos: waited 2 minutes for {what} (progress {progress:?}, at the last disruption {}): [{}]\n{}",
                self.last_progress,
                show(&runs),
                self.events
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// After a disruption: progress from here on is the next operator's.
    async fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let runs = self.runs().await;
            if let Some(p) = self.progress(&runs).await {
                self.last_progress = p;
                return;
            }
            assert!(Instant::now() < deadline, "the database stayed unreadable");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn next_pause(&mut self) -> Duration {
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Duration::from_millis((self.seed >> 33) % (JITTER_MS + 1))
    }

    fn restart_operator(&mut self) {
        self.env.start_operator();
        self.logs.push(self.env.operator.log.clone());
    }

    async fn apply(&mut self, kind: Kind) {
        self.env.apply(&manifest(kind));
        eprintln!(
            "chaos: {:>6.1}s applied {}",
            self.elapsed().as_secs_f64(),
            kind.name()
        );
    }

    /// Records a disruption with what it left under way. With `operator_alive` (an outage the
    /// operator lived through), a mail it has meanwhile turned Uncertain counts as left too.
    async fn record(
        &mut self,
        what: String,
        at: Duration,
        before: Runs,
        after: Runs,
        note: String,
        operator_alive: bool,
    ) {
        let in_flight = self.in_flight(operator_alive).await;
        let left = in_flight.minus(&self.seen_in_flight);
        self.seen_in_flight.add(&in_flight);
        let event = Event {
            what,
            at,
            before,
            after,
            note,
            left,
        };
        eprintln!("chaos: {event}");
        self.events.push(event);
    }

    async fn kill(&mut self, aim: Option<Kind>) {
        let n = self.kills + 1;
        self.wait_until(&format!("a run to aim SIGKILL {n} at ({aim:?})"), |runs| {
            let any = runs.values().any(Run::mid_run);
            match aim.and_then(|k| runs.get(&k)) {
                Some(r) if r.mid_run() => true,
                // Over, or never started: any run that is going.
                Some(r) if r.finished() => any,
                Some(_) => false,
                None => any,
            }
        })
        .await;
        let pause = self.next_pause();
        tokio::time::sleep(pause).await;
        let before = self.runs().await;
        let at = self.elapsed();
        self.env.kill_operator();
        // A request the operator sent just before it died may still land.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = self.runs().await;
        self.kills += 1;
        let what = format!(
            "SIGKILL {n} (aimed at {}, {} ms after the run was going)",
            aim.map(Kind::name).unwrap_or("any run"),
            pause.as_millis()
        );
        self.record(what, at, before, after, String::new(), false)
            .await;
        self.settle().await;
        self.restart_operator();
    }

    /// Reads every run's journal (its results ConfigMaps) for the mails and NOTIFYs under way:
    /// exactly what a restarted operator must report Uncertain, or as not sent again. With
    /// `uncertain`, mails already reported Uncertain count too.
    async fn in_flight(&self, uncertain: bool) -> InFlight {
        let mut out = InFlight::default();
        for kind in [Kind::Resets, Kind::Reorg, Kind::Phones] {
            for row in self.journal(kind).await {
                match kind {
                    Kind::Resets | Kind::Reorg => {
                        if row.steps.iter().any(|s| {
                            s.kind.is_mail()
                                && (s.state == StepState::Intended
                                    || (uncertain && s.state == StepState::Uncertain))
                        }) {
                            out.mails.insert((kind, row.target));
                        }
                    }
                    _ => {
                        if row.outcome == Outcome::InProgress {
                            out.phones
                                .insert(row.phone.map(|p| p.extension).unwrap_or(row.target));
                        }
                    }
                }
            }
        }
        out
    }

    /// All rows of a run's results ConfigMaps, in order.
    async fn journal(&self, kind: Kind) -> Vec<Row> {
        let cms: Api<ConfigMap> = Api::namespaced(self.env.client.clone(), &self.env.ns);
        let mut rows = Vec::new();
        for i in 1.. {
            let Ok(Some(cm)) = cms.get_opt(&format!("{}-results-{i}", kind.name())).await else {
                break;
            };
            let text = support::results_rows(&cm);
            rows.extend(from_jsonl(&text).expect("readable results"));
        }
        rows
    }

    /// Where the current batch of `resets` stands: (batch index, users of it with their
    /// password reset, users in it); None unless `resets` is going.
    async fn reset_batch(&mut self, runs: &Runs) -> Option<(u32, usize, usize)> {
        let r = &runs[&Kind::Resets];
        if !r.mid_run() {
            return None;
        }
        if self.reset_batch.as_ref().is_none_or(|(i, _)| *i != r.done) {
            let cms: Api<ConfigMap> = Api::namespaced(self.env.client.clone(), &self.env.ns);
            let cm = cms
                .get_opt(&format!("resets-results-{}", r.done + 1))
                .await
                .ok()??;
            let text = support::results_rows(&cm);
            let targets = from_jsonl(&text)
                .ok()?
                .into_iter()
                .map(|r| r.target)
                .collect();
            self.reset_batch = Some((r.done, targets));
        }
        let (index, targets) = self.reset_batch.as_ref()?;
        let q = format!(
            "SELECT COUNT(*) FROM subscriber WHERE {} AND username IN ({})",
            rotated(self.env.lab.get("LAB_PHONE_PASSWORD")),
            targets
                .iter()
                .map(|t| format!("'{t}'"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let row = sqlx::query(AssertSqlSafe(q))
            .fetch_one(&self.env.pool)
            .await
            .ok()?;
        Some((*index, row.get::<i64, _>(0) as usize, targets.len()))
    }

    /// Stops PostgreSQL once some users of a `resets` batch have their password reset and
    /// others not yet, keeps it down until the run reports that it waits for it, then starts
    /// it again.
    async fn database_outage(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(150);
        let (before, index, written, size) = loop {
            assert!(
                Instant::now() < deadline,
                "chaos: resets never was in the middle of a batch's password resets"
            );
            let runs = self.runs().await;
            let progress = self.progress(&runs).await;
            if progress.is_some_and(|p| p > self.last_progress)
                && let Some((index, n, size)) = self.reset_batch(&runs).await
                && n > 0
                && n < size
            {
                break (runs, index, n, size);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let at = self.elapsed();
        self.env.lab.database(false);
        let stopped = Instant::now();
        let bucs: Api<BulkUserChange> = Api::namespaced(self.env.client.clone(), &self.env.ns);
        let waiting = support::eventually(
            Duration::from_secs(60),
            "resets to report that it waits for the database",
            || async {
                let s = bucs.get("resets").await.ok()?.status?;
                let c = s.conditions.iter().find(|c| {
                    c.type_ == "Reconciling" && c.status == "True" && c.message.contains("database")
                })?;
                Some(c.message.clone())
            },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.env.lab.database(true);
        let down = stopped.elapsed();
        let after = self.runs().await;
        let note = format!(
            "PostgreSQL stopped with {written} of {size} users of resets batch {} reset, down {:.1}s; resets said: {waiting}",
            index + 1,
            down.as_secs_f64()
        );
        self.record("database outage".into(), at, before, after, note, true)
            .await;
        self.settle().await;
    }

    /// Stops the kube-apiserver while runs are going, then starts it again (etcd keeps the data).
    async fn api_server_outage(&mut self) {
        self.wait_until("a run in progress for the API server outage", |runs| {
            runs.values().any(Run::mid_run)
        })
        .await;
        let at = self.elapsed();
        let before = self.runs().await;
        let cp = control_plane();
        let stopped = Instant::now();
        cp.stop_apiserver();
        let stop_took = stopped.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        cp.start_apiserver();
        let down = stopped.elapsed();
        let alive = self.env.operator.child.try_wait().unwrap().is_none();
        let after = self.runs().await;
        let note = format!(
            "kube-apiserver down {:.1}s (stopping took {:.1}s); the operator {}",
            down.as_secs_f64(),
            stop_took.as_secs_f64(),
            if alive {
                "kept running"
            } else {
                "exited (started again by the test)"
            }
        );
        self.record(
            "kube-apiserver outage".into(),
            at,
            before,
            after,
            note,
            true,
        )
        .await;
        if !alive {
            self.restart_operator();
        }
        self.settle().await;
    }

    /// A rolling upgrade while `resets` is sending the mails of a batch: SIGTERM, wait for the
    /// exit, start a new operator.
    async fn sigterm(&mut self) {
        let mut last_mails = usize::MAX;
        self.wait_until(
            "progress since the last disruption, for the SIGTERM",
            |_| true,
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            assert!(
                Instant::now() < deadline,
                "chaos: resets never was sending mails for the SIGTERM"
            );
            let runs = self.runs().await;
            let mails = self.env.smtp.as_ref().expect("SMTP").count();
            let sending = mails > last_mails;
            last_mails = mails;
            if sending
                && let Some((_, n, size)) = self.reset_batch(&runs).await
                && n == size
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let at = self.elapsed();
        let before = self.runs().await;
        let signalled = std::time::SystemTime::now();
        let (exit, took) = self.env.operator.stop_with("TERM", Duration::from_secs(30));
        let after = self.runs().await;
        // Mails that arrived after the signal: steps the stopping operator still took.
        let mut late = BTreeMap::<&str, usize>::new();
        for (t, to) in self.env.smtp.as_ref().expect("SMTP").received() {
            if t > signalled {
                *late
                    .entry(if to.ends_with("@acme.test") {
                        "welcome"
                    } else {
                        "reset"
                    })
                    .or_default() += 1;
            }
        }
        let note = format!(
            "the operator exited {exit} {:.1}s after the signal; mails that arrived after the signal: {late:?}",
            took.as_secs_f64()
        );
        self.record(
            "SIGTERM (rolling upgrade)".into(),
            at,
            before,
            after,
            note,
            false,
        )
        .await;
        if !exit.success() {
            self.fail(format!(
                "a SIGTERM is a clean stop: the operator exited {exit}"
            ));
        }
        // README, "Once, and recorded": on SIGTERM "the operator starts no new step, finishes
        // and records the one in flight ... Nothing is uncertain after a graceful stop."
        // At most what was under way at the signal may still arrive: one flight of reset mails,
        // one flight of welcome mails.
        let (resets_late, welcome_late) = (
            late.get("reset").copied().unwrap_or(0),
            late.get("welcome").copied().unwrap_or(0),
        );
        if resets_late > MAIL_FLIGHT || welcome_late > MAIL_FLIGHT {
            self.fail(format!(
                "OPERATOR DEFECT (graceful stop): the operator started new steps after the SIGTERM: {resets_late} reset mails and {welcome_late} welcome mails (a flight is {MAIL_FLIGHT}) arrived after the signal, in the {:.1}s before it exited",
                took.as_secs_f64()
            ));
        }
        let left = self.events.last().expect("recorded").left.clone();
        for kind in [Kind::Resets, Kind::Reorg] {
            let mails = left.mails_of(kind);
            if !mails.is_empty() {
                self.fail(format!(
                    "OPERATOR DEFECT (graceful stop): after the SIGTERM (exit {:.1}s after the signal) {} mails of {} were still recorded as being sent, so the next operator reports them Uncertain: {mails:?}; mails that arrived after the signal: {late:?}",
                    took.as_secs_f64(),
                    mails.len(),
                    kind.name()
                ));
            }
        }
        self.settle().await;
        self.restart_operator();
    }
}

fn run_of(s: Option<(Phase, &Option<pbx_operator::api::Progress>)>) -> Run {
    let Some((phase, progress)) = s else {
        return Run::default();
    };
    let (done, batches, run) = progress
        .as_ref()
        .map(|p| (p.done, p.batches, p.run.clone()))
        .unwrap_or_default();
    Run {
        phase: Some(phase),
        done,
        batches,
        run,
    }
}

/// The full results of a run through `pbx-operator results`: header and records.
fn results(env: &Env, kind: Kind) -> (Vec<String>, Vec<Vec<String>>) {
    let (ok, out, err) = env.cli(&["results", &kind.reference(), "-n", &env.ns]);
    assert!(ok, "pbx-operator results {}: {err}", kind.reference());
    let mut r = csv::Reader::from_reader(out.as_bytes());
    let header = r.headers().unwrap().iter().map(String::from).collect();
    let rows = r
        .records()
        .map(|x| x.unwrap().iter().map(String::from).collect())
        .collect();
    (header, rows)
}

/// Each target's outcome and notes (target, outcome, notes) from the results; the same target
/// twice stays twice.
fn outcomes(env: &Env, kind: Kind) -> Vec<(String, String, String)> {
    let (header, rows) = results(env, kind);
    let col = |name: &str| header.iter().position(|h| h == name);
    let (target, outcome, notes) = (col("target"), col("outcome"), col("notes"));
    rows.into_iter()
        .map(|r| {
            (
                r[target.expect("a target column")].clone(),
                r[outcome.expect("an outcome column")].clone(),
                r[notes.expect("a notes column")].clone(),
            )
        })
        .collect()
}

fn once_each(what: &str, targets: &[String], expected: &BTreeSet<String>) -> Option<String> {
    let mut seen = BTreeMap::<&str, usize>::new();
    for t in targets {
        *seen.entry(t).or_default() += 1;
    }
    let twice: Vec<&&str> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(t, _)| t)
        .collect();
    let missing: Vec<&String> = expected
        .iter()
        .filter(|t| !seen.contains_key(t.as_str()))
        .collect();
    let extra: Vec<&&str> = seen.keys().filter(|t| !expected.contains(**t)).collect();
    (!twice.is_empty() || !missing.is_empty() || !extra.is_empty()).then(|| {
        format!(
            "{what}: every target exactly once in the results: twice {twice:?}, missing {missing:?}, not a target {extra:?}"
        )
    })
}

async fn users_with(env: &Env, condition: &str) -> BTreeSet<String> {
    sqlx::query(AssertSqlSafe(format!(
        "SELECT username FROM subscriber WHERE {condition}"
    )))
    .fetch_all(&env.pool)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<String, _>(0))
    .collect()
}

async fn attribute_map(env: &Env, attribute: &str) -> BTreeMap<String, String> {
    sqlx::query(AssertSqlSafe(format!(
        "SELECT username, value FROM usr_preferences WHERE attribute = '{attribute}'"
    )))
    .fetch_all(&env.pool)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
    .collect()
}

fn extensions(range: std::ops::Range<u32>) -> BTreeSet<String> {
    range.map(|e| e.to_string()).collect()
}

/// The first disruption that left each target's mail or phone's NOTIFY under way.
fn left_by(events: &[Event]) -> (BTreeMap<(Kind, String), String>, BTreeMap<String, String>) {
    let mut mails = BTreeMap::new();
    let mut phones = BTreeMap::new();
    for e in events {
        for m in &e.left.mails {
            mails.entry(m.clone()).or_insert_with(|| e.what.clone());
        }
        for p in &e.left.phones {
            phones.entry(p.clone()).or_insert_with(|| e.what.clone());
        }
    }
    (mails, phones)
}

#[tokio::test]
async fn all_kinds_survive_kills_outages_and_a_rolling_upgrade() {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    eprintln!("CHAOS_SEED={seed} (replay the pauses: CHAOS_SEED={seed} cargo test --test chaos)");
    let t0 = Instant::now();
    let env = Env::start(
        "chaos",
        LabSpec {
            db: "postgres",
            users: USERS as usize,
            phones: PHONES as usize,
            ..Default::default()
        },
        true,
    )
    .await;
    eprintln!(
        "chaos: control plane, lab ({USERS} users, {PHONES} SIPp phones), SMTP and operator up in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        env.lab.list("LAB_PHONES_REBOOT").len(),
        PHONES as usize,
        "every lab phone registered"
    );
    let password = env.lab.get("LAB_PHONE_PASSWORD").to_string();
    let seeded_email = attribute_map(&env, "pbx.email").await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some("moves".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("changes.csv".to_string(), moves_csv())])),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let mut chaos = Chaos {
        logs: vec![env.operator.log.clone()],
        env,
        started: Instant::now(),
        started_wall: std::time::SystemTime::now(),
        seed,
        events: Vec::new(),
        kills: 0,
        last_progress: 0,
        seen_in_flight: InFlight::default(),
        failures: Vec::new(),
        reset_batch: None,
    };
    chaos.settle().await;

    // The long runs first; the others join while the kills go on, so that kills land in every
    // kind; the outages and the rolling upgrade in between.
    use Kind::*;
    use Step::*;
    let plan = [
        Apply(Resets),
        Apply(Phones),
        Kill(Some(Resets)),
        Kill(Some(Phones)),
        DatabaseOutage,
        Kill(Some(Resets)),
        Kill(Some(Phones)),
        Apply(Reorg),
        Kill(Some(Reorg)),
        Kill(Some(Resets)),
        Kill(Some(Reorg)),
        Kill(Some(Phones)),
        Sigterm,
        Apply(Moves),
        Kill(Some(Moves)),
        Kill(Some(Moves)),
        Kill(Some(Reorg)),
        Kill(Some(Resets)),
        ApiServerOutage,
        Kill(Some(Phones)),
        Kill(Some(Resets)),
        Kill(Some(Reorg)),
        Kill(Some(Phones)),
        Kill(None),
        Kill(None),
        Kill(None),
        Kill(None),
    ];
    assert_eq!(plan.iter().filter(|s| matches!(s, Kill(_))).count(), KILLS);
    for step in plan {
        match step {
            Apply(kind) => chaos.apply(kind).await,
            Kill(aim) => chaos.kill(aim).await,
            DatabaseOutage => chaos.database_outage().await,
            ApiServerOutage => chaos.api_server_outage().await,
            Sigterm => chaos.sigterm().await,
        }
    }
    let chaos_took = chaos.elapsed();
    let mut failures = std::mem::take(&mut chaos.failures);

    // Every disruption landed in the middle of a run, and the operator went on after it: the
    // next disruption waited for progress, and after the last one every run finishes.
    let mut finished_at = BTreeMap::<&str, f64>::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    let finished = loop {
        let runs = chaos.runs().await;
        for (k, r) in &runs {
            if r.finished() {
                finished_at
                    .entry(k.name())
                    .or_insert(chaos.elapsed().as_secs_f64());
            }
        }
        if runs.values().all(Run::finished) {
            break runs;
        }
        assert!(
            Instant::now() < deadline,
            "chaos: the runs did not finish within 4 minutes after the chaos: [{}]",
            show(&runs)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("chaos: disruptions:");
    for e in &chaos.events {
        eprintln!("  {e}");
    }
    let missed: Vec<String> = chaos
        .events
        .iter()
        .filter(|e| e.interrupted().is_empty())
        .map(|e| e.to_string())
        .collect();
    if !missed.is_empty() {
        failures.push(format!(
            "every disruption must land in the middle of a run (Running with batches left, before and after): {missed:#?}"
        ));
    }
    let made = chaos.events.iter().filter(|e| e.is_kill()).count();
    let survived = chaos
        .events
        .iter()
        .filter(|e| e.is_kill() && !e.interrupted().is_empty())
        .count();
    let mut by_kind = BTreeMap::<&str, usize>::new();
    for e in chaos.events.iter().filter(|e| e.is_kill()) {
        for k in e.interrupted() {
            *by_kind.entry(k.name()).or_default() += 1;
        }
    }
    eprintln!(
        "chaos: runs finished {:.1}s after the first apply ({:.1}s of chaos): {}",
        chaos.elapsed().as_secs_f64(),
        chaos_took.as_secs_f64(),
        show(&finished)
    );
    eprintln!(
        "chaos: runs seen finished at (s after the first apply; the chaos ended at {:.1}): {finished_at:?}",
        chaos_took.as_secs_f64()
    );
    eprintln!("chaos: kills survived {survived} / kills made {made}");
    eprintln!("chaos: runs interrupted by the kills: {by_kind:?}");
    for e in chaos.events.iter().filter(|e| !e.is_kill()) {
        eprintln!(
            "chaos: outage: {} at {:.1}s, {}",
            e.what,
            e.at.as_secs_f64(),
            if e.interrupted().is_empty() {
                "missed every run".to_string()
            } else {
                format!("mid-run of {:?}", e.interrupted())
            }
        );
    }
    if made != KILLS || survived != KILLS {
        failures.push(format!(
            "kills survived {survived} / kills made {made} of {KILLS} planned"
        ));
    }

    let env = &chaos.env;
    let (mail_left_by, notify_left_by) = left_by(&chaos.events);

    // ---- resets: every target once, the fields and resets on the PBX ----
    let resets = outcomes(env, Resets);
    let targets = extensions(RESET_FIRST..RESET_FIRST + RESET_USERS);
    failures.extend(once_each(
        "resets",
        &resets.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        &targets,
    ));
    let resets_uncertain: BTreeSet<String> = resets
        .iter()
        .filter(|r| r.1 == "Uncertain")
        .map(|r| r.0.clone())
        .collect();
    for (t, o, notes) in &resets {
        if o != "Changed" && o != "Uncertain" {
            failures.push(format!("resets: {t} is {o}: {notes}"));
        }
    }
    let bucs: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    let s = bucs.get("resets").await.unwrap().status.unwrap();
    let m = s.summary.clone().unwrap_or_default();
    let want_phase = if resets_uncertain.is_empty() {
        Phase::Succeeded
    } else {
        Phase::PartiallyFailed
    };
    if (
        s.phase,
        m.targets,
        m.changed,
        m.uncertain,
        m.failed,
        m.conflicts,
    ) != (
        want_phase,
        RESET_USERS,
        RESET_USERS - resets_uncertain.len() as u32,
        resets_uncertain.len() as u32,
        0,
        0,
    ) {
        failures.push(format!(
            "resets: status {:?} {m:?} does not match its results ({} Uncertain)",
            s.phase,
            resets_uncertain.len()
        ));
    }
    for (what, condition) in [
        (
            "callGroup 9",
            "EXISTS (SELECT 1 FROM usr_preferences p WHERE p.username = subscriber.username AND attribute = 'pbx.call_group' AND value = '9')",
        ),
        (
            "pickupGroup 9",
            "EXISTS (SELECT 1 FROM usr_preferences p WHERE p.username = subscriber.username AND attribute = 'pbx.pickup_group' AND value = '9')",
        ),
        (
            "status PasswordRequired",
            "EXISTS (SELECT 1 FROM usr_preferences p WHERE p.username = subscriber.username AND attribute = 'pbx.status' AND value = 'PasswordRequired')",
        ),
        ("a reset password", &rotated(&password)),
    ] {
        let have = users_with(
            env,
            &format!(
                "{} AND {condition}",
                range_sql(RESET_FIRST..RESET_FIRST + RESET_USERS)
            ),
        )
        .await;
        let lacking: Vec<&String> = targets.difference(&have).collect();
        if !lacking.is_empty() {
            failures.push(format!(
                "resets: {} users lack {what} on the PBX: {:?}",
                lacking.len(),
                &lacking[..lacking.len().min(20)]
            ));
        }
    }

    // ---- moves: every row once and OK, every number moved once ----
    let (header, rows) = results(env, Moves);
    let ok = header
        .iter()
        .position(|h| h == "Change OK")
        .expect("Change OK");
    let notes = header.iter().position(|h| h == "Notes").expect("Notes");
    failures.extend(once_each(
        "moves",
        &rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>(),
        &extensions(CSV_FIRST..CSV_FIRST + CSV_ROWS),
    ));
    for r in rows.iter().filter(|r| r[ok] != "true") {
        failures.push(format!("moves: row {} not OK: {}", r[0], r[notes]));
    }
    let s = bucs.get("moves").await.unwrap().status.unwrap();
    let m = s.summary.clone().unwrap_or_default();
    if (s.phase, m.targets, m.changed + m.unchanged) != (Phase::Succeeded, CSV_ROWS, CSV_ROWS) {
        failures.push(format!("moves: status {:?} {m:?}", s.phase));
    }
    let anonymous = users_with(
        env,
        &format!(
            "{} AND EXISTS (SELECT 1 FROM usr_preferences p WHERE p.username = subscriber.username AND attribute = 'pbx.caller_id_policy' AND value = 'Anonymous')",
            range_sql(CSV_FIRST..CSV_FIRST + CSV_ROWS)
        ),
    )
    .await;
    if anonymous.len() != CSV_ROWS as usize {
        failures.push(format!(
            "moves: {} of {CSV_ROWS} users have caller ID Anonymous",
            anonymous.len()
        ));
    }
    let mut numbers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut holders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in sqlx::query("SELECT username, alias_username FROM dbaliases ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap()
    {
        let (user, number) = (r.get::<String, _>(0), r.get::<String, _>(1));
        numbers
            .entry(user.clone())
            .or_default()
            .push(number.clone());
        holders.entry(number).or_default().push(user);
    }
    let doubled: Vec<_> = holders.iter().filter(|(_, h)| h.len() > 1).collect();
    if !doubled.is_empty() {
        failures.push(format!("numbers with two holders: {doubled:?}"));
    }
    let wrong: Vec<String> = (CSV_FIRST..CSV_FIRST + CSV_ROWS)
        .filter_map(|e| {
            let have = numbers.get(&e.to_string()).cloned().unwrap_or_default();
            let want = planned_numbers(e);
            (have != want).then(|| format!("{e}: {have:?}, planned {want:?}"))
        })
        .collect();
    if !wrong.is_empty() {
        failures.push(format!(
            "moves: {} users do not hold the planned numbers: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(20)]
        ));
    }

    // ---- reorg: every target once, the new people in place, the others reset ----
    let reorg = outcomes(env, Reorg);
    failures.extend(once_each(
        "reorg",
        &reorg.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        &extensions(URC_FIRST..URC_FIRST + URC_USERS),
    ));
    let reorg_uncertain: BTreeSet<String> = reorg
        .iter()
        .filter(|r| r.1 == "Uncertain")
        .map(|r| r.0.clone())
        .collect();
    for (t, o, notes) in &reorg {
        let fine =
            o == "Changed" || (o == "Uncertain" && notes.contains("welcome email: not re-sent"));
        if !fine {
            failures.push(format!("reorg: {t} is {o}: {notes}"));
        }
    }
    let urcs: Api<UserRecycle> = Api::namespaced(env.client.clone(), &env.ns);
    let s = urcs.get("reorg").await.unwrap().status.unwrap();
    let m = s.summary.clone().unwrap_or_default();
    let want_phase = if reorg_uncertain.is_empty() {
        Phase::Succeeded
    } else {
        Phase::PartiallyFailed
    };
    if (s.phase, m.targets, m.changed, m.uncertain, m.failed)
        != (
            want_phase,
            URC_USERS,
            URC_USERS - reorg_uncertain.len() as u32,
            reorg_uncertain.len() as u32,
            0,
        )
    {
        failures.push(format!(
            "reorg: status {:?} {m:?} does not match its results ({} Uncertain)",
            s.phase,
            reorg_uncertain.len()
        ));
    }
    let first = attribute_map(env, "pbx.first_name").await;
    let last = attribute_map(env, "pbx.last_name").await;
    let email = attribute_map(env, "pbx.email").await;
    let status = attribute_map(env, "pbx.status").await;
    let reset_now = users_with(env, &rotated(&password)).await;
    for e in URC_FIRST..URC_FIRST + URC_USERS {
        let ext = e.to_string();
        let got = (
            first.get(&ext).cloned(),
            last.get(&ext).cloned(),
            email.get(&ext).cloned(),
            status.get(&ext).cloned(),
        );
        let want = if e >= URC_RECYCLED_FROM {
            (
                Some(format!("New{e}")),
                Some(format!("Hire{e}")),
                Some(format!("new{e}@acme.test")),
                Some("PasswordRequired".to_string()),
            )
        } else {
            (None, None, None, Some("SetupRequired".to_string()))
        };
        if got != want {
            failures.push(format!("reorg: {ext} is {got:?}, planned {want:?}"));
        }
        if !reset_now.contains(&ext) {
            failures.push(format!("reorg: {ext}'s password was not rotated"));
        }
    }

    // ---- phones: every phone once, at most one NOTIFY each, each outcome recorded ----
    let phones = outcomes(env, Phones);
    let phone_exts: Vec<String> = phones
        .iter()
        .map(|p| p.0.split('/').next().unwrap_or("").to_string())
        .collect();
    failures.extend(once_each(
        "phones",
        &phone_exts,
        &extensions(PHONE_FIRST..PHONE_FIRST + PHONES),
    ));
    let counts = env.lab.notify_counts();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    if !twice.is_empty() {
        failures.push(format!("phones NOTIFYed more than once: {twice:?}"));
    }
    let prss: Api<PhoneRestart> = Api::namespaced(env.client.clone(), &env.ns);
    let m = prss
        .get("phones")
        .await
        .unwrap()
        .status
        .unwrap()
        .summary
        .unwrap_or_default();
    let mut by_outcome = BTreeMap::<String, u32>::new();
    // What became of the phones whose NOTIFY a disruption left under way, by disruption.
    let mut left_outcomes = BTreeMap::<String, BTreeMap<String, u32>>::new();
    let mut unsent_at_sigterm = Vec::new();
    for ((target, outcome, notes), ext) in phones.iter().zip(&phone_exts) {
        *by_outcome.entry(outcome.clone()).or_default() += 1;
        let n = counts.get(ext).copied().unwrap_or(0);
        let left = notify_left_by.get(ext);
        if let Some(event) = left {
            *left_outcomes
                .entry(event.clone())
                .or_default()
                .entry(format!("{outcome}, {n} NOTIFY"))
                .or_default() += 1;
        }
        if n == 0 && left.is_some_and(|e| e.starts_with("SIGTERM")) {
            unsent_at_sigterm.push(format!("{target} ({outcome}: {notes})"));
        }
        match outcome.as_str() {
            "Restarted" | "Accepted" | "Failed" if n == 1 => {}
            // Only a NOTIFY recorded as under way when the operator stopped, and not confirmed
            // by a fresh REGISTER after, may end so: Uncertain, and "not sent again".
            "Uncertain" if n <= 1 => {
                if left.is_none() || !notes.contains(NOT_SENT_AGAIN) {
                    failures.push(format!(
                        "phones: {target} is Uncertain ({n} NOTIFY), but no disruption left its NOTIFY under way ({left:?}) or the note does not say so: {notes}"
                    ));
                }
            }
            _ => failures.push(format!(
                "phones: {target} is {outcome} with {n} NOTIFYs: {notes}"
            )),
        }
    }
    if !unsent_at_sigterm.is_empty() {
        failures.push(format!(
            "OPERATOR DEFECT (graceful stop): the SIGTERM left {} phones' NOTIFYs recorded as under way but unsent; they never got one: {unsent_at_sigterm:#?}",
            unsent_at_sigterm.len()
        ));
    }
    let get = |o: &str| by_outcome.get(o).copied().unwrap_or(0);
    if (m.targets, m.restarted, m.accepted, m.failed, m.uncertain)
        != (
            PHONES,
            get("Restarted"),
            get("Accepted"),
            get("Failed"),
            get("Uncertain"),
        )
        || m.restarted + m.accepted + m.failed + m.uncertain != PHONES
    {
        failures.push(format!(
            "phones: status summary {m:?} does not match the results {by_outcome:?}"
        ));
    }
    eprintln!("chaos: phones: {by_outcome:?}");
    for (event, outcomes) in &left_outcomes {
        eprintln!("chaos: phones whose NOTIFY {event} left under way ended: {outcomes:?}");
    }

    // ---- mail: nothing twice, every mail confirmed or its target Uncertain ----
    let smtp = env.smtp.as_ref().unwrap();
    let mails = smtp.recipients();
    // Whose address each is: reset mails to the seeded users, welcome mails to the new people.
    let mut owner: BTreeMap<String, (Kind, String)> = BTreeMap::new();
    for e in RESET_FIRST..RESET_FIRST + RESET_USERS {
        let ext = e.to_string();
        owner.insert(seeded_email[&ext].to_lowercase(), (Resets, ext));
    }
    for e in URC_RECYCLED_FROM..URC_FIRST + URC_USERS {
        owner.insert(format!("new{e}@acme.test"), (Reorg, e.to_string()));
    }
    let unexpected: Vec<_> = mails.keys().filter(|a| !owner.contains_key(*a)).collect();
    if !unexpected.is_empty() {
        failures.push(format!("mail to addresses no run mails: {unexpected:?}"));
    }
    let twice: Vec<_> = mails.iter().filter(|(_, n)| **n > 1).collect();
    if !twice.is_empty() {
        failures.push(format!(
            "addresses mailed twice (before any retry): {twice:?}"
        ));
    }
    let uncertain_of = |kind: Kind| match kind {
        Resets => &resets_uncertain,
        _ => &reorg_uncertain,
    };
    for (address, (kind, ext)) in &owner {
        let n = mails.get(address).copied().unwrap_or(0);
        if !uncertain_of(*kind).contains(ext) && n != 1 {
            failures.push(format!(
                "{}: {ext} ({address}) is reported done but was mailed {n} times",
                kind.name()
            ));
        }
    }
    // Uncertain is what a disruption left under way, no more, no less.
    for kind in [Resets, Reorg] {
        let left: BTreeSet<String> = chaos.seen_in_flight.mails_of(kind);
        let unexplained: Vec<&String> = uncertain_of(kind).difference(&left).collect();
        if !unexplained.is_empty() {
            failures.push(format!(
                "{}: Uncertain though no disruption left its mail under way: {unexplained:?}",
                kind.name()
            ));
        }
        let lost: Vec<&String> = left
            .iter()
            .filter(|t| !uncertain_of(kind).contains(*t))
            .filter(|t| {
                let address = owner
                    .iter()
                    .find(|(_, (k, x))| *k == kind && x == *t)
                    .map(|(a, _)| a.clone())
                    .unwrap_or_default();
                mails.get(&address).copied().unwrap_or(0) == 0
            })
            .collect();
        if !lost.is_empty() {
            failures.push(format!(
                "{}: a mail left under way neither arrived nor is its target Uncertain: {lost:?}",
                kind.name()
            ));
        }
    }
    // Per disruption: the mails it left under way, and how many of them had in fact gone out.
    for e in &chaos.events {
        let mut parts = Vec::new();
        for kind in [Resets, Reorg] {
            let left = e.left.mails_of(kind);
            if left.is_empty() {
                continue;
            }
            let delivered = left
                .iter()
                .filter(|t| {
                    owner.iter().any(|(a, (k, x))| {
                        *k == kind && x == *t && mails.get(a).is_some_and(|n| *n > 0)
                    })
                })
                .count();
            parts.push(format!(
                "{} {} mails ({delivered} had gone out)",
                left.len(),
                kind.name()
            ));
        }
        if !parts.is_empty() {
            eprintln!("chaos: {} left under way: {}", e.what, parts.join(", "));
        }
    }
    eprintln!(
        "chaos: before the retry: {} addresses mailed; Uncertain: resets {}, reorg {}",
        mails.len(),
        resets_uncertain.len(),
        reorg_uncertain.len()
    );

    // ---- the retry annotation: exactly the uncertain targets get their mail ----
    let ha1_before = ha1s(env).await;
    let patch = serde_json::json!({"metadata": {"annotations": {"pbx-operator.io/retry": "1"}}});
    let pp = PatchParams::default();
    if !resets_uncertain.is_empty() {
        bucs.patch("resets", &pp, &Patch::Merge(&patch))
            .await
            .unwrap();
    }
    if !reorg_uncertain.is_empty() {
        urcs.patch("reorg", &pp, &Patch::Merge(&patch))
            .await
            .unwrap();
    }
    let retried = support::eventually(Duration::from_secs(90), "the retries to finish", || async {
        let runs = chaos.runs().await;
        let done = |k: Kind| {
            uncertain_of(k).is_empty() || (runs[&k].run.contains("retry") && runs[&k].finished())
        };
        (done(Resets) && done(Reorg)).then_some(runs)
    })
    .await;
    for kind in [Resets, Reorg] {
        if !uncertain_of(kind).is_empty() && retried[&kind].phase != Some(Phase::Succeeded) {
            failures.push(format!(
                "{}: the retry ended {}",
                kind.name(),
                retried[&kind]
            ));
        }
    }
    // A retry's mails arrive before its run is recorded finished.
    let after = smtp.recipients();
    let mut got = Vec::new();
    for (address, (kind, ext)) in &owner {
        let delta =
            after.get(address).copied().unwrap_or(0) - mails.get(address).copied().unwrap_or(0);
        let wanted = u32::from(uncertain_of(*kind).contains(ext));
        if delta != wanted {
            got.push(format!(
                "{}:{ext} ({address}) got {delta} mails from the retry, wanted {wanted}",
                kind.name()
            ));
        }
    }
    if !got.is_empty() {
        failures.push(format!(
            "the retry mails exactly the uncertain targets: {got:?}"
        ));
    }
    if ha1s(env).await != ha1_before {
        failures.push("the retry reset a password again".into());
    }
    for log in &chaos.logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("panicked") {
            failures.push(format!("the operator panicked, see {}", log.display()));
        }
    }
    // Every address mailed at least once, and more than once only where the run said it could
    // not know: a mail reported Uncertain may have gone out before the disruption, and the
    // retry, which completes exactly the uncertain ones, sends it again. SMTP gives no way to
    // ask whether a message was delivered, so that is the promise: confirmed once, or reported.
    let received = smtp.received();
    let mut resent = 0;
    let wrong: Vec<String> = owner
        .iter()
        .filter(|(a, (k, t))| {
            let n = after.get(*a).copied().unwrap_or(0);
            let uncertain = uncertain_of(*k).contains(t);
            if uncertain && n == 2 {
                resent += 1;
            }
            !(n == 1 || (uncertain && n == 2))
        })
        .map(|(a, (k, t))| {
            let times: Vec<String> = received
                .iter()
                .filter(|(_, to)| to == a)
                .map(|(at, _)| format!("{:.2}s", chaos.offset(*at)))
                .collect();
            let by = mail_left_by.get(&(*k, t.clone()));
            format!(
                "{}:{t} <{a}> mailed at {times:?}; left under way by {by:?}",
                k.name()
            )
        })
        .collect();
    eprintln!(
        "chaos: {resent} of {} addresses were reported uncertain, had been mailed, and were mailed again by the retry",
        owner.len()
    );
    if !wrong.is_empty() {
        failures.push(format!(
            "every address is mailed once, or twice only when the run reported it uncertain: {} are not: {wrong:#?}",
            wrong.len()
        ));
    }
    eprintln!(
        "chaos: {:.0}s in all; operator logs (one per process, in order): {:?}; lab {} and mail {} (kept when the test fails)",
        t0.elapsed().as_secs_f64(),
        chaos.logs,
        env.lab.dir.display(),
        smtp.maildir.display()
    );
    assert!(
        failures.is_empty(),
        "chaos: {} properties broke:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let _ = std::fs::remove_dir_all(&smtp.maildir);
}

/// Every user's HA1, to tell whether a retry reset anyone again.
async fn ha1s(env: &Env) -> BTreeMap<String, String> {
    sqlx::query("SELECT username, ha1 FROM subscriber")
        .fetch_all(&env.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
        .collect()
}
