//! `corral bench`: an NVMe/TCP load generator on corral's host, in the spirit
//! of SPDK's `spdk_nvme_perf`.
//!
//! It connects one controller, opens `--queues` I/O queues of its own
//! ([`IoQpair`]: no task hop, no lock, no heap allocation per I/O) and keeps
//! `--queue-depth` commands in flight on each for `--time` seconds. Every queue
//! is driven from one thread (pinned with `--core`): with `--poll` a single loop
//! busy-polls all queues, as SPDK's perf does on a core; without it each queue
//! is a task that sleeps in epoll between completions.
//!
//! Every block it writes carries a header (a magic number and the block's LBA)
//! and a fixed body, so the data of a block depends on its LBA only. `--verify`
//! checks every read: blocks this run wrote (before the read was sent) must
//! hold exactly that, and a block holding the header of another LBA is
//! misdirected data, whoever wrote it. Writes cost no extra CPU for this: the
//! body is written into the buffers once, and only the 16-byte headers change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bdev::{IoBuf, IoKind};
use nvmf::host::queue::{Command, Done, IoCmd, Request};
use nvmf::host::{ControllerOpts, HostController, IoQpair};
use nvmf::TransportId;
use serde_json::{json, Value};

/// Access pattern (spdk_nvme_perf's `-w`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    Read,
    Write,
    Randread,
    Randwrite,
    /// Sequential, reads and writes mixed by `--rwmixread`.
    Rw,
    /// Random, reads and writes mixed by `--rwmixread`.
    Randrw,
}

impl Pattern {
    fn random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }
    /// Percentage of reads.
    fn read_pct(self, mix: u8) -> u8 {
        match self {
            Pattern::Read | Pattern::Randread => 100,
            Pattern::Write | Pattern::Randwrite => 0,
            Pattern::Rw | Pattern::Randrw => mix.min(100),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::Randread => "randread",
            Pattern::Randwrite => "randwrite",
            Pattern::Rw => "rw",
            Pattern::Randrw => "randrw",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Target address.
    #[arg(long, default_value = "127.0.0.1")]
    pub traddr: String,
    /// Target port.
    #[arg(long, default_value = "4420")]
    pub trsvcid: String,
    /// Subsystem NQN (`corral target`'s default).
    #[arg(long, default_value = "nqn.2024-01.io.corral:target")]
    pub subnqn: String,
    /// Host NQN (default: a fresh uuid NQN).
    #[arg(long)]
    pub hostnqn: Option<String>,
    /// Namespace to drive.
    #[arg(long, default_value_t = 1)]
    pub nsid: u32,
    /// Commands in flight per queue.
    #[arg(short = 'q', long = "queue-depth", default_value_t = 32)]
    pub queue_depth: u16,
    /// Bytes per I/O (a multiple of the block size; 4k, 128k, 1m accepted).
    /// spdk_nvme_perf's `-o`; here `-s`, as `-o` is corral's global output flag.
    #[arg(short = 's', long = "io-size", visible_alias = "bs", default_value = "4k", value_parser = parse_size)]
    pub io_size: usize,
    /// Access pattern.
    #[arg(short = 'w', long, value_enum, default_value = "randread")]
    pub pattern: Pattern,
    /// Percentage of reads for `rw` and `randrw`.
    #[arg(short = 'M', long, default_value_t = 50)]
    pub rwmixread: u8,
    /// Measured run time in seconds (fractions allowed).
    #[arg(short = 't', long = "time", default_value_t = 10.0)]
    pub time: f64,
    /// Seconds of load before measuring starts (not counted).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// I/O queues (each its own connection), all driven from one thread.
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Ask for header digests.
    #[arg(long)]
    pub hdgst: bool,
    /// Ask for data digests.
    #[arg(long)]
    pub ddgst: bool,
    /// Busy-poll the queues instead of sleeping in epoll between completions.
    #[arg(long)]
    pub poll: bool,
    /// Pin the load generator to this CPU.
    #[arg(long)]
    pub core: Option<usize>,
    /// Check every read against what this run wrote (and catch misdirected blocks).
    #[arg(long)]
    pub verify: bool,
    /// Before the run, write the whole namespace once (sequentially, with the
    /// verify pattern): later reads then read data, and writes land on
    /// storage that is already allocated (a RAM or thin namespace allocates on
    /// first write, and SPDK's malloc bdevs are preallocated).
    #[arg(long)]
    pub prefill: bool,
    /// Seed of the random offsets (each queue derives its own).
    #[arg(long, default_value_t = 0x9E37_79B9_7F4A_7C15)]
    pub seed: u64,
    /// Print the report as JSON (corral's global `-o json` should set this too).
    #[arg(long)]
    pub json: bool,
}

/// Parses a byte count with an optional k/m/g suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("ib")
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(&t);
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1usize << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: usize = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 4k, 128k, 1m)"))?;
    n.checked_mul(mul)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?}: size must be above 0 and fit in memory"))
}

