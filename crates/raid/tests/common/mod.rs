//! Test helpers: a member bdev that fails or goes silent on command, a record
//! store whose persists can be held or failed, and a verified load generator.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bdev::malloc::MallocBdev;
use bdev::registry::BdevRegistry;
use bdev::{Bdev, BdevExt, BdevIo, Completion, IoError, IoKind};
use parking_lot::{Condvar, Mutex};
use raid::{DirStore, RaidRecord, RecordError, StateStore};
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;

pub const BS: u64 = 512;

/// Logs to stderr when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A fresh temporary directory (removed by the test at the end when it passes).
pub fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("corral-raid-{tag}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A malloc bdev wrapped so that tests can make it fail or stop answering.
pub struct FaultBdev {
    name: String,
    inner: Arc<MallocBdev>,
    pub fail_writes: AtomicBool,
    pub fail_reads: AtomicBool,
    /// Hold every request (never complete) until released.
    pub silent: AtomicBool,
    /// Completes every request this many microseconds late (a slow device).
    pub delay_us: AtomicU64,
    /// Reads overlapping these ranges fail with a media error until a write covers them.
    bad: Mutex<Vec<(u64, u64)>>,
    parked: Mutex<Vec<(BdevIo, Completion)>>,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub failed: AtomicU64,
    /// While set, every write, write-zeroes and unmap is logged (at submit).
    pub log_writes: AtomicBool,
    write_log: Mutex<Vec<(u64, u64)>>,
}

impl FaultBdev {
    pub fn new(name: &str, blocks: u64) -> Arc<FaultBdev> {
        Self::over(
            name,
            Arc::new(MallocBdev::new(name, blocks, BS as u32, None).unwrap()),
        )
    }

    /// Wraps an existing malloc (a "restart" re-registers the same memory).
    pub fn over(name: &str, inner: Arc<MallocBdev>) -> Arc<FaultBdev> {
        Arc::new(FaultBdev {
            name: name.into(),
            inner,
            fail_writes: AtomicBool::new(false),
            fail_reads: AtomicBool::new(false),
            silent: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            bad: Mutex::new(Vec::new()),
            parked: Mutex::new(Vec::new()),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            log_writes: AtomicBool::new(false),
            write_log: Mutex::new(Vec::new()),
        })
    }

    pub fn inner(&self) -> &Arc<MallocBdev> {
        &self.inner
    }

    pub fn add_bad_range(&self, start: u64, n: u64) {
        self.bad.lock().push((start, start + n));
    }

    pub fn bad_ranges(&self) -> usize {
        self.bad.lock().len()
    }

    /// Completes every held request: with `err`, or by executing it.
    pub fn release_parked(&self, err: Option<IoError>) -> usize {
        let p: Vec<_> = std::mem::take(&mut *self.parked.lock());
        let n = p.len();
        for (io, done) in p {
            match &err {
                Some(e) => done.complete(io, Err(e.clone())),
                None => self.inner.submit(io, done),
            }
        }
        n
    }

    pub fn parked(&self) -> usize {
        self.parked.lock().len()
    }

    /// The `(offset_blocks, num_blocks)` of the writes logged so far, in
    /// submission order (see `log_writes`).
    pub fn write_log(&self) -> Vec<(u64, u64)> {
        self.write_log.lock().clone()
    }
}

impl Bdev for FaultBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    fn uuid(&self) -> uuid::Uuid {
        self.inner.uuid()
    }
    fn product_name(&self) -> &'static str {
        "Fault injector"
    }
    fn supports(&self, kind: IoKind) -> bool {
        self.inner.supports(kind)
    }
    fn submit(&self, io: BdevIo, done: Completion) {
        if io.kind != IoKind::Read
            && io.kind != IoKind::Flush
            && self.log_writes.load(Ordering::SeqCst)
        {
            self.write_log
                .lock()
                .push((io.offset_blocks, io.num_blocks));
        }
        if self.silent.load(Ordering::SeqCst) {
            self.parked.lock().push((io, done));
            return;
        }
        let (s, e) = (io.offset_blocks, io.offset_blocks + io.num_blocks);
        match io.kind {
            IoKind::Read => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                let bad = self.bad.lock().iter().any(|&(a, b)| s < b && a < e);
                if self.fail_reads.load(Ordering::SeqCst) || bad {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    return done.complete(io, Err(IoError::Media));
                }
            }
            IoKind::Write | IoKind::WriteZeroes | IoKind::Unmap | IoKind::Flush => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                if self.fail_writes.load(Ordering::SeqCst) {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    return done.complete(io, Err(IoError::Errno(libc::EIO)));
                }
                if io.kind != IoKind::Flush {
                    // a write remaps bad sectors it covers
                    self.bad.lock().retain(|&(a, b)| !(s <= a && b <= e));
                }
            }
        }
        let d = self.delay_us.load(Ordering::Relaxed);
        match tokio::runtime::Handle::try_current() {
            Ok(h) if d > 0 => {
                let inner = self.inner.clone();
                h.spawn(async move {
                    tokio::time::sleep(Duration::from_micros(d)).await;
                    inner.submit(io, done)
                });
            }
            _ => self.inner.submit(io, done),
        }
    }
}

