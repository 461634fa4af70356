//! Reading a topic back, and the table state its events describe.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
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
        assert!(Instant::now() < deadline, "topic {topic} never appeared");
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
            return out;
        }
        if Instant::now() > deadline {
            panic!("timed out reading {topic}: {} records so far", out.len());
        }
        for _ in 0..10_000 {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().unwrap_or_default().to_vec(),
                }),
                Some(Err(e)) => eprintln!("consumer: {e}"),
                None => break,
            }
        }
    }
}

/// The rows of `schema.table` as the events describe them, by the JSON of column `pk`.
/// Applies events in topic order per partition (all of one row are in one partition).
pub fn table_state(
    records: &[Record],
    schema: &str,
    table: &str,
    pk: &str,
) -> BTreeMap<String, Map<String, Value>> {
    let mut rows: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in sorted {
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
                if let Some(old) = e.before.as_ref().and_then(|b| b.get(pk)) {
                    if old.to_string() != id {
                        rows.remove(&old.to_string());
                    }
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
        }
    }
    rows
}
