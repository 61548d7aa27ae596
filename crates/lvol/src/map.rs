//! In-memory maps of the data path.
//!
//! [`LayerMap`]: which blocks one layer holds, one bit per block, in leaves of
//! 32768 bits that are exactly the 4 KiB pages of the layer's `.map` file. Bits
//! are atomics, so concurrent writers set them without a lock; leaves are created
//! on first use, so an empty layer costs a pointer per 128 MiB (4 KiB blocks).
//!
//! [`OwnerMap`]: for every block of a view, which layer *below the top* holds it
//! (16-bit index into the view's layer table, 0 = none). Together with the top
//! layer's own bitmap it answers "where does block b live" in O(1), whatever the
//! length of the chain.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::OnceLock;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

/// Blocks covered by one leaf of a [`LayerMap`] (= bits in a 4 KiB map page).
pub const LEAF_BLOCKS: u64 = 32768;
/// Bytes of one map page.
pub const MAP_PAGE: usize = 4096;
const LEAF_WORDS: usize = (LEAF_BLOCKS / 64) as usize;

struct Leaf {
    words: Box<[AtomicU64]>,
    /// Changed since its page was last written.
    dirty: AtomicBool,
    /// Its page in the map file has space reserved, so writing it cannot fail
    /// with ENOSPC at flush time.
    on_disk: AtomicBool,
}

impl Leaf {
    fn new() -> Box<Leaf> {
        Box::new(Leaf {
            words: (0..LEAF_WORDS).map(|_| AtomicU64::new(0)).collect(),
            dirty: AtomicBool::new(false),
            on_disk: AtomicBool::new(false),
        })
    }
}

/// One layer's allocation bitmap.
pub struct LayerMap {
    leaves: RwLock<Vec<OnceLock<Box<Leaf>>>>,
    /// Indices of leaves whose `dirty` went from false to true.
    dirty: Mutex<Vec<u32>>,
    count: AtomicU64,
}

impl std::fmt::Debug for LayerMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LayerMap({} blocks allocated)", self.count())
    }
}

fn leaves_for(num_blocks: u64) -> usize {
    num_blocks.div_ceil(LEAF_BLOCKS) as usize
}

/// A read guard over a [`LayerMap`], for looking up many blocks under one lock.
pub struct MapReader<'a> {
    leaves: RwLockReadGuard<'a, Vec<OnceLock<Box<Leaf>>>>,
}

impl std::fmt::Debug for MapReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MapReader({} leaves)", self.leaves.len())
    }
}

impl MapReader<'_> {
    /// Whether block `b` is held.
    #[inline]
    pub fn get(&self, b: u64) -> bool {
        let li = (b / LEAF_BLOCKS) as usize;
        match self.leaves.get(li).and_then(|l| l.get()) {
            Some(leaf) => {
                let bit = b % LEAF_BLOCKS;
                leaf.words[(bit / 64) as usize].load(SeqCst) & (1 << (bit % 64)) != 0
            }
            None => false,
        }
    }

    /// How many blocks from `b` (before `end`) have the value `v`.
    pub fn run(&self, b: u64, end: u64, v: bool) -> u64 {
        let mut x = b;
        while x < end {
            let li = (x / LEAF_BLOCKS) as usize;
            let Some(leaf) = self.leaves.get(li).and_then(|l| l.get()) else {
                if v {
                    break;
                }
                x = ((li as u64 + 1) * LEAF_BLOCKS).min(end);
                continue;
            };
            let bit = x % LEAF_BLOCKS;
            let w = leaf.words[(bit / 64) as usize].load(SeqCst);
            let w = if v { !w } else { w } >> (bit % 64);
            // w has a 1 where the value differs; its trailing zeros are the run.
            let same = if w == 0 {
                64 - bit % 64
            } else {
                (w.trailing_zeros() as u64).min(64 - bit % 64)
            };
            x += same;
            if same < 64 - bit % 64 {
                break;
            }
        }
        x.min(end) - b
    }

    /// Calls `f(start, len)` for each run of held blocks in `from..to`.
    pub fn for_each_run(&self, from: u64, to: u64, mut f: impl FnMut(u64, u64)) {
        let mut b = from;
        while b < to {
            let gap = self.run(b, to, false);
            b += gap;
            if b >= to {
                break;
            }
            let n = self.run(b, to, true);
            f(b, n);
            b += n;
        }
    }
}

