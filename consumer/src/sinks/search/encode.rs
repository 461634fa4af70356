//! How a change event becomes a search document and its `_bulk` lines: index names, document
//! ids, versions, mappings, and the action and source lines the sink sends.
//!
//! # Versions
//!
//! Every write carries `version_type=external_gte` and the event's place in **commit order**,
//! so the search engine itself refuses anything older than what it stores (409, counted as
//! success):
//!
//! - a streamed change: the commit LSN of its transaction, `source.commit_lsn`. Transactions
//!   reach the topic in commit order, and a later commit has a higher commit LSN, whatever the
//!   LSNs of the changes inside: a transaction's heap insert is logged before it waits on a
//!   unique-index entry (or before a deferred constraint is checked), so a change LSN can lie
//!   below that of a concurrent transaction that committed first, and would wrongly look stale.
//!   Changes of one row inside one transaction share the version; `external_gte` accepts an
//!   equal version, and they are applied in order (one row's changes are in one partition, and
//!   a replay re-applies a contiguous run of offsets, so the transaction's last change of the
//!   row is applied last again).
//! - a snapshot row: its `source.commit_lsn` too, which for a snapshot row is the consistent
//!   point of the snapshot attempt that read it. That orders snapshots with everything else:
//!   - against the stream after it: the stream starts at the consistent point, so every
//!     streamed change of the attempt has a commit LSN at or above it. Above, the change wins
//!     whatever the delivery order; equal (a commit record starting exactly at the point),
//!     `external_gte` lets the later write win, and the snapshot row precedes every change of
//!     its row in the partition (streaming starts only once Kafka acknowledged the snapshot),
//!     in a replay too;
//!   - against earlier attempts: a later attempt's slot is created later, so its consistent
//!     point is above every LSN of the earlier attempts, their snapshot rows and any changes
//!     streamed after them. The later snapshot therefore overwrites whatever an earlier attempt
//!     left, and an earlier attempt's row delivered again never overwrites it. (A constant
//!     version for snapshot rows could not do this: an earlier attempt's streamed change would
//!     outrank the later snapshot of its row.)
//!
//!   What the later snapshot cannot overwrite is a row it does not read: one deleted between
//!   the attempts. Its end marker retires those ([`retire_query`], and the sink's essay).
//!
//! A commit LSN is a WAL byte position; one at or beyond 2⁶³ (eight exbibytes of WAL) does not
//! fit a version: such an event is dead-lettered with the reason, never dropped silently.
//!
//! Every document stores what wrote it ([`Stamp`]): the version as `walrelay_version`; the
//! event's position in its transaction (`source.seq`) as `walrelay_seq`, which lets a truncate
//! delete exactly the documents older than itself, including rows written earlier in its own
//! transaction; and the Kafka partition of the event as `walrelay_partition`, which lets a
//! snapshot's end marker retire only what its own partition wrote.
//!
//! # Document ids
//!
//! The key columns' values (`key` in the envelope), strings as they are and other values as
//! JSON text, joined with `|`; `\` and `|` inside values are escaped with `\`. Ids longer than
//! 512 bytes (the engines' limit) become `sha256:` and the hex digest.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use walrelay_common::event::{Envelope, Op, write_json_str};

/// Field holding the document's version.
pub const VERSION_FIELD: &str = "walrelay_version";

/// Field holding the position, in its transaction, of the change that wrote the document.
pub const SEQ_FIELD: &str = "walrelay_seq";

/// Field holding the Kafka partition of the event that wrote the document.
pub const PARTITION_FIELD: &str = "walrelay_partition";

/// The fields walrelay adds to every document (a row image carrying one of them as a column is
/// written through the slower path, which overwrites it).
const STAMP_FIELDS: [&str; 3] = [VERSION_FIELD, SEQ_FIELD, PARTITION_FIELD];

/// What a document write records besides the row: see "Versions" above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The external version ([`version`]), stored as `walrelay_version`.
    pub version: i64,
    /// The position in its transaction ([`seq`]), stored as `walrelay_seq`.
    pub seq: i64,
    /// The event's Kafka partition, stored as `walrelay_partition`.
    pub partition: i32,
}

