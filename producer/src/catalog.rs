//! What the producer reads from Postgres' catalog: column types, keys, captured tables.

use std::collections::HashMap;

use tokio_postgres::Client;
use walrelay_common::postgres::{PgConnectError, PgTarget};

use crate::encode::{ColumnShape, TableShape};
use crate::value::{Kind, SESSION_OPTIONS};

/// A failure talking to Postgres on an ordinary (non-replication) connection.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Could not connect: transient or definite as the cause says (a bad certificate or
    /// password repeats; an unreachable server may come back).
    #[error(transparent)]
    Connect(#[from] PgConnectError),
    /// A query failed.
    #[error("{what}: {}", describe(source))]
    Query {
        /// What was being done.
        what: String,
        /// The server's answer.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The catalog does not hold what walrelay needs.
    #[error("{0}")]
    Catalog(String),
}

impl PgError {
    /// Whether retrying may help (connection trouble) rather than repeating the same failure.
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Connect(e) => e.is_transient(),
            PgError::Query { source, .. } => {
                if source.is_closed() {
                    return true;
                }
                // Connection exceptions, operator intervention (shutdown), insufficient
                // resources, system errors, serialization failures and deadlocks, objects in
                // use: all may pass. Everything else (including client-side errors) repeats.
                source.as_db_error().is_some_and(|db| {
                    let code = db.code().code();
                    ["08", "57", "53", "58"].iter().any(|c| code.starts_with(c))
                        || matches!(code, "40001" | "40P01" | "55006" | "55P03")
                })
            }
            PgError::Catalog(_) => false,
        }
    }

    pub(crate) fn query(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let what = what.into();
        move |source| PgError::Query { what, source }
    }
}

/// The server's message (and hint) when there is one; tokio-postgres' Display says only
/// "db error".
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.hint() {
            Some(h) => format!("{} ({}; hint: {h})", db.message(), db.code().code()),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        None => e.to_string(),
    }
}

/// Connects an ordinary session with walrelay's session settings.
pub async fn connect(target: &PgTarget) -> Result<Client, PgError> {
    let mut target = target.clone();
    target.config.options(SESSION_OPTIONS);
    Ok(target.connect("walrelay-producer").await?)
}

/// A captured table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    /// OID.
    pub oid: u32,
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// `r` ordinary, `p` partitioned.
    pub relkind: String,
    /// The publication's row filter of the table (`--row-filter`), as Postgres deparsed it;
    /// read by [`publication_tables`] only.
    pub row_filter: Option<String>,
}

impl TableRef {
    /// `schema.table` for messages.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The quoted SQL name.
    pub fn sql_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// Quotes an identifier for SQL.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a literal for SQL.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Reads types and shapes, caching type resolutions.
pub struct Catalog<'c> {
    client: &'c Client,
    kinds: HashMap<u32, Kind>,
    /// Columns already reported as having a type that no longer exists.
    warned: std::collections::HashSet<(u32, String, String)>,
}

impl<'c> Catalog<'c> {
    /// A catalog reader on `client`.
    pub fn new(client: &'c Client) -> Self {
        Self {
            client,
            kinds: HashMap::new(),
            warned: std::collections::HashSet::new(),
        }
    }

