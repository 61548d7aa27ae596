//! Crash consistency, the way redb tests it: random operations run against the
//! store on [`FaultStorage`] and against a trivially correct model (for each
//! lvol: its shape and, per block, the value a reader must see). At random
//! points power fails — between operations or at any step inside one — the
//! storage keeps what was made durable plus an arbitrary subset of the rest
//! (writes torn at 512 bytes), the store is reopened and compared with the
//! model: its shape must be the one before or after the interrupted operation,
//! and every block must read a value acknowledged durable, or one written since.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bdev::IoError;
use common::*;
use lvol::fault::FaultStorage;
use lvol::{CreateOpts, LvStore, LvolBdev};
use proptest::prelude::*;

const BS: usize = 512;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB; // 98304 blocks: three map pages
/// Write targets: four narrow regions, three of them across map-page edges.
const REGIONS: [u64; 4] = [0, 32_740, 65_520, 98_200];

#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    parent: Option<String>,
    snapshot: bool,
    num_blocks: u64,
}

#[derive(Debug, Clone)]
struct MVol {
    shape: Shape,
    /// Value as of the last flush (absent = zero).
    durable: BTreeMap<u64, u32>,
    /// Values written since, oldest first.
    pending: BTreeMap<u64, Vec<u32>>,
}

impl MVol {
    fn new(num_blocks: u64, parent: Option<String>, snapshot: bool) -> MVol {
        MVol {
            shape: Shape {
                parent,
                snapshot,
                num_blocks,
            },
            durable: BTreeMap::new(),
            pending: BTreeMap::new(),
        }
    }
    fn current(&self, b: u64) -> u32 {
        match self.pending.get(&b).and_then(|v| v.last()) {
            Some(&t) => t,
            None => self.durable.get(&b).copied().unwrap_or(0),
        }
    }
    fn acceptable(&self, b: u64) -> Vec<u32> {
        let mut v = vec![self.durable.get(&b).copied().unwrap_or(0)];
        v.extend(self.pending.get(&b).into_iter().flatten());
        v
    }
    fn exact(&self) -> BTreeMap<u64, u32> {
        let mut m = BTreeMap::new();
        for &b in self.durable.keys().chain(self.pending.keys()) {
            let t = self.current(b);
            if t != 0 {
                m.insert(b, t);
            }
        }
        m
    }
    fn collapse(&mut self) {
        self.durable = self.exact();
        self.pending.clear();
    }
    fn keys(&self) -> Vec<u64> {
        let mut k: Vec<u64> = self
            .durable
            .keys()
            .chain(self.pending.keys())
            .copied()
            .collect();
        k.sort();
        k.dedup();
        k
    }
}

#[derive(Debug, Clone, Default)]
struct Model {
    vols: BTreeMap<String, MVol>,
    next: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    Errno(i32),
    Io(IoError),
}

#[derive(Debug, Clone)]
enum Op {
    Create,
    Write {
        v: usize,
        r: usize,
        off: u64,
        len: u64,
    },
    Zero {
        v: usize,
        r: usize,
        off: u64,
        len: u64,
        unmap: bool,
    },
    Flush {
        v: usize,
    },
    Snapshot {
        v: usize,
    },
    Clone {
        v: usize,
    },
    Revert {
        v: usize,
        s: usize,
    },
    Delete {
        v: usize,
    },
    Resize {
        v: usize,
    },
    DropBdevs,
    Crash {
        seed: u64,
        keep: u8,
    },
    CrashDuring {
        op: Box<Op>,
        budget: u8,
        seed: u64,
        keep: u8,
    },
}

impl Op {
    fn is_data(&self) -> bool {
        matches!(self, Op::Write { .. } | Op::Zero { .. } | Op::Flush { .. })
    }
}

fn keep_prob(k: u8) -> f64 {
    [0.0, 0.5, 1.0][k as usize % 3]
}

