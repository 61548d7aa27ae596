//! raid1 over malloc and fault-injecting members: mirroring under concurrent
//! verified I/O, member removal on errors and hot-remove, I5 (removal durable
//! before the ack), read retry and write-back, rebuild under load (of the
//! whole device, or of listed ranges only), restart from the state dir, and
//! the RPC-facing API with its error codes. Every test ends by verifying data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bdev::registry::BdevRegistry;
use bdev::{Bdev, BdevExt, BdevIo, IoBuf, IoError};
use common::*;
use raid::{CreateParams, RaidModule, RaidOpts, RecordedState};

const BLOCKS: u64 = 32 * 1024; // 16 MiB of 512-byte blocks

fn opts() -> RaidOpts {
    RaidOpts {
        rebuild_region_kib: 256,
        drain_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

async fn setup(
    tag: &str,
    n: usize,
) -> (
    Arc<BdevRegistry>,
    Arc<RaidModule>,
    Vec<Arc<FaultBdev>>,
    std::path::PathBuf,
) {
    init_tracing();
    let reg = BdevRegistry::new();
    let dir = tmpdir(tag);
    let m = RaidModule::new(reg.clone(), &dir, opts()).unwrap();
    let f = fault_members(&reg, "m", n, BLOCKS);
    (reg, m, f, dir)
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i}")).collect()
}

fn params(name: &str, n: usize) -> CreateParams {
    let v = names(n);
    let r: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
    CreateParams::raid1(name, &r)
}

async fn crcs(members: &[Arc<FaultBdev>]) -> Vec<u32> {
    let mut v = Vec::new();
    for m in members {
        v.push(crc_of(&**m.inner(), BLOCKS).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_of_three_under_concurrent_verified_io() {
    let (reg, m, f, dir) = setup("mirror", 3).await;
    let raid = m.create(params("r0", 3)).await.unwrap();
    assert_eq!(raid.product_name(), "Raid Volume");
    assert_eq!(raid.num_blocks(), BLOCKS);
    let rb: Arc<dyn Bdev> = reg.get("r0").unwrap();
    let load = Load::start(rb.clone(), 12, BLOCKS / 12, 1);
    load.wait_ops(6000, Duration::from_secs(30)).await;
    // flush, write-zeroes and unmap go to every member too
    rb.flush().await.unwrap();
    let models = load.stop().await;
    verify_models(&*rb, &models).await;
    let c = crcs(&f).await;
    assert!(c.iter().all(|x| *x == c[0]), "members differ: {c:x?}");
    rb.write_blocks(BLOCKS - 8, &[0xAB; 8 * 512], false)
        .await
        .unwrap();
    rb.write_zeroes(BLOCKS - 6, 2).await.unwrap();
    rb.unmap(BLOCKS - 3, 2).await.unwrap();
    for x in &f {
        let got = x.inner().read_blocks(BLOCKS - 8, 8).await.unwrap();
        assert!(got[..1024].iter().all(|&b| b == 0xAB));
        assert!(got[1024..2048].iter().all(|&b| b == 0));
        assert!(got[2048..2560].iter().all(|&b| b == 0xAB));
        assert!(got[2560..3584].iter().all(|&b| b == 0));
    }
    // reads were spread over the members
    for x in &f {
        assert!(
            x.reads.load(Ordering::Relaxed) > 100,
            "{} served few reads",
            x.name()
        );
    }
    let st = raid.status();
    assert_eq!(
        (
            st.num_base_bdevs,
            st.num_base_bdevs_operational,
            st.num_base_bdevs_in_sync
        ),
        (3, 3, 3)
    );
    assert_eq!(st.io.removals, 0);
    assert_eq!(
        rb.read_blocks(BLOCKS, 1).await.unwrap_err(),
        IoError::OutOfRange
    );
    m.delete("r0").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_member_is_removed_io_continues_and_data_is_intact() {
    let (reg, m, f, dir) = setup("fail", 3).await;
    let raid = m.create(params("r1", 3)).await.unwrap();
    let rb: Arc<dyn Bdev> = reg.get("r1").unwrap();
    let load = Load::start(rb.clone(), 8, BLOCKS / 8, 2);
    load.wait_ops(500, Duration::from_secs(20)).await;
    f[1].fail_writes.store(true, Ordering::SeqCst);
    load.wait_ops(3000, Duration::from_secs(30)).await;
    let models = load.stop().await;
    let st = raid.status();
    let s1 = &st.base_bdevs_list[1];
    assert_eq!(s1.state, "out_of_sync");
    assert_eq!(s1.member.as_deref(), Some("m1"));
    assert!(
        !s1.is_configured && s1.name.is_none(),
        "SPDK shows a removed slot as unconfigured"
    );
    assert!(
        s1.reason.as_deref().unwrap().contains("write failed"),
        "{:?}",
        s1.reason
    );
    assert_eq!(st.num_base_bdevs_operational, 2);
    assert_eq!(st.state, raid::RaidState::Online);
    // durable
    let rec = raid::read_record(&dir, "r1").unwrap().unwrap();
    assert_eq!(rec.member("m1").unwrap().state, RecordedState::OutOfSync);
    assert_eq!(rec.in_sync_members().count(), 2);
    // the claim is released once its I/O drained: the control plane can delete it
    wait_until("claim released", Duration::from_secs(5), || {
        reg.claim_of("m1").is_none()
    })
    .await;
    verify_models(&*rb, &models).await;
    let c = crcs(&f).await;
    assert_eq!(c[0], c[2]);
    assert_ne!(c[0], c[1], "the removed member missed writes");
    // it is never read again
    let r1 = f[1].reads.load(Ordering::Relaxed);
    verify_models(&*rb, &models).await;
    assert_eq!(f[1].reads.load(Ordering::Relaxed), r1);
    m.delete("r1").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// I5: with the persist held, a write that degraded the mirror is not
/// acknowledged; it completes once the record is durable, and the record says
/// the member is out of sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_is_durable_before_the_degraded_write_is_acknowledged() {
    init_tracing();
    let reg = BdevRegistry::new();
    let dir = tmpdir("i5");
    let store = GatedStore::new(&dir);
    let m = RaidModule::with_store(reg.clone(), store.clone(), opts());
    let f = fault_members(&reg, "m", 3, BLOCKS);
    let raid = m.create(params("r2", 3)).await.unwrap();
    let rb: Arc<dyn Bdev> = reg.get("r2").unwrap();
    rb.write_blocks(0, &[1u8; 4096], false).await.unwrap();

    store.close();
    f[2].fail_writes.store(true, Ordering::SeqCst);
    let b2 = rb.clone();
    let w = tokio::spawn(async move { b2.write_blocks(8, &[2u8; 4096], false).await });
    wait_until("persist attempt", Duration::from_secs(5), || {
        store.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !w.is_finished(),
        "write acknowledged before the removal was durable"
    );
    assert_eq!(raid.status().io.held_writes, 1);
    // a later write that never touched the failed member waits too
    let b3 = rb.clone();
    let w2 = tokio::spawn(async move { b3.write_blocks(16, &[3u8; 512], false).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!w2.is_finished());
    // reads go on meanwhile (only from in-sync members)
    let got = rb.read_blocks(0, 8).await.unwrap();
    assert!(got.iter().all(|&b| b == 1));
    let before = store.on_disk("r2").unwrap();
    assert_eq!(before.member("m2").unwrap().state, RecordedState::Online);

    store.open();
    w.await.unwrap().unwrap();
    w2.await.unwrap().unwrap();
    let after = store.on_disk("r2").unwrap();
    assert_eq!(after.member("m2").unwrap().state, RecordedState::OutOfSync);
    assert!(after.generation > before.generation);
    let st = raid.status();
    assert_eq!(st.io.held_writes, 0);
    assert_eq!(st.io.held_writes_total, 2);
    assert_eq!(st.persist.durable_generation, st.persist.generation);
    // writes after the record is durable do not wait
    rb.write_blocks(24, &[4u8; 512], false).await.unwrap();
    let got = rb.read_blocks(8, 17).await.unwrap();
    assert!(got[..4096].iter().all(|&b| b == 2));
    assert!(got[4096..4608].iter().all(|&b| b == 3));
    assert!(got[8192..].iter().all(|&b| b == 4));
    for x in [&f[0], &f[1]] {
        assert_eq!(&x.inner().read_blocks(8, 17).await.unwrap()[..], &got[..]);
    }

    // A persist that fails: the held write fails (never acknowledged) and the
    // raid keeps going once a persist succeeds.
    store.fail.store(true, Ordering::SeqCst);
    f[1].fail_writes.store(true, Ordering::SeqCst);
    let e = rb.write_blocks(32, &[5u8; 512], false).await.unwrap_err();
    assert_eq!(e, IoError::Errno(libc::EIO));
    assert!(raid.persist_status().error.is_some());
    store.fail.store(false, Ordering::SeqCst);
    wait_until("persist retry", Duration::from_secs(5), || {
        raid.persist_status().error.is_none()
    })
    .await;
    rb.write_blocks(32, &[6u8; 512], false).await.unwrap();
    assert_eq!(
        store.on_disk("r2").unwrap().member("m1").unwrap().state,
        RecordedState::OutOfSync
    );
    assert!(rb.read_blocks(32, 1).await.unwrap().iter().all(|&b| b == 6));
    assert_eq!(raid.status().num_base_bdevs_in_sync, 1);
    m.delete("r2").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_error_is_retried_and_good_data_written_back() {
    let (reg, m, f, dir) = setup("readerr", 2).await;
    let raid = m.create(params("r3", 2)).await.unwrap();
    let rb: Arc<dyn Bdev> = reg.get("r3").unwrap();
    let good: Vec<u8> = (0..100 * 512).map(|i| (i * 7 % 251) as u8).collect();
    rb.write_blocks(980, &good, false).await.unwrap();
    // m0 loses the data of 1010..1020 and reports a media error there
    f[0].inner()
        .write_blocks(1010, &[0xEE; 10 * 512], false)
        .await
        .unwrap();
    f[0].add_bad_range(1010, 10);
    // reads at varied offsets: some land on m0 first, fail, and are retried on m1
    for j in 0..20usize {
        let got = rb.read_blocks(985 + j as u64, 40).await.unwrap();
        assert_eq!(&got[..], &good[(5 + j) * 512..(45 + j) * 512]);
    }
    assert!(
        f[0].failed.load(Ordering::Relaxed) >= 1,
        "no read hit the bad member"
    );
    wait_until("write-back", Duration::from_secs(5), || {
        raid.status().io.write_backs >= 1
    })
    .await;
    assert_eq!(f[0].bad_ranges(), 0, "the write-back covered the bad range");
    assert_eq!(
        &f[0].inner().read_blocks(980, 100).await.unwrap()[..],
        &good[..]
    );
    let st = raid.status();
    assert_eq!(st.num_base_bdevs_in_sync, 2, "a repaired member stays");
    assert!(st.io.read_errors >= 1);

    // A write-back that fails removes the member.
    f[0].add_bad_range(2000, 4);
    f[0].fail_writes.store(true, Ordering::SeqCst);
    let mut n = 0;
    while raid.status().base_bdevs_list[0].state == "online" {
        rb.read_blocks(2000 - n % 4, 4).await.unwrap();
        n += 1;
        assert!(n < 200, "member never removed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let st = raid.status();
    assert!(
        st.base_bdevs_list[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("write-back"),
        "{:?}",
        st.base_bdevs_list[0]
    );
    assert_eq!(st.io.write_back_failures, 1);
    assert_eq!(&rb.read_blocks(980, 100).await.unwrap()[..], &good[..]);
    // all members failing a read: the error comes back
    f[1].add_bad_range(3000, 1);
    assert_eq!(rb.read_blocks(3000, 1).await.unwrap_err(), IoError::Media);
    m.delete("r3").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// A member that stops answering holds writes (as a real path would until
/// fast-I/O-fail); when its device is hot-removed (NVMe controller lost), it
/// leaves, the held I/O fails on it, and the writes complete on the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_member_then_hot_remove() {
    let (reg, m, f, dir) = setup("silent", 3).await;
    let raid = m.create(params("r4", 3)).await.unwrap();
    let rb: Arc<dyn Bdev> = reg.get("r4").unwrap();
    let load = Load::start(rb.clone(), 8, BLOCKS / 8, 4);
    load.wait_ops(300, Duration::from_secs(20)).await;
    f[0].silent.store(true, Ordering::SeqCst);
    wait_until(
        "writes stuck on the silent member",
        Duration::from_secs(5),
        || f[0].parked() >= 4,
    )
    .await;
    // the device goes away: the registry tells the raid, then the stuck I/O fails
    assert!(reg.hot_remove("m0"));
    f[0].release_parked(Some(IoError::Removed));
    load.wait_ops(2000, Duration::from_secs(30)).await;
    let models = load.stop().await;
    let st = raid.status();
    assert_eq!(st.base_bdevs_list[0].state, "out_of_sync");
    assert!(st.base_bdevs_list[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("hot-removed"));
    let rec = raid::read_record(&dir, "r4").unwrap().unwrap();
    assert_eq!(rec.member("m0").unwrap().state, RecordedState::OutOfSync);
    verify_models(&*rb, &models).await;
    let c = crcs(&f[1..]).await;
    assert_eq!(c[0], c[1]);

    // down to one member, then the last one goes: the raid goes offline and
    // the last member stays recorded in sync (it has every acknowledged write)
    reg.hot_remove("m1");
    rb.write_blocks(0, &[9u8; 512], false).await.unwrap();
    reg.hot_remove("m2");
    wait_until("offline", Duration::from_secs(5), || {
        raid.status().state == raid::RaidState::Offline
    })
    .await;
    wait_until("raid bdev hot-removed", Duration::from_secs(5), || {
        reg.get("r4").is_none()
    })
    .await;
    assert_eq!(raid.read_blocks(0, 1).await.unwrap_err(), IoError::Removed);
    let rec = raid::read_record(&dir, "r4").unwrap().unwrap();
    assert_eq!(
        rec.in_sync_members()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["m2"]
    );
    assert_eq!(m.get_bdevs("offline").unwrap().len(), 1);
    assert!(f[2]
        .inner()
        .read_blocks(0, 1)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 9));
    m.delete("r4").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// The last in-sync member failing an I/O is kept (the I/O fails), so an
/// acknowledged write always has a home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_in_sync_member_is_kept_on_io_error() {
    let (reg, m, f, dir) = setup("last", 2).await;
    let raid = m.create(params("r5", 2)).await.unwrap();
    let rb: Arc<dyn Bdev> = reg.get("r5").unwrap();
    rb.write_blocks(0, &[1u8; 512], false).await.unwrap();
    f[0].fail_writes.store(true, Ordering::SeqCst);
    f[1].fail_writes.store(true, Ordering::SeqCst);
    assert!(rb.write_blocks(0, &[2u8; 512], false).await.is_err());
    assert_eq!(
        raid.status().num_base_bdevs_in_sync,
        2,
        "nobody removed when everyone failed"
    );
    f[1].fail_writes.store(false, Ordering::SeqCst);
    rb.write_blocks(0, &[3u8; 512], false).await.unwrap();
    assert_eq!(raid.status().num_base_bdevs_in_sync, 1);
    f[1].fail_writes.store(true, Ordering::SeqCst);
    assert!(rb.write_blocks(0, &[4u8; 512], false).await.is_err());
    assert_eq!(raid.status().num_base_bdevs_in_sync, 1);
    assert_eq!(raid.status().state, raid::RaidState::Online);
    f[1].fail_writes.store(false, Ordering::SeqCst);
    rb.write_blocks(0, &[5u8; 512], false).await.unwrap();
    assert!(rb.read_blocks(0, 1).await.unwrap().iter().all(|&b| b == 5));
    m.delete("r5").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_under_concurrent_verified_writes() {
    let (reg, m, f, dir) = setup("rebuild", 2).await;
    let raid = m.create(params("r6", 2)).await.unwrap();
    let rb: Arc<dyn Bdev> = reg.get("r6").unwrap();
    // data everywhere first, so the copy has something to copy
    let load = Load::start(rb.clone(), 8, BLOCKS / 8, 6);
    load.wait_ops(3000, Duration::from_secs(30)).await;
    let models = load.stop().await;

    let fresh = FaultBdev::new("m2", BLOCKS + 100);
    reg.register(fresh.clone(), &[]).unwrap();
    let extra = FaultBdev::new("m3", BLOCKS);
    reg.register(extra.clone(), &[]).unwrap();
    // 16 MiB at 24 MiB/s: long enough to overlap a lot of user I/O
    raid.set_rebuild_bandwidth(24);
    // a slow new member keeps each region locked long enough for user writes to meet it
    fresh.delay_us.store(300, Ordering::Relaxed);
    let load = Load::start(rb.clone(), 8, BLOCKS / 8, 7);
    m.add_base_bdev("r6", "m2").await.unwrap();
    let st = raid.status();
    assert_eq!(st.base_bdevs_list[2].state, "rebuilding");
    assert!(st.process.is_some());
    assert!(!st.base_bdevs_list[2].reads);
    let e = m.add_base_bdev("r6", "m3").await.unwrap_err();
    assert!(matches!(e, raid::RaidError::RebuildRunning { .. }), "{e}");
    assert_eq!(e.errno(), -libc::EPERM);
    assert_eq!(
        reg.claim_of("m3").map(|c| c.holder),
        None,
        "a refused add claims nothing"
    );
    wait_until("rebuild progress", Duration::from_secs(10), || {
        raid.status().rebuild.is_some_and(|r| r.percent > 20.0)
    })
    .await;
    let r = raid.status().rebuild.unwrap();
    assert!(
        r.rate_mib_s > 5.0 && r.rate_mib_s < 40.0,
        "rate {} with a 24 MiB/s limit",
        r.rate_mib_s
    );
    assert_eq!(
        fresh.reads.load(Ordering::Relaxed),
        0,
        "no reads from a rebuilding member"
    );
    raid.set_rebuild_bandwidth(0);
    let res = tokio::time::timeout(Duration::from_secs(30), raid.wait_rebuild())
        .await
        .unwrap();
    assert_eq!(res, Some(Ok(())));
    let load_models = load.stop().await;
    let st = raid.status();
    assert_eq!(st.base_bdevs_list[2].state, "online");
    assert!(st.base_bdevs_list[2].reads);
    assert!(st.process.is_none());
    assert_eq!(st.last_rebuild.as_ref().unwrap().result, "complete");
    assert!(
        st.io.deferred_writes_total > 0,
        "no user write ever met a locked region"
    );
    assert_eq!(
        raid::read_record(&dir, "r6")
            .unwrap()
            .unwrap()
            .member("m2")
            .unwrap()
            .state,
        RecordedState::Online
    );
    // identical members
    let mut c = crcs(&f).await;
    c.push(crc_of(&**fresh.inner(), BLOCKS).await);
    assert!(
        c.iter().all(|x| *x == c[0]),
        "members differ after rebuild: {c:x?}"
    );
    verify_models(&*rb, &load_models).await;
    // the new member serves reads now
    let before = fresh.reads.load(Ordering::Relaxed);
    verify_models(&*rb, &load_models).await;
    assert!(fresh.reads.load(Ordering::Relaxed) > before);
    drop(models);
    m.delete("r6").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// A rebuild target that fails a write leaves, the rebuild stops, and the
/// next add is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rebuild_target_leaves_and_a_new_add_works() {
    let (reg, m, f, dir) = setup("rbfail", 2).await;
    let raid = m.create(params("r7", 2)).await.unwrap();
    let rb: Arc<dyn Bdev> = reg.get("r7").unwrap();
    rb.write_blocks(100, &[7u8; 4096], false).await.unwrap();
    let bad = FaultBdev::new("m2", BLOCKS);
    reg.register(bad.clone(), &[]).unwrap();
    bad.fail_writes.store(true, Ordering::SeqCst);
    m.add_base_bdev("r7", "m2").await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), raid.wait_rebuild())
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_err());
    let st = raid.status();
    assert_eq!(st.base_bdevs_list[2].state, "out_of_sync");
    assert_eq!(st.num_base_bdevs_in_sync, 2);
    assert_eq!(
        raid::read_record(&dir, "r7")
            .unwrap()
            .unwrap()
            .member("m2")
            .unwrap()
            .state,
        RecordedState::OutOfSync
    );
    wait_until("claim released", Duration::from_secs(5), || {
        reg.claim_of("m2").is_none()
    })
    .await;
    bad.fail_writes.store(false, Ordering::SeqCst);
    m.add_base_bdev("r7", "m2").await.unwrap();
    assert_eq!(raid.wait_rebuild().await, Some(Ok(())));
    assert_eq!(raid.status().num_base_bdevs, 3, "the freed slot was reused");
    assert_eq!(
        crc_of(&**bad.inner(), BLOCKS).await,
        crc_of(&**f[0].inner(), BLOCKS).await
    );
    assert!(rb
        .read_blocks(100, 8)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 7));
    m.delete("r7").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Drop everything without a delete (as a crash would) and start over on the
/// same state dir and devices: the out-of-sync member is kept out and never
/// read until it is added back and rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_out_of_sync_member_out() {
    init_tracing();
    let dir = tmpdir("restart");
    let mallocs: Vec<_>;
    let uuid = uuid::Uuid::new_v4();
    let models;
    {
        let reg = BdevRegistry::new();
        let m = RaidModule::new(reg.clone(), &dir, opts()).unwrap();
        let f = fault_members(&reg, "m", 3, BLOCKS);
        mallocs = f.iter().map(|x| x.inner().clone()).collect();
        let mut p = params("vol", 3);
        p.uuid = Some(uuid);
        m.create(p).await.unwrap();
        let rb: Arc<dyn Bdev> = reg.get("vol").unwrap();
        let load = Load::start(rb.clone(), 4, BLOCKS / 4, 8);
        load.wait_ops(300, Duration::from_secs(20)).await;
        f[1].fail_writes.store(true, Ordering::SeqCst);
        load.wait_ops(1000, Duration::from_secs(20)).await;
        models = load.stop().await;
        // "crash": no delete; everything is dropped
    }
    // the control plane's view, without creating anything
    let recs = raid::read_records(&dir).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].uuid, uuid);
    assert_eq!(
        recs[0].member("m1").unwrap().state,
        RecordedState::OutOfSync
    );

    let reg = BdevRegistry::new();
    let m = RaidModule::new(reg.clone(), &dir, opts()).unwrap();
    let f: Vec<Arc<FaultBdev>> = mallocs
        .iter()
        .enumerate()
        .map(|(i, mb)| {
            let x = FaultBdev::over(&format!("m{i}"), mb.clone());
            reg.register(x.clone(), &[]).unwrap();
            x
        })
        .collect();
    let mut p = params("vol", 3);
    p.uuid = Some(uuid);
    let raid = m.create(p).await.unwrap();
    let st = raid.status();
    assert_eq!(st.base_bdevs_list[1].state, "out_of_sync");
    assert!(st.base_bdevs_list[1]
        .reason
        .as_deref()
        .unwrap()
        .contains("write failed"));
    assert_eq!(st.num_base_bdevs_in_sync, 2);
    assert!(
        reg.claim_of("m1").is_none(),
        "an out-of-sync member is not claimed"
    );
    let rb: Arc<dyn Bdev> = reg.get("vol").unwrap();
    verify_models(&*rb, &models).await;
    verify_models(&*rb, &models).await;
    assert_eq!(
        f[1].reads.load(Ordering::Relaxed),
        0,
        "an out-of-sync member was read"
    );
    // without uuid the record is continued too; only in-sync members make it
    m.delete("vol").await.unwrap();
    let raid = m.create(params("vol", 3)).await.unwrap();
    assert_eq!(raid.status().uuid, uuid);
    assert_eq!(raid.status().num_base_bdevs_in_sync, 2);
    // only the out-of-sync member given: refused, nothing claimed
    m.delete("vol").await.unwrap();
    let e = m
        .create(CreateParams::raid1("vol", &["m1"]))
        .await
        .unwrap_err();
    assert_eq!(e.errno(), -libc::EINVAL, "{e}");
    assert!(reg.claim_of("m1").is_none());
    // a member left out of the re-create is recorded out of sync
    let raid = m
        .create(CreateParams::raid1("vol", &["m0", "m1"]))
        .await
        .unwrap();
    let rec = raid::read_record(&dir, "vol").unwrap().unwrap();
    assert_eq!(rec.member("m2").unwrap().state, RecordedState::OutOfSync);
    assert_eq!(rec.member("m2").unwrap().slot, None);
    // adding it back rebuilds it
    f[1].fail_writes.store(false, Ordering::SeqCst);
    m.add_base_bdev("vol", "m1").await.unwrap();
    assert_eq!(raid.wait_rebuild().await, Some(Ok(())));
    assert_eq!(raid.status().num_base_bdevs_in_sync, 2);
    assert_eq!(
        raid::read_record(&dir, "vol")
            .unwrap()
            .unwrap()
            .member("m1")
            .unwrap()
            .state,
        RecordedState::Online
    );
    assert_eq!(
        crc_of(&**f[1].inner(), BLOCKS).await,
        crc_of(&**f[0].inner(), BLOCKS).await
    );
    verify_models(&*rb_of(&reg, "vol"), &models).await;
    // a new uuid is a new raid: the old record is replaced, all members in sync
    m.delete("vol").await.unwrap();
    let mut p = params("vol", 3);
    p.uuid = Some(uuid::Uuid::new_v4());
    let raid = m.create(p).await.unwrap();
    assert_eq!(raid.status().num_base_bdevs_in_sync, 3);
    m.delete("vol").await.unwrap();
    m.forget("vol").unwrap();
    assert!(raid::read_records(&dir).unwrap().is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

fn errno<T: std::fmt::Debug>(r: Result<T, raid::RaidError>) -> i32 {
    r.unwrap_err().errno()
}

fn rb_of(reg: &BdevRegistry, name: &str) -> Arc<dyn Bdev> {
    reg.get(name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_api_errors_claims_and_status_json() {
    let (reg, m, _f, dir) = setup("api", 3).await;
    let mut p = params("a", 2);
    p.raid_level = "raid5f".into();
    assert_eq!(errno(m.create(p).await), -libc::EINVAL);
    let mut p = params("a", 2);
    p.strip_size_kb = 64;
    assert_eq!(errno(m.create(p).await), -libc::EINVAL);
    let mut p = params("a", 2);
    p.superblock = true;
    assert_eq!(errno(m.create(p).await), -libc::EINVAL);
    assert_eq!(
        errno(m.create(CreateParams::raid1("a", &[])).await),
        -libc::EINVAL
    );
    assert_eq!(
        errno(m.create(CreateParams::raid1("", &["m0"])).await),
        -libc::EINVAL
    );
    assert_eq!(
        errno(
            m.create(CreateParams::raid1(&"x".repeat(64), &["m0"]))
                .await
        ),
        -libc::EINVAL
    );
    assert_eq!(
        errno(m.create(CreateParams::raid1("a", &["m0", "nope"])).await),
        -libc::ENODEV
    );
    assert_eq!(
        errno(m.create(CreateParams::raid1("a", &["m0", "m0"])).await),
        -libc::EPERM
    );
    assert_eq!(
        errno(m.create(CreateParams::raid1("m0", &["m1"])).await),
        -libc::EEXIST
    );
    reg.claim(
        "m2",
        bdev::registry::Claim {
            holder: "nbd x".into(),
            module: "nbd",
            on_remove: None,
        },
    )
    .unwrap();
    let e = m
        .create(CreateParams::raid1("a", &["m0", "m2"]))
        .await
        .unwrap_err();
    assert_eq!(e.errno(), -libc::EPERM);
    assert!(e.to_string().contains("nbd x"), "{e}");
    assert!(
        reg.claim_of("m0").is_none(),
        "a failed create releases what it claimed"
    );
    // level "1" is accepted as SPDK does
    let mut p = params("a", 2);
    p.raid_level = "1".into();
    let a = m.create(p).await.unwrap();
    assert_eq!(errno(m.create(params("a", 2)).await), -libc::EEXIST);
    assert_eq!(reg.claim_of("m0").unwrap().holder, "raid a");
    assert!(
        reg.unregister("m0").is_err(),
        "a member cannot be deleted under the raid"
    );
    assert_eq!(errno(m.add_base_bdev("nope", "m1").await), -libc::ENODEV);
    assert_eq!(errno(m.add_base_bdev("a", "nope").await), -libc::ENODEV);
    assert_eq!(errno(m.add_base_bdev("a", "m0").await), -libc::EPERM);
    assert_eq!(errno(m.add_base_bdev("a", "m2").await), -libc::EPERM);
    let small = bdev::malloc::MallocBdev::new("small", 100, 512, None).unwrap();
    reg.register(Arc::new(small), &[]).unwrap();
    assert_eq!(errno(m.add_base_bdev("a", "small").await), -libc::EINVAL);
    let big4k = bdev::malloc::MallocBdev::new("big4k", BLOCKS, 4096, None).unwrap();
    reg.register(Arc::new(big4k), &[]).unwrap();
    assert_eq!(errno(m.add_base_bdev("a", "big4k").await), -libc::EINVAL);
    assert_eq!(errno(m.remove_base_bdev("m2").await), -libc::ENODEV);
    assert_eq!(errno(m.remove_base_bdev("nope").await), -libc::ENODEV);
    assert_eq!(errno(m.delete("nope").await), -libc::ENODEV);
    assert_eq!(errno(m.get_bdevs("bogus")), -libc::EINVAL);
    assert_eq!(errno(m.forget("a")), -libc::EEXIST);
    assert_eq!(m.get_bdevs("online").unwrap().len(), 1);
    assert_eq!(m.get_bdevs("configuring").unwrap().len(), 0);

    // status mirrors SPDK's JSON
    let j = serde_json::to_value(&m.get_bdevs("all").unwrap()[0]).unwrap();
    for k in [
        "name",
        "uuid",
        "strip_size_kb",
        "state",
        "raid_level",
        "superblock",
        "num_base_bdevs",
        "num_base_bdevs_discovered",
        "num_base_bdevs_operational",
        "base_bdevs_list",
    ] {
        assert!(j.get(k).is_some(), "missing {k} in {j}");
    }
    assert_eq!(j["raid_level"], "raid1");
    assert_eq!(j["state"], "online");
    assert_eq!(j["strip_size_kb"], 0);
    assert_eq!(j["uuid"], a.uuid().to_string());
    let b0 = &j["base_bdevs_list"][0];
    for k in [
        "name",
        "uuid",
        "is_configured",
        "data_offset",
        "data_size",
        "state",
        "since",
    ] {
        assert!(b0.get(k).is_some(), "missing {k} in {b0}");
    }
    assert_eq!(b0["name"], "m0");
    assert_eq!(b0["is_configured"], true);
    assert_eq!(b0["data_size"], BLOCKS);

    // explicit removal, down to one member, then of the last one: offline
    m.remove_base_bdev("m1").await.unwrap();
    assert!(reg.claim_of("m1").is_none());
    let st = a.status();
    assert_eq!(
        st.base_bdevs_list[1].reason.as_deref(),
        Some("removed by bdev_raid_remove_base_bdev")
    );
    a.write_blocks(0, &[1u8; 512], false).await.unwrap();
    m.remove_base_bdev("m0").await.unwrap();
    assert_eq!(a.status().state, raid::RaidState::Offline);
    assert!(a.write_blocks(0, &[1u8; 512], false).await.is_err());
    assert_eq!(m.get_bdevs("offline").unwrap().len(), 1);
    m.delete("a").await.unwrap();
    assert!(reg.get("a").is_none());
    assert!(reg.claim_of("m0").is_none());
    let rec = raid::read_record(&dir, "a").unwrap().unwrap();
    assert_eq!(
        rec.member("m0").unwrap().state,
        RecordedState::Online,
        "the last member holds the data"
    );
    assert_eq!(rec.member("m1").unwrap().state, RecordedState::OutOfSync);

    // created again from its record: m0 serves, m1 stays out
    let a = m
        .create(CreateParams::raid1("a", &["m0", "m1"]))
        .await
        .unwrap();
    assert_eq!(a.status().base_bdevs_list[1].state, "out_of_sync");
    assert!(a.read_blocks(0, 1).await.unwrap().iter().all(|&b| b == 1));
    m.delete("a").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Deleting a raid that is exported tells the export (hot-remove), releases
/// every member, and I/O submitted afterwards fails cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_hot_removes_the_raid_and_releases_members() {
    let (reg, m, f, dir) = setup("delete", 2).await;
    let raid = m.create(params("d", 2)).await.unwrap();
    let told = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t2 = told.clone();
    reg.claim(
        "d",
        bdev::registry::Claim {
            holder: "nvmf nqn.x".into(),
            module: "nvmf",
            on_remove: Some(Arc::new(move |_| t2.store(true, Ordering::SeqCst))),
        },
    )
    .unwrap();
    raid.write_blocks(0, &[3u8; 4096], false).await.unwrap();
    m.delete("d").await.unwrap();
    assert!(told.load(Ordering::SeqCst));
    assert!(reg.get("d").is_none());
    assert!(reg.claim_of("m0").is_none() && reg.claim_of("m1").is_none());
    let (io, r) = bdev::ext::submit_wait(&*raid, BdevIo::read(0, 1, IoBuf::zeroed(512))).await;
    assert_eq!(r, Err(IoError::Removed));
    drop(io);
    for x in &f {
        assert!(x
            .inner()
            .read_blocks(0, 8)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 3));
    }
    // the same members make a new raid at once
    let again = m.create(params("d", 2)).await.unwrap();
    assert!(again
        .read_blocks(0, 8)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 3));
    m.delete("d").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// A write that fails on one member while the raid is being deleted cannot
/// take the member out any more (an offline raid changes no membership), so
/// it must not be acknowledged: the record still says that member is in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_failing_during_delete_is_not_acknowledged() {
    let (reg, m, f, dir) = setup("deletefail", 2).await;
    let raid = m.create(params("z", 2)).await.unwrap();
    f[1].silent.store(true, Ordering::SeqCst);
    let r2 = raid.clone();
    let w = tokio::spawn(async move { r2.write_blocks(0, &[1u8; 512], false).await });
    wait_until("write parked on m1", Duration::from_secs(5), || {
        f[1].parked() == 1
    })
    .await;
    let m2 = m.clone();
    let del = tokio::spawn(async move { m2.delete("z").await });
    wait_until("raid offline", Duration::from_secs(5), || {
        raid.status().state == raid::RaidState::Offline
    })
    .await;
    f[1].release_parked(Some(IoError::Errno(libc::EIO)));
    let r = w.await.unwrap();
    assert!(
        r.is_err(),
        "acknowledged without m1 while m1 stays recorded in sync"
    );
    assert_eq!(raid.status().io.removals, 0);
    del.await.unwrap().unwrap();
    let rec = raid::read_record(&dir, "z").unwrap().unwrap();
    assert_eq!(rec.in_sync_members().count(), 2);
    assert!(reg.claim_of("m0").is_none() && reg.claim_of("m1").is_none());
    std::fs::remove_dir_all(dir).unwrap();
}

/// `corral_raid_quiesce`: new I/O is held back (not failed) and I/O in flight
/// drains, so every member holds the same data while quiesced (what a
/// crash-consistent snapshot of all replicas needs); a resume, or the lease,
/// lets it go on; a quiesce that cannot drain gives up and holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesce_drains_holds_and_resumes() {
    let (reg, m, f, dir) = setup("quiesce", 3).await;
    for x in &f {
        // Slow members: a quiesce always finds I/O in flight.
        x.delay_us.store(300, Ordering::SeqCst);
    }
    let raid = m.create(params("rq", 3)).await.unwrap();
    let rb: Arc<dyn Bdev> = reg.get("rq").unwrap();
    let load = Load::start(rb.clone(), 12, BLOCKS / 12, 7);
    let lease = Duration::from_secs(30);
    for round in 0..5 {
        load.wait_ops(300, Duration::from_secs(30)).await;
        let token = raid
            .quiesce(Duration::from_secs(5), lease)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let st = raid.status();
        assert!(st.io.quiesced);
        assert_eq!(st.io.inflight, 0, "round {round}: drained");
        let before = load.ops.load(Ordering::SeqCst);
        let c1 = crcs(&f).await;
        assert!(
            c1.iter().all(|x| *x == c1[0]),
            "round {round}: members differ while quiesced: {c1:x?}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(
            crcs(&f).await,
            c1,
            "round {round}: data changed while quiesced"
        );
        assert_eq!(
            load.ops.load(Ordering::SeqCst),
            before,
            "I/O completed while quiesced"
        );
        assert!(raid.status().io.queued > 0, "the load's I/O waits");
        // One quiesce at a time; only its own token resumes it.
        let e = raid
            .quiesce(Duration::from_secs(1), lease)
            .await
            .unwrap_err();
        assert_eq!(e.errno(), -libc::EBUSY, "{e}");
        let e = raid.resume(Some(token + 1000)).unwrap_err();
        assert_eq!(e.errno(), -libc::ENOENT, "{e}");
        raid.resume(Some(token)).unwrap();
        assert!(!raid.status().io.quiesced);
    }
    // A quiesce whose caller never resumes ends with its lease.
    raid.quiesce(Duration::from_secs(5), Duration::from_millis(200))
        .await
        .unwrap();
    load.wait_ops(300, Duration::from_secs(10)).await;
    assert!(!raid.status().io.quiesced, "lease ended the quiesce");
    // A member that never answers: the drain times out, nothing stays held.
    f[1].silent.store(true, Ordering::SeqCst);
    wait_until("I/O stuck on m1", Duration::from_secs(5), || {
        f[1].parked() > 0
    })
    .await;
    let e = raid
        .quiesce(Duration::from_millis(100), lease)
        .await
        .unwrap_err();
    assert_eq!(e.errno(), -libc::ETIMEDOUT, "{e}");
    assert!(!raid.status().io.quiesced);
    f[1].silent.store(false, Ordering::SeqCst);
    f[1].release_parked(None);
    load.wait_ops(300, Duration::from_secs(10)).await;
    let models = load.stop().await;
    verify_models(&*rb, &models).await;
    let c = crcs(&f).await;
    assert!(c.iter().all(|x| *x == c[0]), "members differ: {c:x?}");
    // Delete while quiesced: held I/O is not left waiting.
    raid.quiesce(Duration::from_secs(5), lease).await.unwrap();
    m.delete("rq").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Copies a whole device block for block (test preparation, below the raid).
async fn copy_device(src: &dyn Bdev, dst: &dyn Bdev, blocks: u64) {
    let mut lba = 0;
    while lba < blocks {
        let n = 2048.min(blocks - lba);
        let d = src.read_blocks(lba, n).await.unwrap();
        dst.write_blocks(lba, &d, false).await.unwrap();
        lba += n;
    }
}

/// Records a write the test made itself in the load models that cover it.
fn model_write(models: &mut [RegionModel], lba: u64, data: &[u8]) {
    let bs = BS as usize;
    for (i, b) in data.chunks(bs).enumerate() {
        let l = lba + i as u64;
        for m in models.iter_mut() {
            if l >= m.start && l < m.start + m.known.len() as u64 {
                let k = (l - m.start) as usize;
                m.data[k * bs..(k + 1) * bs].copy_from_slice(b);
                m.known[k] = true;
            }
        }
    }
}

/// Checks that `writes` (sorted, from the rebuild) cover exactly the blocks of
/// `want` that lie in `[lo, hi)`, each block once.
fn assert_exact_cover(writes: &[(u64, u64)], want: &[(u64, u64)], lo: u64, hi: u64, what: &str) {
    let mut sorted = writes.to_vec();
    sorted.sort_unstable();
    for w in sorted.windows(2) {
        assert!(
            w[0].0 + w[0].1 <= w[1].0,
            "{what}: rebuild wrote {:?} and {:?} twice",
            w[0],
            w[1]
        );
    }
    for &(o, n) in &sorted {
        assert!(
            want.iter().any(|&(s, l)| s <= o && o + n <= s + l),
            "{what}: rebuild wrote {o}+{n} outside the listed ranges {want:?}"
        );
    }
    let got: u64 = sorted.iter().map(|w| w.1).sum();
    let expect: u64 = want
        .iter()
        .filter(|&&(s, l)| s >= lo && s + l <= hi)
        .map(|r| r.1)
        .sum();
    assert_eq!(got, expect, "{what}: blocks the rebuild wrote");
}

/// Longhorn-style replica rebuild: the new member already holds the raid's
/// data except in some ranges (in the control plane: it received the
/// snapshot chain; the ranges are a healthy replica's head, read while the
/// raid is quiesced). It is added with those ranges (unsorted, overlapping,
/// adjacent) while quiesced, I/O resumes, and the rebuild copies only those
/// ranges, under range locks, while a verified load writes; at the end every
/// member is identical and the load's data reads back.
///
/// Zones: [0, 4096) takes one probe write that must wait behind the rebuild's
/// range lock; [4096, 16384) takes the load during the rebuild;
/// [16384, BLOCKS) takes no write after preparation, so every write the new
/// member sees there is the rebuild's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_copies_only_the_listed_ranges_under_load() {
    use rand::{Rng, SeedableRng};
    let (reg, m, f, dir) = setup("ranges", 2).await;
    let raid = m.create(params("rr", 2)).await.unwrap();
    let rb: Arc<dyn Bdev> = reg.get("rr").unwrap();
    // Data everywhere first.
    let load = Load::start(rb.clone(), 8, BLOCKS / 8, 21);
    load.wait_ops(3000, Duration::from_secs(30)).await;
    let mut first = load.stop().await;
    let (lo, hi) = (4096u64, 16384u64);
    let load = Load::start_at(rb.clone(), lo, 3, 4096, 22);
    load.wait_ops(500, Duration::from_secs(30)).await;

    let fresh = FaultBdev::new("m2", BLOCKS);
    reg.register(fresh.clone(), &[]).unwrap();
    let listed: Vec<(u64, u64)> = vec![
        (30000, 2048),
        (5000, 2000),
        (1500, 600),
        (25050, 10),
        (12000, 64),
        (20001, 3),
        (1000, 700),
        (7000, 1000),
        (25000, 100),
        (20000, 1),
    ];
    let want = vec![
        (1000, 1100),
        (5000, 3000),
        (12000, 64),
        (20000, 4),
        (25000, 100),
        (30000, 2048),
    ];
    let total: u64 = want.iter().map(|r| r.1).sum();
    assert_eq!(raid::normalize_ranges(&listed, BLOCKS).unwrap(), want);

    let token = raid
        .quiesce(Duration::from_secs(5), Duration::from_secs(30))
        .await
        .unwrap();
    // The new member: the raid's content, but garbage in the listed ranges.
    copy_device(&**f[0].inner(), &**fresh.inner(), BLOCKS).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    for &(o, n) in &listed {
        let mut d = vec![0u8; (n * BS) as usize];
        rng.fill(&mut d[..]);
        fresh.inner().write_blocks(o, &d, false).await.unwrap();
    }
    assert_ne!(
        crc_of(&**fresh.inner(), BLOCKS).await,
        crc_of(&**f[0].inner(), BLOCKS).await
    );
    fresh.log_writes.store(true, Ordering::SeqCst);
    // The rebuild's first copy stays in flight (its region locked) until released.
    fresh.silent.store(true, Ordering::SeqCst);
    raid.set_rebuild_bandwidth(8);
    m.add_base_bdev_with("rr", "m2", raid::AddOptions::ranges(listed.clone()))
        .await
        .unwrap();
    assert_eq!(
        raid::read_record(&dir, "rr")
            .unwrap()
            .unwrap()
            .member("m2")
            .unwrap()
            .state,
        RecordedState::Rebuilding,
        "recorded rebuilding when the add returns"
    );
    let st = raid.status();
    let r = st.rebuild.as_ref().unwrap();
    assert_eq!((r.blocks_total, r.ranges), (total, Some(want.len())));
    assert_eq!(st.base_bdevs_list[2].state, "rebuilding");
    assert!(!st.base_bdevs_list[2].reads);
    wait_until("first copy in flight", Duration::from_secs(5), || {
        fresh.parked() == 1
    })
    .await;
    assert_eq!(
        fresh.write_log(),
        vec![(1000, 512)],
        "copies start at the lowest range"
    );
    raid.resume(Some(token)).unwrap();

    // A user write into the region being copied waits for the copy, so the
    // copy (older data) cannot land over it.
    let probe = vec![0xC3u8; 8 * BS as usize];
    let w = {
        let rb = rb.clone();
        let probe = probe.clone();
        tokio::spawn(async move { rb.write_blocks(1100, &probe, false).await })
    };
    wait_until("probe deferred", Duration::from_secs(5), || {
        raid.status().io.deferred_writes == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!w.is_finished(), "a write overtook the rebuild's lock");
    fresh.delay_us.store(300, Ordering::Relaxed);
    fresh.silent.store(false, Ordering::SeqCst);
    fresh.release_parked(None);
    w.await.unwrap().unwrap();
    model_write(&mut first, 1100, &probe);

    let res = tokio::time::timeout(Duration::from_secs(30), raid.wait_rebuild())
        .await
        .unwrap();
    assert_eq!(res, Some(Ok(())));
    // The new member serves reads and takes writes now.
    load.wait_ops(500, Duration::from_secs(30)).await;
    let models = load.stop().await;
    fresh.log_writes.store(false, Ordering::SeqCst);

    let st = raid.status();
    assert_eq!(st.base_bdevs_list[2].state, "online");
    assert!(st.base_bdevs_list[2].reads);
    let last = st.last_rebuild.clone().unwrap();
    assert_eq!(last.result, "complete");
    assert_eq!(
        (last.blocks_copied, last.blocks_total, last.ranges),
        (total, total, Some(want.len()))
    );
    assert_eq!(
        raid::read_record(&dir, "rr")
            .unwrap()
            .unwrap()
            .member("m2")
            .unwrap()
            .state,
        RecordedState::Online
    );

    // Where the new member was written. Outside the load's zone every write
    // is the rebuild's but the probe; inside it the load writes at most 32
    // blocks at a time and every rebuild copy here is longer.
    let log = fresh.write_log();
    let (inside, outside): (Vec<_>, Vec<_>) = log
        .iter()
        .copied()
        .partition(|&(o, n)| o >= lo && o + n <= hi);
    assert_eq!(
        outside.iter().filter(|w| **w == (1100, 8)).count(),
        1,
        "the probe reached the new member once"
    );
    let copies: Vec<_> = outside.into_iter().filter(|w| *w != (1100, 8)).collect();
    let (copies_hi, copies_lo): (Vec<_>, Vec<_>) = copies.iter().partition(|&&(o, _)| o >= hi);
    assert_exact_cover(&copies_lo, &want, 0, lo, "probe zone");
    assert_exact_cover(&copies_hi, &want, hi, BLOCKS, "untouched zone");
    let big: Vec<_> = inside.iter().copied().filter(|w| w.1 > 32).collect();
    assert_exact_cover(&big, &want, lo, hi, "load zone");
    assert!(
        inside.iter().filter(|w| w.1 <= 32).count() > 100,
        "the load's writes reached the new member"
    );

    // Identical members, and the data reads back.
    let mut c = crcs(&f).await;
    c.push(crc_of(&**fresh.inner(), BLOCKS).await);
    assert!(c.iter().all(|x| *x == c[0]), "members differ: {c:x?}");
    for x in f.iter().chain(std::iter::once(&fresh)) {
        let got = x.inner().read_blocks(1100, 8).await.unwrap();
        assert!(got[..] == probe[..], "probe on {}", x.name());
    }
    verify_models(&*rb, &models).await;
    // The first load's regions outside the load zone still hold its data.
    let untouched: Vec<RegionModel> = first
        .into_iter()
        .filter(|m| m.start + m.known.len() as u64 <= lo || m.start >= hi)
        .collect();
    assert_eq!(untouched.len(), 5);
    verify_models(&*rb, &untouched).await;
    m.delete("rr").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// An empty range list: nothing to copy, the member goes in sync at once,
/// through the same durable records (rebuilding before it sees a write,
/// online before it serves a read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_range_list_goes_in_sync_without_copying() {
    init_tracing();
    let reg = BdevRegistry::new();
    let dir = tmpdir("noranges");
    let store = GatedStore::new(&dir);
    let m = RaidModule::with_store(reg.clone(), store.clone(), opts());
    let f = fault_members(&reg, "m", 2, BLOCKS);
    let raid = m.create(params("re", 2)).await.unwrap();
    let rb: Arc<dyn Bdev> = reg.get("re").unwrap();
    let load = Load::start(rb.clone(), 8, BLOCKS / 8, 41);
    load.wait_ops(2000, Duration::from_secs(30)).await;
    let mut models = load.stop().await;
    let fresh = FaultBdev::new("m2", BLOCKS);
    reg.register(fresh.clone(), &[]).unwrap();
    copy_device(&**f[0].inner(), &**fresh.inner(), BLOCKS).await;
    fresh.log_writes.store(true, Ordering::SeqCst);

    // Hold the record: until "rebuilding" is durable the member takes no write.
    store.close();
    let add = {
        let m = m.clone();
        tokio::spawn(async move {
            m.add_base_bdev_with("re", "m2", raid::AddOptions::ranges(Vec::new()))
                .await
        })
    };
    wait_until("record write held", Duration::from_secs(5), || {
        store.waiting.load(Ordering::SeqCst) > 0
    })
    .await;
    let a = vec![0x5Au8; 8 * BS as usize];
    rb.write_blocks(100, &a, false).await.unwrap();
    model_write(&mut models, 100, &a);
    assert!(!add.is_finished());
    assert!(
        fresh.write_log().is_empty(),
        "written before it was recorded"
    );
    // ... and is not in the new member: it has to be copied like any other.
    fresh.inner().write_blocks(100, &a, false).await.unwrap();
    store.open();
    add.await.unwrap().unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), raid.wait_rebuild())
        .await
        .unwrap();
    assert_eq!(res, Some(Ok(())));
    assert!(fresh.write_log().is_empty(), "the rebuild copied something");
    let st = raid.status();
    assert_eq!(st.base_bdevs_list[2].state, "online");
    assert!(st.base_bdevs_list[2].reads);
    assert_eq!(st.num_base_bdevs_in_sync, 3);
    let last = st.last_rebuild.clone().unwrap();
    assert_eq!(
        (
            last.result,
            last.blocks_copied,
            last.blocks_total,
            last.ranges
        ),
        ("complete", 0, 0, Some(0))
    );
    let mut states: Vec<RecordedState> = store
        .history
        .lock()
        .iter()
        .filter_map(|r| r.member("m2").map(|m| m.state))
        .collect();
    states.dedup();
    assert_eq!(
        states,
        vec![RecordedState::Rebuilding, RecordedState::Online]
    );

    // It takes writes and serves reads; everything reads back.
    let b = vec![0xA5u8; 16 * BS as usize];
    rb.write_blocks(5000, &b, false).await.unwrap();
    model_write(&mut models, 5000, &b);
    assert_eq!(fresh.write_log(), vec![(5000, 16)]);
    let before = fresh.reads.load(Ordering::Relaxed);
    verify_models(&*rb, &models).await;
    assert!(fresh.reads.load(Ordering::Relaxed) > before);
    let mut c = crcs(&f).await;
    c.push(crc_of(&**fresh.inner(), BLOCKS).await);
    assert!(c.iter().all(|x| *x == c[0]), "members differ: {c:x?}");
    m.delete("re").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Ranges that do not fit the raid are refused with -EINVAL naming the raid
/// and the range; nothing changes and I/O goes on. The same member can be
/// added afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rebuild_ranges_are_refused_and_change_nothing() {
    let (reg, m, f, dir) = setup("badranges", 2).await;
    let raid = m.create(params("rx", 2)).await.unwrap();
    let rb: Arc<dyn Bdev> = reg.get("rx").unwrap();
    let fresh = FaultBdev::new("m2", BLOCKS);
    reg.register(fresh.clone(), &[]).unwrap();
    let load = Load::start(rb.clone(), 4, BLOCKS / 4, 51);
    load.wait_ops(300, Duration::from_secs(30)).await;
    let members = raid.record().members;
    let generation = raid.status().persist.generation;
    let cases: Vec<(Vec<(u64, u64)>, &str)> = vec![
        (vec![(0, 8), (BLOCKS - 1, 2)], "entry 1 [32767, 2]"),
        (vec![(BLOCKS, 1)], "entry 0 [32768, 1]"),
        (vec![(u64::MAX, 2)], "entry 0 [18446744073709551615, 2]"),
        (vec![(10, 4), (5, 0)], "entry 1 [5, 0] has no blocks"),
    ];
    for (ranges, needle) in cases {
        let e = m
            .add_base_bdev_with("rx", "m2", raid::AddOptions::ranges(ranges.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), -libc::EINVAL, "{ranges:?}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("corral_rebuild_ranges") && msg.contains("'rx'") && msg.contains(needle),
            "{ranges:?}: {msg}"
        );
    }
    // An unknown raid is still -ENODEV.
    assert_eq!(
        errno(
            m.add_base_bdev_with("nope", "m2", raid::AddOptions::ranges(vec![(0, 1)]))
                .await
        ),
        -libc::ENODEV
    );
    assert_eq!(reg.claim_of("m2").map(|c| c.holder), None);
    let st = raid.status();
    assert_eq!((st.num_base_bdevs, st.num_base_bdevs_in_sync), (2, 2));
    assert!(st.rebuild.is_none() && st.last_rebuild.is_none());
    assert_eq!(st.persist.generation, generation);
    assert_eq!(raid.record().members, members);
    assert_eq!(fresh.writes.load(Ordering::Relaxed), 0);
    load.wait_ops(300, Duration::from_secs(30)).await;
    let models = load.stop().await;
    verify_models(&*rb, &models).await;
    let c = crcs(&f).await;
    assert!(c.iter().all(|x| *x == c[0]), "members differ: {c:x?}");
    // The member is still free to add (whole device).
    m.add_base_bdev("rx", "m2").await.unwrap();
    assert_eq!(raid.wait_rebuild().await, Some(Ok(())));
    assert_eq!(
        crc_of(&**fresh.inner(), BLOCKS).await,
        crc_of(&**f[0].inner(), BLOCKS).await
    );
    verify_models(&*rb, &models).await;
    m.delete("rx").await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
