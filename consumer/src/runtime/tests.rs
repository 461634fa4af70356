//! The offset rule without a broker: an in-memory sink and a recorder of the runtime's effects
//! (epochs, dead letters, stored offsets), driving the same `flush` the Kafka runtime uses.

use std::sync::{Arc, Mutex};

use super::*;

/// What happened, in order.
type Log = Arc<Mutex<Vec<String>>>;

fn log(l: &Log, entry: String) {
    walrelay_common::sync::lock(l).push(entry);
}

fn entries(l: &Log) -> Vec<String> {
    walrelay_common::sync::lock(l).clone()
}

/// A sink that keeps what it is given in memory and answers scripted verdicts.
struct MemorySink {
    log: Log,
    /// Events applied, as (topic, partition, offset).
    applied: Vec<(String, i32, i64)>,
    /// The verdict for an event at this offset (default: applied).
    verdict: fn(i64) -> Verdict,
    /// When set, `write` fails with this instead.
    fail: Option<fn() -> SinkError>,
    /// What `backlog` answers.
    backlog: Backlog,
}

impl MemorySink {
    fn new(log: &Log) -> Self {
        Self {
            log: Arc::clone(log),
            applied: Vec::new(),
            verdict: |_| Verdict::Applied,
            fail: None,
            backlog: Backlog::default(),
        }
    }
}

impl Sink for MemorySink {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn write(
        &mut self,
        events: &mut [Event],
        _shutdown: &CancellationToken,
    ) -> Result<Vec<Verdict>, SinkError> {
        let offsets: Vec<i64> = events.iter().map(|e| e.offset).collect();
        log(&self.log, format!("write {offsets:?}"));
        if let Some(fail) = self.fail {
            return Err(fail());
        }
        let verdicts: Vec<Verdict> = events.iter().map(|e| (self.verdict)(e.offset)).collect();
        for (e, v) in events.iter().zip(&verdicts) {
            if *v == Verdict::Applied {
                self.applied
                    .push((e.topic.to_string(), e.partition, e.offset));
            }
        }
        Ok(verdicts)
    }

    async fn settled(&mut self) {
        log(&self.log, "settled".into());
    }

    fn backlog(&self) -> Backlog {
        self.backlog.clone()
    }
}

/// The runtime's effects, recorded: epochs from a table, dead letters acknowledged unless told
/// otherwise.
struct Recorder {
    log: Log,
    /// (partition, current epoch) of topic `t`; a partition not listed is not assigned.
    epochs: Vec<(i32, u64)>,
    /// (topic, partition, current epoch) of other topics.
    other_epochs: Vec<(&'static str, i32, u64)>,
    dead_letters_fail: bool,
}

impl Recorder {
    fn new(log: &Log, epochs: Vec<(i32, u64)>) -> Self {
        Self {
            log: Arc::clone(log),
            epochs,
            other_epochs: Vec::new(),
            dead_letters_fail: false,
        }
    }
}

impl Effects for Recorder {
    fn epoch(&self, topic: &str, partition: i32) -> Option<u64> {
        let t = self.epochs.iter().map(|&(p, e)| ("t", p, e));
        t.chain(self.other_epochs.iter().copied())
            .find(|&(tt, p, _)| tt == topic && p == partition)
            .map(|(_, _, e)| e)
    }

    /// Logged as `{partition: offset}` for topic `t` alone, else `{"topic"/partition: offset}`.
    fn store_offsets(&self, next: &BTreeMap<(&str, i32), i64>) {
        if next.keys().all(|(t, _)| *t == "t") {
            let only: BTreeMap<i32, i64> = next.iter().map(|(&(_, p), &o)| (p, o)).collect();
            log(&self.log, format!("store {only:?}"));
        } else {
            let all: Vec<String> = next
                .iter()
                .map(|((t, p), o)| format!("{t}/{p}: {o}"))
                .collect();
            log(&self.log, format!("store {{{}}}", all.join(", ")));
        }
    }

