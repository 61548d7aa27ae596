//! [`HostController`]: one NVMe/TCP controller of a remote subsystem.
//!
//! `connect` runs the bring-up of the reference (admin Connect, registers,
//! enable, identify, async events, keep-alive, number of queues, namespaces,
//! I/O queues) and starts a supervisor task that owns the lifecycle from then
//! on: Keep Alive every kato/2; on a lost connection (socket error, TermReq,
//! command timeout, failed keep-alive) it moves to `resetting`, tears the
//! queues down and reconnects every `reconnect_delay_sec`. I/O submitted or in
//! flight meanwhile is held and resubmitted after the reconnect; after
//! `fast_io_fail_timeout_sec` it fails with [`IoError::NoPath`]; after
//! `ctrlr_loss_timeout_sec` the controller is deleted and its consumers are
//! told (state watch and removal callbacks).
//!
//! I/O can be submitted from any thread ([`HostController::submit`]): the
//! request moves into the chosen queue's inbox (no allocation) and that
//! queue's task sends it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{BdevIo, Completion, IoBuf, IoError, IoKind};
use nvme_wire::fabrics::{reg, Cap, Cc, Csts, PropertyCmd, CNTLID_DYNAMIC};
use nvme_wire::identify::{
    parse_active_ns_list, parse_ns_descriptor_list, IdentifyController, IdentifyNamespace,
    NsDescriptor, IDENTIFY_LEN, ONCS_DSM, ONCS_WRITE_ZEROES,
};
use nvme_wire::log::GetLogPage;
use nvme_wire::opcode::{AdminOpcode, Cns, FeatureId};
use nvme_wire::{Cqe, DigestConfig, Sqe};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::queue::{CmdError, Command, DataDir, IoCmd, Request};
use super::state::CtrlrState;
use super::tcp::{
    connect_queue, run_queue, ConnectParams, IoQpair, Link, QidRelease, QueueCtx, QueueExit,
    QueueFailed, QueueShared, DRAIN, RUN, STOP,
};
use super::{ControllerOpts, HostError};
use crate::status_map::status_to_io_error;
use crate::TransportId;

/// Why a controller went away, as its consumers are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Removal {
    /// Graceful `disconnect()` (normal shutdown).
    Disconnected,
    /// `delete()` without shutdown notification (the connection was already gone
    /// or the caller asked for it).
    Deleted,
    /// `ctrlr_loss_timeout_sec` expired without a successful reconnect.
    CtrlrLoss,
}

/// One namespace of the controller, as identified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceInfo {
    pub nsid: u32,
    pub block_size: u32,
    pub num_blocks: u64,
    pub nguid: Option<[u8; 16]>,
    pub eui64: Option<[u8; 8]>,
    pub uuid: Option<uuid::Uuid>,
    pub write_zeroes: bool,
    pub deallocate: bool,
    pub write_cache: bool,
}

/// One managed I/O queue, for introspection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueInfo {
    pub qid: u16,
    /// Commands in flight at most.
    pub depth: u16,
    /// Requests waiting in the inbox (held during a reconnect).
    pub queued: usize,
}

/// A snapshot of a controller for introspection (the data behind SPDK's
/// `bdev_nvme_get_controllers`).
#[derive(Debug, Clone, Serialize)]
pub struct CtrlrSnapshot {
    pub state: CtrlrState,
    pub trid: TransportId,
    pub cntlid: u16,
    pub hostnqn: String,
    pub hostid: uuid::Uuid,
    pub serial_number: String,
    pub model_number: String,
    pub firmware_revision: String,
    /// NVMe version as "major.minor.tertiary".
    pub version: String,
    pub hdgst: bool,
    pub ddgst: bool,
    /// I/O fails instead of being held (fast_io_fail expired, or `failed`).
    pub io_failing_fast: bool,
    pub queues: Vec<QueueInfo>,
    pub namespaces: Vec<NamespaceInfo>,
    pub removal: Option<Removal>,
}

/// A namespace shared with its bdevs; size can change (AER, reconnect).
#[derive(Debug)]
pub(crate) struct NsShared {
    pub nsid: u32,
    pub block_size: u32,
    pub num_blocks: AtomicU64,
    pub present: AtomicBool,
    pub info: RwLock<NamespaceInfo>,
}

/// What bring-up learned about the controller.
#[derive(Debug, Clone, Default)]
struct CtrlrData {
    cntlid: u16,
    vs: u32,
    cap: Cap,
    id: IdentifyController,
    namespaces: Vec<NamespaceInfo>,
    /// I/O queues the controller granted.
    granted_queues: u16,
    io_depth: u16,
    icd_max: usize,
    max_xfer: usize,
    digest: DigestConfig,
}

/// Context of an I/O request of a managed queue: the bdev completion.
pub(crate) struct IoCtx {
    done: Completion,
}

fn bdev_io(cmd: &Command, buf: IoBuf) -> BdevIo {
    match cmd {
        Command::Io(io) => BdevIo {
            kind: io.kind,
            offset_blocks: io.slba,
            num_blocks: io.nblocks,
            buf,
            fua: io.fua,
        },
        Command::Raw { .. } => BdevIo {
            buf,
            ..BdevIo::flush()
        },
    }
}

impl QueueCtx for IoCtx {
    const HOLD: bool = true;
    fn finish(req: Request<Self>, result: Result<Cqe, CmdError>) {
        let io = bdev_io(&req.cmd, req.buf);
        let r = match result {
            Ok(_) => Ok(()),
            Err(CmdError::Status(c)) => Err(status_to_io_error(c.status)),
            Err(CmdError::Invalid(_)) => Err(IoError::InvalidBuffer),
            Err(e) => Err(IoError::Remote(e.to_string())),
        };
        req.ctx.done.complete(io, r);
    }
    fn fail(req: Request<Self>, err: IoError) {
        let io = bdev_io(&req.cmd, req.buf);
        req.ctx.done.complete(io, Err(err));
    }
}

type AdminReply = (IoBuf, Result<Cqe, CmdError>);

/// Context of an admin request: where its reply goes.
pub(crate) struct AdminCtx(oneshot::Sender<AdminReply>);

