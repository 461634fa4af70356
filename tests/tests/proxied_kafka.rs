//! A three-node Kafka cluster behind fault proxies ([`KafkaCluster::start_proxied`]): clients
//! reach the brokers only through the proxies, a blackout of every proxy stalls a producer and a
//! consumer without losing anything, and a killed and restarted node keeps its ports.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use walrelay_tests::kafka::KafkaCluster;

/// Sends records `range` with acks=all; a task per record counts the deliveries.
fn produce(
    producer: &FutureProducer,
    topic: &str,
    range: std::ops::Range<u32>,
    delivered: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    range
        .map(|i| {
            let key = i.to_string();
            let payload = format!("record {i}");
            let fut = producer
                .send_result(FutureRecord::to(topic).key(&key).payload(&payload))
                .map_err(|(e, _)| e);
            let delivered = Arc::clone(delivered);
            tokio::spawn(async move {
                let fut = fut.unwrap_or_else(|e| panic!("enqueue record {i}: {e}"));
                match fut.await {
                    Ok(Ok(_)) => {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err((e, _))) => panic!("record {i} not delivered: {e}"),
                    Err(_) => panic!("record {i}: the producer went away"),
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_go_through_the_proxies_and_survive_a_blackout_and_a_node_restart() {
    let cluster = KafkaCluster::start_proxied(3);
    let proxies = cluster.proxies();
    assert_eq!(proxies.len(), 3);

    // Metadata asked through the proxies names the proxies, so every later connection uses them.
    let probe: BaseConsumer = cluster.client_config().create().expect("metadata client");
    let md = probe
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata through the proxies");
    let advertised: BTreeSet<i32> = md.brokers().iter().map(|b| b.port()).collect();
    let proxy_ports: BTreeSet<i32> = proxies.iter().map(|(_, p)| i32::from(p.port())).collect();
    assert_eq!(
        advertised, proxy_ports,
        "brokers are advertised at their proxies"
    );
    drop(probe);

    let topic = walrelay_tests::unique("proxied");
    let admin: AdminClient<DefaultClientContext> =
        cluster.client_config().create().expect("admin client");
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(3))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create topic");
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..3).any(|p| cluster.leader_of(&topic, p).is_none()) {
        assert!(Instant::now() < deadline, "partitions without a leader");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A consumer through the proxies, on a thread of its own, recording what it sees.
    let seen = Arc::new(Mutex::new(BTreeSet::<u32>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let consumer: BaseConsumer = cluster
            .client_config()
            .set("group.id", walrelay_tests::unique("proxied"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100))
                    && let Some(k) = m.key().and_then(|k| std::str::from_utf8(k).ok())
                {
                    let k: u32 = k.parse().expect("a numeric key");
                    seen.lock().expect("seen").insert(k);
                }
            }
        })
    };
    let count = |seen: &Mutex<BTreeSet<u32>>| seen.lock().expect("seen").len();

    let producer: FutureProducer = cluster
        .client_config()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "120000")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let delivered = Arc::new(AtomicU64::new(0));
    for t in produce(&producer, &topic, 0..300, &delivered) {
        t.await.expect("delivery");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&seen) < 300 {
        assert!(
            Instant::now() < deadline,
            "consumed {} of 300",
            count(&seen)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Blackout: the network hangs. Nothing is delivered or consumed meanwhile.
    for (_, p) in &proxies {
        p.blackout();
    }
    // The proxies' threads cut what was in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let forwarded_before: u64 = proxies
        .iter()
        .map(|(_, p)| p.stats().bytes_to_upstream)
        .sum();
    let during = produce(&producer, &topic, 300..600, &delivered);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        delivered.load(Ordering::Relaxed),
        300,
        "no delivery while the network hangs"
    );
    assert_eq!(
        count(&seen),
        300,
        "nothing consumed while the network hangs"
    );
    let forwarded_during: u64 = proxies
        .iter()
        .map(|(_, p)| p.stats().bytes_to_upstream)
        .sum();
    assert_eq!(forwarded_before, forwarded_during, "nothing forwarded");
    assert!(
        proxies.iter().any(|(_, p)| p.stats().cuts > 0),
        "the blackout cut the clients' connections"
    );
    let blackout_connections: u64 = proxies.iter().map(|(_, p)| p.stats().active).sum();
    assert!(
        blackout_connections > 0,
        "clients keep connecting during the blackout"
    );

    for (_, p) in &proxies {
        p.restore();
    }
    let until = Instant::now() + Duration::from_secs(90);
    for t in during {
        tokio::time::timeout(until.saturating_duration_since(Instant::now()), t)
            .await
            .expect("delivered after the blackout")
            .expect("delivery");
    }

    // A node killed and restarted comes back behind the same proxy.
    cluster.kill_node(2);
    let after_kill = produce(&producer, &topic, 600..700, &delivered);
    for t in after_kill {
        t.await.expect("delivery with a node down");
    }
    cluster.restart_node(2);
    cluster.wait_brokers(3, Duration::from_secs(120));
    for t in produce(&producer, &topic, 700..800, &delivered) {
        t.await.expect("delivery after the restart");
    }
    assert_eq!(delivered.load(Ordering::Relaxed), 800);

    let deadline = Instant::now() + Duration::from_secs(90);
    while count(&seen) < 800 {
        assert!(
            Instant::now() < deadline,
            "consumed {} of 800\n{}",
            count(&seen),
            cluster.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader thread");
    assert_eq!(
        *seen.lock().expect("seen"),
        (0..800).collect::<BTreeSet<u32>>()
    );
    for (id, p) in &proxies {
        let s = p.stats();
        assert!(
            s.connections > 0 && s.bytes_to_client > 0,
            "node {id}'s clients went through its proxy: {s:?}"
        );
    }
    // The harness's direct view bypasses the proxies.
    assert_ne!(cluster.direct_brokers(), cluster.brokers());
}
