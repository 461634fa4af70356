//! The webhook notifier end to end: Postgres → producer → Kafka → `notify` → receivers
//! started here, which check every signature with their own HMAC code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use hmac::{Hmac, Mac};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use serde_json::{Value, json};
use sha2::Sha256;
use walrelay_tests::process::Proc;

use crate::{Stack, consumer_bin};

pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub(crate) const TOKEN: &str = "test-token-0123456789abcdef";

/// One delivery a receiver accepted.
#[derive(Debug, Clone)]
struct Delivery {
    id: String,
    body: Value,
}

#[derive(Default)]
struct Receiver {
    /// Accepted deliveries per path.
    accepted: BTreeMap<String, Vec<Delivery>>,
    /// Attempts per (path, id).
    attempts: HashMap<(String, String), u32>,
    /// Signatures that did not verify.
    bad_signatures: u32,
    /// `/bad` answers 200 once this is set (for the replay).
    bad_fixed: bool,
}

/// Verifies a Standard Webhooks signature independently of the notifier's code.
fn verify(headers: &HeaderMap, body: &[u8]) -> Option<String> {
    let get = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let (id, ts, sig) = (
        get("webhook-id")?,
        get("webhook-timestamp")?,
        get("webhook-signature")?,
    );
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let fresh = ts.parse::<i64>().is_ok_and(|t| (now - t).abs() < 300);
    (sig.split(' ').any(|s| s == expected) && fresh).then_some(id)
}

async fn start_receiver(state: Arc<Mutex<Receiver>>) -> u16 {
    // Receivers listen on 127.0.0.2, the only address the notifier may reach here, so
    // `localhost` (127.0.0.1) stays outside the allow-list.
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: HeaderMap, body: axum::body::Bytes| {
            let state = Arc::clone(&state);
            async move {
                let path = uri.path().to_string();
                let Some(id) = verify(&headers, &body) else {
                    state.lock().expect("lock").bad_signatures += 1;
                    return StatusCode::UNAUTHORIZED.into_response_parts();
                };
                let attempt = {
                    let mut st = state.lock().expect("lock");
                    let n = st.attempts.entry((path.clone(), id.clone())).or_default();
                    *n += 1;
                    *n
                };
                let answer = match path.as_str() {
                    "/flaky" if attempt <= 2 => StatusCode::INTERNAL_SERVER_ERROR,
                    "/throttle" if attempt == 1 => StatusCode::TOO_MANY_REQUESTS,
                    "/slow" if attempt == 1 => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        StatusCode::OK
                    }
                    "/gone" => StatusCode::GONE,
                    "/bad" if !state.lock().expect("lock").bad_fixed => StatusCode::BAD_REQUEST,
                    _ => StatusCode::OK,
                };
                if answer == StatusCode::OK {
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    state
                        .lock()
                        .expect("lock")
                        .accepted
                        .entry(path)
                        .or_default()
                        .push(Delivery { id, body });
                }
                answer.into_response_parts()
            }
        },
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

trait Answer {
    fn into_response_parts(self) -> axum::response::Response;
}

impl Answer for StatusCode {
    fn into_response_parts(self) -> axum::response::Response {
        let mut r = axum::response::IntoResponse::into_response(self);
        if self == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        r
    }
}

/// The notifier's `--delivery-timeout` in these tests, in seconds.
const DELIVERY_TIMEOUT_S: u64 = 1;
/// The notifier's `--max-attempts` in these tests.
const MAX_ATTEMPTS: u64 = 4;