impl LayerMap {
    /// An empty map for `num_blocks` blocks.
    pub fn new(num_blocks: u64) -> LayerMap {
        LayerMap {
            leaves: RwLock::new(
                (0..leaves_for(num_blocks))
                    .map(|_| OnceLock::new())
                    .collect(),
            ),
            dirty: Mutex::new(Vec::new()),
            count: AtomicU64::new(0),
        }
    }

    /// A map from its on-disk pages: `page(i, buf)` fills page `i`. Bits at or
    /// beyond `num_blocks` are ignored. Pages that hold any bit are known to have
    /// space on disk.
    pub fn load(
        num_blocks: u64,
        mut page: impl FnMut(usize, &mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<LayerMap> {
        let m = LayerMap::new(num_blocks);
        let mut buf = vec![0u8; MAP_PAGE];
        let mut count = 0u64;
        {
            let leaves = m.leaves.read();
            for (i, slot) in leaves.iter().enumerate() {
                page(i, &mut buf)?;
                // Mask bits past the end of the layer.
                let valid = (num_blocks - i as u64 * LEAF_BLOCKS).min(LEAF_BLOCKS);
                let mut any = false;
                for (w, chunk) in buf.chunks_exact_mut(8).enumerate() {
                    let first = w as u64 * 64;
                    let mut v = u64::from_le_bytes([
                        chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6],
                        chunk[7],
                    ]);
                    if first >= valid {
                        v = 0;
                    } else if valid - first < 64 {
                        v &= (1u64 << (valid - first)) - 1;
                    }
                    chunk.copy_from_slice(&v.to_le_bytes());
                    any |= v != 0;
                }
                if !any {
                    continue;
                }
                let leaf = Leaf::new();
                for (w, chunk) in buf.chunks_exact(8).enumerate() {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(chunk);
                    let v = u64::from_le_bytes(a);
                    count += v.count_ones() as u64;
                    leaf.words[w].store(v, SeqCst);
                }
                leaf.on_disk.store(true, SeqCst);
                let _ = slot.set(leaf);
            }
        }
        m.count.store(count, SeqCst);
        Ok(m)
    }

    pub fn reader(&self) -> MapReader<'_> {
        MapReader {
            leaves: self.leaves.read(),
        }
    }

    pub fn get(&self, b: u64) -> bool {
        self.reader().get(b)
    }

    /// Blocks held.
    pub fn count(&self) -> u64 {
        self.count.load(SeqCst)
    }

    /// Makes room for `num_blocks` blocks (never shrinks).
    pub fn grow(&self, num_blocks: u64) {
        let mut l = self.leaves.write();
        while l.len() < leaves_for(num_blocks) {
            l.push(OnceLock::new());
        }
    }

    /// Leaf indices covering blocks `b..b+n` whose pages have no space reserved
    /// yet; `reserve(page)` is called for each and they are marked on success.
    pub fn reserve_pages(
        &self,
        b: u64,
        n: u64,
        mut reserve: impl FnMut(usize) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let leaves = self.leaves.read();
        for li in (b / LEAF_BLOCKS)..=((b + n - 1) / LEAF_BLOCKS) {
            let Some(slot) = leaves.get(li as usize) else {
                break;
            };
            let leaf = slot.get_or_init(Leaf::new);
            if !leaf.on_disk.load(SeqCst) {
                reserve(li as usize)?;
                leaf.on_disk.store(true, SeqCst);
            }
        }
        Ok(())
    }

    fn update(&self, b: u64, n: u64, set: bool) {
        let leaves = self.leaves.read();
        let mut x = b;
        let end = b + n;
        while x < end {
            let li = (x / LEAF_BLOCKS) as usize;
            let Some(slot) = leaves.get(li) else { break };
            let leaf_end = ((li as u64 + 1) * LEAF_BLOCKS).min(end);
            let leaf = if set {
                slot.get_or_init(Leaf::new)
            } else {
                match slot.get() {
                    Some(l) => l,
                    None => {
                        x = leaf_end;
                        continue;
                    }
                }
            };
            let mut changed = false;
            while x < leaf_end {
                let bit = x % LEAF_BLOCKS;
                let w = (bit / 64) as usize;
                let lo = bit % 64;
                let cnt = (64 - lo).min(leaf_end - x);
                let mask = if cnt == 64 {
                    u64::MAX
                } else {
                    ((1u64 << cnt) - 1) << lo
                };
                if set {
                    let old = leaf.words[w].fetch_or(mask, SeqCst);
                    let new = (mask & !old).count_ones() as u64;
                    if new != 0 {
                        self.count.fetch_add(new, SeqCst);
                        changed = true;
                    }
                } else {
                    let old = leaf.words[w].fetch_and(!mask, SeqCst);
                    let gone = (mask & old).count_ones() as u64;
                    if gone != 0 {
                        self.count.fetch_sub(gone, SeqCst);
                        changed = true;
                    }
                }
                x += cnt;
            }
            if changed && !leaf.dirty.swap(true, SeqCst) {
                self.dirty.lock().push(li as u32);
            }
        }
    }

