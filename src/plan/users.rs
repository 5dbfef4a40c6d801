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
    /// A secret from a Secret: always written (what is stored is a salted hash or an HA1, not
    /// comparable without the same slow work per user), never shown; plans pin its reference.
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
    /// sha256 over targets, their current values and the intended values; for secret fields
    /// only the Secret's reference (name, key, resourceVersion), never a value or a digest of one.
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

/// What a plan hash records for a secret: where it comes from, never what it is.
pub fn secret_pin(secret: &Secret) -> &str {
    secret.reference().unwrap_or("(secret without a reference)")
}

/// A request's hash (the spec's) extended with the references of the Secrets it reads (name,
/// key, resourceVersion): a Secret changed after validation makes it another request, so the
/// validated plan is not reused and the plan hash moves. Unchanged when no secret is read.
pub fn with_secret_references(spec_hash: &str, intent: &Intent) -> String {
    let references: Vec<String> = intent
        .fields
        .iter()
        .filter_map(|f| match &f.wanted {
            Wanted::Secret(s) => Some(format!("{}\t{}", f.field.name(), secret_pin(s))),
            Wanted::Value(_) => None,
        })
        .collect();
    if references.is_empty() {
        return spec_hash.to_string();
    }
    let mut hasher = Sha256::new();
    hasher.update(spec_hash.as_bytes());
    for r in references {
        hasher.update(b"\n");
        hasher.update(r.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// Builds the plan of users read all at once (small selections, tests): the selection is
/// resolved, then every selected user planned in extension order by a [`Planner`].
pub fn plan(
    read: &UserRead,
    selector: &Selector,
    intent: &Intent,
    supported: &[UserField],
) -> Result<UserPlan, PlanError> {
    let mut planner = Planner::new(intent, supported)?;
    let users: BTreeMap<&str, &User> = read
        .users
        .iter()
        .map(|u| (u.extension.as_str(), u))
        .collect();
    let mut extensions = selection::resolve(selector, users.keys().copied())?;
    extensions.sort_by(|a, b| crate::pbx::extension_order(a, b));
    let targets = extensions
        .iter()
        .map(|e| planner.user(users[e.as_str()]))
        .collect();
    let summary = planner.finish(&read.unknown_extensions);
    Ok(UserPlan {
        targets,
        unknown_extensions: read.unknown_extensions.clone(),
        empty_groups: read.empty_groups.clone(),
        common_values: summary.common_values,
        closed_fields: summary.closed_fields,
        hash: summary.hash,
    })
}

/// Plans users one at a time, in extension order, as they are read: nothing holds the whole
/// selection. A secret field is always written (shown as "(new secret)"): what the PBX stores
/// for it cannot be compared with the desired value cheaply, and its current stored value (a
/// hash) is neither hashed into the plan nor shown.
pub struct Planner<'a> {
    intent: &'a Intent,
    actions: Vec<ActionKind>,
    hasher: Sha256,
    /// Per field named in the change: the first target's shown value, and whether every target
    /// since had the same.
    common: Vec<(UserField, Option<Option<String>>, bool)>,
    targets: usize,
    changing: usize,
    /// The first targets, for status.plan.resolved.
    first: Vec<String>,
}

/// What a [`Planner`] saw, once every user went through it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanSummary {
    pub targets: usize,
    /// Targets with a write or an action.
    pub changing: usize,
    /// The first [`Planner::SHOWN`] targets, in extension order.
    pub first: Vec<String>,
    /// See [`UserPlan::common_values`].
    pub common_values: BTreeMap<String, Option<String>>,
    pub closed_fields: Vec<String>,
    /// See [`UserPlan::hash`].
    pub hash: String,
}

impl<'a> Planner<'a> {
    /// Targets status.plan.resolved lists at most.
    pub const SHOWN: usize = 1000;

    pub fn new(intent: &'a Intent, supported: &[UserField]) -> Result<Planner<'a>, PlanError> {
        intent.check_supported(supported)?;
        let mut actions = intent.actions.clone();
        actions.sort();
        actions.dedup();
        Ok(Planner {
            intent,
            actions,
            hasher: Sha256::new(),
            common: intent
                .fields
                .iter()
                .map(|f| (f.field, None, true))
                .collect(),
            targets: 0,
            changing: 0,
            first: Vec::new(),
        })
    }

    fn line(&mut self, parts: &[&str]) {
        self.hasher.update(parts.join("\t").as_bytes());
        self.hasher.update(b"\n");
    }

    /// Plans the next target (callers go in extension order: the hash follows it).
    pub fn user(&mut self, user: &User) -> PlannedUser {
        for (field, first, same) in self.common.iter_mut() {
            let value = shown(*field, user.get(*field));
            match first {
                None => *first = Some(value),
                Some(f) => *same = *same && *f == value,
            }
        }
        self.line(&["target", &user.extension]);
        let mut writes = Vec::new();
        let intent = self.intent;
        for f in intent.fields.iter().filter(|f| f.open) {
            let current = user.get(f.field);
            match &f.wanted {
                Wanted::Value(v) => {
                    self.line(&[
                        "field",
                        f.field.name(),
                        current.unwrap_or("\u{0}"),
                        v.as_deref().unwrap_or("\u{0}"),
                    ]);
                    if current != v.as_deref() {
                        writes.push(FieldWrite {
                            field: f.field,
                            from: current.map(str::to_string),
                            to: v.clone().map(NewValue::Set).unwrap_or(NewValue::Clear),
                        });
                    }
                }
                Wanted::Secret(s) => {
                    self.line(&["secret", f.field.name(), secret_pin(s)]);
                    writes.push(FieldWrite {
                        field: f.field,
                        // For compare-and-set in memory only: never stored, shown or hashed.
                        from: current.map(str::to_string),
                        to: NewValue::Secret(s.clone()),
                    });
                }
            }
        }
        for a in self.actions.clone() {
            self.line(&["action", a.name()]);
        }
        let planned = PlannedUser {
            extension: user.extension.clone(),
            writes,
            actions: self.actions.clone(),
        };
        self.targets += 1;
        if planned.changes_anything() {
            self.changing += 1;
        }
        if self.first.len() < Self::SHOWN {
            self.first.push(user.extension.clone());
        }
        planned
    }

    /// The plan's summary; `unknown`: listed extensions the PBX does not have, as listed.
    pub fn finish(mut self, unknown: &[String]) -> PlanSummary {
        for e in unknown {
            self.line(&["unknown", e]);
        }
        let common_values = self
            .common
            .iter()
            .filter_map(|(field, first, same)| {
                let first = first.clone()?;
                Some((
                    field.name().to_string(),
                    same.then(|| first.unwrap_or_default()),
                ))
            })
            .collect();
        PlanSummary {
            targets: self.targets,
            changing: self.changing,
            first: self.first,
            common_values,
            closed_fields: self
                .intent
                .fields
                .iter()
                .filter(|f| !f.open)
                .map(|f| f.field.name().to_string())
                .collect(),
            hash: hex::encode(self.hasher.finalize()),
        }
    }
}

/// After a crash, a batch may already be (partly) applied. Drops the writes whose field already
/// holds the planned value; what remains still goes through compare-and-set. A secret write
/// always remains: whether it landed cannot be told from its salted hash, and setting it again
/// is harmless.
pub fn remaining_writes(planned: &PlannedUser, now: &User) -> Vec<FieldWrite> {
    planned
        .writes
        .iter()
        .filter(|w| match &w.to {
            NewValue::Set(v) => now.get(w.field) != Some(v.as_str()),
            NewValue::Clear => now.get(w.field).is_some(),
            NewValue::Secret(_) => true,
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
        let p = plan(&r, &extensions(&["201", "202"]), &intent, &UserField::ALL).unwrap();
        assert!(p.targets[0].writes.is_empty());
        assert_eq!(p.targets[1].writes.len(), 1);
        assert_eq!(p.changing(), 1);
    }

    fn pin_intent(secret: Secret) -> Intent {
        Intent {
            fields: vec![FieldIntent {
                field: UserField::VoicemailPin,
                wanted: Wanted::Secret(secret),
                open: true,
            }],
            actions: vec![],
        }
    }

    /// Users 201 and 202 with stored PIN hashes and HA1s (what the PBX returns for them).
    fn with_secrets(pin_201: &str, ha1_202: &str) -> UserRead {
        read(vec![
            user(
                "201",
                &[
                    (UserField::VoicemailPin, pin_201),
                    (UserField::Password, "ha1:0cc175b9c0f1b6a831c399e269772661"),
                ],
            ),
            user("202", &[(UserField::Password, ha1_202)]),
        ])
    }

    #[test]
    fn secrets_are_always_written_and_never_show() {
        let s = Secret::with_reference("1234", "Secret pins key pin resourceVersion 7");
        let r = with_secrets("pbkdf2-sha256$100000$c2FsdA$aGFzaA", "ha1:x");
        let p = plan(
            &r,
            &extensions(&["201", "202"]),
            &pin_intent(s),
            &UserField::ALL,
        )
        .unwrap();
        for t in &p.targets {
            assert_eq!(t.writes.len(), 1, "a secret cannot be compared: always set");
            assert!(matches!(t.writes[0].to, NewValue::Secret(_)));
            assert_eq!(
                shown_new(t.writes[0].field, &t.writes[0].to).as_deref(),
                Some("(new secret)")
            );
        }
        assert_eq!(
            p.common_values.get("voicemailPin"),
            Some(&None),
            "set / unset"
        );
        assert!(
            !format!("{p:?}").contains("1234"),
            "the secret must not appear in the plan's Debug output"
        );
    }

    #[test]
    fn the_hash_pins_a_secrets_reference_not_its_value() {
        let sel = extensions(&["201", "202"]);
        let reference = "Secret pins key pin resourceVersion 7";
        let h =
            |r: &UserRead, s: Secret| plan(r, &sel, &pin_intent(s), &UserField::ALL).unwrap().hash;
        let r = with_secrets("pbkdf2-sha256$100000$c2FsdA$aGFzaA", "ha1:x");
        let a = h(&r, Secret::with_reference("1234", reference));
        let b = h(&r, Secret::with_reference("987654", reference));
        assert_eq!(a, b, "two PINs with the same Secret reference: one plan");
        let changed = h(
            &r,
            Secret::with_reference("1234", "Secret pins key pin resourceVersion 8"),
        );
        assert_ne!(
            a, changed,
            "the Secret changed after approval: another plan"
        );
        // What the PBX stores for secrets (salted PIN hashes, HA1s) does not feed the hash.
        let other = with_secrets("pbkdf2-sha256$100000$b3RoZXI$b3RoZXI", "ha1:y");
        assert_eq!(a, h(&other, Secret::with_reference("1234", reference)));
    }

    #[test]
    fn no_digest_of_a_pin_reaches_the_plan() {
        use sha2::{Digest, Sha256};
        let pin = "4711";
        let p = plan(
            &with_secrets("x", "ha1:x"),
            &extensions(&["201", "202"]),
            &pin_intent(Secret::with_reference(
                pin,
                "Secret pins key pin resourceVersion 1",
            )),
            &UserField::ALL,
        )
        .unwrap();
        let shown = format!("{p:?}{:?}", p.common_values);
        for ext in ["201", "202"] {
            for domain in ["pbx.test", "acme.test"] {
                let old = hex::encode(Sha256::digest(format!("{domain}:{ext}:{pin}")));
                assert!(!p.hash.contains(&old) && !shown.contains(&old));
            }
        }
        assert!(!shown.contains(pin));
        // The hash is over lines that hold no value of the PIN: the same plan for every PIN.
        for other in ["0000", "123456"] {
            let q = plan(
                &with_secrets("x", "ha1:x"),
                &extensions(&["201", "202"]),
                &pin_intent(Secret::with_reference(
                    other,
                    "Secret pins key pin resourceVersion 1",
                )),
                &UserField::ALL,
            )
            .unwrap();
            assert_eq!(p.hash, q.hash);
        }
    }

    #[test]
    fn request_hashes_move_with_the_secret_not_its_value() {
        let base = "abc";
        assert_eq!(with_secret_references(base, &Intent::default()), base);
        let a = with_secret_references(
            base,
            &pin_intent(Secret::with_reference(
                "1234",
                "Secret pins key pin resourceVersion 1",
            )),
        );
        let b = with_secret_references(
            base,
            &pin_intent(Secret::with_reference(
                "5678",
                "Secret pins key pin resourceVersion 1",
            )),
        );
        let c = with_secret_references(
            base,
            &pin_intent(Secret::with_reference(
                "1234",
                "Secret pins key pin resourceVersion 2",
            )),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, base);
    }

    #[test]
    fn resumed_secret_writes_are_redone() {
        let p = plan(
            &with_secrets("x", "ha1:x"),
            &extensions(&["201"]),
            &pin_intent(Secret::new("1234")),
            &UserField::ALL,
        )
        .unwrap();
        let now = user("201", &[(UserField::VoicemailPin, "anything")]);
        assert_eq!(remaining_writes(&p.targets[0], &now).len(), 1);
    }

    #[test]
    fn hash_pins_targets_values_and_intent() {
        let intent = Intent {
            fields: vec![field(UserField::CallGroup, "3", true)],
            actions: vec![],
        };
        let sel = extensions(&["201", "202"]);
        let h = |r: &UserRead, i: &Intent| plan(r, &sel, i, &UserField::ALL).unwrap().hash;
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
        let p = plan(&seed(), &sel, &intent, &UserField::ALL).unwrap();
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
            plan(&seed(), &too_many, &intent, &UserField::ALL),
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
        let p = plan(&seed(), &extensions(&["201"]), &intent, &UserField::ALL).unwrap();
        let after_crash = user(
            "201",
            &[(UserField::CallGroup, "3"), (UserField::PickupGroup, "3")],
        );
        let left = remaining_writes(&p.targets[0], &after_crash);
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
