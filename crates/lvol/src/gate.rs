//! [`IoGate`]: lets control operations (snapshot, revert, resize, a merge step)
//! stop a bdev's I/O briefly without blocking submitters: while the gate is
//! paused, new requests are parked and resubmitted when it opens again, and the
//! pauser waits only for requests already in flight.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

use parking_lot::{Condvar, Mutex};

/// A counter of requests in flight with a pause switch and a parking queue for
/// items of type `T` (requests that arrived while paused).
#[derive(Debug)]
pub struct IoGate<T> {
    inflight: AtomicU64,
    paused: AtomicU32,
    parked: Mutex<VecDeque<T>>,
    drained: Condvar,
}

/// Whether [`IoGate::enter`] let the request in.
pub enum Entry<T> {
    /// Go ahead; call [`IoGate::exit`] when the request has completed.
    Entered(T),
    /// The gate is paused; the request was parked.
    Parked,
}

impl<T> Default for IoGate<T> {
    fn default() -> Self {
        IoGate {
            inflight: AtomicU64::new(0),
            paused: AtomicU32::new(0),
            parked: Mutex::new(VecDeque::new()),
            drained: Condvar::new(),
        }
    }
}

impl<T> IoGate<T> {
    /// Counts a request in, or parks it if the gate is paused.
    pub fn enter(&self, item: T) -> Entry<T> {
        loop {
            // Dekker-style: the increment is visible to a pauser before we read
            // `paused`, and its store is visible to us before it reads `inflight`.
            self.inflight.fetch_add(1, SeqCst);
            if self.paused.load(SeqCst) == 0 {
                return Entry::Entered(item);
            }
            self.exit();
            let mut q = self.parked.lock();
            if self.paused.load(SeqCst) != 0 {
                q.push_back(item);
                return Entry::Parked;
            }
            // Resumed meanwhile: try again.
        }
    }

    /// Counts a request out.
    pub fn exit(&self) {
        if self.inflight.fetch_sub(1, SeqCst) == 1 && self.paused.load(SeqCst) != 0 {
            let _q = self.parked.lock();
            self.drained.notify_all();
        }
    }

    /// Stops new requests and waits until none is in flight.
    pub fn pause(&self) {
        let mut q = self.parked.lock();
        self.paused.fetch_add(1, SeqCst);
        while self.inflight.load(SeqCst) != 0 {
            self.drained.wait(&mut q);
        }
    }

    /// Undoes one [`IoGate::pause`]; when the last pause ends, returns the
    /// parked requests for the caller to resubmit (in arrival order).
    pub fn resume(&self) -> VecDeque<T> {
        let mut q = self.parked.lock();
        if self.paused.fetch_sub(1, SeqCst) == 1 {
            std::mem::take(&mut *q)
        } else {
            VecDeque::new()
        }
    }

    #[cfg(test)]
    pub fn inflight(&self) -> u64 {
        self.inflight.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn parks_while_paused_and_waits_for_inflight() {
        let g: Arc<IoGate<u32>> = Arc::new(IoGate::default());
        assert!(matches!(g.enter(1), Entry::Entered(1)));
        let g2 = g.clone();
        let t = std::thread::spawn(move || {
            g2.pause();
            // only reached once request 1 has exited
            assert_eq!(g2.inflight(), 0);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!t.is_finished());
        g.exit();
        t.join().unwrap();
        assert!(matches!(g.enter(2), Entry::Parked));
        assert!(matches!(g.enter(3), Entry::Parked));
        let back: Vec<u32> = g.resume().into_iter().collect();
        assert_eq!(back, vec![2, 3]);
        assert!(matches!(g.enter(4), Entry::Entered(4)));
        g.exit();
    }
}
