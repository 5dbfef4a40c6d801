//! UserRecycle: reset users so their extensions can be reused, and hand some to new people.
//!
//! Kubernetes glue only: the spec becomes a plan ([`crate::plan::recycle`]: one row per target
//! with its typed steps), stored and executed through the shared lifecycle ([`super::run`])
//! by [`RecycleExec`], which records each step before and after its side effect. A restarted
//! operator resumes each target at its step; a target already given to its new person is never
//! reset again, and a welcome email is never sent twice (one under way at a crash is reported
//! Uncertain; a retry sends exactly those).

use std::sync::Arc;

use kube::{ResourceExt, runtime::controller::Action};

use super::backends::mailer;
use super::ledger::Gate;
use super::lineage::{Lineage, RETRY_ANNOTATION};
use super::metrics::Timed;
use super::retry::Earlier;
use super::run::{self, Run, RunKind};
use super::{Context, Error};
use crate::api::{OperationStatus, PbxConnection, Phase, Summary, UserRecycle};
use crate::engine::outbox::Outbox;
use crate::engine::recycle::{RecycleExec, plan_recycle};
use crate::engine::results::{self, Digest};
use crate::pbx::PbxBackend;
use crate::plan::recycle as plan;

const KIND: &str = "UserRecycle";

impl RunKind for UserRecycle {
    type Summary = Summary;

    const KIND: &'static str = KIND;

    fn requested_by(&self) -> Option<&str> {
        self.spec.requested_by.as_deref()
    }

    fn status(&self) -> Option<&OperationStatus> {
        self.status.as_ref()
    }

    fn summary(done: &Digest, before: Option<&Summary>) -> Summary {
        results::user_summary(done, before)
    }

    fn verdict(summary: &Summary) -> (Phase, String) {
        results::user_verdict(summary)
    }

    fn retry_hint(&self) -> String {
        format!(
            "fix the causes in status.results, then set annotation {RETRY_ANNOTATION} to re-run only the failed targets (steps already done are not repeated)"
        )
    }
}

#[tracing::instrument(skip_all, fields(recycle = %urc.name_any(), namespace = urc.namespace()))]
pub(crate) async fn reconcile(urc: Arc<UserRecycle>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer(KIND);
    let status = urc.status.clone().unwrap_or_default();
    let lineage = Lineage::of(&*urc);
    let run = Run::new(&ctx, &*urc, None);
    match &status.progress {
        Some(p) if lineage.serves(p) && run::unfinished(&status) => execute(&run, status).await,
        Some(p) if lineage.serves(p) => Ok(Action::await_change()),
        _ => start(&run, status, lineage).await,
    }
}

async fn backend(
    run: &Run<'_, UserRecycle>,
) -> Result<(PbxConnection, Arc<dyn PbxBackend>), Error> {
    let ns = run.obj.namespace().unwrap_or_default();
    let name = &run.obj.spec.connection_ref.name;
    let (conn, backend) = run.ctx.backends.by_name(&run.ctx.client, &ns, name).await?;
    Ok((conn, backend))
}

