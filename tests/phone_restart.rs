//! PhoneRestart against the real control plane, Kamailio and SIPp phones that count NOTIFYs.

mod support;

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use pbx_operator::api::{Outcome, PbxConnection, Phase, PhoneRestart};
use support::lab::LabSpec;
use support::pbx::Env;
use support::{control_plane, eventually};

async fn finished(env: &Env, name: &str, timeout: Duration) -> PhoneRestart {
    let api: Api<PhoneRestart> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(timeout, &format!("{name} to finish"), || async {
        let p = api.get(name).await.ok()?;
        matches!(
            p.status.as_ref()?.phase,
            Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed | Phase::Expired
        )
        .then_some(p)
    })
    .await
}

fn outcome_of(p: &PhoneRestart, ext: &str) -> Outcome {
    let s = p.status.as_ref().unwrap();
    s.results
        .iter()
        .find(|r| r.target.starts_with(&format!("{ext}/")))
        .unwrap_or_else(|| panic!("no result for {ext}: {:?}", s.results))
        .outcome
}

#[tokio::test]
async fn restart_now_confirms_each_registered_phone() {
    let env = Env::start(
        "prs-now",
        LabSpec {
            db: "sqlite",
            users: 12,
            phones: 6,
            silent: 1,
            no_reboot: 1,
        },
        false,
    )
    .await;
    let reboot = env.lab.list("LAB_PHONES_REBOOT");
    let silent = env.lab.list("LAB_PHONES_SILENT");
    let no_reboot = env.lab.list("LAB_PHONES_NO_REBOOT");
    // One provisioned phone is offline: unregister it first.
    let offline = reboot[5].clone();
    env.lab.rpc(&[
        "ul.rm",
        "location",
        &format!("{offline}@{}", env.lab.domain()),
    ]);
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: { name: everyone-now }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  rollout: { maxInFlight: 4, perSecond: 20 }
  confirm: { timeout: 8s }
"#,
    );
    let p = finished(&env, "everyone-now", Duration::from_secs(90)).await;
    let s = p.status.clone().unwrap();
    for ext in &reboot[..5] {
        assert_eq!(
            outcome_of(&p, ext),
            Outcome::Restarted,
            "{ext}: {:?}",
            s.results
        );
    }
    assert_eq!(outcome_of(&p, &offline), Outcome::NotRegistered);
    assert_eq!(outcome_of(&p, &silent[0]), Outcome::Failed);
    let silent_notes = &s
        .results
        .iter()
        .find(|r| r.target.starts_with(&format!("{}/", silent[0])))
        .unwrap()
        .notes;
    assert!(
        silent_notes.iter().any(|n| n.contains("408")),
        "{silent_notes:?}"
    );
    assert_eq!(outcome_of(&p, &no_reboot[0]), Outcome::Accepted);
    let summary = s.summary.unwrap();
    assert_eq!(
        (
            summary.targets,
            summary.restarted,
            summary.accepted,
            summary.not_registered,
            summary.failed
        ),
        (8, 5, 1, 1, 1)
    );
    assert_eq!(s.phase, Phase::PartiallyFailed);

    let counts = env.lab.notify_counts();
    for ext in reboot[..5].iter().chain(&silent).chain(&no_reboot) {
        assert_eq!(
            counts.get(ext),
            Some(&1),
            "{ext} must get exactly one NOTIFY: {counts:?}"
        );
    }
    assert_eq!(
        counts.get(&offline),
        Some(&0),
        "an unregistered phone gets nothing"
    );
    let (ok, csv, _) = env.cli(&["results", "phonerestart/everyone-now", "-n", &env.ns]);
    assert!(ok && csv.lines().count() == 9, "{csv}");
}

