//! What a PBX holds, as the operator sees it: users, their fields, phones, registrations.
//! Nothing here knows about Kubernetes or about any one PBX.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A user field the operator can read and write. The name is the one the CRDs and CSVs use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UserField {
    FirstName,
    LastName,
    Email,
    Role,
    CallGroup,
    PickupGroup,
    VoicemailPin,
    Password,
    Groups,
    Locked,
    CallerIdPolicy,
    VoiceRoutePolicy,
    EnterpriseVoice,
    PrimaryNumber,
    PrimaryNumberLocation,
    PrivateNumber,
    PrivateNumberLocation,
    /// Lifecycle status: Active, SetupRequired, PasswordRequired.
    Status,
}

impl UserField {
    pub const ALL: [UserField; 18] = [
        UserField::FirstName,
        UserField::LastName,
        UserField::Email,
        UserField::Role,
        UserField::CallGroup,
        UserField::PickupGroup,
        UserField::VoicemailPin,
        UserField::Password,
        UserField::Groups,
        UserField::Locked,
        UserField::CallerIdPolicy,
        UserField::VoiceRoutePolicy,
        UserField::EnterpriseVoice,
        UserField::PrimaryNumber,
        UserField::PrimaryNumberLocation,
        UserField::PrivateNumber,
        UserField::PrivateNumberLocation,
        UserField::Status,
    ];

    /// The field's name in specs, status and CSV headers.
    pub fn name(self) -> &'static str {
        match self {
            UserField::FirstName => "firstName",
            UserField::LastName => "lastName",
            UserField::Email => "email",
            UserField::Role => "role",
            UserField::CallGroup => "callGroup",
            UserField::PickupGroup => "pickupGroup",
            UserField::VoicemailPin => "voicemailPin",
            UserField::Password => "password",
            UserField::Groups => "groups",
            UserField::Locked => "locked",
            UserField::CallerIdPolicy => "callerIdPolicy",
            UserField::VoiceRoutePolicy => "voiceRoutePolicy",
            UserField::EnterpriseVoice => "enterpriseVoice",
            UserField::PrimaryNumber => "primaryNumber",
            UserField::PrimaryNumberLocation => "primaryNumberLocation",
            UserField::PrivateNumber => "privateNumber",
            UserField::PrivateNumberLocation => "privateNumberLocation",
            UserField::Status => "status",
        }
    }

    pub fn from_name(name: &str) -> Option<UserField> {
        UserField::ALL.into_iter().find(|f| f.name() == name)
    }

    /// A phone number a user holds; a number has one holder at a time.
    pub fn is_number(self) -> bool {
        matches!(self, UserField::PrimaryNumber | UserField::PrivateNumber)
    }

    /// Secret fields are written from Secrets and read back only as stored (hashed): they are
    /// always written when asked for, never compared with the desired value.
    pub fn is_secret(self) -> bool {
        matches!(self, UserField::VoicemailPin | UserField::Password)
    }
}

impl fmt::Display for UserField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A phone field the operator can read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PhoneField {
    Model,
    Label,
}

impl PhoneField {
    pub fn name(self) -> &'static str {
        match self {
            PhoneField::Model => "model",
            PhoneField::Label => "label",
        }
    }
}

/// A secret value (password, PIN). Its Debug and Display never show the value, so it cannot
/// leak into logs, events or status by accident.
///
/// A secret read from a Kubernetes Secret also carries its `reference`: the Secret's name, key
/// and resourceVersion. That is not secret, and it is what a plan hash pins in place of the
/// value (or anything derived from it), so changing the Secret changes the plan.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    reference: Option<String>,
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret {
            value: value.into(),
            reference: None,
        }
    }
    /// A secret read from a Kubernetes Secret, with where it was read (never the value).
    pub fn with_reference(value: impl Into<String>, reference: impl Into<String>) -> Secret {
        Secret {
            value: value.into(),
            reference: Some(reference.into()),
        }
    }
    /// The value itself: only for hashing it or sending it where it belongs.
    pub fn expose(&self) -> &str {
        &self.value
    }
    /// Where the value was read from (name, key, resourceVersion), if it came from a Secret.
    pub fn reference(&self) -> Option<&str> {
        self.reference.as_deref()
    }
    /// An unguessable secret: 24 characters from a CSPRNG, about 143 bits.
    pub fn generate() -> Secret {
        use rand::Rng;
        const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
        let mut rng = rand::rng();
        Secret::new(
            (0..24)
                .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
                .collect::<String>(),
        )
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A user as read from the PBX. Values are canonical text; an absent key means unset.
/// Secret fields hold what is stored (a salted PIN hash, the HA1), never the secret: such a
/// value stays in memory for compare-and-set and is never shown, logged or hashed into a plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub extension: String,
    pub values: BTreeMap<UserField, String>,
    /// Every number the user owns (routing aliases), primary first.
    pub numbers: Vec<String>,
}

