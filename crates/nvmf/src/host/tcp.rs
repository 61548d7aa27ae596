//! Sockets for the host: TCP connect, ICReq/ICResp, the Connect command, and
//! the loops that drive a [`QueueCore`].
//!
//! A [`Link`] is one connected queue: a non-blocking socket registered with
//! tokio ([`AsyncFd`]), a large receive buffer, and the queue's state machine.
//! Sends are vectored (`writev` of headers from the header buffer and data
//! straight from the requests' buffers); receives read as much as the buffer
//! holds and, for the bulk of a large C2HData, straight into the destination.
//!
//! Two ways to drive a link:
//! - [`run_queue`]: the tokio task behind each queue of a `HostController`.
//!   Requests arrive from any thread through a [`QueueShared`] inbox.
//! - [`IoQpair`]: a queue that one task owns and drives itself (submit, then
//!   [`IoQpair::process_completions`] or [`IoQpair::poll`]) with no hop
//!   between tasks, for load generators (SPDK's `spdk_nvme_qpair` model).

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{IoBuf, IoError};
use nvme_wire::fabrics::{ConnectCmd, ConnectData};
use nvme_wire::pdu::{Decoded, Decoder, Encoder, IcReq, PduHeader, IC_LEN};
use nvme_wire::{Cqe, DigestConfig};
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, Notify};

use super::queue::{
    CmdError, Command, DataDir, Done, IoCmd, QueueConfig, QueueCore, QueueError, Request,
};
use super::HostError;
use crate::TransportId;

/// Receive buffer per queue: several 128 KiB C2HData PDUs per read when they stream.
const RX_BUF: usize = 256 * 1024;
/// A C2HData remainder at least this large is received straight into its buffer.
const DIRECT_MIN: usize = 8 * 1024;
/// Slices per `writev`.
const IOV_BATCH: usize = 128;
/// How often a managed queue looks for commands past their deadline.
const TICK: Duration = Duration::from_millis(100);

/// What ended a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("connection closed by the controller")]
    Closed,
}

impl LinkError {
    pub(crate) fn into_host(self, trid: &TransportId, qid: u16) -> HostError {
        match self {
            LinkError::Io(source) => HostError::Io {
                trid: trid.clone(),
                qid,
                source,
            },
            LinkError::Queue(source) => HostError::Queue {
                trid: trid.clone(),
                source: Box::new(source),
            },
            LinkError::Closed => HostError::Closed {
                trid: trid.clone(),
                qid,
            },
        }
    }
}

/// One connected queue: socket, receive buffer, and protocol state.
pub(crate) struct Link<C> {
    fd: AsyncFd<TcpStream>,
    st: LinkState<C>,
}

struct LinkState<C> {
    core: QueueCore<C>,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    done: Vec<Done<C>>,
    /// The last send stopped on a full socket.
    tx_blocked: bool,
}

