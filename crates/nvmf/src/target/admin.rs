//! Admin command execution on the target: Identify, Get Log Page, Get/Set
//! Features, Keep Alive, Abort. Pure functions of the controller, its
//! subsystem and the target registry; the connection sends what they return.

use std::time::Instant;

use nvme_wire::identify::{
    self, IdentifyController, IdentifyNamespace, NsDescriptor, CNTRLTYPE_DISCOVERY, CNTRLTYPE_IO,
    ONCS_DSM, ONCS_WRITE_ZEROES,
};
use nvme_wire::log::{self, DiscoveryEntry, GetLogPage, SmartLog};
use nvme_wire::opcode::{AdminOpcode, Cns, FeatureId, LogPageId};
use nvme_wire::status::{CommandSpecificStatus, GenericStatus};
use nvme_wire::{Sqe, Status};

use super::ctrlr::Controller;
use super::subsystem::Subsystem;
use super::Target;

/// Result of an admin command that completes at once.
#[derive(Debug, Default)]
pub struct AdminReply {
    pub status: Status,
    pub dw0: u32,
    /// Data for the host (sent as C2HData, truncated to the command's SGL length).
    pub data: Vec<u8>,
}

impl AdminReply {
    fn ok(dw0: u32) -> Self {
        AdminReply {
            status: Status::SUCCESS,
            dw0,
            data: Vec::new(),
        }
    }
    fn data(data: Vec<u8>) -> Self {
        AdminReply {
            status: Status::SUCCESS,
            dw0: 0,
            data,
        }
    }
    fn err(s: Status) -> Self {
        AdminReply {
            status: s,
            dw0: 0,
            data: Vec::new(),
        }
    }
}

fn invalid_field() -> AdminReply {
    AdminReply::err(Status::generic(GenericStatus::InvalidField).with_dnr())
}

/// Everything an admin command may look at.
#[derive(Debug, Clone, Copy)]
pub struct AdminCtx<'a> {
    pub target: &'a Target,
    pub subsys: &'a Subsystem,
    pub ctrlr: &'a Controller,
    pub now: Instant,
}

/// Async Event Request Limit (0's based): the host may keep 4 outstanding.
pub const AERL: u8 = 3;
/// Error log entries (0's based).
const ELPE: u8 = 127;

/// Executes an admin command other than fabrics and Async Event Request.
pub fn execute(ctx: AdminCtx<'_>, sqe: &Sqe) -> AdminReply {
    let Some(op) = AdminOpcode::from_u8(sqe.opcode()) else {
        return AdminReply::err(Status::generic(GenericStatus::InvalidOpcode).with_dnr());
    };
    let disc = ctx.subsys.is_discovery;
    match op {
        AdminOpcode::Identify => identify_cmd(ctx, sqe),
        AdminOpcode::GetLogPage => get_log_page(ctx, sqe),
        AdminOpcode::GetFeatures => get_features(ctx, sqe),
        AdminOpcode::SetFeatures => set_features(ctx, sqe),
        AdminOpcode::KeepAlive => {
            ctx.ctrlr.keep_alive(ctx.now);
            AdminReply::ok(0)
        }
        // corral cannot withdraw I/O already handed to a bdev: report "not aborted"
        // (dw0 bit 0), which is what SPDK answers when it cannot abort.
        AdminOpcode::Abort if !disc => AdminReply::ok(1),
        // Fabrics controllers have no I/O queue create/delete; the discovery
        // controller supports only the discovery set.
        _ => AdminReply::err(Status::generic(GenericStatus::InvalidOpcode).with_dnr()),
    }
}

