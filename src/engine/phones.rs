//! Executes stored phone rows: PhoneRestart's NOTIFYs, each confirmed by the phone's fresh
//! REGISTER, and BulkPhoneChange's field writes.
//!
//! A restart sends in waves of `maxInFlight`: the wave's NOTIFY steps are recorded as intended
//! (with the time they leave) before any of them is sent, their answers after, and the wave's
//! confirmations once every phone of it re-registered or its wait ended. A NOTIFY is sent only
//! from a step recorded Pending, and the record that makes it Intended comes first, so no phone
//! gets two NOTIFYs from one run whatever crashes: a NOTIFY found Intended after a restart is
//! never sent again, it is confirmed by a fresh REGISTER or reported Uncertain (a retry sends
//! it once more). Confirmation has no side effect: a restarted operator simply goes on watching.
//!
//! Field writes are compare-and-set against the planned values, recorded as intended before and
//! with their outcome after; a write found intended after a restart is checked against the PBX
//! (already in place: done) and otherwise written again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::steps;
use super::{Batch, Ended, Error, Executor, Journal};
use crate::api::Outcome;
use crate::pbx::{
    PbxBackend, PbxError, PhoneField, Registration, UserSelection, WriteOutcome, sip,
};
use crate::plan::phones::{phone_field, restart_steps};
use crate::plan::stored::{Row, Step, StepKind, StepState};

/// A rate limit a NOTIFY waits for: its restart's `perSecond`, its connection's
/// `notifiesPerSecond` (shared by every restart on the connection).
#[async_trait]
pub trait Pace: Send + Sync {
    /// Waits for this caller's slot.
    async fn acquire(&self);
}

/// A row of a batch: (batch position, row position).
type At = (usize, usize);

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// The note of a resumed NOTIFY nobody can confirm.
pub const UNCONFIRMED: &str = "uncertain: the operator restarted after recording this NOTIFY as under way, and no fresh REGISTER came; it was not sent again (at most one NOTIFY per phone): set annotation pbx-operator.io/retry to send it once more";

/// A PhoneRestart's NOTIFYs and their confirmation.
pub struct RestartExec<'a> {
    pub backend: &'a dyn PbxBackend,
    pub journal: &'a dyn Journal,
    /// Asked between waves and between confirmation polls: true once the operator is stopping.
    pub stopping: &'a (dyn Fn() -> bool + Sync),
    /// true: reboot; false: resync only.
    pub reboot: bool,
    /// Phones sent a NOTIFY and not yet confirmed, at most.
    pub max_in_flight: usize,
    /// Rate limits each NOTIFY waits for, in order.
    pub paces: Vec<&'a dyn Pace>,
    /// How long after its NOTIFY a phone may take to register again.
    pub confirm: Duration,
    /// Unix seconds after which no NOTIFY is sent (the rest are Expired).
    pub not_after: Option<i64>,
    /// How often registrations are read while confirming.
    pub poll: Duration,
    /// Told every SIP answer code (metrics).
    pub on_answer: &'a (dyn Fn(u16) + Sync),
}

