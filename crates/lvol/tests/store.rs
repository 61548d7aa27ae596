//! Behaviour of the store through its public API, on a real directory (and on
//! the fault-injecting storage where a full disk is needed).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::sync::Arc;

use bdev::{Bdev, IoError};
use common::*;
use lvol::fault::FaultStorage;
use lvol::{CreateOpts, FragmapScope, LvStore, LvolError, Lvstores};

const BS: usize = 4096;
const MIB: u64 = 1 << 20;

fn opts() -> CreateOpts {
    CreateOpts {
        block_size: 4096,
        cluster_size: MIB,
    }
}

fn blocks(tag: u32, from: u64, n: u64) -> Vec<u8> {
    (from..from + n).flat_map(|b| pattern(tag, b, BS)).collect()
}

#[test]
fn identity_is_recorded_and_checked() {
    let d = TempDir::new("identity");
    let s = LvStore::create_dir(d.path(), "lvs0", opts()).unwrap();
    let u = s.uuid();
    drop(s);
    // a second create on the same directory is refused and changes nothing
    let e = LvStore::create_dir(d.path(), "other", opts()).unwrap_err();
    assert!(matches!(e, LvolError::Exists { .. }), "{e}");
    assert_eq!(e.errno(), libc::EEXIST);
    let s = LvStore::open_dir(d.path(), Some(u)).unwrap();
    assert_eq!((s.uuid(), s.name()), (u, "lvs0".to_string()));
    let info = s.info().unwrap();
    assert_eq!((info.block_size, info.cluster_size), (4096, MIB));
    assert!(info.free_clusters > 0 && info.total_data_clusters >= info.free_clusters);
    drop(s);
    let other = uuid::Uuid::new_v4();
    let e = LvStore::open_dir(d.path(), Some(other)).unwrap_err();
    assert!(
        matches!(e, LvolError::WrongStore { found, .. } if found == u),
        "{e}"
    );
    // an empty directory is no store
    let empty = TempDir::new("empty");
    assert!(matches!(
        LvStore::open_dir(empty.path(), None),
        Err(LvolError::NoStore { .. })
    ));
    // a damaged metadata file is refused, not misread
    let meta = d.path().join(lvol::meta::META_FILE);
    let mut bytes = std::fs::read(&meta).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 1;
    std::fs::write(&meta, &bytes).unwrap();
    let e = LvStore::open_dir(d.path(), None).unwrap_err();
    assert!(matches!(e, LvolError::Corrupt { .. }), "{e}");
    assert_eq!(e.errno(), libc::EIO);
}

#[test]
fn empty_1tib_volume_costs_almost_nothing_and_reads_zeroes() {
    let d = TempDir::new("thin");
    let s = LvStore::create_dir(d.path(), "lvs", opts()).unwrap();
    s.create_lvol("big", 1 << 40, true).unwrap();
    let usage = disk_usage(d.path());
    assert!(usage < 64 * 1024, "empty 1 TiB lvol uses {usage} bytes");
    let b = s.bdev("big").unwrap();
    assert_eq!(b.num_blocks(), (1u64 << 40) / BS as u64);
    let last = b.num_blocks() - 1;
    write(&*b, last, &pattern(7, last, BS)).unwrap();
    flush(&*b).unwrap();
    assert_eq!(read(&*b, last, 1).unwrap(), pattern(7, last, BS));
    assert!(read(&*b, 12345, 4).unwrap().iter().all(|&x| x == 0));
    let usage = disk_usage(d.path());
    assert!(usage < 256 * 1024, "1 block written uses {usage} bytes");
    assert_eq!(s.lvol("big").unwrap().num_allocated_blocks, 1);
    assert_eq!(read(&*b, last + 1, 1).unwrap_err(), IoError::OutOfRange);
    // the owner index of an empty chain costs a pointer per 16 MiB, no leaves
    assert!(b.owner_map_bytes() < 2 << 20);
}

