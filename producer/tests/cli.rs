//! Command-line behaviour: bad options, preflight checks, destroy.

use std::time::Duration;

use walrelay_tests::postgres::PgCluster;

use crate::support::{Env, producer_bin};

fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(producer_bin())
        .args(args)
        .output()
        .expect("run")
}

#[test]
fn a_bad_option_exits_2_naming_it() {
    let out = run(&[
        "--postgres-url",
        "postgres://u@h/db",
        "--max-buffer-bytes",
        "12parsecs",
        "run",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-buffer-bytes"));
    let out = run(&[
        "--postgres-url",
        "postgres://u@h/db",
        "--slot",
        "Bad-Name",
        "run",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--slot"));
    let out = run(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--postgres-url"));
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("walrelay.toml");
    std::fs::write(
        &file,
        "postgres_url = 'postgres://u@h/db'\nslott = 'typo'\n",
    )
    .expect("write");
    let out = run(&["--config", file.to_str().expect("path"), "run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("slott"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn env_overrides_file_and_flags_override_env() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("walrelay.toml");
    std::fs::write(
        &file,
        "postgres_url = 'postgres://u@h/db'\ntopic = 'bad topic from file'\n",
    )
    .expect("write");
    let out = std::process::Command::new(producer_bin())
        .args(["--config", file.to_str().expect("path"), "run"])
        .env("WALRELAY_TOPIC", "bad topic from env")
        .output()
        .expect("run");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("from env"),
        "env wins over the file"
    );
    let out = std::process::Command::new(producer_bin())
        .args([
            "--config",
            file.to_str().expect("path"),
            "--topic",
            "bad topic from flag",
            "run",
        ])
        .env("WALRELAY_TOPIC", "bad topic from env")
        .output()
        .expect("run");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("from flag"),
        "the flag wins over env"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_wal_level_and_run_refuses_it() {
    let pg = PgCluster::start_with(&[("wal_level", "replica")]);
    let url = pg.url("postgres");
    let out = run(&[
        "--postgres-url",
        &url,
        "--kafka-brokers",
        "127.0.0.1:1",
        "check",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    let wal = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "wal_level")
        .expect("wal_level item")
        .clone();
    assert_eq!(wal["status"], "fail");
    assert!(
        wal["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("wal_level = logical")
    );
    pg.exec("postgres", "CREATE TABLE t (id int PRIMARY KEY)")
        .await;
    let init = run(&["--postgres-url", &url, "init"]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let out = run(&[
        "--postgres-url",
        &url,
        "--kafka-brokers",
        "127.0.0.1:1",
        "run",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wal_level"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_and_reports_a_table_without_key() {
    let env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE keyed (id int PRIMARY KEY); CREATE TABLE loose (v int);",
        )
        .await;
    let out = env.cmd(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("public.loose") && text.contains("REPLICA IDENTITY FULL"),
        "{text}"
    );
    assert!(text.contains("[  ok] kafka"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_refuses_while_active_unless_forced() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);",
        )
        .await;
    env.init();
    assert_eq!(
        env.event_triggers().await,
        2,
        "init installs the DDL event triggers"
    );
    let _producer = env.spawn(&[]);
    env.read_until(Duration::from_secs(60), |r| !r.is_empty());
    let out = env.cmd(&["destroy"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("active"));
    let out = env.cmd(&["destroy", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!env.slot_exists().await, "slot dropped");
    let c = env.pg.client(&env.db).await;
    let schema: bool = c
        .query_one("SELECT to_regnamespace('walrelay') IS NULL", &[])
        .await
        .expect("schema")
        .get(0);
    assert!(schema, "walrelay schema dropped");
    assert_eq!(
        env.event_triggers().await,
        0,
        "the DDL event triggers are removed"
    );
    // DDL keeps working once walrelay is gone.
    c.batch_execute("ALTER TABLE t ADD COLUMN x int")
        .await
        .expect("DDL after destroy");
}
