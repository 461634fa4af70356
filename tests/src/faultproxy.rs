//! A TCP fault proxy on loopback, for chaos tests: a client connects to [`FaultProxy::addr`]
//! instead of a server, and the test decides at run time what the network between them does.
//!
//! ```text
//!   client ──▶ 127.0.0.1:proxy ──(latency, bandwidth, cut, blackout)──▶ 127.0.0.1:upstream
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

/// What the proxy does now; connections watch it.
#[derive(Debug, Clone, Copy, Default)]
struct Control {
    latency: Duration,
    /// Bytes per second each way; `None`: unlimited.
    bandwidth: Option<u64>,
    blackout: bool,
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
    /// Connections ended by [`FaultProxy::cut`] or [`FaultProxy::blackout`].
    pub cuts: u64,
    /// Connections closed because the upstream refused them (a stopped server).
    pub upstream_refused: u64,
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

    /// No latency, no bandwidth limit, no blackout.
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
    loop {
        let now = *ctl.borrow_and_update();
        if now.epoch != epoch {
            shared.cuts.fetch_add(1, Ordering::Relaxed);
            reset(&client);
            return;
        }
        if !now.blackout {
            break;
        }
        if ctl.changed().await.is_err() {
            return;
        }
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
