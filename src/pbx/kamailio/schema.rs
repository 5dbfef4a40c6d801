//! Where each user field lives in Kamailio's tables. This is the written mapping the README
//! documents; change both together.

use crate::pbx::UserField;

/// How a field is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// A row in `usr_preferences` (username, domain, attribute, type 2 = string, value).
    Attribute(&'static str),
    /// `subscriber.ha1` / `ha1b` (digest hashes; the plaintext `password` column stays empty).
    SubscriberHa1,
    /// Rows of `grp` (one per group).
    GroupRows,
    /// The user's first `dbaliases` row (alias_username = the E.164 number).
    PrimaryAlias,
}

pub fn storage(field: UserField) -> Storage {
    use Storage::Attribute as A;
    match field {
        UserField::FirstName => A("pbx.first_name"),
        UserField::LastName => A("pbx.last_name"),
        UserField::Email => A("pbx.email"),
        UserField::Role => A("pbx.role"),
        UserField::CallGroup => A("pbx.call_group"),
        UserField::PickupGroup => A("pbx.pickup_group"),
        UserField::VoicemailPin => A("pbx.voicemail_pin"),
        UserField::Locked => A("pbx.locked"),
        UserField::CallerIdPolicy => A("pbx.caller_id_policy"),
        UserField::VoiceRoutePolicy => A("pbx.voice_route_policy"),
        UserField::EnterpriseVoice => A("pbx.enterprise_voice"),
        UserField::PrimaryNumberLocation => A("pbx.primary_number_location"),
        UserField::PrivateNumber => A("pbx.private_number"),
        UserField::PrivateNumberLocation => A("pbx.private_number_location"),
        UserField::Status => A("pbx.status"),
        UserField::Password => Storage::SubscriberHa1,
        UserField::Groups => Storage::GroupRows,
        UserField::PrimaryNumber => Storage::PrimaryAlias,
    }
}

/// The attribute that holds a user's TOTP secret for the self-care portal; ResetTwoFactor deletes it.
pub const TWO_FACTOR_ATTRIBUTE: &str = "pbx.totp_secret";

/// Attribute value as stored -> canonical value the operator compares and shows.
pub fn canonical(field: UserField, stored: &str) -> String {
    match field {
        UserField::Locked | UserField::EnterpriseVoice => if matches!(stored, "1" | "true" | "yes")
        {
            "true"
        } else {
            "false"
        }
        .to_string(),
        _ => stored.to_string(),
    }
}

/// Canonical value -> what is stored (Kamailio's cfg compares `pbx.locked` with "1").
pub fn stored(field: UserField, canonical: &str) -> String {
    match field {
        UserField::Locked => if canonical == "true" { "1" } else { "0" }.to_string(),
        _ => canonical.to_string(),
    }
}

/// Values a user has when the attribute is absent.
pub fn default_value(field: UserField) -> Option<&'static str> {
    match field {
        UserField::Locked | UserField::EnterpriseVoice => Some("false"),
        UserField::Status => Some("Active"),
        _ => None,
    }
}