impl<C> std::fmt::Debug for Link<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("core", &self.st.core).finish()
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl<C> LinkState<C> {
    /// Sends queued PDUs until done or the socket is full. `Ok(true)`: all sent.
    fn flush(&mut self, sock: &TcpStream) -> io::Result<bool> {
        while self.core.tx_pending() {
            let r = {
                let mut iov = [IoSlice::new(&[]); IOV_BATCH];
                let k = self.core.tx_iovecs(&mut iov);
                (&*sock).write_vectored(&iov[..k])
            };
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.core.tx_advance(n, &mut self.done),
                Err(e) if would_block(&e) => {
                    self.tx_blocked = true;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.tx_blocked = false;
        Ok(true)
    }

    /// Reads what the socket holds and feeds it to the queue, until the socket
    /// is drained. Returns the bytes read.
    fn read_process(&mut self, sock: &TcpStream) -> Result<usize, LinkError> {
        let mut total = 0;
        loop {
            if self.rx_start == self.rx_end {
                self.rx_start = 0;
                self.rx_end = 0;
                if let Some(dst) = self.core.rx_direct() {
                    if dst.len() >= DIRECT_MIN {
                        let dl = dst.len();
                        let mut iov = [IoSliceMut::new(dst), IoSliceMut::new(&mut self.rx[..])];
                        let n = match (&*sock).read_vectored(&mut iov) {
                            Ok(0) => return Err(LinkError::Closed),
                            Ok(n) => n,
                            Err(e) if would_block(&e) => return Ok(total),
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e.into()),
                        };
                        total += n;
                        let d = n.min(dl);
                        self.core.rx_direct_done(d, &mut self.done);
                        self.rx_end = n - d;
                        self.consume()?;
                        if n < dl + self.rx.len() {
                            // The socket had less than we could take: drained for now.
                            return Ok(total);
                        }
                        continue;
                    }
                }
            } else if self.rx.len() - self.rx_end < 4096 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            let space = self.rx.len() - self.rx_end;
            let n = match (&*sock).read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return Err(LinkError::Closed),
                Ok(n) => n,
                Err(e) if would_block(&e) => return Ok(total),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            total += n;
            self.rx_end += n;
            self.consume()?;
            if n < space {
                // The socket had less than we could take: it is drained for now,
                // and new data raises a new readiness edge.
                return Ok(total);
            }
        }
    }

    fn consume(&mut self) -> Result<(), QueueError> {
        if self.rx_end > self.rx_start {
            let used = self
                .core
                .on_bytes(&self.rx[self.rx_start..self.rx_end], &mut self.done)?;
            self.rx_start += used;
        }
        Ok(())
    }
}

impl<C> Link<C> {
    fn new(fd: AsyncFd<TcpStream>, core: QueueCore<C>) -> Self {
        Link {
            fd,
            st: LinkState {
                core,
                rx: vec![0u8; RX_BUF].into_boxed_slice(),
                rx_start: 0,
                rx_end: 0,
                done: Vec::with_capacity(64),
                tx_blocked: false,
            },
        }
    }

    /// Moves the socket and any bytes already received to a queue of another context type.
    fn with_core<D>(self, core: QueueCore<D>) -> Link<D> {
        let st = self.st;
        Link {
            fd: self.fd,
            st: LinkState {
                core,
                rx: st.rx,
                rx_start: st.rx_start,
                rx_end: st.rx_end,
                done: Vec::with_capacity(64),
                tx_blocked: false,
            },
        }
    }

    pub(crate) fn qid(&self) -> u16 {
        self.st.core.config().qid
    }

    pub(crate) fn core(&self) -> &QueueCore<C> {
        &self.st.core
    }

    /// Non-blocking progress: send, receive, send again (R2T answers).
    fn progress(&mut self) -> Result<(), LinkError> {
        let sock = self.fd.get_ref();
        self.st.flush(sock)?;
        self.st.read_process(sock)?;
        if self.st.core.tx_pending() {
            self.st.flush(sock)?;
        }
        Ok(())
    }

    /// Waits until the socket is readable, or writable while sends are blocked,
    /// then makes progress.
    async fn wait_progress(&mut self) -> Result<(), LinkError> {
        if self.st.tx_blocked {
            tokio::select! {
                r = self.fd.readable() => {
                    let mut g = r?;
                    g.clear_ready();
                    drop(g);
                }
                r = self.fd.writable() => {
                    let mut g = r?;
                    g.clear_ready();
                    drop(g);
                }
            }
        } else {
            let mut g = self.fd.readable().await?;
            g.clear_ready();
        }
        self.progress()
    }

    /// Runs one request to completion on an otherwise idle link (connect-time use).
    async fn exec_one(&mut self, req: Request<C>) -> Result<Done<C>, LinkError> {
        if let Err(r) = self.st.core.submit(req, Instant::now(), &mut self.st.done) {
            // The queue has room for at least one request; this cannot happen.
            drop(r);
            return Err(LinkError::Io(io::Error::other(
                "queue full on an idle link",
            )));
        }
        loop {
            // A controller may answer and close at once (a rejected Connect):
            // the answer counts before the close.
            let r = self.progress();
            if let Some(d) = self.st.done.pop() {
                return Ok(d);
            }
            r?;
            let r = self.wait_progress().await;
            if let Some(d) = self.st.done.pop() {
                return Ok(d);
            }
            r?;
            self.st.core.check_timeouts(Instant::now())?;
        }
    }

    /// Best effort: tells the controller why we are closing.
    fn send_term_req(&self, err: &LinkError) {
        if let LinkError::Queue(q) = err {
            if let Some(b) = q.term_req() {
                let _ = self.fd.get_ref().write(&b);
            }
        }
    }
}

/// What a queue needs to connect.
#[derive(Debug, Clone)]
pub(crate) struct ConnectParams {
    pub trid: TransportId,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub qid: u16,
    /// Commands in flight at most; Connect's SQSIZE (0's based) is set to this.
    pub depth: u16,
    pub max_requests: u16,
    pub kato_ms: u32,
    /// 0xFFFF on the admin queue (dynamic model); the granted one on I/O queues.
    pub cntlid: u16,
    pub digest: DigestConfig,
    pub timeout: Duration,
    pub icd_max: usize,
    pub max_xfer: usize,
    pub cmd_timeout: Duration,
}

async fn write_all(fd: &AsyncFd<TcpStream>, mut b: &[u8]) -> io::Result<()> {
    while !b.is_empty() {
        let mut g = fd.writable().await?;
        match g.try_io(|s| s.get_ref().write(b)) {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => b = &b[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

async fn read_exact(fd: &AsyncFd<TcpStream>, b: &mut [u8]) -> Result<(), LinkError> {
    let mut got = 0;
    while got < b.len() {
        let mut g = fd.readable().await?;
        match g.try_io(|s| s.get_ref().read(&mut b[got..])) {
            Ok(Ok(0)) => return Err(LinkError::Closed),
            Ok(Ok(n)) => got += n,
            Ok(Err(e)) => return Err(e.into()),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Connects one queue: TCP (with TCP_NODELAY), ICReq/ICResp, Connect. Returns
/// the link and the controller id the Connect response carries. Bounded by
/// `p.timeout` as a whole.
pub(crate) async fn connect_queue<C>(p: &ConnectParams) -> Result<(Link<C>, u16), HostError> {
    match tokio::time::timeout(p.timeout, connect_inner(p)).await {
        Ok(r) => r,
        Err(_) => Err(HostError::Timeout {
            trid: p.trid.clone(),
            what: format!("connect of qid {}", p.qid),
            after: p.timeout,
        }),
    }
}

async fn connect_inner<C>(p: &ConnectParams) -> Result<(Link<C>, u16), HostError> {
    let trid = &p.trid;
    let qid = p.qid;
    let cerr = |source| HostError::Connect {
        trid: trid.clone(),
        qid,
        source,
    };
    let hs = |reason: String| HostError::Handshake {
        trid: trid.clone(),
        qid,
        reason,
    };
    let stream = tokio::net::TcpStream::connect(trid.socket_addr_string())
        .await
        .map_err(cerr)?;
    stream.set_nodelay(true).map_err(cerr)?;
    let std = stream.into_std().map_err(cerr)?;
    std.set_nonblocking(true).map_err(cerr)?;
    // SAFETY: `std` is an open socket that the AsyncFd owns from here on; its
    // descriptor stays open and the same until the AsyncFd is dropped.
    let fd = unsafe { AsyncFd::register(std) }.map_err(|e| cerr(e.into()))?;

    let mut ic = Vec::with_capacity(IC_LEN);
    let icreq = IcReq {
        pfv: 0,
        hpda: 0,
        digest: p.digest,
        maxr2t: 0,
    };
    Encoder::default().pdu(&PduHeader::ICReq(icreq), 0, &[], &mut ic);
    write_all(&fd, &ic).await.map_err(cerr)?;
    let mut resp = [0u8; IC_LEN];
    if let Err(e) = read_exact(&fd, &mut resp[..8]).await {
        return Err(e.into_host(trid, qid));
    }
    let plen = u32::from_le_bytes([resp[4], resp[5], resp[6], resp[7]]) as usize;
    if resp[0] == nvme_wire::PduType::C2HTermReq as u8 {
        let mut t = [0u8; 24];
        t[..8].copy_from_slice(&resp[..8]);
        if plen >= 24 {
            let _ = read_exact(&fd, &mut t[8..]).await;
        }
        let fes = u16::from_le_bytes([t[8], t[9]]);
        return Err(hs(format!(
            "controller answered ICReq with C2HTermReq (fes {fes})"
        )));
    }
    if plen != IC_LEN {
        return Err(hs(format!(
            "ICResp plen {plen} (pdu type {:#04x})",
            resp[0]
        )));
    }
    if let Err(e) = read_exact(&fd, &mut resp[8..]).await {
        return Err(e.into_host(trid, qid));
    }
    let icresp = match Decoder::new(0).decode(&resp) {
        Ok(Decoded::Pdu(pdu)) => match pdu.header {
            PduHeader::ICResp(r) => r,
            h => return Err(hs(format!("expected ICResp, got {:?}", h.pdu_type()))),
        },
        Ok(Decoded::Need(_)) => return Err(hs("short ICResp".into())),
        Err(e) => return Err(hs(format!("bad ICResp: {e}"))),
    };
    if icresp.pfv != 0 {
        return Err(hs(format!("ICResp pfv {} (only 0 is known)", icresp.pfv)));
    }
    if icresp.maxh2cdata < 4096 {
        return Err(hs(format!(
            "ICResp maxh2cdata {} < 4096",
            icresp.maxh2cdata
        )));
    }
    if icresp.cpda > 31 {
        return Err(hs(format!("ICResp cpda {} > 31", icresp.cpda)));
    }
    if (icresp.digest.header && !p.digest.header) || (icresp.digest.data && !p.digest.data) {
        return Err(hs(format!(
            "ICResp enables digests that were not asked for ({:?} vs {:?})",
            icresp.digest, p.digest
        )));
    }

    let cfg = |qid: u16, depth: u16, max_requests: u16| QueueConfig {
        qid,
        depth,
        max_requests,
        icd_max: if qid == 0 {
            super::queue::ADMIN_ICD_MAX
        } else {
            p.icd_max
        },
        maxh2cdata: icresp.maxh2cdata as usize,
        digest: icresp.digest,
        cpda: icresp.cpda,
        max_xfer: p.max_xfer,
        cmd_timeout: p.cmd_timeout,
    };
    let mut link: Link<()> = Link::new(fd, QueueCore::new(cfg(qid, 1, 1)));
    let cmd = ConnectCmd {
        recfmt: 0,
        qid,
        sqsize: p.depth,
        cattr: 0,
        kato: if qid == 0 { p.kato_ms } else { 0 },
    };
    let data = ConnectData {
        hostid: p.hostid,
        cntlid: p.cntlid,
        subnqn: trid.subnqn.clone(),
        hostnqn: p.hostnqn.clone(),
    };
    let req = Request::new(
        Command::Raw {
            sqe: cmd.to_sqe(0),
            dir: DataDir::ToCtrl,
        },
        IoBuf::from_slice(&data.to_bytes()),
        (),
    );
    let d = link
        .exec_one(req)
        .await
        .map_err(|e| e.into_host(trid, qid))?;
    let cqe = match d.result {
        Ok(c) => c,
        Err(CmdError::Status(c)) => {
            return Err(HostError::Status {
                trid: trid.clone(),
                cmd: "Connect",
                status: c.status,
            })
        }
        Err(e) => {
            return Err(HostError::Cmd {
                trid: trid.clone(),
                cmd: "Connect",
                source: e,
            })
        }
    };
    let cntlid = (cqe.dw0 & 0xFFFF) as u16;
    Ok((
        link.with_core(QueueCore::new(cfg(qid, p.depth, p.max_requests))),
        cntlid,
    ))
}

/// How a managed queue delivers results, and whether its requests survive a reconnect.
pub(crate) trait QueueCtx: Send + Sized + 'static {
    /// Unfinished requests are held for the next connection (I/O) rather than failed (admin).
    const HOLD: bool;
    /// Delivers a result.
    fn finish(req: Request<Self>, result: Result<Cqe, CmdError>);
    /// Fails a request that will not be sent (fast-I/O-fail, deletion, lost admin connection).
    fn fail(req: Request<Self>, err: IoError);
}

/// Requests waiting for a queue task, submitted from any thread.
pub(crate) struct QueueShared<C> {
    inbox: Mutex<Inbox<C>>,
    pub(crate) notify: Notify,
    /// 0 run, 1 drain (stop taking requests, finish those in flight), 2 stop.
    stop: AtomicU8,
}

struct Inbox<C> {
    q: VecDeque<Request<C>>,
    /// When set, requests are refused with this error instead of being queued.
    refuse: Option<IoError>,
}

pub(crate) const RUN: u8 = 0;
pub(crate) const DRAIN: u8 = 1;
pub(crate) const STOP: u8 = 2;

impl<C: QueueCtx> QueueShared<C> {
    pub(crate) fn new(capacity: usize) -> Self {
        QueueShared {
            inbox: Mutex::new(Inbox {
                q: VecDeque::with_capacity(capacity),
                refuse: None,
            }),
            notify: Notify::new(),
            stop: AtomicU8::new(RUN),
        }
    }

    /// Queues a request for the task; refused requests are failed here.
    pub(crate) fn push(&self, req: Request<C>) {
        let mut g = self.inbox.lock();
        if let Some(e) = g.refuse.clone() {
            drop(g);
            C::fail(req, e);
            return;
        }
        let was_empty = g.q.is_empty();
        g.q.push_back(req);
        drop(g);
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// Puts requests back at the head (oldest first), or fails them if refusing.
    pub(crate) fn requeue_front(&self, reqs: Vec<Request<C>>) {
        let mut g = self.inbox.lock();
        if let Some(e) = g.refuse.clone() {
            drop(g);
            for r in reqs {
                C::fail(r, e.clone());
            }
            return;
        }
        for r in reqs.into_iter().rev() {
            g.q.push_front(r);
        }
        drop(g);
        self.notify.notify_one();
    }

    /// Starts (Some) or stops (None) refusing; when starting, every queued
    /// request fails with the error.
    pub(crate) fn set_refuse(&self, e: Option<IoError>) {
        let mut g = self.inbox.lock();
        g.refuse = e.clone();
        let drained: Vec<Request<C>> = if e.is_some() {
            g.q.drain(..).collect()
        } else {
            Vec::new()
        };
        drop(g);
        if let Some(e) = e {
            for r in drained {
                C::fail(r, e.clone());
            }
        }
    }

    /// Refuses new requests with `e` but keeps the queued ones (graceful end).
    pub(crate) fn close_inbox(&self, e: IoError) {
        self.inbox.lock().refuse = Some(e);
    }

    pub(crate) fn queued(&self) -> usize {
        self.inbox.lock().q.len()
    }

    pub(crate) fn set_stop(&self, v: u8) {
        self.stop.store(v, Ordering::Release);
        self.notify.notify_one();
    }

    /// Moves queued requests into the core while it has room. The lock is held
    /// only to move them out (into `scratch`, reused), not while they are encoded.
    fn pull(&self, st: &mut LinkState<C>, scratch: &mut VecDeque<Request<C>>, now: Instant) {
        let room = st.core.free_requests();
        if room == 0 {
            return;
        }
        {
            let mut g = self.inbox.lock();
            let n = room.min(g.q.len());
            scratch.extend(g.q.drain(..n));
        }
        while let Some(r) = scratch.pop_front() {
            if let Err(r) = st.core.submit(r, now, &mut st.done) {
                // Cannot happen (room was counted); keep the request anyway.
                scratch.push_front(r);
                let mut g = self.inbox.lock();
                while let Some(r) = scratch.pop_back() {
                    g.q.push_front(r);
                }
                break;
            }
        }
    }
}

/// Why a managed queue task ended.
#[derive(Debug)]
pub(crate) enum QueueExit {
    /// Told to stop (or drained): requests were handed back.
    Stopped,
    /// The connection failed; the controller was told.
    Failed,
}

/// Event a queue task sends its controller.
#[derive(Debug)]
pub(crate) struct QueueFailed {
    pub qid: u16,
    pub generation: u64,
    pub error: LinkError,
}

/// Delivers finished requests, resubmitting retryable failures (bounded).
fn deliver<C: QueueCtx>(
    st: &mut LinkState<C>,
    scratch: &mut Vec<Done<C>>,
    delayed: &mut VecDeque<(Instant, Request<C>)>,
    retries: u8,
    now: Instant,
) {
    while !st.done.is_empty() {
        std::mem::swap(&mut st.done, scratch);
        for d in scratch.drain(..) {
            match d.result {
                Err(e) if C::HOLD && e.retryable() && d.req.attempts < retries => {
                    let mut req = d.req;
                    req.attempts += 1;
                    tracing::debug!(qid = st.core.config().qid, error = %e, attempt = req.attempts, "retrying I/O");
                    // A short pause: an error that comes with a controller or
                    // connection going away is then usually followed by the
                    // link failing, and the request is held for the reconnect.
                    let wait = Duration::from_millis((2u64 << req.attempts).min(100));
                    delayed.push_back((now + wait, req));
                }
                result => C::finish(d.req, result),
            }
        }
    }
}

/// Reads without waiting until something arrives or `until` passes; true if
/// something arrived.
fn poll_for<C>(link: &mut Link<C>, until: Instant) -> Result<bool, LinkError> {
    let mut spins = 0u32;
    loop {
        if link.st.read_process(link.fd.get_ref())? > 0 {
            return Ok(true);
        }
        spins += 1;
        if spins.is_multiple_of(16) && Instant::now() >= until {
            return Ok(false);
        }
        std::hint::spin_loop();
    }
}

/// Resubmits retries whose pause is over; returns when the next one is due.
fn release_due<C>(
    st: &mut LinkState<C>,
    delayed: &mut VecDeque<(Instant, Request<C>)>,
    now: Instant,
) -> Option<Instant> {
    let mut next: Option<Instant> = None;
    for _ in 0..delayed.len() {
        let Some((due, req)) = delayed.pop_front() else {
            break;
        };
        if due <= now && st.core.has_room() {
            if let Err(req) = st.core.submit(req, now, &mut st.done) {
                delayed.push_back((due, req));
            }
        } else {
            next = Some(next.map_or(due, |n| n.min(due)));
            delayed.push_back((due, req));
        }
    }
    next
}

/// The task behind one queue of a controller: takes requests from `shared`,
/// sends them, delivers results, and on any failure hands unfinished requests
/// back (I/O) or fails them (admin), tells the controller, and ends.
pub(crate) async fn run_queue<C: QueueCtx>(
    mut link: Link<C>,
    shared: Arc<QueueShared<C>>,
    events: mpsc::UnboundedSender<QueueFailed>,
    generation: u64,
    retries: u8,
    poll: Duration,
) -> QueueExit {
    let qid = link.qid();
    let mut scratch = Vec::with_capacity(64);
    let mut incoming = VecDeque::with_capacity(link.st.core.config().max_requests as usize);
    let mut delayed: VecDeque<(Instant, Request<C>)> = VecDeque::new();
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut now = Instant::now();
    let mut last_check = now;
    let res: Result<(), LinkError> = loop {
        let stop = shared.stop.load(Ordering::Acquire);
        if stop == STOP
            || (stop == DRAIN
                && link.st.core.in_flight() == 0
                && delayed.is_empty()
                && shared.queued() == 0)
        {
            break Ok(());
        }
        let next_retry = if delayed.is_empty() {
            None
        } else {
            release_due(&mut link.st, &mut delayed, now)
        };
        shared.pull(&mut link.st, &mut incoming, now);
        if now.duration_since(last_check) >= TICK {
            last_check = now;
            if let Err(e) = link.st.core.check_timeouts(now) {
                break Err(e.into());
            }
        }
        if let Err(e) = link.st.flush(link.fd.get_ref()) {
            break Err(e.into());
        }
        deliver(&mut link.st, &mut scratch, &mut delayed, retries, now);
        if link.st.core.tx_pending() && !link.st.tx_blocked {
            continue;
        }
        if !poll.is_zero() && link.st.core.in_flight() > 0 {
            // Busy-poll the socket for a while before sleeping in epoll: the
            // answer to a command just sent usually comes within microseconds,
            // and waking from epoll costs more than that.
            match poll_for(&mut link, now + poll) {
                Ok(true) => {
                    now = Instant::now();
                    deliver(&mut link.st, &mut scratch, &mut delayed, retries, now);
                    // This path skips the awaits below: take part in tokio's
                    // cooperative budget so that other tasks still run.
                    tokio::task::consume_budget().await;
                    continue;
                }
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        }
        let st = &mut link.st;
        let fd = &link.fd;
        let r: Result<(), LinkError> = tokio::select! {
            biased;
            r = fd.readable() => match r {
                Ok(mut g) => {
                    g.clear_ready();
                    drop(g);
                    st.read_process(fd.get_ref()).map(|_| ())
                }
                Err(e) => Err(e.into()),
            },
            r = fd.writable(), if st.tx_blocked => match r {
                Ok(mut g) => {
                    g.clear_ready();
                    Ok(())
                }
                Err(e) => Err(e.into()),
            },
            _ = shared.notify.notified() => Ok(()),
            _ = tick.tick() => st.core.check_timeouts(Instant::now()).map_err(LinkError::from),
            _ = tokio::time::sleep_until(next_retry.map(tokio::time::Instant::from_std).unwrap_or_else(far)), if next_retry.is_some() => Ok(()),
        };
        now = Instant::now();
        if let Err(e) = r {
            break Err(e);
        }
        deliver(&mut link.st, &mut scratch, &mut delayed, retries, now);
    };
    deliver(&mut link.st, &mut scratch, &mut delayed, retries, now);
    if let Err(e) = &res {
        link.send_term_req(e);
    }
    let Link { fd, st } = link;
    drop(fd);
    let mut unfinished = st.core.into_requests();
    unfinished.extend(delayed.into_iter().map(|(_, r)| r));
    if C::HOLD {
        shared.requeue_front(unfinished);
    } else {
        for r in unfinished {
            C::finish(r, Err(CmdError::ConnectionLost));
        }
    }
    match res {
        Ok(()) => QueueExit::Stopped,
        Err(error) => {
            tracing::warn!(qid, %error, "queue connection failed");
            let _ = events.send(QueueFailed {
                qid,
                generation,
                error,
            });
            QueueExit::Failed
        }
    }
}

/// Returns a queue id to its controller's pool when an [`IoQpair`] goes away.
pub(crate) trait QidRelease: Send + Sync {
    fn release(&self, qid: u16);
}

/// An I/O queue driven directly by the task that owns it: submit requests,
/// then call [`IoQpair::process_completions`] (non-blocking, for busy-polling
/// load generators) or [`IoQpair::poll`] (waits for the socket). Nothing
/// crosses a thread or task boundary and nothing is allocated per I/O.
///
/// It is not held across controller resets: when its connection fails, its
/// calls return the error and unfinished requests can be taken back with
/// [`IoQpair::into_requests`].
pub struct IoQpair<C> {
    link: Link<C>,
    trid: TransportId,
    last_check: Instant,
    release: Option<(Arc<dyn QidRelease>, u16)>,
}

impl<C> std::fmt::Debug for IoQpair<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoQpair")
            .field("trid", &self.trid)
            .field("link", &self.link)
            .finish()
    }
}

impl<C> IoQpair<C> {
    pub(crate) fn new(
        link: Link<C>,
        trid: TransportId,
        release: Option<(Arc<dyn QidRelease>, u16)>,
    ) -> Self {
        IoQpair {
            link,
            trid,
            last_check: Instant::now(),
            release,
        }
    }

    pub fn qid(&self) -> u16 {
        self.link.qid()
    }
    /// Commands in flight at most.
    pub fn depth(&self) -> usize {
        self.link.core().config().depth as usize
    }
    /// Requests accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.link.core().in_flight()
    }
    pub fn has_room(&self) -> bool {
        self.link.core().has_room()
    }

    /// Queues a request (sent on the next process/poll); hands it back when full.
    /// A malformed request finishes at once with [`CmdError::Invalid`].
    pub fn submit(&mut self, req: Request<C>) -> Result<(), Request<C>> {
        let now = Instant::now();
        let st = &mut self.link.st;
        st.core.submit(req, now, &mut st.done)
    }

    /// Queues an NVM I/O command.
    pub fn submit_io(&mut self, cmd: IoCmd, buf: IoBuf, ctx: C) -> Result<(), Request<C>> {
        self.submit(Request::new(Command::Io(cmd), buf, ctx))
    }

    /// Sends what is queued, reads what has arrived, and appends finished
    /// requests to `out`, without waiting. Returns how many finished.
    pub fn process_completions(&mut self, out: &mut Vec<Done<C>>) -> Result<usize, HostError> {
        let qid = self.qid();
        if let Err(e) = self.link.progress() {
            // What finished before the failure is delivered; the rest can be
            // taken back with into_requests.
            out.append(&mut self.link.st.done);
            self.link.send_term_req(&e);
            return Err(e.into_host(&self.trid, qid));
        }
        let now = Instant::now();
        if now.duration_since(self.last_check) >= TICK {
            self.last_check = now;
            if let Err(e) = self.link.st.core.check_timeouts(now) {
                return Err(HostError::Queue {
                    trid: self.trid.clone(),
                    source: Box::new(e),
                });
            }
        }
        let n = self.link.st.done.len();
        out.append(&mut self.link.st.done);
        Ok(n)
    }

    /// Sends, then waits until at least one request finishes (or, with nothing
    /// in flight, returns at once). Finished requests are appended to `out`.
    pub async fn poll(&mut self, out: &mut Vec<Done<C>>) -> Result<usize, HostError> {
        loop {
            let n = self.process_completions(out)?;
            if n > 0 || self.in_flight() == 0 {
                return Ok(n);
            }
            let qid = self.qid();
            let wait = tokio::time::timeout(TICK, self.link.wait_progress()).await;
            if let Ok(Err(e)) = wait {
                return Err(e.into_host(&self.trid, qid));
            }
        }
    }

    /// Ends the queue, returning unfinished requests (oldest first).
    pub fn into_requests(mut self) -> Vec<Request<C>> {
        let core = std::mem::replace(
            &mut self.link.st.core,
            QueueCore::new(QueueConfig::new(0, 1)),
        );
        core.into_requests()
    }
}

impl<C> Drop for IoQpair<C> {
    fn drop(&mut self) {
        if let Some((r, qid)) = self.release.take() {
            r.release(qid);
        }
    }
}
