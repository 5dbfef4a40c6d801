//! PhoneRestart: NOTIFY registered phones to reboot (or resync) at a bounded rate, and confirm
//! each by its fresh REGISTER.
//!
//! At most one NOTIFY per phone per PhoneRestart, even across operator restarts: before a batch
//! is sent its rows are recorded InProgress in the results ConfigMap; a restarted operator never
//! sends to an InProgress row again, it only looks for the phone's re-registration.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use kube::{
    ResourceExt,
    runtime::{controller::Action, events::EventType},
};

use super::backends::RateLimit;
use super::conditions::{self, Desired};
use super::results_store::Store;
use super::{Context, Error};
use crate::api::parse_duration;
use crate::api::{Outcome, Phase, PhoneRestart, PhoneRestartStatus, Progress, RestartSummary};
use crate::engine::results;
use crate::pbx::kamailio::Kamailio;
use crate::pbx::{PbxBackend, Registration, UserSelection, sip};
use crate::plan::phones::{self, PhoneFilter};
use crate::plan::stored::{self, PhoneTarget, Row};

const KIND: &str = "PhoneRestart";
const RUN: &str = "restart";
const DEFAULT_IN_FLIGHT: u32 = 20;
const DEFAULT_PER_SECOND: u32 = 50;
const DEFAULT_CONFIRM: Duration = Duration::from_secs(300);

fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

fn until(t: jiff::Timestamp) -> Duration {
    t.duration_since(now()).unsigned_abs()
}

#[tracing::instrument(skip_all, fields(restart = %pr.name_any(), namespace = pr.namespace()))]
pub(crate) async fn reconcile(pr: Arc<PhoneRestart>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer(KIND);
    let run = Run {
        pr: &pr,
        ctx: &ctx,
        store: Store::new(&ctx.client, &*pr),
    };
    let status = pr.status.clone().unwrap_or_default();
    match &status.progress {
        Some(p) if p.done >= p.batches => Ok(Action::await_change()),
        Some(_) => run.execute(status).await,
        None => run.start(status).await,
    }
}

/// The rates a NOTIFY waits for: its restart's own, then its connection's.
#[derive(Clone, Copy)]
struct Limits<'a> {
    own: &'a RateLimit,
    shared: Option<&'a RateLimit>,
}

struct Run<'a> {
    pr: &'a PhoneRestart,
    ctx: &'a Context,
    store: Store<'a, PhoneRestart>,
}

