//! The subscriptions API on `--api-addr`, behind a bearer token.
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/subscriptions` `{"url", "schema"?, "table"?, "ops"?, "secret"?}` | 201 with the subscription and its `secret` (shown only here) |
//! | `GET /v1/subscriptions` | 200 `{"subscriptions": [...]}` |
//! | `GET /v1/subscriptions/{id}` | 200, or 404 |
//!
//! A subscription shows its `state` in this notifier: `active`, `disabled` (410 Gone), or
//! `parked` with `parked_since_ms` (Unix milliseconds), `last_error` and `held_events` (strict
//! mode); see [`parking`](super::parking).
//! | `DELETE /v1/subscriptions/{id}` | 204, or 404 |
//!
//! Errors are `{"error": {"field": ..., "message": ...}}`: 400 malformed, 401 no or wrong
//! token, 404 unknown id or path, 405 wrong method, 408 the body came too slowly, 409
//! `--max-subscriptions` reached, 413 the body is over [`MAX_BODY_BYTES`], 422 a field's value
//! refused (naming the field), 503 the subscriptions database is unreachable.
//!
//! The token is checked by a middleware in front of every route (and the fallback), before
//! anything reads the body: a request without the right token is answered 401 whatever body
//! it announces, and that body is never waited for. The comparison takes the same time
//! whatever the token given (SHA-256 digests compared without early exit). How connections
//! are served and bounded is in [`server`](super::server).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::parking::Parking;
use super::signing::Secret;
use super::subscriptions::{NewSubscription, Store, StoreError, Subscription};
use crate::http::guard::Guard;

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    /// The store.
    pub store: Arc<Store>,
    /// The SSRF guard (literal addresses are refused at creation already).
    pub guard: Arc<Guard>,
    /// The bearer token.
    pub token: Arc<str>,
    /// Most subscriptions the deployment may hold (`--max-subscriptions`).
    pub max_subscriptions: u64,
    /// The parked subscriptions (their state is shown).
    pub parking: Arc<Parking>,
}

/// Largest request body (a subscription takes well under 1 KiB).
pub const MAX_BODY_BYTES: usize = 64 << 10;
/// Longest wait for a whole request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A body over the limit is read and dropped up to this size (within [`BODY_TIMEOUT`]) before
/// the 413 goes out, so that the client, still sending, sees the answer rather than a reset
/// connection; beyond it the connection is closed after the answer.
const DRAIN_MAX_BYTES: u64 = 1 << 20;

/// The router: every route behind the token.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/subscriptions", get(list).post(create))
        .route("/v1/subscriptions/{id}", get(one).delete(remove))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            require_token,
        ))
        .with_state(api)
}

/// Answers 401 unless the request carries the token; runs before any extractor, so before
/// the body is read.
async fn require_token(State(api): State<Api>, request: Request, next: Next) -> Response {
    match authorized(&api, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        None,
        format!(
            "{method} is not allowed on {}; use GET or POST on /v1/subscriptions, GET or DELETE \
             on /v1/subscriptions/{{id}}",
            uri.path()
        ),
    )
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    error(
        StatusCode::NOT_FOUND,
        None,
        format!(
            "no such path {}; the API is /v1/subscriptions and /v1/subscriptions/{{id}}",
            uri.path()
        ),
    )
}

/// A refused request: its status, the field at fault, and what is wrong.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: Option<String>,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(json!({"error": {"field": self.field, "message": self.message}})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

fn error(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        field: field.map(String::from),
        message: message.into(),
    }
}

fn authorized(api: &Api, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Constant-time comparison of equal-length digests: neither the token's length nor how
    // much of it a guess got right shows in the time taken.
    let (given, expected) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(api.token.as_bytes()),
    );
    let same = given
        .iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0;
    if same {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            None,
            "missing or wrong bearer token (Authorization: Bearer <--api-token>)",
        ))
    }
}

fn store_error(e: &StoreError) -> ApiError {
    match e {
        StoreError::Full { count, max } => error(
            StatusCode::CONFLICT,
            None,
            format!(
                "this deployment holds {count} subscriptions and --max-subscriptions allows {max}; \
                 delete unused ones (DELETE /v1/subscriptions/{{id}}) or raise --max-subscriptions"
            ),
        ),
        _ => error(StatusCode::SERVICE_UNAVAILABLE, None, e.to_string()),
    }
}

fn too_large() -> ApiError {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        None,
        format!(
            "the body is over the API's limit of {MAX_BODY_BYTES} bytes (64 KiB); a subscription \
             takes well under 1 KiB"
        ),
    )
}

/// Reads a body of at most [`MAX_BODY_BYTES`] within [`BODY_TIMEOUT`].
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // A client waiting for `100 Continue` has sent nothing: answer at once.
    let expects_continue = headers.contains_key(header::EXPECT);
    let mut stream = body.into_data_stream();
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        if !expects_continue && declared.is_some_and(|n| n <= DRAIN_MAX_BYTES) {
            drain(&mut stream).await;
        }
        return Err(too_large());
    }
    let read = async {
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                error(
                    StatusCode::BAD_REQUEST,
                    None,
                    format!("the body could not be read: {e}"),
                )
            })?;
            if buf.len() + chunk.len() > MAX_BODY_BYTES {
                drain(&mut stream).await;
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(error(
                StatusCode::REQUEST_TIMEOUT,
                None,
                format!(
                    "the body did not arrive within {} s; send it whole at once",
                    BODY_TIMEOUT.as_secs()
                ),
            ))
        })
}

/// Reads and drops what is left of a body over the limit, up to [`DRAIN_MAX_BYTES`] within
/// [`BODY_TIMEOUT`].
async fn drain(stream: &mut axum::body::BodyDataStream) {
    let discard = async {
        let mut seen = 0u64;
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len() as u64;
            if seen > DRAIN_MAX_BYTES {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(BODY_TIMEOUT, discard).await;
}

fn view(s: &Subscription, parking: &Parking) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    if let (Value::Object(o), Value::Object(state)) =
        (&mut v, parking.view(&s.id, s.disabled.is_some()))
    {
        o.extend(state);
    }
    v
}

async fn list(State(api): State<Api>) -> Response {
    let subs: Vec<Value> = api
        .store
        .current()
        .iter()
        .map(|s| view(s, &api.parking))
        .collect();
    (StatusCode::OK, axum::Json(json!({ "subscriptions": subs }))).into_response()
}

async fn one(State(api): State<Api>, Path(id): Path<String>) -> Response {
    match api.store.get(&id) {
        Some(s) => (StatusCode::OK, axum::Json(view(&s, &api.parking))).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no subscription {id}"),
        )
        .into_response(),
    }
}

async fn remove(State(api): State<Api>, Path(id): Path<String>) -> Response {
    match api.store.delete(&id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no subscription {id}"),
        )
        .into_response(),
        Err(e) => store_error(&e).into_response(),
    }
}

async fn create(State(api): State<Api>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_body(&headers, body).await {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let new = match validate(&body, &api.guard) {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    let secret = new.secret.clone();
    match api.store.create(new, api.max_subscriptions).await {
        Ok(s) => {
            let mut v = view(&s, &api.parking);
            v["secret"] = Value::String(secret);
            tracing::info!(id = %s.id, url = %walrelay_common::options::without_userinfo(&s.url), "Subscription created.");
            (StatusCode::CREATED, axum::Json(v)).into_response()
        }
        Err(e) => store_error(&e).into_response(),
    }
}

const OPS: [&str; 6] = ["c", "u", "d", "r", "t", "ddl"];

/// Validates a creation request; the error names the field.
pub fn validate(body: &[u8], guard: &Guard) -> Result<NewSubscription, ApiError> {
    let unprocessable =
        |field: &str, m: String| error(StatusCode::UNPROCESSABLE_ENTITY, Some(field), m);
    let obj: Map<String, Value> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => o,
        Ok(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                None,
                "the body must be a JSON object",
            ));
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                None,
                format!("the body is not JSON: {e}"),
            ));
        }
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !["url", "schema", "table", "ops", "secret"].contains(&k.as_str()))
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            Some(k),
            format!("unknown field {k:?}; the fields are url, schema, table, ops, secret"),
        ));
    }
    let url = match obj.get("url") {
        Some(Value::String(u)) => u.clone(),
        Some(_) => return Err(unprocessable("url", "must be a string".into())),
        None => return Err(unprocessable("url", "is required".into())),
    };
    let parsed = reqwest::Url::parse(&url)
        .map_err(|e| unprocessable("url", format!("{url:?} is not a URL: {e}")))?;
    guard
        .check_url(&parsed)
        .map_err(|e| unprocessable("url", e.to_string()))?;
    let name = |field: &str| -> Result<Option<String>, ApiError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 63 => Ok(Some(s.clone())),
            Some(_) => Err(unprocessable(
                field,
                "must be a name of 1 to 63 characters".into(),
            )),
        }
    };
    let schema = name("schema")?;
    let table = name("table")?;
    let ops = match obj.get("ops") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if !a.is_empty() => {
            let mut ops = Vec::new();
            for v in a {
                match v.as_str().filter(|o| OPS.contains(o)) {
                    Some(o) if !ops.iter().any(|x: &String| x == o) => ops.push(o.to_string()),
                    _ => {
                        return Err(unprocessable(
                            "ops",
                            format!("{v} is not one of c, u, d, r, t, ddl (each once)"),
                        ));
                    }
                }
            }
            Some(ops)
        }
        Some(_) => {
            return Err(unprocessable(
                "ops",
                "must be a non-empty array of c, u, d, r, t, ddl".into(),
            ));
        }
    };
    let secret = match obj.get("secret") {
        None | Some(Value::Null) => Secret::generate(),
        Some(Value::String(s)) => {
            Secret::parse(s).map_err(|e| unprocessable("secret", e))?;
            s.clone()
        }
        Some(_) => return Err(unprocessable("secret", "must be a string".into())),
    };
    Ok(NewSubscription {
        url,
        schema,
        table,
        ops,
        secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: ApiError) -> (StatusCode, Option<String>) {
        let r = e.into_response();
        let status = r.status();
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .ok()
            .and_then(|rt| {
                rt.block_on(axum::body::to_bytes(r.into_body(), 1 << 16))
                    .ok()
            })
            .unwrap_or_default();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, v["error"]["field"].as_str().map(String::from))
    }

    #[test]
    fn invalid_input_names_the_field() {
        let guard = Guard::default();
        let cases: [(&str, StatusCode, Option<&str>); 11] = [
            ("nope", StatusCode::BAD_REQUEST, None),
            ("[1]", StatusCode::BAD_REQUEST, None),
            (
                r#"{"url":"https://a.example","colour":1}"#,
                StatusCode::BAD_REQUEST,
                Some("colour"),
            ),
            (r#"{}"#, StatusCode::UNPROCESSABLE_ENTITY, Some("url")),
            (
                r#"{"url":5}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("url"),
            ),
            (
                r#"{"url":"not a url"}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("url"),
            ),
            (
                r#"{"url":"http://169.254.169.254/"}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("url"),
            ),
            (
                r#"{"url":"https://a.example","ops":["x"]}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("ops"),
            ),
            (
                r#"{"url":"https://a.example","ops":[]}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("ops"),
            ),
            (
                r#"{"url":"https://a.example","table":""}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("table"),
            ),
            (
                r#"{"url":"https://a.example","secret":"plain"}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("secret"),
            ),
        ];
        for (body, status, field) in cases {
            let r = validate(body.as_bytes(), &guard).expect_err(body);
            assert_eq!(field_of(r), (status, field.map(String::from)), "{body}");
        }
        let ok = validate(
            br#"{"url":"https://a.example/hook","schema":"public","ops":["c","u"]}"#,
            &guard,
        )
        .expect("valid");
        assert!(ok.secret.starts_with("whsec_"));
        assert_eq!(ok.ops, Some(vec!["c".to_string(), "u".to_string()]));
    }
}
