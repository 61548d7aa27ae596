//! The on-disk metadata of an lvstore: one file, `lvstore.meta`, replaced
//! atomically (write `lvstore.meta.tmp`, fsync, rename, fsync the directory) on
//! every change of the store's shape. It holds the store's identity and every
//! lvol (head or snapshot) with its parent, size and data file.
//!
//! Layout: a 24-byte header, then a JSON body.
//!
//! ```text
//!  0..8   magic "CORRALVS"
//!  8..12  format version (u32 LE), 1
//! 12..16  body length (u32 LE), at most 64 MiB
//! 16..20  CRC32C of the body
//! 20..24  CRC32C of bytes 0..20
//! 24..    body: JSON of StoreMeta
//! ```
//!
//! [`decode`] is the parser the fuzz target drives: it checks the envelope, the
//! JSON, and every invariant the rest of the store relies on ([`validate`]), so
//! that a damaged or hostile file is refused instead of misread.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Name of the metadata file in the store directory.
pub const META_FILE: &str = "lvstore.meta";
/// Name of the metadata file while it is being replaced.
pub const META_TMP: &str = "lvstore.meta.tmp";
/// First bytes of the metadata file.
pub const MAGIC: [u8; 8] = *b"CORRALVS";
/// Format version written and understood.
pub const VERSION: u32 = 1;
/// Header length.
pub const HEADER_LEN: usize = 24;
/// Largest body accepted.
pub const MAX_BODY: usize = 64 << 20;
/// Largest lvol accepted (1 PiB).
pub const MAX_LVOL_BYTES: u64 = 1 << 50;
/// Longest chain (an lvol and its ancestors) accepted; bounds the in-memory
/// block-owner index, which is 16 bits wide.
pub const MAX_CHAIN: usize = 16_000;
/// Largest name, as SPDK (`SPDK_LVOL_NAME_MAX` - 1).
pub const MAX_NAME: usize = 63;

/// The whole metadata of one lvstore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreMeta {
    /// The store's identity: a directory holding another UUID is refused.
    pub uuid: Uuid,
    pub name: String,
    /// Block size of every lvol and granularity of the allocation maps: 512 or 4096.
    pub block_size: u32,
    /// SPDK's cluster size: lvol sizes are rounded up to it and space is reported
    /// in clusters. Allocation itself is per block.
    pub cluster_size: u64,
    /// Incremented on every commit.
    pub generation: u64,
    pub lvols: Vec<LvolMeta>,
}

/// One lvol: a writable head (or clone) or a read-only snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LvolMeta {
    pub uuid: Uuid,
    pub name: String,
    /// The snapshot this lvol is layered on; `None` for a base volume.
    pub parent: Option<Uuid>,
    pub snapshot: bool,
    /// False for a thick lvol, whose data file was preallocated.
    pub thin: bool,
    pub num_blocks: u64,
    /// Names the layer files `<file>.data` and `<file>.map`. Changes when a
    /// snapshot takes over a head's data or a revert gives the head a new layer.
    pub file: Uuid,
}

/// Why metadata bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("file too short ({0} bytes)")]
    Short(usize),
    #[error("bad magic: not a corral lvstore")]
    Magic,
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("unsupported format version {0}")]
    Version(u32),
    #[error("body length {len} does not match the file ({avail} bytes after the header)")]
    Length { len: usize, avail: usize },
    #[error("body checksum mismatch")]
    BodyChecksum,
    #[error("body is not valid metadata JSON: {0}")]
    Json(String),
    #[error("inconsistent metadata: {0}")]
    Invalid(String),
}

/// Checks an lvol or lvstore name as SPDK would accept it.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("name is empty");
    }
    if name.len() > MAX_NAME {
        return Err("name is longer than 63 bytes");
    }
    if name.contains('/') {
        return Err("name contains '/'");
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("name contains a control character");
    }
    Ok(())
}

