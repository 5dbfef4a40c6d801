//! An Atomic user change at any size: one PBX transaction, a batch in memory at a time.
//!
//! 1. Every batch's rows are begun and their writes' intents recorded.
//! 2. Each batch's remaining writes go into the one open transaction (compare-and-set against
//!    what it holds, the earlier batches' writes included); it commits only if every write
//!    applied, else rolls back.
//! 3. Each batch's write outcomes are recorded, then its actions and mail run as in any batch.
//!
//! A crash in 2 leaves nothing written (the database drops the transaction) and every intent
//! on record: the next attempt writes all again. A crash in 3 leaves the outcomes of the batches
//! before it on record: the next attempt finds a failure there (and writes nothing), or finds
//! the values in place (and records them Done).

use std::collections::HashMap;

use super::{UserExec, begin, change_of_row, planned_writes, write_state};
use crate::api::Outcome;
use crate::engine::run::verified;
use crate::engine::{Batch, Ended, Error, Executor, Store, run_loaded, save, set, state_of};
use crate::pbx::{UserField, WriteOutcome};
use crate::plan::stored::{Row, StepKind, StepState};
use crate::plan::users as user_plan;

/// What pass 2 decided for a row of a batch: its write's outcome, or None when the values were
/// already in place (written by an attempt before a restart).
type Decided = HashMap<usize, Option<WriteOutcome>>;

impl UserExec<'_> {
    pub(super) async fn run_atomic(
        &self,
        store: &dyn Store,
        digests: &[String],
        from: usize,
        to: usize,
    ) -> Result<Ended, Error> {
        // 1. Intents; and whether a write already failed (then the transaction did not commit).
        let mut failed = false;
        let mut restores = false;
        for index in from..to {
            let mut batch = [Batch::new(index, verified(store, digests, index).await?)];
            begin(&mut batch);
            for row in &batch[0].rows {
                failed |= matches!(
                    state_of(row, StepKind::Write),
                    Some(StepState::Failed | StepState::Conflict)
                );
                restores |= state_of(row, StepKind::Restore).is_some();
            }
            save(self.journal, &mut batch).await?;
        }
        // A revert restores users before writing to them: its batches run in memory.
        let session = if failed || restores {
            None
        } else {
            self.backend.begin_atomic().await?
        };
        if restores || (!failed && session.is_none()) {
            return run_loaded(self, store, digests, from, to).await;
        }
        // 2. The writes, one transaction.
        let mut decided: Vec<Decided> = Vec::new();
        let mut refusal = None;
        if let Some(mut tx) = session {
            for index in from..to {
                let rows = verified(store, digests, index).await?;
                let (mut done, change_of, changes) = self.changes(&rows).await?;
                failed |= done.values().any(Option::is_some);
                if !failed && !changes.is_empty() {
                    let outcomes = tx.apply(&changes).await?;
                    failed |= outcomes.iter().any(|o| *o != WriteOutcome::Applied);
                    done.extend(change_of.into_iter().zip(outcomes.into_iter().map(Some)));
                }
                decided.push(done);
                if failed {
                    break;
                }
            }
            if failed {
                tx.rollback().await?;
            } else {
                refusal = tx.commit().await?;
                failed = refusal.is_some();
            }
        }
        // 3. Outcomes on record, then the rest of each batch.
        for (k, index) in (from..to).enumerate() {
            let mut batch = [Batch::new(index, verified(store, digests, index).await?)];
            let none = Decided::new();
            let done = decided.get(k).unwrap_or(&none);
            for i in 0..batch[0].rows.len() {
                if state_of(&batch[0].rows[i], StepKind::Write) != Some(StepState::Intended) {
                    continue;
                }
                let outcome = match (done.get(&i), &refusal) {
                    (Some(None), _) => WriteOutcome::Applied,
                    (Some(Some(WriteOutcome::Applied)), Some(r)) => WriteOutcome::Failed(format!(
                        "the database refused the Atomic change at commit: {r}"
                    )),
                    (Some(Some(WriteOutcome::Applied)), None) if failed => WriteOutcome::RolledBack,
                    (Some(Some(o)), _) => o.clone(),
                    (None, _) => WriteOutcome::RolledBack,
                };
                let (state, note) = write_state(outcome);
                set(&mut batch[0], i, StepKind::Write, state);
                batch[0].rows[i].notes.extend(note);
            }
            if self.run(&mut batch).await? == Ended::Stopped {
                return Ok(Ended::Stopped);
            }
        }
        Ok(Ended::Finished)
    }

    /// The writes of a batch's rows that still have them: (rows decided without a write, the
    /// row of each change, the changes). A target gone is NotFound; values already in place
    /// need no write.
    async fn changes(
        &self,
        rows: &[Row],
    ) -> Result<(Decided, Vec<usize>, Vec<crate::pbx::UserChange>), Error> {
        let work: Vec<usize> = (0..rows.len())
            .filter(|&i| {
                rows[i].outcome == Outcome::InProgress
                    && state_of(&rows[i], StepKind::Write) == Some(StepState::Intended)
            })
            .collect();
        let mut fields: Vec<UserField> = work
            .iter()
            .flat_map(|&i| &rows[i].writes)
            .filter_map(|w| UserField::from_name(&w.field))
            .collect();
        fields.sort();
        fields.dedup();
        let extensions = work.iter().map(|&i| rows[i].target.clone()).collect();
        let current =
            crate::pbx::users_with_fields(self.backend, extensions, Some(&fields)).await?;
        let mut decided = Decided::new();
        let (mut change_of, mut changes) = (Vec::new(), Vec::new());
        for i in work {
            let row = &rows[i];
            let Some(user) = current.get(&row.target) else {
                decided.insert(i, Some(WriteOutcome::NotFound));
                continue;
            };
            let planned = user_plan::PlannedUser {
                extension: row.target.clone(),
                writes: planned_writes(row, user, self.secrets),
                actions: vec![],
            };
            let writes = user_plan::remaining_writes(&planned, user);
            if writes.is_empty() {
                decided.insert(i, None);
                continue;
            }
            change_of.push(i);
            changes.push(change_of_row(row, writes));
        }
        Ok((decided, change_of, changes))
    }
}
