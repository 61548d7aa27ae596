//! NVM subsystems: identity, namespaces, host allow-list, listeners, and the
//! controllers connected to them (dynamic model, cntlid allocation).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bdev::BdevRef;
use parking_lot::{Mutex, RwLock};

use super::ctrlr::Controller;
use super::{ListenAddress, TargetError};

/// A namespace: a bdev exposed under an NSID.
#[derive(Clone)]
pub struct Namespace {
    pub nsid: u32,
    pub bdev: BdevRef,
    pub nguid: [u8; 16],
    pub uuid: uuid::Uuid,
    pub read_only: bool,
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespace")
            .field("nsid", &self.nsid)
            .field("bdev", &self.bdev.name())
            .field("uuid", &self.uuid)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// The namespaces of a subsystem, indexed by NSID - 1, replaced as a whole on
/// change so that the I/O path reads it without locking.
#[derive(Debug, Default)]
pub struct NsTable {
    slots: Vec<Option<Arc<Namespace>>>,
}

impl NsTable {
    pub fn get(&self, nsid: u32) -> Option<&Arc<Namespace>> {
        if nsid == 0 {
            return None;
        }
        self.slots.get(nsid as usize - 1).and_then(|s| s.as_ref())
    }
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Namespace>> {
        self.slots.iter().flatten()
    }
    pub fn nsids(&self) -> Vec<u32> {
        self.iter().map(|n| n.nsid).collect()
    }
}

/// Creation parameters of a subsystem (SPDK's nvmf_create_subsystem).
#[derive(Debug, Clone)]
pub struct SubsystemConfig {
    pub nqn: String,
    pub serial_number: String,
    pub model_number: String,
    pub allow_any_host: bool,
    pub min_cntlid: u16,
    pub max_cntlid: u16,
    pub max_namespaces: u32,
}

impl SubsystemConfig {
    pub fn new(nqn: &str) -> Self {
        SubsystemConfig {
            nqn: nqn.into(),
            serial_number: "00000000000000000000".into(),
            model_number: "corral".into(),
            allow_any_host: false,
            min_cntlid: 1,
            max_cntlid: 0xFFEF,
            max_namespaces: 32,
        }
    }
}

#[derive(Debug, Default)]
struct CtrlrTable {
    by_id: BTreeMap<u16, Arc<Controller>>,
    next: u16,
}

/// An NVM subsystem (or the discovery subsystem).
#[derive(Debug)]
pub struct Subsystem {
    pub nqn: String,
    pub serial_number: String,
    pub model_number: String,
    pub min_cntlid: u16,
    pub max_cntlid: u16,
    pub max_namespaces: u32,
    pub is_discovery: bool,
    allow_any_host: AtomicBool,
    hosts: RwLock<BTreeSet<String>>,
    ns: ArcSwap<NsTable>,
    listeners: RwLock<Vec<ListenAddress>>,
    ctrlrs: Mutex<CtrlrTable>,
    /// Serialises namespace changes (readers use the ArcSwap).
    ns_write: Mutex<()>,
}

impl Subsystem {
    pub fn new(cfg: SubsystemConfig, is_discovery: bool) -> Result<Self, TargetError> {
        validate_nqn(&cfg.nqn)?;
        if cfg.min_cntlid == 0 || cfg.min_cntlid > cfg.max_cntlid || cfg.max_cntlid > 0xFFEF {
            return Err(TargetError::InvalidCntlidRange {
                nqn: cfg.nqn,
                min: cfg.min_cntlid,
                max: cfg.max_cntlid,
            });
        }
        if cfg.serial_number.len() > 20 || !cfg.serial_number.is_ascii() {
            return Err(TargetError::InvalidParam {
                what: "serial_number",
                why: "must be at most 20 ASCII characters".into(),
            });
        }
        if cfg.model_number.len() > 40 || !cfg.model_number.is_ascii() {
            return Err(TargetError::InvalidParam {
                what: "model_number",
                why: "must be at most 40 ASCII characters".into(),
            });
        }
        Ok(Subsystem {
            allow_any_host: AtomicBool::new(cfg.allow_any_host || is_discovery),
            nqn: cfg.nqn,
            serial_number: cfg.serial_number,
            model_number: cfg.model_number,
            min_cntlid: cfg.min_cntlid,
            max_cntlid: cfg.max_cntlid,
            max_namespaces: cfg.max_namespaces.max(1),
            is_discovery,
            hosts: RwLock::new(BTreeSet::new()),
            ns: ArcSwap::from_pointee(NsTable::default()),
            listeners: RwLock::new(Vec::new()),
            ctrlrs: Mutex::new(CtrlrTable {
                by_id: BTreeMap::new(),
                next: cfg.min_cntlid,
            }),
            ns_write: Mutex::new(()),
        })
    }

