//! A fixed slab of parent I/O contexts with a lock-free free list, so that the
//! I/O path allocates nothing: an I/O takes a slot index (its tag towards the
//! members) and gives it back when it completes.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

const NIL: u32 = u32::MAX;

struct Entry<T> {
    next: AtomicU32,
    val: Mutex<T>,
}

/// `n` slots of `Mutex<T>`; `alloc`/`free` are a Treiber stack whose head
/// carries a tag against ABA.
pub(crate) struct Slab<T> {
    entries: Box<[Entry<T>]>,
    /// (tag << 32) | index of the first free slot (NIL when empty).
    head: AtomicU64,
    in_use: AtomicU32,
}

fn pack(tag: u32, idx: u32) -> u64 {
    ((tag as u64) << 32) | idx as u64
}

impl<T: Default> Slab<T> {
    pub fn new(n: usize) -> Self {
        let n = n.clamp(1, (NIL - 1) as usize);
        let entries: Box<[Entry<T>]> = (0..n)
            .map(|i| Entry {
                next: AtomicU32::new(if i + 1 < n { i as u32 + 1 } else { NIL }),
                val: Mutex::new(T::default()),
            })
            .collect();
        Slab {
            entries,
            head: AtomicU64::new(pack(0, 0)),
            in_use: AtomicU32::new(0),
        }
    }
}

impl<T> Slab<T> {
    /// Takes a free slot, or None when all are in use.
    pub fn alloc(&self) -> Option<u32> {
        let mut h = self.head.load(Ordering::Acquire);
        loop {
            let idx = h as u32;
            if idx == NIL {
                return None;
            }
            let next = self.entries.get(idx as usize)?.next.load(Ordering::Relaxed);
            let new = pack((h >> 32) as u32 + 1, next);
            match self
                .head
                .compare_exchange_weak(h, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // SeqCst: `Core::quiesce` pairs it with its pause flag.
                    self.in_use.fetch_add(1, Ordering::SeqCst);
                    return Some(idx);
                }
                Err(cur) => h = cur,
            }
        }
    }

    /// Gives slot `idx` back.
    pub fn free(&self, idx: u32) {
        let Some(e) = self.entries.get(idx as usize) else {
            return;
        };
        self.in_use.fetch_sub(1, Ordering::SeqCst);
        let mut h = self.head.load(Ordering::Acquire);
        loop {
            e.next.store(h as u32, Ordering::Relaxed);
            let new = pack((h >> 32) as u32 + 1, idx);
            match self
                .head
                .compare_exchange_weak(h, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(cur) => h = cur,
            }
        }
    }

    /// The context of slot `idx`.
    pub fn get(&self, idx: u32) -> Option<&Mutex<T>> {
        self.entries.get(idx as usize).map(|e| &e.val)
    }

    /// Slots in use. Exact once it reads 0 after every new allocation has
    /// been held off (see `Core::quiesce`).
    pub fn in_use(&self) -> u32 {
        self.in_use.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn alloc_all_then_free() {
        let s: Slab<u8> = Slab::new(4);
        let got: Vec<u32> = (0..4).map(|_| s.alloc().unwrap()).collect();
        assert_eq!(got.iter().copied().collect::<HashSet<_>>().len(), 4);
        assert_eq!(s.alloc(), None);
        assert_eq!(s.in_use(), 4);
        s.free(got[2]);
        assert_eq!(s.alloc(), Some(got[2]));
        for g in got {
            s.free(g);
        }
        assert_eq!(s.in_use(), 0);
    }

    #[test]
    fn concurrent_use_never_hands_out_a_slot_twice() {
        let s: Arc<Slab<u64>> = Arc::new(Slab::new(16));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        if let Some(idx) = s.alloc() {
                            let mut g = s.get(idx).unwrap().lock();
                            assert_eq!(*g, 0, "slot {idx} handed out twice");
                            *g = t * 1_000_000 + i + 1;
                            drop(g);
                            *s.get(idx).unwrap().lock() = 0;
                            s.free(idx);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.in_use(), 0);
        let all: HashSet<u32> = (0..16).map(|_| s.alloc().unwrap()).collect();
        assert_eq!(all.len(), 16);
    }
}
