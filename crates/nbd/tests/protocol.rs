//! What real clients never send, over real sockets: bad requests get their NBD
//! error and the connection and export keep working for everyone; a broken
//! request header closes that connection only. Also export removal (drain),
//! bdev hot-remove (EIO), handshake time limits and server shutdown. Every
//! test ends by checking data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{Bdev, BdevExt, BdevIo, BdevRef, Completion, IoKind};
use common::*;
use nbd::proto::*;
use nbd::{ExportOptions, ServerOptions};
use parking_lot::Mutex;

const SIZE: u64 = 8 << 20;

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn bad_requests_get_errors_and_everyone_keeps_working() {
    let srv = TestServer::start();
    let bdev = malloc("m", SIZE, 512);
    srv.add("disk", bdev.clone(), ExportOptions::default());
    let mut a = RawClient::connect(srv.addr, "disk", false);
    let mut b = RawClient::connect(srv.addr, "disk", true);
    assert_eq!(a.size, SIZE);
    assert_ne!(b.flags & TX_SEND_DF, 0);

    for c in [&mut a, &mut b] {
        // Out of range: read EINVAL, write ENOSPC (payload consumed).
        c.send(CMD_READ, 0, 1, SIZE - 512, 1024);
        assert_eq!(c.recv(1024).error, Errno::Inval.code());
        let r = c.write(2, SIZE, &[1; 4096]);
        assert_eq!((r.handle, r.error), (2, Errno::NoSpc.code()));
        // Unknown command, unknown flag, misaligned.
        c.send(0x77, 0, 3, 0, 0);
        assert_eq!(c.recv(0).error, Errno::Inval.code());
        c.send(CMD_FLUSH, 1 << 12, 4, 0, 0);
        assert_eq!(c.recv(0).error, Errno::Inval.code());
        c.send(CMD_READ, 0, 5, 100, 512);
        assert_eq!(c.recv(512).error, Errno::Inval.code());
        let r = c.write(6, 512, &[1; 100]);
        assert_eq!(r.error, Errno::Inval.code());
        // Block status without a negotiated context.
        c.send(CMD_BLOCK_STATUS, 0, 7, 0, 4096);
        assert_eq!(c.recv(0).error, Errno::Inval.code());
        // An oversized write: 64 MiB of payload after a 64 MiB length. The server
        // skips it in pieces and answers EINVAL; the connection goes on.
        let len = 64u32 << 20;
        c.send(CMD_WRITE, 0, 8, 0, len);
        let chunk = vec![0xEE; 1 << 20];
        for _ in 0..64 {
            c.s.write_all(&chunk).unwrap();
        }
        let r = c.recv(0);
        assert_eq!((r.handle, r.error), (8, Errno::Inval.code()));
        // An oversized read is refused without data.
        c.send(CMD_READ, 0, 9, 0, len);
        assert_eq!(c.recv(0).error, Errno::Inval.code());
    }
    // Both still work, and see each other's writes (multi-conn).
    let da = random_bytes(65536, 1);
    let db = random_bytes(65536, 2);
    assert_eq!(a.write(10, 0, &da).error, 0);
    assert_eq!(b.write(11, 65536, &db).error, 0);
    assert_eq!(a.read(12, 65536, 65536).data, db);
    assert_eq!(b.read(13, 0, 65536).data, da);

    // A broken request header closes that connection only.
    let mut c = RawClient::connect(srv.addr, "disk", true);
    c.s.write_all(&[0x12; REQUEST_LEN]).unwrap();
    wait_for(
        "bad-magic connection to close",
        Duration::from_secs(5),
        || c.is_closed(),
    );
    assert_eq!(a.read(14, 0, 65536).data, da);
    assert_eq!(b.read(15, 65536, 65536).data, db);
    let mut d = RawClient::connect(srv.addr, "disk", false);
    assert_eq!(d.read(16, 0, 65536).data, da);
    wait_for("3 connections", Duration::from_secs(5), || {
        srv.server().export("disk").unwrap().connections == 3
    });
    a.disconnect();
    b.disconnect();
    d.disconnect();
    wait_for("0 connections", Duration::from_secs(5), || {
        srv.server().export("disk").unwrap().connections == 0
    });
    // And the bdev holds the data.
    let got = srv
        .rt
        .block_on(async move { bdev.read_blocks(0, 256).await.unwrap().to_vec() });
    assert_eq!(&got[..65536], &da[..]);
    assert_eq!(&got[65536..], &db[..]);
}

