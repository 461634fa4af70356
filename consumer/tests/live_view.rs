//! The live view (issue 16) in a real browser: Postgres → producer → Kafka → `walrelay-consumer
//! stream` → its page (`consumer/src/stream/live/index.html`, served at `/`) in Debian's
//! headless Chromium, driven over the DevTools protocol by
//! `tests/services/browser/live_view.py`: the token, group and tables typed into the form,
//! Connect clicked, and a row written to Postgres awaited in the page's table.
//!
//! `WALRELAY_LIVE_VIEW_SCREENSHOT=PATH` saves the page as a PNG once the row is shown (the
//! README's `docs/live-view.png` comes from such a run).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use walrelay_tests::process::Proc;

use crate::{Stack, consumer_bin};

const TOKEN: &str = "live-view-test-token-0123456789";

fn browser_sh() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/services/browser/browser.sh"
    ))
}

/// Runs the browser driver against `url`; its exit status and what it printed.
async fn drive(
    url: &str,
    group: &str,
    expect: &str,
    timeout_s: u32,
    screenshot: Option<String>,
) -> (bool, String) {
    let mut args: Vec<String> = [
        "run",
        "--url",
        url,
        "--token",
        TOKEN,
        "--group",
        group,
        "--tables",
        "public.*",
        "--from",
        "earliest",
        "--expect-text",
        expect,
        "--timeout",
        &timeout_s.to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    if let Some(path) = screenshot {
        args.extend(["--screenshot".to_string(), path]);
    }
    let out = tokio::process::Command::new("bash")
        .arg(browser_sh())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run browser.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_shows_a_new_row_in_a_real_browser() {
    // Chromium and the venv first (a no-op once installed), so that their install time does
    // not count against the waits below.
    let install = tokio::process::Command::new("bash")
        .arg(browser_sh())
        .arg("install")
        .output()
        .await
        .expect("run browser.sh install");
    assert!(
        install.status.success(),
        "browser.sh install: {}",
        String::from_utf8_lossy(&install.stderr)
    );

    // The real OpenSearch node the binary shares (the page needs no search; no fault is injected).
    let mut s = Stack::start(
        "CREATE TABLE notes (id int PRIMARY KEY, body text, n int);
         ALTER TABLE notes REPLICA IDENTITY FULL;
         INSERT INTO notes VALUES (1, 'first note', 1), (2, 'second note', 2);",
    )
    .await;
    s.wait_streaming().await;

    let port = walrelay_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args: Vec<String> = [
        "stream",
        "--kafka-brokers",
        &s.broker.brokers(),
        "--topic",
        &s.topic,
        "--listen",
        &listen,
        "--api-token",
        TOKEN,
        "--group-prefix",
        &format!("{}.", s.group),
        "--kafka-property",
        "session.timeout.ms=6000",
        "--kafka-property",
        "heartbeat.interval.ms=500",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(s.broker.property_args());
    let log = s.log_path("stream");
    let mut gateway = Proc::spawn(&consumer_bin(), &args, &[], &log);
    let page = format!("http://127.0.0.1:{port}/");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let served = reqwest::get(&page).await.ok().filter(|r| r.status() == 200);
        if let Some(r) = served {
            let body = r.text().await.unwrap_or_default();
            assert!(
                body.contains("walrelay live view"),
                "{page} is not the live view:\n{body}"
            );
            break;
        }
        assert!(
            gateway.try_exit().is_none() && Instant::now() < deadline,
            "the gateway never served {page}\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The text of a row not written yet: the page shows the table's rows but not this one, and
    // the driver fails, naming it.
    let text = walrelay_tests::unique("live-row");
    let (found, out) = drive(&page, &walrelay_tests::unique("lv-before"), &text, 10, None).await;
    assert!(
        !found,
        "the page showed {text} before it was written:\n{out}"
    );
    assert!(
        out.contains(&format!("no row containing '{text}'")) && out.contains("first note"),
        "the driver should have connected, shown the snapshot and timed out:\n{out}\n{}",
        s.all_logs()
    );

    // Written now: an insert with the text, an update and a delete.
    s.exec(&format!(
        "INSERT INTO notes VALUES (3, '{text}', 3);
         UPDATE notes SET body = 'second note, edited', n = 20 WHERE id = 2;
         DELETE FROM notes WHERE id = 1;"
    ))
    .await;
    let screenshot = std::env::var("WALRELAY_LIVE_VIEW_SCREENSHOT").ok();
    let (found, out) = drive(&page, &walrelay_tests::unique("lv"), &text, 60, screenshot).await;
    assert!(
        found,
        "the page never showed the row with {text}:\n{out}\n{}",
        s.all_logs()
    );
    // Stopped here; the gateway's shutdown is tests/stream.rs's business.
    gateway.kill9();
}
