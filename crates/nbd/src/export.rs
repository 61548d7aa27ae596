//! Exports: a bdev served under a name, what clients are told about it
//! (size, transmission flags, block size constraints), and the connections
//! attached to it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use bdev::{BdevRef, IoKind};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Notify;

use crate::proto::*;
use crate::NbdError;

/// How an export is offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// Refuse writes, trims and write-zeroes with EPERM, and say so to clients.
    pub read_only: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`.
    ///
    /// Safe for every corral bdev, hence the default: all connections of an export
    /// submit to the same bdev, the server acknowledges a write only after the bdev
    /// completed it (there is no cache in the server, shared or per connection),
    /// and a bdev flush goes to the device and covers every write completed before
    /// it, whichever connection sent it. A bdev whose flush covered only its
    /// caller's writes would need this off.
    pub multi_conn: bool,
    /// Whether write-zeroes on this bdev is faster than writing zeroes (true for
    /// malloc, and for files where `fallocate(ZERO_RANGE)` works). When false,
    /// requests with `NBD_CMD_FLAG_FAST_ZERO` fail at once with ENOTSUP, which the
    /// protocol asks for when the server cannot promise speed.
    pub fast_zero: bool,
    /// Shown to clients (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    pub description: Option<String>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            read_only: false,
            multi_conn: true,
            fast_zero: false,
            description: None,
        }
    }
}

/// An export as `corral_nbd_list` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportInfo {
    pub name: String,
    pub bdev_name: String,
    /// Size in bytes as advertised to clients that connect now.
    pub size: u64,
    pub block_size: u32,
    pub read_only: bool,
    pub multi_conn: bool,
    /// Connections in the transmission phase on this export.
    pub connections: usize,
    /// `nbd://host:port/name`, for clients.
    pub uri: String,
}

/// How a connection is asked to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum CloseMode {
    Run = 0,
    /// Finish requests in flight, answer new ones with ESHUTDOWN, then close.
    Drain = 1,
    /// The bdev is gone: answer requests in flight with EIO now, then close.
    Abort = 2,
}

/// Control block of one connection, shared with whoever may close it.
#[derive(Debug)]
pub(crate) struct ConnCtl {
    mode: AtomicU8,
    /// Wakes the connection's task when its mode changes.
    pub wake: Notify,
}

impl ConnCtl {
    pub fn new() -> Arc<Self> {
        Arc::new(ConnCtl {
            mode: AtomicU8::new(CloseMode::Run as u8),
            wake: Notify::new(),
        })
    }
    pub fn mode(&self) -> CloseMode {
        match self.mode.load(Ordering::Acquire) {
            0 => CloseMode::Run,
            1 => CloseMode::Drain,
            _ => CloseMode::Abort,
        }
    }
    /// Asks for `mode`; a connection is only ever escalated, never calmed down.
    pub fn close(&self, mode: CloseMode) {
        self.mode.fetch_max(mode as u8, Ordering::AcqRel);
        self.wake.notify_one();
    }
}

/// A bdev served under a name.
pub struct Export {
    name: String,
    bdev: BdevRef,
    opts: ExportOptions,
    conns: Mutex<BTreeMap<u64, Arc<ConnCtl>>>,
    removed: AtomicBool,
    detached: Notify,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("bdev", &self.bdev.name())
            .field("opts", &self.opts)
            .finish()
    }
}

