//! The request path allocates nothing in steady state: a server on its own
//! thread (a current-thread runtime) serves pipelined reads, writes and
//! flushes, and the allocations made on that thread are counted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bdev::uring::Reactor;
use bdev::BdevRef;
use common::*;
use nbd::proto::*;
use nbd::{ExportOptions, NbdServer, ServerOptions};

struct CountingAlloc;

thread_local! {
    static COUNT_HERE: Cell<bool> = const { Cell::new(false) };
}
static SERVER_ALLOCS: AtomicU64 = AtomicU64::new(0);

fn count() {
    if COUNT_HERE.try_with(|c| c.get()).unwrap_or(false) {
        SERVER_ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged; the counter is a
// const-initialised thread-local and an atomic, neither of which allocates.
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
static A: CountingAlloc = CountingAlloc;

/// One round: 16 writes and 16 reads in flight, then a flush. Each burst goes
/// out in one write, so that the server holds all 16 buffers at once every
/// round: the buffer pool grows to the connection's peak concurrency during
/// warm-up and must not allocate after that.
fn round(c: &mut RawClient, data: &[u8], base: u64) {
    let mut burst = Vec::with_capacity(16 * (REQUEST_LEN + 4096));
    for k in 0..16u64 {
        Request {
            flags: 0,
            kind: CMD_WRITE,
            handle: k,
            offset: base + k * 4096,
            length: 4096,
        }
        .encode(&mut burst);
        burst.extend_from_slice(data);
    }
    std::io::Write::write_all(&mut c.s, &burst).unwrap();
    // Reads only after the writes are answered: overlapping requests in flight
    // have no defined order in NBD.
    for _ in 0..16 {
        assert_eq!(c.recv(0).error, 0);
    }
    burst.clear();
    for k in 0..16u64 {
        Request {
            flags: 0,
            kind: CMD_READ,
            handle: 100 + k,
            offset: base + k * 4096,
            length: 4096,
        }
        .encode(&mut burst);
    }
    std::io::Write::write_all(&mut c.s, &burst).unwrap();
    for _ in 0..16 {
        let r = c.recv(4096);
        assert_eq!(r.error, 0);
        assert!(r.data == data, "read {} returned other data", r.handle);
    }
    c.send(CMD_FLUSH, 0, 999, 0, 0);
    assert_eq!(c.recv(0).error, 0);
}

fn steady_state_allocations(
    make: impl FnOnce() -> (BdevRef, Option<Arc<Reactor>>) + Send + 'static,
) -> u64 {
    init_tracing();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (bdev, _reactor) = make();
        rt.block_on(async move {
            let srv = NbdServer::start("127.0.0.1:0".parse().unwrap(), ServerOptions::default())
                .await
                .unwrap();
            srv.add_export("m", bdev, ExportOptions::default()).unwrap();
            addr_tx.send(srv.local_addr()).unwrap();
            COUNT_HERE.with(|c| c.set(true));
            let _ = stop_rx.await;
            COUNT_HERE.with(|c| c.set(false));
            srv.shutdown().await;
        });
    });
    let addr = addr_rx.recv().unwrap();
    let data = random_bytes(4096, 11);
    for structured in [false, true] {
        let mut c = RawClient::connect(addr, "m", structured);
        // Warm up: handshake, buffers, queues reach their working sizes.
        for i in 0..300 {
            round(&mut c, &data, (i % 16) * 65536);
        }
        let before = SERVER_ALLOCS.load(Ordering::Relaxed);
        for i in 0..1000 {
            round(&mut c, &data, (i % 16) * 65536);
        }
        let during = SERVER_ALLOCS.load(Ordering::Relaxed) - before;
        if during > 0 {
            stop_tx.send(()).unwrap();
            server.join().unwrap();
            return during;
        }
        c.disconnect();
    }
    stop_tx.send(()).unwrap();
    server.join().unwrap();
    0
}

/// One test for both bdevs, run one after the other: the counter is global,
/// and a second server accepting a connection meanwhile would be counted.
#[test]
fn no_allocation_per_request() {
    let n = steady_state_allocations(|| (malloc("m", 4 << 20, 512), None));
    assert_eq!(
        n, 0,
        "malloc: allocations on the server thread for 33000 requests"
    );

    let scratch = Scratch::new("alloc");
    let path = scratch.path("disk.img");
    let n = steady_state_allocations(move || {
        let r = Arc::new(Reactor::new("t-alloc").unwrap());
        (file_bdev("f", &path, 4 << 20, r.clone()), Some(r))
    });
    assert_eq!(
        n, 0,
        "file: allocations on the server thread for 33000 requests"
    );
    drop(scratch);
}