#[test]
fn snapshot_clone_revert_and_persistence() {
    let d = TempDir::new("chain");
    let s = LvStore::create_dir(d.path(), "lvs", opts()).unwrap();
    let vol_uuid = s.create_lvol("vol", 4 * MIB, true).unwrap();
    let vol = s.bdev("vol").unwrap();
    assert_eq!(vol.name(), vol_uuid.to_string());
    assert_eq!(vol.alias(), "lvs/vol");
    write(&*vol, 0, &blocks(1, 0, 8)).unwrap();
    // no flush: the snapshot flushes itself
    s.snapshot("vol", "s1").unwrap();
    write(&*vol, 4, &blocks(2, 4, 8)).unwrap();
    // the head sees 1 on 0..4 and 2 on 4..12
    let mut expect = blocks(1, 0, 4);
    expect.extend(blocks(2, 4, 8));
    assert_eq!(read(&*vol, 0, 12).unwrap(), expect);
    // the snapshot is read-only and unchanged
    let s1 = s.bdev("s1").unwrap();
    assert!(!s1.writable());
    assert_eq!(read(&*s1, 0, 8).unwrap(), blocks(1, 0, 8));
    assert_eq!(
        write(&*s1, 0, &blocks(9, 0, 1)).unwrap_err(),
        IoError::ReadOnly
    );
    assert_eq!(unmap(&*s1, 0, 1).unwrap_err(), IoError::ReadOnly);
    flush(&*s1).unwrap();
    // snapshot of a snapshot is refused; names are unique
    assert_eq!(s.snapshot("s1", "x").unwrap_err().errno(), libc::EINVAL);
    assert_eq!(s.snapshot("vol", "s1").unwrap_err().errno(), libc::EEXIST);
    assert_eq!(s.snapshot("nope", "x").unwrap_err().errno(), libc::ENODEV);
    // a clone shares the snapshot's data and diverges on its own
    s.clone_snapshot("s1", "c1").unwrap();
    let c1 = s.bdev("lvs/c1").unwrap();
    assert_eq!(read(&*c1, 0, 8).unwrap(), blocks(1, 0, 8));
    write(&*c1, 0, &blocks(3, 0, 1)).unwrap();
    assert_eq!(read(&*c1, 0, 1).unwrap(), blocks(3, 0, 1));
    assert_eq!(read(&*vol, 0, 1).unwrap(), blocks(1, 0, 1));
    assert_eq!(
        s.clone_snapshot("vol", "c2").unwrap_err().errno(),
        libc::EINVAL
    );
    // listing
    let chain: Vec<String> = s
        .chain("vol")
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(chain, vec!["vol", "s1"]);
    let info = s.lvol("s1").unwrap();
    assert!(info.is_snapshot && info.clones.len() == 2);
    assert_eq!(info.num_allocated_blocks, 8);
    assert_eq!(s.lvol("vol").unwrap().base_snapshot.as_deref(), Some("s1"));
    flush(&*vol).unwrap();
    flush(&*c1).unwrap();
    drop((vol, s1, c1));
    drop(s);

    // everything survives a reopen
    let s = LvStore::open_dir(d.path(), None).unwrap();
    let vol = s.bdev("vol").unwrap();
    assert_eq!(read(&*vol, 0, 12).unwrap(), expect);
    assert_eq!(
        read(&*s.bdev("c1").unwrap(), 0, 2).unwrap(),
        [blocks(3, 0, 1), blocks(1, 1, 1)].concat()
    );

    // revert drops what the head wrote since s1, on the same bdev
    s.revert("vol", "s1").unwrap();
    assert_eq!(
        read(&*vol, 0, 12).unwrap(),
        [blocks(1, 0, 8), vec![0; 4 * BS]].concat()
    );
    write(&*vol, 10, &blocks(4, 10, 1)).unwrap();
    assert_eq!(read(&*vol, 10, 1).unwrap(), blocks(4, 10, 1));
    assert_eq!(s.revert("vol", "c1").unwrap_err().errno(), libc::EINVAL);
    assert_eq!(s.revert("s1", "s1").unwrap_err().errno(), libc::EPERM);
}

