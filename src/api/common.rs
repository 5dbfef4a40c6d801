//! Types shared by every kind: connection references, target selection, field locks,
//! run modes, and the status every operation reports.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every pbx-operator kind.
pub const GROUP: &str = "pbx-operator.io";
/// The one served version.
pub const VERSION: &str = "v1alpha1";

/// Extensions are SIP user parts: digits first of all, letters allowed for service accounts.
/// No '@', ';', spaces or control characters, so an extension can never smuggle a URI
/// parameter or a header into a SIP message.
pub const EXTENSION_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,31}$";
/// Group and model names: printable, no leading space, no control characters.
pub const NAME_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9 ._/+-]{0,62}$";
/// Durations in the Go style people write in Kubernetes: `30s`, `5m`, `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]{1,5}(ms|s|m|h))+$";

/// The PbxConnection (in the same namespace) an operation acts on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ConnectionRef {
    /// Name of a PbxConnection in this namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Secret name, in the resource's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A key of a ConfigMap in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ConfigMapKeyRef {
    /// ConfigMap name, in the resource's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the ConfigMap's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Where a secret value comes from. Only Secret references: a literal would end up in Git. The
/// Secret must carry the label `pbx-operator.io/usable-by-changes: "true"` (its owner's consent).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretValueSource {
    pub secret_key_ref: SecretKeyRef,
}

/// Users to act on: members of `groups` plus `extensions`, minus `exclude`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.groups) ? size(self.groups) : 0) + (has(self.extensions) ? size(self.extensions) : 0) > 0"
).message("targets selects nobody: name at least one entry in targets.groups or targets.extensions"))]
pub struct UserTargets {
    /// Every member of these user groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(pattern(NAME_PATTERN), length(max = 63)))]
    pub groups: Vec<String>,
    /// Individual users by extension.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 10000),
        inner(pattern(EXTENSION_PATTERN), length(max = 32))
    )]
    pub extensions: Vec<String>,
    /// Extensions removed from the selection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 10000),
        inner(pattern(EXTENSION_PATTERN), length(max = 32))
    )]
    pub exclude: Vec<String>,
    /// If the selection resolves to more targets than this, nothing is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_targets: Option<u32>,
}

/// Phones to act on: the phones of the selected users, narrowed by model and vendor.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.groups) ? size(self.groups) : 0) + (has(self.extensions) ? size(self.extensions) : 0) > 0"
).message("targets selects no phones: name at least one entry in targets.groups or targets.extensions"))]
pub struct PhoneTargets {
    /// Phones of every member of these user groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(pattern(NAME_PATTERN), length(max = 63)))]
    pub groups: Vec<String>,
    /// Phones of these users.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 10000),
        inner(pattern(EXTENSION_PATTERN), length(max = 32))
    )]
    pub extensions: Vec<String>,
    /// Users whose phones are left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 10000),
        inner(pattern(EXTENSION_PATTERN), length(max = 32))
    )]
    pub exclude: Vec<String>,
    /// Keep only phones of these models (e.g. `SIP-T46S`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(pattern(NAME_PATTERN), length(max = 63)))]
    pub models: Vec<String>,
    /// Keep only phones of these vendors (e.g. `Yealink`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(pattern(NAME_PATTERN), length(max = 63)))]
    pub vendors: Vec<String>,
    /// If the selection resolves to more phones than this, nothing is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_targets: Option<u32>,
}

/// Whether a field may be written. Closed fields are reported but never applied.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Lock {
    Open,
    #[default]
    Closed,
}

/// Validate computes and shows the plan without touching the PBX; Execute applies it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    Validate,
    #[default]
    Execute,
}

/// Continue applies every target it can; Atomic applies all targets in one transaction, or none.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FailurePolicy {
    #[default]
    Continue,
    Atomic,
}

/// Once applies the change one time; Enforce re-checks on `interval` and repairs drift.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Policy {
    #[default]
    Once,
    Enforce,
}

/// Where an operation stands; printed by `kubectl get`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    #[default]
    Pending,
    Validated,
    Scheduled,
    Running,
    Succeeded,
    PartiallyFailed,
    Failed,
    Expired,
}

/// What happened to one target.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Outcome {
    /// Planned (Validate mode): nothing was written yet.
    #[default]
    Planned,
    /// Its batch started; the side effects may or may not have happened (a restart checks).
    InProgress,
    Changed,
    Unchanged,
    Failed,
    Skipped,
    /// The value moved between planning and writing; the target was left alone.
    Conflict,
    /// Phones: a fresh REGISTER was seen after the NOTIFY.
    Restarted,
    /// Phones: the NOTIFY got a 2xx but no re-registration came within the timeout.
    Accepted,
    NotRegistered,
    /// Phones: notAfter passed before the NOTIFY could be sent.
    Expired,
    /// A step that cannot be observed (a mail, a phone's NOTIFY without a fresh REGISTER after
    /// it) was under way when the operator stopped: it may or may not have happened. The retry
    /// annotation does exactly such steps again.
    Uncertain,
}

/// One field of one target: its value before and after (secret values are never shown).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct FieldChange {
    #[schemars(length(max = 64))]
    pub field: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub to: Option<String>,
}

/// The result for one user or phone.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct TargetResult {
    /// Extension (users) or `extension/MAC` (phones).
    #[schemars(length(max = 128))]
    pub target: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub changes: Vec<FieldChange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 1024)))]
    pub notes: Vec<String>,
}

