//! The NVMe/TCP target: subsystems by NQN with namespaces backed by bdevs,
//! per-subsystem host allow-lists and listeners, dynamic controllers with
//! keep-alive, and the discovery subsystem.
//!
//! [`Target`] is the registry (no I/O). [`conn::Connection`] is one TCP
//! connection's protocol state machine. [`tcp::TcpTarget`] owns the listening
//! sockets and drives connections with tokio.

pub mod admin;
pub mod conn;
pub mod ctrlr;
pub mod state;
pub mod subsystem;
pub mod tcp;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use serde::Serialize;

pub use ctrlr::Controller;
pub use subsystem::{Namespace, Subsystem, SubsystemConfig};

use crate::trid::AdrFam;

/// Transport options (SPDK's `nvmf_create_transport` parameters).
#[derive(Debug, Clone, Serialize)]
pub struct TransportOpts {
    /// Maximum I/O queue depth (CAP.MQES + 1).
    pub max_queue_depth: u16,
    /// Maximum I/O queues per controller.
    pub max_io_qpairs_per_ctrlr: u16,
    /// In-capsule data accepted on I/O queues.
    pub in_capsule_data_size: u32,
    /// Largest transfer of one command (reported as MDTS).
    pub max_io_size: u32,
    /// MAXH2CDATA: largest H2CData PDU the target accepts.
    pub max_h2c_data: u32,
    /// Largest C2HData PDU the target sends; bigger reads are split.
    pub max_c2h_data: u32,
    /// Data buffer bytes one connection may hold; commands beyond wait.
    pub conn_buffer_budget: usize,
    /// Busy-poll an I/O queue's socket this long (µs) before sleeping in epoll
    /// once it has nothing to do: the next command of a busy host usually
    /// comes within microseconds, and waking from epoll costs more than that
    /// (SPDK polls all the time). CPU for latency; 0 = never.
    pub io_poll_us: u32,
}

impl Default for TransportOpts {
    fn default() -> Self {
        TransportOpts {
            max_queue_depth: 128,
            max_io_qpairs_per_ctrlr: 127,
            in_capsule_data_size: 4096,
            max_io_size: 1 << 20,
            max_h2c_data: 128 << 10,
            max_c2h_data: 128 << 10,
            conn_buffer_budget: 32 << 20,
            io_poll_us: 0,
        }
    }
}

/// Admin and fabrics commands may carry this much in-capsule data.
pub const ADMIN_IN_CAPSULE: u32 = 8192;
/// Admin queue depth limit.
pub const ADMIN_MAX_SQSIZE: u16 = 128;

/// A listening address (a transport ID without the subsystem).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ListenAddress {
    pub adrfam: AdrFam,
    pub traddr: String,
    pub trsvcid: String,
}

impl ListenAddress {
    pub fn new(traddr: &str, trsvcid: &str) -> Self {
        let adrfam = if traddr.contains(':') {
            AdrFam::Ipv6
        } else {
            AdrFam::Ipv4
        };
        ListenAddress {
            adrfam,
            traddr: traddr.into(),
            trsvcid: trsvcid.into(),
        }
    }
    pub fn from_socket_addr(a: &std::net::SocketAddr) -> Self {
        ListenAddress {
            adrfam: AdrFam::of(&a.ip()),
            traddr: a.ip().to_string(),
            trsvcid: a.port().to_string(),
        }
    }
    /// A wildcard listener (0.0.0.0 / ::) matches every local address on its port.
    pub fn matches(&self, local: &ListenAddress) -> bool {
        self.trsvcid == local.trsvcid
            && (self.traddr == local.traddr || self.traddr == "0.0.0.0" || self.traddr == "::")
    }
    pub fn socket_addr_string(&self) -> String {
        match self.adrfam {
            AdrFam::Ipv4 => format!("{}:{}", self.traddr, self.trsvcid),
            AdrFam::Ipv6 => format!("[{}]:{}", self.traddr, self.trsvcid),
        }
    }
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tcp:{}", self.socket_addr_string())
    }
}

