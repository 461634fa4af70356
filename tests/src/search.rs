//! A stand-in for Elasticsearch/OpenSearch that behaves as their documented REST API does, for
//! the parts walrelay uses: index create/get/delete with settings, mappings and aliases,
//! `_bulk` (index, create, update, delete; external versions; per-item results; 409 on a stale
//! version; 404 `not_found` for a delete of a missing document), get/put document, `_count`,
//! `_refresh`, `_delete_by_query` (the queries the sink sends: see [`query_matches`]), `_aliases`
//! (validated as a whole, then applied at once) and `GET _alias`.
//!
//! Faults are injectable while it runs: a share of bulk items answered 429 or 500, a share of
//! whole requests answered 429 with `Retry-After`, and a delay before every answer. With
//! `discard` it parses bulk requests and answers at once without storing anything (the
//! benchmark's "sink that answers at once").
//!
//! It also watches for what a correct indexer never does: a document write without an external
//! version, and a stored version going down.

#![allow(clippy::result_large_err)] // handlers return ready-made error responses

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde_json::{Map, Value, json};

/// Injected faults; all zero by default.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Share (0..1) of bulk items answered with a retryable error (429 or 500, half each).
    pub item_error_ratio: f64,
    /// Share (0..1) of `_bulk` requests answered 429 as a whole, with `Retry-After: 1`.
    pub request_429_ratio: f64,
    /// Delay before every answer.
    pub delay: Duration,
    /// Parse and acknowledge bulk requests without storing anything.
    pub discard: bool,
}

#[derive(Debug, Clone)]
struct Doc {
    version: i64,
    /// `None`: a delete tombstone (kept, as with a large `index.gc_deletes`).
    source: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Default)]
struct Index {
    settings: Value,
    properties: Map<String, Value>,
    /// The mapping's `_meta` (null when unset).
    meta: Value,
    docs: HashMap<String, Doc>,
}

#[derive(Default)]
struct State {
    indices: BTreeMap<String, Index>,
    aliases: BTreeMap<String, BTreeSet<String>>,
    faults: Faults,
    unversioned_writes: u64,
    regressions: Vec<String>,
    bulk_items: u64,
    injected_errors: u64,
}

/// The running stand-in; stops when dropped.
pub struct SearchStandIn {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SearchStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SearchStandIn {
    /// Starts on a free loopback port (inside a tokio runtime).
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the search stand-in");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::clone(&state);
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = Arc::clone(&shared);
                async move { handle(state, method, uri, headers, body).await }
            },
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Live documents of an index or of the one index an alias points at, by id.
    pub fn documents(&self, name: &str) -> BTreeMap<String, Value> {
        let st = self.lock();
        let Some(index) = st.resolve_one(name).ok().and_then(|i| st.indices.get(&i)) else {
            return BTreeMap::new();
        };
        index
            .docs
            .iter()
            .filter_map(|(id, d)| Some((id.clone(), Value::Object(d.source.clone()?))))
            .collect()
    }

    /// The stored version of a document (tombstones included).
    pub fn version(&self, name: &str, id: &str) -> Option<i64> {
        let st = self.lock();
        let index = st.resolve_one(name).ok()?;
        st.indices.get(&index)?.docs.get(id).map(|d| d.version)
    }

    /// Names of every index.
    pub fn indices(&self) -> Vec<String> {
        self.lock().indices.keys().cloned().collect()
    }

