//! Codecs: how a change event is written to a Kafka record and read back.
//!
//! ```text
//!   producer: table shape + row images + metadata ──encode──▶ key, value ──▶ Kafka
//!   consumer: Kafka record value ──decode──▶ Envelope (+ `after` as the codec keeps it) ──▶ sinks
//! ```
//!
//! Two codecs, each with two halves. JSON (Debezium-shaped, [`crate::event`]): the producer's
//! `encode::EnvelopeWriter` writes it straight from Postgres' text cells; [`json::decode`]
//! reads it. Avro (Debezium's Avro layout in the Confluent wire format, the producer's
//! `avro` module): [`avro::Decoder`] reads it, with the writer's schema fetched from the
//! registry by the id in the record. [`is_avro`] tells them apart by the first byte (a JSON
//! envelope starts with `{`, a Confluent record with 0). Sinks see only the decoded
//! [`crate::event::Envelope`], the same whichever codec wrote it.

/// Whether a record value is in the Confluent wire format (else JSON).
pub fn is_avro(value: &[u8]) -> bool {
    value.first() == Some(&0)
}

pub mod avro;

/// Decodes a record value of either codec: a JSON envelope as it is, an Avro record (its
/// schema cached, see [`avro::Decoder::ready`]) with `avro`, also giving the JSON envelope text
/// it equals. An Avro record without a decoder is an error naming the missing option.
pub fn decode(
    value: &[u8],
    avro: Option<&avro::Decoder>,
) -> Result<(json::Decoded, Option<Vec<u8>>), DecodeError> {
    match (is_avro(value), avro) {
        (false, _) => json::decode(value).map(|d| (d, None)),
        (true, Some(d)) => d.decode_to_json(value).map(|(d, text)| (d, Some(text))),
        (true, None) => Err(DecodeError(
            "an Avro record (Confluent wire format): give --schema-registry-url to read it".into(),
        )),
    }
}

/// Why a record is not a walrelay change event (definite: the record is dead-lettered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a walrelay change event: {0}")]
pub struct DecodeError(pub String);

/// The JSON codec's decoder.
pub mod json {
    use serde_json::value::RawValue;

    use super::DecodeError;
    use crate::event::Envelope;

    /// A decoded record: the envelope without `after`, and `after` as the JSON text it arrived
    /// as (always an object).
    #[derive(Debug)]
    pub struct Decoded {
        /// Everything but `after` (which is `None` here).
        pub envelope: Envelope,
        /// The `after` image, unparsed.
        pub after: Option<Box<RawValue>>,
    }

    /// Decodes a record value.
    pub fn decode(value: &[u8]) -> Result<Decoded, DecodeError> {
        let wire: Envelope<Box<RawValue>> =
            serde_json::from_slice(value).map_err(|e| DecodeError(e.to_string()))?;
        if wire
            .after
            .as_ref()
            .is_some_and(|a| !a.get().starts_with('{'))
        {
            return Err(DecodeError("after is not an object".into()));
        }
        let (envelope, after) = wire.split_after();
        Ok(Decoded { envelope, after })
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::event::Op;

        const EVENT: &str = r#"{"op":"u","before":{"id":1},"after":{"id":1,"name":"b"},
            "source":{"version":"0.1.0","connector":"walrelay","db":"app","schema":"public",
            "table":"users","lsn":5,"commit_lsn":6,"txid":7,"ts_ms":8,"snapshot":false,"seq":1},
            "ts_ms":8,"key":["id"],"types":{"id":"integer","name":"text"}}"#;

        #[test]
        fn decodes_with_after_as_text_and_agrees_with_the_map_form() {
            let d = decode(EVENT.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(d.envelope.op, Op::Update);
            assert_eq!(d.envelope.after, None);
            assert_eq!(
                d.after.as_ref().map(|a| a.get()),
                Some(r#"{"id":1,"name":"b"}"#)
            );
            let full = Envelope::from_slice(EVENT.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
            let (rest, after) = full.split_after();
            assert_eq!(rest, d.envelope);
            let text: serde_json::Value = d
                .after
                .map(|a| serde_json::from_str(a.get()).unwrap_or_default())
                .unwrap_or_default();
            assert_eq!(Some(text), after.map(serde_json::Value::Object));
        }

        #[test]
        fn refuses_what_is_not_an_event() {
            for bad in [
                &br#"{"op":"c","after":[1],"source":{},"ts_ms":1}"#[..],
                b"null",
                b"{",
                br#"{"op":"x"}"#,
            ] {
                let e = decode(bad).err();
                assert!(e.is_some(), "{} decoded", String::from_utf8_lossy(bad));
            }
            let e = decode(br#"{"op":"c","before":null,"after":"x","source":{"version":"v","connector":"c","db":"d","schema":"s","table":"t","lsn":1,"commit_lsn":1,"txid":1,"ts_ms":1,"snapshot":false,"seq":1},"ts_ms":1}"#)
                .err()
                .map(|e| e.to_string());
            assert_eq!(
                e.as_deref(),
                Some("not a walrelay change event: after is not an object")
            );
        }
    }
}
