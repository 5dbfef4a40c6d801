//! The Kubernetes side of a run, the same for every kind: the plan's rows stored in results
//! ConfigMaps with their digests in status, the batches executed through the engine with status
//! written after each, one finish path and one blocked path. A kind's controller maps its spec
//! to planned rows and an executor, and the engine's counts to its summary.

use std::collections::VecDeque;
use std::time::Duration;

use kube::runtime::{controller::Action, events::EventType};
use kube::{Resource, ResourceExt};

use super::conditions::{self, Desired};
use super::results_store::{self, Store};
use super::retry::Earlier;
use super::{Context, Error};
use crate::api::{OperationStatus, Phase, Plan, Progress};
use crate::engine::results::{self, Digest};
use crate::engine::run::{Next, Runner};
use crate::engine::{self, Executor};
use crate::plan::stored::{self, Row};

/// How long a record of progress is retried before the run stops and leaves it to the next
/// attempt (which reports what it cannot know as uncertain).
const JOURNAL_PATIENCE: Duration = Duration::from_secs(60);

/// What the shared lifecycle needs to know of a kind.
pub(crate) trait RunKind:
    super::ordering::Operation
    + Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
{
    /// The kind's summary in status (users or phones).
    type Summary: serde::Serialize + PartialEq + Clone + Default + Send + Sync;

    const KIND: &'static str;

    /// Who asked, as the spec records it (for Events).
    fn requested_by(&self) -> Option<&str>;

    fn status(&self) -> Option<&OperationStatus<Self::Summary>>;

    /// The counts status shows: the journal's finished batches, in the summary `before` (made
    /// when the run started, which knows how many targets it has).
    fn summary(done: &Digest, before: Option<&Self::Summary>) -> Self::Summary;

    /// How a finished run reads: its phase and a one-line account for people.
    fn verdict(summary: &Self::Summary) -> (Phase, String);

    /// What a person does about a run that did not succeed.
    fn retry_hint(&self) -> String;
}

/// Whether the run in `status` still has work: batches left, or all recorded but the run not
/// finished yet (the operator stopped between its last batch and its finish).
pub(crate) fn unfinished<S>(status: &OperationStatus<S>) -> bool {
    status.phase == Phase::Running || status.progress.as_ref().is_some_and(|p| p.done < p.batches)
}

/// A plan stored as the run's journal.
pub(crate) struct StoredPlan {
    pub refs: Vec<String>,
    pub digests: Vec<String>,
    /// Counts and the rows status shows.
    pub digest: Digest,
}

/// A plan being stored, a chunk at a time (see [`Run::plan_writer`]).
pub(crate) struct PlanWriter<'r, 'a, K: RunKind> {
    run: &'r Run<'a, K>,
    chunker: stored::Chunker,
    out: StoredPlan,
    /// A retry's plan goes into the ConfigMaps of the run it builds on: a chunk waits here
    /// until the planner has read the earlier batch it replaces.
    earlier: Option<&'r Earlier<'r, 'a, K>>,
    held: VecDeque<Vec<Row>>,
}

impl<K: RunKind> PlanWriter<'_, '_, K> {
    pub async fn push(&mut self, row: Row) -> Result<(), Error> {
        if let Some(chunk) = self.chunker.push(row) {
            self.held.push_back(chunk);
            self.store_held(false).await?;
        }
        Ok(())
    }

    /// Stores the last chunk (an empty plan stores one empty batch) and prunes what an
    /// earlier, longer plan left.
    pub async fn finish(mut self) -> Result<StoredPlan, Error> {
        let last = std::mem::take(&mut self.chunker).finish();
        if !last.is_empty() || (self.out.refs.is_empty() && self.held.is_empty()) {
            self.held.push_back(last);
        }
        // The planner is done: it reads no earlier batch any more.
        self.store_held(true).await?;
        self.run.store.prune(self.out.refs.len()).await?;
        Ok(self.out)
    }

    async fn store_held(&mut self, all: bool) -> Result<(), Error> {
        while !self.held.is_empty() {
            let index = self.out.refs.len();
            if !all && self.earlier.is_some_and(|e| !e.may_overwrite(index)) {
                return Ok(());
            }
            let chunk = self.held.pop_front().expect("a held chunk");
            if let Some(e) = self.earlier {
                e.overwriting(index);
            }
            let name = self
                .run
                .store
                .write_with(index, &chunk, self.run.header.as_deref())
                .await?;
            self.out.refs.push(name);
            self.out.digests.push(stored::plan_digest(&chunk));
            self.out.digest.merge(Digest::of(&chunk));
        }
        Ok(())
    }
}

