//! The operator is never a deputy: a Secret a BulkUserChange names (a CSV source, a voicemail PIN)
//! is used only when its owner labelled it `pbx-operator.io/usable-by-changes: "true"`, and no
//! refusal quotes what a source holds. Changes are made by alice, an editor who may not read
//! Secrets, against a real control plane, operator process and Kamailio lab, without the chart's
//! admission policies.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use pbx_operator::api::{BulkUserChange, Phase};
use support::lab::LabSpec;
use support::pbx::Env;
use support::{control_plane, eventually};

const LABEL: &str = "pbx-operator.io/usable-by-changes";

fn lab() -> LabSpec {
    LabSpec {
        users: 8,
        phones: 0,
        ..Default::default()
    }
}

/// alice's client, after granting her an editor's Role in the test namespace: changes and
/// ConfigMaps, no Secrets.
async fn alice(env: &Env) -> Client {
    let cp = control_plane();
    support::kubectl_stdin(
        &cp.admin_kubeconfig,
        &["apply", "-f", "-"],
        format!(
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{ name: pbx-editor, namespace: {ns} }}
rules:
- apiGroups: [pbx-operator.io]
  resources: [bulkuserchanges]
  verbs: [create, get, list, watch, update, patch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{ name: alice-pbx-editor, namespace: {ns} }}
roleRef: {{ apiGroup: rbac.authorization.k8s.io, kind: Role, name: pbx-editor }}
subjects:
- {{ apiGroup: rbac.authorization.k8s.io, kind: User, name: {user} }}
"#,
            ns = env.ns,
            user = cp.user_name
        )
        .as_bytes(),
    );
    let client = support::unprivileged().await;
    let changes: Api<BulkUserChange> = Api::namespaced(client.clone(), &env.ns);
    eventually(
        Duration::from_secs(10),
        "alice's role to take effect",
        || async { changes.list(&Default::default()).await.ok() },
    )
    .await;
    match Api::<Secret>::namespaced(client.clone(), &env.ns)
        .get("acme-pbx")
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("alice must not read the connection's Secret: {other:?}"),
    }
    client
}

