//! Connecting to Postgres the way libpq does: one connection string (URL or `key=value`), the
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` parameters (or `PGSSLMODE`,
//! `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`), applied to every connection walrelay opens.
//!
//! ```text
//!  "postgres://u:pw@db:5432/app?sslmode=verify-full&sslrootcert=ca.pem"
//!        │  split
//!        ├──▶ tokio_postgres::Config (host, port, user, password, dbname, options, ...)
//!        └──▶ Tls { mode, root_cert, cert, key }
//!                 ├─▶ rustls ClientConfig for tokio-postgres (control, snapshot, notifier store)
//!                 └─▶ the same settings for the replication connection (producer)
//! ```
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default, as libpq) | when the server offers it | no (yes with `sslrootcert`: as `verify-ca`) |
//! | `require` | always, or fail | no (yes with `sslrootcert`: as `verify-ca`) |
//! | `verify-ca` | always | signed by a CA in `sslrootcert` |
//! | `verify-full` | always | as `verify-ca`, and issued for the host connected to |
//!
//! `sslrootcert` defaults to `~/.postgresql/root.crt` when that file exists (libpq's default).
//! TLS is rustls: no OpenSSL at run time. Nothing here puts the password into an error or log
//! line; [`PgTarget::describe`] names a server without its credentials.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::{Client, NoTls};

mod conninfo;
mod verify;

use conninfo::{TLS_KEYS, split_tls};
use verify::{ChainOnly, NoVerification, read_certs, read_key};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it.
    #[default]
    Prefer,
    /// TLS or fail; the certificate is not checked (unless a root certificate is given).
    Require,
    /// TLS with a certificate signed by a trusted CA.
    VerifyCa,
    /// TLS with a trusted certificate issued for the host.
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<Self, String> {
        Ok(match v {
            "disable" => Self::Disable,
            "allow" | "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }

    /// The name libpq uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// The TLS settings of a connection string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// As given (or `prefer`).
    pub mode: SslMode,
    /// CA certificates (PEM) the server's certificate must chain to.
    pub root_cert: Option<PathBuf>,
    /// Client certificate chain (PEM), for `cert` authentication.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
}

impl Tls {
    /// What the server's certificate is checked for: `None` (not checked), `ca`, or `full`.
    /// With a root certificate, `prefer` and `require` check the chain, as libpq does.
    pub fn verification(&self) -> Option<&'static str> {
        match self.mode {
            SslMode::Disable => None,
            SslMode::Prefer | SslMode::Require => self.root_cert.as_ref().map(|_| "ca"),
            SslMode::VerifyCa => Some("ca"),
            SslMode::VerifyFull => Some("full"),
        }
    }
}

/// A failure to connect, with the cause and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PgConnectError {
    /// The TLS settings cannot be used (a file is missing or unreadable, a key is malformed).
    /// Definite: fix the settings.
    #[error("Postgres TLS settings: {0}")]
    Settings(String),
    /// The server could not be reached or refused the session. Transient unless the message
    /// says otherwise (authentication, a certificate problem).
    #[error("connecting to Postgres at {server}: {message}")]
    Connect {
        /// Host, port and database, without credentials.
        server: String,
        /// The cause and the fix.
        message: String,
        /// Whether trying again may help.
        transient: bool,
    },
}

impl PgConnectError {
    /// Whether trying again may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Connect {
                transient: true,
                ..
            }
        )
    }
}

/// Where and how to connect: the session parameters and the TLS settings.
#[derive(Clone)]
pub struct PgTarget {
    /// Everything but TLS.
    pub config: tokio_postgres::Config,
    /// TLS.
    pub tls: Tls,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("server", &self.describe())
            .field("tls", &self.tls)
            .finish()
    }
}

impl PgTarget {
    /// Parses a libpq connection string (URL or `key=value` pairs); TLS parameters missing from
    /// it come from `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY`. The error never
    /// repeats the string (it may hold a password).
    pub fn parse(conn: &str) -> Result<Self, String> {
        Self::parse_with_env(conn, |k| std::env::var(k).ok())
    }

