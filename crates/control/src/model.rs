//! The control plane's objects: spec (what the user asked for) and status (what
//! was observed). Plain serde types shared by the manager, the agent and the CLI.

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A node: one dataplane + agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// Base URL of the node's agent (http://addr:port).
    pub agent_url: String,
    /// Address replica targets listen on and NBD/NVMe frontends are served at.
    pub address: String,
    pub disks: Vec<Disk>,
    pub ready: bool,
    /// Unix seconds of the last successful contact.
    pub last_seen: u64,
    /// Why the node is not ready, if it is not.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A disk of a node: a directory holding one lvstore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    pub name: String,
    pub path: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Bytes promised to replicas placed on it (thin: may exceed what is used).
    #[serde(default)]
    pub scheduled_bytes: u64,
    pub ready: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

/// How a volume is exposed to its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Frontend {
    #[default]
    Nbd,
    Nvmf,
}

/// Where the user wants the volume attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachSpec {
    pub node: String,
    pub frontend: Frontend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    Creating,
    Detached,
    Attaching,
    Attached,
    Detaching,
    Deleting,
    Faulted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Robustness {
    Healthy,
    Degraded,
    Faulted,
    Unknown,
}

/// A named condition with a reason a person can read and advice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub kind: String,
    pub reason: String,
    #[serde(default)]
    pub advice: Option<String>,
    pub since: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub size_bytes: u64,
    pub replica_count: u32,
    /// Desired attachment (None = detached).
    pub attach: Option<AttachSpec>,
    pub state: VolumeState,
    pub robustness: Robustness,
    /// Engine epoch: bumped by every new engine (docs/CONTROL.md, "Names").
    pub epoch: u64,
    /// Node the engine runs on, when attached.
    pub engine_node: Option<String>,
    pub endpoint: Option<String>,
    pub conditions: Vec<Condition>,
    pub attach_attempts: u64,
    pub state_transitions: u64,
    pub created: u64,
}

impl Volume {
    pub fn condition(&self, kind: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }
    pub fn set_condition(&mut self, kind: &str, reason: String, advice: Option<String>) {
        if let Some(c) = self.conditions.iter_mut().find(|c| c.kind == kind) {
            if c.reason != reason {
                c.reason = reason;
                c.since = now_secs();
            }
            c.advice = advice;
        } else {
            self.conditions.push(Condition {
                kind: kind.into(),
                reason,
                advice,
                since: now_secs(),
            });
        }
    }
    pub fn clear_condition(&mut self, kind: &str) {
        self.conditions.retain(|c| c.kind != kind);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Placed, not yet created on its node.
    Pending,
    /// Holds the volume's data as of the last engine (usable as RW and as a source).
    Healthy,
    /// Missed writes: must be rebuilt before any use (I5).
    OutOfSync,
    /// Its node or disk lost it (data missing).
    Failed,
    Deleting,
    /// Being filled from a healthy replica (see [`RebuildInfo`]); not used
    /// for reads, as a source, or in a new engine until it is healthy.
    Rebuilding,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replica {
    pub name: String,
    pub volume: String,
    pub node: String,
    pub disk: String,
    pub state: ReplicaState,
    #[serde(default)]
    pub reason: Option<String>,
    /// Engine epoch during which it was last known in sync.
    pub last_in_sync_epoch: u64,
    pub created: u64,
    /// While rebuilding: from where, and how far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildInfo>,
}

/// A replica's rebuild: its snapshots are copied layer by layer from a
/// healthy replica (only what each layer holds), then it joins the engine and
/// receives what was written since the last snapshot (docs/CONTROL.md, "Rebuild").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebuildInfo {
    /// The healthy replica it copies from.
    pub source: String,
    /// The engine epoch it is rebuilt for: a new engine ends it.
    pub epoch: u64,
    pub phase: RebuildPhase,
    /// The volume's snapshots, oldest first, when it started (snapshots are
    /// neither taken nor deleted while a rebuild runs).
    pub snapshots: Vec<String>,
    /// The replica it replaces, removed once this one is in sync.
    #[serde(default)]
    pub replaces: Option<String>,
    /// Unix seconds.
    pub started: u64,
    /// Progress of the current phase, 0 to 100.
    #[serde(default)]
    pub percent: u32,
}

/// Where a rebuild stands (its transitions: `control::rebuild`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step")]
pub enum RebuildPhase {
    /// The new replica is being created and connected to the source node.
    Preparing,
    /// Snapshot `index` (of `RebuildInfo::snapshots`) is being copied; `op` is
    /// the source dataplane's shallow-copy operation once started.
    CopySnapshot { index: usize, op: Option<u64> },
    /// Joining the engine: a raid member that gets what the source's head
    /// layer holds (listed with the engine quiesced).
    Join,
    /// A raid member being filled.
    SyncHead,
}

impl std::fmt::Display for RebuildPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RebuildPhase::Preparing => write!(f, "preparing"),
            RebuildPhase::CopySnapshot { index, .. } => write!(f, "copying snapshot {}", index + 1),
            RebuildPhase::Join => write!(f, "joining the engine"),
            RebuildPhase::SyncHead => write!(f, "syncing the head"),
        }
    }
}

/// An event a user can list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub time: u64,
    /// "volume", "replica", "node", "engine", "orphan".
    pub kind: String,
    pub object: String,
    pub reason: String,
    pub message: String,
}

/// A snapshot of a volume (taken on every healthy replica).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub volume: String,
    pub name: String,
    pub created: u64,
    pub size_bytes: u64,
}
