//! Undo: a finished BulkUserChange reverted from what it recorded (spec.revertOf), against the
//! real control plane, the operator process and a real Kamailio.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use pbx_operator::api::{BulkPhoneChange, BulkUserChange, Outcome, Phase};
use support::lab::LabSpec;
use support::pbx::Env;

const DONE: &[Phase] = &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed];

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

async fn roles(env: &Env, extensions: &[&str]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for e in extensions {
        out.push(env.attribute(e, "pbx.role").await);
    }
    out
}

#[tokio::test]
async fn a_role_update_reverted_puts_every_role_back_and_a_role_changed_since_is_a_conflict() {
    let env = Env::start(
        "undo-roles",
        LabSpec {
            users: 10,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let targets = ["201", "202", "203", "204", "205", "206"];
    let before = roles(&env, &targets).await;
    // Users the change will promote (the seed may have made some Operator already).
    let promoted_n = before
        .iter()
        .filter(|r| r.as_deref() != Some("Operator"))
        .count() as u32;
    assert_eq!(before[2].as_deref(), Some("User"), "203 is promoted");
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: promote }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["201", "202", "203", "204", "205", "206"] }
  fields: { role: { value: Operator, lock: Open } }
"#,
    );
    let b = env.wait_buc("promote", DONE).await;
    assert_eq!(b.status.as_ref().unwrap().phase, Phase::Succeeded);
    let promoted = roles(&env, &targets).await;
    assert!(promoted.iter().all(|r| r.as_deref() == Some("Operator")));
    // Somebody changes 203 in the console after the change.
    env.set_attribute("203", "pbx.role", "Admin").await;

    // The CLI prints the revert for a GitOps commit, and creates it with --apply.
    let (ok, yaml, err) = env.cli(&["revert", "bulkuserchange/promote", "-n", &env.ns]);
    assert!(ok, "{err}");
    assert!(
        yaml.contains("revertOf:") && yaml.contains("name: promote"),
        "{yaml}"
    );
    assert!(
        yaml.contains("name: promote-revert") && yaml.contains("mode: Validate"),
        "{yaml}"
    );
    assert!(!yaml.contains("targets"), "{yaml}");
    let (ok, _, err) = env.cli(&["revert", "bulkuserchange/promote", "-n", &env.ns, "--apply"]);
    assert!(ok, "{err}");
    let b = env.wait_buc("promote-revert", &[Phase::Validated]).await;
    let plan = b.status.as_ref().unwrap().plan.clone().unwrap();
    assert_eq!(
        plan.targets, promoted_n,
        "every target the change wrote: {before:?}"
    );
    assert_eq!(
        plan.changes,
        promoted_n - 1,
        "203 moved since: not planned as a write"
    );
    assert_eq!(
        roles(&env, &targets).await[0].as_deref(),
        Some("Operator"),
        "Validate writes nothing"
    );
    let (ok, csv, err) = env.cli(&["results", "bulkuserchange/promote-revert", "-n", &env.ns]);
    assert!(ok, "{err}");
    assert_eq!(
        csv.matches(",Planned,").count() as u32,
        promoted_n - 1,
        "{csv}"
    );

    // Execute exactly the reviewed plan.
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    api.patch(
        "promote-revert",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({
            "spec": { "mode": "Execute", "approvedPlanHash": plan.hash }
        })),
    )
    .await
    .unwrap();
    let b = env.wait_buc("promote-revert", DONE).await;
    let status = b.status.clone().unwrap();
    assert_eq!(status.phase, Phase::PartiallyFailed, "{:?}", status.results);
    let s = status.summary.clone().unwrap();
    assert_eq!(
        (s.targets, s.changed, s.conflicts),
        (promoted_n, promoted_n - 1, 1)
    );
    let r203 = status.results.iter().find(|r| r.target == "203").unwrap();
    assert_eq!(r203.outcome, Outcome::Conflict);
    let note = r203.notes.join("; ");
    assert!(
        note.contains("Admin") && note.contains("Operator"),
        "the conflict names both values: {note}"
    );
    let after = roles(&env, &targets).await;
    for (i, e) in targets.iter().enumerate() {
        if *e == "203" {
            assert_eq!(
                after[i].as_deref(),
                Some("Admin"),
                "a conflict is left alone"
            );
        } else {
            assert_eq!(after[i], before[i], "{e}: its role is back");
        }
    }
    assert!(env.events().contains("Finished"), "{}", env.events());

    // A revert of the revert restores the original's result (203 was not reverted: untouched).
    // 201 is changed again first: a Conflict; put back as the revert left it, the retry
    // annotation reverts exactly it.
    env.set_attribute("201", "pbx.role", "Admin").await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: promote-again }
