//! PBX backends behind one trait, made for bulk work: one call reads many users, one call
//! writes a batch with compare-and-set against the planned values.

pub mod directory;
pub mod kamailio;
pub mod ledger;
mod model;
pub mod sip;
pub mod snapshot;

pub use ledger::{LedgerCounts, LedgerEntry, LedgerFilter, LedgerKey};
pub use model::*;
pub use snapshot::{Expect, KeptSnapshot, Preference, RestoreOutcome, UserRestore, UserSnapshot};

use async_trait::async_trait;

/// Errors talking to a PBX. Messages name what failed and what to check; they never contain
/// credentials (URLs are shown without their user and password).
#[derive(Debug, thiserror::Error)]
pub enum PbxError {
    #[error(
        "cannot reach the database at {target}: {detail}; check the database URL in the connection's Secret and that the database accepts connections from the operator"
    )]
    DatabaseUnreachable { target: String, detail: String },
    #[error(
        "the database at {target} refused the login: {detail}; fix the user or password in the connection's database URL Secret"
    )]
    DatabaseAuth { target: String, detail: String },
    #[error(
        "the database at {target} lacks Kamailio's tables ({missing}); load Kamailio's schema into it (kamdbctl create, or /usr/share/kamailio/<db>/*-create.sql)"
    )]
    MissingTables { target: String, missing: String },
    /// The database could not take the work now (deadlock, serialization failure, lock or
    /// statement timeout, too busy): the same work may well succeed on a retry.
    #[error(
        "the database at {target} could not take the change now: {detail}; the operator retries with backoff, nothing to do unless it persists"
    )]
    DatabaseBusy { target: String, detail: String },
    /// The database refused the data itself (a constraint, a bad value, an exception raised by a
    /// trigger): the same write fails the same way again, so it is not retried.
    #[error(
        "the database refused the change: {0}; correct the value, or the database rule (constraint or trigger) that refuses it, then retry the failed targets"
    )]
    Refused(String),
    /// Any other database error (permissions, an unexpected schema): a person must look.
    #[error("database error: {0}")]
    Database(String),
    #[error(
        "cannot reach the RPC endpoint {url}: {detail}; check the RPC URL in the connection's Secret and that Kamailio's xhttp and jsonrpcs modules listen there"
    )]
    RpcUnreachable { url: String, detail: String },
    #[error("RPC {method} failed: {detail}")]
    Rpc { method: String, detail: String },
    #[error("{0}")]
    InvalidUrl(String),
    #[error("refused to use {what}: {reason}")]
    Unsafe { what: String, reason: String },
}

impl PbxError {
    /// Whether retrying later may help (the PBX or its database is down or busy), as opposed to
    /// data the database refuses or a configuration error a person must fix. Database errors are
    /// classed once, where the driver's error becomes a PbxError (`kamailio::db::classify`).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            PbxError::DatabaseUnreachable { .. }
                | PbxError::DatabaseBusy { .. }
                | PbxError::RpcUnreachable { .. }
                | PbxError::Rpc { .. }
        )
    }

    /// A short reason for conditions and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PbxError::DatabaseUnreachable { .. } => "DatabaseUnreachable",
            PbxError::DatabaseAuth { .. } => "DatabaseAuthFailed",
            PbxError::MissingTables { .. } => "MissingTables",
            PbxError::DatabaseBusy { .. } => "DatabaseBusy",
            PbxError::Refused(_) => "RefusedByDatabase",
            PbxError::Database(_) => "DatabaseError",
            PbxError::RpcUnreachable { .. } => "RpcUnreachable",
            PbxError::Rpc { .. } => "RpcError",
            PbxError::InvalidUrl(_) => "InvalidUrl",
            PbxError::Unsafe { .. } => "UnsafeValue",
        }
    }
}

pub type Result<T, E = PbxError> = std::result::Result<T, E>;

/// A PBX the operator can administer. Every method works on many targets at once.
#[async_trait]
pub trait PbxBackend: Send + Sync {
    /// What this backend can read and write.
    fn capabilities(&self) -> Capabilities;

    /// Checks database and RPC, and counts users and registered phones.
    async fn probe(&self) -> Result<Probe>;

    /// Reads every selected user (group members and listed extensions) in one go.
    async fn read_users(&self, selection: &UserSelection) -> Result<UserRead>;

    /// Like [`PbxBackend::read_users`], with only `fields` (and every user's numbers) read.
    async fn read_user_fields(
        &self,
        selection: &UserSelection,
        fields: &[UserField],
    ) -> Result<UserRead> {
        let _ = fields;
        self.read_users(selection).await
    }

    /// The extensions a selection names, without reading the users: a planner then reads them
    /// a chunk at a time. By default through [`PbxBackend::read_user_fields`] with no field.
    async fn select_users(&self, selection: &UserSelection) -> Result<Selected> {
        let read = self.read_user_fields(selection, &[]).await?;
        Ok(Selected {
            extensions: read.users.into_iter().map(|u| u.extension).collect(),
            unknown_extensions: read.unknown_extensions,
            empty_groups: read.empty_groups,
        })
    }

