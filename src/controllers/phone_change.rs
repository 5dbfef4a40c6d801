//! BulkPhoneChange: set fields on many phones (only Open locks), first of all the model, which is
//! assigned only when every selected phone has the same vendor.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::{
    ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use sha2::{Digest, Sha256};

use super::conditions::{self, Desired};
use super::results_store::Store;
use super::{Context, Error};
use crate::api::{
    BulkPhoneChange, FieldChange, Lock, Mode, OperationStatus, Outcome, Phase, Plan, Progress,
    Summary,
};
use crate::engine::results;
use crate::pbx::kamailio::Kamailio;
use crate::pbx::{PbxBackend, PhoneField, UserSelection, WriteOutcome};
use crate::plan::PlanError;
use crate::plan::phones::{self, PhoneFilter};
use crate::plan::stored::{self, PhoneTarget, Row, StoredWrite};

const KIND: &str = "BulkPhoneChange";

fn spec_hash(b: &BulkPhoneChange) -> String {
    let mut v = serde_json::to_value(&b.spec).expect("specs serialize");
    if let Some(o) = v.as_object_mut() {
        for k in ["mode", "approvedPlanHash", "requestedBy"] {
            o.remove(k);
        }
    }
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}

/// The Open fields of a change, as (field, value).
fn open_fields(b: &BulkPhoneChange) -> Vec<(PhoneField, String)> {
    let f = &b.spec.fields;
    let mut out = Vec::new();
    if let Some(m) = f.model.as_ref().filter(|m| m.lock == Lock::Open) {
        out.push((PhoneField::Model, m.value.0.clone()));
    }
    if let Some(l) = f.label.as_ref().filter(|l| l.lock == Lock::Open) {
        out.push((PhoneField::Label, l.value.0.clone()));
    }
    out
}

#[tracing::instrument(skip_all, fields(change = %b.name_any(), namespace = b.namespace()))]
pub(crate) async fn reconcile(b: Arc<BulkPhoneChange>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer(KIND);
    let status = b.status.clone().unwrap_or_default();
    let run_id = format!("g{}", b.metadata.generation.unwrap_or(0));
    if status
        .progress
        .as_ref()
        .is_some_and(|p| p.run == run_id && p.done >= p.batches)
    {
        return Ok(Action::await_change());
    }
    let ns = b.namespace().unwrap_or_default();
    let store = Store::new(&ctx.client, &*b);
    let outcome = async {
        let (_, backend) = ctx
            .backends
            .by_name(&ctx.client, &ns, &b.spec.connection_ref.name)
            .await
            .map_err(|e| (e, None))?;
        let validated = status.phase == Phase::Validated
            && b.spec.mode == Mode::Execute
            && status
                .plan
                .as_ref()
                .is_some_and(|p| p.spec_hash == spec_hash(&b));
        let (rows, plan) = if validated {
            let n = status
                .progress
                .as_ref()
                .map(|p| p.batches as usize)
                .unwrap_or(0);
            (
                store.read_all(n).await.map_err(|e| (e, None))?,
                status.plan.clone().expect("checked"),
            )
        } else {
            plan(&b, &backend, &ctx).await?
        };
        if b.spec.mode == Mode::Execute {
            if let Some(approved) = b
                .spec
                .approved_plan_hash
                .as_ref()
                .filter(|h| **h != plan.hash)
            {
                return Err((
                    Error::PlanChanged {
                        approved: approved.clone(),
                        current: plan.hash.clone(),
                    },
                    Some(plan),
                ));
            }
        }
        Ok((rows, plan, backend))
    }
    .await;
    let (mut rows, plan, backend) = match outcome {
        Ok(v) => v,
        Err((e, plan)) => return blocked(&b, &ctx, status, &e, plan).await,
    };
    let generation = b.metadata.generation;
    let t = conditions::now();
    let mut next = OperationStatus {
        observed_generation: generation,
        plan: Some(plan.clone()),
        start_time: Some(t.clone()),
        conditions: status.conditions.clone(),
        ..Default::default()
    };
    if b.spec.mode == Mode::Execute {
        execute(&backend, &ctx, &mut rows)
            .await
            .map_err(Error::Pbx)?;
    }
    let chunks = stored::chunk(rows);
    for (i, c) in chunks.iter().enumerate() {
        next.results_refs.push(store.write(i, c).await?);
    }
    store.prune(chunks.len()).await?;
    let all: Vec<&Row> = chunks.iter().flatten().collect();
    let (shown, truncated) = results::for_status(all.iter().copied());
    next.results = shown;
    next.results_truncated = truncated;
    next.progress = Some(Progress {
        run: run_id,
        batches: chunks.len() as u32,
        done: chunks.len() as u32,
        ..Default::default()
    });
    next.completion_time = Some(t.clone());
    let mut summary = results::summarize(all.iter().copied());
    let (message, ok) = if b.spec.mode == Mode::Validate {
        next.phase = Phase::Validated;
        summary.changed = plan.changes;
        let m = format!(
            "planned: {} phones, {} would change; plan hash {}",
            plan.targets, plan.changes, plan.hash
        );
        conditions::upsert(
            &mut next.conditions,
            Desired {
                type_: conditions::VALIDATED,
                status: true,
                reason: "Planned",
                message: m.clone(),
            },
            generation,
            &t,
        );
        (m, true)
    } else {
        let bad = summary.failed + summary.conflicts;
        next.phase = if bad == 0 {
            Phase::Succeeded
        } else if bad < summary.targets {
            Phase::PartiallyFailed
        } else {
            Phase::Failed
        };
        let m = format!(
            "{} phones: {} changed, {} unchanged, {} failed, {} conflicts",
            summary.targets, summary.changed, summary.unchanged, summary.failed, summary.conflicts
        );
        (m, bad == 0)
    };
    next.summary = Some(summary);
    let reason = format!("{:?}", next.phase);
    super::mark_finished(&mut next.conditions, ok, &reason, &message, generation);
    write_status(&b, &ctx, &next).await?;
    let who = super::requested_by_note(b.spec.requested_by.as_deref());
    ctx.publish(
        &*b,
        if ok {
            EventType::Normal
        } else {
            EventType::Warning
        },
        if b.spec.mode == Mode::Validate {
            "Validated"
        } else {
            "Finished"
        },
        "Change",
        Some(format!("{message}{who}")),
    )
    .await;
    ctx.reset_failures(&b.uid().unwrap_or_default());
    Ok(Action::await_change())
}

