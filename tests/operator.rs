//! `pbx-operator run` against the real control plane: it starts a controller per kind,
//! acknowledges every generation in status, and stops promptly on SIGTERM and SIGINT.

mod support;

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use pbx_operator::api::{
    BulkPhoneChange, BulkUserChange, PbxConnection, PhoneRestart, UserRecycle,
};
use support::{control_plane, eventually, kubectl};

/// Waits until the resource's status acknowledges `generation`; returns its Ready condition's reason and message.
async fn acknowledged<K>(api: &Api<K>, name: &str, generation: i64) -> (String, String)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    eventually(
        Duration::from_secs(30),
        &format!("{name} to be acknowledged at generation {generation}"),
        || async {
            let obj = api.get(name).await.ok()?;
            let v = serde_json::to_value(&obj).ok()?;
            let status = v.get("status")?;
            if status.get("observedGeneration")?.as_i64()? != generation {
                return None;
            }
            let ready = status["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready")?
                .clone();
            Some((
                ready["reason"].as_str()?.to_string(),
                ready["message"].as_str()?.to_string(),
            ))
        },
    )
    .await
}

/// An operation on a connection whose database is unreachable waits, saying why: either its own
/// attempt failed (DatabaseUnreachable) or, once the connection's probe has said so, it waits for
/// the connection (ConnectionNotReady, quoting the connection's reason); which comes first is a
/// race between the two controllers.
fn waits_for_the_database(reason: &str, message: &str) {
    match reason {
        "DatabaseUnreachable" => {}
        "ConnectionNotReady" => assert!(
            message.contains("DatabaseUnreachable"),
            "quotes the connection's reason: {message}"
        ),
        other => panic!("waits for an unexpected reason {other}: {message}"),
    }
    assert!(
        message.contains("sqlite:/var/lib/kamailio/kamailio.db"),
        "names the database: {message}"
    );
}

#[tokio::test]
async fn run_acknowledges_every_kind_and_stops_on_sigterm() {
    let cp = control_plane();
    let client = support::admin().await;
    let ns = support::namespace(&client, "operator").await;
    let mut operator = support::Operator::start(&cp.admin_kubeconfig, &[]);

    let examples = support::repo_root().join("examples");
    for file in [
        "connection.yaml",
        "bulkuserchange-call-group.yaml",
        "bulkphonechange-model.yaml",
        "phonerestart-now.yaml",
        "userrecycle-leavers.yaml",
    ] {
        kubectl(
            &cp.admin_kubeconfig,
            &[
                "apply",
                "-n",
                &ns,
                "-f",
                examples.join(file).to_str().unwrap(),
            ],
        );
    }

    // The example connection points at a database that does not exist here.
    let connections = Api::<PbxConnection>::namespaced(client.clone(), &ns);
    let ready = eventually(
        Duration::from_secs(30),
        "the connection's Ready condition",
        || async {
            let c = connections.get("acme").await.ok()?;
            let status = c.status?;
            status.conditions.into_iter().find(|c| c.type_ == "Ready")
        },
    )
    .await;
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "DatabaseUnreachable", "{}", ready.message);
    assert!(
        ready
            .message
            .contains("sqlite:/var/lib/kamailio/kamailio.db"),
        "{}",
        ready.message
    );

    // A change against that connection waits for it, saying why, and touches nothing.
    let (reason, message) = acknowledged(
        &Api::<BulkUserChange>::namespaced(client.clone(), &ns),
        "call-group-201-202",
        1,
    )
    .await;
    waits_for_the_database(&reason, &message);
    // So does a UserRecycle: nothing is reset while the PBX cannot be reached.
    let (reason, message) = acknowledged(
        &Api::<UserRecycle>::namespaced(client.clone(), &ns),
        "leavers-2026-11",
        1,
    )
    .await;
    waits_for_the_database(&reason, &message);

    // Phone changes and restarts wait for it too, and send nothing.
    for (reason, message) in [
        acknowledged(
            &Api::<BulkPhoneChange>::namespaced(client.clone(), &ns),
            "sales-yealink-t54w",
            1,
        )
        .await,
        acknowledged(
            &Api::<PhoneRestart>::namespaced(client.clone(), &ns),
            "sales-restart-now",
            1,
        )
        .await,
    ] {
        waits_for_the_database(&reason, &message);
    }

    // A spec edit is a new generation, and the operator acknowledges it too.
    let changes: Api<BulkUserChange> = Api::namespaced(client.clone(), &ns);
    let edit = serde_json::json!({ "spec": { "fields": { "callGroup": { "value": "4", "lock": "Open" } } } });
    changes
        .patch(
            "call-group-201-202",
            &PatchParams::default(),
            &Patch::Merge(&edit),
        )
        .await
        .unwrap();
    acknowledged(&changes, "call-group-201-202", 2).await;

    let (status, took) = operator.stop_with("TERM", Duration::from_secs(10));
    assert!(
        status.success(),
        "operator exited with {status} after SIGTERM:\n{}",
        operator.log_text()
    );
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    assert!(
        operator.log_text().contains("SIGTERM received"),
        "{}",
        operator.log_text()
    );
}

#[tokio::test]
async fn run_stops_on_sigint() {
    let cp = control_plane();
    let mut operator = support::Operator::start(&cp.admin_kubeconfig, &[]);
    eventually(
        Duration::from_secs(30),
        "the controllers to start",
        || async {
            operator
                .log_text()
                .contains("controllers starting")
                .then_some(())
        },
    )
    .await;
    let (status, took) = operator.stop_with("INT", Duration::from_secs(10));
    assert!(
        status.success(),
        "operator exited with {status} after SIGINT:\n{}",
        operator.log_text()
    );
    assert!(took < Duration::from_secs(5), "SIGINT took {took:?}");
}

#[tokio::test]
async fn run_without_permission_fails_with_a_clear_message() {
    // alice may not list the CRDs' resources: the operator must say so, not loop on watch errors.
    let cp = control_plane();
    let mut operator = support::Operator::start(&cp.user_kubeconfig, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = operator.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the operator kept running:\n{}",
            operator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let log = operator.log_text();
    assert!(log.contains("pbx-operator crds | kubectl apply"), "{log}");
    assert!(
        log.contains("forbidden") || log.contains("Forbidden"),
        "{log}"
    );
}
