//! kstatus conditions (Ready, Reconciling, Stalled, ...), so Flux, Argo CD and people read health
//! without custom code.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::Error;

pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";
pub const VALIDATED: &str = "Validated";

/// A condition as the controller wants it, before timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired<'a> {
    pub type_: &'a str,
    pub status: bool,
    pub reason: &'a str,
    pub message: String,
}

/// Sets `desired` in `conditions`, keeping `lastTransitionTime` when the status did not flip,
/// so that a status write is deterministic and an unchanged status writes nothing.
pub fn upsert(
    conditions: &mut Vec<Condition>,
    desired: Desired<'_>,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if desired.status { "True" } else { "False" }.to_string();
    let existing = conditions.iter_mut().find(|c| c.type_ == desired.type_);
    match existing {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.clone();
            }
            c.status = status;
            c.reason = desired.reason.to_string();
            c.message = desired.message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: desired.type_.to_string(),
            status,
            reason: desired.reason.to_string(),
            message: desired.message,
            observed_generation: generation,
            last_transition_time: now.clone(),
        }),
    }
}

/// Removes a condition type (kstatus treats an absent Reconciling/Stalled as False).
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

pub fn now() -> Time {
    Time(jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    fn ready(status: bool, message: &str) -> Desired<'static> {
        Desired {
            type_: READY,
            status,
            reason: "R",
            message: message.into(),
        }
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conds = Vec::new();
        upsert(&mut conds, ready(false, "starting"), Some(1), &at(100));
        upsert(
            &mut conds,
            ready(false, "still starting"),
            Some(2),
            &at(200),
        );
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, at(100));
        assert_eq!(conds[0].message, "still starting");
        assert_eq!(conds[0].observed_generation, Some(2));
        upsert(&mut conds, ready(true, "done"), Some(2), &at(300));
        assert_eq!(conds[0].last_transition_time, at(300));
        assert_eq!(conds[0].status, "True");
    }

    #[test]
    fn remove_drops_only_that_type() {
        let mut conds = Vec::new();
        upsert(&mut conds, ready(true, "ok"), None, &at(1));
        upsert(
            &mut conds,
            Desired {
                type_: STALLED,
                status: true,
                reason: "X",
                message: "m".into(),
            },
            None,
            &at(1),
        );
        remove(&mut conds, STALLED);
        assert_eq!(
            conds.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(),
            vec![READY]
        );
    }
}

/// Records why a run cannot go on: Ready=False, plus Reconciling when waiting may fix it (the
/// PBX is down) or Stalled when a person must act. Returns whether it is transient.
pub(crate) fn mark_blocked(
    conds: &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    err: &Error,
    generation: Option<i64>,
) -> bool {
    let now = now();
    let reason = err.label_camel();
    let transient = err.is_transient();
    let message = err.to_string();
    upsert(
        conds,
        Desired {
            type_: READY,
            status: false,
            reason,
            message: message.clone(),
        },
        generation,
        &now,
    );
    let (set, clear, message) = if transient {
        (
            RECONCILING,
            STALLED,
            format!("waiting for the PBX, will retry: {message}"),
        )
    } else {
        (STALLED, RECONCILING, message)
    };
    upsert(
        conds,
        Desired {
            type_: set,
            status: true,
            reason,
            message,
        },
        generation,
        &now,
    );
    remove(conds, clear);
    transient
}

/// Records a finished run: Reconciling gone, Ready=ok, and Stalled when it did not succeed
/// (kstatus reads a failed one-shot run as needing a person).
pub(crate) fn mark_finished(
    conds: &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let now = now();
    remove(conds, RECONCILING);
    let ready = Desired {
        type_: READY,
        status: ok,
        reason,
        message: message.to_string(),
    };
    upsert(conds, ready, generation, &now);
    if ok {
        remove(conds, STALLED);
    } else {
        let stalled = Desired {
            type_: STALLED,
            status: true,
            reason,
            message: message.to_string(),
        };
        upsert(conds, stalled, generation, &now);
    }
}
