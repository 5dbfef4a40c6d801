//! Undo: the plan that reverts a finished BulkUserChange from what its journal recorded.
//!
//! Pure: the controller reads the original's stored rows (verified against their digests) and
//! the targets as the PBX holds them now, then calls [`plan_revert`]. For every target whose
//! steps went through, each field's recorded `from` is written back, compare-and-set against
//! the `to` the original wrote; a value that moved since is a Conflict naming both values. What
//! cannot be undone (a password reset, a 2FA reset, a mail sent, a secret written) is said on
//! the target, which stays Unchanged unless something else of it can be reverted.

use std::collections::{BTreeMap, HashSet};

use sha2::{Digest, Sha256};

use super::stored::{self, Row, StepKind, StepState, StoredWrite};
use super::users;
use crate::api::{FieldChange, Outcome};
use crate::pbx::{User, UserField};

/// A revert's rows as they will be stored, and what status.plan says of them.
#[derive(Debug, Clone, PartialEq)]
pub struct RevertPlan {
    /// One row per target of the original that something was done to, in extension order.
    pub rows: Vec<Row>,
    /// sha256 over the original's name and every row's planned writes, actions and outcome.
    pub hash: String,
    /// Targets the revert would write.
    pub changes: usize,
}

/// The extensions a revert needs to read: the targets of the original with a step done.
pub fn targets(original: &[Row]) -> Vec<String> {
    let mut out: Vec<String> = original
        .iter()
        .filter(|r| did_something(r))
        .map(|r| r.target.clone())
        .collect();
    out.sort_by(|a, b| crate::pbx::extension_order(a, b));
    out.dedup();
    out
}

fn done(row: &Row, kind: StepKind) -> bool {
    row.steps
        .iter()
        .any(|s| s.kind == kind && s.state == StepState::Done)
}

fn did_something(row: &Row) -> bool {
    row.outcome == Outcome::Changed || row.steps.iter().any(|s| s.state == StepState::Done)
}

/// Plans the revert of `original` (the change named `name`) against `current` (the targets as
/// the PBX holds them now). `kept`: a retry's rows that went through, kept as they are; their
/// targets are not planned again.
pub fn plan_revert(
    name: &str,
    original: &[Row],
    current: &BTreeMap<String, User>,
    kept: Vec<Row>,
) -> RevertPlan {
    let keep: HashSet<String> = kept.iter().map(|r| r.target.clone()).collect();
    let mut rows = kept;
    let mut seen = HashSet::new();
    for r in original {
        if !did_something(r) || keep.contains(&r.target) || !seen.insert(r.target.clone()) {
            continue;
        }
        rows.push(revert_row(name, r, current.get(&r.target)));
    }
    rows.sort_by(|a, b| crate::pbx::extension_order(&a.target, &b.target));
    let changes = rows
        .iter()
        .filter(|r| r.outcome == Outcome::Planned)
        .count();
    let hash = hash(name, &rows);
    RevertPlan {
        rows,
        hash,
        changes,
    }
}

