//! Postgres columns as Avro types (Debezium's defaults), and their text values as Avro binary.
//!
//! | Postgres | Avro (`connect.name`) |
//! |---|---|
//! | bool | `boolean` |
//! | int2, int4 | `int` |
//! | int8, oid, integer domains | `long` |
//! | float4 / float8 | `float` / `double` (NaN and ±Infinity too) |
//! | numeric(p,s), 0 ≤ s ≤ p | `bytes` `decimal`(p,s) (`org.apache.kafka.connect.data.Decimal`) |
//! | numeric without a fixed scale | record `io.debezium.data.VariableScaleDecimal {scale: int, value: bytes}` |
//! | json, jsonb | `string` (`io.debezium.data.Json`) |
//! | bytea | `bytes` |
//! | date | `int` `date` (`io.debezium.time.Date`) |
//! | time | `long` `time-micros` (`io.debezium.time.MicroTime`) |
//! | timestamp | `long` `timestamp-micros` (`io.debezium.time.MicroTimestamp`), the wall-clock time read as UTC |
//! | timestamptz | `long` `timestamp-micros`, the instant |
//! | timetz, interval | `string`, Postgres' ISO text (`io.debezium.time.ZonedTime`, `io.debezium.time.Interval`) |
//! | uuid | `string` `uuid` |
//! | one-dimensional arrays | `array` of the nullable element type |
//! | enums, text types and everything else | `string` (the type's text form) |
//!
//! A value the declared type cannot carry (numeric `NaN` or `Infinity` in a decimal, an
//! `infinity` date or timestamp, a multi-dimensional array, bytes that are not UTF-8 in a
//! string) is an error naming the reason; the caller adds the table and column and the event
//! fails loudly. Nothing is rounded or replaced.

use serde_json::{Value, json};
use walrelay_common::event::UNCHANGED_TOAST;

use super::binary;
use crate::value::Kind;

/// The Avro type of a column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AvroType {
    /// `boolean`.
    Boolean,
    /// `int` (int2, int4).
    Int,
    /// `long`.
    Long,
    /// `float`.
    Float,
    /// `double`.
    Double,
    /// `bytes` with the `decimal` logical type.
    Decimal {
        /// Digits in all.
        precision: u32,
        /// Digits after the point.
        scale: u32,
    },
    /// Debezium's `VariableScaleDecimal` record.
    VariableDecimal,
    /// `string`, with a Debezium semantic name or none.
    String(Option<&'static str>),
    /// `string` with the `uuid` logical type.
    Uuid,
    /// `bytes`.
    Bytes,
    /// `int` `date`: days since 1970-01-01.
    Date,
    /// `long` `time-micros`.
    TimeMicros,
    /// `long` `timestamp-micros`.
    Timestamp {
        /// timestamptz (else timestamp read as UTC).
        zoned: bool,
    },
    /// `array` of nullable elements.
    Array {
        /// Element type.
        elem: Box<AvroType>,
        /// Element delimiter of the text form.
        delim: u8,
    },
}

/// The element type of a built-in array type.
fn element_oid(array_oid: u32) -> u32 {
    match array_oid {
        1000 => 16,
        1005 => 21,
        1007 => 23,
        1016 => 20,
        1021 => 700,
        1022 => 701,
        1231 => 1700,
        2951 => 2950,
        _ => 0,
    }
}

