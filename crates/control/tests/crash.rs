//! The seed bug and its relatives, with agents as real processes that die like
//! `kill -9` at named points (fault injection) and are restarted: every attach
//! converges on its first attempt after the restart, stale controllers are
//! adopted or replaced (never -114), data verifies, no orphan remains.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{qemu_io, set_fault, Cluster, Fio};
use control::model::*;
use serde_json::json;

async fn wait_exited(c: &mut Cluster, i: usize, t: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < t {
        if c.nodes[i].agent_proc.as_mut().unwrap().exited() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("agent of node{} did not stop at its fault point", i + 1);
}

fn no_114(c: &Cluster) {
    for e in c.events() {
        assert!(
            !e.message.contains("-114") && !e.message.contains("already exists and multipath"),
            "-114 surfaced: {e:?}"
        );
    }
    for v in c.manager.volumes().unwrap() {
        for k in &v.conditions {
            assert!(!k.reason.contains("-114"), "-114 in a condition: {k:?}");
        }
    }
}

async fn no_orphans(c: &Cluster) {
    for _ in 0..3 {
        c.manager.poll_nodes().await;
    }
    let o = c.manager.orphans();
    assert!(o.is_empty(), "orphans left: {o:?}");
}

/// 1 + 2. A crash at every step of attach, and at every step of detach followed
/// by a new attach: the attach after the agent's restart converges at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_step_then_converge() {
    let attach_points = [
        "replica.subsystem",
        "engine.controller.0",
        "engine.controller.1",
        "engine.raid",
        "engine.frontend",
    ];
    let detach_points = [
        "engine.detach.frontend",
        "engine.detach.raid",
        "engine.detach.controller.0",
    ];
    let mut c = Cluster::start_with(2, 11, true).await;
    let m = c.manager.clone();
    let mut pattern = 0x10u8;
    let mut i = 0;
    for point in attach_points.iter().chain(detach_points.iter()) {
        i += 1;
        let vol = format!("c{i}");
        m.create_volume(&vol, 32 << 20, 2).unwrap();
        c.wait_state(&vol, VolumeState::Detached, Duration::from_secs(30))
            .await;
        let is_detach = point.starts_with("engine.detach");
        if is_detach {
            c.attach(&vol, "node1");
            let v = c
                .wait_state(&vol, VolumeState::Attached, Duration::from_secs(60))
                .await;
            qemu_io(&v.endpoint.unwrap(), &[format!("write -P {pattern} 0 2M")]).unwrap();
        }
        // Arm the fault on one agent: node2 for replica steps (it holds a
        // replica), node1 (the engine node) for engine steps.
        let crashed = if point.starts_with("replica") { 1 } else { 0 };
        set_fault(c.nodes[crashed].listen, Some(point)).await;
        if is_detach {
            m.set_attach(&vol, None).unwrap();
        } else {
            c.attach(&vol, "node1");
        }
        wait_exited(&mut c, crashed, Duration::from_secs(60)).await;
        if is_detach {
            // The user attaches again while the detach was cut short.
            c.attach(&vol, "node1");
        }
        let a0 = m.volume(&vol).unwrap().attach_attempts;
        c.nodes[crashed].agent_proc.as_mut().unwrap().restart();
        let v = c
            .wait_state(&vol, VolumeState::Attached, Duration::from_secs(90))
            .await;
        // Attempts that found the agent still down are retries of the same try;
        // once it answers, one attempt converges.
        let after: Vec<_> = c
            .events()
            .into_iter()
            .filter(|e| e.object == vol || e.object.starts_with(&vol))
            .collect();
        assert!(
            v.attach_attempts - a0 <= 3,
            "{point}: {} attempts after the restart: {after:#?}",
            v.attach_attempts - a0
        );
        assert!(
            !after.iter().any(|e| e.reason == "Faulted"),
            "{point}: faulted: {after:#?}"
        );
        if is_detach {
            assert_eq!(v.epoch, 2, "{point}: a new engine: {after:#?}");
            let stale_handled = c.events().iter().any(|e| {
                (e.reason == "Replaced" || e.reason == "Adopted")
                    && e.kind == "controller"
                    && e.object.starts_with(&format!("{vol}-r"))
            });
            if *point != "engine.detach.controller.0" {
                assert!(
                    stale_handled,
                    "{point}: the stale controllers must be adopted or replaced, with an event"
                );
            }
            qemu_io(
                &v.endpoint.clone().unwrap(),
                &[format!("read -P {pattern} 0 2M")],
            )
            .unwrap();
        } else {
            assert_eq!(v.epoch, 1, "{point}: the same engine, converged");
        }
        let uri = v.endpoint.clone().unwrap();
        qemu_io(
            &uri,
            &[
                format!("write -P {} 4M 2M", pattern + 1),
                format!("read -P {} 4M 2M", pattern + 1),
            ],
        )
        .unwrap();
        no_114(&c);
        eprintln!(
            "{point}: converged, attempts after restart {}",
            v.attach_attempts - a0
        );
        m.set_attach(&vol, None).unwrap();
        c.wait_state(&vol, VolumeState::Detached, Duration::from_secs(60))
            .await;
        m.delete_volume(&vol).unwrap();
        c.wait("deleted", Duration::from_secs(60), |m| {
            m.volume(&vol).is_err()
        })
        .await;
        pattern += 2;
    }
    no_orphans(&c).await;
}