impl User {
    pub fn get(&self, field: UserField) -> Option<&str> {
        self.values.get(&field).map(String::as_str)
    }
}

/// Which users to read: members of `groups` and the listed `extensions`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserSelection {
    pub groups: Vec<String>,
    pub extensions: Vec<String>,
}

/// A selection resolved to extensions, nothing of the users read (see
/// [`super::PbxBackend::select_users`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selected {
    /// Extensions that exist: group members and listed ones, each once, in no given order.
    pub extensions: Vec<String>,
    /// Listed extensions that do not exist on the PBX.
    pub unknown_extensions: Vec<String>,
    /// Listed groups with no members.
    pub empty_groups: Vec<String>,
}

/// The result of reading a selection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserRead {
    /// Users found, sorted by extension.
    pub users: Vec<User>,
    /// Listed extensions that do not exist on the PBX.
    pub unknown_extensions: Vec<String>,
    /// Listed groups with no members.
    pub empty_groups: Vec<String>,
}

/// The value a write leaves behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NewValue {
    Set(String),
    Clear,
    /// A secret to store (hashed where the PBX allows).
    Secret(Secret),
}

/// One field of one user: expected current value (`from`, as stored for secrets) and the new one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldWrite {
    pub field: UserField,
    pub from: Option<String>,
    pub to: NewValue,
}

/// All writes for one user, applied together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserChange {
    pub extension: String,
    pub writes: Vec<FieldWrite>,
    /// Numbers this change may take from other users (planned moves). A number it sets that
    /// someone not listed here holds is refused with [`WriteOutcome::NumberHeld`].
    pub takes: Vec<super::directory::Move>,
}

/// What happened to one user's change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    Applied,
    /// A value moved since it was planned; nothing of this user was written.
    Conflict {
        field: UserField,
        expected: Option<String>,
        found: Option<String>,
    },
    NotFound,
    /// A number to set is held by another user the plan did not expect to take it from.
    NumberHeld {
        field: UserField,
        number: String,
        holder: String,
    },
    Failed(String),
    /// Atomic batch rolled back because of another user's failure or conflict.
    RolledBack,
}

/// One-shot actions a backend runs on a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserAction {
    /// Store this new secret and mark the user PasswordRequired.
    ResetPassword(Secret),
    ResetTwoFactor,
    Lock,
    Unlock,
    Remove,
}

impl UserAction {
    pub fn name(&self) -> &'static str {
        match self {
            UserAction::ResetPassword(_) => "ResetPassword",
            UserAction::ResetTwoFactor => "ResetTwoFactor",
            UserAction::Lock => "Lock",
            UserAction::Unlock => "Unlock",
            UserAction::Remove => "Remove",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionOutcome {
    Done,
    /// Nothing to do (e.g. unlocking an unlocked user).
    Unchanged,
    /// Refused on purpose, with the reason and what to do.
    Skipped(String),
    NotFound,
    Failed(String),
}

/// A provisioned phone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Phone {
    pub id: i64,
    pub mac: String,
    pub vendor: String,
    pub model: String,
    pub owner: Option<String>,
    pub label: Option<String>,
}

/// A live SIP registration (a binding of an address-of-record to a contact).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub extension: String,
    pub contact: String,
    /// Source address the REGISTER came from, when it differs from the contact (NAT).
    pub received: Option<String>,
    /// The PBX socket the phone is reached through, e.g. `udp:10.0.0.1:5060`.
    pub socket: Option<String>,
    pub user_agent: String,
    pub call_id: String,
    /// Unix seconds of the last REGISTER that refreshed this binding.
    pub last_modified: i64,
    /// Seconds until the binding expires, when the source says (0: not read).
    pub expires: i64,
}

/// The final answer to a SIP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SipAnswer {
    pub code: u16,
    pub reason: String,
}

/// What a probe learned about a PBX.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    pub version: String,
    pub users: u64,
    pub registered_phones: u64,
}

/// The policy names a PBX knows, per kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    pub caller_id: std::collections::BTreeSet<String>,
    pub voice_route: std::collections::BTreeSet<String>,
}

impl Policies {
    /// The names known for a policy field; None for other fields.
    pub fn known(&self, field: UserField) -> Option<&std::collections::BTreeSet<String>> {
        match field {
            UserField::CallerIdPolicy => Some(&self.caller_id),
            UserField::VoiceRoutePolicy => Some(&self.voice_route),
            _ => None,
        }
    }
}

/// What a backend supports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub user_fields: Vec<UserField>,
    pub phone_fields: Vec<PhoneField>,
    pub actions: Vec<&'static str>,
    pub transactions: bool,
}

/// Sorts extensions the way people read them: numerically when both are numbers.
pub fn extension_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y).then(a.cmp(b)),
        _ => a.cmp(b),
    }
}
