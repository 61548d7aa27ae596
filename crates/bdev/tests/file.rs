//! File bdev against real filesystems: ext4 under the build directory, tmpfs,
//! ramfs (no O_DIRECT), a loop block device, and a small loop-mounted ext4 that
//! runs out of space. Every test ends by reading data back and checking it.

// Test helpers outside #[test] functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bdev::file::{FileBdev, FileBdevError};
use bdev::uring::Reactor;
use bdev::{Bdev, BdevExt, BdevIo, Completion, IoBuf, IoError, IoKind, IoSink};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------
// Allocation counting, per thread: shows that the I/O path does not allocate.

struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count_alloc() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

/// Allocations made so far by the calling thread.
fn allocs_here() -> u64 {
    ALLOCS.with(|c| c.get())
}

// SAFETY: forwards to the system allocator unchanged; the counter is a
// const-initialised thread-local that never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count_alloc();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------
// Helpers.

/// A directory removed on drop (even when the test panics).
struct TempDir(PathBuf);

impl TempDir {
    fn new_in(base: &Path, tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = base.join(format!("corral-file-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    /// Under the build directory: a real disk filesystem (ext4 here).
    fn new(tag: &str) -> TempDir {
        Self::new_in(Path::new(env!("CARGO_TARGET_TMPDIR")), tag)
    }
    fn file(&self, name: &str, len: u64) -> PathBuf {
        let p = self.0.join(name);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A filesystem mounted on a temp dir, unmounted on drop (even on panic). With
/// `-o loop`, unmounting also frees the loop device.
struct Mount {
    mnt: PathBuf,
    _dir: TempDir,
}

impl Mount {
    fn new(dir: TempDir, mnt: PathBuf) -> Mount {
        Mount { mnt, _dir: dir }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let m = self.mnt.to_string_lossy().to_string();
        if run("umount", &[&m]).is_err() {
            // Something still holds it (a panic mid-test): detach it anyway.
            let _ = run("umount", &["-l", &m]);
        }
    }
}

/// A loop block device over a file, detached on drop.
struct LoopDev(String);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = run("losetup", &["-d", &self.0]);
    }
}

/// Whether loop devices can be used at all here; the reason when not.
fn loop_unavailable() -> Option<String> {
    if !Path::new("/dev/loop-control").exists() {
        return Some("/dev/loop-control does not exist".into());
    }
    run("losetup", &["-f"]).err()
}

fn reactor(name: &str) -> Arc<Reactor> {
    Arc::new(Reactor::new(name).unwrap())
}

/// Deterministic data for a write: distinct per `seed` and per 8-byte word.
fn pattern(buf: &mut [u8], seed: u64) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let v = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64);
        w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
    }
}

fn patterned(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    pattern(&mut v, seed);
    v
}

type Done = (u64, BdevIo, Result<(), IoError>);

/// Delivers completions to a channel.
struct ChanSink(mpsc::Sender<Done>);

impl IoSink for ChanSink {
    fn complete(&self, tag: u64, io: BdevIo, result: Result<(), IoError>) {
        let _ = self.0.send((tag, io, result));
    }
}

fn chan() -> (Arc<dyn IoSink>, mpsc::Receiver<Done>) {
    let (tx, rx) = mpsc::channel();
    (Arc::new(ChanSink(tx)), rx)
}

/// Submits one request and waits for it (from a plain thread).
fn submit_sync(b: &dyn Bdev, io: BdevIo) -> (BdevIo, Result<(), IoError>) {
    let (sink, rx) = chan();
    b.submit(io, Completion::new(sink, 7));
    let (tag, io, r) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(tag, 7);
    (io, r)
}

fn st_blocks(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks()
}

// ---------------------------------------------------------------------------

