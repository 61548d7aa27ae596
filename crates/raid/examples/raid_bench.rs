//! raid1 throughput through the Bdev API: 4 KiB random write / read at queue
//! depth 32, for one member alone and raid1 of 1 and 3 members, over malloc
//! (the cost of the raid layer itself) and over NVMe/TCP on loopback (corral's
//! host against three corral targets in this process).
//!
//! `cargo run --release -p raid --example raid_bench [-- SECONDS]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::malloc::MallocBdev;
use bdev::registry::BdevRegistry;
use bdev::{Bdev, BdevIo, Completion, IoBuf, IoError, IoKind, IoSink};
use nvmf::host::{ControllerOpts, HostController, NvmeNsBdev};
use nvmf::target::tcp::TcpTarget;
use nvmf::target::{ListenAddress, SubsystemConfig, Target, TransportOpts};
use nvmf::TransportId;
use parking_lot::{Condvar, Mutex};
use raid::{CreateParams, RaidModule, RaidOpts};

const BS: u32 = 4096;
const QD: usize = 32;

/// A completion: tag, request, result.
type Finished = (u64, BdevIo, Result<(), IoError>);

#[derive(Default)]
struct Done {
    q: Mutex<VecDeque<Finished>>,
    cv: Condvar,
}

impl IoSink for Done {
    fn complete(&self, tag: u64, io: BdevIo, result: Result<(), IoError>) {
        self.q.lock().push_back((tag, io, result));
        self.cv.notify_one();
    }
}

struct Res {
    iops: f64,
    mean_us: f64,
    p99_us: f64,
}

/// Keeps `QD` requests of `kind` in flight on `b` for `secs`, from one thread.
fn run(b: Arc<dyn Bdev>, kind: IoKind, secs: f64) -> Res {
    let done = Arc::new(Done::default());
    let sink: Arc<dyn IoSink> = done.clone();
    let blocks = b.num_blocks() / (BS as u64 / b.block_size() as u64);
    let per = BS as u64 / b.block_size() as u64;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % blocks * per
    };
    let mut start = [Instant::now(); QD];
    let mut lat: Vec<u32> = Vec::with_capacity(4 << 20);
    let mut bufs: Vec<IoBuf> = (0..QD)
        .map(|i| IoBuf::from_slice(&vec![i as u8; BS as usize]))
        .collect();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    let mut free: Vec<usize> = (0..QD).collect();
    let mut inflight = 0;
    loop {
        let now = Instant::now();
        if now < end {
            while let Some(slot) = free.pop() {
                let buf = std::mem::take(&mut bufs[slot]);
                let io = match kind {
                    IoKind::Write => BdevIo::write(next(), per, buf, false),
                    _ => BdevIo::read(next(), per, buf),
                };
                start[slot] = Instant::now();
                inflight += 1;
                b.submit(io, Completion::new(sink.clone(), slot as u64));
            }
        } else if inflight == 0 {
            break;
        }
        let mut q = done.q.lock();
        if q.is_empty() {
            done.cv.wait_for(&mut q, Duration::from_millis(100));
        }
        let got: Vec<_> = q.drain(..).collect();
        drop(q);
        for (tag, io, r) in got {
            r.unwrap_or_else(|e| panic!("{kind:?} failed: {e}"));
            let slot = tag as usize;
            lat.push(start[slot].elapsed().as_nanos() as u32);
            bufs[slot] = io.buf;
            free.push(slot);
            inflight -= 1;
            n += 1;
        }
    }
    let el = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let mean = lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len().max(1) as f64 / 1000.0;
    let p99 = lat.get(lat.len() * 99 / 100).copied().unwrap_or(0) as f64 / 1000.0;
    Res {
        iops: n as f64 / el,
        mean_us: mean,
        p99_us: p99,
    }
}

