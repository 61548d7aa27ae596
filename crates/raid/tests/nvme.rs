//! The raid1 proof with real NVMe/TCP: raid1 over three nvme bdevs
//! (corral's host) attached over loopback to three corral targets, under
//! concurrent verified load. One target dies: I/O goes on and the member is
//! removed within the configured fast-I/O-fail / controller-loss timeouts. A
//! fresh member (a new target) is added: the rebuild completes under load and
//! the three members hold identical data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::malloc::MallocBdev;
use bdev::registry::BdevRegistry;
use bdev::Bdev;
use common::*;
use nvmf::host::{ControllerOpts, HostController, NvmeNsBdev};
use nvmf::target::tcp::TcpTarget;
use nvmf::target::{ListenAddress, SubsystemConfig, Target, TransportOpts};
use nvmf::TransportId;
use raid::{CreateParams, RaidModule, RaidOpts, RecordedState};

const BLOCKS: u64 = 64 * 2048; // 64 MiB
const CTRLR_LOSS: i32 = 2;
const RECONNECT_DELAY: u32 = 1;
const FAST_IO_FAIL: u32 = 1;

struct Replica {
    tcp: Arc<TcpTarget>,
    port: String,
    nqn: String,
}

async fn start_replica(i: usize) -> Replica {
    let target = Target::new(TransportOpts::default());
    let nqn = format!("nqn.2023-01.io.corral:raidtest-r{i}");
    let mut cfg = SubsystemConfig::new(&nqn);
    cfg.allow_any_host = true;
    let sub = target.create_subsystem(cfg).unwrap();
    let m = MallocBdev::new(&format!("replica{i}"), BLOCKS, 512, None).unwrap();
    sub.add_namespace(Arc::new(m), None, None, None, false)
        .unwrap();
    let tcp = TcpTarget::new(target);
    let la = tcp
        .add_listener(&nqn, ListenAddress::new("127.0.0.1", "0"))
        .await
        .unwrap();
    Replica {
        tcp,
        port: la.trsvcid,
        nqn,
    }
}

