//! Why a streaming session ends, and whether a new one may succeed.
//!
//! Every part of the producer (the listener, the snapshot, the DDL capture, the pipeline)
//! returns [`RunError`]; [`RunError::is_transient`] is the one place that decides between
//! "start a new session after a backoff" (transient) and "stop with a clear error" (definite),
//! and [`RunError::kind`] is the bounded label of the errors metric.

use pgwire_replication::PgWireError;

use crate::catalog::PgError;
use crate::kafka::WriteError;
use crate::replication::pgoutput::DecodeError;
use crate::replication::slot::format_lsn;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Talking to Postgres.
    #[error(transparent)]
    Postgres(#[from] PgError),
    /// The replication connection failed or ended (transient).
    #[error("replication connection: {0}")]
    Replication(String),
    /// The replication server refused (for example, the slot does not exist).
    #[error("replication: {0}")]
    ReplicationRefused(String),
    /// The slot cannot be streamed safely (definite).
    #[error("replication slot {slot}: {message}")]
    Slot {
        /// Slot.
        slot: String,
        /// What is wrong and the way out.
        message: String,
    },
    /// Kafka.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A malformed pgoutput message (definite).
    #[error("cannot decode the change at LSN {}: {source}", format_lsn(*lsn))]
    Decode {
        /// Where.
        lsn: u64,
        /// What.
        #[source]
        source: DecodeError,
    },
    /// The stream broke the protocol's rules (definite).
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// Set-up is missing or wrong (definite): the message names the fix.
    #[error("{0}")]
    Setup(String),
    /// The schema registry (`--format avro`): refused a schema (definite) or failed.
    #[error(transparent)]
    Registry(#[from] walrelay_common::registry::RegistryError),
    /// An event has no form in the chosen format (definite): the message names the table and
    /// column.
    #[error(transparent)]
    Encode(#[from] crate::encode::EncodeError),
}

impl RunError {
    /// Whether a new session may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            RunError::Postgres(e) => e.is_transient(),
            RunError::Replication(_) => true,
            RunError::Write(e) => e.is_transient(),
            RunError::Registry(e) => e.is_transient(),
            RunError::Encode(_)
            | RunError::ReplicationRefused(_)
            | RunError::Slot { .. }
            | RunError::Decode { .. }
            | RunError::Protocol(_)
            | RunError::Setup(_) => false,
        }
    }

    /// Label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            RunError::Postgres(_) => "postgres",
            RunError::Replication(_) | RunError::ReplicationRefused(_) => "replication",
            RunError::Slot { .. } => "slot",
            RunError::Write(e) => e.kind(),
            RunError::Decode { .. } | RunError::Protocol(_) => "decode",
            RunError::Setup(_) => "setup",
            RunError::Registry(_) => "schema_registry",
            RunError::Encode(_) => "encode",
        }
    }

    /// Classifies an error of the replication client.
    pub fn from_pgwire(e: PgWireError) -> Self {
        match &e {
            PgWireError::Server(m) if m.contains("is active for PID") => RunError::Replication(
                format!("{m} (another producer holds the slot; waiting for it)"),
            ),
            // The slot was invalidated (its WAL removed) or dropped: changes may be missing.
            PgWireError::Server(m) if m.contains("invalidated") || m.contains("does not exist") => {
                RunError::ReplicationRefused(m.clone())
            }
            PgWireError::Auth(m) => RunError::Setup(format!("replication login refused: {m}")),
            _ => RunError::Replication(e.to_string()),
        }
    }
}