/// Errors of target configuration calls. The RPC layer maps them to errnos.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("subsystem {nqn} already exists")]
    SubsystemExists { nqn: String },
    #[error("subsystem {nqn} does not exist")]
    NoSuchSubsystem { nqn: String },
    #[error("invalid NQN {nqn:?}: {why}")]
    InvalidNqn { nqn: String, why: String },
    #[error("subsystem {nqn}: invalid cntlid range {min}..={max}")]
    InvalidCntlidRange { nqn: String, min: u16, max: u16 },
    #[error("invalid parameter {what}: {why}")]
    InvalidParam { what: &'static str, why: String },
    #[error("subsystem {nqn}: namespace {nsid} already exists")]
    NamespaceExists { nqn: String, nsid: u32 },
    #[error("subsystem {nqn}: namespace {nsid} does not exist")]
    NoSuchNamespace { nqn: String, nsid: u32 },
    #[error("subsystem {nqn}: invalid nsid {nsid}")]
    InvalidNsid { nqn: String, nsid: u32 },
    #[error("subsystem {nqn}: no free namespace ID")]
    TooManyNamespaces { nqn: String },
    #[error("subsystem {nqn}: bdev {bdev} is already namespace {nsid}")]
    BdevInUse {
        nqn: String,
        bdev: String,
        nsid: u32,
    },
    #[error("subsystem {nqn}: host {host} is already allowed")]
    HostExists { nqn: String, host: String },
    #[error("subsystem {nqn}: host {host} is not on the allow list")]
    NoSuchHost { nqn: String, host: String },
    #[error("subsystem {nqn}: already listening on {addr}")]
    ListenerExists { nqn: String, addr: String },
    #[error("subsystem {nqn}: not listening on {addr}")]
    NoSuchListener { nqn: String, addr: String },
    #[error("listen on {addr}: {why}")]
    Listen { addr: String, why: String },
}

/// The target's registry of subsystems. Cheap to share; all methods take &self.
#[derive(Debug)]
pub struct Target {
    /// Transport options; connections take a snapshot when they start.
    opts: RwLock<TransportOpts>,
    subsystems: RwLock<BTreeMap<String, Arc<Subsystem>>>,
    discovery: Arc<Subsystem>,
    /// Discovery log generation counter, bumped on every change hosts can see.
    genctr: AtomicU64,
}

impl Target {
    pub fn new(opts: TransportOpts) -> Arc<Self> {
        let disc = Subsystem::new(SubsystemConfig::new(nvme_wire::DISCOVERY_NQN), true)
            .unwrap_or_else(|e| unreachable!("the discovery NQN is valid: {e}"));
        Arc::new(Target {
            opts: RwLock::new(opts),
            subsystems: RwLock::new(BTreeMap::new()),
            discovery: Arc::new(disc),
            genctr: AtomicU64::new(0),
        })
    }

    /// The current transport options.
    pub fn opts(&self) -> TransportOpts {
        self.opts.read().clone()
    }

    /// Replaces the transport options; connections made from now on use them.
    pub fn set_opts(&self, opts: TransportOpts) {
        *self.opts.write() = opts;
    }

    pub fn discovery(&self) -> &Arc<Subsystem> {
        &self.discovery
    }

    pub fn genctr(&self) -> u64 {
        self.genctr.load(Ordering::SeqCst)
    }
    pub(crate) fn bump_genctr(&self) {
        self.genctr.fetch_add(1, Ordering::SeqCst);
    }

    pub fn create_subsystem(&self, cfg: SubsystemConfig) -> Result<Arc<Subsystem>, TargetError> {
        if cfg.nqn == nvme_wire::DISCOVERY_NQN {
            return Err(TargetError::SubsystemExists { nqn: cfg.nqn });
        }
        let s = Arc::new(Subsystem::new(cfg, false)?);
        let mut m = self.subsystems.write();
        if m.contains_key(&s.nqn) {
            return Err(TargetError::SubsystemExists { nqn: s.nqn.clone() });
        }
        m.insert(s.nqn.clone(), s.clone());
        drop(m);
        self.bump_genctr();
        Ok(s)
    }

