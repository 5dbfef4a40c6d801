//! Executes stored UserRecycle rows: each target is reset (one transaction), its registrations
//! dropped, and when it goes to a new person recycled (a second transaction) and welcomed by
//! mail. Every step is recorded as intended before its side effect and with its outcome after.
//!
//! A restart resumes each target at the step it had reached ([`steps::resume`]):
//! - a reset or recycle begun but not recorded is done again, after a check: a target the PBX
//!   already shows with its new identity in PasswordRequired was reset and recycled, and is
//!   never reset again (that would wipe what the new person set up);
//! - dropping registrations is idempotent and simply done again;
//! - a welcome mail begun but not recorded is reported Uncertain, never sent twice; mails go in
//!   flights of [`MAIL_FLIGHT`], so a crash leaves at most one flight uncertain.

use std::collections::HashMap;

use super::outbox::{Flights, Letter, Outbox, send_in_flights};
use super::steps;
use super::{At, Batch, Ended, Error, Executor, Journal, set, state_of};
use crate::api::{Outcome, Plan, UserRecycleSpec};
use crate::mail;
use crate::pbx::{PbxBackend, PbxError, ResetOutcome, ResetPart, UserReset, UserSelection};
use crate::plan::recycle::{
    self as plan, PASSWORD_REQUIRED, SETUP_REQUIRED, already_recycled, identity_of, legacy_steps,
    merge_recycle, reset_changes,
};
use crate::plan::stored::{Row, StepKind, StepState};

/// Reads what the PBX holds of the targets a run plans (all of the spec's, or on a retry those
/// of `earlier` that did not finish well) and plans their rows; see [`plan::plan`].
pub async fn plan_recycle(
    backend: &dyn PbxBackend,
    spec: &UserRecycleSpec,
    generation: i64,
    earlier: Option<Vec<Row>>,
) -> Result<(Vec<Row>, Plan), PbxError> {
    let scope = plan::scope(spec, earlier);
    let selection = UserSelection {
        groups: vec![],
        extensions: scope.targets.clone(),
    };
    let users = backend.read_users(&selection).await?.users;
    let phones = backend.read_phones(&selection).await?;
    Ok(plan::plan(spec, generation, scope, &users, &phones))
}

pub struct RecycleExec<'a> {
    pub backend: &'a dyn PbxBackend,
    /// What a reset clears (`spec.reset`).
    pub parts: &'a [ResetPart],
    /// None: the connection has no usable SMTP (welcome mails fail).
    pub mailer: Option<&'a dyn Outbox>,
    pub domain: &'a str,
    pub journal: &'a dyn Journal,
    /// Asked between steps: true once the operator is stopping.
    pub stopping: &'a (dyn Fn() -> bool + Sync),
    /// The run's key in the PBX (its ledger id): the snapshots of the users it resets are
    /// kept under it, and the restores of a revert are recorded under it.
    pub run_key: &'a str,
}

#[async_trait::async_trait]
impl Executor for RecycleExec<'_> {
    /// Runs the unfinished rows of `batches` to their outcomes, or until a stop is asked for.
    async fn run(&self, batches: &mut [Batch]) -> Result<Ended, Error> {
        let mut redo: HashMap<At, Vec<StepKind>> = HashMap::new();
        let mut work: Vec<At> = Vec::new();
        for (b, batch) in batches.iter_mut().enumerate() {
            for (i, row) in batch.rows.iter_mut().enumerate() {
                if row.is_final() {
                    continue;
                }
                if row.steps.is_empty() {
                    // Stored by an operator from before steps were recorded.
                    row.steps = legacy_steps(row);
                }
                row.outcome = Outcome::InProgress;
                batch.dirty = true;
                let mail_begun = state_of(row, StepKind::WelcomeMail) == Some(StepState::Intended);
                redo.insert((b, i), steps::resume(&mut row.steps));
                work.push((b, i));
                if mail_begun {
                    row.notes.push(
                        "welcome email: not re-sent: the operator restarted while sending it and cannot tell whether it went out; retry to send it".into(),
                    );
                }
            }
        }
        if work.is_empty() {
            self.save(batches).await?;
            return Ok(Ended::Finished);
        }
        // A revert's rows: their users back from the snapshots the recycle kept.
        super::restore::restore(self.backend, self.journal, batches, &work, self.run_key).await?;
        self.check(batches, &work, &redo).await?;
        self.reset(batches, &work, &redo).await?;
        if (self.stopping)() {
            return Ok(Ended::Stopped);
        }
        self.drop_registrations(batches, &work).await?;
        if (self.stopping)() {
            return Ok(Ended::Stopped);
        }
        self.recycle(batches, &work).await?;
        if (self.stopping)() {
            return Ok(Ended::Stopped);
        }
        if self.welcome(batches, &work).await? == Ended::Stopped {
            return Ok(Ended::Stopped);
        }
        for &(b, i) in &work {
            let row = &mut batches[b].rows[i];
            row.outcome = steps::outcome(&row.steps);
            batches[b].dirty = true;
        }
        self.save(batches).await?;
        Ok(Ended::Finished)
    }
}

