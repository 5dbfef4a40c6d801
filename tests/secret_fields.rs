//! Secret fields end to end (the real control plane, operator and Kamailio lab on SQLite): a
//! voicemail PIN from a Secret is stored as a salted slow hash, nothing derived from it (nor from
//! the SIP password's HA1) reaches the plan hash, status, results or events, the plan hash pins
//! the Secret's resourceVersion instead, and Enforce does not take a secret for drift.

mod support;

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use pbx_operator::api::{BulkUserChange, Outcome, Phase};
use pbx_operator::pbx::Secret;
use pbx_operator::pbx::kamailio::pin;
use sha2::{Digest, Sha256};
use support::eventually;
use support::lab::LabSpec;
use support::pbx::Env;

const CHANGE: &str = r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: pins }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["201", "202"] }
  fields:
    voicemailPin: { valueFrom: { secretKeyRef: { name: vm-pins, key: pin } }, lock: Open }
    callGroup: { value: "5", lock: Open }
  policy: Enforce
  interval: 2s
  mode: Validate
"#;

fn secret(pin: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: vm-pins, labels: {{ pbx-operator.io/usable-by-changes: \"true\" }} }}\nstringData: {{ pin: \"{pin}\" }}\n"
    )
}

/// What the old storage put in usr_preferences: an unsalted sha256 of domain:extension:pin.
fn old_digest(domain: &str, ext: &str, pin: &str) -> String {
    hex::encode(Sha256::digest(format!("{domain}:{ext}:{pin}")))
}

async fn patch_spec(env: &Env, spec: serde_json::Value) {
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    api.patch(
        "pins",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({ "spec": spec })),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn voicemail_pins_are_salted_and_never_reach_the_plan_or_status() {
    let env = Env::start(
        "secret-fields",
        LabSpec {
            users: 10,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let domain = env.lab.domain().to_string();
    env.apply(&format!("{}---\n{CHANGE}", secret("4711")));
    let b = env.wait_buc("pins", &[Phase::Validated]).await;
    let validated = b.status.clone().unwrap();
    let approved = validated.plan.as_ref().unwrap().hash.clone();
    let r201 = validated
        .results
        .iter()
        .find(|r| r.target == "201")
        .unwrap();
    assert!(
        format!("{:?}", r201.changes).contains("(new secret)"),
        "{:?}",
        r201.changes
    );

    // The Secret changes after the plan was approved: another plan, nothing written.
    env.apply(&secret("8080"));
    patch_spec(
        &env,
        serde_json::json!({ "mode": "Execute", "approvedPlanHash": approved }),
    )
    .await;
    let b = env.wait_buc("pins", &[Phase::Failed]).await;
    let status = b.status.clone().unwrap();
    let replanned = status.plan.as_ref().unwrap().hash.clone();
    assert_ne!(
        replanned, approved,
        "the plan hash pins the Secret's version"
    );
    assert_eq!(env.attribute("201", "pbx.voicemail_pin").await, None);
    assert_ne!(
        env.attribute("201", "pbx.call_group").await.as_deref(),
        Some("5")
    );

    patch_spec(&env, serde_json::json!({ "approvedPlanHash": replanned })).await;
    let b = env.wait_buc("pins", &[Phase::Succeeded]).await;
    let status = b.status.clone().unwrap();
    assert!(
        status.results.iter().all(|r| r.outcome == Outcome::Changed),
        "{:?}",
        status.results
    );

    // Stored salted and slow: the same PIN, two different values, both verify.
    let a = env.attribute("201", "pbx.voicemail_pin").await.unwrap();
    let b2 = env.attribute("202", "pbx.voicemail_pin").await.unwrap();
    for stored in [&a, &b2] {
        assert!(stored.starts_with("pbkdf2-sha256$"), "{stored}");
        assert!(!stored.contains("8080"));
    }
    assert_ne!(a, b2, "a salt per user");
    assert!(pin::verify(&a, &Secret::new("8080")));
    assert!(pin::verify(&b2, &Secret::new("8080")));
    assert!(!pin::verify(&a, &Secret::new("4711")));

    // Nothing derived from a secret in status, results or events.
    let (ok, csv, err) = env.cli(&["results", "buc/pins", "-n", &env.ns]);
    assert!(ok, "{err}");
    let shown = format!("{status:?}{csv}{}", env.events());
    let mut derived = vec![
        "8080".to_string(),
        "4711".to_string(),
        a.clone(),
        b2.clone(),
    ];
    for ext in ["201", "202"] {
        for p in ["8080", "4711"] {
            derived.push(old_digest(&domain, ext, p));
        }
        let ha1 = env
            .sql_one(&format!(
                "SELECT ha1 FROM subscriber WHERE username = '{ext}'"
            ))
            .await;
        derived.push(ha1);
    }
    for d in &derived {
        assert!(!shown.contains(d.as_str()), "{d} leaked");
    }

    // Enforce checks again and again without taking the PIN for drift: no correction, the PIN
    // is not rewritten.
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    let first_check = format!("{:?}", status.last_checked_time);
    eventually(Duration::from_secs(30), "two more Enforce checks", || {
        let api = api.clone();
        let first_check = first_check.clone();
        async move {
            let s = api.get("pins").await.ok()?.status?;
            let later = format!("{:?}", s.last_checked_time) != first_check;
            later.then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s = api.get("pins").await.unwrap().status.unwrap();
    assert_eq!(s.corrections.unwrap_or(0), 0, "a secret is not drift");
    assert_eq!(
        env.attribute("201", "pbx.voicemail_pin").await,
        Some(a.clone())
    );
    assert!(!env.events().contains("DriftCorrected"));

    // Real drift is still repaired, and the repair leaves the PIN alone.
    env.set_attribute("201", "pbx.call_group", "1").await;
    eventually(
        Duration::from_secs(30),
        "the drift to be corrected",
        || async {
            let s = api.get("pins").await.ok()?.status?;
            let fixed = env.attribute("201", "pbx.call_group").await.as_deref() == Some("5");
            (s.corrections? >= 1 && fixed).then_some(())
        },
    )
    .await;
    assert_eq!(env.attribute("201", "pbx.voicemail_pin").await, Some(a));
}
