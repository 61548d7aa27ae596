//! The agent (instance manager): replicas and engines built from dataplane
//! resources, convergently (I1); owned resources told from orphans (I2, I3); no
//! state of its own beyond what the dataplane holds (I6).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::api::*;
use crate::converge::{self, Observed, WantCtrlr};
use crate::dp::{DpClient, DpError};
use crate::model::Frontend;
use crate::naming;
use crate::retry::ErrorClass;

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    /// Address replica targets and frontends listen on.
    pub address: String,
    pub rpc_socket: PathBuf,
    /// HTTP API address.
    pub listen: SocketAddr,
    /// (disk name, directory).
    pub disks: Vec<(String, PathBuf)>,
    /// Port of the replicas' NVMe/TCP listener.
    pub nvmf_port: u16,
    /// Port of the NBD server for frontends.
    pub nbd_port: u16,
    /// Port of the NVMe/TCP frontend listener.
    pub frontend_port: u16,
    /// Orphans older than this are collected (0 = report only).
    pub orphan_grace: Duration,
}

/// Why a disk is not usable: its data is gone (permanent), or a dataplane
/// call failed (classified by its error).
#[derive(Debug)]
enum DiskProblem {
    Gone(String),
    Dp(DpError),
}

/// A step's failure: what failed and whether trying again can help.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}: {source}")]
pub struct StepError {
    pub what: String,
    pub source: DpError,
}

impl StepError {
    fn new(what: impl Into<String>, source: DpError) -> Self {
        StepError {
            what: what.into(),
            source,
        }
    }
    pub fn class(&self) -> ErrorClass {
        self.source.class()
    }
    pub fn to_api(&self) -> ApiError {
        ApiError {
            message: self.to_string(),
            class: self.class(),
        }
    }
}

type StepResult<T> = Result<T, StepError>;

/// The agent's state: the dataplane client and what it was told to run.
pub struct Agent {
    pub cfg: AgentConfig,
    dp: DpClient,
    desired: Mutex<Option<Desired>>,
    seen: Mutex<HashMap<(String, String), Instant>>,
    fault: Mutex<Option<String>>,
    /// Serialises operations on one volume's engine or one replica.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Identifies this agent process.
    instance: String,
    /// What the agent did on its own, for the manager to turn into events.
    own_events: Mutex<std::collections::VecDeque<(u64, StepEvent)>>,
    event_seq: std::sync::atomic::AtomicU64,
}

/// Events the agent keeps for the manager to pick up.
const OWN_EVENTS_KEPT: usize = 200;

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.cfg.node)
            .finish()
    }
}

/// The lvstore's metadata file in its directory (see crates/lvol/DESIGN.md).
const LVSTORE_META: &str = "lvstore.meta";