/// One resource's run: its results ConfigMaps are the engine's journal.
pub(crate) struct Run<'a, K: RunKind> {
    pub ctx: &'a Context,
    pub obj: &'a K,
    pub(super) store: Store<'a, K>,
    /// CSV-sourced changes: the input header, echoed in the result CSV.
    header: Option<Vec<String>>,
    /// The run's entry in the PBX's run ledger, once it has one (see [`super::ledger`]).
    pub(super) ledger: std::sync::OnceLock<super::ledger::Attached>,
}

impl<'a, K: RunKind> Run<'a, K> {
    pub fn new(ctx: &'a Context, obj: &'a K, header: Option<Vec<String>>) -> Self {
        Run {
            ctx,
            obj,
            store: Store::new(&ctx.client, obj),
            header,
            ledger: std::sync::OnceLock::new(),
        }
    }

    /// Before planning: the window (notBefore, executeBefore) and the PBX's run ledger decide
    /// whether the run plans, resumes an interrupted run, or ends (see [`super::ledger`]).
    pub async fn gate(
        &self,
        status: OperationStatus<K::Summary>,
    ) -> Result<super::ledger::Gate<K::Summary>, Error> {
        super::ledger::gate(self, status).await
    }

    pub fn requested_by(&self) -> String {
        super::requested_by_note(self.obj.requested_by())
    }

    /// Server-side applies the whole status: fields a run no longer sets are removed.
    pub async fn write_status(&self, status: &OperationStatus<K::Summary>) -> Result<(), Error> {
        super::apply_status(self.ctx, self.obj, status).await
    }

    /// The one blocked path: why the run cannot start or go on, in conditions; transient
    /// causes retry with backoff and the journal keeps what was done.
    pub async fn blocked(
        &self,
        status: OperationStatus<K::Summary>,
        err: &Error,
    ) -> Result<Action, Error> {
        super::block_run(self.ctx, self.obj, self.obj.status(), status, err).await
    }

    /// Stores planned rows as they come, a chunk at a time (no run is in memory as a whole),
    /// records each batch's digest, and removes result ConfigMaps of an earlier, longer run.
    pub async fn store_plan(&self, rows: impl Iterator<Item = Row>) -> Result<StoredPlan, Error> {
        let mut writer = self.plan_writer();
        for row in rows {
            writer.push(row).await?;
        }
        writer.finish().await
    }

    /// Stores rows pushed one at a time, as [`Run::store_plan`] does.
    pub fn plan_writer(&self) -> PlanWriter<'_, 'a, K> {
        PlanWriter {
            run: self,
            chunker: stored::Chunker::new(self.ctx.batch_size),
            out: StoredPlan {
                refs: vec![],
                digests: vec![],
                digest: Digest::default(),
            },
            earlier: None,
            held: VecDeque::new(),
        }
    }