impl RecycleExec<'_> {
    async fn save(&self, batches: &mut [Batch]) -> Result<(), Error> {
        super::save(self.journal, batches).await
    }

    /// Targets whose reset or recycle was begun before a restart and that the PBX shows with
    /// their new identity in PasswordRequired: both happened, neither is done again.
    async fn check(
        &self,
        batches: &mut [Batch],
        work: &[At],
        redo: &HashMap<At, Vec<StepKind>>,
    ) -> Result<(), Error> {
        let check: Vec<At> = work
            .iter()
            .copied()
            .filter(|at| {
                redo[at]
                    .iter()
                    .any(|k| matches!(k, StepKind::Reset | StepKind::Recycle))
                    && identity_of(&batches[at.0].rows[at.1]).is_some()
            })
            .collect();
        if check.is_empty() {
            return Ok(());
        }
        let extensions = check
            .iter()
            .map(|&(b, i)| batches[b].rows[i].target.clone())
            .collect();
        let read = self
            .backend
            .read_users(&UserSelection {
                groups: vec![],
                extensions,
            })
            .await?;
        for (b, i) in check {
            let row = &mut batches[b].rows[i];
            let Some(id) = identity_of(row) else { continue };
            let Some(user) = read
                .users
                .iter()
                .find(|u| u.extension == row.target && already_recycled(u, &id))
            else {
                continue;
            };
            // The changes recorded so far (planned, or what the reset cleared) end at the new
            // identity, as after a recycle of this run.
            merge_recycle(&mut row.changes, user, &id);
            for s in row.steps.iter_mut() {
                match (s.kind, s.state) {
                    (StepKind::Reset, StepState::Intended) => {
                        s.state = StepState::Done;
                        row.notes.push("reset: done (found reset and recycled on the PBX after an operator restart)".into());
                    }
                    (StepKind::Recycle, StepState::Intended | StepState::Pending) => {
                        s.state = StepState::Done;
                        row.notes.push("recycle: done (found on the PBX)".into());
                    }
                    _ => {}
                }
            }
            batches[b].dirty = true;
        }
        Ok(())
    }

    /// Marks `kind` intended for every row due to run it and records that before it runs; a row
    /// whose earlier steps did not all go through skips it. Returns the rows due.
    async fn intend(
        &self,
        batches: &mut [Batch],
        work: &[At],
        kind: StepKind,
    ) -> Result<Vec<At>, Error> {
        let mut due = Vec::new();
        for &(b, i) in work {
            let batch = &mut batches[b];
            let row = &mut batch.rows[i];
            let Some(pos) = row.steps.iter().position(|s| s.kind == kind) else {
                continue;
            };
            if row.steps[pos].state.is_final() {
                continue;
            }
            let ready = row.steps[..pos]
                .iter()
                .all(|s| matches!(s.state, StepState::Done | StepState::NoOp));
            row.steps[pos].state = if ready {
                due.push((b, i));
                StepState::Intended
            } else {
                StepState::Skipped
            };
            // What takes the user away is preceded by a snapshot: where it goes is recorded
            // with the intent (the revert reads it in the row).
            let takes_away = matches!(kind, StepKind::Reset | StepKind::Recycle);
            if ready && takes_away && row.snapshot_run.is_none() {
                row.snapshot_run = Some(self.run_key.to_string());
            }
            batch.dirty = true;
        }
        self.save(batches).await?;
        Ok(due)
    }

    async fn reset(
        &self,
        batches: &mut [Batch],
        work: &[At],
        redo: &HashMap<At, Vec<StepKind>>,
    ) -> Result<(), Error> {
        let due = self.intend(batches, work, StepKind::Reset).await?;
        if due.is_empty() {
            return Ok(());
        }
        self.keep_snapshots(batches, &due).await?;
        let resets: Vec<UserReset> = due
            .iter()
            .map(|&(b, i)| UserReset {
                extension: batches[b].rows[i].target.clone(),
                parts: self.parts.to_vec(),
            })
            .collect();
        let outcomes = self.backend.reset_users(&resets).await?;
        for (at, outcome) in due.into_iter().zip(outcomes) {
            let row = &mut batches[at.0].rows[at.1];
            let state = match outcome {
                ResetOutcome::Done { before, unassigned } => {
                    if !redo[&at].contains(&StepKind::Reset) {
                        // What this transaction really cleared. A resumed row keeps the planned
                        // changes: its first attempt may already have cleared them.
                        row.changes = reset_changes(&before, &unassigned, self.parts);
                    }
                    row.notes
                        .push(format!("reset: done, status {SETUP_REQUIRED}"));
                    if row.changes.is_empty() {
                        StepState::NoOp
                    } else {
                        StepState::Done
                    }
                }
                ResetOutcome::NotFound => fail(row, "extension no longer exists on the PBX"),
                ResetOutcome::Failed(e) => fail(
                    row,
                    &format!("reset failed, nothing of it was written: {e}"),
                ),
            };
            set(&mut batches[at.0], at.1, StepKind::Reset, state);
        }
        self.save(batches).await
    }

    /// Kept before the first step that takes anything of the users away (a snapshot already
    /// kept by this run stays: it is the state before the run), so a revert can bring it back.
    /// The run it goes under was recorded in the row with the step's intent ([`Self::intend`]).
    async fn keep_snapshots(&self, batches: &[Batch], due: &[At]) -> Result<(), Error> {
        let extensions: Vec<String> = due
            .iter()
            .map(|&(b, i)| batches[b].rows[i].target.clone())
            .collect();
        Ok(self
            .backend
            .keep_snapshots(self.run_key, &extensions)
            .await?)
    }

    /// Old phones stop working now, not at their next re-registration. A PBX that cannot be
    /// reached stops the run (the drops are done again); any other error fails the target.
    async fn drop_registrations(&self, batches: &mut [Batch], work: &[At]) -> Result<(), Error> {
        let due = self
            .intend(batches, work, StepKind::DropRegistrations)
            .await?;
        if due.is_empty() {
            return Ok(());
        }
        for (b, i) in due {
            let row = &mut batches[b].rows[i];
            let state = match self.backend.drop_registrations(&row.target).await {
                Ok(()) => {
                    row.notes.push("registrations dropped".into());
                    StepState::Done
                }
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => fail(row, &format!("registrations not dropped: {e}")),
            };
            set(&mut batches[b], i, StepKind::DropRegistrations, state);
        }
        self.save(batches).await
    }

    async fn recycle(&self, batches: &mut [Batch], work: &[At]) -> Result<(), Error> {
        let due = self.intend(batches, work, StepKind::Recycle).await?;
        let mut calls = Vec::new();
        for (b, i) in due {
            let row = &mut batches[b].rows[i];
            match identity_of(row) {
                Some(id) => calls.push(((b, i), id)),
                None => {
                    let state = fail(row, "the stored row names no new person; plan it again");
                    set(&mut batches[b], i, StepKind::Recycle, state);
                }
            }
        }
        if calls.is_empty() {
            return self.save(batches).await;
        }
        let ats: Vec<At> = calls.iter().map(|(at, _)| *at).collect();
        self.keep_snapshots(batches, &ats).await?;
        let identities: Vec<_> = calls.iter().map(|(_, id)| id.clone()).collect();
        let outcomes = self.backend.recycle_users(&identities).await?;
        for (((b, i), id), outcome) in calls.into_iter().zip(outcomes) {
            let row = &mut batches[b].rows[i];
            let state = match outcome {
                ResetOutcome::Done { before, .. } => {
                    merge_recycle(&mut row.changes, &before, &id);
                    row.notes.push(format!(
                        "recycle: done: extension given to {} {}, status {PASSWORD_REQUIRED} (no usable password or voicemail PIN)",
                        id.first_name, id.last_name
                    ));
                    StepState::Done
                }
                ResetOutcome::NotFound => fail(row, "extension no longer exists on the PBX"),
                ResetOutcome::Failed(e) => fail(
                    row,
                    &format!("recycle failed after the reset, nothing of it was written: {e}"),
                ),
            };
            set(&mut batches[b], i, StepKind::Recycle, state);
        }
        self.save(batches).await
    }

    /// Welcome mails a flight at a time: the flight is recorded as intended, sent, and its
    /// outcomes recorded, so a crash leaves at most one flight uncertain.
    async fn welcome(&self, batches: &mut [Batch], work: &[At]) -> Result<Ended, Error> {
        let mut due: Vec<At> = Vec::new();
        for &(b, i) in work {
            let batch = &mut batches[b];
            let row = &mut batch.rows[i];
            let Some(pos) = row
                .steps
                .iter()
                .position(|s| s.kind == StepKind::WelcomeMail)
            else {
                continue;
            };
            if row.steps[pos].state != StepState::Pending {
                continue;
            }
            let ready = row.steps[..pos]
                .iter()
                .all(|s| matches!(s.state, StepState::Done | StepState::NoOp));
            let to = identity_of(row).and_then(|id| id.email);
            let state = match (ready, to, self.mailer) {
                (false, _, _) => StepState::Skipped,
                (true, None, _) => {
                    row.notes.push(
                        "welcome email: not sent: the recycle entry has no email (see status.warnings)".into(),
                    );
                    StepState::Skipped
                }
                (true, Some(_), None) => fail(
                    row,
                    "welcome email: not sent: the PbxConnection has no usable spec.smtp; fix it, then retry",
                ),
                (true, Some(_), Some(_)) => {
                    due.push((b, i));
                    continue;
                }
            };
            set(batch, i, StepKind::WelcomeMail, state);
        }
        let Some(mailer) = self.mailer else {
            self.save(batches).await?;
            return Ok(Ended::Finished);
        };
        let flights = Flights {
            kind: StepKind::WelcomeMail,
            outbox: Some(mailer),
            journal: self.journal,
            stopping: self.stopping,
        };
        let letter = |row: &Row| {
            let id = identity_of(row).ok_or("the recycle entry is not in the stored plan")?;
            let to = id.email.ok_or("the recycle entry has no email")?;
            let (subject, body) = mail::welcome(&row.target, &id.first_name, self.domain);
            Ok(Letter { to, subject, body })
        };
        let note = |sent: Result<(), &str>| match sent {
            Ok(()) => "welcome email: sent".to_string(),
            Err(e) => format!("welcome email: failed: {e}"),
        };
        let ended = send_in_flights(flights, batches, &due, letter, note).await?;
        self.save(batches).await?;
        Ok(ended)
    }
}

