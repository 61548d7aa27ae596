//! The manager (control plane): desired state in the store, level-triggered
//! reconcilers that drive the agents, health recording (I5), events, metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, Notify};
use tracing::{info, warn};

mod rebuilder;

use crate::api::*;
use crate::model::*;
use crate::naming;
use crate::placement;
use crate::retry::{Backoff, ErrorClass};
use crate::store::{Store, StoreError};

/// How the manager is set up.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub knobs: Knobs,
    /// Reconcile period.
    pub tick: Duration,
    /// A node not heard from for this long is not ready.
    pub node_timeout: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            knobs: Knobs::default(),
            tick: Duration::from_millis(1000),
            node_timeout: Duration::from_secs(10),
        }
    }
}

/// A failed manager operation: what failed, why, what to do, and whether retrying can help.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub message: String,
    pub class: ErrorClass,
    pub advice: Option<String>,
    /// HTTP status for the API (400 bad request, 404, 409 conflict, 503 ...).
    pub status: u16,
}

impl OpError {
    pub fn new(status: u16, class: ErrorClass, message: impl Into<String>) -> Self {
        OpError {
            message: message.into(),
            class,
            advice: None,
            status,
        }
    }
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(400, ErrorClass::Permanent, message)
    }
    pub fn not_found(what: &str, name: &str) -> Self {
        Self::new(
            404,
            ErrorClass::Permanent,
            format!("{what} {name} does not exist"),
        )
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, ErrorClass::Permanent, message)
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(503, ErrorClass::Transient, message)
    }
    pub fn with_advice(mut self, a: impl Into<String>) -> Self {
        self.advice = Some(a.into());
        self
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::new(500, ErrorClass::Transient, format!("store: {e}"))
    }
}

/// The manager.
pub struct Manager {
    pub cfg: ManagerConfig,
    pub store: Store,
    http: reqwest::Client,
    seq: AtomicU64,
    pub events_tx: broadcast::Sender<Event>,
    status: Mutex<HashMap<String, (AgentStatus, Instant)>>,
    backoff: Mutex<HashMap<String, (Backoff, Instant)>>,
    /// When each rebuilt replica joined its engine: a node status asked for
    /// before that cannot show it as a member.
    joined_at: Mutex<HashMap<String, Instant>>,
    /// Per volume: the wait before the next rebuild attempt after one failed.
    rebuild_backoff: Mutex<HashMap<String, (Backoff, Instant)>>,
    /// Rebuilds ended since the manager started: (done, failed).
    rebuilds_ended: Mutex<(u64, u64)>,
    vol_locks: Mutex<HashMap<String, Arc<VolSlot>>>,
    /// Wakes the periodic loop early (a node registered).
    pub wake: Notify,
    /// Volumes a request changed: reconciled at once, on their own, instead
    /// of waiting for the next tick (which polls every node and visits every
    /// volume, so its length grows with the cluster).
    kick_tx: mpsc::UnboundedSender<String>,
    kick_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    pub attach_attempts: Mutex<HashMap<String, u64>>,
    /// When each volume's current engine was complete: a node status asked
    /// for before that cannot show it, so it never means "engine lost".
    engine_built: Mutex<HashMap<String, Instant>>,
    /// Identifies this manager process (in desired sets it pushes).
    instance: String,
    /// Numbers desired-set pushes (see `Desired::generation`).
    desired_gen: AtomicU64,
    /// Per node: (agent instance, last agent event turned into an event).
    agent_events_seen: Mutex<HashMap<String, (String, u64)>>,
}

/// How long an engine's writes in flight may take to drain for a snapshot.
const SNAPSHOT_DRAIN: Duration = Duration::from_secs(5);
/// How long the replicas have to snapshot while the engine is quiesced.
const SNAPSHOT_WINDOW: Duration = Duration::from_secs(5);
/// The engine resumes by itself after this long, whatever happens to the
/// manager (the longest a snapshot can stall a volume's I/O).
const SNAPSHOT_LEASE: Duration = Duration::from_secs(10);

/// One volume's reconcile slot: at most one reconcile runs at a time, and a
/// request that arrives while one runs makes it run once more (a request is
/// never lost behind a reconcile that read the volume before it changed).
#[derive(Debug, Default)]
struct VolSlot {
    running: tokio::sync::Mutex<()>,
    again: AtomicBool,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

fn vkey(v: &str) -> String {
    format!("volume/{v}")
}
fn rkey(r: &str) -> String {
    format!("replica/{r}")
}
fn nkey(n: &str) -> String {
    format!("node/{n}")
}
fn skey(v: &str, s: &str) -> String {
    format!("snapshot/{v}/{s}")
}

/// Events kept in the store (older ones are dropped).
const EVENTS_KEPT: u64 = 10_000;

impl Manager {
    pub fn new(store: Store, cfg: ManagerConfig) -> Arc<Self> {
        let seq = store
            .get::<u64>("meta/event_seq")
            .ok()
            .flatten()
            .unwrap_or(0);
        let (events_tx, _) = broadcast::channel(1024);
        let (kick_tx, kick_rx) = mpsc::unbounded_channel();
        Arc::new(Manager {
            cfg,
            store,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .connect_timeout(Duration::from_secs(3))
                .build()
                .unwrap_or_default(),
            seq: AtomicU64::new(seq),
            events_tx,
            status: Mutex::new(HashMap::new()),
            backoff: Mutex::new(HashMap::new()),
            rebuild_backoff: Mutex::new(HashMap::new()),
            rebuilds_ended: Mutex::new((0, 0)),
            joined_at: Mutex::new(HashMap::new()),
            vol_locks: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            kick_tx,
            kick_rx: Mutex::new(Some(kick_rx)),
            engine_built: Mutex::new(HashMap::new()),
            instance: uuid::Uuid::new_v4().to_string(),
            desired_gen: AtomicU64::new(0),
            attach_attempts: Mutex::new(HashMap::new()),
            agent_events_seen: Mutex::new(HashMap::new()),
        })
    }

    // ----------------------------------------------------------- events ----

    /// Records an event (store + live followers + log).
    pub fn event(&self, kind: &str, object: &str, reason: &str, message: impl Into<String>) {
        let message = message.into();
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let e = Event {
            seq,
            time: now_secs(),
            kind: kind.into(),
            object: object.into(),
            reason: reason.into(),
            message,
        };
        info!(kind, object, reason, message = %e.message, "event");
        let r = self.store.write(|t| {
            t.put(&format!("event/{seq:020}"), &e)?;
            t.put("meta/event_seq", &seq)?;
            if seq > EVENTS_KEPT {
                t.delete(&format!("event/{:020}", seq - EVENTS_KEPT))?;
            }
            Ok(())
        });
        if let Err(err) = r {
            warn!("event not stored: {err}");
        }
        let _ = self.events_tx.send(e);
    }

    /// The newest event's sequence number (0 before the first).
    pub fn event_seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Returns once an event about `object` newer than `after` exists, or
    /// after `max`: a client waiting for a volume's state wakes when it
    /// changes instead of polling (state changes are events: `transition`).
    pub async fn wait_for_event(&self, object: &str, after: u64, max: Duration) {
        // Subscribe before looking back: an event stored after the look is
        // broadcast after the subscription, so none falls in between.
        let mut rx = self.events_tx.subscribe();
        if self.event_seq() > after {
            let past = self.events_since(after);
            if past.map_or(true, |es| es.iter().any(|e| e.object == object)) {
                return;
            }
        }
        let _ = tokio::time::timeout(max, async {
            loop {
                match rx.recv().await {
                    Ok(e) if e.object == object => return,
                    Ok(_) => {}
                    // Lagged or closed: let the caller look for itself.
                    Err(_) => return,
                }
            }
        })
        .await;
    }

    pub fn events_since(&self, since: u64) -> Result<Vec<Event>, OpError> {
        let from = format!("event/{:020}", since.saturating_add(1));
        Ok(self.store.list_from("event/", &from)?)
    }

    // ------------------------------------------------------------ agents ---

