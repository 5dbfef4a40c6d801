//! UserRecycle: clear users' personal data so extensions can be reused, optionally for new people.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{ConnectionRef, EXTENSION_PATTERN, OperationStatus};

/// What a reset clears.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum ResetItem {
    Name,
    Email,
    Password,
    VoicemailPin,
    /// Additional phones and devices provisioned for the user.
    Devices,
    Role,
    Groups,
    Numbers,
    CallGroup,
    PickupGroup,
}

/// The seed's default reset set.
pub fn default_reset() -> Vec<ResetItem> {
    use ResetItem::*;
    vec![Name, Email, Password, VoicemailPin, Devices]
}

/// The extensions to reset: an explicit list, never a group (recycling is deliberate).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct RecycleTargets {
    #[schemars(
        length(min = 1, max = 200),
        inner(pattern(EXTENSION_PATTERN), length(max = 32))
    )]
    pub extensions: Vec<String>,
}

/// A new person who takes over an extension.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.firstName) && self.firstName != '' && has(self.lastName) && self.lastName != ''"
).message("each recycle entry needs firstName and lastName of the person taking over the extension"))]
pub struct RecycleEntry {
    #[schemars(pattern(EXTENSION_PATTERN), length(max = 32))]
    pub extension: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), pattern(r"^[^\x00-\x1f\x7f]*$"))]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), pattern(r"^[^\x00-\x1f\x7f]*$"))]
    pub last_name: Option<String>,
    /// Recommended: without it no welcome email can be sent (a warning in status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 254), pattern(r"^[^@\s]+@[^@\s]+\.[^@\s]+$"))]
    pub email: Option<String>,
}

/// Reset users so their extensions can be reused, and optionally hand them to new people.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "pbx-operator.io",
    version = "v1alpha1",
    kind = "UserRecycle",
    namespaced,
    status = "OperationStatus",
    shortname = "urc",
    category = "pbx",
    doc = "Clear users' personal data so their extensions can be reused, and optionally hand them to new people",
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
    "!has(self.recycle) || (has(self.targets) && self.recycle.all(r, r.extension in self.targets.extensions))"
).message("every spec.recycle[].extension must also be listed in spec.targets.extensions").field_path(".recycle"))]
#[x_kube(validation = kube::core::Rule::new("has(self.targets) || has(self.revertOf)")
    .message("spec.targets is required (or spec.revertOf, to undo a finished UserRecycle)")
    .field_path(".targets"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.revertOf) || (!has(self.targets) && !has(self.recycle) && (!has(self.sendWelcomeEmail) || !self.sendWelcomeEmail))"
).message("spec.revertOf plans from what the reverted UserRecycle recorded: remove spec.targets, spec.recycle and sendWelcomeEmail")
.field_path(".revertOf"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.notBefore) || !has(self.executeBefore) || self.executeBefore > self.notBefore"
).message("spec.executeBefore must be later than spec.notBefore: the window would be empty")
.field_path(".executeBefore"))]
pub struct UserRecycleSpec {
    pub connection_ref: ConnectionRef,
    /// Required unless `revertOf` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<RecycleTargets>,
    /// Undo a finished UserRecycle in this namespace: each user it reset or recycled gets its
    /// earlier identity back from the snapshot it kept (nothing else beside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_of: Option<super::RevertOf>,
    /// What to clear; default Name, Email, Password, VoicemailPin, Devices.
    #[serde(default = "default_reset")]
    #[schemars(length(min = 1, max = 10), extend("x-kubernetes-list-type" = "set"))]
    pub reset: Vec<ResetItem>,
    /// New people for some of the extensions, at most one per extension.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["extension"]))]
    pub recycle: Vec<RecycleEntry>,
    #[serde(default)]
    pub send_welcome_email: bool,
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
