//! PhoneRestart: restart or resync many registered phones, at a bounded rate, confirmed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    ConnectionRef, DURATION_PATTERN, OperationStatus, PhoneTargets, RestartSummary,
};

pub type PhoneRestartStatus = OperationStatus<RestartSummary>;

/// Restart (or resync) many registered phones, now or in a time window.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "pbx-operator.io",
    version = "v1alpha1",
    kind = "PhoneRestart",
    namespaced,
    status = "PhoneRestartStatus",
    shortname = "prs",
    category = "pbx",
    doc = "Restart or resync many registered phones, now or in a time window, at a bounded rate, confirmed by re-registration",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Targets",
        type_ = "integer",
        json_path = ".status.summary.targets"
    ),
    printcolumn(
        name = "Restarted",
        type_ = "integer",
        json_path = ".status.summary.restarted"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.summary.failed"
    ),
    printcolumn(
        name = "Not Before",
        type_ = "date",
        json_path = ".spec.notBefore",
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
        name = "Execute Before",
        type_ = "date",
        json_path = ".spec.executeBefore",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.notBefore) || !has(self.notAfter) || self.notAfter > self.notBefore"
).message("spec.notAfter must be later than spec.notBefore: the restart window would be empty")
.field_path(".notAfter"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.notBefore) || !has(self.executeBefore) || self.executeBefore > self.notBefore"
).message("spec.executeBefore must be later than spec.notBefore: the window would be empty")
.field_path(".executeBefore"))]
pub struct PhoneRestartSpec {
    pub connection_ref: ConnectionRef,
    pub targets: PhoneTargets,
    /// Start no earlier than this; omitted: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Time>,
    /// Send nothing after this; phones not reached by then are reported Expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
    /// Never start executing after this: a restart first seen later ends Expired, nothing sent
    /// (a one-shot restart that Git brings back a year later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execute_before: Option<Time>,
    /// true: reboot the phone; false: only resync its configuration.
    #[serde(default = "default_true")]
    pub reboot: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<Confirm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub requested_by: Option<String>,
}

fn default_true() -> bool {
    true
}

/// How fast NOTIFYs go out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Phones restarting at once (sent and not yet confirmed); default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_in_flight: Option<u32>,
    /// NOTIFYs sent per second at most; default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub per_second: Option<u32>,
}

/// How restarts are confirmed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Confirm {
    /// How long to wait for a phone to register again after its NOTIFY; default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(DURATION_PATTERN))]
    pub timeout: Option<String>,
}
