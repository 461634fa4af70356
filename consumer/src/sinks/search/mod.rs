//! The search sink (commands `index` and `reindex`): one index per table in Elasticsearch or
//! OpenSearch, written with external versions through an alias.
//!
//! - `index` (live) mode writes through the alias `<name>`, which points at `<name>-v<N>`;
//!   the first event of an unknown table creates `<name>-v1` with mappings and the alias.
//! - `reindex` (build) mode writes to `<name>-v<G>` directly, creating it when missing; the
//!   re-index command moves the aliases when the build has caught up.
//!
//! Every write carries the event's version (its transaction's commit LSN: commit order; for
//! snapshot rows their attempt's consistent point) with `version_type=external_gte`, so the
//! engine itself refuses anything older than what it stores: replays, rebalances and the two
//! writers of a re-index never move a document back (see [`encode`], "Versions"). Documents
//! also record the Kafka partition they were written from, so that the end of a table's
//! snapshot on a partition retires what that partition wrote before the snapshot and nothing
//! rewrote ([`sweep`], "Snapshot attempts"; with per-table topics the partition of the table's
//! own topic, "Per-table topics").
//!
//! # Layout
//! - [`config`]: the sink's options (`--search-*`, `--index-template`, `--on-drop-table`, and
//!   `reindex`'s) and [`SearchSettings`].
//! - [`command`]: the `index` command; [`reindex`]: the `reindex` command (build, swap,
//!   hand-over, clean-up).
//! - [`sink`]: [`SearchSink`], the [`Sink`](crate::runtime::Sink): a batch becomes `_bulk`
//!   requests, bulk items become verdicts; [`sweep`]: deletes by query (a truncate, the end of
//!   a table's snapshot).
//! - [`indexes`]: each table's index, opened or created on first use, its mapping extended
//!   ([`table`]: what the sink knows of it);
//!   [`ddl`]: schema events applied to it; [`schema`]: the column-to-field rules.
//! - [`encode`]: document ids, versions, index names, mappings and the bulk lines.
//! - [`client`]: the REST client (the API subset common to Elasticsearch 7/8 and OpenSearch
//!   1/2).

pub mod client;
pub mod command;
pub mod config;
pub mod ddl;
pub mod encode;
pub mod indexes;
pub mod reindex;
pub mod schema;
pub mod sink;
pub mod sweep;
pub mod table;

pub use client::{Created, SearchClient, SearchError};
pub use command::IndexError;
pub use config::{OnDropTable, ReindexSettings, SearchAuth, SearchSettings};
pub use encode::{
    PARTITION_FIELD, VERSION_FIELD, alias_name, generation_of, template_matches, versioned,
};
pub use reindex::ReindexError;
pub use sink::{Mode, SearchSink};
