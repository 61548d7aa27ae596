//! A reusable io_uring reactor: one dedicated thread owns a ring and runs disk
//! operations (read, write, fsync, fallocate) on behalf of any thread.
//!
//! Why a dedicated thread: bdev consumers submit from many threads (NVMe/TCP
//! queues, NBD connections, tokio workers), and an io_uring submission queue has
//! a single producer. Submitters push an [`Op`] onto a shared queue; the reactor
//! drains it in batches, turns each op into one SQE, and runs completions on its
//! own thread. A submitter only makes a system call (an `eventfd` write) when the
//! reactor is asleep, so a busy reactor is fed without syscalls from submitters.
//!
//! Steady state does not allocate: the queue is a pair of `Vec`s that are swapped
//! and keep their capacity, and in-flight ops live in a slab preallocated to the
//! ring's completion capacity. Ops beyond that wait in a backlog.
//!
//! Three ways to submit, all non-blocking and callable from any thread:
//! - [`Reactor::submit_io`]: one bdev request, its data in `io.buf`; the result is
//!   mapped through [`IoError::from_errno`] and delivered through its [`Completion`].
//! - [`Reactor::submit`]: an owned [`IoBuf`], handed back with the raw result to a
//!   [`UringSink`] with the caller's tag.
//! - [`Reactor::submit_raw`] (unsafe): caller-managed memory, e.g. several ops into
//!   parts of one buffer (a replica store splitting a request over extents).
//!
//! Reads and writes that transfer fewer bytes than asked are continued until done;
//! a read that reaches end of file zero-fills the rest of its buffer (a block store
//! reads holes as zeroes) and reports how many bytes it really read.
//!
//! Dropping the [`Reactor`] lets every queued and in-flight op complete, then joins
//! the thread. If io_uring is not usable on this host, [`Reactor::new`] fails with
//! [`ReactorError`]; there is no silent fallback to another I/O path.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use parking_lot::Mutex;

use crate::{BdevIo, Completion, IoBuf, IoError};

/// A file descriptor shared between its owner and the ops in flight on it: an op
/// holds a clone, so closing the owner never lets the kernel see a recycled fd.
pub type SharedFd = Arc<File>;

/// Default number of submission queue entries.
pub const DEFAULT_ENTRIES: u32 = 256;

/// Largest single read/write SQE; longer transfers are continued (Linux caps a
/// single transfer just under 2 GiB anyway).
const MAX_CHUNK: usize = 1 << 30;

/// `user_data` of the reactor's own read on its wake-up eventfd.
const WAKE_TOKEN: u64 = u64::MAX;

/// What an op does. Offsets and lengths are in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read into the op's buffer at `offset`.
    Read { offset: u64 },
    /// Write the op's buffer at `offset`; `rw_flags` as for `pwritev2`
    /// (e.g. `libc::RWF_DSYNC` for a durable write).
    Write { offset: u64, rw_flags: i32 },
    /// `fsync`, or `fdatasync` when `datasync`.
    Fsync { datasync: bool },
    /// `fallocate(fd, mode, offset, len)`, e.g. `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`.
    Fallocate { offset: u64, len: u64, mode: i32 },
}

impl OpKind {
    fn transfers(&self) -> bool {
        matches!(self, OpKind::Read { .. } | OpKind::Write { .. })
    }
}

/// Receives the outcome of ops submitted with [`Reactor::submit`] or
/// [`Reactor::submit_raw`]. Called on the reactor thread: it must be quick and
/// must not block (push to a queue, wake a task). It may submit more ops.
pub trait UringSink: Send + Sync + 'static {
    /// `result` is the number of bytes transferred (0 for fsync and fallocate) or
    /// the positive errno. `buf` is the buffer the op owned (empty for raw ops).
    fn complete(&self, tag: u64, result: Result<usize, i32>, buf: IoBuf);
}

