//! A TCP fault proxy on loopback, for chaos tests: a client connects to [`FaultProxy::addr`]
//! instead of a server, and the test decides at run time what the network between them does.
//!
//! ```text
//!   client ──▶ 127.0.0.1:proxy ──(latency, bandwidth, cut, blackout)──▶ 127.0.0.1:upstream
//!                      └── or, in the HTTP error mode, the proxy answers 429/503 itself
//! ```
//!
//! Faults (all off after [`FaultProxy::clear`]):
//!
//! - [`FaultProxy::latency`]: every chunk read is forwarded that much later, each direction, in
//!   order (a round trip gets twice the delay);
//! - [`FaultProxy::bandwidth`]: bytes per second each way, shared by every connection of the
//!   proxy (one link);
//! - [`FaultProxy::cut`]: every current connection is reset mid-stream (both sides); new ones are
//!   accepted as usual;
//! - [`FaultProxy::blackout`] until [`FaultProxy::restore`]: a hung network. Current connections
//!   are cut; new ones are accepted (the client's connect succeeds) but nothing is read or sent:
//!   the client's data waits in the socket, no upstream connection is made. On restore the held
//!   connections are connected upstream and what they sent is forwarded.
//! - [`FaultProxy::http_errors`] until [`FaultProxy::http_ok`]: an HTTP server that refuses
//!   everything, for a search node that must answer 429 or 503 on cue (a real node cannot).
//!   Current connections are cut; new ones are never forwarded: the proxy reads each HTTP/1.1
//!   request itself (the head, then the body by `Content-Length` or chunked coding, read and
//!   discarded in chunks) and answers the status with a JSON error shaped like OpenSearch's own.
//!   A connection stays open for further requests unless the request says `Connection: close`;
//!   a head over 64 KiB, a body over 64 MiB or a request that cannot be framed is answered too,
//!   then the connection is closed. When the mode ends, the connections it served are cut, so
//!   clients reconnect and are forwarded. A blackout wins: connections accepted during one are
//!   held, and answered only if the mode is still on when it ends. Latency and bandwidth do not
//!   apply to the proxy's own answers, and their bytes are not counted as forwarded.
//!
//! The proxy runs on a thread of its own (a single-threaded tokio runtime), so it works from
//! synchronous and asynchronous tests alike, and it keeps forwarding while the test's own
//! runtime is blocked. Idle, it costs nothing; forwarding is one read and one write per chunk.
//! It stops when the last clone of its handle is dropped. Only loopback addresses are accepted.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Largest chunk read at once.
const CHUNK: usize = 16 * 1024;
/// Chunks in flight per direction of a connection (bounds memory under latency: 4 MiB).
const IN_FLIGHT: usize = 256;
/// Largest request head (request line and headers) the HTTP error mode reads.
const HTTP_HEAD_MAX: usize = 64 * 1024;
/// Largest request body the HTTP error mode reads (and discards).
const HTTP_BODY_MAX: u64 = 64 * 1024 * 1024;
/// How long the HTTP error mode reads what a client still sends after its last answer, so the
/// client reads that answer rather than a reset for unread data.
const HTTP_LINGER: Duration = Duration::from_secs(1);

/// What the proxy does now; connections watch it.
#[derive(Debug, Clone, Copy, Default)]
struct Control {
    latency: Duration,
    /// Bytes per second each way; `None`: unlimited.
    bandwidth: Option<u64>,
    blackout: bool,
    /// Answer HTTP requests with this status instead of forwarding; `None`: forward.
    http_error: Option<u16>,
    /// Bumped by every cut: a connection that saw another value ends.
    epoch: u64,
}

/// Counters of a proxy since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Client connections accepted.
    pub connections: u64,
    /// Client connections open now (held ones included).
    pub active: u64,
    /// Bytes forwarded from clients to the upstream.
    pub bytes_to_upstream: u64,
    /// Bytes forwarded from the upstream to clients.
    pub bytes_to_client: u64,
    /// Connections ended by [`FaultProxy::cut`], [`FaultProxy::blackout`],
    /// [`FaultProxy::http_errors`] or the end of the HTTP error mode.
    pub cuts: u64,
    /// Connections closed because the upstream refused them (a stopped server).
    pub upstream_refused: u64,
    /// HTTP requests the proxy answered itself with an error status (counted as the answer is
    /// sent).
    pub http_errors_answered: u64,
}

#[derive(Clone, Copy)]
enum Dir {
    ToUpstream,
    ToClient,
}

/// State shared by the handle and the connection tasks.
struct Shared {
    upstream: SocketAddr,
    ctl: watch::Sender<Control>,
    /// When each direction's link is free again (bandwidth pacing).
    link_free: [Mutex<Option<Instant>>; 2],
    connections: AtomicU64,
    active: AtomicU64,
    bytes: [AtomicU64; 2],
    cuts: AtomicU64,
    refused: AtomicU64,
    http_errors: AtomicU64,
}

