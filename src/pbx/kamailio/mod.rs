//! The Kamailio backend: provisioning in its SQL database, live state through its JSON-RPC.

pub mod db;
pub mod pin;
pub mod recycle;
pub mod rpc;
pub mod schema;

use std::time::Duration;

use async_trait::async_trait;

use crate::pbx::{
    ActionOutcome, Capabilities, KeptSnapshot, LedgerCounts, LedgerEntry, LedgerFilter, LedgerKey,
    NewIdentity, PbxBackend, PbxError, Phone, PhoneField, Policies, Probe, Registration,
    ResetOutcome, RestoreOutcome, Result, SipAnswer, UserAction, UserChange, UserField, UserRead,
    UserReset, UserRestore, UserSelection, WriteOutcome, sip,
};

/// Where a Kamailio tenant lives.
#[derive(Clone, Debug)]
pub struct KamailioConfig {
    pub database_url: String,
    pub rpc_url: String,
    pub domain: String,
    pub max_connections: u32,
    pub rpc_timeout: Duration,
    /// How long to wait for a phone's final answer to a NOTIFY (tm's fr_timer is 30 s by default).
    pub notify_timeout: Duration,
}

impl KamailioConfig {
    pub fn new(
        database_url: impl Into<String>,
        rpc_url: impl Into<String>,
        domain: impl Into<String>,
    ) -> Self {
        KamailioConfig {
            database_url: database_url.into(),
            rpc_url: rpc_url.into(),
            domain: domain.into(),
            max_connections: 4,
            rpc_timeout: Duration::from_secs(10),
            notify_timeout: Duration::from_secs(35),
        }
    }
}

pub struct Kamailio {
    db: db::Db,
    rpc: rpc::RpcClient,
    config: KamailioConfig,
}

impl std::fmt::Debug for Kamailio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URLs may hold credentials.
        f.debug_struct("Kamailio")
            .field("domain", &self.config.domain)
            .finish_non_exhaustive()
    }
}

impl Kamailio {
    /// Connects to the database (creating pbx-operator's own table if missing) and prepares
    /// the RPC client. Fails with an error that says what to fix.
    pub async fn connect(config: KamailioConfig) -> Result<Kamailio> {
        let rpc = rpc::RpcClient::new(&config.rpc_url, config.rpc_timeout)?;
        let db =
            db::Db::connect(&config.database_url, &config.domain, config.max_connections).await?;
        db.check_tables().await?;
        db.migrate().await?;
        Ok(Kamailio { db, rpc, config })
    }

    /// Closes the database pool: idle connections at once, the others as they come back.
    pub async fn close(&self) {
        self.db.close().await;
    }

    pub fn db(&self) -> &db::Db {
        &self.db
    }

    pub fn rpc(&self) -> &rpc::RpcClient {
        &self.rpc
    }

    fn aor(&self, extension: &str) -> String {
        format!("{extension}@{}", self.config.domain)
    }
}

