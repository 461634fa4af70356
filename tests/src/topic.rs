//! Reading a topic back, and the table state its events describe.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{Map, Value};
use walrelay_common::event::{Envelope, Op, UNCHANGED_TOAST};

/// One record.
#[derive(Debug, Clone)]
pub struct Record {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Vec<u8>,
    /// Value bytes.
    pub value: Vec<u8>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A message's headers.
fn headers_of<M: Message>(m: &M) -> Vec<(String, Vec<u8>)> {
    use rdkafka::message::Headers;
    m.headers()
        .map(|h| {
            h.iter()
                .map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

impl Record {
    /// The parsed envelope.
    pub fn envelope(&self) -> Envelope {
        Envelope::from_slice(&self.value).unwrap_or_else(|e| {
            panic!("bad envelope {e}: {}", String::from_utf8_lossy(&self.value))
        })
    }
}

/// Reads a topic from the beginning, accumulating records, until `done(&records)` or
/// `timeout` (then panics with what it has).
pub fn read_until(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    match try_read_until(brokers, topic, timeout, done) {
        Ok(r) => r,
        Err(r) => panic!("timed out reading {topic}: {} records so far", r.len()),
    }
}

/// Like [`read_until`], returning what was read as the error on timeout.
pub fn try_read_until(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Record]) -> bool,
) -> Result<Vec<Record>, Vec<Record>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", crate::unique("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let deadline = Instant::now() + timeout;
    let partitions = loop {
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            let n = md.topics().first().map_or(0, |t| t.partitions().len());
            if n > 0 {
                break n;
            }
        }
        if Instant::now() > deadline {
            return Err(Vec::new());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    loop {
        if done(&out) {
            return Ok(out);
        }
        if Instant::now() > deadline {
            return Err(out);
        }
        for _ in 0..10_000 {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers: headers_of(&m),
                }),
                Some(Err(e)) => eprintln!("consumer: {e}"),
                None => break,
            }
        }
    }
}

/// The rows of `schema.table` as the events describe them, by the JSON of column `pk`.
/// Applies events in topic order per partition (all of one row are in one partition; a
/// truncate sent to every partition clears each partition's rows there).
pub fn table_state(
    records: &[Record],
    schema: &str,
    table: &str,
    pk: &str,
) -> BTreeMap<String, Map<String, Value>> {
    let mut all = BTreeMap::new();
    let mut rows: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut partition = sorted.first().map_or(0, |r| r.partition);
    for r in sorted {
        if r.partition != partition {
            all.append(&mut rows);
            partition = r.partition;
        }
        let e = r.envelope();
        if e.source.schema != schema || e.source.table != table {
            continue;
        }
        match e.op {
            Op::Create | Op::Update | Op::Read => {
                let mut after = e.after.unwrap_or_default();
                let id = after.get(pk).map(Value::to_string).unwrap_or_default();
                if let Some(prev) = rows.get(&id) {
                    for col in &e.unchanged_toast {
                        if after.get(col).and_then(Value::as_str) == Some(UNCHANGED_TOAST) {
                            after
                                .insert(col.clone(), prev.get(col).cloned().unwrap_or(Value::Null));
                        }
                    }
                }
                // An update that changed the key removes the old row.
                if let Some(old) = e
                    .before
                    .as_ref()
                    .and_then(|b| b.get(pk))
                    .map(Value::to_string)
                    && old != id
                {
                    rows.remove(&old);
                }
                rows.insert(id, after);
            }
            Op::Delete => {
                let id = e
                    .before
                    .as_ref()
                    .and_then(|b| b.get(pk))
                    .map(Value::to_string)
                    .unwrap_or_default();
                rows.remove(&id);
            }
            Op::Truncate => rows.clear(),
            Op::Ddl | Op::SnapshotStart | Op::SnapshotEnd => {}
        }
    }
    all.append(&mut rows);
    all
}

/// Checks, partition by partition in offset order, that every row event comes after the
/// schema event of the version it carries, for its table, and that its columns and column ids
/// are that schema's. Returns the number of row events checked.
pub fn check_schema_order(records: &[Record]) -> Result<usize, String> {
    use std::collections::HashMap;
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    // (partition, schema, table, version) -> column name -> id
    let mut seen: HashMap<(i32, String, String, u64), BTreeMap<String, i32>> = HashMap::new();
    let mut checked = 0;
    for r in sorted {
        let e = r.envelope();
        let at = format!(
            "partition {} offset {} ({}.{} {:?} version {})",
            r.partition, r.offset, e.source.schema, e.source.table, e.op, e.schema_version
        );
        let key = (
            r.partition,
            e.source.schema.clone(),
            e.source.table.clone(),
            e.schema_version,
        );
        if e.op == Op::Ddl {
            let ddl = e
                .ddl
                .as_ref()
                .ok_or_else(|| format!("{at}: ddl event without ddl"))?;
            let cols: BTreeMap<String, i32> = ddl
                .columns
                .iter()
                .filter(|c| !c.generated)
                .map(|c| (c.name.clone(), c.id))
                .collect();
            let ids: BTreeMap<String, i32> = e.column_ids.parse().into_iter().collect();
            if !ddl.dropped && ids != cols {
                return Err(format!(
                    "{at}: column_ids {ids:?} differ from the columns {cols:?}"
                ));
            }
            seen.insert(key, cols);
            continue;
        }
        let Some(cols) = seen.get(&key) else {
            return Err(format!("{at}: row before its schema event"));
        };
        let ids: BTreeMap<String, i32> = e.column_ids.parse().into_iter().collect();
        if &ids != cols {
            return Err(format!(
                "{at}: column_ids {ids:?}, schema event said {cols:?}"
            ));
        }
        for image in [&e.before, &e.after].into_iter().flatten() {
            if let Some(extra) = image.keys().find(|k| !cols.contains_key(*k)) {
                return Err(format!("{at}: column {extra} not in its schema {cols:?}"));
            }
        }
        if e.op != Op::Truncate && e.after.as_ref().is_some_and(|a| a.len() != cols.len()) {
            return Err(format!("{at}: after image lacks columns of {cols:?}"));
        }
        checked += 1;
    }
    Ok(checked)
}

