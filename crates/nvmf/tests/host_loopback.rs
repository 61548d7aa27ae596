//! corral's host against corral's target on loopback: concurrent verified I/O
//! over several queues with and without digests, splitting at MDTS, ACL
//! rejection, keep-alive, a target restarted during I/O (recovered by
//! reconnect without a failed I/O), and a target that never returns (the
//! controller is deleted after ctrlr_loss and its consumers are told).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod host_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::malloc::MallocBdev;
use bdev::{Bdev, BdevExt, BdevIo, IoBuf, IoError};
use host_common::*;
use nvme_wire::status::CommandSpecificStatus;
use nvmf::host::{ControllerOpts, CtrlrState, HostController, HostError, NvmeNsBdev, Removal};
use nvmf::target::tcp::TcpTarget;
use nvmf::target::{ListenAddress, SubsystemConfig, Target, TransportOpts};
use nvmf::TransportId;
use parking_lot::Mutex;

const NQN: &str = "nqn.2024-01.io.corral:host-loopback";
const BLOCKS: u64 = 64 * 2048; // 64 MiB of 512 B blocks

/// A target serving one malloc namespace; `restart` brings it back on the same
/// port with the same data, as a target process restarted on persistent storage.
struct Tgt {
    tcp: Option<Arc<TcpTarget>>,
    port: u16,
    bdev: Arc<MallocBdev>,
    opts: TransportOpts,
    allow_any: bool,
}

