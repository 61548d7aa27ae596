//! Block devices (bdevs): named, fixed-block-size devices that take I/O requests
//! and complete them through a sink, without allocating per I/O.
//!
//! The model is SPDK's: a consumer (an NVMe/TCP queue, an NBD connection, a raid)
//! builds a [`BdevIo`] that owns its data buffer, submits it with a [`Completion`]
//! naming the consumer's [`IoSink`] and a tag, and gets the request (and its buffer)
//! back in [`IoSink::complete`], possibly on another thread. Buffers are
//! [`IoBuf`]s, aligned for O_DIRECT, which consumers keep in free lists.
//!
//! [`ext::BdevExt`] adds `async` conveniences for code off the hot path.

pub mod buf;
pub mod ext;
pub mod file;
pub mod io;
pub mod malloc;
pub mod outbox;
pub mod registry;
pub mod uring;

pub use buf::IoBuf;
pub use ext::BdevExt;
pub use io::{BdevIo, Completion, IoError, IoKind, IoSink};

use std::sync::Arc;

/// Static description of a bdev, as `bdev_get_bdevs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BdevInfo {
    pub name: String,
    /// The module that made it ("malloc", "file", "nvme", "raid", "lvol").
    pub product_name: String,
    pub block_size: u32,
    pub num_blocks: u64,
    pub uuid: uuid::Uuid,
    /// Whether the device has a volatile write cache (flush is meaningful).
    pub write_cache: bool,
}

/// A block device.
///
/// `submit` must not block for long: a module that does real I/O queues it and
/// completes later. Completion may happen inside `submit` (malloc does) or on
/// another thread; consumers handle both.
pub trait Bdev: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn block_size(&self) -> u32;
    /// Current size in blocks; may grow (resize), never shrinks under a consumer.
    fn num_blocks(&self) -> u64;
    fn uuid(&self) -> uuid::Uuid;
    fn product_name(&self) -> &'static str;
    fn supports(&self, kind: IoKind) -> bool;
    fn write_cache(&self) -> bool {
        false
    }
    /// Starts `io`; `done` is called exactly once with the request and its result.
    fn submit(&self, io: BdevIo, done: Completion);

    fn info(&self) -> BdevInfo {
        BdevInfo {
            name: self.name().to_string(),
            product_name: self.product_name().to_string(),
            block_size: self.block_size(),
            num_blocks: self.num_blocks(),
            uuid: self.uuid(),
            write_cache: self.write_cache(),
        }
    }
}

/// Shared handle to a bdev.
pub type BdevRef = Arc<dyn Bdev>;

/// Checks that `io` lies within a device of `num_blocks` blocks of `block_size`
/// bytes and that a data buffer matches the range. Modules call this first.
pub fn check_range(io: &BdevIo, block_size: u32, num_blocks: u64) -> Result<(), IoError> {
    let end = io
        .offset_blocks
        .checked_add(io.num_blocks)
        .ok_or(IoError::OutOfRange)?;
    if io.kind != IoKind::Flush && end > num_blocks {
        return Err(IoError::OutOfRange);
    }
    if matches!(io.kind, IoKind::Read | IoKind::Write)
        && io.buf.len() as u64 != io.num_blocks * block_size as u64
    {
        return Err(IoError::InvalidBuffer);
    }
    Ok(())
}
