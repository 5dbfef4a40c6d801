//! A BulkUserChange spec as a plan request, and its plan as the rows a run stores: the fields
//! and actions it asks for, its fingerprint, and the stored row of each planned user or CSV
//! line. Pure: the controller reads the spec's Secrets, the run engine's planners read the PBX,
//! then call these.

use sha2::{Digest, Sha256};

use super::rows;
use super::sheet;
use super::stored::{self, Row, SourceRow, StoredTake, StoredWrite};
use super::users::{self, ActionKind, FieldIntent, Wanted};
use crate::api::{
    BulkUserChangeSpec, CsvPlan, FieldChange, Lock, Outcome, Plan, UserAction as SpecAction,
    UserFields,
};
use crate::pbx::{NewValue, UserField};

/// A fingerprint of what the spec asks, without how (mode) or who (requestedBy).
pub fn spec_hash(spec: &BulkUserChangeSpec) -> String {
    let mut v = serde_json::to_value(spec).expect("specs serialize");
    if let Some(o) = v.as_object_mut() {
        for k in ["mode", "approvedPlanHash", "requestedBy"] {
            o.remove(k);
        }
    }
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}

/// The actions a spec asks for.
pub fn actions(spec: &BulkUserChangeSpec) -> Vec<ActionKind> {
    spec.actions
        .iter()
        .map(|a| match a {
            SpecAction::ResetPassword => ActionKind::ResetPassword,
            SpecAction::ResetTwoFactor => ActionKind::ResetTwoFactor,
            SpecAction::Unlock => ActionKind::Unlock,
            SpecAction::Lock => ActionKind::Lock,
            SpecAction::SendWelcomeEmail => ActionKind::SendWelcomeEmail,
            SpecAction::Remove => ActionKind::Remove,
        })
        .collect()
}

