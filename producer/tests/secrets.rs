//! No secret reaches any output channel: a run with a password in the connection URL, a
//! secret Kafka property and a DDL statement carrying a role's password; its logs (at debug),
//! `check` and `status` (text and JSON), `/metrics`, bad-option errors and every record in the
//! topic are searched for the secrets.

use std::time::Duration;

use walrelay_tests::topic::table_state;

use crate::support::{Env, producer_bin};

const PG_SECRET: &str = "pg-Secret-4a1f9c";
const KAFKA_SECRET: &str = "kafka-Secret-77e0b2";
const ROLE_SECRET: &str = "role-Secret-c93d11";

fn assert_clean(channel: &str, text: &str) {
    for secret in [PG_SECRET, KAFKA_SECRET, ROLE_SECRET] {
        assert!(
            !text.contains(secret),
            "{channel} leaks a secret ({secret}):\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_output_channel_carries_a_secret() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            &format!(
                "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items VALUES (1, 'one');
                 ALTER ROLE postgres PASSWORD '{PG_SECRET}';"
            ),
        )
        .await;
    // The URL carries the password (the test cluster trusts local connections, so it is not
    // needed to log in, but walrelay is handed it like any other).
    env.user = format!("postgres:{PG_SECRET}");
    let secret_prop = format!("sasl.password={KAFKA_SECRET}");
    let with_secret = |cmd: &[&str]| {
        let mut args = vec!["--kafka-property", &secret_prop];
        args.extend_from_slice(cmd);
        env.cmd(&args)
    };
    let both = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let out = with_secret(&["init"]);
    assert!(out.status.success(), "{}", both(&out));
    assert_clean("init", &both(&out));
    for cmd in [
        &["check"][..],
        &["check", "--json"][..],
        &["status"][..],
        &["status", "--json"][..],
    ] {
        assert_clean(&format!("{cmd:?}"), &both(&with_secret(cmd)));
    }
    // A bad option next to the secrets: the error names the option, not the URL.
    let out = with_secret(&["--max-buffer-bytes", "lots", "run"]);
    assert_eq!(out.status.code(), Some(2));
    assert_clean("a bad option's error", &both(&out));

    let metrics = format!("127.0.0.1:{}", walrelay_tests::free_port());
    let mut producer = walrelay_tests::process::Proc::spawn(
        &producer_bin(),
        &[
            env.common_args(),
            vec![
                "--kafka-property".into(),
                secret_prop.clone(),
                "--metrics-addr".into(),
                metrics.clone(),
                "run".into(),
            ],
        ]
        .concat(),
        &[("RUST_LOG", "debug".into())],
        &env.logs.path().join("debug.log"),
    );
    env.wait_streaming(Duration::from_secs(60)).await;
    // A schema change whose statement holds a connection string with a password (in a check
    // constraint, which schema events do not describe): the schema
    // event keeps the statement, redacted. Then one query of a role's password and another
    // schema change: a query of several statements has its text left out altogether.
    let admin = env.pg.client(&env.db).await;
    admin
        .batch_execute(&format!(
            "ALTER TABLE items ADD COLUMN w int CHECK (w <> length('host=db password={ROLE_SECRET} user=x'))"
        ))
        .await
        .expect("alter");
    admin
        .batch_execute(&format!(
            "CREATE ROLE leaky LOGIN PASSWORD '{ROLE_SECRET}'; ALTER TABLE items ADD COLUMN w2 int; INSERT INTO items (id, v) VALUES (2, 'two');"
        ))
        .await
        .expect("several statements");
    env.wait_confirmed_current(Duration::from_secs(60)).await;
    let records = env.read_until(Duration::from_secs(60), |r| {
        table_state(r, "public", "items", "id").len() == 2
    });
    let topic: String = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        topic.contains("password=***"),
        "the schema event keeps the statement, redacted:\n{topic}"
    );
    assert!(
        records.iter().any(|r| {
            let e = r.envelope();
            e.ddl
                .as_ref()
                .is_some_and(|d| d.sql.is_none() && d.columns.iter().any(|c| c.name == "w2"))
        }),
        "the schema event of the query of several statements carries no text:\n{topic}"
    );
    assert_clean("the topic", &topic);
    let scrape = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert_clean("/metrics", &scrape);
    assert_eq!(producer.terminate(), Some(0));
    let log = producer.log();
    assert!(log.contains("DEBUG"), "the run logged at debug");
    assert!(!log.contains("\u{1b}["), "no ANSI colours in a log file");
    assert_clean("the producer's debug log", &log);
}
