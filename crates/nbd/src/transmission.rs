//! The transmission phase of one connection, as a state machine.
//!
//! The driver feeds received bytes to [`Transmission::on_bytes`] (it consumes
//! whole request headers and any amount of write payload, and leaves the rest
//! to the caller), submits the bdev I/O it asks for ([`Submit`]), hands bdev
//! completions to [`Transmission::on_completion`], and writes the replies with
//! vectored sends ([`Transmission::fill_iovecs`] /
//! [`Transmission::consume_output`]). Nothing here touches a socket.
//!
//! - Requests are pipelined: each one that needs the bdev takes a slot, and
//!   replies go out in completion order (NBD matches them by handle).
//! - Steady state does not allocate: slots are made up front, data buffers come
//!   from a free list, reply headers go to an arena that keeps its capacity, and
//!   read data is sent straight from the buffer the bdev filled.
//! - Memory is bounded: at most `max_requests` requests and `buffer_budget`
//!   bytes of data buffers are held; beyond that, input stops being consumed
//!   (the socket then pushes back on the client). A write that is refused is
//!   skipped in pieces, never buffered, so an oversized payload costs nothing.
//! - A malformed request header (bad magic) ends the connection; every other
//!   bad request gets its NBD error and the connection goes on.

use std::io::{IoSlice, Write};

use bdev::buf::BufPool;
use bdev::outbox::Outbox;
use bdev::{BdevIo, BdevRef, IoBuf, IoError, IoKind};
use tracing::{debug, warn};

use crate::handshake::Negotiated;
use crate::proto::*;

/// A bdev request for the driver to submit, completing with `tag`.
#[derive(Debug)]
pub struct Submit {
    pub io: BdevIo,
    pub tag: u64,
}

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct TxLimits {
    /// Largest read or write payload (the advertised maximum block size).
    pub max_payload: u32,
    /// Requests held at once (executing, receiving payload, or sending).
    pub max_requests: u16,
    /// Bytes of data buffers held at once. One request may always exceed it
    /// when it is the only one holding memory, so the largest payload fits.
    pub buffer_budget: usize,
}

impl Default for TxLimits {
    fn default() -> Self {
        TxLimits {
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_requests: 256,
            buffer_budget: 64 << 20,
        }
    }
}

/// Counters of one connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxStats {
    pub requests: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Running,
    /// Closing cleanly: requests in flight finish, new ones get ESHUTDOWN.
    Draining,
    /// The client sent `NBD_CMD_DISC`: finish what is in flight, then close.
    Disconnecting,
    /// The export's bdev is gone: in-flight requests were answered EIO; close
    /// once the replies are out.
    Aborted,
    /// The client broke the protocol: close now.
    Failed(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Write payload arriving.
    Receiving,
    /// Handed to the bdev.
    Executing,
    /// Read data queued for sending; freed once written.
    Sending,
    /// Answered (EIO on abort) while the bdev still holds it; freed on completion.
    Abandoned,
}

#[derive(Debug)]
struct Slot {
    gen: u16,
    state: SlotState,
    req: Request,
    buf: IoBuf,
    /// Buffer bytes charged to the budget.
    charged: usize,
    /// FUA on trim/write-zeroes: flush once the operation is done.
    flush_after: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    /// Expecting a request header.
    Header,
    /// Receiving a write's payload into slot `idx`.
    Payload { idx: u16, got: u32 },
    /// Skipping a refused write's payload; then replying with the error.
    Discard {
        remaining: u32,
        handle: u64,
        err: Errno,
        msg: &'static str,
    },
    /// No more input is read.
    Stopped,
}

/// One connection in the transmission phase.
pub struct Transmission {
    bdev: BdevRef,
    size: u64,
    bs: u64,
    tx_flags: u16,
    structured: bool,
    base_allocation: bool,
    fast_zero: bool,
    read_only: bool,
    flush_supported: bool,
    limits: TxLimits,
    rx: Rx,
    mode: Mode,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Slots in the Executing state.
    executing: usize,
    out: Outbox,
    pool: BufPool,
    mem_in_use: usize,
    /// Input stopped for want of a slot or buffer budget.
    stalled: bool,
    /// Payload length of the last write taken.
    last_write: u32,
    stats: TxStats,
}

