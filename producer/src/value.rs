//! Postgres values in text format become JSON, the same way for snapshot rows (COPY) and
//! streamed rows (pgoutput), so a row reads the same whichever path delivered it.
//!
//! Both paths run with `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601`,
//! `bytea_output=hex` and `extra_float_digits=3` (see [`SESSION_OPTIONS`]), so the text forms
//! below are the only ones that reach this module.
//!
//! | Postgres | JSON |
//! |---|---|
//! | int2, int4, int8, oid | number, exact (the digits are copied, never through f64) |
//! | numeric | string, exact (`"NaN"` too) |
//! | float4, float8 | number; `"NaN"`, `"Infinity"`, `"-Infinity"` as strings |
//! | bool | `true` / `false` |
//! | json, jsonb | embedded JSON |
//! | bytea | base64 string |
//! | date, time, timetz, timestamp, timestamptz, interval | ISO 8601 strings (`timestamptz` in UTC with `+00:00`); `infinity` and BC dates keep Postgres' text |
//! | arrays (any dimension, with NULLs) | JSON arrays of the element conversion |
//! | domains | as their base type |
//! | enums, uuid, text types and everything else | string (the type's text form) |

use base64::Engine;
use walrelay_common::event::write_json_str;

/// Session settings both the replication and the snapshot connections use.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 \
     -c bytea_output=hex -c extra_float_digits=3 -c idle_in_transaction_session_timeout=0";

/// How a column's text form becomes JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Boolean.
    Bool,
    /// Integer types: digits copied as a JSON number.
    Int,
    /// float4/float8.
    Float,
    /// numeric: exact string.
    Numeric,
    /// json/jsonb: embedded.
    Json,
    /// bytea: base64.
    Bytea,
    /// date: text as is.
    Date,
    /// time without zone: text as is.
    Time,
    /// interval (ISO 8601): text as is.
    Interval,
    /// timetz.
    TimeTz,
    /// timestamp without zone.
    Timestamp,
    /// timestamptz.
    TimestampTz,
    /// Everything else: a JSON string of the text form.
    Text,
    /// An array of `elem`, elements separated by `delim`.
    Array {
        /// Element kind.
        elem: Box<Kind>,
        /// Element delimiter (`,` for all but a few geometric types).
        delim: u8,
    },
}

impl Kind {
    /// The kind of a built-in scalar type, or `None` when the catalog must be asked.
    pub fn builtin(oid: u32) -> Option<Kind> {
        Some(match oid {
            16 => Kind::Bool,
            20 | 21 | 23 | 26 => Kind::Int,
            700 | 701 => Kind::Float,
            1700 => Kind::Numeric,
            114 | 3802 => Kind::Json,
            17 => Kind::Bytea,
            1082 => Kind::Date,
            1083 => Kind::Time,
            1186 => Kind::Interval,
            1266 => Kind::TimeTz,
            1114 => Kind::Timestamp,
            1184 => Kind::TimestampTz,
            25 | 1043 | 1042 | 19 | 18 | 2950 => Kind::Text,
            _ => return None,
        })
    }

    /// The column type as the envelope's `types` names it (what consumers derive index
    /// mappings from): `boolean`, `integer`, `float`, `numeric`, `json`, `bytea`, `date`,
    /// `time`, `interval`, `timetz`, `timestamp`, `timestamptz`, `text`, or an element type
    /// followed by `[]`.
    pub fn label(&self) -> String {
        let base = match self {
            Kind::Bool => "boolean",
            Kind::Int => "integer",
            Kind::Float => "float",
            Kind::Numeric => "numeric",
            Kind::Json => "json",
            Kind::Bytea => "bytea",
            Kind::Date => "date",
            Kind::Time => "time",
            Kind::Interval => "interval",
            Kind::TimeTz => "timetz",
            Kind::Timestamp => "timestamp",
            Kind::TimestampTz => "timestamptz",
            Kind::Text => "text",
            Kind::Array { elem, .. } => return format!("{}[]", elem.label()),
        };
        base.to_string()
    }
}

