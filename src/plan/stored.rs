//! The plan as stored: one row per target with what is planned for it and its typed steps, whose
//! states the run's journal records; the plan's digest; and the chunking into batches (stored
//! gzipped in ConfigMaps far below the 1 MiB object limit). Pure data: the engine executes it.

use serde::{Deserialize, Serialize};

use sha2::{Digest as _, Sha256};

use crate::api::{FieldChange, Outcome};

/// A batch's text at most, uncompressed (both files together). Stored gzipped: rows are JSON
/// with the same keys on every line and compress about tenfold, so even at a third of that
/// the ConfigMap stays under the API's 1 MiB.
pub const CHUNK_BYTES: usize = 3 * 1024 * 1024;
/// Rows per ConfigMap at most; also the batch size of an execution. 4,000: a 100,000-target
/// run is 25 ConfigMaps, and each batch is one read and one compare-and-set write of the PBX.
pub const CHUNK_ROWS: usize = 4000;

/// One planned field write, as stored between planning and execution. Secret values are never
/// stored: `to` is None and `secret` is true, and the value is read from its Secret again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StoredWrite {
    pub field: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
}

/// A target and what is planned for it or happened to it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Row {
    pub target: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writes: Vec<StoredWrite>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<String>,
    /// Fields as shown to people: secrets as "(set)" / "(new secret)".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<FieldChange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Phone operations: the registration the row is about, as planned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<PhoneTarget>,
    /// CSV-sourced changes: the input row this row is about, echoed in the result CSV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceRow>,
    /// Numbers this row takes from other users, as planned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub takes: Vec<StoredTake>,
    /// A user without a row of its own that gives these numbers to the row before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gives: Vec<String>,
    /// The side effects planned for this target and where each stands: the run's journal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
    /// The run a snapshot of this target was kept under before a step took the user away
    /// (Remove, a recycle's reset): recorded with that step's intent. Progress, not plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_run: Option<String>,
    /// A revert that brings the user back from a snapshot: which one, as reviewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<StoredRestore>,
}

/// The snapshot a revert restores a user from (kept in the PBX, never copied here) and what the
/// user must look like for the restore to go ahead.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StoredRestore {
    /// The run that kept the snapshot (its ledger id).
    pub run: String,
    /// When the snapshot was taken, Unix milliseconds.
    pub taken: i64,
    /// sha256 of the snapshot as planned: a snapshot changed since is not restored.
    pub digest: String,
    /// None: the extension must not exist (a Remove is reverted). Otherwise the values the
    /// reverted change left, which the user must still have (a recycle is reverted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Vec<ExpectedValue>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ExpectedValue {
    pub field: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceRow {
    pub line: u64,
    pub cells: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StoredTake {
    pub number: String,
    pub holder: String,
    pub held_as: String,
}

/// A phone as a restart plans it: who owns it, how it is reached, and how its registration
/// looked before the NOTIFY (to recognise the fresh REGISTER after it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PhoneTarget {
    /// The provisioning record (pbx_phone.id), for phones the PBX knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    pub extension: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user_agent: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub call_id: String,
    #[serde(default)]
    pub last_modified: i64,
    /// Unix seconds when the NOTIFY was (about to be) sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<i64>,
    /// Where the NOTIFY went, read from the registrar when the phone's turn came (a phone that
    /// re-registered since planning is reached at its new contact), and the registration it
    /// replaced: the baseline its fresh REGISTER is recognised against. Progress, not plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_to: Option<SentTo>,
    /// Unix milliseconds when the operator saw the phone's fresh REGISTER. Progress, not plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<i64>,
}

/// The registration a NOTIFY was sent to (see [`PhoneTarget::sent_to`]).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SentTo {
    pub contact: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub call_id: String,
    #[serde(default)]
    pub last_modified: i64,
}

impl Row {
    pub fn is_final(&self) -> bool {
        !matches!(self.outcome, Outcome::Planned | Outcome::InProgress)
    }

    pub fn is_failure(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Failed | Outcome::Conflict | Outcome::Uncertain
        )
    }
}

