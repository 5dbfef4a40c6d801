//! The driver every kind's run goes through: its stored batches are read back one group at a
//! time, checked against the digests recorded when the plan was stored, handed to the kind's
//! [`Executor`], and counted, so that status, events and metrics come from the journal the same
//! way for every kind. Memory holds one group of batches and the few rows status shows.

use super::results::Digest;
use super::{Batch, Ended, Error, Executor, Store};
use crate::api::Outcome;
use crate::plan::stored::{Row, plan_digest};

/// A run's stored batches from `done` to `batches`, executed in order.
pub struct Runner<'a> {
    store: &'a dyn Store,
    /// One per batch, recorded when the plan was stored; empty for plans stored by an operator
    /// from before digests (they run as stored).
    digests: &'a [String],
    /// All remaining batches in one call (an Atomic change: one transaction for all).
    together: bool,
    next: usize,
    end: usize,
    /// What the finished batches hold, for status.
    done: Digest,
}

/// What one call to [`Runner::next`] did.
#[derive(Debug)]
pub enum Next {
    /// The next batch (or, together, all the rest) finished: its rows counted in `batch` (and
    /// in [`Runner::done`]), and each row's outcome.
    Finished {
        batch: Digest,
        outcomes: Vec<Outcome>,
    },
    /// A stop was asked for: what is under way is recorded, the rest left for the next operator.
    Stopped,
    /// Every batch has finished.
    Complete,
}

impl<'a> Runner<'a> {
    /// Counts the batches before `done` (finished by earlier calls or operators).
    pub async fn new(
        store: &'a dyn Store,
        digests: &'a [String],
        done: usize,
        batches: usize,
        together: bool,
    ) -> Result<Runner<'a>, Error> {
        let mut digest = Digest::default();
        for index in 0..done.min(batches) {
            digest.merge(Digest::of(&store.load(index).await?));
        }
        Ok(Runner {
            store,
            digests,
            together,
            next: done,
            end: batches,
            done: digest,
        })
    }

    /// The finished batches so far: counts and the rows status shows.
    pub fn done(&self) -> &Digest {
        &self.done
    }

    /// How many batches have finished.
    pub fn position(&self) -> usize {
        self.next
    }

    /// Reads one stored batch and checks it is the batch stored for this plan: a results
    /// ConfigMap edited since (a target or an action added) is never executed.
    pub async fn verified(&self, index: usize) -> Result<Vec<Row>, Error> {
        verified(self.store, self.digests, index).await
    }

    /// Executes the next batch (or, together, all the rest) to its outcomes.
    pub async fn next(&mut self, exec: &dyn Executor) -> Result<Next, Error> {
        if self.next >= self.end {
            return Ok(Next::Complete);
        }
        let last = if self.together {
            self.end
        } else {
            self.next + 1
        };
        let mut group = Vec::new();
        for index in self.next..last {
            group.push(Batch::new(index, self.verified(index).await?));
        }
        if exec.run(&mut group).await? == Ended::Stopped {
            return Ok(Next::Stopped);
        }
        let mut batch = Digest::default();
        for b in &group {
            batch.merge(Digest::of(&b.rows));
        }
        self.done.merge(batch.clone());
        self.next = last;
        let outcomes = group
            .iter()
            .flat_map(|b| b.rows.iter().map(|r| r.outcome))
            .collect();
        Ok(Next::Finished { batch, outcomes })
    }
}

/// [`Runner::verified`] for callers that read a stored plan without running it (a retry that
/// builds on the earlier run, a validated plan about to execute).
pub async fn verified(
    store: &dyn Store,
    digests: &[String],
    index: usize,
) -> Result<Vec<Row>, Error> {
    let rows = store.load(index).await?;
    if digests.is_empty() {
        return Ok(rows);
    }
    if digests.get(index) != Some(&plan_digest(&rows)) {
        return Err(Error::Tampered { index });
    }
    Ok(rows)
}
