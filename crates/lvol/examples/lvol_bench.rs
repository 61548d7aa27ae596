//! Measures an lvol head through its bdev with the io_uring data path, for
//! comparison with `fio --ioengine=io_uring --direct=1` on a plain file of the
//! same filesystem (see crates/lvol/bench.sh).
//!
//! ```text
//! cargo run --release -p lvol --example lvol_bench -- DIR SIZE_MIB SNAPSHOTS SECONDS
//! ```
//!
//! Setup: an lvol of SIZE_MIB, fully written; with SNAPSHOTS > 0 it is written in
//! that many slices of random blocks with a snapshot after each, so that reads
//! resolve to layers all over the chain. Then, on the head: 4 KiB random writes
//! at QD32 and QD1 (the head's first writes: they allocate), again (overwrites),
//! 4 KiB random reads at QD32 and QD1, 128 KiB sequential writes and reads at QD8.

// A benchmark tool: any failure aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{Bdev, BdevIo, Completion, IoBuf, IoError, IoSink};
use lvol::{CreateOpts, LvStore, LvolBdev};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

type Done = (u64, BdevIo, Result<(), IoError>);

struct Chan(Mutex<mpsc::Sender<Done>>);

impl IoSink for Chan {
    fn complete(&self, tag: u64, io: BdevIo, r: Result<(), IoError>) {
        let _ = self.0.lock().send((tag, io, r));
    }
}

#[derive(Clone, Copy, Debug)]
enum Pattern {
    RandWrite,
    RandRead,
    SeqWrite,
    SeqRead,
}