fn hash(name: &str, rows: &[Row]) -> String {
    let mut h = Sha256::new();
    h.update(b"revert of BulkUserChange ");
    h.update(name.as_bytes());
    h.update(b"\n");
    for r in rows {
        let line = serde_json::json!([r.target, r.outcome, r.writes, r.actions]);
        h.update(line.to_string().as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

fn show(field: UserField, v: Option<&str>) -> String {
    users::shown(field, v).unwrap_or_else(|| "(unset)".into())
}

/// One target's revert row.
fn revert_row(name: &str, original: &Row, user: Option<&User>) -> Row {
    let mut row = Row {
        target: original.target.clone(),
        outcome: Outcome::Unchanged,
        ..Default::default()
    };
    if !original.gives.is_empty() {
        row.notes.push(format!(
            "gave {} to another target of {name}: a revert does not give it back (the taker's revert frees it; assign it with a new change)",
            original.gives.join(", ")
        ));
        return row;
    }
    let mut conflicts = Vec::new();
    if done(original, StepKind::Write) {
        for w in &original.writes {
            let Some(field) = UserField::from_name(&w.field) else {
                row.notes
                    .push(format!("{}: unknown field, not reverted", w.field));
                continue;
            };
            if w.secret || field.is_secret() {
                row.notes.push(format!(
                    "{field}: cannot be reverted: the earlier secret was never kept"
                ));
                continue;
            }
            let now = match user {
                Some(u) => u.get(field).map(str::to_string),
                None => continue,
            };
            if now == w.from {
                row.notes
                    .push(format!("{field}: already {}", show(field, now.as_deref())));
            } else if now == w.to {
                row.writes.push(StoredWrite {
                    field: w.field.clone(),
                    from: w.to.clone(),
                    to: w.from.clone(),
                    secret: false,
                });
                row.changes.push(FieldChange {
                    field: w.field.clone(),
                    from: users::shown(field, w.to.as_deref()),
                    to: users::shown(field, w.from.as_deref()),
                });
            } else {
                conflicts.push(format!(
                    "{field} is {} now, not {} as {name} left it (it was {} before): changed since, left alone",
                    show(field, now.as_deref()),
                    show(field, w.to.as_deref()),
                    show(field, w.from.as_deref()),
                ));
            }
        }
        for t in &original.takes {
            row.notes.push(format!(
                "took {} from {}: a revert does not give it back to {} (assign it with a new change)",
                t.number, t.holder, t.holder
            ));
        }
    }
    for (kind, inverse) in [(StepKind::Lock, "Unlock"), (StepKind::Unlock, "Lock")] {
        if done(original, kind) {
            row.actions.push(inverse.to_string());
        }
    }
    for (kind, why) in [
        (
            StepKind::ResetPassword,
            "ResetPassword cannot be reverted: the earlier secret was never kept",
        ),
        (
            StepKind::ResetTwoFactor,
            "ResetTwoFactor cannot be reverted: the earlier second factor was never kept",
        ),
        (
            StepKind::ResetMail,
            "the reset instructions mail was sent: a mail cannot be unsent",
        ),
        (
            StepKind::WelcomeMail,
            "the welcome email was sent: a mail cannot be unsent",
        ),
        (
            StepKind::Remove,
            "Remove cannot be reverted: no snapshot of the user was kept",
        ),
    ] {
        if done(original, kind) {
            row.notes.push(why.to_string());
        }
    }
    let removed = done(original, StepKind::Remove);
    if user.is_none() && !removed && (done(original, StepKind::Write) || !row.actions.is_empty()) {
        row.actions.clear();
        row.outcome = Outcome::Conflict;
        row.notes.push(format!(
            "extension {} no longer exists on the PBX: nothing to revert it on",
            row.target
        ));
        return row;
    }
    if user.is_none() {
        row.writes.clear();
        row.changes.clear();
        row.actions.clear();
        return row;
    }
    if !conflicts.is_empty() {
        // Like a compare-and-set write: a target with a moved value is left alone as a whole.
        row.writes.clear();
        row.changes.clear();
        row.actions.clear();
        row.outcome = Outcome::Conflict;
        row.notes.extend(conflicts);
        return row;
    }
    if !row.writes.is_empty() || !row.actions.is_empty() {
        row.outcome = Outcome::Planned;
        row.steps = stored::user_steps(!row.writes.is_empty(), &row.actions);
    }
    row
}

/// The phone ids a phone revert needs to read, with the owners their phones had.
pub fn phone_owners(original: &[Row]) -> Vec<String> {
    let mut out: Vec<String> = original
        .iter()
        .filter(|r| done(r, StepKind::PhoneWrite))
        .filter_map(|r| r.phone.as_ref().map(|p| p.extension.clone()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Plans the revert of BulkPhoneChange `name`: per phone whose write went through, its model
/// and label written back, compare-and-set against what the change wrote. `current`: the
/// phones as the PBX holds them now, by id.
pub fn plan_phone_revert(
    name: &str,
    original: &[Row],
    current: &BTreeMap<i64, crate::pbx::Phone>,
) -> RevertPlan {
    let mut rows = Vec::new();
    for r in original.iter().filter(|r| done(r, StepKind::PhoneWrite)) {
        let mut row = Row {
            target: r.target.clone(),
            outcome: Outcome::Unchanged,
            phone: r.phone.clone(),
            ..Default::default()
        };
        let phone = r
            .phone
            .as_ref()
            .and_then(|p| p.id)
            .and_then(|id| current.get(&id));
        let Some(phone) = phone else {
            row.outcome = Outcome::Conflict;
            row.notes
                .push("the phone is no longer provisioned: nothing to revert it on".into());
            rows.push(row);
            continue;
        };
        let mut conflicts = Vec::new();
        for w in &r.writes {
            let now = match w.field.as_str() {
                "model" => phone.model.clone(),
                "label" => phone.label.clone().unwrap_or_default(),
                other => {
                    row.notes
                        .push(format!("{other}: unknown field, not reverted"));
                    continue;
                }
            };
            let (was, wrote) = (
                w.from.clone().unwrap_or_default(),
                w.to.clone().unwrap_or_default(),
            );
            if now == was {
                row.notes.push(format!("{}: already {was:?}", w.field));
            } else if now == wrote {
                row.writes.push(StoredWrite {
                    field: w.field.clone(),
                    from: Some(wrote.clone()),
                    to: Some(was.clone()),
                    secret: false,
                });
                row.changes.push(FieldChange {
                    field: w.field.clone(),
                    from: Some(wrote),
                    to: Some(was),
                });
            } else {
                conflicts.push(format!(
                    "{} is {now:?} now, not {wrote:?} as {name} left it (it was {was:?} before): changed since, left alone",
                    w.field
                ));
            }
        }
        if !conflicts.is_empty() {
            row.writes.clear();
            row.changes.clear();
            row.outcome = Outcome::Conflict;
            row.notes.extend(conflicts);
        } else if !row.writes.is_empty() {
            row.outcome = Outcome::Planned;
            row.steps = vec![stored::Step::pending(StepKind::PhoneWrite)];
        }
        rows.push(row);
    }
    let changes = rows
        .iter()
        .filter(|r| r.outcome == Outcome::Planned)
        .count();
    let hash = hash(name, &rows);
    RevertPlan {
        rows,
        hash,
        changes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::stored::Step;

    fn step(kind: StepKind, state: StepState) -> Step {
        Step { kind, state }
    }

    fn write(field: &str, from: Option<&str>, to: Option<&str>) -> StoredWrite {
        StoredWrite {
            field: field.into(),
            from: from.map(Into::into),
            to: to.map(Into::into),
            secret: false,
        }
    }

    fn changed(target: &str, writes: Vec<StoredWrite>, steps: Vec<Step>) -> Row {
        Row {
            target: target.into(),
            outcome: Outcome::Changed,
            writes,
            steps,
            ..Default::default()
        }
    }

    fn user(ext: &str, values: &[(UserField, &str)]) -> (String, User) {
        (
            ext.to_string(),
            User {
                extension: ext.into(),
                values: values.iter().map(|(f, v)| (*f, v.to_string())).collect(),
                numbers: vec![],
            },
        )
    }

    fn role_change(ext: &str) -> Row {
        changed(
            ext,
            vec![write("role", Some("User"), Some("Operator"))],
            vec![step(StepKind::Write, StepState::Done)],
        )
    }

    #[test]
    fn a_changed_field_is_written_back_compare_and_set_against_what_the_change_wrote() {
        let current = BTreeMap::from([user("201", &[(UserField::Role, "Operator")])]);
        let plan = plan_revert("roles", &[role_change("201")], &current, vec![]);
        assert_eq!(plan.changes, 1);
        let r = &plan.rows[0];
        assert_eq!(r.outcome, Outcome::Planned);
        assert_eq!(
            r.writes,
            vec![write("role", Some("Operator"), Some("User"))]
        );
        assert_eq!(r.steps, vec![Step::pending(StepKind::Write)]);
    }

    #[test]
    fn a_value_moved_since_is_a_conflict_naming_both_values_and_writes_nothing() {
        let current = BTreeMap::from([user("201", &[(UserField::Role, "Admin")])]);
        let plan = plan_revert("roles", &[role_change("201")], &current, vec![]);
        let r = &plan.rows[0];
        assert_eq!(r.outcome, Outcome::Conflict);
        assert!(r.writes.is_empty() && r.steps.is_empty());
        let note = r.notes.join("; ");
        assert!(
            note.contains("Admin") && note.contains("Operator"),
            "{note}"
        );
        assert_eq!(plan.changes, 0);
    }

    #[test]
    fn a_value_already_back_is_unchanged() {
        let current = BTreeMap::from([user("201", &[(UserField::Role, "User")])]);
        let plan = plan_revert("roles", &[role_change("201")], &current, vec![]);
        assert_eq!(plan.rows[0].outcome, Outcome::Unchanged);
        assert!(plan.rows[0].writes.is_empty());
    }

    #[test]
    fn targets_the_change_did_nothing_to_are_not_in_the_revert() {
        let mut failed = role_change("202");
        failed.outcome = Outcome::Conflict;
        failed.steps = vec![step(StepKind::Write, StepState::Conflict)];
        let untouched = Row {
            target: "203".into(),
            outcome: Outcome::Unchanged,
            ..Default::default()
        };
        let rows = [role_change("201"), failed, untouched];
        assert_eq!(targets(&rows), vec!["201".to_string()]);
        let current = BTreeMap::from([
            user("201", &[(UserField::Role, "Operator")]),
            user("202", &[(UserField::Role, "Operator")]),
        ]);
        let plan = plan_revert("roles", &rows, &current, vec![]);
        assert_eq!(plan.rows.len(), 1);
    }

    #[test]
    fn what_cannot_be_undone_is_unchanged_with_a_note_per_target() {
        let row = Row {
            target: "201".into(),
            outcome: Outcome::Changed,
            writes: vec![StoredWrite {
                field: "voicemailPin".into(),
                from: None,
                to: None,
                secret: true,
            }],
            actions: vec!["ResetPassword".into(), "ResetTwoFactor".into()],
            steps: vec![
                step(StepKind::Write, StepState::Done),
                step(StepKind::ResetTwoFactor, StepState::Done),
                step(StepKind::ResetPassword, StepState::Done),
                step(StepKind::ResetMail, StepState::Done),
            ],
            ..Default::default()
        };
        let current = BTreeMap::from([user("201", &[])]);
        let plan = plan_revert("resets", &[row], &current, vec![]);
        let r = &plan.rows[0];
        assert_eq!(r.outcome, Outcome::Unchanged);
        assert!(r.steps.is_empty() && r.writes.is_empty());
        let notes = r.notes.join("\n");
        for what in ["voicemailPin", "ResetPassword", "ResetTwoFactor", "mail"] {
            assert!(notes.contains(what), "{what} in {notes}");
        }
    }

    #[test]
    fn a_lock_is_reverted_by_an_unlock_and_an_unlock_by_a_lock() {
        let lock = Row {
            target: "201".into(),
            outcome: Outcome::Changed,
            actions: vec!["Lock".into()],
            steps: vec![step(StepKind::Lock, StepState::Done)],
            ..Default::default()
        };
        let mut unlock = lock.clone();
        unlock.target = "202".into();
        unlock.actions = vec!["Unlock".into()];
        unlock.steps = vec![step(StepKind::Unlock, StepState::Done)];
        let current = BTreeMap::from([user("201", &[]), user("202", &[])]);
        let plan = plan_revert("locks", &[lock, unlock], &current, vec![]);
        assert_eq!(plan.rows[0].actions, vec!["Unlock".to_string()]);
        assert_eq!(plan.rows[0].steps, vec![Step::pending(StepKind::Unlock)]);
        assert_eq!(plan.rows[1].actions, vec!["Lock".to_string()]);
    }

    #[test]
    fn a_vanished_target_is_a_conflict() {
        let plan = plan_revert("roles", &[role_change("201")], &BTreeMap::new(), vec![]);
        assert_eq!(plan.rows[0].outcome, Outcome::Conflict);
        assert!(plan.rows[0].notes[0].contains("no longer exists"));
    }

    #[test]
    fn a_remove_without_snapshot_is_said_not_skipped() {
        let row = Row {
            target: "201".into(),
            outcome: Outcome::Changed,
            actions: vec!["Remove".into()],
            steps: vec![step(StepKind::Remove, StepState::Done)],
            ..Default::default()
        };
        let plan = plan_revert("gone", &[row], &BTreeMap::new(), vec![]);
        assert_eq!(plan.rows[0].outcome, Outcome::Unchanged);
        assert!(plan.rows[0].notes[0].contains("Remove cannot be reverted"));
    }

    /// The revert run, as the executor would leave it: each planned write done.
    fn executed(plan: &RevertPlan) -> Vec<Row> {
        plan.rows
            .iter()
            .cloned()
            .map(|mut r| {
                if r.outcome == Outcome::Planned {
                    r.outcome = Outcome::Changed;
                    for s in r.steps.iter_mut() {
                        s.state = StepState::Done;
                    }
                }
                r
            })
            .collect()
    }

    #[test]
    fn a_revert_of_a_revert_restores_the_originals_result() {
        let original = vec![
            changed(
                "201",
                vec![
                    write("role", Some("User"), Some("Operator")),
                    write("email", None, Some("a@example.com")),
                ],
                vec![step(StepKind::Write, StepState::Done)],
            ),
            role_change("202"),
        ];
        let after_original = BTreeMap::from([
            user(
                "201",
                &[
                    (UserField::Role, "Operator"),
                    (UserField::Email, "a@example.com"),
                ],
            ),
            user("202", &[(UserField::Role, "Operator")]),
        ]);
        let undo = plan_revert("roles", &original, &after_original, vec![]);
        assert_eq!(undo.changes, 2);
        let after_undo = BTreeMap::from([
            user("201", &[(UserField::Role, "User")]),
            user("202", &[(UserField::Role, "User")]),
        ]);
        let redo = plan_revert("roles-undo", &executed(&undo), &after_undo, vec![]);
        assert_eq!(redo.changes, 2);
        let writes: Vec<_> = redo.rows.iter().map(|r| r.writes.clone()).collect();
        assert_eq!(
            writes,
            vec![
                vec![
                    write("role", Some("User"), Some("Operator")),
                    write("email", None, Some("a@example.com")),
                ],
                vec![write("role", Some("User"), Some("Operator"))],
            ],
            "the original's writes, as planned again"
        );
    }

    fn phone_row(id: i64, from: &str, to: &str) -> Row {
        Row {
            target: format!("20{id}/mac{id}"),
            outcome: Outcome::Changed,
            writes: vec![write("label", Some(from), Some(to))],
            steps: vec![step(StepKind::PhoneWrite, StepState::Done)],
            phone: Some(stored::PhoneTarget {
                id: Some(id),
                extension: format!("20{id}"),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn phone(id: i64, label: &str) -> (i64, crate::pbx::Phone) {
        (
            id,
            crate::pbx::Phone {
                id,
                mac: format!("mac{id}"),
                vendor: "Yealink".into(),
                model: "SIP-T46S".into(),
                owner: Some(format!("20{id}")),
                label: (!label.is_empty()).then(|| label.to_string()),
            },
        )
    }

    #[test]
    fn a_phone_revert_restores_labels_and_a_label_changed_since_is_a_conflict() {
        let original = [
            phone_row(1, "", "3rd floor"),
            phone_row(2, "lobby", "3rd floor"),
        ];
        assert_eq!(phone_owners(&original), vec!["201", "202"]);
        let current = BTreeMap::from([phone(1, "3rd floor"), phone(2, "kitchen")]);
        let plan = plan_phone_revert("labels", &original, &current);
        assert_eq!(plan.changes, 1);
        assert_eq!(
            plan.rows[0].writes,
            vec![write("label", Some("3rd floor"), Some(""))]
        );
        assert_eq!(
            plan.rows[0].steps,
            vec![Step::pending(StepKind::PhoneWrite)]
        );
        assert_eq!(plan.rows[1].outcome, Outcome::Conflict);
        let note = plan.rows[1].notes.join("; ");
        assert!(
            note.contains("kitchen") && note.contains("3rd floor"),
            "{note}"
        );
        let gone = plan_phone_revert("labels", &original, &BTreeMap::new());
        assert!(gone.rows.iter().all(|r| r.outcome == Outcome::Conflict));
    }

    #[test]
    fn a_retry_keeps_the_rows_that_went_through_and_the_hash_follows_the_pbx() {
        let current = BTreeMap::from([
            user("201", &[(UserField::Role, "Operator")]),
            user("202", &[(UserField::Role, "Operator")]),
        ]);
        let original = [role_change("201"), role_change("202")];
        let first = plan_revert("roles", &original, &current, vec![]);
        let done = executed(&first)[0].clone();
        let retry = plan_revert("roles", &original, &current, vec![done.clone()]);
        assert_eq!(retry.rows[0], done);
        assert_eq!(retry.rows[1].outcome, Outcome::Planned);
        let moved = BTreeMap::from([
            user("201", &[(UserField::Role, "Admin")]),
            user("202", &[(UserField::Role, "Operator")]),
        ]);
        assert_ne!(
            plan_revert("roles", &original, &moved, vec![]).hash,
            first.hash
        );
        assert_eq!(
            plan_revert("roles", &original, &current, vec![]).hash,
            first.hash
        );
    }
}