    async fn agent<T: DeserializeOwned>(
        &self,
        node: &Node,
        method: reqwest::Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, OpError> {
        let url = format!("{}{}", node.agent_url.trim_end_matches('/'), path);
        let mut rq = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            rq = rq.json(b);
        }
        let resp = rq.send().await.map_err(|e| {
            OpError::transient(format!(
                "node {}: agent unreachable ({method} {path}): {e}",
                node.name
            ))
        })?;
        let status = resp.status();
        if status.is_success() {
            return resp.json::<T>().await.map_err(|e| {
                OpError::transient(format!(
                    "node {}: bad agent answer to {path}: {e}",
                    node.name
                ))
            });
        }
        let e: ApiError = resp.json().await.unwrap_or(ApiError {
            message: format!("HTTP {status}"),
            class: ErrorClass::Transient,
        });
        Err(OpError::new(
            status.as_u16(),
            e.class,
            format!("node {}: {}", node.name, e.message),
        ))
    }

    pub fn node(&self, name: &str) -> Result<Node, OpError> {
        self.store
            .get::<Node>(&nkey(name))?
            .ok_or_else(|| OpError::not_found("node", name))
    }

    pub fn nodes(&self) -> Result<Vec<Node>, OpError> {
        Ok(self.store.list("node/")?)
    }

    /// Registers (or updates) a node; its agent is polled from then on.
    pub fn register_node(
        &self,
        name: &str,
        agent_url: &str,
        address: &str,
    ) -> Result<Node, OpError> {
        naming::valid_volume_name(name)
            .map_err(|e| OpError::bad(format!("node name {name}: {e}")))?;
        let n = self.store.write(|t| {
            let mut n: Node = t.get(&nkey(name))?.unwrap_or(Node {
                name: name.into(),
                agent_url: agent_url.into(),
                address: address.into(),
                disks: Vec::new(),
                ready: false,
                last_seen: 0,
                reason: Some("not contacted yet".into()),
            });
            n.agent_url = agent_url.into();
            n.address = address.into();
            t.put(&nkey(name), &n)?;
            Ok(n)
        })?;
        self.event(
            "node",
            name,
            "Registered",
            format!("agent {agent_url}, address {address}"),
        );
        self.wake.notify_one();
        Ok(n)
    }

    /// The last status of `node`'s agent, if fresh.
    pub fn cached_status(&self, node: &str) -> Option<AgentStatus> {
        self.cached_status_asked(node).map(|(s, _)| s)
    }

    /// The last status of `node`'s agent, if fresh, with when it was asked for.
    fn cached_status_asked(&self, node: &str) -> Option<(AgentStatus, Instant)> {
        let g = self.status.lock();
        let (s, at) = g.get(node)?;
        (at.elapsed() < self.cfg.node_timeout).then(|| (s.clone(), *at))
    }

    /// What `node` should run, for the agent's orphan detection.
    fn desired_for(&self, node: &str) -> Result<Desired, OpError> {
        // Numbered before the store is read (see Desired::generation).
        let generation = self.desired_gen.fetch_add(1, Ordering::SeqCst) + 1;
        let replicas: Vec<Replica> = self.store.list("replica/")?;
        let volumes: Vec<Volume> = self.store.list("volume/")?;
        let node_of = |name: &str| {
            replicas
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.node.as_str())
        };
        let rebuilds = replicas
            .iter()
            .filter(|r| {
                r.rebuild
                    .as_ref()
                    .is_some_and(|b| node_of(&b.source) == Some(node))
            })
            .map(|r| r.name.clone())
            .collect();
        Ok(Desired {
            rebuilds,
            replicas: replicas
                .into_iter()
                .filter(|r| r.node == node)
                .map(|r| r.name)
                .collect(),
            engines: volumes
                .into_iter()
                .filter(|v| v.engine_node.as_deref() == Some(node))
                .map(|v| (v.name, v.epoch))
                .collect(),
            manager: self.instance.clone(),
            generation,
        })
    }

    async fn push_desired(&self, node: &Node) -> Result<(), OpError> {
        let d = self.desired_for(&node.name)?;
        let _: serde_json::Value = self
            .agent(node, reqwest::Method::PUT, "/v1/desired", Some(&d))
            .await?;
        Ok(())
    }

