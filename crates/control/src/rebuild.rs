//! Replica rebuild: the decisions, as plain functions (the manager performs
//! them; docs/CONTROL.md, "Rebuild").
//!
//! A degraded attached volume gets a new replica on a node that holds none of
//! its replicas. The new replica receives the volume's snapshots layer by layer
//! from a healthy replica (only the blocks each layer holds, as SPDK's shallow
//! copy), then joins the engine's raid as a member whose rebuild copies only
//! what the source's head layer holds (listed with the engine quiesced, so
//! nothing written meanwhile is missed). Once the raid reports it in sync it is
//! healthy, and the replica it replaces is removed.
//!
//! [`transition`] is the state machine over [`RebuildPhase`]; [`plan`] chooses
//! source, target and the replica replaced.

use crate::model::{Node, RebuildPhase, Replica, ReplicaState, Volume, VolumeState};
use crate::placement;

/// What the manager observed or did in the current phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebuildEvent {
    /// The new replica exists, admits the source node, and the source is connected to it.
    Prepared,
    /// The source dataplane started copying the current snapshot (operation id).
    CopyStarted(u64),
    /// The current snapshot is complete on the target (copied and snapshotted,
    /// or found already there after an interruption).
    SnapshotDone,
    /// The source dataplane does not know the copy operation (it restarted):
    /// the copy of the current snapshot starts again.
    CopyLost,
    /// The new replica is a raid member of the engine, being filled.
    Joined,
    /// The raid reports the member in sync.
    InSync,
    /// Something failed for good (a copy error, the member dropped, the
    /// source or target gone): the rebuild ends and its replica is removed.
    Failed(String),
}

/// What the rebuild does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Go on in this phase.
    Phase(RebuildPhase),
    /// The replica is in sync: healthy from now on.
    Done,
    /// Give up: remove the new replica (why).
    Abandon(String),
}

/// An event that makes no sense in a phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rebuild: {event:?} is not valid while {phase}")]
pub struct IllegalTransition {
    pub phase: RebuildPhase,
    pub event: RebuildEvent,
}

/// The rebuild's state machine: the phase after `ev` happened in `phase`,
/// for a volume with `snapshots` snapshots to copy.
pub fn transition(
    phase: &RebuildPhase,
    ev: RebuildEvent,
    snapshots: usize,
) -> Result<Next, IllegalTransition> {
    use RebuildEvent as E;
    use RebuildPhase as P;
    let after_snapshot = |index: usize| {
        if index + 1 < snapshots {
            P::CopySnapshot {
                index: index + 1,
                op: None,
            }
        } else {
            P::Join
        }
    };
    let next = match (phase, &ev) {
        (_, E::Failed(why)) => Next::Abandon(why.clone()),
        (P::Preparing, E::Prepared) if snapshots == 0 => Next::Phase(P::Join),
        (P::Preparing, E::Prepared) => Next::Phase(P::CopySnapshot { index: 0, op: None }),
        (P::CopySnapshot { index, op: None }, E::CopyStarted(op)) if *index < snapshots => {
            Next::Phase(P::CopySnapshot {
                index: *index,
                op: Some(*op),
            })
        }
        (P::CopySnapshot { index, .. }, E::SnapshotDone) if *index < snapshots => {
            Next::Phase(after_snapshot(*index))
        }
        (P::CopySnapshot { index, op: Some(_) }, E::CopyLost) => Next::Phase(P::CopySnapshot {
            index: *index,
            op: None,
        }),
        (P::Join, E::Joined) => Next::Phase(P::SyncHead),
        (P::SyncHead, E::InSync) => Next::Done,
        _ => {
            return Err(IllegalTransition {
                phase: phase.clone(),
                event: ev,
            })
        }
    };
    Ok(next)
}

/// A rebuild to start: copy from `source` into a new replica on
/// (`node`, `disk`), replacing `replaces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub source: String,
    pub node: String,
    pub disk: String,
    pub replaces: Option<String>,
}

/// Why a degraded volume is not being rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRebuild {
    /// Nothing to do: enough healthy replicas, or one is being rebuilt.
    #[error("nothing to rebuild")]
    NotNeeded,
    /// Only an attached volume with a healthy replica can be rebuilt.
    #[error("{0}")]
    NotNow(String),
    /// No node without a replica of this volume has room (hard anti-affinity).
    #[error("no node to rebuild a replica on: {0}")]
    NoPlace(String),
}