    /// Every extension of the tenant, in extension order (for exports).
    async fn extensions(&self) -> Result<Vec<String>>;

    /// Who holds each of `numbers` (number, extension): as a routing number or private number.
    async fn number_holders(&self, numbers: &[String]) -> Result<Vec<(String, String)>>;

    /// The caller ID and voice route policy names the PBX knows.
    async fn policies(&self) -> Result<Policies>;

    /// Applies field changes in order. Each user's writes apply only if every `from` still matches
    /// (compare-and-set) against the state the changes before it leave; otherwise that user
    /// reports Conflict and nothing of it is written. A number a change sets is taken from its
    /// holder only if the change names that holder in `takes`.
    /// `atomic`: all users in one transaction, any failure or conflict rolls back all.
    async fn apply_user_changes(
        &self,
        changes: &[UserChange],
        atomic: bool,
    ) -> Result<Vec<WriteOutcome>>;

    /// Opens one transaction for an Atomic change written a batch at a time (see
    /// [`AtomicWrites`]); None when the backend cannot hold one open, and the change is then
    /// written in one [`PbxBackend::apply_user_changes`] call.
    async fn begin_atomic(&self) -> Result<Option<Box<dyn AtomicWrites + '_>>> {
        Ok(None)
    }

    /// Runs one-shot actions, one outcome per (extension, action).
    async fn apply_actions(&self, actions: &[(String, UserAction)]) -> Result<Vec<ActionOutcome>>;

    /// Phones owned by the selected users.
    async fn read_phones(&self, selection: &UserSelection) -> Result<Vec<Phone>>;

    /// Sets `field` of each phone (by id) to the value, if it is still `from`.
    async fn apply_phone_changes(
        &self,
        changes: &[(i64, PhoneField, String, String)],
    ) -> Result<Vec<WriteOutcome>>;

    /// Every live registration of the tenant.
    async fn registrations(&self) -> Result<Vec<Registration>>;

    /// Live registrations of one user.
    async fn lookup(&self, extension: &str) -> Result<Vec<Registration>>;

    /// Live registrations of several users (the phones a restart has in flight), at a cost that
    /// follows how many are asked for, never the registrar's size. By default one
    /// [`PbxBackend::lookup`] per user, a few at once.
    async fn lookup_many(&self, extensions: &[String]) -> Result<Vec<Registration>> {
        use futures::StreamExt;
        let mut lookups = futures::stream::iter(extensions.iter().cloned())
            .map(|e| async move { self.lookup(&e).await })
            .buffer_unordered(16);
        let mut out = Vec::new();
        while let Some(regs) = lookups.next().await {
            out.extend(regs?);
        }
        Ok(out)
    }

    /// Sends an out-of-dialog NOTIFY with `event` to a registered contact; returns the final answer.
    async fn notify(&self, to: &Registration, event: &str) -> Result<SipAnswer>;

    /// Drops every registration of a user, so the phones must register (and authenticate) again.
    async fn drop_registrations(&self, extension: &str) -> Result<()>;

    /// Resets users for reuse, each in its own transaction: clears what `parts` names, and
    /// leaves the user in status SetupRequired. Registrations are not dropped here.
    async fn reset_users(&self, resets: &[UserReset]) -> Result<Vec<ResetOutcome>>;

    /// Gives reset extensions to new people, each in its own transaction: sets the identity,
    /// rotates the SIP secret to one nobody knows, clears the voicemail PIN, and leaves the
    /// user in status PasswordRequired.
    async fn recycle_users(&self, identities: &[NewIdentity]) -> Result<Vec<ResetOutcome>>;

    // Snapshots of users (see [`snapshot`]): backends without them keep none, and a revert
    // says that a removed or recycled user cannot be brought back.

    /// Keeps a snapshot of each of `extensions` that exists, under run `run`, unless the run
    /// already kept one of it: the first snapshot of a run is the state before it.
    async fn keep_snapshots(&self, run: &str, extensions: &[String]) -> Result<()> {
        let _ = (run, extensions);
        Ok(())
    }

    /// The snapshots run `run` kept of `extensions` (expired ones without their data).
    async fn snapshots(&self, run: &str, extensions: &[String]) -> Result<Vec<KeptSnapshot>> {
        let _ = (run, extensions);
        Ok(vec![])
    }

    /// Brings users back from their snapshots, each in its own transaction, compare-and-set
    /// against `expect`; the secret is a new one nobody knows and the status PasswordRequired.
    async fn restore_users(&self, restores: &[UserRestore]) -> Result<Vec<RestoreOutcome>> {
        Ok(restores
            .iter()
            .map(|_| RestoreOutcome::Failed("this backend keeps no snapshots".into()))
            .collect())
    }

    /// Deletes the data of snapshots taken before `taken_before` (Unix ms), keeping a marker;
    /// returns how many expired.
    async fn expire_snapshots(&self, taken_before: i64) -> Result<u64> {
        let _ = taken_before;
        Ok(0)
    }

    // The run ledger (see [`ledger`]): backends without one say so, and nothing is recorded.

    /// The latest entry of `key` (finished or not), if any.
    async fn ledger_find(&self, key: &LedgerKey) -> Result<Option<LedgerEntry>> {
        let _ = key;
        Err(no_ledger())
    }

    /// Records a run as started (`entry.batches` batches), with `batches` (JSON lines) in the
    /// same transaction. A large run records its batches first, one at a time, with
    /// [`PbxBackend::ledger_record`]: until its entry exists nothing finds them.
    async fn ledger_begin(&self, entry: &LedgerEntry, batches: &[String]) -> Result<()> {
        let _ = (entry, batches);
        Err(no_ledger())
    }

    /// Records one journal batch of run `id` (JSON lines), replacing what was recorded.
    async fn ledger_record(&self, id: &str, index: usize, rows: &str) -> Result<()> {
        let _ = (id, index, rows);
        Err(no_ledger())
    }

    /// The journal batches of run `id`, in order.
    async fn ledger_batches(&self, id: &str) -> Result<Vec<String>> {
        let _ = id;
        Err(no_ledger())
    }

    /// Journal batch `index` of run `id` (JSON lines), if recorded.
    async fn ledger_batch(&self, id: &str, index: usize) -> Result<Option<String>> {
        Ok(self.ledger_batches(id).await?.into_iter().nth(index))
    }

    /// Records run `id` as taken over by the object `uid` (a resume on a rebuilt cluster).
    async fn ledger_adopt(&self, id: &str, uid: &str) -> Result<()> {
        let _ = (id, uid);
        Err(no_ledger())
    }

    /// Records run `id` as finished now, with its phase and counts.
    async fn ledger_finish(&self, id: &str, phase: &str, counts: &LedgerCounts) -> Result<()> {
        let _ = (id, phase, counts);
        Err(no_ledger())
    }

    /// Entries matching `filter`, oldest first.
    async fn ledger_list(&self, filter: &LedgerFilter) -> Result<Vec<LedgerEntry>> {
        let _ = filter;
        Err(no_ledger())
    }
}

