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
use super::run::{self, Run, RunKind};
use super::user_change::RETRY_ANNOTATION;
use super::{Context, Error};
use crate::api::{OperationStatus, PbxConnection, Phase, Progress, Summary, UserRecycle};
use crate::engine::recycle::RecycleExec;
use crate::engine::results::{self, Digest};
use crate::engine::users::Outbox;
use crate::pbx::kamailio::Kamailio;
use crate::pbx::{PbxBackend, UserSelection};
use crate::plan::recycle as plan;
use crate::plan::stored::Row;

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
        run::user_summary(done, before)
    }

    fn verdict(summary: &Summary) -> (Phase, String) {
        run::user_verdict(summary)
    }

    fn retry_hint(&self) -> String {
        format!(
            "fix the causes in status.results, then set annotation {RETRY_ANNOTATION} to re-run only the failed targets (steps already done are not repeated)"
        )
    }
}

/// The run a resource asks for: its generation, plus the retry annotation when set.
fn lineage(urc: &UserRecycle) -> String {
    let mut run = format!("g{}", urc.metadata.generation.unwrap_or(0));
    if let Some(retry) = urc.annotations().get(RETRY_ANNOTATION) {
        let clean: String = retry
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(40)
            .collect();
        run.push_str(&format!("-retry-{clean}"));
    }
    run
}

#[tracing::instrument(skip_all, fields(recycle = %urc.name_any(), namespace = urc.namespace()))]
pub(crate) async fn reconcile(urc: Arc<UserRecycle>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer(KIND);
    let status = urc.status.clone().unwrap_or_default();
    let lineage = lineage(&urc);
    let run = Run::new(&ctx, &*urc, None);
    match &status.progress {
        Some(p) if p.run == lineage && p.done < p.batches => execute(&run, status).await,
        Some(p) if p.run == lineage => Ok(Action::await_change()),
        _ => start(&run, status, lineage).await,
    }
}

async fn backend(run: &Run<'_, UserRecycle>) -> Result<(PbxConnection, Arc<Kamailio>), Error> {
    let name = &run.obj.spec.connection_ref.name;
    (run.ctx.backends)
        .by_name(&run.ctx.client, &run.namespace(), name)
        .await
}

/// Plans a new run (or a retry of the failed targets of the last one), stores its rows, and
/// starts executing.
async fn start(
    run: &Run<'_, UserRecycle>,
    status: OperationStatus,
    run_id: String,
) -> Result<Action, Error> {
    let (conn, backend) = match backend(run).await {
        Ok(b) => b,
        Err(e) => return run.blocked(status, &e).await,
    };
    let earlier = match status.progress.as_ref() {
        Some(p) if run_id.contains("-retry-") && super::same_generation(&p.run, &run_id) => {
            let digests = status
                .plan
                .as_ref()
                .map(|p| p.batch_digests.clone())
                .unwrap_or_default();
            // Without what the earlier run did, a retry plans, changes and prunes nothing.
            match run.verified_all(p.batches as usize, &digests).await {
                Ok(rows) => Some(rows),
                Err(e) => return run.blocked(status, &e).await,
            }
        }
        _ => None,
    };
    let (rows, mut plan) = match plan_rows(run, backend.as_ref(), earlier).await {
        Ok(p) => p,
        Err(e) => return run.blocked(status, &e).await,
    };
    let spec = &run.obj.spec;
    let stored = run.store_plan(rows.into_iter()).await?;
    plan.batch_digests = stored.digests;
    let (shown, truncated) = results::for_status(stored.digest.shown.iter());
    let message = format!(
        "resetting {} users ({} recycled to new people); plan {}",
        plan.changes,
        spec.recycle.len(),
        plan.hash
    );
    let mut next = OperationStatus {
        observed_generation: run.obj.metadata.generation,
        phase: Phase::Running,
        plan: Some(plan),
        results_truncated: truncated || stored.digest.rows > shown.len(),
        results: shown,
        summary: Some(stored.digest.summary),
        progress: Some(Progress {
            run: run_id,
            batches: stored.refs.len() as u32,
            done: 0,
        }),
        results_refs: stored.refs,
        start_time: Some(super::conditions::now()),
        conditions: status.conditions.clone(),
        warnings: plan::warnings(spec, &conn.name_any(), conn.spec.smtp.is_some()),
        ..Default::default()
    };
    run.started(&mut next, "Executing", "Execute", message)
        .await?;
    execute(run, next).await
}

/// Reads what the PBX holds of the targets and plans their rows.
async fn plan_rows(
    run: &Run<'_, UserRecycle>,
    backend: &dyn PbxBackend,
    earlier: Option<Vec<Row>>,
) -> Result<(Vec<Row>, crate::api::Plan), Error> {
    let spec = &run.obj.spec;
    let scope = plan::scope(spec, earlier);
    let selection = UserSelection {
        groups: vec![],
        extensions: scope.targets.clone(),
    };
    let metrics = &run.ctx.metrics;
    let users = metrics
        .pbx_call("read_users", backend.read_users(&selection))
        .await?
        .users;
    let phones = metrics
        .pbx_call("read_phones", backend.read_phones(&selection))
        .await?;
    let generation = run.obj.metadata.generation.unwrap_or(0);
    Ok(plan::plan(spec, generation, scope, &users, &phones))
}

/// Executes the unfinished batches of the current run, then finishes it.
async fn execute(run: &Run<'_, UserRecycle>, status: OperationStatus) -> Result<Action, Error> {
    let (conn, backend) = match backend(run).await {
        Ok(b) => b,
        Err(e) => return run.blocked(status, &e).await,
    };
    let spec = &run.obj.spec;
    let mailer = match spec.send_welcome_email {
        true => mailer(&run.ctx.client, &run.namespace(), &conn).await,
        false => None,
    };
    let parts = plan::reset_parts(&spec.reset);
    let stopping = || run.ctx.is_stopping();
    let exec = RecycleExec {
        backend: backend.as_ref(),
        parts: &parts,
        mailer: mailer.as_ref().map(|m| m as &dyn Outbox),
        domain: &conn.spec.domain,
        journal: run,
        stopping: &stopping,
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

    fn urc(generation: i64, retry: Option<&str>) -> UserRecycle {
        let spec: UserRecycleSpec = serde_json::from_value(serde_json::json!({
            "connectionRef": { "name": "acme" },
            "targets": { "extensions": ["201"] },
        }))
        .unwrap();
        let mut u = UserRecycle::new("leavers", spec);
        u.metadata.generation = Some(generation);
        if let Some(r) = retry {
            u.annotations_mut()
                .insert(RETRY_ANNOTATION.into(), r.into());
        }
        u
    }

    #[test]
    fn a_run_is_named_by_its_generation_and_retry() {
        assert_eq!(lineage(&urc(3, None)), "g3");
        assert_eq!(
            lineage(&urc(3, Some("2026-11-02 a/b"))),
            "g3-retry-2026-11-02ab"
        );
        assert!(super::super::same_generation(
            &lineage(&urc(3, None)),
            &lineage(&urc(3, Some("1")))
        ));
    }

    #[test]
    fn a_failed_run_says_how_to_retry_only_the_failed_targets() {
        let hint = urc(1, None).retry_hint();
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
