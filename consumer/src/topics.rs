//! Which topics a consumer reads: one named topic (`--topic`), or every topic whose whole name
//! matches a regular expression (`--topic-pattern`), as the producer's per-table topics
//! (`<topic>.<schema>.<table>`) need.
//!
//! # Patterns
//!
//! A pattern is a `regex` crate expression matched against **whole** topic names (it is
//! anchored at both ends). walrelay resolves it itself rather than handing it to librdkafka:
//! librdkafka's regex dialect (POSIX, `^`-prefixed subscriptions) is not the one validated
//! here and cannot leave topics out. So the group member lists the cluster's topics every
//! `topic.metadata.refresh.interval.ms` (5 s unless a `--kafka-property` says otherwise),
//! keeps those the pattern [selects](TopicPattern::selects), and subscribes to exactly that
//! list, subscribing again when it changes: a matching topic created later is read within
//! about that long, from its first offset (`auto.offset.reset=earliest`); a deleted one is
//! given up. With cooperative rebalancing a change of the list moves only the partitions of
//! the topics that came or went.
//!
//! Not selected by default, whatever the pattern says: walrelay's side topics (names ending in
//! [`SIDE_TOPIC_SUFFIXES`]: dead letters, exactly-once progress, transaction metadata, schema
//! history), which hold no change events. Recognised by name alone, so a table named
//! `transactions` or `progress` has a per-table topic that looks like one: such a topic is
//! logged as skipped, and `--include-side-topics` reads it, with a pattern written to leave the
//! real side topics out (e.g. `walrelay\.events\.[^.]+\..+`: schema and table after the
//! prefix, where side topics have one name). Kafka's internal topics (`__…`) are never
//! selected. A pattern that would select the consumer's own dead-letter topic is refused at
//! start: rejected events would be read again.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaError;

/// Name endings of walrelay's side topics, which a pattern never selects.
pub const SIDE_TOPIC_SUFFIXES: [&str; 4] =
    [".dlq", ".progress", ".transactions", ".schema-changes"];

/// How often a pattern is resolved again when no `topic.metadata.refresh.interval.ms` is set.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);

/// Why a topic pattern was refused.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    /// Nothing to match.
    #[error("the pattern is empty")]
    Empty,
    /// Not a regular expression the `regex` crate accepts (or too large).
    #[error("{0:?} is not a valid regular expression: {1}")]
    Invalid(String, String),
    /// It selects the dead-letter topic.
    #[error(
        "{pattern:?} matches the dead-letter topic {dead_letter_topic}, so rejected events \
         would be read again: narrow the pattern, or choose a --dead-letter-topic it does not \
         match (a name ending in .dlq never is)"
    )]
    MatchesDeadLetterTopic {
        /// The pattern.
        pattern: String,
        /// The dead-letter topic.
        dead_letter_topic: String,
    },
}

/// Whether `topic`'s name ends like one of walrelay's side topics.
pub fn is_side_topic(topic: &str) -> bool {
    SIDE_TOPIC_SUFFIXES.iter().any(|s| topic.ends_with(s))
}

/// Whether `topic` is one of Kafka's internal topics (`__consumer_offsets`, ...).
pub fn is_internal(topic: &str) -> bool {
    topic.starts_with("__")
}

/// A validated `--topic-pattern`.
#[derive(Clone)]
pub struct TopicPattern {
    text: String,
    whole: regex::Regex,
    /// `--include-side-topics`.
    include_side_topics: bool,
}

impl fmt::Debug for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TopicPattern").field(&self.text).finish()
    }
}

impl TopicPattern {
    /// Compiles `text`, anchored at both ends (a leading `^` or trailing `$` is harmless).
    pub fn new(text: &str) -> Result<Self, PatternError> {
        if text.trim().is_empty() {
            return Err(PatternError::Empty);
        }
        let whole = regex::RegexBuilder::new(&format!("^(?:{text})$"))
            .size_limit(1 << 20)
            .build()
            .map_err(|e| PatternError::Invalid(text.to_string(), e.to_string()))?;
        Ok(Self {
            text: text.to_string(),
            whole,
            include_side_topics: false,
        })
    }

