//! One NVMe/TCP host queue as a state machine without I/O.
//!
//! [`QueueCore`] owns the requests in flight on one connection (admin or I/O):
//! it allocates command ids, splits requests larger than the controller's MDTS
//! (or the 16-bit NLB field) into several commands, builds CapsuleCmd PDUs
//! (with in-capsule data up to the queue's limit, otherwise a transport SGL and
//! H2CData PDUs answering each R2T, cut at `maxh2cdata`), reassembles C2HData
//! into each command's buffer, and completes requests on CapsuleResp.
//!
//! The driver (see `tcp.rs`) owns the socket: it asks for the bytes to send as
//! [`IoSlice`]s that point into the header buffer and straight into the
//! requests' own data buffers (no copy of write data), reports how much was
//! written, and feeds received bytes in. For the bulk of a large C2HData it can
//! receive straight into the destination buffer ([`QueueCore::rx_direct`]).
//!
//! Steady state allocates nothing: the request table, command table, send queue
//! and header buffer are sized when the queue is made and reused.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::{Duration, Instant};

use bdev::{IoBuf, IoKind};
use nvme_wire::cqe::{Cqe, CQE_LEN};
use nvme_wire::digest::{crc32c, DataDigest, DIGEST_LEN};
use nvme_wire::le::{put_u32, put_u64, u16_at, u32_at};
use nvme_wire::opcode::IoOpcode;
use nvme_wire::pdu::{
    DataHdr, Encoder, FatalError, PduError, PduHeader, PduType, CH_LEN, FLAG_DDGSTF, FLAG_HDGSTF,
    FLAG_LAST_PDU, FLAG_SUCCESS, SHORT_HLEN, TERM_REQ_MAX_DATA,
};
use nvme_wire::status::GenericStatus;
use nvme_wire::{DigestConfig, Sgl, Sqe, Status};

/// In-capsule data an admin (or fabrics) command may carry, per the NVMe/TCP spec.
pub const ADMIN_ICD_MAX: usize = 8192;
/// Largest NLB one Read/Write/Write Zeroes command can carry (16-bit, 0's based).
pub const MAX_NLB: u64 = 1 << 16;

/// What a queue was given when its connection was set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue id (0 = admin).
    pub qid: u16,
    /// Commands in flight at most; command ids are `0..depth`.
    pub depth: u16,
    /// Requests accepted at most (a request larger than MDTS takes several
    /// command ids, one after the other). At least `depth`.
    pub max_requests: u16,
    /// Largest write sent as in-capsule data (admin: 8192; I/O: IOCCSZ*16-64).
    pub icd_max: usize,
    /// Largest H2CData PDU the controller accepts (ICResp).
    pub maxh2cdata: usize,
    /// Digests negotiated in ICReq/ICResp.
    pub digest: DigestConfig,
    /// The controller's PDU data alignment (ICResp CPDA).
    pub cpda: u8,
    /// Largest data transfer of one command (MDTS), 0 = no limit.
    pub max_xfer: usize,
    /// How long a command may stay in flight before the connection is declared dead.
    pub cmd_timeout: Duration,
}

impl QueueConfig {
    /// A config for tests and for the first moments of a connection.
    pub fn new(qid: u16, depth: u16) -> Self {
        QueueConfig {
            qid,
            depth,
            max_requests: depth,
            icd_max: if qid == 0 { ADMIN_ICD_MAX } else { 0 },
            maxh2cdata: 128 * 1024,
            digest: DigestConfig::default(),
            cpda: 0,
            max_xfer: 0,
            cmd_timeout: Duration::from_secs(30),
        }
    }
}

/// Direction of a raw command's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    None,
    /// Host to controller (write-like; in-capsule or R2T/H2CData).
    ToCtrl,
    /// Controller to host (C2HData).
    FromCtrl,
}

/// An NVM I/O command on a namespace, in blocks; the queue splits it as needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoCmd {
    pub kind: IoKind,
    pub nsid: u32,
    pub slba: u64,
    pub nblocks: u64,
    pub block_size: u32,
    pub fua: bool,
}

/// What a request asks the controller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Io(IoCmd),
    /// An admin or fabrics command sent as given (the queue sets cid and SGL);
    /// the request's buffer is its data.
    Raw {
        sqe: Sqe,
        dir: DataDir,
    },
}

/// One request: a command, the buffer its data lives in, and the submitter's context.
#[derive(Debug)]
pub struct Request<C> {
    pub cmd: Command,
    pub buf: IoBuf,
    pub ctx: C,
    /// Exempt from the command timeout (the Async Event Request waits by design).
    pub no_timeout: bool,
    /// How many times the request has been resubmitted after a failure.
    pub attempts: u8,
}

impl<C> Request<C> {
    pub fn new(cmd: Command, buf: IoBuf, ctx: C) -> Self {
        Request {
            cmd,
            buf,
            ctx,
            no_timeout: false,
            attempts: 0,
        }
    }
}

/// Why a command failed without the connection failing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdError {
    #[error("completed with status {}", .0.status)]
    Status(Cqe),
    /// A C2HData PDU of this command failed its data digest (a transient transport error).
    #[error("data digest mismatch on received data")]
    DataDigest,
    #[error("controller reported success after sending {got} of {expected} bytes")]
    ShortData { expected: u32, got: u32 },
    /// The request itself is malformed (buffer length does not match the command).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// The queue's connection was lost before the command completed.
    #[error("connection lost before completion")]
    ConnectionLost,
}

impl CmdError {
    /// The NVMe status this failure is reported as.
    pub fn status(&self) -> Status {
        match self {
            CmdError::Status(c) => c.status,
            CmdError::DataDigest | CmdError::ShortData { .. } | CmdError::ConnectionLost => {
                Status::generic(GenericStatus::TransientTransportError)
            }
            CmdError::Invalid(_) => Status::generic(GenericStatus::InvalidField).with_dnr(),
        }
    }
    /// Whether resubmitting the same command may succeed: any status without
    /// Do Not Retry (as Linux and SPDK retry them), or a transport hiccup.
    pub fn retryable(&self) -> bool {
        match self {
            CmdError::Status(c) => !c.status.dnr,
            CmdError::DataDigest | CmdError::ShortData { .. } | CmdError::ConnectionLost => true,
            CmdError::Invalid(_) => false,
        }
    }
}

/// A finished request: the request back (buffer and context included) and its result.
#[derive(Debug)]
pub struct Done<C> {
    pub req: Request<C>,
    pub result: Result<Cqe, CmdError>,
}

/// A failure that ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The controller broke the protocol; the host answers with H2CTermReq and closes.
    #[error("qid {qid}: protocol error: {}", .err)]
    Protocol {
        qid: u16,
        err: PduError,
        header: Vec<u8>,
    },
    /// The controller ended the connection with C2HTermReq.
    #[error("qid {qid}: controller sent C2HTermReq (fes {fes}, fei {fei})")]
    TermReq { qid: u16, fes: u16, fei: u32 },
    /// A command was in flight for longer than the command timeout.
    #[error("qid {qid}: command {cid} (opcode {opcode:#04x}) timed out after {after:?}")]
    Timeout {
        qid: u16,
        cid: u16,
        opcode: u8,
        after: Duration,
    },
}

impl QueueError {
    /// The H2CTermReq to send before closing, if this failure calls for one.
    pub fn term_req(&self) -> Option<Vec<u8>> {
        match self {
            QueueError::Protocol { err, header, .. } => {
                let mut out = Vec::with_capacity(SHORT_HLEN + TERM_REQ_MAX_DATA);
                nvme_wire::pdu::term_req(err, header, false, &mut out);
                Some(out)
            }
            _ => None,
        }
    }
}

struct ReqSlot<C> {
    req: Request<C>,
    seq: u64,
    /// Next block (relative) of an I/O command still to issue.
    next_block: u64,
    issued_all: bool,
    outstanding: u16,
    err: Option<CmdError>,
    cqe: Cqe,
    deadline: Option<Instant>,
    submitted: Instant,
}

