//! Real Apache Kafka for tests: KRaft nodes (combined broker + controller) started from the
//! Maven Central artifacts by `tests/services/kafka/kafka.sh`, on free loopback ports.
//!
//! ```text
//!   test binary ──spawn──▶ kafka.sh run --node-id N … ──exec──▶ java kafka.Kafka   (one per node)
//!        │                                                           ▲
//!        └──spawn──▶ watchdog (sh): when the test binary is gone ────┘ SIGKILL, data removed
//! ```
//!
//! [`KafkaCluster::shared`] is one single-node cluster per test binary, started on first use;
//! tests keep out of each other's way with unique topic and group names. A test that stops the
//! broker or kills nodes starts a cluster of its own with [`KafkaCluster::start`]. Nothing is
//! stopped explicitly at exit: statics are never dropped, so each cluster has a watchdog process
//! that kills its nodes and removes their data once the test binary has exited.
//!
//! [`KafkaCluster::start_proxied`] puts a [`FaultProxy`] in front of each node (chaos tests):
//! ```text
//!   clients ──▶ proxy of node N (advertised) ──▶ PLAINTEXT listener of node N
//!   node ◀──▶ node: INTERNAL listeners (inter-broker), CONTROLLER listeners (quorum), direct
//!   harness (wait_brokers, leader_of, direct_brokers) ──▶ INTERNAL listeners, direct
//! ```
//!
//! Each node advertises its proxy's port on the client listener, so a client bootstrapped with
//! [`KafkaCluster::brokers`] reaches every broker only through that broker's proxy. A client
//! bootstrapped with [`KafkaCluster::direct_brokers`] is told the INTERNAL addresses and
//! bypasses every fault (what the harness itself uses). Proxies and ports outlive a killed node.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::faultproxy::FaultProxy;

/// The launcher script in this repository.
pub fn launcher() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("services/kafka/kafka.sh")
}

/// Resolves the broker's artifacts once per process (a no-op when cached).
fn install() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let out = Command::new("bash")
            .arg(launcher())
            .arg("install")
            .stdin(Stdio::null())
            .output()
            .expect("run kafka.sh install");
        assert!(
            out.status.success(),
            "kafka.sh install failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

struct Node {
    id: u32,
    port: u16,
    controller_port: u16,
    /// A proxied node: its proxy (advertised to clients) and its direct INTERNAL listener.
    proxied: Option<(FaultProxy, u16)>,
    child: Option<Child>,
}

/// One or three KRaft nodes; killed (and their data removed) on drop.
pub struct KafkaCluster {
    dir: tempfile::TempDir,
    cluster_id: String,
    nodes: Mutex<Vec<Node>>,
    /// Extra `kafka.sh run` arguments of every node (a secured listener).
    run_args: Vec<String>,
    /// librdkafka properties a client needs to talk to the cluster.
    client_properties: Vec<(String, String)>,
    _watchdog: Child,
}

/// A SASL_SSL (SCRAM-SHA-512) client listener: what [`KafkaCluster::start_sasl_ssl`] needs.
pub struct SaslSsl<'a> {
    /// The CA that signs the broker's certificate (clients trust it).
    pub ca: &'a crate::certs::TestCa,
    /// SCRAM user.
    pub username: &'a str,
    /// SCRAM password.
    pub password: &'a str,
}

impl KafkaCluster {
    /// The single-node cluster shared by every test of this binary.
    pub fn shared() -> Arc<KafkaCluster> {
        static SHARED: OnceLock<Arc<KafkaCluster>> = OnceLock::new();
        Arc::clone(SHARED.get_or_init(|| Arc::new(KafkaCluster::start(1))))
    }

    /// Starts `n` nodes (1 or 3) and waits until every broker is registered.
    pub fn start(n: u32) -> Self {
        Self::start_configured(n, None, false)
    }

    /// Starts `n` nodes (1 or 3) whose client listeners are reached through one [`FaultProxy`]
    /// per node ([`Self::proxy`]); inter-broker and controller traffic is direct. Waits until
    /// every broker is registered.
    pub fn start_proxied(n: u32) -> Self {
        Self::start_configured(n, None, true)
    }