impl QueueCtx for AdminCtx {
    const HOLD: bool = false;
    fn finish(req: Request<Self>, result: Result<Cqe, CmdError>) {
        let _ = req.ctx.0.send((req.buf, result));
    }
    fn fail(req: Request<Self>, _err: IoError) {
        let _ = req.ctx.0.send((req.buf, Err(CmdError::ConnectionLost)));
    }
}

/// Stops the admin task of a bring-up that did not finish (cancelled or failed).
struct AdminGuard {
    shared: Arc<QueueShared<AdminCtx>>,
    task: Option<JoinHandle<QueueExit>>,
}

impl Drop for AdminGuard {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.shared.set_stop(STOP);
        }
    }
}

/// One connection of the controller: its admin queue and I/O queue tasks.
struct Session {
    generation: u64,
    data: CtrlrData,
    admin: AdminGuard,
    io_tasks: Vec<JoinHandle<QueueExit>>,
    aer: Option<oneshot::Receiver<AdminReply>>,
}

enum Ctl {
    Disconnect(oneshot::Sender<()>),
    Delete(oneshot::Sender<()>),
    Reset,
}

/// Queue ids beyond the managed queues, for [`HostController::alloc_io_qpair`].
#[derive(Debug, Default)]
struct QidPool {
    free: Vec<u16>,
    in_use: Vec<u16>,
}

impl QidRelease for Mutex<QidPool> {
    fn release(&self, qid: u16) {
        let mut p = self.lock();
        p.in_use.retain(|&q| q != qid);
        if !p.free.contains(&qid) {
            p.free.push(qid);
        }
    }
}

type RemovalHook = Box<dyn FnOnce(Removal) + Send>;

struct Inner {
    opts: ControllerOpts,
    state: watch::Sender<CtrlrState>,
    data: RwLock<CtrlrData>,
    namespaces: RwLock<BTreeMap<u32, Arc<NsShared>>>,
    io: Vec<Arc<QueueShared<IoCtx>>>,
    rr: AtomicUsize,
    admin: Mutex<Option<Arc<QueueShared<AdminCtx>>>>,
    removal: Mutex<(Option<Removal>, Vec<RemovalHook>)>,
    ctl: mpsc::UnboundedSender<Ctl>,
    events: mpsc::UnboundedSender<QueueFailed>,
    generation: AtomicU64,
    fast_failed: AtomicBool,
    qids: Arc<Mutex<QidPool>>,
}

/// A connected NVMe/TCP controller. Cheap to clone; all clones are the same
/// controller. It lives until [`HostController::disconnect`] or
/// [`HostController::delete`] (or controller loss) ends it, or until the last
/// clone (namespace bdevs included) is dropped, which deletes it: a controller
/// nobody holds is never left behind.
#[derive(Clone)]
pub struct HostController {
    inner: Arc<Inner>,
    _last: Arc<LastHandle>,
}

/// Deletes the controller when the last user handle goes away.
struct LastHandle {
    ctl: mpsc::UnboundedSender<Ctl>,
}

impl Drop for LastHandle {
    fn drop(&mut self) {
        let (tx, _rx) = oneshot::channel();
        let _ = self.ctl.send(Ctl::Delete(tx));
    }
}

impl std::fmt::Debug for HostController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostController")
            .field("trid", &self.inner.opts.trid)
            .field("state", &self.state())
            .field("cntlid", &self.cntlid())
            .finish()
    }
}

fn id_sqe(cns: Cns, nsid: u32) -> Sqe {
    let mut s = Sqe::new(AdminOpcode::Identify as u8, 0);
    s.set_nsid(nsid);
    s.set_cdw(10, cns as u32);
    s
}

fn features_sqe(fid: FeatureId, cdw11: u32) -> Sqe {
    let mut s = Sqe::new(AdminOpcode::SetFeatures as u8, 0);
    s.set_cdw(10, fid as u32);
    s.set_cdw(11, cdw11);
    s
}

/// Runs one admin command and waits (bounded) for its result.
async fn admin_exec(
    shared: &QueueShared<AdminCtx>,
    trid: &TransportId,
    cmd: &'static str,
    sqe: Sqe,
    dir: DataDir,
    buf: IoBuf,
    timeout: Duration,
) -> Result<(Cqe, IoBuf), HostError> {
    let (tx, rx) = oneshot::channel();
    shared.push(Request::new(Command::Raw { sqe, dir }, buf, AdminCtx(tx)));
    match tokio::time::timeout(timeout, rx).await {
        Err(_) => Err(HostError::Timeout {
            trid: trid.clone(),
            what: cmd.into(),
            after: timeout,
        }),
        Ok(Err(_)) => Err(HostError::Cmd {
            trid: trid.clone(),
            cmd,
            source: CmdError::ConnectionLost,
        }),
        Ok(Ok((buf, Ok(cqe)))) => Ok((cqe, buf)),
        Ok(Ok((_, Err(CmdError::Status(c))))) => Err(HostError::Status {
            trid: trid.clone(),
            cmd,
            status: c.status,
        }),
        Ok(Ok((_, Err(e)))) => Err(HostError::Cmd {
            trid: trid.clone(),
            cmd,
            source: e,
        }),
    }
}

struct Admin<'a> {
    shared: &'a QueueShared<AdminCtx>,
    opts: &'a ControllerOpts,
}