fn absent_code(e: &DpError) -> bool {
    matches!(e.code(), Some(-19) | Some(-2))
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Arc<Self> {
        let fault = std::env::var("CORRAL_FAULT").ok().filter(|s| !s.is_empty());
        Arc::new(Agent {
            dp: DpClient::new(cfg.rpc_socket.clone()),
            cfg,
            desired: Mutex::new(None),
            seen: Mutex::new(HashMap::new()),
            fault: Mutex::new(fault),
            locks: Mutex::new(HashMap::new()),
            instance: uuid::Uuid::new_v4().to_string(),
            own_events: Mutex::new(std::collections::VecDeque::new()),
            event_seq: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn record_own(&self, e: StepEvent) {
        let seq = self
            .event_seq
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let mut q = self.own_events.lock();
        q.push_back((seq, e));
        while q.len() > OWN_EVENTS_KEPT {
            q.pop_front();
        }
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    /// Fault injection: dies like `kill -9` at the named point when asked to
    /// (env `CORRAL_FAULT=<point>` or `POST /v1/debug/fault`).
    pub fn fault_point(&self, point: &str) {
        let hit = self.fault.lock().as_deref() == Some(point);
        if hit {
            warn!(point, "fault injection: aborting the agent here");
            std::process::abort();
        }
    }

    pub fn set_fault(&self, point: Option<String>) {
        *self.fault.lock() = point;
    }

    pub async fn call(&self, method: &str, params: Value) -> Result<Value, DpError> {
        self.dp.call(method, params).await
    }

    // ------------------------------------------------------------ disks ----

    /// Makes every configured disk an open lvstore (create or load). A disk
    /// whose lvstore is loaded but whose metadata file vanished (the directory
    /// was removed) is reported not ready: its data is gone, and it is never
    /// silently re-created.
    pub async fn ensure_disks(&self) -> Vec<DiskStatus> {
        let mut out = Vec::new();
        for (name, path) in &self.cfg.disks {
            let reason = match self.ensure_disk(name, path).await {
                Ok(()) => None,
                Err(DiskProblem::Gone(why)) => Some(why),
                Err(DiskProblem::Dp(e)) => {
                    warn!(disk = %name, "disk not usable: {e}");
                    Some(e.to_string())
                }
            };
            let (total, free) = fs_space(path).unwrap_or((0, 0));
            out.push(DiskStatus {
                name: name.clone(),
                path: path.display().to_string(),
                total_bytes: total,
                free_bytes: free,
                ready: reason.is_none(),
                reason,
            });
        }
        out
    }

    /// Makes disk `name` (directory `path`) an open lvstore.
    async fn ensure_disk(&self, name: &str, path: &std::path::Path) -> Result<(), DiskProblem> {
        // Asked per disk: one store that cannot be read (its directory was
        // removed, so statvfs fails) must neither hide the others nor be
        // taken for "not loaded", which would re-create it.
        let loaded = match self
            .call("bdev_lvol_get_lvstores", json!({ "lvs_name": name }))
            .await
        {
            Ok(_) => true,
            Err(e) if e.code() == Some(-libc::ENODEV) => false,
            // The dataplane itself does not answer: nothing is known of the disk.
            Err(e @ DpError::Transport { .. }) => return Err(DiskProblem::Dp(e)),
            Err(e) if path.join(LVSTORE_META).exists() => return Err(DiskProblem::Dp(e)),
            Err(_) => true,
        };
        if loaded {
            if !path.join(LVSTORE_META).exists() {
                return Err(DiskProblem::Gone(format!(
                    "{} is gone from {}: the disk's data is gone",
                    LVSTORE_META,
                    path.display()
                )));
            }
            return Ok(());
        }
        let _ = std::fs::create_dir_all(path);
        match self
            .call("corral_lvol_load_lvstore", json!({"base_dir": path}))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if absent_code(&e) => self
                .call(
                    "bdev_lvol_create_lvstore",
                    json!({"lvs_name": name, "base_dir": path}),
                )
                .await
                .map(|_| ())
                .map_err(DiskProblem::Dp),
            Err(e) => Err(DiskProblem::Dp(e)),
        }
    }

    // --------------------------------------------------------- replicas ----

    /// Makes replica `spec` exist and be exposed only to `spec.allowed_host`.
    pub async fn ensure_replica(
        &self,
        spec: &ReplicaSpec,
    ) -> StepResult<(ReplicaStatus, Vec<StepEvent>)> {
        let lock = self.lock_for(&spec.name);
        let _g = lock.lock().await;
        let mut ev = Vec::new();
        let disk_path = self
            .cfg
            .disks
            .iter()
            .find(|(n, _)| n == &spec.disk)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| {
                StepError::new(
                    format!("replica {}", spec.name),
                    DpError::Rpc {
                        method: "ensure_replica".into(),
                        code: -22,
                        message: format!(
                            "disk {} is not configured on node {}",
                            spec.disk, self.cfg.node
                        ),
                    },
                )
            })?;
        // lvstore: a disk whose data is gone fails the replica for good; a
        // dataplane that does not answer is a reason to try again.
        match self.ensure_disk(&spec.disk, &disk_path).await {
            Ok(()) => {}
            Err(DiskProblem::Gone(why)) => {
                return Err(StepError::new(
                    format!("replica {}", spec.name),
                    DpError::Rpc {
                        method: "ensure_replica".into(),
                        code: -2,
                        message: format!("disk {} on node {}: {why}", spec.disk, self.cfg.node),
                    },
                ))
            }
            Err(DiskProblem::Dp(e)) => {
                return Err(StepError::new(
                    format!(
                        "replica {}: disk {} on node {}",
                        spec.name, spec.disk, self.cfg.node
                    ),
                    e,
                ))
            }
        }
        // lvol
        let alias = naming::lvol_alias(&spec.disk, &spec.name);
        let lvols = self
            .call("bdev_lvol_get_lvols", json!({"lvs_name": spec.disk}))
            .await
            .map_err(|e| StepError::new(format!("list lvols of {}", spec.disk), e))?;
        let lvol = lvols
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["alias"] == alias.as_str())
            .cloned();
        let size_mib = spec.size_bytes.div_ceil(1 << 20);
        let lvol_bdev = match lvol {
            Some(l) => {
                let have =
                    l["num_blocks"].as_u64().unwrap_or(0) * l["block_size"].as_u64().unwrap_or(512);
                if have < spec.size_bytes {
                    self.call(
                        "bdev_lvol_resize",
                        json!({"name": alias, "size_in_mib": size_mib}),
                    )
                    .await
                    .map_err(|e| StepError::new(format!("grow lvol {alias}"), e))?;
                    ev.push(step(
                        "lvol",
                        &alias,
                        "resized",
                        &format!("to {size_mib} MiB"),
                    ));
                } else {
                    ev.push(step("lvol", &alias, "adopted", ""));
                }
                l["uuid"].as_str().unwrap_or(&alias).to_string()
            }
            None => {
                let r = self
                    .call(
                        "bdev_lvol_create",
                        json!({"lvol_name": spec.name, "size_in_mib": size_mib, "thin_provision": true, "lvs_name": spec.disk}),
                    )
                    .await
                    .map_err(|e| StepError::new(format!("create lvol {alias}"), e))?;
                ev.push(step(
                    "lvol",
                    &alias,
                    "created",
                    &format!("{size_mib} MiB thin"),
                ));
                r.as_str().unwrap_or(&alias).to_string()
            }
        };
        self.fault_point("replica.lvol");
        // subsystem, namespace, listener, allow-list
        let nqn = naming::replica_nqn(&spec.name);
        let entry = self.find_subsystem(&nqn).await?;
        let port = self.cfg.nvmf_port.to_string();
        let plan = converge::replica_subsystem(
            entry.as_ref(),
            &[alias.as_str(), lvol_bdev.as_str()],
            &self.cfg.address,
            &port,
            spec.allowed_host.as_deref(),
        );
        self.ensure_transport().await?;
        if plan.create {
            let serial: String = spec
                .name
                .chars()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            self.call(
                "nvmf_create_subsystem",
                json!({"nqn": nqn, "allow_any_host": false, "serial_number": serial, "model_number": "corral replica"}),
            )
            .await
            .map_err(|e| StepError::new(format!("create subsystem {nqn}"), e))?;
            ev.push(step("subsystem", &nqn, "created", ""));
        }
        self.fault_point("replica.subsystem");
        if plan.disallow_any {
            self.call(
                "nvmf_subsystem_allow_any_host",
                json!({"nqn": nqn, "allow_any_host": false}),
            )
            .await
            .map_err(|e| StepError::new(format!("restrict {nqn}"), e))?;
        }
        self.apply_ns_and_listener(&nqn, &plan, &alias, &port, &mut ev)
            .await?;
        for h in &plan.remove_hosts {
            // Removing a host disconnects its controllers: an older engine is fenced off.
            self.call("nvmf_subsystem_remove_host", json!({"nqn": nqn, "host": h}))
                .await
                .map_err(|e| StepError::new(format!("remove host {h} from {nqn}"), e))?;
            ev.push(step(
                "host",
                h,
                "fenced",
                &format!("no longer allowed on {nqn}"),
            ));
        }
        for h in &plan.add_hosts {
            self.call("nvmf_subsystem_add_host", json!({"nqn": nqn, "host": h}))
                .await
                .map_err(|e| StepError::new(format!("allow host {h} on {nqn}"), e))?;
        }
        let st = self.replica_status(&spec.name, &spec.disk).await?;
        Ok((st, ev))
    }

    /// One object by name from a name-filtered list method: its entry, or
    /// `None` when the dataplane answers one of the `absent` codes. Looking up
    /// by name keeps a step's cost the same however many volumes the node runs.
    async fn lookup(
        &self,
        method: &str,
        params: Value,
        key: &str,
        name: &str,
        absent: &[i32],
    ) -> StepResult<Option<Value>> {
        match self.call(method, params).await {
            // Matched again by name: a dataplane that ignores the filter
            // answers with the whole list.
            Ok(v) => Ok(v
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x[key] == name)
                .cloned()),
            Err(e) if e.code().is_some_and(|c| absent.contains(&c)) => Ok(None),
            Err(e) => Err(StepError::new(format!("look up {name}"), e)),
        }
    }

    /// The subsystem `nqn` as `nvmf_get_subsystems` shows it, if it exists.
    async fn find_subsystem(&self, nqn: &str) -> StepResult<Option<Value>> {
        self.lookup(
            "nvmf_get_subsystems",
            json!({ "nqn": nqn }),
            "nqn",
            nqn,
            &[-32602],
        )
        .await
    }

    /// The engine-side controller `name`, if it exists.
    async fn find_controller(&self, name: &str) -> StepResult<Option<Value>> {
        let p = json!({ "name": name });
        self.lookup("bdev_nvme_get_controllers", p, "name", name, &[-22, -19])
            .await
    }

    /// The raid bdev `name`, if it exists.
    async fn find_raid(&self, name: &str) -> StepResult<Option<Value>> {
        let p = json!({"category": "all", "name": name});
        self.lookup("bdev_raid_get_bdevs", p, "name", name, &[-19])
            .await
    }

    /// The NBD export `name`, if it exists.
    async fn find_nbd_export(&self, name: &str) -> StepResult<Option<Value>> {
        self.lookup(
            "corral_nbd_list",
            json!({ "name": name }),
            "name",
            name,
            &[-19],
        )
        .await
    }

    /// Applies the namespace and listener part of a subsystem plan: stray
    /// namespaces removed (an event each), `bdev` added, the listener added.
    async fn apply_ns_and_listener(
        &self,
        nqn: &str,
        plan: &converge::SubsystemPlan,
        bdev: &str,
        port: &str,
        ev: &mut Vec<StepEvent>,
    ) -> StepResult<()> {
        for nsid in &plan.remove_ns {
            self.call(
                "nvmf_subsystem_remove_ns",
                json!({"nqn": nqn, "nsid": nsid}),
            )
            .await
            .map_err(|e| StepError::new(format!("remove stray namespace {nsid} of {nqn}"), e))?;
            ev.push(step(
                "namespace",
                nqn,
                "replaced",
                &format!("nsid {nsid} exposed another bdev"),
            ));
        }
        if plan.add_ns {
            self.call(
                "nvmf_subsystem_add_ns",
                json!({"nqn": nqn, "namespace": {"bdev_name": bdev}}),
            )
            .await
            .map_err(|e| StepError::new(format!("add namespace {bdev} to {nqn}"), e))?;
        }
        if plan.add_listener {
            self.call(
                "nvmf_subsystem_add_listener",
                json!({"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": self.cfg.address, "trsvcid": port}}),
            )
            .await
            .map_err(|e| StepError::new(format!("listen {nqn} on {}:{port}", self.cfg.address), e))?;
        }
        Ok(())
    }

    async fn ensure_transport(&self) -> StepResult<()> {
        let t = self
            .call("nvmf_get_transports", json!({}))
            .await
            .map_err(|e| StepError::new("get transports", e))?;
        if t.as_array().is_some_and(|a| a.is_empty()) {
            match self
                .call("nvmf_create_transport", json!({"trtype": "TCP"}))
                .await
            {
                Ok(_) => {}
                Err(e) if e.code() == Some(-17) => {}
                Err(e) => return Err(StepError::new("create TCP transport", e)),
            }
        }
        Ok(())
    }

    async fn replica_status(&self, name: &str, disk: &str) -> StepResult<ReplicaStatus> {
        let nqn = naming::replica_nqn(name);
        let alias = naming::lvol_alias(disk, name);
        let lvols = self
            .call("bdev_lvol_get_lvols", json!({"lvs_name": disk}))
            .await
            .map_err(|e| StepError::new("list lvols", e))?;
        let l = lvols
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["alias"] == alias.as_str())
            .cloned()
            .unwrap_or(Value::Null);
        let snapshots = snapshot_chain(&lvols, &l, name);
        let subs = self
            .call("nvmf_get_subsystems", json!({"nqn": nqn}))
            .await
            .unwrap_or(Value::Null);
        let s = subs.get(0).cloned().unwrap_or(Value::Null);
        let hosts = s["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["nqn"].as_str().map(String::from))
            .collect();
        let ctrls = self
            .call("nvmf_subsystem_get_controllers", json!({"nqn": nqn}))
            .await
            .unwrap_or(Value::Null);
        let connected_hosts = ctrls
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["hostnqn"].as_str().map(String::from))
            .collect();
        Ok(ReplicaStatus {
            name: name.to_string(),
            disk: disk.to_string(),
            size_bytes: l["num_blocks"].as_u64().unwrap_or(0)
                * l["block_size"].as_u64().unwrap_or(0),
            nqn,
            traddr: self.cfg.address.clone(),
            trsvcid: self.cfg.nvmf_port.to_string(),
            hosts,
            connected_hosts,
            snapshots,
        })
    }

    /// Deletes a replica: its subsystem, then its lvol (and its snapshots).
    pub async fn delete_replica(&self, name: &str, disk: &str) -> StepResult<Vec<StepEvent>> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        let mut ev = Vec::new();
        let nqn = naming::replica_nqn(name);
        match self
            .call("nvmf_delete_subsystem", json!({"nqn": nqn}))
            .await
        {
            Ok(_) => ev.push(step("subsystem", &nqn, "deleted", "")),
            Err(DpError::Rpc { code: -32602, .. }) => {}
            Err(e) => return Err(StepError::new(format!("delete subsystem {nqn}"), e)),
        }
        let lvols = self
            .call("bdev_lvol_get_lvols", json!({"lvs_name": disk}))
            .await
            .unwrap_or(Value::Null);
        let alias = naming::lvol_alias(disk, name);
        // Head first, then snapshots newest first (each delete merges into its neighbour).
        let mut victims: Vec<String> = Vec::new();
        if lvols
            .as_array()
            .into_iter()
            .flatten()
            .any(|l| l["alias"] == alias.as_str())
        {
            victims.push(alias.clone());
        }
        for l in lvols.as_array().into_iter().flatten().rev() {
            if l["is_snapshot"] == true && l["corral_owner"] == name {
                if let Some(a) = l["alias"].as_str() {
                    victims.push(a.to_string());
                }
            }
        }
        for v in victims {
            match self.call("bdev_lvol_delete", json!({"name": v})).await {
                Ok(_) => ev.push(step("lvol", &v, "deleted", "")),
                Err(e) if absent_code(&e) => {}
                Err(e) => return Err(StepError::new(format!("delete lvol {v}"), e)),
            }
        }
        Ok(ev)
    }

    // ---------------------------------------------------------- engines ----

    /// Makes the engine of `spec.volume` exist (controllers, raid, optionally
    /// the frontend), adopting what matches and replacing what does not.
    pub async fn ensure_engine(&self, spec: &EngineSpec) -> StepResult<EngineStatus> {
        let lock = self.lock_for(&format!("engine/{}", spec.volume));
        let _g = lock.lock().await;
        let mut ev = Vec::new();
        let hostnqn = naming::engine_hostnqn(&spec.volume, spec.epoch);
        let mut members = Vec::new();
        let mut missing = Vec::new();
        for (i, r) in spec.replicas.iter().enumerate() {
            let name = naming::engine_ctrlr_name(&r.name);
            let adopted = format!("epoch {}", spec.epoch);
            let attached = self
                .converge_controller(&name, r, &hostnqn, &spec.knobs, &adopted, &mut ev)
                .await?;
            if let Err(e) = attached {
                warn!(controller = %name, "replica unreachable, engine continues without it: {e}");
                ev.push(step("controller", &name, "failed", &e.to_string()));
                missing.push(MemberStatus {
                    replica: r.name.clone(),
                    state: "missing".into(),
                    reason: Some(e.to_string()),
                    rebuild_percent: None,
                });
                continue;
            }
            members.push(r.name.clone());
            self.fault_point(&format!("engine.controller.{i}"));
        }
        if members.is_empty() {
            return Err(StepError::new(
                format!("engine {}", spec.volume),
                DpError::Rpc {
                    method: "bdev_nvme_attach_controller".into(),
                    code: -19,
                    message: "no replica is reachable".into(),
                },
            ));
        }
        // raid1
        let raid = naming::raid_name(&spec.volume);
        let want_members: Vec<String> = members.iter().map(|m| naming::engine_ns_bdev(m)).collect();
        let entry = self.find_raid(&raid).await?;
        match converge::raid(entry.as_ref(), &want_members) {
            Observed::Matches => ev.push(step("raid", &raid, "adopted", "")),
            Observed::Differs(why) => {
                self.stop_frontend(&spec.volume).await?;
                self.call("bdev_raid_delete", json!({"name": raid}))
                    .await
                    .map_err(|e| StepError::new(format!("delete raid {raid}"), e))?;
                self.create_raid(
                    &raid,
                    naming::raid_uuid(&spec.volume, spec.epoch),
                    &want_members,
                )
                .await?;
                ev.push(step("raid", &raid, "replaced", &why));
            }
            Observed::Absent => {
                self.create_raid(
                    &raid,
                    naming::raid_uuid(&spec.volume, spec.epoch),
                    &want_members,
                )
                .await?;
                ev.push(step(
                    "raid",
                    &raid,
                    "created",
                    &format!("over {}", want_members.join(", ")),
                ));
            }
        }
        self.fault_point("engine.raid");
        let mut endpoint = None;
        if let Some(fe) = spec.frontend {
            endpoint = Some(self.ensure_frontend(&spec.volume, fe, &mut ev).await?);
            self.fault_point("engine.frontend");
        }
        let mut st = self.engine_status(&spec.volume, spec.epoch).await?;
        st.members.extend(missing);
        st.events = ev;
        if endpoint.is_some() {
            st.endpoint = endpoint;
        }
        Ok(st)
    }

    /// Makes controller `name` to replica `r`'s subsystem, connected as
    /// `hostnqn`, exist: adopted when it matches (event detail `adopted`),
    /// replaced when it differs (a stale trid, host or state), created when
    /// absent. Returns the attach's own failure separately (`Ok(Err(_))`):
    /// an unreachable replica is for the caller to weigh.
    async fn converge_controller(
        &self,
        name: &str,
        r: &EngineReplica,
        hostnqn: &str,
        knobs: &Knobs,
        adopted: &str,
        ev: &mut Vec<StepEvent>,
    ) -> StepResult<Result<(), DpError>> {
        let subnqn = naming::replica_nqn(&r.name);
        let want = WantCtrlr {
            traddr: &r.traddr,
            trsvcid: &r.trsvcid,
            subnqn: &subnqn,
            hostnqn,
        };
        let entry = self.find_controller(name).await?;
        let decision = converge::controller(entry.as_ref(), &want);
        match &decision {
            Observed::Matches => {
                ev.push(step("controller", name, "adopted", adopted));
                return Ok(Ok(()));
            }
            Observed::Differs(why) => {
                info!(controller = %name, why, "replacing a stale controller");
                self.detach_and_wait(name).await?;
                ev.push(step("controller", name, "replaced", why));
            }
            Observed::Absent => {}
        }
        let p = json!({
            "name": name, "trtype": "tcp", "adrfam": "ipv4", "traddr": r.traddr, "trsvcid": r.trsvcid,
            "subnqn": subnqn, "hostnqn": hostnqn, "multipath": "disable",
            "ctrlr_loss_timeout_sec": knobs.ctrlr_loss_timeout_sec,
            "reconnect_delay_sec": knobs.reconnect_delay_sec,
            "fast_io_fail_timeout_sec": knobs.fast_io_fail_timeout_sec,
            "fabrics_connect_timeout_us": 5_000_000u64,
            // A replica that stops answering is noticed within this,
            // then fast_io_fail bounds the stall (I7).
            "corral_io_timeout_ms": (knobs.fast_io_fail_timeout_sec.max(1) as u64) * 1000,
        });
        Ok(match self.call("bdev_nvme_attach_controller", p).await {
            Ok(_) => {
                if decision == Observed::Absent {
                    ev.push(step(
                        "controller",
                        name,
                        "created",
                        &format!("to {}:{}", r.traddr, r.trsvcid),
                    ));
                }
                Ok(())
            }
            Err(e) => Err(e),
        })
    }

    async fn create_raid(
        &self,
        raid: &str,
        uuid: uuid::Uuid,
        members: &[String],
    ) -> StepResult<()> {
        self.call(
            "bdev_raid_create",
            json!({"name": raid, "raid_level": "raid1", "strip_size_kb": 0, "base_bdevs": members, "uuid": uuid}),
        )
        .await
        .map_err(|e| StepError::new(format!("create raid {raid}"), e))?;
        Ok(())
    }

    async fn ensure_frontend(
        &self,
        volume: &str,
        fe: Frontend,
        ev: &mut Vec<StepEvent>,
    ) -> StepResult<String> {
        let raid = naming::raid_name(volume);
        match fe {
            Frontend::Nbd => {
                let entry = self.find_nbd_export(volume).await?;
                match converge::nbd_export(entry.as_ref(), &raid) {
                    Observed::Matches => ev.push(step("frontend", volume, "adopted", "nbd")),
                    Observed::Differs(why) => {
                        self.call("corral_nbd_stop", json!({"name": volume}))
                            .await
                            .map_err(|e| StepError::new("stop NBD export", e))?;
                        self.start_nbd(volume, &raid).await?;
                        ev.push(step("frontend", volume, "replaced", &why));
                    }
                    Observed::Absent => {
                        self.start_nbd(volume, &raid).await?;
                        ev.push(step("frontend", volume, "created", "nbd"));
                    }
                }
                Ok(format!(
                    "nbd://{}:{}/{}",
                    self.cfg.address, self.cfg.nbd_port, volume
                ))
            }
            Frontend::Nvmf => {
                self.ensure_transport().await?;
                let nqn = naming::volume_nqn(volume);
                let entry = self.find_subsystem(&nqn).await?;
                let port = self.cfg.frontend_port.to_string();
                let plan = converge::replica_subsystem(
                    entry.as_ref(),
                    &[raid.as_str()],
                    &self.cfg.address,
                    &port,
                    None,
                );
                if plan.create {
                    self.call("nvmf_create_subsystem", json!({"nqn": nqn, "allow_any_host": true, "model_number": "corral volume"}))
                        .await
                        .map_err(|e| StepError::new(format!("create subsystem {nqn}"), e))?;
                    ev.push(step("frontend", volume, "created", "nvmf"));
                } else {
                    ev.push(step("frontend", volume, "adopted", "nvmf"));
                }
                self.apply_ns_and_listener(&nqn, &plan, &raid, &port, ev)
                    .await?;
                Ok(format!("nvme+tcp://{}:{}/{}", self.cfg.address, port, nqn))
            }
        }
    }

    async fn start_nbd(&self, volume: &str, bdev: &str) -> StepResult<()> {
        self.call(
            "corral_nbd_start",
            json!({"name": volume, "bdev_name": bdev, "listen_address": format!("{}:{}", self.cfg.address, self.cfg.nbd_port)}),
        )
        .await
        .map_err(|e| StepError::new(format!("start NBD export {volume}"), e))?;
        Ok(())
    }

    async fn stop_frontend(&self, volume: &str) -> StepResult<bool> {
        let mut stopped = false;
        match self.call("corral_nbd_stop", json!({"name": volume})).await {
            Ok(_) => stopped = true,
            Err(e) if absent_code(&e) || e.code() == Some(-32601) => {}
            Err(e) => return Err(StepError::new(format!("stop NBD export {volume}"), e)),
        }
        let nqn = naming::volume_nqn(volume);
        match self
            .call("nvmf_delete_subsystem", json!({"nqn": nqn}))
            .await
        {
            Ok(_) => stopped = true,
            Err(DpError::Rpc { code: -32602, .. }) => {}
            Err(e) => {
                return Err(StepError::new(
                    format!("delete frontend subsystem {nqn}"),
                    e,
                ))
            }
        }
        Ok(stopped)
    }

    /// Detaches a controller and returns once it is really gone (a detach that
    /// answers -110 keeps going in the dataplane: wait it out, never race it).
    async fn detach_and_wait(&self, name: &str) -> StepResult<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self
                .call("bdev_nvme_detach_controller", json!({"name": name}))
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if absent_code(&e) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(StepError::new(format!("detach controller {name}"), e))
                }
                Err(e) => {
                    info!(controller = name, "detach not finished yet ({e}); waiting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let still = self
                        .call("bdev_nvme_get_controllers", json!({"name": name}))
                        .await;
                    if matches!(&still, Err(e) if e.code() == Some(-22)) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Tears the engine of `volume` down: frontend, raid, then every controller
    /// of any epoch of this volume. Idempotent.
    pub async fn delete_engine(&self, volume: &str) -> StepResult<Vec<StepEvent>> {
        let lock = self.lock_for(&format!("engine/{volume}"));
        let _g = lock.lock().await;
        let mut ev = Vec::new();
        if self.stop_frontend(volume).await? {
            ev.push(step("frontend", volume, "deleted", ""));
        }
        self.fault_point("engine.detach.frontend");
        let raid = naming::raid_name(volume);
        match self.call("bdev_raid_delete", json!({"name": raid})).await {
            Ok(_) => ev.push(step("raid", &raid, "deleted", "")),
            Err(e) if absent_code(&e) => {}
            Err(e) => return Err(StepError::new(format!("delete raid {raid}"), e)),
        }
        self.fault_point("engine.detach.raid");
        let ctrls = self
            .call("bdev_nvme_get_controllers", json!({}))
            .await
            .map_err(|e| StepError::new("list controllers", e))?;
        let mut i = 0;
        for c in ctrls.as_array().into_iter().flatten() {
            let host = c["ctrlrs"][0]["host"]["nqn"].as_str().unwrap_or("");
            if naming::parse_engine_hostnqn(host).is_some_and(|(v, _)| v == volume) {
                let name = c["name"].as_str().unwrap_or("").to_string();
                self.detach_and_wait(&name).await?;
                ev.push(step("controller", &name, "deleted", ""));
                self.fault_point(&format!("engine.detach.controller.{i}"));
                i += 1;
            }
        }
        Ok(ev)
    }

    /// The engine of `volume` as the dataplane reports it.
    pub async fn engine_status(&self, volume: &str, epoch: u64) -> StepResult<EngineStatus> {
        let raid = self.find_raid(&naming::raid_name(volume)).await?;
        let nbd_on = self.find_nbd_export(volume).await?.is_some();
        let nvmf_on = !nbd_on
            && self
                .find_subsystem(&naming::volume_nqn(volume))
                .await?
                .is_some();
        Ok(self.engine_status_of(volume, epoch, raid.as_ref(), nbd_on, nvmf_on))
    }

    /// One look at everything the dataplane holds: a handful of calls, however
    /// many volumes there are (status must not slow down as volumes grow).
    async fn view(&self) -> Result<DpView, DpError> {
        let arr = |v: Value| {
            if v.is_array() {
                v
            } else {
                Value::Array(Vec::new())
            }
        };
        Ok(DpView {
            subs: arr(self.call("nvmf_get_subsystems", json!({})).await?),
            ctrls: arr(self.call("bdev_nvme_get_controllers", json!({})).await?),
            lvols: arr(self
                .call("bdev_lvol_get_lvols", json!({}))
                .await
                .unwrap_or(Value::Null)),
            raids: arr(self
                .call("bdev_raid_get_bdevs", json!({"category": "all"}))
                .await
                .unwrap_or(Value::Null)),
            nbd: arr(self
                .call("corral_nbd_list", json!({}))
                .await
                .unwrap_or(Value::Null)),
        })
    }

    fn engine_status_in(&self, v: &DpView, volume: &str, epoch: u64) -> EngineStatus {
        let raid = naming::raid_name(volume);
        let entry = v
            .raids
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == raid.as_str());
        let nbd_on = v
            .nbd
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["name"] == volume);
        let nqn = naming::volume_nqn(volume);
        let nvmf_on = v
            .subs
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["nqn"] == nqn.as_str());
        self.engine_status_of(volume, epoch, entry, nbd_on, nvmf_on)
    }

    /// An engine's status from its raid entry and which frontend exports it.
    fn engine_status_of(
        &self,
        volume: &str,
        epoch: u64,
        raid: Option<&Value>,
        nbd_on: bool,
        nvmf_on: bool,
    ) -> EngineStatus {
        let raid_state = raid.and_then(|e| e["state"].as_str().map(String::from));
        let members = raid.map(raid_members).unwrap_or_default();
        let nqn = naming::volume_nqn(volume);
        let (frontend, endpoint) = if nbd_on {
            (
                Some(Frontend::Nbd),
                Some(format!(
                    "nbd://{}:{}/{}",
                    self.cfg.address, self.cfg.nbd_port, volume
                )),
            )
        } else if nvmf_on {
            (
                Some(Frontend::Nvmf),
                Some(format!(
                    "nvme+tcp://{}:{}/{}",
                    self.cfg.address, self.cfg.frontend_port, nqn
                )),
            )
        } else {
            (None, None)
        };
        EngineStatus {
            volume: volume.into(),
            epoch,
            members,
            raid_state,
            frontend,
            endpoint,
            events: Vec::new(),
        }
    }

    fn replica_status_in(&self, v: &DpView, l: &Value) -> Option<ReplicaStatus> {
        let name = l["name"].as_str()?;
        let disk = l["lvs_name"].as_str()?;
        let nqn = naming::replica_nqn(name);
        let s = v
            .subs
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["nqn"] == nqn.as_str());
        let hosts = s
            .map(|s| {
                s["hosts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|h| h["nqn"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let snapshots = v
            .lvols
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["is_snapshot"] == true && x["corral_owner"] == name)
            .filter_map(|x| x["name"].as_str().map(String::from))
            .collect();
        Some(ReplicaStatus {
            name: name.to_string(),
            disk: disk.to_string(),
            size_bytes: l["num_blocks"].as_u64().unwrap_or(0)
                * l["block_size"].as_u64().unwrap_or(0),
            nqn,
            traddr: self.cfg.address.clone(),
            trsvcid: self.cfg.nvmf_port.to_string(),
            hosts,
            connected_hosts: Vec::new(),
            snapshots,
        })
    }

    // --------------------------------------------------------- rebuilds ----

    /// On the source node of a rebuild: connects to the new replica `target`
    /// (exposed at `r`) with the rebuild host NQN; adopts a matching controller.
    /// Returns the namespace bdev the snapshots are copied into.
    pub async fn rebuild_connect(
        &self,
        target: &str,
        r: &EngineReplica,
        knobs: &Knobs,
    ) -> StepResult<(String, Vec<StepEvent>)> {
        let name = naming::rebuild_ctrlr_name(target);
        let lock = self.lock_for(&name);
        let _g = lock.lock().await;
        let mut ev = Vec::new();
        let host = naming::rebuild_hostnqn(target);
        self.converge_controller(&name, r, &host, knobs, "rebuild", &mut ev)
            .await?
            .map_err(|e| StepError::new(format!("connect to rebuild target {target}"), e))?;
        Ok((naming::engine_ns_bdev(&name), ev))
    }

    /// On the source node: drops the connection to rebuild target `target`
    /// (done when there is none).
    pub async fn rebuild_disconnect(&self, target: &str) -> StepResult<()> {
        let name = naming::rebuild_ctrlr_name(target);
        let lock = self.lock_for(&name);
        let _g = lock.lock().await;
        self.detach_and_wait(&name).await
    }

    /// On the source node: starts copying what snapshot `snapshot` of replica
    /// `source` holds in its own layer into the rebuild target (SPDK's
    /// `bdev_lvol_start_shallow_copy`). Returns the operation id.
    pub async fn rebuild_copy_start(
        &self,
        target: &str,
        source: &str,
        disk: &str,
        snapshot: &str,
    ) -> StepResult<u64> {
        let src = naming::lvol_alias(disk, &naming::snapshot_lvol(source, snapshot));
        let dst = naming::engine_ns_bdev(&naming::rebuild_ctrlr_name(target));
        let what = || format!("copy {src} to rebuild target {target}");
        let r = self
            .call(
                "bdev_lvol_start_shallow_copy",
                json!({"src_lvol_name": src, "dst_bdev_name": dst}),
            )
            .await
            .map_err(|e| StepError::new(what(), e))?;
        r["operation_id"].as_u64().ok_or_else(|| {
            StepError::new(
                what(),
                DpError::Rpc {
                    method: "bdev_lvol_start_shallow_copy".into(),
                    code: -libc::EIO,
                    message: format!("answer without an operation_id: {r}"),
                },
            )
        })
    }

    /// On the source node: how copy `op` stands (`None`: the dataplane does
    /// not know it, e.g. it restarted).
    pub async fn rebuild_copy_check(&self, op: u64) -> StepResult<Option<CopyProgress>> {
        match self
            .call(
                "bdev_lvol_check_shallow_copy",
                json!({ "operation_id": op }),
            )
            .await
        {
            Ok(v) => Ok(Some(CopyProgress {
                state: v["state"].as_str().unwrap_or("?").to_string(),
                copied_blocks: v["copied_blocks"].as_u64().unwrap_or(0),
                total_blocks: v["total_blocks"].as_u64().unwrap_or(0),
                error: v["error"].as_str().map(String::from),
            })),
            Err(e)
                if e.code().is_some_and(|c| {
                    c == -libc::ENOENT || c == -libc::ENODEV || c == -libc::EINVAL
                }) =>
            {
                Ok(None)
            }
            Err(e) => Err(StepError::new(format!("check copy {op}"), e)),
        }
    }

    /// The byte ranges replica `name`'s head holds in its own layer: what a
    /// rebuild target with the same snapshots lacks.
    pub async fn head_ranges(&self, name: &str, disk: &str) -> StepResult<Vec<(u64, u64)>> {
        let alias = naming::lvol_alias(disk, name);
        let f = self
            .call(
                "corral_lvol_get_fragmap",
                json!({"name": alias, "scope": "layer"}),
            )
            .await
            .map_err(|e| StepError::new(format!("fragmap of {alias}"), e))?;
        let bs = f["block_size"].as_u64().unwrap_or(0);
        Ok(f["ranges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| Some((r[0].as_u64()? * bs, r[1].as_u64()? * bs)))
            .collect())
    }

    /// On the engine's node: makes replica `r` a member of `volume`'s raid
    /// whose rebuild copies only `ranges` (bytes; the rest it already holds).
    /// Adopted when it is a member already (rebuilding or in sync).
    pub async fn add_engine_member(
        &self,
        volume: &str,
        epoch: u64,
        r: &EngineReplica,
        knobs: &Knobs,
        ranges: &[(u64, u64)],
    ) -> StepResult<Vec<StepEvent>> {
        let lock = self.lock_for(&format!("engine/{volume}"));
        let _g = lock.lock().await;
        let mut ev = Vec::new();
        let raid = naming::raid_name(volume);
        let Some(entry) = self.find_raid(&raid).await? else {
            return Err(StepError::new(
                format!("add {} to engine {volume}", r.name),
                DpError::Rpc {
                    method: "bdev_raid_get_bdevs".into(),
                    code: -libc::ENODEV,
                    message: format!("raid {raid} does not exist"),
                },
            ));
        };
        let ns = naming::engine_ns_bdev(&naming::engine_ctrlr_name(&r.name));
        if raid_members(&entry)
            .iter()
            .any(|m| m.replica == r.name && (m.state == "rebuilding" || m.state == "online"))
        {
            ev.push(step("raid", &raid, "adopted", &format!("member {ns}")));
            return Ok(ev);
        }
        let name = naming::engine_ctrlr_name(&r.name);
        let host = naming::engine_hostnqn(volume, epoch);
        self.converge_controller(&name, r, &host, knobs, &format!("epoch {epoch}"), &mut ev)
            .await?
            .map_err(|e| StepError::new(format!("connect engine {volume} to {}", r.name), e))?;
        let bs = entry["block_size"]
            .as_u64()
            .filter(|b| *b > 0)
            .unwrap_or(512);
        let blocks: Vec<[u64; 2]> =
            crate::rebuild::coalesce(ranges.to_vec(), crate::rebuild::COALESCE_GAP)
                .iter()
                .map(|(o, n)| [o / bs, (o + n).div_ceil(bs) - o / bs])
                .collect();
        self.call(
            "bdev_raid_add_base_bdev",
            json!({"raid_bdev": raid, "base_bdev": ns, "corral_rebuild_ranges": blocks}),
        )
        .await
        .map_err(|e| StepError::new(format!("add {ns} to raid {raid}"), e))?;
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        ev.push(step(
            "raid",
            &raid,
            "member added",
            &format!("{ns}, rebuilding {total} bytes"),
        ));
        Ok(ev)
    }

    /// On the engine's node: takes replica `replica` out of `volume`'s engine
    /// (out of the raid if it is a member, then its controller). Done when
    /// neither exists.
    pub async fn remove_engine_member(
        &self,
        volume: &str,
        replica: &str,
    ) -> StepResult<Vec<StepEvent>> {
        let lock = self.lock_for(&format!("engine/{volume}"));
        let _g = lock.lock().await;
        let mut ev = Vec::new();
        let raid = naming::raid_name(volume);
        let name = naming::engine_ctrlr_name(replica);
        let ns = naming::engine_ns_bdev(&name);
        if let Some(entry) = self.find_raid(&raid).await? {
            let member = entry["base_bdevs_list"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|b| b["name"] == ns.as_str());
            if member {
                match self
                    .call("bdev_raid_remove_base_bdev", json!({ "name": ns }))
                    .await
                {
                    Ok(_) => ev.push(step("raid", &raid, "member removed", &ns)),
                    Err(e) if absent_code(&e) => {}
                    Err(e) => return Err(StepError::new(format!("remove {ns} from {raid}"), e)),
                }
            }
        }
        if self.find_controller(&name).await?.is_some() {
            self.detach_and_wait(&name).await?;
            ev.push(step(
                "controller",
                &name,
                "deleted",
                "replica left the engine",
            ));
        }
        Ok(ev)
    }

    // ---------------------------------------------------------- quiesce ----

    /// Quiesces the engine of `volume` (its raid): new I/O waits and I/O in
    /// flight drains, so that every replica holds the same writes until
    /// [`Agent::resume_engine`], or until `lease` ends it by itself.
    pub async fn quiesce_engine(
        &self,
        volume: &str,
        drain: Duration,
        lease: Duration,
    ) -> StepResult<u64> {
        let raid = naming::raid_name(volume);
        let what = || format!("quiesce the engine of {volume}");
        let r = self
            .call(
                "corral_raid_quiesce",
                json!({"name": raid, "drain_timeout_ms": drain.as_millis() as u64,
                       "lease_ms": lease.as_millis() as u64}),
            )
            .await
            .map_err(|e| StepError::new(what(), e))?;
        r["token"].as_u64().ok_or_else(|| {
            StepError::new(
                what(),
                DpError::Rpc {
                    method: "corral_raid_quiesce".into(),
                    code: -libc::EIO,
                    message: format!("answer without a token: {r}"),
                },
            )
        })
    }

    /// Ends quiesce `token` of `volume`'s engine. Fails (-ENOENT) when it had
    /// already ended, i.e. its lease ran out first.
    pub async fn resume_engine(&self, volume: &str, token: u64) -> StepResult<()> {
        self.call(
            "corral_raid_resume",
            json!({"name": naming::raid_name(volume), "token": token}),
        )
        .await
        .map(|_| ())
        .map_err(|e| StepError::new(format!("resume the engine of {volume}"), e))
    }

    // ----------------------------------------------------------- status ----

    /// Takes the manager's desired set unless a newer one is already here.
    /// Returns whether it was taken.
    pub fn set_desired(&self, d: Desired) -> bool {
        let mut g = self.desired.lock();
        if g.as_ref().is_some_and(|old| !d.supersedes(old)) {
            return false;
        }
        *g = Some(d);
        true
    }

    /// Everything on this node: disks, replicas, engines, raid records, orphans.
    pub async fn status(&self) -> Result<AgentStatus, DpError> {
        let info = self.call("corral_dataplane_info", json!({})).await?;
        let disks = self.ensure_disks().await;
        let view = self.view().await?;
        let replicas = view
            .lvols
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| {
                l["is_snapshot"] != true
                    && l["name"]
                        .as_str()
                        .and_then(naming::replica_volume)
                        .is_some()
            })
            .filter_map(|l| self.replica_status_in(&view, l))
            .collect();
        // Engines: the volumes whose controllers carry an engine host NQN.
        let mut seen_volumes: HashMap<String, u64> = HashMap::new();
        for c in view.ctrls.as_array().into_iter().flatten() {
            if let Some((v, e)) =
                naming::parse_engine_hostnqn(c["ctrlrs"][0]["host"]["nqn"].as_str().unwrap_or(""))
            {
                let cur = seen_volumes.entry(v.to_string()).or_insert(e);
                *cur = (*cur).max(e);
            }
        }
        let engines = seen_volumes
            .iter()
            .map(|(v, e)| self.engine_status_in(&view, v, *e))
            .collect();
        let (subs, ctrls, lvols) = (&view.subs, &view.ctrls, &view.lvols);
        let records = self
            .call("corral_raid_get_records", json!({}))
            .await
            .unwrap_or(Value::Null);
        let raid_records = records
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| RaidRecord {
                raid: r["name"].as_str().unwrap_or("").to_string(),
                uuid: r["uuid"].as_str().unwrap_or("").to_string(),
                members: record_members(r),
            })
            .collect();
        let orphans = self.orphans(subs, ctrls, lvols, &view);
        let controllers = ctrls
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let x = &c["ctrlrs"][0];
                let s = |v: &Value| v.as_str().unwrap_or("").to_string();
                ControllerInfo {
                    name: s(&c["name"]),
                    state: s(&x["state"]),
                    hostnqn: s(&x["host"]["nqn"]),
                    traddr: s(&x["trid"]["traddr"]),
                    trsvcid: s(&x["trid"]["trsvcid"]),
                    subnqn: s(&x["trid"]["subnqn"]),
                }
            })
            .collect();
        Ok(AgentStatus {
            controllers,
            agent_instance: self.instance.clone(),
            events: self.own_events.lock().iter().cloned().collect(),
            node: self.cfg.node.clone(),
            address: self.cfg.address.clone(),
            dataplane_instance: format!("{}-{}", info["pid"], info["started"]),
            disks,
            replicas,
            engines,
            raid_records,
            orphans,
        })
    }

    /// Resources that follow corral's naming but that nothing live owns.
    fn orphans(
        &self,
        subs: &Value,
        ctrls: &Value,
        lvols: &Value,
        view: &DpView,
    ) -> Option<Vec<Orphan>> {
        let d = self.desired.lock().clone()?;
        let engine_epoch = |v: &str| d.engines.iter().find(|(x, _)| x == v).map(|(_, e)| *e);
        let mut out = Vec::new();
        for c in ctrls.as_array().into_iter().flatten() {
            let name = c["name"].as_str().unwrap_or("");
            let host = c["ctrlrs"][0]["host"]["nqn"].as_str().unwrap_or("");
            if let Some(t) = naming::parse_rebuild_hostnqn(host) {
                if !d.rebuilds.iter().any(|x| x == t) {
                    out.push((
                        "controller",
                        name.to_string(),
                        format!("rebuild copy to {t}, which no rebuild runs for"),
                    ));
                }
            } else if let Some((v, e)) = naming::parse_engine_hostnqn(host) {
                if engine_epoch(v) != Some(e) {
                    out.push((
                        "controller",
                        name.to_string(),
                        format!(
                            "engine {v} epoch {e}; state {}",
                            c["ctrlrs"][0]["state"].as_str().unwrap_or("?")
                        ),
                    ));
                }
            }
        }
        // A raid is ours when its members are engine namespaces of replicas
        // of the volume it is named after; an NBD export is ours only when it
        // exports such a raid (anything else in the dataplane is not corral's).
        let mut our_raids: Vec<&str> = Vec::new();
        for r in view.raids.as_array().into_iter().flatten() {
            let name = r["name"].as_str().unwrap_or("");
            let ours = r["base_bdevs_list"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|b| {
                    b["name"]
                        .as_str()
                        .and_then(|n| n.strip_suffix("n1"))
                        .and_then(naming::replica_volume)
                        == Some(name)
                });
            if !ours {
                continue;
            }
            our_raids.push(name);
            if engine_epoch(name).is_none() {
                out.push((
                    "raid",
                    name.to_string(),
                    format!("state {}", r["state"].as_str().unwrap_or("?")),
                ));
            }
        }
        for x in view.nbd.as_array().into_iter().flatten() {
            let name = x["name"].as_str().unwrap_or("");
            let bdev = x["bdev_name"].as_str().unwrap_or("");
            if bdev == naming::raid_name(name)
                && our_raids.contains(&bdev)
                && engine_epoch(name).is_none()
            {
                out.push(("nbd_export", name.to_string(), format!("bdev {bdev}")));
            }
        }
        for s in subs.as_array().into_iter().flatten() {
            let nqn = s["nqn"].as_str().unwrap_or("");
            if let Some(r) = naming::parse_replica_nqn(nqn) {
                if !d.replicas.iter().any(|x| x == r) {
                    out.push(("subsystem", nqn.to_string(), "replica subsystem".into()));
                }
            } else if let Some(v) = naming::parse_volume_nqn(nqn) {
                if engine_epoch(v).is_none() {
                    out.push(("subsystem", nqn.to_string(), "volume frontend".into()));
                }
            }
        }
        for l in lvols.as_array().into_iter().flatten() {
            let name = l["name"].as_str().unwrap_or("");
            let owner = l["corral_owner"].as_str().unwrap_or(name);
            if naming::replica_volume(owner).is_some() && !d.replicas.iter().any(|x| x == owner) {
                out.push((
                    "lvol",
                    l["alias"].as_str().unwrap_or(name).to_string(),
                    "replica data".into(),
                ));
            }
        }
        let now = Instant::now();
        let mut seen = self.seen.lock();
        let keys: Vec<(String, String)> = out
            .iter()
            .map(|(k, n, _)| (k.to_string(), n.clone()))
            .collect();
        seen.retain(|k, _| keys.contains(k));
        Some(
            out.into_iter()
                .map(|(k, n, detail)| {
                    let first = *seen.entry((k.to_string(), n.clone())).or_insert(now);
                    Orphan {
                        kind: k.into(),
                        name: n,
                        detail,
                        age_secs: now.duration_since(first).as_secs(),
                    }
                })
                .collect(),
        )
    }

    /// Deletes orphans older than the grace period (all of them when `force`).
    pub async fn collect_orphans(&self, force: bool) -> Result<Vec<StepEvent>, DpError> {
        if self.cfg.orphan_grace.is_zero() && !force {
            return Ok(Vec::new());
        }
        let st = self.status().await?;
        let Some(orphans) = st.orphans else {
            return Ok(Vec::new());
        };
        let grace = self.cfg.orphan_grace.as_secs();
        let mut ev = Vec::new();
        // Order matters: consumers before what they consume.
        for kind in ["nbd_export", "raid", "controller", "subsystem", "lvol"] {
            for o in orphans
                .iter()
                .filter(|o| o.kind == kind && (force || o.age_secs >= grace))
            {
                let r = match kind {
                    "nbd_export" => self.call("corral_nbd_stop", json!({"name": o.name})).await,
                    "raid" => self.call("bdev_raid_delete", json!({"name": o.name})).await,
                    "controller" => self
                        .detach_and_wait(&o.name)
                        .await
                        .map(|_| Value::Null)
                        .map_err(|e| e.source),
                    "subsystem" => {
                        self.call("nvmf_delete_subsystem", json!({"nqn": o.name}))
                            .await
                    }
                    _ => self.call("bdev_lvol_delete", json!({"name": o.name})).await,
                };
                match r {
                    Ok(_) => {
                        info!(kind, name = %o.name, age = o.age_secs, "orphan collected");
                        let e = step(
                            kind,
                            &o.name,
                            "collected",
                            &format!("orphan for {} s: {}", o.age_secs, o.detail),
                        );
                        self.record_own(e.clone());
                        ev.push(e);
                    }
                    Err(e) => warn!(kind, name = %o.name, "orphan collection failed: {e}"),
                }
            }
        }
        Ok(ev)
    }
}