    /// Polls every agent: node readiness, disks, and raid member health (I5).
    pub async fn poll_nodes(self: &Arc<Self>) {
        let nodes = self.nodes().unwrap_or_default();
        let mut tasks = Vec::new();
        for n in nodes {
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                let _ = me.push_desired(&n).await;
                let asked = Instant::now();
                let r: Result<AgentStatus, OpError> = me
                    .agent(&n, reqwest::Method::GET, "/v1/status", None::<&()>)
                    .await;
                (n, r, asked)
            }));
        }
        for t in tasks {
            let Ok((n, r, asked)) = t.await else { continue };
            match r {
                Ok(st) => {
                    let was_ready = n.ready;
                    let _ = self.store.write(|t| {
                        let Some(mut node) = t.get::<Node>(&nkey(&n.name))? else {
                            return Ok(());
                        };
                        let replicas: Vec<Replica> = Vec::new();
                        let _ = replicas;
                        node.ready = true;
                        node.reason = None;
                        node.last_seen = now_secs();
                        let old = node.disks.clone();
                        node.disks = st
                            .disks
                            .iter()
                            .map(|d| Disk {
                                name: d.name.clone(),
                                path: d.path.clone(),
                                total_bytes: d.total_bytes,
                                free_bytes: d.free_bytes,
                                scheduled_bytes: old
                                    .iter()
                                    .find(|o| o.name == d.name)
                                    .map(|o| o.scheduled_bytes)
                                    .unwrap_or(0),
                                ready: d.ready,
                                reason: d.reason.clone(),
                            })
                            .collect();
                        t.put(&nkey(&n.name), &node)
                    });
                    if !was_ready {
                        self.event("node", &n.name, "Ready", "agent answers");
                    }
                    for d in st.disks.iter().filter(|d| !d.ready) {
                        self.event(
                            "node",
                            &n.name,
                            "DiskNotReady",
                            format!("disk {}: {}", d.name, d.reason.clone().unwrap_or_default()),
                        );
                    }
                    self.record_health(&n.name, &st);
                    self.agent_events(&n.name, &st);
                    // Two polls may overlap (a caller's and the loop's): the
                    // status asked for last wins, whichever answer came last.
                    let mut g = self.status.lock();
                    if g.get(&n.name).is_none_or(|(_, at)| *at <= asked) {
                        g.insert(n.name.clone(), (st, asked));
                    }
                }
                Err(e) => {
                    let stale = self
                        .status
                        .lock()
                        .get(&n.name)
                        .is_none_or(|(_, at)| at.elapsed() > self.cfg.node_timeout);
                    if n.ready && stale {
                        let _ = self.store.write(|t| {
                            if let Some(mut node) = t.get::<Node>(&nkey(&n.name))? {
                                node.ready = false;
                                node.reason = Some(e.message.clone());
                                t.put(&nkey(&n.name), &node)?;
                            }
                            Ok(())
                        });
                        self.event("node", &n.name, "NotReady", e.message.clone());
                    }
                }
            }
        }
    }

    /// Turns what an agent did on its own (orphan collection) into events, once.
    fn agent_events(&self, node: &str, st: &AgentStatus) {
        let fresh: Vec<StepEvent> = {
            let mut seen = self.agent_events_seen.lock();
            let e = seen
                .entry(node.to_string())
                .or_insert_with(|| (st.agent_instance.clone(), 0));
            if e.0 != st.agent_instance {
                *e = (st.agent_instance.clone(), 0);
            }
            let last = e.1;
            let new: Vec<StepEvent> = st
                .events
                .iter()
                .filter(|(s, _)| *s > last)
                .map(|(_, ev)| ev.clone())
                .collect();
            if let Some((s, _)) = st.events.last() {
                e.1 = e.1.max(*s);
            }
            new
        };
        self.emit_steps(&fresh);
    }

    /// I5: a replica the engine's raid dropped (live status or the durable
    /// record that survives a dataplane crash) is out of sync from now on.
    fn record_health(&self, node: &str, st: &AgentStatus) {
        let volumes: Vec<Volume> = self.store.list("volume/").unwrap_or_default();
        for v in volumes
            .iter()
            .filter(|v| v.engine_node.as_deref() == Some(node))
        {
            let mut dropped: Vec<(String, String)> = Vec::new();
            if let Some(e) = st
                .engines
                .iter()
                .find(|e| e.volume == v.name && e.epoch == v.epoch)
            {
                for m in &e.members {
                    if m.state != "online" && m.state != "rebuilding" {
                        dropped.push((
                            m.replica.clone(),
                            m.reason.clone().unwrap_or_else(|| m.state.clone()),
                        ));
                    }
                }
            }
            // Only this epoch's record: older ones describe engines that are gone.
            let uuid = naming::raid_uuid(&v.name, v.epoch).to_string();
            for rec in st
                .raid_records
                .iter()
                .filter(|r| r.raid == naming::raid_name(&v.name) && r.uuid == uuid)
            {
                for m in &rec.members {
                    if m.state != "online" && m.state != "rebuilding" {
                        dropped.push((
                            m.replica.clone(),
                            m.reason.clone().unwrap_or_else(|| m.state.clone()),
                        ));
                    }
                }
            }
            for (r, why) in dropped {
                self.mark_out_of_sync(
                    &r,
                    &format!("dropped by the engine at epoch {}: {why}", v.epoch),
                );
            }
        }
    }

    /// Marks a healthy replica out of sync (durably, before anything uses it again).
    pub fn mark_out_of_sync(&self, replica: &str, reason: &str) {
        let changed = self
            .store
            .write(|t| {
                let Some(mut r) = t.get::<Replica>(&rkey(replica))? else {
                    return Ok(false);
                };
                if r.state != ReplicaState::Healthy {
                    return Ok(false);
                }
                r.state = ReplicaState::OutOfSync;
                r.reason = Some(reason.into());
                t.put(&rkey(replica), &r)?;
                if let Some(mut v) = t.get::<Volume>(&vkey(&r.volume))? {
                    v.robustness = Robustness::Degraded;
                    t.put(&vkey(&r.volume), &v)?;
                }
                Ok(true)
            })
            .unwrap_or(false);
        if changed {
            self.event("replica", replica, "OutOfSync", reason.to_string());
        }
    }

    fn mark_failed(&self, replica: &str, reason: &str) {
        let changed = self
            .store
            .write(|t| {
                let Some(mut r) = t.get::<Replica>(&rkey(replica))? else {
                    return Ok(false);
                };
                if r.state == ReplicaState::Failed && r.reason.as_deref() == Some(reason) {
                    return Ok(false);
                }
                r.state = ReplicaState::Failed;
                r.reason = Some(reason.into());
                t.put(&rkey(replica), &r)?;
                Ok(true)
            })
            .unwrap_or(false);
        if changed {
            self.event("replica", replica, "Failed", reason.to_string());
        }
    }

    // ---------------------------------------------------------- volumes ----

    pub fn volume(&self, name: &str) -> Result<Volume, OpError> {
        self.store
            .get::<Volume>(&vkey(name))?
            .ok_or_else(|| OpError::not_found("volume", name))
    }

    pub fn volumes(&self) -> Result<Vec<Volume>, OpError> {
        Ok(self.store.list("volume/")?)
    }

    /// Every replica, or one volume's: replica names start with their
    /// volume's (naming::new_replica_id), so that is a range read, not a scan.
    pub fn replicas(&self, volume: Option<&str>) -> Result<Vec<Replica>, OpError> {
        let prefix = match volume {
            Some(v) => rkey(&format!("{v}-r")),
            None => rkey(""),
        };
        let found: Vec<Replica> = self.store.list(&prefix)?;
        Ok(found
            .into_iter()
            .filter(|r| volume.is_none_or(|v| r.volume == v))
            .collect())
    }

    /// Creates a volume and places its replicas; they are created by the reconciler.
    pub fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
        replicas: u32,
    ) -> Result<Volume, OpError> {
        naming::valid_volume_name(name)
            .map_err(|e| OpError::bad(format!("volume name {name}: {e}")))?;
        if size_bytes == 0 || !size_bytes.is_multiple_of(4096) {
            return Err(OpError::bad(format!(
                "volume {name}: size must be a positive multiple of 4096 bytes"
            )));
        }
        if replicas == 0 || replicas > 16 {
            return Err(OpError::bad(format!(
                "volume {name}: replicas must be 1..=16"
            )));
        }
        let nodes = self.nodes()?;
        let placed = placement::place(&nodes, &[], replicas as usize, size_bytes).map_err(|e| {
            OpError::conflict(format!("volume {name}: cannot place {replicas} replicas: {e}"))
                .with_advice("add nodes or disks (`corral node ls`), or ask for fewer replicas or a smaller size")
        })?;
        let v = self.store.write(|t| {
            if t.get::<Volume>(&vkey(name))?.is_some() {
                return Ok(None);
            }
            let v = Volume {
                name: name.into(),
                size_bytes,
                replica_count: replicas,
                attach: None,
                state: VolumeState::Creating,
                robustness: Robustness::Unknown,
                epoch: 0,
                engine_node: None,
                endpoint: None,
                conditions: Vec::new(),
                attach_attempts: 0,
                state_transitions: 0,
                created: now_secs(),
            };
            t.put(&vkey(name), &v)?;
            for (node, disk) in &placed {
                let r = Replica {
                    name: naming::new_replica_id(name),
                    volume: name.into(),
                    node: node.clone(),
                    disk: disk.clone(),
                    state: ReplicaState::Pending,
                    reason: None,
                    last_in_sync_epoch: 0,
                    created: now_secs(),
                    rebuild: None,
                };
                t.put(&rkey(&r.name), &r)?;
                if let Some(mut n) = t.get::<Node>(&nkey(node))? {
                    if let Some(d) = n.disks.iter_mut().find(|d| &d.name == disk) {
                        d.scheduled_bytes += size_bytes;
                    }
                    t.put(&nkey(node), &n)?;
                }
            }
            Ok(Some(v))
        })?;
        let v = v.ok_or_else(|| OpError::conflict(format!("volume {name} already exists")))?;
        self.event(
            "volume",
            name,
            "Created",
            format!(
                "{size_bytes} bytes, {replicas} replicas on {}",
                placed
                    .iter()
                    .map(|(n, d)| format!("{n}/{d}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        self.kick(name);
        Ok(v)
    }

    /// Sets the desired attachment. Idempotent: attaching where it is attached is a no-op.
    pub fn set_attach(&self, name: &str, spec: Option<AttachSpec>) -> Result<Volume, OpError> {
        let v = self.store.write(|t| {
            let Some(mut v) = t.get::<Volume>(&vkey(name))? else {
                return Ok(Err(OpError::not_found("volume", name)));
            };
            if v.state == VolumeState::Deleting {
                return Ok(Err(OpError::conflict(format!(
                    "volume {name} is being deleted"
                ))));
            }
            if let (Some(cur), Some(new)) = (&v.attach, &spec) {
                if cur != new {
                    return Ok(Err(OpError::conflict(format!(
                        "volume {name} is attached to {} ({:?}); detach it first",
                        cur.node, cur.frontend
                    ))));
                }
            }
            if spec.is_some() && v.state == VolumeState::Faulted {
                // A new request clears a permanent fault: the user asked again.
                v.state = VolumeState::Detached;
                v.clear_condition("Faulted");
            }
            v.attach = spec.clone();
            t.put(&vkey(name), &v)?;
            Ok(Ok(v))
        })??;
        self.backoff.lock().remove(name);
        self.kick(name);
        Ok(v)
    }

    pub fn delete_volume(&self, name: &str) -> Result<(), OpError> {
        self.store.write(|t| {
            let Some(mut v) = t.get::<Volume>(&vkey(name))? else {
                return Ok(Err(OpError::not_found("volume", name)));
            };
            v.attach = None;
            v.state = VolumeState::Deleting;
            t.put(&vkey(name), &v)?;
            Ok(Ok(()))
        })??;
        self.event("volume", name, "Deleting", "requested");
        self.backoff.lock().remove(name);
        self.kick(name);
        Ok(())
    }

    /// Grows a detached volume.
    pub fn expand_volume(&self, name: &str, size_bytes: u64) -> Result<Volume, OpError> {
        let v = self.volume(name)?;
        if size_bytes <= v.size_bytes || !size_bytes.is_multiple_of(4096) {
            return Err(OpError::bad(format!(
                "volume {name}: new size must be larger than {} and a multiple of 4096",
                v.size_bytes
            )));
        }
        if v.state != VolumeState::Detached {
            return Err(OpError::conflict(format!(
                "volume {name} is {:?}; expand works on a detached volume",
                v.state
            ))
            .with_advice(format!("corral volume detach {name}")));
        }
        let v = self.store.write(|t| {
            let Some(mut v) = t.get::<Volume>(&vkey(name))? else {
                return Ok(None);
            };
            v.size_bytes = size_bytes;
            v.state = VolumeState::Creating;
            t.put(&vkey(name), &v)?;
            Ok(Some(v))
        })?;
        self.event(
            "volume",
            name,
            "Expanding",
            format!("to {size_bytes} bytes"),
        );
        self.kick(name);
        v.ok_or_else(|| OpError::not_found("volume", name))
    }

    /// Marks the replicas that were in sync last healthy again (after every
    /// replica failed). Only those: a replica that missed writes never comes back this way.
    pub fn salvage(&self, name: &str) -> Result<Vec<String>, OpError> {
        let rs = self.replicas(Some(name))?;
        if rs.iter().any(|r| r.state == ReplicaState::Healthy) {
            return Err(OpError::conflict(format!(
                "volume {name} has a healthy replica; salvage is for when none is left"
            )));
        }
        let best = rs
            .iter()
            .filter(|r| r.state == ReplicaState::OutOfSync || r.state == ReplicaState::Failed)
            .filter(|r| !r.reason.as_deref().unwrap_or("").contains("data is gone"))
            .map(|r| r.last_in_sync_epoch)
            .max()
            .ok_or_else(|| {
                OpError::conflict(format!("volume {name}: no replica with data left"))
            })?;
        let chosen: Vec<String> = rs
            .iter()
            .filter(|r| r.last_in_sync_epoch == best && r.state != ReplicaState::Healthy)
            .map(|r| r.name.clone())
            .collect();
        self.store.write(|t| {
            for c in &chosen {
                if let Some(mut r) = t.get::<Replica>(&rkey(c))? {
                    r.state = ReplicaState::Healthy;
                    r.reason = Some(format!("salvaged: in sync last (epoch {best})"));
                    t.put(&rkey(c), &r)?;
                }
            }
            if let Some(mut v) = t.get::<Volume>(&vkey(name))? {
                if v.state == VolumeState::Faulted {
                    v.state = VolumeState::Detached;
                }
                v.clear_condition("Faulted");
                t.put(&vkey(name), &v)?;
            }
            Ok(())
        })?;
        self.event(
            "volume",
            name,
            "Salvaged",
            format!(
                "replicas in sync last (epoch {best}): {}",
                chosen.join(", ")
            ),
        );
        self.kick(name);
        Ok(chosen)
    }

    fn transition(&self, name: &str, to: VolumeState, why: &str) -> Result<Volume, OpError> {
        let (v, from) = self.store.write(|t| {
            let Some(mut v) = t.get::<Volume>(&vkey(name))? else {
                return Ok((None, None));
            };
            let from = v.state;
            if from != to {
                v.state = to;
                v.state_transitions += 1;
                t.put(&vkey(name), &v)?;
            }
            Ok((Some(v), Some(from)))
        })?;
        let v = v.ok_or_else(|| OpError::not_found("volume", name))?;
        if from != Some(to) {
            self.event(
                "volume",
                name,
                &format!("{to:?}"),
                format!("{:?} → {to:?}: {why}", from.unwrap_or(to)),
            );
        }
        Ok(v)
    }

    fn update_volume(&self, name: &str, f: impl FnOnce(&mut Volume)) -> Result<Volume, OpError> {
        let v = self.store.write(|t| {
            let Some(mut v) = t.get::<Volume>(&vkey(name))? else {
                return Ok(None);
            };
            f(&mut v);
            t.put(&vkey(name), &v)?;
            Ok(Some(v))
        })?;
        v.ok_or_else(|| OpError::not_found("volume", name))
    }

    fn update_replica(&self, name: &str, f: impl FnOnce(&mut Replica)) -> Result<(), OpError> {
        self.store.write(|t| {
            if let Some(mut r) = t.get::<Replica>(&rkey(name))? {
                f(&mut r);
                t.put(&rkey(name), &r)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    fn emit_steps(&self, events: &[StepEvent]) {
        for e in events {
            let reason = match e.outcome.as_str() {
                "adopted" => "Adopted",
                "replaced" => "Replaced",
                "created" => "Created",
                "deleted" => "Deleted",
                "fenced" => "Fenced",
                "collected" => "OrphanCollected",
                "failed" => "StepFailed",
                o => o,
            };
            let msg = if e.detail.is_empty() {
                format!("{} {} {}", e.outcome, e.kind, e.name)
            } else {
                format!("{} {} {} ({})", e.outcome, e.kind, e.name, e.detail)
            };
            self.event(&e.kind, &e.name, reason, msg);
        }
    }

    // -------------------------------------------------------- reconcile ----

    /// The control loop: poll agents, then reconcile every volume that is due.
    pub async fn run(self: Arc<Self>) {
        if let Some(mut rx) = self.kick_rx.lock().take() {
            let me = self.clone();
            tokio::spawn(async move {
                while let Some(name) = rx.recv().await {
                    let me = me.clone();
                    tokio::spawn(async move { me.reconcile(&name).await });
                }
            });
        }
        loop {
            self.poll_nodes().await;
            let vols = self.volumes().unwrap_or_default();
            let mut tasks = Vec::new();
            for v in vols {
                let due = self
                    .backoff
                    .lock()
                    .get(&v.name)
                    .is_none_or(|(_, at)| Instant::now() >= *at);
                if !due {
                    continue;
                }
                let me = self.clone();
                tasks.push(tokio::spawn(async move { me.reconcile(&v.name).await }));
            }
            for t in tasks {
                let _ = t.await;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.tick) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Asks for `name` to be reconciled now, without waiting for the tick.
    fn kick(&self, name: &str) {
        // Without a running loop (no receiver) the tick never comes either.
        let _ = self.kick_tx.send(name.to_string());
    }

    /// The reconcile slot of volume `name`.
    fn slot(&self, name: &str) -> Arc<VolSlot> {
        self.vol_locks
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Reconciles one volume; if asked again meanwhile, once more after.
    pub async fn reconcile(&self, name: &str) {
        let slot = self.slot(name);
        slot.again.store(true, Ordering::SeqCst);
        loop {
            // Held elsewhere: that reconcile sees `again` when it ends.
            let Ok(g) = slot.running.try_lock() else {
                return;
            };
            if !slot.again.swap(false, Ordering::SeqCst) {
                return;
            }
            self.reconcile_once(name).await;
            drop(g);
            if !slot.again.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// One reconcile, with per-volume backoff on transient failures.
    async fn reconcile_once(&self, name: &str) {
        match self.reconcile_inner(name).await {
            Ok(()) => {
                self.backoff.lock().remove(name);
                let _ = self.update_volume(name, |v| {
                    v.clear_condition("Retrying");
                });
            }
            Err(e) if e.class == ErrorClass::Transient => {
                let mut g = self.backoff.lock();
                let (b, at) = g.entry(name.to_string()).or_insert_with(|| {
                    (
                        Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
                        Instant::now(),
                    )
                });
                let d = b.next_delay();
                *at = Instant::now() + d;
                let attempts = b.attempts();
                drop(g);
                warn!(
                    volume = name,
                    attempts,
                    retry_in_ms = d.as_millis() as u64,
                    "reconcile failed: {}",
                    e.message
                );
                let _ = self.update_volume(name, |v| {
                    v.set_condition(
                        "Retrying",
                        format!("{} (attempt {attempts})", e.message),
                        e.advice.clone(),
                    );
                });
            }
            Err(e) => {
                warn!(volume = name, "permanent failure: {}", e.message);
                let advice = e
                    .advice
                    .clone()
                    .unwrap_or_else(|| "fix the cause, then repeat the request".into());
                let _ = self.update_volume(name, |v| {
                    v.set_condition("Faulted", e.message.clone(), Some(advice.clone()));
                });
                let _ = self.transition(name, VolumeState::Faulted, &e.message);
            }
        }
    }

    async fn reconcile_inner(&self, name: &str) -> Result<(), OpError> {
        let v = match self.store.get::<Volume>(&vkey(name))? {
            Some(v) => v,
            None => return Ok(()),
        };
        match v.state {
            VolumeState::Deleting => return self.reconcile_delete(v).await,
            VolumeState::Faulted => return Ok(()),
            VolumeState::Creating => {
                self.ensure_replicas(&v).await?;
                self.transition(name, VolumeState::Detached, "replicas created")?;
                self.update_volume(name, |v| v.robustness = Robustness::Healthy)?;
                return Ok(());
            }
            _ => {}
        }
        match (&v.attach, v.state) {
            (Some(spec), VolumeState::Detached | VolumeState::Attaching) => {
                self.attach(v.clone(), spec.clone()).await
            }
            (Some(_), VolumeState::Attached) => self.check_attached(v).await,
            // Attach asked again while a detach was cut short: the new engine
            // converges from whatever the old one left (its epoch differs, so
            // leftovers are replaced, never adopted); no detach cycle first.
            (Some(spec), VolumeState::Detaching) => self.attach(v.clone(), spec.clone()).await,
            (None, VolumeState::Attached | VolumeState::Attaching | VolumeState::Detaching) => {
                self.detach(v).await
            }
            // A rebuild needs its engine; one left from before a restart ends.
            (_, VolumeState::Detached) => {
                self.abandon_rebuilds(name, "the volume is detached").await
            }
            _ => Ok(()),
        }
    }

    /// Creates replicas that are pending (or grows them after an expand).
    async fn ensure_replicas(&self, v: &Volume) -> Result<(), OpError> {
        let mut ok = 0;
        let mut last_err = None;
        for r in self.replicas(Some(&v.name))? {
            // A rebuilding replica's allow-list belongs to its rebuild.
            if matches!(
                r.state,
                ReplicaState::Failed | ReplicaState::Deleting | ReplicaState::Rebuilding
            ) {
                continue;
            }
            let node = self.node(&r.node)?;
            match self.expose_replica(&node, &r, v, None).await {
                Ok(_) => {
                    ok += 1;
                    if r.state == ReplicaState::Pending {
                        self.update_replica(&r.name, |r| r.state = ReplicaState::Healthy)?;
                    }
                }
                Err(e) if e.class == ErrorClass::Permanent => {
                    self.mark_failed(&r.name, &e.message);
                    last_err = Some(e);
                }
                Err(e) => last_err = Some(e),
            }
        }
        if ok == 0 {
            return Err(last_err
                .unwrap_or_else(|| OpError::transient(format!("volume {}: no replica", v.name))));
        }
        Ok(())
    }

    /// Asks `node`'s agent to expose replica `r` of `v` (lvol, subsystem,
    /// listener, allow-list of `allowed_host`); emits the steps it did not
    /// merely adopt and returns the agent's answer.
    async fn expose_replica(
        &self,
        node: &Node,
        r: &Replica,
        v: &Volume,
        allowed_host: Option<String>,
    ) -> Result<serde_json::Value, OpError> {
        let spec = ReplicaSpec {
            name: r.name.clone(),
            volume: v.name.clone(),
            disk: r.disk.clone(),
            size_bytes: v.size_bytes,
            allowed_host,
        };
        let resp: serde_json::Value = self
            .agent(
                node,
                reqwest::Method::PUT,
                &format!("/v1/replicas/{}", r.name),
                Some(&spec),
            )
            .await?;
        if let Ok(ev) = serde_json::from_value::<Vec<StepEvent>>(resp["events"].clone()) {
            self.emit_steps(
                &ev.into_iter()
                    .filter(|e| e.outcome != "adopted")
                    .collect::<Vec<_>>(),
            );
        }
        Ok(resp)
    }

    async fn attach(&self, v: Volume, spec: AttachSpec) -> Result<(), OpError> {
        let name = v.name.clone();
        let mut v = v;
        if v.state != VolumeState::Attaching {
            // A new engine incarnation: every resource it creates carries the new epoch.
            v = self.update_volume(&name, |v| {
                v.epoch += 1;
                v.engine_node = Some(spec.node.clone());
            })?;
            self.transition(
                &name,
                VolumeState::Attaching,
                &format!(
                    "attach to {} ({:?}), engine epoch {}",
                    spec.node, spec.frontend, v.epoch
                ),
            )?;
        }
        *self.attach_attempts.lock().entry(name.clone()).or_insert(0) += 1;
        v = self.update_volume(&name, |v| v.attach_attempts += 1)?;
        let node = self.node(&spec.node)?;
        if !node.ready {
            return Err(OpError::transient(format!(
                "node {} is not ready: {}",
                node.name,
                node.reason.clone().unwrap_or_default()
            )));
        }
        // Tell the engine node what it runs before creating it, so its orphan
        // detector never mistakes this epoch's resources for leftovers.
        self.push_desired(&node).await?;
        let hostnqn = naming::engine_hostnqn(&name, v.epoch);
        let replicas = self.replicas(Some(&name))?;
        let healthy: Vec<Replica> = replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Healthy)
            .cloned()
            .collect();
        if healthy.is_empty() {
            return Err(OpError::new(409, ErrorClass::Permanent, format!("volume {name}: no healthy replica left")).with_advice(format!(
                "if the replicas that were in sync last still hold data: corral volume salvage {name}"
            )));
        }
        // 1. Each healthy replica admits this epoch's engine only (fencing
        // older ones); the replicas' nodes are asked all at once.
        let nodes = healthy
            .iter()
            .map(|r| self.node(&r.node))
            .collect::<Result<Vec<_>, _>>()?;
        let exposed = futures_util::future::join_all(
            healthy
                .iter()
                .zip(&nodes)
                .map(|(r, rn)| self.expose_replica(rn, r, &v, Some(hostnqn.clone()))),
        )
        .await;
        let mut usable = Vec::new();
        for ((r, rn), res) in healthy.iter().zip(&nodes).zip(exposed) {
            match res {
                Ok(resp) => {
                    usable.push(EngineReplica {
                        name: r.name.clone(),
                        traddr: rn.address.clone(),
                        trsvcid: resp["status"]["trsvcid"]
                            .as_str()
                            .unwrap_or("4420")
                            .to_string(),
                    });
                }
                Err(e) if e.class == ErrorClass::Permanent => self.mark_failed(&r.name, &e.message),
                Err(e) => {
                    warn!(volume = %name, replica = %r.name, "replica not reachable for this attach: {}", e.message)
                }
            }
        }
        if usable.is_empty() {
            return Err(OpError::transient(format!(
                "volume {name}: no healthy replica is reachable"
            )));
        }
        // 2. Engine without frontend: controllers and raid.
        let mut es = EngineSpec {
            volume: name.clone(),
            epoch: v.epoch,
            replicas: usable.clone(),
            frontend: None,
            knobs: self.cfg.knobs,
        };
        let st: EngineStatus = self
            .agent(
                &node,
                reqwest::Method::PUT,
                &format!("/v1/engines/{name}"),
                Some(&es),
            )
            .await?;
        self.emit_steps(&st.events);
        // 3. I5: every healthy replica that is not serving in this engine is out
        // of sync before the frontend lets anyone write.
        let online: Vec<String> = st
            .members
            .iter()
            .filter(|m| m.state == "online")
            .map(|m| m.replica.clone())
            .collect();
        for r in &healthy {
            if !online.contains(&r.name) {
                let why = st
                    .members
                    .iter()
                    .find(|m| m.replica == r.name)
                    .and_then(|m| m.reason.clone())
                    .unwrap_or_else(|| "not reachable".into());
                self.mark_out_of_sync(
                    &r.name,
                    &format!("left out of the engine at epoch {}: {why}", v.epoch),
                );
            }
        }
        // 4. Frontend.
        es.frontend = Some(spec.frontend);
        es.replicas.retain(|r| online.contains(&r.name));
        let st: EngineStatus = self
            .agent(
                &node,
                reqwest::Method::PUT,
                &format!("/v1/engines/{name}"),
                Some(&es),
            )
            .await?;
        self.engine_built
            .lock()
            .insert(name.clone(), Instant::now());
        // Phase 2 adopts what phase 1 just made: only report what changed.
        self.emit_steps(
            &st.events
                .iter()
                .filter(|e| e.outcome != "adopted")
                .cloned()
                .collect::<Vec<_>>(),
        );
        for r in &online {
            self.update_replica(r, |r| {
                r.last_in_sync_epoch = v.epoch;
            })?;
        }
        let robust = if online.len() as u32 >= v.replica_count {
            Robustness::Healthy
        } else {
            Robustness::Degraded
        };
        self.update_volume(&name, |v| {
            v.endpoint = st.endpoint.clone();
            v.robustness = robust;
            v.clear_condition("Faulted");
        })?;
        self.transition(
            &name,
            VolumeState::Attached,
            &format!("endpoint {}", st.endpoint.clone().unwrap_or_default()),
        )?;
        Ok(())
    }

    async fn check_attached(&self, v: Volume) -> Result<(), OpError> {
        let Some(node) = v.engine_node.clone() else {
            return Ok(());
        };
        let Some((st, asked)) = self.cached_status_asked(&node) else {
            self.update_volume(&v.name, |v| {
                v.robustness = Robustness::Unknown;
                v.set_condition(
                    "EngineNodeUnreachable",
                    format!("node {node} does not answer"),
                    None,
                );
            })?;
            return Ok(());
        };
        if self
            .engine_built
            .lock()
            .get(&v.name)
            .is_some_and(|built| asked < *built)
        {
            // Asked for before the engine was complete: says nothing of it.
            return Ok(());
        }
        let engine = st
            .engines
            .iter()
            .find(|e| e.volume == v.name && e.epoch == v.epoch);
        let serving = engine
            .is_some_and(|e| e.frontend.is_some() && e.members.iter().any(|m| m.state == "online"));
        if !serving {
            // The dataplane lost the engine (it restarted, or someone removed it).
            self.event(
                "volume",
                &v.name,
                "EngineLost",
                format!(
                    "engine epoch {} is gone from node {node}; re-attaching",
                    v.epoch
                ),
            );
            self.transition(&v.name, VolumeState::Detached, "engine lost")?;
            return Ok(());
        }
        let healthy_in = engine
            .map(|e| e.members.iter().filter(|m| m.state == "online").count())
            .unwrap_or(0);
        let robust = if healthy_in as u32 >= v.replica_count {
            Robustness::Healthy
        } else {
            Robustness::Degraded
        };
        let v = self.update_volume(&v.name, |v| {
            v.robustness = robust;
            v.clear_condition("EngineNodeUnreachable");
        })?;
        match engine {
            Some(e) => self.rebuild_step(&v, e, asked).await,
            None => Ok(()),
        }
    }

    async fn detach(&self, v: Volume) -> Result<(), OpError> {
        let name = v.name.clone();
        self.transition(&name, VolumeState::Detaching, "detach requested")?;
        if let Some(n) = &v.engine_node {
            let node = self.node(n)?;
            let r: serde_json::Value = self
                .agent(
                    &node,
                    reqwest::Method::DELETE,
                    &format!("/v1/engines/{name}"),
                    None::<&()>,
                )
                .await?;
            if let Ok(ev) = serde_json::from_value::<Vec<StepEvent>>(r["events"].clone()) {
                self.emit_steps(&ev);
            }
        }
        // Nobody may connect to the replicas until the next engine (all
        // replicas' nodes asked at once).
        let closing = self
            .replicas(Some(&name))?
            .into_iter()
            .filter(|r| r.state == ReplicaState::Healthy || r.state == ReplicaState::OutOfSync)
            .filter_map(|r| Some((self.node(&r.node).ok()?, r)))
            .map(|(rn, r)| {
                let rs = ReplicaSpec {
                    name: r.name.clone(),
                    volume: name.clone(),
                    disk: r.disk.clone(),
                    size_bytes: v.size_bytes,
                    allowed_host: None,
                };
                async move {
                    let path = format!("/v1/replicas/{}", r.name);
                    let res = self
                        .agent::<serde_json::Value>(&rn, reqwest::Method::PUT, &path, Some(&rs))
                        .await;
                    if let Err(e) = res {
                        warn!(replica = %r.name, "could not close the replica's allow-list: {}", e.message);
                    }
                }
            });
        futures_util::future::join_all(closing).await;
        self.update_volume(&name, |v| {
            v.endpoint = None;
            v.engine_node = None;
        })?;
        self.engine_built.lock().remove(&name);
        self.abandon_rebuilds(&name, "the volume was detached")
            .await?;
        self.transition(&name, VolumeState::Detached, "engine deleted")?;
        Ok(())
    }

    async fn reconcile_delete(&self, v: Volume) -> Result<(), OpError> {
        let name = v.name.clone();
        if let Some(n) = &v.engine_node {
            let node = self.node(n)?;
            let _: serde_json::Value = self
                .agent(
                    &node,
                    reqwest::Method::DELETE,
                    &format!("/v1/engines/{name}"),
                    None::<&()>,
                )
                .await?;
        }
        for r in self.replicas(Some(&name))? {
            if let Ok(node) = self.node(&r.node) {
                {
                    let res: Result<serde_json::Value, OpError> = self
                        .agent(
                            &node,
                            reqwest::Method::DELETE,
                            &format!("/v1/replicas/{}?disk={}", r.name, r.disk),
                            None::<&()>,
                        )
                        .await;
                    if let Err(e) = res {
                        // Its node is away: the agent collects the leftovers as orphans later.
                        warn!(replica = %r.name, "replica not deleted now ({}); left for orphan collection", e.message);
                    }
                }
            }
        }
        self.store.write(|t| {
            for r in self.replicas(Some(&name)).unwrap_or_default() {
                t.delete(&rkey(&r.name))?;
                if let Some(mut n) = t.get::<Node>(&nkey(&r.node))? {
                    if let Some(d) = n.disks.iter_mut().find(|d| d.name == r.disk) {
                        d.scheduled_bytes = d.scheduled_bytes.saturating_sub(v.size_bytes);
                    }
                    t.put(&nkey(&r.node), &n)?;
                }
            }
            for s in self
                .store
                .list::<Snapshot>(&format!("snapshot/{name}/"))
                .unwrap_or_default()
            {
                t.delete(&skey(&name, &s.name))?;
            }
            t.delete(&vkey(&name))
        })?;
        self.event("volume", &name, "Deleted", "volume and replicas removed");
        Ok(())
    }

    /// Deletes replica `name` on a user's request (its data too). An attached
    /// volume's engine lets it go first; a volume left with fewer healthy
    /// replicas than it wants gets a rebuilt one. The last healthy replica of
    /// a volume is never deleted this way; a rebuilding one ends its rebuild.
    pub async fn delete_replica(&self, name: &str) -> Result<(), OpError> {
        let r = self
            .store
            .get::<Replica>(&rkey(name))?
            .ok_or_else(|| OpError::not_found("replica", name))?;
        let slot = self.slot(&r.volume);
        let guard = slot.running.lock().await;
        let res = self.delete_replica_locked(name).await;
        drop(guard);
        self.kick(&r.volume);
        res
    }

    async fn delete_replica_locked(&self, name: &str) -> Result<(), OpError> {
        let r = self
            .store
            .get::<Replica>(&rkey(name))?
            .ok_or_else(|| OpError::not_found("replica", name))?;
        let v = self.volume(&r.volume)?;
        if r.state == ReplicaState::Rebuilding {
            return self.abandon(&r, "deleted on request").await;
        }
        let healthy = self
            .replicas(Some(&v.name))?
            .into_iter()
            .filter(|x| x.state == ReplicaState::Healthy)
            .count();
        if r.state == ReplicaState::Healthy && healthy <= 1 {
            return Err(OpError::conflict(format!(
                "replica {name} is the last healthy replica of volume {}",
                v.name
            ))
            .with_advice(format!(
                "delete the volume instead (corral volume delete {})",
                v.name
            )));
        }
        if v.engine_node.is_some() {
            self.leave_engine(&v, name).await;
        }
        self.remove_replica(&r, v.size_bytes).await?;
        self.event(
            "replica",
            name,
            "Deleted",
            format!("on request ({:?}, node {})", r.state, r.node),
        );
        Ok(())
    }

    // -------------------------------------------------------- snapshots ----

    /// Takes snapshot `snap` of every healthy replica of `volume`, all at the
    /// same point of the volume's write stream: an attached volume's engine
    /// is quiesced (new writes wait, writes in flight drain) while the
    /// replicas snapshot, so no write is in one replica's snapshot and not in
    /// another's. Anything short of that (a replica that fails, an engine that
    /// cannot be quiesced, a quiesce whose lease ran out) takes every copy
    /// back and fails: a snapshot exists on all healthy replicas, consistent,
    /// or not at all.
    pub async fn create_snapshot(&self, volume: &str, snap: &str) -> Result<Snapshot, OpError> {
        naming::valid_volume_name(snap)
            .map_err(|e| OpError::bad(format!("snapshot name {snap}: {e}")))?;
        self.volume(volume)?;
        // No attach or detach of this volume while its engine is quiesced.
        let slot = self.slot(volume);
        let guard = slot.running.lock().await;
        let r = self.create_snapshot_locked(volume, snap).await;
        drop(guard);
        if slot.again.load(Ordering::SeqCst) {
            self.kick(volume);
        }
        r
    }

    /// Snapshots are neither taken nor deleted while a replica of the volume
    /// is rebuilt: its copy follows the chain as it was when it started.
    fn refuse_while_rebuilding(&self, volume: &str, what: &str) -> Result<(), OpError> {
        if let Some(r) = self
            .replicas(Some(volume))?
            .into_iter()
            .find(|r| r.state == ReplicaState::Rebuilding)
        {
            return Err(OpError::new(
                409,
                ErrorClass::Transient,
                format!(
                    "volume {volume}: cannot {what} while replica {} is rebuilding ({})",
                    r.name,
                    r.reason.unwrap_or_default()
                ),
            )
            .with_advice(format!(
                "wait until `corral volume show {volume}` shows every replica healthy, then try again"
            )));
        }
        Ok(())
    }

    async fn create_snapshot_locked(&self, volume: &str, snap: &str) -> Result<Snapshot, OpError> {
        let v = self.volume(volume)?;
        self.refuse_while_rebuilding(volume, "take a snapshot")?;
        if self.store.get::<Snapshot>(&skey(volume, snap))?.is_some() {
            return Err(OpError::conflict(format!(
                "snapshot {snap} of {volume} already exists"
            )));
        }
        let engine_node = match v.state {
            VolumeState::Attached => v.engine_node.clone(),
            VolumeState::Detached | VolumeState::Faulted => None,
            st => {
                return Err(OpError::transient(format!(
                    "volume {volume} is {st:?}; a snapshot needs it attached or detached"
                ))
                .with_advice("try again once `corral volume show` says attached or detached"))
            }
        };
        let rs: Vec<(Replica, Node)> = self
            .replicas(Some(volume))?
            .into_iter()
            .filter(|r| r.state == ReplicaState::Healthy)
            .map(|r| Ok((self.node(&r.node)?, r)))
            .collect::<Result<Vec<_>, OpError>>()?
            .into_iter()
            .map(|(n, r)| (r, n))
            .collect();
        if rs.is_empty() {
            return Err(OpError::conflict(format!(
                "volume {volume} has no healthy replica to snapshot"
            )));
        }
        // A snapshot of this name that a replica already holds has no record
        // here: a leftover of an attempt that did not finish, taken at another
        // moment. It is removed, never adopted.
        self.each_replica(&rs, |r| self.delete_replica_snapshot(r.0, r.1, snap))
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let quiesced = match &engine_node {
            Some(node) => {
                let n = self.node(node)?;
                let q: QuiesceResp = self
                    .agent(
                        &n,
                        reqwest::Method::POST,
                        &format!("/v1/engines/{volume}/quiesce"),
                        Some(&QuiesceReq {
                            drain_timeout_ms: SNAPSHOT_DRAIN.as_millis() as u64,
                            lease_ms: SNAPSHOT_LEASE.as_millis() as u64,
                        }),
                    )
                    .await
                    .map_err(|e| OpError {
                        message: format!("snapshot {volume}/{snap}: {}", e.message),
                        ..e
                    })?;
                Some((n, q.token, Instant::now()))
            }
            None => None,
        };
        let taken = tokio::time::timeout(
            SNAPSHOT_WINDOW,
            self.each_replica(&rs, |r| async move {
                let _: serde_json::Value = self
                    .agent(
                        r.1,
                        reqwest::Method::POST,
                        &format!("/v1/replicas/{}/snapshots", r.0.name),
                        Some(&serde_json::json!({"disk": r.0.disk, "snapshot": snap})),
                    )
                    .await?;
                Ok(())
            }),
        )
        .await;
        let mut failure = match &taken {
            Err(_) => Some(format!(
                "the replicas did not all answer within {} ms",
                SNAPSHOT_WINDOW.as_millis()
            )),
            Ok(res) => res.iter().zip(&rs).find_map(|(x, r)| {
                x.as_ref()
                    .err()
                    .map(|e| format!("replica {}: {}", r.0.name, e.message))
            }),
        };
        let mut held_ms = 0;
        if let Some((n, token, t0)) = &quiesced {
            let resumed: Result<serde_json::Value, OpError> = self
                .agent(
                    n,
                    reqwest::Method::POST,
                    &format!("/v1/engines/{volume}/resume"),
                    Some(&QuiesceResp { token: *token }),
                )
                .await;
            held_ms = t0.elapsed().as_millis() as u64;
            if let Err(e) = resumed {
                // Its lease may have let writes through before every replica
                // had snapshotted: the copies may differ.
                failure.get_or_insert(format!(
                    "the engine's quiesce could not be ended in order ({})",
                    e.message
                ));
            }
        }
        if let Some(why) = failure {
            for r in self
                .each_replica(&rs, |r| self.delete_replica_snapshot(r.0, r.1, snap))
                .await
            {
                if let Err(e) = r {
                    warn!(volume, snap, "snapshot roll-back: {}", e.message);
                }
            }
            self.event(
                "snapshot",
                &format!("{volume}/{snap}"),
                "Failed",
                format!("not taken ({why}); copies removed"),
            );
            return Err(
                OpError::transient(format!("snapshot {volume}/{snap} not taken: {why}"))
                    .with_advice(format!("corral snapshot create {volume} {snap} (again)")),
            );
        }
        let s = Snapshot {
            volume: volume.into(),
            name: snap.into(),
            created: now_secs(),
            size_bytes: v.size_bytes,
        };
        self.store.put(&skey(volume, snap), &s)?;
        let how = match &quiesced {
            Some(_) => format!("I/O held for {held_ms} ms"),
            None => "volume detached".into(),
        };
        self.event(
            "snapshot",
            &format!("{volume}/{snap}"),
            "Created",
            format!("on {} replicas ({how})", rs.len()),
        );
        Ok(s)
    }

    /// Runs `f` on every (replica, node) at once; results in their order.
    async fn each_replica<'a, F, Fut, T>(
        &self,
        rs: &'a [(Replica, Node)],
        f: F,
    ) -> Vec<Result<T, OpError>>
    where
        F: Fn((&'a Replica, &'a Node)) -> Fut,
        Fut: std::future::Future<Output = Result<T, OpError>>,
    {
        futures_util::future::join_all(rs.iter().map(|(r, n)| f((r, n)))).await
    }

    /// Deletes snapshot `snap` of replica `r` (done if it does not exist).
    async fn delete_replica_snapshot(
        &self,
        r: &Replica,
        n: &Node,
        snap: &str,
    ) -> Result<(), OpError> {
        let _: serde_json::Value = self
            .agent(
                n,
                reqwest::Method::DELETE,
                &format!("/v1/replicas/{}/snapshots/{snap}?disk={}", r.name, r.disk),
                None::<&()>,
            )
            .await?;
        Ok(())
    }

    pub fn snapshots(&self, volume: &str) -> Result<Vec<Snapshot>, OpError> {
        self.volume(volume)?;
        Ok(self.store.list(&format!("snapshot/{volume}/"))?)
    }

    /// Deletes snapshot `snap` on every replica (each merges it into its
    /// neighbour), then its record.
    pub async fn delete_snapshot(&self, volume: &str, snap: &str) -> Result<(), OpError> {
        // Not while a rebuild starts: it would copy the chain as it was.
        let slot = self.slot(volume);
        let guard = slot.running.lock().await;
        let r = self.delete_snapshot_locked(volume, snap).await;
        drop(guard);
        if slot.again.load(Ordering::SeqCst) {
            self.kick(volume);
        }
        r
    }

    async fn delete_snapshot_locked(&self, volume: &str, snap: &str) -> Result<(), OpError> {
        if self.store.get::<Snapshot>(&skey(volume, snap))?.is_none() {
            return Err(OpError::not_found("snapshot", &format!("{volume}/{snap}")));
        }
        self.refuse_while_rebuilding(volume, "delete a snapshot")?;
        for r in self.replicas(Some(volume))? {
            let node = self.node(&r.node)?;
            let _: serde_json::Value = self
                .agent(
                    &node,
                    reqwest::Method::DELETE,
                    &format!("/v1/replicas/{}/snapshots/{snap}?disk={}", r.name, r.disk),
                    None::<&()>,
                )
                .await?;
        }
        self.store.write(|t| t.delete(&skey(volume, snap)))?;
        self.event("snapshot", &format!("{volume}/{snap}"), "Deleted", "");
        Ok(())
    }

    pub async fn revert_snapshot(&self, volume: &str, snap: &str) -> Result<(), OpError> {
        let v = self.volume(volume)?;
        if v.state != VolumeState::Detached {
            return Err(OpError::conflict(format!(
                "volume {volume} is {:?}; revert works on a detached volume",
                v.state
            ))
            .with_advice(format!("corral volume detach {volume}")));
        }
        if self.store.get::<Snapshot>(&skey(volume, snap))?.is_none() {
            return Err(OpError::not_found("snapshot", &format!("{volume}/{snap}")));
        }
        for r in self
            .replicas(Some(volume))?
            .iter()
            .filter(|r| r.state == ReplicaState::Healthy)
        {
            let node = self.node(&r.node)?;
            let _: serde_json::Value = self
                .agent(
                    &node,
                    reqwest::Method::POST,
                    &format!("/v1/replicas/{}/revert", r.name),
                    Some(&serde_json::json!({"disk": r.disk, "snapshot": snap})),
                )
                .await?;
        }
        self.event(
            "snapshot",
            &format!("{volume}/{snap}"),
            "Reverted",
            format!("volume {volume} reverted"),
        );
        Ok(())
    }

    // ---------------------------------------------------------- orphans ----

    /// Orphans reported by every agent, with their node.
    pub fn orphans(&self) -> Vec<(String, Orphan)> {
        let g = self.status.lock();
        let mut out = Vec::new();
        for (n, (st, _)) in g.iter() {
            for o in st.orphans.clone().unwrap_or_default() {
                out.push((n.clone(), o));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1.kind, &a.1.name).cmp(&(&b.0, &b.1.kind, &b.1.name)));
        out
    }

    /// Every controller on every node, with whether it is an orphan.
    pub fn controllers(&self) -> Vec<(String, ControllerInfo, bool)> {
        let g = self.status.lock();
        let mut out = Vec::new();
        for (n, (st, _)) in g.iter() {
            let orphans = st.orphans.clone().unwrap_or_default();
            for c in &st.controllers {
                let o = orphans
                    .iter()
                    .any(|o| o.kind == "controller" && o.name == c.name);
                out.push((n.clone(), c.clone(), o));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1.name).cmp(&(&b.0, &b.1.name)));
        out
    }

    /// Asks every agent to collect its orphans now.
    pub async fn collect_orphans(&self, force: bool) -> Result<usize, OpError> {
        let mut n = 0;
        for node in self.nodes()? {
            let r: serde_json::Value = self
                .agent(
                    &node,
                    reqwest::Method::POST,
                    &format!("/v1/orphans/collect?force={force}"),
                    None::<&()>,
                )
                .await?;
            // The events themselves arrive with the agent's next status (once).
            if let Some(ev) = r["events"].as_array() {
                n += ev.len();
            }
        }
        Ok(n)
    }

    /// Prometheus text exposition.
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "# HELP corral_volume_attach_attempts_total Attach attempts per volume since the manager started.");
        let _ = writeln!(s, "# TYPE corral_volume_attach_attempts_total counter");
        for (v, n) in self.attach_attempts.lock().iter() {
            let _ = writeln!(
                s,
                "corral_volume_attach_attempts_total{{volume=\"{v}\"}} {n}"
            );
        }
        let vols = self.volumes().unwrap_or_default();
        let _ = writeln!(
            s,
            "# HELP corral_volume_state_transitions_total State transitions per volume."
        );
        let _ = writeln!(s, "# TYPE corral_volume_state_transitions_total counter");
        for v in &vols {
            let _ = writeln!(
                s,
                "corral_volume_state_transitions_total{{volume=\"{}\"}} {}",
                v.name, v.state_transitions
            );
        }
        let _ = writeln!(s, "# HELP corral_volumes Volumes by state.");
        let _ = writeln!(s, "# TYPE corral_volumes gauge");
        let mut by: HashMap<String, u64> = HashMap::new();
        for v in &vols {
            *by.entry(format!("{:?}", v.state).to_lowercase())
                .or_default() += 1;
        }
        for (k, n) in by {
            let _ = writeln!(s, "corral_volumes{{state=\"{k}\"}} {n}");
        }
        let _ = writeln!(s, "# HELP corral_replicas Replicas by state.");
        let _ = writeln!(s, "# TYPE corral_replicas gauge");
        let mut by: HashMap<String, u64> = HashMap::new();
        for r in self.replicas(None).unwrap_or_default() {
            *by.entry(format!("{:?}", r.state).to_lowercase())
                .or_default() += 1;
        }
        for (k, n) in by {
            let _ = writeln!(s, "corral_replicas{{state=\"{k}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP corral_orphan_resources Resources no live object owns, by kind."
        );
        let _ = writeln!(s, "# TYPE corral_orphan_resources gauge");
        let mut by: HashMap<String, u64> = HashMap::new();
        for k in ["controller", "raid", "nbd_export", "subsystem", "lvol"] {
            by.insert(k.into(), 0);
        }
        for (_, o) in self.orphans() {
            *by.entry(o.kind).or_default() += 1;
        }
        let mut by: Vec<_> = by.into_iter().collect();
        by.sort();
        for (k, n) in by {
            let _ = writeln!(s, "corral_orphan_resources{{kind=\"{k}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP corral_replica_rebuilds_total Replica rebuilds ended since the manager started, by result."
        );
        let _ = writeln!(s, "# TYPE corral_replica_rebuilds_total counter");
        let (done, failed) = *self.rebuilds_ended.lock();
        let _ = writeln!(s, "corral_replica_rebuilds_total{{result=\"done\"}} {done}");
        let _ = writeln!(
            s,
            "corral_replica_rebuilds_total{{result=\"failed\"}} {failed}"
        );
        let _ = writeln!(
            s,
            "# HELP corral_replica_rebuild_percent Progress of the current phase of each running rebuild."
        );
        let _ = writeln!(s, "# TYPE corral_replica_rebuild_percent gauge");
        for r in self.replicas(None).unwrap_or_default() {
            if let Some(b) = &r.rebuild {
                let phase = match b.phase {
                    RebuildPhase::Preparing => "preparing",
                    RebuildPhase::CopySnapshot { .. } => "copy_snapshot",
                    RebuildPhase::Join => "join",
                    RebuildPhase::SyncHead => "sync_head",
                };
                let _ = writeln!(
                    s,
                    "corral_replica_rebuild_percent{{volume=\"{}\",replica=\"{}\",phase=\"{phase}\"}} {}",
                    r.volume, r.name, b.percent
                );
            }
        }
        let nodes = self.nodes().unwrap_or_default();
        let _ = writeln!(s, "# HELP corral_nodes_ready Nodes whose agent answers.");
        let _ = writeln!(s, "# TYPE corral_nodes_ready gauge");
        let _ = writeln!(
            s,
            "corral_nodes_ready {}",
            nodes.iter().filter(|n| n.ready).count()
        );
        s
    }
}
