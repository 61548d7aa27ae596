//! `async` conveniences over [`Bdev::submit`], for code off the hot path
//! (tests, rebuild, tools). Each call allocates a one-shot sink.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::{Bdev, BdevIo, Completion, IoBuf, IoError, IoSink};

type Reply = (BdevIo, Result<(), IoError>);

struct OneShot(Mutex<Option<oneshot::Sender<Reply>>>);

impl IoSink for OneShot {
    fn complete(&self, _tag: u64, io: BdevIo, result: Result<(), IoError>) {
        if let Some(tx) = self.0.lock().take() {
            let _ = tx.send((io, result));
        }
    }
}

/// Submits `io` and waits for it.
pub async fn submit_wait<B: Bdev + ?Sized>(bdev: &B, io: BdevIo) -> (BdevIo, Result<(), IoError>) {
    let (tx, rx) = oneshot::channel();
    let sink = Arc::new(OneShot(Mutex::new(Some(tx))));
    bdev.submit(io, Completion::new(sink, 0));
    match rx.await {
        Ok(r) => r,
        // The module dropped the completion without calling it: a bug in that module,
        // reported as an aborted I/O rather than a hang.
        Err(_) => (BdevIo::flush(), Err(IoError::Aborted)),
    }
}

/// Byte-addressed helpers. Offsets and lengths must be block-aligned.
#[allow(async_fn_in_trait)]
pub trait BdevExt {
    async fn read_blocks(&self, offset_blocks: u64, num_blocks: u64) -> Result<IoBuf, IoError>;
    async fn write_blocks(&self, offset_blocks: u64, data: &[u8], fua: bool)
        -> Result<(), IoError>;
    async fn flush(&self) -> Result<(), IoError>;
    async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> Result<(), IoError>;
    async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> Result<(), IoError>;
}

impl<B: Bdev + ?Sized> BdevExt for B {
    async fn read_blocks(&self, offset_blocks: u64, num_blocks: u64) -> Result<IoBuf, IoError> {
        let len = num_blocks * self.block_size() as u64;
        let buf = IoBuf::zeroed(len as usize);
        let (io, r) = submit_wait(self, BdevIo::read(offset_blocks, num_blocks, buf)).await;
        r.map(|_| io.buf)
    }
    async fn write_blocks(
        &self,
        offset_blocks: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), IoError> {
        let bs = self.block_size() as u64;
        if !(data.len() as u64).is_multiple_of(bs) {
            return Err(IoError::InvalidBuffer);
        }
        let io = BdevIo::write(
            offset_blocks,
            data.len() as u64 / bs,
            IoBuf::from_slice(data),
            fua,
        );
        submit_wait(self, io).await.1
    }
    async fn flush(&self) -> Result<(), IoError> {
        submit_wait(self, BdevIo::flush()).await.1
    }
    async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> Result<(), IoError> {
        submit_wait(self, BdevIo::write_zeroes(offset_blocks, num_blocks))
            .await
            .1
    }
    async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> Result<(), IoError> {
        submit_wait(self, BdevIo::unmap(offset_blocks, num_blocks))
            .await
            .1
    }
}
