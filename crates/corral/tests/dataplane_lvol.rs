//! The replica store through the dataplane and an NBD export, checked with
//! qemu-io patterns and fio verify: snapshot, clone, revert, snapshot delete
//! under load, kill -9 durability, and a full disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{assert_err, fio_write_verify, free_port, qemu_io, Dp};
use serde_json::{json, Value};

async fn export(dp: &Dp, name: &str, bdev: &str, port: u16) -> String {
    let r = dp
        .ok(
            "corral_nbd_start",
            json!({"name": name, "bdev_name": bdev, "listen_address": format!("127.0.0.1:{port}")}),
        )
        .await;
    r["uri"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_clone_revert_delete_through_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let dp = Dp::start(&tmp.path().join("dp")).await;
    let port = free_port();
    let dir = tmp.path().join("disk0");
    std::fs::create_dir_all(&dir).unwrap();
    dp.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": dir, "lvs_name": "lvs0"}),
    )
    .await;
    assert_err(
        dp.call(
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": dir, "lvs_name": "other"}),
        )
        .await,
        -17,
        None,
    );
    dp.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "vol", "size_in_mib": 64, "thin_provision": true, "lvs_name": "lvs0"}),
    )
    .await;
    let uri = export(&dp, "vol", "lvs0/vol", port).await;
    qemu_io(&uri, &["write -P 0x11 0 4M"]).unwrap();
    dp.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/vol", "snapshot_name": "s1"}),
    )
    .await;
    qemu_io(
        &uri,
        &[
            "write -P 0x22 2M 4M",
            "read -P 0x11 0 2M",
            "read -P 0x22 2M 4M",
            "read -P 0 6M 1M",
        ],
    )
    .unwrap();
    // A clone of s1 sees s1's data and is independent of the head.
    dp.ok(
        "bdev_lvol_clone",
        json!({"snapshot_name": "lvs0/s1", "clone_name": "c1"}),
    )
    .await;
    let curi = export(&dp, "c1", "lvs0/c1", port).await;
    qemu_io(
        &curi,
        &["read -P 0x11 0 4M", "read -P 0 4M 2M", "write -P 0x33 0 1M"],
    )
    .unwrap();
    qemu_io(&uri, &["read -P 0x11 0 1M"]).unwrap();
    // A snapshot is read-only and cannot be resized; shrinking is refused.
    let suri = export(&dp, "s1", "lvs0/s1", port).await;
    assert!(
        qemu_io(&suri, &["write -P 0x44 0 4k"]).is_err(),
        "write to a snapshot must fail"
    );
    qemu_io(&suri, &["read -P 0x11 0 4M"]).unwrap();
    dp.ok("corral_nbd_stop", json!({"name": "s1"})).await;
    assert_err(
        dp.call(
            "bdev_lvol_resize",
            json!({"name": "lvs0/vol", "size_in_mib": 32}),
        )
        .await,
        -22,
        None,
    );
    // The snapshot has a clone and the head on top: deleting it is refused.
    assert_err(
        dp.call("bdev_lvol_delete", json!({"name": "lvs0/s1"}))
            .await,
        -1,
        None,
    );
    let lv = dp
        .ok("bdev_lvol_get_lvols", json!({"lvs_name": "lvs0"}))
        .await;
    assert_eq!(lv.as_array().unwrap().len(), 3);
    // Fragmap: s1 holds the first 4 MiB only.
    let f = dp
        .ok(
            "corral_lvol_get_fragmap",
            json!({"name": "lvs0/s1", "offset": 0, "size": 64 << 20}),
        )
        .await;
    assert_eq!(
        f["num_allocated_blocks"].as_u64().unwrap() * f["block_size"].as_u64().unwrap(),
        4 << 20
    );
    // Revert the head to s1 (export idle): it reads s1's data again.
    dp.ok(
        "corral_lvol_revert",
        json!({"name": "lvs0/vol", "snapshot_name": "lvs0/s1"}),
    )
    .await;
    qemu_io(&uri, &["read -P 0x11 0 4M", "read -P 0 4M 2M"]).unwrap();
    // Snapshot delete under load: the clone goes, then s2 (head's only parent
    // chain: s1 <- s2 <- vol) is merged while fio writes and verifies the head.
    dp.ok("corral_nbd_stop", json!({"name": "c1"})).await;
    dp.ok("bdev_lvol_delete", json!({"name": "lvs0/c1"})).await;
    qemu_io(&uri, &["write -P 0x55 8M 8M"]).unwrap();
    dp.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/vol", "snapshot_name": "s2"}),
    )
    .await;
    let out = tmp.path().join("fio.json");
    let fio = fio_write_verify("merge", &uri, "32M", "16M", "4m", &out);
    tokio::time::sleep(Duration::from_secs(1)).await;
    dp.ok("bdev_lvol_delete", json!({"name": "lvs0/s2"})).await;
    let st = tokio::task::spawn_blocking(move || {
        let mut fio = fio;
        fio.wait()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        st.success(),
        "fio verify under snapshot delete failed: {}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );
    qemu_io(&uri, &["read -P 0x11 0 4M", "read -P 0x55 8M 8M"]).unwrap();
    let ck1 = dp
        .ok("corral_lvol_get_checksum", json!({"name": "lvs0/s1"}))
        .await;
    let ck2 = dp
        .ok("corral_lvol_get_checksum", json!({"name": "lvs0/s1"}))
        .await;
    assert_eq!(ck1, ck2);
    // In use: the export holds the head.
    assert_err(
        dp.call("bdev_lvol_delete", json!({"name": "lvs0/vol"}))
            .await,
        -16,
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_writes_survive_kill9() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dp = Dp::start(&tmp.path().join("dp")).await;
    let port = free_port();
    let dir = tmp.path().join("disk0");
    std::fs::create_dir_all(&dir).unwrap();
    let u = dp
        .ok(
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": dir, "lvs_name": "lvs0"}),
        )
        .await;
    dp.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "vol", "size_in_mib": 32, "thin_provision": true, "lvs_name": "lvs0"}),
    )
    .await;
    let uri = export(&dp, "vol", "lvs0/vol", port).await;
    qemu_io(
        &uri,
        &[
            "write -P 0x7e 0 8M",
            "flush",
            "write -P 0x7f 16M 1M",
            "flush",
        ],
    )
    .unwrap();
    dp.kill9();
    let dp = Dp::start(&tmp.path().join("dp")).await;
    let r = dp
        .ok("corral_lvol_load_lvstore", json!({"bdev_name": dir}))
        .await;
    assert_eq!(r["uuid"], u);
    let uri = export(&dp, "vol", "lvs0/vol", port).await;
    qemu_io(&uri, &["read -P 0x7e 0 8M", "read -P 0x7f 16M 1M"]).unwrap();
    // The directory belongs to this store: loading it again is refused.
    assert_err(
        dp.call("corral_lvol_load_lvstore", json!({"bdev_name": dir}))
            .await,
        -17,
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_writes_keeps_reads_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("small");
    std::fs::create_dir_all(&dir).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _u = Umount(dir.clone());
    let dp = Dp::start(&tmp.path().join("dp")).await;
    let port = free_port();
    dp.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": dir, "lvs_name": "lvs0"}),
    )
    .await;
    dp.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "vol", "size_in_mib": 64, "thin_provision": true, "lvs_name": "lvs0"}),
    )
    .await;
    let uri = export(&dp, "vol", "lvs0/vol", port).await;
    qemu_io(&uri, &["write -P 0x12 0 8M"]).unwrap();
    let e = qemu_io(&uri, &["write -P 0x13 16M 32M"]).unwrap_err();
    assert!(e.contains("No space left on device"), "{e}");
    qemu_io(&uri, &["read -P 0x12 0 8M"]).unwrap();
    // Free space (unmap punches holes) and writes work again.
    qemu_io(&uri, &["discard 16M 32M"]).unwrap();
    qemu_io(
        &uri,
        &[
            "write -P 0x14 40M 4M",
            "read -P 0x14 40M 4M",
            "read -P 0x12 0 8M",
        ],
    )
    .unwrap();
    let _ = Value::Null;
}

