//! The CLI against the manager: `corral node|disk|volume|snapshot|replica|
//! controller|orphans|events …`. Human tables by default, `-o json` for scripts
//! (the manager's own JSON), exit codes from [`super::client`].

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;
use control::api::{ControllerInfo, Orphan};
use control::model::{now_secs, Disk, Event, Node, Replica, Snapshot, Volume, VolumeState};
use serde::Deserialize;
use serde_json::{json, Value};

use super::client::{decode, seg, CliError, Client, GlobalOpts, OutputFormat};
use super::output::{ago, format_size, or_dash, parse_duration, parse_size, utc, Table};

/// Every CLI command that talks to the manager.
#[derive(Debug, Subcommand)]
pub enum CtlCmd {
    /// Nodes: each runs a dataplane and an agent.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Disks of the nodes (each holds one lvstore).
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Volumes: create, attach, detach, expand, delete.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Snapshots of a volume (taken on every healthy replica).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Replicas of every volume.
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// NVMe/TCP controllers in the nodes' dataplanes.
    #[command(subcommand)]
    Controller(ControllerCmd),
    /// Resources in the dataplanes that no volume owns.
    #[command(subcommand)]
    Orphans(OrphansCmd),
    /// What happened: every state change, adoption, replacement and fault.
    Events(EventsArgs),
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List nodes, their readiness and disks.
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum DiskCmd {
    /// List disks with their space and what is scheduled on them.
    Ls,
}

#[derive(Debug, clap::Args)]
pub struct WaitOpts {
    /// Return as soon as the manager has accepted the request.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait (e.g. 120s, 5m).
    #[arg(long, default_value = "120s")]
    pub timeout: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FrontendArg {
    Nbd,
    Nvmf,
}

impl FrontendArg {
    fn as_str(self) -> &'static str {
        match self {
            FrontendArg::Nbd => "nbd",
            FrontendArg::Nvmf => "nvmf",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume; its replicas are placed one per node where possible.
    Create {
        name: String,
        /// Size, e.g. 10GiB, 512MiB, 1G (a multiple of 4 KiB).
        #[arg(long)]
        size: String,
        /// Number of replicas.
        #[arg(long, default_value_t = 3)]
        replicas: u32,
    },
    /// List volumes.
    Ls,
    /// A volume in detail: state, robustness, conditions, replicas, snapshots.
    Show { name: String },
    /// Attach a volume on a node and wait until it is usable; prints the endpoint.
    Attach {
        name: String,
        /// Node to run the engine on (default: the first ready node).
        #[arg(long)]
        node: Option<String>,
        /// How the volume is exposed.
        #[arg(long, value_enum, default_value = "nbd")]
        frontend: FrontendArg,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Detach a volume (its data stays) and wait until it is detached.
    Detach {
        name: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Delete a volume and its replicas (and their data).
    Delete {
        name: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Grow a detached volume.
    Expand {
        name: String,
        /// New size, larger than the current one.
        #[arg(long)]
        size: String,
    },
    /// After every replica failed: bring back those that were in sync last.
    Salvage { name: String },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot of a volume.
    Create { volume: String, name: String },
    /// List a volume's snapshots.
    Ls { volume: String },
    /// Delete a snapshot.
    Delete { volume: String, name: String },
    /// Revert a detached volume to a snapshot.
    Revert { volume: String, name: String },
}

#[derive(Debug, Subcommand)]
pub enum ReplicaCmd {
    /// List replicas (of one volume with --volume).
    Ls {
        #[arg(long)]
        volume: Option<String>,
    },
    /// Delete a replica and its data; an attached volume gets a rebuilt one
    /// in its place (never the last healthy replica).
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ControllerCmd {
    /// List controllers; with --orphans, every orphaned resource instead.
    Ls {
        #[arg(long)]
        orphans: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrphansCmd {
    /// List orphaned resources with their age.
    Ls,
    /// Remove orphans older than the agents' grace period (all of them with --force).
    Collect {
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Keep printing new events as they happen.
    #[arg(short, long)]
    pub follow: bool,
    /// Only events after this sequence number.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
}

/// Runs one CLI command; prints its output or its error; returns the exit code.
pub fn run(cmd: CtlCmd, g: GlobalOpts) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("corral: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cmd, &g)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}

async fn dispatch(cmd: CtlCmd, g: &GlobalOpts) -> Result<(), CliError> {
    let c = Client::new(g.manager_url())?;
    let json_out = g.output == OutputFormat::Json;
    match cmd {
        CtlCmd::Node(NodeCmd::Ls) => node_ls(&c, json_out).await,
        CtlCmd::Disk(DiskCmd::Ls) => disk_ls(&c, json_out).await,
        CtlCmd::Volume(v) => volume(&c, v, json_out).await,
        CtlCmd::Snapshot(s) => snapshot(&c, s, json_out).await,
        CtlCmd::Replica(ReplicaCmd::Ls { volume }) => {
            replica_ls(&c, volume.as_deref(), json_out).await
        }
        CtlCmd::Replica(ReplicaCmd::Delete { name }) => {
            let what = format!("delete replica {name}");
            c.delete(&what, &format!("/v1/replicas/{}", seg(&name)))
                .await?;
            if json_out {
                println!("{}", json!({ "deleted": name }));
            } else {
                println!("replica {name} deleted; a degraded attached volume rebuilds a new one (corral volume show)");
            }
            Ok(())
        }
        CtlCmd::Controller(ControllerCmd::Ls { orphans }) => {
            controller_ls(&c, orphans, json_out).await
        }
        CtlCmd::Orphans(OrphansCmd::Ls) => orphans_ls(&c, json_out).await,
        CtlCmd::Orphans(OrphansCmd::Collect { force }) => {
            let v = c
                .post(
                    "collect orphans",
                    &format!("/v1/orphans/collect?force={force}"),
                    &json!({}),
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                let n = v["collected"].as_u64().unwrap_or(0);
                println!("collected {n} orphaned resource(s)");
                if n == 0 && !force {
                    println!(
                        "  (only orphans older than the agents' grace period go; --force takes all)"
                    );
                }
            }
            Ok(())
        }
        CtlCmd::Events(a) => super::events::run(&c, a, json_out).await,
    }
}

pub fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn usage(e: String) -> CliError {
    CliError::Usage(e)
}

/// The name a value has in the API (serde's), e.g. `out_of_sync`, `nbd`.
fn lower<T: serde::Serialize + std::fmt::Debug>(x: T) -> String {
    match serde_json::to_value(&x) {
        Ok(Value::String(s)) => s,
        _ => format!("{x:?}").to_lowercase(),
    }
}

fn state_str(s: VolumeState) -> String {
    lower(s)
}

// -------------------------------------------------------------- nodes ----

async fn node_ls(c: &Client, json_out: bool) -> Result<(), CliError> {
    let v: Value = c.get("list nodes", "/v1/nodes").await?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    let nodes: Vec<Node> = decode("list nodes", v)?;
    let now = now_secs();
    let mut t = Table::new(&[
        "NAME", "READY", "ADDRESS", "AGENT", "DISKS", "SEEN", "REASON",
    ]);
    for n in &nodes {
        let ready_disks = n.disks.iter().filter(|d| d.ready).count();
        t.row(vec![
            n.name.clone(),
            yes_no(n.ready),
            n.address.clone(),
            n.agent_url.clone(),
            format!("{ready_disks}/{} ready", n.disks.len()),
            if n.last_seen == 0 {
                "never".into()
            } else {
                format!("{} ago", ago(n.last_seen, now))
            },
            or_dash(n.reason.as_deref()),
        ]);
    }
    t.print_or("no nodes registered (agents register themselves: `corral agent --manager URL …`, or run `corral up`)");
    Ok(())
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

#[derive(Deserialize)]
struct DiskEntry {
    node: String,
    disk: Disk,
}

async fn disk_ls(c: &Client, json_out: bool) -> Result<(), CliError> {
    let v: Value = c.get("list disks", "/v1/disks").await?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    let disks: Vec<DiskEntry> = decode("list disks", v)?;
    let mut t = Table::new(&[
        "NODE",
        "DISK",
        "READY",
        "TOTAL",
        "FREE",
        "SCHEDULED",
        "PATH",
        "REASON",
    ]);
    for e in &disks {
        let d = &e.disk;
        t.row(vec![
            e.node.clone(),
            d.name.clone(),
            yes_no(d.ready),
            format_size(d.total_bytes),
            format_size(d.free_bytes),
            format_size(d.scheduled_bytes),
            d.path.clone(),
            or_dash(d.reason.as_deref()),
        ]);
    }
    t.print_or("no disks (they come with nodes: `corral node ls`)");
    Ok(())
}

// ------------------------------------------------------------ volumes ----

/// What `GET /v1/volumes/NAME` answers.
#[derive(Debug, Deserialize)]
pub struct VolumeDetail {
    pub volume: Volume,
    #[serde(default)]
    pub replicas: Vec<Replica>,
    #[serde(default)]
    pub snapshots: Vec<Snapshot>,
    /// The manager's newest event when it answered (for the next long poll).
    #[serde(default)]
    pub event_seq: Option<u64>,
}

pub async fn get_volume(c: &Client, what: &str, name: &str) -> Result<VolumeDetail, CliError> {
    c.get(what, &format!("/v1/volumes/{}", seg(name))).await
}

async fn volume(c: &Client, cmd: VolumeCmd, json_out: bool) -> Result<(), CliError> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            replicas,
        } => {
            let what = format!("create volume {name}");
            let size_bytes = parse_size(&size).map_err(usage)?;
            let v = c
                .post(
                    &what,
                    "/v1/volumes",
                    &json!({"name": name, "size_bytes": size_bytes, "replicas": replicas}),
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                let v: Volume = decode(&what, v)?;
                println!(
                    "volume {} created: {}, {} replica(s); state {}",
                    v.name,
                    format_size(v.size_bytes),
                    v.replica_count,
                    state_str(v.state)
                );
                println!("  next: corral volume attach {}", v.name);
            }
            Ok(())
        }
        VolumeCmd::Ls => volume_ls(c, json_out).await,
        VolumeCmd::Show { name } => {
            let what = format!("show volume {name}");
            let v: Value = c.get(&what, &format!("/v1/volumes/{}", seg(&name))).await?;
            if json_out {
                print_json(&v);
            } else {
                let d: VolumeDetail = decode(&what, v)?;
                print!("{}", render_volume(&d, now_secs()));
            }
            Ok(())
        }
        VolumeCmd::Attach {
            name,
            node,
            frontend,
            wait,
        } => attach(c, &name, node.as_deref(), frontend, &wait, json_out).await,
        VolumeCmd::Detach { name, wait } => detach(c, &name, &wait, json_out).await,
        VolumeCmd::Delete { name, wait } => delete(c, &name, &wait, json_out).await,
        VolumeCmd::Expand { name, size } => {
            let what = format!("expand volume {name}");
            let size_bytes = parse_size(&size).map_err(usage)?;
            let v = c
                .post(
                    &what,
                    &format!("/v1/volumes/{}/expand", seg(&name)),
                    &json!({"size_bytes": size_bytes}),
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "volume {name} is growing to {}; its replicas are resized by the manager",
                    format_size(size_bytes)
                );
            }
            Ok(())
        }
        VolumeCmd::Salvage { name } => {
            let what = format!("salvage volume {name}");
            let v = c
                .post(
                    &what,
                    &format!("/v1/volumes/{}/salvage", seg(&name)),
                    &json!({}),
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                let chosen: Vec<String> = decode(&what, v)?;
                println!(
                    "volume {name}: salvaged replica(s) {} (in sync last); attach it to use them",
                    chosen.join(", ")
                );
            }
            Ok(())
        }
    }
}

async fn volume_ls(c: &Client, json_out: bool) -> Result<(), CliError> {
    let v: Value = c.get("list volumes", "/v1/volumes").await?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    let vols: Vec<Volume> = decode("list volumes", v)?;
    let mut t = Table::new(&[
        "NAME",
        "SIZE",
        "REPLICAS",
        "STATE",
        "ROBUSTNESS",
        "NODE",
        "ENDPOINT",
        "CONDITIONS",
    ]);
    for v in &vols {
        let conds: Vec<&str> = v.conditions.iter().map(|c| c.kind.as_str()).collect();
        t.row(vec![
            v.name.clone(),
            format_size(v.size_bytes),
            v.replica_count.to_string(),
            state_str(v.state),
            lower(v.robustness),
            or_dash(
                v.engine_node
                    .as_deref()
                    .or(v.attach.as_ref().map(|a| a.node.as_str())),
            ),
            or_dash(v.endpoint.as_deref()),
            or_dash(Some(&conds.join(","))),
        ]);
    }
    t.print_or("no volumes (create one: corral volume create NAME --size 10GiB)");
    Ok(())
}

/// `corral volume show` for people.
pub fn render_volume(d: &VolumeDetail, now: u64) -> String {
    use std::fmt::Write;
    let v = &d.volume;
    let mut s = String::new();
    let _ = writeln!(s, "Volume:      {}", v.name);
    let _ = writeln!(
        s,
        "State:       {} (engine epoch {}, {} state changes, {} attach attempts)",
        state_str(v.state),
        v.epoch,
        v.state_transitions,
        v.attach_attempts
    );
    let _ = writeln!(s, "Robustness:  {}", lower(v.robustness));
    let _ = writeln!(
        s,
        "Size:        {} ({} bytes)",
        format_size(v.size_bytes),
        v.size_bytes
    );
    let _ = writeln!(s, "Replicas:    {} wanted", v.replica_count);
    match &v.attach {
        Some(a) => {
            let _ = writeln!(s, "Attach:      on {} over {}", a.node, lower(a.frontend));
        }
        None => {
            let _ = writeln!(s, "Attach:      - (detached)");
        }
    }
    let _ = writeln!(s, "Endpoint:    {}", or_dash(v.endpoint.as_deref()));
    let _ = writeln!(
        s,
        "Created:     {} ({} ago)",
        utc(v.created),
        ago(v.created, now)
    );
    if v.conditions.is_empty() {
        let _ = writeln!(s, "Conditions:  none");
    } else {
        let _ = writeln!(s, "Conditions:");
        for c in &v.conditions {
            let _ = writeln!(s, "  {}: {} (for {})", c.kind, c.reason, ago(c.since, now));
            if let Some(a) = &c.advice {
                let _ = writeln!(s, "    what to do: {a}");
            }
        }
    }
    let _ = writeln!(s, "Replicas:");
    if d.replicas.is_empty() {
        let _ = writeln!(s, "  none");
    } else {
        let mut t = Table::new(&["NAME", "NODE", "DISK", "STATE", "IN-SYNC-EPOCH", "REASON"]);
        for r in &d.replicas {
            t.row(vec![
                r.name.clone(),
                r.node.clone(),
                r.disk.clone(),
                lower(r.state),
                r.last_in_sync_epoch.to_string(),
                or_dash(r.reason.as_deref()),
            ]);
        }
        for l in t.render().lines() {
            let _ = writeln!(s, "  {l}");
        }
    }
    let _ = writeln!(s, "Snapshots:");
    if d.snapshots.is_empty() {
        let _ = writeln!(s, "  none");
    } else {
        let mut t = Table::new(&["NAME", "SIZE", "CREATED"]);
        for sn in &d.snapshots {
            t.row(vec![
                sn.name.clone(),
                format_size(sn.size_bytes),
                utc(sn.created),
            ]);
        }
        for l in t.render().lines() {
            let _ = writeln!(s, "  {l}");
        }
    }
    s
}

fn timeout_of(w: &WaitOpts) -> Result<Duration, CliError> {
    parse_duration(&w.timeout).map_err(|e| CliError::Usage(format!("--timeout: {e}")))
}

/// What waiting for a volume concluded.
enum Wait {
    Done(Box<VolumeDetail>),
    Gone,
}

/// Polls a volume until `done` says so, it faults, or `timeout` passes. Shows
/// on stderr why the manager is still retrying, when that changes.
async fn wait_volume(
    c: &Client,
    what: &str,
    name: &str,
    timeout: Duration,
    want: &str,
    done: impl Fn(&Volume) -> bool,
) -> Result<Wait, CliError> {
    let t0 = Instant::now();
    let mut shown = String::new();
    // A manager that numbers its events holds each look until the volume's
    // next event (at most `LONG_POLL`): the wait ends when the volume changes.
    // Without it: 10 ms polls for the first second, then 250 ms.
    let mut poll = Duration::from_millis(10);
    let mut after: Option<u64> = None;
    loop {
        let got = match after {
            Some(seq) => {
                let ms = LONG_POLL
                    .min(timeout.saturating_sub(t0.elapsed()))
                    .as_millis();
                let path = format!("/v1/volumes/{}?wait_after={seq}&wait_ms={ms}", seg(name));
                c.get(what, &path).await
            }
            None => get_volume(c, what, name).await,
        };
        let d: VolumeDetail = match got {
            Ok(d) => d,
            Err(CliError::Refused { status: 404, .. }) => return Ok(Wait::Gone),
            Err(e) => return Err(e),
        };
        let v = &d.volume;
        if done(v) {
            return Ok(Wait::Done(Box::new(d)));
        }
        if v.state == VolumeState::Faulted {
            let f = v.condition("Faulted");
            return Err(CliError::Failed {
                what: what.into(),
                message: format!(
                    "volume {name} is faulted: {}",
                    f.map(|c| c.reason.as_str()).unwrap_or("no reason recorded")
                ),
                advice: f.and_then(|c| c.advice.clone()).or_else(|| {
                    Some(format!(
                        "see `corral volume show {name}` and `corral events`"
                    ))
                }),
            });
        }
        if let Some(r) = v.condition("Retrying") {
            if r.reason != shown {
                eprintln!("  still trying ({}): {}", state_str(v.state), r.reason);
                shown = r.reason.clone();
            }
        }
        if t0.elapsed() >= timeout {
            let why = v
                .conditions
                .iter()
                .map(|c| format!("{}: {}", c.kind, c.reason))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(CliError::Timeout {
                what: what.into(),
                after: timeout,
                detail: format!(
                    "volume {name} is {}, not yet {want}{}",
                    state_str(v.state),
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!(" ({why})")
                    }
                ),
                advice: Some(format!(
                    "the manager keeps trying; watch it with `corral volume show {name}` and \
                     `corral events --follow`, or wait longer with --timeout"
                )),
            });
        }
        after = d.event_seq;
        if after.is_none() {
            tokio::time::sleep(poll).await;
            if t0.elapsed() > Duration::from_secs(1) {
                poll = Duration::from_millis(250);
            }
        }
    }
}

/// How long one look of a wait may be held by the manager.
const LONG_POLL: Duration = Duration::from_millis(500);

async fn attach(
    c: &Client,
    name: &str,
    node: Option<&str>,
    frontend: FrontendArg,
    w: &WaitOpts,
    json_out: bool,
) -> Result<(), CliError> {
    let what = format!("attach volume {name}");
    let timeout = timeout_of(w)?;
    let v = c
        .post(
            &what,
            &format!("/v1/volumes/{}/attach", seg(name)),
            &json!({"node": node, "frontend": frontend.as_str()}),
        )
        .await?;
    if w.no_wait {
        if json_out {
            print_json(&v);
        } else {
            println!(
                "attach of volume {name} requested; follow it with `corral volume show {name}`"
            );
        }
        return Ok(());
    }
    let r = wait_volume(c, &what, name, timeout, "attached", |v| {
        v.state == VolumeState::Attached && v.attach.is_some() && v.endpoint.is_some()
    })
    .await?;
    let Wait::Done(d) = r else {
        return Err(CliError::Failed {
            what,
            message: format!("volume {name} was deleted while attaching"),
            advice: None,
        });
    };
    if json_out {
        print_json(&serde_json::to_value(&d.volume).unwrap_or(Value::Null));
    } else {
        let v = &d.volume;
        let ep = v.endpoint.clone().unwrap_or_default();
        println!(
            "volume {name} attached on {} ({}): {ep}",
            v.engine_node.as_deref().unwrap_or("?"),
            lower(v.robustness)
        );
        if let Some(hint) = usage_hint(&ep) {
            println!("  use it: {hint}");
        }
    }
    Ok(())
}

/// One line showing how to use an endpoint.
pub fn usage_hint(endpoint: &str) -> Option<String> {
    if endpoint.starts_with("nbd://") {
        Some(format!("qemu-img info {endpoint}   (or: nbdfuse DIR {endpoint}; fio --ioengine=nbd --uri={endpoint} …)"))
    } else if let Some(rest) = endpoint.strip_prefix("nvme+tcp://") {
        // nvme+tcp://ADDR:PORT/NQN
        let (hostport, nqn) = rest.split_once('/')?;
        let (addr, port) = hostport.rsplit_once(':')?;
        Some(format!("nvme connect -t tcp -a {addr} -s {port} -n {nqn}"))
    } else {
        None
    }
}

async fn detach(c: &Client, name: &str, w: &WaitOpts, json_out: bool) -> Result<(), CliError> {
    let what = format!("detach volume {name}");
    let timeout = timeout_of(w)?;
    let v = c
        .post(
            &what,
            &format!("/v1/volumes/{}/detach", seg(name)),
            &json!({}),
        )
        .await?;
    if w.no_wait {
        if json_out {
            print_json(&v);
        } else {
            println!("detach of volume {name} requested");
        }
        return Ok(());
    }
    let r = wait_volume(c, &what, name, timeout, "detached", |v| {
        v.attach.is_none() && matches!(v.state, VolumeState::Detached | VolumeState::Creating)
    })
    .await?;
    match r {
        Wait::Done(d) if json_out => {
            print_json(&serde_json::to_value(&d.volume).unwrap_or(Value::Null))
        }
        Wait::Done(_) => println!("volume {name} detached"),
        Wait::Gone => println!("volume {name} is gone"),
    }
    Ok(())
}

async fn delete(c: &Client, name: &str, w: &WaitOpts, json_out: bool) -> Result<(), CliError> {
    let what = format!("delete volume {name}");
    let timeout = timeout_of(w)?;
    c.delete(&what, &format!("/v1/volumes/{}", seg(name)))
        .await?;
    if !w.no_wait {
        // Done means gone: `done` never holds, so only Gone (404) ends the wait well.
        wait_volume(c, &what, name, timeout, "deleted", |_| false).await?;
    }
    if json_out {
        print_json(&json!({"deleted": name, "waited": !w.no_wait}));
    } else if w.no_wait {
        println!("delete of volume {name} requested");
    } else {
        println!("volume {name} deleted");
    }
    Ok(())
}

// ---------------------------------------------------------- snapshots ----

async fn snapshot(c: &Client, cmd: SnapshotCmd, json_out: bool) -> Result<(), CliError> {
    match cmd {
        SnapshotCmd::Create { volume, name } => {
            let what = format!("snapshot {name} of volume {volume}");
            let v = c
                .post(
                    &what,
                    &format!("/v1/volumes/{}/snapshots", seg(&volume)),
                    &json!({"name": name}),
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                println!("snapshot {volume}/{name} created");
            }
        }
        SnapshotCmd::Ls { volume } => {
            let what = format!("list snapshots of volume {volume}");
            let v: Value = c
                .get(&what, &format!("/v1/volumes/{}/snapshots", seg(&volume)))
                .await?;
            if json_out {
                print_json(&v);
            } else {
                let snaps: Vec<Snapshot> = decode(&what, v)?;
                let mut t = Table::new(&["VOLUME", "NAME", "SIZE", "CREATED"]);
                for s in &snaps {
                    t.row(vec![
                        s.volume.clone(),
                        s.name.clone(),
                        format_size(s.size_bytes),
                        utc(s.created),
                    ]);
                }
                t.print_or(&format!(
                    "no snapshots of {volume} (take one: corral snapshot create {volume} NAME)"
                ));
            }
        }
        SnapshotCmd::Delete { volume, name } => {
            let what = format!("delete snapshot {name} of volume {volume}");
            let v = c
                .delete(
                    &what,
                    &format!("/v1/volumes/{}/snapshots/{}", seg(&volume), seg(&name)),
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                println!("snapshot {volume}/{name} deleted");
            }
        }
        SnapshotCmd::Revert { volume, name } => {
            let what = format!("revert volume {volume} to snapshot {name}");
            let v = c
                .post(
                    &what,
                    &format!(
                        "/v1/volumes/{}/snapshots/{}/revert",
                        seg(&volume),
                        seg(&name)
                    ),
                    &json!({}),
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                println!("volume {volume} reverted to snapshot {name}");
            }
        }
    }
    Ok(())
}

// ----------------------------------------------- replicas, controllers ----

async fn replica_ls(c: &Client, volume: Option<&str>, json_out: bool) -> Result<(), CliError> {
    let v: Value = c.get("list replicas", "/v1/replicas").await?;
    let all: Vec<Replica> = decode("list replicas", v)?;
    let rs: Vec<Replica> = all
        .into_iter()
        .filter(|r| volume.is_none_or(|v| r.volume == v))
        .collect();
    if json_out {
        print_json(&serde_json::to_value(&rs).unwrap_or(Value::Null));
        return Ok(());
    }
    let mut t = Table::new(&[
        "NAME",
        "VOLUME",
        "NODE",
        "DISK",
        "STATE",
        "IN-SYNC-EPOCH",
        "REASON",
    ]);
    for r in &rs {
        t.row(vec![
            r.name.clone(),
            r.volume.clone(),
            r.node.clone(),
            r.disk.clone(),
            lower(r.state),
            r.last_in_sync_epoch.to_string(),
            or_dash(r.reason.as_deref()),
        ]);
    }
    t.print_or("no replicas");
    Ok(())
}

#[derive(Deserialize)]
struct CtrlEntry {
    node: String,
    controller: Option<ControllerInfo>,
    #[serde(default)]
    orphan: Value,
}

async fn controller_ls(c: &Client, orphans: bool, json_out: bool) -> Result<(), CliError> {
    let what = "list controllers";
    let v: Value = c
        .get(what, &format!("/v1/controllers?orphans={orphans}"))
        .await?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    let entries: Vec<CtrlEntry> = decode(what, v)?;
    if orphans {
        // Controllers come as {controller, orphan: true}; other kinds as {orphan: {...}}.
        let mut t = Table::new(&["NODE", "KIND", "NAME", "AGE", "DETAIL"]);
        for e in &entries {
            if let Some(ctl) = &e.controller {
                t.row(vec![
                    e.node.clone(),
                    "controller".into(),
                    ctl.name.clone(),
                    "-".into(),
                    format!(
                        "{} host {} → {}:{}",
                        ctl.state, ctl.hostnqn, ctl.traddr, ctl.trsvcid
                    ),
                ]);
            } else if let Ok(o) = serde_json::from_value::<Orphan>(e.orphan.clone()) {
                t.row(vec![
                    e.node.clone(),
                    o.kind,
                    o.name,
                    format!("{}s", o.age_secs),
                    o.detail,
                ]);
            }
        }
        t.print_or("no orphans");
        return Ok(());
    }
    let mut t = Table::new(&[
        "NODE", "NAME", "STATE", "TARGET", "SUBNQN", "HOSTNQN", "ORPHAN",
    ]);
    for e in &entries {
        let Some(ctl) = &e.controller else { continue };
        t.row(vec![
            e.node.clone(),
            ctl.name.clone(),
            ctl.state.clone(),
            format!("{}:{}", ctl.traddr, ctl.trsvcid),
            ctl.subnqn.clone(),
            ctl.hostnqn.clone(),
            yes_no(e.orphan == Value::Bool(true)),
        ]);
    }
    t.print_or("no controllers (engines of attached volumes have one per replica)");
    Ok(())
}

#[derive(Deserialize)]
struct OrphanEntry {
    node: String,
    orphan: Orphan,
}

async fn orphans_ls(c: &Client, json_out: bool) -> Result<(), CliError> {
    let v: Value = c.get("list orphans", "/v1/orphans").await?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    let os: Vec<OrphanEntry> = decode("list orphans", v)?;
    let mut t = Table::new(&["NODE", "KIND", "NAME", "AGE", "DETAIL"]);
    for e in os {
        t.row(vec![
            e.node,
            e.orphan.kind,
            e.orphan.name,
            format!("{}s", e.orphan.age_secs),
            e.orphan.detail,
        ]);
    }
    t.print_or("no orphans");
    Ok(())
}

/// One event as a line (lists and `--follow` look the same).
pub fn event_line(e: &Event) -> String {
    format!(
        "{:>6}  {}  {:<10} {:<28} {:<16} {}",
        e.seq,
        utc(e.time),
        e.kind,
        e.object,
        e.reason,
        e.message
    )
    .replace('\n', " ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use control::model::*;

    fn vol() -> Volume {
        Volume {
            name: "vol1".into(),
            size_bytes: 1 << 30,
            replica_count: 3,
            attach: Some(AttachSpec {
                node: "node1".into(),
                frontend: Frontend::Nbd,
            }),
            state: VolumeState::Faulted,
            robustness: Robustness::Faulted,
            epoch: 2,
            engine_node: Some("node1".into()),
            endpoint: None,
            conditions: vec![Condition {
                kind: "Faulted".into(),
                reason: "volume vol1: no healthy replica left".into(),
                advice: Some("corral volume salvage vol1".into()),
                since: 1000,
            }],
            attach_attempts: 3,
            state_transitions: 4,
            created: 900,
        }
    }

    #[test]
    fn volume_show_has_conditions_advice_and_replicas() {
        let d = VolumeDetail {
            volume: vol(),
            replicas: vec![Replica {
                name: "vol1-r0000abcd".into(),
                volume: "vol1".into(),
                node: "node2".into(),
                disk: "disk0".into(),
                state: ReplicaState::OutOfSync,
                reason: Some("dropped by the engine".into()),
                last_in_sync_epoch: 1,
                created: 900,
                rebuild: None,
            }],
            snapshots: vec![],
            event_seq: None,
        };
        let s = render_volume(&d, 1060);
        assert!(s.contains("State:       faulted (engine epoch 2"), "{s}");
        assert!(
            s.contains("Faulted: volume vol1: no healthy replica left (for 1m)"),
            "{s}"
        );
        assert!(s.contains("what to do: corral volume salvage vol1"), "{s}");
        assert!(
            s.contains("vol1-r0000abcd  node2  disk0  out_of_sync  1"),
            "{s}"
        );
        assert!(s.contains("Snapshots:\n  none"), "{s}");
        assert!(s.contains("Size:        1 GiB"), "{s}");
    }

    #[test]
    fn hints() {
        assert!(usage_hint("nbd://127.0.1.1:10809/vol1")
            .unwrap()
            .starts_with("qemu-img info nbd://127.0.1.1:10809/vol1"));
        assert_eq!(
            usage_hint("nvme+tcp://127.0.1.1:4430/nqn.2025-01.io.corral:volume:v").unwrap(),
            "nvme connect -t tcp -a 127.0.1.1 -s 4430 -n nqn.2025-01.io.corral:volume:v"
        );
        assert_eq!(usage_hint("weird"), None);
    }

    #[test]
    fn event_lines() {
        let e = Event {
            seq: 7,
            time: 0,
            kind: "volume".into(),
            object: "vol1".into(),
            reason: "Attached".into(),
            message: "a\nb".into(),
        };
        let l = event_line(&e);
        assert!(
            l.starts_with("     7  1970-01-01T00:00:00Z  volume     vol1"),
            "{l}"
        );
        assert!(l.ends_with("Attached         a b"), "{l}");
    }
}