/// A phone that registers again from another port after the restart was planned and before its
/// turn gets its NOTIFY at the new port: the contact is read when its NOTIFY is about to leave.
/// The Grandstreams sit behind emulated NAT (a private Contact; reached at the address and port
/// the registrar saw, its `received`), so a Grandstream whose SIPp is started again on a new port
/// keeps its binding with a new `received` and Call-ID. One NOTIFY at a time at 1/s: the moved
/// phone, the 8th target, is sent some 7 s after the first, long after the move.
#[tokio::test]
async fn a_phone_that_moved_to_a_new_port_after_planning_gets_its_notify_there() {
    let env = Env::start_full(
        "prs-moved",
        LabSpec {
            db: "sqlite",
            users: 10,
            phones: 10,
            ..Default::default()
        },
        &["--boot-ms", "300"],
        false,
        &[],
    )
    .await;
    let nat = env.lab.list("LAB_PHONES_NAT");
    assert_eq!(nat, ["203", "208"], "the Grandstreams");
    let moved = "208";
    // 203 moves with 208 (one SIPp per vendor); it is left out of the restart.
    let targets: Vec<String> = env
        .lab
        .list("LAB_PHONES_REBOOT")
        .into_iter()
        .filter(|e| e != "203")
        .collect();
    assert_eq!(targets.iter().position(|e| e == moved), Some(7));
    let received = |lookup: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(lookup).unwrap();
        v["result"]["Contacts"][0]["Contact"]["Received"]
            .as_str()
            .unwrap_or_else(|| panic!("no Received in {lookup}"))
            .to_string()
    };
    let aor = format!("{moved}@{}", env.lab.domain());
    let before = received(&env.lab.rpc(&["ul.lookup", "location", &aor]));
    env.apply(&format!(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: {{ name: moved }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ extensions: [{}] }}
  rollout: {{ maxInFlight: 1, perSecond: 1 }}
  confirm: {{ timeout: 20s }}
"#,
        targets
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    // Planned: the plan is stored (with 208 registered at its old port).
    let api: Api<PhoneRestart> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(
        Duration::from_secs(60),
        "the restart to be planned",
        || async {
            let p = api.get("moved").await.ok()?;
            p.status.as_ref()?.plan.as_ref().map(|_| ())
        },
    )
    .await;
    let port = env.lab.move_phone(moved);
    let after = received(&env.lab.rpc(&["ul.lookup", "location", &aor]));
    assert_ne!(before, after);
    assert!(after.ends_with(&format!(":{port}")), "{after} vs {port}");
    // Its turn had not come yet when it moved.
    let old_log = "Grandstream-reboot";
    assert!(
        env.lab.notifies_logged(old_log).is_empty(),
        "{moved} got its NOTIFY before it moved: {:?}",
        env.lab.notifies_logged(old_log)
    );

    let p = finished(&env, "moved", Duration::from_secs(90)).await;
    let s = p.status.clone().unwrap();
    assert_eq!(s.phase, Phase::Succeeded, "{:?}", s.results);
    assert_eq!(outcome_of(&p, moved), Outcome::Restarted);
    // Where the NOTIFY arrived: the SIPp started on the new port, and not the old one.
    let at_new: Vec<String> = env
        .lab
        .notifies_logged(&format!("{old_log}.moved1"))
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    assert_eq!(at_new, [moved], "NOTIFYs at the new port");
    assert!(env.lab.notifies_logged(old_log).is_empty());
    let counts = env.lab.notify_counts();
    for e in &targets {
        assert_eq!(counts.get(e), Some(&1), "{e}: {counts:?}");
    }
    // The journal says the same: planned at the old address, sent to the new one.
    let rows = results_rows(&env, "moved").await;
    let row = rows
        .iter()
        .find(|r| r["phone"]["extension"] == moved)
        .expect("the moved phone's row");
    assert_eq!(row["phone"]["received"], before.as_str(), "{row}");
    assert_eq!(row["phone"]["sentTo"]["received"], after.as_str(), "{row}");
}