    /// [`Run::plan_writer`] for a retry's plan, which replaces `earlier`'s batches.
    pub fn plan_writer_over<'r>(
        &'r self,
        earlier: &'r Earlier<'r, 'a, K>,
    ) -> PlanWriter<'r, 'a, K> {
        PlanWriter {
            earlier: Some(earlier),
            ..self.plan_writer()
        }
    }

    /// The status of a run starting from a plan just stored: its rows so far (counts and the
    /// few status shows) and its progress. What a kind keeps across runs, the caller adds.
    pub fn stored_status(
        &self,
        mut plan: Plan,
        stored: StoredPlan,
        progress: Progress,
        before: &OperationStatus<K::Summary>,
    ) -> OperationStatus<K::Summary> {
        plan.batch_digests = stored.digests;
        let counts = stored.digest;
        let (shown, truncated) = results::for_status(counts.shown.iter());
        OperationStatus {
            observed_generation: self.obj.meta().generation,
            plan: Some(plan),
            summary: Some(K::summary(&counts, None)),
            results_truncated: truncated || counts.rows > shown.len(),
            results: shown,
            results_refs: stored.refs,
            start_time: Some(conditions::now()),
            conditions: before.conditions.clone(),
            progress: Some(progress),
            ..Default::default()
        }
    }

    /// Reads a stored batch and checks it is the one stored for this plan.
    pub async fn verified(&self, index: usize, digests: &[String]) -> Result<Vec<Row>, Error> {
        engine::run::verified(self, digests, index)
            .await
            .map_err(|e| self.engine_error(e))
    }

    /// Every stored row of the run, verified (a revert reads the run it undoes).
    pub async fn verified_all(
        &self,
        batches: usize,
        digests: &[String],
    ) -> Result<Vec<Row>, Error> {
        let mut rows = Vec::new();
        for index in 0..batches {
            rows.extend(self.verified(index, digests).await?);
        }
        Ok(rows)
    }

    /// A stored batch of the run a retry builds on, verified. A batch whose ConfigMap is gone
    /// or no longer the one stored is read from the run ledger's copy, checked against the same
    /// digest: a retry stopped while it stored its own plan has overwritten (or pruned) the
    /// first ConfigMaps already, and its next attempt still finds the earlier run.
    pub async fn retried_batch(&self, index: usize, digests: &[String]) -> Result<Vec<Row>, Error> {
        match self.verified(index, digests).await {
            Ok(batch) => Ok(batch),
            Err(e @ (Error::PlanTampered { .. } | Error::ResultsLost { .. })) => {
                let Some((entry, batch)) =
                    super::ledger::recorded_batch(self, index, digests).await?
                else {
                    return Err(e);
                };
                let note = format!(
                    "{} is not the batch stored for the run being retried (deleted, edited, or overwritten by a retry stopped while storing its plan): read from run ledger entry {entry}",
                    results_store::name(&self.obj.name_any(), index)
                );
                tracing::warn!("{note}");
                self.ctx
                    .publish(
                        self.obj,
                        EventType::Warning,
                        "ResultsFromLedger",
                        "Retry",
                        Some(note),
                    )
                    .await;
                Ok(batch)
            }
            Err(e) => Err(e),
        }
    }

    fn engine_error(&self, e: engine::Error) -> Error {
        match e {
            engine::Error::Tampered { index } => Error::PlanTampered {
                name: results_store::name(&self.obj.name_any(), index),
            },
            engine::Error::Lost { index } => Error::ResultsLost {
                name: results_store::name(&self.obj.name_any(), index),
            },
            e => Error::Engine(e),
        }
    }

    /// Marks status as executing `message` (Ready=False, Reconciling) and publishes `Started`.
    pub async fn started(
        &self,
        status: &mut OperationStatus<K::Summary>,
        reason: &str,
        action: &str,
        message: String,
    ) -> Result<(), Error> {
        // Overlapping runs on one connection go in creation order (may return Error::Waiting).
        super::ordering::admit(self, status).await?;
        let now = conditions::now();
        let generation = self.obj.meta().generation;
        for (type_, on) in [(conditions::RECONCILING, true), (conditions::READY, false)] {
            conditions::upsert(
                &mut status.conditions,
                Desired {
                    type_,
                    status: on,
                    reason,
                    message: message.clone(),
                },
                generation,
                &now,
            );
        }
        conditions::remove(&mut status.conditions, conditions::STALLED);
        super::ledger::begin(self, status).await?;
        self.write_status(status).await?;
        self.ctx
            .publish(
                self.obj,
                EventType::Normal,
                "Started",
                action,
                Some(format!("{message}{}", self.requested_by())),
            )
            .await;
        Ok(())
    }

    /// The one end of a Validate run: the plan is stored and described, nothing was changed.
    /// `message` describes the plan (conditions); the `Validated` Event adds who asked.
    pub async fn validated(
        &self,
        mut next: OperationStatus<K::Summary>,
        message: String,
    ) -> Result<OperationStatus<K::Summary>, Error> {
        let now = conditions::now();
        let generation = self.obj.meta().generation;
        next.phase = Phase::Validated;
        next.completion_time = Some(now.clone());
        for (type_, reason) in [
            (conditions::VALIDATED, "Planned"),
            (conditions::READY, "Validated"),
        ] {
            let desired = Desired {
                type_,
                status: true,
                reason,
                message: message.clone(),
            };
            conditions::upsert(&mut next.conditions, desired, generation, &now);
        }
        conditions::remove(&mut next.conditions, conditions::RECONCILING);
        conditions::remove(&mut next.conditions, conditions::STALLED);
        self.write_status(&next).await?;
        let note = format!("{message}{}", self.requested_by());
        self.ctx
            .publish(
                self.obj,
                EventType::Normal,
                "Validated",
                "Validate",
                Some(note),
            )
            .await;
        self.ctx
            .reset_failures(&self.obj.meta().uid.clone().unwrap_or_default());
        Ok(next)
    }

    /// Executes the unfinished batches of the run in `status` through `exec`, writing status
    /// after every batch; `together` runs them all in one call (Atomic). Ends in [`Run::finish`],
    /// or with a requeue when the operator is stopping or the run is blocked.
    pub async fn execute(
        &self,
        mut status: OperationStatus<K::Summary>,
        exec: &dyn Executor,
        together: bool,
    ) -> Result<Result<OperationStatus<K::Summary>, Action>, Error> {
        let progress = status.progress.clone().unwrap_or_default();
        let digests = status
            .plan
            .as_ref()
            .map(|p| p.batch_digests.clone())
            .unwrap_or_default();
        let _executing = self.ctx.executing();
        if let Err(e) = super::ledger::attach(self, &status).await {
            return Ok(Err(self.blocked(status, &e).await?));
        }
        let mut runner = match Runner::new(
            self,
            &digests,
            progress.done as usize,
            progress.batches as usize,
            together,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => return Ok(Err(self.blocked(status, &self.engine_error(e)).await?)),
        };
        loop {
            if self.ctx.is_stopping() {
                return Ok(Err(Action::requeue(Duration::from_secs(5))));
            }
            let next = runner.next(exec).await;
            let (batch, outcomes) = match next {
                Ok(Next::Complete) => break,
                // The step in flight is recorded; the next operator goes on from there.
                Ok(Next::Stopped) => return Ok(Err(Action::requeue(Duration::from_secs(5)))),
                Ok(Next::Finished {
                    batch, outcomes, ..
                }) => (batch, outcomes),
                Err(e) => return Ok(Err(self.blocked(status, &self.engine_error(e)).await?)),
            };
            for outcome in outcomes {
                self.ctx
                    .metrics
                    .targets
                    .get_or_create(&super::metrics::OutcomeLabel {
                        kind: K::KIND.into(),
                        outcome: format!("{outcome:?}"),
                    })
                    .inc();
            }
            let done = runner.done();
            let p = status.progress.get_or_insert_with(Progress::default);
            p.done = runner.position() as u32;
            let (position, batches) = (p.done, p.batches);
            status.summary = Some(K::summary(done, status.summary.as_ref()));
            let (shown, truncated) = results::for_status(done.shown.iter());
            status.results_truncated = truncated || done.rows > shown.len();
            status.results = shown;
            self.write_status(&status).await?;
            let bad = batch.summary.failed + batch.summary.conflicts + batch.summary.uncertain;
            if bad > 0 {
                self.ctx
                    .publish(
                        self.obj,
                        EventType::Warning,
                        "BatchFailed",
                        "Execute",
                        Some(format!(
                            "batch {position} of {batches}: {bad} targets failed, conflicted or are uncertain; see status.results"
                        )),
                    )
                    .await;
            }
        }
        Ok(Ok(status))
    }

    /// The one finish path: phase and conditions from the counts, `Finished` published.
    pub async fn finish(
        &self,
        mut status: OperationStatus<K::Summary>,
        action: &str,
    ) -> Result<OperationStatus<K::Summary>, Error> {
        let summary = status.summary.clone().unwrap_or_default();
        let (phase, message) = K::verdict(&summary);
        let ok = phase == Phase::Succeeded;
        status.phase = phase;
        status.completion_time = Some(conditions::now());
        let (reason, text) = if ok {
            ("Succeeded".to_string(), message.clone())
        } else {
            (
                format!("{phase:?}"),
                format!("{message}; {}", self.obj.retry_hint()),
            )
        };
        super::mark_finished(
            &mut status.conditions,
            ok,
            &reason,
            &text,
            self.obj.meta().generation,
        );
        super::ledger::finish(self, &mut status).await?;
        self.write_status(&status).await?;
        let type_ = if ok {
            EventType::Normal
        } else {
            EventType::Warning
        };
        self.ctx
            .publish(
                self.obj,
                type_,
                "Finished",
                action,
                Some(format!("{message}{}", self.requested_by())),
            )
            .await;
        self.ctx
            .reset_failures(&self.obj.meta().uid.clone().unwrap_or_default());
        Ok(status)
    }
}