    /// Deletes a subsystem and disconnects its controllers.
    pub fn delete_subsystem(&self, nqn: &str) -> Result<Arc<Subsystem>, TargetError> {
        let s = self
            .subsystems
            .write()
            .remove(nqn)
            .ok_or_else(|| TargetError::NoSuchSubsystem { nqn: nqn.into() })?;
        s.disconnect_all("subsystem deleted");
        self.bump_genctr();
        Ok(s)
    }

    /// Looks a subsystem up by NQN (the discovery subsystem included).
    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        if nqn == nvme_wire::DISCOVERY_NQN {
            return Some(self.discovery.clone());
        }
        self.subsystems.read().get(nqn).cloned()
    }

    /// NVM subsystems (not the discovery subsystem), by NQN.
    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.subsystems.read().values().cloned().collect()
    }

    /// Every controller of every subsystem, the discovery subsystem included.
    pub fn all_controllers(&self) -> Vec<Arc<Controller>> {
        let mut v = self.discovery.controllers();
        for s in self.subsystems() {
            v.extend(s.controllers());
        }
        v
    }

    /// Expires controllers whose keep-alive deadline passed. Returns how many.
    pub fn check_keep_alive(&self, now: Instant) -> usize {
        let mut n = 0;
        for c in self.all_controllers() {
            if c.check_keep_alive(now) {
                tracing::warn!(
                    cntlid = c.cntlid,
                    "Disconnecting host {} from subsystem {} due to keep alive timeout.",
                    c.hostnqn,
                    c.subnqn
                );
                n += 1;
            }
        }
        n
    }

    /// Lets hosts reach subsystem `nqn` through `a` (the socket is the TCP layer's
    /// business); bumps the discovery generation.
    pub fn add_listener(&self, nqn: &str, a: ListenAddress) -> Result<(), TargetError> {
        let s = self
            .subsystem(nqn)
            .ok_or_else(|| TargetError::NoSuchSubsystem { nqn: nqn.into() })?;
        s.add_listener(a)?;
        self.bump_genctr();
        Ok(())
    }

    pub fn remove_listener(&self, nqn: &str, a: &ListenAddress) -> Result<(), TargetError> {
        let s = self
            .subsystem(nqn)
            .ok_or_else(|| TargetError::NoSuchSubsystem { nqn: nqn.into() })?;
        s.remove_listener(a)?;
        self.bump_genctr();
        Ok(())
    }

    /// Introspection of one subsystem's controllers.
    pub fn controller_infos(&self, nqn: &str) -> Option<Vec<ControllerInfo>> {
        let s = self.subsystem(nqn)?;
        let now = Instant::now();
        Some(
            s.controllers()
                .iter()
                .map(|c| ControllerInfo::of(c, now))
                .collect(),
        )
    }
}

/// What `nvmf_subsystem_get_controllers` reports, plus keep-alive details.
#[derive(Debug, Clone, Serialize)]
pub struct ControllerInfo {
    pub cntlid: u16,
    pub hostnqn: String,
    pub hostid: String,
    /// SPDK counts the admin queue too.
    pub num_io_qpairs: usize,
    pub queues: Vec<u16>,
    pub state: String,
    pub kato_ms: u32,
    /// Milliseconds until the keep-alive deadline (None: keep-alive disabled).
    pub keep_alive_remaining_ms: Option<u64>,
}

impl ControllerInfo {
    pub fn of(c: &Controller, now: Instant) -> Self {
        let g = c.inner.lock();
        ControllerInfo {
            cntlid: c.cntlid,
            hostnqn: c.hostnqn.clone(),
            hostid: uuid::Uuid::from_bytes(c.hostid).to_string(),
            num_io_qpairs: g.queues.len(),
            queues: g.queues.keys().copied().collect(),
            state: format!("{:?}", g.state).to_lowercase(),
            kato_ms: g.kato_ms,
            keep_alive_remaining_ms: g
                .keep_alive_deadline
                .map(|d| d.saturating_duration_since(now).as_millis() as u64),
        }
    }
}
