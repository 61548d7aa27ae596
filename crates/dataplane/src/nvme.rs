//! The nvme bdev module: named NVMe/TCP controllers (SPDK's
//! `bdev_nvme_attach_controller` and friends) whose namespaces become bdevs.
//!
//! The conflict rules of an attach are a pure function ([`check_attach`]) with a
//! test per row of SPDK's table: this is where the seed bug's `-114` comes from,
//! and corral reproduces it exactly so that callers can rely on it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bdev::registry::BdevRegistry;
use bdev::BdevRef;
use nvmf::host::{ControllerOpts, CtrlrState, HostController, NvmeNsBdev};
use nvmf::TransportId;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::rpc::RpcError;

/// How an attach under an existing name is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Multipath {
    /// Never: a second attach under the name fails with -EALREADY (Longhorn's choice).
    Disable,
    /// An alternate path under the same name, used when the active path fails.
    #[default]
    Failover,
    /// SPDK's active-active mode; corral treats it as failover.
    Multipath,
}

/// One network path to a controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathId {
    pub trid: TransportId,
    pub hostnqn: String,
    pub hostaddr: String,
    pub hostsvcid: String,
}

impl PathId {
    /// SPDK's "same network path": address, service and source address/service.
    pub fn same_network_path(&self, o: &PathId) -> bool {
        self.trid.same_path(&o.trid) && self.hostaddr == o.hostaddr && self.hostsvcid == o.hostsvcid
    }
}

/// What an existing controller looks like to the conflict check.
#[derive(Debug, Clone)]
pub struct CtrlrView {
    pub name: String,
    /// Active path first.
    pub paths: Vec<PathId>,
}

/// Why an attach is refused, one variant per row of SPDK's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// -114: the name exists and multipath is disabled.
    MultipathDisabled { name: String },
    /// -114: same name and the same network path as the active one.
    SamePath { name: String },
    /// -22: same name, different subnqn.
    DifferentSubnqn { name: String, existing: String },
    /// -22: same name, different hostnqn.
    DifferentHostnqn { name: String, existing: String },
    /// -17: some controller already has this transport ID and host NQN.
    TridExists,
}

impl Conflict {
    /// The JSON-RPC error SPDK answers with (code and message text).
    pub fn to_rpc(&self) -> RpcError {
        match self {
            Conflict::MultipathDisabled { name } => RpcError::errno_msg(
                libc::EALREADY,
                format!("A controller named {name} already exists and multipath is disabled"),
            ),
            Conflict::SamePath { name } => RpcError::errno_msg(
                libc::EALREADY,
                format!("A controller named {name} already exists with the specified network path"),
            ),
            Conflict::DifferentSubnqn { name, existing } => RpcError::errno_msg(
                libc::EINVAL,
                format!("A controller named {name} already exists, but uses a different subnqn ({existing})"),
            ),
            Conflict::DifferentHostnqn { name, existing } => RpcError::errno_msg(
                libc::EINVAL,
                format!("A controller named {name} already exists, but uses a different hostnqn ({existing})"),
            ),
            Conflict::TridExists => RpcError::errno(libc::EEXIST),
        }
    }
}

/// What a permitted attach does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachKind {
    /// A new controller under a new name.
    New,
    /// An alternate path of the existing controller with that name.
    AddPath,
}

/// SPDK's checks, in SPDK's order (`rpc_bdev_nvme_attach_controller`, then
/// `bdev_nvme_create`'s transport ID check).
pub fn check_attach(
    existing: &[CtrlrView],
    name: &str,
    path: &PathId,
    multipath: Multipath,
) -> Result<AttachKind, Conflict> {
    let mut kind = AttachKind::New;
    if let Some(c) = existing.iter().find(|c| c.name == name) {
        if multipath == Multipath::Disable {
            return Err(Conflict::MultipathDisabled { name: name.into() });
        }
        if let Some(active) = c.paths.first() {
            if active.same_network_path(path) {
                return Err(Conflict::SamePath { name: name.into() });
            }
            if active.trid.subnqn != path.trid.subnqn {
                return Err(Conflict::DifferentSubnqn {
                    name: name.into(),
                    existing: active.trid.subnqn.clone(),
                });
            }
            if active.hostnqn != path.hostnqn {
                return Err(Conflict::DifferentHostnqn {
                    name: name.into(),
                    existing: active.hostnqn.clone(),
                });
            }
        }
        kind = AttachKind::AddPath;
    }
    let same_trid = existing
        .iter()
        .flat_map(|c| c.paths.iter())
        .any(|p| p.trid == path.trid && p.hostnqn == path.hostnqn);
    if same_trid {
        return Err(Conflict::TridExists);
    }
    Ok(kind)
}

