//! The manager's side of replica rebuild: one step per reconcile of an
//! attached volume, driving the state machine of [`crate::rebuild`] with the
//! agents. Every step is short and convergent (a repeated or interrupted step
//! adopts what the last one did), so a rebuild holds no lock for its length
//! and survives a restart of the manager, the agents or the source dataplane.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use tracing::{info, warn};

use super::{nkey, rkey, Manager, OpError};
use crate::api::*;
use crate::model::*;
use crate::naming;
use crate::rebuild::{self, Next, NoRebuild, RebuildEvent};
use crate::retry::{Backoff, ErrorClass};

/// The condition a degraded volume carries while it cannot be rebuilt.
const COND: &str = "NotRebuilding";

impl Manager {
    /// Starts a rebuild of `v` when it needs one, or advances the one running.
    /// `engine` is its serving engine as its node reported it.
    pub(super) async fn rebuild_step(
        &self,
        v: &Volume,
        engine: &EngineStatus,
        asked: Instant,
    ) -> Result<(), OpError> {
        let replicas = self.replicas(Some(&v.name))?;
        if let Some(t) = replicas
            .iter()
            .find(|r| r.state == ReplicaState::Rebuilding)
        {
            return self.advance(v, t, &replicas, engine, asked).await;
        }
        if self
            .rebuild_backoff
            .lock()
            .get(&v.name)
            .is_some_and(|(_, until)| Instant::now() < *until)
        {
            return Ok(());
        }
        match rebuild::plan(v, &replicas, &self.nodes()?) {
            Ok(p) => {
                self.update_volume(&v.name, |v| v.clear_condition(COND))?;
                self.start(v, p).await
            }
            Err(NoRebuild::NotNeeded) => {
                if v.condition(COND).is_some() {
                    self.update_volume(&v.name, |v| v.clear_condition(COND))?;
                }
                Ok(())
            }
            Err(e @ NoRebuild::NoPlace(_)) => {
                self.update_volume(&v.name, |v| {
                    v.set_condition(
                        COND,
                        e.to_string(),
                        Some(
                            "add a node or a disk with room, or bring the failed node back".into(),
                        ),
                    )
                })?;
                Ok(())
            }
            Err(e) => {
                self.update_volume(&v.name, |v| v.set_condition(COND, e.to_string(), None))?;
                Ok(())
            }
        }
    }

    /// Ends every rebuild of `volume` (its engine went away).
    pub(super) async fn abandon_rebuilds(&self, volume: &str, why: &str) -> Result<(), OpError> {
        for t in self
            .replicas(Some(volume))?
            .into_iter()
            .filter(|r| r.state == ReplicaState::Rebuilding)
        {
            self.abandon(&t, why).await?;
        }
        Ok(())
    }

