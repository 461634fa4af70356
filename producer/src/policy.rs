//! What leaves the database: excluded columns, masked columns and row filters.
//!
//! # The invariant
//!
//! A column named by `--columns-exclude` never appears in anything the producer writes: not in
//! a row image (before or after, any op, snapshot or stream), not in a key, not in `types`,
//! `column_ids` or `key`, not in a schema event's column list, and not in an Avro schema or
//! record. A column named by `--columns-mask` appears only as its mask: `hash` (the hex
//! SHA-256 of the `--mask-salt` bytes followed by the value's Postgres text) or `redact` (the
//! fixed string [`REDACTED`]), typed as `text` everywhere a type is said. NULL stays NULL and an
//! unchanged TOAST value stays marked unchanged (it is not hashed: its value is not in the
//! change).
//!
//! The invariant is kept in **one place**, the emitter ([`crate::emit::Emitter`]): the
//! listener, the snapshot workers and the schema-event code all hand it the table's full shape
//! and full rows, and it projects both through this module before any codec sees them:
//!
//! ```text
//!   source shape ──▶ Projection (cached per shape fingerprint) ──▶ output shape ──▶ codec
//!   source cells ──▶ drop excluded, mask masked (salted SHA-256) ──▶ output cells ──▶ codec/key
//!   SchemaChange ──▶ drop excluded, masked typed text, default and statement withheld
//! ```
//!
//! Because the snapshot (COPY text) and the stream (pgoutput text) carry the same Postgres
//! text form of a value, a hash is the same in both, and joins on hashed values still work.
//!
//! Rules are by name (`schema.table.column` globs, `*` as in `--tables`): a column renamed
//! out of a pattern is no longer covered, and one renamed into it is from its next event on.
//! Where both an exclusion and a mask match a column, the exclusion wins.
//!
//! # Keys
//!
//! A table's key (primary key, else replica-identity index) addresses its rows for every
//! consumer: excluding a key column, or redacting it (every row would get the same key), is
//! refused. It is checked at start (`init`, `run`, `check`), and again whenever a table's
//! shape is first seen by the emitter (a table created later, a key changed by `ALTER TABLE`):
//! there the producer stops with [`PolicyError`] (definite) instead of writing a broken key.
//! A key column may be hashed: the same input gives the same hash, so keys stay stable.
//!
//! # Row filters
//!
//! `--row-filter 'schema.table: predicate'` is a PG15 publication row filter: `init` writes it
//! into the publication (`ALTER PUBLICATION … ADD TABLE t WHERE (predicate)`) and records it in
//! `walrelay.capture_filter`, where the DDL trigger finds it for a matching table created later;
//! the snapshot reads each table's filter back from `pg_publication_tables.rowfilter`, so the
//! snapshot and the stream apply exactly the same predicate. `run` refuses to start when the
//! recorded filters are not the configured ones (`init` applies a change).

use std::borrow::Cow;
use std::fmt;

use sha2::{Digest, Sha256};
use walrelay_common::event::SchemaChange;

use crate::catalog::{PgError, glob};
use crate::encode::{ColumnShape, TableShape};
use crate::replication::pgoutput::Cell;
use crate::value::Kind;

/// What a redacted value becomes.
pub const REDACTED: &str = "***";

/// The OID of `text`: the type a masked column is said to have.
pub const TEXT_OID: u32 = 25;

/// A salt shorter than this lets anyone with a list of candidate values find the hashed ones.
pub const MIN_SALT_BYTES: usize = 16;

/// How a masked column's values are rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskKind {
    /// Hex SHA-256 of the salt followed by the value's text.
    Hash,
    /// [`REDACTED`].
    Redact,
}

/// The `--mask-salt` secret: its `Debug` and `Display` never show it.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct MaskSalt(String);

impl MaskSalt {
    /// A salt.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for MaskSalt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MaskSalt(<redacted>)")
    }
}

impl std::str::FromStr for MaskSalt {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// A `schema.table.column` glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnPattern {
    schema: String,
    table: String,
    column: String,
}

impl ColumnPattern {
    /// Parses `schema.table.column` (each part non-empty, `*` a wildcard).
    pub fn parse(p: &str) -> Result<Self, String> {
        let parts: Vec<&str> = p.split('.').collect();
        match parts.as_slice() {
            [s, t, c] if !s.is_empty() && !t.is_empty() && !c.is_empty() => Ok(Self {
                schema: s.to_string(),
                table: t.to_string(),
                column: c.to_string(),
            }),
            _ => Err(format!(
                "column pattern {p:?} is not of the form schema.table.column (use * as a wildcard, e.g. public.*.password_hash)"
            )),
        }
    }

