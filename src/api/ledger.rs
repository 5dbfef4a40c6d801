//! Where a run is recorded in the PBX's run ledger (`pbx-operator history`), as status shows it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The ledger entry of this operation's run in the PBX database.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LedgerRef {
    /// The entry's id (`pbx-operator history --connection <ns>/<name>` lists it).
    #[schemars(length(max = 64))]
    pub id: String,
    /// When the recorded run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<Time>,
    /// When the recorded run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<Time>,
    /// Who asked for the recorded run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub requested_by: Option<String>,
    /// true: this object did not execute anything; the same change (namespace, name and spec)
    /// was already executed, by an earlier object of this name (a cluster rebuilt from Git).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}
