//! The command line: the commands, each with its own options (the shared [`config::Args`] and
//! its sink's), the config file, the validated [`Settings`] of the command given, and running
//! it.
//!
//! | command | sink | options |
//! |---|---|---|
//! | `index` | [`sinks::search`] | shared, [`search::config::Args`] |
//! | `reindex` | [`sinks::search`] | shared, [`search::config::Args`], [`search::config::ReindexArgs`] |
//! | `notify` | [`sinks::webhook`] | shared, [`webhook::config::Args`] |
//! | `replay-dead-letters` | [`sinks::webhook`] | shared, [`webhook::config::Args`] |
//! | `stream` | [`crate::stream`] (a WebSocket gateway, no sink) | shared, [`stream::config::Args`] |
//! | `replicate` | [`sinks::postgres`] | shared, [`postgres::config::Args`] |
//!
//! Options written before the command (`walrelay-consumer --kafka-brokers k index`, the only
//! form before each command had options of its own) are still read: [`command_first`] moves
//! the command in front of them.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};
use walrelay_common::telemetry::{self, Readiness};

use crate::config::{self, ConfigError, ConfigFile, Shared, keys_of};
use crate::metrics::Metrics;
use crate::sinks;
use crate::sinks::postgres::{self, ReplicateSettings};
use crate::sinks::search::reindex::{self, Job, ReindexError};
use crate::sinks::search::{self, ReindexSettings, SearchSettings};
use crate::sinks::webhook::{self, WebhookSettings};
use crate::stream::{self, StreamSettings};

/// `walrelay-consumer`: walrelay's change events from Kafka into sinks.
#[derive(Debug, Parser)]
#[command(name = "walrelay-consumer", version, about)]
pub struct Cli {
    /// TOML file with options (keys are the long flag names with `_` for `-`).
    #[arg(
        long,
        short = 'c',
        env = "WALRELAY_CONFIG",
        global = true,
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The consumer's commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Keep search indexes (one per table, behind an alias) current, until stopped.
    Index(IndexArgs),
    /// Build new versioned indexes from offset zero, swap the aliases when caught up, then
    /// delete the old indexes.
    Reindex(ReindexArgs),
    /// Deliver events to the subscribed webhook endpoints, and serve the subscriptions API.
    Notify(WebhookArgs),
    /// Deliver the webhook dead letters again, each to the subscription its headers name,
    /// then exit.
    ReplayDeadLetters(WebhookArgs),
    /// Serve change events over WebSocket (GET /v1/stream) to clients that acknowledge
    /// them, each connection a member of the Kafka group it names.
    Stream(StreamArgs),
    /// Apply the topic to another Postgres database (rows and schema changes, each record
    /// once), until stopped; `--check` only checks the target.
    Replicate(ReplicateArgs),
}

/// `replicate`'s options.
#[derive(Debug, Clone, Default, clap::Args)]
#[group(skip)]
pub struct ReplicateArgs {
    /// Shared.
    #[command(flatten)]
    pub shared: config::Args,
    /// The Postgres target's.
    #[command(flatten)]
    pub postgres: postgres::config::Args,
}

/// `stream`'s options.
#[derive(Debug, Clone, Default, clap::Args)]
#[group(skip)]
pub struct StreamArgs {
    /// Shared.
    #[command(flatten)]
    pub shared: config::Args,
    /// The gateway's.
    #[command(flatten)]
    pub stream: stream::config::Args,
}

/// `index`'s options.
#[derive(Debug, Clone, Default, clap::Args)]
#[group(skip)]
pub struct IndexArgs {
    /// Shared.
    #[command(flatten)]
    pub shared: config::Args,
    /// The search sink's.
    #[command(flatten)]
    pub search: search::config::Args,
}

