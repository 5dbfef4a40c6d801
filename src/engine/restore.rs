//! The Restore step of a revert, shared by the kinds that remove or recycle users: brings each
//! user back from the snapshot its removal or recycle kept, first in a row's steps.
//!
//! The intent is recorded before the restore; the PBX records the restore with the restore
//! itself (the snapshot's `restored_by`), so a run resumed after a crash finds its own restore
//! done instead of mistaking the user for one created by somebody else.

use std::collections::{BTreeMap, HashSet};

use super::{At, Batch, Error, Journal, set, state_of};
use crate::pbx::{Expect, PbxBackend, RestoreOutcome, UserField, UserRestore};
use crate::plan::stored::{StepKind, StepState};

/// Restores every row of `work` whose Restore step is due; `by`: the restoring run.
pub(super) async fn restore(
    backend: &dyn PbxBackend,
    journal: &dyn Journal,
    batches: &mut [Batch],
    work: &[At],
    by: &str,
) -> Result<(), Error> {
    let mut due: Vec<At> = Vec::new();
    for &(b, i) in work {
        let batch = &mut batches[b];
        match state_of(&batch.rows[i], StepKind::Restore) {
            Some(StepState::Pending) => set(batch, i, StepKind::Restore, StepState::Intended),
            Some(StepState::Intended) => {}
            _ => continue,
        }
        due.push((b, i));
    }
    if due.is_empty() {
        return Ok(());
    }
    // Recorded as intended before anything is restored.
    super::save(journal, batches).await?;
    let mut by_run: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for &(b, i) in &due {
        let row = &batches[b].rows[i];
        if let Some(r) = &row.restore {
            by_run
                .entry(r.run.clone())
                .or_default()
                .push(row.target.clone());
        }
    }
    let mut kept = BTreeMap::new();
    for (run, extensions) in &by_run {
        for k in backend.snapshots(run, extensions).await? {
            kept.insert((run.clone(), k.extension.clone()), k);
        }
    }
    let mut calls: Vec<UserRestore> = Vec::new();
    let mut called: Vec<At> = Vec::new();
    for (b, i) in due {
        let batch = &mut batches[b];
        let row = &batch.rows[i];
        let refused = |why: String| Some((StepState::Failed, why));
        let verdict = match &row.restore {
            None => refused("no snapshot named in the plan: nothing restored".into()),
            Some(r) => match kept.get(&(r.run.clone(), row.target.clone())) {
                None => refused(format!(
                    "the snapshot of {} is no longer kept: nothing restored",
                    row.target
                )),
                Some(k) => match &k.snapshot {
                    None => refused(format!(
                        "the snapshot of {} expired after the connection's retention since the plan was made: nothing restored",
                        row.target
                    )),
                    Some(s) if s.digest() != r.digest => refused(
                        "the snapshot differs from the one the plan was made from (edited in the database since): nothing restored; plan the revert again and review it".into(),
                    ),
                    Some(s) => {
                        let expect = match &r.expect {
                            None => Expect::Absent,
                            Some(values) => Expect::Present(
                                values
                                    .iter()
                                    .filter_map(|v| {
                                        UserField::from_name(&v.field).map(|f| (f, v.value.clone()))
                                    })
                                    .collect(),
                            ),
                        };
                        calls.push(UserRestore {
                            run: r.run.clone(),
                            by: by.to_string(),
                            snapshot: s.clone(),
                            expect,
                        });
                        called.push((b, i));
                        None
                    }
                },
            },
        };
        if let Some((state, why)) = verdict {
            set(batch, i, StepKind::Restore, state);
            batch.rows[i].notes.push(format!("restore: {why}"));
        }
    }
    if !calls.is_empty() {
        let outcomes = backend.restore_users(&calls).await?;
        for ((b, i), outcome) in called.into_iter().zip(outcomes) {
            let batch = &mut batches[b];
            let (state, notes) = match outcome {
                RestoreOutcome::Restored { conflicts } if conflicts.is_empty() => {
                    (StepState::Done, vec!["restore: done".to_string()])
                }
                RestoreOutcome::Restored { conflicts } => {
                    let mut notes = conflicts;
                    notes.push("restore: done for the rest".into());
                    (StepState::Conflict, notes)
                }
                RestoreOutcome::AlreadyRestored => (
                    StepState::Done,
                    vec!["restore: done (found restored after an operator restart)".into()],
                ),
                RestoreOutcome::Conflict(why) => (StepState::Conflict, vec![why]),
                RestoreOutcome::Failed(why) => (StepState::Failed, vec![format!("restore: {why}")]),
            };
            set(batch, i, StepKind::Restore, state);
            batch.rows[i].notes.extend(notes);
        }
    }
    super::save(journal, batches).await
}

/// The rows of `work` whose user this run (`by`) restored, as the PBX records it: Done, or a
/// Conflict whose user was restored but for what somebody else holds now.
pub(super) async fn restored_by(
    backend: &dyn PbxBackend,
    batches: &[Batch],
    work: &[At],
    by: &str,
) -> Result<HashSet<At>, Error> {
    let mut out = HashSet::new();
    let mut ask: BTreeMap<String, Vec<(At, String)>> = BTreeMap::new();
    for &(b, i) in work {
        let row = &batches[b].rows[i];
        match (state_of(row, StepKind::Restore), &row.restore) {
            (Some(StepState::Done), _) => {
                out.insert((b, i));
            }
            (Some(StepState::Conflict), Some(r)) => ask
                .entry(r.run.clone())
                .or_default()
                .push(((b, i), row.target.clone())),
            _ => {}
        }
    }
    for (run, rows) in ask {
        let extensions: Vec<String> = rows.iter().map(|(_, e)| e.clone()).collect();
        let kept = backend.snapshots(&run, &extensions).await?;
        for (at, ext) in rows {
            let ours = kept
                .iter()
                .any(|k| k.extension == ext && k.restored_by.as_deref() == Some(by));
            if ours {
                out.insert(at);
            }
        }
    }
    Ok(out)
}
