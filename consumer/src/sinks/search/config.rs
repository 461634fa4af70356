//! The search sink's options and their validated settings: [`Args`] (`index` and `reindex`)
//! and [`ReindexArgs`] (`reindex` only).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use walrelay_common::options::{self, ConfigError, parse_duration};

use crate::config::Retry;

/// The search sink's options, each unset unless given.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[group(skip)]
#[command(next_help_heading = "Search")]
pub struct Args {
    /// Elasticsearch or OpenSearch base URL, e.g. https://search:9200.
    #[arg(long, env = "WALRELAY_SEARCH_URL", value_name = "URL")]
    pub search_url: Option<String>,
    /// User for basic authentication.
    #[arg(long, env = "WALRELAY_SEARCH_USERNAME")]
    pub search_username: Option<String>,
    /// Password for basic authentication.
    #[arg(long, env = "WALRELAY_SEARCH_PASSWORD")]
    pub search_password: Option<String>,
    /// Elasticsearch API key (the base64 `id:key` form), instead of basic authentication.
    #[arg(long, env = "WALRELAY_SEARCH_API_KEY")]
    pub search_api_key: Option<String>,
    /// PEM file of a CA to trust for https (besides the bundled web roots).
    #[arg(long, env = "WALRELAY_SEARCH_CA_FILE", value_name = "FILE")]
    pub search_ca_file: Option<PathBuf>,
    /// Alias name per table; `{db}`, `{schema}` and `{table}` are replaced, the result is
    /// lowercased [default: {schema}.{table}].
    #[arg(long, env = "WALRELAY_INDEX_TEMPLATE")]
    pub index_template: Option<String>,
    /// What a dropped table does to its index: `delete` it, or `keep` it [default: delete].
    #[arg(long, env = "WALRELAY_ON_DROP_TABLE", value_enum)]
    pub on_drop_table: Option<OnDropTable>,
}

impl Args {
    /// `self` where set, else `file`.
    pub fn or(self, file: Args) -> Args {
        Args {
            search_url: self.search_url.or(file.search_url),
            search_username: self.search_username.or(file.search_username),
            search_password: self.search_password.or(file.search_password),
            search_api_key: self.search_api_key.or(file.search_api_key),
            search_ca_file: self.search_ca_file.or(file.search_ca_file),
            index_template: self.index_template.or(file.index_template),
            on_drop_table: self.on_drop_table.or(file.on_drop_table),
        }
    }

    /// Applies defaults and validates (`retry`: the shared backoffs).
    pub fn settings(self, retry: Retry) -> Result<SearchSettings, ConfigError> {
        let o = self;
        let url = o
            .search_url
            .clone()
            .ok_or_else(|| ConfigError::missing("--search-url"))?;
        let url = reqwest::Url::parse(&url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                ConfigError::new(
                    "--search-url",
                    format!("{url:?} is not an http(s) URL such as https://search:9200"),
                )
            })?;
        let auth = match (o.search_username, o.search_password, o.search_api_key) {
            (None, None, None) => SearchAuth::None,
            (Some(username), Some(password), None) => SearchAuth::Basic { username, password },
            (None, None, Some(key)) => SearchAuth::ApiKey(key),
            (Some(_), None, _) | (None, Some(_), _) => {
                return Err(ConfigError::new(
                    "--search-username",
                    "basic authentication needs both --search-username and --search-password",
                ));
            }
            (Some(_), Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "--search-api-key",
                    "give either an API key or a username and password, not both",
                ));
            }
        };
        let ca_pem = match o.search_ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(&path).map_err(|e| {
                    ConfigError::new(
                        "--search-ca-file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                reqwest::Certificate::from_pem(&pem).map_err(|e| {
                    ConfigError::new(
                        "--search-ca-file",
                        format!("{} is not a PEM certificate: {e}", path.display()),
                    )
                })?;
                Some(pem)
            }
        };
        let index_template = o
            .index_template
            .clone()
            .unwrap_or_else(|| "{schema}.{table}".into());
        if !index_template.contains("{table}") {
            return Err(ConfigError::new(
                "--index-template",
                format!(
                    "{index_template:?} must contain {{table}}, or every table would share one index"
                ),
            ));
        }
        Ok(SearchSettings {
            url,
            auth,
            ca_pem,
            index_template,
            on_drop_table: o.on_drop_table.unwrap_or_default(),
            retry_initial_backoff: retry.initial,
            retry_max_backoff: retry.max,
        })
    }
}

