//! A client of a Confluent-compatible schema registry (Confluent Schema Registry, Apicurio's
//! `ccompat` API, Redpanda, Karapace): register a schema under a subject, look one up by id.
//!
//! ```text
//!   producer: new schema version of a table ──register(subject, schema)──▶ id (cached per text)
//!   consumer: record ──magic 0, id──▶ schema(id) (cached per id) ──▶ decode
//! ```
//!
//! Both halves cache: a schema text registered once is not registered again by this process,
//! and an id is fetched once. The hot path (one event) never calls the registry: the producer
//! registers when a table's shape changes, the consumer fetches when it meets an id it has not
//! seen.
//!
//! Failures are classified once here ([`RegistryError::is_transient`]): an unreachable
//! registry, a timeout, a 5xx or a 429 are transient (the caller retries with the shared
//! [`crate::retry::Backoff`], reading pauses, nothing is confirmed); an incompatible schema
//! (409), an invalid one (422), refused credentials (401/403) and an unknown id (404) are
//! definite. Credentials travel in the `Authorization` header only, and never appear in an
//! error or a log line.
//!
//! The Confluent wire format of a record: byte 0 is `0`, bytes 1..5 the schema id (big-endian),
//! then the Avro binary body ([`frame`], [`unframe`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sync::lock;

/// How to reach and authenticate to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryOptions {
    /// Base URL (`http://host:8081`, or Apicurio's `http://host:8080/apis/ccompat/v7`).
    pub url: String,
    /// Credentials, if the registry wants them.
    pub auth: RegistryAuth,
    /// A PEM file of CA certificates to trust for an `https` URL (beside the system's).
    pub ca_file: Option<PathBuf>,
    /// Timeout of one request.
    pub timeout: Duration,
}

impl RegistryOptions {
    /// The options of the `--schema-registry-*` flags, checked (credentials given in pairs, the
    /// URL parsed, the CA file read), or `None` without a URL. Errors name the flag.
    pub fn from_flags(
        url: Option<String>,
        username: Option<String>,
        password: Option<String>,
        token: Option<String>,
        ca_file: Option<PathBuf>,
    ) -> Result<Option<Self>, crate::options::ConfigError> {
        use crate::options::ConfigError;
        let Some(url) = url else {
            if username.is_some() || password.is_some() || token.is_some() || ca_file.is_some() {
                return Err(ConfigError::new(
                    "--schema-registry-url",
                    "the registry's credentials and CA file need its URL",
                ));
            }
            return Ok(None);
        };
        let auth = match (username, password, token) {
            (None, None, None) => RegistryAuth::None,
            (Some(username), Some(password), None) => RegistryAuth::Basic { username, password },
            (None, None, Some(token)) => RegistryAuth::Bearer(token),
            (Some(_), Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "--schema-registry-token",
                    "give either a token or a username and password, not both",
                ));
            }
            _ => {
                return Err(ConfigError::new(
                    "--schema-registry-username",
                    "give both --schema-registry-username and --schema-registry-password",
                ));
            }
        };
        let options = Self {
            url,
            auth,
            ca_file,
            timeout: Duration::from_secs(10),
        };
        Registry::new(&options)
            .map_err(|e| ConfigError::new("--schema-registry-url", e.to_string()))?;
        Ok(Some(options))
    }
}

/// Registry credentials. `Debug` never prints a secret.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum RegistryAuth {
    /// None.
    #[default]
    None,
    /// HTTP basic (Confluent Cloud's API key and secret).
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// `Authorization: Bearer <token>`.
    Bearer(String),
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryAuth::None => f.write_str("None"),
            RegistryAuth::Basic { username, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: <redacted> }}"
                )
            }
            RegistryAuth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// Why a registry call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// Not reachable, timed out, or answered 5xx/429: retry.
    #[error("the schema registry is unavailable: {0}")]
    Unavailable(String),
    /// 409: the subject's compatibility rule refuses the schema.
    #[error(
        "the schema registry refused a new version of subject {subject} as incompatible with its earlier versions ({message}); the table's change needs a compatibility level that allows it (e.g. set the subject's compatibility to NONE), or a new topic"
    )]
    Incompatible {
        /// The subject.
        subject: String,
        /// The registry's message.
        message: String,
    },
    /// 422 and other 4xx: the registry refuses the request as such.
    #[error("the schema registry refused {what}: HTTP {status}: {message}")]
    Refused {
        /// What was asked (`registering subject …`, `schema id …`).
        what: String,
        /// The HTTP status.
        status: u16,
        /// The registry's message.
        message: String,
    },
    /// 401/403.
    #[error(
        "the schema registry refused the credentials (HTTP {0}): check --schema-registry-username/--schema-registry-password or the bearer token"
    )]
    Unauthorized(u16),
    /// 404 on an id.
    #[error("the schema registry has no schema with id {0}")]
    UnknownId(u32),
    /// The options cannot make a client (bad URL, unreadable CA file).
    #[error("{0}")]
    Config(String),
    /// An answer that is not what the API documents.
    #[error("the schema registry answered something unexpected: {0}")]
    Protocol(String),
}

