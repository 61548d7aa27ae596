//! One NVMe/TCP connection (one queue pair) on the target, as a state machine.
//!
//! The driver feeds it received bytes ([`Connection::on_bytes`]) and bdev
//! completions ([`Connection::on_completion`]); it answers with bdev submissions
//! (in an action list) and with output the driver writes with vectored sends
//! ([`Connection::fill_iovecs`] / [`Connection::consume_output`]). It never
//! touches a socket, so every protocol rule can be tested by feeding bytes.
//!
//! Memory is bounded: the receive side never needs more than one maximum PDU
//! (the decoder rejects larger ones from their first 8 bytes), commands are
//! bounded by the queue size, and data buffers by a per-connection budget
//! (commands beyond it wait for buffers instead of allocating).

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::Instant;

use bdev::buf::BufPool;
use bdev::outbox::Outbox;
use bdev::{BdevIo, BdevRef, IoBuf, IoError, IoKind};
use nvme_wire::cqe::Cqe;
use nvme_wire::digest::DataDigest;
use nvme_wire::fabrics::{
    self, connect_data_offset as cdo, connect_sqe_offset as cso, reg, Cap, Cc, ConnectCmd,
    ConnectData, PropertyCmd, CNTLID_DYNAMIC,
};
use nvme_wire::opcode::{AdminOpcode, FabricsType, IoOpcode};
use nvme_wire::pdu::{
    self, DataHdr, Decoded, Decoder, Encoder, FatalError, IcResp, PduError, PduHeader, R2t,
    FLAG_LAST_PDU,
};
use nvme_wire::status::{CommandSpecificStatus, GenericStatus};
use nvme_wire::{Sqe, Status};
use tracing::{debug, warn};

use super::admin::{self, AdminCtx, AERL};
use super::ctrlr::{Controller, QueueCtl};
use super::state::CtrlState;
use super::subsystem::{Namespace, Subsystem};
use super::{ListenAddress, Target, TransportOpts, ADMIN_IN_CAPSULE, ADMIN_MAX_SQSIZE};
use crate::status_map::io_error_to_status;

/// A request for the driver: submit this I/O to this bdev, completing with `tag`.
pub enum Action {
    Submit { bdev: BdevRef, io: BdevIo, tag: u64 },
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Submit { bdev, io, tag } => {
                write!(f, "Submit({} {:?} tag {tag:#x})", bdev.name(), io.kind)
            }
        }
    }
}

/// Connection phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the host's ICReq.
    AwaitIcReq,
    /// ICResp sent; the first capsule must be a Connect.
    AwaitConnect,
    /// Connected to a controller.
    Ready,
    /// Closing: output is flushed, then the driver closes the socket.
    Closing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Waiting for buffer budget before it can start.
    WaitingBuffer,
    /// R2T sent; H2CData expected.
    AwaitData,
    /// Handed to the bdev.
    Executing,
    /// Response (and read data) queued for sending; released once written.
    Sending,
}

/// An outstanding command.
#[derive(Debug)]
struct Slot {
    gen: u16,
    state: SlotState,
    cid: u16,
    sqe: Sqe,
    ns: Option<Arc<Namespace>>,
    buf: IoBuf,
    /// Bytes of data this command moves (read: to the host; write/DSM: from it).
    xfer_len: u32,
    /// H2C data received so far.
    recv_off: u32,
    digest_err: bool,
    /// Next DSM range to deallocate.
    dsm_next: u16,
    /// Buffer bytes charged to the connection's budget.
    charged: usize,
}

impl Slot {
    fn new() -> Self {
        Slot {
            gen: 0,
            state: SlotState::Free,
            cid: 0,
            sqe: Sqe::default(),
            ns: None,
            buf: IoBuf::empty(),
            xfer_len: 0,
            recv_off: 0,
            digest_err: false,
            dsm_next: 0,
            charged: 0,
        }
    }
}

/// Connection statistics (for introspection and metrics).
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnStats {
    pub commands: u64,
    pub errors: u64,
}

/// Identity of the controller and queue a connection belongs to, once connected.
#[derive(Debug, Clone)]
pub struct QueueIdentity {
    pub subnqn: String,
    pub hostnqn: String,
    pub cntlid: u16,
    pub qid: u16,
    pub sqsize: u16,
}

/// One NVMe/TCP connection.
pub struct Connection {
    target: Arc<Target>,
    opts: TransportOpts,
    local: ListenAddress,
    peer: String,
    phase: Phase,
    dec: Decoder,
    enc: Encoder,
    qid: u16,
    sqsize: u16,
    sqhd: u16,
    subsys: Option<Arc<Subsystem>>,
    ctrlr: Option<Arc<Controller>>,
    qctl: Arc<QueueCtl>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    deferred: VecDeque<u16>,
    aers: Vec<u16>,
    out: Outbox,
    pool: BufPool,
    mem_in_use: usize,
    stats: ConnStats,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("phase", &self.phase)
            .field("qid", &self.qid)
            .finish()
    }
}

/// Largest PDU data the decoder accepts: the biggest H2CData or in-capsule data.
fn max_rx_data(o: &TransportOpts) -> usize {
    (o.max_h2c_data
        .max(o.in_capsule_data_size)
        .max(ADMIN_IN_CAPSULE)) as usize
}

