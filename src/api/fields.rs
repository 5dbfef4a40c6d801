//! Field locks: the values a change may write, each with its own lock.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Lock, SecretValueSource};

/// A plain field: a value and its lock. Only `lock: Open` fields are ever written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Field<T> {
    pub value: T,
    #[serde(default)]
    pub lock: Lock,
}

/// A secret-valued field (voicemail PIN, password): its value only ever comes from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.value)").message(
    "this field is secret: a literal value would be stored in Git and etcd; put it in a Secret and use valueFrom.secretKeyRef"
))]
#[x_kube(validation = kube::core::Rule::new("has(self.valueFrom)").message(
    "this field is secret: set valueFrom.secretKeyRef to the Secret key that holds it"
))]
pub struct SecretField {
    /// Never allowed; present in the schema only so that a literal gets a clear refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<SecretValueSource>,
    #[serde(default)]
    pub lock: Lock,
}

/// A phone number a user owns, and the location it is registered at (emergency calls).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct NumberAssignment {
    /// E.164, e.g. `+15550100201`.
    #[schemars(pattern(r"^\+[1-9][0-9]{6,14}$"))]
    pub number: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub location: Option<String>,
}

/// The user fields a BulkUserChange can set. A backend states which it supports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<Field<ShortText>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<Field<ShortText>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<Field<Email>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Field<Role>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_group: Option<Field<GroupNumber>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_group: Option<Field<GroupNumber>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voicemail_pin: Option<SecretField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<SecretField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Field<GroupList>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked: Option<Field<bool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_id_policy: Option<Field<PolicyName>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voice_route_policy: Option<Field<PolicyName>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enterprise_voice: Option<Field<bool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_number: Option<Field<NumberAssignment>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_number: Option<Field<NumberAssignment>>,
}

/// The phone fields a BulkPhoneChange can set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhoneFields {
    /// The phone model; allowed only when every selected phone has the same vendor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<Field<ModelName>>,
    /// A free label shown in inventories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Field<ShortText>>,
}

/// A user's role on the PBX.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Role {
    User,
    Operator,
    Admin,
}

// Newtypes carry their limits into the schema, so every string has a maxLength (CEL cost
// estimation needs one) and a value that cannot be stored is refused at admission.

/// Up to 64 characters of text without control characters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct ShortText(#[schemars(length(max = 64), pattern(r"^[^\x00-\x1f\x7f]*$"))] pub String);

/// An email address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct Email(#[schemars(length(max = 254), pattern(r"^[^@\s]+@[^@\s]+\.[^@\s]+$"))] pub String);

/// A call or pickup group number, 0 to 63 as most PBXes number them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct GroupNumber(
    #[schemars(pattern(r"^([0-9]|[1-5][0-9]|6[0-3])$"), length(max = 2))] pub String,
);

/// A named policy (caller ID, voice routing).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct PolicyName(
    #[schemars(length(max = 64), pattern(r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))] pub String,
);

/// A phone model name such as `SIP-T46S`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct ModelName(
    #[schemars(length(max = 63), pattern(r"^[A-Za-z0-9][A-Za-z0-9 ._/+-]*$"))] pub String,
);

/// User group names.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct GroupList(
    #[schemars(
        length(max = 64),
        inner(length(max = 63), pattern(r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))
    )]
    pub Vec<String>,
);
