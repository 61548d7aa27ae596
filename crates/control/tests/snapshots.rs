//! Snapshots of an attached volume under write load: the engine is quiesced
//! while the replicas snapshot, so every replica's copy of a snapshot holds
//! the same data (without it, writes in flight land in one replica's snapshot
//! and in another's head). A quiesce whose caller vanishes ends with its lease.
//! Ends by verifying data (fio verify, per-replica checksums, revert).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{fio_max_write_lat_s, Cluster, Fio};
use control::model::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_under_load_are_the_same_on_every_replica() {
    let c = Cluster::start(3, 13).await;
    let m = &c.manager;
    m.create_volume("sv", 192 << 20, 3).unwrap();
    c.wait_state("sv", VolumeState::Detached, Duration::from_secs(30))
        .await;
    let attach = || {
        m.set_attach(
            "sv",
            Some(AttachSpec {
                node: "node1".into(),
                frontend: Frontend::Nbd,
            }),
        )
        .unwrap()
    };
    attach();
    let v = c
        .wait_state("sv", VolumeState::Attached, Duration::from_secs(60))
        .await;
    let uri = v.endpoint.clone().unwrap();
    let fio = Fio::write_verify(&uri, 0, 128 << 20, "48m", &c.dir.path().join("fio1.json"));
    let snaps = ["s1", "s2", "s3"];
    for s in snaps {
        tokio::time::sleep(Duration::from_millis(600)).await;
        m.create_snapshot("sv", s).await.unwrap();
    }
    let j = tokio::task::spawn_blocking(move || fio.wait(Duration::from_secs(120)))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("fio: {e}"));
    assert!(j["jobs"][0]["write"]["io_bytes"].as_u64().unwrap() >= 128 << 20);
    let created: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| e.kind == "snapshot" && e.reason == "Created")
        .collect();
    assert_eq!(created.len(), 3, "{created:?}");
    assert!(
        created.iter().all(|e| e.message.contains("I/O held for")),
        "taken with the engine quiesced: {created:?}"
    );

    // A quiesce whose caller never resumes it ends with its lease: writes
    // stall for about the lease, then go on, none fails.
    let fio = Fio::write_verify(
        &uri,
        160 << 20,
        16 << 20,
        "8m",
        &c.dir.path().join("fio2.json"),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let token = c.nodes[0]
        .agent
        .quiesce_engine("sv", Duration::from_secs(5), Duration::from_millis(1500))
        .await
        .unwrap();
    assert!(token > 0);
    let j = tokio::task::spawn_blocking(move || fio.wait(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("fio across the lease: {e}"));
    let stall = fio_max_write_lat_s(&j);
    assert!(
        (1.2..6.0).contains(&stall),
        "writes held for the lease and no longer: {stall:.2} s"
    );
    let e = c.nodes[0]
        .agent
        .resume_engine("sv", token)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not in force"), "{e}");

    m.set_attach("sv", None).unwrap();
    c.wait_state("sv", VolumeState::Detached, Duration::from_secs(60))
        .await;
    let rs = m.replicas(Some("sv")).unwrap();
    assert_eq!(rs.len(), 3);
    let mut sums = Vec::new();
    for s in snaps {
        sums.push(
            c.same_everywhere(&rs, &format!("snapshot {s}"), |r| {
                control::naming::snapshot_lvol(&r.name, s)
            })
            .await,
        );
    }
    assert!(
        sums[0] != sums[1] && sums[1] != sums[2],
        "the snapshots were taken while data changed: {sums:?}"
    );
    let head = c.same_everywhere(&rs, "head", |r| r.name.clone()).await;
    // Revert to s2: every head is s2 again, and the volume attaches.
    m.revert_snapshot("sv", "s2").await.unwrap();
    let reverted = c
        .same_everywhere(&rs, "head after revert", |r| r.name.clone())
        .await;
    assert_eq!(reverted, sums[1]);
    assert_ne!(reverted, head);
    attach();
    c.wait_state("sv", VolumeState::Attached, Duration::from_secs(60))
        .await;
    c.manager.poll_nodes().await;
    c.manager.poll_nodes().await;
    assert!(m.orphans().is_empty(), "{:?}", m.orphans());
}