pub(crate) fn notify_args(s: &Stack, api_port: u16, command: &str) -> Vec<String> {
    let (timeout, attempts) = (format!("{DELIVERY_TIMEOUT_S}s"), MAX_ATTEMPTS.to_string());
    [
        "--kafka-brokers",
        &s.broker.brokers(),
        "--topic",
        &s.topic,
        "--group",
        &s.group,
        "--postgres-url",
        &s.pg.url(&s.db),
        "--api-addr",
        &format!("127.0.0.1:{api_port}"),
        "--api-token",
        TOKEN,
        "--allow-targets",
        "127.0.0.2/32",
        "--delivery-timeout",
        &timeout,
        "--max-attempts",
        &attempts,
        "--retry-initial-backoff",
        "50ms",
        "--retry-max-backoff",
        "2s",
        "--batch-max-wait",
        "100ms",
        "--kafka-property",
        "session.timeout.ms=6000",
        "--kafka-property",
        "heartbeat.interval.ms=500",
        command,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub(crate) async fn api(
    http: &reqwest::Client,
    port: u16,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let base = format!("http://127.0.0.1:{port}");
    api_at(http, &base, method, path, body, token).await
}

/// A request to the API at `base` (`http://…` or `https://…`), retried while unreachable.
async fn api_at(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut req = http.request(method.clone(), format!("{base}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = &body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let bytes = r.bytes().await.unwrap_or_default();
                let v = serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null);
                return (status, v);
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "API unreachable: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// `POST /v1/subscriptions` with the test token.
pub(crate) async fn subscribe(http: &reqwest::Client, port: u16, body: Value) -> (u16, Value) {
    api(
        http,
        port,
        reqwest::Method::POST,
        "/v1/subscriptions",
        Some(body),
        Some(TOKEN),
    )
    .await
}

/// Dead letters of the notifier: (subscription, status, reason, payload).
pub(crate) fn dead_letters(s: &Stack) -> Vec<(String, String, String, Value)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", s.broker.brokers())
        .set("group.id", walrelay_tests::unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer
        .subscribe(&[&format!("{}.dlq", s.topic)])
        .expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let h = |k: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|x| x.key == k).and_then(|x| x.value))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            out.push((
                h("walrelay.dlq.subscription"),
                h("walrelay.dlq.status"),
                h("walrelay.dlq.reason"),
                serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_ordered_retried_dead_lettered_and_survive_a_kill() {
    let mut s = Stack::start("CREATE TABLE orders (id int PRIMARY KEY, state text, n int);").await;
    let state = Arc::new(Mutex::new(Receiver::default()));
    let port = start_receiver(Arc::clone(&state)).await;
    let api_port = walrelay_tests::free_port();
    let log = s.log_path("notify");
    let mut notify = Proc::spawn(
        &consumer_bin(),
        &notify_args(&s, api_port, "notify"),
        &[],
        &log,
    );
    let http = reqwest::Client::new();
    use reqwest::Method;

    // The API: token, validation naming the field, creation.
    let (st, _) = api(
        &http,
        api_port,
        Method::GET,
        "/v1/subscriptions",
        None,
        None,
    )
    .await;
    assert_eq!(st, 401, "no token");
    for (body, field) in [
        (json!({"url": "http://127.0.0.3:9/x"}), "url"),
        (json!({"url": "https://x.example", "ops": ["zz"]}), "ops"),
    ] {
        let (st, v) = subscribe(&http, api_port, body).await;
        assert_eq!(
            (st, v["error"]["field"].as_str()),
            (422, Some(field)),
            "{v}"
        );
    }
    let mut subs = BTreeMap::new();
    for (name, path, ops) in [
        ("ok", "/ok".to_string(), None),
        ("deletes", "/deletes".to_string(), Some(json!(["d"]))),
        ("flaky", "/flaky".to_string(), None),
        ("throttle", "/throttle".to_string(), None),
        ("slow", "/slow".to_string(), Some(json!(["c"]))),
        ("gone", "/gone".to_string(), None),
        ("bad", "/bad".to_string(), Some(json!(["u"]))),
    ] {
        let mut body = json!({"url": format!("http://127.0.0.2:{port}{path}"), "schema": "public",
                              "table": "orders", "secret": SECRET});
        if let Some(ops) = ops {
            body["ops"] = ops;
        }
        let (st, v) = subscribe(&http, api_port, body).await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(v["secret"], SECRET);
        subs.insert(name, v["id"].as_str().unwrap_or_default().to_string());
    }
    // A host name resolving to a loopback address outside the allow-list: refused when
    // connecting, not when subscribing.
    let (st, v) = subscribe(
        &http,
        api_port,
        json!({"url": format!("http://localhost:{port}/ok"), "table": "orders", "ops": ["d"]}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    assert!(
        v["secret"]
            .as_str()
            .is_some_and(|x| x.starts_with("whsec_")),
        "a secret is generated"
    );
    subs.insert(
        "localhost",
        v["id"].as_str().unwrap_or_default().to_string(),
    );
    let (_, listed) = api(
        &http,
        api_port,
        Method::GET,
        "/v1/subscriptions",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(listed["subscriptions"].as_array().map(Vec::len), Some(8));
    assert!(
        listed.to_string().find("whsec_").is_none(),
        "secrets are shown only at creation"
    );

    // Writes (after the subscriptions exist, and once the producer streams, so each change is
    // an event of its own rather than part of a snapshot row): several changes per row, so
    // order matters.
    s.wait_streaming().await;
    s.exec("INSERT INTO orders SELECT g, 'new', 0 FROM generate_series(1, 5) g")
        .await;
    s.exec("UPDATE orders SET state = 'paid', n = n + 1 WHERE id <= 3")
        .await;
    s.exec("UPDATE orders SET n = n + 1 WHERE id <= 3").await;
    s.exec("INSERT INTO orders VALUES (6, 'new', 0)").await;
    s.exec("DELETE FROM orders WHERE id = 5").await;
    // Kill the notifier while the slow endpoint holds a batch, then start it again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    notify.kill9();
    s.exec("UPDATE orders SET n = n + 10 WHERE id = 1; UPDATE orders SET n = n + 10 WHERE id = 1")
        .await;
    let log = s.log_path("notify-restarted");
    let mut notify = Proc::spawn(
        &consumer_bin(),
        &notify_args(&s, api_port, "notify"),
        &[],
        &log,
    );

    // Every event reaches /ok: 5 inserts, 3 + 3 updates, 1 insert, 1 delete, 2 updates.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let done = {
            let st = state.lock().expect("lock");
            let got: BTreeSet<String> = st
                .accepted
                .get("/ok")
                .map(|v| v.iter().map(|d| d.id.clone()).collect())
                .unwrap_or_default();
            got.len() >= 15
                && st.accepted.get("/flaky").map_or(0, Vec::len) >= 15
                && st.accepted.get("/throttle").map_or(0, Vec::len) >= 15
        };
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deliveries incomplete: {:?}\n{}",
            state
                .lock()
                .expect("lock")
                .accepted
                .iter()
                .map(|(k, v)| (k.clone(), v.len()))
                .collect::<Vec<_>>(),
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    {
        let st = state.lock().expect("lock");
        assert_eq!(st.bad_signatures, 0, "every signature verifies");
        let ok = &st.accepted["/ok"];
        // Re-deliveries after the kill carry the same webhook-id.
        let mut by_body: HashMap<String, BTreeSet<String>> = HashMap::new();
        for d in ok {
            by_body
                .entry(d.body.to_string())
                .or_default()
                .insert(d.id.clone());
        }
        assert!(
            by_body.values().all(|ids| ids.len() == 1),
            "one id per event"
        );
        // Per row, events arrive in commit order (re-deliveries may repeat an earlier one).
        let mut last: HashMap<String, (u64, u64)> = HashMap::new();
        let mut seen_ids = BTreeSet::new();
        for d in ok {
            if !seen_ids.insert(d.id.clone()) {
                continue;
            }
            let row =
                d.body["after"]["id"].clone().to_string() + &d.body["before"]["id"].to_string();
            let pos = (
                d.body["source"]["commit_lsn"].as_u64().unwrap_or(0),
                d.body["source"]["seq"].as_u64().unwrap_or(0),
            );
            if d.body["op"] == "ddl" {
                continue;
            }
            if let Some(prev) = last.insert(row.clone(), pos) {
                assert!(prev <= pos, "row {row}: {prev:?} then {pos:?}");
            }
        }
        assert!(ok.iter().all(|d| d.body["source"]["table"] == "orders"));
        let deletes = st.accepted.get("/deletes").cloned().unwrap_or_default();
        assert!(
            !deletes.is_empty() && deletes.iter().all(|d| d.body["op"] == "d"),
            "op filter"
        );
        assert!(
            st.accepted.get("/slow").is_some_and(|v| !v.is_empty()),
            "a timed-out delivery is retried"
        );
    }

    // 410 disabled its subscription; 400s and the SSRF refusals were dead-lettered.
    let (_, gone) = api(
        &http,
        api_port,
        Method::GET,
        &format!("/v1/subscriptions/{}", subs["gone"]),
        None,
        Some(TOKEN),
    )
    .await;
    // Disabled once the batch holding the 410 settles (the slow endpoint may still hold it).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut gone = gone;
    while !gone["disabled"].as_str().is_some_and(|d| d.contains("410")) {
        assert!(Instant::now() < deadline, "{gone}\n{}", s.all_logs());
        tokio::time::sleep(Duration::from_millis(300)).await;
        gone = api(
            &http,
            api_port,
            Method::GET,
            &format!("/v1/subscriptions/{}", subs["gone"]),
            None,
            Some(TOKEN),
        )
        .await
        .1;
    }
    let letters = dead_letters(&s);
    let of = |name: &str| {
        letters
            .iter()
            .filter(|l| l.0 == subs[name])
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        of("gone").iter().any(|l| l.1 == "410" && l.2 == "gone"),
        "{letters:?}"
    );
    let bad = of("bad");
    assert!(
        !bad.is_empty() && bad.iter().all(|l| l.1 == "400" && l.3["op"] == "u"),
        "{bad:?}"
    );
    let refused = of("localhost");
    assert!(
        !refused.is_empty() && refused.iter().all(|l| l.1 == "none"),
        "{letters:?}"
    );
    assert!(
        of("ok").is_empty() && of("flaky").is_empty(),
        "retried ones were not dead-lettered"
    );

    // The replay command delivers the dead letters of /bad once it accepts them, with the
    // ids they had.
    // The refused subscription is deleted; its dead letters are skipped by the replay.
    let path = format!("/v1/subscriptions/{}", subs["localhost"]);
    let (st, _) = api(&http, api_port, Method::DELETE, &path, None, Some(TOKEN)).await;
    assert_eq!(st, 204);
    let (st, _) = api(&http, api_port, Method::GET, &path, None, Some(TOKEN)).await;
    assert_eq!(st, 404);
    notify.terminate();
    state.lock().expect("lock").bad_fixed = true;
    let out = std::process::Command::new(consumer_bin())
        .args(notify_args(
            &s,
            walrelay_tests::free_port(),
            "replay-dead-letters",
        ))
        .output()
        .expect("replay");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let st = state.lock().expect("lock");
    let replayed = st.accepted.get("/bad").cloned().unwrap_or_default();
    assert_eq!(replayed.len(), bad.len(), "{text}");
    let first_ids: BTreeSet<String> = st
        .attempts
        .keys()
        .filter(|(p, _)| p == "/bad")
        .map(|(_, id)| id.clone())
        .collect();
    assert!(
        replayed.iter().all(|d| first_ids.contains(&d.id)),
        "same webhook-id as before"
    );
}

/// Strict mode: a delivery that fails for good stops the notifier (exit 1) without committing,
/// so the event is delivered once the endpoint accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_stops_without_committing() {
    let mut s = Stack::start("CREATE TABLE orders (id int PRIMARY KEY, state text, n int);").await;
    let state = Arc::new(Mutex::new(Receiver::default()));
    let port = start_receiver(Arc::clone(&state)).await;
    let api_port = walrelay_tests::free_port();
    let mut args = notify_args(&s, api_port, "notify");
    args.pop();
    args.extend([
        "--on-delivery-failure".into(),
        "stop".into(),
        "notify".into(),
    ]);
    let log = s.log_path("notify-strict");
    let mut notify = Proc::spawn(&consumer_bin(), &args, &[], &log);
    let http = reqwest::Client::new();
    let (st, v) = subscribe(
        &http,
        api_port,
        json!({"url": format!("http://127.0.0.2:{port}/bad"), "table": "orders", "secret": SECRET}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    s.exec("INSERT INTO orders VALUES (1, 'new', 0)").await;
    let code = notify
        .exit_within(Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("strict mode did not stop\n{}", s.all_logs()));
    assert_eq!(code, Some(1), "{}", s.all_logs());
    assert!(
        notify.log().contains("--on-delivery-failure stop"),
        "{}",
        notify.log()
    );
    // Nothing was committed: once the endpoint accepts, the same event is delivered.
    state.lock().expect("lock").bad_fixed = true;
    let log = s.log_path("notify-strict-again");
    let mut notify = Proc::spawn(&consumer_bin(), &args, &[], &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered = state
            .lock()
            .expect("lock")
            .accepted
            .get("/bad")
            .is_some_and(|v| v.iter().any(|d| d.body["after"]["id"] == 1));
        if delivered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not delivered after the restart\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    notify.terminate();
}

/// A forward proxy for plain-HTTP targets on 127.0.0.2: it takes requests in absolute form
/// (`POST http://host:port/path`), records them, and forwards them.
async fn start_forward_proxy(seen: Arc<Mutex<Vec<String>>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let app = axum::Router::new().fallback(
        move |method: reqwest::Method,
              uri: axum::http::Uri,
              headers: HeaderMap,
              body: axum::body::Bytes| {
            let (seen, client) = (Arc::clone(&seen), client.clone());
            async move {
                use axum::response::IntoResponse;
                seen.lock().expect("lock").push(format!("{method} {uri}"));
                if uri.scheme().is_none() {
                    return StatusCode::BAD_REQUEST.into_response();
                }
                let mut req = client.request(method, uri.to_string()).body(body);
                for (k, v) in &headers {
                    let hop = ["host", "connection", "keep-alive", "content-length"]
                        .contains(&k.as_str())
                        || k.as_str().starts_with("proxy-");
                    if !hop {
                        req = req.header(k, v);
                    }
                }
                match req.send().await {
                    Ok(r) => {
                        let status = r.status();
                        (status, r.bytes().await.unwrap_or_default()).into_response()
                    }
                    Err(_) => StatusCode::BAD_GATEWAY.into_response(),
                }
            }
        },
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

/// A TLS connection to the notifier's API, trusting only `ca`.
async fn tls_connect(
    ca: &walrelay_tests::certs::TestCa,
    port: u16,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

/// Reads until the peer closes the connection (or `limit` passes); the time it took.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Duration {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(limit, async {
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    started.elapsed()
}

/// The API over HTTPS with its bounds (token before body, body size, slow peers, the
/// subscription cap), and the delivery client's proxies: environment proxies are ignored,
/// `--webhook-proxy` carries deliveries and the SSRF guard still checks their targets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_bounded_over_https_and_deliveries_use_only_the_configured_proxy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use walrelay_consumer::sinks::webhook::{api::MAX_BODY_BYTES, server};

    let mut s = Stack::start("CREATE TABLE orders (id int PRIMARY KEY, state text, n int);").await;
    let state = Arc::new(Mutex::new(Receiver::default()));
    let port = start_receiver(Arc::clone(&state)).await;
    let proxied = Arc::new(Mutex::new(Vec::<String>::new()));
    let proxy_port = start_forward_proxy(Arc::clone(&proxied)).await;
    let ca = walrelay_tests::certs::TestCa::new("walrelay-notify-api");
    let pair = ca.server("api", &["localhost", "127.0.0.1"]);
    // Proxies in the environment point at a dead address: whoever used them would fail.
    let dead = "http://127.0.0.2:9".to_string();
    let env: Vec<(&str, String)> = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .into_iter()
    .map(|k| (k, dead.clone()))
    .chain([("NO_PROXY", String::new()), ("no_proxy", String::new())])
    .collect();

    let api_port = walrelay_tests::free_port();
    let mut args = notify_args(&s, api_port, "notify");
    args.pop();
    args.extend(
        [
            "--api-tls-cert",
            &pair.cert.display().to_string(),
            "--api-tls-key",
            &pair.key.display().to_string(),
            "--max-subscriptions",
            "2",
            "--webhook-proxy",
            &format!("http://127.0.0.2:{proxy_port}"),
            "notify",
        ]
        .map(String::from),
    );
    let log = s.log_path("notify-tls");
    let mut notify = Proc::spawn(&consumer_bin(), &args, &env, &log);
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).expect("CA"))
        .no_proxy()
        .build()
        .expect("client");
    let base = format!("https://127.0.0.1:{api_port}");
    use reqwest::Method;

    // HTTPS with the CA; plain HTTP and HTTPS without the CA fail.
    let (st, v) = api_at(
        &https,
        &base,
        Method::GET,
        "/v1/subscriptions",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        (st, v["subscriptions"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );
    let plain = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let r = plain
        .get(format!("http://127.0.0.1:{api_port}/v1/subscriptions"))
        .bearer_auth(TOKEN)
        .send()
        .await;
    assert!(r.is_err(), "plain HTTP on the TLS port answered: {r:?}");
    let r = plain
        .get(format!("{base}/v1/subscriptions"))
        .bearer_auth(TOKEN)
        .send()
        .await;
    assert!(
        r.is_err(),
        "a certificate from an unknown CA was accepted: {r:?}"
    );

    // A wrong token is answered 401 at once, although the announced body never comes (the
    // body would be waited for up to 10 s).
    let mut tls = tls_connect(&ca, api_port).await;
    let started = Instant::now();
    tls.write_all(
        b"POST /v1/subscriptions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer wrong-token-0123456789ab\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n",
    )
    .await
    .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf))
        .await
        .expect("an answer within 3 s")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(tls);

    // A body over the limit: 413 naming the limit.
    let r = https
        .post(format!("{base}/v1/subscriptions"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(vec![b' '; MAX_BODY_BYTES + 4096])
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.expect("JSON error");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&MAX_BODY_BYTES.to_string())),
        "{v}"
    );

    // Slow peers are cut off: headers sent a byte a second (HEADER_TIMEOUT), a kept-alive
    // connection left idle (the same bound), a TCP connection that never starts TLS
    // (TLS_HANDSHAKE_TIMEOUT).
    let margin = Duration::from_secs(4);
    let slowloris = async {
        let mut tls = tls_connect(&ca, api_port).await;
        let started = Instant::now();
        let head =
            b"GET /v1/subscriptions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer x\r\n";
        let mut buf = [0u8; 1024];
        for byte in head.iter().cycle() {
            if tls.write_all(&[*byte]).await.is_err() || tls.flush().await.is_err() {
                break;
            }
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_secs(1), tls.read(&mut buf)).await
            {
                break;
            }
            if started.elapsed() > server::HEADER_TIMEOUT + margin {
                break;
            }
        }
        started.elapsed()
    };
    let idle = async {
        let mut tls = tls_connect(&ca, api_port).await;
        let request = format!(
            "GET /v1/subscriptions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        );
        tls.write_all(request.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 4096];
        let n = tls.read(&mut buf).await.expect("answer");
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        closed_within(&mut tls, server::HEADER_TIMEOUT + margin).await
    };
    let no_handshake = async {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", api_port))
            .await
            .expect("connect");
        closed_within(&mut tcp, server::TLS_HANDSHAKE_TIMEOUT + margin).await
    };
    let (slow, idle, no_handshake) = tokio::join!(slowloris, idle, no_handshake);
    for (what, took, bound) in [
        ("slow headers", slow, server::HEADER_TIMEOUT),
        ("idle keep-alive", idle, server::HEADER_TIMEOUT),
        (
            "no TLS handshake",
            no_handshake,
            server::TLS_HANDSHAKE_TIMEOUT,
        ),
    ] {
        assert!(
            took + Duration::from_secs(1) >= bound && took < bound + margin,
            "{what}: closed after {took:?}, bound {bound:?}"
        );
    }

    // --max-subscriptions 2: a target through the proxy, a host name the guard refuses, and
    // no third.
    let sub = |path: &str, host: &str| {
        json!({"url": format!("http://{host}:{port}{path}"), "schema": "public",
               "table": "orders", "secret": SECRET})
    };
    let mut ids = BTreeMap::new();
    for (name, host) in [("/via-proxy", "127.0.0.2"), ("/refused", "localhost")] {
        let (st, v) = api_at(
            &https,
            &base,
            Method::POST,
            "/v1/subscriptions",
            Some(sub(name, host)),
            Some(TOKEN),
        )
        .await;
        assert_eq!(st, 201, "{v}");
        ids.insert(name, v["id"].as_str().unwrap_or_default().to_string());
    }
    let (st, v) = api_at(
        &https,
        &base,
        Method::POST,
        "/v1/subscriptions",
        Some(sub("/third", "127.0.0.2")),
        Some(TOKEN),
    )
    .await;
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max-subscriptions")),
        "{v}"
    );

    // Deliveries go through the proxy; the refused target never reaches it and is
    // dead-lettered.
    s.wait_streaming().await;
    s.exec("INSERT INTO orders VALUES (1, 'new', 0)").await;
    let delivered = |id: i64| {
        let st = state.lock().expect("lock");
        st.accepted
            .get("/via-proxy")
            .is_some_and(|v| v.iter().any(|d| d.body["after"]["id"] == id))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !delivered(1) {
        assert!(
            Instant::now() < deadline,
            "not delivered through the proxy\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let through_proxy = proxied.lock().expect("lock").clone();
    assert!(
        through_proxy
            .iter()
            .any(|r| r == &format!("POST http://127.0.0.2:{port}/via-proxy")),
        "{through_proxy:?}"
    );
    assert!(
        through_proxy.iter().all(|r| !r.contains("/refused")),
        "{through_proxy:?}"
    );
    let letters = dead_letters(&s);
    assert!(
        letters
            .iter()
            .any(|l| l.0 == ids["/refused"] && l.1 == "none" && l.3["after"]["id"] == 1),
        "{letters:?}\n{}",
        s.all_logs()
    );
    assert!(
        !state
            .lock()
            .expect("lock")
            .accepted
            .contains_key("/refused"),
        "the refused target was reached"
    );
    notify.terminate();

    // Without --webhook-proxy, the environment's (dead) proxies are ignored: deliveries go
    // directly to the receiver and not through any proxy.
    let forwarded = proxied.lock().expect("lock").len();
    let api_port = walrelay_tests::free_port();
    let log = s.log_path("notify-env-proxies");
    let mut notify = Proc::spawn(
        &consumer_bin(),
        &notify_args(&s, api_port, "notify"),
        &env,
        &log,
    );
    let (st, v) = subscribe(
        &reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client"),
        api_port,
        sub("/direct", "127.0.0.2"),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    s.exec("INSERT INTO orders VALUES (2, 'new', 0)").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = {
            let st = state.lock().expect("lock");
            st.accepted
                .get("/direct")
                .is_some_and(|v| v.iter().any(|d| d.body["after"]["id"] == 2))
        } && delivered(2);
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not delivered directly\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        proxied.lock().expect("lock").len(),
        forwarded,
        "nothing went through a proxy"
    );
    notify.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_avro_topic_is_delivered_to_webhooks_as_json_envelopes() {
    let registry = walrelay_tests::registry::SchemaRegistry::shared();
    let url = registry.url();
    let s = Stack::start_with_producer_args(
        "CREATE TABLE orders (id int PRIMARY KEY, state text, total numeric(10,2));",
        &["--format", "avro", "--schema-registry-url", &url],
    )
    .await;
    s.wait_streaming().await;
    let state = Arc::new(Mutex::new(Receiver::default()));
    let port = start_receiver(Arc::clone(&state)).await;
    let api_port = walrelay_tests::free_port();
    let mut args = notify_args(&s, api_port, "notify");
    let command = args.pop().unwrap_or_default();
    args.extend(["--schema-registry-url".into(), url.clone(), command]);
    let mut s = s;
    let log = s.log_path("notify-avro");
    let mut notify = Proc::spawn(&consumer_bin(), &args, &[], &log);
    let http = reqwest::Client::new();
    let (st, v) = subscribe(
        &http,
        api_port,
        json!({"url": format!("http://127.0.0.2:{port}/avro"), "table": "orders", "secret": SECRET}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    s.exec("INSERT INTO orders VALUES (1, 'new', 12.5); UPDATE orders SET state = 'paid' WHERE id = 1;")
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let bodies = loop {
        let bodies: Vec<Value> = state
            .lock()
            .expect("lock")
            .accepted
            .get("/avro")
            .map(|v| {
                v.iter()
                    .map(|d| d.body.clone())
                    .filter(|b| b["op"] != "ddl")
                    .collect()
            })
            .unwrap_or_default();
        if bodies.len() >= 2 {
            break bodies;
        }
        assert!(Instant::now() < deadline, "not delivered\n{}", s.all_logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // JSON envelopes, the same as a JSON topic gives: numeric as an exact string.
    assert_eq!(bodies[0]["op"], "c", "{bodies:?}");
    assert_eq!(
        bodies[0]["after"],
        json!({"id": 1, "state": "new", "total": "12.50"})
    );
    assert_eq!(bodies[1]["op"], "u");
    assert_eq!(bodies[1]["after"]["state"], "paid");
    assert_eq!(state.lock().expect("lock").bad_signatures, 0);
    notify.terminate();
}
