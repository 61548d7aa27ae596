//! A cluster on loopback for control-plane tests: real `corral dataplane`
//! processes, agents and a manager (in this process, or as processes).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::agent::{Agent, AgentConfig};

/// Sets a fault point in an agent (process or not) through its HTTP API.
pub async fn set_fault(listen: SocketAddr, point: Option<&str>) {
    let r = reqwest::Client::new()
        .post(format!("http://{listen}/v1/debug/fault"))
        .json(&serde_json::json!({"point": point}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}
use control::manager::{Manager, ManagerConfig};
use control::model::*;
use control::store::Store;

/// The corral binary: CORRAL_BIN, else the newest of target/{ci,release,debug}/corral.
pub fn corral_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CORRAL_BIN") {
        return p.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut c: Vec<PathBuf> = [
        "target/ci/corral",
        "target/release/corral",
        "target/debug/corral",
    ]
    .iter()
    .map(|p| root.join(p))
    .filter(|p| p.exists())
    .collect();
    c.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    c.pop()
        .expect("build the corral binary first (cargo build -p corral)")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A unique loopback /24 per test process and name, so tests never share addresses.
pub fn subnet(tag: u8) -> String {
    let pid = std::process::id();
    format!("127.{}.{}", 20 + (tag % 200), (pid % 250) as u8 + 1)
}

pub struct DpProc {
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub dir: PathBuf,
}

impl DpProc {
    pub fn start(dir: &Path) -> DpProc {
        std::fs::create_dir_all(dir).unwrap();
        let sock = dir.join("rpc.sock");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("dataplane.log"))
            .unwrap();
        let child = Command::new(corral_bin())
            .args(["dataplane", "--threads", "2", "--rpc-socket"])
            .arg(&sock)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while !sock.exists() && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        DpProc {
            child: Some(child),
            sock,
            dir: dir.to_path_buf(),
        }
    }
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }
    pub fn restart(&mut self) {
        self.kill9();
        let _ = std::fs::remove_file(&self.sock);
        *self = DpProc::start(&self.dir.clone());
    }
}

impl Drop for DpProc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill9();
    }
}

pub struct NodeH {
    pub name: String,
    pub address: String,
    pub dp: DpProc,
    /// The agent when it runs in this process.
    pub agent: Arc<Agent>,
    pub agent_task: tokio::task::JoinHandle<()>,
    /// The agent when it runs as a `corral agent` process.
    pub agent_proc: Option<AgentProc>,
    pub listen: SocketAddr,
    pub disk: PathBuf,
}

/// A `corral agent` process; killed on drop.
pub struct AgentProc {
    pub child: Option<Child>,
    pub args: Vec<String>,
    pub log: PathBuf,
}

