//! NBD exports through the dataplane's RPC, checked with qemu-io and qemu-img
//! (clients nobody here wrote).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{assert_err, free_port, qemu_io, Dp};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_export_of_malloc_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dp = Dp::start(tmp.path()).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    dp.ok(
        "bdev_malloc_create",
        json!({"name": "m0", "num_blocks": 32768, "block_size": 512}),
    )
    .await;
    let r = dp
        .ok(
            "corral_nbd_start",
            json!({"name": "vol", "bdev_name": "m0", "listen_address": listen}),
        )
        .await;
    let uri = r["uri"].as_str().unwrap().to_string();
    assert_eq!(uri, format!("nbd://127.0.0.1:{port}/vol"));
    assert_err(
        dp.call(
            "corral_nbd_start",
            json!({"name": "vol", "bdev_name": "m0", "listen_address": listen}),
        )
        .await,
        -16,
        None,
    );
    let e = dp
        .call("bdev_malloc_delete", json!({"name": "m0"}))
        .await
        .unwrap_err();
    assert!(e.message.contains("nbd vol"), "{e:?}");
    let r = qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 4M 64k",
            "read -P 0xab 0 1M",
            "read -P 0xcd 4M 64k",
            "read -P 0 8M 4k",
        ],
    );
    assert!(r.is_ok(), "{r:?}");
    // The data really is in the bdev: a second export of another bdev is independent.
    let f = tmp.path().join("f.img");
    std::fs::File::create(&f).unwrap().set_len(8 << 20).unwrap();
    dp.ok(
        "bdev_aio_create",
        json!({"name": "f0", "filename": f, "block_size": 512}),
    )
    .await;
    dp.ok(
        "corral_nbd_start",
        json!({"name": "file", "bdev_name": "f0", "listen_address": listen}),
    )
    .await;
    let list = dp.ok("corral_nbd_list", Value::Null).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    let one = dp.ok("corral_nbd_list", json!({"name": "file"})).await;
    assert_eq!(one.as_array().map(|a| a.len()), Some(1), "{one}");
    assert_eq!(one[0]["bdev_name"], "f0");
    let e = dp
        .call("corral_nbd_list", json!({"name": "no-such-export"}))
        .await
        .unwrap_err();
    assert_eq!(e.code, -libc::ENODEV, "{e:?}");
    // qemu-img convert in and out of the file export, compared.
    let src = tmp.path().join("src.raw");
    let data: Vec<u8> = (0..(4u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let furi = format!("nbd://127.0.0.1:{port}/file");
    let st = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&furi)
        .status()
        .unwrap();
    assert!(st.success());
    let back = tmp.path().join("back.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&furi)
        .arg(&back)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(&std::fs::read(&back).unwrap()[..data.len()], &data[..]);
    dp.ok("corral_nbd_stop", json!({"name": "vol"})).await;
    assert_err(
        dp.call("corral_nbd_stop", json!({"name": "vol"})).await,
        -19,
        None,
    );
    dp.ok("bdev_malloc_delete", json!({"name": "m0"})).await;
    assert_eq!(
        dp.ok("corral_nbd_list", Value::Null)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
