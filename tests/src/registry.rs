//! A real schema registry (Apicurio Registry, Confluent-compatible API) for tests, started from
//! Maven Central artifacts by `tests/services/registry/registry.sh`, and the independent readers
//! of walrelay's Avro and Debezium topics: Python's confluent-kafka `AvroDeserializer` with
//! fastavro (`tests/services/python/`) and Apache Flink's `debezium-json` and
//! `debezium-avro-confluent` formats (`tests/services/flink/`).
//!
//! [`SchemaRegistry::shared`] is one registry per test binary (tests use unique topics, so
//! unique subjects). Like Kafka's, it has a watchdog that kills it once the test binary exits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

fn service(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("services")
        .join(path)
}

fn install(script: &str) {
    let out = Command::new("bash")
        .arg(service(script))
        .arg("install")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {script} install: {e}"));
    assert!(
        out.status.success(),
        "{script} install failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running Apicurio Registry.
pub struct SchemaRegistry {
    _dir: tempfile::TempDir,
    port: u16,
    child: Mutex<Child>,
    _watchdog: Child,
}

impl SchemaRegistry {
    /// The registry shared by every test of this binary.
    pub fn shared() -> Arc<SchemaRegistry> {
        static SHARED: OnceLock<Arc<SchemaRegistry>> = OnceLock::new();
        Arc::clone(SHARED.get_or_init(|| Arc::new(SchemaRegistry::start())))
    }

    /// Starts a registry (compatibility BACKWARD, as Confluent's default) and waits until it
    /// answers.
    pub fn start() -> Self {
        static INSTALLED: OnceLock<()> = OnceLock::new();
        INSTALLED.get_or_init(|| install("registry/registry.sh"));
        let dir = tempfile::Builder::new()
            .prefix("walrelay-registry-")
            .tempdir()
            .expect("temp dir");
        let port = crate::free_port();
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("bash")
            .arg(service("registry/registry.sh"))
            .args(["run", "--port", &port.to_string(), "--dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the registry");
        let watchdog = crate::process::watchdog(&format!(
            "kill -CONT {pid} 2>/dev/null; kill -9 {pid} 2>/dev/null",
            pid = child.id()
        ))
        .expect("start the registry watchdog");
        let r = Self {
            _dir: dir,
            port,
            child: Mutex::new(child),
            _watchdog: watchdog,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if r.get("/subjects").is_some_and(|(s, _)| s == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the registry did not start:\n{}",
                r.log_tail()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        r
    }

    /// The Confluent-compatible base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/apis/ccompat/v7", self.port)
    }

    /// `GET url + path`: status and body, or `None` when it does not answer.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("{}{path}", self.url());
        let out = Command::new("curl")
            .args(["-s", "-m", "5", "-w", "\n%{http_code}", &url])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n')?;
        Some((code.trim().parse().ok()?, body.to_string()))
    }

    /// The versions registered under `subject`.
    pub fn versions(&self, subject: &str) -> Vec<u64> {
        self.get(&format!("/subjects/{subject}/versions"))
            .filter(|(s, _)| *s == 200)
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or_default()
    }

    /// Every subject.
    pub fn subjects(&self) -> Vec<String> {
        self.get("/subjects")
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or_default()
    }

    /// Freezes the registry (SIGSTOP): connections open but nothing answers, as a hung
    /// server. Its schemas are kept (an in-memory registry restarted would lose them).
    pub fn freeze(&self) {
        let pid = self.child.lock().unwrap_or_else(|p| p.into_inner()).id();
        // The launcher execs java, so the child is the JVM.
        let _ = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status();
    }

    /// Resumes a frozen registry.
    pub fn thaw(&self) {
        let pid = self.child.lock().unwrap_or_else(|p| p.into_inner()).id();
        let _ = Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status();
    }

    fn log_tail(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("registry.log"))
            .map(|l| l.lines().rev().take(30).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

/// Every record of `topics` decoded by Python's confluent-kafka `AvroDeserializer` and by
/// fastavro (which must agree), one JSON object per record in (topic, partition, offset)
/// order, in the canonical form of `tests/services/python/README.md`.
pub fn python_decode(brokers: &str, registry: &str, topics: &[&str]) -> Vec<serde_json::Value> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| install("python/python.sh"));
    let mut cmd = Command::new("bash");
    cmd.arg(service("python/python.sh")).args([
        "run",
        "--bootstrap",
        brokers,
        "--registry-url",
        registry,
    ]);
    for t in topics {
        cmd.args(["--topic", t]);
    }
    let out = cmd.output().expect("run decode.py");
    assert!(
        out.status.success(),
        "decode.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let last = lines.pop().expect("a last line");
    assert_eq!(
        last.get("records").and_then(serde_json::Value::as_u64),
        Some(lines.len() as u64),
        "decode.py's count"
    );
    lines
}

/// The table Apache Flink materializes from `topic` read as a changelog with `format`
/// (`debezium-json`, `debezium-avro-confluent`), one JSON object per row sorted by the key.
pub fn flink_table(
    brokers: &str,
    topic: &str,
    format: &str,
    registry: Option<&str>,
    columns: &str,
    key: &str,
    options: &[&str],
) -> Result<Vec<serde_json::Value>, String> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| install("flink/flink.sh"));
    let mut cmd = Command::new("bash");
    cmd.arg(service("flink/flink.sh")).args([
        "run",
        "--bootstrap",
        brokers,
        "--topic",
        topic,
        "--format",
        format,
        "--columns",
        columns,
        "--primary-key",
        key,
        "--timeout-seconds",
        "180",
    ]);
    if let Some(r) = registry {
        cmd.args(["--registry-url", r]);
    }
    for o in options {
        cmd.args(["--option", o]);
    }
    let out = cmd.output().map_err(|e| format!("run flink.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "flink exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let last = rows.pop().ok_or("no output")?;
    if last.get("rows").and_then(serde_json::Value::as_u64) != Some(rows.len() as u64) {
        return Err(format!(
            "row count line {last} does not match {}",
            rows.len()
        ));
    }
    Ok(rows)
}
