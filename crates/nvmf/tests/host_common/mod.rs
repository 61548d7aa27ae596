//! Helpers shared by the host integration tests: a data model to verify
//! random I/O against, a TCP proxy that can cut a connection (a target that
//! dies or vanishes, whatever the target is), and a completion collector.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bdev::{Bdev, BdevExt, IoError};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Logs to stderr when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// What the device should hold, block by block, for the ranges tests touched.
pub struct Model {
    pub block_size: u64,
    pub data: Vec<u8>,
    pub known: Vec<bool>,
}

impl Model {
    pub fn new(block_size: u64, blocks: u64) -> Self {
        Model {
            block_size,
            data: vec![0; (block_size * blocks) as usize],
            known: vec![false; blocks as usize],
        }
    }
    pub fn write(&mut self, lba: u64, d: &[u8]) {
        let o = (lba * self.block_size) as usize;
        self.data[o..o + d.len()].copy_from_slice(d);
        let n = d.len() as u64 / self.block_size;
        self.known[lba as usize..(lba + n) as usize].fill(true);
    }
    pub fn forget(&mut self, lba: u64, n: u64) {
        self.known[lba as usize..(lba + n) as usize].fill(false);
    }
    /// Compares known blocks of `got` (read at `lba`) with the model.
    pub fn check(&self, lba: u64, got: &[u8]) {
        let bs = self.block_size as usize;
        for (i, b) in got.chunks(bs).enumerate() {
            let l = lba as usize + i;
            if self.known[l] {
                assert!(
                    b == &self.data[l * bs..(l + 1) * bs],
                    "data mismatch at lba {l}"
                );
            }
        }
    }
}

/// A random I/O size from 512 B to 1 MiB, log-uniform, in blocks.
pub fn rand_blocks(rng: &mut impl Rng, block_size: u64, max_bytes: u64) -> u64 {
    let max_shift = (max_bytes / block_size).max(1).ilog2();
    let shift = rng.gen_range(0..=max_shift);
    let hi = 1u64 << shift;
    rng.gen_range(hi / 2 + 1..=hi).max(1)
}