    /// The indexes an alias points at.
    pub fn alias_targets(&self, alias: &str) -> Vec<String> {
        self.lock()
            .aliases
            .get(alias)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The mapping's `_meta` of an index or alias (null when unset).
    pub fn meta(&self, name: &str) -> Value {
        let st = self.lock();
        st.resolve_one(name)
            .ok()
            .and_then(|i| st.indices.get(&i))
            .map(|i| i.meta.clone())
            .unwrap_or(Value::Null)
    }

    /// The mapped properties of an index or alias.
    pub fn properties(&self, name: &str) -> Map<String, Value> {
        let st = self.lock();
        st.resolve_one(name)
            .ok()
            .and_then(|i| st.indices.get(&i))
            .map(|i| i.properties.clone())
            .unwrap_or_default()
    }

    /// Document writes that carried no external version (a correct indexer makes none).
    pub fn unversioned_writes(&self) -> u64 {
        self.lock().unversioned_writes
    }

    /// Every time a stored version went down, described.
    pub fn regressions(&self) -> Vec<String> {
        self.lock().regressions.clone()
    }

    /// Bulk items seen, and how many of them got an injected error.
    pub fn bulk_stats(&self) -> (u64, u64) {
        let st = self.lock();
        (st.bulk_items, st.injected_errors)
    }
}

fn error(status: StatusCode, kind: &str, reason: impl Into<String>) -> Response {
    let reason = reason.into();
    (
        status,
        axum::Json(json!({
            "error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason},
            "status": status.as_u16()
        })),
    )
        .into_response()
}

fn ok(body: Value) -> Response {
    (StatusCode::OK, axum::Json(body)).into_response()
}

fn valid_index_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("must be 1 to 255 bytes".into());
    }
    if name.starts_with(['_', '-', '+']) || name == "." || name == ".." {
        return Err("must not start with '_', '-', or '+'".into());
    }
    if name.chars().any(|c| c.is_uppercase()) {
        return Err("must be lowercase".into());
    }
    if let Some(c) = name.chars().find(|c| {
        matches!(
            c,
            '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':'
        )
    }) {
        return Err(format!("must not contain '{c}'"));
    }
    Ok(())
}

impl State {
    /// The single index `name` denotes (itself, or an alias with exactly one index).
    fn resolve_one(&self, name: &str) -> Result<String, Response> {
        if self.indices.contains_key(name) {
            return Ok(name.to_string());
        }
        match self.aliases.get(name) {
            Some(set) if set.len() == 1 => Ok(set.iter().next().cloned().unwrap_or_default()),
            Some(_) => Err(error(
                StatusCode::BAD_REQUEST,
                "illegal_argument_exception",
                format!(
                    "no write index is defined for alias [{name}]. The write index may be explicitly disabled using is_write_index=false or the alias points to multiple indices without one being designated as a write index"
                ),
            )),
            None => Err(error(
                StatusCode::NOT_FOUND,
                "index_not_found_exception",
                format!("no such index [{name}]"),
            )),
        }
    }

    /// Every index `name` denotes (for reads: `_count`, `_refresh`, `_delete_by_query`).
    fn resolve_all(&self, name: &str) -> Result<Vec<String>, Response> {
        if self.indices.contains_key(name) {
            return Ok(vec![name.to_string()]);
        }
        match self.aliases.get(name) {
            Some(set) => Ok(set.iter().cloned().collect()),
            None => Err(error(
                StatusCode::NOT_FOUND,
                "index_not_found_exception",
                format!("no such index [{name}]"),
            )),
        }
    }

    fn aliases_of(&self, index: &str) -> Map<String, Value> {
        self.aliases
            .iter()
            .filter(|(_, set)| set.contains(index))
            .map(|(a, _)| (a.clone(), json!({})))
            .collect()
    }

