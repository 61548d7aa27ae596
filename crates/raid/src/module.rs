//! [`RaidModule`]: the raid bdevs of a dataplane, with one method per SPDK RPC.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bdev::registry::{BdevRegistry, Claim, RegistryError, Tracked};
use bdev::{Bdev, IoKind};
use parking_lot::Mutex;
use serde::Deserialize;

use crate::error::RaidError;
use crate::extents::normalize_ranges;
use crate::persist::Persister;
use crate::raid1::{kind_index, Cause, Core, CoreIdentity, CoreInit, SlotInfo, MAX_MEMBERS};
use crate::rebuild::{self, Rebuild};
use crate::record::{now_ms, DirStore, MemberRecord, RaidRecord, RecordedState, StateStore};
use crate::state::{Departure, LeaveKind, MemberState, RaidState};
use crate::status::RaidStatus;
use crate::{Raid1, RaidOpts};

/// Longest raid name SPDK accepts (`RAID_BDEV_SB_NAME_SIZE - 1`).
pub const MAX_NAME_LEN: usize = 63;

/// Parameters of `bdev_raid_create`, with SPDK's names (deserializable
/// straight from the RPC's params).
#[derive(Debug, Clone, Deserialize)]
pub struct CreateParams {
    pub name: String,
    /// `"raid1"` (or `"1"`); other levels are refused with -EINVAL.
    pub raid_level: String,
    /// Must be 0 for raid1 (SPDK: "Strip size is not supported by raid1").
    #[serde(default)]
    pub strip_size_kb: u32,
    pub base_bdevs: Vec<String>,
    /// The raid's UUID. With a record in the state dir: the same UUID (or none)
    /// continues that raid; another UUID starts a new one and replaces the record.
    #[serde(default)]
    pub uuid: Option<uuid::Uuid>,
    /// SPDK's on-disk superblock: not supported (corral records membership in
    /// the state dir); `true` is refused with -EINVAL.
    #[serde(default)]
    pub superblock: bool,
}

impl CreateParams {
    /// A raid1 over `base_bdevs`.
    pub fn raid1(name: &str, base_bdevs: &[&str]) -> CreateParams {
        CreateParams {
            name: name.into(),
            raid_level: "raid1".into(),
            strip_size_kb: 0,
            base_bdevs: base_bdevs.iter().map(|s| s.to_string()).collect(),
            uuid: None,
            superblock: false,
        }
    }
}

/// Options of [`RaidModule::add_base_bdev_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddOptions {
    /// corral extension (`corral_rebuild_ranges`): copy only these
    /// `(offset_blocks, num_blocks)` ranges, in raid blocks, because the new
    /// member already holds the raid's data everywhere else (e.g. it received
    /// the snapshot chain, and these are the ranges allocated in a healthy
    /// replica's head while the raid was quiesced). Any order, overlaps and
    /// neighbours allowed; they are normalised with
    /// [`crate::extents::normalize_ranges`]. `None` copies the whole device;
    /// `Some(vec![])` copies nothing. Wrong ranges here silently leave the
    /// member different from the others: the raid cannot check the claim.
    pub rebuild_ranges: Option<Vec<(u64, u64)>>,
}

impl AddOptions {
    /// Rebuild only `ranges` (see [`AddOptions::rebuild_ranges`]).
    pub fn ranges(ranges: Vec<(u64, u64)>) -> AddOptions {
        AddOptions {
            rebuild_ranges: Some(ranges),
        }
    }
}

/// The raid bdevs of one dataplane. Every raid records its membership under
/// the state dir; see [`crate::record`].
pub struct RaidModule {
    registry: Arc<BdevRegistry>,
    store: Arc<dyn StateStore>,
    opts: RaidOpts,
    raids: Mutex<BTreeMap<String, Arc<Raid1>>>,
    /// Names with a create or delete under way.
    busy: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for RaidModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaidModule")
            .field("raids", &self.raids.lock().keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Removes a name from `busy` when dropped.
struct BusyGuard<'a> {
    busy: &'a Mutex<BTreeSet<String>>,
    name: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.busy.lock().remove(&self.name);
    }
}

fn claim_error(raid: &str, base: &str, e: RegistryError) -> RaidError {
    match e {
        RegistryError::Claimed { holder, .. } => RaidError::Claimed {
            raid: raid.into(),
            base: base.into(),
            holder,
        },
        _ => RaidError::BaseNotFound {
            raid: raid.into(),
            base: base.into(),
        },
    }
}

