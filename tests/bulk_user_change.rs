//! BulkUserChange end to end: the real control plane, the operator process, a real Kamailio.

mod support;

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use pbx_operator::api::{BulkUserChange, Outcome, Phase};
use support::eventually;
use support::lab::LabSpec;
use support::pbx::Env;

fn condition(b: &BulkUserChange, type_: &str) -> (String, String, String) {
    let c = b
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

async fn patch_spec(env: &Env, name: &str, spec: serde_json::Value) {
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({ "spec": spec })),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn seed_call_groups_validate_then_execute() {
    let env = Env::start(
        "buc-seed",
        LabSpec {
            users: 10,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    // The seed: 201 and 202 have different call groups.
    let before = (
        env.attribute("201", "pbx.call_group").await,
        env.attribute("202", "pbx.call_group").await,
    );
    assert_ne!(before.0, before.1);
    let pickup = (
        env.attribute("201", "pbx.pickup_group").await,
        env.attribute("202", "pbx.pickup_group").await,
    );

    let example = std::fs::read_to_string(
        support::repo_root().join("examples/bulkuserchange-call-group.yaml"),
    )
    .unwrap();
    env.apply(&format!("{example}  mode: Validate\n"));
    let b = env
        .wait_buc("call-group-201-202", &[Phase::Validated])
        .await;
    let plan = b.status.as_ref().unwrap().plan.clone().unwrap();
    assert_eq!(
        plan.common_values.get("callGroup"),
        Some(&None),
        "differing call groups show as mixed (null)"
    );
    assert_eq!(plan.closed_fields, ["pickupGroup"]);
    assert_eq!(plan.resolved, ["201", "202"]);
    assert_eq!(plan.changes, 2);
    assert_eq!(condition(&b, "Validated").0, "True");
    assert_eq!(
        (
            env.attribute("201", "pbx.call_group").await,
            env.attribute("202", "pbx.call_group").await
        ),
        before,
        "Validate touches nothing"
    );
    let (ok, csv, err) = env.cli(&[
        "results",
        "bulkuserchange/call-group-201-202",
        "-n",
        &env.ns,
    ]);
    assert!(ok, "{err}");
    assert!(
        csv.starts_with("target,outcome,changes,actions,notes\n"),
        "{csv}"
    );
    assert_eq!(csv.matches(",Planned,").count(), 2, "{csv}");

    // Switching to Execute executes the validated plan.
    patch_spec(
        &env,
        "call-group-201-202",
        serde_json::json!({ "mode": "Execute" }),
    )
    .await;
    let b = env
        .wait_buc(
            "call-group-201-202",
            &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed],
        )
        .await;
    let status = b.status.clone().unwrap();
    assert_eq!(status.phase, Phase::Succeeded, "{:?}", status.results);
    let summary = status.summary.unwrap();
    assert_eq!(
        (summary.targets, summary.changed, summary.failed),
        (2, 2, 0)
    );
    assert_eq!(condition(&b, "Ready").0, "True");
    assert_eq!(
        env.attribute("201", "pbx.call_group").await.as_deref(),
        Some("3"),
        "open lock: written"
    );
    assert_eq!(
        env.attribute("202", "pbx.call_group").await.as_deref(),
        Some("3")
    );
    assert_eq!(
        (
            env.attribute("201", "pbx.pickup_group").await,
            env.attribute("202", "pbx.pickup_group").await
        ),
        pickup,
        "closed lock: never written"
    );
    let r201 = status.results.iter().find(|r| r.target == "201").unwrap();
    assert_eq!(r201.outcome, Outcome::Changed);
    assert_eq!(r201.changes[0].field, "callGroup");
    assert_eq!(r201.changes[0].to.as_deref(), Some("3"));
    assert_eq!(r201.changes[0].from, before.0);
    let (_, csv, _) = env.cli(&[
        "results",
        "bulkuserchange/call-group-201-202",
        "-n",
        &env.ns,
    ]);
    assert!(
        csv.contains(&format!(
            "201,Changed,callGroup: {} -> 3",
            before.0.unwrap()
        )),
        "{csv}"
    );
    let events = env.events();
    assert!(
        events.contains("Validated") && events.contains("Started") && events.contains("Finished"),
        "{events}"
    );
}

#[tokio::test]
async fn moved_values_conflict_and_retry_reruns_only_the_failed() {
    let env = Env::start(
        "buc-conflict",
        LabSpec {
            users: 10,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: operators }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["201", "202", "203", "204"] }
  fields: { role: { value: Admin, lock: Open } }
  mode: Validate
"#,
    );
    env.wait_buc("operators", &[Phase::Validated]).await;
    // Somebody edits 203 in the console between review and execution.
    env.set_attribute("203", "pbx.role", "Operator").await;
    patch_spec(&env, "operators", serde_json::json!({ "mode": "Execute" })).await;
    let b = env.wait_buc("operators", &[Phase::PartiallyFailed]).await;
    let status = b.status.clone().unwrap();
    assert_eq!(status.results[0].target, "203", "failures come first");
    assert_eq!(status.results[0].outcome, Outcome::Conflict);
    assert!(
        status.results[0].notes[0].contains("role changed from User to Operator"),
        "{:?}",
        status.results[0].notes
    );
    assert_eq!(
        env.attribute("203", "pbx.role").await.as_deref(),
        Some("Operator"),
        "a conflict is left alone"
    );
    assert_eq!(
        env.attribute("204", "pbx.role").await.as_deref(),
        Some("Admin")
    );
    let (ready, reason, message) = condition(&b, "Ready");
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "PartiallyFailed")
    );
    assert!(message.contains("pbx-operator.io/retry"), "{message}");
    assert_eq!(condition(&b, "Stalled").0, "True");

    // Retry: only the failed target runs again, from its current value.
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    let annotate =
        serde_json::json!({ "metadata": { "annotations": { "pbx-operator.io/retry": "1" } } });
    api.patch(
        "operators",
        &PatchParams::default(),
        &Patch::Merge(&annotate),
    )
    .await
    .unwrap();
    let b = eventually(Duration::from_secs(60), "the retry to succeed", || async {
        let b = api.get("operators").await.ok()?;
        let s = b.status.as_ref()?;
        (s.phase == Phase::Succeeded && s.progress.as_ref()?.run.contains("retry")).then_some(b)
    })
    .await;
    assert_eq!(
        env.attribute("203", "pbx.role").await.as_deref(),
        Some("Admin")
    );
    let summary = b.status.unwrap().summary.unwrap();
    assert_eq!(
        (summary.targets, summary.changed, summary.conflicts),
        (4, 4, 0)
    );
}

