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
        .enumerate()
        .map(|(i, s)| match s.state {
            // Refused, not merely unreached because a step before it failed.
            StepState::Skipped if s.kind == StepKind::Remove && !failed(&steps[..i]) => *s,
            // A restore in conflict (a number or phone left to its new holder, or the extension
            // somebody else's now) is not redone as it was: the retry plans it afresh.
            StepState::Conflict if s.kind == StepKind::Restore => *s,
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

/// A step failed or conflicted: the steps after it were skipped, not refused.
fn failed(steps: &[Step]) -> bool {
    steps
        .iter()
        .any(|s| matches!(s.state, StepState::Failed | StepState::Conflict))
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

    #[test]
    fn a_remove_not_reached_because_a_step_before_it_failed_is_retried() {
        use StepKind::*;
        use StepState::*;
        assert_eq!(
            carry_over(&steps(&[
                (Lock, Failed),
                (Remove, Skipped),
                (WelcomeMail, Skipped)
            ]))
            .unwrap(),
            steps(&[(Lock, Pending), (Remove, Pending), (WelcomeMail, Pending)]),
            "skipped because Lock failed, not refused"
        );
        assert_eq!(
            carry_over(&steps(&[(Remove, Skipped), (WelcomeMail, Failed)])).unwrap(),
            steps(&[(Remove, Skipped), (WelcomeMail, Pending)]),
            "refused before the failure: still refused"
        );
    }

    #[test]
    fn resume_leaves_final_steps_alone() {
        use StepKind::*;
        use StepState::*;
        let before = steps(&[
            (Write, Done),
            (Unlock, NoOp),
            (Lock, Failed),
            (Remove, Skipped),
            (ResetMail, Uncertain),
            (WelcomeMail, Pending),
        ]);
        let mut after = before.clone();
        assert!(resume(&mut after).is_empty());
        assert_eq!(after, before);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const KINDS: [StepKind; 8] = [
            StepKind::Write,
            StepKind::Unlock,
            StepKind::ResetTwoFactor,
            StepKind::ResetPassword,
            StepKind::Lock,
            StepKind::Remove,
            StepKind::ResetMail,
            StepKind::WelcomeMail,
        ];
        const STATES: [StepState; 8] = [
            StepState::Pending,
            StepState::Intended,
            StepState::Done,
            StepState::NoOp,
            StepState::Skipped,
            StepState::Failed,
            StepState::Conflict,
            StepState::Uncertain,
        ];

        fn any_steps() -> impl Strategy<Value = Vec<Step>> {
            proptest::sample::subsequence(KINDS.to_vec(), 0..=KINDS.len()).prop_flat_map(|kinds| {
                let n = kinds.len();
                proptest::collection::vec(proptest::sample::select(STATES.to_vec()), n).prop_map(
                    move |states| {
                        kinds
                            .iter()
                            .zip(states)
                            .map(|(&kind, state)| Step { kind, state })
                            .collect()
                    },
                )
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// A restart changes only begun steps: a begun mail becomes uncertain, any other
            /// begun step is listed to redo, in order; nothing else changes.
            #[test]
            fn resume_touches_exactly_the_begun_steps(before in any_steps()) {
                let mut after = before.clone();
                let redo = resume(&mut after);
                let begun: Vec<StepKind> = before
                    .iter()
                    .filter(|s| s.state == StepState::Intended && !s.kind.is_mail())
                    .map(|s| s.kind)
                    .collect();
                prop_assert_eq!(redo, begun);
                for (b, a) in before.iter().zip(&after) {
                    let want = if b.state == StepState::Intended && b.kind.is_mail() {
                        StepState::Uncertain
                    } else {
                        b.state
                    };
                    prop_assert_eq!((a.kind, a.state), (b.kind, want));
                }
            }

            /// A retry keeps every step done and redoes every failed, uncertain or unreached one;
            /// it is offered only when the writes went through and something is left to do.
            #[test]
            fn a_retry_keeps_what_was_done_and_redoes_the_rest(before in any_steps()) {
                let write_done = before
                    .iter()
                    .filter(|s| s.kind == StepKind::Write)
                    .all(|s| matches!(s.state, StepState::Done | StepState::NoOp));
                match carry_over(&before) {
                    None => {
                        let nothing_left = before.iter().enumerate().all(|(i, s)| {
                            matches!(s.state, StepState::Done | StepState::NoOp)
                                || (s.kind == StepKind::Remove
                                    && s.state == StepState::Skipped
                                    && !failed(&before[..i]))
                        });
                        prop_assert!(before.is_empty() || !write_done || nothing_left);
                    }
                    Some(again) => {
                        prop_assert!(write_done);
                        prop_assert!(again.iter().any(|s| !s.state.is_final()));
                        for (b, a) in before.iter().zip(&again) {
                            prop_assert_eq!(a.kind, b.kind);
                            match b.state {
                                StepState::Done | StepState::NoOp => prop_assert_eq!(a.state, b.state),
                                StepState::Failed | StepState::Uncertain | StepState::Conflict
                                | StepState::Pending => prop_assert_eq!(a.state, StepState::Pending),
                                _ => prop_assert!(!a.state.needs_retry()),
                            }
                        }
                        prop_assert_eq!(again.len(), before.len());
                    }
                }
            }
        }
    }
}