/// Counts over all targets of the current run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub targets: u32,
    #[serde(default)]
    pub changed: u32,
    #[serde(default)]
    pub unchanged: u32,
    #[serde(default)]
    pub failed: u32,
    #[serde(default)]
    pub skipped: u32,
    #[serde(default)]
    pub conflicts: u32,
    /// Targets with a step that may or may not have happened (see outcome Uncertain).
    #[serde(default)]
    pub uncertain: u32,
}

/// Counts over all phones of a restart.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartSummary {
    pub targets: u32,
    #[serde(default)]
    pub restarted: u32,
    #[serde(default)]
    pub accepted: u32,
    #[serde(default)]
    pub not_registered: u32,
    #[serde(default)]
    pub failed: u32,
    #[serde(default)]
    pub expired: u32,
    /// Phones whose NOTIFY was under way when the operator stopped and that did not register
    /// again: it may or may not have been sent. The retry annotation sends exactly these again.
    #[serde(default)]
    pub uncertain: u32,
    /// NOTIFYs sent and not yet answered or confirmed.
    #[serde(default)]
    pub in_flight: u32,
}

/// The plan a run executes: who is touched and how, fixed by `hash`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// sha256 over the resolved targets, their current values and the intended values.
    /// Copy it to `spec.approvedPlanHash` to execute exactly this plan.
    #[schemars(length(max = 64))]
    pub hash: String,
    /// The generation this plan was computed for.
    pub generation: i64,
    /// How many targets the selection resolved to.
    pub targets: u32,
    /// The resolved targets (first 1,000; the full list is in the results ConfigMaps).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(max = 128)))]
    pub resolved: Vec<String>,
    /// Per field named in the spec: the value all targets share, or null where they differ.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub common_values: std::collections::BTreeMap<String, Option<String>>,
    /// Fields named in the spec whose lock is Closed: reported, never written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    pub closed_fields: Vec<String>,
    /// How many targets would change.
    #[serde(default)]
    pub changes: u32,
    /// Fingerprint of the spec the plan was made for (without mode and approvedPlanHash), so a
    /// switch from Validate to Execute can execute exactly the validated plan.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 64))]
    pub spec_hash: String,
    /// CSV-sourced changes: the file this plan was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csv: Option<CsvPlan>,
    /// sha256 of what each stored batch of the plan does (targets, writes, steps), recorded by
    /// the operator when it stored them: a batch that no longer matches is never executed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(max = 64)))]
    pub batch_digests: Vec<String>,
}

/// The CSV a plan was made from: which file (by content hash), its columns, how many rows.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CsvPlan {
    /// sha256 of the file's bytes as read (after gunzip), to tell which upload was planned.
    #[schemars(length(max = 64))]
    pub sha256: String,
    /// The header as written; the result CSV is these columns plus `Change OK` and `Notes`.
    #[schemars(length(max = 64), inner(length(max = 128)))]
    pub columns: Vec<String>,
    /// Data rows in the file.
    pub rows: u32,
    /// Rows that fail validation (unknown extension, malformed value, duplicates ...).
    pub invalid: u32,
}

/// Execution progress, written per batch.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Which run this is, for people: the generation, plus the retry or Enforce check it serves.
    #[schemars(length(max = 128))]
    pub run: String,
    /// The spec generation the run serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// The value of the retry annotation the run serves, if it is a retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 40))]
    pub retry: Option<String>,
    /// An Enforce correction run: when its check found the drift (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<i64>,
    /// Result ConfigMaps (batches) of this run.
    pub batches: u32,
    /// Batches whose results are recorded.
    pub done: u32,
}

/// Status shared by every operation kind; `S` is the kind's summary (users or phones).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus<S = Summary> {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: Phase,
    /// Ready, Reconciling, Stalled and Validated, as kstatus reads them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]), length(max = 8))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<S>,
    /// Per-target results, failures first, capped at 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub results: Vec<TargetResult>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub results_truncated: bool,
    /// ConfigMaps holding the full results as CSV, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(max = 253)))]
    pub results_refs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Enforce policy: drift corrections made so far, and when last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrections: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked_time: Option<Time>,
    /// Where an execution stands, so a restarted operator resumes instead of redoing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Warnings about the spec that did not stop the run (e.g. a recycle entry without email).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 1024)))]
    pub warnings: Vec<String>,
    /// The run's entry in the PBX's run ledger; for a change already executed by an earlier
    /// object of this name and spec (`replayed`), the entry of that run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<super::LedgerRef>,
}

/// Parses the Go-style durations the CRDs accept (`30s`, `5m`, `1h30m`, `250ms`).
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut total = std::time::Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (std::time::Duration::from_millis(n), 2)
        } else if rest.starts_with('s') {
            (std::time::Duration::from_secs(n), 1)
        } else if rest.starts_with('m') {
            (std::time::Duration::from_secs(n * 60), 1)
        } else if rest.starts_with('h') {
            (std::time::Duration::from_secs(n * 3600), 1)
        } else {
            return None;
        };
        total += unit;
        rest = &rest[len..];
    }
    (!text.is_empty()).then_some(total)
}

#[cfg(test)]
mod duration_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("5d"), None);
    }
}