#[test]
fn snapshot_delete_merges_without_changing_any_reader() {
    let d = TempDir::new("merge");
    let s = LvStore::create_dir(d.path(), "lvs", opts()).unwrap();
    s.create_lvol("vol", 8 * MIB, true).unwrap();
    let vol = s.bdev("vol").unwrap();
    write(&*vol, 0, &blocks(1, 0, 600)).unwrap();
    s.snapshot("vol", "s1").unwrap();
    write(&*vol, 100, &blocks(2, 100, 300)).unwrap();
    s.snapshot("vol", "s2").unwrap();
    write(&*vol, 350, &blocks(3, 350, 100)).unwrap();
    zeroes(&*vol, 500, 10).unwrap();
    let want_vol = read(&*vol, 0, 2048).unwrap();
    let s2 = s.bdev("s2").unwrap();
    let want_s2 = read(&*s2, 0, 2048).unwrap();
    let sum_s2 = s.checksum("s2").unwrap();

    // two lvols on s1 (s2 and a clone): not deletable
    s.clone_snapshot("s1", "c").unwrap();
    let e = s.delete("s1").unwrap_err();
    assert!(
        matches!(&e, LvolError::HasClones { clones, .. } if clones.len() == 2),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EPERM);
    s.delete("c").unwrap();

    // s1 merges into s2 (a snapshot): s2 and vol read the same
    s.delete("s1").unwrap();
    assert_eq!(read(&*vol, 0, 2048).unwrap(), want_vol);
    assert_eq!(read(&*s2, 0, 2048).unwrap(), want_s2);
    assert_eq!(s.checksum("s2").unwrap(), sum_s2);
    assert_eq!(s.chain("vol").unwrap().len(), 2);
    assert_eq!(s.lvol("s2").unwrap().num_allocated_blocks, 600);
    // s2 merges into the head, whose bdev is live
    s.delete("s2").unwrap();
    assert!(s2.is_removed());
    assert_eq!(read(&*s2, 0, 1).unwrap_err(), IoError::Removed);
    assert_eq!(read(&*vol, 0, 2048).unwrap(), want_vol);
    assert_eq!(s.chain("vol").unwrap().len(), 1);
    flush(&*vol).unwrap();
    drop(vol);
    drop(s);
    let s = LvStore::open_dir(d.path(), None).unwrap();
    assert_eq!(read(&*s.bdev("vol").unwrap(), 0, 2048).unwrap(), want_vol);
    // no files of deleted layers remain: metadata + 2 files for the one layer
    let n = std::fs::read_dir(d.path()).unwrap().count();
    assert_eq!(n, 3);
}

#[test]
fn merge_into_head_under_io() {
    merge_into_head_under_io_with(false)
}

#[test]
fn merge_into_head_under_io_uring() {
    merge_into_head_under_io_with(true)
}

fn reactor() -> Arc<bdev::uring::Reactor> {
    Arc::new(bdev::uring::Reactor::new("lvol-test").expect("io_uring available"))
}

