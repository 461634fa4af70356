//! Fault kinds and the schedule: a pure function of the seed and the profile.
//!
//! The schedule is a list of `(offset from the start, kind, parameters)` drawn from one seeded
//! generator, so a seed names one sequence of faults; what a fault hits at that moment (the
//! leader of a partition, the state of a process) depends on the run. Each kind has a rate per
//! hour, and every kind is scheduled at least once, however short the run. The network kinds
//! act on the run's links ([`Link`]): each link is one or more TCP fault proxies
//! (`tests/src/faultproxy.rs`) between walrelay's processes and a server.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A consumer process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Consumer {
    /// `walrelay-consumer index` into OpenSearch.
    Index,
    /// `walrelay-consumer notify` to the receiver.
    Notify,
    /// `walrelay-consumer stream` with the WebSocket client.
    Stream,
    /// `walrelay-consumer replicate` into the target Postgres.
    Replicate,
}

impl Consumer {
    /// Every consumer.
    pub const ALL: [Consumer; 4] = [
        Consumer::Index,
        Consumer::Notify,
        Consumer::Stream,
        Consumer::Replicate,
    ];

    /// The command's name.
    pub fn name(self) -> &'static str {
        match self {
            Consumer::Index => "index",
            Consumer::Notify => "notify",
            Consumer::Stream => "stream",
            Consumer::Replicate => "replicate",
        }
    }
}

/// A network path the fault proxies stand on: every walrelay process reaches its servers
/// through them; the harness (workload, observers) goes direct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Link {
    /// Every client to the three brokers (one proxy per broker).
    Kafka,
    /// The producers to the source Postgres (replication and control sessions).
    Source,
    /// The indexer to OpenSearch.
    Search,
    /// The replicator to the target Postgres.
    Target,
}

impl Link {
    /// Every link.
    pub const ALL: [Link; 4] = [Link::Kafka, Link::Source, Link::Search, Link::Target];

    /// For reports.
    pub fn name(self) -> &'static str {
        match self {
            Link::Kafka => "kafka",
            Link::Source => "source-postgres",
            Link::Search => "opensearch",
            Link::Target => "target-postgres",
        }
    }
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum FaultKind {
    /// SIGKILL a producer, restart it after `down`.
    ProducerKill,
    /// SIGTERM a producer (it drains and exits), restart it after `down`.
    ProducerTerm,
    /// SIGSTOP a producer past `wal_sender_timeout` (Postgres drops its connection), then
    /// SIGCONT.
    ProducerFreeze,
    /// SIGKILL a consumer, restart it after `down`.
    ConsumerKill(Consumer),
    /// SIGTERM a consumer, restart it after `down`.
    ConsumerTerm(Consumer),
    /// SIGKILL the Kafka node leading a partition of the topic, restart it after `down`.
    KafkaLeaderKill,
    /// SIGSTOP every Kafka node for `down` (a stall: nothing is acknowledged), SIGKILL the
    /// at-least-once producer in the middle of it, SIGCONT, restart the producer. This is where
    /// a producer that confirms before Kafka's ack loses data.
    KafkaPauseProducerKill,
    /// `pg_ctl restart -m immediate` of the source.
    PostgresRestart,
    /// Latency (`param` ms each way) on link `target` for `down`.
    NetLatency,
    /// A bandwidth limit (`param` bytes/s each way) on link `target` for `down`.
    NetBandwidth,
    /// Every connection of link `target` reset mid-stream.
    NetCut,
    /// Kafka unreachable (a hung network: connections cut, new ones held) for 60 s.
    KafkaBlackout,
    /// The indexer's link to OpenSearch hung for `down` (90 s): the indexer stalls, its lag
    /// grows, it reports itself not ready.
    SearchStall,
    /// OpenSearch answers every request with HTTP `param` (429 or 503) for `down`.
    SearchErrors,
    /// Not scheduled: the phase after the checks ([`super::hygiene::long_outage`]) in which
    /// Kafka stays unreachable while WAL is written, until the slots near
    /// `max_slot_wal_keep_size`.
    KafkaLongOutage,
}

