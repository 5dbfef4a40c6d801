//! Plans that need what the PBX holds: the targets are read through the backend, then planned
//! by the pure planners of plan/. Nothing of Kubernetes here: the controller reads the spec's
//! Secrets and the CSV's bytes and hands them in.

use sha2::{Digest, Sha256};

use super::steps::kept_by_retry;
use crate::api::Plan;
use crate::pbx::{PbxBackend, PbxError, UserField, UserSelection};
use crate::plan::selection::Selector;
use crate::plan::stored::Row;
use crate::plan::user_change::{self as request, PlannedRows};
use crate::plan::users::{self as user_plan, Intent};
use crate::plan::{PlanError, rows as row_plan, sheet};

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanningError {
    #[error(transparent)]
    Pbx(#[from] PbxError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Csv(#[from] sheet::SheetError),
}

/// What a BulkUserChange asks, as the planners need it.
pub struct UserRequest<'a> {
    pub intent: &'a Intent,
    /// The spec's fingerprint with the Secrets it reads (status.plan.specHash).
    pub spec_hash: &'a str,
    pub generation: i64,
    /// A retry: the earlier run's rows. Targets whose steps went through keep their row (with
    /// the steps to redo), the rest are planned afresh.
    pub kept: Option<Vec<Row>>,
    pub atomic: bool,
}

/// Reads the selected users and plans their rows.
pub async fn plan_users(
    backend: &dyn PbxBackend,
    mut selector: Selector,
    req: UserRequest<'_>,
) -> Result<(PlannedRows, Plan), PlanningError> {
    let mut keep = Vec::new();
    if let Some(rows) = req.kept {
        selector.groups.clear();
        selector.extensions.clear();
        selector.max_targets = None;
        for r in rows {
            match kept_by_retry(&r) {
                Some(row) => keep.push(row),
                None => selector.extensions.push(r.target),
            }
        }
    }
    let selection = UserSelection {
        groups: selector.groups.clone(),
        extensions: selector.extensions.clone(),
    };
    let read = backend.read_users(&selection).await?;
    let caps = backend.capabilities();
    let plan = user_plan::plan(&read, &selector, req.intent, &caps.user_fields)?;
    if !plan.empty_groups.is_empty() {
        tracing::info!(groups = ?plan.empty_groups, "groups without members");
    }
    let status_plan = request::status_plan(&plan, req.generation, req.spec_hash);
    let rows = request::user_rows(&plan, keep);
    Ok((PlannedRows::All(rows), status_plan))
}

/// Plans a CSV-sourced change: checks each row of the file, reads the rows' users and the
/// holders of the numbers they give, and plans the rows in file order.
pub async fn plan_csv(
    backend: &dyn PbxBackend,
    bytes: Vec<u8>,
    max_bytes: usize,
    req: UserRequest<'_>,
) -> Result<(PlannedRows, Plan), PlanningError> {
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let sheet = sheet::read(&bytes, max_bytes)?;
    drop(bytes);
    let closed: Vec<UserField> = req
        .intent
        .fields
        .iter()
        .filter(|f| !f.open)
        .map(|f| f.field)
        .collect();
    let mut involved = request::csv_involved(&sheet, &closed);
    if !involved.numbers.is_empty() {
        let holders = backend.number_holders(&involved.numbers).await?;
        involved
            .extensions
            .extend(holders.into_iter().map(|(_, h)| h));
    }
    involved.extensions.sort();
    involved.extensions.dedup();
    // Only the fields a CSV or spec.fields can set are planned: the rest need no memory.
    let wanted: Vec<UserField> = sheet::FIELDS
        .iter()
        .copied()
        .chain(req.intent.fields.iter().map(|f| f.field))
        .collect();
    let selection = UserSelection {
        groups: vec![],
        extensions: std::mem::take(&mut involved.extensions),
    };
    let read = backend.read_user_fields(&selection, &wanted).await?;
    let policies = backend.policies().await?;
    let caps = backend.capabilities();
    let rules = row_plan::Rules {
        base: req.intent,
        policies: &policies,
        supported: &caps.user_fields,
        atomic: req.atomic,
    };
    let requests = sheet::requests(&sheet, &closed);
    let plan = row_plan::plan_rows(requests, &involved.row_of, read.users, &rules)?;
    // A line the earlier run finished keeps its rows; the rest are planned afresh.
    let mut keep = request::by_line(req.kept.unwrap_or_default());
    keep.retain(|_, rows| match rows.first().and_then(kept_by_retry) {
        Some(first) => {
            rows[0] = first;
            true
        }
        None => false,
    });
    let status_plan = request::csv_status_plan(
        &plan,
        &sheet,
        sha256,
        &closed,
        req.generation,
        req.spec_hash,
    );
    Ok((
        PlannedRows::Csv(request::csv_rows(plan, sheet, keep)),
        status_plan,
    ))
}
