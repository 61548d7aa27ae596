//! `corral agent`: the per-node instance manager. Serves the agent API over HTTP
//! (control::agent_http) in front of its dataplane, and registers itself with
//! the manager (retrying with backoff until the manager answers).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use control::agent::{Agent, AgentConfig};
use control::retry::Backoff;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// This node's name (as the manager knows it).
    #[arg(long)]
    pub node: String,
    /// Address this node's replica targets and frontends listen on.
    #[arg(long)]
    pub address: String,
    /// The dataplane's JSON-RPC socket.
    #[arg(long, default_value = "/var/tmp/corral.sock")]
    pub rpc_socket: PathBuf,
    /// Address of the agent's HTTP API (IP:PORT; the manager calls it).
    #[arg(long)]
    pub listen: SocketAddr,
    /// A disk: NAME=DIR, a directory holding one lvstore (repeatable).
    #[arg(long = "disk", value_name = "NAME=DIR", value_parser = parse_disk)]
    pub disks: Vec<(String, PathBuf)>,
    /// Port of the replicas' NVMe/TCP listener.
    #[arg(long, default_value_t = 4420)]
    pub nvmf_port: u16,
    /// Port of the NBD server for NBD frontends.
    #[arg(long, default_value_t = 10809)]
    pub nbd_port: u16,
    /// Port of the NVMe/TCP frontend listener.
    #[arg(long, default_value_t = 4430)]
    pub frontend_port: u16,
    /// Orphans older than this are removed (0 = only report them).
    #[arg(long, default_value_t = 300)]
    pub orphan_grace_secs: u64,
    /// URL the manager uses to reach this agent (default: http://LISTEN).
    #[arg(long)]
    pub agent_url: Option<String>,
}

/// Parses `NAME=DIR`.
pub fn parse_disk(s: &str) -> Result<(String, PathBuf), String> {
    let (n, d) = s.split_once('=').ok_or_else(|| {
        format!("--disk {s}: expected NAME=DIR, e.g. disk0=/var/lib/corral/disk0")
    })?;
    control::naming::valid_volume_name(n).map_err(|e| format!("--disk {s}: disk name {e}"))?;
    if d.is_empty() {
        return Err(format!("--disk {s}: empty directory"));
    }
    Ok((n.to_string(), PathBuf::from(d)))
}

/// Runs the agent; with `manager` (the global --manager) it registers there.
pub fn run(a: Args, manager: Option<String>) -> anyhow::Result<()> {
    control::naming::valid_volume_name(&a.node)
        .map_err(|e| anyhow::anyhow!("--node {}: {e}", a.node))?;
    if a.listen.port() == 0 {
        bail!(
            "--listen {}: needs a fixed port, the manager must know where to call",
            a.listen
        );
    }
    let mut names: Vec<&str> = a.disks.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    if names.windows(2).any(|w| w[0] == w[1]) {
        bail!("--disk: a disk name is given twice");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("corral-agent")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(a, manager))
}

async fn serve(a: Args, manager: Option<String>) -> anyhow::Result<()> {
    let agent_url = a
        .agent_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", a.listen));
    let cfg = AgentConfig {
        node: a.node.clone(),
        address: a.address.clone(),
        rpc_socket: a.rpc_socket.clone(),
        listen: a.listen,
        disks: a.disks.clone(),
        nvmf_port: a.nvmf_port,
        nbd_port: a.nbd_port,
        frontend_port: a.frontend_port,
        orphan_grace: Duration::from_secs(a.orphan_grace_secs),
    };
    let agent = Agent::new(cfg);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(control::agent_http::serve(agent.clone(), async move {
        let _ = stop_rx.await;
    }));
    let registrar = manager.map(|m| {
        let node = a.node.clone();
        let address = a.address.clone();
        let url = agent_url.clone();
        tokio::spawn(register_until_done(m, node, url, address))
    });
    tracing::info!(node = %a.node, url = %agent_url, pid = std::process::id(), "agent started");
    let sig = super::target::wait_for_signal();
    tokio::pin!(sig);
    // The server ending by itself (e.g. the port is taken) is an error.
    let mut server = server;
    let early = tokio::select! {
        _ = &mut sig => None,
        r = &mut server => Some(r),
    };
    if let Some(r) = registrar {
        r.abort();
    }
    if let Some(r) = early {
        return match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e).with_context(|| format!("agent API on {}", a.listen)),
            Err(e) => bail!("agent API task: {e}"),
        };
    }
    tracing::info!("stopping the agent API");
    let _ = stop_tx.send(());
    // Followers of long requests must not hold the process: bounded wait.
    if tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .is_err()
    {
        tracing::warn!("agent API did not stop within 5 s; exiting anyway");
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// Registers this node with the manager, retrying with capped backoff and
/// jitter until it is accepted (the manager may start after the agent).
/// A refusal (4xx) is permanent: it is logged and registration stops.
async fn register_until_done(manager: String, node: String, agent_url: String, address: String) {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10));
    if super::client::is_loopback_url(&manager) {
        b = b.no_proxy();
    }
    let http = match b.build() {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("cannot build an HTTP client to register: {e}");
            return;
        }
    };
    let url = format!("{}/v1/nodes", manager.trim_end_matches('/'));
    let body = json!({"name": node, "agent_url": agent_url, "address": address});
    let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let why = match http.post(&url).json(&body).send().await {
            Ok(r) if r.status().is_success() => {
                tracing::info!(manager = %manager, node = %node, "registered with the manager");
                return;
            }
            Ok(r) if r.status().is_client_error() => {
                let st = r.status();
                let t = r.text().await.unwrap_or_default();
                tracing::error!(manager = %manager, "the manager refused to register node {node} ({st}): {t}");
                return;
            }
            Ok(r) => format!("HTTP {}", r.status()),
            Err(e) => e.to_string(),
        };
        let d = b.next_delay();
        let level_warn = b.attempts() > 5;
        if level_warn {
            tracing::warn!(manager = %manager, attempt = b.attempts(), retry_in_ms = d.as_millis() as u64, "registering node {node}: {why}");
        } else {
            tracing::info!(manager = %manager, attempt = b.attempts(), retry_in_ms = d.as_millis() as u64, "registering node {node}: {why}");
        }
        tokio::time::sleep(d).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        assert_eq!(
            parse_disk("disk0=/d").unwrap(),
            ("disk0".into(), PathBuf::from("/d"))
        );
        assert_eq!(parse_disk("d=/a=b").unwrap().1, PathBuf::from("/a=b"));
        assert!(parse_disk("/d").is_err());
        assert!(parse_disk("disk0=").is_err());
        assert!(parse_disk("bad/name=/d").is_err());
    }
}
