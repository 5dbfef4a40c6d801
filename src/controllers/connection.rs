//! PbxConnection: reads its Secrets, probes database and RPC, and publishes readiness,
//! capabilities and counts. Re-probes on `probeInterval`, and at once when a referenced
//! Secret changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, events::EventType},
};
use serde_json::json;

use super::backends::{config_for, fingerprint};
use super::conditions::{self, Desired};
use super::{Context, Error};
use crate::api::parse_duration;
use crate::api::{PbxConnection, PbxConnectionStatus, connection::Capabilities};
use crate::pbx::{PbxBackend, Probe};

const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(300);

/// What the last probe of a connection saw, to skip probes that would tell nothing new.
#[derive(Clone, Debug)]
pub struct ProbeMemo {
    fingerprint: String,
    generation: Option<i64>,
    ok: bool,
    at: Instant,
}

fn interval(conn: &PbxConnection) -> Duration {
    conn.spec
        .probe_interval
        .as_deref()
        .and_then(parse_duration)
        .unwrap_or(DEFAULT_PROBE_INTERVAL)
}

#[tracing::instrument(skip_all, fields(connection = %conn.name_any(), namespace = conn.namespace()))]
pub(crate) async fn reconcile(
    conn: Arc<PbxConnection>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let ns = conn.namespace().unwrap_or_default();
    let key = (ns.clone(), conn.name_any());
    let fingerprint = config_for(&ctx.client, &conn)
        .await
        .ok()
        .map(|c| fingerprint(&c));
    let memo = ctx.probes.lock().expect("not poisoned").get(&key).cloned();
    if let (Some(fp), Some(m)) = (&fingerprint, &memo) {
        let fresh = m.at.elapsed() < interval(&conn);
        if m.ok && fresh && m.fingerprint == *fp && m.generation == conn.metadata.generation {
            let left = interval(&conn).saturating_sub(m.at.elapsed());
            return Ok(Action::requeue(left.min(ctx.secret_check_interval)));
        }
    }
    let _timer = ctx.metrics.reconcile_timer("PbxConnection");
    let outcome = probe(&conn, &ctx).await;
    ctx.probes.lock().expect("not poisoned").insert(
        key,
        ProbeMemo {
            fingerprint: fingerprint.unwrap_or_default(),
            generation: conn.metadata.generation,
            ok: outcome.is_ok(),
            at: Instant::now(),
        },
    );
    let old = conn.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = conn.metadata.generation;
    let now = conditions::now();
    let requeue = match &outcome {
        Ok((probe, caps)) => {
            let message = format!(
                "{}: {} users, {} registered phones",
                probe.version, probe.users, probe.registered_phones
            );
            ready(&mut status, true, "Connected", message, &now);
            status.users = Some(probe.users);
            status.registered_phones = Some(probe.registered_phones);
            status.backend_version = Some(probe.version.clone());
            status.capabilities = Some(caps.clone());
            interval(&conn)
        }
        Err(err) => {
            let (reason, transient) = match err {
                Error::Pbx(e) => (e.reason(), e.is_transient()),
                Error::SecretMissing { .. } => ("SecretNotReadable", false),
                _ => ("ProbeFailed", true),
            };
            ready(&mut status, false, reason, err.to_string(), &now);
            if transient {
                // Reconciling: kstatus reads this as "still converging", which is what a
                // database restart looks like; Stalled means a person must act.
                conditions::upsert(
                    &mut status.conditions,
                    Desired {
                        type_: conditions::RECONCILING,
                        status: true,
                        reason,
                        message: format!("retrying: {err}"),
                    },
                    conn.metadata.generation,
                    &now,
                );
                conditions::remove(&mut status.conditions, conditions::STALLED);
            } else {
                conditions::upsert(
                    &mut status.conditions,
                    Desired {
                        type_: conditions::STALLED,
                        status: true,
                        reason,
                        message: err.to_string(),
                    },
                    conn.metadata.generation,
                    &now,
                );
                conditions::remove(&mut status.conditions, conditions::RECONCILING);
            }
            if let Error::Pbx(_) = err {
                ctx.backends.forget(&ns, &conn.name_any()).await;
            }
            Duration::from_secs(if transient { 10 } else { 60 }).min(interval(&conn))
        }
    };
    let became = |s: &PbxConnectionStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == conditions::READY)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    if became(&old) != became(&status) {
        let (type_, reason, note) = match &outcome {
            Ok(_) => (
                EventType::Normal,
                "Connected",
                status.backend_version.clone(),
            ),
            Err(e) => (EventType::Warning, "ConnectionFailed", Some(e.to_string())),
        };
        ctx.publish(&*conn, type_, reason, "Probe", note).await;
    }
    // Counts move all the time; write status only when something a reader cares about changed,
    // and stamp the probe time only then, so a steady connection costs no writes.
    if status != old {
        status.last_probe_time = Some(now);
        let api: Api<PbxConnection> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({ "status": status });
        api.patch_status(
            &conn.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(Action::requeue(requeue.min(ctx.secret_check_interval)))
}

fn ready(
    status: &mut PbxConnectionStatus,
    ok: bool,
    reason: &str,
    message: String,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) {
    let generation = status.observed_generation;
    conditions::upsert(
        &mut status.conditions,
        Desired {
            type_: conditions::READY,
            status: ok,
            reason,
            message,
        },
        generation,
        now,
    );
    if ok {
        conditions::remove(&mut status.conditions, conditions::RECONCILING);
        conditions::remove(&mut status.conditions, conditions::STALLED);
    }
}

async fn probe(conn: &PbxConnection, ctx: &Context) -> Result<(Probe, Capabilities), Error> {
    let backend = ctx.backends.get(&ctx.client, conn).await?;
    let probe = ctx.metrics.pbx_call("probe", backend.probe()).await?;
    // Snapshots of removed users are personal data: gone once the retention has passed.
    let retention = conn.spec.snapshot_retention().as_millis() as i64;
    let before = jiff::Timestamp::now().as_millisecond() - retention;
    let expire = backend.expire_snapshots(before);
    match ctx.metrics.pbx_call("expire_snapshots", expire).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            expired = n,
            "snapshots past the connection's retention deleted"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "snapshots past the retention not deleted yet; retried with the next probe")
        }
    }
    let caps = backend.capabilities();
    let capabilities = Capabilities {
        user_fields: caps
            .user_fields
            .iter()
            .map(|f| f.name().to_string())
            .collect(),
        phone_fields: caps
            .phone_fields
            .iter()
            .map(|f| f.name().to_string())
            .collect(),
        actions: caps.actions.iter().map(|a| a.to_string()).collect(),
        transactions: caps.transactions,
    };
    Ok((probe, capabilities))
}