    fn parse_with_env(conn: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let (rest, mut found) = split_tls(conn)?;
        for (key, var) in
            TLS_KEYS
                .iter()
                .zip(["PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"])
        {
            if !found.iter().any(|(k, _)| k == key)
                && let Some(v) = env(var).filter(|v| !v.is_empty())
            {
                found.push(((*key).to_string(), v));
            }
        }
        let config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            format!("not a Postgres connection string ({e}); e.g. postgres://user:pass@host:5432/db?sslmode=verify-full")
        })?;
        let mut tls = Tls::default();
        for (k, v) in found {
            match k.as_str() {
                "sslmode" => tls.mode = SslMode::parse(&v)?,
                "sslrootcert" => tls.root_cert = Some(PathBuf::from(v)),
                "sslcert" => tls.cert = Some(PathBuf::from(v)),
                "sslkey" => tls.key = Some(PathBuf::from(v)),
                _ => {}
            }
        }
        if tls.root_cert.is_none()
            && tls.mode != SslMode::Disable
            && let Some(home) = env("HOME")
        {
            let default = Path::new(&home).join(".postgresql/root.crt");
            if default.is_file() {
                tls.root_cert = Some(default);
            }
        }
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(
                "sslcert and sslkey go together: give both for client-certificate authentication"
                    .into(),
            );
        }
        if tls.mode == SslMode::Disable && (tls.cert.is_some() || tls.root_cert.is_some()) {
            return Err("sslmode=disable with sslcert or sslrootcert: certificates need TLS; use sslmode=verify-full".into());
        }
        Ok(Self { config, tls })
    }

    /// `host:port/dbname` for messages: no user, no password.
    pub fn describe(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "?".into(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{host}:{port}/{}",
            self.config.get_dbname().unwrap_or("postgres")
        )
    }

    /// The first host name, for TLS server-name checks.
    pub fn host(&self) -> Option<String> {
        match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => Some(h.clone()),
            _ => None,
        }
    }

    /// The rustls client configuration these settings call for.
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig, PgConnectError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| PgConnectError::Settings(e.to_string()))?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.tls.verification() {
            None => Arc::new(NoVerification(Arc::clone(&provider))),
            Some(kind) => {
                let path = self.tls.root_cert.as_ref().ok_or_else(|| {
                    PgConnectError::Settings(format!(
                        "sslmode={} checks the server's certificate: give the CA that signed it with sslrootcert=FILE (or PGSSLROOTCERT, or ~/.postgresql/root.crt)",
                        self.tls.mode.as_str()
                    ))
                })?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs(path, "sslrootcert")? {
                    roots.add(cert).map_err(|e| {
                        PgConnectError::Settings(format!(
                            "sslrootcert {}: not a usable CA certificate ({e})",
                            path.display()
                        ))
                    })?;
                }
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| {
                        PgConnectError::Settings(format!("sslrootcert {}: {e}", path.display()))
                    })?;
                if kind == "full" {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match (&self.tls.cert, &self.tls.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "sslcert")?;
                let key = read_key(key)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    PgConnectError::Settings(format!(
                        "sslcert {} and sslkey do not make a usable pair ({e})",
                        cert.display()
                    ))
                })
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }

    /// Opens a session (its connection runs on a task of its own) with `application_name`.
    pub async fn connect(&self, application_name: &str) -> Result<Client, PgConnectError> {
        let mut config = self.config.clone();
        config.application_name(application_name);
        let connected = match self.tls.mode {
            SslMode::Disable => {
                config.ssl_mode(PgSslMode::Disable);
                config.connect(NoTls).await.map(|(client, conn)| {
                    spawn_connection(conn);
                    client
                })
            }
            mode => {
                config.ssl_mode(if mode == SslMode::Prefer {
                    PgSslMode::Prefer
                } else {
                    PgSslMode::Require
                });
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.rustls_config()?);
                config.connect(tls).await.map(|(client, conn)| {
                    spawn_connection(conn);
                    client
                })
            }
        };
        connected.map_err(|e| self.explain(&e))
    }

    /// The cause of a failed connection and what to do, without credentials.
    pub fn explain(&self, e: &tokio_postgres::Error) -> PgConnectError {
        let text = full_chain(e);
        let lower = text.to_lowercase();
        let server = self.describe();
        let rootcert = || {
            self.tls
                .root_cert
                .as_ref()
                .map_or("sslrootcert".into(), |p| {
                    format!("sslrootcert {}", p.display())
                })
        };
        let (message, transient) = if lower.contains("unknownissuer")
            || lower.contains("unknown issuer")
            || lower.contains("badsignature")
        {
            (
                format!(
                    "the server's certificate is not signed by a CA in {}: give the CA that signed it ({text})",
                    rootcert()
                ),
                false,
            )
        } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
            (
                format!(
                    "the server's certificate is not issued for {:?}: connect by a name the certificate lists, or use sslmode=verify-ca ({text})",
                    self.host().unwrap_or_default()
                ),
                false,
            )
        } else if lower.contains("expired") {
            (
                format!("the server's certificate has expired or is not yet valid ({text})"),
                false,
            )
        } else if lower.contains("server does not support tls")
            || lower.contains("server does not support ssl")
        {
            (
                format!(
                    "the server does not accept TLS connections but sslmode={} requires it: turn on ssl in postgresql.conf, or choose sslmode=prefer ({text})",
                    self.tls.mode.as_str()
                ),
                false,
            )
        } else if lower.contains("certificate required")
            || lower.contains("certificaterequired")
            || lower.contains("certificate authentication failed")
        {
            (
                format!(
                    "the server wants a client certificate for this user: give sslcert and sslkey ({text})"
                ),
                false,
            )
        } else if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            // 28xxx: authentication; 3D000: no such database; 42501: no privilege.
            let definite = code.starts_with("28") || code == "3D000" || code == "42501";
            let hint = db
                .hint()
                .map(|h| format!("; hint: {h}"))
                .unwrap_or_default();
            (format!("{} ({code}{hint})", db.message()), !definite)
        } else {
            (text, true)
        };
        PgConnectError::Connect {
            server,
            message,
            transient,
        }
    }

    /// Whether a session is encrypted, as the server sees it (`pg_stat_ssl`): the TLS version,
    /// or `None` for a plain connection.
    pub async fn ssl_version(client: &Client) -> Option<String> {
        client
            .query_opt(
                "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl",
                &[],
            )
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get::<_, Option<String>>(0))
    }
}