    /// Also selects matching topics named like side topics (`--include-side-topics`).
    pub fn including_side_topics(mut self, include: bool) -> Self {
        self.include_side_topics = include;
        self
    }

    /// The pattern as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `topic` is read: its whole name matches, it is not internal, and it is named
    /// like no side topic unless those are included.
    pub fn selects(&self, topic: &str) -> bool {
        !is_internal(topic)
            && (self.include_side_topics || !is_side_topic(topic))
            && self.whole.is_match(topic)
    }

    /// Whether `topic` matches but is left out for its side-topic name (worth a log line: it
    /// may be a table's topic).
    pub fn skips_as_side_topic(&self, topic: &str) -> bool {
        !self.include_side_topics
            && !is_internal(topic)
            && is_side_topic(topic)
            && self.whole.is_match(topic)
    }

    /// Refuses a pattern that selects `dead_letter_topic`.
    pub fn check_dead_letter_topic(&self, dead_letter_topic: &str) -> Result<(), PatternError> {
        if self.selects(dead_letter_topic) {
            return Err(PatternError::MatchesDeadLetterTopic {
                pattern: self.text.clone(),
                dead_letter_topic: dead_letter_topic.to_string(),
            });
        }
        Ok(())
    }
}

/// The topics a consumer reads.
#[derive(Debug, Clone)]
pub enum Topics {
    /// One topic, `--topic`.
    One(String),
    /// Every topic a pattern selects, `--topic-pattern`.
    Pattern(TopicPattern),
}

impl fmt::Display for Topics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topics::One(t) => f.write_str(t),
            Topics::Pattern(p) => write!(f, "topics matching {:?}", p.as_str()),
        }
    }
}

impl Topics {
    /// Whether `topic` is read.
    pub fn selects(&self, topic: &str) -> bool {
        match self {
            Topics::One(t) => t == topic,
            Topics::Pattern(p) => p.selects(topic),
        }
    }

    /// The topics read as the cluster lists them now, with their partition ids; topics that do
    /// not exist (yet) or have no partitions are left out.
    pub fn partitions<X, C>(
        &self,
        client: &X,
        timeout: Duration,
    ) -> Result<BTreeMap<String, Vec<i32>>, KafkaError>
    where
        X: Consumer<C>,
        C: ConsumerContext,
    {
        let only = match self {
            Topics::One(t) => Some(t.as_str()),
            Topics::Pattern(_) => None,
        };
        let mut all = listed(client, only, timeout)?;
        all.retain(|name, _| self.selects(name));
        Ok(all)
    }
}

/// The topics the cluster lists (`only` one, or all), with their partition ids; topics in
/// error (not there, being deleted) or without partitions are left out.
pub fn listed<X, C>(
    client: &X,
    only: Option<&str>,
    timeout: Duration,
) -> Result<BTreeMap<String, Vec<i32>>, KafkaError>
where
    X: Consumer<C>,
    C: ConsumerContext,
{
    let md = client.fetch_metadata(only, timeout)?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| {
            let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
            ids.sort_unstable();
            (t.name().to_string(), ids)
        })
        .filter(|(_, ids)| !ids.is_empty())
        .collect())
}