spec:
  connectionRef: { name: acme }
  revertOf: { name: promote-revert }
"#,
    );
    let b = env.wait_buc("promote-again", DONE).await;
    let s = b.status.clone().unwrap();
    assert_eq!(s.phase, Phase::PartiallyFailed, "{:?}", s.results);
    let summary = s.summary.unwrap();
    assert_eq!((summary.changed, summary.conflicts), (promoted_n - 2, 1));
    env.set_attribute("201", "pbx.role", before[0].as_deref().unwrap())
        .await;
    api.patch(
        "promote-again",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({
            "metadata": { "annotations": { "pbx-operator.io/retry": "1" } }
        })),
    )
    .await
    .unwrap();
    let b = support::eventually(Duration::from_secs(60), "the retry to succeed", || async {
        let b = api.get("promote-again").await.ok()?;
        let s = b.status.as_ref()?;
        (s.phase == Phase::Succeeded && s.progress.as_ref()?.run.contains("retry")).then_some(b)
    })
    .await;
    let s = b.status.clone().unwrap();
    assert_eq!(s.summary.unwrap().changed, promoted_n - 1);
    let again = roles(&env, &targets).await;
    for (i, e) in targets.iter().enumerate() {
        let want = if *e == "203" {
            Some("Admin")
        } else {
            Some("Operator")
        };
        assert_eq!(again[i].as_deref(), want, "{e}");
    }

    // A change whose results are gone cannot be reverted: a clear condition, nothing written.
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    cms.delete("promote-again-results-1", &DeleteParams::default())
        .await
        .unwrap();
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: undo-lost }
spec:
  connectionRef: { name: acme }
  revertOf: { name: promote-again }
"#,
    );
    let b = support::eventually(Duration::from_secs(60), "RevertUnavailable", || async {
        let b = api.get("undo-lost").await.ok()?;
        let c = b
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Stalled")?;
        (c.reason == "RevertUnavailable").then_some(b.clone())
    })
    .await;
    let (_, _, message) = condition(&b, "Stalled");
    assert!(
        message.contains("promote-again-results-1") && message.contains("nothing was changed"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(roles(&env, &targets).await, again, "nothing was written");

    // The API server refuses a revert with anything beside it.
    let (ok, _, err) = support::try_kubectl(
        &support::control_plane().admin_kubeconfig,
        &["apply", "-n", &env.ns, "-f", "-"],
        br#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: undo-and-more }
spec:
  connectionRef: { name: acme }
  revertOf: { name: promote }
  targets: { extensions: ["201"] }
"#,
    );
    assert!(
        !ok && err.contains("spec.revertOf plans from what the reverted change recorded"),
        "{err}"
    );
}

const CALL_GROUPS: &str = "SELECT username, value FROM usr_preferences WHERE attribute = 'pbx.call_group' ORDER BY username";
const CALL_GROUP_9: &str =
    "SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '9'";

async fn call_groups(env: &Env) -> Vec<(String, String)> {
    use sqlx::Row;
    sqlx::query(sqlx::AssertSqlSafe(CALL_GROUPS))
        .fetch_all(&env.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
        .collect()
}

#[tokio::test]
async fn sigkill_during_a_revert_reverts_each_target_once() {
    // 8 batches of 1000 users: two kills land after 0 and 1 more recorded batches at the
    // earliest. A revert runs a batch in a few hundred milliseconds, so fewer batches (3 were
    // tried) can finish before the second kill on a loaded machine.
    const USERS: usize = 8000;
    const KILLS: usize = 2;
    let mut env = Env::start(
        "undo-crash",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let before = call_groups(&env).await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: everyone }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  fields: { callGroup: { value: "9", lock: Open } }
"#,
    );
    let b = env
        .wait_buc_for("everyone", DONE, Duration::from_secs(300))
        .await;
    let s = b.status.unwrap();
    assert_eq!(s.phase, Phase::Succeeded);
    let changed = s.summary.unwrap().changed as usize;
    assert!(changed > USERS * 2 / 3, "{changed} users changed");
    let started = Instant::now();
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: everyone-revert }
spec:
  connectionRef: { name: acme }
  revertOf: { name: everyone }
"#,
    );
    env.kill_mid_run_every_time(
        "everyone-revert",
        KILLS,
        Duration::from_millis(700),
        CALL_GROUP_9,
    )
    .await;
    let b = env
        .wait_buc_for("everyone-revert", DONE, Duration::from_secs(300))
        .await;
    eprintln!(
        "reverted {changed} users in {:?} with {KILLS} kills",
        started.elapsed()
    );
    let s = b.status.clone().unwrap();
    assert_eq!(s.phase, Phase::Succeeded, "{:?}", s.results.first());
    let summary = s.summary.unwrap();
    assert_eq!(
        (summary.changed as usize, summary.failed, summary.conflicts),
        (changed, 0, 0)
    );
    let (ok, csv, err) = env.cli(&["results", "bulkuserchange/everyone-revert", "-n", &env.ns]);
    assert!(ok, "{err}");
    let targets: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    let unique: BTreeSet<&str> = targets.iter().copied().collect();
    assert_eq!(
        targets.len(),
        changed,
        "every target is reported exactly once"
    );
    assert_eq!(unique.len(), changed);
    assert_eq!(call_groups(&env).await, before, "every call group is back");
}