    /// The connection.
    pub fn client(&self) -> &'c Client {
        self.client
    }

    /// How values of column `column` of `table`, of type `oid`, convert; a type that no
    /// longer exists in the catalog is delivered as text, and said so once per column.
    pub async fn column_kind(
        &mut self,
        oid: u32,
        table: &str,
        column: &str,
    ) -> Result<Kind, PgError> {
        let kind = self.kind(oid).await?;
        if kind == Kind::Text
            && Kind::builtin(oid).is_none()
            && self
                .warned
                .insert((oid, table.to_string(), column.to_string()))
            && !self.type_exists(oid).await?
        {
            tracing::warn!(
                table,
                column,
                type_oid = oid,
                "The column's type no longer exists in the catalog (dropped after the change was written): its values are delivered as their text."
            );
        }
        Ok(kind)
    }

    async fn type_exists(&self, oid: u32) -> Result<bool, PgError> {
        Ok(self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_type WHERE oid = $1)",
                &[&oid],
            )
            .await
            .map_err(PgError::query(format!("reading type {oid}")))?
            .get(0))
    }

    /// How values of type `oid` convert; domains resolve to their base type.
    pub async fn kind(&mut self, oid: u32) -> Result<Kind, PgError> {
        if let Some(k) = Kind::builtin(oid) {
            return Ok(k);
        }
        if let Some(k) = self.kinds.get(&oid) {
            return Ok(k.clone());
        }
        let mut cur = oid;
        let kind = loop {
            if let Some(k) = Kind::builtin(cur) {
                break k;
            }
            let row = self
                .client
                .query_opt(
                    "SELECT typtype::text, typcategory::text, typelem, typbasetype \
                     FROM pg_type WHERE oid = $1",
                    &[&cur],
                )
                .await
                .map_err(PgError::query(format!("reading type {cur}")))?;
            // The type is gone (an enum replaced and dropped while the stream was behind):
            // pgoutput sends values as text, so they are delivered as text.
            let Some(row) = row else {
                break Kind::Text;
            };
            let typtype: String = row.get(0);
            let category: String = row.get(1);
            let elem: u32 = row.get(2);
            let base: u32 = row.get(3);
            if typtype == "d" {
                cur = base;
                continue;
            }
            if category == "A" && elem != 0 {
                let delim: String = self
                    .client
                    .query_one(
                        "SELECT typdelim::text FROM pg_type WHERE oid = $1",
                        &[&elem],
                    )
                    .await
                    .map_err(PgError::query(format!("reading type {elem}")))?
                    .get(0);
                let elem_kind = Box::pin(self.kind(elem)).await?;
                break Kind::Array {
                    elem: Box::new(elem_kind),
                    delim: delim.bytes().next().unwrap_or(b','),
                };
            }
            break Kind::Text;
        };
        self.kinds.insert(oid, kind.clone());
        Ok(kind)
    }

    /// Names of the primary-key columns, else of the replica-identity index, in key order.
    pub async fn key_columns(&self, rel: u32) -> Result<Vec<String>, PgError> {
        let rows = self
            .client
            .query(
                "SELECT i.indisprimary, a.attname::text, k.ord \
                 FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident) \
                 ORDER BY i.indisprimary DESC, k.ord",
                &[&rel],
            )
            .await
            .map_err(PgError::query(format!("reading the key of relation {rel}")))?;
        let primary = rows.first().map(|r| r.get::<_, bool>(0));
        Ok(rows
            .iter()
            .filter(|r| Some(r.get::<_, bool>(0)) == primary)
            .map(|r| r.get(1))
            .collect())
    }

    /// The shape of a table as the snapshot reads it: every column pgoutput publishes
    /// (generated columns are not published, so they are not read either).
    pub async fn snapshot_shape(&mut self, table: &TableRef) -> Result<TableShape, PgError> {
        let rows = self
            .client
            .query(
                "SELECT attname::text, atttypid, atttypmod FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' \
                 ORDER BY attnum",
                &[&table.oid],
            )
            .await
            .map_err(PgError::query(format!(
                "reading the columns of {}",
                table.qualified()
            )))?;
        let mut columns = Vec::with_capacity(rows.len());
        for r in &rows {
            let name: String = r.get(0);
            let oid: u32 = r.get(1);
            let kind = self.kind(oid).await?;
            columns.push(ColumnShape::new(&name, kind, false).with_type(oid, r.get(2)));
        }
        let keys = self.key_columns(table.oid).await?;
        Ok(build_shape(&table.schema, &table.name, columns, &keys))
    }
}

/// A shape whose key columns are found by name.
pub fn build_shape(
    schema: &str,
    table: &str,
    columns: Vec<ColumnShape>,
    keys: &[String],
) -> TableShape {
    let key_columns = keys
        .iter()
        .filter_map(|k| columns.iter().position(|c| &c.name == k))
        .collect::<Vec<_>>();
    // A key column missing from the published columns makes the key unusable.
    let key_columns = if key_columns.len() == keys.len() {
        key_columns
    } else {
        Vec::new()
    };
    TableShape::new(schema, table, columns, key_columns)
}

