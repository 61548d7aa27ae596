//! Helpers for the NBD integration tests: a server in its own runtime, bdevs,
//! external clients run with a time limit, and a raw protocol client.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::file::FileBdev;
use bdev::malloc::MallocBdev;
use bdev::uring::Reactor;
use bdev::BdevRef;
use nbd::proto::*;
use nbd::{ExportOptions, NbdServer, ServerOptions};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "nbd=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A server running on its own multi-thread runtime, so that tests can run
/// blocking clients on the test thread.
pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub server: Option<NbdServer>,
    pub addr: SocketAddr,
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_with(ServerOptions::default())
    }
    pub fn start_with(opts: ServerOptions) -> Self {
        init_tracing();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = rt
            .block_on(NbdServer::start("127.0.0.1:0".parse().unwrap(), opts))
            .unwrap();
        let addr = server.local_addr();
        TestServer {
            rt,
            server: Some(server),
            addr,
        }
    }
    pub fn server(&self) -> &NbdServer {
        self.server.as_ref().unwrap()
    }
    pub fn add(&self, name: &str, bdev: BdevRef, opts: ExportOptions) -> String {
        let _g = self.rt.enter();
        self.server().add_export(name, bdev, opts).unwrap().uri
    }
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{}", self.addr, name)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let r = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), s.shutdown()).await
            });
            assert!(r.is_ok(), "server shutdown took longer than 30 s");
        }
    }
}

pub fn malloc(name: &str, bytes: u64, bs: u32) -> BdevRef {
    Arc::new(MallocBdev::new(name, bytes / bs as u64, bs, None).unwrap())
}

/// A scratch directory under the target directory (a real filesystem, so that
/// O_DIRECT works), removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("nbd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file bdev over a new sparse file of `bytes`.
pub fn file_bdev(name: &str, path: &Path, bytes: u64, reactor: Arc<Reactor>) -> BdevRef {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes).unwrap();
    drop(f);
    Arc::new(FileBdev::open(name, path, None, None, reactor).unwrap())
}

/// Fails with a clear message when a client tool is missing.
pub fn need(tool: &str, package: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{tool} not found: install the Debian package {package} (scripts/deps.sh does)"
    );
}

/// Runs a command with a time limit; panics with its output if it fails.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let out = run_status(cmd, limit);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command with a time limit and returns its output, whatever its status.
pub fn run_status(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    // Drain the pipes on threads so that a chatty child never blocks.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    }
}

/// Random bytes, reproducible from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    r.fill(&mut v[..]);
    v
}

// ------------------------------------------------------------------------
// A raw NBD client, for what real clients never send.

pub struct RawClient {
    pub s: TcpStream,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
}

pub fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// One option reply: (option, reply type, data).
pub type OptReply = (u32, u32, Vec<u8>);

/// Reply to a transmission request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub handle: u64,
    pub error: u32,
    pub data: Vec<u8>,
}

impl RawClient {
    /// Connects and reads the greeting; sends client flags.
    pub fn greet(addr: SocketAddr) -> RawClient {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = RawClient {
            s,
            size: 0,
            flags: 0,
            structured: false,
        };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).unwrap();
        assert_eq!(be64(&g), NBDMAGIC);
        assert_eq!(be64(&g[8..]), IHAVEOPT);
        c.s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        c
    }

    pub fn read_opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h), OPT_REPLY_MAGIC);
        let mut d = vec![0u8; be32(&h[16..]) as usize];
        self.s.read_exact(&mut d).unwrap();
        (be32(&h[8..]), be32(&h[12..]), d)
    }

    /// Sends an option and reads replies up to the final one.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.s.write_all(&opt(option, data)).unwrap();
        let mut v = Vec::new();
        loop {
            let r = self.read_opt_reply();
            let last = !matches!(r.1, REP_INFO | REP_SERVER | REP_META_CONTEXT);
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// GO on `name`; the final reply type.
    pub fn go(&mut self, name: &str) -> u32 {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let r = self.option(OPT_GO, &d);
        for (_, t, data) in &r {
            if *t == REP_INFO && be16(data) == INFO_EXPORT {
                self.size = be64(&data[2..]);
                self.flags = be16(&data[10..]);
            }
        }
        r.last().unwrap().1
    }

    /// A connected client: structured replies or not, GO on `name`.
    pub fn connect(addr: SocketAddr, name: &str, structured: bool) -> RawClient {
        let mut c = RawClient::greet(addr);
        if structured {
            let r = c.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r[0].1, REP_ACK);
            c.structured = true;
        }
        assert_eq!(c.go(name), REP_ACK);
        c
    }

    pub fn send(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let mut v = Vec::new();
        Request {
            flags,
            kind,
            handle,
            offset,
            length,
        }
        .encode(&mut v);
        self.s.write_all(&v).unwrap();
    }

    /// Reads one reply; `read_len` is the data length a simple read reply carries.
    pub fn recv(&mut self, read_len: usize) -> Reply {
        self.recv_by(|_| read_len)
    }

    /// Reads one reply; `read_len(handle)` is the data length a simple reply
    /// to that request carries.
    pub fn recv_by(&mut self, read_len: impl Fn(u64) -> usize) -> Reply {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        match be32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                let error = be32(&h);
                let handle = be64(&h[4..]);
                let mut data = vec![0u8; if error == 0 { read_len(handle) } else { 0 }];
                self.s.read_exact(&mut data).unwrap();
                Reply {
                    handle: be64(&h[4..]),
                    error,
                    data,
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).unwrap();
                assert_eq!(be16(&h) & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
                let kind = be16(&h[2..]);
                let mut p = vec![0u8; be32(&h[12..]) as usize];
                self.s.read_exact(&mut p).unwrap();
                let (error, data) = match kind {
                    REPLY_TYPE_OFFSET_DATA => (0, p[8..].to_vec()),
                    REPLY_TYPE_ERROR => (be32(&p), vec![]),
                    _ => (0, p),
                };
                Reply {
                    handle: be64(&h[4..]),
                    error,
                    data,
                }
            }
            x => panic!("bad reply magic {x:#x}"),
        }
    }

    pub fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> Reply {
        self.send(CMD_WRITE, 0, handle, offset, data.len() as u32);
        self.s.write_all(data).unwrap();
        self.recv(0)
    }

    pub fn read(&mut self, handle: u64, offset: u64, len: u32) -> Reply {
        self.send(CMD_READ, 0, handle, offset, len);
        self.recv(len as usize)
    }

    pub fn disconnect(mut self) {
        self.send(CMD_DISC, 0, 0, 0, 0);
        // The server closes after DISC.
        let mut b = [0u8; 1];
        assert_eq!(self.s.read(&mut b).unwrap_or(0), 0);
    }

    /// True once the server has closed the connection (EOF or reset).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}
