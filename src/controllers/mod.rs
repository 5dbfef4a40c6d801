//! One controller per kind, sharing one [`Context`] and one [`Error`] type.
//!
//! The controllers are the thin Kubernetes edge: they read resources, call the pure planning
//! code and the PBX backend, and write status. Nothing here decides what a change means.

mod api_load;
pub mod backends;
pub mod conditions;
mod connection;
mod context;
mod csv_source;
mod error;
mod leader;
mod ledger;
mod lineage;
pub mod metrics;
mod ordering;
pub mod phone_change;
pub mod phone_restart;
pub mod results_store;
mod retry;
mod revert;
mod run;
mod server;
pub mod user_change;
pub mod user_recycle;

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, future::Shared};
use kube::{
    Api, Client, Resource,
    runtime::{controller::Action, watcher},
};

use crate::api::{BulkPhoneChange, BulkUserChange, PbxConnection, PhoneRestart, UserRecycle};
pub(crate) use conditions::{mark_blocked, mark_finished};
pub use context::Context;
pub(crate) use context::SHUTDOWN_GRACE;
pub use error::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shared by every controller: log, count, and retry later.
pub(crate) fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    match err {
        // Not failures: the wait or the refusal is in the resource's conditions.
        Error::Waiting => return Action::requeue(Duration::from_secs(3)),
        Error::Contradicts => return Action::requeue(Duration::from_secs(30)),
        _ => {}
    }
    let kind = K::kind(&());
    ctx.metrics.failure(&kind, err.label());
    tracing::warn!(%kind, name = obj.meta().name.as_deref().unwrap_or(""), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

/// A future that completes on SIGTERM or SIGINT, cloneable so every controller can await it.
pub type Shutdown = Shared<futures::future::BoxFuture<'static, ()>>;

fn shutdown_signal() -> Shutdown {
    async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on Unix");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        }
    }
    .boxed()
    .shared()
}

/// How the controllers run: the `pbx-operator run` flags, as the controllers see them.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch only this namespace (None: all).
    pub namespace: Option<String>,
    /// Resources of one kind reconciled at the same time.
    pub concurrency: u16,
    pub metrics_addr: std::net::SocketAddr,
    pub leader_election: bool,
    pub secret_check_interval: Duration,
    pub max_csv_bytes: usize,
    /// Targets per batch of a run.
    pub batch_size: usize,
    /// Serve only PbxConnections labelled `pbx-operator.io/shard: <shard>` and the operations
    /// on them (None: connections without the label).
    pub shard: Option<String>,
}

