//! raid1: a mirror over N base bdevs, in the semantics of SPDK's raid1 module
//! plus corral's durability rule for member health (DESIGN.md, invariant I5).
//!
//! - Size is the smallest member's. Writes, flushes, write-zeroes and unmaps go
//!   to every operational member and succeed if an in-sync member took them;
//!   every member whose part failed leaves the mirror.
//! - A read goes to the in-sync member with the fewest outstanding I/Os; a
//!   failed read is retried on another member and the good data is written
//!   back to the failed one under a range lock (if that write fails, the
//!   member leaves).
//! - The raid stays online down to one in-sync member. A member whose device
//!   goes away (registry hot-remove, e.g. its NVMe controller deleted after
//!   `ctrlr_loss_timeout_sec`) leaves likewise.
//! - I5: before a write is acknowledged while a member is leaving, the fact
//!   that it is out of sync is durable in the state dir ([`record`]). Writes
//!   that depend on it wait (off the I/O threads) for the persist thread.
//!   Re-creating the raid with the same name reads the record and keeps
//!   out-of-sync members out until they are rebuilt.
//! - `bdev_raid_add_base_bdev` adds a member that takes every new write at once
//!   and is filled in the background ([`rebuild`]), region by region under range
//!   locks, paced to a bandwidth limit; it serves reads once in sync. With
//!   `corral_rebuild_ranges` (a corral extension, [`AddOptions`]) only the
//!   given ranges are copied: the control plane's replica rebuild first gives
//!   the new member the snapshot chain, so only what the head holds differs
//!   ([`extents`]).
//!
//! [`RaidModule`] has one method per SPDK RPC; [`Raid1`] is the raid bdev
//! (product name "Raid Volume"); [`read_records`] reads the records of a state
//! dir without creating anything (for the control plane after a crash).
//!
//! Hot path: no heap allocation per I/O in steady state (a fixed slab of parent
//! contexts, buffers shared with [`bdev::IoBuf::share`]) and no lock held across
//! a member submission. See `raid1.rs` for how.

pub mod error;
pub mod extents;
pub mod module;
mod persist;
mod raid1;
mod range;
pub mod rebuild;
pub mod record;
mod slab;
pub mod state;
pub mod status;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bdev::{Bdev, BdevIo, Completion, IoKind};

pub use error::RaidError;
pub use extents::{normalize_ranges, RangeError};
pub use module::{AddOptions, CreateParams, RaidModule};
pub use persist::PersistStatus;
pub use raid1::MAX_MEMBERS;
pub use rebuild::RebuildOutcome;
pub use record::{
    read_record, read_records, DirStore, MemberRecord, RaidRecord, RecordError, RecordedState,
    StateStore,
};
pub use state::{LeaveKind, MemberState, RaidState};
pub use status::{BaseBdevStatus, RaidStatus};

use raid1::Core;

/// SPDK's product name for raid bdevs.
pub const PRODUCT_NAME: &str = "Raid Volume";

/// Tunables of the raid module.
#[derive(Debug, Clone)]
pub struct RaidOpts {
    /// Parent I/Os in flight per raid before further ones queue (the slab size).
    pub max_inflight: usize,
    /// Bytes copied per locked region during a rebuild, in KiB.
    pub rebuild_region_kib: u32,
    /// Default rebuild bandwidth limit, MiB/s (0 = unlimited).
    pub rebuild_bw_mib: u64,
    /// How long delete and remove wait for I/O in flight on a member before
    /// going on (the claim is released when that I/O completes anyway).
    pub drain_timeout: Duration,
}

