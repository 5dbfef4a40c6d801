//! Nothing is done twice and nothing is lost: the operator SIGKILLed mid-change, and the
//! database stopped mid-run, against a real control plane and a real Kamailio on PostgreSQL.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};
use pbx_operator::api::{BulkUserChange, OperationStatus, Phase};
use sqlx::AssertSqlSafe;
use support::eventually;
use support::lab::LabSpec;
use support::pbx::Env;

const CHANGE: &str = r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: everyone }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  fields:
    callGroup: { value: "9", lock: Open }
    pickupGroup: { value: "9", lock: Open }
    voiceRoutePolicy: { value: Restricted, lock: Open }
"#;

async fn finished(env: &Env, timeout: Duration) -> BulkUserChange {
    env.wait_buc_for(
        "everyone",
        &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed],
        timeout,
    )
    .await
}

/// Every user once in the results, every user changed, and the PBX in the desired state.
async fn check_complete(env: &Env, b: &BulkUserChange, users: usize) {
    let status = b.status.clone().unwrap();
    assert_eq!(
        status.phase,
        Phase::Succeeded,
        "{:?}",
        status.results.first()
    );
    let s = status.summary.unwrap();
    assert_eq!(
        (
            s.targets as usize,
            s.changed as usize,
            s.failed,
            s.conflicts
        ),
        (users, users, 0, 0)
    );
    let (ok, csv, err) = env.cli(&["results", "bulkuserchange/everyone", "-n", &env.ns]);
    assert!(ok, "{err}");
    let targets: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    let unique: BTreeSet<&str> = targets.iter().copied().collect();
    assert_eq!(
        targets.len(),
        users,
        "every target is reported exactly once"
    );
    assert_eq!(unique.len(), users);
    assert!(
        csv.lines().skip(1).all(|l| l.contains(",Changed,")),
        "{}",
        csv.lines().find(|l| !l.contains(",Changed,")).unwrap_or("")
    );
    for (attribute, value) in [
        ("pbx.call_group", "9"),
        ("pbx.pickup_group", "9"),
        ("pbx.voice_route_policy", "Restricted"),
    ] {
        let n = env.sql_one(&format!("SELECT COUNT(*) FROM usr_preferences WHERE attribute = '{attribute}' AND value = '{value}'")).await;
        assert_eq!(n, users.to_string(), "{attribute} in SQL");
    }
}

