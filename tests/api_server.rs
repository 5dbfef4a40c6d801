//! The CRDs against a real kube-apiserver: they install, valid resources are accepted, invalid
//! ones are refused with a message that names the field, status is a subresource, and RBAC holds.

mod support;

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use pbx_operator::api::{BulkUserChange, Phase};
use support::{control_plane, eventually, kubectl, try_kubectl};

#[tokio::test]
async fn crds_are_established_and_listed_by_category() {
    let cp = control_plane();
    let out = kubectl(
        &cp.admin_kubeconfig,
        &[
            "get",
            "crd",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Established")].status}{"\n"}{end}"#,
        ],
    );
    for kind in [
        "pbxconnections",
        "bulkuserchanges",
        "bulkphonechanges",
        "phonerestarts",
        "userrecycles",
    ] {
        assert!(
            out.contains(&format!("{kind}.pbx-operator.io=True")),
            "{kind} not Established:\n{out}"
        );
    }
    let ns = support::namespace(&support::admin().await, "category").await;
    let examples = support::repo_root().join("examples/bulkuserchange-call-group.yaml");
    kubectl(
        &cp.admin_kubeconfig,
        &["apply", "-n", &ns, "-f", examples.to_str().unwrap()],
    );
    let listed = kubectl(&cp.admin_kubeconfig, &["get", "pbx", "-n", &ns]);
    assert!(
        listed.contains("call-group-201-202"),
        "kubectl get pbx did not list it:\n{listed}"
    );
    for column in ["PHASE", "TARGETS", "CHANGED", "FAILED", "AGE"] {
        assert!(
            listed.contains(column),
            "printer column {column} missing:\n{listed}"
        );
    }
}

#[tokio::test]
async fn every_example_is_accepted() {
    let cp = control_plane();
    let ns = support::namespace(&support::admin().await, "examples").await;
    let dir = support::repo_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut kinds = std::collections::BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
            if let Some(k) = v["apiVersion"]
                .as_str()
                .filter(|a| a.starts_with("pbx-operator.io/"))
            {
                let _ = k;
                kinds.insert(v["kind"].as_str().unwrap().to_string());
            }
        }
        let (ok, _, err) = try_kubectl(
            &cp.admin_kubeconfig,
            &["create", "-n", &ns, "-f", file.to_str().unwrap()],
            b"",
        );
        assert!(ok, "{} was refused: {err}", file.display());
    }
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "BulkPhoneChange",
            "BulkUserChange",
            "PbxConnection",
            "PhoneRestart",
            "UserRecycle"
        ],
        "examples/ must show every kind"
    );
}

/// (name, manifest, substrings the API server's message must contain: the field path first)
type Case = (&'static str, &'static str, &'static [&'static str]);

const INVALID: &[Case] = &[
    // PbxConnection
    (
        "pbxc-no-domain",
        r#"
kind: PbxConnection
spec:
  database: { urlSecretRef: { name: s, key: db } }
  rpc: { urlSecretRef: { name: s, key: rpc } }
"#,
        &["spec.domain", "Required value"],
    ),
    (
        "pbxc-unknown-backend",
        r#"
kind: PbxConnection
spec:
  backend: Asterisk
  domain: pbx.test
  database: { urlSecretRef: { name: s, key: db } }
  rpc: { urlSecretRef: { name: s, key: rpc } }
"#,
        &["spec.backend", "Unsupported value", "Kamailio"],
    ),
    (
        "pbxc-bad-interval",
        r#"
kind: PbxConnection
spec:
  domain: pbx.test
  probeInterval: 5 minutes
  database: { urlSecretRef: { name: s, key: db } }
  rpc: { urlSecretRef: { name: s, key: rpc } }
"#,
        &["spec.probeInterval", "should match"],
    ),
    (
        "pbxc-secret-ref-without-key",
        r#"
kind: PbxConnection
spec:
  domain: pbx.test
  database: { urlSecretRef: { name: s } }
  rpc: { urlSecretRef: { name: s, key: rpc } }
"#,
        &["spec.database.urlSecretRef.key", "Required value"],
    ),
    // BulkUserChange
    (
        "buc-literal-pin",
        r#"
kind: BulkUserChange
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["201"] }
  fields:
    voicemailPin: { value: "1234", lock: Open }
"#,
        &["spec.fields.voicemailPin", "valueFrom.secretKeyRef"],
    ),
    (
        "buc-empty-targets",
        r#"
kind: BulkUserChange
spec:
  connectionRef: { name: acme }
  targets: {}
  fields:
    callGroup: { value: "3", lock: Open }
"#,
        &["spec.targets", "targets.groups or targets.extensions"],
    ),
    (
        "buc-bad-lock",
        r#"
kind: BulkUserChange
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
  fields:
    callGroup: { value: "3", lock: Maybe }
"#,
        &["spec.fields.callGroup.lock", "Unsupported value", "Open"],
    ),
    (
        "buc-bad-extension",
        r#"
kind: BulkUserChange
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["201;transport=tcp"] }
  actions: [Unlock]