    // ---- host allow-list ----

    pub fn allow_any_host(&self) -> bool {
        self.allow_any_host.load(Ordering::SeqCst)
    }
    pub fn set_allow_any_host(&self, v: bool) {
        self.allow_any_host.store(v, Ordering::SeqCst);
        if !v {
            self.disconnect_disallowed_hosts();
        }
    }
    pub fn hosts(&self) -> Vec<String> {
        self.hosts.read().iter().cloned().collect()
    }
    pub fn add_host(&self, hostnqn: &str) -> Result<(), TargetError> {
        validate_nqn(hostnqn)?;
        if !self.hosts.write().insert(hostnqn.to_string()) {
            return Err(TargetError::HostExists {
                nqn: self.nqn.clone(),
                host: hostnqn.into(),
            });
        }
        Ok(())
    }
    /// Removes a host from the allow-list and disconnects its controllers (as SPDK does).
    pub fn remove_host(&self, hostnqn: &str) -> Result<(), TargetError> {
        if !self.hosts.write().remove(hostnqn) {
            return Err(TargetError::NoSuchHost {
                nqn: self.nqn.clone(),
                host: hostnqn.into(),
            });
        }
        self.disconnect_disallowed_hosts();
        Ok(())
    }
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host() || self.hosts.read().contains(hostnqn)
    }
    fn disconnect_disallowed_hosts(&self) {
        for c in self.controllers() {
            if !self.host_allowed(&c.hostnqn) {
                c.fail("host removed from the subsystem's allow list");
            }
        }
    }

    // ---- listeners ----

    pub fn listeners(&self) -> Vec<ListenAddress> {
        self.listeners.read().clone()
    }
    pub(crate) fn add_listener(&self, a: ListenAddress) -> Result<(), TargetError> {
        let mut l = self.listeners.write();
        if l.contains(&a) {
            return Err(TargetError::ListenerExists {
                nqn: self.nqn.clone(),
                addr: a.to_string(),
            });
        }
        l.push(a);
        Ok(())
    }
    pub(crate) fn remove_listener(&self, a: &ListenAddress) -> Result<(), TargetError> {
        let mut l = self.listeners.write();
        let before = l.len();
        l.retain(|x| x != a);
        if l.len() == before {
            return Err(TargetError::NoSuchListener {
                nqn: self.nqn.clone(),
                addr: a.to_string(),
            });
        }
        Ok(())
    }
    /// Whether a host that reached the target through `a` may connect here.
    pub fn listens_on(&self, a: &ListenAddress) -> bool {
        self.is_discovery || self.listeners.read().iter().any(|l| l.matches(a))
    }

    // ---- namespaces ----

    /// A snapshot of the namespace table (lock-free).
    pub fn namespaces(&self) -> Arc<NsTable> {
        self.ns.load_full()
    }

