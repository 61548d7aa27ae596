//! Real NBD clients nobody here wrote, against exports of a malloc bdev and of
//! a file bdev (O_DIRECT through the io_uring reactor): qemu-img, qemu-io
//! (qemu-utils), nbdcopy and nbdinfo (libnbd-bin), and fio's nbd engine (fio).
//! Every test ends by comparing data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bdev::uring::Reactor;
use bdev::{BdevExt, BdevRef};
use common::*;
use nbd::ExportOptions;

const LIMIT: Duration = Duration::from_secs(180);
const SIZE: u64 = 32 << 20;

/// A source image: random data with a zero hole and a repeated pattern.
fn source_image(path: &std::path::Path, seed: u64) -> Vec<u8> {
    let mut data = random_bytes(SIZE as usize, seed);
    data[4 << 20..6 << 20].fill(0);
    data[10 << 20..11 << 20].fill(0x5a);
    std::fs::write(path, &data).unwrap();
    data
}

fn check_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    assert_eq!(
        crc32c::crc32c(a),
        crc32c::crc32c(b),
        "{what}: checksums differ"
    );
    assert!(a == b, "{what}: contents differ");
}

/// Both kinds of export the tests run against.
enum Kind {
    Malloc,
    File,
}

struct Target {
    srv: TestServer,
    bdev: BdevRef,
    _reactor: Option<Arc<Reactor>>,
    scratch: Scratch,
    uri: String,
}

fn target(kind: Kind, tag: &str) -> Target {
    let srv = TestServer::start();
    let scratch = Scratch::new(tag);
    let (bdev, reactor) = match kind {
        Kind::Malloc => (malloc("m0", SIZE, 512), None),
        Kind::File => {
            let r = Arc::new(Reactor::new(&format!("t-{tag}")).unwrap());
            let b = file_bdev("f0", &scratch.path("disk.img"), SIZE, r.clone());
            (b, Some(r))
        }
    };
    let uri = srv.add(tag, bdev.clone(), ExportOptions::default());
    Target {
        srv,
        bdev,
        _reactor: reactor,
        scratch,
        uri,
    }
}

impl Target {
    /// The export's contents, read through the bdev directly.
    fn contents(&self) -> Vec<u8> {
        let b = self.bdev.clone();
        self.srv.rt.block_on(async move {
            let bs = b.block_size() as u64;
            b.read_blocks(0, SIZE / bs).await.unwrap().to_vec()
        })
    }
}

fn qemu_img_convert_in_and_out(kind: Kind, tag: &str) {
    need("qemu-img", "qemu-utils");
    let t = target(kind, tag);
    let src = t.scratch.path("src.img");
    let data = source_image(&src, 1);
    run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&t.uri),
        LIMIT,
    );
    check_same(&data, &t.contents(), "qemu-img convert in");
    run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&t.uri),
        LIMIT,
    );
    let out = t.scratch.path("out.img");
    run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&t.uri)
            .arg(&out),
        LIMIT,
    );
    check_same(&data, &std::fs::read(&out).unwrap(), "qemu-img convert out");
}

#[test]
fn qemu_img_convert_malloc() {
    qemu_img_convert_in_and_out(Kind::Malloc, "qimg-m");
}

#[test]
fn qemu_img_convert_file() {
    qemu_img_convert_in_and_out(Kind::File, "qimg-f");
}