"#,
        &["spec.targets.extensions[0]", "should match"],
    ),
    (
        "buc-nothing-to-do",
        r#"
kind: BulkUserChange
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
"#,
        &["spec", "nothing to do"],
    ),
    (
        "buc-unknown-action",
        r#"
kind: BulkUserChange
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
  actions: [Reboot]
"#,
        &["spec.actions[0]", "Unsupported value"],
    ),
    (
        "buc-hash-in-validate",
        r#"
kind: BulkUserChange
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
  actions: [Unlock]
  mode: Validate
  approvedPlanHash: "ab00000000000000000000000000000000000000000000000000000000000000"
"#,
        &["spec.approvedPlanHash", "mode Execute"],
    ),
    (
        "buc-no-targets",
        r#"
kind: BulkUserChange
spec:
  connectionRef: { name: acme }
  actions: [Unlock]
"#,
        &["spec.targets", "required"],
    ),
    // BulkPhoneChange
    (
        "bpc-no-fields",
        r#"
kind: BulkPhoneChange
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
"#,
        &["spec.fields", "spec.fields is required"],
    ),
    (
        "bpc-empty-targets",
        r#"
kind: BulkPhoneChange
spec:
  connectionRef: { name: acme }
  targets: { models: ["SIP-T46S"] }
  fields: { model: { value: SIP-T54W, lock: Open } }
"#,
        &["spec.targets", "targets.groups or targets.extensions"],
    ),
    (
        "bpc-model-with-newline",
        r#"
kind: BulkPhoneChange
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
  fields: { model: { value: "T54W\r\nX-Evil: 1", lock: Open } }
"#,
        &["spec.fields.model.value", "should match"],
    ),
    (
        "bpc-failure-policy-is-not-a-field",
        r#"
kind: BulkPhoneChange
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
  fields: { model: { value: SIP-T54W, lock: Open } }
  failurePolicy: Atomic
"#,
        &["unknown field \"spec.failurePolicy\""],
    ),
    // PhoneRestart
    (
        "prs-window-backwards",
        r#"
kind: PhoneRestart
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
  notBefore: "2026-11-22T03:00:00Z"
  notAfter: "2026-11-22T02:00:00Z"
"#,
        &["spec.notAfter", "later than spec.notBefore"],
    ),
    (
        "prs-zero-in-flight",
        r#"
kind: PhoneRestart
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
  rollout: { maxInFlight: 0 }
"#,
        &["spec.rollout.maxInFlight", "greater than or equal to 1"],
    ),
    (
        "prs-bad-timeout",
        r#"
kind: PhoneRestart
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
  confirm: { timeout: forever }
"#,
        &["spec.confirm.timeout", "should match"],
    ),
    (
        "prs-no-targets",
        r#"
kind: PhoneRestart
spec:
  connectionRef: { name: acme }
"#,
        &["spec.targets", "Required value"],
    ),
    // UserRecycle
    (
        "urc-recycle-not-a-target",
        r#"
kind: UserRecycle
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["201"] }
  recycle:
    - { extension: "202", firstName: Ana, lastName: Diaz }
"#,
        &[
            "spec.recycle",
            "must also be listed in spec.targets.extensions",
        ],
    ),
    (
        "urc-recycle-without-last-name",
        r#"
kind: UserRecycle
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["201"] }
  recycle:
    - { extension: "201", firstName: Ana }
"#,
        &["spec.recycle[0]", "firstName and lastName"],
    ),
    (
        "urc-no-extensions",
        r#"
kind: UserRecycle
spec:
  connectionRef: { name: acme }
  targets: { extensions: [] }
"#,
        &["spec.targets.extensions", "at least 1"],
    ),
    (
        "urc-unknown-reset-item",
        r#"
kind: UserRecycle
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["201"] }
  reset: [Everything]
"#,
        &["spec.reset[0]", "Unsupported value"],
    ),
    (
        "urc-two-people-one-extension",
        r#"
kind: UserRecycle
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["201"] }
  recycle:
    - { extension: "201", firstName: Ana, lastName: Diaz }
    - { extension: "201", firstName: Bo, lastName: Li }
"#,
        &["spec.recycle[1]", "Duplicate value"],
    ),
    (
        "urc-group-targets",
        r#"
kind: UserRecycle
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales], extensions: ["201"] }
"#,
        &["spec.targets.groups", "unknown field"],
    ),
];

