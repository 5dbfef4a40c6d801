//! BulkUserChange: plan (Validate) and apply (Execute) field changes and actions on many users.
//!
//! The spec becomes a plan request (plan::user_change), the plan is stored as the run's journal
//! and executed by the engine's user executor through the shared lifecycle (controllers::run).
//! Here: reading what the spec names (Secrets, the CSV, the PBX), Validate, and Enforce.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::backends::{mailer, secret_fields};
use super::conditions;
use super::csv_source;
use super::ledger::Gate;
use super::lineage::{Lineage, RETRY_ANNOTATION};
use super::metrics::Timed;
use super::retry::Earlier;
use super::run::{self, Run, RunKind, StoredPlan};
use super::{Context, Error};
use crate::api::{
    BulkUserChange, BulkUserChangeSpec, FailurePolicy, Mode, OperationStatus, Phase, Plan, Policy,
    Summary, parse_duration,
};
use crate::engine::outbox::Outbox;
use crate::engine::planning::{CsvEnd, CsvPlanner, EarlierRun, Planned, UserPlanner, UserRequest};
use crate::engine::results::{self, Digest as Counts};
use crate::engine::users::UserExec;
use crate::pbx::{PbxBackend, Secret, UserField};
use crate::plan::selection::Selector;
use crate::plan::stored::{Row, StepKind};
use crate::plan::user_change as request;
use crate::plan::users::{self as user_plan, Intent, Wanted};
use kube::{
    ResourceExt,
    runtime::{controller::Action, events::EventType},
};

const KIND: &str = "BulkUserChange";
const DEFAULT_ENFORCE_INTERVAL: Duration = Duration::from_secs(600);

impl RunKind for BulkUserChange {
    type Summary = Summary;
    const KIND: &'static str = KIND;

    fn requested_by(&self) -> Option<&str> {
        self.spec.requested_by.as_deref()
    }
    fn status(&self) -> Option<&OperationStatus> {
        self.status.as_ref()
    }
    fn summary(done: &Counts, before: Option<&Summary>) -> Summary {
        results::user_summary(done, before)
    }
    fn verdict(summary: &Summary) -> (Phase, String) {
        results::user_verdict(summary)
    }
    fn retry_hint(&self) -> String {
        format!(
            "fix the causes in status.results, then set annotation {RETRY_ANNOTATION} to re-run only the failed and uncertain steps"
        )
    }
}

#[tracing::instrument(skip_all, fields(change = %buc.name_any(), namespace = buc.namespace()))]
pub(crate) async fn reconcile(
    buc: Arc<BulkUserChange>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer(KIND);
    let status = buc.status.clone().unwrap_or_default();
    let change = Change {
        buc: &buc,
        ctx: &ctx,
        lineage: Lineage::of(&*buc),
    };
    match &status.progress {
        Some(p) if change.lineage.serves(p) && run::unfinished(&status) => {
            change.execute(status).await
        }
        Some(p) if change.lineage.serves(p) => change.finished(status).await,
        _ => change.start(status).await,
    }
}

struct Change<'a> {
    buc: &'a BulkUserChange,
    ctx: &'a Context,
    lineage: Lineage,
}

