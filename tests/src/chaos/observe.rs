//! What watches the run: a `read_committed` tail of each topic, the webhook receiver, the
//! WebSocket client of the stream gateway, heartbeat polls of the index and the target, and
//! the slots' retained WAL. Each keeps arrival times (ms since the epoch) for latency and
//! recovery; the receiver and the client also write what they got to a JSON-lines log that the
//! checker reads back.
//!
//! Longer than ~500 lines: five small observers, each a few dozen lines, that share the
//! arrival clock and the envelope parser; splitting them would scatter one idea.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{Map, Value, json};

use super::checker::{Obs, Parsed, parse};
use super::workload::Truth;
use super::{Ev, Op, PARTITIONS, Table, now_ms};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    walrelay_common::sync::lock(m)
}

/// A partial-transaction sample of a topic.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartialSample {
    /// Why it was taken (the fault).
    pub label: String,
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Transactions of which a part, not all, was visible.
    pub partial: usize,
    /// Whether every partition reached its end before the sample (otherwise not counted).
    pub complete: bool,
}

/// What a topic's tail has seen.
#[derive(Default)]
pub struct TailData {
    /// Every change event, in arrival order.
    pub obs: Vec<Obs>,
    /// Rows rebuilt from the events: (table, key) → (partition, row).
    pub state: BTreeMap<(Table, i64), (i32, Map<String, Value>)>,
    /// Commit LSN → ledger id, from the ledger rows' inserts.
    pub lsn_tx: HashMap<u64, i64>,
    /// Distinct events per commit LSN (partial-transaction samples).
    by_lsn: HashMap<u64, HashSet<Ev>>,
    /// Records that were not events of the workload's tables (described).
    pub bad: Vec<String>,
    /// Schema events and snapshot markers.
    pub other: u64,
    /// Samples taken.
    pub samples: Vec<PartialSample>,
}

impl TailData {
    /// Records one change event's arrival, and its place among its transaction's events.
    fn seen(&mut self, ev: Ev, arrival_ms: i64, ts_ms: i64, commit_lsn: u64) {
        self.obs.push(Obs {
            ev,
            stream: 0,
            arrival_ms,
            ts_ms,
            commit_lsn,
        });
        self.by_lsn.entry(commit_lsn).or_default().insert(ev);
    }

    fn apply(&mut self, partition: i32, bytes: &[u8], arrival_ms: i64) {
        match parse(bytes) {
            Parsed::Row {
                ev,
                ts_ms,
                commit_lsn,
                after,
                unchanged,
            } => {
                self.seen(ev, arrival_ms, ts_ms, commit_lsn);
                if ev.table == Table::ChaosTx && ev.op == Op::Create {
                    self.lsn_tx.insert(commit_lsn, ev.key);
                }
                let k = (ev.table, ev.key);
                match (ev.op, after) {
                    (Op::Delete, _) => {
                        self.state.remove(&k);
                    }
                    (_, Some(mut row)) => {
                        if let Some((_, prev)) = self.state.get(&k) {
                            for col in &unchanged {
                                row.insert(
                                    col.clone(),
                                    prev.get(col).cloned().unwrap_or(Value::Null),
                                );
                            }
                        } else {
                            for col in &unchanged {
                                row.remove(col);
                            }
                        }
                        self.state.insert(k, (partition, row));
                    }
                    (_, None) => self.bad.push(format!("{ev} without an after image")),
                }
            }
            Parsed::Truncate {
                table,
                ts_ms,
                commit_lsn,
            } => {
                let ev = Ev {
                    table,
                    key: partition.into(),
                    op: Op::Truncate,
                    version: -1,
                };
                self.seen(ev, arrival_ms, ts_ms, commit_lsn);
                self.state
                    .retain(|(t, _), (p, _)| !(*t == table && *p == partition));
            }
            Parsed::Other => self.other += 1,
            Parsed::Bad(why) => {
                if self.bad.len() < 100 {
                    self.bad.push(why);
                }
            }
        }
    }

    /// Transactions visible in part: commit LSNs whose distinct events are fewer than their
    /// transaction planned (or whose ledger row is not visible).
    fn partial(&self, truth: &Truth) -> usize {
        self.by_lsn
            .iter()
            .filter(|(lsn, evs)| match self.lsn_tx.get(*lsn) {
                None => true,
                Some(tx) => truth.planned_events(*tx).is_some_and(|n| n != evs.len()),
            })
            .count()
    }

