//! The agent's HTTP API types, shared by the agent (server) and the manager (client).

use serde::{Deserialize, Serialize};

use crate::model::Frontend;

/// A replica the agent must make exist, exposed only to `allowed_host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSpec {
    pub name: String,
    pub volume: String,
    pub disk: String,
    pub size_bytes: u64,
    /// The one host NQN that may connect (the current engine's); None = nobody.
    pub allowed_host: Option<String>,
}

/// What a replica looks like on its node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub name: String,
    pub disk: String,
    pub size_bytes: u64,
    pub nqn: String,
    pub traddr: String,
    pub trsvcid: String,
    /// Host NQNs on the allow-list.
    pub hosts: Vec<String>,
    /// Host NQNs with a controller connected now.
    pub connected_hosts: Vec<String>,
    pub snapshots: Vec<String>,
}

/// Reconnect knobs of the engine's controllers (SPDK's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Knobs {
    pub ctrlr_loss_timeout_sec: i32,
    pub reconnect_delay_sec: u32,
    pub fast_io_fail_timeout_sec: u32,
}

impl Default for Knobs {
    /// Longhorn's values.
    fn default() -> Self {
        Knobs {
            ctrlr_loss_timeout_sec: 15,
            reconnect_delay_sec: 2,
            fast_io_fail_timeout_sec: 10,
        }
    }
}

/// Where the engine reaches a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineReplica {
    pub name: String,
    pub traddr: String,
    pub trsvcid: String,
}

/// An engine the agent must make exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSpec {
    pub volume: String,
    pub epoch: u64,
    pub replicas: Vec<EngineReplica>,
    /// None: controllers and raid only (phase 1); the frontend comes once the
    /// manager has recorded which replicas made it in.
    pub frontend: Option<Frontend>,
    pub knobs: Knobs,
}

/// One decision of a convergent step (I1), reported as an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEvent {
    /// "controller", "raid", "frontend", "lvol", "subsystem", ...
    pub kind: String,
    pub name: String,
    /// "adopted", "replaced", "created", "deleted", "failed".
    pub outcome: String,
    pub detail: String,
}

/// State of one raid member as the dataplane reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub replica: String,
    /// "online", "rebuilding", "out_of_sync", "missing".
    pub state: String,
    pub reason: Option<String>,
    /// While rebuilding: how far, 0 to 100.
    #[serde(default)]
    pub rebuild_percent: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineStatus {
    pub volume: String,
    pub epoch: u64,
    /// Replicas whose controller is attached and whose namespace is a raid member.
    pub members: Vec<MemberStatus>,
    pub raid_state: Option<String>,
    pub frontend: Option<Frontend>,
    pub endpoint: Option<String>,
    pub events: Vec<StepEvent>,
}

/// The durable record the dataplane's raid keeps (I5), also after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaidRecord {
    pub raid: String,
    pub uuid: String,
    pub members: Vec<MemberStatus>,
}

/// A resource that follows corral's naming but that nothing live owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    /// "controller", "raid", "nbd_export", "subsystem", "lvol".
    pub kind: String,
    pub name: String,
    pub detail: String,
    pub age_secs: u64,
}

/// What the manager says this node should run, for orphan detection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub replicas: Vec<String>,
    /// (volume, epoch) of engines on this node.
    pub engines: Vec<(String, u64)>,
    /// Rebuild targets this node copies snapshots to (its rebuild controllers).
    #[serde(default)]
    pub rebuilds: Vec<String>,
    /// The manager process that computed this (`Manager::instance`).
    #[serde(default)]
    pub manager: String,
    /// Taken before the manager read its store: of two pushes from one
    /// manager, the higher one saw every write the lower one saw. A push
    /// that arrives late (a tick's, overtaken by an attach's) is dropped, so
    /// a new engine is never briefly unknown, hence never an orphan.
    #[serde(default)]
    pub generation: u64,
}

impl Desired {
    /// Whether `self` may replace `old` (older pushes of one manager may not).
    pub fn supersedes(&self, old: &Desired) -> bool {
        self.manager != old.manager || self.generation >= old.generation
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    pub name: String,
    pub path: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub ready: bool,
    pub reason: Option<String>,
}

/// Everything the agent knows about its node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub address: String,
    /// Changes when the dataplane restarts (its process start time and pid).
    pub dataplane_instance: String,
    pub disks: Vec<DiskStatus>,
    pub replicas: Vec<ReplicaStatus>,
    pub engines: Vec<EngineStatus>,
    /// Durable raid records (survive a dataplane crash).
    pub raid_records: Vec<RaidRecord>,
    /// None until the manager has told the agent what it should run.
    pub orphans: Option<Vec<Orphan>>,
    /// Every NVMe/TCP controller of the dataplane (name, state, host NQN, target).
    #[serde(default)]
    pub controllers: Vec<ControllerInfo>,
    /// Identifies this agent process (events are numbered per process).
    #[serde(default)]
    pub agent_instance: String,
    /// What the agent did on its own (orphan collection), numbered, newest last.
    #[serde(default)]
    pub events: Vec<(u64, StepEvent)>,
}

/// A host controller in the node's dataplane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerInfo {
    pub name: String,
    pub state: String,
    pub hostnqn: String,
    pub traddr: String,
    pub trsvcid: String,
    pub subnqn: String,
}

/// `PUT /v1/rebuilds/{target}/connection` on the source node of a rebuild.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RebuildConnectReq {
    /// Where the target replica is exposed.
    pub target: EngineReplica,
    pub knobs: Knobs,
}

/// `POST /v1/rebuilds/{target}/copies`: copy one snapshot of `source`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyReq {
    pub source: String,
    pub disk: String,
    pub snapshot: String,
}

/// `POST /v1/engines/{volume}/members`: a replica joins a running engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddMemberReq {
    pub epoch: u64,
    pub replica: EngineReplica,
    pub knobs: Knobs,
    /// Byte ranges its rebuild copies (what it lacks).
    pub ranges: Vec<(u64, u64)>,
}

/// How a shallow copy of a rebuild stands on its source node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyProgress {
    /// SPDK's "in progress", "complete" or "error".
    pub state: String,
    pub copied_blocks: u64,
    pub total_blocks: u64,
    pub error: Option<String>,
}

/// `POST /v1/engines/{volume}/quiesce` on an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuiesceReq {
    /// How long I/O in flight may take to drain.
    pub drain_timeout_ms: u64,
    /// The quiesce ends by itself after this long (a caller that dies never
    /// leaves the volume stalled).
    pub lease_ms: u64,
}

/// The answer to a quiesce, and the body of `POST /v1/engines/{volume}/resume`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuiesceResp {
    pub token: u64,
}

/// An error answered by the agent API: what failed and whether retrying can help.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub message: String,
    pub class: crate::retry::ErrorClass,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(manager: &str, generation: u64) -> Desired {
        Desired {
            manager: manager.into(),
            generation,
            ..Desired::default()
        }
    }

    #[test]
    fn a_late_push_of_the_same_manager_does_not_replace_a_newer_one() {
        assert!(d("m1", 5).supersedes(&d("m1", 4)));
        assert!(d("m1", 5).supersedes(&d("m1", 5)));
        assert!(!d("m1", 4).supersedes(&d("m1", 5)));
        // A restarted manager counts from 1 again: it always wins.
        assert!(d("m2", 1).supersedes(&d("m1", 900)));
    }
}
