//! The durable record of a raid's membership: which members hold every
//! acknowledged write (invariant I5).
//!
//! One small JSON file per raid, `<state_dir>/raid/<name>.json`, replaced
//! atomically (write a temporary file, fsync it, rename it over the old one,
//! fsync the directory), so that after a crash at any moment the file is either
//! the old or the new record, never a mix. The control plane reads these files
//! with [`read_records`] after a dataplane crash, without creating anything.
//!
//! Format (version 1):
//!
//! ```json
//! {
//!   "format": 1,
//!   "name": "vol1",
//!   "uuid": "5f0c…",
//!   "generation": 7,
//!   "updated_at_ms": 1764000000000,
//!   "block_size": 512,
//!   "num_blocks": 131072,
//!   "members": [
//!     {"name": "r1n1", "uuid": "…", "slot": 0, "state": "online",      "since_ms": …, "reason": null},
//!     {"name": "r2n1", "uuid": "…", "slot": 1, "state": "out_of_sync", "since_ms": …,
//!      "reason": "write failed: no path to the device"},
//!     {"name": "r4n1", "uuid": "…", "slot": 2, "state": "rebuilding",  "since_ms": …, "reason": null}
//!   ]
//! }
//! ```
//!
//! `generation` grows with every change. A member is identified by name *and*
//! UUID: a different device that reuses a name is not the recorded member.
//! Only `online` members are a source of truth; `rebuilding` and `out_of_sync`
//! ones are not (a rebuild that was running when the dataplane died is not
//! complete). Members that left and whose slot was reused stay listed (with
//! `slot: null`), so that they are kept out if someone passes them again.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record format this code writes and reads.
pub const RECORD_FORMAT: u32 = 1;

/// Subdirectory of the dataplane's state dir that holds raid records.
pub const RECORD_DIR: &str = "raid";

/// A member's health as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedState {
    /// Holds every acknowledged write: a source of truth.
    Online,
    /// Was being rebuilt: not a source of truth.
    Rebuilding,
    /// Missed writes: not a source of truth until rebuilt.
    OutOfSync,
}

/// One member in the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub name: String,
    pub uuid: uuid::Uuid,
    /// Its slot in the raid, or None once the slot went to another member.
    pub slot: Option<u32>,
    pub state: RecordedState,
    /// Unix ms of the last change of `state`.
    pub since_ms: u64,
    /// Why it is not online, for a person.
    pub reason: Option<String>,
}

/// The durable record of one raid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaidRecord {
    pub format: u32,
    pub name: String,
    pub uuid: uuid::Uuid,
    /// Grows with every change; the file on disk is the highest one written.
    pub generation: u64,
    pub updated_at_ms: u64,
    pub block_size: u32,
    pub num_blocks: u64,
    pub members: Vec<MemberRecord>,
}

impl RaidRecord {
    /// The record entry of the member `name`, if any.
    pub fn member(&self, name: &str) -> Option<&MemberRecord> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Whether the device `name` with `uuid` holds every acknowledged write of
    /// this raid. False for unknown devices and for a different device that
    /// reuses a recorded name.
    pub fn is_in_sync(&self, name: &str, uuid: uuid::Uuid) -> bool {
        self.member(name)
            .is_some_and(|m| m.uuid == uuid && m.state == RecordedState::Online)
    }

    /// Members that are a source of truth.
    pub fn in_sync_members(&self) -> impl Iterator<Item = &MemberRecord> {
        self.members
            .iter()
            .filter(|m| m.state == RecordedState::Online)
    }

    /// Members that must not be read until rebuilt.
    pub fn out_of_sync_members(&self) -> impl Iterator<Item = &MemberRecord> {
        self.members
            .iter()
            .filter(|m| m.state != RecordedState::Online)
    }
}

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("raid record {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("raid record {path}: not valid JSON for a raid record: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "raid record {path}: format {format} is not supported (this build reads {RECORD_FORMAT})"
    )]
    Format { path: PathBuf, format: u32 },
}

/// Where raid records live. The dataplane uses [`DirStore`]; tests wrap it to
/// delay or fail persists.
pub trait StateStore: Send + Sync + 'static {
    /// Makes `record` durable, replacing the previous one of the same name.
    /// Called from the raid's persist thread, never from an I/O thread.
    fn save(&self, record: &RaidRecord) -> std::io::Result<()>;
    /// The record of raid `name`, if there is one.
    fn load(&self, name: &str) -> Result<Option<RaidRecord>, RecordError>;
    /// Forgets the record of raid `name` (no error if there is none).
    fn remove(&self, name: &str) -> std::io::Result<()>;
}

/// Raid records as files in `<state_dir>/raid/`.
#[derive(Debug, Clone)]
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    /// Uses (and creates) `<state_dir>/raid`.
    pub fn new(state_dir: impl AsRef<Path>) -> std::io::Result<DirStore> {
        let dir = state_dir.as_ref().join(RECORD_DIR);
        std::fs::create_dir_all(&dir)?;
        Ok(DirStore { dir })
    }

    /// The directory holding the records.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of raid `name`.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(file_name(name))
    }
}

impl StateStore for DirStore {
    fn save(&self, record: &RaidRecord) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        write_atomic(&self.dir, &file_name(&record.name), &bytes)
    }

    fn load(&self, name: &str) -> Result<Option<RaidRecord>, RecordError> {
        let path = self.path_of(name);
        match std::fs::read(&path) {
            Ok(bytes) => parse(&path, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RecordError::Io { path, source }),
        }
    }

    fn remove(&self, name: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path_of(name)) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Reads every raid record under a dataplane state dir, without creating or
