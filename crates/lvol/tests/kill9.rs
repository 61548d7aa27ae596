//! `kill -9` of a real process: a child (this test binary, re-executed) writes,
//! flushes and takes snapshots on a real directory, reporting each flush and
//! snapshot on stdout once it has returned. The parent kills it with SIGKILL at
//! a random moment, reopens the store and checks that everything reported is
//! there: flushed writes readable (later ones may or may not be), reported
//! snapshots present with exactly their content. Three rounds on one store.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use lvol::{CreateOpts, LvStore};

const BS: usize = 4096;
const N: u64 = 2048; // blocks of the lvol
const CHILD_ENV: &str = "LVOL_KILL9_CHILD_DIR";

fn block_of(i: u64) -> u64 {
    (i * 7919) % N
}

/// Entry point of the child process; a no-op when run as a normal test.
#[test]
fn kill9_child_entry() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let start: u64 = std::env::var("LVOL_KILL9_START").unwrap().parse().unwrap();
    let dir = std::path::PathBuf::from(dir);
    let s = match LvStore::open_dir(&dir, None) {
        Ok(s) => s,
        Err(_) => {
            let s = LvStore::create_dir(
                &dir,
                "lvs",
                CreateOpts {
                    block_size: 4096,
                    cluster_size: 1 << 20,
                },
            )
            .unwrap();
            s.create_lvol("vol", N * BS as u64, true).unwrap();
            s
        }
    };
    // the io_uring data path, as the dataplane runs it
    s.set_reactor(Some(std::sync::Arc::new(
        bdev::uring::Reactor::new("kill9").unwrap(),
    )));
    let vol = s.bdev("vol").unwrap();
    assert!(vol.uses_io_uring());
    let mut i = start;
    loop {
        i += 1;
        write(&*vol, block_of(i), &pattern(i as u32, block_of(i), BS)).unwrap();
        if i.is_multiple_of(8) {
            flush(&*vol).unwrap();
            println!("flushed {i}");
        }
        if i.is_multiple_of(200) {
            let name = format!("snap{i}");
            s.snapshot("vol", &name).unwrap();
            println!("snapshot {i}");
        }
        if i.is_multiple_of(600) {
            // merge the oldest snapshot away, under the same kill
            let chain = s.chain("vol").unwrap();
            if chain.len() > 3 {
                let oldest = chain.last().unwrap().name.clone();
                s.delete(&oldest).unwrap();
                println!("deleted {}", oldest.trim_start_matches("snap"));
            }
        }
    }
}

/// Head content expected after writes `start+1..=upto` on top of `base`.
fn expect(base: &[u64], start: u64, upto: u64) -> Vec<u64> {
    let mut v = base.to_vec();
    for i in start + 1..=upto {
        v[block_of(i) as usize] = i;
    }
    v
}

fn tag_of(blk: &[u8], b: u64) -> u64 {
    let tag = if blk.iter().all(|&x| x == 0) {
        0
    } else {
        u32::from_le_bytes(blk[..4].try_into().unwrap())
    };
    assert_eq!(blk, &pattern(tag, b, BS)[..], "block {b} is garbage");
    tag as u64
}

#[test]
fn kill9_at_random_moments_keeps_flushed_data_and_snapshots() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let d = TempDir::new("kill9");
    let exe = std::env::current_exe().unwrap();
    let mut start = 0u64;
    let mut base = vec![0u64; N as usize];
    // write index of a snapshot -> its expected content (None: deleted)
    let mut snaps: BTreeMap<u64, Option<Vec<u64>>> = BTreeMap::new();
    let mut verified = 0;
    for round in 0..3u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "kill9_child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, d.path())
            .env("LVOL_KILL9_START", start.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let stop_after = 40 + rand::random::<u64>() % 120 + round * 30;
        let (mut flushed, mut seen) = (start, 0);
        let mut events = vec![];
        while seen < stop_after {
            let Some(Ok(line)) = lines.next() else { break };
            if line.starts_with("flushed ") {
                seen += 1;
            }
            events.push(line);
        }
        child.kill().unwrap(); // SIGKILL
        let _ = child.wait();
        // What the child printed before it died was acknowledged too.
        events.extend(lines.map_while(Result::ok));
        for line in &events {
            let Some((what, n)) = line.split_once(' ') else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "flushed" => flushed = n,
                "snapshot" => {
                    snaps.insert(n, Some(expect(&base, start, n)));
                }
                "deleted" => {
                    snaps.insert(n, None);
                }
                _ => {}
            }
        }
        assert!(flushed > start, "round {round}: the child made no progress");

        let s = LvStore::open_dir(d.path(), None).unwrap();
        let vol = s.bdev("vol").unwrap();
        let want = expect(&base, start, flushed);
        let data = read(&*vol, 0, N).unwrap();
        let mut last_seen = flushed;
        let old_base = base.clone();
        for b in 0..N {
            let tag = tag_of(&data[(b as usize) * BS..(b as usize + 1) * BS], b);
            // the last flushed write, or a later (unflushed) write to this block
            assert!(
                tag == want[b as usize] || (tag > flushed && block_of(tag) == b),
                "round {round}: block {b} has write {tag}, flushed {}",
                want[b as usize]
            );
            last_seen = last_seen.max(tag);
            base[b as usize] = tag;
        }
        // A snapshot taken but not reported may exist: then it must be complete.
        for l in s.lvols().unwrap() {
            if let Some(n) = l.name.strip_prefix("snap") {
                let n: u64 = n.parse().unwrap();
                snaps
                    .entry(n)
                    .or_insert_with(|| Some(expect(&old_base, start, n)));
            }
        }
        let oldest = snaps.iter().find(|(_, v)| v.is_some()).map(|(k, _)| *k);
        for (&at, exp) in snaps.iter_mut() {
            let name = format!("snap{at}");
            match (exp.as_ref(), s.lvol(&name)) {
                (Some(want), Ok(_)) => {
                    let got = read(&*s.bdev(&name).unwrap(), 0, N).unwrap();
                    verified += 1;
                    for b in 0..N {
                        let tag = tag_of(&got[(b as usize) * BS..(b as usize + 1) * BS], b);
                        assert_eq!(tag, want[b as usize], "round {round}: {name} block {b}");
                    }
                }
                // the oldest may have been merged away just before the kill
                (Some(_), Err(_)) if Some(at) == oldest => *exp = None,
                (Some(_), Err(e)) => {
                    panic!("round {round}: reported snapshot {name} is missing: {e}")
                }
                (None, Ok(_)) => panic!("round {round}: deleted snapshot {name} is back"),
                (None, Err(_)) => {}
            }
        }
        // Continue past everything that may be on disk, keeping tags unique.
        start = (last_seen + 1000) / 8 * 8;
    }
    assert!(verified > 0, "no snapshot was taken before any kill");
}