    /// Adds a namespace; `nsid` None picks the lowest free one. Returns the NSID.
    pub fn add_namespace(
        &self,
        bdev: BdevRef,
        nsid: Option<u32>,
        nguid: Option<[u8; 16]>,
        uuid: Option<uuid::Uuid>,
        read_only: bool,
    ) -> Result<u32, TargetError> {
        if self.is_discovery {
            return Err(TargetError::InvalidParam {
                what: "nqn",
                why: "the discovery subsystem has no namespaces".into(),
            });
        }
        let _w = self.ns_write.lock();
        let cur = self.ns.load();
        if let Some(n) = cur.iter().find(|n| n.bdev.name() == bdev.name()) {
            return Err(TargetError::BdevInUse {
                nqn: self.nqn.clone(),
                bdev: bdev.name().into(),
                nsid: n.nsid,
            });
        }
        let nsid = match nsid {
            Some(0) | None => (1..=self.max_namespaces)
                .find(|n| cur.get(*n).is_none())
                .ok_or(TargetError::TooManyNamespaces {
                    nqn: self.nqn.clone(),
                })?,
            Some(n) if n > self.max_namespaces || n == 0xFFFF_FFFF => {
                return Err(TargetError::InvalidNsid {
                    nqn: self.nqn.clone(),
                    nsid: n,
                })
            }
            Some(n) => {
                if cur.get(n).is_some() {
                    return Err(TargetError::NamespaceExists {
                        nqn: self.nqn.clone(),
                        nsid: n,
                    });
                }
                n
            }
        };
        let uuid = uuid.unwrap_or_else(|| bdev.uuid());
        let nguid = nguid.unwrap_or(*uuid.as_bytes());
        let mut slots = cur.slots.clone();
        if slots.len() < nsid as usize {
            slots.resize(nsid as usize, None);
        }
        slots[nsid as usize - 1] = Some(Arc::new(Namespace {
            nsid,
            bdev,
            nguid,
            uuid,
            read_only,
        }));
        self.ns.store(Arc::new(NsTable { slots }));
        drop(_w);
        self.notify_ns_changed(nsid);
        Ok(nsid)
    }

    /// Removes a namespace. I/O already submitted to its bdev completes normally.
    pub fn remove_namespace(&self, nsid: u32) -> Result<Arc<Namespace>, TargetError> {
        let _w = self.ns_write.lock();
        let cur = self.ns.load();
        let ns = cur.get(nsid).cloned().ok_or(TargetError::NoSuchNamespace {
            nqn: self.nqn.clone(),
            nsid,
        })?;
        let mut slots = cur.slots.clone();
        slots[nsid as usize - 1] = None;
        while matches!(slots.last(), Some(None)) {
            slots.pop();
        }
        self.ns.store(Arc::new(NsTable { slots }));
        drop(_w);
        self.notify_ns_changed(nsid);
        Ok(ns)
    }

    fn notify_ns_changed(&self, nsid: u32) {
        for c in self.controllers() {
            c.push_ns_changed(nsid);
        }
    }

    // ---- controllers ----

    /// Allocates a cntlid in [min_cntlid, max_cntlid] and registers a new controller.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create_controller(
        &self,
        hostnqn: &str,
        hostid: [u8; 16],
        kato_ms: u32,
        max_io_queues: u16,
        now: Instant,
    ) -> Option<Arc<Controller>> {
        let mut t = self.ctrlrs.lock();
        let span = (self.max_cntlid - self.min_cntlid) as u32 + 1;
        for _ in 0..span {
            let id = t.next;
            t.next = if id >= self.max_cntlid {
                self.min_cntlid
            } else {
                id + 1
            };
            if let std::collections::btree_map::Entry::Vacant(slot) = t.by_id.entry(id) {
                let c = Controller::new(
                    id,
                    &self.nqn,
                    hostnqn,
                    hostid,
                    self.is_discovery,
                    kato_ms,
                    max_io_queues,
                    now,
                );
                slot.insert(c.clone());
                return Some(c);
            }
        }
        None
    }

    pub fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.ctrlrs.lock().by_id.get(&cntlid).cloned()
    }

    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        self.ctrlrs.lock().by_id.values().cloned().collect()
    }

    /// Unregisters a controller (its admin queue is gone).
    pub(crate) fn remove_controller(&self, cntlid: u16) {
        if let Some(c) = self.ctrlrs.lock().by_id.remove(&cntlid) {
            c.gone.store(true, Ordering::SeqCst);
        }
    }

    /// Closes every controller (subsystem being deleted).
    pub(crate) fn disconnect_all(&self, reason: &str) {
        for c in self.controllers() {
            c.fail(reason);
        }
    }
}

