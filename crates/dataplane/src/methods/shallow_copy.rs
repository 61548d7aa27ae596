//! `bdev_lvol_start_shallow_copy` / `bdev_lvol_check_shallow_copy`: copy the
//! blocks a snapshot holds in its own layer (not those it inherits from its
//! parents) to the same offsets of any bdev, in the background.
//!
//! The control plane rebuilds a replica's snapshot chain on another node with
//! it: for each snapshot, oldest first, the source node shallow-copies the
//! snapshot into an NVMe bdev connected to the new replica's head, and the new
//! replica then snapshots its head. Each new snapshot ends up holding exactly
//! the blocks of its source layer, so chains, contents and allocation maps match.
//!
//! What SPDK does (`vbdev_lvol_rpc.c`, `vbdev_lvol.c`, `lib/lvol/lvol.c`
//! `spdk_lvol_shallow_copy`, `lib/blob/blobstore.c` `spdk_bs_blob_shallow_copy`)
//! and where corral differs:
//!
//! * Same method names, parameters (`src_lvol_name`, `dst_bdev_name`;
//!   `operation_id`) and result shapes (`{"operation_id"}`; `{"state",
//!   "copied_clusters", "total_clusters", "error"?}`), plus `copied_blocks` and
//!   `total_blocks` (corral allocates per block, see the lvol crate's DESIGN.md).
//! * Unknown source lvol: `-ENODEV`, as SPDK. Unknown destination bdev: SPDK
//!   answers `-32602` with the text "No such device" (the error of
//!   `spdk_bdev_create_bs_dev_ext` is wrapped in INVALID_PARAMS); corral answers
//!   `-ENODEV` like every other corral lvol method that reports an errno.
//! * A source that is not read-only (`-EPERM`), a destination smaller than the
//!   source (`-EINVAL`), a lvstore block size that is not a multiple of the
//!   destination's (`-EINVAL`): SPDK checks these only once the blob is open,
//!   so its start returns an `operation_id` and the check then reports state
//!   "error" with "Operation not permitted" / "Invalid argument". corral
//!   refuses them in the start call with those codes and a message naming the
//!   objects: the caller learns at once, and a client written for SPDK still
//!   sees a failed copy.
//! * The destination is claimed for the copy, as SPDK claims it; a claimed
//!   destination is refused with `-EBUSY` and the holder's name (SPDK: `-32602`
//!   "Operation not permitted"). A destination that is a snapshot is refused
//!   with `-EPERM` (SPDK: writes fail later).
//! * SPDK copies one cluster at a time; corral copies runs of allocated blocks
//!   in requests of up to 1 MiB (never across a cluster), up to 4 MiB and 32
//!   requests in flight, and flushes the destination at the end (SPDK does
//!   not), so "complete" means durable on the destination. Every allocated
//!   block is written as data, zero blocks included, so that the destination
//!   allocates exactly the source layer's blocks.
//!   `copied_clusters` / `total_clusters` count clusters (the lvstore's
//!   `cluster_sz`) holding at least one allocated block, as SPDK's
//!   `spdk_blob_get_num_allocated_clusters` does; a cluster counts as copied once
//!   all of its allocated blocks are.
//! * SPDK locks the source blob for the copy (a second copy of the same lvol or
//!   deleting it fails with `-EBUSY`). corral does not: concurrent copies of one
//!   snapshot are harmless; deleting the source fails the copy (its reads fail),
//!   and deleting the source's parent (which merges the parent's blocks into the
//!   source's layer) is detected at the end and fails the copy, since the
//!   destination then lacks the merged blocks.
//! * Unknown `operation_id`: `-ENODEV`, as SPDK. SPDK forgets an ended operation
//!   as soon as its result has been read once; corral keeps the last
//!   [`MAX_ENDED`] ended operations queryable (a retried check after a lost
//!   answer gets the same answer) and refuses to start more than
//!   [`MAX_RUNNING`] at once (`-EBUSY`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use bdev::ext::submit_wait;
use bdev::registry::{BdevRegistry, Claim};
use bdev::{BdevIo, BdevRef, IoBuf, IoError};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::bdev_methods::registry_error;
use super::params;
use crate::rpc::{code, RpcError};
use crate::Dataplane;

