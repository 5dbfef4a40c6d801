//! PbxConnection against a real control plane and a real Kamailio on PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use pbx_operator::api::PbxConnection;
use sqlx::AssertSqlSafe;
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

/// Ready condition (status, reason), users and last probe time of connection `name`.
async fn seen(env: &Env, name: &str) -> Option<(String, String, Option<u64>, Option<String>)> {
    let api: Api<PbxConnection> = Api::namespaced(env.client.clone(), &env.ns);
    let s = api.get(name).await.ok()?.status?;
    let r = s.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((
        r.status.clone(),
        r.reason.clone(),
        s.users,
        s.last_probe_time.map(|t| t.0.to_string()),
    ))
}

/// Nothing but `probeInterval` makes a probe here: the spec and the Secret stay as they are while
/// the PBX changes under them (a user added in SQL, then a table dropped). A connection probed
/// every 2s follows within that interval plus a margin; the other one (the default 5m) does not
/// move in four times that.
#[tokio::test]
async fn probe_interval_alone_picks_up_changes_and_names_missing_tables() {
    const FAST: Duration = Duration::from_secs(2);
    const MARGIN: Duration = Duration::from_secs(4);
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
    env.apply(&format!(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: PbxConnection
metadata: {{ name: fast }}
spec:
  domain: {domain}
  database: {{ urlSecretRef: {{ name: acme-pbx, key: database-url }} }}
  rpc: {{ urlSecretRef: {{ name: acme-pbx, key: rpc-url }} }}
  probeInterval: 2s
"#,
        domain = env.lab.domain()
    ));
    eventually(Duration::from_secs(60), "fast to be Ready", || async {
        let s = seen(&env, "fast").await?;
        (s.0 == "True" && s.2 == Some(3)).then_some(())
    })
    .await;
    let slow_before = seen(&env, "acme").await.unwrap();
    assert_eq!(slow_before.2, Some(3), "{slow_before:?}");

    // A user added behind the operator's back.
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO subscriber (username, domain) VALUES ('9999', '{}')",
        env.lab.domain()
    )))
    .execute(&env.pool)
    .await
    .unwrap();
    let t0 = Instant::now();
    eventually(
        FAST + MARGIN,
        "fast to count the new user within its probeInterval",
        || async { (seen(&env, "fast").await?.2 == Some(4)).then_some(()) },
    )
    .await;
    eprintln!(
        "probeInterval 2s: the new user counted after {:?}",
        t0.elapsed()
    );
    tokio::time::sleep((FAST * 4).saturating_sub(t0.elapsed())).await;
    assert_eq!(
        seen(&env, "acme").await.unwrap(),
        slow_before,
        "a connection with the default probeInterval (5m) was probed again within {:?}",
        FAST * 4
    );

    // A table dropped behind the operator's back.
    sqlx::query("DROP TABLE dbaliases")
        .execute(&env.pool)
        .await
        .unwrap();
    let t1 = Instant::now();
    let api: Api<PbxConnection> = Api::namespaced(env.client.clone(), &env.ns);
    let message = eventually(
        FAST + MARGIN,
        "fast to be MissingTables within its probeInterval",
        || async {
            let c = api.get("fast").await.ok()?;
            let r = c
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (r.status == "False" && r.reason == "MissingTables").then_some(r.message)
        },
    )
    .await;
    eprintln!(
        "probeInterval 2s: the dropped table named after {:?}",
        t1.elapsed()
    );
    assert!(
        message.contains("dbaliases") && message.contains("load Kamailio's schema"),
        "{message}"
    );
    tokio::time::sleep((FAST * 4).saturating_sub(t1.elapsed())).await;
    assert_eq!(
        seen(&env, "acme").await.unwrap(),
        slow_before,
        "a connection with the default probeInterval (5m) was probed again within {:?}",
        FAST * 4
    );
}