#[async_trait]
impl Executor for RestartExec<'_> {
    async fn run(&self, batches: &mut [Batch]) -> Result<Ended, Error> {
        for batch in batches.iter_mut() {
            for row in batch.rows.iter_mut() {
                batch.dirty |= begin_restart(row);
            }
        }
        save(self.journal, batches).await?;
        // Confirmations under way when the operator stopped come first, so maxInFlight holds.
        let resumed = at_all(batches, |r| {
            r.outcome == Outcome::InProgress
                && matches!(
                    state_of(r, StepKind::Notify),
                    Some(StepState::Done | StepState::Uncertain)
                )
        });
        if self.confirm(batches, &resumed).await? == Ended::Stopped {
            return Ok(Ended::Stopped);
        }
        let planned = at_all(batches, |r| {
            r.outcome == Outcome::InProgress
                && state_of(r, StepKind::Notify) == Some(StepState::Pending)
        });
        for wave in planned.chunks(self.max_in_flight.max(1)) {
            if (self.stopping)() {
                save(self.journal, batches).await?;
                return Ok(Ended::Stopped);
            }
            if self.not_after.is_some_and(|na| now() > na) {
                for &(b, i) in wave {
                    let row = &mut batches[b].rows[i];
                    set(row, StepKind::Notify, StepState::Skipped);
                    set(row, StepKind::Confirm, StepState::Skipped);
                    row.outcome = Outcome::Expired;
                    row.notes
                        .push("notAfter passed before this phone's turn: not sent".into());
                    batches[b].dirty = true;
                }
                continue;
            }
            let sent_at = now();
            for &(b, i) in wave {
                let row = &mut batches[b].rows[i];
                set(row, StepKind::Notify, StepState::Intended);
                if let Some(p) = row.phone.as_mut() {
                    p.sent_at = Some(sent_at);
                }
                batches[b].dirty = true;
            }
            // The intent is recorded before any NOTIFY of this wave leaves.
            save(self.journal, batches).await?;
            let transient = self.send(batches, wave).await;
            save(self.journal, batches).await?;
            if let Some(e) = transient {
                // What this error interrupted stays Intended: uncertain, never sent again.
                return Err(e.into());
            }
            let sent: Vec<At> = wave
                .iter()
                .copied()
                .filter(|&(b, i)| {
                    state_of(&batches[b].rows[i], StepKind::Notify) == Some(StepState::Done)
                })
                .collect();
            if self.confirm(batches, &sent).await? == Ended::Stopped {
                return Ok(Ended::Stopped);
            }
        }
        save(self.journal, batches).await?;
        Ok(Ended::Finished)
    }
}

impl RestartExec<'_> {
    /// One NOTIFY to each phone of a wave, all at once, each leaving when every rate limit gives
    /// it a slot. Returns the first transient error: its phone's step stays Intended.
    async fn send(&self, batches: &mut [Batch], wave: &[At]) -> Option<PbxError> {
        let mut sends = futures::stream::FuturesUnordered::new();
        for &at in wave {
            let p = batches[at.0].rows[at.1].phone.clone().unwrap_or_default();
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
            let event = sip::notify_event(vendor.as_deref(), self.reboot);
            sends.push(async move {
                for pace in &self.paces {
                    pace.acquire().await;
                }
                let sent_at = now();
                (at, sent_at, self.backend.notify(&registration, event).await)
            });
        }
        let mut transient = None;
        while let Some(((b, i), sent_at, answer)) = sends.next().await {
            batches[b].dirty = true;
            let row = &mut batches[b].rows[i];
            // Confirmation counts from when the NOTIFY left, which a rate limit may delay.
            if let Some(p) = row.phone.as_mut() {
                p.sent_at = Some(sent_at);
            }
            match answer {
                Ok(a) => {
                    (self.on_answer)(a.code);
                    if (200..300).contains(&a.code) {
                        set(row, StepKind::Notify, StepState::Done);
                    } else {
                        fail(row, format!("SIP {} {}", a.code, a.reason));
                    }
                }
                // It may or may not have reached the phone: the run stops here.
                Err(e) if e.is_transient() => {
                    transient.get_or_insert(e);
                }
                Err(e) => fail(row, e.to_string()),
            }
        }
        transient
    }

    /// Watches for each phone's fresh REGISTER (a new Call-ID, or a later Last-Modified than
    /// planned) until `confirm` after its NOTIFY: Restarted when it came; otherwise Accepted, or
    /// Uncertain when the NOTIFY itself is. Recorded once every phone is settled, or at a stop.
    async fn confirm(&self, batches: &mut [Batch], which: &[At]) -> Result<Ended, Error> {
        let mut waiting = which.to_vec();
        while !waiting.is_empty() {
            let current = self.backend.registrations().await?;
            let mut by_ext: HashMap<&str, Vec<&Registration>> = HashMap::new();
            for r in &current {
                by_ext.entry(r.extension.as_str()).or_default().push(r);
            }
            let t = now();
            waiting.retain(|&(b, i)| {
                let row = &mut batches[b].rows[i];
                let p = row.phone.clone().unwrap_or_default();
                let vendor = sip::vendor_from_user_agent(&p.user_agent);
                let fresh = by_ext.get(p.extension.as_str()).is_some_and(|regs| {
                    regs.iter().any(|r| {
                        sip::vendor_from_user_agent(&r.user_agent) == vendor
                            && (r.call_id != p.call_id || r.last_modified > p.last_modified)
                    })
                });
                let deadline = p.sent_at.unwrap_or(t) + self.confirm.as_secs() as i64;
                if !fresh && t < deadline {
                    return true;
                }
                if fresh {
                    // A NOTIFY under way at a restart evidently reached the phone.
                    set(row, StepKind::Notify, StepState::Done);
                    set(row, StepKind::Confirm, StepState::Done);
                } else {
                    set(row, StepKind::Confirm, StepState::Skipped);
                    if state_of(row, StepKind::Notify) == Some(StepState::Uncertain) {
                        row.notes.push(UNCONFIRMED.into());
                    } else {
                        row.notes.push(format!(
                            "NOTIFY accepted, but no new REGISTER within {}s",
                            self.confirm.as_secs()
                        ));
                    }
                }
                row.outcome = restart_outcome(&row.steps);
                batches[b].dirty = true;
                false
            });
            if waiting.is_empty() {
                break;
            }
            if (self.stopping)() {
                // Answers are recorded; the next operator goes on watching.
                save(self.journal, batches).await?;
                return Ok(Ended::Stopped);
            }
            tokio::time::sleep(self.poll).await;
        }
        save(self.journal, batches).await?;
        Ok(Ended::Finished)
    }
}

