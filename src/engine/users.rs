//! Executes stored user-change rows: field writes (compare-and-set), then one-shot actions, then
//! mail, each step recorded as intended before it runs and with its outcome after.
//!
//! A batch first moves its rows from Planned to InProgress; a row found InProgress was begun by
//! an earlier attempt and is resumed step by step (see [`steps::resume`]): its writes are
//! checked against the PBX, its actions redone (each is idempotent), and a mail that was under
//! way is reported Uncertain instead of being sent twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::outbox::{Flights, Letter, Outbox, send_in_flights};
use super::steps;
use super::{At, Batch, Ended, Error, Executor, Journal, Store, at_all, set, state_of};
use crate::api::Outcome;
use crate::mail;
use crate::pbx::directory::Move;
use crate::pbx::{
    ActionOutcome, FieldWrite, NewValue, PbxBackend, Secret, User, UserAction, UserChange,
    UserField, WriteOutcome,
};
use crate::plan::stored::Row;
use crate::plan::stored::{StepKind, StepState, user_steps};
use crate::plan::users as user_plan;

mod atomic;

pub struct UserExec<'a> {
    pub backend: &'a dyn PbxBackend,
    /// Secret field values, read from their Secrets for this attempt (never stored).
    pub secrets: &'a HashMap<UserField, Secret>,
    pub mailer: Option<&'a dyn Outbox>,
    pub domain: &'a str,
    /// All batches' writes in one transaction: any failure or conflict rolls back all.
    pub atomic: bool,
    pub journal: &'a dyn Journal,
    /// Asked between steps: true once the operator is stopping.
    pub stopping: &'a (dyn Fn() -> bool + Sync),
    /// The run's key in the PBX (its ledger id): the snapshots of the users it removes are
    /// kept under it, and the restores it does are recorded under it.
    pub run_key: &'a str,
}

#[async_trait::async_trait]
impl Executor for UserExec<'_> {
    /// Atomic: one transaction, a batch in memory at a time (see [`atomic`]).
    async fn run_together(
        &self,
        store: &dyn Store,
        digests: &[String],
        from: usize,
        to: usize,
    ) -> Result<Ended, Error> {
        if self.atomic {
            self.run_atomic(store, digests, from, to).await
        } else {
            super::run_loaded(self, store, digests, from, to).await
        }
    }

    /// Runs the unfinished rows of `batches` to their outcomes, or until a stop is asked for.
    async fn run(&self, batches: &mut [Batch]) -> Result<Ended, Error> {
        let redo = begin(batches);
        self.save(batches).await?;
        let work: Vec<At> = at_all(batches, |r| r.outcome == Outcome::InProgress);
        if work.is_empty() {
            return Ok(Ended::Finished);
        }
        // A revert's restores come first: the steps after them work on the restored user.
        super::restore::restore(self.backend, self.journal, batches, &work, self.run_key).await?;
        if (self.stopping)() {
            return Ok(Ended::Stopped);
        }
        let extensions = work
            .iter()
            .map(|&(b, i)| batches[b].rows[i].target.clone())
            .filter(|t| !t.is_empty())
            .collect();
        let fields = written_fields_only(batches, &work);
        let current =
            crate::pbx::users_with_fields(self.backend, extensions, fields.as_deref()).await?;
        self.gone(batches, &work, &current, &redo);
        self.write(batches, &work, &current, &redo).await?;
        if (self.stopping)() {
            return Ok(Ended::Stopped);
        }
        for kind in [
            StepKind::Unlock,
            StepKind::ResetTwoFactor,
            StepKind::ResetPassword,
            StepKind::Lock,
            StepKind::Remove,
        ] {
            self.action(kind, batches, &work, &current, &redo).await?;
            if (self.stopping)() {
                return Ok(Ended::Stopped);
            }
        }
        for kind in [StepKind::ResetMail, StepKind::WelcomeMail] {
            if self.mail(kind, batches, &work, &current).await? == Ended::Stopped {
                return Ok(Ended::Stopped);
            }
        }
        finish(batches, &work);
        self.save(batches).await?;
        Ok(Ended::Finished)
    }
}

/// Moves the rows of `batches` to InProgress and their writes to Intended (recorded with the
/// batch's, before anything is written); rows an earlier attempt began are resumed step by
/// step. Returns the steps to redo, by row.
fn begin(batches: &mut [Batch]) -> HashMap<At, Vec<StepKind>> {
    let mut redo: HashMap<At, Vec<StepKind>> = HashMap::new();
    for (b, batch) in batches.iter_mut().enumerate() {
        for (i, row) in batch.rows.iter_mut().enumerate() {
            // Stored by an operator from before steps were recorded.
            upgrade_legacy(row);
            if row.outcome == Outcome::Planned {
                row.outcome = Outcome::InProgress;
                batch.dirty = true;
            }
            if row.outcome != Outcome::InProgress {
                continue;
            }
            let again = steps::resume(&mut row.steps);
            if !again.is_empty() {
                redo.insert((b, i), again);
            }
            for s in row.steps.iter_mut() {
                if s.kind == StepKind::Write && s.state == StepState::Pending {
                    s.state = StepState::Intended;
                    batch.dirty = true;
                }
            }
        }
    }
    redo
}

/// The change a row's remaining `writes` make, with the numbers the plan takes from holders.
fn change_of_row(row: &Row, writes: Vec<FieldWrite>) -> UserChange {
    UserChange {
        extension: row.target.clone(),
        writes,
        takes: row
            .takes
            .iter()
            .map(|t| Move {
                number: t.number.clone(),
                holder: t.holder.clone(),
                held_as: UserField::from_name(&t.held_as).unwrap_or(UserField::PrimaryNumber),
            })
            .collect(),
    }
}

