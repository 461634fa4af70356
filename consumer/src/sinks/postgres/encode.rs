//! How rows become SQL: a run of a table's row changes becomes one multi-row upsert and one
//! multi-row delete, each taking its rows as a single JSON parameter that Postgres unpacks with
//! `json_to_recordset` into the target's own column types.
//!
//! ```text
//! INSERT INTO "s"."t" ("id","name","raw") SELECT x."id", x."name", decode(x."raw",'base64')
//!   FROM json_to_recordset($1::text::json) AS x("id" integer, "name" text, "raw" text)
//!   ON CONFLICT ("id") DO UPDATE SET "name" = EXCLUDED."name", "raw" = EXCLUDED."raw"
//! ```
//!
//! Values are restored by Postgres' own input functions from the envelope's JSON: numbers keep
//! every digit (the JSON text is passed through, never through a float), numeric strings
//! (`"NaN"` too), timestamps, intervals (ISO 8601), uuids, ranges, inet, json (its text
//! kept as it arrived), arrays (JSON arrays, nested, with nulls); bytea arrives as base64 and
//! is decoded. An enum or domain column whose type the target has gets that type, otherwise
//! the column is text (see `ddl.rs`), and the value is its label either way.

use std::collections::BTreeSet;
use std::fmt::Write as _;

/// A double-quoted SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"schema"."table"`.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", ident(schema), ident(table))
}

/// A target table's columns as the target's catalog has them.
#[derive(Debug, Clone, Default)]
pub struct TargetTable {
    /// `"schema"."table"`.
    pub name: String,
    /// (column, type as `format_type` writes it), in column order.
    pub columns: Vec<(String, String)>,
    /// Primary key columns.
    pub primary_key: Vec<String>,
}

impl TargetTable {
    /// The type of `column`.
    pub fn type_of(&self, column: &str) -> Option<&str> {
        self.columns
            .iter()
            .find(|(c, _)| c == column)
            .map(|(_, t)| t.as_str())
    }
}

/// How a column travels in the JSON parameter: the type it is declared with in
/// `json_to_recordset`'s column list, and the expression that turns it into the column's value.
fn transport(column: &str, type_sql: &str) -> (String, String) {
    let x = format!("x.{}", ident(column));
    match type_sql {
        "bytea" => ("text".into(), format!("decode({x}, 'base64')")),
        "bytea[]" => (
            "text[]".into(),
            format!(
                "(SELECT array_agg(decode(e, 'base64') ORDER BY o) FROM unnest({x}) WITH ORDINALITY AS u(e, o))"
            ),
        ),
        other => (other.to_string(), x),
    }
}

/// Why a statement cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A row names a column the target table lacks.
    #[error(
        "column {column:?} of the source is missing in target table {table}: the target's schema \
         differs from the source's (apply the missing schema change to the target, or recreate \
         the table with --initial)"
    )]
    MissingColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// The target table has no primary key to upsert on.
    #[error(
        "target table {table} has no primary key on ({key}), which upserts need: add it \
         (ALTER TABLE {table} ADD PRIMARY KEY ({key}))"
    )]
    NoKey {
        /// The table.
        table: String,
        /// The source's key columns.
        key: String,
    },
}