/// Plans a new run (or a retry of the failed targets of the last one), stores its rows, and
/// starts executing.
async fn start(
    run: &Run<'_, UserRecycle>,
    status: OperationStatus,
    lineage: Lineage,
) -> Result<Action, Error> {
    let status = match run.gate(status).await? {
        Gate::Plan(status) => status,
        Gate::Resume(status) => return execute(run, status).await,
        Gate::Done(action) => return Ok(action),
    };
    let (conn, backend) = match backend(run).await {
        Ok(b) => b,
        Err(e) => return run.blocked(status, &e).await,
    };
    // A retry builds on the earlier run of the same spec generation: without its results
    // (neither the ConfigMaps nor the ledger's copy), nothing is planned, changed or pruned.
    let earlier = status
        .progress
        .as_ref()
        .filter(|p| lineage.retry.is_some() && lineage.same_generation(p));
    let earlier = match earlier {
        Some(p) => {
            let digests = status.plan.as_ref().map(|p| p.batch_digests.clone());
            let digests = digests.unwrap_or_default();
            match Earlier::new(&run, p.batches as usize, digests).all().await {
                Ok(rows) => Some(rows),
                Err(e) => return run.blocked(status, &e).await,
            }
        }
        None => None,
    };
    let spec = &run.obj.spec;
    let timed = Timed {
        inner: backend.as_ref(),
        metrics: &run.ctx.metrics,
    };
    let generation = run.obj.metadata.generation.unwrap_or(0);
    let planned = match &spec.revert_of {
        Some(of) => {
            let kept = earlier
                .iter()
                .flatten()
                .filter_map(crate::engine::steps::kept_by_retry)
                .collect();
            super::revert::plan_recycle_revert(run.ctx, run.obj, &of.name, &timed, kept).await
        }
        None => plan_recycle(&timed, spec, generation, earlier)
            .await
            .map_err(Error::from),
    };
    let (rows, plan) = match planned {
        Ok(p) => p,
        Err(e) => return run.blocked(status, &e).await,
    };
    let message = match &spec.revert_of {
        Some(of) => format!(
            "restoring {} users {} reset or recycled from their snapshots; plan {}",
            plan.changes, of.name, plan.hash
        ),
        None => format!(
            "resetting {} users ({} recycled to new people); plan {}",
            plan.changes,
            spec.recycle.len(),
            plan.hash
        ),
    };
    let stored = run.store_plan(rows.into_iter()).await?;
    let progress = lineage.progress(stored.refs.len(), 0, None);
    let mut next = run.stored_status(plan, stored, progress, &status);
    next.phase = Phase::Running;
    next.warnings = plan::warnings(spec, &conn.name_any(), conn.spec.smtp.is_some());
    run.started(&mut next, "Executing", "Execute", message)
        .await?;
    execute(run, next).await
}

/// Executes the unfinished batches of the current run, then finishes it.
async fn execute(run: &Run<'_, UserRecycle>, status: OperationStatus) -> Result<Action, Error> {
    let (conn, backend) = match backend(run).await {
        Ok(b) => b,
        Err(e) => return run.blocked(status, &e).await,
    };
    let spec = &run.obj.spec;
    let mailer = match spec.send_welcome_email {
        true => {
            let ns = run.obj.namespace().unwrap_or_default();
            mailer(&run.ctx.client, &ns, &conn).await
        }
        false => None,
    };
    let parts = plan::reset_parts(&spec.reset);
    let stopping = || run.ctx.is_stopping();
    let timed = Timed {
        inner: backend.as_ref(),
        metrics: &run.ctx.metrics,
    };
    let run_key = super::revert::run_key(run.obj, &status);
    let exec = RecycleExec {
        backend: &timed,
        parts: &parts,
        mailer: mailer.as_ref().map(|m| m as &dyn Outbox),
        domain: &conn.spec.domain,
        journal: run,
        stopping: &stopping,
        run_key: &run_key,
    };
    match run.execute(status, &exec, false).await? {
        Ok(status) => {
            run.finish(status, "Execute").await?;
            Ok(Action::await_change())
        }
        Err(action) => Ok(action),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::UserRecycleSpec;

    fn urc() -> UserRecycle {
        let spec: UserRecycleSpec = serde_json::from_value(serde_json::json!({
            "connectionRef": { "name": "acme" },
            "targets": { "extensions": ["201"] },
        }))
        .unwrap();
        UserRecycle::new("leavers", spec)
    }

    #[test]
    fn a_failed_run_says_how_to_retry_only_the_failed_targets() {
        let hint = urc().retry_hint();
        assert!(hint.contains(RETRY_ANNOTATION) && hint.contains("not repeated"));
        let (phase, message) = UserRecycle::verdict(&Summary {
            targets: 2,
            changed: 1,
            uncertain: 1,
            ..Default::default()
        });
        assert_eq!(phase, Phase::PartiallyFailed);
        assert!(message.contains("1 uncertain"), "{message}");
    }
}