fn qemu_io_patterns(kind: Kind, tag: &str) {
    need("qemu-io", "qemu-utils");
    let t = target(kind, tag);
    let cmds = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -P 0xcd 1M 512k",
        "write -f -P 0x11 4M 64k", // FUA
        "flush",
        "write -z 2M 1M",
        "write -P 0x77 6M 1M",
        "discard 6M 512k",
        "aio_write -P 0x21 8M 64k",
        "aio_write -P 0x22 9M 64k",
        "aio_flush",
        "read -P 0xab 0 1M",
        "read -P 0xcd 1M 512k",
        "read -P 0 2M 1M",
        "read -P 0x11 4M 64k",
        "read -P 0x77 6656k 512k",
        "read -P 0x21 8M 64k",
        "read -P 0x22 9M 64k",
        "read -P 0 31M 1M",
    ];
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]).arg(&t.uri);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = run(&mut c, LIMIT);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("fail"), "{text}");
    // The verification is not vacuous: a wrong pattern fails.
    let bad = run_status(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(&t.uri)
            .args(["-c", "read -P 0xee 0 1M"]),
        LIMIT,
    );
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("Pattern verification failed"),
        "{bad:?}"
    );
    // And the bdev holds what qemu-io wrote.
    let d = t.contents();
    assert!(d[..1 << 20].iter().all(|&b| b == 0xab));
    assert!(d[1 << 20..(1 << 20) + (512 << 10)]
        .iter()
        .all(|&b| b == 0xcd));
    assert!(d[2 << 20..3 << 20].iter().all(|&b| b == 0));
    assert!(d[4 << 20..(4 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0x11));
    assert!(d[(6 << 20) + (512 << 10)..7 << 20]
        .iter()
        .all(|&b| b == 0x77));
}

#[test]
fn qemu_io_patterns_malloc() {
    qemu_io_patterns(Kind::Malloc, "qio-m");
}

#[test]
fn qemu_io_patterns_file() {
    qemu_io_patterns(Kind::File, "qio-f");
}

fn nbdcopy_in_and_out(kind: Kind, tag: &str) {
    need("nbdcopy", "libnbd-bin");
    let t = target(kind, tag);
    let src = t.scratch.path("src.img");
    let data = source_image(&src, 2);
    // Several connections and many requests in flight (the export says multi-conn).
    run(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=32", "--flush"])
            .arg(&src)
            .arg(&t.uri),
        LIMIT,
    );
    check_same(&data, &t.contents(), "nbdcopy in");
    let out = t.scratch.path("out.img");
    run(
        Command::new("nbdcopy")
            .args(["--connections=2"])
            .arg(&t.uri)
            .arg(&out),
        LIMIT,
    );
    check_same(&data, &std::fs::read(&out).unwrap(), "nbdcopy out");

    // NBD to NBD, between two exports of the same server; the second one is
    // first filled with junk so that zero regions must really be written.
    let second = malloc("m1", SIZE, 4096);
    {
        let b = second.clone();
        t.srv.rt.block_on(async move {
            b.write_blocks(0, &vec![0xff; SIZE as usize], false)
                .await
                .unwrap()
        });
    }
    let uri2 = t
        .srv
        .add("second", second.clone(), ExportOptions::default());
    run(
        Command::new("nbdcopy")
            .args(["--connections=2"])
            .arg(&t.uri)
            .arg(&uri2),
        LIMIT,
    );
    let d2 = t
        .srv
        .rt
        .block_on(async move { second.read_blocks(0, SIZE / 4096).await.unwrap().to_vec() });
    check_same(&data, &d2, "nbdcopy nbd to nbd");
}

#[test]
fn nbdcopy_malloc() {
    nbdcopy_in_and_out(Kind::Malloc, "copy-m");
}

#[test]
fn nbdcopy_file() {
    nbdcopy_in_and_out(Kind::File, "copy-f");
}

