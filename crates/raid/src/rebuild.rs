//! Background rebuild of a member added with `bdev_raid_add_base_bdev`.
//!
//! The new member takes every user write from the moment it is added. The
//! rebuild then copies the device (or only the ranges the caller listed, when
//! it knows the member already holds the rest: `corral_rebuild_ranges`)
//! region by region from the in-sync members:
//! each region is locked against user writes (in-flight overlapping writes
//! finish first, new ones wait), read from a source, written to the target and
//! unlocked, so that no older copy can land over a newer user write. User I/O
//! elsewhere goes on meanwhile. Copying is paced to a bandwidth limit. When the
//! last region is copied (and flushed), the member is recorded `online`; its
//! reads are enabled once that record is durable.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::ext::submit_wait;
use bdev::registry::Tracked;
use bdev::{Bdev, BdevIo, IoBuf, IoKind};
use serde::Serialize;
use tokio::sync::watch;

use crate::raid1::{Cause, Core};
use crate::record::now_ms;
use crate::state::{MemberState, RaidState};

/// A running rebuild.
#[derive(Debug)]
pub(crate) struct Rebuild {
    pub slot: usize,
    pub gen: u64,
    pub target: String,
    /// What to copy: sorted, disjoint `(offset_blocks, num_blocks)`.
    pub ranges: Vec<(u64, u64)>,
    /// Whether `ranges` came from the caller (else: the whole device).
    pub partial: bool,
    /// Blocks in `ranges`.
    pub total_blocks: u64,
    pub done_blocks: AtomicU64,
    pub started: Instant,
    pub started_ms: u64,
    cancelled: AtomicBool,
    pub finished: watch::Sender<Option<Result<(), String>>>,
}

impl Rebuild {
    /// A rebuild of `ranges` (normalised), or of the whole device of
    /// `num_blocks` blocks when `ranges` is None.
    pub fn new(
        slot: usize,
        gen: u64,
        target: String,
        num_blocks: u64,
        ranges: Option<Vec<(u64, u64)>>,
    ) -> Arc<Rebuild> {
        let (finished, _) = watch::channel(None);
        let partial = ranges.is_some();
        let ranges = ranges.unwrap_or_else(|| vec![(0, num_blocks)]);
        let total_blocks = crate::extents::total_blocks(&ranges);
        Arc::new(Rebuild {
            slot,
            gen,
            target,
            ranges,
            partial,
            total_blocks,
            done_blocks: AtomicU64::new(0),
            started: Instant::now(),
            started_ms: now_ms(),
            cancelled: AtomicBool::new(false),
            finished,
        })
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Percent done, 0.0 to 100.0.
    pub fn percent(&self) -> f64 {
        if self.total_blocks == 0 {
            return 100.0;
        }
        self.done_blocks.load(Ordering::Relaxed) as f64 * 100.0 / self.total_blocks as f64
    }

    /// Average copy rate so far, MiB/s.
    pub fn rate_mib_s(&self, block_size: u32) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        self.done_blocks.load(Ordering::Relaxed) as f64 * block_size as f64
            / (1 << 20) as f64
            / secs
    }
}

/// How the last rebuild of a raid ended, for status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RebuildOutcome {
    pub target: String,
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub blocks_copied: u64,
    /// Blocks it had to copy (all of the raid, or the sum of the given ranges).
    pub blocks_total: u64,
    /// How many (normalised) ranges a rebuild limited to `corral_rebuild_ranges`
    /// had; absent for a whole-device rebuild.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranges: Option<usize>,
    pub seconds: f64,
    pub rate_mib_s: f64,
    pub finished_at_ms: u64,
}

/// Runs the rebuild of `rb.slot` onto `target` to its end.
pub(crate) async fn run(core: Arc<Core>, rb: Arc<Rebuild>, target: Arc<Tracked>) {
    tracing::info!(raid = %core.id.name, target = %rb.target, blocks = rb.total_blocks,
        ranges = rb.ranges.len(), partial = rb.partial, "rebuild started");
    let mut result = copy(&core, &rb, &target).await;
    if result.is_ok() {
        result = make_online(&core, &rb).await;
    }
    match &result {
        Ok(()) => tracing::info!(raid = %core.id.name, target = %rb.target,
            secs = rb.started.elapsed().as_secs_f64(), "rebuild complete; member online"),
        Err(why) => {
            tracing::warn!(raid = %core.id.name, target = %rb.target, %why, "rebuild failed");
            // Whatever stopped it, the member is not in sync: it leaves (unless it
            // already did), and the rebuild ends once that is recorded.
            core.fail_member(
                rb.slot,
                rb.gen,
                Cause::Rebuild,
                format!("rebuild failed: {why}"),
            );
            let version = core.ctl.lock().version;
            let _ =
                tokio::time::timeout(Duration::from_secs(10), core.persister.wait(version)).await;
        }
    }
    {
        let mut ctl = core.ctl.lock();
        if ctl.rebuild.as_ref().is_some_and(|r| Arc::ptr_eq(r, &rb)) {
            ctl.rebuild = None;
        }
        let secs = rb.started.elapsed().as_secs_f64();
        ctl.last_rebuild = Some(RebuildOutcome {
            target: rb.target.clone(),
            result: if result.is_ok() { "complete" } else { "failed" },
            error: result.as_ref().err().cloned(),
            blocks_copied: rb.done_blocks.load(Ordering::Relaxed),
            blocks_total: rb.total_blocks,
            ranges: rb.partial.then_some(rb.ranges.len()),
            seconds: secs,
            rate_mib_s: rb.rate_mib_s(core.id.block_size),
            finished_at_ms: now_ms(),
        });
    }
    rb.finished.send_replace(Some(result));
}