static ALLOC_COUNTER: OnceLock<fn() -> u64> = OnceLock::new();

/// Lets a binary with a counting allocator report heap allocations per I/O
/// (the function returns the calling thread's allocations so far). Used by
/// `examples/bench.rs`, which installs such an allocator; the `corral` binary does not.
#[allow(dead_code)]
pub fn set_alloc_counter(f: fn() -> u64) {
    let _ = ALLOC_COUNTER.set(f);
}

fn allocs_now() -> Option<u64> {
    ALLOC_COUNTER.get().map(|f| f())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    check_args(&a)?;
    if let Some(cpu) = a.core {
        pin(cpu)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let report = rt.block_on(bench(&a))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.text());
    }
    if report.total.errors > 0 {
        bail!("{} I/O errors", report.total.errors);
    }
    if report.total.mismatches > 0 {
        bail!(
            "verify: {} blocks read back differ from what was written",
            report.total.mismatches
        );
    }
    Ok(())
}

fn check_args(a: &Args) -> anyhow::Result<()> {
    if a.queue_depth == 0 {
        bail!("--queue-depth must be at least 1");
    }
    if a.queues == 0 {
        bail!("--queues must be at least 1");
    }
    if a.rwmixread > 100 {
        bail!("--rwmixread is a percentage (0..=100)");
    }
    if !(a.time > 0.0 && a.time.is_finite()) {
        bail!("--time must be above 0 seconds");
    }
    if !(a.warmup >= 0.0 && a.warmup.is_finite()) {
        bail!("--warmup must be 0 or more seconds");
    }
    Ok(())
}