/// SPDK's global nvme options that matter here (`bdev_nvme_set_options`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NvmeOptions {
    pub ctrlr_loss_timeout_sec: i32,
    pub reconnect_delay_sec: u32,
    pub fast_io_fail_timeout_sec: u32,
    pub keep_alive_timeout_ms: u32,
    pub timeout_us: u64,
    /// Bound of each admin command (SPDK's name); 0 = the default (10 s).
    pub timeout_admin_us: u64,
    pub transport_retry_count: u8,
    pub bdev_retry_count: i32,
}

impl Default for NvmeOptions {
    fn default() -> Self {
        NvmeOptions {
            ctrlr_loss_timeout_sec: 0,
            reconnect_delay_sec: 0,
            fast_io_fail_timeout_sec: 0,
            keep_alive_timeout_ms: 10_000,
            timeout_us: 0,
            timeout_admin_us: 0,
            transport_retry_count: 4,
            bdev_retry_count: 3,
        }
    }
}

/// A named controller: its paths, the live host controller of the active one,
/// and the namespace bdevs it registered.
pub struct NvmeCtrlr {
    pub name: String,
    pub multipath: Multipath,
    paths: Mutex<Vec<PathId>>,
    active: Mutex<Option<HostController>>,
    bdevs: Mutex<Vec<String>>,
    deleting: AtomicBool,
    pub opts: ControllerOpts,
}

impl std::fmt::Debug for NvmeCtrlr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeCtrlr")
            .field("name", &self.name)
            .finish()
    }
}

impl NvmeCtrlr {
    pub fn view(&self) -> CtrlrView {
        CtrlrView {
            name: self.name.clone(),
            paths: self.paths.lock().clone(),
        }
    }
    pub fn controller(&self) -> Option<HostController> {
        self.active.lock().clone()
    }
    pub fn bdev_names(&self) -> Vec<String> {
        self.bdevs.lock().clone()
    }
    pub fn is_deleting(&self) -> bool {
        self.deleting.load(Ordering::SeqCst)
    }
    /// SPDK's state name: `deleting` while being detached, else the controller's.
    pub fn state(&self) -> &'static str {
        if self.is_deleting() {
            return "deleting";
        }
        match self.controller() {
            Some(c) => match c.state() {
                CtrlrState::Connecting => "resetting",
                s => s.as_str(),
            },
            None => "failed",
        }
    }

    /// `bdev_nvme_get_controllers` JSON for this controller.
    pub fn to_json(&self) -> Value {
        let paths = self.paths.lock().clone();
        let c = self.controller();
        let trid_json = |t: &TransportId| {
            json!({
                "trtype": "TCP",
                "adrfam": match t.adrfam { nvmf::trid::AdrFam::Ipv4 => "IPv4", nvmf::trid::AdrFam::Ipv6 => "IPv6" },
                "traddr": t.traddr,
                "trsvcid": t.trsvcid,
                "subnqn": t.subnqn,
            })
        };
        let Some(active) = paths.first() else {
            return json!({"name": self.name, "ctrlrs": []});
        };
        let mut ctrlr = json!({
            "state": self.state(),
            "trid": trid_json(&active.trid),
            "cntlid": c.as_ref().map(|c| c.cntlid()).unwrap_or(0),
            "host": {"nqn": active.hostnqn, "addr": active.hostaddr, "svcid": active.hostsvcid},
        });
        if paths.len() > 1 {
            ctrlr["alternate_trids"] =
                Value::Array(paths[1..].iter().map(|p| trid_json(&p.trid)).collect());
        }
        json!({"name": self.name, "ctrlrs": [ctrlr]})
    }
}

