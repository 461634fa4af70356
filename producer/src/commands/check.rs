//! `check`: the preflight report, one line per requirement (Postgres reachable and its
//! settings, the role's privileges, the publication and its tables' replica identity, TLS,
//! Kafka reachable), each with the fix when it fails; and the capture plan ([`plan`]): what
//! leaves the database, table by table (excluded and masked columns, row filters; never the
//! salt).

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;
use walrelay_common::postgres::PgTarget;

use crate::catalog::{self, PgError, TableRef};
use crate::config::Settings;
use crate::ddl::capture;
use crate::kafka::broker_reachable;

/// One line of the preflight report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckItem {
    /// What was checked.
    pub name: String,
    /// `ok`, `warn` or `fail`.
    pub status: &'static str,
    /// Details and, when not ok, the fix.
    pub detail: String,
}

fn item(name: &str, status: &'static str, detail: impl Into<String>) -> CheckItem {
    CheckItem {
        name: name.into(),
        status,
        detail: detail.into(),
    }
}

/// Whether the session is encrypted and what the server's certificate was checked for; the
/// replication connection and the snapshot workers use the same settings.
async fn tls_item(client: &Client, target: &walrelay_common::postgres::PgTarget) -> CheckItem {
    let mode = target.tls.mode.as_str();
    match PgTarget::ssl_version(client).await {
        Some(version) => {
            let verified = match target.tls.verification() {
                Some("full") => "certificate verified: CA and host name",
                Some(_) => "certificate verified: CA (host name not checked)",
                None => "certificate not verified (use sslmode=verify-full with sslrootcert)",
            };
            let client_cert = if target.tls.cert.is_some() {
                ", client certificate sent"
            } else {
                ""
            };
            item(
                "postgres tls",
                if target.tls.verification().is_some() {
                    "ok"
                } else {
                    "warn"
                },
                format!(
                    "encrypted ({version}, sslmode={mode}), {verified}{client_cert}; every connection (control, snapshot, replication) uses these settings"
                ),
            )
        }
        None => item(
            "postgres tls",
            "warn",
            format!(
                "not encrypted (sslmode={mode}): credentials and rows cross the network in clear text; turn on ssl on the server and use sslmode=verify-full"
            ),
        ),
    }
}

/// Runs the preflight checks; the report has no `fail` when walrelay can run.
pub async fn check(s: &Settings) -> Vec<CheckItem> {
    let mut out = Vec::new();
    match catalog::connect(&s.postgres).await {
        Err(e) => out.push(item(
            "postgres connection",
            "fail",
            format!("{e}: check --postgres-url and that the server accepts connections"),
        )),
        Ok(client) => {
            out.push(item(
                "postgres connection",
                "ok",
                format!("connected to database {}", s.database()),
            ));
            out.push(tls_item(&client, &s.postgres).await);
            if let Err(e) = check_postgres(&client, s, &mut out).await {
                out.push(item("postgres catalog", "fail", e.to_string()));
            }
        }
    }
    match s.kafka_brokers.as_deref() {
        None => out.push(item("kafka", "fail", "no brokers: give --kafka-brokers")),
        Some(brokers) => {
            let mut opts = s.writer_options(brokers);
            opts.transactions = None;
            match tokio::task::spawn_blocking(move || {
                broker_reachable(&opts, Duration::from_secs(5))
            })
            .await
            {
                Ok(Ok(ids)) => {
                    out.push(item(
                        "kafka",
                        "ok",
                        format!("{brokers}: {} broker(s) answer", ids.len()),
                    ));
                    check_event_limits(s, brokers, &ids, &mut out).await;
                }
                Ok(Err(e)) => {
                    out.push(item("kafka", "fail", format!("{brokers} unreachable: {e}")))
                }
                Err(e) => out.push(item("kafka", "fail", e.to_string())),
            }
        }
    }
    out
}