    /// The rebuilt rows without partitions.
    pub fn rows(&self) -> super::checker::Rows {
        self.state
            .iter()
            .map(|(k, (_, row))| (*k, row.clone()))
            .collect()
    }
}

/// A sample asked for. It is taken once every partition is at its end at least a second
/// after `asked_ms` (fetches in flight at the request have landed); one showing a partial
/// transaction is taken once more two seconds later (a partition's part may not have been
/// fetched yet), and that one counts.
struct SampleRequest {
    label: String,
    asked_ms: i64,
    retried: bool,
}

/// A thread reading one topic under `read_committed` from the beginning until stopped.
pub struct TopicTail {
    /// What it has seen.
    pub data: Arc<Mutex<TailData>>,
    request: Arc<Mutex<Option<SampleRequest>>>,
    /// Whether every partition was at its end at the last poll.
    caught_up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl TopicTail {
    /// Starts reading `topic` (waits for it to exist).
    pub fn start(config: ClientConfig, topic: String, truth: Arc<Truth>) -> Self {
        let data = Arc::new(Mutex::new(TailData::default()));
        let request: Arc<Mutex<Option<SampleRequest>>> = Arc::new(Mutex::new(None));
        let caught_up = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, r, c, s) = (
            Arc::clone(&data),
            Arc::clone(&request),
            Arc::clone(&caught_up),
            Arc::clone(&stop),
        );
        let handle = std::thread::spawn(move || tail(config, &topic, &truth, &d, &r, &c, &s));
        Self {
            data,
            request,
            caught_up,
            stop,
            handle: Some(handle),
        }
    }

    /// Takes a partial-transaction sample once every partition reached its end (at most
    /// `timeout`; a sample that timed out is kept as incomplete).
    pub async fn sample(&self, label: &str, timeout: Duration) -> PartialSample {
        let asked = now_ms();
        *lock(&self.request) = Some(SampleRequest {
            label: label.to_string(),
            asked_ms: asked,
            retried: false,
        });
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = lock(&self.data)
                .samples
                .iter()
                .rev()
                .find(|s| s.at_ms >= asked && s.label == label)
            {
                return s.clone();
            }
            if tokio::time::Instant::now() > deadline {
                lock(&self.request).take();
                let s = PartialSample {
                    label: label.to_string(),
                    at_ms: now_ms(),
                    partial: 0,
                    complete: false,
                };
                lock(&self.data).samples.push(s.clone());
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether every partition was at its end at the last poll.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }

    /// Stops the thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for TopicTail {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(
    mut config: ClientConfig,
    topic: &str,
    truth: &Truth,
    data: &Mutex<TailData>,
    request: &Mutex<Option<SampleRequest>>,
    caught_up: &AtomicBool,
    stop: &AtomicBool,
) {
    let consumer: BaseConsumer = match config
        .set("group.id", crate::unique("chaos-tail"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("log_level", "3")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            lock(data).bad.push(format!("tail of {topic}: {e}"));
            return;
        }
    };
    // The producer creates the topic when it starts.
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))
            && md
                .topics()
                .first()
                .is_some_and(|t| t.partitions().len() == PARTITIONS as usize)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        let _ = tpl.add_partition_offset(topic, p, Offset::Beginning);
    }
    if let Err(e) = consumer.assign(&tpl) {
        lock(data).bad.push(format!("tail of {topic}: assign: {e}"));
        return;
    }
    let mut at_end = [false; PARTITIONS as usize];
    while !stop.load(Ordering::SeqCst) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let arrival = now_ms();
                if let Some(e) = at_end.get_mut(m.partition() as usize) {
                    *e = false;
                }
                lock(data).apply(m.partition(), m.payload().unwrap_or_default(), arrival);
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if let Some(e) = at_end.get_mut(p as usize) {
                    *e = true;
                }
            }
            Some(Err(_)) | None => {}
        }
        let mut req = lock(request);
        if let Some(r) = req.as_mut()
            && now_ms() >= r.asked_ms + 1000
            && at_end.iter().all(|e| *e)
        {
            let mut d = lock(data);
            let partial = d.partial(truth);
            if partial > 0 && !r.retried {
                r.retried = true;
                r.asked_ms = now_ms() + 1000;
            } else {
                let label = r.label.clone();
                d.samples.push(PartialSample {
                    label,
                    at_ms: now_ms(),
                    partial,
                    complete: true,
                });
                *req = None;
            }
        }
        drop(req);
        caught_up.store(at_end.iter().all(|e| *e), Ordering::SeqCst);
    }
}