/// Identify Controller data for `ctrlr` of `subsys`.
pub fn identify_controller(
    t: &Target,
    subsys: &Subsystem,
    ctrlr: &Controller,
) -> IdentifyController {
    let o = &t.opts();
    let disc = subsys.is_discovery;
    let ns = subsys.namespaces();
    let vwc = ns.iter().any(|n| n.bdev.write_cache());
    // MDTS is in units of the minimum memory page size (CAP.MPSMIN = 0: 4 KiB).
    let mdts = (o.max_io_size / 4096).max(1).ilog2() as u8;
    IdentifyController {
        vid: 0,
        ssvid: 0,
        serial: subsys.serial_number.clone(),
        model: subsys.model_number.clone(),
        firmware: env!("CARGO_PKG_VERSION").chars().take(8).collect(),
        rab: 6,
        cmic: if disc { 0 } else { 0b11 }, // multi-port, multi-controller
        mdts,
        cntlid: ctrlr.cntlid,
        ver: nvme_wire::fabrics::version(1, 4, 0),
        oaes: if disc { 0 } else { 1 << 8 }, // namespace attribute notices
        ctratt: 1,                           // 128-bit host identifier
        cntrltype: if disc {
            CNTRLTYPE_DISCOVERY
        } else {
            CNTRLTYPE_IO
        },
        acl: 3,
        aerl: AERL,
        frmw: 0b11,  // slot 1 read-only, one slot
        lpa: 1 << 2, // extended data for Get Log Page (offsets, > 4 KiB)
        elpe: ELPE,
        kas: 1, // 100 ms granularity
        sqes: 0x66,
        cqes: 0x44,
        maxcmd: o.max_queue_depth,
        nn: if disc { 0 } else { subsys.max_namespaces },
        oncs: if disc {
            0
        } else {
            ONCS_DSM | ONCS_WRITE_ZEROES
        },
        // bit 0: a write cache is present; bits 2:1 = 10b: broadcast flush unsupported.
        vwc: if vwc { 0b101 } else { 0b100 },
        sgls: 1 | (1 << 20),
        subnqn: subsys.nqn.clone(),
        ioccsz: (64 + o.in_capsule_data_size) / 16,
        iorcsz: 1,
        icdoff: 0,
        fcatt: 0, // dynamic controller model
        msdbd: 1,
        ..Default::default()
    }
}

fn identify_cmd(ctx: AdminCtx<'_>, sqe: &Sqe) -> AdminReply {
    let cns = (sqe.cdw(10) & 0xFF) as u8;
    let nsid = sqe.nsid();
    let ns = ctx.subsys.namespaces();
    match Cns::from_u8(cns) {
        Some(Cns::Controller) => AdminReply::data(
            identify_controller(ctx.target, ctx.subsys, ctx.ctrlr)
                .to_bytes()
                .to_vec(),
        ),
        Some(Cns::Namespace) if !ctx.subsys.is_discovery => {
            if nsid == 0xFFFF_FFFF {
                // Common namespace capabilities: nothing beyond the LBA format.
                let n = IdentifyNamespace {
                    lbads: 9,
                    ..Default::default()
                };
                return AdminReply::data(n.to_bytes().to_vec());
            }
            match ns.get(nsid) {
                Some(n) => {
                    let b = &n.bdev;
                    let blocks = b.num_blocks();
                    let idn = IdentifyNamespace {
                        nsze: blocks,
                        ncap: blocks,
                        nuse: blocks,
                        nsfeat: 0,
                        nlbaf: 0,
                        flbas: 0,
                        dlfeat: 0,
                        nmic: 1, // may be attached to several controllers
                        nguid: n.nguid,
                        eui64: [0; 8],
                        lbads: b.block_size().ilog2() as u8,
                    };
                    AdminReply::data(idn.to_bytes().to_vec())
                }
                // An inactive NSID within range: a zero-filled structure (spec).
                None if nsid != 0 && nsid <= ctx.subsys.max_namespaces => {
                    AdminReply::data(vec![0u8; identify::IDENTIFY_LEN])
                }
                None => AdminReply::err(
                    Status::generic(GenericStatus::InvalidNamespaceOrFormat).with_dnr(),
                ),
            }
        }
        Some(Cns::ActiveNamespaceList) if !ctx.subsys.is_discovery => {
            if nsid >= 0xFFFF_FFFE {
                return AdminReply::err(
                    Status::generic(GenericStatus::InvalidNamespaceOrFormat).with_dnr(),
                );
            }
            AdminReply::data(identify::active_ns_list(&ns.nsids(), nsid).to_vec())
        }
        Some(Cns::NsDescriptorList) if !ctx.subsys.is_discovery => match ns.get(nsid) {
            Some(n) => {
                let d = [
                    NsDescriptor::Nguid(n.nguid),
                    NsDescriptor::Uuid(*n.uuid.as_bytes()),
                    NsDescriptor::Csi(0),
                ];
                AdminReply::data(identify::ns_descriptor_list(&d).to_vec())
            }
            None => {
                AdminReply::err(Status::generic(GenericStatus::InvalidNamespaceOrFormat).with_dnr())
            }
        },
        _ => invalid_field(),
    }
}

