//! The consumer's envelope decoding: `walrelay_common::event::Envelope::from_slice` on arbitrary
//! bytes, the consumer runtime's view of a record (every field decoded, `after` kept as JSON
//! text; `consumer/src/runtime/mod.rs` keeps that decoder private, so `Wire` below copies its
//! shape), and the index alias the search sink derives from a decoded event.
//!
//! Properties, beyond "no panic":
//! - a decoded envelope serializes, and that decodes to an equal envelope and serializes to the
//!   same bytes (the JSON text of `types` and `column_ids` is kept as it came);
//! - whatever `Envelope::from_slice` accepts, the runtime's view accepts too, with equal fields
//!   and an `after` text that parses to the same row;
//! - the alias of the default index template is a valid index name that `template_matches`
//!   recognises (re-index counts only the aliases it recognises). Not asserted when
//!   `alias_name` stripped leading `_`, `-` or `+` (a schema named `_`): such an alias is not
//!   recognised, a known limitation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use walrelay_common::event::{ColumnIds, ColumnTypes, Envelope, Op, SchemaChange, Source};
use walrelay_consumer::sinks::search::{alias_name, template_matches};

/// The consumer's default `--index-template`.
const TEMPLATE: &str = "{schema}.{table}";

/// The consumer runtime's decoding target: the envelope with `after` as JSON text.
#[derive(serde::Deserialize)]
struct Wire {
    op: Op,
    before: Option<Map<String, Value>>,
    after: Option<Box<RawValue>>,
    source: Source,
    ts_ms: i64,
    #[serde(default)]
    unchanged_toast: Vec<String>,
    #[serde(default)]
    key: Vec<String>,
    #[serde(default)]
    types: ColumnTypes,
    #[serde(default)]
    schema_version: u64,
    #[serde(default)]
    column_ids: ColumnIds,
    #[serde(default)]
    ddl: Option<SchemaChange>,
}

fuzz_target!(|data: &[u8]| {
    let wire = serde_json::from_slice::<Wire>(data);
    let Ok(env) = Envelope::from_slice(data) else {
        return;
    };

    // Round trip.
    let bytes = serde_json::to_vec(&env).expect("a decoded envelope serializes");
    let again = Envelope::from_slice(&bytes).expect("a serialized envelope decodes");
    assert_eq!(again, env, "envelope changed through a round trip");
    let bytes2 = serde_json::to_vec(&again).expect("serializes");
    assert_eq!(bytes, bytes2, "serialization is not stable");
    let _ = env.types.parse();
    let _ = env.column_ids.parse();

    // The runtime's view agrees.
    let wire = wire.expect("Envelope decodes but the runtime's view does not");
    assert_eq!(wire.op, env.op);
    assert_eq!(wire.before, env.before);
    assert_eq!(wire.source, env.source);
    assert_eq!(wire.ts_ms, env.ts_ms);
    assert_eq!(wire.unchanged_toast, env.unchanged_toast);
    assert_eq!(wire.key, env.key);
    assert_eq!(wire.types, env.types);
    assert_eq!(wire.schema_version, env.schema_version);
    assert_eq!(wire.column_ids, env.column_ids);
    assert_eq!(wire.ddl, env.ddl);
    let after_text = wire.after.as_deref().map(RawValue::get);
    match (&env.after, after_text) {
        (None, None) => {}
        (Some(map), Some(text)) => {
            assert!(
                text.starts_with('{'),
                "after decoded as a map from {text:?}"
            );
            let back: Map<String, Value> =
                serde_json::from_str(text).expect("after text parses as a map");
            assert_eq!(&back, map, "after text and after map differ");
        }
        (a, b) => panic!("after: map {a:?} vs text {b:?}"),
    }

    // What the search sink derives: the alias of the default template is a valid index name
    // and one the template is recognised in (re-index counts only those).
    if let Ok(alias) = alias_name(TEMPLATE, &env) {
        assert!(!alias.is_empty() && alias.len() <= 240, "alias {alias:?}");
        assert!(!alias.starts_with(['_', '-', '+']), "alias {alias:?}");
        assert!(
            !alias.contains(['\\', '/', '*', '?', '"', '<', '>', '|', ' ', ',', '#', ':']),
            "alias {alias:?}"
        );
        assert!(alias != "." && alias != "..", "alias {alias:?}");
        // Unless leading characters were stripped (a schema such as `_`: known, see the header).
        let unstripped = !env.source.schema.is_empty()
            && !env.source.table.is_empty()
            && alias_name("x{schema}.{table}", &env).is_ok_and(|x| x == format!("x{alias}"));
        if unstripped {
            assert!(
                template_matches(TEMPLATE, &alias),
                "alias {alias:?} of {:?}.{:?} not recognised as the template's",
                env.source.schema,
                env.source.table
            );
        }
    }
});
