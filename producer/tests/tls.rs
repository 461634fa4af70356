//! TLS to Postgres: a cluster with `ssl=on` that accepts only `hostssl` connections (one role
//! only with a client certificate), certificates made by the test. The producer snapshots and
//! streams under `sslmode=verify-full` and with a client certificate; a wrong CA, a wrong host
//! name, a missing client certificate and `require` against a server without TLS fail with
//! messages that name the cause and the fix.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use walrelay_tests::certs::TestCa;
use walrelay_tests::kafka::KafkaCluster;
use walrelay_tests::postgres::PgCluster;
use walrelay_tests::process::Proc;
use walrelay_tests::topic;

use crate::support::producer_bin;

const HBA: &str = "hostssl all certuser 127.0.0.1/32 cert
hostssl replication certuser 127.0.0.1/32 cert
hostssl all all 127.0.0.1/32 trust
hostssl replication all 127.0.0.1/32 trust";

fn url(user: &str, host: &str, port: u16, db: &str, tls: &str) -> String {
    format!("postgres://{user}@{host}:{port}/{db}?{tls}")
}

fn run(args: &[String], command: &str) -> Output {
    std::process::Command::new(producer_bin())
        .args(args)
        .arg(command)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run walrelay-producer")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn base_args(url: &str, topic: &str, slot: &str) -> Vec<String> {
    KafkaCluster::shared().producer_args(url, topic, slot)
}