#[tokio::test]
async fn sigkill_mid_change_resumes_and_reports_each_target_once() {
    // 12 batches of 1000 users: the three kills land after 0, 1 and 2 more recorded batches at
    // the earliest. A batch takes a few hundred milliseconds now: with 6 batches the first
    // kill could land at the third and the run end before the last kill.
    const USERS: usize = 12_000;
    const KILLS: usize = 3;
    let mut env = Env::start(
        "crash",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    env.apply(CHANGE);
    let started = Instant::now();
    env.kill_mid_run_every_time("everyone", KILLS, Duration::from_millis(700), CALL_GROUP_9)
        .await;
    let b = finished(&env, Duration::from_secs(300)).await;
    eprintln!(
        "finished {USERS} users x 3 fields in {:?} with {KILLS} kills mid-run",
        started.elapsed()
    );
    check_complete(&env, &b, USERS).await;
}

const CALL_GROUP_9: &str =
    "SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '9'";

#[tokio::test]
async fn database_outage_mid_run_waits_and_completes() {
    const USERS: usize = 3000;
    let env = Env::start(
        "outage",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    // A row lock on one user of the last of three batches (1000 users each, in extension order):
    // the operator commits the batches before it, then waits on that user inside its write, so
    // the outage lands with part of the run written and a batch open, on a fast machine or a
    // slow one.
    let held = 200 + USERS * 2 / 3 + 10;
    let mut lock = env.pool.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "SELECT id FROM usr_preferences WHERE username = '{held}' FOR UPDATE"
    )))
    .fetch_all(&mut *lock)
    .await
    .unwrap();
    env.apply(CHANGE);
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(
        Duration::from_secs(120),
        "some rows written and the operator's write waiting inside a batch",
        || async {
            let written: usize = env.sql_one(CALL_GROUP_9).await.parse().unwrap();
            let waiting: usize = env
                .sql_one("SELECT COUNT(*) FROM pg_locks WHERE NOT granted")
                .await
                .parse()
                .unwrap();
            (written > 0 && waiting > 0).then_some(())
        },
    )
    .await;
    // Nothing can commit past the lock: what is counted now is what is written when the
    // database stops.
    let written: usize = env.sql_one(CALL_GROUP_9).await.parse().unwrap();
    let progress = api
        .get("everyone")
        .await
        .unwrap()
        .status
        .and_then(|s| s.progress)
        .expect("a run in progress");
    eprintln!(
        "database stopped with {written} of {USERS} users written, batches {}/{}",
        progress.done, progress.batches
    );
    assert!(
        0 < written && written < USERS,
        "the outage must come mid-run: {written} of {USERS} written"
    );
    assert!(progress.done < progress.batches, "{progress:?}");
    env.lab.database(false);
    drop(lock);
    let (message, done) = eventually(
        Duration::from_secs(60),
        "Reconciling naming the database while it is down",
        || async {
            let s = api.get("everyone").await.ok()?.status?;
            let c = s.conditions.iter().find(|c| {
                c.type_ == "Reconciling" && c.status == "True" && c.message.contains("database")
            })?;
            Some((c.message.clone(), s.progress.as_ref()?.done))
        },
    )
    .await;
    eprintln!("while the database is down: {message}");
    assert!(message.contains("retry"), "{message}");
    assert!(
        done < progress.batches,
        "the run is not finished while the database is down: {done}/{}",
        progress.batches
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.lab.database(true);
    let b = finished(&env, Duration::from_secs(180)).await;
    check_complete(&env, &b, USERS).await;
}

/// A retry overwrites the earlier run's result ConfigMaps with its own plan before status says
/// the retry runs: SIGKILLed in between, the restarted operator finds the first ConfigMaps
/// holding the retry's plan, not the rows status vouches for, and must still finish the retry.
#[tokio::test]
async fn sigkill_while_a_retry_stores_its_plan_finishes_the_retry() {
    const USERS: usize = 1500;
    // Ten targets a batch: storing the retry's 150 batches takes long enough to land a kill in.
    let mut env = Env::start_with(
        "retry-kill",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        false,
        &["--batch-size", "10"],
    )
    .await;
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    partially_failed(&env, USERS).await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let first = cms.get("everyone-results-1").await.unwrap();

    ask_retry(&env).await;
    eventually(
        Duration::from_secs(60),
        "the retry to store its first batch",
        || async {
            let cm = cms.get("everyone-results-1").await.ok()?;
            (cm.metadata.resource_version != first.metadata.resource_version).then_some(())
        },
    )
    .await;
    env.kill_operator();
    let between = api.get("everyone").await.unwrap().status.unwrap();
    assert_eq!(
        between.progress.as_ref().and_then(|p| p.retry.clone()),
        None,
        "the kill landed after the retry's plan was recorded in status"
    );
    assert_ne!(
        support::results_rows(&cms.get("everyone-results-1").await.unwrap()),
        support::results_rows(&first),
        "the kill landed before the retry overwrote the earlier results"
    );

    env.start_operator();
    let b = retried(&env).await;
    let summary = b.summary.unwrap();
    assert_eq!(
        (
            summary.targets as usize,
            summary.changed as usize,
            summary.conflicts
        ),
        (USERS, USERS, 0)
    );
    let changed = env
        .sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '9'")
        .await;
    assert_eq!(changed, USERS.to_string());
    let events = env.events();
    assert!(
        events.contains("ResultsFromLedger") && events.contains("everyone-results-1"),
        "an Event says which batches were read from the ledger:\n{events}"
    );
}