impl Stamp {
    /// The stamp of `env`'s writes, read from `partition`; `Err` when its commit LSN does not
    /// fit a version.
    pub fn of(env: &Envelope, partition: i32) -> Result<Self, String> {
        Ok(Self {
            version: version(env)?,
            seq: seq(env),
            partition,
        })
    }
}

/// Longest document id the engines accept.
const MAX_ID_BYTES: usize = 512;

/// The external version of an event's writes: its transaction's commit LSN, for a snapshot
/// row (and a snapshot marker) its attempt's consistent point; see "Versions" above.
pub fn version(env: &Envelope) -> Result<i64, String> {
    i64::try_from(env.source.commit_lsn)
        .map(|v| v.max(1))
        .map_err(|_| {
            format!(
                "commit LSN {} does not fit a search version (2^63): this event cannot be ordered in the index",
                env.source.commit_lsn
            )
        })
}

/// The event's position in its transaction (`walrelay_seq`).
pub fn seq(env: &Envelope) -> i64 {
    i64::try_from(env.source.seq).unwrap_or(i64::MAX)
}

/// The document id of a row image, or why there is none.
pub fn document_id(key: &[String], row: &Map<String, Value>) -> Result<String, String> {
    document_id_by(key, |col| match row.get(col) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => Some(v.to_string()),
    })
}

/// The document id of a row image given as JSON text, read without building a map of it.
pub fn document_id_raw(
    key: &[String],
    row: &HashMap<Cow<'_, str>, &RawValue>,
) -> Result<String, String> {
    document_id_by(key, |col| {
        let raw = row.get(col)?.get();
        match raw.as_bytes().first() {
            Some(b'"') => serde_json::from_str::<String>(raw).ok(),
            // A json/jsonb key: the text as the producer forwarded it (Postgres' spacing, its
            // key order) would differ from the compact, key-sorted form `document_id` gives
            // the same value in a delete's `before` map; both use the compact form.
            Some(b'{' | b'[') => serde_json::from_str::<Value>(raw)
                .ok()
                .map(|v| v.to_string()),
            _ if raw == "null" => None,
            _ => Some(raw.to_string()),
        }
    })
}

