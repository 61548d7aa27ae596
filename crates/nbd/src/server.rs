//! The tokio shell: a listening socket, one task per connection driving the
//! [`Handshake`] and then the [`Transmission`], and the export table.
//!
//! Closing is always bounded: a handshake has a time limit; removing an export
//! drains its connections (requests in flight finish, new ones get ESHUTDOWN)
//! for at most `drain_timeout`, then aborts them; an aborted connection
//! (hot-removed bdev) answers its requests in flight with EIO and gets at most
//! `abort_flush_timeout` to send those replies.

use std::collections::{BTreeMap, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bdev::{BdevIo, BdevRef, Completion, IoError, IoSink};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::export::{CloseMode, ConnCtl, Export, ExportInfo, ExportOptions, ExportSource};
use crate::handshake::{CloseReason, Handshake, HsEvent, Negotiated, MAX_OPTION_DATA};
use crate::proto::DEFAULT_MAX_PAYLOAD;
use crate::transmission::{Submit, Transmission, TxLimits};
use crate::NbdError;

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest read or write (the advertised maximum block size).
    pub max_payload: u32,
    /// Requests in flight per connection.
    pub max_requests: u16,
    /// Bytes of data buffers per connection (see [`TxLimits::buffer_budget`]).
    pub buffer_budget: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// How long a removed export's connections may take to finish requests in
    /// flight before they are aborted.
    pub drain_timeout: Duration,
    /// How long an aborted connection may take to send its last replies.
    pub abort_flush_timeout: Duration,
    /// Connections accepted at once (handshaking or not); more are closed at once.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_requests: 256,
            buffer_budget: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            abort_flush_timeout: Duration::from_secs(1),
            max_connections: 1024,
        }
    }
}

struct Inner {
    local: SocketAddr,
    opts: ServerOptions,
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
    /// Connections still in the handshake, so that shutdown can close them.
    handshaking: Mutex<BTreeMap<u64, Arc<ConnCtl>>>,
    next_id: AtomicU64,
    open: AtomicUsize,
    closed: AtomicBool,
    /// Signalled whenever a connection task ends.
    conn_ended: Notify,
}

impl Inner {
    fn bdev_removed(&self, bdev_name: &str) -> Vec<String> {
        let gone: Vec<Arc<Export>> = {
            let mut ex = self.exports.lock();
            let names: Vec<String> = ex
                .iter()
                .filter(|(_, e)| e.bdev().name() == bdev_name)
                .map(|(n, _)| n.clone())
                .collect();
            names.iter().filter_map(|n| ex.remove(n)).collect()
        };
        for e in &gone {
            warn!(export = %e.name(), bdev = bdev_name, connections = e.connections(), "bdev hot-removed; NBD export removed");
            e.begin_removal(CloseMode::Abort);
        }
        gone.iter().map(|e| e.name().to_string()).collect()
    }
}

impl ExportSource for Inner {
    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.lock().get(name).cloned()
    }
    fn list(&self) -> Vec<Arc<Export>> {
        self.exports.lock().values().cloned().collect()
    }
}