#[test]
fn handshake_options_over_a_socket() {
    let srv = TestServer::start();
    srv.add("one", malloc("m1", SIZE, 512), ExportOptions::default());
    srv.add("two", malloc("m2", SIZE, 4096), ExportOptions::default());
    let mut c = RawClient::greet(srv.addr);
    let r = c.option(OPT_LIST, &[]);
    assert_eq!(r.len(), 3);
    assert_eq!(r[2].1, REP_ACK);
    assert_eq!(c.option(4242, b"junk")[0].1, REP_ERR_UNSUP);
    assert_eq!(c.option(OPT_STARTTLS, &[])[0].1, REP_ERR_POLICY);
    assert_eq!(c.go("three"), REP_ERR_UNKNOWN);
    assert_eq!(c.go("two"), REP_ACK);
    assert_eq!(c.size, SIZE);
    // 4096-byte blocks: 512-aligned requests are refused.
    c.send(CMD_READ, 0, 1, 512, 512);
    assert_eq!(c.recv(512).error, Errno::Inval.code());
    assert_eq!(c.read(2, 4096, 4096).data, vec![0; 4096]);

    // Old-style EXPORT_NAME: unknown name closes; known name works.
    let mut c = RawClient::greet(srv.addr);
    c.s.write_all(&opt(OPT_EXPORT_NAME, b"nope")).unwrap();
    wait_for(
        "close after unknown EXPORT_NAME",
        Duration::from_secs(5),
        || c.is_closed(),
    );
    let mut c = RawClient::greet(srv.addr);
    c.s.write_all(&opt(OPT_EXPORT_NAME, b"one")).unwrap();
    let mut info = [0u8; 10]; // size + flags, no zeroes (NO_ZEROES negotiated)
    c.s.read_exact(&mut info).unwrap();
    assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), SIZE);
    assert_eq!(c.write(1, 0, &[3; 512]).error, 0);
    assert_eq!(c.read(2, 0, 512).data, vec![3; 512]);

    // ABORT is acknowledged, then the server closes.
    let mut c = RawClient::greet(srv.addr);
    assert_eq!(c.option(OPT_ABORT, &[])[0].1, REP_ACK);
    assert!(c.is_closed());
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let srv = TestServer::start();
    let bdev = malloc("m", SIZE, 512);
    let b2 = bdev.clone();
    srv.rt
        .block_on(async move { b2.write_blocks(0, &[9; 4096], false).await.unwrap() });
    let ro = ExportOptions {
        read_only: true,
        ..Default::default()
    };
    srv.add("ro", bdev.clone(), ro);
    let mut c = RawClient::connect(srv.addr, "ro", true);
    assert_ne!(c.flags & TX_READ_ONLY, 0);
    assert_eq!(c.write(1, 0, &[1; 4096]).error, Errno::Perm.code());
    c.send(CMD_WRITE_ZEROES, 0, 2, 0, 4096);
    assert_eq!(c.recv(0).error, Errno::Perm.code());
    c.send(CMD_TRIM, 0, 3, 0, 4096);
    assert_eq!(c.recv(0).error, Errno::Perm.code());
    assert_eq!(c.read(4, 0, 4096).data, vec![9; 4096]);
}

