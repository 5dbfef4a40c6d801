//! One controller per kind, sharing one [`Context`] and one [`Error`] type.
//!
//! The controllers are the thin Kubernetes edge: they read resources, call the pure planning
//! code and the PBX backend, and write status. Nothing here decides what a change means.

pub mod conditions;
mod pending;

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, future::Shared};
use kube::{Api, Client, Resource, runtime::watcher};

use crate::api::{BulkPhoneChange, BulkUserChange, PbxConnection, PhoneRestart, UserRecycle};
use crate::cli::RunArgs;

/// Errors of the controllers, each saying what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot find a Kubernetes API to talk to ({0}); set KUBECONFIG or run inside a cluster with a service account"
    )]
    NoCluster(#[source] kube::Error),
    #[error(
        "the {kind} CustomResourceDefinition is not installed or not readable ({source}); install the CRDs with `pbx-operator crds | kubectl apply -f -`"
    )]
    CrdMissing { kind: String, source: kube::Error },
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Error::NoCluster(_) => "no_cluster",
            Error::CrdMissing { .. } => "crd_missing",
            Error::Kube(_) => "kube",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// State shared by every reconcile.
pub struct Context {
    pub client: Client,
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

/// Runs every controller until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> Result<()> {
    let client = Client::try_default().await.map_err(Error::NoCluster)?;
    let shutdown = shutdown_signal();
    let ctx = Arc::new(Context {
        client: client.clone(),
    });

    check_crd::<PbxConnection>(&client, &args).await?;
    check_crd::<BulkUserChange>(&client, &args).await?;
    check_crd::<BulkPhoneChange>(&client, &args).await?;
    check_crd::<PhoneRestart>(&client, &args).await?;
    check_crd::<UserRecycle>(&client, &args).await?;
    tracing::info!(
        namespace = args.namespace.as_deref().unwrap_or("<all>"),
        "controllers starting"
    );

    let controllers = futures::future::join5(
        pending::run::<PbxConnection>(api(&client, &args), ctx.clone(), &args, shutdown.clone()),
        pending::run::<BulkUserChange>(api(&client, &args), ctx.clone(), &args, shutdown.clone()),
        pending::run::<BulkPhoneChange>(api(&client, &args), ctx.clone(), &args, shutdown.clone()),
        pending::run::<PhoneRestart>(api(&client, &args), ctx.clone(), &args, shutdown.clone()),
        pending::run::<UserRecycle>(api(&client, &args), ctx.clone(), &args, shutdown.clone()),
    );
    // Controllers stop taking work at the signal and finish what is in flight; a stuck
    // reconcile must not hold the process past the pod's termination grace period.
    tokio::select! {
        _ = controllers => {}
        _ = async { shutdown.clone().await; tokio::time::sleep(Duration::from_secs(20)).await } => {
            tracing::warn!("controllers did not stop within 20s of the signal; exiting anyway");
        }
    }
    tracing::info!("controllers stopped");
    Ok(())
}

fn api<K>(client: &Client, args: &RunArgs) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Fails fast with an actionable message when a CRD is missing, instead of a watch error loop.
async fn check_crd<K>(client: &Client, args: &RunArgs) -> Result<()>
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

/// Watcher settings shared by every controller.
fn watcher_config() -> watcher::Config {
    watcher::Config::default().any_semantic()
}
