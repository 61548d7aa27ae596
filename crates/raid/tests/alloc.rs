//! The raid1 I/O path allocates nothing per I/O in steady state: writes to
//! three members (shared buffers), reads, flushes, write-zeroes and unmaps,
//! counted by a per-thread counting allocator. Malloc members complete inline,
//! so the whole path (raid submit, member submit, member completion, parent
//! completion) runs on the submitting thread.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bdev::malloc::MallocBdev;
use bdev::registry::BdevRegistry;
use bdev::{Bdev, BdevIo, Completion, IoBuf, IoError, IoSink};
use parking_lot::Mutex;
use raid::{CreateParams, RaidModule, RaidOpts};

struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

fn allocs_here() -> u64 {
    ALLOCS.with(|c| c.get())
}

// SAFETY: forwards to the system allocator unchanged; the counter is a
// const-initialised thread-local that never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
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

/// Takes buffers back into a pre-sized free list; never allocates.
struct Sink {
    done: AtomicU64,
    errors: AtomicU64,
    free: Mutex<Vec<IoBuf>>,
}

impl IoSink for Sink {
    fn complete(&self, _tag: u64, io: BdevIo, result: Result<(), IoError>) {
        if result.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        assert!(
            !io.buf.is_shared(),
            "the consumer must get its buffer back unshared"
        );
        if io.buf.capacity() > 0 {
            self.free.lock().push(io.buf);
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn steady_state_io_does_not_allocate() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let reg = BdevRegistry::new();
    let dir = std::env::temp_dir().join(format!("corral-raid-alloc-{}", uuid::Uuid::new_v4()));
    let blocks = 8192u64;
    for i in 0..3 {
        let m = MallocBdev::new(&format!("m{i}"), blocks, 512, None).unwrap();
        reg.register(Arc::new(m), &[]).unwrap();
    }
    let module = RaidModule::new(reg.clone(), &dir, RaidOpts::default()).unwrap();
    let _raid = rt
        .block_on(module.create(CreateParams::raid1("r", &["m0", "m1", "m2"])))
        .unwrap();
    let raid: Arc<dyn Bdev> = reg.get("r").unwrap();

    let sink = Arc::new(Sink {
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        free: Mutex::new(Vec::with_capacity(64)),
    });
    for _ in 0..8 {
        sink.free.lock().push(IoBuf::zeroed(4096));
    }
    let dyn_sink: Arc<dyn IoSink> = sink.clone();
    let run = |n: u64| {
        for i in 0..n {
            let lba = (i * 8 * 7919) % blocks;
            let buf = sink.free.lock().pop().unwrap();
            let io = match i % 8 {
                0..=3 => BdevIo::write(lba, 8, buf, i % 5 == 0),
                4..=5 => BdevIo::read(lba, 8, buf),
                6 => {
                    sink.free.lock().push(buf);
                    if i % 16 == 6 {
                        BdevIo::flush()
                    } else {
                        BdevIo::write_zeroes(lba, 8)
                    }
                }
                _ => {
                    sink.free.lock().push(buf);
                    BdevIo::unmap(lba, 8)
                }
            };
            raid.submit(io, Completion::new(dyn_sink.clone(), i));
        }
    };
    // Warm up: malloc allocates its memory on first write.
    run((blocks / 8) * 2);
    let probe = allocs_here();
    let v = std::hint::black_box(vec![1u8; 10]);
    assert!(allocs_here() > probe, "the counter counts");
    drop(v);
    let before = allocs_here();
    run(20_000);
    let allocated = allocs_here() - before;
    assert_eq!(sink.errors.load(Ordering::Relaxed), 0);
    assert_eq!(sink.done.load(Ordering::Relaxed), (blocks / 8) * 2 + 20_000);
    // malloc frees a fully unmapped 1 MiB chunk and re-allocates it on the next
    // write; the unmaps here are 4 KiB, so no chunk is ever freed.
    assert_eq!(allocated, 0, "{allocated} allocations in 20000 raid I/Os");
    rt.block_on(module.delete("r")).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