impl Default for RaidOpts {
    fn default() -> Self {
        RaidOpts {
            max_inflight: 2048,
            rebuild_region_kib: 1024,
            rebuild_bw_mib: 0,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// A raid1 bdev. Register-able and exportable like any bdev; control it
/// through [`RaidModule`].
pub struct Raid1 {
    core: Arc<Core>,
}

impl std::fmt::Debug for Raid1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Raid1")
            .field("name", &self.core.id.name)
            .field("uuid", &self.core.id.uuid)
            .finish()
    }
}

impl Raid1 {
    /// `bdev_raid_get_bdevs` entry of this raid.
    pub fn status(&self) -> RaidStatus {
        status::status(&self.core)
    }

    /// The record as it is in memory now (the durable one may lag; see
    /// `status().persist`).
    pub fn record(&self) -> RaidRecord {
        self.core.ctl.lock().record(&self.core.id)
    }

    /// Waits for the running rebuild to end and returns how it ended; with no
    /// rebuild running, how the last one ended (None if there was none).
    pub async fn wait_rebuild(&self) -> Option<Result<(), String>> {
        let (running, last) = {
            let ctl = self.core.ctl.lock();
            (ctl.rebuild.clone(), ctl.last_rebuild.clone())
        };
        match running {
            Some(rb) => {
                let mut rx = rb.finished.subscribe();
                let r = rx
                    .wait_for(|r| r.is_some())
                    .await
                    .ok()
                    .and_then(|r| r.clone());
                r
            }
            None => last.map(|o| match o.error {
                None => Ok(()),
                Some(e) => Err(e),
            }),
        }
    }

    /// Sets the rebuild bandwidth limit, MiB/s (0 = unlimited); a running
    /// rebuild follows it from its next region.
    pub fn set_rebuild_bandwidth(&self, mib_per_sec: u64) {
        self.core
            .rebuild_bw_mib
            .store(mib_per_sec, Ordering::Relaxed);
    }

    /// Quiesces the raid (see `corral_raid_quiesce`): new I/O is held back
    /// and I/O in flight drains, within `drain`. The quiesce ends with
    /// [`Raid1::resume`] or by itself after `lease`, so a caller that dies in
    /// between stalls I/O for a bounded time only (I6, I7).
    pub async fn quiesce(&self, drain: Duration, lease: Duration) -> Result<u64, RaidError> {
        let token = self.core.quiesce(drain).await?;
        let core = Arc::downgrade(&self.core);
        self.core.rt.spawn(async move {
            tokio::time::sleep(lease).await;
            if let Some(c) = core.upgrade() {
                if c.resume(Some(token)) {
                    tracing::warn!(raid = %c.id.name, token, lease_ms = lease.as_millis() as u64,
                        "quiesce lease expired before a resume; I/O resumed");
                }
            }
        });
        tracing::info!(raid = %self.core.id.name, token, "quiesced");
        Ok(token)
    }

    /// Ends quiesce `token` (any quiesce with `None`); -ENOENT when it is not
    /// the one in force (it already ended, e.g. by its lease).
    pub fn resume(&self, token: Option<u64>) -> Result<(), RaidError> {
        if self.core.resume(token) {
            tracing::info!(raid = %self.core.id.name, ?token, "resumed");
            return Ok(());
        }
        Err(RaidError::NotQuiesced {
            raid: self.core.id.name.clone(),
            token: token.unwrap_or(0),
        })
    }

    /// Persist thread progress (durable record version, last error).
    pub fn persist_status(&self) -> PersistStatus {
        self.core.persister.status()
    }
}

impl Bdev for Raid1 {
    fn name(&self) -> &str {
        &self.core.id.name
    }
    fn block_size(&self) -> u32 {
        self.core.id.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.core.id.num_blocks
    }
    fn uuid(&self) -> uuid::Uuid {
        self.core.id.uuid
    }
    fn product_name(&self) -> &'static str {
        PRODUCT_NAME
    }
    fn supports(&self, kind: IoKind) -> bool {
        self.core.supports(kind)
    }
    fn write_cache(&self) -> bool {
        self.core.id.write_cache
    }
    fn submit(&self, io: BdevIo, done: Completion) {
        self.core.submit(io, done)
    }
}