fn st(g: GenericStatus) -> Status {
    Status::generic(g)
}

impl Connection {
    pub fn new(target: Arc<Target>, local: ListenAddress, peer: String) -> Self {
        let opts = target.opts();
        let dec = Decoder::new(max_rx_data(&opts));
        Connection {
            target,
            opts,
            local,
            peer,
            phase: Phase::AwaitIcReq,
            dec,
            enc: Encoder::default(),
            qid: 0,
            sqsize: 0,
            sqhd: 0,
            subsys: None,
            ctrlr: None,
            qctl: QueueCtl::new(),
            slots: Vec::new(),
            free: Vec::new(),
            deferred: VecDeque::new(),
            aers: Vec::new(),
            out: Outbox::default(),
            pool: BufPool::new(256 * 1024, 64),
            mem_in_use: 0,
            stats: ConnStats::default(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn peer(&self) -> &str {
        &self.peer
    }
    pub fn local(&self) -> &ListenAddress {
        &self.local
    }
    /// The control block the controller uses to close this queue or wake it.
    pub fn queue_ctl(&self) -> &Arc<QueueCtl> {
        &self.qctl
    }
    pub fn stats(&self) -> ConnStats {
        self.stats
    }
    pub fn identity(&self) -> Option<QueueIdentity> {
        let c = self.ctrlr.as_ref()?;
        Some(QueueIdentity {
            subnqn: c.subnqn.clone(),
            hostnqn: c.hostnqn.clone(),
            cntlid: c.cntlid,
            qid: self.qid,
            sqsize: self.sqsize,
        })
    }
    /// Largest receive buffer the driver needs.
    pub fn max_pdu_len(&self) -> usize {
        self.dec.max_plen()
    }
    /// True when the driver should stop reading and close once output is written.
    pub fn is_closing(&self) -> bool {
        self.phase == Phase::Closing
    }
    /// Bytes waiting to be written.
    pub fn pending_output(&self) -> usize {
        self.out.pending()
    }
    /// Commands handed to bdevs and not yet completed.
    pub fn executing(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state == SlotState::Executing)
            .count()
    }

    // ------------------------------------------------------------ input ----

    /// Decodes and handles as many whole PDUs from `buf` as it holds. Returns
    /// the bytes consumed; the caller keeps the rest for the next call.
    pub fn on_bytes(&mut self, buf: &[u8], now: Instant, actions: &mut Vec<Action>) -> usize {
        let mut pos = 0;
        while self.phase != Phase::Closing && pos < buf.len() {
            let rest = &buf[pos..];
            match self.dec.decode(rest) {
                Ok(Decoded::Need(_)) => break,
                Ok(Decoded::Pdu(p)) => {
                    let raw = &rest[..p.plen];
                    if let Err(e) = self.on_pdu(&p, raw, now, actions) {
                        self.fatal(&e, raw);
                    }
                    pos += p.plen;
                }
                Err(e) => {
                    self.fatal(&e, rest);
                    pos = buf.len();
                }
            }
        }
        pos
    }

    /// Sends a C2HTermReq for `e` about the PDU starting at `raw`, and closes.
    fn fatal(&mut self, e: &PduError, raw: &[u8]) {
        warn!(peer = %self.peer, qid = self.qid, fes = ?e.fes, fei = e.fei, "NVMe/TCP protocol error: {}; terminating connection", e.reason);
        self.out.push_with(|a| pdu::term_req(e, raw, true, a));
        self.phase = Phase::Closing;
    }

    fn on_pdu(
        &mut self,
        p: &pdu::Pdu,
        raw: &[u8],
        now: Instant,
        actions: &mut Vec<Action>,
    ) -> Result<(), PduError> {
        let unexpected = PduError::new(FatalError::InvalidHeaderField, 0, "unexpected PDU type");
        match (self.phase, &p.header) {
            (Phase::AwaitIcReq, PduHeader::ICReq(r)) => {
                if r.pfv != 0 {
                    return Err(PduError::new(
                        FatalError::InvalidHeaderField,
                        8,
                        "unsupported PFV",
                    ));
                }
                if r.hpda > 31 {
                    return Err(PduError::new(
                        FatalError::InvalidHeaderField,
                        10,
                        "HPDA above 31",
                    ));
                }
                let resp = IcResp {
                    pfv: 0,
                    cpda: 0,
                    digest: r.digest,
                    maxh2cdata: self.opts.max_h2c_data,
                };
                self.out
                    .push_with(|a| Encoder::default().pdu(&PduHeader::ICResp(resp), 0, &[], a));
                self.dec.digest = r.digest;
                self.enc = Encoder {
                    digest: r.digest,
                    pda: r.hpda,
                };
                self.phase = Phase::AwaitConnect;
                debug!(peer = %self.peer, hdgst = r.digest.header, ddgst = r.digest.data, "ICReq accepted");
                Ok(())
            }
            (Phase::AwaitIcReq, _) | (_, PduHeader::ICReq(_)) => Err(unexpected),
            (_, PduHeader::H2CTermReq(t)) => {
                warn!(peer = %self.peer, qid = self.qid, fes = t.fes, fei = t.fei, "host terminated the connection (H2CTermReq)");
                self.phase = Phase::Closing;
                Ok(())
            }
            (Phase::AwaitConnect | Phase::Ready, PduHeader::CapsuleCmd(sqe)) => {
                let data = p.data(raw);
                self.on_capsule(sqe, data, p.data_digest_ok, now, actions);
                Ok(())
            }
            (Phase::Ready, PduHeader::H2CData(d)) => {
                self.on_h2c_data(d, p.data(raw), p.data_digest_ok, actions)
            }
            _ => Err(unexpected),
        }
    }

    // --------------------------------------------------------- commands ----

    fn on_capsule(
        &mut self,
        sqe: &Sqe,
        data: &[u8],
        digest_ok: bool,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        self.stats.commands += 1;
        if self.phase == Phase::Ready {
            self.sqhd = (self.sqhd + 1) % (self.sqsize + 1);
        }
        let cid = sqe.cid();
        if !digest_ok {
            warn!(peer = %self.peer, qid = self.qid, cid, "data digest error on command capsule");
            return self.respond(cid, st(GenericStatus::TransientTransportError), 0);
        }
        if sqe.opcode() == fabrics::FABRICS_OPCODE {
            return self.on_fabrics(sqe, data, now);
        }
        if self.phase != Phase::Ready {
            return self.respond(cid, st(GenericStatus::CommandSequenceError), 0);
        }
        let Some(ctrlr) = self.ctrlr.clone() else {
            return self.respond(cid, st(GenericStatus::CommandSequenceError), 0);
        };
        if !ctrlr.state().accepts_commands() {
            return self.respond(cid, st(GenericStatus::CommandSequenceError), 0);
        }
        if self.qid == 0 {
            self.on_admin(sqe, &ctrlr, now)
        } else {
            self.on_io(sqe, data, &ctrlr, actions)
        }
    }

    fn on_fabrics(&mut self, sqe: &Sqe, data: &[u8], now: Instant) {
        let cid = sqe.cid();
        let Some(fct) = FabricsType::from_u8(sqe.fctype()) else {
            return self.respond(cid, st(GenericStatus::InvalidField).with_dnr(), 0);
        };
        if self.phase == Phase::AwaitConnect && fct != FabricsType::Connect {
            return self.respond(cid, st(GenericStatus::CommandSequenceError), 0);
        }
        match fct {
            FabricsType::Connect => {
                if self.phase != Phase::AwaitConnect {
                    return self.respond(cid, st(GenericStatus::CommandSequenceError), 0);
                }
                match self.connect(sqe, data, now) {
                    Ok(cntlid) => self.respond(cid, Status::SUCCESS, cntlid as u32),
                    Err((status, dw0)) => {
                        self.respond(cid, status, dw0);
                        // A failed Connect leaves nothing to talk about: close
                        // after the answer (hosts retry on a new connection).
                        self.phase = Phase::Closing;
                    }
                }
            }
            FabricsType::PropertyGet | FabricsType::PropertySet if self.qid != 0 => self.respond(
                cid,
                Status::command_specific(CommandSpecificStatus::InvalidQueueType).with_dnr(),
                0,
            ),
            FabricsType::PropertyGet => {
                let pc = PropertyCmd::from_sqe(sqe);
                match self.property_get(&pc) {
                    Some(v) => self.respond_u64(cid, v),
                    None => self.respond(cid, st(GenericStatus::InvalidField).with_dnr(), 0),
                }
            }
            FabricsType::PropertySet => {
                let pc = PropertyCmd::from_sqe(sqe);
                let status = self.property_set(&pc);
                self.respond(cid, status, 0)
            }
            FabricsType::Disconnect => {
                self.respond(cid, Status::SUCCESS, 0);
                self.phase = Phase::Closing;
            }
            FabricsType::AuthSend | FabricsType::AuthRecv => {
                self.respond(cid, st(GenericStatus::InvalidField).with_dnr(), 0)
            }
        }
    }

    /// Handles Connect; on failure returns the status and dw0 (IPO/IATTR).
    fn connect(&mut self, sqe: &Sqe, data: &[u8], now: Instant) -> Result<u16, (Status, u32)> {
        let invalid = |ipo: u16, in_data: bool| {
            (
                Status::command_specific(CommandSpecificStatus::ConnectInvalidParameters)
                    .with_dnr(),
                fabrics::connect_invalid_param(ipo, in_data),
            )
        };
        let cmd = ConnectCmd::from_sqe(sqe);
        let Some(cd) = ConnectData::from_bytes(data) else {
            warn!(peer = %self.peer, len = data.len(), "Connect without 1024 bytes of data");
            return Err((st(GenericStatus::DataSglLengthInvalid).with_dnr(), 0));
        };
        if cmd.recfmt != 0 {
            return Err((
                Status::command_specific(CommandSpecificStatus::IncompatibleFormat).with_dnr(),
                0,
            ));
        }
        let Some(subsys) = self.target.subsystem(&cd.subnqn) else {
            warn!(peer = %self.peer, subnqn = %cd.subnqn, "Connect to unknown subsystem");
            return Err(invalid(cdo::SUBNQN, true));
        };
        if !subsys.listens_on(&self.local) {
            warn!(peer = %self.peer, subnqn = %cd.subnqn, local = %self.local, "subsystem does not listen on this address");
            return Err(invalid(cdo::SUBNQN, true));
        }
        if !subsys.host_allowed(&cd.hostnqn) {
            warn!(peer = %self.peer, subnqn = %cd.subnqn, hostnqn = %cd.hostnqn, "Subsystem does not allow host");
            return Err((
                Status::command_specific(CommandSpecificStatus::ConnectInvalidHost).with_dnr(),
                fabrics::connect_invalid_param(cdo::HOSTNQN, true),
            ));
        }
        let max_sq = if cmd.qid == 0 {
            ADMIN_MAX_SQSIZE
        } else {
            self.opts.max_queue_depth
        };
        if cmd.sqsize == 0 || cmd.sqsize >= max_sq {
            warn!(peer = %self.peer, sqsize = cmd.sqsize, qid = cmd.qid, "Connect with invalid sqsize");
            return Err(invalid(cso::SQSIZE, false));
        }
        let ctrlr = if cmd.qid == 0 {
            if cd.cntlid != CNTLID_DYNAMIC {
                return Err(invalid(cdo::CNTLID, true));
            }
            let max_q = if subsys.is_discovery {
                0
            } else {
                self.opts.max_io_qpairs_per_ctrlr
            };
            let Some(c) = subsys.create_controller(&cd.hostnqn, cd.hostid, cmd.kato, max_q, now)
            else {
                warn!(subnqn = %subsys.nqn, "no free controller ID");
                return Err((
                    Status::command_specific(CommandSpecificStatus::ControllerBusy),
                    0,
                ));
            };
            tracing::info!(peer = %self.peer, subnqn = %subsys.nqn, hostnqn = %cd.hostnqn, cntlid = c.cntlid, kato_ms = cmd.kato, "controller created");
            c
        } else {
            let Some(c) = subsys.controller(cd.cntlid) else {
                warn!(peer = %self.peer, cntlid = cd.cntlid, "I/O queue Connect to unknown controller");
                return Err(invalid(cdo::CNTLID, true));
            };
            if c.hostnqn != cd.hostnqn {
                return Err(invalid(cdo::HOSTNQN, true));
            }
            let g = c.inner.lock();
            if g.state != CtrlState::Enabled {
                warn!(
                    cntlid = c.cntlid,
                    "I/O queue Connect before the controller was enabled"
                );
                drop(g);
                return Err(invalid(cso::QID, false));
            }
            if cmd.qid > g.num_io_queues || g.queues.contains_key(&cmd.qid) {
                warn!(
                    cntlid = c.cntlid,
                    qid = cmd.qid,
                    "I/O queue Connect with invalid or duplicate qid"
                );
                drop(g);
                return Err(invalid(cso::QID, false));
            }
            drop(g);
            c
        };
        ctrlr.inner.lock().queues.insert(cmd.qid, self.qctl.clone());
        self.qid = cmd.qid;
        self.sqsize = cmd.sqsize;
        self.sqhd = 1 % (cmd.sqsize + 1);
        let n = cmd.sqsize as usize + 1;
        self.slots = (0..n).map(|_| Slot::new()).collect();
        self.free = (0..n as u16).rev().collect();
        self.subsys = Some(subsys);
        let cntlid = ctrlr.cntlid;
        self.ctrlr = Some(ctrlr);
        self.phase = Phase::Ready;
        Ok(cntlid)
    }

    fn property_get(&self, pc: &PropertyCmd) -> Option<u64> {
        let c = self.ctrlr.as_ref()?;
        let g = c.inner.lock();
        let v = match (pc.offset, pc.size8) {
            (reg::CAP, true) => Cap {
                mqes: self.opts.max_queue_depth - 1,
                cqr: true,
                to: 15,
                css: 1,
                ..Default::default()
            }
            .to_u64(),
            (reg::VS, false) => fabrics::version(1, 4, 0) as u64,
            (reg::CC, false) => g.cc.to_u32() as u64,
            (reg::CSTS, false) => g.state.csts(g.was_ready).to_u32() as u64,
            (reg::NSSR, false) => 0,
            _ => return None,
        };
        Some(v)
    }

    fn property_set(&mut self, pc: &PropertyCmd) -> Status {
        let Some(c) = self.ctrlr.clone() else {
            return st(GenericStatus::CommandSequenceError);
        };
        match (pc.offset, pc.size8) {
            (reg::CC, false) => match c.write_cc(Cc::from_u32(pc.value as u32)) {
                Ok(s) => {
                    debug!(cntlid = c.cntlid, state = ?s, "CC written");
                    if s != CtrlState::Enabled {
                        // Reset or shutdown: outstanding AERs are aborted.
                        for cid in std::mem::take(&mut self.aers) {
                            self.respond(cid, st(GenericStatus::AbortedSqDeletion), 0);
                        }
                    }
                    Status::SUCCESS
                }
                Err(e) => {
                    warn!(cntlid = c.cntlid, "rejected CC write: {e}");
                    st(GenericStatus::InvalidField).with_dnr()
                }
            },
            (reg::NSSR, false) => Status::SUCCESS,
            _ => st(GenericStatus::InvalidField).with_dnr(),
        }
    }

    fn on_admin(&mut self, sqe: &Sqe, ctrlr: &Arc<Controller>, now: Instant) {
        let cid = sqe.cid();
        if sqe.opcode() == AdminOpcode::AsyncEventRequest as u8 {
            if self.aers.len() > AERL as usize {
                return self.respond(
                    cid,
                    Status::command_specific(CommandSpecificStatus::AsyncEventRequestLimitExceeded),
                    0,
                );
            }
            self.aers.push(cid);
            return self.poll_events();
        }
        let Some(subsys) = self.subsys.clone() else {
            return self.respond(cid, st(GenericStatus::CommandSequenceError), 0);
        };
        let ctx = AdminCtx {
            target: &self.target,
            subsys: &subsys,
            ctrlr,
            now,
        };
        let reply = admin::execute(ctx, sqe);
        if reply.data.is_empty() || !reply.status.is_success() {
            return self.respond(cid, reply.status, reply.dw0);
        }
        let sgl = sqe.sgl();
        let n = (sgl.length as usize).min(reply.data.len());
        if n > 0 {
            self.queue_c2h_arena(cid, &reply.data[..n]);
        }
        self.respond(cid, Status::SUCCESS, reply.dw0);
    }

    /// Completes waiting Async Event Requests with queued controller events.
    pub fn poll_events(&mut self) {
        let Some(c) = self.ctrlr.clone() else { return };
        if self.qid != 0 {
            return;
        }
        while !self.aers.is_empty() {
            let ev = {
                let mut g = c.inner.lock();
                if g.events.is_empty() {
                    break;
                }
                g.events.remove(0)
            };
            let cid = self.aers.remove(0);
            self.respond(cid, Status::SUCCESS, ev.dw0());
        }
    }

    fn on_io(
        &mut self,
        sqe: &Sqe,
        data: &[u8],
        ctrlr: &Arc<Controller>,
        actions: &mut Vec<Action>,
    ) {
        let cid = sqe.cid();
        let Some(op) = IoOpcode::from_u8(sqe.opcode()) else {
            return self.respond(cid, st(GenericStatus::InvalidOpcode).with_dnr(), 0);
        };
        let ns = match self
            .subsys
            .as_ref()
            .and_then(|s| s.namespaces().get(sqe.nsid()).cloned())
        {
            Some(ns) => ns,
            None => {
                return self.respond(
                    cid,
                    st(GenericStatus::InvalidNamespaceOrFormat).with_dnr(),
                    0,
                )
            }
        };
        let bs = ns.bdev.block_size() as u64;
        let nblocks = ns.bdev.num_blocks();
        let range_ok = |slba: u64, nlb: u64| slba.checked_add(nlb).is_some_and(|e| e <= nblocks);
        let opts = &self.opts;
        let sgl = sqe.sgl();
        let (kind, xfer) = match op {
            IoOpcode::Read | IoOpcode::Write => {
                let nlb = sqe.nlb() as u64;
                let len = nlb * bs;
                if len > opts.max_io_size as u64 {
                    return self.respond(cid, st(GenericStatus::InvalidField).with_dnr(), 0);
                }
                if !range_ok(sqe.slba(), nlb) {
                    return self.respond(cid, st(GenericStatus::LbaOutOfRange).with_dnr(), 0);
                }
                if (sgl.length as u64) < len {
                    return self.respond(
                        cid,
                        st(GenericStatus::DataSglLengthInvalid).with_dnr(),
                        0,
                    );
                }
                if op == IoOpcode::Write && ns.read_only {
                    return self.respond(
                        cid,
                        st(GenericStatus::NamespaceWriteProtected).with_dnr(),
                        0,
                    );
                }
                let kind = if op == IoOpcode::Read {
                    IoKind::Read
                } else {
                    IoKind::Write
                };
                if kind == IoKind::Read {
                    ctrlr
                        .stats
                        .host_reads
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    ctrlr
                        .stats
                        .bytes_read
                        .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                } else {
                    ctrlr
                        .stats
                        .host_writes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    ctrlr
                        .stats
                        .bytes_written
                        .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                }
                (kind, len as u32)
            }
            IoOpcode::Flush => (IoKind::Flush, 0),
            IoOpcode::WriteZeroes => {
                let nlb = sqe.nlb() as u64;
                if !range_ok(sqe.slba(), nlb) {
                    return self.respond(cid, st(GenericStatus::LbaOutOfRange).with_dnr(), 0);
                }
                if ns.read_only {
                    return self.respond(
                        cid,
                        st(GenericStatus::NamespaceWriteProtected).with_dnr(),
                        0,
                    );
                }
                (IoKind::WriteZeroes, 0)
            }
            IoOpcode::DatasetManagement => {
                if sqe.cdw(11) & (1 << 2) == 0 {
                    // Only the deallocate attribute has an effect; hints are accepted.
                    return self.respond(cid, Status::SUCCESS, 0);
                }
                if ns.read_only {
                    return self.respond(
                        cid,
                        st(GenericStatus::NamespaceWriteProtected).with_dnr(),
                        0,
                    );
                }
                let nr = (sqe.cdw(10) & 0xFF) + 1;
                let len = nr * 16;
                if sgl.length < len {
                    return self.respond(
                        cid,
                        st(GenericStatus::DataSglLengthInvalid).with_dnr(),
                        0,
                    );
                }
                (IoKind::Unmap, len)
            }
            IoOpcode::Fabrics => {
                return self.respond(cid, st(GenericStatus::InvalidOpcode).with_dnr(), 0)
            }
        };
        if kind != IoKind::Flush && !ns.bdev.supports(kind) {
            return self.respond(cid, st(GenericStatus::InvalidOpcode).with_dnr(), 0);
        }
        // Host-to-controller data: in the capsule or by R2T.
        let h2c = matches!(kind, IoKind::Write | IoKind::Unmap);
        if h2c {
            if sgl.is_in_capsule() {
                let limit = opts.in_capsule_data_size;
                if sgl.length > limit || data.len() as u32 != sgl.length {
                    return self.respond(
                        cid,
                        st(GenericStatus::DataSglLengthInvalid).with_dnr(),
                        0,
                    );
                }
            } else if !sgl.is_transport() {
                return self.respond(
                    cid,
                    st(GenericStatus::SglDescriptorTypeInvalid).with_dnr(),
                    0,
                );
            }
        } else if kind == IoKind::Read && !sgl.is_transport() {
            return self.respond(
                cid,
                st(GenericStatus::SglDescriptorTypeInvalid).with_dnr(),
                0,
            );
        }
        let Some(idx) = self.alloc_slot(cid, sqe, Some(ns), xfer) else {
            // More commands than the queue holds: the host broke SQ flow control.
            let e = PduError::new(FatalError::PduSequenceError, 0, "submission queue overflow");
            let mut raw = Vec::new();
            Encoder::default().pdu(&PduHeader::CapsuleCmd(*sqe), 0, &[], &mut raw);
            self.fatal(&e, &raw);
            return;
        };
        if h2c && sgl.is_in_capsule() {
            if !self.charge(idx) {
                // In-capsule data is small; hold it in a fresh buffer regardless.
                let s = &mut self.slots[idx as usize];
                s.buf = IoBuf::zeroed(xfer as usize);
            }
            let s = &mut self.slots[idx as usize];
            s.buf.as_mut_slice()[..data.len()].copy_from_slice(data);
            s.recv_off = xfer;
            return self.execute(idx, actions);
        }
        if xfer > 0 && !self.charge(idx) {
            self.slots[idx as usize].state = SlotState::WaitingBuffer;
            self.deferred.push_back(idx);
            return;
        }
        self.start(idx, actions);
    }

    fn alloc_slot(
        &mut self,
        cid: u16,
        sqe: &Sqe,
        ns: Option<Arc<Namespace>>,
        xfer: u32,
    ) -> Option<u16> {
        let idx = self.free.pop()?;
        let s = &mut self.slots[idx as usize];
        s.gen = s.gen.wrapping_add(1);
        s.state = SlotState::Executing;
        s.cid = cid;
        s.sqe = *sqe;
        s.ns = ns;
        s.xfer_len = xfer;
        s.recv_off = 0;
        s.digest_err = false;
        s.dsm_next = 0;
        s.charged = 0;
        Some(idx)
    }

    /// Gives the slot its data buffer if the budget allows (always when nothing
    /// else holds buffers, so a single large command can always make progress).
    fn charge(&mut self, idx: u16) -> bool {
        let len = self.slots[idx as usize].xfer_len as usize;
        if len == 0 {
            return true;
        }
        if self.mem_in_use > 0 && self.mem_in_use + len > self.opts.conn_buffer_budget {
            return false;
        }
        self.mem_in_use += len;
        let buf = self.pool.get(len);
        let s = &mut self.slots[idx as usize];
        s.buf = buf;
        s.charged = len;
        true
    }

    /// Starts a command whose buffer is ready: R2T for host data, else execute.
    fn start(&mut self, idx: u16, actions: &mut Vec<Action>) {
        let s = &mut self.slots[idx as usize];
        let needs_r2t = matches!(s.sqe.opcode(), 0x01 | 0x09) && s.recv_off < s.xfer_len;
        if needs_r2t {
            s.state = SlotState::AwaitData;
            let r2t = R2t {
                cccid: s.cid,
                ttag: idx,
                r2to: 0,
                r2tl: s.xfer_len,
            };
            let enc = self.enc;
            self.out.push_with(|a| {
                enc.header(&PduHeader::R2T(r2t), 0, 0, a);
            });
        } else {
            self.execute(idx, actions);
        }
    }

    fn on_h2c_data(
        &mut self,
        d: &DataHdr,
        data: &[u8],
        digest_ok: bool,
        actions: &mut Vec<Action>,
    ) -> Result<(), PduError> {
        let idx = d.ttag;
        let ok = self
            .slots
            .get(idx as usize)
            .is_some_and(|s| s.state == SlotState::AwaitData && s.cid == d.cccid);
        if !ok {
            return Err(PduError::new(
                FatalError::InvalidHeaderField,
                10,
                "H2CData for no outstanding R2T (ttag/cccid)",
            ));
        }
        if d.datal > self.opts.max_h2c_data {
            return Err(PduError::new(
                FatalError::DataTransferLimitExceeded,
                0,
                "H2CData larger than MAXH2CDATA",
            ));
        }
        let s = &mut self.slots[idx as usize];
        if d.datao != s.recv_off {
            return Err(PduError::new(
                FatalError::DataTransferOutOfRange,
                0,
                "H2CData offset is not the next expected byte",
            ));
        }
        let end = d.datao as u64 + d.datal as u64;
        if end > s.xfer_len as u64 {
            return Err(PduError::new(
                FatalError::DataTransferOutOfRange,
                0,
                "H2CData beyond the command's data",
            ));
        }
        s.buf.as_mut_slice()[d.datao as usize..end as usize].copy_from_slice(data);
        s.recv_off = end as u32;
        if !digest_ok {
            s.digest_err = true;
        }
        if s.recv_off == s.xfer_len {
            if s.digest_err {
                let cid = s.cid;
                warn!(peer = %self.peer, qid = self.qid, cid, "data digest error in H2CData");
                self.finish(idx, st(GenericStatus::TransientTransportError), 0);
            } else {
                self.execute(idx, actions);
            }
        }
        Ok(())
    }

    /// Hands the command to its bdev.
    fn execute(&mut self, idx: u16, actions: &mut Vec<Action>) {
        let s = &mut self.slots[idx as usize];
        s.state = SlotState::Executing;
        let Some(ns) = s.ns.clone() else {
            return self.finish(idx, st(GenericStatus::InternalError), 0);
        };
        let tag = idx as u64 | (s.gen as u64) << 16;
        let sqe = s.sqe;
        let io = match IoOpcode::from_u8(sqe.opcode()) {
            Some(IoOpcode::Read) => {
                BdevIo::read(sqe.slba(), sqe.nlb() as u64, std::mem::take(&mut s.buf))
            }
            Some(IoOpcode::Write) => {
                let mut buf = std::mem::take(&mut s.buf);
                let len = sqe.nlb() as usize * ns.bdev.block_size() as usize;
                buf.resize(len);
                BdevIo::write(sqe.slba(), sqe.nlb() as u64, buf, sqe.fua())
            }
            Some(IoOpcode::Flush) => BdevIo::flush(),
            Some(IoOpcode::WriteZeroes) => BdevIo::write_zeroes(sqe.slba(), sqe.nlb() as u64),
            Some(IoOpcode::DatasetManagement) => {
                // Ranges: 16 bytes each; context attributes, length (LBAs), SLBA.
                let nr = (sqe.cdw(10) & 0xFF) as u16 + 1;
                loop {
                    if s.dsm_next >= nr {
                        return self.finish(idx, Status::SUCCESS, 0);
                    }
                    let off = s.dsm_next as usize * 16;
                    let r = &s.buf[off..off + 16];
                    let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as u64;
                    let slba =
                        u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
                    s.dsm_next += 1;
                    if nlb == 0 {
                        continue;
                    }
                    if slba
                        .checked_add(nlb)
                        .is_none_or(|e| e > ns.bdev.num_blocks())
                    {
                        return self.finish(idx, st(GenericStatus::LbaOutOfRange).with_dnr(), 0);
                    }
                    break BdevIo::unmap(slba, nlb);
                }
            }
            _ => return self.finish(idx, st(GenericStatus::InvalidOpcode).with_dnr(), 0),
        };
        actions.push(Action::Submit {
            bdev: ns.bdev.clone(),
            io,
            tag,
        });
    }

    /// A bdev completed the I/O tagged `tag`.
    pub fn on_completion(
        &mut self,
        tag: u64,
        mut io: BdevIo,
        result: Result<(), IoError>,
        actions: &mut Vec<Action>,
    ) {
        let idx = (tag & 0xFFFF) as u16;
        let gen = (tag >> 16) as u16;
        let valid = self
            .slots
            .get(idx as usize)
            .is_some_and(|s| s.gen == gen && s.state == SlotState::Executing);
        if !valid {
            // The queue was torn down and rebuilt since: nothing waits for this.
            self.pool.put(std::mem::take(&mut io.buf));
            return;
        }
        let kind = io.kind;
        let s = &mut self.slots[idx as usize];
        if kind == IoKind::Unmap {
            // Keep the DSM range list; the unmap request carried no buffer.
        } else {
            s.buf = std::mem::take(&mut io.buf);
        }
        if let Err(e) = result {
            self.stats.errors += 1;
            debug!(peer = %self.peer, qid = self.qid, cid = s.cid, ?kind, "I/O failed: {e}");
            return self.finish(idx, io_error_to_status(&e), 0);
        }
        match kind {
            IoKind::Read => {
                let cid = s.cid;
                let len = s.xfer_len;
                s.state = SlotState::Sending;
                self.queue_c2h_slot(idx, cid, len);
                let cqe = self.cqe(cid, Status::SUCCESS, 0);
                let enc = self.enc;
                self.out.push_with(|a| {
                    enc.header(&PduHeader::CapsuleResp(cqe), 0, 0, a);
                });
                self.out.push_release(idx);
            }
            IoKind::Unmap => self.execute(idx, actions),
            _ => self.finish(idx, Status::SUCCESS, 0),
        }
    }

    /// Queues the response of a slot's command and frees the slot after it.
    fn finish(&mut self, idx: u16, status: Status, dw0: u32) {
        let cid = self.slots[idx as usize].cid;
        self.slots[idx as usize].state = SlotState::Sending;
        self.respond(cid, status, dw0);
        self.out.push_release(idx);
    }

    fn release(&mut self, idx: u16, actions: &mut Vec<Action>) {
        let s = &mut self.slots[idx as usize];
        s.state = SlotState::Free;
        s.ns = None;
        self.mem_in_use -= s.charged;
        s.charged = 0;
        let b = std::mem::take(&mut s.buf);
        self.pool.put(b);
        self.free.push(idx);
        while let Some(&next) = self.deferred.front() {
            if !self.charge(next) {
                break;
            }
            self.deferred.pop_front();
            self.start(next, actions);
        }
    }

    // ----------------------------------------------------------- output ----

    fn cqe(&self, cid: u16, status: Status, dw0: u32) -> Cqe {
        Cqe {
            dw0,
            dw1: 0,
            sqhd: self.sqhd,
            sqid: self.qid,
            cid,
            status,
        }
    }

    fn respond(&mut self, cid: u16, status: Status, dw0: u32) {
        if !status.is_success() {
            self.stats.errors += 1;
        }
        let cqe = self.cqe(cid, status, dw0);
        let enc = self.enc;
        self.out.push_with(|a| {
            enc.header(&PduHeader::CapsuleResp(cqe), 0, 0, a);
        });
    }

    fn respond_u64(&mut self, cid: u16, v: u64) {
        let mut cqe = self.cqe(cid, Status::SUCCESS, v as u32);
        cqe.dw1 = (v >> 32) as u32;
        let enc = self.enc;
        self.out.push_with(|a| {
            enc.header(&PduHeader::CapsuleResp(cqe), 0, 0, a);
        });
    }

    /// C2HData PDUs for small data held in the arena (admin replies).
    fn queue_c2h_arena(&mut self, cid: u16, data: &[u8]) {
        let max = self.opts.max_c2h_data as usize;
        let enc = self.enc;
        let mut off = 0;
        while off < data.len() {
            let n = (data.len() - off).min(max);
            let last = off + n == data.len();
            let h = DataHdr {
                cccid: cid,
                ttag: 0,
                datao: off as u32,
                datal: n as u32,
            };
            let flags = if last { FLAG_LAST_PDU } else { 0 };
            let chunk = &data[off..off + n];
            self.out
                .push_with(|a| enc.pdu(&PduHeader::C2HData(h), flags, chunk, a));
            off += n;
        }
    }

    /// C2HData PDUs referring to a slot's buffer (read data, no copy).
    fn queue_c2h_slot(&mut self, idx: u16, cid: u16, len: u32) {
        let max = self.opts.max_c2h_data;
        let enc = self.enc;
        let mut off = 0u32;
        while off < len {
            let n = (len - off).min(max);
            let last = off + n == len;
            let h = DataHdr {
                cccid: cid,
                ttag: 0,
                datao: off,
                datal: n,
            };
            let flags = if last { FLAG_LAST_PDU } else { 0 };
            self.out.push_with(|a| {
                enc.header(&PduHeader::C2HData(h), flags, n as usize, a);
            });
            self.out.push_slot(idx, off, off + n);
            if enc.data_digest_len(pdu::PduType::C2HData, n as usize) != 0 {
                let mut d = DataDigest::new();
                d.update(&self.slots[idx as usize].buf[off as usize..(off + n) as usize]);
                let v = d.finish();
                self.out
                    .push_with(|a| a.extend_from_slice(&v.to_le_bytes()));
            }
            off += n;
        }
    }

    /// Fills `iov` with the pending output, in order. Returns how many were filled.
    pub fn fill_iovecs<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        self.out
            .fill_iovecs(iov, |idx| &self.slots[idx as usize].buf[..])
    }

    /// Marks `written` bytes of output as sent, releasing slots whose output is done.
    pub fn consume_output(&mut self, mut written: usize, actions: &mut Vec<Action>) {
        while let Some(idx) = self.out.consume(&mut written) {
            self.release(idx, actions);
        }
    }

    /// Collects all output into one buffer (tests and tools; the driver uses iovecs).
    pub fn take_output(&mut self, actions: &mut Vec<Action>) -> Vec<u8> {
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
            // Release markers with no bytes before them are processed too.
            self.consume_output(total, actions);
            if total == 0 {
                break;
            }
        }
        v
    }

    /// The driver is done with the connection (socket closed or errored):
    /// unregisters the queue, and for the admin queue, the controller.
    pub fn on_close(&mut self) {
        self.phase = Phase::Closing;
        if let (Some(c), Some(s)) = (self.ctrlr.take(), self.subsys.take()) {
            let mut g = c.inner.lock();
            g.queues.remove(&self.qid);
            drop(g);
            if self.qid == 0 {
                // The association ends with its admin queue.
                c.fail("admin queue closed");
                s.remove_controller(c.cntlid);
                tracing::info!(subnqn = %s.nqn, hostnqn = %c.hostnqn, cntlid = c.cntlid, "controller destroyed");
            }
        }
    }
}

#[cfg(test)]
mod tests;
