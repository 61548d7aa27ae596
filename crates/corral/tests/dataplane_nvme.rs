//! bdev_nvme_* against real targets: every row of SPDK's conflict table, the
//! seed bug (-114 after a stale controller) and its way out, detach semantics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{assert_err, wait_for, Dp};
use serde_json::{json, Value};

const SUB: &str = "nqn.2024-01.io.corral:r1";
const HOST1: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001";
const HOST2: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000002";

fn attach(name: &str, port: u16, sub: &str, host: &str, mp: &str) -> Value {
    json!({"name": name, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
           "trsvcid": port.to_string(), "subnqn": sub, "hostnqn": host, "multipath": mp})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_conflict_table() {
    let tmp = tempfile::tempdir().unwrap();
    let tgt = Dp::start(&tmp.path().join("t")).await;
    let host = Dp::start(&tmp.path().join("h")).await;
    let port = tgt.serve_malloc(SUB, "m1", 16, 0, true).await;
    let port2 = tgt
        .ok("nvmf_subsystem_add_listener", json!({"nqn": SUB, "listen_address": {"trtype": "TCP", "traddr": "127.0.0.1", "trsvcid": "0"}}))
        .await["trsvcid"]
        .as_str()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let names = host
        .ok(
            "bdev_nvme_attach_controller",
            attach("r1", port, SUB, HOST1, "disable"),
        )
        .await;
    assert_eq!(names, json!(["r1n1"]));
    let b = host.ok("bdev_get_bdevs", json!({"name": "r1n1"})).await;
    assert_eq!(b[0]["num_blocks"], 16 * 2048);
    assert_eq!(b[0]["product_name"], "NVMe disk");
    let c = host
        .ok("bdev_nvme_get_controllers", json!({"name": "r1"}))
        .await;
    assert_eq!(c[0]["ctrlrs"][0]["state"], "enabled");
    assert_eq!(c[0]["ctrlrs"][0]["trid"]["subnqn"], SUB);
    assert_eq!(c[0]["ctrlrs"][0]["host"]["nqn"], HOST1);
    // Row 1: name exists, multipath disabled.
    assert_err(
        host.call(
            "bdev_nvme_attach_controller",
            attach("r1", port2, SUB, HOST1, "disable"),
        )
        .await,
        -114,
        Some("A controller named r1 already exists and multipath is disabled"),
    );
    // Row 2: same name and network path, failover/multipath.
    for mp in ["failover", "multipath"] {
        assert_err(
            host.call(
                "bdev_nvme_attach_controller",
                attach("r1", port, SUB, HOST1, mp),
            )
            .await,
            -114,
            Some("A controller named r1 already exists with the specified network path"),
        );
    }
    // Rows 3 and 4: same name, different subnqn / hostnqn.
    assert_err(
        host.call(
            "bdev_nvme_attach_controller",
            attach(
                "r1",
                port2,
                "nqn.2024-01.io.corral:other",
                HOST1,
                "failover",
            ),
        )
        .await,
        -22,
        Some(&format!(
            "A controller named r1 already exists, but uses a different subnqn ({SUB})"
        )),
    );
    assert_err(
        host.call(
            "bdev_nvme_attach_controller",
            attach("r1", port2, SUB, HOST2, "failover"),
        )
        .await,
        -22,
        Some(&format!(
            "A controller named r1 already exists, but uses a different hostnqn ({HOST1})"
        )),
    );
    // Row 5: another name, same transport ID and host NQN.
    assert_err(
        host.call(
            "bdev_nvme_attach_controller",
            attach("r2", port, SUB, HOST1, "disable"),
        )
        .await,
        -17,
        Some("File exists"),
    );
    // Nothing listens there.
    let e = host
        .call(
            "bdev_nvme_attach_controller",
            attach("r3", 1, SUB, HOST1, "disable"),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, -19, "{e:?}");
    // Another host NQN on the same trid is fine.
    assert_eq!(
        host.ok(
            "bdev_nvme_attach_controller",
            attach("r2", port, SUB, HOST2, "disable")
        )
        .await,
        json!(["r2n1"])
    );
    // failover: an alternate path is recorded under the same name.
    assert_eq!(
        host.ok(
            "bdev_nvme_attach_controller",
            attach("r1", port2, SUB, HOST1, "failover")
        )
        .await,
        json!(["r1n1"])
    );
    let c = host
        .ok("bdev_nvme_get_controllers", json!({"name": "r1"}))
        .await;
    assert_eq!(
        c[0]["ctrlrs"][0]["alternate_trids"][0]["trsvcid"],
        port2.to_string()
    );
    // Bad knobs are refused like SPDK.
    let mut a = attach(
        "r4",
        port,
        SUB,
        "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000004",
        "disable",
    );
    a["ctrlr_loss_timeout_sec"] = json!(10);
    a["reconnect_delay_sec"] = json!(11);
    let e = host
        .call("bdev_nvme_attach_controller", a)
        .await
        .unwrap_err();
    assert_eq!(e.code, -22);
    assert!(
        e.message
            .contains("reconnect_delay_sec can't be more than ctrlr_loss_timeout_sec"),
        "{e:?}"
    );
    // Unknown names.
    assert_err(
        host.call("bdev_nvme_detach_controller", json!({"name": "zz"}))
            .await,
        -19,
        Some("No such device"),
    );
    assert_err(
        host.call("bdev_nvme_get_controllers", json!({"name": "zz"}))
            .await,
        -22,
        Some("Controller zz does not exist"),
    );
    // set_options is refused while controllers exist.
    assert_err(
        host.call(
            "bdev_nvme_set_options",
            json!({"ctrlr_loss_timeout_sec": 5, "reconnect_delay_sec": 1}),
        )
        .await,
        -1,
        None,
    );
    // The target sees both hosts.
    let ctrls = tgt
        .ok("nvmf_subsystem_get_controllers", json!({"nqn": SUB}))
        .await;
    assert_eq!(ctrls.as_array().unwrap().len(), 2);
    // Detach: bdevs go, the name is free again.
    host.ok("bdev_nvme_detach_controller", json!({"name": "r1"}))
        .await;
    host.ok("bdev_nvme_detach_controller", json!({"name": "r2"}))
        .await;
    assert_eq!(
        host.ok("bdev_nvme_get_controllers", Value::Null).await,
        json!([])
    );
    assert_err(
        host.call("bdev_get_bdevs", json!({"name": "r1n1"})).await,
        -19,
        None,
    );
    wait_for(
        Duration::from_secs(5),
        "target controllers to go",
        || async {
            tgt.ok("nvmf_subsystem_get_controllers", json!({"nqn": SUB}))
                .await
                == json!([])
        },
    )
    .await;
    assert_eq!(
        host.ok(
            "bdev_nvme_attach_controller",
            attach("r1", port, SUB, HOST1, "disable")
        )
        .await,
        json!(["r1n1"])
    );
    // With no controllers, global options can be set (and are validated).
    host.ok("bdev_nvme_detach_controller", json!({"name": "r1"}))
        .await;
    host.ok("bdev_nvme_set_options", json!({"ctrlr_loss_timeout_sec": 15, "reconnect_delay_sec": 2, "fast_io_fail_timeout_sec": 10})).await;
    assert_err(
        host.call(
            "bdev_nvme_set_options",
            json!({"ctrlr_loss_timeout_sec": 0, "reconnect_delay_sec": 2}),
        )
        .await,
        -22,
        None,
    );
}

/// The seed bug at the dataplane level: a controller left behind makes the next
/// attach under its name fail with exactly SPDK's -114; detaching it first works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_bug_stale_controller_then_detach_and_attach() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tgt = Dp::start(&tmp.path().join("t")).await;
    let host = Dp::start(&tmp.path().join("h")).await;
    let port = tgt.serve_malloc(SUB, "m1", 16, 0, true).await;
    // Longhorn's knobs would delete a dead controller after 15 s; with
    // ctrlr_loss_timeout_sec 0 (SPDK's default) a failed controller stays for ever.
    host.ok(
        "bdev_nvme_attach_controller",
        attach("r1", port, SUB, HOST1, "disable"),
    )
    .await;
    tgt.kill9();
    wait_for(Duration::from_secs(30), "controller to fail", || async {
        let c = host
            .ok("bdev_nvme_get_controllers", json!({"name": "r1"}))
            .await;
        c[0]["ctrlrs"][0]["state"] == "failed"
    })
    .await;
    // The target comes back (same port) and the engine attaches again: -114.
    let tgt2 = Dp::start(&tmp.path().join("t2")).await;
    tgt2.serve_malloc(SUB, "m1", 16, port, true).await;
    assert_err(
        host.call(
            "bdev_nvme_attach_controller",
            attach("r1", port, SUB, HOST1, "disable"),
        )
        .await,
        -114,
        Some("A controller named r1 already exists and multipath is disabled"),
    );
    // The stale controller is still there, failed, and still owns its name.
    let c = host
        .ok("bdev_nvme_get_controllers", json!({"name": "r1"}))
        .await;
    assert_eq!(c[0]["ctrlrs"][0]["state"], "failed");
    // Detach, then attach succeeds on the first try.
    host.ok("bdev_nvme_detach_controller", json!({"name": "r1"}))
        .await;
    assert_eq!(
        host.ok(
            "bdev_nvme_attach_controller",
            attach("r1", port, SUB, HOST1, "disable")
        )
        .await,
        json!(["r1n1"])
    );
    let c = host
        .ok("bdev_nvme_get_controllers", json!({"name": "r1"}))
        .await;
    assert_eq!(c[0]["ctrlrs"][0]["state"], "enabled");
    drop(tgt);
}

