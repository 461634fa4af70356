//! The consumer's envelope decoding: `walrelay_common::event::Envelope::from_slice` on arbitrary
//! bytes, the consumers' decoder (`walrelay_common::codec::json::decode`: every field decoded,
//! `after` kept as JSON text), and the index alias the search sink derives from a decoded event.
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
use walrelay_common::codec;
use walrelay_common::event::Envelope;
use walrelay_consumer::sinks::search::{alias_name, template_matches};

/// The consumer's default `--index-template`.
const TEMPLATE: &str = "{schema}.{table}";

fuzz_target!(|data: &[u8]| {
    let decoded = codec::json::decode(data);
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

    // The consumers' decoder agrees.
    let decoded = decoded.expect("Envelope decodes but the consumers' decoder does not");
    let (rest, _) = env.clone().split_after();
    assert_eq!(decoded.envelope, rest);
    let after_text = decoded.after.as_deref().map(RawValue::get);
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
