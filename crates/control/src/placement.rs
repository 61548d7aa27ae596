//! Replica placement: a pure function of the nodes, their disks and what is
//! already placed. One replica per node where possible, on the disk with the
//! most room; disk space aware (thin volumes may overcommit by a bounded ratio).

use crate::model::Node;

/// Why no placement exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no ready node with a ready disk")]
    NoNodes,
    #[error("not enough space: {0}")]
    NoSpace(String),
}

/// Overcommit allowed for thin replicas: scheduled ≤ total × this / 100.
pub const OVERPROVISIONING_PCT: u64 = 200;

/// Chooses (node, disk) for `count` replicas of `size` bytes, avoiding
/// `taken` (nodes already holding a replica of this volume) where possible.
pub fn place(
    nodes: &[Node],
    taken: &[String],
    count: usize,
    size: u64,
) -> Result<Vec<(String, String)>, PlacementError> {
    let mut cand: Vec<(String, String, u64)> = Vec::new(); // (node, disk, room)
    for n in nodes.iter().filter(|n| n.ready) {
        for d in n.disks.iter().filter(|d| d.ready) {
            let cap = d.total_bytes.saturating_mul(OVERPROVISIONING_PCT) / 100;
            let room = cap.saturating_sub(d.scheduled_bytes);
            cand.push((n.name.clone(), d.name.clone(), room));
        }
    }
    if cand.is_empty() {
        return Err(PlacementError::NoNodes);
    }
    let mut out: Vec<(String, String)> = Vec::new();
    let mut used_nodes: Vec<String> = taken.to_vec();
    for _ in 0..count {
        let fits = |c: &&(String, String, u64)| {
            c.2 >= size && !out.iter().any(|(n, d)| n == &c.0 && d == &c.1)
        };
        // Prefer a node without a replica of this volume; then the most room.
        let best = cand
            .iter()
            .filter(fits)
            .max_by_key(|c| (!used_nodes.contains(&c.0), c.2))
            .cloned();
        match best {
            Some((n, d, _)) => {
                used_nodes.push(n.clone());
                if let Some(c) = cand.iter_mut().find(|c| c.0 == n && c.1 == d) {
                    c.2 -= size;
                }
                out.push((n, d));
            }
            None => {
                return Err(PlacementError::NoSpace(format!(
                    "{} of {count} replicas of {size} bytes fit (overprovisioning {OVERPROVISIONING_PCT}%)",
                    out.len()
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Disk;

    fn node(name: &str, disks: &[(&str, u64)]) -> Node {
        Node {
            name: name.into(),
            agent_url: String::new(),
            address: String::new(),
            disks: disks
                .iter()
                .map(|(d, t)| Disk {
                    name: d.to_string(),
                    path: String::new(),
                    total_bytes: *t,
                    free_bytes: *t,
                    scheduled_bytes: 0,
                    ready: true,
                    reason: None,
                })
                .collect(),
            ready: true,
            last_seen: 0,
            reason: None,
        }
    }

    #[test]
    fn one_per_node_then_most_room() {
        let nodes = vec![
            node("a", &[("a0", 100), ("a1", 500)]),
            node("b", &[("b0", 100)]),
            node("c", &[("c0", 100)]),
        ];
        let p = place(&nodes, &[], 3, 10).unwrap();
        let ns: Vec<&str> = p.iter().map(|(n, _)| n.as_str()).collect();
        assert!(ns.contains(&"a") && ns.contains(&"b") && ns.contains(&"c"));
        assert!(
            p.contains(&("a".into(), "a1".into())),
            "the roomier disk of node a"
        );
        // Two nodes, three replicas: the third shares a node (other disk first).
        let nodes = vec![
            node("a", &[("a0", 100), ("a1", 100)]),
            node("b", &[("b0", 100)]),
        ];
        let p = place(&nodes, &[], 3, 10).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p.iter().filter(|(n, _)| n == "a").count(), 2);
        // Rebuild placement avoids nodes that already hold the volume.
        let nodes = vec![node("a", &[("a0", 100)]), node("b", &[("b0", 100)])];
        assert_eq!(place(&nodes, &["a".into()], 1, 10).unwrap()[0].0, "b");
    }

    #[test]
    fn space_is_respected() {
        let nodes = vec![node("a", &[("a0", 100)])];
        assert!(
            place(&nodes, &[], 1, 200).is_ok(),
            "thin: 200% overprovisioning"
        );
        assert!(matches!(
            place(&nodes, &[], 1, 201),
            Err(PlacementError::NoSpace(_))
        ));
        assert_eq!(place(&[], &[], 1, 1), Err(PlacementError::NoNodes));
    }
}
