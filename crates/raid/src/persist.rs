//! The persist thread of a raid: makes record snapshots durable off the I/O
//! threads and tells the raid when a version is on disk.
//!
//! Changes are coalesced: the thread always writes the newest snapshot it was
//! given, so a burst of member failures costs one write. A failed write is
//! reported (held writes then fail) and retried every second until a newer
//! version succeeds.

use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::record::{RaidRecord, StateStore};

/// How long the thread waits before retrying a failed write.
const RETRY: Duration = Duration::from_secs(1);

/// What the persist thread reports to its raid.
pub(crate) trait DurableSink: Send + Sync + 'static {
    /// Versions up to `version` are durable.
    fn on_durable(&self, version: u64);
    /// Writing `version` failed.
    fn on_persist_failed(&self, version: u64, error: &std::io::Error);
}

/// Progress of the persist thread, watched by control operations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersistStatus {
    /// Highest version on disk.
    pub durable: u64,
    /// Highest version whose write failed (and is not yet superseded by a durable one).
    pub failed: u64,
    /// The error of that failure.
    pub error: Option<String>,
}

struct Pending {
    version: u64,
    record: Option<RaidRecord>,
    stop: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// The raid, attached once it exists (it owns this persister).
    sink: Mutex<Option<Weak<dyn DurableSink>>>,
    cv: Condvar,
    status: watch::Sender<PersistStatus>,
}

/// Handle to a raid's persist thread. Dropping it stops the thread after it
/// wrote what it was given.
pub(crate) struct Persister {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Persister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persister")
            .field("status", &*self.shared.status.borrow())
            .finish()
    }
}

impl Persister {
    /// Starts the thread for raid `name`, `durable` being the version already on
    /// disk (0 for none).
    pub fn start(
        name: &str,
        store: Arc<dyn StateStore>,
        durable: u64,
    ) -> std::io::Result<Persister> {
        let (status, _) = watch::channel(PersistStatus {
            durable,
            ..Default::default()
        });
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                version: durable,
                record: None,
                stop: false,
            }),
            sink: Mutex::new(None),
            cv: Condvar::new(),
            status,
        });
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("raid-persist-{name}"))
            .spawn(move || run(s2, store, durable))?;
        Ok(Persister {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Attaches the raid that hears about durable and failed versions.
    pub fn set_sink(&self, sink: Weak<dyn DurableSink>) {
        *self.shared.sink.lock() = Some(sink);
    }

    /// Asks for `record` (version `version`) to be made durable. Older
    /// versions than one already asked for are ignored. Never blocks on I/O.
    pub fn request(&self, version: u64, record: RaidRecord) {
        let mut p = self.shared.pending.lock();
        if version > p.version {
            p.version = version;
            p.record = Some(record);
            self.shared.cv.notify_one();
        }
    }

    pub fn status(&self) -> PersistStatus {
        self.shared.status.borrow().clone()
    }

    /// Waits until `version` is durable; fails if writing it (or a later
    /// version) failed before it became durable.
    pub async fn wait(&self, version: u64) -> Result<(), String> {
        let mut rx = self.shared.status.subscribe();
        let r = rx
            .wait_for(|s| s.durable >= version || s.failed >= version)
            .await
            .map(|s| s.clone());
        match r {
            Ok(s) if s.durable >= version => Ok(()),
            Ok(s) => Err(s.error.unwrap_or_else(|| "persist failed".into())),
            Err(_) => Err("persist thread stopped".into()),
        }
    }

    /// Stops the thread once it has written what it was given; returns its handle.
    pub fn stop(&self) -> Option<std::thread::JoinHandle<()>> {
        self.shared.pending.lock().stop = true;
        self.shared.cv.notify_one();
        self.thread.lock().take()
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.shared.pending.lock().stop = true;
        self.shared.cv.notify_one();
    }
}

fn run(shared: Arc<Shared>, store: Arc<dyn StateStore>, mut done: u64) {
    let sink = || shared.sink.lock().as_ref().and_then(|w| w.upgrade());
    loop {
        let (version, record) = {
            let mut p = shared.pending.lock();
            loop {
                if p.record.is_some() && p.version > done {
                    break;
                }
                if p.stop {
                    return;
                }
                shared.cv.wait(&mut p);
            }
            match p.record.take() {
                Some(r) => (p.version, r),
                None => continue,
            }
        };
        match store.save(&record) {
            Ok(()) => {
                done = version;
                // Status first, so that whoever a released write wakes sees it.
                shared.status.send_modify(|s| {
                    s.durable = version;
                    if s.failed <= version {
                        s.failed = 0;
                        s.error = None;
                    }
                });
                if let Some(s) = sink() {
                    s.on_durable(version);
                }
            }
            Err(e) => {
                tracing::error!(raid = %record.name, version, error = %e,
                    "cannot persist raid membership; held writes fail until it succeeds");
                shared.status.send_modify(|s| {
                    s.failed = s.failed.max(version);
                    s.error = Some(e.to_string());
                });
                if let Some(s) = sink() {
                    s.on_persist_failed(version, &e);
                }
                let mut p = shared.pending.lock();
                if p.record.is_none() {
                    p.record = Some(record);
                }
                if !p.stop {
                    shared.cv.wait_for(&mut p, RETRY);
                } else if p.version <= version {
                    // Stopping and nothing newer: give up on this one.
                    return;
                }
            }
        }
    }
}
