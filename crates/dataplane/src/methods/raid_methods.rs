//! bdev_raid_*: the raid1 module, plus corral_raid_* for the durable member
//! records (invariant I5) and the rebuild bandwidth.

use std::sync::Arc;

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
}

pub async fn add_base_bdev(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: AddBase = params(p)?;
    dp.raid
        .add_base_bdev(&a.raid_bdev, &a.base_bdev)
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

/// The durable member records of every raid this dataplane has had, read from
/// the state dir: they survive a crash of the dataplane (I5).
pub fn get_records(dp: &Arc<Dataplane>, _p: Value) -> Result<Value, RpcError> {
    let recs = raid::read_records(&dp.state_dir)
        .map_err(|e| RpcError::errno_msg(libc::EIO, e.to_string()))?;
    to_value(recs)
}