/// Polls `bdev_lvol_check_shallow_copy` until the operation ends (bounded).
async fn wait_copy(dp: &Dp, id: u64) -> Value {
    let t0 = std::time::Instant::now();
    loop {
        let st = dp
            .ok("bdev_lvol_check_shallow_copy", json!({"operation_id": id}))
            .await;
        if st["state"] != "in progress" {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "shallow copy {id} still in progress after 60 s: {st}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a shallow copy and waits for it; returns the final status.
async fn shallow_copy(dp: &Dp, src: &str, dst: &str) -> (u64, Value) {
    let r = dp
        .ok(
            "bdev_lvol_start_shallow_copy",
            json!({"src_lvol_name": src, "dst_bdev_name": dst}),
        )
        .await;
    let id = r["operation_id"].as_u64().unwrap();
    (id, wait_copy(dp, id).await)
}

async fn layer_map(dp: &Dp, name: &str) -> Value {
    let f = dp
        .ok(
            "corral_lvol_get_fragmap",
            json!({"name": name, "scope": "layer"}),
        )
        .await;
    json!({"block_size": f["block_size"], "ranges": f["ranges"], "n": f["num_allocated_blocks"]})
}

fn allocated(map: &Value, offset: u64, len: u64) -> bool {
    let bs = map["block_size"].as_u64().unwrap();
    let (s, e) = (offset / bs, (offset + len) / bs);
    map["ranges"].as_array().unwrap().iter().any(|r| {
        let (a, n) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
        a <= s && e <= a + n
    })
}

fn overlaps(map: &Value, offset: u64, len: u64) -> bool {
    let bs = map["block_size"].as_u64().unwrap();
    let (s, e) = (offset / bs, (offset + len) / bs);
    map["ranges"].as_array().unwrap().iter().any(|r| {
        let (a, n) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
        a < e && s < a + n
    })
}

/// Rebuilds a 3-snapshot chain on another dataplane over NVMe/TCP with
/// bdev_lvol_start_shallow_copy, as the control plane does: for each snapshot
/// (oldest first) copy its own layer into the new replica's head through an
/// NVMe bdev, then snapshot that head. Each copy must equal its source in
/// content (checksum) and allocation (layer fragmap), including blocks a later
/// layer overwrote, write-zeroes and unmaps hiding older data (zero blocks that
/// must come across), and holes. Then: SPDK's error codes, a destination with
/// smaller blocks, an I/O error on the destination (full disk), and the bound
/// on remembered operations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shallow_copy_rebuilds_a_snapshot_chain_over_nvme_tcp() {
    tokio::time::timeout(Duration::from_secs(240), shallow_copy_body())
        .await
        .expect("shallow copy test timed out");
}

async fn shallow_copy_body() {
    const SUB: &str = "nqn.2024-01.io.corral:rebuild-dst";
    let tmp = tempfile::tempdir().unwrap();
    let a = Dp::start(&tmp.path().join("a")).await;
    let b = Dp::start(&tmp.path().join("b")).await;
    for (dp, lvs) in [(&a, "lvsA"), (&b, "lvsB")] {
        let dir = tmp.path().join(lvs);
        std::fs::create_dir_all(&dir).unwrap();
        dp.ok(
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": dir, "lvs_name": lvs}),
        )
        .await;
    }
    // B: a fresh replica head, served over NVMe/TCP.
    b.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "dst", "size_in_mib": 64, "thin_provision": true, "lvs_name": "lvsB"}),
    )
    .await;
    b.ok("nvmf_create_transport", json!({"trtype": "TCP"}))
        .await;
    b.ok(
        "nvmf_create_subsystem",
        json!({"nqn": SUB, "allow_any_host": true}),
    )
    .await;
    b.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": SUB, "namespace": {"bdev_name": "lvsB/dst"}}),
    )
    .await;
    let port = b
        .ok("nvmf_subsystem_add_listener", json!({"nqn": SUB, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "0"}}))
        .await["trsvcid"]
        .as_str()
        .unwrap()
        .to_string();

    // A: a head with three snapshots whose layers differ.
    a.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "vol", "size_in_mib": 64, "thin_provision": true, "lvs_name": "lvsA"}),
    )
    .await;
    let uri = export(&a, "vol", "lvsA/vol", free_port()).await;
    let layers: [&[&str]; 3] = [
        &[
            "write -P 0x11 0 8M",
            "write -P 0x12 16M 4M",
            "write -P 0x13 40M 1M",
            "write -P 0x14 63M 4k",
        ],
        &[
            "write -P 0x21 2M 2M",  // overwrites s1
            "write -z 4M 1M",       // write-zeroes over s1: a zero block hiding it
            "discard 17M 1M",       // unmap over s1: likewise
            "write -P 0x22 30M 3M", // over a hole
            "discard 50M 1M",       // unmap of a hole: nothing
            "write -P 0x23 63M 4k", // overwrites s1's last block
        ],
        &[
            "write -P 0x31 3M 1M",  // overwrites s2 over s1
            "write -P 0x32 4M 64k", // over s2's zero blocks
            "discard 0 1M",         // hides s1's first MiB
            "write -z 18M 1M",      // zero blocks over s1's 0x12
            "write -P 0x33 60M 2M",
        ],
    ];
    for (i, cmds) in layers.iter().enumerate() {
        qemu_io(&uri, cmds).unwrap();
        a.ok(
            "bdev_lvol_snapshot",
            json!({"lvol_name": "lvsA/vol", "snapshot_name": format!("s{}", i + 1)}),
        )
        .await;
    }
    // Writes after the last snapshot stay on A's head.
    qemu_io(&uri, &["write -P 0x44 0 4M"]).unwrap();
    // The layers hold what the cases need: zero blocks hiding older data are
    // allocated, an unmapped hole is not.
    let m2 = layer_map(&a, "lvsA/s2").await;
    assert!(allocated(&m2, 4 << 20, 1 << 20), "{m2}");
    assert!(allocated(&m2, 17 << 20, 1 << 20), "{m2}");
    assert!(!overlaps(&m2, 50 << 20, 1 << 20), "{m2}");
    assert!(!overlaps(&m2, 8 << 20, 8 << 20), "{m2}");
    let m3 = layer_map(&a, "lvsA/s3").await;
    assert!(allocated(&m3, 0, 1 << 20), "{m3}");
    assert!(allocated(&m3, 18 << 20, 1 << 20), "{m3}");

    let names = a
        .ok(
            "bdev_nvme_attach_controller",
            json!({"name": "rb", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                   "trsvcid": port, "subnqn": SUB, "multipath": "disable"}),
        )
        .await;
    assert_eq!(names, json!(["rbn1"]));

    // SPDK's errors, each naming what failed.
    let start = |src: &str, dst: &str| json!({"src_lvol_name": src, "dst_bdev_name": dst});
    let e = a
        .call("bdev_lvol_start_shallow_copy", start("lvsA/vol", "rbn1"))
        .await;
    assert_err(e.clone(), -1, None);
    assert!(e.unwrap_err().message.contains("lvsA/vol"));
    let e = a
        .call("bdev_lvol_start_shallow_copy", start("lvsA/nope", "rbn1"))
        .await;
    assert_err(e.clone(), -19, None);
    assert!(e.unwrap_err().message.contains("lvsA/nope"));
    let e = a
        .call("bdev_lvol_start_shallow_copy", start("lvsA/s1", "nope"))
        .await;
    assert_err(e.clone(), -19, None);
    assert!(e.unwrap_err().message.contains("nope"));
    a.ok(
        "bdev_malloc_create",
        json!({"name": "small", "num_blocks": 4096, "block_size": 4096}),
    )
    .await;
    let e = a
        .call("bdev_lvol_start_shallow_copy", start("lvsA/s1", "small"))
        .await;
    assert_err(e.clone(), -22, None);
    assert!(e.unwrap_err().message.contains("small"));
    // The head is exported (claimed by NBD): busy, naming the holder.
    let e = a
        .call("bdev_lvol_start_shallow_copy", start("lvsA/s1", "lvsA/vol"))
        .await;
    assert_err(e.clone(), -16, None);
    assert!(e.unwrap_err().message.contains("nbd"));
    // A snapshot is no destination.
    assert_err(
        a.call("bdev_lvol_start_shallow_copy", start("lvsA/s1", "lvsA/s2"))
            .await,
        -1,
        None,
    );
    assert_err(
        a.call(
            "bdev_lvol_check_shallow_copy",
            json!({"operation_id": 4_000_000_000u64}),
        )
        .await,
        -19,
        None,
    );
    assert_err(
        a.call(
            "bdev_lvol_start_shallow_copy",
            json!({"src_lvol_name": "lvsA/s1"}),
        )
        .await,
        -32602,
        None,
    );

    // The rebuild: oldest first, copy then snapshot the destination head.
    for s in ["s1", "s2", "s3"] {
        let src = format!("lvsA/{s}");
        let want = layer_map(&a, &src).await;
        let (id, st) = shallow_copy(&a, &src, "rbn1").await;
        assert_eq!(st["state"], "complete", "{src}: {st}");
        assert_eq!(st["copied_blocks"], want["n"], "{src}: {st}");
        assert_eq!(st["total_blocks"], want["n"], "{src}: {st}");
        assert_eq!(st["copied_clusters"], st["total_clusters"], "{st}");
        assert!(st["total_clusters"].as_u64().unwrap() > 0, "{st}");
        assert!(st.get("error").is_none(), "{st}");
        // Still there when asked again (a retried check gets the same answer).
        assert_eq!(
            a.ok("bdev_lvol_check_shallow_copy", json!({"operation_id": id}))
                .await,
            st
        );
        // The destination is released when the copy has ended.
        let bd = a.ok("bdev_get_bdevs", json!({"name": "rbn1"})).await;
        assert_eq!(bd[0]["claimed"], false, "{bd}");
        b.ok(
            "bdev_lvol_snapshot",
            json!({"lvol_name": "lvsB/dst", "snapshot_name": s}),
        )
        .await;
    }
    for s in ["s1", "s2", "s3"] {
        let ca = a
            .ok(
                "corral_lvol_get_checksum",
                json!({"name": format!("lvsA/{s}")}),
            )
            .await;
        let cb = b
            .ok(
                "corral_lvol_get_checksum",
                json!({"name": format!("lvsB/{s}")}),
            )
            .await;
        assert_eq!(ca, cb, "content of {s}");
        assert_eq!(
            layer_map(&a, &format!("lvsA/{s}")).await,
            layer_map(&b, &format!("lvsB/{s}")).await,
            "own blocks of {s}"
        );
    }
    // B's head reads as s3 and holds nothing of its own.
    assert_eq!(layer_map(&b, "lvsB/dst").await["n"], 0);
    assert_eq!(
        a.ok("corral_lvol_get_checksum", json!({"name": "lvsA/s3"}))
            .await["checksum"],
        b.ok("corral_lvol_get_checksum", json!({"name": "lvsB/dst"}))
            .await["checksum"]
    );
    // And B's s2 holds the data qemu-io wrote, zero blocks included.
    a.ok("bdev_nvme_detach_controller", json!({"name": "rb"}))
        .await;
    let s2uri = export(&b, "s2", "lvsB/s2", free_port()).await;
    qemu_io(
        &s2uri,
        &[
            "read -P 0x11 0 2M",
            "read -P 0x21 2M 2M",
            "read -P 0 4M 1M",
            "read -P 0x11 5M 3M",
            "read -P 0x12 16M 1M",
            "read -P 0 17M 1M",
            "read -P 0x12 18M 2M",
            "read -P 0x22 30M 3M",
            "read -P 0x13 40M 1M",
            "read -P 0 50M 1M",
            "read -P 0x23 63M 4k",
        ],
    )
    .unwrap();

    // A destination with smaller blocks: offsets scale (4096-byte source
    // blocks into a 512-byte-block lvol on the same node).
    let dir = tmp.path().join("lvs512");
    std::fs::create_dir_all(&dir).unwrap();
    a.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": dir, "lvs_name": "lvs512", "block_size": 512}),
    )
    .await;
    a.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "d512", "size_in_mib": 64, "thin_provision": true, "lvs_name": "lvs512"}),
    )
    .await;
    let (_, st) = shallow_copy(&a, "lvsA/s2", "lvs512/d512").await;
    assert_eq!(st["state"], "complete", "{st}");
    let m = layer_map(&a, "lvs512/d512").await;
    assert_eq!(m["n"].as_u64().unwrap(), m2["n"].as_u64().unwrap() * 8);
    let duri = export(&a, "d512", "lvs512/d512", free_port()).await;
    qemu_io(
        &duri,
        &[
            "read -P 0x21 2M 2M",
            "read -P 0 4M 1M",
            "read -P 0 17M 1M",
            "read -P 0x22 30M 3M",
            "read -P 0x23 63M 4k",
            "read -P 0 0 2M",
            "read -P 0 5M 12M",
        ],
    )
    .unwrap();
    a.ok("corral_nbd_stop", json!({"name": "d512"})).await;
    // Block sizes that do not fit: 512-byte source blocks into 4096.
    a.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs512/d512", "snapshot_name": "s512"}),
    )
    .await;
    a.ok(
        "bdev_malloc_create",
        json!({"name": "m4k", "num_blocks": 16384, "block_size": 4096}),
    )
    .await;
    let e = a
        .call("bdev_lvol_start_shallow_copy", start("lvs512/s512", "m4k"))
        .await;
    assert_err(e.clone(), -22, None);
    assert!(e.unwrap_err().message.contains("m4k"));

    // An I/O error on the destination (its filesystem fills up) ends the copy
    // in state "error"; the destination is released and everything else runs on.
    let tiny = tmp.path().join("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&tiny)
        .status()
        .unwrap();
    assert!(ok.success(), "mount tmpfs");
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _u = Umount(tiny.clone());
    a.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": tiny, "lvs_name": "lvsT"}),
    )
    .await;
    a.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "t", "size_in_mib": 64, "thin_provision": true, "lvs_name": "lvsT"}),
    )
    .await;
    let ck1 = a
        .ok("corral_lvol_get_checksum", json!({"name": "lvsA/s1"}))
        .await;
    let (id, st) = shallow_copy(&a, "lvsA/s1", "lvsT/t").await;
    assert_eq!(st["state"], "error", "{st}");
    let why = st["error"].as_str().unwrap();
    assert!(why.contains("no space"), "{why}");
    assert!(why.contains("writing blocks"), "{why}");
    assert!(
        st["copied_blocks"].as_u64().unwrap() < st["total_blocks"].as_u64().unwrap(),
        "{st}"
    );
    assert_eq!(
        a.ok("bdev_lvol_check_shallow_copy", json!({"operation_id": id}))
            .await["state"],
        "error"
    );
    let bd = a.ok("bdev_get_bdevs", json!({"name": "lvsT/t"})).await;
    assert_eq!(bd[0]["claimed"], false, "{bd}");
    // Released for real: another consumer can claim it.
    let _ = export(&a, "t", "lvsT/t", free_port()).await;
    a.ok("corral_nbd_stop", json!({"name": "t"})).await;
    assert_eq!(
        a.ok("corral_lvol_get_checksum", json!({"name": "lvsA/s1"}))
            .await,
        ck1
    );
    qemu_io(&uri, &["read -P 0x44 0 4M", "read -P 0x12 16M 1M"]).unwrap();

    // Ended operations stay queryable, the last 64 of them.
    a.ok(
        "bdev_malloc_create",
        json!({"name": "m512", "num_blocks": 131072, "block_size": 512}),
    )
    .await;
    let mut first = None;
    let mut last = 0;
    for _ in 0..65 {
        let (id, st) = shallow_copy(&a, "lvs512/s512", "m512").await;
        assert_eq!(st["state"], "complete", "{st}");
        first.get_or_insert(id);
        last = id;
    }
    assert_err(
        a.call(
            "bdev_lvol_check_shallow_copy",
            json!({"operation_id": first.unwrap()}),
        )
        .await,
        -19,
        None,
    );
    assert_eq!(
        a.ok(
            "bdev_lvol_check_shallow_copy",
            json!({"operation_id": last})
        )
        .await["state"],
        "complete"
    );
    // Both dataplanes still answer.
    a.ok("spdk_get_version", Value::Null).await;
    b.ok("spdk_get_version", Value::Null).await;
}

