//! The Avro codec's decoder: a Confluent wire-format record written by walrelay's producer
//! (`--format avro`) back into the [`Envelope`](crate::event::Envelope) the JSON codec gives, values in the same
//! forms (numeric as an exact string, bytea as base64, timestamps as ISO strings, json
//! embedded), so sinks cannot tell the formats apart.
//!
//! ```text
//!   0x00 | id | body ──schema(id): cached, else fetched ([`Decoder::fetch`])──▶ apache-avro Value
//!                    ──the schema's walrelay.* properties (names, types, key)──▶ JSON envelope
//! ```
//!
//! Decoding is synchronous (it runs on the consumer's decoding thread); an id not yet cached is
//! fetched first, asynchronously, by [`Decoder::fetch`] — the runtime calls it for each batch's
//! unknown ids ([`Decoder::unknown_id`]) before decoding. A record whose schema is not
//! walrelay's, or whose body does not match its schema, is a [`DecodeError`] (dead-lettered).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use apache_avro::types::Value as Avro;
use base64::Engine;
use serde_json::{Map, Value, json};

use super::DecodeError;
use super::json::Decoded;
use crate::registry::{Registry, RegistryError, unframe};
use crate::sync::lock;

/// What a writer schema is, and what its properties say.
struct Writer {
    schema: apache_avro::Schema,
    kind: Kind,
}

enum Kind {
    /// A table's Envelope.
    Envelope(Facts),
    /// `io.walrelay.SchemaChange`.
    SchemaChange,
    /// `io.walrelay.SnapshotMarker`.
    SnapshotMarker,
}

/// A table's facts from the Envelope schema's properties.
struct Facts {
    key: Vec<String>,
    schema_version: u64,
    /// Per Value field: (Avro field name, column name, `types` label, column id).
    columns: Vec<(String, String, String, Option<i64>)>,
    /// Per Value field: the decimal scale, when the field is a fixed-scale decimal.
    scales: HashMap<String, u32>,
}

/// Decodes walrelay's Avro records; shared by a consumer's decoding threads.
pub struct Decoder {
    registry: Arc<Registry>,
    writers: Mutex<HashMap<u32, Arc<Writer>>>,
    /// Ids that failed definitely (at most [`MAX_FAILED`]), with why: not asked again.
    failed: Mutex<HashMap<u32, String>>,
}

/// Failed ids remembered at most (ids come from records, which anyone may write).
const MAX_FAILED: usize = 1000;

impl Decoder {
    /// A decoder fetching schemas from `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            writers: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// The schema id of an Avro `value` that is not cached yet.
    pub fn unknown_id(&self, value: &[u8]) -> Option<u32> {
        let (id, _) = unframe(value)?;
        (!lock(&self.writers).contains_key(&id)).then_some(id)
    }

    /// Fetches and parses schema `id`. A schema that cannot be parsed is cached as an error
    /// for its records (definite); an unreachable registry is transient.
    pub async fn fetch(&self, id: u32) -> Result<(), RegistryError> {
        let text = self.registry.schema(id).await?;
        match parse_writer(&text) {
            Ok(w) => {
                lock(&self.writers).insert(id, Arc::new(w));
                Ok(())
            }
            Err(e) => Err(RegistryError::Protocol(format!(
                "schema id {id} is not one of walrelay's Avro schemas: {e}"
            ))),
        }
    }

