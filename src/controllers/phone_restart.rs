//! PhoneRestart: NOTIFY registered phones to reboot (or resync) at a bounded rate, each confirmed
//! by its fresh REGISTER. The window is this kind's own (before `notBefore`: Scheduled; after
//! `notAfter`: the rest Expired); the plan is [`crate::plan::phones`], the NOTIFYs
//! [`crate::engine::phones::RestartExec`] (at most one per phone per run, across operator
//! restarts), the lifecycle [`super::run`]. The retry annotation sends a NOTIFY once more to
//! exactly the phones that failed or are uncertain.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::{ResourceExt, runtime::controller::Action};

use super::backends::RateLimit;
use super::ledger::Gate;
use super::lineage::{Lineage, RETRY_ANNOTATION};
use super::metrics::Timed;
use super::retry::Earlier;
use super::run::{Run, RunKind};
use super::{Context, Error};
use crate::api::{Outcome, parse_duration};
use crate::api::{Phase, PhoneRestart, PhoneRestartStatus, Progress, RestartSummary};
use crate::engine;
use crate::engine::phones::{self as exec_phones, Pace, RestartExec};
use crate::engine::results::{self, Digest};
use crate::plan::phones;
use crate::plan::stored::Row;

const RUN: &str = "restart";
const DEFAULT_IN_FLIGHT: u32 = 20;
const DEFAULT_PER_SECOND: u32 = 50;
const DEFAULT_CONFIRM: Duration = Duration::from_secs(300);

impl RunKind for PhoneRestart {
    type Summary = RestartSummary;
    const KIND: &'static str = "PhoneRestart";

    fn requested_by(&self) -> Option<&str> {
        self.spec.requested_by.as_deref()
    }

    fn status(&self) -> Option<&PhoneRestartStatus> {
        self.status.as_ref()
    }

    fn summary(done: &Digest, before: Option<&RestartSummary>) -> RestartSummary {
        results::restart_totals(done, before)
    }

    fn verdict(s: &RestartSummary) -> (Phase, String) {
        results::restart_verdict(s)
    }

    fn retry_hint(&self) -> String {
        format!(
            "set annotation {RETRY_ANNOTATION} to send one more NOTIFY to exactly the phones that failed or are uncertain (phones that restarted or accepted get none)"
        )
    }
}

#[async_trait::async_trait]
impl Pace for RateLimit {
    async fn acquire(&self) {
        RateLimit::acquire(self).await
    }
}

/// A restart is sent once: a spec edited afterwards changes nothing, only a new value of the
/// retry annotation runs again. Its run is named `restart[-retry-<value>]` for people.
fn progress(wanted: &Lineage, batches: usize) -> Progress {
    let mut run = RUN.to_string();
    if let Some(r) = &wanted.retry {
        run.push_str(&format!("-retry-{r}"));
    }
    Progress {
        run,
        ..wanted.progress(batches, 0, None)
    }
}

#[tracing::instrument(skip_all, fields(restart = %pr.name_any(), namespace = pr.namespace()))]
pub(crate) async fn reconcile(pr: Arc<PhoneRestart>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer(PhoneRestart::KIND);
    let run = Run::new(&ctx, &*pr, None);
    let status = pr.status.clone().unwrap_or_default();
    let wanted = Lineage::of(&*pr);
    match &status.progress {
        // A run under way finishes first, whatever the annotation says.
        Some(_) if super::run::unfinished(&status) => execute(&run, status).await,
        Some(p) if wanted.retry.is_none() || Lineage::recorded(p).retry == wanted.retry => {
            Ok(Action::await_change())
        }
        _ => start(&run, status, wanted).await,
    }
}

/// Before the window: wait without a busy loop ([`super::ledger`]). In it: plan (or plan the
/// retry) and start.
async fn start(
    run: &Run<'_, PhoneRestart>,
    status: PhoneRestartStatus,
    wanted: Lineage,
) -> Result<Action, Error> {
    // Before notBefore: Scheduled, without a busy loop (the shared gate, as for every kind).
    let status = match run.gate(status).await? {
        Gate::Plan(status) => status,
        Gate::Resume(status) => return execute(run, status).await,
        Gate::Done(action) => return Ok(action),
    };
    let pr = run.obj;
    let generation = pr.metadata.generation;
    let rows = match plan(run, &status).await {
        Ok(rows) => rows,
        Err(e) => return run.blocked(status, &e).await,
    };
    let plan = phones::restart_plan(&rows, generation.unwrap_or(0));
    let to_send = rows
        .iter()
        .filter(|r| r.outcome == Outcome::Planned)
        .count();
    let stored = run.store_plan(rows.into_iter()).await?;
    let selected = stored.digest.rows;
    let progress = progress(&wanted, stored.refs.len());
    let mut next = run.stored_status(plan, stored, progress, &status);
    next.phase = Phase::Running;
    let message = format!("restarting {to_send} registered phones of {selected} selected");
    run.started(&mut next, "Restarting", "Restart", message)
        .await?;
    execute(run, next).await
}

/// The selected phones as planned rows; a retry builds on the earlier run's rows (without
/// them, nothing is planned or sent).
async fn plan(run: &Run<'_, PhoneRestart>, status: &PhoneRestartStatus) -> Result<Vec<Row>, Error> {
    let (ctx, pr) = (run.ctx, run.obj);
    let ns = pr.namespace().unwrap_or_default();
    let (_, backend) = ctx
        .backends
        .by_name(&ctx.client, &ns, &pr.spec.connection_ref.name)
        .await?;
    let earlier = match &status.progress {
        Some(p) => {
            let digests = status.plan.as_ref().map(|p| p.batch_digests.clone());
            let digests = digests.unwrap_or_default();
            Some(
                Earlier::new(&run, p.batches as usize, digests)
                    .all()
                    .await?,
            )
        }
        None => None,
    };
    let timed = Timed {
        inner: backend.as_ref(),
        metrics: &ctx.metrics,
    };
    Ok(exec_phones::plan_restart(&timed, &pr.spec.targets, earlier).await?)
}