impl UserExec<'_> {
    async fn save(&self, batches: &mut [Batch]) -> Result<(), Error> {
        super::save(self.journal, batches).await
    }

    /// Targets no longer on the PBX: a Remove begun before a restart is done; anything else
    /// cannot go on.
    fn gone(
        &self,
        batches: &mut [Batch],
        work: &[At],
        current: &BTreeMap<String, User>,
        redo: &HashMap<At, Vec<StepKind>>,
    ) {
        for &(b, i) in work {
            let batch = &mut batches[b];
            let row = &mut batch.rows[i];
            if row.steps.is_empty() || current.contains_key(&row.target) {
                continue;
            }
            batch.dirty = true;
            let removed = row.steps.iter().any(|s| {
                s.kind == StepKind::Remove
                    && (s.state == StepState::Done
                        || (s.state == StepState::Intended
                            && redo.get(&(b, i)).is_some_and(|k| k.contains(&s.kind))))
            });
            let mut noted = false;
            for s in row.steps.iter_mut().filter(|s| !s.state.is_final()) {
                if removed && s.kind == StepKind::Remove {
                    s.state = StepState::Done;
                    row.notes.push("Remove: done".into());
                } else if removed {
                    s.state = StepState::Skipped;
                    row.notes
                        .push(format!("{}: not done: the user was removed", s.kind.name()));
                } else {
                    s.state = if noted {
                        StepState::Skipped
                    } else {
                        StepState::Failed
                    };
                    if !noted {
                        row.notes.push(format!(
                            "extension {} no longer exists on the PBX",
                            row.target
                        ));
                    }
                    noted = true;
                }
            }
        }
    }

    /// The field writes of every row that has them, compare-and-set, in one call.
    async fn write(
        &self,
        batches: &mut [Batch],
        work: &[At],
        current: &BTreeMap<String, User>,
        redo: &HashMap<At, Vec<StepKind>>,
    ) -> Result<(), Error> {
        let mut changes = Vec::new();
        let mut change_of = Vec::new();
        let mut already: Vec<At> = Vec::new();
        let restored =
            super::restore::restored_by(self.backend, batches, work, self.run_key).await?;
        let mut unrestored: Vec<At> = Vec::new();
        for &at in work {
            let row = &batches[at.0].rows[at.1];
            if state_of(row, StepKind::Write) != Some(StepState::Intended) {
                continue;
            }
            // A revert writes fields back only on the user it restored (the rest of it, when a
            // number stayed with somebody else), never on somebody else's user of that extension.
            if state_of(row, StepKind::Restore).is_some() && !restored.contains(&at) {
                unrestored.push(at);
                continue;
            }
            let Some(user) = current.get(&row.target) else {
                continue;
            };
            let mut writes = planned_writes(row, user, self.secrets);
            if writes.is_empty() {
                already.push(at);
                continue;
            }
            if redo.get(&at).is_some_and(|k| k.contains(&StepKind::Write)) {
                let planned = user_plan::PlannedUser {
                    extension: row.target.clone(),
                    writes,
                    actions: vec![],
                };
                writes = user_plan::remaining_writes(&planned, user);
                if writes.is_empty() {
                    // Written by the attempt that was interrupted: done by this run.
                    already.push(at);
                    continue;
                }
            }
            change_of.push(at);
            changes.push(change_of_row(row, writes));
        }
        for (b, i) in already {
            set(&mut batches[b], i, StepKind::Write, StepState::Done);
        }
        for (b, i) in unrestored {
            set(&mut batches[b], i, StepKind::Write, StepState::Skipped);
            batches[b].rows[i]
                .notes
                .push("write fields: not done: the user was not restored".into());
        }
        // Atomic: a write already failed or conflicted (its target gone, or recorded by the
        // attempt before a restart, in any batch of the run) means the one transaction did not
        // commit: nothing is written.
        let failed = self.atomic
            && batches.iter().flat_map(|b| &b.rows).any(|r| {
                matches!(
                    state_of(r, StepKind::Write),
                    Some(StepState::Failed | StepState::Conflict)
                )
            });
        if failed {
            for (b, i) in change_of.drain(..) {
                let (state, note) = write_state(WriteOutcome::RolledBack);
                let batch = &mut batches[b];
                set(batch, i, StepKind::Write, state);
                batch.rows[i].notes.extend(note);
            }
            changes.clear();
        }
        if !changes.is_empty() {
            let outcomes = self
                .backend
                .apply_user_changes(&changes, self.atomic)
                .await?;
            for ((b, i), outcome) in change_of.into_iter().zip(outcomes) {
                let (state, note) = write_state(outcome);
                let batch = &mut batches[b];
                set(batch, i, StepKind::Write, state);
                batch.rows[i].notes.extend(note);
            }
        }
        // The outcomes go on record with the next step's intent, or the batch's end: a restart
        // before that redoes the writes, which compare-and-set finds done (or conflicting) again.
        Ok(())
    }

    /// One kind of action for every row that has it and whose earlier steps went through.
    async fn action(
        &self,
        kind: StepKind,
        batches: &mut [Batch],
        work: &[At],
        current: &BTreeMap<String, User>,
        redo: &HashMap<At, Vec<StepKind>>,
    ) -> Result<(), Error> {
        let mut due: Vec<At> = Vec::new();
        for &(b, i) in work {
            let batch = &mut batches[b];
            let row = &mut batch.rows[i];
            let Some(state) = state_of(row, kind) else {
                continue;
            };
            if state.is_final() || !current.contains_key(&row.target) {
                continue;
            }
            if blocked(row) {
                set(batch, i, kind, StepState::Skipped);
                continue;
            }
            if state == StepState::Pending {
                set(batch, i, kind, StepState::Intended);
            }
            if kind == StepKind::Remove && batch.rows[i].snapshot_run.is_none() {
                // Where the snapshot goes, recorded with the intent: the revert reads it here.
                batch.rows[i].snapshot_run = Some(self.run_key.to_string());
                batch.dirty = true;
            }
            due.push((b, i));
        }
        if due.is_empty() {
            return Ok(());
        }
        // Recorded as intended before any of them runs.
        self.save(batches).await?;
        if kind == StepKind::Remove {
            // Kept before the users go (a snapshot already kept by this run stays: it is the
            // state before the run), so that a revert can bring them back.
            let extensions: Vec<String> = due
                .iter()
                .map(|&(b, i)| batches[b].rows[i].target.clone())
                .collect();
            self.backend
                .keep_snapshots(self.run_key, &extensions)
                .await?;
        }
        let calls: Vec<(String, UserAction)> = due
            .iter()
            .map(|&(b, i)| {
                let action = match kind {
                    // Done again after a restart, it rotates to another secret nobody knows.
                    StepKind::ResetPassword => UserAction::ResetPassword(Secret::generate()),
                    StepKind::ResetTwoFactor => UserAction::ResetTwoFactor,
                    StepKind::Unlock => UserAction::Unlock,
                    StepKind::Lock => UserAction::Lock,
                    _ => UserAction::Remove,
                };
                (batches[b].rows[i].target.clone(), action)
            })
            .collect();
        let outcomes = self.backend.apply_actions(&calls).await?;
        for ((b, i), outcome) in due.into_iter().zip(outcomes) {
            let resumed = redo.get(&(b, i)).is_some_and(|k| k.contains(&kind));
            let (state, note) = match outcome {
                ActionOutcome::Done => (StepState::Done, "done".to_string()),
                ActionOutcome::Unchanged => (StepState::NoOp, "nothing to do".into()),
                ActionOutcome::Skipped(why) => (StepState::Skipped, format!("skipped: {why}")),
                ActionOutcome::NotFound if resumed && kind == StepKind::Remove => {
                    (StepState::Done, "done".into())
                }
                ActionOutcome::NotFound => (StepState::Failed, "no such extension".into()),
                ActionOutcome::Failed(e) => (StepState::Failed, e),
            };
            let batch = &mut batches[b];
            set(batch, i, kind, state);
            batch.rows[i].notes.push(format!("{}: {note}", kind.name()));
        }
        self.save(batches).await
    }

    /// One kind of mail, a flight at a time: the flight is recorded as intended, sent, and its
    /// outcomes recorded, so a crash leaves at most one flight uncertain.
    async fn mail(
        &self,
        kind: StepKind,
        batches: &mut [Batch],
        work: &[At],
        current: &BTreeMap<String, User>,
    ) -> Result<Ended, Error> {
        let mut due: Vec<At> = Vec::new();
        for &(b, i) in work {
            let batch = &mut batches[b];
            let row = &mut batch.rows[i];
            if state_of(row, kind) != Some(StepState::Pending) {
                continue;
            }
            let reset_done = state_of(row, StepKind::ResetPassword) == Some(StepState::Done);
            if blocked(row) || (kind == StepKind::ResetMail && !reset_done) {
                set(batch, i, kind, StepState::Skipped);
                continue;
            }
            let removed = state_of(row, StepKind::Remove) == Some(StepState::Done);
            if removed || !current.contains_key(&row.target) {
                row.notes
                    .push(format!("{}: not sent: the user was removed", kind.name()));
                set(batch, i, kind, StepState::Skipped);
                continue;
            }
            due.push((b, i));
        }
        let flights = Flights {
            kind,
            outbox: self.mailer,
            journal: self.journal,
            stopping: self.stopping,
        };
        let letter = |row: &Row| {
            let user = &current[&row.target];
            let Some(to) = user.get(UserField::Email).filter(|e| !e.is_empty()) else {
                return Err("no email address on file: not sent".to_string());
            };
            let name = user.get(UserField::FirstName).unwrap_or("");
            let (subject, body) = match kind {
                StepKind::ResetMail => mail::reset_instructions(&row.target, name, self.domain),
                _ => mail::welcome(&row.target, name, self.domain),
            };
            Ok(Letter {
                to: to.to_string(),
                subject,
                body,
            })
        };
        let note = |sent: Result<(), &str>| match sent {
            Ok(()) => format!("{} sent", kind.name()),
            Err(why) => format!("{}: {why}", kind.name()),
        };
        send_in_flights(flights, batches, &due, letter, note).await
    }
}