/// Several threads keep many requests in flight each, with random sizes from
/// 512 B to 1 MiB, random FUA, reads and writes mixed; every read is checked
/// against a model, and the whole device is read back at the end.
#[test]
fn concurrent_random_io_verified_by_content() {
    const THREADS: u64 = 4;
    const REGION: u64 = 16 << 20;
    const OPS: usize = 1500;
    const DEPTH: usize = 32;
    let dir = TempDir::new("concurrent");
    let path = dir.file("img", THREADS * REGION);
    let b = FileBdev::open("c0", &path, Some(512), None, reactor("t-conc")).unwrap();
    assert!(b.is_direct(), "ext4 accepts O_DIRECT");
    let bs = b.block_size() as u64;
    let t0 = Instant::now();
    let max_inflight = AtomicUsize::new(0);

    std::thread::scope(|s| {
        for t in 0..THREADS {
            let b = &b;
            let max_inflight = &max_inflight;
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let base = t * REGION / bs;
                let region_blocks = REGION / bs;
                let mut model = vec![0u8; REGION as usize];
                let (sink, rx) = chan();
                // tag -> (first block in region, blocks) of requests in flight
                let mut inflight: Vec<Option<(u64, u64)>> = vec![None; DEPTH];
                let (mut issued, mut completed, mut reads_checked) = (0usize, 0usize, 0usize);
                let overlaps = |inflight: &[Option<(u64, u64)>], s: u64, n: u64| {
                    inflight
                        .iter()
                        .flatten()
                        .any(|&(a, m)| s < a + m && a < s + n)
                };
                while completed < OPS {
                    // Fill the queue with requests that overlap none in flight.
                    while issued < OPS {
                        let Some(tag) = inflight.iter().position(|e| e.is_none()) else {
                            break;
                        };
                        let exp = rng.gen_range(0..=11u32); // 512 B .. 1 MiB
                        let n = rng.gen_range((1u64 << exp) / 2 + 1..=(1u64 << exp));
                        let start = rng.gen_range(0..=region_blocks - n);
                        if overlaps(&inflight, start, n) {
                            break;
                        }
                        inflight[tag] = Some((start, n));
                        let len = (n * bs) as usize;
                        let io = if rng.gen_bool(0.5) {
                            let mut buf = IoBuf::zeroed(len);
                            pattern(&mut buf, (t << 32) | issued as u64);
                            BdevIo::write(base + start, n, buf, rng.gen_bool(0.1))
                        } else {
                            BdevIo::read(base + start, n, IoBuf::zeroed(len))
                        };
                        b.submit(io, Completion::new(sink.clone(), tag as u64));
                        issued += 1;
                        let now = inflight.iter().flatten().count();
                        max_inflight.fetch_max(now, Ordering::Relaxed);
                    }
                    let (tag, io, r) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
                    r.unwrap();
                    let (start, n) = inflight[tag as usize].take().unwrap();
                    assert_eq!(io.offset_blocks, base + start);
                    let range = (start * bs) as usize..((start + n) * bs) as usize;
                    match io.kind {
                        IoKind::Write => model[range].copy_from_slice(&io.buf),
                        IoKind::Read => {
                            assert!(
                                io.buf[..] == model[range],
                                "thread {t}: read at {start} differs"
                            );
                            reads_checked += 1;
                        }
                        k => panic!("unexpected {k:?}"),
                    }
                    completed += 1;
                }
                assert!(reads_checked > OPS / 4);
                // Everything this thread wrote, read back in 1 MiB pieces.
                for off in (0..region_blocks).step_by(2048) {
                    let (io, r) =
                        submit_sync(b, BdevIo::read(base + off, 2048, IoBuf::zeroed(1 << 20)));
                    r.unwrap();
                    let at = (off * bs) as usize;
                    assert!(
                        io.buf[..] == model[at..at + (1 << 20)],
                        "thread {t}: final read at {off}"
                    );
                }
            });
        }
    });
    eprintln!(
        "concurrent: {} threads x {OPS} ops, max {} in flight per thread, {:?}",
        THREADS,
        max_inflight.load(Ordering::Relaxed),
        t0.elapsed()
    );
    assert!(max_inflight.load(Ordering::Relaxed) >= 8);
}

/// FUA writes and flushes complete, and the data is in the file for any reader:
/// another fd (through the page cache) and a second bdev on the same file.
#[tokio::test]
async fn fua_and_flush_reach_the_file() {
    let dir = TempDir::new("fua");
    let path = dir.file("img", 4 << 20);
    let r = reactor("t-fua");
    let b = FileBdev::open("f0", &path, Some(4096), None, r.clone()).unwrap();
    assert!(b.write_cache() && b.supports(IoKind::Flush));
    let a = patterned(64 << 10, 1);
    let c = patterned(8192, 2);
    b.write_blocks(3, &a, true).await.unwrap();
    b.write_blocks(100, &c, false).await.unwrap();
    b.flush().await.unwrap();
    let raw = std::fs::read(&path).unwrap();
    assert!(raw[3 * 4096..3 * 4096 + a.len()] == a[..]);
    assert!(raw[100 * 4096..100 * 4096 + c.len()] == c[..]);
    let b2 = FileBdev::open("f1", &path, None, None, r).unwrap();
    assert_eq!(b2.num_blocks() * b2.block_size() as u64, 4 << 20);
    let got = b2
        .read_blocks(
            3 * 4096 / b2.block_size() as u64,
            (a.len() / b2.block_size() as usize) as u64,
        )
        .await
        .unwrap();
    assert!(got[..] == a[..]);
    assert!(b.read_blocks(100, 2).await.unwrap()[..] == c[..]);
}