impl AvroType {
    /// The Avro type of a column of `kind`, type `oid` and type modifier `typmod`.
    pub fn of(kind: &Kind, oid: u32, typmod: i32) -> AvroType {
        match kind {
            Kind::Bool => AvroType::Boolean,
            Kind::Int if matches!(oid, 21 | 23) => AvroType::Int,
            Kind::Int => AvroType::Long,
            Kind::Float if oid == 700 => AvroType::Float,
            Kind::Float => AvroType::Double,
            Kind::Numeric => match numeric_typmod(typmod) {
                Some((precision, scale)) if precision > 0 && (0..=precision).contains(&scale) => {
                    AvroType::Decimal {
                        precision: precision as u32,
                        scale: scale as u32,
                    }
                }
                _ => AvroType::VariableDecimal,
            },
            Kind::Json => AvroType::String(Some("io.debezium.data.Json")),
            Kind::Bytea => AvroType::Bytes,
            Kind::Date => AvroType::Date,
            Kind::Time => AvroType::TimeMicros,
            Kind::Interval => AvroType::String(Some("io.debezium.time.Interval")),
            Kind::TimeTz => AvroType::String(Some("io.debezium.time.ZonedTime")),
            Kind::Timestamp => AvroType::Timestamp { zoned: false },
            Kind::TimestampTz => AvroType::Timestamp { zoned: true },
            Kind::Text if oid == 2950 => AvroType::Uuid,
            Kind::Text => AvroType::String(None),
            Kind::Array { elem, delim } => AvroType::Array {
                elem: Box::new(AvroType::of(elem, element_oid(oid), typmod)),
                delim: *delim,
            },
        }
    }

    /// The type's schema (not nullable).
    pub fn schema(&self) -> Value {
        match self {
            AvroType::Boolean => json!("boolean"),
            AvroType::Int => json!("int"),
            AvroType::Long => json!("long"),
            AvroType::Float => json!("float"),
            AvroType::Double => json!("double"),
            AvroType::Decimal { precision, scale } => json!({
                "type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale,
                "connect.name": "org.apache.kafka.connect.data.Decimal",
                "connect.parameters": {"scale": scale.to_string(), "connect.decimal.precision": precision.to_string()},
            }),
            AvroType::VariableDecimal => json!({
                "type": "record", "name": "VariableScaleDecimal", "namespace": "io.debezium.data",
                "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
                "connect.name": "io.debezium.data.VariableScaleDecimal",
            }),
            AvroType::String(None) => json!("string"),
            AvroType::String(Some(name)) => json!({"type": "string", "connect.name": name}),
            AvroType::Uuid => {
                json!({"type": "string", "logicalType": "uuid", "connect.name": "io.debezium.data.Uuid"})
            }
            AvroType::Bytes => json!("bytes"),
            AvroType::Date => {
                json!({"type": "int", "logicalType": "date", "connect.name": "io.debezium.time.Date"})
            }
            AvroType::TimeMicros => {
                json!({"type": "long", "logicalType": "time-micros", "connect.name": "io.debezium.time.MicroTime"})
            }
            AvroType::Timestamp { zoned: false } => {
                json!({"type": "long", "logicalType": "timestamp-micros", "connect.name": "io.debezium.time.MicroTimestamp"})
            }
            AvroType::Timestamp { zoned: true } => {
                json!({"type": "long", "logicalType": "timestamp-micros"})
            }
            AvroType::Array { elem, .. } => {
                json!({"type": "array", "items": ["null", elem.schema()]})
            }
        }
    }

    /// The type's schema after its first use in a record: a named type (the variable-scale
    /// decimal record) is referred to by name from then on.
    pub fn schema_again(&self) -> Value {
        match self {
            AvroType::VariableDecimal => json!("io.debezium.data.VariableScaleDecimal"),
            AvroType::Array { elem, .. } => {
                json!({"type": "array", "items": ["null", elem.schema_again()]})
            }
            other => other.schema(),
        }
    }

    /// Whether the type contains the named variable-scale decimal record.
    pub fn names_a_record(&self) -> bool {
        match self {
            AvroType::VariableDecimal => true,
            AvroType::Array { elem, .. } => elem.names_a_record(),
            _ => false,
        }
    }

    /// Appends Debezium's unavailable-value placeholder (an unchanged TOAST value) if the type
    /// can carry it; `false` if it cannot (the caller writes null instead).
    pub fn placeholder(&self, out: &mut Vec<u8>) -> bool {
        match self {
            AvroType::String(_) | AvroType::Bytes => {
                binary::bytes(out, UNCHANGED_TOAST.as_bytes());
                true
            }
            _ => false,
        }
    }

