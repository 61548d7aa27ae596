//! Small helpers shared by the dataplane tests (`common`) and the CLI tests
//! (`cli_support`): free ports, the corral binary, qemu-io and fio runs.

use std::process::Command;

pub fn corral_bin() -> &'static str {
    env!("CARGO_BIN_EXE_corral")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// qemu-io on an NBD URI; Ok(output) when every command ran and verified.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Result<String, String> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri);
    let o = c
        .output()
        .map_err(|e| format!("qemu-io (package qemu-utils): {e}"))?;
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

/// fio in the background: 4 KiB random writes (QD8) over [offset, offset+size)
/// of an NBD URI at `rate` (e.g. "4m"), then a crc32c verify pass of all it
/// wrote; JSON results in `out`. Wait for it and check its exit status.
#[allow(dead_code)] // not every test binary runs fio
pub fn fio_write_verify(
    name: &str,
    uri: &str,
    offset: &str,
    size: &str,
    rate: &str,
    out: &std::path::Path,
) -> std::process::Child {
    Command::new("fio")
        .args([
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--output-format=json",
        ])
        .arg(format!("--name={name}"))
        .arg(format!("--offset={offset}"))
        .arg(format!("--size={size}"))
        .arg(format!("--rate={rate}"))
        .arg(format!("--uri={uri}"))
        .arg(format!("--output={}", out.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio (Debian package fio)")
}