#[test]
fn many_pipelined_connections() {
    let srv = TestServer::start();
    let bdev = malloc("m", SIZE, 512);
    srv.add("disk", bdev.clone(), ExportOptions::default());
    let n = 4;
    let region = SIZE / n;
    let barrier = Arc::new(std::sync::Barrier::new(n as usize));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let addr = srv.addr;
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::connect(addr, "disk", i % 2 == 0);
                barrier.wait();
                // 64 writes in flight, then 64 reads in flight.
                let bs = 16384u64;
                let base = i * region;
                let mut expect = Vec::new();
                for k in 0..64u64 {
                    let data = random_bytes(bs as usize, i * 1000 + k);
                    c.send(
                        CMD_WRITE,
                        if k % 8 == 0 { CMD_FLAG_FUA } else { 0 },
                        k,
                        base + k * bs,
                        bs as u32,
                    );
                    c.s.write_all(&data).unwrap();
                    expect.push(data);
                }
                let mut seen = [false; 64];
                for _ in 0..64 {
                    let r = c.recv(0);
                    assert_eq!(r.error, 0);
                    seen[r.handle as usize] = true;
                }
                assert!(seen.iter().all(|&s| s));
                c.send(CMD_FLUSH, 0, 999, 0, 0);
                assert_eq!(c.recv(0).error, 0);
                barrier.wait();
                for k in 0..64u64 {
                    c.send(CMD_READ, 0, 100 + k, base + k * bs, bs as u32);
                }
                for _ in 0..64 {
                    let r = c.recv(bs as usize);
                    assert_eq!(r.error, 0);
                    assert_eq!(r.data, expect[(r.handle - 100) as usize]);
                }
                c
            })
        })
        .collect();
    let clients: Vec<RawClient> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let info = srv.server().export("disk").unwrap();
    assert_eq!(info.connections, n as usize);
    assert_eq!(srv.server().exports().len(), 1);
    for c in clients {
        c.disconnect();
    }
    // Data through the bdev.
    let got = srv
        .rt
        .block_on(async move { bdev.read_blocks(0, SIZE / 512).await.unwrap().to_vec() });
    for i in 0..n {
        for k in 0..64u64 {
            let off = (i * region + k * 16384) as usize;
            assert_eq!(
                &got[off..off + 16384],
                &random_bytes(16384, i * 1000 + k)[..]
            );
        }
    }
}

#[test]
fn remove_export_drains_connections_and_name_can_be_reused() {
    let srv = TestServer::start();
    let inner = malloc("m", SIZE, 512);
    let gate = Arc::new(GateBdev {
        inner: inner.clone(),
        open: AtomicBool::new(true),
        held: Mutex::new(Vec::new()),
        seen: AtomicUsize::new(0),
    });
    srv.add("disk", gate.clone(), ExportOptions::default());
    let mut c = RawClient::connect(srv.addr, "disk", true);
    let data = random_bytes(65536, 7);
    assert_eq!(c.write(1, 0, &data).error, 0);
    // Eight reads held in the bdev while the export is removed.
    gate.open.store(false, Ordering::SeqCst);
    let seen = gate.seen.load(Ordering::SeqCst);
    for k in 0..8u64 {
        c.send(CMD_READ, 0, 10 + k, 0, 65536);
    }
    wait_for("8 reads held", Duration::from_secs(5), || {
        gate.seen.load(Ordering::SeqCst) == seen + 8
    });
    std::thread::scope(|sc| {
        let removal = sc.spawn(|| {
            srv.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(20), srv.server().remove_export("disk"))
                    .await
            })
        });
        wait_for("export to leave the table", Duration::from_secs(5), || {
            srv.server().export("disk").is_none()
        });
        std::thread::sleep(Duration::from_millis(50));
        // New requests are refused with ESHUTDOWN while the held ones wait.
        c.send(CMD_READ, 0, 99, 0, 512);
        let r = c.recv(512);
        assert_eq!((r.handle, r.error), (99, Errno::Shutdown.code()));
        assert!(!removal.is_finished());
        // The held reads finish with their data, then the connection closes.
        gate.release();
        let mut handles = Vec::new();
        for _ in 0..8 {
            let r = c.recv(65536);
            assert_eq!(r.error, 0);
            assert_eq!(r.data, data);
            handles.push(r.handle);
        }
        handles.sort();
        assert_eq!(handles, (10..18).collect::<Vec<u64>>());
        assert!(c.is_closed());
        let info = removal.join().unwrap().unwrap().unwrap();
        assert_eq!(info.name, "disk");
    });
    let mut c = RawClient::greet(srv.addr);
    assert_eq!(c.go("disk"), REP_ERR_UNKNOWN);
    assert!(matches!(
        srv.rt.block_on(srv.server().remove_export("disk")),
        Err(nbd::NbdError::NoSuchExport { .. })
    ));
    // The same name again (a create that converges), on the same bdev.
    srv.add("disk", gate.clone(), ExportOptions::default());
    let e = srv
        .server()
        .add_export("disk", inner, ExportOptions::default())
        .unwrap_err();
    assert!(
        matches!(e, nbd::NbdError::ExportExists { ref bdev, .. } if bdev == "gated"),
        "{e}"
    );
    let mut c = RawClient::connect(srv.addr, "disk", false);
    assert_eq!(c.read(1, 0, 65536).data, data);
}