#[async_trait]
impl PbxBackend for Kamailio {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            user_fields: UserField::ALL.to_vec(),
            phone_fields: vec![PhoneField::Model, PhoneField::Label],
            actions: vec![
                "ResetPassword",
                "ResetTwoFactor",
                "Lock",
                "Unlock",
                "SendWelcomeEmail",
                "Remove",
            ],
            transactions: true,
        }
    }

    async fn probe(&self) -> Result<Probe> {
        self.db.check_tables().await?;
        let users = self.db.count_users().await?;
        let version = self.rpc.version().await?;
        // This tenant's phones (contacts), counted where usrloc writes them through: not a
        // ul.dump of every tenant's registrations at each probe.
        let registered_phones = self.db.count_registrations().await?;
        Ok(Probe {
            version,
            users,
            registered_phones,
        })
    }

    async fn read_users(&self, selection: &UserSelection) -> Result<UserRead> {
        self.db.read_users(selection).await
    }

    async fn read_user_fields(
        &self,
        selection: &UserSelection,
        fields: &[UserField],
    ) -> Result<UserRead> {
        self.db.read_user_fields(selection, fields).await
    }

    async fn begin_atomic(&self) -> Result<Option<Box<dyn crate::pbx::AtomicWrites + '_>>> {
        Ok(Some(Box::new(self.db.begin_atomic().await?)))
    }

    async fn select_users(&self, selection: &UserSelection) -> Result<crate::pbx::Selected> {
        self.db.select_users(selection).await
    }

    async fn extensions(&self) -> Result<Vec<String>> {
        self.db.extensions().await
    }

    async fn number_holders(&self, numbers: &[String]) -> Result<Vec<(String, String)>> {
        self.db.number_holders(numbers).await
    }

    async fn policies(&self) -> Result<Policies> {
        self.db.policies().await
    }

    async fn apply_user_changes(
        &self,
        changes: &[UserChange],
        atomic: bool,
    ) -> Result<Vec<WriteOutcome>> {
        self.db.apply_user_changes(changes, atomic).await
    }

    async fn apply_actions(&self, actions: &[(String, UserAction)]) -> Result<Vec<ActionOutcome>> {
        let outcomes = self.db.apply_actions(actions).await?;
        // A locked, reset or removed user's phones must stop working now, not at their next
        // re-registration: drop their bindings so Kamailio challenges them again.
        for ((extension, action), outcome) in actions.iter().zip(&outcomes) {
            let drops = matches!(
                action,
                UserAction::Lock | UserAction::ResetPassword(_) | UserAction::Remove
            );
            if drops && *outcome == ActionOutcome::Done {
                self.rpc.remove(&self.aor(extension)).await?;
            }
        }
        Ok(outcomes)
    }

    async fn read_phones(&self, selection: &UserSelection) -> Result<Vec<Phone>> {
        self.db.read_phones(selection).await
    }

    async fn apply_phone_changes(
        &self,
        changes: &[(i64, PhoneField, String, String)],
    ) -> Result<Vec<WriteOutcome>> {
        self.db.apply_phone_changes(changes).await
    }

    async fn registrations(&self) -> Result<Vec<Registration>> {
        self.rpc.dump(&self.config.domain).await
    }

    async fn lookup(&self, extension: &str) -> Result<Vec<Registration>> {
        self.rpc.lookup(&self.aor(extension)).await
    }

    /// From usrloc's `location` table (write-through, `db_mode` 1, which this backend requires:
    /// the same bindings ul.lookup shows), by indexed `IN` lists: one query for hundreds of
    /// phones instead of one JSON-RPC request (and one busy Kamailio worker) each.
    async fn lookup_many(&self, extensions: &[String]) -> Result<Vec<Registration>> {
        self.db.registrations_of(extensions).await
    }

    async fn notify(&self, to: &Registration, event: &str) -> Result<SipAnswer> {
        let unsafe_value = |what: &str, reason: &str| PbxError::Unsafe {
            what: what.into(),
            reason: reason.into(),
        };
        if !sip::is_sip_uri(&to.contact) {
            return Err(unsafe_value(
                "the registered contact",
                "it is not a plain SIP URI",
            ));
        }
        if !sip::header_safe(event) || !sip::header_safe(&to.extension) {
            return Err(unsafe_value(
                "the NOTIFY headers",
                "they contain control characters",
            ));
        }
        // Behind NAT the contact is a private address; reach the phone where its REGISTER came
        // from, through the socket it registered on.
        let next_hop = to
            .received
            .as_deref()
            .filter(|r| sip::is_sip_uri(r))
            .unwrap_or(".");
        let socket = to
            .socket
            .as_deref()
            .filter(|s| sip::header_safe(s))
            .unwrap_or(".");
        let aor = self.aor(&to.extension);
        let headers = format!(
            "From: <sip:provisioning@{domain}>;tag=pbxop{tag}\r\nTo: <sip:{aor}>\r\nEvent: {event}\r\nSubscription-State: terminated;reason=timeout\r\nContact: <sip:provisioning@!!>\r\nContent-Length: 0\r\n",
            domain = self.config.domain,
            tag = rand::random::<u32>(),
        );
        match self
            .rpc
            .uac_wait(
                "NOTIFY",
                &to.contact,
                next_hop,
                socket,
                &headers,
                self.config.notify_timeout,
            )
            .await
        {
            Err(PbxError::Rpc { detail, .. }) if detail.contains("no answer within") => {
                Ok(SipAnswer {
                    code: 408,
                    reason: "Request Timeout (no final answer from the phone)".into(),
                })
            }
            other => other,
        }
    }

    async fn drop_registrations(&self, extension: &str) -> Result<()> {
        self.rpc.remove(&self.aor(extension)).await
    }

    async fn reset_users(&self, resets: &[UserReset]) -> Result<Vec<ResetOutcome>> {
        self.db.reset_users(resets).await
    }

    async fn recycle_users(&self, identities: &[NewIdentity]) -> Result<Vec<ResetOutcome>> {
        self.db.recycle_users(identities).await
    }

    async fn keep_snapshots(&self, run: &str, extensions: &[String]) -> Result<()> {
        self.db.keep_snapshots(run, extensions).await
    }

    async fn snapshots(&self, run: &str, extensions: &[String]) -> Result<Vec<KeptSnapshot>> {
        self.db.snapshots(run, extensions).await
    }

    async fn restore_users(&self, restores: &[UserRestore]) -> Result<Vec<RestoreOutcome>> {
        self.db.restore_users(restores).await
    }

    async fn expire_snapshots(&self, taken_before: i64) -> Result<u64> {
        self.db.expire_snapshots(taken_before).await
    }

    async fn ledger_find(&self, key: &LedgerKey) -> Result<Option<LedgerEntry>> {
        self.db.ledger_find(key).await
    }

    async fn ledger_begin(&self, entry: &LedgerEntry, batches: &[String]) -> Result<()> {
        self.db.ledger_begin(entry, batches).await
    }

    async fn ledger_record(&self, id: &str, index: usize, rows: &str) -> Result<()> {
        self.db.ledger_record(id, index, rows).await
    }

    async fn ledger_batches(&self, id: &str) -> Result<Vec<String>> {
        self.db.ledger_batches(id).await
    }

    async fn ledger_batch(&self, id: &str, index: usize) -> Result<Option<String>> {
        self.db.ledger_batch(id, index).await
    }

    async fn ledger_adopt(&self, id: &str, uid: &str) -> Result<()> {
        self.db.ledger_adopt(id, uid).await
    }

    async fn ledger_finish(&self, id: &str, phase: &str, counts: &LedgerCounts) -> Result<()> {
        self.db.ledger_finish(id, phase, counts).await
    }

    async fn ledger_list(&self, filter: &LedgerFilter) -> Result<Vec<LedgerEntry>> {
        self.db.ledger_list(filter).await
    }
}