impl Model {
    fn names(&self) -> Vec<String> {
        self.vols.keys().cloned().collect()
    }
    fn pick(&self, v: usize) -> Option<String> {
        let n = self.names();
        if n.is_empty() {
            None
        } else {
            Some(n[v % n.len()].clone())
        }
    }
    fn children(&self, name: &str) -> Vec<String> {
        self.vols
            .iter()
            .filter(|(_, m)| m.shape.parent.as_deref() == Some(name))
            .map(|(n, _)| n.clone())
            .collect()
    }
    fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }

    /// Applies `op` as the store should and says what the store must answer.
    /// `name` is the lvol the op works on, resolved by the caller.
    fn apply(&mut self, op: &Op) -> Outcome {
        use Outcome::*;
        match op {
            Op::Create => {
                let n = self.fresh("v");
                self.vols
                    .insert(n, MVol::new(SIZE / BS as u64, None, false));
                Ok
            }
            Op::Write { v, r, off, len } | Op::Zero { v, r, off, len, .. } => {
                let Some(n) = self.pick(*v) else { return Ok };
                let tag = if matches!(op, Op::Write { .. }) {
                    self.next += 1;
                    self.next
                } else {
                    0
                };
                let m = self.vols.get_mut(&n).unwrap();
                if m.shape.snapshot {
                    return Io(IoError::ReadOnly);
                }
                let b0 = REGIONS[r % 4] + off;
                for b in b0..b0 + len {
                    m.pending.entry(b).or_default().push(tag);
                }
                Ok
            }
            Op::Flush { v } => {
                if let Some(n) = self.pick(*v) {
                    self.vols.get_mut(&n).unwrap().collapse();
                }
                Ok
            }
            Op::Snapshot { v } => {
                let Some(n) = self.pick(*v) else { return Ok };
                if self.vols[&n].shape.snapshot {
                    return Errno(libc::EINVAL);
                }
                let s = self.fresh("s");
                let h = self.vols.get_mut(&n).unwrap();
                h.collapse();
                let mut snap = h.clone();
                snap.shape.snapshot = true;
                h.shape.parent = Some(s.clone());
                self.vols.insert(s, snap);
                Ok
            }
            Op::Clone { v } => {
                let Some(n) = self.pick(*v) else { return Ok };
                if !self.vols[&n].shape.snapshot {
                    return Errno(libc::EINVAL);
                }
                let c = self.fresh("c");
                let mut m = self.vols[&n].clone();
                m.shape = Shape {
                    parent: Some(n),
                    snapshot: false,
                    num_blocks: m.shape.num_blocks,
                };
                self.vols.insert(c, m);
                Ok
            }
            Op::Revert { v, s } => {
                let Some(n) = self.pick(*v) else { return Ok };
                let Some(sn) = self.pick(*s) else { return Ok };
                if self.vols[&n].shape.snapshot {
                    return Errno(libc::EPERM);
                }
                let mut cur = self.vols[&n].shape.parent.clone();
                let mut found = false;
                while let Some(p) = cur {
                    if p == sn {
                        found = true;
                        break;
                    }
                    cur = self.vols[&p].shape.parent.clone();
                }
                if !found {
                    return Errno(libc::EINVAL);
                }
                let snap = self.vols[&sn].clone();
                let h = self.vols.get_mut(&n).unwrap();
                h.durable = snap.exact();
                h.pending.clear();
                h.shape.parent = Some(sn);
                Ok
            }
            Op::Delete { v } => {
                let Some(n) = self.pick(*v) else { return Ok };
                let kids = self.children(&n);
                if kids.len() > 1 {
                    return Errno(libc::EPERM);
                }
                let gone = self.vols.remove(&n).unwrap();
                if let Some(k) = kids.first() {
                    self.vols.get_mut(k).unwrap().shape.parent = gone.shape.parent;
                }
                Ok
            }
            Op::Resize { v } => {
                let Some(n) = self.pick(*v) else { return Ok };
                let m = self.vols.get_mut(&n).unwrap();
                if m.shape.snapshot {
                    return Errno(libc::EPERM);
                }
                m.shape.num_blocks += MIB / BS as u64;
                Ok
            }
            Op::DropBdevs | Op::Crash { .. } | Op::CrashDuring { .. } => Ok,
        }
    }
}

struct Harness {
    fs: FaultStorage,
    store: LvStore,
    bdevs: HashMap<String, Arc<LvolBdev>>,
    model: Model,
}

fn decode(block: &[u8], b: u64) -> u32 {
    if block.iter().all(|&x| x == 0) {
        return 0;
    }
    let tag = u32::from_le_bytes(block[..4].try_into().unwrap());
    assert_eq!(
        block,
        &pattern(tag, b, BS)[..],
        "block {b} holds neither zeroes nor a written pattern"
    );
    tag
}

