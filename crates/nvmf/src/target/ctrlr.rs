//! A target-side controller: the association of one host with one subsystem,
//! created by an admin-queue Connect and shared by its queues.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme_wire::fabrics::Cc;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::state::{CtrlState, Effect, IllegalTransition};

/// A queue's control block: how the controller (or the target) tells a queue's
/// connection to close, and how it wakes the connection for async events.
#[derive(Debug, Default)]
pub struct QueueCtl {
    closing: AtomicBool,
    /// Finish the commands in flight (answer them) before closing.
    drain: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Wakes the connection's driver (close requested or an event to deliver).
    pub wake: Notify,
}

impl QueueCtl {
    pub fn new() -> Arc<Self> {
        Arc::new(QueueCtl::default())
    }
    /// Asks the connection to close; the first reason given is kept.
    pub fn close(&self, reason: &str) {
        {
            let mut r = self.reason.lock();
            if r.is_none() {
                *r = Some(reason.to_string());
            }
        }
        self.closing.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
    /// Asks the connection to stop taking commands, answer those in flight,
    /// then close (an orderly shutdown of the target).
    pub fn close_draining(&self, reason: &str) {
        self.drain.store(true, Ordering::SeqCst);
        self.close(reason);
    }
    pub fn is_draining(&self) -> bool {
        self.drain.load(Ordering::SeqCst)
    }
    pub fn close_reason(&self) -> Option<String> {
        self.reason.lock().clone()
    }
}

/// An asynchronous event waiting for an Async Event Request to carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    /// Event type (2 = notice).
    pub event_type: u8,
    /// Event information (0 = namespace attribute changed).
    pub info: u8,
    /// Log page to read to clear it.
    pub log_page: u8,
}

impl AsyncEvent {
    pub const NS_CHANGED: AsyncEvent = AsyncEvent {
        event_type: 2,
        info: 0,
        log_page: 0x04,
    };
    /// Completion dword 0 of the AER that reports this event.
    pub fn dw0(&self) -> u32 {
        self.event_type as u32 | (self.info as u32) << 8 | (self.log_page as u32) << 16
    }
}

/// Mutable controller state, under one lock (touched by admin commands only).
#[derive(Debug)]
pub struct CtrlInner {
    pub state: CtrlState,
    pub cc: Cc,
    pub was_ready: bool,
    /// Keep Alive Timeout in ms (0 = disabled).
    pub kato_ms: u32,
    pub keep_alive_deadline: Option<Instant>,
    /// I/O queues granted by Set Features Number of Queues.
    pub num_io_queues: u16,
    pub num_queues_set: bool,
    pub async_event_config: u32,
    /// Queues by qid (0 = admin).
    pub queues: BTreeMap<u16, Arc<QueueCtl>>,
    pub events: Vec<AsyncEvent>,
    pub changed_ns: Vec<u32>,
}

/// I/O statistics of a controller, updated by its queues without locking.
#[derive(Debug, Default)]
pub struct CtrlStats {
    pub host_reads: AtomicU64,
    pub host_writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// Target-side controller.
#[derive(Debug)]
pub struct Controller {
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub is_discovery: bool,
    pub created: Instant,
    /// Set when the controller has been torn down (removed from its subsystem).
    pub gone: AtomicBool,
    pub inner: Mutex<CtrlInner>,
    pub stats: CtrlStats,
}

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cntlid: u16,
        subnqn: &str,
        hostnqn: &str,
        hostid: [u8; 16],
        is_discovery: bool,
        kato_ms: u32,
        max_io_queues: u16,
        now: Instant,
    ) -> Arc<Self> {
        Arc::new(Controller {
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: hostnqn.into(),
            hostid,
            is_discovery,
            created: now,
            gone: AtomicBool::new(false),
            stats: CtrlStats::default(),
            inner: Mutex::new(CtrlInner {
                state: CtrlState::Disabled,
                cc: Cc::default(),
                was_ready: false,
                kato_ms,
                keep_alive_deadline: deadline(now, kato_ms),
                num_io_queues: max_io_queues,
                num_queues_set: false,
                async_event_config: 0,
                queues: BTreeMap::new(),
                events: Vec::new(),
                changed_ns: Vec::new(),
            }),
        })
    }

    pub fn state(&self) -> CtrlState {
        self.inner.lock().state
    }

    /// Handles a host write of CC. Closes the I/O queues on reset/shutdown.
    pub fn write_cc(&self, new: Cc) -> Result<CtrlState, IllegalTransition> {
        let mut g = self.inner.lock();
        let (next, effect) = g.state.on_cc_write(g.cc, new)?;
        g.cc = new;
        if next == CtrlState::Enabled {
            g.was_ready = true;
        }
        if next == CtrlState::Disabled {
            g.was_ready = false;
        }
        g.state = next;
        if effect == Effect::DropIoQueues {
            for (qid, q) in g.queues.iter() {
                if *qid != 0 {
                    q.close("controller reset or shut down");
                }
            }
        }
        Ok(next)
    }

    /// Refreshes the keep-alive deadline (Keep Alive command).
    pub fn keep_alive(&self, now: Instant) {
        let mut g = self.inner.lock();
        g.keep_alive_deadline = deadline(now, g.kato_ms);
    }

    /// Changes KATO (Set Features Keep Alive Timer) and restarts the timer.
    pub fn set_kato(&self, kato_ms: u32, now: Instant) {
        let mut g = self.inner.lock();
        g.kato_ms = kato_ms;
        g.keep_alive_deadline = deadline(now, kato_ms);
    }

    /// If the keep-alive deadline has passed, marks the controller fatal and
    /// closes every queue. Returns true when it expired now.
    pub fn check_keep_alive(&self, now: Instant) -> bool {
        let mut g = self.inner.lock();
        match g.keep_alive_deadline {
            Some(d) if now >= d && g.state != CtrlState::Fatal => {
                g.state = CtrlState::Fatal;
                g.keep_alive_deadline = None;
                for q in g.queues.values() {
                    q.close("keep alive timeout");
                }
                true
            }
            _ => false,
        }
    }

    /// Marks the controller fatal and closes all queues (subsystem deleted,
    /// host removed from the allow list, namespace table gone...).
    pub fn fail(&self, reason: &str) {
        let mut g = self.inner.lock();
        if g.state.can_move_to(CtrlState::Fatal) {
            g.state = CtrlState::Fatal;
        }
        for q in g.queues.values() {
            q.close(reason);
        }
    }

    /// Queues an asynchronous event if the host enabled it, and wakes the admin queue.
    pub fn push_ns_changed(&self, nsid: u32) {
        let mut g = self.inner.lock();
        if !g.changed_ns.contains(&nsid) {
            g.changed_ns.push(nsid);
        }
        // AEC bit 8: Namespace Attribute Notices.
        if g.async_event_config & (1 << 8) != 0 && !g.events.contains(&AsyncEvent::NS_CHANGED) {
            g.events.push(AsyncEvent::NS_CHANGED);
            if let Some(q) = g.queues.get(&0) {
                q.wake.notify_one();
            }
        }
    }

    pub fn keep_alive_deadline(&self) -> Option<Instant> {
        self.inner.lock().keep_alive_deadline
    }

    /// Number of connected I/O queues.
    pub fn num_connected_io_queues(&self) -> usize {
        self.inner.lock().queues.keys().filter(|&&q| q != 0).count()
    }
}

fn deadline(now: Instant, kato_ms: u32) -> Option<Instant> {
    if kato_ms == 0 {
        None
    } else {
        Some(now + Duration::from_millis(kato_ms as u64))
    }
}
