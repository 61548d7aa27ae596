//! [`LvStore`]: one lvstore (a directory), its lvols and their operations.
//!
//! Each public method is one SPDK-style RPC (see the crate docs for the table).
//! Shape-changing operations are serialised by one mutex per store, and each
//! ends in exactly one metadata commit ([`StoreInner::commit`]); files a commit
//! will reference are created and made durable before it, files it stops
//! referencing are removed after it (and by the garbage collection at open if a
//! crash came in between).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use uuid::Uuid;

use crate::bdev::{sync_worker, LvolBdev, SyncJob, View};
use crate::error::{LvolError, Result};
use crate::layer::{data_name, map_name, Layer};
use crate::meta::{self, check_name, LvolMeta, StoreMeta, META_FILE, META_TMP};
use crate::storage::{DirStorage, Open, Storage};
use bdev::uring::Reactor;

/// Options of [`LvStore::create`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOpts {
    /// 512 or 4096 (default): the block size of every lvol and the granularity
    /// of allocation.
    pub block_size: u32,
    /// SPDK's `cluster_sz` (default 4 MiB): lvol sizes are rounded up to it.
    pub cluster_size: u64,
}

impl Default for CreateOpts {
    fn default() -> Self {
        CreateOpts {
            block_size: 4096,
            cluster_size: 4 << 20,
        }
    }
}

/// `bdev_lvol_get_lvstores` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LvstoreInfo {
    pub uuid: Uuid,
    pub name: String,
    /// The directory (SPDK: the base bdev).
    pub base_bdev: String,
    pub total_data_clusters: u64,
    pub free_clusters: u64,
    pub block_size: u32,
    pub cluster_size: u64,
}

/// `bdev_lvol_get_lvols` entry (and one element of [`LvStore::chain`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LvolInfo {
    pub uuid: Uuid,
    pub name: String,
    /// `lvs_name/lvol_name`.
    pub alias: String,
    pub lvs_uuid: Uuid,
    pub lvs_name: String,
    pub block_size: u32,
    pub num_blocks: u64,
    pub is_thin_provisioned: bool,
    pub is_snapshot: bool,
    /// Layered on a snapshot.
    pub is_clone: bool,
    /// Name of the snapshot this lvol is layered on.
    pub base_snapshot: Option<String>,
    /// Names of the lvols layered on this one.
    pub clones: Vec<String>,
    /// Blocks this lvol's own layer holds (its allocation map).
    pub num_allocated_blocks: u64,
    /// Bytes its own layer occupies on disk (data file, holes excluded).
    pub disk_bytes: u64,
}

/// Which allocation a fragmap reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragmapScope {
    /// Blocks the lvol's own layer holds.
    Layer,
    /// Blocks any layer of its chain holds (what a full copy must move).
    Chain,
}

/// Allocated block ranges of an lvol over a range of blocks
/// (`corral_lvol_get_fragmap`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Fragmap {
    pub block_size: u32,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    pub num_allocated_blocks: u64,
    /// `(first block, count)`, ascending, absolute block numbers.
    pub ranges: Vec<(u64, u64)>,
}

impl Fragmap {
    /// One bit per block of the range, least significant bit first: the
    /// `bdev_lvol_get_fragmap` bitmap (the RPC layer base64-encodes it).
    pub fn to_bitmap(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.num_blocks.div_ceil(8) as usize];
        for &(s, n) in &self.ranges {
            for b in s - self.offset_blocks..s - self.offset_blocks + n {
                v[(b / 8) as usize] |= 1 << (b % 8);
            }
        }
        v
    }
}

/// Content digest of an lvol as readers see it (`corral_lvol_get_checksum`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checksum {
    /// "crc32c-blocks-v1": CRC32C of every block, mixed with its position into
    /// 64 bits. Detects divergence between replicas; not a cryptographic hash.
    pub algorithm: &'static str,
    pub value: u64,
    pub num_blocks: u64,
}

#[derive(Debug)]
struct Ctl {
    meta: StoreMeta,
    /// Open layers by file UUID.
    layers: HashMap<Uuid, Arc<Layer>>,
    /// Live bdevs by lvol UUID.
    bdevs: HashMap<Uuid, Weak<LvolBdev>>,
    /// Lvols a running merge works on.
    busy: HashSet<Uuid>,
    destroyed: bool,
}

#[derive(Debug)]
struct StoreInner {
    storage: Arc<dyn Storage>,
    ctl: Mutex<Ctl>,
    /// Data path of bdevs made from now on (`None`: synchronous calls).
    reactor: Mutex<Option<Arc<Reactor>>>,
    /// The thread that runs blocking requests of bdevs that have a reactor.
    worker: Mutex<Option<std::sync::mpsc::Sender<SyncJob>>>,
}

/// One lvstore. Cheap to clone (a handle).
#[derive(Debug, Clone)]
pub struct LvStore {
    inner: Arc<StoreInner>,
}

/// Outcome of a failed commit.
struct CommitFailed {
    err: LvolError,
    /// The new metadata replaced the old in the directory (not yet durable):
    /// the operation took effect and its new files must stay.
    took_effect: bool,
}

impl Ctl {
    fn find(&self, name: &str) -> Result<&LvolMeta> {
        let n = match name.split_once('/') {
            Some((lvs, n)) if lvs == self.meta.name => n,
            Some(_) => return Err(LvolError::not_found("lvol", name)),
            None => name,
        };
        self.meta
            .lvols
            .iter()
            .find(|l| l.name == n || l.uuid.to_string() == n)
            .ok_or_else(|| LvolError::not_found("lvol", name))
    }

