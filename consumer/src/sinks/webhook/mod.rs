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
//!   the notifier instead on a definite refusal; attempts that run out park the subscription).
//! - **Progress.** The runtime stores a topic-partition's offset only after the whole batch has a
//!   final answer for every subscription (delivered, dead-lettered, or held: see below), and
//!   never past an event still held for a parked subscription, so nothing is committed past an
//!   event that has not had its final answer for every subscription.
//!
//! # Isolation: one endpoint cannot hold the others back
//!
//! A batch ends when every subscription is done with it, so a subscription that cannot keep up
//! is taken out of the batches (**parked**, [`parking`]) instead of making every other one wait:
//!
//! - **Permits.** In a batch, each subscription with events takes at most its share of the
//!   permits, `max(1, --max-concurrent-deliveries / subscriptions delivering)`, and a permit is
//!   held only while a request is in flight: never while backing off.
//! - **Parking.** A subscription is parked when, with events in the batch, it got no settling
//!   answer (a success or a definite refusal) for `--park-after` (default 10 s; timeouts,
//!   connection errors, 429 and 5xx do not count), or is still delivering `--park-after` after
//!   the first other subscription with events finished the batch; in strict mode also when an
//!   event's attempts run out. Parking stops its requests at once (in flight too); the events it
//!   has not delivered, and all its events while it stays parked, are dead-lettered with reason
//!   `parked` (lenient) or held in memory (strict) and delivered in order once it is back.
//! - **Probes.** Every `--park-after`, one attempt in the background (never in a batch): the
//!   newest dead-lettered event (lenient), or the oldest held event (strict, which then sends
//!   the rest one by one). An answer resumes the subscription.
//! - **The bound.** A failing, silent or slow endpoint delays the other subscriptions'
//!   deliveries by at most `--park-after` (plus up to a twentieth of it, how often the batch
//!   looks) each time it is parked, and not at all while parked. It never takes more than its
//!   share of the permits. The consumer polls Kafka all the time (the runtime pauses fetching
//!   instead of stopping to poll), so a slow batch never makes it leave its group.
//! - **Memory.** Lenient: a parked subscription keeps one event (its probe). Strict: held
//!   events take at most `--max-held-bytes` (default 64 MiB) plus the batches already fetched
//!   when the bound is reached (three at most); at the bound the runtime pauses fetching the
//!   topic-partitions they belong to, for every subscription, until the endpoint is back: a
//!   strict notifier trades the others' progress for never dead-lettering. Offsets are never
//!   stored past the oldest held event, so a restart delivers held events again.
//! - **Not covered.** A subscription parked under `--park-after` that is slow but answers
//!   (more than `--park-after` behind the others on a large batch) is treated like a failing
//!   one: in lenient mode its events are dead-lettered until a probe succeeds. Parking is per
//!   process: other notifiers of the group park on their own.
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
//! - [`parking`]: parked subscriptions, their held events and probes.
//! - [`subscriptions`]: the subscriptions in Postgres and their cache.
//! - [`api`]: the subscriptions HTTP API; [`server`] serves it (TLS, timeouts and limits).

pub mod api;
pub mod client;
pub mod command;
pub mod config;
pub mod encode;
pub mod parking;
pub mod server;
pub mod signing;
pub mod sink;
pub mod subscriptions;

pub use command::WebhookError;
pub use config::{ApiTls, ApiToken, DeliverySettings, OnFailure, ProxyUrl, WebhookSettings};
pub use encode::message_id;
pub use sink::{WebhookSink, redeliver};
