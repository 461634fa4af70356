//! A Kafka-compatible broker for tests: tansu with sqlite storage (durable across its own
//! restarts), or the mock-cluster host.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the tansu binary is: `TANSU_BIN`, then `~/.cargo/bin/tansu`, then `PATH`.
pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU_BIN") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = PathBuf::from(home).join(".cargo/bin/tansu");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("tansu")
}

/// A tansu broker on a loopback port; killed on drop.
pub struct Tansu {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Tansu {
    /// Starts a broker with fresh storage.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("walrelay-tansu-")
            .tempdir()
            .expect("temp dir");
        let mut t = Self {
            dir,
            port: crate::free_port(),
            child: None,
        };
        t.restart();
        t
    }

    /// `host:port` for clients.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGKILL); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .expect("log");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu_bin())
            .arg("broker")
            .arg("--listener-url")
            .arg(&url)
            .arg("--advertised-listener-url")
            .arg(&url)
            .arg("--storage-engine")
            // Four slashes: tansu reads `sqlite:///tmp/x` as the relative path `tmp/x`.
            .arg(format!("sqlite:///{}/tansu.db", self.dir.path().display()))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start tansu ({}): {e}; run .ci/run or `cargo install tansu --locked --features libsql`", tansu_bin().display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The broker's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

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