/// Change `everyone` validated, then every 50th user (the first one too) edited in the console
/// before it executes: it ends PartiallyFailed with those users in Conflict.
async fn partially_failed(env: &Env, users: usize) -> OperationStatus {
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    env.apply(&CHANGE.replace("spec:\n", "spec:\n  mode: Validate\n"));
    env.wait_buc("everyone", &[Phase::Validated]).await;
    // Edited in the console between review and execution: every 50th user (the first one of
    // the first batch too) conflicts.
    sqlx::query(
        "UPDATE usr_preferences SET value = '5' WHERE attribute = 'pbx.call_group' AND CAST(username AS INTEGER) % 50 = 0",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let conflicted: usize = env
        .sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '5'")
        .await
        .parse()
        .unwrap();
    assert!(conflicted >= users / 50, "{conflicted} users edited");
    let execute = serde_json::json!({ "spec": { "mode": "Execute" } });
    api.patch("everyone", &PatchParams::default(), &Patch::Merge(&execute))
        .await
        .unwrap();
    let before = env
        .wait_buc("everyone", &[Phase::PartiallyFailed])
        .await
        .status
        .unwrap();
    assert_eq!(
        before.summary.as_ref().unwrap().conflicts as usize,
        conflicted
    );
    before
}

/// Retried in smaller batches than the run it builds on, a retry writes each ConfigMap only
/// once it has read the earlier batch that ConfigMap held: it needs no copy from the ledger.
#[tokio::test]
async fn a_retry_in_smaller_batches_reads_each_earlier_batch_before_overwriting_it() {
    const USERS: usize = 1500;
    let mut env = Env::start(
        "retry-smaller",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let before = partially_failed(&env, USERS).await;
    assert_eq!(before.results_refs.len(), 2, "{:?}", before.results_refs);
    // Every ConfigMap is intact, so the ledger's copy of the run is not needed: gone.
    let removed = sqlx::query("DELETE FROM pbx_ledger_batch")
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(removed.rows_affected(), 2);
    env.kill_operator();
    env.operator = support::Operator::start(
        &support::control_plane().admin_kubeconfig,
        &["--namespace", &env.ns, "--batch-size", "10"],
    );
    ask_retry(&env).await;
    let s = retried(&env).await;
    assert_eq!(s.results_refs.len(), USERS / 10);
    let summary = s.summary.unwrap();
    assert_eq!(
        (
            summary.targets as usize,
            summary.changed as usize,
            summary.conflicts
        ),
        (USERS, USERS, 0)
    );
    let events = env.events();
    assert!(
        !events.contains("ResultsFromLedger"),
        "a ConfigMap was overwritten before its earlier batch was read:\n{events}"
    );
}

/// Sets the retry annotation on change `everyone`.
async fn ask_retry(env: &Env) {
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    let retry =
        serde_json::json!({ "metadata": { "annotations": { "pbx-operator.io/retry": "1" } } });
    api.patch("everyone", &PatchParams::default(), &Patch::Merge(&retry))
        .await
        .unwrap();
}

/// Waits for the retry of `everyone` to succeed; fails at once should it stall because the
/// earlier run could not be read.
async fn retried(env: &Env) -> OperationStatus {
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(Duration::from_secs(180), "the retry to finish", || async {
        let s = api.get("everyone").await.ok()?.status?;
        if let Some(stalled) = s.conditions.iter().find(|c| {
            c.type_ == "Stalled" && ["PlanTampered", "ResultsLost"].contains(&c.reason.as_str())
        }) {
            panic!("the retry stalled: {} {}", stalled.reason, stalled.message);
        }
        let retried = s.progress.as_ref()?.retry.as_deref() == Some("1");
        (retried && s.phase == Phase::Succeeded).then_some(s)
    })
    .await
}
