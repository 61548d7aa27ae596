//! `bdev_raid_get_bdevs` output: SPDK's fields, plus corral's member health,
//! rebuild progress and persist state.

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::raid1::Core;
use crate::rebuild::RebuildOutcome;
use crate::record::rfc3339;
use crate::state::{MemberState, RaidState};

/// One raid, as `bdev_raid_get_bdevs` lists it. The fields up to
/// `base_bdevs_list` are SPDK's (same names and meaning); the rest are corral's.
#[derive(Debug, Clone, Serialize)]
pub struct RaidStatus {
    pub name: String,
    pub uuid: uuid::Uuid,
    /// Always 0 for raid1.
    pub strip_size_kb: u32,
    pub state: RaidState,
    pub raid_level: &'static str,
    /// SPDK's on-disk superblock; corral keeps membership in the state dir instead.
    pub superblock: bool,
    /// Slots.
    pub num_base_bdevs: u32,
    /// Slots with a configured member (online or rebuilding).
    pub num_base_bdevs_discovered: u32,
    /// Members taking writes (online or rebuilding), as SPDK counts them.
    pub num_base_bdevs_operational: u32,
    /// SPDK's description of a running rebuild.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessInfo>,
    pub base_bdevs_list: Vec<BaseBdevStatus>,

    // corral
    pub block_size: u32,
    pub num_blocks: u64,
    /// Members that hold every acknowledged write.
    pub num_base_bdevs_in_sync: u32,
    pub rebuild: Option<RebuildStatus>,
    pub last_rebuild: Option<RebuildOutcome>,
    /// 0 = unlimited.
    pub rebuild_bandwidth_limit_mib_s: u64,
    pub persist: PersistInfo,
    pub io: IoInfo,
}

/// SPDK's `process` object.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessInfo {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub target: String,
    pub progress: ProcessProgress,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessProgress {
    pub blocks: u64,
    pub percent: u32,
}

/// One slot of `base_bdevs_list`.
#[derive(Debug, Clone, Serialize)]
pub struct BaseBdevStatus {
    /// SPDK: the member's name, null once it left.
    pub name: Option<String>,
    /// SPDK: the member's UUID, all zeroes once it left.
    pub uuid: uuid::Uuid,
    pub is_configured: bool,
    pub data_offset: u64,
    pub data_size: u64,

    // corral
    pub slot: u32,
    /// The member that holds or last held the slot (kept after it left).
    pub member: Option<String>,
    /// `online`, `rebuilding`, `out_of_sync`, `offline` (last in-sync member of
    /// an offline raid) or `empty`.
    pub state: &'static str,
    /// Whether it serves reads.
    pub reads: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuild_percent: Option<f64>,
    /// Why it left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it entered this state (unix ms and RFC 3339).
    pub since_ms: u64,
    pub since: String,
    /// It left but I/O sent to it before is still in flight (claim not released yet).
    pub draining: bool,
}

/// The running rebuild.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildStatus {
    pub target: String,
    pub slot: u32,
    pub blocks_done: u64,
    /// Blocks to copy: the raid's size, or the sum of the (normalised)
    /// `corral_rebuild_ranges` the member was added with.
    pub blocks_total: u64,
    pub percent: f64,
    /// Number of normalised ranges of a rebuild limited to
    /// `corral_rebuild_ranges`; absent for a whole-device rebuild.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranges: Option<usize>,
    /// Average copy rate so far.
    pub rate_mib_s: f64,
    pub bandwidth_limit_mib_s: u64,
    pub started_at: String,
}

