//! GitOps replay safety: the run ledger in the PBX database, and the window of an operation.
//!
//! Git keeps every operation ever merged; a cluster rebuilt from it creates them all anew. The
//! PBX outlives the cluster, so the record of what ran is kept there ([`crate::pbx::ledger`]):
//! every executed run is an entry (kind, namespace, name, spec hash, plan hash, who asked,
//! started, finished, counts) with a copy of its journal, recorded before each side effect
//! like the results ConfigMaps. Before an operation plans, [`gate`] decides:
//!
//! - the same change (namespace, name, spec) already finished: it is not executed again; its
//!   status, results and result ConfigMaps are restored from the entry (`AlreadyExecuted`);
//! - the same change started and never finished (the cluster went away mid-run): the run is
//!   resumed from the ledger's copy of its journal, so every target is done once;
//! - otherwise the window (`notBefore`, `executeBefore`) says wait (Scheduled), too late
//!   (Expired, nothing done) or go.
//!
//! The lifecycle ([`super::run`]) calls [`begin`] when a run starts executing, [`attach`] when
//! it goes on, [`mirror`] with every journal record, and [`finish`] at its end.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::{controller::Action, events::EventType};

use super::Error;
use super::conditions::{self, Desired};
use super::lineage::Lineage;
use super::run::{Run, RunKind};
use crate::api::{
    BulkPhoneChange, BulkUserChange, LedgerRef, Mode, OperationStatus, Phase, PhoneRestart, Plan,
    UserRecycle,
};
use crate::engine;
use crate::engine::ledger::{
    Deadline, Replay, Window, counts, date_of, finished_prefix, replay, spec_hash, window,
};
use crate::engine::results::{self, Digest};
use crate::pbx::{LedgerEntry, LedgerKey, PbxBackend};
use crate::plan::stored::{self, Row};

/// What the ledger and the window need to know of a kind.
pub(crate) trait Ledgered {
    /// The PbxConnection (same namespace) whose database keeps the ledger.
    fn connection(&self) -> &str;
    /// The spec as JSON: what the change is (hashed without `requestedBy`).
    fn spec_json(&self) -> serde_json::Value;
    fn not_before(&self) -> Option<Timestamp>;
    /// The last moment a run may start (`executeBefore`; a restart's `notAfter` too).
    fn deadline(&self) -> Option<Deadline>;
    /// Whether a run of the spec executes (false: Validate only plans).
    fn executes(&self) -> bool {
        true
    }
}

/// What every operation kind answers alike from the spec fields they share.
macro_rules! from_common_spec_fields {
    () => {
        fn connection(&self) -> &str {
            &self.spec.connection_ref.name
        }
        fn spec_json(&self) -> serde_json::Value {
            serde_json::to_value(&self.spec).unwrap_or_default()
        }
        fn not_before(&self) -> Option<Timestamp> {
            self.spec.not_before.as_ref().map(|t| t.0)
        }
    };
}

impl Ledgered for BulkUserChange {
    from_common_spec_fields!();
    fn deadline(&self) -> Option<Deadline> {
        execute_before(&self.spec.execute_before)
    }
    fn executes(&self) -> bool {
        self.spec.mode == Mode::Execute
    }
}

impl Ledgered for BulkPhoneChange {
    from_common_spec_fields!();
    fn deadline(&self) -> Option<Deadline> {
        execute_before(&self.spec.execute_before)
    }
    fn executes(&self) -> bool {
        self.spec.mode == Mode::Execute
    }
}

impl Ledgered for UserRecycle {
    from_common_spec_fields!();
    fn deadline(&self) -> Option<Deadline> {
        execute_before(&self.spec.execute_before)
    }
}

impl Ledgered for PhoneRestart {
    from_common_spec_fields!();
    /// No NOTIFY leaves after notAfter: a restart first due after it has nothing it may do.
    fn deadline(&self) -> Option<Deadline> {
        let not_after = self.spec.not_after.as_ref().map(|t| Deadline {
            at: t.0,
            field: "notAfter",
        });
        Deadline::earliest(execute_before(&self.spec.execute_before), not_after)
    }
}

fn execute_before(t: &Option<Time>) -> Option<Deadline> {
    t.as_ref().map(|t| Deadline {
        at: t.0,
        field: "executeBefore",
    })
}

fn time_of(ms: i64) -> Option<Time> {
    Timestamp::from_millisecond(ms).ok().map(Time)
}