    async fn dead_letter(
        &self,
        letters: &[DeadLetter<'_>],
        _shutdown: &CancellationToken,
    ) -> Result<(), DeadLetterError> {
        let what: Vec<String> = letters
            .iter()
            .map(|l| {
                let topic = if l.topic == "t" {
                    String::new()
                } else {
                    format!("{}/", l.topic)
                };
                format!("{}@{topic}{}:{}", l.reason, l.partition, l.offset)
            })
            .collect();
        log(&self.log, format!("dead-letter {what:?}"));
        if self.dead_letters_fail {
            return Err(DeadLetterError::Interrupted);
        }
        log(&self.log, "dead-letter acked".into());
        Ok(())
    }

    fn dead_letter_topic(&self) -> &str {
        "t.dlq"
    }
}

fn envelope(id: i64) -> String {
    format!(
        r#"{{"op":"c","before":null,"after":{{"id":{id}}},"source":{{"version":"v","connector":"walrelay","db":"d","schema":"public","table":"t","lsn":{id},"commit_lsn":{id},"txid":1,"ts_ms":1,"snapshot":false,"seq":1}},"ts_ms":1,"key":["id"],"types":{{"id":"integer"}}}}"#
    )
}

/// A decoded batch of (partition, offset, epoch, value) records of topic `t`.
fn batch(records: &[(i32, i64, u64, &str)]) -> Batch {
    let records: Vec<_> = records
        .iter()
        .map(|&(p, o, e, v)| ("t", p, o, e, v))
        .collect();
    batch_of(&records)
}

/// A decoded batch of (topic, partition, offset, epoch, value) records.
fn batch_of(records: &[(&str, i32, i64, u64, &str)]) -> Batch {
    let mut b = Batch::default();
    let mut names: HashMap<&str, Arc<str>> = HashMap::new();
    for &(topic, partition, offset, epoch, value) in records {
        let start = b.bytes.len();
        b.bytes.extend_from_slice(value.as_bytes());
        b.records.push(Pending {
            topic: Arc::clone(names.entry(topic).or_insert_with(|| Arc::from(topic))),
            partition,
            offset,
            epoch,
            key: None,
            value: start..b.bytes.len(),
            decode_error: None,
        });
    }
    decode(&mut b, None);
    b
}

fn metrics() -> Metrics {
    Metrics::new().unwrap_or_else(|e| panic!("metrics: {e}"))
}

async fn run_flush(
    fx: &Recorder,
    sink: &mut MemorySink,
    b: &mut Batch,
) -> Result<(), RuntimeError> {
    flush(fx, &metrics(), sink, b, &CancellationToken::new()).await
}

#[tokio::test]
async fn offsets_are_stored_only_after_verdicts_and_dead_letter_acks() {
    let l = Log::default();
    let (e1, e2, e4) = (envelope(1), envelope(2), envelope(4));
    let mut b = batch(&[
        (0, 10, 1, &e1),
        (0, 11, 1, "{not json"),
        (1, 20, 1, &e2),
        (1, 21, 1, &e4),
    ]);
    let mut sink = MemorySink::new(&l);
    sink.verdict = |offset| {
        if offset == 21 {
            Verdict::Rejected("no".into())
        } else {
            Verdict::Applied
        }
    };
    let fx = Recorder::new(&l, vec![(0, 1), (1, 1)]);
    run_flush(&fx, &mut sink, &mut b)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        entries(&l),
        [
            "write [10, 20, 21]",
            r#"dead-letter ["decode@0:11", "rejected@1:21"]"#,
            "dead-letter acked",
            "store {0: 12, 1: 22}",
            "settled",
        ]
    );
    assert_eq!(sink.applied, [("t".into(), 0, 10), ("t".into(), 1, 20)]);
}

#[tokio::test]
async fn a_dead_letter_write_that_fails_stores_no_offset() {
    let l = Log::default();
    let e1 = envelope(1);
    let mut b = batch(&[(0, 10, 1, &e1), (0, 11, 1, "[]")]);
    let mut sink = MemorySink::new(&l);
    let mut fx = Recorder::new(&l, vec![(0, 1)]);
    fx.dead_letters_fail = true;
    let r = run_flush(&fx, &mut sink, &mut b).await;
    assert!(matches!(r, Err(RuntimeError::DeadLetter(_))), "{r:?}");
    let log = entries(&l);
    assert!(
        log.iter()
            .all(|e| !e.starts_with("store") && e != "settled"),
        "{log:?}"
    );
}

#[tokio::test]
async fn a_sink_failure_or_a_wrong_verdict_count_stores_no_offset() {
    let e1 = envelope(1);
    for fail in [(|| SinkError::Interrupted) as fn() -> SinkError, || {
        SinkError::Definite("credentials".into())
    }] {
        let l = Log::default();
        let mut b = batch(&[(0, 10, 1, &e1)]);
        let mut sink = MemorySink::new(&l);
        sink.fail = Some(fail);
        let fx = Recorder::new(&l, vec![(0, 1)]);
        let r = run_flush(&fx, &mut sink, &mut b).await;
        assert!(matches!(r, Err(RuntimeError::Sink { .. })), "{r:?}");
        assert_eq!(entries(&l), ["write [10]"]);
    }

    // A sink that answers fewer verdicts than events is a bug: stop, store nothing.
    struct Short(Log);
    impl Sink for Short {
        fn name(&self) -> &'static str {
            "short"
        }
        async fn write(
            &mut self,
            _: &mut [Event],
            _: &CancellationToken,
        ) -> Result<Vec<Verdict>, SinkError> {
            log(&self.0, "write".into());
            Ok(vec![Verdict::Applied])
        }
    }
    let l = Log::default();
    let (e2, e3) = (envelope(2), envelope(3));
    let mut b = batch(&[(0, 10, 1, &e2), (0, 11, 1, &e3)]);
    let fx = Recorder::new(&l, vec![(0, 1)]);
    let r = flush(
        &fx,
        &metrics(),
        &mut Short(Arc::clone(&l)),
        &mut b,
        &CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(&r, Err(RuntimeError::Sink { error: SinkError::Definite(m), .. }) if m.contains("verdicts")),
        "{r:?}"
    );
    assert_eq!(entries(&l), ["write"]);
}

