//! I/O requests, their completion path, and the errors a bdev can report.

use std::sync::Arc;

use crate::buf::IoBuf;

/// The operations a bdev may support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    WriteZeroes,
    /// Deallocate (TRIM / NVMe DSM deallocate).
    Unmap,
}

impl IoKind {
    pub const ALL: [IoKind; 5] = [
        IoKind::Read,
        IoKind::Write,
        IoKind::Flush,
        IoKind::WriteZeroes,
        IoKind::Unmap,
    ];

    /// SPDK's name in `supported_io_types`.
    pub fn spdk_name(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::WriteZeroes => "write_zeroes",
            IoKind::Unmap => "unmap",
        }
    }
    /// Whether the operation changes data (and so must reach every mirror).
    pub fn is_write_like(self) -> bool {
        !matches!(self, IoKind::Read)
    }
}

/// One I/O request. It owns its buffer; the buffer comes back on completion.
#[derive(Debug)]
pub struct BdevIo {
    pub kind: IoKind,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    /// Read: receives `num_blocks * block_size` bytes (its length must be that).
    /// Write: holds them. Other kinds: empty.
    pub buf: IoBuf,
    /// Force Unit Access: the write is durable when it completes.
    pub fua: bool,
}

impl BdevIo {
    pub fn read(offset_blocks: u64, num_blocks: u64, buf: IoBuf) -> Self {
        BdevIo {
            kind: IoKind::Read,
            offset_blocks,
            num_blocks,
            buf,
            fua: false,
        }
    }
    pub fn write(offset_blocks: u64, num_blocks: u64, buf: IoBuf, fua: bool) -> Self {
        BdevIo {
            kind: IoKind::Write,
            offset_blocks,
            num_blocks,
            buf,
            fua,
        }
    }
    pub fn flush() -> Self {
        BdevIo {
            kind: IoKind::Flush,
            offset_blocks: 0,
            num_blocks: 0,
            buf: IoBuf::empty(),
            fua: false,
        }
    }
    pub fn write_zeroes(offset_blocks: u64, num_blocks: u64) -> Self {
        BdevIo {
            kind: IoKind::WriteZeroes,
            offset_blocks,
            num_blocks,
            buf: IoBuf::empty(),
            fua: false,
        }
    }
    pub fn unmap(offset_blocks: u64, num_blocks: u64) -> Self {
        BdevIo {
            kind: IoKind::Unmap,
            offset_blocks,
            num_blocks,
            buf: IoBuf::empty(),
            fua: false,
        }
    }
}

/// Why an I/O failed. Each protocol maps these to its own codes in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("I/O beyond the end of the device")]
    OutOfRange,
    #[error("data buffer does not match the request length")]
    InvalidBuffer,
    #[error("operation not supported by this device")]
    NotSupported,
    #[error("device is read-only")]
    ReadOnly,
    #[error("no space left on the backing store")]
    NoSpace,
    #[error("device was removed")]
    Removed,
    #[error("I/O aborted")]
    Aborted,
    #[error("I/O timed out")]
    Timeout,
    /// The path to a remote device is down (NVMe/TCP host: fast_io_fail expired).
    #[error("no path to the device")]
    NoPath,
    #[error("unrecovered read error")]
    Media,
    #[error("I/O error: {0}")]
    Errno(i32),
    #[error("remote device returned {0}")]
    Remote(String),
}

impl IoError {
    /// Maps an OS error number to the closest variant.
    pub fn from_errno(e: i32) -> Self {
        match e {
            libc::ENOSPC | libc::EDQUOT => IoError::NoSpace,
            libc::EROFS => IoError::ReadOnly,
            libc::EOPNOTSUPP => IoError::NotSupported,
            _ => IoError::Errno(e),
        }
    }
}

/// Where a consumer receives completions. Implementations must be cheap and must
/// not block: typically push onto a queue and wake the consumer's task.
pub trait IoSink: Send + Sync + 'static {
    fn complete(&self, tag: u64, io: BdevIo, result: Result<(), IoError>);
}

/// The completion handle passed with a request: a sink and the consumer's tag.
pub struct Completion {
    sink: Arc<dyn IoSink>,
    tag: u64,
}

impl Completion {
    pub fn new(sink: Arc<dyn IoSink>, tag: u64) -> Self {
        Completion { sink, tag }
    }
    pub fn tag(&self) -> u64 {
        self.tag
    }
    /// Delivers the result. Consumes the handle, so it happens once.
    pub fn complete(self, io: BdevIo, result: Result<(), IoError>) {
        self.sink.complete(self.tag, io, result)
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Completion(tag {})", self.tag)
    }
}
