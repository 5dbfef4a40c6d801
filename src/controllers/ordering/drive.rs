//! Running the controllers of one shard: each operation kind's controller serves only the
//! operations whose connection is in this process's shard, waits with them on a connection that
//! is not Ready and wakes them when it changes; the PbxConnection controller serves the shard's
//! connections; one Lease per shard.

use super::*;

/// Before the kind's reconcile: whether this process serves the operation (its connection is in
/// this shard), whether it must wait on its connection, and whether a waiting operation still
/// waits (without planning it again). None: go on with the kind's reconcile.
pub(super) async fn before<K>(obj: &K, ctx: &Context) -> Result<Option<Action>, Error>
where
    K: RunKind + Operation + 'static,
{
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.connection().to_string();
    let cached = ctx
        .ordering
        .store::<PbxConnection>()
        .and_then(|s| s.get(&ObjectRef::new(&name).within(&ns)));
    let conn = match cached {
        Some(c) => Some(c),
        // Not in this shard's cache: another shard's, missing, or too new to be cached yet.
        None => Api::<PbxConnection>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&name)
            .await?
            .map(Arc::new),
    };
    let Some(conn) = conn else {
        // Missing: the kind's reconcile says so in conditions (ConnectionNotFound) and waits;
        // recreating the connection wakes it.
        return Ok(None);
    };
    if !ctx.ordering.serves(&conn) {
        tracing::debug!(kind = K::KIND, name = %obj.name_any(), connection = %name, "another shard serves this operation's connection");
        return Ok(Some(Action::await_change()));
    }
    let default = OperationStatus::default();
    let status = obj.status().unwrap_or(&default);
    if crate::controllers::run::unfinished(status) {
        // A run under way goes on (it waits for its PBX itself).
        return Ok(None);
    }
    // Refused for contradicting an earlier Enforce change: look again without planning.
    if stalled_by_contradiction(&status.conditions)
        && status.observed_generation == obj.meta().generation
    {
        let mine: Targets = status
            .plan
            .as_ref()
            .map(|p| p.resolved.iter().map(|t| ordering::user(t)).collect())
            .unwrap_or_default();
        let still = obj
            .enforced()
            .and_then(|fields| contradicted(ctx, obj, &mine, &fields));
        if still.is_some() {
            return Ok(Some(Action::requeue(CONTRADICTION_AGAIN)));
        }
        return Ok(None);
    }
    let lineage = Lineage::of(obj);
    let settled = status.progress.as_ref().is_some_and(|p| lineage.serves(p));
    if settled || !obj.executes() {
        return Ok(None);
    }
    let not_ready = conn.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == conditions::READY && c.status == "False")
    });
    if let Some(c) = not_ready {
        let message = format!(
            "waits for PbxConnection {name}, which is not Ready ({}: {}); starts when it is",
            c.reason, c.message
        );
        wait(ctx, obj, status.clone(), "ConnectionNotReady", message).await?;
        return Ok(Some(Action::requeue(Duration::from_secs(10))));
    }
    // A waiting operation whose targets this process knows: decide again without planning.
    if !is_waiting_reason(&status.conditions) || status.observed_generation != obj.meta().generation
    {
        return Ok(None);
    }
    let uid = obj.uid().unwrap_or_default();
    let mine = {
        let known = ctx.ordering.known.lock().expect("not poisoned");
        known
            .get(&uid)
            .filter(|k| k.run == lineage_key(obj) && k.admitted.is_none())
            .map(|k| k.targets.clone())
    };
    let Some(mine) = mine else {
        return Ok(None);
    };
    let decision = {
        let _gate = ctx.ordering.gate.lock().await;
        let others = others(ctx, &ns, &name, &uid).await;
        decide(ctx, &ns, &name, &created(obj), &mine, &others)
    };
    match decision {
        // Plan afresh and ask again in the lifecycle, with the targets as they are now.
        Decision::Start => Ok(None),
        Decision::Wait(reason) => {
            wait(ctx, obj, status.clone(), reason.code(), reason.message()).await?;
            Ok(Some(Action::requeue(WAIT_AGAIN)))
        }
    }
}