/// Every row of a run, from its results ConfigMaps.
async fn results_rows(env: &Env, name: &str) -> Vec<serde_json::Value> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let mut rows = Vec::new();
    for cm in cms.list(&Default::default()).await.unwrap() {
        if !cm
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with(&format!("{name}-results-")))
        {
            continue;
        }
        let text = support::results_rows(&cm);
        rows.extend(text.lines().map(|l| serde_json::from_str(l).unwrap()));
    }
    rows
}

/// `rateLimits.notifiesPerSecond` bounds all restarts on one connection together. Two restarts
/// run at once, each allowed 3 NOTIFYs/s by its own `perSecond` (6/s together); the connection
/// allows 4/s. The rate is measured where the NOTIFYs arrive: the SIPp phones' wall-clock log
/// timestamps, not the operator's counters.
#[tokio::test]
async fn two_restarts_at_once_share_the_connections_notify_rate() {
    const PER_SECOND: usize = 4;
    let env = Env::start(
        "prs-rate",
        LabSpec {
            db: "sqlite",
            users: 16,
            phones: 16,
            ..Default::default()
        },
        false,
    )
    .await;
    let conns: Api<PbxConnection> = Api::namespaced(env.client.clone(), &env.ns);
    conns
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "spec": { "rateLimits": { "notifiesPerSecond": PER_SECOND } }
            })),
        )
        .await
        .unwrap();
    let phones = env.lab.list("LAB_PHONES_REBOOT");
    assert_eq!(phones.len(), 16);
    let restart = |name: &str, exts: &[String]| {
        format!(
            r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: {{ name: {name} }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ extensions: [{}] }}
  rollout: {{ maxInFlight: 8, perSecond: 3 }}
  confirm: {{ timeout: 10s }}
"#,
            exts.iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    env.apply(&format!(
        "{}---\n{}",
        restart("first-half", &phones[..8]),
        restart("second-half", &phones[8..])
    ));
    for name in ["first-half", "second-half"] {
        let p = finished(&env, name, Duration::from_secs(90)).await;
        let s = p.status.unwrap();
        assert_eq!(s.phase, Phase::Succeeded, "{name}: {:?}", s.results);
    }

    let times = env.lab.notify_times();
    assert_eq!(times.len(), 16, "one NOTIFY per phone: {times:?}");
    let first = times[0].0;
    let offsets: Vec<String> = times
        .iter()
        .map(|(t, ext)| format!("{ext}@{:.3}", t - first))
        .collect();
    // Both restarts were sending during the same time: their NOTIFYs interleave.
    let first_half = |ext: &String| phones[..8].contains(ext);
    let position = |of_first: bool, last: bool| {
        let mut it = times.iter().map(|(_, e)| first_half(e) == of_first);
        if last {
            times.len() - 1 - it.rev().position(|x| x).unwrap()
        } else {
            it.position(|x| x).unwrap()
        }
    };
    assert!(
        position(false, false) < position(true, true)
            && position(true, false) < position(false, true),
        "the two restarts did not run at once: {offsets:?}"
    );
    // 16 NOTIFYs evenly spaced at 4/s span 3.75 s (3.0 leaves room for a loaded machine); two
    // restarts at 3/s each without the shared limit: some 2.4 s, with up to 6 in one second.
    let span = times[15].0 - first;
    assert!(span >= 3.0, "16 NOTIFYs in {span:.3} s: {offsets:?}");
    // No one-second window holds more than the limit (one more for timing jitter at its edges).
    for (i, (t, _)) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|(u, _)| *u < t + 1.0).count();
        assert!(
            in_window <= PER_SECOND + 1,
            "{in_window} NOTIFYs within 1 s of {:.3}: {offsets:?}",
            t - first
        );
    }
}