/// The id from each key column's text (`None`: no value).
fn document_id_by(
    key: &[String],
    text_of: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    if key.is_empty() {
        return Err("the table has no primary key or replica-identity index, so its rows cannot be addressed as documents; add a primary key (or REPLICA IDENTITY USING INDEX on a unique index)".into());
    }
    let mut id = String::new();
    for (n, col) in key.iter().enumerate() {
        if n > 0 {
            id.push('|');
        }
        let Some(text) = text_of(col) else {
            return Err(format!("key column {col:?} has no value in the event"));
        };
        if key.len() == 1 {
            id.push_str(&text);
        } else {
            for c in text.chars() {
                if c == '|' || c == '\\' {
                    id.push('\\');
                }
                id.push(c);
            }
        }
    }
    if id.len() > MAX_ID_BYTES {
        let digest = Sha256::digest(id.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        return Ok(format!("sha256:{hex}"));
    }
    Ok(id)
}

/// `s` lowercased, with the characters an index name cannot hold replaced by `_`.
fn index_safe(s: &str) -> String {
    s.to_lowercase()
        .chars()
        .map(|c| {
            if matches!(
                c,
                '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':'
            ) {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The alias of a table: the template with `{db}`, `{schema}` and `{table}` replaced,
/// lowercased, with characters index names cannot hold replaced by `_`.
pub fn alias_name(template: &str, env: &Envelope) -> Result<String, String> {
    let raw = template
        .replace("{db}", &env.source.db)
        .replace("{schema}", &env.source.schema)
        .replace("{table}", &env.source.table);
    let mut name = index_safe(&raw);
    while name.starts_with(['_', '-', '+']) {
        name.remove(0);
    }
    // Room for "-v" and a generation number.
    if name.is_empty() || name == "." || name == ".." || name.len() > 240 {
        return Err(format!(
            "--index-template {template:?} gives {raw:?} for {}.{}, which is not a valid index name (1-240 bytes after lowercasing)",
            env.source.schema, env.source.table
        ));
    }
    Ok(name)
}

/// Whether `alias` is one that `template` can give: its literal parts in order (lowercased and
/// with the characters [`alias_name`] replaces), each `{db}`, `{schema}` or `{table}` standing
/// for at least one character. Tells this deployment's aliases from those of others that share
/// the search cluster.
pub fn template_matches(template: &str, alias: &str) -> bool {
    let normalized = index_safe(template);
    let literals: Vec<&str> = normalized
        .split("{db}")
        .flat_map(|p| p.split("{schema}"))
        .flat_map(|p| p.split("{table}"))
        .collect();
    let (Some(first), Some(last)) = (literals.first(), literals.last()) else {
        return false;
    };
    if literals.len() == 1 {
        return alias == *first;
    }
    let Some(mut rest) = alias.strip_prefix(first) else {
        return false;
    };
    for middle in &literals[1..literals.len() - 1] {
        // A placeholder takes at least one character (not byte: `été`), then the leftmost
        // match of the literal.
        let first = rest.chars().next().map_or(0, char::len_utf8);
        let Some(found) = rest.get(first.max(1)..).and_then(|r| r.find(middle)) else {
            return false;
        };
        rest = &rest[first + found + middle.len()..];
    }
    rest.len() > last.len() && rest.ends_with(last)
}

/// The versioned index behind an alias.
pub fn versioned(alias: &str, generation: u32) -> String {
    format!("{alias}-v{generation}")
}

/// The generation of `index` when it is `<alias>-v<N>`.
pub fn generation_of(alias: &str, index: &str) -> Option<u32> {
    index.strip_prefix(alias)?.strip_prefix("-v")?.parse().ok()
}

/// The mapping of one column from its logical type (see the README's table).
///
/// Postgres holds values a search field type cannot: `NaN` and `±Infinity` floats and
/// numerics, numerics beyond a double's range, `infinity` dates and timestamps, years past
/// 9999. Numeric and date fields are therefore mapped with `ignore_malformed`: such a value is
/// kept as it is in `_source` (the document is indexed and found through every other field),
/// listed in the document's `_ignored` field, and left out of that field's index; it is never
/// a refused document, a dead letter or a silent loss.
pub fn field_mapping(logical_type: &str) -> Value {
    let base = logical_type.trim_end_matches("[]");
    match base {
        "integer" => json!({"type": "long"}),
        "float" | "numeric" => json!({"type": "double", "ignore_malformed": true}),
        "boolean" => json!({"type": "boolean"}),
        "json" => json!({"type": "object", "enabled": false}),
        "bytea" => json!({"type": "binary"}),
        "date" | "timestamp" | "timestamptz" => json!({
            "type": "date",
            "format": "strict_date_optional_time||epoch_millis",
            "ignore_malformed": true
        }),
        "time" | "timetz" | "interval" => json!({"type": "keyword"}),
        _ => {
            json!({"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}})
        }
    }
}

/// Mappings for every column in `types` that `known` lacks.
pub fn missing_fields(
    types: &Map<String, Value>,
    known: &Map<String, Value>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (col, ty) in types {
        if !known.contains_key(col) {
            out.insert(col.clone(), field_mapping(ty.as_str().unwrap_or("text")));
        }
    }
    for (field, ty) in [
        (VERSION_FIELD, "long"),
        (SEQ_FIELD, "long"),
        (PARTITION_FIELD, "integer"),
    ] {
        if !known.contains_key(field) {
            out.insert(field.into(), json!({ "type": ty }));
        }
    }
    out
}

/// The `_delete_by_query` query with which a snapshot's end marker, read from `partition`,
/// retires a table's documents: written before the attempt's consistent point
/// (`walrelay_version < consistent_lsn`: neither rewritten by the attempt's snapshot nor changed
/// since) by that partition, or by a sink too old to record partitions (no
/// `walrelay_partition`). See the sink's essay, "Snapshot attempts".
pub fn retire_query(consistent_lsn: i64, partition: i32) -> Value {
    json!({"bool": {"filter": [
        {"range": {VERSION_FIELD: {"lt": consistent_lsn}}},
        {"bool": {"should": [
            {"term": {PARTITION_FIELD: partition}},
            {"bool": {"must_not": [{"exists": {"field": PARTITION_FIELD}}]}}
        ], "minimum_should_match": 1}}
    ]}})
}

/// Appends `{"<kind>":{"_index":…,"_id":…,"version":…,"version_type":"external_gte"}}` and a
/// newline.
pub fn action_line(out: &mut Vec<u8>, kind: &str, index: &str, id: &str, version: i64) {
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\":{\"_index\":");
    write_json_str(out, index);
    out.extend_from_slice(b",\"_id\":");
    write_json_str(out, id);
    out.extend_from_slice(b",\"version\":");
    out.extend_from_slice(version.to_string().as_bytes());
    out.extend_from_slice(b",\"version_type\":\"external_gte\"}}\n");
}

/// For an update that changed the row's key: the old document's id and the action deleting it.
pub fn old_key_delete(
    env: &Envelope,
    id: &str,
    target: &str,
    version: i64,
) -> Option<(String, Vec<u8>)> {
    if env.op != Op::Update {
        return None;
    }
    let old = document_id(&env.key, env.before.as_ref()?).ok()?;
    if old == id {
        return None;
    }
    let mut lines = Vec::new();
    action_line(&mut lines, "delete", target, &old, version);
    Some((old, lines))
}

/// The bulk lines of a delete: the document id and its versioned delete action.
pub fn delete(env: &Envelope, target: &str, version: i64) -> Result<(String, Vec<u8>), String> {
    let id = match env.before.as_ref().map(|b| document_id(&env.key, b)) {
        Some(id) => id?,
        None => return Err("delete without a before image".into()),
    };
    let mut lines = Vec::new();
    action_line(&mut lines, "delete", target, &id, version);
    Ok((id, lines))
}

/// An index action whose source is the row image's own text with the version field added.
pub struct Forwarded {
    /// The document id.
    pub id: String,
    /// For an update that changed the key: the old id and the action deleting it.
    pub old: Option<(String, Vec<u8>)>,
    /// The action and source lines.
    pub lines: Vec<u8>,
}

/// The common case, without parsing values: forwards the image's text, adding the version
/// field. `None` when the image cannot be forwarded as it is (not an object of fields, or it
/// carries a field named like the version field): [`source_of`] and [`index_lines`] then
/// build the document.
pub fn forward(
    env: &Envelope,
    raw: &RawValue,
    target: &str,
    stamp: Stamp,
) -> Option<Result<Forwarded, String>> {
    let fields = serde_json::from_str::<HashMap<Cow<'_, str>, &RawValue>>(raw.get()).ok()?;
    if STAMP_FIELDS.iter().any(|f| fields.contains_key(*f)) {
        return None;
    }
    let id = match document_id_raw(&env.key, &fields) {
        Ok(id) => id,
        Err(why) => return Some(Err(why)),
    };
    let old = old_key_delete(env, &id, target, stamp.version);
    let mut lines = Vec::new();
    action_line(&mut lines, "index", target, &id, stamp.version);
    let text = raw.get().trim_end();
    let inner = text.strip_suffix('}').unwrap_or(text);
    lines.extend_from_slice(inner.as_bytes());
    if !fields.is_empty() {
        lines.push(b',');
    }
    let values = [
        stamp.version.to_string(),
        stamp.seq.to_string(),
        stamp.partition.to_string(),
    ];
    for (n, (field, value)) in STAMP_FIELDS.iter().zip(&values).enumerate() {
        if n > 0 {
            lines.push(b',');
        }
        lines.push(b'"');
        lines.extend_from_slice(field.as_bytes());
        lines.extend_from_slice(b"\":");
        lines.extend_from_slice(value.as_bytes());
    }
    lines.extend_from_slice(b"}\n");
    Some(Ok(Forwarded { id, old, lines }))
}

/// The field a column is stored in: its original field after a rename, else its name.
pub fn field_of(renames: Option<&HashMap<String, String>>, column: &str) -> String {
    renames
        .and_then(|r| r.get(column).cloned())
        .unwrap_or_else(|| column.to_string())
}

/// The document id and the source of a row image, renamed columns in their original fields.
pub fn source_of(
    env: &Envelope,
    raw: &RawValue,
    renames: Option<&HashMap<String, String>>,
) -> Result<(String, Map<String, Value>), String> {
    let Ok(source) = serde_json::from_str::<Map<String, Value>>(raw.get()) else {
        return Err("the after image is not a JSON object".into());
    };
    let id = document_id(&env.key, &source)?;
    let source = match renames {
        Some(_) => source
            .into_iter()
            .map(|(k, v)| (field_of(renames, &k), v))
            .collect(),
        None => source,
    };
    Ok((id, source))
}

/// Unchanged TOAST columns take their value from `stored`; a column with nothing stored is
/// left out (never nulled, never the placeholder). Returns the fields left out.
pub fn keep_unchanged(
    source: &mut Map<String, Value>,
    stored: Option<&Map<String, Value>>,
    env: &Envelope,
    renames: Option<&HashMap<String, String>>,
) -> Vec<String> {
    let mut unresolved = Vec::new();
    for col in env.unchanged_toast.iter().map(|c| field_of(renames, c)) {
        match stored.and_then(|s| s.get(&col)) {
            Some(value) => {
                source.insert(col, value.clone());
            }
            None => {
                source.remove(&col);
                unresolved.push(col);
            }
        }
    }
    unresolved
}

/// The index action and source lines of a built document (the stamp's fields are added).
pub fn index_lines(
    source: &mut Map<String, Value>,
    target: &str,
    id: &str,
    stamp: Stamp,
) -> Result<Vec<u8>, String> {
    let mut lines = Vec::new();
    source.insert(VERSION_FIELD.into(), json!(stamp.version));
    source.insert(SEQ_FIELD.into(), json!(stamp.seq));
    source.insert(PARTITION_FIELD.into(), json!(stamp.partition));
    action_line(&mut lines, "index", target, id, stamp.version);
    serde_json::to_writer(&mut lines, &*source)
        .map_err(|e| format!("cannot encode the document: {e}"))?;
    lines.push(b'\n');
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn ids() {
        let key = vec!["id".to_string()];
        assert_eq!(
            document_id(&key, &row(json!({"id": 42, "x": 1}))),
            Ok("42".into())
        );
        assert_eq!(
            document_id(&key, &row(json!({"id": "a|b"}))),
            Ok("a|b".into())
        );
        let two = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            document_id(&two, &row(json!({"a": "x|y", "b": 7}))),
            Ok("x\\|y|7".into())
        );
        // Escaping keeps distinct keys distinct.
        assert_ne!(
            document_id(&two, &row(json!({"a": "x|", "b": "y"}))),
            document_id(&two, &row(json!({"a": "x", "b": "|y"})))
        );
        assert!(document_id(&key, &row(json!({"id": null}))).is_err());
        assert!(document_id(&[], &row(json!({"id": 1}))).is_err());
        // The same ids from the JSON text, without a map.
        for (key, text) in [
            (&key, r#"{"id":42,"x":1}"#),
            (&key, r#"{"id":"a|b"}"#),
            (&two, r#"{"a":"x|y","b":7}"#),
            (&two, r#"{"a":"x\"q","b":true}"#),
            (&key, r#"{"id":12345678901234567890.5}"#),
            // jsonb keys as Postgres writes them: spaces, keys in its own order.
            (&key, r#"{"id":{"b": 1, "a": [1, 2.50, "x"]}}"#),
            (&two, r#"{"a":[{"z": null, "y": true}],"b":{"k": "v|w"}}"#),
        ] {
            let raw: HashMap<Cow<'_, str>, &RawValue> = serde_json::from_str(text).expect("json");
            let map: Map<String, Value> = serde_json::from_str(text).expect("json");
            assert_eq!(document_id_raw(key, &raw), document_id(key, &map), "{text}");
        }
        let raw: HashMap<Cow<'_, str>, &RawValue> =
            serde_json::from_str(r#"{"id":null}"#).expect("json");
        assert!(document_id_raw(&key, &raw).is_err());
        let long = "z".repeat(600);
        let id = document_id(&key, &row(json!({ "id": long }))).expect("hashed");
        assert!(id.starts_with("sha256:") && id.len() == 7 + 64);
    }

    #[test]
    fn names_and_generations() {
        let env: Envelope = serde_json::from_value(json!({
            "op": "c", "before": null, "after": {"id": 1},
            "source": {"version": "v", "connector": "walrelay", "db": "App", "schema": "Sales",
                       "table": "Order Lines", "lsn": 5, "commit_lsn": 9, "txid": 1, "ts_ms": 0,
                       "snapshot": false, "seq": 1},
            "ts_ms": 0, "key": ["id"], "types": {"id": "integer"}
        }))
        .expect("envelope");
        assert_eq!(
            alias_name("{schema}.{table}", &env),
            Ok("sales.order_lines".into())
        );
        assert_eq!(
            alias_name("_{db}-{table}", &env),
            Ok("app-order_lines".into())
        );
        assert_eq!(versioned("sales.orders", 3), "sales.orders-v3");
        assert_eq!(generation_of("sales.orders", "sales.orders-v12"), Some(12));
        assert_eq!(generation_of("sales.orders", "sales.orders-v1x"), None);
        assert_eq!(
            generation_of("sales.orders", "sales.orders_archive-v1"),
            None
        );
        // The commit LSN (9), not the change's own LSN (5): commit order.
        assert_eq!(version(&env), Ok(9));
        assert_eq!(seq(&env), 1);
        // A snapshot row: its attempt's consistent point (its commit LSN), so a later
        // attempt outranks an earlier one and everything streamed after that one.
        let mut snap = env.clone();
        snap.source.snapshot = true;
        snap.source.lsn = 7;
        snap.source.commit_lsn = 7;
        assert_eq!(version(&snap), Ok(7));
        let mut later_attempt = snap.clone();
        later_attempt.source.commit_lsn = 12;
        assert!(
            version(&later_attempt) > version(&env),
            "above an earlier stream"
        );
        assert!(version(&snap) < version(&env), "below its own stream");
        let mut beyond = env;
        beyond.source.commit_lsn = 1 << 63;
        assert!(version(&beyond).is_err(), "never saturated silently");
    }

    #[test]
    fn template_matching() {
        let t = "{schema}.{table}";
        assert!(template_matches(t, "public.items"));
        assert!(template_matches(t, "a.b.c"));
        assert!(!template_matches(t, "items"));
        assert!(!template_matches(t, ".items"));
        let t = "t_1.{schema}.{table}";
        assert!(template_matches(t, "t_1.public.items"));
        assert!(!template_matches(t, "t_2.public.items"));
        assert!(!template_matches(t, "public.items"));
        let t = "App:{db}-{table}";
        assert!(template_matches(t, "app_shop-orders"));
        assert!(!template_matches(t, "app_shop-"));
        assert!(template_matches("fixed-{table}-idx", "fixed-x-idx"));
        assert!(!template_matches("fixed-{table}-idx", "fixed-x-idy"));
        // Regression (fuzzing): a value starting with a multi-byte character was not
        // recognised, so re-index left such a table's alias out of its generation count.
        assert!(template_matches("{schema}.{table}", "été.ventes"));
        assert!(template_matches("{schema}.{table}", "日本.表"));
        assert!(!template_matches("{schema}.{table}", "é"));
    }

    #[test]
    fn mappings() {
        assert_eq!(field_mapping("integer")["type"], "long");
        assert_eq!(field_mapping("text[]")["type"], "text");
        assert_eq!(field_mapping("timestamptz")["type"], "date");
        assert_eq!(field_mapping("numeric")["ignore_malformed"], true);
        assert_eq!(field_mapping("float[]")["ignore_malformed"], true);
        assert_eq!(field_mapping("date")["ignore_malformed"], true);
        assert_eq!(field_mapping("json")["enabled"], false);
        assert_eq!(field_mapping("some_enum")["type"], "text");
        let types = row(json!({"id": "integer", "name": "text"}));
        let known = row(json!({"id": {"type": "long"}}));
        let missing = missing_fields(&types, &known);
        let mut names = missing.keys().cloned().collect::<Vec<_>>();
        names.sort();
        assert_eq!(
            names,
            vec!["name", PARTITION_FIELD, SEQ_FIELD, VERSION_FIELD]
        );
        assert_eq!(missing[PARTITION_FIELD]["type"], "integer");
    }

    #[test]
    fn documents_carry_their_stamp() {
        let env: Envelope = serde_json::from_value(json!({
            "op": "r", "before": null, "after": null,
            "source": {"version": "v", "connector": "walrelay", "db": "d", "schema": "s",
                       "table": "t", "lsn": 40, "commit_lsn": 40, "txid": 0, "ts_ms": 0,
                       "snapshot": true, "seq": 0},
            "ts_ms": 0, "key": ["id"], "types": {"id": "integer"}
        }))
        .expect("envelope");
        let stamp = Stamp::of(&env, 3).expect("stamp");
        assert_eq!(
            stamp,
            Stamp {
                version: 40,
                seq: 0,
                partition: 3
            }
        );
        let raw = RawValue::from_string(r#"{"id":5,"v":"x"}"#.into()).expect("raw");
        let doc = forward(&env, &raw, "idx", stamp)
            .expect("forwarded")
            .expect("an id");
        let text = String::from_utf8(doc.lines).expect("utf-8");
        let mut lines = text.lines();
        let action: Value = serde_json::from_str(lines.next().unwrap_or("")).expect("action");
        assert_eq!(action["index"]["version"], 40);
        let source: Value = serde_json::from_str(lines.next().unwrap_or("")).expect("source");
        assert_eq!(
            source,
            json!({"id": 5, "v": "x", "walrelay_version": 40, "walrelay_seq": 0, "walrelay_partition": 3})
        );
        // The built path writes the same fields.
        let mut built = row(json!({"id": 5, "v": "x"}));
        let lines = index_lines(&mut built, "idx", "5", stamp).expect("lines");
        let text = String::from_utf8(lines).expect("utf-8");
        let built: Value = serde_json::from_str(text.lines().nth(1).unwrap_or("")).expect("src");
        assert_eq!(built, source);
        // A row with a column named like a stamp field is not forwarded as it is.
        let clash =
            RawValue::from_string(r#"{"id":5,"walrelay_partition":"mine"}"#.into()).expect("raw");
        assert!(forward(&env, &clash, "idx", stamp).is_none());
    }

    #[test]
    fn the_retire_query_keeps_what_the_attempt_or_the_stream_wrote_and_other_partitions() {
        let q = retire_query(100, 1);
        // Evaluated as the search stand-in does (the end-to-end tests run it against OpenSearch).
        let matches = |doc: &Value| {
            let src = doc.as_object().cloned().unwrap_or_default();
            walrelay_tests::search::query_matches(&q, &src)
                .unwrap_or_else(|| panic!("the stand-in understands {q}"))
        };
        let doc = |version: i64, partition: Option<i32>| {
            let mut d = json!({"walrelay_version": version, "walrelay_seq": 0});
            if let Some(p) = partition {
                d["walrelay_partition"] = json!(p);
            }
            d
        };
        // Retired: older than the attempt, from this partition or from before partitions.
        assert!(matches(&doc(99, Some(1))));
        assert!(matches(&doc(1, None)));
        // Kept: rewritten by the attempt (equal), changed since (above), another partition's.
        assert!(!matches(&doc(100, Some(1))));
        assert!(!matches(&doc(101, Some(1))));
        assert!(!matches(&doc(5, Some(0))));
        assert!(!matches(&doc(100, None)));
    }
}