/// Tenant lifecycle: a PbxConnection this operator no longer serves (deleted, or relabelled to
/// another shard) has its database pool closed and its probe memo dropped; probes stop by
/// themselves, as the controller reconciles only connections that exist. Watches the same
/// connections the controller does (`config`); after a re-list, closes every cached backend
/// of a connection the list no longer holds (deleted while the watch was away).
pub(crate) async fn close_departed(
    api: Api<PbxConnection>,
    config: kube::runtime::watcher::Config,
    ctx: Arc<Context>,
) {
    use futures::StreamExt;
    use kube::runtime::watcher::{self, Event};
    let mut seen = std::collections::HashSet::new();
    let mut events = std::pin::pin!(watcher::watcher(api, config));
    while let Some(event) = events.next().await {
        let gone: Vec<(String, String)> = match event {
            Ok(Event::Delete(c)) => vec![(c.namespace().unwrap_or_default(), c.name_any())],
            Ok(Event::Init) => {
                seen.clear();
                vec![]
            }
            Ok(Event::InitApply(c)) => {
                seen.insert((c.namespace().unwrap_or_default(), c.name_any()));
                vec![]
            }
            Ok(Event::InitDone) => ctx
                .backends
                .cached()
                .await
                .into_iter()
                .filter(|k| !seen.contains(k))
                .collect(),
            Ok(Event::Apply(_)) => vec![],
            Err(e) => {
                tracing::debug!(error = %e, "PbxConnection watch interrupted; it resumes");
                tokio::time::sleep(Duration::from_secs(1)).await;
                vec![]
            }
        };
        for (ns, name) in gone {
            ctx.probes
                .lock()
                .expect("not poisoned")
                .remove(&(ns.clone(), name.clone()));
            if ctx.backends.close(&ns, &name).await {
                tracing::info!(connection = %name, namespace = %ns, "PbxConnection gone: closed its database pool");
            }
        }
    }
}
