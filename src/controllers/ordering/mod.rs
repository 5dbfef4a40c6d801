//! Many changes, many tenants: the Kubernetes side of ordering operations per PbxConnection
//! (the rule itself is [`crate::plan::ordering`]), shards, and waiting for a connection.
//!
//! - Before a run starts executing, [`admit`] (one call from the shared lifecycle) decides
//!   whether it may: not while an operation that runs shares a target with it, nor while an
//!   earlier one that waits does, nor beyond the connection's `spec.limits.concurrentOperations`.
//!   A waiting run is phase Pending, with the reason in its conditions, and is planned afresh
//!   when it starts (the earlier one moved its targets).
//! - What runs, the controllers' own caches tell (no API reads); which targets a run holds,
//!   this process records when it admits it, and reads from the run's journal (its results
//!   ConfigMaps) once when it does not know (after a restart).
//! - An Enforce change that contradicts an earlier one on the same connection is refused
//!   ([`contradiction`]).
//! - [`drive_op`] ([`drive`]) runs an operation kind's controller: it serves only operations whose
//!   connection belongs to this process's shard, keeps operations waiting on a connection
//!   that is not Ready, wakes them when their connection changes, and keeps a waiting
//!   operation waiting without planning it again while nothing it waits for moved.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, controller::Action, events::EventType, watcher};
use kube::{Api, Resource, ResourceExt};

use super::conditions::{self, Desired};
use super::ledger::Ledgered;
use super::lineage::Lineage;
use super::run::{Run, RunKind};
use super::{Context, Error, Shutdown};
use crate::api::{
    BulkPhoneChange, BulkUserChange, Mode, OperationStatus, PbxConnection, Phase, PhoneRestart,
    Policy, UserRecycle,
};
use crate::plan::ordering::{self, Created, Decision, Other, State, Targets, TargetsBuilder};
use crate::plan::stored::Row;
use crate::plan::user_change as request;
use crate::plan::users::Wanted;

mod contradiction;
mod drive;

use contradiction::{contradicted, refuse, stalled_by_contradiction};
pub(crate) use drive::{drive_connections, drive_op, lease_name};

/// The label that puts a PbxConnection in a shard (`pbx-operator run --shard NAME`).
pub const SHARD_LABEL: &str = "pbx-operator.io/shard";

/// How often a waiting operation looks again (it is also woken when a run on its connection is
/// admitted or ends, and when the connection changes).
const WAIT_AGAIN: Duration = Duration::from_secs(3);
/// An admitted run not seen running in the cache after this long did not start.
const ADMISSION_TTL: Duration = Duration::from_secs(60);

/// The condition reason of an Enforce change refused for contradicting an earlier one.
pub const CONTRADICTS: &str = "ContradictsEarlierChange";
/// How often a refused Enforce change looks whether the contradiction is gone.
const CONTRADICTION_AGAIN: Duration = Duration::from_secs(30);

/// Condition reasons of an operation that waits before it starts.
pub const WAITING_REASONS: [&str; 3] = [
    "WaitingForEarlierOperation",
    "ConcurrencyLimit",
    "ConnectionNotReady",
];

/// What ordering needs to know of an operation kind.
/// `connection()` and `executes()` (Validate runs neither wait nor hold anyone back) come from
/// [`Ledgered`], so there is one answer to "which PBX, does it write" for every gate.
pub(crate) trait Operation: Ledgered {
    /// A stored row's target as the ordering keys it (users and phones apart), with the other
    /// users a row touches (numbers it takes from them).
    fn targets_of(row: &Row, out: &mut TargetsBuilder);
    /// A change that keeps a desired state (Enforce): the value of each plain field it sets.
    fn enforced(&self) -> Option<BTreeMap<String, Option<String>>> {
        None
    }
}

fn user_targets(row: &Row, out: &mut TargetsBuilder) {
    out.insert(&ordering::user(&row.target));
    for t in &row.takes {
        out.insert(&ordering::user(&t.holder));
    }
    for g in &row.gives {
        out.insert(&ordering::user(g));
    }
}

