//! NBD server: bdevs exported under names to NBD clients (qemu, libnbd's
//! nbdcopy/nbdinfo, fio's nbd engine, the kernel's nbd-client).
//!
//! The protocol core is sans-I/O: [`handshake::Handshake`] (fixed newstyle
//! option haggling) and [`transmission::Transmission`] (pipelined requests over
//! one bdev) are state machines fed bytes and bdev completions. [`NbdServer`]
//! is the thin tokio shell that owns the listening socket and one task per
//! connection, and is what the dataplane drives (`corral_nbd_start/stop/list`):
//!
//! ```no_run
//! # async fn f(bdev: bdev::BdevRef) -> Result<(), nbd::NbdError> {
//! use nbd::{ExportOptions, NbdServer, ServerOptions};
//! let server = NbdServer::start("127.0.0.1:10809".parse().unwrap(), ServerOptions::default()).await?;
//! let info = server.add_export("vol1", bdev, ExportOptions::default())?;
//! println!("{}", info.uri); // nbd://127.0.0.1:10809/vol1
//! server.remove_export("vol1").await?;
//! # Ok(()) }
//! ```
//!
//! What a client gets: structured replies, `base:allocation` block status
//! (everything reported as allocated data, as bdevs do not report allocation),
//! FLUSH, FUA, TRIM (when the bdev can unmap), WRITE_ZEROES with NO_HOLE and
//! FAST_ZERO, several connections per export with `CAN_MULTI_CONN`, block size
//! constraints (the bdev's block size as minimum, 32 MiB maximum payload).

pub mod export;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod transmission;

pub use export::{CloseMode, Export, ExportInfo, ExportOptions};
pub use proto::Errno;
pub use server::{NbdServer, ServerOptions};

/// Errors of the server's management API.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD export {name}: already exists (on bdev {bdev})")]
    ExportExists { name: String, bdev: String },
    #[error("NBD export {name}: no such export")]
    NoSuchExport { name: String },
    #[error("NBD export {name:?}: invalid name: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error(
        "NBD export {name}: bdev {bdev} has block size {block_size}; NBD needs a power of two \
         up to 65536"
    )]
    BlockSize {
        name: String,
        bdev: String,
        block_size: u32,
    },
    #[error("NBD server: cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD server on {addr} is shut down")]
    ShutDown { addr: std::net::SocketAddr },
}
