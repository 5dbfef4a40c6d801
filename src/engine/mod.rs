//! The run engine: executes a stored plan target by target, step by step, recording each step's
//! intent before its side effect and its outcome after, so that an operator stopped at any
//! moment (SIGTERM or SIGKILL) resumes where it was and reports what it cannot know.
//!
//! Nothing here knows Kubernetes: the journal is a trait the controllers implement (result
//! ConfigMaps today), the PBX is [`crate::pbx::PbxBackend`].
//!
//! - [`run`]: the driver of every kind's run: batches read back and verified against the plan's
//!   digests, handed to the kind's executor, and counted for status;
//! - [`steps`]: what a restart does with a step, and a target's outcome from its steps;
//! - [`results`]: the result CSV, counts and status rows, the same for every kind;
//! - [`users`]: the executor of user changes (writes, actions, mail);
//! - [`ledger`]: the run's journal also kept in the PBX, and the replay and window rules.

#[cfg(test)]
pub(crate) mod fake;
pub mod ledger;
pub mod outbox;
pub mod phones;
pub mod planning;
pub mod recycle;
mod restore;
pub mod results;
pub mod run;
pub mod steps;
pub mod users;

use async_trait::async_trait;

use crate::plan::stored::{Row, StepKind, StepState};

/// Errors of a run that stop it for now; the journal keeps what was done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pbx(#[from] crate::pbx::PbxError),
    #[error(
        "cannot record the run's progress: {0}; it resumes from the last record once this is fixed"
    )]
    Journal(String),
    /// A batch of the journal cannot be read back: what the run did cannot be known.
    #[error("stored batch {index} of the run is missing or unreadable; nothing of it was executed")]
    Lost { index: usize },
    /// A stored batch is not the one recorded when the plan was stored (edited since).
    #[error("stored batch {index} differs from the plan that was stored; it is not executed")]
    Tampered { index: usize },
}

impl Error {
    /// Whether waiting may fix it (a PBX, database or API down).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Pbx(e) => e.is_transient(),
            Error::Journal(_) => true,
            Error::Tampered { .. } | Error::Lost { .. } => false,
        }
    }
}

/// Where a run records its rows: each batch by its index, written whole.
#[async_trait]
pub trait Journal: Send + Sync {
    async fn record(&self, index: usize, rows: &[Row]) -> Result<(), Error>;
}

/// The journal read back: a batch as it was last recorded.
#[async_trait]
pub trait Store: Journal {
    async fn load(&self, index: usize) -> Result<Vec<Row>, Error>;
}

/// One kind's side effects: moves the unfinished rows of some batches to their outcomes,
/// recording each step's intent before it and its outcome after, until done or asked to stop.
#[async_trait]
pub trait Executor: Send + Sync {
    async fn run(&self, batches: &mut [Batch]) -> Result<Ended, Error>;

    /// Whether this executor's work runs on across batch ends (a restart's sliding window, which
    /// a batch end must not drain): then it takes the batches from a [`Feed`] as it reaches them
    /// ([`Executor::run_fed`]) instead of one call per batch.
    fn spans_batches(&self) -> bool {
        false
    }

    /// Runs stored batches `from..to` together (an Atomic change: one transaction for all),
    /// reading them from `store` as it needs them. By default all are read and handed to one
    /// [`Executor::run`].
    async fn run_together(
        &self,
        store: &dyn Store,
        digests: &[String],
        from: usize,
        to: usize,
    ) -> Result<Ended, Error> {
        run_loaded(self, store, digests, from, to).await
    }

    /// Runs every batch `feed` hands out, handing each back once all its rows are final and
    /// recorded. By default one batch at a time through [`Executor::run`].
    async fn run_fed(&self, feed: &mut dyn Feed) -> Result<Ended, Error> {
        while let Some(batch) = feed.next().await? {
            let mut group = [batch];
            if self.run(&mut group).await? == Ended::Stopped {
                return Ok(Ended::Stopped);
            }
            let [batch] = group;
            feed.finished(batch);
        }
        Ok(Ended::Finished)
    }
}

/// [`Executor::run_together`] with every batch in memory.
pub async fn run_loaded<E: Executor + ?Sized>(
    exec: &E,
    store: &dyn Store,
    digests: &[String],
    from: usize,
    to: usize,
) -> Result<Ended, Error> {
    let mut group = Vec::new();
    for index in from..to {
        group.push(Batch::new(
            index,
            run::verified(store, digests, index).await?,
        ));
    }
    exec.run(&mut group).await
}

/// A run's stored batches handed to an executor one at a time, in order, as its work reaches
/// them; memory holds only those it has taken and not handed back.
#[async_trait]
pub trait Feed: Send {
    /// The next batch, checked against its plan; None once every batch has been handed out.
    async fn next(&mut self) -> Result<Option<Batch>, Error>;
    /// A batch whose rows are all final and recorded: counted, and let go.
    fn finished(&mut self, batch: Batch);
}

/// One stored batch of rows, as loaded from the journal.
pub struct Batch {
    pub index: usize,
    pub rows: Vec<Row>,
    /// Changed since it was last recorded.
    pub dirty: bool,
}

impl Batch {
    pub fn new(index: usize, rows: Vec<Row>) -> Batch {
        Batch {
            index,
            rows,
            dirty: false,
        }
    }
}

/// A row of a group of batches: (batch position, row position).
pub(crate) type At = (usize, usize);

/// The rows of `batches` that `keep` selects.
pub(crate) fn at_all(batches: &[Batch], keep: impl Fn(&Row) -> bool) -> Vec<At> {
    let mut out = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        for (i, row) in batch.rows.iter().enumerate() {
            if keep(row) {
                out.push((b, i));
            }
        }
    }
    out
}

/// Where a row's step of `kind` stands, if the row has one.
pub(crate) fn state_of(row: &Row, kind: StepKind) -> Option<StepState> {
    row.steps.iter().find(|s| s.kind == kind).map(|s| s.state)
}

/// Sets the state of row `i`'s step of `kind` and marks the batch to be recorded.
pub(crate) fn set(batch: &mut Batch, i: usize, kind: StepKind, state: StepState) {
    if let Some(s) = batch.rows[i].steps.iter_mut().find(|s| s.kind == kind) {
        s.state = state;
        batch.dirty = true;
    }
}

/// Records every batch changed since its last record.
pub async fn save(journal: &dyn Journal, batches: &mut [Batch]) -> Result<(), Error> {
    for batch in batches.iter_mut().filter(|b| b.dirty) {
        journal.record(batch.index, &batch.rows).await?;
        batch.dirty = false;
    }
    Ok(())
}

/// How a call to the engine ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every target of the batches has its outcome.
    Finished,
    /// A stop was asked for: the step in flight was finished and recorded, nothing new started.
    Stopped,
}
