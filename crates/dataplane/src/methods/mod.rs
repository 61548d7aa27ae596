//! The RPC method table: SPDK's names, parameters, result shapes and error
//! codes where SPDK has the method; `corral_` methods otherwise.

mod bdev_methods;
mod lvol_methods;
mod nbd_methods;
mod nvme_methods;
mod nvmf_methods;
mod raid_methods;
pub(crate) mod shallow_copy;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::rpc::{Handler, RpcError};
use crate::Dataplane;

/// Every method this dataplane serves, for `rpc_get_methods`.
pub const METHODS: &[&str] = &[
    "spdk_get_version",
    "rpc_get_methods",
    "bdev_get_bdevs",
    "bdev_get_iostat",
    "bdev_malloc_create",
    "bdev_malloc_delete",
    "bdev_aio_create",
    "bdev_aio_delete",
    "bdev_nvme_set_options",
    "bdev_nvme_attach_controller",
    "bdev_nvme_detach_controller",
    "bdev_nvme_get_controllers",
    "nvmf_create_transport",
    "nvmf_get_transports",
    "nvmf_create_subsystem",
    "nvmf_delete_subsystem",
    "nvmf_subsystem_add_listener",
    "nvmf_subsystem_remove_listener",
    "nvmf_subsystem_add_ns",
    "nvmf_subsystem_remove_ns",
    "nvmf_subsystem_add_host",
    "nvmf_subsystem_remove_host",
    "nvmf_subsystem_allow_any_host",
    "nvmf_get_subsystems",
    "nvmf_subsystem_get_controllers",
    "nvmf_subsystem_get_qpairs",
    "bdev_lvol_create_lvstore",
    "bdev_lvol_get_lvstores",
    "bdev_lvol_delete_lvstore",
    "bdev_lvol_create",
    "bdev_lvol_resize",
    "bdev_lvol_delete",
    "bdev_lvol_snapshot",
    "bdev_lvol_clone",
    "bdev_lvol_get_lvols",
    "corral_lvol_load_lvstore",
    "corral_lvol_revert",
    "corral_lvol_get_fragmap",
    "corral_lvol_get_checksum",
    "bdev_lvol_start_shallow_copy",
    "bdev_lvol_check_shallow_copy",
    "bdev_raid_create",
    "bdev_raid_delete",
    "bdev_raid_get_bdevs",
    "bdev_raid_add_base_bdev",
    "bdev_raid_remove_base_bdev",
    "corral_raid_set_rebuild_bandwidth",
    "corral_raid_get_records",
    "corral_raid_quiesce",
    "corral_raid_resume",
    "corral_dataplane_info",
    "corral_nbd_start",
    "corral_nbd_stop",
    "corral_nbd_list",
];

/// Parses `params` into `T`; absent params read as `{}`. Errors name the field.
pub fn params<T: DeserializeOwned>(v: Value) -> Result<T, RpcError> {
    let v = if v.is_null() { json!({}) } else { v };
    serde_json::from_value(v).map_err(RpcError::invalid_params)
}

/// Serialises a result.
pub fn to_value<T: serde::Serialize>(v: T) -> Result<Value, RpcError> {
    serde_json::to_value(v)
        .map_err(|e| RpcError::new(crate::rpc::code::INTERNAL_ERROR, e.to_string()))
}

/// Dispatches to the dataplane's methods.
#[derive(Debug)]
pub struct Methods(pub Arc<Dataplane>);

impl Handler for Methods {
    fn call(
        &self,
        method: String,
        p: Value,
    ) -> Pin<Box<dyn Future<Output = Result<Value, RpcError>> + Send>> {
        let dp = self.0.clone();
        Box::pin(async move { dispatch(&dp, &method, p).await })
    }
}

/// Runs a method that does blocking file I/O (fsync) off the I/O threads.
async fn blocking(
    dp: &Arc<Dataplane>,
    p: Value,
    f: fn(&Arc<Dataplane>, Value) -> Result<Value, RpcError>,
) -> Result<Value, RpcError> {
    let dp = dp.clone();
    tokio::task::spawn_blocking(move || f(&dp, p))
        .await
        .unwrap_or_else(|e| {
            Err(RpcError::new(
                crate::rpc::code::INTERNAL_ERROR,
                format!("method panicked: {e}"),
            ))
        })
}

