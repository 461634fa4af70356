//! The subscriptions API on `--api-addr`, behind a bearer token.
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/subscriptions` `{"url", "schema"?, "table"?, "ops"?, "secret"?}` | 201 with the subscription and its `secret` (shown only here) |
//! | `GET /v1/subscriptions` | 200 `{"subscriptions": [...]}` |
//! | `GET /v1/subscriptions/{id}` | 200, or 404 |
//! | `DELETE /v1/subscriptions/{id}` | 204, or 404 |
//!
//! Errors are `{"error": {"field": ..., "message": ...}}`: 400 malformed, 401 no or wrong
//! token, 404 unknown id, 422 a field's value refused (naming the field), 503 the
//! subscriptions database is unreachable.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};

use super::guard::Guard;
use super::signing::Secret;
use super::subscriptions::{NewSubscription, Store, StoreError, Subscription};

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    /// The store.
    pub store: Arc<Store>,
    /// The SSRF guard (literal addresses are refused at creation already).
    pub guard: Arc<Guard>,
    /// The bearer token.
    pub token: Arc<str>,
}

/// The router.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/subscriptions", get(list).post(create))
        .route("/v1/subscriptions/{id}", get(one).delete(remove))
        .with_state(api)
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
    // Constant-time comparison.
    let expected = api.token.as_bytes();
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected)
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
    error(StatusCode::SERVICE_UNAVAILABLE, None, e.to_string())
}

fn view(s: &Subscription) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

async fn list(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return r.into_response();
    }
    let subs: Vec<Value> = api.store.current().iter().map(view).collect();
    (StatusCode::OK, axum::Json(json!({ "subscriptions": subs }))).into_response()
}

async fn one(State(api): State<Api>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return r.into_response();
    }
    match api.store.get(&id) {
        Some(s) => (StatusCode::OK, axum::Json(view(&s))).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no subscription {id}"),
        )
        .into_response(),
    }
}

async fn remove(State(api): State<Api>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return r.into_response();
    }
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

async fn create(State(api): State<Api>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return r.into_response();
    }
    let new = match validate(&body, &api.guard) {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    let secret = new.secret.clone();
    match api.store.create(new).await {
        Ok(s) => {
            let mut v = view(&s);
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