    fn by_uuid(&self, u: Uuid) -> Option<&LvolMeta> {
        self.meta.lvols.iter().find(|l| l.uuid == u)
    }

    fn children(&self, u: Uuid) -> Vec<&LvolMeta> {
        self.meta
            .lvols
            .iter()
            .filter(|l| l.parent == Some(u))
            .collect()
    }

    fn layer(&self, l: &LvolMeta) -> Result<Arc<Layer>> {
        self.layers
            .get(&l.file)
            .cloned()
            .ok_or_else(|| LvolError::Corrupt {
                path: data_name(&l.file).into(),
                reason: "layer not loaded".into(),
            })
    }

    /// The layers below `l`, nearest first.
    fn ancestors(&self, l: &LvolMeta) -> Result<Vec<Arc<Layer>>> {
        let mut v = Vec::new();
        let mut cur = l.parent;
        while let Some(p) = cur {
            let pm = self
                .by_uuid(p)
                .ok_or_else(|| LvolError::not_found("lvol", &p.to_string()))?;
            v.push(self.layer(pm)?);
            cur = pm.parent;
        }
        Ok(v)
    }

    fn live(&self, u: Uuid) -> Option<Arc<LvolBdev>> {
        self.bdevs.get(&u).and_then(|w| w.upgrade())
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        check_name(name).map_err(|reason| LvolError::InvalidName {
            name: name.into(),
            reason,
        })?;
        if self.meta.lvols.iter().any(|l| l.name == name) {
            return Err(LvolError::Exists {
                what: "lvol",
                name: name.into(),
            });
        }
        Ok(())
    }

    fn check_idle(&self, l: &LvolMeta) -> Result<()> {
        if self.busy.contains(&l.uuid) {
            return Err(LvolError::Busy {
                name: l.name.clone(),
                reason: "a snapshot merge is using it",
            });
        }
        Ok(())
    }

    fn alias(&self, l: &LvolMeta) -> String {
        format!("{}/{}", self.meta.name, l.name)
    }

    fn make_view(&self, l: &LvolMeta) -> Result<View> {
        Ok(View::build(
            self.layer(l)?,
            &self.ancestors(l)?,
            !l.snapshot,
            l.num_blocks,
        ))
    }
}

impl StoreInner {
    fn io(&self, op: &'static str, name: &str) -> impl FnOnce(std::io::Error) -> LvolError + '_ {
        let path = self.storage.root().join(name);
        move |e| LvolError::io(op, path, e)
    }

    /// Replaces the metadata atomically: write the new file, fsync it, rename it
    /// over the old one, fsync the directory.
    fn commit(&self, ctl: &mut Ctl, mut new: StoreMeta) -> std::result::Result<(), CommitFailed> {
        new.generation = ctl.meta.generation + 1;
        let before = |err| CommitFailed {
            err,
            took_effect: false,
        };
        meta::validate(&new).map_err(|e| {
            before(LvolError::Corrupt {
                path: META_TMP.into(),
                reason: format!("refusing to write: {e}"),
            })
        })?;
        let bytes = meta::encode(&new);
        let st = &self.storage;
        let f = st
            .open(META_TMP, Open::Truncate, false)
            .map_err(self.io("create", META_TMP))
            .map_err(before)?;
        f.write_at(0, &bytes)
            .map_err(self.io("write", META_TMP))
            .map_err(before)?;
        f.sync()
            .map_err(self.io("fsync", META_TMP))
            .map_err(before)?;
        st.rename(META_TMP, META_FILE)
            .map_err(self.io("rename", META_FILE))
            .map_err(before)?;
        ctl.meta = new;
        st.sync_dir()
            .map_err(self.io("fsync directory", ""))
            .map_err(|err| CommitFailed {
                err,
                took_effect: true,
            })
    }

    /// Creates a new layer's files, durable and linked in the directory.
    fn new_layer(&self, num_blocks: u64, thick: bool, bs: u32) -> Result<Arc<Layer>> {
        let file = Uuid::new_v4();
        let r = Layer::create(&*self.storage, file, bs, num_blocks, thick)
            .and_then(|l| self.storage.sync_dir().map(|_| l));
        match r {
            Ok(l) => Ok(Arc::new(l)),
            Err(e) => {
                let _ = Layer::remove_files(&*self.storage, &file);
                Err(self.io("create layer", &data_name(&file))(e))
            }
        }
    }

    fn drop_layer_files(&self, file: &Uuid) {
        if let Err(e) = Layer::remove_files(&*self.storage, file) {
            // Left for the garbage collection at the next open.
            tracing::warn!(file = %file, error = %e, "could not remove layer files");
        }
    }
}

impl LvStore {
    /// `bdev_lvol_create_lvstore` on a directory (created if missing). Fails with
    /// [`LvolError::Exists`] if it already holds an lvstore.
    pub fn create_dir(dir: &Path, name: &str, opts: CreateOpts) -> Result<LvStore> {
        let st = DirStorage::new(dir).map_err(|e| LvolError::io("create directory", dir, e))?;
        Self::create(Arc::new(st), name, opts)
    }