fn spawn_connection<F>(conn: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%error, "Postgres connection ended.");
        }
    });
}

/// The error and its sources, one after the other.
fn full_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(conn: &str) -> Result<PgTarget, String> {
        PgTarget::parse_with_env(conn, |_| None)
    }

    #[test]
    fn url_tls_parameters_are_taken_out() {
        let t = parse(
            "postgres://u:secret@db.example:6543/app?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .expect("parse");
        assert_eq!(t.tls.mode, SslMode::VerifyFull);
        assert_eq!(t.tls.root_cert, Some(PathBuf::from("/tmp/ca.pem")));
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert_eq!(t.describe(), "db.example:6543/app");
        assert!(!format!("{t:?}").contains("secret"), "{t:?}");
    }

    #[test]
    fn keyword_tls_parameters_are_taken_out() {
        let t = parse(
            "host=127.0.0.1 port=5 user=u password='p w\\'x' dbname=d sslmode=require sslcert='/a b/c.pem' sslkey=/k.pem",
        )
        .expect("parse");
        assert_eq!(t.tls.mode, SslMode::Require);
        assert_eq!(t.tls.cert, Some(PathBuf::from("/a b/c.pem")));
        assert_eq!(t.tls.key, Some(PathBuf::from("/k.pem")));
        assert_eq!(t.config.get_password(), Some(&b"p w'x"[..]));
        assert_eq!(t.tls.verification(), None);
    }

    #[test]
    fn defaults_and_environment() {
        let t = parse("postgres://u@h/d").expect("parse");
        assert_eq!(t.tls.mode, SslMode::Prefer);
        let t = PgTarget::parse_with_env("postgres://u@h/d", |k| match k {
            "PGSSLMODE" => Some("verify-ca".into()),
            "PGSSLROOTCERT" => Some("/ca.pem".into()),
            _ => None,
        })
        .expect("parse");
        assert_eq!(t.tls.mode, SslMode::VerifyCa);
        assert_eq!(t.tls.verification(), Some("ca"));
        let t = PgTarget::parse_with_env("postgres://u@h/d?sslmode=disable", |k| {
            (k == "PGSSLMODE").then(|| "verify-full".to_string())
        })
        .expect("parse");
        assert_eq!(t.tls.mode, SslMode::Disable, "the string wins");
    }

    #[test]
    fn bad_settings_name_the_fix() {
        let e = parse("postgres://u:pw@h/d?sslmode=strict").expect_err("bad mode");
        assert!(e.contains("verify-full") && !e.contains("pw"), "{e}");
        let e = parse("postgres://u@h/d?sslcert=/c.pem").expect_err("cert without key");
        assert!(e.contains("sslkey"), "{e}");
        let t = parse("postgres://u@h/d?sslmode=verify-full").expect("parse");
        let e = t.rustls_config().expect_err("no root cert").to_string();
        assert!(e.contains("sslrootcert"), "{e}");
        let t = parse("postgres://u@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .expect("parse");
        let e = t.rustls_config().expect_err("missing file").to_string();
        assert!(
            e.contains("/nonexistent/ca.pem") && e.contains("cannot be read"),
            "{e}"
        );
    }
}
