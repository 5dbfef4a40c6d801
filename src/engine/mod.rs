//! The run engine: executes a stored plan target by target, step by step, recording each step's
//! intent before its side effect and its outcome after, so that an operator stopped at any
//! moment (SIGTERM or SIGKILL) resumes where it was and reports what it cannot know.
//!
//! Nothing here knows Kubernetes: the journal is a trait the controllers implement (result
//! ConfigMaps today), the PBX is [`crate::pbx::PbxBackend`].
//!
//! - [`steps`]: the typed steps of a target, their states, and what a restart does with them;
//! - [`users`]: the executor of user changes (writes, actions, mail).

pub mod results;
pub mod steps;
pub mod users;

use async_trait::async_trait;

/// Errors of a run that stop it for now; the journal keeps what was done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pbx(#[from] crate::pbx::PbxError),
    #[error(
        "cannot record the run's progress: {0}; it resumes from the last record once this is fixed"
    )]
    Journal(String),
}

impl Error {
    /// Whether waiting may fix it (a PBX, database or API down).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Pbx(e) => e.is_transient(),
            Error::Journal(_) => true,
        }
    }
}

/// Where a run records its rows: each batch by its index, written whole.
#[async_trait]
pub trait Journal: Send + Sync {
    async fn record(&self, index: usize, rows: &[crate::plan::stored::Row]) -> Result<(), Error>;
}

/// How a call to the engine ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every target of the batches has its outcome.
    Finished,
    /// A stop was asked for: the step in flight was finished and recorded, nothing new started.
    Stopped,
}