    /// One node whose only client listener is SASL_SSL with SCRAM-SHA-512 (TLS with a
    /// certificate from `sec.ca` for 127.0.0.1 and localhost); the controller listens in plain
    /// text on another loopback port. Clients need [`Self::client_properties`].
    pub fn start_sasl_ssl(sec: &SaslSsl<'_>) -> Self {
        Self::start_configured(1, Some(sec), false)
    }

    fn start_configured(n: u32, sec: Option<&SaslSsl<'_>>, proxied: bool) -> Self {
        assert!(n == 1 || n == 3, "a cluster has 1 or 3 nodes");
        install();
        let dir = tempfile::Builder::new()
            .prefix("walrelay-kafka-")
            .tempdir()
            .expect("temp dir");
        let nodes: Vec<Node> = (1..=n)
            .map(|id| {
                let port = crate::free_port();
                let proxied = proxied.then(|| {
                    let proxy =
                        FaultProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                            .unwrap_or_else(|e| panic!("a fault proxy for Kafka node {id}: {e:#}"));
                    (proxy, crate::free_port())
                });
                Node {
                    id,
                    port,
                    controller_port: crate::free_port(),
                    proxied,
                    child: None,
                }
            })
            .collect();
        let watchdog = crate::process::watchdog(&format!(
            "for f in '{dir}'/node-*.pid; do [ -f \"$f\" ] && kill -9 \"$(cat \"$f\")\" 2>/dev/null; done; \
             rm -rf '{dir}'",
            dir = dir.path().display()
        ))
        .expect("start the Kafka watchdog");
        // A cluster id is 16 random bytes in URL-safe base64 without padding, not starting
        // with '-': the storage tool would read it as an option (one id in 64 did).
        let cluster_id = loop {
            use base64::Engine;
            let bytes: [u8; 16] = rand::random();
            let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            if !id.starts_with('-') {
                break id;
            }
        };
        let (run_args, client_properties) = match sec {
            None => (Vec::new(), Vec::new()),
            Some(sec) => {
                let (port, cport) = (nodes[0].port, nodes[0].controller_port);
                let internal = crate::free_port();
                let server = sec.ca.server("kafka", &["localhost", "127.0.0.1"]);
                // Kafka's PEM keystore: the private key and the certificate chain in one file.
                let keystore = dir.path().join("keystore.pem");
                let pem = format!(
                    "{}{}",
                    std::fs::read_to_string(&server.key).expect("key"),
                    std::fs::read_to_string(&server.cert).expect("cert")
                );
                std::fs::write(&keystore, pem).expect("keystore");
                let sets = [
                    format!(
                        "listeners=SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport},INTERNAL://127.0.0.1:{internal}"
                    ),
                    format!(
                        "advertised.listeners=SASL_SSL://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal}"
                    ),
                    "listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT".into(),
                    "inter.broker.listener.name=INTERNAL".into(),
                    "sasl.enabled.mechanisms=SCRAM-SHA-512".into(),
                    "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;".into(),
                    "ssl.keystore.type=PEM".into(),
                    format!("ssl.keystore.location={}", keystore.display()),
                ];
                let mut args = Vec::new();
                for s in sets {
                    args.push("--set".to_string());
                    args.push(s);
                }
                args.push("--add-scram".into());
                args.push(format!(
                    "SCRAM-SHA-512=[name={},password={}]",
                    sec.username, sec.password
                ));
                let props = vec![
                    ("security.protocol".to_string(), "SASL_SSL".to_string()),
                    ("sasl.mechanisms".into(), "SCRAM-SHA-512".into()),
                    ("sasl.username".into(), sec.username.to_string()),
                    ("sasl.password".into(), sec.password.to_string()),
                    (
                        "ssl.ca.location".into(),
                        sec.ca.cert_path().display().to_string(),
                    ),
                ];
                (args, props)
            }
        };
        let cluster = Self {
            dir,
            cluster_id,
            nodes: Mutex::new(nodes),
            run_args,
            client_properties,
            _watchdog: watchdog,
        };
        for id in 1..=n {
            cluster.spawn_node(id);
        }
        cluster.wait_brokers(n as usize, Duration::from_secs(120));
        cluster
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Node>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// CPU time (user + system) the running nodes have used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        self.lock()
            .iter()
            .filter_map(|n| n.child.as_ref())
            .filter_map(|c| crate::process::cpu_seconds_of(c.id()))
            .sum()
    }