impl std::fmt::Debug for Transmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transmission")
            .field("bdev", &self.bdev.name())
            .field("mode", &self.mode)
            .field("rx", &self.rx)
            .field("executing", &self.executing)
            .field("pending_output", &self.out.pending())
            .finish()
    }
}

impl Transmission {
    /// Starts transmission on what the handshake negotiated.
    pub fn new(neg: &Negotiated, mut limits: TxLimits) -> Self {
        let e = &neg.export;
        let bdev = e.bdev().clone();
        // Enforce exactly the maximum the client was told.
        limits.max_payload = e.block_sizes(limits.max_payload).2;
        let n = limits.max_requests.max(1);
        Transmission {
            size: neg.size,
            bs: e.block_size() as u64,
            tx_flags: neg.tx_flags,
            structured: neg.structured,
            base_allocation: neg.base_allocation,
            fast_zero: e.options().fast_zero,
            read_only: e.options().read_only,
            flush_supported: bdev.supports(IoKind::Flush),
            bdev,
            rx: Rx::Header,
            mode: Mode::Running,
            slots: (0..n)
                .map(|_| Slot {
                    gen: 0,
                    state: SlotState::Free,
                    req: Request {
                        flags: 0,
                        kind: 0,
                        handle: 0,
                        offset: 0,
                        length: 0,
                    },
                    buf: IoBuf::empty(),
                    charged: 0,
                    flush_after: false,
                })
                .collect(),
            free: (0..n).rev().collect(),
            executing: 0,
            out: Outbox::with_capacity(64 * 1024, 4 * n as usize),
            pool: BufPool::new(4 << 20, n as usize),
            mem_in_use: 0,
            stalled: false,
            last_write: 0,
            stats: TxStats::default(),
            limits,
        }
    }

    /// The bdev requests go to.
    pub fn bdev(&self) -> &BdevRef {
        &self.bdev
    }
    pub fn mode(&self) -> Mode {
        self.mode
    }
    pub fn stats(&self) -> TxStats {
        self.stats
    }
    /// Bytes of replies waiting to be written.
    pub fn pending_output(&self) -> usize {
        self.out.pending()
    }
    /// Requests handed to the bdev and not yet completed.
    pub fn executing(&self) -> usize {
        self.executing
    }
    /// Payload length of the last write request taken: a driver that sees
    /// large writes can read less ahead, so that the next payload goes straight
    /// into its buffer ([`Transmission::payload_target`]) instead of being
    /// staged and copied.
    pub fn last_write_len(&self) -> u32 {
        self.last_write
    }
    /// Whether the driver should read more input now.
    pub fn wants_input(&self) -> bool {
        !self.stalled
            && self.rx != Rx::Stopped
            && matches!(self.mode, Mode::Running | Mode::Draining)
    }
    /// Whether the connection is done and the driver should close it.
    pub fn is_finished(&self) -> bool {
        match self.mode {
            Mode::Running => false,
            Mode::Failed(_) => true,
            Mode::Aborted => self.out.pending() == 0,
            Mode::Disconnecting => self.executing == 0 && self.out.pending() == 0,
            Mode::Draining => {
                self.executing == 0
                    && self.out.pending() == 0
                    && matches!(self.rx, Rx::Header | Rx::Stopped)
            }
        }
    }

    // ------------------------------------------------------------ input ----

