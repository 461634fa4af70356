//! Serving the subscriptions API: plain HTTP or HTTPS (`--api-tls-cert`, `--api-tls-key`),
//! HTTP/1.1 only, with every wait a peer can impose bounded.
//!
//! | bound | value |
//! |---|---|
//! | TLS handshake | [`TLS_HANDSHAKE_TIMEOUT`] (10 s) from the accepted connection |
//! | request line and headers | [`HEADER_TIMEOUT`] (10 s) from the first wait for them, however slowly the bytes trickle in; the same bound closes a kept-alive connection idle between requests |
//! | request head size | [`MAX_HEAD_BYTES`] (64 KiB), 431 beyond |
//! | request body | [`api::MAX_BODY_BYTES`](super::api::MAX_BODY_BYTES) (64 KiB), 413 beyond; all of it within [`api::BODY_TIMEOUT`](super::api::BODY_TIMEOUT) (10 s), 408 otherwise |
//! | connection age | [`MAX_CONNECTION_AGE`] (5 min): then closed after its current request, or [`CLOSE_GRACE`] (10 s) later at the latest (a peer that stops reading its answer) |
//! | connections at once | [`MAX_CONNECTIONS`] (256); more wait in the listen backlog |
//!
//! The bearer token is checked before the body is read (see [`api`](super::api)), so an
//! unauthenticated peer cannot make the notifier wait for or buffer a body. Accept errors (too
//! many open files, ...) are logged and retried: nothing a peer does stops the listener.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Longest TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a request's line and headers (also the idle keep-alive timeout).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (line and headers).
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// Age after which a connection is closed once its current request is answered.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// How long a connection being closed (age, shutdown) may take to finish its request.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;

/// The API's TLS configuration from PEM files; an error names the option at fault and the
/// fix.
pub fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, (&'static str, String)> {
    let read = |option: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| (option, format!("cannot read {}: {e}", path.display())))
    };
    let cert_pem = read("--api-tls-cert", cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            (
                "--api-tls-cert",
                format!("{} is not a PEM certificate chain: {e}", cert.display()),
            )
        })?;
    if chain.is_empty() {
        return Err((
            "--api-tls-cert",
            format!(
                "{} holds no certificate (expected -----BEGIN CERTIFICATE----- blocks, the server's first)",
                cert.display()
            ),
        ));
    }
    let key_pem = read("--api-tls-key", key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        (
            "--api-tls-key",
            format!(
                "{} holds no usable private key (PEM PKCS#8, PKCS#1 or SEC1 expected): {e}",
                key.display()
            ),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("--api-tls-cert", format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| {
            (
                "--api-tls-key",
                format!(
                    "{} and {} do not make a usable pair (is the key the certificate's?): {e}",
                    key.display(),
                    cert.display()
                ),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `app` on `listener` until `shutdown`, over TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut full_logged = false;
    loop {
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(p) => {
                full_logged = false;
                p
            }
            Err(_) => {
                if !full_logged {
                    tracing::warn!(
                        max = MAX_CONNECTIONS,
                        "The subscriptions API serves its most connections; new ones wait."
                    );
                    full_logged = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    p = Arc::clone(&slots).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                }
            }
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // EMFILE and the like: wait a little rather than spin, and go on.
                tracing::warn!(%error, "The subscriptions API could not accept a connection.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (app, acceptor, shutdown) = (app.clone(), acceptor.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                None => connection(stream, app, &shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => connection(tls, app, &shutdown).await,
                        Ok(Err(error)) => {
                            tracing::debug!(%error, %peer, "TLS handshake with an API client failed.");
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake with an API client timed out.");
                        }
                    }
                }
            }
        });
    }
}