fn merge_into_head_under_io_with(uring: bool) {
    let d = TempDir::new("online");
    let s = LvStore::create_dir(d.path(), "lvs", opts()).unwrap();
    if uring {
        s.set_reactor(Some(reactor()));
    }
    s.create_lvol("vol", 16 * MIB, true).unwrap();
    let vol = s.bdev("vol").unwrap();
    assert_eq!(vol.uses_io_uring(), uring);
    let n = vol.num_blocks();
    write(&*vol, 0, &blocks(1, 0, n)).unwrap();
    s.snapshot("vol", "s1").unwrap();
    // a writer/reader thread keeps its own model of the head
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (v2, stop2) = (vol.clone(), stop.clone());
    let t = std::thread::spawn(move || {
        let mut model = vec![1u32; n as usize];
        let mut i = 0u32;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) || i < 200 {
            i += 1;
            let b = (i as u64 * 7919) % n;
            let tag = 100 + i;
            write(&*v2, b, &pattern(tag, b, BS)).unwrap();
            model[b as usize] = tag;
            let r = (i as u64 * 104_729) % n;
            assert_eq!(
                read(&*v2, r, 1).unwrap(),
                pattern(model[r as usize], r, BS),
                "block {r}"
            );
        }
        model
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    s.delete("s1").unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let model = t.join().unwrap();
    for b in 0..n {
        assert_eq!(
            read(&*vol, b, 1).unwrap(),
            pattern(model[b as usize], b, BS),
            "block {b}"
        );
    }
    assert_eq!(s.chain("vol").unwrap().len(), 1);
}

#[test]
fn write_zeroes_never_exposes_snapshot_data_and_unmap_frees_space() {
    let d = TempDir::new("zeroes");
    let s = LvStore::create_dir(d.path(), "lvs", opts()).unwrap();
    s.create_lvol("vol", 4 * MIB, true).unwrap();
    let vol = s.bdev("vol").unwrap();
    write(&*vol, 0, &blocks(1, 0, 64)).unwrap();
    s.snapshot("vol", "s1").unwrap();
    write(&*vol, 64, &blocks(2, 64, 64)).unwrap();
    // 32..96: half over the snapshot's blocks, half over the head's own
    zeroes(&*vol, 32, 64).unwrap();
    unmap(&*vol, 96, 16).unwrap();
    let z = read(&*vol, 32, 80).unwrap();
    assert!(z.iter().all(|&x| x == 0));
    assert_eq!(read(&*vol, 0, 32).unwrap(), blocks(1, 0, 32));
    let info = s.lvol("vol").unwrap();
    // kept: 32 zeroed blocks hiding s1; dropped: 32 + 16 of its own
    assert_eq!(info.num_allocated_blocks, 32 + 16);
    flush(&*vol).unwrap();
    drop(vol);
    drop(s);
    let s = LvStore::open_dir(d.path(), None).unwrap();
    let vol = s.bdev("vol").unwrap();
    assert!(read(&*vol, 32, 80).unwrap().iter().all(|&x| x == 0));
    assert_eq!(
        read(&*s.bdev("s1").unwrap(), 32, 32).unwrap(),
        blocks(1, 32, 32)
    );
}

#[test]
fn fragmaps_and_checksums() {
    let d = TempDir::new("fragmap");
    let s = LvStore::create_dir(d.path(), "lvs", opts()).unwrap();
    s.create_lvol("a", 4 * MIB, true).unwrap();
    let a = s.bdev("a").unwrap();
    write(&*a, 10, &blocks(1, 10, 5)).unwrap();
    s.snapshot("a", "a1").unwrap();
    write(&*a, 12, &blocks(2, 12, 10)).unwrap();
    let f = s.fragmap("a", 0, 0, FragmapScope::Layer).unwrap();
    assert_eq!(f.ranges, vec![(12, 10)]);
    let f = s.fragmap("a", 0, 0, FragmapScope::Chain).unwrap();
    assert_eq!(f.ranges, vec![(10, 12)]);
    assert_eq!(f.num_allocated_blocks, 12);
    let f = s
        .fragmap("a", 16 * 4096, 8 * 4096, FragmapScope::Chain)
        .unwrap();
    assert_eq!(
        (f.offset_blocks, f.num_blocks, f.ranges.clone()),
        (16, 8, vec![(16, 6)])
    );
    assert_eq!(f.to_bitmap(), vec![0b0011_1111]);
    assert_eq!(
        s.fragmap("a", 1, 4096, FragmapScope::Layer)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    assert_eq!(
        s.fragmap("a", 0, 8 * MIB, FragmapScope::Layer)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );

    // same content, different layering: same checksum
    s.snapshot("a", "a2").unwrap();
    s.create_lvol("b", 4 * MIB, true).unwrap();
    let b = s.bdev("b").unwrap();
    write(&*b, 10, &[blocks(1, 10, 2), blocks(2, 12, 10)].concat()).unwrap();
    s.snapshot("b", "b1").unwrap();
    assert_eq!(s.checksum("a2").unwrap(), s.checksum("b1").unwrap());
    assert_ne!(s.checksum("a1").unwrap(), s.checksum("a2").unwrap());
    // zeroes written explicitly equal a hole
    write(&*b, 100, &vec![0u8; BS]).unwrap();
    assert_eq!(s.checksum("b").unwrap(), s.checksum("b1").unwrap());
}

#[test]
fn bad_input_changes_nothing() {
    let d = TempDir::new("badinput");
    let s = LvStore::create_dir(d.path(), "lvs", opts()).unwrap();
    s.create_lvol("vol", 4 * MIB, true).unwrap();
    s.snapshot("vol", "snap").unwrap();
    let before = s.lvols().unwrap();
    let errs = [
        s.create_lvol("vol", MIB, true).unwrap_err(),
        s.create_lvol("a/b", MIB, true).unwrap_err(),
        s.create_lvol("", MIB, true).unwrap_err(),
        s.create_lvol("z", 0, true).unwrap_err(),
        s.create_lvol("z", u64::MAX, true).unwrap_err(),
        s.resize("vol", MIB).unwrap_err(),
        s.resize("snap", 8 * MIB).unwrap_err(),
        s.resize("nope", 8 * MIB).unwrap_err(),
        s.delete("nope").unwrap_err(),
        s.revert("vol", "nope").unwrap_err(),
    ];
    let codes: Vec<i32> = errs.iter().map(|e| e.errno()).collect();
    use libc::{EEXIST, EINVAL, ENODEV, EPERM};
    assert_eq!(
        codes,
        vec![EEXIST, EINVAL, EINVAL, EINVAL, EINVAL, EINVAL, EPERM, ENODEV, ENODEV, ENODEV]
    );
    assert_eq!(s.lvols().unwrap(), before);
    // the lvs/ alias must name this store
    assert_eq!(s.lvol("other/vol").unwrap_err().errno(), ENODEV);
}

#[test]
fn resize_grows_online() {
    let d = TempDir::new("resize");
    let s = LvStore::create_dir(d.path(), "lvs", opts()).unwrap();
    s.create_lvol("vol", MIB, true).unwrap();
    let vol = s.bdev("vol").unwrap();
    write(&*vol, 255, &blocks(1, 255, 1)).unwrap();
    assert_eq!(
        write(&*vol, 256, &blocks(1, 256, 1)).unwrap_err(),
        IoError::OutOfRange
    );
    s.resize("vol", 3 * MIB - 100).unwrap(); // rounded up to the cluster
    assert_eq!(vol.num_blocks(), 768);
    write(&*vol, 767, &blocks(2, 767, 1)).unwrap();
    assert!(read(&*vol, 256, 511).unwrap().iter().all(|&x| x == 0));
    flush(&*vol).unwrap();
    drop(vol);
    drop(s);
    let s = LvStore::open_dir(d.path(), None).unwrap();
    let vol = s.bdev("vol").unwrap();
    assert_eq!(vol.num_blocks(), 768);
    assert_eq!(read(&*vol, 767, 1).unwrap(), blocks(2, 767, 1));
    assert_eq!(read(&*vol, 255, 1).unwrap(), blocks(1, 255, 1));
}

#[test]
fn full_disk_fails_writes_keeps_reads_and_recovers() {
    let fs = FaultStorage::new(512);
    let s = LvStore::create(Arc::new(fs.clone()), "lvs", opts()).unwrap();
    s.create_lvol("vol", 16 * MIB, true).unwrap();
    let vol = s.bdev("vol").unwrap();
    write(&*vol, 0, &blocks(1, 0, 16)).unwrap();
    flush(&*vol).unwrap();
    fs.set_capacity(Some(fs.used_bytes() + 8 * 4096));
    let mut b = 16;
    let err = loop {
        match write(&*vol, b, &blocks(2, b, 4)) {
            Ok(()) => b += 4,
            Err(e) => break e,
        }
        assert!(b < 100, "the disk never filled");
    };
    assert_eq!(err, IoError::NoSpace);
    // overwriting allocated blocks still works, reads work, flush works
    write(&*vol, 0, &blocks(3, 0, 1)).unwrap();
    flush(&*vol).unwrap();
    assert_eq!(read(&*vol, 0, 1).unwrap(), blocks(3, 0, 1));
    assert_eq!(read(&*vol, 16, b - 16).unwrap(), blocks(2, 16, b - 16));
    // a snapshot needs space for its files: refused with ENOSPC, nothing changed
    assert_eq!(s.snapshot("vol", "s").unwrap_err().errno(), libc::ENOSPC);
    assert_eq!(s.lvols().unwrap().len(), 1);
    // space returns: writes succeed again
    fs.set_capacity(None);
    write(&*vol, b, &blocks(4, b, 4)).unwrap();
    assert_eq!(read(&*vol, b, 4).unwrap(), blocks(4, b, 4));
    s.snapshot("vol", "s").unwrap();
}

#[test]
fn fua_write_is_durable_without_flush() {
    let fs = FaultStorage::new(512);
    let s = LvStore::create(Arc::new(fs.clone()), "lvs", opts()).unwrap();
    s.create_lvol("vol", MIB, true).unwrap();
    let vol = s.bdev("vol").unwrap();
    write_fua(&*vol, 3, &blocks(5, 3, 2)).unwrap();
    write(&*vol, 9, &blocks(6, 9, 1)).unwrap(); // not flushed: dropped below
    let after = fs.power_loss(7, 0.0);
    let s = LvStore::open(Arc::new(after), None).unwrap();
    let vol = s.bdev("vol").unwrap();
    assert_eq!(read(&*vol, 3, 2).unwrap(), blocks(5, 3, 2));
    assert!(read(&*vol, 9, 1).unwrap().iter().all(|&x| x == 0));
}

#[test]
fn registry_maps_names_like_spdk() {
    let d1 = TempDir::new("reg1");
    let d2 = TempDir::new("reg2");
    let r = Lvstores::new();
    let u1 = r.create_lvstore(d1.path(), "lvs1", opts()).unwrap();
    assert_eq!(
        r.create_lvstore(d2.path(), "lvs1", opts())
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    r.create_lvstore(d2.path(), "lvs2", opts()).unwrap();
    assert_eq!(r.get_lvstores(None).unwrap().len(), 2);
    assert_eq!(
        r.get_lvstores(Some(&u1.to_string())).unwrap()[0].name,
        "lvs1"
    );
    r.get("lvs2").unwrap().create_lvol("v", MIB, true).unwrap();
    assert_eq!(r.bdev("lvs2/v").unwrap().alias(), "lvs2/v");
    assert_eq!(r.get_lvols(None).unwrap().len(), 1);
    assert_eq!(r.bdev("lvs1/v").unwrap_err().errno(), libc::ENODEV);
    let b = r.bdev("lvs2/v").unwrap();
    r.delete_lvstore("lvs2").unwrap();
    assert_eq!(read(&*b, 0, 1).unwrap_err(), IoError::Removed);
    assert_eq!(
        r.get_lvstores(Some("lvs2")).unwrap_err().errno(),
        libc::ENODEV
    );
    // the directory is no store any more; it can be made one again
    assert!(matches!(
        LvStore::open_dir(d2.path(), None),
        Err(LvolError::NoStore { .. })
    ));
    assert_eq!(std::fs::read_dir(d2.path()).unwrap().count(), 0);
    // reload the first from disk into a new registry
    let r2 = Lvstores::new();
    assert_eq!(r2.load_lvstore(d1.path(), Some(u1)).unwrap(), u1);
}

#[test]
fn block_size_512_needs_no_read_modify_write() {
    let d = TempDir::new("bs512");
    let s = LvStore::create_dir(
        d.path(),
        "lvs",
        CreateOpts {
            block_size: 512,
            cluster_size: MIB,
        },
    )
    .unwrap();
    s.create_lvol("vol", MIB, true).unwrap();
    let vol = s.bdev("vol").unwrap();
    let p = |t, b| pattern(t, b, 512);
    vol_write_512(&*vol, 0, &(0..8).flat_map(|b| p(1, b)).collect::<Vec<_>>());
    s.snapshot("vol", "s").unwrap();
    // one 512-byte block inside a 4 KiB page whose other blocks live in s
    vol_write_512(&*vol, 3, &p(2, 3));
    let got = read(&*vol, 0, 8).unwrap();
    let want: Vec<u8> = (0..8)
        .flat_map(|b| if b == 3 { p(2, b) } else { p(1, b) })
        .collect();
    assert_eq!(got, want);
    assert_eq!(s.lvol("vol").unwrap().num_allocated_blocks, 1);
}

fn vol_write_512(b: &dyn Bdev, off: u64, data: &[u8]) {
    write(b, off, data).unwrap()
}

/// Many requests in flight at once on the io_uring path, over a chain of
/// snapshots, checked against a plain model; then the same through a reopen.
#[test]
fn io_uring_queue_depth_32_over_a_chain() {
    use bdev::{BdevIo, Completion, IoBuf, IoSink};
    use std::sync::mpsc;
    type Done = (u64, BdevIo, Result<(), IoError>);
    struct Chan(Mutex<mpsc::Sender<Done>>);
    impl IoSink for Chan {
        fn complete(&self, tag: u64, io: BdevIo, r: Result<(), IoError>) {
            let _ = self.0.lock().send((tag, io, r));
        }
    }
    use parking_lot::Mutex;
    let d = TempDir::new("qd32");
    let s = LvStore::create_dir(d.path(), "lvs", opts()).unwrap();
    s.set_reactor(Some(reactor()));
    s.create_lvol("vol", 8 * MIB, true).unwrap();
    let vol = s.bdev("vol").unwrap();
    let n = vol.num_blocks();
    let mut model = vec![0u32; n as usize];
    let (tx, rx) = mpsc::channel();
    let sink: Arc<dyn IoSink> = Arc::new(Chan(Mutex::new(tx)));
    let mut tag = 0u32;
    for round in 0..6u64 {
        // 32 writes of 1..4 blocks in flight, to distinct places
        let mut inflight = 0;
        for k in 0..32u64 {
            tag += 1;
            let b = (k * 61 + round * 17) % (n - 4);
            let len = 1 + (k % 4);
            if (b..b + len).any(|x| model[x as usize] == u32::MAX) {
                continue;
            }
            for x in b..b + len {
                model[x as usize] = u32::MAX; // in flight
            }
            let data: Vec<u8> = (b..b + len).flat_map(|x| pattern(tag, x, BS)).collect();
            vol.submit(
                BdevIo::write(b, len, IoBuf::from_slice(&data), false),
                Completion::new(sink.clone(), tag as u64),
            );
            inflight += 1;
        }
        for _ in 0..inflight {
            let (t, io, r) = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
            r.unwrap();
            for x in io.offset_blocks..io.offset_blocks + io.num_blocks {
                model[x as usize] = t as u32;
            }
        }
        if round % 2 == 1 {
            s.snapshot("vol", &format!("s{round}")).unwrap();
        }
        // 32 reads in flight, each spanning several layers
        for k in 0..32u64 {
            let b = (k * 97) % (n - 40);
            vol.submit(
                BdevIo::read(b, 40, IoBuf::zeroed(40 * BS)),
                Completion::new(sink.clone(), k),
            );
        }
        for _ in 0..32 {
            let (_, io, r) = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
            r.unwrap();
            for x in 0..io.num_blocks {
                let b = io.offset_blocks + x;
                let got = &io.buf[(x as usize) * BS..(x as usize + 1) * BS];
                assert_eq!(got, &pattern(model[b as usize], b, BS)[..], "block {b}");
            }
        }
    }
    assert_eq!(s.chain("vol").unwrap().len(), 4);
    flush(&*vol).unwrap();
    drop(vol);
    drop(s);
    let s = LvStore::open_dir(d.path(), None).unwrap();
    let vol = s.bdev("vol").unwrap();
    let all = read(&*vol, 0, n).unwrap();
    for b in 0..n {
        assert_eq!(
            &all[(b as usize) * BS..(b as usize + 1) * BS],
            &pattern(model[b as usize], b, BS)[..]
        );
    }
}

/// Snapshots and snapshot merges while two threads keep 8 requests each in
/// flight on the io_uring path: requests that arrive while a control
/// operation pauses the bdev are parked and resubmitted, none is lost, and every
/// read matches what its thread wrote.
#[test]
fn control_operations_under_queued_io_uring_load() {
    use bdev::{BdevIo, Completion, IoBuf, IoSink};
    use parking_lot::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    type Done = (u64, BdevIo, Result<(), IoError>);
    struct Chan(Mutex<mpsc::Sender<Done>>);
    impl IoSink for Chan {
        fn complete(&self, tag: u64, io: BdevIo, r: Result<(), IoError>) {
            let _ = self.0.lock().send((tag, io, r));
        }
    }
    let d = TempDir::new("ctl-under-load");
    let s = LvStore::create_dir(d.path(), "lvs", opts()).unwrap();
    s.set_reactor(Some(reactor()));
    s.create_lvol("vol", 8 * MIB, true).unwrap();
    let vol = s.bdev("vol").unwrap();
    let n = vol.num_blocks();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2u64)
        .map(|w| {
            let (vol, stop) = (vol.clone(), stop.clone());
            std::thread::spawn(move || {
                // this thread owns blocks b with b % 2 == w
                let mut model = vec![0u32; n as usize];
                let (tx, rx) = mpsc::channel();
                let sink: Arc<dyn IoSink> = Arc::new(Chan(Mutex::new(tx)));
                let mut tag = (w as u32 + 1) << 24;
                let mut rounds = 0;
                while !stop.load(Ordering::SeqCst) || rounds < 20 {
                    rounds += 1;
                    let mut targets = vec![];
                    for k in 0..8u64 {
                        tag += 1;
                        let b = ((tag as u64 * 2654435761 + k) % (n / 2)) * 2 + w;
                        if targets.contains(&b) {
                            continue;
                        }
                        targets.push(b);
                        let io =
                            BdevIo::write(b, 1, IoBuf::from_slice(&pattern(tag, b, BS)), false);
                        vol.submit(io, Completion::new(sink.clone(), tag as u64));
                    }
                    for _ in 0..targets.len() {
                        let (t, io, r) =
                            rx.recv_timeout(std::time::Duration::from_secs(20)).unwrap();
                        r.unwrap();
                        model[io.offset_blocks as usize] = t as u32;
                    }
                    for (k, &b) in targets.iter().enumerate() {
                        vol.submit(
                            BdevIo::read(b, 1, IoBuf::zeroed(BS)),
                            Completion::new(sink.clone(), k as u64),
                        );
                    }
                    for _ in 0..targets.len() {
                        let (_, io, r) =
                            rx.recv_timeout(std::time::Duration::from_secs(20)).unwrap();
                        r.unwrap();
                        let b = io.offset_blocks;
                        assert_eq!(
                            &io.buf[..],
                            &pattern(model[b as usize], b, BS)[..],
                            "block {b}"
                        );
                    }
                }
                model
            })
        })
        .collect();
    for i in 0..12 {
        s.snapshot("vol", &format!("s{i}")).unwrap();
        if i >= 2 {
            // merge the oldest snapshot into the next one, or into the head
            let oldest = s.chain("vol").unwrap().last().unwrap().name.clone();
            s.delete(&oldest).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    stop.store(true, Ordering::SeqCst);
    let models: Vec<Vec<u32>> = workers.into_iter().map(|t| t.join().unwrap()).collect();
    let all = read(&*vol, 0, n).unwrap();
    for b in 0..n {
        let want = models[(b % 2) as usize][b as usize];
        assert_eq!(
            &all[(b as usize) * BS..(b as usize + 1) * BS],
            &pattern(want, b, BS)[..],
            "block {b}"
        );
    }
    assert_eq!(s.chain("vol").unwrap().len(), 3);
}