fn reference(e: &LedgerEntry, replayed: bool) -> LedgerRef {
    LedgerRef {
        id: e.id.clone(),
        started: time_of(e.started),
        finished: e.finished.and_then(time_of),
        requested_by: e.requested_by.clone(),
        replayed,
    }
}

/// A run's link to its ledger entry, once it has one.
pub(crate) struct Attached {
    pub id: String,
    pub backend: Arc<dyn PbxBackend>,
}

/// What [`gate`] decided.
pub(crate) enum Gate<S> {
    /// Plan and run as usual.
    Plan(OperationStatus<S>),
    /// An interrupted run restored from the ledger: execute it (status written, Event sent).
    Resume(OperationStatus<S>),
    /// Handled (scheduled, expired, already executed, or blocked): return this.
    Done(Action),
}

async fn backend<K: RunKind>(run: &Run<'_, K>) -> Result<Arc<dyn PbxBackend>, Error> {
    let ns = run.obj.namespace().unwrap_or_default();
    let (_, b) = run
        .ctx
        .backends
        .by_name(&run.ctx.client, &ns, run.obj.connection())
        .await?;
    Ok(b)
}

fn key<K: RunKind>(obj: &K) -> LedgerKey {
    LedgerKey {
        kind: K::KIND.to_string(),
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        spec_hash: spec_hash(&obj.spec_json()),
    }
}

/// Before a run is planned: the window, and whether the PBX already ran this change. A retry
/// of this object's own run, and a Validate, pass.
pub(crate) async fn gate<K: RunKind>(
    run: &Run<'_, K>,
    status: OperationStatus<K::Summary>,
) -> Result<Gate<K::Summary>, Error> {
    let obj = run.obj;
    let lineage = Lineage::of(obj);
    if !obj.executes() || (lineage.retry.is_some() && status.progress.is_some()) {
        return Ok(Gate::Plan(status));
    }
    let now = Timestamp::now();
    let open = window(now, obj.not_before(), obj.deadline());
    if let Window::Wait(at) = open {
        return scheduled(run, status, at).await.map(Gate::Done);
    }
    let backend = match backend(run).await {
        Ok(b) => b,
        Err(e) => return run.blocked(status, &e).await.map(Gate::Done),
    };
    let found = match backend.ledger_find(&key(obj)).await {
        Ok(f) => f,
        Err(e) => return run.blocked(status, &e.into()).await.map(Gate::Done),
    };
    match replay(found) {
        Replay::Done(entry) => restore(run, status, &backend, entry, true)
            .await
            .map(|_| Gate::Done(Action::await_change())),
        Replay::Resume(entry) => {
            let status = restore(run, status, &backend, entry, false).await?;
            Ok(Gate::Resume(status))
        }
        Replay::Fresh => match open {
            Window::Expired(why) => expired(run, status, why).await.map(Gate::Done),
            _ => Ok(Gate::Plan(status)),
        },
    }
}

/// Before `notBefore`: phase Scheduled, the time in conditions, requeued for then.
async fn scheduled<K: RunKind>(
    run: &Run<'_, K>,
    mut status: OperationStatus<K::Summary>,
    at: Timestamp,
) -> Result<Action, Error> {
    let generation = run.obj.meta().generation;
    status.observed_generation = generation;
    status.phase = Phase::Scheduled;
    let message = format!("scheduled: plans and executes at {at} (spec.notBefore)");
    let t = conditions::now();
    for (type_, on) in [(conditions::READY, false), (conditions::RECONCILING, true)] {
        let desired = Desired {
            type_,
            status: on,
            reason: "Scheduled",
            message: message.clone(),
        };
        conditions::upsert(&mut status.conditions, desired, generation, &t);
    }
    conditions::remove(&mut status.conditions, conditions::STALLED);
    if Some(&status) != run.obj.status() {
        run.write_status(&status).await?;
    }
    let wait = at.duration_since(Timestamp::now()).unsigned_abs();
    Ok(Action::requeue(wait.max(Duration::from_millis(100))))
}