impl Admin<'_> {
    async fn exec(
        &self,
        cmd: &'static str,
        sqe: Sqe,
        dir: DataDir,
        buf: IoBuf,
    ) -> Result<(Cqe, IoBuf), HostError> {
        admin_exec(
            self.shared,
            &self.opts.trid,
            cmd,
            sqe,
            dir,
            buf,
            self.opts.admin_timeout,
        )
        .await
    }
    async fn prop_get(
        &self,
        cmd: &'static str,
        offset: u32,
        size8: bool,
    ) -> Result<u64, HostError> {
        let sqe = PropertyCmd::get_sqe(0, offset, size8);
        let (cqe, _) = self.exec(cmd, sqe, DataDir::None, IoBuf::empty()).await?;
        Ok(if size8 {
            cqe.result_u64()
        } else {
            cqe.dw0 as u64
        })
    }
    async fn prop_set(&self, cmd: &'static str, offset: u32, value: u32) -> Result<(), HostError> {
        let sqe = PropertyCmd::set_sqe(0, offset, value as u64, false);
        self.exec(cmd, sqe, DataDir::None, IoBuf::empty())
            .await
            .map(|_| ())
    }
    async fn identify(&self, cmd: &'static str, cns: Cns, nsid: u32) -> Result<IoBuf, HostError> {
        let (_, buf) = self
            .exec(
                cmd,
                id_sqe(cns, nsid),
                DataDir::FromCtrl,
                IoBuf::zeroed(IDENTIFY_LEN),
            )
            .await?;
        Ok(buf)
    }
    async fn set_features(
        &self,
        cmd: &'static str,
        fid: FeatureId,
        cdw11: u32,
    ) -> Result<Cqe, HostError> {
        self.exec(cmd, features_sqe(fid, cdw11), DataDir::None, IoBuf::empty())
            .await
            .map(|(c, _)| c)
    }

    /// Polls CSTS until `want(csts)` or the bound passes; CFS ends it early.
    async fn wait_csts(
        &self,
        what: &'static str,
        bound: Duration,
        want: impl Fn(Csts) -> bool,
    ) -> Result<Csts, HostError> {
        let start = Instant::now();
        loop {
            let csts =
                Csts::from_u32(self.prop_get("Property Get CSTS", reg::CSTS, false).await? as u32);
            if want(csts) {
                return Ok(csts);
            }
            if csts.cfs {
                return Err(HostError::Handshake {
                    trid: self.opts.trid.clone(),
                    qid: 0,
                    reason: format!("controller fatal status while waiting for {what}"),
                });
            }
            if start.elapsed() >= bound {
                return Err(HostError::Timeout {
                    trid: self.opts.trid.clone(),
                    what: what.into(),
                    after: bound,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn namespaces(&self, id: &IdentifyController) -> Result<Vec<NamespaceInfo>, HostError> {
        let list = self
            .identify(
                "Identify Active Namespace List",
                Cns::ActiveNamespaceList,
                0,
            )
            .await?;
        let mut out = Vec::new();
        for nsid in parse_active_ns_list(&list) {
            let b = self
                .identify("Identify Namespace", Cns::Namespace, nsid)
                .await?;
            let Some(ns) = IdentifyNamespace::from_bytes(&b) else {
                continue;
            };
            if ns.nsze == 0 {
                continue;
            }
            let mut info = NamespaceInfo {
                nsid,
                block_size: ns.block_size().min(u32::MAX as u64) as u32,
                num_blocks: ns.nsze,
                nguid: (ns.nguid != [0; 16]).then_some(ns.nguid),
                eui64: (ns.eui64 != [0; 8]).then_some(ns.eui64),
                uuid: None,
                write_zeroes: id.oncs & ONCS_WRITE_ZEROES != 0,
                deallocate: id.oncs & ONCS_DSM != 0,
                write_cache: id.vwc & 1 != 0,
            };
            // Targets before NVMe 1.3 may not know CNS 3; the identifiers above suffice then.
            match self
                .identify("Identify NS Descriptors", Cns::NsDescriptorList, nsid)
                .await
            {
                Ok(d) => {
                    for x in parse_ns_descriptor_list(&d) {
                        match x {
                            NsDescriptor::Uuid(u) => info.uuid = Some(uuid::Uuid::from_bytes(u)),
                            NsDescriptor::Nguid(g) => info.nguid = Some(g),
                            NsDescriptor::Eui64(e) => info.eui64 = Some(e),
                            NsDescriptor::Csi(_) => {}
                        }
                    }
                }
                Err(e @ HostError::Status { .. }) => {
                    tracing::debug!(nsid, error = %e, "no NS descriptors")
                }
                Err(e) => return Err(e),
            }
            if !info.block_size.is_power_of_two() || info.block_size < 512 {
                tracing::warn!(
                    nsid,
                    block_size = info.block_size,
                    "namespace with unusable block size skipped"
                );
                continue;
            }
            out.push(info);
        }
        Ok(out)
    }
}

/// Connects the admin queue and brings the controller up; connects (but does
/// not start) the I/O queues. `want_io` is the number of managed I/O queues a
/// reconnect must restore (None on the first connect).
async fn bring_up(
    opts: &ControllerOpts,
    events: &mpsc::UnboundedSender<QueueFailed>,
    generation: u64,
    want_io: Option<usize>,
) -> Result<(Session, Vec<Link<IoCtx>>), HostError> {
    let trid = &opts.trid;
    let digest = DigestConfig {
        header: opts.hdgst,
        data: opts.ddgst,
    };
    let admin_depth = opts.admin_queue_depth;
    let mut p = ConnectParams {
        trid: trid.clone(),
        hostnqn: opts.hostnqn.clone(),
        hostid: opts.hostid,
        qid: 0,
        depth: admin_depth,
        max_requests: admin_depth,
        kato_ms: opts.kato_ms,
        cntlid: CNTLID_DYNAMIC,
        digest,
        timeout: opts.connect_timeout,
        icd_max: 0,
        max_xfer: 0,
        cmd_timeout: opts.admin_timeout,
    };
    let (link, cntlid) = connect_queue::<AdminCtx>(&p).await?;
    let shared = Arc::new(QueueShared::new(admin_depth as usize));
    let task = tokio::spawn(run_queue(
        link,
        shared.clone(),
        events.clone(),
        generation,
        0,
        Duration::ZERO,
    ));
    let guard = AdminGuard {
        shared: shared.clone(),
        task: Some(task),
    };
    let a = Admin {
        shared: &shared,
        opts,
    };

    let vs = a.prop_get("Property Get VS", reg::VS, false).await? as u32;
    let cap = Cap::from_u64(a.prop_get("Property Get CAP", reg::CAP, true).await?);
    let rdy_bound = Duration::from_millis(500 * cap.to.max(1) as u64);
    let cc = Cc::from_u32(a.prop_get("Property Get CC", reg::CC, false).await? as u32);
    if cc.en {
        a.prop_set(
            "Property Set CC (disable)",
            reg::CC,
            Cc { en: false, ..cc }.to_u32(),
        )
        .await?;
        a.wait_csts("CSTS.RDY = 0", rdy_bound, |c| !c.rdy).await?;
    }
    let cc = Cc {
        en: true,
        css: 0,
        mps: 0,
        ams: 0,
        shn: 0,
        iosqes: 6,
        iocqes: 4,
    };
    a.prop_set("Property Set CC.EN", reg::CC, cc.to_u32())
        .await?;
    a.wait_csts("CSTS.RDY = 1", rdy_bound, |c| c.rdy).await?;

    let idb = a
        .identify("Identify Controller", Cns::Controller, 0)
        .await?;
    let id = IdentifyController::from_bytes(&idb).ok_or_else(|| HostError::Handshake {
        trid: trid.clone(),
        qid: 0,
        reason: "short Identify Controller".into(),
    })?;

    // Async events: namespace attribute and firmware notices, where supported.
    let mut aer = None;
    let aen = id.oaes & 0x0000_0300;
    if aen != 0 {
        match a
            .set_features(
                "Set Features Async Event Config",
                FeatureId::AsyncEventConfig,
                aen,
            )
            .await
        {
            Ok(_) => aer = Some(submit_aer(&shared)),
            Err(e @ HostError::Status { .. }) => {
                tracing::info!(error = %e, "async events not configured")
            }
            Err(e) => return Err(e),
        }
    }
    if opts.kato_ms != 0 {
        if let Err(e) = a
            .set_features(
                "Set Features Keep Alive Timer",
                FeatureId::KeepAliveTimer,
                opts.kato_ms,
            )
            .await
        {
            match e {
                HostError::Status { .. } => {
                    tracing::info!(error = %e, "keep alive timer feature refused")
                }
                e => return Err(e),
            }
        }
    }
    let ask = (opts.num_io_queues as u32 + opts.extra_io_qpairs as u32).max(1);
    let nq = a
        .set_features(
            "Set Features Number of Queues",
            FeatureId::NumberOfQueues,
            (ask - 1) | (ask - 1) << 16,
        )
        .await?;
    let granted = ((nq.dw0 & 0xFFFF).min(nq.dw0 >> 16) + 1).min(0xFFFE) as u16;
    let namespaces = a.namespaces(&id).await?;

    let n_io = match want_io {
        None => (opts.num_io_queues as usize).min(granted as usize),
        Some(n) => {
            if (granted as usize) < n {
                return Err(HostError::Unsupported {
                    trid: trid.clone(),
                    what: format!(
                        "controller grants {granted} I/O queues after reconnect, {n} needed"
                    ),
                });
            }
            n
        }
    };
    let io_depth = opts.io_queue_depth.min(cap.mqes).max(1);
    let icd_max = (id.ioccsz as usize * 16).saturating_sub(64);
    let max_xfer = if id.mdts == 0 {
        0
    } else {
        (4096usize << cap.mpsmin) << id.mdts.min(20)
    };
    p.cntlid = cntlid;
    p.depth = io_depth;
    p.max_requests = io_depth;
    p.icd_max = icd_max;
    p.max_xfer = max_xfer;
    p.cmd_timeout = opts.io_timeout;
    p.kato_ms = 0;
    let mut links = Vec::with_capacity(n_io);
    for qid in 1..=n_io as u16 {
        p.qid = qid;
        let (link, _) = connect_queue::<IoCtx>(&p).await?;
        links.push(link);
    }
    tracing::info!(
        trid = %trid, cntlid, vs = format_args!("{:#x}", vs), io_queues = n_io, io_depth,
        mdts_bytes = max_xfer, icd_max, namespaces = namespaces.len(), "controller connected"
    );
    let data = CtrlrData {
        cntlid,
        vs,
        cap,
        id,
        namespaces,
        granted_queues: granted,
        io_depth,
        icd_max,
        max_xfer,
        digest,
    };
    Ok((
        Session {
            generation,
            data,
            admin: guard,
            io_tasks: Vec::new(),
            aer,
        },
        links,
    ))
}

fn submit_aer(shared: &QueueShared<AdminCtx>) -> oneshot::Receiver<AdminReply> {
    let (tx, rx) = oneshot::channel();
    let sqe = Sqe::new(AdminOpcode::AsyncEventRequest as u8, 0);
    let mut req = Request::new(
        Command::Raw {
            sqe,
            dir: DataDir::None,
        },
        IoBuf::empty(),
        AdminCtx(tx),
    );
    req.no_timeout = true;
    shared.push(req);
    rx
}

/// How the enabled phase ended.
enum Leave {
    Failed(String),
    Reset,
    Disconnect(oneshot::Sender<()>),
    Delete(oneshot::Sender<()>),
}

impl Inner {
    fn trid(&self) -> &TransportId {
        &self.opts.trid
    }

    fn move_to(&self, next: CtrlrState) {
        let cur = *self.state.borrow();
        match cur.check_move(next) {
            Ok(_) => {
                tracing::info!(trid = %self.opts.trid, from = %cur, to = %next, "controller state");
                self.state.send_replace(next);
            }
            Err(e) => {
                tracing::error!(trid = %self.opts.trid, error = %e, "state machine refused a move")
            }
        }
    }

    /// Only the supervisor calls this. The flag is published after the held
    /// I/O has been failed, so whoever sees it set sees that I/O finished.
    fn set_fast_fail(&self, on: bool) {
        if self.fast_failed.load(Ordering::Acquire) != on {
            if on {
                tracing::warn!(trid = %self.opts.trid, "fast_io_fail_timeout expired: failing held and new I/O");
            }
            for q in &self.io {
                q.set_refuse(on.then_some(IoError::NoPath));
            }
            self.fast_failed.store(on, Ordering::Release);
        }
    }

    /// Publishes what a (re)connect learned and starts the I/O queue tasks.
    fn install(&self, sess: &mut Session, links: Vec<Link<IoCtx>>) {
        *self.admin.lock() = Some(sess.admin.shared.clone());
        self.apply_namespaces(&sess.data.namespaces);
        {
            let mut pool = self.qids.lock();
            let first = self.io.len() as u16 + 1;
            pool.free = (first..=sess.data.granted_queues)
                .rev()
                .filter(|q| !pool.in_use.contains(q))
                .collect();
        }
        *self.data.write() = sess.data.clone();
        self.generation.store(sess.generation, Ordering::Release);
        for (q, link) in self.io.iter().zip(links) {
            q.set_stop(RUN);
            sess.io_tasks.push(tokio::spawn(run_queue(
                link,
                q.clone(),
                self.events.clone(),
                sess.generation,
                self.opts.io_retry_count,
                Duration::from_micros(self.opts.io_poll_us as u64),
            )));
        }
    }

    /// Stops every task of a session; held I/O goes back to the inboxes.
    async fn teardown(&self, mut sess: Session) {
        *self.admin.lock() = None;
        for q in &self.io {
            q.set_stop(STOP);
        }
        for t in sess.io_tasks.drain(..) {
            let _ = t.await;
        }
        sess.admin.shared.set_stop(STOP);
        if let Some(t) = sess.admin.task.take() {
            let _ = t.await;
        }
        for q in &self.io {
            q.set_stop(RUN);
        }
    }

    fn notify_removal(&self, why: Removal) {
        let hooks = {
            let mut r = self.removal.lock();
            r.0 = Some(why);
            std::mem::take(&mut r.1)
        };
        for h in hooks {
            h(why);
        }
    }

    /// Ends the controller with nothing left to shut down gracefully.
    async fn finish_delete(&self, sess: Option<Session>, why: Removal) {
        if !matches!(*self.state.borrow(), CtrlrState::Deleting) {
            self.move_to(CtrlrState::Deleting);
        }
        // Held I/O was waiting for a path that will not come back.
        for q in &self.io {
            q.set_refuse(Some(IoError::NoPath));
        }
        if let Some(s) = sess {
            self.teardown(s).await;
        }
        for q in &self.io {
            q.set_refuse(Some(IoError::Removed));
        }
        for ns in self.namespaces.read().values() {
            ns.present.store(false, Ordering::Release);
        }
        // Consumers are told before the state says `deleted`, so that whoever
        // sees `deleted` also sees the removal reason.
        self.notify_removal(why);
        self.move_to(CtrlrState::Deleted);
    }

    /// Graceful end: finish queued and in-flight I/O (bounded), CC.SHN normal
    /// shutdown, close the queues.
    async fn shutdown(&self, mut sess: Session) {
        self.move_to(CtrlrState::Deleting);
        for q in &self.io {
            q.close_inbox(IoError::Removed);
            q.set_stop(DRAIN);
        }
        let bound = self.opts.io_timeout.min(Duration::from_secs(10));
        let tasks = &mut sess.io_tasks;
        let drained = tokio::time::timeout(bound, async {
            // A handle is dropped only once it has finished, so that teardown
            // does not await a finished task again.
            while let Some(t) = tasks.last_mut() {
                let _ = t.await;
                tasks.pop();
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(trid = %self.opts.trid, "I/O still in flight at disconnect; failing it");
        }
        let a = Admin {
            shared: &sess.admin.shared,
            opts: &self.opts,
        };
        let r = async {
            let cc = Cc::from_u32(a.prop_get("Property Get CC", reg::CC, false).await? as u32);
            a.prop_set("Property Set CC.SHN", reg::CC, Cc { shn: 1, ..cc }.to_u32())
                .await?;
            a.wait_csts("CSTS.SHST = complete", Duration::from_secs(5), |c| {
                c.shst == 2
            })
            .await
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "shutdown notification incomplete");
        }
        self.finish_delete(Some(sess), Removal::Disconnected).await;
    }

    /// Handles one async event: reads the log page it names (which clears it)
    /// and rescans namespaces when they changed.
    async fn on_async_event(&self, sess: &mut Session, cqe: Cqe) {
        let (ty, info, lid) = (cqe.dw0 & 7, (cqe.dw0 >> 8) & 0xFF, (cqe.dw0 >> 16) & 0xFF);
        tracing::info!(trid = %self.opts.trid, ty, info, lid, "async event");
        let a = Admin {
            shared: &sess.admin.shared,
            opts: &self.opts,
        };
        let mut sqe = Sqe::new(AdminOpcode::GetLogPage as u8, 0);
        sqe.set_nsid(0xFFFF_FFFF);
        GetLogPage {
            lid: lid as u8,
            lsp: 0,
            rae: false,
            len: 4096,
            offset: 0,
        }
        .write_sqe(&mut sqe);
        if let Err(e) = a
            .exec("Get Log Page", sqe, DataDir::FromCtrl, IoBuf::zeroed(4096))
            .await
        {
            tracing::warn!(error = %e, "reading the async event's log page failed");
        }
        if ty == 2 && info == 0 {
            match a.namespaces(&sess.data.id).await {
                Ok(ns) => {
                    self.apply_namespaces(&ns);
                    self.data.write().namespaces = ns.clone();
                    sess.data.namespaces = ns;
                }
                Err(e) => tracing::warn!(error = %e, "namespace rescan failed"),
            }
        }
        sess.aer = Some(submit_aer(&sess.admin.shared));
    }

    /// Updates the shared namespaces from a fresh identify: sizes change in
    /// place (bdevs see them), new ones appear, missing ones go offline.
    fn apply_namespaces(&self, list: &[NamespaceInfo]) {
        let mut map = self.namespaces.write();
        for ns in map.values() {
            if !list.iter().any(|n| n.nsid == ns.nsid) {
                ns.present.store(false, Ordering::Release);
            }
        }
        for n in list {
            match map.get(&n.nsid) {
                Some(ns) if ns.block_size == n.block_size => {
                    ns.num_blocks.store(n.num_blocks, Ordering::Release);
                    ns.present.store(true, Ordering::Release);
                    *ns.info.write() = n.clone();
                }
                Some(ns) => {
                    tracing::warn!(
                        nsid = n.nsid,
                        old = ns.block_size,
                        new = n.block_size,
                        "namespace block size changed; namespace kept offline"
                    );
                    ns.present.store(false, Ordering::Release);
                }
                None => {
                    map.insert(
                        n.nsid,
                        Arc::new(NsShared {
                            nsid: n.nsid,
                            block_size: n.block_size,
                            num_blocks: AtomicU64::new(n.num_blocks),
                            present: AtomicBool::new(true),
                            info: RwLock::new(n.clone()),
                        }),
                    );
                }
            }
        }
    }

    /// The enabled phase: keep-alive, async events, failures, and requests.
    async fn enabled(
        &self,
        sess: &mut Session,
        events: &mut mpsc::UnboundedReceiver<QueueFailed>,
        ctl: &mut mpsc::UnboundedReceiver<Ctl>,
    ) -> Leave {
        let ka_period = Duration::from_millis((self.opts.kato_ms / 2).max(1) as u64);
        let mut ka = tokio::time::interval_at(tokio::time::Instant::now() + ka_period, ka_period);
        ka.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) if ev.generation == sess.generation => {
                        return Leave::Failed(format!("qid {}: {}", ev.qid, ev.error));
                    }
                    Some(_) => {}
                    None => return Leave::Failed("event channel closed".into()),
                },
                c = ctl.recv() => match c {
                    Some(Ctl::Disconnect(r)) => return Leave::Disconnect(r),
                    Some(Ctl::Delete(r)) => return Leave::Delete(r),
                    Some(Ctl::Reset) => return Leave::Reset,
                    None => return Leave::Failed("control channel closed".into()),
                },
                _ = ka.tick(), if self.opts.kato_ms != 0 => {
                    let sqe = Sqe::new(AdminOpcode::KeepAlive as u8, 0);
                    let t = self.opts.admin_timeout.min(ka_period.max(Duration::from_millis(500)) * 2);
                    let r = admin_exec(&sess.admin.shared, self.trid(), "Keep Alive", sqe, DataDir::None, IoBuf::empty(), t).await;
                    if let Err(e) = r {
                        return Leave::Failed(format!("keep alive failed: {e}"));
                    }
                }
                r = async { match sess.aer.as_mut() { Some(rx) => rx.await, None => std::future::pending().await } } => {
                    sess.aer = None;
                    match r {
                        Ok((_, Ok(cqe))) => self.on_async_event(sess, cqe).await,
                        Ok((_, Err(e))) => tracing::debug!(error = %e, "async event request ended"),
                        Err(_) => {}
                    }
                }
            }
        }
    }
}

enum Reconnect {
    Done(Box<(Session, Vec<Link<IoCtx>>)>),
    Gone(Removal, Option<oneshot::Sender<()>>),
}

impl Inner {
    /// Reconnects after a failure that started at `t0`, following SPDK's knobs.
    async fn reconnect(
        self: &Arc<Self>,
        t0: Instant,
        ctl: &mut mpsc::UnboundedReceiver<Ctl>,
    ) -> Reconnect {
        let o = &self.opts;
        let secs = |s: u64| t0 + Duration::from_secs(s);
        let loss_at = (o.ctrlr_loss_timeout_sec > 0).then(|| secs(o.ctrlr_loss_timeout_sec as u64));
        let fail_at =
            (o.fast_io_fail_timeout_sec > 0).then(|| secs(o.fast_io_fail_timeout_sec as u64));
        let far = || tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        let to_tokio =
            |t: Option<Instant>| t.map(tokio::time::Instant::from_std).unwrap_or_else(far);
        let want_io = Some(self.io.len());
        loop {
            // One attempt, in state `resetting`.
            let generation = self.generation.load(Ordering::Acquire) + 1;
            self.generation.store(generation, Ordering::Release);
            let attempt = bring_up(o, &self.events, generation, want_io);
            tokio::pin!(attempt);
            let result = loop {
                tokio::select! {
                    r = &mut attempt => break Some(r),
                    _ = tokio::time::sleep_until(to_tokio(fail_at)), if fail_at.is_some() && !self.fast_failed.load(Ordering::Acquire) => {
                        self.set_fast_fail(true);
                    }
                    _ = tokio::time::sleep_until(to_tokio(loss_at)), if loss_at.is_some() => break None,
                    c = ctl.recv() => match c {
                        Some(Ctl::Disconnect(r)) | Some(Ctl::Delete(r)) => return Reconnect::Gone(Removal::Deleted, Some(r)),
                        Some(Ctl::Reset) => {}
                        None => return Reconnect::Gone(Removal::Deleted, None),
                    },
                }
            };
            match result {
                Some(Ok(up)) => return Reconnect::Done(Box::new(up)),
                Some(Err(e)) => {
                    tracing::warn!(trid = %o.trid, error = %e, "reconnect attempt failed")
                }
                None => {}
            }
            if o.ctrlr_loss_timeout_sec == 0 {
                // No reconnect: the controller stays failed until reset or deleted by hand.
                self.move_to(CtrlrState::Failed);
                for q in &self.io {
                    q.set_refuse(Some(IoError::NoPath));
                }
                match ctl.recv().await {
                    Some(Ctl::Reset) => {}
                    Some(Ctl::Disconnect(r)) | Some(Ctl::Delete(r)) => {
                        return Reconnect::Gone(Removal::Deleted, Some(r))
                    }
                    None => return Reconnect::Gone(Removal::Deleted, None),
                }
                for q in &self.io {
                    q.set_refuse(None);
                }
                self.move_to(CtrlrState::Resetting);
                continue;
            }
            if loss_at.is_some_and(|t| Instant::now() >= t) {
                tracing::warn!(trid = %o.trid, "ctrlr_loss_timeout expired: deleting controller");
                return Reconnect::Gone(Removal::CtrlrLoss, None);
            }
            if fail_at.is_some_and(|t| Instant::now() >= t) {
                self.set_fast_fail(true);
            }
            self.move_to(CtrlrState::ReconnectIsDelayed);
            let wake =
                tokio::time::Instant::now() + Duration::from_secs(o.reconnect_delay_sec as u64);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    _ = tokio::time::sleep_until(to_tokio(fail_at)), if fail_at.is_some() && !self.fast_failed.load(Ordering::Acquire) => {
                        self.set_fast_fail(true);
                    }
                    _ = tokio::time::sleep_until(to_tokio(loss_at)), if loss_at.is_some() => {
                        tracing::warn!(trid = %o.trid, "ctrlr_loss_timeout expired: deleting controller");
                        return Reconnect::Gone(Removal::CtrlrLoss, None);
                    }
                    c = ctl.recv() => match c {
                        Some(Ctl::Disconnect(r)) | Some(Ctl::Delete(r)) => return Reconnect::Gone(Removal::Deleted, Some(r)),
                        Some(Ctl::Reset) => break,
                        None => return Reconnect::Gone(Removal::Deleted, None),
                    },
                }
            }
            self.move_to(CtrlrState::Resetting);
        }
    }

    /// The supervisor: owns the controller's lifecycle until it is deleted.
    async fn supervise(
        self: Arc<Self>,
        mut sess: Session,
        mut events: mpsc::UnboundedReceiver<QueueFailed>,
        mut ctl: mpsc::UnboundedReceiver<Ctl>,
    ) {
        loop {
            let why = self.enabled(&mut sess, &mut events, &mut ctl).await;
            let reason = match why {
                Leave::Disconnect(reply) => {
                    self.shutdown(sess).await;
                    let _ = reply.send(());
                    return;
                }
                Leave::Delete(reply) => {
                    self.finish_delete(Some(sess), Removal::Deleted).await;
                    let _ = reply.send(());
                    return;
                }
                Leave::Reset => "reset requested".to_string(),
                Leave::Failed(r) => r,
            };
            tracing::warn!(trid = %self.opts.trid, reason = %reason, "controller connection lost; resetting");
            let t0 = Instant::now();
            self.move_to(CtrlrState::Resetting);
            self.teardown(sess).await;
            match self.reconnect(t0, &mut ctl).await {
                Reconnect::Done(up) => {
                    let (mut s, links) = *up;
                    self.install(&mut s, links);
                    self.set_fast_fail(false);
                    self.move_to(CtrlrState::Enabled);
                    sess = s;
                }
                Reconnect::Gone(why, reply) => {
                    self.finish_delete(None, why).await;
                    if let Some(r) = reply {
                        let _ = r.send(());
                    }
                    return;
                }
            }
        }
    }
}