impl Harness {
    fn new() -> Harness {
        let fs = FaultStorage::new(512);
        let store = LvStore::create(
            Arc::new(fs.clone()),
            "lvs",
            CreateOpts {
                block_size: 512,
                cluster_size: MIB,
            },
        )
        .unwrap();
        Harness {
            fs,
            store,
            bdevs: HashMap::new(),
            model: Model::default(),
        }
    }

    fn bdev(&mut self, name: &str) -> Result<Arc<LvolBdev>, i32> {
        if let Some(b) = self.bdevs.get(name) {
            return Ok(b.clone());
        }
        let b = self.store.bdev(name).map_err(|e| e.errno())?;
        self.bdevs.insert(name.to_string(), b.clone());
        Ok(b)
    }

    /// Runs `op` on the store. `model` is the model before the op (to resolve
    /// names the same way).
    fn run(&mut self, op: &Op, model: &Model) -> Outcome {
        let res = |r: lvol::Result<()>| match r {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::Errno(e.errno()),
        };
        let io = |r: Result<(), IoError>| match r {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::Io(e),
        };
        let mut m = model.clone();
        match op {
            Op::Create => {
                let n = m.fresh("v");
                res(self.store.create_lvol(&n, SIZE, true).map(|_| ()))
            }
            Op::Write { v, r, off, len } => {
                let Some(n) = m.pick(*v) else {
                    return Outcome::Ok;
                };
                m.next += 1;
                let tag = m.next;
                let b0 = REGIONS[r % 4] + off;
                let data: Vec<u8> = (b0..b0 + len).flat_map(|b| pattern(tag, b, BS)).collect();
                match self.bdev(&n) {
                    Ok(b) => io(write(&*b, b0, &data)),
                    Err(e) => Outcome::Errno(e),
                }
            }
            Op::Zero {
                v,
                r,
                off,
                len,
                unmap: u,
            } => {
                let Some(n) = m.pick(*v) else {
                    return Outcome::Ok;
                };
                let b0 = REGIONS[r % 4] + off;
                match self.bdev(&n) {
                    Ok(b) if *u => io(unmap(&*b, b0, *len)),
                    Ok(b) => io(zeroes(&*b, b0, *len)),
                    Err(e) => Outcome::Errno(e),
                }
            }
            Op::Flush { v } => {
                let Some(n) = m.pick(*v) else {
                    return Outcome::Ok;
                };
                match self.bdev(&n) {
                    Ok(b) => io(flush(&*b)),
                    Err(e) => Outcome::Errno(e),
                }
            }
            Op::Snapshot { v } => {
                let Some(n) = m.pick(*v) else {
                    return Outcome::Ok;
                };
                let s = m.fresh("s");
                res(self.store.snapshot(&n, &s).map(|_| ()))
            }
            Op::Clone { v } => {
                let Some(n) = m.pick(*v) else {
                    return Outcome::Ok;
                };
                let c = m.fresh("c");
                res(self.store.clone_snapshot(&n, &c).map(|_| ()))
            }
            Op::Revert { v, s } => {
                let (Some(n), Some(sn)) = (m.pick(*v), m.pick(*s)) else {
                    return Outcome::Ok;
                };
                res(self.store.revert(&n, &sn))
            }
            Op::Delete { v } => {
                let Some(n) = m.pick(*v) else {
                    return Outcome::Ok;
                };
                let r = res(self.store.delete(&n));
                if r == Outcome::Ok {
                    self.bdevs.remove(&n);
                }
                r
            }
            Op::Resize { v } => {
                let Some(n) = m.pick(*v) else {
                    return Outcome::Ok;
                };
                let cur = m.vols[&n].shape.num_blocks * BS as u64;
                res(self.store.resize(&n, cur + MIB))
            }
            Op::DropBdevs => {
                self.bdevs.clear();
                Outcome::Ok
            }
            Op::Crash { .. } | Op::CrashDuring { .. } => unreachable!(),
        }
    }

