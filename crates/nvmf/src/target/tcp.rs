//! The TCP shell of the target: listening sockets, one task per connection
//! driving a [`Connection`], and the keep-alive reaper.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{BdevIo, Completion, IoError, IoSink};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::conn::{Action, Connection, QueueIdentity};
use super::{ListenAddress, Target, TargetError};

/// A completed I/O: the connection's tag, the request, and its result.
type Done = (u64, BdevIo, Result<(), IoError>);

/// Completions delivered by bdevs to one connection, possibly from other threads.
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

/// A connection as `nvmf_subsystem_get_qpairs` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct QpairInfo {
    pub id: u64,
    pub peer: String,
    pub listen_address: ListenAddress,
    pub cntlid: u16,
    pub qid: u16,
    pub sqsize: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

struct ListenerEntry {
    local: SocketAddr,
    subsystems: BTreeSet<String>,
    task: JoinHandle<()>,
}

struct ConnEntry {
    identity: Option<QueueIdentity>,
    peer: String,
    listen: ListenAddress,
    close: Arc<super::ctrlr::QueueCtl>,
}

/// The target's TCP transport.
pub struct TcpTarget {
    target: Arc<Target>,
    listeners: Mutex<BTreeMap<String, ListenerEntry>>,
    conns: Arc<Mutex<BTreeMap<u64, ConnEntry>>>,
    next_conn: AtomicU64,
    reaper: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for TcpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTarget").finish_non_exhaustive()
    }
}

/// How long an orderly shutdown waits for a queue's commands in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the keep-alive deadlines are checked (the KAS granularity).
const KEEP_ALIVE_TICK: Duration = Duration::from_millis(100);

