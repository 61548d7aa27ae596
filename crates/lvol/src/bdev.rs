//! [`LvolBdev`]: an lvol (head or snapshot) served as a [`bdev::Bdev`].
//!
//! Each bdev has a [`View`] of its chain: the top layer (the lvol's own), a
//! table of the layers below it, and an [`OwnerMap`] giving, for each block, the
//! newest layer below the top that holds it. A read checks the top layer's
//! bitmap, then the owner map: two array lookups per block, whatever the chain
//! length, and one read per run of blocks that live in the same layer. A write
//! goes to the top layer's data file at the block's own offset: one write, no
//! copy from any lower layer, because the allocation unit is the block itself.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Weak};

use bdev::uring::{OpKind, Reactor, UringSink};
use bdev::{check_range, Bdev, BdevIo, Completion, IoBuf, IoError, IoKind};
use parking_lot::{Mutex, RwLock};
use uuid::Uuid;

use crate::gate::{Entry, IoGate};
use crate::layer::Layer;
use crate::map::OwnerMap;

pub(crate) fn io_err(e: std::io::Error) -> IoError {
    IoError::from_errno(e.raw_os_error().unwrap_or(libc::EIO))
}

/// How an lvol resolves its blocks. Changed only with the bdev's I/O paused.
#[derive(Debug)]
pub(crate) struct View {
    /// Layers below the top; owner value `i` means `table[i - 1]`. Entries are
    /// never removed while the view lives (a merged-away layer is replaced by the
    /// layer it was merged into, which holds the same data).
    pub table: Vec<Arc<Layer>>,
    pub top: Arc<Layer>,
    pub writable: bool,
    pub below: OwnerMap,
    pub num_blocks: u64,
    pub removed: bool,
}

impl View {
    /// Builds the view of `top` over `ancestors` (nearest first).
    pub fn build(
        top: Arc<Layer>,
        ancestors: &[Arc<Layer>],
        writable: bool,
        num_blocks: u64,
    ) -> View {
        let mut v = View {
            table: Vec::with_capacity(ancestors.len()),
            top,
            writable,
            below: OwnerMap::new(num_blocks),
            num_blocks,
            removed: false,
        };
        for l in ancestors.iter().rev() {
            v.push_below(l.clone());
        }
        v
    }

    /// Puts `layer` on top of the layers below the top (after a snapshot, the
    /// old top). Costs one step per run of blocks it holds.
    pub fn push_below(&mut self, layer: Arc<Layer>) {
        self.table.push(layer.clone());
        let idx = self.table.len() as u16;
        let below = &mut self.below;
        layer
            .map
            .for_each_run(0, self.num_blocks, |b, n| below.set_range(b, n, idx));
    }

    /// Whether the table still has room for another layer.
    pub fn table_full(&self) -> bool {
        self.table.len() >= u16::MAX as usize - 1
    }

    /// Replaces every reference to `old` by `new`, which holds (at least) the
    /// same blocks with the same data.
    pub fn alias(&mut self, old: &Arc<Layer>, new: &Arc<Layer>) {
        for l in self.table.iter_mut() {
            if Arc::ptr_eq(l, old) {
                *l = new.clone();
            }
        }
    }

    pub fn contains(&self, layer: &Arc<Layer>) -> bool {
        Arc::ptr_eq(&self.top, layer) || self.table.iter().any(|l| Arc::ptr_eq(l, layer))
    }

    fn layer(&self, owner: u16) -> Option<&Arc<Layer>> {
        if owner == 0 {
            None
        } else {
            self.table.get(owner as usize - 1)
        }
    }

    /// Calls `f(block, count, source)` for each run of blocks `off..off+n` that
    /// live in the same layer (`None`: in no layer, reads as zeroes).
    pub fn for_each_extent<E>(
        &self,
        off: u64,
        n: u64,
        mut f: impl FnMut(u64, u64, Option<&Arc<Layer>>) -> Result<(), E>,
    ) -> Result<(), E> {
        let top = self.top.map.reader();
        let end = off + n;
        let mut b = off;
        while b < end {
            let run = top.run(b, end, true);
            if run > 0 {
                f(b, run, Some(&self.top))?;
                b += run;
                continue;
            }
            let o = self.below.get(b);
            let gap = top.run(b, end, false);
            let run = self.below.run(b, b + gap, o).max(1);
            f(b, run, self.layer(o))?;
            b += run;
        }
        Ok(())
    }

