//! BulkUserChange: set fields on many users, and one-shot actions on them.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    ConfigMapKeyRef, ConnectionRef, DURATION_PATTERN, FailurePolicy, Mode, OperationStatus, Policy,
    SecretKeyRef, UserTargets,
};
use super::fields::UserFields;

/// One-shot actions on every selected user.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum UserAction {
    /// Rotate the SIP secret to an unguessable value, mark the user PasswordRequired, mail reset instructions.
    ResetPassword,
    ResetTwoFactor,
    Unlock,
    Lock,
    SendWelcomeEmail,
    /// Delete the user; a user who still owns numbers is skipped.
    Remove,
}

/// The finished change a revert undoes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct RevertOf {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Where a CSV of per-user changes comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.configMapKeyRef) != has(self.secretKeyRef)")
    .message("source.csv needs exactly one of configMapKeyRef or secretKeyRef"))]
pub struct CsvSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<ConfigMapKeyRef>,
    /// Use a Secret when the CSV holds sensitive columns. The Secret must carry the label
    /// `pbx-operator.io/usable-by-changes: "true"` (its owner's consent), else the change is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ChangeSource {
    pub csv: CsvSource,
}

/// Set fields on many users, and run one-shot actions on them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "pbx-operator.io",
    version = "v1alpha1",
    kind = "BulkUserChange",
    namespaced,
    status = "OperationStatus",
    shortname = "buc",
    category = "pbx",
    doc = "Set fields on many users (only fields whose lock is Open), and one-shot actions on them",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Targets",
        type_ = "integer",
        json_path = ".status.summary.targets"
    ),
    printcolumn(
        name = "Changed",
        type_ = "integer",
        json_path = ".status.summary.changed"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.summary.failed"
    ),
    printcolumn(name = "Not Before", type_ = "date", json_path = ".spec.notBefore"),
    printcolumn(
        name = "Execute Before",
        type_ = "date",
        json_path = ".spec.executeBefore",
        priority = 1
    ),
    printcolumn(
        name = "Batches Done",
        type_ = "integer",
        description = "Batches of the current run whose results are recorded",
        json_path = ".status.progress.done"
    ),
    printcolumn(
        name = "Batches",
        type_ = "integer",
        description = "Batches of the current run",
        json_path = ".status.progress.batches"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.targets) || has(self.source) || has(self.revertOf)")
    .message("spec.targets is required (or spec.source.csv, whose rows name the users)")
    .field_path(".targets"))]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.fields) || (has(self.actions) && size(self.actions) > 0) || has(self.source) || has(self.revertOf)"
).message("nothing to do: set spec.fields, spec.actions or spec.source.csv"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.revertOf) || (!has(self.targets) && !has(self.fields) && !has(self.source) && (!has(self.actions) || size(self.actions) == 0))"
).message("spec.revertOf plans from what the reverted change recorded: remove spec.targets, spec.fields, spec.actions and spec.source")
.field_path(".revertOf"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.revertOf) || !has(self.policy) || self.policy != 'Enforce'")
    .message("a revert runs once: remove policy Enforce (or spec.revertOf)")
    .field_path(".policy"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.targets) || !has(self.source)")
    .message("spec.source.csv names its users in its rows: remove spec.targets")
    .field_path(".targets"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.approvedPlanHash) || !has(self.mode) || self.mode == 'Execute'"
).message("spec.approvedPlanHash only applies to mode Execute: remove it or set mode: Execute")
.field_path(".approvedPlanHash"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.interval) || (has(self.policy) && self.policy == 'Enforce')")
    .message("spec.interval only applies to policy Enforce: set policy: Enforce or remove interval")
    .field_path(".interval"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.notBefore) || !has(self.executeBefore) || self.executeBefore > self.notBefore"
).message("spec.executeBefore must be later than spec.notBefore: the window would be empty")
.field_path(".executeBefore"))]
pub struct BulkUserChangeSpec {
    pub connection_ref: ConnectionRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<UserTargets>,
    /// Values to set, each with a lock; only Open fields are written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<UserFields>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 6), extend("x-kubernetes-list-type" = "set"))]
    pub actions: Vec<UserAction>,
    /// Per-user values from a CSV instead of (or on top of) `fields`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ChangeSource>,
    #[serde(default)]
    pub mode: Mode,
    /// Execute only while the plan's hash is still this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-f]{64}$"), length(max = 64))]
    pub approved_plan_hash: Option<String>,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    #[serde(default)]
    pub policy: Policy,
    /// Enforce: how often targets are re-read and drift repaired (default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(DURATION_PATTERN))]
    pub interval: Option<String>,
    /// Plan and execute no earlier than this (phase Scheduled until then); omitted: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Never start executing after this: an operation first seen (or first due) later ends
    /// Expired, nothing done (a one-shot change that Git brings back a year later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execute_before: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Undo: revert the finished BulkUserChange of this name (same namespace) from what it
    /// recorded, compare-and-set against the values it wrote. Nothing else may be set beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_of: Option<RevertOf>,
    /// Who asked for this change; stamped at admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub requested_by: Option<String>,
}