/// An Atomic change's one transaction, open across its batches: each [`AtomicWrites::apply`]
/// is compare-and-set against what the transaction holds (the earlier batches' writes
/// included), and nothing is visible until [`AtomicWrites::commit`]. Dropped without a commit,
/// it rolls back.
#[async_trait]
pub trait AtomicWrites: Send {
    /// Applies a batch's changes, one outcome each (Applied, Conflict, NumberHeld, NotFound, or
    /// Failed with the database's refusal; RolledBack when a refusal ended the transaction).
    async fn apply(&mut self, changes: &[UserChange]) -> Result<Vec<WriteOutcome>>;
    /// Commits everything applied; Some(refusal) when the database refused at commit (a
    /// deferred constraint) and nothing was written.
    async fn commit(self: Box<Self>) -> Result<Option<String>>;
    async fn rollback(self: Box<Self>) -> Result<()>;
}

/// The users of `extensions` that exist, by extension (none read for an empty list).
pub async fn users_by_extension(
    backend: &dyn PbxBackend,
    extensions: Vec<String>,
) -> Result<std::collections::BTreeMap<String, User>> {
    users_with_fields(backend, extensions, None).await
}

/// Like [`users_by_extension`], with only `fields` read when given.
pub async fn users_with_fields(
    backend: &dyn PbxBackend,
    extensions: Vec<String>,
    fields: Option<&[UserField]>,
) -> Result<std::collections::BTreeMap<String, User>> {
    if extensions.is_empty() {
        return Ok(Default::default());
    }
    let selection = UserSelection {
        groups: vec![],
        extensions,
    };
    let read = match fields {
        Some(fields) => backend.read_user_fields(&selection, fields).await?,
        None => backend.read_users(&selection).await?,
    };
    Ok(read
        .users
        .into_iter()
        .map(|u| (u.extension.clone(), u))
        .collect())
}

fn no_ledger() -> PbxError {
    PbxError::Database(
        "this backend keeps no run ledger; use a backend that has one (Kamailio)".into(),
    )
}

/// What a reset clears (UserRecycle `spec.reset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResetPart {
    /// First and last name.
    Name,
    Email,
    /// The SIP secret: rotated to a random one nobody knows.
    Password,
    VoicemailPin,
    /// Phones provisioned for the user: unassigned, they stay in the inventory.
    Devices,
    Role,
    /// Group memberships.
    Groups,
    /// Every number the user owns, with the number locations and the private number.
    Numbers,
    CallGroup,
    PickupGroup,
}

/// One user to reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserReset {
    pub extension: String,
    pub parts: Vec<ResetPart>,
}

/// The person who takes over a reset extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewIdentity {
    pub extension: String,
    pub first_name: String,
    pub last_name: String,
    /// None clears the previous person's address.
    pub email: Option<String>,
}

/// What happened to one reset or recycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResetOutcome {
    /// Committed. `before`: the user as read inside the transaction, before the change;
    /// `unassigned`: the phones that no longer belong to the user (reset with Devices).
    Done {
        before: User,
        unassigned: Vec<Phone>,
    },
    NotFound,
    Failed(String),
}