/// The webhook receiver: answers 200 to every POST and logs it (arrival ms, path, webhook-id,
/// body) to a JSON-lines file.
pub struct Receiver {
    /// Its port on 127.0.0.2.
    pub port: u16,
    /// The log.
    pub log: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Binds 127.0.0.2 (the notifier is allowed only that address) and serves.
    pub async fn start(log: &Path) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await?;
        let port = listener.local_addr()?.port();
        let file = Arc::new(Mutex::new(std::fs::File::create(log)?));
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
                let file = Arc::clone(&file);
                async move {
                    let id = headers
                        .get("webhook-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let line = json!({"t": now_ms(), "path": uri.path(), "id": id, "body": body});
                    let ok = writeln!(lock(&file), "{line}").is_ok();
                    if ok {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    }
                }
            },
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            port,
            log: log.to_path_buf(),
            task,
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One line of the receiver's or the client's log.
pub struct Line {
    /// Arrival, ms since the epoch.
    pub t: i64,
    /// The receiver's paths numbered in order of appearance (one per subscription); 0 for
    /// the client.
    pub stream: u32,
    /// The Kafka partition, when the log has it (the client's).
    pub partition: Option<i64>,
    /// The envelope.
    pub body: Vec<u8>,
}

/// Reads a JSON-lines log of the receiver or the stream client.
pub fn read_log(path: &Path, body_field: &str) -> anyhow::Result<Vec<Line>> {
    let text = std::fs::read_to_string(path)?;
    let mut streams: BTreeMap<String, u32> = BTreeMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        // A line cut by the process's end is the only malformed one possible.
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let n = streams.len() as u32;
        let stream = *streams
            .entry(v["path"].as_str().unwrap_or("").to_string())
            .or_insert(n);
        let body = match &v[body_field] {
            Value::String(s) => s.as_bytes().to_vec(),
            other => other.to_string().into_bytes(),
        };
        out.push(Line {
            t: v["t"].as_i64().unwrap_or(0),
            stream,
            partition: v["partition"].as_i64(),
            body,
        });
    }
    Ok(out)
}

/// The WebSocket client of the stream gateway: one connection of group `group`, reconnected
/// whenever it drops; every event is logged, then acknowledged.
pub struct StreamClient {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    /// Connections opened.
    pub connects: Arc<Mutex<u64>>,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(port: u16, token: &str, query: &str) -> anyhow::Result<Socket> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://127.0.0.1:{port}/v1/stream?{query}").into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true).await?;
    Ok(ws)
}