#[tokio::test]
async fn events_fetched_under_a_revoked_assignment_are_dropped_before_the_sink() {
    let l = Log::default();
    let (e1, e2, e3) = (envelope(1), envelope(2), envelope(3));
    // Partition 0 was revoked and assigned again (epoch 1 → 2); partition 2 is gone.
    let mut b = batch(&[
        (0, 10, 1, &e1),
        (1, 20, 1, &e2),
        (2, 30, 1, "{not json"),
        (2, 31, 1, &e3),
    ]);
    let mut sink = MemorySink::new(&l);
    let fx = Recorder::new(&l, vec![(0, 2), (1, 1)]);
    run_flush(&fx, &mut sink, &mut b)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(entries(&l), ["write [20]", "store {1: 21}", "settled"]);
    assert_eq!(sink.applied, [("t".into(), 1, 20)]);
}

#[tokio::test]
async fn a_batch_wholly_revoked_touches_neither_sink_nor_offsets() {
    let l = Log::default();
    let e1 = envelope(1);
    let mut b = batch(&[(0, 10, 1, &e1)]);
    let mut sink = MemorySink::new(&l);
    let fx = Recorder::new(&l, vec![]);
    run_flush(&fx, &mut sink, &mut b)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(entries(&l).is_empty(), "{:?}", entries(&l));
}

#[tokio::test]
async fn offsets_epochs_and_dead_letters_are_per_topic_partition() {
    let l = Log::default();
    let (e1, e2, e3, e4) = (envelope(1), envelope(2), envelope(3), envelope(4));
    // Partition 0 of two topics, read interleaved; a.x's partition 0 was revoked and assigned
    // again (epoch 1 → 2) while a.y's stayed.
    let mut b = batch_of(&[
        ("a.x", 0, 10, 1, &e1),
        ("a.y", 0, 10, 1, &e2),
        ("a.y", 0, 11, 1, "{not json"),
        ("a.y", 1, 5, 1, &e3),
        ("a.x", 0, 11, 1, &e4),
    ]);
    let mut sink = MemorySink::new(&l);
    let mut fx = Recorder::new(&l, vec![]);
    fx.other_epochs = vec![("a.x", 0, 2), ("a.y", 0, 1), ("a.y", 1, 1)];
    run_flush(&fx, &mut sink, &mut b)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        entries(&l),
        [
            "write [10, 5]",
            r#"dead-letter ["decode@a.y/0:11"]"#,
            "dead-letter acked",
            "store {a.y/0: 12, a.y/1: 6}",
            "settled",
        ]
    );
    assert_eq!(
        sink.applied,
        [("a.y".into(), 0, 10), ("a.y".into(), 1, 5)],
        "events know their topic"
    );
    // The same batch with both topics assigned stores both, each its own offset.
    let l = Log::default();
    let mut b = batch_of(&[("a.x", 0, 10, 1, &e1), ("a.y", 0, 3, 1, &e2)]);
    let mut sink = MemorySink::new(&l);
    let mut fx = Recorder::new(&l, vec![]);
    fx.other_epochs = vec![("a.x", 0, 1), ("a.y", 0, 1)];
    run_flush(&fx, &mut sink, &mut b)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        entries(&l),
        ["write [10, 3]", "store {a.x/0: 11, a.y/0: 4}", "settled"]
    );
}