impl FaultKind {
    /// A short label for reports: `producer_kill`, `index_kill`, …
    pub fn label(self) -> String {
        match self {
            FaultKind::ProducerKill => "producer_kill".into(),
            FaultKind::ProducerTerm => "producer_term".into(),
            FaultKind::ProducerFreeze => "producer_freeze".into(),
            FaultKind::ConsumerKill(c) => format!("{}_kill", c.name()),
            FaultKind::ConsumerTerm(c) => format!("{}_term", c.name()),
            FaultKind::KafkaLeaderKill => "kafka_leader_kill".into(),
            FaultKind::KafkaPauseProducerKill => "kafka_pause_producer_kill".into(),
            FaultKind::PostgresRestart => "postgres_restart".into(),
            FaultKind::NetLatency => "net_latency".into(),
            FaultKind::NetBandwidth => "net_bandwidth".into(),
            FaultKind::NetCut => "net_cut".into(),
            FaultKind::KafkaBlackout => "kafka_blackout".into(),
            FaultKind::SearchStall => "search_stall".into(),
            FaultKind::SearchErrors => "search_errors".into(),
            FaultKind::KafkaLongOutage => "kafka_long_outage".into(),
        }
    }

    /// Faults per hour of the full profile (a margin above the minimums: a fault whose
    /// target is down waits, and one still waiting when the window ends is dropped), and the
    /// range of `down` in ms.
    fn rate(self) -> (f64, (u64, u64)) {
        match self {
            FaultKind::ProducerKill => (230.0, (200, 3000)),
            FaultKind::ProducerTerm => (40.0, (200, 2000)),
            FaultKind::ProducerFreeze => (8.0, (0, 0)),
            FaultKind::ConsumerKill(_) => (60.0, (300, 5000)),
            FaultKind::ConsumerTerm(_) => (18.0, (300, 3000)),
            FaultKind::KafkaLeaderKill => (14.0, (5000, 15000)),
            FaultKind::KafkaPauseProducerKill => (6.0, (6000, 12000)),
            FaultKind::PostgresRestart => (26.0, (0, 0)),
            FaultKind::NetLatency => (30.0, (10_000, 40_000)),
            FaultKind::NetBandwidth => (15.0, (10_000, 30_000)),
            FaultKind::NetCut => (40.0, (0, 0)),
            FaultKind::KafkaBlackout => (4.0, (60_000, 60_000)),
            FaultKind::SearchStall => (3.0, (90_000, 90_000)),
            FaultKind::SearchErrors => (6.0, (20_000, 60_000)),
            FaultKind::KafkaLongOutage => (0.0, (0, 0)),
        }
    }

    /// Every scheduled kind, the network ones included ([`FaultKind::KafkaLongOutage`] is a
    /// phase of its own).
    pub fn all() -> Vec<FaultKind> {
        let mut v = vec![
            FaultKind::ProducerKill,
            FaultKind::ProducerTerm,
            FaultKind::ProducerFreeze,
        ];
        for c in Consumer::ALL {
            v.push(FaultKind::ConsumerKill(c));
            v.push(FaultKind::ConsumerTerm(c));
        }
        v.extend([
            FaultKind::KafkaLeaderKill,
            FaultKind::KafkaPauseProducerKill,
            FaultKind::PostgresRestart,
            FaultKind::NetLatency,
            FaultKind::NetBandwidth,
            FaultKind::NetCut,
            FaultKind::KafkaBlackout,
            FaultKind::SearchStall,
            FaultKind::SearchErrors,
        ]);
        v
    }
}

/// One planned fault.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Planned {
    /// From the start of the fault window, ms.
    pub at_ms: u64,
    /// Kind.
    pub kind: FaultKind,
    /// Which producer (index into the run's producers) for producer faults; the partition for
    /// a leader kill; the link (index into [`Link::ALL`]) for latency, bandwidth and cuts.
    pub target: usize,
    /// How long the target stays down, ms (kinds without a down time: 0).
    pub down_ms: u64,
    /// Latency in ms, bytes per second, or an HTTP status, by kind (else 0).
    pub param: u64,
}

/// The schedule's shape.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// Length of the fault window.
    pub window: Duration,
    /// Rates are multiplied by this (1.0: the full profile's rates).
    pub intensity: f64,
    /// Producers in the run.
    pub producers: usize,
}

