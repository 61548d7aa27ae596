//! nvmf_*: the NVMe/TCP target — transport, subsystems, namespaces, listeners,
//! host allow-lists and introspection.

use std::sync::Arc;

use bdev::registry::Claim;
use nvmf::target::{ListenAddress, SubsystemConfig, TargetError, TransportOpts};
use serde::Deserialize;
use serde_json::{json, Value};

use super::bdev_methods::registry_error;
use super::params;
use crate::rpc::RpcError;
use crate::Dataplane;

/// Target errors as SPDK answers them (most are "Invalid parameters" with a message).
fn target_error(e: TargetError) -> RpcError {
    match e {
        TargetError::NoSuchSubsystem { nqn } => {
            RpcError::invalid_params(format!("Unable to find subsystem with NQN {nqn}"))
        }
        TargetError::SubsystemExists { nqn } => RpcError::invalid_params(format!(
            "Unable to create subsystem {nqn}: it already exists"
        )),
        e => RpcError::invalid_params(e.to_string()),
    }
}

#[derive(Deserialize)]
struct CreateTransport {
    trtype: String,
    max_queue_depth: Option<u16>,
    max_io_qpairs_per_ctrlr: Option<u16>,
    in_capsule_data_size: Option<u32>,
    max_io_size: Option<u32>,
}

pub fn create_transport(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: CreateTransport = params(p)?;
    if !a.trtype.eq_ignore_ascii_case("tcp") {
        return Err(RpcError::invalid_params(format!(
            "Transport type '{}' is not supported",
            a.trtype
        )));
    }
    let mut o = TransportOpts::default();
    if let Some(v) = a.max_queue_depth {
        o.max_queue_depth = v.clamp(2, 1024);
    }
    if let Some(v) = a.max_io_qpairs_per_ctrlr {
        o.max_io_qpairs_per_ctrlr = v.clamp(1, 1024);
    }
    if let Some(v) = a.in_capsule_data_size {
        o.in_capsule_data_size = v.min(8192);
    }
    if let Some(v) = a.max_io_size {
        if !(4096..=(4 << 20)).contains(&v) || !v.is_power_of_two() {
            return Err(RpcError::invalid_params(
                "max_io_size must be a power of two from 4096 to 4 MiB",
            ));
        }
        o.max_io_size = v;
    }
    if !dp.set_transport_created() {
        return Err(RpcError::errno_msg(
            libc::EEXIST,
            "Transport type 'TCP' already exists",
        ));
    }
    dp.target.set_opts(o);
    Ok(json!(true))
}

pub fn get_transports(dp: &Arc<Dataplane>, _p: Value) -> Result<Value, RpcError> {
    if !dp.transport_created() {
        return Ok(json!([]));
    }
    let o = dp.target.opts();
    Ok(json!([{
        "trtype": "TCP",
        "max_queue_depth": o.max_queue_depth,
        "max_io_qpairs_per_ctrlr": o.max_io_qpairs_per_ctrlr,
        "in_capsule_data_size": o.in_capsule_data_size,
        "max_io_size": o.max_io_size,
        "max_h2c_data": o.max_h2c_data,
    }]))
}

#[derive(Deserialize)]
struct CreateSubsystem {
    nqn: String,
    serial_number: Option<String>,
    model_number: Option<String>,
    #[serde(default)]
    allow_any_host: bool,
    max_namespaces: Option<u32>,
    min_cntlid: Option<u16>,
    max_cntlid: Option<u16>,
}

pub fn create_subsystem(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: CreateSubsystem = params(p)?;
    let mut cfg = SubsystemConfig::new(&a.nqn);
    if let Some(s) = a.serial_number {
        cfg.serial_number = s;
    }
    if let Some(m) = a.model_number {
        cfg.model_number = m;
    }
    cfg.allow_any_host = a.allow_any_host;
    if let Some(n) = a.max_namespaces.filter(|&n| n > 0) {
        cfg.max_namespaces = n;
    }
    if let Some(v) = a.min_cntlid {
        cfg.min_cntlid = v;
    }
    if let Some(v) = a.max_cntlid {
        cfg.max_cntlid = v;
    }
    dp.target.create_subsystem(cfg).map_err(target_error)?;
    tracing::info!(nqn = %a.nqn, "subsystem created");
    Ok(json!(true))
}

#[derive(Deserialize)]
struct Nqn {
    nqn: String,
}

pub fn delete_subsystem(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Nqn = params(p)?;
    let s = dp.target.subsystem(&a.nqn).filter(|s| !s.is_discovery);
    let s = s.ok_or_else(|| target_error(TargetError::NoSuchSubsystem { nqn: a.nqn.clone() }))?;
    let ns = s.namespaces();
    dp.tcp.delete_subsystem(&a.nqn).map_err(target_error)?;
    for n in ns.iter() {
        let _ = dp.registry.release(n.bdev.name(), &ns_holder(&a.nqn));
    }
    tracing::info!(nqn = %a.nqn, "subsystem deleted");
    Ok(json!(true))
}