/// Creates a BulkUserChange as `client` from its spec.
async fn create_change(client: &Client, ns: &str, name: &str, spec: serde_json::Value) {
    let buc: BulkUserChange = serde_json::from_value(serde_json::json!({
        "apiVersion": "pbx-operator.io/v1alpha1",
        "kind": "BulkUserChange",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .unwrap();
    Api::<BulkUserChange>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &buc)
        .await
        .unwrap();
}

async fn secret(env: &Env, name: &str, key: &str, value: &str, labelled: bool) {
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: labelled.then(|| BTreeMap::from([(LABEL.to_string(), "true".to_string())])),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
}

/// The Stalled condition of a change that was refused.
fn stalled(b: &BulkUserChange) -> (String, String) {
    let c = b
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .unwrap_or_else(|| panic!("no Stalled condition: {:?}", b.status));
    (c.reason.clone(), c.message.clone())
}

/// Everything a requester can see of a change: its status, the namespace's Events and every
/// ConfigMap of the namespace (results included).
async fn visible(env: &Env, name: &str) -> String {
    let b = Api::<BulkUserChange>::namespaced(env.client.clone(), &env.ns)
        .get(name)
        .await
        .unwrap();
    let mut all = serde_json::to_string(&b.status).unwrap();
    all.push_str(&env.events());
    for cm in Api::<ConfigMap>::namespaced(env.client.clone(), &env.ns)
        .list(&Default::default())
        .await
        .unwrap()
    {
        all.push_str(&serde_json::to_string(&cm.data).unwrap());
        for b in cm.binary_data.unwrap_or_default().values() {
            all.push_str(&String::from_utf8_lossy(&b.0));
        }
    }
    all
}

/// The connection's database URL, and a prefix of it long enough to be telling (a refusal
/// quoting a clipped first line would hold the prefix only).
fn database_url_parts(env: &Env) -> [String; 2] {
    let url = env.lab.db_url().to_string();
    let prefix: String = url.chars().take(30).collect();
    [url, prefix]
}

#[tokio::test]
async fn csv_secret_without_opt_in_label_is_refused_and_not_quoted() {
    let env = Env::start("src-secret", lab(), false).await;
    let alice = alice(&env).await;
    create_change(
        &alice,
        &env.ns,
        "steal",
        serde_json::json!({
            "connectionRef": { "name": "acme" },
            "source": { "csv": { "secretKeyRef": { "name": "acme-pbx", "key": "database-url" } } },
            "mode": "Validate",
        }),
    )
    .await;
    let b = env.wait_buc("steal", &[Phase::Failed]).await;
    let (reason, message) = stalled(&b);
    assert_eq!(reason, "SecretNotUsable", "{message}");
    for part in ["acme-pbx", "\"database-url\"", LABEL, "spec.source.csv"] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    let ready = b
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
    let seen = visible(&env, "steal").await;
    for part in database_url_parts(&env) {
        assert!(
            !seen.contains(&part),
            "the database URL leaked to the requester: {seen}"
        );
    }
    assert!(
        b.status.as_ref().unwrap().results_refs.is_empty(),
        "nothing was planned"
    );

    // Same for a secret field: the PIN is never set from a Secret its owner did not offer.
    let pin_before = env.attribute("201", "pbx.voicemail_pin").await;
    create_change(
        &alice,
        &env.ns,
        "steal-pin",
        serde_json::json!({
            "connectionRef": { "name": "acme" },
            "targets": { "extensions": ["201"] },
            "fields": { "voicemailPin": {
                "valueFrom": { "secretKeyRef": { "name": "acme-pbx", "key": "database-url" } },
                "lock": "Open",
            } },
            "mode": "Execute",
        }),
    )
    .await;
    let b = env.wait_buc("steal-pin", &[Phase::Failed]).await;
    let (reason, message) = stalled(&b);
    assert_eq!(reason, "SecretNotUsable", "{message}");
    assert!(
        message.contains("spec.fields.voicemailPin.valueFrom.secretKeyRef"),
        "{message}"
    );
    assert_eq!(
        env.attribute("201", "pbx.voicemail_pin").await,
        pin_before,
        "nothing changed"
    );
    let seen = visible(&env, "steal-pin").await;
    for part in database_url_parts(&env) {
        assert!(!seen.contains(&part), "{seen}");
    }
}

#[tokio::test]
async fn csv_secret_with_opt_in_label_validates_and_executes() {
    let env = Env::start("src-optin", lab(), false).await;
    let alice = alice(&env).await;
    secret(
        &env,
        "sheet",
        "changes.csv",
        "extension,callerIdPolicy\n205,Anonymous\n",
        true,
    )
    .await;
    create_change(
        &alice,
        &env.ns,
        "from-secret",
        serde_json::json!({
            "connectionRef": { "name": "acme" },
            "source": { "csv": { "secretKeyRef": { "name": "sheet", "key": "changes.csv" } } },
            "mode": "Validate",
        }),
    )
    .await;
    let b = env.wait_buc("from-secret", &[Phase::Validated]).await;
    let status = b.status.unwrap();
    assert_eq!(status.plan.as_ref().unwrap().changes, 1);
    Api::<BulkUserChange>::namespaced(alice.clone(), &env.ns)
        .patch(
            "from-secret",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "mode": "Execute" } })),
        )
        .await
        .unwrap();
    env.wait_buc("from-secret", &[Phase::Succeeded]).await;
    assert_eq!(
        env.attribute("205", "pbx.caller_id_policy")
            .await
            .as_deref(),
        Some("Anonymous")
    );
}

#[tokio::test]
async fn csv_refusal_does_not_quote_the_first_line() {
    const TOKEN: &str = "Tk9pQ2x5V3VyZHM";
    let env = Env::start("src-quote", lab(), false).await;
    let alice = alice(&env).await;
    // The first line holds the token, so a refusal quoting it would show it.
    let cm_header = ConfigMap {
        metadata: ObjectMeta {
            name: Some("token-header".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "changes.csv".to_string(),
            format!("{TOKEN},apiToken\n205,x\n"),
        )])),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(alice.clone(), &env.ns)
        .create(&PostParams::default(), &cm_header)
        .await
        .unwrap();
    create_change(
        &alice,
        &env.ns,
        "refused",
        serde_json::json!({
            "connectionRef": { "name": "acme" },
            "source": { "csv": { "configMapKeyRef": { "name": "token-header", "key": "changes.csv" } } },
            "mode": "Validate",
        }),
    )
    .await;
    let b = env.wait_buc("refused", &[Phase::Failed]).await;
    let (reason, message) = stalled(&b);
    assert_eq!(reason, "CsvRefused", "{message}");
    assert!(
        message.contains("no header row naming an `extension` column"),
        "{message}"
    );
    let b = Api::<BulkUserChange>::namespaced(env.client.clone(), &env.ns)
        .get("refused")
        .await
        .unwrap();
    let status = serde_json::to_string(&b.status).unwrap();
    assert!(!status.contains(TOKEN), "{status}");
    assert!(!env.events().contains(TOKEN), "{}", env.events());
}