impl HostController {
    /// Connects a controller (the whole bring-up, bounded by the configured
    /// timeouts) and starts its supervisor. Needs a tokio runtime.
    pub async fn connect(opts: ControllerOpts) -> Result<HostController, HostError> {
        opts.validate().map_err(|source| HostError::Opts {
            trid: opts.trid.clone(),
            source,
        })?;
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (mut sess, links) = bring_up(&opts, &ev_tx, 1, None).await?;
        let (state, _) = watch::channel(CtrlrState::Connecting);
        let io = (0..links.len())
            .map(|_| Arc::new(QueueShared::new(sess.data.io_depth as usize * 4)))
            .collect();
        let inner = Arc::new(Inner {
            opts,
            state,
            data: RwLock::new(CtrlrData::default()),
            namespaces: RwLock::new(BTreeMap::new()),
            io,
            rr: AtomicUsize::new(0),
            admin: Mutex::new(None),
            removal: Mutex::new((None, Vec::new())),
            ctl: ctl_tx,
            events: ev_tx,
            generation: AtomicU64::new(1),
            fast_failed: AtomicBool::new(false),
            qids: Arc::new(Mutex::new(QidPool::default())),
        });
        inner.install(&mut sess, links);
        inner.move_to(CtrlrState::Enabled);
        tokio::spawn(inner.clone().supervise(sess, ev_rx, ctl_rx));
        let last = Arc::new(LastHandle {
            ctl: inner.ctl.clone(),
        });
        Ok(HostController { inner, _last: last })
    }