#[tokio::test]
async fn approved_plan_hash_and_max_targets_gate_execution() {
    let env = Env::start(
        "buc-gates",
        LabSpec {
            users: 12,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: sales-roles }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
  fields: { role: { value: Operator, lock: Open } }
  approvedPlanHash: "0000000000000000000000000000000000000000000000000000000000000abc"
"#,
    );
    let b = env.wait_buc("sales-roles", &[Phase::Failed]).await;
    let (_, reason, message) = condition(&b, "Stalled");
    assert_eq!(reason, "PlanHashMismatch", "{message}");
    let real = b
        .status
        .as_ref()
        .unwrap()
        .plan
        .as_ref()
        .unwrap()
        .hash
        .clone();
    assert!(
        message.contains(&real),
        "the message names the current hash: {message}"
    );
    assert_eq!(
        env.attribute("203", "pbx.role").await.as_deref(),
        Some("User"),
        "nothing was written"
    );

    patch_spec(
        &env,
        "sales-roles",
        serde_json::json!({ "approvedPlanHash": real }),
    )
    .await;
    let b = env.wait_buc("sales-roles", &[Phase::Succeeded]).await;
    assert!(b.status.unwrap().summary.unwrap().changed >= 3);
    assert_eq!(
        env.attribute("203", "pbx.role").await.as_deref(),
        Some("Operator")
    );

    // Executing a validated plan is gated the same way: a wrong approval runs nothing of it.
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: support-roles }
spec:
  connectionRef: { name: acme }
  mode: Validate
  targets: { groups: [support] }
  fields: { role: { value: Operator, lock: Open } }