    /// Appends the Avro binary of `text`, this type's Postgres text form.
    pub fn write(&self, out: &mut Vec<u8>, text: &[u8]) -> Result<(), String> {
        let s = std::str::from_utf8(text)
            .map_err(|_| "the value is not UTF-8 (a SQL_ASCII database?)".to_string())?;
        match self {
            AvroType::Boolean => out.push(u8::from(s == "t")),
            AvroType::Int => binary::long(
                out,
                i64::from(s.parse::<i32>().map_err(|_| not_a("an int", s))?),
            ),
            AvroType::Long => binary::long(out, s.parse::<i64>().map_err(|_| not_a("a long", s))?),
            AvroType::Float => {
                let v: f32 = s.parse().map_err(|_| not_a("a float", s))?;
                out.extend_from_slice(&v.to_le_bytes());
            }
            AvroType::Double => {
                let v: f64 = s.parse().map_err(|_| not_a("a double", s))?;
                out.extend_from_slice(&v.to_le_bytes());
            }
            AvroType::Decimal { scale, .. } => {
                let b = binary::decimal(s, *scale).ok_or_else(|| {
                    format!("{s} cannot be carried by an Avro decimal of scale {scale} (NaN and Infinity have no decimal form)")
                })?;
                binary::bytes(out, &b);
            }
            AvroType::VariableDecimal => {
                let scale = binary::scale_of(s);
                let b = binary::decimal(s, scale).ok_or_else(|| {
                    format!("{s} cannot be carried by a VariableScaleDecimal (NaN and Infinity have no decimal form)")
                })?;
                binary::long(out, i64::from(scale));
                binary::bytes(out, &b);
            }
            AvroType::String(_) | AvroType::Uuid => binary::bytes(out, s.as_bytes()),
            AvroType::Bytes => {
                let b = crate::value::decode_hex_bytea(s).ok_or_else(|| not_a("hex bytea", s))?;
                binary::bytes(out, &b);
            }
            AvroType::Date => binary::long(out, i64::from(date_days(s)?)),
            AvroType::TimeMicros => binary::long(out, time_micros(s)?),
            AvroType::Timestamp { .. } => binary::long(out, timestamp_micros(s)?),
            AvroType::Array { elem, delim } => write_array(out, elem, *delim, s)?,
        }
        Ok(())
    }
}

fn not_a(what: &str, s: &str) -> String {
    let mut shown: String = s.chars().take(40).collect();
    if shown.len() < s.len() {
        shown.push('…');
    }
    format!("{shown:?} is not {what}")
}

/// `(precision, scale)` of a numeric type modifier (scale may be negative in Postgres 15).
pub fn numeric_typmod(typmod: i32) -> Option<(i32, i32)> {
    if typmod < 4 {
        return None;
    }
    let t = typmod - 4;
    let precision = (t >> 16) & 0xffff;
    let raw = t & 0x7ff;
    let scale = if raw & 0x400 != 0 { raw - 0x800 } else { raw };
    Some((precision, scale))
}

