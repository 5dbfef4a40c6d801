//! Side effects are done once or reported: the operator stopped (SIGTERM, SIGKILL) in the middle
//! of resets, mails and removals; a retry that cannot read what was done; a stored plan edited
//! between validation and execution. Real control plane, real Kamailio, real SMTP server.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};
use pbx_operator::api::{BulkUserChange, Phase};
use support::lab::LabSpec;
use support::pbx::Env;
use support::{Operator, control_plane, eventually};

const DONE: &[Phase] = &[Phase::Succeeded, Phase::PartiallyFailed, Phase::Failed];

fn reset_all(name: &str) -> String {
    format!(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: {{ name: {name} }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ groups: [sales, support, engineering] }}
  actions: [ResetPassword]
"#
    )
}

/// Reset mails received so far, by extension.
fn reset_mails(env: &Env) -> BTreeMap<String, u32> {
    let mut counts = BTreeMap::new();
    for m in env.smtp.as_ref().expect("an SMTP server").messages() {
        let Some(rest) = m.split("Your phone password for extension ").nth(1) else {
            continue;
        };
        let ext: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        *counts.entry(ext).or_default() += 1;
    }
    counts
}

/// Each target's outcome, from the full result CSV.
fn outcomes(env: &Env, name: &str) -> Vec<(String, String)> {
    let (ok, csv, err) = env.cli(&["results", &format!("bulkuserchange/{name}"), "-n", &env.ns]);
    assert!(ok, "{err}");
    csv.lines()
        .skip(1)
        .map(|l| {
            let mut cells = l.split(',');
            (
                cells.next().unwrap_or("").to_string(),
                cells.next().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn phase(api: &Api<BulkUserChange>, name: &str) -> Option<Phase> {
    Some(api.get(name).await.ok()?.status?.phase)
}

fn restart(env: &mut Env) {
    env.operator = Operator::start(&control_plane().admin_kubeconfig, &["--namespace", &env.ns]);
}

#[tokio::test]
async fn sigterm_mid_reset_finishes_the_step_in_flight_and_mails_every_user_once() {
    const USERS: usize = 1000;
    let mut env = Env::start(
        "sigterm",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        true,
    )
    .await;
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    env.apply(&reset_all("reset"));
    // A rolling upgrade: SIGTERM while the mails go out.
    eventually(
        Duration::from_secs(120),
        "the first reset mails",
        || async { (!reset_mails(&env).is_empty()).then_some(()) },
    )
    .await;
    let (exit, took) = env.operator.stop_with("TERM", Duration::from_secs(25));
    let mailed_before = reset_mails(&env).len();
    let after = phase(&api, "reset").await;
    eprintln!(
        "SIGTERM: operator exited {exit} after {took:?}; {mailed_before} users mailed; phase {after:?}"
    );
    assert!(exit.success(), "a graceful stop exits 0");
    assert!(
        mailed_before < USERS && after == Some(Phase::Running),
        "the SIGTERM landed in the middle of the run ({mailed_before} of {USERS} mailed, phase {after:?})"
    );
    restart(&mut env);
    let b = env
        .wait_buc_for("reset", DONE, Duration::from_secs(240))
        .await;
    let status = b.status.unwrap();
    let summary = status.summary.unwrap();
    assert_eq!(
        status.phase,
        Phase::Succeeded,
        "{:?}",
        status.results.first()
    );
    assert_eq!(
        (summary.changed as usize, summary.uncertain, summary.failed),
        (USERS, 0, 0),
        "a graceful stop leaves nothing uncertain"
    );
    let mails = eventually(Duration::from_secs(30), "every user mailed", || async {
        let m = reset_mails(&env);
        (m.len() >= USERS).then_some(m)
    })
    .await;
    let twice: Vec<_> = mails.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "users not mailed exactly once: {twice:?}");
    let reported: BTreeSet<String> = outcomes(&env, "reset")
        .into_iter()
        .map(|(t, o)| {
            assert_eq!(o, "Changed", "{t}");
            t
        })
        .collect();
    assert_eq!(reported.len(), USERS, "every user reported once");
    let required = env
        .sql_one("SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.status' AND value = 'PasswordRequired'")
        .await;
    assert_eq!(required, USERS.to_string());
}

#[tokio::test]
async fn sigkills_mid_reset_report_unsent_mails_uncertain_and_a_retry_sends_them() {
    const USERS: usize = 666;
    const KILLS: usize = 7;
    let mut env = Env::start(
        "sigkill-mail",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        true,
    )
    .await;
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    env.apply(&reset_all("reset"));
    let mut kills = Vec::new();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    for _ in 0..KILLS {
        // Each kill waits for new mails, so it lands while they are being sent.
        let before = reset_mails(&env).len();
        eventually(Duration::from_secs(120), "more reset mails", || async {
            (reset_mails(&env).len() > before).then_some(())
        })
        .await;
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis((seed >> 33) % 150)).await;
        let _ = env.operator.child.kill();
        let _ = env.operator.child.wait();
        let mailed = reset_mails(&env).len();
        let at = phase(&api, "reset").await;
        assert_eq!(
            at,
            Some(Phase::Running),
            "kill {} landed after the run ended ({mailed} mailed)",
            kills.len() + 1
        );
        kills.push(mailed);
        restart(&mut env);
    }
    eprintln!(
        "SIGKILLed the operator {} times, with {kills:?} users mailed",
        kills.len()
    );
    assert_eq!(kills.len(), KILLS, "every kill landed mid-run");
    let b = env
        .wait_buc_for("reset", DONE, Duration::from_secs(240))
        .await;
    let status = b.status.unwrap();
    let summary = status.summary.unwrap();
    let results = outcomes(&env, "reset");
    assert_eq!(results.len(), USERS, "every user reported once");
    let uncertain: BTreeSet<String> = results
        .iter()
        .filter(|(_, o)| o == "Uncertain")
        .map(|(t, _)| t.clone())
        .collect();
    let mails = reset_mails(&env);
    for (target, outcome) in &results {
        let n = mails.get(target).copied().unwrap_or(0);
        if outcome == "Uncertain" {
            assert!(n <= 1, "{target} mailed {n} times");
        } else {
            assert_eq!(
                (outcome.as_str(), n),
                ("Changed", 1),
                "{target}: mailed once, or reported uncertain"
            );
        }
    }
    assert_eq!(summary.uncertain as usize, uncertain.len());
    assert!(
        uncertain.len() <= KILLS * pbx_operator::engine::outbox::MAIL_FLIGHT,
        "only the mails in flight at a kill are uncertain: {}",
        uncertain.len()
    );
    if !uncertain.is_empty() {
        assert_eq!(status.phase, Phase::PartiallyFailed);
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert!(ready.message.contains("uncertain"), "{}", ready.message);
    }
    // The retry sends exactly the uncertain mails again and resets nobody again.
    let ha1_before = env
        .sql_one("SELECT md5(string_agg(ha1, ',' ORDER BY username)) FROM subscriber")
        .await;
    let patch = serde_json::json!({"metadata": {"annotations": {"pbx-operator.io/retry": "1"}}});
    api.patch("reset", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let b = eventually(Duration::from_secs(120), "the retry to finish", || async {
        let b = api.get("reset").await.ok()?;
        let s = b.status.as_ref()?;
        let retried = s.progress.as_ref()?.run.contains("retry");
        (retried && DONE.contains(&s.phase)).then_some(b)
    })
    .await;
    let status = b.status.unwrap();
    assert_eq!(
        status.phase,
        Phase::Succeeded,
        "{:?}",
        status.results.first()
    );
    let mails = reset_mails(&env);
    let doubled: Vec<&String> = mails
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(t, _)| t)
        .collect();
    eprintln!(
        "{} uncertain after {KILLS} kills; after the retry {} users mailed, {} of the uncertain twice",
        uncertain.len(),
        mails.len(),
        doubled.len()
    );
    assert_eq!(mails.len(), USERS, "after the retry every user was mailed");
    assert!(
        doubled.iter().all(|t| uncertain.contains(*t)) && mails.values().all(|n| *n <= 2),
        "only a mail reported uncertain can have gone out twice: {doubled:?}"
    );
    let ha1_after = env
        .sql_one("SELECT md5(string_agg(ha1, ',' ORDER BY username)) FROM subscriber")
        .await;
    assert_eq!(ha1_before, ha1_after, "the retry reset no password again");
}

#[tokio::test]
async fn sigkill_mid_remove_resumes_without_panic_and_removes_each_user_once() {
    const USERS: usize = 500;
    let mut env = Env::start(
        "remove-crash",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    // Owners of numbers are refused by Remove; these users own none.
    sqlx::query("DELETE FROM dbaliases")
        .execute(&env.pool)
        .await
        .unwrap();
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: leavers }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  actions: [Remove]
"#,
    );
    let mut logs = Vec::new();
    let mut kills = Vec::new();
    let started = Instant::now();
    let mut last = USERS;
    while kills.len() < 3 && started.elapsed() < Duration::from_secs(120) {
        let left: usize = env
            .sql_one("SELECT COUNT(*) FROM subscriber")
            .await
            .parse()
            .unwrap();
        if left == 0
            || phase(&api, "leavers")
                .await
                .is_some_and(|p| DONE.contains(&p))
        {
            break;
        }
        if left < last {
            // Some users of the batch are removed, others not yet: kill now.
            logs.push(env.operator.log.clone());
            let _ = env.operator.child.kill();
            let _ = env.operator.child.wait();
            kills.push(left);
            last = left;
            restart(&mut env);
            continue;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("SIGKILLed the operator with {kills:?} of {USERS} users left");
    assert!(
        kills.iter().any(|&left| left > 0 && left < USERS),
        "at least one kill landed in the middle of the removals: {kills:?}"
    );
    let b = env
        .wait_buc_for("leavers", DONE, Duration::from_secs(120))
        .await;
    let status = b.status.unwrap();
    assert_eq!(
        status.phase,
        Phase::Succeeded,
        "{:?}",
        status.results.first()
    );
    let summary = status.summary.unwrap();
    assert_eq!((summary.changed as usize, summary.failed), (USERS, 0));
    let results = outcomes(&env, "leavers");
    let unique: BTreeSet<&String> = results.iter().map(|(t, _)| t).collect();
    assert_eq!(
        (results.len(), unique.len()),
        (USERS, USERS),
        "each user reported once"
    );
    assert!(results.iter().all(|(_, o)| o == "Changed"));
    assert_eq!(env.sql_one("SELECT COUNT(*) FROM subscriber").await, "0");
    logs.push(env.operator.log.clone());
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!text.contains("panicked"), "the operator panicked:\n{text}");
    }
}

#[tokio::test]
async fn a_retry_that_cannot_read_earlier_results_stops_and_deletes_nothing() {
    const USERS: usize = 1500;
    let env = Env::start(
        "retry-lost",
        LabSpec {
            db: "postgres",
            users: USERS,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    // No SMTP on the connection: every welcome mail fails, so there is something to retry.
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: welcome }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  fields:
    callGroup: { value: "4", lock: Open }
  actions: [SendWelcomeEmail]
"#,
    );
    let b = env.wait_buc("welcome", DONE).await;
    let before = b.status.unwrap();
    assert_eq!(before.phase, Phase::Failed);
    assert_eq!(before.results_refs.len(), 2, "{:?}", before.results_refs);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    cms.delete("welcome-results-1", &Default::default())
        .await
        .unwrap();
    // A retry reads a batch whose ConfigMap is gone from the run ledger's copy: gone there too.
    let removed = sqlx::query("DELETE FROM pbx_ledger_batch WHERE idx = 0")
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(removed.rows_affected(), 1);
    let call_groups =
        "SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '4'";
    let written = env.sql_one(call_groups).await;
    let patch = serde_json::json!({"metadata": {"annotations": {"pbx-operator.io/retry": "1"}}});
    api.patch("welcome", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let stalled = eventually(
        Duration::from_secs(60),
        "Stalled because results are lost",
        || async {
            let s = api.get("welcome").await.ok()?.status?;
            s.conditions
                .into_iter()
                .find(|c| c.type_ == "Stalled" && c.status == "True" && c.reason == "ResultsLost")
        },
    )
    .await;
    assert!(
        stalled.message.contains("welcome-results-1"),
        "{}",
        stalled.message
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        cms.get_opt("welcome-results-2").await.unwrap().is_some(),
        "the other results were not pruned"
    );
    let after = api.get("welcome").await.unwrap().status.unwrap();
    assert_eq!(
        after.summary, before.summary,
        "the recorded outcome is kept"
    );
    assert_eq!(after.results_refs, before.results_refs);
    assert_eq!(
        env.sql_one(call_groups).await,
        written,
        "nothing changed on the PBX"
    );
}

#[tokio::test]
async fn an_edited_stored_plan_is_refused_and_nothing_runs() {
    let env = Env::start(
        "tamper",
        LabSpec {
            db: "sqlite",
            users: 10,
            phones: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let api: Api<BulkUserChange> = Api::namespaced(env.client.clone(), &env.ns);
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: BulkUserChange
metadata: { name: reviewed }
spec:
  connectionRef: { name: acme }
  mode: Validate
  targets: { extensions: ["201", "202", "203"] }
  fields:
    callGroup: { value: "7", lock: Open }
"#,
    );
    env.wait_buc("reviewed", &[Phase::Validated]).await;
    // Someone who may edit ConfigMaps but not execute adds an action and a target to the plan.
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let cm = cms.get("reviewed-results-1").await.unwrap();
    let rows = support::results_rows(&cm);
    let mut lines: Vec<serde_json::Value> = rows
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines[0]["actions"] = serde_json::json!(["Remove"]);
    let from = env.attribute("205", "pbx.call_group").await;
    let mut extra = lines[1].clone();
    extra["target"] = "205".into();
    extra["writes"] = serde_json::json!([{"field": "callGroup", "from": from, "to": "7"}]);
    lines.push(extra);
    let edited: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let patch = serde_json::json!({"binaryData": {"rows.jsonl.gz": support::gzip_base64(&edited)}});
    cms.patch(
        "reviewed-results-1",
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .unwrap();
    let before: Vec<Option<String>> = {
        let mut v = Vec::new();
        for ext in ["201", "202", "203", "205"] {
            v.push(env.attribute(ext, "pbx.call_group").await);
        }
        v
    };
    let patch = serde_json::json!({"spec": {"mode": "Execute"}});
    api.patch("reviewed", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let b = env
        .wait_buc("reviewed", &[Phase::Failed, Phase::Succeeded])
        .await;
    let status = b.status.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    let stalled = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled" && c.status == "True")
        .expect("Stalled");
    assert_eq!(stalled.reason, "PlanTampered", "{}", stalled.message);
    assert!(stalled.message.contains("reviewed-results-1"));
    let mut after = Vec::new();
    for ext in ["201", "202", "203", "205"] {
        after.push(env.attribute(ext, "pbx.call_group").await);
    }
    assert_eq!(before, after, "nothing of the edited plan ran");
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM subscriber WHERE username = '201'")
            .await,
        "1",
        "201 was not removed"
    );
}