/// `reindex`'s options.
#[derive(Debug, Clone, Default, clap::Args)]
#[group(skip)]
pub struct ReindexArgs {
    /// Shared.
    #[command(flatten)]
    pub shared: config::Args,
    /// The search sink's.
    #[command(flatten)]
    pub search: search::config::Args,
    /// The re-index's own.
    #[command(flatten)]
    pub reindex: search::config::ReindexArgs,
}

/// `notify`'s and `replay-dead-letters`' options.
#[derive(Debug, Clone, Default, clap::Args)]
#[group(skip)]
pub struct WebhookArgs {
    /// Shared.
    #[command(flatten)]
    pub shared: config::Args,
    /// The webhook sink's.
    #[command(flatten)]
    pub webhook: webhook::config::Args,
}

/// What a config file holds, by section: every command's keys may be in one file.
#[derive(Debug, Clone, Default)]
pub struct FileOptions {
    shared: config::Args,
    search: search::config::Args,
    reindex: search::config::ReindexArgs,
    webhook: webhook::config::Args,
    stream: stream::config::Args,
    postgres: postgres::config::Args,
}

impl FileOptions {
    /// Every section of `file`; a key no command knows, or a value of the wrong type, is an
    /// error.
    pub fn from_file(file: &ConfigFile) -> Result<Self, ConfigError> {
        file.check_keys(&[
            keys_of::<config::Args>(),
            keys_of::<search::config::Args>(),
            keys_of::<search::config::ReindexArgs>(),
            keys_of::<webhook::config::Args>(),
            keys_of::<stream::config::Args>(),
            keys_of::<postgres::config::Args>(),
        ])?;
        Ok(Self {
            shared: file.section()?,
            search: file.section()?,
            reindex: file.section()?,
            webhook: file.section()?,
            stream: file.section()?,
            postgres: file.section()?,
        })
    }
}

/// The validated settings of the command given.
#[derive(Debug, Clone)]
pub enum Settings {
    /// `index`.
    Index {
        /// Shared.
        shared: Shared,
        /// The search sink.
        search: SearchSettings,
    },
    /// `reindex`.
    Reindex {
        /// Shared.
        shared: Shared,
        /// The search sink.
        search: SearchSettings,
        /// The re-index.
        reindex: ReindexSettings,
    },
    /// `notify`.
    Notify {
        /// Shared.
        shared: Shared,
        /// The webhook sink.
        webhook: WebhookSettings,
    },
    /// `replay-dead-letters`.
    ReplayDeadLetters {
        /// Shared.
        shared: Shared,
        /// The webhook sink.
        webhook: WebhookSettings,
    },
    /// `stream`.
    Stream {
        /// Shared (the group is each connection's).
        shared: Shared,
        /// The gateway.
        stream: StreamSettings,
    },
    /// `replicate`.
    Replicate {
        /// Shared.
        shared: Shared,
        /// The Postgres target.
        postgres: ReplicateSettings,
    },
}

impl Settings {
    /// The shared settings.
    pub fn shared(&self) -> &Shared {
        match self {
            Settings::Index { shared, .. }
            | Settings::Reindex { shared, .. }
            | Settings::Notify { shared, .. }
            | Settings::ReplayDeadLetters { shared, .. }
            | Settings::Stream { shared, .. }
            | Settings::Replicate { shared, .. } => shared,
        }
    }
}

impl Cli {
    /// The command's settings: flags and environment, then the config file, then defaults.
    pub fn settings(self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(path) => FileOptions::from_file(&ConfigFile::read(path)?)?,
            None => FileOptions::default(),
        };
        self.command.settings(file)
    }
}