/// A step that failed, with why for people.
fn fail(row: &mut Row, note: &str) -> StepState {
    row.notes.push(note.to_string());
    StepState::Failed
}

#[cfg(test)]
mod tests {
    //! The executor driven through a crash at every record it makes and inside every side
    //! effect, against the engine's in-memory PBX, journal and outbox (no servers).

    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::api::ConnectionRef;
    use crate::api::user_recycle::{RecycleEntry, RecycleTargets, UserRecycleSpec};
    use crate::engine::fake::{self, Fault, Journal, Pbx};
    use crate::engine::outbox::MAIL_FLIGHT;
    use crate::pbx::{User, UserField};
    use crate::plan::recycle::reset_parts;

    const RESET_ONLY: std::ops::Range<u32> = 200..205;
    const RECYCLED: std::ops::Range<u32> = 205..230;
    /// Recycled, without an email: never mailed.
    const NO_EMAIL: [u32; 2] = [207, 208];

    fn spec() -> UserRecycleSpec {
        UserRecycleSpec {
            connection_ref: ConnectionRef {
                name: "acme".into(),
            },
            revert_of: None,
            targets: Some(RecycleTargets {
                extensions: (RESET_ONLY.start..RECYCLED.end)
                    .map(|e| e.to_string())
                    .collect(),
            }),
            reset: crate::api::user_recycle::default_reset(),
            recycle: RECYCLED
                .map(|e| RecycleEntry {
                    extension: e.to_string(),
                    first_name: Some(format!("New{e}")),
                    last_name: Some(format!("Hire{e}")),
                    email: (!NO_EMAIL.contains(&e)).then(|| format!("new{e}@acme.test")),
                })
                .collect(),
            send_welcome_email: true,
            not_before: None,
            execute_before: None,
            requested_by: None,
        }
    }