impl Change<'_> {
    fn spec(&self) -> &BulkUserChangeSpec {
        &self.buc.spec
    }

    /// The run's journal; CSV-sourced plans echo the input columns in their result CSV.
    fn run(&self, plan: Option<&Plan>) -> Run<'_, BulkUserChange> {
        let header = plan.and_then(|p| p.csv.as_ref()).map(|c| c.columns.clone());
        Run::new(self.ctx, self.buc, header)
    }

    async fn backend(&self) -> Result<(crate::api::PbxConnection, Arc<dyn PbxBackend>), Error> {
        let ns = self.buc.namespace().unwrap_or_default();
        let (conn, backend) = self
            .ctx
            .backends
            .by_name(&self.ctx.client, &ns, &self.spec().connection_ref.name)
            .await?;
        Ok((conn, backend))
    }

    /// What the spec asks for, with secret values read from their (opted-in) Secrets.
    async fn intent(&self) -> Result<Intent, Error> {
        let spec = self.spec();
        let ns = self.buc.namespace().unwrap_or_default();
        let mut fields = spec
            .fields
            .as_ref()
            .map(request::plain_fields)
            .unwrap_or_default();
        if let Some(f) = &spec.fields {
            fields.extend(secret_fields(&self.ctx.client, &ns, f).await?);
        }
        Ok(Intent {
            fields,
            actions: request::actions(spec),
        })
    }

    /// Plans a new run (or takes the validated plan), stores it, and starts executing.
    async fn start(&self, status: OperationStatus) -> Result<Action, Error> {
        let run = self.run(status.plan.as_ref());
        let status = match run.gate(status).await? {
            Gate::Plan(status) => status,
            Gate::Resume(status) => return self.execute(status).await,
            Gate::Done(action) => return Ok(action),
        };
        let planned = async {
            let (conn, backend) = self.backend().await?;
            let intent = self.intent().await?;
            // A Secret changed after validation is a new request, planned (and hashed) anew.
            let spec_hash =
                user_plan::with_secret_references(&request::spec_hash(self.spec()), &intent);
            Ok::<_, Error>((conn, backend, intent, spec_hash))
        };
        let (conn, backend, intent, spec_hash) = match planned.await {
            Ok(p) => p,
            Err(e) => return run.blocked(status, &e).await,
        };
        let retry = self.lineage.retry.is_some();
        if self.spec().mode == Mode::Execute
            && status.phase == Phase::Validated
            && !retry
            && status
                .plan
                .as_ref()
                .is_some_and(|p| p.spec_hash == spec_hash)
        {
            return self.execute_validated(run, status).await;
        }
        // A retry builds on the earlier run of the same spec generation: without its results
        // (neither the ConfigMaps nor the ledger's copy), nothing is planned, changed or pruned.
        let earlier = status
            .progress
            .as_ref()
            .filter(|p| retry && self.lineage.same_generation(p))
            .map(|p| {
                let digests = status.plan.as_ref().map(|p| p.batch_digests.clone());
                Earlier::new(&run, p.batches as usize, digests.unwrap_or_default())
            });
        if let Some(earlier) = &earlier {
            if let Err(e) = earlier.check().await {
                return run.blocked(status, &e).await;
            }
        }
        let timed = Timed {
            inner: backend.as_ref(),
            metrics: &self.ctx.metrics,
        };
        let stored = match self
            .plan(&timed, &intent, earlier.as_ref(), &spec_hash)
            .await
        {
            Ok(planned) => self.store(planned, earlier.as_ref()).await,
            Err(e) => Err(e),
        };
        let (mut plan, stored) = match stored {
            Ok(p) => p,
            Err(e) => return run.blocked(status, &e).await,
        };
        if let Some(approved) = &self.spec().approved_plan_hash {
            if self.spec().mode == Mode::Execute && *approved != plan.hash {
                let err = Error::PlanChanged {
                    approved: approved.clone(),
                    current: plan.hash.clone(),
                };
                // The rows stored are the plan that was refused: shown, never executed.
                let mut status = status;
                plan.batch_digests = stored.digests;
                status.plan = Some(plan);
                status.results_refs = stored.refs;
                status.phase = Phase::Failed;
                return run.blocked(status, &err).await;
            }
        }
        let run = self.run(Some(&plan));
        let batches = stored.refs.len();
        let validate = self.spec().mode == Mode::Validate;
        let progress = self
            .lineage
            .progress(batches, if validate { batches } else { 0 }, None);
        let mut next = run.stored_status(plan, stored, progress, &status);
        next.corrections = status.corrections;
        next.last_checked_time = status.last_checked_time.clone();
        next.warnings = request::warnings(&conn.name_any(), conn.spec.smtp.is_some(), self.spec());
        let (hash, changes) = next
            .plan
            .as_ref()
            .map(|p| (p.hash.clone(), p.changes))
            .unwrap_or_default();
        let summary = next.summary.get_or_insert_with(Summary::default);
        let targets = summary.targets;
        if validate {
            summary.changed = changes;
            let message =
                format!("planned: {targets} targets, {changes} would change; plan hash {hash}");
            let next = run.validated(next, message).await?;
            return self.after_finish(&next);
        }
        next.phase = Phase::Running;
        let message = format!("executing plan {hash} on {targets} targets");
        run.started(&mut next, "Executing", "Execute", message)
            .await?;
        self.execute(next).await
    }

    /// Execute after Validate: the stored rows are what runs, so they must be the validated
    /// ones; batches are read one at a time as they execute.
    async fn execute_validated(
        &self,
        run: Run<'_, BulkUserChange>,
        mut status: OperationStatus,
    ) -> Result<Action, Error> {
        let plan = status.plan.clone().unwrap_or_default();
        if let Some(approved) = self.spec().approved_plan_hash.as_ref() {
            if *approved != plan.hash {
                let err = Error::PlanChanged {
                    approved: approved.clone(),
                    current: plan.hash.clone(),
                };
                status.phase = Phase::Failed;
                return run.blocked(status, &err).await;
            }
        }
        let batches = status.progress.as_ref().map(|p| p.batches).unwrap_or(0) as usize;
        for index in 0..batches {
            if let Err(e) = run.verified(index, &plan.batch_digests).await {
                if matches!(e, Error::PlanTampered { .. }) {
                    // The refusal belongs to this run: the next reconcile must not plan afresh
                    // and execute what nobody reviewed.
                    status.phase = Phase::Failed;
                    status.progress = Some(self.lineage.progress(batches, batches, None));
                }
                return run.blocked(status, &e).await;
            }
        }
        let targets = status.summary.as_ref().map(|s| s.targets).unwrap_or(0);
        status.summary = Some(Summary {
            targets,
            ..Summary::default()
        });
        status.observed_generation = self.buc.metadata.generation;
        status.phase = Phase::Running;
        status.start_time = Some(conditions::now());
        status.completion_time = None;
        status.progress = Some(self.lineage.progress(batches, 0, None));
        let message = format!("executing plan {} on {targets} targets", plan.hash);
        run.started(&mut status, "Executing", "Execute", message)
            .await?;
        self.execute(status).await
    }

    /// Executes the unfinished batches of the current run through the engine, which records
    /// each step of each target before its side effect and its outcome after.
    async fn execute(&self, status: OperationStatus) -> Result<Action, Error> {
        let run = self.run(status.plan.as_ref());
        let ready = async {
            let (conn, backend) = self.backend().await?;
            let intent = self.intent().await?;
            Ok::<_, Error>((conn, backend, intent))
        };
        let (conn, backend, intent) = match ready.await {
            Ok(r) => r,
            Err(e) => return run.blocked(status, &e).await,
        };
        // The plan pinned the Secrets it reads: the rest of the run writes those values or none.
        let request = user_plan::with_secret_references(&request::spec_hash(self.spec()), &intent);
        if status.plan.as_ref().is_some_and(|p| p.spec_hash != request) {
            return run.blocked(status, &Error::SecretChanged).await;
        }
        let secrets: HashMap<UserField, Secret> = intent
            .fields
            .into_iter()
            .filter_map(|f| match f.wanted {
                Wanted::Secret(s) => Some((f.field, s)),
                _ => None,
            })
            .collect();
        let ns = self.buc.namespace().unwrap_or_default();
        let mailer = mailer(&self.ctx.client, &ns, &conn).await;
        let atomic = self.spec().failure_policy == FailurePolicy::Atomic;
        let stopping = || self.ctx.is_stopping();
        let timed = Timed {
            inner: backend.as_ref(),
            metrics: &self.ctx.metrics,
        };
        let run_key = super::revert::run_key(self.buc, &status);
        let exec = UserExec {
            backend: &timed,
            secrets: &secrets,
            mailer: mailer.as_ref().map(|m| m as &dyn Outbox),
            domain: &conn.spec.domain,
            atomic,
            journal: &run,
            stopping: &stopping,
            run_key: &run_key,
        };
        let mut status = match run.execute(status, &exec, atomic).await? {
            Ok(status) => status,
            Err(action) => return Ok(action),
        };
        if self.spec().policy == Policy::Enforce {
            status.last_checked_time = Some(conditions::now());
        }
        let status = run.finish(status, "Execute").await?;
        self.after_finish(&status)
    }

    fn enforced(&self) -> Option<Duration> {
        let spec = self.spec();
        (spec.policy == Policy::Enforce && spec.mode == Mode::Execute).then(|| {
            spec.interval
                .as_deref()
                .and_then(parse_duration)
                .unwrap_or(DEFAULT_ENFORCE_INTERVAL)
        })
    }

    /// A finished run: nothing to do unless the policy is Enforce and a check is due.
    async fn finished(&self, status: OperationStatus) -> Result<Action, Error> {
        // Only a run that went through is a desired state to enforce: a refused one (an edited
        // plan, a changed approval) is not, and a partly failed one keeps its journal for the
        // retry that finishes it (a correction run would overwrite it).
        let executed = status.phase == Phase::Succeeded;
        let Some(interval) = self.enforced().filter(|_| executed) else {
            return Ok(Action::await_change());
        };
        let last = status
            .last_checked_time
            .as_ref()
            .or(status.completion_time.as_ref())
            .map(|t| t.0);
        let now = jiff::Timestamp::now();
        if let Some(last) = last {
            let due = last + jiff::SignedDuration::try_from(interval).unwrap_or_default();
            if due > now {
                let wait = due.duration_since(now).unsigned_abs();
                return Ok(Action::requeue(wait.max(Duration::from_secs(1))));
            }
        }
        self.enforce(status).await
    }

    /// Enforce: re-reads the targets; when they drifted, executes a correction run that writes
    /// fields only (never the change's actions or mail again).
    async fn enforce(&self, mut status: OperationStatus) -> Result<Action, Error> {
        let run = self.run(status.plan.as_ref());
        let planned = async {
            let (_, backend) = self.backend().await?;
            let intent = self.intent().await?;
            let hash = user_plan::with_secret_references(&request::spec_hash(self.spec()), &intent);
            let timed = Timed {
                inner: backend.as_ref(),
                metrics: &self.ctx.metrics,
            };
            let mut drifted = Vec::new();
            let plan = match self.plan(&timed, &intent, None, &hash).await? {
                Planned::Rows(rows, plan) => {
                    drifted.extend(rows.into_iter().filter_map(drift_repair));
                    plan
                }
                Planned::Users(mut planner) => {
                    while let Some(rows) = planner.next_chunk().await? {
                        drifted.extend(rows.into_iter().filter_map(drift_repair));
                    }
                    planner.finish()
                }
                Planned::Csv(mut planner) => loop {
                    while let Some(rows) = planner.next_chunk().await? {
                        drifted.extend(rows.into_iter().filter_map(drift_repair));
                    }
                    match planner.finish().await? {
                        CsvEnd::Done(plan) => break plan,
                        CsvEnd::Again(again) => {
                            drifted.clear();
                            planner = again;
                        }
                    }
                },
            };
            Ok::<_, Error>((drifted, plan))
        };
        let (drifted, mut plan) = match planned.await {
            Ok(p) => p,
            Err(e) => return run.blocked(status, &e).await,
        };
        if drifted.is_empty() {
            status.last_checked_time = Some(conditions::now());
            run.write_status(&status).await?;
            return self.after_finish(&status);
        }
        let n = drifted.len() as u64;
        let run = self.run(Some(&plan));
        let stored = run.store_plan(drifted.into_iter()).await?;
        plan.batch_digests = stored.digests;
        let check = jiff::Timestamp::now().as_second();
        status.corrections = Some(status.corrections.unwrap_or(0) + n);
        status.results_refs = stored.refs;
        status.plan = Some(plan);
        status.summary = Some(Summary {
            targets: n as u32,
            ..Summary::default()
        });
        status.progress = Some(
            self.lineage
                .progress(status.results_refs.len(), 0, Some(check)),
        );
        status.phase = Phase::Running;
        run.write_status(&status).await?;
        let note = format!("{n} targets drifted from the desired state; correcting them");
        self.ctx
            .publish(
                self.buc,
                EventType::Normal,
                "DriftCorrected",
                "Enforce",
                Some(note),
            )
            .await;
        self.execute(status).await
    }

    fn after_finish(&self, status: &OperationStatus) -> Result<Action, Error> {
        self.ctx.reset_failures(&self.buc.uid().unwrap_or_default());
        match self.enforced() {
            Some(interval) if status.phase != Phase::Failed => Ok(Action::requeue(interval)),
            _ => Ok(Action::await_change()),
        }
    }

    /// Reads the targets (or the CSV) and plans their rows. `earlier`: the run a retry builds on.
    async fn plan<'p>(
        &'p self,
        backend: &'p dyn PbxBackend,
        intent: &'p Intent,
        earlier: Option<&'p Earlier<'p, 'p, BulkUserChange>>,
        spec_hash: &'p str,
    ) -> Result<Planned<'p>, Error> {
        let spec = self.spec();
        if let Some(of) = &spec.revert_of {
            let kept = match earlier {
                Some(e) => e.all().await?,
                None => Vec::new(),
            };
            let kept = kept
                .iter()
                .filter_map(crate::engine::steps::kept_by_retry)
                .collect();
            let (rows, plan) = super::revert::plan_user_revert(
                self.ctx, self.buc, &of.name, backend, kept, spec_hash,
            )
            .await?;
            return Ok(Planned::Rows(rows, plan));
        }
        let req = UserRequest {
            intent,
            spec_hash,
            generation: self.buc.metadata.generation.unwrap_or(0),
            earlier: earlier.map(|e| e as &dyn EarlierRun),
            atomic: spec.failure_policy == FailurePolicy::Atomic,
        };
        if let Some(source) = &spec.source {
            let ns = self.buc.namespace().unwrap_or_default();
            let max = self.ctx.max_csv_bytes;
            let bytes = csv_source::fetch(&self.ctx.client, &ns, &source.csv).await?;
            let planner = CsvPlanner::new(backend, bytes, max, req).await?;
            return Ok(Planned::Csv(Box::new(planner)));
        }
        let targets = spec.targets.clone().unwrap_or_default();
        let selector = Selector {
            groups: targets.groups,
            extensions: targets.extensions,
            exclude: targets.exclude,
            max_targets: targets.max_targets,
        };
        let planner = UserPlanner::new(backend, selector, req).await?;
        Ok(Planned::Users(planner))
    }

    /// Stores a plan's rows as the run's journal; a user plan chunk by chunk as it is made.
    async fn store(
        &self,
        planned: Planned<'_>,
        earlier: Option<&Earlier<'_, '_, BulkUserChange>>,
    ) -> Result<(Plan, StoredPlan), Error> {
        match planned {
            Planned::Rows(rows, plan) => {
                let stored = self.run(Some(&plan)).store_plan(rows.into_iter()).await?;
                Ok((plan, stored))
            }
            Planned::Csv(mut planner) => {
                // The result CSV echoes the file's header, known before any row is planned.
                let run = Run::new(self.ctx, self.buc, Some(planner.header()));
                loop {
                    let mut writer = match earlier {
                        Some(e) => run.plan_writer_over(e),
                        None => run.plan_writer(),
                    };
                    while let Some(rows) = planner.next_chunk().await? {
                        for row in rows {
                            writer.push(row).await?;
                        }
                    }
                    match planner.finish().await? {
                        CsvEnd::Done(plan) => return Ok((plan, writer.finish().await?)),
                        // The next pass overwrites this one's batches from the first.
                        CsvEnd::Again(again) => planner = again,
                    }
                }
            }
            Planned::Users(mut planner) => {
                let run = self.run(None);
                let mut writer = match earlier {
                    Some(e) => run.plan_writer_over(e),
                    None => run.plan_writer(),
                };
                while let Some(rows) = planner.next_chunk().await? {
                    for row in rows {
                        writer.push(row).await?;
                    }
                }
                Ok((planner.finish(), writer.finish().await?))
            }
        }
    }
}

/// A planned row as a drift repair: its non-secret writes only (what the PBX stores for secret
/// fields, salted hashes, cannot be compared with the Secret), or None when it has none.
fn drift_repair(mut r: Row) -> Option<Row> {
    r.writes.retain(|w| !w.secret);
    r.actions.clear();
    r.steps.retain(|s| s.kind == StepKind::Write);
    r.changes
        .retain(|c| !UserField::from_name(&c.field).is_some_and(UserField::is_secret));
    (r.outcome == crate::api::Outcome::Planned && !r.writes.is_empty()).then_some(r)
}