fn get_log_page(ctx: AdminCtx<'_>, sqe: &Sqe) -> AdminReply {
    let g = GetLogPage::from_sqe(sqe);
    let disc = ctx.subsys.is_discovery;
    let full: Vec<u8> = match LogPageId::from_u8(g.lid) {
        Some(LogPageId::Error) => vec![0u8; (ELPE as usize + 1) * log::ERROR_LOG_ENTRY_LEN],
        Some(LogPageId::Smart) if !disc => {
            let st = &ctx.ctrlr.stats;
            let ld =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            let hours = ctx
                .now
                .saturating_duration_since(ctx.ctrlr.created)
                .as_secs()
                / 3600;
            SmartLog {
                temperature: 273 + 25,
                avail_spare: 100,
                spare_thresh: 10,
                // Data units are thousands of 512-byte units.
                data_units_read: ld(&st.bytes_read).div_ceil(512_000),
                data_units_written: ld(&st.bytes_written).div_ceil(512_000),
                host_reads: ld(&st.host_reads),
                host_writes: ld(&st.host_writes),
                power_on_hours: hours,
                ..Default::default()
            }
            .to_bytes()
            .to_vec()
        }
        Some(LogPageId::FirmwareSlot) => {
            let mut b = vec![0u8; 512];
            b[0] = 1; // active firmware in slot 1
            let fr: Vec<u8> = env!("CARGO_PKG_VERSION").bytes().take(8).collect();
            b[8..8 + fr.len()].copy_from_slice(&fr);
            b
        }
        Some(LogPageId::ChangedNamespaces) if !disc => {
            let mut c = ctx.ctrlr.inner.lock();
            let list = log::changed_ns_list(&c.changed_ns).to_vec();
            if !g.rae {
                c.changed_ns.clear();
                c.events
                    .retain(|e| e.log_page != LogPageId::ChangedNamespaces as u8);
            }
            list
        }
        Some(LogPageId::Discovery) if disc => discovery_log(ctx.target, &ctx.ctrlr.hostnqn),
        _ => {
            return AdminReply::err(
                Status::command_specific(CommandSpecificStatus::InvalidLogPage).with_dnr(),
            )
        }
    };
    if !g.offset.is_multiple_of(4) || g.offset > full.len() as u64 {
        return invalid_field();
    }
    let start = g.offset as usize;
    let end = (start + g.len).min(full.len());
    let mut data = full[start..end].to_vec();
    // The host asked for more than the log holds: the rest reads as zeroes.
    data.resize(g.len.min(1 << 20), 0);
    AdminReply::data(data)
}