/// Sum of the partitions' high watermarks: how many records the broker holds.
pub fn record_count(brokers: &str, topic: &str) -> i64 {
    try_record_count(brokers, topic).expect("metadata and watermarks of the topic")
}

/// [`record_count`], or `None` while the broker cannot tell (a topic just created, its
/// partitions without a leader yet); 0 while the topic does not exist.
pub fn try_record_count(brokers: &str, topic: &str) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", crate::unique("counter"))
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .ok()?;
    let n = md.topics().first().map_or(0, |t| t.partitions().len());
    (0..n)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p as i32, Timeout::After(Duration::from_secs(10)))
                .ok()
                .map(|(lo, hi)| hi - lo)
        })
        .sum()
}

/// The last `n` records of partition `partition`.
pub fn tail(brokers: &str, topic: &str, partition: i32, n: i64) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", crate::unique("tail"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let (_, hi) = consumer
        .fetch_watermarks(topic, partition, Timeout::After(Duration::from_secs(10)))
        .expect("watermarks");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset((hi - n).max(0)))
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (out.len() as i64) < n.min(hi) && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().unwrap_or_default().to_vec(),
                value: m.payload().unwrap_or_default().to_vec(),
                headers: headers_of(&m),
            });
        }
    }
    out
}

/// Every record a `read_committed` reader can read now: from the beginning until each
/// partition reports its end (the last stable offset: records of an open or aborted Kafka
/// transaction are not counted, so this never waits for them, unlike [`record_count`]).
pub fn read_to_end(brokers: &str, topic: &str, timeout: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", crate::unique("to-end"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let n = md.topics().first().map_or(0, |t| t.partitions().len());
    let mut tpl = TopicPartitionList::new();
    for p in 0..n {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut at_end = vec![false; n];
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while at_end.iter().any(|e| !e) {
        assert!(
            Instant::now() < deadline,
            "{topic}: not at its end after {timeout:?} ({} records)",
            out.len()
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if let Some(e) = at_end.get_mut(m.partition() as usize) {
                    *e = false;
                }
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers: headers_of(&m),
                });
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                if let Some(e) = at_end.get_mut(p as usize) {
                    *e = true;
                }
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    out
}

/// Whether the record is an incremental snapshot row (`source.incremental`).
pub fn incremental(r: &Record) -> bool {
    serde_json::from_slice::<Value>(&r.value)
        .ok()
        .and_then(|v| v["source"]["incremental"].as_bool())
        == Some(true)
}

/// In topic order per partition: no row event of `table` carries a `version` below one
/// already seen for its `key`, and no snapshot row brings back a deleted key (re-sent copies
/// of streamed changes aside): no snapshot row is older than a change emitted before it for
/// its key. `key` and `version` are integer columns. Returns the number of incremental rows
/// checked, or the offending key and what is wrong.
pub fn versions_never_go_back(
    records: &[Record],
    table: &str,
    key: &str,
    version: &str,
) -> Result<usize, (i64, String)> {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    // (partition, id) -> latest version, or None once deleted.
    let mut seen: HashMap<(i32, i64), Option<i64>> = HashMap::new();
    let mut checked = 0;
    // A restart sends the unconfirmed window again (at-least-once): a streamed change seen
    // before, by its `(commit_lsn, seq)`, is a byte-identical copy and is skipped.
    let mut streamed: HashSet<(i32, u64, u64)> = HashSet::new();
    for r in sorted {
        let e = r.envelope();
        if e.source.table != table {
            continue;
        }
        if !e.source.snapshot && !streamed.insert((r.partition, e.source.commit_lsn, e.source.seq))
        {
            continue;
        }
        let inc = incremental(r);
        match e.op {
            Op::Create | Op::Update | Op::Read => {
                let after = e.after.unwrap_or_default();
                let id = after[key]
                    .as_i64()
                    .ok_or((0, "a row without id".to_string()))?;
                let v = after[version]
                    .as_i64()
                    .ok_or((id, "a row without version".to_string()))?;
                match seen.get(&(r.partition, id)) {
                    Some(Some(prev)) if v < *prev => {
                        return Err((
                            id,
                            format!(
                                "id {id}: version {v} at offset {} after version {prev} (incremental: {inc})",
                                r.offset
                            ),
                        ));
                    }
                    Some(None) if e.op == Op::Read => {
                        return Err((
                            id,
                            format!(
                                "id {id}: a snapshot row at offset {} after its delete",
                                r.offset
                            ),
                        ));
                    }
                    _ => {}
                }
                if inc {
                    checked += 1;
                }
                seen.insert((r.partition, id), Some(v));
            }
            Op::Delete => {
                let id = e
                    .before
                    .as_ref()
                    .and_then(|b| b[key].as_i64())
                    .ok_or((0, "a delete without id".to_string()))?;
                seen.insert((r.partition, id), None);
            }
            _ => {}
        }
    }
    Ok(checked)
}