    /// Bootstrap servers of every node (of a proxied cluster: the proxies).
    pub fn brokers(&self) -> String {
        self.bootstrap(|n| n.proxied.as_ref().map_or(n.port, |(p, _)| p.port()))
    }

    /// Bootstrap servers that bypass the proxies of a proxied cluster (each node's INTERNAL
    /// listener, which advertises itself): for a harness that must see the cluster whatever
    /// the faults. The same as [`Self::brokers`] for a cluster without proxies.
    pub fn direct_brokers(&self) -> String {
        self.bootstrap(|n| n.proxied.as_ref().map_or(n.port, |(_, internal)| *internal))
    }

    fn bootstrap(&self, port: impl Fn(&Node) -> u16) -> String {
        let ports: Vec<String> = self
            .lock()
            .iter()
            .map(|n| format!("127.0.0.1:{}", port(n)))
            .collect();
        ports.join(",")
    }

    /// The fault proxy in front of node `id`, when the cluster was started with
    /// [`Self::start_proxied`].
    pub fn proxy(&self, id: u32) -> Option<FaultProxy> {
        self.lock()
            .iter()
            .find(|n| n.id == id)
            .and_then(|n| n.proxied.as_ref().map(|(p, _)| p.clone()))
    }

    /// Every node's fault proxy, by node id (empty without proxies).
    pub fn proxies(&self) -> Vec<(u32, FaultProxy)> {
        self.lock()
            .iter()
            .filter_map(|n| n.proxied.as_ref().map(|(p, _)| (n.id, p.clone())))
            .collect()
    }

    /// Node ids.
    pub fn node_ids(&self) -> Vec<u32> {
        self.lock().iter().map(|n| n.id).collect()
    }