/// Why a reactor could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    #[error(
        "reactor {name}: io_uring is unavailable on this host ({source}); \
         corral needs Linux >= 5.6 with io_uring enabled (sysctl kernel.io_uring_disabled=0, \
         and not blocked by seccomp)"
    )]
    Unavailable {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reactor {name}: this kernel's io_uring lacks {op} (Linux >= 5.6 needed)")]
    MissingOp { name: String, op: &'static str },
    #[error("reactor {name}: ring size {entries} must be a power of two from 2 to 4096")]
    Entries { name: String, entries: u32 },
    #[error("reactor {name}: cannot create the wake-up eventfd: {source}")]
    EventFd {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reactor {name}: cannot start its thread: {source}")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where an op's result goes.
enum Target {
    Sink {
        sink: Arc<dyn UringSink>,
        tag: u64,
        buf: IoBuf,
    },
    Bdev {
        io: BdevIo,
        done: Completion,
    },
}

/// One queued or in-flight operation.
struct Op {
    fd: SharedFd,
    kind: OpKind,
    /// Data for reads and writes: inside the buffer owned by `target`, or memory
    /// the caller of `submit_raw` keeps valid until completion.
    ptr: *mut u8,
    len: usize,
    target: Target,
}

// SAFETY: `ptr` points into a heap buffer owned by `target` (its address does not
// change when the Op moves) or into memory that the caller of the unsafe
// `submit_raw` guaranteed stays valid and unaliased until completion. Only one
// thread handles an Op at a time (submitter, then the reactor).
unsafe impl Send for Op {}

impl Op {
    /// Delivers the result and releases the op.
    fn finish(self, result: Result<usize, i32>) {
        match self.target {
            Target::Sink { sink, tag, buf } => sink.complete(tag, result, buf),
            Target::Bdev { io, done } => {
                done.complete(io, result.map(|_| ()).map_err(IoError::from_errno))
            }
        }
    }
}

struct Queue {
    ops: Vec<Op>,
    /// False once the reactor thread has exited: later ops fail at once.
    running: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Set by the reactor before it blocks in the kernel; a submitter that finds
    /// it set clears it and writes the eventfd.
    sleeping: AtomicBool,
    shutdown: AtomicBool,
    eventfd: OwnedFd,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own. An eventfd
        // write only fails on counter overflow, which a handful of wake-ups cannot
        // reach; a failed wake would be repeated by the next submitter.
        let _ = unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    fn push(&self, op: Op) {
        let mut q = self.queue.lock();
        if !q.running {
            drop(q);
            op.finish(Err(libc::ESHUTDOWN));
            return;
        }
        q.ops.push(op);
        drop(q);
        // Ordering: the reactor sets `sleeping` before it checks the queue under the
        // same lock, so either it saw our op or we see its flag.
        if self.sleeping.load(Ordering::SeqCst) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }
}

/// An io_uring reactor thread. Share it as `Arc<Reactor>`; dropping the last
/// handle drains every op and joins the thread.
pub struct Reactor {
    name: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    entries: u32,
}

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("name", &self.name)
            .field("entries", &self.entries)
            .finish()
    }
}

impl Reactor {
    /// Starts a reactor named `name` (its thread is `uring-<name>`) with the
    /// default ring size.
    pub fn new(name: &str) -> Result<Reactor, ReactorError> {
        Self::with_entries(name, DEFAULT_ENTRIES)
    }

    /// Starts a reactor whose submission queue has `entries` slots; up to twice as
    /// many ops are in flight at once, more wait in a backlog.
    pub fn with_entries(name: &str, entries: u32) -> Result<Reactor, ReactorError> {
        if !entries.is_power_of_two() || !(2..=4096).contains(&entries) {
            return Err(ReactorError::Entries {
                name: name.into(),
                entries,
            });
        }
        // SAFETY: plain syscall; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(ReactorError::EventFd {
                name: name.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: efd is a freshly created descriptor nobody else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                ops: Vec::with_capacity(256),
                running: true,
            }),
            sleeping: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            eventfd,
        });

        // The ring is created on its own thread, so that it could be made
        // single-issuer; setup errors come back through this channel.
        let (tx, rx) = mpsc::sync_channel::<Result<(), ReactorError>>(1);
        let sh = shared.clone();
        let tname = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("uring-{name}"))
            .spawn(move || match Worker::new(&tname, entries, sh.clone()) {
                Ok(mut w) => {
                    let _ = tx.send(Ok(()));
                    w.run();
                }
                Err(e) => {
                    sh.queue.lock().running = false;
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|source| ReactorError::Thread {
                name: name.into(),
                source,
            })?;
        let started = rx.recv();
        match started {
            Ok(Ok(())) => Ok(Reactor {
                name: name.into(),
                shared,
                thread: Some(thread),
                entries,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(ReactorError::Thread {
                    name: name.into(),
                    source: std::io::Error::other("reactor thread exited during setup"),
                })
            }
        }
    }

    /// The name given at creation (its thread is `uring-<name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs one op for a bdev request: reads and writes use `io.buf` whole, other
    /// kinds ignore it. `done` gets the request back with the errno mapped through
    /// [`IoError::from_errno`]. A read past end of file yields zeroes.
    pub fn submit_io(&self, fd: &SharedFd, kind: OpKind, mut io: BdevIo, done: Completion) {
        let (ptr, len) = if kind.transfers() {
            (io.buf.as_mut_ptr(), io.buf.len())
        } else {
            (std::ptr::null_mut(), 0)
        };
        self.push_checked(Op {
            fd: fd.clone(),
            kind,
            ptr,
            len,
            target: Target::Bdev { io, done },
        });
    }

    /// Runs one op on an owned buffer: reads fill `buf` whole, writes write it
    /// whole. `sink` receives `tag`, the result and `buf`.
    pub fn submit(
        &self,
        fd: &SharedFd,
        kind: OpKind,
        mut buf: IoBuf,
        sink: Arc<dyn UringSink>,
        tag: u64,
    ) {
        let (ptr, len) = if kind.transfers() {
            (buf.as_mut_ptr(), buf.len())
        } else {
            (std::ptr::null_mut(), 0)
        };
        self.push_checked(Op {
            fd: fd.clone(),
            kind,
            ptr,
            len,
            target: Target::Sink { sink, tag, buf },
        });
    }

    /// Runs one op on caller-managed memory: `len` bytes at `ptr` (ignored for
    /// fsync and fallocate). `sink` receives `tag`, the result and an empty buffer.
    ///
    /// # Safety
    /// For reads, `ptr..ptr+len` must be valid for writes, and for writes valid for
    /// reads, from this call until `sink` is called for this op; nothing else may
    /// write that memory meanwhile (nor read it, for a read op). With O_DIRECT the
    /// memory and offsets must also meet the file's alignment, or the op fails
    /// with EINVAL.
    pub unsafe fn submit_raw(
        &self,
        fd: &SharedFd,
        kind: OpKind,
        ptr: *mut u8,
        len: usize,
        sink: Arc<dyn UringSink>,
        tag: u64,
    ) {
        let len = if kind.transfers() { len } else { 0 };
        self.push_checked(Op {
            fd: fd.clone(),
            kind,
            ptr,
            len,
            target: Target::Sink {
                sink,
                tag,
                buf: IoBuf::empty(),
            },
        });
    }

    /// Rejects what the kernel would misread, completes empty transfers at once,
    /// and queues the rest.
    fn push_checked(&self, op: Op) {
        let end = match op.kind {
            OpKind::Read { offset } | OpKind::Write { offset, .. } => {
                offset.checked_add(op.len as u64)
            }
            OpKind::Fallocate { offset, len, .. } => offset.checked_add(len),
            OpKind::Fsync { .. } => Some(0),
        };
        if !matches!(end, Some(e) if e <= i64::MAX as u64) {
            op.finish(Err(libc::EINVAL));
            return;
        }
        if op.kind.transfers() && op.len == 0 {
            op.finish(Ok(0));
            return;
        }
        self.shared.push(op);
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            // The last handle can be dropped by a completion callback on the reactor
            // thread itself; it cannot join itself, and it exits by itself once
            // everything has drained.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

struct InFlight {
    op: Op,
    /// Bytes transferred so far.
    done: usize,
}

/// The reactor thread's state; only that thread touches it.
struct Worker {
    ring: IoUring,
    shared: Arc<Shared>,
    slab: Vec<Option<InFlight>>,
    free: Vec<u32>,
    inflight: usize,
    incoming: Vec<Op>,
    backlog: VecDeque<Op>,
    /// Slots whose transfer came back short and must be continued.
    retry: Vec<u32>,
    /// Target of the read on the eventfd; boxed so its address is stable.
    wake_buf: Box<u64>,
    wake_armed: bool,
}

impl Worker {
    fn new(name: &str, entries: u32, shared: Arc<Shared>) -> Result<Worker, ReactorError> {
        let ring =
            IoUring::builder()
                .build(entries)
                .map_err(|source| ReactorError::Unavailable {
                    name: name.into(),
                    source,
                })?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|source| ReactorError::Unavailable {
                name: name.into(),
                source,
            })?;
        for (code, op) in [
            (opcode::Read::CODE, "IORING_OP_READ"),
            (opcode::Write::CODE, "IORING_OP_WRITE"),
            (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
            (opcode::Fallocate::CODE, "IORING_OP_FALLOCATE"),
        ] {
            if !probe.is_supported(code) {
                return Err(ReactorError::MissingOp {
                    name: name.into(),
                    op,
                });
            }
        }
        // One completion slot stays free for the eventfd read, so the completion
        // queue can never overflow.
        let cap = (ring.params().cq_entries() as usize)
            .saturating_sub(1)
            .max(1);
        Ok(Worker {
            ring,
            shared,
            slab: (0..cap).map(|_| None).collect(),
            free: (0..cap as u32).rev().collect(),
            inflight: 0,
            incoming: Vec::with_capacity(256),
            backlog: VecDeque::with_capacity(cap),
            retry: Vec::with_capacity(cap),
            wake_buf: Box::new(0),
            wake_armed: false,
        })
    }

    fn run(&mut self) {
        loop {
            let shutting_down = self.shared.shutdown.load(Ordering::SeqCst);
            if !self.wake_armed && !shutting_down {
                self.arm_wake();
            }
            std::mem::swap(&mut self.shared.queue.lock().ops, &mut self.incoming);
            self.backlog.extend(self.incoming.drain(..));
            self.start_backlog();
            self.resubmit();

            if shutting_down && self.inflight == 0 && !self.wake_armed && self.backlog.is_empty() {
                let mut q = self.shared.queue.lock();
                if q.ops.is_empty() {
                    q.running = false;
                    break;
                }
                continue;
            }

            // Sleep only when nothing can move without the kernel: no completions
            // to reap, no continuation waiting, no backlog that fits a free slot.
            let stuck = !self.retry.is_empty()
                || (!self.backlog.is_empty() && !self.free.is_empty())
                || (!self.wake_armed && !shutting_down);
            if self.ring.completion().is_empty() && !stuck {
                self.shared.sleeping.store(true, Ordering::SeqCst);
                let queued = !self.shared.queue.lock().ops.is_empty();
                if queued || self.shared.shutdown.load(Ordering::SeqCst) != shutting_down {
                    self.shared.sleeping.store(false, Ordering::SeqCst);
                    self.enter(0);
                } else {
                    self.enter(1);
                    self.shared.sleeping.store(false, Ordering::SeqCst);
                }
            } else {
                self.enter(0);
            }
            self.reap();
            self.resubmit();
        }
    }

    /// Submits pending SQEs, waiting for `want` completions.
    fn enter(&mut self, want: usize) {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Kernel short of resources or completions to reap first: the
                    // caller reaps and comes back.
                    Some(libc::EAGAIN) | Some(libc::EBUSY) => return,
                    _ => {
                        tracing::error!(error = %e, "io_uring_enter failed; retrying");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        return;
                    }
                },
            }
        }
    }

    fn arm_wake(&mut self) {
        let sqe = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            (&mut *self.wake_buf as *mut u64).cast::<u8>(),
            std::mem::size_of::<u64>() as u32,
        )
        .build()
        .user_data(WAKE_TOKEN);
        if self.push_sqe(&sqe) {
            self.wake_armed = true;
        }
    }

    /// Pushes one SQE, flushing the submission queue to the kernel if it is full.
    fn push_sqe(&mut self, sqe: &squeue::Entry) -> bool {
        for _ in 0..2 {
            // SAFETY: every SQE built here points at memory that stays valid until
            // its completion: the slab keeps the op (and its buffer) alive, raw
            // memory is the submitter's promise, and wake_buf lives in self.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return true;
            }
            self.enter(0);
        }
        false
    }

    /// Moves ops from the backlog into free slots and the submission queue.
    fn start_backlog(&mut self) {
        while let Some(&slot) = self.free.last() {
            let Some(op) = self.backlog.pop_front() else {
                break;
            };
            let sqe = sqe_for(&op, 0, slot);
            if !self.push_sqe(&sqe) {
                self.backlog.push_front(op);
                break;
            }
            self.free.pop();
            self.slab[slot as usize] = Some(InFlight { op, done: 0 });
            self.inflight += 1;
        }
    }

    fn reap(&mut self) {
        // Short transfers are only noted here: their next SQE cannot be pushed while
        // the completion queue is borrowed.
        let Worker {
            ring,
            slab,
            free,
            inflight,
            retry,
            wake_armed,
            ..
        } = self;
        for cqe in ring.completion() {
            let ud = cqe.user_data();
            if ud == WAKE_TOKEN {
                *wake_armed = false;
                continue;
            }
            let slot = ud as usize;
            let Some(ent) = slab.get_mut(slot).and_then(|s| s.as_mut()) else {
                tracing::error!(user_data = ud, "io_uring completion for an unknown op");
                continue;
            };
            let res = cqe.result();
            let outcome = if res < 0 {
                Some(Err(-res))
            } else if ent.op.kind.transfers() {
                ent.done += res as usize;
                if ent.done >= ent.op.len {
                    Some(Ok(ent.done))
                } else if res > 0 {
                    retry.push(slot as u32);
                    None
                } else if matches!(ent.op.kind, OpKind::Read { .. }) {
                    // End of file: the rest reads as zeroes (a hole).
                    // SAFETY: done < len and ptr..ptr+len is valid for writes (see Op).
                    unsafe {
                        std::ptr::write_bytes(ent.op.ptr.add(ent.done), 0, ent.op.len - ent.done)
                    };
                    Some(Ok(ent.done))
                } else {
                    // A write that makes no progress and reports no error.
                    Some(Err(libc::EIO))
                }
            } else {
                Some(Ok(0))
            };
            if let Some(result) = outcome {
                if let Some(ent) = slab[slot].take() {
                    free.push(slot as u32);
                    *inflight -= 1;
                    if catch_unwind(AssertUnwindSafe(|| ent.op.finish(result))).is_err() {
                        tracing::error!("an io_uring completion callback panicked");
                    }
                }
            }
        }
    }

    /// Continues transfers that came back short.
    fn resubmit(&mut self) {
        let mut i = 0;
        while i < self.retry.len() {
            let slot = self.retry[i];
            let Some(ent) = self.slab[slot as usize].as_ref() else {
                i += 1;
                continue;
            };
            let sqe = sqe_for(&ent.op, ent.done, slot);
            if !self.push_sqe(&sqe) {
                // The kernel is not taking SQEs right now; try again next round.
                self.retry.drain(..i);
                return;
            }
            i += 1;
        }
        self.retry.clear();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if std::thread::panicking() && self.inflight > 0 {
            // The kernel may still write into in-flight buffers; never free them.
            std::mem::forget(std::mem::take(&mut self.slab));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
        }
    }
}

