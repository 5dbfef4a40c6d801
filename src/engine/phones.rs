//! Executes stored phone rows: PhoneRestart's NOTIFYs, each confirmed by the phone's fresh
//! REGISTER, and BulkPhoneChange's field writes.
//!
//! A restart keeps a sliding window of at most `maxInFlight` phones sent and not yet settled:
//! a phone frees its slot when its answer fails it (a silent phone: tm's 408 after fr_timer),
//! when its fresh REGISTER confirms it, or when its confirmation time ends, and the next phone
//! takes the slot. Each group of NOTIFYs that fills free slots is recorded as intended (with the
//! contact read from the registrar at that moment, `sentTo`, and the time they leave) before any
//! of them is sent; answers and confirmations are recorded with the next group or, at most once
//! a second, beside the polls. The window slides across the run's stored batches: they are taken
//! as it reaches them and handed back once settled. Confirmation looks up only the phones in
//! flight ([`PbxBackend::lookup_many`]: one query for all of them), never the whole registrar.
//! A NOTIFY is sent only from a step recorded Pending, and the record that makes it Intended
//! comes first, so no phone gets two NOTIFYs from one run whatever crashes: a NOTIFY found
//! Intended after a restart is never sent again, it is confirmed by a fresh REGISTER or reported
//! Uncertain (a retry sends it once more). Confirmation has no side effect: a restarted operator
//! simply goes on watching.
//!
//! Field writes are compare-and-set against the planned values, recorded as intended before and
//! with their outcome after; a write found intended after a restart is checked against the PBX
//! (already in place: done) and otherwise written again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::planning::PlanningError;
use super::steps;
use super::{At, Batch, Ended, Error, Executor, Feed, Journal, at_all, state_of};
use crate::api::{BulkPhoneChangeSpec, Outcome, PhoneTargets, Plan};
use crate::pbx::{
    PbxBackend, PbxError, PhoneField, Registration, SipAnswer, UserSelection, WriteOutcome, sip,
};
use crate::plan::phones::{self as phone_plan, PhoneFilter, phone_field, restart_steps};
use crate::plan::stored::{PhoneTarget, Row, SentTo, Step, StepKind, StepState};

/// The selected users' phones, filtered, with their live registrations when `registered`.
async fn selected(
    backend: &dyn PbxBackend,
    targets: &PhoneTargets,
    registered: bool,
) -> Result<(Vec<phone_plan::SelectedPhone>, Vec<crate::pbx::Phone>), PlanningError> {
    let selection = UserSelection {
        groups: targets.groups.clone(),
        extensions: targets.extensions.clone(),
    };
    let users = backend.read_users(&selection).await?;
    let provisioned = backend.read_phones(&selection).await?;
    let names: Vec<String> = users.users.iter().map(|u| u.extension.clone()).collect();
    // The selected users' registrations only: planning costs what the selection does, not
    // what the registrar holds.
    let registrations = if registered {
        backend.lookup_many(&names).await?
    } else {
        vec![]
    };
    let filter = PhoneFilter {
        exclude: targets.exclude.clone(),
        models: targets.models.clone(),
        vendors: targets.vendors.clone(),
        max_targets: targets.max_targets,
    };
    let phones = phone_plan::select(&names, &provisioned, &registrations, &filter)?;
    Ok((phones, provisioned))
}

/// Plans a PhoneRestart: every selected phone, registered ones to be sent a NOTIFY. A retry
/// (`earlier`: the rows of the run before) keeps each phone as it ended and plans again only
/// those that failed or are uncertain, from their registration as it is now.
pub async fn plan_restart(
    backend: &dyn PbxBackend,
    targets: &PhoneTargets,
    earlier: Option<Vec<Row>>,
) -> Result<Vec<Row>, PlanningError> {
    let (phones, _) = selected(backend, targets, true).await?;
    let fresh: Vec<Row> = phones.into_iter().map(phone_plan::restart_row).collect();
    Ok(match earlier {
        Some(rows) => phone_plan::retry_rows(rows, fresh),
        None => fresh,
    })
}

/// Plans a BulkPhoneChange over the provisioned phones of its selection.
pub async fn plan_change(
    backend: &dyn PbxBackend,
    spec: &BulkPhoneChangeSpec,
    generation: i64,
) -> Result<(Vec<Row>, Plan), PlanningError> {
    let (phones, provisioned) = selected(backend, &spec.targets, false).await?;
    Ok(phone_plan::plan_change(
        spec,
        generation,
        &phones,
        &provisioned,
    )?)
}

/// A rate limit a NOTIFY waits for: its restart's `perSecond`, its connection's
/// `notifiesPerSecond` (shared by every restart on the connection).
#[async_trait]
pub trait Pace: Send + Sync {
    /// Waits for this caller's slot.
    async fn acquire(&self);
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// The note of a resumed NOTIFY nobody can confirm.
pub const UNCONFIRMED: &str = "uncertain: the operator restarted after recording this NOTIFY as under way, and no fresh REGISTER came; it was not sent again (at most one NOTIFY per phone): set annotation pbx-operator.io/retry to send it once more";

/// A PhoneRestart's NOTIFYs and their confirmation.
pub struct RestartExec<'a> {
    pub backend: &'a dyn PbxBackend,
    pub journal: &'a dyn Journal,
    /// Asked before each new group of NOTIFYs: true once the operator is stopping (no new ones
    /// leave; those under way are answered and recorded).
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
    /// How often the registrations of the phones in flight are looked up while confirming.
    pub poll: Duration,
    /// Told every SIP answer code (metrics).
    pub on_answer: &'a (dyn Fn(u16) + Sync),
}

#[async_trait]
impl Executor for RestartExec<'_> {
    /// The batches given, as a run of their own (a Runner feeds a restart its batches instead,
    /// through [`Executor::run_fed`]).
    async fn run(&self, batches: &mut [Batch]) -> Result<Ended, Error> {
        let mut loaded: Vec<Batch> = batches
            .iter_mut()
            .map(|b| Batch {
                index: b.index,
                rows: std::mem::take(&mut b.rows),
                dirty: b.dirty,
            })
            .collect();
        let mut kept = Kept(Vec::new());
        let ended = self.drive(&mut loaded, &mut kept).await;
        // Back where they came from: the batches handed back, then those still held.
        for b in kept.0.into_iter().chain(loaded) {
            if let Some(slot) = batches
                .iter_mut()
                .find(|s| s.index == b.index && s.rows.is_empty())
            {
                slot.rows = b.rows;
                slot.dirty = b.dirty;
            }
        }
        ended
    }

    /// The window slides across batch ends: a batch end never drains it.
    fn spans_batches(&self) -> bool {
        true
    }

    async fn run_fed(&self, feed: &mut dyn Feed) -> Result<Ended, Error> {
        self.drive(&mut Vec::new(), feed).await
    }
}

/// What [`RestartExec::run`] hands back, kept for its caller.
struct Kept(Vec<Batch>);

#[async_trait]
impl Feed for Kept {
    async fn next(&mut self) -> Result<Option<Batch>, Error> {
        Ok(None)
    }
    fn finished(&mut self, batch: Batch) {
        self.0.push(batch);
    }
}