/// `init`, then `run` until the rows inserted after the snapshot are in the topic.
async fn snapshot_and_stream(pg: &PgCluster, db: &str, args: &[String], logs: &Path, topic: &str) {
    let init = run(args, "init");
    assert!(init.status.success(), "init: {}", text(&init));
    let mut producer = Proc::spawn(
        &producer_bin(),
        &[args.to_vec(), vec!["run".into()]].concat(),
        &[],
        &logs.join(format!("{topic}.log")),
    );
    let brokers = KafkaCluster::shared().brokers();
    // The snapshot's rows arrive, then a streamed insert.
    topic::read_until(&brokers, topic, Duration::from_secs(60), |r| {
        r.iter()
            .filter(|x| x.envelope().op == walrelay_common::event::Op::Read)
            .count()
            >= 3
    });
    pg.exec(db, "INSERT INTO secrets VALUES (4, 'streamed over TLS')")
        .await;
    let records = topic::try_read_until(&brokers, topic, Duration::from_secs(60), |r| {
        r.iter().any(|x| {
            x.envelope()
                .after
                .is_some_and(|a| a.get("v").and_then(|v| v.as_str()) == Some("streamed over TLS"))
        })
    })
    .unwrap_or_else(|r| {
        panic!(
            "{} records; the streamed row never came:\n{}",
            r.len(),
            producer.log()
        )
    });
    assert!(records.len() >= 4);
    assert_eq!(producer.terminate(), Some(0), "{}", producer.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_snapshots_and_streams_over_verified_tls_and_client_certificates() {
    let ca = TestCa::new("walrelay test CA");
    let server = ca.server("server", &["localhost"]);
    let client = ca.client("certuser", "certuser");
    let pg = PgCluster::start_tls(&server, &ca, HBA, &[]);
    let db = pg.create_database("tls");
    let db = db.await;
    pg.exec(
        &db,
        "CREATE TABLE secrets (id int PRIMARY KEY, v text);
         INSERT INTO secrets VALUES (1, 'a'), (2, 'b'), (3, 'c');
         CREATE ROLE certuser LOGIN SUPERUSER REPLICATION;",
    )
    .await;
    let logs = tempfile::tempdir().expect("logs");
    let ca_path = ca.cert_path();
    let ca_arg = ca_path.display();

    // verify-full: the CA, and the certificate is issued for "localhost".
    let full = url(
        "postgres",
        "localhost",
        pg.port(),
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca_arg}"),
    );
    let topic = walrelay_tests::unique("tls").replace('_', ".");
    let slot = walrelay_tests::unique("tls");
    let args = base_args(&full, &topic, &slot);
    let check = run(&args, "check");
    let report = text(&check);
    assert!(
        report.contains(
            "encrypted (TLSv1.3, sslmode=verify-full), certificate verified: CA and host name"
        ),
        "{report}"
    );
    snapshot_and_stream(&pg, &db, &args, logs.path(), &topic).await;

    // A client certificate, the only way in for certuser.
    pg.exec(&db, "DELETE FROM secrets WHERE id = 4").await;
    let with_cert = url(
        "certuser",
        "localhost",
        pg.port(),
        &db,
        &format!(
            "sslmode=verify-full&sslrootcert={ca_arg}&sslcert={}&sslkey={}",
            client.cert.display(),
            client.key.display()
        ),
    );
    let topic = walrelay_tests::unique("tlscert").replace('_', ".");
    let slot = walrelay_tests::unique("tlscert");
    let args = base_args(&with_cert, &topic, &slot);
    let report = text(&run(&args, "check"));
    assert!(report.contains("client certificate sent"), "{report}");
    snapshot_and_stream(&pg, &db, &args, logs.path(), &topic).await;

    // The same user without the certificate is refused, and told what is missing.
    let no_cert = url(
        "certuser",
        "localhost",
        pg.port(),
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca_arg}"),
    );
    let out = run(&base_args(&no_cert, "t", "s"), "init");
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("certificate"), "{msg}");

    // A CA that did not sign the server's certificate.
    let other = TestCa::new("someone else");
    let wrong_ca = url(
        "postgres",
        "localhost",
        pg.port(),
        &db,
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            other.cert_path().display()
        ),
    );
    let out = run(&base_args(&wrong_ca, "t", "s"), "init");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = text(&out);
    assert!(
        msg.contains("not signed by a CA in sslrootcert")
            && msg.contains("give the CA that signed it"),
        "{msg}"
    );

    // The certificate names "localhost", not the address connected to.
    let wrong_name = url(
        "postgres",
        "127.0.0.1",
        pg.port(),
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca_arg}"),
    );
    let out = run(&base_args(&wrong_name, "t", "s"), "init");
    let msg = text(&out);
    assert!(
        !out.status.success()
            && msg.contains("not issued for \"127.0.0.1\"")
            && msg.contains("verify-ca"),
        "{msg}"
    );
    // verify-ca checks the chain only: the same address works.
    let ca_only = url(
        "postgres",
        "127.0.0.1",
        pg.port(),
        &db,
        &format!("sslmode=verify-ca&sslrootcert={ca_arg}"),
    );
    let report = text(&run(&base_args(&ca_only, "t", "s"), "check"));
    assert!(
        report.contains("certificate verified: CA (host name not checked)"),
        "{report}"
    );

    // A plain connection is refused by pg_hba (hostssl only).
    let plain = url("postgres", "127.0.0.1", pg.port(), &db, "sslmode=disable");
    let out = run(&base_args(&plain, "t", "s"), "init");
    assert!(!out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_fails_clearly() {
    let pg = PgCluster::start();
    let url = format!(
        "postgres://postgres:not-a-real-secret@127.0.0.1:{}/postgres?sslmode=require",
        pg.port()
    );
    let out = run(&base_args(&url, "t", "s"), "init");
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("does not accept TLS connections") && msg.contains("sslmode=require"),
        "{msg}"
    );
    assert!(
        !msg.contains("not-a-real-secret"),
        "the password leaked: {msg}"
    );
    // A missing key file is named.
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require&sslcert=/nonexistent/c.pem&sslkey=/nonexistent/k.pem",
        pg.port()
    );
    let out = run(&base_args(&url, "t", "s"), "init");
    let msg = text(&out);
    assert!(
        !out.status.success()
            && msg.contains("/nonexistent/c.pem")
            && msg.contains("cannot be read"),
        "{msg}"
    );
}
