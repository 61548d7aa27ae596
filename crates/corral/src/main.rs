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
    #[command(flatten)]
    global: cmd::client::GlobalOpts,
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
    /// The per-node agent (instance manager) in front of a dataplane.
    Agent(cmd::agent::Args),
    /// The control plane: volumes, nodes, replicas; HTTP API and /metrics.
    Manager(cmd::manager::Args),
    /// Quick start: dataplanes, agents and a manager on this machine, and a volume.
    Up(cmd::up::Args),
    /// NVMe/TCP load generator (in the spirit of spdk_nvme_perf).
    Bench(cmd::bench::Args),
    #[command(flatten)]
    Ctl(cmd::ctl::CtlCmd),
}

fn main() -> std::process::ExitCode {
    // Usage errors exit 1 (clap's default 2 means "the manager refused" here).
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                std::process::ExitCode::FAILURE
            } else {
                std::process::ExitCode::SUCCESS
            };
        }
    };
    logging::init(cli.log_format);
    let r = match cli.cmd {
        Cmd::Dataplane(a) => cmd::dataplane::run(a).map(|_| std::process::ExitCode::SUCCESS),
        Cmd::Rpc(a) => cmd::rpc::run(a),
        Cmd::Target(a) => cmd::target::run(a).map(|_| std::process::ExitCode::SUCCESS),
        Cmd::Agent(a) => {
            cmd::agent::run(a, cli.global.manager.clone()).map(|_| std::process::ExitCode::SUCCESS)
        }
        Cmd::Manager(a) => cmd::manager::run(a).map(|_| std::process::ExitCode::SUCCESS),
        Cmd::Up(a) => cmd::up::run(a),
        Cmd::Bench(a) => cmd::bench::run(a).map(|_| std::process::ExitCode::SUCCESS),
        Cmd::Ctl(c) => Ok(cmd::ctl::run(c, cli.global)),
    };
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("corral: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