async fn dispatch(dp: &Arc<Dataplane>, method: &str, p: Value) -> Result<Value, RpcError> {
    match method {
        "spdk_get_version" => Ok(json!({
            "version": format!("corral {}", env!("CARGO_PKG_VERSION")),
            "fields": {"major": 0, "minor": 1, "patch": 0, "suffix": "-corral"}
        })),
        "rpc_get_methods" => Ok(json!(METHODS)),
        "bdev_get_bdevs" => bdev_methods::get_bdevs(dp, p),
        "bdev_get_iostat" => bdev_methods::get_iostat(dp, p),
        "bdev_malloc_create" => bdev_methods::malloc_create(dp, p),
        "bdev_malloc_delete" => bdev_methods::delete(dp, p, "Malloc disk"),
        "bdev_aio_create" => bdev_methods::aio_create(dp, p),
        "bdev_aio_delete" => bdev_methods::delete(dp, p, "AIO disk"),
        "bdev_nvme_set_options" => nvme_methods::set_options(dp, p),
        "bdev_nvme_attach_controller" => nvme_methods::attach(dp, p).await,
        "bdev_nvme_detach_controller" => nvme_methods::detach(dp, p).await,
        "bdev_nvme_get_controllers" => nvme_methods::get_controllers(dp, p),
        "nvmf_create_transport" => nvmf_methods::create_transport(dp, p),
        "nvmf_get_transports" => nvmf_methods::get_transports(dp, p),
        "nvmf_create_subsystem" => nvmf_methods::create_subsystem(dp, p),
        "nvmf_delete_subsystem" => nvmf_methods::delete_subsystem(dp, p),
        "nvmf_subsystem_add_listener" => nvmf_methods::add_listener(dp, p).await,
        "nvmf_subsystem_remove_listener" => nvmf_methods::remove_listener(dp, p),
        "nvmf_subsystem_add_ns" => nvmf_methods::add_ns(dp, p),
        "nvmf_subsystem_remove_ns" => nvmf_methods::remove_ns(dp, p),
        "nvmf_subsystem_add_host" => nvmf_methods::add_host(dp, p),
        "nvmf_subsystem_remove_host" => nvmf_methods::remove_host(dp, p),
        "nvmf_subsystem_allow_any_host" => nvmf_methods::allow_any_host(dp, p),
        "nvmf_get_subsystems" => nvmf_methods::get_subsystems(dp, p),
        "nvmf_subsystem_get_controllers" => nvmf_methods::get_controllers(dp, p),
        "nvmf_subsystem_get_qpairs" => nvmf_methods::get_qpairs(dp, p),
        "bdev_lvol_create_lvstore" => blocking(dp, p, lvol_methods::create_lvstore).await,
        "bdev_lvol_get_lvstores" => blocking(dp, p, lvol_methods::get_lvstores).await,
        "bdev_lvol_delete_lvstore" => blocking(dp, p, lvol_methods::delete_lvstore).await,
        "bdev_lvol_create" => blocking(dp, p, lvol_methods::create).await,
        "bdev_lvol_resize" => blocking(dp, p, lvol_methods::resize).await,
        "bdev_lvol_delete" => blocking(dp, p, lvol_methods::delete).await,
        "bdev_lvol_snapshot" => blocking(dp, p, lvol_methods::snapshot).await,
        "bdev_lvol_clone" => blocking(dp, p, lvol_methods::clone).await,
        "bdev_lvol_get_lvols" => blocking(dp, p, lvol_methods::get_lvols).await,
        "corral_lvol_load_lvstore" => blocking(dp, p, lvol_methods::load_lvstore).await,
        "corral_lvol_revert" => blocking(dp, p, lvol_methods::revert).await,
        "corral_lvol_get_fragmap" => blocking(dp, p, lvol_methods::fragmap).await,
        "corral_lvol_get_checksum" => blocking(dp, p, lvol_methods::checksum).await,
        "bdev_lvol_start_shallow_copy" => shallow_copy::start(dp, p).await,
        "bdev_lvol_check_shallow_copy" => shallow_copy::check(dp, p),
        "bdev_raid_create" => raid_methods::create(dp, p).await,
        "bdev_raid_delete" => raid_methods::delete(dp, p).await,
        "bdev_raid_get_bdevs" => raid_methods::get_bdevs(dp, p),
        "bdev_raid_add_base_bdev" => raid_methods::add_base_bdev(dp, p).await,
        "bdev_raid_remove_base_bdev" => raid_methods::remove_base_bdev(dp, p).await,
        "corral_raid_set_rebuild_bandwidth" => raid_methods::set_bandwidth(dp, p),
        "corral_raid_get_records" => raid_methods::get_records(dp, p),
        "corral_raid_quiesce" => raid_methods::quiesce(dp, p).await,
        "corral_raid_resume" => raid_methods::resume(dp, p),
        "corral_dataplane_info" => Ok(json!({
            "pid": std::process::id(),
            "started": dp.started_unix,
            "uptime_secs": dp.started.elapsed().as_secs(),
            "state_dir": dp.state_dir,
            "version": env!("CARGO_PKG_VERSION"),
        })),
        "corral_nbd_start" => nbd_methods::start(dp, p).await,
        "corral_nbd_stop" => nbd_methods::stop(dp, p).await,
        "corral_nbd_list" => nbd_methods::list(dp, p),
        _ => Err(RpcError::new(
            crate::rpc::code::METHOD_NOT_FOUND,
            "Method not found",
        )),
    }
}
