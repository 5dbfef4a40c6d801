//! BulkPhoneChange: set fields on many phones (only Open locks), first of all the model, which is
//! assigned only when every selected phone has the same vendor. The plan is
//! [`crate::plan::phones::plan_change`], the writes [`crate::engine::phones::PhoneWriteExec`],
//! the lifecycle [`super::run`]; this file maps the spec to them.

use std::sync::Arc;

use kube::{ResourceExt, runtime::controller::Action};

use super::conditions;
use super::ledger::Gate;
use super::lineage::Lineage;
use super::metrics::Timed;
use super::run::{self, Run, RunKind};
use super::{Context, Error};
use crate::api::{BulkPhoneChange, Mode, OperationStatus, Phase, Plan, Summary};
use crate::engine::phones::{self as exec_phones, PhoneWriteExec};
use crate::engine::results::{self, Digest};
use crate::plan::PlanError;
use crate::plan::phones;
use crate::plan::stored::Row;

impl RunKind for BulkPhoneChange {
    type Summary = Summary;
    const KIND: &'static str = "BulkPhoneChange";

    fn requested_by(&self) -> Option<&str> {
        self.spec.requested_by.as_deref()
    }

    fn status(&self) -> Option<&OperationStatus> {
        self.status.as_ref()
    }

    fn summary(done: &Digest, before: Option<&Summary>) -> Summary {
        results::user_summary(done, before)
    }

    fn verdict(s: &Summary) -> (Phase, String) {
        let (phase, _) = results::user_verdict(s);
        let message = format!(
            "{} phones: {} changed, {} unchanged, {} failed, {} conflicts",
            s.targets, s.changed, s.unchanged, s.failed, s.conflicts
        );
        (phase, message)
    }

    fn retry_hint(&self) -> String {
        "review status.results, then edit the spec: a new generation is planned again from the phones as they are".into()
    }
}

#[tracing::instrument(skip_all, fields(change = %b.name_any(), namespace = b.namespace()))]
pub(crate) async fn reconcile(b: Arc<BulkPhoneChange>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer(BulkPhoneChange::KIND);
    let status = b.status.clone().unwrap_or_default();
    // One pass per spec generation (no retry: an edited spec is planned again).
    let wanted = Lineage {
        retry: None,
        ..Lineage::of(&*b)
    };
    let run = Run::new(&ctx, &*b, None);
    match &status.progress {
        Some(p) if wanted.serves(p) && run::unfinished(&status) => execute(&run, status).await,
        Some(p) if wanted.serves(p) => Ok(Action::await_change()),
        _ => start(&run, status, wanted).await,
    }
}

/// Plans (or takes the validated plan), stores it, and validates or starts executing.
async fn start(
    run: &Run<'_, BulkPhoneChange>,
    status: OperationStatus,
    wanted: Lineage,
) -> Result<Action, Error> {
    let status = match run.gate(status).await? {
        Gate::Plan(status) => status,
        Gate::Resume(status) => return execute(run, status).await,
        Gate::Done(action) => return Ok(action),
    };
    let b = run.obj;
    let spec_hash = phones::change_spec_hash(&b.spec);
    let validated = status.phase == Phase::Validated
        && b.spec.mode == Mode::Execute
        && status
            .plan
            .as_ref()
            .is_some_and(|p| p.spec_hash == spec_hash);
    if validated {
        return execute_validated(run, status, wanted).await;
    }
    let (rows, plan) = match plan(run).await {
        Ok(p) => p,
        Err(e) => return refuse(run, status, &e, None).await,
    };
    if b.spec.mode == Mode::Execute
        && let Some(approved) = b
            .spec
            .approved_plan_hash
            .as_ref()
            .filter(|h| **h != plan.hash)
    {
        let err = Error::PlanChanged {
            approved: approved.clone(),
            current: plan.hash.clone(),
        };
        return refuse(run, status, &err, Some(plan)).await;
    }
    let (targets, changes, hash) = (plan.targets, plan.changes, plan.hash.clone());
    let stored = run.store_plan(rows.into_iter()).await?;
    let batches = stored.refs.len();
    if b.spec.mode == Mode::Validate {
        let progress = wanted.progress(batches, batches, None);
        let mut next = run.stored_status(plan, stored, progress, &status);
        if let Some(s) = next.summary.as_mut() {
            s.changed = changes;
        }
        let message =
            format!("planned: {targets} phones, {changes} would change; plan hash {hash}");
        run.validated(next, message).await?;
        return Ok(Action::await_change());
    }
    let progress = wanted.progress(batches, 0, None);
    let next = run.stored_status(plan, stored, progress, &status);
    begin(run, next, targets, changes).await
}

