//! A small NVMe/TCP load generator on corral's host, in the spirit of
//! spdk_nvme_perf, to measure the host's I/O path (the later `corral bench`
//! builds on the same calls).
//!
//! ```text
//! cargo run --release -p nvmf --example host_perf -- [--target ADDR:PORT --nqn NQN]
//!     [--qd 32] [--size 4096] [--rw randread|randwrite|read|write] [--secs 5]
//!     [--mode poll|wait|bdev] [--poll-us 0] [--host-cpu 1] [--target-cpu 0] [--ddgst] [--hdgst]
//! ```
//! Without `--target` it starts corral's target in-process (a 1 GiB malloc
//! namespace) on a thread pinned to `--target-cpu`; the host runs on a thread
//! pinned to `--host-cpu`.
//! Modes: `poll` busy-polls an IoQpair (SPDK's model), `wait` drives an IoQpair
//! and sleeps in epoll between completions, `bdev` submits through
//! `HostController::submit` (the path a raid or an NBD export uses: inbox and
//! queue task; `--poll-us` sets the queue task's busy-poll window).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{BdevIo, Completion, IoBuf, IoError, IoKind, IoSink};
use nvmf::host::queue::{Command, Done, IoCmd, Request};
use nvmf::host::{ControllerOpts, HostController};
use nvmf::TransportId;
use parking_lot::Mutex;

/// Counts heap allocations per thread, to show that the host's I/O path (all
/// of it runs on the host thread) makes none per I/O.
struct CountingAlloc;

