//! A thin REST client for the parts of the Elasticsearch 7/8 and OpenSearch 1/2 API the sink
//! uses (they are the same there): `_bulk`, index create/get/delete, `_mapping`, `_aliases`,
//! `_alias`, `_doc`, `_refresh`, `_delete_by_query`.
//!
//! (About 550 lines: one short method per request over the shared `call`, kept together so
//! the whole API surface the sink depends on reads in one place.)

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Map, Value, json};

use super::config::{SearchAuth, SearchSettings};

/// A failed request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SearchError {
    /// Worth retrying: throttling (429), a server error (5xx), a timeout or a lost connection.
    #[error("{what}: {message}")]
    Transient {
        /// The request.
        what: String,
        /// What happened.
        message: String,
        /// `throttled`, `server` or `connection`, for metrics.
        kind: &'static str,
        /// The server's `Retry-After`, when given.
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help: credentials, permissions, a refused request.
    #[error("{what}: {message}")]
    Definite {
        /// The request.
        what: String,
        /// What happened, and how to fix it when known.
        message: String,
    },
}

impl SearchError {
    /// A label for the sink-errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            SearchError::Transient { kind, .. } => kind,
            SearchError::Definite { .. } => "definite",
        }
    }
}

/// One item of a bulk response.
#[derive(Debug, Clone)]
pub struct BulkItem {
    /// HTTP status of the item.
    pub status: u16,
    /// `type: reason` of the item's error, when it failed.
    pub error: Option<String>,
}

/// The search service.
#[derive(Clone)]
pub struct SearchClient {
    http: reqwest::Client,
    base: Url,
    auth: Option<HeaderValue>,
}

/// An index's mapping.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// The concrete index.
    pub index: String,
    /// Mapped fields.
    pub properties: Map<String, Value>,
    /// `_meta` (null when unset).
    pub meta: Value,
}

/// The result of creating an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Created now.
    New,
    /// It existed already.
    Existed,
}

fn reason(body: &Value) -> String {
    let e = &body["error"];
    match (e["type"].as_str(), e["reason"].as_str()) {
        (Some(t), Some(r)) => format!("{t}: {r}"),
        _ => e
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| body.to_string().chars().take(300).collect()),
    }
}