fn pin(cpu: usize) -> anyhow::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        bail!("--core {cpu}: no such CPU");
    }
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < CPU_SETSIZE (checked above); set is a valid cpu_set_t.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; set is initialised and outlives the call.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        bail!("--core {cpu}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to an rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

// ------------------------------------------------------------- histogram ----

/// Latency histogram: 50 ns buckets below 1 ms, 10 µs buckets up to 100 ms,
/// and one bucket beyond. Allocated once; adding is two increments.
#[derive(Debug, Clone)]
struct Hist {
    fine: Vec<u64>,
    coarse: Vec<u64>,
    n: u64,
    sum_ns: u128,
    max_ns: u64,
}

const FINE_NS: u64 = 50;
const FINE_END_NS: u64 = 1_000_000;
const COARSE_NS: u64 = 10_000;
const COARSE_BUCKETS: usize = 10_001;

impl Hist {
    fn new() -> Self {
        Hist {
            fine: vec![0; (FINE_END_NS / FINE_NS) as usize],
            coarse: vec![0; COARSE_BUCKETS],
            n: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
    fn add(&mut self, ns: u64) {
        self.n += 1;
        self.sum_ns += ns as u128;
        self.max_ns = self.max_ns.max(ns);
        if ns < FINE_END_NS {
            self.fine[(ns / FINE_NS) as usize] += 1;
        } else {
            self.coarse[((ns / COARSE_NS) as usize).min(COARSE_BUCKETS - 1)] += 1;
        }
    }
    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.fine.iter_mut().zip(&o.fine) {
            *a += b;
        }
        for (a, b) in self.coarse.iter_mut().zip(&o.coarse) {
            *a += b;
        }
        self.n += o.n;
        self.sum_ns += o.sum_ns;
        self.max_ns = self.max_ns.max(o.max_ns);
    }
    fn mean_us(&self) -> f64 {
        self.sum_ns as f64 / self.n.max(1) as f64 / 1000.0
    }
    /// The `p` quantile (0..1) in µs, at the middle of its bucket.
    fn pct_us(&self, p: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let want = ((self.n as f64 * p).ceil() as u64).max(1);
        let mut acc = 0;
        for (i, c) in self.fine.iter().enumerate() {
            acc += c;
            if acc >= want {
                return (i as f64 + 0.5) * FINE_NS as f64 / 1000.0;
            }
        }
        for (i, c) in self.coarse.iter().enumerate() {
            acc += c;
            if acc >= want {
                return (i as f64 + 0.5) * COARSE_NS as f64 / 1000.0;
            }
        }
        self.max_ns as f64 / 1000.0
    }
}

// --------------------------------------------------------- data pattern ----

/// First 8 bytes of every block corral bench writes ("corralbn").
const MAGIC: u64 = u64::from_le_bytes(*b"corralbn");

/// The bytes of a block written at `lba`: the magic, the LBA, then a body that
/// is the same for every block.
fn block_template(bs: usize) -> Vec<u8> {
    let mut t = vec![0u8; bs];
    t[..8].copy_from_slice(&MAGIC.to_le_bytes());
    for (i, w) in t[16..].chunks_mut(8).enumerate() {
        let v = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5A5A_A5A5_0F0F_F0F0;
        w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
    }
    t
}

/// Stamps the per-block headers of a write buffer (the body is already there).
fn stamp(buf: &mut [u8], bs: usize, slba: u64) {
    for (i, b) in buf.chunks_mut(bs).enumerate() {
        b[8..16].copy_from_slice(&(slba + i as u64).to_le_bytes());
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    reads: u64,
    writes: u64,
    bytes: u64,
    errors: u64,
    /// Blocks read that this run had written, and that matched.
    verified: u64,
    /// Blocks read that held this pattern for their LBA from an earlier writer.
    verified_prior: u64,
    /// Blocks read that no one had written with this pattern (not checked).
    unwritten: u64,
    mismatches: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.bytes += o.bytes;
        self.errors += o.errors;
        self.verified += o.verified;
        self.verified_prior += o.verified_prior;
        self.unwritten += o.unwritten;
        self.mismatches += o.mismatches;
    }
    fn ios(&self) -> u64 {
        self.reads + self.writes
    }
}

/// Which I/O-size slots of the namespace this run has written (shared by the
/// queues; atomics so that queue tasks stay `Send`).
#[derive(Debug)]
struct Written(Vec<AtomicU64>);

impl Written {
    fn new(slots: u64) -> Self {
        Written((0..slots.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    fn set(&self, slot: u64) {
        self.0[(slot / 64) as usize].fetch_or(1 << (slot % 64), Ordering::Relaxed);
    }
    fn get(&self, slot: u64) -> bool {
        self.0[(slot / 64) as usize].load(Ordering::Relaxed) & (1 << (slot % 64)) != 0
    }
}

// --------------------------------------------------------------- worker ----

/// What every queue shares: the run's parameters and clock.
#[derive(Debug, Clone)]
struct Plan {
    nsid: u32,
    block_size: u32,
    /// Blocks per I/O.
    per: u64,
    /// I/O-size slots in the namespace.
    slots: u64,
    random: bool,
    /// Queues in the run.
    queues: u64,
    read_pct: u8,
    verify: bool,
    template: Arc<Vec<u8>>,
    written: Option<Arc<Written>>,
    /// Measuring starts (I/O submitted before it is not counted).
    measure_from: Instant,
    /// No new I/O is submitted from then on.
    end: Instant,
}

#[derive(Debug)]
struct Slot {
    start: Instant,
    /// The read and write buffers not in flight.
    rbuf: IoBuf,
    wbuf: IoBuf,
    /// The I/O in flight was a write.
    write: bool,
    /// Its slot was written by this run before the read was sent.
    expect: bool,
    /// Submitted inside the measuring window.
    counted: bool,
}

/// One I/O queue and what it measured.
struct Worker {
    qp: IoQpair<u32>,
    plan: Plan,
    slots: Vec<Slot>,
    rng: u64,
    seq: u64,
    outstanding: usize,
    hist: Hist,
    stats: Stats,
    first_mismatch: Option<String>,
    /// Last completion of a counted I/O.
    last_done: Option<Instant>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("qid", &self.qp.qid())
            .finish()
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

impl Worker {
    fn new(qp: IoQpair<u32>, plan: Plan, qd: usize, index: u64, seed: u64) -> Self {
        let io_len = (plan.per * plan.block_size as u64) as usize;
        let bs = plan.block_size as usize;
        let slots = (0..qd)
            .map(|_| {
                let mut wbuf = IoBuf::zeroed(io_len);
                for b in wbuf.as_mut_slice().chunks_mut(bs) {
                    b.copy_from_slice(&plan.template);
                }
                Slot {
                    start: Instant::now(),
                    rbuf: IoBuf::zeroed(io_len),
                    wbuf,
                    write: false,
                    expect: false,
                    counted: false,
                }
            })
            .collect();
        let mut rng = seed ^ (index + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
        if rng == 0 {
            rng = 1;
        }
        // Sequential streams of several queues start at evenly spaced offsets.
        let seq = index * (plan.slots / plan.queues.max(1));
        Worker {
            qp,
            plan,
            slots,
            rng,
            seq,
            outstanding: 0,
            hist: Hist::new(),
            stats: Stats::default(),
            first_mismatch: None,
            last_done: None,
        }
    }

    fn next_slot(&mut self) -> u64 {
        if self.plan.random {
            xorshift(&mut self.rng) % self.plan.slots
        } else {
            let s = self.seq % self.plan.slots;
            self.seq = s + 1;
            s
        }
    }

    fn next_is_read(&mut self) -> bool {
        match self.plan.read_pct {
            100 => true,
            0 => false,
            p => (xorshift(&mut self.rng) % 100) < p as u64,
        }
    }

    /// Sends the next I/O of slot `i`.
    fn submit(&mut self, i: usize, now: Instant) -> anyhow::Result<()> {
        let io_slot = self.next_slot();
        let read = self.next_is_read();
        let slba = io_slot * self.plan.per;
        let s = &mut self.slots[i];
        let buf = if read {
            s.expect = self.plan.written.as_ref().is_some_and(|w| w.get(io_slot));
            std::mem::take(&mut s.rbuf)
        } else {
            let mut b = std::mem::take(&mut s.wbuf);
            stamp(b.as_mut_slice(), self.plan.block_size as usize, slba);
            b
        };
        s.write = !read;
        s.start = now;
        s.counted = now >= self.plan.measure_from;
        let cmd = IoCmd {
            kind: if read { IoKind::Read } else { IoKind::Write },
            nsid: self.plan.nsid,
            slba,
            nblocks: self.plan.per,
            block_size: self.plan.block_size,
            fua: false,
        };
        if self
            .qp
            .submit(Request::new(Command::Io(cmd), buf, i as u32))
            .is_err()
        {
            bail!("queue {} refused a command within its depth", self.qp.qid());
        }
        self.outstanding += 1;
        Ok(())
    }

    /// Fills the queue.
    fn start(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            self.submit(i, now)?;
        }
        Ok(())
    }

    /// Accounts finished I/O and sends the next ones while the run lasts.
    fn complete(&mut self, out: &mut Vec<Done<u32>>) -> anyhow::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        for d in out.drain(..) {
            let i = d.req.ctx as usize;
            let Command::Io(cmd) = d.req.cmd else {
                bail!("queue {}: a completion for no I/O", self.qp.qid());
            };
            self.outstanding -= 1;
            let write = self.slots[i].write;
            let ok = d.result.is_ok();
            if ok && self.plan.verify {
                if write {
                    if let Some(w) = &self.plan.written {
                        w.set(cmd.slba / self.plan.per);
                    }
                } else {
                    let expect = self.slots[i].expect;
                    self.check(&d.req.buf, cmd.slba, expect);
                }
            }
            let s = &mut self.slots[i];
            if write {
                s.wbuf = d.req.buf;
            } else {
                s.rbuf = d.req.buf;
            }
            if s.counted {
                let ns = now.duration_since(s.start).as_nanos() as u64;
                self.hist.add(ns);
                if ok {
                    if write {
                        self.stats.writes += 1;
                    } else {
                        self.stats.reads += 1;
                    }
                    self.stats.bytes += self.plan.per * self.plan.block_size as u64;
                }
                self.last_done = Some(now);
            }
            if let Err(e) = d.result {
                self.stats.errors += 1;
                if self.stats.errors <= 5 {
                    eprintln!(
                        "corral bench: qid {} {} slba {}: {e}",
                        self.qp.qid(),
                        if write { "write" } else { "read" },
                        cmd.slba
                    );
                }
            }
            if now < self.plan.end {
                self.submit(i, now)?;
            }
        }
        Ok(())
    }

    fn check(&mut self, buf: &IoBuf, slba: u64, expect: bool) {
        check_blocks(
            buf.as_slice(),
            self.plan.block_size as usize,
            &self.plan.template,
            slba,
            expect,
            &mut self.stats,
            &mut self.first_mismatch,
        );
    }
}

/// Checks the blocks of a read of `slba` against the pattern (see the module
/// comment); `expect`: this run wrote them before the read was sent.
fn check_blocks(
    data: &[u8],
    bs: usize,
    template: &[u8],
    slba: u64,
    expect: bool,
    st: &mut Stats,
    first_mismatch: &mut Option<String>,
) {
    for (k, b) in data.chunks(bs).enumerate() {
        let lba = slba + k as u64;
        let magic = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let got = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
        let ours = magic == MAGIC;
        let good = ours && got == lba && b[16..] == template[16..];
        if good {
            if expect {
                st.verified += 1;
            } else {
                st.verified_prior += 1;
            }
        } else if expect || ours {
            st.mismatches += 1;
            if first_mismatch.is_none() {
                *first_mismatch = Some(if ours && got != lba {
                    format!("lba {lba} holds the block of lba {got}")
                } else if ours {
                    format!("lba {lba}: body differs from what was written")
                } else {
                    format!("lba {lba}: written by this run, reads back foreign data")
                });
            }
        } else {
            st.unwritten += 1;
        }
    }
}

/// Keeps every queue busy until the end, busy-polling them in turn.
async fn drive_poll(workers: &mut [Worker]) -> anyhow::Result<()> {
    let mut out = Vec::with_capacity(256);
    let mut spins = 0u32;
    let mut last_yield = Instant::now();
    loop {
        let mut busy = false;
        for w in workers.iter_mut() {
            if w.outstanding == 0 {
                continue;
            }
            busy = true;
            w.qp.process_completions(&mut out)
                .with_context(|| format!("queue {}", w.qp.qid()))?;
            w.complete(&mut out)?;
        }
        if !busy {
            return Ok(());
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(256) {
            // Let the controller's keep-alive and admin tasks run now and then.
            let now = Instant::now();
            if now.duration_since(last_yield) >= Duration::from_millis(1) {
                last_yield = now;
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Keeps one queue busy until the end, sleeping in epoll between completions.
async fn drive_wait(mut w: Worker) -> anyhow::Result<Worker> {
    let mut out = Vec::with_capacity(256);
    while w.outstanding > 0 {
        w.qp.poll(&mut out)
            .await
            .with_context(|| format!("queue {}", w.qp.qid()))?;
        w.complete(&mut out)?;
    }
    Ok(w)
}

/// Writes every block of the namespace once, in 128 KiB (or smaller, at the
/// end) sequential writes with the verify pattern, over all queues.
async fn prefill(
    qps: &mut [IoQpair<u32>],
    ns: &nvmf::host::NamespaceInfo,
    qd: usize,
) -> anyhow::Result<()> {
    let bs = ns.block_size as usize;
    let per = ((128 << 10) / bs).max(1) as u64;
    let template = block_template(bs);
    let mut bufs: Vec<IoBuf> = (0..qd * qps.len())
        .map(|_| {
            let mut b = IoBuf::zeroed(per as usize * bs);
            for c in b.as_mut_slice().chunks_mut(bs) {
                c.copy_from_slice(&template);
            }
            b
        })
        .collect();
    let mut next = 0u64;
    let mut out = Vec::with_capacity(qd);
    let mut in_flight = 0usize;
    loop {
        for qp in qps.iter_mut() {
            while next < ns.num_blocks && qp.in_flight() < qd {
                let Some(mut buf) = bufs.pop() else { break };
                let n = per.min(ns.num_blocks - next);
                buf.resize(n as usize * bs);
                stamp(buf.as_mut_slice(), bs, next);
                let cmd = IoCmd {
                    kind: IoKind::Write,
                    nsid: ns.nsid,
                    slba: next,
                    nblocks: n,
                    block_size: ns.block_size,
                    fua: false,
                };
                if qp.submit(Request::new(Command::Io(cmd), buf, 0)).is_err() {
                    bail!("queue {} refused a command within its depth", qp.qid());
                }
                next += n;
                in_flight += 1;
            }
            qp.process_completions(&mut out)?;
            for d in out.drain(..) {
                in_flight -= 1;
                if let Err(e) = d.result {
                    bail!("prefill write failed: {e}");
                }
                let mut b = d.req.buf;
                b.resize(per as usize * bs);
                bufs.push(b);
            }
        }
        if next >= ns.num_blocks && in_flight == 0 {
            return Ok(());
        }
        // Sleep in epoll on the first busy queue rather than spinning.
        if let Some(qp) = qps.iter_mut().find(|q| q.in_flight() > 0) {
            qp.poll(&mut out).await?;
            for d in out.drain(..) {
                in_flight -= 1;
                if let Err(e) = d.result {
                    bail!("prefill write failed: {e}");
                }
                let mut b = d.req.buf;
                b.resize(per as usize * bs);
                bufs.push(b);
            }
        }
    }
}

// --------------------------------------------------------------- report ----

#[derive(Debug)]
struct QueueReport {
    qid: u16,
    hist: Hist,
    stats: Stats,
    secs: f64,
}

#[derive(Debug)]
struct Report {
    args: String,
    queues: Vec<QueueReport>,
    total: Stats,
    hist: Hist,
    secs: f64,
    cpu_pct: f64,
    allocs_per_io: Option<f64>,
    io_size: usize,
    first_mismatch: Option<String>,
    verify: bool,
}

fn line(name: &str, st: &Stats, h: &Hist, secs: f64) -> String {
    let iops = st.ios() as f64 / secs.max(1e-9);
    format!(
        "{name:<8} {iops:>11.0} {:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.2}\n",
        st.bytes as f64 / secs.max(1e-9) / 1048576.0,
        h.mean_us(),
        h.pct_us(0.50),
        h.pct_us(0.99),
        h.pct_us(0.999),
        h.max_ns as f64 / 1000.0,
    )
}

fn stats_json(st: &Stats, h: &Hist, secs: f64) -> Value {
    let s = secs.max(1e-9);
    json!({
        "ios": st.ios(),
        "reads": st.reads,
        "writes": st.writes,
        "errors": st.errors,
        "iops": st.ios() as f64 / s,
        "mib_per_sec": st.bytes as f64 / s / 1048576.0,
        "latency_us": {
            "mean": h.mean_us(),
            "p50": h.pct_us(0.50),
            "p99": h.pct_us(0.99),
            "p99.9": h.pct_us(0.999),
            "max": h.max_ns as f64 / 1000.0,
        },
    })
}

impl Report {
    fn text(&self) -> String {
        let mut s = format!("corral bench: {}\n", self.args);
        s.push_str(&format!(
            "{:<8} {:>11} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10}\n",
            "queue", "IOPS", "MiB/s", "mean us", "p50 us", "p99 us", "p99.9 us", "max us"
        ));
        if self.queues.len() > 1 {
            for q in &self.queues {
                s.push_str(&line(&format!("qid {}", q.qid), &q.stats, &q.hist, q.secs));
            }
        }
        s.push_str(&line("total", &self.total, &self.hist, self.secs));
        s.push_str(&format!(
            "{} I/Os ({} reads, {} writes, {} errors) of {} bytes in {:.2} s; load generator CPU {:.0}%",
            self.total.ios(),
            self.total.reads,
            self.total.writes,
            self.total.errors,
            self.io_size,
            self.secs,
            self.cpu_pct
        ));
        if let Some(a) = self.allocs_per_io {
            s.push_str(&format!("; heap allocations per I/O {a:.4}"));
        }
        s.push('\n');
        if self.verify {
            s.push_str(&format!(
                "verify: {} blocks matched what this run wrote, {} matched an earlier writer, {} never written (not checked), {} mismatched\n",
                self.total.verified, self.total.verified_prior, self.total.unwritten, self.total.mismatches
            ));
            if let Some(m) = &self.first_mismatch {
                s.push_str(&format!("verify: first mismatch: {m}\n"));
            }
        }
        s
    }

    fn json(&self) -> Value {
        let mut total = stats_json(&self.total, &self.hist, self.secs);
        total["seconds"] = json!(self.secs);
        json!({
            "args": self.args,
            "io_size": self.io_size,
            "cpu_percent": self.cpu_pct,
            "allocs_per_io": self.allocs_per_io,
            "total": total,
            "queues": self.queues.iter().map(|q| {
                let mut v = stats_json(&q.stats, &q.hist, q.secs);
                v["qid"] = json!(q.qid);
                v
            }).collect::<Vec<_>>(),
            "verify": if self.verify { json!({
                "verified": self.total.verified,
                "verified_prior": self.total.verified_prior,
                "unwritten": self.total.unwritten,
                "mismatches": self.total.mismatches,
                "first_mismatch": self.first_mismatch,
            }) } else { Value::Null },
        })
    }
}

// ------------------------------------------------------------------ run ----

async fn bench(a: &Args) -> anyhow::Result<Report> {
    let trid = TransportId::new(&a.traddr, &a.trsvcid, &a.subnqn);
    let mut o = ControllerOpts::new(trid.clone());
    if let Some(h) = &a.hostnqn {
        o.hostnqn = h.clone();
    }
    o.hdgst = a.hdgst;
    o.ddgst = a.ddgst;
    // No managed queues: every I/O queue is one of ours.
    o.num_io_queues = 0;
    o.extra_io_qpairs = a.queues;
    o.io_queue_depth = a.queue_depth.max(2);
    let c = HostController::connect(o)
        .await
        .with_context(|| format!("connecting to {trid}"))?;
    let r = bench_on(a, &c).await;
    if let Err(e) = c.disconnect().await {
        eprintln!("corral bench: disconnect: {e}");
    }
    r
}

async fn bench_on(a: &Args, c: &HostController) -> anyhow::Result<Report> {
    let ns = c.namespace(a.nsid).with_context(|| {
        format!(
            "{} has no namespace {} (it has {:?})",
            a.subnqn,
            a.nsid,
            c.namespaces().iter().map(|n| n.nsid).collect::<Vec<_>>()
        )
    })?;
    let bs = ns.block_size as usize;
    if !a.io_size.is_multiple_of(bs) {
        bail!(
            "--io-size {} is not a multiple of the block size {bs}",
            a.io_size
        );
    }
    if a.io_size > c.max_xfer() {
        bail!(
            "--io-size {} is above the controller's largest transfer {}",
            a.io_size,
            c.max_xfer()
        );
    }
    let per = (a.io_size / bs) as u64;
    let slots = ns.num_blocks / per;
    if slots == 0 {
        bail!(
            "namespace {} ({} blocks) is smaller than one I/O",
            a.nsid,
            ns.num_blocks
        );
    }
    let mut qps = Vec::with_capacity(a.queues as usize);
    for _ in 0..a.queues {
        let qp: IoQpair<u32> = c
            .alloc_io_qpair(a.queue_depth.max(2))
            .await
            .context("opening an I/O queue")?;
        qps.push(qp);
    }
    let qd = (a.queue_depth as usize).min(qps[0].depth());
    if qd < a.queue_depth as usize {
        eprintln!(
            "corral bench: queue depth {} capped to {qd} by the controller",
            a.queue_depth
        );
    }
    if a.prefill {
        let t = Instant::now();
        prefill(&mut qps, &ns, qd)
            .await
            .context("prefilling the namespace")?;
        eprintln!(
            "corral bench: prefilled {} MiB in {:.1} s",
            (ns.num_blocks * bs as u64) >> 20,
            t.elapsed().as_secs_f64()
        );
    }
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs_f64(a.warmup);
    let plan = Plan {
        nsid: a.nsid,
        block_size: ns.block_size,
        per,
        slots,
        random: a.pattern.random(),
        queues: a.queues as u64,
        read_pct: a.pattern.read_pct(a.rwmixread),
        verify: a.verify,
        template: Arc::new(block_template(bs)),
        written: a.verify.then(|| Arc::new(Written::new(slots))),
        measure_from,
        end: measure_from + Duration::from_secs_f64(a.time),
    };
    if a.prefill {
        if let Some(w) = &plan.written {
            for s in 0..slots {
                w.set(s);
            }
        }
    }
    let mut workers: Vec<Worker> = qps
        .into_iter()
        .enumerate()
        .map(|(i, qp)| Worker::new(qp, plan.clone(), qd, i as u64, a.seed))
        .collect();

    // Allocations and CPU are counted over the run (buffers are allocated above).
    let cpu0 = cpu_time();
    let a0 = allocs_now();
    for w in workers.iter_mut() {
        w.start()?;
    }
    if a.poll {
        drive_poll(&mut workers).await?;
    } else {
        let mut set = tokio::task::JoinSet::new();
        for w in workers {
            set.spawn(drive_wait(w));
        }
        let mut done = Vec::new();
        while let Some(r) = set.join_next().await {
            done.push(r.context("queue task")??);
        }
        done.sort_by_key(|w| w.qp.qid());
        workers = done;
    }
    let wall = t0.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    let a1 = allocs_now();

    let mut total = Stats::default();
    let mut hist = Hist::new();
    let mut queues = Vec::new();
    let mut first_mismatch = None;
    let mut last = measure_from;
    for w in workers.iter_mut() {
        total.add(&w.stats);
        hist.merge(&w.hist);
        if first_mismatch.is_none() {
            first_mismatch = w.first_mismatch.take();
        }
        let end = w.last_done.unwrap_or(measure_from);
        last = last.max(end);
        queues.push(QueueReport {
            qid: w.qp.qid(),
            hist: w.hist.clone(),
            stats: w.stats,
            secs: end.duration_since(measure_from).as_secs_f64(),
        });
    }
    let secs = last.duration_since(measure_from).as_secs_f64();
    let all_ios = (total.ios() + total.errors).max(1);
    Ok(Report {
        args: format!(
            "{} {}:{} nsid {} pattern {}{} io size {} qd {} queues {} {}{}{}",
            a.subnqn,
            a.traddr,
            a.trsvcid,
            a.nsid,
            a.pattern.name(),
            if matches!(a.pattern, Pattern::Rw | Pattern::Randrw) {
                format!(" (read {}%)", a.rwmixread)
            } else {
                String::new()
            },
            a.io_size,
            qd,
            a.queues,
            if a.poll { "busy-poll" } else { "epoll" },
            if a.hdgst { " hdgst" } else { "" },
            if a.ddgst { " ddgst" } else { "" },
        ),
        queues,
        total,
        hist,
        secs,
        cpu_pct: cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9) * 100.0,
        allocs_per_io: match (a0, a1) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / all_ios as f64),
            _ => None,
        },
        io_size: a.io_size,
        first_mismatch,
        verify: a.verify,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Starts corral's target (one malloc namespace of `mib` MiB) on its own
    /// thread; returns its port.
    fn start_target(mib: u64) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use nvmf::target::tcp::TcpTarget;
                use nvmf::target::{ListenAddress, SubsystemConfig, Target, TransportOpts};
                let nqn = "nqn.2024-01.io.corral:target";
                let t = Target::new(TransportOpts::default());
                let mut cfg = SubsystemConfig::new(nqn);
                cfg.allow_any_host = true;
                let sub = t.create_subsystem(cfg).unwrap();
                let m = bdev::malloc::MallocBdev::new("m", mib << 11, 512, None).unwrap();
                sub.add_namespace(Arc::new(m), Some(1), None, None, false)
                    .unwrap();
                let tcp = TcpTarget::new(t);
                let a = tcp
                    .add_listener(nqn, ListenAddress::new("127.0.0.1", "0"))
                    .await
                    .unwrap();
                tx.send(a.trsvcid.clone()).unwrap();
                // Serves until the test process exits.
                std::future::pending::<()>().await;
            });
        });
        rx.recv().unwrap()
    }

    fn args(port: &str, extra: &[&str]) -> Args {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: Args,
        }
        let mut v = vec!["bench", "--trsvcid", port];
        v.extend_from_slice(extra);
        <Cli as clap::Parser>::parse_from(v).a
    }

    fn run_bench(a: &Args) -> Report {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(bench(a))
            .unwrap()
    }

    #[test]
    fn verified_mixed_load_on_several_queues() {
        let port = start_target(16);
        for mode in [&[][..], &["--poll"][..]] {
            let mut extra = vec!["-w", "randrw", "-q", "8", "-s", "8k", "-t", "0.5"];
            extra.extend_from_slice(&["--queues", "2", "--verify", "--prefill"]);
            extra.extend_from_slice(mode);
            let r = run_bench(&args(&port, &extra));
            assert_eq!(r.total.errors, 0);
            assert_eq!(r.total.mismatches, 0, "{:?}", r.first_mismatch);
            assert!(r.total.reads > 0 && r.total.writes > 0, "{:?}", r.total);
            // Every block read was written by the prefill or the run itself.
            assert_eq!(r.total.unwritten + r.total.verified_prior, 0);
            assert_eq!(r.total.verified, r.total.reads * 16);
            assert_eq!(r.queues.len(), 2);
            assert_eq!(r.hist.n, r.total.ios());
            let j = r.json();
            assert_eq!(j["total"]["ios"], json!(r.total.ios()));
        }
        // A later read-only run recognises the pattern of the earlier writers.
        let r = run_bench(&args(
            &port,
            &[
                "-w", "read", "-s", "128k", "-q", "4", "-t", "0.3", "--verify",
            ],
        ));
        assert_eq!(r.total.mismatches, 0);
        assert!(r.total.verified_prior > 0);
        assert_eq!(r.total.unwritten, 0);
    }

    #[test]
    fn verify_catches_misdirected_and_corrupt_blocks() {
        let bs = 512;
        let t = block_template(bs);
        let check = |buf: &IoBuf, slba, expect| {
            let mut st = Stats::default();
            let mut first = None;
            check_blocks(buf.as_slice(), bs, &t, slba, expect, &mut st, &mut first);
            assert_eq!(first.is_some(), st.mismatches > 0);
            st
        };
        let mut buf = IoBuf::zeroed(2 * bs);
        for c in buf.as_mut_slice().chunks_mut(bs) {
            c.copy_from_slice(&t);
        }
        stamp(buf.as_mut_slice(), bs, 10);
        assert_eq!(check(&buf, 10, true).verified, 2);
        // The data of LBAs 10..12 read at 20: misdirected, even if never written here.
        assert_eq!(check(&buf, 20, false).mismatches, 2);
        buf.as_mut_slice()[bs + 100] ^= 1;
        let st = check(&buf, 10, true);
        assert_eq!((st.verified, st.mismatches), (1, 1));
        // Foreign data where this run wrote nothing is only counted.
        let z = IoBuf::zeroed(2 * bs);
        let st = check(&z, 10, false);
        assert_eq!((st.unwritten, st.mismatches), (2, 0));
        assert_eq!(check(&z, 10, true).mismatches, 2);
    }

    #[test]
    fn sizes_parse_like_perf() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(128 << 10));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("four").is_err());
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = Hist::new();
        for us in 1..=1000u64 {
            h.add(us * 1000);
        }
        assert!((h.pct_us(0.5) - 500.0).abs() < 1.0, "{}", h.pct_us(0.5));
        assert!((h.pct_us(0.99) - 990.0).abs() < 1.0);
        assert!((h.mean_us() - 500.5).abs() < 0.01);
        let mut t = Hist::new();
        t.merge(&h);
        t.merge(&h);
        assert_eq!(t.n, 2000);
        assert!((t.pct_us(0.5) - 500.0).abs() < 1.0);
    }

    #[test]
    fn pattern_carries_the_lba() {
        let bs = 512;
        let t = block_template(bs);
        let mut buf = vec![0u8; 4 * bs];
        for b in buf.chunks_mut(bs) {
            b.copy_from_slice(&t);
        }
        stamp(&mut buf, bs, 100);
        for (i, b) in buf.chunks(bs).enumerate() {
            assert_eq!(u64::from_le_bytes(b[..8].try_into().unwrap()), MAGIC);
            assert_eq!(
                u64::from_le_bytes(b[8..16].try_into().unwrap()),
                100 + i as u64
            );
            assert_eq!(b[16..], t[16..]);
        }
    }
}