/// What a NOTIFY's send yields: the phone, when it left, the answer.
type Sent = (At, i64, Result<SipAnswer, PbxError>);

impl RestartExec<'_> {
    /// A sliding window: up to `maxInFlight` phones sent and not yet settled at any moment; a
    /// phone frees its slot when its answer fails it, when its fresh REGISTER confirms it, or when
    /// its confirmation time ends, and the next phone takes it (so a silent phone holds one slot
    /// until tm gives up on it, never a whole group, and never a batch: batches are taken from
    /// `feed` as the window reaches them, after those already in `batches`, and handed back
    /// once all their rows are final and recorded). Each new group of NOTIFYs is recorded as
    /// intended before any of them leaves; answers and confirmations are recorded with the next
    /// group's intents, or at a poll at least [`PROGRESS_EVERY`] after the last record.
    async fn drive(&self, batches: &mut Vec<Batch>, feed: &mut dyn Feed) -> Result<Ended, Error> {
        let mut released = vec![false; batches.len()];
        let mut watching: Vec<At> = Vec::new();
        let mut pending: std::collections::VecDeque<At> = Default::default();
        for b in 0..batches.len() {
            admit(batches, b, &mut watching, &mut pending);
        }
        let mut exhausted = false;
        let window = self.max_in_flight.max(1);
        let rpcs = tokio::sync::Semaphore::new(NOTIFIES_AT_ONCE);
        // NOTIFYs go out from their own loop, which runs beside this one (same task), so they
        // keep leaving at their rate limits' slots while this one records or looks phones up.
        let (to_send, mut queued) =
            tokio::sync::mpsc::unbounded_channel::<(At, Registration, &'static str)>();
        let (answer_tx, mut answers) = tokio::sync::mpsc::unbounded_channel::<Sent>();
        let sender = async {
            let mut sends = futures::stream::FuturesUnordered::new();
            let mut open = true;
            loop {
                tokio::select! {
                    next = queued.recv(), if open => match next {
                        Some((at, registration, event)) => {
                            sends.push(self.send_one(&rpcs, at, registration, event));
                        }
                        None => open = false,
                    },
                    Some(sent) = sends.next(), if !sends.is_empty() => {
                        let _ = answer_tx.send(sent);
                    }
                    else => break,
                }
            }
        };
        let main = async move {
            // The resumed rows' new states (a NOTIFY under way at a restart is uncertain).
            save(self.journal, batches).await?;
            release(batches, &mut released, feed);
            let mut last_save = tokio::time::Instant::now();
            // A record of answers and confirmations under way beside the polls (a copy of the
            // batches it records): at most one, and finished before any other record starts, so
            // records land in the order they were taken.
            let mut recording: Option<futures::future::BoxFuture<'_, Result<(), Error>>> = None;
            let mut outstanding = 0usize;
            let mut error: Option<PbxError> = None;
            let mut stopped = false;
            let mut next_poll = tokio::time::Instant::now();
            loop {
                if !stopped && error.is_none() && (self.stopping)() {
                    stopped = true;
                }
                let feeding = !stopped && error.is_none();
                // The next batches, as soon as the phones at hand cannot fill the free slots.
                let free = window.saturating_sub(watching.len() + outstanding);
                while feeding && !exhausted && pending.len() < free.max(1) {
                    match feed.next().await? {
                        Some(batch) => {
                            batches.push(batch);
                            released.push(false);
                            let b = batches.len() - 1;
                            admit(batches, b, &mut watching, &mut pending);
                        }
                        None => exhausted = true,
                    }
                }
                if feeding && !pending.is_empty() && self.not_after.is_some_and(|na| now() > na) {
                    for (b, i) in pending.drain(..) {
                        let row = &mut batches[b].rows[i];
                        set(row, StepKind::Notify, StepState::Skipped);
                        set(row, StepKind::Confirm, StepState::Skipped);
                        row.outcome = Outcome::Expired;
                        row.notes
                            .push("notAfter passed before this phone's turn: not sent".into());
                        batches[b].dirty = true;
                    }
                }
                if feeding && free > 0 && !pending.is_empty() {
                    let n = free.min(pending.len()).min(GROUP_MAX);
                    let group: Vec<At> = pending.drain(..n).collect();
                    match self.read_contacts(batches, &group).await {
                        Ok(ready) => {
                            // The intent is recorded before any NOTIFY of this group leaves.
                            if let Some(r) = recording.take() {
                                r.await?;
                            }
                            save(self.journal, batches).await?;
                            last_save = tokio::time::Instant::now();
                            release(batches, &mut released, feed);
                            for item in ready {
                                outstanding += 1;
                                let _ = to_send.send(item);
                            }
                        }
                        // Nothing of the group was recorded as under way: it stays planned.
                        Err(e) => error = Some(e),
                    }
                }
                let sending = outstanding > 0;
                let more = !pending.is_empty() || !exhausted;
                if !sending && (watching.is_empty() || stopped || error.is_some()) {
                    if !more || stopped || error.is_some() {
                        break;
                    }
                    continue;
                }
                let polling = !watching.is_empty() && !stopped && error.is_none();
                tokio::select! {
                    done = async { recording.as_mut().expect("guarded").await }, if recording.is_some() => {
                        recording = None;
                        done?;
                        release(batches, &mut released, feed);
                    }
                    Some((at, sent_at, answer)) = answers.recv(), if sending => {
                        outstanding -= 1;
                        if let Some(e) = self.answered(batches, at, sent_at, answer) {
                            error.get_or_insert(e);
                        }
                        if state_of(&batches[at.0].rows[at.1], StepKind::Notify)
                            == Some(StepState::Done)
                        {
                            watching.push(at);
                        }
                    }
                    _ = tokio::time::sleep_until(next_poll), if polling => {
                        match self.confirm_round(batches, &mut watching).await {
                            // Confirmations have no side effect: recorded now and then, not
                            // at every poll (each record rewrites whole batches), and while the
                            // polls go on.
                            Ok(()) if recording.is_none() && last_save.elapsed() >= PROGRESS_EVERY => {
                                let copy = snapshot(batches);
                                let journal = self.journal;
                                recording = Some(Box::pin(async move {
                                    for (index, rows) in copy {
                                        journal.record(index, &rows).await?;
                                    }
                                    Ok(())
                                }));
                                last_save = tokio::time::Instant::now();
                            }
                            Ok(()) => {}
                            Err(e) => {
                                error.get_or_insert(e);
                            }
                        }
                        next_poll = tokio::time::Instant::now() + self.poll;
                    }
                }
            }
            // No more NOTIFYs: the sender ends once those under way are answered.
            drop(to_send);
            if let Some(r) = recording.take() {
                r.await?;
            }
            save(self.journal, batches).await?;
            release(batches, &mut released, feed);
            if let Some(e) = error {
                // What a transient error interrupted stays Intended: uncertain, never sent
                // again; confirmations under way are taken up by the next attempt.
                return Err(e.into());
            }
            if stopped && (!watching.is_empty() || !pending.is_empty() || !exhausted) {
                // Answers are recorded; the next operator goes on watching and sending.
                return Ok(Ended::Stopped);
            }
            Ok(Ended::Finished)
        };
        let (ended, ()) = tokio::join!(main, sender);
        ended
    }

    /// Reads, at send time, the live registration of each phone of a group: its NOTIFY goes to
    /// the contact the phone has now (it may have re-registered from another address or port
    /// since planning), and its fresh REGISTER is recognised against that registration. A phone
    /// with no registration left is Failed (not sent); the others are recorded Intended, with
    /// where they are sent. Returns what to send.
    async fn read_contacts(
        &self,
        batches: &mut [Batch],
        group: &[At],
    ) -> Result<Vec<(At, Registration, &'static str)>, PbxError> {
        let current = self.lookup_all(batches, group).await?;
        let mut out = Vec::with_capacity(group.len());
        for &(b, i) in group {
            batches[b].dirty = true;
            let row = &mut batches[b].rows[i];
            let p = row.phone.clone().unwrap_or_default();
            let Some(live) = current
                .get(&p.extension)
                .and_then(|regs| live_registration(&p, regs))
            else {
                fail(
                    row,
                    "no live SIP registration any more when its turn came: not sent".into(),
                );
                continue;
            };
            row.outcome = Outcome::InProgress;
            set(row, StepKind::Notify, StepState::Intended);
            if let Some(p) = row.phone.as_mut() {
                p.sent_at = Some(now());
                p.sent_to = Some(SentTo {
                    contact: live.contact.clone(),
                    received: live.received.clone(),
                    socket: live.socket.clone(),
                    call_id: live.call_id.clone(),
                    last_modified: live.last_modified,
                });
            }
            let vendor = p
                .vendor
                .clone()
                .or_else(|| sip::vendor_from_user_agent(&p.user_agent).map(str::to_string));
            let event = sip::notify_event(vendor.as_deref(), self.reboot);
            out.push(((b, i), live, event));
        }
        Ok(out)
    }

    /// The registrations of the phones at `which`, by extension: the backend looks up just
    /// those (the registrar's size does not matter).
    async fn lookup_all(
        &self,
        batches: &[Batch],
        which: &[At],
    ) -> Result<HashMap<String, Vec<Registration>>, PbxError> {
        let mut extensions: Vec<String> = which
            .iter()
            .filter_map(|&(b, i)| batches[b].rows[i].phone.as_ref())
            .map(|p| p.extension.clone())
            .collect();
        extensions.sort();
        extensions.dedup();
        let mut out: HashMap<String, Vec<Registration>> = HashMap::new();
        for r in self.backend.lookup_many(&extensions).await? {
            out.entry(r.extension.clone()).or_default().push(r);
        }
        Ok(out)
    }

    /// One NOTIFY, leaving when one of the NOTIFY requests the PBX is asked at once is free
    /// and every rate limit gives it a slot.
    async fn send_one(
        &self,
        rpcs: &tokio::sync::Semaphore,
        at: At,
        registration: Registration,
        event: &'static str,
    ) -> Sent {
        let _permit = rpcs.acquire().await.expect("never closed");
        for pace in &self.paces {
            pace.acquire().await;
        }
        let sent_at = now();
        (at, sent_at, self.backend.notify(&registration, event).await)
    }

    /// Records a NOTIFY's answer; returns a transient error (its phone's step stays Intended).
    fn answered(
        &self,
        batches: &mut [Batch],
        (b, i): At,
        sent_at: i64,
        answer: Result<SipAnswer, PbxError>,
    ) -> Option<PbxError> {
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
                None
            }
            // It may or may not have reached the phone: the run stops here.
            Err(e) if e.is_transient() => Some(e),
            Err(e) => {
                fail(row, e.to_string());
                None
            }
        }
    }

    /// One look at the phones being watched (their own registrations only): Restarted when the
    /// fresh REGISTER (a new Call-ID, or a later Last-Modified than when sent) came; once its
    /// time is up, Accepted, or Uncertain when the NOTIFY itself is. Settled phones leave
    /// `watching`.
    async fn confirm_round(
        &self,
        batches: &mut [Batch],
        watching: &mut Vec<At>,
    ) -> Result<(), PbxError> {
        let current = self.lookup_all(batches, watching).await?;
        let t = now();
        let none = Vec::new();
        watching.retain(|&(b, i)| {
            let row = &mut batches[b].rows[i];
            let p = row.phone.clone().unwrap_or_default();
            let regs = current.get(&p.extension).unwrap_or(&none);
            let fresh = is_fresh(&p, regs);
            let deadline = p.sent_at.unwrap_or(t) + self.confirm.as_secs() as i64;
            if !fresh && t < deadline {
                return true;
            }
            if fresh {
                // A NOTIFY under way at a restart evidently reached the phone.
                set(row, StepKind::Notify, StepState::Done);
                set(row, StepKind::Confirm, StepState::Done);
                if let Some(p) = row.phone.as_mut() {
                    p.confirmed_at = Some(jiff::Timestamp::now().as_millisecond());
                }
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
        Ok(())
    }
}

/// Phones whose intents one record covers at most: the first NOTIFYs leave while the next
/// group's contacts are read and recorded. Each record rewrites whole batches, so smaller
/// groups would cost more records than their NOTIFYs take to send.
const GROUP_MAX: usize = 1000;

/// How often, at most, answers and confirmations alone are recorded (each record rewrites the
/// batches that changed, in the cluster and in the PBX's ledger). Intents are recorded always,
/// before their NOTIFYs.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// NOTIFY requests (each a `tm.t_uac_wait` over its own HTTP request) asked of the PBX at once,
/// whatever the window: thousands at once only queue up in its RPC workers and connections. A
/// silent phone holds one until tm's 408.
const NOTIFIES_AT_ONCE: usize = 64;

/// Of an extension's live registrations, the planned phone's: the same vendor (by User-Agent),
/// the same binding (Call-ID) when it still exists, else its most recent one.
fn live_registration(p: &PhoneTarget, regs: &[Registration]) -> Option<Registration> {
    let vendor = sip::vendor_from_user_agent(&p.user_agent);
    let same_vendor = || {
        regs.iter()
            .filter(move |r| sip::vendor_from_user_agent(&r.user_agent) == vendor)
    };
    same_vendor()
        .find(|r| !p.call_id.is_empty() && r.call_id == p.call_id)
        .or_else(|| same_vendor().max_by_key(|r| r.last_modified))
        .cloned()
}

/// Whether the phone registered afresh since its NOTIFY: against the registration it was sent
/// to, or (a row from before `sentTo`) the planned one.
fn is_fresh(p: &PhoneTarget, regs: &[Registration]) -> bool {
    let vendor = sip::vendor_from_user_agent(&p.user_agent);
    // Last-Modified only against the registration read at send time, from the same source as
    // now: a row planned from the registrar's dump has only its Call-ID to go by.
    let (call_id, last_modified) = match &p.sent_to {
        Some(s) => (s.call_id.as_str(), Some(s.last_modified)),
        None => (p.call_id.as_str(), None),
    };
    regs.iter().any(|r| {
        sip::vendor_from_user_agent(&r.user_agent) == vendor
            && (r.call_id != call_id || last_modified.is_some_and(|m| r.last_modified > m))
    })
}

/// Readies batch `b`, just taken in: its rows begun ([`begin_restart`]), those whose NOTIFY is
/// under way to `watching` (they hold slots first), those still to be sent to `pending`.
fn admit(
    batches: &mut [Batch],
    b: usize,
    watching: &mut Vec<At>,
    pending: &mut std::collections::VecDeque<At>,
) {
    let batch = &mut batches[b];
    for row in batch.rows.iter_mut() {
        batch.dirty |= begin_restart(row);
    }
    for (i, r) in batch.rows.iter().enumerate() {
        let notify = state_of(r, StepKind::Notify);
        if r.outcome == Outcome::InProgress
            && matches!(notify, Some(StepState::Done | StepState::Uncertain))
        {
            watching.push((b, i));
        } else if !r.is_final() && notify == Some(StepState::Pending) {
            pending.push_back((b, i));
        }
    }
}

/// A copy of the batches changed since they were last recorded, which counts as recording them
/// (a failed record ends the run).
fn snapshot(batches: &mut [Batch]) -> Vec<(usize, Vec<Row>)> {
    batches
        .iter_mut()
        .filter(|b| b.dirty)
        .map(|b| {
            b.dirty = false;
            (b.index, b.rows.clone())
        })
        .collect()
}

/// Hands back to `feed` every batch whose rows are all final and recorded (a row of it is never
/// touched again), keeping an empty place for it so positions stay valid.
fn release(batches: &mut [Batch], released: &mut [bool], feed: &mut dyn Feed) {
    for (b, batch) in batches.iter_mut().enumerate() {
        if released[b] || batch.dirty || !batch.rows.iter().all(Row::is_final) {
            continue;
        }
        released[b] = true;
        feed.finished(Batch::new(batch.index, std::mem::take(&mut batch.rows)));
    }
}

/// Readies a restart row: a NOTIFY recorded as under way becomes uncertain (see
/// [`steps::resume`]). A row stays Planned until its slot (status counts InProgress as in
/// flight). Rows stored by an operator from before steps get them (an InProgress one was
/// recorded so before its NOTIFY). Returns whether the row changed.
fn begin_restart(row: &mut Row) -> bool {
    let mut changed = false;
    if row.steps.is_empty() && !row.is_final() {
        row.steps = restart_steps();
        if row.outcome == Outcome::InProgress {
            set(row, StepKind::Notify, StepState::Intended);
        }
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
        (Some(StepState::Uncertain), Some(s)) if s.is_final() => Outcome::Uncertain,
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

fn set(row: &mut Row, kind: StepKind, state: StepState) {
    if let Some(s) = row.steps.iter_mut().find(|s| s.kind == kind) {
        s.state = state;
    }
}

#[cfg(test)]
mod tests {
    //! The executors driven through a crash at every record they make, transient and permanent
    //! PBX errors, stops and retries, against the engine's in-memory PBX and journal.

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use proptest::prelude::*;

    use super::*;
    use crate::engine::Store as _;
    use crate::engine::fake::{Answer, DyingJournal, Kill, Pbx, registration};
    use crate::pbx::Phone;
    use crate::plan::phones::{SelectedPhone, restart_row, retry_rows};
    use crate::plan::stored::StoredWrite;

    const IN_FLIGHT: usize = 4;

    fn ext(i: usize) -> String {
        format!("{}", 200 + i)
    }

    /// How phone `i` of the lab answers: most reboot, some stay up, some are silent, one's
    /// contact cannot be used.
    fn answer(i: usize) -> Answer {
        match i {
            3 => Answer::Unsafe,
            _ if i % 5 == 1 => Answer::Stays,
            _ if i % 7 == 2 => Answer::Silent,
            _ => Answer::Reboot,
        }
    }

    /// `n` registered phones and one that is not, and the restart's rows in two batches.
    fn lab(n: usize) -> (Pbx, Vec<Vec<Row>>) {
        let pbx = Pbx::default();
        let mut rows = Vec::new();
        for i in 0..=n {
            let e = ext(i);
            let registered = i < n;
            if registered {
                pbx.registered.lock().unwrap().push(registration(&e));
                pbx.answers.lock().unwrap().insert(e.clone(), answer(i));
            }
            rows.push(restart_row(SelectedPhone {
                id: Some(i as i64),
                extension: e.clone(),
                mac: Some(format!("mac{i}")),
                vendor: Some("Yealink".into()),
                model: Some("SIP-T46S".into()),
                registration: registered.then(|| registration(&e)),
            }));
        }
        let second = rows.split_off(rows.len() / 2 + 1);
        (pbx, vec![rows, second])
    }

    fn journal(batches: Vec<Vec<Row>>) -> DyingJournal {
        DyingJournal::new(batches)
    }

    fn stored(journal: &DyingJournal) -> Vec<Row> {
        journal.rows()
    }

    struct Count(AtomicUsize);

    #[async_trait]
    impl Pace for Count {
        async fn acquire(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn restart<'a>(
        pbx: &'a Pbx,
        journal: &'a DyingJournal,
        stopping: &'a (dyn Fn() -> bool + Sync),
    ) -> RestartExec<'a> {
        RestartExec {
            backend: pbx,
            journal,
            stopping,
            reboot: true,
            max_in_flight: IN_FLIGHT,
            paces: vec![],
            confirm: Duration::ZERO,
            not_after: None,
            poll: Duration::from_millis(1),
            on_answer: &|_| {},
        }
    }

    /// Runs every batch to its end as the Runner does, one batch at a time, starting a new
    /// operator after each death: the n-th dies `crashes[n].0` records after the start of the
    /// operator before it, before or after that record is stored. Returns how many operators
    /// died (or stopped on an error).
    async fn run_all(
        exec: &dyn Executor,
        journal: &DyingJournal,
        crashes: &[(usize, Kill)],
    ) -> usize {
        let mut next = crashes.iter();
        let arm = |next: &mut std::slice::Iter<(usize, Kill)>| {
            journal.restart();
            if let Some((d, kill)) = next.next() {
                journal.kill_at(journal.records() + d, *kill);
            }
        };
        arm(&mut next);
        let mut errors = 0;
        let mut index = 0;
        while let Ok(rows) = journal.load(index).await {
            let mut batch = [Batch::new(index, rows)];
            match exec.run(&mut batch).await {
                Ok(Ended::Finished) => index += 1,
                Ok(Ended::Stopped) => {}
                Err(_) => {
                    errors += 1;
                    arm(&mut next);
                }
            }
            assert!(errors < 100, "the run never finishes");
        }
        errors
    }

    /// What every run of the lab must hold, whatever crashed: one final outcome per phone, no
    /// phone notified twice, and each outcome what the phone did.
    fn check(rows: &[Row], pbx: &Pbx, crashes: usize) {
        let notifies = pbx.notifies.lock().unwrap().clone();
        let targets: HashSet<&String> = rows.iter().map(|r| &r.target).collect();
        assert_eq!(targets.len(), rows.len(), "each phone once");
        let mut uncertain = 0;
        for (i, r) in rows.iter().enumerate() {
            let n = notifies.get(&ext(i)).copied().unwrap_or(0);
            assert!(n <= 1, "{} notified {n} times", r.target);
            assert!(r.steps.iter().all(|s| s.state.is_final()), "{r:?}");
            if r.outcome == Outcome::Uncertain {
                // Its NOTIFY was recorded as under way when an operator died: it may or may not
                // have been sent (a phone that got it and rebooted is confirmed instead).
                uncertain += 1;
                assert!(crashes > 0);
                assert!(r.notes.iter().any(|n| n == UNCONFIRMED), "{:?}", r.notes);
                if answer(i) == Answer::Reboot {
                    assert_eq!(n, 0, "{}: got its NOTIFY and rebooted", r.target);
                }
                continue;
            }
            let want = if r.outcome == Outcome::NotRegistered {
                Outcome::NotRegistered
            } else {
                match answer(i) {
                    Answer::Reboot => Outcome::Restarted,
                    Answer::Stays => Outcome::Accepted,
                    Answer::Silent | Answer::Unsafe => Outcome::Failed,
                }
            };
            assert_eq!(r.outcome, want, "{}: {:?}", r.target, r.notes);
            let sent = r.outcome != Outcome::NotRegistered && answer(i) != Answer::Unsafe;
            assert_eq!(n, u32::from(sent), "{}: {:?}", r.target, r.outcome);
        }
        assert!(
            uncertain <= IN_FLIGHT * crashes,
            "at most one wave uncertain per crash: {uncertain}"
        );
    }

    #[tokio::test]
    async fn a_crash_at_any_record_sends_no_phone_two_notifies() {
        // An undisturbed run of this lab makes fewer than 40 records: die at each of them,
        // before it is stored (after the side effects it records) and after (before the ones
        // that follow: after an intent, nothing was sent; after answers, nothing confirmed).
        for kill in [Kill::Before, Kill::After] {
            for crash_at in 0..40 {
                let (pbx, batches) = lab(14);
                let journal = journal(batches);
                let never = || false;
                let exec = restart(&pbx, &journal, &never);
                let crashes = run_all(&exec, &journal, &[(crash_at, kill)]).await;
                check(&stored(&journal), &pbx, crashes);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_sequence_of_crashes_sends_no_phone_two_notifies(
            crashes in proptest::collection::vec((0usize..10, any::<bool>()), 0..6)
        ) {
            let crashes: Vec<(usize, Kill)> = crashes
                .into_iter()
                .map(|(at, after)| (at, if after { Kill::After } else { Kill::Before }))
                .collect();
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let (pbx, batches) = lab(14);
                let journal = journal(batches);
                let never = || false;
                let exec = restart(&pbx, &journal, &never);
                let n = run_all(&exec, &journal, &crashes).await;
                check(&stored(&journal), &pbx, n);
            });
        }
    }

    #[tokio::test]
    async fn an_undisturbed_run_paces_every_notify_and_reports_each_phone() {
        let (pbx, batches) = lab(14);
        let journal = journal(batches);
        let (own, shared) = (Count(AtomicUsize::new(0)), Count(AtomicUsize::new(0)));
        let codes = Mutex::new(Vec::new());
        let on_answer = |c: u16| codes.lock().unwrap().push(c);
        let never = || false;
        let exec = RestartExec {
            paces: vec![&own, &shared],
            on_answer: &on_answer,
            ..restart(&pbx, &journal, &never)
        };
        assert_eq!(run_all(&exec, &journal, &[]).await, 0);
        let records = journal.records();
        assert!(
            records < 40,
            "the crash test covers every record: {records}"
        );
        let rows = stored(&journal);
        check(&rows, &pbx, 0);
        let sent: u32 = pbx.notifies.lock().unwrap().values().sum();
        // Every NOTIFY attempted waited for both limits, the refused one too.
        assert_eq!(own.0.load(Ordering::SeqCst), sent as usize + 1);
        assert_eq!(shared.0.load(Ordering::SeqCst), sent as usize + 1);
        assert_eq!(codes.lock().unwrap().len(), sent as usize);
        let failed = |t: &str| rows.iter().find(|r| r.target.starts_with(t)).unwrap();
        assert_eq!(failed("202/").notes, ["SIP 408 Request Timeout"]);
        assert!(
            failed("203/").notes[0].contains("refused"),
            "{:?}",
            failed("203/")
        );
        assert_eq!(
            failed("201/").notes,
            ["NOTIFY accepted, but no new REGISTER within 0s"]
        );
        assert!(
            rows.iter()
                .all(|r| r.phone.as_ref().unwrap().sent_at.is_some()
                    || r.outcome == Outcome::NotRegistered)
        );
    }

    #[tokio::test]
    async fn a_transient_error_stops_the_run_and_its_notify_is_never_sent_again() {
        let (pbx, batches) = lab(6);
        // The first NOTIFY reaches its phone (201 stays up), its answer is lost.
        pbx.answers.lock().unwrap().insert(ext(0), Answer::Stays);
        pbx.down_notify.store(1, Ordering::SeqCst);
        let journal = journal(batches);
        let never = || false;
        let exec = restart(&pbx, &journal, &never);
        let rows = journal.batch(0);
        let mut batch = [Batch::new(0, rows)];
        let err = exec.run(&mut batch).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        let first = journal.batch(0)[0].clone();
        assert_eq!(
            first.steps[0],
            Step {
                kind: StepKind::Notify,
                state: StepState::Intended
            },
            "the journal keeps the NOTIFY under way"
        );
        run_all(&exec, &journal, &[]).await;
        let rows = stored(&journal);
        assert_eq!(rows[0].outcome, Outcome::Uncertain, "{:?}", rows[0]);
        assert_eq!(pbx.notifies.lock().unwrap()[&ext(0)], 1, "not sent again");
        assert!(
            rows[1..6]
                .iter()
                .all(|r| r.outcome != Outcome::Uncertain && r.is_final()),
            "the others of its wave were answered: {rows:?}"
        );
    }

    #[tokio::test]
    async fn registrations_unreadable_stop_the_run_and_the_answers_are_kept() {
        let (pbx, batches) = lab(6);
        pbx.down_registrations.store(3, Ordering::SeqCst);
        let journal = journal(batches);
        let never = || false;
        let exec = restart(&pbx, &journal, &never);
        assert_eq!(run_all(&exec, &journal, &[]).await, 3);
        check(&stored(&journal), &pbx, 0);
        assert!(
            stored(&journal)
                .iter()
                .all(|r| r.outcome != Outcome::Uncertain),
            "answers recorded before the confirmation failed: nothing is uncertain"
        );
    }

    #[tokio::test]
    async fn after_not_after_nothing_is_sent() {
        let (pbx, batches) = lab(6);
        let journal = journal(batches);
        let never = || false;
        let exec = RestartExec {
            not_after: Some(now() - 60),
            ..restart(&pbx, &journal, &never)
        };
        run_all(&exec, &journal, &[]).await;
        let rows = stored(&journal);
        assert!(pbx.notifies.lock().unwrap().is_empty());
        assert_eq!(
            rows.iter()
                .filter(|r| r.outcome == Outcome::Expired)
                .count(),
            6
        );
        assert_eq!(restart_outcome(&rows[0].steps), Outcome::Expired);
    }

    #[tokio::test]
    async fn a_stop_finishes_the_wave_in_flight_and_leaves_nothing_uncertain() {
        let (pbx, batches) = lab(14);
        let journal = journal(batches);
        // Asked to stop once the first NOTIFY went out.
        let stop = || !pbx.notifies.lock().unwrap().is_empty();
        let exec = restart(&pbx, &journal, &stop);
        let rows = journal.batch(0);
        let mut batch = [Batch::new(0, rows)];
        assert_eq!(exec.run(&mut batch).await.unwrap(), Ended::Stopped);
        let sent: u32 = pbx.notifies.lock().unwrap().values().sum();
        assert!(sent < IN_FLIGHT as u32 + 1, "no second wave: {sent}");
        let never = || false;
        let exec = restart(&pbx, &journal, &never);
        run_all(&exec, &journal, &[]).await;
        check(&stored(&journal), &pbx, 0);
    }

    #[tokio::test]
    async fn a_retry_notifies_exactly_the_failed_and_uncertain_phones_once_more() {
        // Crash right after the first wave went out, before its answers were recorded.
        let mut crash_at = 0;
        let (pbx, rows) = loop {
            let (pbx, batches) = lab(14);
            let journal = journal(batches);
            let never = || false;
            let exec = restart(&pbx, &journal, &never);
            run_all(&exec, &journal, &[(crash_at, Kill::Before)]).await;
            let rows = stored(&journal);
            if rows.iter().any(|r| r.outcome == Outcome::Uncertain) {
                break (pbx, rows);
            }
            crash_at += 1;
            assert!(crash_at < 40, "no crash left a NOTIFY uncertain");
        };
        let before = pbx.notifies.lock().unwrap().clone();
        let again: Vec<String> = rows
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed | Outcome::Uncertain))
            .map(|r| r.target.clone())
            .collect();
        assert!(again.len() >= 3, "{rows:?}");
        // Planned afresh from the registrations as they are now.
        let fresh: Vec<Row> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let p = r.phone.clone().unwrap();
                let reg = pbx
                    .registered
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|x| x.extension == p.extension)
                    .cloned();
                restart_row(SelectedPhone {
                    id: Some(i as i64),
                    extension: p.extension,
                    mac: p.mac,
                    vendor: p.vendor,
                    model: p.model,
                    registration: reg,
                })
            })
            .collect();
        let retry = retry_rows(rows.clone(), fresh);
        let journal = journal(vec![retry]);
        let never = || false;
        let exec = restart(&pbx, &journal, &never);
        run_all(&exec, &journal, &[]).await;
        let after = pbx.notifies.lock().unwrap().clone();
        let resent: Vec<String> = rows
            .iter()
            .filter(|r| {
                let e = &r.phone.as_ref().unwrap().extension;
                after.get(e) != before.get(e)
            })
            .map(|r| r.target.clone())
            .collect();
        let mut expected: Vec<String> = again
            .iter()
            .filter(|t| !t.starts_with("203/"))
            .cloned()
            .collect();
        expected.sort();
        let mut resent_sorted = resent.clone();
        resent_sorted.sort();
        assert_eq!(
            resent_sorted, expected,
            "exactly the failed and uncertain phones (203 cannot be sent to)"
        );
        assert!(after.values().all(|n| *n <= 2));
        let retried = stored(&journal);
        for (old, new) in rows.iter().zip(&retried) {
            if matches!(
                old.outcome,
                Outcome::Restarted | Outcome::Accepted | Outcome::NotRegistered
            ) {
                assert_eq!(old, new, "kept as it ended");
            } else {
                assert!(new.notes[0].starts_with("retried: was"), "{:?}", new.notes);
            }
        }
    }

    #[tokio::test]
    async fn a_row_from_before_steps_in_progress_is_confirmed_not_sent() {
        let (pbx, batches) = lab(2);
        let mut rows = batches[0].clone();
        for r in rows.iter_mut().take(2) {
            r.steps.clear();
            r.outcome = Outcome::InProgress;
            r.phone.as_mut().unwrap().sent_at = Some(now());
        }
        // 200 rebooted since (its fresh REGISTER is there), 201 did not.
        pbx.registered.lock().unwrap()[0].call_id = "cid-new".into();
        let journal = journal(vec![rows]);
        let never = || false;
        let exec = restart(&pbx, &journal, &never);
        run_all(&exec, &journal, &[]).await;
        let rows = stored(&journal);
        assert_eq!(rows[0].outcome, Outcome::Restarted);
        assert_eq!(rows[1].outcome, Outcome::Uncertain);
        assert!(pbx.notifies.lock().unwrap().is_empty(), "nothing sent");
    }

    #[test]
    fn restart_outcomes_from_steps() {
        use StepKind::{Confirm, Notify};
        use StepState::*;
        let of = |n, c| {
            restart_outcome(&[
                Step {
                    kind: Notify,
                    state: n,
                },
                Step {
                    kind: Confirm,
                    state: c,
                },
            ])
        };
        assert_eq!(of(Done, Done), Outcome::Restarted);
        assert_eq!(of(Done, Skipped), Outcome::Accepted);
        assert_eq!(of(Uncertain, Skipped), Outcome::Uncertain);
        assert_eq!(of(Uncertain, Pending), Outcome::InProgress);
        assert_eq!(of(Failed, Skipped), Outcome::Failed);
        assert_eq!(of(Skipped, Skipped), Outcome::Expired);
        assert_eq!(of(Intended, Pending), Outcome::InProgress);
    }

    // The sliding window, the contact at send time, notAfter mid-rollout.

    /// `n` registered phones that reboot when told, in one batch.
    fn fleet(n: usize) -> (Pbx, DyingJournal) {
        let pbx = Pbx::default();
        let mut rows = Vec::new();
        for i in 0..n {
            let e = ext(i);
            pbx.registered.lock().unwrap().push(registration(&e));
            rows.push(restart_row(SelectedPhone {
                id: Some(i as i64),
                extension: e.clone(),
                mac: Some(format!("mac{i}")),
                vendor: Some("Yealink".into()),
                model: Some("SIP-T46S".into()),
                registration: Some(registration(&e)),
            }));
        }
        (pbx, journal(vec![rows]))
    }

    #[tokio::test]
    async fn a_silent_phone_holds_one_slot_not_the_window() {
        const SILENT_FOR: Duration = Duration::from_millis(600);
        let (pbx, journal) = fleet(16);
        for i in [0, 5] {
            pbx.answers.lock().unwrap().insert(ext(i), Answer::Silent);
        }
        *pbx.silent_for.lock().unwrap() = SILENT_FOR;
        let never = || false;
        let exec = RestartExec {
            confirm: Duration::from_secs(30),
            ..restart(&pbx, &journal, &never)
        };
        let start = std::time::Instant::now();
        run_all(&exec, &journal, &[]).await;
        let rows = stored(&journal);
        for (i, r) in rows.iter().enumerate() {
            if i == 0 || i == 5 {
                assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
                assert!(r.notes.iter().any(|n| n.contains("408")), "{r:?}");
            } else {
                assert_eq!(r.outcome, Outcome::Restarted, "{r:?}");
            }
        }
        // The 14 others went through the 2 slots the silent phones left free, all before either
        // silent phone's 408 (waves of 4 would have waited for it twice).
        let sent = pbx.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 16);
        let last_other = sent
            .iter()
            .filter(|(e, _, _)| *e != ext(0) && *e != ext(5))
            .map(|(_, _, at)| at.duration_since(start))
            .max()
            .unwrap();
        assert!(
            last_other < SILENT_FOR,
            "the last of the others left {last_other:?} after the start"
        );
    }

    /// The journal's batches in order, as a Runner hands them out; those handed back, in order.
    struct InOrder<'a> {
        journal: &'a DyingJournal,
        next: usize,
        back: Vec<usize>,
    }

    #[async_trait]
    impl Feed for InOrder<'_> {
        async fn next(&mut self) -> Result<Option<Batch>, Error> {
            let Ok(rows) = self.journal.load(self.next).await else {
                return Ok(None);
            };
            self.next += 1;
            Ok(Some(Batch::new(self.next - 1, rows)))
        }
        fn finished(&mut self, batch: Batch) {
            assert!(batch.rows.iter().all(Row::is_final), "{:?}", batch.rows);
            self.back.push(batch.index);
        }
    }

    #[tokio::test]
    async fn the_window_slides_across_batch_ends() {
        const SILENT_FOR: Duration = Duration::from_millis(600);
        // Two batches of 8; the first batch's first phone is silent.
        let (pbx, journal) = fleet(16);
        let rows = stored(&journal);
        let journal = self::journal(vec![rows[..8].to_vec(), rows[8..].to_vec()]);
        pbx.answers.lock().unwrap().insert(ext(0), Answer::Silent);
        *pbx.silent_for.lock().unwrap() = SILENT_FOR;
        let never = || false;
        let exec = RestartExec {
            confirm: Duration::from_secs(30),
            ..restart(&pbx, &journal, &never)
        };
        assert!(exec.spans_batches());
        let start = std::time::Instant::now();
        let mut feed = InOrder {
            journal: &journal,
            next: 0,
            back: vec![],
        };
        assert_eq!(exec.run_fed(&mut feed).await.unwrap(), Ended::Finished);
        // The second batch went through the 3 free slots while the silent phone held its
        // own: the first batch's end did not hold it back. Both were handed back, final.
        let sent = pbx.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 16);
        let last_other = sent
            .iter()
            .filter(|(e, _, _)| *e != ext(0))
            .map(|(_, _, at)| at.duration_since(start))
            .max()
            .unwrap();
        assert!(last_other < SILENT_FOR, "{last_other:?}");
        feed.back.sort();
        assert_eq!(feed.back, [0, 1]);
        let rows = stored(&journal);
        assert_eq!(rows[0].outcome, Outcome::Failed);
        assert!(rows[1..].iter().all(|r| r.outcome == Outcome::Restarted));
        assert!(
            rows[1..]
                .iter()
                .all(|r| r.phone.as_ref().unwrap().confirmed_at.is_some())
        );
    }

    #[tokio::test]
    async fn a_phone_that_moved_since_planning_gets_its_notify_at_the_new_contact() {
        let (pbx, journal) = fleet(3);
        // Phone 1 re-registered from another port (a new binding) after the plan was made.
        {
            let mut regs = pbx.registered.lock().unwrap();
            regs[1].contact = format!("sip:{}@192.0.2.1:5099", ext(1));
            regs[1].call_id = "cid-moved".into();
            regs[1].last_modified = 5;
        }
        let never = || false;
        let exec = RestartExec {
            confirm: Duration::from_secs(30),
            ..restart(&pbx, &journal, &never)
        };
        run_all(&exec, &journal, &[]).await;
        let sent = pbx.sent.lock().unwrap().clone();
        let to: Vec<&str> = sent
            .iter()
            .filter(|(e, _, _)| *e == ext(1))
            .map(|(_, c, _)| c.as_str())
            .collect();
        assert_eq!(to, ["sip:201@192.0.2.1:5099"]);
        let rows = stored(&journal);
        // Confirmed by the REGISTER after the NOTIFY, not by the move before it.
        assert!(
            rows.iter().all(|r| r.outcome == Outcome::Restarted),
            "{rows:?}"
        );
        let p = rows[1].phone.as_ref().unwrap();
        assert_eq!(
            p.contact.as_deref(),
            Some("sip:201@192.0.2.1:5060"),
            "the plan"
        );
        assert_eq!(p.sent_to.as_ref().unwrap().call_id, "cid-moved");
        // Where it went is progress, not plan: the stored plan's digest still holds.
        let planned: Vec<Row> = rows
            .iter()
            .map(|r| Row {
                phone: r.phone.clone().map(|p| PhoneTarget {
                    sent_at: None,
                    sent_to: None,
                    confirmed_at: None,
                    ..p
                }),
                ..r.clone()
            })
            .collect();
        assert_eq!(
            crate::plan::stored::plan_digest(&rows),
            crate::plan::stored::plan_digest(&planned)
        );
    }

    #[tokio::test]
    async fn a_phone_unregistered_since_planning_is_not_sent() {
        let (pbx, journal) = fleet(2);
        pbx.registered.lock().unwrap().remove(0);
        let never = || false;
        let exec = restart(&pbx, &journal, &never);
        run_all(&exec, &journal, &[]).await;
        let rows = stored(&journal);
        assert_eq!(rows[0].outcome, Outcome::Failed, "{rows:?}");
        assert!(rows[0].notes[0].contains("no live SIP registration"));
        assert_eq!(pbx.sent.lock().unwrap().len(), 1);
    }

    /// Holds every NOTIFY for a while, as a slow rate limit does.
    struct Slow(Duration);

    #[async_trait]
    impl Pace for Slow {
        async fn acquire(&self) {
            tokio::time::sleep(self.0).await;
        }
    }

    #[tokio::test]
    async fn not_after_passing_mid_rollout_expires_the_unsent_and_confirms_those_in_flight() {
        let (pbx, journal) = fleet(6);
        let never = || false;
        // The first two are under way (recorded, held by the pace) when notAfter passes.
        let slow = Slow(Duration::from_millis(1100));
        let exec = RestartExec {
            max_in_flight: 2,
            paces: vec![&slow],
            confirm: Duration::from_secs(30),
            not_after: Some(now()),
            ..restart(&pbx, &journal, &never)
        };
        run_all(&exec, &journal, &[]).await;
        let outcomes: Vec<Outcome> = stored(&journal).iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [
                Outcome::Restarted,
                Outcome::Restarted,
                Outcome::Expired,
                Outcome::Expired,
                Outcome::Expired,
                Outcome::Expired
            ]
        );
        assert_eq!(pbx.sent.lock().unwrap().len(), 2);
    }

    // BulkPhoneChange's writes.

    fn phone(i: usize, model: &str) -> Phone {
        Phone {
            id: i as i64,
            mac: format!("mac{i}"),
            vendor: "Yealink".into(),
            model: model.into(),
            owner: Some(ext(i)),
            label: None,
        }
    }

    /// `n` phones, each to get model SIP-T54W and a label.
    fn change_lab(n: usize) -> (Pbx, Vec<Row>) {
        let pbx = Pbx::default();
        let mut rows = Vec::new();
        for i in 0..n {
            pbx.phones
                .lock()
                .unwrap()
                .insert(i as i64, phone(i, "SIP-T46S"));
            rows.push(Row {
                target: format!("{}/mac{i}", ext(i)),
                outcome: Outcome::Planned,
                writes: vec![
                    StoredWrite {
                        field: "model".into(),
                        from: Some("SIP-T46S".into()),
                        to: Some("SIP-T54W".into()),
                        secret: false,
                    },
                    StoredWrite {
                        field: "label".into(),
                        from: Some(String::new()),
                        to: Some("3rd floor".into()),
                        secret: false,
                    },
                ],
                steps: vec![Step::pending(StepKind::PhoneWrite)],
                phone: Some(crate::plan::stored::PhoneTarget {
                    id: Some(i as i64),
                    extension: ext(i),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        (pbx, rows)
    }

    fn written(pbx: &Pbx, i: usize) -> (String, Option<String>) {
        let phones = pbx.phones.lock().unwrap();
        (
            phones[&(i as i64)].model.clone(),
            phones[&(i as i64)].label.clone(),
        )
    }

    #[tokio::test]
    async fn a_crash_at_any_record_writes_every_phone_once() {
        for kill in [Kill::Before, Kill::After] {
            for crash_at in 0..4 {
                let (pbx, rows) = change_lab(5);
                let journal = journal(vec![rows]);
                let exec = PhoneWriteExec {
                    backend: &pbx,
                    journal: &journal,
                };
                run_all(&exec, &journal, &[(crash_at, kill)]).await;
                for (i, r) in stored(&journal).iter().enumerate() {
                    let at = (crash_at, kill);
                    assert_eq!(r.outcome, Outcome::Changed, "died at {at:?}: {r:?}");
                    assert_eq!(r.steps[0].state, StepState::Done);
                    let want = ("SIP-T54W".to_string(), Some("3rd floor".to_string()));
                    assert_eq!(written(&pbx, i), want);
                }
            }
        }
    }

    #[tokio::test]
    async fn a_transient_write_error_stops_the_run_with_the_journal_intact() {
        let (pbx, rows) = change_lab(3);
        pbx.down_writes.store(1, Ordering::SeqCst);
        let journal = journal(vec![rows]);
        let exec = PhoneWriteExec {
            backend: &pbx,
            journal: &journal,
        };
        let mut batch = [Batch::new(0, journal.batch(0))];
        assert!(exec.run(&mut batch).await.unwrap_err().is_transient());
        assert!(
            stored(&journal).iter().all(
                |r| r.outcome == Outcome::InProgress && r.steps[0].state == StepState::Intended
            ),
            "{:?}",
            stored(&journal)
        );
        assert_eq!(written(&pbx, 0).0, "SIP-T46S", "nothing written");
        run_all(&exec, &journal, &[]).await;
        assert!(
            stored(&journal)
                .iter()
                .all(|r| r.outcome == Outcome::Changed)
        );
    }

    #[tokio::test]
    async fn a_refused_phone_fails_alone_and_a_moved_value_conflicts() {
        let (pbx, rows) = change_lab(4);
        pbx.refuse.lock().unwrap().insert(1);
        pbx.phones.lock().unwrap().get_mut(&2).unwrap().model = "SIP-T48U".into();
        let journal = journal(vec![rows]);
        let exec = PhoneWriteExec {
            backend: &pbx,
            journal: &journal,
        };
        run_all(&exec, &journal, &[]).await;
        let rows = stored(&journal);
        let outcomes: Vec<Outcome> = rows.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [
                Outcome::Changed,
                Outcome::Failed,
                Outcome::Conflict,
                Outcome::Changed
            ]
        );
        assert!(rows[1].notes[0].contains("refused"), "{:?}", rows[1].notes);
        assert_eq!(
            rows[2].notes,
            ["model changed since the plan was made (was \"SIP-T46S\"); left alone"]
        );
        assert_eq!(written(&pbx, 1).0, "SIP-T46S");
        assert_eq!(written(&pbx, 3).0, "SIP-T54W");
    }

    #[tokio::test]
    async fn planning_reads_the_selected_phones_and_their_registrations() {
        use crate::api::{ConnectionRef, Field, Lock, Mode, PhoneFields};
        let pbx = Pbx::default();
        for i in 0..3 {
            let e = ext(i);
            pbx.users
                .lock()
                .unwrap()
                .insert(e.clone(), crate::engine::fake::user(&e));
            pbx.phones
                .lock()
                .unwrap()
                .insert(i as i64, phone(i, "SIP-T46S"));
            if i < 2 {
                pbx.registered.lock().unwrap().push(registration(&e));
            }
        }
        let targets = PhoneTargets {
            extensions: (0..3).map(ext).collect(),
            exclude: vec![ext(1)],
            ..Default::default()
        };
        let rows = plan_restart(&pbx, &targets, None).await.unwrap();
        let outcomes: Vec<(&str, Outcome)> = rows
            .iter()
            .map(|r| (r.target.as_str(), r.outcome))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("200/mac0", Outcome::Planned),
                ("202/mac2", Outcome::NotRegistered)
            ]
        );
        // A retry of a run in which 200 failed plans it again; 202 stays as it ended.
        let earlier = vec![
            Row {
                outcome: Outcome::Failed,
                ..rows[0].clone()
            },
            rows[1].clone(),
        ];
        let again = plan_restart(&pbx, &targets, Some(earlier)).await.unwrap();
        assert_eq!(again[0].outcome, Outcome::Planned);
        assert_eq!(again[1], rows[1]);
        let spec = BulkPhoneChangeSpec {
            connection_ref: ConnectionRef {
                name: "acme".into(),
            },
            targets,
            fields: PhoneFields {
                model: Some(Field {
                    value: crate::api::fields::ModelName("SIP-T54W".into()),
                    lock: Lock::Open,
                }),
                label: None,
            },
            mode: Mode::Execute,
            approved_plan_hash: None,
            not_before: None,
            execute_before: None,
            revert_of: None,
            requested_by: None,
        };
        let (rows, plan) = plan_change(&pbx, &spec, 3).await.unwrap();
        assert_eq!((plan.targets, plan.changes, plan.generation), (2, 2, 3));
        assert!(
            rows.iter()
                .all(|r| r.steps == [Step::pending(StepKind::PhoneWrite)])
        );
    }
}
