//! The raid1 I/O path and membership core.
//!
//! Hot path (no allocation, no lock held across a member submission):
//! - A parent I/O takes a slot of a fixed [`Slab`]; its index tags the member
//!   I/Os. Writes send [`IoBuf::share`]s of the parent's buffer to every
//!   writable member; reads lend the parent's buffer to one member.
//! - Which members take writes and reads is one atomic word (`mask`), so a
//!   submission sees a consistent set without a lock. Each member counts its
//!   outstanding I/O; a submitter bumps the count *then* re-checks the mask, and
//!   a removal clears the mask *then* waits for the count to reach zero, so a
//!   slot is never reused while an old I/O could still reach it.
//!
//! I5 (health durable before a degraded write is acknowledged): when an in-sync
//! member leaves while others stay, the membership version is bumped
//! (`epoch_needed`) *before* the member leaves the mask, and the new record is
//! handed to the persist thread. A successful write completes at once only if
//! `epoch_durable >= epoch_needed`; otherwise its slot is parked in `held` and
//! the persist thread completes it once the record is on disk. Conservative:
//! while any removal is being persisted, every write waits for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bdev::ext::submit_wait;
use bdev::registry::{BdevRegistry, Tracked};
use bdev::{Bdev, BdevIo, Completion, IoBuf, IoError, IoKind, IoSink};
use parking_lot::{Mutex, RwLock};
use tokio::runtime::Handle;

use crate::persist::{DurableSink, Persister};
use crate::range::{Admit, Tracker};
use crate::rebuild::{Rebuild, RebuildOutcome};
use crate::record::{now_ms, MemberRecord, RaidRecord, RecordedState, RECORD_FORMAT};
use crate::slab::Slab;
use crate::state::{Departure, LeaveKind, MemberState, RaidState};
use crate::RaidOpts;

/// Most members (slots) a raid can have: member sets are 32-bit masks.
pub const MAX_MEMBERS: usize = 32;

const OP_WRITE: u8 = 1;
const OP_READ: u8 = 2;

fn tag(slot: u32, op: u8, member: usize) -> u64 {
    ((slot as u64) << 16) | ((op as u64) << 8) | member as u64
}

fn untag(t: u64) -> (u32, u8, usize) {
    ((t >> 16) as u32, (t >> 8) as u8, (t & 0xFF) as usize)
}

fn writable(m: u64) -> u32 {
    m as u32
}

fn readable(m: u64) -> u32 {
    (m >> 32) as u32
}

fn bit(i: usize) -> u32 {
    1u32 << i
}

/// Iterates the set bits of a member mask.
pub(crate) struct Bits(pub u32);

impl Iterator for Bits {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let i = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(i)
    }
}

pub(crate) fn kind_index(k: IoKind) -> usize {
    match k {
        IoKind::Read => 0,
        IoKind::Write => 1,
        IoKind::Flush => 2,
        IoKind::WriteZeroes => 3,
        IoKind::Unmap => 4,
    }
}

/// One parent I/O in flight.
#[derive(Default)]
struct Ctx {
    io: Option<BdevIo>,
    done: Option<Completion>,
    /// Member I/Os still out.
    pending: u32,
    ok: u32,
    failed: u32,
    /// Reads: members tried.
    tried: u32,
    /// In-sync (readable) members among the targets at dispatch.
    insync: u32,
    err: Option<IoError>,
    /// Registered in the range tracker (unregister at the end).
    registered: bool,
    /// Counted in `unregistered` (decrement at the end).
    counted: bool,
}

/// Hot-path view of one member slot.
pub(crate) struct Member {
    pub bdev: RwLock<Option<Arc<Tracked>>>,
    pub outstanding: AtomicU32,
}

/// Control-path view of one member slot.
#[derive(Debug)]
pub(crate) struct SlotInfo {
    pub state: MemberState,
    pub name: Option<String>,
    pub uuid: Option<uuid::Uuid>,
    pub num_blocks: u64,
    /// Changes whenever a new member takes the slot, so that late events about
    /// an old member do not hit the new one.
    pub gen: u64,
    pub since_ms: u64,
    pub bdev: Option<Arc<Tracked>>,
}

impl SlotInfo {
    pub fn empty() -> SlotInfo {
        SlotInfo {
            state: MemberState::Empty,
            name: None,
            uuid: None,
            num_blocks: 0,
            gen: 0,
            since_ms: now_ms(),
            bdev: None,
        }
    }
}

/// Membership and lifecycle, behind the control lock (never held across I/O).
#[derive(Debug)]
pub(crate) struct Ctl {
    pub state: RaidState,
    pub slots: Vec<SlotInfo>,
    /// Online members whose reads are enabled (a rebuilt member only once its
    /// `online` record is durable).
    pub reads_enabled: u32,
    /// Membership version; the record written for it carries this generation.
    pub version: u64,
    /// Recorded members without a slot (left earlier, kept out if seen again).
    pub departed: Vec<MemberRecord>,
    pub rebuild: Option<Arc<Rebuild>>,
    pub last_rebuild: Option<RebuildOutcome>,
    pub next_gen: u64,
}