    /// Makes sure the schema of `id` is cached: fetched, and while the registry is unavailable
    /// fetched again with the shared backoff (the caller's reading waits, nothing is
    /// committed) until `stop` completes. The error of a definite failure (an unknown id, a
    /// schema that is not walrelay's) is remembered and returned for every record of the id.
    pub async fn ready<S: std::future::Future<Output = ()>>(
        &self,
        id: u32,
        stop: S,
    ) -> Result<(), String> {
        if lock(&self.writers).contains_key(&id) {
            return Ok(());
        }
        if let Some(e) = lock(&self.failed).get(&id) {
            return Err(e.clone());
        }
        let mut backoff = crate::retry::Backoff::new(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(10),
        );
        let mut failures = 0u32;
        let mut stop = std::pin::pin!(stop);
        loop {
            match self.fetch(id).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(error = %e, schema_id = id, failures, "Schema registry unavailable: reading waits and retries.");
                    }
                    tokio::select! {
                        () = &mut stop => return Err("stopped while the schema registry was unavailable".into()),
                        () = tokio::time::sleep(backoff.next_wait()) => {}
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    let mut failed = lock(&self.failed);
                    if failed.len() < MAX_FAILED {
                        failed.insert(id, message.clone());
                    }
                    return Err(message);
                }
            }
        }
    }

    /// Decodes a record value (its schema fetched before).
    pub fn decode(&self, value: &[u8]) -> Result<Decoded, DecodeError> {
        self.decode_to_json(value).map(|(d, _)| d)
    }

    /// Decodes a record value, and gives the JSON envelope text it equals (what a sink that
    /// forwards records whole, such as webhooks, sends instead of Avro bytes).
    pub fn decode_to_json(&self, value: &[u8]) -> Result<(Decoded, Vec<u8>), DecodeError> {
        let (id, mut body) =
            unframe(value).ok_or_else(|| DecodeError("not in the Confluent wire format".into()))?;
        let writer = lock(&self.writers)
            .get(&id)
            .cloned()
            .ok_or_else(|| DecodeError(format!("schema id {id} was not fetched")))?;
        let datum = apache_avro::reader::datum::GenericDatumReader::builder(&writer.schema)
            .build()
            .and_then(|r| r.read_value(&mut body))
            .map_err(|e| DecodeError(format!("schema id {id}: {e}")))?;
        if !body.is_empty() {
            return Err(DecodeError(format!(
                "schema id {id}: {} bytes left after the record",
                body.len()
            )));
        }
        let Avro::Record(fields) = datum else {
            return Err(DecodeError(format!("schema id {id}: not a record")));
        };
        let fields: HashMap<String, Avro> = fields.into_iter().collect();
        let envelope = match &writer.kind {
            Kind::Envelope(facts) => envelope(facts, fields)?,
            Kind::SchemaChange => schema_change(fields)?,
            Kind::SnapshotMarker => snapshot_marker(fields)?,
        };
        let text = serde_json::to_vec(&envelope).map_err(|e| DecodeError(e.to_string()))?;
        super::json::decode(&text).map(|d| (d, text))
    }
}

fn parse_writer(text: &str) -> Result<Writer, String> {
    let schema = apache_avro::Schema::parse_str(text).map_err(|e| e.to_string())?;
    let json: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let name = json.get("name").and_then(Value::as_str).unwrap_or_default();
    let kind = match name {
        "SchemaChange" => Kind::SchemaChange,
        "SnapshotMarker" => Kind::SnapshotMarker,
        "Envelope" => Kind::Envelope(facts(&json)?),
        other => return Err(format!("a record named {other:?}")),
    };
    Ok(Writer { schema, kind })
}