/// Everything the dataplane holds, read in one go.
#[derive(Debug, Default)]
struct DpView {
    subs: Value,
    ctrls: Value,
    lvols: Value,
    raids: Value,
    nbd: Value,
}

/// Members of a raid entry, by replica, with corral's member states.
fn raid_members(e: &Value) -> Vec<MemberStatus> {
    let mut out = Vec::new();
    for b in e["base_bdevs_list"].as_array().into_iter().flatten() {
        // corral's raid keeps the name of a member that left in `member`.
        let Some(n) = b["member"].as_str().or(b["name"].as_str()) else {
            continue;
        };
        let replica = n.strip_suffix("n1").unwrap_or(n).to_string();
        let state = b["state"].as_str().map(String::from).unwrap_or_else(|| {
            if b["is_configured"].as_bool().unwrap_or(false) {
                "online".into()
            } else {
                "out_of_sync".into()
            }
        });
        if state == "empty" {
            continue;
        }
        out.push(MemberStatus {
            replica,
            state,
            reason: b["reason"].as_str().map(String::from),
            rebuild_percent: b["rebuild_percent"]
                .as_f64()
                .map(|p| p.clamp(0.0, 100.0) as u32),
        });
    }
    out
}

/// The snapshots of replica `name` (lvol names), oldest first: the chain
/// below its head `head`, then any other of its snapshots (listing order).
fn snapshot_chain(lvols: &Value, head: &Value, name: &str) -> Vec<String> {
    let all: Vec<&Value> = lvols
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["is_snapshot"] == true && s["corral_owner"] == name)
        .collect();
    let mut chain = Vec::new();
    let mut at = head["base_snapshot"].as_str();
    while let Some(p) = at {
        // Bounded by the number of snapshots: a cycle cannot loop.
        if chain.len() >= all.len() || chain.iter().any(|c| c == p) {
            break;
        }
        let Some(s) = all.iter().find(|s| s["name"] == p) else {
            break;
        };
        chain.push(p.to_string());
        at = s["base_snapshot"].as_str();
    }
    chain.reverse();
    for s in &all {
        if let Some(n) = s["name"].as_str() {
            if !chain.iter().any(|c| c == n) {
                chain.push(n.to_string());
            }
        }
    }
    chain
}

fn record_members(r: &Value) -> Vec<MemberStatus> {
    r["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let n = m["name"].as_str().or(m["bdev"].as_str()).unwrap_or("");
            MemberStatus {
                replica: n.strip_suffix("n1").unwrap_or(n).to_string(),
                state: m["state"].as_str().unwrap_or("?").to_string(),
                reason: m["reason"].as_str().map(String::from),
                rebuild_percent: None,
            }
        })
        .collect()
}

fn step(kind: &str, name: &str, outcome: &str, detail: &str) -> StepEvent {
    StepEvent {
        kind: kind.into(),
        name: name.into(),
        outcome: outcome.into(),
        detail: detail.into(),
    }
}

/// (total, free) bytes of the filesystem holding `p`.
fn fs_space(p: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into a zeroed struct; c is a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        Some((
            s.f_blocks as u64 * s.f_frsize as u64,
            s.f_bavail as u64 * s.f_frsize as u64,
        ))
    }
}