impl Ctl {
    pub fn in_sync_mask(&self) -> u32 {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state.is_in_sync())
            .fold(0, |m, (i, _)| m | bit(i))
    }

    pub fn online_count(&self) -> usize {
        self.slots.iter().filter(|s| s.state.is_in_sync()).count()
    }

    /// The record of the current membership.
    pub fn record(&self, core: &CoreIdentity) -> RaidRecord {
        let mut members: Vec<MemberRecord> = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let (Some(name), Some(uuid)) = (&s.name, s.uuid) else {
                continue;
            };
            let (state, reason) = match &s.state {
                MemberState::Empty => continue,
                MemberState::Online => (RecordedState::Online, None),
                MemberState::Rebuilding => (RecordedState::Rebuilding, None),
                MemberState::Removing(d) | MemberState::Removed(d) => match d.kind {
                    LeaveKind::OutOfSync => (RecordedState::OutOfSync, Some(d.reason.clone())),
                    LeaveKind::LastInSync => (RecordedState::Online, Some(d.reason.clone())),
                },
            };
            members.push(MemberRecord {
                name: name.clone(),
                uuid,
                slot: Some(i as u32),
                state,
                since_ms: s.since_ms,
                reason,
            });
        }
        for d in &self.departed {
            if !members.iter().any(|m| m.name == d.name && m.uuid == d.uuid) {
                members.push(MemberRecord {
                    slot: None,
                    ..d.clone()
                });
            }
        }
        RaidRecord {
            format: RECORD_FORMAT,
            name: core.name.clone(),
            uuid: core.uuid,
            generation: self.version,
            updated_at_ms: now_ms(),
            block_size: core.block_size,
            num_blocks: core.num_blocks,
            members,
        }
    }
}

/// What a member leaving was caused by; decides whether the last in-sync
/// member may leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// An I/O error: the last in-sync member stays (the I/O fails instead),
    /// so that an acknowledged write always has a home.
    IoError,
    /// The device went away (registry hot-remove).
    HotRemove,
    /// `bdev_raid_remove_base_bdev`.
    Explicit,
    /// The rebuild of this member failed.
    Rebuild,
}

/// Immutable facts of a raid.
#[derive(Debug)]
pub(crate) struct CoreIdentity {
    pub name: String,
    pub uuid: uuid::Uuid,
    pub block_size: u32,
    pub num_blocks: u64,
    pub supported: [bool; 5],
    pub write_cache: bool,
}

/// Counters for status and tests.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub read_errors: AtomicU64,
    pub write_backs: AtomicU64,
    pub write_back_failures: AtomicU64,
    pub removals: AtomicU64,
    pub held_total: AtomicU64,
    pub held_failed: AtomicU64,
    pub deferred_total: AtomicU64,
}

/// The raid's shared state; [`crate::Raid1`] is the bdev face of it.
pub(crate) struct Core {
    pub id: CoreIdentity,
    pub opts: RaidOpts,
    me: Weak<Core>,
    /// Low 32 bits: writable members; high 32: readable (in sync, reads enabled).
    mask: AtomicU64,
    pub members: Box<[Member]>,
    slab: Slab<Ctx>,
    /// I/O waiting for a free slab slot (only when more than `max_inflight` are out).
    overflow: Mutex<VecDeque<(BdevIo, Completion)>>,
    overflow_len: AtomicUsize,
    epoch_needed: AtomicU64,
    epoch_durable: AtomicU64,
    held: Mutex<Vec<(u32, u64)>>,
    /// Holders of range-tracking (rebuild, repairs); >0 makes writes register.
    tracking: AtomicU32,
    /// Range writes in flight that did not register (tracking was off).
    unregistered: AtomicU64,
    tracker: Mutex<Tracker>,
    pub ctl: Mutex<Ctl>,
    pub persister: Persister,
    pub rt: Handle,
    pub registry: Arc<BdevRegistry>,
    /// Claim holder string, `raid <name>`.
    pub holder: String,
    pub rebuild_bw_mib: AtomicU64,
    pub counters: Counters,
    pub shutting_down: AtomicBool,
    /// Non-zero while quiesced: the token of the quiesce that holds new I/O
    /// back (see [`Core::quiesce`]).
    paused: AtomicU64,
    /// Source of quiesce tokens.
    pause_seq: AtomicU64,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("name", &self.id.name)
            .finish_non_exhaustive()
    }
}

/// Everything create decided, to build a [`Core`].
pub(crate) struct CoreInit {
    pub id: CoreIdentity,
    pub opts: RaidOpts,
    pub slots: Vec<SlotInfo>,
    pub departed: Vec<MemberRecord>,
    /// Version of the record already on disk (0 if none).
    pub prev_version: u64,
    pub persister: Persister,
    pub registry: Arc<BdevRegistry>,
    pub rt: Handle,
}

