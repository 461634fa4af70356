//! Subscriptions: which endpoint gets which events. Kept in Postgres
//! (`walrelay.subscriptions` in the `--postgres-url` database), cached in memory and reloaded
//! every `--subscriptions-refresh`, so a change made through any notifier's API applies to
//! every notifier within seconds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;
use walrelay_common::event::Op;
use walrelay_common::postgres::PgTarget;

use super::signing::Secret;

/// The advisory lock (`pg_advisory_xact_lock`) that serialises creations, so that
/// `--max-subscriptions` holds across notifiers: "walrelay" in ASCII.
const CREATE_LOCK: i64 = 0x7761_6c72_656c_6179;

/// The table, created when missing.
const SCHEMA: &str = "
SET client_min_messages = warning;
CREATE SCHEMA IF NOT EXISTS walrelay;
CREATE TABLE IF NOT EXISTS walrelay.subscriptions (
    id text PRIMARY KEY,
    url text NOT NULL,
    schema_name text,
    table_name text,
    ops text[],
    secret text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz,
    disabled_reason text
);";

/// One subscription.
#[derive(Debug, Clone, Serialize)]
pub struct Subscription {
    /// `sub_…`.
    pub id: String,
    /// Endpoint.
    pub url: String,
    /// Only this schema, when set.
    pub schema: Option<String>,
    /// Only this table, when set.
    pub table: Option<String>,
    /// Only these ops (`c`, `u`, `d`, `r`, `t`, `ddl`), when set.
    pub ops: Option<Vec<String>>,
    /// When it was created.
    pub created_at: String,
    /// Why it was disabled (410 Gone), when it was.
    pub disabled: Option<String>,
    #[serde(skip)]
    secret: Option<Secret>,
}

impl Subscription {
    /// Whether an event of `op` on `schema.table` goes to this subscription.
    pub fn matches(&self, op: Op, schema: &str, table: &str) -> bool {
        self.disabled.is_none()
            && self.schema.as_deref().is_none_or(|s| s == schema)
            && self.table.as_deref().is_none_or(|t| t == table)
            && self
                .ops
                .as_ref()
                .is_none_or(|ops| ops.iter().any(|o| o == op.code()))
    }

    /// The signing secret.
    pub fn secret(&self) -> Option<&Secret> {
        self.secret.as_ref()
    }
}

/// A new subscription, validated.
#[derive(Debug, Clone)]
pub struct NewSubscription {
    /// Endpoint.
    pub url: String,
    /// Schema filter.
    pub schema: Option<String>,
    /// Table filter.
    pub table: Option<String>,
    /// Op filter.
    pub ops: Option<Vec<String>>,
    /// `whsec_…`.
    pub secret: String,
}

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Postgres unreachable or the connection broke (transient).
    #[error("subscriptions database unreachable: {0}")]
    Unreachable(String),
    /// A query failed.
    #[error("subscriptions query failed: {0}")]
    Query(String),
    /// Creating one more would pass `--max-subscriptions`.
    #[error("{count} subscriptions exist and --max-subscriptions allows {max}")]
    Full {
        /// Subscriptions now (disabled ones included).
        count: u64,
        /// The cap.
        max: u64,
    },
}

fn query_error(e: tokio_postgres::Error) -> StoreError {
    if e.is_closed() {
        StoreError::Unreachable(e.to_string())
    } else {
        StoreError::Query(
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_string()),
        )
    }
}

/// The store and its cache.
pub struct Store {
    target: PgTarget,
    client: tokio::sync::Mutex<Option<Client>>,
    cache: Mutex<Arc<Vec<Subscription>>>,
}

impl Store {
    /// A store on `config`; creates its table on first use.
    pub fn new(target: PgTarget) -> Self {
        Self {
            target,
            client: tokio::sync::Mutex::new(None),
            cache: Mutex::new(Arc::new(Vec::new())),
        }
    }

