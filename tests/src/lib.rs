//! Test support for walrelay: a throwaway Postgres cluster, real Apache Kafka and OpenSearch
//! nodes, a real Prometheus, a fault proxy, a topic reader and the table state rebuilt from a
//! topic.
//!
//! # Layout
//!
//! - [`postgres`]: `initdb` in a temporary folder, a free port, `wal_level=logical`; stopped on
//!   drop. As root, the server runs as the `postgres` user (initdb refuses root).
//! - [`kafka`]: Apache Kafka (KRaft) from Maven Central: one shared single-node cluster per test
//!   binary, or a cluster of one or three nodes of a test's own (kill, restart, find leaders),
//!   whose clients may reach each node only through a [`faultproxy::FaultProxy`].
//! - [`opensearch`]: an OpenSearch node from Maven Central shared per test binary, and
//!   [`opensearch::Indexes`], one test's view of its indexes under a unique prefix.
//! - [`broker`]: the librdkafka mock-cluster host, for benchmarks that measure the producer
//!   without a broker's own cost.
//! - [`registry`]: a real schema registry (Apicurio, Confluent API) shared per test binary, and
//!   the independent readers of Avro and Debezium topics: Python (confluent-kafka, fastavro)
//!   and Apache Flink.
//! - [`topic`]: reads every record of a topic and rebuilds table state from envelopes.
//! - [`certs`]: a throwaway CA issuing server and client certificates (PEM files).
//! - [`faultproxy`]: a TCP proxy on loopback whose faults a test turns on at run time: latency,
//!   a bandwidth limit, cut connections, a blackout (a hung network) until restored, and an HTTP
//!   error mode in which it answers every request 429 or 503 itself (a search node on cue).
//! - [`prometheus`]: a real Prometheus (Debian's binary, `tests/services/prometheus/`) running
//!   the repository's scrape config and alert rules against a test's loopback targets; queries,
//!   alerts and their history, and every query of the Grafana dashboards evaluated.
//! - [`process`]: spawns walrelay binaries with logs in a file; SIGTERM and SIGKILL.
//! - [`metrics`]: a walrelay process's `/metrics` scraped, samples read by family name.
//! - [`chaos`]: the chaos suite (issue 19): workload with a ledger, seeded faults, an
//!   independent checker and the report; the binary `walrelay-chaos` runs it.
//! - [`search`]: an Elasticsearch/OpenSearch stand-in over HTTP, only for what a real server
//!   cannot do on cue: failing bulk items, 429s and 5xx answers, and a discard mode for the
//!   consumer benchmark (slow answers come from the real node behind a [`faultproxy`]).

pub mod broker;
pub mod certs;
pub mod chaos;
pub mod faultproxy;
pub mod kafka;
pub mod metrics;
pub mod opensearch;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod registry;
pub mod search;
pub mod topic;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A name unique within this machine, for databases, slots and topics.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 100_000
    )
}

/// A walrelay binary built next to the running one (`cargo build --workspace --bins` puts them
/// together), or an error saying how to build it.
pub fn sibling_bin(name: &str) -> Result<std::path::PathBuf, String> {
    let p = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing: build with `cargo build --release --workspace --bins`",
            p.display()
        ))
    }
}
