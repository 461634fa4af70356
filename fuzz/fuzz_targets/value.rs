//! The value converter (`producer/src/value.rs`, `write`): a Postgres value's text form of a
//! given kind becomes JSON. The first input byte picks the kind (scalar, or an array of a scalar
//! with `,` or `;` between elements), the rest is the text.
//!
//! Properties, beyond "no panic":
//! - `write` only appends: what `out` held before is kept;
//! - the output is one JSON value, except where the converter copies text it trusts Postgres to
//!   have written as JSON: `json`/`jsonb` text, and integer or float text that Postgres never
//!   writes (leading zeros, a leading `+`, `1.e5`). Those are checked separately: valid input gives
//!   valid output, and text is copied only when it has the shape the converter claims;
//! - per kind: booleans are `true` exactly for `t`; text-like kinds give back the same string;
//!   bytea round-trips through base64; temporal kinds give strings; arrays give arrays or,
//!   when the syntax is not understood, the text as a string.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use walrelay_producer::value::{Kind, write};

const SCALARS: [Kind; 13] = [
    Kind::Bool,
    Kind::Int,
    Kind::Float,
    Kind::Numeric,
    Kind::Json,
    Kind::Bytea,
    Kind::Date,
    Kind::Time,
    Kind::Interval,
    Kind::TimeTz,
    Kind::Timestamp,
    Kind::TimestampTz,
    Kind::Text,
];

const PREFIX: &[u8] = b"{\"c\":";

fuzz_target!(|data: &[u8]| {
    let Some((&pick, text)) = data.split_first() else {
        return;
    };
    let scalar = SCALARS[usize::from(pick & 0x0f) % SCALARS.len()].clone();
    let kind = if pick & 0x80 != 0 {
        Kind::Array {
            elem: Box::new(scalar.clone()),
            delim: if pick & 0x40 != 0 { b';' } else { b',' },
        }
    } else {
        scalar.clone()
    };
    let _ = kind.label();

    let mut out = PREFIX.to_vec();
    write(&mut out, &kind, text);
    assert!(out.starts_with(PREFIX), "write changed what out held");
    let json = &out[PREFIX.len()..];
    // Only json text is copied as it is, and Postgres never sends it empty.
    assert!(
        !json.is_empty() || (kind == Kind::Json && text.is_empty()),
        "nothing written"
    );
    let parsed = serde_json::from_slice::<Value>(json);

    let Ok(s) = std::str::from_utf8(text) else {
        // Non-UTF-8 (SQL_ASCII databases): always the lossy text as a string.
        let want = String::from_utf8_lossy(text);
        assert_eq!(as_string(&parsed), Some(want.as_ref()), "non-UTF-8 text");
        return;
    };

    match &kind {
        Kind::Bool => assert_eq!(json, if s == "t" { &b"true"[..] } else { b"false" }),
        Kind::Int => {
            if json == s.as_bytes() {
                let digits = s.strip_prefix('-').unwrap_or(s);
                assert!(
                    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
                    "{s:?} copied as an integer"
                );
                if canonical_numbers(s) {
                    assert!(parsed.is_ok(), "integer {s:?} gave invalid JSON");
                }
            } else {
                assert_eq!(as_string(&parsed), Some(s), "integer fallback");
            }
        }
        Kind::Float => {
            if json == s.as_bytes() {
                assert!(
                    s.parse::<f64>().is_ok_and(f64::is_finite),
                    "{s:?} copied as a finite float"
                );
                if canonical_numbers(s) {
                    assert!(parsed.is_ok(), "float {s:?} gave invalid JSON");
                }
            } else {
                assert_eq!(as_string(&parsed), Some(s), "float fallback");
            }
        }
        Kind::Json => {
            assert_eq!(json, s.as_bytes(), "json text is embedded as it is");
            if serde_json::from_str::<Value>(s).is_ok() {
                assert!(parsed.is_ok());
            }
        }
        Kind::Bytea => {
            let v = parsed.expect("bytea gives a JSON string");
            let got = v.as_str().expect("bytea gives a JSON string");
            match hex_bytea(s) {
                Some(bytes) => {
                    let back = base64::engine::general_purpose::STANDARD
                        .decode(got)
                        .expect("bytea output is base64");
                    assert_eq!(back, bytes, "bytea does not round-trip");
                }
                None => assert_eq!(got, s, "malformed bytea is kept as text"),
            }
        }
        Kind::Numeric | Kind::Date | Kind::Time | Kind::Interval | Kind::Text => {
            assert_eq!(as_string(&parsed), Some(s), "text-like kind");
        }
        Kind::TimeTz | Kind::Timestamp | Kind::TimestampTz => {
            let v = parsed.expect("temporal kinds give JSON");
            let got = v.as_str().expect("temporal kinds give a JSON string");
            let base = got.strip_suffix(":00").filter(|_| got.len() == s.len() + 3);
            let base = base.unwrap_or(got);
            assert_eq!(base.len(), s.len(), "temporal {s:?} became {got:?}");
        }
        Kind::Array { elem, .. } => {
            let trusted = !matches!(**elem, Kind::Json | Kind::Int | Kind::Float)
                || (!matches!(**elem, Kind::Json) && canonical_numbers(s));
            if trusted {
                let v = parsed.unwrap_or_else(|e| panic!("array {s:?} gave invalid JSON: {e}"));
                match v {
                    Value::Array(_) => assert!(
                        s.starts_with('{') || s.starts_with('['),
                        "{s:?} is no array literal"
                    ),
                    Value::String(t) => assert_eq!(t, s, "array fallback"),
                    other => panic!("array {s:?} gave {other}"),
                }
            } else if json.first() == Some(&b'"') {
                assert_eq!(as_string(&parsed), Some(s), "array fallback");
            } else {
                assert_eq!(json.first(), Some(&b'['), "array output");
            }
        }
    }
});

fn as_string(v: &Result<Value, serde_json::Error>) -> Option<&str> {
    v.as_ref().ok().and_then(Value::as_str)
}

fn hex_bytea(s: &str) -> Option<Vec<u8>> {
    let hex = s.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

/// No number in `s` is written in a way Postgres' output functions never use, though Rust's
/// float parser takes it: a leading `+` (other than an exponent's), a redundant leading zero,
/// or a `.` without a digit on either side. Conservative: it looks at every `+`, `0` and `.`.
fn canonical_numbers(s: &str) -> bool {
    let b = s.as_bytes();
    let digit = |i: Option<usize>| i.and_then(|i| b.get(i)).is_some_and(u8::is_ascii_digit);
    (0..b.len()).all(|i| {
        let prev = i.checked_sub(1).map(|p| b[p]);
        match b[i] {
            b'+' => matches!(prev, Some(b'e' | b'E')),
            b'0' => {
                let leading = !matches!(prev, Some(p) if p.is_ascii_digit() || matches!(p, b'.' | b'e' | b'E'));
                !(leading && digit(Some(i + 1)))
            }
            b'.' => digit(i.checked_sub(1)) && digit(Some(i + 1)),
            _ => true,
        }
    })
}