/// The non-secret fields of a spec as canonical values.
pub fn plain_fields(f: &UserFields) -> Vec<FieldIntent> {
    let mut out = Vec::new();
    let mut push = |field: UserField, value: Option<String>, lock: Lock| {
        out.push(FieldIntent {
            field,
            wanted: Wanted::Value(value),
            open: lock == Lock::Open,
        })
    };
    if let Some(x) = &f.first_name {
        push(UserField::FirstName, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.last_name {
        push(UserField::LastName, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.email {
        push(UserField::Email, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.role {
        push(UserField::Role, Some(format!("{:?}", x.value)), x.lock);
    }
    if let Some(x) = &f.call_group {
        push(UserField::CallGroup, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.pickup_group {
        push(UserField::PickupGroup, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.groups {
        let canonical = users::canonical_groups(x.value.0.iter().map(String::as_str));
        push(
            UserField::Groups,
            (!canonical.is_empty()).then_some(canonical),
            x.lock,
        );
    }
    if let Some(x) = &f.locked {
        push(UserField::Locked, Some(x.value.to_string()), x.lock);
    }
    if let Some(x) = &f.caller_id_policy {
        push(UserField::CallerIdPolicy, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.voice_route_policy {
        push(UserField::VoiceRoutePolicy, Some(x.value.0.clone()), x.lock);
    }
    if let Some(x) = &f.enterprise_voice {
        push(
            UserField::EnterpriseVoice,
            Some(x.value.to_string()),
            x.lock,
        );
    }
    for (number, location, spec) in [
        (
            UserField::PrimaryNumber,
            UserField::PrimaryNumberLocation,
            &f.primary_number,
        ),
        (
            UserField::PrivateNumber,
            UserField::PrivateNumberLocation,
            &f.private_number,
        ),
    ] {
        if let Some(x) = spec {
            push(number, Some(x.value.number.clone()), x.lock);
            if let Some(l) = &x.value.location {
                push(location, Some(l.clone()), x.lock);
            }
        }
    }
    out
}

/// A CSV line's rows as stored: its own (the cells of a sensitive column redacted), then one
/// per user giving it a number without a row of their own.
pub fn csv_line_rows(
    rp: rows::RowPlan,
    mut cells: Vec<String>,
    sensitive: &[bool],
    donors: Vec<rows::Donor>,
) -> Vec<Row> {
    for (cell, secret) in cells.iter_mut().zip(sensitive) {
        if *secret && !cell.is_empty() {
            *cell = "(redacted)".into();
        }
    }
    let (line, taker) = (rp.line, rp.extension.clone());
    let mut out = vec![csv_row(rp, cells)];
    out.extend(donors.into_iter().map(|d| Row {
        target: d.extension,
        outcome: Outcome::Planned,
        notes: vec![rows::holder_note(&d.number, &taker, line)],
        gives: vec![d.number],
        ..Default::default()
    }));
    out
}

/// Which columns of a sheet are redacted in results.
pub fn sensitive_columns(sheet: &sheet::Sheet) -> Vec<bool> {
    sheet
        .header
        .iter()
        .map(|h| sheet::is_sensitive(h))
        .collect()
}

/// What status.warnings says about a spec on connection `connection` (with or without SMTP).
pub fn warnings(connection: &str, has_smtp: bool, spec: &BulkUserChangeSpec) -> Vec<String> {
    let mails = spec
        .actions
        .iter()
        .any(|a| matches!(a, SpecAction::ResetPassword | SpecAction::SendWelcomeEmail));
    if mails && !has_smtp {
        vec![format!(
            "PbxConnection {} has no spec.smtp: reset instructions and welcome emails cannot be sent",
            connection
        )]
    } else {
        vec![]
    }
}

/// A plan row: the writes of a target, with secrets never stored.
pub fn planned_row(t: &users::PlannedUser) -> Row {
    let actions: Vec<String> = t.actions.iter().map(|a| a.name().to_string()).collect();
    Row {
        target: t.extension.clone(),
        outcome: if t.changes_anything() {
            Outcome::Planned
        } else {
            Outcome::Unchanged
        },
        writes: t
            .writes
            .iter()
            .map(|w| StoredWrite {
                field: w.field.name().into(),
                from: if w.field.is_secret() {
                    None
                } else {
                    w.from.clone()
                },
                to: match &w.to {
                    NewValue::Set(v) => Some(v.clone()),
                    _ => None,
                },
                secret: w.field.is_secret(),
            })
            .collect(),
        changes: t
            .writes
            .iter()
            .map(|w| FieldChange {
                field: w.field.name().into(),
                from: users::shown(w.field, w.from.as_deref()),
                to: users::shown_new(w.field, &w.to),
            })
            .collect(),
        steps: if t.changes_anything() {
            stored::user_steps(!t.writes.is_empty(), &actions)
        } else {
            vec![]
        },
        actions,
        notes: vec![],
        phone: None,
        ..Default::default()
    }
}

/// A CSV row as a result row: its input cells, its writes, and its errors and warnings as notes.
pub fn csv_row(rp: rows::RowPlan, cells: Vec<String>) -> Row {
    let planned = users::PlannedUser {
        extension: rp.extension.clone(),
        writes: rp.writes,
        actions: rp.actions,
    };
    let mut row = planned_row(&planned);
    if row.target.is_empty() {
        row.target = format!("(line {})", rp.line);
    }
    if !rp.errors.is_empty() {
        // An invalid row does nothing: no step is stored that an edited outcome could start.
        row.outcome = Outcome::Failed;
        row.steps.clear();
    }
    row.notes = rp.errors;
    row.notes.extend(rp.warnings);
    row.takes = rp
        .takes
        .into_iter()
        .map(|m| StoredTake {
            number: m.number,
            holder: m.holder,
            held_as: m.held_as.name().into(),
        })
        .collect();
    row.source = Some(SourceRow {
        line: rp.line,
        cells,
    });
    row
}

/// The row of a listed extension the PBX does not have.
pub fn unknown_row(extension: String) -> Row {
    Row {
        notes: vec![format!("extension {extension} does not exist on the PBX")],
        target: extension,
        outcome: Outcome::Skipped,
        ..Default::default()
    }
}

/// status.plan of a user plan.
pub fn status_plan(plan: &users::PlanSummary, generation: i64, spec_hash: &str) -> Plan {
    Plan {
        hash: plan.hash.clone(),
        generation,
        targets: plan.targets as u32,
        resolved: plan.first.clone(),
        common_values: plan.common_values.clone(),
        closed_fields: plan.closed_fields.clone(),
        changes: plan.changing as u32,
        spec_hash: spec_hash.to_string(),
        ..Default::default()
    }
}

/// What a CSV plan came to, for status.plan.
pub struct CsvPlanned {
    pub hash: String,
    pub tally: rows::Tally,
    /// The first extensions of the file (status shows up to 1,000).
    pub resolved: Vec<String>,
    /// sha256 of the file as read.
    pub sha256: String,
}

/// A CSV's header as status.plan.csv.columns shows it and the result CSV echoes it.
pub fn shown_header(header: &[String]) -> Vec<String> {
    header
        .iter()
        .take(64)
        .map(|h| h.chars().take(128).collect())
        .collect()
}

/// How many extensions status.plan.resolved shows.
pub const RESOLVED_SHOWN: usize = 1000;

/// status.plan of a CSV plan.
pub fn csv_status_plan(
    planned: CsvPlanned,
    header: &[String],
    closed: &[UserField],
    generation: i64,
    spec_hash: &str,
) -> Plan {
    let CsvPlanned {
        hash,
        tally,
        resolved,
        sha256,
    } = planned;
    let targets = tally.rows as u32;
    Plan {
        hash,
        generation,
        targets,
        resolved: resolved
            .iter()
            .take(RESOLVED_SHOWN)
            .map(|e| e.chars().take(128).collect())
            .collect(),
        closed_fields: closed.iter().map(|f| f.name().to_string()).collect(),
        changes: tally.changing as u32,
        spec_hash: spec_hash.to_string(),
        csv: Some(CsvPlan {
            sha256,
            columns: shown_header(header),
            rows: targets,
            invalid: tally.invalid as u32,
        }),
        ..Default::default()
    }
}
