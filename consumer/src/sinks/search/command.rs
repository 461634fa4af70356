//! The `index` command: the search sink in live mode on the shared runtime, until stopped.
//! (`reindex`, the other command of this sink, is in [`super::reindex`].)

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use walrelay_common::telemetry::Readiness;

use super::client::SearchError;
use super::config::SearchSettings;
use super::sink::{Mode, SearchSink};
use crate::config::RuntimeSettings;
use crate::metrics::Metrics;
use crate::runtime::{Runtime, RuntimeError};

/// Why `index` stopped.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The search client could not be built.
    #[error(transparent)]
    Search(#[from] SearchError),
    /// The consumer stopped.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// `index`: keeps one index per table current until `shutdown`.
pub async fn index(
    runtime: &RuntimeSettings,
    search: &SearchSettings,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), IndexError> {
    let mut sink = SearchSink::new(search, Mode::Live, Arc::clone(&metrics), readiness.clone())?;
    match sink.client().version().await {
        Ok(v) => {
            readiness.set("search", true);
            tracing::info!(url = %walrelay_common::options::without_userinfo(search.url.as_str()), server = %v, "Search service reachable.");
        }
        Err(e) => {
            tracing::warn!(error = %e, "Search service not reachable yet; writes retry.")
        }
    }
    let consumer = Runtime::new(runtime, &runtime.group, metrics, readiness, &shutdown).await?;
    consumer.run(&mut sink, &shutdown).await?;
    Ok(())
}