/// Chooses what to rebuild for `v`, given its replicas and the nodes. One
/// rebuild at a time per volume; the new replica goes on a ready node that
/// holds no healthy or rebuilding replica of the volume (a node whose replica
/// is out of sync or failed qualifies: that replica is the one replaced).
pub fn plan(v: &Volume, replicas: &[Replica], nodes: &[Node]) -> Result<Plan, NoRebuild> {
    let healthy: Vec<&Replica> = replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Healthy)
        .collect();
    if replicas.iter().any(|r| r.state == ReplicaState::Rebuilding)
        || healthy.len() >= v.replica_count as usize
    {
        return Err(NoRebuild::NotNeeded);
    }
    if v.state != VolumeState::Attached {
        return Err(NoRebuild::NotNow(format!(
            "volume {} is {:?}; replicas are rebuilt while it is attached",
            v.name, v.state
        )));
    }
    // The source: a healthy replica, preferably on the engine's node (its
    // copy then reads locally), else the first by name (stable choice).
    let source = healthy
        .iter()
        .find(|r| v.engine_node.as_deref() == Some(r.node.as_str()))
        .or_else(|| healthy.iter().min_by(|a, b| a.name.cmp(&b.name)))
        .ok_or_else(|| NoRebuild::NotNow(format!("volume {} has no healthy replica", v.name)))?;
    let busy: Vec<String> = healthy.iter().map(|r| r.node.clone()).collect();
    let free: Vec<Node> = nodes
        .iter()
        .filter(|n| !busy.contains(&n.name))
        .cloned()
        .collect();
    let (node, disk) = placement::place(&free, &[], 1, v.size_bytes)
        .map_err(|e| NoRebuild::NoPlace(e.to_string()))?
        .into_iter()
        .next()
        .ok_or_else(|| NoRebuild::NoPlace("no candidate".into()))?;
    // Replace a broken replica, the one on the chosen node first.
    let broken = |r: &&Replica| matches!(r.state, ReplicaState::OutOfSync | ReplicaState::Failed);
    let replaces = replicas
        .iter()
        .filter(broken)
        .find(|r| r.node == node)
        .or_else(|| {
            replicas
                .iter()
                .filter(broken)
                .min_by(|a, b| a.name.cmp(&b.name))
        })
        .map(|r| r.name.clone());
    Ok(Plan {
        source: source.name.clone(),
        node,
        disk,
        replaces,
    })
}

/// Gaps up to this many bytes between two ranges to copy are copied too:
/// a gap holds the same data on both sides, so copying it costs bandwidth
/// only, while every separate range costs the raid a lock, a read and a write
/// (a head written by 4 KiB random writes lists tens of thousands of ranges).
pub const COALESCE_GAP: u64 = 256 << 10;