impl Shared {
    fn control(&self) -> Control {
        *self.ctl.borrow()
    }

    /// Reserves `n` bytes of the link in `dir`; when they have gone through at the current rate.
    fn reserve(&self, dir: Dir, n: usize, rate: u64) -> Instant {
        let mut free = self.link_free[dir as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let start = free.map_or_else(Instant::now, |f| f.max(Instant::now()));
        let until = start + Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
        *free = Some(until);
        until
    }
}

/// Stops the proxy's thread when the last handle goes.
struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = stop.send(());
        }
    }
}

/// A running proxy; clones control the same proxy.
#[derive(Clone)]
pub struct FaultProxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.inner.addr)
            .field("upstream", &self.inner.shared.upstream)
            .field("control", &self.inner.shared.control())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`, which must be a loopback
    /// address (it need not be listening yet: a refused connection closes the client's).
    pub fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        if !upstream.ip().is_loopback() {
            bail!(
                "fault proxy: upstream {upstream} is not a loopback address; tests send traffic \
                 to loopback only"
            );
        }
        let listener = StdListener::bind("127.0.0.1:0").context("fault proxy: bind 127.0.0.1:0")?;
        listener
            .set_nonblocking(true)
            .context("fault proxy: non-blocking listener")?;
        let addr = listener
            .local_addr()
            .context("fault proxy: local address")?;
        let shared = Arc::new(Shared {
            upstream,
            ctl: watch::Sender::new(Control::default()),
            link_free: [Mutex::new(None), Mutex::new(None)],
            connections: AtomicU64::new(0),
            active: AtomicU64::new(0),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            cuts: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            http_errors: AtomicU64::new(0),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("fault proxy: tokio runtime")?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let task_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("faultproxy-{}", addr.port()))
            .spawn(move || runtime.block_on(accept_loop(listener, task_shared, stop_rx)))
            .context("fault proxy: spawn its thread")?;
        tracing::debug!(%addr, %upstream, "fault proxy started");
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                addr,
                stop: Mutex::new(Some(stop_tx)),
            }),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.inner.addr.port()
    }

    /// Where the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.inner.shared.upstream
    }

    fn update(&self, what: &str, f: impl FnOnce(&mut Control)) {
        self.inner.shared.ctl.send_modify(f);
        tracing::info!(
            proxy = %self.inner.addr,
            upstream = %self.inner.shared.upstream,
            control = ?self.inner.shared.control(),
            "fault proxy: {what}"
        );
    }

    /// Delays every chunk read from now on by `delay`, each way (zero: none).
    pub fn latency(&self, delay: Duration) {
        self.update("latency", |c| c.latency = delay);
    }

    /// Limits each direction to `bytes_per_sec` across all connections (0 is taken as 1).
    pub fn bandwidth(&self, bytes_per_sec: u64) {
        self.update("bandwidth", |c| c.bandwidth = Some(bytes_per_sec.max(1)));
    }

    /// Lifts the bandwidth limit.
    pub fn unlimited(&self) {
        self.update("unlimited bandwidth", |c| c.bandwidth = None);
    }

    /// Resets every current connection; new ones are accepted as usual.
    pub fn cut(&self) {
        self.update("cut", |c| c.epoch += 1);
    }

    /// Cuts every current connection and holds new ones without forwarding anything until
    /// [`Self::restore`] (or [`Self::clear`]).
    pub fn blackout(&self) {
        self.update("blackout", |c| {
            c.epoch += 1;
            c.blackout = true;
        });
    }

    /// Ends a blackout: held connections are connected upstream and forwarded.
    pub fn restore(&self) {
        self.update("restore", |c| c.blackout = false);
    }

    /// Cuts every current connection and answers every new one itself, never forwarding: each
    /// HTTP/1.1 request is read whole and answered `status` with an OpenSearch-style JSON error
    /// (429 and 503 with `Retry-After: 1`), until [`Self::http_ok`] (or [`Self::clear`]). A
    /// status outside 400..=599 is taken as 503.
    pub fn http_errors(&self, status: u16) {
        let status = if (400..=599).contains(&status) {
            status
        } else {
            tracing::warn!(
                status,
                "fault proxy: not an HTTP error status, answering 503"
            );
            503
        };
        self.update("http errors", |c| {
            c.epoch += 1;
            c.http_error = Some(status);
        });
    }

    /// Ends the HTTP error mode: the connections it served are cut, new ones are forwarded.
    pub fn http_ok(&self) {
        self.update("http ok", |c| c.http_error = None);
    }

    /// No latency, no bandwidth limit, no blackout, no HTTP error mode.
    pub fn clear(&self) {
        self.update("clear", |c| {
            *c = Control {
                epoch: c.epoch,
                ..Control::default()
            }
        });
    }

    /// Whether a blackout is on.
    pub fn is_blacked_out(&self) -> bool {
        self.inner.shared.control().blackout
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.inner.shared;
        ProxyStats {
            connections: s.connections.load(Ordering::Relaxed),
            active: s.active.load(Ordering::Relaxed),
            bytes_to_upstream: s.bytes[Dir::ToUpstream as usize].load(Ordering::Relaxed),
            bytes_to_client: s.bytes[Dir::ToClient as usize].load(Ordering::Relaxed),
            cuts: s.cuts.load(Ordering::Relaxed),
            upstream_refused: s.refused.load(Ordering::Relaxed),
            http_errors_answered: s.http_errors.load(Ordering::Relaxed),
        }
    }
}

async fn accept_loop(listener: StdListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "fault proxy: cannot use its listener");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    shared.active.fetch_add(1, Ordering::Relaxed);
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        serve(client, peer, &shared).await;
                        shared.active.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "fault proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tracing::debug!(upstream = %shared.upstream, "fault proxy stopped");
}

/// Resolves when the control's epoch is no longer `epoch` (a cut), or the proxy is gone.
async fn cut_signal(ctl: &mut watch::Receiver<Control>, epoch: u64) {
    loop {
        if ctl.borrow_and_update().epoch != epoch {
            return;
        }
        if ctl.changed().await.is_err() {
            return;
        }
    }
}

/// Resets `s`: the peer sees "connection reset", as after a network failure.
fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

async fn serve(mut client: TcpStream, peer: SocketAddr, shared: &Shared) {
    let mut ctl = shared.ctl.subscribe();
    let epoch = ctl.borrow_and_update().epoch;
    // A blackout holds the connection, unread, until restored (or cut again).
    let now = loop {
        let now = *ctl.borrow_and_update();
        if now.epoch != epoch {
            shared.cuts.fetch_add(1, Ordering::Relaxed);
            reset(&client);
            return;
        }
        if !now.blackout {
            break now;
        }
        if ctl.changed().await.is_err() {
            return;
        }
    };
    if let Some(status) = now.http_error {
        serve_http_errors(client, peer, status, ctl, epoch, shared).await;
        return;
    }
    let connect = tokio::select! {
        c = TcpStream::connect(shared.upstream) => c,
        _ = cut_signal(&mut ctl, epoch) => {
            shared.cuts.fetch_add(1, Ordering::Relaxed);
            reset(&client);
            return;
        }
    };
    let mut upstream = match connect {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(%peer, upstream = %shared.upstream, error = %e, "fault proxy: upstream refused");
            shared.refused.fetch_add(1, Ordering::Relaxed);
            reset(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let cut = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let both = async {
            tokio::try_join!(
                pump(cr, uw, Dir::ToUpstream, shared),
                pump(ur, cw, Dir::ToClient, shared)
            )
        };
        tokio::select! {
            r = both => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "fault proxy: connection ended");
                    Some(false)
                } else {
                    None
                }
            }
            _ = cut_signal(&mut ctl, epoch) => Some(true),
        }
    };
    if let Some(by_fault) = cut {
        if by_fault {
            shared.cuts.fetch_add(1, Ordering::Relaxed);
        }
        // One side failed or a fault cut it: the other side sees a reset, not a clean end.
        reset(&client);
        reset(&upstream);
    }
}

/// Forwards `from` to `to` until `from` ends (then `to` is shut down for writing), with the
/// latency and bandwidth in force when each chunk is read and sent.
async fn pump<R, W>(mut from: R, mut to: W, dir: Dir, shared: &Shared) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let read = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            let due = Instant::now() + shared.control().latency;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let write = async {
        while let Some((due, chunk)) = rx.recv().await {
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            match shared.control().bandwidth {
                None => to.write_all(&chunk).await?,
                Some(rate) => {
                    // Small pieces, so the pace is even rather than a burst per chunk.
                    let piece = ((rate / 20) as usize).clamp(256, CHUNK);
                    for p in chunk.chunks(piece) {
                        let until = shared.reserve(dir, p.len(), rate);
                        tokio::time::sleep_until(until).await;
                        to.write_all(p).await?;
                    }
                }
            }
            shared.bytes[dir as usize].fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write).map(|_| ())
}

/// Serves `client` in the HTTP error mode until the client leaves or the mode ends (then the
/// connection is cut).
async fn serve_http_errors(
    client: TcpStream,
    peer: SocketAddr,
    status: u16,
    mut ctl: watch::Receiver<Control>,
    epoch: u64,
    shared: &Shared,
) {
    let _ = client.set_nodelay(true);
    let mut conn = HttpConn {
        stream: client,
        buf: Vec::new(),
    };
    let ended = tokio::select! {
        r = answer_requests(&mut conn, status, shared) => {
            if let Err(Unread::Io(e)) = r {
                tracing::debug!(%peer, error = %e, "fault proxy: HTTP connection ended");
            }
            false
        }
        _ = http_mode_ends(&mut ctl, epoch) => true,
    };
    if ended {
        shared.cuts.fetch_add(1, Ordering::Relaxed);
        reset(&conn.stream);
    }
}

/// Resolves when the HTTP error mode in force at `epoch` ends: a cut, a blackout,
/// [`FaultProxy::http_ok`] or [`FaultProxy::clear`], or the proxy is gone.
async fn http_mode_ends(ctl: &mut watch::Receiver<Control>, epoch: u64) {
    loop {
        let now = *ctl.borrow_and_update();
        if now.epoch != epoch || now.http_error.is_none() {
            return;
        }
        if ctl.changed().await.is_err() {
            return;
        }
    }
}

/// Reads requests and answers each with `status`, until the client closes the connection, asks
/// to, or sends what cannot be read within bounds.
async fn answer_requests(conn: &mut HttpConn, status: u16, shared: &Shared) -> Result<(), Unread> {
    loop {
        let (with_body, keep_alive) = match conn.read_request().await {
            Ok(head) => (!head.is_head_method, head.keep_alive),
            Err(Unread::Refused(why)) => {
                tracing::debug!(
                    why,
                    "fault proxy: HTTP request not read whole, answered and closed"
                );
                (true, false)
            }
            Err(e) => return Err(e),
        };
        // Counted first, so a client holding its answer finds it counted.
        shared.http_errors.fetch_add(1, Ordering::Relaxed);
        conn.stream
            .write_all(&error_response(status, with_body, keep_alive))
            .await?;
        if !keep_alive {
            conn.linger_close().await;
            return Ok(());
        }
    }
}

/// Why a request was not read whole.
enum Unread {
    /// The client closed the connection.
    Closed,
    Io(std::io::Error),
    /// Too large or malformed: it is answered, then the connection is closed.
    Refused(&'static str),
}

impl From<std::io::Error> for Unread {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// How a request's body is framed.
#[derive(Debug, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked,
}

/// What the head of a request says about the answer, the body and the connection.
#[derive(Debug, PartialEq, Eq)]
struct RequestHead {
    /// A HEAD request: its answer has no body.
    is_head_method: bool,
    keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead before sending the body.
    expect_continue: bool,
    body: Body,
}

/// Parses a request head (request line and header fields, without the blank line that ends it).
fn parse_head(head: &str) -> Result<RequestHead, &'static str> {
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(_target), Some(version), None) = (
        request_line.next(),
        request_line.next(),
        request_line.next(),
        request_line.next(),
    ) else {
        return Err("malformed request line");
    };
    let http_1_0 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err("not HTTP/1.1 or 1.0"),
    };
    let (mut length, mut chunked, mut close, mut keep_alive, mut expect_continue) =
        (None, false, false, false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err("malformed header field");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err("malformed Content-Length");
            }
            let n = value
                .parse::<u64>()
                .map_err(|_| "Content-Length too large")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length fields");
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only a body whose last coding is chunked can be framed (RFC 9112, 6.3).
            let last = value.rsplit(',').next().unwrap_or_default().trim();
            if !last.eq_ignore_ascii_case("chunked") {
                return Err("Transfer-Encoding without a final chunked coding");
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                close |= option.eq_ignore_ascii_case("close");
                keep_alive |= option.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    // HTTP/1.0 closes unless asked not to; with both framings, chunked wins and the connection
    // is not reused (RFC 9112, 6.3).
    let closes = close || (http_1_0 && !keep_alive) || (chunked && length.is_some());
    Ok(RequestHead {
        is_head_method: method == "HEAD",
        keep_alive: !closes,
        expect_continue,
        body: if chunked {
            Body::Chunked
        } else {
            Body::Length(length.unwrap_or(0))
        },
    })
}

/// A client connection in the HTTP error mode, with what was read and not used yet.
struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    /// Reads one request whole; its body is discarded as it comes.
    async fn read_request(&mut self) -> Result<RequestHead, Unread> {
        let head = loop {
            let raw = self.take_until(b"\r\n\r\n", HTTP_HEAD_MAX).await?;
            let text = String::from_utf8_lossy(&raw);
            // Empty lines before a request line are ignored (RFC 9112, 2.2).
            let text = text.trim_start_matches("\r\n");
            if !text.is_empty() {
                break parse_head(text).map_err(Unread::Refused)?;
            }
        };
        let needs_body = match head.body {
            Body::Length(0) => false,
            Body::Length(n) if n > HTTP_BODY_MAX => {
                return Err(Unread::Refused("body over 64 MiB"));
            }
            _ => true,
        };
        if needs_body && head.expect_continue {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await?;
        }
        match head.body {
            Body::Length(n) => self.discard(n).await?,
            Body::Chunked => self.discard_chunked().await?,
        }
        Ok(head)
    }

    /// Reads more into the buffer; [`Unread::Closed`] at the end of the stream.
    async fn fill(&mut self) -> Result<(), Unread> {
        self.buf.reserve(CHUNK);
        match self.stream.read_buf(&mut self.buf).await? {
            0 => Err(Unread::Closed),
            _ => Ok(()),
        }
    }

    /// Takes the bytes before the next `delim` (which is dropped); [`Unread::Refused`] if more
    /// than `limit` come before it.
    async fn take_until(&mut self, delim: &[u8], limit: usize) -> Result<Vec<u8>, Unread> {
        let mut searched = 0;
        loop {
            if let Some(at) = self.buf[searched..]
                .windows(delim.len())
                .position(|w| w == delim)
            {
                let at = searched + at;
                if at > limit {
                    break;
                }
                let taken = self.buf[..at].to_vec();
                self.buf.drain(..at + delim.len());
                return Ok(taken);
            }
            if self.buf.len() > limit + delim.len() {
                break;
            }
            searched = self.buf.len().saturating_sub(delim.len() - 1);
            self.fill().await?;
        }
        Err(Unread::Refused("line or head too long"))
    }

    /// Reads and drops `n` bytes, a chunk at a time.
    async fn discard(&mut self, mut n: u64) -> Result<(), Unread> {
        loop {
            let here = n.min(self.buf.len() as u64);
            self.buf.drain(..here as usize);
            n -= here;
            if n == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    /// Reads and drops a chunked body, trailer fields included (RFC 9112, 7.1).
    async fn discard_chunked(&mut self) -> Result<(), Unread> {
        let mut total = 0u64;
        loop {
            let line = self.take_until(b"\r\n", 1024).await?;
            let line = String::from_utf8_lossy(&line);
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(size, 16)
                .map_err(|_| Unread::Refused("malformed chunk size"))?;
            if size == 0 {
                break;
            }
            total = total.saturating_add(size);
            if total > HTTP_BODY_MAX {
                return Err(Unread::Refused("body over 64 MiB"));
            }
            self.discard(size).await?;
            if !self.take_until(b"\r\n", 0).await?.is_empty() {
                return Err(Unread::Refused("chunk data longer than its size"));
            }
        }
        let mut trailers = 0;
        loop {
            let field = self.take_until(b"\r\n", HTTP_HEAD_MAX).await?;
            if field.is_empty() {
                return Ok(());
            }
            trailers += field.len();
            if trailers > HTTP_HEAD_MAX {
                return Err(Unread::Refused("trailer fields over 64 KiB"));
            }
        }
    }

    /// Ends the connection after its last answer: the write side first, then what the client
    /// still sends is read and dropped for a moment, so it reads the answer rather than a reset.
    async fn linger_close(&mut self) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let drain = async {
            while self.fill().await.is_ok() {
                self.buf.clear();
            }
        };
        let _ = tokio::time::timeout(HTTP_LINGER, drain).await;
    }
}

/// An answer with `status` and a JSON error shaped like OpenSearch's own for it.
fn error_response(status: u16, with_body: bool, keep_alive: bool) -> Vec<u8> {
    let phrase = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let (kind, reason) = match status {
        429 => ("rejected_execution_exception", "rejected execution"),
        500..=599 => (
            "unavailable_shards_exception",
            "primary shard is not active",
        ),
        _ => ("status_exception", phrase),
    };
    let reason = format!("{reason} (walrelay fault proxy)");
    let cause = serde_json::json!({ "type": kind, "reason": reason });
    let body = serde_json::json!({
        "error": { "root_cause": [cause], "type": kind, "reason": reason },
        "status": status,
    })
    .to_string();
    let mut head = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json; charset=UTF-8\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    if matches!(status, 429 | 503) {
        head.push_str("Retry-After: 1\r\n");
    }
    if !keep_alive {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut answer = head.into_bytes();
    if with_body {
        answer.extend_from_slice(body.as_bytes());
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant as StdInstant;

    /// An echo server on loopback; counts the connections it accepted.
    async fn echo_server() -> (SocketAddr, Arc<AtomicU64>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = l.local_addr().expect("echo addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, accepted)
    }

    async fn connect(p: &FaultProxy) -> TcpStream {
        TcpStream::connect(p.addr())
            .await
            .expect("connect to proxy")
    }

    /// Writes `data` and reads the same number of bytes back.
    async fn round_trip(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
        let (mut r, mut w) = s.split();
        let mut back = vec![0u8; data.len()];
        let (wr, rd) = tokio::join!(w.write_all(data), r.read_exact(&mut back));
        wr.expect("write through proxy");
        rd.expect("read back through proxy");
        back
    }

    #[tokio::test]
    async fn forwards_both_ways_and_counts() {
        let (echo, _) = echo_server().await;
        let p = FaultProxy::start(echo).expect("proxy");
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut s = connect(&p).await;
        assert_eq!(round_trip(&mut s, &data).await, data);
        let st = p.stats();
        assert_eq!(st.connections, 1);
        assert_eq!(st.bytes_to_upstream, data.len() as u64);
        assert_eq!(st.bytes_to_client, data.len() as u64);
        assert_eq!(st.cuts, 0);
        // A clean close from the client reaches the server and comes back as an end of stream.
        s.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("end of stream after a clean close")
            .expect("clean end");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn refuses_a_non_loopback_upstream() {
        let err = FaultProxy::start("192.0.2.1:9092".parse().expect("addr"))
            .expect_err("a non-loopback upstream is refused");
        assert!(err.to_string().contains("loopback"), "{err}");
    }

    #[tokio::test]
    async fn latency_delays_each_direction_in_order() {
        let (echo, _) = echo_server().await;
        let p = FaultProxy::start(echo).expect("proxy");
        let mut s = connect(&p).await;
        // Without latency a round trip on loopback is far below the delay measured below.
        let t = StdInstant::now();
        round_trip(&mut s, b"warm").await;
        assert!(
            t.elapsed() < Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );

        p.latency(Duration::from_millis(150));
        let t = StdInstant::now();
        round_trip(&mut s, b"ping").await;
        let rtt = t.elapsed();
        assert!(
            rtt >= Duration::from_millis(300) && rtt < Duration::from_millis(1500),
            "150 ms each way: round trip {rtt:?}"
        );
        // Many small writes under latency come back complete and in order.
        let (mut r, mut w) = s.split();
        let expected: Vec<u8> = (0..200u32).flat_map(|i| i.to_be_bytes()).collect();
        let writer = async {
            for chunk in expected.chunks(4) {
                w.write_all(chunk).await.expect("write");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let mut back = vec![0u8; expected.len()];
        let (_, rd) = tokio::join!(writer, r.read_exact(&mut back));
        rd.expect("read back");
        assert_eq!(back, expected);

        p.clear();
        let t = StdInstant::now();
        round_trip(&mut s, b"fast").await;
        assert!(
            t.elapsed() < Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn bandwidth_bounds_throughput() {
        let (echo, _) = echo_server().await;
        let p = FaultProxy::start(echo).expect("proxy");
        let rate = 100_000u64;
        p.bandwidth(rate);
        let data = vec![7u8; 250_000];
        let mut s = connect(&p).await;
        let t = StdInstant::now();
        assert_eq!(round_trip(&mut s, &data).await, data);
        let took = t.elapsed().as_secs_f64();
        // 250 kB at 100 kB/s each way (the two directions overlap): about 2.5 s.
        assert!(
            took >= 2.3,
            "250 kB at 100 kB/s went through in {took:.2} s"
        );
        assert!(took < 6.0, "the limit is too strict: {took:.2} s");
        p.unlimited();
        let t = StdInstant::now();
        round_trip(&mut s, &data).await;
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn cut_ends_current_connections_and_new_ones_work() {
        let (echo, _) = echo_server().await;
        let p = FaultProxy::start(echo).expect("proxy");
        let mut a = connect(&p).await;
        round_trip(&mut a, b"before").await;
        p.cut();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
            .await
            .expect("the cut connection ends at once");
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "a cut connection yields no more data: {r:?}"
        );
        assert_eq!(p.stats().cuts, 1);
        let mut b = connect(&p).await;
        assert_eq!(round_trip(&mut b, b"after").await, b"after");
        assert_eq!(p.stats().connections, 2);
    }

    #[tokio::test]
    async fn blackout_holds_data_until_restore() {
        let (echo, upstream_accepts) = echo_server().await;
        let p = FaultProxy::start(echo).expect("proxy");
        let mut a = connect(&p).await;
        round_trip(&mut a, b"before").await;
        assert_eq!(upstream_accepts.load(Ordering::Relaxed), 1);

        p.blackout();
        assert!(p.is_blacked_out());
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
            .await
            .expect("a blackout cuts current connections");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");

        // A new connection is accepted, but what it sends goes nowhere.
        let mut b = connect(&p).await;
        b.write_all(b"held").await.expect("write during blackout");
        let mut held = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_secs(2), b.read_exact(&mut held)).await;
        assert!(r.is_err(), "nothing comes back during a blackout: {r:?}");
        assert_eq!(
            upstream_accepts.load(Ordering::Relaxed),
            1,
            "no upstream connection during a blackout"
        );
        assert_eq!(p.stats().bytes_to_upstream, 6);

        p.restore();
        tokio::time::timeout(Duration::from_secs(5), b.read_exact(&mut held))
            .await
            .expect("held data goes through after restore")
            .expect("read held data");
        assert_eq!(&held, b"held");
        let mut c = connect(&p).await;
        assert_eq!(round_trip(&mut c, b"again").await, b"again");
        let st = p.stats();
        assert_eq!(st.cuts, 1);
        assert_eq!(st.connections, 3);
        assert_eq!(upstream_accepts.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_stopped_upstream_closes_the_client_and_is_counted() {
        let port = crate::free_port();
        let p = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port))).expect("proxy");
        let mut s = connect(&p).await;
        let mut buf = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed at once");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        assert_eq!(p.stats().upstream_refused, 1);
    }

    /// An HTTP server on loopback answering 200 and `{"upstream":true}` to every request.
    async fn http_upstream() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind http upstream");
        let addr = l.local_addr().expect("http upstream addr");
        let app = axum::Router::new()
            .fallback(|| async { axum::Json(serde_json::json!({ "upstream": true })) });
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        addr
    }

    /// Waits until the proxy has cut `cuts` connections in all, then a moment more, so the
    /// client's pool has seen its kept-alive connection go.
    async fn cuts_reach(p: &FaultProxy, cuts: u64) {
        let deadline = StdInstant::now() + Duration::from_secs(5);
        while p.stats().cuts < cuts {
            assert!(StdInstant::now() < deadline, "{:?}", p.stats());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Checks an answer of the HTTP error mode: `status`, its headers and the JSON error.
    async fn expect_error(r: reqwest::Response, status: u16, kind: &str) {
        assert_eq!(r.status().as_u16(), status, "{r:?}");
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(header("retry-after").as_deref(), Some("1"));
        let content_type = header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let body: serde_json::Value = r.json().await.expect("a JSON error body");
        assert_eq!(body["status"].as_u64(), Some(u64::from(status)), "{body}");
        assert_eq!(body["error"]["type"].as_str(), Some(kind), "{body}");
        assert_eq!(
            body["error"]["root_cause"][0]["type"].as_str(),
            Some(kind),
            "{body}"
        );
        let reason = body["error"]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("walrelay fault proxy"), "{body}");
    }

    #[tokio::test]
    async fn http_errors_answer_instead_of_the_upstream_until_http_ok() {
        let p = FaultProxy::start(http_upstream().await).expect("proxy");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client");
        let url = format!("http://{}/_bulk", p.addr());
        let from_upstream = |r: reqwest::Response| async move {
            assert_eq!(r.status().as_u16(), 200, "{r:?}");
            let body: serde_json::Value = r.json().await.expect("the upstream's JSON");
            assert_eq!(body["upstream"].as_bool(), Some(true), "{body}");
        };
        let r = client
            .get(&url)
            .send()
            .await
            .expect("request before the mode");
        from_upstream(r).await;

        p.http_errors(429);
        cuts_reach(&p, 1).await;
        let before = p.stats();
        let big = vec![b'{'; 3 * 1024 * 1024];
        for (i, body) in [None, Some(big), None, None].into_iter().enumerate() {
            let req = match body {
                Some(b) => client.post(&url).body(b),
                None => client.get(&url),
            };
            let r = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            expect_error(r, 429, "rejected_execution_exception").await;
        }
        let st = p.stats();
        assert_eq!(st.http_errors_answered - before.http_errors_answered, 4);
        assert_eq!(
            st.connections - before.connections,
            1,
            "the four requests, the 3 MiB body among them, share one kept-alive connection"
        );
        assert_eq!(
            st.bytes_to_upstream, before.bytes_to_upstream,
            "nothing is forwarded in the mode"
        );

        p.http_errors(503);
        cuts_reach(&p, 2).await;
        let r = client.get(&url).send().await.expect("request in 503 mode");
        expect_error(r, 503, "unavailable_shards_exception").await;
        assert_eq!(p.stats().http_errors_answered, 5);

        p.http_ok();
        cuts_reach(&p, 3).await;
        let r = client
            .get(&url)
            .send()
            .await
            .expect("request after http_ok");
        from_upstream(r).await;
        let st = p.stats();
        assert_eq!(st.http_errors_answered, 5);
        assert!(st.bytes_to_upstream > before.bytes_to_upstream, "{st:?}");
    }

    /// Writes `request` raw and reads until the proxy closes the connection.
    async fn raw_exchange(p: &FaultProxy, request: &[u8]) -> String {
        let mut s = connect(p).await;
        let (mut r, mut w) = s.split();
        let mut back = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut back));
        let (wr, rd) = tokio::join!(w.write_all(request), read);
        wr.expect("write the request");
        rd.expect("the proxy closes the connection")
            .expect("read the answers");
        String::from_utf8_lossy(&back).into_owned()
    }

    #[tokio::test]
    async fn http_errors_read_chunked_bodies_and_honour_connection_close() {
        let (echo, upstream_accepts) = echo_server().await;
        let p = FaultProxy::start(echo).expect("proxy");
        p.http_errors(503);
        let data = vec![b'x'; 100_000];
        let mut request =
            b"POST /_bulk HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        request.extend_from_slice(format!("{:x};ext=1\r\n", data.len()).as_bytes());
        request.extend_from_slice(&data);
        request.extend_from_slice(b"\r\n5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n");
        request.extend_from_slice(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n");
        request.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let text = raw_exchange(&p, &request).await;
        assert_eq!(
            text.matches("HTTP/1.1 503 Service Unavailable\r\n").count(),
            3,
            "{text}"
        );
        // The HEAD answer has no body: two JSON bodies, and only the last answer closes.
        assert_eq!(text.matches("\"status\":503").count(), 2, "{text}");
        assert_eq!(text.matches("Connection: close\r\n").count(), 1, "{text}");
        assert!(text.ends_with("\"status\":503}"), "{text}");
        assert_eq!(p.stats().http_errors_answered, 3);
        assert_eq!(upstream_accepts.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn http_errors_bound_what_they_read() {
        let (echo, _) = echo_server().await;
        let p = FaultProxy::start(echo).expect("proxy");
        p.http_errors(429);
        // A head over 64 KiB, never ended: answered, then closed.
        let mut request = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        request.resize(request.len() + 70 * 1024, b'a');
        let text = raw_exchange(&p, &request).await;
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{text}"
        );
        assert!(text.contains("Connection: close\r\n"), "{text}");
        // A body announced over 64 MiB: answered at once, without waiting for it.
        let text = raw_exchange(
            &p,
            b"PUT /i/_doc/1 HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n",
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 429 "), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        // Not HTTP at all.
        let text = raw_exchange(&p, b"\x16\x03\x01 not http\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 429 "), "{text}");
        assert_eq!(p.stats().http_errors_answered, 3);
    }

    #[tokio::test]
    async fn blackout_wins_over_http_errors() {
        let (echo, upstream_accepts) = echo_server().await;
        let p = FaultProxy::start(echo).expect("proxy");
        p.http_errors(429);
        p.blackout();
        let mut s = connect(&p).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write during blackout");
        let mut buf = vec![0u8; 4096];
        let r = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
        assert!(r.is_err(), "nothing is answered during a blackout: {r:?}");
        assert_eq!(p.stats().http_errors_answered, 0);

        // Restored with the mode still on: the held request is answered by the proxy.
        p.restore();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answered after restore")
            .expect("read the answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 429 "), "{:?}", &buf[..n]);
        assert_eq!(p.stats().http_errors_answered, 1);

        // Clearing ends the mode: that connection is cut, a new one is forwarded.
        p.clear();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the served connection ends with the mode");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        let mut c = connect(&p).await;
        assert_eq!(round_trip(&mut c, b"again").await, b"again");
        assert_eq!(upstream_accepts.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn parses_request_heads() {
        let head = |s: &str| parse_head(s);
        let h = head("POST /_bulk HTTP/1.1\r\nContent-Length: 12\r\nExpect: 100-continue")
            .expect("a POST");
        assert_eq!(h.body, Body::Length(12));
        assert!(h.keep_alive && h.expect_continue && !h.is_head_method);
        let h = head("GET / HTTP/1.1\r\nconnection: Close").expect("a GET");
        assert!(!h.keep_alive);
        let h = head("GET / HTTP/1.0").expect("HTTP/1.0");
        assert!(!h.keep_alive);
        let h = head("GET / HTTP/1.0\r\nConnection: keep-alive").expect("HTTP/1.0 kept alive");
        assert!(h.keep_alive);
        let h = head("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked").expect("chunked");
        assert_eq!(h.body, Body::Chunked);
        for bad in [
            "GET /",
            "GET / HTTP/2",
            "POST / HTTP/1.1\r\nContent-Length: -1",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip",
            "GET / HTTP/1.1\r\nno colon",
        ] {
            assert!(head(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dropping_the_last_handle_stops_the_proxy() {
        let port = crate::free_port();
        let p = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port))).expect("proxy");
        let addr = p.addr();
        let clone = p.clone();
        drop(p);
        assert!(
            std::net::TcpStream::connect(addr).is_ok(),
            "a clone keeps it"
        );
        drop(clone);
        let deadline = StdInstant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(addr).is_ok() {
            assert!(StdInstant::now() < deadline, "the proxy still listens");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