    fn create_index(&mut self, name: &str, body: &Value) -> Response {
        if let Err(why) = valid_index_name(name) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_index_name_exception",
                format!("Invalid index name [{name}], {why}"),
            );
        }
        if self.indices.contains_key(name) {
            return error(
                StatusCode::BAD_REQUEST,
                "resource_already_exists_exception",
                format!("index [{name}] already exists"),
            );
        }
        if self.aliases.contains_key(name) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_index_name_exception",
                format!("Invalid index name [{name}], already exists as alias"),
            );
        }
        let properties = body["mappings"]["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        if let Some(bad) = properties
            .iter()
            .find(|(_, m)| m.get("type").is_none() && m.get("properties").is_none())
        {
            return error(
                StatusCode::BAD_REQUEST,
                "mapper_parsing_exception",
                format!("No type specified for field [{}]", bad.0),
            );
        }
        self.indices.insert(
            name.to_string(),
            Index {
                settings: body.get("settings").cloned().unwrap_or(json!({})),
                properties,
                meta: body["mappings"]["_meta"].clone(),
                docs: HashMap::new(),
            },
        );
        if let Some(aliases) = body["aliases"].as_object() {
            for alias in aliases.keys() {
                self.aliases
                    .entry(alias.clone())
                    .or_default()
                    .insert(name.to_string());
            }
        }
        ok(json!({"acknowledged": true, "shards_acknowledged": true, "index": name}))
    }

    fn apply_aliases(&mut self, body: &Value) -> Response {
        let Some(actions) = body["actions"].as_array() else {
            return error(
                StatusCode::BAD_REQUEST,
                "action_request_validation_exception",
                "Validation Failed: 1: no actions specified;",
            );
        };
        // Validate every action against the state as it would be, then swap it in whole.
        let mut next_aliases = self.aliases.clone();
        let mut removed_indices = Vec::new();
        for action in actions {
            let Some((kind, spec)) = action.as_object().and_then(|o| o.iter().next()) else {
                return error(StatusCode::BAD_REQUEST, "parsing_exception", "empty action");
            };
            let index = spec["index"].as_str().unwrap_or_default().to_string();
            let alias = spec["alias"].as_str().unwrap_or_default().to_string();
            if !self.indices.contains_key(&index) {
                return error(
                    StatusCode::NOT_FOUND,
                    "index_not_found_exception",
                    format!("no such index [{index}]"),
                );
            }
            match kind.as_str() {
                "add" => {
                    if self.indices.contains_key(&alias) {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "invalid_alias_name_exception",
                            format!(
                                "Invalid alias name [{alias}]: an index or data stream exists with the same name as the alias"
                            ),
                        );
                    }
                    next_aliases.entry(alias).or_default().insert(index);
                }
                "remove" => {
                    let removed = next_aliases
                        .get_mut(&alias)
                        .map(|s| s.remove(&index))
                        .unwrap_or(false);
                    if !removed {
                        return error(
                            StatusCode::NOT_FOUND,
                            "aliases_not_found_exception",
                            format!("aliases [{alias}] missing"),
                        );
                    }
                }
                "remove_index" => removed_indices.push(index),
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "parsing_exception",
                        format!("Unknown action [{other}]"),
                    );
                }
            }
        }
        next_aliases.retain(|_, s| !s.is_empty());
        for index in &removed_indices {
            self.indices.remove(index);
            for set in next_aliases.values_mut() {
                set.remove(index);
            }
        }
        next_aliases.retain(|_, s| !s.is_empty());
        self.aliases = next_aliases;
        ok(json!({"acknowledged": true}))
    }

    fn store(&mut self, index: &str, id: &str, doc: Doc) {
        let Some(idx) = self.indices.get_mut(index) else {
            return;
        };
        if let Some(old) = idx.docs.get(id)
            && doc.version < old.version
        {
            self.regressions.push(format!(
                "{index}/{id}: version {} after {}",
                doc.version, old.version
            ));
        }
        idx.docs.insert(id.to_string(), doc);
    }
}

fn mappings_of(i: &Index) -> Value {
    let mut m = json!({"properties": i.properties});
    if !i.meta.is_null() {
        m["_meta"] = i.meta.clone();
    }
    m
}

fn check_mapping(
    properties: &Map<String, Value>,
    source: &Map<String, Value>,
) -> Result<(), String> {
    for (field, value) in source {
        let Some(ty) = properties.get(field).and_then(|m| m["type"].as_str()) else {
            continue;
        };
        if ty == "alias" {
            return Err(format!("Cannot write to a field alias [{field}]."));
        }
        if properties[field]["enabled"] == json!(false) || value.is_null() {
            continue;
        }
        let values: Vec<&Value> = match value {
            Value::Array(a) => a.iter().filter(|v| !v.is_null()).collect(),
            v => vec![v],
        };
        for v in values {
            let fits = match ty {
                "long" | "integer" | "short" | "byte" => {
                    v.as_i64().is_some()
                        || v.as_str().is_some_and(|s| s.trim().parse::<i64>().is_ok())
                }
                "double" | "float" | "scaled_float" => {
                    v.is_number() || v.as_str().is_some_and(|s| s.trim().parse::<f64>().is_ok())
                }
                "boolean" => v.is_boolean() || matches!(v.as_str(), Some("true" | "false" | "")),
                "date" => v.is_string() || v.is_i64(),
                "object" | "nested" | "flattened" | "flat_object" => v.is_object(),
                _ => !v.is_object(),
            };
            if !fits {
                return Err(format!(
                    "failed to parse field [{field}] of type [{ty}] in document. Preview of field's value: '{v}'"
                ));
            }
        }
    }
    Ok(())
}