fn facts(envelope: &Value) -> Result<Facts, String> {
    let key = envelope
        .get("walrelay.key")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .ok_or("no walrelay.key property (not written by walrelay)")?;
    let schema_version = envelope
        .get("walrelay.schema_version")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    // before: ["null", Value record]
    let value = envelope
        .get("fields")
        .and_then(Value::as_array)
        .and_then(|f| f.first())
        .and_then(|f| f.get("type"))
        .and_then(Value::as_array)
        .and_then(|u| u.get(1))
        .and_then(|r| r.get("fields"))
        .and_then(Value::as_array)
        .ok_or("no Value record in before")?;
    let mut columns = Vec::with_capacity(value.len());
    let mut scales = HashMap::new();
    for f in value {
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        let column = f
            .get("walrelay.column")
            .and_then(Value::as_str)
            .unwrap_or(name);
        let label = f
            .get("walrelay.type")
            .and_then(Value::as_str)
            .unwrap_or("text");
        let id = f.get("walrelay.id").and_then(Value::as_i64);
        // ["null", {"type": "bytes", "logicalType": "decimal", "scale": s}]
        let scale = f
            .get("type")
            .and_then(Value::as_array)
            .and_then(|u| u.get(1))
            .filter(|t| t.get("logicalType").and_then(Value::as_str) == Some("decimal"))
            .and_then(|t| t.get("scale").and_then(Value::as_u64));
        if let Some(s) = scale {
            scales.insert(name.to_string(), u32::try_from(s).unwrap_or(0));
        }
        columns.push((name.to_string(), column.to_string(), label.to_string(), id));
    }
    Ok(Facts {
        key,
        schema_version,
        columns,
        scales,
    })
}

fn unwrap(v: Avro) -> Avro {
    match v {
        Avro::Union(_, inner) => unwrap(*inner),
        other => other,
    }
}

fn take(fields: &mut HashMap<String, Avro>, name: &str) -> Avro {
    fields.remove(name).map_or(Avro::Null, unwrap)
}

fn int(v: &Avro) -> Option<i64> {
    match v {
        Avro::Int(i) => Some(i64::from(*i)),
        Avro::Long(l) => Some(*l),
        _ => None,
    }
}

fn string(v: Avro) -> Option<String> {
    match v {
        Avro::String(s) => Some(s),
        _ => None,
    }
}

/// `source` as the JSON envelope has it.
fn source(v: Avro) -> Result<Value, DecodeError> {
    let Avro::Record(fields) = v else {
        return Err(DecodeError("source is not a record".into()));
    };
    let mut f: HashMap<String, Avro> = fields.into_iter().collect();
    let text = |f: &mut HashMap<String, Avro>, n: &str| string(take(f, n)).unwrap_or_default();
    let num = |f: &mut HashMap<String, Avro>, n: &str| int(&take(f, n)).unwrap_or(0);
    Ok(json!({
        "version": text(&mut f, "version"),
        "connector": text(&mut f, "connector"),
        "db": text(&mut f, "db"),
        "schema": text(&mut f, "schema"),
        "table": text(&mut f, "table"),
        "lsn": num(&mut f, "lsn"),
        "commit_lsn": num(&mut f, "commit_lsn"),
        "txid": num(&mut f, "txId"),
        "ts_ms": num(&mut f, "ts_ms"),
        "snapshot": string(take(&mut f, "snapshot")).is_some_and(|s| s != "false"),
        "seq": num(&mut f, "seq"),
    }))
}

fn envelope(facts: &Facts, mut fields: HashMap<String, Avro>) -> Result<Value, DecodeError> {
    let op = string(take(&mut fields, "op")).ok_or_else(|| DecodeError("no op".into()))?;
    let unchanged: Vec<String> = match take(&mut fields, "unchanged_toast") {
        Avro::Array(items) => items.into_iter().filter_map(string).collect(),
        _ => Vec::new(),
    };
    let before = image(facts, take(&mut fields, "before"), &[])?;
    let after = image(facts, take(&mut fields, "after"), &unchanged)?;
    let mut env = json!({
        "op": op,
        "before": before,
        "after": after,
        "source": source(take(&mut fields, "source"))?,
        "ts_ms": int(&take(&mut fields, "ts_ms")).unwrap_or(0),
        "key": facts.key,
        "types": facts.columns.iter().map(|(_, c, l, _)| (c.clone(), Value::from(l.clone()))).collect::<Map<_, _>>(),
        "schema_version": facts.schema_version,
        "column_ids": facts.columns.iter().filter_map(|(_, c, _, id)| id.map(|id| (c.clone(), Value::from(id)))).collect::<Map<_, _>>(),
    });
    if !unchanged.is_empty() {
        env["unchanged_toast"] = json!(unchanged);
    }
    if let Avro::Record(t) = take(&mut fields, "transaction") {
        let mut t: HashMap<String, Avro> = t.into_iter().collect();
        env["transaction"] = json!({
            "id": string(take(&mut t, "id")).unwrap_or_default(),
            "total_order": int(&take(&mut t, "total_order")).unwrap_or(0),
            "data_collection_order": int(&take(&mut t, "data_collection_order")).unwrap_or(0),
        });
    }
    Ok(env)
}

