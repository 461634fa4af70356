//! The replication connection: `--postgres-url` turned into `pgwire-replication`'s settings,
//! with the same TLS choices (`sslmode`, `sslrootcert`, client certificates) as every other
//! connection walrelay opens.

use std::time::Duration;

use pgwire_replication::ReplicationConfig;
use pgwire_replication::config::{SslMode, TlsConfig};
use tokio_postgres::config::Host;

use crate::config::Settings;
use crate::error::RunError;
use crate::value::SESSION_OPTIONS;

/// How soon a newly confirmed LSN reaches the server: a standby status update at most this
/// often. Postgres frees WAL and `confirmed_flush_lsn` moves only on these, so a long
/// interval shows up as lag after every burst; 100 ms costs ten 34-byte messages a second.
const STATUS_INTERVAL: Duration = Duration::from_millis(100);

/// The replication connection's settings: host, port and credentials from `--postgres-url`,
/// the session options, status cadence and TLS.
pub fn config(s: &Settings) -> Result<ReplicationConfig, RunError> {
    let pg = &s.postgres.config;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => return Err(RunError::Setup("--postgres-url has no host".into())),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg.get_user().unwrap_or("postgres");
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        s.database(),
        &s.slot,
        s.publication.as_str(),
    )
    .with_port(port)
    .with_options(SESSION_OPTIONS)
    .with_application_name(format!("walrelay-producer/{}", s.slot))
    .with_status_interval(STATUS_INTERVAL)
    .with_wakeup_interval(Duration::from_secs(1))
    .with_buffer_size(1024)
    .with_tls(tls(&s.postgres)))
}

/// The replication connection's TLS: the same settings as every other connection.
fn tls(target: &walrelay_common::postgres::PgTarget) -> TlsConfig {
    use walrelay_common::postgres::SslMode as Mode;
    let tls = &target.tls;
    let mode = match (tls.mode, tls.verification()) {
        (Mode::Disable, _) => SslMode::Disable,
        (Mode::VerifyFull, _) => SslMode::VerifyFull,
        (_, Some(_)) => SslMode::VerifyCa,
        (Mode::Prefer, None) => SslMode::Prefer,
        (_, None) => SslMode::Require,
    };
    TlsConfig {
        mode,
        ca_pem_path: tls.root_cert.clone(),
        sni_hostname: target.host(),
        client_cert_pem_path: tls.cert.clone(),
        client_key_pem_path: tls.key.clone(),
    }
}
