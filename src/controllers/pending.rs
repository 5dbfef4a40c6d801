//! The controller every kind starts with: it acknowledges each generation in status
//! (observedGeneration, kstatus conditions) and says plainly that the kind does nothing yet,
//! so that nobody mistakes silence for success. Kinds move to their own module as they are built.

use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{Controller, controller::Action},
};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::conditions::{self, Desired};
use super::{Context, Error, Shutdown, watcher_config};
use crate::api::{BulkPhoneChange, BulkUserChange, PhoneRestart, UserRecycle};
use crate::cli::RunArgs;

/// What this module needs to know about a kind's status.
pub trait AcknowledgedStatus {
    fn observed_generation(&self) -> Option<i64>;
    fn conditions(&self) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>;
}

macro_rules! acknowledged_status {
    ($($kind:ty),*) => {$(
        impl AcknowledgedStatus for $kind {
            fn observed_generation(&self) -> Option<i64> {
                self.status.as_ref().and_then(|s| s.observed_generation)
            }
            fn conditions(&self) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
                self.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default()
            }
        }
    )*};
}
acknowledged_status!(BulkUserChange, BulkPhoneChange, PhoneRestart, UserRecycle);

pub async fn run<K>(api: Api<K>, ctx: Arc<Context>, args: &RunArgs, shutdown: Shutdown)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + AcknowledgedStatus
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let config = kube::runtime::controller::Config::default().concurrency(args.concurrency);
    Controller::new(api, watcher_config())
        .with_config(config)
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<K>, super::error_policy::<K>, ctx)
        .for_each(|outcome| async move {
            if let Err(err) = outcome {
                tracing::warn!(kind = %K::kind(&()), error = %err, "reconcile failed");
            }
        })
        .await;
}

#[tracing::instrument(skip_all, fields(kind = %K::kind(&()), name = %obj.name_any(), namespace = obj.namespace()))]
async fn reconcile<K>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + AcknowledgedStatus
        + Clone
        + DeserializeOwned
        + Debug,
{
    let generation = obj.meta().generation;
    if generation.is_some() && obj.observed_generation() == generation {
        return Ok(Action::await_change());
    }
    let kind = K::kind(&());
    let mut conds = obj.conditions();
    let now = conditions::now();
    let message = format!(
        "the {kind} controller is not implemented in this version of pbx-operator; nothing was changed on the PBX"
    );
    conditions::upsert(
        &mut conds,
        Desired {
            type_: conditions::READY,
            status: false,
            reason: "NotImplemented",
            message: message.clone(),
        },
        generation,
        &now,
    );
    conditions::upsert(
        &mut conds,
        Desired {
            type_: conditions::STALLED,
            status: true,
            reason: "NotImplemented",
            message,
        },
        generation,
        &now,
    );
    conditions::remove(&mut conds, conditions::RECONCILING);
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let patch = json!({ "status": { "observedGeneration": generation, "conditions": conds } });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    tracing::info!(?generation, "acknowledged (kind not implemented yet)");
    Ok(Action::await_change())
}
