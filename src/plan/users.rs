//! The user plan: from what the PBX holds and what a change asks, compute the values the
//! selection shares, what each user would get (Open fields only), and a hash that pins it all.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use super::PlanError;
use super::selection::{self, Selector};
use crate::pbx::{FieldWrite, NewValue, Secret, User, UserChange, UserField, UserRead};

/// What a change asks of one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// A canonical value; None clears the field.
    Value(Option<String>),
    /// A secret from a Secret; compared through its fingerprint, never shown.
    Secret(Secret),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldIntent {
    pub field: UserField,
    pub wanted: Wanted,
    /// Only Open fields are ever written; Closed ones are shown in commonValues.
    pub open: bool,
}

/// One-shot actions, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ActionKind {
    Unlock,
    ResetTwoFactor,
    ResetPassword,
    SendWelcomeEmail,
    Lock,
    Remove,
}

impl ActionKind {
    pub fn name(self) -> &'static str {
        match self {
            ActionKind::Unlock => "Unlock",
            ActionKind::ResetTwoFactor => "ResetTwoFactor",
            ActionKind::ResetPassword => "ResetPassword",
            ActionKind::SendWelcomeEmail => "SendWelcomeEmail",
            ActionKind::Lock => "Lock",
            ActionKind::Remove => "Remove",
        }
    }
}

/// Everything a change asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intent {
    pub fields: Vec<FieldIntent>,
    pub actions: Vec<ActionKind>,
}

impl Intent {
    /// A field the backend cannot store is refused before anything is planned, not dropped.
    pub fn check_supported(&self, supported: &[UserField]) -> Result<(), PlanError> {
        match self.fields.iter().find(|f| !supported.contains(&f.field)) {
            Some(f) => Err(PlanError::UnsupportedField {
                field: f.field.name().into(),
                supported: supported
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
            None => Ok(()),
        }
    }
}

/// One user in a plan: the writes its Open fields need and the actions it gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedUser {
    pub extension: String,
    pub writes: Vec<FieldWrite>,
    pub actions: Vec<ActionKind>,
}

impl PlannedUser {
    pub fn changes_anything(&self) -> bool {
        !self.writes.is_empty() || !self.actions.is_empty()
    }

