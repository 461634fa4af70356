//! The librdkafka mock-cluster host, for benchmarks (tests run against real Kafka: see
//! [`crate::kafka`]).

use std::process::{Child, Command, Stdio};

/// The mock-cluster host process (`walrelay-mock-broker`); killed on drop.
pub struct MockBroker {
    child: Child,
    brokers: String,
}

impl MockBroker {
    /// Starts `bin` with `topics` (`NAME:PARTITIONS`) created, and reads its bootstrap servers.
    pub fn start(bin: &std::path::Path, topics: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(bin)
            .args(topics)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start walrelay-mock-broker");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("bootstrap servers");
        Self {
            child,
            brokers: line.trim().to_string(),
        }
    }

    /// Bootstrap servers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