fn retry_after_429() -> Response {
    let mut r = error(
        StatusCode::TOO_MANY_REQUESTS,
        "es_rejected_execution_exception",
        "rejected execution of coordinating operation",
    );
    r.headers_mut()
        .insert("retry-after", axum::http::HeaderValue::from_static("1"));
    r
}

async fn handle(
    state: Arc<Mutex<State>>,
    method: Method,
    uri: Uri,
    _headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (delay, request_429) = {
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        (st.faults.delay, st.faults.request_429_ratio)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path: Vec<String> = uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let is_bulk = path.last().is_some_and(|p| p == "_bulk");
    if is_bulk && request_429 > 0.0 && rand::thread_rng().gen_bool(request_429.min(1.0)) {
        return retry_after_429();
    }
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let json_body = || -> Result<Value, Response> {
        if body.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_slice(&body).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                "parse_exception",
                format!("request body is not JSON: {e}"),
            )
        })
    };
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    let result: Result<Response, Response> = (|| {
        Ok(match (&method, p.as_slice()) {
            (&Method::GET, []) => ok(json!({
                "name": "walrelay-search-stand-in",
                "version": {"number": "8.13.0", "distribution": "stand-in"},
                "tagline": "You Know, for Search"
            })),
            (&Method::POST | &Method::PUT, ["_bulk"]) => bulk(&mut st, None, &body),
            (&Method::POST | &Method::PUT, [index, "_bulk"]) => bulk(&mut st, Some(index), &body),
            (&Method::POST, ["_aliases"]) => st.apply_aliases(&json_body()?),
            (&Method::GET, ["_alias"]) => ok(all_aliases(&st, None)),
            (&Method::GET, ["_alias", name]) => {
                let v = all_aliases(&st, Some(name));
                if v.as_object().is_some_and(|o| o.is_empty()) {
                    error(
                        StatusCode::NOT_FOUND,
                        "aliases_not_found_exception",
                        format!("alias [{name}] missing"),
                    )
                } else {
                    ok(v)
                }
            }
            (&Method::PUT, [index]) => st.create_index(index, &json_body()?),
            (&Method::DELETE, [index]) => {
                let targets = st.resolve_all(index)?;
                for t in &targets {
                    st.indices.remove(t);
                    for set in st.aliases.values_mut() {
                        set.remove(t);
                    }
                }
                st.aliases.retain(|_, s| !s.is_empty());
                ok(json!({"acknowledged": true}))
            }
            (&Method::GET | &Method::HEAD, [index]) => {
                let targets = st.resolve_all(index)?;
                let mut out = Map::new();
                for t in targets {
                    let i = &st.indices[&t];
                    out.insert(
                        t.clone(),
                        json!({"aliases": st.aliases_of(&t), "mappings": mappings_of(i), "settings": {"index": i.settings.get("index").cloned().unwrap_or(i.settings.clone())}}),
                    );
                }
                ok(Value::Object(out))
            }
            (&Method::PUT, [index, "_mapping"]) => {
                let t = st.resolve_one(index)?;
                let body = json_body()?;
                if let Some(i) = st.indices.get_mut(&t)
                    && !body["_meta"].is_null()
                {
                    i.meta = body["_meta"].clone();
                }
                if let (Some(i), Some(props)) =
                    (st.indices.get_mut(&t), body["properties"].as_object())
                {
                    for (k, v) in props {
                        // A field alias must point at a concrete field (ES checks the same).
                        if v["type"] == "alias" {
                            let path = v["path"].as_str().unwrap_or_default();
                            let target = props.get(path).or(i.properties.get(path));
                            if target.is_none_or(|m| m["type"] == "alias") {
                                return Err(error(
                                    StatusCode::BAD_REQUEST,
                                    "mapper_parsing_exception",
                                    format!(
                                        "Invalid [path] value [{path}] for field alias [{k}]: an alias must refer to an existing field in the mappings."
                                    ),
                                ));
                            }
                        }
                        if let Some(old) = i.properties.get(k)
                            && old["type"] != v["type"]
                        {
                            return Err(error(
                                StatusCode::BAD_REQUEST,
                                "illegal_argument_exception",
                                format!(
                                    "mapper [{k}] cannot be changed from type [{}] to [{}]",
                                    old["type"], v["type"]
                                ),
                            ));
                        }
                        i.properties.insert(k.clone(), v.clone());
                    }
                }
                ok(json!({"acknowledged": true}))
            }
            (&Method::POST | &Method::GET, [index, "_refresh"]) => {
                let n = st.resolve_all(index)?.len();
                ok(json!({"_shards": {"total": n, "successful": n, "failed": 0}}))
            }
            (&Method::GET | &Method::POST, [index, "_count"]) => {
                let count: usize = st
                    .resolve_all(index)?
                    .iter()
                    .map(|t| {
                        st.indices[t]
                            .docs
                            .values()
                            .filter(|d| d.source.is_some())
                            .count()
                    })
                    .sum();
                ok(json!({"count": count}))
            }
            (&Method::POST, [index, "_delete_by_query"]) => {
                let body = json_body()?;
                let targets = st.resolve_all(index)?;
                let query = &body["query"];
                if query_matches(query, &Map::new()).is_none() {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "parsing_exception",
                        "the stand-in supports match_all, range (lt), term, exists and bool (filter, should, must_not) queries only",
                    ));
                }
                let mut deleted = 0;
                for t in targets {
                    let ids: Vec<(String, i64)> = st.indices[&t]
                        .docs
                        .iter()
                        .filter(|(_, d)| {
                            let Some(src) = &d.source else { return false };
                            query_matches(query, src) == Some(true)
                        })
                        .map(|(id, d)| (id.clone(), d.version))
                        .collect();
                    deleted += ids.len();
                    for (id, version) in ids {
                        // Deletes by query use internal versioning: the version goes up by one.
                        st.store(
                            &t,
                            &id,
                            Doc {
                                version: version + 1,
                                source: None,
                            },
                        );
                    }
                }
                ok(json!({"deleted": deleted, "failures": [], "version_conflicts": 0}))
            }
            (&Method::GET, [index, "_doc", id]) => {
                let t = st.resolve_one(index)?;
                match st.indices[&t].docs.get(*id) {
                    Some(Doc {
                        version,
                        source: Some(src),
                    }) => ok(json!({
                        "_index": t, "_id": id, "_version": version, "found": true, "_source": src
                    })),
                    _ => (
                        StatusCode::NOT_FOUND,
                        axum::Json(json!({"_index": t, "_id": id, "found": false})),
                    )
                        .into_response(),
                }
            }
            (&Method::PUT | &Method::POST, [index, "_doc", id]) => {
                if !st.indices.contains_key(*index) && !st.aliases.contains_key(*index) {
                    st.create_index(index, &json!({}));
                }
                let t = st.resolve_one(index)?;
                let body = json_body()?;
                let Some(src) = body.as_object().cloned() else {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "mapper_parsing_exception",
                        "not an object",
                    ));
                };
                let version = st.indices[&t].docs.get(*id).map_or(0, |d| d.version) + 1;
                st.store(
                    &t,
                    id,
                    Doc {
                        version,
                        source: Some(src),
                    },
                );
                ok(
                    json!({"_index": t, "_id": id, "_version": version, "result": if version == 1 { "created" } else { "updated" }}),
                )
            }
            _ => error(
                StatusCode::BAD_REQUEST,
                "illegal_argument_exception",
                format!("the stand-in does not implement {method} {}", uri.path()),
            ),
        })
    })();
    result.unwrap_or_else(|e| e)
}