async fn execute(run: &Run<'_, PhoneRestart>, status: PhoneRestartStatus) -> Result<Action, Error> {
    let (ctx, spec) = (run.ctx, &run.obj.spec);
    let ns = run.obj.namespace().unwrap_or_default();
    let (backend, shared) = match ctx
        .backends
        .by_name(&ctx.client, &ns, &spec.connection_ref.name)
        .await
    {
        // The connection's NOTIFY limit is shared with every other restart on it.
        Ok((conn, backend)) => (backend, ctx.backends.notify_limit(&conn)),
        Err(e) => return run.blocked(status, &e).await,
    };
    let rollout = spec.rollout.as_ref();
    let per_second = rollout
        .and_then(|r| r.per_second)
        .unwrap_or(DEFAULT_PER_SECOND);
    // This restart's own pace; the connection's limit (if any) is awaited after it.
    let own = RateLimit::new(per_second);
    let mut paces: Vec<&dyn Pace> = vec![&own];
    paces.extend(shared.as_deref().map(|s| s as &dyn Pace));
    let live = match Live::new(run, &status).await {
        Ok(live) => live,
        Err(e) => return run.blocked(status, &e).await,
    };
    let stopping = || ctx.is_stopping();
    let on_answer = |code: u16| {
        let label = super::metrics::CodeLabel {
            code: code.to_string(),
        };
        ctx.metrics.notify_answers.get_or_create(&label).inc();
    };
    let timed = Timed {
        inner: backend.as_ref(),
        metrics: &ctx.metrics,
    };
    let exec = RestartExec {
        backend: &timed,
        journal: &live,
        stopping: &stopping,
        reboot: spec.reboot,
        max_in_flight: rollout
            .and_then(|r| r.max_in_flight)
            .unwrap_or(DEFAULT_IN_FLIGHT)
            .max(1) as usize,
        paces,
        confirm: spec
            .confirm
            .as_ref()
            .and_then(|c| c.timeout.as_deref())
            .and_then(parse_duration)
            .unwrap_or(DEFAULT_CONFIRM),
        not_after: spec.not_after.as_ref().map(|t| t.0.as_second()),
        poll: Duration::from_millis(300),
        on_answer: &on_answer,
    };
    match run.execute(status, &exec, false).await? {
        Ok(status) => {
            run.finish(status, "Restart").await?;
            Ok(Action::await_change())
        }
        Err(action) => Ok(action),
    }
}

/// The run's journal, which also shows people the counts after every record, not only after
/// every batch: a batch of restarts takes many slots' turns, each confirmed over seconds or minutes.
struct Live<'a, 'r> {
    run: &'r Run<'a, PhoneRestart>,
    /// The status as the run started, the batches finished before it, each batch as recorded.
    status: PhoneRestartStatus,
    before: Digest,
    /// Each batch as last recorded, and whether all its rows were final then.
    recorded: Mutex<BTreeMap<usize, (Digest, bool)>>,
}

impl<'a, 'r> Live<'a, 'r> {
    async fn new(
        run: &'r Run<'a, PhoneRestart>,
        status: &PhoneRestartStatus,
    ) -> Result<Live<'a, 'r>, Error> {
        let done = status.progress.as_ref().map(|p| p.done).unwrap_or(0) as usize;
        let digests = status
            .plan
            .as_ref()
            .map(|p| p.batch_digests.clone())
            .unwrap_or_default();
        let mut before = Digest::default();
        for index in 0..done {
            before.merge(Digest::of(&run.verified(index, &digests).await?));
        }
        Ok(Live {
            run,
            status: status.clone(),
            before,
            recorded: Mutex::new(BTreeMap::new()),
        })
    }
}

#[async_trait::async_trait]
impl engine::Journal for Live<'_, '_> {
    async fn record(&self, index: usize, rows: &[Row]) -> Result<(), engine::Error> {
        self.run.record(index, rows).await?;
        let mut status = self.status.clone();
        {
            let mut recorded = self.recorded.lock().expect("not poisoned");
            recorded.insert(index, (Digest::of(rows), rows.iter().all(Row::is_final)));
            let mut done = self.before.clone();
            for (d, _) in recorded.values() {
                done.merge(d.clone());
            }
            status.summary = Some(PhoneRestart::summary(&done, status.summary.as_ref()));
            let (shown, truncated) = results::for_status(done.shown.iter());
            status.results_truncated = truncated || done.rows > shown.len();
            status.results = shown;
            // The window spans batches (a later one is under way while an earlier one still
            // has phones in flight): done counts the batches before the first unfinished one,
            // where a resumed run starts.
            if let Some(p) = status.progress.as_mut() {
                let mut next = p.done as usize;
                while recorded.get(&next).is_some_and(|(_, all_final)| *all_final) {
                    next += 1;
                }
                p.done = next as u32;
            }
        }
        // For people only: the record above is what a restart resumes from.
        if let Err(e) = self.run.write_status(&status).await {
            tracing::warn!(error = %e, "could not show the restart's progress in status");
        }
        Ok(())
    }
}
