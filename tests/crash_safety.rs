//! Nothing is done twice and nothing is lost: the operator SIGKILLed mid-change, and the
//! database stopped mid-run, against a real control plane and a real Kamailio on PostgreSQL.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kube::Api;
use pbx_operator::api::{BulkUserChange, Phase};
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
    const USERS: usize = 5000;
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
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    env.apply(CHANGE);
    let started = Instant::now();
    // Kill at pseudo-random moments while the change runs; print them so a failure can be replayed.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut kills = Vec::new();
    for round in 0..3 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let jitter = Duration::from_millis((seed >> 33) % 400);
        // The first kill may land while planning; the others while batches are being written.
        if round > 0 {
            eventually(
                Duration::from_secs(60),
                "the change to be executing",
                || async {
                    let s = api.get("everyone").await.ok()?.status?;
                    (s.phase == Phase::Running || s.phase == Phase::Succeeded).then_some(())
                },
            )
            .await;
        }
        tokio::time::sleep(jitter).await;
        let status = api
            .get("everyone")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        if matches!(
            status.phase,
            Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed
        ) {
            break;
        }
        let done = status
            .progress
            .map(|p| format!("{}/{}", p.done, p.batches))
            .unwrap_or_else(|| "planning".into());
        kills.push(format!("{:?} (batches {done})", started.elapsed()));
        env.kill_and_restart_operator();
    }
    eprintln!("SIGKILLed the operator at {kills:?}");
    let b = finished(&env, Duration::from_secs(180)).await;
    eprintln!(
        "finished {USERS} users x 3 fields in {:?} with {} kills",
        started.elapsed(),
        kills.len()
    );
    check_complete(&env, &b, USERS).await;
}

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
    env.lab.database(false);
    env.apply(CHANGE);
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    let message = eventually(
        Duration::from_secs(60),
        "Reconciling with a message while the database is down",
        || async {
            let b = api.get("everyone").await.ok()?;
            let c = b
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Reconciling" && c.status == "True")?;
            Some(c.message)
        },
    )
    .await;
    assert!(
        message.contains("database") && message.contains("retry"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.lab.database(true);
    let b = finished(&env, Duration::from_secs(180)).await;
    check_complete(&env, &b, USERS).await;
}
