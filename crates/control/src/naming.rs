//! Every name corral gives a runtime resource, in one place (invariant I2).
//! See docs/CONTROL.md, "Names". Parsers recognise our names so that the agent
//! can tell its own resources (live or orphaned) from everything else.

/// The NQN prefix of everything corral creates.
pub const NQN_PREFIX: &str = "nqn.2025-01.io.corral";

/// A replica id: `<volume>-r<8 hex>`.
pub fn new_replica_id(volume: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{volume}-r{}", &u[..8])
}

/// The volume a replica id belongs to.
pub fn replica_volume(replica: &str) -> Option<&str> {
    let (v, tail) = replica.rsplit_once("-r")?;
    (tail.len() == 8 && tail.bytes().all(|b| b.is_ascii_hexdigit()) && !v.is_empty()).then_some(v)
}

/// NQN of the subsystem that exposes replica `replica`.
pub fn replica_nqn(replica: &str) -> String {
    format!("{NQN_PREFIX}:replica:{replica}")
}

/// The replica named by a replica subsystem NQN.
pub fn parse_replica_nqn(nqn: &str) -> Option<&str> {
    nqn.strip_prefix(NQN_PREFIX)?
        .strip_prefix(":replica:")
        .filter(|r| !r.is_empty())
}

/// Host NQN of volume `volume`'s engine of epoch `epoch`.
pub fn engine_hostnqn(volume: &str, epoch: u64) -> String {
    format!("{NQN_PREFIX}:engine:{volume}:e{epoch}")
}

/// (volume, epoch) of an engine host NQN.
pub fn parse_engine_hostnqn(nqn: &str) -> Option<(&str, u64)> {
    let rest = nqn.strip_prefix(NQN_PREFIX)?.strip_prefix(":engine:")?;
    let (v, e) = rest.rsplit_once(":e")?;
    Some((v, e.parse().ok()?)).filter(|(v, _)| !v.is_empty())
}

/// Host NQN with which the source node of a rebuild connects to the new
/// replica `target` to copy the volume's snapshots into it.
pub fn rebuild_hostnqn(target: &str) -> String {
    format!("{NQN_PREFIX}:rebuild:{target}")
}

/// The rebuild target replica of a rebuild host NQN.
pub fn parse_rebuild_hostnqn(nqn: &str) -> Option<&str> {
    nqn.strip_prefix(NQN_PREFIX)?
        .strip_prefix(":rebuild:")
        .filter(|r| !r.is_empty())
}

/// Name of the source node's controller to the rebuild target `target`
/// (distinct from the engine's controller to it, which may live on the same
/// dataplane once the target joins the engine).
pub fn rebuild_ctrlr_name(target: &str) -> String {
    format!("{target}.rebuild")
}

/// NQN of the NVMe/TCP frontend of volume `volume`.
pub fn volume_nqn(volume: &str) -> String {
    format!("{NQN_PREFIX}:volume:{volume}")
}

pub fn parse_volume_nqn(nqn: &str) -> Option<&str> {
    nqn.strip_prefix(NQN_PREFIX)?
        .strip_prefix(":volume:")
        .filter(|v| !v.is_empty())
}

/// Name of the engine's NVMe controller to a replica (its namespace bdev is `<name>n1`).
pub fn engine_ctrlr_name(replica: &str) -> String {
    replica.to_string()
}

/// Namespace bdev of the engine's controller to `replica`.
pub fn engine_ns_bdev(replica: &str) -> String {
    format!("{replica}n1")
}

/// Name of the engine's raid1 bdev (and of its NBD export).
pub fn raid_name(volume: &str) -> String {
    volume.to_string()
}

/// The raid's UUID for one engine epoch: re-creating the raid within the same
/// epoch (a retry, an adoption) finds its durable member record again; a new
/// epoch starts a new record.
pub fn raid_uuid(volume: &str, epoch: u64) -> uuid::Uuid {
    // FNV-1a over the name and epoch, twice with different seeds, for 128 bits.
    let h = |seed: u64| {
        let mut x = 0xcbf2_9ce4_8422_2325u64 ^ seed;
        for b in volume.bytes().chain(epoch.to_le_bytes()) {
            x ^= b as u64;
            x = x.wrapping_mul(0x0100_0000_01b3);
        }
        x
    };
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&h(1).to_le_bytes());
    b[8..].copy_from_slice(&h(2).to_le_bytes());
    b[6] = (b[6] & 0x0f) | 0x80; // version 8 (custom)
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    uuid::Uuid::from_bytes(b)
}

/// The lvol alias `<lvstore>/<replica>` SPDK-style.
pub fn lvol_alias(disk: &str, replica: &str) -> String {
    format!("{disk}/{replica}")
}

/// The lvol name of snapshot `snap` of `replica` (in the replica's lvstore):
/// the replica's name first, so it is owned like the replica's head.
pub fn snapshot_lvol(replica: &str, snap: &str) -> String {
    format!("{replica}.snap.{snap}")
}

/// Volume and replica names: what users may type. Letters, digits, `-`, `_`,
/// `.`, starting with a letter or digit, at most 63 bytes (the replica id and
/// NQNs built from it then stay within NVMe's 223-byte limit).
pub fn valid_volume_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok || !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(
            "may hold letters, digits, '-', '_' and '.', and must start with a letter or digit"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let r = new_replica_id("vol-1");
        assert_eq!(replica_volume(&r), Some("vol-1"));
        assert_eq!(parse_replica_nqn(&replica_nqn(&r)), Some(r.as_str()));
        assert_eq!(
            parse_engine_hostnqn(&engine_hostnqn("vol-1", 7)),
            Some(("vol-1", 7))
        );
        assert_eq!(
            parse_engine_hostnqn("nqn.2014-08.org.nvmexpress:uuid:x"),
            None
        );
        assert_eq!(parse_volume_nqn(&volume_nqn("v")), Some("v"));
        assert_eq!(
            parse_rebuild_hostnqn(&rebuild_hostnqn(&r)),
            Some(r.as_str())
        );
        assert_eq!(parse_rebuild_hostnqn(&engine_hostnqn("v", 1)), None);
        assert_ne!(rebuild_ctrlr_name(&r), engine_ctrlr_name(&r));
        assert_eq!(replica_volume(&rebuild_ctrlr_name(&r)), None);
        assert_eq!(replica_volume("not-a-replica"), None);
        assert_eq!(engine_ns_bdev("v-r0123abcd"), "v-r0123abcdn1");
        assert!(engine_hostnqn(&"v".repeat(63), u64::MAX).len() <= 223);
        assert_eq!(raid_uuid("v", 3), raid_uuid("v", 3));
        assert_ne!(raid_uuid("v", 3), raid_uuid("v", 4));
    }

    #[test]
    fn volume_names() {
        assert!(valid_volume_name("vol1").is_ok());
        assert!(valid_volume_name("-x").is_err());
        assert!(valid_volume_name("a/b").is_err());
        assert!(valid_volume_name(&"a".repeat(64)).is_err());
    }
}
