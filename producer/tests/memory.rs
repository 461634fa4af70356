//! A one-million-row transaction flows through with memory bounded by the buffer, not by the
//! transaction.

use std::time::Duration;

use crate::support::Env;

const ROWS: i64 = 1_000_000;
const BUFFER_MIB: u64 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_transaction_flows_with_bounded_rss() {
    let mut env = Env::start_with(&[("logical_decoding_work_mem", "64MB")]).await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE wide (id bigint PRIMARY KEY, t text, n int, ts timestamptz)",
        )
        .await;
    env.init();
    let mut producer = env.spawn(&["--max-buffer-bytes", &format!("{BUFFER_MIB}MiB")]);
    env.wait_streaming(Duration::from_secs(60)).await;
    env.pg
        .exec(&env.db, &format!(
            "INSERT INTO wide SELECT g, md5(g::text), g, now() FROM generate_series(1, {ROWS}) g"))
        .await;
    let mut peak = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(900);
    let target = env.insert_lsn().await;
    loop {
        peak = peak.max(producer.peak_rss_bytes().unwrap_or(0));
        if env.confirmed_past(&target).await {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the transaction was not confirmed in time\n{}",
            env.all_logs()
        );
        assert!(
            producer.try_exit().is_none(),
            "producer exited\n{}",
            env.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak = peak.max(producer.peak_rss_bytes().unwrap_or(0));
    let limit = (BUFFER_MIB + 64) << 20;
    eprintln!("peak RSS {} MiB, limit {} MiB", peak >> 20, limit >> 20);
    assert!(peak > 0, "RSS was read");
    assert!(
        peak <= limit,
        "peak RSS {peak} bytes over buffer + 64 MiB ({limit})"
    );
    // The broker holds exactly one record per row (no duplicates without a crash) plus the
    // table's schema event and snapshot start and end markers from the snapshot, and the last
    // one is the transaction's last row
    // (the broker's watermarks count them; the last record is read back).
    let brokers = env.broker.brokers();
    assert_eq!(
        walrelay_tests::topic::record_count(&brokers, &env.topic),
        ROWS + 3
    );
    let last = walrelay_tests::topic::tail(&brokers, &env.topic, 0, 1);
    let e = last.first().expect("last record").envelope();
    assert_eq!(
        e.after.and_then(|a| a.get("id").and_then(|v| v.as_i64())),
        Some(ROWS)
    );
    assert_eq!(
        e.source.seq as i64, ROWS,
        "the millionth change of the transaction"
    );
    assert_eq!(producer.terminate(), Some(0));
}