const PHONES: &str = "SELECT id, model, COALESCE(label, '') FROM pbx_phone ORDER BY id";

async fn phones(env: &Env) -> Vec<(i64, String, String)> {
    use sqlx::Row;
    sqlx::query(sqlx::AssertSqlSafe(PHONES))
        .fetch_all(&env.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.get::<i64, _>(0),
                r.get::<String, _>(1),
                r.get::<String, _>(2),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_phone_change_reverted_restores_models_and_labels_and_a_phone_changed_since_is_a_conflict()
 {
    let env = Env::start(
        "undo-phones",
        LabSpec {
            db: "sqlite",
            users: 10,
            phones: 10,
            ..Default::default()
        },
        false,
    )
    .await;
    let before = phones(&env).await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkPhoneChange
metadata: { name: yealinks }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering], vendors: [Yealink] }
  fields:
    model: { value: SIP-T54W, lock: Open }
    label: { value: "3rd floor", lock: Open }
"#,
    );
    let api: Api<BulkPhoneChange> = Api::namespaced(env.client.clone(), &env.ns);
    let settled = |name: &'static str| {
        let api = api.clone();
        async move {
            support::eventually(Duration::from_secs(60), name, || async {
                let b = api.get(name).await.ok()?;
                let s = b.status.as_ref()?;
                (s.observed_generation == b.metadata.generation && DONE.contains(&s.phase))
                    .then_some(b)
            })
            .await
        }
    };
    let b = settled("yealinks").await;
    let s = b.status.unwrap();
    assert_eq!(s.phase, Phase::Succeeded, "{:?}", s.results);
    let changed = s.summary.unwrap().changed;
    assert!(changed >= 2, "{changed} phones changed");
    // One of them is relabelled by hand afterwards.
    let moved: i64 = env
        .sql_one("SELECT MIN(id) FROM pbx_phone WHERE label = '3rd floor'")
        .await
        .parse()
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE pbx_phone SET label = 'kitchen' WHERE id = {moved}"
    )))
    .execute(&env.pool)
    .await
    .unwrap();
    let (ok, _, err) = env.cli(&[
        "revert",
        "bulkphonechange/yealinks",
        "-n",
        &env.ns,
        "--apply",
        "--execute",
    ]);
    assert!(ok, "{err}");
    let b = settled("yealinks-revert").await;
    let s = b.status.unwrap();
    assert_eq!(s.phase, Phase::PartiallyFailed, "{:?}", s.results);
    let summary = s.summary.unwrap();
    assert_eq!(
        (summary.targets, summary.changed, summary.conflicts),
        (changed, changed - 1, 1)
    );
    let conflict = s
        .results
        .iter()
        .find(|r| r.outcome == Outcome::Conflict)
        .unwrap();
    let note = conflict.notes.join("; ");
    assert!(
        note.contains("kitchen") && note.contains("3rd floor"),
        "{note}"
    );
    let after = phones(&env).await;
    for (b, a) in before.iter().zip(&after) {
        if a.0 == moved {
            assert_eq!(
                (a.1.as_str(), a.2.as_str()),
                ("SIP-T54W", "kitchen"),
                "a conflict is left alone"
            );
        } else {
            assert_eq!(a, b, "model and label back");
        }
    }
}

async fn exec(env: &Env, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&env.pool)
        .await
        .unwrap();
}