    /// Power fails now; reopens and checks against `candidates` (models of the
    /// states the store may be in), adopting what it reads as the new model.
    fn crash(&mut self, seed: u64, keep: u8, candidates: &[&Model]) {
        self.bdevs.clear();
        let fs = self.fs.power_loss(seed, keep_prob(keep));
        self.fs = fs;
        self.store =
            LvStore::open(Arc::new(self.fs.clone()), None).expect("store reopens after power loss");
        let shapes: BTreeMap<String, Shape> = self
            .store
            .lvols()
            .unwrap()
            .into_iter()
            .map(|i| {
                (
                    i.name,
                    Shape {
                        parent: i.base_snapshot,
                        snapshot: i.is_snapshot,
                        num_blocks: i.num_blocks,
                    },
                )
            })
            .collect();
        // Shapes can coincide (a revert keeps the shape): then the data decides.
        let same_shape: Vec<&&Model> = candidates
            .iter()
            .filter(|m| {
                m.vols
                    .iter()
                    .map(|(n, v)| (n.clone(), v.shape.clone()))
                    .collect::<BTreeMap<_, _>>()
                    == shapes
            })
            .collect();
        assert!(
            !same_shape.is_empty(),
            "after the crash the store has {shapes:#?}, none of {candidates:#?}"
        );
        let mut failures = vec![];
        let mut adopted = None;
        for cand in same_shape {
            match self.check_data(cand) {
                Ok(m) => {
                    adopted = Some(m);
                    break;
                }
                Err(e) => failures.push(e),
            }
        }
        let model = adopted.unwrap_or_else(|| panic!("no candidate state matches: {failures:?}"));
        self.model = model;
    }

    /// Checks every touched block against `cand`; returns the model with what
    /// was read adopted as durable, or the first mismatch.
    fn check_data(&self, cand: &Model) -> Result<Model, String> {
        let mut model = cand.clone();
        for (name, vol) in model.vols.iter_mut() {
            let b = self.store.bdev(name).unwrap();
            let mut keys = vol.keys();
            keys.extend([0, 32_768, vol.shape.num_blocks - 1]);
            for k in keys {
                let got = decode(&read(&*b, k, 1).unwrap(), k);
                let ok = vol.acceptable(k);
                if !ok.contains(&got) {
                    return Err(format!("{name} block {k}: read {got}, acceptable {ok:?}"));
                }
                if got == 0 {
                    vol.durable.remove(&k);
                } else {
                    vol.durable.insert(k, got);
                }
            }
            vol.pending.clear();
        }
        Ok(model)
    }

    fn verify_exact(&mut self) {
        let model = self.model.clone();
        for (name, vol) in &model.vols {
            let b = self.bdev(name).unwrap();
            for (k, want) in vol.keys().into_iter().map(|k| (k, vol.current(k))) {
                assert_eq!(
                    decode(&read(&*b, k, 1).unwrap(), k),
                    want,
                    "{name} block {k}"
                );
            }
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Crash { seed, keep } => {
                let m = self.model.clone();
                self.crash(*seed, *keep, &[&m]);
            }
            Op::CrashDuring {
                op,
                budget,
                seed,
                keep,
            } => {
                if matches!(**op, Op::Crash { .. } | Op::CrashDuring { .. }) {
                    return;
                }
                let before = self.model.clone();
                let mut after = before.clone();
                let expect = after.apply(op);
                self.fs.set_budget(Some(*budget as u64));
                let got = self.run(op, &before);
                let died = self.fs.is_dead();
                if !died {
                    assert_eq!(got, expect, "{op:?}");
                }
                if op.is_data() {
                    // Write/zero: the superset of acceptable values is `after`;
                    // flush: `before` (nothing more became certain).
                    let m = if matches!(**op, Op::Flush { .. }) {
                        before
                    } else {
                        after
                    };
                    self.crash(*seed, *keep, &[&m]);
                } else if !died && got == Outcome::Ok {
                    self.crash(*seed, *keep, &[&after]);
                } else {
                    self.crash(*seed, *keep, &[&before, &after]);
                }
            }
            op => {
                let before = self.model.clone();
                let expect = self.model.apply(op);
                let got = self.run(op, &before);
                assert_eq!(got, expect, "{op:?}");
                self.verify_exact();
            }
        }
    }
}

