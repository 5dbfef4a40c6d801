//! BulkPhoneChange: set fields on many phones (only Open locks), first of all the model, which is
//! assigned only when every selected phone has the same vendor. The plan is
//! [`crate::plan::phones::plan_change`], the writes [`crate::engine::phones::PhoneWriteExec`],
//! the lifecycle [`super::run`]; this file maps the spec to them.

use std::sync::Arc;

use kube::{
    ResourceExt,
    runtime::{controller::Action, events::EventType},
};

use super::conditions::{self, Desired};
use super::run::{self, Run, RunKind};
use super::{Context, Error};
use crate::api::{BulkPhoneChange, Mode, OperationStatus, Phase, Plan, Progress, Summary};
use crate::engine::phones::PhoneWriteExec;
use crate::engine::results::{self, Digest};
use crate::pbx::{PbxBackend, UserSelection};
use crate::plan::PlanError;
use crate::plan::phones::{self, PhoneFilter};
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
        run::user_summary(done, before)
    }

    fn verdict(s: &Summary) -> (Phase, String) {
        let (phase, _) = run::user_verdict(s);
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
    let run_id = format!("g{}", b.metadata.generation.unwrap_or(0));
    let run = Run::new(&ctx, &*b, None);
    match &status.progress {
        Some(p) if p.run == run_id && p.done >= p.batches => Ok(Action::await_change()),
        Some(p) if p.run == run_id => execute(&run, status).await,
        _ => start(&run, status, run_id).await,
    }
}

/// Plans (or takes the validated plan), stores it, and validates or starts executing.
async fn start(
    run: &Run<'_, BulkPhoneChange>,
    status: OperationStatus,
    run_id: String,
) -> Result<Action, Error> {
    let b = run.obj;
    let spec_hash = phones::change_spec_hash(&b.spec);
    let validated = status.phase == Phase::Validated
        && b.spec.mode == Mode::Execute
        && status
            .plan
            .as_ref()
            .is_some_and(|p| p.spec_hash == spec_hash);
    let (plan, refs, digest) = if validated {
        // The stored rows are what runs: they must be the ones validated.
        let plan = status.plan.clone().expect("checked");
        let batches = status.progress.as_ref().map(|p| p.batches).unwrap_or(0);
        let mut digest = Digest::default();
        for index in 0..batches as usize {
            match run.verified(index, &plan.batch_digests).await {
                Ok(rows) => digest.merge(Digest::of(&rows)),
                Err(e) => return refuse(run, status, &e, None).await,
            }
        }
        (plan, status.results_refs.clone(), digest)
    } else {
        let (rows, mut plan) = match plan(run).await {
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
        let stored = run.store_plan(rows.into_iter()).await?;
        plan.batch_digests = stored.digests;
        (plan, stored.refs, stored.digest)
    };
    let generation = b.metadata.generation;
    let batches = refs.len() as u32;
    let (shown, truncated) = results::for_status(digest.shown.iter());
    let mut next = OperationStatus {
        observed_generation: generation,
        plan: Some(plan.clone()),
        results_refs: refs,
        results: shown,
        results_truncated: truncated || digest.rows > digest.shown.len(),
        start_time: Some(conditions::now()),
        conditions: status.conditions.clone(),
        summary: Some(Summary {
            targets: plan.targets,
            ..digest.summary.clone()
        }),
        progress: Some(Progress {
            run: run_id,
            batches,
            done: 0,
        }),
        ..Default::default()
    };
    if b.spec.mode == Mode::Validate {
        return validated_plan(run, next, &plan).await;
    }
    next.phase = Phase::Running;
    let message = format!("changing {} of {} phones", plan.changes, plan.targets);
    run.started(&mut next, "Changing", "Change", message)
        .await?;
    execute(run, next).await
}

/// A validated plan: Ready and Validated, with the hash to approve.
async fn validated_plan(
    run: &Run<'_, BulkPhoneChange>,
    mut next: OperationStatus,
    plan: &Plan,
) -> Result<Action, Error> {
    let generation = run.obj.metadata.generation;
    let now = conditions::now();
    next.phase = Phase::Validated;
    next.completion_time = Some(now.clone());
    if let Some(p) = next.progress.as_mut() {
        p.done = p.batches;
    }
    if let Some(s) = next.summary.as_mut() {
        s.changed = plan.changes;
    }
    let message = format!(
        "planned: {} phones, {} would change; plan hash {}",
        plan.targets, plan.changes, plan.hash
    );
    let desired = Desired {
        type_: conditions::VALIDATED,
        status: true,
        reason: "Planned",
        message: message.clone(),
    };
    conditions::upsert(&mut next.conditions, desired, generation, &now);
    super::mark_finished(
        &mut next.conditions,
        true,
        "Validated",
        &message,
        generation,
    );
    run.write_status(&next).await?;
    run.ctx
        .publish(
            run.obj,
            EventType::Normal,
            "Validated",
            "Change",
            Some(format!("{message}{}", run.requested_by())),
        )
        .await;
    run.ctx.reset_failures(&run.obj.uid().unwrap_or_default());
    Ok(Action::await_change())
}

/// Reads the selected phones and plans their writes.
async fn plan(run: &Run<'_, BulkPhoneChange>) -> Result<(Vec<Row>, Plan), Error> {
    let (ctx, b) = (run.ctx, run.obj);
    let (_, backend) = ctx
        .backends
        .by_name(&ctx.client, &run.namespace(), &b.spec.connection_ref.name)
        .await?;
    let t = &b.spec.targets;
    let selection = UserSelection {
        groups: t.groups.clone(),
        extensions: t.extensions.clone(),
    };
    let m = &ctx.metrics;
    let users = m
        .pbx_call("read_users", backend.read_users(&selection))
        .await?;
    let provisioned = m
        .pbx_call("read_phones", backend.read_phones(&selection))
        .await?;
    let filter = PhoneFilter {
        exclude: t.exclude.clone(),
        models: t.models.clone(),
        vendors: t.vendors.clone(),
        max_targets: t.max_targets,
    };
    let names: Vec<String> = users.users.iter().map(|u| u.extension.clone()).collect();
    let selected = phones::select(&names, &provisioned, &[], &filter)?;
    let generation = b.metadata.generation.unwrap_or(0);
    Ok(phones::plan_change(
        &b.spec,
        generation,
        &selected,
        &provisioned,
    )?)
}

async fn execute(run: &Run<'_, BulkPhoneChange>, status: OperationStatus) -> Result<Action, Error> {
    let ctx = run.ctx;
    let backend = match ctx
        .backends
        .by_name(
            &ctx.client,
            &run.namespace(),
            &run.obj.spec.connection_ref.name,
        )
        .await
    {
        Ok((_, backend)) => backend,
        Err(e) => return run.blocked(status, &e).await,
    };
    let exec = PhoneWriteExec {
        backend: backend.as_ref() as &dyn PbxBackend,
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