impl TcpTarget {
    /// Creates the transport and starts the keep-alive reaper. Needs a tokio runtime.
    pub fn new(target: Arc<Target>) -> Arc<Self> {
        let t = Arc::new(TcpTarget {
            target: target.clone(),
            listeners: Mutex::new(BTreeMap::new()),
            conns: Arc::new(Mutex::new(BTreeMap::new())),
            next_conn: AtomicU64::new(1),
            reaper: Mutex::new(None),
        });
        let weak = Arc::downgrade(&target);
        let h = tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEEP_ALIVE_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(t) = weak.upgrade() else { break };
                t.check_keep_alive(Instant::now());
            }
        });
        *t.reaper.lock() = Some(h);
        t
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// Lets subsystem `nqn` be reached at `addr`, opening the socket if no other
    /// subsystem listens there yet. A port of "0" binds an ephemeral port; the
    /// address actually used is returned.
    pub async fn add_listener(
        self: &Arc<Self>,
        nqn: &str,
        addr: ListenAddress,
    ) -> Result<ListenAddress, TargetError> {
        if self.target.subsystem(nqn).is_none() {
            return Err(TargetError::NoSuchSubsystem { nqn: nqn.into() });
        }
        let key = addr.socket_addr_string();
        let existing = self.listeners.lock().get(&key).map(|l| l.local);
        let local = match existing {
            Some(l) => l,
            None => {
                let sock = TcpListener::bind(&key)
                    .await
                    .map_err(|e| TargetError::Listen {
                        addr: key.clone(),
                        why: e.to_string(),
                    })?;
                let local = sock.local_addr().map_err(|e| TargetError::Listen {
                    addr: key.clone(),
                    why: e.to_string(),
                })?;
                let actual = ListenAddress {
                    trsvcid: local.port().to_string(),
                    ..addr.clone()
                };
                let me = Arc::downgrade(self);
                let la = actual.clone();
                let task = tokio::spawn(async move { accept_loop(me, sock, la).await });
                info!(addr = %actual, "NVMe/TCP target listening");
                let k = actual.socket_addr_string();
                self.listeners.lock().insert(
                    k,
                    ListenerEntry {
                        local,
                        subsystems: BTreeSet::new(),
                        task,
                    },
                );
                local
            }
        };
        let actual = ListenAddress {
            trsvcid: local.port().to_string(),
            ..addr
        };
        self.target.add_listener(nqn, actual.clone())?;
        if let Some(l) = self.listeners.lock().get_mut(&actual.socket_addr_string()) {
            l.subsystems.insert(nqn.to_string());
        }
        Ok(actual)
    }

    /// Stops subsystem `nqn` listening on `addr`: its connections through that
    /// address are closed, and the socket too if no subsystem uses it any more.
    pub fn remove_listener(&self, nqn: &str, addr: &ListenAddress) -> Result<(), TargetError> {
        self.target.remove_listener(nqn, addr)?;
        let key = addr.socket_addr_string();
        let mut ls = self.listeners.lock();
        if let Some(l) = ls.get_mut(&key) {
            l.subsystems.remove(nqn);
            if l.subsystems.is_empty() {
                if let Some(l) = ls.remove(&key) {
                    l.task.abort();
                    info!(addr = %addr, "NVMe/TCP listener closed");
                }
            }
        }
        drop(ls);
        for c in self.conns.lock().values() {
            let same_sub = c.identity.as_ref().is_some_and(|i| i.subnqn == nqn);
            if same_sub && addr.matches(&c.listen) {
                c.close.close("listener removed");
            }
        }
        Ok(())
    }

    /// Deletes a subsystem, closing its listeners' sockets where unused.
    pub fn delete_subsystem(&self, nqn: &str) -> Result<(), TargetError> {
        let s = self.target.delete_subsystem(nqn)?;
        let mut ls = self.listeners.lock();
        for a in s.listeners() {
            let key = a.socket_addr_string();
            if let Some(l) = ls.get_mut(&key) {
                l.subsystems.remove(nqn);
                if l.subsystems.is_empty() {
                    if let Some(l) = ls.remove(&key) {
                        l.task.abort();
                    }
                }
            }
        }
        Ok(())
    }

    /// Local addresses with an open socket.
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.listeners.lock().values().map(|l| l.local).collect()
    }

    /// Connections of subsystem `nqn` (all connected ones if None).
    pub fn qpairs(&self, nqn: Option<&str>) -> Vec<QpairInfo> {
        self.conns
            .lock()
            .iter()
            .filter_map(|(id, c)| {
                let i = c.identity.as_ref()?;
                if nqn.is_some_and(|n| n != i.subnqn) {
                    return None;
                }
                Some(QpairInfo {
                    id: *id,
                    peer: c.peer.clone(),
                    listen_address: c.listen.clone(),
                    cntlid: i.cntlid,
                    qid: i.qid,
                    sqsize: i.sqsize,
                    subnqn: i.subnqn.clone(),
                    hostnqn: i.hostnqn.clone(),
                })
            })
            .collect()
    }

    /// Number of open connections (connected or not).
    pub fn num_connections(&self) -> usize {
        self.conns.lock().len()
    }

    /// Closes every listener and connection.
    pub fn shutdown(&self) {
        for (_, l) in std::mem::take(&mut *self.listeners.lock()) {
            l.task.abort();
        }
        for c in self.conns.lock().values() {
            c.close.close_draining("target shutting down");
        }
        if let Some(h) = self.reaper.lock().take() {
            h.abort();
        }
    }
}