#[tokio::test]
async fn delayed_restart_with_a_model_filter() {
    let env = Env::start(
        "prs-later",
        LabSpec {
            db: "sqlite",
            users: 10,
            phones: 10,
            ..Default::default()
        },
        false,
    )
    .await;
    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(6);
    env.apply(&format!(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: {{ name: t46s-later }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ groups: [sales, support, engineering], models: ["SIP-T46S"] }}
  notBefore: "{at}"
  confirm: {{ timeout: 8s }}
"#
    ));
    let api: Api<PhoneRestart> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(
        Duration::from_secs(20),
        "the restart to be Scheduled",
        || async {
            (api.get("t46s-later").await.ok()?.status?.phase == Phase::Scheduled).then_some(())
        },
    )
    .await;
    assert!(
        env.lab.notify_counts().values().all(|n| *n == 0),
        "nothing is sent before notBefore"
    );
    let p = finished(&env, "t46s-later", Duration::from_secs(60)).await;
    let s = p.status.unwrap();
    assert_eq!(s.phase, Phase::Succeeded, "{:?}", s.results);
    // Status times have second precision.
    let at_second = jiff::Timestamp::from_second(at.as_second()).unwrap();
    assert!(
        s.start_time.unwrap().0 >= at_second,
        "started before notBefore"
    );
    let summary = s.summary.unwrap();
    assert_eq!(
        summary.targets, 2,
        "the lab's Yealink SIP-T46S phones only: {:?}",
        s.results
    );
    let counts = env.lab.notify_counts();
    assert_eq!(counts.values().sum::<u32>(), 2, "{counts:?}");

    // A window that is already over sends nothing.
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: { name: too-late }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales] }
  notBefore: "2026-01-01T02:00:00Z"
  notAfter: "2026-01-01T03:00:00Z"
"#,
    );
    let p = finished(&env, "too-late", Duration::from_secs(30)).await;
    let s = p.status.unwrap();
    assert_eq!(s.phase, Phase::Expired);
    let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(
        ready.reason == "Expired" && ready.message.contains("to notAfter 2026-01-01T03:00:00Z"),
        "the reason names the window that passed: {ready:?}"
    );
    assert!(
        s.summary.is_none_or(|summary| summary.targets == 0),
        "nothing planned for a window that passed before it started"
    );
    assert_eq!(
        env.lab.notify_counts().values().sum::<u32>(),
        2,
        "no NOTIFY after notAfter"
    );
}

#[tokio::test]
async fn sigkill_mid_rollout_sends_no_phone_two_notifies() {
    let mut env = Env::start(
        "prs-crash",
        LabSpec {
            db: "postgres",
            users: 50,
            phones: 50,
            ..Default::default()
        },
        false,
    )
    .await;
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: { name: all-fifty }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  rollout: { maxInFlight: 5, perSecond: 10 }
  confirm: { timeout: 10s }
"#,
    );
    const KILLS: usize = 2;
    let api: Api<PhoneRestart> = Api::namespaced(env.client.clone(), &env.ns);
    // Phase, phones with a final outcome, targets.
    let seen = || async {
        let s = api
            .get("all-fifty")
            .await
            .ok()
            .and_then(|p| p.status)
            .unwrap_or_default();
        let m = s.summary.unwrap_or_default();
        let settled = m.restarted + m.accepted + m.not_registered + m.failed + m.expired;
        (s.phase, settled, m.targets)
    };
    // Each kill lands while NOTIFYs are going out: Running, some phones restarted since the
    // previous kill, some still to do, read right before the kill and again with the operator
    // down.
    let mut kills = Vec::new();
    let mut last = 0;
    for _ in 0..KILLS {
        eventually(
            Duration::from_secs(60),
            "NOTIFYs to be going out",
            || async {
                let (phase, settled, targets) = seen().await;
                (phase == Phase::Running && settled > last && settled < targets).then_some(())
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let before = seen().await;
        env.kill_operator();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = seen().await;
        let mid_run = before.0 == Phase::Running
            && before.1 < before.2
            && after.0 == Phase::Running
            && after.1 < after.2;
        kills.push((before, after, mid_run));
        last = after.1;
        env.start_operator();
    }
    eprintln!("SIGKILLs (phase, phones settled, targets) before and after: {kills:?}");
    assert_eq!(
        kills.iter().filter(|k| k.2).count(),
        KILLS,
        "every SIGKILL must land mid-rollout: {kills:?}"
    );
    let p = finished(&env, "all-fifty", Duration::from_secs(180)).await;
    let counts = env.lab.notify_counts();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "phones notified twice: {twice:?}");
    let s = p.status.unwrap();
    let summary = s.summary.unwrap();
    assert_eq!(summary.targets, 50);
    // A NOTIFY recorded as under way at a kill and not confirmed by a fresh REGISTER is
    // Uncertain (never sent again): at most the window (maxInFlight 5) per kill.
    assert_eq!(
        summary.restarted + summary.failed + summary.accepted + summary.uncertain,
        50,
        "{summary:?}"
    );
    assert!(summary.uncertain <= 5 * KILLS as u32, "{summary:?}");
    assert!(summary.restarted >= 40, "{summary:?}");
    eprintln!(
        "NOTIFY counts after two SIGKILLs: {} phones got 1, {} got 0",
        counts.values().filter(|n| **n == 1).count(),
        counts.values().filter(|n| **n == 0).count()
    );
    let (_, csv, _) = env.cli(&["results", "phonerestart/all-fifty", "-n", &env.ns]);
    let mut targets: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    targets.sort();
    targets.dedup();
    assert_eq!(targets.len(), 50, "each phone reported once");
}