#[test]
fn nbdinfo_json_list_and_map() {
    need("nbdinfo", "libnbd-bin");
    let t = target(Kind::File, "info");
    let ro = ExportOptions {
        read_only: true,
        multi_conn: false,
        description: Some("a read-only disk".into()),
        ..Default::default()
    };
    let big = malloc("big", 1 << 30, 4096);
    t.srv.add("ro", big, ro);

    let out = run(Command::new("nbdinfo").arg("--json").arg(&t.uri), LIMIT);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["protocol"], "newstyle-fixed");
    assert_eq!(j["structured"], true);
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "info");
    assert_eq!(e["export-size"], SIZE);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    for flag in [
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_zero",
        "can_fast_zero",
        "can_df",
    ] {
        assert_eq!(e[flag], true, "{flag}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["contexts"][0], "base:allocation");
    // The file bdev punches holes here (ext4 under target/), so trim is offered.
    assert_eq!(e["can_trim"], t.bdev.supports(bdev::IoKind::Unmap), "{e}");

    let ro_uri = t.srv.uri("ro");
    let out = run(Command::new("nbdinfo").arg("--json").arg(&ro_uri), LIMIT);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &j["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_multi_conn"], false);
    assert_eq!(e["can_trim"], false);
    assert_eq!(e["can_zero"], false);
    assert_eq!(e["block_size_minimum"], 4096);
    assert_eq!(e["export-size"], 1u64 << 30);
    assert_eq!(e["description"], "a read-only disk");

    // --list: every export, by name.
    let out = run(
        Command::new("nbdinfo")
            .arg("--list")
            .arg("--json")
            .arg(format!("nbd://{}", t.srv.addr)),
        LIMIT,
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> = j["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, vec!["info".to_string(), "ro".to_string()]);

    // --map: base:allocation, all of it allocated data.
    let out = run(Command::new("nbdinfo").arg("--map").arg(&t.uri), LIMIT);
    let text = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(fields, vec!["0", &SIZE.to_string(), "0", "data"], "{text}");
    let out = run(
        Command::new("nbdinfo")
            .arg("--map")
            .arg("--totals")
            .arg(&ro_uri),
        LIMIT,
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("data"),
        "{out:?}"
    );

    // qemu sees READ_ONLY and refuses to open for writing (the server's own
    // EPERM is checked by the protocol tests); reading works.
    let bad = run_status(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(&ro_uri)
            .args(["-c", "write -P 1 0 4k"]),
        LIMIT,
    );
    let text =
        String::from_utf8_lossy(&bad.stdout).to_string() + &String::from_utf8_lossy(&bad.stderr);
    assert!(
        text.contains("Permission denied") || text.contains("read-only"),
        "{text}"
    );
    run(
        Command::new("qemu-io")
            .args(["-f", "raw", "-r"])
            .arg(&ro_uri)
            .args(["-c", "read -P 0 0 1M"]),
        LIMIT,
    );
}

fn fio_verify(kind: Kind, tag: &str) {
    need("fio", "fio");
    let t = target(kind, tag);
    // Two jobs (two connections) on disjoint halves, random writes then a
    // verifying read pass, crc32c in every block.
    let out = run(
        Command::new("fio")
            .args([
                "--ioengine=nbd",
                &format!("--uri={}", t.uri),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=16M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=json",
                "--name=a",
                "--offset=0",
                "--name=b",
                "--offset=16M",
                "--bsrange=4k-64k",
                "--verify_state_save=0",
            ])
            .current_dir(&t.scratch.0)
            .env("FIO_DISABLE_SHM", "1"),
        LIMIT,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').unwrap();
    let j: serde_json::Value = serde_json::from_str(&text[start..]).unwrap();
    let jobs = j["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    for job in jobs {
        assert_eq!(job["error"], 0, "{job}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 16 << 20);
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() >= 16 << 20,
            "verify pass ran"
        );
    }
    // fio's verify headers are in the bdev: every 4 KiB block written carries
    // fio's verify magic (0xacca), which a read-back through the bdev sees.
    let d = t.contents();
    let blocks_with_magic = d
        .chunks(4096)
        .filter(|b| b[0] == 0xca && b[1] == 0xac)
        .count();
    assert!(
        blocks_with_magic > 1000,
        "{blocks_with_magic} blocks with fio headers"
    );
}

#[test]
fn fio_verify_malloc() {
    fio_verify(Kind::Malloc, "fio-m");
}

#[test]
fn fio_verify_file() {
    fio_verify(Kind::File, "fio-f");
}