/// After `executeBefore` (or a whole window missed): phase Expired, nothing done. Ready, since
/// nothing is left to do: a GitOps tool sees it healthy and goes on.
async fn expired<K: RunKind>(
    run: &Run<'_, K>,
    mut status: OperationStatus<K::Summary>,
    why: String,
) -> Result<Action, Error> {
    let generation = run.obj.meta().generation;
    status.observed_generation = generation;
    status.phase = Phase::Expired;
    status.completion_time = Some(conditions::now());
    super::mark_finished(&mut status.conditions, true, "Expired", &why, generation);
    if Some(&status) != run.obj.status() {
        run.write_status(&status).await?;
        run.ctx
            .publish(run.obj, EventType::Warning, "Expired", "Execute", Some(why))
            .await;
    }
    Ok(Action::await_change())
}

/// Restores the run of `entry` into this object: its journal into the results ConfigMaps, its
/// plan and counts into status. Finished (`replayed`): conditions and an Event say it was
/// already executed, nothing runs. Not finished: this object takes the run over and the caller
/// executes what is left.
async fn restore<K: RunKind>(
    run: &Run<'_, K>,
    before: OperationStatus<K::Summary>,
    backend: &Arc<dyn PbxBackend>,
    entry: LedgerEntry,
    replayed: bool,
) -> Result<OperationStatus<K::Summary>, Error> {
    let obj = run.obj;
    let pbx = |e: crate::pbx::PbxError| Error::Pbx(e);
    let batches = engine::ledger::journal(backend.as_ref(), &entry.id)
        .await
        .map_err(Error::Engine)?;
    let journal = |e: String| Error::Engine(engine::Error::Journal(e));
    let plan: Plan = serde_json::from_str(&entry.plan).map_err(|e| {
        journal(format!(
            "ledger entry {} holds an unreadable plan: {e}",
            entry.id
        ))
    })?;
    let header = plan.csv.as_ref().map(|c| c.columns.clone());
    let mut refs = Vec::with_capacity(batches.len());
    let mut all = Digest::default();
    for (index, rows) in batches.iter().enumerate() {
        refs.push(run.store.write_with(index, rows, header.as_deref()).await?);
        all.merge(Digest::of(rows));
    }
    run.store.prune(refs.len()).await?;
    let lineage = Lineage::of(obj);
    let n = batches.len();
    let done = if replayed {
        n
    } else {
        finished_prefix(&batches)
    };
    let summary = K::summary(&all, None);
    let (shown, truncated) = results::for_status(all.shown.iter());
    let generation = obj.meta().generation;
    let mut status = OperationStatus {
        observed_generation: generation,
        plan: Some(plan),
        summary: Some(summary.clone()),
        results_truncated: truncated || all.rows > shown.len(),
        results: shown,
        results_refs: refs,
        start_time: time_of(entry.started),
        completion_time: entry.finished.and_then(time_of),
        conditions: before.conditions.clone(),
        progress: Some(lineage.progress(n, done, None)),
        ledger: Some(reference(&entry, replayed)),
        ..Default::default()
    };
    let who = entry
        .requested_by
        .as_deref()
        .map(|u| format!(" by {u}"))
        .unwrap_or_default();
    if replayed {
        let (phase, verdict) = K::verdict(&summary);
        status.phase = phase;
        let message = format!(
            "already executed on {}{who} (ledger entry {}): {verdict}; not executed again",
            date_of(entry.finished.unwrap_or(entry.started)),
            entry.id
        );
        let ok = phase == Phase::Succeeded;
        super::mark_finished(
            &mut status.conditions,
            ok,
            "AlreadyExecuted",
            &message,
            generation,
        );
        run.write_status(&status).await?;
        run.ctx
            .publish(
                obj,
                EventType::Normal,
                "AlreadyExecuted",
                "Replay",
                Some(message),
            )
            .await;
        run.ctx
            .reset_failures(&obj.meta().uid.clone().unwrap_or_default());
        return Ok(status);
    }
    let uid = obj.meta().uid.clone().unwrap_or_default();
    backend.ledger_adopt(&entry.id, &uid).await.map_err(pbx)?;
    let _ = run.ledger.set(Attached {
        id: entry.id.clone(),
        backend: backend.clone(),
    });
    status.phase = Phase::Running;
    let message = format!(
        "resuming the run started on {}{who} (ledger entry {}): {done} of {n} batches were done; every target is done once",
        date_of(entry.started),
        entry.id
    );
    for (type_, on) in [(conditions::RECONCILING, true), (conditions::READY, false)] {
        let desired = Desired {
            type_,
            status: on,
            reason: "Resuming",
            message: message.clone(),
        };
        conditions::upsert(
            &mut status.conditions,
            desired,
            generation,
            &conditions::now(),
        );
    }
    conditions::remove(&mut status.conditions, conditions::STALLED);
    run.write_status(&status).await?;
    run.ctx
        .publish(obj, EventType::Normal, "Resumed", "Execute", Some(message))
        .await;
    Ok(status)
}

