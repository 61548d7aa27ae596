//! Helpers shared by the integration tests: blocking I/O on a bdev and
//! temporary directories.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use bdev::{Bdev, BdevIo, Completion, IoBuf, IoError, IoSink};
use parking_lot::Mutex;

type Done = (BdevIo, Result<(), IoError>);

struct Waiter(Mutex<Option<mpsc::Sender<Done>>>);

impl IoSink for Waiter {
    fn complete(&self, _tag: u64, io: BdevIo, result: Result<(), IoError>) {
        if let Some(tx) = self.0.lock().take() {
            let _ = tx.send((io, result));
        }
    }
}

/// Submits `io` and waits for its completion (inline or on another thread).
pub fn run(b: &dyn Bdev, io: BdevIo) -> (BdevIo, Result<(), IoError>) {
    let (tx, rx) = mpsc::channel();
    b.submit(
        io,
        Completion::new(Arc::new(Waiter(Mutex::new(Some(tx)))), 0),
    );
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .expect("I/O completes")
}

pub fn read(b: &dyn Bdev, off: u64, n: u64) -> Result<Vec<u8>, IoError> {
    let buf = IoBuf::zeroed((n * b.block_size() as u64) as usize);
    let (io, r) = run(b, BdevIo::read(off, n, buf));
    r.map(|_| io.buf.to_vec())
}

pub fn write(b: &dyn Bdev, off: u64, data: &[u8]) -> Result<(), IoError> {
    let n = data.len() as u64 / b.block_size() as u64;
    run(b, BdevIo::write(off, n, IoBuf::from_slice(data), false)).1
}

pub fn write_fua(b: &dyn Bdev, off: u64, data: &[u8]) -> Result<(), IoError> {
    let n = data.len() as u64 / b.block_size() as u64;
    run(b, BdevIo::write(off, n, IoBuf::from_slice(data), true)).1
}

pub fn flush(b: &dyn Bdev) -> Result<(), IoError> {
    run(b, BdevIo::flush()).1
}

pub fn zeroes(b: &dyn Bdev, off: u64, n: u64) -> Result<(), IoError> {
    run(b, BdevIo::write_zeroes(off, n)).1
}

pub fn unmap(b: &dyn Bdev, off: u64, n: u64) -> Result<(), IoError> {
    run(b, BdevIo::unmap(off, n)).1
}

/// A block of `bs` bytes whose content identifies `tag` and the block number.
pub fn pattern(tag: u32, block: u64, bs: usize) -> Vec<u8> {
    let mut v = vec![0u8; bs];
    if tag == 0 {
        return v;
    }
    for (i, c) in v.chunks_mut(16).enumerate() {
        c[..4].copy_from_slice(&tag.to_le_bytes());
        c[4..12].copy_from_slice(&block.to_le_bytes());
        c[12..16].copy_from_slice(&(i as u32).to_le_bytes());
    }
    v
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "lvol-test-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bytes the directory's files occupy on disk.
pub fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}
