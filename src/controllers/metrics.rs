//! Prometheus metrics, beside the controllers that update them.

use std::time::Instant;

use crate::pbx::{
    self, ActionOutcome, Capabilities, NewIdentity, PbxBackend, Phone, PhoneField, Policies, Probe,
    Registration, ResetOutcome, SipAnswer, UserAction, UserChange, UserField, UserRead, UserReset,
    UserSelection, WriteOutcome,
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
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallErrorLabel {
    pub backend: String,
    pub call: String,
    pub reason: String,
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
        let label = CallLabel {
            backend: "kamailio".into(),
            call: call.into(),
        };
        self.pbx_call_duration
            .get_or_create(&label)
            .observe(start.elapsed().as_secs_f64());
        if let Err(e) = &result {
            let label = CallErrorLabel {
                backend: "kamailio".into(),
                call: call.into(),
                reason: e.reason().into(),
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
}
