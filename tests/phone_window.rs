//! PhoneRestart's sliding window against the real control plane, Kamailio and SIPp phones: a
//! phone that never answers holds one of `maxInFlight` slots until tm gives up on it (408 after
//! `fr_timer`), while the other phones keep flowing through the rest of the window.

mod support;

use std::time::Duration;

use kube::Api;
use pbx_operator::api::{Outcome, Phase, PhoneRestart};
use support::eventually;
use support::lab::LabSpec;
use support::pbx::Env;

const FR_TIMER_MS: u64 = 3000;

/// 60 phones, 5 of them silent and spread among the others (one in every 12), a window of 10.
/// In waves of 10 each wave would hold a silent phone and stall for its `fr_timer`: NOTIFYs would
/// reach the phones in bursts some 3 s apart. With a window, the phones (SIPp's log of each
/// NOTIFY's arrival, one wall clock) never wait that long for the next NOTIFY.
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
    let counts = env.lab.notify_counts();
    assert!(
        rebooting.iter().all(|e| counts.get(e) == Some(&1)),
        "one NOTIFY per rebooting phone: {counts:?}"
    );
    // What the rebooting phones saw: when each NOTIFY arrived. No pause near fr_timer.
    let events = env.lab.phone_events();
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