async fn plan(
    b: &BulkPhoneChange,
    backend: &Kamailio,
    ctx: &Context,
) -> Result<(Vec<Row>, Plan), (Error, Option<Plan>)> {
    let t = &b.spec.targets;
    let selection = UserSelection {
        groups: t.groups.clone(),
        extensions: t.extensions.clone(),
    };
    let m = &ctx.metrics;
    let err = |e: crate::pbx::PbxError| (Error::Pbx(e), None);
    let users = m
        .pbx_call("read_users", backend.read_users(&selection))
        .await
        .map_err(err)?;
    let provisioned = m
        .pbx_call("read_phones", backend.read_phones(&selection))
        .await
        .map_err(err)?;
    let filter = PhoneFilter {
        exclude: t.exclude.clone(),
        models: t.models.clone(),
        vendors: t.vendors.clone(),
        max_targets: t.max_targets,
    };
    let names: Vec<String> = users.users.iter().map(|u| u.extension.clone()).collect();
    let selected: Vec<_> = phones::select(&names, &provisioned, &[], &filter)
        .map_err(|e| (Error::Plan(e), None))?
        .into_iter()
        .filter(|p| p.id.is_some())
        .collect();
    let open = open_fields(b);
    let vendors = phones::vendors(&selected);
    if open.iter().any(|(f, _)| *f == PhoneField::Model) && vendors.len() > 1 {
        let list = vendors.into_iter().collect::<Vec<_>>().join(", ");
        return Err((
            Error::Plan(PlanError::Invalid(format!(
                "a model can only be assigned to phones of one vendor, and the selection has phones of {list}: narrow spec.targets.vendors to one of them; nothing was changed"
            ))),
            None,
        ));
    }
    let current = |p: &phones::SelectedPhone, f: PhoneField| -> String {
        match f {
            PhoneField::Model => p.model.clone().unwrap_or_default(),
            PhoneField::Label => provisioned
                .iter()
                .find(|x| Some(x.id) == p.id)
                .and_then(|x| x.label.clone())
                .unwrap_or_default(),
        }
    };
    let mut common = BTreeMap::new();
    let named: Vec<(PhoneField, bool)> = [
        (
            PhoneField::Model,
            b.spec.fields.model.as_ref().map(|f| f.lock),
        ),
        (
            PhoneField::Label,
            b.spec.fields.label.as_ref().map(|f| f.lock),
        ),
    ]
    .into_iter()
    .filter_map(|(f, l)| l.map(|l| (f, l == Lock::Open)))
    .collect();
    for (f, _) in &named {
        let mut values = selected.iter().map(|p| current(p, *f));
        if let Some(first) = values.next() {
            let same = values.all(|v| v == first);
            common.insert(f.name().to_string(), same.then_some(first));
        }
    }
    let mut hasher = Sha256::new();
    let mut rows = Vec::new();
    for p in &selected {
        let mut writes = Vec::new();
        let mut changes = Vec::new();
        for (f, value) in &open {
            let from = current(p, *f);
            hasher.update(format!("{}\t{}\t{from}\t{value}\n", p.target(), f.name()).as_bytes());
            if from != *value {
                writes.push(StoredWrite {
                    field: f.name().into(),
                    from: Some(from.clone()),
                    to: Some(value.clone()),
                    secret: false,
                });
                changes.push(FieldChange {
                    field: f.name().into(),
                    from: Some(from),
                    to: Some(value.clone()),
                });
            }
        }
        rows.push(Row {
            target: p.target(),
            outcome: if writes.is_empty() {
                Outcome::Unchanged
            } else {
                Outcome::Planned
            },
            writes,
            actions: vec![],
            changes,
            notes: vec![],
            phone: Some(PhoneTarget {
                id: p.id,
                extension: p.extension.clone(),
                mac: p.mac.clone(),
                vendor: p.vendor.clone(),
                model: p.model.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let plan = Plan {
        hash: hex::encode(hasher.finalize()),
        generation: b.metadata.generation.unwrap_or(0),
        targets: rows.len() as u32,
        resolved: rows.iter().take(1000).map(|r| r.target.clone()).collect(),
        common_values: common,
        closed_fields: named
            .iter()
            .filter(|(_, open)| !open)
            .map(|(f, _)| f.name().to_string())
            .collect(),
        changes: rows
            .iter()
            .filter(|r| r.outcome == Outcome::Planned)
            .count() as u32,
        spec_hash: spec_hash(b),
        csv: None,
        batch_digests: vec![],
    };
    Ok((rows, plan))
}

/// Applies the planned writes with compare-and-set; a write already in place (a resumed run)
/// counts as done.
async fn execute(
    backend: &Kamailio,
    ctx: &Context,
    rows: &mut [Row],
) -> Result<(), crate::pbx::PbxError> {
    let mut calls = Vec::new();
    let mut owners = Vec::new();
    for (i, r) in rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.outcome == Outcome::Planned)
    {
        let Some(id) = r.phone.as_ref().and_then(|p| p.id) else {
            continue;
        };
        for w in &r.writes {
            let field = if w.field == "model" {
                PhoneField::Model
            } else {
                PhoneField::Label
            };
            calls.push((
                id,
                field,
                w.from.clone().unwrap_or_default(),
                w.to.clone().unwrap_or_default(),
            ));
            owners.push(i);
        }
    }
    if calls.is_empty() {
        return Ok(());
    }
    let outcomes = ctx
        .metrics
        .pbx_call("apply_phone_changes", backend.apply_phone_changes(&calls))
        .await?;
    let mut failed: BTreeMap<usize, String> = BTreeMap::new();
    for ((i, call), outcome) in owners.iter().zip(&calls).zip(outcomes) {
        if outcome != WriteOutcome::Applied {
            failed.insert(
                *i,
                format!(
                    "{} changed since the plan was made (was {:?}); left alone",
                    call.1.name(),
                    call.2
                ),
            );
        }
    }
    for (i, r) in rows.iter_mut().enumerate() {
        if r.outcome != Outcome::Planned {
            continue;
        }
        match failed.remove(&i) {
            Some(note) => {
                r.outcome = Outcome::Conflict;
                r.notes.push(note);
            }
            None => r.outcome = Outcome::Changed,
        }
    }
    Ok(())
}

async fn write_status(
    b: &BulkPhoneChange,
    ctx: &Context,
    status: &OperationStatus,
) -> Result<(), Error> {
    super::apply_status(ctx, b, status).await
}

async fn blocked(
    b: &BulkPhoneChange,
    ctx: &Context,
    mut status: OperationStatus,
    err: &Error,
    plan: Option<Plan>,
) -> Result<Action, Error> {
    let generation = b.metadata.generation;
    status.observed_generation = generation;
    if plan.is_some() {
        status.plan = plan;
    }
    let transient = super::mark_blocked(&mut status.conditions, err, generation);
    if let Error::Plan(PlanError::Invalid(m)) = err {
        if m.contains("one vendor") {
            // A more precise reason than InvalidChange, for people and for alerts.
            for c in status
                .conditions
                .iter_mut()
                .filter(|c| c.type_ != conditions::RECONCILING)
            {
                c.reason = "MixedVendors".into();
            }
        }
    }
    if !transient {
        status.phase = Phase::Failed;
        status.summary.get_or_insert_with(Summary::default);
    }
    if Some(&status) != b.status.as_ref() {
        write_status(b, ctx, &status).await?;
    }
    Ok(Action::requeue(
        ctx.backoff(&b.uid().unwrap_or_default(), transient),
    ))
}