/// Every user table (ordinary or partitioned root) outside system schemas and walrelay's own.
pub async fn user_tables(client: &Client) -> Result<Vec<TableRef>, PgError> {
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'walrelay') \
               AND n.nspname NOT LIKE 'pg\\_%' \
             ORDER BY 2, 3",
            &[],
        )
        .await
        .map_err(PgError::query("listing tables"))?;
    Ok(rows
        .iter()
        .map(|r| TableRef {
            oid: r.get(0),
            schema: r.get(1),
            name: r.get(2),
            relkind: r.get(3),
            row_filter: None,
        })
        .collect())
}

/// Whether publication `name` exists.
pub async fn publication_exists(c: &Client, name: &str) -> Result<bool, PgError> {
    Ok(c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
        &[&name],
    )
    .await
    .map_err(PgError::query("reading pg_publication"))?
    .get(0))
}

/// The tables in publication `publication`.
pub async fn publication_tables(
    client: &Client,
    publication: &str,
) -> Result<Vec<TableRef>, PgError> {
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, p.rowfilter \
             FROM pg_publication_tables p \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             WHERE p.pubname = $1 AND p.schemaname <> 'walrelay' ORDER BY 2, 3",
            &[&publication],
        )
        .await
        .map_err(PgError::query(format!("reading publication {publication}")))?;
    Ok(rows
        .iter()
        .map(|r| TableRef {
            oid: r.get(0),
            schema: r.get(1),
            name: r.get(2),
            relkind: r.get(3),
            row_filter: r.get(4),
        })
        .collect())
}

/// `schema.table` glob patterns (`*` matches any run of characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePatterns(Vec<(String, String)>);

impl TablePatterns {
    /// Parses a comma-separated list; `None` means every table.
    pub fn parse(list: Option<&str>) -> Result<Self, String> {
        let Some(list) = list.filter(|l| !l.trim().is_empty()) else {
            return Ok(Self(vec![("*".into(), "*".into())]));
        };
        let mut out = Vec::new();
        for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match p.split_once('.') {
                Some((s, t)) if !s.is_empty() && !t.is_empty() && !t.contains('.') => {
                    out.push((s.to_string(), t.to_string()))
                }
                _ => {
                    return Err(format!(
                        "table pattern {p:?} is not of the form schema.table (use * as a wildcard, e.g. public.*)"
                    ));
                }
            }
        }
        Ok(Self(out))
    }

    /// The (schema, table) globs.
    pub fn patterns(&self) -> &[(String, String)] {
        &self.0
    }

    /// Whether `table` matches any pattern.
    pub fn matches(&self, table: &TableRef) -> bool {
        self.0
            .iter()
            .any(|(s, t)| glob(s, &table.schema) && glob(t, &table.name))
    }
}

/// Whether `s` matches the glob `pattern` (`*` matches any run of characters).
pub(crate) fn glob(pattern: &str, s: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = s.chars().collect();
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, n: &str) -> TableRef {
        TableRef {
            oid: 1,
            schema: s.into(),
            name: n.into(),
            relkind: "r".into(),
            row_filter: None,
        }
    }

    #[test]
    fn patterns() {
        let p = TablePatterns::parse(Some("public.*, sales.order_*")).expect("valid");
        assert!(p.matches(&t("public", "users")));
        assert!(p.matches(&t("sales", "order_items")));
        assert!(!p.matches(&t("sales", "customers")));
        assert!(
            TablePatterns::parse(None)
                .expect("valid")
                .matches(&t("x", "y"))
        );
        assert!(TablePatterns::parse(Some("users")).is_err());
        assert!(TablePatterns::parse(Some("a.b.c")).is_err());
        assert!(glob("*a*b", "xxaxxb"));
        assert!(!glob("a*b", "ab_"));
    }
}