impl Drop for TcpTarget {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept_loop(me: std::sync::Weak<TcpTarget>, sock: TcpListener, listen: ListenAddress) {
    loop {
        let (stream, peer) = match sock.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!(addr = %listen, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(t) = me.upgrade() else { break };
        let _ = stream.set_nodelay(true);
        let id = t.next_conn.fetch_add(1, Ordering::Relaxed);
        let conn = Connection::new(t.target.clone(), listen.clone(), peer.to_string());
        t.conns.lock().insert(
            id,
            ConnEntry {
                identity: None,
                peer: peer.to_string(),
                listen: listen.clone(),
                close: conn.queue_ctl().clone(),
            },
        );
        let conns = t.conns.clone();
        let poll = Duration::from_micros(t.target.opts().io_poll_us as u64);
        drop(t);
        tokio::spawn(async move {
            debug!(%peer, "connection accepted");
            let r = drive(stream, conn, &conns, id, poll).await;
            conns.lock().remove(&id);
            match r {
                Ok(()) => debug!(%peer, "connection closed"),
                Err(e) => debug!(%peer, "connection ended: {e}"),
            }
        });
    }
}

/// Runs one connection until it closes.
async fn drive(
    stream: TcpStream,
    mut conn: Connection,
    conns: &Mutex<BTreeMap<u64, ConnEntry>>,
    id: u64,
    poll: Duration,
) -> std::io::Result<()> {
    let sink = Arc::new(ConnSink::default());
    let sink_dyn: Arc<dyn IoSink> = sink.clone();
    let qctl = conn.queue_ctl().clone();
    let cap = (conn.max_pdu_len() * 2).max(256 * 1024);
    let mut rbuf = vec![0u8; cap];
    let mut filled = 0usize;
    let mut actions: Vec<Action> = Vec::with_capacity(256);
    let mut completions = VecDeque::new();
    let mut identified = false;
    let mut drain_until: Option<Instant> = None;
    let mut stop_reading = false;
    let mut io_queue = false;
    let mut eof = false;
    // Stop reading while this much output is queued (the peer is not reading).
    const OUTPUT_HIGH_WATER: usize = 4 << 20;

    let result = loop {
        // 1. Read what the socket has.
        let mut progressed = false;
        // The socket may hold more than the buffer took.
        let mut more_input = false;
        if !eof && !stop_reading && !conn.is_closing() && conn.pending_output() < OUTPUT_HIGH_WATER
        {
            loop {
                if filled == rbuf.len() {
                    more_input = true;
                    break;
                }
                let space = rbuf.len() - filled;
                let mut got = None;
                let r = stream.try_io(Interest::READABLE, || {
                    let n = stream.try_read(&mut rbuf[filled..])?;
                    got = Some(n);
                    if n > 0 && n < space {
                        // A short read drained the socket. Report WouldBlock so
                        // that tokio clears the readiness it saw before the
                        // read (data arriving later raises a new one): the
                        // next attempt then sleeps in epoll instead of paying
                        // for a recv that returns EAGAIN.
                        return Err(std::io::ErrorKind::WouldBlock.into());
                    }
                    Ok(n)
                });
                match (got, r) {
                    (Some(0), _) => {
                        eof = true;
                        break;
                    }
                    (Some(n), _) => {
                        filled += n;
                        progressed = true;
                        if n < space {
                            break;
                        }
                    }
                    (None, Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    (None, Err(e)) => {
                        break_with(&mut eof, e);
                        break;
                    }
                    (None, Ok(_)) => break,
                }
            }
            if filled > 0 {
                let now = Instant::now();
                let used = conn.on_bytes(&rbuf[..filled], now, &mut actions);
                if used > 0 {
                    rbuf.copy_within(used..filled, 0);
                    filled -= used;
                }
            }
        }
        if !identified {
            if let Some(i) = conn.identity() {
                io_queue = i.qid != 0;
                if let Some(e) = conns.lock().get_mut(&id) {
                    e.identity = Some(i);
                }
                identified = true;
            }
        }
        // 2. Submit and collect completions until quiet (malloc completes inline).
        loop {
            for a in actions.drain(..) {
                let Action::Submit { bdev, io, tag } = a;
                bdev.submit(io, Completion::new(sink_dyn.clone(), tag));
            }
            std::mem::swap(&mut completions, &mut *sink.queue.lock());
            if completions.is_empty() {
                break;
            }
            progressed = true;
            for (tag, io, r) in completions.drain(..) {
                conn.on_completion(tag, io, r, &mut actions);
            }
        }
        if qctl.is_closing() {
            // An orderly shutdown answers the commands already handed to a
            // bdev (bounded), taking no new ones. Anything else (keep-alive
            // expiry, reset, subsystem or listener removed) closes at once,
            // without answering, as SPDK disconnects a qpair; the host retries
            // those commands on its next connection.
            let drain_deadline = *drain_until.get_or_insert_with(|| Instant::now() + DRAIN_TIMEOUT);
            let busy = conn.executing() > 0 || conn.pending_output() > 0;
            if !(qctl.is_draining() && busy && Instant::now() < drain_deadline) {
                info!(peer = %conn.peer(), reason = ?qctl.close_reason(), "closing queue");
                break Ok(());
            }
            stop_reading = true;
        }
        conn.poll_events();
        // 3. Write what is pending.
        if conn.pending_output() > 0 {
            let mut iov = [IoSlice::new(&[]); 64];
            let n = conn.fill_iovecs(&mut iov);
            match stream.try_write_vectored(&iov[..n]) {
                Ok(w) => {
                    conn.consume_output(w, &mut actions);
                    if w > 0 {
                        progressed = true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => break Err(e),
            }
            if !actions.is_empty() {
                continue;
            }
        }
        if conn.is_closing() && conn.pending_output() == 0 {
            break Ok(());
        }
        if eof && (conn.pending_output() == 0 || conn.is_closing()) {
            break Ok(());
        }
        if progressed && more_input {
            // The socket holds more: yield so other connections on this thread
            // run, then go on. Otherwise the socket is drained and the wait
            // below is the yield (without an extra epoll_wait and recv).
            tokio::task::yield_now().await;
            continue;
        }
        // 4. Busy-poll the socket for a while (I/O queues, when configured),
        if !poll.is_zero() && !eof && conn.pending_output() == 0 && filled < rbuf.len() && io_queue
        {
            match poll_socket(
                &stream,
                &mut rbuf[filled..],
                &sink,
                &qctl,
                Instant::now() + poll,
            ) {
                Polled::Data(n) => {
                    filled += n;
                    // This path skips the waits below: take part in tokio's
                    // cooperative budget so that other tasks still run.
                    tokio::task::consume_budget().await;
                    continue;
                }
                Polled::Eof => {
                    eof = true;
                    continue;
                }
                Polled::Event => continue,
                Polled::Quiet => {}
            }
        }
        // 5. then sleep until the socket, a completion or a close request wakes us.
        sink.waiting.store(true, Ordering::SeqCst);
        if !sink.queue.lock().is_empty() {
            sink.waiting.store(false, Ordering::SeqCst);
            continue;
        }
        let want_write = conn.pending_output() > 0;
        let want_read = !eof
            && !stop_reading
            && !conn.is_closing()
            && conn.pending_output() < OUTPUT_HIGH_WATER;
        let interest = match (want_read, want_write) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        };
        tokio::select! {
            r = async {
                match interest {
                    Some(i) => stream.ready(i).await.map(|_| ()),
                    None => std::future::pending().await,
                }
            } => {
                if let Err(e) = r {
                    sink.waiting.store(false, Ordering::SeqCst);
                    break Err(e);
                }
            }
            _ = sink.wake.notified() => {}
            _ = qctl.wake.notified() => {}
        }
        sink.waiting.store(false, Ordering::SeqCst);
    };
    conn.on_close();
    let _ = stream
        .into_std()
        .map(|s| s.shutdown(std::net::Shutdown::Both));
    result
}

/// What busy-polling a socket found.
enum Polled {
    /// Bytes received (already in the buffer).
    Data(usize),
    Eof,
    /// A completion or a close request arrived (or a socket error, which the
    /// normal read path reports).
    Event,
    /// Nothing within the window.
    Quiet,
}

/// Receives without waiting until bytes arrive, a completion or a close
/// request shows up, or `until` passes. Reads the socket directly (tokio only
/// learns of new data from epoll, which this avoids); the readiness tokio
/// then gets costs one spurious wake-up later, after the window.
fn poll_socket(
    stream: &TcpStream,
    buf: &mut [u8],
    sink: &ConnSink,
    qctl: &super::ctrlr::QueueCtl,
    until: Instant,
) -> Polled {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let mut spins = 0u32;
    loop {
        // SAFETY: `fd` is the open socket `stream` owns for the whole call, and
        // `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            return Polled::Data(n as usize);
        }
        if n == 0 {
            return Polled::Eof;
        }
        let e = std::io::Error::last_os_error();
        if !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ) {
            return Polled::Event;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(16) {
            if !sink.queue.lock().is_empty() || qctl.is_closing() {
                return Polled::Event;
            }
            if Instant::now() >= until {
                return Polled::Quiet;
            }
        }
        std::hint::spin_loop();
    }
}

fn break_with(eof: &mut bool, e: std::io::Error) {
    debug!("read error: {e}");
    *eof = true;
}