    /// Opens the lvstore in a directory; with `expect`, refuses one with another
    /// UUID ([`LvolError::WrongStore`]).
    pub fn open_dir(dir: &Path, expect: Option<Uuid>) -> Result<LvStore> {
        if !dir.is_dir() {
            return Err(LvolError::NoStore {
                dir: dir.to_path_buf(),
            });
        }
        let st = DirStorage::new(dir).map_err(|e| LvolError::io("open directory", dir, e))?;
        Self::open(Arc::new(st), expect)
    }

    /// Creates an lvstore in `storage`: writes its identity (a new UUID, the name,
    /// block and cluster size) as the first metadata.
    pub fn create(storage: Arc<dyn Storage>, name: &str, opts: CreateOpts) -> Result<LvStore> {
        check_name(name).map_err(|reason| LvolError::InvalidName {
            name: name.into(),
            reason,
        })?;
        let root = storage.root().to_path_buf();
        if storage
            .exists(META_FILE)
            .map_err(|e| LvolError::io("stat", root.join(META_FILE), e))?
        {
            let found = Self::open(storage.clone(), None)
                .map(|s| s.name())
                .unwrap_or_else(|e| e.to_string());
            return Err(LvolError::Exists {
                what: "lvstore",
                name: format!("{} ({found})", root.display()),
            });
        }
        let m = StoreMeta {
            uuid: Uuid::new_v4(),
            name: name.into(),
            block_size: opts.block_size,
            cluster_size: opts.cluster_size,
            generation: 0,
            lvols: vec![],
        };
        meta::validate(&m).map_err(|e| LvolError::Invalid {
            name: name.into(),
            reason: e.to_string(),
        })?;
        let inner = StoreInner {
            storage,
            reactor: Mutex::new(None),
            worker: Mutex::new(None),
            ctl: Mutex::new(Ctl {
                meta: StoreMeta {
                    generation: 0,
                    ..m.clone()
                },
                layers: HashMap::new(),
                bdevs: HashMap::new(),
                busy: HashSet::new(),
                destroyed: false,
            }),
        };
        {
            let mut ctl = inner.ctl.lock();
            if let Err(f) = inner.commit(&mut ctl, m) {
                if !f.took_effect {
                    let _ = inner.storage.remove(META_TMP);
                }
                return Err(f.err);
            }
        }
        Ok(LvStore {
            inner: Arc::new(inner),
        })
    }

    /// Opens an existing lvstore: reads and validates the metadata, removes
    /// files no metadata references (left by a crash mid-operation), loads every
    /// layer's allocation map.
    pub fn open(storage: Arc<dyn Storage>, expect: Option<Uuid>) -> Result<LvStore> {
        let root = storage.root().to_path_buf();
        let path = root.join(META_FILE);
        let f = match storage.open(META_FILE, Open::Existing, false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LvolError::NoStore { dir: root })
            }
            Err(e) => return Err(LvolError::io("open", path, e)),
        };
        let len = f.len().map_err(|e| LvolError::io("stat", &path, e))?;
        if len > (meta::MAX_BODY + meta::HEADER_LEN) as u64 {
            return Err(LvolError::Corrupt {
                path,
                reason: format!("{len} bytes is too large"),
            });
        }
        let mut bytes = vec![0u8; len as usize];
        f.read_at(0, &mut bytes)
            .map_err(|e| LvolError::io("read", &path, e))?;
        let m = meta::decode(&bytes).map_err(|e| LvolError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if let Some(want) = expect {
            if want != m.uuid {
                return Err(LvolError::WrongStore {
                    dir: root,
                    found: m.uuid,
                    found_name: m.name,
                    expected: want,
                });
            }
        }
        // Garbage: an uncommitted metadata file and layer files nobody references.
        let referenced: HashSet<Uuid> = m.lvols.iter().map(|l| l.file).collect();
        let mut removed = false;
        for name in storage
            .list()
            .map_err(|e| LvolError::io("list", &root, e))?
        {
            let stem = name
                .strip_suffix(".data")
                .or_else(|| name.strip_suffix(".map"));
            let orphan = match stem.map(Uuid::parse_str) {
                Some(Ok(u)) => !referenced.contains(&u),
                _ => name == META_TMP,
            };
            if orphan {
                tracing::info!(file = %name, "removing file left by an interrupted operation");
                storage
                    .remove(&name)
                    .map_err(|e| LvolError::io("remove", root.join(&name), e))?;
                removed = true;
            }
        }
        if removed {
            storage
                .sync_dir()
                .map_err(|e| LvolError::io("fsync directory", &root, e))?;
        }
        let mut layers = HashMap::new();
        for l in &m.lvols {
            let layer = Layer::open(&*storage, l.file, m.block_size, l.num_blocks)
                .map_err(|e| LvolError::io("open layer", root.join(data_name(&l.file)), e))?;
            layers.insert(l.file, Arc::new(layer));
        }
        let ctl = Ctl {
            meta: m,
            layers,
            bdevs: HashMap::new(),
            busy: HashSet::new(),
            destroyed: false,
        };
        Ok(LvStore {
            inner: Arc::new(StoreInner {
                storage,
                ctl: Mutex::new(ctl),
                reactor: Mutex::new(None),
                worker: Mutex::new(None),
            }),
        })
    }

