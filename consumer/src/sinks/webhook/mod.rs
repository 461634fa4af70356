//! The webhook sink (commands `notify` and `replay-dead-letters`): every event POSTed, signed,
//! to every matching subscription.
//!
//! - **Identity.** `webhook-id` is `msg_` + a hash of the subscription id and the record's
//!   bytes: the same on every re-delivery of the event (a producer's re-delivery after a crash
//!   is byte-identical, so it gets the same id too), so receivers can de-duplicate.
//! - **What is delivered.** Every change event (`c`, `u`, `d`, `r`, `t`) and schema event
//!   (`ddl`) a subscription matches. Snapshot markers (`snapshot_start`, `snapshot_end`) are
//!   not: they frame the producer's snapshot attempts for sinks that keep state, carry no
//!   change, and are answered as applied without a request.
//! - **Order and parallelism.** Per subscription, a batch's events are cut into phases at each
//!   truncate or schema event (which concern every row of a table); inside a phase each row's
//!   events form a chain delivered in order, and chains and subscriptions run in parallel (at
//!   most `--max-concurrent-deliveries` requests at once). A phase waits for the one before it.
//! - **Retries.** Timeouts, connection errors, 408, 425, 429 and 5xx are retried with
//!   exponential backoff and jitter (`--retry-initial-backoff` .. `--retry-max-backoff`),
//!   honouring `Retry-After` on 429 and 503, up to `--max-attempts` attempts. 410 Gone disables
//!   the subscription. After the last attempt, or on another 4xx, a refusal by the SSRF guard
//!   or a redirect, the event is dead-lettered with `walrelay.dlq.subscription`,
//!   `walrelay.dlq.status` and `walrelay.dlq.url` headers (`--on-delivery-failure stop` halts
//!   the notifier instead).
//! - **Progress.** The runtime stores a topic-partition's offset only after the whole batch has a
//!   final answer for every subscription, so nothing is committed past an event still being
//!   retried. The batch is the bounded queue: a slow or dead endpoint holds the next batch
//!   back only after every other chain of the current one has been delivered.
//! - **Proxies.** Proxy environment variables (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, ...)
//!   are ignored: deliveries connect directly unless `--webhook-proxy` names a proxy, and then
//!   every delivery goes through it (plain-HTTP targets as absolute-form requests, HTTPS
//!   targets through `CONNECT` tunnels, TLS end to end with the target).
//!
//! # The SSRF guard and a proxy
//! Without a proxy the guard sits in the client's resolver and checks every address a
//! connection is made to. With `--webhook-proxy` the only connections are to the proxy (the
//! operator's choice, not checked), so the guard checks the **target** before every attempt:
//! a literal address directly, a host name by resolving it here and refusing it if any of its
//! addresses is refused. So the notifier must be able to resolve target names itself (names
//! listed in `--allow-targets` are not looked up).
//!
//! Guaranteed: no delivery is handed to the proxy for a literal internal address, nor for a
//! name that resolves here, at that attempt, to any internal address. Not guaranteed: the
//! proxy resolves the name again on its own, so a name whose records change between our check
//! and the proxy's lookup (DNS rebinding with a short TTL), or that the proxy's resolver
//! answers differently (split-horizon DNS, its own hosts file), can still lead the proxy to an
//! internal address. A proxy that must not reach internal networks has to refuse them itself
//! (its own ACLs).
//!
//! # Layout
//! - [`config`]: the sink's options (`--postgres-url`, `--api-*`, delivery) and
//!   [`WebhookSettings`].
//! - [`command`]: the `notify` and `replay-dead-letters` commands.
//! - [`sink`]: [`WebhookSink`], the [`Sink`](crate::runtime::Sink) (order chains, phases,
//!   dead letters, 410 Gone).
//! - [`client`]: the HTTP client: one signed POST per attempt, retries, the proxy.
//! - [`encode`]: the `webhook-id`, an event's order chain, a failed delivery's dead letter.
//! - [`signing`]: Standard Webhooks signatures and secrets.
//! - [`crate::http::guard`] (shared): the SSRF guard (literal addresses, and every resolved address
//!   at connect time).
//! - [`subscriptions`]: the subscriptions in Postgres and their cache.
//! - [`api`]: the subscriptions HTTP API; [`server`] serves it (TLS, timeouts and limits).

pub mod api;
pub mod client;
pub mod command;
pub mod config;
pub mod encode;
pub mod server;
pub mod signing;
pub mod sink;
pub mod subscriptions;

pub use command::WebhookError;
pub use config::{ApiTls, ApiToken, DeliverySettings, OnFailure, ProxyUrl, WebhookSettings};
pub use encode::message_id;
pub use sink::{WebhookSink, redeliver};
