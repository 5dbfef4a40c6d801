//! The one [`Context`] every reconcile shares: clients, backends, metrics, per-object backoff,
//! and the shutdown state that lets runs finish the step in flight.

use std::time::Duration;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

use super::{backends, connection, metrics};

/// State shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub backends: backends::Backends,
    pub recorder: Recorder,
    pub metrics: metrics::Metrics,
    /// Consecutive failures per object (uid), for backoff: error_policy has no per-object state.
    failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// How often PbxConnections re-read their Secrets.
    pub secret_check_interval: Duration,
    /// The largest CSV (after gunzip) a BulkUserChange may bring.
    pub max_csv_bytes: usize,
    /// Targets per batch of a run (see [`crate::plan::stored::Chunker`]).
    pub batch_size: usize,
    /// The last probe of each PbxConnection (namespace, name).
    pub probes:
        std::sync::Mutex<std::collections::HashMap<(String, String), connection::ProbeMemo>>,
    /// Ordering of operations per connection, and this process's shard.
    pub ordering: super::ordering::Ordering,
    /// Set at SIGTERM: runs finish and record the step in flight and start nothing new.
    stopping: std::sync::atomic::AtomicBool,
    /// Runs executing side effects right now: shutdown waits for them, not for idle watches.
    executing: std::sync::atomic::AtomicUsize,
}

impl Context {
    /// Counts one more failure of `uid` and returns how many came before it.
    pub fn failures(&self, uid: &str) -> u32 {
        let mut map = self.failures.lock().expect("not poisoned");
        let n = map.entry(uid.to_string()).or_default();
        *n += 1;
        *n - 1
    }

    /// From now on runs finish the step in flight and start nothing new.
    pub(super) fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn reset_failures(&self, uid: &str) {
        self.failures.lock().expect("not poisoned").remove(uid);
    }

    pub fn new(client: Client, secret_check_interval: Duration) -> Context {
        let reporter = Reporter {
            controller: "pbx-operator".into(),
            instance: std::env::var("POD_NAME")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok()),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            backends: backends::Backends::default(),
            metrics: metrics::Metrics::default(),
            failures: Default::default(),
            secret_check_interval,
            max_csv_bytes: crate::plan::sheet::DEFAULT_MAX_BYTES,
            batch_size: crate::plan::stored::CHUNK_ROWS,
            probes: Default::default(),
            ordering: Default::default(),
            stopping: false.into(),
            executing: 0.into(),
        }
    }

    /// Marks a run as executing side effects until the guard is dropped.
    pub(crate) fn executing(&self) -> Executing<'_> {
        self.executing
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Executing(self)
    }

    /// After a stop signal: resolves once no run is executing (after a short settle time), or
    /// at [`SHUTDOWN_GRACE`] at the latest.
    pub(super) async fn drained(&self) {
        let start = std::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let idle = self.executing.load(std::sync::atomic::Ordering::SeqCst) == 0;
            if start.elapsed() >= SHUTDOWN_GRACE || (idle && start.elapsed() >= SHUTDOWN_IDLE) {
                return;
            }
        }
    }

    /// Publishes an Event on `obj` (the audit trail). A failure to publish is logged, never fatal.
    pub async fn publish<K>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: Option<String>,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let event = Event {
            type_,
            reason: reason.into(),
            note,
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

impl Context {
    /// Backoff for an object that failed again: 5 s doubling to 5 min; 5 min for a person to act.
    pub fn backoff(&self, uid: &str, transient: bool) -> Duration {
        let n = self.failures(uid);
        if transient {
            Duration::from_secs(5u64 << n.min(6)).min(Duration::from_secs(300))
        } else {
            Duration::from_secs(300)
        }
    }
}

/// How long in-flight steps may take to finish and be recorded after SIGTERM; below the 30 s
/// Kubernetes gives a Pod before SIGKILL.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// How long an operator with no run executing waits for its controllers to stop.
pub(crate) const SHUTDOWN_IDLE: Duration = Duration::from_secs(3);

/// Held while a run executes side effects (see [`Context::executing`]).
pub(crate) struct Executing<'a>(&'a Context);

impl Drop for Executing<'_> {
    fn drop(&mut self) {
        self.0
            .executing
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