    pub fn change(&self) -> Option<UserChange> {
        (!self.writes.is_empty()).then(|| UserChange {
            extension: self.extension.clone(),
            writes: self.writes.clone(),
            takes: vec![],
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPlan {
    /// Every resolved target, in extension order.
    pub targets: Vec<PlannedUser>,
    /// Listed extensions the PBX does not have: reported per target, not fatal.
    pub unknown_extensions: Vec<String>,
    /// Listed groups without members.
    pub empty_groups: Vec<String>,
    /// Per field named in the change: the value all targets share ("" when all are unset),
    /// or None where they differ. Secrets show only whether they are set.
    pub common_values: BTreeMap<String, Option<String>>,
    pub closed_fields: Vec<String>,
    /// sha256 over targets, their current values and the intended values.
    pub hash: String,
}

impl UserPlan {
    pub fn changing(&self) -> usize {
        self.targets.iter().filter(|t| t.changes_anything()).count()
    }
}

/// How a value is shown in status, results and events: secrets only as set or unset.
pub fn shown(field: UserField, value: Option<&str>) -> Option<String> {
    match (field.is_secret(), value) {
        (true, Some(_)) => Some("(set)".into()),
        (true, None) => None,
        (false, v) => v.map(str::to_string),
    }
}

/// The text a new value is shown as.
pub fn shown_new(field: UserField, to: &NewValue) -> Option<String> {
    match to {
        NewValue::Set(v) => shown(field, Some(v)),
        NewValue::Clear => None,
        NewValue::Secret(_) => Some("(new secret)".into()),
    }
}

/// Canonical form of a group list: sorted, unique, comma-separated.
pub fn canonical_groups<'a>(groups: impl IntoIterator<Item = &'a str>) -> String {
    groups
        .into_iter()
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
        .join(",")
}

/// Builds the plan. `fingerprint(extension, field, secret)` says how the backend would store a
/// secret, so a secret that is already in place is not rewritten.
pub fn plan(
    read: &UserRead,
    selector: &Selector,
    intent: &Intent,
    supported: &[UserField],
    fingerprint: &dyn Fn(&str, UserField, &Secret) -> String,
) -> Result<UserPlan, PlanError> {
    intent.check_supported(supported)?;
    let users: BTreeMap<&str, &User> = read
        .users
        .iter()
        .map(|u| (u.extension.as_str(), u))
        .collect();
    let mut extensions = selection::resolve(selector, users.keys().copied())?;
    extensions.sort_by(|a, b| selection::extension_order(a, b));
    let selected: Vec<&User> = extensions.iter().map(|e| users[e.as_str()]).collect();

    let mut common_values = BTreeMap::new();
    for f in &intent.fields {
        let mut values = selected.iter().map(|u| shown(f.field, u.get(f.field)));
        if let Some(first) = values.next() {
            let same = values.all(|v| v == first);
            common_values.insert(
                f.field.name().to_string(),
                same.then(|| first.unwrap_or_default()),
            );
        }
    }
    let closed_fields = intent
        .fields
        .iter()
        .filter(|f| !f.open)
        .map(|f| f.field.name().to_string())
        .collect();

    let mut hasher = Sha256::new();
    let mut line = |parts: &[&str]| {
        hasher.update(parts.join("\t").as_bytes());
        hasher.update(b"\n");
    };
    let mut targets = Vec::with_capacity(selected.len());
    for user in selected {
        line(&["target", &user.extension]);
        let mut writes = Vec::new();
        for f in intent.fields.iter().filter(|f| f.open) {
            let current = user.get(f.field);
            let (wanted_as_stored, to) = match &f.wanted {
                Wanted::Value(v) => (
                    v.clone(),
                    v.clone().map(NewValue::Set).unwrap_or(NewValue::Clear),
                ),
                Wanted::Secret(s) => (
                    Some(fingerprint(&user.extension, f.field, s)),
                    NewValue::Secret(s.clone()),
                ),
            };
            line(&[
                "field",
                f.field.name(),
                current.unwrap_or("\u{0}"),
                wanted_as_stored.as_deref().unwrap_or("\u{0}"),
            ]);
            if current != wanted_as_stored.as_deref() {
                writes.push(FieldWrite {
                    field: f.field,
                    from: current.map(str::to_string),
                    to,
                });
            }
        }
        let mut actions = intent.actions.clone();
        actions.sort();
        actions.dedup();
        for a in &actions {
            line(&["action", a.name()]);
        }
        targets.push(PlannedUser {
            extension: user.extension.clone(),
            writes,
            actions,
        });
    }
    for unknown in &read.unknown_extensions {
        line(&["unknown", unknown]);
    }
    Ok(UserPlan {
        targets,
        unknown_extensions: read.unknown_extensions.clone(),
        empty_groups: read.empty_groups.clone(),
        common_values,
        closed_fields,
        hash: hex::encode(hasher.finalize()),
    })
}

/// After a crash, a batch may already be (partly) applied. Drops the writes whose field already
/// holds the planned value; what remains still goes through compare-and-set.
pub fn remaining_writes(
    planned: &PlannedUser,
    now: &User,
    fingerprint: &dyn Fn(&str, UserField, &Secret) -> String,
) -> Vec<FieldWrite> {
    planned
        .writes
        .iter()
        .filter(|w| {
            let target = match &w.to {
                NewValue::Set(v) => Some(v.clone()),
                NewValue::Clear => None,
                NewValue::Secret(s) => Some(fingerprint(&planned.extension, w.field, s)),
            };
            now.get(w.field) != target.as_deref()
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(ext: &str, values: &[(UserField, &str)]) -> User {
        User {
            extension: ext.into(),
            values: values.iter().map(|(f, v)| (*f, v.to_string())).collect(),
            numbers: vec![],
        }
    }

    fn read(users: Vec<User>) -> UserRead {
        UserRead {
            users,
            ..Default::default()
        }
    }

    fn field(field: UserField, value: &str, open: bool) -> FieldIntent {
        FieldIntent {
            field,
            wanted: Wanted::Value(Some(value.into())),
            open,
        }
    }

    fn fp(ext: &str, field: UserField, s: &Secret) -> String {
        format!("fp:{ext}:{}:{}", field.name(), s.expose())
    }

    fn extensions(exts: &[&str]) -> Selector {
        Selector {
            extensions: exts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The seed's example: 201 and 202 have different call groups.
    fn seed() -> UserRead {
        read(vec![
            user(
                "201",
                &[(UserField::CallGroup, "1"), (UserField::PickupGroup, "3")],
            ),
            user(
                "202",
                &[(UserField::CallGroup, "2"), (UserField::PickupGroup, "3")],
            ),
        ])
    }

    #[test]
    fn seed_mixed_values_show_null() {
        let intent = Intent {
            fields: vec![field(UserField::CallGroup, "3", false)],
            actions: vec![],
        };
        let p = plan(
            &seed(),
            &extensions(&["201", "202"]),
            &intent,
            &UserField::ALL,
            &fp,
        )
        .unwrap();
        assert_eq!(
            p.common_values.get("callGroup"),
            Some(&None),
            "differing call groups show as mixed"
        );
    }

    #[test]
    fn seed_closed_lock_leaves_both() {
        let intent = Intent {
            fields: vec![field(UserField::CallGroup, "3", false)],
            actions: vec![],
        };
        let p = plan(
            &seed(),
            &extensions(&["201", "202"]),
            &intent,
            &UserField::ALL,
            &fp,
        )
        .unwrap();
        assert!(p.targets.iter().all(|t| t.writes.is_empty()));
        assert_eq!(p.closed_fields, ["callGroup"]);
        assert_eq!(p.changing(), 0);
    }

    #[test]
    fn seed_open_lock_sets_both() {
        let intent = Intent {
            fields: vec![
                field(UserField::CallGroup, "3", true),
                field(UserField::PickupGroup, "3", false),
            ],
            actions: vec![],
        };
        let p = plan(
            &seed(),
            &extensions(&["201", "202"]),
            &intent,
            &UserField::ALL,
            &fp,
        )
        .unwrap();
        let writes: Vec<_> = p
            .targets
            .iter()
            .map(|t| (t.extension.as_str(), t.writes.clone()))
            .collect();
        assert_eq!(
            writes,
            [
                (
                    "201",
                    vec![FieldWrite {
                        field: UserField::CallGroup,
                        from: Some("1".into()),
                        to: NewValue::Set("3".into())
                    }]
                ),
                (
                    "202",
                    vec![FieldWrite {
                        field: UserField::CallGroup,
                        from: Some("2".into()),
                        to: NewValue::Set("3".into())
                    }]
                ),
            ]
        );
        assert_eq!(
            p.common_values.get("pickupGroup"),
            Some(&Some("3".into())),
            "shared values show"
        );
    }

    #[test]
    fn unchanged_targets_have_no_writes() {
        let r = read(vec![
            user("201", &[(UserField::Role, "Admin")]),
            user("202", &[(UserField::Role, "User")]),
        ]);
        let intent = Intent {
            fields: vec![field(UserField::Role, "Admin", true)],
            actions: vec![],
        };
        let p = plan(
            &r,
            &extensions(&["201", "202"]),
            &intent,
            &UserField::ALL,
            &fp,
        )
        .unwrap();
        assert!(p.targets[0].writes.is_empty());
        assert_eq!(p.targets[1].writes.len(), 1);
        assert_eq!(p.changing(), 1);
    }

    #[test]
    fn secrets_compare_by_fingerprint_and_never_show() {
        let s = Secret::new("1234");
        let r = read(vec![
            user(
                "201",
                &[(UserField::VoicemailPin, "fp:201:voicemailPin:1234")],
            ),
            user(
                "202",
                &[(UserField::VoicemailPin, "fp:202:voicemailPin:0000")],
            ),
        ]);
        let intent = Intent {
            fields: vec![FieldIntent {
                field: UserField::VoicemailPin,
                wanted: Wanted::Secret(s),
                open: true,
            }],
            actions: vec![],
        };
        let p = plan(
            &r,
            &extensions(&["201", "202"]),
            &intent,
            &UserField::ALL,
            &fp,
        )
        .unwrap();
        assert!(
            p.targets[0].writes.is_empty(),
            "the same PIN is not rewritten"
        );
        assert_eq!(p.targets[1].writes.len(), 1);
        assert_eq!(
            p.common_values.get("voicemailPin"),
            Some(&Some("(set)".into()))
        );
        assert!(
            !format!("{p:?}").contains("1234"),
            "the secret must not appear in the plan's Debug output"
        );
    }

    #[test]
    fn hash_pins_targets_values_and_intent() {
        let intent = Intent {
            fields: vec![field(UserField::CallGroup, "3", true)],
            actions: vec![],
        };
        let sel = extensions(&["201", "202"]);
        let h = |r: &UserRead, i: &Intent| plan(r, &sel, i, &UserField::ALL, &fp).unwrap().hash;
        let base = h(&seed(), &intent);
        assert_eq!(base, h(&seed(), &intent), "deterministic");
        assert_eq!(base.len(), 64);
        let mut moved = seed();
        moved.users[0]
            .values
            .insert(UserField::CallGroup, "9".into());
        assert_ne!(base, h(&moved, &intent), "a current value moved");
        let other = Intent {
            fields: vec![field(UserField::CallGroup, "4", true)],
            actions: vec![],
        };
        assert_ne!(base, h(&seed(), &other), "the intended value changed");
        let fewer = UserRead {
            users: vec![seed().users[0].clone()],
            ..Default::default()
        };
        assert_ne!(base, h(&fewer, &intent), "the targets changed");
        let with_action = Intent {
            actions: vec![ActionKind::Unlock],
            ..intent.clone()
        };
        assert_ne!(base, h(&seed(), &with_action), "actions count");
        let closed = Intent {
            fields: vec![field(UserField::CallGroup, "3", false)],
            actions: vec![],
        };
        assert_ne!(
            base,
            h(&seed(), &closed),
            "opening or closing a lock changes the plan"
        );
    }

    #[test]
    fn unknown_extensions_are_reported_not_fatal() {
        let r = UserRead {
            users: seed().users,
            unknown_extensions: vec!["299".into()],
            empty_groups: vec!["ghosts".into()],
        };
        let intent = Intent {
            fields: vec![],
            actions: vec![ActionKind::Unlock],
        };
        let p = plan(
            &r,
            &extensions(&["201", "202", "299"]),
            &intent,
            &UserField::ALL,
            &fp,
        )
        .unwrap();
        assert_eq!(p.targets.len(), 2);
        assert_eq!(p.unknown_extensions, ["299"]);
        assert_eq!(p.empty_groups, ["ghosts"]);
    }

    #[test]
    fn unsupported_fields_are_refused_with_the_supported_list() {
        let intent = Intent {
            fields: vec![field(UserField::Role, "Admin", true)],
            actions: vec![],
        };
        let err = plan(
            &seed(),
            &extensions(&["201"]),
            &intent,
            &[UserField::CallGroup],
            &fp,
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot store field role"), "{err}");
        assert!(err.to_string().contains("callGroup"), "{err}");
    }

    #[test]
    fn exclude_and_max_targets_apply() {
        let sel = Selector {
            exclude: vec!["201".into()],
            max_targets: Some(1),
            ..extensions(&["201", "202"])
        };
        let intent = Intent {
            fields: vec![field(UserField::CallGroup, "3", true)],
            actions: vec![],
        };
        let p = plan(&seed(), &sel, &intent, &UserField::ALL, &fp).unwrap();
        assert_eq!(
            p.targets
                .iter()
                .map(|t| t.extension.as_str())
                .collect::<Vec<_>>(),
            ["202"]
        );
        let too_many = Selector {
            max_targets: Some(1),
            ..extensions(&["201", "202"])
        };
        assert!(matches!(
            plan(&seed(), &too_many, &intent, &UserField::ALL, &fp),
            Err(PlanError::TooManyTargets { .. })
        ));
    }

    #[test]
    fn resumed_batches_skip_what_is_already_applied() {
        let intent = Intent {
            fields: vec![
                field(UserField::CallGroup, "3", true),
                field(UserField::Role, "Admin", true),
            ],
            actions: vec![],
        };
        let p = plan(
            &seed(),
            &extensions(&["201"]),
            &intent,
            &UserField::ALL,
            &fp,
        )
        .unwrap();
        let after_crash = user(
            "201",
            &[(UserField::CallGroup, "3"), (UserField::PickupGroup, "3")],
        );
        let left = remaining_writes(&p.targets[0], &after_crash, &fp);
        assert_eq!(
            left.iter().map(|w| w.field).collect::<Vec<_>>(),
            [UserField::Role]
        );
    }

    #[test]
    fn groups_are_canonical() {
        assert_eq!(
            canonical_groups(["support", " sales", "support", ""]),
            "sales,support"
        );
    }
}