/// A bdev that holds I/O until opened, to have requests in flight on demand.
struct GateBdev {
    inner: BdevRef,
    open: AtomicBool,
    held: Mutex<Vec<(BdevIo, Completion)>>,
    seen: AtomicUsize,
}

impl Bdev for GateBdev {
    fn name(&self) -> &str {
        "gated"
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
        "gate"
    }
    fn supports(&self, kind: IoKind) -> bool {
        self.inner.supports(kind)
    }
    fn submit(&self, io: BdevIo, done: Completion) {
        self.seen.fetch_add(1, Ordering::SeqCst);
        if self.open.load(Ordering::SeqCst) {
            self.inner.submit(io, done)
        } else {
            self.held.lock().push((io, done));
        }
    }
}

impl GateBdev {
    fn release(&self) {
        self.open.store(true, Ordering::SeqCst);
        for (io, done) in std::mem::take(&mut *self.held.lock()) {
            self.inner.submit(io, done);
        }
    }
}

#[test]
fn hot_remove_fails_in_flight_with_eio_and_closes() {
    let srv = TestServer::start();
    let inner = malloc("m", SIZE, 512);
    let gate = Arc::new(GateBdev {
        inner: inner.clone(),
        open: AtomicBool::new(true),
        held: Mutex::new(Vec::new()),
        seen: AtomicUsize::new(0),
    });
    srv.add("disk", gate.clone(), ExportOptions::default());
    srv.add("other", malloc("o", SIZE, 512), ExportOptions::default());
    let mut c = RawClient::connect(srv.addr, "disk", false);
    let mut other = RawClient::connect(srv.addr, "other", false);
    let before = random_bytes(8192, 3);
    assert_eq!(c.write(1, 0, &before).error, 0);

    gate.open.store(false, Ordering::SeqCst);
    let seen = gate.seen.load(Ordering::SeqCst);
    c.send(CMD_READ, 0, 2, 0, 8192);
    c.s.write_all(&{
        let mut v = Vec::new();
        Request {
            flags: 0,
            kind: CMD_WRITE,
            handle: 3,
            offset: 65536,
            length: 4096,
        }
        .encode(&mut v);
        v.extend_from_slice(&[0x44; 4096]);
        v
    })
    .unwrap();
    c.send(CMD_FLUSH, 0, 4, 0, 0);
    wait_for("3 requests held", Duration::from_secs(5), || {
        gate.seen.load(Ordering::SeqCst) == seen + 3
    });
    let removed = srv.server().bdev_removed("gated");
    assert_eq!(removed, vec!["disk".to_string()]);
    let mut handles = Vec::new();
    for _ in 0..3 {
        let r = c.recv(8192);
        assert_eq!(r.error, Errno::Io.code(), "{r:?}");
        handles.push(r.handle);
    }
    handles.sort();
    assert_eq!(handles, vec![2, 3, 4]);
    wait_for(
        "hot-removed connection to close",
        Duration::from_secs(5),
        || c.is_closed(),
    );
    assert!(srv.server().export("disk").is_none());
    assert_eq!(srv.server().exports().len(), 1);
    // Late completions are harmless; the other export never noticed.
    gate.release();
    assert_eq!(other.write(1, 0, &[5; 512]).error, 0);
    assert_eq!(other.read(2, 0, 512).data, vec![5; 512]);
    let mut c = RawClient::greet(srv.addr);
    assert_eq!(c.go("disk"), REP_ERR_UNKNOWN);
    // What was acknowledged before the removal is on the bdev.
    let got = srv
        .rt
        .block_on(async move { inner.read_blocks(0, 16).await.unwrap().to_vec() });
    assert_eq!(got, before);
}

