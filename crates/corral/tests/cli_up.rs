//! `corral up --no-volume` as a real background process, and the CLI against
//! it: nodes and disks, refusals with their exit codes and advice, events (also
//! followed live), metrics, an unreachable manager, and a clean stop that
//! leaves no process behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::*;

#[test]
fn up_without_volume_then_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut up = Up::start(&dir, 1, &["--nodes", "1", "--no-volume"]);
    let out = up.wait_up();
    assert!(out.contains("node1: ready at"), "{out}");
    assert!(out.contains("no volume"), "{out}");
    for f in [
        "up.log",
        "manager.log",
        "node1-dataplane.log",
        "node1-agent.log",
    ] {
        assert!(dir.join("logs").join(f).exists(), "log {f} missing");
    }
    // No colour codes in log files.
    let agent_log = std::fs::read_to_string(dir.join("logs/node1-agent.log")).unwrap();
    assert!(
        !agent_log.contains('\u{1b}'),
        "ANSI escapes in the agent log"
    );
    assert!(
        agent_log.contains("registered with the manager"),
        "{agent_log}"
    );

    // Nodes and disks, as JSON and as tables.
    let nodes = up.json(&["node", "ls"]);
    let n = &nodes[0];
    assert_eq!(n["name"], "node1");
    assert_eq!(n["ready"], true);
    assert_eq!(n["address"], format!("{}.1", up.prefix));
    assert_eq!(n["disks"][0]["name"], "disk0");
    assert_eq!(n["disks"][0]["ready"], true, "{nodes}");
    let t = up.ok(&["node", "ls"]);
    let lines: Vec<&str> = t.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("READY"),
        "{t}"
    );
    assert!(
        lines[1].starts_with("node1") && lines[1].contains(" yes "),
        "{t}"
    );
    let t = up.ok(&["disk", "ls"]);
    assert!(t.lines().nth(1).unwrap().contains("disk0"), "{t}");
    assert!(
        t.contains(&dir.join("node1/disk0").display().to_string()),
        "{t}"
    );

    // An empty volume list is a header and a hint on stderr.
    let r = up.cli(&["volume", "ls"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.is_empty(), "{r:?}");
    assert!(r.stderr.contains("corral volume create"), "{r:?}");
    assert_eq!(up.json(&["volume", "ls"]), serde_json::json!([]));

    // Refusals: exit 2, the manager's reason, on which object, and what to do.
    let r = up.cli(&["volume", "show", "nope"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("show volume nope: volume nope does not exist"),
        "{r:?}"
    );
    assert!(
        r.stderr
            .contains("what to do: list volumes with `corral volume ls`"),
        "{r:?}"
    );
    let r = up.cli(&["volume", "attach", "nope"]);
    assert_eq!(r.code, 2, "{r:?}");
    let r = up.cli(&["volume", "create", "v1", "--size", "1000"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("multiple of 4096"), "{r:?}");
    let r = up.cli(&[
        "volume",
        "create",
        "v1",
        "--size",
        "64MiB",
        "--replicas",
        "2",
    ]);
    assert_eq!(
        r.code, 2,
        "one node cannot hold two replicas of one volume... {r:?}"
    );
    assert!(r.stderr.contains("cannot place 2 replicas"), "{r:?}");
    assert!(r.stderr.contains("what to do:"), "{r:?}");
    let r = up.cli(&["volume", "create", "bad/name", "--size", "64MiB"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("bad/name"), "{r:?}");
    let r = up.cli(&["snapshot", "ls", "nope"]);
    assert_eq!(r.code, 2, "{r:?}");
    // Usage errors: exit 1.
    let r = up.cli(&["volume", "create", "v1", "--size", "ten"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("size \"ten\""), "{r:?}");
    let r = up.cli(&["volume", "frobnicate"]);
    assert_eq!(r.code, 1, "{r:?}");
    let r = up.cli(&["volume", "attach", "v1", "--timeout", "soon"]);
    assert_eq!(r.code, 1, "{r:?}");

    // Events: the node registered and became ready.
    let ev = up.json(&["events"]);
    let reasons: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"Registered") && reasons.contains(&"Ready"),
        "{ev}"
    );
    let last = ev.as_array().unwrap().last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    assert_eq!(
        up.json(&["events", "--since", &last.to_string()]),
        serde_json::json!([])
    );
    let t = up.ok(&["events"]);
    assert!(
        t.lines()
            .any(|l| l.contains("node1") && l.contains("Registered")),
        "{t}"
    );

    // events --follow prints the past, then what happens next.
    let mut follow = Command::new(corral_bin())
        .args(["events", "--follow", "--since", &last.to_string()])
        .env("CORRAL_MANAGER", &up.manager)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    // Something new happens: node1 registers again (as its agent would).
    let again =
        serde_json::json!({"name": "node1", "agent_url": n["agent_url"], "address": n["address"]});
    assert!(
        post_json(&format!("{}/v1/nodes", up.manager), again),
        "re-register"
    );
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a followed event");
    assert!(
        line.contains("node1") && line.contains("Registered"),
        "{line}"
    );
    let _ = follow.kill();
    let _ = follow.wait();

    // Metrics.
    let metrics = http_get(&format!("{}/metrics", up.manager));
    assert!(metrics.contains("corral_nodes_ready 1"), "{metrics}");
    assert!(
        metrics.contains("corral_orphan_resources{kind=\"controller\"} 0"),
        "{metrics}"
    );

    // Orphans: none; collecting finds nothing.
    let r = up.cli(&["controller", "ls", "--orphans"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("no orphans"), "{r:?}");
    let c = up.json(&["orphans", "collect", "--force"]);
    assert_eq!(c["collected"], 0);

    // A second `corral up` on the same data dir is refused, naming the first.
    let r = Command::new(corral_bin())
        .args(["up", "--data-dir", dir.to_str().unwrap(), "--no-volume"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(
        e.contains(&format!("another `corral up` (pid {})", up.pid())),
        "{e}"
    );

    // SIGTERM: everything stops, in order, and nothing is left behind.
    let t0 = Instant::now();
    assert_eq!(up.stop_with(libc::SIGTERM), Some(0), "{}", up.diagnostics());
    assert!(t0.elapsed() < Duration::from_secs(60));
    let out = up.output();
    assert!(
        out.contains("stopping: manager, agents, then dataplanes"),
        "{out}"
    );
    assert_no_processes_left(dir.to_str().unwrap(), Duration::from_secs(10));
    let dp_log = std::fs::read_to_string(dir.join("logs/node1-dataplane.log")).unwrap();
    assert!(
        dp_log.contains("dataplane stopped"),
        "the dataplane drained and stopped:\n{dp_log}"
    );
}

#[test]
fn unreachable_manager_exit_3() {
    let port = free_port(); // nothing listens here
    let m = format!("http://127.0.0.1:{port}");
    for args in [
        &["volume", "ls"][..],
        &["node", "ls"],
        &["events", "--follow"],
        &["volume", "attach", "v"],
    ] {
        let r = cli_at(&m, args);
        assert_eq!(r.code, 3, "{args:?}: {r:?}");
        assert!(r.stderr.contains("cannot reach the manager"), "{r:?}");
        assert!(r.stderr.contains("corral up"), "{r:?}");
    }
    // --manager wins over the environment.
    let r = cli_at("http://127.0.0.1:1", &["--manager", &m, "volume", "ls"]);
    assert!(r.stderr.contains(&m), "{r:?}");
    let r = cli_at("not-a-url", &["volume", "ls"]);
    assert_eq!(r.code, 1, "{r:?}");
}

#[test]
fn killed_up_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut up = Up::start(&dir, 2, &["--nodes", "2", "--no-volume"]);
    let out = up.wait_up();
    assert!(out.contains("node2: ready at"), "{out}");
    let parts = processes_mentioning(dir.to_str().unwrap());
    assert!(
        parts.len() >= 5,
        "up + 2 dataplanes + 2 agents (+ manager): {parts:#?}"
    );
    // SIGKILL cannot be handled: PR_SET_PDEATHSIG stops the children.
    up.stop_with(libc::SIGKILL);
    assert_no_processes_left(dir.to_str().unwrap(), Duration::from_secs(30));
}

#[test]
fn up_refuses_bad_setups_before_starting_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let d = dir.to_str().unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(corral_bin()).args(args).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // The manager's port is taken.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let (code, err) = run(&[
        "up",
        "--data-dir",
        d,
        "--no-volume",
        "--manager-listen",
        &addr,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("the manager's address {addr} is in use")),
        "{err}"
    );
    assert!(err.contains("--manager-listen"), "{err}");
    // A node's NBD port is taken.
    let p = prefix(9);
    let nbd = std::net::TcpListener::bind(format!("{p}.1:0")).unwrap();
    let nbd_port = nbd.local_addr().unwrap().port().to_string();
    let m = format!("127.0.0.1:{}", free_port());
    let (code, err) = run(&[
        "up",
        "--data-dir",
        d,
        "--no-volume",
        "--manager-listen",
        &m,
        "--address-prefix",
        &p,
        "--nbd-port",
        &nbd_port,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("node1's NBD address") && err.contains("--nbd-port"),
        "{err}"
    );
    // Bad values.
    let (code, err) = run(&["up", "--data-dir", d, "--address-prefix", "10.0.0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("127.0.0.0/8"), "{err}");
    let (code, err) = run(&["up", "--data-dir", d, "--nodes", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--nodes 0"), "{err}");
    let (code, err) = run(&["up", "--data-dir", d, "--size", "lots"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--size"), "{err}");
    let long = tmp.path().join("x".repeat(100));
    let (code, err) = run(&["up", "--data-dir", long.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("use a shorter path"), "{err}");
    assert!(processes_mentioning(d).is_empty());
}

#[test]
fn a_volume_that_cannot_be_made_is_reported_and_the_rest_stays_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    // Two replicas of one volume cannot share one node.
    let mut up = Up::start(
        &dir,
        5,
        &["--nodes", "1", "--replicas", "2", "--size", "64MiB"],
    );
    let out = up.wait_for_output("Ctrl-C stops everything", Duration::from_secs(120));
    assert!(
        out.contains("corral up: error: create volume vol1: volume vol1: cannot place 2 replicas"),
        "{out}"
    );
    assert!(out.contains("what to do: add nodes or disks"), "{out}");
    assert!(out.contains("keep running so you can look"), "{out}");
    // The rest is up and answers.
    let nodes = up.json(&["node", "ls"]);
    assert_eq!(nodes[0]["ready"], true);
    assert_eq!(up.stop_with(libc::SIGTERM), Some(0), "{}", up.diagnostics());
    assert_no_processes_left(dir.to_str().unwrap(), Duration::from_secs(10));
}

fn http_get(url: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

/// POSTs JSON; true on a 2xx answer.
fn post_json(url: &str, body: serde_json::Value) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        reqwest::Client::new()
            .post(url)
            .json(&body)
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
    })
}