/// A record store whose saves can be held (gate closed) or made to fail.
pub struct GatedStore {
    pub inner: DirStore,
    open: Mutex<bool>,
    cv: Condvar,
    pub saves: AtomicU64,
    pub waiting: AtomicU64,
    pub fail: AtomicBool,
    /// Every record saved, in order.
    pub history: Mutex<Vec<RaidRecord>>,
}

impl GatedStore {
    pub fn new(dir: &std::path::Path) -> Arc<GatedStore> {
        Arc::new(GatedStore {
            inner: DirStore::new(dir).unwrap(),
            open: Mutex::new(true),
            cv: Condvar::new(),
            saves: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            history: Mutex::new(Vec::new()),
        })
    }
    pub fn close(&self) {
        *self.open.lock() = false;
    }
    pub fn open(&self) {
        *self.open.lock() = true;
        self.cv.notify_all();
    }
    /// The record as on disk now.
    pub fn on_disk(&self, name: &str) -> Option<RaidRecord> {
        self.inner.load(name).unwrap()
    }
}

impl StateStore for GatedStore {
    fn save(&self, record: &RaidRecord) -> std::io::Result<()> {
        {
            let mut g = self.open.lock();
            self.waiting.fetch_add(1, Ordering::SeqCst);
            while !*g {
                self.cv.wait(&mut g);
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected persist failure"));
        }
        self.inner.save(record)?;
        self.history.lock().push(record.clone());
        self.saves.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn load(&self, name: &str) -> Result<Option<RaidRecord>, RecordError> {
        self.inner.load(name)
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.inner.remove(name)
    }
}

/// Registers `n` fault bdevs `prefix0..` of `blocks` blocks.
pub fn fault_members(
    reg: &BdevRegistry,
    prefix: &str,
    n: usize,
    blocks: u64,
) -> Vec<Arc<FaultBdev>> {
    (0..n)
        .map(|i| {
            let f = FaultBdev::new(&format!("{prefix}{i}"), blocks);
            reg.register(f.clone(), &[]).unwrap();
            f
        })
        .collect()
}

/// What one load task wrote, block by block, in its own region.
pub struct RegionModel {
    pub start: u64,
    pub data: Vec<u8>,
    pub known: Vec<bool>,
}

impl RegionModel {
    pub fn check(&self, lba: u64, got: &[u8]) {
        let bs = BS as usize;
        for (i, b) in got.chunks(bs).enumerate() {
            let l = (lba - self.start) as usize + i;
            if self.known[l] {
                assert!(
                    b == &self.data[l * bs..(l + 1) * bs],
                    "data mismatch at lba {}",
                    lba + i as u64
                );
            }
        }
    }
}

/// Concurrent verified I/O: each task owns a region, writes random data of
/// random sizes and reads back (verifying) until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<(RegionModel, u64)>>,
    pub ops: Arc<AtomicU64>,
}

impl Load {
    pub fn start(bdev: Arc<dyn Bdev>, tasks: usize, region_blocks: u64, seed: u64) -> Load {
        Self::start_at(bdev, 0, tasks, region_blocks, seed)
    }