    /// Handles the requests (and payload) at the start of `buf`. Returns the
    /// bytes consumed; the caller keeps the rest for the next call.
    pub fn on_bytes(&mut self, buf: &[u8], actions: &mut Vec<Submit>) -> usize {
        let mut pos = 0;
        loop {
            match self.rx {
                Rx::Stopped => return pos,
                Rx::Payload { idx, got } => {
                    let s = &mut self.slots[idx as usize];
                    let len = s.req.length;
                    let n = ((len - got) as usize).min(buf.len() - pos);
                    s.buf[got as usize..got as usize + n].copy_from_slice(&buf[pos..pos + n]);
                    pos += n;
                    self.payload_received(n, actions);
                    if matches!(self.rx, Rx::Payload { .. }) {
                        return pos;
                    }
                }
                Rx::Discard {
                    remaining,
                    handle,
                    err,
                    msg,
                } => {
                    let n = (remaining as usize).min(buf.len() - pos);
                    pos += n;
                    let remaining = remaining - n as u32;
                    if remaining > 0 {
                        self.rx = Rx::Discard {
                            remaining,
                            handle,
                            err,
                            msg,
                        };
                        return pos;
                    }
                    self.rx = Rx::Header;
                    self.reply_err(handle, err, msg);
                }
                Rx::Header => {
                    let Some(hdr) = buf.get(pos..pos + REQUEST_LEN) else {
                        return pos;
                    };
                    let Ok(hdr) = <&[u8; REQUEST_LEN]>::try_from(hdr) else {
                        return pos;
                    };
                    let req = match Request::decode(hdr) {
                        Ok(r) => r,
                        Err(e) => {
                            warn!(bdev = %self.bdev.name(), "NBD protocol error: {e}; closing the connection");
                            self.rx = Rx::Stopped;
                            self.mode = Mode::Failed("bad request magic");
                            return pos;
                        }
                    };
                    if !self.admit(&req) {
                        self.stalled = true;
                        return pos;
                    }
                    pos += REQUEST_LEN;
                    self.on_request(req, actions);
                }
            }
        }
    }

    /// Whether resources allow taking `req` now.
    fn admit(&self, req: &Request) -> bool {
        if self.mode != Mode::Running {
            return true; // answered without a slot
        }
        if self.free.is_empty() {
            return false;
        }
        let len = req.length as usize;
        let buffered = matches!(req.kind, CMD_READ | CMD_WRITE)
            && len > 0
            && req.length <= self.limits.max_payload;
        !buffered || self.mem_in_use == 0 || self.mem_in_use + len <= self.limits.buffer_budget
    }

    /// The part of the current write's buffer still to be received, when a
    /// payload is arriving: the driver may read the socket straight into it
    /// (then calls [`Transmission::payload_received`]) instead of staging it.
    pub fn payload_target(&mut self) -> Option<&mut [u8]> {
        let Rx::Payload { idx, got } = self.rx else {
            return None;
        };
        let s = &mut self.slots[idx as usize];
        let len = s.req.length as usize;
        Some(&mut s.buf[got as usize..len])
    }

    /// Payload bytes of the current write still to come (0 between requests).
    pub fn payload_remaining(&self) -> usize {
        match self.rx {
            Rx::Payload { idx, got } => (self.slots[idx as usize].req.length - got) as usize,
            _ => 0,
        }
    }

    /// `n` more payload bytes are in the buffer [`Transmission::payload_target`] gave.
    pub fn payload_received(&mut self, n: usize, actions: &mut Vec<Submit>) {
        let Rx::Payload { idx, got } = self.rx else {
            return;
        };
        let got = got + n as u32;
        if got < self.slots[idx as usize].req.length {
            self.rx = Rx::Payload { idx, got };
            return;
        }
        self.rx = Rx::Header;
        let s = &mut self.slots[idx as usize];
        let r = s.req;
        let io = BdevIo::write(
            r.offset / self.bs,
            r.length as u64 / self.bs,
            std::mem::take(&mut s.buf),
            r.flags & CMD_FLAG_FUA != 0,
        );
        self.stats.bytes_written += r.length as u64;
        self.submit(idx, io, actions);
    }