"#,
    );
    env.wait_buc("support-roles", &[Phase::Validated]).await;
    let operators =
        "SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.role' AND value = 'Operator'";
    let before = env.sql_one(operators).await;
    patch_spec(
        &env,
        "support-roles",
        serde_json::json!({
            "mode": "Execute",
            "approvedPlanHash": "0000000000000000000000000000000000000000000000000000000000000abd"
        }),
    )
    .await;
    let b = env.wait_buc("support-roles", &[Phase::Failed]).await;
    let (_, reason, message) = condition(&b, "Stalled");
    assert_eq!(reason, "PlanHashMismatch", "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.sql_one(operators).await,
        before,
        "nothing of the validated plan was written"
    );

    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: too-many }
spec:
  connectionRef: { name: acme }
  targets: { groups: [support], maxTargets: 1 }
  fields: { role: { value: Admin, lock: Open } }
"#,
    );
    let b = env.wait_buc("too-many", &[Phase::Failed]).await;
    let (_, reason, message) = condition(&b, "Stalled");
    assert_eq!(reason, "TooManyTargets");
    assert!(message.contains("Verify your selection"), "{message}");
}

#[tokio::test]
async fn atomic_changes_apply_all_or_nothing() {
    let env = Env::start(
        "buc-atomic",
        LabSpec {
            users: 10,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: atomic }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["205", "206", "207"] }
  fields: { callerIdPolicy: { value: Anonymous, lock: Open } }
  failurePolicy: Atomic
  mode: Validate
"#,
    );
    env.wait_buc("atomic", &[Phase::Validated]).await;
    env.set_attribute("206", "pbx.caller_id_policy", "Custom")
        .await;
    patch_spec(&env, "atomic", serde_json::json!({ "mode": "Execute" })).await;
    let b = env.wait_buc("atomic", &[Phase::Failed]).await;
    let results = b.status.unwrap().results;
    assert!(
        results
            .iter()
            .any(|r| r.target == "206" && r.outcome == Outcome::Conflict)
    );
    assert!(
        results
            .iter()
            .filter(|r| r.outcome == Outcome::Failed)
            .all(|r| r.notes[0].contains("rolled back"))
    );
    assert_eq!(
        env.attribute("205", "pbx.caller_id_policy")
            .await
            .as_deref(),
        Some("Default"),
        "nothing of the batch was written"
    );
    assert_eq!(
        env.attribute("207", "pbx.caller_id_policy")
            .await
            .as_deref(),
        Some("Default")
    );
}

#[tokio::test]
async fn actions_mail_and_secrets() {
    let env = Env::start(
        "buc-actions",
        LabSpec {
            users: 10,
            phones: 0,
            ..Default::default()
        },
        true,
    )
    .await;
    env.set_attribute("201", "pbx.locked", "1").await;
    env.set_attribute("201", "pbx.totp_secret", "JBSWY3DPEHPK3PXP")
        .await;
    let ha1_before = env
        .sql_one("SELECT ha1 FROM subscriber WHERE username = '204'")
        .await;
    env.apply(
        r#"apiVersion: v1
kind: Secret
metadata:
  name: pins
  labels: { pbx-operator.io/usable-by-changes: "true" }
stringData: { pin: "864209" }
---
apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: support-team }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["201", "204"] }
  actions: [ResetTwoFactor, Unlock, ResetPassword]
  fields:
    voicemailPin: { valueFrom: { secretKeyRef: { name: pins, key: pin } }, lock: Open }
  requestedBy: alice@acme.test
---
apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: remove-leavers }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["208", "209"] }
  actions: [Remove]