impl Run<'_> {
    fn namespace(&self) -> String {
        self.pr.namespace().unwrap_or_default()
    }

    async fn write_status(&self, status: &PhoneRestartStatus) -> Result<(), Error> {
        super::apply_status(self.ctx, self.pr, status).await
    }

    async fn backend(&self) -> Result<Arc<Kamailio>, Error> {
        Ok(self.connection().await?.0)
    }

    /// The connection's backend and its NOTIFY limit (shared with every other restart on it).
    async fn connection(&self) -> Result<(Arc<Kamailio>, Option<Arc<RateLimit>>), Error> {
        let (conn, b) = self
            .ctx
            .backends
            .by_name(
                &self.ctx.client,
                &self.namespace(),
                &self.pr.spec.connection_ref.name,
            )
            .await?;
        Ok((b, self.ctx.backends.notify_limit(&conn)))
    }

    async fn blocked(&self, status: PhoneRestartStatus, err: &Error) -> Result<Action, Error> {
        super::block_run(self.ctx, self.pr, self.pr.status.as_ref(), status, err).await
    }

    /// Before the window: wait without a busy loop. In it: plan and start. After it: Expired.
    async fn start(&self, mut status: PhoneRestartStatus) -> Result<Action, Error> {
        let spec = &self.pr.spec;
        let generation = self.pr.metadata.generation;
        let t = conditions::now();
        if let Some(nb) = spec
            .not_before
            .as_ref()
            .map(|t| t.0)
            .filter(|nb| *nb > now())
        {
            status.observed_generation = generation;
            status.phase = Phase::Scheduled;
            let message = format!("scheduled: restarts begin at {nb}");
            conditions::upsert(
                &mut status.conditions,
                Desired {
                    type_: conditions::READY,
                    status: false,
                    reason: "Scheduled",
                    message: message.clone(),
                },
                generation,
                &t,
            );
            conditions::upsert(
                &mut status.conditions,
                Desired {
                    type_: conditions::RECONCILING,
                    status: true,
                    reason: "Scheduled",
                    message,
                },
                generation,
                &t,
            );
            if Some(&status) != self.pr.status.as_ref() {
                self.write_status(&status).await?;
            }
            return Ok(Action::requeue(until(nb).max(Duration::from_millis(100))));
        }
        let backend = match self.backend().await {
            Ok(b) => b,
            Err(e) => return self.blocked(status, &e).await,
        };
        let rows = match self.plan(&backend).await {
            Ok(r) => r,
            Err(e) => return self.blocked(status, &e).await,
        };
        let chunks = stored::chunk(rows);
        let mut refs = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            refs.push(self.store.write(i, c).await?);
        }
        self.store.prune(chunks.len()).await?;
        let all: Vec<&Row> = chunks.iter().flatten().collect();
        let summary = results::restart_summary(all.iter().copied());
        let (shown, truncated) = results::for_status(all.iter().copied());
        let mut next = PhoneRestartStatus {
            observed_generation: generation,
            phase: Phase::Running,
            conditions: status.conditions.clone(),
            results_refs: refs,
            results: shown,
            results_truncated: truncated,
            start_time: Some(t.clone()),
            summary: Some(RestartSummary {
                targets: all.len() as u32,
                ..summary
            }),
            progress: Some(Progress {
                run: RUN.into(),
                batches: chunks.len() as u32,
                done: 0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let message = format!(
            "restarting {} registered phones of {} selected",
            all.iter().filter(|r| r.outcome == Outcome::Planned).count(),
            all.len()
        );
        conditions::upsert(
            &mut next.conditions,
            Desired {
                type_: conditions::RECONCILING,
                status: true,
                reason: "Restarting",
                message: message.clone(),
            },
            generation,
            &t,
        );
        conditions::upsert(
            &mut next.conditions,
            Desired {
                type_: conditions::READY,
                status: false,
                reason: "Restarting",
                message: message.clone(),
            },
            generation,
            &t,
        );
        conditions::remove(&mut next.conditions, conditions::STALLED);
        self.write_status(&next).await?;
        let who = super::requested_by_note(self.pr.spec.requested_by.as_deref());
        self.ctx
            .publish(
                self.pr,
                EventType::Normal,
                "Started",
                "Restart",
                Some(format!("{message}{who}")),
            )
            .await;
        self.execute(next).await
    }

    async fn plan(&self, backend: &Kamailio) -> Result<Vec<Row>, Error> {
        let targets = &self.pr.spec.targets;
        let selection = UserSelection {
            groups: targets.groups.clone(),
            extensions: targets.extensions.clone(),
        };
        let m = &self.ctx.metrics;
        let users = m
            .pbx_call("read_users", backend.read_users(&selection))
            .await?;
        let provisioned = m
            .pbx_call("read_phones", backend.read_phones(&selection))
            .await?;
        let registrations = m.pbx_call("registrations", backend.registrations()).await?;
        let filter = PhoneFilter {
            exclude: targets.exclude.clone(),
            models: targets.models.clone(),
            vendors: targets.vendors.clone(),
            max_targets: targets.max_targets,
        };
        let names: Vec<String> = users.users.iter().map(|u| u.extension.clone()).collect();
        let selected = phones::select(&names, &provisioned, &registrations, &filter)?;
        Ok(selected
            .into_iter()
            .map(|p| {
                let target = p.target();
                let r = p.registration.clone();
                let outcome = if r.is_some() {
                    Outcome::Planned
                } else {
                    Outcome::NotRegistered
                };
                let notes = if r.is_none() {
                    vec!["no live SIP registration: not restarted".into()]
                } else {
                    vec![]
                };
                Row {
                    target,
                    outcome,
                    writes: vec![],
                    actions: vec![],
                    changes: vec![],
                    notes,
                    phone: Some(PhoneTarget {
                        id: p.id,
                        extension: p.extension,
                        mac: p.mac,
                        vendor: p.vendor,
                        model: p.model,
                        contact: r.as_ref().map(|r| r.contact.clone()),
                        received: r.as_ref().and_then(|r| r.received.clone()),
                        socket: r.as_ref().and_then(|r| r.socket.clone()),
                        user_agent: r.as_ref().map(|r| r.user_agent.clone()).unwrap_or_default(),
                        call_id: r.as_ref().map(|r| r.call_id.clone()).unwrap_or_default(),
                        last_modified: r.as_ref().map(|r| r.last_modified).unwrap_or(0),
                        sent_at: None,
                    }),
                    ..Default::default()
                }
            })
            .collect())
    }

    async fn execute(&self, mut status: PhoneRestartStatus) -> Result<Action, Error> {
        let (backend, shared_limit) = match self.connection().await {
            Ok(b) => b,
            Err(e) => return self.blocked(status, &e).await,
        };
        let spec = &self.pr.spec;
        let in_flight = spec
            .rollout
            .as_ref()
            .and_then(|r| r.max_in_flight)
            .unwrap_or(DEFAULT_IN_FLIGHT)
            .max(1) as usize;
        let per_second = spec
            .rollout
            .as_ref()
            .and_then(|r| r.per_second)
            .unwrap_or(DEFAULT_PER_SECOND)
            .max(1);
        // This restart's own pace; the connection's limit (if any) is awaited after it.
        let own_limit = RateLimit::new(per_second);
        let limits = Limits {
            own: &own_limit,
            shared: shared_limit.as_deref(),
        };
        let confirm = spec
            .confirm
            .as_ref()
            .and_then(|c| c.timeout.as_deref())
            .and_then(parse_duration)
            .unwrap_or(DEFAULT_CONFIRM);
        let not_after = spec.not_after.as_ref().map(|t| t.0);
        let progress = status.progress.clone().expect("execute runs with progress");
        for index in progress.done as usize..progress.batches as usize {
            let mut rows = self.store.read(index).await?;
            // Rows left InProgress by an earlier operator: never sent again, only confirmed.
            let resumed: Vec<usize> = (0..rows.len())
                .filter(|&i| rows[i].outcome == Outcome::InProgress)
                .collect();
            if !resumed.is_empty() {
                self.confirm(&backend, &mut rows, &resumed, confirm, true)
                    .await?;
            }
            let planned: Vec<usize> = (0..rows.len())
                .filter(|&i| rows[i].outcome == Outcome::Planned)
                .collect();
            for wave in planned.chunks(in_flight) {
                if not_after.is_some_and(|na| now() > na) {
                    for &i in wave {
                        rows[i].outcome = Outcome::Expired;
                        rows[i]
                            .notes
                            .push("notAfter passed before this phone's turn: not sent".into());
                    }
                    continue;
                }
                let sent_at = now().as_second();
                for &i in wave {
                    rows[i].outcome = Outcome::InProgress;
                    if let Some(p) = rows[i].phone.as_mut() {
                        p.sent_at = Some(sent_at);
                    }
                }
                // The intent is recorded before any NOTIFY of this wave leaves.
                self.store.write(index, &rows).await?;
                self.send(&backend, &mut rows, wave, limits).await;
                let sent: Vec<usize> = wave
                    .iter()
                    .copied()
                    .filter(|&i| rows[i].outcome == Outcome::InProgress)
                    .collect();
                self.confirm(&backend, &mut rows, &sent, confirm, false)
                    .await?;
                self.store.write(index, &rows).await?;
                self.progress_status(&mut status, index, &rows).await?;
            }
            self.store.write(index, &rows).await?;
            status.progress.as_mut().expect("set").done = index as u32 + 1;
            self.progress_status(&mut status, index, &rows).await?;
        }
        self.finish(status).await
    }

    /// Sends one NOTIFY to each row of a wave, all concurrently, each leaving only when both
    /// this restart's `perSecond` and the connection's `notifiesPerSecond` give it a slot.
    async fn send(&self, backend: &Kamailio, rows: &mut [Row], wave: &[usize], limits: Limits<'_>) {
        let reboot = self.pr.spec.reboot;
        let mut sends = futures::stream::FuturesUnordered::new();
        for &i in wave {
            let p = rows[i].phone.clone().unwrap_or_default();
            let registration = Registration {
                extension: p.extension.clone(),
                contact: p.contact.clone().unwrap_or_default(),
                received: p.received.clone(),
                socket: p.socket.clone(),
                user_agent: p.user_agent.clone(),
                call_id: p.call_id.clone(),
                last_modified: p.last_modified,
                expires: 0,
            };
            let vendor = p
                .vendor
                .clone()
                .or_else(|| sip::vendor_from_user_agent(&p.user_agent).map(str::to_string));
            let event = sip::notify_event(vendor.as_deref(), reboot);
            sends.push(async move {
                limits.own.acquire().await;
                if let Some(shared) = limits.shared {
                    shared.acquire().await;
                }
                let sent_at = now().as_second();
                (i, sent_at, backend.notify(&registration, event).await)
            });
        }
        while let Some((i, sent_at, answer)) = sends.next().await {
            let row = &mut rows[i];
            // Confirmation counts from when the NOTIFY left, which a rate limit may delay.
            if let Some(p) = row.phone.as_mut() {
                p.sent_at = Some(sent_at);
            }
            match answer {
                Ok(a) => {
                    let label = super::metrics::CodeLabel {
                        code: a.code.to_string(),
                    };
                    self.ctx.metrics.notify_answers.get_or_create(&label).inc();
                    if !(200..300).contains(&a.code) {
                        row.outcome = Outcome::Failed;
                        row.notes.push(format!("SIP {} {}", a.code, a.reason));
                    }
                }
                Err(e) => {
                    row.outcome = Outcome::Failed;
                    row.notes.push(e.to_string());
                }
            }
        }
    }

    /// Waits for each row's phone to register again (a new Call-ID or a later Last-Modified
    /// than planned), until `timeout` after its NOTIFY. Unconfirmed 2xx rows are Accepted.
    async fn confirm(
        &self,
        backend: &Kamailio,
        rows: &mut [Row],
        which: &[usize],
        timeout: Duration,
        resumed: bool,
    ) -> Result<(), Error> {
        let mut waiting: Vec<usize> = which.to_vec();
        loop {
            if waiting.is_empty() {
                return Ok(());
            }
            let current = self
                .ctx
                .metrics
                .pbx_call("registrations", backend.registrations())
                .await?;
            let mut by_ext: HashMap<&str, Vec<&Registration>> = HashMap::new();
            for r in &current {
                by_ext.entry(r.extension.as_str()).or_default().push(r);
            }
            let t = now().as_second();
            waiting.retain(|&i| {
                let row = &mut rows[i];
                let p = row.phone.clone().unwrap_or_default();
                let fresh = by_ext.get(p.extension.as_str()).is_some_and(|regs| {
                    regs.iter().any(|r| {
                        sip::vendor_from_user_agent(&r.user_agent) == sip::vendor_from_user_agent(&p.user_agent)
                            && (r.call_id != p.call_id || r.last_modified > p.last_modified)
                    })
                });
                if fresh {
                    row.outcome = Outcome::Restarted;
                    return false;
                }
                let deadline = p.sent_at.unwrap_or(t) + timeout.as_secs() as i64;
                if t >= deadline {
                    if resumed {
                        row.outcome = Outcome::Failed;
                        row.notes.push("not confirmed: the operator restarted after recording this NOTIFY and saw no re-registration; not sent again (at most one NOTIFY per phone)".into());
                    } else {
                        row.outcome = Outcome::Accepted;
                        row.notes.push(format!("NOTIFY accepted, but no new REGISTER within {}s", timeout.as_secs()));
                    }
                    return false;
                }
                true
            });
            if !waiting.is_empty() {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }

    async fn progress_status(
        &self,
        status: &mut PhoneRestartStatus,
        index: usize,
        rows: &[Row],
    ) -> Result<(), Error> {
        let mut all = Vec::new();
        for i in 0..status
            .progress
            .as_ref()
            .map(|p| p.batches as usize)
            .unwrap_or(0)
        {
            if i == index {
                all.extend(rows.iter().cloned());
            } else {
                all.extend(self.store.read(i).await?);
            }
        }
        let s = results::restart_summary(&all);
        let (shown, truncated) = results::for_status(&all);
        status.summary = Some(s);
        status.results = shown;
        status.results_truncated = truncated;
        self.write_status(status).await
    }

    async fn finish(&self, mut status: PhoneRestartStatus) -> Result<Action, Error> {
        let t = conditions::now();
        let generation = self.pr.metadata.generation;
        let s = status.summary.clone().unwrap_or_default();
        let attempted = s.targets - s.not_registered;
        status.phase = if s.expired > 0 && s.restarted + s.accepted == 0 {
            Phase::Expired
        } else if s.failed == 0 && s.expired == 0 {
            Phase::Succeeded
        } else if s.failed < attempted {
            Phase::PartiallyFailed
        } else {
            Phase::Failed
        };
        status.completion_time = Some(t.clone());
        let message = format!(
            "{} phones: {} restarted, {} accepted without re-registering, {} not registered, {} failed, {} expired",
            s.targets, s.restarted, s.accepted, s.not_registered, s.failed, s.expired
        );
        let ok = status.phase == Phase::Succeeded;
        let reason = format!("{:?}", status.phase);
        super::mark_finished(&mut status.conditions, ok, &reason, &message, generation);
        self.write_status(&status).await?;
        let type_ = if ok {
            EventType::Normal
        } else {
            EventType::Warning
        };
        self.ctx
            .publish(self.pr, type_, "Finished", "Restart", Some(message))
            .await;
        self.ctx.reset_failures(&self.pr.uid().unwrap_or_default());
        Ok(Action::await_change())
    }
}
