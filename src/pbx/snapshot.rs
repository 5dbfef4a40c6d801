//! Snapshots of users, kept before a Remove or a UserRecycle takes them away, so that a revert
//! can bring them back. A snapshot holds everything of a user but its credentials: the SIP
//! secret (HA1), the voicemail PIN's hash and the second factor are never kept.
//!
//! Snapshots live in the PBX's own database, beside the data they copy, under the run that
//! took them (its ledger id): whoever may read them could already read the user there, and no
//! copy of personal data enters Kubernetes. They expire after the PbxConnection's retention:
//! the data is deleted, a marker of when it expired stays, so a late revert can say why it
//! cannot restore the user.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One `usr_preferences` row of a user, as stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Preference {
    pub attribute: String,
    /// Kamailio's `type` column: 0 integer, 2 string.
    #[serde(rename = "type")]
    pub kind: i64,
    pub value: String,
}

/// What a user was before a Remove or a recycle, without credentials.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct UserSnapshot {
    pub extension: String,
    /// Every preference but the secret ones, in (attribute, value) order.
    #[serde(default)]
    pub preferences: Vec<Preference>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// The routing aliases (numbers), the primary first.
    #[serde(default)]
    pub numbers: Vec<String>,
    /// The phones the user owned (`pbx_phone.id`).
    #[serde(default)]
    pub phones: Vec<i64>,
    /// The private number among the preferences, named by the backend that took the snapshot:
    /// a revert checks who holds it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_number: Option<String>,
}

impl UserSnapshot {
    /// sha256 of the snapshot as stored: a plan that restores it pins this, so a snapshot
    /// changed after the review is not restored.
    pub fn digest(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        hex::encode(Sha256::digest(json.as_bytes()))
    }

    /// Every number of the user: the aliases, then the private number.
    pub fn all_numbers(&self) -> impl Iterator<Item = &String> {
        self.numbers.iter().chain(self.private_number.iter())
    }

    /// The value of one preference, if the user had it.
    pub fn preference(&self, attribute: &str) -> Option<&str> {
        self.preferences
            .iter()
            .find(|p| p.attribute == attribute)
            .map(|p| p.value.as_str())
    }
}

/// A snapshot as kept for a run: when it was taken, and its data unless it expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptSnapshot {
    /// The run it was kept under.
    pub run: String,
    pub extension: String,
    /// Unix milliseconds.
    pub taken: i64,
    /// None: expired (deleted after the connection's retention) at `expired`.
    pub snapshot: Option<UserSnapshot>,
    pub expired: Option<i64>,
    /// The run that restored the user from it, if one did.
    pub restored_by: Option<String>,
    /// The user's fields as the snapshot holds them (what a restore brings back), read by the
    /// backend that took it; None when expired.
    pub user: Option<crate::pbx::User>,
}

/// What the user must look like now for a restore to go ahead (compare-and-set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The extension must not exist (a Remove is reverted): it is created anew.
    Absent,
    /// The extension must exist with these values (None: unset), as the change being
    /// reverted left them (a recycle is reverted).
    Present(Vec<(crate::pbx::UserField, Option<String>)>),
}

/// One user to bring back from its snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRestore {
    /// The run that kept the snapshot.
    pub run: String,
    /// The run that restores (recorded with the restore, so that run finds it done).
    pub by: String,
    pub snapshot: UserSnapshot,
    pub expect: Expect,
}

/// What became of one restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// Committed. `conflicts`: what was held by someone else meanwhile and left to them (a
    /// number, a phone), each said in a sentence; the rest is restored.
    Restored {
        conflicts: Vec<String>,
    },
    /// Restored already by the same run (`by`), before a restart: nothing written again.
    AlreadyRestored,
    /// Nothing written: the user is not as expected (exists again, or changed since).
    Conflict(String),
    Failed(String),
}