    /// Marks blocks `b..b+n` held.
    pub fn set_range(&self, b: u64, n: u64) {
        self.update(b, n, true)
    }

    /// Marks blocks `b..b+n` not held.
    pub fn clear_range(&self, b: u64, n: u64) {
        self.update(b, n, false)
    }

    /// Moves the list of dirty leaves into `idx`, clears their dirty flags and
    /// copies them into `buf` (one page each, little-endian words). Bits set after
    /// a leaf was copied leave it dirty for the next call.
    pub fn snapshot_dirty(&self, idx: &mut Vec<u32>, buf: &mut Vec<u8>) {
        idx.clear();
        std::mem::swap(&mut *self.dirty.lock(), idx);
        buf.clear();
        buf.resize(idx.len() * MAP_PAGE, 0);
        let leaves = self.leaves.read();
        for (i, &li) in idx.iter().enumerate() {
            let Some(leaf) = leaves.get(li as usize).and_then(|l| l.get()) else {
                continue;
            };
            leaf.dirty.store(false, SeqCst);
            let page = &mut buf[i * MAP_PAGE..(i + 1) * MAP_PAGE];
            for (w, chunk) in page.chunks_exact_mut(8).enumerate() {
                chunk.copy_from_slice(&leaf.words[w].load(SeqCst).to_le_bytes());
            }
        }
    }

    /// Marks leaves dirty again after a failed write of their pages.
    pub fn redirty(&self, idx: &[u32]) {
        let leaves = self.leaves.read();
        for &li in idx {
            if let Some(leaf) = leaves.get(li as usize).and_then(|l| l.get()) {
                if !leaf.dirty.swap(true, SeqCst) {
                    self.dirty.lock().push(li);
                }
            }
        }
    }

    /// Calls `f(start, len)` for each run of held blocks in `from..to`.
    pub fn for_each_run(&self, from: u64, to: u64, f: impl FnMut(u64, u64)) {
        self.reader().for_each_run(from, to, f)
    }
}

/// Blocks per leaf of an [`OwnerMap`].
const OWNER_LEAF: u64 = 4096;

/// For each block of a view, the index of the newest layer below the top that
/// holds it (0 = none). Changed only by control operations, with I/O paused.
#[derive(Debug, Default)]
pub struct OwnerMap {
    leaves: Vec<Option<Box<[u16]>>>,
}

impl OwnerMap {
    pub fn new(num_blocks: u64) -> OwnerMap {
        OwnerMap {
            leaves: (0..num_blocks.div_ceil(OWNER_LEAF)).map(|_| None).collect(),
        }
    }

    pub fn grow(&mut self, num_blocks: u64) {
        let want = num_blocks.div_ceil(OWNER_LEAF) as usize;
        if self.leaves.len() < want {
            self.leaves.resize_with(want, || None);
        }
    }

    #[inline]
    pub fn get(&self, b: u64) -> u16 {
        match self.leaves.get((b / OWNER_LEAF) as usize) {
            Some(Some(l)) => l[(b % OWNER_LEAF) as usize],
            _ => 0,
        }
    }

    /// Sets blocks `b..b+n` to owner `v`.
    pub fn set_range(&mut self, b: u64, n: u64, v: u16) {
        let mut x = b;
        let end = b + n;
        while x < end {
            let li = (x / OWNER_LEAF) as usize;
            let leaf_end = ((li as u64 + 1) * OWNER_LEAF).min(end);
            let Some(slot) = self.leaves.get_mut(li) else {
                break;
            };
            if slot.is_none() && v == 0 {
                x = leaf_end;
                continue;
            }
            let leaf =
                slot.get_or_insert_with(|| vec![0u16; OWNER_LEAF as usize].into_boxed_slice());
            let lo = (x % OWNER_LEAF) as usize;
            let hi = lo + (leaf_end - x) as usize;
            leaf[lo..hi].fill(v);
            x = leaf_end;
        }
    }