/// Rounds of concurrent writes of random data to random non-overlapping
/// ranges, each round followed by concurrent verified reads of the same ranges
/// and of a few random others.
pub async fn random_verified_io(
    bdev: Arc<dyn Bdev>,
    model: Arc<Mutex<Model>>,
    seed: u64,
    rounds: usize,
    width: usize,
    max_bytes: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bs = bdev.block_size() as u64;
    let nb = bdev.num_blocks();
    for _ in 0..rounds {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        while ranges.len() < width {
            let n = rand_blocks(&mut rng, bs, max_bytes).min(nb);
            let lba = rng.gen_range(0..=nb - n);
            if ranges.iter().all(|&(l, m)| lba + n <= l || l + m <= lba) {
                ranges.push((lba, n));
            }
        }
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        for &(lba, n) in &ranges {
            let mut d = vec![0u8; (n * bs) as usize];
            rng.fill(&mut d[..]);
            let fua = rng.gen_bool(0.2);
            let b = bdev.clone();
            let m = model.clone();
            tasks.push(tokio::spawn(async move {
                b.write_blocks(lba, &d, fua)
                    .await
                    .unwrap_or_else(|e| panic!("write {lba}+{n}: {e}"));
                m.lock().write(lba, &d);
            }));
        }
        for t in tasks.drain(..) {
            t.await.unwrap();
        }
        for _ in 0..2 {
            let n = rand_blocks(&mut rng, bs, max_bytes).min(nb);
            ranges.push((rng.gen_range(0..=nb - n), n));
        }
        for &(lba, n) in &ranges {
            let b = bdev.clone();
            let m = model.clone();
            tasks.push(tokio::spawn(async move {
                let got = b
                    .read_blocks(lba, n)
                    .await
                    .unwrap_or_else(|e| panic!("read {lba}+{n}: {e}"));
                m.lock().check(lba, &got);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}

/// Reads every block the model knows and compares.
pub async fn verify_all(bdev: &dyn Bdev, model: &Mutex<Model>) {
    let bs = bdev.block_size() as u64;
    let nb = bdev.num_blocks();
    let chunk = (1 << 20) / bs;
    let mut lba = 0;
    while lba < nb {
        let n = chunk.min(nb - lba);
        if model.lock().known[lba as usize..(lba + n) as usize]
            .iter()
            .any(|&k| k)
        {
            let got = bdev
                .read_blocks(lba, n)
                .await
                .unwrap_or_else(|e| panic!("verify read {lba}: {e}"));
            model.lock().check(lba, &got);
        }
        lba += n;
    }
}

/// Flush, write zeroes (verified), deallocate.
pub async fn admin_like_io(bdev: &dyn Bdev, model: &Mutex<Model>) {
    let bs = bdev.block_size() as u64;
    bdev.flush().await.unwrap();
    if bdev.supports(bdev::IoKind::WriteZeroes) {
        let d = vec![0xA5u8; (64 * bs) as usize];
        bdev.write_blocks(1000, &d, false).await.unwrap();
        bdev.write_zeroes(1010, 20).await.unwrap();
        let got = bdev.read_blocks(1000, 64).await.unwrap();
        assert!(got[..(10 * bs) as usize].iter().all(|&b| b == 0xA5));
        assert!(got[(10 * bs) as usize..(30 * bs) as usize]
            .iter()
            .all(|&b| b == 0));
        assert!(got[(30 * bs) as usize..].iter().all(|&b| b == 0xA5));
        let mut m = model.lock();
        m.write(1000, &got);
    }
    if bdev.supports(bdev::IoKind::Unmap) {
        bdev.unmap(2048, 256).await.unwrap();
        model.lock().forget(2048, 256);
    }
    // out of range fails without touching the wire
    let e = bdev.read_blocks(bdev.num_blocks(), 1).await.unwrap_err();
    assert_eq!(e, IoError::OutOfRange);
}

/// A TCP relay that can cut every connection and refuse new ones (a target
/// that dies, maybe to come back), or freeze (connections stay open but
/// nothing moves: a target or network that hangs), whatever the target is.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    corrupt: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    corrupt: Option<Arc<AtomicUsize>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 256 << 10];
    loop {
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Flip one byte in the middle of a large chunk (most likely data).
        if let Some(c) = &corrupt {
            if n >= 8192 && c.load(Ordering::SeqCst) > 0 {
                c.fetch_sub(1, Ordering::SeqCst);
                buf[n / 2] ^= 0x5A;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let frozen = Arc::new(AtomicBool::new(false));
        let corrupt = Arc::new(AtomicUsize::new(0));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (u2, c2, f2) = (up.clone(), conns.clone(), frozen.clone());
        let k2 = corrupt.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((down, _)) = l.accept().await else {
                    return;
                };
                if !u2.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let upstream = upstream.clone();
                let f = f2.clone();
                let k = k2.clone();
                c2.lock().push(tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = up.set_nodelay(true);
                    let _ = down.set_nodelay(true);
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    // Both directions live in this task: aborting it closes both sockets.
                    tokio::join!(relay(dr, uw, f.clone(), None), relay(ur, dw, f, Some(k)));
                }));
            }
        });
        Proxy {
            port,
            up,
            frozen,
            corrupt,
            conns,
            accept,
        }
    }
    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().drain(..) {
            c.abort();
        }
    }
    /// Accepts and relays again.
    pub fn restore(&self) {
        self.frozen.store(false, Ordering::SeqCst);
        self.up.store(true, Ordering::SeqCst);
    }
    /// Stops moving bytes on every connection, old and new, without closing any.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
    /// Flips a byte in each of the next `n` large chunks the target sends.
    pub fn corrupt(&self, n: usize) {
        self.corrupt.store(n, Ordering::SeqCst);
    }
    pub fn corruptions_left(&self) -> usize {
        self.corrupt.load(Ordering::SeqCst)
    }
    /// Moves bytes again.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.conns.lock().drain(..) {
            c.abort();
        }
    }
}

/// Waits (bounded) until the controller reaches `want`.
pub async fn wait_state(
    c: &nvmf::host::HostController,
    want: nvmf::host::CtrlrState,
    within: Duration,
) {
    let mut rx = c.subscribe();
    let r = tokio::time::timeout(within, rx.wait_for(|s| *s == want)).await;
    assert!(
        r.is_ok(),
        "controller did not reach {want} within {within:?} (is {})",
        c.state()
    );
}