fn image(facts: &Facts, v: Avro, unchanged: &[String]) -> Result<Value, DecodeError> {
    let Avro::Record(fields) = v else {
        return Ok(Value::Null);
    };
    let mut by_name: HashMap<String, Avro> = fields.into_iter().collect();
    let mut out = Map::with_capacity(facts.columns.len());
    for (field, column, label, _) in &facts.columns {
        let v = by_name.remove(field).map_or(Avro::Null, unwrap);
        let value = if unchanged.contains(column) {
            // Debezium's placeholder, as the JSON codec writes it.
            Value::from(crate::event::UNCHANGED_TOAST)
        } else {
            to_json(v, label, facts.scales.get(field).copied())
                .map_err(|e| DecodeError(format!("column {column:?}: {e}")))?
        };
        out.insert(column.clone(), value);
    }
    Ok(Value::Object(out))
}

/// A column value in the JSON codec's form for its `types` label.
fn to_json(v: Avro, label: &str, scale: Option<u32>) -> Result<Value, String> {
    Ok(match v {
        Avro::Null => Value::Null,
        Avro::Boolean(b) => Value::Bool(b),
        Avro::Int(i) => Value::from(i),
        Avro::Long(l) => Value::from(l),
        Avro::Float(f) => float(f64::from(f), &f.to_string()),
        Avro::Double(d) => float(d, &d.to_string()),
        Avro::Bytes(b) => Value::from(base64::engine::general_purpose::STANDARD.encode(b)),
        Avro::String(s) if label == "json" => {
            serde_json::from_str(&s).map_err(|e| format!("json text does not parse: {e}"))?
        }
        Avro::String(s) => Value::from(s),
        Avro::Uuid(u) => Value::from(u.to_string()),
        Avro::Decimal(d) => {
            let bytes = Vec::<u8>::try_from(&d).map_err(|e| e.to_string())?;
            Value::from(decimal_text(&bytes, scale.unwrap_or(0)))
        }
        Avro::Record(fields) => {
            // io.debezium.data.VariableScaleDecimal
            let mut f: HashMap<String, Avro> = fields.into_iter().collect();
            let scale = int(&take(&mut f, "scale")).ok_or("a record that is not a decimal")?;
            let Avro::Bytes(b) = take(&mut f, "value") else {
                return Err("a record that is not a decimal".into());
            };
            Value::from(decimal_text(&b, u32::try_from(scale).unwrap_or(0)))
        }
        Avro::Date(days) => Value::from(date_text(i64::from(days))),
        Avro::TimeMicros(us) => Value::from(time_text(us)),
        Avro::TimestampMicros(us) => Value::from(timestamp_text(us, label == "timestamptz")),
        Avro::Array(items) => {
            let elem = label.strip_suffix("[]").unwrap_or(label);
            Value::Array(
                items
                    .into_iter()
                    .map(|i| to_json(unwrap(i), elem, scale))
                    .collect::<Result<_, _>>()?,
            )
        }
        other => return Err(format!("an Avro value walrelay does not write: {other:?}")),
    })
}