/// Runs an operation kind's controller: its cache registered for ordering, woken when a
/// connection it references changes, and [`before`] ahead of the kind's reconcile.
pub(crate) async fn drive_op<K, F, Fut>(
    api: Api<K>,
    connections: Api<PbxConnection>,
    ctx: Arc<Context>,
    concurrency: u16,
    shutdown: Shutdown,
    reconcile: F,
) where
    K: RunKind + Operation + serde::Serialize + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    let kind = K::KIND;
    let controller = Controller::new(api, crate::controllers::watcher_config());
    let store = controller.store();
    ctx.ordering.register(store.clone());
    // Metrics: gauges read from this watch cache.
    ctx.metrics.objects.watch(kind, store.clone());
    let selector = ctx.ordering.selector();
    let reconcile = Arc::new(reconcile);
    let woken = {
        let store = store.clone();
        let rx = ctx.ordering.wake.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(item) => return Some((item, rx)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .flat_map(move |(ns, conn)| {
            let waiting: Vec<ObjectRef<K>> = store
                .state()
                .into_iter()
                .filter(|o| {
                    o.namespace().as_deref() == Some(ns.as_str())
                        && o.connection() == conn
                        && o.status().is_some_and(|s| is_waiting_reason(&s.conditions))
                })
                .map(|o| ObjectRef::from_obj(&*o))
                .collect();
            futures::stream::iter(waiting)
        })
    };
    controller
        .reconcile_on(woken)
        .watches(
            connections,
            watcher::Config::default().labels(&selector).any_semantic(),
            move |conn: PbxConnection| {
                let ns = conn.namespace();
                let name = conn.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|o| o.namespace() == ns && o.connection() == name)
                    .map(|o| ObjectRef::from_obj(&*o))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(shutdown)
        .run(
            move |obj: Arc<K>, ctx: Arc<Context>| {
                let reconcile = reconcile.clone();
                async move {
                    if obj.meta().deletion_timestamp.is_some() {
                        ctx.ordering.forget(&obj.uid().unwrap_or_default());
                    }
                    match before(&*obj, &ctx).await? {
                        Some(action) => Ok(action),
                        None => {
                            // Each PBX call of this reconcile is labelled with its connection.
                            let connection =
                                crate::controllers::metrics::connection_of(obj.as_ref());
                            let done = crate::controllers::metrics::CONNECTION
                                .scope(connection, reconcile(obj.clone(), ctx.clone()))
                                .await;
                            // Whatever it did (finished a run, gave up, started), operations
                            // waiting on its connection look again now. A run that waits
                            // (Error::Waiting) wakes nobody: that would go round in circles.
                            if done.is_ok() {
                                let ns = obj.namespace().unwrap_or_default();
                                ctx.ordering.wake(&ns, obj.connection());
                            }
                            done
                        }
                    }
                }
            },
            crate::controllers::error_policy,
            ctx.clone(),
        )
        .for_each(|outcome| {
            if let Err(err) = outcome {
                tracing::debug!(%kind, error = %err, "reconcile failed");
            }
            futures::future::ready(())
        })
        .await;
}

/// Runs the PbxConnection controller on this shard's connections, its cache registered (the
/// limits, readiness and shard of each), and closes the pools of connections that go.
pub(crate) async fn drive_connections<F, Fut>(
    api: Api<PbxConnection>,
    ctx: Arc<Context>,
    concurrency: u16,
    shutdown: Shutdown,
    mut reconcile: F,
) where
    F: FnMut(Arc<PbxConnection>, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    let config = crate::controllers::watcher_config().labels(&ctx.ordering.selector());
    let controller = Controller::new(api.clone(), config.clone());
    ctx.ordering.register(controller.store());
    ctx.metrics
        .objects
        .watch("PbxConnection", controller.store());
    let sweep = tokio::spawn(crate::controllers::connection::close_departed(
        api,
        config,
        ctx.clone(),
    ));
    controller
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(shutdown)
        .run(
            move |obj: Arc<PbxConnection>, ctx: Arc<Context>| {
                let connection = crate::controllers::metrics::connection_of(obj.as_ref());
                crate::controllers::metrics::CONNECTION.scope(connection, reconcile(obj, ctx))
            },
            crate::controllers::error_policy,
            ctx,
        )
        .for_each(|outcome| {
            if let Err(err) = outcome {
                tracing::debug!(kind = "PbxConnection", error = %err, "reconcile failed");
            }
            futures::future::ready(())
        })
        .await;
    sweep.abort();
}

/// The lease a process of this shard takes (`pbx-operator` unsharded, as before shards).
pub fn lease_name(shard: Option<&str>) -> String {
    match shard {
        Some(s) => format!("{}-shard-{s}", crate::controllers::leader::LEASE_NAME),
        None => crate::controllers::leader::LEASE_NAME.to_string(),
    }
}