/// Ended operations kept queryable; older ones are forgotten first.
pub const MAX_ENDED: usize = 64;
/// Copies running at once (each holds at most 6 MiB of buffers).
pub const MAX_RUNNING: usize = 64;
/// Largest read/write request of a copy.
const MAX_CHUNK_BYTES: u64 = 1 << 20;
/// Data in flight per copy: four full-size requests.
const MAX_INFLIGHT_BYTES: u64 = 4 << 20;
/// Requests in flight per copy: small runs (a layer of scattered 4 KiB writes)
/// need many at once to keep the destination busy.
const MAX_REQUESTS: usize = 32;
/// Chunks up to this size take buffers of this size; larger ones 1 MiB buffers.
/// With the limits above, a copy holds at most 4 large and 32 small buffers.
const SMALL_BUF_BYTES: u64 = 64 << 10;
/// The source's allocation map is read this many bytes of the lvol at a time,
/// so that a huge, fragmented snapshot never needs its whole range list in memory.
const WINDOW_BYTES: u64 = 1 << 30;

/// The shallow copies of one dataplane: running ones and the last ended ones.
#[derive(Debug, Clone, Default)]
pub struct ShallowCopies {
    table: Arc<Mutex<Table>>,
}

#[derive(Debug, Default)]
struct Table {
    last_id: u32,
    ops: BTreeMap<u32, Arc<Op>>,
    /// Ids of ended operations, oldest first.
    ended: VecDeque<u32>,
}

/// One operation, as `bdev_lvol_check_shallow_copy` reports it.
#[derive(Debug)]
struct Op {
    id: u32,
    src: String,
    dst: String,
    total_blocks: u64,
    total_clusters: u64,
    copied_blocks: AtomicU64,
    copied_clusters: AtomicU64,
    /// Set once when the copy ends.
    outcome: Mutex<Option<Result<(), String>>>,
    /// Why the copy must stop early (the destination went away).
    cancel: Mutex<Option<String>>,
}

impl Op {
    fn cancelled(&self) -> Option<String> {
        self.cancel.lock().clone()
    }