/// The discovery log as `hostnqn` sees it: every listener of every subsystem
/// that admits this host.
pub fn discovery_log(t: &Target, hostnqn: &str) -> Vec<u8> {
    let mut entries = Vec::new();
    for s in t.subsystems() {
        if !s.host_allowed(hostnqn) {
            continue;
        }
        for (i, l) in s.listeners().iter().enumerate() {
            entries.push(DiscoveryEntry {
                trtype: log::TRTYPE_TCP,
                adrfam: l.adrfam.code(),
                subtype: log::SUBTYPE_NVME,
                treq: 0,
                portid: i as u16,
                cntlid: 0xFFFF,
                asqsz: super::ADMIN_MAX_SQSIZE,
                trsvcid: l.trsvcid.clone(),
                subnqn: s.nqn.clone(),
                traddr: l.traddr.clone(),
                sectype: log::TSAS_SECTYPE_NONE,
            });
        }
    }
    log::discovery_log(t.genctr(), &entries)
}

fn get_features(ctx: AdminCtx<'_>, sqe: &Sqe) -> AdminReply {
    let fid = (sqe.cdw(10) & 0xFF) as u8;
    let c = ctx.ctrlr.inner.lock();
    match FeatureId::from_u8(fid) {
        Some(FeatureId::NumberOfQueues) => {
            let n = c.num_io_queues.saturating_sub(1) as u32;
            AdminReply::ok(n | n << 16)
        }
        Some(FeatureId::KeepAliveTimer) => AdminReply::ok(c.kato_ms),
        Some(FeatureId::AsyncEventConfig) => AdminReply::ok(c.async_event_config),
        Some(FeatureId::VolatileWriteCache) => {
            let vwc = ctx.subsys.namespaces().iter().any(|n| n.bdev.write_cache());
            AdminReply::ok(vwc as u32)
        }
        Some(FeatureId::HostIdentifier) => AdminReply::data(ctx.ctrlr.hostid.to_vec()),
        Some(
            FeatureId::Arbitration
            | FeatureId::PowerManagement
            | FeatureId::TemperatureThreshold
            | FeatureId::ErrorRecovery
            | FeatureId::InterruptCoalescing
            | FeatureId::WriteAtomicity,
        ) => AdminReply::ok(0),
        None => invalid_field(),
    }
}

fn set_features(ctx: AdminCtx<'_>, sqe: &Sqe) -> AdminReply {
    let fid = (sqe.cdw(10) & 0xFF) as u8;
    let v = sqe.cdw(11);
    match FeatureId::from_u8(fid) {
        Some(FeatureId::NumberOfQueues) => {
            let mut c = ctx.ctrlr.inner.lock();
            if ctx.subsys.is_discovery {
                return invalid_field();
            }
            if c.queues.keys().any(|&q| q != 0) {
                // Changing the queue count once I/O queues exist is not allowed.
                return AdminReply::err(Status::generic(GenericStatus::CommandSequenceError));
            }
            let (nsqr, ncqr) = (v & 0xFFFF, v >> 16);
            if nsqr == 0xFFFF || ncqr == 0xFFFF {
                return invalid_field();
            }
            let max = ctx.target.opts().max_io_qpairs_per_ctrlr as u32;
            let granted = (nsqr.min(ncqr) + 1).min(max);
            c.num_io_queues = granted as u16;
            c.num_queues_set = true;
            let n = granted - 1;
            AdminReply::ok(n | n << 16)
        }
        Some(FeatureId::KeepAliveTimer) => {
            ctx.ctrlr.set_kato(v, ctx.now);
            AdminReply::ok(0)
        }
        Some(FeatureId::AsyncEventConfig) => {
            ctx.ctrlr.inner.lock().async_event_config = v;
            AdminReply::ok(0)
        }
        Some(FeatureId::VolatileWriteCache) => AdminReply::ok(0),
        Some(FeatureId::HostIdentifier) => {
            AdminReply::err(Status::generic(GenericStatus::CommandSequenceError))
        }
        Some(_) => AdminReply::err(
            Status::command_specific(CommandSpecificStatus::FeatureNotChangeable).with_dnr(),
        ),
        None => invalid_field(),
    }
}
