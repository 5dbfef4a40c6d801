//! Prometheus metrics, beside the controllers that update them.

use std::time::Instant;

use crate::pbx::{
    self, ActionOutcome, Capabilities, KeptSnapshot, NewIdentity, PbxBackend, Phone, PhoneField,
    Policies, Probe, Registration, ResetOutcome, RestoreOutcome, SipAnswer, UserAction, UserChange,
    UserField, UserRead, UserReset, UserRestore, UserSelection, WriteOutcome,
};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub kind: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    pub backend: String,
    pub call: String,
    /// The PbxConnection, `namespace/name` (see [`CONNECTION`]).
    pub connection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallErrorLabel {
    pub backend: String,
    pub call: String,
    pub reason: String,
    pub connection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

pub struct Metrics {
    pub reconciles: Family<KindLabel, Counter>,
    pub reconcile_failures: Family<ErrorLabel, Counter>,
    pub reconcile_duration: Family<KindLabel, Histogram>,
    pub targets: Family<OutcomeLabel, Counter>,
    pub pbx_call_duration: Family<CallLabel, Histogram>,
    pub pbx_call_errors: Family<CallErrorLabel, Counter>,
    pub notify_answers: Family<CodeLabel, Counter>,
    /// The controllers' watch caches, turned into gauges at each scrape.
    pub objects: std::sync::Arc<Objects>,
    /// The operator's requests to the API server (counted by the client's layer).
    pub api: super::api_load::ApiLoad,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciles: Family::default(),
            reconcile_failures: Family::default(),
            reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 14))
            }),
            targets: Family::default(),
            pbx_call_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            pbx_call_errors: Family::default(),
            notify_answers: Family::default(),
            objects: Default::default(),
            api: Default::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "pbx_operator_reconciles",
            "Reconciles per kind",
            self.reconciles.clone(),
        );
        registry.register(
            "pbx_operator_reconcile_failures",
            "Failed reconciles per kind and error",
            self.reconcile_failures.clone(),
        );
        registry.register(
            "pbx_operator_reconcile_duration_seconds",
            "Reconcile duration per kind",
            self.reconcile_duration.clone(),
        );
        registry.register(
            "pbx_operator_targets",
            "Targets processed per kind and outcome",
            self.targets.clone(),
        );
        registry.register(
            "pbx_operator_pbx_call_duration_seconds",
            "PBX backend call latency",
            self.pbx_call_duration.clone(),
        );
        registry.register(
            "pbx_operator_pbx_call_errors",
            "PBX backend call errors by reason",
            self.pbx_call_errors.clone(),
        );
        registry.register(
            "pbx_operator_notify_answers",
            "Final SIP answers to NOTIFYs by code",
            self.notify_answers.clone(),
        );
        registry.register_collector(Box::new(ObjectsCollector(self.objects.clone())));
        self.api.register(registry);
        registry.register(
            "pbx_operator_rpc_bytes_read",
            "Bytes of JSON-RPC replies read from the PBX, by method",
            crate::pbx::kamailio::rpc::BYTES_READ.clone(),
        );
    }

    /// Times one PBX call and counts its failure.
    pub async fn pbx_call<T>(
        &self,
        call: &str,
        fut: impl std::future::Future<Output = Result<T, crate::pbx::PbxError>>,
    ) -> Result<T, crate::pbx::PbxError> {
        let start = Instant::now();
        let result = fut.await;
        let connection = current_connection();
        let label = CallLabel {
            backend: "kamailio".into(),
            call: call.into(),
            connection: connection.clone(),
        };
        self.pbx_call_duration
            .get_or_create(&label)
            .observe(start.elapsed().as_secs_f64());
        if let Err(e) = &result {
            let label = CallErrorLabel {
                backend: "kamailio".into(),
                call: call.into(),
                reason: e.reason().into(),
                connection,
            };
            self.pbx_call_errors.get_or_create(&label).inc();
        }
        result
    }

    /// Counts a reconcile and records its duration when the returned guard drops.
    pub fn reconcile_timer(&self, kind: &str) -> ReconcileTimer {
        let label = KindLabel {
            kind: kind.to_string(),
        };
        self.reconciles.get_or_create(&label).inc();
        ReconcileTimer {
            histogram: self.reconcile_duration.get_or_create(&label).clone(),
            start: Instant::now(),
        }
    }

    pub fn failure(&self, kind: &str, error: &str) {
        self.reconcile_failures
            .get_or_create(&ErrorLabel {
                kind: kind.into(),
                error: error.into(),
            })
            .inc();
    }
}

