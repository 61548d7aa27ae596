//! `corral rpc`: call any dataplane JSON-RPC method (like SPDK's rpc.py).

use std::path::PathBuf;

use anyhow::Context;
use dataplane::rpc::RpcClient;
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The dataplane's RPC socket.
    #[arg(
        short,
        long,
        default_value = "/var/tmp/corral.sock",
        env = "CORRAL_RPC_SOCKET"
    )]
    pub socket: PathBuf,
    /// Method name, e.g. bdev_get_bdevs.
    pub method: String,
    /// Parameters as a JSON object, e.g. '{"name": "Malloc0"}'.
    pub params: Option<String>,
}

/// Exit code for a method that returned an error (distinct from usage errors).
pub const EXIT_RPC_ERROR: u8 = 2;

pub fn run(a: Args) -> anyhow::Result<std::process::ExitCode> {
    let params: Value = match &a.params {
        Some(p) => serde_json::from_str(p).with_context(|| format!("params are not JSON: {p}"))?,
        None => Value::Null,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = RpcClient::connect(&a.socket).await.with_context(|| {
            format!(
                "connecting to {} (is `corral dataplane` running?)",
                a.socket.display()
            )
        })?;
        match c.call(&a.method, params).await.context("RPC transport")? {
            Ok(v) => {
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(std::process::ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{}: error {}: {}", a.method, e.code, e.message);
                Ok(std::process::ExitCode::from(EXIT_RPC_ERROR))
            }
        }
    })
}