impl Export {
    /// Checks that `bdev` can be exported under `name`.
    pub fn new(name: &str, bdev: BdevRef, opts: ExportOptions) -> Result<Export, NbdError> {
        if name.len() > MAX_STRING {
            return Err(NbdError::InvalidName {
                name: name.chars().take(64).collect(),
                why: "longer than 4096 bytes",
            });
        }
        if name.contains('\0') {
            return Err(NbdError::InvalidName {
                name: name.replace('\0', "\\0"),
                why: "contains NUL",
            });
        }
        if opts
            .description
            .as_ref()
            .is_some_and(|d| d.len() > MAX_STRING || d.contains('\0'))
        {
            return Err(NbdError::InvalidName {
                name: name.into(),
                why: "description longer than 4096 bytes or with NUL",
            });
        }
        let bs = bdev.block_size();
        // The protocol's minimum block size must be a power of two up to 64 KiB.
        if !bs.is_power_of_two() || bs > 65536 {
            return Err(NbdError::BlockSize {
                name: name.into(),
                bdev: bdev.name().into(),
                block_size: bs,
            });
        }
        Ok(Export {
            name: name.into(),
            bdev,
            opts,
            conns: Mutex::new(BTreeMap::new()),
            removed: AtomicBool::new(false),
            detached: Notify::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn bdev(&self) -> &BdevRef {
        &self.bdev
    }
    pub fn options(&self) -> &ExportOptions {
        &self.opts
    }
    /// Size in bytes, as told to a client connecting now.
    pub fn size(&self) -> u64 {
        self.bdev
            .num_blocks()
            .saturating_mul(self.bdev.block_size() as u64)
    }
    /// The minimum block size: requests must be aligned to the bdev's blocks.
    pub fn block_size(&self) -> u32 {
        self.bdev.block_size()
    }

    /// `(minimum, preferred, maximum)` block sizes for `NBD_INFO_BLOCK_SIZE`.
    pub fn block_sizes(&self, max_payload: u32) -> (u32, u32, u32) {
        let min = self.block_size();
        let preferred = min.max(4096);
        // A multiple of the minimum, and never below the preferred size.
        let max = (max_payload / min * min).max(preferred);
        (min, preferred, max)
    }

    /// Transmission flags for a client that negotiated (or not) structured replies.
    pub fn tx_flags(&self, structured: bool) -> u16 {
        let mut f = TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_FUA;
        if self.opts.read_only {
            f |= TX_READ_ONLY;
        } else {
            if self.bdev.supports(IoKind::Unmap) {
                f |= TX_SEND_TRIM;
            }
            if self.bdev.supports(IoKind::WriteZeroes) {
                // FAST_ZERO is offered whenever write-zeroes is: a request that
                // cannot be fast fails fast with ENOTSUP, which the spec allows.
                f |= TX_SEND_WRITE_ZEROES | TX_SEND_FAST_ZERO;
            }
        }
        if structured {
            // Read data always goes out as one chunk, so "don't fragment" is free.
            f |= TX_SEND_DF;
        }
        if self.opts.multi_conn {
            f |= TX_CAN_MULTI_CONN;
        }
        f
    }

    /// Number of connections in the transmission phase.
    pub fn connections(&self) -> usize {
        self.conns.lock().len()
    }

    /// Whether the export has been removed (no new connection may attach).
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub(crate) fn info(&self, local: &std::net::SocketAddr) -> ExportInfo {
        ExportInfo {
            name: self.name.clone(),
            bdev_name: self.bdev.name().to_string(),
            size: self.size(),
            block_size: self.block_size(),
            read_only: self.opts.read_only,
            multi_conn: self.opts.multi_conn,
            connections: self.connections(),
            uri: uri(local, &self.name),
        }
    }

    /// Registers a connection entering transmission; false once removed.
    pub(crate) fn attach(&self, id: u64, ctl: Arc<ConnCtl>) -> bool {
        let mut c = self.conns.lock();
        // Checked under the lock that removal takes too: a connection either
        // attaches before removal (and is closed by it) or is refused.
        if self.is_removed() {
            return false;
        }
        c.insert(id, ctl);
        true
    }

    pub(crate) fn detach(&self, id: u64) {
        self.conns.lock().remove(&id);
        self.detached.notify_waiters();
    }

    /// Marks the export removed and asks every connection to close.
    pub(crate) fn begin_removal(&self, mode: CloseMode) {
        let c = self.conns.lock();
        self.removed.store(true, Ordering::Release);
        for ctl in c.values() {
            ctl.close(mode);
        }
    }

    /// Waits until no connection is attached.
    pub(crate) async fn wait_detached(&self) {
        loop {
            let n = self.detached.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.conns.lock().is_empty() {
                return;
            }
            n.await;
        }
    }
}

/// Looks exports up for the handshake.
pub trait ExportSource {
    /// The export called `name`, if any.
    fn lookup(&self, name: &str) -> Option<Arc<Export>>;
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<Arc<Export>>;
}

impl ExportSource for BTreeMap<String, Arc<Export>> {
    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        self.get(name).cloned()
    }
    fn list(&self) -> Vec<Arc<Export>> {
        self.values().cloned().collect()
    }
}

/// `nbd://host:port/name`, with the name percent-encoded where a URI needs it.
pub fn uri(addr: &std::net::SocketAddr, name: &str) -> String {
    let mut s = match addr {
        std::net::SocketAddr::V4(a) => format!("nbd://{}:{}/", a.ip(), a.port()),
        std::net::SocketAddr::V6(a) => format!("nbd://[{}]:{}/", a.ip(), a.port()),
    };
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdev::malloc::MallocBdev;

    fn malloc(bs: u32) -> BdevRef {
        Arc::new(MallocBdev::new("m", 1024, bs, None).unwrap())
    }

    #[test]
    fn flags_and_sizes() {
        let e = Export::new("e", malloc(512), ExportOptions::default()).unwrap();
        let f = e.tx_flags(false);
        for bit in [
            TX_HAS_FLAGS,
            TX_SEND_FLUSH,
            TX_SEND_FUA,
            TX_SEND_TRIM,
            TX_SEND_WRITE_ZEROES,
            TX_SEND_FAST_ZERO,
            TX_CAN_MULTI_CONN,
        ] {
            assert_ne!(f & bit, 0, "{bit:#x}");
        }
        assert_eq!(f & (TX_READ_ONLY | TX_SEND_DF), 0);
        assert_ne!(e.tx_flags(true) & TX_SEND_DF, 0);
        assert_eq!(e.size(), 512 * 1024);
        assert_eq!(e.block_sizes(DEFAULT_MAX_PAYLOAD), (512, 4096, 1 << 25));
        let e = Export::new("e", malloc(8192), ExportOptions::default()).unwrap();
        assert_eq!(e.block_sizes(100_000), (8192, 8192, 98304));

        let ro = ExportOptions {
            read_only: true,
            multi_conn: false,
            ..Default::default()
        };
        let e = Export::new("ro", malloc(4096), ro).unwrap();
        let f = e.tx_flags(false);
        assert_ne!(f & TX_READ_ONLY, 0);
        assert_eq!(
            f & (TX_SEND_TRIM | TX_SEND_WRITE_ZEROES | TX_CAN_MULTI_CONN),
            0
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(Export::new("a\0b", malloc(512), ExportOptions::default()).is_err());
        assert!(Export::new(&"x".repeat(4097), malloc(512), ExportOptions::default()).is_err());
        assert!(Export::new("", malloc(512), ExportOptions::default()).is_ok());
    }

    #[test]
    fn uris() {
        let a: std::net::SocketAddr = "127.0.0.1:10809".parse().unwrap();
        assert_eq!(uri(&a, "vol1"), "nbd://127.0.0.1:10809/vol1");
        assert_eq!(uri(&a, "a b/c"), "nbd://127.0.0.1:10809/a%20b%2Fc");
        let a: std::net::SocketAddr = "[::1]:5".parse().unwrap();
        assert_eq!(uri(&a, "x"), "nbd://[::1]:5/x");
    }

    #[tokio::test]
    async fn removal_refuses_attach_and_closes() {
        let e = Arc::new(Export::new("e", malloc(512), ExportOptions::default()).unwrap());
        let c1 = ConnCtl::new();
        assert!(e.attach(1, c1.clone()));
        assert_eq!(e.connections(), 1);
        e.begin_removal(CloseMode::Drain);
        assert_eq!(c1.mode(), CloseMode::Drain);
        assert!(!e.attach(2, ConnCtl::new()));
        // Escalation only goes up.
        c1.close(CloseMode::Abort);
        c1.close(CloseMode::Drain);
        assert_eq!(c1.mode(), CloseMode::Abort);
        let e2 = e.clone();
        let w = tokio::spawn(async move { e2.wait_detached().await });
        tokio::task::yield_now().await;
        assert!(!w.is_finished());
        e.detach(1);
        tokio::time::timeout(std::time::Duration::from_secs(5), w)
            .await
            .unwrap()
            .unwrap();
    }
}
