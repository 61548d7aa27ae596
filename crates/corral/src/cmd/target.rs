//! `corral target`: an NVMe/TCP target with one subsystem and malloc or file
//! namespaces, configured from the command line. Used by interoperability tests
//! and benchmarks; the dataplane (`corral dataplane`) is the full daemon.

use std::sync::Arc;

use anyhow::{bail, Context};
use bdev::BdevRef;
use nvmf::target::tcp::TcpTarget;
use nvmf::target::{ListenAddress, SubsystemConfig, Target, TransportOpts};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on (host:port; port 0 picks one and prints it).
    #[arg(long, default_value = "127.0.0.1:4420")]
    pub listen: String,
    /// Subsystem NQN.
    #[arg(long, default_value = "nqn.2024-01.io.corral:target")]
    pub nqn: String,
    /// A RAM namespace of this many MiB (repeatable).
    #[arg(long = "malloc-mib")]
    pub malloc_mib: Vec<u64>,
    /// A file or block device namespace (repeatable).
    #[arg(long = "file")]
    pub files: Vec<String>,
    /// Block size of malloc namespaces.
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// Host NQNs allowed to connect (repeatable). Without any, every host may.
    #[arg(long = "allow-host")]
    pub allow_hosts: Vec<String>,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Busy-poll each I/O queue's socket this long (µs) before sleeping in
    /// epoll: lower latency at low queue depth for CPU time (SPDK polls all
    /// the time). 0 = never.
    #[arg(long, default_value_t = 0)]
    pub poll_us: u32,
    /// Write "ready <addr>" to stdout once listening (for scripts).
    #[arg(long)]
    pub print_ready: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(a))
}

async fn serve(a: Args) -> anyhow::Result<()> {
    let target = Target::new(TransportOpts {
        io_poll_us: a.poll_us,
        ..TransportOpts::default()
    });
    let mut cfg = SubsystemConfig::new(&a.nqn);
    cfg.allow_any_host = a.allow_hosts.is_empty();
    cfg.serial_number = "CORRAL0000000001".into();
    let sub = target
        .create_subsystem(cfg)
        .with_context(|| format!("subsystem {}", a.nqn))?;
    for h in &a.allow_hosts {
        sub.add_host(h).with_context(|| format!("allow host {h}"))?;
    }
    let mut bdevs: Vec<BdevRef> = Vec::new();
    for (i, mib) in a.malloc_mib.iter().enumerate() {
        let blocks = mib * 1024 * 1024 / a.block_size as u64;
        let b = bdev::malloc::MallocBdev::new(&format!("Malloc{i}"), blocks, a.block_size, None)
            .context("malloc namespace")?;
        bdevs.push(Arc::new(b));
    }
    if !a.files.is_empty() {
        bail!("file namespaces need the file bdev module (not built in this version)");
    }
    if bdevs.is_empty() {
        bail!("no namespace: give --malloc-mib or --file");
    }
    for b in bdevs {
        sub.add_namespace(b, None, None, None, false)
            .context("add namespace")?;
    }
    let tcp = TcpTarget::new(target.clone());
    let (host, port) = a
        .listen
        .rsplit_once(':')
        .with_context(|| format!("--listen {}: expected host:port", a.listen))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let la = tcp
        .add_listener(&a.nqn, ListenAddress::new(host, port))
        .await
        .context("listen")?;
    tcp.add_listener(nvme_wire::DISCOVERY_NQN, la.clone())
        .await
        .context("discovery listener")?;
    tracing::info!(nqn = %a.nqn, addr = %la, "serving");
    if a.print_ready {
        println!("ready {}", la.socket_addr_string());
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    tcp.shutdown();
    Ok(())
}

pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
