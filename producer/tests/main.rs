//! Integration tests of the producer against a real PostgreSQL 15 cluster per test and real
//! Apache Kafka (KRaft, from Maven Central): one broker shared by the tests of this binary
//! (unique topics), or a cluster of the test's own when it stops or kills brokers; and a real
//! Prometheus running deploy/prometheus's config and rules for the dashboards and alerts.

mod support;

mod avro;
mod cli;
mod columns;
mod crash;
mod ddl;
mod exactly_once;
mod failover;
mod incremental;
mod large;
mod memory;
mod observability;
mod outage;
mod secrets;
mod slot;
mod stream;
mod tls;
mod types;
mod wal;
