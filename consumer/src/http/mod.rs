//! What every sink that speaks HTTP shares: the SSRF guard for targets users choose
//! ([`guard`]: webhook endpoints today, the coming stream and websocket targets next) and the
//! reading of `Retry-After`.
//!
//! Retrying itself is the shared policy in `walrelay_common::retry`; a sink only classifies an
//! answer (transient, with an optional `Retry-After`, or definite).

pub mod guard;

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};

/// The longest `Retry-After` taken as given: a server asking for more is retried at this
/// interval instead, so a hostile or confused peer cannot park a sink for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The `Retry-After` of an answer, in delta-seconds (the form throttling servers send), capped
/// at [`MAX_RETRY_AFTER`]; `None` when absent or not a number of seconds.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn seconds_are_read_and_capped_other_forms_ignored() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static(" 7 "));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("86400"));
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }
}
