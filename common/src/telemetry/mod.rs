//! Metrics registry, probe server and logging.
//!
//! `/metrics` serves the process's Prometheus registry. `/healthz` answers 200 while the
//! process's main loop is alive and never looks at Postgres, Kafka or a sink, so an outage of a
//! dependency does not restart-loop pods. `/readyz` answers 200 only while every readiness
//! condition registered with [`Readiness`] holds, and names the ones that do not.

mod logging;
mod server;

pub use logging::{LogFormat, init_logging};
pub use server::{Readiness, serve};
