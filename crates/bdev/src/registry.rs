//! The registry of a dataplane's bdevs: names and aliases, claims, hot-remove
//! notification, and I/O statistics.
//!
//! A bdev is *claimed* by at most one consumer (a raid, a subsystem namespace,
//! an NBD export); a claimed bdev cannot be deleted until released, and the
//! error names the holder. When a device goes away underneath (an NVMe
//! controller lost for good), [`BdevRegistry::hot_remove`] tells the claim
//! holder and every subscriber, then drops it regardless of claims.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::{Bdev, BdevInfo, BdevIo, BdevRef, Completion, IoKind};

/// Called with the bdev's name when it is hot-removed.
pub type RemoveCallback = Arc<dyn Fn(&str) + Send + Sync>;

/// Who holds a claim on a bdev.
#[derive(Clone)]
pub struct Claim {
    /// Human-readable owner, e.g. `raid vol1` or `nvmf nqn.…:vol1 nsid 1`.
    pub holder: String,
    /// Module of the holder (`raid`, `nvmf`, `nbd`, `lvol`).
    pub module: &'static str,
    pub on_remove: Option<RemoveCallback>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Claim({} by {})", self.holder, self.module)
    }
}

/// Registry errors, mapped to SPDK's errnos by the RPC layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("bdev {name} already exists")]
    Exists { name: String },
    #[error("bdev {name} does not exist")]
    NotFound { name: String },
    #[error("bdev {name} is claimed by {holder} ({module})")]
    Claimed {
        name: String,
        holder: String,
        module: &'static str,
    },
    #[error("bdev {name} is not claimed by {holder}")]
    NotClaimedBy { name: String, holder: String },
}

/// Per-bdev I/O counters (SPDK's bdev_get_iostat fields that matter).
#[derive(Debug, Default)]
pub struct IoStats {
    pub num_read_ops: AtomicU64,
    pub bytes_read: AtomicU64,
    pub num_write_ops: AtomicU64,
    pub bytes_written: AtomicU64,
    pub num_unmap_ops: AtomicU64,
    pub bytes_unmapped: AtomicU64,
    pub num_write_zeroes_ops: AtomicU64,
    pub num_flush_ops: AtomicU64,
}

/// A registered bdev: the module's device plus statistics. This is what the
/// registry hands out, so every consumer's I/O is counted.
pub struct Tracked {
    inner: BdevRef,
    pub stats: IoStats,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tracked({})", self.inner.name())
    }
}

impl Tracked {
    pub fn inner(&self) -> &BdevRef {
        &self.inner
    }
}

impl Bdev for Tracked {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    fn uuid(&self) -> uuid::Uuid {
        self.inner.uuid()
    }
    fn product_name(&self) -> &'static str {
        self.inner.product_name()
    }
    fn supports(&self, kind: IoKind) -> bool {
        self.inner.supports(kind)
    }
    fn write_cache(&self) -> bool {
        self.inner.write_cache()
    }
    fn submit(&self, io: BdevIo, done: Completion) {
        let bytes = io.num_blocks * self.inner.block_size() as u64;
        let (ops, b) = match io.kind {
            IoKind::Read => (&self.stats.num_read_ops, Some(&self.stats.bytes_read)),
            IoKind::Write => (&self.stats.num_write_ops, Some(&self.stats.bytes_written)),
            IoKind::Unmap => (&self.stats.num_unmap_ops, Some(&self.stats.bytes_unmapped)),
            IoKind::WriteZeroes => (&self.stats.num_write_zeroes_ops, None),
            IoKind::Flush => (&self.stats.num_flush_ops, None),
        };
        ops.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = b {
            b.fetch_add(bytes, Ordering::Relaxed);
        }
        self.inner.submit(io, done)
    }
    fn info(&self) -> BdevInfo {
        self.inner.info()
    }
}

struct Entry {
    bdev: Arc<Tracked>,
    aliases: Vec<String>,
    claim: Option<Claim>,
    subscribers: Vec<(u64, RemoveCallback)>,
    /// Module-specific JSON for `driver_specific` (set by the module).
    driver_specific: Option<String>,
}

/// A registry entry as listed by `bdev_get_bdevs`.
#[derive(Debug, Clone)]
pub struct Listed {
    pub info: BdevInfo,
    pub aliases: Vec<String>,
    pub claim: Option<(String, &'static str)>,
    pub supported: Vec<IoKind>,
    pub driver_specific: Option<String>,
}

#[derive(Default)]
struct Inner {
    by_name: BTreeMap<String, Entry>,
    alias_to_name: BTreeMap<String, String>,
    next_sub: u64,
}

/// The dataplane's bdevs by name.
#[derive(Default)]
pub struct BdevRegistry {
    inner: RwLock<Inner>,
}

impl std::fmt::Debug for BdevRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.inner.read();
        f.debug_struct("BdevRegistry")
            .field("bdevs", &g.by_name.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl BdevRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(BdevRegistry::default())
    }

