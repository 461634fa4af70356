//! Schema events as statements on the target.
//!
//! A schema event carries the table's whole column list after the change (with stable column
//! ids, the source's `attnum`s) and its previous name when it was renamed. The replicator keeps
//! the list it applied last (`walrelay.replicated_tables`), so a change is the difference of
//! the two, by id:
//!
//! | difference | statement |
//! |---|---|
//! | table unknown, missing in the target | `CREATE TABLE` (with `--initial`; columns, primary key, nullability, constant defaults) |
//! | table unknown, present in the target | adopted as it is; columns it lacks are added |
//! | new name (or schema) | `ALTER TABLE … SET SCHEMA`, `ALTER TABLE … RENAME TO` |
//! | dropped | `DROP TABLE IF EXISTS` |
//! | id only in the new list | `ADD COLUMN` |
//! | id only in the old list | `DROP COLUMN` |
//! | same id, new name | `RENAME COLUMN` |
//! | same id, new type | `ALTER COLUMN … TYPE … USING col::type` |
//! | nullability, default | `SET/DROP NOT NULL`, `SET/DROP DEFAULT` |
//!
//! Types are the source's `format_type` text; a type the target lacks becomes its logical type
//! when the target has that (a domain: its base type), else `text` (`text[]` for arrays: an
//! enum not created there), and its values are the labels.
//! Defaults are kept only when constant (`encode::is_constant_default`); identity, serial and
//! generated columns become plain columns (their values arrive in the rows), with a warning.
//! A column added `NOT NULL` without a constant default is added nullable: rows written
//! before it in the source got values the log does not carry.
//! A change of the primary key's columns is not followed (a warning says so).

use tokio_postgres::GenericClient;
use walrelay_common::event::ColumnSchema;

use super::client::{self, Replicated};
use super::encode::{ident, is_constant_default, qualified};

/// The statements a schema change needs, and warnings about what was simplified.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// In order.
    pub statements: Vec<String>,
    /// For the log.
    pub warnings: Vec<String>,
}

/// The target type of a source column: its own, or text when the target lacks it.
async fn target_type(
    tx: &impl GenericClient,
    c: &ColumnSchema,
) -> Result<String, tokio_postgres::Error> {
    if client::has_type(tx, &c.type_name).await? {
        return Ok(c.type_name.clone());
    }
    // A domain the target lacks: its base type (the envelope's logical type names it).
    if !c.logical.is_empty() && client::has_type(tx, &c.logical).await? {
        return Ok(c.logical.clone());
    }
    Ok(if c.type_name.ends_with("[]") {
        "text[]".into()
    } else {
        "text".into()
    })
}

fn default_clause(c: &ColumnSchema, warnings: &mut Vec<String>) -> Option<String> {
    let d = c.default.as_deref()?;
    if is_constant_default(d) {
        Some(d.to_string())
    } else {
        warnings.push(format!(
            "column {:?}: default {d} is not a constant and is not replicated",
            c.name
        ));
        None
    }
}

fn note_plain(c: &ColumnSchema, warnings: &mut Vec<String>) {
    if c.identity || c.generated {
        warnings.push(format!(
            "column {:?} is {} in the source and a plain column in the target (its values come with the rows)",
            c.name,
            if c.identity { "an identity column" } else { "generated" }
        ));
    }
}

/// `name type [DEFAULT d] [NOT NULL]` of a new column.
async fn column_def(
    tx: &impl GenericClient,
    c: &ColumnSchema,
    creating: bool,
    warnings: &mut Vec<String>,
) -> Result<String, tokio_postgres::Error> {
    note_plain(c, warnings);
    let mut def = format!("{} {}", ident(&c.name), target_type(tx, c).await?);
    let default = default_clause(c, warnings);
    if let Some(d) = &default {
        def.push_str(&format!(" DEFAULT {d}"));
    }
    if !c.nullable && !c.generated {
        if creating || default.is_some() {
            def.push_str(" NOT NULL");
        } else {
            warnings.push(format!(
                "column {:?} is NOT NULL in the source without a constant default; added nullable",
                c.name
            ));
        }
    }
    Ok(def)
}

