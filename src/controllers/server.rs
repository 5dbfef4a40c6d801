//! The operator's HTTP endpoints: /metrics (Prometheus text), /healthz and /readyz.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;

pub struct Health {
    pub ready: AtomicBool,
    pub leader: AtomicBool,
}

struct AppState {
    registry: Registry,
    health: Arc<Health>,
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let mut body = String::new();
    if prometheus_client::encoding::text::encode(&mut body, &state.registry).is_err() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            String::from("encoding failed"),
        )
            .into_response();
    }
    let leader = if state.health.leader.load(Ordering::Relaxed) {
        1
    } else {
        0
    };
    body = body.replacen(
        "# EOF",
        &format!("# HELP pbx_operator_leader Whether this replica holds the leader Lease.\n# TYPE pbx_operator_leader gauge\npbx_operator_leader {leader}\n# EOF"),
        1,
    );
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready once the API server and the CRDs were reached; a standby replica (not the leader) is
/// ready too: it is healthy, and takes over when the leader goes.
async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// Serves until the process ends. Fails at once if the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    health: Arc<Health>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(AppState { registry, health }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
