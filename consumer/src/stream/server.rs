//! The gateway's HTTP side: the routes, the token check, and serving connections (plain or
//! TLS, with the webhook API's bounds on handshakes and request heads:
//! [`crate::sinks::webhook::server`]) with WebSocket upgrades.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | the live page (`live/index.html`, static: it asks for the token) |
//! | `GET /v1/stream?group=G[&tables=…][&from=earliest\|latest]` | 101, then the protocol of [`super::frames`] |
//! | `GET /v1/lag?group=G` | 200 `{"group":G,"lag":N}` |
//!
//! Refusals are `{"error":{"message":…}}`: 401 no or wrong token (checked first, before the
//! query and the upgrade), 400 a bad query (the message names the parameter and the fix) or a
//! request that is not a WebSocket upgrade, 503 `--max-connections` streams are open or Kafka
//! does not answer a lag query, 404 any other path.
//!
//! # The token
//!
//! `Authorization: Bearer <token>`, or, since browsers cannot set headers on a WebSocket, a
//! subprotocol carrying it as Kubernetes does: the client offers
//! `Sec-WebSocket-Protocol: walrelay.v1, base64url.bearer.authorization.walrelay.<token in
//! unpadded base64url>` and the gateway selects `walrelay.v1` (never echoing the token). The
//! comparison takes the same time whatever the token given (SHA-256 digests compared without
//! early exit).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::query::{self, Query};
use super::session::{self, Gateway};
use crate::sinks::webhook::server::{
    HEADER_TIMEOUT, MAX_CONNECTIONS, MAX_HEAD_BYTES, TLS_HANDSHAKE_TIMEOUT,
};

/// The subprotocol the gateway speaks.
pub const PROTOCOL: &str = "walrelay.v1";
/// Prefix of the subprotocol carrying the token.
pub const TOKEN_PROTOCOL_PREFIX: &str = "base64url.bearer.authorization.walrelay.";
/// Largest client frame (an ack takes under 200 bytes).
pub const MAX_CLIENT_FRAME: usize = 64 << 10;
/// Most bytes a stream's socket may buffer unsent before the write fails.
pub const MAX_WRITE_BUFFER: usize = 64 << 20;
/// Lag queries at once (each makes a short-lived Kafka client).
const LAG_QUERIES: usize = 2;

/// What the handlers share.
#[derive(Clone)]
struct App {
    gw: Arc<Gateway>,
    streams: Arc<Semaphore>,
    lag_queries: Arc<Semaphore>,
}

/// The router.
pub fn router(gw: Arc<Gateway>) -> Router {
    let app = App {
        streams: Arc::new(Semaphore::new(gw.settings.max_connections)),
        lag_queries: Arc::new(Semaphore::new(LAG_QUERIES)),
        gw,
    };
    Router::new()
        .route("/", get(page))
        .route("/v1/stream", get(stream))
        .route("/v1/lag", get(lag))
        .fallback(|| async {
            refusal(
                StatusCode::NOT_FOUND,
                "no such path; the gateway serves /, /v1/stream and /v1/lag",
            )
        })
        .with_state(app)
}

fn refusal(status: StatusCode, message: impl Into<String>) -> Response {
    let mut r = (
        status,
        axum::Json(json!({"error": {"message": message.into()}})),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

async fn page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("live/index.html"),
    )
        .into_response()
}

/// How the token came.
#[derive(Debug, PartialEq, Eq)]
enum Given {
    Header,
    Protocol,
}

/// The token the request carries (the header first), and how.
fn token_of(headers: &HeaderMap) -> Option<(String, Given)> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some((t.trim().to_string(), Given::Header));
    }
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix(TOKEN_PROTOCOL_PREFIX))
        .find_map(|b64| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b64.trim_end_matches('='))
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        })
        .map(|t| (t, Given::Protocol))
}

/// Checks the token; the error is the 401.
fn authorize(gw: &Gateway, headers: &HeaderMap) -> Result<Given, Box<Response>> {
    let (given, how) = token_of(headers).unwrap_or_else(|| (String::new(), Given::Header));
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(gw.settings.token.0.as_bytes()),
    );
    if a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
    {
        return Ok(how);
    }
    gw.metrics.refused.with_label_values(&["token"]).inc();
    Err(Box::new(refusal(
        StatusCode::UNAUTHORIZED,
        format!(
            "missing or wrong token: send Authorization: Bearer <--api-token>, or offer the \
             subprotocols {PROTOCOL} and {TOKEN_PROTOCOL_PREFIX}<token in base64url>"
        ),
    )))
}