    /// Reads blocks `off..off+n` into `buf`.
    pub fn read(&self, off: u64, n: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let bs = self.top.block_size as u64;
        self.for_each_extent(off, n, |b, cnt, src| {
            let lo = ((b - off) * bs) as usize;
            let hi = lo + (cnt * bs) as usize;
            match src {
                Some(l) => l.data.read_at(b * bs, &mut buf[lo..hi]),
                None => {
                    buf[lo..hi].fill(0);
                    Ok(())
                }
            }
        })
    }

    /// Write-zeroes and unmap: blocks that some lower layer holds are zeroed but
    /// kept in the top layer (dropping them would expose the older data); the
    /// others are dropped from the top layer and their space freed.
    pub fn zero(&self, off: u64, n: u64) -> std::io::Result<()> {
        let end = off + n;
        let mut b = off;
        while b < end {
            let o = self.below.get(b);
            let run = self.below.run(b, end, o).max(1);
            if o != 0 {
                self.top.zero_blocks(b, run)?;
            } else {
                self.top.drop_blocks(b, run)?;
            }
            b += run;
        }
        Ok(())
    }
}

/// An lvol served as a block device. Its name is the lvol's UUID, as in SPDK;
/// [`LvolBdev::alias`] is `lvs_name/lvol_name`.
pub struct LvolBdev {
    name: String,
    alias: String,
    uuid: Uuid,
    block_size: u32,
    num_blocks: AtomicU64,
    pub(crate) view: RwLock<View>,
    gate: IoGate<(BdevIo, Completion)>,
    /// The io_uring data path (reads and writes); `None`: synchronous calls.
    reactor: Option<Arc<Reactor>>,
    /// Where requests that block (flush, FUA writes, write-zeroes, unmap) run
    /// when the bdev has a reactor, so that submitters never wait for them.
    worker: Option<mpsc::Sender<SyncJob>>,
    /// This bdev as the completion sink of its reactor ops.
    me: Weak<LvolBdev>,
    /// Requests in flight on the reactor, preallocated: no allocation per I/O.
    slots: Box<[Slot]>,
    free: Mutex<Vec<u32>>,
}

/// A request for the store's sync worker thread.
pub(crate) type SyncJob = (Arc<LvolBdev>, BdevIo, Completion);

/// Runs sync jobs until every sender is gone.
pub(crate) fn sync_worker(rx: mpsc::Receiver<SyncJob>) {
    while let Ok((bdev, io, done)) = rx.recv() {
        bdev.finish_sync(io, done);
    }
}

/// Slots of requests in flight on the reactor per bdev; more wait synchronously.
const SLOTS: usize = 256;

/// A request in flight on the reactor, split into one op per extent.
#[derive(Default)]
struct Slot {
    req: Mutex<Option<InFlight>>,
    /// Ops not yet completed, plus one held by the submitter until it has
    /// submitted them all.
    remaining: AtomicU32,
    /// First errno reported by an op (0: none).
    err: AtomicI32,
}

struct InFlight {
    io: BdevIo,
    done: Completion,
    /// For writes: the layer whose map records the blocks once written.
    top: Option<Arc<Layer>>,
}

impl std::fmt::Debug for LvolBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LvolBdev")
            .field("name", &self.name)
            .field("alias", &self.alias)
            .field("num_blocks", &self.num_blocks())
            .finish()
    }
}

/// While alive, the bdev's I/O is stopped (new requests are parked); dropping it
/// resubmits them.
pub(crate) struct Paused<'a> {
    bdev: &'a LvolBdev,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        for (io, done) in self.bdev.gate.resume() {
            self.bdev.submit(io, done);
        }
    }
}

impl LvolBdev {
    pub(crate) fn new(
        uuid: Uuid,
        alias: String,
        block_size: u32,
        view: View,
        reactor: Option<Arc<Reactor>>,
        worker: Option<mpsc::Sender<SyncJob>>,
    ) -> Arc<LvolBdev> {
        let slots = if reactor.is_some() { SLOTS } else { 0 };
        Arc::new_cyclic(|me| LvolBdev {
            name: uuid.to_string(),
            alias,
            uuid,
            block_size,
            num_blocks: AtomicU64::new(view.num_blocks),
            view: RwLock::new(view),
            gate: IoGate::default(),
            reactor,
            worker,
            me: me.clone(),
            slots: (0..slots).map(|_| Slot::default()).collect(),
            free: Mutex::new((0..slots as u32).rev().collect()),
        })
    }

