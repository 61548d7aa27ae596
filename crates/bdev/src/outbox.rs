//! Pending socket output of a sans-IO connection (NVMe/TCP target queue, NBD
//! transmission): reply headers and small data copied into one arena, read
//! data referenced in place in the connection's slot buffers, and "release"
//! marks that free a slot once everything before it has been written.
//!
//! The connection owns the slots; the outbox only records `(slot, range)` and
//! asks the connection for the bytes when it fills iovecs, so read data is
//! never copied and a write of many replies is one vectored syscall.

use std::collections::VecDeque;
use std::io::IoSlice;

/// Arena bytes before the first live segment are dropped once they exceed this.
const COMPACT_AT: usize = 64 * 1024;

/// A piece of pending output.
#[derive(Debug, Clone, Copy)]
enum Seg {
    /// Bytes in the arena, by absolute position.
    Arena { start: usize, end: usize },
    /// Bytes of a slot's buffer.
    Slot { idx: u16, start: u32, end: u32 },
    /// Once everything before this is written, the slot is free again.
    Release(u16),
}

/// Pending output, in order.
#[derive(Debug, Default)]
pub struct Outbox {
    arena: Vec<u8>,
    /// Absolute position of arena[0].
    base: usize,
    segs: VecDeque<Seg>,
    /// Bytes of `segs.front()` already written.
    head_off: usize,
    /// Bytes queued and not yet written.
    pending: usize,
}

impl Outbox {
    /// An outbox whose arena and segment queue are preallocated, so that the
    /// steady state does not allocate.
    pub fn with_capacity(arena: usize, segs: usize) -> Self {
        Outbox {
            arena: Vec::with_capacity(arena),
            segs: VecDeque::with_capacity(segs),
            ..Default::default()
        }
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.pending
    }

    fn abs_end(&self) -> usize {
        self.base + self.arena.len()
    }

    /// Appends the bytes `f` writes to the arena, merged with the previous
    /// arena segment when contiguous so that consecutive headers form one iovec.
    pub fn push_with(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let start = self.abs_end();
        f(&mut self.arena);
        let end = self.abs_end();
        if end == start {
            return;
        }
        self.pending += end - start;
        if let Some(Seg::Arena { end: e, .. }) = self.segs.back_mut() {
            if *e == start {
                *e = end;
                return;
            }
        }
        self.segs.push_back(Seg::Arena { start, end });
    }

    /// Appends bytes `start..end` of slot `idx`'s buffer (not copied).
    pub fn push_slot(&mut self, idx: u16, start: u32, end: u32) {
        if end > start {
            self.pending += (end - start) as usize;
            self.segs.push_back(Seg::Slot { idx, start, end });
        }
    }

    /// Slot `idx` is handed back by [`Outbox::consume`] once everything queued
    /// before this call is written.
    pub fn push_release(&mut self, idx: u16) {
        self.segs.push_back(Seg::Release(idx));
    }

    /// Fills `iov` with pending output in order, taking slot bytes from
    /// `slot(idx)`; returns how many iovecs were filled.
    pub fn fill_iovecs<'a>(
        &'a self,
        iov: &mut [IoSlice<'a>],
        slot: impl Fn(u16) -> &'a [u8],
    ) -> usize {
        let mut n = 0;
        let mut first = true;
        for seg in self.segs.iter() {
            if n == iov.len() {
                break;
            }
            let skip = if first { self.head_off } else { 0 };
            let bytes: &[u8] = match *seg {
                Seg::Arena { start, end } => &self.arena[start - self.base + skip..end - self.base],
                Seg::Slot { idx, start, end } => &slot(idx)[start as usize + skip..end as usize],
                Seg::Release(_) => continue,
            };
            first = false;
            if !bytes.is_empty() {
                iov[n] = IoSlice::new(bytes);
                n += 1;
            }
        }
        n
    }

    /// Marks up to `*written` bytes as sent. Stops at the first slot release
    /// it reaches and returns that slot (the caller frees it and calls again,
    /// with what is left of `*written`); `None` when all is accounted for.
    pub fn consume(&mut self, written: &mut usize) -> Option<u16> {
        while let Some(seg) = self.segs.front().copied() {
            let len = match seg {
                Seg::Release(idx) => {
                    self.segs.pop_front();
                    return Some(idx);
                }
                Seg::Arena { start, end } => end - start,
                Seg::Slot { start, end, .. } => (end - start) as usize,
            };
            let left = len - self.head_off;
            if *written < left {
                self.head_off += *written;
                self.pending -= *written;
                *written = 0;
                break;
            }
            *written -= left;
            self.pending -= left;
            self.head_off = 0;
            self.segs.pop_front();
        }
        self.compact();
        None
    }

    /// Drops arena bytes no segment refers to any more.
    fn compact(&mut self) {
        let first = self.segs.iter().find_map(|s| match s {
            Seg::Arena { start, .. } => Some(*start),
            _ => None,
        });
        match first {
            None => {
                self.base = self.abs_end();
                self.arena.clear();
            }
            Some(start) if start - self.base > COMPACT_AT => {
                self.arena.drain(..start - self.base);
                self.base = start;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(o: &Outbox, slots: &[Vec<u8>]) -> Vec<u8> {
        let mut iov = [IoSlice::new(&[]); 16];
        let n = o.fill_iovecs(&mut iov, |i| &slots[i as usize][..]);
        iov[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn headers_merge_and_slots_are_referenced_in_order() {
        let slots = vec![vec![1u8; 8], vec![2u8; 8]];
        let mut o = Outbox::default();
        o.push_with(|a| a.extend_from_slice(b"ab"));
        o.push_with(|a| a.extend_from_slice(b"cd"));
        o.push_slot(1, 2, 6);
        o.push_release(1);
        o.push_with(|a| a.extend_from_slice(b"e"));
        assert_eq!(o.pending(), 9);
        let mut iov = [IoSlice::new(&[]); 16];
        assert_eq!(o.fill_iovecs(&mut iov, |i| &slots[i as usize][..]), 3);
        assert_eq!(collect(&o, &slots), b"abcd\x02\x02\x02\x02e");
    }

    #[test]
    fn partial_writes_release_slots_only_after_their_bytes() {
        let slots = vec![vec![7u8; 4]];
        let mut o = Outbox::default();
        o.push_with(|a| a.extend_from_slice(b"hdr"));
        o.push_slot(0, 0, 4);
        o.push_release(0);
        o.push_with(|a| a.extend_from_slice(b"z"));
        let mut w = 5;
        assert_eq!(o.consume(&mut w), None);
        assert_eq!((w, o.pending()), (0, 3));
        assert_eq!(collect(&o, &slots), b"\x07\x07z");
        let mut w = 2;
        assert_eq!(o.consume(&mut w), Some(0));
        assert_eq!(o.consume(&mut w), None);
        assert_eq!(collect(&o, &slots), b"z");
        let mut w = 1;
        assert_eq!(o.consume(&mut w), None);
        assert_eq!(o.pending(), 0);
        assert!(o.arena.is_empty());
    }

    #[test]
    fn arena_is_compacted_under_a_long_stream() {
        let mut o = Outbox::with_capacity(1024, 16);
        for i in 0..10_000u32 {
            o.push_with(|a| a.extend_from_slice(&i.to_le_bytes()));
            o.push_slot(0, 0, 0); // empty ranges are not queued
            let mut w = if i % 2 == 0 { 3 } else { 5 };
            while o.consume(&mut w).is_some() {}
        }
        assert!(o.arena.len() <= COMPACT_AT + 8, "{}", o.arena.len());
    }
}