/// Appends the JSON form of `text` (a value of kind `kind`) to `out`.
pub fn write(out: &mut Vec<u8>, kind: &Kind, text: &[u8]) {
    // Only a SQL_ASCII database can send bytes that are not UTF-8: keep them, replacing what
    // cannot be represented.
    let Ok(s) = std::str::from_utf8(text) else {
        return write_json_str(out, &String::from_utf8_lossy(text));
    };
    match kind {
        Kind::Bool => out.extend_from_slice(if s == "t" { b"true" } else { b"false" }),
        Kind::Int if is_integer(s) => out.extend_from_slice(s.as_bytes()),
        Kind::Float if is_json_number(s) => out.extend_from_slice(s.as_bytes()),
        Kind::Json => out.extend_from_slice(s.as_bytes()),
        Kind::Bytea => match decode_hex_bytea(s) {
            Some(bytes) => {
                out.push(b'"');
                let mut b64 = String::new();
                base64::engine::general_purpose::STANDARD.encode_string(&bytes, &mut b64);
                out.extend_from_slice(b64.as_bytes());
                out.push(b'"');
            }
            None => write_json_str(out, s),
        },
        Kind::Timestamp => write_timestamp(out, s, false),
        Kind::TimestampTz => write_timestamp(out, s, true),
        Kind::TimeTz => {
            let mut t = s.to_string();
            pad_offset(&mut t);
            write_json_str(out, &t);
        }
        Kind::Array { elem, delim } => {
            let mut p = ArrayParser {
                s: s.as_bytes(),
                pos: 0,
                delim: *delim,
            };
            let mark = out.len();
            if p.write(out, elem).is_none() {
                // Not the array syntax we know: keep the text rather than lose it.
                out.truncate(mark);
                write_json_str(out, s);
            }
        }
        Kind::Int
        | Kind::Float
        | Kind::Numeric
        | Kind::Date
        | Kind::Time
        | Kind::Interval
        | Kind::Text => write_json_str(out, s),
    }
}

fn is_integer(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Float text that is also a JSON number (so not NaN or Infinity).
fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E'))
        && s.parse::<f64>().is_ok_and(f64::is_finite)
        && !s.starts_with('.')
        && !s.starts_with("-.")
        && !s.contains(".e")
        && !s.ends_with('.')
}

/// The bytes of bytea's hex text form (`\\x…`), or `None` when it is not that form.
pub(crate) fn decode_hex_bytea(s: &str) -> Option<Vec<u8>> {
    let hex = s.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// `2024-01-02 03:04:05.5+00` → `2024-01-02T03:04:05.5+00:00`. Infinity and BC values keep
/// Postgres' text.
fn write_timestamp(out: &mut Vec<u8>, s: &str, with_zone: bool) {
    let b = s.as_bytes();
    let iso_like = b.len() >= 19 && b[10] == b' ' && b[..4].iter().all(u8::is_ascii_digit);
    if !iso_like || s.ends_with(" BC") {
        return write_json_str(out, s);
    }
    let mut t = String::with_capacity(s.len() + 3);
    t.push_str(&s[..10]);
    t.push('T');
    t.push_str(&s[11..]);
    if with_zone {
        pad_offset(&mut t);
    }
    write_json_str(out, &t);
}

/// Makes a trailing `+HH` offset `+HH:MM`.
fn pad_offset(t: &mut String) {
    if let Some(pos) = t.rfind(['+', '-']) {
        let off = &t[pos + 1..];
        if pos >= 8 && off.len() == 2 && off.bytes().all(|c| c.is_ascii_digit()) {
            t.push_str(":00");
        }
    }
}

struct ArrayParser<'a> {
    s: &'a [u8],
    pos: usize,
    delim: u8,
}