#[derive(Debug, Clone, Copy, Default)]
struct CmdSlot {
    active: bool,
    req: u16,
    opcode: u8,
    dir: u8, // 0 none, 1 to ctrl, 2 from ctrl
    in_capsule: bool,
    use_inline: bool,
    /// Offset of this command's data in the request buffer.
    buf_off: usize,
    len: u32,
    /// DSM range (or other small data the queue makes itself).
    inline: [u8; 16],
    /// C2HData bytes received so far.
    received: u32,
    /// Bytes requested by R2Ts so far.
    r2t_upto: u32,
    /// Send-queue entries still pointing at this command's data.
    tx_refs: u16,
    /// The response, when it came while data was still queued for sending.
    resp: Option<Cqe>,
    err: Option<CmdErrKind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmdErrKind {
    DataDigest,
}

const DIR_NONE: u8 = 0;
const DIR_TO: u8 = 1;
const DIR_FROM: u8 = 2;

#[derive(Debug, Clone, Copy)]
struct TxEntry {
    /// Header bytes: absolute position in the header stream, and length.
    hdr_pos: u64,
    hdr_len: u32,
    /// Data of command `cid` at `data_off..data_off+data_len` (relative to the command's data).
    cid: u16,
    data_off: u32,
    data_len: u32,
    ddgst: [u8; 4],
    ddgst_len: u8,
}

impl TxEntry {
    fn len(&self) -> usize {
        self.hdr_len as usize + self.data_len as usize + self.ddgst_len as usize
    }
}

#[derive(Debug, Clone, Copy)]
enum Rx {
    Header,
    Data {
        cid: u16,
        off: u32,
        remaining: u32,
        datal: u32,
        flags: u8,
        digest: Option<DataDigest>,
    },
    Digest {
        cid: u16,
        datal: u32,
        flags: u8,
        want: u32,
        got: u8,
        bytes: [u8; 4],
    },
}

/// The state of one host queue on one connection. `C` is the submitter's
/// per-request context, returned with the result.
pub struct QueueCore<C> {
    cfg: QueueConfig,
    enc: Encoder,
    reqs: Vec<Option<ReqSlot<C>>>,
    free_reqs: Vec<u16>,
    cmds: Vec<CmdSlot>,
    free_cids: Vec<u16>,
    /// Requests with commands still to issue, oldest first.
    pending: VecDeque<u16>,
    seq: u64,
    active_reqs: usize,
    tx: VecDeque<TxEntry>,
    /// Bytes of the front entry already sent.
    tx_skip: usize,
    /// Header bytes; `txh[0]` is header stream position `txh_base`.
    txh: Vec<u8>,
    txh_base: u64,
    rx: Rx,
}

impl<C> std::fmt::Debug for QueueCore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueCore")
            .field("qid", &self.cfg.qid)
            .field("active_reqs", &self.active_reqs)
            .field("tx", &self.tx.len())
            .field("rx", &self.rx)
            .finish()
    }
}