impl AgentProc {
    pub fn start(args: Vec<String>, log: &Path, env: &[(&str, &str)]) -> AgentProc {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(corral_bin());
        cmd.arg("agent")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        AgentProc {
            child: Some(child),
            args,
            log: log.to_path_buf(),
        }
    }
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    /// Whether the process has exited (e.g. aborted at a fault point).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_some(),
            None => true,
        }
    }
    pub fn restart(&mut self) {
        self.kill9();
        let a = self.args.clone();
        *self = AgentProc::start(a, &self.log.clone(), &[]);
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl NodeH {
    /// A client of this node's dataplane RPC (for tests that look or tamper).
    pub fn dpc(&self) -> control::dp::DpClient {
        control::dp::DpClient::new(self.dp.sock.clone())
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeH>,
    pub manager: Arc<Manager>,
    pub manager_task: tokio::task::JoinHandle<()>,
}

pub fn agent_config(
    name: &str,
    address: &str,
    sock: &Path,
    disk: &Path,
    listen: SocketAddr,
) -> AgentConfig {
    AgentConfig {
        node: name.into(),
        address: address.into(),
        rpc_socket: sock.to_path_buf(),
        listen,
        disks: vec![("disk0".into(), disk.to_path_buf())],
        nvmf_port: 4420,
        nbd_port: 10809,
        frontend_port: 4430,
        orphan_grace: Duration::from_secs(3600),
    }
}

pub fn start_agent(cfg: AgentConfig) -> (Arc<Agent>, tokio::task::JoinHandle<()>) {
    let a = Agent::new(cfg);
    let a2 = a.clone();
    let t = tokio::spawn(async move {
        let _ = control::agent_http::serve(a2, std::future::pending()).await;
    });
    (a, t)
}

impl Cluster {
    pub async fn start(n: usize, tag: u8) -> Cluster {
        Self::start_with(n, tag, false).await
    }

    /// With `procs`, agents run as `corral agent` processes (for crash tests).
    pub async fn start_with(n: usize, tag: u8, procs: bool) -> Cluster {
        Self::start_full(n, tag, procs, Duration::from_secs(3600)).await
    }

    /// With an orphan grace period for the agents (in-process agents only).
    pub async fn start_full(n: usize, tag: u8, procs: bool, grace: Duration) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let net = subnet(tag);
        let store = Store::open(&dir.path().join("manager.redb")).unwrap();
        let cfg = ManagerConfig {
            knobs: control::api::Knobs {
                ctrlr_loss_timeout_sec: 4,
                reconnect_delay_sec: 1,
                fast_io_fail_timeout_sec: 2,
            },
            tick: Duration::from_millis(300),
            node_timeout: Duration::from_secs(5),
        };
        let manager = Manager::new(store, cfg);
        let m2 = manager.clone();
        let manager_task = tokio::spawn(async move { m2.run().await });
        let mut nodes = Vec::new();
        for i in 1..=n {
            let name = format!("node{i}");
            let address = format!("{net}.{i}");
            let nd = dir.path().join(&name);
            let dp = DpProc::start(&nd);
            let disk = nd.join("disk0");
            let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut cfg = agent_config(&name, &address, &dp.sock, &disk, listen);
            cfg.orphan_grace = grace;
            // The in-process agent object is kept for convenience calls; when
            // agents are processes it serves no API (port 0 is never used).
            let (agent, agent_task, agent_proc) = if procs {
                let args = vec![
                    "--node".into(),
                    name.clone(),
                    "--address".into(),
                    address.clone(),
                    "--rpc-socket".into(),
                    dp.sock.display().to_string(),
                    "--listen".into(),
                    listen.to_string(),
                    "--disk".into(),
                    format!("disk0={}", disk.display()),
                    "--orphan-grace-secs".into(),
                    "3600".into(),
                ];
                let p = AgentProc::start(args, &nd.join("agent.log"), &[]);
                let a = Agent::new(cfg);
                (a, tokio::spawn(async {}), Some(p))
            } else {
                let (a, t) = start_agent(cfg);
                (a, t, None)
            };
            manager
                .register_node(&name, &format!("http://{listen}"), &address)
                .unwrap();
            nodes.push(NodeH {
                name,
                address,
                dp,
                agent,
                agent_task,
                agent_proc,
                listen,
                disk,
            });
        }
        let c = Cluster {
            dir,
            nodes,
            manager,
            manager_task,
        };
        c.wait("nodes ready", Duration::from_secs(20), |m| {
            m.nodes()
                .map(|ns| {
                    ns.iter()
                        .all(|n| n.ready && n.disks.iter().all(|d| d.ready))
                })
                .unwrap_or(false)
        })
        .await;
        c
    }

    /// Asks for `v` to be attached on `node` over NBD.
    pub fn attach(&self, v: &str, node: &str) {
        self.manager
            .set_attach(
                v,
                Some(control::model::AttachSpec {
                    node: node.into(),
                    frontend: control::model::Frontend::Nbd,
                }),
            )
            .unwrap();
    }

    /// The checksum of lvol `lvol` of replica `r`, from its node's dataplane.
    pub async fn checksum(&self, r: &control::model::Replica, lvol: &str) -> String {
        let n = self.nodes.iter().find(|n| n.name == r.node).unwrap();
        let v = n
            .agent
            .call(
                "corral_lvol_get_checksum",
                serde_json::json!({ "name": control::naming::lvol_alias(&r.disk, lvol) }),
            )
            .await
            .unwrap_or_else(|e| panic!("checksum of {lvol} on {}: {e}", r.node));
        v["checksum"].as_str().unwrap().to_string()
    }

    /// The checksum of `lvol(replica)` on every replica of `rs`; asserts
    /// they agree and returns it.
    pub async fn same_everywhere(
        &self,
        rs: &[control::model::Replica],
        what: &str,
        lvol: impl Fn(&control::model::Replica) -> String,
    ) -> String {
        let mut sums = Vec::new();
        for r in rs {
            sums.push((r.name.clone(), self.checksum(r, &lvol(r)).await));
        }
        assert!(
            sums.iter().all(|(_, s)| *s == sums[0].1),
            "{what} differs between replicas: {sums:?}"
        );
        sums[0].1.clone()
    }

    /// Takes `volume`'s replica on `node` out of the engine's mirror (as an
    /// I/O error would), through the dataplane of engine node `engine` (index);
    /// returns that replica.
    pub async fn drop_member(
        &self,
        volume: &str,
        node: &str,
        engine: usize,
    ) -> control::model::Replica {
        let r = self
            .manager
            .replicas(Some(volume))
            .unwrap()
            .into_iter()
            .find(|r| r.node == node)
            .unwrap();
        self.nodes[engine]
            .agent
            .call(
                "bdev_raid_remove_base_bdev",
                serde_json::json!({ "name": control::naming::engine_ns_bdev(&r.name) }),
            )
            .await
            .unwrap();
        r
    }

    pub async fn wait(&self, what: &str, t: Duration, f: impl Fn(&Manager) -> bool) {
        let t0 = Instant::now();
        while t0.elapsed() < t {
            if f(&self.manager) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let vols = self.manager.volumes().unwrap_or_default();
        let evs = self.manager.events_since(0).unwrap_or_default();
        let tail: Vec<String> = evs
            .iter()
            .rev()
            .take(25)
            .rev()
            .map(|e| format!("{} {} {}: {}", e.kind, e.object, e.reason, e.message))
            .collect();
        panic!(
            "timed out after {t:?} waiting for {what}\nvolumes: {vols:#?}\nevents:\n{}",
            tail.join("\n")
        );
    }

    pub async fn wait_state(&self, vol: &str, st: VolumeState, t: Duration) -> Volume {
        self.wait(&format!("{vol} {st:?}"), t, |m| {
            m.volume(vol).map(|v| v.state == st).unwrap_or(false)
        })
        .await;
        self.manager.volume(vol).unwrap()
    }

    pub fn events(&self) -> Vec<Event> {
        self.manager.events_since(0).unwrap()
    }
}

/// qemu-io against an NBD URI; Ok(output) when every command succeeded and verified.
pub fn qemu_io(uri: &str, cmds: &[String]) -> Result<String, String> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri);
    let o = c.output().map_err(|e| format!("qemu-io: {e}"))?;
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if o.status.success() && !out.contains("Pattern verification failed") && !out.contains("failed")
    {
        Ok(out)
    } else {
        Err(out)
    }
}

