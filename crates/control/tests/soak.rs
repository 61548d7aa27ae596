//! A bounded soak of the replica lifecycle, outside CI (`#[ignore]`): rounds of
//! faults on a 3-replica volume under fio with verify — a replica dropped from
//! the mirror, a replica node's dataplane killed -9 and restarted, a snapshot
//! taken or deleted — each round waiting until the volume is healthy again
//! (rebuilt). Ends by checking every snapshot and head on every replica, and
//! that no orphan is left.
//!
//!   CORRAL_SOAK_ROUNDS=20 cargo test -p control --profile ci --test soak -- --ignored --nocapture

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, Fio};
use control::model::*;
use rand::{Rng, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: minutes long; run by hand"]
async fn replica_faults_rebuilds_and_snapshots_soak() {
    let rounds: usize = std::env::var("CORRAL_SOAK_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("CORRAL_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("soak: {rounds} rounds, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut c = Cluster::start(3, 17).await;
    let m = c.manager.clone();
    m.create_volume("sk", 256 << 20, 3).unwrap();
    c.wait_state("sk", VolumeState::Detached, Duration::from_secs(30))
        .await;
    c.attach("sk", "node1");
    let v = c
        .wait_state("sk", VolumeState::Attached, Duration::from_secs(60))
        .await;
    let uri = v.endpoint.clone().unwrap();
    let mut snaps: Vec<String> = Vec::new();
    for round in 0..rounds {
        let t0 = Instant::now();
        let out = c.dir.path().join(format!("fio{round}.json"));
        let off = rng.gen_range(0..6u64) * (32 << 20);
        let fio = Fio::write_verify(&uri, off, 32 << 20, "3m", &out);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
        let what = match rng.gen_range(0..4) {
            0 => {
                let node = ["node2", "node3"][rng.gen_range(0..2)];
                let r = c.drop_member("sk", node, 0).await;
                format!("dropped {} on {node}", r.name)
            }
            1 => {
                let i = rng.gen_range(1..3);
                c.nodes[i].dp.kill9();
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..3000))).await;
                c.nodes[i].dp.restart();
                format!("killed and restarted node{}'s dataplane", i + 1)
            }
            2 => {
                let name = format!("s{round}");
                match m.create_snapshot("sk", &name).await {
                    Ok(_) => {
                        snaps.push(name.clone());
                        format!("snapshot {name}")
                    }
                    Err(e) => format!("snapshot {name} refused: {}", e.message),
                }
            }
            _ if !snaps.is_empty() => {
                let name = snaps.remove(rng.gen_range(0..snaps.len()));
                match m.delete_snapshot("sk", &name).await {
                    Ok(()) => format!("deleted snapshot {name}"),
                    Err(e) => {
                        snaps.push(name.clone());
                        format!("delete of {name} refused: {}", e.message)
                    }
                }
            }
            _ => "nothing".to_string(),
        };
        let j = tokio::task::spawn_blocking(move || fio.wait(Duration::from_secs(180)))
            .await
            .unwrap();
        if let Err(e) = j {
            panic!("round {round} ({what}): fio: {e}");
        }
        c.wait(
            &format!("round {round} ({what}): healthy again"),
            Duration::from_secs(240),
            |m| {
                let rs = m.replicas(Some("sk")).unwrap();
                m.volume("sk").unwrap().state == VolumeState::Attached
                    && rs.len() == 3
                    && rs.iter().all(|r| r.state == ReplicaState::Healthy)
            },
        )
        .await;
        eprintln!(
            "round {round}: {what}; healthy after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    let v = m.volume("sk").unwrap();
    m.set_attach("sk", None).unwrap();
    c.wait_state("sk", VolumeState::Detached, Duration::from_secs(60))
        .await;
    let rs = m.replicas(Some("sk")).unwrap();
    for s in &snaps {
        c.same_everywhere(&rs, &format!("snapshot {s}"), |r| {
            control::naming::snapshot_lvol(&r.name, s)
        })
        .await;
    }
    c.same_everywhere(&rs, "head", |r| r.name.clone()).await;
    let ev = c.events();
    eprintln!(
        "soak done: epoch {}, {} rebuilds, {} abandoned, {} snapshots left",
        v.epoch,
        ev.iter().filter(|e| e.reason == "Rebuilt").count(),
        ev.iter().filter(|e| e.reason == "RebuildFailed").count(),
        snaps.len()
    );
    for e in ev.iter().filter(|e| e.reason == "RebuildFailed") {
        eprintln!("  abandoned: {} {}", e.object, e.message);
    }
    m.collect_orphans(true).await.unwrap();
    m.poll_nodes().await;
    m.poll_nodes().await;
    assert!(m.orphans().is_empty(), "orphans: {:?}", m.orphans());
}