/// Every row's outcome from its steps; a user giving a number changed when the row taking it did.
fn finish(batches: &mut [Batch], work: &[At]) {
    for &(b, i) in work {
        let row = &mut batches[b].rows[i];
        if row.gives.is_empty() {
            row.outcome = steps::outcome(&row.steps);
            batches[b].dirty = true;
        }
    }
    // A number moved when the taker's writes went through, whatever its later steps did.
    let taken: HashSet<(String, String)> = work
        .iter()
        .map(|&(b, i)| &batches[b].rows[i])
        .filter(|r| state_of(r, StepKind::Write) == Some(StepState::Done))
        .flat_map(|r| r.takes.iter().map(|t| (t.number.clone(), t.holder.clone())))
        .collect();
    for &(b, i) in work {
        let row = &mut batches[b].rows[i];
        if row.gives.is_empty() {
            continue;
        }
        if row
            .gives
            .iter()
            .all(|n| taken.contains(&(n.clone(), row.target.clone())))
        {
            row.outcome = Outcome::Changed;
        } else {
            row.outcome = Outcome::Unchanged;
            row.notes
                .push("kept the number: the row taking it did not apply".into());
        }
        batches[b].dirty = true;
    }
}

/// An earlier step failed or conflicted: the later ones are not done.
/// The fields the rows of `work` write, when writing is all they do: a batch of 3-field writes
/// then reads 3 attributes per user, not every one. None (read everything) when a row has an
/// action, a mail or a restore, which need more of the user.
fn written_fields_only(batches: &[Batch], work: &[At]) -> Option<Vec<UserField>> {
    let mut fields = BTreeSet::new();
    for &(b, i) in work {
        let row = &batches[b].rows[i];
        if row.steps.iter().any(|s| s.kind != StepKind::Write) {
            return None;
        }
        for w in &row.writes {
            fields.insert(UserField::from_name(&w.field)?);
        }
    }
    Some(fields.into_iter().collect())
}

fn blocked(row: &Row) -> bool {
    row.steps
        .iter()
        .any(|s| matches!(s.state, StepState::Failed | StepState::Conflict))
}

/// The writes a row plans, with secret values from their Secrets (they are never stored).
fn planned_writes(row: &Row, user: &User, secrets: &HashMap<UserField, Secret>) -> Vec<FieldWrite> {
    let mut writes = Vec::new();
    for w in &row.writes {
        let Some(field) = UserField::from_name(&w.field) else {
            continue;
        };
        let to = if w.secret {
            match secrets.get(&field) {
                Some(s) => NewValue::Secret(s.clone()),
                None => continue,
            }
        } else {
            w.to.clone().map(NewValue::Set).unwrap_or(NewValue::Clear)
        };
        // Secrets are not stored in the plan, so their compare-and-set is against now.
        let from = if w.secret {
            user.get(field).map(str::to_string)
        } else {
            w.from.clone()
        };
        writes.push(FieldWrite { field, from, to });
    }
    writes
}

/// A write's outcome as a step state and a note for people.
fn write_state(outcome: WriteOutcome) -> (StepState, Option<String>) {
    match outcome {
        WriteOutcome::Applied => (StepState::Done, None),
        WriteOutcome::Conflict {
            field,
            expected,
            found,
        } => {
            let show = |v: Option<String>| {
                user_plan::shown(field, v.as_deref()).unwrap_or_else(|| "(unset)".into())
            };
            (
                StepState::Conflict,
                Some(format!(
                    "{field} changed from {} to {} since the plan was made; left alone (review, then retry)",
                    show(expected),
                    show(found)
                )),
            )
        }
        WriteOutcome::NotFound => (
            StepState::Failed,
            Some("no longer exists on the PBX".into()),
        ),
        WriteOutcome::NumberHeld {
            field,
            number,
            holder,
        } => (
            StepState::Conflict,
            Some(format!(
                "{field} {number} is held by {holder}, which the plan did not expect; left alone (review, then retry)"
            )),
        ),
        WriteOutcome::Failed(e) => (StepState::Failed, Some(e)),
        WriteOutcome::RolledBack => (
            StepState::Failed,
            Some("rolled back: another target of this Atomic change failed or conflicted".into()),
        ),
    }
}