/// How often a pattern is resolved again: librdkafka's `topic.metadata.refresh.interval.ms`
/// when the user set it (at least 1 s), else [`DEFAULT_REFRESH`].
pub fn refresh_interval(kafka_properties: &BTreeMap<String, String>) -> Duration {
    kafka_properties
        .get("topic.metadata.refresh.interval.ms")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_REFRESH, |ms| {
            Duration::from_millis(ms).max(Duration::from_secs(1))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> TopicPattern {
        TopicPattern::new(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_pattern_matches_whole_names_only() {
        let p = pattern(r"shop\.public\..*");
        assert!(p.selects("shop.public.orders"));
        assert!(p.selects("shop.public.a"));
        assert!(!p.selects("shop.public"), "nothing after the prefix");
        assert!(
            !p.selects("old.shop.public.orders"),
            "anchored at the start"
        );
        let p = pattern(r"shop\.public\.(orders|items)");
        assert!(p.selects("shop.public.items"));
        assert!(!p.selects("shop.public.items2"), "anchored at the end");
        // Anchors written by the user are harmless.
        let p = pattern(r"^shop\..*$");
        assert!(p.selects("shop.public.x") && !p.selects("xshop.public.x"));
    }

    #[test]
    fn side_and_internal_topics_are_never_selected() {
        let p = pattern(".*");
        for side in [
            "shop.dlq",
            "shop.public.a.dlq",
            "shop.progress",
            "shop.transactions",
            "shop.schema-changes",
            "__consumer_offsets",
            "__transaction_state",
        ] {
            assert!(!p.selects(side), "{side}");
            assert!(is_side_topic(side) || is_internal(side), "{side}");
        }
        assert!(p.skips_as_side_topic("shop.public.transactions"));
        assert!(!p.skips_as_side_topic("__consumer_offsets"));
        // A table named like a side topic: included on request, with a pattern that leaves
        // the real side topics (one name after the prefix) out.
        let p = pattern(r"shop\.[^.]+\..+").including_side_topics(true);
        assert!(p.selects("shop.public.transactions") && p.selects("shop.public.orders"));
        assert!(!p.selects("shop.transactions") && !p.selects("shop.progress"));
        assert!(!p.selects("__consumer_offsets"), "internal topics stay out");
        assert!(!p.skips_as_side_topic("shop.public.transactions"));
        let all = pattern(".*").including_side_topics(true);
        all.check_dead_letter_topic("shop.dlq")
            .expect_err("an included .dlq name is the dead-letter topic");
        assert!(
            p.selects("shop.public.dlqueue"),
            "only the whole suffix counts"
        );
        // A named topic is read as named, side topic or not.
        assert!(Topics::One("shop.progress".into()).selects("shop.progress"));
        assert!(!Topics::One("shop".into()).selects("shop.public.a"));
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        assert!(matches!(TopicPattern::new("  "), Err(PatternError::Empty)));
        for bad in ["shop.(", "[a-", "a{99999999}", r"(?<x>a)(?<x>b)"] {
            let e = TopicPattern::new(bad).expect_err(bad);
            assert!(
                matches!(&e, PatternError::Invalid(t, _) if t == bad),
                "{bad}: {e}"
            );
            assert!(
                e.to_string().contains("not a valid regular expression"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_pattern_selecting_the_dead_letter_topic_is_refused() {
        let p = pattern(r"shop\..*");
        let e = p
            .check_dead_letter_topic("shop.errors")
            .expect_err("matches");
        assert!(
            e.to_string()
                .contains("matches the dead-letter topic shop.errors"),
            "{e}"
        );
        // Side topics are never selected, so a .dlq name never conflicts.
        p.check_dead_letter_topic("shop.dlq")
            .unwrap_or_else(|e| panic!("{e}"));
        p.check_dead_letter_topic("other.errors")
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn the_refresh_follows_the_librdkafka_property() {
        let mut props = BTreeMap::new();
        assert_eq!(refresh_interval(&props), DEFAULT_REFRESH);
        props.insert(
            "topic.metadata.refresh.interval.ms".to_string(),
            "30000".to_string(),
        );
        assert_eq!(refresh_interval(&props), Duration::from_secs(30));
        props.insert(
            "topic.metadata.refresh.interval.ms".to_string(),
            "10".to_string(),
        );
        assert_eq!(refresh_interval(&props), Duration::from_secs(1));
        props.insert(
            "topic.metadata.refresh.interval.ms".to_string(),
            "-1".to_string(),
        );
        assert_eq!(refresh_interval(&props), DEFAULT_REFRESH);
    }
}