/// A fio run against an NBD URI in the background.
pub struct Fio {
    pub child: Child,
    pub out: PathBuf,
}

impl Fio {
    /// Random 4 KiB writes over [offset, offset+size) at `rate` (e.g. "4m"),
    /// then a verify pass (crc32c) of everything written.
    pub fn write_verify(uri: &str, offset: u64, size: u64, rate: &str, out: &Path) -> Fio {
        let child = Command::new("fio")
            .args([
                "--name=load",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--verify=crc32c",
                "--verify_state_save=0",
                "--do_verify=1",
                "--output-format=json",
            ])
            .arg(format!("--uri={uri}"))
            .arg(format!("--offset={offset}"))
            .arg(format!("--size={size}"))
            .arg(format!("--rate={rate}"))
            .arg(format!("--output={}", out.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("fio (Debian package fio)");
        Fio {
            child,
            out: out.to_path_buf(),
        }
    }

    /// Waits for fio; Ok(json) if it exited 0 with no I/O or verify errors.
    pub fn wait(mut self, t: Duration) -> Result<serde_json::Value, String> {
        let t0 = Instant::now();
        let st = loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                break st;
            }
            if t0.elapsed() > t {
                let _ = self.child.kill();
                return Err(format!("fio still running after {t:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let j: serde_json::Value =
            serde_json::from_str(text.find('{').map(|i| &text[i..]).unwrap_or("{}"))
                .unwrap_or_default();
        let errs = j["jobs"][0]["error"].as_i64().unwrap_or(-1);
        if !st.success() || errs != 0 {
            return Err(format!("fio failed ({st}, error {errs}): {err}\n{text}"));
        }
        Ok(j)
    }
}

/// Largest completion latency of fio's writes, in seconds.
pub fn fio_max_write_lat_s(j: &serde_json::Value) -> f64 {
    j["jobs"][0]["write"]["clat_ns"]["max"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// Drops every TCP packet to or from the given local ports (nftables), so the
/// connections on them hang as if their peer's machine had vanished: no FIN,
/// no RST reaches the other side. Removed on drop.
pub struct Blackhole {
    table: String,
}

impl Blackhole {
    pub fn ports(ports: &[u16]) -> Blackhole {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let table = format!(
            "corral_t{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let set = ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let script = format!(
            "table inet {table} {{\n chain out {{\n type filter hook output priority -10; policy accept;\n tcp sport {{ {set} }} drop\n tcp dport {{ {set} }} drop\n }}\n}}\n"
        );
        let mut c = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft (Debian package nftables)");
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(c.wait().unwrap().success(), "nft failed for {script}");
        Blackhole { table }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}
