//! bdev_get_bdevs, bdev_get_iostat, and the malloc and aio (file) modules.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bdev::registry::{Listed, RegistryError};
use bdev::BdevRef;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::params;
use crate::rpc::RpcError;
use crate::Dataplane;

/// Registry errors as SPDK's errnos.
pub fn registry_error(e: RegistryError) -> RpcError {
    match e {
        RegistryError::NotFound { .. } => RpcError::errno(libc::ENODEV),
        RegistryError::Exists { name } => {
            RpcError::errno_msg(libc::EEXIST, format!("bdev {name} already exists"))
        }
        e @ RegistryError::Claimed { .. } => RpcError::errno_msg(libc::EBUSY, e.to_string()),
        e @ RegistryError::NotClaimedBy { .. } => RpcError::errno_msg(libc::EPERM, e.to_string()),
    }
}

#[derive(Deserialize)]
struct NameOpt {
    name: Option<String>,
}

fn bdev_json(l: &Listed) -> Value {
    let mut io = Map::new();
    for k in bdev::IoKind::ALL {
        io.insert(k.spdk_name().into(), Value::Bool(l.supported.contains(&k)));
    }
    for k in [
        "reset",
        "nvme_admin",
        "nvme_io",
        "compare",
        "compare_and_write",
        "abort",
        "seek_hole",
        "seek_data",
        "copy",
    ] {
        io.insert(k.into(), Value::Bool(false));
    }
    let driver: Value = l
        .driver_specific
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_else(|| json!({}));
    let mut v = json!({
        "name": l.info.name,
        "aliases": l.aliases,
        "product_name": l.info.product_name,
        "block_size": l.info.block_size,
        "num_blocks": l.info.num_blocks,
        "uuid": l.info.uuid.to_string(),
        "assigned_rate_limits": {"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0},
        "claimed": l.claim.is_some(),
        "zoned": false,
        "supported_io_types": io,
        "driver_specific": driver,
    });
    if let Some((holder, module)) = &l.claim {
        v["claim_type"] = json!("exclusive_write");
        v["corral_claimed_by"] = json!({"holder": holder, "module": module});
    }
    v
}

pub fn get_bdevs(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: NameOpt = params(p)?;
    match a.name {
        Some(n) => {
            let l = dp
                .registry
                .describe(&n)
                .ok_or_else(|| RpcError::errno(libc::ENODEV))?;
            Ok(json!([bdev_json(&l)]))
        }
        None => Ok(Value::Array(
            dp.registry.list().iter().map(bdev_json).collect(),
        )),
    }
}

pub fn get_iostat(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: NameOpt = params(p)?;
    let names: Vec<String> = match a.name {
        Some(n) => vec![dp
            .registry
            .canonical(&n)
            .ok_or_else(|| RpcError::errno(libc::ENODEV))?],
        None => dp
            .registry
            .list()
            .into_iter()
            .map(|l| l.info.name)
            .collect(),
    };
    let mut out = Vec::new();
    for n in names {
        let Some(t) = dp.registry.get(&n) else {
            continue;
        };
        let s = &t.stats;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        out.push(json!({
            "name": n,
            "bytes_read": ld(&s.bytes_read),
            "num_read_ops": ld(&s.num_read_ops),
            "bytes_written": ld(&s.bytes_written),
            "num_write_ops": ld(&s.num_write_ops),
            "bytes_unmapped": ld(&s.bytes_unmapped),
            "num_unmap_ops": ld(&s.num_unmap_ops),
            "num_write_zeroes_ops": ld(&s.num_write_zeroes_ops),
            "num_flush_ops": ld(&s.num_flush_ops),
        }));
    }
    let ticks = dp.started.elapsed().as_nanos() as u64;
    Ok(json!({"tick_rate": 1_000_000_000u64, "ticks": ticks, "bdevs": out}))
}

#[derive(Deserialize)]
struct MallocCreate {
    name: Option<String>,
    num_blocks: u64,
    block_size: u32,
    uuid: Option<uuid::Uuid>,
}

pub fn malloc_create(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: MallocCreate = params(p)?;
    let name = match a.name {
        Some(n) if !n.is_empty() => n,
        _ => (0..)
            .map(|i| format!("Malloc{i}"))
            .find(|n| dp.registry.get(n).is_none())
            .unwrap_or_default(),
    };
    let b = bdev::malloc::MallocBdev::new(&name, a.num_blocks, a.block_size, a.uuid)
        .map_err(|e| RpcError::errno_msg(libc::EINVAL, e.to_string()))?;
    let b: BdevRef = Arc::new(b);
    dp.registry.register(b, &[]).map_err(registry_error)?;
    tracing::info!(bdev = %name, blocks = a.num_blocks, block_size = a.block_size, "malloc bdev created");
    Ok(json!(name))
}

#[derive(Deserialize)]
struct AioCreate {
    name: String,
    filename: String,
    #[serde(default)]
    block_size: Option<u32>,
    #[serde(default)]
    uuid: Option<uuid::Uuid>,
}

pub fn aio_create(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: AioCreate = params(p)?;
    if dp.registry.get(&a.name).is_some() {
        return Err(RpcError::errno_msg(
            libc::EEXIST,
            format!("bdev {} already exists", a.name),
        ));
    }
    let reactor = dp
        .reactor()
        .map_err(|e| RpcError::errno_msg(libc::ENODEV, e.to_string()))?;
    let bs = a.block_size.filter(|&b| b != 0);
    let b = bdev::file::FileBdev::open(&a.name, &a.filename, bs, a.uuid, reactor).map_err(|e| {
        let errno = match &e {
            bdev::file::FileBdevError::Open { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EINVAL)
            }
            _ => libc::EINVAL,
        };
        RpcError::errno_msg(errno, e.to_string())
    })?;
    let b: BdevRef = Arc::new(b);
    dp.registry.register(b, &[]).map_err(registry_error)?;
    tracing::info!(bdev = %a.name, file = %a.filename, "aio (file) bdev created");
    Ok(json!(a.name))
}

#[derive(Deserialize)]
struct Name {
    name: String,
}

/// Deletes a bdev of the module whose product name is `product`.
pub fn delete(dp: &Arc<Dataplane>, p: Value, product: &str) -> Result<Value, RpcError> {
    let a: Name = params(p)?;
    let t = dp
        .registry
        .get(&a.name)
        .ok_or_else(|| RpcError::errno(libc::ENODEV))?;
    if bdev::Bdev::product_name(&*t) != product {
        return Err(RpcError::errno(libc::ENODEV));
    }
    dp.registry.unregister(&a.name).map_err(registry_error)?;
    tracing::info!(bdev = %a.name, "bdev deleted");
    Ok(json!(true))
}