    /// Whether the pattern covers `column` of `schema.table`.
    pub fn matches(&self, schema: &str, table: &str, column: &str) -> bool {
        glob(&self.schema, schema) && glob(&self.table, table) && glob(&self.column, column)
    }

    /// Whether the pattern covers some column of `schema.table`.
    pub fn matches_table(&self, schema: &str, table: &str) -> bool {
        glob(&self.schema, schema) && glob(&self.table, table)
    }
}

impl fmt::Display for ColumnPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.schema, self.table, self.column)
    }
}

/// What happens to one column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Written as it is.
    Keep,
    /// Never written.
    Exclude,
    /// Written masked.
    Mask(MaskKind),
}

/// A key column the policy would remove or make useless.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// An excluded key column (definite).
    #[error(
        "--columns-exclude: column {column:?} of {table} is part of its key (primary key or replica identity index), which addresses its rows in Kafka; excluding it would leave the key unusable. Mask it instead (--columns-mask {table}.{column}=hash keeps the key stable), or narrow the pattern {pattern}"
    )]
    KeyExcluded {
        /// `schema.table`.
        table: String,
        /// Column.
        column: String,
        /// The pattern that matched.
        pattern: String,
    },
    /// A redacted key column (definite).
    #[error(
        "--columns-mask: column {column:?} of {table} is part of its key (primary key or replica identity index): redacting it would give every row the same key. Use {table}.{column}=hash (the same value keeps the same hash), or narrow the pattern {pattern}"
    )]
    KeyRedacted {
        /// `schema.table`.
        table: String,
        /// Column.
        column: String,
        /// The pattern that matched.
        pattern: String,
    },
}

/// The column rules of `--columns-exclude` and `--columns-mask`, with the salt.
#[derive(Debug, Clone, Default)]
pub struct ColumnPolicy {
    exclude: Vec<ColumnPattern>,
    mask: Vec<(ColumnPattern, MaskKind)>,
    salt: MaskSalt,
}