impl RegistryError {
    /// Whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unavailable(_))
    }
}

/// A registry client with its caches. Cheap to share (`Arc`).
pub struct Registry {
    http: reqwest::Client,
    base: String,
    auth: RegistryAuth,
    /// (subject, schema text) → id.
    registered: Mutex<HashMap<(String, String), u32>>,
    /// id → schema text.
    schemas: Mutex<HashMap<u32, Arc<str>>>,
    /// Registrations of this process go one at a time (they are rare: a new table shape), so
    /// two snapshot workers never race each other to create a subject.
    registering: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("base", &self.base)
            .finish()
    }
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl Registry {
    /// A client; checks the URL and reads the CA file (definite errors).
    pub fn new(options: &RegistryOptions) -> Result<Self, RegistryError> {
        let url = reqwest::Url::parse(&options.url).map_err(|e| {
            RegistryError::Config(format!(
                "--schema-registry-url: not a URL ({e}); expected e.g. http://127.0.0.1:8081"
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(RegistryError::Config(
                "--schema-registry-url: the scheme must be http or https".into(),
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(RegistryError::Config(
                "--schema-registry-url: credentials in the URL would reach logs; give them as --schema-registry-username/--schema-registry-password (or a bearer token) instead".into(),
            ));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(5)));
        if let Some(path) = &options.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                RegistryError::Config(format!("--schema-registry-ca-file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                RegistryError::Config(format!(
                    "--schema-registry-ca-file {}: not PEM certificates ({e})",
                    path.display()
                ))
            })?;
            if certs.is_empty() {
                return Err(RegistryError::Config(format!(
                    "--schema-registry-ca-file {}: holds no certificate",
                    path.display()
                )));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| RegistryError::Config(format!("schema registry client: {e}")))?;
        Ok(Self {
            http,
            base: options.url.trim_end_matches('/').to_string(),
            auth: options.auth.clone(),
            registered: Mutex::new(HashMap::new()),
            schemas: Mutex::new(HashMap::new()),
            registering: tokio::sync::Mutex::new(()),
        })
    }

    /// Sends `req` (authorized, JSON accepted): the status and body, or `Unavailable` when no
    /// answer came. `what` names the request in errors.
    async fn call(
        &self,
        req: reqwest::RequestBuilder,
        what: &(dyn Fn() -> String + Sync),
    ) -> Result<(u16, String), RegistryError> {
        let unavailable =
            |e: reqwest::Error| RegistryError::Unavailable(format!("{}: {}", what(), plain(&e)));
        let resp = self
            .authorize(req)
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .send()
            .await
            .map_err(unavailable)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(unavailable)?;
        Ok((status, text))
    }

    /// A POST of `{"schema": schema}` to `url`.
    async fn post_schema(
        &self,
        url: &str,
        schema: &str,
        what: &(dyn Fn() -> String + Sync),
    ) -> Result<(u16, String), RegistryError> {
        let req = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(serde_json::json!({ "schema": schema }).to_string());
        self.call(req, what).await
    }

    fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            RegistryAuth::None => req,
            RegistryAuth::Basic { username, password } => req.basic_auth(username, Some(password)),
            RegistryAuth::Bearer(token) => req.bearer_auth(token),
        }
    }

    /// The id of `schema` under `subject`, registering it (a new version) when the registry
    /// does not hold it yet. Cached: the same text under the same subject asks once.
    ///
    /// A 409 is an incompatible schema, but it is also how Apicurio answers a first
    /// registration that raced another process's (`An artifact … already exists`), or a retry
    /// whose first attempt went through behind a 5xx. So a 409 is looked up (the subject may
    /// hold the schema now) and tried again a few times over about two seconds; only a schema
    /// the subject still refuses is [`RegistryError::Incompatible`].
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let key = (subject.to_string(), schema.to_string());
        if let Some(id) = lock(&self.registered).get(&key) {
            return Ok(*id);
        }
        let _one_at_a_time = self.registering.lock().await;
        if let Some(id) = lock(&self.registered).get(&key) {
            return Ok(*id);
        }
        let mut attempt = 0u64;
        let id = loop {
            match self.post_version(subject, schema).await? {
                Ok(id) => break id,
                Err(message) => {
                    if let Some(id) = self.lookup(subject, schema).await? {
                        break id;
                    }
                    attempt += 1;
                    if attempt > 4 {
                        return Err(RegistryError::Incompatible {
                            subject: subject.to_string(),
                            message,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        };
        lock(&self.registered).insert(key, id);
        lock(&self.schemas)
            .entry(id)
            .or_insert_with(|| Arc::from(schema));
        Ok(id)
    }

    /// `POST /subjects/{subject}/versions`: the id, or the registry's message of a 409.
    async fn post_version(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<Result<u32, String>, RegistryError> {
        let url = format!("{}/subjects/{}/versions", self.base, encode_path(subject));
        let what = || format!("registering a schema under subject {subject}");
        let (status, text) = self.post_schema(&url, schema, &what).await?;
        if status == 409 {
            return Ok(Err(message_of(&text)));
        }
        check_status(status, &text, &what)?;
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64))
            .and_then(|id| u32::try_from(id).ok())
            .map(Ok)
            .ok_or_else(|| {
                RegistryError::Protocol(format!("{}: no id in {}", what(), truncate(&text)))
            })
    }

    /// The id of `schema` if `subject` holds it (`POST /subjects/{subject}`), else `None`.
    pub async fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>, RegistryError> {
        let url = format!("{}/subjects/{}", self.base, encode_path(subject));
        let what = || format!("looking up a schema under subject {subject}");
        let (status, text) = self.post_schema(&url, schema, &what).await?;
        if status == 404 {
            return Ok(None);
        }
        check_status(status, &text, &what)?;
        Ok(serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64))
            .and_then(|id| u32::try_from(id).ok()))
    }

    /// The schema text of `id` if it is cached.
    pub fn cached(&self, id: u32) -> Option<Arc<str>> {
        lock(&self.schemas).get(&id).cloned()
    }

    /// The schema text of `id` (`GET /schemas/ids/{id}`), fetched once.
    pub async fn schema(&self, id: u32) -> Result<Arc<str>, RegistryError> {
        if let Some(s) = self.cached(id) {
            return Ok(s);
        }
        let url = format!("{}/schemas/ids/{id}", self.base);
        let what = || format!("schema id {id}");
        let (status, text) = self.call(self.http.get(&url), &what).await?;
        if status == 404 {
            return Err(RegistryError::UnknownId(id));
        }
        check_status(status, &text, &what)?;
        let schema = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                v.get("schema")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string)
            })
            .ok_or_else(|| {
                RegistryError::Protocol(format!("{}: no schema in {}", what(), truncate(&text)))
            })?;
        let schema: Arc<str> = Arc::from(schema);
        lock(&self.schemas).insert(id, Arc::clone(&schema));
        Ok(schema)
    }
}