    async fn start(&self, v: &Volume, p: rebuild::Plan) -> Result<(), OpError> {
        let source = self
            .replicas(Some(&v.name))?
            .into_iter()
            .find(|r| r.name == p.source)
            .ok_or_else(|| OpError::not_found("replica", &p.source))?;
        // The snapshots in the source's chain order (oldest first).
        let sn = self.node(&source.node)?;
        let st = self
            .expose_replica(&sn, &source, v, Some(engine_host(v)))
            .await?;
        let prefix = format!("{}.snap.", source.name);
        let snapshots: Vec<String> = st["status"]["snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str()?.strip_prefix(&prefix).map(String::from))
            .collect();
        let t = Replica {
            name: naming::new_replica_id(&v.name),
            volume: v.name.clone(),
            node: p.node.clone(),
            disk: p.disk.clone(),
            state: ReplicaState::Rebuilding,
            reason: Some(format!("rebuilding from {}", source.name)),
            last_in_sync_epoch: 0,
            created: now_secs(),
            rebuild: Some(RebuildInfo {
                source: source.name.clone(),
                epoch: v.epoch,
                phase: RebuildPhase::Preparing,
                snapshots: snapshots.clone(),
                replaces: p.replaces.clone(),
                started: now_secs(),
                percent: 0,
            }),
        };
        self.store.write(|tx| {
            tx.put(&rkey(&t.name), &t)?;
            if let Some(mut n) = tx.get::<Node>(&nkey(&t.node))? {
                if let Some(d) = n.disks.iter_mut().find(|d| d.name == t.disk) {
                    d.scheduled_bytes += v.size_bytes;
                }
                tx.put(&nkey(&t.node), &n)?;
            }
            Ok(())
        })?;
        self.event(
            "replica",
            &t.name,
            "RebuildStarted",
            format!(
                "new replica of {} on {}/{} from {}{}; {} snapshot(s) to copy",
                v.name,
                p.node,
                p.disk,
                source.name,
                p.replaces
                    .as_ref()
                    .map(|r| format!(", replacing {r}"))
                    .unwrap_or_default(),
                snapshots.len()
            ),
        );
        info!(volume = %v.name, replica = %t.name, source = %source.name, "rebuild started");
        Ok(())
    }

    /// One step of the rebuild of `t`.
    async fn advance(
        &self,
        v: &Volume,
        t: &Replica,
        replicas: &[Replica],
        engine: &EngineStatus,
        asked: Instant,
    ) -> Result<(), OpError> {
        let Some(info) = t.rebuild.clone() else {
            return self.abandon(t, "no rebuild record").await;
        };
        if info.epoch != v.epoch {
            return self
                .abandon(
                    t,
                    &format!("the engine changed (epoch {} → {})", info.epoch, v.epoch),
                )
                .await;
        }
        // Once joined, the raid fills it from any in-sync member: the source
        // matters no more.
        let source = replicas.iter().find(|r| r.name == info.source);
        if info.phase != RebuildPhase::SyncHead {
            match source {
                Some(s) if s.state == ReplicaState::Healthy => {}
                Some(s) => {
                    return self
                        .abandon(t, &format!("its source {} is {:?} now", s.name, s.state))
                        .await
                }
                None => {
                    return self
                        .abandon(t, &format!("its source {} is gone", info.source))
                        .await
                }
            }
        }
        let n = info.snapshots.len();
        let mut percent = info.percent;
        let fresh = self
            .joined_at
            .lock()
            .get(&t.name)
            .is_none_or(|j| asked > *j);
        let ev = match self
            .observe(v, t, source, &info, (engine, fresh), &mut percent)
            .await
        {
            Ok(Some(ev)) => ev,
            Ok(None) => {
                if percent != info.percent {
                    self.update_replica(&t.name, |r| {
                        if let Some(b) = r.rebuild.as_mut() {
                            b.percent = percent;
                        }
                        r.reason = Some(progress(&info.phase, n, percent, &info.source));
                    })?;
                }
                return Ok(());
            }
            Err(e) if e.class == ErrorClass::Permanent => RebuildEvent::Failed(e.message),
            Err(e) => return Err(e),
        };
        let next = rebuild::transition(&info.phase, ev.clone(), n)
            .map_err(|e| OpError::new(500, ErrorClass::Permanent, e.to_string()))?;
        match next {
            Next::Phase(p) => {
                if p == RebuildPhase::SyncHead {
                    self.joined_at.lock().insert(t.name.clone(), Instant::now());
                }
                if matches!(ev, RebuildEvent::SnapshotDone) {
                    if let RebuildPhase::CopySnapshot { index, .. } = &info.phase {
                        self.event(
                            "replica",
                            &t.name,
                            "RebuildProgress",
                            format!(
                                "snapshot {} ({}/{n}) copied",
                                info.snapshots[*index],
                                index + 1
                            ),
                        );
                    }
                }
                if p == RebuildPhase::SyncHead {
                    self.event(
                        "replica",
                        &t.name,
                        "RebuildProgress",
                        "joined the engine; syncing what was written since the last snapshot",
                    );
                }
                let reason = progress(&p, n, 0, &info.source);
                self.update_replica(&t.name, |r| {
                    if let Some(b) = r.rebuild.as_mut() {
                        b.phase = p;
                        b.percent = 0;
                    }
                    r.reason = Some(reason);
                })?;
                // The next step can go at once.
                self.kick(&v.name);
                Ok(())
            }
            Next::Done => self.finish(v, t, &info).await,
            Next::Abandon(why) => self.abandon(t, &why).await,
        }
    }

    /// Does the work of the current phase; returns the event it led to, or
    /// None when the phase goes on (with `percent` updated).
    async fn observe(
        &self,
        v: &Volume,
        t: &Replica,
        source: Option<&Replica>,
        info: &RebuildInfo,
        engine: (&EngineStatus, bool),
        percent: &mut u32,
    ) -> Result<Option<RebuildEvent>, OpError> {
        if let RebuildPhase::SyncHead = info.phase {
            return Ok(sync_head(t, engine, percent));
        }
        let source = source.ok_or_else(|| OpError::not_found("replica", &info.source))?;
        let sn = self.node(&source.node)?;
        let tn = self.node(&t.node)?;
        match &info.phase {
            RebuildPhase::Preparing => {
                let at = self
                    .expose_target(v, t, &tn, Some(naming::rebuild_hostnqn(&t.name)))
                    .await?;
                if !info.snapshots.is_empty() {
                    let _: Value = self
                        .agent(
                            &sn,
                            Method::PUT,
                            &format!("/v1/rebuilds/{}/connection", t.name),
                            Some(&RebuildConnectReq {
                                target: at,
                                knobs: self.cfg.knobs,
                            }),
                        )
                        .await?;
                }
                Ok(Some(RebuildEvent::Prepared))
            }
            RebuildPhase::CopySnapshot { index, op: None } => {
                let snap = &info.snapshots[*index];
                // Snapshotted already (a step cut short after it): done.
                let st = self
                    .expose_replica(&tn, t, v, Some(naming::rebuild_hostnqn(&t.name)))
                    .await?;
                let want = naming::snapshot_lvol(&t.name, snap);
                if st["status"]["snapshots"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|s| s == want.as_str()))
                {
                    return Ok(Some(RebuildEvent::SnapshotDone));
                }
                let r: Value = self
                    .agent(
                        &sn,
                        Method::POST,
                        &format!("/v1/rebuilds/{}/copies", t.name),
                        Some(&CopyReq {
                            source: source.name.clone(),
                            disk: source.disk.clone(),
                            snapshot: snap.clone(),
                        }),
                    )
                    .await?;
                let op = r["operation_id"].as_u64().ok_or_else(|| {
                    OpError::transient(format!("node {}: copy answer without an id: {r}", sn.name))
                })?;
                Ok(Some(RebuildEvent::CopyStarted(op)))
            }
            RebuildPhase::CopySnapshot {
                index,
                op: Some(op),
            } => {
                let p: Result<CopyProgress, OpError> = self
                    .agent(&sn, Method::GET, &format!("/v1/copies/{op}"), None::<&()>)
                    .await;
                let p = match p {
                    Ok(p) => p,
                    Err(e) if e.status == 404 => return Ok(Some(RebuildEvent::CopyLost)),
                    Err(e) => return Err(e),
                };
                match p.state.as_str() {
                    "complete" => {
                        let snap = &info.snapshots[*index];
                        let _: Value = self
                            .agent(
                                &tn,
                                Method::POST,
                                &format!("/v1/replicas/{}/snapshots", t.name),
                                Some(&serde_json::json!({"disk": t.disk, "snapshot": snap})),
                            )
                            .await?;
                        Ok(Some(RebuildEvent::SnapshotDone))
                    }
                    "error" => Ok(Some(RebuildEvent::Failed(format!(
                        "copying snapshot {} failed: {}",
                        info.snapshots[*index],
                        p.error.unwrap_or_default()
                    )))),
                    _ => {
                        if let Some(pc) = (p.copied_blocks * 100).checked_div(p.total_blocks) {
                            *percent = pc.min(100) as u32;
                        }
                        Ok(None)
                    }
                }
            }
            RebuildPhase::Join => self.join(v, t, source, &sn, &tn).await.map(Some),
            RebuildPhase::SyncHead => Ok(sync_head(t, engine, percent)),
        }
    }

