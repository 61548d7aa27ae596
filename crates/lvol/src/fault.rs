//! [`FaultStorage`]: an in-memory directory that models what a power failure does
//! to a filesystem, for crash-consistency tests (the approach of redb's fuzzer).
//!
//! Every file keeps two states: the *live* one that reads see, and the *durable*
//! one as of its last `sync`. Writes, punches and length changes since then are
//! kept in order as pending operations. The directory likewise has a durable
//! name table and the creations, renames and removals since the last
//! `sync_dir`. A simulated power loss ([`FaultStorage::power_loss`]) builds a new
//! storage from the durable states plus an arbitrary subset of the pending file
//! operations (each possibly torn at `atomic_unit` granularity, every unit old or
//! new) and an arbitrary prefix of the pending directory operations, which is
//! what ext4 and XFS allow.
//!
//! [`FaultStorage::set_budget`] makes power fail *during* an operation: after a
//! number of mutating calls every call fails with EIO, as if the process had
//! stopped there. [`FaultStorage::set_capacity`] models a full disk (ENOSPC).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

use crate::storage::{Open, Space, Storage, StoreFile};

const PAGE: u64 = 4096;

/// File contents: 4 KiB pages present where written or allocated, holes elsewhere.
#[derive(Debug, Clone, Default)]
struct Content {
    pages: BTreeMap<u64, Box<[u8]>>,
    len: u64,
}

impl Content {
    fn read(&self, off: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let (pg, po) = (pos / PAGE, (pos % PAGE) as usize);
            let n = (PAGE as usize - po).min(buf.len() - done);
            match self.pages.get(&pg) {
                Some(p) if pos < self.len => {
                    let valid = ((self.len - pos) as usize).min(n);
                    buf[done..done + valid].copy_from_slice(&p[po..po + valid]);
                    buf[done + valid..done + n].fill(0);
                }
                _ => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    fn page_mut(&mut self, pg: u64) -> &mut [u8] {
        self.pages
            .entry(pg)
            .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice())
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let (pg, po) = (pos / PAGE, (pos % PAGE) as usize);
            let n = (PAGE as usize - po).min(data.len() - done);
            self.page_mut(pg)[po..po + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.len = self.len.max(off + data.len() as u64);
    }

    /// Zeroes a range; whole pages are dropped when `dealloc`.
    fn zero(&mut self, off: u64, len: u64, dealloc: bool) {
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let (pg, po) = (pos / PAGE, pos % PAGE);
            let n = (PAGE - po).min(end - pos);
            if dealloc && n == PAGE {
                self.pages.remove(&pg);
            } else if dealloc {
                if let Some(p) = self.pages.get_mut(&pg) {
                    p[po as usize..(po + n) as usize].fill(0);
                }
            } else {
                self.page_mut(pg)[po as usize..(po + n) as usize].fill(0);
            }
            pos += n;
        }
    }

    fn allocate(&mut self, off: u64, len: u64) {
        let (first, last) = (off / PAGE, (off + len).div_ceil(PAGE));
        for pg in first..last {
            self.page_mut(pg);
        }
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            // Bytes past the new end must read as zero if the file grows again.
            let end = self.len;
            self.zero(len, end - len, true);
            self.pages.retain(|&pg, _| pg * PAGE < len);
        }
        self.len = len;
    }

    /// Pages that `op` would newly occupy.
    fn new_pages(&self, off: u64, len: u64) -> u64 {
        let (first, last) = (off / PAGE, (off + len).div_ceil(PAGE));
        (first..last)
            .filter(|pg| !self.pages.contains_key(pg))
            .count() as u64
    }
}

#[derive(Debug, Clone)]
enum FileOp {
    Write { off: u64, data: Vec<u8> },
    Zero { off: u64, len: u64, dealloc: bool },
    Allocate { off: u64, len: u64 },
    SetLen(u64),
}

impl FileOp {
    fn apply(&self, c: &mut Content) {
        match self {
            FileOp::Write { off, data } => c.write(*off, data),
            FileOp::Zero { off, len, dealloc } => c.zero(*off, *len, *dealloc),
            FileOp::Allocate { off, len } => c.allocate(*off, *len),
            FileOp::SetLen(l) => c.set_len(*l),
        }
    }
}

#[derive(Debug, Default)]
struct Inode {
    live: Content,
    durable: Content,
    pending: Vec<FileOp>,
}

#[derive(Debug, Clone)]
enum DirOp {
    Link { name: String, ino: u64 },
    Rename { from: String, to: String },
    Remove { name: String },
}

