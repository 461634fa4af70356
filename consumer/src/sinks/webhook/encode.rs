//! What the webhook sink sends and records: the stable `webhook-id` of an event, the row
//! (order chain) an event belongs to, and the dead letter of a failed delivery. The body itself
//! is the event exactly as it is in Kafka; [`super::signing`] signs it.

use sha2::{Digest, Sha256};
use walrelay_common::event::{Envelope, Op};

use super::subscriptions::Subscription;
use crate::runtime::Letter;

/// The stable `webhook-id` of an event for a subscription.
pub fn message_id(subscription: &str, record: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(subscription.as_bytes());
    h.update(b"\n");
    h.update(record);
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("msg_{hex}")
}

/// The row an event belongs to (its order chain), or `None` for an event that concerns more
/// than one row: a truncate, a schema event, or an update that changed the row's key (it ends
/// one row's chain and starts another's), which are delivered alone, between phases. (Snapshot
/// markers are never delivered; as table-wide events they have no row either.)
pub fn row_of(env: &Envelope, after: Option<&str>) -> Option<String> {
    if matches!(
        env.op,
        Op::Truncate | Op::Ddl | Op::SnapshotStart | Op::SnapshotEnd
    ) {
        return None;
    }
    let key_of = |image: &serde_json::Map<String, serde_json::Value>| {
        let mut key = format!("{}.{}", env.source.schema, env.source.table);
        for k in &env.key {
            key.push('\u{0}');
            key.push_str(&image.get(k).map(ToString::to_string).unwrap_or_default());
        }
        key
    };
    let after: Option<serde_json::Map<String, serde_json::Value>> =
        after.and_then(|a| serde_json::from_str(a).ok());
    match (env.op, env.before.as_ref(), after.as_ref()) {
        (Op::Delete, Some(before), _) => Some(key_of(before)),
        (Op::Update, Some(before), Some(after)) => {
            let (old, new) = (key_of(before), key_of(after));
            (old == new).then_some(new)
        }
        (_, _, Some(after)) => Some(key_of(after)),
        _ => Some(format!("{}.{}", env.source.schema, env.source.table)),
    }
}

/// The dead letter of an event not sent because its subscription answered 410.
pub fn gone_letter(sub: &Subscription) -> Letter {
    letter(
        sub,
        Some(410),
        "410 Gone: the subscription is disabled".into(),
        "gone",
    )
}

/// A dead letter naming the subscription, its URL (without credentials) and the status.
pub fn letter(
    sub: &Subscription,
    status: Option<u16>,
    message: String,
    reason: &'static str,
) -> Letter {
    Letter {
        reason,
        message,
        headers: vec![
            ("walrelay.dlq.subscription", sub.id.clone()),
            (
                "walrelay.dlq.url",
                walrelay_common::options::without_userinfo(&sub.url),
            ),
            (
                "walrelay.dlq.status",
                status.map_or_else(|| "none".to_string(), |s| s.to_string()),
            ),
        ],
    }
}