    fn person(ext: &str) -> User {
        let mut u = fake::user(ext);
        for (f, v) in [
            (UserField::FirstName, format!("Old{ext}")),
            (UserField::LastName, "Leaver".into()),
            (UserField::Password, "ha1:seed".into()),
            (UserField::VoicemailPin, "sha256:pin".into()),
            (UserField::Status, "Active".into()),
        ] {
            u.values.insert(f, v);
        }
        u
    }

    fn pbx() -> Pbx {
        let pbx = Pbx::default();
        for e in RESET_ONLY.start..RECYCLED.end {
            let ext = e.to_string();
            pbx.users.lock().unwrap().insert(ext.clone(), person(&ext));
        }
        pbx
    }

    /// The rows the planner makes from what `pbx` holds; `earlier`: a retry's earlier rows.
    fn planned(pbx: &Pbx, earlier: Option<Vec<Row>>) -> Vec<Row> {
        let spec = spec();
        let users: Vec<User> = pbx.users.lock().unwrap().values().cloned().collect();
        plan::plan(&spec, 1, plan::scope(&spec, earlier), &users, &[]).0
    }

    fn journal_with(rows: Vec<Row>) -> Journal {
        Journal {
            batches: Mutex::new(BTreeMap::from([(0, rows)])),
            writes: AtomicUsize::new(0),
            crash_at: AtomicUsize::new(usize::MAX),
        }
    }

    /// The journal's batch as a restarted operator reads it.
    fn reload(journal: &Journal) -> Vec<Batch> {
        vec![Batch::new(0, journal.batches.lock().unwrap()[&0].clone())]
    }

    fn rows_of(journal: &Journal) -> Vec<Row> {
        journal.batches.lock().unwrap()[&0].clone()
    }