#[test]
fn stuck_requests_are_aborted_after_the_drain_timeout() {
    let opts = ServerOptions {
        drain_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let srv = TestServer::start_with(opts);
    let inner = malloc("m", SIZE, 512);
    let gate = Arc::new(GateBdev {
        inner: inner.clone(),
        open: AtomicBool::new(false),
        held: Mutex::new(Vec::new()),
        seen: AtomicUsize::new(0),
    });
    srv.add("disk", gate.clone(), ExportOptions::default());
    let mut c = RawClient::connect(srv.addr, "disk", true);
    c.send(CMD_READ, 0, 1, 0, 4096);
    wait_for("request held", Duration::from_secs(5), || {
        gate.seen.load(Ordering::SeqCst) == 1
    });
    let t0 = Instant::now();
    srv.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), srv.server().remove_export("disk"))
            .await
            .unwrap()
            .unwrap()
    });
    assert!(t0.elapsed() >= Duration::from_millis(250));
    let r = c.recv(4096);
    assert_eq!((r.handle, r.error), (1, Errno::Io.code()));
    assert!(c.is_closed());
    gate.release();
    let got = srv
        .rt
        .block_on(async move { inner.read_blocks(0, 8).await.unwrap().to_vec() });
    assert_eq!(got, vec![0; 4096]);
}

#[test]
fn idle_handshakes_time_out_and_shutdown_closes_everything() {
    let opts = ServerOptions {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let mut srv = TestServer::start_with(opts);
    let bdev = malloc("m", SIZE, 512);
    srv.add("disk", bdev.clone(), ExportOptions::default());
    let mut idle = RawClient::greet(srv.addr);
    let t0 = Instant::now();
    wait_for(
        "idle handshake to be closed",
        Duration::from_secs(5),
        || idle.is_closed(),
    );
    assert!(t0.elapsed() >= Duration::from_millis(250));

    let mut c = RawClient::connect(srv.addr, "disk", false);
    assert_eq!(c.write(1, 0, &[8; 512]).error, 0);
    let mut hs = RawClient::greet(srv.addr);
    wait_for("2 connections", Duration::from_secs(5), || {
        srv.server().connections() == 2
    });
    let server = srv.server.take().unwrap();
    srv.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), server.shutdown())
            .await
            .unwrap()
    });
    assert_eq!(server.connections(), 0);
    assert!(c.is_closed());
    assert!(hs.is_closed());
    assert!(
        std::net::TcpStream::connect(srv.addr).is_err() || {
            // The port may be reused by the OS only much later; a connect that
            // succeeds here must at least not get a greeting.
            let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = [0u8; 8];
            s.read(&mut b).unwrap_or(0) == 0
        }
    );
    assert!(matches!(
        server.add_export("x", bdev.clone(), ExportOptions::default()),
        Err(nbd::NbdError::ShutDown { .. })
    ));
    let got = srv
        .rt
        .block_on(async move { bdev.read_blocks(0, 1).await.unwrap().to_vec() });
    assert_eq!(got, vec![8; 512]);
}

/// A bdev that completes every request on another thread, as real devices do.
struct ThreadedBdev {
    inner: BdevRef,
    tx: Mutex<std::sync::mpsc::Sender<(BdevIo, Completion)>>,
}

impl ThreadedBdev {
    fn new(inner: BdevRef) -> Arc<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<(BdevIo, Completion)>();
        let b = inner.clone();
        std::thread::spawn(move || {
            for (io, done) in rx {
                b.submit(io, done);
            }
        });
        Arc::new(ThreadedBdev {
            inner,
            tx: Mutex::new(tx),
        })
    }
}