impl RaidModule {
    /// The raid module of a dataplane whose state dir is `state_dir` (records
    /// go to `<state_dir>/raid/`).
    pub fn new(
        registry: Arc<BdevRegistry>,
        state_dir: impl AsRef<Path>,
        opts: RaidOpts,
    ) -> std::io::Result<Arc<RaidModule>> {
        Ok(Self::with_store(
            registry,
            Arc::new(DirStore::new(state_dir)?),
            opts,
        ))
    }

    /// The same with another record store (tests wrap [`DirStore`]).
    pub fn with_store(
        registry: Arc<BdevRegistry>,
        store: Arc<dyn StateStore>,
        opts: RaidOpts,
    ) -> Arc<RaidModule> {
        Arc::new(RaidModule {
            registry,
            store,
            opts,
            raids: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn registry(&self) -> &Arc<BdevRegistry> {
        &self.registry
    }

    /// The raid named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Raid1>> {
        self.raids.lock().get(name).cloned()
    }

    /// `bdev_raid_create`. Claims the in-sync members, records the membership
    /// durably, registers the raid bdev. With a record of the same raid in the
    /// state dir (same name, same or no UUID), members the record does not
    /// show in sync are kept out (status `out_of_sync`) until added back with
    /// [`RaidModule::add_base_bdev`]; at least one given member must be in sync.
    ///
    /// Errors: -EINVAL for bad parameters, -EEXIST if the name is taken,
    /// -ENODEV for a missing base bdev, -EPERM for a base bdev claimed
    /// elsewhere, -EIO if the record cannot be read or written.
    pub async fn create(&self, p: CreateParams) -> Result<Arc<Raid1>, RaidError> {
        validate(&p)?;
        let name = p.name.clone();
        {
            let raids = self.raids.lock();
            let mut busy = self.busy.lock();
            if raids.contains_key(&name) || busy.contains(&name) {
                return Err(RaidError::Exists { name });
            }
            busy.insert(name.clone());
        }
        let _busy = BusyGuard {
            busy: &self.busy,
            name: name.clone(),
        };
        if self.registry.get(&name).is_some() {
            return Err(RaidError::Exists { name });
        }
        let record_err = |why: String| RaidError::Record {
            raid: name.clone(),
            why,
        };
        let mut rec = self
            .store
            .load(&name)
            .map_err(|e| record_err(e.to_string()))?;
        if let (Some(r), Some(u)) = (&rec, p.uuid) {
            if r.uuid != u {
                tracing::warn!(raid = %name, old = %r.uuid, new = %u,
                    "a record of another raid with this name exists; it is replaced");
                rec = None;
            }
        }
        let uuid = p
            .uuid
            .or(rec.as_ref().map(|r| r.uuid))
            .unwrap_or_else(uuid::Uuid::new_v4);

        // Resolve the members and decide who is in sync.
        struct Cand {
            name: String,
            bdev: Arc<Tracked>,
            in_sync: Result<(), (String, u64)>,
        }
        let mut cands: Vec<Cand> = Vec::new();
        for b in &p.base_bdevs {
            let canon = self
                .registry
                .canonical(b)
                .ok_or_else(|| RaidError::BaseNotFound {
                    raid: name.clone(),
                    base: b.clone(),
                })?;
            if cands.iter().any(|c| c.name == canon) {
                return Err(RaidError::Claimed {
                    raid: name.clone(),
                    base: canon,
                    holder: format!("raid {name}"),
                });
            }
            let bdev = self
                .registry
                .get(&canon)
                .ok_or_else(|| RaidError::BaseNotFound {
                    raid: name.clone(),
                    base: b.clone(),
                })?;
            let in_sync = match &rec {
                None => Ok(()),
                Some(r) => judge(r, &canon, bdev.uuid()),
            };
            cands.push(Cand {
                name: canon,
                bdev,
                in_sync,
            });
        }
        let synced: Vec<&Cand> = cands.iter().filter(|c| c.in_sync.is_ok()).collect();
        if synced.is_empty() {
            let why = cands
                .iter()
                .map(|c| {
                    format!(
                        "{}: {}",
                        c.name,
                        c.in_sync.as_ref().err().map_or("", |e| e.0.as_str())
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(RaidError::invalid(
                "base_bdevs",
                format!("no member holds the data of raid {name} per its record ({why}); add them back to rebuild, or create the raid with another UUID"),
            ));
        }
        let block_size = synced[0].bdev.block_size();
        if let Some(c) = synced.iter().find(|c| c.bdev.block_size() != block_size) {
            return Err(RaidError::invalid(
                "base_bdevs",
                format!(
                    "raid bdev '{name}' blocklen {block_size} differs from base bdev '{}' blocklen {}",
                    c.name,
                    c.bdev.block_size()
                ),
            ));
        }
        let num_blocks = synced
            .iter()
            .map(|c| c.bdev.num_blocks())
            .min()
            .unwrap_or(0);
        if num_blocks == 0 {
            return Err(RaidError::invalid(
                "base_bdevs",
                "a base bdev has no blocks",
            ));
        }
        let mut supported = [false; 5];
        for k in IoKind::ALL {
            supported[kind_index(k)] = synced.iter().all(|c| c.bdev.supports(k));
        }
        if !supported[kind_index(IoKind::Read)] || !supported[kind_index(IoKind::Write)] {
            return Err(RaidError::invalid(
                "base_bdevs",
                "every base bdev must support read and write",
            ));
        }
        let write_cache = synced.iter().any(|c| c.bdev.write_cache());

        // Claim the in-sync members.
        let cell: Arc<OnceLock<Weak<Core>>> = Arc::new(OnceLock::new());
        let holder = format!("raid {name}");
        let mut claimed: Vec<String> = Vec::new();
        for c in &synced {
            if let Err(e) = self.registry.claim(&c.name, self.claim(&holder, &cell)) {
                for n in &claimed {
                    let _ = self.registry.release(n, &holder);
                }
                return Err(claim_error(&name, &c.name, e));
            }
            claimed.push(c.name.clone());
        }
        let release_all = || {
            for n in &claimed {
                let _ = self.registry.release(n, &holder);
            }
        };

        // Slots: in-sync members online, the others kept out.
        let now = now_ms();
        let mut slots = Vec::new();
        for (i, c) in cands.iter().enumerate() {
            let mut s = SlotInfo::empty();
            s.name = Some(c.name.clone());
            s.uuid = Some(c.bdev.uuid());
            s.gen = i as u64 + 1;
            let next = match &c.in_sync {
                Ok(()) => {
                    s.num_blocks = c.bdev.num_blocks();
                    s.bdev = Some(c.bdev.clone());
                    s.since_ms = now;
                    MemberState::Online
                }
                Err((why, since)) => {
                    s.since_ms = *since;
                    MemberState::Removed(Departure {
                        kind: LeaveKind::OutOfSync,
                        reason: why.clone(),
                        at_ms: *since,
                    })
                }
            };
            if let Err(e) = s.state.move_to(next) {
                release_all();
                return Err(RaidError::invalid("base_bdevs", e.to_string()));
            }
            slots.push(s);
        }
        // Recorded members not given now keep (or get) an out-of-sync record.
        let mut departed = Vec::new();
        if let Some(r) = &rec {
            for m in &r.members {
                if cands.iter().any(|c| c.name == m.name) {
                    continue;
                }
                let mut m = m.clone();
                m.slot = None;
                if m.state == RecordedState::Online {
                    m.state = RecordedState::OutOfSync;
                    m.since_ms = now;
                    m.reason = Some("not included when the raid was created again".into());
                }
                departed.push(m);
            }
        }
        let prev_version = rec.as_ref().map_or(0, |r| r.generation);
        let persister = match Persister::start(&name, self.store.clone(), prev_version) {
            Ok(p) => p,
            Err(e) => {
                release_all();
                return Err(record_err(format!("cannot start the persist thread: {e}")));
            }
        };
        let core = Core::new(CoreInit {
            id: CoreIdentity {
                name: name.clone(),
                uuid,
                block_size,
                num_blocks,
                supported,
                write_cache,
            },
            opts: self.opts.clone(),
            slots,
            departed,
            prev_version,
            persister,
            registry: self.registry.clone(),
            rt: tokio::runtime::Handle::current(),
        });
        let _ = cell.set(Arc::downgrade(&core));
        let version = {
            let mut ctl = core.ctl.lock();
            ctl.version += 1;
            if let Err(e) = ctl.state.move_to(RaidState::Online) {
                tracing::error!(raid = %name, error = %e, "refused raid state change");
            }
            core.persist_locked(&ctl);
            ctl.version
        };
        if let Err(why) = core.persister.wait(version).await {
            core.stop_io();
            release_all();
            stop_persister(&core).await;
            return Err(record_err(why));
        }
        {
            let ctl = core.ctl.lock();
            core.publish_mask(&ctl);
        }
        let raid = Arc::new(Raid1 { core: core.clone() });
        if let Err(e) = self.registry.register(raid.clone(), &[]) {
            core.stop_io();
            release_all();
            stop_persister(&core).await;
            return Err(match e {
                RegistryError::Exists { .. } => RaidError::Exists { name },
                other => RaidError::invalid("name", other.to_string()),
            });
        }
        self.raids.lock().insert(name.clone(), raid.clone());
        let st = raid.status();
        tracing::info!(raid = %name, %uuid, blocks = num_blocks, block_size,
            in_sync = st.num_base_bdevs_in_sync, slots = st.num_base_bdevs, "raid1 created");
        Ok(raid)
    }

    fn claim(&self, holder: &str, cell: &Arc<OnceLock<Weak<Core>>>) -> Claim {
        let cell = cell.clone();
        Claim {
            holder: holder.to_string(),
            module: "raid",
            on_remove: Some(Arc::new(move |bdev: &str| {
                if let Some(core) = cell.get().and_then(|w| w.upgrade()) {
                    core.on_hot_remove(bdev);
                }
            })),
        }
    }

    /// `bdev_raid_delete`: stops I/O, hot-removes the raid bdev from the
    /// registry (its consumers are told), waits (bounded) for member I/O to
    /// drain, releases the members and keeps the record (so members recorded
    /// out of sync stay out if the raid is created again). -ENODEV if unknown.
    pub async fn delete(&self, name: &str) -> Result<(), RaidError> {
        let raid = {
            let mut raids = self.raids.lock();
            let r = raids
                .remove(name)
                .ok_or_else(|| RaidError::NotFound { name: name.into() })?;
            self.busy.lock().insert(name.to_string());
            r
        };
        let _busy = BusyGuard {
            busy: &self.busy,
            name: name.to_string(),
        };
        let core = raid.core.clone();
        core.stop_io();
        if let Some(t) = self.registry.get(name) {
            let ours = std::ptr::eq(
                Arc::as_ptr(t.inner()) as *const (),
                Arc::as_ptr(&raid) as *const (),
            );
            if ours {
                self.registry.hot_remove(name);
            }
        }
        let rb = core.ctl.lock().rebuild.clone();
        if let Some(rb) = rb {
            let mut rx = rb.finished.subscribe();
            let _ =
                tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|r| r.is_some())).await;
        }
        if !core.wait_idle(self.opts.drain_timeout).await {
            tracing::warn!(raid = %name, "member I/O still in flight at delete; releasing anyway");
        }
        let (held, version): (Vec<String>, u64) = {
            let mut ctl = core.ctl.lock();
            let mut names = Vec::new();
            for (i, s) in ctl.slots.iter_mut().enumerate() {
                if s.bdev.take().is_some() {
                    if let Some(n) = &s.name {
                        names.push(n.clone());
                    }
                }
                *core.members[i].bdev.write() = None;
            }
            (names, ctl.version)
        };
        for n in held {
            let _ = self.registry.release(&n, &core.holder);
        }
        let r = tokio::time::timeout(Duration::from_secs(10), core.persister.wait(version)).await;
        stop_persister(&core).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                tracing::warn!(raid = %name, %why, "last membership change not recorded")
            }
            Err(_) => {
                tracing::warn!(raid = %name, "timed out recording the last membership change")
            }
        }
        tracing::info!(raid = %name, "raid1 deleted");
        Ok(())
    }

    /// `bdev_raid_get_bdevs {category}`: `all`, `online`, `configuring` or
    /// `offline` (anything else: -EINVAL).
    pub fn get_bdevs(&self, category: &str) -> Result<Vec<RaidStatus>, RaidError> {
        let want = match category {
            "all" => None,
            c => Some(RaidState::parse(c).ok_or_else(|| {
                RaidError::invalid(
                    "category",
                    format!("{c}: expected all, online, configuring or offline"),
                )
            })?),
        };
        let raids: Vec<Arc<Raid1>> = self.raids.lock().values().cloned().collect();
        Ok(raids
            .iter()
            .map(|r| r.status())
            .filter(|s| want.is_none_or(|w| s.state == w))
            .collect())
    }

    /// `bdev_raid_add_base_bdev {raid_bdev, base_bdev}`: the new member takes
    /// every write from now on and is filled in the background; it serves reads
    /// once the rebuild is complete and recorded. Returns when the rebuild has
    /// started (see [`Raid1::wait_rebuild`]).
    ///
    /// Errors: -ENODEV (unknown raid or base bdev), -EPERM (a rebuild is
    /// running, or the base bdev is claimed), -EINVAL (raid not online, block
    /// size or size or I/O types do not fit, no slot left), -EIO (record).
    pub async fn add_base_bdev(&self, raid_bdev: &str, base_bdev: &str) -> Result<(), RaidError> {
        self.add_base_bdev_with(raid_bdev, base_bdev, AddOptions::default())
            .await
    }

    /// [`RaidModule::add_base_bdev`] with options. With
    /// [`AddOptions::rebuild_ranges`] the rebuild copies only those ranges
    /// (normalised; `blocks_total` of the rebuild status is their sum);
    /// everything else is as for a whole-device rebuild: writes reach the
    /// member from now on, copies run under range locks and the bandwidth
    /// limit, the member is recorded `rebuilding` before it sees a write and
    /// `online` before it serves a read. An empty list copies nothing: the
    /// rebuild ends as soon as the `online` record is durable.
    ///
    /// Errors as [`RaidModule::add_base_bdev`], plus -EINVAL for a range of
    /// zero blocks or one that ends past the raid (nothing is changed then).
    pub async fn add_base_bdev_with(
        &self,
        raid_bdev: &str,
        base_bdev: &str,
        opts: AddOptions,
    ) -> Result<(), RaidError> {
        let raid = self.get(raid_bdev).ok_or_else(|| RaidError::NotFound {
            name: raid_bdev.into(),
        })?;
        let core = raid.core.clone();
        let rname = core.id.name.clone();
        let ranges = match &opts.rebuild_ranges {
            None => None,
            Some(r) => Some(normalize_ranges(r, core.id.num_blocks).map_err(|e| {
                RaidError::invalid("corral_rebuild_ranges", format!("raid bdev '{rname}': {e}"))
            })?),
        };
        let base = self
            .registry
            .canonical(base_bdev)
            .ok_or_else(|| RaidError::BaseNotFound {
                raid: rname.clone(),
                base: base_bdev.into(),
            })?;
        let bdev = self
            .registry
            .get(&base)
            .ok_or_else(|| RaidError::BaseNotFound {
                raid: rname.clone(),
                base: base.clone(),
            })?;
        let check = |ctl: &crate::raid1::Ctl| -> Result<(), RaidError> {
            if ctl.state != RaidState::Online {
                return Err(RaidError::invalid(
                    "raid_bdev",
                    format!("raid bdev '{rname}' must be in online state to attach base bdev"),
                ));
            }
            if let Some(rb) = &ctl.rebuild {
                return Err(RaidError::RebuildRunning {
                    raid: rname.clone(),
                    target: rb.target.clone(),
                });
            }
            if !ctl.slots.iter().any(|s| s.state.is_free()) && ctl.slots.len() >= MAX_MEMBERS {
                return Err(RaidError::invalid(
                    "raid_bdev",
                    format!(
                        "no empty slot found in raid bdev '{rname}' for new base bdev '{base}'"
                    ),
                ));
            }
            Ok(())
        };
        check(&core.ctl.lock())?;
        if bdev.block_size() != core.id.block_size {
            return Err(RaidError::invalid(
                "base_bdev",
                format!(
                    "raid bdev '{rname}' blocklen {} differs from base bdev '{base}' blocklen {}",
                    core.id.block_size,
                    bdev.block_size()
                ),
            ));
        }
        if bdev.num_blocks() < core.id.num_blocks {
            return Err(RaidError::invalid(
                "base_bdev",
                format!(
                    "base bdev '{base}' has {} blocks, raid bdev '{rname}' needs {}",
                    bdev.num_blocks(),
                    core.id.num_blocks
                ),
            ));
        }
        if let Some(k) = IoKind::ALL
            .into_iter()
            .find(|k| core.supports(*k) && !bdev.supports(*k))
        {
            return Err(RaidError::invalid(
                "base_bdev",
                format!(
                    "base bdev '{base}' does not support {}, which raid bdev '{rname}' offers",
                    k.spdk_name()
                ),
            ));
        }
        let cell: Arc<OnceLock<Weak<Core>>> = Arc::new(OnceLock::new());
        let _ = cell.set(Arc::downgrade(&core));
        self.registry
            .claim(&base, self.claim(&core.holder, &cell))
            .map_err(|e| claim_error(&rname, &base, e))?;
        let release = || {
            let _ = self.registry.release(&base, &core.holder);
        };

        let (rb, version) = {
            let mut ctl = core.ctl.lock();
            if let Err(e) = check(&ctl) {
                drop(ctl);
                release();
                return Err(e);
            }
            let free = ctl
                .slots
                .iter()
                .position(|s| s.state.is_free() && s.name.as_deref() == Some(base.as_str()))
                .or_else(|| ctl.slots.iter().position(|s| s.state.is_free()));
            let i = match free {
                Some(i) => i,
                None => {
                    ctl.slots.push(SlotInfo::empty());
                    ctl.slots.len() - 1
                }
            };
            // The slot's previous member stays recorded out of sync.
            let old = ctl
                .record(&core.id)
                .members
                .into_iter()
                .find(|m| m.slot == Some(i as u32));
            if let Some(old) = old {
                if old.name != base && old.state != RecordedState::Online {
                    ctl.departed.retain(|d| d.name != old.name);
                    ctl.departed.push(MemberRecord { slot: None, ..old });
                }
            }
            ctl.departed.retain(|d| d.name != base);
            let gen = ctl.next_gen;
            ctl.next_gen += 1;
            let now = now_ms();
            let s = &mut ctl.slots[i];
            if let Err(e) = s.state.move_to(MemberState::Rebuilding) {
                drop(ctl);
                release();
                return Err(RaidError::invalid("base_bdev", e.to_string()));
            }
            s.name = Some(base.clone());
            s.uuid = Some(bdev.uuid());
            s.num_blocks = bdev.num_blocks();
            s.gen = gen;
            s.since_ms = now;
            s.bdev = Some(bdev.clone());
            *core.members[i].bdev.write() = Some(bdev.clone());
            let rb = Rebuild::new(i, gen, base.clone(), core.id.num_blocks, ranges);
            ctl.rebuild = Some(rb.clone());
            ctl.version += 1;
            core.persist_locked(&ctl);
            (rb, ctl.version)
        };
        // The record says "rebuilding" before the member sees any write.
        if let Err(why) = core.persister.wait(version).await {
            let mut ctl = core.ctl.lock();
            ctl.rebuild = None;
            core.leave_locked(
                &mut ctl,
                rb.slot,
                rb.gen,
                Cause::Rebuild,
                format!("could not record the new member: {why}"),
            );
            return Err(RaidError::Record { raid: rname, why });
        }
        {
            let ctl = core.ctl.lock();
            core.publish_mask(&ctl);
        }
        tracing::info!(raid = %rname, member = %base, slot = rb.slot, blocks = rb.total_blocks,
            ranges = rb.partial.then_some(rb.ranges.len()), "base bdev added; rebuilding");
        core.rt.spawn(rebuild::run(core.clone(), rb, bdev));
        Ok(())
    }

    /// `bdev_raid_remove_base_bdev {name}`: takes the member out of its raid;
    /// returns once that is durable. Removing the last in-sync member takes the
    /// raid offline (as SPDK does). -ENODEV if the bdev is no member of a raid.
    pub async fn remove_base_bdev(&self, name: &str) -> Result<(), RaidError> {
        let canon = self
            .registry
            .canonical(name)
            .unwrap_or_else(|| name.to_string());
        let raids: Vec<Arc<Raid1>> = self.raids.lock().values().cloned().collect();
        let found = raids.iter().find_map(|r| {
            let ctl = r.core.ctl.lock();
            ctl.slots
                .iter()
                .enumerate()
                .find(|(_, s)| s.state.is_writable() && s.name.as_deref() == Some(canon.as_str()))
                .map(|(i, s)| (r.core.clone(), i, s.gen))
        });
        let Some((core, i, gen)) = found else {
            return Err(RaidError::NotAMember { name: name.into() });
        };
        let version = {
            let mut ctl = core.ctl.lock();
            core.leave_locked(
                &mut ctl,
                i,
                gen,
                Cause::Explicit,
                "removed by bdev_raid_remove_base_bdev".into(),
            );
            ctl.version
        };
        core.persister
            .wait(version)
            .await
            .map_err(|why| RaidError::Record {
                raid: core.id.name.clone(),
                why,
            })?;
        let t0 = Instant::now();
        while t0.elapsed() < self.opts.drain_timeout {
            let done = core
                .ctl
                .lock()
                .slots
                .get(i)
                .is_none_or(|s| s.gen != gen || !matches!(s.state, MemberState::Removing(_)));
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Sets the rebuild bandwidth limit of raid `raid` in MiB/s (0 = unlimited);
    /// applies to a running rebuild at once. (corral_raid_set_rebuild_bandwidth)
    pub fn set_rebuild_bandwidth(&self, raid: &str, mib_per_sec: u64) -> Result<(), RaidError> {
        let r = self
            .get(raid)
            .ok_or_else(|| RaidError::NotFound { name: raid.into() })?;
        r.set_rebuild_bandwidth(mib_per_sec);
        Ok(())
    }

    /// The durable record of raid `name` (whether or not it runs).
    pub fn record(&self, name: &str) -> Result<Option<RaidRecord>, RaidError> {
        self.store.load(name).map_err(|e| RaidError::Record {
            raid: name.into(),
            why: e.to_string(),
        })
    }

    /// Deletes the record of a raid that is not running (corral_raid_forget):
    /// after this, creating it again treats every given member as in sync.
    /// -EEXIST if the raid runs.
    pub fn forget(&self, name: &str) -> Result<(), RaidError> {
        if self.raids.lock().contains_key(name) || self.busy.lock().contains(name) {
            return Err(RaidError::Exists { name: name.into() });
        }
        self.store.remove(name).map_err(|e| RaidError::Record {
            raid: name.into(),
            why: e.to_string(),
        })
    }
}

/// Why the record does not show `name` (with `uuid`) in sync, and since when.
fn judge(r: &RaidRecord, name: &str, uuid: uuid::Uuid) -> Result<(), (String, u64)> {
    match r.member(name) {
        None => Err((
            format!("not a recorded member of raid {}", r.name),
            r.updated_at_ms,
        )),
        Some(m) if m.uuid != uuid => Err((
            format!(
                "a different device than the recorded member {name} (uuid {})",
                m.uuid
            ),
            r.updated_at_ms,
        )),
        Some(m) => match m.state {
            RecordedState::Online => Ok(()),
            RecordedState::Rebuilding => Err(("its rebuild did not finish".into(), m.since_ms)),
            RecordedState::OutOfSync => Err((
                m.reason
                    .clone()
                    .unwrap_or_else(|| "recorded out of sync".into()),
                m.since_ms,
            )),
        },
    }
}

fn validate(p: &CreateParams) -> Result<(), RaidError> {
    if p.name.is_empty() {
        return Err(RaidError::invalid("name", "must not be empty"));
    }
    if p.name.len() > MAX_NAME_LEN {
        return Err(RaidError::invalid(
            "name",
            format!(
                "Raid bdev name '{}' exceeds {MAX_NAME_LEN} characters",
                p.name
            ),
        ));
    }
    if !matches!(p.raid_level.to_ascii_lowercase().as_str(), "raid1" | "1") {
        return Err(RaidError::invalid(
            "raid_level",
            format!("{}: only raid1 is supported", p.raid_level),
        ));
    }
    if p.strip_size_kb != 0 {
        return Err(RaidError::invalid(
            "strip_size_kb",
            "Strip size is not supported by raid1",
        ));
    }
    if p.superblock {
        return Err(RaidError::invalid(
            "superblock",
            "not supported: corral records raid membership in the dataplane state dir",
        ));
    }
    if p.base_bdevs.is_empty() {
        return Err(RaidError::invalid(
            "base_bdevs",
            "At least 1 base devices required for raid1",
        ));
    }
    if p.base_bdevs.len() > MAX_MEMBERS {
        return Err(RaidError::invalid(
            "base_bdevs",
            format!("{} base bdevs; at most {MAX_MEMBERS}", p.base_bdevs.len()),
        ));
    }
    if p.base_bdevs.iter().any(|b| b.is_empty()) {
        return Err(RaidError::invalid(
            "base_bdevs",
            "The base bdev name cannot be empty",
        ));
    }
    Ok(())
}

async fn stop_persister(core: &Arc<Core>) {
    if let Some(h) = core.persister.stop() {
        let _ = tokio::task::spawn_blocking(move || h.join()).await;
    }
}