/// Rows stored before steps were recorded (an operator upgraded mid-run) get them from their
/// writes and actions; an InProgress row's steps are then taken as begun.
pub fn upgrade_legacy(row: &mut Row) {
    if !row.steps.is_empty() || row.is_final() || !row.gives.is_empty() {
        return;
    }
    row.steps = user_steps(!row.writes.is_empty(), &row.actions);
    if row.outcome == Outcome::InProgress {
        for s in row.steps.iter_mut() {
            s.state = StepState::Intended;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The executor driven through a crash at every record it makes, against an in-memory PBX,
    //! journal and outbox (test doubles for the engine only; integration tests use real servers).

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::engine::fake::{Journal, Outbox, Pbx, user};
    use crate::engine::outbox::MAIL_FLIGHT;
    use crate::plan::stored::StoredWrite;

    fn row(ext: &str, writes: bool, actions: &[&str]) -> Row {
        let actions: Vec<String> = actions.iter().map(|a| a.to_string()).collect();
        Row {
            target: ext.into(),
            outcome: Outcome::Planned,
            writes: if writes {
                vec![StoredWrite {
                    field: "callGroup".into(),
                    from: Some("1".into()),
                    to: Some("9".into()),
                    secret: false,
                }]
            } else {
                vec![]
            },
            steps: user_steps(writes, &actions),
            actions,
            ..Default::default()
        }
    }

    fn journal(rows: Vec<Row>, crash_at: usize) -> Journal {
        Journal {
            batches: Mutex::new(BTreeMap::from([(0, rows)])),
            writes: AtomicUsize::new(0),
            crash_at: AtomicUsize::new(crash_at),
        }
    }

    static NO_SECRETS: std::sync::LazyLock<HashMap<UserField, Secret>> =
        std::sync::LazyLock::new(HashMap::new);

    fn exec<'a>(
        pbx: &'a Pbx,
        outbox: &'a Outbox,
        journal: &'a Journal,
        stopping: &'a (dyn Fn() -> bool + Sync),
    ) -> UserExec<'a> {
        UserExec {
            backend: pbx,
            secrets: &NO_SECRETS,
            mailer: Some(outbox),
            domain: "acme.test",
            atomic: false,
            journal,
            stopping,
            run_key: "run-1",
        }
    }

    /// The journal's batch as a restarted operator reads it.
    fn reload(journal: &Journal) -> Vec<Batch> {
        vec![Batch::new(0, journal.batches.lock().unwrap()[&0].clone())]
    }

    /// Runs `plan` with a crash at record `crash_at`, then restarts until it finishes.
    /// Returns the final rows, the PBX, the mails sent and how many crashes happened.
    async fn run_with_crash(plan: Vec<Row>, crash_at: usize) -> (Vec<Row>, Pbx, Vec<String>, u32) {
        let pbx = Pbx::default();
        for r in &plan {
            pbx.users
                .lock()
                .unwrap()
                .insert(r.target.clone(), user(&r.target));
        }
        let outbox = Outbox::default();
        let journal = journal(plan, crash_at);
        let never = || false;
        let mut crashes = 0;
        loop {
            let exec = exec(&pbx, &outbox, &journal, &never);
            let mut batches = reload(&journal);
            match exec.run(&mut batches).await {
                Ok(Ended::Finished) => break,
                Ok(Ended::Stopped) => unreachable!("nobody asked to stop"),
                Err(_) => {
                    crashes += 1;
                    journal.crash_at.store(usize::MAX, Ordering::SeqCst);
                }
            }
        }
        let rows = journal.batches.lock().unwrap()[&0].clone();
        let sent = outbox.sent.lock().unwrap().clone();
        (rows, pbx, sent, crashes)
    }

    fn plan() -> Vec<Row> {
        let mut rows: Vec<Row> = (0..45)
            .map(|i| row(&format!("{}", 200 + i), true, &["ResetPassword"]))
            .collect();
        rows.extend((0..5).map(|i| row(&format!("{}", 300 + i), false, &["Remove"])));
        rows.push(row("400", true, &["SendWelcomeEmail", "Unlock"]));
        rows
    }

    #[tokio::test]
    async fn a_crash_at_any_record_leaves_every_target_one_outcome_and_no_mail_twice() {
        // An undisturbed run of this plan makes fewer than 40 records: crash at each of them.
        for crash_at in 0..40 {
            let (rows, pbx, sent, crashes) = run_with_crash(plan(), crash_at).await;
            let targets: BTreeSet<&String> = rows.iter().map(|r| &r.target).collect();
            assert_eq!(targets.len(), rows.len(), "each target once");
            let mut mails: BTreeMap<&str, u32> = BTreeMap::new();
            for to in &sent {
                *mails.entry(to.as_str()).or_default() += 1;
            }
            for r in &rows {
                assert!(
                    r.is_final(),
                    "crash at {crash_at}: {} still {:?}",
                    r.target,
                    r.outcome
                );
                assert!(r.steps.iter().all(|s| s.state.is_final()), "{r:?}");
                let to = format!("u{}@acme.test", r.target);
                let n = mails.get(to.as_str()).copied().unwrap_or(0);
                assert!(n <= 1, "crash at {crash_at}: {} mailed {n} times", r.target);
                let mails_wanted = r.steps.iter().any(|s| s.kind.is_mail());
                match r.outcome {
                    Outcome::Changed if mails_wanted => assert_eq!(n, 1, "{r:?}"),
                    Outcome::Changed => {}
                    Outcome::Uncertain => {
                        assert!(crashes > 0);
                        assert!(r.steps.iter().any(|s| s.state == StepState::Uncertain));
                    }
                    other => panic!(
                        "crash at {crash_at}: {} ended {other:?}: {:?}",
                        r.target, r.notes
                    ),
                }
            }
            let users = pbx.users.lock().unwrap();
            assert!(
                (300..305).all(|e| !users.contains_key(&e.to_string())),
                "removed"
            );
            assert!(
                users
                    .values()
                    .all(|u| u.get(UserField::CallGroup) == Some("9")),
                "every write landed"
            );
            let uncertain = rows
                .iter()
                .filter(|r| r.outcome == Outcome::Uncertain)
                .count();
            assert!(
                uncertain <= MAIL_FLIGHT,
                "at most one flight uncertain: {uncertain}"
            );
        }
    }

    #[tokio::test]
    async fn a_retry_sends_exactly_the_uncertain_mails_and_resets_nobody_again() {
        // Crash right after the first flight of mails went out, before its outcome was recorded.
        let mut crash_at = 0;
        let (rows, pbx, sent) = loop {
            let (rows, pbx, sent, _) = run_with_crash(plan(), crash_at).await;
            if rows.iter().any(|r| r.outcome == Outcome::Uncertain) {
                break (rows, pbx, sent);
            }
            crash_at += 1;
            assert!(crash_at < 40, "no crash left a mail uncertain");
        };
        let uncertain: Vec<String> = rows
            .iter()
            .filter(|r| r.outcome == Outcome::Uncertain)
            .map(|r| r.target.clone())
            .collect();
        let resets_before = pbx.resets.lock().unwrap().clone();
        let again: Vec<Row> = rows
            .iter()
            .map(|r| match steps::carry_over(&r.steps) {
                Some(steps) => Row {
                    outcome: Outcome::Planned,
                    steps,
                    ..r.clone()
                },
                None => r.clone(),
            })
            .collect();
        let outbox = Outbox::default();
        let journal = journal(again, usize::MAX);
        let never = || false;
        let exec = exec(&pbx, &outbox, &journal, &never);
        let mut batches = reload(&journal);
        assert_eq!(exec.run(&mut batches).await.unwrap(), Ended::Finished);
        let resent = outbox.sent.lock().unwrap().clone();
        let expected: Vec<String> = uncertain
            .iter()
            .map(|e| format!("u{e}@acme.test"))
            .collect();
        assert_eq!(resent, expected, "exactly the uncertain mails");
        assert!(
            batches[0]
                .rows
                .iter()
                .all(|r| r.outcome == Outcome::Changed)
        );
        assert_eq!(
            *pbx.resets.lock().unwrap(),
            resets_before,
            "no password reset again"
        );
        assert!(!sent.is_empty());
    }

    #[tokio::test]
    async fn a_stop_finishes_the_step_in_flight_and_leaves_nothing_uncertain() {
        let pbx = Pbx::default();
        let plan = plan();
        for r in &plan {
            pbx.users
                .lock()
                .unwrap()
                .insert(r.target.clone(), user(&r.target));
        }
        let outbox = Outbox::default();
        let journal = journal(plan, usize::MAX);
        // Asked to stop once the first flight of mails is out.
        let stop = || !outbox.sent.lock().unwrap().is_empty();
        let exec = exec(&pbx, &outbox, &journal, &stop);
        let mut batches = reload(&journal);
        assert_eq!(exec.run(&mut batches).await.unwrap(), Ended::Stopped);
        let first = outbox.sent.lock().unwrap().len();
        assert_eq!(
            first, MAIL_FLIGHT,
            "the flight in flight finished, no other began"
        );
        let never = || false;
        let exec = UserExec {
            stopping: &never,
            run_key: "run-1",
            ..exec
        };
        let mut batches = reload(&journal);
        assert_eq!(exec.run(&mut batches).await.unwrap(), Ended::Finished);
        let sent = outbox.sent.lock().unwrap().clone();
        let distinct: BTreeSet<&String> = sent.iter().collect();
        assert_eq!(
            (sent.len(), distinct.len()),
            (46, 46),
            "everyone mailed once"
        );
        assert!(
            batches[0]
                .rows
                .iter()
                .all(|r| r.outcome == Outcome::Changed),
            "nothing uncertain after a graceful stop"
        );
    }

    // Operators killed at every point of every step, PBX errors, and a property test over both.
    //
    // A `Lab` is what outlives operators: the PBX, the mail relay, the journal and the position
    // status records. Every side effect is shown to a witness first, which fails the test unless
    // the effect's step is recorded as intended in the journal at that moment.

    use std::sync::Arc;

    use proptest::prelude::*;

    use crate::engine::fake::{self, DyingJournal, Effect, Faulty, Kill, Mailbox};
    use crate::engine::run::{Next, Runner};
    use crate::plan::stored::plan_digest;

    fn target(i: usize) -> String {
        format!("{}", 200 + i)
    }

    fn address(target: &str) -> String {
        format!("u{target}@acme.test")
    }

    fn target_of(address: &str) -> String {
        address
            .trim_start_matches('u')
            .split('@')
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// Rows in `n` batches of nearly equal size, in order.
    fn split(rows: Vec<Row>, n: usize) -> Vec<Vec<Row>> {
        let size = rows.len().div_ceil(n.max(1)).max(1);
        rows.chunks(size).map(<[Row]>::to_vec).collect()
    }

    /// How often each (target, step) side effect happened.
    type Effects = BTreeMap<(String, StepKind), usize>;

    /// Fails the test when a side effect is attempted while its step is not recorded as intended.
    fn on_record(journal: Arc<DyingJournal>) -> fake::Witness {
        Box::new(move |e: &Effect| {
            let (target, kind) = match e {
                Effect::Write(t) => (t.clone(), StepKind::Write),
                Effect::Action(t, k) => (t.clone(), *k),
                Effect::Mail(a, k) => (target_of(a), *k),
            };
            let row = journal.row(&target);
            assert_eq!(
                row.as_ref().and_then(|r| state_of(r, kind)),
                Some(StepState::Intended),
                "{e:?} attempted without its intent on record: {row:?}"
            );
        })
    }

    struct Lab {
        pbx: Faulty,
        mail: Mailbox,
        journal: Arc<DyingJournal>,
        digests: Vec<String>,
        atomic: bool,
        /// Batches finished, as status records it (progress.done).
        position: usize,
    }

    /// The journal and the side effects as a killed operator left them.
    struct Death {
        rows: Vec<Row>,
        effects: Effects,
    }

    impl Lab {
        fn new(plan: Vec<Vec<Row>>, atomic: bool) -> Lab {
            let digests = plan.iter().map(|b| plan_digest(b)).collect();
            let targets: Vec<String> = plan.iter().flatten().map(|r| r.target.clone()).collect();
            let journal = Arc::new(DyingJournal::new(plan));
            let mut pbx = Faulty::with_users(targets.iter().map(String::as_str));
            pbx.witness = Some(on_record(journal.clone()));
            let mail = Mailbox {
                witness: Some(on_record(journal.clone())),
                ..Default::default()
            };
            Lab {
                pbx,
                mail,
                journal,
                digests,
                atomic,
                position: 0,
            }
        }

        /// One operator: runs the batches from the recorded position, one at a time (Continue)
        /// or all together (Atomic), until all are done or it is killed or the PBX fails.
        async fn operator(&mut self) -> Result<(), Error> {
            let never = || false;
            let exec = UserExec {
                backend: &self.pbx,
                secrets: &NO_SECRETS,
                mailer: Some(&self.mail),
                domain: "acme.test",
                atomic: self.atomic,
                journal: &*self.journal,
                stopping: &never,
                run_key: "run-1",
            };
            let mut runner = Runner::new(
                &*self.journal,
                &self.digests,
                self.position,
                self.digests.len(),
                self.atomic,
            )
            .await?;
            loop {
                match runner.next(&exec).await? {
                    Next::Finished { .. } => self.position = runner.position(),
                    Next::Complete => return Ok(()),
                    Next::Stopped => unreachable!("nobody asks to stop"),
                }
            }
        }

        /// Operators one after another until the change is done, each killed one replaced.
        /// Returns how many did not finish.
        async fn until_done(&mut self) -> usize {
            for unfinished in 0..20 {
                if self.operator().await.is_ok() {
                    return unfinished;
                }
                self.journal.restart();
            }
            panic!("20 operators did not finish: {:?}", self.journal.rows());
        }

        /// The retry annotation: each row carried over with the steps to do again, or planned
        /// afresh (as at first: nothing of it happened) when its writes did not go through;
        /// the same batches, run from the first.
        fn retry(&mut self, plan: &[Row]) {
            let again: Vec<Row> = self
                .journal
                .rows()
                .iter()
                .zip(plan)
                .map(|(r, p)| match steps::carry_over(&r.steps) {
                    Some(steps) => Row {
                        outcome: Outcome::Planned,
                        steps,
                        ..r.clone()
                    },
                    None if r.is_failure() => p.clone(),
                    None => r.clone(),
                })
                .collect();
            let mut again = again.into_iter();
            for index in 0..self.digests.len() {
                let n = self.journal.batch(index).len();
                let batch: Vec<Row> = again.by_ref().take(n).collect();
                self.digests[index] = plan_digest(&batch);
                self.journal.put(index, batch);
            }
            self.position = 0;
        }

        fn effects(&self) -> Effects {
            let mut out = Effects::new();
            let pbx = self.pbx.effects.lock().unwrap();
            let mail = self.mail.sent.lock().unwrap();
            for e in pbx.iter().chain(mail.iter()) {
                let key = match e {
                    Effect::Write(t) => (t.clone(), StepKind::Write),
                    Effect::Action(t, k) => (t.clone(), *k),
                    Effect::Mail(a, k) => (target_of(a), *k),
                };
                *out.entry(key).or_default() += 1;
            }
            out
        }

        fn death(&self) -> Death {
            Death {
                rows: self.journal.rows(),
                effects: self.effects(),
            }
        }

        fn exists(&self, t: &str) -> bool {
            self.pbx.pbx.users.lock().unwrap().contains_key(t)
        }

        fn call_group(&self, t: &str) -> Option<String> {
            self.pbx.pbx.users.lock().unwrap()[t]
                .get(UserField::CallGroup)
                .map(str::to_string)
        }

        fn row(&self, t: &str) -> Row {
            self.journal.row(t).unwrap()
        }
    }

    fn count(effects: &Effects, t: &str, kind: StepKind) -> usize {
        effects.get(&(t.to_string(), kind)).copied().unwrap_or(0)
    }

    /// Every planned target has exactly one row, final, with its planned steps all final and the
    /// outcome they make; and what happened matches each step's final state: a write done landed
    /// once and holds the planned value (else nothing was written), a Remove done removed once,
    /// a mail went out once if Done, at most once if Uncertain, never if Skipped or Failed.
    fn check_final(lab: &Lab, plan: &[Row]) {
        let rows = lab.journal.rows();
        if lab.atomic {
            let written: BTreeSet<bool> = rows
                .iter()
                .filter_map(|r| state_of(r, StepKind::Write))
                .map(|s| s == StepState::Done)
                .collect();
            assert!(written.len() <= 1, "atomic: every write or none: {rows:?}");
        }
        let targets = |rows: &[Row]| rows.iter().map(|r| r.target.clone()).collect::<Vec<_>>();
        assert_eq!(
            targets(&rows),
            targets(plan),
            "one row per target, as planned"
        );
        let effects = lab.effects();
        for (r, p) in rows.iter().zip(plan) {
            let kinds = |r: &Row| r.steps.iter().map(|s| s.kind).collect::<Vec<_>>();
            assert_eq!(kinds(r), kinds(p), "the steps as planned");
            assert!(
                r.is_final() && r.steps.iter().all(|s| s.state.is_final()),
                "{r:?}"
            );
            assert_eq!(r.outcome, steps::outcome(&r.steps), "{r:?}");
            let t = r.target.as_str();
            for s in &r.steps {
                let done = s.state == StepState::Done;
                let n = count(&effects, t, s.kind);
                match s.kind {
                    StepKind::Write => {
                        assert_eq!(n, usize::from(done), "{t}: writes committed: {r:?}");
                        if lab.exists(t) {
                            let planned = lab.call_group(t).as_deref() == Some("9");
                            assert_eq!(planned, done, "{r:?}");
                        }
                    }
                    StepKind::Remove => {
                        assert_eq!(n, usize::from(done), "{t}: removals: {r:?}");
                        assert_eq!(lab.exists(t), !done, "{r:?}");
                    }
                    k if k.is_mail() => match s.state {
                        StepState::Done => assert_eq!(n, 1, "{t}: {k:?} sent: {r:?}"),
                        StepState::Uncertain => assert!(n <= 1, "{t}: {k:?} sent {n}: {r:?}"),
                        _ => assert_eq!(n, 0, "{t}: {k:?} sent: {r:?}"),
                    },
                    k => assert_eq!(n >= 1, done, "{t}: {k:?} ran {n} times: {r:?}"),
                }
            }
        }
    }

    /// Without faults every step is done, except a mail left uncertain by a kill or not sent
    /// because its user was removed.
    fn check_clean(lab: &Lab) {
        for r in lab.journal.rows() {
            let removed = state_of(&r, StepKind::Remove) == Some(StepState::Done);
            for s in &r.steps {
                let ok = s.state == StepState::Done
                    || (s.kind.is_mail()
                        && (s.state == StepState::Uncertain
                            || (s.state == StepState::Skipped && removed)));
                assert!(
                    ok,
                    "{}: {:?} ended {:?}: {:?}",
                    r.target, s.kind, s.state, r.notes
                );
            }
        }
    }

    /// What the operators after a kill did with each step as the killed one left it: a recorded
    /// outcome stands and is not redone; a step begun (intended) is finished, a mail as
    /// Uncertain and never sent again, a write or a Remove checked so that it happens once in
    /// all, any other action redone at most once; nothing not begun had happened.
    fn check_resumed(lab: &Lab, death: &Death) {
        let effects = lab.effects();
        for (r, d) in lab.journal.rows().iter().zip(&death.rows) {
            for (s, was) in r.steps.iter().zip(&d.steps) {
                let before = count(&death.effects, &r.target, s.kind);
                let after = count(&effects, &r.target, s.kind);
                let at = format!(
                    "{} {:?}: {:?} at the kill, {:?} at the end, done {before} then {after} times",
                    r.target, s.kind, was.state, s.state
                );
                match was.state {
                    StepState::Pending => assert_eq!(before, 0, "nothing before its intent: {at}"),
                    StepState::Intended if s.kind.is_mail() => assert_eq!(
                        (s.state, after),
                        (StepState::Uncertain, before),
                        "an interrupted mail is uncertain and not sent again: {at}"
                    ),
                    StepState::Intended if matches!(s.kind, StepKind::Write | StepKind::Remove) => {
                        assert_eq!(
                            (s.state, after),
                            (StepState::Done, 1),
                            "checked, then done once in all: {at}"
                        )
                    }
                    StepState::Intended => {
                        assert_eq!(s.state, StepState::Done, "{at}");
                        assert!(
                            after >= 1 && after <= before + 1,
                            "redone at most once: {at}"
                        );
                    }
                    recorded => assert_eq!(
                        (s.state, after),
                        (recorded, before),
                        "a recorded outcome stands: {at}"
                    ),
                }
            }
        }
    }

    /// Where a kill falls for a step.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Point {
        /// Its intent is recorded; its side effect has not happened.
        AfterIntent,
        /// Its side effect happened; its outcome is not recorded.
        AfterSideEffect,
        /// Its outcome is recorded.
        AfterOutcome,
    }

    impl Point {
        fn kill(self) -> Kill {
            match self {
                Point::AfterIntent | Point::AfterOutcome => Kill::After,
                Point::AfterSideEffect => Kill::Before,
            }
        }
    }

    /// The records of an undisturbed run that record `kind`'s intent or outcome for some
    /// targets: the points to kill an operator at, with those targets.
    fn points(
        plan: &[Vec<Row>],
        log: &[(usize, Vec<Row>)],
        kind: StepKind,
    ) -> Vec<(usize, Point, Vec<String>)> {
        let mut last: BTreeMap<usize, Vec<Row>> = plan.iter().cloned().enumerate().collect();
        let mut out = Vec::new();
        for (n, (index, rows)) in log.iter().enumerate() {
            let (mut begun, mut ended) = (vec![], vec![]);
            for (old, new) in last[index].iter().zip(rows) {
                match (state_of(old, kind), state_of(new, kind)) {
                    (Some(StepState::Pending), Some(StepState::Intended)) => {
                        begun.push(new.target.clone())
                    }
                    (Some(StepState::Intended), Some(s)) if s.is_final() => {
                        ended.push(new.target.clone())
                    }
                    _ => {}
                }
            }
            if !begun.is_empty() {
                out.push((n, Point::AfterIntent, begun));
            }
            if !ended.is_empty() {
                out.push((n, Point::AfterSideEffect, ended.clone()));
                out.push((n, Point::AfterOutcome, ended));
            }
            last.insert(*index, rows.clone());
        }
        out
    }

    /// Kills an operator at every point of `kind` (after its intent is recorded, after its side
    /// effect, after its outcome is recorded), in Continue and Atomic runs of 25 targets in two
    /// batches (two mail flights when together), then lets the next operator finish.
    async fn kill_around(kind: StepKind, writes: bool, actions: &[&str]) {
        for atomic in [false, true] {
            let rows: Vec<Row> = (0..25).map(|i| row(&target(i), writes, actions)).collect();
            let plan = split(rows.clone(), 2);
            let mut calm = Lab::new(plan.clone(), atomic);
            assert_eq!(calm.until_done().await, 0);
            check_final(&calm, &rows);
            check_clean(&calm);
            let points = points(&plan, &calm.journal.log(), kind);
            for p in [
                Point::AfterIntent,
                Point::AfterSideEffect,
                Point::AfterOutcome,
            ] {
                assert!(
                    points.iter().any(|(_, q, _)| *q == p),
                    "{kind:?} (atomic: {atomic}) is never at {p:?}"
                );
            }
            for (record, point, targets) in points {
                let at = format!("{kind:?} {point:?}, record {record}, atomic: {atomic}");
                let mut lab = Lab::new(plan.clone(), atomic);
                lab.journal.kill_at(record, point.kill());
                assert!(lab.operator().await.is_err(), "{at}: not killed");
                lab.journal.restart();
                let death = lab.death();
                for t in &targets {
                    let state = death
                        .rows
                        .iter()
                        .find(|r| r.target == *t)
                        .and_then(|r| state_of(r, kind))
                        .unwrap();
                    let done = count(&death.effects, t, kind);
                    let expected = match point {
                        Point::AfterIntent => (true, 0),
                        Point::AfterSideEffect => (true, 1),
                        Point::AfterOutcome => (false, 1),
                    };
                    assert_eq!(
                        (state == StepState::Intended, done),
                        expected,
                        "{at}: {t} was {state:?} and done {done} times at the kill"
                    );
                }
                assert_eq!(
                    lab.until_done().await,
                    0,
                    "{at}: the next operator finishes"
                );
                check_final(&lab, &rows);
                check_clean(&lab);
                check_resumed(&lab, &death);
            }
        }
    }

    #[tokio::test]
    async fn a_write_killed_after_its_intent_side_effect_or_outcome_lands_once_as_planned() {
        kill_around(StepKind::Write, true, &[]).await;
    }

    #[tokio::test]
    async fn an_unlock_killed_after_its_intent_side_effect_or_outcome_is_done_redone_at_most_once()
    {
        kill_around(StepKind::Unlock, true, &["Unlock"]).await;
    }

    #[tokio::test]
    async fn a_two_factor_reset_killed_anywhere_is_done_and_redone_at_most_once() {
        kill_around(StepKind::ResetTwoFactor, true, &["ResetTwoFactor"]).await;
    }

    #[tokio::test]
    async fn a_password_reset_killed_anywhere_is_done_redone_at_most_once_and_mailed_once() {
        kill_around(StepKind::ResetPassword, true, &["ResetPassword"]).await;
    }

    #[tokio::test]
    async fn a_lock_killed_anywhere_is_done_and_redone_at_most_once() {
        kill_around(StepKind::Lock, true, &["Lock"]).await;
    }

    #[tokio::test]
    async fn a_remove_begun_before_a_kill_is_done_not_failed_and_removes_once() {
        kill_around(StepKind::Remove, true, &["Remove"]).await;
    }

    #[tokio::test]
    async fn a_reset_mail_killed_in_flight_is_uncertain_and_never_sent_twice() {
        kill_around(StepKind::ResetMail, false, &["ResetPassword"]).await;
    }

    #[tokio::test]
    async fn a_welcome_mail_killed_in_flight_is_uncertain_and_never_sent_twice() {
        kill_around(StepKind::WelcomeMail, true, &["SendWelcomeEmail"]).await;
    }

    /// Every kind of step, two mail flights, users removed with and without mail, a target with
    /// nothing to do.
    fn mixed() -> Vec<Row> {
        let mut rows = Vec::new();
        for i in 0..22 {
            rows.push(row(&target(i), true, &["ResetPassword"]));
        }
        for i in 22..25 {
            rows.push(row(&target(i), false, &["Remove", "SendWelcomeEmail"]));
        }
        for i in 25..28 {
            let all = [
                "Unlock",
                "ResetTwoFactor",
                "Lock",
                "SendWelcomeEmail",
                "ResetPassword",
            ];
            rows.push(row(&target(i), true, &all));
        }
        for i in 28..30 {
            rows.push(row(&target(i), true, &["Remove"]));
        }
        rows.push(row(&target(30), false, &[]));
        rows
    }

    #[tokio::test]
    async fn a_kill_before_or_after_any_record_resumes_to_one_outcome_per_target() {
        let rows = mixed();
        for atomic in [false, true] {
            let plan = split(rows.clone(), 3);
            let mut calm = Lab::new(plan.clone(), atomic);
            calm.until_done().await;
            for record in 0..calm.journal.records() {
                for kill in [Kill::Before, Kill::After] {
                    let mut lab = Lab::new(plan.clone(), atomic);
                    lab.journal.kill_at(record, kill);
                    assert!(lab.operator().await.is_err());
                    lab.journal.restart();
                    let death = lab.death();
                    assert_eq!(lab.until_done().await, 0);
                    check_final(&lab, &rows);
                    check_clean(&lab);
                    check_resumed(&lab, &death);
                }
            }
        }
    }

    #[tokio::test]
    async fn a_transient_pbx_error_at_any_call_stops_the_run_and_the_next_finishes_it_doubling_nothing()
     {
        let rows = mixed();
        for atomic in [false, true] {
            let plan = split(rows.clone(), 3);
            let mut calm = Lab::new(plan.clone(), atomic);
            calm.until_done().await;
            for call in 0..calm.pbx.calls() {
                // Nothing of the call done, a part, or all of it before the connection broke.
                for after in [0, 1, usize::MAX] {
                    let at = format!("call {call} after {after}, atomic: {atomic}");
                    let mut lab = Lab::new(plan.clone(), atomic);
                    lab.pbx.fail_call(call, after);
                    let e = lab.operator().await.unwrap_err();
                    assert!(matches!(e, Error::Pbx(_)) && e.is_transient(), "{at}: {e}");
                    let death = lab.death();
                    assert!(
                        death.rows.iter().all(|r| !r.is_failure()),
                        "{at}: nothing failed for a PBX that is away"
                    );
                    lab.operator()
                        .await
                        .unwrap_or_else(|e| panic!("{at}: the next run: {e}"));
                    check_final(&lab, &rows);
                    check_clean(&lab);
                    check_resumed(&lab, &death);
                    assert!(
                        lab.journal
                            .rows()
                            .iter()
                            .all(|r| r.outcome != Outcome::Uncertain),
                        "{at}: a PBX error leaves no mail uncertain"
                    );
                }
            }
        }
    }

    /// Five targets with a write, a password reset and a welcome mail, in two batches.
    fn five(atomic: bool) -> (Lab, Vec<Row>) {
        let rows: Vec<Row> = (0..5)
            .map(|i| row(&target(i), true, &["ResetPassword", "SendWelcomeEmail"]))
            .collect();
        (Lab::new(split(rows.clone(), 2), atomic), rows)
    }

    #[tokio::test]
    async fn a_refused_write_fails_exactly_that_target_and_the_run_goes_on() {
        let (mut lab, rows) = five(false);
        lab.pbx.refused.lock().unwrap().insert(target(2));
        lab.operator()
            .await
            .expect("a refusal does not stop the run");
        check_final(&lab, &rows);
        let effects = lab.effects();
        for r in lab.journal.rows() {
            if r.target == target(2) {
                assert_eq!(r.outcome, Outcome::Failed);
                assert_eq!(state_of(&r, StepKind::Write), Some(StepState::Failed));
                assert!(r.notes.iter().any(|n| n.contains("refused")), "{r:?}");
                assert!(
                    r.steps[1..].iter().all(|s| s.state == StepState::Skipped),
                    "{r:?}"
                );
                assert_eq!(effects.keys().filter(|(t, _)| *t == r.target).count(), 0);
            } else {
                assert_eq!(r.outcome, Outcome::Changed, "{r:?}");
                assert_eq!(count(&effects, &r.target, StepKind::WelcomeMail), 1);
            }
        }
    }

    #[tokio::test]
    async fn an_atomic_change_with_a_refused_write_writes_nothing_and_runs_nothing_after() {
        let (mut lab, rows) = five(true);
        lab.pbx.refused.lock().unwrap().insert(target(2));
        lab.operator()
            .await
            .expect("a refusal does not stop the run");
        check_final(&lab, &rows);
        assert!(lab.effects().is_empty(), "{:?}", lab.effects());
        for r in lab.journal.rows() {
            assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
            let why = if r.target == target(2) {
                "refused"
            } else {
                "rolled back"
            };
            assert!(r.notes.iter().any(|n| n.contains(why)), "{r:?}");
            assert_eq!(lab.call_group(&r.target).as_deref(), Some("1"));
        }
    }

    #[tokio::test]
    async fn a_conflict_fails_only_its_target_when_continuing_and_every_target_when_atomic() {
        for atomic in [false, true] {
            let (mut lab, rows) = five(atomic);
            lab.pbx
                .pbx
                .users
                .lock()
                .unwrap()
                .get_mut(&target(2))
                .unwrap()
                .values
                .insert(UserField::CallGroup, "5".into());
            lab.operator()
                .await
                .expect("a conflict does not stop the run");
            for r in lab.journal.rows() {
                let t = r.target.as_str();
                if t == target(2) {
                    assert_eq!(r.outcome, Outcome::Conflict, "{r:?}");
                    assert_eq!(lab.call_group(t).as_deref(), Some("5"), "left alone");
                } else if atomic {
                    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
                    assert!(r.notes.iter().any(|n| n.contains("rolled back")));
                    assert_eq!(lab.call_group(t).as_deref(), Some("1"), "rolled back");
                } else {
                    assert_eq!(r.outcome, Outcome::Changed, "{r:?}");
                    assert_eq!(lab.call_group(t).as_deref(), Some("9"));
                }
            }
            let mailed = lab.mail.sent.lock().unwrap().len();
            assert_eq!(mailed, if atomic { 0 } else { 8 }, "atomic: {atomic}");
            let _ = rows;
        }
    }

    #[tokio::test]
    async fn an_atomic_change_that_failed_writes_nothing_wherever_an_operator_is_killed() {
        for refused in [false, true] {
            let (mut calm, _) = five(true);
            calm.until_done().await;
            for record in 0..calm.journal.records() {
                for kill in [Kill::Before, Kill::After] {
                    let (mut lab, rows) = five(true);
                    if refused {
                        lab.pbx.refused.lock().unwrap().insert(target(2));
                    } else {
                        lab.pbx
                            .pbx
                            .users
                            .lock()
                            .unwrap()
                            .get_mut(&target(2))
                            .unwrap()
                            .values
                            .insert(UserField::CallGroup, "5".into());
                    }
                    lab.journal.kill_at(record, kill);
                    lab.until_done().await;
                    check_final(&lab, &rows);
                    let at = format!("refused: {refused}, {kill:?} record {record}");
                    assert!(lab.effects().is_empty(), "{at}: {:?}", lab.effects());
                    for r in lab.journal.rows() {
                        assert!(
                            matches!(r.outcome, Outcome::Failed | Outcome::Conflict),
                            "{at}: {r:?}"
                        );
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn a_vanished_target_fails_alone_when_continuing_and_rolls_back_all_when_atomic() {
        for atomic in [false, true] {
            let (mut lab, rows) = five(atomic);
            lab.pbx.pbx.users.lock().unwrap().remove(&target(2));
            lab.operator()
                .await
                .expect("a vanished target does not stop the run");
            check_final(&lab, &rows);
            for r in lab.journal.rows() {
                let t = r.target.as_str();
                if t == target(2) {
                    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
                    assert!(r.notes.iter().any(|n| n.contains("no longer exists")));
                } else if atomic {
                    assert_eq!(r.outcome, Outcome::Failed, "atomic: all or nothing: {r:?}");
                    assert_eq!(lab.call_group(t).as_deref(), Some("1"), "nothing written");
                } else {
                    assert_eq!(r.outcome, Outcome::Changed, "{r:?}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_failed_action_fails_exactly_that_target_sends_it_no_mail_and_a_retry_finishes_it_once()
     {
        for atomic in [false, true] {
            let (mut lab, rows) = five(atomic);
            lab.pbx
                .failing
                .lock()
                .unwrap()
                .insert((target(2), StepKind::ResetPassword));
            lab.operator()
                .await
                .expect("a failed action does not stop the run");
            check_final(&lab, &rows);
            let r = lab.row(&target(2));
            assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
            assert_eq!(state_of(&r, StepKind::Write), Some(StepState::Done));
            assert_eq!(state_of(&r, StepKind::ResetMail), Some(StepState::Skipped));
            assert_eq!(
                state_of(&r, StepKind::WelcomeMail),
                Some(StepState::Skipped)
            );
            let others = lab.journal.rows();
            assert!(
                others
                    .iter()
                    .filter(|r| r.target != target(2))
                    .all(|r| r.outcome == Outcome::Changed)
            );
            let first = lab.effects();
            assert_eq!(lab.mail.sent.lock().unwrap().len(), 8);

            lab.pbx.heal();
            lab.retry(&rows);
            assert_eq!(lab.until_done().await, 0);
            let now = lab.effects();
            let mut added: Vec<(String, StepKind)> = now
                .iter()
                .filter(|(k, n)| first.get(k).copied().unwrap_or(0) != **n)
                .map(|(k, _)| k.clone())
                .collect();
            added.sort();
            assert_eq!(
                added,
                [
                    (target(2), StepKind::ResetPassword),
                    (target(2), StepKind::ResetMail),
                    (target(2), StepKind::WelcomeMail),
                ],
                "atomic: {atomic}: the retry does exactly the failed and unreached steps"
            );
            assert!(now.values().all(|n| *n == 1), "once each in all: {now:?}");
            assert!(
                lab.journal
                    .rows()
                    .iter()
                    .all(|r| r.outcome == Outcome::Changed)
            );
        }
    }

    #[tokio::test]
    async fn a_mail_the_relay_refuses_fails_that_target_and_a_retry_sends_only_it() {
        let (mut lab, rows) = five(false);
        lab.mail.refused.lock().unwrap().insert(address(&target(3)));
        lab.operator().await.unwrap();
        check_final(&lab, &rows);
        let r = lab.row(&target(3));
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(state_of(&r, StepKind::ResetMail), Some(StepState::Failed));
        assert_eq!(
            state_of(&r, StepKind::WelcomeMail),
            Some(StepState::Skipped),
            "not tried after a failed step"
        );
        assert!(
            r.notes.iter().any(|n| n.contains("mailbox unavailable")),
            "{r:?}"
        );
        let first = lab.effects();
        lab.mail.refused.lock().unwrap().clear();
        lab.retry(&rows);
        assert_eq!(lab.until_done().await, 0);
        let now = lab.effects();
        let added: Vec<&(String, StepKind)> = now
            .iter()
            .filter(|(k, n)| first.get(k).copied().unwrap_or(0) != **n)
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            added,
            [
                &(target(3), StepKind::ResetMail),
                &(target(3), StepKind::WelcomeMail)
            ]
        );
        assert!(now.values().all(|n| *n == 1), "{now:?}");
    }

    /// What happens to one operator.
    #[derive(Clone, Debug)]
    enum Disruption {
        /// It dies at its n-th record, before or after storing it.
        Kill(usize, Kill),
        /// Its n-th PBX call fails transiently after doing this many of its targets.
        Transient(usize, usize),
    }

    const ACTIONS: [&str; 6] = [
        "Unlock",
        "ResetTwoFactor",
        "ResetPassword",
        "Lock",
        "Remove",
        "SendWelcomeEmail",
    ];

    fn disruption() -> impl Strategy<Value = Disruption> {
        prop_oneof![
            (0..60usize, any::<bool>()).prop_map(|(n, before)| Disruption::Kill(
                n,
                if before { Kill::Before } else { Kill::After }
            )),
            (0..12usize, 0..4usize).prop_map(|(n, k)| Disruption::Transient(n, k)),
        ]
    }

    /// A target's plan: writes or not, and any actions.
    fn target_plan() -> impl Strategy<Value = (bool, Vec<&'static str>)> {
        (
            any::<bool>(),
            proptest::sample::subsequence(ACTIONS.to_vec(), 0..=ACTIONS.len()),
        )
    }

    use proptest::sample::Index;

    /// The property below, for one case.
    async fn kills_and_errors_then_a_retry(
        plans: Vec<(bool, Vec<&str>)>,
        batches: usize,
        atomic: bool,
        disruptions: Vec<Disruption>,
        refused: Vec<Index>,
        failing: Vec<(Index, Index)>,
    ) {
        let rows: Vec<Row> = plans
            .iter()
            .enumerate()
            .map(|(i, (writes, actions))| row(&target(i), *writes, actions))
            .collect();
        let mut lab = Lab::new(split(rows.clone(), batches), atomic);
        for i in &refused {
            let r = i.get(&rows);
            if state_of(r, StepKind::Write).is_some() {
                lab.pbx.refused.lock().unwrap().insert(r.target.clone());
            }
        }
        for (i, a) in &failing {
            let r = i.get(&rows);
            let actions: Vec<StepKind> = r
                .steps
                .iter()
                .map(|s| s.kind)
                .filter(|k| *k != StepKind::Write && !k.is_mail())
                .collect();
            if !actions.is_empty() {
                let kind = *a.get(&actions);
                lab.pbx
                    .failing
                    .lock()
                    .unwrap()
                    .insert((r.target.clone(), kind));
            }
        }
        let faults = !lab.pbx.refused.lock().unwrap().is_empty()
            || !lab.pbx.failing.lock().unwrap().is_empty();
        for d in &disruptions {
            match *d {
                Disruption::Kill(n, kill) => lab.journal.kill_at(lab.journal.records() + n, kill),
                Disruption::Transient(n, k) => lab.pbx.fail_call(lab.pbx.calls() + n, k),
            }
            let _ = lab.operator().await;
            lab.journal.restart();
            lab.pbx.forget_transient();
        }
        lab.until_done().await;
        // Within the run (whatever the kills), no mail twice: an interrupted one is Uncertain.
        check_final(&lab, &rows);
        if !faults {
            check_clean(&lab);
        }

        let first = lab.journal.rows();
        let before = lab.effects();
        lab.pbx.heal();
        lab.retry(&rows);
        assert_eq!(lab.until_done().await, 0, "an undisturbed retry finishes");
        let now = lab.effects();
        for (r, f) in lab.journal.rows().iter().zip(&first) {
            assert!(
                matches!(r.outcome, Outcome::Changed | Outcome::Unchanged),
                "the retry finishes every target: {r:?}, first {f:?}"
            );
            let t = r.target.as_str();
            let removes = state_of(r, StepKind::Remove).is_some();
            for (s, was) in r.steps.iter().zip(&f.steps) {
                let (b, n) = (count(&before, t, s.kind), count(&now, t, s.kind));
                let at = format!(
                    "{t} {:?}: {:?} then {:?}, done {b} then {n}",
                    s.kind, was.state, s.state
                );
                if s.kind.is_mail() {
                    let expected = match was.state {
                        StepState::Done => 0,
                        StepState::Uncertain | StepState::Failed => 1,
                        StepState::Skipped => usize::from(!removes),
                        other => panic!("{at}: {other:?} after the run"),
                    };
                    assert_eq!(
                        n - b,
                        expected,
                        "the retry sends exactly the uncertain, failed and unreached mails: {at}"
                    );
                    assert!(
                        n <= 1 || (n == 2 && was.state == StepState::Uncertain),
                        "no mail twice unless reported uncertain: {at}"
                    );
                } else if was.state == StepState::Done {
                    assert_eq!(n, b, "a step done is not done again by the retry: {at}");
                }
                match s.kind {
                    StepKind::Write => {
                        assert_eq!(n, 1, "written once in all: {at}");
                        if lab.exists(t) {
                            assert_eq!(lab.call_group(t).as_deref(), Some("9"), "{at}");
                        }
                    }
                    StepKind::Remove => {
                        assert_eq!(n, 1, "removed once in all: {at}");
                        assert!(!lab.exists(t), "{at}");
                    }
                    _ => {}
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// For any plan (writes and actions per target, batches, Continue or Atomic), any
        /// sequence of operators killed before or after any record or stopped by a transient
        /// PBX error, and some targets refused or failing for good: every target ends with
        /// exactly one outcome, no mail is sent twice, and a retry sends exactly the uncertain,
        /// failed and unreached mails, a mail twice in all only if it was reported uncertain.
        #[test]
        fn any_kills_and_pbx_errors_end_in_one_outcome_per_target_and_a_retry_sends_exactly_the_rest(
            plans in proptest::collection::vec(target_plan(), 1..45),
            batches in 1..4usize,
            atomic in any::<bool>(),
            disruptions in proptest::collection::vec(disruption(), 0..6),
            refused in proptest::collection::vec(any::<Index>(), 0..2),
            failing in proptest::collection::vec((any::<Index>(), any::<Index>()), 0..3),
        ) {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(kills_and_errors_then_a_retry(
                    plans, batches, atomic, disruptions, refused, failing,
                ));
        }
    }
}
