//! A throwaway PostgreSQL 15 cluster.

use std::path::{Path, PathBuf};
use std::process::Command;

use tokio_postgres::{Client, NoTls};

/// Where the server binaries are; `WALRELAY_PG_BIN` overrides.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("WALRELAY_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a server binary, as `postgres` when we are root.
fn pg_command(bin: &str) -> Command {
    let path = bin_dir().join(bin);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

/// A running cluster; stopped (immediate) and removed on drop.
pub struct PgCluster {
    dir: tempfile::TempDir,
    port: u16,
}

impl PgCluster {
    /// Starts a cluster with `wal_level=logical` and room for many slots.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a cluster with extra `-c` settings (later ones win).
    pub fn start_with(settings: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("walrelay-pg-")
            .tempdir()
            .expect("temp dir");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "chown of the cluster dir to postgres failed");
        }
        let data = dir.path().join("data");
        let out = pg_command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .expect("run initdb (is postgresql-15 installed?)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = crate::free_port();
        let mut opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level=logical \
             -c max_replication_slots=20 -c max_wal_senders=20 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=100 -c wal_sender_timeout=60s",
            dir.path().display()
        );
        for (k, v) in settings {
            opts.push_str(&format!(" -c {k}={v}"));
        }
        let c = Self { dir, port };
        c.pg_ctl(&["-o", &opts, "-w", "-t", "60", "start"]);
        c
    }

    fn pg_ctl(&self, args: &[&str]) {
        let log = self.dir.path().join("server.log");
        let out = pg_command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(&log)
            .args(args)
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A connection URL for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Connects to `db`.
    pub async fn client(&self, db: &str) -> Client {
        let (client, conn) = tokio_postgres::connect(&self.url(db), NoTls)
            .await
            .expect("connect to the test cluster");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Creates a database with a unique name and returns it.
    pub async fn create_database(&self, prefix: &str) -> String {
        let name = crate::unique(prefix);
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        name
    }

    /// Runs SQL on `db`.
    pub async fn exec(&self, db: &str, sql: &str) {
        self.client(db)
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = pg_command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
