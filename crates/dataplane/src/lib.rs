//! The corral dataplane: one long-lived process per node that holds every
//! runtime resource (bdevs, NVMe/TCP controllers and subsystems, raids, exports)
//! and keeps serving I/O while the control plane restarts. SPDK's `spdk_tgt`
//! analog, driven by the same JSON-RPC methods (see DESIGN.md, "The dataplane RPC").
//!
//! [`Dataplane`] owns the modules; [`methods`] maps RPC methods onto them;
//! [`rpc`] is the JSON-RPC transport.

pub mod methods;
pub mod nvme;
pub mod rpc;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bdev::registry::BdevRegistry;
use bdev::uring::Reactor;
use nvmf::target::tcp::TcpTarget;
use nvmf::target::{Target, TransportOpts};
use parking_lot::Mutex;

/// Why the dataplane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state dir {path} is locked by another dataplane (pid file {pidfile})")]
    Locked { path: PathBuf, pidfile: PathBuf },
    #[error("rpc socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The dataplane's modules and shared state.
pub struct Dataplane {
    pub registry: Arc<BdevRegistry>,
    pub target: Arc<Target>,
    pub tcp: Arc<TcpTarget>,
    pub nvme: Arc<nvme::NvmeModule>,
    pub raid: Arc<raid::RaidModule>,
    /// Loaded lvstores (the replica store).
    pub lvol: lvol::Lvstores,
    pub state_dir: PathBuf,
    /// Set by nvmf_create_transport (SPDK requires a transport before listeners).
    transport_created: AtomicBool,
    reactor: Mutex<Option<Arc<Reactor>>>,
    /// NBD servers by listen address.
    pub nbd: Mutex<std::collections::BTreeMap<std::net::SocketAddr, Arc<nbd::NbdServer>>>,
    /// Running and recently ended `bdev_lvol_start_shallow_copy` operations.
    pub(crate) shallow_copies: methods::shallow_copy::ShallowCopies,
    pub started: Instant,
    /// Unix seconds at start: with the pid, identifies this dataplane instance.
    pub started_unix: u64,
    _lock: std::fs::File,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Creates the modules. Takes an exclusive lock on `state_dir` so two
    /// dataplanes never share one. Needs a tokio runtime.
    pub fn new(state_dir: &Path) -> Result<Arc<Self>, StartError> {
        let sd = |source| StartError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(sd)?;
        let lock_path = state_dir.join("dataplane.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(sd)?;
        if !try_flock(&lock) {
            return Err(StartError::Locked {
                path: state_dir.to_path_buf(),
                pidfile: lock_path,
            });
        }
        let _ = std::fs::write(&lock_path, format!("{}\n", std::process::id()));
        let registry = BdevRegistry::new();
        let target = Target::new(TransportOpts::default());
        let tcp = TcpTarget::new(target.clone());
        let raid = raid::RaidModule::new(registry.clone(), state_dir, raid::RaidOpts::default())
            .map_err(sd)?;
        Ok(Arc::new(Dataplane {
            raid,
            lvol: lvol::Lvstores::new(),
            nvme: nvme::NvmeModule::new(registry.clone()),
            registry,
            target,
            tcp,
            state_dir: state_dir.to_path_buf(),
            transport_created: AtomicBool::new(false),
            reactor: Mutex::new(None),
            nbd: Mutex::new(std::collections::BTreeMap::new()),
            shallow_copies: Default::default(),
            started: Instant::now(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            _lock: lock,
        }))
    }

    /// The io_uring reactor for file-backed bdevs, started on first use.
    pub fn reactor(&self) -> Result<Arc<Reactor>, bdev::uring::ReactorError> {
        let mut g = self.reactor.lock();
        if let Some(r) = g.as_ref() {
            return Ok(r.clone());
        }
        let r = Arc::new(Reactor::new("dataplane-uring")?);
        *g = Some(r.clone());
        Ok(r)
    }

    pub fn transport_created(&self) -> bool {
        self.transport_created.load(Ordering::SeqCst)
    }
    pub(crate) fn set_transport_created(&self) -> bool {
        !self.transport_created.swap(true, Ordering::SeqCst)
    }

    /// Orderly stop: close NVMe/TCP listeners and connections, detach host
    /// controllers, flush file bdevs. In-flight I/O completes first (connections
    /// drain before closing).
    pub async fn shutdown(&self) {
        let servers: Vec<_> = self.nbd.lock().values().cloned().collect();
        for s in servers {
            // Drains each connection's requests in flight before closing it.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(15), s.shutdown()).await;
        }
        self.tcp.shutdown();
        // Give connections a moment to flush responses of in-flight commands.
        for _ in 0..50 {
            if self.tcp.num_connections() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.nvme.shutdown().await;
        for b in self.registry.list() {
            if b.info.write_cache {
                if let Some(t) = self.registry.get(&b.info.name) {
                    use bdev::BdevExt;
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_secs(5), t.flush()).await;
                }
            }
        }
    }
}

fn try_flock(f: &std::fs::File) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a valid open descriptor owned by `f`.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}