async fn stream(
    State(app): State<App>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let how = match authorize(&app.gw, &headers) {
        Ok(how) => how,
        Err(r) => return *r,
    };
    let query = match Query::parse(raw.as_deref()) {
        Ok(q) => q,
        Err(message) => {
            app.gw.metrics.refused.with_label_values(&["query"]).inc();
            return refusal(StatusCode::BAD_REQUEST, message);
        }
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            app.gw.metrics.refused.with_label_values(&["query"]).inc();
            return refusal(
                rejection.status(),
                format!(
                    "{} (/v1/stream is a WebSocket: connect with ws:// or wss://)",
                    rejection.body_text()
                ),
            );
        }
    };
    let ws = ws.protocols([PROTOCOL]);
    if how == Given::Protocol && ws.selected_protocol().is_none() {
        app.gw.metrics.refused.with_label_values(&["query"]).inc();
        return refusal(
            StatusCode::BAD_REQUEST,
            format!(
                "offer the subprotocol {PROTOCOL} beside the token's, e.g. new WebSocket(url, [\"{PROTOCOL}\", \"{TOKEN_PROTOCOL_PREFIX}…\"])"
            ),
        );
    }
    let Ok(permit) = Arc::clone(&app.streams).try_acquire_owned() else {
        app.gw.metrics.refused.with_label_values(&["full"]).inc();
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the gateway serves its most streams (--max-connections {}); retry later",
                app.gw.settings.max_connections
            ),
        );
    };
    let gw = Arc::clone(&app.gw);
    ws.max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .on_failed_upgrade(|error| tracing::debug!(%error, "A WebSocket upgrade failed."))
        .on_upgrade(move |socket| session::run(socket, query, gw, permit))
}

async fn lag(State(app): State<App>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    if let Err(r) = authorize(&app.gw, &headers) {
        return *r;
    }
    let mut group = None;
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if k != "group" {
            return refusal(
                StatusCode::BAD_REQUEST,
                "the only parameter is group: /v1/lag?group=<name>",
            );
        }
        group = Some(v.into_owned());
    }
    let group = group.unwrap_or_default();
    if let Err(m) = query::check_group(&group) {
        return refusal(StatusCode::BAD_REQUEST, m);
    }
    let Ok(_slot) = app.lag_queries.acquire().await else {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let (gw, id) = (
        Arc::clone(&app.gw),
        format!("{}{group}", app.gw.settings.group_prefix),
    );
    match tokio::task::spawn_blocking(move || super::kafka::group_lag(&gw.runtime, &id)).await {
        Ok(Ok(lag)) => axum::Json(json!({"group": group, "lag": lag})).into_response(),
        Ok(Err(e)) => refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Kafka did not answer the lag query: {e}"),
        ),
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Serves `app` on `listener` until `shutdown`, over TLS when `tls` is given. HTTP connections
/// (not streams: an upgraded connection leaves this count) are limited to the webhook API's
/// [`MAX_CONNECTIONS`]; more wait in the listen backlog.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(%error, "The stream gateway could not accept a connection.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (app, acceptor) = (app.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                None => connection(stream, app).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => connection(tls, app).await,
                        Ok(Err(error)) => {
                            tracing::debug!(%error, %peer, "TLS handshake with a stream client failed.");
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake with a stream client timed out.");
                        }
                    }
                }
            }
        });
    }
}

/// One connection's requests, until it closes or upgrades.
async fn connection<I>(io: I, app: Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let conn = http
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app))
        .with_upgrades();
    if let Err(error) = conn.await {
        tracing::debug!(%error, "A stream gateway connection ended with an error.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_header_or_the_subprotocol() {
        let mut h = HeaderMap::new();
        assert_eq!(token_of(&h), None);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("s3cret/token+x");
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(&format!("{PROTOCOL}, {TOKEN_PROTOCOL_PREFIX}{b64}"))
                .expect("header"),
        );
        assert_eq!(
            token_of(&h),
            Some(("s3cret/token+x".to_string(), Given::Protocol))
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer from-header"),
        );
        assert_eq!(
            token_of(&h),
            Some(("from-header".to_string(), Given::Header))
        );
    }
}
