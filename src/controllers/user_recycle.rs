//! UserRecycle: reset users so their extensions can be reused, and hand some to new people.
//!
//! Like BulkUserChange, a run plans once (one row per target, stored in owned ConfigMaps
//! `<name>-results-<n>`), marks its rows InProgress before any side effect, and executes batch
//! by batch. Each target then goes through steps: reset (one transaction, then its registrations
//! are dropped), recycle (the new identity, in a second transaction), welcome email. Every step
//! is recorded in the target's row (a note such as `reset: done`) before the next step starts,
//! so a restarted operator resumes at the step a target had reached:
//!
//! - a reset or recycle that committed but was not recorded yet is done again, which is
//!   harmless (a second reset clears nothing more; a second recycle writes the same identity);
//! - a target is never reset after its recycle: the recycle step starts only once the reset is
//!   recorded, and a resumed target that the PBX shows in PasswordRequired with its new identity
//!   already set is taken as reset and recycled, not reset again;
//! - a welcome email is recorded as `sending` before it goes out and is never sent twice: after a
//!   restart in between, the row says it may or may not have gone out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use kube::{
    ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::backends::mailer;
use super::conditions::{self, Desired};
use super::lineage::RETRY_ANNOTATION;
use super::results_store::Store;
use super::{Context, Error};
use crate::api::{
    FieldChange, OperationStatus, Outcome, PbxConnection, Phase, Plan, Progress, ResetItem,
    Summary, UserRecycle, UserRecycleSpec, user_recycle::RecycleEntry,
};
use crate::engine::results;
use crate::mail::{self, Mailer};
use crate::pbx::extension_order;
use crate::pbx::kamailio::Kamailio;
use crate::pbx::kamailio::recycle::{PASSWORD_REQUIRED, SETUP_REQUIRED};
use crate::pbx::{
    NewIdentity, PbxBackend, Phone, ResetOutcome, ResetPart, User, UserField, UserReset,
    UserSelection,
};
use crate::plan::stored::{self, Row, StoredWrite};
use crate::plan::users as user_plan;

const KIND: &str = "UserRecycle";

/// Steps of a target, as planned in `Row::actions`.
const ACTION_RESET: &str = "Reset";
const ACTION_RECYCLE: &str = "Recycle";
const ACTION_MAIL: &str = "SendWelcomeEmail";

/// Notes that record a finished step; a resumed run skips the steps they name.
const STEP_RESET: &str = "reset: done";
const STEP_RECYCLE: &str = "recycle: done";
/// Recorded just before a welcome email is handed to SMTP.
const MAIL_SENDING: &str = "welcome email: sending";
const MAIL_SENT: &str = "welcome email: sent";
const MAIL_UNKNOWN: &str = "welcome email: not re-sent";
const MAIL_NOTE: &str = "welcome email:";

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
    let run = Run {
        urc: &urc,
        ctx: &ctx,
        store: Store::new(&ctx.client, &*urc),
    };
    match &status.progress {
        Some(p) if p.run == lineage && p.done < p.batches => run.execute(status).await,
        Some(p) if p.run == lineage => Ok(Action::await_change()),
        _ => run.start(status, lineage).await,
    }
}

struct Run<'a> {
    urc: &'a UserRecycle,
    ctx: &'a Context,
    store: Store<'a, UserRecycle>,
}