    fn resolve<'a>(g: &'a Inner, name: &'a str) -> Option<&'a str> {
        if g.by_name.contains_key(name) {
            Some(name)
        } else {
            g.alias_to_name.get(name).map(|s| s.as_str())
        }
    }

    /// Registers a bdev under its name (and aliases). Names and aliases share one namespace.
    pub fn register(
        &self,
        bdev: BdevRef,
        aliases: &[String],
    ) -> Result<Arc<Tracked>, RegistryError> {
        let mut g = self.inner.write();
        let name = bdev.name().to_string();
        for n in std::iter::once(&name).chain(aliases.iter()) {
            if g.by_name.contains_key(n) || g.alias_to_name.contains_key(n) {
                return Err(RegistryError::Exists { name: n.clone() });
            }
        }
        let t = Arc::new(Tracked {
            inner: bdev,
            stats: IoStats::default(),
        });
        for a in aliases {
            g.alias_to_name.insert(a.clone(), name.clone());
        }
        g.by_name.insert(
            name,
            Entry {
                bdev: t.clone(),
                aliases: aliases.to_vec(),
                claim: None,
                subscribers: Vec::new(),
                driver_specific: None,
            },
        );
        Ok(t)
    }

    /// Looks a bdev up by name or alias.
    pub fn get(&self, name: &str) -> Option<Arc<Tracked>> {
        let g = self.inner.read();
        let n = Self::resolve(&g, name)?;
        g.by_name.get(n).map(|e| e.bdev.clone())
    }

    /// The canonical name of `name_or_alias`.
    pub fn canonical(&self, name: &str) -> Option<String> {
        let g = self.inner.read();
        Self::resolve(&g, name).map(|s| s.to_string())
    }

    pub fn set_driver_specific(&self, name: &str, json: String) {
        if let Some(e) = self.inner.write().by_name.get_mut(name) {
            e.driver_specific = Some(json);
        }
    }

    /// Claims a bdev for `holder`. Fails if anyone holds it.
    pub fn claim(&self, name: &str, claim: Claim) -> Result<Arc<Tracked>, RegistryError> {
        let mut g = self.inner.write();
        let n = Self::resolve(&g, name)
            .ok_or_else(|| RegistryError::NotFound { name: name.into() })?
            .to_string();
        let e = g
            .by_name
            .get_mut(&n)
            .ok_or_else(|| RegistryError::NotFound { name: n.clone() })?;
        if let Some(c) = &e.claim {
            return Err(RegistryError::Claimed {
                name: n,
                holder: c.holder.clone(),
                module: c.module,
            });
        }
        e.claim = Some(claim);
        Ok(e.bdev.clone())
    }

    /// Releases `holder`'s claim.
    pub fn release(&self, name: &str, holder: &str) -> Result<(), RegistryError> {
        let mut g = self.inner.write();
        let n = Self::resolve(&g, name)
            .ok_or_else(|| RegistryError::NotFound { name: name.into() })?
            .to_string();
        let e = g
            .by_name
            .get_mut(&n)
            .ok_or_else(|| RegistryError::NotFound { name: n.clone() })?;
        match &e.claim {
            Some(c) if c.holder == holder => {
                e.claim = None;
                Ok(())
            }
            _ => Err(RegistryError::NotClaimedBy {
                name: n,
                holder: holder.into(),
            }),
        }
    }

    /// Who holds `name`, if anyone.
    pub fn claim_of(&self, name: &str) -> Option<Claim> {
        let g = self.inner.read();
        let n = Self::resolve(&g, name)?;
        g.by_name.get(n).and_then(|e| e.claim.clone())
    }

    /// Subscribes to the hot removal of `name`. Returns an id for unsubscribing.
    pub fn subscribe(&self, name: &str, cb: RemoveCallback) -> Result<u64, RegistryError> {
        let mut g = self.inner.write();
        let n = Self::resolve(&g, name)
            .ok_or_else(|| RegistryError::NotFound { name: name.into() })?
            .to_string();
        g.next_sub += 1;
        let id = g.next_sub;
        if let Some(e) = g.by_name.get_mut(&n) {
            e.subscribers.push((id, cb));
        }
        Ok(id)
    }

    pub fn unsubscribe(&self, name: &str, id: u64) {
        let mut g = self.inner.write();
        if let Some(n) = Self::resolve(&g, name).map(|s| s.to_string()) {
            if let Some(e) = g.by_name.get_mut(&n) {
                e.subscribers.retain(|(i, _)| *i != id);
            }
        }
    }

    /// Deletes an unclaimed bdev (the module's delete RPC).
    pub fn unregister(&self, name: &str) -> Result<Arc<Tracked>, RegistryError> {
        let mut g = self.inner.write();
        let n = Self::resolve(&g, name)
            .ok_or_else(|| RegistryError::NotFound { name: name.into() })?
            .to_string();
        if let Some(c) = g.by_name.get(&n).and_then(|e| e.claim.as_ref()) {
            return Err(RegistryError::Claimed {
                name: n,
                holder: c.holder.clone(),
                module: c.module,
            });
        }
        let e = g
            .by_name
            .remove(&n)
            .ok_or(RegistryError::NotFound { name: n })?;
        for a in &e.aliases {
            g.alias_to_name.remove(a);
        }
        Ok(e.bdev)
    }