/// Moves a restart row into the run: Planned becomes InProgress with its steps; a NOTIFY
/// recorded as under way becomes uncertain (see [`steps::resume`]). Rows stored by an operator
/// from before steps get them (one InProgress was recorded before its NOTIFY). Returns whether
/// the row changed.
fn begin_restart(row: &mut Row) -> bool {
    let mut changed = false;
    if row.steps.is_empty() && !row.is_final() {
        row.steps = restart_steps();
        if row.outcome == Outcome::InProgress {
            set(row, StepKind::Notify, StepState::Intended);
        }
        changed = true;
    }
    if row.outcome == Outcome::Planned {
        row.outcome = Outcome::InProgress;
        changed = true;
    }
    if row.outcome == Outcome::InProgress
        && row.steps.iter().any(|s| s.state == StepState::Intended)
    {
        steps::resume(&mut row.steps);
        changed = true;
    }
    changed
}

/// A restart row's outcome from its steps: Failed or Expired (not sent) when its NOTIFY was,
/// Restarted when its fresh REGISTER came, otherwise Uncertain or Accepted after the NOTIFY.
pub fn restart_outcome(steps: &[Step]) -> Outcome {
    let notify = steps.iter().find(|s| s.kind == StepKind::Notify);
    let confirm = steps.iter().find(|s| s.kind == StepKind::Confirm);
    match (notify.map(|s| s.state), confirm.map(|s| s.state)) {
        (Some(StepState::Failed), _) => Outcome::Failed,
        (Some(StepState::Skipped), _) => Outcome::Expired,
        (_, Some(StepState::Done)) => Outcome::Restarted,
        (Some(StepState::Uncertain), _) => Outcome::Uncertain,
        (Some(StepState::Done), Some(s)) if s.is_final() => Outcome::Accepted,
        _ => Outcome::InProgress,
    }
}

fn fail(row: &mut Row, note: String) {
    set(row, StepKind::Notify, StepState::Failed);
    set(row, StepKind::Confirm, StepState::Skipped);
    row.outcome = Outcome::Failed;
    row.notes.push(note);
}

/// BulkPhoneChange's field writes.
pub struct PhoneWriteExec<'a> {
    pub backend: &'a dyn PbxBackend,
    pub journal: &'a dyn Journal,
}