/// A run starts executing: its entry, with its journal as stored, goes into the ledger before
/// any side effect, and status names it.
pub(crate) async fn begin<K: RunKind>(
    run: &Run<'_, K>,
    status: &mut OperationStatus<K::Summary>,
) -> Result<(), Error> {
    let obj = run.obj;
    let backend = backend(run).await?;
    let batches = status.progress.as_ref().map(|p| p.batches).unwrap_or(0) as usize;
    let plan = status.plan.clone().unwrap_or_default();
    let entry = LedgerEntry {
        id: hex::encode(rand::random::<[u8; 8]>()),
        kind: K::KIND.to_string(),
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        uid: obj.meta().uid.clone().unwrap_or_default(),
        spec_hash: spec_hash(&obj.spec_json()),
        plan_hash: plan.hash.clone(),
        requested_by: obj.requested_by().map(str::to_string),
        started: Timestamp::now().as_millisecond(),
        plan: serde_json::to_string(&plan).unwrap_or_default(),
        batches: batches as u32,
        ..Default::default()
    };
    // One batch in memory at a time; the entry last, so a ledger never holds a run whose
    // journal it lacks.
    for index in 0..batches {
        let text = stored::to_jsonl(&run.store.read(index).await?);
        backend.ledger_record(&entry.id, index, &text).await?;
    }
    backend.ledger_begin(&entry, &[]).await?;
    status.ledger = Some(reference(&entry, false));
    let _ = run.ledger.set(Attached {
        id: entry.id,
        backend,
    });
    Ok(())
}

/// A run goes on (another reconcile, a restarted operator): it records into the entry status
/// names. Enforce's correction runs are not the change's run and are not recorded.
pub(crate) async fn attach<K: RunKind>(
    run: &Run<'_, K>,
    status: &OperationStatus<K::Summary>,
) -> Result<(), Error> {
    if run.ledger.get().is_some() {
        return Ok(());
    }
    let correction = status.progress.as_ref().is_some_and(|p| p.check.is_some());
    let Some(r) = status
        .ledger
        .as_ref()
        .filter(|r| !r.replayed && !correction)
    else {
        return Ok(());
    };
    let backend = backend(run).await?;
    let _ = run.ledger.set(Attached {
        id: r.id.clone(),
        backend,
    });
    Ok(())
}

/// Batch `index` of the run status names, as the ledger keeps it, with the entry's id; None
/// when no entry is named, it lacks the batch, or its copy is not the batch of `digests`.
pub(crate) async fn recorded_batch<K: RunKind>(
    run: &Run<'_, K>,
    index: usize,
    digests: &[String],
) -> Result<Option<(String, Vec<Row>)>, Error> {
    let Some(id) = run
        .obj
        .status()
        .and_then(|s| s.ledger.as_ref())
        .map(|r| r.id.clone())
    else {
        return Ok(None);
    };
    let backend = backend(run).await?;
    let Some(rows) = engine::ledger::journal_batch(backend.as_ref(), &id, index)
        .await
        .map_err(Error::Engine)?
    else {
        return Ok(None);
    };
    Ok(engine::run::checked(digests, index, rows)
        .ok()
        .map(|rows| (id, rows)))
}

/// A journal record, copied to the ledger first (before the side effect it precedes).
pub(crate) async fn mirror(
    ledger: Option<&Attached>,
    index: usize,
    rows: &[Row],
) -> Result<(), engine::Error> {
    match ledger {
        Some(l) => engine::ledger::record(l.backend.as_ref(), &l.id, index, rows).await,
        None => Ok(()),
    }
}

/// The run ended: its entry is finished with the phase and counts.
pub(crate) async fn finish<K: RunKind>(
    run: &Run<'_, K>,
    status: &mut OperationStatus<K::Summary>,
) -> Result<(), Error> {
    let Some(l) = run.ledger.get() else {
        return Ok(());
    };
    let summary = serde_json::to_value(&status.summary).unwrap_or_default();
    let phase = format!("{:?}", status.phase);
    l.backend
        .ledger_finish(&l.id, &phase, &counts(&summary))
        .await?;
    if let Some(r) = status.ledger.as_mut() {
        r.finished = Some(conditions::now());
    }
    Ok(())
}
