//! BulkPhoneChange: assign a model to phones of one vendor, against the real control plane and lab.

mod support;

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use pbx_operator::api::{BulkPhoneChange, Phase};
use support::lab::LabSpec;
use support::pbx::Env;
use support::{control_plane, eventually, try_kubectl};

async fn settled(env: &Env, name: &str) -> BulkPhoneChange {
    let api: Api<BulkPhoneChange> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(
        Duration::from_secs(60),
        &format!("{name} to settle"),
        || async {
            let b = api.get(name).await.ok()?;
            let s = b.status.as_ref()?;
            (s.observed_generation == b.metadata.generation
                && matches!(
                    s.phase,
                    Phase::Validated | Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed
                ))
            .then_some(b)
        },
    )
    .await
}

#[tokio::test]
async fn model_is_assigned_to_one_vendor_only() {
    let env = Env::start(
        "bpc",
        LabSpec {
            db: "sqlite",
            users: 10,
            phones: 10,
            ..Default::default()
        },
        false,
    )
    .await;
    let models = "SELECT COUNT(*) FROM pbx_phone WHERE model = 'SIP-T54W'";
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkPhoneChange
metadata: { name: mixed }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  fields: { model: { value: SIP-T54W, lock: Open } }
---
apiVersion: pbx-operator.io/v1alpha1
kind: BulkPhoneChange
metadata: { name: yealinks }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering], vendors: [Yealink] }
  fields:
    model: { value: SIP-T54W, lock: Open }
    label: { value: "3rd floor" }
  mode: Validate
"#,
    );
    let mixed = settled(&env, "mixed").await;
    let s = mixed.status.unwrap();
    assert_eq!(s.phase, Phase::Failed);
    let stalled = s.conditions.iter().find(|c| c.type_ == "Stalled").unwrap();
    assert_eq!(stalled.reason, "MixedVendors");
    for vendor in ["Cisco", "Grandstream", "Poly", "Snom", "Yealink"] {
        assert!(
            stalled.message.contains(vendor),
            "the message names the vendors found: {}",
            stalled.message
        );
    }
    assert_eq!(env.sql_one(models).await, "0", "nothing was changed");

    let v = settled(&env, "yealinks").await;
    let s = v.status.unwrap();
    let plan = s.plan.unwrap();
    assert_eq!(plan.targets, 2);
    assert_eq!(
        plan.common_values.get("model"),
        Some(&Some("SIP-T46S".to_string()))
    );
    assert_eq!(plan.closed_fields, ["label"]);
    assert_eq!(env.sql_one(models).await, "0", "Validate writes nothing");

    let api: Api<BulkPhoneChange> = Api::namespaced(env.client.clone(), &env.ns);
    let patch = serde_json::json!({ "spec": { "mode": "Execute", "approvedPlanHash": plan.hash } });
    api.patch("yealinks", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let done = settled(&env, "yealinks").await;
    let s = done.status.unwrap();
    assert_eq!(s.phase, Phase::Succeeded, "{:?}", s.results);
    assert_eq!(s.summary.unwrap().changed, 2);
    assert_eq!(env.sql_one(models).await, "2");
    assert_eq!(
        env.sql_one(
            "SELECT COUNT(*) FROM pbx_phone WHERE vendor <> 'Yealink' AND model = 'SIP-T54W'"
        )
        .await,
        "0"
    );
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM pbx_phone WHERE label = '3rd floor'")
            .await,
        "0",
        "a closed label is never written"
    );
    let (ok, csv, _) = env.cli(&["results", "bulkphonechange/yealinks", "-n", &env.ns]);
    assert!(ok && csv.contains("model: SIP-T46S -> SIP-T54W"), "{csv}");
}

/// Fields that were once in the schema but did nothing are refused, so whoever sets them learns
/// it: BulkPhoneChange `failurePolicy`, `policy` and `interval`, PbxConnection
/// `rateLimits.writesPerSecond` (kubectl validates strictly: unknown fields are errors).
#[tokio::test]
async fn fields_that_did_nothing_are_refused() {
    let cp = control_plane();
    let ns = support::namespace(&support::admin().await, "bpc-fields").await;
    let apply = |manifest: &str| {
        try_kubectl(
            &cp.admin_kubeconfig,
            &["apply", "--validate=strict", "-n", &ns, "-f", "-"],
            manifest.as_bytes(),
        )
    };
    let bpc = |extra: &str| {
        format!(
            r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkPhoneChange
metadata: {{ name: models }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ groups: [sales], vendors: [Yealink] }}
  fields: {{ model: {{ value: SIP-T54W, lock: Open }} }}
{extra}"#
        )
    };
    for (extra, field) in [
        ("  failurePolicy: Atomic\n", "spec.failurePolicy"),
        ("  policy: Enforce\n", "spec.policy"),
        ("  policy: Enforce\n  interval: 1h\n", "spec.interval"),
    ] {
        let (ok, _, err) = apply(&bpc(extra));
        assert!(!ok, "{field} was accepted");
        assert!(
            err.contains(&format!("unknown field \"{field}\"")),
            "{field}: {err}"
        );
    }
    let (ok, _, err) = apply(&bpc(""));
    assert!(ok, "the same change without them is accepted: {err}");

    let connection = |limits: &str| {
        format!(
            r#"apiVersion: pbx-operator.io/v1alpha1
kind: PbxConnection
metadata: {{ name: acme }}
spec:
  domain: pbx.test
  database: {{ urlSecretRef: {{ name: acme-pbx, key: database-url }} }}
  rpc: {{ urlSecretRef: {{ name: acme-pbx, key: rpc-url }} }}
  rateLimits: {limits}
"#
        )
    };
    let (ok, _, err) = apply(&connection("{ writesPerSecond: 100 }"));
    assert!(!ok, "writesPerSecond was accepted");
    assert!(
        err.contains("unknown field \"spec.rateLimits.writesPerSecond\""),
        "{err}"
    );
    let (ok, _, err) = apply(&connection("{ notifiesPerSecond: 100 }"));
    assert!(ok, "notifiesPerSecond is a real limit: {err}");
}
