//! corral's host against the Linux kernel's nvmet target (in the nvme-vm).
//!
//! Ignored by default: `tests/interop/host-vs-kernel.sh` boots the VM, forwards
//! a host port to the guest's nvmet and runs these with
//! `NVMF_KERNEL_TARGET=127.0.0.1:PORT cargo test --test host_kernel -- --ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod host_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{Bdev, BdevExt, BdevIo, IoBuf, IoError, IoKind};
use host_common::*;
use nvmf::host::queue::{Command, Done, IoCmd, Request};
use nvmf::host::{ControllerOpts, CtrlrState, HostController, NvmeNsBdev, Removal};
use nvmf::TransportId;
use parking_lot::Mutex;

fn target() -> (String, String, String) {
    let addr = std::env::var("NVMF_KERNEL_TARGET").unwrap_or_else(|_| "127.0.0.1:14420".into());
    let nqn =
        std::env::var("NVMF_KERNEL_NQN").unwrap_or_else(|_| "nqn.2024-01.io.nvmevm:target".into());
    let (a, p) = addr.rsplit_once(':').unwrap();
    (a.to_string(), p.to_string(), nqn)
}

fn opts(port: &str) -> ControllerOpts {
    let (a, _, nqn) = target();
    let mut o = ControllerOpts::new(TransportId::new(&a, port, &nqn));
    o.connect_timeout = Duration::from_secs(10);
    o.admin_timeout = Duration::from_secs(10);
    o.io_timeout = Duration::from_secs(20);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the kernel target of tests/interop/host-vs-kernel.sh"]
async fn kernel_connect_verified_io_disconnect() {
    init_tracing();
    let (_, port, nqn) = target();
    for (i, (digests, queues)) in [(false, 1u16), (true, 2), (false, 2), (true, 1)]
        .into_iter()
        .enumerate()
    {
        let t0 = Instant::now();
        let mut o = opts(&port);
        o.hdgst = digests;
        o.ddgst = digests;
        o.num_io_queues = queues;
        o.io_queue_depth = 32;
        let c = HostController::connect(o).await.unwrap();
        assert_eq!(c.state(), CtrlrState::Enabled);
        assert_eq!(c.queues().len(), queues as usize);
        assert_ne!(c.cntlid(), 0xFFFF);
        let id = c.identify();
        assert_eq!(id.subnqn, nqn);
        let ns = c.namespaces();
        assert_eq!(ns.len(), 1, "{ns:?}");
        assert!(
            ns[0].num_blocks > 0 && ns[0].nguid.or(ns[0].uuid.map(|u| *u.as_bytes())).is_some()
        );
        let removed = Arc::new(Mutex::new(None));
        let r2 = removed.clone();
        c.on_removal(move |why| *r2.lock() = Some(why));

        let b: Arc<dyn Bdev> = Arc::new(NvmeNsBdev::new(&c, 1, "kn1").unwrap());
        assert_eq!(b.product_name(), "NVMe disk");
        assert_eq!(b.num_blocks(), ns[0].num_blocks);
        let model = Arc::new(Mutex::new(Model::new(
            b.block_size() as u64,
            b.num_blocks(),
        )));
        random_verified_io(b.clone(), model.clone(), 100 + i as u64, 6, 8, 1 << 20).await;
        admin_like_io(&*b, &model).await;
        verify_all(&*b, &model).await;
        c.disconnect().await.unwrap();
        assert_eq!(c.state(), CtrlrState::Deleted);
        assert_eq!(*removed.lock(), Some(Removal::Disconnected));
        assert_eq!(b.read_blocks(0, 1).await.unwrap_err(), IoError::Removed);
        eprintln!(
            "digests {digests} queues {queues}: mdts {} B, in-capsule {} B, {:?}",
            c.max_xfer(),
            c.icd_max(),
            t0.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the kernel target of tests/interop/host-vs-kernel.sh"]
async fn kernel_reconnect_holds_io_across_an_outage() {
    init_tracing();
    let (a, port, _) = target();
    let proxy = Proxy::start(format!("{a}:{port}")).await;
    let mut o = opts(&proxy.port.to_string());
    o.num_io_queues = 2;
    o.ctrlr_loss_timeout_sec = 20;
    o.reconnect_delay_sec = 1;
    o.fast_io_fail_timeout_sec = 10;
    let c = HostController::connect(o).await.unwrap();
    let b: Arc<dyn Bdev> = Arc::new(NvmeNsBdev::new(&c, 1, "kn1").unwrap());
    let model = Arc::new(Mutex::new(Model::new(
        b.block_size() as u64,
        b.num_blocks(),
    )));
    let cntlid = c.cntlid();

    // I/O runs while the connection is cut for ~3 s, then comes back.
    let io = tokio::spawn(random_verified_io(
        b.clone(),
        model.clone(),
        7,
        30,
        6,
        256 << 10,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    wait_state(&c, CtrlrState::Resetting, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(matches!(
        c.state(),
        CtrlrState::Resetting | CtrlrState::ReconnectIsDelayed
    ));
    assert!(!c.io_failing_fast());
    proxy.restore();
    wait_state(&c, CtrlrState::Enabled, Duration::from_secs(10)).await;
    tokio::time::timeout(Duration::from_secs(60), io)
        .await
        .expect("I/O finished")
        .unwrap();
    verify_all(&*b, &model).await;
    eprintln!("reconnected: cntlid {cntlid} -> {}", c.cntlid());
    c.disconnect().await.unwrap();
}

/// Counts completions by result.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    nopath: AtomicUsize,
    other: AtomicUsize,
}

impl bdev::IoSink for Tally {
    fn complete(&self, _tag: u64, _io: BdevIo, r: Result<(), IoError>) {
        match r {
            Ok(()) => &self.ok,
            Err(IoError::NoPath) => &self.nopath,
            Err(_) => &self.other,
        }
        .fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the kernel target of tests/interop/host-vs-kernel.sh"]
async fn kernel_target_that_never_returns_is_deleted_after_ctrlr_loss() {
    init_tracing();
    let (a, port, _) = target();
    let proxy = Proxy::start(format!("{a}:{port}")).await;
    let mut o = opts(&proxy.port.to_string());
    o.ctrlr_loss_timeout_sec = 4;
    o.reconnect_delay_sec = 1;
    o.fast_io_fail_timeout_sec = 2;
    let c = HostController::connect(o).await.unwrap();
    let b = NvmeNsBdev::new(&c, 1, "kn1").unwrap();
    b.write_blocks(0, &[7u8; 4096], false).await.unwrap();
    let removed = Arc::new(Mutex::new(None));
    let r2 = removed.clone();
    c.on_removal(move |why| *r2.lock() = Some(why));

    let t0 = Instant::now();
    proxy.cut();
    wait_state(&c, CtrlrState::Resetting, Duration::from_secs(15)).await;
    let tally = Arc::new(Tally::default());
    for i in 0..8 {
        let io = BdevIo::read(i * 8, 8, IoBuf::zeroed(4096));
        b.submit(io, bdev::Completion::new(tally.clone(), i));
    }
    // held, not failed, before fast_io_fail
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        tally.ok.load(Ordering::SeqCst) + tally.nopath.load(Ordering::SeqCst),
        0
    );
    let mut rx = c.subscribe();
    tokio::time::timeout(
        Duration::from_secs(20),
        rx.wait_for(|s| *s == CtrlrState::Deleted),
    )
    .await
    .expect("deleted after ctrlr_loss")
    .unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "deleted too early: {took:?}"
    );
    assert_eq!(
        tally.nopath.load(Ordering::SeqCst),
        8,
        "held I/O failed with NoPath"
    );
    assert_eq!(tally.other.load(Ordering::SeqCst), 0);
    assert_eq!(*removed.lock(), Some(Removal::CtrlrLoss));
    assert_eq!(c.removal(), Some(Removal::CtrlrLoss));
    assert_eq!(b.read_blocks(0, 1).await.unwrap_err(), IoError::Removed);
    eprintln!("deleted {took:?} after the cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the kernel target of tests/interop/host-vs-kernel.sh"]
async fn kernel_qpair_driven_by_one_task() {
    init_tracing();
    let (_, port, _) = target();
    let mut o = opts(&port);
    o.num_io_queues = 1;
    o.extra_io_qpairs = 1;
    let c = HostController::connect(o).await.unwrap();
    let ns = c.namespaces()[0].clone();
    let mut qp = c.alloc_io_qpair::<u64>(16).await.unwrap();
    assert_eq!(qp.qid(), 2);
    let bs = ns.block_size as u64;
    let per = 8u64; // 4 KiB at 512 B blocks
    let n = 256u64;
    let mut out: Vec<Done<u64>> = Vec::new();
    let mut next = 0u64;
    let mut finished = 0u64;
    // writes at QD 16, each block stamped with its LBA
    while finished < n {
        while next < n && qp.has_room() {
            let mut buf = IoBuf::zeroed((per * bs) as usize);
            for (k, blk) in buf.chunks_mut(bs as usize).enumerate() {
                blk[..8].copy_from_slice(&(next * per + k as u64).to_le_bytes());
            }
            let cmd = IoCmd {
                kind: IoKind::Write,
                nsid: ns.nsid,
                slba: next * per,
                nblocks: per,
                block_size: ns.block_size,
                fua: false,
            };
            qp.submit(Request::new(Command::Io(cmd), buf, next))
                .map_err(|_| ())
                .unwrap();
            next += 1;
        }
        qp.poll(&mut out).await.unwrap();
        for d in out.drain(..) {
            d.result.unwrap();
            finished += 1;
        }
    }
    // and read back
    let (mut next, mut finished) = (0u64, 0u64);
    while finished < n {
        while next < n && qp.has_room() {
            let cmd = IoCmd {
                kind: IoKind::Read,
                nsid: ns.nsid,
                slba: next * per,
                nblocks: per,
                block_size: ns.block_size,
                fua: false,
            };
            qp.submit_io(cmd, IoBuf::zeroed((per * bs) as usize), next)
                .map_err(|_| ())
                .unwrap();
            next += 1;
        }
        qp.poll(&mut out).await.unwrap();
        for d in out.drain(..) {
            d.result.unwrap();
            for (k, blk) in d.req.buf.chunks(bs as usize).enumerate() {
                assert_eq!(
                    u64::from_le_bytes(blk[..8].try_into().unwrap()),
                    d.req.ctx * per + k as u64
                );
            }
            finished += 1;
        }
    }
    drop(qp);
    c.disconnect().await.unwrap();
}