/// Users the lab seeds without a number (Remove refuses users who own one): every fifth.
fn numberless(users: usize) -> Vec<String> {
    (0..users)
        .filter(|i| i % 5 == 4)
        .map(|i| (200 + i).to_string())
        .collect()
}

#[tokio::test]
async fn a_remove_of_50_users_reverted_brings_each_back_but_its_secret_and_names_what_others_took()
{
    use support::lab::user_rows;
    let env = Env::start(
        "undo-remove",
        LabSpec {
            users: 250,
            phones: 30,
            ..Default::default()
        },
        false,
    )
    .await;
    let leavers = numberless(250);
    assert_eq!(leavers.len(), 50);
    let mut before = std::collections::BTreeMap::new();
    for e in &leavers {
        before.insert(e.clone(), user_rows(&env.pool, e).await);
    }
    // Some have a private number, some a phone: all of it comes back.
    assert!(
        before["219"]
            .iter()
            .any(|r| r.contains("pbx.private_number"))
    );
    assert!(before["224"].iter().any(|r| r.starts_with("pbx_phone")));
    let list = leavers.join("\", \"");
    env.apply(&format!(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: {{ name: leavers }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ extensions: ["{list}"] }}
  fields: {{ callGroup: {{ value: "9", lock: Open }} }}
  actions: [Remove]
"#
    ));
    let b = env.wait_buc("leavers", DONE).await;
    let s = b.status.unwrap();
    assert_eq!(s.phase, Phase::Succeeded, "{:?}", s.results);
    assert_eq!(s.summary.unwrap().changed, 50);
    let left = env
        .sql_one(&format!(
            "SELECT COUNT(*) FROM subscriber WHERE username IN ('{}')",
            leavers.join("', '")
        ))
        .await;
    assert_eq!(left, "0", "all 50 removed");
    let kept = env
        .sql_one("SELECT COUNT(*) FROM pbx_snapshot WHERE data IS NOT NULL")
        .await;
    assert_eq!(kept, "50", "one snapshot per removed user");
    let data = env
        .sql_one("SELECT data FROM pbx_snapshot WHERE username = '204'")
        .await;
    assert!(
        !data.contains("ha1") && !data.contains("voicemail_pin"),
        "{data}"
    );
    assert!(
        data.contains(r#""value":"9""#),
        "kept after the change's write: {data}"
    );

    // Meanwhile: 219's private number goes to 200, 224's phone to 201, and extension 229 is
    // created again for somebody else.
    env.set_attribute("200", "pbx.private_number", "+15550200219")
        .await;
    exec(
        &env,
        "UPDATE pbx_phone SET owner_username = '201' WHERE label = 'Desk 224'",
    )
    .await;
    exec(
        &env,
        &format!(
            "INSERT INTO subscriber (username, domain, password, ha1, ha1b) VALUES ('229', '{}', '', '', '')",
            env.lab.domain()
        ),
    )
    .await;

    let (ok, _, err) = env.cli(&["revert", "buc/leavers", "-n", &env.ns, "--apply"]);
    assert!(ok, "{err}");
    let b = env.wait_buc("leavers-revert", &[Phase::Validated]).await;
    let plan = b.status.as_ref().unwrap().plan.clone().unwrap();
    assert_eq!(
        (plan.targets, plan.changes),
        (50, 49),
        "229 exists again: not planned"
    );
    let (ok, csv, err) = env.cli(&["results", "buc/leavers-revert", "-n", &env.ns]);
    assert!(ok, "{err}");
    let line = csv.lines().find(|l| l.starts_with("219,")).unwrap();
    assert!(
        line.contains("+15550200219 is 200's now"),
        "the plan names it: {line}"
    );
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM subscriber WHERE username = '204'")
            .await,
        "0",
        "Validate restores nothing"
    );

    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    api.patch(
        "leavers-revert",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({
            "spec": { "mode": "Execute", "approvedPlanHash": plan.hash }
        })),
    )
    .await
    .unwrap();
    let b = env.wait_buc("leavers-revert", DONE).await;
    let status = b.status.clone().unwrap();
    assert_eq!(status.phase, Phase::PartiallyFailed, "{:?}", status.results);
    let s = status.summary.clone().unwrap();
    assert_eq!((s.changed, s.conflicts), (47, 3), "{:?}", status.results);
    let note = |ext: &str| {
        let r = status.results.iter().find(|r| r.target == ext).unwrap();
        assert_eq!(r.outcome, Outcome::Conflict, "{ext}: {r:?}");
        r.notes.join("; ")
    };
    assert!(
        note("219").contains("+15550200219") && note("219").contains("200"),
        "{}",
        note("219")
    );
    assert!(note("224").contains("201"), "{}", note("224"));
    assert!(note("229").contains("exists again"), "{}", note("229"));
    for e in &leavers {
        let now = user_rows(&env.pool, e).await;
        let want: Vec<String> = match e.as_str() {
            "229" => continue,
            "219" => before[e]
                .iter()
                .filter(|r| !r.contains("private_number"))
                .cloned()
                .collect(),
            "224" => before[e]
                .iter()
                .filter(|r| !r.starts_with("pbx_phone"))
                .cloned()
                .collect(),
            _ => before[e].clone(),
        };
        assert_eq!(now, want, "{e}: every row back but its secret and status");
        assert_eq!(
            env.attribute(e, "pbx.status").await.as_deref(),
            Some("PasswordRequired"),
            "{e}"
        );
    }
    assert_eq!(
        env.attribute("200", "pbx.private_number").await.as_deref(),
        Some("+15550200219"),
        "a number taken since stays with its new holder"
    );

    // Snapshots expire after the connection's retention: their data is deleted, and a revert
    // of a user whose snapshot expired fails with a note saying so.
    exec(&env, "DELETE FROM subscriber WHERE username = '229'").await;
    let conns: Api<pbx_operator::api::PbxConnection> = Api::namespaced(env.client.clone(), &env.ns);
    conns
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "spec": { "snapshots": { "retention": "1s" } } })),
        )
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(60),
        "the snapshots to expire",
        || async {
            let left = env
                .sql_one("SELECT COUNT(*) FROM pbx_snapshot WHERE data IS NOT NULL")
                .await;
            (left == "0").then_some(())
        },
    )
    .await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: leavers-late }