/// A controller lost for good (ctrlr_loss_timeout_sec) is deleted and its bdev
/// hot-removed: the namespace that exported it goes too, and the name is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrlr_loss_deletes_controller_and_hot_removes_bdev() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tgt = Dp::start(&tmp.path().join("t")).await;
    let host = Dp::start(&tmp.path().join("h")).await;
    let port = tgt.serve_malloc(SUB, "m1", 16, 0, true).await;
    let mut a = attach("r1", port, SUB, HOST1, "disable");
    a["ctrlr_loss_timeout_sec"] = json!(2);
    a["reconnect_delay_sec"] = json!(1);
    a["fast_io_fail_timeout_sec"] = json!(1);
    host.ok("bdev_nvme_attach_controller", a.clone()).await;
    // Re-export the remote namespace from the host dataplane (a consumer that holds a claim).
    host.ok("nvmf_create_transport", json!({"trtype": "TCP"}))
        .await;
    host.ok(
        "nvmf_create_subsystem",
        json!({"nqn": "nqn.2024-01.io.corral:re", "allow_any_host": true}),
    )
    .await;
    host.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": "nqn.2024-01.io.corral:re", "namespace": {"bdev_name": "r1n1"}}),
    )
    .await;
    tgt.kill9();
    wait_for(
        Duration::from_secs(15),
        "controller deletion after ctrlr_loss",
        || async { host.ok("bdev_nvme_get_controllers", Value::Null).await == json!([]) },
    )
    .await;
    assert_err(
        host.call("bdev_get_bdevs", json!({"name": "r1n1"})).await,
        -19,
        None,
    );
    let s = host
        .ok(
            "nvmf_get_subsystems",
            json!({"nqn": "nqn.2024-01.io.corral:re"}),
        )
        .await;
    assert_eq!(
        s[0]["namespaces"],
        json!([]),
        "the namespace went with its bdev"
    );
    let tgt2 = Dp::start(&tmp.path().join("t2")).await;
    tgt2.serve_malloc(SUB, "m1", 16, port, true).await;
    host.ok("bdev_nvme_attach_controller", a).await;
}