impl DirOp {
    fn apply(&self, names: &mut BTreeMap<String, u64>) {
        match self {
            DirOp::Link { name, ino } => {
                names.insert(name.clone(), *ino);
            }
            DirOp::Rename { from, to } => {
                if let Some(ino) = names.remove(from) {
                    names.insert(to.clone(), ino);
                }
            }
            DirOp::Remove { name } => {
                names.remove(name);
            }
        }
    }
}

#[derive(Debug)]
struct FsState {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    names: BTreeMap<String, u64>,
    durable_names: BTreeMap<String, u64>,
    dir_pending: Vec<DirOp>,
    /// Mutating calls left before power fails; `None` = unlimited.
    budget: Option<u64>,
    dead: bool,
    /// Usable 4 KiB pages; `None` = unlimited.
    capacity: Option<u64>,
    used: u64,
    atomic_unit: usize,
    /// Mutating calls made so far (to choose crash points).
    ops: u64,
}

impl FsState {
    /// Counts one mutating call against the budget.
    fn step(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(dead());
        }
        self.ops += 1;
        if let Some(b) = self.budget.as_mut() {
            if *b == 0 {
                self.dead = true;
                return Err(dead());
            }
            *b -= 1;
        }
        Ok(())
    }

    fn alive(&self) -> io::Result<()> {
        if self.dead {
            Err(dead())
        } else {
            Ok(())
        }
    }

    fn recount(&mut self) {
        self.used = self
            .names
            .values()
            .filter_map(|i| self.inodes.get(i))
            .map(|n| n.live.pages.len() as u64)
            .sum();
    }

    fn reserve(&mut self, need: u64) -> io::Result<()> {
        if let Some(cap) = self.capacity {
            if self.used + need > cap {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        Ok(())
    }

    fn file_op(&mut self, ino: u64, op: FileOp) -> io::Result<()> {
        self.step()?;
        let node = self
            .inodes
            .get(&ino)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        let need = match &op {
            FileOp::Write { off, data } => node.live.new_pages(*off, data.len() as u64),
            FileOp::Zero {
                off,
                len,
                dealloc: false,
            } => node.live.new_pages(*off, *len),
            FileOp::Allocate { off, len } => node.live.new_pages(*off, *len),
            _ => 0,
        };
        self.reserve(need)?;
        let node = self
            .inodes
            .get_mut(&ino)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        op.apply(&mut node.live);
        node.pending.push(op);
        self.recount();
        Ok(())
    }
}

fn dead() -> io::Error {
    io::Error::other("simulated power loss: the machine is off")
}

#[derive(Debug)]
struct Shared {
    root: PathBuf,
    state: Mutex<FsState>,
}

/// An in-memory store directory that can simulate power loss and a full disk.
/// Cloning gives another handle to the same directory.
#[derive(Debug, Clone)]
pub struct FaultStorage {
    shared: Arc<Shared>,
}

impl FaultStorage {
    /// An empty directory. `atomic_unit` (a power of two ≥ 512) is the size of
    /// the pieces a write may be torn into by a power loss.
    pub fn new(atomic_unit: usize) -> FaultStorage {
        let state = FsState {
            inodes: HashMap::new(),
            next_ino: 1,
            names: BTreeMap::new(),
            durable_names: BTreeMap::new(),
            dir_pending: Vec::new(),
            budget: None,
            dead: false,
            capacity: None,
            used: 0,
            atomic_unit: atomic_unit.max(1),
            ops: 0,
        };
        FaultStorage {
            shared: Arc::new(Shared {
                root: PathBuf::from("/fault-storage"),
                state: Mutex::new(state),
            }),
        }
    }

    /// Power fails after `n` more mutating calls (`None`: never).
    pub fn set_budget(&self, n: Option<u64>) {
        self.shared.state.lock().budget = n;
    }

    /// Whether power has failed (the budget ran out).
    pub fn is_dead(&self) -> bool {
        self.shared.state.lock().dead
    }

    /// Mutating calls made so far.
    pub fn op_count(&self) -> u64 {
        self.shared.state.lock().ops
    }

    /// Limits the space of the directory to `bytes` (rounded down to 4 KiB
    /// pages); `None` removes the limit. Calls that need more fail with ENOSPC.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.shared.state.lock().capacity = bytes.map(|b| b / PAGE);
    }

    /// Bytes in use by live files.
    pub fn used_bytes(&self) -> u64 {
        self.shared.state.lock().used * PAGE
    }

    /// Simulates a power failure now and a reboot: returns the directory as the
    /// disk would hold it afterwards. Each operation not yet made durable survives
    /// with probability `keep` (writes possibly torn); this handle is dead from
    /// now on. `keep = 0.0` is "drop all non-flushed writes".
    pub fn power_loss(&self, seed: u64, keep: f64) -> FaultStorage {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut st = self.shared.state.lock();
        st.dead = true;
        let unit = st.atomic_unit as u64;
        // Directory: the durable table plus a prefix of the later operations.
        let mut names = st.durable_names.clone();
        let mut keep_dir = 0;
        while keep_dir < st.dir_pending.len() && rng.gen_bool(keep) {
            keep_dir += 1;
        }
        for op in &st.dir_pending[..keep_dir] {
            op.apply(&mut names);
        }
        let mut inodes = HashMap::new();
        for &ino in names.values() {
            if inodes.contains_key(&ino) {
                continue;
            }
            let Some(node) = st.inodes.get(&ino) else {
                continue;
            };
            let mut c = node.durable.clone();
            for op in &node.pending {
                if !rng.gen_bool(keep) {
                    continue;
                }
                match op {
                    FileOp::Write { off, data } if rng.gen_bool(0.5) => {
                        // Torn: each atomic unit is old or new.
                        let mut pos = 0u64;
                        while pos < data.len() as u64 {
                            let abs = off + pos;
                            let n = (unit - abs % unit).min(data.len() as u64 - pos);
                            if rng.gen_bool(0.5) {
                                c.write(abs, &data[pos as usize..(pos + n) as usize]);
                            }
                            pos += n;
                        }
                    }
                    op => op.apply(&mut c),
                }
            }
            inodes.insert(
                ino,
                Inode {
                    live: c.clone(),
                    durable: c,
                    pending: Vec::new(),
                },
            );
        }
        let mut ns = FsState {
            inodes,
            next_ino: st.next_ino,
            names: names.clone(),
            durable_names: names,
            dir_pending: Vec::new(),
            budget: None,
            dead: false,
            capacity: st.capacity,
            used: 0,
            atomic_unit: st.atomic_unit,
            ops: 0,
        };
        ns.recount();
        FaultStorage {
            shared: Arc::new(Shared {
                root: self.shared.root.clone(),
                state: Mutex::new(ns),
            }),
        }
    }

    /// Reads a whole file as it is now (for tests).
    pub fn read_file(&self, name: &str) -> Option<Vec<u8>> {
        let st = self.shared.state.lock();
        let ino = st.names.get(name)?;
        let node = st.inodes.get(ino)?;
        let mut v = vec![0u8; node.live.len as usize];
        node.live.read(0, &mut v);
        Some(v)
    }

    /// Overwrites bytes of a file and makes them durable at once (to simulate
    /// corruption in tests).
    pub fn corrupt(&self, name: &str, off: u64, data: &[u8]) -> bool {
        let mut st = self.shared.state.lock();
        let Some(&ino) = st.names.get(name) else {
            return false;
        };
        let Some(node) = st.inodes.get_mut(&ino) else {
            return false;
        };
        node.live.write(off, data);
        node.durable.write(off, data);
        true
    }
}