impl Command {
    /// Layers `file` under the command's options, applies defaults and validates.
    pub fn settings(self, file: FileOptions) -> Result<Settings, ConfigError> {
        match self {
            Command::Index(a) => {
                let shared = a.shared.or(file.shared);
                let search = a.search.or(file.search).settings(shared.retry()?)?;
                Ok(Settings::Index {
                    shared: shared.settings("walrelay-indexer")?,
                    search,
                })
            }
            Command::Reindex(a) => {
                let shared = a.shared.or(file.shared);
                let search = a.search.or(file.search).settings(shared.retry()?)?;
                Ok(Settings::Reindex {
                    shared: shared.settings("walrelay-indexer")?,
                    search,
                    reindex: a.reindex.or(file.reindex).settings(),
                })
            }
            Command::Notify(a) => {
                let shared = a.shared.or(file.shared);
                let webhook = a.webhook.or(file.webhook).settings(shared.retry()?)?;
                Ok(Settings::Notify {
                    shared: shared.settings("walrelay-notifier")?,
                    webhook,
                })
            }
            Command::ReplayDeadLetters(a) => {
                let shared = a.shared.or(file.shared);
                let webhook = a.webhook.or(file.webhook).settings(shared.retry()?)?;
                Ok(Settings::ReplayDeadLetters {
                    shared: shared.settings("walrelay-notifier.replay")?,
                    webhook,
                })
            }
            Command::Stream(a) => {
                let mut shared = a.shared.or(file.shared);
                if shared.group.is_some() {
                    return Err(ConfigError::new(
                        "--group",
                        "stream takes each connection's group from its ?group= (prefixed with \
                         --group-prefix); remove --group (or WALRELAY_GROUP)",
                    ));
                }
                // Per connection: each is a group member with its own prefetch.
                shared.max_queued_bytes.get_or_insert(2 << 20);
                // Never written: the gateway skips what it cannot decode (crate::stream).
                if shared.topic_pattern.is_some() {
                    shared
                        .dead_letter_topic
                        .get_or_insert_with(|| "walrelay.stream.unused.dlq".into());
                }
                let stream = a.stream.or(file.stream).settings()?;
                Ok(Settings::Stream {
                    shared: shared.settings("walrelay-stream")?,
                    stream,
                })
            }
            Command::Replicate(a) => {
                let mut shared = a.shared.or(file.shared);
                // Larger batches: the target's statements for one batch run while the next is
                // staged, so fewer, larger statements keep Postgres busier (README, benchmark).
                shared.batch_max_events.get_or_insert(5000);
                shared.batch_max_bytes.get_or_insert(16 << 20);
                let postgres = a.postgres.or(file.postgres).settings()?;
                Ok(Settings::Replicate {
                    shared: shared.settings("walrelay-replicator")?,
                    postgres,
                })
            }
        }
    }
}

/// `args` with the command moved in front of the options written before it, so that
/// `walrelay-consumer --kafka-brokers k index` reads as `walrelay-consumer index --kafka-brokers
/// k`. Anything it does not recognise (an unknown option, `--help`, a stray value) leaves
/// `args` as they are, for clap to answer.
pub fn command_first(args: Vec<OsString>) -> Vec<OsString> {
    let cli = Cli::command();
    let takes_value = |long: &str| {
        cli.get_arguments()
            .chain(cli.get_subcommands().flat_map(|c| c.get_arguments()))
            .find(|a| a.get_long() == Some(long))
            .map(|a| a.get_action().takes_values())
    };
    let mut i = 1;
    while let Some(arg) = args.get(i).and_then(|a| a.to_str()) {
        if cli.get_subcommands().any(|c| c.get_name() == arg) {
            if i == 1 {
                break;
            }
            let mut moved = args.clone();
            let command = moved.remove(i);
            moved.insert(1, command);
            return moved;
        }
        i += match arg.strip_prefix("--") {
            Some(flag) if flag.contains('=') => 1,
            Some(flag) => match takes_value(flag) {
                Some(true) => 2,
                Some(false) => 1,
                None => break,
            },
            None if arg == "-c" => 2,
            None => break,
        };
    }
    args
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    tracing::error!(error = %e, "Failed.");
    eprintln!("error: {e}");
    ExitCode::from(1)
}

