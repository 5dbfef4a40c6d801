//! Undo, the Kubernetes side: reads the finished change a revert names (its stored rows,
//! verified against the digests it recorded) and the targets as the PBX holds them now, then
//! plans the revert with the pure planner (plan::revert). Nothing is written here.

use std::collections::BTreeMap;

use kube::{Api, ResourceExt};

use super::run::RunKind;
use super::run::{Run, unfinished};
use super::{Context, Error};
use crate::api::{BulkPhoneChange, BulkUserChange, Phase, Plan};
use crate::pbx::{PbxBackend, UserSelection};
use crate::plan::revert;
use crate::plan::stored::Row;
use crate::plan::user_change::PlannedRows;

/// Plans the revert of BulkUserChange `name` in `buc`'s namespace. `kept`: a retry's rows that
/// went through (kept as they are).
pub(crate) async fn plan_user_revert(
    ctx: &Context,
    buc: &BulkUserChange,
    name: &str,
    backend: &dyn PbxBackend,
    kept: Vec<Row>,
    spec_hash: &str,
) -> Result<(PlannedRows, Plan), Error> {
    let rows = original_rows::<BulkUserChange>(ctx, buc, name).await?;
    let extensions = revert::targets(&rows);
    let current = if extensions.is_empty() {
        BTreeMap::new()
    } else {
        backend
            .read_users(&UserSelection {
                groups: vec![],
                extensions,
            })
            .await?
            .users
            .into_iter()
            .map(|u| (u.extension.clone(), u))
            .collect()
    };
    let planned = revert::plan_revert(name, &rows, &current, kept);
    let plan = Plan {
        hash: planned.hash.clone(),
        generation: buc.metadata.generation.unwrap_or(0),
        targets: planned.rows.len() as u32,
        resolved: planned
            .rows
            .iter()
            .take(1000)
            .map(|r| r.target.clone())
            .collect(),
        changes: planned.changes as u32,
        spec_hash: spec_hash.to_string(),
        ..Default::default()
    };
    Ok((PlannedRows::All(planned.rows), plan))
}

/// The stored rows of the finished `K` named `name` in `reverting`'s namespace, verified
/// against the digests it recorded; RevertUnavailable when they cannot be trusted or read.
async fn original_rows<K: RunKind>(
    ctx: &Context,
    reverting: &K,
    name: &str,
) -> Result<Vec<Row>, Error> {
    let unavailable = |why: String| Error::RevertUnavailable {
        name: name.to_string(),
        why,
    };
    if name == reverting.name_any() {
        return Err(unavailable("a change cannot revert itself".into()));
    }
    let ns = reverting.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let original = api
        .get_opt(name)
        .await?
        .ok_or_else(|| unavailable(format!("no {} {name} in namespace {ns}", K::KIND)))?;
    let status = original.status().cloned().unwrap_or_default();
    let progress = status.progress.as_ref().ok_or_else(|| {
        unavailable("it has no recorded run (it was never planned or executed)".into())
    })?;
    if unfinished(&status) {
        return Err(unavailable(
            "it is still running: wait until it has finished, then the revert is planned".into(),
        ));
    }
    if status.phase == Phase::Validated {
        return Err(unavailable(
            "it was only validated (mode Validate): nothing was changed, nothing to revert".into(),
        ));
    }
    let digests = status
        .plan
        .as_ref()
        .map(|p| p.batch_digests.clone())
        .unwrap_or_default();
    Run::new(ctx, &original, None)
        .verified_all(progress.batches as usize, &digests)
        .await
        .map_err(|e| match e {
            Error::ResultsLost { name: cm } => unavailable(format!(
                "its results ConfigMap {cm} is missing or unreadable (pruned?), so what it changed is not known"
            )),
            Error::PlanTampered { name: cm } => unavailable(format!(
                "its results ConfigMap {cm} was edited since the operator wrote it, so its record cannot be trusted"
            )),
            e => e,
        })
}

/// Plans the revert of BulkPhoneChange `name` in `bpc`'s namespace: models and labels back.
pub(crate) async fn plan_phone_revert(
    ctx: &Context,
    bpc: &BulkPhoneChange,
    name: &str,
    backend: &dyn PbxBackend,
    spec_hash: &str,
) -> Result<(Vec<Row>, Plan), Error> {
    let rows = original_rows::<BulkPhoneChange>(ctx, bpc, name).await?;
    let extensions = revert::phone_owners(&rows);
    let current = if extensions.is_empty() {
        BTreeMap::new()
    } else {
        backend
            .read_phones(&UserSelection {
                groups: vec![],
                extensions,
            })
            .await?
            .into_iter()
            .map(|p| (p.id, p))
            .collect()
    };
    let planned = revert::plan_phone_revert(name, &rows, &current);
    let plan = Plan {
        hash: planned.hash.clone(),
        generation: bpc.metadata.generation.unwrap_or(0),
        targets: planned.rows.len() as u32,
        resolved: planned
            .rows
            .iter()
            .take(1000)
            .map(|r| r.target.clone())
            .collect(),
        changes: planned.changes as u32,
        spec_hash: spec_hash.to_string(),
        ..Default::default()
    };
    Ok((planned.rows, plan))
}