impl Core {
    pub fn new(init: CoreInit) -> Arc<Core> {
        let CoreInit {
            id,
            opts,
            slots,
            departed,
            prev_version,
            persister,
            registry,
            rt,
        } = init;
        let next_gen = slots.iter().map(|s| s.gen).max().unwrap_or(0) + 1;
        let reads_enabled = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state.is_in_sync())
            .fold(0, |m, (i, _)| m | bit(i));
        let members: Box<[Member]> = (0..MAX_MEMBERS)
            .map(|i| Member {
                bdev: RwLock::new(slots.get(i).and_then(|s| {
                    if s.state.is_writable() {
                        s.bdev.clone()
                    } else {
                        None
                    }
                })),
                outstanding: AtomicU32::new(0),
            })
            .collect();
        let holder = format!("raid {}", id.name);
        let bw = opts.rebuild_bw_mib;
        let slab = Slab::new(opts.max_inflight);
        let core = Arc::new_cyclic(|me| Core {
            id,
            opts,
            me: me.clone(),
            mask: AtomicU64::new(0),
            members,
            slab,
            overflow: Mutex::new(VecDeque::new()),
            overflow_len: AtomicUsize::new(0),
            epoch_needed: AtomicU64::new(0),
            epoch_durable: AtomicU64::new(0),
            held: Mutex::new(Vec::new()),
            tracking: AtomicU32::new(0),
            unregistered: AtomicU64::new(0),
            tracker: Mutex::new(Tracker::default()),
            ctl: Mutex::new(Ctl {
                state: RaidState::Configuring,
                slots,
                reads_enabled,
                version: prev_version,
                departed,
                rebuild: None,
                last_rebuild: None,
                next_gen,
            }),
            persister,
            rt,
            registry,
            holder,
            rebuild_bw_mib: AtomicU64::new(bw),
            counters: Counters::default(),
            shutting_down: AtomicBool::new(false),
            paused: AtomicU64::new(0),
            pause_seq: AtomicU64::new(0),
        });
        let sink: Weak<dyn DurableSink> = Arc::downgrade(&core) as Weak<dyn DurableSink>;
        core.persister.set_sink(sink);
        core
    }

    pub fn me(&self) -> Option<Arc<Core>> {
        self.me.upgrade()
    }

    /// Publishes which members take writes and reads. Called with the control
    /// lock held, after any `epoch_needed` bump the change requires.
    pub fn publish_mask(&self, ctl: &Ctl) {
        let mut w = 0u32;
        let mut r = 0u32;
        if ctl.state == RaidState::Online {
            for (i, s) in ctl.slots.iter().enumerate() {
                if s.state.is_writable() {
                    w |= bit(i);
                }
                if s.state.is_in_sync() && ctl.reads_enabled & bit(i) != 0 {
                    r |= bit(i);
                }
            }
        }
        self.mask
            .store(w as u64 | ((r as u64) << 32), Ordering::SeqCst);
    }

    /// Hands the current membership to the persist thread (version `ctl.version`).
    pub fn persist_locked(&self, ctl: &Ctl) {
        self.persister.request(ctl.version, ctl.record(&self.id));
    }

    pub fn supports(&self, k: IoKind) -> bool {
        self.id.supported[kind_index(k)]
    }

    /// Writes held for a persist right now.
    pub fn held_now(&self) -> usize {
        self.held.lock().len()
    }

    pub fn inflight(&self) -> u32 {
        self.slab.in_use()
    }

    pub fn deferred_now(&self) -> usize {
        self.tracker.lock().deferred()
    }

    // ------------------------------------------------------------------
    // Submission

    /// Starts a parent I/O.
    pub fn submit(self: &Arc<Self>, io: BdevIo, done: Completion) {
        if !self.supports(io.kind) {
            return done.complete(io, Err(IoError::NotSupported));
        }
        if let Err(e) = bdev::check_range(&io, self.id.block_size, self.id.num_blocks) {
            return done.complete(io, Err(e));
        }
        if self.mask.load(Ordering::Acquire) == 0 {
            return done.complete(io, Err(IoError::Removed));
        }
        match self.slab.alloc() {
            // The slot is taken before `paused` is read, and `quiesce` stores
            // `paused` before it reads the slots in use (all SeqCst): either
            // this I/O sees the pause, or the quiesce waits for it.
            Some(idx) if self.paused.load(Ordering::SeqCst) != 0 => {
                self.slab.free(idx);
                self.park(io, done)
            }
            Some(idx) => self.start(idx, io, done),
            None => self.park(io, done),
        }
    }

    fn park(self: &Arc<Self>, io: BdevIo, done: Completion) {
        self.overflow.lock().push_back((io, done));
        self.overflow_len.fetch_add(1, Ordering::SeqCst);
        self.unpark();
    }

    /// Starts parked I/O while slots are free.
    fn unpark(self: &Arc<Self>) {
        while self.overflow_len.load(Ordering::SeqCst) > 0 {
            let Some(idx) = self.slab.alloc() else { return };
            if self.paused.load(Ordering::SeqCst) != 0 {
                // `resume` unparks again once the pause is lifted.
                self.slab.free(idx);
                return;
            }
            let next = {
                let mut q = self.overflow.lock();
                let n = q.pop_front();
                if n.is_some() {
                    self.overflow_len.fetch_sub(1, Ordering::SeqCst);
                }
                n
            };
            match next {
                Some((io, done)) => self.start(idx, io, done),
                None => {
                    self.slab.free(idx);
                    return;
                }
            }
        }
    }

    fn start(self: &Arc<Self>, idx: u32, io: BdevIo, done: Completion) {
        let Some(slot) = self.slab.get(idx) else {
            return done.complete(io, Err(IoError::Aborted));
        };
        let kind = io.kind;
        let (off, n) = (io.offset_blocks, io.num_blocks);
        let ranged = matches!(kind, IoKind::Write | IoKind::WriteZeroes | IoKind::Unmap);
        {
            let mut c = slot.lock();
            c.io = Some(io);
            c.done = Some(done);
            c.pending = 0;
            c.ok = 0;
            c.failed = 0;
            c.tried = 0;
            c.insync = 0;
            c.err = None;
            c.registered = false;
            c.counted = ranged;
        }
        match kind {
            IoKind::Read => self.read_next(idx, 0, off ^ ((idx as u64) << 40)),
            IoKind::Flush => self.dispatch_write(idx),
            _ => {
                // Either a lock holder sees this write counted (and waits for
                // it), or this write sees tracking on (and registers).
                self.unregistered.fetch_add(1, Ordering::SeqCst);
                if self.tracking.load(Ordering::SeqCst) > 0 {
                    {
                        let mut c = slot.lock();
                        c.counted = false;
                        c.registered = true;
                    }
                    self.unregistered.fetch_sub(1, Ordering::SeqCst);
                    let admit = self.tracker.lock().register(idx, off, off + n);
                    if admit == Admit::Deferred {
                        self.counters.deferred_total.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                self.dispatch_write(idx)
            }
        }
    }

    /// Sends a write-like parent I/O to every writable member.
    pub(crate) fn dispatch_write(self: &Arc<Self>, idx: u32) {
        let Some(slot) = self.slab.get(idx) else {
            return;
        };
        let m = self.mask.load(Ordering::SeqCst);
        let w = writable(m);
        for i in Bits(w) {
            self.members[i].outstanding.fetch_add(1, Ordering::SeqCst);
        }
        let m2 = self.mask.load(Ordering::SeqCst);
        let targets = w & writable(m2);
        for i in Bits(w & !targets) {
            self.members[i].outstanding.fetch_sub(1, Ordering::SeqCst);
        }
        let insync = targets & readable(m) & readable(m2);
        if insync == 0 {
            for i in Bits(targets) {
                self.members[i].outstanding.fetch_sub(1, Ordering::SeqCst);
            }
            let fin = {
                let mut c = slot.lock();
                Fin::take(&mut c, Some(IoError::Removed))
            };
            return self.finish_write(idx, fin);
        }
        let mut bufs = [const { IoBuf::empty() }; MAX_MEMBERS];
        let params = {
            let mut c = slot.lock();
            c.pending = targets.count_ones();
            c.insync = insync;
            match c.io.as_ref() {
                Some(p) => {
                    if p.kind == IoKind::Write {
                        for i in Bits(targets) {
                            bufs[i] = p.buf.share();
                        }
                    }
                    Some((p.kind, p.offset_blocks, p.num_blocks, p.fua))
                }
                None => None,
            }
        };
        let Some((kind, off, n, fua)) = params else {
            for i in Bits(targets) {
                self.members[i].outstanding.fetch_sub(1, Ordering::SeqCst);
            }
            return;
        };
        for i in Bits(targets) {
            let mio = BdevIo {
                kind,
                offset_blocks: off,
                num_blocks: n,
                buf: std::mem::take(&mut bufs[i]),
                fua,
            };
            let b = self.members[i].bdev.read().clone();
            match b {
                Some(b) => b.submit(mio, Completion::new(self.clone(), tag(idx, OP_WRITE, i))),
                None => self.member_done(idx, OP_WRITE, i, mio, Err(IoError::Removed)),
            }
        }
    }

    /// Picks the member with the least outstanding I/O among `cand`; ties go
    /// to the k-th candidate (k from `salt`), so that equally idle members
    /// share the reads.
    fn pick(&self, cand: u32, salt: u64) -> usize {
        let cnt = cand.count_ones().max(1);
        let mixed = (salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32;
        let k = mixed % cnt;
        let mut best = cand.trailing_zeros() as usize;
        let mut best_key = (u32::MAX, u32::MAX);
        for (pos, i) in Bits(cand).enumerate() {
            let o = self.members[i].outstanding.load(Ordering::Relaxed);
            let order = (pos as u32 + cnt - k) % cnt;
            if (o, order) < best_key {
                best = i;
                best_key = (o, order);
            }
        }
        best
    }

    /// Sends a read to the next member to try, or fails it if none is left.
    fn read_next(self: &Arc<Self>, idx: u32, mut tried: u32, salt: u64) {
        let Some(slot) = self.slab.get(idx) else {
            return;
        };
        loop {
            let cand = readable(self.mask.load(Ordering::SeqCst)) & !tried;
            if cand == 0 {
                let err = slot.lock().err.take();
                return self.complete(idx, Err(err.unwrap_or(IoError::Removed)));
            }
            let i = self.pick(cand, salt);
            self.members[i].outstanding.fetch_add(1, Ordering::SeqCst);
            if readable(self.mask.load(Ordering::SeqCst)) & bit(i) == 0 {
                self.members[i].outstanding.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let Some(b) = self.members[i].bdev.read().clone() else {
                self.members[i].outstanding.fetch_sub(1, Ordering::SeqCst);
                tried |= bit(i);
                continue;
            };
            let mio = {
                let mut c = slot.lock();
                match c.io.as_mut() {
                    Some(p) => {
                        BdevIo::read(p.offset_blocks, p.num_blocks, std::mem::take(&mut p.buf))
                    }
                    None => {
                        drop(c);
                        self.members[i].outstanding.fetch_sub(1, Ordering::SeqCst);
                        return;
                    }
                }
            };
            return b.submit(mio, Completion::new(self.clone(), tag(idx, OP_READ, i)));
        }
    }

    // ------------------------------------------------------------------
    // Completion

    fn member_done(&self, idx: u32, op: u8, i: usize, io: BdevIo, result: Result<(), IoError>) {
        if i >= MAX_MEMBERS {
            return;
        }
        match op {
            OP_WRITE => self.write_member_done(idx, i, io, result),
            OP_READ => {
                self.members[i].outstanding.fetch_sub(1, Ordering::SeqCst);
                self.read_member_done(idx, i, io, result)
            }
            _ => tracing::error!(raid = %self.id.name, op, "completion with an unknown op"),
        }
    }

    fn write_member_done(&self, idx: u32, i: usize, io: BdevIo, result: Result<(), IoError>) {
        let flush = io.kind == IoKind::Flush;
        // Drop the member's share first, so the parent's buffer is unique again
        // when it goes back to the consumer.
        drop(io);
        let ok = match result {
            Ok(()) => true,
            // A member without a volatile cache has nothing to flush.
            Err(IoError::NotSupported) if flush => true,
            Err(_) => false,
        };
        if ok {
            self.members[i].outstanding.fetch_sub(1, Ordering::SeqCst);
        }
        // A failed member keeps its outstanding count until the failure is
        // handled below, so its slot cannot be drained and reused meanwhile.
        let Some(slot) = self.slab.get(idx) else {
            return;
        };
        let fin = {
            let mut c = slot.lock();
            if ok {
                c.ok |= bit(i);
            } else {
                c.failed |= bit(i);
                if c.err.is_none() {
                    c.err = result.err();
                }
            }
            c.pending = c.pending.saturating_sub(1);
            if c.pending > 0 {
                return;
            }
            let err = c.err.take();
            Fin::take(&mut c, err)
        };
        self.finish_write(idx, fin)
    }

    fn finish_write(&self, idx: u32, fin: Fin) {
        let mut success = fin.ok & fin.insync != 0;
        if fin.failed != 0 {
            success =
                self.write_failures(fin.ok & fin.insync, fin.failed, fin.kind, fin.err.as_ref());
            for i in Bits(fin.failed) {
                self.members[i].outstanding.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if fin.registered {
            self.tracker.lock().unregister(idx);
        }
        if fin.counted {
            self.unregistered.fetch_sub(1, Ordering::SeqCst);
        }
        if success {
            self.complete_or_hold(idx)
        } else {
            self.complete(idx, Err(fin.err.unwrap_or(IoError::Removed)))
        }
    }

    /// Members that failed a write leave the mirror when an in-sync member that
    /// is still in sync took the write. The write succeeds only then, and only
    /// if every failed in-sync member really left (so that no member recorded
    /// in sync misses an acknowledged write).
    fn write_failures(
        &self,
        ok_insync: u32,
        failed: u32,
        kind: Option<IoKind>,
        err: Option<&IoError>,
    ) -> bool {
        let mut ctl = self.ctl.lock();
        let survivors = ok_insync & ctl.in_sync_mask();
        let what = match kind {
            Some(k) => k.spdk_name(),
            None => "write",
        };
        let why = match err {
            Some(e) => format!("{what} failed: {e}"),
            None => format!("{what} failed"),
        };
        let mut all_left = true;
        for i in Bits(failed) {
            let Some(s) = ctl.slots.get(i) else { continue };
            let in_sync = s.state.is_in_sync();
            if survivors != 0 || !in_sync {
                let gen = s.gen;
                let left = self.leave_locked(&mut ctl, i, gen, Cause::IoError, why.clone());
                if in_sync && !left && ctl.slots.get(i).is_some_and(|s| s.state.is_in_sync()) {
                    all_left = false;
                }
            }
        }
        survivors != 0 && all_left
    }

    fn read_member_done(&self, idx: u32, i: usize, io: BdevIo, result: Result<(), IoError>) {
        let Some(slot) = self.slab.get(idx) else {
            return;
        };
        let mut c = slot.lock();
        if let Some(p) = c.io.as_mut() {
            p.buf = io.buf;
        }
        match result {
            Ok(()) => {
                let failed = c.failed;
                let range = c.io.as_ref().map(|p| (p.offset_blocks, p.num_blocks));
                drop(c);
                if failed != 0 {
                    if let Some((off, n)) = range {
                        self.spawn_repair(off, n, failed);
                    }
                }
                self.complete(idx, Ok(()))
            }
            Err(e) => {
                c.failed |= bit(i);
                c.tried |= bit(i);
                let tried = c.tried;
                let range = c.io.as_ref().map(|p| (p.offset_blocks, p.num_blocks));
                tracing::warn!(raid = %self.id.name, member = i, ?range, error = %e,
                    "read failed; retrying on another member");
                c.err = Some(e);
                drop(c);
                self.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                match self.me() {
                    Some(me) => {
                        me.read_next(idx, tried, range.map_or(0, |r| r.0) ^ ((idx as u64) << 40))
                    }
                    None => self.complete(idx, Err(IoError::Aborted)),
                }
            }
        }
    }

    /// Completes a successful write now, or parks it until the membership
    /// change it depends on is durable.
    fn complete_or_hold(&self, idx: u32) {
        let need = self.epoch_needed.load(Ordering::SeqCst);
        if self.epoch_durable.load(Ordering::SeqCst) >= need {
            return self.complete(idx, Ok(()));
        }
        let mut h = self.held.lock();
        // Re-check under the lock: the persist thread stores `epoch_durable`
        // before it takes this lock to release held writes.
        if self.epoch_durable.load(Ordering::SeqCst) >= need {
            drop(h);
            return self.complete(idx, Ok(()));
        }
        h.push((idx, need));
        self.counters.held_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Gives the parent I/O back to its consumer and frees the slot.
    fn complete(&self, idx: u32, result: Result<(), IoError>) {
        let Some(slot) = self.slab.get(idx) else {
            return;
        };
        let (io, done) = {
            let mut c = slot.lock();
            (c.io.take(), c.done.take())
        };
        self.slab.free(idx);
        if let (Some(io), Some(done)) = (io, done) {
            done.complete(io, result);
        }
        if self.overflow_len.load(Ordering::SeqCst) > 0 {
            if let Some(me) = self.me() {
                me.unpark();
            }
        }
    }

    // ------------------------------------------------------------------
    // Membership changes

    /// Takes member `i` out of the mirror (control lock held). Returns whether
    /// it left. See [`Cause`] for when the last in-sync member stays.
    pub fn leave_locked(
        &self,
        ctl: &mut Ctl,
        i: usize,
        gen: u64,
        cause: Cause,
        reason: String,
    ) -> bool {
        let Some(s) = ctl.slots.get(i) else {
            return false;
        };
        if s.gen != gen || !s.state.is_writable() {
            return false;
        }
        if ctl.state != RaidState::Online {
            // Offline (or being deleted): nothing is acknowledged any more, so
            // membership stays as recorded.
            return false;
        }
        let was_online = s.state.is_in_sync();
        let online = ctl.online_count();
        if was_online && online == 1 && cause == Cause::IoError {
            tracing::error!(raid = %self.id.name, member = ?s.name, %reason,
                "the last in-sync member failed an I/O; keeping it (the I/O fails)");
            return false;
        }
        let kind = if was_online && online == 1 {
            LeaveKind::LastInSync
        } else {
            LeaveKind::OutOfSync
        };
        let now = now_ms();
        let dep = Departure {
            kind,
            reason: reason.clone(),
            at_ms: now,
        };
        let name = s.name.clone();
        if let Err(e) = ctl.slots[i].state.move_to(MemberState::Removing(dep)) {
            tracing::error!(raid = %self.id.name, error = %e, "refused member state change");
            return false;
        }
        ctl.slots[i].since_ms = now;
        ctl.reads_enabled &= !bit(i);
        ctl.version += 1;
        if was_online && kind == LeaveKind::OutOfSync {
            // Before the member leaves the mask: any write that then misses it
            // sees this epoch and waits for the record.
            self.epoch_needed.fetch_max(ctl.version, Ordering::SeqCst);
        }
        if let Some(rb) = &ctl.rebuild {
            if rb.slot == i || kind == LeaveKind::LastInSync {
                rb.cancel();
            }
        }
        let mut drains = vec![(i, gen)];
        if kind == LeaveKind::LastInSync {
            for (j, sj) in ctl.slots.iter_mut().enumerate() {
                if sj.state == MemberState::Rebuilding {
                    let d = Departure {
                        kind: LeaveKind::OutOfSync,
                        reason: "the raid went offline during its rebuild".into(),
                        at_ms: now,
                    };
                    if sj.state.move_to(MemberState::Removing(d)).is_ok() {
                        sj.since_ms = now;
                        drains.push((j, sj.gen));
                    }
                }
            }
            if let Err(e) = ctl.state.move_to(RaidState::Offline) {
                tracing::error!(raid = %self.id.name, error = %e, "refused raid state change");
            }
        }
        self.publish_mask(ctl);
        self.persist_locked(ctl);
        self.counters.removals.fetch_add(1, Ordering::Relaxed);
        match kind {
            LeaveKind::OutOfSync => tracing::warn!(raid = %self.id.name, member = ?name, ?cause,
                %reason, version = ctl.version, "member removed from the mirror; it is out of sync"),
            LeaveKind::LastInSync => tracing::error!(raid = %self.id.name, member = ?name, ?cause,
                %reason, "last in-sync member removed; the raid is offline"),
        }
        for (j, g) in drains {
            self.spawn_drain(j, g);
        }
        if kind == LeaveKind::LastInSync {
            self.spawn_offline();
        }
        true
    }

    /// Takes member `i` out if it is still occupant `gen`.
    pub fn fail_member(&self, i: usize, gen: u64, cause: Cause, reason: String) -> bool {
        let mut ctl = self.ctl.lock();
        self.leave_locked(&mut ctl, i, gen, cause, reason)
    }

    /// The registry says the device `name` went away.
    pub fn on_hot_remove(&self, name: &str) {
        let mut ctl = self.ctl.lock();
        let found = ctl
            .slots
            .iter()
            .enumerate()
            .find(|(_, s)| s.name.as_deref() == Some(name) && s.state.is_writable())
            .map(|(i, s)| (i, s.gen));
        if let Some((i, gen)) = found {
            self.leave_locked(
                &mut ctl,
                i,
                gen,
                Cause::HotRemove,
                "hot-removed: the device went away".into(),
            );
        }
    }

    /// After a member left: wait for its in-flight I/O, then free the slot and
    /// release the claim.
    fn spawn_drain(&self, i: usize, gen: u64) {
        let me = self.me.clone();
        self.rt.spawn(async move {
            let t0 = Instant::now();
            let mut warned = false;
            let mut d = Duration::from_micros(200);
            loop {
                let Some(core) = me.upgrade() else { return };
                if core.members[i].outstanding.load(Ordering::SeqCst) == 0 {
                    break;
                }
                if !warned && t0.elapsed() > core.opts.drain_timeout {
                    warned = true;
                    tracing::warn!(raid = %core.id.name, member = i,
                        outstanding = core.members[i].outstanding.load(Ordering::SeqCst),
                        "a removed member still has I/O in flight; its claim stays until it completes");
                }
                drop(core);
                tokio::time::sleep(d).await;
                d = (d * 2).min(Duration::from_millis(20));
            }
            let Some(core) = me.upgrade() else { return };
            core.finish_removal(i, gen);
        });
    }

    /// `Removing -> Removed`: drops the device and releases its claim.
    pub fn finish_removal(&self, i: usize, gen: u64) {
        let released = {
            let mut ctl = self.ctl.lock();
            let Some(s) = ctl.slots.get_mut(i) else {
                return;
            };
            if s.gen != gen {
                return;
            }
            let MemberState::Removing(d) = &s.state else {
                return;
            };
            let d = d.clone();
            if let Err(e) = s.state.move_to(MemberState::Removed(d)) {
                tracing::error!(raid = %self.id.name, error = %e, "refused member state change");
                return;
            }
            s.bdev = None;
            *self.members[i].bdev.write() = None;
            s.name.clone()
        };
        if let Some(name) = released {
            // The device may be gone already (hot-remove): nothing to release then.
            let _ = self.registry.release(&name, &self.holder);
        }
    }

    /// The raid lost its last in-sync member: take it out of the registry, as
    /// SPDK unregisters a raid that falls below its minimum.
    fn spawn_offline(&self) {
        let me = self.me.clone();
        self.rt.spawn(async move {
            let Some(core) = me.upgrade() else { return };
            if core.registry.get(&core.id.name).is_some_and(|t| {
                t.inner().name() == core.id.name && t.inner().product_name() == crate::PRODUCT_NAME
            }) {
                core.registry.hot_remove(&core.id.name);
            }
        });
    }

    // ------------------------------------------------------------------
    // Range tracking, source reads, repair

    /// Makes writes register in the range tracker, and waits until the writes
    /// that started without registering are done.
    pub async fn begin_tracking(self: &Arc<Self>) -> TrackingGuard {
        self.tracking.fetch_add(1, Ordering::SeqCst);
        let g = TrackingGuard { core: self.clone() };
        let mut d = Duration::from_micros(50);
        while self.unregistered.load(Ordering::SeqCst) != 0 {
            tokio::time::sleep(d).await;
            d = (d * 2).min(Duration::from_millis(2));
        }
        g
    }

    /// Locks `[start, start + n)` against writes (tracking must be on).
    pub async fn lock_range(self: &Arc<Self>, start: u64, n: u64) -> RangeGuard {
        let (id, wait) = self.tracker.lock().lock(start, start + n);
        let g = RangeGuard {
            core: self.clone(),
            id,
        };
        if let Some(w) = wait {
            w.notified().await;
        }
        g
    }

    /// Reads `[pos, pos + n)` from an in-sync member not in `exclude`, trying
    /// others on error.
    pub async fn read_from_sources(
        &self,
        pos: u64,
        n: u64,
        mut buf: IoBuf,
        exclude: u32,
    ) -> Result<IoBuf, String> {
        let len = (n * self.id.block_size as u64) as usize;
        let mut tried = exclude;
        let mut last: Option<IoError> = None;
        loop {
            let cand = readable(self.mask.load(Ordering::SeqCst)) & !tried;
            if cand == 0 {
                return Err(match last {
                    Some(e) => format!("no in-sync member could read lba {pos}+{n}: {e}"),
                    None => format!("no in-sync member to read lba {pos}+{n} from"),
                });
            }
            let i = self.pick(cand, pos);
            tried |= bit(i);
            let Some(b) = self.members[i].bdev.read().clone() else {
                continue;
            };
            if buf.len() != len {
                buf = IoBuf::zeroed(len);
            }
            let (io, r) = submit_wait(&*b, BdevIo::read(pos, n, buf)).await;
            buf = io.buf;
            match r {
                Ok(()) => return Ok(buf),
                Err(e) => {
                    tracing::warn!(raid = %self.id.name, member = i, lba = pos, error = %e,
                        "source read failed; trying another member");
                    self.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                    last = Some(e);
                }
            }
        }
    }

    /// A read failed on `failed` members and succeeded elsewhere: write the
    /// good data back to them, under a range lock so that no user write can
    /// land in between and be overwritten by older data.
    fn spawn_repair(&self, off: u64, n: u64, failed: u32) {
        let Some(me) = self.me() else { return };
        let targets: Vec<(usize, u64)> = {
            let ctl = self.ctl.lock();
            Bits(failed)
                .filter_map(|i| {
                    ctl.slots
                        .get(i)
                        .filter(|s| s.state.is_in_sync())
                        .map(|s| (i, s.gen))
                })
                .collect()
        };
        if targets.is_empty() {
            return;
        }
        self.rt
            .spawn(async move { me.repair(off, n, targets).await });
    }

    async fn repair(self: Arc<Self>, off: u64, n: u64, targets: Vec<(usize, u64)>) {
        let _t = self.begin_tracking().await;
        let _g = self.lock_range(off, n).await;
        let exclude = targets.iter().fold(0, |m, (i, _)| m | bit(*i));
        let len = (n * self.id.block_size as u64) as usize;
        let buf = match self
            .read_from_sources(off, n, IoBuf::zeroed(len), exclude)
            .await
        {
            Ok(b) => b,
            Err(why) => {
                tracing::warn!(raid = %self.id.name, lba = off, %why, "cannot repair after a read error");
                return;
            }
        };
        for (i, gen) in targets {
            let b = {
                let ctl = self.ctl.lock();
                ctl.slots
                    .get(i)
                    .filter(|s| s.gen == gen && s.state.is_in_sync())
                    .and_then(|s| s.bdev.clone())
            };
            let Some(b) = b else { continue };
            let (_, r) = submit_wait(&*b, BdevIo::write(off, n, buf.share(), false)).await;
            match r {
                Ok(()) => {
                    self.counters.write_backs.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(raid = %self.id.name, member = ?b.name(), lba = off, blocks = n,
                        "wrote good data back after a read error");
                }
                Err(e) => {
                    self.counters
                        .write_back_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.fail_member(
                        i,
                        gen,
                        Cause::IoError,
                        format!("write-back after a read error failed: {e}"),
                    );
                }
            }
        }
    }

    /// Holds every new parent I/O back (queued, not failed) and waits until
    /// the ones already started are complete at the members, so that every
    /// in-sync member holds the same acknowledged writes until [`Core::resume`]:
    /// what a crash-consistent snapshot of all replicas needs. Returns the
    /// token that resumes it. Fails if already quiesced, or if I/O is still in
    /// flight after `within` (then nothing stays held back).
    pub async fn quiesce(&self, within: Duration) -> Result<u64, crate::RaidError> {
        let token = self.pause_seq.fetch_add(1, Ordering::SeqCst) + 1;
        if self
            .paused
            .compare_exchange(0, token, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(crate::RaidError::Quiesced {
                raid: self.id.name.clone(),
            });
        }
        let t0 = Instant::now();
        loop {
            let inflight = self.slab.in_use();
            if inflight == 0 {
                return Ok(token);
            }
            if t0.elapsed() > within {
                self.resume(Some(token));
                return Err(crate::RaidError::DrainTimeout {
                    raid: self.id.name.clone(),
                    inflight,
                    ms: within.as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    /// Lets held-back I/O go (the quiesce `token`, or whichever with `None`).
    /// Returns false when that quiesce is not the one in force.
    pub fn resume(&self, token: Option<u64>) -> bool {
        let cur = self.paused.load(Ordering::SeqCst);
        let ok = cur != 0
            && token.is_none_or(|t| t == cur)
            && self
                .paused
                .compare_exchange(cur, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
        if ok {
            if let Some(me) = self.me() {
                me.unpark();
            }
        }
        ok
    }

    /// The token of the quiesce in force, if any.
    pub fn quiesced(&self) -> Option<u64> {
        Some(self.paused.load(Ordering::SeqCst)).filter(|t| *t != 0)
    }

    /// I/Os held back right now (by a quiesce or for want of a slot).
    pub fn parked_now(&self) -> usize {
        self.overflow_len.load(Ordering::SeqCst)
    }

    /// Stops all I/O (delete): the raid goes offline without marking anyone out
    /// of sync (nothing is acknowledged any more, so every in-sync member keeps
    /// every acknowledged write).
    pub fn stop_io(&self) {
        let mut ctl = self.ctl.lock();
        self.shutting_down.store(true, Ordering::SeqCst);
        if ctl.state != RaidState::Offline {
            let _ = ctl.state.move_to(RaidState::Offline);
        }
        if let Some(rb) = &ctl.rebuild {
            rb.cancel();
        }
        self.publish_mask(&ctl);
        drop(ctl);
        // I/O held back by a quiesce must not wait for a resume that a
        // deleted raid never gets: it fails now like any other.
        self.resume(None);
    }

    /// Waits until no member I/O is in flight (bounded).
    pub async fn wait_idle(&self, within: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            let busy = self
                .members
                .iter()
                .any(|m| m.outstanding.load(Ordering::SeqCst) != 0)
                || self.slab.in_use() != 0;
            if !busy {
                return true;
            }
            if t0.elapsed() > within {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Outcome of a parent write once its members are done.
struct Fin {
    ok: u32,
    failed: u32,
    insync: u32,
    err: Option<IoError>,
    registered: bool,
    counted: bool,
    kind: Option<IoKind>,
}

impl Fin {
    fn take(c: &mut Ctx, err: Option<IoError>) -> Fin {
        let f = Fin {
            ok: c.ok,
            failed: c.failed,
            insync: c.insync,
            err,
            registered: c.registered,
            counted: c.counted,
            kind: c.io.as_ref().map(|p| p.kind),
        };
        c.registered = false;
        c.counted = false;
        f
    }
}

impl IoSink for Core {
    fn complete(&self, tag: u64, io: BdevIo, result: Result<(), IoError>) {
        let (idx, op, i) = untag(tag);
        self.member_done(idx, op, i, io, result)
    }
}

impl DurableSink for Core {
    fn on_durable(&self, version: u64) {
        self.epoch_durable.fetch_max(version, Ordering::SeqCst);
        let mut ready = Vec::new();
        self.held.lock().retain(|&(idx, need)| {
            if need <= version {
                ready.push(idx);
                false
            } else {
                true
            }
        });
        for idx in ready {
            self.complete(idx, Ok(()));
        }
    }

    fn on_persist_failed(&self, version: u64, error: &std::io::Error) {
        let mut failed = Vec::new();
        self.held.lock().retain(|&(idx, need)| {
            if need <= version {
                failed.push(idx);
                false
            } else {
                true
            }
        });
        if !failed.is_empty() {
            tracing::error!(raid = %self.id.name, writes = failed.len(), %error,
                "failing writes: the removal of a member could not be made durable");
        }
        for idx in failed {
            self.counters.held_failed.fetch_add(1, Ordering::Relaxed);
            self.complete(idx, Err(IoError::Errno(libc::EIO)));
        }
    }
}

/// Range tracking is on while this lives.
pub(crate) struct TrackingGuard {
    core: Arc<Core>,
}

impl Drop for TrackingGuard {
    fn drop(&mut self) {
        self.core.tracking.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A locked range; dropping it lets parked writes go.
pub(crate) struct RangeGuard {
    core: Arc<Core>,
    id: u64,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut go = Vec::new();
        self.core.tracker.lock().unlock(self.id, &mut go);
        for idx in go {
            self.core.dispatch_write(idx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for (s, op, m) in [
            (0u32, OP_WRITE, 0usize),
            (65535, OP_READ, 31),
            (u32::MAX >> 1, OP_WRITE, 7),
        ] {
            assert_eq!(untag(tag(s, op, m)), (s, op, m));
        }
    }

    #[test]
    fn bits_iterates_set_bits() {
        assert_eq!(Bits(0b1010_0001).collect::<Vec<_>>(), vec![0, 5, 7]);
        assert_eq!(Bits(0).count(), 0);
        assert_eq!(Bits(u32::MAX).count(), 32);
    }
}