    fn on_request(&mut self, req: Request, actions: &mut Vec<Submit>) {
        self.stats.requests += 1;
        if req.kind == CMD_DISC {
            debug!(bdev = %self.bdev.name(), "client disconnects");
            self.rx = Rx::Stopped;
            if self.mode == Mode::Running || self.mode == Mode::Draining {
                self.mode = Mode::Disconnecting;
            }
            return;
        }
        let check = if self.mode == Mode::Draining {
            Err((Errno::Shutdown, "the export is being removed"))
        } else {
            self.validate(&req)
        };
        if let Err((err, msg)) = check {
            self.stats.errors += 1;
            if req.kind == CMD_WRITE && req.length > 0 {
                // The payload follows the header whatever we think of it: skip
                // it, then answer (a reply before the payload is sent could
                // confuse a client that has not finished sending the request).
                self.rx = Rx::Discard {
                    remaining: req.length,
                    handle: req.handle,
                    err,
                    msg,
                };
            } else {
                self.reply_err(req.handle, err, msg);
            }
            return;
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let bs = self.bs;
        match req.kind {
            CMD_READ if req.length == 0 => self.reply_read_empty(req.handle),
            CMD_READ => {
                let Some(idx) = self.alloc(req, req.length as usize) else {
                    return self.reply_err(req.handle, Errno::Io, "no request slot");
                };
                let buf = std::mem::take(&mut self.slots[idx as usize].buf);
                let io = BdevIo::read(req.offset / bs, req.length as u64 / bs, buf);
                self.submit(idx, io, actions);
            }
            CMD_WRITE if req.length == 0 => self.reply_ok(req.handle),
            CMD_WRITE => {
                let Some(idx) = self.alloc(req, req.length as usize) else {
                    self.rx = Rx::Discard {
                        remaining: req.length,
                        handle: req.handle,
                        err: Errno::Io,
                        msg: "no request slot",
                    };
                    return;
                };
                self.slots[idx as usize].state = SlotState::Receiving;
                self.rx = Rx::Payload { idx, got: 0 };
                self.last_write = req.length;
            }
            // A bdev without flush has no volatile cache: completed writes are durable.
            CMD_FLUSH if !self.flush_supported => self.reply_ok(req.handle),
            CMD_FLUSH => match self.alloc(req, 0) {
                Some(idx) => self.submit(idx, BdevIo::flush(), actions),
                None => self.reply_err(req.handle, Errno::Io, "no request slot"),
            },
            CMD_TRIM | CMD_WRITE_ZEROES if req.length == 0 => self.reply_ok(req.handle),
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let Some(idx) = self.alloc(req, 0) else {
                    return self.reply_err(req.handle, Errno::Io, "no request slot");
                };
                let (off, n) = (req.offset / bs, req.length as u64 / bs);
                // NO_HOLE needs no special path: corral bdevs' write-zeroes keeps
                // the range provisioned (the file bdev uses ZERO_RANGE, never
                // PUNCH_HOLE; the malloc bdev has no space to run out of).
                let io = if req.kind == CMD_TRIM {
                    BdevIo::unmap(off, n)
                } else {
                    BdevIo::write_zeroes(off, n)
                };
                // The bdev's FUA covers writes only: make these durable by a flush.
                self.slots[idx as usize].flush_after = fua && self.flush_supported;
                self.submit(idx, io, actions);
            }
            CMD_BLOCK_STATUS => self.reply_block_status(&req),
            _ => self.reply_err(req.handle, Errno::Inval, "unknown command"),
        }
    }

