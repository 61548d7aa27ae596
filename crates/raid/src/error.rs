//! Errors of the raid control operations, each mapped to the errno SPDK
//! answers with (the JSON-RPC layer sends `-errno` as the error code).

/// Why a raid operation failed. [`RaidError::errno`] is the one place that maps
/// them to SPDK's codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaidError {
    /// No raid of that name (`bdev_raid_delete`, `bdev_raid_add_base_bdev`): -ENODEV,
    /// as SPDK's "raid bdev %s not found".
    #[error("raid bdev {name} not found")]
    NotFound { name: String },
    /// A base bdev given to create/add does not exist: -ENODEV. (SPDK would
    /// leave the raid `configuring` until it appears; corral needs every member
    /// present at create.)
    #[error("raid bdev {raid}: base bdev {base} not found")]
    BaseNotFound { raid: String, base: String },
    /// `bdev_raid_remove_base_bdev` of a bdev that is no member of any raid: -ENODEV.
    #[error("bdev {name} is not a member of any raid bdev")]
    NotAMember { name: String },
    /// A raid or another bdev already has the name: -EEXIST ("Duplicate raid bdev name found").
    #[error("raid bdev {name}: a bdev with this name already exists")]
    Exists { name: String },
    /// The base bdev is claimed by someone else (an NVMe-oF namespace, an export,
    /// another raid, or this raid already): -EPERM, which is what SPDK's
    /// `spdk_bdev_module_claim_bdev` returns for a bdev already claimed (not
    /// EBUSY/EEXIST).
    #[error("raid bdev {raid}: base bdev {base} is already claimed by {holder}")]
    Claimed {
        raid: String,
        base: String,
        holder: String,
    },
    /// A second `bdev_raid_add_base_bdev` while a rebuild runs: -EPERM, as
    /// SPDK's "raid bdev '%s' is in process".
    #[error("raid bdev {raid}: a rebuild of {target} is running")]
    RebuildRunning { raid: String, target: String },
    /// Bad parameters (level, strip size, member count, block size, member too
    /// small or lacking an I/O type, no free slot, raid offline, no in-sync
    /// member to start from): -EINVAL.
    #[error("{what}: {why}")]
    InvalidParam { what: String, why: String },
    /// `corral_raid_quiesce` while another quiesce holds the raid: -EBUSY.
    #[error("raid bdev {raid} is already quiesced")]
    Quiesced { raid: String },
    /// I/O was still in flight when the quiesce's drain time ran out (the
    /// raid runs on, nothing held back): -ETIMEDOUT.
    #[error("raid bdev {raid}: {inflight} I/O(s) still in flight after {ms} ms; not quiesced")]
    DrainTimeout {
        raid: String,
        inflight: u32,
        ms: u64,
    },
    /// `corral_raid_resume` with a token that is not the quiesce in force
    /// (it ended, or another one holds the raid): -ENOENT.
    #[error("raid bdev {raid}: quiesce {token} is not in force")]
    NotQuiesced { raid: String, token: u64 },
    /// The membership record could not be read or written (the state dir): -EIO.
    #[error("raid bdev {raid}: state record: {why}")]
    Record { raid: String, why: String },
}

impl RaidError {
    /// The negative errno SPDK answers with.
    pub fn errno(&self) -> i32 {
        -match self {
            RaidError::NotFound { .. }
            | RaidError::BaseNotFound { .. }
            | RaidError::NotAMember { .. } => libc::ENODEV,
            RaidError::Exists { .. } => libc::EEXIST,
            RaidError::Claimed { .. } | RaidError::RebuildRunning { .. } => libc::EPERM,
            RaidError::InvalidParam { .. } => libc::EINVAL,
            RaidError::Record { .. } => libc::EIO,
            RaidError::Quiesced { .. } => libc::EBUSY,
            RaidError::DrainTimeout { .. } => libc::ETIMEDOUT,
            RaidError::NotQuiesced { .. } => libc::ENOENT,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        RaidError::InvalidParam {
            what: what.into(),
            why: why.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_are_spdks() {
        let n = |e: RaidError| e.errno();
        assert_eq!(n(RaidError::NotFound { name: "r".into() }), -19);
        assert_eq!(
            n(RaidError::BaseNotFound {
                raid: "r".into(),
                base: "b".into()
            }),
            -19
        );
        assert_eq!(n(RaidError::NotAMember { name: "b".into() }), -19);
        assert_eq!(n(RaidError::Exists { name: "r".into() }), -17);
        let c = RaidError::Claimed {
            raid: "r".into(),
            base: "b".into(),
            holder: "nbd x".into(),
        };
        assert!(c.to_string().contains("claimed by nbd x"));
        assert_eq!(n(c), -1);
        assert_eq!(
            n(RaidError::RebuildRunning {
                raid: "r".into(),
                target: "b".into()
            }),
            -1
        );
        assert_eq!(
            n(RaidError::invalid("raid_level", "raid5 is not supported")),
            -22
        );
        assert_eq!(
            n(RaidError::Record {
                raid: "r".into(),
                why: "x".into()
            }),
            -5
        );
        assert_eq!(n(RaidError::Quiesced { raid: "r".into() }), -16);
        assert_eq!(
            n(RaidError::DrainTimeout {
                raid: "r".into(),
                inflight: 1,
                ms: 5
            }),
            -110
        );
        assert_eq!(
            n(RaidError::NotQuiesced {
                raid: "r".into(),
                token: 3
            }),
            -2
        );
    }
}
