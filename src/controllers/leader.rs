//! Leader election through a coordination.k8s.io Lease, so of several replicas one works.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Error, Shutdown};

pub const LEASE_NAME: &str = "pbx-operator";

/// Waits until this replica holds the Lease (or shutdown comes first) and returns the channel
/// that reports losing it.
pub async fn acquire(
    client: Client,
    shutdown: Shutdown,
    lease_name: &str,
) -> Result<
    (
        watch::Receiver<bool>,
        JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
    ),
    Error,
> {
    let namespace =
        std::env::var("POD_NAMESPACE").unwrap_or_else(|_| client.default_namespace().to_string());
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "pbx-operator".into());
        format!("{host}-{}", std::process::id())
    });
    let manager = LeaseManagerBuilder::new(client, lease_name)
        .with_namespace(&namespace)
        .with_identity(&identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .map_err(|e| Error::LeaderElection(e.to_string()))?;
    let (mut lease, task) = manager.watch().await;
    tracing::info!(%identity, %namespace, lease = lease_name, "waiting to become leader");
    tokio::select! {
        _ = async { while !*lease.borrow_and_update() { if lease.changed().await.is_err() { break; } } } => {
            if *lease.borrow() {
                tracing::info!(%identity, "became leader");
            }
        }
        _ = shutdown => {}
    }
    Ok((lease, task))
}