/// The schedule: every kind at its rate × intensity over the window (at least one of each
/// kind whose scaled count is under one, so a short run still exercises it), at uniformly
/// drawn moments, sorted. A pure function of its arguments.
pub fn schedule(seed: u64, profile: Profile) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed);
    let hours = profile.window.as_secs_f64() / 3600.0;
    let window_ms = profile.window.as_millis() as u64;
    // Nothing in the first 10 s (the consumers settle) and the last 5 s.
    let (lo, hi) = (
        10_000.min(window_ms / 4),
        window_ms.saturating_sub(5_000).max(1),
    );
    let mut out = Vec::new();
    for kind in FaultKind::all() {
        let (per_hour, (dlo, dhi)) = kind.rate();
        if per_hour == 0.0 {
            continue;
        }
        let n = ((per_hour * hours * profile.intensity).round() as u64).max(1);
        for _ in 0..n {
            let at_ms = rng.gen_range(lo..hi.max(lo + 1));
            let target = match kind {
                FaultKind::ProducerKill | FaultKind::ProducerTerm | FaultKind::ProducerFreeze => {
                    rng.gen_range(0..profile.producers.max(1))
                }
                FaultKind::KafkaLeaderKill => rng.gen_range(0..super::PARTITIONS as usize),
                FaultKind::NetLatency | FaultKind::NetBandwidth | FaultKind::NetCut => {
                    rng.gen_range(0..Link::ALL.len())
                }
                _ => 0,
            };
            let down_ms = if dhi > dlo {
                rng.gen_range(dlo..=dhi)
            } else {
                dlo
            };
            let param = match kind {
                FaultKind::NetLatency => rng.gen_range(50..=400),
                // 32–256 KiB/s: a slow link, not a dead one.
                FaultKind::NetBandwidth => rng.gen_range(32..=256) * 1024,
                FaultKind::SearchErrors => {
                    if rng.gen_bool(0.5) {
                        429
                    } else {
                        503
                    }
                }
                _ => 0,
            };
            out.push(Planned {
                at_ms,
                kind,
                target,
                down_ms,
                param,
            });
        }
    }
    out.sort_by_key(|p| (p.at_ms, p.kind));
    out
}

/// One fault as it happened.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Done {
    /// Kind.
    pub kind: FaultKind,
    /// When it was injected (ms since the epoch).
    pub at_ms: i64,
    /// When its target was restored (ms since the epoch).
    pub restored_ms: i64,
    /// What it hit (a process, a node).
    pub detail: String,
    /// Producer sessions it broke: (producer index, the slot's confirmed position right after
    /// the fault, before the next session), for the unconfirmed-window check of duplicates.
    pub breaks: Vec<(usize, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_names_one_schedule_and_rates_are_met() {
        let p = Profile {
            window: Duration::from_secs(3600),
            intensity: 1.0,
            producers: 2,
        };
        let a = schedule(7, p);
        let b = schedule(7, p);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_ne!(format!("{a:?}"), format!("{:?}", schedule(8, p)));
        let count = |k: FaultKind| a.iter().filter(|f| f.kind == k).count();
        assert!(count(FaultKind::ProducerKill) >= 200);
        for c in Consumer::ALL {
            assert!(count(FaultKind::ConsumerKill(c)) >= 50, "{c:?}");
        }
        assert!(count(FaultKind::KafkaLeaderKill) >= 10);
        assert!(count(FaultKind::PostgresRestart) >= 20);
        assert!(count(FaultKind::KafkaBlackout) >= 1);
        for l in 0..Link::ALL.len() {
            assert!(
                a.iter()
                    .any(|f| f.kind == FaultKind::NetCut && f.target == l),
                "a cut of every link"
            );
        }
        assert!(
            a.iter()
                .filter(|f| f.kind == FaultKind::KafkaBlackout)
                .all(|f| f.down_ms == 60_000)
        );
        let short = schedule(
            7,
            Profile {
                window: Duration::from_secs(300),
                intensity: 0.6,
                producers: 2,
            },
        );
        for k in FaultKind::all() {
            assert!(
                short.iter().any(|f| f.kind == k),
                "{k:?} in the short profile"
            );
        }
        assert!(a.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }
}