#[tokio::test]
async fn invalid_resources_are_refused_with_the_field_named() {
    let cp = control_plane();
    let ns = support::namespace(&support::admin().await, "invalid").await;
    let mut per_kind = std::collections::BTreeMap::<&str, usize>::new();
    let mut failures = Vec::new();
    for (name, body, expected) in INVALID {
        let manifest =
            format!("apiVersion: pbx-operator.io/v1alpha1\nmetadata: {{ name: {name} }}{body}");
        let kind = body.lines().find_map(|l| l.strip_prefix("kind: ")).unwrap();
        *per_kind.entry(kind).or_default() += 1;
        let (ok, _, stderr) = try_kubectl(
            &cp.admin_kubeconfig,
            &["create", "-n", &ns, "-f", "-"],
            manifest.as_bytes(),
        );
        if ok {
            failures.push(format!("{name}: was accepted"));
            continue;
        }
        for want in *expected {
            if !stderr.contains(want) {
                failures.push(format!("{name}: message lacks {want:?}: {stderr}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for kind in [
        "PbxConnection",
        "BulkUserChange",
        "BulkPhoneChange",
        "PhoneRestart",
        "UserRecycle",
    ] {
        assert!(
            per_kind.get(kind).copied().unwrap_or(0) >= 3,
            "fewer than three invalid cases for {kind}"
        );
    }
}

fn call_group_change(name: &str, value: &str) -> BulkUserChange {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "pbx-operator.io/v1alpha1",
        "kind": "BulkUserChange",
        "metadata": { "name": name },
        "spec": {
            "connectionRef": { "name": "acme" },
            "targets": { "extensions": ["201", "202"] },
            "fields": { "callGroup": { "value": value, "lock": "Open" } }
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn status_is_a_subresource_that_spec_edits_leave_alone() {
    let client = support::admin().await;
    let ns = support::namespace(&client, "status").await;
    let api: Api<BulkUserChange> = Api::namespaced(client, &ns);
    let created = api
        .create(&PostParams::default(), &call_group_change("cg", "3"))
        .await
        .unwrap();
    assert!(created.status.is_none(), "a new resource has no status");
    // Defaults from the schema are applied by the API server.
    assert_eq!(created.spec.mode, pbx_operator::api::Mode::Execute);

    let status = serde_json::json!({ "status": { "phase": "Succeeded", "observedGeneration": 1,
        "summary": { "targets": 2, "changed": 2 } } });
    api.patch_status("cg", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    // A spec edit through the main resource carries a different status; it must be ignored.
    let edit = serde_json::json!({ "spec": { "fields": { "callGroup": { "value": "4", "lock": "Open" } } },
        "status": { "phase": "Failed" } });
    let edited = api
        .patch("cg", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    assert_eq!(
        edited.metadata.generation,
        Some(2),
        "a spec edit is a new generation"
    );
    let status = edited.status.expect("status kept");
    assert_eq!(status.phase, Phase::Succeeded);
    assert_eq!(status.summary.unwrap().changed, 2);

    // And a status write does not bump the generation.
    let again = serde_json::json!({ "status": { "phase": "Running" } });
    let after = api
        .patch_status("cg", &PatchParams::default(), &Patch::Merge(&again))
        .await
        .unwrap();
    assert_eq!(after.metadata.generation, Some(2));
    assert_eq!(after.spec.fields.unwrap().call_group.unwrap().value.0, "4");
}

#[tokio::test]
async fn unprivileged_user_needs_a_role_to_create_changes() {
    let cp = control_plane();
    let admin = support::admin().await;
    let ns = support::namespace(&admin, "rbac").await;
    let user_api: Api<BulkUserChange> = Api::namespaced(support::unprivileged().await, &ns);

    let denied = user_api
        .create(&PostParams::default(), &call_group_change("by-alice", "3"))
        .await;
    match denied {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(status.message.contains("alice"), "{}", status.message);
        }
        other => panic!("alice could create a BulkUserChange without a role: {other:?}"),
    }

    let grant = format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{ name: pbx-editor, namespace: {ns} }}
rules:
- apiGroups: [pbx-operator.io]
  resources: [bulkuserchanges]
  verbs: [create, get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{ name: alice-pbx-editor, namespace: {ns} }}
roleRef: {{ apiGroup: rbac.authorization.k8s.io, kind: Role, name: pbx-editor }}
subjects:
- {{ apiGroup: rbac.authorization.k8s.io, kind: User, name: {user} }}
"#,
        user = cp.user_name
    );
    support::kubectl_stdin(
        &cp.admin_kubeconfig,
        &["apply", "-f", "-"],
        grant.as_bytes(),
    );
    eventually(
        Duration::from_secs(10),
        "alice's new role to take effect",
        || async {
            user_api
                .create(&PostParams::default(), &call_group_change("by-alice", "3"))
                .await
                .ok()
        },
    )
    .await;
    // The role grants this namespace only.
    let other = support::namespace(&admin, "rbac-other").await;
    let elsewhere: Api<BulkUserChange> = Api::namespaced(support::unprivileged().await, &other);
    assert!(
        elsewhere
            .create(&PostParams::default(), &call_group_change("x", "3"))
            .await
            .is_err()
    );
}