    /// Submits an I/O to namespace `nsid` from any thread. `done` is called
    /// exactly once: with the result, or with an error at once when the
    /// request is invalid or cannot be served (fast-I/O-fail, deleted).
    pub fn submit(&self, nsid: u32, io: BdevIo, done: Completion) {
        let ns = self.inner.namespaces.read().get(&nsid).cloned();
        match ns {
            Some(ns) => self.submit_ns(&ns, io, done),
            None => done.complete(io, Err(IoError::Removed)),
        }
    }

    pub(crate) fn submit_ns(&self, ns: &NsShared, mut io: BdevIo, done: Completion) {
        if !ns.present.load(Ordering::Acquire) {
            return done.complete(io, Err(IoError::Removed));
        }
        if let Err(e) = bdev::check_range(&io, ns.block_size, ns.num_blocks.load(Ordering::Acquire))
        {
            return done.complete(io, Err(e));
        }
        let n = self.inner.io.len();
        if n == 0 {
            return done.complete(io, Err(IoError::NoPath));
        }
        let q = &self.inner.io[self.inner.rr.fetch_add(1, Ordering::Relaxed) % n];
        let cmd = IoCmd {
            kind: io.kind,
            nsid: ns.nsid,
            slba: io.offset_blocks,
            nblocks: io.num_blocks,
            block_size: ns.block_size,
            fua: io.fua,
        };
        let buf = std::mem::take(&mut io.buf);
        q.push(Request::new(Command::Io(cmd), buf, IoCtx { done }));
    }