/// The plan for a source table that `known` describes (or nothing yet), now `columns` under
/// `schema.table` (target names), or dropped.
pub async fn plan(
    tx: &impl GenericClient,
    known: Option<&Replicated>,
    schema: &str,
    table: &str,
    columns: &[ColumnSchema],
    dropped: bool,
    initial: bool,
) -> Result<Result<Plan, String>, tokio_postgres::Error> {
    let mut p = Plan::default();
    let name = qualified(schema, table);
    if dropped {
        let at = known.map_or(name.clone(), |k| qualified(&k.schema, &k.table));
        p.statements.push(format!("DROP TABLE IF EXISTS {at}"));
        return Ok(Ok(p));
    }
    let Some(known) = known else {
        return Ok(match client::table(tx, schema, table).await? {
            Some(existing) => {
                for c in columns {
                    if existing.type_of(&c.name).is_none() {
                        let def = column_def(tx, c, false, &mut p.warnings).await?;
                        p.statements
                            .push(format!("ALTER TABLE {name} ADD COLUMN {def}"));
                    }
                }
                Ok(p)
            }
            None if initial => {
                p.statements
                    .push(format!("CREATE SCHEMA IF NOT EXISTS {}", ident(schema)));
                let mut defs = Vec::new();
                for c in columns {
                    defs.push(column_def(tx, c, true, &mut p.warnings).await?);
                }
                let mut key: Vec<&ColumnSchema> = columns
                    .iter()
                    .filter(|c| c.key_position.is_some())
                    .collect();
                key.sort_by_key(|c| c.key_position);
                if key.is_empty() {
                    p.warnings.push(format!(
                        "table {name} has no key in the source: only inserts can be applied"
                    ));
                } else {
                    defs.push(format!(
                        "PRIMARY KEY ({})",
                        key.iter()
                            .map(|c| ident(&c.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                p.statements
                    .push(format!("CREATE TABLE {name} ({})", defs.join(", ")));
                Ok(p)
            }
            None => Err(format!(
                "target table {name} does not exist: create it, or run the replicator with \
                 --initial to create tables from the schema events"
            )),
        });
    };
    // Renamed or moved.
    let mut current = qualified(&known.schema, &known.table);
    if known.schema != schema {
        p.statements
            .push(format!("CREATE SCHEMA IF NOT EXISTS {}", ident(schema)));
        p.statements.push(format!(
            "ALTER TABLE {current} SET SCHEMA {}",
            ident(schema)
        ));
        current = qualified(schema, &known.table);
    }
    if known.table != table {
        p.statements
            .push(format!("ALTER TABLE {current} RENAME TO {}", ident(table)));
    }
    // Columns by id.
    for old in &known.columns {
        if !columns.iter().any(|c| c.id == old.id) {
            p.statements.push(format!(
                "ALTER TABLE {name} DROP COLUMN IF EXISTS {}",
                ident(&old.name)
            ));
        }
    }
    for c in columns {
        let Some(old) = known.columns.iter().find(|o| o.id == c.id) else {
            let def = column_def(tx, c, false, &mut p.warnings).await?;
            p.statements
                .push(format!("ALTER TABLE {name} ADD COLUMN {def}"));
            continue;
        };
        let col = ident(&c.name);
        if old.name != c.name {
            p.statements.push(format!(
                "ALTER TABLE {name} RENAME COLUMN {} TO {col}",
                ident(&old.name)
            ));
        }
        if old.type_name != c.type_name {
            let t = target_type(tx, c).await?;
            p.statements.push(format!(
                "ALTER TABLE {name} ALTER COLUMN {col} TYPE {t} USING {col}::{t}"
            ));
        }
        if old.default != c.default {
            match default_clause(c, &mut p.warnings) {
                Some(d) => p.statements.push(format!(
                    "ALTER TABLE {name} ALTER COLUMN {col} SET DEFAULT {d}"
                )),
                None => p.statements.push(format!(
                    "ALTER TABLE {name} ALTER COLUMN {col} DROP DEFAULT"
                )),
            }
        }
        if old.nullable != c.nullable {
            p.statements.push(format!(
                "ALTER TABLE {name} ALTER COLUMN {col} {} NOT NULL",
                if c.nullable { "DROP" } else { "SET" }
            ));
        }
        if old.key_position != c.key_position {
            p.warnings.push(format!(
                "the primary key of {name} changed in the source (column {:?}); the target's is kept",
                c.name
            ));
        }
    }
    Ok(Ok(p))
}