"#,
    );
    let b = env
        .wait_buc(
            "support-team",
            &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed],
        )
        .await;
    let status = b.status.clone().unwrap();
    assert_eq!(status.phase, Phase::Succeeded, "{:?}", status.results);
    assert_eq!(
        env.attribute("201", "pbx.locked").await.as_deref(),
        Some("0"),
        "unlocked"
    );
    assert_eq!(
        env.attribute("201", "pbx.totp_secret").await,
        None,
        "2FA reset"
    );
    assert_eq!(
        env.attribute("204", "pbx.status").await.as_deref(),
        Some("PasswordRequired")
    );
    let ha1_after = env
        .sql_one("SELECT ha1 FROM subscriber WHERE username = '204'")
        .await;
    assert_ne!(ha1_before, ha1_after, "the SIP secret was rotated");
    assert_eq!(
        env.sql_one("SELECT password FROM subscriber WHERE username = '204'")
            .await,
        "",
        "never plaintext"
    );
    let pin = env.attribute("204", "pbx.voicemail_pin").await.unwrap();
    assert!(
        pin.starts_with("pbkdf2-sha256$") && !pin.contains("864209"),
        "the PIN is stored as a salted slow hash: {pin}"
    );

    // Reset instructions reached each user's mailbox, without any secret.
    let smtp = env.smtp.as_ref().unwrap();
    let mails = eventually(Duration::from_secs(20), "two reset mails", || async {
        let m = smtp.messages();
        (m.len() >= 2).then_some(m)
    })
    .await;
    assert!(
        mails
            .iter()
            .any(|m| m.contains("extension 201") && m.contains("To: ben.diaz@pbx.test")),
        "{mails:?}"
    );
    assert!(mails.iter().all(|m| !m.contains("864209")));

    // The PIN never appears in status, results or events.
    let (_, csv, _) = env.cli(&["results", "buc/support-team", "-n", &env.ns]);
    let everything = format!("{:?}{csv}{}", status, env.events());
    assert!(!everything.contains("864209"), "the secret leaked");
    assert!(
        csv.contains("voicemailPin: (unset) -> (new secret)")
            || csv.contains("voicemailPin: (set) -> (new secret)"),
        "{csv}"
    );
    assert!(
        env.events().contains("alice@acme.test"),
        "events say who asked"
    );

    // Remove skips a user who still owns numbers; 209 (no number in the seed) goes.
    let b = env
        .wait_buc(
            "remove-leavers",
            &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed],
        )
        .await;
    let results = b.status.unwrap().results;
    let r208 = results.iter().find(|r| r.target == "208").unwrap();
    assert_eq!(r208.outcome, Outcome::Skipped);
    assert!(
        r208.notes
            .iter()
            .any(|n| n.contains("owns 1 numbers: reassign them first")),
        "{:?}",
        r208.notes
    );
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM subscriber WHERE username = '209'")
            .await,
        "0"
    );
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM subscriber WHERE username = '208'")
            .await,
        "1"
    );
}

#[tokio::test]
async fn enforce_repairs_drift() {
    let env = Env::start(
        "buc-enforce",
        LabSpec {
            users: 10,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: keep-voice-routes }
spec:
  connectionRef: { name: acme }
  targets: { groups: [engineering] }
  fields: { voiceRoutePolicy: { value: Restricted, lock: Open } }
  policy: Enforce
  interval: 2s
"#,
    );
    env.wait_buc("keep-voice-routes", &[Phase::Succeeded]).await;
    assert_eq!(
        env.attribute("202", "pbx.voice_route_policy")
            .await
            .as_deref(),
        Some("Restricted")
    );
    env.set_attribute("202", "pbx.voice_route_policy", "International")
        .await;
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(
        Duration::from_secs(30),
        "the drift to be corrected",
        || async {
            let b = api.get("keep-voice-routes").await.ok()?;
            (b.status?.corrections? >= 1).then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "202 back to Restricted",
        || async {
            (env.attribute("202", "pbx.voice_route_policy")
                .await
                .as_deref()
                == Some("Restricted"))
            .then_some(())
        },
    )
    .await;
    assert!(env.events().contains("DriftCorrected"));
}

#[tokio::test]
async fn a_number_another_user_holds_is_a_conflict_not_a_silent_move() {
    let env = Env::start(
        "buc-number",
        LabSpec {
            users: 10,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    // 204 has no number; 201 holds +15550100201.
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: steal }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["204"] }
  fields: { primaryNumber: { value: { number: "+15550100201" }, lock: Open } }
"#,
    );
    let b = env
        .wait_buc(
            "steal",
            &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed],
        )
        .await;
    let status = b.status.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    let r = &status.results[0];
    assert_eq!(r.outcome, Outcome::Conflict);
    assert!(
        r.notes[0]
            .contains("primaryNumber +15550100201 is held by 201, which the plan did not expect"),
        "{:?}",
        r.notes
    );
    assert_eq!(
        env.sql_one("SELECT username FROM dbaliases WHERE alias_username = '+15550100201'")
            .await,
        "201",
        "nothing moved"
    );
}