/// Errors of the nvme module that are not attach conflicts.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error("controller {name}: {source}")]
    Connect {
        name: String,
        #[source]
        source: nvmf::host::HostError,
    },
}

/// All named controllers of a dataplane.
pub struct NvmeModule {
    registry: Arc<BdevRegistry>,
    ctrlrs: Mutex<BTreeMap<String, Arc<NvmeCtrlr>>>,
    /// Serialises attach/detach so that checks and effects do not interleave.
    op: tokio::sync::Mutex<()>,
    pub options: Mutex<NvmeOptions>,
}

impl std::fmt::Debug for NvmeModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeModule").finish_non_exhaustive()
    }
}

/// How long `bdev_nvme_detach_controller` waits before answering -ETIMEDOUT.
pub const DETACH_WAIT: Duration = Duration::from_secs(10);

impl NvmeModule {
    pub fn new(registry: Arc<BdevRegistry>) -> Arc<Self> {
        Arc::new(NvmeModule {
            registry,
            ctrlrs: Mutex::new(BTreeMap::new()),
            op: tokio::sync::Mutex::new(()),
            options: Mutex::new(NvmeOptions::default()),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<NvmeCtrlr>> {
        self.ctrlrs.lock().get(name).cloned()
    }
    pub fn list(&self) -> Vec<Arc<NvmeCtrlr>> {
        self.ctrlrs.lock().values().cloned().collect()
    }
    pub fn is_empty(&self) -> bool {
        self.ctrlrs.lock().is_empty()
    }

    /// Attaches a controller (or adds a path). Returns the namespace bdev names.
    pub async fn attach(
        self: &Arc<Self>,
        name: &str,
        path: PathId,
        multipath: Multipath,
        mut opts: ControllerOpts,
    ) -> Result<Vec<String>, RpcError> {
        let _g = self.op.lock().await;
        let views: Vec<CtrlrView> = self.list().iter().map(|c| c.view()).collect();
        let kind = check_attach(&views, name, &path, multipath).map_err(|c| {
            info!(controller = name, trid = %path.trid, conflict = ?c, "attach refused");
            c.to_rpc()
        })?;
        if kind == AttachKind::AddPath {
            // SPDK records a failover path without connecting it; it is tried
            // when the active path fails.
            let Some(c) = self.get(name) else {
                return Err(RpcError::errno(libc::ENODEV));
            };
            c.paths.lock().push(path.clone());
            info!(controller = name, trid = %path.trid, "alternate path added");
            return Ok(c.bdev_names());
        }
        opts.trid = path.trid.clone();
        opts.hostnqn = path.hostnqn.clone();
        let host = HostController::connect(opts.clone()).await.map_err(|e| {
            warn!(controller = name, trid = %path.trid, "attach failed: {e}");
            match &e {
                nvmf::host::HostError::Opts { source, .. } => {
                    RpcError::errno_msg(libc::EINVAL, source.to_string())
                }
                nvmf::host::HostError::Status { status, .. } if status.dnr => {
                    RpcError::errno_msg(libc::EPERM, format!("controller {name}: {e}"))
                }
                _ => RpcError::errno_msg(
                    libc::ENODEV,
                    format!("No such device: controller {name}: {e}"),
                ),
            }
        })?;
        let ctrlr = Arc::new(NvmeCtrlr {
            name: name.to_string(),
            multipath,
            paths: Mutex::new(vec![path]),
            active: Mutex::new(Some(host.clone())),
            bdevs: Mutex::new(Vec::new()),
            deleting: AtomicBool::new(false),
            opts,
        });
        let mut names = Vec::new();
        for ns in NvmeNsBdev::all(&host, name) {
            let n = bdev::Bdev::name(&ns).to_string();
            let b: BdevRef = Arc::new(ns);
            match self.registry.register(b, &[]) {
                Ok(_) => names.push(n),
                Err(e) => {
                    // A bdev with the namespace's name exists already: undo and refuse.
                    for n in &names {
                        self.registry.hot_remove(n);
                    }
                    let _ = host.delete().await;
                    return Err(RpcError::errno_msg(libc::EEXIST, e.to_string()));
                }
            }
        }
        *ctrlr.bdevs.lock() = names.clone();
        self.ctrlrs.lock().insert(name.to_string(), ctrlr.clone());
        self.watch_removal(&ctrlr, &host);
        info!(controller = name, trid = %host.trid(), bdevs = ?names, "controller attached");
        Ok(names)
    }

    /// When the active controller is deleted underneath (ctrlr_loss expired),
    /// fail over to an alternate path if there is one, else drop the controller
    /// and hot-remove its bdevs (a raid drops the member).
    fn watch_removal(self: &Arc<Self>, ctrlr: &Arc<NvmeCtrlr>, host: &HostController) {
        let me = Arc::downgrade(self);
        let c = Arc::downgrade(ctrlr);
        host.on_removal(move |why| {
            let (Some(me), Some(c)) = (me.upgrade(), c.upgrade()) else {
                return;
            };
            if c.is_deleting() {
                return;
            }
            warn!(controller = %c.name, reason = ?why, "controller lost");
            let rt = tokio::runtime::Handle::try_current();
            let fut = async move { me.on_lost(c).await };
            match rt {
                Ok(h) => {
                    h.spawn(fut);
                }
                Err(_) => warn!("controller lost outside a runtime; cleanup deferred"),
            }
        });
    }

    async fn on_lost(self: Arc<Self>, c: Arc<NvmeCtrlr>) {
        let _g = self.op.lock().await;
        if c.is_deleting() {
            return;
        }
        if self.switch_to_alternate(&c).await {
            return;
        }
        c.deleting.store(true, Ordering::SeqCst);
        for n in c.bdev_names() {
            self.registry.hot_remove(&n);
        }
        self.ctrlrs.lock().remove(&c.name);
        info!(controller = %c.name, "controller deleted after controller loss");
    }

    /// Connects the first alternate path that answers and makes it the active
    /// one; the namespace bdevs are re-created on it (consumers see a hot
    /// remove and re-add). The old active path goes to the end of the list.
    /// Returns false when no alternate path works.
    async fn switch_to_alternate(self: &Arc<Self>, c: &Arc<NvmeCtrlr>) -> bool {
        let alternates: Vec<PathId> = c.paths.lock().iter().skip(1).cloned().collect();
        for p in alternates {
            let mut o = c.opts.clone();
            o.trid = p.trid.clone();
            o.hostnqn = p.hostnqn.clone();
            let host = match HostController::connect(o).await {
                Ok(h) => h,
                Err(e) => {
                    warn!(controller = %c.name, trid = %p.trid, "alternate path failed: {e}");
                    continue;
                }
            };
            info!(controller = %c.name, trid = %p.trid, "failed over to alternate path");
            {
                let mut paths = c.paths.lock();
                let old = paths.remove(0);
                paths.retain(|x| x != &p);
                paths.insert(0, p.clone());
                paths.push(old);
            }
            for n in c.bdev_names() {
                self.registry.hot_remove(&n);
            }
            let mut names = Vec::new();
            for ns in NvmeNsBdev::all(&host, &c.name) {
                let n = bdev::Bdev::name(&ns).to_string();
                if self.registry.register(Arc::new(ns), &[]).is_ok() {
                    names.push(n);
                }
            }
            *c.bdevs.lock() = names;
            let old = c.active.lock().replace(host.clone());
            self.watch_removal(c, &host);
            if let Some(old) = old {
                tokio::spawn(async move {
                    let _ = old.delete().await;
                });
            }
            return true;
        }
        false
    }

    /// Detaches `name` (or only the given path of it). Returns once it is gone,
    /// or -ETIMEDOUT after [`DETACH_WAIT`] (it keeps going; state `deleting`).
    pub async fn detach(
        self: &Arc<Self>,
        name: &str,
        path: Option<PathFilter>,
    ) -> Result<(), RpcError> {
        let _g = self.op.lock().await;
        let Some(c) = self.get(name) else {
            return Err(RpcError::errno(libc::ENODEV));
        };
        if let Some(f) = path.filter(|f| !f.is_empty()) {
            let (matching, total, active_matches) = {
                let paths = c.paths.lock();
                let m: Vec<PathId> = paths.iter().filter(|p| f.matches(p)).cloned().collect();
                let a = paths.first().is_some_and(|p| f.matches(p));
                (m, paths.len(), a)
            };
            if matching.is_empty() {
                return Err(RpcError::errno(libc::ENODEV));
            }
            if matching.len() < total {
                // Some path stays: drop the matching inactive ones, and if the
                // active one goes, fail over to the next first.
                {
                    let mut paths = c.paths.lock();
                    let first = paths.first().cloned();
                    paths.retain(|p| !matching.contains(p) || Some(p) == first.as_ref());
                }
                if active_matches {
                    if !self.switch_to_alternate(&c).await {
                        return Err(RpcError::errno_msg(libc::EBUSY, format!("controller {name}: no alternate path answers; not removing the active one")));
                    }
                    let old = c.paths.lock().pop();
                    info!(controller = name, removed = ?old.map(|p| p.trid.to_string()), "active path removed");
                }
                return Ok(());
            }
        }
        c.deleting.store(true, Ordering::SeqCst);
        info!(controller = name, "detaching controller");
        for n in c.bdev_names() {
            self.registry.hot_remove(&n);
        }
        let host = c.controller();
        let me = self.clone();
        let nm = name.to_string();
        let job = tokio::spawn(async move {
            if let Some(h) = host {
                if let Err(e) = h.disconnect().await {
                    warn!(controller = %nm, "graceful disconnect failed ({e}); deleting");
                    let _ = h.delete().await;
                }
            }
            me.ctrlrs.lock().remove(&nm);
            info!(controller = %nm, "controller detached");
        });
        drop(_g);
        match tokio::time::timeout(DETACH_WAIT, job).await {
            Ok(_) => Ok(()),
            Err(_) => Err(RpcError::errno(libc::ETIMEDOUT)),
        }
    }

    /// Deletes every controller (dataplane shutdown).
    pub async fn shutdown(self: &Arc<Self>) {
        for c in self.list() {
            let _ = self.detach(&c.name, None).await;
        }
    }
}

/// Path fields of a detach that removes one path only.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PathFilter {
    pub traddr: Option<String>,
    pub trsvcid: Option<String>,
    pub subnqn: Option<String>,
    pub hostaddr: Option<String>,
    pub hostsvcid: Option<String>,
    pub hostnqn: Option<String>,
}

impl PathFilter {
    pub fn is_empty(&self) -> bool {
        self.traddr.is_none()
            && self.trsvcid.is_none()
            && self.subnqn.is_none()
            && self.hostaddr.is_none()
            && self.hostsvcid.is_none()
            && self.hostnqn.is_none()
    }
    pub fn matches(&self, p: &PathId) -> bool {
        let m = |f: &Option<String>, v: &str| f.as_deref().is_none_or(|f| f == v);
        m(&self.traddr, &p.trid.traddr)
            && m(&self.trsvcid, &p.trid.trsvcid)
            && m(&self.subnqn, &p.trid.subnqn)
            && m(&self.hostaddr, &p.hostaddr)
            && m(&self.hostsvcid, &p.hostsvcid)
            && m(&self.hostnqn, &p.hostnqn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(port: &str, sub: &str, host: &str) -> PathId {
        PathId {
            trid: TransportId::new("127.0.0.1", port, sub),
            hostnqn: host.into(),
            hostaddr: String::new(),
            hostsvcid: String::new(),
        }
    }

    fn existing() -> Vec<CtrlrView> {
        vec![CtrlrView {
            name: "r1".into(),
            paths: vec![path("4420", "nqn.a:s1", "nqn.h:1")],
        }]
    }

    #[test]
    fn every_row_of_spdks_table() {
        let ex = existing();
        // Name exists, multipath disabled: -114 whatever the path.
        let e = check_attach(
            &ex,
            "r1",
            &path("4421", "nqn.a:s1", "nqn.h:1"),
            Multipath::Disable,
        )
        .unwrap_err();
        assert_eq!(e.to_rpc().code, -114);
        assert_eq!(
            e.to_rpc().message,
            "A controller named r1 already exists and multipath is disabled"
        );
        // Same name, failover, same network path: -114.
        let e = check_attach(
            &ex,
            "r1",
            &path("4420", "nqn.a:s1", "nqn.h:1"),
            Multipath::Failover,
        )
        .unwrap_err();
        assert_eq!(e, Conflict::SamePath { name: "r1".into() });
        assert_eq!(e.to_rpc().code, -114);
        let e = check_attach(
            &ex,
            "r1",
            &path("4420", "nqn.a:other", "nqn.h:1"),
            Multipath::Multipath,
        )
        .unwrap_err();
        assert_eq!(
            e.to_rpc().code,
            -114,
            "the network path is compared before the subnqn"
        );
        // Same name, different subnqn / hostnqn: -22.
        let e = check_attach(
            &ex,
            "r1",
            &path("4421", "nqn.a:s2", "nqn.h:1"),
            Multipath::Failover,
        )
        .unwrap_err();
        assert_eq!(e.to_rpc().code, -22);
        assert_eq!(
            e.to_rpc().message,
            "A controller named r1 already exists, but uses a different subnqn (nqn.a:s1)"
        );
        let e = check_attach(
            &ex,
            "r1",
            &path("4421", "nqn.a:s1", "nqn.h:2"),
            Multipath::Failover,
        )
        .unwrap_err();
        assert_eq!(e.to_rpc().code, -22);
        assert!(e.to_rpc().message.contains("different hostnqn (nqn.h:1)"));
        // Another name, same trid and hostnqn: -17.
        let e = check_attach(
            &ex,
            "r2",
            &path("4420", "nqn.a:s1", "nqn.h:1"),
            Multipath::Disable,
        )
        .unwrap_err();
        assert_eq!(e.to_rpc().code, -17);
        assert_eq!(e.to_rpc().message, "File exists");
        // Another name, same trid, other host: allowed.
        assert_eq!(
            check_attach(
                &ex,
                "r2",
                &path("4420", "nqn.a:s1", "nqn.h:2"),
                Multipath::Disable
            ),
            Ok(AttachKind::New)
        );
        // Same name, failover, a new path: an alternate path.
        assert_eq!(
            check_attach(
                &ex,
                "r1",
                &path("4421", "nqn.a:s1", "nqn.h:1"),
                Multipath::Failover
            ),
            Ok(AttachKind::AddPath)
        );
    }

    #[test]
    fn alternate_path_equal_to_an_inactive_one_is_eexist() {
        let ex = vec![CtrlrView {
            name: "r1".into(),
            paths: vec![
                path("4420", "nqn.a:s1", "nqn.h:1"),
                path("4421", "nqn.a:s1", "nqn.h:1"),
            ],
        }];
        let e = check_attach(
            &ex,
            "r1",
            &path("4421", "nqn.a:s1", "nqn.h:1"),
            Multipath::Failover,
        )
        .unwrap_err();
        assert_eq!(e, Conflict::TridExists);
    }

    #[test]
    fn path_filter() {
        let p = path("4420", "nqn.a:s1", "nqn.h:1");
        assert!(PathFilter::default().matches(&p));
        assert!(PathFilter {
            trsvcid: Some("4420".into()),
            ..Default::default()
        }
        .matches(&p));
        assert!(!PathFilter {
            trsvcid: Some("4421".into()),
            ..Default::default()
        }
        .matches(&p));
    }
}
