//! PhoneRestart's sliding window against the real control plane, Kamailio and SIPp phones: a
//! phone that never answers holds one of `maxInFlight` slots until tm gives up on it (408 after
//! `fr_timer`), while the other phones keep flowing through the rest of the window.

mod support;

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use pbx_operator::api::{Outcome, PbxConnection, Phase, PhoneRestart};
use support::eventually;
use support::lab::LabSpec;
use support::pbx::Env;

const FR_TIMER_MS: u64 = 6000;

/// 60 phones, 5 of them silent and spread among the others (one in every 12), a window of 10.
/// In waves of 10 each wave would hold a silent phone and stall for its `fr_timer`: NOTIFYs would
/// reach the phones in bursts some 5 s apart (fr_timer 6 s). With a window, the phones (SIPp's
/// log of each NOTIFY's arrival, one wall clock) never wait half of fr_timer for the next one.
#[tokio::test]
async fn silent_phones_hold_one_slot_each_and_fail_with_408() {
    let env = Env::start_full(
        "prs-window",
        LabSpec {
            db: "sqlite",
            users: 60,
            phones: 55,
            silent: 5,
            ..Default::default()
        },
        &[
            "--silent-spread",
            "--boot-ms",
            "300",
            "--fr-timer",
            &FR_TIMER_MS.to_string(),
        ],
        false,
        &[],
    )
    .await;
    let silent = env.lab.list("LAB_PHONES_SILENT");
    let rebooting = env.lab.list("LAB_PHONES_REBOOT");
    assert_eq!((silent.len(), rebooting.len()), (5, 55));
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: { name: window }
spec:
  connectionRef: { name: acme }
  targets: { groups: [sales, support, engineering] }
  rollout: { maxInFlight: 10, perSecond: 1000 }
  confirm: { timeout: 20s }
"#,
    );
    let api: Api<PhoneRestart> = Api::namespaced(env.client.clone(), &env.ns);
    let p = eventually(
        Duration::from_secs(120),
        "the restart to finish",
        || async {
            let p = api.get("window").await.ok()?;
            matches!(
                p.status.as_ref()?.phase,
                Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed
            )
            .then_some(p)
        },
    )
    .await;
    let s = p.status.unwrap();
    assert_eq!(s.phase, Phase::PartiallyFailed, "{:?}", s.results);
    for r in &s.results {
        let ext = r.target.split('/').next().unwrap().to_string();
        if silent.contains(&ext) {
            assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
            assert!(r.notes.iter().any(|n| n.contains("408")), "{r:?}");
        } else {
            assert_eq!(r.outcome, Outcome::Restarted, "{r:?}");
        }
    }
    // Read once every rebooting phone has logged its reboot (SIPp writes its log when it can).
    let events = env.lab.phone_events_after(rebooting.len());
    let counts = env.lab.notify_counts();
    assert!(
        rebooting.iter().all(|e| counts.get(e) == Some(&1)),
        "one NOTIFY per rebooting phone: {counts:?}"
    );
    // What the rebooting phones saw: when each NOTIFY arrived. No pause near fr_timer.
    let arrivals: Vec<f64> = events
        .iter()
        .filter(|e| e.what == "NOTIFY" && rebooting.contains(&e.extension))
        .map(|e| e.at)
        .collect();
    assert_eq!(arrivals.len(), 55, "{events:?}");
    let (gap, after) = arrivals
        .windows(2)
        .map(|w| (w[1] - w[0], w[0] - arrivals[0]))
        .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
    let limit = FR_TIMER_MS as f64 / 1000.0 / 2.0;
    eprintln!(
        "longest pause between NOTIFYs at the phones: {gap:.3} s (at {after:.3} s); all 55 within {:.3} s",
        arrivals[54] - arrivals[0]
    );
    assert!(
        gap < limit,
        "the phones waited {gap:.3} s for the next NOTIFY (at {after:.3} s): a silent phone stalled the others"
    );
}