/// One connection's requests, under the bounds of the module.
async fn connection<I>(io: I, app: Router, shutdown: &CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(error) = r {
                tracing::debug!(%error, "An API connection ended with an error.");
            }
            return;
        }
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::guard::Guard;
    use crate::sinks::webhook::api::{self, Api};
    use crate::sinks::webhook::subscriptions::Store;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TOKEN: &str = "unit-token-0123456789";

    /// The API on a local port, over a store that is never reached by these requests.
    async fn start() -> (std::net::SocketAddr, CancellationToken) {
        let target = walrelay_common::postgres::PgTarget::parse("postgres://x@127.0.0.1:1/x")
            .expect("target");
        let app = api::router(Api {
            store: Arc::new(Store::new(target)),
            guard: Arc::new(Guard::default()),
            token: Arc::from(TOKEN),
            max_subscriptions: 10,
            parking: Arc::new(crate::sinks::webhook::parking::Parking::new(
                std::time::Duration::from_secs(10),
                1 << 20,
                false,
                Arc::new(crate::metrics::Metrics::new().expect("metrics")),
            )),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, app, None, shutdown.clone()));
        (addr, shutdown)
    }

    /// Sends `head` (and no body) and returns the status line, within 3 s.
    async fn status_of(addr: std::net::SocketAddr, head: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(head.as_bytes()).await.expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let read = async {
            while !got.windows(2).any(|w| w == b"\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(3), read)
            .await
            .expect("an answer within 3 s");
        String::from_utf8_lossy(&got)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    #[tokio::test]
    async fn the_token_comes_before_the_body_and_bodies_are_bounded() {
        let (addr, shutdown) = start().await;
        // A wrong token with a huge body that never comes: 401 at once.
        let line = status_of(
            addr,
            "POST /v1/subscriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-token-0123456789\r\n\
             Content-Length: 1000000000\r\n\r\n",
        )
        .await;
        assert!(line.starts_with("HTTP/1.1 401"), "{line}");
        // No token at all, on an unknown path: 401 too (the token comes before routing).
        let line = status_of(addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(line.starts_with("HTTP/1.1 401"), "{line}");
        // The right token with a declared body over the limit: 413 without waiting for it.
        let line = status_of(
            addr,
            &format!(
                "POST /v1/subscriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Length: 1000000000\r\n\r\n"
            ),
        )
        .await;
        assert!(line.starts_with("HTTP/1.1 413"), "{line}");

        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let base = format!("http://{addr}");
        // A body over the limit, sent whole: 413 naming the limit, seen by the client.
        let r = http
            .post(format!("{base}/v1/subscriptions"))
            .bearer_auth(TOKEN)
            .body(vec![b' '; api::MAX_BODY_BYTES + 1000])
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), 413);
        let v: serde_json::Value = r.json().await.expect("json");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(&api::MAX_BODY_BYTES.to_string()), "{v}");
        // A chunked body over the limit (no Content-Length): 413 too.
        let mut chunked = format!(
            "POST /v1/subscriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        );
        for _ in 0..20 {
            chunked.push_str(&format!("2000\r\n{}\r\n", " ".repeat(0x2000)));
        }
        chunked.push_str("0\r\n\r\n");
        let line = status_of(addr, &chunked).await;
        assert!(line.starts_with("HTTP/1.1 413"), "{line}");
        // Within the limit, the body reaches validation (400: not JSON).
        let r = http
            .post(format!("{base}/v1/subscriptions"))
            .bearer_auth(TOKEN)
            .body("nope")
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), 400);
        let r = http
            .get(format!("{base}/v1/subscriptions"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), 200);
        let r = http
            .get(format!("{base}/v2/other"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), 404);
        let r = http
            .put(format!("{base}/v1/subscriptions"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), 405);
        let v: serde_json::Value = r.json().await.expect("json");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("PUT")),
            "{v}"
        );
        shutdown.cancel();
    }

    #[test]
    fn tls_files_are_checked_and_named() {
        let tmp = tempfile::tempdir().expect("dir");
        let dir = tmp.path();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("write");
        let missing = dir.join("missing.pem");
        let (option, message) = tls_config(&missing, &junk).expect_err("missing cert");
        assert_eq!(option, "--api-tls-cert");
        assert!(message.contains("missing.pem"), "{message}");
        let (option, message) = tls_config(&junk, &junk).expect_err("junk cert");
        assert_eq!(option, "--api-tls-cert");
        assert!(message.contains("junk.pem"), "{message}");

        let ca = walrelay_tests::certs::TestCa::new("unit");
        let (a, b) = (
            ca.server("a", &["localhost"]),
            ca.server("b", &["localhost"]),
        );
        let config = tls_config(&a.cert, &a.key).expect("a matching pair");
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let (option, message) = tls_config(&a.cert, &b.key).expect_err("someone else's key");
        assert_eq!(option, "--api-tls-key");
        assert!(message.contains("b.key"), "{message}");
        let (option, message) = tls_config(&a.key, &a.key).expect_err("a key as certificate");
        assert_eq!(option, "--api-tls-cert");
        assert!(message.contains("no certificate"), "{message}");
        let (option, _) = tls_config(&a.cert, &a.cert).expect_err("a certificate as key");
        assert_eq!(option, "--api-tls-key");
    }
}