impl Bdev for ThreadedBdev {
    fn name(&self) -> &str {
        "threaded"
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
        "threaded"
    }
    fn supports(&self, kind: IoKind) -> bool {
        self.inner.supports(kind)
    }
    fn submit(&self, io: BdevIo, done: Completion) {
        if let Err(std::sync::mpsc::SendError((io, done))) = self.tx.lock().send((io, done)) {
            done.complete(io, Err(bdev::IoError::Removed));
        }
    }
}

#[test]
fn pipelining_far_beyond_the_connection_limits_completes() {
    // Four requests and 16 KiB of buffers per connection; 256 requests sent in
    // one go. Requests wait in the receive buffer until slots free up, which
    // happens on the bdev's own thread.
    let opts = ServerOptions {
        max_requests: 4,
        buffer_budget: 16 << 10,
        ..Default::default()
    };
    let srv = TestServer::start_with(opts);
    let inner = malloc("m", SIZE, 512);
    for (name, bdev) in [
        ("inline", inner.clone()),
        ("threaded", ThreadedBdev::new(inner.clone()) as BdevRef),
    ] {
        srv.add(name, bdev, ExportOptions::default());
        let mut c = RawClient::connect(srv.addr, name, true);
        let mut reader = RawClient {
            s: c.s.try_clone().unwrap(),
            size: c.size,
            flags: c.flags,
            structured: true,
        };
        let n = 128u64;
        let replies = std::thread::spawn(move || {
            let mut got = Vec::new();
            for _ in 0..n {
                got.push(reader.recv(0));
            }
            got
        });
        let mut burst = Vec::new();
        for k in 0..n {
            Request {
                flags: 0,
                kind: CMD_WRITE,
                handle: k,
                offset: k * 8192,
                length: 8192,
            }
            .encode(&mut burst);
            burst.extend_from_slice(&random_bytes(8192, k));
        }
        c.s.write_all(&burst).unwrap();
        let writes = replies
            .join()
            .unwrap_or_else(|_| panic!("{name}: reader failed"));
        let mut handles: Vec<u64> = writes.iter().map(|r| r.handle).collect();
        handles.sort();
        assert_eq!(handles, (0..n).collect::<Vec<u64>>(), "{name}");
        assert!(writes.iter().all(|r| r.error == 0), "{name}");
        // Then reads of what they wrote, pipelined too.
        for k in 0..n {
            c.send(CMD_READ, 0, 1000 + k, k * 8192, 8192);
        }
        let mut seen = 0;
        for _ in 0..n {
            let r = c.recv(8192);
            assert_eq!(r.error, 0);
            assert!(
                r.data == random_bytes(8192, r.handle - 1000),
                "{name}: read {}",
                r.handle
            );
            seen += 1;
        }
        assert_eq!(seen, n);
        c.disconnect();
    }
}

#[test]
fn registry_hot_remove_reaches_the_export() {
    let srv = TestServer::start();
    let reg = bdev::registry::BdevRegistry::new();
    let tracked = reg.register(malloc("regdisk", SIZE, 512), &[]).unwrap();
    srv.add("disk", tracked.clone(), ExportOptions::default());
    srv.add("other", malloc("o", SIZE, 512), ExportOptions::default());
    reg.subscribe("regdisk", Arc::new(srv.server().hot_remove_handler()))
        .unwrap();
    let mut c = RawClient::connect(srv.addr, "disk", true);
    let data = random_bytes(4096, 5);
    assert_eq!(c.write(1, 0, &data).error, 0);
    assert_eq!(c.read(2, 0, 4096).data, data);
    assert!(tracked.stats.num_write_ops.load(Ordering::Relaxed) >= 1);

    assert!(reg.hot_remove("regdisk"));
    wait_for("connection to close", Duration::from_secs(5), || {
        c.is_closed()
    });
    assert!(srv.server().export("disk").is_none());
    assert!(srv.server().export("other").is_some());
    let mut c = RawClient::greet(srv.addr);
    assert_eq!(c.go("disk"), REP_ERR_UNKNOWN);
    // The data written before the removal is on the device.
    let inner = tracked.inner().clone();
    let got = srv
        .rt
        .block_on(async move { inner.read_blocks(0, 8).await.unwrap().to_vec() });
    assert_eq!(got, data);
}
