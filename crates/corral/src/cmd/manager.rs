//! `corral manager`: the control plane. Serves the manager API (the CLI's) and
//! /metrics, and runs the reconcile loop over the store (a redb file).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use control::api::Knobs;
use control::manager::{Manager, ManagerConfig};
use control::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address of the API (the CLI, the agents' registration, /metrics).
    #[arg(long, default_value = "127.0.0.1:9500")]
    pub listen: SocketAddr,
    /// The store file (created if missing).
    #[arg(long)]
    pub store: PathBuf,
    /// Reconcile period in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub tick_ms: u64,
    /// A node whose agent does not answer for this long is not ready.
    #[arg(long, default_value_t = 10)]
    pub node_timeout_secs: u64,
    /// Engines give up on a lost replica controller after this many seconds.
    #[arg(long, default_value_t = 15, allow_negative_numbers = true)]
    pub ctrlr_loss_timeout_sec: i32,
    /// Engines try to reconnect a lost replica controller this often.
    #[arg(long, default_value_t = 2)]
    pub reconnect_delay_sec: u32,
    /// Engines fail I/O to a lost replica after this many seconds (it goes on the others).
    #[arg(long, default_value_t = 10)]
    pub fast_io_fail_timeout_sec: u32,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.tick_ms == 0 {
        bail!("--tick-ms must be at least 1");
    }
    if let Some(dir) = a.store.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the store's directory {}", dir.display()))?;
    }
    let store = Store::open(&a.store).with_context(|| {
        format!(
            "opening the store {} (is another manager using it?)",
            a.store.display()
        )
    })?;
    let cfg = ManagerConfig {
        knobs: Knobs {
            ctrlr_loss_timeout_sec: a.ctrlr_loss_timeout_sec,
            reconnect_delay_sec: a.reconnect_delay_sec,
            fast_io_fail_timeout_sec: a.fast_io_fail_timeout_sec,
        },
        tick: Duration::from_millis(a.tick_ms),
        node_timeout: Duration::from_secs(a.node_timeout_secs),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("corral-manager")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(store, cfg, a.listen, a.store))
}

async fn serve(
    store: Store,
    cfg: ManagerConfig,
    listen: SocketAddr,
    path: PathBuf,
) -> anyhow::Result<()> {
    let m = Manager::new(store, cfg);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(control::manager_http::serve(m, listen, async move {
        let _ = stop_rx.await;
    }));
    tracing::info!(listen = %listen, store = %path.display(), pid = std::process::id(), "manager started");
    let sig = super::target::wait_for_signal();
    tokio::pin!(sig);
    let early = tokio::select! {
        _ = &mut sig => None,
        r = &mut server => Some(r),
    };
    if let Some(r) = early {
        return match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e).with_context(|| format!("manager API on {listen}")),
            Err(e) => bail!("manager API task: {e}"),
        };
    }
    tracing::info!("stopping the manager API");
    let _ = stop_tx.send(());
    // `corral events --follow` streams never end by themselves: bounded wait.
    if tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .is_err()
    {
        tracing::info!("open event streams after 5 s; closing them");
    }
    tracing::info!("manager stopped (the store is consistent: every change commits atomically)");
    Ok(())
}
