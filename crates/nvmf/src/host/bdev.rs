//! A namespace of a remote controller as a [`Bdev`], so that a raid, an NBD
//! export or a subsystem can use it like a local device (SPDK's `<name>n1`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bdev::{Bdev, BdevIo, Completion, IoKind};

use super::controller::{HostController, NsShared};

/// Namespace `nsid` of a [`HostController`] as a bdev. Submission goes straight
/// to the controller's queues; while the controller reconnects I/O is held,
/// after fast-I/O-fail it fails with `NoPath`, after deletion with `Removed`.
pub struct NvmeNsBdev {
    name: String,
    ctrlr: HostController,
    ns: Arc<NsShared>,
    uuid: uuid::Uuid,
    write_zeroes: bool,
    unmap: bool,
    write_cache: bool,
}

impl std::fmt::Debug for NvmeNsBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeNsBdev")
            .field("name", &self.name)
            .field("nsid", &self.ns.nsid)
            .field("trid", self.ctrlr.trid())
            .finish()
    }
}

impl NvmeNsBdev {
    /// The bdev for namespace `nsid`, named `name` (SPDK names them
    /// `<controller name>n<nsid>`); `None` if the controller has no such namespace.
    pub fn new(ctrlr: &HostController, nsid: u32, name: impl Into<String>) -> Option<Self> {
        let ns = ctrlr.ns_shared(nsid)?;
        let info = ns.info.read().clone();
        let uuid = info
            .uuid
            .or_else(|| info.nguid.map(uuid::Uuid::from_bytes))
            .unwrap_or_else(|| derived_uuid(&ctrlr.trid().subnqn, nsid, info.eui64));
        Some(NvmeNsBdev {
            name: name.into(),
            ctrlr: ctrlr.clone(),
            ns,
            uuid,
            write_zeroes: info.write_zeroes,
            unmap: info.deallocate,
            write_cache: info.write_cache,
        })
    }

    /// One bdev per namespace, named `<prefix>n<nsid>` as SPDK's
    /// `bdev_nvme_attach_controller` names them.
    pub fn all(ctrlr: &HostController, prefix: &str) -> Vec<NvmeNsBdev> {
        ctrlr
            .namespaces()
            .iter()
            .filter_map(|n| NvmeNsBdev::new(ctrlr, n.nsid, format!("{prefix}n{}", n.nsid)))
            .collect()
    }

    pub fn nsid(&self) -> u32 {
        self.ns.nsid
    }
    pub fn controller(&self) -> &HostController {
        &self.ctrlr
    }
}

/// A stable UUID for a namespace that reports none: from the subsystem NQN,
/// the NSID and the EUI-64 (FNV-1a, two lanes).
fn derived_uuid(subnqn: &str, nsid: u32, eui64: Option<[u8; 8]>) -> uuid::Uuid {
    let mut h = [0xcbf2_9ce4_8422_2325u64, 0x8422_2325_cbf2_9ce4u64];
    let mut feed = |b: u8| {
        for (i, x) in h.iter_mut().enumerate() {
            *x ^= b as u64 ^ i as u64;
            *x = x.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    subnqn.bytes().for_each(&mut feed);
    nsid.to_le_bytes().into_iter().for_each(&mut feed);
    eui64.unwrap_or_default().into_iter().for_each(&mut feed);
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&h[0].to_le_bytes());
    b[8..].copy_from_slice(&h[1].to_le_bytes());
    uuid::Builder::from_random_bytes(b).into_uuid()
}

impl Bdev for NvmeNsBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.ns.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.ns.num_blocks.load(Ordering::Acquire)
    }
    fn uuid(&self) -> uuid::Uuid {
        self.uuid
    }
    fn product_name(&self) -> &'static str {
        "NVMe disk"
    }
    fn supports(&self, kind: IoKind) -> bool {
        match kind {
            IoKind::Read | IoKind::Write | IoKind::Flush => true,
            IoKind::WriteZeroes => self.write_zeroes,
            IoKind::Unmap => self.unmap,
        }
    }
    fn write_cache(&self) -> bool {
        self.write_cache
    }
    fn submit(&self, io: BdevIo, done: Completion) {
        if !self.supports(io.kind) {
            return done.complete(io, Err(bdev::IoError::NotSupported));
        }
        self.ctrlr.submit_ns(&self.ns, io, done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uuid_is_stable_and_distinct() {
        let a = derived_uuid("nqn.a", 1, None);
        assert_eq!(a, derived_uuid("nqn.a", 1, None));
        assert_ne!(a, derived_uuid("nqn.a", 2, None));
        assert_ne!(a, derived_uuid("nqn.b", 1, None));
    }
}