impl SearchClient {
    /// A client for `settings.url` with its authentication and CA.
    pub fn new(settings: &SearchSettings) -> Result<Self, SearchError> {
        let definite = |message: String| SearchError::Definite {
            what: "search client".into(),
            message,
        };
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("walrelay-consumer/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &settings.ca_pem {
            let cert = reqwest::Certificate::from_pem(pem).map_err(|e| definite(e.to_string()))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| definite(e.to_string()))?;
        let auth = match &settings.auth {
            SearchAuth::None => None,
            SearchAuth::Basic { username, password } => {
                use base64::Engine as _;
                let token = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{password}"));
                Some(format!("Basic {token}"))
            }
            SearchAuth::ApiKey(key) => Some(format!("ApiKey {key}")),
        };
        let auth = match auth {
            None => None,
            Some(v) => {
                let mut h = HeaderValue::from_str(&v).map_err(|_| {
                    definite(
                        "the credentials contain characters not allowed in an HTTP header".into(),
                    )
                })?;
                h.set_sensitive(true);
                Some(h)
            }
        };
        Ok(Self {
            http,
            base: settings.url.clone(),
            auth,
        })
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            for s in segments {
                path.push(s);
            }
        }
        url
    }

    /// Sends a request; returns status and parsed body (`Null` when empty or not JSON).
    async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<(Vec<u8>, &'static str)>,
    ) -> Result<(StatusCode, Value), SearchError> {
        let body = body.map(|(bytes, content_type)| (bytes.into(), content_type));
        let (status, bytes) = self.call_raw(method, segments, query, body).await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// Sends a request; returns status and body bytes, with 429, 5xx, 401 and 403 turned into
    /// errors.
    async fn call_raw(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<(bytes::Bytes, &'static str)>,
    ) -> Result<(StatusCode, bytes::Bytes), SearchError> {
        let what = format!("{method} /{}", segments.join("/"));
        let mut req = self.http.request(method, self.url(segments));
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        if let Some((bytes, content_type)) = body {
            req = req.header(CONTENT_TYPE, content_type).body(bytes);
        }
        let resp = req.send().await.map_err(|e| SearchError::Transient {
            what: what.clone(),
            message: format!("no answer: {e}"),
            kind: "connection",
            retry_after: None,
        })?;
        let status = resp.status();
        let retry_after = crate::http::retry_after(resp.headers());
        let bytes = resp.bytes().await.map_err(|e| SearchError::Transient {
            what: what.clone(),
            message: format!("reading the answer: {e}"),
            kind: "connection",
            retry_after: None,
        })?;
        let failed = status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
            || status == StatusCode::UNAUTHORIZED
            || status == StatusCode::FORBIDDEN;
        let value: Value = if failed {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(SearchError::Transient {
                what,
                message: format!("{status}: {}", reason(&value)),
                kind: if status == StatusCode::TOO_MANY_REQUESTS {
                    "throttled"
                } else {
                    "server"
                },
                retry_after,
            });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(SearchError::Definite {
                what,
                message: format!(
                    "{status}: {} (check --search-username/--search-password or --search-api-key, and the role's index privileges)",
                    reason(&value)
                ),
            });
        }
        Ok((status, bytes))
    }

    fn refused(what: &str, status: StatusCode, body: &Value) -> SearchError {
        SearchError::Definite {
            what: what.to_string(),
            message: format!("{status}: {}", reason(body)),
        }
    }

    /// The server's version string (`GET /`).
    pub async fn version(&self) -> Result<String, SearchError> {
        let (status, body) = self.call(Method::GET, &[], &[], None).await?;
        if !status.is_success() {
            return Err(Self::refused("GET /", status, &body));
        }
        let dist = body["version"]["distribution"]
            .as_str()
            .unwrap_or("elasticsearch");
        let number = body["version"]["number"].as_str().unwrap_or("unknown");
        Ok(format!("{dist} {number}"))
    }

    /// The indexes `alias` points at; `None` when no such alias exists.
    pub async fn alias_targets(&self, alias: &str) -> Result<Option<Vec<String>>, SearchError> {
        let (status, body) = self
            .call(Method::GET, &["_alias", alias], &[], None)
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Self::refused("GET /_alias", status, &body));
        }
        Ok(Some(
            body.as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default(),
        ))
    }

    /// Every alias, as (index, alias) pairs.
    pub async fn all_aliases(&self) -> Result<Vec<(String, String)>, SearchError> {
        let (status, body) = self.call(Method::GET, &["_alias"], &[], None).await?;
        if !status.is_success() {
            return Err(Self::refused("GET /_alias", status, &body));
        }
        let mut out = Vec::new();
        for (index, v) in body.as_object().into_iter().flatten() {
            for alias in v["aliases"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(a, _)| a)
            {
                out.push((index.clone(), alias.clone()));
            }
        }
        Ok(out)
    }

    /// The mapped properties of an index (or of the index an alias points at); `None` when it
    /// does not exist. Also returns the concrete index name.
    pub async fn properties(
        &self,
        name: &str,
    ) -> Result<Option<(String, Map<String, Value>)>, SearchError> {
        Ok(self.mapping(name).await?.map(|m| (m.index, m.properties)))
    }

    /// The mapping of an index (or of the index an alias points at); `None` when it does not
    /// exist.
    pub async fn mapping(&self, name: &str) -> Result<Option<Mapping>, SearchError> {
        let (status, body) = self.call(Method::GET, &[name], &[], None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Self::refused("GET index", status, &body));
        }
        Ok(body
            .as_object()
            .and_then(|o| o.iter().next())
            .map(|(index, v)| Mapping {
                index: index.clone(),
                properties: v["mappings"]["properties"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                meta: v["mappings"]["_meta"].clone(),
            }))
    }

    /// Creates an index with `body` (settings, mappings, aliases).
    pub async fn create_index(&self, name: &str, body: &Value) -> Result<Created, SearchError> {
        let (status, resp) = self
            .call(
                Method::PUT,
                &[name],
                &[],
                Some((body.to_string().into_bytes(), "application/json")),
            )
            .await?;
        if status.is_success() {
            return Ok(Created::New);
        }
        if resp["error"]["type"] == "resource_already_exists_exception" {
            return Ok(Created::Existed);
        }
        Err(Self::refused(&format!("PUT /{name}"), status, &resp))
    }

    /// Deletes an index (absent is fine).
    pub async fn delete_index(&self, name: &str) -> Result<(), SearchError> {
        let (status, body) = self.call(Method::DELETE, &[name], &[], None).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(Self::refused(&format!("DELETE /{name}"), status, &body))
    }

    /// Adds fields to a mapping; `meta`, when given, replaces the mapping's `_meta`.
    pub async fn put_mapping(
        &self,
        index: &str,
        properties: Map<String, Value>,
        meta: Option<&Value>,
    ) -> Result<(), SearchError> {
        let mut body = json!({ "properties": properties });
        if let Some(meta) = meta {
            body["_meta"] = meta.clone();
        }
        let body = body.to_string().into_bytes();
        let (status, resp) = self
            .call(
                Method::PUT,
                &[index, "_mapping"],
                &[],
                Some((body, "application/json")),
            )
            .await?;
        if status.is_success() {
            return Ok(());
        }
        Err(Self::refused(
            &format!("PUT /{index}/_mapping"),
            status,
            &resp,
        ))
    }

    /// Applies alias actions atomically (one `_aliases` request).
    pub async fn update_aliases(&self, actions: Vec<Value>) -> Result<(), SearchError> {
        let body = json!({ "actions": actions }).to_string().into_bytes();
        let (status, resp) = self
            .call(
                Method::POST,
                &["_aliases"],
                &[],
                Some((body, "application/json")),
            )
            .await?;
        if status.is_success() {
            return Ok(());
        }
        Err(Self::refused("POST /_aliases", status, &resp))
    }

    /// Sends an NDJSON bulk body; one item per action, in order. `body` is shared, not copied,
    /// so a retry resends the same buffer.
    pub async fn bulk(
        &self,
        body: bytes::Bytes,
        actions: usize,
    ) -> Result<Vec<BulkItem>, SearchError> {
        /// Only what the sink reads of a bulk answer (the rest is skipped unparsed).
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(default)]
            items: Vec<std::collections::HashMap<String, Item>>,
        }
        #[derive(serde::Deserialize)]
        struct Item {
            status: u16,
            #[serde(default)]
            error: Option<Value>,
        }
        let (status, bytes) = self
            .call_raw(
                Method::POST,
                &["_bulk"],
                &[],
                Some((body, "application/x-ndjson")),
            )
            .await?;
        if !status.is_success() {
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(Self::refused("POST /_bulk", status, &value));
        }
        let answer: Answer =
            serde_json::from_slice(&bytes).map_err(|e| SearchError::Transient {
                what: "POST /_bulk".into(),
                message: format!("unreadable answer: {e}"),
                kind: "server",
                retry_after: None,
            })?;
        if answer.items.len() != actions {
            return Err(SearchError::Transient {
                what: "POST /_bulk".into(),
                message: format!(
                    "answered {} items for {actions} actions",
                    answer.items.len()
                ),
                kind: "server",
                retry_after: None,
            });
        }
        Ok(answer
            .items
            .into_iter()
            .map(|item| match item.into_values().next() {
                Some(Item { status, error }) => BulkItem {
                    status,
                    error: error.map(|e| match (e["type"].as_str(), e["reason"].as_str()) {
                        (Some(t), Some(r)) => format!("{t}: {r}"),
                        _ => e.to_string(),
                    }),
                },
                None => BulkItem {
                    status: 500,
                    error: Some("empty bulk item".into()),
                },
            })
            .collect())
    }

    /// A document's version and source; `None` when absent.
    pub async fn get_doc(
        &self,
        index: &str,
        id: &str,
    ) -> Result<Option<(i64, Map<String, Value>)>, SearchError> {
        let (status, body) = self
            .call(Method::GET, &[index, "_doc", id], &[], None)
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Self::refused(&format!("GET /{index}/_doc"), status, &body));
        }
        if body["found"] != Value::Bool(true) {
            return Ok(None);
        }
        Ok(Some((
            body["_version"].as_i64().unwrap_or(0),
            body["_source"].as_object().cloned().unwrap_or_default(),
        )))
    }

    /// Stores a document with internal versioning (walrelay's own state, never table rows).
    pub async fn put_doc(&self, index: &str, id: &str, doc: &Value) -> Result<(), SearchError> {
        let (status, body) = self
            .call(
                Method::PUT,
                &[index, "_doc", id],
                &[("refresh", "true")],
                Some((doc.to_string().into_bytes(), "application/json")),
            )
            .await?;
        if status.is_success() {
            return Ok(());
        }
        Err(Self::refused(&format!("PUT /{index}/_doc"), status, &body))
    }

    /// Makes recent writes visible to search (and to delete-by-query).
    pub async fn refresh(&self, index: &str) -> Result<(), SearchError> {
        let (status, body) = self
            .call(Method::POST, &[index, "_refresh"], &[], None)
            .await?;
        if status.is_success() {
            return Ok(());
        }
        Err(Self::refused(
            &format!("POST /{index}/_refresh"),
            status,
            &body,
        ))
    }

    /// Deletes every document matching `query`; returns how many.
    pub async fn delete_by_query(&self, index: &str, query: Value) -> Result<u64, SearchError> {
        let body = json!({ "query": query }).to_string().into_bytes();
        let (status, resp) = self
            .call(
                Method::POST,
                &[index, "_delete_by_query"],
                &[("conflicts", "proceed"), ("refresh", "true")],
                Some((body, "application/json")),
            )
            .await?;
        if status.is_success() {
            return Ok(resp["deleted"].as_u64().unwrap_or(0));
        }
        Err(Self::refused(
            &format!("POST /{index}/_delete_by_query"),
            status,
            &resp,
        ))
    }
}