/// `rateLimits.notifiesPerSecond` shared by two restarts running at once: 2 x 60 phones, the
/// connection allowing 20 NOTIFYs/s, each restart 15/s by its own `perSecond` (30/s together
/// without the shared limit). Measured at the phones (SIPp's log of each NOTIFY's arrival): the
/// rate across both within 5% of 20/s, and neither restart over its own 15/s.
#[tokio::test]
async fn two_restarts_share_the_connections_rate_within_5_percent() {
    const PER_SECOND: f64 = 20.0;
    const OWN: usize = 15;
    let env = Env::start_full(
        "prs-shared",
        LabSpec {
            db: "sqlite",
            users: 120,
            phones: 120,
            ..Default::default()
        },
        &["--boot-ms", "300"],
        false,
        &[],
    )
    .await;
    let conns: Api<PbxConnection> = Api::namespaced(env.client.clone(), &env.ns);
    conns
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "spec": { "rateLimits": { "notifiesPerSecond": PER_SECOND as u32 } }
            })),
        )
        .await
        .unwrap();
    let phones = env.lab.list("LAB_PHONES_REBOOT");
    assert_eq!(phones.len(), 120);
    let restart = |name: &str, exts: &[String]| {
        format!(
            r#"apiVersion: pbx-operator.io/v1alpha1
kind: PhoneRestart
metadata: {{ name: {name} }}
spec:
  connectionRef: {{ name: acme }}
  targets: {{ extensions: [{}] }}
  rollout: {{ maxInFlight: 40, perSecond: {OWN} }}
  confirm: {{ timeout: 20s }}
"#,
            exts.iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    env.apply(&format!(
        "{}---\n{}",
        restart("first", &phones[..60]),
        restart("second", &phones[60..])
    ));
    let api: Api<PhoneRestart> = Api::namespaced(env.client.clone(), &env.ns);
    for name in ["first", "second"] {
        let p = eventually(
            Duration::from_secs(120),
            "the restarts to finish",
            || async {
                let p = api.get(name).await.ok()?;
                matches!(
                    p.status.as_ref()?.phase,
                    Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed
                )
                .then_some(p)
            },
        )
        .await;
        let s = p.status.unwrap();
        assert_eq!(s.phase, Phase::Succeeded, "{name}: {:?}", s.results);
    }
    let times = env.lab.notify_times();
    assert_eq!(times.len(), 120, "one NOTIFY per phone");
    // While both ran: from the later first NOTIFY of the two to the earlier last one.
    let of = |first: bool| -> Vec<f64> {
        times
            .iter()
            .filter(|(_, e)| phones[..60].contains(e) == first)
            .map(|(t, _)| *t)
            .collect()
    };
    let (a, b) = (of(true), of(false));
    let from = a[0].max(b[0]);
    let to = a[59].min(b[59]);
    assert!(
        to - from > 2.0,
        "the two restarts did not overlap: {from} .. {to}"
    );
    let together = times.iter().filter(|(t, _)| *t >= from && *t <= to).count();
    let rate = (together - 1) as f64 / (to - from);
    eprintln!(
        "at the phones: {together} NOTIFYs in {:.3} s while both ran = {rate:.2}/s (limit {PER_SECOND}/s)",
        to - from
    );
    assert!(
        (rate - PER_SECOND).abs() <= PER_SECOND * 0.05,
        "{rate:.2} NOTIFYs/s across both restarts, the connection allows {PER_SECOND}/s"
    );
    for (name, own) in [("first", &a), ("second", &b)] {
        let most = own
            .iter()
            .enumerate()
            .map(|(i, t)| own[i..].iter().take_while(|u| **u < t + 1.0).count())
            .max()
            .unwrap();
        assert!(
            most <= OWN + 1,
            "{name}: {most} NOTIFYs within one second, its perSecond is {OWN}"
        );
    }
}
