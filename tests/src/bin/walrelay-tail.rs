//! Prints every record of a topic as it arrives, one line each: `partition/offset key value`.
//! Usage: `walrelay-tail BROKERS TOPIC`, or `walrelay-tail BROKERS TOPIC --count` to print each
//! partition's low and high watermarks and exit.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(brokers), Some(topic)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: walrelay-tail BROKERS TOPIC");
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "walrelay-tail")
        .set("enable.auto.commit", "false")
        .create()?;
    let partitions = loop {
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
        let n = md.topics().first().map_or(0, |t| t.partitions().len());
        if n > 0 {
            break n;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if args.next().as_deref() == Some("--count") {
        for p in 0..partitions {
            let (lo, hi) =
                consumer.fetch_watermarks(&topic, i32::try_from(p)?, Duration::from_secs(10))?;
            println!("partition {p}: low {lo} high {hi}");
        }
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(&topic, i32::try_from(p)?, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    loop {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            println!(
                "{}/{} {} {}",
                m.partition(),
                m.offset(),
                String::from_utf8_lossy(m.key().unwrap_or_default()),
                String::from_utf8_lossy(m.payload().unwrap_or_default())
            );
        }
    }
}