    /// The device is gone: tells the claim holder and the subscribers (outside
    /// the lock, so they may call back into the registry), then removes it.
    /// Returns false if there was no such bdev.
    pub fn hot_remove(&self, name: &str) -> bool {
        let (n, callbacks) = {
            let mut g = self.inner.write();
            let Some(n) = Self::resolve(&g, name).map(|s| s.to_string()) else {
                return false;
            };
            let Some(e) = g.by_name.remove(&n) else {
                return false;
            };
            for a in &e.aliases {
                g.alias_to_name.remove(a);
            }
            let mut cbs: Vec<RemoveCallback> = e.subscribers.into_iter().map(|(_, c)| c).collect();
            if let Some(c) = e.claim.and_then(|c| c.on_remove) {
                cbs.push(c);
            }
            (n, cbs)
        };
        tracing::warn!(bdev = %n, consumers = callbacks.len(), "bdev hot-removed");
        for cb in callbacks {
            cb(&n);
        }
        true
    }

    /// Every bdev, by name.
    pub fn list(&self) -> Vec<Listed> {
        let g = self.inner.read();
        g.by_name.values().map(Self::listed).collect()
    }

    /// One bdev by name or alias.
    pub fn describe(&self, name: &str) -> Option<Listed> {
        let g = self.inner.read();
        let n = Self::resolve(&g, name)?;
        g.by_name.get(n).map(Self::listed)
    }

    fn listed(e: &Entry) -> Listed {
        Listed {
            info: e.bdev.info(),
            aliases: e.aliases.clone(),
            claim: e.claim.as_ref().map(|c| (c.holder.clone(), c.module)),
            supported: IoKind::ALL
                .into_iter()
                .filter(|k| e.bdev.supports(*k))
                .collect(),
            driver_specific: e.driver_specific.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.inner.read().by_name.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::malloc::MallocBdev;
    use std::sync::atomic::AtomicUsize;

    fn m(name: &str) -> BdevRef {
        Arc::new(MallocBdev::new(name, 8, 512, None).unwrap())
    }

    #[test]
    fn names_aliases_claims() {
        let r = BdevRegistry::new();
        r.register(m("a"), &["a-alias".into()]).unwrap();
        assert!(matches!(
            r.register(m("a"), &[]),
            Err(RegistryError::Exists { .. })
        ));
        assert!(matches!(
            r.register(m("b"), &["a".into()]),
            Err(RegistryError::Exists { .. })
        ));
        assert_eq!(r.get("a-alias").unwrap().name(), "a");
        r.claim(
            "a",
            Claim {
                holder: "raid r0".into(),
                module: "raid",
                on_remove: None,
            },
        )
        .unwrap();
        let e = r.claim(
            "a-alias",
            Claim {
                holder: "x".into(),
                module: "nbd",
                on_remove: None,
            },
        );
        assert_eq!(
            e.unwrap_err(),
            RegistryError::Claimed {
                name: "a".into(),
                holder: "raid r0".into(),
                module: "raid"
            }
        );
        let e = r.unregister("a").unwrap_err();
        assert!(e.to_string().contains("claimed by raid r0"), "{e}");
        assert!(r.release("a", "someone else").is_err());
        r.release("a", "raid r0").unwrap();
        r.unregister("a").unwrap();
        assert!(r.get("a-alias").is_none());
        assert!(r.is_empty());
    }

    #[test]
    fn hot_remove_reaches_holder_and_subscribers() {
        let r = BdevRegistry::new();
        r.register(m("n1"), &[]).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h1 = hits.clone();
        let h2 = hits.clone();
        r.claim(
            "n1",
            Claim {
                holder: "raid r".into(),
                module: "raid",
                on_remove: Some(Arc::new(move |_| {
                    h1.fetch_add(1, Ordering::SeqCst);
                })),
            },
        )
        .unwrap();
        r.subscribe(
            "n1",
            Arc::new(move |n| {
                assert_eq!(n, "n1");
                h2.fetch_add(10, Ordering::SeqCst);
            }),
        )
        .unwrap();
        assert!(r.hot_remove("n1"));
        assert_eq!(hits.load(Ordering::SeqCst), 11);
        assert!(r.get("n1").is_none());
        assert!(!r.hot_remove("n1"));
    }

    #[tokio::test]
    async fn stats_count_io() {
        use crate::BdevExt;
        let r = BdevRegistry::new();
        let t = r.register(m("s"), &[]).unwrap();
        t.write_blocks(0, &[1u8; 1024], false).await.unwrap();
        t.read_blocks(0, 1).await.unwrap();
        assert_eq!(t.stats.num_write_ops.load(Ordering::Relaxed), 1);
        assert_eq!(t.stats.bytes_written.load(Ordering::Relaxed), 1024);
        assert_eq!(t.stats.bytes_read.load(Ordering::Relaxed), 512);
    }
}