/// `INSERT … SELECT … FROM json_to_recordset($1) … ON CONFLICT (key) DO UPDATE SET …` for rows
/// carrying `columns`, of which `keep` (unchanged TOAST values) are not overwritten.
///
/// Rows with values left unchanged in TOAST (`keep` not empty) are updates of rows that exist:
/// they are updated in place, and only a row the target lacks is inserted. An `INSERT … ON
/// CONFLICT` alone cannot write them: Postgres checks `NOT NULL` on the proposed row, which
/// lacks the kept columns, before it looks for the conflict, so a `NOT NULL` TOASTed column
/// failed every such update. A row the target lacks still fails there, loudly: its kept
/// values are not in the log.
pub fn upsert(
    table: &TargetTable,
    columns: &[String],
    key: &[String],
    keep: &BTreeSet<String>,
) -> Result<String, EncodeError> {
    if key.is_empty() || !key.iter().all(|k| table.primary_key.contains(k)) {
        return Err(EncodeError::NoKey {
            table: table.name.clone(),
            key: key.join(", "),
        });
    }
    let (mut names, mut exprs, mut decls) = (String::new(), String::new(), String::new());
    let mut each = Vec::with_capacity(columns.len());
    for (i, c) in columns.iter().enumerate() {
        let type_sql = table.type_of(c).ok_or_else(|| EncodeError::MissingColumn {
            table: table.name.clone(),
            column: c.clone(),
        })?;
        let (decl, expr) = transport(c, type_sql);
        if i > 0 {
            names.push_str(", ");
            exprs.push_str(", ");
            decls.push_str(", ");
        }
        names.push_str(&ident(c));
        exprs.push_str(&expr);
        each.push(format!("{expr} AS {}", ident(c)));
        let _ = write!(decls, "{} {decl}", ident(c));
    }
    let conflict = key.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
    let set: Vec<String> = columns
        .iter()
        .filter(|c| !key.contains(c) && !keep.contains(*c))
        .map(|c| format!("{0} = EXCLUDED.{0}", ident(c)))
        .collect();
    let action = if set.is_empty() {
        "NOTHING".to_string()
    } else {
        format!("UPDATE SET {}", set.join(", "))
    };
    if keep.is_empty() {
        return Ok(format!(
            "INSERT INTO {} ({names}) SELECT {exprs} FROM json_to_recordset($1::text::json) AS x({decls}) \
             ON CONFLICT ({conflict}) DO {action}",
            table.name
        ));
    }
    let matches = |a: &str, b: &str| {
        key.iter()
            .map(|k| format!("{a}.{0} = {b}.{0}", ident(k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let from_s: Vec<String> = columns.iter().map(|c| format!("s.{}", ident(c))).collect();
    let set_s: Vec<String> = columns
        .iter()
        .filter(|c| !key.contains(c) && !keep.contains(*c))
        .map(|c| format!("{0} = s.{0}", ident(c)))
        .collect();
    let source = format!(
        "s AS (SELECT {} FROM json_to_recordset($1::text::json) AS x({decls}))",
        each.join(", ")
    );
    // Rows present are updated (when there is anything to set); the rest are inserted.
    let (with, absent) = if set_s.is_empty() {
        (
            source,
            format!(
                "SELECT 1 FROM {} AS t WHERE {}",
                table.name,
                matches("t", "s")
            ),
        )
    } else {
        let returning = key
            .iter()
            .map(|k| format!("t.{}", ident(k)))
            .collect::<Vec<_>>()
            .join(", ");
        (
            format!(
                "{source}, u AS (UPDATE {} AS t SET {} FROM s WHERE {} RETURNING {returning})",
                table.name,
                set_s.join(", "),
                matches("t", "s")
            ),
            format!("SELECT 1 FROM u WHERE {}", matches("u", "s")),
        )
    };
    Ok(format!(
        "WITH {with} INSERT INTO {} ({names}) SELECT {} FROM s WHERE NOT EXISTS ({absent}) \
         ON CONFLICT ({conflict}) DO {action}",
        table.name,
        from_s.join(", ")
    ))
}

/// `INSERT … SELECT … FROM json_to_recordset($1)` without a conflict target (tables without a
/// key: inserts only).
pub fn insert(table: &TargetTable, columns: &[String]) -> Result<String, EncodeError> {
    let (mut names, mut exprs, mut decls) = (Vec::new(), Vec::new(), Vec::new());
    for c in columns {
        let type_sql = table.type_of(c).ok_or_else(|| EncodeError::MissingColumn {
            table: table.name.clone(),
            column: c.clone(),
        })?;
        let (decl, expr) = transport(c, type_sql);
        names.push(ident(c));
        exprs.push(expr);
        decls.push(format!("{} {decl}", ident(c)));
    }
    Ok(format!(
        "INSERT INTO {} ({}) SELECT {} FROM json_to_recordset($1::text::json) AS x({})",
        table.name,
        names.join(", "),
        exprs.join(", "),
        decls.join(", ")
    ))
}

/// `DELETE … USING json_to_recordset($1) … WHERE key = …` for rows given by their key.
pub fn delete(table: &TargetTable, key: &[String]) -> Result<String, EncodeError> {
    if key.is_empty() {
        return Err(EncodeError::NoKey {
            table: table.name.clone(),
            key: String::new(),
        });
    }
    let (mut decls, mut cond) = (Vec::new(), Vec::new());
    for k in key {
        let type_sql = table.type_of(k).ok_or_else(|| EncodeError::MissingColumn {
            table: table.name.clone(),
            column: k.clone(),
        })?;
        let (decl, expr) = transport(k, type_sql);
        decls.push(format!("{} {decl}", ident(k)));
        cond.push(format!("t.{} = {expr}", ident(k)));
    }
    Ok(format!(
        "DELETE FROM {} AS t USING json_to_recordset($1::text::json) AS x({}) WHERE {}",
        table.name,
        decls.join(", "),
        cond.join(" AND ")
    ))
}

/// Appends one row (column name, raw JSON value) to a JSON array being built.
pub fn push_row<'a>(out: &mut String, row: impl Iterator<Item = (&'a str, &'a str)>) {
    out.push(if out.is_empty() { '[' } else { ',' });
    out.push('{');
    for (i, (c, v)) in row.enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Column names are JSON strings: serde_json escapes them.
        out.push_str(&serde_json::to_string(c).unwrap_or_else(|_| "\"\"".into()));
        out.push(':');
        out.push_str(v);
    }
    out.push('}');
}

/// Whether a column default (as `pg_get_expr` writes it) is a constant the target can take as
/// it is: a number, a boolean, NULL, or a string literal with an optional cast. Anything else
/// (`nextval(…)`, `now()`, expressions) is left out, with a warning.
pub fn is_constant_default(expr: &str) -> bool {
    let e = expr.trim();
    if e.eq_ignore_ascii_case("null") || e == "true" || e == "false" {
        return true;
    }
    let unparen = e.trim_start_matches('(').trim_end_matches(')');
    if !unparen.is_empty()
        && unparen
            .trim_start_matches('-')
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.')
        && unparen.chars().any(|c| c.is_ascii_digit())
    {
        return true;
    }
    // 'text'::type (type names: letters, digits, spaces, quotes, dots, brackets, parens, commas)
    let Some(rest) = e.strip_prefix('\'') else {
        return false;
    };
    let mut chars = rest.char_indices().peekable();
    let mut end = None;
    while let Some((i, c)) = chars.next() {
        if c == '\'' {
            if chars.peek().map(|(_, n)| *n) == Some('\'') {
                chars.next();
            } else {
                end = Some(i);
                break;
            }
        }
    }
    let Some(end) = end else {
        return false;
    };
    let tail = &rest[end + 1..];
    tail.is_empty()
        || tail.strip_prefix("::").is_some_and(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_alphanumeric() || " _\".[](),".contains(c))
                && !t.contains("::")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items() -> TargetTable {
        TargetTable {
            name: qualified("public", "items"),
            columns: vec![
                ("id".into(), "integer".into()),
                ("name".into(), "text".into()),
                ("raw".into(), "bytea".into()),
                ("we\"ird".into(), "bytea[]".into()),
            ],
            primary_key: vec!["id".into()],
        }
    }

    #[test]
    fn upserts_name_every_column_and_keep_unchanged_toast() {
        let cols: Vec<String> = ["id", "name", "raw"].map(String::from).to_vec();
        let sql = upsert(&items(), &cols, &["id".into()], &BTreeSet::new()).expect("sql");
        assert!(sql.starts_with(r#"INSERT INTO "public"."items" ("id", "name", "raw") SELECT x."id", x."name", decode(x."raw", 'base64')"#), "{sql}");
        assert!(
            sql.contains(r#"AS x("id" integer, "name" text, "raw" text)"#),
            "{sql}"
        );
        assert!(
            sql.ends_with(r#"ON CONFLICT ("id") DO UPDATE SET "name" = EXCLUDED."name", "raw" = EXCLUDED."raw""#),
            "{sql}"
        );
        // A value left in TOAST (`raw`, absent from the row): rows present are updated in
        // place, only absent ones inserted (NOT NULL is checked before ON CONFLICT).
        let cols: Vec<String> = ["id", "name"].map(String::from).to_vec();
        let keep = BTreeSet::from(["raw".to_string()]);
        let sql = upsert(&items(), &cols, &["id".into()], &keep).expect("sql");
        assert_eq!(
            sql,
            r#"WITH s AS (SELECT x."id" AS "id", x."name" AS "name" FROM json_to_recordset($1::text::json) AS x("id" integer, "name" text)), u AS (UPDATE "public"."items" AS t SET "name" = s."name" FROM s WHERE t."id" = s."id" RETURNING t."id") INSERT INTO "public"."items" ("id", "name") SELECT s."id", s."name" FROM s WHERE NOT EXISTS (SELECT 1 FROM u WHERE u."id" = s."id") ON CONFLICT ("id") DO UPDATE SET "name" = EXCLUDED."name""#
        );
        // Nothing but the key and kept values: present rows stay as they are.
        let sql = upsert(&items(), &["id".into()], &["id".into()], &keep).expect("sql");
        assert!(
            sql.contains(r#"WHERE NOT EXISTS (SELECT 1 FROM "public"."items" AS t WHERE t."id" = s."id") ON CONFLICT ("id") DO NOTHING"#),
            "{sql}"
        );
        let only_key =
            upsert(&items(), &["id".into()], &["id".into()], &BTreeSet::new()).expect("sql");
        assert!(only_key.ends_with("DO NOTHING"), "{only_key}");
        let weird = upsert(
            &items(),
            &["id".into(), "we\"ird".into()],
            &["id".into()],
            &BTreeSet::new(),
        )
        .expect("sql");
        assert!(weird.contains(r#""we""ird" text[]"#), "{weird}");
    }

    #[test]
    fn a_missing_column_or_key_is_named() {
        let e = upsert(
            &items(),
            &["id".into(), "gone".into()],
            &["id".into()],
            &BTreeSet::new(),
        )
        .expect_err("missing");
        assert!(e.to_string().contains("\"gone\""), "{e}");
        let e =
            upsert(&items(), &["id".into()], &["name".into()], &BTreeSet::new()).expect_err("key");
        assert!(e.to_string().contains("ADD PRIMARY KEY (name)"), "{e}");
        let sql = delete(&items(), &["id".into()]).expect("delete");
        assert_eq!(
            sql,
            r#"DELETE FROM "public"."items" AS t USING json_to_recordset($1::text::json) AS x("id" integer) WHERE t."id" = x."id""#
        );
    }

    #[test]
    fn inserts_without_a_key_decode_bytea_and_quote_names() {
        let sql = insert(&items(), &["raw".into(), "we\"ird".into()]).expect("insert");
        assert_eq!(
            sql,
            r#"INSERT INTO "public"."items" ("raw", "we""ird") SELECT decode(x."raw", 'base64'), (SELECT array_agg(decode(e, 'base64') ORDER BY o) FROM unnest(x."we""ird") WITH ORDINALITY AS u(e, o)) FROM json_to_recordset($1::text::json) AS x("raw" text, "we""ird" text[])"#
        );
    }

    #[test]
    fn rows_are_json_arrays_of_the_raw_values() {
        let mut out = String::new();
        push_row(&mut out, [("id", "1"), ("na\"me", "\"x\"")].into_iter());
        push_row(&mut out, [("id", "2")].into_iter());
        out.push(']');
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v[0]["na\"me"], "x");
        assert_eq!(v[1]["id"], 2);
    }

    #[test]
    fn only_constant_defaults_are_kept() {
        for yes in [
            "0",
            "-1.5",
            "(-1)",
            "true",
            "NULL",
            "'abc'::text",
            "'it''s'::character varying",
            "'{}'::integer[]",
            "'x'",
        ] {
            assert!(is_constant_default(yes), "{yes}");
        }
        for no in [
            "nextval('s'::regclass)",
            "now()",
            "CURRENT_TIMESTAMP",
            "'a'::text || 'b'::text",
            "(1 + 2)",
            "gen_random_uuid()",
        ] {
            assert!(!is_constant_default(no), "{no}");
        }
    }
}