impl Operation for BulkUserChange {
    fn targets_of(row: &Row, out: &mut TargetsBuilder) {
        user_targets(row, out)
    }
    /// CSV-sourced changes set values per row and are not compared.
    fn enforced(&self) -> Option<BTreeMap<String, Option<String>>> {
        let spec = &self.spec;
        if spec.policy != Policy::Enforce || spec.mode != Mode::Execute || spec.source.is_some() {
            return None;
        }
        let fields = spec
            .fields
            .as_ref()
            .map(request::plain_fields)
            .unwrap_or_default();
        Some(
            fields
                .into_iter()
                .filter(|f| f.open)
                .filter_map(|f| match f.wanted {
                    Wanted::Value(v) => Some((f.field.name().to_string(), v)),
                    Wanted::Secret(_) => None,
                })
                .collect(),
        )
    }
}

impl Operation for UserRecycle {
    fn targets_of(row: &Row, out: &mut TargetsBuilder) {
        user_targets(row, out)
    }
}

impl Operation for BulkPhoneChange {
    fn targets_of(row: &Row, out: &mut TargetsBuilder) {
        out.insert(&ordering::phone(&row.target));
    }
}

impl Operation for PhoneRestart {
    fn targets_of(row: &Row, out: &mut TargetsBuilder) {
        out.insert(&ordering::phone(&row.target));
    }
}

/// What this process knows of an operation's targets.
struct Known {
    /// The run (progress.run) or, for a waiting operation, the lineage they belong to.
    run: String,
    targets: Arc<Targets>,
    /// Admitted by this process at: counts as running until the cache shows its run.
    admitted: Option<Instant>,
}

/// The ordering state of one operator process.
pub struct Ordering {
    /// Serves only connections of this shard (None: connections without the label).
    pub shard: Option<String>,
    /// One decision at a time, so two runs cannot both take the last place.
    gate: tokio::sync::Mutex<()>,
    known: std::sync::Mutex<HashMap<String, Known>>,
    /// The controllers' caches, by kind.
    stores: std::sync::Mutex<HashMap<TypeId, Box<dyn Any + Send + Sync>>>,
    /// A connection (namespace, name) where a run was admitted or an operation's reconcile
    /// ended: the operations waiting on it look again at once instead of at their next poll.
    wake: tokio::sync::broadcast::Sender<(String, String)>,
}

impl Default for Ordering {
    fn default() -> Self {
        Ordering {
            shard: None,
            gate: Default::default(),
            known: Default::default(),
            stores: Default::default(),
            wake: tokio::sync::broadcast::channel(1024).0,
        }
    }
}

impl Ordering {
    fn register<K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static>(
        &self,
        store: Store<K>,
    ) {
        self.stores
            .lock()
            .expect("not poisoned")
            .insert(TypeId::of::<K>(), Box::new(store));
    }

    fn store<K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static>(
        &self,
    ) -> Option<Store<K>> {
        self.stores
            .lock()
            .expect("not poisoned")
            .get(&TypeId::of::<K>())
            .and_then(|s| s.downcast_ref::<Store<K>>())
            .cloned()
    }

    /// Whether this process serves a connection with these labels.
    pub fn serves(&self, conn: &PbxConnection) -> bool {
        conn.labels().get(SHARD_LABEL) == self.shard.as_ref()
    }

    /// The label selector of the connections this process serves.
    pub fn selector(&self) -> String {
        match &self.shard {
            Some(s) => format!("{SHARD_LABEL}={s}"),
            None => format!("!{SHARD_LABEL}"),
        }
    }

    fn forget(&self, uid: &str) {
        self.known.lock().expect("not poisoned").remove(uid);
    }

    fn wake(&self, namespace: &str, connection: &str) {
        // No receiver yet (before the controllers start) is fine: nobody waits.
        let _ = self
            .wake
            .send((namespace.to_string(), connection.to_string()));
    }
}

/// The lineage key of an operation that waits (its targets hold until its spec or retry moves).
fn lineage_key<K: Resource>(obj: &K) -> String {
    let l = Lineage::of(obj);
    format!("lineage-g{}-{}", l.generation, l.retry.unwrap_or_default())
}

