//! The dataplane's JSON-RPC, driven as SPDK's rpc.py would: success and every
//! error code, bad input, many clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{assert_err, Dp};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_basics_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dp = Dp::start(tmp.path()).await;
    let mode = std::fs::metadata(&dp.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "RPC socket mode");
    let v = dp.ok("spdk_get_version", Value::Null).await;
    assert!(v["version"].as_str().unwrap().starts_with("corral"));
    let m = dp.ok("rpc_get_methods", Value::Null).await;
    assert!(m
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x == "bdev_nvme_attach_controller"));
    assert_err(
        dp.call("no_such_method", Value::Null).await,
        -32601,
        Some("Method not found"),
    );
    // Missing and wrong-typed params name the field.
    let e = dp
        .call("bdev_malloc_create", json!({"block_size": 512}))
        .await
        .unwrap_err();
    assert_eq!(e.code, -32602);
    assert!(e.message.contains("num_blocks"), "{e:?}");
    let e = dp
        .call(
            "bdev_malloc_create",
            json!({"num_blocks": "many", "block_size": 512}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, -32602);
    // Two requests in one write, no framing, then a notification (no answer).
    let mut c = dp.client().await;
    c.send_raw(br#"{"jsonrpc":"2.0","method":"spdk_get_version","id":7}{"jsonrpc":"2.0","method":"rpc_get_methods","id":8}  {"jsonrpc":"2.0","method":"spdk_get_version"}"#)
        .await
        .unwrap();
    assert_eq!(c.read_value().await.unwrap()["id"], 7);
    assert_eq!(c.read_value().await.unwrap()["id"], 8);
    // A request split across writes.
    c.send_raw(br#"{"jsonrpc":"2.0","meth"#).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send_raw(br#"od":"spdk_get_version","id":9}"#)
        .await
        .unwrap();
    assert_eq!(c.read_value().await.unwrap()["id"], 9);
    // Malformed JSON: parse error, that connection closes, others keep working.
    let mut bad = dp.client().await;
    bad.send_raw(b"{\"jsonrpc\": \"2.0\", \"method\": }")
        .await
        .unwrap();
    let v = bad.read_value().await.unwrap();
    assert_eq!(v["error"]["code"], -32700);
    assert!(
        bad.read_value().await.is_err(),
        "connection closed after a parse error"
    );
    // Not an object.
    let v = {
        let mut c2 = dp.client().await;
        c2.send_raw(b"[1,2,3]").await.unwrap();
        c2.read_value().await.unwrap()
    };
    assert_eq!(v["error"]["code"], -32600);
    // An oversized request is refused without the daemon holding it all.
    let mut big = dp.client().await;
    let mut junk = b"{\"jsonrpc\":\"2.0\",\"method\":\"x\",\"params\":{\"a\":\"".to_vec();
    junk.extend(std::iter::repeat_n(b'a', 17 << 20));
    let _ = big.send_raw(&junk).await;
    let v = big.read_value().await.unwrap();
    assert_eq!(v["error"]["code"], -32700);
    // A slow client that sends half a request holds nobody up.
    let mut slow = dp.client().await;
    slow.send_raw(b"{\"jsonrpc\":\"2.0\",").await.unwrap();
    let t0 = std::time::Instant::now();
    for _ in 0..20 {
        dp.ok("spdk_get_version", Value::Null).await;
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Many clients at once.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let sock = dp.sock.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = dataplane::rpc::RpcClient::connect(&sock).await.unwrap();
            let n = format!("M{i}");
            c.call(
                "bdev_malloc_create",
                json!({"name": n, "num_blocks": 2048, "block_size": 512}),
            )
            .await
            .unwrap()
            .unwrap();
            c.call("bdev_get_bdevs", json!({"name": n}))
                .await
                .unwrap()
                .unwrap()
        }));
    }
    for t in tasks {
        let v = t.await.unwrap();
        assert_eq!(v[0]["num_blocks"], 2048);
    }
    assert!(c
        .call("spdk_get_version", Value::Null)
        .await
        .unwrap()
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdev_methods_and_claims() {
    let tmp = tempfile::tempdir().unwrap();
    let dp = Dp::start(tmp.path()).await;
    assert_eq!(
        dp.ok(
            "bdev_malloc_create",
            json!({"num_blocks": 2048, "block_size": 4096})
        )
        .await,
        "Malloc0"
    );
    assert_err(
        dp.call(
            "bdev_malloc_create",
            json!({"name": "Malloc0", "num_blocks": 8, "block_size": 512}),
        )
        .await,
        -17,
        None,
    );
    assert_err(
        dp.call(
            "bdev_malloc_create",
            json!({"name": "x", "num_blocks": 8, "block_size": 1000}),
        )
        .await,
        -22,
        None,
    );
    let b = dp.ok("bdev_get_bdevs", json!({"name": "Malloc0"})).await;
    assert_eq!(b[0]["block_size"], 4096);
    assert_eq!(b[0]["product_name"], "Malloc disk");
    assert_eq!(b[0]["supported_io_types"]["unmap"], true);
    assert_err(
        dp.call("bdev_get_bdevs", json!({"name": "nope"})).await,
        -19,
        Some("No such device"),
    );
    // File bdev.
    let f = tmp.path().join("disk.img");
    std::fs::File::create(&f)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    assert_eq!(
        dp.ok(
            "bdev_aio_create",
            json!({"name": "F0", "filename": f, "block_size": 512})
        )
        .await,
        "F0"
    );
    assert_err(
        dp.call(
            "bdev_aio_create",
            json!({"name": "F1", "filename": tmp.path().join("missing")}),
        )
        .await,
        -2,
        None,
    );
    // A namespace claims its bdev: delete says who holds it.
    dp.ok("nvmf_create_transport", json!({"trtype": "TCP"}))
        .await;
    assert_err(
        dp.call("nvmf_create_transport", json!({"trtype": "TCP"}))
            .await,
        -17,
        None,
    );
    dp.ok(
        "nvmf_create_subsystem",
        json!({"nqn": "nqn.2024-01.io.corral:c1", "allow_any_host": true}),
    )
    .await;
    let nsid = dp
        .ok(
            "nvmf_subsystem_add_ns",
            json!({"nqn": "nqn.2024-01.io.corral:c1", "namespace": {"bdev_name": "F0"}}),
        )
        .await;
    assert_eq!(nsid, 1);
    let e = dp
        .call("bdev_aio_delete", json!({"name": "F0"}))
        .await
        .unwrap_err();
    assert_eq!(e.code, -16);
    assert!(
        e.message
            .contains("claimed by nvmf nqn.2024-01.io.corral:c1"),
        "{e:?}"
    );
    assert_err(
        dp.call("bdev_malloc_delete", json!({"name": "F0"})).await,
        -19,
        None,
    );
    let b = dp.ok("bdev_get_bdevs", json!({"name": "F0"})).await;
    assert_eq!(b[0]["claimed"], true);
    dp.ok(
        "nvmf_subsystem_remove_ns",
        json!({"nqn": "nqn.2024-01.io.corral:c1", "nsid": 1}),
    )
    .await;
    dp.ok("bdev_aio_delete", json!({"name": "F0"})).await;
    dp.ok("bdev_malloc_delete", json!({"name": "Malloc0"}))
        .await;
    assert_err(
        dp.call("bdev_malloc_delete", json!({"name": "Malloc0"}))
            .await,
        -19,
        None,
    );
    let st = dp.ok("bdev_get_iostat", Value::Null).await;
    assert!(st["bdevs"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvmf_methods() {
    let tmp = tempfile::tempdir().unwrap();
    let dp = Dp::start(tmp.path()).await;
    let nqn = "nqn.2024-01.io.corral:s1";
    // Listener before a transport exists: refused like SPDK.
    dp.ok("nvmf_create_subsystem", json!({"nqn": nqn})).await;
    let la = json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "0"});
    assert_err(
        dp.call(
            "nvmf_subsystem_add_listener",
            json!({"nqn": nqn, "listen_address": la}),
        )
        .await,
        -32602,
        None,
    );
    dp.ok(
        "nvmf_create_transport",
        json!({"trtype": "TCP", "max_io_size": 131072}),
    )
    .await;
    let t = dp.ok("nvmf_get_transports", Value::Null).await;
    assert_eq!(t[0]["max_io_size"], 131072);
    let l = dp
        .ok(
            "nvmf_subsystem_add_listener",
            json!({"nqn": nqn, "listen_address": la}),
        )
        .await;
    let port = l["trsvcid"].as_str().unwrap().to_string();
    assert_err(
        dp.call("nvmf_create_subsystem", json!({"nqn": nqn})).await,
        -32602,
        None,
    );
    assert_err(
        dp.call("nvmf_create_subsystem", json!({"nqn": "not-an-nqn"}))
            .await,
        -32602,
        None,
    );
    dp.ok(
        "bdev_malloc_create",
        json!({"name": "m", "num_blocks": 2048, "block_size": 512}),
    )
    .await;
    assert_err(
        dp.call(
            "nvmf_subsystem_add_ns",
            json!({"nqn": nqn, "namespace": {"bdev_name": "nope"}}),
        )
        .await,
        -19,
        None,
    );
    dp.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": "m", "nsid": 3}}),
    )
    .await;
    dp.ok("nvmf_subsystem_add_host", json!({"nqn": nqn, "host": "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"})).await;
    assert_err(dp.call("nvmf_subsystem_add_host", json!({"nqn": nqn, "host": "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"})).await, -32602, None);
    let s = dp.ok("nvmf_get_subsystems", json!({"nqn": nqn})).await;
    assert_eq!(s[0]["namespaces"][0]["nsid"], 3);
    assert_eq!(s[0]["namespaces"][0]["bdev_name"], "m");
    assert_eq!(s[0]["listen_addresses"][0]["trsvcid"], port);
    assert_eq!(s[0]["allow_any_host"], false);
    assert_eq!(s[0]["hosts"].as_array().unwrap().len(), 1);
    let all = dp.ok("nvmf_get_subsystems", Value::Null).await;
    assert_eq!(all[0]["subtype"], "Discovery");
    assert_eq!(
        dp.ok("nvmf_subsystem_get_controllers", json!({"nqn": nqn}))
            .await,
        json!([])
    );
    assert_eq!(
        dp.ok("nvmf_subsystem_get_qpairs", json!({"nqn": nqn}))
            .await,
        json!([])
    );
    dp.ok(
        "nvmf_subsystem_allow_any_host",
        json!({"nqn": nqn, "allow_any_host": true}),
    )
    .await;
    dp.ok("nvmf_subsystem_remove_listener", json!({"nqn": nqn, "listen_address": {"trtype": "TCP", "traddr": "127.0.0.1", "trsvcid": port}})).await;
    dp.ok("nvmf_delete_subsystem", json!({"nqn": nqn})).await;
    assert_err(
        dp.call("nvmf_delete_subsystem", json!({"nqn": nqn})).await,
        -32602,
        None,
    );
    // Deleting the subsystem released the namespace's claim.
    dp.ok("bdev_malloc_delete", json!({"name": "m"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dp = Dp::start(tmp.path()).await;
    dp.serve_malloc("nqn.2024-01.io.corral:t", "m", 8, 0, true)
        .await;
    assert_eq!(dp.terminate(), Some(0));
    assert!(!dp.sock.exists(), "socket removed on exit");
    // A second dataplane on the same state dir is refused while one runs.
    let dp2 = Dp::start(&tmp.path().join("b")).await;
    let out = std::process::Command::new(common::corral_bin())
        .args(["dataplane", "--rpc-socket"])
        .arg(tmp.path().join("c.sock"))
        .arg("--state-dir")
        .arg(dp2.dir.join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