#[derive(Deserialize)]
struct ListenAddr {
    trtype: String,
    #[serde(default)]
    adrfam: Option<String>,
    traddr: String,
    trsvcid: String,
}

#[derive(Deserialize)]
struct Listener {
    nqn: String,
    listen_address: ListenAddr,
}

fn listen_address(l: &ListenAddr) -> Result<ListenAddress, RpcError> {
    if !l.trtype.eq_ignore_ascii_case("tcp") {
        return Err(RpcError::invalid_params(format!(
            "trtype {} is not supported",
            l.trtype
        )));
    }
    let mut a = ListenAddress::new(&l.traddr, &l.trsvcid);
    if let Some(f) = l.adrfam.as_deref().and_then(nvmf::trid::AdrFam::parse) {
        a.adrfam = f;
    }
    Ok(a)
}

pub async fn add_listener(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Listener = params(p)?;
    if !dp.transport_created() {
        return Err(RpcError::invalid_params(
            "Unable to find transport TCP: call nvmf_create_transport first",
        ));
    }
    let la = listen_address(&a.listen_address)?;
    let actual = dp
        .tcp
        .add_listener(&a.nqn, la)
        .await
        .map_err(target_error)?;
    Ok(json!({"trtype": "TCP", "traddr": actual.traddr, "trsvcid": actual.trsvcid}))
}