pub struct ReconcileTimer {
    histogram: Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

/// A backend whose every call is timed and its failures counted (`pbx_call_*`): what the engine
/// and the planners call goes through it, so no call site has to remember the metrics.
pub struct Timed<'a> {
    pub inner: &'a dyn PbxBackend,
    pub metrics: &'a Metrics,
}

/// An Atomic change's transaction, its writes timed as `apply_user_changes` like any other.
struct TimedAtomic<'a> {
    inner: Box<dyn pbx::AtomicWrites + 'a>,
    metrics: &'a Metrics,
}

#[async_trait::async_trait]
impl pbx::AtomicWrites for TimedAtomic<'_> {
    async fn apply(&mut self, changes: &[UserChange]) -> pbx::Result<Vec<WriteOutcome>> {
        let call = self.inner.apply(changes);
        self.metrics.pbx_call("apply_user_changes", call).await
    }
    async fn commit(self: Box<Self>) -> pbx::Result<Option<String>> {
        let metrics = self.metrics;
        metrics.pbx_call("commit_atomic", self.inner.commit()).await
    }
    async fn rollback(self: Box<Self>) -> pbx::Result<()> {
        self.inner.rollback().await
    }
}

#[async_trait::async_trait]
impl PbxBackend for Timed<'_> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn probe(&self) -> pbx::Result<Probe> {
        self.metrics.pbx_call("probe", self.inner.probe()).await
    }
    async fn read_users(&self, s: &UserSelection) -> pbx::Result<UserRead> {
        self.metrics
            .pbx_call("read_users", self.inner.read_users(s))
            .await
    }
    async fn read_user_fields(
        &self,
        s: &UserSelection,
        fields: &[UserField],
    ) -> pbx::Result<UserRead> {
        let call = self.inner.read_user_fields(s, fields);
        self.metrics.pbx_call("read_users", call).await
    }
    async fn select_users(&self, s: &UserSelection) -> pbx::Result<pbx::Selected> {
        let call = self.inner.select_users(s);
        self.metrics.pbx_call("select_users", call).await
    }
    async fn extensions(&self) -> pbx::Result<Vec<String>> {
        self.metrics
            .pbx_call("extensions", self.inner.extensions())
            .await
    }
    async fn number_holders(&self, numbers: &[String]) -> pbx::Result<Vec<(String, String)>> {
        let call = self.inner.number_holders(numbers);
        self.metrics.pbx_call("number_holders", call).await
    }
    async fn policies(&self) -> pbx::Result<Policies> {
        self.metrics
            .pbx_call("policies", self.inner.policies())
            .await
    }
    async fn apply_user_changes(
        &self,
        changes: &[UserChange],
        atomic: bool,
    ) -> pbx::Result<Vec<WriteOutcome>> {
        let call = self.inner.apply_user_changes(changes, atomic);
        self.metrics.pbx_call("apply_user_changes", call).await
    }
    async fn begin_atomic(&self) -> pbx::Result<Option<Box<dyn pbx::AtomicWrites + '_>>> {
        let call = self.inner.begin_atomic();
        let inner = self.metrics.pbx_call("begin_atomic", call).await?;
        Ok(inner.map(|inner| {
            Box::new(TimedAtomic {
                inner,
                metrics: self.metrics,
            }) as Box<dyn pbx::AtomicWrites + '_>
        }))
    }
    async fn apply_actions(
        &self,
        actions: &[(String, UserAction)],
    ) -> pbx::Result<Vec<ActionOutcome>> {
        let call = self.inner.apply_actions(actions);
        self.metrics.pbx_call("apply_actions", call).await
    }
    async fn read_phones(&self, s: &UserSelection) -> pbx::Result<Vec<Phone>> {
        self.metrics
            .pbx_call("read_phones", self.inner.read_phones(s))
            .await
    }
    async fn apply_phone_changes(
        &self,
        changes: &[(i64, PhoneField, String, String)],
    ) -> pbx::Result<Vec<WriteOutcome>> {
        let call = self.inner.apply_phone_changes(changes);
        self.metrics.pbx_call("apply_phone_changes", call).await
    }
    async fn registrations(&self) -> pbx::Result<Vec<Registration>> {
        self.metrics
            .pbx_call("registrations", self.inner.registrations())
            .await
    }
    async fn lookup(&self, extension: &str) -> pbx::Result<Vec<Registration>> {
        self.metrics
            .pbx_call("lookup", self.inner.lookup(extension))
            .await
    }
    async fn lookup_many(&self, extensions: &[String]) -> pbx::Result<Vec<Registration>> {
        self.metrics
            .pbx_call("lookup_many", self.inner.lookup_many(extensions))
            .await
    }
    async fn notify(&self, to: &Registration, event: &str) -> pbx::Result<SipAnswer> {
        self.metrics
            .pbx_call("notify", self.inner.notify(to, event))
            .await
    }
    async fn drop_registrations(&self, extension: &str) -> pbx::Result<()> {
        let call = self.inner.drop_registrations(extension);
        self.metrics.pbx_call("drop_registrations", call).await
    }
    async fn reset_users(&self, resets: &[UserReset]) -> pbx::Result<Vec<ResetOutcome>> {
        let call = self.inner.reset_users(resets);
        self.metrics.pbx_call("reset_users", call).await
    }
    async fn recycle_users(&self, identities: &[NewIdentity]) -> pbx::Result<Vec<ResetOutcome>> {
        let call = self.inner.recycle_users(identities);
        self.metrics.pbx_call("recycle_users", call).await
    }
    async fn keep_snapshots(&self, run: &str, extensions: &[String]) -> pbx::Result<()> {
        let call = self.inner.keep_snapshots(run, extensions);
        self.metrics.pbx_call("keep_snapshots", call).await
    }
    async fn snapshots(&self, run: &str, extensions: &[String]) -> pbx::Result<Vec<KeptSnapshot>> {
        let call = self.inner.snapshots(run, extensions);
        self.metrics.pbx_call("snapshots", call).await
    }
    async fn restore_users(&self, restores: &[UserRestore]) -> pbx::Result<Vec<RestoreOutcome>> {
        let call = self.inner.restore_users(restores);
        self.metrics.pbx_call("restore_users", call).await
    }
    async fn expire_snapshots(&self, taken_before: i64) -> pbx::Result<u64> {
        let call = self.inner.expire_snapshots(taken_before);
        self.metrics.pbx_call("expire_snapshots", call).await
    }
}

