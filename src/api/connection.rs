//! PbxConnection: how to reach one PBX tenant.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{DURATION_PATTERN, SecretKeyRef};

/// The PBX software behind a connection.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Backend {
    /// Kamailio: provisioning through its SQL database, live state through JSON-RPC.
    #[default]
    Kamailio,
}

/// How to reach one PBX tenant. Credentials live in Secrets, never in the spec.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "pbx-operator.io",
    version = "v1alpha1",
    kind = "PbxConnection",
    namespaced,
    status = "PbxConnectionStatus",
    shortname = "pbxc",
    category = "pbx",
    doc = "How to reach one PBX tenant: backend, database and RPC endpoints (from Secrets), SIP domain, rate limits",
    printcolumn(name = "Backend", type_ = "string", json_path = ".spec.backend"),
    printcolumn(name = "Domain", type_ = "string", json_path = ".spec.domain"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Users", type_ = "integer", json_path = ".status.users"),
    printcolumn(
        name = "Registered",
        type_ = "integer",
        json_path = ".status.registeredPhones"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PbxConnectionSpec {
    #[serde(default)]
    pub backend: Backend,
    /// The tenant's SIP domain (Kamailio: the `domain` column of subscriber).
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
    )]
    pub domain: String,
    pub database: DatabaseEndpoint,
    pub rpc: RpcEndpoint,
    /// Outgoing mail for password resets and welcome emails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<SmtpSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimits>,
    /// How often the connection is probed again (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(DURATION_PATTERN))]
    pub probe_interval: Option<String>,
    /// How much of this tenant one operator works on at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// The snapshots kept of users a Remove or a UserRecycle takes away (for their revert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<SnapshotSettings>,
}

/// How long the snapshots of removed and recycled users are kept.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSettings {
    /// After this, a snapshot's data is deleted from the PBX database and a revert of that user
    /// fails with a note saying so (default 720h = 30 days). Snapshots are personal data: keep
    /// them no longer than the tenant's data protection rules allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(DURATION_PATTERN))]
    pub retention: Option<String>,
}

/// Snapshots are kept this long unless the connection says otherwise.
pub const DEFAULT_SNAPSHOT_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(30 * 24 * 3600);

/// Bounds on the work on one connection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Operations (BulkUserChange, BulkPhoneChange, PhoneRestart, UserRecycle) executing on
    /// this connection at the same time, when their targets do not overlap (default 4). More
    /// wait in phase Pending, condition reason ConcurrencyLimit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub concurrent_operations: Option<u32>,
}

impl PbxConnectionSpec {
    /// How long snapshots of removed and recycled users are kept.
    pub fn snapshot_retention(&self) -> std::time::Duration {
        self.snapshots
            .as_ref()
            .and_then(|s| s.retention.as_deref())
            .and_then(super::common::parse_duration)
            .unwrap_or(DEFAULT_SNAPSHOT_RETENTION)
    }

    /// Operations that may execute on the connection at once.
    pub fn concurrent_operations(&self) -> u32 {
        self.limits
            .as_ref()
            .and_then(|l| l.concurrent_operations)
            .unwrap_or(4)
    }
}

/// The provisioning database. The URL (with its password) comes from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseEndpoint {
    /// Secret key holding the URL: `postgres://user:pass@host/db`, `mysql://user:pass@host:3306/db` (MySQL or MariaDB) or `sqlite:///path`.
    pub url_secret_ref: SecretKeyRef,
    /// Connections kept open to the database (default 4); a Continue change writes on two at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_connections: Option<u32>,
}

/// The PBX's management RPC (Kamailio: JSON-RPC over HTTP).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RpcEndpoint {
    /// Secret key holding the endpoint URL, e.g. `http://kamailio:5071/RPC` (may carry credentials).
    pub url_secret_ref: SecretKeyRef,
    /// Timeout of one RPC call (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(DURATION_PATTERN))]
    pub timeout: Option<String>,
}

/// How mail is sent.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SmtpTls {
    None,
    #[default]
    StartTls,
    Tls,
}

/// The SMTP relay used for reset instructions and welcome emails.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmtpSettings {
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Sender address, e.g. `PBX <pbx@example.com>`.
    #[schemars(length(min = 3, max = 254))]
    pub from: String,
    #[serde(default)]
    pub tls: SmtpTls,
    /// Secret with `username` and `password` keys, if the relay needs a login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub credentials_secret: Option<String>,
}

/// Bounds on how hard the operator may drive the PBX.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimits {
    /// NOTIFYs sent per second at most, evenly spaced, by all PhoneRestarts on this connection
    /// together (each restart's `rollout.perSecond` still applies to it). Default: no shared limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub notifies_per_second: Option<u32>,
}

/// What a backend can do; published in status so people see it before they write a change.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    pub user_fields: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    pub phone_fields: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    pub actions: Vec<String>,
    /// Whether a batch can be applied in one transaction (failurePolicy Atomic).
    #[serde(default)]
    pub transactions: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PbxConnectionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]), length(max = 8))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// Users provisioned in this tenant at the last probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<u64>,
    /// Phones with a live SIP registration at the last probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_phones: Option<u64>,
    /// What the PBX reports about itself (e.g. `kamailio 5.6.3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub backend_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,
}