/// Whether an event of `--max-event-bytes` can be written whole: the topic's
/// max.message.bytes (an existing topic keeps its own; walrelay creates topics with enough) and
/// each broker's socket.request.max.bytes (a produce request above it is refused outright).
async fn check_event_limits(s: &Settings, brokers: &str, ids: &[i32], out: &mut Vec<CheckItem>) {
    use walrelay_common::kafka::{ConfigOf, config_value};
    let mut opts = s.writer_options(brokers);
    opts.transactions = None;
    let config = opts.client_config();
    let need = opts.record_limit();
    let name = "event size limit";
    match config_value(&config, ConfigOf::Topic(&s.topic), "max.message.bytes").await {
        Ok(Some(v)) => match v.parse::<usize>() {
            Ok(n) if n < need => out.push(item(
                name,
                "warn",
                format!(
                    "topic {} allows records of {n} bytes (max.message.bytes), below the {need} \
                     that --max-event-bytes {} needs: larger events go in chunks to {}.oversized \
                     and their rows carry a reference. To keep them whole: kafka-configs.sh \
                     --alter --entity-type topics --entity-name {} --add-config \
                     max.message.bytes={need}",
                    s.topic, s.max_event_bytes, s.topic, s.topic
                ),
            )),
            _ => out.push(item(
                name,
                "ok",
                format!(
                    "topic {} takes events of --max-event-bytes {}",
                    s.topic, s.max_event_bytes
                ),
            )),
        },
        Ok(None) => out.push(item(
            name,
            "warn",
            format!(
                "could not read topic {}'s max.message.bytes (DescribeConfigs not allowed?): \
                 events above it would go to {}.oversized",
                s.topic, s.topic
            ),
        )),
        // Most likely the topic does not exist yet: it is created with enough.
        Err(_) => out.push(item(
            name,
            "ok",
            format!(
                "topic {} will be created with max.message.bytes={need} (--max-event-bytes {})",
                s.topic, s.max_event_bytes
            ),
        )),
    }
    for &id in ids {
        if let Ok(Some(v)) =
            config_value(&config, ConfigOf::Broker(id), "socket.request.max.bytes").await
            && let Ok(n) = v.parse::<usize>()
            && n < need + (64 << 10)
        {
            out.push(item(
                &format!("broker {id} request limit"),
                "fail",
                format!(
                    "socket.request.max.bytes is {n}, below a produce request of one event of \
                     --max-event-bytes {}: lower --max-event-bytes or raise the broker's \
                     socket.request.max.bytes",
                    s.max_event_bytes
                ),
            ));
        }
    }
}