#[tokio::test]
async fn create_phone_restart_twice_makes_one_and_the_cronjob_runs_it() {
    let env = Env::start(
        "prs-cron",
        LabSpec {
            db: "sqlite",
            users: 4,
            phones: 2,
            ..Default::default()
        },
        false,
    )
    .await;
    let template = support::repo_root().join("examples/phonerestart-nightly-template.yaml");
    for _ in 0..2 {
        let (ok, out, err) = env.cli(&[
            "create",
            "phone-restart",
            "--from",
            template.to_str().unwrap(),
            "-n",
            &env.ns,
            "--schedule",
            "0 2 * * *",
            "--window",
            "1h",
        ]);
        assert!(ok, "{err}");
        assert!(
            out.contains("phonerestart.pbx-operator.io/nightly-sales-"),
            "{out}"
        );
    }
    let api: Api<PhoneRestart> = Api::namespaced(env.client.clone(), &env.ns);
    let list = api.list(&Default::default()).await.unwrap();
    assert_eq!(
        list.items.len(),
        1,
        "two runs for the same scheduled time create one PhoneRestart"
    );
    let pr = &list.items[0];
    assert!(pr.spec.not_before.is_some() && pr.spec.not_after.is_some());

    // The real kube-controller-manager turns the example CronJob into a Job.
    let cronjob = std::fs::read_to_string(
        support::repo_root().join("examples/phonerestart-nightly-cronjob.yaml"),
    )
    .unwrap();
    let every_minute = cronjob.replace("schedule: \"0 2 * * *\"", "schedule: \"* * * * *\"");
    env.apply(&every_minute);
    let cp = control_plane();
    eventually(
        Duration::from_secs(90),
        "the CronJob to create a Job",
        || async {
            let out = support::try_kubectl(
                &cp.admin_kubeconfig,
                &["get", "jobs", "-n", &env.ns, "-o", "name"],
                b"",
            );
            out.1
                .contains("job.batch/nightly-sales-restart")
                .then_some(())
        },
    )
    .await;
}

/// The most restarts under way at one moment, as the phones saw them: from a NOTIFY's arrival to
/// the fresh REGISTER of the reboot it caused (a NOTIFY without one counts until the end). The
/// operator's own "in flight" (sent, not yet confirmed) spans each of these and more, so this
/// never counts more than the operator had outstanding.
fn max_restarting(events: &[support::lab::PhoneEvent]) -> (usize, f64) {
    let mut edges: Vec<(f64, i32)> = Vec::new();
    for n in events.iter().filter(|e| e.what == "NOTIFY") {
        edges.push((n.at, 1));
        if let Some(r) = events
            .iter()
            .find(|e| e.what == "REBOOTED" && e.call_id == n.call_id)
        {
            edges.push((r.at, -1));
        }
    }
    // At the same instant an end comes before a start.
    edges.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (mut now, mut max, mut at) = (0i32, 0i32, 0.0);
    for (t, d) in edges {
        now += d;
        if now > max {
            (max, at) = (now, t);
        }
    }
    (max as usize, at)
}

