//! bdev_nvme_*: NVMe/TCP host controllers whose namespaces become bdevs.

use std::sync::Arc;
use std::time::Duration;

use nvmf::host::ControllerOpts;
use nvmf::TransportId;
use serde::Deserialize;
use serde_json::{json, Value};

use super::params;
use crate::nvme::{Multipath, NvmeOptions, PathFilter, PathId};
use crate::rpc::RpcError;
use crate::Dataplane;

/// The host NQN used when a caller gives none: one per dataplane, like SPDK's
/// default derived from the host's UUID.
pub fn default_hostnqn(dp: &Dataplane) -> String {
    let path = dp.state_dir.join("hostnqn");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim();
        if !s.is_empty() {
            return s.to_string();
        }
    }
    let n = format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid::Uuid::new_v4());
    let _ = std::fs::write(&path, format!("{n}\n"));
    n
}

#[derive(Deserialize)]
struct Attach {
    name: String,
    trtype: String,
    traddr: String,
    #[serde(default)]
    adrfam: Option<String>,
    #[serde(default)]
    trsvcid: Option<String>,
    subnqn: String,
    #[serde(default)]
    hostnqn: Option<String>,
    #[serde(default)]
    hostaddr: Option<String>,
    #[serde(default)]
    hostsvcid: Option<String>,
    #[serde(default)]
    hdgst: bool,
    #[serde(default)]
    ddgst: bool,
    #[serde(default)]
    multipath: Option<Multipath>,
    #[serde(default)]
    num_io_queues: Option<u16>,
    #[serde(default)]
    io_queue_requests: Option<u16>,
    #[serde(default)]
    ctrlr_loss_timeout_sec: Option<i32>,
    #[serde(default)]
    reconnect_delay_sec: Option<u32>,
    #[serde(default)]
    fast_io_fail_timeout_sec: Option<u32>,
    #[serde(default)]
    fabrics_connect_timeout_us: Option<u64>,
    #[serde(default)]
    keep_alive_timeout_ms: Option<u32>,
    /// corral: bound of one I/O in flight; one that expires resets the
    /// controller (then fast_io_fail applies). SPDK only has it globally.
    #[serde(default)]
    corral_io_timeout_ms: Option<u64>,
}

pub async fn attach(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Attach = params(p)?;
    if !a.trtype.eq_ignore_ascii_case("tcp") {
        return Err(RpcError::errno_msg(
            libc::EINVAL,
            format!("trtype {} is not supported (only tcp)", a.trtype),
        ));
    }
    if let Some(f) = &a.adrfam {
        if nvmf::trid::AdrFam::parse(f).is_none() {
            return Err(RpcError::errno_msg(
                libc::EINVAL,
                format!("adrfam {f} is not supported"),
            ));
        }
    }
    if a.name.is_empty() {
        return Err(RpcError::invalid_params("name must not be empty"));
    }
    let trid = TransportId::new(&a.traddr, a.trsvcid.as_deref().unwrap_or("4420"), &a.subnqn);
    let hostnqn = a
        .hostnqn
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| default_hostnqn(dp));
    let g = dp.nvme.options.lock().clone();
    let mut o = ControllerOpts::new(trid.clone());
    o.hostnqn = hostnqn.clone();
    if let Some(u) = hostnqn
        .strip_prefix("nqn.2014-08.org.nvmexpress:uuid:")
        .and_then(|u| uuid::Uuid::parse_str(u).ok())
    {
        o.hostid = *u.as_bytes();
    }
    o.hdgst = a.hdgst;
    o.ddgst = a.ddgst;
    o.num_io_queues = a.num_io_queues.unwrap_or(2).max(1);
    if let Some(d) = a.io_queue_requests {
        o.io_queue_depth = d.clamp(2, 1024);
    }
    o.kato_ms = a.keep_alive_timeout_ms.unwrap_or(g.keep_alive_timeout_ms);
    o.ctrlr_loss_timeout_sec = a.ctrlr_loss_timeout_sec.unwrap_or(g.ctrlr_loss_timeout_sec);
    o.reconnect_delay_sec = a.reconnect_delay_sec.unwrap_or(g.reconnect_delay_sec);
    o.fast_io_fail_timeout_sec = a
        .fast_io_fail_timeout_sec
        .unwrap_or(g.fast_io_fail_timeout_sec);
    if let Some(us) = a.fabrics_connect_timeout_us.filter(|&u| u > 0) {
        o.connect_timeout = Duration::from_micros(us);
    }
    if g.timeout_us > 0 {
        o.io_timeout = Duration::from_micros(g.timeout_us);
    }
    if g.timeout_admin_us > 0 {
        o.admin_timeout = Duration::from_micros(g.timeout_admin_us);
    }
    if let Some(ms) = a.corral_io_timeout_ms.filter(|&m| m > 0) {
        o.io_timeout = Duration::from_millis(ms);
    }
    o.validate()
        .map_err(|e| RpcError::errno_msg(libc::EINVAL, e.to_string()))?;
    let path = PathId {
        trid,
        hostnqn,
        hostaddr: a.hostaddr.unwrap_or_default(),
        hostsvcid: a.hostsvcid.unwrap_or_default(),
    };
    let names = dp
        .nvme
        .attach(&a.name, path, a.multipath.unwrap_or_default(), o)
        .await?;
    Ok(json!(names))
}

#[derive(Deserialize)]
struct Detach {
    name: String,
    #[serde(flatten)]
    path: PathFilter,
}

pub async fn detach(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Detach = params(p)?;
    dp.nvme.detach(&a.name, Some(a.path)).await?;
    Ok(json!(true))
}

#[derive(Deserialize)]
struct NameOpt {
    name: Option<String>,
}

pub fn get_controllers(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: NameOpt = params(p)?;
    match a.name {
        Some(n) => {
            let c = dp.nvme.get(&n).ok_or_else(|| {
                RpcError::errno_msg(libc::EINVAL, format!("Controller {n} does not exist"))
            })?;
            Ok(json!([c.to_json()]))
        }
        None => Ok(Value::Array(
            dp.nvme.list().iter().map(|c| c.to_json()).collect(),
        )),
    }
}

pub fn set_options(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let mut cur = dp.nvme.options.lock().clone();
    // Merge: fields not given keep their current value.
    let mut v = serde_json::to_value(&cur)
        .map_err(|e| RpcError::new(crate::rpc::code::INTERNAL_ERROR, e.to_string()))?;
    if let (Value::Object(dst), Value::Object(src)) = (&mut v, p) {
        for (k, val) in src {
            if dst.contains_key(&k) {
                dst.insert(k, val);
            }
        }
    }
    let new: NvmeOptions = params(v)?;
    if !dp.nvme.is_empty() {
        return Err(RpcError::errno(libc::EPERM));
    }
    let mut probe = ControllerOpts::new(TransportId::new(
        "127.0.0.1",
        "4420",
        "nqn.2014-08.org.nvmexpress:probe",
    ));
    probe.ctrlr_loss_timeout_sec = new.ctrlr_loss_timeout_sec;
    probe.reconnect_delay_sec = new.reconnect_delay_sec;
    probe.fast_io_fail_timeout_sec = new.fast_io_fail_timeout_sec;
    probe
        .validate()
        .map_err(|e| RpcError::errno_msg(libc::EINVAL, e.to_string()))?;
    cur = new;
    *dp.nvme.options.lock() = cur;
    Ok(json!(true))
}
