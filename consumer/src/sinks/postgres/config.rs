//! The Postgres target's options ([`Args`], for `replicate`) and their validated settings
//! ([`ReplicateSettings`]).

use std::collections::BTreeMap;

use serde::Deserialize;
use walrelay_common::options::ConfigError;
use walrelay_common::postgres::PgTarget;

use crate::stream::query::Tables;

/// The Postgres target's options, each unset unless given.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[group(skip)]
#[command(next_help_heading = "Postgres target")]
pub struct Args {
    /// The database the topic is applied to (libpq URL or key=value pairs; TLS as libpq's
    /// sslmode/sslrootcert, or PGSSLMODE...). Its schema `walrelay` holds the applied
    /// positions.
    #[arg(
        long,
        env = "WALRELAY_TARGET_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub target_url: Option<String>,
    /// Source schema to target schema, e.g. public=replica,sales=sales_copy [default: the
    /// same names].
    #[arg(long, env = "WALRELAY_TARGET_SCHEMA_MAP", value_name = "SRC=DST,...")]
    pub target_schema_map: Option<String>,
    /// Tables applied, as `schema.table` globs (`*` any characters), comma-separated;
    /// events of other tables are read and skipped [default: every table].
    #[arg(long, env = "WALRELAY_TABLES", value_name = "PATTERNS")]
    pub tables: Option<String>,
    /// Create missing schemas and tables from the schema events [default: off: a table
    /// missing in the target stops the replicator].
    #[arg(long, env = "WALRELAY_INITIAL")]
    #[serde(default)]
    pub initial: bool,
    /// What a schema change the target refuses does: `halt` (stop; nothing after it is
    /// applied, a restart retries it) or `dead-letter` (the schema event goes to the
    /// dead-letter topic and rows go on) [default: halt].
    #[arg(long, env = "WALRELAY_ON_SCHEMA_ERROR", value_enum)]
    pub on_schema_error: Option<OnSchemaError>,
    /// Check the target (connection, privileges, bookkeeping, tables without a primary key)
    /// and exit: 0 when nothing fails, 1 otherwise.
    #[arg(long)]
    #[serde(default)]
    pub check: bool,
}

/// What a refused schema change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnSchemaError {
    /// Stop the replicator.
    #[default]
    Halt,
    /// Dead-letter the schema event and go on.
    DeadLetter,
}

impl Args {
    /// `self` where set, else `file`.
    pub fn or(self, file: Args) -> Args {
        Args {
            target_url: self.target_url.or(file.target_url),
            target_schema_map: self.target_schema_map.or(file.target_schema_map),
            tables: self.tables.or(file.tables),
            initial: self.initial || file.initial,
            on_schema_error: self.on_schema_error.or(file.on_schema_error),
            check: self.check || file.check,
        }
    }

    /// Applies defaults and validates.
    pub fn settings(self) -> Result<ReplicateSettings, ConfigError> {
        let url = self
            .target_url
            .as_deref()
            .ok_or_else(|| ConfigError::missing("--target-url"))?;
        let target = PgTarget::parse(url).map_err(|e| ConfigError::new("--target-url", e))?;
        let schema_map = parse_schema_map(self.target_schema_map.as_deref().unwrap_or(""))
            .map_err(|e| ConfigError::new("--target-schema-map", e))?;
        let tables = Tables::parse(self.tables.as_deref().unwrap_or(""))
            .map_err(|e| ConfigError::new("--tables", e.trim_start_matches("tables: ")))?;
        Ok(ReplicateSettings {
            target,
            schema_map,
            tables,
            initial: self.initial,
            on_schema_error: self.on_schema_error.unwrap_or_default(),
            check: self.check,
        })
    }
}

/// `src=dst,...` as a map; a schema named twice, an empty name or `walrelay` as a target is
/// refused.
fn parse_schema_map(list: &str) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((src, dst)) = pair.split_once('=') else {
            return Err(format!(
                "{pair:?} is not of the form source=target; write e.g. public=replica"
            ));
        };
        let (src, dst) = (src.trim(), dst.trim());
        if src.is_empty() || dst.is_empty() {
            return Err(format!("{pair:?} has an empty schema name"));
        }
        if dst == "walrelay" {
            return Err("the target schema walrelay holds the replicator's bookkeeping; map to another schema".into());
        }
        if map.insert(src.to_string(), dst.to_string()).is_some() {
            return Err(format!("schema {src:?} is mapped twice"));
        }
    }
    Ok(map)
}

/// The validated options of `replicate`.
#[derive(Debug, Clone)]
pub struct ReplicateSettings {
    /// The target database.
    pub target: PgTarget,
    /// Source schema to target schema.
    pub schema_map: BTreeMap<String, String>,
    /// Tables applied.
    pub tables: Tables,
    /// Create missing schemas and tables.
    pub initial: bool,
    /// What a refused schema change does.
    pub on_schema_error: OnSchemaError,
    /// Preflight only.
    pub check: bool,
}

impl ReplicateSettings {
    /// The target schema of a source schema.
    pub fn target_schema<'a>(&'a self, source: &'a str) -> &'a str {
        self.schema_map.get(source).map_or(source, String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_maps_are_checked() {
        let m = parse_schema_map(" public=replica , sales=s2").expect("valid");
        assert_eq!(m.get("public").map(String::as_str), Some("replica"));
        assert_eq!(m.len(), 2);
        for (bad, says) in [
            ("public", "source=target"),
            ("public=", "empty"),
            ("a=b,a=c", "twice"),
            ("a=walrelay", "bookkeeping"),
        ] {
            let e = parse_schema_map(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_target_url_is_required_and_never_echoed() {
        let e = Args::default().settings().expect_err("missing");
        assert!(e.to_string().contains("--target-url"), "{e}");
        let a = Args {
            target_url: Some("postgres://u:s3cret@db:notaport/x".into()),
            ..Args::default()
        };
        let e = a.settings().expect_err("bad port").to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