    /// Runs an admin command (bounded by the admin timeout). For tools and tests.
    pub async fn admin_cmd(
        &self,
        sqe: Sqe,
        dir: DataDir,
        buf: IoBuf,
    ) -> Result<(Cqe, IoBuf), HostError> {
        let shared = self.inner.admin.lock().clone();
        match shared {
            Some(s) => {
                admin_exec(
                    &s,
                    self.trid(),
                    "admin command",
                    sqe,
                    dir,
                    buf,
                    self.inner.opts.admin_timeout,
                )
                .await
            }
            None => Err(HostError::State {
                trid: self.trid().clone(),
                state: self.state(),
            }),
        }
    }

    /// Opens one more I/O queue that the caller drives itself (see [`IoQpair`]),
    /// with `depth` commands in flight (capped by CAP.MQES). Needs
    /// `extra_io_qpairs` (or fewer managed queues than the controller grants).
    pub async fn alloc_io_qpair<C: Send + 'static>(
        &self,
        depth: u16,
    ) -> Result<IoQpair<C>, HostError> {
        let state = self.state();
        if state != CtrlrState::Enabled {
            return Err(HostError::State {
                trid: self.trid().clone(),
                state,
            });
        }
        let qid = {
            let mut p = self.inner.qids.lock();
            let q = p.free.pop();
            if let Some(q) = q {
                p.in_use.push(q);
            }
            q
        };
        let Some(qid) = qid else {
            return Err(HostError::Unsupported {
                trid: self.trid().clone(),
                what: "no free I/O queue id (raise extra_io_qpairs)".into(),
            });
        };
        let d = self.inner.data.read().clone();
        let o = &self.inner.opts;
        let depth = depth.min(d.cap.mqes).max(1);
        let p = ConnectParams {
            trid: o.trid.clone(),
            hostnqn: o.hostnqn.clone(),
            hostid: o.hostid,
            qid,
            depth,
            max_requests: depth,
            kato_ms: 0,
            cntlid: d.cntlid,
            digest: d.digest,
            timeout: o.connect_timeout,
            icd_max: d.icd_max,
            max_xfer: d.max_xfer,
            cmd_timeout: o.io_timeout,
        };
        let release: Arc<dyn QidRelease> = self.inner.qids.clone();
        match connect_queue::<C>(&p).await {
            Ok((link, _)) => Ok(IoQpair::new(link, o.trid.clone(), Some((release, qid)))),
            Err(e) => {
                release.release(qid);
                Err(e)
            }
        }
    }

    /// Graceful disconnect: finishes queued and in-flight I/O (bounded), sends
    /// the normal shutdown notification (CC.SHN), closes every queue, and tells
    /// consumers. Idempotent.
    pub async fn disconnect(&self) -> Result<(), HostError> {
        self.end(Ctl::Disconnect).await
    }

    /// Deletes the controller without a shutdown notification (held I/O fails).
    pub async fn delete(&self) -> Result<(), HostError> {
        self.end(Ctl::Delete).await
    }

    async fn end(&self, f: fn(oneshot::Sender<()>) -> Ctl) -> Result<(), HostError> {
        let (tx, rx) = oneshot::channel();
        if self.inner.ctl.send(f(tx)).is_err() {
            return Ok(());
        }
        let o = &self.inner.opts;
        let bound =
            o.io_timeout.min(Duration::from_secs(10)) + o.admin_timeout * 3 + o.connect_timeout;
        match tokio::time::timeout(bound, rx).await {
            Ok(_) => Ok(()),
            Err(_) => Err(HostError::Timeout {
                trid: o.trid.clone(),
                what: "controller deletion".into(),
                after: bound,
            }),
        }
    }

    /// Resets the controller (as after a lost connection): queues are torn down
    /// and reconnected; I/O is held meanwhile. Also leaves `failed`.
    pub fn reset(&self) {
        let _ = self.inner.ctl.send(Ctl::Reset);
    }

    pub fn state(&self) -> CtrlrState {
        *self.inner.state.borrow()
    }
    /// A watch of the state, for consumers that react to changes.
    pub fn subscribe(&self) -> watch::Receiver<CtrlrState> {
        self.inner.state.subscribe()
    }
    /// Calls `f` once when the controller is deleted (at once if it already is).
    /// This is how a raid learns to drop the member.
    pub fn on_removal(&self, f: impl FnOnce(Removal) + Send + 'static) {
        let mut r = self.inner.removal.lock();
        match r.0 {
            Some(why) => {
                drop(r);
                f(why)
            }
            None => r.1.push(Box::new(f)),
        }
    }
    /// Why the controller was removed, once it has been.
    pub fn removal(&self) -> Option<Removal> {
        self.inner.removal.lock().0
    }
    /// Whether fast-I/O-fail is in force (I/O fails instead of being held).
    pub fn io_failing_fast(&self) -> bool {
        self.inner.fast_failed.load(Ordering::Acquire)
    }

    pub fn opts(&self) -> &ControllerOpts {
        &self.inner.opts
    }
    pub fn trid(&self) -> &TransportId {
        self.inner.trid()
    }
    pub fn hostnqn(&self) -> &str {
        &self.inner.opts.hostnqn
    }
    /// Controller id of the current (or last) connection.
    pub fn cntlid(&self) -> u16 {
        self.inner.data.read().cntlid
    }
    /// Identify Controller data of the current (or last) connection.
    pub fn identify(&self) -> IdentifyController {
        self.inner.data.read().id.clone()
    }
    /// NVMe version register.
    pub fn version(&self) -> u32 {
        self.inner.data.read().vs
    }
    /// Largest transfer of one command (MDTS) in bytes, 0 = unlimited.
    pub fn max_xfer(&self) -> usize {
        self.inner.data.read().max_xfer
    }
    /// In-capsule data limit of the I/O queues.
    pub fn icd_max(&self) -> usize {
        self.inner.data.read().icd_max
    }
    /// I/O queues the controller granted (managed ones included).
    pub fn granted_queues(&self) -> u16 {
        self.inner.data.read().granted_queues
    }
    pub fn namespaces(&self) -> Vec<NamespaceInfo> {
        self.inner
            .namespaces
            .read()
            .values()
            .filter(|n| n.present.load(Ordering::Acquire))
            .map(|n| n.info.read().clone())
            .collect()
    }
    pub fn namespace(&self, nsid: u32) -> Option<NamespaceInfo> {
        self.inner
            .namespaces
            .read()
            .get(&nsid)
            .map(|n| n.info.read().clone())
    }
    pub(crate) fn ns_shared(&self, nsid: u32) -> Option<Arc<NsShared>> {
        self.inner.namespaces.read().get(&nsid).cloned()
    }
    /// The managed I/O queues.
    pub fn queues(&self) -> Vec<QueueInfo> {
        let depth = self.inner.data.read().io_depth;
        self.inner
            .io
            .iter()
            .enumerate()
            .map(|(i, q)| QueueInfo {
                qid: i as u16 + 1,
                depth,
                queued: q.queued(),
            })
            .collect()
    }
    /// Everything introspection shows about the controller, in one snapshot.
    pub fn snapshot(&self) -> CtrlrSnapshot {
        let d = self.inner.data.read().clone();
        let o = &self.inner.opts;
        CtrlrSnapshot {
            state: self.state(),
            trid: o.trid.clone(),
            cntlid: d.cntlid,
            hostnqn: o.hostnqn.clone(),
            hostid: uuid::Uuid::from_bytes(o.hostid),
            serial_number: d.id.serial.clone(),
            model_number: d.id.model.clone(),
            firmware_revision: d.id.firmware.clone(),
            version: format!("{}.{}.{}", d.vs >> 16, (d.vs >> 8) & 0xFF, d.vs & 0xFF),
            hdgst: d.digest.header,
            ddgst: d.digest.data,
            io_failing_fast: self.io_failing_fast(),
            queues: self.queues(),
            namespaces: self.namespaces(),
            removal: self.removal(),
        }
    }

    /// Whether `io` kinds are supported by namespace `nsid`.
    pub fn supports(&self, nsid: u32, kind: IoKind) -> bool {
        match self.namespace(nsid) {
            None => false,
            Some(n) => match kind {
                IoKind::Read | IoKind::Write | IoKind::Flush => true,
                IoKind::WriteZeroes => n.write_zeroes,
                IoKind::Unmap => n.deallocate,
            },
        }
    }
}