// ---------------------------------------------------------------------------------------------
// Per-connection labels, and gauges computed at scrape time from the controllers' watch caches:
// what the chart's Grafana dashboard and PrometheusRule read.

tokio::task_local! {
    /// The PbxConnection (`namespace/name`) the running reconcile works through: set around every
    /// reconcile by the controllers, read by [`Metrics::pbx_call`] for its `connection` label.
    pub static CONNECTION: String;
}

/// The connection an object works through, as `namespace/name`: a PbxConnection's own name,
/// otherwise its spec.connectionRef.
pub fn connection_of<K>(obj: &K) -> String
where
    K: kube::Resource<DynamicType = ()> + serde::Serialize,
{
    let namespace = obj.meta().namespace.clone().unwrap_or_default();
    let name = if K::kind(&()) == "PbxConnection" {
        obj.meta().name.clone().unwrap_or_default()
    } else {
        serde_json::to_value(obj)
            .ok()
            .and_then(|v| {
                v["spec"]["connectionRef"]["name"]
                    .as_str()
                    .map(String::from)
            })
            .unwrap_or_default()
    };
    format!("{namespace}/{name}")
}

fn current_connection() -> String {
    CONNECTION.try_with(|c| c.clone()).unwrap_or_default()
}

type Source = Box<dyn Fn() -> Vec<serde_json::Value> + Send + Sync>;

