//! The replica store through the dataplane and an NBD export, checked with
//! qemu-io patterns and fio verify: snapshot, clone, revert, snapshot delete
//! under load, kill -9 durability, and a full disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{assert_err, free_port, qemu_io, Dp};
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
    let fio = Command::new("fio")
        .args([
            "--name=merge",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--offset=32M",
            "--size=16M",
            "--rate=4m",
            "--output-format=json",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--output={}", out.display()))
        .spawn()
        .unwrap();
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