/// Runs every controller until SIGTERM or SIGINT (or, with leader election, until the Lease
/// is lost: the process then exits and its restart waits to be leader again).
pub async fn run(args: Settings) -> Result<()> {
    let api_load = api_load::ApiLoad::default();
    let config = kube::Config::infer()
        .await
        .map_err(|e| Error::NoCluster(kube::Error::InferConfig(e)))?;
    let client = kube::client::ClientBuilder::try_from(config)
        .map_err(Error::NoCluster)?
        .with_layer(&api_load)
        .build();
    let shutdown = shutdown_signal();
    let mut context = Context::new(client.clone(), args.secret_check_interval);
    context.metrics.api = api_load;
    context.max_csv_bytes = args.max_csv_bytes;
    context.batch_size = args.batch_size;
    context.ordering.shard = args.shard.clone();
    let ctx = Arc::new(context);
    let health = Arc::new(server::Health {
        ready: false.into(),
        leader: false.into(),
    });
    {
        let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.await;
            ctx.stop();
        });
    }
    let mut registry = prometheus_client::registry::Registry::default();
    ctx.metrics.register(&mut registry);
    server::serve(args.metrics_addr, registry, health.clone())
        .await
        .map_err(|e| Error::Serve(args.metrics_addr, e))?;

    check_crd::<PbxConnection>(&client, &args).await?;
    check_crd::<BulkUserChange>(&client, &args).await?;
    check_crd::<BulkPhoneChange>(&client, &args).await?;
    check_crd::<PhoneRestart>(&client, &args).await?;
    check_crd::<UserRecycle>(&client, &args).await?;
    health
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);

    let mut leadership = None;
    if args.leader_election {
        let lease_name = ordering::lease_name(args.shard.as_deref());
        let (mut lease, task) =
            leader::acquire(client.clone(), shutdown.clone(), &lease_name).await?;
        if !*lease.borrow() {
            tracing::info!("shutting down before becoming leader");
            return Ok(());
        }
        health
            .leader
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let lost = async move {
            while lease.changed().await.is_ok() {
                if !*lease.borrow() {
                    break;
                }
            }
        };
        leadership = Some((lost, task));
    } else {
        health
            .leader
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::info!(
        namespace = args.namespace.as_deref().unwrap_or("<all>"),
        shard = args.shard.as_deref().unwrap_or("<none>"),
        "controllers starting"
    );

    let c = args.concurrency;
    let controllers = futures::future::join5(
        ordering::drive_connections(
            api::<PbxConnection>(&client, &args),
            ctx.clone(),
            c,
            shutdown.clone(),
            connection::reconcile,
        ),
        ordering::drive_op(
            api::<BulkUserChange>(&client, &args),
            api::<PbxConnection>(&client, &args),
            ctx.clone(),
            c,
            shutdown.clone(),
            user_change::reconcile,
        ),
        ordering::drive_op(
            api::<BulkPhoneChange>(&client, &args),
            api::<PbxConnection>(&client, &args),
            ctx.clone(),
            c,
            shutdown.clone(),
            phone_change::reconcile,
        ),
        ordering::drive_op(
            api::<PhoneRestart>(&client, &args),
            api::<PbxConnection>(&client, &args),
            ctx.clone(),
            c,
            shutdown.clone(),
            phone_restart::reconcile,
        ),
        ordering::drive_op(
            api::<UserRecycle>(&client, &args),
            api::<PbxConnection>(&client, &args),
            ctx.clone(),
            c,
            shutdown.clone(),
            user_recycle::reconcile,
        ),
    );
    let (lost, lease_task) = match leadership {
        Some((lost, task)) => (futures::future::Either::Left(lost), Some(task)),
        None => (
            futures::future::Either::Right(futures::future::pending::<()>()),
            None,
        ),
    };
    // Controllers stop taking work at the signal and finish what is in flight. A reconcile
    // stuck on an unreachable PBX must not hold the process: progress is recorded before every
    // side effect, so the next start resumes where this one stopped.
    tokio::select! {
        _ = controllers => {}
        _ = async { shutdown.clone().await; ctx.drained().await } => {
            tracing::warn!("controllers did not stop after the signal; no run is executing (or {SHUTDOWN_GRACE:?} passed): exiting anyway");
        }
        _ = lost => {
            // Another replica may already be working: stop at once rather than race it.
            return Err(Error::LeadershipLost);
        }
    }
    if let Some(task) = lease_task {
        task.abort();
    }
    tracing::info!("controllers stopped");
    Ok(())
}

fn api<K>(client: &Client, args: &Settings) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Fails fast with an actionable message when a CRD is missing, instead of a watch error loop.
async fn check_crd<K>(client: &Client, args: &Settings) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    api::<K>(client, args)
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await
        .map(|_| ())
        .map_err(|source| Error::CrdMissing {
            kind: K::kind(&()).into_owned(),
            source,
        })
}

/// Server-side applies a resource's whole status as the operator's field manager, so fields a
/// run no longer sets are removed rather than left stale.
pub(crate) async fn apply_status<K>(
    ctx: &Context,
    obj: &K,
    status: &impl serde::Serialize,
) -> Result<()>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    use kube::ResourceExt;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let params = kube::api::PatchParams::apply(results_store::MANAGER).force();
    api.patch_status(&obj.name_any(), &params, &kube::api::Patch::Apply(&body))
        .await?;
    Ok(())
}

/// A run that cannot start or go on: records why in conditions (phase Failed when a person must
/// act and nothing has run yet), writes status if that changed it, and retries with backoff.
/// Transient causes keep an interrupted batch's rows InProgress, to be resumed.
pub(crate) async fn block_run<K, S>(
    ctx: &Context,
    obj: &K,
    current: Option<&crate::api::OperationStatus<S>>,
    mut status: crate::api::OperationStatus<S>,
    err: &Error,
) -> Result<Action>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    S: serde::Serialize + PartialEq,
{
    status.observed_generation = obj.meta().generation;
    let transient = mark_blocked(&mut status.conditions, err, status.observed_generation);
    if !transient && status.progress.is_none() {
        status.phase = crate::api::Phase::Failed;
    }
    if Some(&status) != current {
        apply_status(ctx, obj, &status).await?;
    }
    let uid = obj.meta().uid.clone().unwrap_or_default();
    Ok(Action::requeue(ctx.backoff(&uid, transient)))
}

/// How Events name who asked: " (requested by alice)", or nothing.
pub(crate) fn requested_by_note(requested_by: Option<&str>) -> String {
    requested_by
        .map(|u| format!(" (requested by {u})"))
        .unwrap_or_default()
}

/// Watcher settings shared by every controller.
fn watcher_config() -> watcher::Config {
    watcher::Config::default().any_semantic()
}
