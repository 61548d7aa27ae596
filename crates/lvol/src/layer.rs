//! A layer: the blocks one lvol holds itself. Two files per layer:
//! `<file>.data`, sparse, where block `b` lives at byte `b * block_size` (identity
//! mapping: a write is one write at one offset, whatever the chain), and
//! `<file>.map`, the allocation bitmap, one bit per block, in 4 KiB pages.
//!
//! Durability of a layer ([`Layer::flush`]): snapshot the dirty map pages, then
//! fdatasync the data file, then write and fdatasync the map pages. A map bit on
//! disk therefore never points at data that is not on disk. Bits only ever
//! change where both their old and new value read correctly after a crash
//! (DESIGN.md, "Crash model"), so a map page torn by a power loss is harmless.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use parking_lot::Mutex;
use uuid::Uuid;

use crate::map::{LayerMap, LEAF_BLOCKS, MAP_PAGE};
use crate::storage::{Open, Storage, StoreFile};

/// File name of a layer's data.
pub fn data_name(file: &Uuid) -> String {
    format!("{file}.data")
}

/// File name of a layer's allocation map.
pub fn map_name(file: &Uuid) -> String {
    format!("{file}.map")
}

/// Scratch buffers of [`Layer::flush`], kept to avoid allocating per flush.
#[derive(Debug, Default)]
struct FlushBufs {
    idx: Vec<u32>,
    pages: Vec<u8>,
}

/// One layer's files and allocation map.
#[derive(Debug)]
pub struct Layer {
    pub file: Uuid,
    pub block_size: u32,
    pub data: Arc<dyn StoreFile>,
    pub mapf: Arc<dyn StoreFile>,
    pub map: LayerMap,
    /// The data file's descriptor for io_uring (`None` on test storage).
    pub fd: Option<Arc<std::fs::File>>,
    /// Data was written since the last fdatasync of the data file.
    unsynced: AtomicBool,
    flush: Mutex<FlushBufs>,
}

impl Layer {
    /// Creates a new, empty layer's files and makes them durable (the caller
    /// syncs the directory before referencing the layer in metadata). A thick
    /// layer has its data space reserved up front.
    pub fn create(
        st: &dyn Storage,
        file: Uuid,
        block_size: u32,
        num_blocks: u64,
        thick: bool,
    ) -> std::io::Result<Layer> {
        let data = st.open(
            &data_name(&file),
            Open::Truncate,
            block_size as usize >= st.direct_min(),
        )?;
        let mapf = st.open(&map_name(&file), Open::Truncate, false)?;
        let bytes = num_blocks * block_size as u64;
        data.set_len(bytes)?;
        if thick {
            data.allocate(0, bytes)?;
        }
        mapf.set_len(num_blocks.div_ceil(LEAF_BLOCKS) * MAP_PAGE as u64)?;
        data.sync()?;
        mapf.sync()?;
        Ok(Self::from_parts(
            file,
            block_size,
            data,
            mapf,
            LayerMap::new(num_blocks),
        ))
    }

    /// Opens an existing layer and loads its map.
    pub fn open(
        st: &dyn Storage,
        file: Uuid,
        block_size: u32,
        num_blocks: u64,
    ) -> std::io::Result<Layer> {
        let data = st.open(
            &data_name(&file),
            Open::Existing,
            block_size as usize >= st.direct_min(),
        )?;
        let mapf = st.open(&map_name(&file), Open::Existing, false)?;
        let map = LayerMap::load(num_blocks, |i, buf| {
            mapf.read_at(i as u64 * MAP_PAGE as u64, buf)
        })?;
        Ok(Self::from_parts(file, block_size, data, mapf, map))
    }

