//! raid1 over three NVMe/TCP replicas served by three dataplane processes: a
//! replica killed under verified load, a fresh member rebuilt, members compared,
//! and the dataplane killed -9 while degraded still knows who is out of sync.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{fio_write_verify, free_port, qemu_io, wait_for, Dp};
use serde_json::{json, Value};

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-000000000001";

fn attach(name: &str, port: u16, sub: &str) -> Value {
    json!({"name": name, "trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": port.to_string(), "subnqn": sub,
           "hostnqn": HOST, "multipath": "disable", "ctrlr_loss_timeout_sec": 3, "reconnect_delay_sec": 1,
           "fast_io_fail_timeout_sec": 1, "corral_io_timeout_ms": 1000})
}

async fn checksum(dp: &Dp, bdev: &str) -> String {
    // Read the whole member through an NBD export and hash it.
    let port = free_port();
    let r = dp.ok("corral_nbd_start", json!({"name": format!("ck-{bdev}"), "bdev_name": bdev, "listen_address": format!("127.0.0.1:{port}")})).await;
    let uri = r["uri"].as_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("nbdcopy '{uri}' - | sha256sum"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    })
    .await
    .unwrap();
    dp.ok("corral_nbd_stop", json!({"name": format!("ck-{bdev}")}))
        .await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid1_over_nvme_kill_rebuild_and_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let mut targets = Vec::new();
    let mut ports = Vec::new();
    for i in 0..4 {
        let t = Dp::start(&tmp.path().join(format!("t{i}"))).await;
        let p = t
            .serve_malloc(&format!("nqn.2024-01.io.corral:m{i}"), "m", 64, 0, true)
            .await;
        targets.push(t);
        ports.push(p);
    }
    let mut eng = Dp::start(&tmp.path().join("engine")).await;
    for (i, port) in ports.iter().enumerate().take(3) {
        eng.ok(
            "bdev_nvme_attach_controller",
            attach(
                &format!("r{i}"),
                *port,
                &format!("nqn.2024-01.io.corral:m{i}"),
            ),
        )
        .await;
    }
    eng.ok("bdev_raid_create", json!({"name": "vol", "raid_level": "raid1", "strip_size_kb": 0, "base_bdevs": ["r0n1", "r1n1", "r2n1"]})).await;
    let nbd_port = free_port();
    let r = eng.ok("corral_nbd_start", json!({"name": "vol", "bdev_name": "vol", "listen_address": format!("127.0.0.1:{nbd_port}")})).await;
    let uri = r["uri"].as_str().unwrap().to_string();
    qemu_io(&uri, &["write -P 0xa1 40M 8M"]).unwrap();
    // Verified load while replica 2's process dies.
    let out = tmp.path().join("fio.json");
    let fio = fio_write_verify("raid", &uri, "0", "16M", "4m", &out);
    tokio::time::sleep(Duration::from_secs(1)).await;
    targets[2].kill9();
    let st = tokio::task::spawn_blocking(move || {
        let mut f = fio;
        f.wait()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        st.success(),
        "fio: {}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );
    wait_for(Duration::from_secs(15), "member r2n1 removed", || async {
        let r = eng
            .ok("bdev_raid_get_bdevs", json!({"category": "all"}))
            .await;
        r[0]["base_bdevs_list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["member"] == "r2n1" && b["state"] == "out_of_sync")
    })
    .await;
    let recs = eng.ok("corral_raid_get_records", Value::Null).await;
    let m2 = recs[0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "r2n1")
        .unwrap()
        .clone();
    assert_eq!(m2["state"], "out_of_sync", "{recs}");
    // Add a fresh member (4th target): it rebuilds, then all members match.
    eng.ok(
        "bdev_nvme_attach_controller",
        attach("r3", ports[3], "nqn.2024-01.io.corral:m3"),
    )
    .await;
    eng.ok(
        "bdev_raid_add_base_bdev",
        json!({"raid_bdev": "vol", "base_bdev": "r3n1"}),
    )
    .await;
    wait_for(Duration::from_secs(60), "rebuild done", || async {
        let r = eng
            .ok("bdev_raid_get_bdevs", json!({"category": "all"}))
            .await;
        r[0]["base_bdevs_list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["member"] == "r3n1" && b["state"] == "online")
    })
    .await;
    qemu_io(&uri, &["read -P 0xa1 40M 8M"]).unwrap();
    eng.ok("corral_nbd_stop", json!({"name": "vol"})).await;
    eng.ok("bdev_raid_delete", json!({"name": "vol"})).await;
    let sums = [
        checksum(&eng, "r0n1").await,
        checksum(&eng, "r1n1").await,
        checksum(&eng, "r3n1").await,
    ];
    assert!(!sums[0].is_empty());
    assert!(
        sums.iter().all(|s| s == &sums[0]),
        "members differ: {sums:?}"
    );
    // Degraded again (r1 dies), then the engine dataplane is killed -9: after the
    // restart the record still says r1n1 is out of sync.
    eng.ok("bdev_raid_create", json!({"name": "vol2", "raid_level": "raid1", "strip_size_kb": 0, "base_bdevs": ["r0n1", "r1n1"]})).await;
    // A lookup by name returns that raid only; an unknown name is -ENODEV.
    let one = eng
        .ok(
            "bdev_raid_get_bdevs",
            json!({"category": "all", "name": "vol2"}),
        )
        .await;
    assert_eq!(one.as_array().map(|a| a.len()), Some(1), "{one}");
    assert_eq!(one[0]["name"], "vol2");
    let e = eng
        .call("bdev_raid_get_bdevs", json!({"name": "no-such-raid"}))
        .await
        .unwrap_err();
    assert_eq!(e.code, -libc::ENODEV, "{e:?}");
    let r = eng.ok("corral_nbd_start", json!({"name": "vol2", "bdev_name": "vol2", "listen_address": format!("127.0.0.1:{nbd_port}")})).await;
    let uri2 = r["uri"].as_str().unwrap().to_string();
    targets[1].kill9();
    qemu_io(&uri2, &["write -P 0xb2 0 1M"]).unwrap();
    eng.kill9();
    let eng2 = Dp::start(&tmp.path().join("engine")).await;
    let recs = eng2.ok("corral_raid_get_records", Value::Null).await;
    let rec = recs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "vol2")
        .unwrap()
        .clone();
    let m1 = rec["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "r1n1")
        .unwrap()
        .clone();
    assert_eq!(m1["state"], "out_of_sync", "{rec}");
    let m0 = rec["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "r0n1")
        .unwrap()
        .clone();
    assert_eq!(m0["state"], "online");
}
