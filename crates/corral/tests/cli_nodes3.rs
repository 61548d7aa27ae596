//! `corral up --nodes 3`: three nodes on loopback, a volume with one replica on
//! each, used over NBD; then one replica's dataplane dies (and `corral up` is
//! told not to restart it) and the CLI shows the volume degraded and the
//! replica out of sync with a reason, while the data stays readable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;

use std::time::{Duration, Instant};

use cli_support::*;

#[test]
fn three_nodes_three_replicas() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut up = Up::start(
        &dir,
        4,
        &["--nodes", "3", "--size", "64MiB", "--no-restart"],
    );
    let out = up.wait_up();
    for n in ["node1", "node2", "node3"] {
        assert!(out.contains(&format!("{n}: ready at")), "{out}");
    }
    assert!(
        out.contains("volume vol1: created (64 MiB, 3 replica(s))"),
        "{out}"
    );
    let ep = endpoint_in(&out);
    qemu_io(&ep, &["write -P 0x11 0 2M", "read -P 0x11 0 2M"])
        .unwrap_or_else(|e| panic!("{e}\n{}", up.diagnostics()));

    let rs = up.json(&["replica", "ls", "--volume", "vol1"]);
    let mut nodes: Vec<&str> = rs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        ["node1", "node2", "node3"],
        "one replica per node: {rs}"
    );
    // Controllers come from the agents' last status report: wait for one.
    let t0 = Instant::now();
    let mut ctrls = up.json(&["controller", "ls"]);
    while ctrls.as_array().unwrap().len() < 3 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        ctrls = up.json(&["controller", "ls"]);
    }
    assert_eq!(
        ctrls.as_array().unwrap().len(),
        3,
        "one controller per replica: {ctrls}"
    );
    let t = up.ok(&["controller", "ls"]);
    assert_eq!(
        t.lines()
            .filter(|l| l.starts_with("node1 ") && l.contains("enabled"))
            .count(),
        3,
        "{t}"
    );
    let t = up.ok(&["node", "ls"]);
    assert_eq!(t.lines().filter(|l| l.contains(" yes ")).count(), 3, "{t}");

    // node3's dataplane dies and stays dead.
    let node3_dp = processes_mentioning(dir.to_str().unwrap())
        .into_iter()
        .find(|(_, c)| c.contains(" dataplane ") && c.contains("node3/rpc.sock"))
        .expect("node3's dataplane")
        .0;
    // SAFETY: killing a process this test's `corral up` started.
    unsafe { libc::kill(node3_dp, libc::SIGKILL) };
    up.wait_for_output("node3 dataplane exited", Duration::from_secs(10));
    // I/O goes on on the other two (after at most fast_io_fail, 10 s).
    let t0 = Instant::now();
    qemu_io(
        &ep,
        &[
            "write -P 0x22 4M 1M",
            "read -P 0x11 0 2M",
            "read -P 0x22 4M 1M",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", up.diagnostics()));
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "I/O stalled {:?}",
        t0.elapsed()
    );
    // The CLI shows why the volume is degraded.
    let t0 = Instant::now();
    loop {
        let show = up.ok(&["volume", "show", "vol1"]);
        let degraded = show.contains("Robustness:  degraded");
        let row = show
            .lines()
            .find(|l| l.contains(" node3 "))
            .unwrap_or("")
            .to_string();
        if degraded && row.contains("out_of_sync") {
            assert!(
                row.split("out_of_sync").nth(1).unwrap().trim().len() > 2,
                "a reason: {row}"
            );
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            panic!(
                "volume not shown degraded with node3 out of sync:\n{show}\n{}",
                up.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let node3 = up.json(&["node", "ls"]);
    let n3 = node3
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node3")
        .unwrap()
        .clone();
    let t0 = Instant::now();
    let mut n3 = n3;
    while n3["ready"] != false && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
        n3 = up
            .json(&["node", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "node3")
            .unwrap()
            .clone();
    }
    assert_eq!(
        n3["ready"], false,
        "node3 is not ready without its dataplane: {n3}"
    );
    assert!(n3["reason"].as_str().unwrap_or("").len() > 3, "{n3}");
    qemu_io(&ep, &["read -P 0x11 0 2M", "read -P 0x22 4M 1M"]).unwrap();

    assert_eq!(up.stop_with(libc::SIGTERM), Some(0), "{}", up.diagnostics());
    assert_no_processes_left(dir.to_str().unwrap(), Duration::from_secs(10));
}
