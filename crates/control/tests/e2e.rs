//! The control plane end to end: real dataplanes, agents and a manager; a
//! replicated volume created, attached over NBD, used with qemu-io, detached,
//! attached again, deleted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{qemu_io, Cluster};
use control::model::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle_three_replicas() {
    let c = Cluster::start(3, 1).await;
    let m = &c.manager;
    m.create_volume("vol1", 64 << 20, 3).unwrap();
    c.wait_state("vol1", VolumeState::Detached, Duration::from_secs(30))
        .await;
    let rs = m.replicas(Some("vol1")).unwrap();
    assert_eq!(rs.len(), 3);
    let mut nodes: Vec<_> = rs.iter().map(|r| r.node.clone()).collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "one replica per node");
    m.set_attach(
        "vol1",
        Some(AttachSpec {
            node: "node1".into(),
            frontend: Frontend::Nbd,
        }),
    )
    .unwrap();
    let v = c
        .wait_state("vol1", VolumeState::Attached, Duration::from_secs(60))
        .await;
    assert_eq!(v.robustness, Robustness::Healthy);
    assert_eq!(v.epoch, 1);
    let uri = v.endpoint.clone().unwrap();
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 4M".into(),
            "write -P 0x3c 8M 1M".into(),
            "read -P 0x5a 0 4M".into(),
        ],
    )
    .unwrap();
    m.set_attach("vol1", None).unwrap();
    c.wait_state("vol1", VolumeState::Detached, Duration::from_secs(60))
        .await;
    m.set_attach(
        "vol1",
        Some(AttachSpec {
            node: "node2".into(),
            frontend: Frontend::Nbd,
        }),
    )
    .unwrap();
    let v = c
        .wait_state("vol1", VolumeState::Attached, Duration::from_secs(60))
        .await;
    assert_eq!(v.epoch, 2);
    let uri = v.endpoint.clone().unwrap();
    assert!(uri.contains(&c.nodes[1].address));
    qemu_io(
        &uri,
        &[
            "read -P 0x5a 0 4M".into(),
            "read -P 0x3c 8M 1M".into(),
            "read -P 0 16M 1M".into(),
        ],
    )
    .unwrap();
    // No orphans anywhere.
    c.manager.poll_nodes().await;
    assert!(m.orphans().is_empty(), "{:?}", m.orphans());
    m.delete_volume("vol1").unwrap();
    c.wait("volume deleted", Duration::from_secs(60), |m| {
        m.volume("vol1").is_err()
    })
    .await;
    let ev = c.events();
    for r in ["Created", "Attached", "Detached", "Deleted"] {
        assert!(ev.iter().any(|e| e.reason == r), "no {r} event");
    }
}
