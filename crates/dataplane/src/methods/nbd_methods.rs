//! corral_nbd_*: NBD exports of bdevs (SPDK has no such methods in this form).

use std::net::SocketAddr;
use std::sync::Arc;

use bdev::registry::Claim;
use serde::Deserialize;
use serde_json::{json, Value};

use super::bdev_methods::registry_error;
use super::params;
use crate::rpc::RpcError;
use crate::Dataplane;

/// Where exports listen when the caller does not say.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

fn holder(export: &str) -> String {
    format!("nbd {export}")
}

fn nbd_error(e: nbd::NbdError) -> RpcError {
    use nbd::NbdError as E;
    let errno = match &e {
        E::ExportExists { .. } => libc::EEXIST,
        E::NoSuchExport { .. } => libc::ENODEV,
        E::InvalidName { .. } | E::BlockSize { .. } => libc::EINVAL,
        E::Listen { source, .. } => source.raw_os_error().unwrap_or(libc::EADDRINUSE),
        E::ShutDown { .. } => libc::ESHUTDOWN,
    };
    RpcError::errno_msg(errno, e.to_string())
}

#[derive(Deserialize)]
struct Start {
    name: String,
    bdev_name: String,
    #[serde(default)]
    listen_address: Option<String>,
}

pub async fn start(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Start = params(p)?;
    let addr: SocketAddr = a
        .listen_address
        .as_deref()
        .unwrap_or(DEFAULT_LISTEN)
        .parse()
        .map_err(|e| RpcError::invalid_params(format!("listen_address: {e}")))?;
    // The export claims its bdev; a hot-removed bdev ends the export.
    let weak = Arc::downgrade(dp);
    let on_remove: bdev::registry::RemoveCallback = Arc::new(move |b: &str| {
        if let Some(dp) = weak.upgrade() {
            for s in dp.nbd.lock().values() {
                s.bdev_removed(b);
            }
        }
    });
    let bdev = dp
        .registry
        .claim(
            &a.bdev_name,
            Claim {
                holder: holder(&a.name),
                module: "nbd",
                on_remove: Some(on_remove),
            },
        )
        .map_err(registry_error)?;
    let server = {
        let existing = dp.nbd.lock().get(&addr).cloned();
        match existing {
            Some(s) => s,
            None => match nbd::NbdServer::start(addr, nbd::ServerOptions::default()).await {
                Ok(s) => {
                    let s = Arc::new(s);
                    dp.nbd.lock().insert(addr, s.clone());
                    s
                }
                Err(e) => {
                    let _ = dp.registry.release(&a.bdev_name, &holder(&a.name));
                    return Err(nbd_error(e));
                }
            },
        }
    };
    // An export name is unique across servers.
    let taken = dp.nbd.lock().values().any(|s| s.export(&a.name).is_some());
    if taken {
        let _ = dp.registry.release(&a.bdev_name, &holder(&a.name));
        return Err(RpcError::errno_msg(
            libc::EEXIST,
            format!("NBD export {} already exists", a.name),
        ));
    }
    match server.add_export(&a.name, bdev, nbd::ExportOptions::default()) {
        Ok(i) => Ok(export_json(&i, &server.local_addr())),
        Err(e) => {
            let _ = dp.registry.release(&a.bdev_name, &holder(&a.name));
            Err(nbd_error(e))
        }
    }
}

#[derive(Deserialize)]
struct Stop {
    name: String,
}

pub async fn stop(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Stop = params(p)?;
    let server = dp
        .nbd
        .lock()
        .values()
        .find(|s| s.export(&a.name).is_some())
        .cloned();
    let Some(server) = server else {
        return Err(RpcError::errno_msg(
            libc::ENODEV,
            format!("NBD export {} does not exist", a.name),
        ));
    };
    let info = server.remove_export(&a.name).await.map_err(nbd_error)?;
    let _ = dp.registry.release(&info.bdev_name, &holder(&a.name));
    Ok(json!(true))
}

#[derive(Deserialize)]
struct ListParams {
    /// One export only; -ENODEV when it does not exist.
    #[serde(default)]
    name: Option<String>,
}

/// `corral_nbd_list [{name}]`: every export on every listener, or one.
pub fn list(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: ListParams = params(p)?;
    let mut out = Vec::new();
    for (addr, s) in dp.nbd.lock().iter() {
        match &a.name {
            Some(n) => out.extend(s.export(n).map(|e| export_json(&e, addr))),
            None => out.extend(s.exports().iter().map(|e| export_json(e, addr))),
        }
    }
    if let (Some(n), true) = (&a.name, out.is_empty()) {
        return Err(RpcError::errno_msg(
            libc::ENODEV,
            format!("NBD export {n} does not exist"),
        ));
    }
    Ok(Value::Array(out))
}

fn export_json(e: &nbd::ExportInfo, addr: &SocketAddr) -> Value {
    json!({
        "name": e.name, "bdev_name": e.bdev_name, "size": e.size, "block_size": e.block_size,
        "read_only": e.read_only, "multi_conn": e.multi_conn, "connections": e.connections,
        "uri": e.uri, "listen_address": addr.to_string(),
    })
}
