//! The custom resources: what users write and what the operator reports back.
//!
//! Validation that the schema can express lives here (lengths, patterns, enums, CEL rules),
//! so the API server refuses bad input at admission, before any controller sees it.

pub mod common;
pub mod connection;
pub mod fields;
pub mod ledger;
pub mod phone_change;
pub mod phone_restart;
pub mod user_change;
pub mod user_recycle;

pub use common::*;
pub use connection::{PbxConnection, PbxConnectionSpec, PbxConnectionStatus};
pub use fields::*;
pub use ledger::LedgerRef;
pub use phone_change::{BulkPhoneChange, BulkPhoneChangeSpec};
pub use phone_restart::{PhoneRestart, PhoneRestartSpec, PhoneRestartStatus};
pub use user_change::{BulkUserChange, BulkUserChangeSpec, RevertOf, UserAction};
pub use user_recycle::{ResetItem, UserRecycle, UserRecycleSpec};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Every CRD this operator serves, in a stable order, with the file name each gets in crds/.
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("pbxconnection.yaml", PbxConnection::crd()),
        ("bulkuserchange.yaml", BulkUserChange::crd()),
        ("bulkphonechange.yaml", BulkPhoneChange::crd()),
        ("phonerestart.yaml", PhoneRestart::crd()),
        ("userrecycle.yaml", UserRecycle::crd()),
    ]
}

/// The YAML of one CRD exactly as crds/ stores it.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(crd)
}