/// What `bdev_nvme_attach_controller` does for the raid: connect with
/// Longhorn-like knobs (smaller), register `<name>n1`, and hot-remove it when
/// the controller is deleted after ctrlr_loss_timeout.
async fn attach(reg: &Arc<BdevRegistry>, r: &Replica, name: &str) -> HostController {
    let mut o = ControllerOpts::new(TransportId::new("127.0.0.1", &r.port, &r.nqn));
    o.ctrlr_loss_timeout_sec = CTRLR_LOSS;
    o.reconnect_delay_sec = RECONNECT_DELAY;
    o.fast_io_fail_timeout_sec = FAST_IO_FAIL;
    o.num_io_queues = 2;
    o.io_queue_depth = 64;
    o.connect_timeout = Duration::from_secs(2);
    o.admin_timeout = Duration::from_secs(2);
    o.io_timeout = Duration::from_secs(5);
    let c = HostController::connect(o).await.unwrap();
    let bname = format!("{name}n1");
    reg.register(
        Arc::new(NvmeNsBdev::new(&c, 1, bname.clone()).unwrap()),
        &[],
    )
    .unwrap();
    let r2 = reg.clone();
    c.on_removal(move |why| {
        tracing::info!(bdev = %bname, ?why, "controller removed; hot-removing its bdev");
        r2.hot_remove(&bname);
    });
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid1_over_nvme_tcp_loses_a_replica_and_rebuilds_a_new_one() {
    init_tracing();
    let t_all = Instant::now();
    let reg = BdevRegistry::new();
    let dir = tmpdir("nvme");
    let module = RaidModule::new(
        reg.clone(),
        &dir,
        RaidOpts {
            drain_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .unwrap();
    let mut reps = Vec::new();
    let mut ctrls = Vec::new();
    for i in 1..=3 {
        let r = start_replica(i).await;
        ctrls.push(attach(&reg, &r, &format!("r{i}")).await);
        reps.push(Some(r));
    }
    let raid = module
        .create(CreateParams::raid1("vol", &["r1n1", "r2n1", "r3n1"]))
        .await
        .unwrap();
    assert_eq!(raid.num_blocks(), BLOCKS);
    let rb: Arc<dyn Bdev> = reg.get("vol").unwrap();

    let load = Load::start(rb.clone(), 8, BLOCKS / 8, 11);
    load.wait_ops(2000, Duration::from_secs(30)).await;

    // Kill replica 2's target: connections close, the listener is gone.
    let dead = reps[1].take().unwrap();
    dead.tcp.shutdown();
    drop(dead);
    let killed = Instant::now();
    wait_until("member r2n1 removed", Duration::from_secs(10), || {
        raid.status().base_bdevs_list[1].state == "out_of_sync"
    })
    .await;
    let removed_after = killed.elapsed();
    let bound = Duration::from_secs(CTRLR_LOSS as u64 + 2);
    assert!(
        removed_after <= bound,
        "member removed after {removed_after:?} (bound {bound:?})"
    );
    // the controller is deleted after ctrlr_loss and its bdev hot-removed
    wait_until(
        "r2n1 hot-removed",
        Duration::from_secs(CTRLR_LOSS as u64 + 6),
        || reg.get("r2n1").is_none(),
    )
    .await;
    let gone_after = killed.elapsed();
    let st = raid.status();
    let reason = st.base_bdevs_list[1].reason.clone().unwrap();
    assert_eq!(st.state, raid::RaidState::Online);
    assert_eq!(st.num_base_bdevs_in_sync, 2);
    let rec = raid::read_record(&dir, "vol").unwrap().unwrap();
    assert_eq!(rec.member("r2n1").unwrap().state, RecordedState::OutOfSync);
    // I/O goes on, degraded
    load.wait_ops(2000, Duration::from_secs(30)).await;

    // A fresh replica joins and is rebuilt under load.
    let r4 = start_replica(4).await;
    ctrls.push(attach(&reg, &r4, "r4").await);
    reps.push(Some(r4));
    let t_rebuild = Instant::now();
    module.add_base_bdev("vol", "r4n1").await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(60), raid.wait_rebuild())
        .await
        .unwrap();
    assert_eq!(res, Some(Ok(())));
    let rebuild_secs = t_rebuild.elapsed().as_secs_f64();
    load.wait_ops(1000, Duration::from_secs(30)).await;
    let models = load.stop().await;
    verify_models(&*rb, &models).await;

    let st = raid.status();
    assert_eq!(
        st.base_bdevs_list[1].member.as_deref(),
        Some("r4n1"),
        "the freed slot is reused"
    );
    assert_eq!(st.base_bdevs_list[1].state, "online");
    assert_eq!(st.num_base_bdevs_in_sync, 3);
    let rec = raid::read_record(&dir, "vol").unwrap().unwrap();
    assert_eq!(rec.member("r4n1").unwrap().state, RecordedState::Online);
    assert_eq!(rec.member("r2n1").unwrap().state, RecordedState::OutOfSync);

    // The three members hold identical data.
    let mut sums = Vec::new();
    for n in ["r1n1", "r3n1", "r4n1"] {
        let b = reg.get(n).unwrap();
        sums.push(crc_of(&*b, BLOCKS).await);
    }
    assert!(
        sums.iter().all(|s| *s == sums[0]),
        "members differ: {sums:x?}"
    );
    eprintln!(
        "nvme raid1: member removed {removed_after:?} after the kill ({reason}); bdev hot-removed after \
         {gone_after:?}; rebuild of 64 MiB under load {rebuild_secs:.2}s ({:.0} MiB/s); total {:?}",
        st.last_rebuild.as_ref().map_or(0.0, |o| o.rate_mib_s),
        t_all.elapsed()
    );

    module.delete("vol").await.unwrap();
    for c in &ctrls {
        let _ = c.delete().await;
    }
    for r in reps.into_iter().flatten() {
        r.tcp.shutdown();
    }
    std::fs::remove_dir_all(dir).unwrap();
}