/// Builds the SQE for `op`, continuing after `done` bytes.
fn sqe_for(op: &Op, done: usize, slot: u32) -> squeue::Entry {
    let fd = types::Fd(op.fd.as_raw_fd());
    let rest = op.len.saturating_sub(done).min(MAX_CHUNK) as u32;
    let sqe = match op.kind {
        OpKind::Read { offset } => opcode::Read::new(fd, op.ptr.wrapping_add(done), rest)
            .offset(offset + done as u64)
            .build(),
        OpKind::Write { offset, rw_flags } => {
            opcode::Write::new(fd, op.ptr.wrapping_add(done).cast_const(), rest)
                .offset(offset + done as u64)
                .rw_flags(rw_flags)
                .build()
        }
        OpKind::Fsync { datasync } => {
            let flags = if datasync {
                types::FsyncFlags::DATASYNC
            } else {
                types::FsyncFlags::empty()
            };
            opcode::Fsync::new(fd).flags(flags).build()
        }
        OpKind::Fallocate { offset, len, mode } => opcode::Fallocate::new(fd, len)
            .offset(offset)
            .mode(mode)
            .build(),
    };
    sqe.user_data(slot as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::sync::atomic::AtomicUsize;

    type Results = Mutex<Vec<(u64, Result<usize, i32>, IoBuf)>>;

    #[derive(Default)]
    struct Collect {
        got: Results,
    }
    impl UringSink for Collect {
        fn complete(&self, tag: u64, result: Result<usize, i32>, buf: IoBuf) {
            self.got.lock().push((tag, result, buf));
        }
    }
    impl Collect {
        fn wait(&self, n: usize) -> Vec<(u64, Result<usize, i32>, IoBuf)> {
            let t0 = std::time::Instant::now();
            while self.got.lock().len() < n {
                assert!(t0.elapsed().as_secs() < 20, "ops did not complete");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let mut v = std::mem::take(&mut *self.got.lock());
            v.sort_by_key(|e| e.0);
            v
        }
    }

    fn temp_file(name: &str, len: u64) -> (std::path::PathBuf, SharedFd) {
        let dir = std::env::temp_dir().join(format!("corral-uring-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(len).unwrap();
        (dir, Arc::new(f))
    }

    #[test]
    fn owned_ops_roundtrip_and_eof_zero_fill() {
        let r = Reactor::new("t-owned").unwrap();
        let (dir, fd) = temp_file("owned", 8192);
        let sink = Arc::new(Collect::default());
        let mut w = IoBuf::zeroed(4096);
        w.fill(0x5a);
        r.submit(
            &fd,
            OpKind::Write {
                offset: 4096,
                rw_flags: libc::RWF_DSYNC,
            },
            w,
            sink.clone(),
            1,
        );
        assert!(matches!(sink.wait(1)[0].1, Ok(4096)));
        r.submit(
            &fd,
            OpKind::Fsync { datasync: false },
            IoBuf::empty(),
            sink.clone(),
            2,
        );
        assert_eq!(sink.wait(1)[0].1, Ok(0));
        // A read across end of file: 4096 real bytes, then zeroes.
        let mut junk = IoBuf::zeroed(12288);
        junk.fill(0xff);
        r.submit(&fd, OpKind::Read { offset: 4096 }, junk, sink.clone(), 3);
        let got = sink.wait(1);
        assert_eq!(got[0].1, Ok(4096));
        assert!(got[0].2[..4096].iter().all(|&b| b == 0x5a));
        assert!(got[0].2[4096..].iter().all(|&b| b == 0));
        // Bad fd use reports the errno instead of failing the reactor.
        let ro = Arc::new(File::open(dir.join("f")).unwrap());
        r.submit(
            &ro,
            OpKind::Write {
                offset: 0,
                rw_flags: 0,
            },
            IoBuf::zeroed(512),
            sink.clone(),
            4,
        );
        assert_eq!(sink.wait(1)[0].1, Err(libc::EBADF));
        // Offsets the kernel would read as negative are refused up front.
        r.submit(
            &fd,
            OpKind::Read {
                offset: u64::MAX - 10,
            },
            IoBuf::zeroed(512),
            sink.clone(),
            5,
        );
        assert_eq!(sink.wait(1)[0].1, Err(libc::EINVAL));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn raw_ops_into_parts_of_one_buffer_and_fallocate() {
        let r = Reactor::new("t-raw").unwrap();
        let (dir, fd) = temp_file("raw", 1 << 20);
        {
            let mut f: &File = &fd;
            f.seek(SeekFrom::Start(0)).unwrap();
            let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
            f.write_all(&data).unwrap();
        }
        let sink = Arc::new(Collect::default());
        let mut buf = IoBuf::zeroed(65536);
        let base = buf.as_mut_ptr();
        for i in 0..16u64 {
            // SAFETY: each op gets a disjoint 4 KiB part of `buf`, which outlives the
            // wait below.
            unsafe {
                r.submit_raw(
                    &fd,
                    OpKind::Read { offset: i * 4096 },
                    base.add(i as usize * 4096),
                    4096,
                    sink.clone(),
                    i,
                )
            };
        }
        let got = sink.wait(16);
        assert!(got.iter().all(|g| g.1 == Ok(4096) && g.2.is_empty()));
        assert!(buf.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        r.submit(
            &fd,
            OpKind::Fallocate {
                offset: 0,
                len: 4096,
                mode,
            },
            IoBuf::empty(),
            sink.clone(),
            0,
        );
        assert_eq!(sink.wait(1)[0].1, Ok(0));
        let mut first = [1u8; 4096];
        let mut f: &File = &fd;
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut first).unwrap();
        assert!(first.iter().all(|&b| b == 0));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Counts completions; used to show that drop drains everything queued.
    struct Count(AtomicUsize);
    impl UringSink for Count {
        fn complete(&self, _tag: u64, result: Result<usize, i32>, _buf: IoBuf) {
            assert!(result.is_ok());
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn drop_drains_in_flight_and_backlog() {
        let (dir, fd) = temp_file("drain", 4 << 20);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        // A small ring, so most of the 2000 ops sit in the backlog at drop time.
        let r = Reactor::with_entries("t-drain", 8).unwrap();
        for i in 0..2000u64 {
            let kind = if i % 2 == 0 {
                OpKind::Write {
                    offset: (i % 1024) * 4096,
                    rw_flags: 0,
                }
            } else {
                OpKind::Read {
                    offset: (i % 1024) * 4096,
                }
            };
            r.submit(&fd, kind, IoBuf::zeroed(4096), count.clone(), i);
        }
        drop(r);
        assert_eq!(count.0.load(Ordering::SeqCst), 2000);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A sink that holds the last handle to its reactor and drops it on the
    /// reactor thread: the reactor must not try to join itself.
    struct DropsReactor(Mutex<Option<Arc<Reactor>>>, mpsc::SyncSender<()>);
    impl UringSink for DropsReactor {
        fn complete(&self, _tag: u64, _result: Result<usize, i32>, _buf: IoBuf) {
            drop(self.0.lock().take());
            let _ = self.1.try_send(());
        }
    }

    #[test]
    fn last_handle_dropped_on_reactor_thread() {
        let (dir, fd) = temp_file("selfdrop", 4096);
        let r = Arc::new(Reactor::new("t-selfdrop").unwrap());
        let (tx, rx) = mpsc::sync_channel(1);
        let sink = Arc::new(DropsReactor(Mutex::new(Some(r.clone())), tx));
        r.submit(
            &fd,
            OpKind::Fsync { datasync: true },
            IoBuf::empty(),
            sink,
            0,
        );
        drop(r);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// With io_uring_setup forbidden (as seccomp profiles of container runtimes
    /// do), creating a reactor fails with an error that says so.
    #[test]
    fn fails_clearly_without_io_uring() {
        // On a thread of its own: the filter binds this thread and the reactor
        // thread it starts, nothing else in the test process.
        std::thread::spawn(|| {
            let stmt = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
                code: code as u16,
                jt,
                jf,
                k,
            };
            let filter = [
                // Load seccomp_data.nr (offset 0).
                stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
                stmt(
                    libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                    0,
                    1,
                    libc::SYS_io_uring_setup as u32,
                ),
                stmt(
                    libc::BPF_RET | libc::BPF_K,
                    0,
                    0,
                    libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
                ),
                stmt(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            // SAFETY: prctl with valid arguments; prog and filter outlive the call.
            unsafe {
                assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
                assert_eq!(
                    libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog),
                    0
                );
            }
            let e = Reactor::new("t-noring").unwrap_err();
            assert!(matches!(e, ReactorError::Unavailable { .. }), "{e}");
            assert!(e.to_string().contains("io_uring is unavailable"), "{e}");
        })
        .join()
        .unwrap();
    }

    struct Panics;
    impl UringSink for Panics {
        fn complete(&self, _tag: u64, _result: Result<usize, i32>, _buf: IoBuf) {
            panic!("sink bug (expected by the test)");
        }
    }

    /// A buggy sink does not take the reactor down with it.
    #[test]
    fn panicking_sink_does_not_stop_the_reactor() {
        let r = Reactor::new("t-panic").unwrap();
        let (dir, fd) = temp_file("panic", 8192);
        r.submit(
            &fd,
            OpKind::Fsync { datasync: true },
            IoBuf::empty(),
            Arc::new(Panics),
            0,
        );
        let sink = Arc::new(Collect::default());
        r.submit(
            &fd,
            OpKind::Read { offset: 0 },
            IoBuf::zeroed(4096),
            sink.clone(),
            1,
        );
        assert_eq!(sink.wait(1)[0].1, Ok(4096));
        drop(r);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_bad_ring_size() {
        assert!(matches!(
            Reactor::with_entries("x", 3),
            Err(ReactorError::Entries { .. })
        ));
        assert!(matches!(
            Reactor::with_entries("x", 0),
            Err(ReactorError::Entries { .. })
        ));
    }
}