    /// The same over `[base, base + tasks * region_blocks)` only.
    pub fn start_at(
        bdev: Arc<dyn Bdev>,
        base: u64,
        tasks: usize,
        region_blocks: u64,
        seed: u64,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let handles = (0..tasks)
            .map(|t| {
                let b = bdev.clone();
                let stop = stop.clone();
                let ops = ops.clone();
                tokio::spawn(async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + t as u64);
                    let start = base + t as u64 * region_blocks;
                    let mut m = RegionModel {
                        start,
                        data: vec![0; (region_blocks * BS) as usize],
                        known: vec![false; region_blocks as usize],
                    };
                    let mut n_ops = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let n = rng.gen_range(1..=32u64).min(region_blocks);
                        let off = rng.gen_range(0..=region_blocks - n);
                        let lba = start + off;
                        if rng.gen_bool(0.6) {
                            let mut d = vec![0u8; (n * BS) as usize];
                            rng.fill(&mut d[..]);
                            b.write_blocks(lba, &d, rng.gen_bool(0.1))
                                .await
                                .unwrap_or_else(|e| panic!("write {lba}+{n}: {e}"));
                            let o = (off * BS) as usize;
                            m.data[o..o + d.len()].copy_from_slice(&d);
                            m.known[off as usize..(off + n) as usize].fill(true);
                        } else {
                            let got = b
                                .read_blocks(lba, n)
                                .await
                                .unwrap_or_else(|e| panic!("read {lba}+{n}: {e}"));
                            m.check(lba, &got);
                        }
                        n_ops += 1;
                        ops.fetch_add(1, Ordering::Relaxed);
                        if n_ops.is_multiple_of(64) {
                            tokio::task::yield_now().await;
                        }
                    }
                    (m, n_ops)
                })
            })
            .collect();
        Load {
            stop,
            tasks: handles,
            ops,
        }
    }

    /// Waits until at least `n` more operations completed (bounded).
    pub async fn wait_ops(&self, n: u64, within: Duration) {
        let base = self.ops.load(Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        while self.ops.load(Ordering::Relaxed) < base + n {
            assert!(
                t0.elapsed() < within,
                "load made no progress: {} ops in {within:?}",
                self.ops.load(Ordering::Relaxed) - base
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the tasks (panics propagate) and returns their models.
    pub async fn stop(self) -> Vec<RegionModel> {
        self.stop.store(true, Ordering::SeqCst);
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.unwrap().0);
        }
        out
    }
}

/// Reads every region back and compares it with the models.
pub async fn verify_models(bdev: &dyn Bdev, models: &[RegionModel]) {
    for m in models {
        let n = m.known.len() as u64;
        let mut off = 0;
        while off < n {
            let k = 2048.min(n - off);
            let got = bdev.read_blocks(m.start + off, k).await.unwrap();
            m.check(m.start + off, &got);
            off += k;
        }
    }
}

/// crc32c of a whole device, read directly.
pub async fn crc_of(b: &dyn Bdev, blocks: u64) -> u32 {
    let mut crc = 0u32;
    let mut lba = 0;
    while lba < blocks {
        let n = 2048.min(blocks - lba);
        let d = b.read_blocks(lba, n).await.unwrap();
        crc = crc32c::crc32c_append(crc, &d);
        lba += n;
    }
    crc
}

/// Waits (bounded) until `f` holds.
pub async fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
