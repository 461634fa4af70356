//! Standard Webhooks signatures.
//!
//! Every delivery carries `webhook-id` (stable across re-deliveries of the same event),
//! `webhook-timestamp` (seconds since the epoch, fresh per attempt) and `webhook-signature`:
//! `v1,` + base64 of HMAC-SHA256 over `"{id}.{timestamp}.{body}"`, keyed with the bytes the
//! subscription's secret encodes in base64 after its `whsec_` prefix.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// The prefix of a signing secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A validated signing secret: its key bytes.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    /// Parses `whsec_<base64>` (24 to 64 key bytes, as the specification recommends).
    pub fn parse(text: &str) -> Result<Self, String> {
        let b64 = text.strip_prefix(SECRET_PREFIX).ok_or_else(|| {
            format!(
                "must start with {SECRET_PREFIX} followed by base64 (omit it to have one generated)"
            )
        })?;
        let key = STANDARD
            .decode(b64)
            .map_err(|e| format!("the part after {SECRET_PREFIX} is not base64: {e}"))?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "the key is {} bytes; use 24 to 64 random bytes",
                key.len()
            ));
        }
        Ok(Self(key))
    }

    /// A new random 32-byte secret, as text.
    pub fn generate() -> String {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
    }

    /// The `webhook-signature` value for one attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            unreachable!("HMAC takes keys of any length")
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector published with the Standard Webhooks reference implementations.
    #[test]
    fn reproduces_the_specification_test_vector() {
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid");
        assert_eq!(
            s.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_are_validated_and_generated() {
        assert!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(Secret::parse("whsec_!!!").is_err());
        assert!(Secret::parse("whsec_c2hvcnQ=").is_err(), "too short");
        let g = Secret::generate();
        assert!(Secret::parse(&g).is_ok(), "{g}");
        assert_ne!(g, Secret::generate());
    }
}
