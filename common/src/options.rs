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

/// `url` without the user and password it may carry (`https://user:pw@host/x` →
/// `https://host/x`), for logs, errors, metrics and headers. Text that is not a URL with
/// userinfo is returned as it is.
pub fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// librdkafka properties as given, whose `Debug` output hides the values of secret ones
/// (`sasl.password`, `ssl.key.password`, `ssl.key.pem`, `*.secret`, tokens, JAAS configs).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(BTreeMap<String, String>);

impl KafkaProperties {
    /// A copy of the properties.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0.clone()
    }

    /// Whether the value of property `key` is a secret.
    pub fn is_secret(key: &str) -> bool {
        let k = key.to_ascii_lowercase();
        [
            "password",
            "secret",
            "token",
            "jaas",
            ".pem",
            "key",
            "credential",
        ]
        .iter()
        .any(|w| k.contains(w))
            && !matches!(k.as_str(), "ssl.key.location" | "ssl.keystore.location")
    }
}

impl std::ops::Deref for KafkaProperties {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<'a> IntoIterator for &'a KafkaProperties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl std::fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                (
                    k.as_str(),
                    if Self::is_secret(k) {
                        "***"
                    } else {
                        v.as_str()
                    },
                )
            }))
            .finish()
    }
}

/// The Kafka options of the flags (and environment) over the file's: a `--kafka-property` list
/// given on the command line replaces the file's list; the file's `[kafka_properties]` table is
/// merged key by key, the flags' entries winning. Returns the list and the table.
pub fn merge_kafka_options(
    flags: (Vec<String>, BTreeMap<String, String>),
    file: (Vec<String>, BTreeMap<String, String>),
) -> (Vec<String>, BTreeMap<String, String>) {
    let (flag_list, flag_table) = flags;
    let (file_list, mut table) = file;
    table.extend(flag_table);
    let list = if flag_list.is_empty() {
        file_list
    } else {
        flag_list
    };
    (list, table)
}

/// librdkafka properties: the file's `[kafka_properties]` table overridden by `KEY=VALUE`
/// flags, refused when one would break walrelay's guarantees (see [`unsafe_kafka_property`]).
///
/// They apply to every librdkafka client of the binary (producers, consumers, the dead-letter
/// producer, admin clients), so `security.protocol`, `sasl.*` and `ssl.*` settings reach all of
/// them.
pub fn kafka_properties(
    mut from_file: BTreeMap<String, String>,
    flags: &[String],
) -> Result<KafkaProperties, ConfigError> {
    for p in flags {
        let (k, v) = p
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| {
                ConfigError::new("--kafka-property", format!("{p:?} is not KEY=VALUE"))
            })?;
        from_file.insert(k.trim().to_string(), v.trim().to_string());
    }
    for (k, v) in &from_file {
        if let Some(why) = unsafe_kafka_property(k, v) {
            return Err(ConfigError::new(
                "--kafka-property",
                format!("{k}={v} is refused: {why}"),
            ));
        }
    }
    Ok(KafkaProperties(from_file))
}

