//! `corral up`: the quick start. Runs a whole corral on this machine — one
//! dataplane and one agent per node (node I on address PREFIX.I, all loopback),
//! and a manager — from this same binary, then creates a volume and attaches it
//! over NBD. It stays in the foreground as the supervisor: it restarts a part
//! that dies, and on Ctrl-C/SIGTERM stops the parts in order (manager, agents,
//! dataplanes, the latter with SIGTERM so they drain).
//!
//! Children cannot outlive it: each runs in its own process group (so a
//! terminal's Ctrl-C reaches only `corral up`, which then stops them in order)
//! with `PR_SET_PDEATHSIG` = SIGTERM (so they stop even if `corral up` is killed
//! with SIGKILL).
//!
//! Everything lives under the data dir, so running it again reuses it:
//!
//! ```text
//! DIR/up.lock               one `corral up` per data dir
//! DIR/manager.redb          the manager's store
//! DIR/nodeI/rpc.sock        node I's dataplane RPC socket
//! DIR/nodeI/state/          node I's dataplane state (raid records, lock)
//! DIR/nodeI/disk0/          node I's disk (its lvstore: the replicas' data)
//! DIR/logs/*.log            one log per process (up, manager, nodeI-dataplane, nodeI-agent)
//! ```

use std::ffi::OsString;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use control::model::{now_secs, Node, VolumeState};
use serde_json::json;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::client::{CliError, Client};
use super::ctl::{get_volume, usage_hint, FrontendArg};
use super::output::{format_size, parse_duration, parse_size, utc};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where everything lives (created if missing; reused when it exists).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Number of nodes, each with its own dataplane, agent, disk and address.
    #[arg(long, default_value_t = 1)]
    pub nodes: u32,
    /// Name of the volume to create and attach.
    #[arg(long, default_value = "vol1")]
    pub volume: String,
    /// Size of the volume when it is created (default 1GiB).
    #[arg(long)]
    pub size: Option<String>,
    /// Replicas of the volume when it is created (default: min(3, nodes)).
    #[arg(long)]
    pub replicas: Option<u32>,
    /// Start the nodes and the manager only; no volume.
    #[arg(long)]
    pub no_volume: bool,
    /// How the volume is exposed.
    #[arg(long, value_enum, default_value = "nbd")]
    pub frontend: FrontendArg,
    /// Address of the manager's API.
    #[arg(long, default_value = "127.0.0.1:9500")]
    pub manager_listen: SocketAddr,
    /// Node I gets address PREFIX.I (three octets of 127.0.0.0/8).
    #[arg(long, default_value = "127.0.1")]
    pub address_prefix: String,
    /// Agent API of node I on 127.0.0.1:BASE+I-1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub agent_port_base: u16,
    /// Port of every node's replica NVMe/TCP listener.
    #[arg(long, default_value_t = 4420)]
    pub nvmf_port: u16,
    /// Port of every node's NBD server.
    #[arg(long, default_value_t = 10809)]
    pub nbd_port: u16,
    /// Port of every node's NVMe/TCP frontend listener.
    #[arg(long, default_value_t = 4430)]
    pub frontend_port: u16,
    /// Orphans older than this are removed (0 = only report them).
    #[arg(long, default_value_t = 300)]
    pub orphan_grace_secs: u64,
    /// The manager's reconcile period in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub tick_ms: u64,
    /// How long to wait for each part to be ready and for the volume to attach.
    #[arg(long, default_value = "120s")]
    pub timeout: String,
    /// Do not restart a part that dies (report it and carry on).
    #[arg(long)]
    pub no_restart: bool,
}

/// Exit code when the setup could not be brought up.
const EXIT_FAILED: u8 = 1;

/// Writes user-facing lines to stdout and to DIR/logs/up.log.
#[derive(Debug)]
struct Say {
    log: Option<std::fs::File>,
}

impl Say {
    fn line(&mut self, s: &str) {
        println!("{s}");
        self.log(s);
    }