/// The numeric type modifier written in a type name such as `numeric(10,2)` (what
/// `format_type` prints), or -1.
pub fn typmod_of_name(name: &str) -> i32 {
    let Some(args) = name
        .strip_prefix("numeric(")
        .and_then(|r| r.strip_suffix(')').or_else(|| r.strip_suffix(")[]")))
    else {
        return -1;
    };
    let (p, s) = args.split_once(',').unwrap_or((args, "0"));
    match (p.trim().parse::<i32>(), s.trim().parse::<i32>()) {
        (Ok(p), Ok(s)) => ((p << 16) | (s & 0x7ff)) + 4,
        _ => -1,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (astronomical year numbering).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` (Postgres ISO output, ` BC` for years before 1) as days since the epoch.
fn parse_date(s: &str) -> Result<(i64, &str), String> {
    if s == "infinity" || s == "-infinity" {
        return Err(format!("{s} has no Avro date or timestamp form"));
    }
    let bad = || not_a("an ISO date", s);
    let dash = s
        .get(4..)
        .and_then(|r| r.find('-'))
        .map(|i| i + 4)
        .ok_or_else(bad)?;
    let year: i64 = s[..dash].parse().map_err(|_| bad())?;
    let month: i64 = s
        .get(dash + 1..dash + 3)
        .and_then(|v| v.parse().ok())
        .ok_or_else(bad)?;
    let day: i64 = s
        .get(dash + 4..dash + 6)
        .and_then(|v| v.parse().ok())
        .ok_or_else(bad)?;
    let rest = s.get(dash + 6..).unwrap_or("");
    let (rest, bc) = match rest.strip_suffix(" BC") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let year = if bc { 1 - year } else { year };
    Ok((days_from_civil(year, month, day), rest))
}

fn date_days(s: &str) -> Result<i32, String> {
    let (days, rest) = parse_date(s)?;
    if !rest.is_empty() {
        return Err(not_a("an ISO date", s));
    }
    i32::try_from(days).map_err(|_| format!("{s} is outside an Avro date's range"))
}

/// `HH:MM:SS[.ffffff]` as microseconds since midnight; returns what follows (an offset).
fn parse_time(s: &str) -> Option<(i64, &str)> {
    let h: i64 = s.get(0..2)?.parse().ok()?;
    let m: i64 = s.get(3..5)?.parse().ok()?;
    let sec: i64 = s.get(6..8)?.parse().ok()?;
    let mut rest = s.get(8..)?;
    let mut micros = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 6 {
            return None;
        }
        micros = frac[..n].parse::<i64>().ok()? * 10_i64.pow(6 - n as u32);
        rest = &frac[n..];
    }
    Some((((h * 60 + m) * 60 + sec) * 1_000_000 + micros, rest))
}

fn time_micros(s: &str) -> Result<i64, String> {
    match parse_time(s) {
        Some((t, "")) => Ok(t),
        _ => Err(not_a("an ISO time", s)),
    }
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]][ BC]` as microseconds since the epoch (UTC).
fn timestamp_micros(s: &str) -> Result<i64, String> {
    let bad = || not_a("an ISO timestamp", s);
    let (core, bc) = match s.strip_suffix(" BC") {
        Some(c) => (c, " BC"),
        None => (s, ""),
    };
    let space = core.find(' ').ok_or_else(bad)?;
    // Only a BC date needs its suffix back for parse_date (rare: allocate then only).
    let days = if bc.is_empty() {
        let (days, rest) = parse_date(&core[..space])?;
        if !rest.is_empty() {
            return Err(bad());
        }
        days
    } else {
        let owned = format!("{} BC", &core[..space]);
        let (days, rest) = parse_date(&owned)?;
        if !rest.is_empty() {
            return Err(bad());
        }
        days
    };
    let (time, offset) = parse_time(&core[space + 1..]).ok_or_else(bad)?;
    let offset_secs = parse_offset(offset).ok_or_else(bad)?;
    days.checked_mul(86_400_000_000)
        .and_then(|d| d.checked_add(time))
        .and_then(|t| t.checked_sub(offset_secs * 1_000_000))
        .ok_or_else(|| format!("{s} is outside an Avro timestamp's range"))
}

/// `""`, `+HH`, `-HH:MM`, `+HH:MM:SS` as seconds east of UTC.
fn parse_offset(s: &str) -> Option<i64> {
    if s.is_empty() {
        return Some(0);
    }
    let sign = match s.as_bytes()[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let mut secs = 0;
    for (i, part) in s[1..].split(':').enumerate() {
        let v: i64 = part.parse().ok()?;
        secs += v * [3600, 60, 1].get(i)?;
    }
    Some(sign * secs)
}

/// A one-dimensional array's text (`{1,NULL,"a b"}`, `[0:1]={5,6}`) as an Avro array of
/// nullable elements, in one block.
fn write_array(out: &mut Vec<u8>, elem: &AvroType, delim: u8, s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let mut pos = 0;
    if b.first() == Some(&b'[') {
        pos = b
            .iter()
            .position(|c| *c == b'=')
            .ok_or_else(|| not_a("an array", s))?
            + 1;
    }
    if b.get(pos) != Some(&b'{') {
        return Err(not_a("an array", s));
    }
    pos += 1;
    let mut items: Vec<Option<std::borrow::Cow<'_, [u8]>>> = Vec::new();
    if b.get(pos) == Some(&b'}') {
        pos += 1;
    } else {
        loop {
            match b.get(pos) {
                Some(b'{') => {
                    return Err(format!(
                        "a multi-dimensional array has no Avro form (walrelay writes one-dimensional arrays): {}",
                        not_a("one-dimensional", s)
                    ));
                }
                Some(b'"') => {
                    pos += 1;
                    let mut v = Vec::new();
                    loop {
                        match b.get(pos) {
                            Some(b'\\') => {
                                v.push(*b.get(pos + 1).ok_or_else(|| not_a("an array", s))?);
                                pos += 2;
                            }
                            Some(b'"') => {
                                pos += 1;
                                break;
                            }
                            Some(c) => {
                                v.push(*c);
                                pos += 1;
                            }
                            None => return Err(not_a("an array", s)),
                        }
                    }
                    items.push(Some(v.into()));
                }
                Some(_) => {
                    let start = pos;
                    while let Some(&c) = b.get(pos) {
                        if c == delim || c == b'}' {
                            break;
                        }
                        pos += 1;
                    }
                    let raw = &b[start..pos];
                    items.push((!raw.eq_ignore_ascii_case(b"NULL")).then_some(raw.into()));
                }
                None => return Err(not_a("an array", s)),
            }
            match b.get(pos) {
                Some(&c) if c == delim => pos += 1,
                Some(b'}') => {
                    pos += 1;
                    break;
                }
                _ => return Err(not_a("an array", s)),
            }
        }
    }
    if pos != b.len() {
        return Err(not_a("an array", s));
    }
    if !items.is_empty() {
        binary::long(out, items.len() as i64);
        for item in &items {
            match item {
                None => binary::branch(out, 0),
                Some(v) => {
                    binary::branch(out, 1);
                    elem.write(out, v)?;
                }
            }
        }
    }
    binary::long(out, 0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(t: &AvroType, s: &str) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        t.write(&mut out, s.as_bytes()).map(|()| out)
    }

    fn long_of(v: i64) -> Vec<u8> {
        let mut out = Vec::new();
        binary::long(&mut out, v);
        out
    }

    #[test]
    fn types_follow_debezium() {
        assert_eq!(AvroType::of(&Kind::Int, 23, -1), AvroType::Int);
        assert_eq!(AvroType::of(&Kind::Int, 20, -1), AvroType::Long);
        let n102 = typmod_of_name("numeric(10,2)");
        assert_eq!(numeric_typmod(n102), Some((10, 2)));
        assert_eq!(
            AvroType::of(&Kind::Numeric, 1700, n102),
            AvroType::Decimal {
                precision: 10,
                scale: 2
            }
        );
        assert_eq!(
            AvroType::of(&Kind::Numeric, 1700, -1),
            AvroType::VariableDecimal
        );
        // Postgres 15 allows negative scales and scales above the precision: no Avro decimal.
        let neg = ((5 << 16) | (-2_i32 & 0x7ff)) + 4;
        assert_eq!(numeric_typmod(neg), Some((5, -2)));
        assert_eq!(
            AvroType::of(&Kind::Numeric, 1700, neg),
            AvroType::VariableDecimal
        );
        assert_eq!(AvroType::of(&Kind::Text, 2950, -1), AvroType::Uuid);
    }

    #[test]
    fn temporal_values() {
        assert_eq!(enc(&AvroType::Date, "1970-01-02"), Ok(long_of(1)));
        assert_eq!(enc(&AvroType::Date, "1969-12-31"), Ok(long_of(-1)));
        assert_eq!(enc(&AvroType::Date, "2000-03-01"), Ok(long_of(11_017)));
        // 1 BC is astronomical year 0.
        assert_eq!(
            enc(&AvroType::Date, "0001-01-01 BC"),
            Ok(long_of(days_from_civil(0, 1, 1)))
        );
        assert!(enc(&AvroType::Date, "infinity").is_err_and(|e| e.contains("infinity")));
        assert_eq!(
            enc(&AvroType::TimeMicros, "01:02:03.5"),
            Ok(long_of(3_723_500_000))
        );
        let ts = AvroType::Timestamp { zoned: true };
        assert_eq!(
            enc(&ts, "1970-01-01 00:00:01.000001+00"),
            Ok(long_of(1_000_001))
        );
        assert_eq!(enc(&ts, "1970-01-01 02:00:00+02"), Ok(long_of(0)));
        assert_eq!(
            enc(
                &AvroType::Timestamp { zoned: false },
                "2024-01-02 03:04:05.123456"
            ),
            Ok(long_of(1_704_164_645_123_456))
        );
        assert!(enc(&ts, "-infinity").is_err());
        assert_eq!(
            enc(
                &AvroType::Timestamp { zoned: false },
                "0001-01-01 00:00:00 BC"
            ),
            Ok(long_of(days_from_civil(0, 1, 1) * 86_400_000_000))
        );
        assert_eq!(
            enc(&ts, "0044-03-15 12:00:00+00 BC"),
            Ok(long_of(
                days_from_civil(-43, 3, 15) * 86_400_000_000 + 43_200_000_000
            ))
        );
    }

    #[test]
    fn numbers_and_refusals() {
        let d = AvroType::Decimal {
            precision: 5,
            scale: 2,
        };
        assert_eq!(enc(&d, "1.50"), Ok(vec![4, 0x00, 0x96]));
        assert!(enc(&d, "NaN").is_err_and(|e| e.contains("NaN")));
        let v = enc(&AvroType::VariableDecimal, "-0.5").unwrap_or_default();
        assert_eq!(v, vec![2, 2, 0xfb], "scale 1, unscaled -5");
        assert!(enc(&AvroType::Int, "2147483648").is_err());
        assert_eq!(
            enc(&AvroType::Double, "-Infinity"),
            Ok(f64::NEG_INFINITY.to_le_bytes().to_vec())
        );
        assert_eq!(enc(&AvroType::Bytes, "\\x00ff"), Ok(vec![4, 0, 0xff]));
    }

    #[test]
    fn arrays_of_nullable_elements() {
        let ints = AvroType::Array {
            elem: Box::new(AvroType::Int),
            delim: b',',
        };
        assert_eq!(
            enc(&ints, "{1,NULL,3}"),
            Ok(vec![6, 2, 2, 0, 2, 6, 0]),
            "count 3, [1, null, 3], end"
        );
        assert_eq!(enc(&ints, "{}"), Ok(vec![0]));
        assert_eq!(enc(&ints, "[0:1]={5,6}"), Ok(vec![4, 2, 10, 2, 12, 0]));
        assert!(enc(&ints, "{{1,2},{3,4}}").is_err_and(|e| e.contains("multi-dimensional")));
        let texts = AvroType::Array {
            elem: Box::new(AvroType::String(None)),
            delim: b',',
        };
        assert_eq!(
            enc(&texts, r#"{"a,b",NULL}"#),
            Ok(vec![4, 2, 6, b'a', b',', b'b', 0, 0])
        );
        assert!(enc(&texts, "{1,2").is_err());
    }
}