fn all_aliases(st: &State, only: Option<&str>) -> Value {
    let mut out = Map::new();
    for (alias, set) in &st.aliases {
        if only.is_some_and(|o| o != alias) {
            continue;
        }
        for index in set {
            let entry = out
                .entry(index.clone())
                .or_insert_with(|| json!({"aliases": {}}));
            entry["aliases"][alias] = json!({});
        }
    }
    Value::Object(out)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn item(action: &str, index: &str, id: &str, status: u16, extra: Value) -> Value {
    let mut body = json!({"_index": index, "_id": id, "status": status});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    json!({ action: body })
}

fn item_error(
    action: &str,
    index: &str,
    id: &str,
    status: u16,
    kind: &str,
    reason: String,
) -> Value {
    item(
        action,
        index,
        id,
        status,
        json!({"error": {"type": kind, "reason": reason, "index": index}}),
    )
}

fn bulk(st: &mut State, path_index: Option<&str>, body: &[u8]) -> Response {
    let mut lines = body.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let mut items = Vec::new();
    let mut errors = false;
    let (item_error_ratio, discard) = (st.faults.item_error_ratio, st.faults.discard);
    if discard {
        return discard_bulk(st, body);
    }
    let mut rng = rand::thread_rng();
    while let Some(line) = lines.next() {
        let action: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "x_content_parse_exception",
                    format!("malformed action line: {e}"),
                );
            }
        };
        let Some((kind, meta)) = action.as_object().and_then(|o| o.iter().next()) else {
            return error(
                StatusCode::BAD_REQUEST,
                "illegal_argument_exception",
                "empty action line",
            );
        };
        let kind = kind.clone();
        let source: Option<Value> = if kind == "delete" {
            None
        } else {
            match lines.next() {
                Some(l) if discard => {
                    let _ = l;
                    Some(Value::Null)
                }
                Some(l) => match serde_json::from_slice(l) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "x_content_parse_exception",
                            format!("malformed source line: {e}"),
                        );
                    }
                },
                None => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "illegal_argument_exception",
                        "The bulk request must be terminated by a newline [\\n]",
                    );
                }
            }
        };
        st.bulk_items += 1;
        let name = meta["_index"]
            .as_str()
            .or(path_index)
            .unwrap_or_default()
            .to_string();
        let id = meta["_id"].as_str().unwrap_or_default().to_string();
        if discard {
            items.push(item(
                &kind,
                &name,
                &id,
                201,
                json!({"result": "created", "_version": 1}),
            ));
            continue;
        }
        if item_error_ratio > 0.0 && rng.gen_bool(item_error_ratio.min(1.0)) {
            st.injected_errors += 1;
            errors = true;
            items.push(if rng.gen_bool(0.5) {
                item_error(
                    &kind,
                    &name,
                    &id,
                    429,
                    "es_rejected_execution_exception",
                    "rejected execution of bulk shard operation".into(),
                )
            } else {
                item_error(
                    &kind,
                    &name,
                    &id,
                    500,
                    "internal_server_error",
                    "injected failure".into(),
                )
            });
            continue;
        }
        if !st.indices.contains_key(&name) && !st.aliases.contains_key(&name) {
            // action.auto_create_index: a write to a missing index creates it.
            st.create_index(&name, &json!({}));
        }
        let Ok(index) = st.resolve_one(&name) else {
            {
                errors = true;
                items.push(item_error(
                    &kind,
                    &name,
                    &id,
                    400,
                    "illegal_argument_exception",
                    format!("no write index is defined for alias [{name}]"),
                ));
                continue;
            }
        };
        let external = matches!(
            meta["version_type"].as_str(),
            Some("external" | "external_gte")
        );
        let gte = meta["version_type"].as_str() == Some("external_gte");
        let version = meta["version"].as_i64();
        let current = st.indices[&index].docs.get(&id).cloned();
        if id.is_empty() && kind != "index" && kind != "create" {
            errors = true;
            items.push(item_error(
                &kind,
                &index,
                &id,
                400,
                "action_request_validation_exception",
                "Validation Failed: 1: id is missing;".into(),
            ));
            continue;
        }
        if external && version.is_none_or(|v| v < 0) {
            errors = true;
            items.push(item_error(
                &kind,
                &index,
                &id,
                400,
                "action_request_validation_exception",
                "Validation Failed: 1: illegal version value [-1] for version type [EXTERNAL];"
                    .into(),
            ));
            continue;
        }
        if kind != "update" && !external {
            st.unversioned_writes += 1;
        }
        let conflict = |cur: &Option<Doc>, v: i64| -> Option<i64> {
            let c = cur.as_ref()?.version;
            let stale = if gte { v < c } else { v <= c };
            stale.then_some(c)
        };
        match kind.as_str() {
            "index" | "create" => {
                let Some(Value::Object(src)) = source else {
                    errors = true;
                    items.push(item_error(
                        &kind,
                        &index,
                        &id,
                        400,
                        "mapper_parsing_exception",
                        "failed to parse, document is empty".into(),
                    ));
                    continue;
                };
                if kind == "create" && current.as_ref().is_some_and(|d| d.source.is_some()) {
                    errors = true;
                    items.push(item_error(
                        &kind,
                        &index,
                        &id,
                        409,
                        "version_conflict_engine_exception",
                        format!("[{id}]: version conflict, document already exists"),
                    ));
                    continue;
                }
                if external && let Some(c) = conflict(&current, version.unwrap_or(0)) {
                    errors = true;
                    items.push(item_error(&kind, &index, &id, 409, "version_conflict_engine_exception", format!("[{id}]: version conflict, current version [{c}] is higher or equal to the one provided [{}]", version.unwrap_or(0))));
                    continue;
                }
                if let Err(reason) = check_mapping(&st.indices[&index].properties, &src) {
                    errors = true;
                    items.push(item_error(
                        &kind,
                        &index,
                        &id,
                        400,
                        "document_parsing_exception",
                        reason,
                    ));
                    continue;
                }
                let v = if external {
                    version.unwrap_or(0)
                } else {
                    current.as_ref().map_or(0, |d| d.version) + 1
                };
                let created = current.as_ref().is_none_or(|d| d.source.is_none());
                st.store(
                    &index,
                    &id,
                    Doc {
                        version: v,
                        source: Some(src),
                    },
                );
                items.push(item(
                    &kind,
                    &index,
                    &id,
                    if created { 201 } else { 200 },
                    json!({"_version": v, "result": if created { "created" } else { "updated" }}),
                ));
            }
            "update" => {
                if external {
                    errors = true;
                    items.push(item_error(&kind, &index, &id, 400, "action_request_validation_exception", "Validation Failed: 1: version type [EXTERNAL] is not supported by the update API;".into()));
                    continue;
                }
                let Some(mut stored) = current.and_then(|d| d.source.map(|s| (d.version, s)))
                else {
                    errors = true;
                    items.push(item_error(
                        &kind,
                        &index,
                        &id,
                        404,
                        "document_missing_exception",
                        format!("[{id}]: document missing"),
                    ));
                    continue;
                };
                if let Some(Value::Object(doc)) =
                    source.as_ref().and_then(|s| s.get("doc")).cloned()
                {
                    stored.1.extend(doc);
                }
                st.store(
                    &index,
                    &id,
                    Doc {
                        version: stored.0 + 1,
                        source: Some(stored.1),
                    },
                );
                items.push(item(
                    &kind,
                    &index,
                    &id,
                    200,
                    json!({"_version": stored.0 + 1, "result": "updated"}),
                ));
            }
            "delete" => {
                if external && let Some(c) = conflict(&current, version.unwrap_or(0)) {
                    errors = true;
                    items.push(item_error(&kind, &index, &id, 409, "version_conflict_engine_exception", format!("[{id}]: version conflict, current version [{c}] is higher or equal to the one provided [{}]", version.unwrap_or(0))));
                    continue;
                }
                let found = current.as_ref().is_some_and(|d| d.source.is_some());
                let v = if external {
                    version.unwrap_or(0)
                } else {
                    current.as_ref().map_or(0, |d| d.version) + 1
                };
                st.store(
                    &index,
                    &id,
                    Doc {
                        version: v,
                        source: None,
                    },
                );
                items.push(item(
                    &kind,
                    &index,
                    &id,
                    if found { 200 } else { 404 },
                    json!({"_version": v, "result": if found { "deleted" } else { "not_found" }}),
                ));
            }
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "illegal_argument_exception",
                    format!(
                        "Malformed action/metadata line, expected one of [create, delete, index, update] but found [{other}]"
                    ),
                );
            }
        }
    }
    ok(json!({"took": 1, "errors": errors, "items": items}))
}