/// sha256 of what a batch of rows plans to do: each target with its writes, actions, number
/// moves, step kinds and, for phones, where the NOTIFY goes and which phone a write changes;
/// not how far they got. Recorded in status when the batch is stored and checked before it
/// runs, so an edited results ConfigMap cannot add a target or an action, or redirect one.
pub fn plan_digest(rows: &[Row]) -> String {
    let mut h = Sha256::new();
    for r in rows {
        let kinds: Vec<_> = r.steps.iter().map(|s| s.kind).collect();
        // When and where the NOTIFY left is progress, not plan.
        let phone = r.phone.as_ref().map(|p| PhoneTarget {
            sent_at: None,
            sent_to: None,
            confirmed_at: None,
            ..p.clone()
        });
        let mut plan = serde_json::json!([
            r.target, r.writes, r.actions, kinds, r.takes, r.gives, phone
        ]);
        // Only where there is one, so the digests of plans stored before restores stay valid.
        if let (Some(restore), Some(plan)) = (&r.restore, plan.as_array_mut()) {
            plan.push(serde_json::json!(restore));
        }
        h.update(plan.to_string().as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// Splits rows into chunks of at most [`CHUNK_ROWS`] rows and about [`CHUNK_BYTES`].
pub fn chunk(rows: Vec<Row>) -> Vec<Vec<Row>> {
    let mut chunks = Vec::new();
    let mut chunker = Chunker::new(CHUNK_ROWS);
    for row in rows {
        chunks.extend(chunker.push(row));
    }
    let last = chunker.finish();
    if !last.is_empty() || chunks.is_empty() {
        chunks.push(last);
    }
    chunks
}

/// Cuts a stream of rows into chunks as they come, so no caller needs every row at once.
#[derive(Default)]
pub struct Chunker {
    current: Vec<Row>,
    bytes: usize,
    max_rows: usize,
}

impl Chunker {
    /// Chunks of at most `max_rows` rows (at most [`CHUNK_ROWS`]) and about [`CHUNK_BYTES`].
    pub fn new(max_rows: usize) -> Chunker {
        Chunker {
            current: Vec::new(),
            bytes: 0,
            max_rows: max_rows.clamp(1, CHUNK_ROWS),
        }
    }

    /// Adds a row; returns the previous chunk when this row starts a new one.
    pub fn push(&mut self, row: Row) -> Option<Vec<Row>> {
        // JSON line plus CSV line, roughly twice the JSON.
        let size = 2 * serde_json::to_string(&row).map(|s| s.len()).unwrap_or(1024) + 2;
        // A giving row stays in the batch of the row that takes its number.
        let full = self.current.len() >= self.max_rows || self.bytes + size > CHUNK_BYTES;
        let done = (!self.current.is_empty() && full && row.gives.is_empty()).then(|| {
            self.bytes = 0;
            std::mem::take(&mut self.current)
        });
        self.bytes += size;
        self.current.push(row);
        done
    }

    /// The last chunk (empty if no row came after the last full one).
    pub fn finish(self) -> Vec<Row> {
        self.current
    }
}

pub fn to_jsonl(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows {
        out.push_str(&serde_json::to_string(r).expect("rows serialize"));
        out.push('\n');
    }
    out
}

pub fn from_jsonl(text: &str) -> Result<Vec<Row>, serde_json::Error> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect()
}

/// One side effect on one target. Steps run in the order of this enum.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StepKind {
    /// The field writes, compare-and-set against the planned values.
    Write,
    Unlock,
    ResetTwoFactor,
    /// Rotate the SIP secret to one nobody knows and mark the user PasswordRequired.
    ResetPassword,
    Lock,
    Remove,
    /// Mail the reset instructions (after ResetPassword).
    ResetMail,
    WelcomeMail,
    // UserRecycle: Reset, DropRegistrations, Recycle, then WelcomeMail (the executor's order,
    // not this enum's: these came after the user-change steps).
    /// Clear what `spec.reset` names and leave the user SetupRequired, in one transaction.
    /// Redone after a restart unless the PBX shows the user already recycled (a reset after the
    /// recycle would wipe the new person's data).
    Reset,
    /// Drop the user's registrations, so the old phones stop working now. Idempotent.
    DropRegistrations,
    /// Give the reset extension to the new person (identity, a secret nobody knows,
    /// PasswordRequired), in a second transaction. Redone after a restart: the same identity.
    Recycle,
    // Phones
    /// A NOTIFY that makes a phone resync or reboot (PhoneRestart). It cannot be observed
    /// directly and a second one reboots the phone again, in front of its user: a NOTIFY found
    /// under way after a restart is never sent again; a fresh REGISTER confirms it, or it is
    /// reported uncertain and only a retry sends it once more.
    Notify,
    /// Watching for the phone's fresh REGISTER after its NOTIFY (no side effect): Done when one
    /// came (Restarted), Skipped when the wait ended without one or there was nothing to watch.
    Confirm,
    /// BulkPhoneChange's field writes, compare-and-set against the planned values.
    PhoneWrite,
    /// A revert brings a removed or recycled user back from its snapshot, before anything
    /// else of the row; compare-and-set against the user's state as the reverted change left
    /// it, and recorded in the PBX with the restore, so a restart neither restores twice nor
    /// mistakes its own restore for someone else's user.
    Restore,
}

/// What a restart does with a step recorded as intended but without an outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnResume {
    /// Doing it again leaves the same state (a compare-and-set write, an unlock, a new random
    /// secret nobody is told): do it again, checking first where the state shows it is done.
    Redo,
    /// Its effect cannot be observed and doing it twice is visible to a person (a mail):
    /// report it as uncertain; only a retry does it again.
    Uncertain,
}

