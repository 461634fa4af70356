//! The frames of the protocol: JSON text, one object per WebSocket message.
//!
//! | direction | frame |
//! |---|---|
//! | server → client | `{"type":"event","topic":T,"partition":P,"offset":O,"event":{…envelope…}}` |
//! | server → client | `{"type":"caught_up"}`, once |
//! | server → client | `{"type":"error","code":C,"message":M}`; a close follows unless `code` is `unknown_offset` or `topic_required` |
//! | client → server | `{"type":"ack","partition":P,"offset":O}` (`"topic":T` too when several topics are read) |
//!
//! An event frame is written around the record's JSON as it is (the envelope is not parsed and
//! printed again): the record's value for a JSON topic, the envelope an Avro record decodes to
//! for an Avro topic.

use serde::Deserialize;

/// Why the gateway sends an error frame: a fixed list (also the `code` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Not a JSON frame of a known type (or binary): closed with 1008.
    Malformed,
    /// An ack for an offset this connection never sent on that partition: not closed.
    UnknownOffset,
    /// An ack without `topic` while several topics are read: not closed.
    TopicRequired,
    /// Too many refused acks in a row: closed with 1008.
    TooManyErrors,
    /// Nothing heard, or no ack while events wait, for `--idle-timeout`: closed with 1008.
    IdleTimeout,
    /// The client did not read what was sent for `--idle-timeout`: closed with 1008.
    SlowClient,
    /// Kafka could not be read (group join, end offsets): closed with 1011.
    Kafka,
    /// The gateway stops: closed with 1001.
    ShuttingDown,
}

impl Code {
    /// Every code, for the metric's series.
    pub const ALL: [Code; 8] = [
        Code::Malformed,
        Code::UnknownOffset,
        Code::TopicRequired,
        Code::TooManyErrors,
        Code::IdleTimeout,
        Code::SlowClient,
        Code::Kafka,
        Code::ShuttingDown,
    ];

    /// Its name in frames and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Malformed => "malformed",
            Code::UnknownOffset => "unknown_offset",
            Code::TopicRequired => "topic_required",
            Code::TooManyErrors => "too_many_errors",
            Code::IdleTimeout => "idle_timeout",
            Code::SlowClient => "slow_client",
            Code::Kafka => "kafka",
            Code::ShuttingDown => "shutting_down",
        }
    }

    /// The close code that follows the frame, `None` when the connection stays open.
    pub fn close(self) -> Option<u16> {
        match self {
            Code::UnknownOffset | Code::TopicRequired => None,
            Code::Malformed | Code::TooManyErrors | Code::IdleTimeout | Code::SlowClient => {
                Some(1008)
            }
            Code::Kafka => Some(1011),
            Code::ShuttingDown => Some(1001),
        }
    }
}

/// `{"type":"event",...}` around `envelope` (a JSON object's text).
pub fn event(topic: &str, partition: i32, offset: i64, envelope: &str) -> String {
    let topic = serde_json::to_string(topic).unwrap_or_else(|_| "\"\"".into());
    let mut s = String::with_capacity(envelope.len() + topic.len() + 80);
    s.push_str(r#"{"type":"event","topic":"#);
    s.push_str(&topic);
    s.push_str(r#","partition":"#);
    s.push_str(&partition.to_string());
    s.push_str(r#","offset":"#);
    s.push_str(&offset.to_string());
    s.push_str(r#","event":"#);
    s.push_str(envelope);
    s.push('}');
    s
}

/// `{"type":"caught_up"}`.
pub const CAUGHT_UP: &str = r#"{"type":"caught_up"}"#;

/// `{"type":"error",...}`.
pub fn error(code: Code, message: &str) -> String {
    serde_json::json!({"type": "error", "code": code.as_str(), "message": message}).to_string()
}

/// A frame from the client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Everything up to `offset` of the partition was handled.
    Ack {
        /// The topic (required when several are read).
        #[serde(default)]
        topic: Option<String>,
        /// The partition.
        partition: i32,
        /// The offset acknowledged, with all before it.
        offset: i64,
    },
}

/// Parses a text frame; the error says what was expected.
pub fn parse(text: &str) -> Result<ClientFrame, String> {
    serde_json::from_str(text).map_err(|e| {
        format!(
            "not a client frame ({e}); send {{\"type\":\"ack\",\"partition\":P,\"offset\":O}} \
             (with \"topic\":T when several topics are read)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_and_write() {
        let f = event("a\"b", 1, 42, r#"{"op":"c"}"#);
        let v: serde_json::Value = serde_json::from_str(&f).expect("json");
        assert_eq!(v["topic"], "a\"b");
        assert_eq!(v["offset"], 42);
        assert_eq!(v["event"]["op"], "c");
        assert_eq!(
            parse(r#"{"type":"ack","partition":2,"offset":7}"#),
            Ok(ClientFrame::Ack {
                topic: None,
                partition: 2,
                offset: 7
            })
        );
        assert!(parse(r#"{"type":"ack","topic":"t","partition":2,"offset":7}"#).is_ok());
        for bad in [
            "nope",
            "{}",
            r#"{"type":"nack","partition":1,"offset":1}"#,
            r#"{"type":"ack","partition":"1","offset":1}"#,
            r#"{"type":"ack","partition":1}"#,
            r#"{"type":"ack","partition":1,"offset":1,"extra":true}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let e: serde_json::Value =
            serde_json::from_str(&error(Code::Malformed, "x")).expect("json");
        assert_eq!(e["code"], "malformed");
    }
}