/// A copy whose destination stops answering stays "in progress" (nothing is
/// acknowledged) while the dataplane keeps answering; when the destination's
/// node dies the copy ends in "error" naming the destination, and the source
/// is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shallow_copy_to_a_lost_destination_ends_in_error() {
    tokio::time::timeout(Duration::from_secs(120), lost_destination_body())
        .await
        .expect("lost destination test timed out");
}

async fn lost_destination_body() {
    const SUB: &str = "nqn.2024-01.io.corral:lost";
    let tmp = tempfile::tempdir().unwrap();
    let a = Dp::start(&tmp.path().join("a")).await;
    let mut b = Dp::start(&tmp.path().join("b")).await;
    // 512-byte blocks on the destination: offsets scale by 8 over NVMe/TCP.
    let port = b.serve_malloc(SUB, "m1", 64, 0, true).await;
    let dir = tmp.path().join("lvsA");
    std::fs::create_dir_all(&dir).unwrap();
    a.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": dir, "lvs_name": "lvsA"}),
    )
    .await;
    a.ok(
        "bdev_lvol_create",
        json!({"lvol_name": "vol", "size_in_mib": 64, "thin_provision": true, "lvs_name": "lvsA"}),
    )
    .await;
    let uri = export(&a, "vol", "lvsA/vol", free_port()).await;
    qemu_io(&uri, &["write -P 0x5a 0 24M"]).unwrap();
    a.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvsA/vol", "snapshot_name": "s1"}),
    )
    .await;
    let ck = a
        .ok("corral_lvol_get_checksum", json!({"name": "lvsA/s1"}))
        .await;
    a.ok(
        "bdev_nvme_attach_controller",
        json!({"name": "lost", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
               "trsvcid": port.to_string(), "subnqn": SUB, "multipath": "disable",
               "ctrlr_loss_timeout_sec": 3, "reconnect_delay_sec": 1, "fast_io_fail_timeout_sec": 1}),
    )
    .await;
    b.signal(libc::SIGSTOP);
    let id = a
        .ok(
            "bdev_lvol_start_shallow_copy",
            json!({"src_lvol_name": "lvsA/s1", "dst_bdev_name": "lostn1"}),
        )
        .await["operation_id"]
        .as_u64()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = std::time::Instant::now();
    let st = a
        .ok("bdev_lvol_check_shallow_copy", json!({"operation_id": id}))
        .await;
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "check took {:?}",
        t0.elapsed()
    );
    assert_eq!(st["state"], "in progress", "{st}");
    assert_eq!(st["total_blocks"], 24 * 256, "{st}");
    assert!(
        st["copied_blocks"].as_u64().unwrap() < st["total_blocks"].as_u64().unwrap(),
        "{st}"
    );
    let bd = a.ok("bdev_get_bdevs", json!({"name": "lostn1"})).await;
    assert_eq!(bd[0]["claimed"], true, "{bd}");
    b.kill9();
    let st = wait_copy(&a, id).await;
    assert_eq!(st["state"], "error", "{st}");
    assert!(st["error"].as_str().unwrap().contains("lostn1"), "{st}");
    a.ok("spdk_get_version", Value::Null).await;
    assert_eq!(
        a.ok("corral_lvol_get_checksum", json!({"name": "lvsA/s1"}))
            .await,
        ck
    );
    qemu_io(&uri, &["read -P 0x5a 0 24M"]).unwrap();
}