    /// How many blocks from `b` (before `end`) have owner `v`.
    pub fn run(&self, b: u64, end: u64, v: u16) -> u64 {
        let mut x = b;
        while x < end {
            let li = (x / OWNER_LEAF) as usize;
            let leaf_end = ((li as u64 + 1) * OWNER_LEAF).min(end);
            match self.leaves.get(li) {
                Some(Some(l)) => {
                    let lo = (x % OWNER_LEAF) as usize;
                    let hi = lo + (leaf_end - x) as usize;
                    match l[lo..hi].iter().position(|&o| o != v) {
                        Some(p) => return x + p as u64 - b,
                        None => x = leaf_end,
                    }
                }
                _ if v == 0 => x = leaf_end,
                _ => break,
            }
        }
        x.min(end) - b
    }

    /// Bytes of memory the leaves use.
    pub fn memory(&self) -> usize {
        self.leaves.iter().flatten().count() * OWNER_LEAF as usize * 2 + self.leaves.len() * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_clear_count_runs() {
        let m = LayerMap::new(100_000);
        m.set_range(10, 100);
        m.set_range(32760, 20); // across a leaf boundary
        assert_eq!(m.count(), 120);
        m.set_range(50, 10); // already set: no change
        assert_eq!(m.count(), 120);
        let r = m.reader();
        assert!(r.get(10) && r.get(109) && !r.get(110) && !r.get(9));
        assert_eq!(r.run(10, 1000, true), 100);
        assert_eq!(r.run(0, 1000, false), 10);
        assert_eq!(r.run(110, 100_000, false), 32760 - 110);
        assert_eq!(r.run(32760, 100_000, true), 20);
        let mut runs = vec![];
        r.for_each_run(0, 100_000, |s, n| runs.push((s, n)));
        assert_eq!(runs, vec![(10, 100), (32760, 20)]);
        drop(r);
        m.clear_range(0, 40_000);
        assert_eq!(m.count(), 0);
    }

    #[test]
    fn dirty_pages_roundtrip_through_load() {
        let m = LayerMap::new(70_000);
        m.set_range(5, 3);
        m.set_range(66_000, 2);
        let (mut idx, mut buf) = (vec![], vec![]);
        m.snapshot_dirty(&mut idx, &mut buf);
        assert_eq!(idx.len(), 2);
        let mut pages = vec![vec![0u8; MAP_PAGE]; 3];
        for (i, &li) in idx.iter().enumerate() {
            pages[li as usize].copy_from_slice(&buf[i * MAP_PAGE..(i + 1) * MAP_PAGE]);
        }
        // nothing dirty any more
        m.snapshot_dirty(&mut idx, &mut buf);
        assert!(idx.is_empty());
        // a stray bit past the end is ignored on load
        pages[2][MAP_PAGE - 1] = 0x80;
        let l = LayerMap::load(70_000, |i, b| {
            b.copy_from_slice(&pages[i]);
            Ok(())
        })
        .unwrap();
        assert_eq!(l.count(), 5);
        assert!(l.get(5) && l.get(7) && l.get(66_001) && !l.get(8));
    }

    proptest! {
        #[test]
        fn runs_match_a_plain_vector(ops in proptest::collection::vec((0u64..70_000, 1u64..3000, any::<bool>()), 1..20),
                                     probe in 0u64..70_000) {
            let n = 70_000u64;
            let m = LayerMap::new(n);
            let mut o = OwnerMap::new(n);
            let mut v = vec![false; n as usize];
            let mut ov = vec![0u16; n as usize];
            for (i, (b, len, set)) in ops.iter().enumerate() {
                let len = (*len).min(n - b);
                if *set { m.set_range(*b, len) } else { m.clear_range(*b, len) }
                o.set_range(*b, len, if *set { i as u16 + 1 } else { 0 });
                for x in *b..b + len {
                    v[x as usize] = *set;
                    ov[x as usize] = if *set { i as u16 + 1 } else { 0 };
                }
            }
            prop_assert_eq!(m.count(), v.iter().filter(|&&x| x).count() as u64);
            let r = m.reader();
            let val = v[probe as usize];
            let expect = v[probe as usize..].iter().take_while(|&&x| x == val).count() as u64;
            prop_assert_eq!(r.run(probe, n, val), expect);
            let ovl = ov[probe as usize];
            let expect = ov[probe as usize..].iter().take_while(|&&x| x == ovl).count() as u64;
            prop_assert_eq!(o.run(probe, n, ovl), expect);
            prop_assert_eq!(o.get(probe), ovl);
        }
    }
}