    /// Joins `t` to the engine: with the engine quiesced, the source's head
    /// layer is listed and `t` added as a member that copies just that.
    async fn join(
        &self,
        v: &Volume,
        t: &Replica,
        source: &Replica,
        sn: &Node,
        tn: &Node,
    ) -> Result<RebuildEvent, OpError> {
        let en = self.node(v.engine_node.as_deref().unwrap_or_default())?;
        // The source is done copying: its connection goes, and the target
        // admits the engine only (which also cuts that connection).
        let _: Value = self
            .agent(
                sn,
                Method::DELETE,
                &format!("/v1/rebuilds/{}/connection", t.name),
                None::<&()>,
            )
            .await?;
        let at = self.expose_target(v, t, tn, Some(engine_host(v))).await?;
        let q: QuiesceResp = self
            .agent(
                &en,
                Method::POST,
                &format!("/v1/engines/{}/quiesce", v.name),
                Some(&QuiesceReq {
                    drain_timeout_ms: 5_000,
                    lease_ms: 10_000,
                }),
            )
            .await?;
        let t0 = Instant::now();
        let added = async {
            let r: Value = self
                .agent(
                    sn,
                    Method::GET,
                    &format!(
                        "/v1/replicas/{}/head-ranges?disk={}",
                        source.name, source.disk
                    ),
                    None::<&()>,
                )
                .await?;
            let ranges: Vec<(u64, u64)> = serde_json::from_value(r["ranges"].clone())
                .map_err(|e| OpError::transient(format!("node {}: bad ranges: {e}", sn.name)))?;
            let r: Value = self
                .agent(
                    &en,
                    Method::POST,
                    &format!("/v1/engines/{}/members", v.name),
                    Some(&AddMemberReq {
                        epoch: v.epoch,
                        replica: at,
                        knobs: self.cfg.knobs,
                        ranges,
                    }),
                )
                .await?;
            if let Ok(ev) = serde_json::from_value::<Vec<StepEvent>>(r["events"].clone()) {
                self.emit_steps(
                    &ev.into_iter()
                        .filter(|e| e.outcome != "adopted")
                        .collect::<Vec<_>>(),
                );
            }
            Ok::<(), OpError>(())
        };
        let added = tokio::time::timeout(Duration::from_secs(5), added)
            .await
            .unwrap_or_else(|_| Err(OpError::transient("joining took longer than 5 s")));
        let resumed: Result<Value, OpError> = self
            .agent(
                &en,
                Method::POST,
                &format!("/v1/engines/{}/resume", v.name),
                Some(&q),
            )
            .await;
        info!(volume = %v.name, replica = %t.name, held_ms = t0.elapsed().as_millis() as u64, "engine quiesced to join a rebuilt replica");
        added?;
        if let Err(e) = resumed {
            // Writes may have passed while the member was not yet in: it
            // could miss them. Start over rather than trust it.
            return Ok(RebuildEvent::Failed(format!(
                "the engine's quiesce ended before the join did ({})",
                e.message
            )));
        }
        Ok(RebuildEvent::Joined)
    }