async fn copy(core: &Arc<Core>, rb: &Rebuild, target: &Tracked) -> Result<(), String> {
    let _tracking = core.begin_tracking().await;
    let bs = core.id.block_size as u64;
    let region = (core.opts.rebuild_region_kib as u64 * 1024 / bs).max(1);
    let mut buf = IoBuf::zeroed((region * bs) as usize);
    let mut next_slot = Instant::now();
    let zeroes = target.supports(IoKind::WriteZeroes);
    let mut done = 0u64;
    for &(start, len) in &rb.ranges {
        let end = start + len;
        let mut pos = start;
        while pos < end {
            if rb.is_cancelled() {
                return Err("cancelled (the member left or the raid stopped)".into());
            }
            let n = region.min(end - pos);
            let bytes = (n * bs) as usize;
            if buf.len() != bytes {
                buf.resize(bytes);
            }
            let guard = core.lock_range(pos, n).await;
            buf = core.read_from_sources(pos, n, buf, 1 << rb.slot).await?;
            let io = if zeroes && buf.iter().all(|&b| b == 0) {
                BdevIo::write_zeroes(pos, n)
            } else {
                BdevIo::write(pos, n, buf.share(), false)
            };
            let (io, r) = submit_wait(target, io).await;
            drop(io);
            r.map_err(|e| format!("writing lba {pos}+{n} to the new member failed: {e}"))?;
            drop(guard);
            pos += n;
            done += n;
            rb.done_blocks.store(done, Ordering::Relaxed);
            let limit = core.rebuild_bw_mib.load(Ordering::Relaxed);
            if limit > 0 {
                let per = Duration::from_secs_f64(bytes as f64 / (limit as f64 * (1 << 20) as f64));
                next_slot = next_slot.max(Instant::now()) + per;
                tokio::time::sleep_until(next_slot.into()).await;
            }
        }
    }
    let (_, r) = submit_wait(target, BdevIo::flush()).await;
    match r {
        Ok(()) | Err(bdev::IoError::NotSupported) => Ok(()),
        Err(e) => Err(format!("flushing the new member failed: {e}")),
    }
}

/// Records the member `online`, waits for the record to be durable, then lets
/// it serve reads.
async fn make_online(core: &Arc<Core>, rb: &Rebuild) -> Result<(), String> {
    let version = {
        let mut ctl = core.ctl.lock();
        if ctl.state != RaidState::Online {
            return Err("the raid went offline".into());
        }
        let Some(s) = ctl.slots.get_mut(rb.slot) else {
            return Err("slot vanished".into());
        };
        if s.gen != rb.gen || s.state != MemberState::Rebuilding {
            return Err("the member left before the rebuild finished".into());
        }
        s.state
            .move_to(MemberState::Online)
            .map_err(|e| e.to_string())?;
        s.since_ms = now_ms();
        ctl.version += 1;
        core.persist_locked(&ctl);
        ctl.version
    };
    // From here the member counts as in sync for failures (a failure bumps the
    // epoch), even before its reads are enabled.
    loop {
        match core.persister.wait(version).await {
            Ok(()) => break,
            Err(why) => {
                if rb.is_cancelled() {
                    return Err(format!("cannot record the member online: {why}"));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let mut ctl = core.ctl.lock();
    let ok = ctl
        .slots
        .get(rb.slot)
        .is_some_and(|s| s.gen == rb.gen && s.state.is_in_sync());
    if ok {
        ctl.reads_enabled |= 1 << rb.slot;
        core.publish_mask(&ctl);
        Ok(())
    } else {
        // It failed after being recorded online: that failure already recorded it out of sync.
        Ok(())
    }
}