/// The membership record's persistence.
#[derive(Debug, Clone, Serialize)]
pub struct PersistInfo {
    /// Membership version in memory.
    pub generation: u64,
    /// Version on disk.
    pub durable_generation: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// I/O counters.
#[derive(Debug, Clone, Serialize)]
pub struct IoInfo {
    pub inflight: u32,
    /// Writes done on the members but waiting for a removal to be durable.
    pub held_writes: usize,
    pub held_writes_total: u64,
    pub held_writes_failed: u64,
    /// Writes parked behind a rebuild or repair range lock right now.
    pub deferred_writes: usize,
    pub deferred_writes_total: u64,
    pub read_errors: u64,
    pub write_backs: u64,
    pub write_back_failures: u64,
    pub removals: u64,
    /// A quiesce holds new I/O back (`corral_raid_quiesce`).
    pub quiesced: bool,
    /// Parent I/Os waiting to start (held by a quiesce or for a free slot).
    pub queued: usize,
}

pub(crate) fn status(core: &Core) -> RaidStatus {
    // Counters first: their locks are never taken under the control lock.
    let c = &core.counters;
    let io = IoInfo {
        inflight: core.inflight(),
        quiesced: core.quiesced().is_some(),
        queued: core.parked_now(),
        held_writes: core.held_now(),
        held_writes_total: c.held_total.load(Ordering::Relaxed),
        held_writes_failed: c.held_failed.load(Ordering::Relaxed),
        deferred_writes: core.deferred_now(),
        deferred_writes_total: c.deferred_total.load(Ordering::Relaxed),
        read_errors: c.read_errors.load(Ordering::Relaxed),
        write_backs: c.write_backs.load(Ordering::Relaxed),
        write_back_failures: c.write_back_failures.load(Ordering::Relaxed),
        removals: c.removals.load(Ordering::Relaxed),
    };
    let ctl = core.ctl.lock();
    let mut list = Vec::with_capacity(ctl.slots.len());
    let mut discovered = 0;
    let mut in_sync = 0;
    for (i, s) in ctl.slots.iter().enumerate() {
        let configured = s.state.is_writable();
        if configured {
            discovered += 1;
        }
        if s.state.is_in_sync() {
            in_sync += 1;
        }
        let rebuild_percent = match (&s.state, &ctl.rebuild) {
            (MemberState::Rebuilding, Some(rb)) if rb.slot == i => Some(rb.percent()),
            _ => None,
        };
        list.push(BaseBdevStatus {
            name: if configured { s.name.clone() } else { None },
            uuid: if configured {
                s.uuid.unwrap_or_default()
            } else {
                uuid::Uuid::nil()
            },
            is_configured: configured,
            data_offset: 0,
            data_size: if configured { s.num_blocks } else { 0 },
            slot: i as u32,
            member: s.name.clone(),
            state: s.state.name(),
            reads: s.state.is_in_sync()
                && ctl.reads_enabled & (1 << i) != 0
                && ctl.state == RaidState::Online,
            rebuild_percent,
            reason: s.state.departure().map(|d| d.reason.clone()),
            since_ms: s.since_ms,
            since: rfc3339(s.since_ms),
            draining: matches!(s.state, MemberState::Removing(_)),
        });
    }
    let bw = core.rebuild_bw_mib.load(Ordering::Relaxed);
    let rebuild = ctl.rebuild.as_ref().map(|rb| RebuildStatus {
        target: rb.target.clone(),
        slot: rb.slot as u32,
        blocks_done: rb.done_blocks.load(Ordering::Relaxed),
        blocks_total: rb.total_blocks,
        percent: rb.percent(),
        ranges: rb.partial.then_some(rb.ranges.len()),
        rate_mib_s: rb.rate_mib_s(core.id.block_size),
        bandwidth_limit_mib_s: bw,
        started_at: rfc3339(rb.started_ms),
    });
    let process = ctl.rebuild.as_ref().map(|rb| ProcessInfo {
        kind: "rebuild",
        target: rb.target.clone(),
        progress: ProcessProgress {
            blocks: rb.done_blocks.load(Ordering::Relaxed),
            percent: rb.percent() as u32,
        },
    });
    let ps = core.persister.status();
    RaidStatus {
        name: core.id.name.clone(),
        uuid: core.id.uuid,
        strip_size_kb: 0,
        state: ctl.state,
        raid_level: "raid1",
        superblock: false,
        num_base_bdevs: ctl.slots.len() as u32,
        num_base_bdevs_discovered: discovered,
        num_base_bdevs_operational: discovered,
        process,
        base_bdevs_list: list,
        block_size: core.id.block_size,
        num_blocks: core.id.num_blocks,
        num_base_bdevs_in_sync: in_sync,
        rebuild,
        last_rebuild: ctl.last_rebuild.clone(),
        rebuild_bandwidth_limit_mib_s: bw,
        persist: PersistInfo {
            generation: ctl.version,
            durable_generation: ps.durable,
            error: ps.error,
        },
        io,
    }
}