    /// Exposes the target replica to `host`; returns where it listens.
    async fn expose_target(
        &self,
        v: &Volume,
        t: &Replica,
        tn: &Node,
        host: Option<String>,
    ) -> Result<EngineReplica, OpError> {
        let st = self.expose_replica(tn, t, v, host).await?;
        Ok(EngineReplica {
            name: t.name.clone(),
            traddr: tn.address.clone(),
            trsvcid: st["status"]["trsvcid"]
                .as_str()
                .unwrap_or("4420")
                .to_string(),
        })
    }

    async fn finish(&self, v: &Volume, t: &Replica, info: &RebuildInfo) -> Result<(), OpError> {
        let secs = now_secs().saturating_sub(info.started);
        self.update_replica(&t.name, |r| {
            r.state = ReplicaState::Healthy;
            r.last_in_sync_epoch = v.epoch;
            r.reason = None;
            r.rebuild = None;
        })?;
        self.rebuild_backoff.lock().remove(&v.name);
        self.joined_at.lock().remove(&t.name);
        self.rebuilds_ended.lock().0 += 1;
        self.event(
            "replica",
            &t.name,
            "Rebuilt",
            format!(
                "in sync with {} after {secs} s ({} snapshot(s) copied)",
                v.name,
                info.snapshots.len()
            ),
        );
        if let Some(old) = &info.replaces {
            if let Some(r) = self
                .replicas(Some(&v.name))?
                .into_iter()
                .find(|r| &r.name == old && r.state != ReplicaState::Healthy)
            {
                self.leave_engine(v, &r.name).await;
                self.remove_replica(&r, v.size_bytes).await?;
                self.event(
                    "replica",
                    old,
                    "Replaced",
                    format!("by {} (rebuilt)", t.name),
                );
            }
        }
        Ok(())
    }

    /// Ends the rebuild of `t`: its copy connection and the replica go (what
    /// cannot be reached now is left to orphan collection); the volume waits
    /// a backoff before the next attempt.
    pub(super) async fn abandon(&self, t: &Replica, why: &str) -> Result<(), OpError> {
        warn!(replica = %t.name, why, "rebuild abandoned");
        self.rebuilds_ended.lock().1 += 1;
        if let Some(b) = &t.rebuild {
            let src = self
                .replicas(Some(&t.volume))?
                .into_iter()
                .find(|r| r.name == b.source);
            if let Some(sn) = src.and_then(|s| self.node(&s.node).ok()) {
                let r: Result<Value, OpError> = self
                    .agent(
                        &sn,
                        Method::DELETE,
                        &format!("/v1/rebuilds/{}/connection", t.name),
                        None::<&()>,
                    )
                    .await;
                if let Err(e) = r {
                    warn!(replica = %t.name, "rebuild connection not removed now: {}", e.message);
                }
            }
        }
        self.joined_at.lock().remove(&t.name);
        let joined = t
            .rebuild
            .as_ref()
            .is_some_and(|b| matches!(b.phase, RebuildPhase::Join | RebuildPhase::SyncHead));
        if joined {
            if let Ok(v) = self.volume(&t.volume) {
                self.leave_engine(&v, &t.name).await;
            }
        }
        let size = self.volume(&t.volume).map(|v| v.size_bytes).unwrap_or(0);
        self.remove_replica(t, size).await?;
        let mut g = self.rebuild_backoff.lock();
        let b = g.entry(t.volume.clone()).or_insert_with(|| {
            (
                Backoff::new(Duration::from_secs(2), Duration::from_secs(300)),
                Instant::now(),
            )
        });
        let wait = b.0.next_delay();
        b.1 = Instant::now() + wait;
        drop(g);
        self.event(
            "replica",
            &t.name,
            "RebuildFailed",
            format!("{why}; next attempt in {} s", wait.as_secs()),
        );
        Ok(())
    }

