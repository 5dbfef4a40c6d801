//! Undo: the plan that reverts a finished change from what its journal recorded.
//!
//! Pure: the controller reads the original's stored rows (verified against their digests), the
//! targets as the PBX holds them now and the snapshots the original kept, then calls
//! [`plan_revert`] (BulkUserChange), [`plan_phone_revert`] (BulkPhoneChange) or
//! [`plan_recycle_revert`] (UserRecycle). For every target whose steps went through, each
//! field's recorded `from` is written back, compare-and-set against the `to` the original
//! wrote; a value that moved since is a Conflict naming both values. A removed or recycled user
//! comes back from its snapshot (a Restore step, pinned by the snapshot's digest). What cannot
//! be undone (a password reset, a 2FA reset, a mail sent, a secret written) is said on the
//! target, which stays Unchanged unless something else of it can be reverted.

use std::collections::{BTreeMap, HashSet};

use sha2::{Digest, Sha256};

use super::stored::{
    self, ExpectedValue, Row, Step, StepKind, StepState, StoredRestore, StoredWrite,
};
use super::users;
use crate::api::{FieldChange, Outcome};
use crate::pbx::{KeptSnapshot, User, UserField};

/// The snapshots the original kept of the users it removed or recycled, and who holds their
/// numbers now: what a revert needs to bring them back.
#[derive(Debug, Clone, Default)]
pub struct Snapshots {
    /// By extension.
    pub kept: BTreeMap<String, KeptSnapshot>,
    /// A number of a snapshot -> the other user who holds it now.
    pub holders: BTreeMap<String, String>,
}