impl<K: RunKind> Run<'_, K> {
    fn journal_patience(&self) -> Duration {
        if self.ctx.is_stopping() {
            super::SHUTDOWN_GRACE / 2
        } else {
            JOURNAL_PATIENCE
        }
    }
}

#[async_trait::async_trait]
impl<K: RunKind> engine::Journal for Run<'_, K> {
    /// Keeps trying for a while when the API server is away (restarted, overloaded): the
    /// outcomes in hand are known now, and given up they would be reported as uncertain.
    async fn record(&self, index: usize, rows: &[Row]) -> Result<(), engine::Error> {
        super::ledger::mirror(self.ledger.get(), index, rows).await?;
        let start = std::time::Instant::now();
        let mut wait = Duration::from_millis(250);
        loop {
            match self
                .store
                .write_with(index, rows, self.header.as_deref())
                .await
            {
                Ok(_) => return Ok(()),
                // Stopping, the patience must end within the shutdown grace.
                Err(e) if e.is_transient() && start.elapsed() + wait < self.journal_patience() => {
                    tracing::warn!(error = %e, batch = index, "cannot record the run's progress yet; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(engine::Error::Journal(e.to_string())),
            }
        }
    }
}

#[async_trait::async_trait]
impl<K: RunKind> engine::Store for Run<'_, K> {
    async fn load(&self, index: usize) -> Result<Vec<Row>, engine::Error> {
        self.store.read(index).await.map_err(|e| match e {
            Error::ResultsLost { .. } => engine::Error::Lost { index },
            e => engine::Error::Journal(e.to_string()),
        })
    }
}