fn split_list(list: Option<&str>) -> impl Iterator<Item = &str> {
    list.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

impl ColumnPolicy {
    /// Parses `--columns-exclude` (comma-separated patterns).
    pub fn parse_exclude(list: Option<&str>) -> Result<Vec<ColumnPattern>, String> {
        split_list(list).map(ColumnPattern::parse).collect()
    }

    /// Parses `--columns-mask` (comma-separated `pattern=hash|redact`).
    pub fn parse_mask(list: Option<&str>) -> Result<Vec<(ColumnPattern, MaskKind)>, String> {
        split_list(list)
            .map(|item| {
                let (p, kind) = item.split_once('=').ok_or_else(|| {
                    format!("{item:?} names no mask: write schema.table.column=hash or =redact")
                })?;
                let kind = match kind.trim() {
                    "hash" => MaskKind::Hash,
                    "redact" => MaskKind::Redact,
                    other => {
                        return Err(format!(
                            "{item:?}: unknown mask {other:?}; the masks are hash (salted SHA-256, joinable) and redact (a fixed placeholder)"
                        ));
                    }
                };
                Ok((ColumnPattern::parse(p.trim())?, kind))
            })
            .collect()
    }

    /// A policy; the salt is checked by [`crate::config::Settings`].
    pub fn new(
        exclude: Vec<ColumnPattern>,
        mask: Vec<(ColumnPattern, MaskKind)>,
        salt: MaskSalt,
    ) -> Self {
        Self {
            exclude,
            mask,
            salt,
        }
    }

    /// No rule at all: events are written as they are.
    pub fn is_empty(&self) -> bool {
        self.exclude.is_empty() && self.mask.is_empty()
    }

    /// Whether some mask hashes (and so needs the salt).
    pub fn hashes(&self) -> bool {
        self.mask.iter().any(|(_, k)| *k == MaskKind::Hash)
    }

    /// Whether the salt is empty.
    pub fn salt_missing(&self) -> bool {
        self.salt.is_empty()
    }

    /// The salt's length in bytes (never its value).
    pub fn salt_len(&self) -> usize {
        self.salt.bytes().len()
    }

    /// The exclusion patterns.
    pub fn excluded(&self) -> &[ColumnPattern] {
        &self.exclude
    }

    /// The mask patterns.
    pub fn masked(&self) -> &[(ColumnPattern, MaskKind)] {
        &self.mask
    }

    /// What happens to `column` of `schema.table`, and the pattern that decided it.
    pub fn rule_with_pattern(
        &self,
        schema: &str,
        table: &str,
        column: &str,
    ) -> (Rule, Option<&ColumnPattern>) {
        if let Some(p) = self
            .exclude
            .iter()
            .find(|p| p.matches(schema, table, column))
        {
            return (Rule::Exclude, Some(p));
        }
        if let Some((p, k)) = self
            .mask
            .iter()
            .find(|(p, _)| p.matches(schema, table, column))
        {
            return (Rule::Mask(*k), Some(p));
        }
        (Rule::Keep, None)
    }

    /// What happens to `column` of `schema.table`.
    pub fn rule(&self, schema: &str, table: &str, column: &str) -> Rule {
        self.rule_with_pattern(schema, table, column).0
    }

    /// Whether any rule may touch a column of `schema.table`.
    pub fn touches_table(&self, schema: &str, table: &str) -> bool {
        self.exclude.iter().any(|p| p.matches_table(schema, table))
            || self
                .mask
                .iter()
                .any(|(p, _)| p.matches_table(schema, table))
    }

    /// Refuses a key the policy would break: `keys` are the key column names of
    /// `schema.table`.
    pub fn check_key(&self, schema: &str, table: &str, keys: &[&str]) -> Result<(), PolicyError> {
        for &k in keys {
            match self.rule_with_pattern(schema, table, k) {
                (Rule::Exclude, p) => {
                    return Err(PolicyError::KeyExcluded {
                        table: format!("{schema}.{table}"),
                        column: k.to_string(),
                        pattern: p.map(ToString::to_string).unwrap_or_default(),
                    });
                }
                (Rule::Mask(MaskKind::Redact), p) => {
                    return Err(PolicyError::KeyRedacted {
                        table: format!("{schema}.{table}"),
                        column: k.to_string(),
                        pattern: p.map(ToString::to_string).unwrap_or_default(),
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The projection of `shape`: `None` when no rule touches it (it is written as it is).
    pub fn project(&self, shape: &TableShape) -> Result<Option<Projection>, PolicyError> {
        if self.is_empty() || !self.touches_table(&shape.schema, &shape.table) {
            return Ok(None);
        }
        let keys: Vec<&str> = shape
            .key_columns
            .iter()
            .filter_map(|&i| shape.columns.get(i).map(|c| c.name.as_str()))
            .collect();
        self.check_key(&shape.schema, &shape.table, &keys)?;
        let slots: Vec<Rule> = shape
            .columns
            .iter()
            .map(|c| self.rule(&shape.schema, &shape.table, &c.name))
            .collect();
        if slots.iter().all(|r| *r == Rule::Keep) {
            return Ok(None);
        }
        let mut out_index = Vec::with_capacity(slots.len());
        let mut columns = Vec::with_capacity(slots.len());
        let mut ids = Vec::with_capacity(slots.len());
        for (i, (col, rule)) in shape.columns.iter().zip(&slots).enumerate() {
            match rule {
                Rule::Exclude => out_index.push(None),
                Rule::Keep => {
                    out_index.push(Some(columns.len()));
                    columns.push(col.clone());
                    ids.extend(shape.column_ids.get(i));
                }
                Rule::Mask(_) => {
                    out_index.push(Some(columns.len()));
                    columns.push(
                        ColumnShape::new(&col.name, Kind::Text, col.is_identity)
                            .with_type(TEXT_OID, -1),
                    );
                    ids.extend(shape.column_ids.get(i));
                }
            }
        }
        let key_columns = shape
            .key_columns
            .iter()
            .filter_map(|&i| out_index.get(i).copied().flatten())
            .collect();
        let mut out = TableShape::new(&shape.schema, &shape.table, columns, key_columns);
        if shape.schema_version != 0 || !shape.column_ids.is_empty() {
            out.set_schema(shape.schema_version, ids);
        }
        Ok(Some(Projection {
            shape: out,
            slots,
            salt: self.salt.clone(),
        }))
    }

    /// `change` as the policy lets it out: excluded columns removed, masked ones typed `text`
    /// without their default, and the statement withheld when it names a covered column
    /// (a statement may carry a default or a literal of it).
    pub fn schema_change<'c>(
        &self,
        schema: &str,
        table: &str,
        change: &'c SchemaChange,
    ) -> Cow<'c, SchemaChange> {
        if self.is_empty() || !self.touches_table(schema, table) {
            return Cow::Borrowed(change);
        }
        let mut out = change.clone();
        out.columns
            .retain(|c| self.rule(schema, table, &c.name) != Rule::Exclude);
        for c in &mut out.columns {
            if let Rule::Mask(_) = self.rule(schema, table, &c.name) {
                c.type_name = "text".into();
                c.type_oid = TEXT_OID;
                c.logical = "text".into();
                c.default = None;
            }
        }
        if out
            .sql
            .as_deref()
            .is_some_and(|sql| self.statement_names_covered(schema, table, sql))
        {
            out.sql = None;
        }
        Cow::Owned(out)
    }

    /// Whether some word of `sql` (an identifier, unquoted or double-quoted, as written or
    /// folded to lower case) is a column name the policy covers in `schema.table`.
    fn statement_names_covered(&self, schema: &str, table: &str, sql: &str) -> bool {
        sql.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .filter(|w| !w.is_empty())
            .any(|w| {
                self.rule(schema, table, w) != Rule::Keep
                    || self.rule(schema, table, &w.to_lowercase()) != Rule::Keep
            })
    }
}

/// A table's shape as the policy lets it out, and how its rows are rewritten.
#[derive(Debug, Clone)]
pub struct Projection {
    /// The output shape (the codecs' and the key's).
    pub shape: TableShape,
    /// Per source column.
    slots: Vec<Rule>,
    salt: MaskSalt,
}

/// The masked values of one row, owned (the output cells borrow them).
#[derive(Debug, Default)]
pub struct Masked {
    text: Vec<u8>,
    /// Per source column, the range of its mask in `text`.
    spans: Vec<(usize, usize)>,
}

impl Projection {
    /// Computes the masked values of `row` (source column order).
    pub fn mask(&self, row: &[Cell<'_>]) -> Masked {
        let mut m = Masked {
            text: Vec::new(),
            spans: vec![(0, 0); self.slots.len()],
        };
        for (i, rule) in self.slots.iter().enumerate() {
            let Rule::Mask(kind) = rule else { continue };
            let value: &[u8] = match row.get(i).copied().unwrap_or(Cell::Null) {
                Cell::Text(t) => t,
                Cell::Binary(b) => b,
                Cell::Null | Cell::UnchangedToast => continue,
            };
            let start = m.text.len();
            match kind {
                MaskKind::Redact => m.text.extend_from_slice(REDACTED.as_bytes()),
                MaskKind::Hash => m
                    .text
                    .extend_from_slice(hash_hex(&self.salt, value).as_bytes()),
            }
            m.spans[i] = (start, m.text.len());
        }
        m
    }

    /// The output cells of `row`, with the masks of `masked` (from [`Projection::mask`] of the
    /// same row).
    pub fn cells<'c>(&self, row: &[Cell<'c>], masked: &'c Masked) -> Vec<Cell<'c>> {
        let mut out = Vec::with_capacity(self.slots.len());
        for (i, rule) in self.slots.iter().enumerate() {
            let cell = row.get(i).copied().unwrap_or(Cell::Null);
            match rule {
                Rule::Exclude => {}
                Rule::Keep => out.push(cell),
                Rule::Mask(_) => out.push(match cell {
                    Cell::Null => Cell::Null,
                    Cell::UnchangedToast => Cell::UnchangedToast,
                    Cell::Text(_) | Cell::Binary(_) => {
                        let (a, b) = masked.spans.get(i).copied().unwrap_or((0, 0));
                        Cell::Text(masked.text.get(a..b).unwrap_or_default())
                    }
                }),
            }
        }
        out
    }
}

/// Hex SHA-256 of `salt` followed by `value`.
pub fn hash_hex(salt: &MaskSalt, value: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(salt.bytes());
    h.update(value);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// One `--row-filter`: a `schema.table` glob and a SQL predicate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RowFilter {
    /// Schema glob.
    pub schema: String,
    /// Table glob.
    pub table: String,
    /// The predicate, as given (Postgres checks it when `init` writes it).
    pub predicate: String,
}

impl RowFilter {
    /// Whether the filter covers `schema.table`.
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        glob(&self.schema, schema) && glob(&self.table, table)
    }

    /// `schema.table` as given.
    pub fn target(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// Splits `s` at `;` outside single-quoted literals and double-quoted identifiers (dollar
/// quoting is not recognised: write such a literal with '…').
fn split_filters(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut single, mut double) = (false, false);
    for c in s.chars() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            ';' if !single && !double => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|f| f.trim().to_string())
        .filter(|f| !f.is_empty())
        .collect()
}

/// Parses `--row-filter` values: each `schema.table: predicate`, several in one value
/// separated by `;` (outside quotes).
pub fn parse_row_filters(values: &[String]) -> Result<Vec<RowFilter>, String> {
    let mut out: Vec<RowFilter> = Vec::new();
    for value in values {
        for f in split_filters(value) {
            let (target, predicate) = f.split_once(':').ok_or_else(|| {
                format!(
                    "{f:?} is not of the form 'schema.table: predicate' (e.g. 'public.orders: region = ''eu''')"
                )
            })?;
            let predicate = predicate.trim();
            let target = target.trim();
            let (schema, table) = match target.split_once('.') {
                Some((s, t)) if !s.is_empty() && !t.is_empty() && !t.contains('.') => (s, t),
                _ => {
                    return Err(format!(
                        "{target:?} (in {f:?}) is not a schema.table pattern (use * as a wildcard, e.g. public.orders)"
                    ));
                }
            };
            if predicate.is_empty() {
                return Err(format!("{f:?} has no predicate after the ':'"));
            }
            if out.iter().any(|o| o.schema == schema && o.table == table) {
                return Err(format!(
                    "{target} has two filters: combine them into one predicate with AND/OR"
                ));
            }
            out.push(RowFilter {
                schema: schema.to_string(),
                table: table.to_string(),
                predicate: predicate.to_string(),
            });
        }
    }
    Ok(out)
}

/// The captured tables' keys against the column policy: the first key the policy would break.
pub async fn check_keys(
    client: &tokio_postgres::Client,
    policy: &ColumnPolicy,
    tables: &[crate::catalog::TableRef],
) -> Result<(), PgError> {
    if policy.is_empty() {
        return Ok(());
    }
    let catalog = crate::catalog::Catalog::new(client);
    for t in tables {
        if !policy.touches_table(&t.schema, &t.name) {
            continue;
        }
        let keys = catalog.key_columns(t.oid).await?;
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        policy
            .check_key(&t.schema, &t.name, &keys)
            .map_err(|e| PgError::Catalog(e.to_string()))?;
    }
    Ok(())
}

/// Each captured table with the filter that covers it. A table covered by two filters is
/// refused, and so is an exact `schema.table` that names no captured table (a typo would
/// silently filter nothing); a pattern matching none yet is only warned about (it applies to
/// tables created later).
pub fn filters_of<'f>(
    filters: &'f [RowFilter],
    tables: &[crate::catalog::TableRef],
) -> Result<Vec<(crate::catalog::TableRef, &'f RowFilter)>, PgError> {
    let mut out = Vec::new();
    for f in filters {
        if tables.iter().any(|t| f.matches(&t.schema, &t.name)) {
            continue;
        }
        // A pattern may be meant for tables created later (the DDL trigger applies it then);
        // an exact name that matches nothing is a mistake.
        if f.schema.contains('*') || f.table.contains('*') {
            tracing::warn!(
                filter = %f.target(),
                "--row-filter matches no captured table yet: it applies to matching tables created later."
            );
        } else {
            return Err(PgError::Catalog(format!(
                "--row-filter {}: no table captured by --tables matches it; check the name, or add the table to --tables",
                f.target()
            )));
        }
    }
    for t in tables {
        let mut covering = filters.iter().filter(|f| f.matches(&t.schema, &t.name));
        if let Some(f) = covering.next() {
            if let Some(g) = covering.next() {
                return Err(PgError::Catalog(format!(
                    "--row-filter: {} is covered by both {} and {}; a table has one filter, combine them with AND/OR",
                    t.qualified(),
                    f.target(),
                    g.target()
                )));
            }
            out.push((t.clone(), f));
        }
    }
    Ok(out)
}

/// Writes the row filters into the publication inside `tx` (which already set the
/// publication's table list, without filters): per filtered table `DROP TABLE` and
/// `ADD TABLE … WHERE (…)`, so a refused predicate is reported with its table; then checks
/// that each predicate uses replica-identity columns only (Postgres checks that only when an
/// UPDATE or DELETE runs, and then refuses the application's statement), and records the
/// filters for the DDL trigger and for `run`.
pub async fn apply_row_filters(
    tx: &tokio_postgres::Transaction<'_>,
    publication: &str,
    filters: &[RowFilter],
    filtered: &[(crate::catalog::TableRef, &RowFilter)],
) -> Result<(), PgError> {
    use crate::catalog::{describe, quote_ident};
    let publication_sql = quote_ident(publication);
    for (t, f) in filtered {
        tx.batch_execute(&format!(
            "ALTER PUBLICATION {publication_sql} DROP TABLE {}",
            t.sql_name()
        ))
        .await
        .map_err(PgError::query(format!(
            "setting the row filter of {}",
            t.qualified()
        )))?;
        tx.batch_execute(&format!(
            "ALTER PUBLICATION {publication_sql} ADD TABLE {} WHERE ({})",
            t.sql_name(),
            f.predicate
        ))
        .await
        .map_err(|e| {
            PgError::Catalog(format!(
                "--row-filter {}: Postgres refused the predicate for {}: {}. A row filter is one boolean expression over the table's columns using built-in immutable functions and operators only (no subqueries, user-defined functions or system columns)",
                f.target(),
                t.qualified(),
                describe(&e)
            ))
        })?;
        let outside: Vec<String> = tx
            .query(
                "SELECT a.attname::text FROM pg_publication_rel pr \
                 JOIN pg_publication p ON p.oid = pr.prpubid \
                 JOIN pg_class c ON c.oid = pr.prrelid \
                 JOIN pg_depend d ON d.classid = 'pg_publication_rel'::regclass AND d.objid = pr.oid \
                      AND d.refclassid = 'pg_class'::regclass AND d.refobjid = pr.prrelid AND d.refobjsubid > 0 \
                 JOIN pg_attribute a ON a.attrelid = pr.prrelid AND a.attnum = d.refobjsubid \
                 WHERE p.pubname = $1 AND pr.prrelid = $2 AND c.relreplident <> 'f' \
                   AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = pr.prrelid \
                       AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident)) \
                       AND a.attnum = ANY (i.indkey::int2[])) \
                 ORDER BY a.attnum",
                &[&publication, &t.oid],
            )
            .await
            .map_err(PgError::query(format!("reading the row filter of {}", t.qualified())))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !outside.is_empty() {
            return Err(PgError::Catalog(format!(
                "--row-filter {}: the predicate uses {} of {}, outside its replica identity; Postgres would then refuse every UPDATE and DELETE of the table (\"cannot update table … Column used in the publication WHERE expression is not part of the replica identity\"). Filter on key columns only, or ALTER TABLE {} REPLICA IDENTITY FULL",
                f.target(),
                outside
                    .iter()
                    .map(|c| format!("{c:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                t.qualified(),
                t.sql_name()
            )));
        }
    }
    tx.execute(
        "DELETE FROM walrelay.capture_filter WHERE publication = $1",
        &[&publication],
    )
    .await
    .map_err(PgError::query("clearing walrelay.capture_filter"))?;
    for f in filters {
        tx.execute(
            "INSERT INTO walrelay.capture_filter (publication, pattern, schema_like, table_like, predicate) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &publication,
                &f.target(),
                &crate::ddl::capture::like_pattern(&f.schema),
                &crate::ddl::capture::like_pattern(&f.table),
                &f.predicate,
            ],
        )
        .await
        .map_err(PgError::query("writing walrelay.capture_filter"))?;
    }
    Ok(())
}

/// `run`: the filters `init` recorded must be the configured ones.
pub async fn verify_row_filters(
    client: &tokio_postgres::Client,
    publication: &str,
    filters: &[RowFilter],
) -> Result<(), String> {
    let recorded: Vec<(String, String)> = match client
        .query(
            "SELECT pattern, predicate FROM walrelay.capture_filter WHERE publication = $1 ORDER BY 1",
            &[&publication],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        // Set up by an older `init` (no table): no filter was applied.
        Err(e) if e.as_db_error().map(|d| d.code().code()) == Some("42P01") => Vec::new(),
        Err(e) => return Err(format!("reading walrelay.capture_filter: {}", crate::catalog::describe(&e))),
    };
    let mut configured: Vec<(String, String)> = filters
        .iter()
        .map(|f| (f.target(), f.predicate.clone()))
        .collect();
    configured.sort();
    if recorded == configured {
        return Ok(());
    }
    let show = |v: &[(String, String)]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter()
                .map(|(t, p)| format!("{t}: {p}"))
                .collect::<Vec<_>>()
                .join("; ")
        }
    };
    Err(format!(
        "--row-filter differs from what `init` applied to publication {publication:?} (applied: {}; configured: {}): run `walrelay-producer init` with the same options to apply it. A changed filter takes effect from that point of the stream on; rows it newly lets through are not snapshotted again",
        show(&recorded),
        show(&configured)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(exclude: &str, mask: &str) -> ColumnPolicy {
        ColumnPolicy::new(
            ColumnPolicy::parse_exclude(Some(exclude)).expect("valid exclude"),
            ColumnPolicy::parse_mask(Some(mask)).expect("valid mask"),
            MaskSalt::new("pepper-pepper-pepper"),
        )
    }

    fn users() -> TableShape {
        let mut s = TableShape::new(
            "public",
            "users",
            vec![
                ColumnShape::new("id", Kind::Int, true).with_type(23, -1),
                ColumnShape::new("email", Kind::Text, false).with_type(25, -1),
                ColumnShape::new("password_hash", Kind::Text, false).with_type(25, -1),
                ColumnShape::new("age", Kind::Int, false).with_type(23, -1),
            ],
            vec![0],
        );
        s.set_schema(7, vec![1, 2, 3, 4]);
        s
    }

    #[test]
    fn patterns_and_masks_parse_or_say_what_is_wrong() {
        assert!(ColumnPolicy::parse_exclude(Some("public.*.password_hash, a.b.c")).is_ok());
        let e = ColumnPolicy::parse_exclude(Some("public.users")).expect_err("two parts");
        assert!(e.contains("schema.table.column"), "{e}");
        let e = ColumnPolicy::parse_mask(Some("public.users.email=scramble")).expect_err("kind");
        assert!(e.contains("unknown mask \"scramble\""), "{e}");
        assert!(e.contains("hash") && e.contains("redact"), "{e}");
        let e = ColumnPolicy::parse_mask(Some("public.users.email")).expect_err("no kind");
        assert!(e.contains("names no mask"), "{e}");
    }

    #[test]
    fn projection_drops_masks_and_retypes() {
        let p = policy(
            "public.*.password_hash",
            "public.users.email=hash,*.*.age=redact",
        );
        let proj = p.project(&users()).expect("allowed").expect("touched");
        let names: Vec<&str> = proj.shape.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "email", "age"]);
        assert_eq!(proj.shape.column_ids, vec![1, 2, 4]);
        assert_eq!(proj.shape.columns[1].type_oid, TEXT_OID);
        assert_eq!(proj.shape.columns[2].kind, Kind::Text);
        assert_eq!(proj.shape.key_columns, vec![0]);
        let row = [
            Cell::Text(b"1"),
            Cell::Text(b"a@example.com"),
            Cell::Text(b"$2b$secret"),
            Cell::Null,
        ];
        let m = proj.mask(&row);
        let cells = proj.cells(&row, &m);
        let expected = hash_hex(&MaskSalt::new("pepper-pepper-pepper"), b"a@example.com");
        assert_eq!(cells.len(), 3);
        assert_eq!(cells[0], Cell::Text(b"1"));
        assert_eq!(cells[1], Cell::Text(expected.as_bytes()));
        assert_eq!(cells[2], Cell::Null, "NULL stays NULL");
        let toast = [
            Cell::Text(b"1"),
            Cell::UnchangedToast,
            Cell::UnchangedToast,
            Cell::Text(b"40"),
        ];
        let m = proj.mask(&toast);
        let cells = proj.cells(&toast, &m);
        assert_eq!(
            cells[1],
            Cell::UnchangedToast,
            "unchanged TOAST is not hashed"
        );
        assert_eq!(cells[2], Cell::Text(REDACTED.as_bytes()));
        // FIPS 180-2's test vector: SHA-256("abc"), here salt "a" followed by "bc".
        assert_eq!(
            hash_hex(&MaskSalt::new("a"), b"bc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(
            p.project(&TableShape::new("x", "y", vec![], vec![]))
                .expect("ok")
                .is_none()
        );
    }

    #[test]
    fn key_columns_cannot_be_excluded_or_redacted() {
        let e = policy("public.users.id", "")
            .project(&users())
            .expect_err("excluded key");
        let msg = e.to_string();
        assert!(msg.starts_with("--columns-exclude"), "{msg}");
        assert!(
            msg.contains("public.users") && msg.contains("\"id\""),
            "{msg}"
        );
        assert!(msg.contains("--columns-mask public.users.id=hash"), "{msg}");
        let e = policy("", "public.*.id=redact")
            .project(&users())
            .expect_err("redacted key");
        assert!(e.to_string().contains("=hash"), "{e}");
        assert!(policy("", "public.users.id=hash").project(&users()).is_ok());
    }

    #[test]
    fn schema_events_lose_covered_columns_and_statements() {
        let p = policy("public.users.password_hash", "public.users.email=hash");
        let col = |id, name: &str| walrelay_common::event::ColumnSchema {
            id,
            name: name.into(),
            type_name: "character varying(20)".into(),
            type_oid: 1043,
            logical: "text".into(),
            nullable: true,
            default: Some("'x'::text".into()),
            key_position: None,
            generated: false,
            identity: false,
        };
        let change = SchemaChange {
            origin: "trigger".into(),
            command: Some("ALTER TABLE".into()),
            object: Some("public.users".into()),
            sql: Some("ALTER TABLE users ADD COLUMN Password_Hash text DEFAULT 'x'".into()),
            previous: None,
            dropped: false,
            table_oid: 1,
            columns: vec![col(1, "id"), col(2, "email"), col(3, "password_hash")],
        };
        let out = p.schema_change("public", "users", &change);
        let names: Vec<&str> = out.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "email"]);
        assert_eq!(out.columns[1].type_name, "text");
        assert_eq!(out.columns[1].default, None);
        assert_eq!(out.sql, None, "the statement names an excluded column");
        let other = SchemaChange {
            sql: Some("ALTER TABLE users ADD COLUMN nickname text".into()),
            ..change.clone()
        };
        assert!(p.schema_change("public", "users", &other).sql.is_some());
    }

    #[test]
    fn row_filters_parse() {
        let f = parse_row_filters(&[
            "public.orders: status <> 'a;b'; public.items : qty > 0".into(),
            "sales.*: region = 'eu'".into(),
        ])
        .expect("valid");
        assert_eq!(f.len(), 3);
        assert_eq!(f[0].predicate, "status <> 'a;b'");
        assert_eq!(f[1].target(), "public.items");
        assert!(f[2].matches("sales", "x"));
        let e = parse_row_filters(&["public.orders status > 1".into()]).expect_err("no colon");
        assert!(e.contains("schema.table: predicate"), "{e}");
        let e = parse_row_filters(&["orders: x > 1".into()]).expect_err("no schema");
        assert!(e.contains("schema.table pattern"), "{e}");
        let e = parse_row_filters(&["public.t:   ".into()]).expect_err("empty");
        assert!(e.contains("no predicate"), "{e}");
        let e = parse_row_filters(&["public.t: a > 1; public.t: b > 1".into()]).expect_err("twice");
        assert!(e.contains("two filters"), "{e}");
    }

    #[test]
    fn avro_schemas_are_built_from_the_projection() {
        let p = policy("public.users.password_hash", "public.users.age=hash");
        let proj = p.project(&users()).expect("allowed").expect("touched");
        let built = crate::avro::schema::table("app", &proj.shape).expect("schemas");
        assert!(!built.value.contains("password_hash"), "{}", built.value);
        let value: serde_json::Value = serde_json::from_str(&built.value).expect("json");
        let text = value.to_string();
        // `age` is an int4 in the table; masked, it is a string.
        let age = text
            .find("\"name\":\"age\"")
            .map(|i| &text[i..(i + 120).min(text.len())])
            .unwrap_or_default();
        assert!(age.contains("string") && !age.contains("\"int\""), "{age}");
        assert!(built.key.is_some_and(|k| k.contains("\"id\"")));
    }

    #[test]
    fn the_salt_never_prints() {
        let p = policy("", "public.users.email=hash");
        assert!(!format!("{p:?}").contains("pepper"));
    }
}
