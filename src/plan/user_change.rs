//! A BulkUserChange spec as a plan request, and its plan as the rows a run stores: the fields
//! and actions it asks for, its fingerprint, and the stored row of each planned user or CSV
//! line. Pure: the controller reads the spec's Secrets and the PBX, then calls these.

use std::collections::HashMap;

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

/// A plan's result rows, as they will be stored.
pub enum PlannedRows {
    All(Vec<Row>),
    /// CSV rows are made from the row plan and the file when they are written, one at a time.
    Csv(CsvRows),
}

impl PlannedRows {
    pub fn into_rows(self) -> Box<dyn Iterator<Item = Row> + Send> {
        match self {
            PlannedRows::All(rows) => Box::new(rows.into_iter()),
            PlannedRows::Csv(rows) => Box::new(rows.into_rows()),
        }
    }
}

pub struct CsvRows {
    pub plan: rows::RowsPlan,
    pub sheet: sheet::Sheet,
    /// Columns whose cells are redacted in results.
    pub sensitive: Vec<bool>,
    /// A retry: the earlier rows kept by CSV line (each with the rows that followed it), as
    /// the retry carries them over; other lines are planned afresh.
    pub previous: HashMap<u64, Vec<Row>>,
}

impl CsvRows {
    /// The input rows in file order, each followed by the users giving it a number; a line
    /// the retry carries over keeps its earlier rows.
    fn into_rows(self) -> impl Iterator<Item = Row> + Send {
        let CsvRows {
            plan,
            sheet,
            sensitive,
            mut previous,
        } = self;
        let mut donors = plan.donors.into_iter().peekable();
        plan.rows
            .into_iter()
            .enumerate()
            .zip(sheet.into_rows())
            .flat_map(move |((i, rp), sheet_row)| {
                let mine: Vec<rows::Donor> =
                    std::iter::from_fn(|| donors.next_if(|d| d.row == i)).collect();
                if let Some(kept) = previous.remove(&rp.line) {
                    return kept;
                }
                let line = rp.line;
                let taker = rp.extension.clone();
                let mut cells = sheet_row.cells;
                for (cell, secret) in cells.iter_mut().zip(&sensitive) {
                    if *secret && !cell.is_empty() {
                        *cell = "(redacted)".into();
                    }
                }
                let mut out = vec![csv_row(rp, cells)];
                out.extend(mine.into_iter().map(|d| Row {
                    target: d.extension,
                    outcome: Outcome::Planned,
                    notes: vec![rows::holder_note(&d.number, &taker, line)],
                    gives: vec![d.number],
                    ..Default::default()
                }));
                out
            })
    }
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

/// Who a CSV involves, from a first pass over its rows: the extensions of its valid rows, the
/// numbers they ask for (whose holders are read too), and the first row of each extension.
pub struct Involved {
    pub extensions: Vec<String>,
    pub numbers: Vec<String>,
    pub row_of: HashMap<String, usize>,
}

pub fn csv_involved(sheet: &sheet::Sheet, closed: &[UserField]) -> Involved {
    let mut out = Involved {
        extensions: vec![],
        numbers: vec![],
        row_of: HashMap::new(),
    };
    // The rows are checked again as they are planned, so no pass holds every request at once.
    for (i, r) in sheet::requests(sheet, closed).enumerate() {
        out.row_of.entry(r.extension.clone()).or_insert(i);
        if r.errors.is_empty() {
            out.extensions.push(r.extension);
        }
        out.numbers.extend(
            r.values
                .into_iter()
                .filter(|(f, _)| f.is_number())
                .map(|(_, v)| v),
        );
    }
    out
}

/// status.plan of a CSV plan.
pub fn csv_status_plan(
    plan: &rows::RowsPlan,
    sheet: &sheet::Sheet,
    sha256: String,
    closed: &[UserField],
    generation: i64,
    spec_hash: &str,
) -> Plan {
    let targets = plan.rows.len() as u32;
    Plan {
        hash: plan.hash.clone(),
        generation,
        targets,
        resolved: plan
            .rows
            .iter()
            .filter(|r| !r.extension.is_empty())
            .take(1000)
            .map(|r| r.extension.chars().take(128).collect())
            .collect(),
        closed_fields: closed.iter().map(|f| f.name().to_string()).collect(),
        changes: plan.changing() as u32,
        spec_hash: spec_hash.to_string(),
        csv: Some(CsvPlan {
            sha256,
            columns: sheet
                .header
                .iter()
                .take(64)
                .map(|h| h.chars().take(128).collect())
                .collect(),
            rows: targets,
            invalid: plan.invalid() as u32,
        }),
        ..Default::default()
    }
}

/// A CSV plan's rows as they will be stored, made one input row at a time. `kept`: the rows a
/// retry keeps, by CSV line (see [`by_line`]).
pub fn csv_rows(
    plan: rows::RowsPlan,
    sheet: sheet::Sheet,
    kept: HashMap<u64, Vec<Row>>,
) -> CsvRows {
    let sensitive = sheet
        .header
        .iter()
        .map(|h| sheet::is_sensitive(h))
        .collect();
    CsvRows {
        plan,
        sheet,
        sensitive,
        previous: kept,
    }
}

/// Earlier rows grouped by the CSV line they belong to (a giving row follows its taker's).
pub fn by_line(rows: Vec<Row>) -> HashMap<u64, Vec<Row>> {
    let mut out: HashMap<u64, Vec<Row>> = HashMap::new();
    let mut last: Option<u64> = None;
    for r in rows {
        match (&r.source, last) {
            (Some(src), _) => {
                last = Some(src.line);
                out.entry(src.line).or_default().push(r);
            }
            (None, Some(line)) => out.entry(line).or_default().push(r),
            (None, None) => {}
        }
    }
    out
}
