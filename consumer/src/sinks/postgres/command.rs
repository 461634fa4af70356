//! `replicate`: the Postgres target on the shared runtime, and its preflight (`--check`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use walrelay_common::retry::Backoff;
use walrelay_common::telemetry::Readiness;

use super::client::{self, TargetError};
use super::config::ReplicateSettings;
use super::encode::qualified;
use super::sink::{PostgresSink, ReplicateMetrics};
use crate::config::RuntimeSettings;
use crate::metrics::Metrics;
use crate::runtime::{Runtime, RuntimeError};

/// Why the replicator stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    /// The target.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The runtime stopped (a definite sink error included).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(String),
}

/// `replicate`: applies the topic to the target until `shutdown`.
pub async fn replicate(
    runtime: &RuntimeSettings,
    r: &ReplicateSettings,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ReplicateError> {
    // The target first: a wrong password or a missing privilege stops here, before the group
    // is joined; an unreachable target is waited for.
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        let ready = async {
            let c = client::connect(&r.target).await?;
            client::prepare(&c).await
        };
        match ready.await {
            Ok(()) => break,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "Target database not reachable yet; retrying.");
                tokio::select! {
                    () = shutdown.cancelled() => return Err(e.into()),
                    () = tokio::time::sleep(backoff.next_wait()) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    tracing::info!(target = %r.target.describe(), group = %runtime.group, "Replicating into the target.");
    let rm = ReplicateMetrics::new(&metrics.registry)
        .map_err(|e| ReplicateError::Metrics(e.to_string()))?;
    let mut sink = PostgresSink::new(
        Arc::new(r.clone()),
        runtime.group.clone(),
        rm,
        runtime.batch_max_wait,
    );
    let consumer = Runtime::new(runtime, &runtime.group, metrics, readiness, &shutdown).await?;
    consumer.run(&mut sink, &shutdown).await?;
    Ok(())
}

/// One finding of the preflight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `ok`, `warn` or `FAIL`.
    pub level: &'static str,
    /// What was found, and what to do.
    pub message: String,
}

fn finding(level: &'static str, message: impl Into<String>) -> Finding {
    Finding {
        level,
        message: message.into(),
    }
}

/// `replicate --check`: what the target lacks, without changing it.
pub async fn check(runtime: &RuntimeSettings, r: &ReplicateSettings) -> Vec<Finding> {
    let mut out = Vec::new();
    let c = match client::connect(&r.target).await {
        Ok(c) => c,
        Err(e) => {
            out.push(finding("FAIL", format!("{e}")));
            return out;
        }
    };
    out.push(finding(
        "ok",
        format!("connected to {}", r.target.describe()),
    ));
    let q = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await }
    };
    match q("SELECT current_setting('server_version_num')::int, current_user::text").await {
        Ok(row) => {
            let v: i32 = row.get(0);
            let user: String = row.get(1);
            if v < 100_000 {
                out.push(finding("FAIL", format!("server version {v}: Postgres 10 or newer is needed (json_to_recordset with arrays)")));
            } else {
                out.push(finding(
                    "ok",
                    format!("server version {v}, connected as {user}"),
                ));
            }
        }
        Err(e) => out.push(finding("FAIL", client::describe(&e))),
    }
    // Bookkeeping: schema walrelay exists with CREATE and USAGE, or the database allows
    // creating it.
    match q("SELECT CASE WHEN to_regnamespace('walrelay') IS NULL
                     THEN has_database_privilege(current_database(), 'CREATE')
                     ELSE has_schema_privilege('walrelay', 'CREATE') AND has_schema_privilege('walrelay', 'USAGE') END")
    .await
    {
        Ok(row) if row.get::<_, bool>(0) => out.push(finding(
            "ok",
            "schema walrelay (applied positions) can be created or written",
        )),
        Ok(_) => out.push(finding(
            "FAIL",
            "cannot create or write schema walrelay, where the applied positions are kept: \
             GRANT CREATE ON DATABASE (or ON SCHEMA walrelay) to the replicator's role",
        )),
        Err(e) => out.push(finding("FAIL", client::describe(&e))),
    }
    // Target schemas: mapped ones, else every non-system schema.
    let schemas: Vec<String> = if r.schema_map.is_empty() {
        match c
            .query(
                "SELECT nspname::text FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'
                 AND nspname NOT IN ('information_schema', 'walrelay') ORDER BY 1",
                &[],
            )
            .await
        {
            Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
            Err(e) => {
                out.push(finding("FAIL", client::describe(&e)));
                Vec::new()
            }
        }
    } else {
        r.schema_map.values().cloned().collect()
    };
    for s in &schemas {
        let row = c
            .query_one(
                "SELECT to_regnamespace($1) IS NOT NULL,
                        CASE WHEN to_regnamespace($1) IS NULL THEN has_database_privilege(current_database(), 'CREATE')
                             ELSE has_schema_privilege($1, 'CREATE') AND has_schema_privilege($1, 'USAGE') END",
                &[s],
            )
            .await;
        match row {
            Ok(row) => {
                let (exists, can): (bool, bool) = (row.get(0), row.get(1));
                match (exists, can, r.initial) {
                    (_, true, _) => out.push(finding("ok", format!("schema {s:?}: tables can be created and written"))),
                    (false, false, true) => out.push(finding("FAIL", format!("schema {s:?} is missing and cannot be created (--initial): GRANT CREATE ON DATABASE to the role, or create it"))),
                    (false, false, false) => out.push(finding("warn", format!("schema {s:?} is missing: create it and its tables, or run with --initial"))),
                    (true, false, _) => out.push(finding("warn", format!("schema {s:?}: no CREATE privilege; schema changes will fail (GRANT CREATE, USAGE ON SCHEMA {s} TO the role)"))),
                }
            }
            Err(e) => out.push(finding("FAIL", client::describe(&e))),
        }
        // Tables the replicator would write that cannot take upserts.
        match c
            .query(
                "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
                   AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
                 ORDER BY 1",
                &[s],
            )
            .await
        {
            Ok(rows) => {
                for row in rows {
                    let t: String = row.get(0);
                    let source_schema = r
                        .schema_map
                        .iter()
                        .find(|(_, d)| *d == s)
                        .map_or(s.as_str(), |(src, _)| src.as_str());
                    if r.tables.matches(source_schema, &t) {
                        out.push(finding(
                            "FAIL",
                            format!(
                                "table {} has no primary key: updates and deletes need one \
                                 (ALTER TABLE … ADD PRIMARY KEY (the source's key columns))",
                                qualified(s, &t)
                            ),
                        ));
                    }
                }
            }
            Err(e) => out.push(finding("FAIL", client::describe(&e))),
        }
    }
    // Positions already applied by this group.
    if let Ok(rows) = c
        .query(
            "SELECT topic, kafka_partition, next_offset, events_applied FROM walrelay.applied
             WHERE consumer_group = $1 ORDER BY 1, 2",
            &[&runtime.group],
        )
        .await
    {
        for row in rows {
            let (t, p, n, e): (String, i32, i64, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            out.push(finding(
                "ok",
                format!(
                    "group {}: {t}[{p}] applied up to offset {n} ({e} records)",
                    runtime.group
                ),
            ));
        }
    }
    out
}