fn created<K: Resource>(obj: &K) -> Created {
    Created {
        at: obj
            .meta()
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(i64::MAX),
        name: obj.meta().name.clone().unwrap_or_default(),
    }
}

fn is_waiting_reason(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    conds
        .iter()
        .any(|c| c.type_ == conditions::READY && WAITING_REASONS.contains(&c.reason.as_str()))
}

fn stalled(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    conds
        .iter()
        .any(|c| c.type_ == conditions::STALLED && c.status == "True")
}

/// Another operation as ordering sees it, before its targets are looked up.
struct Seen {
    id: String,
    uid: String,
    created: Created,
    state: State,
    /// Its run (running) or lineage (waiting), which known targets must belong to.
    run: String,
}

/// The operations of kind `K` on connection `ns/conn` other than `me`, from the cache.
async fn collect<K>(ctx: &Context, ns: &str, conn: &str, me: &str, out: &mut Vec<Seen>)
where
    K: RunKind + Operation + 'static,
{
    let Some(store) = ctx.ordering.store::<K>() else {
        return;
    };
    for obj in store.state() {
        let uid = obj.uid().unwrap_or_default();
        if uid == me
            || obj.namespace().as_deref() != Some(ns)
            || obj.connection() != conn
            || obj.meta().deletion_timestamp.is_some()
            || !obj.executes()
        {
            continue;
        }
        let default = OperationStatus::default();
        let status = obj.status().unwrap_or(&default);
        let id = format!("{} {}", K::KIND, obj.name_any());
        let admitted = {
            let mut known = ctx.ordering.known.lock().expect("not poisoned");
            let entry = known
                .get(&uid)
                .and_then(|k| k.admitted.map(|at| (at, k.run.clone())));
            match entry {
                Some((at, run)) => {
                    let shown = status.progress.as_ref().is_some_and(|p| p.run == run);
                    let over = shown && !super::run::unfinished(status);
                    if over || (!shown && at.elapsed() > ADMISSION_TTL) {
                        known.remove(&uid);
                        None
                    } else {
                        Some(run)
                    }
                }
                None => None,
            }
        };
        let (state, run) = if let Some(run) = admitted {
            (State::Running, run)
        } else if super::run::unfinished(status) {
            let run = status
                .progress
                .as_ref()
                .map(|p| p.run.clone())
                .unwrap_or_default();
            (State::Running, run)
        } else {
            // Going to run: not started yet (or its spec changed since), and not blocked on
            // something of its own (a person must act, or it waits for a Secret or the PBX).
            let fresh = status.phase == Phase::Pending
                || status.observed_generation != obj.meta().generation;
            let blocked = !status.conditions.is_empty()
                && !is_waiting_reason(&status.conditions)
                && status.phase == Phase::Pending
                && status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == conditions::READY && c.status == "False");
            if !fresh || blocked || stalled(&status.conditions) || status.phase == Phase::Scheduled
            {
                continue;
            }
            (State::Waiting, lineage_key(&*obj))
        };
        out.push(Seen {
            id,
            uid,
            created: created(&*obj),
            state,
            run,
        });
    }
}

/// The targets of a running operation this process did not admit, read from its journal.
async fn load<K>(ctx: &Context, ns: &str, uid: &str) -> Option<Arc<Targets>>
where
    K: RunKind + Operation + 'static,
{
    let store = ctx.ordering.store::<K>()?;
    let obj = store
        .state()
        .into_iter()
        .find(|o| o.uid().as_deref() == Some(uid) && o.namespace().as_deref() == Some(ns))?;
    let progress = obj.status()?.progress.clone()?;
    let run = Run::new(ctx, &*obj, None);
    let targets = Arc::new(run_targets(&run, progress.batches).await.ok()?);
    ctx.ordering.known.lock().expect("not poisoned").insert(
        uid.to_string(),
        Known {
            run: progress.run,
            targets: targets.clone(),
            admitted: None,
        },
    );
    Some(targets)
}