/// Acknowledges a bulk request without storing it: the action of each line is read from its
/// first key, source lines are skipped unparsed, and the answer is written directly.
fn discard_bulk(st: &mut State, body: &[u8]) -> Response {
    let mut out = Vec::with_capacity(body.len() / 8);
    out.extend_from_slice(b"{\"took\":0,\"errors\":false,\"items\":[");
    let mut lines = body.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let mut n = 0u64;
    while let Some(line) = lines.next() {
        let kind: &[u8] = if line.starts_with(b"{\"delete\"") {
            b"delete"
        } else if line.starts_with(b"{\"index\"") {
            b"index"
        } else if line.starts_with(b"{\"create\"") {
            b"create"
        } else if line.starts_with(b"{\"update\"") {
            b"update"
        } else {
            return error(
                StatusCode::BAD_REQUEST,
                "illegal_argument_exception",
                "Malformed action/metadata line",
            );
        };
        if kind != b"delete" && lines.next().is_none() {
            return error(
                StatusCode::BAD_REQUEST,
                "illegal_argument_exception",
                "The bulk request must be terminated by a newline [\\n]",
            );
        }
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"");
        out.extend_from_slice(kind);
        out.extend_from_slice(b"\":{\"status\":201,\"result\":\"created\",\"_version\":1}}");
        n += 1;
    }
    out.extend_from_slice(b"]}");
    st.bulk_items += n;
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        out,
    )
        .into_response()
}

