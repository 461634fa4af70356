//! Sinks: where change events go. Each sits in its own folder (`mod.rs` for the sink itself,
//! `client.rs` for the service it talks to, `document.rs` for how an event becomes what the
//! service stores) and implements [`crate::runtime::Sink`].
//!
//! - [`search`]: Elasticsearch and OpenSearch indexes, one per table, behind aliases.
//! - [`webhook`]: signed HTTP deliveries to subscribed endpoints.

pub mod search;
pub mod webhook;
