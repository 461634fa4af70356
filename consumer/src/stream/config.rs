//! The gateway's options ([`Args`], for `stream`) and their validated settings
//! ([`StreamSettings`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use walrelay_common::options::{self, ConfigError, parse_duration};

use crate::sinks::webhook::config::{ApiTls, ApiToken};

/// `stream`'s own options, each unset unless given.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[group(skip)]
#[command(next_help_heading = "WebSocket gateway")]
pub struct Args {
    /// Address the gateway listens on [default: 127.0.0.1:8090].
    #[arg(long, env = "WALRELAY_STREAM_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Bearer token every request needs (at least 16 characters): `Authorization: Bearer`,
    /// or for browsers the WebSocket subprotocol
    /// `base64url.bearer.authorization.walrelay.<base64url of the token>` beside `walrelay.v1`.
    #[arg(long, env = "WALRELAY_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// PEM certificate chain for serving over TLS (wss://, with --tls-key) [default: plain].
    #[arg(long, env = "WALRELAY_STREAM_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "WALRELAY_STREAM_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Events sent and not yet acknowledged per connection; reading waits beyond it
    /// [default: 1000].
    #[arg(long, env = "WALRELAY_STREAM_MAX_UNACKED")]
    pub max_unacked: Option<usize>,
    /// A connection that sends nothing (not even a pong) for this long, or holds
    /// unacknowledged events without acknowledging any for this long, is closed and its
    /// partitions released [default: 30s].
    #[arg(long, env = "WALRELAY_STREAM_IDLE_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub idle_timeout: Option<Duration>,
    /// Streams open at once (each is a Kafka group member); more are answered 503
    /// [default: 256].
    #[arg(long, env = "WALRELAY_STREAM_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Prefix of the Kafka group id a connection's `group` names, so that clients cannot join
    /// the groups of walrelay's other consumers; may be empty [default: walrelay.stream.].
    #[arg(long, env = "WALRELAY_STREAM_GROUP_PREFIX")]
    pub group_prefix: Option<String>,
}

impl Args {
    /// `self` where set, else `file`.
    pub fn or(self, file: Args) -> Args {
        Args {
            listen: self.listen.or(file.listen),
            api_token: self.api_token.or(file.api_token),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            max_unacked: self.max_unacked.or(file.max_unacked),
            idle_timeout: self.idle_timeout.or(file.idle_timeout),
            max_connections: self.max_connections.or(file.max_connections),
            group_prefix: self.group_prefix.or(file.group_prefix),
        }
    }

    /// Applies defaults and validates.
    pub fn settings(self) -> Result<StreamSettings, ConfigError> {
        let o = self;
        let token = o
            .api_token
            .ok_or_else(|| ConfigError::missing("--api-token"))?;
        if token.len() < 16 {
            return Err(ConfigError::new(
                "--api-token",
                "use at least 16 random characters (e.g. openssl rand -hex 24)",
            ));
        }
        let tls = match (&o.tls_cert, &o.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(ApiTls(Arc::new(
                crate::sinks::webhook::server::tls_config(cert, key).map_err(
                    |(option, message)| {
                        let option = if option.ends_with("key") {
                            "--tls-key"
                        } else {
                            "--tls-cert"
                        };
                        ConfigError::new(option, message)
                    },
                )?,
            ))),
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "--tls-key",
                    "--tls-cert needs --tls-key (the certificate's private key, PEM)",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "--tls-cert",
                    "--tls-key needs --tls-cert (the certificate chain, PEM)",
                ));
            }
        };
        let max_unacked = o.max_unacked.unwrap_or(1000);
        if !(1..=100_000).contains(&max_unacked) {
            return Err(ConfigError::new(
                "--max-unacked",
                "must be between 1 and 100000",
            ));
        }
        let idle_timeout = o.idle_timeout.unwrap_or(Duration::from_secs(30));
        if idle_timeout < Duration::from_secs(1) {
            return Err(ConfigError::new("--idle-timeout", "must be at least 1s"));
        }
        let max_connections = o.max_connections.unwrap_or(256);
        if !(1..=10_000).contains(&max_connections) {
            return Err(ConfigError::new(
                "--max-connections",
                "must be between 1 and 10000",
            ));
        }
        let group_prefix = o.group_prefix.unwrap_or_else(|| "walrelay.stream.".into());
        if group_prefix.len() > 100 || group_prefix.chars().any(char::is_control) {
            return Err(ConfigError::new(
                "--group-prefix",
                "at most 100 characters, no control characters",
            ));
        }
        Ok(StreamSettings {
            listen: o
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8090))),
            token: ApiToken(token),
            tls,
            max_unacked,
            idle_timeout,
            max_connections,
            group_prefix,
        })
    }
}

/// Settings of the gateway.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Listen address.
    pub listen: SocketAddr,
    /// The bearer token.
    pub token: ApiToken,
    /// TLS, when serving wss://.
    pub tls: Option<ApiTls>,
    /// Most unacknowledged events per connection.
    pub max_unacked: usize,
    /// Idle and slow-client timeout.
    pub idle_timeout: Duration,
    /// Most streams at once.
    pub max_connections: usize,
    /// Prefix of the Kafka group ids.
    pub group_prefix: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            api_token: Some("0123456789abcdef0123".into()),
            ..Args::default()
        }
    }

    #[test]
    fn defaults_and_bad_values_name_the_option() {
        let s = args().settings().expect("valid");
        assert_eq!(s.listen.to_string(), "127.0.0.1:8090");
        assert_eq!(s.max_unacked, 1000);
        assert_eq!(s.group_prefix, "walrelay.stream.");
        assert!(!format!("{s:?}").contains("0123456789abcdef0123"));
        type Change = Box<dyn Fn(&mut Args)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|a| a.api_token = None), "--api-token"),
            (
                Box::new(|a| a.api_token = Some("short".into())),
                "--api-token",
            ),
            (Box::new(|a| a.max_unacked = Some(0)), "--max-unacked"),
            (
                Box::new(|a| a.idle_timeout = Some(Duration::from_millis(10))),
                "--idle-timeout",
            ),
            (
                Box::new(|a| a.max_connections = Some(0)),
                "--max-connections",
            ),
            (
                Box::new(|a| a.tls_cert = Some("/x.pem".into())),
                "--tls-key",
            ),
            (
                Box::new(|a| a.tls_key = Some("/x.pem".into())),
                "--tls-cert",
            ),
            (
                Box::new(|a| {
                    a.tls_cert = Some("/nonexistent/c.pem".into());
                    a.tls_key = Some("/nonexistent/k.pem".into());
                }),
                "--tls-cert",
            ),
        ];
        for (change, option) in cases {
            let mut a = args();
            change(&mut a);
            let err = a.settings().expect_err(option);
            assert_eq!(err.option, option, "{err}");
        }
    }
}