/// Checks an NQN as SPDK does: at most 223 bytes, and either the UUID form
/// `nqn.2014-08.org.nvmexpress:uuid:<uuid>` or `nqn.yyyy-mm.<reverse domain>[:...]`.
pub fn validate_nqn(nqn: &str) -> Result<(), TargetError> {
    let bad = |why: &str| TargetError::InvalidNqn {
        nqn: nqn.into(),
        why: why.into(),
    };
    if nqn.len() > 223 {
        return Err(bad("longer than 223 bytes"));
    }
    if nqn == nvme_wire::DISCOVERY_NQN {
        return Ok(());
    }
    if let Some(u) = nqn.strip_prefix("nqn.2014-08.org.nvmexpress:uuid:") {
        return uuid::Uuid::parse_str(u)
            .map(|_| ())
            .map_err(|_| bad("invalid UUID"));
    }
    let rest = nqn
        .strip_prefix("nqn.")
        .ok_or_else(|| bad("must start with \"nqn.\""))?;
    let b = rest.as_bytes();
    let date_ok = b.len() > 8
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'.';
    if !date_ok {
        return Err(bad("expected nqn.yyyy-mm.<reverse domain>"));
    }
    let domain = rest[8..].split(':').next().unwrap_or("");
    if domain.is_empty()
        || !domain
            .bytes()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
    {
        return Err(bad("reverse domain must start with a letter"));
    }
    if !nqn.is_ascii() {
        return Err(bad("must be ASCII"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nqn_validation() {
        assert!(validate_nqn("nqn.2016-06.io.spdk:cnode1").is_ok());
        assert!(validate_nqn(
            "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
        )
        .is_ok());
        assert!(validate_nqn(nvme_wire::DISCOVERY_NQN).is_ok());
        assert!(validate_nqn("iqn.2016-06.io.spdk:x").is_err());
        assert!(validate_nqn("nqn.16-06.io.spdk:x").is_err());
        assert!(validate_nqn("nqn.2016-06.").is_err());
        assert!(validate_nqn(&format!("nqn.2016-06.io.x:{}", "a".repeat(300))).is_err());
    }

    #[test]
    fn namespaces_and_cntlids() {
        let mut cfg = SubsystemConfig::new("nqn.2024-01.io.corral:t");
        cfg.min_cntlid = 5;
        cfg.max_cntlid = 6;
        let s = Subsystem::new(cfg, false).unwrap();
        let b: BdevRef = Arc::new(bdev::malloc::MallocBdev::new("m", 8, 512, None).unwrap());
        assert_eq!(
            s.add_namespace(b.clone(), None, None, None, false).unwrap(),
            1
        );
        assert!(matches!(
            s.add_namespace(b.clone(), None, None, None, false),
            Err(TargetError::BdevInUse { .. })
        ));
        assert_eq!(s.namespaces().nsids(), vec![1]);
        s.remove_namespace(1).unwrap();
        assert!(s.namespaces().get(1).is_none());
        assert!(s.remove_namespace(1).is_err());
        let now = Instant::now();
        let a = s.create_controller("h", [0; 16], 0, 4, now).unwrap();
        let b2 = s.create_controller("h", [0; 16], 0, 4, now).unwrap();
        assert_eq!((a.cntlid, b2.cntlid), (5, 6));
        assert!(s.create_controller("h", [0; 16], 0, 4, now).is_none());
        s.remove_controller(5);
        assert_eq!(
            s.create_controller("h", [0; 16], 0, 4, now).unwrap().cntlid,
            5
        );
    }
}