    /// An outbox whose process dies at its `die_at`-th mail: that mail and the rest of its
    /// flight never go out, and nothing more is recorded.
    struct Mailbox<'a> {
        sent: Mutex<Vec<String>>,
        die_at: AtomicUsize,
        dead: AtomicBool,
        journal: &'a Journal,
    }

    impl<'a> Mailbox<'a> {
        fn new(journal: &'a Journal) -> Self {
            Mailbox {
                sent: Mutex::new(vec![]),
                die_at: AtomicUsize::new(usize::MAX),
                dead: AtomicBool::new(false),
                journal,
            }
        }

        fn sent(&self) -> Vec<String> {
            self.sent.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl super::Outbox for Mailbox<'_> {
        async fn send(&self, to: &str, _: &str, _: String) -> Result<(), String> {
            let mut sent = self.sent.lock().unwrap();
            if self.dead.load(Ordering::SeqCst) || sent.len() == self.die_at.load(Ordering::SeqCst)
            {
                self.dead.store(true, Ordering::SeqCst);
                let next = self.journal.writes.load(Ordering::SeqCst);
                self.journal.crash_at.store(next, Ordering::SeqCst);
                return Err("killed".into());
            }
            sent.push(to.to_string());
            Ok(())
        }
    }

    fn exec<'a>(
        pbx: &'a Pbx,
        parts: &'a [ResetPart],
        outbox: Option<&'a dyn super::Outbox>,
        journal: &'a Journal,
        stopping: &'a (dyn Fn() -> bool + Sync),
    ) -> RecycleExec<'a> {
        RecycleExec {
            backend: pbx,
            parts,
            mailer: outbox,
            domain: "acme.test",
            journal,
            stopping,
            run_key: "run-1",
        }
    }

    /// Where a run is killed.
    #[derive(Clone, Debug)]
    enum Kill {
        /// At the journal's n-th record: what came before it happened, the record did not.
        Record(usize),
        /// Inside a PBX call, after some of its targets took effect.
        Pbx(Fault),
        /// Sending the n-th mail.
        Mail(usize),
    }

    struct Ended {
        rows: Vec<Row>,
        pbx: Pbx,
        sent: Vec<String>,
        crashes: u32,
        records: usize,
    }

    /// Runs the plan with a kill, then restarts the operator until the run finishes.
    async fn run_with(kill: Kill) -> Ended {
        let pbx = pbx();
        let journal = journal_with(planned(&pbx, None));
        let outbox = Mailbox::new(&journal);
        match kill.clone() {
            Kill::Record(n) => journal.crash_at.store(n, Ordering::SeqCst),
            Kill::Pbx(fault) => *pbx.fault.lock().unwrap() = Some(fault),
            Kill::Mail(n) => outbox.die_at.store(n, Ordering::SeqCst),
        }
        let parts = reset_parts(&spec().reset);
        let never = || false;
        let mut crashes = 0;
        loop {
            let exec = exec(&pbx, &parts, Some(&outbox), &journal, &never);
            match exec.run(&mut reload(&journal)).await {
                Ok(super::Ended::Finished) => break,
                Ok(super::Ended::Stopped) => unreachable!("nobody asked to stop"),
                Err(e) => {
                    assert!(e.is_transient(), "{kill:?}: {e}");
                    crashes += 1;
                    assert!(crashes < 3, "{kill:?}: the run does not finish: {e}");
                    journal.crash_at.store(usize::MAX, Ordering::SeqCst);
                    outbox.dead.store(false, Ordering::SeqCst);
                    outbox.die_at.store(usize::MAX, Ordering::SeqCst);
                }
            }
        }
        Ended {
            rows: rows_of(&journal),
            sent: outbox.sent(),
            records: journal.writes.load(Ordering::SeqCst),
            pbx,
            crashes,
        }
    }

    fn count(log: &[(&'static str, String)], call: &str, ext: &str) -> usize {
        log.iter().filter(|(c, e)| *c == call && e == ext).count()
    }

    /// What every run must end with, however it was killed.
    fn assert_sound(what: &str, end: &Ended) {
        let targets: BTreeSet<&String> = end.rows.iter().map(|r| &r.target).collect();
        assert_eq!(targets.len(), 30, "{what}: each target once");
        assert_eq!(end.rows.len(), 30);
        let log = end.pbx.recycle_log.lock().unwrap().clone();
        let users = end.pbx.users.lock().unwrap();
        let uncertain = end
            .rows
            .iter()
            .filter(|r| r.outcome == Outcome::Uncertain)
            .count();
        assert!(
            uncertain <= MAIL_FLIGHT,
            "{what}: at most one flight uncertain"
        );
        for r in &end.rows {
            let e: u32 = r.target.parse().unwrap();
            let user = &users[&r.target];
            assert!(r.steps.iter().all(|s| s.state.is_final()), "{what}: {r:?}");
            assert_eq!(steps::outcome(&r.steps), r.outcome, "{what}: {r:?}");
            // Never reset once recycled; recycled exactly once (a begun one is checked first).
            let first_recycle = log
                .iter()
                .position(|(c, x)| *c == "recycle" && x == &r.target);
            if let Some(at) = first_recycle {
                assert!(
                    !log[at..]
                        .iter()
                        .any(|(c, x)| *c == "reset" && x == &r.target),
                    "{what}: {} reset after its recycle",
                    r.target
                );
            }
            assert!(count(&log, "reset", &r.target) >= 1, "{what}: {}", r.target);
            assert!(count(&log, "drop", &r.target) >= 1, "{what}: {}", r.target);
            let to = format!("new{e}@acme.test");
            let mails = end.sent.iter().filter(|s| **s == to).count();
            assert!(mails <= 1, "{what}: {to} mailed {mails} times");
            if RESET_ONLY.contains(&e) {
                assert_eq!(r.outcome, Outcome::Changed, "{what}: {r:?}");
                assert_eq!(user.get(UserField::Status), Some(SETUP_REQUIRED));
                assert_eq!(user.get(UserField::FirstName), None);
                continue;
            }
            assert_eq!(count(&log, "recycle", &r.target), 1, "{what}: {}", r.target);
            assert_eq!(user.get(UserField::Status), Some(PASSWORD_REQUIRED));
            assert_eq!(
                user.get(UserField::FirstName),
                Some(format!("New{e}").as_str())
            );
            assert!(
                r.notes.iter().any(|n| n.starts_with("recycle: done")),
                "{what}: {:?}",
                r.notes
            );
            if NO_EMAIL.contains(&e) {
                assert_eq!(r.outcome, Outcome::Changed, "{what}: {r:?}");
                assert!(
                    r.notes
                        .iter()
                        .any(|n| n.starts_with("welcome email: not sent"))
                );
                continue;
            }
            match r.outcome {
                Outcome::Changed => {
                    assert_eq!(mails, 1, "{what}: {r:?}");
                    assert!(r.notes.iter().any(|n| n == "welcome email: sent"));
                }
                Outcome::Uncertain => {
                    assert!(end.crashes > 0);
                    assert!(
                        r.notes
                            .iter()
                            .any(|n| n.starts_with("welcome email: not re-sent")),
                        "{what}: {:?}",
                        r.notes
                    );
                }
                other => panic!("{what}: {} ended {other:?}: {:?}", r.target, r.notes),
            }
        }
    }

    #[tokio::test]
    async fn an_undisturbed_run_changes_everyone_and_mails_each_new_person_once() {
        let end = run_with(Kill::Record(usize::MAX)).await;
        assert_sound("undisturbed", &end);
        assert_eq!(end.crashes, 0);
        assert_eq!(end.sent.len(), 23);
        let log = end.pbx.recycle_log.lock().unwrap();
        assert!(
            (RESET_ONLY.start..RECYCLED.end).all(|e| count(&log, "reset", &e.to_string()) == 1)
        );
        let r205 = end.rows.iter().find(|r| r.target == "205").unwrap();
        let fields: Vec<String> = r205
            .changes
            .iter()
            .map(|c| format!("{}: {:?} -> {:?}", c.field, c.from, c.to))
            .collect();
        assert!(fields.contains(&r#"firstName: Some("Old205") -> Some("New205")"#.into()));
        assert!(fields.contains(&r#"status: Some("Active") -> Some("PasswordRequired")"#.into()));
        assert!(
            !format!("{:?}", end.rows).contains("ha1:"),
            "no secret in the rows"
        );
    }

    #[tokio::test]
    async fn a_kill_at_any_record_leaves_one_outcome_per_target_and_no_mail_twice() {
        let records = run_with(Kill::Record(usize::MAX)).await.records;
        assert!(records >= 10, "intent and outcome of every step: {records}");
        let mut uncertain_seen = false;
        for n in 0..=records {
            let end = run_with(Kill::Record(n)).await;
            assert_sound(&format!("killed at record {n}"), &end);
            uncertain_seen |= end.rows.iter().any(|r| r.outcome == Outcome::Uncertain);
        }
        assert!(
            uncertain_seen,
            "a kill after a flight went out leaves it uncertain"
        );
    }

    #[tokio::test]
    async fn a_kill_inside_any_pbx_call_is_resumed_without_a_reset_after_a_recycle() {
        for call in ["reset", "drop", "recycle"] {
            for after in [0, 1, 7, 24] {
                let end = run_with(Kill::Pbx(Fault::Crash { call, after })).await;
                let what = format!("killed in {call} after {after}");
                assert_eq!(end.crashes, 1, "{what}");
                assert_sound(&what, &end);
                assert!(
                    end.rows.iter().all(|r| r.outcome == Outcome::Changed),
                    "{what}: no mail was under way"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_kill_while_mailing_reports_the_flight_uncertain_and_sends_nothing_twice() {
        for n in [0, 5, 19, 20, 22] {
            let end = run_with(Kill::Mail(n)).await;
            let what = format!("killed sending mail {n}");
            assert_sound(&what, &end);
            let uncertain = end
                .rows
                .iter()
                .filter(|r| r.outcome == Outcome::Uncertain)
                .count();
            // The flight of the mail that died: 20 mails, or the 3 of the second flight.
            assert_eq!(uncertain, if n < 20 { 20 } else { 3 }, "{what}");
            assert_eq!(end.sent.len(), 23 - uncertain + n % 20, "{what}");
        }
    }

    #[tokio::test]
    async fn a_retry_sends_exactly_the_uncertain_mails_and_resets_nobody_again() {
        let end = run_with(Kill::Mail(3)).await;
        let uncertain: Vec<String> = end
            .rows
            .iter()
            .filter(|r| r.outcome == Outcome::Uncertain)
            .map(|r| r.target.clone())
            .collect();
        assert_eq!(uncertain.len(), 20);
        let pbx = end.pbx;
        let log_before = pbx.recycle_log.lock().unwrap().clone();
        let journal = journal_with(planned(&pbx, Some(end.rows.clone())));
        let outbox = Mailbox::new(&journal);
        let parts = reset_parts(&spec().reset);
        let never = || false;
        let exec = exec(&pbx, &parts, Some(&outbox), &journal, &never);
        let mut batches = reload(&journal);
        assert_eq!(
            exec.run(&mut batches).await.unwrap(),
            super::Ended::Finished
        );
        let expected: Vec<String> = uncertain
            .iter()
            .map(|e| format!("new{e}@acme.test"))
            .collect();
        assert_eq!(outbox.sent(), expected, "exactly the uncertain mails");
        assert!(
            batches[0]
                .rows
                .iter()
                .all(|r| r.outcome == Outcome::Changed)
        );
        assert_eq!(
            *pbx.recycle_log.lock().unwrap(),
            log_before,
            "nobody reset, dropped or recycled again"
        );
    }

    #[tokio::test]
    async fn a_pbx_outage_stops_the_run_with_the_journal_intact() {
        let pbx = pbx();
        let journal = journal_with(planned(&pbx, None));
        *pbx.fault.lock().unwrap() = Some(Fault::Crash {
            call: "reset",
            after: 3,
        });
        let outbox = Mailbox::new(&journal);
        let parts = reset_parts(&spec().reset);
        let never = || false;
        let exec = exec(&pbx, &parts, Some(&outbox), &journal, &never);
        let err = exec.run(&mut reload(&journal)).await.unwrap_err();
        assert!(matches!(err, Error::Pbx(_)) && err.is_transient(), "{err}");
        let rows = rows_of(&journal);
        assert_eq!(rows.len(), 30);
        assert!(rows.iter().all(|r| r.outcome == Outcome::InProgress
            && state_of(r, StepKind::Reset) == Some(StepState::Intended)));
        assert_eq!(
            pbx.recycle_log.lock().unwrap().len(),
            3,
            "3 resets went through"
        );
        // The PBX is back: the run resumes and the 3 are reset again (harmless), nobody twice
        // recycled.
        assert_eq!(
            exec.run(&mut reload(&journal)).await.unwrap(),
            super::Ended::Finished
        );
        assert!(
            rows_of(&journal)
                .iter()
                .all(|r| r.outcome == Outcome::Changed)
        );
        assert_eq!(outbox.sent().len(), 23);
    }

    #[tokio::test]
    async fn a_target_the_pbx_refuses_fails_alone_and_a_retry_finishes_it() {
        for (call, target) in [("reset", "206"), ("drop", "209"), ("recycle", "212")] {
            let pbx = pbx();
            *pbx.fault.lock().unwrap() = Some(Fault::Refuse {
                call,
                target: target.into(),
            });
            let journal = journal_with(planned(&pbx, None));
            let outbox = Mailbox::new(&journal);
            let parts = reset_parts(&spec().reset);
            let never = || false;
            let exec = exec(&pbx, &parts, Some(&outbox), &journal, &never);
            let ended = exec.run(&mut reload(&journal)).await.unwrap();
            assert_eq!(ended, super::Ended::Finished);
            let rows = rows_of(&journal);
            for r in &rows {
                if r.target == target {
                    assert_eq!(r.outcome, Outcome::Failed, "{call}: {r:?}");
                    assert_eq!(state_of(r, StepKind::WelcomeMail), Some(StepState::Skipped));
                } else {
                    assert_eq!(r.outcome, Outcome::Changed, "{call}: {r:?}");
                }
            }
            let to = format!("new{target}@acme.test");
            assert!(!outbox.sent().contains(&to), "{call}: not mailed");
            let resets = count(&pbx.recycle_log.lock().unwrap(), "reset", target);
            // The PBX takes it now: a retry finishes exactly the failed target.
            *pbx.fault.lock().unwrap() = None;
            let retry = journal_with(planned(&pbx, Some(rows)));
            let outbox = Mailbox::new(&retry);
            let exec = RecycleExec {
                journal: &retry,
                mailer: Some(&outbox),
                ..exec
            };
            exec.run(&mut reload(&retry)).await.unwrap();
            assert!(
                rows_of(&retry)
                    .iter()
                    .all(|r| r.outcome == Outcome::Changed)
            );
            assert_eq!(outbox.sent(), [to], "{call}: only the failed target mailed");
            let log = pbx.recycle_log.lock().unwrap();
            let again = if call == "reset" { 1 } else { 0 };
            assert_eq!(
                count(&log, "reset", target),
                resets + again,
                "{call}: a reset that went through is not repeated"
            );
            assert_eq!(count(&log, "recycle", target), 1);
        }
    }

    #[tokio::test]
    async fn a_stop_finishes_the_flight_under_way_and_leaves_nothing_uncertain() {
        let pbx = pbx();
        let journal = journal_with(planned(&pbx, None));
        let outbox = Mailbox::new(&journal);
        let parts = reset_parts(&spec().reset);
        let stop = || !outbox.sent().is_empty();
        let exec = exec(&pbx, &parts, Some(&outbox), &journal, &stop);
        assert_eq!(
            exec.run(&mut reload(&journal)).await.unwrap(),
            super::Ended::Stopped
        );
        assert_eq!(outbox.sent().len(), MAIL_FLIGHT);
        let never = || false;
        let exec = RecycleExec {
            stopping: &never,
            run_key: "run-1",
            ..exec
        };
        assert_eq!(
            exec.run(&mut reload(&journal)).await.unwrap(),
            super::Ended::Finished
        );
        let sent = outbox.sent();
        assert_eq!(sent.iter().collect::<BTreeSet<_>>().len(), 23);
        assert_eq!(sent.len(), 23, "everyone mailed once");
        assert!(
            rows_of(&journal)
                .iter()
                .all(|r| r.outcome == Outcome::Changed)
        );
    }

    #[tokio::test]
    async fn without_smtp_the_welcome_fails_and_the_recycle_stands() {
        let pbx = pbx();
        let journal = journal_with(planned(&pbx, None));
        let parts = reset_parts(&spec().reset);
        let never = || false;
        let exec = exec(&pbx, &parts, None, &journal, &never);
        exec.run(&mut reload(&journal)).await.unwrap();
        for r in rows_of(&journal) {
            let e: u32 = r.target.parse().unwrap();
            let expected = if RECYCLED.contains(&e) && !NO_EMAIL.contains(&e) {
                assert!(r.notes.iter().any(|n| n.contains("no usable spec.smtp")));
                Outcome::Failed
            } else {
                Outcome::Changed
            };
            assert_eq!(r.outcome, expected, "{r:?}");
        }
    }

    #[tokio::test]
    async fn a_reset_that_clears_nothing_is_unchanged() {
        let pbx = Pbx::default();
        let mut bare = User {
            extension: "201".into(),
            ..Default::default()
        };
        bare.values.insert(UserField::Status, SETUP_REQUIRED.into());
        pbx.users.lock().unwrap().insert("201".into(), bare.clone());
        let rows = vec![Row {
            target: "201".into(),
            outcome: Outcome::Planned,
            actions: vec![plan::ACTION_RESET.into()],
            steps: plan::recycle_steps(false, false),
            ..Default::default()
        }];
        let journal = journal_with(rows);
        let parts = [ResetPart::Name, ResetPart::Email];
        let never = || false;
        let exec = exec(&pbx, &parts, None, &journal, &never);
        exec.run(&mut reload(&journal)).await.unwrap();
        let row = &rows_of(&journal)[0];
        assert_eq!(row.outcome, Outcome::Unchanged, "{row:?}");
        assert_eq!(count(&pbx.recycle_log.lock().unwrap(), "drop", "201"), 1);
    }

    #[tokio::test]
    async fn a_legacy_row_begun_before_an_upgrade_is_checked_not_reset() {
        // Stored by an operator from before steps, InProgress: the PBX shows the recycle done.
        let pbx = pbx();
        let mut row = planned(&pbx, None)
            .into_iter()
            .find(|r| r.target == "210")
            .unwrap();
        row.outcome = Outcome::InProgress;
        row.steps.clear();
        let id = identity_of(&row).unwrap();
        pbx.recycle_users(std::slice::from_ref(&id)).await.unwrap();
        pbx.recycle_log.lock().unwrap().clear();
        let journal = journal_with(vec![row]);
        let outbox = Mailbox::new(&journal);
        let parts = reset_parts(&spec().reset);
        let never = || false;
        let exec = exec(&pbx, &parts, Some(&outbox), &journal, &never);
        exec.run(&mut reload(&journal)).await.unwrap();
        let row = &rows_of(&journal)[0];
        let log = pbx.recycle_log.lock().unwrap().clone();
        assert_eq!(
            log,
            [("drop", "210".to_string())],
            "no reset, no recycle again"
        );
        assert_eq!(
            row.outcome,
            Outcome::Uncertain,
            "its mail may have gone out"
        );
        assert!(outbox.sent().is_empty());
    }
}