/// The objects of every controller's watch cache, read at each scrape.
#[derive(Default)]
pub struct Objects {
    sources: std::sync::Mutex<Vec<(String, Source)>>,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Objects")
    }
}

impl Objects {
    /// Reads `store` (a controller's cache of kind `kind`) at every scrape.
    pub fn watch<K>(&self, kind: &str, store: kube::runtime::reflector::Store<K>)
    where
        K: kube::Resource<DynamicType = ()> + serde::Serialize + Clone + Send + Sync + 'static,
    {
        let read = move || {
            store
                .state()
                .iter()
                .filter_map(|o| serde_json::to_value(o.as_ref()).ok())
                .collect()
        };
        self.sources
            .lock()
            .expect("not poisoned")
            .push((kind.to_string(), Box::new(read)));
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub kind: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabel {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StalledLabel {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabel {
    pub namespace: String,
    pub name: String,
}

/// What the watch caches say, as metric values (pure: unit-tested without servers).
#[derive(Debug, Default, PartialEq)]
pub struct ObjectValues {
    /// (kind, phase) -> operations; every phase of every operation kind is present.
    pub phases: std::collections::BTreeMap<(String, String), i64>,
    /// Operations whose Stalled condition is True, with its reason.
    pub stalled: Vec<(ObjectKey, String)>,
    /// Enforce drift corrections so far (status.corrections), per operation.
    pub corrections: Vec<(ObjectKey, u64)>,
    /// PbxConnections and whether their Ready condition is True.
    pub ready: Vec<(ObjectKey, bool)>,
}

/// (kind, namespace, name)
pub type ObjectKey = (String, String, String);

const PHASES: [&str; 8] = [
    "Pending",
    "Validated",
    "Scheduled",
    "Running",
    "Succeeded",
    "PartiallyFailed",
    "Failed",
    "Expired",
];

fn condition_true<'a>(obj: &'a serde_json::Value, type_: &str) -> Option<&'a serde_json::Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_ && c["status"] == "True")
}

/// Counts objects of each kind by phase, and lists stalled ones, corrections and readiness.
pub fn object_values(objects: &[(String, Vec<serde_json::Value>)]) -> ObjectValues {
    let mut v = ObjectValues::default();
    for (kind, objs) in objects {
        let connection = kind == "PbxConnection";
        if !connection {
            for p in PHASES {
                v.phases.entry((kind.clone(), p.to_string())).or_insert(0);
            }
        }
        for o in objs {
            let key = (
                kind.clone(),
                o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                o["metadata"]["name"].as_str().unwrap_or("").to_string(),
            );
            if connection {
                v.ready.push((key, condition_true(o, "Ready").is_some()));
                continue;
            }
            let phase = o["status"]["phase"]
                .as_str()
                .unwrap_or("Pending")
                .to_string();
            *v.phases.entry((kind.clone(), phase)).or_insert(0) += 1;
            if let Some(c) = condition_true(o, super::conditions::STALLED) {
                let reason = c["reason"].as_str().unwrap_or("").to_string();
                v.stalled.push((key.clone(), reason));
            }
            if let Some(n) = o["status"]["corrections"].as_u64() {
                v.corrections.push((key, n));
            }
        }
    }
    v
}

/// Resident memory of this process (VmRSS), in bytes.
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[derive(Debug)]
struct ObjectsCollector(std::sync::Arc<Objects>);

impl prometheus_client::collector::Collector for ObjectsCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::Gauge;
        let objects: Vec<(String, Vec<serde_json::Value>)> = {
            let sources = self.0.sources.lock().expect("not poisoned");
            sources
                .iter()
                .map(|(k, read)| (k.clone(), read()))
                .collect()
        };
        let v = object_values(&objects);
        let label = |(kind, namespace, name): &ObjectKey| ObjectLabel {
            kind: kind.clone(),
            namespace: namespace.clone(),
            name: name.clone(),
        };

        let phases = Family::<PhaseLabel, Gauge>::default();
        for ((kind, phase), n) in &v.phases {
            let l = PhaseLabel {
                kind: kind.clone(),
                phase: phase.clone(),
            };
            phases.get_or_create(&l).set(*n);
        }
        let m = encoder.encode_descriptor(
            "pbx_operator_operations",
            "Operations per kind and phase, from the operator's watch cache",
            None,
            phases.metric_type(),
        )?;
        phases.encode(m)?;

        let stalled = Family::<StalledLabel, Gauge>::default();
        for (key, reason) in &v.stalled {
            let l = label(key);
            let l = StalledLabel {
                kind: l.kind,
                namespace: l.namespace,
                name: l.name,
                reason: reason.clone(),
            };
            stalled.get_or_create(&l).set(1);
        }
        let m = encoder.encode_descriptor(
            "pbx_operator_operation_stalled",
            "1 for every operation whose Stalled condition is True (a person must act), by reason",
            None,
            stalled.metric_type(),
        )?;
        stalled.encode(m)?;

        let corrections = Family::<ObjectLabel, Counter>::default();
        for (key, n) in &v.corrections {
            corrections.get_or_create(&label(key)).inc_by(*n);
        }
        let m = encoder.encode_descriptor(
            "pbx_operator_drift_corrections",
            "Enforce drift corrections per operation (status.corrections)",
            None,
            corrections.metric_type(),
        )?;
        corrections.encode(m)?;

        let ready = Family::<ConnectionLabel, Gauge>::default();
        for ((_, namespace, name), r) in &v.ready {
            let l = ConnectionLabel {
                namespace: namespace.clone(),
                name: name.clone(),
            };
            ready.get_or_create(&l).set(i64::from(*r));
        }
        let m = encoder.encode_descriptor(
            "pbx_operator_connection_ready",
            "1 when a PbxConnection's Ready condition is True, else 0",
            None,
            ready.metric_type(),
        )?;
        ready.encode(m)?;

        if let Some(bytes) = resident_memory_bytes() {
            let g = Gauge::<i64>::default();
            g.set(bytes as i64);
            let m = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size of the operator process in bytes",
                None,
                g.metric_type(),
            )?;
            g.encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod object_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn phases_stalled_corrections_and_readiness_from_the_cache() {
        let ops = vec![
            json!({"metadata": {"namespace": "acme", "name": "a"}, "status": {"phase": "Running"}}),
            json!({"metadata": {"namespace": "acme", "name": "b"}}),
            json!({"metadata": {"namespace": "acme", "name": "c"}, "status": {"phase": "Failed", "corrections": 4,
                "conditions": [{"type": "Stalled", "status": "True", "reason": "SecretNotUsable"}, {"type": "Ready", "status": "False"}]}}),
            json!({"metadata": {"namespace": "acme", "name": "d"}, "status": {"phase": "Succeeded",
                "conditions": [{"type": "Stalled", "status": "False", "reason": "X"}]}}),
        ];
        let conns = vec![
            json!({"metadata": {"namespace": "acme", "name": "up"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            json!({"metadata": {"namespace": "acme", "name": "down"}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
            json!({"metadata": {"namespace": "acme", "name": "new"}}),
        ];
        let v = object_values(&[
            ("BulkUserChange".into(), ops),
            ("PbxConnection".into(), conns),
        ]);
        let phase = |p: &str| v.phases[&("BulkUserChange".to_string(), p.to_string())];
        assert_eq!(
            (
                phase("Running"),
                phase("Pending"),
                phase("Failed"),
                phase("Succeeded"),
                phase("Expired")
            ),
            (1, 1, 1, 1, 0)
        );
        assert_eq!(
            v.phases.len(),
            8,
            "every phase, zeros included; none for connections"
        );
        let key = |n: &str| {
            (
                "BulkUserChange".to_string(),
                "acme".to_string(),
                n.to_string(),
            )
        };
        assert_eq!(v.stalled, vec![(key("c"), "SecretNotUsable".to_string())]);
        assert_eq!(v.corrections, vec![(key("c"), 4)]);
        let ready: Vec<bool> = v.ready.iter().map(|(_, r)| *r).collect();
        assert_eq!(ready, [true, false, false]);
    }

    #[test]
    fn memory_is_read() {
        assert!(resident_memory_bytes().unwrap() > 1024 * 1024);
    }
}