    /// Whether reads and writes go through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.reactor.is_some()
    }

    /// `lvs_name/lvol_name`, the alias SPDK registers for an lvol bdev.
    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// Whether writes are accepted (false for snapshots).
    pub fn writable(&self) -> bool {
        self.view.read().writable
    }

    /// Whether the lvol was deleted (every I/O fails with [`IoError::Removed`]).
    pub fn is_removed(&self) -> bool {
        self.view.read().removed
    }

    /// The layer (its file UUID) that holds block `b` as this lvol reads it;
    /// `None` for a block no layer holds (reads as zeroes). The same O(1)
    /// lookup the read path makes, for tools and benchmarks.
    pub fn layer_of(&self, b: u64) -> Option<Uuid> {
        let v = self.view.read();
        if b >= v.num_blocks {
            return None;
        }
        if v.top.map.get(b) {
            return Some(v.top.file);
        }
        v.layer(v.below.get(b)).map(|l| l.file)
    }

    /// Memory used by the block-owner index, in bytes.
    pub fn owner_map_bytes(&self) -> usize {
        self.view.read().below.memory()
    }

    /// Stops I/O until the guard is dropped; waits for I/O in flight.
    pub(crate) fn pause(&self) -> Paused<'_> {
        self.gate.pause();
        Paused { bdev: self }
    }

    pub(crate) fn set_num_blocks(&self, n: u64) {
        self.num_blocks.store(n, SeqCst);
    }

    fn execute(&self, io: &mut BdevIo) -> Result<(), IoError> {
        let v = self.view.read();
        if v.removed {
            return Err(IoError::Removed);
        }
        check_range(io, self.block_size, v.num_blocks)?;
        match io.kind {
            IoKind::Read => v
                .read(io.offset_blocks, io.num_blocks, io.buf.as_mut_slice())
                .map_err(io_err),
            IoKind::Write => {
                if !v.writable {
                    return Err(IoError::ReadOnly);
                }
                v.top
                    .write_blocks(io.offset_blocks, io.buf.as_slice())
                    .map_err(io_err)?;
                if io.fua {
                    v.top.flush().map_err(io_err)?;
                }
                Ok(())
            }
            IoKind::Flush => {
                if v.writable {
                    v.top.flush().map_err(io_err)?;
                }
                Ok(())
            }
            IoKind::WriteZeroes | IoKind::Unmap => {
                if !v.writable {
                    return Err(IoError::ReadOnly);
                }
                v.zero(io.offset_blocks, io.num_blocks).map_err(io_err)
            }
        }
    }
}

impl Bdev for LvolBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks.load(SeqCst)
    }
    fn uuid(&self) -> Uuid {
        self.uuid
    }
    fn product_name(&self) -> &'static str {
        "Logical Volume"
    }
    fn supports(&self, _kind: IoKind) -> bool {
        true
    }
    fn write_cache(&self) -> bool {
        true
    }
    fn submit(&self, io: BdevIo, done: Completion) {
        match self.gate.enter((io, done)) {
            Entry::Parked => {}
            Entry::Entered((mut io, done)) => {
                let async_kind =
                    matches!(io.kind, IoKind::Read) || (io.kind == IoKind::Write && !io.fua);
                let mut done = done;
                if async_kind {
                    if let Some(r) = &self.reactor {
                        match self.start_async(r, io, done) {
                            Ok(()) => return,
                            Err((i, d)) => (io, done) = (i, d),
                        }
                    }
                }
                self.run_blocking(io, done)
            }
        }
    }
}

impl LvolBdev {
    /// Runs a request that may block: on the sync worker if there is one.
    fn run_blocking(&self, io: BdevIo, done: Completion) {
        if let (Some(tx), Some(me)) = (&self.worker, self.me.upgrade()) {
            match tx.send((me, io, done)) {
                Ok(()) => return,
                // The worker is gone: run it here.
                Err(mpsc::SendError((_, io, done))) => return self.finish_sync(io, done),
            }
        }
        self.finish_sync(io, done)
    }

    fn finish_sync(&self, mut io: BdevIo, done: Completion) {
        let r = self.execute(&mut io);
        self.gate.exit();
        done.complete(io, r);
    }

