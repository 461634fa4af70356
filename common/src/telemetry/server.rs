use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// Named readiness conditions, all of which must hold for `/readyz` to answer 200.
#[derive(Clone, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    /// Sets one condition (for example `postgres` or `kafka`).
    pub fn set(&self, name: &'static str, ok: bool) {
        if let Ok(mut map) = self.conditions.lock() {
            map.insert(name, ok);
        }
    }

    /// The conditions that do not hold; empty when ready. Not ready until at least one
    /// condition was set.
    pub fn failing(&self) -> Vec<&'static str> {
        match self.conditions.lock() {
            Ok(map) if map.is_empty() => vec!["starting"],
            Ok(map) => map
                .iter()
                .filter(|(_, ok)| !**ok)
                .map(|(k, _)| *k)
                .collect(),
            Err(_) => vec!["poisoned"],
        }
    }

    /// Every condition set so far and whether it holds.
    pub fn conditions(&self) -> Vec<(&'static str, bool)> {
        match self.conditions.lock() {
            Ok(map) => map.iter().map(|(k, v)| (*k, *v)).collect(),
            Err(_) => Vec::new(),
        }
    }
}

#[derive(Clone)]
struct AppState {
    registry: Registry,
    readiness: Readiness,
    /// `walrelay_ready`: what `/readyz` answers, as 1 or 0, so alerts can use it.
    ready: IntGauge,
    /// `walrelay_ready_condition{condition}`: each readiness condition (`postgres`, `kafka`,
    /// `replication`, `search`, …: a handful per binary), 1 or 0, so an alert can name which.
    conditions: IntGaugeVec,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    readiness: Readiness,
) -> std::io::Result<()> {
    let ready = IntGauge::new(
        "walrelay_ready",
        "1 when /readyz answers 200 (every readiness condition holds), else 0.",
    )
    .map_err(std::io::Error::other)?;
    registry
        .register(Box::new(ready.clone()))
        .map_err(std::io::Error::other)?;
    let conditions = IntGaugeVec::new(
        Opts::new(
            "walrelay_ready_condition",
            "1 while the readiness condition holds (postgres, kafka, replication, search, ...), else 0.",
        ),
        &["condition"],
    )
    .map_err(std::io::Error::other)?;
    registry
        .register(Box::new(conditions.clone()))
        .map_err(std::io::Error::other)?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            registry,
            readiness,
            ready,
            conditions,
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "Serving /metrics, /healthz and /readyz.");
    axum::serve(listener, app).await
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state
        .ready
        .set(i64::from(state.readiness.failing().is_empty()));
    for (name, ok) in state.readiness.conditions() {
        state
            .conditions
            .with_label_values(&[name])
            .set(i64::from(ok));
    }
    let mut body = Vec::new();
    let encoder = TextEncoder::new();
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(CONTENT_TYPE, encoder.format_type().to_string())],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(CONTENT_TYPE, "text/plain".to_string())],
            e.to_string().into_bytes(),
        ),
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let failing = state.readiness.failing();
    if failing.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", failing.join(", ")),
        )
    }
}
