//! `corral dataplane`: the long-lived per-node daemon (SPDK's spdk_tgt analog).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use dataplane::methods::Methods;
use dataplane::rpc::RpcServer;
use dataplane::Dataplane;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// JSON-RPC Unix socket (created with mode 0600).
    #[arg(long, default_value = "/var/tmp/corral.sock")]
    pub rpc_socket: PathBuf,
    /// Directory for durable dataplane state (raid member records, host NQN, lock).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// CPU mask to run on, SPDK style (e.g. 0x1). Sets the thread count too.
    #[arg(long)]
    pub cpumask: Option<String>,
    /// Worker threads (default: from --cpumask, else 2).
    #[arg(long)]
    pub threads: Option<usize>,
}

fn parse_mask(m: &str) -> anyhow::Result<u64> {
    let h = m.trim_start_matches("0x").trim_start_matches("0X");
    let v = u64::from_str_radix(h, 16).with_context(|| format!("--cpumask {m}: not a hex mask"))?;
    if v == 0 {
        bail!("--cpumask {m}: empty mask");
    }
    Ok(v)
}

fn pin_process(mask: u64) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in 0..64 {
        if mask & (1 << cpu) != 0 {
            // SAFETY: cpu < CPU_SETSIZE; set is a valid cpu_set_t.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
    }
    // SAFETY: pid 0 is this thread; set is initialised; threads started later inherit it.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut threads = a.threads.unwrap_or(2);
    if let Some(m) = &a.cpumask {
        let mask = parse_mask(m)?;
        pin_process(mask)?;
        if a.threads.is_none() {
            threads = mask.count_ones() as usize;
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("corral-dp")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(a))
}

async fn serve(a: Args) -> anyhow::Result<()> {
    let dp = Dataplane::new(&a.state_dir).context("starting the dataplane")?;
    let server = RpcServer::start(&a.rpc_socket, Arc::new(Methods(dp.clone())))
        .await
        .with_context(|| format!("RPC socket {}", a.rpc_socket.display()))?;
    tracing::info!(socket = %a.rpc_socket.display(), state_dir = %a.state_dir.display(), pid = std::process::id(), "dataplane ready");
    super::target::wait_for_signal().await;
    tracing::info!("SIGTERM: stopping RPC, draining I/O, closing exports");
    server.stop().await;
    dp.shutdown().await;
    tracing::info!("dataplane stopped");
    Ok(())
}
