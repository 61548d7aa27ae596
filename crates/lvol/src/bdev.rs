//! [`LvolBdev`]: an lvol (head or snapshot) served as a [`bdev::Bdev`].
//!
//! Each bdev has a [`View`] of its chain: the top layer (the lvol's own), a
//! table of the layers below it, and an [`OwnerMap`] giving, for each block, the
//! newest layer below the top that holds it. A read checks the top layer's
//! bitmap, then the owner map: two array lookups per block, whatever the chain
//! length, and one read per run of blocks that live in the same layer. A write
//! goes to the top layer's data file at the block's own offset: one write, no
//! copy from any lower layer, because the allocation unit is the block itself.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use bdev::{check_range, Bdev, BdevIo, Completion, IoError, IoKind};
use parking_lot::RwLock;
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
    pub fn build(top: Arc<Layer>, ancestors: &[Arc<Layer>], writable: bool, num_blocks: u64) -> View {
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
        layer.map.for_each_run(0, self.num_blocks, |b, n| below.set_range(b, n, idx));
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
    pub(crate) fn new(uuid: Uuid, alias: String, block_size: u32, view: View) -> LvolBdev {
        LvolBdev {
            name: uuid.to_string(),
            alias,
            uuid,
            block_size,
            num_blocks: AtomicU64::new(view.num_blocks),
            view: RwLock::new(view),
            gate: IoGate::default(),
        }
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
            IoKind::Read => v.read(io.offset_blocks, io.num_blocks, io.buf.as_mut_slice()).map_err(io_err),
            IoKind::Write => {
                if !v.writable {
                    return Err(IoError::ReadOnly);
                }
                v.top.write_blocks(io.offset_blocks, io.buf.as_slice()).map_err(io_err)?;
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
                let r = self.execute(&mut io);
                self.gate.exit();
                done.complete(io, r);
            }
        }
    }
}
