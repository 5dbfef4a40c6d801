//! The run ledger kept in the PBX's own database: every executed run of an operation, so that
//! a cluster rebuilt from Git recognises work already done (the PBX outlives the cluster). Kube-
//! free types; the backend stores them (Kamailio: `pbx_ledger` and `pbx_ledger_batch`).

/// What identifies a change across clusters: its kind, namespace, name and the hash of its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub spec_hash: String,
}

/// One executed run, as the ledger records it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LedgerEntry {
    /// The entry's own id (random hex), named in status and in `pbx-operator history`.
    pub id: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The object that ran it (a later object of the same name that resumed it takes over).
    pub uid: String,
    pub spec_hash: String,
    pub plan_hash: String,
    pub requested_by: Option<String>,
    /// Unix milliseconds.
    pub started: i64,
    /// Unix milliseconds; None while the run is under way (or was interrupted).
    pub finished: Option<i64>,
    /// The phase the run ended in (Succeeded, PartiallyFailed, Failed, Expired).
    pub phase: Option<String>,
    pub counts: LedgerCounts,
    /// The plan as status showed it (JSON), to restore the run's status on another cluster.
    pub plan: String,
    /// How many journal batches the run has.
    pub batches: u32,
}

impl LedgerEntry {
    pub fn key(&self) -> LedgerKey {
        LedgerKey {
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            spec_hash: self.spec_hash.clone(),
        }
    }
}

/// Outcome counts of a run, the same columns for every kind (a kind's full summary is in
/// `summary`, JSON).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LedgerCounts {
    pub targets: u32,
    /// Changed users, or restarted and accepted phones.
    pub changed: u32,
    /// Failed and conflicted targets.
    pub failed: u32,
    pub uncertain: u32,
    pub summary: String,
}

/// Which entries `pbx-operator history` lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerFilter {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub requested_by: Option<String>,
    /// Unix milliseconds: entries started at or after.
    pub since: Option<i64>,
    /// Unix milliseconds: entries started before.
    pub until: Option<i64>,
}
