//! BulkPhoneChange: set fields on many phones, first of all the model.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{ConnectionRef, Mode, OperationStatus, PhoneTargets};
use super::fields::PhoneFields;
use super::user_change::RevertOf;

/// Set fields on many phones. A model is assigned only when all selected phones share a vendor.
/// A run is one pass (no `policy: Enforce`, no `interval`) and each phone's write stands on its
/// own (no `failurePolicy`): the API server refuses those fields as unknown.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "pbx-operator.io",
    version = "v1alpha1",
    kind = "BulkPhoneChange",
    namespaced,
    status = "OperationStatus",
    shortname = "bpc",
    category = "pbx",
    doc = "Set fields on many phones (only fields whose lock is Open), first of all the model",
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
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.approvedPlanHash) || !has(self.mode) || self.mode == 'Execute'"
).message("spec.approvedPlanHash only applies to mode Execute: remove it or set mode: Execute")
.field_path(".approvedPlanHash"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.notBefore) || !has(self.executeBefore) || self.executeBefore > self.notBefore"
).message("spec.executeBefore must be later than spec.notBefore: the window would be empty")
.field_path(".executeBefore"))]
#[x_kube(validation = kube::core::Rule::new("has(self.revertOf) || has(self.targets)")
    .message("spec.targets is required (or spec.revertOf, to undo a finished BulkPhoneChange)")
    .field_path(".targets"))]
#[x_kube(validation = kube::core::Rule::new("has(self.revertOf) || has(self.fields)")
    .message("spec.fields is required (or spec.revertOf, to undo a finished BulkPhoneChange)")
    .field_path(".fields"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.revertOf) || (!has(self.targets) && !has(self.fields))")
    .message("spec.revertOf plans from what the reverted change recorded: remove spec.targets and spec.fields")
    .field_path(".revertOf"))]
pub struct BulkPhoneChangeSpec {
    pub connection_ref: ConnectionRef,
    #[serde(default, skip_serializing_if = "is_default")]
    pub targets: PhoneTargets,
    /// Values to set, each with a lock; only Open fields are written.
    #[serde(default, skip_serializing_if = "is_default")]
    pub fields: PhoneFields,
    /// Undo: restore the models and labels the finished BulkPhoneChange of this name (same
    /// namespace) wrote, compare-and-set. Nothing else may be set beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_of: Option<RevertOf>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-f]{64}$"), length(max = 64))]
    pub approved_plan_hash: Option<String>,
    /// Plan and execute no earlier than this (phase Scheduled until then); omitted: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Never start executing after this: an operation first seen (or first due) later ends
    /// Expired, nothing done (a one-shot change that Git brings back a year later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execute_before: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub requested_by: Option<String>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}