impl StepKind {
    pub fn on_resume(self) -> OnResume {
        match self {
            StepKind::ResetMail | StepKind::WelcomeMail | StepKind::Notify => OnResume::Uncertain,
            _ => OnResume::Redo,
        }
    }

    pub fn is_mail(self) -> bool {
        matches!(self, StepKind::ResetMail | StepKind::WelcomeMail)
    }

    /// The name an action has in the spec, for the actions of a BulkUserChange.
    pub fn from_action(name: &str) -> Option<StepKind> {
        Some(match name {
            "Unlock" => StepKind::Unlock,
            "ResetTwoFactor" => StepKind::ResetTwoFactor,
            "ResetPassword" => StepKind::ResetPassword,
            "Lock" => StepKind::Lock,
            "Remove" => StepKind::Remove,
            "SendWelcomeEmail" => StepKind::WelcomeMail,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            StepKind::Write => "write fields",
            StepKind::Unlock => "Unlock",
            StepKind::ResetTwoFactor => "ResetTwoFactor",
            StepKind::ResetPassword => "ResetPassword",
            StepKind::Lock => "Lock",
            StepKind::Remove => "Remove",
            StepKind::ResetMail => "reset instructions mail",
            StepKind::WelcomeMail => "welcome email",
            StepKind::Reset => "reset",
            StepKind::DropRegistrations => "drop registrations",
            StepKind::Recycle => "recycle",
            StepKind::Notify => "NOTIFY",
            StepKind::Confirm => "confirm by REGISTER",
            StepKind::PhoneWrite => "write fields",
            StepKind::Restore => "restore from snapshot",
        }
    }
}

/// Where a step stands, as recorded in the run's journal.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StepState {
    #[default]
    Pending,
    /// Recorded before the side effect; an outcome follows once it is known.
    Intended,
    Done,
    /// Nothing to do: the target already was as wanted.
    NoOp,
    /// Refused on purpose (e.g. Remove of a user who owns numbers), or not reached because an
    /// earlier step made it moot.
    Skipped,
    Failed,
    /// The write found a value moved since planning and left the target alone.
    Conflict,
    /// Begun before a crash and not observable: it may or may not have happened.
    Uncertain,
}

impl StepState {
    pub fn is_final(self) -> bool {
        !matches!(self, StepState::Pending | StepState::Intended)
    }

    /// Whether a retry does this step again.
    pub fn needs_retry(self) -> bool {
        matches!(self, StepState::Failed | StepState::Uncertain)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub kind: StepKind,
    #[serde(default)]
    pub state: StepState,
}

impl Step {
    pub fn pending(kind: StepKind) -> Step {
        Step {
            kind,
            state: StepState::Pending,
        }
    }
}

/// The steps a user change runs for a target: its writes, then its actions in their fixed
/// order; a password reset is followed by the mail that tells the user.
pub fn user_steps(has_writes: bool, actions: &[String]) -> Vec<Step> {
    let mut kinds: Vec<StepKind> = actions
        .iter()
        .filter_map(|a| StepKind::from_action(a))
        .collect();
    if kinds.contains(&StepKind::ResetPassword) {
        kinds.push(StepKind::ResetMail);
    }
    if has_writes {
        kinds.push(StepKind::Write);
    }
    kinds.sort();
    kinds.dedup();
    kinds.into_iter().map(Step::pending).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirected_notify_changes_the_digest_and_its_send_time_does_not() {
        let row = Row {
            target: "201/0004f2000001".into(),
            phone: Some(PhoneTarget {
                id: Some(7),
                extension: "201".into(),
                contact: Some("sip:201@10.0.0.5:5060".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let digest = plan_digest(std::slice::from_ref(&row));
        let mut sent = row.clone();
        sent.phone.as_mut().unwrap().sent_at = Some(1_700_000_000);
        assert_eq!(plan_digest(&[sent]), digest, "progress is not plan");
        let mut elsewhere = row.clone();
        elsewhere.phone.as_mut().unwrap().contact = Some("sip:201@192.0.2.9:5060".into());
        assert_ne!(plan_digest(&[elsewhere]), digest, "where the NOTIFY goes");
        let mut other = row;
        other.phone.as_mut().unwrap().id = Some(8);
        assert_ne!(plan_digest(&[other]), digest, "which phone a write changes");
    }
}
