//! Executes stored user-change rows: field writes (compare-and-set), then one-shot actions, then
//! mail, each step recorded as intended before it runs and with its outcome after.
//!
//! A batch first moves its rows from Planned to InProgress; a row found InProgress was begun by
//! an earlier attempt and is resumed step by step (see [`steps::resume`]): its writes are
//! checked against the PBX, its actions redone (each is idempotent), and a mail that was under
//! way is reported Uncertain instead of being sent twice.

#[cfg(test)]
use std::collections::BTreeSet;
use std::collections::{BTreeMap, HashMap, HashSet};

use super::steps;
use super::{Batch, Ended, Error, Executor, Journal};
use crate::api::Outcome;
use crate::mail::{self, Mailer};
use crate::pbx::directory::Move;
use crate::pbx::{
    ActionOutcome, FieldWrite, NewValue, PbxBackend, Secret, User, UserAction, UserChange,
    UserField, UserSelection, WriteOutcome,
};
use crate::plan::stored::Row;
use crate::plan::stored::{StepKind, StepState, user_steps};
use crate::plan::users as user_plan;

/// Mails sent between two records: a crash leaves at most this many uncertain.
pub const MAIL_FLIGHT: usize = 20;

/// Where mail goes: the connection's SMTP relay ([`Mailer`]).
#[async_trait::async_trait]
pub trait Outbox: Send + Sync {
    async fn send(&self, to: &str, subject: &str, body: String) -> Result<(), String>;
}

#[async_trait::async_trait]
impl Outbox for Mailer {
    async fn send(&self, to: &str, subject: &str, body: String) -> Result<(), String> {
        Mailer::send(self, to, subject, body)
            .await
            .map_err(|e| e.to_string())
    }
}

/// A row of a batch: (batch position, row position).
type At = (usize, usize);

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
}

#[async_trait::async_trait]
impl Executor for UserExec<'_> {
    /// Runs the unfinished rows of `batches` to their outcomes, or until a stop is asked for.
    async fn run(&self, batches: &mut [Batch]) -> Result<Ended, Error> {
        let mut redo: HashMap<At, Vec<StepKind>> = HashMap::new();
        for batch in batches.iter_mut() {
            for row in batch.rows.iter_mut() {
                // Stored by an operator from before steps were recorded.
                upgrade_legacy(row);
                if row.outcome == Outcome::Planned {
                    row.outcome = Outcome::InProgress;
                    batch.dirty = true;
                }
            }
        }
        for (b, batch) in batches.iter_mut().enumerate() {
            for (i, row) in batch.rows.iter_mut().enumerate() {
                if row.outcome != Outcome::InProgress {
                    continue;
                }
                let again = steps::resume(&mut row.steps);
                if !again.is_empty() {
                    redo.insert((b, i), again);
                }
                // The writes' intent is recorded with the batch's, before anything is written.
                for s in row.steps.iter_mut() {
                    if s.kind == StepKind::Write && s.state == StepState::Pending {
                        s.state = StepState::Intended;
                        batch.dirty = true;
                    }
                }
            }
        }
        self.save(batches).await?;
        let work: Vec<At> = at_all(batches, |r| r.outcome == Outcome::InProgress);
        if work.is_empty() {
            return Ok(Ended::Finished);
        }
        let extensions = work
            .iter()
            .map(|&(b, i)| batches[b].rows[i].target.clone())
            .filter(|t| !t.is_empty())
            .collect();
        let current: BTreeMap<String, User> = self
            .backend
            .read_users(&UserSelection {
                groups: vec![],
                extensions,
            })
            .await?
            .users
            .into_iter()
            .map(|u| (u.extension.clone(), u))
            .collect();
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
        for &at in work {
            let row = &batches[at.0].rows[at.1];
            if state_of(row, StepKind::Write) != Some(StepState::Intended) {
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
            changes.push(UserChange {
                extension: row.target.clone(),
                writes,
                takes: row
                    .takes
                    .iter()
                    .map(|t| Move {
                        number: t.number.clone(),
                        holder: t.holder.clone(),
                        held_as: UserField::from_name(&t.held_as)
                            .unwrap_or(UserField::PrimaryNumber),
                    })
                    .collect(),
            });
        }
        for (b, i) in already {
            set(&mut batches[b], i, StepKind::Write, StepState::Done);
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
        self.save(batches).await
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
            due.push((b, i));
        }
        if due.is_empty() {
            return Ok(());
        }
        // Recorded as intended before any of them runs.
        self.save(batches).await?;
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
        for flight in due.chunks(MAIL_FLIGHT) {
            if (self.stopping)() {
                self.save(batches).await?;
                return Ok(Ended::Stopped);
            }
            for &(b, i) in flight {
                set(&mut batches[b], i, kind, StepState::Intended);
            }
            self.save(batches).await?;
            let sends = flight.iter().map(|&(b, i)| {
                let extension = &batches[b].rows[i].target;
                let user = &current[extension];
                let name = user.get(UserField::FirstName).unwrap_or("");
                let (subject, body) = match kind {
                    StepKind::ResetMail => mail::reset_instructions(extension, name, self.domain),
                    _ => mail::welcome(extension, name, self.domain),
                };
                self.send(user, subject, body)
            });
            let sent = futures::future::join_all(sends).await;
            for (&(b, i), result) in flight.iter().zip(sent) {
                let batch = &mut batches[b];
                match result {
                    Ok(()) => {
                        set(batch, i, kind, StepState::Done);
                        batch.rows[i].notes.push(format!("{} sent", kind.name()));
                    }
                    Err(why) => {
                        set(batch, i, kind, StepState::Failed);
                        batch.rows[i].notes.push(format!("{}: {why}", kind.name()));
                    }
                }
            }
            self.save(batches).await?;
        }
        Ok(Ended::Finished)
    }

    async fn send(&self, user: &User, subject: String, body: String) -> Result<(), String> {
        let Some(to) = user.get(UserField::Email).filter(|e| !e.is_empty()) else {
            return Err("no email address on file: not sent".into());
        };
        let Some(mailer) = self.mailer else {
            return Err("the PbxConnection has no usable spec.smtp: not sent".into());
        };
        mailer.send(to, &subject, body).await
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
    let taken: HashSet<(String, String)> = work
        .iter()
        .map(|&(b, i)| &batches[b].rows[i])
        .filter(|r| r.outcome == Outcome::Changed)
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

fn at_all(batches: &[Batch], keep: impl Fn(&Row) -> bool) -> Vec<At> {
    batches
        .iter()
        .enumerate()
        .flat_map(|(b, batch)| {
            batch
                .rows
                .iter()
                .enumerate()
                .filter(|(_, r)| keep(r))
                .map(move |(i, _)| (b, i))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn state_of(row: &Row, kind: StepKind) -> Option<StepState> {
    row.steps.iter().find(|s| s.kind == kind).map(|s| s.state)
}

fn set(batch: &mut Batch, i: usize, kind: StepKind, state: StepState) {
    if let Some(s) = batch.rows[i].steps.iter_mut().find(|s| s.kind == kind) {
        s.state = state;
        batch.dirty = true;
    }
}

/// An earlier step failed or conflicted: the later ones are not done.
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
}