fn check_status(
    status: u16,
    text: &str,
    what: &(dyn Fn() -> String + Sync),
) -> Result<(), RegistryError> {
    match status {
        200..=299 => Ok(()),
        401 | 403 => Err(RegistryError::Unauthorized(status)),
        408 | 429 | 500..=599 => Err(RegistryError::Unavailable(format!(
            "{}: HTTP {status}: {}",
            what(),
            message_of(text)
        ))),
        _ => Err(RegistryError::Refused {
            what: what(),
            status,
            message: message_of(text),
        }),
    }
}

/// The `message` of a registry error body, or the body (shortened).
fn message_of(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| {
            v.get("message")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| truncate(text))
}

fn truncate(text: &str) -> String {
    let mut end = text.len().min(300);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// A reqwest error without the URL (which is ours and dull) and its chain of causes.
fn plain(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Percent-encodes a path segment (subjects are topic names and Avro names, but be safe).
fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Writes the Confluent wire-format header (magic byte 0, the id big-endian) to `out`.
pub fn frame(out: &mut Vec<u8>, id: u32) {
    out.push(0);
    out.extend_from_slice(&id.to_be_bytes());
}

/// The schema id and the Avro body of a Confluent wire-format record, or `None` when `bytes`
/// is not one (too short, or the first byte is not 0).
pub fn unframe(bytes: &[u8]) -> Option<(u32, &[u8])> {
    if bytes.len() < 5 || bytes[0] != 0 {
        return None;
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Some((id, &bytes[5..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_round_trips_and_refuses_json() {
        let mut out = Vec::new();
        frame(&mut out, 0x0102_0304);
        out.extend_from_slice(b"body");
        assert_eq!(&out[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(unframe(&out), Some((0x0102_0304, &b"body"[..])));
        assert_eq!(unframe(b"{\"op\":\"c\"}"), None);
        assert_eq!(unframe(&[0, 0, 0]), None);
    }

    #[test]
    fn secrets_stay_out_of_debug_and_urls_with_credentials_are_refused() {
        let auth = RegistryAuth::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{auth:?}").contains("hunter2"));
        assert!(!format!("{:?}", RegistryAuth::Bearer("tok3n".into())).contains("tok3n"));
        let e = Registry::new(&RegistryOptions {
            url: "http://u:hunter2@127.0.0.1:1".into(),
            auth: RegistryAuth::None,
            ca_file: None,
            timeout: Duration::from_secs(1),
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("--schema-registry-username"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn statuses_are_classified() {
        let what = || "x".to_string();
        assert!(matches!(
            check_status(503, "{}", &what),
            Err(RegistryError::Unavailable(_))
        ));
        assert!(matches!(
            check_status(429, "", &what),
            Err(RegistryError::Unavailable(_))
        ));
        assert_eq!(
            check_status(401, "", &what),
            Err(RegistryError::Unauthorized(401))
        );
        let e = check_status(
            422,
            r#"{"error_code":42201,"message":"Invalid schema"}"#,
            &what,
        );
        assert!(
            matches!(e, Err(RegistryError::Refused { status: 422, ref message, .. }) if message == "Invalid schema")
        );
        assert!(check_status(200, "", &what).is_ok());
        assert_eq!(encode_path("a b/c"), "a%20b%2Fc");
    }

    /// A registry stand-in for what a real one does only under a race: the first registration
    /// answers 409; later ones answer 409 again (`refuses`) or 200 with id 9; the lookup finds
    /// the schema (id 7) when `held`.
    async fn racing_registry(held: bool, refuses: bool) -> String {
        use axum::routing::post;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let posts = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new()
            .route(
                "/subjects/{subject}/versions",
                post(move || async move {
                    if posts.fetch_add(1, Ordering::SeqCst) == 0 || refuses {
                        (
                            axum::http::StatusCode::CONFLICT,
                            r#"{"error_code":409,"message":"An artifact with ID 's' already exists."}"#,
                        )
                    } else {
                        (axum::http::StatusCode::OK, r#"{"id":9}"#)
                    }
                }),
            )
            .route(
                "/subjects/{subject}",
                post(move || async move {
                    if held {
                        (axum::http::StatusCode::OK, r#"{"subject":"s","version":1,"id":7}"#)
                    } else {
                        (
                            axum::http::StatusCode::NOT_FOUND,
                            r#"{"error_code":40403,"message":"Schema not found"}"#,
                        )
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_409_is_looked_up_and_retried_before_it_counts_as_incompatible() {
        // (held by the subject, refuses every time) → expected
        for (held, refuses, expect) in [
            (true, true, Ok(7)),
            (false, false, Ok(9)),
            (false, true, Err("incompatible")),
        ] {
            let r = Registry::new(&RegistryOptions {
                url: racing_registry(held, refuses).await,
                auth: RegistryAuth::None,
                ca_file: None,
                timeout: Duration::from_secs(5),
            })
            .unwrap_or_else(|e| panic!("{e}"));
            let got = r.register("s", "\"string\"").await;
            match (got, expect) {
                (Ok(id), Ok(want)) => assert_eq!(id, want),
                (Err(RegistryError::Incompatible { subject, .. }), Err(_)) => {
                    assert_eq!(subject, "s");
                }
                (got, want) => panic!("held {held}, refuses {refuses}: {got:?}, expected {want:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_unreachable_registry_is_transient() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        let r = Registry::new(&RegistryOptions {
            url: format!("http://127.0.0.1:{port}"),
            auth: RegistryAuth::None,
            ca_file: None,
            timeout: Duration::from_secs(2),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let e = r.register("s", "\"string\"").await.err();
        assert!(e.as_ref().is_some_and(RegistryError::is_transient), "{e:?}");
    }
}