fn report(what: &str, b: Arc<dyn Bdev>, secs: f64) {
    for kind in [IoKind::Write, IoKind::Read] {
        let b = b.clone();
        let r = std::thread::spawn(move || run(b, kind, secs))
            .join()
            .unwrap();
        println!(
            "{what:<34} {:<5} 4k QD{QD}: {:>9.0} IOPS  mean {:>7.1} us  p99 {:>7.1} us",
            if kind == IoKind::Write {
                "write"
            } else {
                "read"
            },
            r.iops,
            r.mean_us,
            r.p99_us
        );
    }
}

async fn replica(i: usize, blocks: u64) -> (Arc<TcpTarget>, String, String) {
    let target = Target::new(TransportOpts::default());
    let nqn = format!("nqn.2023-01.io.corral:bench-r{i}");
    let mut cfg = SubsystemConfig::new(&nqn);
    cfg.allow_any_host = true;
    let sub = target.create_subsystem(cfg).unwrap();
    sub.add_namespace(
        Arc::new(MallocBdev::new("m", blocks, 512, None).unwrap()),
        None,
        None,
        None,
        false,
    )
    .unwrap();
    let tcp = TcpTarget::new(target);
    let la = tcp
        .add_listener(&nqn, ListenAddress::new("127.0.0.1", "0"))
        .await
        .unwrap();
    (tcp, la.trsvcid, nqn)
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("corral-raid-bench-{}", std::process::id()));
    let reg = BdevRegistry::new();
    let module = RaidModule::new(reg.clone(), &dir, RaidOpts::default()).unwrap();
    let blocks = 256 * 2048; // 256 MiB of 512-byte blocks

    // malloc
    for i in 0..4 {
        let m = MallocBdev::new(&format!("m{i}"), blocks, 512, None).unwrap();
        reg.register(Arc::new(m), &[]).unwrap();
    }
    let prefill = |b: Arc<dyn Bdev>| {
        std::thread::spawn(move || run(b, IoKind::Write, 1.0))
            .join()
            .unwrap()
    };
    for i in 0..4 {
        prefill(reg.get(&format!("m{i}")).unwrap());
    }
    report("malloc (no raid)", reg.get("m0").unwrap(), secs);
    rt.block_on(module.create(CreateParams::raid1("r1", &["m0"])))
        .unwrap();
    report("raid1 of 1 malloc", reg.get("r1").unwrap(), secs);
    rt.block_on(module.delete("r1")).unwrap();
    rt.block_on(module.create(CreateParams::raid1("r3", &["m1", "m2", "m3"])))
        .unwrap();
    report("raid1 of 3 malloc", reg.get("r3").unwrap(), secs);
    rt.block_on(module.delete("r3")).unwrap();

    // NVMe/TCP on loopback
    let nblocks = 128 * 2048;
    let mut keep = Vec::new();
    for i in 0..3 {
        let (tcp, port, nqn) = rt.block_on(replica(i, nblocks));
        let mut o = ControllerOpts::new(TransportId::new("127.0.0.1", &port, &nqn));
        o.num_io_queues = 2;
        let c = rt.block_on(HostController::connect(o)).unwrap();
        reg.register(
            Arc::new(NvmeNsBdev::new(&c, 1, format!("n{i}n1")).unwrap()),
            &[],
        )
        .unwrap();
        keep.push((tcp, c));
    }
    for i in 0..3 {
        prefill(reg.get(&format!("n{i}n1")).unwrap());
    }
    report(
        "nvme-tcp loopback (no raid)",
        reg.get("n0n1").unwrap(),
        secs,
    );
    rt.block_on(module.create(CreateParams::raid1("v3", &["n0n1", "n1n1", "n2n1"])))
        .unwrap();
    report("raid1 of 3 nvme-tcp", reg.get("v3").unwrap(), secs);
    rt.block_on(module.delete("v3")).unwrap();
    for (tcp, c) in keep {
        let _ = rt.block_on(c.delete());
        tcp.shutdown();
    }
    let _ = std::fs::remove_dir_all(dir);
}
