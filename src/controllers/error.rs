//! The controllers' one error type: each variant says what to do next, carries a label for
//! metrics and conditions, and knows whether waiting may fix it.

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
    #[error("cannot serve metrics on {0}: {1}; choose another --metrics-addr")]
    Serve(std::net::SocketAddr, #[source] std::io::Error),
    #[error(
        "cannot take part in leader election: {0}; check the operator may get, create and update Leases in its namespace"
    )]
    LeaderElection(String),
    #[error("lost the leader Lease; exiting so that only one replica works at a time")]
    LeadershipLost,
    #[error(
        "cannot use key {key:?} of Secret {namespace}/{name}: {detail}; create the Secret or fix the reference"
    )]
    SecretMissing {
        namespace: String,
        name: String,
        key: String,
        detail: String,
    },
    #[error(
        "Secret {namespace}/{name} (key {key:?}, named in {field}) does not exist or is not usable by changes: it lacks the label pbx-operator.io/usable-by-changes=\"true\". Nothing was read or changed. If the Secret's owner agrees that changes in {namespace} may use it, they add the label (kubectl label secret -n {namespace} {name} pbx-operator.io/usable-by-changes=true) and the change is retried within 5 minutes; otherwise name a Secret meant for changes"
    )]
    SecretNotUsable {
        namespace: String,
        name: String,
        key: String,
        field: String,
    },
    #[error(
        "PbxConnection {namespace}/{name} does not exist; create it or fix spec.connectionRef.name"
    )]
    ConnectionMissing { namespace: String, name: String },
    #[error(transparent)]
    Pbx(#[from] crate::pbx::PbxError),
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    #[error(
        "the plan changed since it was approved (approved {approved}, now {current}): review status.plan, then set spec.approvedPlanHash to the new hash"
    )]
    PlanChanged { approved: String, current: String },
    #[error(
        "the results ConfigMap {name} is missing or unreadable, so what this run did cannot be known; nothing was changed or deleted. Restore it, or delete and re-create the resource to start over"
    )]
    ResultsLost { name: String },
    #[error(
        "the stored plan in ConfigMap {name} is not the one the operator stored (it was edited since; status.plan.batchDigests records each batch): nothing of it was executed. Change the spec or re-create the resource to plan again, and find out who edited it"
    )]
    PlanTampered { name: String },
    #[error(transparent)]
    Engine(#[from] crate::engine::Error),
    #[error(
        "a Secret this change reads (spec.fields.*.valueFrom) changed while the change ran: the rest is not written with a value nobody reviewed. Set the retry annotation pbx-operator.io/retry to plan what is left with the new value, or restore the Secret"
    )]
    SecretChanged,
    #[error(
        "cannot read spec.source.csv from ConfigMap {namespace}/{name} key {key:?}: {detail}; create it or fix the reference"
    )]
    CsvSourceMissing {
        namespace: String,
        name: String,
        key: String,
        detail: String,
    },
    #[error("the CSV in spec.source.csv is refused, nothing was changed: {0}")]
    Csv(#[from] crate::plan::sheet::SheetError),
    /// The run waits before it starts (the reason is in its conditions); not a failure.
    #[error("the run waits for an earlier operation or its connection; see its conditions")]
    Waiting,
    /// An Enforce change refused for contradicting an earlier one (the reason is in its
    /// conditions).
    #[error("the change contradicts an earlier Enforce change; see its conditions")]
    Contradicts,
    #[error(
        "cannot revert {name}: {why}; nothing was changed. Fix spec.revertOf or the change it names"
    )]
    RevertUnavailable { name: String, why: String },
}

impl Error {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Error::NoCluster(_) => "no_cluster",
            Error::CrdMissing { .. } => "crd_missing",
            Error::Kube(_) => "kube",
            Error::Serve(..) => "serve",
            Error::LeaderElection(_) => "leader_election",
            Error::LeadershipLost => "leadership_lost",
            Error::SecretMissing { .. } => "secret_missing",
            Error::SecretNotUsable { .. } => "secret_not_usable",
            Error::ConnectionMissing { .. } => "connection_missing",
            Error::Pbx(e) => e.reason(),
            Error::Plan(_) => "plan",
            Error::PlanChanged { .. } => "plan_changed",
            Error::ResultsLost { .. } => "results_lost",
            Error::PlanTampered { .. } => "plan_tampered",
            Error::SecretChanged => "secret_changed",
            Error::Engine(crate::engine::Error::Pbx(e)) => e.reason(),
            Error::Engine(_) => "journal",
            Error::CsvSourceMissing { .. } => "csv_source_missing",
            Error::Csv(_) => "csv_refused",
            Error::Waiting => "waiting",
            Error::Contradicts => "contradicts",
            Error::RevertUnavailable { .. } => "revert_unavailable",
        }
    }

    /// A reason for conditions, in the PascalCase kstatus readers expect.
    pub fn label_camel(&self) -> &'static str {
        match self {
            Error::NoCluster(_) => "NoCluster",
            Error::CrdMissing { .. } => "CrdMissing",
            Error::Kube(_) => "KubernetesError",
            Error::Serve(..) => "ServeFailed",
            Error::LeaderElection(_) | Error::LeadershipLost => "LeaderElection",
            Error::SecretMissing { .. } => "SecretNotReadable",
            Error::SecretNotUsable { .. } => "SecretNotUsable",
            Error::ConnectionMissing { .. } => "ConnectionNotFound",
            Error::Pbx(e) => e.reason(),
            Error::Plan(crate::plan::PlanError::TooManyTargets { .. }) => "TooManyTargets",
            Error::Plan(_) => "InvalidChange",
            Error::PlanChanged { .. } => "PlanHashMismatch",
            Error::ResultsLost { .. } => "ResultsLost",
            Error::PlanTampered { .. } => "PlanTampered",
            Error::SecretChanged => "SecretChanged",
            Error::Engine(crate::engine::Error::Pbx(e)) => e.reason(),
            Error::Engine(_) => "JournalNotWritable",
            Error::CsvSourceMissing { .. } => "CsvSourceNotReadable",
            Error::Csv(_) => "CsvRefused",
            Error::Waiting => "Waiting",
            Error::Contradicts => "ContradictsEarlierChange",
            Error::RevertUnavailable { .. } => "RevertUnavailable",
        }
    }

    /// Whether waiting may fix it (a PBX or database down, an API hiccup), as opposed to a
    /// mistake a person must correct.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Pbx(e) => e.is_transient(),
            Error::Engine(e) => e.is_transient(),
            Error::Kube(_) | Error::Waiting => true,
            Error::ConnectionMissing { .. }
            | Error::SecretMissing { .. }
            | Error::CsvSourceMissing { .. } => true,
            _ => false,
        }
    }
}

impl From<crate::engine::planning::PlanningError> for Error {
    fn from(e: crate::engine::planning::PlanningError) -> Self {
        use crate::engine::planning::PlanningError;
        match e {
            PlanningError::Pbx(e) => Error::Pbx(e),
            PlanningError::Plan(e) => Error::Plan(e),
            PlanningError::Csv(e) => Error::Csv(e),
            // The reader of the earlier run is this module's: its own error comes back.
            PlanningError::Earlier(e) => match e.downcast::<Error>() {
                Ok(e) => *e,
                Err(e) => Error::Engine(crate::engine::Error::Journal(e.to_string())),
            },
        }
    }
}