/// One planned write: (phone id, field, from, to).
type Call = (i64, PhoneField, String, String);

#[async_trait]
impl Executor for PhoneWriteExec<'_> {
    async fn run(&self, batches: &mut [Batch]) -> Result<Ended, Error> {
        let mut redo: HashSet<At> = HashSet::new();
        for (b, batch) in batches.iter_mut().enumerate() {
            for (i, row) in batch.rows.iter_mut().enumerate() {
                let (changed, again) = begin_write(row);
                batch.dirty |= changed;
                if again {
                    redo.insert((b, i));
                }
            }
        }
        // The writes' intent is recorded with the batch's, before anything is written.
        save(self.journal, batches).await?;
        let work = at_all(batches, |r| {
            r.outcome == Outcome::InProgress
                && state_of(r, StepKind::PhoneWrite) == Some(StepState::Intended)
        });
        // Writes begun before a restart that are in place already are done.
        let in_place = self.in_place(batches, &work, &redo).await?;
        let mut calls: Vec<(At, Vec<Call>)> = Vec::new();
        for &at in &work {
            let row = &mut batches[at.0].rows[at.1];
            let planned: Vec<Call> = calls_of(row)
                .into_iter()
                .filter(|c| !in_place.contains(&(c.0, c.1)))
                .collect();
            if planned.is_empty() {
                set(row, StepKind::PhoneWrite, StepState::Done);
                row.notes
                    .push("already written by the interrupted attempt".into());
                batches[at.0].dirty = true;
            } else {
                calls.push((at, planned));
            }
        }
        let all: Vec<Call> = calls.iter().flat_map(|(_, c)| c.clone()).collect();
        if !all.is_empty() {
            match self.backend.apply_phone_changes(&all).await {
                Ok(outcomes) => record_writes(batches, &calls, outcomes),
                // The database refuses something of the batch (one transaction, rolled back):
                // each phone alone, so the one it refuses fails and the others are written.
                Err(e) if !e.is_transient() => {
                    for (at, planned) in &calls {
                        match self.backend.apply_phone_changes(planned).await {
                            Ok(outcomes) => record_writes(
                                batches,
                                std::slice::from_ref(&(*at, planned.clone())),
                                outcomes,
                            ),
                            Err(e) if e.is_transient() => {
                                save(self.journal, batches).await?;
                                return Err(e.into());
                            }
                            Err(e) => {
                                let row = &mut batches[at.0].rows[at.1];
                                set(row, StepKind::PhoneWrite, StepState::Failed);
                                row.notes.push(e.to_string());
                                batches[at.0].dirty = true;
                            }
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        for &(b, i) in &work {
            let row = &mut batches[b].rows[i];
            row.outcome = steps::outcome(&row.steps);
            batches[b].dirty = true;
        }
        save(self.journal, batches).await?;
        Ok(Ended::Finished)
    }
}

impl PhoneWriteExec<'_> {
    /// Of the writes begun before a restart, those whose phone already has the new value:
    /// (phone id, field).
    async fn in_place(
        &self,
        batches: &[Batch],
        work: &[At],
        redo: &HashSet<At>,
    ) -> Result<HashSet<(i64, PhoneField)>, Error> {
        let resumed: Vec<&Row> = work
            .iter()
            .filter(|at| redo.contains(at))
            .map(|&(b, i)| &batches[b].rows[i])
            .collect();
        if resumed.is_empty() {
            return Ok(HashSet::new());
        }
        let extensions: Vec<String> = resumed
            .iter()
            .filter_map(|r| r.phone.as_ref().map(|p| p.extension.clone()))
            .collect();
        let phones = self
            .backend
            .read_phones(&UserSelection {
                groups: vec![],
                extensions,
            })
            .await?;
        let now: HashMap<i64, &crate::pbx::Phone> = phones.iter().map(|p| (p.id, p)).collect();
        Ok(resumed
            .iter()
            .flat_map(|r| calls_of(r))
            .filter(|(id, field, _, to)| {
                now.get(id).is_some_and(|p| {
                    let value = match field {
                        PhoneField::Model => p.model.as_str(),
                        PhoneField::Label => p.label.as_deref().unwrap_or_default(),
                    };
                    value == to
                })
            })
            .map(|(id, field, _, _)| (id, field))
            .collect())
    }
}

/// Moves a write row into the run: Planned becomes InProgress, its write intended; a write
/// recorded as intended is to be checked and redone. Returns (changed, redo).
fn begin_write(row: &mut Row) -> (bool, bool) {
    let mut changed = false;
    // Stored by an operator from before steps were recorded.
    if row.steps.is_empty() && !row.is_final() && !row.writes.is_empty() {
        let state = if row.outcome == Outcome::InProgress {
            StepState::Intended
        } else {
            StepState::Pending
        };
        row.steps = vec![Step {
            kind: StepKind::PhoneWrite,
            state,
        }];
        changed = true;
    }
    if row.outcome == Outcome::Planned {
        row.outcome = Outcome::InProgress;
        changed = true;
    }
    if row.outcome != Outcome::InProgress {
        return (changed, false);
    }
    let redo = !steps::resume(&mut row.steps).is_empty();
    if state_of(row, StepKind::PhoneWrite) == Some(StepState::Pending) {
        set(row, StepKind::PhoneWrite, StepState::Intended);
        changed = true;
    }
    (changed, redo)
}

/// The writes a row plans, as the backend takes them.
fn calls_of(row: &Row) -> Vec<Call> {
    let Some(id) = row.phone.as_ref().and_then(|p| p.id) else {
        return vec![];
    };
    row.writes
        .iter()
        .filter_map(|w| {
            Some((
                id,
                phone_field(&w.field)?,
                w.from.clone().unwrap_or_default(),
                w.to.clone().unwrap_or_default(),
            ))
        })
        .collect()
}

/// Each row's write step from its writes' outcomes: done when all applied, otherwise conflict
/// (a value moved since planning) or failed, with a note.
fn record_writes(batches: &mut [Batch], calls: &[(At, Vec<Call>)], outcomes: Vec<WriteOutcome>) {
    let mut outcomes = outcomes.into_iter();
    for (at, planned) in calls {
        let row = &mut batches[at.0].rows[at.1];
        let mut state = StepState::Done;
        for call in planned {
            match outcomes.next() {
                Some(WriteOutcome::Applied) => {}
                Some(WriteOutcome::Conflict { .. }) => {
                    if state == StepState::Done {
                        state = StepState::Conflict;
                    }
                    row.notes.push(format!(
                        "{} changed since the plan was made (was {:?}); left alone",
                        call.1.name(),
                        call.2
                    ));
                }
                other => {
                    state = StepState::Failed;
                    row.notes.push(match other {
                        Some(WriteOutcome::Failed(e)) => format!("{}: {e}", call.1.name()),
                        Some(WriteOutcome::NotFound) => {
                            "the phone no longer exists on the PBX".into()
                        }
                        _ => format!("{}: not written", call.1.name()),
                    });
                }
            }
        }
        set(row, StepKind::PhoneWrite, state);
        batches[at.0].dirty = true;
    }
}

async fn save(journal: &dyn Journal, batches: &mut [Batch]) -> Result<(), Error> {
    super::save(journal, batches).await
}

fn at_all(batches: &[Batch], keep: impl Fn(&Row) -> bool) -> Vec<At> {
    let mut out = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        for (i, row) in batch.rows.iter().enumerate() {
            if keep(row) {
                out.push((b, i));
            }
        }
    }
    out
}

fn state_of(row: &Row, kind: StepKind) -> Option<StepState> {
    row.steps.iter().find(|s| s.kind == kind).map(|s| s.state)
}

fn set(row: &mut Row, kind: StepKind, state: StepState) {
    if let Some(s) = row.steps.iter_mut().find(|s| s.kind == kind) {
        s.state = state;
    }
}