/// Runs the command: the metrics and probe server, then the command until it ends or a
/// signal stops it. Exit codes: 0 success; 1 runtime failure; 3 `reindex` refused because the
/// topic's history was deleted.
pub async fn run(settings: Settings) -> ExitCode {
    let metrics = match Metrics::new() {
        Ok(m) => Arc::new(m),
        Err(e) => return fail(&e),
    };
    let readiness = Readiness::default();
    let conditions: &[&str] = match settings {
        Settings::Index { .. } | Settings::Reindex { .. } => &["kafka", "search"],
        Settings::Notify { .. } | Settings::ReplayDeadLetters { .. } => &["kafka"],
        Settings::Stream { .. } => &["listening"],
        Settings::Replicate { .. } => &["kafka"],
    };
    for condition in conditions {
        readiness.set(condition, false);
    }
    if let Some(addr) = settings.shared().metrics_addr {
        let (registry, readiness) = (metrics.registry.clone(), readiness.clone());
        tokio::spawn(async move {
            if let Err(error) = telemetry::serve(addr, registry, readiness).await {
                tracing::error!(%error, %addr, "Cannot serve metrics.");
            }
        });
    }
    if let Settings::Replicate { shared, postgres } = &settings
        && postgres.check
    {
        let findings = sinks::postgres::command::check(&shared.runtime, postgres).await;
        let failed = findings.iter().any(|f| f.level == "FAIL");
        for f in findings {
            println!("{:<4} {}", f.level, f.message);
        }
        return if failed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        };
    }
    let shutdown = walrelay_common::signal::shutdown_token();
    let ran = match &settings {
        Settings::Index { shared, search } => {
            sinks::search::command::index(&shared.runtime, search, metrics, readiness, shutdown)
                .await
                .map_err(|e| e.to_string())
        }
        Settings::Reindex {
            shared,
            search,
            reindex,
        } => {
            let job = Job {
                runtime: &shared.runtime,
                search,
                reindex,
            };
            match reindex::run(&job, metrics, readiness, shutdown).await {
                Err(e @ ReindexError::HistoryDeleted { .. }) => {
                    tracing::error!(error = %e, "Refusing to re-index.");
                    eprintln!("error: {e}");
                    return ExitCode::from(3);
                }
                other => other.map_err(|e| e.to_string()),
            }
        }
        Settings::Notify { shared, webhook } => {
            webhook::command::notify(&shared.runtime, webhook, metrics, readiness, shutdown)
                .await
                .map_err(|e| e.to_string())
        }
        Settings::Stream { shared, stream } => {
            stream::command::stream(&shared.runtime, stream, metrics, readiness, shutdown)
                .await
                .map_err(|e| e.to_string())
        }
        Settings::Replicate { shared, postgres } => sinks::postgres::command::replicate(
            &shared.runtime,
            postgres,
            metrics,
            readiness,
            shutdown,
        )
        .await
        .map_err(|e| e.to_string()),
        Settings::ReplayDeadLetters { shared, webhook } => {
            match webhook::command::replay(&shared.runtime, webhook, metrics, shutdown).await {
                Ok(n) => {
                    println!("replayed {n} dead letter(s)");
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        }
    };
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::sinks::search::SearchAuth;

    fn index() -> IndexArgs {
        let mut a = IndexArgs::default();
        a.shared.kafka_brokers = Some("127.0.0.1:9092".into());
        a.search.search_url = Some("http://127.0.0.1:9200".into());
        a
    }

    fn notify() -> WebhookArgs {
        let mut a = WebhookArgs::default();
        a.shared.kafka_brokers = Some("127.0.0.1:9092".into());
        a.webhook.postgres_url = Some("postgres://app@db/app".into());
        a.webhook.api_token = Some("0123456789abcdef0123".into());
        a
    }

    fn file(text: &str) -> Result<FileOptions, ConfigError> {
        FileOptions::from_file(&ConfigFile::new(Path::new("walrelay.toml"), text))
    }

    fn settings(command: Command) -> Result<Settings, ConfigError> {
        command.settings(FileOptions::default())
    }

    #[test]
    fn defaults_and_file_layering() {
        let file = file(
            "topic = 'from.file'\ngroup = 'file-group'\nbatch_max_wait = '1s'\nbatch_max_bytes = '3MiB'\n[kafka_properties]\n'fetch.wait.max.ms' = '50'",
        )
        .expect("valid file");
        let mut cli = index();
        cli.shared.group = Some("cli-group".into());
        let Settings::Index { shared, search } = Command::Index(cli).settings(file).expect("valid")
        else {
            panic!("index settings expected");
        };
        assert_eq!(shared.runtime.group, "cli-group");
        assert!(
            matches!(&shared.runtime.topics, crate::topics::Topics::One(t) if t == "from.file"),
            "{:?}",
            shared.runtime.topics
        );
        assert_eq!(shared.runtime.dead_letter_topic, "from.file.dlq");
        assert_eq!(shared.runtime.batch_max_wait, Duration::from_secs(1));
        assert_eq!(shared.runtime.batch_max_bytes, 3 << 20);
        assert_eq!(search.index_template, "{schema}.{table}");
        assert_eq!(search.auth, SearchAuth::None);
    }

    #[test]
    fn one_file_serves_every_command_and_refuses_unknown_keys() {
        let text = "kafka_brokers = 'k:9092'\nsearch_url = 'http://s:9200'\ngrace_period = '5s'\npostgres_url = 'postgres://app@db/app'\napi_token = '0123456789abcdef0123'";
        let group = |c: Command| {
            c.settings(file(text).expect("valid file"))
                .expect("valid")
                .shared()
                .runtime
                .group
                .clone()
        };
        assert_eq!(
            group(Command::Index(IndexArgs::default())),
            "walrelay-indexer"
        );
        assert_eq!(
            group(Command::Notify(WebhookArgs::default())),
            "walrelay-notifier"
        );
        assert_eq!(
            group(Command::ReplayDeadLetters(WebhookArgs::default())),
            "walrelay-notifier.replay"
        );
        for bad in [
            "kafka_brokerz = 'k'",
            "kafka_property = ['a=b']",
            "config = 'x'",
        ] {
            let err = file(bad).expect_err(bad);
            assert_eq!(err.option, "--config", "{err}");
            assert!(err.message.contains("unknown key"), "{err}");
        }
        let err = file("grace_period = 'soon'").expect_err("a bad value of another command");
        assert_eq!(err.option, "--config", "{err}");
    }

    #[test]
    fn each_command_lists_only_its_options() {
        let help = |name: &str| {
            let mut cli = Cli::command();
            cli.build();
            cli.find_subcommand_mut(name)
                .expect("command")
                .render_long_help()
                .to_string()
        };
        let notify = help("notify");
        assert!(notify.contains("--api-token") && notify.contains("--kafka-brokers"));
        assert!(!notify.contains("--search-url") && !notify.contains("--grace-period"));
        let index = help("index");
        assert!(index.contains("--search-url") && index.contains("--kafka-brokers"));
        assert!(!index.contains("--api-token") && !index.contains("--grace-period"));
        assert!(help("reindex").contains("--grace-period"));
    }

    #[test]
    fn options_before_the_command_still_count() {
        let args = |s: &str| s.split(' ').map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            command_first(args(
                "walrelay-consumer --kafka-brokers index --keep-old --grace-period=0s -c f.toml reindex --topic t"
            )),
            args(
                "walrelay-consumer reindex --kafka-brokers index --keep-old --grace-period=0s -c f.toml --topic t"
            )
        );
        for unchanged in [
            "walrelay-consumer index --kafka-brokers k",
            "walrelay-consumer --help index",
            "walrelay-consumer --no-such-option index",
        ] {
            assert_eq!(command_first(args(unchanged)), args(unchanged));
        }
        let cli = Cli::try_parse_from(command_first(args(
            "walrelay-consumer --kafka-brokers k --search-url http://s:9200 --grace-period 0s reindex",
        )))
        .expect("parses");
        let Command::Reindex(a) = cli.command else {
            panic!("reindex expected");
        };
        assert_eq!(a.reindex.grace_period, Some(Duration::ZERO));
    }

    #[test]
    fn bad_values_name_the_option() {
        type Change = Box<dyn Fn(&mut IndexArgs)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|o| o.shared.kafka_brokers = None),
                "--kafka-brokers",
            ),
            (Box::new(|o| o.search.search_url = None), "--search-url"),
            (
                Box::new(|o| o.search.search_url = Some("ftp://x".into())),
                "--search-url",
            ),
            (
                Box::new(|o| o.search.index_template = Some("{schema}".into())),
                "--index-template",
            ),
            (
                Box::new(|o| o.search.search_username = Some("u".into())),
                "--search-username",
            ),
            (
                Box::new(|o| o.shared.batch_max_events = Some(0)),
                "--batch-max-events",
            ),
            (
                Box::new(|o| o.shared.dead_letter_topic = Some("walrelay.events".into())),
                "--dead-letter-topic",
            ),
            (
                Box::new(|o| o.search.search_ca_file = Some("/nonexistent.pem".into())),
                "--search-ca-file",
            ),
        ];
        for (change, option) in cases {
            let mut o = index();
            change(&mut o);
            let err = settings(Command::Index(o)).expect_err(option);
            assert_eq!(err.option, option, "{err}");
        }
    }

    #[test]
    fn one_topic_or_one_pattern_and_a_dead_letter_topic_it_does_not_read() {
        use crate::topics::Topics;
        let parse = |args: &str| {
            let argv = std::iter::once("walrelay-consumer").chain(args.split(' '));
            Cli::try_parse_from(argv)
                .unwrap_or_else(|e| panic!("{e}"))
                .command
                .settings(FileOptions::default())
        };
        // Every command that reads the change topic takes a pattern.
        for command in ["index", "reindex", "notify", "replay-dead-letters"] {
            let args = |extra: &str| {
                let common = if command.ends_with("index") {
                    "--kafka-brokers k:9092 --search-url http://s:9200"
                } else {
                    "--kafka-brokers k:9092 --postgres-url postgres://app@db/app --api-token 0123456789abcdef0123"
                };
                format!("{command} {common} {extra}").trim_end().to_string()
            };
            let s = parse(&args(
                r"--topic-pattern shop\.public\..* --dead-letter-topic shop.dlq",
            ))
            .unwrap_or_else(|e| panic!("{command}: {e}"));
            let runtime = &s.shared().runtime;
            let Topics::Pattern(p) = &runtime.topics else {
                panic!("{command}: a pattern expected, got {:?}", runtime.topics);
            };
            assert!(p.selects("shop.public.orders") && !p.selects("shop.public.orders.dlq"));
            assert_eq!(runtime.dead_letter_topic, "shop.dlq");
            let s = parse(&args("")).unwrap_or_else(|e| panic!("{command}: {e}"));
            assert!(
                matches!(&s.shared().runtime.topics, Topics::One(t) if t == "walrelay.events"),
                "{command}: the default topic"
            );
            let refused = [
                (
                    "--topic shop --topic-pattern shop\\..* --dead-letter-topic x.dlq",
                    "--topic-pattern",
                    "not both",
                ),
                (
                    "--topic-pattern shop\\..*",
                    "--dead-letter-topic",
                    "required with --topic-pattern",
                ),
                (
                    "--topic-pattern shop.( --dead-letter-topic x.dlq",
                    "--topic-pattern",
                    "not a valid regular expression",
                ),
                (
                    "--topic-pattern shop\\..* --dead-letter-topic shop.errors",
                    "--topic-pattern",
                    "matches the dead-letter topic shop.errors",
                ),
                (
                    "--topic-pattern shop\\..* --dead-letter-topic bad/name",
                    "--dead-letter-topic",
                    "topic name",
                ),
            ];
            for (extra, option, says) in refused {
                let err = parse(&args(extra)).expect_err(extra);
                assert_eq!(err.option, option, "{command} {extra}: {err}");
                assert!(err.message.contains(says), "{command} {extra}: {err}");
            }
        }
        // The topic choice is one option across layers: a pattern given on the command line
        // replaces the file's topic, and the file may hold a pattern.
        let file_topic = file("topic = 'from.file'\ndead_letter_topic = 'f.dlq'").expect("file");
        let mut cli = index();
        cli.shared.topic_pattern = Some(r"shop\..*".into());
        let s = Command::Index(cli).settings(file_topic).expect("valid");
        assert!(
            matches!(&s.shared().runtime.topics, Topics::Pattern(p) if p.as_str() == r"shop\..*")
        );
        let file_pattern =
            file("topic_pattern = 'shop\\..*'\ndead_letter_topic = 'f.dlq'").expect("file");
        let s = Command::Index(index())
            .settings(file_pattern.clone())
            .expect("valid");
        assert!(
            matches!(&s.shared().runtime.topics, Topics::Pattern(p) if p.as_str() == r"shop\..*")
        );
        // Side topics: included only on request, and only with a pattern.
        let mut cli = index();
        cli.shared.topic_pattern = Some(r"shop\.[^.]+\..+".into());
        cli.shared.dead_letter_topic = Some("shop.dlq".into());
        cli.shared.include_side_topics = true;
        let s = Command::Index(cli)
            .settings(FileOptions::default())
            .expect("valid");
        assert!(
            matches!(&s.shared().runtime.topics, Topics::Pattern(p) if p.selects("shop.public.transactions") && !p.selects("shop.transactions"))
        );
        let mut cli = index();
        cli.shared.include_side_topics = true;
        let err = settings(Command::Index(cli)).expect_err("without a pattern");
        assert_eq!(err.option, "--include-side-topics", "{err}");
        let mut cli = index();
        cli.shared.topic = Some("cli.topic".into());
        let s = Command::Index(cli).settings(file_pattern).expect("valid");
        assert!(matches!(&s.shared().runtime.topics, Topics::One(t) if t == "cli.topic"));
    }

    #[test]
    fn the_help_says_how_side_topics_are_skipped() {
        let mut cli = Cli::command();
        cli.build();
        for command in ["index", "reindex", "notify", "replay-dead-letters"] {
            let help = cli
                .find_subcommand_mut(command)
                .expect("command")
                .render_long_help()
                .to_string();
            assert!(
                help.contains("--topic-pattern <REGEX>")
                    && help.contains(".schema-changes")
                    && help.contains("skipped"),
                "{command}: {help}"
            );
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let mut o = index();
        o.search.search_username = Some("elastic".into());
        o.search.search_password = Some("s3cret-pass".into());
        let s = settings(Command::Index(o)).expect("valid");
        assert!(!format!("{s:?}").contains("s3cret-pass"));
        let mut o = index();
        o.search.search_api_key = Some("c2VjcmV0LWtleQ==".into());
        let s = settings(Command::Index(o)).expect("valid");
        assert!(!format!("{s:?}").contains("c2VjcmV0LWtleQ=="));
        let mut o = notify();
        o.webhook.postgres_url = Some("postgres://app:pg-s3cret@db/app".into());
        o.webhook.api_token = Some("token-token-token-1234".into());
        let s = settings(Command::Notify(o)).expect("valid");
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("token-token-token-1234") && !debug.contains("pg-s3cret"),
            "{debug}"
        );
    }

    #[test]
    fn stream_takes_its_group_from_the_connection() {
        let parse = |args: &str| {
            let argv = std::iter::once("walrelay-consumer").chain(args.split(' '));
            Cli::try_parse_from(argv)
                .unwrap_or_else(|e| panic!("{e}"))
                .command
                .settings(FileOptions::default())
        };
        let base = "stream --kafka-brokers k:9092 --api-token 0123456789abcdef0123";
        let s = parse(base).expect("valid");
        let Settings::Stream { shared, stream } = &s else {
            panic!("stream settings expected");
        };
        assert_eq!(shared.runtime.max_queued_bytes, 2 << 20, "per connection");
        assert_eq!(stream.max_unacked, 1000);
        let err = parse(&format!("{base} --group g")).expect_err("--group");
        assert_eq!(err.option, "--group", "{err}");
        // A pattern needs no dead-letter topic: the gateway never writes one.
        let s = parse(&format!("{base} --topic-pattern shop\\..*")).expect("valid");
        assert!(matches!(
            &s.shared().runtime.topics,
            crate::topics::Topics::Pattern(_)
        ));
        let err = parse(&format!("{base} --max-unacked 0")).expect_err("--max-unacked");
        assert_eq!(err.option, "--max-unacked", "{err}");
    }

    #[test]
    fn notify_options_are_checked() {
        let s = settings(Command::Notify(notify())).expect("valid");
        assert_eq!(s.shared().runtime.group, "walrelay-notifier");
        assert!(matches!(s, Settings::Notify { .. }), "no search settings");
        type Change = Box<dyn Fn(&mut WebhookArgs)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|o| o.webhook.postgres_url = None),
                "--postgres-url",
            ),
            (Box::new(|o| o.webhook.api_token = None), "--api-token"),
            (
                Box::new(|o| o.webhook.api_token = Some("short".into())),
                "--api-token",
            ),
            (
                Box::new(|o| o.webhook.allow_targets = Some("10.0.0.0/8,no way".into())),
                "--allow-targets",
            ),
            (
                Box::new(|o| o.webhook.max_attempts = Some(0)),
                "--max-attempts",
            ),
            (
                Box::new(|o| o.webhook.max_concurrent_deliveries = Some(0)),
                "--max-concurrent-deliveries",
            ),
            (
                Box::new(|o| o.webhook.api_tls_cert = Some("/etc/api.crt".into())),
                "--api-tls-key",
            ),
            (
                Box::new(|o| o.webhook.api_tls_key = Some("/etc/api.key".into())),
                "--api-tls-cert",
            ),
            (
                Box::new(|o| {
                    o.webhook.api_tls_cert = Some("/nonexistent/api.crt".into());
                    o.webhook.api_tls_key = Some("/nonexistent/api.key".into());
                }),
                "--api-tls-cert",
            ),
            (
                Box::new(|o| o.webhook.max_subscriptions = Some(0)),
                "--max-subscriptions",
            ),
            (
                Box::new(|o| o.webhook.webhook_proxy = Some("socks5://proxy:1080".into())),
                "--webhook-proxy",
            ),
            (
                Box::new(|o| o.webhook.webhook_proxy = Some("proxy:3128".into())),
                "--webhook-proxy",
            ),
        ];
        for (change, option) in cases {
            let mut o = notify();
            change(&mut o);
            let err = settings(Command::Notify(o)).expect_err(option);
            assert_eq!(err.option, option, "{err}");
        }
        let mut o = notify();
        o.webhook.webhook_proxy = Some("http://user:proxy-s3cret@proxy.internal:3128".into());
        let s = settings(Command::Notify(o)).expect("valid proxy");
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("proxy-s3cret") && debug.contains("proxy.internal:3128"),
            "{debug}"
        );
        let Settings::Notify { webhook, .. } = s else {
            panic!("notify settings expected");
        };
        assert_eq!(webhook.max_subscriptions, 1000);
    }
}
