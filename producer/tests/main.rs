//! Integration tests of the producer against a real PostgreSQL 15 cluster and a real
//! Kafka-protocol broker (tansu, sqlite storage), each started by the test itself.

mod support;

mod cli;
mod crash;
mod ddl;
mod memory;
mod outage;
mod slot;
mod stream;
mod types;
mod wal;