async fn check_postgres(c: &Client, s: &Settings, out: &mut Vec<CheckItem>) -> Result<(), PgError> {
    let q = |what: &'static str| PgError::query(what);
    let version: i32 = c
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(q("reading server version"))?
        .get(0);
    out.push(if version >= 140000 {
        item("server version", "ok", format!("{version}"))
    } else {
        item(
            "server version",
            "fail",
            format!("{version}: walrelay needs PostgreSQL 14 or later"),
        )
    });
    let wal_level: String = c
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(q("reading wal_level"))?
        .get(0);
    out.push(if wal_level == "logical" {
        item("wal_level", "ok", "logical")
    } else {
        item("wal_level", "fail", format!("{wal_level}: set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart Postgres"))
    });
    let row = c
        .query_one(
            "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int, \
                    current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_stat_replication)::int, \
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&s.slot],
        )
        .await
        .map_err(q("reading replication settings"))?;
    let (free_slots, free_senders, has_slot): (i32, i32, bool) =
        (row.get(0), row.get(1), row.get(2));
    out.push(if free_slots > 0 || has_slot {
        item("replication slots", "ok", format!("{free_slots} free"))
    } else {
        item(
            "replication slots",
            "fail",
            "none free: raise max_replication_slots (restart needed) or drop an unused slot",
        )
    });
    out.push(if free_senders > 0 {
        item("wal senders", "ok", format!("{free_senders} free"))
    } else {
        item(
            "wal senders",
            "fail",
            "none free: raise max_wal_senders (restart needed)",
        )
    });
    let row = c
        .query_one(
            "SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(q("reading the role"))?;
    let (repl, sup): (bool, bool) = (row.get(0), row.get(1));
    let triggers: bool = c
        .query_one(capture::TRIGGERS_ACTIVE, &[])
        .await
        .map_err(q("reading pg_event_trigger"))?
        .get(0);
    out.push(match (triggers, sup) {
        (true, _) => item("ddl capture", "ok", "event triggers installed"),
        (false, true) => item(
            "ddl capture",
            "warn",
            "event triggers not installed yet: `walrelay-producer init` installs them",
        ),
        (false, false) => item(
            "ddl capture",
            "warn",
            format!(
                "installing the DDL event triggers needs a superuser (run `init` once as one); {}",
                capture::WITHOUT_TRIGGERS
            ),
        ),
    });
    out.push(if repl || sup {
        item(
            "replication privilege",
            "ok",
            if sup { "superuser" } else { "REPLICATION" },
        )
    } else {
        item(
            "replication privilege",
            "fail",
            "the role lacks REPLICATION: ALTER ROLE <role> REPLICATION",
        )
    });
    let tables: Vec<TableRef> = catalog::user_tables(c)
        .await?
        .into_iter()
        .filter(|t| s.tables.matches(t))
        .collect();
    if tables.is_empty() {
        out.push(item("captured tables", "fail", "no table matches --tables"));
    } else {
        out.push(item(
            "captured tables",
            "ok",
            format!("{} table(s)", tables.len()),
        ));
    }
    out.push(match crate::policy::check_keys(c, &s.columns, &tables).await {
        Ok(()) => item(
            "column policy",
            "ok",
            format!(
                "{} excluded and {} masked column pattern(s); no key column excluded or redacted",
                s.columns.excluded().len(),
                s.columns.masked().len()
            ),
        ),
        Err(e) => item("column policy", "fail", e.to_string()),
    });
    if !s.row_filters.is_empty() {
        out.push(match crate::policy::filters_of(&s.row_filters, &tables) {
            Ok(f) => item(
                "row filters",
                "ok",
                format!(
                    "{} table(s) filtered (`init` writes them into the publication)",
                    f.len()
                ),
            ),
            Err(e) => item("row filters", "fail", e.to_string()),
        });
    }
    for t in &tables {
        let row = c
            .query_one(
                "SELECT has_table_privilege($1::oid, 'SELECT'), c.relreplident::text, \
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident)) \
                 FROM pg_class c WHERE c.oid = $1",
                &[&t.oid],
            )
            .await
            .map_err(q("reading table privileges"))?;
        let (select, ident, has_key): (bool, String, bool) = (row.get(0), row.get(1), row.get(2));
        if !select {
            out.push(item(
                &format!("select on {}", t.qualified()),
                "fail",
                format!("GRANT SELECT ON {} TO <role>", t.sql_name()),
            ));
        }
        match (ident.as_str(), has_key) {
            ("f", _) => {}
            ("n", _) => out.push(item(&format!("replica identity of {}", t.qualified()), "warn",
                "REPLICA IDENTITY NOTHING: updates and deletes fail on the server; ALTER TABLE … REPLICA IDENTITY DEFAULT or FULL")),
            (_, false) => out.push(item(&format!("replica identity of {}", t.qualified()), "warn",
                "no primary key or replica identity index: Postgres refuses its UPDATE and DELETE while it is published. Add a primary key, or ALTER TABLE … REPLICA IDENTITY FULL")),
            _ => {}
        }
    }
    Ok(())
}

/// What leaves the database: the captured tables with their excluded and masked columns and
/// row filter (`check` prints it; the salt is said to be set or not, nothing more).
#[derive(Debug, Clone, Serialize)]
pub struct CapturePlan {
    /// Captured tables.
    pub tables: Vec<PlannedTable>,
    /// `--columns-exclude` patterns as given.
    pub exclude_patterns: Vec<String>,
    /// `--columns-mask` patterns as given, with their mask.
    pub mask_patterns: Vec<PlannedMask>,
    /// Whether `--mask-salt` is set (never its value).
    pub mask_salt: &'static str,
}

/// A pattern or column and its mask.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedMask {
    /// Pattern or column name.
    pub column: String,
    /// `hash` or `redact`.
    pub mask: crate::policy::MaskKind,
}