/// Write-zeroes and unmap read back as zeroes without touching their neighbours,
/// and unmap gives the space back to the filesystem.
#[tokio::test]
async fn write_zeroes_and_unmap_on_ext4() {
    let dir = TempDir::new("zero");
    let path = dir.file("img", 16 << 20);
    let b = FileBdev::open("z0", &path, Some(4096), None, reactor("t-zero")).unwrap();
    assert!(b.supports(IoKind::Unmap), "ext4 can punch holes");
    assert!(b.supports(IoKind::WriteZeroes));
    let data = patterned(8 << 20, 3);
    b.write_blocks(0, &data, false).await.unwrap();
    b.flush().await.unwrap();
    let before = st_blocks(&path);
    assert!(before >= (8 << 20) / 512, "data is allocated: {before}");

    b.unmap(512, 1024).await.unwrap(); // 4 MiB at 2 MiB
    let after = st_blocks(&path);
    assert!(
        before - after >= (4 << 20) / 512,
        "unmap freed {} sectors",
        before - after
    );

    b.write_zeroes(100, 100).await.unwrap();
    b.write_zeroes(1500, 100).await.unwrap(); // straddles the end of the hole
    assert!(
        b.uses_zero_range(),
        "ext4 zeroes with fallocate(ZERO_RANGE)"
    );
    let got = b.read_blocks(0, 2048).await.unwrap();
    let zero =
        |r: std::ops::Range<usize>| got[r.start * 4096..r.end * 4096].iter().all(|&x| x == 0);
    let same = |r: std::ops::Range<usize>| {
        got[r.start * 4096..r.end * 4096] == data[r.start * 4096..r.end * 4096]
    };
    assert!(same(0..100) && zero(100..200) && same(200..512));
    assert!(zero(512..1600) && same(1600..2048));
    // Unmap of an already-unmapped range, and of the last block, are fine.
    b.unmap(600, 10).await.unwrap();
    b.unmap(b.num_blocks() - 1, 1).await.unwrap();
    assert!(b
        .read_blocks(b.num_blocks() - 1, 1)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));
}

/// tmpfs: works whether or not the kernel accepts O_DIRECT there (it does since
/// Linux 6.6); tmpfs has no ZERO_RANGE, so write-zeroes falls back to writing
/// zeroes, across several chunks; punching holes frees memory.
#[tokio::test]
async fn tmpfs_write_zeroes_fallback_and_unmap() {
    let dir = TempDir::new_in(Path::new("/dev/shm"), "tmpfs");
    let path = dir.file("img", 16 << 20);
    let b = FileBdev::open("s0", &path, None, None, reactor("t-shm")).unwrap();
    eprintln!(
        "tmpfs: O_DIRECT accepted: {}, block size {}",
        b.is_direct(),
        b.block_size()
    );
    let bs = b.block_size() as usize;
    let data = patterned(12 << 20, 4);
    b.write_blocks(0, &data, true).await.unwrap();
    let before = st_blocks(&path);
    // 5 MiB + 3 blocks: more than FILL_DEPTH chunks of the fallback.
    let zb = ((5 << 20) / bs + 3) as u64;
    b.write_zeroes(7, zb).await.unwrap();
    b.write_zeroes(0, 1).await.unwrap(); // second time: straight to the fallback
    assert!(!b.uses_zero_range(), "tmpfs has no ZERO_RANGE");
    assert!(b.supports(IoKind::Unmap));
    let ub = ((2 << 20) / bs) as u64;
    let uoff = ((8 << 20) / bs) as u64;
    b.unmap(uoff, ub).await.unwrap();
    assert!(
        before - st_blocks(&path) >= (2 << 20) / 512,
        "punch freed tmpfs pages"
    );
    let got = b.read_blocks(0, ((12 << 20) / bs) as u64).await.unwrap();
    let mut want = data.clone();
    want[..bs].fill(0);
    want[7 * bs..(7 + zb as usize) * bs].fill(0);
    want[uoff as usize * bs..(uoff + ub) as usize * bs].fill(0);
    assert!(got[..] == want[..]);
}