    fn voters(nodes: &[Node]) -> String {
        nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn_node(&self, id: u32) {
        let mut nodes = self.lock();
        let voters = Self::voters(&nodes);
        let node = nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no Kafka node {id}"));
        if node.child.is_some() {
            return;
        }
        let node_dir = self.dir.path().join(format!("node-{id}"));
        std::fs::create_dir_all(&node_dir).expect("node dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{id}.log")))
            .expect("node log");
        let child = Command::new("bash")
            .arg(launcher())
            .arg("run")
            .args(["--node-id", &id.to_string()])
            .arg("--dir")
            .arg(&node_dir)
            .args(["--port", &node.port.to_string()])
            .args(["--controller-port", &node.controller_port.to_string()])
            .args(["--voters", &voters])
            .args(["--cluster-id", &self.cluster_id])
            .args(&self.run_args)
            .args(Self::proxied_args(node))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("node log"))
            .stderr(log)
            .spawn()
            .expect("start a Kafka node");
        // `kafka.sh run` execs the JVM, so this is the broker's own process id.
        std::fs::write(
            self.dir.path().join(format!("node-{id}.pid")),
            child.id().to_string(),
        )
        .expect("pid file");
        node.child = Some(child);
    }

    /// `kafka.sh run` settings of a proxied node: the client listener advertised at its proxy's
    /// port, and a direct INTERNAL listener for inter-broker traffic and the harness.
    fn proxied_args(node: &Node) -> Vec<String> {
        let Some((proxy, internal)) = &node.proxied else {
            return Vec::new();
        };
        let (port, cport, advertised) = (node.port, node.controller_port, proxy.port());
        [
            format!(
                "listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport},INTERNAL://127.0.0.1:{internal}"
            ),
            format!(
                "advertised.listeners=PLAINTEXT://127.0.0.1:{advertised},INTERNAL://127.0.0.1:{internal}"
            ),
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT"
                .to_string(),
            "inter.broker.listener.name=INTERNAL".to_string(),
        ]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
    }

    /// [`KafkaCluster::client_properties`] as command-line options: `--kafka-property KEY=VALUE`
    /// for each, as every walrelay binary takes them.
    pub fn property_args(&self) -> Vec<String> {
        self.client_properties()
            .into_iter()
            .flat_map(|p| ["--kafka-property".to_string(), p])
            .collect()
    }

    /// The options a `walrelay-producer` run against this cluster starts with: the source, the
    /// brokers (and [`KafkaCluster::property_args`]), the topic, and a slot that also names the
    /// publication.
    pub fn producer_args(&self, postgres_url: &str, topic: &str, slot: &str) -> Vec<String> {
        let mut args: Vec<String> = [
            "--postgres-url",
            postgres_url,
            "--kafka-brokers",
            &self.brokers(),
            "--topic",
            topic,
            "--slot",
            slot,
            "--publication",
            slot,
        ]
        .map(String::from)
        .to_vec();
        args.extend(self.property_args());
        args
    }

    /// librdkafka properties a client of this cluster needs beyond `bootstrap.servers` (none
    /// for a plain cluster), as `KEY=VALUE` for `--kafka-property`.
    pub fn client_properties(&self) -> Vec<String> {
        self.client_properties
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }

    /// A client configuration for this cluster.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers());
        for (k, v) in &self.client_properties {
            c.set(k, v);
        }
        c
    }

    /// A client configuration that bypasses the proxies of a proxied cluster
    /// ([`Self::direct_brokers`]): for observers that must see the cluster whatever the faults.
    pub fn direct_client_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        c.set("bootstrap.servers", self.direct_brokers());
        c
    }

    /// Process ids of the running nodes' JVMs (`kafka.sh run` execs the JVM).
    pub fn node_pids(&self) -> Vec<u32> {
        self.lock()
            .iter()
            .filter_map(|n| n.child.as_ref().map(Child::id))
            .collect()
    }

    /// Waits until `n` brokers are in the cluster's metadata.
    pub fn wait_brokers(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        // Directly, so that a fault of the proxies does not hide the brokers.
        let consumer: BaseConsumer = self
            .client_config()
            .set("bootstrap.servers", self.direct_brokers())
            .set("log_level", "0")
            .create()
            .expect("metadata client");
        loop {
            if let Ok(md) = consumer.fetch_metadata(None, Duration::from_secs(2))
                && md.brokers().len() >= n
            {
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "Kafka did not come up with {n} brokers within {timeout:?}:\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn assert_running(&self) {
        let mut exited = None;
        for n in self.lock().iter_mut() {
            if let Some(c) = n.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                n.child = None;
                exited = Some((n.id, status));
                break;
            }
        }
        if let Some((id, status)) = exited {
            panic!("Kafka node {id} exited ({status}):\n{}", self.log_tail(60));
        }
    }

    /// SIGKILLs node `id` (its data stays).
    pub fn kill_node(&self, id: u32) {
        let mut nodes = self.lock();
        if let Some(n) = nodes.iter_mut().find(|n| n.id == id)
            && let Some(mut c) = n.child.take()
        {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_file(self.dir.path().join(format!("node-{id}.pid")));
        }
    }

    /// Starts node `id` again on its ports and data.
    pub fn restart_node(&self, id: u32) {
        self.spawn_node(id);
    }

    /// Kills every node (data stays): the broker is unreachable until [`Self::restart`].
    pub fn stop(&self) {
        let ids: Vec<u32> = self.lock().iter().map(|n| n.id).collect();
        for id in ids {
            self.kill_node(id);
        }
    }

    /// Starts every stopped node and waits for all brokers.
    pub fn restart(&self) {
        let ids: Vec<u32> = self.lock().iter().map(|n| n.id).collect();
        for &id in &ids {
            self.spawn_node(id);
        }
        self.wait_brokers(ids.len(), Duration::from_secs(120));
    }

    /// The node leading `partition` of `topic`, if it has a leader now.
    pub fn leader_of(&self, topic: &str, partition: i32) -> Option<u32> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.direct_brokers())
            .set("log_level", "0")
            .create()
            .ok()?;
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()?;
        let t = md.topics().first()?;
        let p = t.partitions().iter().find(|p| p.id() == partition)?;
        (p.leader() >= 0).then_some(p.leader() as u32)
    }

    /// In-sync replicas of `partition` of `topic`.
    pub fn isr_of(&self, topic: &str, partition: i32) -> Vec<i32> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.direct_brokers())
            .set("log_level", "0")
            .create()
            .expect("metadata client");
        consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .and_then(|md| {
                md.topics().first().and_then(|t| {
                    t.partitions()
                        .iter()
                        .find(|p| p.id() == partition)
                        .map(|p| p.isr().to_vec())
                })
            })
            .unwrap_or_default()
    }

    /// The last `lines` lines of every node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        let ids: Vec<u32> = self.lock().iter().map(|n| n.id).collect();
        for id in ids {
            let text = std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log")))
                .unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- kafka node {id} ---\n"));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
