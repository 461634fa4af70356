//! Hosts an in-process librdkafka mock cluster and prints its bootstrap servers, for tests and
//! benchmarks that need a broker that is never the bottleneck. Runs until killed.

fn main() -> anyhow::Result<()> {
    // Arguments: topics to create, as NAME or NAME:PARTITIONS (the mock has no CreateTopics).
    let cluster = rdkafka::mocking::MockCluster::new(1)?;
    for arg in std::env::args().skip(1) {
        let (name, partitions) = match arg.split_once(':') {
            Some((n, p)) => (n.to_string(), p.parse()?),
            None => (arg.clone(), 1),
        };
        cluster.create_topic(&name, partitions, 1)?;
    }
    println!("{}", cluster.bootstrap_servers());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        let _ = cluster.bootstrap_servers();
    }
}