fn plain_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Create),
        12 => (0..8usize, 0..4usize, 0..24u64, 1..8u64).prop_map(|(v, r, off, len)| Op::Write { v, r, off, len }),
        5 => (0..8usize, 0..4usize, 0..24u64, 1..12u64, any::<bool>())
            .prop_map(|(v, r, off, len, unmap)| Op::Zero { v, r, off, len, unmap }),
        4 => (0..8usize).prop_map(|v| Op::Flush { v }),
        4 => (0..8usize).prop_map(|v| Op::Snapshot { v }),
        2 => (0..8usize).prop_map(|v| Op::Clone { v }),
        2 => (0..8usize, 0..8usize).prop_map(|(v, s)| Op::Revert { v, s }),
        2 => (0..8usize).prop_map(|v| Op::Delete { v }),
        1 => (0..8usize).prop_map(|v| Op::Resize { v }),
        1 => Just(Op::DropBdevs),
    ]
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => plain_op(),
        1 => (any::<u64>(), 0..3u8).prop_map(|(seed, keep)| Op::Crash { seed, keep }),
        3 => (plain_op(), 0..40u8, any::<u64>(), 0..3u8)
            .prop_map(|(op, budget, seed, keep)| Op::CrashDuring { op: Box::new(op), budget, seed, keep }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 2000, .. ProptestConfig::default() })]
    #[test]
    fn power_loss_at_any_point_keeps_a_consistent_store(ops in proptest::collection::vec(any_op(), 1..60)) {
        let mut h = Harness::new();
        h.step(&Op::Create);
        for op in &ops {
            h.step(op);
        }
        // and a final power loss dropping everything unflushed
        let m = h.model.clone();
        h.crash(1, 0, &[&m]);
        h.verify_exact();
    }
}

/// Table-driven: every metadata operation, interrupted at every one of its
/// steps in turn, with unsynced work dropped, kept, or half kept.
#[test]
fn every_step_of_every_operation() {
    let setup = |h: &mut Harness| {
        for op in [
            Op::Create,
            Op::Write {
                v: 0,
                r: 0,
                off: 0,
                len: 8,
            },
            Op::Write {
                v: 0,
                r: 1,
                off: 10,
                len: 40,
            },
            Op::Snapshot { v: 0 }, // s3, v1 on top
            Op::Write {
                v: 0,
                r: 1,
                off: 20,
                len: 4,
            },
            Op::Zero {
                v: 1,
                r: 0,
                off: 2,
                len: 3,
                unmap: false,
            },
            Op::Zero {
                v: 1,
                r: 1,
                off: 30,
                len: 4,
                unmap: true,
            },
            Op::Snapshot { v: 1 }, // v1 -> s5 -> s3
            Op::Write {
                v: 0,
                r: 2,
                off: 0,
                len: 8,
            },
        ] {
            h.step(&op);
        }
    };
    // names after setup, sorted: s3, s5, v1
    let ops = [
        Op::Snapshot { v: 2 },
        Op::Clone { v: 0 },
        Op::Revert { v: 2, s: 0 },
        Op::Delete { v: 0 }, // merge s3 into s5
        Op::Delete { v: 1 }, // merge s5 into v1 (the head)
        Op::Delete { v: 2 }, // the head
        Op::Resize { v: 2 },
        Op::Create,
        Op::Flush { v: 2 },
    ];
    for op in ops {
        let mut probe = Harness::new();
        setup(&mut probe);
        let start = probe.fs.op_count();
        let m = probe.model.clone();
        assert_eq!(probe.run(&op, &m), Outcome::Ok, "{op:?}");
        let steps = probe.fs.op_count() - start;
        for keep in 0..3u8 {
            for budget in 0..=steps {
                let mut h = Harness::new();
                setup(&mut h);
                h.step(&Op::CrashDuring {
                    op: Box::new(op.clone()),
                    budget: budget as u8,
                    seed: budget,
                    keep,
                });
                h.verify_exact();
            }
        }
    }
}

/// Found by the property test: a revert interrupted after its commit leaves the
/// same shape as before it, so the checker must tell the two apart by data.
#[test]
fn regression_interrupted_revert_keeps_shape() {
    let mut h = Harness::new();
    h.step(&Op::Create);
    for op in [
        Op::CrashDuring {
            op: Box::new(Op::Snapshot { v: 0 }),
            budget: 11,
            seed: 0,
            keep: 2,
        },
        Op::Write {
            v: 1,
            r: 0,
            off: 0,
            len: 1,
        },
        Op::Flush { v: 1 },
        Op::CrashDuring {
            op: Box::new(Op::Revert { v: 5, s: 6 }),
            budget: 11,
            seed: 0,
            keep: 2,
        },
    ] {
        h.step(&op);
    }
    h.verify_exact();
}
