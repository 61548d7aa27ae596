//! Range locks that keep user writes away from a block range while the raid
//! copies it (rebuild) or repairs it (write-back after a read error).
//!
//! The tracker is only consulted while someone holds a lock or is about to:
//! the raid counts writes that bypassed it and waits for them before the first
//! lock (see `Core::begin_tracking`). A lock waits for the registered writes
//! that overlap it and were registered before it; new overlapping writes are
//! deferred and dispatched when the lock goes.

use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Debug)]
struct Inflight {
    slot: u32,
    start: u64,
    end: u64,
    seq: u64,
}

#[derive(Debug)]
struct Lock {
    id: u64,
    start: u64,
    end: u64,
    seq: u64,
    waiting: usize,
    granted: Arc<Notify>,
}

/// Whether a write may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    Go,
    /// It overlaps a lock: it is parked and comes back from [`Tracker::unlock`].
    Deferred,
}

fn overlaps(a0: u64, a1: u64, b0: u64, b1: u64) -> bool {
    a0 < b1 && b0 < a1
}

/// Registered writes in flight, held locks, and parked writes.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    inflight: Vec<Inflight>,
    locks: Vec<Lock>,
    deferred: Vec<(u32, u64, u64)>,
    seq: u64,
    next_id: u64,
}

impl Tracker {
    /// Registers write `slot` on `[start, end)`, or parks it behind a lock.
    pub fn register(&mut self, slot: u32, start: u64, end: u64) -> Admit {
        if self
            .locks
            .iter()
            .any(|l| overlaps(start, end, l.start, l.end))
        {
            self.deferred.push((slot, start, end));
            return Admit::Deferred;
        }
        self.seq += 1;
        self.inflight.push(Inflight {
            slot,
            start,
            end,
            seq: self.seq,
        });
        Admit::Go
    }

    /// Write `slot` finished.
    pub fn unregister(&mut self, slot: u32) {
        let Some(pos) = self.inflight.iter().position(|w| w.slot == slot) else {
            return;
        };
        let w = self.inflight.swap_remove(pos);
        for l in &mut self.locks {
            if w.seq < l.seq && overlaps(w.start, w.end, l.start, l.end) {
                l.waiting -= 1;
                if l.waiting == 0 {
                    l.granted.notify_one();
                }
            }
        }
    }

    /// Places a lock on `[start, end)`. Returns its id and, if writes are
    /// still in flight in the range, what to wait on before it is granted.
    pub fn lock(&mut self, start: u64, end: u64) -> (u64, Option<Arc<Notify>>) {
        self.seq += 1;
        self.next_id += 1;
        let waiting = self
            .inflight
            .iter()
            .filter(|w| overlaps(w.start, w.end, start, end))
            .count();
        let granted = Arc::new(Notify::new());
        self.locks.push(Lock {
            id: self.next_id,
            start,
            end,
            seq: self.seq,
            waiting,
            granted: granted.clone(),
        });
        (self.next_id, (waiting > 0).then_some(granted))
    }

    /// Drops lock `id`. Parked writes that no remaining lock covers are
    /// registered and returned, for the caller to dispatch.
    pub fn unlock(&mut self, id: u64, out: &mut Vec<u32>) {
        self.locks.retain(|l| l.id != id);
        let mut i = 0;
        while i < self.deferred.len() {
            let (slot, s, e) = self.deferred[i];
            if self.locks.iter().any(|l| overlaps(s, e, l.start, l.end)) {
                i += 1;
                continue;
            }
            self.deferred.swap_remove(i);
            self.seq += 1;
            self.inflight.push(Inflight {
                slot,
                start: s,
                end: e,
                seq: self.seq,
            });
            out.push(slot);
        }
    }

    /// Writes registered and in flight.
    #[cfg(test)]
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Writes parked behind a lock.
    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_waits_for_overlapping_writes_and_parks_new_ones() {
        let mut t = Tracker::default();
        assert_eq!(t.register(1, 0, 10), Admit::Go);
        assert_eq!(t.register(2, 20, 30), Admit::Go);
        let (id, wait) = t.lock(5, 25);
        let wait = wait.expect("two writes overlap");
        // new overlapping writes are parked, others go
        assert_eq!(t.register(3, 9, 11), Admit::Deferred);
        assert_eq!(t.register(4, 100, 110), Admit::Go);
        t.unregister(4);
        t.unregister(1);
        // one still in flight: not granted yet (a permit would be stored by notify_one)
        let granted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        t.unregister(2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), wait.notified())
                .await
                .unwrap();
            granted.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        assert!(granted.load(std::sync::atomic::Ordering::SeqCst));
        let mut out = Vec::new();
        t.unlock(id, &mut out);
        assert_eq!(out, vec![3]);
        assert_eq!(t.inflight(), 1, "the parked write is registered on release");
        assert_eq!(t.deferred(), 0);
    }

    #[test]
    fn writes_registered_after_a_lock_do_not_count_for_it() {
        let mut t = Tracker::default();
        let (a, w) = t.lock(0, 10);
        assert!(w.is_none());
        assert_eq!(t.register(1, 50, 60), Admit::Go);
        let (b, w) = t.lock(55, 70);
        assert!(w.is_some());
        t.unregister(1);
        // a parked write stays parked while any lock covers it
        assert_eq!(t.register(2, 5, 60), Admit::Deferred);
        let mut out = Vec::new();
        t.unlock(a, &mut out);
        assert!(out.is_empty());
        t.unlock(b, &mut out);
        assert_eq!(out, vec![2]);
    }
}