#[tokio::test]
async fn no_offset_is_stored_past_the_sinks_backlog_and_it_is_stored_once_the_backlog_empties() {
    let l = Log::default();
    let (e1, e2, e3) = (envelope(1), envelope(2), envelope(3));
    let mut b = batch(&[(0, 10, 1, &e1), (0, 11, 1, &e2), (1, 20, 1, &e3)]);
    let fx = Recorder::new(&l, vec![(0, 1), (1, 1)]);
    let mut sink = MemorySink::new(&l);
    // The sink still owes partition 0's offset 11.
    sink.backlog.oldest.insert((Arc::from("t"), 0), 11);
    run_flush(&fx, &mut sink, &mut b).await.expect("flush");
    assert!(
        entries(&l).contains(&"store {0: 11, 1: 21}".to_string()),
        "{:?}",
        entries(&l)
    );
    let mut progress = Progress::default();
    progress.record(&b.records);
    progress.restore(&fx, &sink.backlog);
    assert_eq!(
        entries(&l).last().map(String::as_str),
        Some("store {0: 11, 1: 21}")
    );
    // Delivered: the next look stores what it held back, then nothing more.
    sink.backlog = Backlog::default();
    progress.restore(&fx, &sink.backlog);
    assert_eq!(
        entries(&l).last().map(String::as_str),
        Some("store {0: 12, 1: 21}")
    );
    let n = entries(&l).len();
    progress.restore(&fx, &sink.backlog);
    assert_eq!(entries(&l).len(), n, "nothing owed, nothing stored again");
}

/// The partitions of a list, sorted.
fn listed(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut v: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    v.sort_unstable();
    v
}

#[test]
fn a_pause_librdkafka_keeps_across_a_revoke_is_resumed_when_the_partition_comes_back() {
    let t: Arc<str> = Arc::from("t");
    let mut p = Pauser::default();
    let (pause, resume) = p.decide(&[(Arc::clone(&t), 0, 1), (Arc::clone(&t), 1, 2)], |_| true);
    assert_eq!((listed(&pause), listed(&resume)), (vec![0, 1], vec![]));
    // Partition 1 is revoked while paused: librdkafka keeps its pause, nothing is called.
    let (pause, resume) = p.decide(&[(Arc::clone(&t), 0, 1)], |_| true);
    assert_eq!((listed(&pause), listed(&resume)), (vec![], vec![]));
    // It comes back under a new assignment, still wanted paused: librdkafka still holds it.
    let (pause, resume) = p.decide(&[(Arc::clone(&t), 0, 1), (Arc::clone(&t), 1, 3)], |_| true);
    assert_eq!((listed(&pause), listed(&resume)), (vec![], vec![]));
    assert_eq!(p.held.get(&(Arc::clone(&t), 1)), Some(&3));
    // Revoked again, and back once the stall is over: it is resumed, not forgotten.
    let _ = p.decide(&[(Arc::clone(&t), 0, 1)], |_| true);
    let (pause, resume) = p.decide(&[(Arc::clone(&t), 0, 1), (Arc::clone(&t), 1, 4)], |_| false);
    assert_eq!((listed(&pause), listed(&resume)), (vec![], vec![0, 1]));
    assert!(p.held.is_empty());
}
