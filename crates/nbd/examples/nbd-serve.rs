//! Serves one malloc or file bdev over NBD until interrupted; for benchmarks
//! and poking with real clients.
//!
//! ```text
//! cargo run --release -p nbd --example nbd-serve -- --listen 127.0.0.1:10809 --name m --malloc-mib 1024
//! cargo run --release -p nbd --example nbd-serve -- --name f --file /path/to/img
//! ```

use std::sync::Arc;

use bdev::file::FileBdev;
use bdev::malloc::MallocBdev;
use bdev::uring::Reactor;
use bdev::BdevRef;
use clap::Parser;
use nbd::{ExportOptions, NbdServer, ServerOptions};

#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: std::net::SocketAddr,
    /// Export name.
    #[arg(long, default_value = "")]
    name: String,
    /// Serve a malloc bdev of this many MiB.
    #[arg(long, conflicts_with = "file")]
    malloc_mib: Option<u64>,
    /// Serve this file (or block device) through the io_uring file bdev.
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// Block size of the bdev.
    #[arg(long)]
    block_size: Option<u32>,
    /// tokio worker threads (0: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Advertise fast zeroing.
    #[arg(long)]
    fast_zero: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    let rt = if a.threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.threads)
            .thread_name("nbd-worker")
            .enable_all()
            .build()?
    };
    let (bdev, _reactor): (BdevRef, Option<Arc<Reactor>>) = match (&a.malloc_mib, &a.file) {
        (Some(mib), None) => {
            let bs = a.block_size.unwrap_or(512);
            let b = MallocBdev::new("malloc0", (mib << 20) / bs as u64, bs, None)?;
            (Arc::new(b), None)
        }
        (None, Some(path)) => {
            let r = Arc::new(Reactor::new("nbd-serve")?);
            let b = FileBdev::open("file0", path, a.block_size, None, r.clone())?;
            (Arc::new(b), Some(r))
        }
        _ => return Err("give --malloc-mib or --file".into()),
    };
    rt.block_on(async {
        let server = NbdServer::start(a.listen, ServerOptions::default()).await?;
        let opts = ExportOptions {
            fast_zero: a.fast_zero,
            ..Default::default()
        };
        let info = server.add_export(&a.name, bdev, opts)?;
        println!("{}", info.uri);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        server.shutdown().await;
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