impl Tgt {
    async fn start(opts: TransportOpts, allow_any: bool) -> Tgt {
        let bdev = Arc::new(MallocBdev::new("m0", BLOCKS, 512, None).unwrap());
        let mut t = Tgt {
            tcp: None,
            port: 0,
            bdev,
            opts,
            allow_any,
        };
        t.up().await;
        t
    }
    async fn up(&mut self) {
        let target = Target::new(self.opts.clone());
        let mut cfg = SubsystemConfig::new(NQN);
        cfg.allow_any_host = self.allow_any;
        let sub = target.create_subsystem(cfg).unwrap();
        sub.add_namespace(self.bdev.clone(), Some(1), None, None, false)
            .unwrap();
        let tcp = TcpTarget::new(target);
        let mut last = None;
        for _ in 0..50 {
            match tcp
                .add_listener(NQN, ListenAddress::new("127.0.0.1", &self.port.to_string()))
                .await
            {
                Ok(a) => {
                    self.port = a.trsvcid.parse().unwrap();
                    self.tcp = Some(tcp);
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("listen on {}: {last:?}", self.port);
    }
    fn down(&mut self) {
        if let Some(t) = self.tcp.take() {
            t.shutdown();
        }
    }
    fn opts(&self) -> ControllerOpts {
        let mut o = ControllerOpts::new(TransportId::new("127.0.0.1", &self.port.to_string(), NQN));
        o.connect_timeout = Duration::from_secs(5);
        o.admin_timeout = Duration::from_secs(5);
        o.io_timeout = Duration::from_secs(10);
        o
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        self.down();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_verified_io_over_several_queues_digests_on_and_off() {
    init_tracing();
    for digests in [false, true] {
        // With digests, also a small MDTS and in-capsule size, so that large
        // I/O is split and mid-size writes go through R2T.
        let topts = if digests {
            TransportOpts {
                max_io_size: 128 << 10,
                in_capsule_data_size: 8192,
                max_h2c_data: 32 << 10,
                max_c2h_data: 16 << 10,
                // the target's busy-poll window, on the run where the host has none
                io_poll_us: 50,
                ..TransportOpts::default()
            }
        } else {
            TransportOpts::default()
        };
        let t = Tgt::start(topts, true).await;
        let mut o = t.opts();
        o.hdgst = digests;
        o.ddgst = digests;
        o.num_io_queues = 4;
        o.io_queue_depth = 32;
        // the busy-poll window of the queue tasks, on one of the two runs
        o.io_poll_us = if digests { 0 } else { 30 };
        let c = HostController::connect(o).await.unwrap();
        assert_eq!(c.queues().len(), 4);
        let snap = c.snapshot();
        assert_eq!(snap.state, CtrlrState::Enabled);
        assert_eq!((snap.hdgst, snap.ddgst), (digests, digests));
        assert_eq!(snap.model_number, "corral");
        assert_eq!(snap.trid.subnqn, NQN);
        assert_eq!(snap.namespaces.len(), 1);
        if digests {
            assert_eq!(c.max_xfer(), 128 << 10);
            assert_eq!(c.icd_max(), 8192);
        }
        let b: Arc<dyn Bdev> = Arc::new(NvmeNsBdev::new(&c, 1, "c0n1").unwrap());
        assert_eq!(b.num_blocks(), BLOCKS);
        let model = Arc::new(Mutex::new(Model::new(512, BLOCKS)));
        let t0 = Instant::now();
        random_verified_io(b.clone(), model.clone(), digests as u64, 25, 24, 1 << 20).await;
        admin_like_io(&*b, &model).await;
        verify_all(&*b, &model).await;
        // what the target holds is what the host wrote
        let raw = t.bdev.read_blocks(0, BLOCKS).await.unwrap();
        model.lock().check(0, &raw);
        eprintln!("digests {digests}: {:?}", t0.elapsed());
        c.disconnect().await.unwrap();
        assert_eq!(c.state(), CtrlrState::Deleted);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_not_on_the_allow_list_is_rejected() {
    init_tracing();
    let t = Tgt::start(TransportOpts::default(), false).await;
    let t0 = Instant::now();
    let e = HostController::connect(t.opts()).await.unwrap_err();
    match &e {
        HostError::Status { cmd, status, .. } => {
            assert_eq!(*cmd, "Connect");
            assert_eq!(
                (status.sct, status.sc),
                (1, CommandSpecificStatus::ConnectInvalidHost as u8)
            );
            assert!(status.dnr);
        }
        e => panic!("{e}"),
    }
    assert!(!e.is_transient());
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "rejected at once, not timed out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_keeps_an_idle_controller() {
    init_tracing();
    let t = Tgt::start(TransportOpts::default(), true).await;
    let mut o = t.opts();
    o.kato_ms = 1000;
    o.ctrlr_loss_timeout_sec = 5;
    o.reconnect_delay_sec = 1;
    let c = HostController::connect(o).await.unwrap();
    let rx = c.subscribe();
    let cntlid = c.cntlid();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !rx.has_changed().unwrap(),
        "no reset while idle: {}",
        c.state()
    );
    assert_eq!(c.cntlid(), cntlid);
    let b = NvmeNsBdev::new(&c, 1, "c0n1").unwrap();
    b.write_blocks(5, &[1u8; 512], false).await.unwrap();
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_restarted_during_io_loses_no_io() {
    init_tracing();
    let mut t = Tgt::start(TransportOpts::default(), true).await;
    let mut o = t.opts();
    o.num_io_queues = 2;
    o.ctrlr_loss_timeout_sec = 15;
    o.reconnect_delay_sec = 1;
    o.fast_io_fail_timeout_sec = 10;
    let c = HostController::connect(o).await.unwrap();
    let b: Arc<dyn Bdev> = Arc::new(NvmeNsBdev::new(&c, 1, "c0n1").unwrap());
    let model = Arc::new(Mutex::new(Model::new(512, BLOCKS)));
    let io = tokio::spawn(random_verified_io(
        b.clone(),
        model.clone(),
        11,
        // Enough rounds that the target goes down in the middle of them even
        // on a fast, quiet machine (400 once finished within the 300 ms).
        4000,
        16,
        256 << 10,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !io.is_finished(),
        "the I/O ended before the target went down"
    );
    t.down();
    wait_state(&c, CtrlrState::Resetting, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(matches!(
        c.state(),
        CtrlrState::Resetting | CtrlrState::ReconnectIsDelayed
    ));
    t.up().await;
    wait_state(&c, CtrlrState::Enabled, Duration::from_secs(5)).await;
    tokio::time::timeout(Duration::from_secs(60), io)
        .await
        .expect("I/O finished")
        .unwrap();
    verify_all(&*b, &model).await;
    let raw = t.bdev.read_blocks(0, BLOCKS).await.unwrap();
    model.lock().check(0, &raw);
    c.disconnect().await.unwrap();
}

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
async fn target_that_never_returns_deletes_the_controller_after_ctrlr_loss() {
    init_tracing();
    let mut t = Tgt::start(TransportOpts::default(), true).await;
    let mut o = t.opts();
    o.ctrlr_loss_timeout_sec = 4;
    o.reconnect_delay_sec = 1;
    o.fast_io_fail_timeout_sec = 2;
    let c = HostController::connect(o).await.unwrap();
    let b = NvmeNsBdev::new(&c, 1, "c0n1").unwrap();
    b.write_blocks(0, &[9u8; 4096], false).await.unwrap();
    let told = Arc::new(Mutex::new(Vec::new()));
    let t2 = told.clone();
    c.on_removal(move |why| t2.lock().push(why));
    let mut rx = c.subscribe();

    let t0 = Instant::now();
    t.down();
    wait_state(&c, CtrlrState::Resetting, Duration::from_secs(5)).await;
    let tally = Arc::new(Tally::default());
    for i in 0..16 {
        b.submit(
            BdevIo::read(i * 8, 8, IoBuf::zeroed(4096)),
            bdev::Completion::new(tally.clone(), i),
        );
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        tally.nopath.load(Ordering::SeqCst),
        0,
        "held before fast_io_fail"
    );
    tokio::time::timeout(Duration::from_secs(3), async {
        while !c.io_failing_fast() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("fast_io_fail");
    let at_fail = t0.elapsed();
    assert!(
        at_fail >= Duration::from_secs(2) && at_fail < Duration::from_millis(3500),
        "{at_fail:?}"
    );
    assert_eq!(
        tally.nopath.load(Ordering::SeqCst),
        16,
        "held I/O failed at fast_io_fail"
    );
    // new I/O fails at once now
    assert_eq!(b.read_blocks(0, 1).await.unwrap_err(), IoError::NoPath);
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| *s == CtrlrState::Deleted),
    )
    .await
    .unwrap()
    .unwrap();
    let at_loss = t0.elapsed();
    assert!(
        at_loss >= Duration::from_secs(4) && at_loss < Duration::from_secs(6),
        "{at_loss:?}"
    );
    assert_eq!(*told.lock(), vec![Removal::CtrlrLoss]);
    assert_eq!(
        tally.ok.load(Ordering::SeqCst) + tally.other.load(Ordering::SeqCst),
        0
    );
    assert_eq!(b.read_blocks(0, 1).await.unwrap_err(), IoError::Removed);
    // a consumer arriving late is told at once
    let late = Arc::new(Mutex::new(None));
    let l2 = late.clone();
    c.on_removal(move |why| *l2.lock() = Some(why));
    assert_eq!(*late.lock(), Some(Removal::CtrlrLoss));
    // and the data written before is intact on the target
    assert!(t
        .bdev
        .read_blocks(0, 8)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrlr_loss_zero_fails_after_one_attempt_and_stays_failed() {
    init_tracing();
    let mut t = Tgt::start(TransportOpts::default(), true).await;
    let c = HostController::connect(t.opts()).await.unwrap();
    let b = NvmeNsBdev::new(&c, 1, "c0n1").unwrap();
    t.down();
    wait_state(&c, CtrlrState::Failed, Duration::from_secs(10)).await;
    assert_eq!(b.read_blocks(0, 1).await.unwrap_err(), IoError::NoPath);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.state(), CtrlrState::Failed, "no further reconnect");
    // a manual reset once the target is back recovers it
    t.up().await;
    c.reset();
    wait_state(&c, CtrlrState::Enabled, Duration::from_secs(10)).await;
    b.write_blocks(3, &[4u8; 512], true).await.unwrap();
    assert_eq!(&b.read_blocks(3, 1).await.unwrap()[..], &[4u8; 512][..]);
    c.delete().await.unwrap();
    assert_eq!(c.removal(), Some(Removal::Deleted));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_connection_times_out_and_reconnects_without_failed_io() {
    init_tracing();
    let t = Tgt::start(TransportOpts::default(), true).await;
    let proxy = Proxy::start(format!("127.0.0.1:{}", t.port)).await;
    let mut o = t.opts();
    o.trid = TransportId::new("127.0.0.1", &proxy.port.to_string(), NQN);
    o.num_io_queues = 2;
    o.kato_ms = 2000;
    o.admin_timeout = Duration::from_secs(2);
    o.io_timeout = Duration::from_secs(2);
    o.connect_timeout = Duration::from_secs(2);
    o.ctrlr_loss_timeout_sec = 30;
    o.reconnect_delay_sec = 1;
    o.fast_io_fail_timeout_sec = 20;
    let c = HostController::connect(o).await.unwrap();
    let cntlid = c.cntlid();
    let b: Arc<dyn Bdev> = Arc::new(NvmeNsBdev::new(&c, 1, "c0n1").unwrap());
    let model = Arc::new(Mutex::new(Model::new(512, BLOCKS)));
    let io = tokio::spawn(random_verified_io(
        b.clone(),
        model.clone(),
        5,
        300,
        8,
        128 << 10,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Nothing moves, nothing closes: only timeouts can notice.
    let t0 = Instant::now();
    proxy.freeze();
    wait_state(&c, CtrlrState::Resetting, Duration::from_secs(6)).await;
    let noticed = t0.elapsed();
    // reconnect attempts hang too, bounded by the connect timeout
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(matches!(
        c.state(),
        CtrlrState::Resetting | CtrlrState::ReconnectIsDelayed
    ));
    proxy.thaw();
    wait_state(&c, CtrlrState::Enabled, Duration::from_secs(10)).await;
    tokio::time::timeout(Duration::from_secs(60), io)
        .await
        .expect("I/O finished")
        .unwrap();
    verify_all(&*b, &model).await;
    eprintln!(
        "hang noticed after {noticed:?}; cntlid {cntlid} -> {}",
        c.cntlid()
    );
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_changes_reach_the_host_through_async_events() {
    init_tracing();
    let t = Tgt::start(TransportOpts::default(), true).await;
    let c = HostController::connect(t.opts()).await.unwrap();
    let b1 = NvmeNsBdev::new(&c, 1, "c0n1").unwrap();
    assert_eq!(c.namespaces().len(), 1);
    let sub = t.tcp.as_ref().unwrap().target().subsystem(NQN).unwrap();
    let m2 = Arc::new(MallocBdev::new("m1", 4096, 4096, None).unwrap());
    sub.add_namespace(m2.clone(), Some(2), None, None, false)
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        while c.namespace(2).is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        seen.is_ok(),
        "namespace 2 did not appear: {:?}",
        c.namespaces()
    );
    let n2 = c.namespace(2).unwrap();
    assert_eq!((n2.block_size, n2.num_blocks), (4096, 4096));
    let b2 = NvmeNsBdev::new(&c, 2, "c0n2").unwrap();
    b2.write_blocks(7, &[3u8; 8192], false).await.unwrap();
    assert!(m2.read_blocks(7, 2).await.unwrap().iter().all(|&x| x == 3));
    // and one going away
    sub.remove_namespace(1).unwrap();
    let gone = tokio::time::timeout(Duration::from_secs(5), async {
        while c.namespaces().iter().any(|n| n.nsid == 1) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "namespace 1 still listed");
    assert_eq!(b1.read_blocks(0, 1).await.unwrap_err(), IoError::Removed);
    assert_eq!(c.state(), CtrlrState::Enabled);
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_deletes_the_controller() {
    init_tracing();
    let t = Tgt::start(TransportOpts::default(), true).await;
    let c = HostController::connect(t.opts()).await.unwrap();
    let mut rx = c.subscribe();
    let b = NvmeNsBdev::new(&c, 1, "c0n1").unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        *rx.borrow_and_update(),
        CtrlrState::Enabled,
        "the bdev still holds it"
    );
    drop(b);
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| *s == CtrlrState::Deleted),
    )
    .await
    .unwrap()
    .unwrap();
    // and the target saw the connections go
    let tcp = t.tcp.as_ref().unwrap().clone();
    tokio::time::timeout(Duration::from_secs(5), async {
        while tcp.num_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("target connections closed");
}

/// A listener that answers each connection with `icresp` (if any) and then
/// either closes or keeps the socket open in silence.
async fn fake_target(icresp: Option<nvme_wire::pdu::IcResp>, close_after: bool) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = [0u8; 128];
                if s.read_exact(&mut req).await.is_err() {
                    return;
                }
                if let Some(r) = icresp {
                    let mut out = Vec::new();
                    nvme_wire::pdu::Encoder::default().pdu(
                        &nvme_wire::PduHeader::ICResp(r),
                        0,
                        &[],
                        &mut out,
                    );
                    let _ = s.write_all(&out).await;
                }
                if close_after {
                    return;
                }
                let mut sink = [0u8; 4096];
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_fails_fast_and_bounded_on_bad_or_silent_peers() {
    init_tracing();
    let mk = |port: u16| {
        let mut o = ControllerOpts::new(TransportId::new("127.0.0.1", &port.to_string(), NQN));
        o.connect_timeout = Duration::from_millis(800);
        o
    };
    let good = nvme_wire::pdu::IcResp {
        pfv: 0,
        cpda: 0,
        digest: Default::default(),
        maxh2cdata: 131072,
    };
    // maxh2cdata below 4096 is refused
    let p = fake_target(
        Some(nvme_wire::pdu::IcResp {
            maxh2cdata: 1024,
            ..good
        }),
        false,
    )
    .await;
    let e = HostController::connect(mk(p)).await.unwrap_err();
    assert!(
        matches!(&e, HostError::Handshake { reason, .. } if reason.contains("maxh2cdata")),
        "{e}"
    );
    // digests the host did not ask for are refused
    let dg = nvme_wire::DigestConfig {
        header: true,
        data: false,
    };
    let p = fake_target(Some(nvme_wire::pdu::IcResp { digest: dg, ..good }), false).await;
    let e = HostController::connect(mk(p)).await.unwrap_err();
    assert!(matches!(e, HostError::Handshake { .. }), "{e}");
    // a peer that never answers the ICReq, or never answers Connect: bounded by connect_timeout
    for ic in [None, Some(good)] {
        let p = fake_target(ic, false).await;
        let t0 = Instant::now();
        let e = HostController::connect(mk(p)).await.unwrap_err();
        assert!(matches!(e, HostError::Timeout { .. }), "{e}");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(700) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }
    // a peer that closes after ICResp: fails at once
    let p = fake_target(Some(good), true).await;
    let t0 = Instant::now();
    let e = HostController::connect(mk(p)).await.unwrap_err();
    assert!(
        matches!(e, HostError::Closed { .. } | HostError::Io { .. }),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_millis(700));
    // nobody listening
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    drop(l);
    let e = HostController::connect(mk(p)).await.unwrap_err();
    assert!(matches!(e, HostError::Connect { .. }), "{e}");
    assert!(e.is_transient());
    // invalid options never touch the network
    let mut o = mk(p);
    o.ctrlr_loss_timeout_sec = 5;
    let e = HostController::connect(o).await.unwrap_err();
    assert!(matches!(e, HostError::Opts { .. }), "{e}");
    assert!(!e.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_finishes_io_in_flight_and_refuses_new() {
    init_tracing();
    let t = Tgt::start(TransportOpts::default(), true).await;
    let mut o = t.opts();
    o.num_io_queues = 2;
    let c = HostController::connect(o).await.unwrap();
    let b = NvmeNsBdev::new(&c, 1, "c0n1").unwrap();
    let tally = Arc::new(Tally::default());
    for i in 0..64u64 {
        let io = if i % 2 == 0 {
            BdevIo::read(i * 256, 256, IoBuf::zeroed(128 << 10))
        } else {
            BdevIo::write(
                i * 256,
                256,
                IoBuf::from_slice(&[i as u8; 128 << 10]),
                false,
            )
        };
        b.submit(io, bdev::Completion::new(tally.clone(), i));
    }
    c.disconnect().await.unwrap();
    assert_eq!(
        tally.ok.load(Ordering::SeqCst),
        64,
        "everything submitted before disconnect finished"
    );
    assert_eq!(c.state(), CtrlrState::Deleted);
    assert_eq!(c.removal(), Some(Removal::Disconnected));
    assert_eq!(b.read_blocks(0, 1).await.unwrap_err(), IoError::Removed);
    for i in (1..64u64).step_by(2) {
        let got = t.bdev.read_blocks(i * 256, 256).await.unwrap();
        assert!(
            got.iter().all(|&x| x == i as u8),
            "write {i} reached the target"
        );
    }
    // the target saw the controller go
    let tcp = t.tcp.as_ref().unwrap().clone();
    tokio::time::timeout(Duration::from_secs(5), async {
        while tcp.num_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("target connections closed");
    // disconnect twice is fine
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_bytes_from_the_target_are_caught_and_recovered() {
    init_tracing();
    let t = Tgt::start(TransportOpts::default(), true).await;
    let proxy = Proxy::start(format!("127.0.0.1:{}", t.port)).await;
    let mut o = t.opts();
    o.trid = TransportId::new("127.0.0.1", &proxy.port.to_string(), NQN);
    o.hdgst = true;
    o.ddgst = true;
    o.num_io_queues = 2;
    o.ctrlr_loss_timeout_sec = 20;
    o.reconnect_delay_sec = 1;
    o.fast_io_fail_timeout_sec = 10;
    let c = HostController::connect(o).await.unwrap();
    let b: Arc<dyn Bdev> = Arc::new(NvmeNsBdev::new(&c, 1, "c0n1").unwrap());
    let model = Arc::new(Mutex::new(Model::new(512, BLOCKS)));
    random_verified_io(b.clone(), model.clone(), 21, 3, 8, 1 << 20).await;
    // A flipped byte in data fails the data digest (the read is retried); in a
    // header it fails the header digest (the connection is reset). Either way
    // no read fails and none returns wrong data.
    proxy.corrupt(5);
    random_verified_io(b.clone(), model.clone(), 22, 12, 8, 1 << 20).await;
    assert_eq!(proxy.corruptions_left(), 0, "the corruption happened");
    verify_all(&*b, &model).await;
    c.disconnect().await.unwrap();
}