    /// Takes replica `replica` out of `v`'s engine, if it has one (best
    /// effort: what stays is an engine controller whose replica is gone; it
    /// ends with its controller-loss timeout).
    pub(super) async fn leave_engine(&self, v: &Volume, replica: &str) {
        let Some(en) = v.engine_node.as_deref().and_then(|n| self.node(n).ok()) else {
            return;
        };
        let r: Result<Value, OpError> = self
            .agent(
                &en,
                Method::DELETE,
                &format!("/v1/engines/{}/members/{replica}", v.name),
                None::<&()>,
            )
            .await;
        match r {
            Ok(r) => {
                if let Ok(ev) = serde_json::from_value::<Vec<StepEvent>>(r["events"].clone()) {
                    self.emit_steps(&ev);
                }
            }
            Err(e) => warn!(replica, "not taken out of the engine now: {}", e.message),
        }
    }

    /// Deletes replica `r` on its node (left to orphan collection if its node
    /// does not answer) and from the store.
    pub(super) async fn remove_replica(&self, r: &Replica, size: u64) -> Result<(), OpError> {
        if let Ok(node) = self.node(&r.node) {
            let res: Result<Value, OpError> = self
                .agent(
                    &node,
                    Method::DELETE,
                    &format!("/v1/replicas/{}?disk={}", r.name, r.disk),
                    None::<&()>,
                )
                .await;
            match res {
                Ok(v) => {
                    if let Ok(ev) = serde_json::from_value::<Vec<StepEvent>>(v["events"].clone()) {
                        self.emit_steps(&ev);
                    }
                }
                Err(e) => {
                    warn!(replica = %r.name, "replica not deleted now ({}); left for orphan collection", e.message)
                }
            }
        }
        self.store.write(|tx| {
            tx.delete(&rkey(&r.name))?;
            if let Some(mut n) = tx.get::<Node>(&nkey(&r.node))? {
                if let Some(d) = n.disks.iter_mut().find(|d| d.name == r.disk) {
                    d.scheduled_bytes = d.scheduled_bytes.saturating_sub(size);
                }
                tx.put(&nkey(&r.node), &n)?;
            }
            Ok(())
        })?;
        Ok(())
    }
}

/// The sync of the head, as the engine reports its member `t` (`fresh`: the
/// report was asked for after `t` joined, so its absence means something).
fn sync_head(
    t: &Replica,
    (engine, fresh): (&EngineStatus, bool),
    percent: &mut u32,
) -> Option<RebuildEvent> {
    let m = engine.members.iter().find(|m| m.replica == t.name);
    match m.map(|m| m.state.as_str()) {
        None if !fresh => None,
        Some("online") => Some(RebuildEvent::InSync),
        Some("rebuilding") => {
            *percent = m.and_then(|m| m.rebuild_percent).unwrap_or(0);
            None
        }
        other => Some(RebuildEvent::Failed(format!(
            "the engine dropped it ({}{})",
            other.unwrap_or("not a member"),
            m.and_then(|m| m.reason.clone())
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ))),
    }
}

/// The engine host NQN of `v`'s current epoch.
fn engine_host(v: &Volume) -> String {
    naming::engine_hostnqn(&v.name, v.epoch)
}

/// A replica's reason while rebuilding: phase and progress, for `volume show`.
fn progress(p: &RebuildPhase, snapshots: usize, percent: u32, source: &str) -> String {
    match p {
        RebuildPhase::CopySnapshot { index, .. } => format!(
            "rebuilding from {source}: snapshot {}/{snapshots} {percent}%",
            index + 1
        ),
        RebuildPhase::SyncHead => format!("rebuilding from {source}: head {percent}%"),
        p => format!("rebuilding from {source}: {p}"),
    }
}