/// changing anything (the control plane's view after a crash). A missing
/// directory means no records. Leftover temporary files of an interrupted
/// write are ignored: the rename never happened, so the previous record stands.
pub fn read_records(state_dir: impl AsRef<Path>) -> Result<Vec<RaidRecord>, RecordError> {
    let dir = state_dir.as_ref().join(RECORD_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(RecordError::Io { path: dir, source }),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|source| RecordError::Io {
            path: dir.clone(),
            source,
        })?;
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|source| RecordError::Io {
            path: path.clone(),
            source,
        })?;
        out.push(parse(&path, &bytes)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Reads the record of raid `name` under a dataplane state dir, if there is one.
pub fn read_record(
    state_dir: impl AsRef<Path>,
    name: &str,
) -> Result<Option<RaidRecord>, RecordError> {
    let path = state_dir.as_ref().join(RECORD_DIR).join(file_name(name));
    match std::fs::read(&path) {
        Ok(bytes) => parse(&path, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RecordError::Io { path, source }),
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<RaidRecord, RecordError> {
    #[derive(Deserialize)]
    struct Probe {
        format: u32,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|source| RecordError::Parse {
        path: path.into(),
        source,
    })?;
    if probe.format != RECORD_FORMAT {
        return Err(RecordError::Format {
            path: path.into(),
            format: probe.format,
        });
    }
    serde_json::from_slice(bytes).map_err(|source| RecordError::Parse {
        path: path.into(),
        source,
    })
}

/// The file name of raid `name`: bdev names may hold any character, so bytes
/// outside `[A-Za-z0-9_.-]` (and a leading dot) are percent-encoded.
pub fn file_name(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 5);
    for (i, b) in name.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if plain {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s.push_str(".json");
    s
}

/// Replaces `dir/file` with `bytes` atomically and durably.
pub(crate) fn write_atomic(dir: &Path, file: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{file}.tmp"));
    let path = dir.join(file);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Unix time now, in milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Formats unix ms as RFC 3339 UTC (`2026-11-25T07:26:37.123Z`), for status.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, gen: u64) -> RaidRecord {
        RaidRecord {
            format: RECORD_FORMAT,
            name: name.into(),
            uuid: uuid::Uuid::new_v4(),
            generation: gen,
            updated_at_ms: now_ms(),
            block_size: 512,
            num_blocks: 100,
            members: vec![
                MemberRecord {
                    name: "a".into(),
                    uuid: uuid::Uuid::new_v4(),
                    slot: Some(0),
                    state: RecordedState::Online,
                    since_ms: 1,
                    reason: None,
                },
                MemberRecord {
                    name: "b".into(),
                    uuid: uuid::Uuid::new_v4(),
                    slot: Some(1),
                    state: RecordedState::OutOfSync,
                    since_ms: 2,
                    reason: Some("write failed".into()),
                },
            ],
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("raid-record-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn save_load_replace_list() {
        let sd = tmpdir("rt");
        let s = DirStore::new(&sd).unwrap();
        assert_eq!(s.load("v/1").unwrap(), None);
        assert!(read_records(&sd).unwrap().is_empty());
        let r = rec("v/1", 1);
        s.save(&r).unwrap();
        assert_eq!(s.load("v/1").unwrap().unwrap(), r);
        let mut r2 = r.clone();
        r2.generation = 2;
        r2.members[1].state = RecordedState::Online;
        s.save(&r2).unwrap();
        assert_eq!(read_record(&sd, "v/1").unwrap().unwrap(), r2);
        s.save(&rec("a", 1)).unwrap();
        // a crash between write and rename leaves a .tmp that readers ignore
        std::fs::write(s.dir().join("zzz.json.tmp"), b"{garbage").unwrap();
        let all = read_records(&sd).unwrap();
        assert_eq!(
            all.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["a", "v/1"]
        );
        assert!(!s.dir().join(format!("{}.tmp", file_name("v/1"))).exists());
        s.remove("a").unwrap();
        s.remove("a").unwrap();
        assert_eq!(read_records(&sd).unwrap().len(), 1);
        std::fs::remove_dir_all(&sd).unwrap();
    }

    #[test]
    fn membership_queries() {
        let r = rec("x", 1);
        let a = r.members[0].uuid;
        let b = r.members[1].uuid;
        assert!(r.is_in_sync("a", a));
        assert!(!r.is_in_sync("a", b), "same name, other device");
        assert!(!r.is_in_sync("b", b));
        assert!(!r.is_in_sync("c", a));
        assert_eq!(r.in_sync_members().count(), 1);
        assert_eq!(r.out_of_sync_members().next().unwrap().name, "b");
    }

    #[test]
    fn bad_files_are_errors_not_silence() {
        let sd = tmpdir("bad");
        let s = DirStore::new(&sd).unwrap();
        std::fs::write(s.path_of("x"), b"{not json").unwrap();
        assert!(matches!(s.load("x"), Err(RecordError::Parse { .. })));
        std::fs::write(s.path_of("x"), br#"{"format": 9}"#).unwrap();
        assert!(matches!(
            s.load("x"),
            Err(RecordError::Format { format: 9, .. })
        ));
        assert!(read_records(&sd).is_err());
        std::fs::remove_dir_all(&sd).unwrap();
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_name("vol-1_a.b"), "vol-1_a.b.json");
        assert_eq!(file_name("../x"), "%2E.%2Fx.json");
        assert_eq!(file_name("a b"), "a%20b.json");
    }

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_764_055_597_000), "2025-11-25T07:26:37.000Z");
    }
}