spec:
  connectionRef: { name: acme }
  revertOf: { name: leavers }
  mode: Validate
"#,
    );
    let b = env.wait_buc("leavers-late", &[Phase::Validated]).await;
    let plan = b.status.as_ref().unwrap().plan.clone().unwrap();
    assert_eq!(plan.changes, 0, "nothing can be restored any more");
    let (ok, csv, err) = env.cli(&["results", "buc/leavers-late", "-n", &env.ns]);
    assert!(ok, "{err}");
    let line = csv.lines().find(|l| l.starts_with("229,")).unwrap();
    assert!(
        line.contains("Failed") && line.contains("expired"),
        "{line}"
    );
}

#[tokio::test]
async fn a_user_recycle_reverted_brings_the_earlier_identity_back_and_the_secret_stays_rotated() {
    use pbx_operator::api::UserRecycle;
    use support::lab::user_rows;
    let env = Env::start(
        "undo-recycle",
        LabSpec {
            users: 10,
            phones: 5,
            ..Default::default()
        },
        false,
    )
    .await;
    let targets = ["202", "203"];
    let mut before = Vec::new();
    for e in targets {
        before.push(user_rows(&env.pool, e).await);
    }
    assert!(before[0].iter().any(|r| r.starts_with("dbaliases")));
    assert!(before[0].iter().any(|r| r.starts_with("pbx_phone")));
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: UserRecycle
metadata: { name: hire }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["202", "203"] }
  reset: [Name, Email, Password, VoicemailPin, Devices, Role, Groups, Numbers, CallGroup, PickupGroup]
  recycle:
    - { extension: "202", firstName: Dana, lastName: Scully, email: dana.scully@pbx.test }