    /// An error: on stderr (and in the log).
    fn error(&mut self, s: &str) {
        eprintln!("{s}");
        self.log(s);
    }

    fn log(&mut self, s: &str) {
        if let Some(f) = &mut self.log {
            let _ = writeln!(f, "{} {s}", utc(now_secs()));
        }
    }
}

/// What a part is, which decides its order and how it is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Dataplane,
    Manager,
    Agent,
}

/// One child process of `corral up`.
#[derive(Debug)]
struct Proc {
    name: String,
    role: Role,
    args: Vec<OsString>,
    log: PathBuf,
    /// Node I's RPC socket (dataplanes) or API address (manager, agents).
    probe: Probe,
    child: Option<Child>,
    started: Instant,
    restarts: u32,
    restart_at: Option<Instant>,
    stop_timeout: Duration,
}

#[derive(Debug, Clone)]
enum Probe {
    Rpc(PathBuf),
    Http(String),
}

/// Runs in the child between fork and exec: only async-signal-safe calls.
fn child_setup(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: setpgid, prctl and getppid are async-signal-safe syscalls that
    // touch no memory of ours; nothing here allocates or takes a lock.
    unsafe {
        // Own process group: a terminal's Ctrl-C goes to `corral up` only,
        // which stops the parts in order.
        if libc::setpgid(0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // The parent died between fork and prctl: the signal will never come.
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    Ok(())
}

impl Proc {
    fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn spawn(&mut self, exe: &Path) -> anyhow::Result<()> {
        let mut logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let _ = writeln!(
            logf,
            "---- corral up: starting {} at {} ----",
            self.name,
            utc(now_secs())
        );
        let err = logf.try_clone().context("log file")?;
        let mut cmd = Command::new(exe);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(err)
            // Plain text in log files (tracing colours otherwise).
            .env("NO_COLOR", "1");
        // SAFETY: getpid is always safe; the value is read before fork.
        let parent = unsafe { libc::getpid() };
        // SAFETY: child_setup only makes async-signal-safe syscalls.
        unsafe {
            cmd.pre_exec(move || child_setup(parent));
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, exe.display()))?;
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }

    /// The exit status if the process has ended (reaped now).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(st)
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: signalling our own child, which we have not reaped yet
            // (so the pid cannot have been reused).
            unsafe { libc::kill(pid, sig) };
        }
    }

    fn kill_now(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.signal_pid(c.id() as i32, libc::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal_pid(&self, pid: i32, sig: i32) {
        // SAFETY: `pid` is our unreaped child.
        unsafe { libc::kill(pid, sig) };
    }

    fn log_tail(&self, n: usize) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        let from = lines.len().saturating_sub(n);
        lines[from..]
            .iter()
            .map(|l| format!("    | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// An error saying that this part died, with the end of its log.
    fn died(&self, st: std::process::ExitStatus) -> anyhow::Error {
        anyhow!(
            "{} exited ({st}) while starting; last lines of {}:\n{}",
            self.name,
            self.log.display(),
            self.log_tail(15)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Last resort (a panic, an early return): never leave a part behind.
        self.kill_now();
    }
}

/// The parts and the user's view of them.
#[derive(Debug)]
struct Up {
    exe: PathBuf,
    procs: Vec<Proc>,
    say: Say,
    restart: bool,
}

fn node_addr(prefix: &str, i: u32) -> String {
    format!("{prefix}.{i}")
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn check_prefix(p: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = p.split('.').collect();
    let ok = parts.len() == 3 && parts.iter().all(|x| x.parse::<u8>().is_ok()) && parts[0] == "127";
    if !ok {
        bail!("--address-prefix {p}: expected three octets in 127.0.0.0/8, e.g. 127.0.1");
    }
    Ok(())
}

/// Fails early, with the option to change, when a port the parts will listen
/// on is taken (else a foreign manager could even answer our readiness probe).
fn check_ports(a: &Args) -> anyhow::Result<()> {
    let taken = |addr: SocketAddr| std::net::TcpListener::bind(addr).is_err();
    if taken(a.manager_listen) {
        bail!(
            "the manager's address {} is in use (another `corral up` or manager?); \
             choose another with --manager-listen",
            a.manager_listen
        );
    }
    for i in 1..=a.nodes {
        let ip: IpAddr = node_addr(&a.address_prefix, i)
            .parse()
            .map_err(|e| anyhow!("--address-prefix {}: {e}", a.address_prefix))?;
        for (port, what, flag) in [
            (a.nvmf_port, "replica NVMe/TCP", "--nvmf-port"),
            (a.nbd_port, "NBD", "--nbd-port"),
            (a.frontend_port, "NVMe/TCP frontend", "--frontend-port"),
        ] {
            let addr = SocketAddr::new(ip, port);
            if taken(addr) {
                bail!(
                    "node{i}'s {what} address {addr} is in use (another `corral up`?); \
                     choose another with {flag} or --address-prefix"
                );
            }
        }
        if a.agent_port_base != 0 {
            let addr = SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                a.agent_port_base + (i - 1) as u16,
            );
            if taken(addr) {
                bail!("node{i}'s agent address {addr} is in use; choose another --agent-port-base");
            }
        }
    }
    Ok(())
}

/// Takes DIR/up.lock, or says who holds it.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let p = dir.join("up.lock");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&p)
        .with_context(|| format!("opening {}", p.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let pid = std::fs::read_to_string(&p).unwrap_or_default();
        bail!(
            "another `corral up` (pid {}) is running on {}; stop it first (Ctrl-C in its terminal, or kill {})",
            pid.trim(),
            dir.display(),
            pid.trim()
        );
    }
    f.set_len(0)?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.nodes == 0 || a.nodes > 64 {
        bail!("--nodes {}: must be 1..=64", a.nodes);
    }
    check_prefix(&a.address_prefix)?;
    if !a.no_volume {
        control::naming::valid_volume_name(&a.volume)
            .map_err(|e| anyhow!("--volume {}: {e}", a.volume))?;
    }
    let size =
        parse_size(a.size.as_deref().unwrap_or("1GiB")).map_err(|e| anyhow!("--size: {e}"))?;
    let timeout = parse_duration(&a.timeout).map_err(|e| anyhow!("--timeout: {e}"))?;
    let replicas = a.replicas.unwrap_or(a.nodes.min(3));
    if a.agent_port_base != 0 && u32::from(a.agent_port_base) + a.nodes > 65_536 {
        bail!(
            "--agent-port-base {}: not enough ports for {} nodes",
            a.agent_port_base,
            a.nodes
        );
    }
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating --data-dir {}", a.data_dir.display()))?;
    let dir = a
        .data_dir
        .canonicalize()
        .with_context(|| format!("--data-dir {}", a.data_dir.display()))?;
    let sock_len = dir
        .join(format!("node{}", a.nodes))
        .join("rpc.sock")
        .as_os_str()
        .len();
    if sock_len > 107 {
        bail!(
            "--data-dir {}: the RPC socket paths under it would be {sock_len} bytes, over the \
             107 a Unix socket allows; use a shorter path",
            dir.display()
        );
    }
    let _lock = lock_data_dir(&dir)?;
    check_ports(&a)?;
    std::fs::create_dir_all(dir.join("logs"))?;
    let exe = std::env::current_exe().context("finding the corral binary")?;
    // A current-thread runtime: every child is forked from this (main) thread,
    // which lives as long as the process, so PR_SET_PDEATHSIG fires only when
    // `corral up` itself ends.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let up_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join("up.log"))
        .ok();
    let mut up = Up {
        exe,
        procs: Vec::new(),
        say: Say { log: up_log },
        restart: !a.no_restart,
    };
    let plan = Plan {
        a: &a,
        dir: &dir,
        size,
        replicas,
        timeout,
    };
    rt.block_on(up.main(plan))
}

/// Everything `main` needs, validated.
#[derive(Debug)]
struct Plan<'a> {
    a: &'a Args,
    dir: &'a Path,
    size: u64,
    replicas: u32,
    timeout: Duration,
}

impl Plan<'_> {
    fn manager_url(&self) -> String {
        let l = self.a.manager_listen;
        let ip = if l.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            l.ip()
        };
        format!("http://{}", SocketAddr::new(ip, l.port()))
    }
}

/// What `start_parts` hands to `setup`.
#[derive(Debug)]
struct Started {
    client: Client,
    /// The volume's (state, epoch) before any agent ran, if it existed.
    before: Option<(VolumeState, u64)>,
}

/// Waits for SIGINT or SIGTERM.
async fn next_signal(int: &mut Signal, term: &mut Signal) {
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

impl Up {
    async fn main(&mut self, plan: Plan<'_>) -> anyhow::Result<ExitCode> {
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let started = {
            let work = self.start_parts(&plan);
            tokio::select! {
                r = work => Some(r),
                _ = next_signal(&mut int, &mut term) => None,
            }
        };
        let started = match started {
            None => {
                self.say
                    .line("interrupted while starting; stopping what was started");
                self.stop_all(&mut int, &mut term).await;
                return Ok(ExitCode::SUCCESS);
            }
            Some(Err(e)) => {
                self.say.error(&format!("corral up: error: {e:#}"));
                self.say.line("stopping what was started");
                self.stop_all(&mut int, &mut term).await;
                return Ok(ExitCode::from(EXIT_FAILED));
            }
            Some(Ok(s)) => s,
        };
        // Past this point every part runs: a volume (or a node) that does not
        // come up is reported, and the parts stay up so that it can be looked
        // into with the CLI.
        let set_up = {
            let work = self.setup(&plan, started);
            tokio::select! {
                r = work => Some(r),
                _ = next_signal(&mut int, &mut term) => None,
            }
        };
        let stop_now = match set_up {
            None => true,
            Some(Ok(())) => false,
            Some(Err(e)) => {
                self.say.error(&format!("corral up: error: {e:#}"));
                self.say.line(&format!(
                    "the parts that started keep running so you can look: `corral node ls`, \
                     `corral volume show {}`, `corral events`, logs in {}",
                    plan.a.volume,
                    plan.dir.join("logs").display()
                ));
                false
            }
        };
        if !stop_now {
            self.say.line(&format!(
                "Ctrl-C stops everything; the data stays in {}.",
                plan.dir.display()
            ));
            self.supervise(&mut int, &mut term).await;
        }
        self.say
            .line("stopping: manager, agents, then dataplanes (they drain I/O first)");
        self.stop_all(&mut int, &mut term).await;
        self.say.line(&format!(
            "stopped; everything is kept in {} (run the same `corral up` to bring it back)",
            plan.dir.display()
        ));
        Ok(ExitCode::SUCCESS)
    }

    /// Starts every part and waits until each answers. Returns the manager's
    /// client and the volume's state from before any agent ran.
    async fn start_parts(&mut self, plan: &Plan<'_>) -> anyhow::Result<Started> {
        let a = plan.a;
        let dir = plan.dir;
        let logs = dir.join("logs");
        let murl = plan.manager_url();
        self.say.line(&format!(
            "corral up: {} node(s) in {} (logs in {})",
            a.nodes,
            dir.display(),
            logs.display()
        ));
        // Dataplanes first: they hold the data path and have no dependency.
        for i in 1..=a.nodes {
            let nd = dir.join(format!("node{i}"));
            std::fs::create_dir_all(nd.join("disk0"))
                .with_context(|| format!("creating {}", nd.join("disk0").display()))?;
            let sock = nd.join("rpc.sock");
            let args: Vec<OsString> = vec![
                "dataplane".into(),
                "--rpc-socket".into(),
                sock.clone().into(),
                "--state-dir".into(),
                nd.join("state").into(),
            ];
            self.add(Proc {
                name: format!("node{i} dataplane"),
                role: Role::Dataplane,
                args,
                log: logs.join(format!("node{i}-dataplane.log")),
                probe: Probe::Rpc(sock),
                child: None,
                started: Instant::now(),
                restarts: 0,
                restart_at: None,
                stop_timeout: Duration::from_secs(30),
            })?;
        }
        // The manager next; read the volume before any agent exists, so that
        // an engine from the last run is told apart from a new one below.
        let margs: Vec<OsString> = vec![
            "manager".into(),
            "--listen".into(),
            a.manager_listen.to_string().into(),
            "--store".into(),
            dir.join("manager.redb").into(),
            "--tick-ms".into(),
            a.tick_ms.to_string().into(),
        ];
        self.add(Proc {
            name: "manager".into(),
            role: Role::Manager,
            args: margs,
            log: logs.join("manager.log"),
            probe: Probe::Http(format!("{murl}/v1/nodes")),
            child: None,
            started: Instant::now(),
            restarts: 0,
            restart_at: None,
            stop_timeout: Duration::from_secs(10),
        })?;
        for p in 0..self.procs.len() {
            self.wait_ready(p, plan.timeout).await?;
        }
        let client = Client::new(&murl).map_err(|e| anyhow!("{e}"))?;
        let before = if a.no_volume {
            None
        } else {
            match get_volume(&client, "read the volume", &a.volume).await {
                Ok(d) => Some((d.volume.state, d.volume.epoch)),
                Err(CliError::Refused { status: 404, .. }) => None,
                Err(e) => bail!("{e}"),
            }
        };
        for i in 1..=a.nodes {
            let nd = dir.join(format!("node{i}"));
            let port = if a.agent_port_base == 0 {
                free_port()?
            } else {
                a.agent_port_base + (i - 1) as u16
            };
            let listen = format!("127.0.0.1:{port}");
            let mut disk = OsString::from("disk0=");
            disk.push(nd.join("disk0"));
            let args: Vec<OsString> = vec![
                "agent".into(),
                "--node".into(),
                format!("node{i}").into(),
                "--address".into(),
                node_addr(&a.address_prefix, i).into(),
                "--rpc-socket".into(),
                nd.join("rpc.sock").into(),
                "--listen".into(),
                listen.clone().into(),
                "--disk".into(),
                disk,
                "--nvmf-port".into(),
                a.nvmf_port.to_string().into(),
                "--nbd-port".into(),
                a.nbd_port.to_string().into(),
                "--frontend-port".into(),
                a.frontend_port.to_string().into(),
                "--orphan-grace-secs".into(),
                a.orphan_grace_secs.to_string().into(),
                "--manager".into(),
                murl.clone().into(),
            ];
            self.add(Proc {
                name: format!("node{i} agent"),
                role: Role::Agent,
                args,
                log: logs.join(format!("node{i}-agent.log")),
                probe: Probe::Http(format!("http://{listen}/v1/status")),
                child: None,
                started: Instant::now(),
                restarts: 0,
                restart_at: None,
                stop_timeout: Duration::from_secs(10),
            })?;
        }
        let first_agent = self.procs.len() - a.nodes as usize;
        for p in first_agent..self.procs.len() {
            self.wait_ready(p, plan.timeout).await?;
        }
        Ok(Started { client, before })
    }

    /// Waits for the nodes to be ready, then creates and attaches the volume.
    async fn setup(&mut self, plan: &Plan<'_>, st: Started) -> anyhow::Result<()> {
        let a = plan.a;
        let Started { client, before } = st;
        let murl = plan.manager_url();
        let nodes = self.wait_nodes(&client, a.nodes, plan.timeout).await?;
        for n in &nodes {
            let d: Vec<String> = n
                .disks
                .iter()
                .map(|d| format!("{} {} free", d.name, format_size(d.free_bytes)))
                .collect();
            self.say.line(&format!(
                "  {}: ready at {} (agent {}; {})",
                n.name,
                n.address,
                n.agent_url,
                d.join(", ")
            ));
        }
        self.say
            .line(&format!("  manager: {murl} (metrics at {murl}/metrics)"));
        if a.no_volume {
            self.say.line("corral is up (no volume: --no-volume).");
        } else {
            self.volume(&client, plan, before).await?;
        }
        if murl != super::client::DEFAULT_MANAGER {
            self.say
                .line(&format!("  for the CLI: export CORRAL_MANAGER={murl}"));
        }
        Ok(())
    }

    fn add(&mut self, mut p: Proc) -> anyhow::Result<()> {
        p.spawn(&self.exe)?;
        self.procs.push(p);
        Ok(())
    }

    /// Waits until part `i` answers, failing early (with its log) if it dies.
    async fn wait_ready(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .context("HTTP client")?;
        loop {
            if let Some(st) = self.procs[i].exited() {
                return Err(self.procs[i].died(st));
            }
            let ok = match &self.procs[i].probe {
                Probe::Rpc(sock) => match dataplane::rpc::RpcClient::connect(sock).await {
                    Ok(mut c) => matches!(
                        tokio::time::timeout(
                            Duration::from_secs(2),
                            c.call("spdk_get_version", serde_json::Value::Null)
                        )
                        .await,
                        Ok(Ok(Ok(_)))
                    ),
                    Err(_) => false,
                },
                // Any HTTP answer means it serves (the agent's status may be 503
                // while its dataplane is still coming up).
                Probe::Http(url) => http.get(url).send().await.is_ok(),
            };
            if ok {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                let p = &self.procs[i];
                bail!(
                    "{} did not answer within {timeout:?}; last lines of {}:\n{}",
                    p.name,
                    p.log.display(),
                    p.log_tail(15)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until node1..nodeN are registered and ready, with ready disks.
    async fn wait_nodes(
        &mut self,
        c: &Client,
        n: u32,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Node>> {
        let t0 = Instant::now();
        loop {
            for p in &mut self.procs {
                if let Some(st) = p.exited() {
                    return Err(p.died(st));
                }
            }
            let nodes: Vec<Node> = c
                .get("list nodes", "/v1/nodes")
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let mut missing = Vec::new();
            let mut mine = Vec::new();
            for i in 1..=n {
                let name = format!("node{i}");
                match nodes.iter().find(|x| x.name == name) {
                    None => missing.push(format!("{name}: not registered yet")),
                    Some(x) if !x.ready => missing.push(format!(
                        "{name}: not ready ({})",
                        x.reason.clone().unwrap_or_default()
                    )),
                    Some(x) => match x.disks.iter().find(|d| !d.ready) {
                        Some(d) => missing.push(format!(
                            "{name}: disk {} not ready ({})",
                            d.name,
                            d.reason.clone().unwrap_or_default()
                        )),
                        None if x.disks.is_empty() => {
                            missing.push(format!("{name}: no disk reported yet"))
                        }
                        None => mine.push(x.clone()),
                    },
                }
            }
            if missing.is_empty() {
                return Ok(mine);
            }
            if t0.elapsed() > timeout {
                bail!(
                    "nodes not ready within {timeout:?}: {}; see the agents' logs in {}",
                    missing.join("; "),
                    self.procs
                        .iter()
                        .find(|p| p.role == Role::Agent)
                        .and_then(|p| p.log.parent())
                        .map(|d| d.display().to_string())
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Creates the volume if it does not exist, attaches it on node1, waits.
    async fn volume(
        &mut self,
        c: &Client,
        plan: &Plan<'_>,
        before: Option<(VolumeState, u64)>,
    ) -> anyhow::Result<()> {
        let a = plan.a;
        let name = &a.volume;
        let e = |e: CliError| {
            let adv = e
                .advice()
                .map(|x| format!("\n  what to do: {x}"))
                .unwrap_or_default();
            anyhow!("{e}{adv}")
        };
        match get_volume(c, "read the volume", name).await {
            Ok(d) => {
                let v = d.volume;
                if a.size.is_some() && v.size_bytes != plan.size {
                    self.say.line(&format!(
                        "  volume {name} exists with {}; --size is ignored (grow it with `corral volume expand`)",
                        format_size(v.size_bytes)
                    ));
                }
                self.say.line(&format!(
                    "  volume {name}: exists ({}, {} replica(s)); reusing it",
                    format_size(v.size_bytes),
                    v.replica_count,
                ));
            }
            Err(CliError::Refused { status: 404, .. }) => {
                c.post(
                    &format!("create volume {name}"),
                    "/v1/volumes",
                    &json!({"name": name, "size_bytes": plan.size, "replicas": plan.replicas}),
                )
                .await
                .map_err(e)?;
                self.say.line(&format!(
                    "  volume {name}: created ({}, {} replica(s))",
                    format_size(plan.size),
                    plan.replicas
                ));
            }
            Err(x) => return Err(e(x)),
        }
        let frontend = match a.frontend {
            FrontendArg::Nbd => "nbd",
            FrontendArg::Nvmf => "nvmf",
        };
        match c
            .post(
                &format!("attach volume {name}"),
                &format!("/v1/volumes/{}/attach", super::client::seg(name)),
                &json!({"node": "node1", "frontend": frontend}),
            )
            .await
        {
            Ok(_) => {}
            // Attached elsewhere (by the user, last time): keep that.
            Err(CliError::Refused {
                status: 409,
                message,
                ..
            }) => {
                self.say.line(&format!(
                    "  volume {name}: {message}; keeping that attachment"
                ));
            }
            Err(x) => return Err(e(x)),
        }
        // After a restart the store still says "attached" until the manager
        // sees the engine is gone; a new engine has a higher epoch.
        let stale = match before {
            Some((VolumeState::Attached, epoch)) => Some(epoch),
            _ => None,
        };
        let t0 = Instant::now();
        let mut shown = String::new();
        loop {
            for p in &mut self.procs {
                if let Some(st) = p.exited() {
                    return Err(p.died(st));
                }
            }
            let d = get_volume(c, "read the volume", name).await.map_err(e)?;
            let v = d.volume;
            let fresh = stale.is_none_or(|old| v.epoch > old);
            if v.state == VolumeState::Attached && fresh {
                if let Some(ep) = &v.endpoint {
                    self.say.line(&format!(
                        "volume {name} ({}, {} replica(s), {}) is attached on {} over {}:",
                        format_size(v.size_bytes),
                        v.replica_count,
                        format!("{:?}", v.robustness).to_lowercase(),
                        v.engine_node.as_deref().unwrap_or("?"),
                        frontend.to_uppercase()
                    ));
                    self.say.line(&format!("  endpoint: {ep}"));
                    if let Some(h) = usage_hint(ep) {
                        self.say.line(&format!("  try it:   {h}"));
                    }
                    self.say
                        .line(&format!("  inspect:  corral volume show {name}"));
                    return Ok(());
                }
            }
            if v.state == VolumeState::Faulted {
                let f = v.condition("Faulted");
                bail!(
                    "volume {name} is faulted: {}\n  what to do: {}",
                    f.map(|c| c.reason.as_str()).unwrap_or("no reason recorded"),
                    f.and_then(|c| c.advice.clone())
                        .unwrap_or_else(|| format!("see `corral volume show {name}`"))
                );
            }
            if let Some(r) = v.condition("Retrying") {
                if r.reason != shown {
                    self.say.line(&format!("  still trying: {}", r.reason));
                    shown = r.reason.clone();
                }
            }
            if t0.elapsed() > plan.timeout {
                bail!(
                    "volume {name} not attached within {:?} (state {}); see `corral volume show {name}` and `corral events`",
                    plan.timeout,
                    format!("{:?}", v.state).to_lowercase()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The foreground: restart parts that die, until a signal comes.
    async fn supervise(&mut self, int: &mut Signal, term: &mut Signal) {
        loop {
            tokio::select! {
                _ = next_signal(int, term) => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            let now = Instant::now();
            let exe = self.exe.clone();
            let mut lines = Vec::new();
            for p in &mut self.procs {
                if let Some(st) = p.exited() {
                    // A part that ran a while before dying starts a fresh backoff.
                    if p.started.elapsed() > Duration::from_secs(60) {
                        p.restarts = 0;
                    }
                    if self.restart {
                        let d = Duration::from_secs(1u64 << p.restarts.min(5))
                            .min(Duration::from_secs(30));
                        p.restart_at = Some(now + d);
                        lines.push(format!(
                            "{} exited ({st}); restarting it in {d:?}; log: {}",
                            p.name,
                            p.log.display()
                        ));
                    } else {
                        lines.push(format!(
                            "{} exited ({st}); not restarting it (--no-restart); log: {}",
                            p.name,
                            p.log.display()
                        ));
                    }
                } else if self.restart && p.child.is_none() && p.restart_at.is_none() {
                    // It died while `corral up` was still setting up (and was
                    // reported then): start it again here.
                    p.restart_at = Some(now + Duration::from_secs(1));
                    lines.push(format!(
                        "{} is not running; starting it again in 1s",
                        p.name
                    ));
                }
                if p.restart_at.is_some_and(|t| now >= t) {
                    p.restart_at = None;
                    p.restarts += 1;
                    match p.spawn(&exe) {
                        Ok(()) => {
                            lines.push(format!("{} restarted (restart #{})", p.name, p.restarts))
                        }
                        Err(e) => {
                            let d = Duration::from_secs(1u64 << p.restarts.min(5))
                                .min(Duration::from_secs(30));
                            p.restart_at = Some(now + d);
                            lines.push(format!(
                                "{}: restart failed: {e:#}; next try in {d:?}",
                                p.name
                            ));
                        }
                    }
                }
            }
            for l in lines {
                self.say.line(&l);
            }
        }
    }

    /// Stops the parts in order: manager, agents, dataplanes. Each group gets
    /// SIGTERM together, then up to its stop timeout; a second Ctrl-C (or the
    /// timeout) makes it SIGKILL.
    async fn stop_all(&mut self, int: &mut Signal, term: &mut Signal) {
        for role in [Role::Manager, Role::Agent, Role::Dataplane] {
            let idx: Vec<usize> = (0..self.procs.len())
                .filter(|&i| self.procs[i].role == role && self.procs[i].child.is_some())
                .collect();
            for &i in &idx {
                self.procs[i].restart_at = None;
                // A stopped process (SIGSTOP in a fault test) cannot act on SIGTERM.
                self.procs[i].signal(libc::SIGCONT);
                self.procs[i].signal(libc::SIGTERM);
            }
            let limit = idx
                .iter()
                .map(|&i| self.procs[i].stop_timeout)
                .max()
                .unwrap_or_default();
            let t0 = Instant::now();
            let mut forced = false;
            loop {
                let mut left = Vec::new();
                for &i in &idx {
                    if self.procs[i].child.is_some() {
                        match self.procs[i].exited() {
                            Some(st) if !st.success() && !forced => {
                                let l = format!("  {} ended: {st}", self.procs[i].name);
                                self.say.line(&l);
                            }
                            Some(_) => {}
                            None => left.push(i),
                        }
                    }
                }
                if left.is_empty() {
                    break;
                }
                if forced || t0.elapsed() > limit {
                    for &i in &left {
                        let l = format!("  {} did not stop; killing it", self.procs[i].name);
                        self.say.line(&l);
                        self.procs[i].kill_now();
                    }
                    break;
                }
                tokio::select! {
                    _ = next_signal(int, term) => {
                        self.say.line("  second interrupt: killing the rest");
                        forced = true;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(check_prefix("127.0.1").is_ok());
        assert!(check_prefix("127.31.250").is_ok());
        assert!(check_prefix("10.0.1").is_err());
        assert!(check_prefix("127.0").is_err());
        assert!(check_prefix("127.0.256").is_err());
        assert_eq!(node_addr("127.0.1", 3), "127.0.1.3");
    }
}