/// One captured table in the plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedTable {
    /// `schema.table`.
    pub table: String,
    /// Columns never written.
    pub excluded: Vec<String>,
    /// Columns written masked (typed `text`).
    pub masked: Vec<PlannedMask>,
    /// The configured `--row-filter` predicate.
    pub row_filter: Option<String>,
    /// The filter the publication holds now (as Postgres deparsed it), when it exists.
    pub publication_row_filter: Option<String>,
}

/// The capture plan, from the catalog and the options.
pub async fn plan(s: &Settings) -> Result<CapturePlan, PgError> {
    use crate::policy::Rule;
    let c = catalog::connect(&s.postgres).await?;
    let tables: Vec<TableRef> = catalog::user_tables(&c)
        .await?
        .into_iter()
        .filter(|t| s.tables.matches(t))
        .collect();
    let published: Vec<TableRef> = if catalog::publication_exists(&c, &s.publication).await? {
        catalog::publication_tables(&c, &s.publication).await?
    } else {
        Vec::new()
    };
    let mut out = Vec::with_capacity(tables.len());
    for t in &tables {
        let columns: Vec<String> = c
            .query(
                "SELECT attname::text FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&t.oid],
            )
            .await
            .map_err(PgError::query(format!(
                "reading the columns of {}",
                t.qualified()
            )))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut excluded = Vec::new();
        let mut masked = Vec::new();
        for col in columns {
            match s.columns.rule(&t.schema, &t.name, &col) {
                Rule::Keep => {}
                Rule::Exclude => excluded.push(col),
                Rule::Mask(mask) => masked.push(PlannedMask { column: col, mask }),
            }
        }
        out.push(PlannedTable {
            table: t.qualified(),
            excluded,
            masked,
            row_filter: s
                .row_filters
                .iter()
                .find(|f| f.matches(&t.schema, &t.name))
                .map(|f| f.predicate.clone()),
            publication_row_filter: published
                .iter()
                .find(|p| p.oid == t.oid)
                .and_then(|p| p.row_filter.clone()),
        });
    }
    Ok(CapturePlan {
        tables: out,
        exclude_patterns: s
            .columns
            .excluded()
            .iter()
            .map(ToString::to_string)
            .collect(),
        mask_patterns: s
            .columns
            .masked()
            .iter()
            .map(|(p, mask)| PlannedMask {
                column: p.to_string(),
                mask: *mask,
            })
            .collect(),
        mask_salt: if s.columns.salt_missing() {
            "not set"
        } else {
            "set"
        },
    })
}

impl CapturePlan {
    /// The plan as text, one line per table.
    pub fn text(&self) -> String {
        let mut out = String::from("capture plan:\n");
        for t in &self.tables {
            let mut parts = Vec::new();
            if !t.excluded.is_empty() {
                parts.push(format!("excluded: {}", t.excluded.join(", ")));
            }
            if !t.masked.is_empty() {
                parts.push(format!(
                    "masked: {}",
                    t.masked
                        .iter()
                        .map(|m| format!("{}={}", m.column, mask_name(m.mask)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if let Some(f) = &t.row_filter {
                parts.push(format!("row filter: {f}"));
            }
            if parts.is_empty() {
                parts.push("every column, every row".into());
            }
            out.push_str(&format!("  {}: {}\n", t.table, parts.join("; ")));
        }
        out.push_str(&format!("  mask salt: {}", self.mask_salt));
        out
    }
}

fn mask_name(m: crate::policy::MaskKind) -> &'static str {
    match m {
        crate::policy::MaskKind::Hash => "hash",
        crate::policy::MaskKind::Redact => "redact",
    }
}