/// 3. The agent is killed -9 and restarted while the volume is attached under
/// fio: no I/O error, and the engine is adopted, not rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kill9_under_io_interrupts_nothing() {
    let mut c = Cluster::start_with(2, 12, true).await;
    let m = c.manager.clone();
    m.create_volume("a3", 64 << 20, 2).unwrap();
    c.wait_state("a3", VolumeState::Detached, Duration::from_secs(30))
        .await;
    c.attach("a3", "node1");
    let v = c
        .wait_state("a3", VolumeState::Attached, Duration::from_secs(60))
        .await;
    let dpc = c.nodes[0].dpc();
    let raid_before = dpc
        .call("bdev_raid_get_bdevs", json!({"category": "all"}))
        .await
        .unwrap();
    let ctrl_before = dpc
        .call("bdev_nvme_get_controllers", json!({}))
        .await
        .unwrap();
    let out = c.dir.path().join("fio3.json");
    let fio = Fio::write_verify(&v.endpoint.clone().unwrap(), 0, 24 << 20, "3m", &out);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seq0 = c.events().last().map(|e| e.seq).unwrap_or(0);
    for n in [0usize, 1] {
        c.nodes[n].agent_proc.as_mut().unwrap().kill9();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in [0usize, 1] {
        c.nodes[n].agent_proc.as_mut().unwrap().restart();
    }
    let j = tokio::task::spawn_blocking(move || fio.wait(Duration::from_secs(120)))
        .await
        .unwrap();
    j.unwrap();
    c.wait("nodes ready again", Duration::from_secs(30), |m| {
        m.nodes().unwrap().iter().all(|n| n.ready)
    })
    .await;
    let v2 = m.volume("a3").unwrap();
    assert_eq!(v2.state, VolumeState::Attached);
    assert_eq!(v2.epoch, v.epoch, "no new engine");
    let raid_after = dpc
        .call("bdev_raid_get_bdevs", json!({"category": "all"}))
        .await
        .unwrap();
    let ctrl_after = dpc
        .call("bdev_nvme_get_controllers", json!({}))
        .await
        .unwrap();
    assert_eq!(
        raid_before[0]["uuid"], raid_after[0]["uuid"],
        "raid rebuilt"
    );
    let ids = |c: &serde_json::Value| {
        c.as_array()
            .unwrap()
            .iter()
            .map(|x| (x["name"].clone(), x["ctrlrs"][0]["cntlid"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&ctrl_before),
        ids(&ctrl_after),
        "controllers reconnected or replaced"
    );
    let later: Vec<_> = c.events().into_iter().filter(|e| e.seq > seq0).collect();
    assert!(
        !later
            .iter()
            .any(|e| matches!(e.reason.as_str(), "Created" | "Replaced" | "EngineLost")),
        "{later:#?}"
    );
    no_orphans(&c).await;
}