/// Serialises metadata with its header. Infallible: the structure is plain data.
pub fn encode(meta: &StoreMeta) -> Vec<u8> {
    // Serialising plain structs of strings and integers cannot fail.
    let body = serde_json::to_vec(meta).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    let hcrc = crc32c::crc32c(&out[..20]);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Parses and validates metadata bytes (trailing bytes after the body are refused).
pub fn decode(bytes: &[u8]) -> Result<StoreMeta, MetaError> {
    if bytes.len() < HEADER_LEN {
        return Err(MetaError::Short(bytes.len()));
    }
    if bytes[..8] != MAGIC {
        return Err(MetaError::Magic);
    }
    if crc32c::crc32c(&bytes[..20]) != u32_at(bytes, 20) {
        return Err(MetaError::HeaderChecksum);
    }
    let version = u32_at(bytes, 8);
    if version != VERSION {
        return Err(MetaError::Version(version));
    }
    let len = u32_at(bytes, 12) as usize;
    let avail = bytes.len() - HEADER_LEN;
    if len > MAX_BODY || len != avail {
        return Err(MetaError::Length { len, avail });
    }
    let body = &bytes[HEADER_LEN..];
    if crc32c::crc32c(body) != u32_at(bytes, 16) {
        return Err(MetaError::BodyChecksum);
    }
    decode_body(body)
}

/// Parses and validates the JSON body alone (the fuzz target also calls this,
/// to reach the validation without having to forge checksums).
pub fn decode_body(body: &[u8]) -> Result<StoreMeta, MetaError> {
    let meta: StoreMeta =
        serde_json::from_slice(body).map_err(|e| MetaError::Json(e.to_string()))?;
    validate(&meta)?;
    Ok(meta)
}

fn invalid(s: String) -> MetaError {
    MetaError::Invalid(s)
}

/// Checks every invariant the store relies on.
pub fn validate(m: &StoreMeta) -> Result<(), MetaError> {
    check_name(&m.name).map_err(|r| invalid(format!("lvstore name {:?}: {r}", m.name)))?;
    if m.block_size != 512 && m.block_size != 4096 {
        return Err(invalid(format!(
            "block size {} is not 512 or 4096",
            m.block_size
        )));
    }
    if !m.cluster_size.is_power_of_two()
        || m.cluster_size < m.block_size as u64
        || m.cluster_size > 1 << 30
    {
        return Err(invalid(format!(
            "cluster size {} is not a power of two from the block size to 1 GiB",
            m.cluster_size
        )));
    }
    let mut by_uuid: HashMap<Uuid, &LvolMeta> = HashMap::new();
    let mut names = HashSet::new();
    let mut files = HashSet::new();
    for l in &m.lvols {
        check_name(&l.name).map_err(|r| invalid(format!("lvol name {:?}: {r}", l.name)))?;
        if !names.insert(l.name.as_str()) {
            return Err(invalid(format!("lvol name {} used twice", l.name)));
        }
        if by_uuid.insert(l.uuid, l).is_some() {
            return Err(invalid(format!("lvol uuid {} used twice", l.uuid)));
        }
        if !files.insert(l.file) {
            return Err(invalid(format!("layer file {} used twice", l.file)));
        }
        let bytes = l.num_blocks.checked_mul(m.block_size as u64);
        if l.num_blocks == 0 || !matches!(bytes, Some(b) if b <= MAX_LVOL_BYTES) {
            return Err(invalid(format!(
                "lvol {}: size of {} blocks out of range",
                l.name, l.num_blocks
            )));
        }
    }
    for l in &m.lvols {
        let mut depth = 1usize;
        let mut cur = l;
        while let Some(p) = cur.parent {
            let parent = by_uuid
                .get(&p)
                .ok_or_else(|| invalid(format!("lvol {}: parent {p} does not exist", cur.name)))?;
            if !parent.snapshot {
                return Err(invalid(format!(
                    "lvol {}: parent {} is not a snapshot",
                    cur.name, parent.name
                )));
            }
            if parent.num_blocks > cur.num_blocks {
                return Err(invalid(format!(
                    "lvol {}: smaller than its parent {}",
                    cur.name, parent.name
                )));
            }
            depth += 1;
            if depth > MAX_CHAIN || depth > m.lvols.len() {
                return Err(invalid(format!(
                    "lvol {}: parent chain loops or exceeds {MAX_CHAIN}",
                    l.name
                )));
            }
            cur = parent;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoreMeta {
        let base = LvolMeta {
            uuid: Uuid::new_v4(),
            name: "snap".into(),
            parent: None,
            snapshot: true,
            thin: true,
            num_blocks: 100,
            file: Uuid::new_v4(),
        };
        let head = LvolMeta {
            uuid: Uuid::new_v4(),
            name: "vol".into(),
            parent: Some(base.uuid),
            snapshot: false,
            thin: true,
            num_blocks: 200,
            file: Uuid::new_v4(),
        };
        StoreMeta {
            uuid: Uuid::new_v4(),
            name: "lvs0".into(),
            block_size: 4096,
            cluster_size: 1 << 20,
            generation: 3,
            lvols: vec![base, head],
        }
    }

    #[test]
    fn roundtrip() {
        let m = sample();
        let b = encode(&m);
        assert_eq!(decode(&b).unwrap(), m);
    }

    #[test]
    fn every_single_byte_flip_is_refused() {
        let b = encode(&sample());
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(decode(&c).is_err(), "flip at {i} accepted");
        }
        assert!(decode(&b[..b.len() - 1]).is_err());
        let mut longer = b.clone();
        longer.push(b' ');
        assert!(decode(&longer).is_err());
    }

    #[test]
    fn invariants() {
        let mut m = sample();
        m.lvols[1].parent = Some(m.lvols[1].uuid);
        assert!(matches!(validate(&m), Err(MetaError::Invalid(_))));
        let mut m = sample();
        m.lvols[0].snapshot = false;
        assert!(validate(&m).is_err());
        let mut m = sample();
        m.lvols[1].num_blocks = 50;
        assert!(validate(&m).is_err());
        let mut m = sample();
        m.lvols[1].name = "snap".into();
        assert!(validate(&m).is_err());
        let mut m = sample();
        m.lvols[1].file = m.lvols[0].file;
        assert!(validate(&m).is_err());
        let mut m = sample();
        m.block_size = 1024;
        assert!(validate(&m).is_err());
        let mut m = sample();
        m.lvols[0].num_blocks = u64::MAX;
        assert!(validate(&m).is_err());
        // a two-element cycle of snapshots
        let mut m = sample();
        m.lvols[1].snapshot = true;
        m.lvols[0].parent = Some(m.lvols[1].uuid);
        m.lvols[0].num_blocks = 200;
        assert!(validate(&m).is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"x".repeat(64)).is_err());
        assert!(check_name("ok-name_1").is_ok());
    }
}
