//! bdev_raid_*: the raid1 module, plus corral_raid_* for the durable member
//! records (invariant I5) and the rebuild bandwidth.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{params, to_value};
use crate::rpc::RpcError;
use crate::Dataplane;

fn raid_error(e: raid::RaidError) -> RpcError {
    RpcError::errno_msg(-e.errno(), e.to_string())
}

pub async fn create(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: raid::CreateParams = params(p)?;
    let r = dp.raid.create(a).await.map_err(raid_error)?;
    let _ = r;
    Ok(json!(true))
}

#[derive(Deserialize)]
struct Name {
    name: String,
}

pub async fn delete(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Name = params(p)?;
    dp.raid.delete(&a.name).await.map_err(raid_error)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
struct Category {
    #[serde(default = "all")]
    category: String,
    /// One raid only (a corral extension, like `bdev_get_bdevs {name}`): an
    /// agent looking up its engine's raid does not list every volume's.
    #[serde(default)]
    name: Option<String>,
}

fn all() -> String {
    "all".into()
}

pub fn get_bdevs(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Category = params(p)?;
    let Some(name) = a.name else {
        return to_value(dp.raid.get_bdevs(&a.category).map_err(raid_error)?);
    };
    let Some(raid) = dp.raid.get(&name) else {
        return Err(RpcError::errno_msg(
            libc::ENODEV,
            format!("raid {name} does not exist"),
        ));
    };
    let st = raid.status();
    let keep = match a.category.as_str() {
        "all" => true,
        c => {
            let Some(want) = raid::RaidState::parse(c) else {
                // The same -EINVAL as without a name.
                return to_value(dp.raid.get_bdevs(c).map_err(raid_error)?);
            };
            st.state == want
        }
    };
    to_value(if keep { vec![st] } else { Vec::new() })
}

#[derive(Deserialize)]
struct AddBase {
    raid_bdev: String,
    base_bdev: String,
    /// corral extension (SPDK has no such parameter): rebuild only these
    /// `[offset_blocks, num_blocks]` ranges, in raid blocks.
    #[serde(default)]
    corral_rebuild_ranges: Option<Vec<(u64, u64)>>,
}

/// `bdev_raid_add_base_bdev {raid_bdev, base_bdev, corral_rebuild_ranges?}`:
/// adds a member that takes every write at once and is rebuilt in the
/// background (answers once the rebuild started; `bdev_raid_get_bdevs` shows
/// its progress).
///
/// `corral_rebuild_ranges: [[offset_blocks, num_blocks], ...]` is a corral
/// extension: the caller vouches that the new member already holds the raid's
/// data outside these ranges (Longhorn-style replica rebuild: the snapshot
/// chain was copied to it, and these are the ranges allocated in a healthy
/// replica's head, read while the raid was quiesced), so the rebuild copies
/// only them. Ranges may be unsorted, overlapping or adjacent (they are
/// merged); one of zero blocks or reaching past the raid is -EINVAL and
/// nothing changes. `[]` copies nothing: the member goes online as soon as
/// that is recorded. Absent or null: the whole device is copied, as in SPDK.
pub async fn add_base_bdev(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: AddBase = params(p)?;
    dp.raid
        .add_base_bdev_with(
            &a.raid_bdev,
            &a.base_bdev,
            raid::AddOptions {
                rebuild_ranges: a.corral_rebuild_ranges,
            },
        )
        .await
        .map_err(raid_error)?;
    Ok(json!(true))
}

pub async fn remove_base_bdev(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Name = params(p)?;
    dp.raid
        .remove_base_bdev(&a.name)
        .await
        .map_err(raid_error)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
struct Bandwidth {
    name: String,
    mib_per_sec: u64,
}

pub fn set_bandwidth(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Bandwidth = params(p)?;
    dp.raid
        .set_rebuild_bandwidth(&a.name, a.mib_per_sec)
        .map_err(raid_error)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
struct Quiesce {
    name: String,
    /// How long I/O in flight may take to drain before the quiesce gives up.
    #[serde(default = "default_drain_ms")]
    drain_timeout_ms: u64,
    /// The quiesce ends by itself after this long if nobody resumes it.
    #[serde(default = "default_lease_ms")]
    lease_ms: u64,
}

fn default_drain_ms() -> u64 {
    5_000
}

fn default_lease_ms() -> u64 {
    15_000
}

/// Upper bound of a quiesce lease: I/O is never held for longer than this.
const MAX_LEASE_MS: u64 = 60_000;

/// `corral_raid_quiesce {name, drain_timeout_ms?, lease_ms?}`: holds new I/O
/// of the raid back and waits for I/O in flight, so that every member holds
/// the same writes (a consistent snapshot of all replicas). Answers
/// `{token}`; -EBUSY if already quiesced, -ETIMEDOUT if it could not drain.
pub async fn quiesce(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Quiesce = params(p)?;
    if a.lease_ms == 0 || a.lease_ms > MAX_LEASE_MS {
        return Err(RpcError::invalid_params(format!(
            "lease_ms must be 1..={MAX_LEASE_MS}, not {}",
            a.lease_ms
        )));
    }
    let raid = dp.raid.get(&a.name).ok_or_else(|| {
        raid_error(raid::RaidError::NotFound {
            name: a.name.clone(),
        })
    })?;
    let t0 = std::time::Instant::now();
    let token = raid
        .quiesce(
            Duration::from_millis(a.drain_timeout_ms),
            Duration::from_millis(a.lease_ms),
        )
        .await
        .map_err(raid_error)?;
    Ok(
        json!({"token": token, "drained_us": t0.elapsed().as_micros() as u64, "lease_ms": a.lease_ms}),
    )
}

#[derive(Deserialize)]
struct Resume {
    name: String,
    /// The quiesce to end; without it, whichever is in force.
    #[serde(default)]
    token: Option<u64>,
}

/// `corral_raid_resume {name, token?}`: lets the held I/O go. -ENOENT when that
/// quiesce is no longer in force (its lease ended it).
pub fn resume(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Resume = params(p)?;
    let raid = dp.raid.get(&a.name).ok_or_else(|| {
        raid_error(raid::RaidError::NotFound {
            name: a.name.clone(),
        })
    })?;
    raid.resume(a.token).map_err(raid_error)?;
    Ok(json!(true))
}

/// The durable member records of every raid this dataplane has had, read from
/// the state dir: they survive a crash of the dataplane (I5).
pub fn get_records(dp: &Arc<Dataplane>, _p: Value) -> Result<Value, RpcError> {
    let recs = raid::read_records(&dp.state_dir)
        .map_err(|e| RpcError::errno_msg(libc::EIO, e.to_string()))?;
    to_value(recs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn add_base_bdev_rebuild_ranges_param() {
        let a: AddBase = params(json!({"raid_bdev": "r", "base_bdev": "b"})).unwrap();
        assert_eq!(a.corral_rebuild_ranges, None);
        let a: AddBase =
            params(json!({"raid_bdev": "r", "base_bdev": "b", "corral_rebuild_ranges": null}))
                .unwrap();
        assert_eq!(a.corral_rebuild_ranges, None);
        let a: AddBase =
            params(json!({"raid_bdev": "r", "base_bdev": "b", "corral_rebuild_ranges": []}))
                .unwrap();
        assert_eq!(a.corral_rebuild_ranges, Some(vec![]));
        let a: AddBase = params(
            json!({"raid_bdev": "r", "base_bdev": "b", "corral_rebuild_ranges": [[8, 4], [0, 2]]}),
        )
        .unwrap();
        assert_eq!(a.corral_rebuild_ranges, Some(vec![(8, 4), (0, 2)]));
        for bad in [
            json!([[1]]),
            json!([[1, 2, 3]]),
            json!([[-1, 2]]),
            json!([1, 2]),
        ] {
            let r = params::<AddBase>(
                json!({"raid_bdev": "r", "base_bdev": "b", "corral_rebuild_ranges": bad}),
            );
            assert!(r.is_err(), "{bad} accepted");
        }
    }
}
