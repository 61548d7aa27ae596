//! Harness for the CLI tests: `corral up` as a real background process on
//! loopback (free ports, a loopback /24 of its own), and `corral …` commands
//! run against its manager.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "../common/util.rs"]
mod util;
#[allow(unused_imports)] // not every test binary uses every helper
pub use util::{corral_bin, fio_write_verify, free_port, qemu_io};

/// A loopback /24 per test process and tag, so parallel tests never share addresses.
pub fn prefix(tag: u8) -> String {
    format!(
        "127.{}.{}",
        100 + (tag % 100),
        (std::process::id() % 250) as u8 + 1
    )
}

/// A running `corral up`; SIGKILLed on drop if still there (its children
/// follow through PR_SET_PDEATHSIG).
pub struct Up {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub out: PathBuf,
    pub manager: String,
    pub prefix: String,
    pub nbd_port: u16,
    args: Vec<String>,
}

impl Up {
    /// Starts `corral up --data-dir DIR EXTRA…` with fresh ports.
    pub fn start(dir: &Path, tag: u8, extra: &[&str]) -> Up {
        let mport = free_port();
        let prefix = prefix(tag);
        let nbd_port = free_port();
        let mut args: Vec<String> = vec![
            "up".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--manager-listen".into(),
            format!("127.0.0.1:{mport}"),
            "--address-prefix".into(),
            prefix.clone(),
            "--nbd-port".into(),
            nbd_port.to_string(),
            "--nvmf-port".into(),
            free_port().to_string(),
            "--frontend-port".into(),
            free_port().to_string(),
            "--tick-ms".into(),
            "300".into(),
            "--timeout".into(),
            "90s".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut up = Up {
            child: None,
            dir: dir.to_path_buf(),
            out: dir.with_extension("up.out"),
            manager: format!("http://127.0.0.1:{mport}"),
            prefix,
            nbd_port,
            args,
        };
        up.spawn();
        up
    }

    fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.out)
            .unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(corral_bin())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn corral up");
        self.child = Some(child);
    }

    /// Runs the same `corral up` again (after `stop`), on the same ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        std::fs::write(&self.out, "").unwrap();
        self.spawn();
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Everything useful when a test fails: up's output and every log.
    pub fn diagnostics(&self) -> String {
        let mut s = format!("---- corral up output ----\n{}", self.output());
        if let Ok(rd) = std::fs::read_dir(self.dir.join("logs")) {
            for e in rd.flatten() {
                let t = std::fs::read_to_string(e.path()).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                s.push_str(&format!(
                    "\n---- {} (tail) ----\n{}",
                    e.path().display(),
                    tail.join("\n")
                ));
            }
        }
        s
    }

    /// Waits until up prints `marker`; panics (with the logs) if it exits or times out.
    pub fn wait_for_output(&mut self, marker: &str, t: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let o = self.output();
            if o.contains(marker) {
                return o;
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.child = None;
                panic!(
                    "corral up exited ({st}) before printing {marker:?}\n{}",
                    self.diagnostics()
                );
            }
            if t0.elapsed() > t {
                panic!(
                    "corral up did not print {marker:?} within {t:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `corral up` is fully up (its last start-up line).
    pub fn wait_up(&mut self) -> String {
        let out = self.wait_for_output("Ctrl-C stops everything", Duration::from_secs(120));
        assert!(!out.contains("corral up: error:"), "{}", self.diagnostics());
        out
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Sends `sig` and waits for up to exit; returns its exit code.
    pub fn stop_with(&mut self, sig: i32) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, sig) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if t0.elapsed() > Duration::from_secs(90) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("corral up did not stop within 90 s\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `corral ARGS…` against this manager.
    pub fn cli(&self, args: &[&str]) -> Cli {
        cli_at(&self.manager, args)
    }

    /// Runs a CLI command and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.cli(args);
        assert_eq!(
            r.code,
            0,
            "corral {args:?} failed:\n{}\n{}",
            r.stderr,
            self.diagnostics()
        );
        r.stdout
    }

    /// Runs a CLI command with `-o json` and parses its output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("corral {a:?}: not JSON ({e}):\n{out}"))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The result of one CLI run.
#[derive(Debug)]
pub struct Cli {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn cli_at(manager: &str, args: &[&str]) -> Cli {
    let o: Output = Command::new(corral_bin())
        .args(args)
        .env("CORRAL_MANAGER", manager)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run corral");
    Cli {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Processes whose command line mentions `needle` (the data dir): what `corral up`
/// must not leave behind.
pub fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) && cmd.contains("corral") {
            out.push((pid, cmd));
        }
    }
    out
}

/// Waits until no process mentions `needle`; panics with the survivors.
pub fn assert_no_processes_left(needle: &str, t: Duration) {
    let t0 = Instant::now();
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() {
            return;
        }
        if t0.elapsed() > t {
            panic!("processes left behind: {left:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The endpoint `corral up` printed.
pub fn endpoint_in(out: &str) -> String {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("endpoint: "))
        .next_back()
        .unwrap_or_else(|| panic!("no endpoint line in:\n{out}"))
        .trim()
        .to_string()
}