    /// Serves reads and writes of bdevs made from now on through `reactor`
    /// (io_uring, O_DIRECT); without one they are synchronous calls made by the
    /// submitter. Flush, FUA writes, write-zeroes and unmap are always
    /// synchronous (they take the map's flush lock or call fallocate).
    ///
    /// With a reactor, those synchronous requests run on a worker thread of
    /// the store (one per store; it ends when the store and its bdevs are gone),
    /// so that `submit` never blocks the caller.
    pub fn set_reactor(&self, reactor: Option<Arc<Reactor>>) {
        // Lock order is ctl -> worker elsewhere: read the name first.
        let name = self.inner.ctl.lock().meta.name.clone();
        let mut w = self.inner.worker.lock();
        if reactor.is_none() {
            *w = None;
        } else if w.is_none() {
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name(format!("lvol-sync-{name}"))
                .spawn(move || sync_worker(rx));
            match spawned {
                Ok(_) => *w = Some(tx),
                Err(e) => {
                    tracing::warn!(error = %e, "no sync worker: flushes run on the submitter")
                }
            }
        }
        *self.inner.reactor.lock() = reactor;
    }

    fn lock(&self) -> Result<parking_lot::MutexGuard<'_, Ctl>> {
        let g = self.inner.ctl.lock();
        if g.destroyed {
            return Err(LvolError::NotFound {
                what: "lvstore",
                name: g.meta.name.clone(),
            });
        }
        Ok(g)
    }

    pub fn uuid(&self) -> Uuid {
        self.inner.ctl.lock().meta.uuid
    }

    pub fn name(&self) -> String {
        self.inner.ctl.lock().meta.name.clone()
    }

    pub fn block_size(&self) -> u32 {
        self.inner.ctl.lock().meta.block_size
    }

    /// `bdev_lvol_get_lvstores` entry of this store.
    pub fn info(&self) -> Result<LvstoreInfo> {
        let ctl = self.lock()?;
        let space = self
            .inner
            .storage
            .space()
            .map_err(|e| LvolError::io("statvfs", self.inner.storage.root(), e))?;
        let cs = ctl.meta.cluster_size;
        Ok(LvstoreInfo {
            uuid: ctl.meta.uuid,
            name: ctl.meta.name.clone(),
            base_bdev: self.inner.storage.root().display().to_string(),
            total_data_clusters: space.total / cs,
            free_clusters: space.free / cs,
            block_size: ctl.meta.block_size,
            cluster_size: cs,
        })
    }

    /// `bdev_lvol_delete_lvstore`: removes every lvol and the metadata. Live
    /// bdevs fail further I/O with `Removed`. The directory itself stays.
    pub fn destroy(&self) -> Result<()> {
        let mut ctl = self.lock()?;
        if let Some(u) = ctl.busy.iter().next() {
            let name = ctl.by_uuid(*u).map(|l| l.name.clone()).unwrap_or_default();
            return Err(LvolError::Busy {
                name,
                reason: "a snapshot merge is running",
            });
        }
        let st = &self.inner.storage;
        // The metadata goes first: once it is gone the directory is no store, and
        // the layer files are garbage whatever happens next.
        st.remove(META_FILE)
            .map_err(self.inner.io("remove", META_FILE))?;
        st.sync_dir()
            .map_err(self.inner.io("fsync directory", ""))?;
        ctl.destroyed = true;
        for b in ctl.bdevs.values().filter_map(|w| w.upgrade()) {
            let _p = b.pause();
            b.view.write().removed = true;
        }
        for l in std::mem::take(&mut ctl.meta.lvols) {
            self.inner.drop_layer_files(&l.file);
        }
        // Closing the last descriptor of a deleted file frees its extents, which
        // can take long (online discard): not under the store's lock.
        let layers = std::mem::take(&mut ctl.layers);
        drop(ctl);
        drop(layers);
        let _ = st.remove(META_TMP);
        let _ = st.sync_dir();
        Ok(())
    }

    fn size_to_blocks(ctl: &Ctl, name: &str, size: u64) -> Result<u64> {
        let cs = ctl.meta.cluster_size;
        let bytes = size.div_ceil(cs).checked_mul(cs);
        match bytes {
            Some(b) if size > 0 && b <= meta::MAX_LVOL_BYTES => Ok(b / ctl.meta.block_size as u64),
            _ => Err(LvolError::Invalid {
                name: name.into(),
                reason: format!(
                    "size {size} must be from 1 byte to {} bytes",
                    meta::MAX_LVOL_BYTES
                ),
            }),
        }
    }

    /// Runs a commit of `new` and its follow-up; on a failure before the commit
    /// took effect, removes `new_files`.
    fn commit_or_undo(
        &self,
        ctl: &mut Ctl,
        new: StoreMeta,
        new_files: &[Uuid],
    ) -> Result<Option<LvolError>> {
        match self.inner.commit(ctl, new) {
            Ok(()) => Ok(None),
            Err(CommitFailed {
                err,
                took_effect: false,
            }) => {
                for f in new_files {
                    self.inner.drop_layer_files(f);
                }
                Err(err)
            }
            // Applied in the directory but not yet durable: carry on as done and
            // report the error afterwards.
            Err(CommitFailed {
                err,
                took_effect: true,
            }) => Ok(Some(err)),
        }
    }

    /// `bdev_lvol_create`: a new lvol of `size_bytes` (rounded up to the cluster
    /// size). Thin lvols use no space until written; thick ones reserve it.
    /// Returns its UUID (the bdev name).
    pub fn create_lvol(&self, name: &str, size_bytes: u64, thin: bool) -> Result<Uuid> {
        let mut ctl = self.lock()?;
        ctl.check_new_name(name)?;
        let nb = Self::size_to_blocks(&ctl, name, size_bytes)?;
        let layer = self.inner.new_layer(nb, !thin, ctl.meta.block_size)?;
        let uuid = Uuid::new_v4();
        let mut new = ctl.meta.clone();
        new.lvols.push(LvolMeta {
            uuid,
            name: name.into(),
            parent: None,
            snapshot: false,
            thin,
            num_blocks: nb,
            file: layer.file,
        });
        let late = self.commit_or_undo(&mut ctl, new, &[layer.file])?;
        ctl.layers.insert(layer.file, layer);
        late.map_or(Ok(uuid), Err)
    }

    /// `bdev_lvol_resize`: grows an lvol to `size_bytes` (rounded up to the
    /// cluster size). Shrinking is refused ([`LvolError::Invalid`], -EINVAL);
    /// snapshots cannot be resized ([`LvolError::ReadOnly`], -EPERM).
    pub fn resize(&self, name: &str, size_bytes: u64) -> Result<()> {
        let mut ctl = self.lock()?;
        let l = ctl.find(name)?.clone();
        ctl.check_idle(&l)?;
        if l.snapshot {
            return Err(LvolError::ReadOnly { name: l.name });
        }
        let nb = Self::size_to_blocks(&ctl, name, size_bytes)?;
        if nb < l.num_blocks {
            return Err(LvolError::Invalid {
                name: l.name,
                reason: format!(
                    "shrinking from {} to {} blocks is not supported",
                    l.num_blocks, nb
                ),
            });
        }
        if nb == l.num_blocks {
            return Ok(());
        }
        let layer = ctl.layer(&l)?;
        let bdev = ctl.live(l.uuid);
        let _paused = bdev.as_ref().map(|b| b.pause());
        layer
            .grow(nb)
            .map_err(self.inner.io("grow", &data_name(&l.file)))?;
        let mut new = ctl.meta.clone();
        if let Some(m) = new.lvols.iter_mut().find(|x| x.uuid == l.uuid) {
            m.num_blocks = nb;
        }
        let late = self.commit_or_undo(&mut ctl, new, &[])?;
        if let Some(b) = &bdev {
            let mut v = b.view.write();
            v.num_blocks = nb;
            v.below.grow(nb);
            b.set_num_blocks(nb);
        }
        late.map_or(Ok(()), Err)
    }

    /// `bdev_lvol_snapshot`: the lvol's current data becomes the read-only
    /// snapshot `snap_name`; the lvol continues (same name, UUID and bdev) on a
    /// new empty layer above it. Flushes the lvol first, so the snapshot holds
    /// every write completed before the call. Returns the snapshot's UUID.
    pub fn snapshot(&self, lvol: &str, snap_name: &str) -> Result<Uuid> {
        let mut ctl = self.lock()?;
        let h = ctl.find(lvol)?.clone();
        if h.snapshot {
            return Err(LvolError::Invalid {
                name: h.name,
                reason: "is a snapshot; snapshot its clone instead".into(),
            });
        }
        ctl.check_idle(&h)?;
        ctl.check_new_name(snap_name)?;
        let old = ctl.layer(&h)?;
        let bdev = ctl.live(h.uuid);
        let _paused = bdev.as_ref().map(|b| b.pause());
        old.flush()
            .map_err(self.inner.io("flush", &data_name(&h.file)))?;
        let fresh = self
            .inner
            .new_layer(h.num_blocks, false, ctl.meta.block_size)?;
        let snap = LvolMeta {
            uuid: Uuid::new_v4(),
            name: snap_name.into(),
            parent: h.parent,
            snapshot: true,
            thin: h.thin,
            num_blocks: h.num_blocks,
            file: h.file,
        };
        let snap_uuid = snap.uuid;
        let mut new = ctl.meta.clone();
        if let Some(m) = new.lvols.iter_mut().find(|x| x.uuid == h.uuid) {
            m.file = fresh.file;
            m.parent = Some(snap_uuid);
            m.thin = true;
        }
        new.lvols.push(snap);
        let late = self.commit_or_undo(&mut ctl, new, &[fresh.file])?;
        ctl.layers.insert(fresh.file, fresh.clone());
        if let Some(b) = &bdev {
            let mut v = b.view.write();
            if v.table_full() {
                *v = ctl.make_view(ctl.find(&h.uuid.to_string())?)?;
            } else {
                v.push_below(old);
                v.top = fresh;
            }
        }
        late.map_or(Ok(snap_uuid), Err)
    }

    /// `bdev_lvol_clone`: a new writable lvol layered on snapshot `snap`, sharing
    /// its data. Cloning a writable lvol is refused ([`LvolError::Invalid`]).
    pub fn clone_snapshot(&self, snap: &str, clone_name: &str) -> Result<Uuid> {
        let mut ctl = self.lock()?;
        let s = ctl.find(snap)?.clone();
        if !s.snapshot {
            return Err(LvolError::Invalid {
                name: s.name,
                reason: "is not a snapshot; only snapshots can be cloned".into(),
            });
        }
        ctl.check_idle(&s)?;
        ctl.check_new_name(clone_name)?;
        let layer = self
            .inner
            .new_layer(s.num_blocks, false, ctl.meta.block_size)?;
        let uuid = Uuid::new_v4();
        let mut new = ctl.meta.clone();
        new.lvols.push(LvolMeta {
            uuid,
            name: clone_name.into(),
            parent: Some(s.uuid),
            snapshot: false,
            thin: true,
            num_blocks: s.num_blocks,
            file: layer.file,
        });
        let late = self.commit_or_undo(&mut ctl, new, &[layer.file])?;
        ctl.layers.insert(layer.file, layer);
        late.map_or(Ok(uuid), Err)
    }

    /// `corral_lvol_revert`: drops everything written to `lvol` since snapshot
    /// `snap` (one of its ancestors): the lvol keeps its name, UUID, size and
    /// bdev, and continues on a new empty layer on top of `snap`. Snapshots
    /// between the two stay.
    pub fn revert(&self, lvol: &str, snap: &str) -> Result<()> {
        let mut ctl = self.lock()?;
        let h = ctl.find(lvol)?.clone();
        let s = ctl.find(snap)?.clone();
        if h.snapshot {
            return Err(LvolError::ReadOnly { name: h.name });
        }
        let mut cur = h.parent;
        let mut found = false;
        while let Some(p) = cur {
            if p == s.uuid {
                found = true;
                break;
            }
            cur = ctl.by_uuid(p).and_then(|x| x.parent);
        }
        if !found {
            return Err(LvolError::Invalid {
                name: s.name,
                reason: format!("is not a snapshot in the chain of {}", h.name),
            });
        }
        ctl.check_idle(&h)?;
        ctl.check_idle(&s)?;
        let bdev = ctl.live(h.uuid);
        let _paused = bdev.as_ref().map(|b| b.pause());
        let fresh = self
            .inner
            .new_layer(h.num_blocks, false, ctl.meta.block_size)?;
        let mut new = ctl.meta.clone();
        if let Some(m) = new.lvols.iter_mut().find(|x| x.uuid == h.uuid) {
            m.file = fresh.file;
            m.parent = Some(s.uuid);
            m.thin = true;
        }
        let late = self.commit_or_undo(&mut ctl, new, &[fresh.file])?;
        ctl.layers.insert(fresh.file, fresh);
        let old = ctl.layers.remove(&h.file);
        if let Some(b) = &bdev {
            let hm = ctl
                .by_uuid(h.uuid)
                .cloned()
                .ok_or_else(|| LvolError::not_found("lvol", lvol))?;
            *b.view.write() = ctl.make_view(&hm)?;
        }
        self.inner.drop_layer_files(&h.file);
        drop(_paused);
        drop(ctl);
        drop(old);
        late.map_or(Ok(()), Err)
    }

    /// `bdev_lvol_delete`. A head or clone is removed with its data. A snapshot
    /// that nothing is layered on is removed; one with exactly one lvol layered
    /// on it is merged into that lvol first (its blocks the lvol lacks are
    /// copied into it, online: I/O on it continues, paused for one window of
    /// 1 MiB at a time), so no reader sees a change. A snapshot with more than
    /// one clone is refused ([`LvolError::HasClones`], -EPERM).
    pub fn delete(&self, name: &str) -> Result<()> {
        let mut ctl = self.lock()?;
        let l = ctl.find(name)?.clone();
        ctl.check_idle(&l)?;
        let kids: Vec<LvolMeta> = ctl.children(l.uuid).into_iter().cloned().collect();
        if kids.len() > 1 {
            return Err(LvolError::HasClones {
                name: l.name,
                clones: kids.into_iter().map(|k| k.name).collect(),
            });
        }
        if let Some(child) = kids.into_iter().next() {
            ctl.check_idle(&child)?;
            drop(ctl);
            return self.merge(l, child);
        }
        let bdev = ctl.live(l.uuid);
        let _paused = bdev.as_ref().map(|b| b.pause());
        let mut new = ctl.meta.clone();
        new.lvols.retain(|x| x.uuid != l.uuid);
        let late = self.commit_or_undo(&mut ctl, new, &[])?;
        if let Some(b) = &bdev {
            b.view.write().removed = true;
        }
        ctl.bdevs.remove(&l.uuid);
        let old = ctl.layers.remove(&l.file);
        self.inner.drop_layer_files(&l.file);
        drop(_paused);
        drop(ctl);
        drop(old);
        late.map_or(Ok(()), Err)
    }

    /// Deletes snapshot `s` by merging it into its only child `c`.
    fn merge(&self, s: LvolMeta, c: LvolMeta) -> Result<()> {
        let (s_layer, c_layer, c_bdev) = {
            let mut ctl = self.lock()?;
            ctl.busy.insert(s.uuid);
            ctl.busy.insert(c.uuid);
            let layers = ctl.layer(&s).and_then(|sl| Ok((sl, ctl.layer(&c)?)));
            // A writable child gets a bdev for the merge's duration, so that its
            // writes can be paused around each window.
            let bdev = match (&layers, c.snapshot) {
                (Ok(_), false) => self.bdev_locked(&mut ctl, &c).map(Some),
                _ => Ok(None),
            };
            match (layers, bdev) {
                (Ok((sl, cl)), Ok(b)) => (sl, cl, b),
                (Err(e), _) | (_, Err(e)) => {
                    ctl.busy.remove(&s.uuid);
                    ctl.busy.remove(&c.uuid);
                    return Err(e);
                }
            }
        };
        let r = self
            .merge_copy(&s, &s_layer, &c_layer, c_bdev.as_deref())
            .and_then(|()| {
                c_layer
                    .flush()
                    .map_err(self.inner.io("flush", &data_name(&c.file)))
            });
        let mut ctl = self.inner.ctl.lock();
        ctl.busy.remove(&s.uuid);
        ctl.busy.remove(&c.uuid);
        r?;
        if ctl.destroyed {
            return Err(LvolError::NotFound {
                what: "lvstore",
                name: ctl.meta.name.clone(),
            });
        }
        // Every live view that reads through `s`: pause it, commit, then point
        // its references to `s` at `c` (which now holds all of `s`'s blocks).
        let views: Vec<Arc<LvolBdev>> = ctl
            .bdevs
            .values()
            .filter_map(|w| w.upgrade())
            .filter(|b| b.view.read().contains(&s_layer))
            .collect();
        let paused: Vec<_> = views.iter().map(|b| b.pause()).collect();
        let mut new = ctl.meta.clone();
        new.lvols.retain(|x| x.uuid != s.uuid);
        if let Some(m) = new.lvols.iter_mut().find(|x| x.uuid == c.uuid) {
            m.parent = s.parent;
        }
        let late = self.commit_or_undo(&mut ctl, new, &[])?;
        for b in &views {
            let mut v = b.view.write();
            if Arc::ptr_eq(&v.top, &s_layer) {
                v.removed = true;
            } else {
                v.alias(&s_layer, &c_layer);
            }
        }
        drop(paused);
        ctl.bdevs.remove(&s.uuid);
        let old = ctl.layers.remove(&s.file);
        drop(ctl);
        drop(old);
        drop(c_bdev);
        self.inner.drop_layer_files(&s.file);
        late.map_or(Ok(()), Err)
    }

    /// Copies the blocks `s` holds and `c` lacks into `c`, one window at a time.
    fn merge_copy(
        &self,
        s: &LvolMeta,
        sl: &Layer,
        cl: &Layer,
        c_bdev: Option<&LvolBdev>,
    ) -> Result<()> {
        const WINDOW: u64 = 1 << 20;
        let bs = sl.block_size as u64;
        let win = (WINDOW / bs).max(1);
        let mut buf = bdev::IoBuf::zeroed(WINDOW as usize);
        let n = s.num_blocks;
        let mut w = 0;
        while w < n {
            let end = (w + win).min(n);
            // Skip windows the snapshot holds nothing in without pausing anyone.
            if sl.map.reader().run(w, end, false) == end - w {
                w = end;
                continue;
            }
            let _paused = c_bdev.map(|b| b.pause());
            let mut runs: Vec<(u64, u64)> = Vec::new();
            {
                let sr = sl.map.reader();
                let cr = cl.map.reader();
                sr.for_each_run(w, end, |b, cnt| {
                    let mut x = b;
                    while x < b + cnt {
                        let have = cr.run(x, b + cnt, true);
                        x += have;
                        let lack = cr.run(x, b + cnt, false);
                        if lack > 0 {
                            runs.push((x, lack));
                        }
                        x += lack;
                    }
                });
            }
            for (b, cnt) in runs {
                let bytes = (cnt * bs) as usize;
                let off = ((b - w) * bs) as usize;
                let chunk = &mut buf[off..off + bytes];
                sl.data
                    .read_at(b * bs, chunk)
                    .map_err(self.inner.io("read", &data_name(&s.file)))?;
                cl.write_blocks(b, chunk)
                    .map_err(self.inner.io("write", &data_name(&cl.file)))?;
            }
            w = end;
        }
        Ok(())
    }

    fn bdev_locked(&self, ctl: &mut Ctl, l: &LvolMeta) -> Result<Arc<LvolBdev>> {
        if let Some(b) = ctl.live(l.uuid) {
            return Ok(b);
        }
        let view = ctl.make_view(l)?;
        let reactor = self.inner.reactor.lock().clone();
        let worker = self.inner.worker.lock().clone();
        let b = LvolBdev::new(
            l.uuid,
            ctl.alias(l),
            ctl.meta.block_size,
            view,
            reactor,
            worker,
        );
        ctl.bdevs.retain(|_, w| w.strong_count() > 0);
        ctl.bdevs.insert(l.uuid, Arc::downgrade(&b));
        Ok(b)
    }

    /// The bdev of an lvol (head: read-write; snapshot: read-only). One bdev per
    /// lvol exists at a time; it follows snapshots, reverts and merges, and fails
    /// I/O with `Removed` once the lvol is deleted.
    pub fn bdev(&self, name: &str) -> Result<Arc<LvolBdev>> {
        let mut ctl = self.lock()?;
        let l = ctl.find(name)?.clone();
        self.bdev_locked(&mut ctl, &l)
    }

    fn info_of(&self, ctl: &Ctl, l: &LvolMeta) -> LvolInfo {
        let layer = ctl.layers.get(&l.file);
        LvolInfo {
            uuid: l.uuid,
            name: l.name.clone(),
            alias: ctl.alias(l),
            lvs_uuid: ctl.meta.uuid,
            lvs_name: ctl.meta.name.clone(),
            block_size: ctl.meta.block_size,
            num_blocks: l.num_blocks,
            is_thin_provisioned: l.thin,
            is_snapshot: l.snapshot,
            is_clone: l.parent.is_some(),
            base_snapshot: l
                .parent
                .and_then(|p| ctl.by_uuid(p))
                .map(|p| p.name.clone()),
            clones: ctl
                .children(l.uuid)
                .into_iter()
                .map(|c| c.name.clone())
                .collect(),
            num_allocated_blocks: layer.map(|x| x.map.count()).unwrap_or(0),
            disk_bytes: layer
                .and_then(|x| x.data.allocated_bytes().ok())
                .unwrap_or(0),
        }
    }

    /// `bdev_lvol_get_lvols`: every lvol of the store.
    pub fn lvols(&self) -> Result<Vec<LvolInfo>> {
        let ctl = self.lock()?;
        Ok(ctl
            .meta
            .lvols
            .iter()
            .map(|l| self.info_of(&ctl, l))
            .collect())
    }

    /// One lvol by name, `lvs/name` alias or UUID.
    pub fn lvol(&self, name: &str) -> Result<LvolInfo> {
        let ctl = self.lock()?;
        let l = ctl.find(name)?;
        Ok(self.info_of(&ctl, l))
    }

    /// The chain of an lvol, itself first, then its snapshots down to the base,
    /// each with the space its own layer uses.
    pub fn chain(&self, name: &str) -> Result<Vec<LvolInfo>> {
        let ctl = self.lock()?;
        let mut out = vec![];
        let mut cur = Some(ctl.find(name)?);
        while let Some(l) = cur {
            out.push(self.info_of(&ctl, l));
            cur = l.parent.and_then(|p| ctl.by_uuid(p));
        }
        Ok(out)
    }

    /// `corral_lvol_get_fragmap`: allocated blocks of `name` in the byte range
    /// `offset..offset+size` (`size` 0: to the end), for rebuild and backup.
    pub fn fragmap(
        &self,
        name: &str,
        offset: u64,
        size: u64,
        scope: FragmapScope,
    ) -> Result<Fragmap> {
        let ctl = self.lock()?;
        let l = ctl.find(name)?.clone();
        let bs = ctl.meta.block_size as u64;
        let total = l.num_blocks * bs;
        let size = if size == 0 {
            total.saturating_sub(offset)
        } else {
            size
        };
        if !offset.is_multiple_of(bs)
            || !size.is_multiple_of(bs)
            || offset.checked_add(size).is_none_or(|e| e > total)
        {
            return Err(LvolError::Invalid {
                name: l.name,
                reason: format!(
                    "range {offset}+{size} must be block-aligned and within {total} bytes"
                ),
            });
        }
        let (from, n) = (offset / bs, size / bs);
        let mut layers = vec![ctl.layer(&l)?];
        if scope == FragmapScope::Chain {
            layers.extend(ctl.ancestors(&l)?);
        }
        drop(ctl);
        let mut bits = vec![0u64; n.div_ceil(64) as usize];
        for layer in &layers {
            layer.map.for_each_run(from, from + n, |b, cnt| {
                for x in b - from..b - from + cnt {
                    bits[(x / 64) as usize] |= 1 << (x % 64);
                }
            });
        }
        let mut ranges = vec![];
        let mut count = 0;
        let mut x = 0;
        while x < n {
            if bits[(x / 64) as usize] & (1 << (x % 64)) == 0 {
                x += 1;
                continue;
            }
            let s = x;
            while x < n && bits[(x / 64) as usize] & (1 << (x % 64)) != 0 {
                x += 1;
            }
            ranges.push((from + s, x - s));
            count += x - s;
        }
        Ok(Fragmap {
            block_size: bs as u32,
            offset_blocks: from,
            num_blocks: n,
            num_allocated_blocks: count,
            ranges,
        })
    }

    /// `corral_lvol_get_checksum`: digest of the lvol's content as a reader sees
    /// it, independent of how the blocks are spread over layers. Meant for
    /// snapshots (a head under writes gives a moving answer).
    pub fn checksum(&self, name: &str) -> Result<Checksum> {
        let (view, bs) = {
            let ctl = self.lock()?;
            let l = ctl.find(name)?.clone();
            (ctl.make_view(&l)?, ctl.meta.block_size as usize)
        };
        let zero_crc = crc32c::crc32c(&vec![0u8; bs]);
        let mut h = Digest::default();
        let chunk_blocks = ((1 << 20) / bs) as u64;
        let mut buf = bdev::IoBuf::zeroed(1 << 20);
        let mut b = 0;
        while b < view.num_blocks {
            let n = chunk_blocks.min(view.num_blocks - b);
            view.for_each_extent(b, n, |x, cnt, src| -> Result<()> {
                match src {
                    None => (x..x + cnt).for_each(|i| h.add(i, zero_crc)),
                    Some(l) => {
                        let data = &mut buf[..(cnt as usize * bs)];
                        l.data
                            .read_at(x * bs as u64, data)
                            .map_err(self.inner.io("read", &data_name(&l.file)))?;
                        for (i, blk) in data.chunks_exact(bs).enumerate() {
                            h.add(x + i as u64, crc32c::crc32c(blk));
                        }
                    }
                }
                Ok(())
            })?;
            b += n;
        }
        Ok(Checksum {
            algorithm: "crc32c-blocks-v1",
            value: h.0,
            num_blocks: view.num_blocks,
        })
    }

    /// The storage (for tests and tools).
    pub fn storage(&self) -> Arc<dyn Storage> {
        self.inner.storage.clone()
    }

    /// Names of the files of a layer, for tools that inspect the directory.
    pub fn layer_files(&self, name: &str) -> Result<(String, String)> {
        let ctl = self.lock()?;
        let l = ctl.find(name)?;
        Ok((data_name(&l.file), map_name(&l.file)))
    }
}

/// Order-dependent 64-bit mix of per-block CRCs.
#[derive(Default)]
struct Digest(u64);

impl Digest {
    fn add(&mut self, block: u64, crc: u32) {
        let x = (crc as u64) ^ block.rotate_left(32);
        let mut z = self.0 ^ x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        self.0 = z ^ (z >> 31);
    }
}
