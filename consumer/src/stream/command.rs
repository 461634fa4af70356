//! `stream`: binds the listener, then serves streams until stopped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;
use walrelay_common::codec;
use walrelay_common::telemetry::Readiness;

use super::StreamError;
use super::config::StreamSettings;
use super::metrics::StreamMetrics;
use super::server;
use super::session::Gateway;
use crate::config::RuntimeSettings;
use crate::metrics::Metrics;

/// Serves the gateway until `shutdown`; open streams are closed (1001) and commit what was
/// acknowledged.
pub async fn stream(
    runtime: &RuntimeSettings,
    settings: &StreamSettings,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), StreamError> {
    let stream_metrics = Arc::new(
        StreamMetrics::new(&metrics.registry).map_err(|e| StreamError::Setup(e.to_string()))?,
    );
    let avro = match &runtime.registry {
        Some(options) => Some(Arc::new(codec::avro::Decoder::new(Arc::new(
            walrelay_common::registry::Registry::new(options)
                .map_err(|e| StreamError::Setup(format!("schema registry: {e}")))?,
        )))),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| StreamError::Setup(format!("cannot listen on {}: {e}", settings.listen)))?;
    let gw = Arc::new(Gateway {
        runtime: runtime.clone(),
        settings: settings.clone(),
        metrics: stream_metrics,
        avro,
        shutdown: shutdown.clone(),
        next_id: AtomicU64::new(1),
        closing: AtomicUsize::new(0),
        lag_warnings: crate::lag::Throttle::default(),
    });
    tracing::info!(
        addr = %settings.listen,
        tls = settings.tls.is_some(),
        topics = %runtime.topics,
        max_unacked = settings.max_unacked,
        "Serving the stream gateway."
    );
    readiness.set("listening", true);
    let gauge = gw.metrics.connections.clone();
    let closing = Arc::clone(&gw);
    let tls = settings.tls.as_ref().map(|t| Arc::clone(&t.0));
    server::serve(listener, server::router(gw), tls, shutdown.clone()).await;
    // Streams see the same token: wait (10 s at most) for them to close and make their final
    // commits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (gauge.get() > 0 || closing.closing.load(Ordering::Relaxed) > 0)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}