/// Executes exactly the plan that was validated: its stored rows, checked against their digests.
async fn execute_validated(
    run: &Run<'_, BulkPhoneChange>,
    mut status: OperationStatus,
    wanted: Lineage,
) -> Result<Action, Error> {
    let plan = status.plan.clone().unwrap_or_default();
    if let Some(approved) = run.obj.spec.approved_plan_hash.as_ref() {
        if *approved != plan.hash {
            let err = Error::PlanChanged {
                approved: approved.clone(),
                current: plan.hash.clone(),
            };
            return refuse(run, status, &err, None).await;
        }
    }
    let batches = status.progress.as_ref().map(|p| p.batches).unwrap_or(0) as usize;
    let mut digest = Digest::default();
    for index in 0..batches {
        match run.verified(index, &plan.batch_digests).await {
            Ok(rows) => digest.merge(Digest::of(&rows)),
            Err(e) => {
                // A refusal belongs to this run: the next reconcile must not plan afresh and
                // execute what nobody reviewed. (A transient read error is only waited for.)
                if !e.is_transient() {
                    status.progress = Some(wanted.progress(batches, batches, None));
                }
                return refuse(run, status, &e, None).await;
            }
        }
    }
    let (shown, truncated) = results::for_status(digest.shown.iter());
    let next = OperationStatus {
        observed_generation: run.obj.metadata.generation,
        results: shown,
        results_truncated: truncated || digest.rows > digest.shown.len(),
        results_refs: status.results_refs.clone(),
        start_time: Some(conditions::now()),
        conditions: status.conditions.clone(),
        summary: Some(BulkPhoneChange::summary(&digest, None)),
        progress: Some(wanted.progress(batches, 0, None)),
        plan: Some(plan.clone()),
        ..Default::default()
    };
    begin(run, next, plan.targets, plan.changes).await
}

async fn begin(
    run: &Run<'_, BulkPhoneChange>,
    mut next: OperationStatus,
    targets: u32,
    changes: u32,
) -> Result<Action, Error> {
    next.phase = Phase::Running;
    let message = format!("changing {changes} of {targets} phones");
    run.started(&mut next, "Changing", "Change", message)
        .await?;
    execute(run, next).await
}

/// Reads the selected phones and plans their writes.
async fn plan(run: &Run<'_, BulkPhoneChange>) -> Result<(Vec<Row>, Plan), Error> {
    let (ctx, b) = (run.ctx, run.obj);
    let ns = b.namespace().unwrap_or_default();
    let (_, backend) = ctx
        .backends
        .by_name(&ctx.client, &ns, &b.spec.connection_ref.name)
        .await?;
    let timed = Timed {
        inner: backend.as_ref(),
        metrics: &ctx.metrics,
    };
    if let Some(of) = &b.spec.revert_of {
        let spec_hash = phones::change_spec_hash(&b.spec);
        return super::revert::plan_phone_revert(ctx, b, &of.name, &timed, &spec_hash).await;
    }
    let generation = b.metadata.generation.unwrap_or(0);
    Ok(exec_phones::plan_change(&timed, &b.spec, generation).await?)
}

async fn execute(run: &Run<'_, BulkPhoneChange>, status: OperationStatus) -> Result<Action, Error> {
    let ctx = run.ctx;
    let ns = run.obj.namespace().unwrap_or_default();
    let name = &run.obj.spec.connection_ref.name;
    let backend = match ctx.backends.by_name(&ctx.client, &ns, name).await {
        Ok((_, backend)) => backend,
        Err(e) => return run.blocked(status, &e).await,
    };
    let timed = Timed {
        inner: backend.as_ref(),
        metrics: &ctx.metrics,
    };
    let exec = PhoneWriteExec {
        backend: &timed,
        journal: run,
    };
    match run.execute(status, &exec, false).await? {
        Ok(status) => {
            run.finish(status, "Change").await?;
            Ok(Action::await_change())
        }
        Err(action) => Ok(action),
    }
}

/// A change that cannot be planned or approved: why, in conditions (MixedVendors for the
/// one-vendor rule), and the plan when there is one to review.
async fn refuse(
    run: &Run<'_, BulkPhoneChange>,
    mut status: OperationStatus,
    err: &Error,
    plan: Option<Plan>,
) -> Result<Action, Error> {
    let b = run.obj;
    let generation = b.metadata.generation;
    status.observed_generation = generation;
    if plan.is_some() {
        status.plan = plan;
    }
    let transient = super::mark_blocked(&mut status.conditions, err, generation);
    if let Error::Plan(PlanError::Invalid(m)) = err
        && m.contains("one vendor")
    {
        // A more precise reason than InvalidChange, for people and for alerts.
        for c in status
            .conditions
            .iter_mut()
            .filter(|c| c.type_ != conditions::RECONCILING)
        {
            c.reason = "MixedVendors".into();
        }
    }
    if !transient {
        status.phase = Phase::Failed;
        status.summary.get_or_insert_with(Summary::default);
    }
    if Some(&status) != b.status.as_ref() {
        run.write_status(&status).await?;
    }
    Ok(Action::requeue(
        run.ctx.backoff(&b.uid().unwrap_or_default(), transient),
    ))
}