impl<C> QueueCore<C> {
    pub fn new(cfg: QueueConfig) -> Self {
        let depth = cfg.depth.max(1);
        let max_requests = cfg.max_requests.max(depth);
        let cfg = QueueConfig {
            depth,
            max_requests,
            ..cfg
        };
        QueueCore {
            enc: Encoder {
                digest: cfg.digest,
                pda: cfg.cpda,
            },
            reqs: (0..max_requests).map(|_| None).collect(),
            free_reqs: (0..max_requests).rev().collect(),
            cmds: vec![CmdSlot::default(); depth as usize],
            free_cids: (0..depth).rev().collect(),
            pending: VecDeque::with_capacity(max_requests as usize),
            seq: 0,
            active_reqs: 0,
            tx: VecDeque::with_capacity(depth as usize * 4),
            tx_skip: 0,
            txh: Vec::with_capacity(depth as usize * 128),
            txh_base: 0,
            rx: Rx::Header,
            cfg,
        }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }
    /// Requests accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.active_reqs
    }
    /// How many more requests [`QueueCore::submit`] would accept.
    pub fn free_requests(&self) -> usize {
        self.free_reqs.len()
    }
    /// Whether [`QueueCore::submit`] would accept another request.
    pub fn has_room(&self) -> bool {
        !self.free_reqs.is_empty()
    }
    /// Whether there are bytes to send.
    pub fn tx_pending(&self) -> bool {
        !self.tx.is_empty()
    }

    /// Accepts a request, or hands it back when the queue is full. A malformed
    /// request is finished at once (in `done`) with [`CmdError::Invalid`].
    pub fn submit(
        &mut self,
        req: Request<C>,
        now: Instant,
        done: &mut Vec<Done<C>>,
    ) -> Result<(), Request<C>> {
        if let Err(why) = validate(&req) {
            done.push(Done {
                req,
                result: Err(CmdError::Invalid(why)),
            });
            return Ok(());
        }
        let Some(ri) = self.free_reqs.pop() else {
            return Err(req);
        };
        let deadline = if req.no_timeout {
            None
        } else {
            now.checked_add(self.cfg.cmd_timeout)
        };
        self.seq += 1;
        self.reqs[ri as usize] = Some(ReqSlot {
            req,
            seq: self.seq,
            next_block: 0,
            issued_all: false,
            outstanding: 0,
            err: None,
            cqe: Cqe::default(),
            deadline,
            submitted: now,
        });
        self.active_reqs += 1;
        self.pending.push_back(ri);
        self.issue_pending(done);
        Ok(())
    }

    /// Issues commands for pending requests while command ids are free.
    fn issue_pending(&mut self, done: &mut Vec<Done<C>>) {
        while let Some(&ri) = self.pending.front() {
            let finished = match &self.reqs[ri as usize] {
                Some(s) => s.issued_all,
                None => true,
            };
            if finished {
                self.pending.pop_front();
                self.maybe_complete(ri, done);
                continue;
            }
            let Some(cid) = self.free_cids.pop() else {
                break;
            };
            self.issue_one(ri, cid);
        }
    }

    /// Builds and queues the next command of request `ri` under `cid`.
    fn issue_one(&mut self, ri: u16, cid: u16) {
        let icd_max = self.cfg.icd_max;
        let max_xfer = self.cfg.max_xfer;
        let Some(slot) = self.reqs[ri as usize].as_mut() else {
            return;
        };
        let mut c = CmdSlot {
            active: true,
            req: ri,
            ..CmdSlot::default()
        };
        let mut sqe;
        match slot.req.cmd {
            Command::Raw { sqe: s, dir } => {
                sqe = s;
                c.len = slot.req.buf.len() as u32;
                c.dir = match dir {
                    DataDir::None => DIR_NONE,
                    DataDir::ToCtrl => DIR_TO,
                    DataDir::FromCtrl => DIR_FROM,
                };
                if dir == DataDir::None {
                    c.len = 0;
                }
                slot.issued_all = true;
            }
            Command::Io(io) => {
                let bs = io.block_size as u64;
                let left = io.nblocks - slot.next_block;
                let max_blocks = match io.kind {
                    IoKind::Read | IoKind::Write => {
                        let by_xfer = if max_xfer == 0 {
                            u64::MAX
                        } else {
                            (max_xfer as u64 / bs).max(1)
                        };
                        by_xfer.min(MAX_NLB)
                    }
                    IoKind::WriteZeroes => MAX_NLB,
                    IoKind::Unmap => u32::MAX as u64,
                    IoKind::Flush => u64::MAX,
                };
                let n = left.min(max_blocks);
                let slba = io.slba + slot.next_block;
                c.buf_off = (slot.next_block * bs) as usize;
                slot.next_block += n;
                slot.issued_all = slot.next_block >= io.nblocks;
                let op = match io.kind {
                    IoKind::Read => IoOpcode::Read,
                    IoKind::Write => IoOpcode::Write,
                    IoKind::Flush => IoOpcode::Flush,
                    IoKind::WriteZeroes => IoOpcode::WriteZeroes,
                    IoKind::Unmap => IoOpcode::DatasetManagement,
                };
                sqe = Sqe::new(op as u8, cid);
                sqe.set_nsid(io.nsid);
                match io.kind {
                    IoKind::Read | IoKind::Write => {
                        sqe.set_slba(slba);
                        sqe.set_nlb(n as u32);
                        if io.kind == IoKind::Write {
                            sqe.set_fua(io.fua);
                            c.dir = DIR_TO;
                        } else {
                            c.dir = DIR_FROM;
                        }
                        c.len = (n * bs) as u32;
                    }
                    IoKind::WriteZeroes => {
                        sqe.set_slba(slba);
                        sqe.set_nlb(n as u32);
                    }
                    IoKind::Unmap => {
                        // One range, Attribute Deallocate.
                        sqe.set_cdw(10, 0);
                        sqe.set_cdw(11, 1 << 2);
                        c.use_inline = true;
                        c.len = 16;
                        c.dir = DIR_TO;
                        put_u32(&mut c.inline, 0, 0);
                        put_u32(&mut c.inline, 4, n as u32);
                        put_u64(&mut c.inline, 8, slba);
                    }
                    IoKind::Flush => {}
                }
            }
        }
        slot.outstanding += 1;
        c.opcode = sqe.opcode();
        sqe.set_cid(cid);
        c.in_capsule = c.dir == DIR_TO && c.len as usize <= icd_max && c.len > 0;
        let sgl = if c.in_capsule {
            Sgl::in_capsule(c.len)
        } else if c.dir == DIR_NONE {
            Sgl::transport(0)
        } else {
            Sgl::transport(c.len)
        };
        sqe.set_sgl(sgl);
        let icd_len = if c.in_capsule { c.len } else { 0 };
        self.cmds[cid as usize] = c;
        if self.reqs[ri as usize]
            .as_ref()
            .is_some_and(|s| s.issued_all)
        {
            if let Some(p) = self.pending.front() {
                if *p == ri {
                    self.pending.pop_front();
                }
            }
        }
        self.queue_pdu(PduHeader::CapsuleCmd(sqe), 0, cid, 0, icd_len);
    }

    /// Appends a PDU to the send queue: header now, data by reference to command `cid`.
    fn queue_pdu(&mut self, h: PduHeader, flags: u8, cid: u16, data_off: u32, data_len: u32) {
        let hdr_pos = self.txh_base + self.txh.len() as u64;
        let hdr_len = self.enc.header(&h, flags, data_len as usize, &mut self.txh) as u32;
        let mut e = TxEntry {
            hdr_pos,
            hdr_len,
            cid,
            data_off,
            data_len,
            ddgst: [0; 4],
            ddgst_len: 0,
        };
        if data_len > 0 {
            let dl = self.enc.data_digest_len(h.pdu_type(), data_len as usize);
            if dl != 0 {
                let data = self.cmd_data(cid);
                let s = data
                    .get(data_off as usize..(data_off + data_len) as usize)
                    .unwrap_or(&[]);
                let mut d = DataDigest::new();
                d.update(s);
                e.ddgst = d.finish().to_le_bytes();
                e.ddgst_len = DIGEST_LEN as u8;
            }
            self.cmds[cid as usize].tx_refs += 1;
        }
        self.tx.push_back(e);
    }

    fn cmd_data(&self, cid: u16) -> &[u8] {
        let c = &self.cmds[cid as usize];
        if c.use_inline {
            return &c.inline[..(c.len as usize).min(16)];
        }
        match &self.reqs[c.req as usize] {
            Some(s) => s
                .req
                .buf
                .get(c.buf_off..c.buf_off + c.len as usize)
                .unwrap_or(&[]),
            None => &[],
        }
    }

    fn cmd_data_mut(&mut self, cid: u16) -> &mut [u8] {
        let c = &mut self.cmds[cid as usize];
        if c.use_inline {
            return &mut c.inline[..(c.len as usize).min(16)];
        }
        let (off, len) = (c.buf_off, c.len as usize);
        match &mut self.reqs[c.req as usize] {
            Some(s) => s.req.buf.get_mut(off..off + len).unwrap_or(&mut []),
            None => &mut [],
        }
    }

    /// Fills `iov` with the next bytes to send, in order; returns how many
    /// slices were filled (0 when nothing is queued).
    pub fn tx_iovecs<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let mut skip = self.tx_skip;
        for e in &self.tx {
            let h0 = (e.hdr_pos - self.txh_base) as usize;
            let hdr = &self.txh[h0..h0 + e.hdr_len as usize];
            let data: &[u8] = if e.data_len > 0 {
                let d = self.cmd_data(e.cid);
                d.get(e.data_off as usize..(e.data_off + e.data_len) as usize)
                    .unwrap_or(&[])
            } else {
                &[]
            };
            let dg = &e.ddgst[..e.ddgst_len as usize];
            for part in [hdr, data, dg] {
                if part.is_empty() {
                    continue;
                }
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                if n == iov.len() {
                    return n;
                }
                iov[n] = IoSlice::new(&part[skip..]);
                skip = 0;
                n += 1;
            }
        }
        n
    }

    /// Records that `n` bytes of what [`QueueCore::tx_iovecs`] offered were sent.
    /// Commands whose response came while their data was queued finish here.
    pub fn tx_advance(&mut self, mut n: usize, done: &mut Vec<Done<C>>) {
        while n > 0 {
            let Some(e) = self.tx.front().copied() else {
                break;
            };
            let left = e.len() - self.tx_skip;
            if n < left {
                self.tx_skip += n;
                break;
            }
            n -= left;
            self.tx_skip = 0;
            self.tx.pop_front();
            if e.data_len > 0 {
                let c = &mut self.cmds[e.cid as usize];
                c.tx_refs = c.tx_refs.saturating_sub(1);
                if c.tx_refs == 0 && c.active {
                    if let Some(cqe) = c.resp.take() {
                        self.finish_cmd(e.cid, cqe, done);
                    }
                }
            }
        }
        match self.tx.front() {
            None => {
                self.txh_base += self.txh.len() as u64;
                self.txh.clear();
            }
            Some(e) if (e.hdr_pos - self.txh_base) > 256 * 1024 => {
                let k = (e.hdr_pos - self.txh_base) as usize;
                self.txh.drain(..k);
                self.txh_base += k as u64;
            }
            Some(_) => {}
        }
    }

    /// Where the rest of the current C2HData payload goes, when the receiver is
    /// in the middle of one: the driver may read straight into it and then call
    /// [`QueueCore::rx_direct_done`].
    pub fn rx_direct(&mut self) -> Option<&mut [u8]> {
        if let Rx::Data {
            cid,
            off,
            remaining,
            ..
        } = self.rx
        {
            let d = self.cmd_data_mut(cid);
            return d.get_mut(off as usize..(off + remaining) as usize);
        }
        None
    }

    /// Accounts `n` bytes received straight into the slice [`QueueCore::rx_direct`] gave.
    pub fn rx_direct_done(&mut self, n: usize, done: &mut Vec<Done<C>>) {
        if let Rx::Data {
            cid,
            off,
            remaining,
            datal,
            flags,
            mut digest,
        } = self.rx
        {
            let n = (n as u32).min(remaining);
            if let Some(d) = digest.as_mut() {
                let data = self.cmd_data(cid);
                d.update(data.get(off as usize..(off + n) as usize).unwrap_or(&[]));
            }
            self.rx = Rx::Data {
                cid,
                off: off + n,
                remaining: remaining - n,
                datal,
                flags,
                digest,
            };
            if remaining == n {
                self.data_payload_end(done);
            }
        }
    }

    /// Feeds received bytes; returns how many were consumed. Bytes not consumed
    /// (an incomplete PDU header) must be offered again with more after them.
    pub fn on_bytes(&mut self, buf: &[u8], done: &mut Vec<Done<C>>) -> Result<usize, QueueError> {
        let mut pos = 0;
        while pos < buf.len() {
            match self.rx {
                Rx::Header => match self.on_header(&buf[pos..], done)? {
                    Some(n) => pos += n,
                    None => break,
                },
                Rx::Data {
                    cid,
                    off,
                    remaining,
                    datal,
                    flags,
                    mut digest,
                } => {
                    let n = (buf.len() - pos).min(remaining as usize);
                    let src = &buf[pos..pos + n];
                    if let Some(d) = digest.as_mut() {
                        d.update(src);
                    }
                    if let Some(dst) = self
                        .cmd_data_mut(cid)
                        .get_mut(off as usize..off as usize + n)
                    {
                        dst.copy_from_slice(src);
                    }
                    pos += n;
                    let remaining = remaining - n as u32;
                    self.rx = Rx::Data {
                        cid,
                        off: off + n as u32,
                        remaining,
                        datal,
                        flags,
                        digest,
                    };
                    if remaining == 0 {
                        self.data_payload_end(done);
                    }
                }
                Rx::Digest {
                    cid,
                    datal,
                    flags,
                    want,
                    mut got,
                    mut bytes,
                } => {
                    while got < 4 && pos < buf.len() {
                        bytes[got as usize] = buf[pos];
                        got += 1;
                        pos += 1;
                    }
                    if got < 4 {
                        self.rx = Rx::Digest {
                            cid,
                            datal,
                            flags,
                            want,
                            got,
                            bytes,
                        };
                    } else {
                        if u32::from_le_bytes(bytes) != want {
                            self.cmds[cid as usize].err = Some(CmdErrKind::DataDigest);
                        }
                        self.data_pdu_end(cid, datal, flags, done);
                    }
                }
            }
        }
        Ok(pos)
    }

    fn data_payload_end(&mut self, done: &mut Vec<Done<C>>) {
        if let Rx::Data {
            cid,
            datal,
            flags,
            digest,
            ..
        } = self.rx
        {
            match digest {
                Some(d) => {
                    self.rx = Rx::Digest {
                        cid,
                        datal,
                        flags,
                        want: d.finish(),
                        got: 0,
                        bytes: [0; 4],
                    }
                }
                None => self.data_pdu_end(cid, datal, flags, done),
            }
        }
    }

    fn data_pdu_end(&mut self, cid: u16, datal: u32, flags: u8, done: &mut Vec<Done<C>>) {
        self.rx = Rx::Header;
        let c = &mut self.cmds[cid as usize];
        c.received += datal;
        if flags & FLAG_LAST_PDU != 0 && flags & FLAG_SUCCESS != 0 {
            // The controller skips the CapsuleResp (SQ flow control disabled).
            let cqe = Cqe::new(cid, Status::SUCCESS);
            self.on_response(cqe, done);
        }
    }

    fn proto(&self, fes: FatalError, fei: u32, reason: &'static str, hdr: &[u8]) -> QueueError {
        let n = hdr.len().min(TERM_REQ_MAX_DATA);
        QueueError::Protocol {
            qid: self.cfg.qid,
            err: PduError::new(fes, fei, reason),
            header: hdr[..n].to_vec(),
        }
    }

    /// Parses one PDU header at the start of `b`; `None` when more bytes are needed.
    fn on_header(
        &mut self,
        b: &[u8],
        done: &mut Vec<Done<C>>,
    ) -> Result<Option<usize>, QueueError> {
        if b.len() < CH_LEN {
            return Ok(None);
        }
        let ty = PduType::from_u8(b[0]);
        let flags = b[1];
        let hlen = b[2] as usize;
        let pdo = b[3] as usize;
        let plen = u32_at(b, 4) as usize;
        let ch = &b[..CH_LEN];
        let hd = if self.cfg.digest.header {
            DIGEST_LEN
        } else {
            0
        };
        match ty {
            Some(PduType::CapsuleResp) | Some(PduType::R2T) | Some(PduType::C2HData) => {
                if hlen != SHORT_HLEN {
                    return Err(self.proto(FatalError::InvalidHeaderField, 2, "bad hlen", ch));
                }
                if (flags & FLAG_HDGSTF != 0) != self.cfg.digest.header {
                    return Err(self.proto(FatalError::InvalidHeaderField, 1, "HDGSTF", ch));
                }
            }
            Some(PduType::C2HTermReq) => {
                if !(SHORT_HLEN..=SHORT_HLEN + TERM_REQ_MAX_DATA).contains(&plen) {
                    return Err(self.proto(FatalError::InvalidHeaderField, 4, "TermReq plen", ch));
                }
                if b.len() < SHORT_HLEN {
                    return Ok(None);
                }
                return Err(QueueError::TermReq {
                    qid: self.cfg.qid,
                    fes: u16_at(b, 8),
                    fei: u32_at(b, 10),
                });
            }
            _ => {
                return Err(self.proto(
                    FatalError::InvalidHeaderField,
                    0,
                    "unexpected PDU type",
                    ch,
                ));
            }
        }
        let hend = SHORT_HLEN + hd;
        let is_data = ty == Some(PduType::C2HData);
        if !is_data && plen != hend {
            return Err(self.proto(FatalError::InvalidHeaderField, 4, "plen", ch));
        }
        let need = if is_data {
            if pdo < hend {
                return Err(self.proto(
                    FatalError::InvalidHeaderField,
                    3,
                    "pdo inside the header",
                    ch,
                ));
            }
            pdo
        } else {
            hend
        };
        if b.len() < need {
            return Ok(None);
        }
        let h = &b[..need];
        if hd != 0 && u32_at(b, SHORT_HLEN) != crc32c(&b[..SHORT_HLEN]) {
            return Err(self.proto(FatalError::HeaderDigestError, 0, "header digest", h));
        }
        match ty {
            Some(PduType::CapsuleResp) => {
                let mut c = [0u8; CQE_LEN];
                c.copy_from_slice(&b[8..8 + CQE_LEN]);
                let cqe = Cqe::from_bytes(&c);
                if !self.cid_active(cqe.cid) {
                    return Err(self.proto(
                        FatalError::InvalidHeaderField,
                        20,
                        "CapsuleResp for a command not in flight",
                        h,
                    ));
                }
                self.on_response(cqe, done);
            }
            Some(PduType::R2T) => {
                let cid = u16_at(b, 8);
                let ttag = u16_at(b, 10);
                let r2to = u32_at(b, 12);
                let r2tl = u32_at(b, 16);
                if !self.cid_active(cid) {
                    return Err(self.proto(
                        FatalError::InvalidHeaderField,
                        8,
                        "R2T for unknown command",
                        h,
                    ));
                }
                let c = self.cmds[cid as usize];
                if c.dir != DIR_TO || c.in_capsule {
                    return Err(self.proto(
                        FatalError::PduSequenceError,
                        0,
                        "R2T for a command without R2T data",
                        h,
                    ));
                }
                if r2tl == 0 || r2to != c.r2t_upto || r2to as u64 + r2tl as u64 > c.len as u64 {
                    return Err(self.proto(
                        FatalError::DataTransferOutOfRange,
                        12,
                        "R2T range outside the command's data",
                        h,
                    ));
                }
                self.cmds[cid as usize].r2t_upto = r2to + r2tl;
                let max = self.cfg.maxh2cdata.max(4096) as u32;
                let mut off = r2to;
                let end = r2to + r2tl;
                while off < end {
                    let n = (end - off).min(max);
                    let last = off + n == end;
                    let dh = DataHdr {
                        cccid: cid,
                        ttag,
                        datao: off,
                        datal: n,
                    };
                    let flags = if last { FLAG_LAST_PDU } else { 0 };
                    self.queue_pdu(PduHeader::H2CData(dh), flags, cid, off, n);
                    off += n;
                }
            }
            Some(PduType::C2HData) => {
                let cid = u16_at(b, 8);
                let datao = u32_at(b, 12);
                let datal = u32_at(b, 16);
                let dd = if flags & FLAG_DDGSTF != 0 {
                    DIGEST_LEN
                } else {
                    0
                };
                if (dd != 0) != self.cfg.digest.data {
                    return Err(self.proto(FatalError::InvalidHeaderField, 1, "DDGSTF", h));
                }
                if datal == 0 || plen != pdo + datal as usize + dd {
                    return Err(self.proto(FatalError::InvalidHeaderField, 16, "datal/plen", h));
                }
                if !self.cid_active(cid) {
                    return Err(self.proto(
                        FatalError::InvalidHeaderField,
                        8,
                        "C2HData for unknown command",
                        h,
                    ));
                }
                let c = self.cmds[cid as usize];
                if c.dir != DIR_FROM {
                    return Err(self.proto(
                        FatalError::PduSequenceError,
                        0,
                        "C2HData for a command that reads nothing",
                        h,
                    ));
                }
                if datao != c.received || datao as u64 + datal as u64 > c.len as u64 {
                    return Err(self.proto(
                        FatalError::DataTransferOutOfRange,
                        12,
                        "C2HData outside the command's data",
                        h,
                    ));
                }
                let digest = if dd != 0 {
                    Some(DataDigest::new())
                } else {
                    None
                };
                self.rx = Rx::Data {
                    cid,
                    off: datao,
                    remaining: datal,
                    datal,
                    flags,
                    digest,
                };
            }
            _ => {}
        }
        Ok(Some(need))
    }

    fn cid_active(&self, cid: u16) -> bool {
        self.cmds.get(cid as usize).is_some_and(|c| c.active)
    }

    fn on_response(&mut self, cqe: Cqe, done: &mut Vec<Done<C>>) {
        let c = &mut self.cmds[cqe.cid as usize];
        if c.tx_refs > 0 {
            // Data of this command is still queued; finish once it is out of our hands.
            c.resp = Some(cqe);
            return;
        }
        self.finish_cmd(cqe.cid, cqe, done);
    }

    fn finish_cmd(&mut self, cid: u16, cqe: Cqe, done: &mut Vec<Done<C>>) {
        let c = self.cmds[cid as usize];
        self.cmds[cid as usize].active = false;
        self.free_cids.push(cid);
        let ri = c.req;
        let mut unqueue = false;
        if let Some(s) = self.reqs[ri as usize].as_mut() {
            s.outstanding = s.outstanding.saturating_sub(1);
            s.cqe = cqe;
            let err = if !cqe.status.is_success() {
                Some(CmdError::Status(cqe))
            } else if c.err == Some(CmdErrKind::DataDigest) {
                Some(CmdError::DataDigest)
            } else if c.dir == DIR_FROM && c.received != c.len {
                Some(CmdError::ShortData {
                    expected: c.len,
                    got: c.received,
                })
            } else {
                None
            };
            if let Some(e) = err {
                if s.err.is_none() {
                    s.err = Some(e);
                }
                // Issue nothing more of a request that already failed.
                if !s.issued_all {
                    s.issued_all = true;
                    unqueue = true;
                }
            }
        }
        if unqueue {
            self.pending.retain(|&x| x != ri);
        }
        self.maybe_complete(ri, done);
        self.issue_pending(done);
    }

    fn maybe_complete(&mut self, ri: u16, done: &mut Vec<Done<C>>) {
        let ready = match &self.reqs[ri as usize] {
            Some(s) => s.issued_all && s.outstanding == 0,
            None => false,
        };
        if !ready {
            return;
        }
        if let Some(s) = self.reqs[ri as usize].take() {
            self.free_reqs.push(ri);
            self.active_reqs -= 1;
            let result = match s.err {
                Some(e) => Err(e),
                None => Ok(s.cqe),
            };
            done.push(Done { req: s.req, result });
        }
    }

    /// The first request whose deadline has passed, as the error that ends the connection.
    pub fn check_timeouts(&self, now: Instant) -> Result<(), QueueError> {
        for s in self.reqs.iter().flatten() {
            if let Some(d) = s.deadline {
                if now >= d {
                    let (cid, opcode) = self
                        .cmds
                        .iter()
                        .enumerate()
                        .find(|(_, c)| {
                            c.active
                                && self.reqs[c.req as usize]
                                    .as_ref()
                                    .is_some_and(|x| x.seq == s.seq)
                        })
                        .map(|(i, c)| (i as u16, c.opcode))
                        .unwrap_or((u16::MAX, 0));
                    return Err(QueueError::Timeout {
                        qid: self.cfg.qid,
                        cid,
                        opcode,
                        after: now.duration_since(s.submitted),
                    });
                }
            }
        }
        Ok(())
    }

    /// Ends the queue: every unfinished request comes back, oldest first, for
    /// the caller to retry on a new connection or to fail.
    pub fn into_requests(mut self) -> Vec<Request<C>> {
        let mut v: Vec<(u64, Request<C>)> = self
            .reqs
            .iter_mut()
            .filter_map(|s| s.take())
            .map(|s| (s.seq, s.req))
            .collect();
        v.sort_by_key(|(seq, _)| *seq);
        v.into_iter().map(|(_, r)| r).collect()
    }
}

