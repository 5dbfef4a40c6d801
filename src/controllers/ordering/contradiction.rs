//! Enforce changes that contradict each other: the later one is refused (Stalled) while the
//! earlier one keeps its desired state, and looks again until the contradiction is gone.

use super::*;

pub(super) fn stalled_by_contradiction(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> bool {
    conds
        .iter()
        .any(|c| c.type_ == conditions::STALLED && c.status == "True" && c.reason == CONTRADICTS)
}

/// The first earlier Enforce change on the same connection that `mine` contradicts, and how.
/// Its targets: the resolved targets of its plan (the first 1,000), or those this process
/// recorded when it ran.
pub(super) fn contradicted<K: Operation + Resource>(
    ctx: &Context,
    obj: &K,
    mine: &Targets,
    fields: &BTreeMap<String, Option<String>>,
) -> Option<(String, ordering::Contested)> {
    let store = ctx.ordering.store::<BulkUserChange>()?;
    let ns = obj.meta().namespace.clone();
    let me = obj.meta().uid.clone().unwrap_or_default();
    let created_me = created(obj);
    let mut earlier: Vec<_> = store
        .state()
        .into_iter()
        .filter(|o| {
            o.namespace() == ns
                && o.connection() == obj.connection()
                && o.uid().unwrap_or_default() != me
                && o.meta().deletion_timestamp.is_none()
                && created(&**o) < created_me
        })
        .collect();
    earlier.sort_by_key(|o| created(&**o));
    for other in earlier {
        let Some(theirs) = other.enforced() else {
            continue;
        };
        let status = other.status.clone().unwrap_or_default();
        if stalled_by_contradiction(&status.conditions)
            || matches!(status.phase, Phase::Failed | Phase::PartiallyFailed)
        {
            continue;
        }
        let mut targets = TargetsBuilder::default();
        for t in status.plan.iter().flat_map(|p| &p.resolved) {
            targets.insert(&ordering::user(t));
        }
        if let Some(k) = ctx
            .ordering
            .known
            .lock()
            .expect("not poisoned")
            .get(&other.uid().unwrap_or_default())
        {
            for key in k.targets.iter() {
                targets.insert(key);
            }
        }
        let targets = targets.finish();
        let desired = |targets, fields| ordering::Desired { targets, fields };
        if let Some(c) = ordering::contradiction(desired(&targets, &theirs), desired(mine, fields))
        {
            return Some((format!("BulkUserChange {}", other.name_any()), c));
        }
    }
    None
}

/// Refuses an Enforce change that contradicts an earlier one: Stalled (phase Failed), nothing
/// run; it looks again every 30 s and plans afresh once the contradiction is gone.
pub(super) async fn refuse<K: RunKind>(
    ctx: &Context,
    obj: &K,
    mut status: OperationStatus<K::Summary>,
    message: String,
) -> Result<(), Error> {
    let generation = obj.meta().generation;
    let before = obj.status();
    let moved = before.is_none_or(|b| {
        !b.conditions.iter().any(|c| {
            c.type_ == conditions::STALLED && c.reason == CONTRADICTS && c.message == message
        })
    });
    status.observed_generation = generation;
    status.phase = Phase::Failed;
    status.progress = None;
    status.start_time = None;
    status.completion_time = None;
    let now = conditions::now();
    for (type_, on) in [(conditions::READY, false), (conditions::STALLED, true)] {
        let desired = Desired {
            type_,
            status: on,
            reason: CONTRADICTS,
            message: message.clone(),
        };
        conditions::upsert(&mut status.conditions, desired, generation, &now);
    }
    conditions::remove(&mut status.conditions, conditions::RECONCILING);
    if Some(&status) != before {
        crate::controllers::apply_status(ctx, obj, &status).await?;
    }
    if moved {
        ctx.publish(
            obj,
            EventType::Warning,
            "Contradiction",
            "Order",
            Some(message),
        )
        .await;
    }
    Ok(())
}