impl Snapshots {
    /// Every number the kept snapshots hold (aliases and private numbers): whose they are now
    /// is read before planning.
    pub fn numbers(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .kept
            .values()
            .filter_map(|k| k.snapshot.as_ref())
            .flat_map(|s| s.all_numbers().cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

fn date(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// The row of a target brought back from its snapshot, or why it cannot be.
fn restore_row(
    name: &str,
    target: &str,
    snapshots: &Snapshots,
    expect: Option<Vec<ExpectedValue>>,
    what: &str,
) -> Row {
    let mut row = Row {
        target: target.to_string(),
        outcome: Outcome::Unchanged,
        ..Default::default()
    };
    let Some(kept) = snapshots.kept.get(target) else {
        row.notes.push(format!(
            "{what} cannot be reverted: {name} kept no snapshot of the user (it ran before snapshots were kept, or on a backend without them)"
        ));
        return row;
    };
    let Some(snapshot) = &kept.snapshot else {
        row.outcome = Outcome::Failed;
        row.notes.push(format!(
            "{what} cannot be reverted: the snapshot of {target} taken {} expired{} (the PbxConnection's spec.snapshots.retentionDays): the user's data is gone",
            date(kept.taken),
            kept.expired.map(|e| format!(" on {}", date(e))).unwrap_or_default()
        ));
        return row;
    };
    row.outcome = Outcome::Planned;
    row.steps = vec![Step::pending(StepKind::Restore)];
    row.restore = Some(StoredRestore {
        run: kept.run.clone(),
        taken: kept.taken,
        digest: snapshot.digest(),
        expect,
    });
    row.changes.push(FieldChange {
        field: "user".into(),
        from: None,
        to: Some(format!(
            "restored from the snapshot of {}",
            date(kept.taken)
        )),
    });
    row.notes.push(format!(
        "restored from the snapshot {name} kept on {}: {} preferences, {} groups, {} numbers, {} phones; a new secret nobody knows, status PasswordRequired",
        date(kept.taken),
        snapshot.preferences.len(),
        snapshot.groups.len(),
        snapshot.numbers.len(),
        snapshot.phones.len()
    ));
    for n in snapshot.all_numbers() {
        if let Some(holder) = snapshots.holders.get(n).filter(|h| *h != target) {
            row.notes.push(format!(
                "number {n} is {holder}'s now: it stays {holder}'s and this target ends Conflict; the rest is restored"
            ));
        }
    }
    row
}

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
    snapshots: &Snapshots,
    kept: Vec<Row>,
) -> RevertPlan {
    let keep: HashSet<String> = kept.iter().map(|r| r.target.clone()).collect();
    let mut rows = kept;
    let mut seen = HashSet::new();
    for r in original {
        if !did_something(r) || keep.contains(&r.target) || !seen.insert(r.target.clone()) {
            continue;
        }
        rows.push(revert_row(name, r, current.get(&r.target), snapshots));
    }
    rows.sort_by(|a, b| crate::pbx::extension_order(&a.target, &b.target));
    RevertPlan::new("BulkUserChange", name, rows)
}

impl RevertPlan {
    /// The plan of the revert of `kind` `name` from its rows: what it would write, and its hash.
    fn new(kind: &str, name: &str, rows: Vec<Row>) -> RevertPlan {
        let changes = rows
            .iter()
            .filter(|r| r.outcome == Outcome::Planned)
            .count();
        let hash = hash(kind, name, &rows);
        RevertPlan {
            rows,
            hash,
            changes,
        }
    }
}

fn hash(kind: &str, name: &str, rows: &[Row]) -> String {
    let mut h = Sha256::new();
    h.update(format!("revert of {kind} {name}\n").as_bytes());
    for r in rows {
        let mut line = serde_json::json!([r.target, r.outcome, r.writes, r.actions]);
        if let (Some(restore), Some(line)) = (&r.restore, line.as_array_mut()) {
            line.push(serde_json::json!(restore));
        }
        h.update(line.to_string().as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

fn show(field: UserField, v: Option<&str>) -> String {
    users::shown(field, v).unwrap_or_else(|| "(unset)".into())
}

/// One target's revert row.
fn revert_row(name: &str, original: &Row, user: Option<&User>, snapshots: &Snapshots) -> Row {
    let mut row = Row {
        target: original.target.clone(),
        outcome: Outcome::Unchanged,
        ..Default::default()
    };
    if done(original, StepKind::Remove) {
        let restored = snapshots
            .kept
            .get(&row.target)
            .is_some_and(|k| k.restored_by.is_some());
        if user.is_some() && restored {
            row.notes.push(
                "already restored from its snapshot by an earlier run of a revert: nothing to do"
                    .into(),
            );
            return row;
        }
        if user.is_some() {
            row.outcome = Outcome::Conflict;
            row.notes.push(format!(
                "extension {} exists again on the PBX (created since {name} removed it): it is not restored over",
                row.target
            ));
            return row;
        }
        let mut row = restore_row(name, &original.target, snapshots, None, "Remove");
        let restored = snapshots
            .kept
            .get(&row.target)
            .and_then(|k| k.user.as_ref());
        if row.outcome == Outcome::Planned && done(original, StepKind::Write) {
            // The snapshot holds what the change wrote before the Remove: once the user is
            // back, those fields are written back too, compare-and-set like any revert.
            let moved = field_reverts(name, original, restored, &mut row);
            row.notes.extend(moved);
            if !row.writes.is_empty() {
                row.steps.insert(0, Step::pending(StepKind::Write));
            }
        }
        add_irreversible(&mut row, original);
        return row;
    }
    if done(original, StepKind::Restore) {
        // A revert of a revert: the user it brought back is removed again (and kept again).
        if user.is_none() {
            row.notes.push("already removed".into());
        } else {
            row.outcome = Outcome::Planned;
            row.actions = vec!["Remove".into()];
            row.steps = stored::user_steps(false, &row.actions);
        }
        return row;
    }
    if !original.gives.is_empty() {
        row.notes.push(format!(
            "gave {} to another target of {name}: a revert does not give it back (the taker's revert frees it; assign it with a new change)",
            original.gives.join(", ")
        ));
        return row;
    }
    let mut conflicts = Vec::new();
    if done(original, StepKind::Write) {
        conflicts = field_reverts(name, original, user, &mut row);
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
    add_irreversible(&mut row, original);
    if user.is_none() && (done(original, StepKind::Write) || !row.actions.is_empty()) {
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

/// Plans each field the original wrote back to its recorded `from`, compare-and-set against the
/// `to` it wrote, on `user` as it is now (or as a restore will bring it back); returns what moved
/// since. Secret fields are said, not planned.
fn field_reverts(name: &str, original: &Row, user: Option<&User>, row: &mut Row) -> Vec<String> {
    let mut conflicts = Vec::new();
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
        let Some(now) = user.map(|u| u.get(field).map(str::to_string)) else {
            continue;
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
    conflicts
}

/// Notes what the original did to a target that no revert can undo.
fn add_irreversible(row: &mut Row, original: &Row) {
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
    ] {
        if done(original, kind) {
            row.notes.push(why.to_string());
        }
    }
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
    RevertPlan::new("BulkPhoneChange", name, rows)
}

/// The identity fields a revert of a recycle compares against what the recycle left.
const IDENTITY: [UserField; 3] = [UserField::FirstName, UserField::LastName, UserField::Email];

/// The extensions a recycle revert reads: the targets whose reset or recycle went through.
pub fn recycled(original: &[Row]) -> Vec<String> {
    let mut out: Vec<String> = original
        .iter()
        .filter(|r| done(r, StepKind::Reset) || done(r, StepKind::Recycle))
        .map(|r| r.target.clone())
        .collect();
    out.sort_by(|a, b| crate::pbx::extension_order(a, b));
    out.dedup();
    out
}

/// Plans the revert of UserRecycle `name`: each target whose reset or recycle went through
/// gets its earlier identity back from the snapshot the recycle kept (name, email, role,
/// groups, numbers, phones), compare-and-set against the identity the recycle left; the
/// secret stays the rotated one nobody knows (PasswordRequired). `kept`: a retry's rows that
/// went through or are carried over, kept as they are; their targets are not planned again.
pub fn plan_recycle_revert(
    name: &str,
    original: &[Row],
    current: &BTreeMap<String, User>,
    snapshots: &Snapshots,
    kept: Vec<Row>,
) -> RevertPlan {
    let keep: HashSet<String> = kept.iter().map(|r| r.target.clone()).collect();
    let mut rows = kept;
    for target in recycled(original) {
        if keep.contains(&target) {
            continue;
        }
        let Some(r) = original.iter().find(|r| r.target == target) else {
            continue;
        };
        // What the recycle left of each identity field: the last value its changes record.
        let expect: Vec<ExpectedValue> = IDENTITY
            .into_iter()
            .filter_map(|f| {
                let change = r.changes.iter().rev().find(|c| c.field == f.name())?;
                Some(ExpectedValue {
                    field: f.name().into(),
                    value: change.to.clone(),
                })
            })
            .collect();
        if snapshots
            .kept
            .get(&target)
            .is_some_and(|k| k.restored_by.is_some())
        {
            rows.push(Row {
                target: target.clone(),
                notes: vec![
                    "already restored from its snapshot by an earlier run of a revert: nothing to do"
                        .into(),
                ],
                ..Default::default()
            });
            continue;
        }
        let Some(user) = current.get(&target) else {
            rows.push(Row {
                target: target.clone(),
                outcome: Outcome::Conflict,
                notes: vec![format!(
                    "extension {target} no longer exists on the PBX: nothing to restore it on"
                )],
                ..Default::default()
            });
            continue;
        };
        let moved: Vec<String> = expect
            .iter()
            .filter_map(|e| {
                let field = UserField::from_name(&e.field)?;
                let now = user.get(field).map(str::to_string);
                (now != e.value).then(|| {
                    format!(
                        "{field} is {} now, not {} as {name} left it: changed since, left alone",
                        show(field, now.as_deref()),
                        show(field, e.value.as_deref())
                    )
                })
            })
            .collect();
        if !moved.is_empty() {
            rows.push(Row {
                target,
                outcome: Outcome::Conflict,
                notes: moved,
                ..Default::default()
            });
            continue;
        }
        let mut row = restore_row(name, &target, snapshots, Some(expect), "the recycle");
        if row.outcome == Outcome::Planned {
            row.notes.push(
                "the SIP secret stays the one the recycle rotated to (nobody knows it) and the voicemail PIN stays cleared: neither was kept".into(),
            );
        }
        if done(r, StepKind::WelcomeMail) {
            row.notes
                .push("the welcome email was sent: a mail cannot be unsent".into());
        }
        rows.push(row);
    }
    rows.sort_by(|a, b| crate::pbx::extension_order(&a.target, &b.target));
    RevertPlan::new("UserRecycle", name, rows)
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
        let plan = plan_revert(
            "roles",
            &[role_change("201")],
            &current,
            &Snapshots::default(),
            vec![],
        );
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
        let plan = plan_revert(
            "roles",
            &[role_change("201")],
            &current,
            &Snapshots::default(),
            vec![],
        );
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
        let plan = plan_revert(
            "roles",
            &[role_change("201")],
            &current,
            &Snapshots::default(),
            vec![],
        );
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
        let plan = plan_revert("roles", &rows, &current, &Snapshots::default(), vec![]);
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
        let plan = plan_revert("resets", &[row], &current, &Snapshots::default(), vec![]);
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
        let plan = plan_revert(
            "locks",
            &[lock, unlock],
            &current,
            &Snapshots::default(),
            vec![],
        );
        assert_eq!(plan.rows[0].actions, vec!["Unlock".to_string()]);
        assert_eq!(plan.rows[0].steps, vec![Step::pending(StepKind::Unlock)]);
        assert_eq!(plan.rows[1].actions, vec!["Lock".to_string()]);
    }

    #[test]
    fn a_vanished_target_is_a_conflict() {
        let plan = plan_revert(
            "roles",
            &[role_change("201")],
            &BTreeMap::new(),
            &Snapshots::default(),
            vec![],
        );
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
        let plan = plan_revert(
            "gone",
            &[row],
            &BTreeMap::new(),
            &Snapshots::default(),
            vec![],
        );
        assert_eq!(plan.rows[0].outcome, Outcome::Unchanged);
        assert!(plan.rows[0].notes[0].contains("Remove cannot be reverted"));
    }

    fn removed(ext: &str) -> Row {
        Row {
            target: ext.into(),
            outcome: Outcome::Changed,
            actions: vec!["Remove".into()],
            steps: vec![step(StepKind::Remove, StepState::Done)],
            ..Default::default()
        }
    }

    fn kept(ext: &str, numbers: &[&str], expired: bool) -> Snapshots {
        let snapshot = crate::pbx::UserSnapshot {
            extension: ext.into(),
            preferences: vec![crate::pbx::Preference {
                attribute: "pbx.private_number".into(),
                kind: 2,
                value: "+4930999".into(),
            }],
            groups: vec!["sales".into()],
            numbers: numbers.iter().map(|n| n.to_string()).collect(),
            phones: vec![7],
            private_number: Some("+4930999".into()),
        };
        Snapshots {
            kept: BTreeMap::from([(
                ext.to_string(),
                KeptSnapshot {
                    run: "run1".into(),
                    extension: ext.into(),
                    taken: 1_700_000_000_000,
                    snapshot: (!expired).then_some(snapshot),
                    expired: expired.then_some(1_702_592_000_000),
                    restored_by: None,
                    user: (!expired).then(|| user(ext, &[(UserField::Role, "Operator")]).1),
                },
            )]),
            holders: BTreeMap::from([("+4930999".to_string(), "305".to_string())]),
        }
    }

    #[test]
    fn a_removed_user_with_a_snapshot_is_restored_and_a_number_taken_since_is_named() {
        let snapshots = kept("201", &["+4930100"], false);
        assert_eq!(snapshots.numbers(), vec!["+4930100", "+4930999"]);
        let plan = plan_revert(
            "gone",
            &[removed("201")],
            &BTreeMap::new(),
            &snapshots,
            vec![],
        );
        let r = &plan.rows[0];
        assert_eq!(r.outcome, Outcome::Planned);
        assert_eq!(r.steps, vec![Step::pending(StepKind::Restore)]);
        let restore = r.restore.as_ref().unwrap();
        assert_eq!(restore.run, "run1");
        assert_eq!(restore.expect, None, "the extension must not exist");
        let digest = snapshots.kept["201"].snapshot.as_ref().unwrap().digest();
        assert_eq!(restore.digest, digest);
        let notes = r.notes.join("\n");
        assert!(notes.contains("+4930999 is 305's now"), "{notes}");
        assert!(!notes.contains("+4930100 is"), "{notes}");
        assert_eq!(plan.changes, 1);
        // The plan hash pins the snapshot: another snapshot, another hash.
        let other = kept("201", &["+4930200"], false);
        let again = plan_revert("gone", &[removed("201")], &BTreeMap::new(), &other, vec![]);
        assert_ne!(again.hash, plan.hash);
    }

    #[test]
    fn fields_the_change_wrote_before_removing_are_written_back_after_the_restore() {
        let mut original = removed("201");
        original.writes = vec![write("role", Some("User"), Some("Operator"))];
        original
            .steps
            .insert(0, step(StepKind::Write, StepState::Done));
        let snapshots = kept("201", &[], false);
        let plan = plan_revert("gone", &[original], &BTreeMap::new(), &snapshots, vec![]);
        let r = &plan.rows[0];
        assert_eq!(r.outcome, Outcome::Planned);
        assert_eq!(
            r.steps,
            vec![
                Step::pending(StepKind::Write),
                Step::pending(StepKind::Restore)
            ]
        );
        assert_eq!(
            r.writes,
            vec![write("role", Some("Operator"), Some("User"))]
        );
    }

    #[test]
    fn an_expired_snapshot_fails_the_target_with_a_note_and_an_extension_taken_again_is_a_conflict()
    {
        let expired = kept("201", &[], true);
        let plan = plan_revert(
            "gone",
            &[removed("201")],
            &BTreeMap::new(),
            &expired,
            vec![],
        );
        assert_eq!(plan.rows[0].outcome, Outcome::Failed);
        assert!(
            plan.rows[0].notes[0].contains("expired"),
            "{:?}",
            plan.rows[0].notes
        );
        assert!(plan.rows[0].steps.is_empty());
        let fresh = kept("201", &[], false);
        let exists = BTreeMap::from([user("201", &[])]);
        let plan = plan_revert("gone", &[removed("201")], &exists, &fresh, vec![]);
        assert_eq!(plan.rows[0].outcome, Outcome::Conflict);
        assert!(plan.rows[0].notes[0].contains("exists again"));
        // Restored by an earlier run of a revert (a retry plans it again): nothing to do.
        let mut restored = kept("201", &[], false);
        restored.kept.get_mut("201").unwrap().restored_by = Some("run-2".into());
        let plan = plan_revert("gone", &[removed("201")], &exists, &restored, vec![]);
        assert_eq!(plan.rows[0].outcome, Outcome::Unchanged);
        assert!(plan.rows[0].notes[0].contains("already restored"));
    }

    #[test]
    fn a_revert_of_a_restore_removes_the_user_again() {
        let restored = Row {
            target: "201".into(),
            outcome: Outcome::Changed,
            steps: vec![step(StepKind::Restore, StepState::Done)],
            ..Default::default()
        };
        let now = BTreeMap::from([user("201", &[])]);
        let plan = plan_revert(
            "gone-revert",
            &[restored],
            &now,
            &Snapshots::default(),
            vec![],
        );
        assert_eq!(plan.rows[0].actions, vec!["Remove".to_string()]);
        assert_eq!(plan.rows[0].steps, vec![Step::pending(StepKind::Remove)]);
    }

    fn recycled_row(ext: &str) -> Row {
        Row {
            target: ext.into(),
            outcome: Outcome::Changed,
            changes: vec![
                FieldChange {
                    field: "firstName".into(),
                    from: Some("Ann".into()),
                    to: None,
                },
                FieldChange {
                    field: "firstName".into(),
                    from: None,
                    to: Some("Bea".into()),
                },
                FieldChange {
                    field: "email".into(),
                    from: Some("ann@example.com".into()),
                    to: None,
                },
            ],
            steps: vec![
                step(StepKind::Reset, StepState::Done),
                step(StepKind::Recycle, StepState::Done),
                step(StepKind::WelcomeMail, StepState::Done),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_recycle_revert_compares_the_identity_the_recycle_left_and_restores_from_the_snapshot() {
        let snapshots = kept("201", &[], false);
        let now = BTreeMap::from([user("201", &[(UserField::FirstName, "Bea")])]);
        let plan = plan_recycle_revert("hire", &[recycled_row("201")], &now, &snapshots, vec![]);
        let r = &plan.rows[0];
        assert_eq!(r.outcome, Outcome::Planned, "{:?}", r.notes);
        let expect = r.restore.as_ref().unwrap().expect.clone().unwrap();
        assert_eq!(
            expect,
            vec![
                ExpectedValue {
                    field: "firstName".into(),
                    value: Some("Bea".into())
                },
                ExpectedValue {
                    field: "email".into(),
                    value: None
                },
            ]
        );
        assert!(r.notes.iter().any(|n| n.contains("mail cannot be unsent")));
        let renamed = BTreeMap::from([user("201", &[(UserField::FirstName, "Cy")])]);
        let plan =
            plan_recycle_revert("hire", &[recycled_row("201")], &renamed, &snapshots, vec![]);
        assert_eq!(plan.rows[0].outcome, Outcome::Conflict);
        let note = plan.rows[0].notes.join("; ");
        assert!(note.contains("Cy") && note.contains("Bea"), "{note}");
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
        let undo = plan_revert(
            "roles",
            &original,
            &after_original,
            &Snapshots::default(),
            vec![],
        );
        assert_eq!(undo.changes, 2);
        let after_undo = BTreeMap::from([
            user("201", &[(UserField::Role, "User")]),
            user("202", &[(UserField::Role, "User")]),
        ]);
        let redo = plan_revert(
            "roles-undo",
            &executed(&undo),
            &after_undo,
            &Snapshots::default(),
            vec![],
        );
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
        let first = plan_revert("roles", &original, &current, &Snapshots::default(), vec![]);
        let done = executed(&first)[0].clone();
        let retry = plan_revert(
            "roles",
            &original,
            &current,
            &Snapshots::default(),
            vec![done.clone()],
        );
        assert_eq!(retry.rows[0], done);
        assert_eq!(retry.rows[1].outcome, Outcome::Planned);
        let moved = BTreeMap::from([
            user("201", &[(UserField::Role, "Admin")]),
            user("202", &[(UserField::Role, "Operator")]),
        ]);
        assert_ne!(
            plan_revert("roles", &original, &moved, &Snapshots::default(), vec![]).hash,
            first.hash
        );
        assert_eq!(
            plan_revert("roles", &original, &current, &Snapshots::default(), vec![]).hash,
            first.hash
        );
    }
}