/// Whether document source `src` matches `query`, for the queries the sink sends to
/// `_delete_by_query` (`match_all`, `range` with `lt`, `term` and `exists` on integer fields,
/// `bool` with `filter`, `should` and `must_not`); `None` for a query the stand-in does not
/// support.
pub fn query_matches(query: &Value, src: &Map<String, Value>) -> Option<bool> {
    let (kind, body) = query.as_object()?.iter().next()?;
    let field = |body: &Value| -> Option<(Option<i64>, Value)> {
        let (name, arg) = body.as_object()?.iter().next()?;
        Some((src.get(name).and_then(Value::as_i64), arg.clone()))
    };
    match kind.as_str() {
        "match_all" => Some(true),
        "range" => {
            let (v, bounds) = field(body)?;
            let lt = bounds.get("lt")?.as_i64()?;
            Some(v.is_some_and(|v| v < lt))
        }
        "term" => {
            let (v, want) = field(body)?;
            Some(v.is_some() && v == want.as_i64())
        }
        "exists" => {
            let name = body.get("field")?.as_str()?;
            Some(src.get(name).is_some_and(|v| !v.is_null()))
        }
        "bool" => {
            let all = |key: &str| -> Option<Vec<bool>> {
                body.get(key).map_or(Some(Vec::new()), |qs| {
                    qs.as_array()?
                        .iter()
                        .map(|q| query_matches(q, src))
                        .collect()
                })
            };
            let filter = all("filter")?;
            let should = all("should")?;
            let must_not = all("must_not")?;
            Some(
                filter.iter().all(|m| *m)
                    && !must_not.iter().any(|m| *m)
                    && (should.is_empty() || should.iter().any(|m| *m)),
            )
        }
        _ => None,
    }
}