/// Detach of a controller whose target stopped answering: `deleting` is visible,
/// an attach under the name still fails, and the RPC answers -110 after 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_of_a_hung_target_times_out_with_deleting_state() {
    let tmp = tempfile::tempdir().unwrap();
    let tgt = Dp::start(&tmp.path().join("t")).await;
    let host = Dp::start(&tmp.path().join("h")).await;
    let port = tgt.serve_malloc(SUB, "m1", 16, 0, true).await;
    // Admin commands to the hung target wait 15 s, so that the graceful part of
    // the detach outlasts the RPC's 10 s wait (with SPDK's default of 10 s the
    // two race and either answer is right).
    host.ok(
        "bdev_nvme_set_options",
        json!({"timeout_admin_us": 15_000_000}),
    )
    .await;
    host.ok(
        "bdev_nvme_attach_controller",
        attach("r1", port, SUB, HOST1, "disable"),
    )
    .await;
    tgt.signal(libc::SIGSTOP);
    let sock = host.sock.clone();
    let det = tokio::spawn(async move {
        let mut c = dataplane::rpc::RpcClient::connect(&sock).await.unwrap();
        let t0 = std::time::Instant::now();
        (
            c.call("bdev_nvme_detach_controller", json!({"name": "r1"}))
                .await
                .unwrap(),
            t0.elapsed(),
        )
    });
    wait_for(Duration::from_secs(5), "state deleting", || async {
        let c = host
            .call("bdev_nvme_get_controllers", json!({"name": "r1"}))
            .await;
        c.map(|c| c[0]["ctrlrs"][0]["state"] == "deleting")
            .unwrap_or(false)
    })
    .await;
    assert_err(
        host.call(
            "bdev_nvme_attach_controller",
            attach("r1", port, SUB, HOST1, "disable"),
        )
        .await,
        -114,
        None,
    );
    let (r, took) = det.await.unwrap();
    tgt.signal(libc::SIGCONT);
    match r {
        Err(e) => {
            assert_eq!(e.code, -110, "{e:?}");
            assert!(took >= Duration::from_secs(9), "{took:?}");
        }
        Ok(_) => panic!("detach of a hung target returned success after {took:?}"),
    }
    // It finishes eventually; then the name is free.
    wait_for(Duration::from_secs(90), "controller gone", || async {
        host.ok("bdev_nvme_get_controllers", Value::Null).await == json!([])
    })
    .await;
    host.ok(
        "bdev_nvme_attach_controller",
        attach("r1", port, SUB, HOST1, "disable"),
    )
    .await;
}
