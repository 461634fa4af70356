//! What every walrelay binary's options have in common: the error that names a bad option,
//! sizes (`64MiB`) and durations (`30s`) as people write them, the TOML file, librdkafka
//! pass-through properties and Kafka topic names.
//!
//! Precedence is the same everywhere: flags, then `WALRELAY_*` environment variables (clap reads
//! both), then the config file, then defaults.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A bad option. Binaries exit with code 2 on it.
#[derive(Debug, thiserror::Error)]
#[error("invalid {option}: {message}")]
pub struct ConfigError {
    /// The option, as a flag.
    pub option: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ConfigError {
    /// An error about `option`.
    pub fn new(option: &str, message: impl Into<String>) -> Self {
        Self {
            option: option.to_string(),
            message: message.into(),
        }
    }

    /// A required option that was not given anywhere.
    pub fn missing(option: &str) -> Self {
        let bare = option.trim_start_matches('-');
        Self::new(
            option,
            format!(
                "missing: give {option}, WALRELAY_{} or {} in the config file",
                bare.replace('-', "_").to_ascii_uppercase(),
                bare.replace('-', "_")
            ),
        )
    }
}

/// Parses `64MiB`, `10MB`, `512KiB` or a plain number of bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (n, unit) =
        split_number(s).ok_or_else(|| format!("{s:?} is not a size such as 64MiB or 1048576"))?;
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use KiB, MiB or GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses `250ms`, `30s`, `5m`, `2h` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = split_number(s)
        .ok_or_else(|| format!("{s:?} is not a duration such as 500ms, 30s or 5m"))?;
    let ms: u64 = match unit.as_str() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

fn split_number(s: &str) -> Option<(u64, String)> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    Some((num.parse().ok()?, unit.trim().to_ascii_lowercase()))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    N(u64),
    S(String),
}

/// Serde helper for an optional size written as a number of bytes or as `64MiB`.
pub fn deserialize_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<NumberOrText>::deserialize(d)? {
        None => Ok(None),
        Some(NumberOrText::N(n)) => Ok(Some(n)),
        Some(NumberOrText::S(s)) => parse_bytes(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

/// Serde helper for an optional duration written as seconds or as `30s`.
pub fn deserialize_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    match Option::<NumberOrText>::deserialize(d)? {
        None => Ok(None),
        Some(NumberOrText::N(n)) => Ok(Some(Duration::from_secs(n))),
        Some(NumberOrText::S(s)) => parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// Reads a TOML config file into `T`.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    toml::from_str(&text).map_err(|e| {
        ConfigError::new(
            "--config",
            format!(
                "{}: {} (keys are the long option names with _ for -, e.g. kafka_brokers)",
                path.display(),
                e.message()
            ),
        )
    })
}

/// librdkafka properties: the file's `[kafka_properties]` table overridden by `KEY=VALUE`
/// flags.
pub fn kafka_properties(
    mut from_file: BTreeMap<String, String>,
    flags: &[String],
) -> Result<BTreeMap<String, String>, ConfigError> {
    for p in flags {
        let (k, v) = p
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| {
                ConfigError::new("--kafka-property", format!("{p:?} is not KEY=VALUE"))
            })?;
        from_file.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(from_file)
}

/// Checks a Kafka topic name given as `option`.
pub fn check_topic(option: &str, topic: &str) -> Result<(), ConfigError> {
    let ok = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            option,
            format!("{topic:?}: a Kafka topic name is 1-249 of [A-Za-z0-9._-]"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("10MB"), Ok(10_000_000));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("12 parsecs").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 fortnights").is_err());
    }

    #[test]
    fn properties_and_topics() {
        let file = BTreeMap::from([("linger.ms".to_string(), "5".to_string())]);
        let p =
            kafka_properties(file, &["linger.ms = 9".into(), "acks=all".into()]).expect("valid");
        assert_eq!(p.get("linger.ms").map(String::as_str), Some("9"));
        assert_eq!(p.get("acks").map(String::as_str), Some("all"));
        assert!(kafka_properties(BTreeMap::new(), &["nope".into()]).is_err());
        assert!(check_topic("--topic", "walrelay.events").is_ok());
        assert!(check_topic("--topic", "bad topic").is_err());
        assert_eq!(
            ConfigError::missing("--kafka-brokers").message,
            "missing: give --kafka-brokers, WALRELAY_KAFKA_BROKERS or kafka_brokers in the config file"
        );
    }
}