impl Storage for FaultStorage {
    fn root(&self) -> &Path {
        &self.shared.root
    }

    fn open(&self, name: &str, how: Open, _direct: bool) -> io::Result<Arc<dyn StoreFile>> {
        if name.is_empty() || name.contains('/') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad file name"));
        }
        let mut st = self.shared.state.lock();
        st.alive()?;
        let ino = match (st.names.get(name).copied(), how) {
            (Some(ino), Open::Existing | Open::Create) => ino,
            (Some(ino), Open::Truncate) => {
                st.file_op(ino, FileOp::SetLen(0))?;
                ino
            }
            (None, Open::Existing) => return Err(io::Error::from_raw_os_error(libc::ENOENT)),
            (None, _) => {
                st.step()?;
                let ino = st.next_ino;
                st.next_ino += 1;
                st.inodes.insert(ino, Inode::default());
                st.names.insert(name.to_string(), ino);
                st.dir_pending.push(DirOp::Link {
                    name: name.to_string(),
                    ino,
                });
                ino
            }
        };
        Ok(Arc::new(FaultFile {
            shared: self.shared.clone(),
            ino,
        }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut st = self.shared.state.lock();
        st.step()?;
        let ino = st
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        st.names.insert(to.to_string(), ino);
        st.dir_pending.push(DirOp::Rename {
            from: from.to_string(),
            to: to.to_string(),
        });
        st.recount();
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut st = self.shared.state.lock();
        st.step()?;
        if st.names.remove(name).is_some() {
            st.dir_pending.push(DirOp::Remove {
                name: name.to_string(),
            });
            st.recount();
        }
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut st = self.shared.state.lock();
        st.step()?;
        st.durable_names = st.names.clone();
        st.dir_pending.clear();
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let st = self.shared.state.lock();
        st.alive()?;
        Ok(st.names.keys().cloned().collect())
    }

    fn exists(&self, name: &str) -> io::Result<bool> {
        let st = self.shared.state.lock();
        st.alive()?;
        Ok(st.names.contains_key(name))
    }

    fn space(&self) -> io::Result<Space> {
        let st = self.shared.state.lock();
        st.alive()?;
        let total = st.capacity.map(|c| c * PAGE).unwrap_or(1 << 40);
        Ok(Space {
            total,
            free: total.saturating_sub(st.used * PAGE),
        })
    }
}

/// An open file of a [`FaultStorage`]; it refers to the inode, so it keeps
/// working after the name is renamed or removed, like a real descriptor.
#[derive(Debug)]
struct FaultFile {
    shared: Arc<Shared>,
    ino: u64,
}

impl StoreFile for FaultFile {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let st = self.shared.state.lock();
        st.alive()?;
        match st.inodes.get(&self.ino) {
            Some(n) => n.live.read(off, buf),
            None => return Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
        Ok(())
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.shared.state.lock().file_op(
            self.ino,
            FileOp::Write {
                off,
                data: buf.to_vec(),
            },
        )
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.shared.state.lock().file_op(
            self.ino,
            FileOp::Zero {
                off,
                len,
                dealloc: true,
            },
        )
    }

    fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        self.shared.state.lock().file_op(
            self.ino,
            FileOp::Zero {
                off,
                len,
                dealloc: false,
            },
        )
    }

    fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        self.shared
            .state
            .lock()
            .file_op(self.ino, FileOp::Allocate { off, len })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.shared
            .state
            .lock()
            .file_op(self.ino, FileOp::SetLen(len))
    }

    fn len(&self) -> io::Result<u64> {
        let st = self.shared.state.lock();
        st.alive()?;
        Ok(st.inodes.get(&self.ino).map(|n| n.live.len).unwrap_or(0))
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.shared.state.lock();
        st.step()?;
        if let Some(n) = st.inodes.get_mut(&self.ino) {
            n.durable = n.live.clone();
            n.pending.clear();
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        let st = self.shared.state.lock();
        st.alive()?;
        Ok(st
            .inodes
            .get(&self.ino)
            .map(|n| n.live.pages.len() as u64 * PAGE)
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_are_dropped_and_synced_kept() {
        let fs = FaultStorage::new(512);
        let f = fs.open("a", Open::Create, false).unwrap();
        f.write_at(0, &[1u8; 4096]).unwrap();
        f.sync().unwrap();
        fs.sync_dir().unwrap();
        f.write_at(0, &[2u8; 4096]).unwrap();
        let g = fs.open("b", Open::Create, false).unwrap();
        g.write_at(0, b"x").unwrap();
        g.sync().unwrap();
        let after = fs.power_loss(1, 0.0);
        assert!(fs.is_dead());
        assert!(f.read_at(0, &mut [0u8; 1]).is_err());
        assert_eq!(after.read_file("a").unwrap(), vec![1u8; 4096]);
        // created and synced, but the directory was not: the name is gone
        assert!(after.read_file("b").is_none());
    }

    #[test]
    fn torn_writes_mix_units() {
        // With keep = 1.0 every pending write survives, torn or not: each 512-byte
        // unit is old (1) or new (2), never anything else.
        for seed in 0..20 {
            let fs = FaultStorage::new(512);
            let f = fs.open("a", Open::Create, false).unwrap();
            f.write_at(0, &[1u8; 4096]).unwrap();
            f.sync().unwrap();
            fs.sync_dir().unwrap();
            f.write_at(0, &[2u8; 4096]).unwrap();
            let after = fs.power_loss(seed, 1.0);
            let d = after.read_file("a").unwrap();
            for u in d.chunks(512) {
                assert!(u.iter().all(|&b| b == u[0]) && (u[0] == 1 || u[0] == 2));
            }
        }
    }

    #[test]
    fn budget_stops_everything_and_capacity_gives_enospc() {
        let fs = FaultStorage::new(512);
        let f = fs.open("a", Open::Create, false).unwrap();
        fs.set_budget(Some(1));
        f.write_at(0, b"ok").unwrap();
        assert!(f.write_at(0, b"no").is_err());
        assert!(fs.is_dead());
        assert!(fs.list().is_err());

        let fs = FaultStorage::new(512);
        fs.set_capacity(Some(2 * PAGE));
        let f = fs.open("a", Open::Create, false).unwrap();
        f.write_at(0, &[1u8; 8192]).unwrap();
        let e = f.write_at(8192, &[1u8; 10]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        f.write_at(100, &[3u8; 10]).unwrap(); // overwrite in place needs no space
        f.punch(0, 4096).unwrap();
        f.write_at(8192, &[1u8; 10]).unwrap(); // space came back
        assert_eq!(fs.used_bytes(), 2 * PAGE);
    }
}