/// The options of `reindex` beyond the search sink's, each unset unless given.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[group(skip)]
#[command(next_help_heading = "Re-index")]
pub struct ReindexArgs {
    /// Lag (events) at or under which the new indexes count as caught up and the
    /// aliases swap; the hand-over after the swap covers the rest [default: 1000].
    #[arg(long, env = "WALRELAY_CAUGHT_UP_LAG")]
    pub caught_up_lag: Option<u64>,
    /// Wait between the alias swap and deleting the old indexes [default: 60s].
    #[arg(long, env = "WALRELAY_GRACE_PERIOD", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub grace_period: Option<Duration>,
    /// Keep the old indexes after the swap.
    #[arg(long, env = "WALRELAY_KEEP_OLD")]
    #[serde(default)]
    pub keep_old: bool,
    /// How often progress is logged [default: 5s].
    #[arg(long, env = "WALRELAY_PROGRESS_INTERVAL", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub progress_interval: Option<Duration>,
}

impl ReindexArgs {
    /// `self` where set, else `file`.
    pub fn or(self, file: ReindexArgs) -> ReindexArgs {
        ReindexArgs {
            caught_up_lag: self.caught_up_lag.or(file.caught_up_lag),
            grace_period: self.grace_period.or(file.grace_period),
            keep_old: self.keep_old || file.keep_old,
            progress_interval: self.progress_interval.or(file.progress_interval),
        }
    }

    /// Applies defaults.
    pub fn settings(self) -> ReindexSettings {
        ReindexSettings {
            caught_up_lag: self.caught_up_lag.unwrap_or(1000),
            grace_period: self.grace_period.unwrap_or(Duration::from_secs(60)),
            keep_old: self.keep_old,
            progress_interval: self.progress_interval.unwrap_or(Duration::from_secs(5)),
        }
    }
}

/// How the search sink authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum SearchAuth {
    /// None.
    None,
    /// HTTP basic authentication.
    Basic {
        /// User.
        username: String,
        /// Password.
        password: String,
    },
    /// `Authorization: ApiKey …`.
    ApiKey(String),
}

impl std::fmt::Debug for SearchAuth {
    // Secrets never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SearchAuth::None => f.write_str("None"),
            SearchAuth::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            SearchAuth::ApiKey(_) => f.write_str("ApiKey(***)"),
        }
    }
}

/// Settings of the search sink.
#[derive(Debug, Clone)]
pub struct SearchSettings {
    /// Base URL.
    pub url: reqwest::Url,
    /// Authentication.
    pub auth: SearchAuth,
    /// Extra CA (PEM bytes).
    pub ca_pem: Option<Vec<u8>>,
    /// Alias template.
    pub index_template: String,
    /// What a dropped table does to its index.
    pub on_drop_table: OnDropTable,
    /// Retry backoff: first wait.
    pub retry_initial_backoff: Duration,
    /// Retry backoff: cap.
    pub retry_max_backoff: Duration,
}

/// What a dropped table does to its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnDropTable {
    /// Delete the table's index (and so its alias).
    #[default]
    Delete,
    /// Keep the index as it was.
    Keep,
}

/// Settings of `reindex`.
#[derive(Debug, Clone)]
pub struct ReindexSettings {
    /// Lag at or under which the build counts as caught up.
    pub caught_up_lag: u64,
    /// Wait before deleting the old indexes.
    pub grace_period: Duration,
    /// Keep the old indexes.
    pub keep_old: bool,
    /// Progress log interval.
    pub progress_interval: Duration,
}
