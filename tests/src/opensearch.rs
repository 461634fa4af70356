//! A real OpenSearch node for tests, started from the Maven Central artifacts by
//! `tests/services/opensearch/opensearch.sh`, and [`Indexes`], a view of its indexes under one
//! test's prefix.
//!
//! [`OpenSearch::shared`] is one node per test binary, started on first use; each test names
//! its indexes under a prefix of its own (`--index-template '<prefix>.{schema}.{table}'`), so
//! tests share the node without seeing each other. A watchdog process kills the node and
//! removes its data once the test binary has exited (statics are never dropped).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

/// The launcher script in this repository.
pub fn launcher() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("services/opensearch/opensearch.sh")
}

/// A running node; killed on drop.
pub struct OpenSearch {
    dir: tempfile::TempDir,
    port: u16,
    child: Mutex<Option<Child>>,
    _watchdog: Child,
}

impl OpenSearch {
    /// The node shared by every test of this binary.
    pub fn shared() -> Arc<OpenSearch> {
        static SHARED: OnceLock<Arc<OpenSearch>> = OnceLock::new();
        Arc::clone(SHARED.get_or_init(|| Arc::new(OpenSearch::start())))
    }

    /// Starts a node on a free loopback port and waits until it answers (at most 3 minutes).
    pub fn start() -> Self {
        let out = Command::new("bash")
            .arg(launcher())
            .arg("install")
            .stdin(Stdio::null())
            .output()
            .expect("run opensearch.sh install");
        assert!(
            out.status.success(),
            "opensearch.sh install failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = tempfile::Builder::new()
            .prefix("walrelay-opensearch-")
            .tempdir()
            .expect("temp dir");
        let port = crate::free_port();
        let log = std::fs::File::create(dir.path().join("node.log")).expect("node log");
        let child = Command::new("bash")
            .arg(launcher())
            .arg("run")
            .arg("--dir")
            .arg(dir.path().join("node"))
            .args(["--http-port", &port.to_string()])
            .args(["--transport-port", &crate::free_port().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("node log"))
            .stderr(log)
            .spawn()
            .expect("start OpenSearch");
        let watchdog = crate::process::watchdog(&format!(
            "kill -9 {pid} 2>/dev/null; rm -rf '{dir}'",
            pid = child.id(),
            dir = dir.path().display()
        ))
        .expect("start the OpenSearch watchdog");
        let node = Self {
            dir,
            port,
            child: Mutex::new(Some(child)),
            _watchdog: watchdog,
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(status) = node.health_status()
                && (status == "green" || status == "yellow")
            {
                return node;
            }
            let exited = node
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!("OpenSearch exited ({status}):\n{}", node.log_tail(60));
            }
            assert!(
                Instant::now() < deadline,
                "OpenSearch did not answer within 180 s:\n{}",
                node.log_tail(60)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The cluster's health status, by a plain HTTP/1.0 request (no runtime needed).
    fn health_status(&self) -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /_cluster/health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let body = buf.split("\r\n\r\n").nth(1)?;
        let v: Value = serde_json::from_str(body).ok()?;
        v["status"].as_str().map(str::to_string)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The last `lines` lines of the node's output.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for OpenSearch {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The indexes and aliases of one test, all named `<prefix>.<name>`, on any server that speaks
/// the Elasticsearch/OpenSearch API. Names given to and returned by its methods are without
/// the prefix.
#[derive(Clone)]
pub struct Indexes {
    url: String,
    prefix: String,
    http: reqwest::Client,
}

impl Indexes {
    /// A view of `url` under a new unique prefix.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            prefix: crate::unique("t").to_lowercase(),
            http: reqwest::Client::new(),
        }
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The `--index-template` that puts a table's alias under this prefix.
    pub fn template(&self) -> String {
        format!("{}.{{schema}}.{{table}}", self.prefix)
    }

    /// The full name of `name` on the server.
    pub fn full(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let resp = self
            .http
            .get(format!("{}/{path}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return None;
        }
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        Some(resp.json().await.expect("JSON answer"))
    }

    async fn search_request(&self, full: &str, body: Value) -> Value {
        self.http
            .post(format!("{}/{full}/_search", self.url))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("search {full}: {e}"))
            .json()
            .await
            .expect("search answer")
    }

    /// Live documents of an index or of the one index an alias points at, by id (read in pages
    /// of 10 000 through a scroll, so any number).
    pub async fn documents(&self, name: &str) -> BTreeMap<String, Value> {
        let full = self.full(name);
        let refresh = self
            .http
            .post(format!("{}/{full}/_refresh", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("refresh {full}: {e}"));
        if refresh.status() == reqwest::StatusCode::NOT_FOUND {
            return BTreeMap::new();
        }
        let post = |path: String, body: Value| async move {
            self.http
                .post(format!("{}/{path}", self.url))
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("POST {path}: {e}"))
                .json::<Value>()
                .await
                .expect("search answer")
        };
        let mut page = post(
            format!("{full}/_search?scroll=1m"),
            json!({"size": 10000, "sort": ["_doc"], "query": {"match_all": {}}}),
        )
        .await;
        let mut docs = BTreeMap::new();
        loop {
            let hits = page["hits"]["hits"].as_array().cloned().unwrap_or_default();
            if hits.is_empty() {
                break;
            }
            for h in hits {
                if let Some(id) = h["_id"].as_str() {
                    docs.insert(id.to_string(), h["_source"].clone());
                }
            }
            let Some(scroll) = page["_scroll_id"].as_str().map(str::to_string) else {
                break;
            };
            page = post(
                "_search/scroll".into(),
                json!({"scroll": "1m", "scroll_id": scroll}),
            )
            .await;
        }
        if let Some(scroll) = page["_scroll_id"].as_str() {
            let _ = self
                .http
                .delete(format!("{}/_search/scroll", self.url))
                .json(&json!({ "scroll_id": scroll }))
                .send()
                .await;
        }
        docs
    }

    /// How many documents an index or alias holds (after a refresh); 0 while it does not
    /// exist or its shard is not yet allocated (a 503 right after the index was created).
    pub async fn count(&self, name: &str) -> u64 {
        let full = self.full(name);
        let _ = self
            .http
            .post(format!("{}/{full}/_refresh", self.url))
            .send()
            .await;
        let Ok(resp) = self
            .http
            .get(format!("{}/{full}/_count", self.url))
            .send()
            .await
        else {
            return 0;
        };
        if !resp.status().is_success() {
            return 0;
        }
        resp.json::<Value>()
            .await
            .ok()
            .and_then(|v| v["count"].as_u64())
            .unwrap_or(0)
    }

    /// Hits of a query-string search, as `_source`s.
    pub async fn search(&self, name: &str, query: &str) -> Vec<Value> {
        let full = self.full(name);
        let resp = self
            .search_request(
                &full,
                json!({"size": 100, "query": {"query_string": {"query": query}}}),
            )
            .await;
        resp["hits"]["hits"]
            .as_array()
            .map(|h| h.iter().map(|h| h["_source"].clone()).collect())
            .unwrap_or_default()
    }

    /// Names of this test's indexes.
    pub async fn indices(&self) -> Vec<String> {
        let all = self
            .get(&format!(
                "_cat/indices/{}.*?format=json&h=index",
                self.prefix
            ))
            .await
            .unwrap_or(Value::Null);
        let mut out: Vec<String> = all
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["index"].as_str())
                    .filter_map(|i| i.strip_prefix(&format!("{}.", self.prefix)))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// The indexes an alias points at.
    pub async fn alias_targets(&self, alias: &str) -> Vec<String> {
        let full = self.full(alias);
        let Some(v) = self.get(&format!("_alias/{full}")).await else {
            return Vec::new();
        };
        let mut out: Vec<String> = v
            .as_object()
            .map(|o| {
                o.keys()
                    .filter_map(|i| i.strip_prefix(&format!("{}.", self.prefix)))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    async fn mapping(&self, name: &str) -> Value {
        let full = self.full(name);
        self.get(&format!("{full}/_mapping"))
            .await
            .and_then(|v| {
                v.as_object()
                    .and_then(|o| o.values().next().cloned())
                    .map(|m| m["mappings"].clone())
            })
            .unwrap_or(Value::Null)
    }

    /// The mapping's `_meta` of an index or alias (null when unset).
    pub async fn meta(&self, name: &str) -> Value {
        self.mapping(name).await["_meta"].clone()
    }

    /// The stored (external) version of a live document of an index or alias; `None` when the
    /// document or the index does not exist.
    pub async fn version(&self, name: &str, id: &str) -> Option<i64> {
        let doc = self.get(&format!("{}/_doc/{id}", self.full(name))).await?;
        doc["_version"].as_i64()
    }

    /// The mapped properties of an index or alias.
    pub async fn properties(&self, name: &str) -> Map<String, Value> {
        self.mapping(name).await["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default()
    }
}
