//! Planning a UserRecycle: which users are reset, which are given to new people, what each
//! reset clears (as people read it, never a secret), and the typed steps each target goes
//! through: [`StepKind::Reset`], [`StepKind::DropRegistrations`], then for a new person
//! [`StepKind::Recycle`] and the [`StepKind::WelcomeMail`]. Pure: the PBX's users and phones
//! come in, stored rows and the plan's hash go out; the engine executes the rows.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::api::user_recycle::{RecycleEntry, ResetItem, UserRecycleSpec};
use crate::api::{FieldChange, Outcome, Plan};
pub use crate::pbx::kamailio::recycle::{PASSWORD_REQUIRED, SETUP_REQUIRED};
use crate::pbx::{NewIdentity, Phone, ResetPart, User, UserField, extension_order};
use crate::plan::stored::{OnResume, Row, Step, StepKind, StepState, StoredWrite};
use crate::plan::users as user_plan;

/// The steps of a target, as the result CSV's `actions` column names them.
pub const ACTION_RESET: &str = "Reset";
pub const ACTION_RECYCLE: &str = "Recycle";
pub const ACTION_MAIL: &str = "SendWelcomeEmail";

const NEW_SECRET: &str = "(new secret)";

/// The reset parts a spec names, in a fixed order.
pub fn reset_parts(items: &[ResetItem]) -> Vec<ResetPart> {
    items
        .iter()
        .map(|i| match i {
            ResetItem::Name => ResetPart::Name,
            ResetItem::Email => ResetPart::Email,
            ResetItem::Password => ResetPart::Password,
            ResetItem::VoicemailPin => ResetPart::VoicemailPin,
            ResetItem::Devices => ResetPart::Devices,
            ResetItem::Role => ResetPart::Role,
            ResetItem::Groups => ResetPart::Groups,
            ResetItem::Numbers => ResetPart::Numbers,
            ResetItem::CallGroup => ResetPart::CallGroup,
            ResetItem::PickupGroup => ResetPart::PickupGroup,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

pub fn new_identity(entry: &RecycleEntry) -> NewIdentity {
    NewIdentity {
        extension: entry.extension.clone(),
        first_name: entry.first_name.clone().unwrap_or_default(),
        last_name: entry.last_name.clone().unwrap_or_default(),
        email: entry.email.clone().filter(|e| !e.is_empty()),
    }
}

/// The new identity, stored in the row so a resumed run acts on exactly what was planned.
pub fn identity_writes(id: &NewIdentity) -> Vec<StoredWrite> {
    [
        (UserField::FirstName, Some(&id.first_name)),
        (UserField::LastName, Some(&id.last_name)),
        (UserField::Email, id.email.as_ref()),
    ]
    .into_iter()
    .map(|(field, to)| StoredWrite {
        field: field.name().into(),
        from: None,
        to: to.cloned(),
        secret: false,
    })
    .collect()
}

/// The new identity a row plans, if it gives the extension to someone.
pub fn identity_of(row: &Row) -> Option<NewIdentity> {
    let get = |f: UserField| {
        row.writes
            .iter()
            .find(|w| w.field == f.name())
            .and_then(|w| w.to.clone())
    };
    Some(NewIdentity {
        extension: row.target.clone(),
        first_name: get(UserField::FirstName)?,
        last_name: get(UserField::LastName)?,
        email: get(UserField::Email),
    })
}

/// The user already is the new person, waiting for their password: a recycle that happened
/// (and so did its reset, which must never run again: it would wipe the new person's data).
pub fn already_recycled(user: &User, id: &NewIdentity) -> bool {
    user.get(UserField::Status) == Some(PASSWORD_REQUIRED)
        && user.get(UserField::FirstName) == Some(id.first_name.as_str())
        && user.get(UserField::LastName) == Some(id.last_name.as_str())
        && user.get(UserField::Email) == id.email.as_deref()
}

fn cut(s: String) -> String {
    if s.len() <= 1000 {
        s
    } else {
        let end = (0..=997)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}...", &s[..end])
    }
}

/// What a reset of `user` clears, as people read it (secrets as "(set)").
pub fn reset_changes(user: &User, phones: &[Phone], parts: &[ResetPart]) -> Vec<FieldChange> {
    let mut out = Vec::new();
    let clear = |out: &mut Vec<FieldChange>, field: UserField| {
        if let Some(from) = user_plan::shown(field, user.get(field)) {
            out.push(FieldChange {
                field: field.name().into(),
                from: Some(cut(from)),
                to: None,
            });
        }
    };
    for part in parts {
        match part {
            ResetPart::Name => {
                clear(&mut out, UserField::FirstName);
                clear(&mut out, UserField::LastName);
            }
            ResetPart::Email => clear(&mut out, UserField::Email),
            ResetPart::Password => out.push(FieldChange {
                field: UserField::Password.name().into(),
                from: user_plan::shown(UserField::Password, user.get(UserField::Password)),
                to: Some(NEW_SECRET.into()),
            }),
            ResetPart::VoicemailPin => clear(&mut out, UserField::VoicemailPin),
            ResetPart::Devices if !phones.is_empty() => out.push(FieldChange {
                field: "devices".into(),
                from: Some(cut(phones
                    .iter()
                    .map(|p| format!("{} ({} {})", p.mac, p.vendor, p.model))
                    .collect::<Vec<_>>()
                    .join(", "))),
                to: None,
            }),
            ResetPart::Devices => {}
            ResetPart::Role => clear(&mut out, UserField::Role),
            ResetPart::Groups => clear(&mut out, UserField::Groups),
            ResetPart::Numbers => {
                if !user.numbers.is_empty() {
                    out.push(FieldChange {
                        field: "numbers".into(),
                        from: Some(cut(user.numbers.join(","))),
                        to: None,
                    });
                }
                clear(&mut out, UserField::PrimaryNumberLocation);
                clear(&mut out, UserField::PrivateNumber);
                clear(&mut out, UserField::PrivateNumberLocation);
            }
            ResetPart::CallGroup => clear(&mut out, UserField::CallGroup),
            ResetPart::PickupGroup => clear(&mut out, UserField::PickupGroup),
        }
    }
    let status = user.get(UserField::Status);
    if status != Some(SETUP_REQUIRED) {
        out.push(FieldChange {
            field: UserField::Status.name().into(),
            from: status.map(str::to_string),
            to: Some(SETUP_REQUIRED.into()),
        });
    }
    out
}

/// Folds the recycle into `changes` (those of the reset): one entry per field, from the value
/// before the reset to the value after the recycle. `before` is the user before the recycle
/// (for the plan, before the reset). Folding the same recycle twice changes nothing.
pub fn merge_recycle(changes: &mut Vec<FieldChange>, before: &User, id: &NewIdentity) {
    let was = |f: UserField| before.get(f).map(str::to_string);
    let updates = [
        (
            UserField::FirstName,
            was(UserField::FirstName),
            Some(id.first_name.clone()),
        ),
        (
            UserField::LastName,
            was(UserField::LastName),
            Some(id.last_name.clone()),
        ),
        (UserField::Email, was(UserField::Email), id.email.clone()),
        (
            UserField::VoicemailPin,
            user_plan::shown(UserField::VoicemailPin, before.get(UserField::VoicemailPin)),
            None,
        ),
        (
            UserField::Password,
            user_plan::shown(UserField::Password, before.get(UserField::Password)),
            Some(NEW_SECRET.into()),
        ),
        (
            UserField::Status,
            was(UserField::Status),
            Some(PASSWORD_REQUIRED.into()),
        ),
    ];
    for (field, from, to) in updates {
        match changes.iter_mut().find(|c| c.field == field.name()) {
            Some(c) => c.to = to,
            None => changes.push(FieldChange {
                field: field.name().into(),
                from,
                to,
            }),
        }
    }
    // The password always changes (a new secret), even when it was shown as unset before.
    changes.retain(|c| c.from != c.to || c.field == UserField::Password.name());
}

/// The steps of a target: reset and drop its registrations; for a new person, the recycle and
/// (when asked for) the welcome email.
pub fn recycle_steps(recycled: bool, welcome: bool) -> Vec<Step> {
    let mut kinds = vec![StepKind::Reset, StepKind::DropRegistrations];
    if recycled {
        kinds.push(StepKind::Recycle);
        if welcome {
            kinds.push(StepKind::WelcomeMail);
        }
    }
    kinds.into_iter().map(Step::pending).collect()
}

/// Steps for a row stored before steps were recorded (an operator upgraded mid-run), from its
/// actions. A row already InProgress has begun them all: resets are redone after the check that
/// the user is not recycled yet, and a mail that may have gone out is reported uncertain.
pub fn legacy_steps(row: &Row) -> Vec<Step> {
    let has = |a: &str| row.actions.iter().any(|x| x == a);
    let mut steps = recycle_steps(has(ACTION_RECYCLE), has(ACTION_MAIL));
    if row.outcome == Outcome::InProgress {
        for s in steps.iter_mut() {
            s.state = StepState::Intended;
        }
    }
    steps
}

/// A retry of a target whose reset went through: it keeps the steps done (the reset is not
/// repeated) and redoes exactly those that failed, are uncertain, or were not reached (an
/// uncertain welcome mail is sent). A step begun by a run still going is left begun, for the
/// engine's resume rules. None when the reset did not go through (the target is planned afresh)
/// or nothing is left to redo.
pub fn retry_steps(steps: &[Step]) -> Option<Vec<Step>> {
    let reset_done = steps
        .iter()
        .any(|s| s.kind == StepKind::Reset && matches!(s.state, StepState::Done | StepState::NoOp));
    if !reset_done {
        return None;
    }
    let again: Vec<Step> = steps
        .iter()
        .map(|s| match s.state {
            StepState::Done | StepState::NoOp | StepState::Intended => *s,
            _ => Step::pending(s.kind),
        })
        .collect();
    again.iter().any(|s| !s.state.is_final()).then_some(again)
}

/// What a run plans for: the targets to read from the PBX, and on a retry what it keeps.
#[derive(Debug, Default)]
pub struct Scope {
    /// Targets planned (again), each once; their users and phones are read.
    pub targets: Vec<String>,
    /// A retry: the earlier rows that finished well, kept as they are.
    pub kept: Vec<Row>,
    /// A retry: the earlier rows of the targets planned again.
    pub earlier: HashMap<String, Row>,
}

/// Every target of the spec; with the rows of an earlier run of the same spec (a retry), only
/// the targets that failed, are uncertain or did not finish.
pub fn scope(spec: &UserRecycleSpec, earlier: Option<Vec<Row>>) -> Scope {
    let Some(rows) = earlier else {
        let targets: Vec<String> = spec
            .targets
            .iter()
            .flat_map(|t| t.extensions.iter())
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        return Scope {
            targets,
            ..Default::default()
        };
    };
    let (redo, kept): (Vec<Row>, Vec<Row>) = rows
        .into_iter()
        .partition(|r| r.is_failure() || !r.is_final());
    Scope {
        targets: redo.iter().map(|r| r.target.clone()).collect(),
        kept,
        earlier: redo.into_iter().map(|r| (r.target.clone(), r)).collect(),
    }
}

/// The rows of a run (one per target, kept ones included, in extension order) and its plan for
/// status: the hash covers the reset, the targets with their current values (no secret), phones
/// and new identities. `users` and `phones`: what the PBX holds for `scope.targets`.
pub fn plan(
    spec: &UserRecycleSpec,
    generation: i64,
    scope: Scope,
    users: &[User],
    phones: &[Phone],
) -> (Vec<Row>, Plan) {
    let parts = reset_parts(&spec.reset);
    let entries: BTreeMap<&str, &RecycleEntry> = spec
        .recycle
        .iter()
        .map(|e| (e.extension.as_str(), e))
        .collect();
    let users: BTreeMap<&str, &User> = users.iter().map(|u| (u.extension.as_str(), u)).collect();
    let mut phones_of: BTreeMap<&str, Vec<Phone>> = BTreeMap::new();
    for p in phones {
        if let Some(owner) = p.owner.as_deref() {
            phones_of.entry(owner).or_default().push(p.clone());
        }
    }
    let mut hashed = Vec::new();
    let mut rows = Vec::new();
    for ext in &scope.targets {
        let identity = entries.get(ext.as_str()).map(|e| new_identity(e));
        let welcome = identity.is_some() && spec.send_welcome_email;
        let mut actions = vec![ACTION_RESET.to_string()];
        if identity.is_some() {
            actions.push(ACTION_RECYCLE.into());
        }
        if welcome {
            actions.push(ACTION_MAIL.into());
        }
        let mut row = Row {
            target: ext.clone(),
            outcome: Outcome::Planned,
            writes: identity.as_ref().map(identity_writes).unwrap_or_default(),
            actions,
            steps: recycle_steps(identity.is_some(), welcome),
            ..Default::default()
        };
        let Some(user) = users.get(ext.as_str()) else {
            row.notes
                .push(format!("extension {ext} does not exist on the PBX"));
            settle(&mut row, Outcome::Failed, StepState::Failed);
            hashed.push(json!({ "target": ext, "missing": true }));
            rows.push(row);
            continue;
        };
        let owned = phones_of
            .get(ext.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        hashed.push(json!({
            "target": ext,
            // Secret fields (HA1, PIN hash) stay out of the hash in status.
            "values": user.values.iter().filter(|(f, _)| !f.is_secret()).collect::<BTreeMap<_, _>>(),
            "numbers": user.numbers,
            "phones": owned.iter().map(|p| &p.mac).collect::<Vec<_>>(),
            "recycle": identity.as_ref().map(|i| (&i.first_name, &i.last_name, &i.email)),
        }));
        let carried = scope
            .earlier
            .get(ext)
            .and_then(|old| Some((old, retry_steps(&old.steps)?)));
        if let Some((old, steps)) = carried {
            // A retry keeps the steps already done and the changes they made.
            let kept: Vec<&str> = steps
                .iter()
                .filter(|s| matches!(s.state, StepState::Done | StepState::NoOp))
                .map(|s| s.kind.name())
                .collect();
            row.notes.push(format!(
                "kept from the earlier attempt, not done again: {}",
                kept.join(", ")
            ));
            row.changes = old.changes.clone();
            row.steps = steps;
            rows.push(row);
            continue;
        }
        if let Some(id) = identity.as_ref().filter(|id| already_recycled(user, id)) {
            row.notes.push(format!(
                "already given to {} {} (status {PASSWORD_REQUIRED}): not reset again, so nothing the new person set up is lost",
                id.first_name, id.last_name
            ));
            settle(&mut row, Outcome::Unchanged, StepState::NoOp);
            rows.push(row);
            continue;
        }
        row.changes = reset_changes(user, owned, &parts);
        if let Some(id) = &identity {
            merge_recycle(&mut row.changes, user, id);
        }
        rows.push(row);
    }
    let digest = json!({
        "reset": parts.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>(),
        "sendWelcomeEmail": spec.send_welcome_email,
        "targets": hashed,
    });
    let planned = rows
        .iter()
        .filter(|r| r.outcome == Outcome::Planned)
        .count();
    let plan = Plan {
        hash: hex::encode(Sha256::digest(digest.to_string().as_bytes())),
        generation,
        targets: scope.targets.len() as u32,
        resolved: scope.targets.iter().take(1000).cloned().collect(),
        changes: planned as u32,
        ..Default::default()
    };
    let mut all = scope.kept;
    all.extend(rows);
    all.sort_by(|a, b| extension_order(&a.target, &b.target));
    (all, plan)
}

/// A row final at planning: its first step gets `first`, a mail is not sent, the rest `rest`.
fn settle(row: &mut Row, outcome: Outcome, first: StepState) {
    row.outcome = outcome;
    for (i, s) in row.steps.iter_mut().enumerate() {
        s.state = match (i, s.kind.on_resume()) {
            (0, _) => first,
            (_, OnResume::Uncertain) => StepState::Skipped,
            _ if first == StepState::Failed => StepState::Skipped,
            _ => first,
        };
    }
}

/// What a person should know about the spec before the run: entries without email, welcome
/// emails without SMTP or without anyone to welcome, and a reset that keeps the old password.
pub fn warnings(spec: &UserRecycleSpec, connection: &str, has_smtp: bool) -> Vec<String> {
    let mut out = Vec::new();
    let without_email: Vec<String> = spec
        .recycle
        .iter()
        .filter(|e| e.email.as_deref().is_none_or(str::is_empty))
        .map(|e| {
            format!(
                "{} ({} {})",
                e.extension,
                e.first_name.as_deref().unwrap_or(""),
                e.last_name.as_deref().unwrap_or("")
            )
        })
        .collect();
    if !without_email.is_empty() {
        let mut list = without_email.iter().take(20).cloned().collect::<Vec<_>>();
        if without_email.len() > 20 {
            list.push(format!("and {} more", without_email.len() - 20));
        }
        out.push(cut(format!(
            "recycle entries without email: {}; their email stays empty and no welcome email can be sent to them; add spec.recycle[].email to fix",
            list.join(", ")
        )));
    }
    if spec.send_welcome_email {
        if !has_smtp {
            out.push(format!(
                "PbxConnection {connection} has no spec.smtp: welcome emails cannot be sent"
            ));
        }
        if spec.recycle.is_empty() {
            out.push(
                "sendWelcomeEmail is set but spec.recycle names nobody: there is no one to welcome"
                    .into(),
            );
        }
    }
    if !spec.reset.contains(&ResetItem::Password) {
        out.push(
            "spec.reset does not name Password: the previous person's phones can register again with the old SIP password".into(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ConnectionRef;
    use crate::api::user_recycle::RecycleTargets;
    use crate::plan::stored;

    fn user() -> User {
        let mut u = User {
            extension: "201".into(),
            numbers: vec!["+15550100201".into()],
            ..Default::default()
        };
        for (f, v) in [
            (UserField::FirstName, "Ben"),
            (UserField::LastName, "Becker"),
            (UserField::Email, "ben@acme.test"),
            (UserField::Password, "ha1:abc"),
            (UserField::VoicemailPin, "sha256:def"),
            (UserField::Role, "User"),
            (UserField::Status, "Active"),
        ] {
            u.values.insert(f, v.into());
        }
        u
    }

    fn ana(email: Option<&str>) -> NewIdentity {
        NewIdentity {
            extension: "201".into(),
            first_name: "Ana".into(),
            last_name: "Diaz".into(),
            email: email.map(str::to_string),
        }
    }

    fn shown(changes: &[FieldChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| {
                format!(
                    "{}: {} -> {}",
                    c.field,
                    c.from.as_deref().unwrap_or("-"),
                    c.to.as_deref().unwrap_or("-")
                )
            })
            .collect()
    }

    fn spec(targets: &[&str], recycle: &[(&str, Option<&str>)], welcome: bool) -> UserRecycleSpec {
        UserRecycleSpec {
            connection_ref: ConnectionRef {
                name: "acme".into(),
            },
            revert_of: None,
            targets: Some(RecycleTargets {
                extensions: targets.iter().map(|t| t.to_string()).collect(),
            }),
            reset: crate::api::user_recycle::default_reset(),
            recycle: recycle
                .iter()
                .map(|(ext, email)| RecycleEntry {
                    extension: ext.to_string(),
                    first_name: Some("Ana".into()),
                    last_name: Some("Diaz".into()),
                    email: email.map(str::to_string),
                })
                .collect(),
            send_welcome_email: welcome,
            not_before: None,
            execute_before: None,
            requested_by: None,
        }
    }

    fn kinds(row: &Row) -> Vec<(StepKind, StepState)> {
        row.steps.iter().map(|s| (s.kind, s.state)).collect()
    }

    #[test]
    fn reset_reports_what_it_clears_and_never_a_secret() {
        let phones = [Phone {
            id: 1,
            mac: "805ec0000001".into(),
            vendor: "Yealink".into(),
            model: "SIP-T46S".into(),
            owner: Some("201".into()),
            label: None,
        }];
        let parts = reset_parts(&crate::api::user_recycle::default_reset());
        let c = reset_changes(&user(), &phones, &parts);
        assert_eq!(
            shown(&c),
            [
                "firstName: Ben -> -",
                "lastName: Becker -> -",
                "email: ben@acme.test -> -",
                "password: (set) -> (new secret)",
                "voicemailPin: (set) -> -",
                "devices: 805ec0000001 (Yealink SIP-T46S) -> -",
                "status: Active -> SetupRequired",
            ]
        );
        assert!(!format!("{c:?}").contains("abc") && !format!("{c:?}").contains("def"));
    }

    #[test]
    fn recycle_folds_into_one_change_per_field() {
        let parts = reset_parts(&[ResetItem::Name, ResetItem::Password]);
        let mut c = reset_changes(&user(), &[], &parts);
        merge_recycle(&mut c, &user(), &ana(Some("ana@acme.test")));
        assert_eq!(
            shown(&c),
            [
                "firstName: Ben -> Ana",
                "lastName: Becker -> Diaz",
                "password: (set) -> (new secret)",
                "status: Active -> PasswordRequired",
                "email: ben@acme.test -> ana@acme.test",
                "voicemailPin: (set) -> -",
            ]
        );
        // Merging again (a resumed recycle) changes nothing.
        let again = c.clone();
        let mut reset = user();
        reset.values.remove(&UserField::FirstName);
        reset
            .values
            .insert(UserField::Status, SETUP_REQUIRED.into());
        merge_recycle(&mut c, &reset, &ana(Some("ana@acme.test")));
        assert_eq!(c, again);
    }

    #[test]
    fn only_the_new_identity_in_password_required_counts_as_recycled() {
        let mut u = user();
        assert!(!already_recycled(&u, &ana(None)));
        u.values.insert(UserField::FirstName, "Ana".into());
        u.values.insert(UserField::LastName, "Diaz".into());
        u.values.remove(&UserField::Email);
        u.values.insert(UserField::Status, PASSWORD_REQUIRED.into());
        assert!(already_recycled(&u, &ana(None)));
        assert!(!already_recycled(&u, &ana(Some("ana@acme.test"))));
        u.values.insert(UserField::Status, SETUP_REQUIRED.into());
        assert!(!already_recycled(&u, &ana(None)));
    }

    #[test]
    fn identity_round_trips_through_the_row() {
        let id = ana(None);
        let row = Row {
            target: "201".into(),
            outcome: Outcome::Planned,
            writes: identity_writes(&id),
            ..Default::default()
        };
        let back = stored::from_jsonl(&stored::to_jsonl(&[row])).unwrap();
        assert_eq!(identity_of(&back[0]), Some(id));
        assert_eq!(identity_of(&Row::default()), None, "a reset only");
    }

    #[test]
    fn reset_parts_are_deduplicated_in_a_fixed_order() {
        use ResetItem::*;
        assert_eq!(
            reset_parts(&[Numbers, Name, Numbers, Password]),
            [ResetPart::Name, ResetPart::Password, ResetPart::Numbers]
        );
    }

    #[test]
    fn every_target_gets_its_steps_and_final_rows_get_final_steps() {
        use StepKind::*;
        use StepState::*;
        let spec = spec(
            &["203", "201", "202"],
            &[("201", Some("ana@acme.test")), ("202", None)],
            true,
        );
        let scope = scope(&spec, None);
        assert_eq!(scope.targets, ["201", "202", "203"]);
        let mut recycled = user();
        recycled.extension = "202".into();
        for (f, v) in [
            (UserField::FirstName, "Ana"),
            (UserField::LastName, "Diaz"),
            (UserField::Status, PASSWORD_REQUIRED),
        ] {
            recycled.values.insert(f, v.into());
        }
        recycled.values.remove(&UserField::Email);
        let (rows, plan) = plan(&spec, 3, scope, &[user(), recycled], &[]);
        assert_eq!((plan.generation, plan.targets, plan.changes), (3, 3, 1));
        assert_eq!(
            kinds(&rows[0]),
            [
                (Reset, Pending),
                (DropRegistrations, Pending),
                (Recycle, Pending),
                (WelcomeMail, Pending)
            ]
        );
        assert_eq!(rows[0].actions, ["Reset", "Recycle", "SendWelcomeEmail"]);
        assert_eq!(identity_of(&rows[0]), Some(ana(Some("ana@acme.test"))));
        assert!(shown(&rows[0].changes).contains(&"firstName: Ben -> Ana".to_string()));
        assert_eq!(
            rows[1].outcome,
            Outcome::Unchanged,
            "already recycled: never reset again"
        );
        assert_eq!(
            kinds(&rows[1]),
            [
                (Reset, NoOp),
                (DropRegistrations, NoOp),
                (Recycle, NoOp),
                (WelcomeMail, Skipped)
            ]
        );
        assert!(rows[1].notes[0].starts_with("already given to Ana Diaz"));
        assert_eq!(rows[2].outcome, Outcome::Failed, "203 is not on the PBX");
        assert_eq!(
            kinds(&rows[2]),
            [(Reset, Failed), (DropRegistrations, Skipped)]
        );
        assert_eq!(rows[2].notes, ["extension 203 does not exist on the PBX"]);
    }

    #[test]
    fn the_hash_leaves_secrets_out_and_follows_the_values() {
        let spec = spec(&["201"], &[], false);
        let (_, a) = plan(&spec, 1, scope(&spec, None), &[user()], &[]);
        let mut other_secret = user();
        other_secret
            .values
            .insert(UserField::Password, "ha1:zzz".into());
        let (_, b) = plan(&spec, 1, scope(&spec, None), &[other_secret], &[]);
        assert_eq!(a.hash, b.hash, "secrets are not hashed");
        let mut renamed = user();
        renamed.values.insert(UserField::FirstName, "Bea".into());
        let (_, c) = plan(&spec, 1, scope(&spec, None), &[renamed], &[]);
        assert_ne!(a.hash, c.hash);
    }

    #[test]
    fn a_retry_replans_the_failed_keeps_the_good_and_never_repeats_a_reset() {
        use StepKind::*;
        use StepState::*;
        let spec = spec(
            &["201", "202", "203"],
            &[("201", Some("ana@acme.test"))],
            true,
        );
        let (mut rows, _) = plan(&spec, 1, scope(&spec, None), &[user()], &[]);
        // 201: reset and recycled, the mail uncertain; 202: changed; 203: missing (Failed).
        rows[0].outcome = Outcome::Uncertain;
        for (s, st) in rows[0].steps.iter_mut().zip([Done, Done, Done, Uncertain]) {
            s.state = st;
        }
        rows[0].changes = vec![FieldChange {
            field: "firstName".into(),
            from: Some("Ben".into()),
            to: Some("Ana".into()),
        }];
        rows[1].outcome = Outcome::Changed;
        let scope = scope(&spec, Some(rows.clone()));
        assert_eq!(scope.targets, ["201", "203"]);
        let mut now = user();
        now.values.insert(UserField::FirstName, "Ana".into());
        let (again, plan) = plan(&spec, 1, scope, &[now], &[]);
        assert_eq!(plan.targets, 2);
        assert_eq!(again.len(), 3);
        assert_eq!(again[1], rows[1], "a good row is kept as it is");
        assert_eq!(
            kinds(&again[0]),
            [
                (Reset, Done),
                (DropRegistrations, Done),
                (Recycle, Done),
                (WelcomeMail, Pending)
            ],
            "exactly the uncertain mail again"
        );
        assert_eq!(
            again[0].changes, rows[0].changes,
            "what the reset did, as recorded"
        );
        assert_eq!(again[0].outcome, Outcome::Planned);
        assert_eq!(again[2].outcome, Outcome::Failed, "still missing");
    }

    #[test]
    fn retry_steps_redo_exactly_what_did_not_go_through() {
        use StepKind::*;
        use StepState::*;
        let steps = |l: &[(StepKind, StepState)]| -> Vec<Step> {
            l.iter()
                .map(|(kind, state)| Step {
                    kind: *kind,
                    state: *state,
                })
                .collect()
        };
        assert_eq!(
            retry_steps(&steps(&[(Reset, Failed), (DropRegistrations, Skipped)])),
            None,
            "a reset that did not go through is planned afresh"
        );
        assert_eq!(
            retry_steps(&steps(&[
                (Reset, Done),
                (DropRegistrations, Failed),
                (Recycle, Skipped)
            ])),
            Some(steps(&[
                (Reset, Done),
                (DropRegistrations, Pending),
                (Recycle, Pending)
            ]))
        );
        assert_eq!(
            retry_steps(&steps(&[
                (Reset, Done),
                (DropRegistrations, Done),
                (Recycle, Intended)
            ])),
            Some(steps(&[
                (Reset, Done),
                (DropRegistrations, Done),
                (Recycle, Intended)
            ])),
            "begun by a run still going: its resume rules decide"
        );
        assert_eq!(
            retry_steps(&steps(&[(Reset, Done), (DropRegistrations, Done)])),
            None
        );
    }

    #[test]
    fn legacy_rows_get_steps_from_their_actions() {
        use StepKind::*;
        use StepState::*;
        let row = Row {
            target: "201".into(),
            outcome: Outcome::InProgress,
            actions: vec![
                ACTION_RESET.into(),
                ACTION_RECYCLE.into(),
                ACTION_MAIL.into(),
            ],
            ..Default::default()
        };
        assert_eq!(
            legacy_steps(&row)
                .iter()
                .map(|s| (s.kind, s.state))
                .collect::<Vec<_>>(),
            [
                (Reset, Intended),
                (DropRegistrations, Intended),
                (Recycle, Intended),
                (WelcomeMail, Intended)
            ]
        );
        let planned = Row {
            outcome: Outcome::Planned,
            actions: vec![ACTION_RESET.into()],
            ..row
        };
        assert_eq!(legacy_steps(&planned), recycle_steps(false, false));
    }

    #[test]
    fn warnings_name_what_a_person_should_fix() {
        let mut s = spec(&["201"], &[("201", None)], true);
        s.reset = vec![ResetItem::Name];
        let w = warnings(&s, "acme", false);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("201 (Ana Diaz)") && w[0].contains("without email"));
        assert!(w[1].contains("PbxConnection acme has no spec.smtp"));
        assert!(w[2].contains("does not name Password"));
        let ok = spec(&["201"], &[("201", Some("ana@acme.test"))], true);
        assert!(warnings(&ok, "acme", true).is_empty());
    }
}
