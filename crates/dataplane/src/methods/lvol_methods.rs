//! bdev_lvol_*: the replica store (lvstores on directories, thin lvols with
//! snapshot chains), plus corral_lvol_* for load, revert, fragmap and checksum.
//! Every lvol is a registered bdev named by its UUID with the alias
//! `<lvstore>/<lvol>`, as in SPDK.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::bdev_methods::registry_error;
use super::params;
use crate::rpc::RpcError;
use crate::Dataplane;

fn lvol_error(e: lvol::LvolError) -> RpcError {
    RpcError::errno_msg(e.errno(), e.to_string())
}

/// Registers every lvol of `lvs` that is not registered yet.
fn register_all(dp: &Dataplane, lvs: &str) -> Result<(), RpcError> {
    let store = dp.lvol.get(lvs).map_err(lvol_error)?;
    if let Ok(r) = dp.reactor() {
        store.set_reactor(Some(r));
    }
    for l in store.lvols().map_err(lvol_error)? {
        let name = l.uuid.to_string();
        if dp.registry.get(&name).is_none() {
            let b = store.bdev(&name).map_err(lvol_error)?;
            dp.registry
                .register(b, std::slice::from_ref(&l.alias))
                .map_err(registry_error)?;
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct CreateLvstore {
    /// SPDK names the base bdev; here it is the directory.
    #[serde(alias = "base_dir")]
    bdev_name: PathBuf,
    lvs_name: String,
    #[serde(default)]
    cluster_sz: Option<u64>,
    #[serde(default)]
    block_size: Option<u32>,
}

pub fn create_lvstore(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: CreateLvstore = params(p)?;
    let mut o = lvol::CreateOpts::default();
    if let Some(c) = a.cluster_sz {
        o.cluster_size = c;
    }
    if let Some(b) = a.block_size {
        o.block_size = b;
    }
    let u = dp
        .lvol
        .create_lvstore(&a.bdev_name, &a.lvs_name, o)
        .map_err(lvol_error)?;
    if let (Ok(s), Ok(r)) = (dp.lvol.get(&a.lvs_name), dp.reactor()) {
        s.set_reactor(Some(r));
    }
    tracing::info!(lvs = %a.lvs_name, dir = %a.bdev_name.display(), "lvstore created");
    Ok(json!(u.to_string()))
}

#[derive(Deserialize)]
struct LoadLvstore {
    #[serde(alias = "base_dir")]
    bdev_name: PathBuf,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
}

pub fn load_lvstore(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: LoadLvstore = params(p)?;
    let u = dp
        .lvol
        .load_lvstore(&a.bdev_name, a.uuid)
        .map_err(lvol_error)?;
    let s = dp.lvol.get(&u.to_string()).map_err(lvol_error)?;
    register_all(dp, &u.to_string())?;
    tracing::info!(lvs = %s.name(), uuid = %u, dir = %a.bdev_name.display(), "lvstore loaded");
    Ok(json!({"uuid": u.to_string(), "name": s.name()}))
}

#[derive(Deserialize)]
struct LvsFilter {
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    lvs_name: Option<String>,
    #[serde(default)]
    lvs_uuid: Option<String>,
}

impl LvsFilter {
    fn one(&self) -> Option<&str> {
        self.uuid
            .as_deref()
            .or(self.lvs_name.as_deref())
            .or(self.lvs_uuid.as_deref())
    }
}

pub fn get_lvstores(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: LvsFilter = params(p)?;
    let v = dp.lvol.get_lvstores(a.one()).map_err(lvol_error)?;
    Ok(Value::Array(
        v.iter()
            .map(|s| {
                json!({"uuid": s.uuid.to_string(), "name": s.name, "base_bdev": s.base_bdev,
                       "total_data_clusters": s.total_data_clusters, "free_clusters": s.free_clusters,
                       "block_size": s.block_size, "cluster_size": s.cluster_size})
            })
            .collect(),
    ))
}

pub fn delete_lvstore(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: LvsFilter = params(p)?;
    let which = a
        .one()
        .ok_or_else(|| RpcError::invalid_params("uuid or lvs_name is required"))?;
    let lvols = dp.lvol.get_lvols(Some(which)).map_err(lvol_error)?;
    for l in &lvols {
        if let Some(c) = dp.registry.claim_of(&l.uuid.to_string()) {
            return Err(RpcError::errno_msg(
                libc::EBUSY,
                format!("lvol {} is in use by {}", l.alias, c.holder),
            ));
        }
    }
    for l in &lvols {
        let _ = dp.registry.unregister(&l.uuid.to_string());
    }
    dp.lvol.delete_lvstore(which).map_err(lvol_error)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
struct CreateLvol {
    lvol_name: String,
    #[serde(default)]
    size_in_mib: Option<u64>,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    thin_provision: bool,
    #[serde(default)]
    lvs_name: Option<String>,
    #[serde(default)]
    uuid: Option<String>,
}

pub fn create(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: CreateLvol = params(p)?;
    let lvs = a
        .lvs_name
        .as_deref()
        .or(a.uuid.as_deref())
        .ok_or_else(|| RpcError::invalid_params("lvs_name or uuid is required"))?;
    let size = match (a.size_in_mib, a.size) {
        (Some(m), _) => m << 20,
        (None, Some(b)) => b,
        _ => return Err(RpcError::invalid_params("size_in_mib is required")),
    };
    let store = dp.lvol.get(lvs).map_err(lvol_error)?;
    // Thin always: corral never preallocates (the store allocates on write).
    let _ = a.thin_provision;
    let u = store
        .create_lvol(&a.lvol_name, size, true)
        .map_err(lvol_error)?;
    register_all(dp, lvs)?;
    tracing::info!(lvol = %format!("{lvs}/{}", a.lvol_name), size, "lvol created");
    Ok(json!(u.to_string()))
}

#[derive(Deserialize)]
struct Name {
    name: String,
}

pub fn delete(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Name = params(p)?;
    let store = dp.lvol.store_of(&a.name).map_err(lvol_error)?;
    let info = store.lvol(&a.name).map_err(lvol_error)?;
    let bdev_name = info.uuid.to_string();
    if let Some(c) = dp.registry.claim_of(&bdev_name) {
        return Err(RpcError::errno_msg(
            libc::EBUSY,
            format!("lvol {} is in use by {}", info.alias, c.holder),
        ));
    }
    store.delete(&a.name).map_err(lvol_error)?;
    let _ = dp.registry.unregister(&bdev_name);
    tracing::info!(lvol = %info.alias, "lvol deleted");
    Ok(json!(true))
}

#[derive(Deserialize)]
struct Resize {
    name: String,
    #[serde(default)]
    size_in_mib: Option<u64>,
    #[serde(default)]
    size: Option<u64>,
}

pub fn resize(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Resize = params(p)?;
    let size = a
        .size_in_mib
        .map(|m| m << 20)
        .or(a.size)
        .ok_or_else(|| RpcError::invalid_params("size_in_mib is required"))?;
    let store = dp.lvol.store_of(&a.name).map_err(lvol_error)?;
    store.resize(&a.name, size).map_err(lvol_error)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
struct Snapshot {
    lvol_name: String,
    snapshot_name: String,
}

pub fn snapshot(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Snapshot = params(p)?;
    let store = dp.lvol.store_of(&a.lvol_name).map_err(lvol_error)?;
    let u = store
        .snapshot(&a.lvol_name, &a.snapshot_name)
        .map_err(lvol_error)?;
    register_all(dp, &store.name())?;
    Ok(json!(u.to_string()))
}

#[derive(Deserialize)]
struct Clone {
    snapshot_name: String,
    clone_name: String,
}

pub fn clone(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Clone = params(p)?;
    let store = dp.lvol.store_of(&a.snapshot_name).map_err(lvol_error)?;
    let u = store
        .clone_snapshot(&a.snapshot_name, &a.clone_name)
        .map_err(lvol_error)?;
    register_all(dp, &store.name())?;
    Ok(json!(u.to_string()))
}

#[derive(Deserialize)]
struct Revert {
    name: String,
    snapshot_name: String,
}

pub fn revert(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Revert = params(p)?;
    let store = dp.lvol.store_of(&a.name).map_err(lvol_error)?;
    store
        .revert(&a.name, &a.snapshot_name)
        .map_err(lvol_error)?;
    Ok(json!(true))
}

pub fn get_lvols(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: LvsFilter = params(p)?;
    let v = dp.lvol.get_lvols(a.one()).map_err(lvol_error)?;
    Ok(Value::Array(
        v.iter()
            .map(|l| {
                // corral snapshot names are `<lvol>.snap.<name>`: report the owner.
                let owner = l.name.split_once(".snap.").map(|(o, _)| o).unwrap_or(&l.name);
                json!({
                    "alias": l.alias, "uuid": l.uuid.to_string(), "name": l.name,
                    "lvs": {"uuid": l.lvs_uuid.to_string(), "name": l.lvs_name}, "lvs_name": l.lvs_name,
                    "block_size": l.block_size, "num_blocks": l.num_blocks,
                    "is_thin_provisioned": l.is_thin_provisioned, "is_snapshot": l.is_snapshot,
                    "is_clone": l.is_clone, "base_snapshot": l.base_snapshot, "clones": l.clones,
                    "num_allocated_clusters": l.num_allocated_blocks, "num_allocated_blocks": l.num_allocated_blocks,
                    "disk_bytes": l.disk_bytes, "corral_owner": owner,
                })
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
struct FragmapReq {
    name: String,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    scope: Option<String>,
}

pub fn fragmap(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: FragmapReq = params(p)?;
    let store = dp.lvol.store_of(&a.name).map_err(lvol_error)?;
    let scope = match a.scope.as_deref() {
        None | Some("layer") => lvol::FragmapScope::Layer,
        Some("chain") => lvol::FragmapScope::Chain,
        Some(s) => {
            return Err(RpcError::invalid_params(format!(
                "scope {s}: expected layer or chain"
            )))
        }
    };
    let f = store
        .fragmap(&a.name, a.offset, a.size, scope)
        .map_err(lvol_error)?;
    Ok(json!({
        "block_size": f.block_size, "offset_blocks": f.offset_blocks, "num_blocks": f.num_blocks,
        "num_allocated_blocks": f.num_allocated_blocks,
        "ranges": f.ranges.iter().map(|(s, n)| json!([s, n])).collect::<Vec<_>>(),
    }))
}

pub fn checksum(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Name = params(p)?;
    let store = dp.lvol.store_of(&a.name).map_err(lvol_error)?;
    let c = store.checksum(&a.name).map_err(lvol_error)?;
    Ok(
        json!({"algorithm": c.algorithm, "checksum": format!("{:016x}", c.value), "num_blocks": c.num_blocks}),
    )
}