impl StreamClient {
    /// Starts the client.
    pub fn start(
        port: u16,
        token: String,
        group: String,
        tables: String,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut file = std::fs::File::create(log)?;
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(Mutex::new(0));
        let (s, c) = (Arc::clone(&stop), Arc::clone(&connects));
        let task = tokio::spawn(async move {
            let query = format!("group={group}&tables={tables}&from=earliest");
            while !s.load(Ordering::SeqCst) {
                let Ok(mut ws) = ws_connect(port, &token, &query).await else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                };
                *lock(&c) += 1;
                loop {
                    let next = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
                    if s.load(Ordering::SeqCst) {
                        let _ = ws.close(None).await;
                        return;
                    }
                    let msg = match next {
                        Err(_) => continue,
                        Ok(Some(Ok(m))) => m,
                        Ok(_) => break,
                    };
                    let tokio_tungstenite::tungstenite::Message::Text(text) = msg else {
                        continue;
                    };
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    if v["type"] != "event" {
                        continue;
                    }
                    let line = json!({"t": now_ms(), "path": "", "partition": v["partition"], "event": v["event"]});
                    if writeln!(file, "{line}").is_err() {
                        return;
                    }
                    let ack =
                        json!({"type": "ack", "partition": v["partition"], "offset": v["offset"]});
                    if ws
                        .send(tokio_tungstenite::tungstenite::Message::text(
                            ack.to_string(),
                        ))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Ok(Self {
            stop,
            task,
            connects,
        })
    }

    /// Closes the connection and ends the task.
    pub async fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
    }
}

/// Polls of a heartbeat (poll time, beat seen) and the slots' largest retained WAL.
#[derive(Default)]
pub struct Polls {
    /// The index's heartbeat document.
    pub index: Vec<(i64, i64)>,
    /// The target's heartbeat row.
    pub target: Vec<(i64, i64)>,
    /// Slot → largest `pg_current_wal_lsn() - restart_lsn` seen, bytes.
    pub retained_wal: BTreeMap<String, i64>,
    /// New walsender sessions of a slot (its `active_pid` changed): the slot and its
    /// confirmed position at the poll before, a bound below where the session started.
    pub sessions: Vec<(String, u64)>,
    /// Slot → (walsender pid, confirmed position) at the last poll.
    last: BTreeMap<String, (Option<i32>, u64)>,
}

/// Polls the index (`doc_url`: the heartbeat document), the target and the source's slots
/// every half second until `stop`.
pub fn start_polls(
    doc_url: String,
    target_url: String,
    source_url: String,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Polls>>, tokio::task::JoinHandle<()>) {
    let polls = Arc::new(Mutex::new(Polls::default()));
    let p = Arc::clone(&polls);
    let task = tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        let mut target: Option<tokio_postgres::Client> = None;
        let mut source: Option<tokio_postgres::Client> = None;
        while !stop.load(Ordering::SeqCst) {
            if let Ok(r) = http.get(&doc_url).send().await
                && let Ok(v) = r.json::<Value>().await
                && let Some(b) = v["_source"]["beat"].as_i64()
            {
                lock(&p).index.push((now_ms(), b));
            }
            for (url, client, is_target) in [
                (&target_url, &mut target, true),
                (&source_url, &mut source, false),
            ] {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    *client = match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
                        Ok((c, conn)) => {
                            tokio::spawn(async move {
                                let _ = conn.await;
                            });
                            Some(c)
                        }
                        Err(_) => None,
                    };
                }
                let Some(c) = client.as_ref() else { continue };
                if is_target {
                    if let Ok(row) = c
                        .query_one("SELECT beat FROM public.heartbeat WHERE id = 1", &[])
                        .await
                    {
                        lock(&p).target.push((now_ms(), row.get(0)));
                    }
                } else if let Ok(rows) = c
                    .query(
                        "SELECT slot_name::text, (pg_current_wal_lsn() - restart_lsn)::bigint, \
                         active_pid, (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint \
                         FROM pg_replication_slots WHERE restart_lsn IS NOT NULL",
                        &[],
                    )
                    .await
                {
                    let mut g = lock(&p);
                    for r in rows {
                        let (slot, bytes): (String, i64) = (r.get(0), r.get(1));
                        let (pid, confirmed): (Option<i32>, Option<i64>) = (r.get(2), r.get(3));
                        let confirmed = confirmed.unwrap_or(0) as u64;
                        if let Some((prev_pid, prev_confirmed)) = g.last.get(&slot).copied()
                            && pid.is_some()
                            && pid != prev_pid
                        {
                            g.sessions.push((slot.clone(), prev_confirmed));
                        }
                        g.last.insert(slot.clone(), (pid, confirmed));
                        let e = g.retained_wal.entry(slot).or_insert(0);
                        *e = (*e).max(bytes);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    (polls, task)
}

/// Rows of the workload's tables in a Postgres database, by table and key (`row_to_json`).
pub async fn pg_rows(client: &tokio_postgres::Client) -> anyhow::Result<super::checker::Rows> {
    let mut out = super::checker::Rows::new();
    for t in Table::ALL {
        let rows = client
            .query(
                &format!(
                    "SELECT id::bigint, row_to_json(t)::text FROM public.{} t",
                    t.name()
                ),
                &[],
            )
            .await?;
        for r in rows {
            let json: String = r.get(1);
            let row: Map<String, Value> = serde_json::from_str(&json)?;
            out.insert((t, r.get(0)), row);
        }
    }
    Ok(out)
}

/// Documents of the workload's tables in the index, by table and key (the fields walrelay adds
/// are left in; the comparison looks only at Postgres' columns).
pub async fn index_rows(indexes: &crate::opensearch::Indexes) -> super::checker::Rows {
    let mut out = super::checker::Rows::new();
    for t in Table::ALL {
        for (id, doc) in indexes.documents(&format!("public.{}", t.name())).await {
            let key = id.parse::<i64>().unwrap_or(i64::MIN);
            if let Value::Object(m) = doc {
                out.insert((t, key), m);
            }
        }
    }
    out
}
