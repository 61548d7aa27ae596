//! The quick start end to end, through the CLI only: `corral up --nodes 1`
//! creates and attaches a volume over NBD; qemu-io writes patterns and verifies
//! them across detach/attach, a timed-out attach (exit 4), a restart of the
//! whole `corral up` (the volume comes back attached, with its data), and then
//! the volume is deleted with nothing left behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;

use std::time::Duration;

use cli_support::*;

fn vol(up: &Up) -> serde_json::Value {
    up.json(&["volume", "show", "vol1"])["volume"].clone()
}

#[test]
fn quick_start_volume_lifecycle() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut up = Up::start(&dir, 3, &["--nodes", "1", "--size", "64MiB"]);
    let out = up.wait_up();
    assert!(
        out.contains("volume vol1: created (64 MiB, 1 replica(s))"),
        "{out}"
    );
    let ep = endpoint_in(&out);
    assert_eq!(ep, format!("nbd://{}.1:{}/vol1", up.prefix, up.nbd_port));
    assert!(
        out.contains(&format!("try it:   qemu-img info {ep}")),
        "{out}"
    );

    // Write two patterns and read them back.
    qemu_io(
        &ep,
        &[
            "write -P 0x5a 0 4M",
            "write -P 0x3c 32M 1M",
            "read -P 0x5a 0 4M",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", up.diagnostics()));

    let v = vol(&up);
    assert_eq!(v["state"], "attached");
    assert_eq!(v["robustness"], "healthy");
    assert_eq!(v["epoch"], 1);
    assert_eq!(v["endpoint"], ep.as_str());
    let show = up.ok(&["volume", "show", "vol1"]);
    assert!(show.contains("State:       attached"), "{show}");
    assert!(show.contains(&format!("Endpoint:    {ep}")), "{show}");
    assert!(show.contains("node1  disk0  healthy"), "{show}");
    let ls = up.ok(&["volume", "ls"]);
    assert!(
        ls.lines()
            .nth(1)
            .unwrap()
            .starts_with("vol1  64 MiB  1         attached  healthy"),
        "{ls}"
    );

    // Attaching where it is attached is a no-op; elsewhere/otherwise is refused.
    let again = up.ok(&["volume", "attach", "vol1"]);
    assert!(again.contains(&ep), "{again}");
    let r = up.cli(&["volume", "attach", "vol1", "--frontend", "nvmf"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("detach it first"), "{r:?}");
    let r = up.cli(&["volume", "expand", "vol1", "--size", "128MiB"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("what to do: corral volume detach vol1"),
        "{r:?}"
    );

    // Snapshots.
    up.ok(&["snapshot", "create", "vol1", "s1"]);
    let snaps = up.json(&["snapshot", "ls", "vol1"]);
    assert_eq!(snaps[0]["name"], "s1", "{snaps}");
    let r = up.cli(&["snapshot", "create", "vol1", "s1"]);
    assert_eq!(r.code, 2, "a second s1: {r:?}");

    // Detach, attach again: the data is still there.
    let d = up.ok(&["volume", "detach", "vol1"]);
    assert!(d.contains("volume vol1 detached"), "{d}");
    let v = vol(&up);
    assert_eq!(v["state"], "detached");
    assert!(v["endpoint"].is_null());
    assert!(
        qemu_io(&ep, &["read -P 0x5a 0 4M"]).is_err(),
        "the export is gone while detached"
    );
    let a = up.ok(&["volume", "attach", "vol1", "--timeout", "60s"]);
    assert!(
        a.contains(&format!("volume vol1 attached on node1 (healthy): {ep}")),
        "{a}"
    );
    assert!(a.contains("use it: qemu-img info"), "{a}");
    assert_eq!(vol(&up)["epoch"], 2);
    qemu_io(
        &ep,
        &[
            "read -P 0x5a 0 4M",
            "read -P 0x3c 32M 1M",
            "read -P 0 8M 1M",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", up.diagnostics()));

    // A stuck agent: the attach times out (exit 4) and says what it waits for;
    // once the agent runs again the attach completes by itself.
    up.ok(&["volume", "detach", "vol1"]);
    let agent = processes_mentioning(dir.to_str().unwrap())
        .into_iter()
        .find(|(_, c)| c.contains(" agent "))
        .expect("the agent process")
        .0;
    // SAFETY: stopping and resuming a process this test's `corral up` started.
    unsafe { libc::kill(agent, libc::SIGSTOP) };
    let r = up.cli(&["volume", "attach", "vol1", "--timeout", "2s"]);
    // SAFETY: as above.
    unsafe { libc::kill(agent, libc::SIGCONT) };
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains("attach volume vol1: timed out after 2s"),
        "{r:?}"
    );
    assert!(r.stderr.contains("not yet attached"), "{r:?}");
    assert!(r.stderr.contains("corral events --follow"), "{r:?}");
    let a = up.ok(&["volume", "attach", "vol1", "--timeout", "120s"]);
    assert!(a.contains(&ep), "{a}");
    qemu_io(&ep, &["read -P 0x5a 0 4M", "write -P 0x77 40M 1M"]).unwrap();
    let epoch = vol(&up)["epoch"].as_u64().unwrap();

    // Stop everything and bring it back: the same volume, attached, same data.
    assert_eq!(up.stop_with(libc::SIGINT), Some(0), "{}", up.diagnostics());
    assert_no_processes_left(dir.to_str().unwrap(), Duration::from_secs(10));
    up.restart();
    let out = up.wait_up();
    assert!(
        out.contains("volume vol1: exists (64 MiB, 1 replica(s)); reusing it"),
        "{out}"
    );
    assert_eq!(endpoint_in(&out), ep);
    let v = vol(&up);
    assert_eq!(v["state"], "attached");
    assert!(
        v["epoch"].as_u64().unwrap() > epoch,
        "a new engine after the restart: {v}"
    );
    qemu_io(
        &ep,
        &[
            "read -P 0x5a 0 4M",
            "read -P 0x3c 32M 1M",
            "read -P 0x77 40M 1M",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", up.diagnostics()));
    assert_eq!(up.json(&["snapshot", "ls", "vol1"])[0]["name"], "s1");

    // Events tell the story.
    let ev = up.json(&["events"]);
    let reasons: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    for r in ["Created", "Attached", "Detached", "EngineLost"] {
        assert!(reasons.contains(&r), "no {r} event in {reasons:?}");
    }

    // Delete: the volume, its replica and its snapshot go; nothing is orphaned.
    up.ok(&["snapshot", "delete", "vol1", "s1"]);
    assert_eq!(up.json(&["snapshot", "ls", "vol1"]), serde_json::json!([]));
    let d = up.ok(&["volume", "delete", "vol1", "--timeout", "60s"]);
    assert!(d.contains("volume vol1 deleted"), "{d}");
    assert_eq!(up.json(&["volume", "ls"]), serde_json::json!([]));
    assert_eq!(up.json(&["replica", "ls"]), serde_json::json!([]));
    assert!(qemu_io(&ep, &["read 0 4k"]).is_err(), "the export is gone");
    let r = up.cli(&["volume", "show", "vol1"]);
    assert_eq!(r.code, 2);
    // Orphans and controllers come from the agents' status reports: wait for
    // a report from after the delete, then nothing may be left.
    let t0 = std::time::Instant::now();
    let empty = serde_json::json!([]);
    while (up.json(&["orphans", "ls"]) != empty || up.json(&["controller", "ls"]) != empty)
        && t0.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(up.json(&["orphans", "ls"]), empty);
    assert_eq!(up.json(&["controller", "ls"]), empty);

    assert_eq!(up.stop_with(libc::SIGTERM), Some(0));
    assert_no_processes_left(dir.to_str().unwrap(), Duration::from_secs(10));
}