    /// Checks a request against the protocol and the export; the error and a
    /// message for humans when it must be refused.
    fn validate(&self, req: &Request) -> Result<(), (Errno, &'static str)> {
        let allowed = match req.kind {
            CMD_READ if self.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => return Err((Errno::Inval, "unknown command")),
        };
        if req.flags & !allowed != 0 {
            return Err((Errno::Inval, "command flags not valid for this command"));
        }
        let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && self.read_only {
            return Err((Errno::Perm, "the export is read-only"));
        }
        match req.kind {
            CMD_TRIM if self.tx_flags & TX_SEND_TRIM == 0 => {
                return Err((Errno::Inval, "trim is not supported by this export"))
            }
            CMD_WRITE_ZEROES if self.tx_flags & TX_SEND_WRITE_ZEROES == 0 => {
                return Err((Errno::Inval, "write zeroes is not supported by this export"))
            }
            CMD_BLOCK_STATUS if !self.base_allocation => {
                return Err((Errno::Inval, "no metadata context was negotiated"))
            }
            CMD_BLOCK_STATUS if req.length == 0 => {
                return Err((Errno::Inval, "block status of zero length"))
            }
            CMD_FLUSH => return Ok(()), // offset and length are reserved
            _ => {}
        }
        if matches!(req.kind, CMD_READ | CMD_WRITE) && req.length > self.limits.max_payload {
            return Err((Errno::Inval, "request larger than the maximum block size"));
        }
        // bs is a power of two, so one test covers both.
        if !(req.offset | req.length as u64).is_multiple_of(self.bs) {
            return Err((
                Errno::Inval,
                "offset or length is not a multiple of the minimum block size",
            ));
        }
        if req
            .offset
            .checked_add(req.length as u64)
            .is_none_or(|end| end > self.size)
        {
            // As the spec asks: ENOSPC for writes past the end, EINVAL otherwise.
            let err = if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                Errno::NoSpc
            } else {
                Errno::Inval
            };
            return Err((err, "request beyond the end of the export"));
        }
        if req.kind == CMD_WRITE_ZEROES && req.flags & CMD_FLAG_FAST_ZERO != 0 && !self.fast_zero {
            return Err((
                Errno::NotSup,
                "write zeroes is not faster than writing here",
            ));
        }
        Ok(())
    }

    /// Takes a slot for `req` with a data buffer of `len` bytes.
    fn alloc(&mut self, req: Request, len: usize) -> Option<u16> {
        // admit() keeps a slot for every request that needs one; callers still
        // answer an error rather than trust that.
        let idx = self.free.pop()?;
        let buf = if len > 0 {
            self.pool.get(len)
        } else {
            IoBuf::empty()
        };
        self.mem_in_use += len;
        let s = &mut self.slots[idx as usize];
        s.gen = s.gen.wrapping_add(1);
        s.state = SlotState::Executing;
        s.req = req;
        s.buf = buf;
        s.charged = len;
        s.flush_after = false;
        Some(idx)
    }

    fn submit(&mut self, idx: u16, io: BdevIo, actions: &mut Vec<Submit>) {
        let s = &mut self.slots[idx as usize];
        s.state = SlotState::Executing;
        self.executing += 1;
        let tag = idx as u64 | (s.gen as u64) << 16;
        actions.push(Submit { io, tag });
    }

    fn release(&mut self, idx: u16) {
        let s = &mut self.slots[idx as usize];
        s.state = SlotState::Free;
        self.mem_in_use -= s.charged;
        s.charged = 0;
        let b = std::mem::take(&mut s.buf);
        self.pool.put(b);
        self.free.push(idx);
        self.stalled = false;
    }

    // ------------------------------------------------------- completions ----

    /// The bdev completed the I/O tagged `tag`.
    pub fn on_completion(
        &mut self,
        tag: u64,
        mut io: BdevIo,
        result: Result<(), IoError>,
        actions: &mut Vec<Submit>,
    ) {
        let idx = (tag & 0xFFFF) as u16;
        let gen = (tag >> 16) as u16;
        let state = match self.slots.get(idx as usize) {
            Some(s) if s.gen == gen => s.state,
            _ => SlotState::Free,
        };
        match state {
            SlotState::Executing => {}
            SlotState::Abandoned => {
                self.slots[idx as usize].buf = std::mem::take(&mut io.buf);
                self.release(idx);
                return;
            }
            _ => {
                // Nothing waits for this (cannot happen unless a bdev completes twice).
                self.pool.put(std::mem::take(&mut io.buf));
                return;
            }
        }
        let kind = io.kind;
        let s = &mut self.slots[idx as usize];
        if matches!(kind, IoKind::Read | IoKind::Write) {
            s.buf = std::mem::take(&mut io.buf);
        }
        let req = s.req;
        if let Err(e) = result {
            self.executing -= 1;
            self.stats.errors += 1;
            let err = Errno::from_io_error(&e);
            debug!(bdev = %self.bdev.name(), kind = req.kind, offset = req.offset, length = req.length, "I/O failed: {e}");
            self.reply_err_fmt(req.handle, err, format_args!("{e}"));
            self.release(idx);
            return;
        }
        match kind {
            IoKind::Read => {
                self.executing -= 1;
                s.state = SlotState::Sending;
                self.stats.bytes_read += req.length as u64;
                let structured = self.structured;
                self.out.push_with(|a| {
                    if structured {
                        chunk_header(
                            a,
                            REPLY_FLAG_DONE,
                            REPLY_TYPE_OFFSET_DATA,
                            req.handle,
                            8 + req.length,
                        );
                        a.extend_from_slice(&req.offset.to_be_bytes());
                    } else {
                        simple_reply(a, req.handle, 0);
                    }
                });
                self.out.push_slot(idx, 0, req.length);
                self.out.push_release(idx);
            }
            IoKind::WriteZeroes | IoKind::Unmap if s.flush_after => {
                s.flush_after = false;
                actions.push(Submit {
                    io: BdevIo::flush(),
                    tag,
                });
            }
            _ => {
                self.executing -= 1;
                self.reply_ok(req.handle);
                self.release(idx);
            }
        }
    }

    // ---------------------------------------------------------- closing ----

    /// Closes cleanly: requests in flight finish; new ones get ESHUTDOWN.
    pub fn drain(&mut self) {
        if self.mode == Mode::Running {
            self.mode = Mode::Draining;
        }
    }

    /// The bdev is gone: answers every request in flight with EIO now, stops
    /// reading, and finishes once the replies are out.
    pub fn abort(&mut self) {
        if matches!(self.mode, Mode::Aborted | Mode::Failed(_)) {
            return;
        }
        self.mode = Mode::Aborted;
        self.rx = Rx::Stopped;
        for idx in 0..self.slots.len() as u16 {
            match self.slots[idx as usize].state {
                SlotState::Executing => {
                    let h = self.slots[idx as usize].req.handle;
                    self.slots[idx as usize].state = SlotState::Abandoned;
                    self.executing -= 1;
                    self.stats.errors += 1;
                    self.reply_err(h, Errno::Io, "the export's device was removed");
                }
                SlotState::Receiving => self.release(idx),
                _ => {}
            }
        }
    }

    // ----------------------------------------------------------- output ----

    fn reply_ok(&mut self, handle: u64) {
        // A simple reply is allowed for anything but reads, even with
        // structured replies, and is the shortest.
        self.out.push_with(|a| simple_reply(a, handle, 0));
    }

    fn reply_read_empty(&mut self, handle: u64) {
        if self.structured {
            self.out.push_with(|a| {
                chunk_header(a, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
            });
        } else {
            self.out.push_with(|a| simple_reply(a, handle, 0));
        }
    }

    fn reply_err(&mut self, handle: u64, err: Errno, msg: &str) {
        self.reply_err_fmt(handle, err, format_args!("{msg}"));
    }

    /// An error reply; with structured replies it carries a message, formatted
    /// straight into the output arena.
    fn reply_err_fmt(&mut self, handle: u64, err: Errno, msg: std::fmt::Arguments<'_>) {
        if !self.structured {
            self.out.push_with(|a| simple_reply(a, handle, err.code()));
            return;
        }
        self.out.push_with(|a| {
            let start = a.len();
            chunk_header(a, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 0);
            a.extend_from_slice(&err.code().to_be_bytes());
            a.extend_from_slice(&[0, 0]);
            let m = a.len();
            let _ = a.write_fmt(msg);
            a.truncate(m + (a.len() - m).min(MAX_STRING));
            let mlen = a.len() - m;
            a[start + 16..start + 20].copy_from_slice(&(6 + mlen as u32).to_be_bytes());
            a[m - 2..m].copy_from_slice(&(mlen as u16).to_be_bytes());
        });
    }

    /// `base:allocation` status: every block is reported allocated data (status
    /// 0), which the spec allows when the server cannot tell; bdevs do not
    /// report allocation.
    fn reply_block_status(&mut self, req: &Request) {
        self.out.push_with(|a| {
            chunk_header(a, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, req.handle, 12);
            a.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
            a.extend_from_slice(&req.length.to_be_bytes());
            a.extend_from_slice(&0u32.to_be_bytes());
        });
    }

    /// Fills `iov` with pending output, in order; returns how many were filled.
    pub fn fill_iovecs<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        self.out
            .fill_iovecs(iov, |idx| &self.slots[idx as usize].buf[..])
    }

    /// Marks `written` bytes of output as sent, freeing read slots whose data
    /// is out.
    pub fn consume_output(&mut self, mut written: usize) {
        while let Some(idx) = self.out.consume(&mut written) {
            self.release(idx);
        }
    }

    /// Collects all pending output into one buffer (tests and tools).
    pub fn take_output(&mut self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.out.pending());
        loop {
            let total = {
                let mut iov = [IoSlice::new(&[]); 64];
                let n = self.fill_iovecs(&mut iov);
                let before = v.len();
                for s in &iov[..n] {
                    v.extend_from_slice(s);
                }
                v.len() - before
            };
            self.consume_output(total);
            if total == 0 {
                break;
            }
        }
        v
    }
}

#[cfg(test)]
mod tests;
