//! Running it like a well-run operator: metrics and health endpoints, and leader election
//! between two replicas where the leader dies mid-change.

mod support;

use std::time::Duration;

use kube::Api;
use pbx_operator::api::{BulkUserChange, Phase};
use support::lab::LabSpec;
use support::pbx::Env;
use support::{Operator, control_plane, eventually};

const CHANGE: &str = r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: everyone }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  fields:
    callGroup: { value: "9", lock: Open }
    enterpriseVoice: { value: true, lock: Open }
"#;

#[tokio::test]
async fn metrics_and_health_are_served() {
    let env = Env::start(
        "metrics",
        LabSpec {
            users: 20,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    env.apply(CHANGE);
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(Duration::from_secs(60), "the change to succeed", || async {
        (api.get("everyone").await.ok()?.status?.phase == Phase::Succeeded).then_some(())
    })
    .await;
    assert_eq!(env.operator.http_get("/healthz").0, 200);
    assert_eq!(env.operator.http_get("/readyz").0, 200);
    let (code, body) = env.operator.http_get("/metrics");
    assert_eq!(code, 200);
    for want in [
        r#"pbx_operator_reconciles_total{kind="BulkUserChange"}"#,
        r#"pbx_operator_reconciles_total{kind="PbxConnection"}"#,
        r#"pbx_operator_reconcile_duration_seconds_count{kind="BulkUserChange"}"#,
        r#"pbx_operator_targets_total{kind="BulkUserChange",outcome="Changed"} 20"#,
        r#"pbx_operator_pbx_call_duration_seconds_count{backend="kamailio",call="read_users",connection="#,
        "pbx_operator_leader 1",
    ] {
        assert!(body.contains(want), "metrics lack {want}:\n{body}");
    }
}

#[tokio::test]
async fn the_standby_takes_over_when_the_leader_dies_mid_change() {
    const USERS: usize = 4000;
    let cp = control_plane();
    // Replica A runs with leader election from the start; B joins as a standby.
    let mut env = Env::start_with(
        "leader",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        false,
        &["--leader-election"],
    )
    .await;
    let ns = env.ns.clone();
    let standby = Operator::start_with_env(
        &cp.admin_kubeconfig,
        &["--namespace", &ns, "--leader-election"],
        &[("POD_NAME", "replica-b")],
    );
    eventually(
        Duration::from_secs(20),
        "the standby to be up and not leading",
        || async {
            let (code, body) = standby.http_get("/metrics");
            (code == 200 && body.contains("pbx_operator_leader 0")).then_some(())
        },
    )
    .await;

    env.apply(CHANGE);
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &ns);
    eventually(
        Duration::from_secs(60),
        "the leader to start executing",
        || async {
            let s = api.get("everyone").await.ok()?.status?;
            (s.phase == Phase::Running).then_some(())
        },
    )
    .await;
    // The leader dies without releasing the Lease; the standby waits for it to expire.
    let _ = env.operator.child.kill();
    let _ = env.operator.child.wait();
    let b = eventually(
        Duration::from_secs(120),
        "the standby to finish the change",
        || async {
            let b = api.get("everyone").await.ok()?;
            matches!(
                b.status.as_ref()?.phase,
                Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed
            )
            .then_some(b)
        },
    )
    .await;
    let (_, body) = standby.http_get("/metrics");
    assert!(
        body.contains("pbx_operator_leader 1"),
        "the standby leads now"
    );
    let s = b.status.unwrap();
    assert_eq!(s.phase, Phase::Succeeded);
    let summary = s.summary.unwrap();
    assert_eq!(
        (
            summary.targets as usize,
            summary.changed as usize,
            summary.failed
        ),
        (USERS, USERS, 0)
    );
    let (ok, csv, err) = env.cli(&["results", "bulkuserchange/everyone", "-n", &ns]);
    assert!(ok, "{err}");
    assert_eq!(csv.lines().count() - 1, USERS, "each target reported once");
    let n = env.sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '9'").await;
    assert_eq!(n, USERS.to_string());
    assert!(
        standby.log_text().contains("became leader"),
        "{}",
        standby.log_text()
    );
}