    async fn with_client<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: AsyncFnOnce(&mut Client) -> Result<T, tokio_postgres::Error>,
    {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let client = self
                .target
                .connect("walrelay-notifier")
                .await
                .map_err(|e| StoreError::Unreachable(e.to_string()))?;
            client.batch_execute(SCHEMA).await.map_err(query_error)?;
            *guard = Some(client);
        }
        let Some(client) = guard.as_mut() else {
            return Err(StoreError::Unreachable("no connection".into()));
        };
        f(client).await.map_err(query_error)
    }

    /// The cached subscriptions.
    pub fn current(&self) -> Arc<Vec<Subscription>> {
        Arc::clone(&walrelay_common::sync::lock(&self.cache))
    }

    /// Reloads the cache from Postgres.
    pub async fn refresh(&self) -> Result<usize, StoreError> {
        let rows = self
            .with_client(async |c| {
                c.query(
                    "SELECT id, url, schema_name, table_name, ops, secret, created_at::text, disabled_reason \
                     FROM walrelay.subscriptions ORDER BY created_at, id",
                    &[],
                )
                .await
            })
            .await?;
        let subs: Vec<Subscription> = rows
            .iter()
            .map(|r| {
                let secret: String = r.get(5);
                Subscription {
                    id: r.get(0),
                    url: r.get(1),
                    schema: r.get(2),
                    table: r.get(3),
                    ops: r.get(4),
                    created_at: r.get(6),
                    disabled: r.get(7),
                    secret: Secret::parse(&secret).ok(),
                }
            })
            .collect();
        let n = subs.len();
        *walrelay_common::sync::lock(&self.cache) = Arc::new(subs);
        Ok(n)
    }

    /// Reloads every `every` until `shutdown`.
    pub async fn keep_fresh(
        self: Arc<Self>,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "Could not reload the subscriptions; keeping the cached ones.");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Creates a subscription, unless `max` exist already (across every notifier of the
    /// database: the count and the insert happen under one advisory lock); returns it.
    pub async fn create(&self, new: NewSubscription, max: u64) -> Result<Subscription, StoreError> {
        let id = format!("sub_{}", random_id());
        let n = new.clone();
        let id2 = id.clone();
        let full = self
            .with_client(async move |c| {
                let tx = c.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CREATE_LOCK])
                    .await?;
                let count: i64 = tx
                    .query_one("SELECT count(*) FROM walrelay.subscriptions", &[])
                    .await?
                    .get(0);
                let count = u64::try_from(count).unwrap_or(0);
                if count >= max {
                    // Dropping the transaction rolls it back.
                    return Ok(Some(count));
                }
                tx.execute(
                    "INSERT INTO walrelay.subscriptions (id, url, schema_name, table_name, ops, secret) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&id2, &n.url, &n.schema, &n.table, &n.ops, &n.secret],
                )
                .await?;
                tx.commit().await?;
                Ok(None)
            })
            .await?;
        if let Some(count) = full {
            return Err(StoreError::Full { count, max });
        }
        self.refresh().await?;
        self.get(&id)
            .ok_or_else(|| StoreError::Query("the new subscription vanished".into()))
    }

    /// One subscription, from the cache.
    pub fn get(&self, id: &str) -> Option<Subscription> {
        self.current().iter().find(|s| s.id == id).cloned()
    }

    /// Deletes a subscription; whether it existed.
    pub async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        let n = self
            .with_client(async move |c| {
                c.execute("DELETE FROM walrelay.subscriptions WHERE id = $1", &[&id])
                    .await
            })
            .await?;
        self.refresh().await?;
        Ok(n > 0)
    }

    /// Disables a subscription (its endpoint answered 410 Gone).
    pub async fn disable(&self, id: &str, reason: &str) -> Result<(), StoreError> {
        let (id, reason) = (id.to_string(), reason.to_string());
        self.with_client(async move |c| {
            c.execute(
                "UPDATE walrelay.subscriptions SET disabled_at = now(), disabled_reason = $2 \
                 WHERE id = $1 AND disabled_at IS NULL",
                &[&id, &reason],
            )
            .await
        })
        .await?;
        self.refresh().await?;
        Ok(())
    }
}

fn random_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    (0..20)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}