impl ArrayParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn write(&mut self, out: &mut Vec<u8>, elem: &Kind) -> Option<()> {
        // Explicit bounds such as `[0:1]={1,2}`.
        if self.peek() == Some(b'[') {
            let eq = self.s.iter().position(|c| *c == b'=')?;
            self.pos = eq + 1;
        }
        self.level(out, elem)?;
        (self.pos == self.s.len()).then_some(())
    }

    fn level(&mut self, out: &mut Vec<u8>, elem: &Kind) -> Option<()> {
        if self.peek()? != b'{' {
            return None;
        }
        self.pos += 1;
        out.push(b'[');
        if self.peek()? == b'}' {
            self.pos += 1;
            out.push(b']');
            return Some(());
        }
        loop {
            match self.peek()? {
                b'{' => self.level(out, elem)?,
                b'"' => {
                    self.pos += 1;
                    let mut v = Vec::new();
                    loop {
                        match self.peek()? {
                            b'\\' => {
                                v.push(*self.s.get(self.pos + 1)?);
                                self.pos += 2;
                            }
                            b'"' => {
                                self.pos += 1;
                                break;
                            }
                            c => {
                                v.push(c);
                                self.pos += 1;
                            }
                        }
                    }
                    write(out, elem, &v);
                }
                _ => {
                    let start = self.pos;
                    while let Some(c) = self.peek() {
                        if c == self.delim || c == b'}' {
                            break;
                        }
                        self.pos += 1;
                    }
                    let raw = &self.s[start..self.pos];
                    if raw.eq_ignore_ascii_case(b"NULL") {
                        out.extend_from_slice(b"null");
                    } else {
                        write(out, elem, raw);
                    }
                }
            }
            match self.peek()? {
                c if c == self.delim => {
                    self.pos += 1;
                    out.push(b',');
                }
                b'}' => {
                    self.pos += 1;
                    out.push(b']');
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(kind: &Kind, text: &str) -> String {
        let mut out = Vec::new();
        write(&mut out, kind, text.as_bytes());
        let s = String::from_utf8(out).expect("utf8");
        serde_json::from_str::<serde_json::Value>(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
        s
    }

    #[test]
    fn scalars() {
        assert_eq!(
            json(&Kind::Int, "9223372036854775807"),
            "9223372036854775807"
        );
        assert_eq!(json(&Kind::Int, "-32768"), "-32768");
        assert_eq!(
            json(&Kind::Numeric, "12345678901234567890.000000001"),
            "\"12345678901234567890.000000001\""
        );
        assert_eq!(json(&Kind::Float, "1.5e-07"), "1.5e-07");
        assert_eq!(json(&Kind::Float, "1e+30"), "1e+30");
        assert_eq!(json(&Kind::Float, "NaN"), "\"NaN\"");
        assert_eq!(json(&Kind::Float, "-Infinity"), "\"-Infinity\"");
        assert_eq!(json(&Kind::Bool, "t"), "true");
        assert_eq!(json(&Kind::Bool, "f"), "false");
        assert_eq!(
            json(&Kind::Json, r#"{"a": [1, 2.50]}"#),
            r#"{"a": [1, 2.50]}"#
        );
        assert_eq!(json(&Kind::Bytea, "\\xdeadbeef"), "\"3q2+7w==\"");
        assert_eq!(json(&Kind::Text, "a\"b\n"), "\"a\\\"b\\n\"");
    }

    #[test]
    fn temporal() {
        assert_eq!(
            json(&Kind::TimestampTz, "2024-01-02 03:04:05.123456+00"),
            "\"2024-01-02T03:04:05.123456+00:00\""
        );
        assert_eq!(
            json(&Kind::Timestamp, "2024-01-02 03:04:05"),
            "\"2024-01-02T03:04:05\""
        );
        assert_eq!(json(&Kind::TimestampTz, "infinity"), "\"infinity\"");
        assert_eq!(
            json(&Kind::Timestamp, "0044-03-15 12:00:00 BC"),
            "\"0044-03-15 12:00:00 BC\""
        );
        assert_eq!(json(&Kind::TimeTz, "03:04:05+02"), "\"03:04:05+02:00\"");
        assert_eq!(json(&Kind::TimeTz, "03:04:05+05:30"), "\"03:04:05+05:30\"");
        assert_eq!(
            json(&Kind::Interval, "P1Y2M3DT4H5M6S"),
            "\"P1Y2M3DT4H5M6S\""
        );
    }

    #[test]
    fn arrays() {
        let ints = Kind::Array {
            elem: Box::new(Kind::Int),
            delim: b',',
        };
        assert_eq!(json(&ints, "{1,NULL,3}"), "[1,null,3]");
        assert_eq!(json(&ints, "{{1,2},{3,4}}"), "[[1,2],[3,4]]");
        assert_eq!(json(&ints, "{}"), "[]");
        assert_eq!(json(&ints, "[0:1]={5,6}"), "[5,6]");
        let texts = Kind::Array {
            elem: Box::new(Kind::Text),
            delim: b',',
        };
        assert_eq!(
            json(&texts, r#"{"a,b","NULL",NULL,"q\"x\\y",plain}"#),
            r#"["a,b","NULL",null,"q\"x\\y","plain"]"#
        );
        let boxes = Kind::Array {
            elem: Box::new(Kind::Text),
            delim: b';',
        };
        assert_eq!(
            json(&boxes, "{(1,1),(0,0);(2,2),(1,1)}"),
            r#"["(1,1),(0,0)","(2,2),(1,1)"]"#
        );
        assert_eq!(
            json(&ints, "{1,2"),
            "\"{1,2\"",
            "malformed text is kept, not dropped"
        );
    }
}