thread_local! {
    static ALLOCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn count() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards to the system allocator; only counts calls.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Allocations made so far by the calling thread.
fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

struct Args {
    target: Option<String>,
    nqn: String,
    qd: usize,
    size: usize,
    rw: String,
    secs: u64,
    mode: String,
    host_cpu: usize,
    target_cpu: usize,
    hdgst: bool,
    ddgst: bool,
    poll_us: u32,
}

fn args() -> Args {
    let mut a = Args {
        target: None,
        nqn: "nqn.2024-01.io.corral:perf".into(),
        qd: 32,
        size: 4096,
        rw: "randread".into(),
        secs: 5,
        mode: "poll".into(),
        host_cpu: 1,
        target_cpu: 0,
        hdgst: false,
        ddgst: false,
        poll_us: 0,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = || v.get(i + 1).cloned().expect("missing value");
        match v[i].as_str() {
            "--target" => a.target = Some(val()),
            "--nqn" => a.nqn = val(),
            "--qd" => a.qd = val().parse().unwrap(),
            "--size" => a.size = val().parse().unwrap(),
            "--rw" => a.rw = val(),
            "--secs" => a.secs = val().parse().unwrap(),
            "--mode" => a.mode = val(),
            "--poll-us" => a.poll_us = val().parse().unwrap(),
            "--host-cpu" => a.host_cpu = val().parse().unwrap(),
            "--target-cpu" => a.target_cpu = val().parse().unwrap(),
            "--hdgst" => {
                a.hdgst = true;
                i -= 1
            }
            "--ddgst" => {
                a.ddgst = true;
                i -= 1
            }
            x => panic!("unknown argument {x}"),
        }
        i += 2;
    }
    a
}

fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn start_target(nqn: String, cpu: usize) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        pin(cpu);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use nvmf::target::tcp::TcpTarget;
            use nvmf::target::{ListenAddress, SubsystemConfig, Target, TransportOpts};
            let t = Target::new(TransportOpts::default());
            let mut cfg = SubsystemConfig::new(&nqn);
            cfg.allow_any_host = true;
            let sub = t.create_subsystem(cfg).unwrap();
            let m = bdev::malloc::MallocBdev::new("perf0", 2 << 20, 512, None).unwrap();
            sub.add_namespace(Arc::new(m), Some(1), None, None, false)
                .unwrap();
            let tcp = TcpTarget::new(t);
            let a = tcp
                .add_listener(&nqn, ListenAddress::new("127.0.0.1", "0"))
                .await
                .unwrap();
            tx.send(format!("127.0.0.1:{}", a.trsvcid)).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

/// Latency histogram: 50 ns buckets up to 1 ms, then 10 µs buckets up to 100 ms.
struct Hist {
    fine: Vec<u64>,
    coarse: Vec<u64>,
    n: u64,
    sum_ns: u128,
}

impl Hist {
    fn new() -> Self {
        Hist {
            fine: vec![0; 20_000],
            coarse: vec![0; 10_001],
            n: 0,
            sum_ns: 0,
        }
    }
    fn add(&mut self, ns: u64) {
        self.n += 1;
        self.sum_ns += ns as u128;
        if ns < 1_000_000 {
            self.fine[(ns / 50) as usize] += 1;
        } else {
            self.coarse[((ns / 10_000) as usize).min(10_000)] += 1;
        }
    }
    fn pct(&self, p: f64) -> f64 {
        let want = (self.n as f64 * p).ceil() as u64;
        let mut acc = 0;
        for (i, c) in self.fine.iter().enumerate() {
            acc += c;
            if acc >= want {
                return (i as f64 + 0.5) * 0.05;
            }
        }
        for (i, c) in self.coarse.iter().enumerate() {
            acc += c;
            if acc >= want {
                return (i as f64 + 0.5) * 10.0;
            }
        }
        f64::NAN
    }
}

struct Gen {
    rng: u64,
    seq: u64,
    blocks: u64,
    per: u64,
    random: bool,
}

impl Gen {
    fn next_lba(&mut self) -> u64 {
        let slots = self.blocks / self.per;
        let s = if self.random {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng % slots
        } else {
            self.seq = (self.seq + 1) % slots;
            self.seq
        };
        s * self.per
    }
}

/// Completions of the `bdev` mode: pushed by the queue task, taken by the bench task.
type Finished = (u64, BdevIo, Result<(), IoError>);

struct Sink {
    q: Mutex<Vec<Finished>>,
    notify: tokio::sync::Notify,
}

impl IoSink for Sink {
    fn complete(&self, tag: u64, io: BdevIo, r: Result<(), IoError>) {
        self.q.lock().push((tag, io, r));
        self.notify.notify_one();
    }
}

fn main() {
    let a = args();
    let addr = match &a.target {
        Some(t) => t.clone(),
        None => start_target(a.nqn.clone(), a.target_cpu),
    };
    pin(a.host_cpu);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (ip, port) = addr.rsplit_once(':').unwrap();
        let mut o = ControllerOpts::new(TransportId::new(ip, port, &a.nqn));
        o.hdgst = a.hdgst;
        o.ddgst = a.ddgst;
        o.io_poll_us = a.poll_us;
        o.num_io_queues = if a.mode == "bdev" { 1 } else { 0 };
        o.extra_io_qpairs = 1;
        o.io_queue_depth = (a.qd as u16).max(2);
        let c = HostController::connect(o).await.unwrap();
        let ns = c.namespaces()[0].clone();
        let bs = ns.block_size as u64;
        let kind = if a.rw.contains("read") { IoKind::Read } else { IoKind::Write };
        let mut g = Gen {
            rng: 0x9E37_79B9_7F4A_7C15,
            seq: 0,
            blocks: ns.num_blocks,
            per: (a.size as u64 / bs).max(1),
            random: a.rw.starts_with("rand"),
        };
        let mut hist = Hist::new();
        let mut starts = vec![Instant::now(); a.qd];
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(a.secs);
        let mut done_count = 0u64;
        // allocations counted from the first second on (connect and warm-up excluded)
        let warm = t0 + Duration::from_secs(1).min(Duration::from_secs(a.secs) / 2);
        let mut warm_mark: Option<(u64, u64)> = None;
        if a.mode == "bdev" {
            let sink = Arc::new(Sink { q: Mutex::new(Vec::with_capacity(a.qd)), notify: Default::default() });
            let sink_dyn: Arc<dyn IoSink> = sink.clone();
            for (slot, start) in starts.iter_mut().enumerate() {
                let io = BdevIo { kind, offset_blocks: g.next_lba(), num_blocks: g.per, buf: IoBuf::zeroed(a.size), fua: false };
                *start = Instant::now();
                c.submit(ns.nsid, io, Completion::new(sink_dyn.clone(), slot as u64));
            }
            let mut batch = Vec::with_capacity(a.qd);
            let mut outstanding = a.qd;
            while outstanding > 0 {
                sink.notify.notified().await;
                std::mem::swap(&mut *sink.q.lock(), &mut batch);
                let now = Instant::now();
                if warm_mark.is_none() && now >= warm {
                    warm_mark = Some((allocs(), done_count));
                }
                for (slot, mut io, r) in batch.drain(..) {
                    r.unwrap();
                    hist.add(now.duration_since(starts[slot as usize]).as_nanos() as u64);
                    done_count += 1;
                    if now < end {
                        io.offset_blocks = g.next_lba();
                        starts[slot as usize] = now;
                        c.submit(ns.nsid, io, Completion::new(sink_dyn.clone(), slot));
                    } else {
                        outstanding -= 1;
                    }
                }
            }
        } else {
            let mut qp = c.alloc_io_qpair::<usize>(a.qd as u16).await.unwrap();
            let mut out: Vec<Done<usize>> = Vec::with_capacity(a.qd);
            for (slot, start) in starts.iter_mut().enumerate() {
                let cmd = IoCmd { kind, nsid: ns.nsid, slba: g.next_lba(), nblocks: g.per, block_size: ns.block_size, fua: false };
                *start = Instant::now();
                qp.submit(Request::new(Command::Io(cmd), IoBuf::zeroed(a.size), slot)).map_err(|_| ()).unwrap();
            }
            let mut outstanding = a.qd;
            let mut spins = 0u32;
            while outstanding > 0 {
                if a.mode == "poll" {
                    qp.process_completions(&mut out).unwrap();
                    spins += 1;
                    if spins.is_multiple_of(4096) {
                        // let the keep-alive and admin tasks run
                        tokio::task::yield_now().await;
                    }
                } else {
                    qp.poll(&mut out).await.unwrap();
                }
                if out.is_empty() {
                    continue;
                }
                let now = Instant::now();
                if warm_mark.is_none() && now >= warm {
                    warm_mark = Some((allocs(), done_count));
                }
                for d in out.drain(..) {
                    d.result.unwrap();
                    let slot = d.req.ctx;
                    hist.add(now.duration_since(starts[slot]).as_nanos() as u64);
                    done_count += 1;
                    if now < end {
                        let Command::Io(mut cmd) = d.req.cmd else { unreachable!() };
                        cmd.slba = g.next_lba();
                        starts[slot] = now;
                        qp.submit(Request::new(Command::Io(cmd), d.req.buf, slot)).map_err(|_| ()).unwrap();
                    } else {
                        outstanding -= 1;
                    }
                }
            }
        }
        let el = t0.elapsed().as_secs_f64();
        let (a0, d0) = warm_mark.unwrap_or((allocs(), done_count));
        let per_io = (allocs() - a0) as f64 / (done_count - d0).max(1) as f64;
        let iops = done_count as f64 / el;
        println!(
            "{} qd {} size {} mode {}{}: {:.0} IOPS, {:.1} MiB/s, lat mean {:.1} us p50 {:.1} p99 {:.1} p99.9 {:.1}, host heap allocations per I/O {:.4}",
            a.rw,
            a.qd,
            a.size,
            a.mode,
            if a.ddgst || a.hdgst { " (digests)" } else { "" },
            iops,
            iops * a.size as f64 / 1048576.0,
            hist.sum_ns as f64 / hist.n.max(1) as f64 / 1000.0,
            hist.pct(0.5),
            hist.pct(0.99),
            hist.pct(0.999),
            per_io
        );
        c.disconnect().await.unwrap();
    });
}