impl Run<'_> {
    fn spec(&self) -> &UserRecycleSpec {
        &self.urc.spec
    }

    fn namespace(&self) -> String {
        self.urc.namespace().unwrap_or_default()
    }

    fn requested_by(&self) -> String {
        super::requested_by_note(self.spec().requested_by.as_deref())
    }

    async fn backend(&self) -> Result<(PbxConnection, Arc<Kamailio>), Error> {
        self.ctx
            .backends
            .by_name(
                &self.ctx.client,
                &self.namespace(),
                &self.spec().connection_ref.name,
            )
            .await
    }

    /// Server-side applies the whole status.
    async fn write_status(&self, status: &OperationStatus) -> Result<(), Error> {
        super::apply_status(self.ctx, self.urc, status).await
    }

    /// Records why the run cannot start or continue. Transient causes retry with backoff; the
    /// rows of an interrupted batch stay InProgress and are resumed step by step.
    async fn blocked(&self, status: OperationStatus, err: &Error) -> Result<Action, Error> {
        super::block_run(self.ctx, self.urc, self.urc.status.as_ref(), status, err).await
    }

    /// Plans a new run, stores its rows, and starts executing.
    async fn start(&self, status: OperationStatus, run_id: String) -> Result<Action, Error> {
        let (conn, backend) = match self.backend().await {
            Ok(b) => b,
            Err(e) => return self.blocked(status, &e).await,
        };
        let retry_only = if run_id.contains("-retry-")
            && status
                .progress
                .as_ref()
                .is_some_and(|p| super::same_generation(&p.run, &run_id))
        {
            let batches = status.progress.as_ref().map(|p| p.batches).unwrap_or(0);
            // Without what the earlier run did, a retry plans, changes and prunes nothing.
            match self.store.read_all(batches as usize).await {
                Ok(rows) => Some(rows),
                Err(e) => return self.blocked(status, &e).await,
            }
        } else {
            None
        };
        let (rows, plan) = match self.plan(backend.as_ref(), retry_only).await {
            Ok(p) => p,
            Err(e) => return self.blocked(status, &e).await,
        };
        let chunks = stored::chunk(rows);
        let mut refs = Vec::with_capacity(chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            refs.push(self.store.write(i, chunk).await?);
        }
        self.store.prune(chunks.len()).await?;
        let all: Vec<&Row> = chunks.iter().flatten().collect();
        let now = conditions::now();
        let generation = self.urc.metadata.generation;
        let mut next = OperationStatus {
            observed_generation: generation,
            phase: Phase::Running,
            plan: Some(plan.clone()),
            results_refs: refs,
            start_time: Some(now.clone()),
            conditions: status.conditions.clone(),
            warnings: warnings(&conn, self.spec()),
            progress: Some(Progress {
                run: run_id,
                batches: chunks.len() as u32,
                done: 0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let (shown, truncated) = results::for_status(all.iter().copied());
        next.results = shown;
        next.results_truncated = truncated;
        next.summary = Some(Summary {
            targets: all.len() as u32,
            ..results::summarize(all.iter().copied().filter(|r| r.is_final()))
        });
        let message = format!(
            "resetting {} users ({} recycled to new people); plan {}",
            plan.changes,
            self.spec().recycle.len(),
            plan.hash
        );
        for (type_, status_) in [(conditions::RECONCILING, true), (conditions::READY, false)] {
            conditions::upsert(
                &mut next.conditions,
                Desired {
                    type_,
                    status: status_,
                    reason: "Executing",
                    message: message.clone(),
                },
                generation,
                &now,
            );
        }
        conditions::remove(&mut next.conditions, conditions::STALLED);
        self.write_status(&next).await?;
        self.ctx
            .publish(
                self.urc,
                EventType::Normal,
                "Started",
                "Execute",
                Some(format!("{message}{}", self.requested_by())),
            )
            .await;
        self.execute(next).await
    }

    /// One row per target. With `retry_only`, targets whose outcome was final and not a failure
    /// keep their row; the others are planned again, keeping the steps they already finished.
    async fn plan(
        &self,
        backend: &Kamailio,
        retry_only: Option<Vec<Row>>,
    ) -> Result<(Vec<Row>, Plan), Error> {
        let spec = self.spec();
        let parts = reset_parts(&spec.reset);
        let entries: BTreeMap<&str, &RecycleEntry> = spec
            .recycle
            .iter()
            .map(|e| (e.extension.as_str(), e))
            .collect();
        let mut targets: Vec<String> = spec
            .targets
            .extensions
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut kept = Vec::new();
        let mut earlier: HashMap<String, Row> = HashMap::new();
        if let Some(rows) = retry_only {
            let (redo, ok): (Vec<Row>, Vec<Row>) = rows
                .into_iter()
                .partition(|r| r.is_failure() || !r.is_final());
            kept = ok;
            targets = redo.iter().map(|r| r.target.clone()).collect();
            earlier = redo.into_iter().map(|r| (r.target.clone(), r)).collect();
        }
        let selection = UserSelection {
            groups: vec![],
            extensions: targets.clone(),
        };
        let read = self
            .ctx
            .metrics
            .pbx_call("read_users", backend.read_users(&selection))
            .await?;
        let phones = self
            .ctx
            .metrics
            .pbx_call("read_phones", backend.read_phones(&selection))
            .await?;
        let users: BTreeMap<&str, &User> = read
            .users
            .iter()
            .map(|u| (u.extension.as_str(), u))
            .collect();
        let mut phones_of: BTreeMap<String, Vec<Phone>> = BTreeMap::new();
        for p in phones {
            if let Some(owner) = p.owner.clone() {
                phones_of.entry(owner).or_default().push(p);
            }
        }
        let mut hashed = Vec::new();
        let mut rows = Vec::new();
        for ext in &targets {
            let identity = entries.get(ext.as_str()).map(|e| new_identity(e));
            let mut actions = vec![ACTION_RESET.to_string()];
            if identity.is_some() {
                actions.push(ACTION_RECYCLE.into());
                if spec.send_welcome_email {
                    actions.push(ACTION_MAIL.into());
                }
            }
            let mut row = Row {
                target: ext.clone(),
                outcome: Outcome::Planned,
                writes: identity.as_ref().map(identity_writes).unwrap_or_default(),
                actions,
                changes: vec![],
                notes: vec![],
                phone: None,
                ..Default::default()
            };
            let Some(user) = users.get(ext.as_str()) else {
                row.outcome = Outcome::Failed;
                row.notes
                    .push(format!("extension {ext} does not exist on the PBX"));
                hashed.push(json!({ "target": ext, "missing": true }));
                rows.push(row);
                continue;
            };
            let owned = phones_of.get(ext).map(Vec::as_slice).unwrap_or_default();
            hashed.push(json!({
                "target": ext,
                // Secret fields (HA1, PIN hash) stay out of the hash in status.
                "values": user.values.iter().filter(|(f, _)| !f.is_secret()).collect::<BTreeMap<_, _>>(),
                "numbers": user.numbers,
                "phones": owned.iter().map(|p| &p.mac).collect::<Vec<_>>(),
                "recycle": identity.as_ref().map(|i| (&i.first_name, &i.last_name, &i.email)),
            }));
            if let Some(old) = earlier.get(ext).filter(|r| has_step(r, STEP_RESET)) {
                // A retry keeps the steps already done and the changes they made.
                row.changes = old.changes.clone();
                row.notes = old
                    .notes
                    .iter()
                    .filter(|n| {
                        n.starts_with(STEP_RESET)
                            || n.starts_with(STEP_RECYCLE)
                            || n.starts_with(MAIL_SENT)
                    })
                    .cloned()
                    .collect();
                rows.push(row);
                continue;
            }
            if let Some(id) = identity.as_ref().filter(|id| already_recycled(user, id)) {
                row.outcome = Outcome::Unchanged;
                row.notes.push(format!(
                    "already given to {} {} (status {PASSWORD_REQUIRED}): not reset again, so nothing the new person set up is lost",
                    id.first_name, id.last_name
                ));
                rows.push(row);
                continue;
            }
            row.changes = reset_changes(user, owned, &parts);
            if let Some(id) = &identity {
                merge_recycle(&mut row.changes, user, id);
            }
            rows.push(row);
        }
        let digest = json!({
            "reset": parts.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>(),
            "sendWelcomeEmail": spec.send_welcome_email,
            "targets": hashed,
        });
        let hash = hex::encode(Sha256::digest(digest.to_string().as_bytes()));
        let planned = rows
            .iter()
            .filter(|r| r.outcome == Outcome::Planned)
            .count();
        let plan = Plan {
            hash,
            generation: self.urc.metadata.generation.unwrap_or(0),
            targets: targets.len() as u32,
            resolved: targets.iter().take(1000).cloned().collect(),
            changes: planned as u32,
            ..Default::default()
        };
        kept.extend(rows);
        kept.sort_by(|a, b| extension_order(&a.target, &b.target));
        Ok((kept, plan))
    }

    /// Executes the unfinished batches of the current run.
    async fn execute(&self, mut status: OperationStatus) -> Result<Action, Error> {
        let (conn, backend) = match self.backend().await {
            Ok(b) => b,
            Err(e) => return self.blocked(status, &e).await,
        };
        let mailer = if self.spec().send_welcome_email {
            mailer(&self.ctx.client, &self.namespace(), &conn).await
        } else {
            None
        };
        let parts = reset_parts(&self.spec().reset);
        let progress = status.progress.clone().expect("execute runs with progress");
        for index in progress.done as usize..progress.batches as usize {
            let mut rows = self.store.read(index).await?;
            let resumed: Vec<bool> = rows
                .iter()
                .map(|r| r.outcome == Outcome::InProgress)
                .collect();
            if rows.iter().any(|r| r.outcome == Outcome::Planned) {
                for r in rows.iter_mut().filter(|r| r.outcome == Outcome::Planned) {
                    r.outcome = Outcome::InProgress;
                }
                // The intent is recorded before any side effect of this batch.
                self.store.write(index, &rows).await?;
            }
            let batch = Batch {
                run: self,
                backend: backend.as_ref(),
                mailer: mailer.as_ref(),
                domain: &conn.spec.domain,
                parts: &parts,
                index,
            };
            if let Err(e) = batch.run(&mut rows, &resumed).await {
                // The rows keep the steps recorded so far and are resumed from there.
                return self.blocked(status, &e).await;
            }
            for r in rows.iter_mut().filter(|r| r.outcome == Outcome::InProgress) {
                r.outcome = if r.changes.is_empty() {
                    Outcome::Unchanged
                } else {
                    Outcome::Changed
                };
            }
            self.store.write(index, &rows).await?;
            for r in &rows {
                self.ctx
                    .metrics
                    .targets
                    .get_or_create(&super::metrics::OutcomeLabel {
                        kind: KIND.into(),
                        outcome: format!("{:?}", r.outcome),
                    })
                    .inc();
            }
            let batch_failed = rows.iter().filter(|r| r.is_failure()).count();
            let p = status.progress.as_mut().expect("set above");
            p.done = index as u32 + 1;
            let (done, batches) = (p.done, p.batches);
            let mut all = Vec::new();
            for i in 0..done as usize {
                if i == index {
                    all.extend(rows.iter().cloned());
                } else {
                    all.extend(self.store.read(i).await?);
                }
            }
            let targets = status.summary.as_ref().map(|s| s.targets).unwrap_or(0);
            status.summary = Some(Summary {
                targets,
                ..results::summarize(all.iter().filter(|r| r.is_final()))
            });
            let (shown, truncated) = results::for_status(all.iter());
            status.results = shown;
            status.results_truncated = truncated || (done < batches);
            self.write_status(&status).await?;
            if batch_failed > 0 {
                self.ctx
                    .publish(
                        self.urc,
                        EventType::Warning,
                        "BatchFailed",
                        "Execute",
                        Some(format!(
                            "batch {done} of {batches}: {batch_failed} targets failed; see status.results"
                        )),
                    )
                    .await;
            }
        }
        self.finish(status).await
    }

    async fn finish(&self, mut status: OperationStatus) -> Result<Action, Error> {
        let now = conditions::now();
        let generation = self.urc.metadata.generation;
        let summary = status.summary.clone().unwrap_or_default();
        let bad = summary.failed + summary.conflicts + summary.uncertain;
        status.phase = if bad == 0 {
            Phase::Succeeded
        } else if bad < summary.targets {
            Phase::PartiallyFailed
        } else {
            Phase::Failed
        };
        status.completion_time = Some(now.clone());
        let message = format!(
            "{} targets: {} changed, {} unchanged, {} failed, {} skipped, {} uncertain",
            summary.targets,
            summary.changed,
            summary.unchanged,
            summary.failed,
            summary.skipped,
            summary.uncertain
        );
        conditions::remove(&mut status.conditions, conditions::RECONCILING);
        if bad == 0 {
            conditions::upsert(
                &mut status.conditions,
                Desired {
                    type_: conditions::READY,
                    status: true,
                    reason: "Succeeded",
                    message: message.clone(),
                },
                generation,
                &now,
            );
            conditions::remove(&mut status.conditions, conditions::STALLED);
        } else {
            let hint = format!(
                "{message}; fix the causes in status.results, then set annotation {RETRY_ANNOTATION} to re-run only the failed targets (steps already done are not repeated)"
            );
            let reason = if status.phase == Phase::Failed {
                "Failed"
            } else {
                "PartiallyFailed"
            };
            for type_ in [conditions::READY, conditions::STALLED] {
                conditions::upsert(
                    &mut status.conditions,
                    Desired {
                        type_,
                        status: type_ == conditions::STALLED,
                        reason,
                        message: hint.clone(),
                    },
                    generation,
                    &now,
                );
            }
        }
        self.write_status(&status).await?;
        self.ctx
            .publish(
                self.urc,
                if bad == 0 {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                "Finished",
                "Execute",
                Some(format!("{message}{}", self.requested_by())),
            )
            .await;
        self.ctx.reset_failures(&self.urc.uid().unwrap_or_default());
        Ok(Action::await_change())
    }
}

/// One batch of rows going through the steps. Each step's progress is written to the batch's
/// ConfigMap before the next step starts.
struct Batch<'a> {
    run: &'a Run<'a>,
    backend: &'a Kamailio,
    mailer: Option<&'a Mailer>,
    domain: &'a str,
    parts: &'a [ResetPart],
    index: usize,
}

impl Batch<'_> {
    async fn save(&self, rows: &[Row]) -> Result<(), Error> {
        self.run.store.write(self.index, rows).await.map(|_| ())
    }

    async fn run(&self, rows: &mut [Row], resumed: &[bool]) -> Result<(), Error> {
        self.reset(rows, resumed).await?;
        self.recycle(rows).await?;
        self.welcome(rows).await
    }

    async fn reset(&self, rows: &mut [Row], resumed: &[bool]) -> Result<(), Error> {
        let metrics = &self.run.ctx.metrics;
        // A resumed target the PBX already shows with its new identity was reset and recycled
        // before the restart: resetting it again would wipe the new person's data.
        let check: Vec<String> = rows
            .iter()
            .zip(resumed)
            .filter(|(r, was)| {
                **was && pending(r, ACTION_RESET, STEP_RESET) && identity_of(r).is_some()
            })
            .map(|(r, _)| r.target.clone())
            .collect();
        if !check.is_empty() {
            let read = metrics
                .pbx_call(
                    "read_users",
                    self.backend.read_users(&UserSelection {
                        groups: vec![],
                        extensions: check,
                    }),
                )
                .await?;
            for user in &read.users {
                let Some(row) = rows.iter_mut().find(|r| r.target == user.extension) else {
                    continue;
                };
                if identity_of(row).is_some_and(|id| already_recycled(user, &id)) {
                    row.notes.push(format!(
                        "{STEP_RESET} (found reset and recycled on the PBX after an operator restart)"
                    ));
                    row.notes.push(format!("{STEP_RECYCLE} (found on the PBX)"));
                }
            }
        }
        let todo: Vec<usize> = (0..rows.len())
            .filter(|&i| pending(&rows[i], ACTION_RESET, STEP_RESET))
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let resets: Vec<UserReset> = todo
            .iter()
            .map(|&i| UserReset {
                extension: rows[i].target.clone(),
                parts: self.parts.to_vec(),
            })
            .collect();
        let outcomes = metrics
            .pbx_call("reset_users", self.backend.reset_users(&resets))
            .await?;
        for (&i, outcome) in todo.iter().zip(outcomes) {
            let row = &mut rows[i];
            match outcome {
                ResetOutcome::Done { before, unassigned } => {
                    // Old phones stop working now, not at their next re-registration.
                    metrics
                        .pbx_call(
                            "drop_registrations",
                            self.backend.drop_registrations(&row.target),
                        )
                        .await?;
                    if !resumed[i] {
                        // What this transaction really cleared. A resumed row keeps the
                        // planned changes: its first attempt may already have cleared them.
                        row.changes = reset_changes(&before, &unassigned, self.parts);
                    }
                    row.notes.push(format!(
                        "{STEP_RESET}: registrations dropped, status {SETUP_REQUIRED}"
                    ));
                }
                ResetOutcome::NotFound => fail(row, "extension no longer exists on the PBX"),
                ResetOutcome::Failed(e) => fail(
                    row,
                    &format!("reset failed, nothing of it was written: {e}"),
                ),
            }
        }
        self.save(rows).await
    }

    async fn recycle(&self, rows: &mut [Row]) -> Result<(), Error> {
        let todo: Vec<usize> = (0..rows.len())
            .filter(|&i| {
                has_step(&rows[i], STEP_RESET) && pending(&rows[i], ACTION_RECYCLE, STEP_RECYCLE)
            })
            .collect();
        let identities: Vec<NewIdentity> =
            todo.iter().filter_map(|&i| identity_of(&rows[i])).collect();
        if identities.is_empty() {
            return Ok(());
        }
        let outcomes = self
            .run
            .ctx
            .metrics
            .pbx_call("recycle_users", self.backend.recycle_users(&identities))
            .await?;
        for ((&i, id), outcome) in todo.iter().zip(&identities).zip(outcomes) {
            let row = &mut rows[i];
            match outcome {
                ResetOutcome::Done { before, .. } => {
                    merge_recycle(&mut row.changes, &before, id);
                    row.notes.push(format!(
                        "{STEP_RECYCLE}: extension given to {} {}, status {PASSWORD_REQUIRED} (no usable password or voicemail PIN)",
                        id.first_name, id.last_name
                    ));
                }
                ResetOutcome::NotFound => fail(row, "extension no longer exists on the PBX"),
                ResetOutcome::Failed(e) => fail(
                    row,
                    &format!("recycle failed after the reset, nothing of it was written: {e}"),
                ),
            }
        }
        self.save(rows).await
    }

    /// Welcome emails, each recorded as sending before it goes out, so none is sent twice.
    async fn welcome(&self, rows: &mut [Row]) -> Result<(), Error> {
        for i in 0..rows.len() {
            let row = &mut rows[i];
            let wanted = row.outcome == Outcome::InProgress
                && row.actions.iter().any(|a| a == ACTION_MAIL)
                && has_step(row, STEP_RECYCLE);
            let done = row
                .notes
                .iter()
                .any(|n| n.starts_with(MAIL_NOTE) && n != MAIL_SENDING);
            if !wanted || done {
                continue;
            }
            if let Some(note) = row.notes.iter_mut().find(|n| *n == MAIL_SENDING) {
                *note = format!(
                    "{MAIL_UNKNOWN}: the operator restarted while sending it and cannot tell whether it went out; retry to send it"
                );
                // Neither Changed nor Unchanged: the person may not have been told.
                row.outcome = Outcome::Uncertain;
                continue;
            }
            let Some(id) = identity_of(row) else { continue };
            let Some(to) = id.email.clone() else {
                row.notes.push(format!(
                    "{MAIL_NOTE} not sent: the recycle entry has no email (see status.warnings)"
                ));
                continue;
            };
            let Some(mailer) = self.mailer else {
                fail(
                    row,
                    &format!(
                        "{MAIL_NOTE} not sent: the PbxConnection has no usable spec.smtp; fix it, then retry"
                    ),
                );
                continue;
            };
            row.notes.push(MAIL_SENDING.into());
            self.save(rows).await?;
            let row = &mut rows[i];
            let (subject, body) = mail::welcome(&row.target, &id.first_name, self.domain);
            let result = mailer.send(&to, &subject, body).await;
            row.notes.retain(|n| n != MAIL_SENDING);
            match result {
                Ok(()) => row.notes.push(MAIL_SENT.into()),
                Err(e) => fail(row, &format!("{MAIL_NOTE} failed: {e}")),
            }
            self.save(rows).await?;
        }
        Ok(())
    }
}

fn fail(row: &mut Row, note: &str) {
    row.outcome = Outcome::Failed;
    row.notes.push(note.to_string());
}

fn has_step(row: &Row, step: &str) -> bool {
    row.notes.iter().any(|n| n.starts_with(step))
}

/// Whether a row still in progress plans `action` and has not recorded `step` yet.
fn pending(row: &Row, action: &str, step: &str) -> bool {
    row.outcome == Outcome::InProgress
        && row.actions.iter().any(|a| a == action)
        && !has_step(row, step)
}

/// The reset parts a spec names, in a fixed order.
pub fn reset_parts(items: &[ResetItem]) -> Vec<ResetPart> {
    items
        .iter()
        .map(|i| match i {
            ResetItem::Name => ResetPart::Name,
            ResetItem::Email => ResetPart::Email,
            ResetItem::Password => ResetPart::Password,
            ResetItem::VoicemailPin => ResetPart::VoicemailPin,
            ResetItem::Devices => ResetPart::Devices,
            ResetItem::Role => ResetPart::Role,
            ResetItem::Groups => ResetPart::Groups,
            ResetItem::Numbers => ResetPart::Numbers,
            ResetItem::CallGroup => ResetPart::CallGroup,
            ResetItem::PickupGroup => ResetPart::PickupGroup,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn new_identity(entry: &RecycleEntry) -> NewIdentity {
    NewIdentity {
        extension: entry.extension.clone(),
        first_name: entry.first_name.clone().unwrap_or_default(),
        last_name: entry.last_name.clone().unwrap_or_default(),
        email: entry.email.clone().filter(|e| !e.is_empty()),
    }
}

/// The new identity, stored in the row so a resumed run acts on exactly what was planned.
fn identity_writes(id: &NewIdentity) -> Vec<StoredWrite> {
    [
        (UserField::FirstName, Some(&id.first_name)),
        (UserField::LastName, Some(&id.last_name)),
        (UserField::Email, id.email.as_ref()),
    ]
    .into_iter()
    .map(|(field, to)| StoredWrite {
        field: field.name().into(),
        from: None,
        to: to.cloned(),
        secret: false,
    })
    .collect()
}

fn identity_of(row: &Row) -> Option<NewIdentity> {
    let get = |f: UserField| {
        row.writes
            .iter()
            .find(|w| w.field == f.name())
            .and_then(|w| w.to.clone())
    };
    Some(NewIdentity {
        extension: row.target.clone(),
        first_name: get(UserField::FirstName)?,
        last_name: get(UserField::LastName)?,
        email: get(UserField::Email),
    })
}

/// The user already is the new person, waiting for their password: a recycle that happened.
fn already_recycled(user: &User, id: &NewIdentity) -> bool {
    user.get(UserField::Status) == Some(PASSWORD_REQUIRED)
        && user.get(UserField::FirstName) == Some(id.first_name.as_str())
        && user.get(UserField::LastName) == Some(id.last_name.as_str())
        && user.get(UserField::Email) == id.email.as_deref()
}

const NEW_SECRET: &str = "(new secret)";

fn cut(s: String) -> String {
    if s.len() <= 1000 {
        s
    } else {
        let end = (0..=997)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}...", &s[..end])
    }
}

/// What a reset of `user` clears, as people read it (secrets as "(set)").
fn reset_changes(user: &User, phones: &[Phone], parts: &[ResetPart]) -> Vec<FieldChange> {
    let mut out = Vec::new();
    let clear = |out: &mut Vec<FieldChange>, field: UserField| {
        if let Some(from) = user_plan::shown(field, user.get(field)) {
            out.push(FieldChange {
                field: field.name().into(),
                from: Some(cut(from)),
                to: None,
            });
        }
    };
    for part in parts {
        match part {
            ResetPart::Name => {
                clear(&mut out, UserField::FirstName);
                clear(&mut out, UserField::LastName);
            }
            ResetPart::Email => clear(&mut out, UserField::Email),
            ResetPart::Password => out.push(FieldChange {
                field: UserField::Password.name().into(),
                from: user_plan::shown(UserField::Password, user.get(UserField::Password)),
                to: Some(NEW_SECRET.into()),
            }),
            ResetPart::VoicemailPin => clear(&mut out, UserField::VoicemailPin),
            ResetPart::Devices if !phones.is_empty() => out.push(FieldChange {
                field: "devices".into(),
                from: Some(cut(phones
                    .iter()
                    .map(|p| format!("{} ({} {})", p.mac, p.vendor, p.model))
                    .collect::<Vec<_>>()
                    .join(", "))),
                to: None,
            }),
            ResetPart::Devices => {}
            ResetPart::Role => clear(&mut out, UserField::Role),
            ResetPart::Groups => clear(&mut out, UserField::Groups),
            ResetPart::Numbers => {
                if !user.numbers.is_empty() {
                    out.push(FieldChange {
                        field: "numbers".into(),
                        from: Some(cut(user.numbers.join(","))),
                        to: None,
                    });
                }
                clear(&mut out, UserField::PrimaryNumberLocation);
                clear(&mut out, UserField::PrivateNumber);
                clear(&mut out, UserField::PrivateNumberLocation);
            }
            ResetPart::CallGroup => clear(&mut out, UserField::CallGroup),
            ResetPart::PickupGroup => clear(&mut out, UserField::PickupGroup),
        }
    }
    let status = user.get(UserField::Status);
    if status != Some(SETUP_REQUIRED) {
        out.push(FieldChange {
            field: UserField::Status.name().into(),
            from: status.map(str::to_string),
            to: Some(SETUP_REQUIRED.into()),
        });
    }
    out
}

/// Folds the recycle into `changes` (those of the reset): one entry per field, from the value
/// before the reset to the value after the recycle. `before` is the user before the recycle
/// (for the plan, before the reset). Folding the same recycle twice changes nothing.
fn merge_recycle(changes: &mut Vec<FieldChange>, before: &User, id: &NewIdentity) {
    let status_before = before.get(UserField::Status);
    let pin = user_plan::shown(UserField::VoicemailPin, before.get(UserField::VoicemailPin));
    let password = user_plan::shown(UserField::Password, before.get(UserField::Password));
    let updates = [
        (
            UserField::FirstName.name(),
            before.get(UserField::FirstName).map(str::to_string),
            Some(id.first_name.clone()),
        ),
        (
            UserField::LastName.name(),
            before.get(UserField::LastName).map(str::to_string),
            Some(id.last_name.clone()),
        ),
        (
            UserField::Email.name(),
            before.get(UserField::Email).map(str::to_string),
            id.email.clone(),
        ),
        (UserField::VoicemailPin.name(), pin, None),
        (
            UserField::Password.name(),
            password,
            Some(NEW_SECRET.into()),
        ),
        (
            UserField::Status.name(),
            status_before.map(str::to_string),
            Some(PASSWORD_REQUIRED.into()),
        ),
    ];
    for (field, from, to) in updates {
        match changes.iter_mut().find(|c| c.field == field) {
            Some(c) => c.to = to,
            None => changes.push(FieldChange {
                field: field.into(),
                from,
                to,
            }),
        }
    }
    // The password always changes (a new secret), even when it was shown as unset before.
    changes.retain(|c| c.from != c.to || c.field == UserField::Password.name());
}

fn warnings(conn: &PbxConnection, spec: &UserRecycleSpec) -> Vec<String> {
    let mut out = Vec::new();
    let without_email: Vec<String> = spec
        .recycle
        .iter()
        .filter(|e| e.email.as_deref().is_none_or(str::is_empty))
        .map(|e| {
            format!(
                "{} ({} {})",
                e.extension,
                e.first_name.as_deref().unwrap_or(""),
                e.last_name.as_deref().unwrap_or("")
            )
        })
        .collect();
    if !without_email.is_empty() {
        let mut list = without_email.iter().take(20).cloned().collect::<Vec<_>>();
        if without_email.len() > 20 {
            list.push(format!("and {} more", without_email.len() - 20));
        }
        out.push(cut(format!(
            "recycle entries without email: {}; their email stays empty and no welcome email can be sent to them; add spec.recycle[].email to fix",
            list.join(", ")
        )));
    }
    if spec.send_welcome_email {
        if conn.spec.smtp.is_none() {
            out.push(format!(
                "PbxConnection {} has no spec.smtp: welcome emails cannot be sent",
                conn.name_any()
            ));
        }
        if spec.recycle.is_empty() {
            out.push(
                "sendWelcomeEmail is set but spec.recycle names nobody: there is no one to welcome"
                    .into(),
            );
        }
    }
    if !spec.reset.contains(&ResetItem::Password) {
        out.push(
            "spec.reset does not name Password: the previous person's phones can register again with the old SIP password".into(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        let mut u = User {
            extension: "201".into(),
            numbers: vec!["+15550100201".into()],
            ..Default::default()
        };
        for (f, v) in [
            (UserField::FirstName, "Ben"),
            (UserField::LastName, "Becker"),
            (UserField::Email, "ben@acme.test"),
            (UserField::Password, "ha1:abc"),
            (UserField::VoicemailPin, "sha256:def"),
            (UserField::Role, "User"),
            (UserField::Status, "Active"),
        ] {
            u.values.insert(f, v.into());
        }
        u
    }

    fn ana(email: Option<&str>) -> NewIdentity {
        NewIdentity {
            extension: "201".into(),
            first_name: "Ana".into(),
            last_name: "Diaz".into(),
            email: email.map(str::to_string),
        }
    }

    fn shown(changes: &[FieldChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| {
                format!(
                    "{}: {} -> {}",
                    c.field,
                    c.from.as_deref().unwrap_or("-"),
                    c.to.as_deref().unwrap_or("-")
                )
            })
            .collect()
    }

    #[test]
    fn reset_reports_what_it_clears_and_never_a_secret() {
        let phones = [Phone {
            id: 1,
            mac: "805ec0000001".into(),
            vendor: "Yealink".into(),
            model: "SIP-T46S".into(),
            owner: Some("201".into()),
            label: None,
        }];
        let parts = reset_parts(&crate::api::user_recycle::default_reset());
        let c = reset_changes(&user(), &phones, &parts);
        assert_eq!(
            shown(&c),
            [
                "firstName: Ben -> -",
                "lastName: Becker -> -",
                "email: ben@acme.test -> -",
                "password: (set) -> (new secret)",
                "voicemailPin: (set) -> -",
                "devices: 805ec0000001 (Yealink SIP-T46S) -> -",
                "status: Active -> SetupRequired",
            ]
        );
        assert!(!format!("{c:?}").contains("abc") && !format!("{c:?}").contains("def"));
    }

    #[test]
    fn recycle_folds_into_one_change_per_field() {
        let parts = reset_parts(&[ResetItem::Name, ResetItem::Password]);
        let mut c = reset_changes(&user(), &[], &parts);
        merge_recycle(&mut c, &user(), &ana(Some("ana@acme.test")));
        assert_eq!(
            shown(&c),
            [
                "firstName: Ben -> Ana",
                "lastName: Becker -> Diaz",
                "password: (set) -> (new secret)",
                "status: Active -> PasswordRequired",
                "email: ben@acme.test -> ana@acme.test",
                "voicemailPin: (set) -> -",
            ]
        );
        // Merging again (a resumed recycle) changes nothing.
        let again = c.clone();
        let mut reset = user();
        reset.values.remove(&UserField::FirstName);
        reset
            .values
            .insert(UserField::Status, SETUP_REQUIRED.into());
        merge_recycle(&mut c, &reset, &ana(Some("ana@acme.test")));
        assert_eq!(c, again);
    }

    #[test]
    fn only_the_new_identity_in_password_required_counts_as_recycled() {
        let mut u = user();
        assert!(!already_recycled(&u, &ana(None)));
        u.values.insert(UserField::FirstName, "Ana".into());
        u.values.insert(UserField::LastName, "Diaz".into());
        u.values.remove(&UserField::Email);
        u.values.insert(UserField::Status, PASSWORD_REQUIRED.into());
        assert!(already_recycled(&u, &ana(None)));
        assert!(!already_recycled(&u, &ana(Some("ana@acme.test"))));
        u.values.insert(UserField::Status, SETUP_REQUIRED.into());
        assert!(!already_recycled(&u, &ana(None)));
    }

    #[test]
    fn identity_round_trips_through_the_row() {
        let id = ana(None);
        let row = Row {
            target: "201".into(),
            outcome: Outcome::Planned,
            writes: identity_writes(&id),
            actions: vec![],
            changes: vec![],
            notes: vec![],
            phone: None,
            ..Default::default()
        };
        let back = stored::from_jsonl(&stored::to_jsonl(&[row])).unwrap();
        assert_eq!(identity_of(&back[0]), Some(id));
    }
}