    fn from_parts(
        file: Uuid,
        block_size: u32,
        data: Arc<dyn StoreFile>,
        mapf: Arc<dyn StoreFile>,
        map: LayerMap,
    ) -> Layer {
        Layer {
            file,
            block_size,
            fd: data.shared_fd(),
            data,
            mapf,
            map,
            unsynced: AtomicBool::new(false),
            flush: Mutex::new(FlushBufs::default()),
        }
    }

    /// Removes a layer's files (missing files are fine).
    pub fn remove_files(st: &dyn Storage, file: &Uuid) -> std::io::Result<()> {
        st.remove(&data_name(file))?;
        st.remove(&map_name(file))
    }

    fn bs(&self) -> u64 {
        self.block_size as u64
    }

    /// Reserves the map pages that blocks `b..b+n` live in, so that recording
    /// them never fails for lack of space later (an I/O path call: ENOSPC here
    /// fails the write before any data moves).
    pub fn reserve_map(&self, b: u64, n: u64) -> std::io::Result<()> {
        self.map.reserve_pages(b, n, |page| {
            self.mapf
                .allocate(page as u64 * MAP_PAGE as u64, MAP_PAGE as u64)
        })
    }

    /// Records that blocks `b..b+n` were written (their data is in the file).
    pub fn note_written(&self, b: u64, n: u64) {
        // Before the bits: a flush that sees a bit must also see that the data
        // needs syncing.
        self.unsynced.store(true, SeqCst);
        self.map.set_range(b, n);
    }

    /// Writes blocks from `buf` and records them (synchronous path).
    pub fn write_blocks(&self, b: u64, buf: &[u8]) -> std::io::Result<()> {
        let n = buf.len() as u64 / self.bs();
        self.reserve_map(b, n)?;
        self.data.write_at(b * self.bs(), buf)?;
        self.note_written(b, n);
        Ok(())
    }

    /// Makes blocks `b..b+n` read as zeroes while still held by this layer, so
    /// that they hide what lower layers hold there.
    pub fn zero_blocks(&self, b: u64, n: u64) -> std::io::Result<()> {
        self.reserve_map(b, n)?;
        self.data.zero(b * self.bs(), n * self.bs())?;
        self.note_written(b, n);
        Ok(())
    }

    /// Drops blocks `b..b+n` from this layer and frees their space. Only for
    /// blocks no lower layer holds: they read as zeroes either way.
    pub fn drop_blocks(&self, b: u64, n: u64) -> std::io::Result<()> {
        // Bits first: a reader between the two steps already sees "not held",
        // which reads zeroes, never the half-punched data.
        self.map.clear_range(b, n);
        self.data.punch(b * self.bs(), n * self.bs())
    }

    /// Makes every write that completed before this call durable, with the map.
    pub fn flush(&self) -> std::io::Result<()> {
        let mut g = self.flush.lock();
        let FlushBufs { idx, pages } = &mut *g;
        self.map.snapshot_dirty(idx, pages);
        let r = (|| {
            if self.unsynced.swap(false, SeqCst) {
                if let Err(e) = self.data.sync() {
                    self.unsynced.store(true, SeqCst);
                    return Err(e);
                }
            }
            if idx.is_empty() {
                return Ok(());
            }
            for (i, &li) in idx.iter().enumerate() {
                self.mapf.write_at(
                    li as u64 * MAP_PAGE as u64,
                    &pages[i * MAP_PAGE..(i + 1) * MAP_PAGE],
                )?;
            }
            self.mapf.sync()
        })();
        if r.is_err() {
            self.map.redirty(idx);
        }
        r
    }

    /// Grows the layer to `num_blocks` (files and map); durable on return.
    pub fn grow(&self, num_blocks: u64) -> std::io::Result<()> {
        self.data.set_len(num_blocks * self.bs())?;
        self.mapf
            .set_len(num_blocks.div_ceil(LEAF_BLOCKS) * MAP_PAGE as u64)?;
        self.data.sync()?;
        self.mapf.sync()?;
        self.map.grow(num_blocks);
        Ok(())
    }
}
