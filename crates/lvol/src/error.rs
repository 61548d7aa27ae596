//! Errors of the replica store, and the one place that maps them to the errno
//! values SPDK's lvol RPCs return (the RPC layer answers `-errno()`).

use std::path::PathBuf;

/// Why a store operation failed. Every failed operation leaves the store as it
/// was before the call (on disk and in memory), except [`LvolError::Io`] in the
/// middle of a multi-step operation, which leaves it in the before- or the
/// after-state (see the crate's DESIGN.md, "Crash model").
#[derive(Debug, thiserror::Error)]
pub enum LvolError {
    /// No lvstore or lvol by that name or UUID. RPC: `-ENODEV` (-19), as SPDK
    /// answers for an unknown bdev/lvol/lvstore.
    #[error("{what} {name}: no such device")]
    NotFound { what: &'static str, name: String },

    /// The name is taken in this store (lvol) or in this process (lvstore), or the
    /// directory already holds an lvstore. RPC: `-EEXIST` (-17).
    #[error("{what} {name}: already exists")]
    Exists { what: &'static str, name: String },

    /// A name that SPDK would not accept: empty, longer than 63 bytes, or holding
    /// '/' or a control character. RPC: `-EINVAL` (-22).
    #[error("name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    /// A bad argument: zero or absurd size, shrinking resize, unsupported block or
    /// cluster size, snapshot of a snapshot, revert to something that is not a
    /// snapshot. RPC: `-EINVAL` (-22).
    #[error("{name}: {reason}")]
    Invalid { name: String, reason: String },

    /// The operation would modify a read-only lvol (a snapshot): resize, write,
    /// revert of a snapshot. RPC: `-EPERM` (-1), as SPDK for read-only blobs.
    #[error("lvol {name}: is a read-only snapshot")]
    ReadOnly { name: String },

    /// Deleting a snapshot that more than one lvol depends on: there is no single
    /// neighbour to merge it into. RPC: `-EPERM` (-1), SPDK's answer for an lvol
    /// that is not deletable.
    #[error("snapshot {name}: has {} clones ({}); delete or decouple all but one first", clones.len(), clones.join(", "))]
    HasClones { name: String, clones: Vec<String> },

    /// Another operation on the same lvols is running (a snapshot delete merging
    /// them). RPC: `-EBUSY` (-16). Retry when it has finished.
    #[error("lvol {name}: busy ({reason})")]
    Busy { name: String, reason: &'static str },

    /// The directory belongs to another lvstore than the one asked for.
    /// RPC: `-EINVAL` (-22). Never opened, never modified.
    #[error("{}: holds lvstore {found_name} ({found}), not {expected}", dir.display())]
    WrongStore {
        dir: PathBuf,
        found: uuid::Uuid,
        found_name: String,
        expected: uuid::Uuid,
    },

    /// The directory holds no lvstore. RPC: `-ENODEV` (-19).
    #[error("{}: holds no lvstore", dir.display())]
    NoStore { dir: PathBuf },

    /// The on-disk metadata failed validation (checksum, format, references).
    /// RPC: `-EIO` (-5). The store is not opened.
    #[error("lvstore metadata {}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },

    /// The filesystem is full. RPC: `-ENOSPC` (-28). Nothing changed.
    #[error("{op}: no space left on the lvstore's filesystem")]
    NoSpace { op: String },

    /// An operating system error. RPC: `-errno` of the cause, `-EIO` if it has none.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LvolError {
    /// The positive errno a JSON-RPC layer reports (negated) for this error.
    pub fn errno(&self) -> i32 {
        match self {
            LvolError::NotFound { .. } | LvolError::NoStore { .. } => libc::ENODEV,
            LvolError::Exists { .. } => libc::EEXIST,
            LvolError::InvalidName { .. } | LvolError::Invalid { .. } => libc::EINVAL,
            LvolError::WrongStore { .. } => libc::EINVAL,
            LvolError::ReadOnly { .. } | LvolError::HasClones { .. } => libc::EPERM,
            LvolError::Busy { .. } => libc::EBUSY,
            LvolError::Corrupt { .. } => libc::EIO,
            LvolError::NoSpace { .. } => libc::ENOSPC,
            LvolError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// Wraps an OS error, turning ENOSPC/EDQUOT into [`LvolError::NoSpace`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => LvolError::NoSpace { op: op.to_string() },
            _ => LvolError::Io {
                op,
                path: path.into(),
                source,
            },
        }
    }

    pub(crate) fn not_found(what: &'static str, name: &str) -> Self {
        LvolError::NotFound {
            what,
            name: name.to_string(),
        }
    }
}

/// Result alias for store operations.
pub type Result<T, E = LvolError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_matches_spdk() {
        assert_eq!(LvolError::not_found("lvol", "x").errno(), 19);
        assert_eq!(
            LvolError::Exists {
                what: "lvol",
                name: "x".into()
            }
            .errno(),
            17
        );
        assert_eq!(
            LvolError::Invalid {
                name: "x".into(),
                reason: "shrink".into()
            }
            .errno(),
            22
        );
        assert_eq!(
            LvolError::HasClones {
                name: "s".into(),
                clones: vec![]
            }
            .errno(),
            1
        );
        assert_eq!(
            LvolError::Busy {
                name: "s".into(),
                reason: "merging"
            }
            .errno(),
            16
        );
        let e = LvolError::io(
            "write",
            "/x",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(matches!(e, LvolError::NoSpace { .. }));
        assert_eq!(e.errno(), 28);
        let e = LvolError::io(
            "write",
            "/x",
            std::io::Error::from_raw_os_error(libc::EROFS),
        );
        assert_eq!(e.errno(), libc::EROFS);
    }
}
