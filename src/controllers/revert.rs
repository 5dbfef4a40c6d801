//! Undo, the Kubernetes side: reads the finished change a revert names (its stored rows,
//! verified against the digests it recorded) and the targets as the PBX holds them now, then
//! plans the revert with the pure planner (plan::revert). Nothing is written here.

use std::collections::BTreeMap;

use kube::{Api, Resource, ResourceExt};

use super::run::RunKind;
use super::run::{Run, unfinished};
use super::{Context, Error};
use crate::api::{BulkPhoneChange, BulkUserChange, OperationStatus, Phase, Plan, UserRecycle};
use crate::pbx::{PbxBackend, UserSelection};
use crate::plan::revert::{self, RevertPlan, Snapshots};
use crate::plan::stored::{Row, StepKind, StepState};

/// The key a run keeps its snapshots and records its restores under in the PBX: its ledger
/// entry (which outlives the cluster), or the object's uid where the run has none.
pub(crate) fn run_key(obj: &impl Resource, status: &OperationStatus) -> String {
    status
        .ledger
        .as_ref()
        .map(|l| l.id.clone())
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| format!("uid:{}", obj.meta().uid.clone().unwrap_or_default()))
}

/// The snapshots the original's rows `targets` say were kept (each row records the run its
/// snapshot went under), and who holds their numbers now.
async fn snapshots_of(
    backend: &dyn PbxBackend,
    original: &[Row],
    targets: &[String],
) -> Result<Snapshots, Error> {
    let mut by_run: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in original.iter().filter(|r| targets.contains(&r.target)) {
        if let Some(run) = &r.snapshot_run {
            by_run.entry(run).or_default().push(r.target.clone());
        }
    }
    let mut snapshots = Snapshots::default();
    for (run, extensions) in by_run {
        for k in backend.snapshots(run, &extensions).await? {
            snapshots.kept.insert(k.extension.clone(), k);
        }
    }
    let numbers = snapshots.numbers();
    if !numbers.is_empty() {
        snapshots.holders = backend
            .number_holders(&numbers)
            .await?
            .into_iter()
            .collect();
    }
    Ok(snapshots)
}

fn status_plan(planned: &RevertPlan, generation: i64, spec_hash: &str) -> Plan {
    Plan {
        hash: planned.hash.clone(),
        generation,
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
    }
}

/// Plans the revert of BulkUserChange `name` in `buc`'s namespace. `kept`: a retry's rows that
/// went through (kept as they are).
pub(crate) async fn plan_user_revert(
    ctx: &Context,
    buc: &BulkUserChange,
    name: &str,
    backend: &dyn PbxBackend,
    kept: Vec<Row>,
    spec_hash: &str,
) -> Result<(Vec<Row>, Plan), Error> {
    let original = original::<BulkUserChange>(ctx, buc, name).await?;
    let current = crate::pbx::users_by_extension(backend, revert::targets(&original)).await?;
    let removed: Vec<String> = original
        .iter()
        .filter(|r| {
            r.steps
                .iter()
                .any(|s| s.kind == StepKind::Remove && s.state == StepState::Done)
        })
        .map(|r| r.target.clone())
        .collect();
    let snapshots = snapshots_of(backend, &original, &removed).await?;
    let planned = revert::plan_revert(name, &original, &current, &snapshots, kept);
    let plan = status_plan(&planned, buc.metadata.generation.unwrap_or(0), spec_hash);
    Ok((planned.rows, plan))
}

/// Plans the revert of UserRecycle `name` in `urc`'s namespace: earlier identities back from
/// the snapshots the recycle kept.
pub(crate) async fn plan_recycle_revert(
    ctx: &Context,
    urc: &UserRecycle,
    name: &str,
    backend: &dyn PbxBackend,
    kept: Vec<Row>,
) -> Result<(Vec<Row>, Plan), Error> {
    let original = original::<UserRecycle>(ctx, urc, name).await?;
    let targets = revert::recycled(&original);
    let current = crate::pbx::users_by_extension(backend, targets.clone()).await?;
    let snapshots = snapshots_of(backend, &original, &targets).await?;
    let planned = revert::plan_recycle_revert(name, &original, &current, &snapshots, kept);
    // A UserRecycle's plan pins no spec hash: it has no Validate and approve.
    let plan = status_plan(&planned, urc.metadata.generation.unwrap_or(0), "");
    Ok((planned.rows, plan))
}

/// The stored rows of the finished `K` named `name` in `reverting`'s namespace, verified
/// against the digests it recorded; RevertUnavailable when they cannot be trusted or read.
async fn original<K: RunKind>(ctx: &Context, reverting: &K, name: &str) -> Result<Vec<Row>, Error> {
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
    let rows = original::<BulkPhoneChange>(ctx, bpc, name).await?;
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
    let plan = status_plan(&planned, bpc.metadata.generation.unwrap_or(0), spec_hash);
    Ok((planned.rows, plan))
}