    /// Starts a read or write on the reactor: one op per extent into (or from)
    /// the request's own buffer. Gives the request back when no slot is free.
    #[allow(clippy::result_large_err)]
    fn start_async(
        &self,
        reactor: &Reactor,
        mut io: BdevIo,
        done: Completion,
    ) -> Result<(), (BdevIo, Completion)> {
        let Some(idx) = self.free.lock().pop() else {
            return Err((io, done));
        };
        let slot = &self.slots[idx as usize];
        let Some(me) = self.me.upgrade() else {
            self.free.lock().push(idx);
            return Err((io, done));
        };
        let sink: Arc<dyn UringSink> = me;
        let v = self.view.read();
        let check = if v.removed {
            Err(IoError::Removed)
        } else {
            check_range(&io, self.block_size, v.num_blocks)
        };
        if let Err(e) = check {
            drop(v);
            self.free.lock().push(idx);
            self.gate.exit();
            done.complete(io, Err(e));
            return Ok(());
        }
        let bs = self.block_size as u64;
        let (off, n) = (io.offset_blocks, io.num_blocks);
        let is_write = io.kind == IoKind::Write;
        // A write only reads its buffer: no copy-on-write of a shared buffer.
        let base = if is_write {
            io.buf.as_ptr() as *mut u8
        } else {
            io.buf.as_mut_ptr()
        };
        if is_write {
            if !v.writable {
                drop(v);
                self.free.lock().push(idx);
                self.gate.exit();
                done.complete(io, Err(IoError::ReadOnly));
                return Ok(());
            }
            if let Err(e) = v.top.reserve_map(off, n) {
                drop(v);
                self.free.lock().push(idx);
                self.gate.exit();
                done.complete(io, Err(io_err(e)));
                return Ok(());
            }
        }
        let fd_missing = |l: &Layer| l.fd.is_none();
        if fd_missing(&v.top) || v.table.iter().any(|l| fd_missing(l)) {
            drop(v);
            self.free.lock().push(idx);
            return Err((io, done));
        }
        slot.err.store(0, SeqCst);
        slot.remaining.store(1, SeqCst);
        let top = if is_write { Some(v.top.clone()) } else { None };
        *slot.req.lock() = Some(InFlight { io, done, top });
        let tag = idx as u64;
        if is_write {
            slot.remaining.fetch_add(1, SeqCst);
            if let Some(fd) = &v.top.fd {
                let kind = OpKind::Write {
                    offset: off * bs,
                    rw_flags: 0,
                };
                // SAFETY: `base` points at the request's buffer of `n * bs` bytes
                // (checked above), owned by the slot until the last op completes;
                // nothing touches it meanwhile.
                unsafe { reactor.submit_raw(fd, kind, base, (n * bs) as usize, sink.clone(), tag) };
            }
        } else {
            let _ = v.for_each_extent(off, n, |b, cnt, src| -> Result<(), ()> {
                let lo = ((b - off) * bs) as usize;
                let len = (cnt * bs) as usize;
                match src.and_then(|l| l.fd.as_ref()) {
                    Some(fd) => {
                        slot.remaining.fetch_add(1, SeqCst);
                        let kind = OpKind::Read { offset: b * bs };
                        // SAFETY: `base + lo .. + len` lies inside the request's
                        // buffer (extents partition the request), which the slot owns
                        // until the last op completes; extents do not overlap.
                        unsafe {
                            reactor.submit_raw(fd, kind, base.add(lo), len, sink.clone(), tag)
                        };
                    }
                    None => {
                        // SAFETY: as above; no op of this request covers this range.
                        unsafe { std::ptr::write_bytes(base.add(lo), 0, len) };
                    }
                }
                Ok(())
            });
        }
        drop(v);
        self.op_done(idx, Ok(0));
        Ok(())
    }

    /// One op of slot `idx` finished; the last one completes the request.
    fn op_done(&self, idx: u32, result: Result<usize, i32>) {
        let slot = &self.slots[idx as usize];
        if let Err(e) = result {
            let _ = slot.err.compare_exchange(0, e, SeqCst, SeqCst);
        }
        if slot.remaining.fetch_sub(1, SeqCst) != 1 {
            return;
        }
        let Some(InFlight { io, done, top }) = slot.req.lock().take() else {
            return;
        };
        let err = slot.err.load(SeqCst);
        let r = if err != 0 {
            Err(IoError::from_errno(err))
        } else {
            if let Some(top) = top {
                top.note_written(io.offset_blocks, io.num_blocks);
            }
            Ok(())
        };
        self.free.lock().push(idx);
        self.gate.exit();
        done.complete(io, r);
    }
}

impl UringSink for LvolBdev {
    fn complete(&self, tag: u64, result: Result<usize, i32>, _buf: IoBuf) {
        self.op_done(tag as u32, result);
    }
}
