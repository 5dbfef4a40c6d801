//! The typed steps of a target and their recorded states: what a run does to each target, what
//! it has recorded of it, and what a restart may do with a step it finds begun but not finished.
//! Pure: the executor and the result rows build on it, and every rule is unit-tested here.

use crate::api::Outcome;
use crate::plan::stored::{OnResume, Row, Step, StepKind, StepState};

/// A restart found these steps: an intended step that cannot be observed becomes uncertain.
/// Returns the kinds that were intended and are to be redone (checked against the PBX first).
pub fn resume(steps: &mut [Step]) -> Vec<StepKind> {
    let mut redo = Vec::new();
    for s in steps.iter_mut().filter(|s| s.state == StepState::Intended) {
        match s.kind.on_resume() {
            OnResume::Redo => redo.push(s.kind),
            OnResume::Uncertain => s.state = StepState::Uncertain,
        }
    }
    redo
}

/// A target's outcome once its steps are final: a conflict or failure wins, then uncertainty,
/// then a deliberate skip; otherwise Changed if anything of the target was changed.
pub fn outcome(steps: &[Step]) -> Outcome {
    let any = |st: StepState| steps.iter().any(|s| s.state == st);
    if any(StepState::Conflict) {
        Outcome::Conflict
    } else if any(StepState::Failed) {
        Outcome::Failed
    } else if any(StepState::Uncertain) {
        Outcome::Uncertain
    } else if steps
        .iter()
        .any(|s| s.state == StepState::Skipped && s.kind == StepKind::Remove)
    {
        Outcome::Skipped
    } else if steps
        .iter()
        // Dropping registrations changes nothing the target holds: a reset that found nothing
        // to clear leaves it Unchanged.
        .any(|s| s.state == StepState::Done && s.kind != StepKind::DropRegistrations)
    {
        Outcome::Changed
    } else {
        Outcome::Unchanged
    }
}

/// A retry of a target: when its writes went through (or it has none), it keeps what was done
/// and redoes exactly the steps that failed, are uncertain, or were not reached (a mail that may
/// not have gone out is sent, the password is not reset again). None when the target must be
/// planned afresh (its writes did not go through) or has nothing to redo. A refused Remove
/// stays refused: it is a decision, not a failure.
pub fn carry_over(steps: &[Step]) -> Option<Vec<Step>> {
    let write_done = steps
        .iter()
        .filter(|s| s.kind == StepKind::Write)
        .all(|s| matches!(s.state, StepState::Done | StepState::NoOp));
    if steps.is_empty() || !write_done {
        return None;
    }
    let again: Vec<Step> = steps
        .iter()
        .map(|s| match s.state {
            StepState::Skipped if s.kind == StepKind::Remove => *s,
            StepState::Done | StepState::NoOp => *s,
            // Begun and to be redone after a check (a Remove whose user may be gone already).
            StepState::Intended if s.kind.on_resume() == OnResume::Redo => *s,
            _ => Step::pending(s.kind),
        })
        .collect();
    again.iter().any(|s| !s.state.is_final()).then_some(again)
}

/// A retry's view of a target from the earlier run: the row carried over with exactly its
/// failed, uncertain and unreached steps to do again, or None to plan the target afresh.
pub fn carried(row: &Row) -> Option<Row> {
    let mut steps = row.steps.clone();
    if !row.is_final() {
        resume(&mut steps);
    }
    let steps = carry_over(&steps)?;
    let mut again = row.clone();
    again.outcome = Outcome::Planned;
    again.steps = steps;
    Some(again)
}

/// What a retry keeps of an earlier row: carried over with steps to redo, kept as it ended
/// (final and not a failure), or None when the target is planned afresh.
pub fn kept_by_retry(row: &Row) -> Option<Row> {
    carried(row).or_else(|| (row.is_final() && !row.is_failure()).then(|| row.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::stored::user_steps;

    fn steps(list: &[(StepKind, StepState)]) -> Vec<Step> {
        list.iter()
            .map(|(kind, state)| Step {
                kind: *kind,
                state: *state,
            })
            .collect()
    }

    #[test]
    fn a_reset_is_followed_by_its_mail_and_writes_come_first() {
        let s = user_steps(true, &["Remove".into(), "ResetPassword".into()]);
        let kinds: Vec<StepKind> = s.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [
                StepKind::Write,
                StepKind::ResetPassword,
                StepKind::Remove,
                StepKind::ResetMail
            ]
        );
        assert!(s.iter().all(|s| s.state == StepState::Pending));
    }

    #[test]
    fn resume_makes_an_intended_mail_uncertain_and_redoes_the_rest() {
        let mut s = steps(&[
            (StepKind::Write, StepState::Intended),
            (StepKind::ResetPassword, StepState::Intended),
            (StepKind::ResetMail, StepState::Intended),
            (StepKind::WelcomeMail, StepState::Pending),
        ]);
        let redo = resume(&mut s);
        assert_eq!(redo, [StepKind::Write, StepKind::ResetPassword]);
        assert_eq!(s[2].state, StepState::Uncertain);
        assert_eq!(
            s[3].state,
            StepState::Pending,
            "a mail never begun is still to do"
        );
    }

    #[test]
    fn outcome_names_the_worst_step() {
        use StepKind::*;
        use StepState::*;
        assert_eq!(
            outcome(&steps(&[(Write, Done), (ResetMail, Uncertain)])),
            Outcome::Uncertain
        );
        assert_eq!(
            outcome(&steps(&[(Write, Conflict), (ResetMail, Skipped)])),
            Outcome::Conflict
        );
        assert_eq!(
            outcome(&steps(&[(ResetPassword, Done), (ResetMail, Failed)])),
            Outcome::Failed
        );
        assert_eq!(outcome(&steps(&[(Remove, Skipped)])), Outcome::Skipped);
        assert_eq!(outcome(&steps(&[(Unlock, NoOp)])), Outcome::Unchanged);
        assert_eq!(
            outcome(&steps(&[(Unlock, NoOp), (Lock, Done)])),
            Outcome::Changed
        );
    }

    #[test]
    fn a_retried_remove_begun_before_a_crash_is_checked_not_failed() {
        use StepKind::*;
        use StepState::*;
        assert_eq!(
            carry_over(&steps(&[(Remove, Intended)])).unwrap(),
            steps(&[(Remove, Intended)])
        );
    }

    #[test]
    fn a_retry_redoes_exactly_the_uncertain_and_failed_steps() {
        use StepKind::*;
        use StepState::*;
        let carried = carry_over(&steps(&[
            (Write, Done),
            (ResetPassword, Done),
            (ResetMail, Uncertain),
        ]))
        .unwrap();
        assert_eq!(
            carried,
            steps(&[(Write, Done), (ResetPassword, Done), (ResetMail, Pending)])
        );
        assert_eq!(
            carry_over(&steps(&[(Write, Conflict), (ResetMail, Skipped)])),
            None,
            "a conflicted write is planned afresh"
        );
        assert_eq!(
            carry_over(&steps(&[(Write, Done), (Lock, Done)])),
            None,
            "nothing to redo"
        );
        assert_eq!(
            carry_over(&steps(&[(ResetPassword, Failed), (ResetMail, Skipped)])).unwrap(),
            steps(&[(ResetPassword, Pending), (ResetMail, Pending)]),
            "a mail not reached because its reset failed is sent once the reset is redone"
        );
        assert_eq!(
            carry_over(&steps(&[(Remove, Skipped), (WelcomeMail, Done)])),
            None,
            "a refused Remove stays refused"
        );
        assert_eq!(carry_over(&[]), None);
    }
}