    fn status(&self) -> Value {
        let mut v = json!({
            "state": "in progress",
            "copied_clusters": self.copied_clusters.load(Ordering::Relaxed),
            "total_clusters": self.total_clusters,
            "copied_blocks": self.copied_blocks.load(Ordering::Relaxed),
            "total_blocks": self.total_blocks,
        });
        match &*self.outcome.lock() {
            None => {}
            Some(Ok(())) => v["state"] = json!("complete"),
            Some(Err(why)) => {
                v["state"] = json!("error");
                v["error"] = json!(why);
            }
        }
        v
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartParams {
    src_lvol_name: String,
    dst_bdev_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckParams {
    operation_id: u32,
}

/// Everything a copy needs, checked before it starts.
struct Plan {
    store: lvol::LvStore,
    /// The source lvol's UUID (its bdev name), for store calls.
    src_uuid: String,
    /// `lvs/name`, for messages.
    src_alias: String,
    src: BdevRef,
    dst: BdevRef,
    /// The destination's registry name.
    dst_name: String,
    /// Source block size in bytes.
    bs: u64,
    /// Destination blocks per source block.
    ratio: u64,
    cluster_blocks: u64,
    num_blocks: u64,
    total_blocks: u64,
    total_clusters: u64,
    /// The source layer's allocated block count when planned: a merge into it
    /// during the copy changes it.
    allocated_at_start: u64,
}

fn errno(e: i32, msg: String) -> RpcError {
    RpcError::errno_msg(e, msg)
}

fn lvol_err(what: &str, e: lvol::LvolError) -> RpcError {
    errno(e.errno(), format!("{what}: {e}"))
}

/// Blocks of a window of the lvol's own layer: `(first block, count)` runs.
fn layer_ranges(
    store: &lvol::LvStore,
    uuid: &str,
    bs: u64,
    from: u64,
    n: u64,
) -> lvol::Result<Vec<(u64, u64)>> {
    store
        .fragmap(uuid, from * bs, n * bs, lvol::FragmapScope::Layer)
        .map(|f| f.ranges)
}

/// Counts the blocks and the clusters holding them, for one window's runs;
/// `last` is the last cluster counted so far (runs come in ascending order).
fn count(
    ranges: &[(u64, u64)],
    cluster_blocks: u64,
    last: &mut Option<u64>,
    blocks: &mut u64,
    clusters: &mut u64,
) {
    for &(s, n) in ranges {
        if n == 0 {
            continue;
        }
        *blocks += n;
        let (first, end) = (s / cluster_blocks, (s + n - 1) / cluster_blocks);
        *clusters += end - first + 1;
        if *last == Some(first) {
            *clusters -= 1;
        }
        *last = Some(end);
    }
}

/// Checks the request against SPDK's rules and counts what to copy. Blocking
/// (store locks, allocation map scans): run off the I/O threads.
fn plan(dp: &Dataplane, a: &StartParams) -> Result<Plan, RpcError> {
    let src_name = &a.src_lvol_name;
    let found = dp
        .lvol
        .store_of(src_name)
        .and_then(|s| s.lvol(src_name).map(|i| (s, i)));
    let (store, info) = match found {
        Ok(x) => x,
        Err(lvol::LvolError::NotFound { .. }) => {
            let why = if dp.registry.get(src_name).is_some() {
                format!("source {src_name}: the bdev is not an lvol")
            } else {
                format!("source lvol {src_name} does not exist")
            };
            return Err(errno(libc::ENODEV, why));
        }
        Err(e) => return Err(lvol_err(&format!("source lvol {src_name}"), e)),
    };
    let dst: BdevRef = match dp.registry.get(&a.dst_bdev_name) {
        Some(t) => t,
        None => {
            return Err(errno(
                libc::ENODEV,
                format!("destination bdev {} does not exist", a.dst_bdev_name),
            ))
        }
    };
    let dst_name = dst.name().to_string();
    let src_uuid = info.uuid.to_string();
    let src_alias = info.alias.clone();
    if !info.is_snapshot {
        return Err(errno(
            libc::EPERM,
            format!(
                "source lvol {src_alias} is not read-only: only a snapshot can be shallow-copied"
            ),
        ));
    }
    if dst_name == src_uuid {
        return Err(errno(
            libc::EINVAL,
            format!("source lvol {src_alias} and destination bdev {dst_name} are the same bdev"),
        ));
    }
    if dst.product_name() == "Logical Volume" {
        if let Ok(d) = dp.lvol.store_of(&dst_name).and_then(|s| s.lvol(&dst_name)) {
            if d.is_snapshot {
                return Err(errno(
                    libc::EPERM,
                    format!(
                        "destination bdev {} is lvol {}, a read-only snapshot",
                        a.dst_bdev_name, d.alias
                    ),
                ));
            }
        }
    }
    let bs = info.block_size as u64;
    let dst_bs = dst.block_size() as u64;
    let src_bytes = info.num_blocks * bs;
    let dst_bytes = dst.num_blocks() * dst_bs;
    if src_bytes > dst_bytes {
        return Err(errno(
            libc::EINVAL,
            format!(
                "destination bdev {} ({dst_bytes} bytes) is smaller than source lvol {src_alias} ({src_bytes} bytes)",
                a.dst_bdev_name
            ),
        ));
    }
    if dst_bs == 0 || !bs.is_multiple_of(dst_bs) {
        return Err(errno(
            libc::EINVAL,
            format!(
                "block size {bs} of source lvol {src_alias} is not a multiple of block size {dst_bs} of destination bdev {}",
                a.dst_bdev_name
            ),
        ));
    }
    let src: BdevRef = match dp.registry.get(&src_uuid) {
        Some(t) => t,
        None => store
            .bdev(&src_uuid)
            .map_err(|e| lvol_err(&format!("source lvol {src_alias}"), e))?,
    };
    let cluster_size = store
        .info()
        .map_err(|e| lvol_err(&format!("lvstore of {src_alias}"), e))?
        .cluster_size;
    let cluster_blocks = (cluster_size / bs).max(1);
    let window = window_blocks(bs, cluster_blocks);
    let (mut blocks, mut clusters, mut last) = (0, 0, None);
    let mut from = 0;
    while from < info.num_blocks {
        let n = window.min(info.num_blocks - from);
        let r = layer_ranges(&store, &src_uuid, bs, from, n).map_err(|e| {
            lvol_err(
                &format!("reading the allocation map of lvol {src_alias}"),
                e,
            )
        })?;
        count(&r, cluster_blocks, &mut last, &mut blocks, &mut clusters);
        from += n;
    }
    Ok(Plan {
        store,
        src_uuid,
        src_alias,
        src,
        dst,
        dst_name,
        bs,
        ratio: bs / dst_bs,
        cluster_blocks,
        num_blocks: info.num_blocks,
        total_blocks: blocks,
        total_clusters: clusters,
        allocated_at_start: info.num_allocated_blocks,
    })
}

/// Window of the allocation map read at once: whole clusters, about `WINDOW_BYTES`.
fn window_blocks(bs: u64, cluster_blocks: u64) -> u64 {
    (WINDOW_BYTES / bs / cluster_blocks).max(1) * cluster_blocks
}

/// `bdev_lvol_start_shallow_copy {src_lvol_name, dst_bdev_name}` → `{"operation_id"}`.
pub async fn start(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: StartParams = params(p)?;
    let d = dp.clone();
    let plan = tokio::task::spawn_blocking(move || plan(&d, &a))
        .await
        .map_err(|e| RpcError::new(code::INTERNAL_ERROR, format!("method panicked: {e}")))??;
    dp.shallow_copies.launch(&dp.registry, plan)
}

/// `bdev_lvol_check_shallow_copy {operation_id}` → state and progress.
pub fn check(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: CheckParams = params(p)?;
    let op = dp
        .shallow_copies
        .table
        .lock()
        .ops
        .get(&a.operation_id)
        .cloned();
    match op {
        Some(op) => Ok(op.status()),
        None => Err(errno(
            libc::ENODEV,
            format!(
                "shallow copy operation {} does not exist (never started, or ended and forgotten: the last {MAX_ENDED} ended operations are kept)",
                a.operation_id
            ),
        )),
    }
}

impl ShallowCopies {
    /// Registers the operation, claims the destination and starts the copy.
    fn launch(&self, registry: &Arc<BdevRegistry>, plan: Plan) -> Result<Value, RpcError> {
        let mut t = self.table.lock();
        let running = t.ops.len() - t.ended.len();
        if running >= MAX_RUNNING {
            return Err(errno(
                libc::EBUSY,
                format!("{running} shallow copies are running (at most {MAX_RUNNING}); start this one when one has ended"),
            ));
        }
        let mut id = t.last_id;
        loop {
            id = id.checked_add(1).unwrap_or(1);
            if !t.ops.contains_key(&id) {
                break;
            }
        }
        let op = Arc::new(Op {
            id,
            src: plan.src_alias.clone(),
            dst: plan.dst_name.clone(),
            total_blocks: plan.total_blocks,
            total_clusters: plan.total_clusters,
            copied_blocks: AtomicU64::new(0),
            copied_clusters: AtomicU64::new(0),
            outcome: Mutex::new(None),
            cancel: Mutex::new(None),
        });
        let holder = format!("shallow copy {id} of lvol {}", plan.src_alias);
        let weak: Weak<Op> = Arc::downgrade(&op);
        let on_remove: bdev::registry::RemoveCallback = Arc::new(move |b: &str| {
            if let Some(op) = weak.upgrade() {
                op.cancel
                    .lock()
                    .get_or_insert_with(|| format!("destination bdev {b} was removed"));
            }
        });
        registry
            .claim(
                &plan.dst_name,
                Claim {
                    holder: holder.clone(),
                    module: "lvol",
                    on_remove: Some(on_remove),
                },
            )
            .map_err(registry_error)?;
        t.last_id = id;
        t.ops.insert(id, op.clone());
        drop(t);
        tracing::info!(op = id, src = %plan.src_alias, dst = %plan.dst_name,
            blocks = plan.total_blocks, clusters = plan.total_clusters,
            bytes = plan.total_blocks * plan.bs, "shallow copy started");
        let job = Job {
            plan,
            holder,
            registry: registry.clone(),
            copies: self.clone(),
        };
        tokio::spawn(job.run(op));
        Ok(json!({"operation_id": id}))
    }

    /// Records `id` as ended and forgets the oldest ended operations beyond `MAX_ENDED`.
    fn ended(&self, id: u32) {
        let mut t = self.table.lock();
        t.ended.push_back(id);
        while t.ended.len() > MAX_ENDED {
            if let Some(old) = t.ended.pop_front() {
                t.ops.remove(&old);
            }
        }
    }
}

/// A run of allocated source blocks within one cluster.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    off: u64,
    n: u64,
    cluster: u64,
}

/// Splits runs into chunks of at most `max` blocks that never cross a cluster.
fn split(ranges: &[(u64, u64)], cluster_blocks: u64, max: u64, out: &mut VecDeque<Chunk>) {
    for &(s, n) in ranges {
        let end = s + n;
        let mut p = s;
        while p < end {
            let cluster = p / cluster_blocks;
            let e = end.min((cluster + 1) * cluster_blocks).min(p + max);
            out.push_back(Chunk {
                off: p,
                n: e - p,
                cluster,
            });
            p = e;
        }
    }
}

/// Counts clusters as copied once every chunk of theirs is: chunks are handed
/// out in ascending order, so a cluster is sealed (no more chunks will come)
/// when the first chunk of a later cluster is handed out.
#[derive(Debug, Default)]
struct ClusterTracker {
    /// `(cluster, chunks not yet copied, sealed)`, in hand-out order.
    open: VecDeque<(u64, u32, bool)>,
}

impl ClusterTracker {
    fn dispatched(&mut self, cluster: u64) {
        match self.open.back_mut() {
            Some(b) if b.0 == cluster => b.1 += 1,
            Some(b) => {
                b.2 = true;
                self.open.push_back((cluster, 1, false));
            }
            None => self.open.push_back((cluster, 1, false)),
        }
    }

    /// Returns how many clusters became fully copied.
    fn copied(&mut self, cluster: u64) -> u64 {
        if let Some(e) = self.open.iter_mut().find(|e| e.0 == cluster) {
            e.1 = e.1.saturating_sub(1);
        }
        self.pop_done()
    }

    /// No more chunks: every open cluster is sealed.
    fn finish(&mut self) -> u64 {
        if let Some(b) = self.open.back_mut() {
            b.2 = true;
        }
        self.pop_done()
    }

    fn pop_done(&mut self) -> u64 {
        let mut n = 0;
        while self.open.front().is_some_and(|e| e.2 && e.1 == 0) {
            self.open.pop_front();
            n += 1;
        }
        n
    }
}

/// Which side of a chunk copy failed.
enum Side {
    Read,
    Write,
}

/// Reads a chunk from the source and writes it at the same offset of the
/// destination, in the one buffer. Gives the buffer back for reuse.
async fn copy_chunk(
    src: BdevRef,
    dst: BdevRef,
    c: Chunk,
    mut buf: IoBuf,
    bs: u64,
    ratio: u64,
) -> (Chunk, IoBuf, Result<(), (Side, IoError)>) {
    buf.resize((c.n * bs) as usize);
    let (io, r) = submit_wait(&*src, BdevIo::read(c.off, c.n, buf)).await;
    if let Err(e) = r {
        return (c, io.buf, Err((Side::Read, e)));
    }
    let w = BdevIo::write(c.off * ratio, c.n * ratio, io.buf, false);
    let (io, r) = submit_wait(&*dst, w).await;
    (c, io.buf, r.map_err(|e| (Side::Write, e)))
}

/// A started copy.
struct Job {
    plan: Plan,
    holder: String,
    registry: Arc<BdevRegistry>,
    copies: ShallowCopies,
}

impl Job {
    async fn run(self, op: Arc<Op>) {
        let t0 = Instant::now();
        let mut result = self.copy(&op).await;
        if result.is_ok() {
            result = self.finish().await;
        }
        // The claim goes before the outcome is visible, so that a caller who sees
        // "complete" can start the next copy into the same destination at once.
        let _ = self.registry.release(&self.plan.dst_name, &self.holder);
        let secs = t0.elapsed().as_secs_f64();
        let copied = op.copied_blocks.load(Ordering::Relaxed);
        let mib_s = copied as f64 * self.plan.bs as f64 / (1 << 20) as f64 / secs.max(1e-9);
        match &result {
            Ok(()) => tracing::info!(op = op.id, src = %op.src, dst = %op.dst,
                blocks = copied, clusters = op.copied_clusters.load(Ordering::Relaxed),
                secs, mib_s, "shallow copy complete"),
            Err(why) => tracing::warn!(op = op.id, src = %op.src, dst = %op.dst,
                blocks = copied, total_blocks = op.total_blocks, secs, error = %why,
                "shallow copy failed"),
        }
        *op.outcome.lock() = Some(result);
        self.copies.ended(op.id);
    }

    /// Copies every allocated block of the source layer, up to
    /// `MAX_INFLIGHT_BYTES` and `MAX_REQUESTS` at a time. On the first error no
    /// new chunk starts; those in flight finish.
    async fn copy(&self, op: &Op) -> Result<(), String> {
        let p = &self.plan;
        let max = (MAX_CHUNK_BYTES / p.bs).max(1);
        let window = window_blocks(p.bs, p.cluster_blocks);
        let mut next_window = 0u64;
        let mut queue: VecDeque<Chunk> = VecDeque::new();
        let (mut small, mut large): (Vec<IoBuf>, Vec<IoBuf>) = (vec![], vec![]);
        let mut inflight_bytes = 0u64;
        let mut clusters = ClusterTracker::default();
        let mut inflight = JoinSet::new();
        let mut err: Option<String> = None;
        loop {
            while err.is_none() && inflight.len() < MAX_REQUESTS {
                if let Some(why) = op.cancelled() {
                    err = Some(why);
                    break;
                }
                let Some(&c) = queue.front() else {
                    if next_window >= p.num_blocks {
                        break;
                    }
                    let n = window.min(p.num_blocks - next_window);
                    match self.ranges(next_window, n).await {
                        Ok(r) => split(&r, p.cluster_blocks, max, &mut queue),
                        Err(why) => err = Some(why),
                    }
                    next_window += n;
                    continue;
                };
                let bytes = c.n * p.bs;
                if !inflight.is_empty() && inflight_bytes + bytes > MAX_INFLIGHT_BYTES {
                    break;
                }
                queue.pop_front();
                inflight_bytes += bytes;
                clusters.dispatched(c.cluster);
                let buf = if bytes <= SMALL_BUF_BYTES {
                    small
                        .pop()
                        .unwrap_or_else(|| IoBuf::with_capacity(SMALL_BUF_BYTES as usize))
                } else {
                    large
                        .pop()
                        .unwrap_or_else(|| IoBuf::with_capacity(MAX_CHUNK_BYTES as usize))
                };
                inflight.spawn(copy_chunk(
                    p.src.clone(),
                    p.dst.clone(),
                    c,
                    buf,
                    p.bs,
                    p.ratio,
                ));
            }
            let Some(done) = inflight.join_next().await else {
                break;
            };
            match done {
                Ok((c, buf, r)) => {
                    let bytes = c.n * p.bs;
                    inflight_bytes -= bytes;
                    if bytes <= SMALL_BUF_BYTES {
                        small.push(buf);
                    } else {
                        large.push(buf);
                    }
                    match r {
                        Ok(()) => {
                            op.copied_blocks.fetch_add(c.n, Ordering::Relaxed);
                            let n = clusters.copied(c.cluster);
                            op.copied_clusters.fetch_add(n, Ordering::Relaxed);
                        }
                        Err((side, e)) if err.is_none() => {
                            err = Some(match side {
                                Side::Read => format!(
                                    "reading blocks {}+{} of lvol {} failed: {e}",
                                    c.off, c.n, p.src_alias
                                ),
                                Side::Write => format!(
                                    "writing blocks {}+{} of bdev {} failed: {e}",
                                    c.off * p.ratio,
                                    c.n * p.ratio,
                                    p.dst_name
                                ),
                            })
                        }
                        Err(_) => {}
                    }
                }
                Err(e) => {
                    err.get_or_insert_with(|| format!("a copy request panicked: {e}"));
                }
            }
        }
        if let Some(why) = err {
            return Err(why);
        }
        let n = clusters.finish();
        op.copied_clusters.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// The source layer's runs in `from..from+n`, read off the I/O threads.
    async fn ranges(&self, from: u64, n: u64) -> Result<Vec<(u64, u64)>, String> {
        let (store, uuid, bs) = (
            self.plan.store.clone(),
            self.plan.src_uuid.clone(),
            self.plan.bs,
        );
        let alias = self.plan.src_alias.clone();
        tokio::task::spawn_blocking(move || layer_ranges(&store, &uuid, bs, from, n))
            .await
            .map_err(|e| format!("reading the allocation map of lvol {alias} panicked: {e}"))?
            .map_err(|e| format!("reading the allocation map of lvol {alias}: {e}"))
    }

    /// Makes the copy durable on the destination and checks that the source
    /// layer did not change under it.
    async fn finish(&self) -> Result<(), String> {
        let p = &self.plan;
        let (_, r) = submit_wait(&*p.dst, BdevIo::flush()).await;
        match r {
            Ok(()) | Err(IoError::NotSupported) => {}
            Err(e) => return Err(format!("flushing bdev {} failed: {e}", p.dst_name)),
        }
        let (store, uuid) = (p.store.clone(), p.src_uuid.clone());
        let now = tokio::task::spawn_blocking(move || store.lvol(&uuid))
            .await
            .map_err(|e| format!("reading lvol {} panicked: {e}", p.src_alias))?
            .map_err(|e| format!("lvol {} after the copy: {e}", p.src_alias))?
            .num_allocated_blocks;
        if now != p.allocated_at_start {
            return Err(format!(
                "the blocks of lvol {} changed during the copy ({} allocated, now {now}: a snapshot below it was deleted and merged into it); the destination misses them, copy again",
                p.src_alias, p.allocated_at_start
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_respects_clusters_and_max() {
        let mut q = VecDeque::new();
        split(&[(2, 10), (14, 1)], 4, 3, &mut q);
        let v: Vec<_> = q.iter().map(|c| (c.off, c.n, c.cluster)).collect();
        assert_eq!(
            v,
            vec![
                (2, 2, 0),
                (4, 3, 1),
                (7, 1, 1),
                (8, 3, 2),
                (11, 1, 2),
                (14, 1, 3)
            ]
        );
    }

    #[test]
    fn count_dedups_clusters_across_runs_and_windows() {
        let (mut b, mut c, mut last) = (0, 0, None);
        count(&[(0, 1), (2, 1), (5, 4)], 4, &mut last, &mut b, &mut c);
        assert_eq!((b, c), (6, 3)); // clusters 0, 1, 2
        count(&[(9, 2), (16, 1)], 4, &mut last, &mut b, &mut c);
        assert_eq!((b, c), (9, 4)); // 2 again, then 4
    }

    #[test]
    fn clusters_count_once_all_their_chunks_are_copied() {
        let mut t = ClusterTracker::default();
        t.dispatched(0);
        t.dispatched(0);
        t.dispatched(1);
        assert_eq!(t.copied(1), 0, "cluster 0 still has chunks in flight");
        assert_eq!(t.copied(0), 0);
        assert_eq!(t.copied(0), 1, "0 done; 1 not sealed yet");
        t.dispatched(3);
        assert_eq!(t.copied(3), 1, "1 sealed by the hand-out of 3");
        assert_eq!(t.finish(), 1);
    }
}
