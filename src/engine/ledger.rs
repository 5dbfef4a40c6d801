//! The run ledger in the engine's terms: a run's journal is also kept in the PBX (which
//! outlives any cluster), each record there before the side effect it precedes; and the pure
//! rules that decide, before a run plans, whether a change already ran ([`replay`]), may run now
//! ([`window`]), and where a resumed run goes on ([`finished_prefix`]). No Kubernetes here.

use jiff::Timestamp;
use sha2::{Digest as _, Sha256};

use super::Error;
use crate::pbx::{LedgerCounts, LedgerEntry, PbxBackend};
use crate::plan::stored::{self, Row};

/// sha256 of what a change is: its spec without who asked (an admission policy stamps the
/// requester, who differs when a GitOps tool applies the same file again).
pub fn spec_hash(spec: &serde_json::Value) -> String {
    let mut v = spec.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("requestedBy");
    }
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}

/// Where an operation stands against its window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Window {
    /// Plan and run now.
    Open,
    /// Not yet: wait until then.
    Wait(Timestamp),
    /// Too late to start: why, for people.
    Expired(String),
}

/// The last moment a run may start, and the spec field that sets it (named in the reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    pub at: Timestamp,
    pub field: &'static str,
}

impl Deadline {
    /// The earlier of two deadlines (a restart's executeBefore and notAfter both close it).
    pub fn earliest(a: Option<Deadline>, b: Option<Deadline>) -> Option<Deadline> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.at < a.at { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// The window at `now`: before `notBefore` wait; at or after the deadline expired.
pub fn window(now: Timestamp, not_before: Option<Timestamp>, deadline: Option<Deadline>) -> Window {
    if let Some(nb) = not_before
        && now < nb
    {
        return Window::Wait(nb);
    }
    match deadline {
        Some(Deadline { at, field }) if now >= at => Window::Expired(match not_before {
            Some(nb) => format!(
                "not executed: its window from notBefore {nb} to {field} {at} passed before the operator could start it; nothing was done"
            ),
            None => {
                format!("not executed: first seen at {now}, after {field} {at}; nothing was done")
            }
        }),
        _ => Window::Open,
    }
}

/// What the ledger says of a change about to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Never executed: plan and run it.
    Fresh,
    /// Executed and finished: not again.
    Done(LedgerEntry),
    /// Started and never finished: go on from its journal.
    Resume(LedgerEntry),
}

pub fn replay(found: Option<LedgerEntry>) -> Replay {
    match found {
        None => Replay::Fresh,
        Some(e) if e.finished.is_some() => Replay::Done(e),
        Some(e) => Replay::Resume(e),
    }
}

/// The rows that come first and are all final: a resumed run starts after them.
pub fn finished_prefix(batches: &[Vec<Row>]) -> usize {
    batches
        .iter()
        .take_while(|b| b.iter().all(Row::is_final))
        .count()
}

/// The counts a ledger entry keeps, from a kind's summary (users or phones).
pub fn counts(summary: &serde_json::Value) -> LedgerCounts {
    let n = |k: &str| summary.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    let changed = if summary.get("restarted").is_some() {
        n("restarted") + n("accepted")
    } else {
        n("changed")
    };
    LedgerCounts {
        targets: n("targets"),
        changed,
        failed: n("failed") + n("conflicts"),
        uncertain: n("uncertain"),
        summary: summary.to_string(),
    }
}

/// `2026-12-03 16:10 UTC`, for people.
pub fn date_of(ms: i64) -> String {
    Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// Records batch `index` of the run's journal in ledger entry `id`: called before the record
/// in the cluster's journal (the results ConfigMaps, lost with a cluster), so the PBX's copy is
/// never behind it, and so before the side effect the record precedes.
pub async fn record(
    pbx: &dyn PbxBackend,
    id: &str,
    index: usize,
    rows: &[Row],
) -> Result<(), Error> {
    pbx.ledger_record(id, index, &stored::to_jsonl(rows))
        .await?;
    Ok(())
}

/// Batch `index` of ledger entry `id`'s journal as the PBX keeps it, if recorded.
pub async fn journal_batch(
    pbx: &dyn PbxBackend,
    id: &str,
    index: usize,
) -> Result<Option<Vec<Row>>, Error> {
    let Some(text) = pbx.ledger_batch(id, index).await? else {
        return Ok(None);
    };
    stored::from_jsonl(&text).map(Some).map_err(|e| {
        Error::Journal(format!(
            "batch {index} of ledger entry {id} cannot be read ({e})"
        ))
    })
}

/// The journal of ledger entry `id` as the PBX keeps it: its batches, in order.
pub async fn journal(pbx: &dyn PbxBackend, id: &str) -> Result<Vec<Vec<Row>>, Error> {
    let mut out = Vec::new();
    for (index, text) in pbx.ledger_batches(id).await?.iter().enumerate() {
        out.push(stored::from_jsonl(text).map_err(|e| {
            Error::Journal(format!(
                "batch {index} of ledger entry {id} cannot be read ({e}); the run cannot be restored from it"
            ))
        })?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Outcome;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn eb(s: &str) -> Option<Deadline> {
        Some(Deadline {
            at: t(s),
            field: "executeBefore",
        })
    }

    #[test]
    fn the_window_waits_runs_and_expires() {
        let now = t("2026-12-03T16:00:00Z");
        assert_eq!(window(now, None, None), Window::Open);
        let nb = t("2026-12-03T18:00:00Z");
        assert_eq!(window(now, Some(nb), None), Window::Wait(nb));
        assert_eq!(
            window(now, Some(nb), eb("2026-12-03T19:00:00Z")),
            Window::Wait(nb),
            "before the window: wait, whatever executeBefore says"
        );
        assert_eq!(
            window(t("2026-12-03T18:00:00Z"), Some(nb), None),
            Window::Open
        );
        assert_eq!(window(now, None, eb("2026-12-03T16:00:01Z")), Window::Open);
        let Window::Expired(why) = window(now, None, eb("2025-12-03T16:00:00Z")) else {
            panic!("a year-old executeBefore expires");
        };
        assert!(
            why.contains("after executeBefore") && why.contains("nothing"),
            "{why}"
        );
        // The operator was down all through the window.
        let late = t("2026-12-03T19:30:00Z");
        let Window::Expired(why) = window(late, Some(nb), eb("2026-12-03T19:00:00Z")) else {
            panic!("a missed window expires");
        };
        assert!(why.contains("window"), "{why}");
        assert!(matches!(
            window(now, None, eb("2026-12-03T16:00:00Z")),
            Window::Expired(_)
        ));
    }

    #[test]
    fn a_restart_window_that_passed_before_it_started_expires_naming_not_after() {
        let not_after = Some(Deadline {
            at: t("2026-11-22T03:00:00Z"),
            field: "notAfter",
        });
        let deadline = Deadline::earliest(eb("2026-12-24T00:00:00Z"), not_after);
        assert_eq!(
            deadline, not_after,
            "the earlier deadline closes the window"
        );
        let Window::Expired(why) = window(
            t("2026-12-03T16:00:00Z"),
            Some(t("2026-11-22T02:00:00Z")),
            deadline,
        ) else {
            panic!("a window of last month expires");
        };
        assert!(why.contains("to notAfter 2026-11-22T03:00:00Z"), "{why}");
        assert_eq!(Deadline::earliest(None, not_after), not_after);
        assert_eq!(Deadline::earliest(None, None), None);
    }

    fn entry(finished: Option<i64>) -> LedgerEntry {
        LedgerEntry {
            id: "ab12".into(),
            kind: "UserRecycle".into(),
            namespace: "acme".into(),
            name: "leavers".into(),
            started: 1_000,
            finished,
            ..Default::default()
        }
    }

    #[test]
    fn a_finished_entry_is_not_run_again_and_an_unfinished_one_resumes() {
        assert_eq!(replay(None), Replay::Fresh);
        assert_eq!(
            replay(Some(entry(Some(2_000)))),
            Replay::Done(entry(Some(2_000)))
        );
        assert_eq!(replay(Some(entry(None))), Replay::Resume(entry(None)));
    }

    #[test]
    fn the_spec_hash_ignores_who_asked_and_nothing_else() {
        let a = serde_json::json!({"connectionRef": {"name": "acme"}, "targets": {"extensions": ["201"]}, "requestedBy": "alice"});
        let b = serde_json::json!({"connectionRef": {"name": "acme"}, "targets": {"extensions": ["201"]}, "requestedBy": "flux"});
        let c = serde_json::json!({"connectionRef": {"name": "acme"}, "targets": {"extensions": ["202"]}, "requestedBy": "alice"});
        assert_eq!(spec_hash(&a), spec_hash(&b));
        assert_ne!(
            spec_hash(&a),
            spec_hash(&c),
            "a changed spec is a new change"
        );
        assert_eq!(spec_hash(&a).len(), 64);
    }

    #[test]
    fn a_resume_starts_after_the_batches_that_are_all_final() {
        let row = |outcome| Row {
            target: "201".into(),
            outcome,
            ..Default::default()
        };
        let batches = vec![
            vec![row(Outcome::Changed), row(Outcome::Failed)],
            vec![row(Outcome::Changed), row(Outcome::InProgress)],
            vec![row(Outcome::Changed)],
        ];
        assert_eq!(finished_prefix(&batches), 1);
        assert_eq!(finished_prefix(&[]), 0);
    }

    #[test]
    fn counts_read_both_summaries() {
        let users = serde_json::json!({"targets": 5, "changed": 3, "failed": 1, "conflicts": 1, "uncertain": 0});
        let c = counts(&users);
        assert_eq!((c.targets, c.changed, c.failed, c.uncertain), (5, 3, 2, 0));
        let phones = serde_json::json!({"targets": 4, "restarted": 2, "accepted": 1, "failed": 0, "uncertain": 1});
        let c = counts(&phones);
        assert_eq!((c.targets, c.changed, c.failed, c.uncertain), (4, 3, 0, 1));
    }
}