/// The targets of a run's stored batches, read a batch at a time.
async fn run_targets<K: RunKind>(
    run: &Run<'_, K>,
    batches: u32,
) -> Result<Targets, crate::engine::Error> {
    use crate::engine::Store as _;
    let mut targets = TargetsBuilder::default();
    for index in 0..batches as usize {
        for row in &run.load(index).await? {
            K::targets_of(row, &mut targets);
        }
    }
    Ok(targets.finish())
}

/// Every other operation on `ns/conn`, with the targets known of each.
async fn others(
    ctx: &Context,
    ns: &str,
    conn: &str,
    me: &str,
) -> Vec<(Seen, Option<Arc<Targets>>)> {
    let mut seen = Vec::new();
    collect::<BulkUserChange>(ctx, ns, conn, me, &mut seen).await;
    collect::<BulkPhoneChange>(ctx, ns, conn, me, &mut seen).await;
    collect::<PhoneRestart>(ctx, ns, conn, me, &mut seen).await;
    collect::<UserRecycle>(ctx, ns, conn, me, &mut seen).await;
    let mut out = Vec::with_capacity(seen.len());
    for s in seen {
        let known = {
            let known = ctx.ordering.known.lock().expect("not poisoned");
            known
                .get(&s.uid)
                .filter(|k| k.run == s.run)
                .map(|k| k.targets.clone())
        };
        let targets = match known {
            Some(t) => Some(t),
            None if s.state == State::Running => {
                let kind = s.id.split(' ').next().unwrap_or_default();
                match kind {
                    "BulkUserChange" => load::<BulkUserChange>(ctx, ns, &s.uid).await,
                    "BulkPhoneChange" => load::<BulkPhoneChange>(ctx, ns, &s.uid).await,
                    "PhoneRestart" => load::<PhoneRestart>(ctx, ns, &s.uid).await,
                    "UserRecycle" => load::<UserRecycle>(ctx, ns, &s.uid).await,
                    _ => None,
                }
            }
            None => None,
        };
        out.push((s, targets));
    }
    out
}

/// The connection's limit of operations at once, from the cache (default when not cached).
fn limit(ctx: &Context, ns: &str, conn: &str) -> u32 {
    ctx.ordering
        .store::<PbxConnection>()
        .and_then(|s| s.get(&ObjectRef::new(conn).within(ns)))
        .map(|c| c.spec.concurrent_operations())
        .unwrap_or(4)
}

fn decide(
    ctx: &Context,
    ns: &str,
    conn: &str,
    created: &Created,
    mine: &Targets,
    others: &[(Seen, Option<Arc<Targets>>)],
) -> Decision {
    let view: Vec<Other<'_>> = others
        .iter()
        .map(|(s, t)| Other {
            id: s.id.clone(),
            created: s.created.clone(),
            state: s.state,
            targets: t.as_deref(),
        })
        .collect();
    ordering::decide(created, mine, &view, limit(ctx, ns, conn))
}

/// Records in `status` that the operation waits (phase Pending, nothing of a run kept but the
/// plan it would run, for people), and writes it when that changed it.
async fn wait<K: RunKind>(
    ctx: &Context,
    obj: &K,
    mut status: OperationStatus<K::Summary>,
    reason: &str,
    message: String,
) -> Result<(), Error> {
    let generation = obj.meta().generation;
    let before = obj.status();
    let moved = before.is_none_or(|b| {
        !b.conditions
            .iter()
            .any(|c| c.type_ == conditions::READY && c.reason == reason && c.message == message)
    });
    status.observed_generation = generation;
    status.phase = Phase::Pending;
    status.progress = None;
    status.start_time = None;
    status.completion_time = None;
    let now = conditions::now();
    for (type_, on) in [(conditions::READY, false), (conditions::RECONCILING, true)] {
        let desired = Desired {
            type_,
            status: on,
            reason,
            message: message.clone(),
        };
        conditions::upsert(&mut status.conditions, desired, generation, &now);
    }
    conditions::remove(&mut status.conditions, conditions::STALLED);
    if Some(&status) != before {
        super::apply_status(ctx, obj, &status).await?;
    }
    if moved {
        ctx.publish(obj, EventType::Normal, "Waiting", "Order", Some(message))
            .await;
    }
    Ok(())
}