/// ramfs refuses O_DIRECT: the bdev falls back to buffered I/O and still works;
/// ramfs cannot punch holes, so unmap is not offered, and write-zeroes writes.
#[tokio::test]
async fn buffered_fallback_when_o_direct_refused() {
    let dir = TempDir::new("ramfs");
    let mnt = dir.0.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if let Err(e) = run("mount", &["-t", "ramfs", "ramfs", &mnt.to_string_lossy()]) {
        eprintln!("SKIP buffered_fallback_when_o_direct_refused: cannot mount ramfs ({e})");
        return;
    }
    let m = Mount::new(dir, mnt.clone());
    let path = mnt.join("img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let b = FileBdev::open("r0", &path, None, None, reactor("t-ramfs")).unwrap();
    assert!(!b.is_direct(), "ramfs has no O_DIRECT: buffered fallback");
    assert_eq!(b.block_size(), 512);
    assert!(!b.supports(IoKind::Unmap));
    assert_eq!(b.unmap(0, 8).await.unwrap_err(), IoError::NotSupported);
    let data = patterned(3 << 20, 5);
    b.write_blocks(1, &data, true).await.unwrap();
    b.write_zeroes(10, 20).await.unwrap();
    b.flush().await.unwrap();
    let got = b.read_blocks(1, (data.len() / 512) as u64).await.unwrap();
    let mut want = data.clone();
    want[9 * 512..29 * 512].fill(0);
    assert!(got[..] == want[..]);
    drop(b);
    drop(m);
}

/// Requests outside the device, or whose buffer does not match, are refused
/// without panicking and without touching data.
#[tokio::test]
async fn out_of_range_and_bad_buffers_rejected() {
    let dir = TempDir::new("range");
    let path = dir.file("img", 1 << 20);
    let b = FileBdev::open("o0", &path, Some(4096), None, reactor("t-range")).unwrap();
    let n = b.num_blocks();
    assert_eq!(n, 256);
    let data = patterned(1 << 20, 6);
    b.write_blocks(0, &data, false).await.unwrap();

    assert_eq!(b.read_blocks(n, 1).await.unwrap_err(), IoError::OutOfRange);
    assert_eq!(
        b.read_blocks(n - 1, 2).await.unwrap_err(),
        IoError::OutOfRange
    );
    assert_eq!(
        b.read_blocks(u64::MAX, 2).await.unwrap_err(),
        IoError::OutOfRange
    );
    assert_eq!(
        b.write_blocks(n, &data[..4096], true).await.unwrap_err(),
        IoError::OutOfRange
    );
    assert_eq!(
        b.write_zeroes(n - 3, 4).await.unwrap_err(),
        IoError::OutOfRange
    );
    assert_eq!(
        b.unmap(u64::MAX - 1, 3).await.unwrap_err(),
        IoError::OutOfRange
    );
    // Buffer shorter or longer than the range, or not a whole block.
    assert_eq!(
        b.write_blocks(0, &data[..1000], false).await.unwrap_err(),
        IoError::InvalidBuffer
    );
    let (_, r) = submit_sync(&b, BdevIo::write(0, 2, IoBuf::zeroed(4096), false));
    assert_eq!(r.unwrap_err(), IoError::InvalidBuffer);
    let (_, r) = submit_sync(&b, BdevIo::read(0, 1, IoBuf::zeroed(8192)));
    assert_eq!(r.unwrap_err(), IoError::InvalidBuffer);
    let (_, r) = submit_sync(
        &b,
        BdevIo::read(u64::MAX / 4096, u64::MAX / 4096, IoBuf::empty()),
    );
    assert_eq!(r.unwrap_err(), IoError::OutOfRange);

    // The device is untouched and its file did not grow.
    assert!(b.read_blocks(0, n).await.unwrap()[..] == data[..]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
}

/// A small ext4 on a loop device fills up: writes past its capacity fail with
/// NoSpace, the bdev keeps serving reads of what was written, and once space is
/// freed (by unmapping) writes succeed again.
#[tokio::test]
async fn full_disk_reports_no_space_and_recovers() {
    if let Some(why) = loop_unavailable() {
        eprintln!("SKIP full_disk_reports_no_space_and_recovers: loop devices unavailable: {why}");
        return;
    }
    let dir = TempDir::new("full");
    let img = dir.file("fs.img", 32 << 20);
    let mnt = dir.0.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run("mkfs.ext4", &["-q", "-F", &img.to_string_lossy()]).unwrap();
    run(
        "mount",
        &["-o", "loop", &img.to_string_lossy(), &mnt.to_string_lossy()],
    )
    .unwrap();
    let m = Mount::new(dir, mnt.clone());

    let path = mnt.join("disk");
    // A sparse 64 MiB file on a 32 MiB filesystem.
    std::fs::File::create(&path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let r = reactor("t-full");
    let b = FileBdev::open("full0", &path, Some(4096), None, r.clone()).unwrap();
    assert!(b.is_direct());
    const CHUNK: usize = 1 << 20;
    let blocks = (CHUNK / 4096) as u64;
    let mut written = 0u64;
    let err = loop {
        assert!(written < 64, "a 32 MiB filesystem took 64 MiB");
        match b
            .write_blocks(written * blocks, &patterned(CHUNK, written), false)
            .await
        {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(err, IoError::NoSpace);
    assert!(written >= 10, "only {written} MiB fit");
    // Still full, still the same clean error, for big and small writes alike.
    for i in 0..3u64 {
        let e = b
            .write_blocks((written + 1 + i) * blocks, &patterned(4096, 99), true)
            .await
            .unwrap_err();
        assert_eq!(e, IoError::NoSpace);
    }
    b.flush().await.unwrap();
    for i in 0..written {
        let got = b.read_blocks(i * blocks, blocks).await.unwrap();
        assert!(got[..] == patterned(CHUNK, i)[..], "chunk {i} after ENOSPC");
    }

    // Free 4 MiB, then the failed chunk and the next one can be written.
    b.unmap(0, 4 * blocks).await.unwrap();
    b.flush().await.unwrap();
    for i in [written, written + 1] {
        b.write_blocks(i * blocks, &patterned(CHUNK, 1000 + i), true)
            .await
            .unwrap();
    }
    for i in 0..written + 2 {
        let got = b.read_blocks(i * blocks, blocks).await.unwrap();
        let want = match i {
            0..4 => vec![0u8; CHUNK],
            i if i < written => patterned(CHUNK, i),
            i => patterned(CHUNK, 1000 + i),
        };
        assert!(got[..] == want[..], "chunk {i} after recovery");
    }
    eprintln!("full disk: {written} MiB fit before ENOSPC");
    drop(b);
    drop(r);
    drop(m);
}

/// A loop block device: size from BLKGETSIZE64, logical block size from the
/// device, I/O and unmap through the device node.
#[tokio::test]
async fn block_device() {
    if let Some(why) = loop_unavailable() {
        eprintln!("SKIP block_device: loop devices unavailable: {why}");
        return;
    }
    let dir = TempDir::new("blk");
    let img = dir.file("dev.img", 8 << 20);
    let dev = LoopDev(run("losetup", &["--find", "--show", &img.to_string_lossy()]).unwrap());
    let r = reactor("t-blk");
    let b = FileBdev::open("blk0", &dev.0, None, None, r.clone()).unwrap();
    assert!(b.is_block_device() && b.is_direct());
    assert_eq!(b.block_size(), b.logical_block_size());
    assert_eq!(b.num_blocks() * b.block_size() as u64, 8 << 20);
    assert!(matches!(
        FileBdev::open(
            "blk1",
            &dev.0,
            Some(b.logical_block_size() / 2),
            None,
            r.clone()
        ),
        Err(FileBdevError::BlockSize { .. })
    ));
    let b4k = FileBdev::open("blk2", &dev.0, Some(4096), None, r.clone()).unwrap();
    assert_eq!(b4k.num_blocks(), 2048);

    let data = patterned(2 << 20, 7);
    b4k.write_blocks(16, &data, true).await.unwrap();
    b4k.flush().await.unwrap();
    b4k.write_zeroes(20, 4).await.unwrap();
    let mut want = data.clone();
    want[4 * 4096..8 * 4096].fill(0);
    if b4k.supports(IoKind::Unmap) {
        b4k.unmap(100, 8).await.unwrap();
        want[84 * 4096..92 * 4096].fill(0);
    } else {
        eprintln!("loop device does not offer unmap here");
    }
    let bs = b.block_size() as u64;
    let got = b
        .read_blocks(16 * 4096 / bs, data.len() as u64 / bs)
        .await
        .unwrap();
    assert!(got[..] == want[..]);
    drop((b, b4k, r));
    drop(dev);
}

/// Requests that always complete and recycle their buffers.
struct Recycle {
    done: Mutex<Vec<(u64, BdevIo, bool)>>,
    cv: Condvar,
    /// Allocation count of the reactor thread, read at its latest completion.
    reactor_allocs: AtomicU64,
}

impl IoSink for Recycle {
    fn complete(&self, tag: u64, io: BdevIo, result: Result<(), IoError>) {
        self.reactor_allocs.store(allocs_here(), Ordering::SeqCst);
        self.done.lock().unwrap().push((tag, io, result.is_ok()));
        self.cv.notify_one();
    }
}

/// In steady state neither the submitting thread nor the reactor allocates per
/// I/O: reads and writes at queue depth 32, counted by a per-thread allocator.
#[test]
fn steady_state_io_does_not_allocate() {
    const DEPTH: u64 = 32;
    const WARMUP: u64 = 2000;
    const MEASURED: u64 = 20000;
    let dir = TempDir::new("alloc");
    let path = dir.file("img", 16 << 20);
    let b = FileBdev::open("a0", &path, Some(4096), None, reactor("t-alloc")).unwrap();
    let rec = Arc::new(Recycle {
        done: Mutex::new(Vec::with_capacity(DEPTH as usize)),
        cv: Condvar::new(),
        reactor_allocs: AtomicU64::new(0),
    });
    let sink: Arc<dyn IoSink> = rec.clone();
    let mut ready: Vec<(u64, BdevIo, bool)> = Vec::with_capacity(DEPTH as usize);
    let (mut issued, mut completed) = (0u64, 0u64);
    let issue = |tag: u64, seq: u64, buf: IoBuf| {
        let off = (seq * 7919) % 4096;
        let io = if seq.is_multiple_of(2) {
            BdevIo::write(off, 1, buf, false)
        } else {
            BdevIo::read(off, 1, buf)
        };
        b.submit(io, Completion::new(sink.clone(), tag));
    };
    for tag in 0..DEPTH {
        issue(tag, issued, IoBuf::zeroed(4096));
        issued += 1;
    }
    let (mut mine0, mut theirs0) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while completed < WARMUP + MEASURED {
        {
            let mut g = rec.done.lock().unwrap();
            while g.is_empty() {
                assert!(Instant::now() < deadline, "I/O stalled");
                g = rec
                    .cv
                    .wait_timeout(g, Duration::from_millis(100))
                    .unwrap()
                    .0;
            }
            std::mem::swap(&mut *g, &mut ready);
        }
        for (tag, io, ok) in ready.drain(..) {
            assert!(ok);
            completed += 1;
            if completed == WARMUP {
                mine0 = allocs_here();
                theirs0 = rec.reactor_allocs.load(Ordering::SeqCst);
            }
            if issued < WARMUP + MEASURED {
                issue(tag, issued, io.buf);
                issued += 1;
            }
        }
    }
    let mine = allocs_here() - mine0;
    let theirs = rec.reactor_allocs.load(Ordering::SeqCst) - theirs0;
    eprintln!("allocations over {MEASURED} I/Os: submitter {mine}, reactor {theirs}");
    // A stray one-off allocation (lock parking tables growing) is not per I/O.
    assert!(
        mine <= 8 && theirs <= 8,
        "submitter {mine}, reactor {theirs}"
    );
    let (io, r) = submit_sync(&b, BdevIo::read(0, 1, IoBuf::zeroed(4096)));
    r.unwrap();
    assert!(
        io.buf.iter().all(|&x| x == 0),
        "block 0 was only ever written with zeroes"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..Default::default() })]

    /// Arbitrary requests never panic: in range they succeed, out of range or
    /// with a wrong buffer they fail with the matching error.
    #[test]
    fn arbitrary_requests_never_panic(
        kind in 0usize..5,
        off in prop_oneof![0u64..300, any::<u64>()],
        n in prop_oneof![0u64..300, any::<u64>()],
        buf_blocks in prop_oneof![Just(None), (0usize..300).prop_map(Some)],
        fua: bool,
    ) {
        thread_local! {
            static DEV: (TempDir, FileBdev) = {
                let dir = TempDir::new("prop");
                let path = dir.file("img", 256 * 4096);
                let b = FileBdev::open("p0", &path, Some(4096), None, reactor("t-prop")).unwrap();
                (dir, b)
            };
        }
        DEV.with(|(_, b)| {
            let nb = b.num_blocks();
            let want_blocks = if n < 300 { n as usize } else { 0 };
            let blen = buf_blocks.unwrap_or(want_blocks) * 4096;
            let kind = IoKind::ALL[kind];
            let io = match kind {
                IoKind::Read => BdevIo::read(off, n, IoBuf::zeroed(blen)),
                IoKind::Write => BdevIo::write(off, n, IoBuf::zeroed(blen), fua),
                // A flush's range is ignored, whatever it holds.
                IoKind::Flush => BdevIo { offset_blocks: off, num_blocks: n, ..BdevIo::flush() },
                IoKind::WriteZeroes => BdevIo::write_zeroes(off, n),
                IoKind::Unmap => BdevIo::unmap(off, n),
            };
            let (_, r) = submit_sync(b, io);
            let in_range = off.checked_add(n).is_some_and(|e| kind == IoKind::Flush || e <= nb);
            let buf_ok = !matches!(kind, IoKind::Read | IoKind::Write) || blen as u64 == n.saturating_mul(4096);
            match r {
                Ok(()) => prop_assert!(in_range && buf_ok),
                Err(IoError::OutOfRange) => prop_assert!(!in_range),
                Err(IoError::InvalidBuffer) => prop_assert!(in_range && !buf_ok),
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
            Ok(())
        })?;
    }
}

/// Throughput sanity check, not a test: 4 KiB random writes at QD32 for ~10 s
/// on a preallocated 1 GiB file under CORRAL_BENCH_DIR (default: the build's
/// tmp dir). Compare with fio on the same file:
/// `fio --name=w --filename=<file> --ioengine=io_uring --direct=1 --rw=randwrite
///  --bs=4k --iodepth=32 --runtime=10 --time_based --size=1G`
#[test]
#[ignore]
fn bench_randwrite_4k_qd32() {
    const DEPTH: u64 = 32;
    let base =
        std::env::var("CORRAL_BENCH_DIR").unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").into());
    let secs: u64 = std::env::var("CORRAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let path = Path::new(&base).join("corral-bench.img");
    if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) != 1 << 30 {
        run("fallocate", &["-l", "1G", &path.to_string_lossy()]).unwrap();
        run(
            "dd",
            &[
                "if=/dev/zero",
                &format!("of={}", path.display()),
                "bs=1M",
                "count=1024",
                "oflag=direct",
                "conv=notrunc",
            ],
        )
        .unwrap();
    }
    let b = FileBdev::open("bench", &path, Some(4096), None, reactor("bench")).unwrap();
    let rec = Arc::new(Recycle {
        done: Mutex::new(Vec::new()),
        cv: Condvar::new(),
        reactor_allocs: AtomicU64::new(0),
    });
    let sink: Arc<dyn IoSink> = rec.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let nb = b.num_blocks();
    let mut issue = |tag: u64, buf: IoBuf| {
        b.submit(
            BdevIo::write(rng.gen_range(0..nb), 1, buf, false),
            Completion::new(sink.clone(), tag),
        );
    };
    for tag in 0..DEPTH {
        issue(tag, IoBuf::zeroed(4096));
    }
    let t0 = Instant::now();
    let mut ready = Vec::new();
    let mut done = 0u64;
    let mut stop = false;
    let mut inflight = DEPTH;
    while inflight > 0 {
        {
            let mut g = rec.done.lock().unwrap();
            while g.is_empty() {
                g = rec.cv.wait(g).unwrap();
            }
            std::mem::swap(&mut *g, &mut ready);
        }
        stop |= t0.elapsed() >= Duration::from_secs(secs);
        for (tag, io, ok) in ready.drain(..) {
            assert!(ok);
            done += 1;
            if stop {
                inflight -= 1;
            } else {
                issue(tag, io.buf);
            }
        }
    }
    let el = t0.elapsed().as_secs_f64();
    println!(
        "corral file bdev randwrite 4k qd32: {:.0} IOPS, {:.1} MiB/s over {el:.1} s",
        done as f64 / el,
        done as f64 * 4096.0 / el / (1 << 20) as f64
    );
}
