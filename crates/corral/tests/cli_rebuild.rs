//! `corral up --nodes 3` and a replica rebuild through real processes: a
//! replica leaves the mirror of an attached volume with two snapshots while
//! fio writes and verifies; the manager process is killed -9 again and again
//! while the new replica is being built (`corral up` restarts it). The rebuild
//! converges anyway: the lost replica is replaced, fio's verify passes, and
//! every snapshot and the head have the same checksum on every replica.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;

use std::process::Command;
use std::time::{Duration, Instant};

use cli_support::*;

/// `corral rpc -s SOCK METHOD PARAMS` → JSON.
fn rpc(sock: &std::path::Path, method: &str, params: serde_json::Value) -> serde_json::Value {
    let o = Command::new(corral_bin())
        .args(["rpc", "-s"])
        .arg(sock)
        .args([method, &params.to_string()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "corral rpc {method} {params}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn rebuild_survives_manager_kills_and_every_layer_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut up = Up::start(&dir, 5, &["--nodes", "3", "--size", "256MiB"]);
    let out = up.wait_up();
    let ep = endpoint_in(&out);
    qemu_io(&ep, &["write -P 0x31 0 96M", "write -P 0x32 100M 8M"])
        .unwrap_or_else(|e| panic!("{e}\n{}", up.diagnostics()));
    up.ok(&["snapshot", "create", "vol1", "s1"]);
    qemu_io(&ep, &["write -P 0x41 32M 64M", "write -z 100M 4M"])
        .unwrap_or_else(|e| panic!("{e}\n{}", up.diagnostics()));
    up.ok(&["snapshot", "create", "vol1", "s2"]);
    qemu_io(&ep, &["write -P 0x51 0 16M"]).unwrap();

    let fio_out = tmp.path().join("fio.json");
    let mut fio = fio_write_verify("load", &ep, "192M", "48M", "4m", &fio_out);
    std::thread::sleep(Duration::from_secs(1));

    // node3's replica leaves the engine's mirror (as after an I/O error).
    let rs = up.json(&["replica", "ls", "--volume", "vol1"]);
    let victim = rs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == "node3")
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    rpc(
        &dir.join("node1/rpc.sock"),
        "bdev_raid_remove_base_bdev",
        serde_json::json!({ "name": format!("{victim}n1") }),
    );
    // Kill the manager while the rebuild runs, three times at most.
    let t0 = Instant::now();
    let mut kills = 0;
    loop {
        let rs = up.cli(&["replica", "ls", "--volume", "vol1", "-o", "json"]);
        if rs.code == 0 {
            let v: serde_json::Value = serde_json::from_str(&rs.stdout).unwrap();
            let a = v.as_array().unwrap();
            let done = a.len() == 3
                && a.iter().all(|r| r["state"] == "healthy")
                && !a.iter().any(|r| r["name"] == victim.as_str());
            if done {
                break;
            }
            if kills < 3 && a.iter().any(|r| r["state"] == "rebuilding") {
                let (pid, _) = processes_mentioning(dir.to_str().unwrap())
                    .into_iter()
                    .find(|(_, c)| c.contains(" manager "))
                    .expect("the manager process");
                // SAFETY: killing a process this test's `corral up` started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                kills += 1;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "not rebuilt after {kills} manager kill(s):\n{}\n{}",
            up.cli(&["volume", "show", "vol1"]).stdout,
            up.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(kills >= 1, "the rebuild was over before the first kill");
    eprintln!("rebuilt in {:?} with {kills} manager kill(s)", t0.elapsed());
    let st = fio.wait().unwrap();
    let json = std::fs::read_to_string(&fio_out).unwrap_or_default();
    assert!(st.success(), "fio failed ({st}):\n{json}");

    let events = up.ok(&["events"]);
    eprintln!(
        "{}",
        events
            .lines()
            .filter(|l| l.contains("replica") || l.contains("Rebuil"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(events.contains("Rebuilt"), "{events}");
    assert!(events.contains("Replaced"), "{events}");
    let show = up.ok(&["volume", "show", "vol1"]);
    assert!(show.contains("Robustness:  healthy"), "{show}");

    // Every layer matches on every replica, the rebuilt one included.
    up.ok(&["volume", "detach", "vol1"]);
    let rs = up.json(&["replica", "ls", "--volume", "vol1"]);
    for lvol in ["{}.snap.s1", "{}.snap.s2", "{}"] {
        let mut sums = Vec::new();
        for r in rs.as_array().unwrap() {
            let (name, node) = (r["name"].as_str().unwrap(), r["node"].as_str().unwrap());
            let c = rpc(
                &dir.join(format!("{node}/rpc.sock")),
                "corral_lvol_get_checksum",
                serde_json::json!({ "name": format!("disk0/{}", lvol.replace("{}", name)) }),
            );
            sums.push((
                name.to_string(),
                c["checksum"].as_str().unwrap().to_string(),
            ));
        }
        assert!(
            sums.iter().all(|(_, s)| *s == sums[0].1),
            "{lvol} differs between replicas: {sums:?}"
        );
    }
    let orphans = up.json(&["controller", "ls", "--orphans"]);
    assert_eq!(orphans.as_array().map(|a| a.len()), Some(0), "{orphans}");
}