/// Why setting librdkafka property `key` to `value` would break a guarantee of walrelay, or
/// would take over what an option of its own controls; `None` when it is allowed.
pub fn unsafe_kafka_property(key: &str, value: &str) -> Option<&'static str> {
    let v = value.trim().to_ascii_lowercase();
    let is = |allowed: &[&str]| allowed.contains(&v.as_str());
    match key.trim() {
        "bootstrap.servers" | "metadata.broker.list" => {
            Some("give the brokers with --kafka-brokers")
        }
        "group.id" => Some("give the consumer group with --group"),
        "acks" | "request.required.acks" if !is(&["all", "-1"]) => Some(
            "an event acknowledged by fewer than all in-sync replicas can be lost with its leader after walrelay confirmed it; acks must stay all",
        ),
        "enable.idempotence" if !is(&["true"]) => Some(
            "without idempotence a retried batch can be written twice or out of order; it must stay true",
        ),
        "enable.auto.offset.store" if !is(&["false"]) => Some(
            "offsets would be stored before the sink applied the events, so a crash would skip them; walrelay stores each offset after its event is applied",
        ),
        "enable.auto.commit" if !is(&["true"]) => Some(
            "walrelay commits the offsets it stored (only applied events) through auto-commit; without it no progress is saved",
        ),
        "auto.offset.reset" if !is(&["earliest", "smallest", "beginning"]) => Some(
            "a new consumer group would start at the end and skip the topic's history (its snapshot); it must stay earliest",
        ),
        "partitioner" | "partitioner_cb" => Some(
            "events of one key would land on another partition than before, breaking per-key order across restarts",
        ),
        "isolation.level" if !is(&["read_committed"]) => Some(
            "a consumer would see records of Kafka transactions that were aborted; it must stay read_committed",
        ),
        "transactional.id" => Some(
            "walrelay sets it under --delivery exactly-once (choose it with --transactional-id)",
        ),
        _ => None,
    }
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
    #[test]
    fn kafka_options_flags_over_file() {
        use std::collections::BTreeMap;

        use super::merge_kafka_options;
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let (list, table) = merge_kafka_options(
            (vec![], map(&[("linger.ms", "1")])),
            (
                vec!["acks=all".into()],
                map(&[("linger.ms", "9"), ("batch.size", "5")]),
            ),
        );
        assert_eq!(list, ["acks=all"], "no flags: the file's list");
        assert_eq!(table, map(&[("batch.size", "5"), ("linger.ms", "1")]));
        let (list, _) = merge_kafka_options(
            (vec!["a=1".into()], BTreeMap::new()),
            (vec!["b=2".into()], BTreeMap::new()),
        );
        assert_eq!(list, ["a=1"], "flags replace the file's list");
    }

    #[test]
    fn userinfo_is_removed_from_urls() {
        assert_eq!(
            super::without_userinfo("https://u:p%40ss@hooks.example.com:8443/x?q=a@b"),
            "https://hooks.example.com:8443/x?q=a@b"
        );
        assert_eq!(
            super::without_userinfo("http://hooks.example.com/a@b"),
            "http://hooks.example.com/a@b"
        );
        assert_eq!(super::without_userinfo("not a url"), "not a url");
    }

    #[test]
    fn unsafe_kafka_properties_are_refused_by_name() {
        let flags = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for bad in [
            "acks=1",
            "enable.idempotence=false",
            "enable.auto.offset.store=true",
            "enable.auto.commit=false",
            "auto.offset.reset=latest",
            "group.id=x",
            "bootstrap.servers=h:1",
            "partitioner=random",
            "isolation.level=read_uncommitted",
        ] {
            let err = super::kafka_properties(BTreeMap::new(), &flags(&[bad]))
                .expect_err(bad)
                .to_string();
            let key = bad.split('=').next().unwrap_or_default();
            assert!(err.contains(key) && err.contains("refused"), "{err}");
        }
        let ok = super::kafka_properties(
            BTreeMap::new(),
            &flags(&[
                "acks=all",
                "security.protocol=SASL_SSL",
                "sasl.mechanisms=SCRAM-SHA-512",
                "enable.idempotence=true",
                "isolation.level=read_committed",
            ]),
        )
        .expect("safe properties");
        assert_eq!(ok.len(), 5);
        let secret = super::kafka_properties(
            BTreeMap::new(),
            &flags(&[
                "sasl.password=hunter2-hunter2",
                "sasl.username=walrelay",
                "ssl.key.pem=-----BEGIN",
            ]),
        )
        .expect("properties");
        let debug = format!("{secret:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("BEGIN") && debug.contains("walrelay"),
            "{debug}"
        );
        let mut file = BTreeMap::new();
        file.insert("acks".to_string(), "0".to_string());
        assert!(
            super::kafka_properties(file, &[]).is_err(),
            "the file is checked too"
        );
    }

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