/// Sorts byte ranges `(offset, len)` and merges those that overlap or lie
/// within `max_gap` of each other.
pub fn coalesce(mut ranges: Vec<(u64, u64)>, max_gap: u64) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (o, n) in ranges {
        match out.last_mut() {
            Some((lo, ln)) if o <= (*lo + *ln).saturating_add(max_gap) => {
                let end = (*lo + *ln).max(o + n);
                *ln = end - *lo;
            }
            _ => out.push((o, n)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Disk, Robustness};
    use RebuildEvent as E;
    use RebuildPhase as P;

    #[test]
    fn a_rebuild_walks_its_phases() {
        let mut p = P::Preparing;
        let mut seen = Vec::new();
        let steps = [
            E::Prepared,
            E::CopyStarted(7),
            E::CopyLost,
            E::CopyStarted(8),
            E::SnapshotDone,
            E::SnapshotDone, // found on the target after an interruption
            E::Joined,
        ];
        for ev in steps {
            match transition(&p, ev.clone(), 2).unwrap() {
                Next::Phase(n) => p = n,
                other => panic!("{ev:?} ended the rebuild: {other:?}"),
            }
            seen.push(p.clone());
        }
        assert_eq!(
            seen,
            vec![
                P::CopySnapshot { index: 0, op: None },
                P::CopySnapshot {
                    index: 0,
                    op: Some(7)
                },
                P::CopySnapshot { index: 0, op: None },
                P::CopySnapshot {
                    index: 0,
                    op: Some(8)
                },
                P::CopySnapshot { index: 1, op: None },
                P::Join,
                P::SyncHead,
            ]
        );
        assert_eq!(transition(&p, E::InSync, 2), Ok(Next::Done));
    }

    #[test]
    fn ranges_close_together_are_copied_as_one() {
        let k = 1024;
        let got = coalesce(
            vec![
                (100 * k, 4 * k),
                (0, 4 * k),
                (8 * k, 4 * k),
                (2 * k, 4 * k),
                (50 * k, 0),
            ],
            4 * k,
        );
        // 0..6K and 8..12K are 2K apart: merged; 100K is far.
        assert_eq!(got, vec![(0, 12 * k), (100 * k, 4 * k)]);
        assert_eq!(coalesce(vec![(0, 4), (4, 4)], 0), vec![(0, 8)]);
        assert_eq!(coalesce(vec![(0, 4), (5, 4)], 0), vec![(0, 4), (5, 4)]);
        assert!(coalesce(Vec::new(), 10).is_empty());
        // Every byte of the input is covered, and nothing merges across a big gap.
        let input: Vec<(u64, u64)> = (0..200u64)
            .map(|i| ((i * 7919) % 1000 * 4096, 4096))
            .collect();
        let out = coalesce(input.clone(), 3 * 4096);
        for (o, n) in &input {
            assert!(out.iter().any(|(a, m)| a <= o && o + n <= a + m));
        }
        assert!(out.windows(2).all(|w| w[0].0 + w[0].1 + 3 * 4096 < w[1].0));
    }

    #[test]
    fn without_snapshots_it_joins_at_once() {
        assert_eq!(
            transition(&P::Preparing, E::Prepared, 0),
            Ok(Next::Phase(P::Join))
        );
    }

    #[test]
    fn failure_ends_it_from_any_phase() {
        for p in [
            P::Preparing,
            P::CopySnapshot {
                index: 0,
                op: Some(1),
            },
            P::Join,
            P::SyncHead,
        ] {
            assert_eq!(
                transition(&p, E::Failed("x".into()), 1),
                Ok(Next::Abandon("x".into()))
            );
        }
    }

    #[test]
    fn illegal_moves_are_refused() {
        let bad = [
            (P::Preparing, E::Joined),
            (P::Preparing, E::InSync),
            (
                P::CopySnapshot {
                    index: 0,
                    op: Some(1),
                },
                E::CopyStarted(2),
            ),
            (P::CopySnapshot { index: 0, op: None }, E::CopyLost),
            (P::CopySnapshot { index: 3, op: None }, E::SnapshotDone),
            (P::Join, E::InSync),
            (P::SyncHead, E::Joined),
            (P::SyncHead, E::Prepared),
        ];
        for (p, e) in bad {
            assert!(transition(&p, e.clone(), 2).is_err(), "{p:?} + {e:?}");
        }
    }

    fn node(name: &str, ready: bool) -> Node {
        Node {
            name: name.into(),
            agent_url: String::new(),
            address: String::new(),
            disks: vec![Disk {
                name: "disk0".into(),
                path: String::new(),
                total_bytes: 10 << 30,
                free_bytes: 10 << 30,
                scheduled_bytes: 0,
                ready: true,
                reason: None,
            }],
            ready,
            last_seen: 0,
            reason: None,
        }
    }

    fn rep(name: &str, node: &str, state: ReplicaState) -> Replica {
        Replica {
            name: name.into(),
            volume: "v".into(),
            node: node.into(),
            disk: "disk0".into(),
            state,
            reason: None,
            last_in_sync_epoch: 1,
            created: 0,
            rebuild: None,
        }
    }

    fn vol(state: VolumeState) -> Volume {
        Volume {
            name: "v".into(),
            size_bytes: 1 << 30,
            replica_count: 3,
            attach: None,
            state,
            robustness: Robustness::Degraded,
            epoch: 2,
            engine_node: Some("n2".into()),
            endpoint: None,
            conditions: Vec::new(),
            attach_attempts: 0,
            state_transitions: 0,
            created: 0,
        }
    }

    #[test]
    fn plans_on_the_node_without_a_healthy_replica() {
        let nodes = [node("n1", true), node("n2", true), node("n3", true)];
        let rs = [
            rep("v-r1", "n1", ReplicaState::Healthy),
            rep("v-r2", "n2", ReplicaState::Healthy),
            rep("v-r3", "n3", ReplicaState::OutOfSync),
        ];
        let p = plan(&vol(VolumeState::Attached), &rs, &nodes).unwrap();
        // The source is on the engine's node; the broken replica's node is free again.
        assert_eq!(
            p,
            Plan {
                source: "v-r2".into(),
                node: "n3".into(),
                disk: "disk0".into(),
                replaces: Some("v-r3".into()),
            }
        );
    }

    #[test]
    fn no_rebuild_when_not_needed_not_attached_or_nowhere() {
        let nodes = [node("n1", true), node("n2", true), node("n3", false)];
        let mut rs = vec![
            rep("v-r1", "n1", ReplicaState::Healthy),
            rep("v-r2", "n2", ReplicaState::Healthy),
            rep("v-r3", "n3", ReplicaState::Failed),
        ];
        let v = vol(VolumeState::Attached);
        assert!(matches!(plan(&v, &rs, &nodes), Err(NoRebuild::NoPlace(_))));
        assert!(matches!(
            plan(&vol(VolumeState::Detached), &rs, &nodes),
            Err(NoRebuild::NotNow(_))
        ));
        rs[2].state = ReplicaState::Rebuilding;
        assert_eq!(plan(&v, &rs, &nodes), Err(NoRebuild::NotNeeded));
        rs[2].state = ReplicaState::Healthy;
        assert_eq!(plan(&v, &rs, &nodes), Err(NoRebuild::NotNeeded));
    }
}