pub fn remove_listener(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Listener = params(p)?;
    let la = listen_address(&a.listen_address)?;
    dp.tcp.remove_listener(&a.nqn, &la).map_err(target_error)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
struct NsParams {
    bdev_name: String,
    nsid: Option<u32>,
    nguid: Option<String>,
    uuid: Option<uuid::Uuid>,
}

#[derive(Deserialize)]
struct AddNs {
    nqn: String,
    namespace: NsParams,
}

fn ns_holder(nqn: &str) -> String {
    format!("nvmf {nqn}")
}

pub fn add_ns(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: AddNs = params(p)?;
    let s = dp.target.subsystem(&a.nqn).filter(|s| !s.is_discovery);
    let s = s.ok_or_else(|| target_error(TargetError::NoSuchSubsystem { nqn: a.nqn.clone() }))?;
    let nguid = match a.namespace.nguid.as_deref() {
        Some(h) => Some(
            parse_nguid(h)
                .ok_or_else(|| RpcError::invalid_params("nguid must be 32 hex digits"))?,
        ),
        None => None,
    };
    // The namespace claims its bdev; a hot-removed bdev takes the namespace with it.
    let holder = ns_holder(&a.nqn);
    let weak_t = Arc::downgrade(&dp.target);
    let nqn = a.nqn.clone();
    let on_remove: bdev::registry::RemoveCallback = Arc::new(move |bdev_name: &str| {
        let Some(t) = weak_t.upgrade() else { return };
        if let Some(s) = t.subsystem(&nqn) {
            let nsid = s
                .namespaces()
                .iter()
                .find(|n| n.bdev.name() == bdev_name)
                .map(|n| n.nsid);
            if let Some(nsid) = nsid {
                let _ = s.remove_namespace(nsid);
                tracing::warn!(nqn = %nqn, nsid, bdev = bdev_name, "namespace removed: its bdev went away");
            }
        }
    });
    let bdev = dp
        .registry
        .claim(
            &a.namespace.bdev_name,
            Claim {
                holder: holder.clone(),
                module: "nvmf",
                on_remove: Some(on_remove),
            },
        )
        .map_err(registry_error)?;
    match s.add_namespace(bdev, a.namespace.nsid, nguid, a.namespace.uuid, false) {
        Ok(nsid) => {
            tracing::info!(nqn = %a.nqn, nsid, bdev = %a.namespace.bdev_name, "namespace added");
            Ok(json!(nsid))
        }
        Err(e) => {
            let _ = dp.registry.release(&a.namespace.bdev_name, &holder);
            Err(target_error(e))
        }
    }
}

fn parse_nguid(h: &str) -> Option<[u8; 16]> {
    let h: String = h.chars().filter(|c| *c != '-').collect();
    if h.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[derive(Deserialize)]
struct RemoveNs {
    nqn: String,
    nsid: u32,
}

pub fn remove_ns(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: RemoveNs = params(p)?;
    let s = dp.target.subsystem(&a.nqn).filter(|s| !s.is_discovery);
    let s = s.ok_or_else(|| target_error(TargetError::NoSuchSubsystem { nqn: a.nqn.clone() }))?;
    let ns = s.remove_namespace(a.nsid).map_err(target_error)?;
    let _ = dp.registry.release(ns.bdev.name(), &ns_holder(&a.nqn));
    Ok(json!(true))
}

#[derive(Deserialize)]
struct Host {
    nqn: String,
    host: String,
}

pub fn add_host(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Host = params(p)?;
    let s = dp
        .target
        .subsystem(&a.nqn)
        .ok_or_else(|| target_error(TargetError::NoSuchSubsystem { nqn: a.nqn.clone() }))?;
    s.add_host(&a.host).map_err(target_error)?;
    Ok(json!(true))
}

pub fn remove_host(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Host = params(p)?;
    let s = dp
        .target
        .subsystem(&a.nqn)
        .ok_or_else(|| target_error(TargetError::NoSuchSubsystem { nqn: a.nqn.clone() }))?;
    s.remove_host(&a.host).map_err(target_error)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
struct AllowAny {
    nqn: String,
    allow_any_host: bool,
}

pub fn allow_any_host(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: AllowAny = params(p)?;
    let s = dp
        .target
        .subsystem(&a.nqn)
        .ok_or_else(|| target_error(TargetError::NoSuchSubsystem { nqn: a.nqn.clone() }))?;
    s.set_allow_any_host(a.allow_any_host);
    Ok(json!(true))
}

#[derive(Deserialize)]
struct NqnOpt {
    nqn: Option<String>,
}

fn adrfam_str(f: nvmf::trid::AdrFam) -> &'static str {
    match f {
        nvmf::trid::AdrFam::Ipv4 => "IPv4",
        nvmf::trid::AdrFam::Ipv6 => "IPv6",
    }
}

pub fn get_subsystems(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: NqnOpt = params(p)?;
    let mut subs = vec![dp.target.discovery().clone()];
    subs.extend(dp.target.subsystems());
    if let Some(n) = &a.nqn {
        subs.retain(|s| &s.nqn == n);
        if subs.is_empty() {
            return Err(target_error(TargetError::NoSuchSubsystem {
                nqn: n.clone(),
            }));
        }
    }
    let out: Vec<Value> = subs
        .iter()
        .map(|s| {
            let mut v = json!({
                "nqn": s.nqn,
                "subtype": if s.is_discovery { "Discovery" } else { "NVMe" },
                "listen_addresses": s.listeners().iter().map(|l| json!({
                    "trtype": "TCP", "adrfam": adrfam_str(l.adrfam), "traddr": l.traddr, "trsvcid": l.trsvcid,
                })).collect::<Vec<_>>(),
                "allow_any_host": s.allow_any_host(),
                "hosts": s.hosts().iter().map(|h| json!({"nqn": h})).collect::<Vec<_>>(),
            });
            if !s.is_discovery {
                v["serial_number"] = json!(s.serial_number);
                v["model_number"] = json!(s.model_number);
                v["max_namespaces"] = json!(s.max_namespaces);
                v["min_cntlid"] = json!(s.min_cntlid);
                v["max_cntlid"] = json!(s.max_cntlid);
                v["namespaces"] = Value::Array(
                    s.namespaces()
                        .iter()
                        .map(|n| {
                            let g: String = n.nguid.iter().map(|b| format!("{b:02X}")).collect();
                            json!({"nsid": n.nsid, "bdev_name": n.bdev.name(), "name": n.bdev.name(), "nguid": g, "uuid": n.uuid.to_string()})
                        })
                        .collect(),
                );
            }
            v
        })
        .collect();
    Ok(Value::Array(out))
}

pub fn get_controllers(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Nqn = params(p)?;
    let infos = dp
        .target
        .controller_infos(&a.nqn)
        .ok_or_else(|| target_error(TargetError::NoSuchSubsystem { nqn: a.nqn.clone() }))?;
    Ok(Value::Array(
        infos
            .iter()
            .map(|c| {
                json!({
                    "cntlid": c.cntlid, "hostnqn": c.hostnqn, "hostid": c.hostid,
                    "num_io_qpairs": c.num_io_qpairs, "state": c.state, "kato_ms": c.kato_ms,
                    "keep_alive_remaining_ms": c.keep_alive_remaining_ms, "queues": c.queues,
                })
            })
            .collect(),
    ))
}

pub fn get_qpairs(dp: &Arc<Dataplane>, p: Value) -> Result<Value, RpcError> {
    let a: Nqn = params(p)?;
    if dp.target.subsystem(&a.nqn).is_none() {
        return Err(target_error(TargetError::NoSuchSubsystem { nqn: a.nqn }));
    }
    Ok(Value::Array(
        dp.tcp
            .qpairs(Some(&a.nqn))
            .iter()
            .map(|q| {
                json!({
                    "cntlid": q.cntlid, "qid": q.qid, "state": "active", "thread": "corral",
                    "hostnqn": q.hostnqn, "peer_address": q.peer,
                    "listen_address": {"trtype": "TCP", "adrfam": adrfam_str(q.listen_address.adrfam),
                        "traddr": q.listen_address.traddr, "trsvcid": q.listen_address.trsvcid},
                })
            })
            .collect(),
    ))
}