/// The most NOTIFYs that arrived within any one second (a window opening at each arrival).
fn max_per_second(events: &[support::lab::PhoneEvent]) -> (usize, f64) {
    let times: Vec<f64> = events
        .iter()
        .filter(|e| e.what == "NOTIFY")
        .map(|e| e.at)
        .collect();
    let mut best = (0, 0.0);
    for (i, t) in times.iter().enumerate() {
        let n = times[i..].iter().take_while(|u| **u < t + 1.0).count();
        if n > best.0 {
            best = (n, *t);
        }
    }
    best
}

/// `maxInFlight` and `perSecond` measured where they matter, at the phones (SIPp's log of each
/// NOTIFY and of the REGISTER that ends the reboot, on one clock). The numbers make both limits
/// bind: the phones take 4 s to boot, so at 4 NOTIFYs/s without `maxInFlight` some 16 would be
/// restarting at once; a wave of 8 sent without `perSecond` would arrive within a second.
#[tokio::test]
async fn rollout_limits_hold_at_the_phones() {
    const PHONES: usize = 20;
    const MAX_IN_FLIGHT: usize = 8;
    const PER_SECOND: usize = 4;
    let env = Env::start_full(
        "prs-limits",
        LabSpec {
            db: "sqlite",
            users: PHONES,
            phones: PHONES,
            ..Default::default()
        },
        &["--boot-ms", "4000"],
        false,
        &[],
    )
    .await;
    env.apply(&format!(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: {{ name: limited }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ groups: [sales, support, engineering] }}
  rollout: {{ maxInFlight: {MAX_IN_FLIGHT}, perSecond: {PER_SECOND} }}
  confirm: {{ timeout: 30s }}
"#
    ));
    let p = finished(&env, "limited", Duration::from_secs(180)).await;
    let s = p.status.clone().unwrap();
    let summary = s.summary.clone().unwrap();
    assert_eq!(
        (summary.targets, summary.restarted),
        (PHONES as u32, PHONES as u32),
        "{:?}",
        s.results
    );
    let events = env.lab.phone_events_after(PHONES);
    let counts = env.lab.notify_counts();
    assert!(
        counts.values().all(|n| *n == 1) && counts.len() == PHONES,
        "one NOTIFY per phone: {counts:?}"
    );
    let (in_flight, at) = max_restarting(&events);
    let (rate, from) = max_per_second(&events);
    eprintln!(
        "at the phones: at most {in_flight} restarting at once (at {at:.3}), at most {rate} NOTIFYs in one second (from {from:.3})"
    );
    let timeline: Vec<String> = events
        .iter()
        .map(|e| format!("{:.3} {} {}", e.at, e.what, e.extension))
        .collect();
    assert!(
        in_flight <= MAX_IN_FLIGHT,
        "{in_flight} phones restarting at once, maxInFlight is {MAX_IN_FLIGHT}: {timeline:#?}"
    );
    // A NOTIFY's way from the operator through Kamailio to a phone varies by some milliseconds:
    // one more than perSecond in a second is that jitter, two more is a broken limit.
    assert!(
        rate <= PER_SECOND + 1,
        "{rate} NOTIFYs within one second, perSecond is {PER_SECOND}: {timeline:#?}"
    );
    // And the limits were reached, or the test could not tell a broken one.
    assert_eq!(
        in_flight, MAX_IN_FLIGHT,
        "the rollout never filled maxInFlight: {timeline:#?}"
    );
    assert!(
        rate >= PER_SECOND - 1,
        "the rollout never came near perSecond: {timeline:#?}"
    );
}