fn float(v: f64, text: &str) -> Value {
    if v.is_nan() {
        Value::from("NaN")
    } else if v.is_infinite() {
        Value::from(if v > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        serde_json::from_str(text).unwrap_or(Value::Null)
    }
}

/// The decimal text of a two's-complement big-endian unscaled value at `scale`.
pub fn decimal_text(bytes: &[u8], scale: u32) -> String {
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut mag: Vec<u8> = if negative {
        // Magnitude of a negative number: invert and add one.
        let mut m: Vec<u8> = bytes.iter().map(|b| !b).collect();
        for b in m.iter_mut().rev() {
            let (v, overflow) = b.overflowing_add(1);
            *b = v;
            if !overflow {
                break;
            }
        }
        m
    } else {
        bytes.to_vec()
    };
    // Repeated division by 10 of the big-endian magnitude.
    let mut digits = Vec::new();
    while mag.iter().any(|&b| b != 0) {
        let mut rem = 0u32;
        for b in &mut mag {
            let cur = (rem << 8) | u32::from(*b);
            *b = (cur / 10) as u8;
            rem = cur % 10;
        }
        digits.push(b'0' + rem as u8);
    }
    let scale = scale as usize;
    while digits.len() <= scale {
        digits.push(b'0');
    }
    digits.reverse();
    let (int, frac) = digits.split_at(digits.len() - scale);
    let mut out = String::with_capacity(digits.len() + 2);
    if negative {
        out.push('-');
    }
    out.push_str(std::str::from_utf8(int).unwrap_or("0"));
    if scale > 0 {
        out.push('.');
        out.push_str(std::str::from_utf8(frac).unwrap_or(""));
    }
    out
}

/// Days since the epoch as a proleptic Gregorian (year, month, day), astronomical years.
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn date_parts(days: i64) -> (String, bool) {
    let (y, m, d) = civil(days);
    if y <= 0 {
        (format!("{:04}-{m:02}-{d:02}", 1 - y), true)
    } else {
        (format!("{y:04}-{m:02}-{d:02}"), false)
    }
}

/// Postgres' ISO date text (`0044-03-15 BC` before year 1).
fn date_text(days: i64) -> String {
    match date_parts(days) {
        (d, true) => format!("{d} BC"),
        (d, false) => d,
    }
}

/// `HH:MM:SS[.ffffff]`, trailing zeros of the fraction dropped (as Postgres prints).
fn time_text(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let mut t = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if frac > 0 {
        let f = format!("{frac:06}");
        t.push('.');
        t.push_str(f.trim_end_matches('0'));
    }
    t
}

/// The JSON codec's timestamp text: `2024-01-02T03:04:05.5`, `+00:00` for timestamptz; before
/// year 1 Postgres' own text (`0044-03-15 12:00:00 BC`).
fn timestamp_text(us: i64, zoned: bool) -> String {
    let days = us.div_euclid(86_400_000_000);
    let time = time_text(us.rem_euclid(86_400_000_000));
    match date_parts(days) {
        (d, true) if zoned => format!("{d} {time}+00 BC"),
        (d, true) => format!("{d} {time} BC"),
        (d, false) if zoned => format!("{d}T{time}+00:00"),
        (d, false) => format!("{d}T{time}"),
    }
}

fn head(fields: &mut HashMap<String, Avro>) -> Result<Value, DecodeError> {
    let key: Vec<String> = match take(fields, "key") {
        Avro::Array(items) => items.into_iter().filter_map(string).collect(),
        _ => Vec::new(),
    };
    Ok(json!({
        "op": string(take(fields, "op")).ok_or_else(|| DecodeError("no op".into()))?,
        "before": null,
        "after": null,
        "source": source(take(fields, "source"))?,
        "ts_ms": int(&take(fields, "ts_ms")).unwrap_or(0),
        "key": key,
        "schema_version": int(&take(fields, "schema_version")).unwrap_or(0),
    }))
}

fn opt_string(fields: &mut HashMap<String, Avro>, name: &str) -> Value {
    string(take(fields, name)).map_or(Value::Null, Value::from)
}

fn boolean(fields: &mut HashMap<String, Avro>, name: &str) -> bool {
    matches!(take(fields, name), Avro::Boolean(true))
}

fn schema_change(mut fields: HashMap<String, Avro>) -> Result<Value, DecodeError> {
    let mut env = head(&mut fields)?;
    let previous = match take(&mut fields, "previous") {
        Avro::Record(p) => {
            let mut p: HashMap<String, Avro> = p.into_iter().collect();
            json!({"schema": opt_string(&mut p, "schema"), "table": opt_string(&mut p, "table")})
        }
        _ => Value::Null,
    };
    let mut types = Map::new();
    let mut ids = Map::new();
    let columns: Vec<Value> = match take(&mut fields, "columns") {
        Avro::Array(items) => items
            .into_iter()
            .filter_map(|c| match c {
                Avro::Record(c) => Some(c.into_iter().collect::<HashMap<_, _>>()),
                _ => None,
            })
            .map(|mut c| {
                let name = opt_string(&mut c, "name");
                let logical = opt_string(&mut c, "logical");
                let id = int(&take(&mut c, "id")).unwrap_or(0);
                let generated = boolean(&mut c, "generated");
                if let (Some(n), false) = (name.as_str(), generated) {
                    types.insert(n.to_string(), logical.clone());
                    ids.insert(n.to_string(), Value::from(id));
                }
                json!({
                    "id": id,
                    "name": name,
                    "type": opt_string(&mut c, "type"),
                    "type_oid": int(&take(&mut c, "type_oid")).unwrap_or(0),
                    "logical": logical,
                    "nullable": boolean(&mut c, "nullable"),
                    "default": opt_string(&mut c, "default"),
                    "key_position": int(&take(&mut c, "key_position")),
                    "generated": generated,
                    "identity": boolean(&mut c, "identity"),
                })
            })
            .collect(),
        _ => Vec::new(),
    };
    env["types"] = Value::Object(types);
    env["column_ids"] = Value::Object(ids);
    env["ddl"] = json!({
        "origin": opt_string(&mut fields, "origin"),
        "command": opt_string(&mut fields, "command"),
        "object": opt_string(&mut fields, "object"),
        "sql": opt_string(&mut fields, "sql"),
        "previous": previous,
        "dropped": boolean(&mut fields, "dropped"),
        "table_oid": int(&take(&mut fields, "table_oid")).unwrap_or(0),
        "columns": columns,
    });
    Ok(env)
}

fn snapshot_marker(mut fields: HashMap<String, Avro>) -> Result<Value, DecodeError> {
    let mut env = head(&mut fields)?;
    let rows = int(&take(&mut fields, "rows"));
    env["snapshot"] = json!({
        "attempt": opt_string(&mut fields, "attempt"),
        "consistent_lsn": int(&take(&mut fields, "consistent_lsn")).unwrap_or(0),
        "rows": rows,
    });
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_print_exactly() {
        assert_eq!(decimal_text(&[0x00, 0x96], 2), "1.50");
        assert_eq!(decimal_text(&[0xfb], 1), "-0.5");
        assert_eq!(decimal_text(&[0x00], 2), "0.00");
        assert_eq!(decimal_text(&[0xff, 0x7f], 0), "-129");
        let big: i128 = -12_345_678_901_234_567_890_123_456_789;
        assert_eq!(
            decimal_text(&big.to_be_bytes(), 9),
            "-12345678901234567890.123456789"
        );
    }

    #[test]
    fn temporal_texts_match_the_json_codec() {
        assert_eq!(date_text(0), "1970-01-01");
        assert_eq!(date_text(-719_528), "0001-01-01 BC");
        assert_eq!(time_text(3_723_500_000), "01:02:03.5");
        assert_eq!(
            timestamp_text(1_704_164_645_123_456, false),
            "2024-01-02T03:04:05.123456"
        );
        assert_eq!(timestamp_text(0, true), "1970-01-01T00:00:00+00:00");
    }
}
