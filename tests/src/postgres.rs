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
        Self::start_configured(settings, None, &[])
    }

    /// Starts a cluster with `ssl=on` and the given server certificate, key and CA (for client
    /// certificates), whose `pg_hba.conf` is `hba` (the harness itself connects through the
    /// Unix socket, so `local` lines are added).
    pub fn start_tls(
        server: &crate::certs::Pair,
        ca: &crate::certs::TestCa,
        hba: &str,
        settings: &[(&str, &str)],
    ) -> Self {
        let read = |p: &Path| std::fs::read(p).expect("read a certificate file");
        let files: [(&str, Vec<u8>); 3] = [
            ("server.crt", read(&server.cert)),
            ("server.key", read(&server.key)),
            ("root.crt", ca.cert_pem().as_bytes().to_vec()),
        ];
        let mut all = vec![
            ("ssl", "on"),
            ("ssl_cert_file", "server.crt"),
            ("ssl_key_file", "server.key"),
            ("ssl_ca_file", "root.crt"),
        ];
        all.extend_from_slice(settings);
        let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        Self::start_configured(&all, Some(hba), &files)
    }

    /// Starts a cluster: `-c` settings, a replacement `pg_hba.conf` (after the `local` lines
    /// the harness needs), and files written into the data folder (owned by the server, 0600).
    pub fn start_configured(
        settings: &[(&str, &str)],
        hba: Option<&str>,
        files: &[(&str, &[u8])],
    ) -> Self {
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
        for (name, bytes) in files {
            let path = data.join(name);
            std::fs::write(&path, bytes).expect("write a server file");
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .expect("chmod a server file");
            }
            if is_root() {
                let ok = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&path)
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "chown of {} failed", path.display());
            }
        }
        if let Some(hba) = hba {
            std::fs::write(
                data.join("pg_hba.conf"),
                format!("local all all trust\nlocal replication all trust\n{hba}\n"),
            )
            .expect("write pg_hba.conf");
        }
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
        if let Err(e) = self.try_pg_ctl(args) {
            panic!("{e}");
        }
    }

    /// Runs `pg_ctl` on this cluster; the error carries its output and the server's log.
    fn try_pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let log = self.dir.path().join("server.log");
        let out = pg_command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(&log)
            .args(args)
            .output()
            .map_err(|e| format!("run pg_ctl: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "pg_ctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        ))
    }

    /// `pg_ctl restart -m immediate`: a crash and recovery, with the options the server was
    /// started with (`postmaster.opts`).
    pub fn restart_immediate(&self) -> Result<(), String> {
        self.try_pg_ctl(&["-m", "immediate", "-w", "-t", "60", "restart"])
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

    /// Connects to `db` as `postgres` through the Unix socket (which `pg_hba.conf` always
    /// trusts, whatever a test requires of TCP connections).
    pub async fn client(&self, db: &str) -> Client {
        let (client, conn) = tokio_postgres::Config::new()
            .host_path(self.dir.path())
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .connect(NoTls)
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