"#,
    );
    let api: Api<UserRecycle> = Api::namespaced(env.client.clone(), &env.ns);
    let wait = |name: &'static str| {
        let api = api.clone();
        async move {
            support::eventually(Duration::from_secs(90), name, || async {
                let u = api.get(name).await.ok()?;
                let s = u.status.as_ref()?;
                DONE.contains(&s.phase).then_some(u)
            })
            .await
        }
    };
    let u = wait("hire").await;
    assert_eq!(u.status.unwrap().phase, Phase::Succeeded);
    assert_eq!(
        env.attribute("202", "pbx.first_name").await.as_deref(),
        Some("Dana")
    );
    let ha1 = |ext: &'static str| {
        env.sql_one_owned(format!(
            "SELECT ha1 FROM subscriber WHERE username = '{ext}'"
        ))
    };
    let rotated = ha1("202").await;

    // The CLI prints the revert; creating it asks for --execute (a UserRecycle runs at once).
    let (ok, yaml, err) = env.cli(&["revert", "urc/hire", "-n", &env.ns]);
    assert!(ok, "{err}");
    assert!(
        yaml.contains("kind: UserRecycle") && yaml.contains("revertOf:"),
        "{yaml}"
    );
    assert!(
        !yaml.contains("reset") && !yaml.contains("targets"),
        "{yaml}"
    );
    let (ok, _, err) = env.cli(&["revert", "urc/hire", "-n", &env.ns, "--apply"]);
    assert!(!ok && err.contains("--execute"), "{err}");
    let (ok, _, err) = env.cli(&["revert", "urc/hire", "-n", &env.ns, "--apply", "--execute"]);
    assert!(ok, "{err}");
    let u = wait("hire-revert").await;
    let s = u.status.clone().unwrap();
    assert_eq!(s.phase, Phase::Succeeded, "{:?}", s.results);
    assert_eq!(s.summary.unwrap().changed, 2);
    for (i, e) in targets.iter().enumerate() {
        assert_eq!(
            user_rows(&env.pool, e).await,
            before[i],
            "{e}: the earlier identity is back"
        );
        assert_eq!(
            env.attribute(e, "pbx.status").await.as_deref(),
            Some("PasswordRequired"),
            "{e}"
        );
    }
    assert_eq!(
        ha1("202").await,
        rotated,
        "the secret stays the rotated one"
    );

    // The API server refuses a revert with a new person beside it.
    let (ok, _, err) = support::try_kubectl(
        &support::control_plane().admin_kubeconfig,
        &["apply", "-n", &env.ns, "-f", "-"],
        br#"apiVersion: pbx-operator.io/v1alpha1
kind: UserRecycle
metadata: { name: undo-and-more }
spec:
  connectionRef: { name: acme }
  revertOf: { name: hire }
  targets: { extensions: ["202"] }
"#,
    );
    assert!(
        !ok && err.contains("spec.revertOf plans from what the reverted UserRecycle recorded"),
        "{err}"
    );
}

const EVERY_USER_ROW: &str = "SELECT username, attribute, value FROM usr_preferences WHERE attribute <> 'pbx.status' UNION ALL SELECT username, 'grp', grp FROM grp ORDER BY 1, 2, 3";

async fn every_user_row(env: &Env) -> Vec<(String, String, String)> {
    use sqlx::Row;
    sqlx::query(sqlx::AssertSqlSafe(EVERY_USER_ROW))
        .fetch_all(&env.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn sigkill_during_a_revert_of_removed_users_restores_each_once() {
    // 5 batches, so each of the two kills lands with work left.
    const USERS: usize = 5000;
    const KILLS: usize = 2;
    let mut env = Env::start(
        "undo-restore-crash",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    // Remove refuses users who own numbers: the seed's numbers go first.
    exec(&env, "DELETE FROM dbaliases").await;
    let before = every_user_row(&env).await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: all-gone }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  actions: [Remove]
"#,
    );
    let b = env
        .wait_buc_for("all-gone", DONE, Duration::from_secs(300))
        .await;
    let s = b.status.unwrap();
    assert_eq!(s.phase, Phase::Succeeded, "{:?}", s.results.first());
    assert_eq!(s.summary.unwrap().changed as usize, USERS);
    assert_eq!(env.sql_one("SELECT COUNT(*) FROM subscriber").await, "0");

    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: all-back }
spec:
  connectionRef: { name: acme }
  revertOf: { name: all-gone }
"#,
    );
    env.kill_mid_run_every_time(
        "all-back",
        KILLS,
        Duration::from_millis(700),
        "SELECT COUNT(*) FROM subscriber",
    )
    .await;
    let b = env
        .wait_buc_for("all-back", DONE, Duration::from_secs(300))
        .await;
    let s = b.status.clone().unwrap();
    // A user restored twice would be refused as existing again: a Conflict.
    assert_eq!(s.phase, Phase::Succeeded, "{:?}", s.results.first());
    let summary = s.summary.unwrap();
    assert_eq!(
        (summary.changed as usize, summary.failed, summary.conflicts),
        (USERS, 0, 0)
    );
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM subscriber").await,
        USERS.to_string()
    );
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM pbx_snapshot WHERE restored_by IS NOT NULL")
            .await,
        USERS.to_string(),
        "each snapshot restored, and recorded as such"
    );
    assert_eq!(
        every_user_row(&env).await,
        before,
        "every user back as it was"
    );
}