/// An NBD server listening on one address and serving named exports.
///
/// Dropping it stops accepting and drains every connection in the background;
/// [`NbdServer::shutdown`] does the same and waits for them.
pub struct NbdServer {
    inner: Arc<Inner>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("local", &self.inner.local)
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// Listens on `addr` (port 0 picks a free port; see [`NbdServer::local_addr`]).
    /// Needs a tokio runtime.
    pub async fn start(addr: SocketAddr, opts: ServerOptions) -> Result<NbdServer, NbdError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| NbdError::Listen { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| NbdError::Listen { addr, source })?;
        let inner = Arc::new(Inner {
            local,
            opts,
            exports: Mutex::new(BTreeMap::new()),
            handshaking: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            conn_ended: Notify::new(),
        });
        let task = tokio::spawn(accept_loop(Arc::downgrade(&inner), listener));
        info!(addr = %local, "NBD server listening");
        Ok(NbdServer {
            inner,
            accept: Mutex::new(Some(task)),
        })
    }

    /// The address actually listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local
    }

    /// Serves `bdev` as export `name`. A name already in use is refused (the
    /// error names the bdev it serves, so a caller can tell a retry of the same
    /// request from a conflict).
    pub fn add_export(
        &self,
        name: &str,
        bdev: BdevRef,
        opts: ExportOptions,
    ) -> Result<ExportInfo, NbdError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(NbdError::ShutDown {
                addr: self.inner.local,
            });
        }
        let e = Arc::new(Export::new(name, bdev, opts)?);
        let mut ex = self.inner.exports.lock();
        if let Some(old) = ex.get(name) {
            return Err(NbdError::ExportExists {
                name: name.into(),
                bdev: old.bdev().name().into(),
            });
        }
        ex.insert(name.to_string(), e.clone());
        drop(ex);
        let i = e.info(&self.inner.local);
        info!(export = name, bdev = %i.bdev_name, size = i.size, uri = %i.uri, "NBD export added");
        Ok(i)
    }

    /// Removes export `name`: no new client can open it, its connections finish
    /// the requests in flight (new ones get ESHUTDOWN) and close. Returns when
    /// they are closed (at most about `drain_timeout + abort_flush_timeout`).
    pub async fn remove_export(&self, name: &str) -> Result<ExportInfo, NbdError> {
        let e = self
            .inner
            .exports
            .lock()
            .remove(name)
            .ok_or_else(|| NbdError::NoSuchExport { name: name.into() })?;
        let info = e.info(&self.inner.local);
        e.begin_removal(CloseMode::Drain);
        e.wait_detached().await;
        info!(export = name, bdev = %info.bdev_name, "NBD export removed");
        Ok(info)
    }

    /// Reacts to bdev `bdev_name` being hot-removed: every export of it is
    /// removed at once, requests in flight are answered with EIO and the
    /// connections close. Returns the names of the exports removed. Does not
    /// wait (it may be called from a bdev's event callback).
    pub fn bdev_removed(&self, bdev_name: &str) -> Vec<String> {
        self.inner.bdev_removed(bdev_name)
    }

    /// [`NbdServer::bdev_removed`] as a callback for a hot-removal subscription
    /// (`bdev::registry::BdevRegistry::subscribe`). It holds the server weakly:
    /// a subscription left behind never keeps a stopped server alive.
    pub fn hot_remove_handler(&self) -> impl Fn(&str) + Send + Sync + 'static {
        let weak = Arc::downgrade(&self.inner);
        move |bdev_name: &str| {
            if let Some(inner) = weak.upgrade() {
                inner.bdev_removed(bdev_name);
            }
        }
    }

    /// Every export, with its connection count.
    pub fn exports(&self) -> Vec<ExportInfo> {
        let ex: Vec<Arc<Export>> = self.inner.exports.lock().values().cloned().collect();
        ex.iter().map(|e| e.info(&self.inner.local)).collect()
    }

    /// One export.
    pub fn export(&self, name: &str) -> Option<ExportInfo> {
        let e = self.inner.exports.lock().get(name).cloned()?;
        Some(e.info(&self.inner.local))
    }

    /// Open connections, handshaking or not.
    pub fn connections(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Stops accepting, removes every export (draining its connections), closes
    /// connections still in the handshake, and waits until all are closed.
    pub async fn shutdown(&self) {
        self.stop();
        loop {
            let n = self.inner.conn_ended.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.inner.open.load(Ordering::Acquire) == 0 {
                break;
            }
            n.await;
        }
        info!(addr = %self.inner.local, "NBD server shut down");
    }

    fn stop(&self) {
        self.inner.closed.store(true, Ordering::Release);
        if let Some(t) = self.accept.lock().take() {
            t.abort();
        }
        for c in self.inner.handshaking.lock().values() {
            c.close(CloseMode::Drain);
        }
        let ex = std::mem::take(&mut *self.inner.exports.lock());
        for e in ex.values() {
            e.begin_removal(CloseMode::Drain);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(inner: Weak<Inner>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!("NBD accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(inner) = inner.upgrade() else { break };
        if inner.closed.load(Ordering::Acquire) {
            break;
        }
        if inner.open.load(Ordering::Acquire) >= inner.opts.max_connections {
            warn!(%peer, limit = inner.opts.max_connections, "NBD connection refused: too many connections");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let ctl = ConnCtl::new();
        inner.handshaking.lock().insert(id, ctl.clone());
        inner.open.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            debug!(%peer, id, "NBD connection accepted");
            let r = serve(&inner, stream, id, &ctl).await;
            inner.handshaking.lock().remove(&id);
            match r {
                Ok(why) => debug!(%peer, id, "NBD connection closed: {why}"),
                Err(e) => debug!(%peer, id, "NBD connection ended: {e}"),
            }
            inner.open.fetch_sub(1, Ordering::AcqRel);
            inner.conn_ended.notify_waiters();
        });
    }
}

/// Runs one connection to its end; says why it ended.
async fn serve(
    inner: &Arc<Inner>,
    mut stream: TcpStream,
    id: u64,
    ctl: &Arc<ConnCtl>,
) -> std::io::Result<&'static str> {
    let hs = tokio::time::timeout(
        inner.opts.handshake_timeout,
        handshake(inner, &mut stream, ctl),
    )
    .await;
    let (neg, output, leftover) = match hs {
        Err(_) => return Ok("handshake timed out"),
        Ok(r) => match r? {
            HsOutcome::Go(neg, output, leftover) => (neg, output, leftover),
            HsOutcome::Closed(why) => return Ok(why),
        },
    };
    let export = neg.export.clone();
    inner.handshaking.lock().remove(&id);
    // Attach before the final reply goes out: if the export was removed
    // meanwhile, the client never sees a successful GO.
    if ctl.mode() != CloseMode::Run || !export.attach(id, ctl.clone()) {
        return Ok("export removed during the handshake");
    }
    let r = async {
        // Tiny, but a client that never reads could block it: bounded like the
        // rest of the handshake, so that removal never waits on it for long.
        match tokio::time::timeout(inner.opts.handshake_timeout, stream.write_all(&output)).await {
            Ok(r) => r?,
            Err(_) => return Ok("handshake timed out"),
        }
        drive(&mut stream, neg, inner, ctl, leftover).await
    }
    .await;
    export.detach(id);
    if matches!(r, Ok(why) if why != CLIENT_GONE) {
        linger(&mut stream).await;
    }
    r
}

/// Closes gracefully: sends FIN after the last replies, then reads and drops
/// what the client still sends for a moment. Closing a socket with unread input
/// makes the kernel send RST, which can destroy replies the client has not read.
async fn linger(stream: &mut TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

enum HsOutcome {
    /// Negotiated; the final replies still to write; bytes already read past
    /// the handshake.
    Go(Negotiated, Vec<u8>, Vec<u8>),
    Closed(&'static str),
}

async fn handshake(
    inner: &Inner,
    stream: &mut TcpStream,
    ctl: &ConnCtl,
) -> std::io::Result<HsOutcome> {
    let mut hs = Handshake::new(inner.opts.max_payload);
    // Room for the largest option held whole, and then some.
    let mut buf = vec![0u8; MAX_OPTION_DATA as usize + 16 * 1024];
    let mut filled = 0;
    loop {
        if !hs.output().is_empty() {
            stream.write_all(hs.output()).await?;
            let n = hs.output().len();
            hs.consume_output(n);
        }
        if filled == buf.len() {
            // Cannot happen with a well-behaved handshake (options longer than
            // the buffer are skipped in pieces); refuse to spin on it.
            return Ok(HsOutcome::Closed("handshake buffer full"));
        }
        let n = tokio::select! {
            r = stream.read(&mut buf[filled..]) => r?,
            _ = ctl.wake.notified() => {
                if ctl.mode() != CloseMode::Run {
                    return Ok(HsOutcome::Closed("server shutting down"));
                }
                continue;
            }
        };
        if n == 0 {
            return Ok(HsOutcome::Closed("client closed during the handshake"));
        }
        filled += n;
        let (used, ev) = hs.on_bytes(&buf[..filled], inner);
        buf.copy_within(used..filled, 0);
        filled -= used;
        match ev {
            HsEvent::Continue => {}
            HsEvent::Go(neg) => {
                debug!(export = %neg.export.name(), structured = neg.structured, "NBD handshake done");
                return Ok(HsOutcome::Go(
                    neg,
                    hs.output().to_vec(),
                    buf[..filled].to_vec(),
                ));
            }
            HsEvent::Close(CloseReason::Abort) => {
                stream.write_all(hs.output()).await?;
                return Ok(HsOutcome::Closed("client aborted the handshake"));
            }
            HsEvent::Close(CloseReason::UnknownExport(name)) => {
                debug!(export = %name, "NBD_OPT_EXPORT_NAME for an unknown export");
                return Ok(HsOutcome::Closed("unknown export"));
            }
            HsEvent::Close(CloseReason::Protocol(why)) => {
                warn!("NBD handshake protocol error: {why}; closing");
                return Ok(HsOutcome::Closed(why));
            }
        }
    }
}

/// A bdev completion: tag, request, result.
type Done = (u64, BdevIo, Result<(), IoError>);

/// Completions delivered by the bdev to one connection, from any thread.
#[derive(Default)]
struct ConnSink {
    queue: Mutex<VecDeque<Done>>,
    /// Set while the driver sleeps, so completers only pay for a wake-up then.
    waiting: AtomicBool,
    wake: Notify,
}

impl IoSink for ConnSink {
    fn complete(&self, tag: u64, io: BdevIo, result: Result<(), IoError>) {
        self.queue.lock().push_back((tag, io, result));
        if self.waiting.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }
}

/// Receive staging buffer: many small requests per read system call.
const RBUF_LEN: usize = 256 * 1024;
/// A payload at least this long is read straight into its data buffer.
const DIRECT_PAYLOAD: usize = 32 * 1024;
/// Read-ahead into the staging buffer while large writes arrive: room for the
/// next header and a little more.
const SMALL_READ: usize = 4096;
/// Stop reading requests while this much reply data waits (the client is not
/// reading its replies).
const OUTPUT_HIGH_WATER: usize = 8 << 20;
/// Iovecs per vectored write.
const IOV_BATCH: usize = 128;
/// How long a closing connection waits for the client to close its side.
const LINGER: Duration = Duration::from_millis(500);
/// Why a connection ended when the client went away first.
const CLIENT_GONE: &str = "client closed the connection";

/// Reads what the socket has now, without waiting: `None` when nothing is
/// there. Goes through `poll_read` (with a waker that does nothing; the loop
/// waits with `ready()`) because tokio then notes a short read as "drained"
/// and the next wait blocks at once, where `try_read` would need one more
/// system call to see EAGAIN.
fn read_now(stream: &mut TcpStream, buf: &mut [u8]) -> Option<std::io::Result<usize>> {
    let mut rb = tokio::io::ReadBuf::new(buf);
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(stream).poll_read(&mut cx, &mut rb) {
        Poll::Ready(Ok(())) => Some(Ok(rb.filled().len())),
        Poll::Ready(Err(e)) => Some(Err(e)),
        Poll::Pending => None,
    }
}

/// Writes what the socket takes now, without waiting (see [`read_now`]).
fn write_now(stream: &mut TcpStream, iov: &[IoSlice<'_>]) -> Option<std::io::Result<usize>> {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(stream).poll_write_vectored(&mut cx, iov) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

/// Runs the transmission phase until the connection is done.
async fn drive(
    stream: &mut TcpStream,
    neg: Negotiated,
    inner: &Inner,
    ctl: &ConnCtl,
    leftover: Vec<u8>,
) -> std::io::Result<&'static str> {
    let o = &inner.opts;
    let limits = TxLimits {
        max_payload: o.max_payload,
        max_requests: o.max_requests,
        buffer_budget: o.buffer_budget,
    };
    let mut tx = Transmission::new(&neg, limits);
    drop(neg);
    let bdev = tx.bdev().clone();
    let sink = Arc::new(ConnSink::default());
    let sink_dyn: Arc<dyn IoSink> = sink.clone();
    let mut rbuf = vec![0u8; RBUF_LEN.max(leftover.len())];
    rbuf[..leftover.len()].copy_from_slice(&leftover);
    let mut filled = leftover.len();
    let mut actions: Vec<Submit> = Vec::with_capacity(o.max_requests as usize);
    let mut completions = VecDeque::with_capacity(o.max_requests as usize);
    let mut seen = CloseMode::Run;
    let mut deadline: Option<Instant> = None;
    let mut eof = false;
    // Staged requests wait for a slot or buffer budget; a completion in some
    // later pass frees them, and no socket event will announce that.
    let mut stalled = false;

    loop {
        // Close requests from the export (removal, hot-remove).
        let mode = ctl.mode();
        if mode != seen {
            seen = mode;
            match mode {
                CloseMode::Drain => {
                    tx.drain();
                    deadline = Some(Instant::now() + o.drain_timeout);
                }
                CloseMode::Abort => {
                    tx.abort();
                    deadline = Some(Instant::now() + o.abort_flush_timeout);
                }
                CloseMode::Run => {}
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if seen == CloseMode::Drain {
                warn!(export = %bdev.name(), "requests still in flight after the drain timeout; aborting them");
                ctl.close(CloseMode::Abort);
                continue;
            }
            return Ok("closing timed out");
        }

        // 1. Input: what the socket has, and what is staged.
        if !eof && tx.wants_input() && tx.pending_output() < OUTPUT_HIGH_WATER {
            let direct = filled == 0 && tx.payload_remaining() >= DIRECT_PAYLOAD;
            if direct {
                // A large write payload goes straight into its buffer.
                if let Some(t) = tx.payload_target() {
                    match read_now(stream, t) {
                        Some(Ok(0)) => eof = true,
                        Some(Ok(n)) => tx.payload_received(n, &mut actions),
                        Some(Err(e)) => return Err(e),
                        None => {}
                    }
                }
            } else if filled < rbuf.len() {
                // After a large write read little ahead: the next request is
                // likely one too, and its payload should then go straight into
                // its buffer rather than through this one (a second copy).
                let end = if tx.last_write_len() as usize >= DIRECT_PAYLOAD {
                    rbuf.len().min(filled + tx.payload_remaining() + SMALL_READ)
                } else {
                    rbuf.len()
                };
                match read_now(stream, &mut rbuf[filled..end]) {
                    Some(Ok(0)) => eof = true,
                    Some(Ok(n)) => filled += n,
                    Some(Err(e)) => return Err(e),
                    None => {}
                }
            }
        }
        if filled > 0 && tx.wants_input() {
            let used = tx.on_bytes(&rbuf[..filled], &mut actions);
            if used > 0 {
                rbuf.copy_within(used..filled, 0);
                filled -= used;
            }
            stalled = !tx.wants_input();
        }

        // 2. Submit, and collect completions until quiet (malloc completes inline).
        loop {
            for a in actions.drain(..) {
                bdev.submit(a.io, Completion::new(sink_dyn.clone(), a.tag));
            }
            std::mem::swap(&mut completions, &mut *sink.queue.lock());
            if completions.is_empty() {
                break;
            }
            for (tag, io, r) in completions.drain(..) {
                tx.on_completion(tag, io, r, &mut actions);
            }
        }

        // 3. Output, batched into one vectored write.
        if tx.pending_output() > 0 {
            let mut iov = [IoSlice::new(&[]); IOV_BATCH];
            let n = tx.fill_iovecs(&mut iov);
            match write_now(stream, &iov[..n]) {
                Some(Ok(w)) => tx.consume_output(w),
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }

        if tx.is_finished() {
            return Ok(match tx.mode() {
                crate::transmission::Mode::Failed(why) => why,
                crate::transmission::Mode::Disconnecting => "client disconnected",
                crate::transmission::Mode::Aborted => "bdev removed",
                _ => "export removed",
            });
        }
        if eof {
            // The client is gone: replies have nowhere to go, and bdev I/O in
            // flight completes into a sink nobody reads.
            return Ok(CLIENT_GONE);
        }
        if stalled && tx.wants_input() && filled > 0 {
            continue;
        }

        // 4. Wait for the socket, a completion, a close request or a deadline.
        // When the socket is known ready this returns at once; its readiness
        // counts against tokio's cooperative budget, so a busy connection
        // still lets others on the same thread run.
        sink.waiting.store(true, Ordering::SeqCst);
        if !sink.queue.lock().is_empty() {
            sink.waiting.store(false, Ordering::SeqCst);
            continue;
        }
        let want_read = !eof
            && tx.wants_input()
            && filled < rbuf.len()
            && tx.pending_output() < OUTPUT_HIGH_WATER;
        let want_write = tx.pending_output() > 0;
        let interest = match (want_read, want_write) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        };
        let sleep_until = deadline.map(tokio::time::Instant::from_std);
        let r = tokio::select! {
            biased;
            r = async {
                match interest {
                    Some(i) => stream.ready(i).await.map(|_| ()),
                    None => std::future::pending().await,
                }
            } => r,
            _ = sink.wake.notified() => Ok(()),
            _ = ctl.wake.notified() => Ok(()),
            _ = async {
                match sleep_until {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => Ok(()),
        };
        sink.waiting.store(false, Ordering::SeqCst);
        r?;
    }
}