/// Runs one job; returns (IOPS, MB/s, mean latency µs).
fn job(b: &Arc<dyn Bdev>, pat: Pattern, bs: usize, qd: usize, secs: f64) -> (f64, f64, f64) {
    let (tx, rx) = mpsc::channel();
    let sink: Arc<dyn IoSink> = Arc::new(Chan(Mutex::new(tx)));
    let bsz = b.block_size() as u64;
    let nblk = bs as u64 / bsz;
    let slots = b.num_blocks() / nblk;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut seq = 0u64;
    let mut next = |rng: &mut rand::rngs::StdRng| -> u64 {
        match pat {
            Pattern::RandWrite | Pattern::RandRead => rng.gen_range(0..slots) * nblk,
            Pattern::SeqWrite | Pattern::SeqRead => {
                seq = (seq + 1) % slots;
                seq * nblk
            }
        }
    };
    let mut data = IoBuf::zeroed(bs);
    rng.fill(&mut data[..]);
    let make = |off: u64, buf: IoBuf| match pat {
        Pattern::RandWrite | Pattern::SeqWrite => BdevIo::write(off, nblk, buf, false),
        Pattern::RandRead | Pattern::SeqRead => BdevIo::read(off, nblk, buf),
    };
    let start = Instant::now();
    let mut t0 = vec![start; qd];
    for (i, t) in t0.iter_mut().enumerate() {
        *t = Instant::now();
        b.submit(
            make(next(&mut rng), data.clone()),
            Completion::new(sink.clone(), i as u64),
        );
    }
    let (mut done, mut lat) = (0u64, Duration::ZERO);
    let deadline = start + Duration::from_secs_f64(secs);
    let mut outstanding = qd;
    while outstanding > 0 {
        let (tag, io, r) = rx.recv().expect("completion");
        r.expect("I/O succeeds");
        let now = Instant::now();
        lat += now - t0[tag as usize];
        done += 1;
        if now < deadline {
            t0[tag as usize] = now;
            b.submit(
                make(next(&mut rng), io.buf),
                Completion::new(sink.clone(), tag),
            );
        } else {
            outstanding -= 1;
        }
    }
    let el = start.elapsed().as_secs_f64();
    let iops = done as f64 / el;
    (
        iops,
        iops * bs as f64 / 1e6,
        lat.as_secs_f64() * 1e6 / done as f64,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: lvol_bench DIR SIZE_MIB SNAPSHOTS SECONDS");
        std::process::exit(2);
    }
    let dir = std::path::PathBuf::from(&args[1]);
    let size_mib: u64 = args[2].parse().expect("SIZE_MIB");
    if args[3] == "lookup" {
        lookup_bench(size_mib);
        return;
    }
    if args[3] == "file" {
        // The same jobs on bdev::file over the same reactor: the harness's own cost.
        let r = Arc::new(bdev::uring::Reactor::new("bench").expect("io_uring"));
        let f: Arc<dyn Bdev> = Arc::new(
            bdev::file::FileBdev::open("f", &dir, Some(4096), None, r).expect("file bdev"),
        );
        run_jobs(&f, "file");
        return;
    }
    let snaps: u64 = args[3].parse().expect("SNAPSHOTS");
    let _: f64 = args[4].parse().expect("SECONDS");
    let _ = std::fs::remove_dir_all(&dir);
    let s = LvStore::create_dir(&dir, "bench", CreateOpts::default()).expect("lvstore");
    s.set_reactor(Some(Arc::new(
        bdev::uring::Reactor::new("bench").expect("io_uring"),
    )));
    s.create_lvol("vol", size_mib << 20, true).expect("lvol");
    let vol = s.bdev("vol").expect("bdev");
    assert!(vol.uses_io_uring());

    // Fill: every block written once, spread over `snaps + 1` layers.
    let t = Instant::now();
    let n = vol.num_blocks();
    let layers = snaps + 1;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let owner: Vec<u16> = (0..n).map(|_| rng.gen_range(0..layers) as u16).collect();
    let chunk = 256u64; // 1 MiB of 4 KiB blocks
    for layer in 0..layers {
        let mut b = 0;
        while b < n {
            let end = (b + chunk).min(n);
            // runs of blocks this layer owns, written as whole runs
            let mut x = b;
            while x < end {
                if owner[x as usize] as u64 != layer {
                    x += 1;
                    continue;
                }
                let s0 = x;
                while x < end && owner[x as usize] as u64 == layer {
                    x += 1;
                }
                let buf = vec![layer as u8 + 1; ((x - s0) * 4096) as usize];
                lvol_write(&vol, s0, &buf);
            }
            b = end;
        }
        if layer < snaps {
            s.snapshot("vol", &format!("snap{layer}"))
                .expect("snapshot");
        }
    }
    lvol_flush(&vol);
    eprintln!(
        "setup: O_DIRECT from {} bytes; {} MiB in {} layers in {:.1}s; owner index {} KiB",
        s.storage().direct_min(),
        size_mib,
        layers,
        t.elapsed().as_secs_f64(),
        vol.owner_map_bytes() / 1024
    );

    // CPU cost of resolving a block to its layer (what every read does first).
    let t = Instant::now();
    let mut hits = 0u64;
    let lookups = 4_000_000u64;
    let mut x = 12345u64;
    for _ in 0..lookups {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        hits += vol.layer_of((x >> 16) % n).is_some() as u64;
    }
    println!(
        "snapshots={snaps:<3} block-to-layer lookup: {:.1} ns ({} of {} blocks held)",
        t.elapsed().as_nanos() as f64 / lookups as f64,
        hits,
        lookups
    );
    let b: Arc<dyn Bdev> = vol.clone();
    run_jobs(&b, &format!("snapshots={snaps}"));
    drop(b);
    drop(vol);
    let _ = s.destroy();
}

/// Runs every job; `REPS` (environment, default 1) times over, since a shared
/// virtual disk is noisy.
fn run_jobs(b: &Arc<dyn Bdev>, label: &str) {
    let secs: f64 = std::env::args()
        .nth(4)
        .and_then(|x| x.parse().ok())
        .unwrap_or(5.0);
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|x| x.parse().ok())
        .unwrap_or(1);
    for _ in 0..reps {
        run_jobs_once(b, label, secs);
    }
}