/// Called by the shared lifecycle just before a run starts executing (its plan stored, the
/// status it would start with in `status`): Ok when it may start now, otherwise the wait is
/// recorded in status and [`Error::Waiting`] returned (the reconcile ends and looks again).
pub(crate) async fn admit<K>(
    run: &Run<'_, K>,
    status: &OperationStatus<K::Summary>,
) -> Result<(), Error>
where
    K: RunKind,
{
    let (ctx, obj) = (run.ctx, run.obj);
    if !obj.executes() {
        return Ok(());
    }
    let Some(progress) = status.progress.clone() else {
        return Ok(());
    };
    let mine = run_targets(run, progress.batches)
        .await
        .map_err(Error::Engine)?;
    let ns = obj.namespace().unwrap_or_default();
    let conn = obj.connection().to_string();
    let uid = obj.uid().unwrap_or_default();
    let mine = Arc::new(mine);
    // A retry finishes a run that already went (its plan builds on that run's journal, which
    // planning it again would lose): it starts at once.
    let lineage = Lineage::of(obj);
    let retry = lineage.retry.is_some()
        && obj
            .status()
            .and_then(|s| s.progress.as_ref())
            .is_some_and(|p| lineage.same_generation(p));
    if let Some(fields) = obj.enforced().filter(|_| !retry)
        && let Some((earlier, c)) = contradicted(ctx, obj, &mine, &fields)
    {
        let message = c.message(&earlier, &format!("{} {}", K::KIND, obj.name_any()));
        tracing::warn!(kind = K::KIND, name = %obj.name_any(), %earlier, "refused: contradicts an earlier Enforce change");
        refuse(ctx, obj, status.clone(), message).await?;
        return Err(Error::Contradicts);
    }
    let decision = {
        let _gate = ctx.ordering.gate.lock().await;
        let others = others(ctx, &ns, &conn, &uid).await;
        let decision = if retry {
            Decision::Start
        } else {
            decide(ctx, &ns, &conn, &created(obj), &mine, &others)
        };
        let (run_key, admitted) = match decision {
            Decision::Start => (progress.run.clone(), Some(Instant::now())),
            Decision::Wait(_) => (lineage_key(obj), None),
        };
        ctx.ordering.known.lock().expect("not poisoned").insert(
            uid.clone(),
            Known {
                run: run_key,
                targets: mine.clone(),
                admitted,
            },
        );
        decision
    };
    match decision {
        Decision::Start => {
            ctx.ordering.wake(&ns, &conn);
            Ok(())
        }
        Decision::Wait(reason) => {
            tracing::info!(kind = K::KIND, name = %obj.name_any(), reason = %reason.message(), "waiting before the run starts");
            wait(ctx, obj, status.clone(), reason.code(), reason.message()).await?;
            Err(Error::Waiting)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lease_per_shard_and_the_old_one_without() {
        assert_eq!(lease_name(None), "pbx-operator");
        assert_eq!(lease_name(Some("eu-1")), "pbx-operator-shard-eu-1");
    }

    #[test]
    fn a_process_serves_its_shards_connections_only() {
        let conn = |label: Option<&str>| {
            let mut c = PbxConnection::new(
                "c",
                serde_json::from_value(serde_json::json!({
                    "domain": "pbx.test",
                    "database": { "urlSecretRef": { "name": "s", "key": "db" } },
                    "rpc": { "urlSecretRef": { "name": "s", "key": "rpc" } },
                }))
                .unwrap(),
            );
            if let Some(l) = label {
                c.metadata.labels = Some([(SHARD_LABEL.to_string(), l.to_string())].into());
            }
            c
        };
        let unsharded = Ordering::default();
        assert!(unsharded.serves(&conn(None)));
        assert!(!unsharded.serves(&conn(Some("a"))));
        assert_eq!(unsharded.selector(), "!pbx-operator.io/shard");
        let a = Ordering {
            shard: Some("a".into()),
            ..Default::default()
        };
        assert!(a.serves(&conn(Some("a"))));
        assert!(!a.serves(&conn(Some("b"))));
        assert!(!a.serves(&conn(None)));
        assert_eq!(a.selector(), "pbx-operator.io/shard=a");
    }
}
