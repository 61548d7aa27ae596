//! `corral`: every role of corral in one binary.

mod cmd;
mod logging;

use clap::{Parser, Subcommand};

/// Replicated block storage over NVMe/TCP.
#[derive(Debug, Parser)]
#[command(name = "corral", version, about)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text", env = "CORRAL_LOG_FORMAT")]
    log_format: logging::Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The dataplane daemon: bdevs, NVMe/TCP, raid, exports, behind JSON-RPC.
    Dataplane(cmd::dataplane::Args),
    /// Call a dataplane JSON-RPC method (like SPDK's rpc.py).
    Rpc(cmd::rpc::Args),
    /// A standalone NVMe/TCP target serving malloc or file namespaces.
    Target(cmd::target::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let r = match cli.cmd {
        Cmd::Dataplane(a) => cmd::dataplane::run(a).map(|_| std::process::ExitCode::SUCCESS),
        Cmd::Rpc(a) => cmd::rpc::run(a),
        Cmd::Target(a) => cmd::target::run(a).map(|_| std::process::ExitCode::SUCCESS),
    };
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("corral: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
