//! PbxConnection against a real control plane and a real Kamailio on PostgreSQL.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use pbx_operator::api::PbxConnection;
use support::eventually;
use support::lab::LabSpec;
use support::pbx::Env;

async fn ready(env: &Env, want: &str, reason: &str) -> PbxConnection {
    let api: Api<PbxConnection> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(
        Duration::from_secs(60),
        &format!("acme Ready={want} ({reason})"),
        || async {
            let c = api.get("acme").await.ok()?;
            let r = c
                .status
                .as_ref()?
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")?
                .clone();
            (r.status == want && r.reason == reason).then_some(c)
        },
    )
    .await
}

async fn set_secret(env: &Env, key: &str, value: &str) {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let patch = serde_json::json!({ "stringData": { key: value } });
    secrets
        .patch("acme-pbx", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test]
async fn probes_publish_counts_and_follow_secret_changes() {
    let env = Env::start(
        "pbxc",
        LabSpec {
            db: "postgres",
            users: 25,
            phones: 4,
            ..Default::default()
        },
        false,
    )
    .await;
    let c = ready(&env, "True", "Connected").await;
    let status = c.status.unwrap();
    assert_eq!(status.users, Some(25));
    assert_eq!(status.registered_phones, Some(4));
    assert!(
        status
            .backend_version
            .as_deref()
            .unwrap_or("")
            .contains("kamailio"),
        "{:?}",
        status.backend_version
    );
    let caps = status.capabilities.unwrap();
    assert!(caps.user_fields.iter().any(|f| f == "callGroup"));
    assert!(caps.actions.iter().any(|a| a == "ResetPassword"));
    assert!(caps.transactions);

    // A wrong database password in the Secret: picked up without restarting the operator,
    // and the message says what to fix without showing the password.
    let good_db = env.lab.db_url().to_string();
    let wrong = good_db.replacen("kamailio:", "kamailio:Wr0ngPass", 1);
    set_secret(&env, "database-url", &wrong).await;
    let c = ready(&env, "False", "DatabaseAuthFailed").await;
    let message = c
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
    assert!(message.contains("fix the user or password"), "{message}");
    assert!(
        !message.contains("Wr0ngPass"),
        "the password leaked: {message}"
    );
    let stalled = kube_condition(&env, "Stalled").await;
    assert_eq!(
        stalled.as_deref(),
        Some("True"),
        "a bad password needs a person: Stalled"
    );

    set_secret(&env, "database-url", &good_db).await;
    ready(&env, "True", "Connected").await;

    // RPC down: Reconciling (it may come back), with the endpoint named.
    set_secret(&env, "rpc-url", "http://127.0.0.1:1/RPC").await;
    let c = ready(&env, "False", "RpcUnreachable").await;
    let message = c
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
    assert!(message.contains("http://127.0.0.1:1/RPC"), "{message}");
    assert_eq!(
        kube_condition(&env, "Reconciling").await.as_deref(),
        Some("True")
    );
    assert!(env.events().contains("ConnectionFailed"));
}

async fn kube_condition(env: &Env, type_: &str) -> Option<String> {
    let api: Api<PbxConnection> = Api::namespaced(env.client.clone(), &env.ns);
    let c = api.get("acme").await.ok()?;
    c.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status)
}

#[tokio::test]
async fn missing_tables_are_named() {
    let env = Env::start(
        "pbxc-tables",
        LabSpec {
            db: "sqlite",
            users: 3,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    ready(&env, "True", "Connected").await;
    sqlx::query("DROP TABLE dbaliases")
        .execute(&env.pool)
        .await
        .unwrap();
    // Probe often from now on (a spec change also re-probes at once).
    let api: Api<PbxConnection> = Api::namespaced(env.client.clone(), &env.ns);
    let patch = serde_json::json!({ "spec": { "probeInterval": "1s" } });
    api.patch("acme", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let c = ready(&env, "False", "MissingTables").await;
    let message = c
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
    assert!(
        message.contains("dbaliases") && message.contains("load Kamailio's schema"),
        "{message}"
    );
}