fn validate<C>(req: &Request<C>) -> Result<(), &'static str> {
    match req.cmd {
        Command::Raw { dir, .. } => {
            if dir != DataDir::None && req.buf.is_empty() {
                return Err("data direction without a buffer");
            }
            if req.buf.len() > u32::MAX as usize {
                return Err("buffer too large");
            }
        }
        Command::Io(io) => {
            if io.block_size == 0 || !io.block_size.is_power_of_two() {
                return Err("bad block size");
            }
            match io.kind {
                IoKind::Read | IoKind::Write => {
                    if io.nblocks == 0 {
                        return Err("zero-length I/O");
                    }
                    let want = io.nblocks.checked_mul(io.block_size as u64);
                    if want != Some(req.buf.len() as u64) {
                        return Err("buffer length does not match the block count");
                    }
                }
                IoKind::WriteZeroes | IoKind::Unmap => {
                    if io.nblocks == 0 {
                        return Err("zero-length I/O");
                    }
                }
                IoKind::Flush => {}
            }
            if io.slba.checked_add(io.nblocks).is_none() {
                return Err("LBA range overflows");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvme_wire::pdu::{Decoded, Decoder, Pdu, R2t, TermReq};
    use nvme_wire::status::GenericStatus;

    type Q = QueueCore<u32>;

    fn cfg(digest: DigestConfig) -> QueueConfig {
        QueueConfig {
            qid: 1,
            depth: 4,
            max_requests: 4,
            icd_max: 4096,
            maxh2cdata: 16384,
            digest,
            cpda: 0,
            max_xfer: 0,
            cmd_timeout: Duration::from_secs(5),
        }
    }

    fn dg(h: bool, d: bool) -> DigestConfig {
        DigestConfig { header: h, data: d }
    }

    fn io(kind: IoKind, slba: u64, nblocks: u64) -> IoCmd {
        IoCmd {
            kind,
            nsid: 1,
            slba,
            nblocks,
            block_size: 512,
            fua: false,
        }
    }

    fn pattern(len: usize, seed: u8) -> IoBuf {
        let v: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        IoBuf::from_slice(&v)
    }

    /// Takes every queued byte, as a socket accepting all of it would.
    fn drain_tx(q: &mut Q, done: &mut Vec<Done<u32>>) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut iov = [IoSlice::new(&[]); 8];
            let n = q.tx_iovecs(&mut iov);
            if n == 0 {
                break;
            }
            let mut sent = 0;
            for s in &iov[..n] {
                out.extend_from_slice(s);
                sent += s.len();
            }
            q.tx_advance(sent, done);
        }
        assert!(!q.tx_pending());
        out
    }

    /// Decodes the host's PDUs as a controller would.
    fn pdus(dgst: DigestConfig, bytes: &[u8]) -> Vec<(Pdu, Vec<u8>)> {
        let dec = Decoder {
            digest: dgst,
            pda: 0,
            max_data: 1 << 20,
        };
        let mut v = Vec::new();
        let mut b = bytes;
        while !b.is_empty() {
            match dec.decode(b).unwrap() {
                Decoded::Pdu(p) => {
                    assert!(p.data_digest_ok);
                    v.push((p, p.data(b).to_vec()));
                    b = &b[p.plen..];
                }
                Decoded::Need(n) => panic!("truncated PDU, need {n}"),
            }
        }
        v
    }

    fn sqe_of(p: &Pdu) -> Sqe {
        match p.header {
            PduHeader::CapsuleCmd(s) => s,
            h => panic!("not a command: {h:?}"),
        }
    }

    fn ctrl_enc(d: DigestConfig) -> Encoder {
        Encoder { digest: d, pda: 0 }
    }

    fn resp(d: DigestConfig, cid: u16, status: Status) -> Vec<u8> {
        let mut out = Vec::new();
        ctrl_enc(d).pdu(
            &PduHeader::CapsuleResp(Cqe::new(cid, status)),
            0,
            &[],
            &mut out,
        );
        out
    }

    fn c2h(d: DigestConfig, cid: u16, datao: u32, data: &[u8], last: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let h = DataHdr {
            cccid: cid,
            ttag: 0,
            datao,
            datal: data.len() as u32,
        };
        ctrl_enc(d).pdu(
            &PduHeader::C2HData(h),
            if last { FLAG_LAST_PDU } else { 0 },
            data,
            &mut out,
        );
        out
    }

    fn r2t(d: DigestConfig, cid: u16, ttag: u16, r2to: u32, r2tl: u32) -> Vec<u8> {
        let mut out = Vec::new();
        ctrl_enc(d).pdu(
            &PduHeader::R2T(R2t {
                cccid: cid,
                ttag,
                r2to,
                r2tl,
            }),
            0,
            &[],
            &mut out,
        );
        out
    }

    fn feed(q: &mut Q, bytes: &[u8], done: &mut Vec<Done<u32>>) {
        assert_eq!(q.on_bytes(bytes, done).unwrap(), bytes.len());
    }

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn read_with_every_digest_setting() {
        for d in [
            dg(false, false),
            dg(true, false),
            dg(false, true),
            dg(true, true),
        ] {
            let mut q = Q::new(cfg(d));
            let mut done = Vec::new();
            q.submit(
                Request::new(
                    Command::Io(io(IoKind::Read, 100, 16)),
                    IoBuf::zeroed(8192),
                    7,
                ),
                now(),
                &mut done,
            )
            .unwrap();
            let sent = pdus(d, &drain_tx(&mut q, &mut done));
            assert_eq!(sent.len(), 1);
            let sqe = sqe_of(&sent[0].0);
            assert_eq!(sqe.opcode(), 0x02);
            assert_eq!(sqe.nsid(), 1);
            assert_eq!(sqe.slba(), 100);
            assert_eq!(sqe.nlb(), 16);
            assert!(sqe.sgl().is_transport());
            assert_eq!(sqe.sgl().length, 8192);
            let cid = sqe.cid();
            let data = pattern(8192, 3);
            let mut rx = c2h(d, cid, 0, &data[..5000], false);
            rx.extend(c2h(d, cid, 5000, &data[5000..], true));
            rx.extend(resp(d, cid, Status::SUCCESS));
            feed(&mut q, &rx, &mut done);
            assert_eq!(done.len(), 1);
            let r = done.pop().unwrap();
            assert_eq!(r.req.ctx, 7);
            assert!(r.result.is_ok());
            assert_eq!(&r.req.buf[..], &data[..]);
            assert_eq!(q.in_flight(), 0);
        }
    }

    #[test]
    fn small_write_goes_in_capsule_with_digest() {
        let d = dg(true, true);
        let mut q = Q::new(cfg(d));
        let mut done = Vec::new();
        let data = pattern(4096, 9);
        let mut cmd = io(IoKind::Write, 8, 8);
        cmd.fua = true;
        q.submit(
            Request::new(Command::Io(cmd), data.clone(), 1),
            now(),
            &mut done,
        )
        .unwrap();
        let sent = pdus(d, &drain_tx(&mut q, &mut done));
        assert_eq!(sent.len(), 1);
        let sqe = sqe_of(&sent[0].0);
        assert_eq!(sqe.opcode(), 0x01);
        assert!(sqe.fua());
        assert!(sqe.sgl().is_in_capsule());
        assert_eq!(sent[0].1, &data[..]);
        feed(&mut q, &resp(d, sqe.cid(), Status::SUCCESS), &mut done);
        assert!(done.pop().unwrap().result.is_ok());
    }

    #[test]
    fn large_write_answers_r2t_with_h2cdata_cut_at_maxh2cdata() {
        let d = dg(false, true);
        let mut q = Q::new(cfg(d));
        let mut done = Vec::new();
        let data = pattern(65536, 1);
        q.submit(
            Request::new(Command::Io(io(IoKind::Write, 0, 128)), data.clone(), 2),
            now(),
            &mut done,
        )
        .unwrap();
        let sent = pdus(d, &drain_tx(&mut q, &mut done));
        assert_eq!(sent.len(), 1);
        let sqe = sqe_of(&sent[0].0);
        assert!(sqe.sgl().is_transport());
        assert_eq!(sqe.sgl().length, 65536);
        assert!(sent[0].1.is_empty());
        let cid = sqe.cid();
        // Two R2Ts, as a target with a 32 KiB R2T limit sends them.
        feed(&mut q, &r2t(d, cid, 5, 0, 32768), &mut done);
        let a = pdus(d, &drain_tx(&mut q, &mut done));
        feed(&mut q, &r2t(d, cid, 6, 32768, 32768), &mut done);
        let b = pdus(d, &drain_tx(&mut q, &mut done));
        let mut got = Vec::new();
        for (i, (p, payload)) in a.iter().chain(b.iter()).enumerate() {
            let PduHeader::H2CData(h) = p.header else {
                panic!("{:?}", p.header)
            };
            assert_eq!(h.cccid, cid);
            assert_eq!(h.ttag, if i < 2 { 5 } else { 6 });
            assert_eq!(h.datao as usize, got.len());
            assert_eq!(h.datal, 16384);
            assert_eq!(p.last_pdu(), i % 2 == 1, "LAST_PDU ends each R2T's data");
            got.extend_from_slice(payload);
        }
        assert_eq!(got, &data[..]);
        assert!(done.is_empty());
        feed(&mut q, &resp(d, cid, Status::SUCCESS), &mut done);
        assert!(done.pop().unwrap().result.is_ok());
    }

    #[test]
    fn response_before_data_is_sent_waits_for_the_data() {
        let d = dg(false, false);
        let mut q = Q::new(cfg(d));
        let mut done = Vec::new();
        q.submit(
            Request::new(Command::Io(io(IoKind::Write, 0, 64)), pattern(32768, 0), 3),
            now(),
            &mut done,
        )
        .unwrap();
        let sent = pdus(d, &drain_tx(&mut q, &mut done));
        let cid = sqe_of(&sent[0].0).cid();
        feed(&mut q, &r2t(d, cid, 1, 0, 32768), &mut done);
        // The controller fails the command while our H2CData is still queued.
        let st = Status::generic(GenericStatus::DataTransferError);
        feed(&mut q, &resp(d, cid, st), &mut done);
        assert!(
            done.is_empty(),
            "the buffer is still referenced by the send queue"
        );
        drain_tx(&mut q, &mut done);
        let r = done.pop().unwrap();
        assert_eq!(r.result, Err(CmdError::Status(Cqe::new(cid, st))));
    }

    #[test]
    fn splits_at_mdts_and_completes_once() {
        let d = dg(false, false);
        let mut c = cfg(d);
        c.max_xfer = 8192;
        c.depth = 3;
        let mut q = Q::new(c);
        let mut done = Vec::new();
        q.submit(
            Request::new(
                Command::Io(io(IoKind::Read, 1000, 64)),
                IoBuf::zeroed(32768),
                4,
            ),
            now(),
            &mut done,
        )
        .unwrap();
        let data = pattern(32768, 5);
        let mut seen = Vec::new();
        // Depth 3: three commands now, the fourth once one completes.
        for round in 0..2 {
            let sent = pdus(d, &drain_tx(&mut q, &mut done));
            assert_eq!(sent.len(), if round == 0 { 3 } else { 1 });
            for (p, _) in sent {
                let s = sqe_of(&p);
                assert_eq!(s.nlb(), 16);
                let off = ((s.slba() - 1000) * 512) as usize;
                seen.push(s.slba());
                let mut rx = c2h(d, s.cid(), 0, &data[off..off + 8192], true);
                rx.extend(resp(d, s.cid(), Status::SUCCESS));
                feed(&mut q, &rx, &mut done);
            }
        }
        assert_eq!(seen, vec![1000, 1016, 1032, 1048]);
        assert_eq!(done.len(), 1);
        assert_eq!(&done[0].req.buf[..], &data[..]);
    }

    #[test]
    fn a_failed_part_stops_the_split_and_fails_the_request() {
        let d = dg(false, false);
        let mut c = cfg(d);
        c.max_xfer = 4096;
        c.depth = 1;
        let mut q = Q::new(c);
        let mut done = Vec::new();
        q.submit(
            Request::new(
                Command::Io(io(IoKind::Read, 0, 32)),
                IoBuf::zeroed(16384),
                4,
            ),
            now(),
            &mut done,
        )
        .unwrap();
        let sent = pdus(d, &drain_tx(&mut q, &mut done));
        let cid = sqe_of(&sent[0].0).cid();
        let st = Status::generic(GenericStatus::LbaOutOfRange).with_dnr();
        feed(&mut q, &resp(d, cid, st), &mut done);
        assert!(!q.tx_pending(), "no further part is issued");
        let r = done.pop().unwrap();
        assert!(matches!(r.result, Err(CmdError::Status(c)) if c.status == st));
        assert!(!r.result.unwrap_err().retryable());
        assert_eq!(q.in_flight(), 0);
        assert!(q.has_room());
    }

    #[test]
    fn data_digest_error_fails_the_command_not_the_connection() {
        let d = dg(false, true);
        let mut q = Q::new(cfg(d));
        let mut done = Vec::new();
        for ctx in 0..2 {
            q.submit(
                Request::new(Command::Io(io(IoKind::Read, 0, 1)), IoBuf::zeroed(512), ctx),
                now(),
                &mut done,
            )
            .unwrap();
        }
        let sent = pdus(d, &drain_tx(&mut q, &mut done));
        let (c0, c1) = (sqe_of(&sent[0].0).cid(), sqe_of(&sent[1].0).cid());
        let mut bad = c2h(d, c0, 0, &[1u8; 512], true);
        let n = bad.len();
        bad[n - 1] ^= 0xFF; // corrupt the digest
        bad.extend(resp(d, c0, Status::SUCCESS));
        bad.extend(c2h(d, c1, 0, &[2u8; 512], true));
        bad.extend(resp(d, c1, Status::SUCCESS));
        feed(&mut q, &bad, &mut done);
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].result, Err(CmdError::DataDigest));
        assert!(done[0].result.as_ref().unwrap_err().retryable());
        assert_eq!(
            done[0].result.as_ref().unwrap_err().status().sc,
            GenericStatus::TransientTransportError as u8
        );
        assert!(done[1].result.is_ok());
        assert_eq!(&done[1].req.buf[..], &[2u8; 512][..]);
    }

    #[test]
    fn header_digest_error_is_fatal_with_term_req() {
        let d = dg(true, false);
        let mut q = Q::new(cfg(d));
        let mut done = Vec::new();
        q.submit(
            Request::new(Command::Io(io(IoKind::Flush, 0, 0)), IoBuf::empty(), 0),
            now(),
            &mut done,
        )
        .unwrap();
        let sent = pdus(d, &drain_tx(&mut q, &mut done));
        let mut rx = resp(d, sqe_of(&sent[0].0).cid(), Status::SUCCESS);
        rx[25] ^= 1;
        let e = q.on_bytes(&rx, &mut done).unwrap_err();
        let QueueError::Protocol { err, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(err.fes, FatalError::HeaderDigestError);
        let t = e.term_req().unwrap();
        assert_eq!(t[0], PduType::H2CTermReq as u8);
        assert_eq!(u16_at(&t, 8), FatalError::HeaderDigestError as u16);
        assert_eq!(&t[24..], &rx[..24], "carries the offending header");
    }

    #[test]
    fn controller_mistakes_are_fatal() {
        let d = dg(false, false);
        let mk = || {
            let mut q = Q::new(cfg(d));
            let mut done = Vec::new();
            q.submit(
                Request::new(Command::Io(io(IoKind::Read, 0, 8)), IoBuf::zeroed(4096), 0),
                now(),
                &mut done,
            )
            .unwrap();
            let cid = sqe_of(&pdus(d, &drain_tx(&mut q, &mut done))[0].0).cid();
            (q, cid, done)
        };
        let fes = |e: QueueError| match e {
            QueueError::Protocol { err, .. } => err.fes,
            e => panic!("{e:?}"),
        };
        // data beyond the command
        let (mut q, cid, mut done) = mk();
        let e = q
            .on_bytes(&c2h(d, cid, 4000, &[0u8; 200], true), &mut done)
            .unwrap_err();
        assert_eq!(fes(e), FatalError::DataTransferOutOfRange);
        // data for a command not in flight
        let (mut q, cid, mut done) = mk();
        let e = q
            .on_bytes(&c2h(d, cid + 1, 0, &[0u8; 16], true), &mut done)
            .unwrap_err();
        assert_eq!(fes(e), FatalError::InvalidHeaderField);
        // response for a command not in flight
        let (mut q, cid, mut done) = mk();
        assert!(q
            .on_bytes(&resp(d, cid ^ 3, Status::SUCCESS), &mut done)
            .is_err());
        // R2T for a read
        let (mut q, cid, mut done) = mk();
        assert_eq!(
            fes(q.on_bytes(&r2t(d, cid, 0, 0, 512), &mut done).unwrap_err()),
            FatalError::PduSequenceError
        );
        // a PDU type a controller never sends
        let (mut q, _, mut done) = mk();
        let mut ic = Vec::new();
        Encoder::default().pdu(&PduHeader::CapsuleCmd(Sqe::new(0, 0)), 0, &[], &mut ic);
        assert_eq!(
            fes(q.on_bytes(&ic, &mut done).unwrap_err()),
            FatalError::InvalidHeaderField
        );
        // the controller's own TermReq
        let (mut q, _, mut done) = mk();
        let mut t = Vec::new();
        Encoder::default().pdu(
            &PduHeader::C2HTermReq(TermReq { fes: 2, fei: 0 }),
            0,
            &[0u8; 8],
            &mut t,
        );
        assert_eq!(
            q.on_bytes(&t, &mut done).unwrap_err(),
            QueueError::TermReq {
                qid: 1,
                fes: 2,
                fei: 0
            }
        );
        // a success response with missing data
        let (mut q, cid, mut done) = mk();
        let mut rx = c2h(d, cid, 0, &[0u8; 1024], false);
        rx.extend(resp(d, cid, Status::SUCCESS));
        feed(&mut q, &rx, &mut done);
        assert_eq!(
            done.pop().unwrap().result,
            Err(CmdError::ShortData {
                expected: 4096,
                got: 1024
            })
        );
    }

    #[test]
    fn byte_at_a_time_and_direct_receive() {
        let d = dg(true, true);
        let mut q = Q::new(cfg(d));
        let mut done = Vec::new();
        for ctx in 0..3u32 {
            q.submit(
                Request::new(
                    Command::Io(io(IoKind::Read, ctx as u64 * 64, 64)),
                    IoBuf::zeroed(32768),
                    ctx,
                ),
                now(),
                &mut done,
            )
            .unwrap();
        }
        let sent = pdus(d, &drain_tx(&mut q, &mut done));
        let cids: Vec<u16> = sent.iter().map(|(p, _)| sqe_of(p).cid()).collect();
        let datas: Vec<IoBuf> = (0..3).map(|i| pattern(32768, i as u8)).collect();
        // cid 0: one byte at a time; cid 1: straight into the buffer; cid 2: two chunks.
        let mut s0 = c2h(d, cids[0], 0, &datas[0], true);
        s0.extend(resp(d, cids[0], Status::SUCCESS));
        let mut pending = Vec::new();
        for b in s0 {
            pending.push(b);
            let n = q.on_bytes(&pending, &mut done).unwrap();
            pending.drain(..n);
        }
        assert!(pending.is_empty());
        assert_eq!(done.len(), 1);
        let s1 = c2h(d, cids[1], 0, &datas[1], true);
        let hdr = 24 + 4;
        feed(&mut q, &s1[..hdr + 100], &mut done);
        let dst = q.rx_direct().unwrap();
        assert_eq!(dst.len(), 32768 - 100);
        dst.copy_from_slice(&datas[1][100..]);
        q.rx_direct_done(32768 - 100, &mut done);
        assert!(q.rx_direct().is_none());
        feed(&mut q, &s1[hdr + 32768..], &mut done);
        feed(&mut q, &resp(d, cids[1], Status::SUCCESS), &mut done);
        let mut s2 = c2h(d, cids[2], 0, &datas[2][..1000], false);
        s2.extend(c2h(d, cids[2], 1000, &datas[2][1000..], true));
        s2.extend(resp(d, cids[2], Status::SUCCESS));
        let (a, b) = s2.split_at(777);
        feed(&mut q, a, &mut done);
        feed(&mut q, b, &mut done);
        assert_eq!(done.len(), 3);
        for r in &done {
            assert!(r.result.is_ok(), "{:?}", r.result);
            assert_eq!(&r.req.buf[..], &datas[r.req.ctx as usize][..]);
        }
    }

    #[test]
    fn many_in_flight_full_queue_and_out_of_order_completion() {
        let d = dg(false, false);
        let mut q = Q::new(cfg(d));
        let mut done = Vec::new();
        for ctx in 0..4 {
            q.submit(
                Request::new(Command::Io(io(IoKind::Flush, 0, 0)), IoBuf::empty(), ctx),
                now(),
                &mut done,
            )
            .unwrap();
        }
        assert!(!q.has_room());
        let back = q
            .submit(
                Request::new(Command::Io(io(IoKind::Flush, 0, 0)), IoBuf::empty(), 9),
                now(),
                &mut done,
            )
            .unwrap_err();
        assert_eq!(back.ctx, 9);
        let sent = pdus(d, &drain_tx(&mut q, &mut done));
        let mut cids: Vec<u16> = sent.iter().map(|(p, _)| sqe_of(p).cid()).collect();
        let mut sorted = cids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 4, "distinct command ids");
        cids.reverse();
        for c in &cids {
            feed(&mut q, &resp(d, *c, Status::SUCCESS), &mut done);
        }
        let order: Vec<u32> = done.iter().map(|r| r.req.ctx).collect();
        assert_eq!(order, vec![3, 2, 1, 0]);
        assert!(q.has_room());
    }

    #[test]
    fn other_io_commands_encode_as_the_spec_says() {
        let d = dg(false, false);
        let mut q = Q::new(cfg(d));
        let mut done = Vec::new();
        q.submit(
            Request::new(
                Command::Io(io(IoKind::WriteZeroes, 77, 200_000)),
                IoBuf::empty(),
                0,
            ),
            now(),
            &mut done,
        )
        .unwrap();
        q.submit(
            Request::new(
                Command::Io(io(IoKind::Unmap, 5, 300_000)),
                IoBuf::empty(),
                1,
            ),
            now(),
            &mut done,
        )
        .unwrap();
        q.submit(
            Request::new(Command::Io(io(IoKind::Flush, 0, 0)), IoBuf::empty(), 2),
            now(),
            &mut done,
        )
        .unwrap();
        let sent = pdus(d, &drain_tx(&mut q, &mut done));
        // write zeroes splits at 65536 blocks: 4 commands, depth 4 → 3 go now with the DSM
        let s: Vec<Sqe> = sent.iter().map(|(p, _)| sqe_of(p)).collect();
        assert_eq!(s[0].opcode(), 0x08);
        assert_eq!((s[0].slba(), s[0].nlb()), (77, 65536));
        assert_eq!((s[1].slba(), s[1].nlb()), (77 + 65536, 65536));
        assert_eq!(s[2].slba(), 77 + 2 * 65536);
        assert_eq!(s[0].sgl(), Sgl::transport(0), "no data: null transport SGL");
        assert_eq!(s.len(), 4);
        assert_eq!(s[3].opcode(), 0x08);
        for x in &s {
            feed(&mut q, &resp(d, x.cid(), Status::SUCCESS), &mut done);
        }
        let sent = pdus(d, &drain_tx(&mut q, &mut done));
        let dsm = sqe_of(&sent[0].0);
        assert_eq!(dsm.opcode(), 0x09);
        assert_eq!(dsm.cdw(10), 0, "one range");
        assert_eq!(dsm.cdw(11), 4, "attribute deallocate");
        assert!(dsm.sgl().is_in_capsule());
        let range = &sent[0].1;
        assert_eq!(u32_at(range, 4), 300_000);
        assert_eq!(nvme_wire::le::u64_at(range, 8), 5);
        let flush = sqe_of(&sent[1].0);
        assert_eq!((flush.opcode(), flush.nsid()), (0x00, 1));
        for (p, _) in &sent {
            feed(
                &mut q,
                &resp(d, sqe_of(p).cid(), Status::SUCCESS),
                &mut done,
            );
        }
        let order: Vec<u32> = done.iter().map(|r| r.req.ctx).collect();
        assert_eq!(order, vec![0, 1, 2]);
    }

    #[test]
    fn timeouts_invalid_requests_and_handing_back() {
        let d = dg(false, false);
        let mut q = Q::new(cfg(d));
        let mut done = Vec::new();
        let t0 = now();
        q.submit(
            Request::new(Command::Io(io(IoKind::Read, 0, 1)), IoBuf::zeroed(512), 0),
            t0,
            &mut done,
        )
        .unwrap();
        let mut aer = Request::new(
            Command::Raw {
                sqe: Sqe::new(0x0C, 0),
                dir: DataDir::None,
            },
            IoBuf::empty(),
            1,
        );
        aer.no_timeout = true;
        q.submit(aer, t0, &mut done).unwrap();
        q.submit(
            Request::new(Command::Io(io(IoKind::Read, 0, 2)), IoBuf::zeroed(512), 2),
            t0,
            &mut done,
        )
        .unwrap();
        assert!(matches!(
            done.pop().unwrap().result,
            Err(CmdError::Invalid(_))
        ));
        drain_tx(&mut q, &mut done);
        assert!(q.check_timeouts(t0 + Duration::from_secs(4)).is_ok());
        let e = q.check_timeouts(t0 + Duration::from_secs(6)).unwrap_err();
        assert!(
            matches!(e, QueueError::Timeout { opcode: 0x02, .. }),
            "{e:?}"
        );
        let back = q.into_requests();
        assert_eq!(back.iter().map(|r| r.ctx).collect::<Vec<_>>(), vec![0, 1]);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// A queue with reads, writes (R2T) and a flush in flight, and a valid
        /// controller byte stream answering them, to mutate.
        fn busy_queue(d: DigestConfig) -> (Q, Vec<u8>) {
            let mut q = Q::new(cfg(d));
            let mut done = Vec::new();
            let reqs = [
                (io(IoKind::Read, 0, 16), IoBuf::zeroed(8192)),
                (io(IoKind::Write, 0, 64), pattern(32768, 1)),
                (io(IoKind::Flush, 0, 0), IoBuf::empty()),
            ];
            for (i, (c, b)) in reqs.into_iter().enumerate() {
                q.submit(Request::new(Command::Io(c), b, i as u32), now(), &mut done)
                    .unwrap();
            }
            let sent = pdus(d, &drain_tx(&mut q, &mut done));
            let cids: Vec<u16> = sent.iter().map(|(p, _)| sqe_of(p).cid()).collect();
            let mut rx = c2h(d, cids[0], 0, &[5u8; 8192], true);
            rx.extend(resp(d, cids[0], Status::SUCCESS));
            rx.extend(r2t(d, cids[1], 1, 0, 32768));
            rx.extend(resp(d, cids[2], Status::SUCCESS));
            (q, rx)
        }

        fn run(q: &mut Q, bytes: &[u8], cuts: &[usize]) {
            let mut done = Vec::new();
            let mut pending: Vec<u8> = Vec::new();
            let mut pos = 0;
            for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
                let c = c.min(bytes.len()).max(pos);
                pending.extend_from_slice(&bytes[pos..c]);
                pos = c;
                match q.on_bytes(&pending, &mut done) {
                    Ok(n) => {
                        pending.drain(..n);
                    }
                    Err(e) => {
                        let _ = e.term_req();
                        return;
                    }
                }
                // the send side keeps working whatever came in
                let _ = drain_tx_lenient(q, &mut done);
                let _ = q.check_timeouts(now());
            }
        }

        fn drain_tx_lenient(q: &mut Q, done: &mut Vec<Done<u32>>) -> usize {
            let mut total = 0;
            while q.tx_pending() {
                let mut iov = [IoSlice::new(&[]); 8];
                let n = q.tx_iovecs(&mut iov);
                let sent: usize = iov[..n].iter().map(|s| s.len()).sum();
                q.tx_advance(sent, done);
                total += sent;
            }
            total
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                           cuts in proptest::collection::vec(0usize..600, 0..6),
                                           h in any::<bool>(), dd in any::<bool>()) {
                let (mut q, _) = busy_queue(dg(h, dd));
                run(&mut q, &bytes, &cuts);
            }

            #[test]
            fn mutated_valid_streams_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
                                                 cuts in proptest::collection::vec(0usize..9000, 0..6),
                                                 h in any::<bool>(), dd in any::<bool>()) {
                let (mut q, mut rx) = busy_queue(dg(h, dd));
                for (at, x) in flips {
                    let n = rx.len();
                    rx[at % n] ^= x;
                }
                run(&mut q, &rx, &cuts);
                let _ = q.into_requests();
            }
        }
    }
}