fn run_jobs_once(b: &Arc<dyn Bdev>, label: &str, secs: f64) {
    let jobs: [(&str, Pattern, usize, usize); 8] = [
        (
            "randwrite 4k qd32 (first write)",
            Pattern::RandWrite,
            4096,
            32,
        ),
        ("randwrite 4k qd32", Pattern::RandWrite, 4096, 32),
        ("randwrite 4k qd1", Pattern::RandWrite, 4096, 1),
        ("randread 4k qd32", Pattern::RandRead, 4096, 32),
        ("randread 4k qd1", Pattern::RandRead, 4096, 1),
        ("seqwrite 128k qd8", Pattern::SeqWrite, 128 << 10, 8),
        ("seqread 128k qd8", Pattern::SeqRead, 128 << 10, 8),
        ("randread 4k qd32 (again)", Pattern::RandRead, 4096, 32),
    ];
    for (name, pat, bs, qd) in jobs {
        let (iops, mbs, lat) = job(b, pat, bs, qd, secs);
        println!("{label:<13} {name:<32} {iops:>9.0} IOPS {mbs:>8.1} MB/s {lat:>8.1} us");
    }
}

fn lvol_write(b: &Arc<LvolBdev>, off: u64, data: &[u8]) {
    let (tx, rx) = mpsc::channel();
    let n = data.len() as u64 / 4096;
    b.submit(
        BdevIo::write(off, n, IoBuf::from_slice(data), false),
        Completion::new(Arc::new(Chan(Mutex::new(tx))), 0),
    );
    rx.recv().expect("completion").2.expect("write");
}

fn lvol_flush(b: &Arc<LvolBdev>) {
    let (tx, rx) = mpsc::channel();
    b.submit(
        BdevIo::flush(),
        Completion::new(Arc::new(Chan(Mutex::new(tx))), 0),
    );
    rx.recv().expect("completion").2.expect("flush");
}

/// Chain-length independence, without the disk: an lvol of `size_mib` on
/// in-memory storage, every block written, spread at random over 1, 11 and
/// 101 layers; then the CPU time of resolving a block and of a whole 4 KiB read
/// (storage in memory).
fn lookup_bench(size_mib: u64) {
    for snaps in [0u64, 10, 100] {
        let fs = lvol::fault::FaultStorage::new(4096);
        let s = LvStore::create(Arc::new(fs), "mem", CreateOpts::default()).expect("lvstore");
        s.create_lvol("vol", size_mib << 20, true).expect("lvol");
        let vol = s.bdev("vol").expect("bdev");
        let n = vol.num_blocks();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let owner: Vec<u64> = (0..n).map(|_| rng.gen_range(0..=snaps)).collect();
        let blk = vec![1u8; 4096];
        for layer in 0..=snaps {
            for b in (0..n).filter(|&b| owner[b as usize] == layer) {
                lvol_write(&vol, b, &blk);
            }
            if layer < snaps {
                s.snapshot("vol", &format!("s{layer}")).expect("snapshot");
            }
        }
        let lookups = 4_000_000u64;
        let mut x = 12345u64;
        let t = Instant::now();
        let mut held = 0u64;
        for _ in 0..lookups {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            held += vol.layer_of((x >> 16) % n).is_some() as u64;
        }
        let lookup_ns = t.elapsed().as_nanos() as f64 / lookups as f64;
        assert_eq!(held, lookups);
        let (tx, rx) = mpsc::channel();
        let sink: Arc<dyn IoSink> = Arc::new(Chan(Mutex::new(tx)));
        let mut buf = IoBuf::zeroed(4096);
        let reads = 500_000u64;
        let t = Instant::now();
        for _ in 0..reads {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            vol.submit(
                BdevIo::read((x >> 16) % n, 1, buf),
                Completion::new(sink.clone(), 0),
            );
            let (_, io, r) = rx.recv().expect("completion");
            r.expect("read");
            buf = io.buf;
        }
        let read_ns = t.elapsed().as_nanos() as f64 / reads as f64;
        println!(
            "snapshots={snaps:<3} in memory: block-to-layer lookup {lookup_ns:>6.1} ns, 4 KiB read {read_ns:>7.1} ns, owner index {} KiB",
            vol.owner_map_bytes() / 1024
        );
    }
}
