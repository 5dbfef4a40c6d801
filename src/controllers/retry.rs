//! The run a retry builds on, read a batch at a time while the retry plans: from the results
//! ConfigMaps the retry is about to overwrite, or the run ledger's copy in the PBX.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use kube::ResourceExt;

use super::Error;
use super::results_store;
use super::run::{Run, RunKind};
use crate::engine::planning::{EarlierRun, PlanningError};
use crate::plan::stored::Row;

/// The run a retry builds on, read a batch at a time ([`EarlierRun`]): from its results
/// ConfigMaps, or the run ledger's copy where a ConfigMap is gone, edited, or already holds
/// the retry's own plan.
pub(crate) struct Earlier<'r, 'a, K: RunKind> {
    run: &'r Run<'a, K>,
    batches: usize,
    digests: Vec<String>,
    /// How many earlier batches the planner has read (the furthest it got).
    read: AtomicUsize,
    /// How many of the ConfigMaps this retry's plan has overwritten.
    overwritten: AtomicUsize,
    /// Batches whose ConfigMap [`Earlier::check`] found gone or edited: read from the ledger.
    in_ledger: Mutex<BTreeSet<usize>>,
}

impl<'r, 'a, K: RunKind> Earlier<'r, 'a, K> {
    pub fn new(run: &'r Run<'a, K>, batches: usize, digests: Vec<String>) -> Self {
        Earlier {
            run,
            batches,
            digests,
            read: AtomicUsize::new(0),
            overwritten: AtomicUsize::new(0),
            in_ledger: Mutex::new(BTreeSet::new()),
        }
    }

    /// Reads every batch once before anything is planned: a retry that cannot read the run it
    /// builds on stops before it overwrites a single ConfigMap of it. (Not counted as read by
    /// the planner: the plan waits for the planner's own reads.)
    pub async fn check(&self) -> Result<(), Error> {
        for index in 0..self.batches {
            match self.run.verified(index, &self.digests).await {
                Ok(_) => {}
                Err(Error::PlanTampered { .. } | Error::ResultsLost { .. }) => {
                    self.run.retried_batch(index, &self.digests).await?;
                    self.in_ledger.lock().expect("not poisoned").insert(index);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Every row of the earlier run, for the retries that plan from them whole (a revert's,
    /// a PhoneRestart's, a UserRecycle's).
    pub async fn all(&self) -> Result<Vec<Row>, Error> {
        let mut rows = Vec::new();
        for index in 0..self.batches {
            rows.extend(self.read_batch(index).await?);
        }
        Ok(rows)
    }

    /// Whether the retry's plan may overwrite ConfigMap `index`: the planner read that batch
    /// already, or reads none any more.
    pub(super) fn may_overwrite(&self, index: usize) -> bool {
        let read = self.read.load(Ordering::Acquire);
        index < read || read >= self.batches
    }

    pub(super) fn overwriting(&self, index: usize) {
        self.overwritten.fetch_max(index + 1, Ordering::AcqRel);
    }

    async fn read_batch(&self, index: usize) -> Result<Vec<Row>, Error> {
        let gone = index < self.overwritten.load(Ordering::Acquire)
            || self
                .in_ledger
                .lock()
                .expect("not poisoned")
                .contains(&index);
        let rows = if gone {
            // Another pass over a CSV reads what this retry overwrote, and the check said (with
            // an Event) which ConfigMaps are not the earlier run's: the ledger has them.
            match super::ledger::recorded_batch(self.run, index, &self.digests).await? {
                Some((_, rows)) => rows,
                None => {
                    return Err(Error::ResultsLost {
                        name: results_store::name(&self.run.obj.name_any(), index),
                    });
                }
            }
        } else {
            self.run.retried_batch(index, &self.digests).await?
        };
        self.read.fetch_max(index + 1, Ordering::AcqRel);
        Ok(rows)
    }
}

#[async_trait::async_trait]
impl<K: RunKind> EarlierRun for Earlier<'_, '_, K> {
    fn batches(&self) -> usize {
        self.batches
    }

    async fn batch(&self, index: usize) -> Result<Vec<Row>, PlanningError> {
        self.read_batch(index)
            .await
            .map_err(|e| PlanningError::Earlier(Box::new(e)))
    }
}
