//! Test harness: real `corral` processes on loopback, driven over their RPC socket.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::rpc::{RpcClient, RpcError};
use serde_json::{json, Value};

mod util;
#[allow(unused_imports)] // not every test binary uses every helper
pub use util::{corral_bin, fio_write_verify, free_port, qemu_io};

/// A `corral dataplane` process; killed on drop.
pub struct Dp {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
}

impl Dp {
    /// Starts a dataplane with its state in `dir` (created if missing).
    pub async fn start(dir: &Path) -> Dp {
        std::fs::create_dir_all(dir).unwrap();
        let sock = dir.join("rpc.sock");
        let log = dir.join("dataplane.log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(corral_bin())
            .args(["dataplane", "--rpc-socket"])
            .arg(&sock)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--threads", "2"])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn corral dataplane");
        let dp = Dp {
            child: Some(child),
            dir: dir.to_path_buf(),
            sock,
            log,
        };
        dp.wait_ready().await;
        dp
    }

    async fn wait_ready(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(mut c) = RpcClient::connect(&self.sock).await {
                if c.call("spdk_get_version", Value::Null).await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "dataplane did not come up; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub async fn client(&self) -> RpcClient {
        RpcClient::connect(&self.sock).await.expect("connect rpc")
    }

    /// Calls a method on a fresh connection.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        let mut c = self.client().await;
        c.call(method, params).await.expect("rpc transport")
    }

    /// Calls and expects success.
    pub async fn ok(&self, method: &str, params: Value) -> Value {
        match self.call(method, params.clone()).await {
            Ok(v) => v,
            Err(e) => panic!("{method} {params} failed: {e:?}"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGTERM and wait for exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let mut c = self.child.take()?;
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A target setup: TCP transport, a malloc bdev, a subsystem with it as a
    /// namespace, listening on 127.0.0.1:port (0 = pick). Returns the port.
    pub async fn serve_malloc(
        &self,
        nqn: &str,
        bdev: &str,
        mib: u64,
        port: u16,
        allow_any: bool,
    ) -> u16 {
        let _ = self
            .call("nvmf_create_transport", json!({"trtype": "TCP"}))
            .await;
        self.ok(
            "bdev_malloc_create",
            json!({"name": bdev, "num_blocks": mib * 2048, "block_size": 512}),
        )
        .await;
        self.ok(
            "nvmf_create_subsystem",
            json!({"nqn": nqn, "allow_any_host": allow_any}),
        )
        .await;
        self.ok(
            "nvmf_subsystem_add_ns",
            json!({"nqn": nqn, "namespace": {"bdev_name": bdev}}),
        )
        .await;
        let r = self
            .ok(
                "nvmf_subsystem_add_listener",
                json!({"nqn": nqn, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
            )
            .await;
        r["trsvcid"].as_str().unwrap().parse().unwrap()
    }
}

impl Drop for Dp {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // SAFETY: resume a possibly stopped child so that kill works promptly.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
        self.kill9();
    }
}

/// Asserts an RPC error code (and optionally the exact message).
pub fn assert_err(r: Result<Value, RpcError>, code: i32, msg: Option<&str>) {
    match r {
        Ok(v) => panic!("expected error {code}, got {v}"),
        Err(e) => {
            assert_eq!(e.code, code, "error {e:?}");
            if let Some(m) = msg {
                assert_eq!(e.message, m);
            }
        }
    }
}

/// Waits until `f` returns true, or panics after `t`.
pub async fn wait_for<F, Fut>(t: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while t0.elapsed() < t {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {t:?} waiting for {what}");
}
