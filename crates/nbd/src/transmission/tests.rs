use std::collections::HashMap;
use std::sync::Arc;

use bdev::malloc::MallocBdev;
use bdev::{Bdev, Completion, IoSink};
use parking_lot::Mutex;
use proptest::prelude::*;

use super::*;
use crate::export::{Export, ExportOptions};

const BS: u32 = 512;
const BLOCKS: u64 = 4096; // 2 MiB

type Done = (u64, BdevIo, Result<(), IoError>);

#[derive(Default)]
struct VecSink(Mutex<Vec<Done>>);

impl IoSink for VecSink {
    fn complete(&self, tag: u64, io: BdevIo, result: Result<(), IoError>) {
        self.0.lock().push((tag, io, result));
    }
}

/// A bdev that fails every I/O with a chosen error.
struct FailBdev(IoError);

impl Bdev for FailBdev {
    fn name(&self) -> &str {
        "fail"
    }
    fn block_size(&self) -> u32 {
        BS
    }
    fn num_blocks(&self) -> u64 {
        BLOCKS
    }
    fn uuid(&self) -> uuid::Uuid {
        uuid::Uuid::nil()
    }
    fn product_name(&self) -> &'static str {
        "fail"
    }
    fn supports(&self, _kind: IoKind) -> bool {
        true
    }
    fn submit(&self, io: BdevIo, done: Completion) {
        done.complete(io, Err(self.0.clone()))
    }
}

struct Harness {
    tx: Transmission,
    bdev: BdevRef,
    sink: Arc<VecSink>,
    actions: Vec<Submit>,
    /// Lengths of reads by handle, to parse simple replies.
    reads: HashMap<u64, u32>,
}

fn harness_with(bdev: BdevRef, opts: ExportOptions, structured: bool, base: bool) -> Harness {
    harness_limits(bdev, opts, structured, base, TxLimits::default())
}

fn harness_limits(
    bdev: BdevRef,
    opts: ExportOptions,
    structured: bool,
    base: bool,
    limits: TxLimits,
) -> Harness {
    let e = Arc::new(Export::new("e", bdev.clone(), opts).unwrap());
    let neg = Negotiated {
        tx_flags: e.tx_flags(structured),
        size: e.size(),
        export: e,
        structured,
        base_allocation: base,
        block_size_requested: true,
    };
    Harness {
        tx: Transmission::new(&neg, limits),
        bdev,
        sink: Arc::new(VecSink::default()),
        actions: Vec::new(),
        reads: HashMap::new(),
    }
}

fn malloc() -> BdevRef {
    Arc::new(MallocBdev::new("m", BLOCKS, BS, None).unwrap())
}

fn harness(structured: bool) -> Harness {
    harness_with(malloc(), ExportOptions::default(), structured, structured)
}

fn req(kind: u16, flags: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut v = Vec::new();
    Request {
        flags,
        kind,
        handle,
        offset,
        length,
    }
    .encode(&mut v);
    v
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rep {
    Simple {
        handle: u64,
        error: u32,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        kind: u16,
        handle: u64,
        payload: Vec<u8>,
    },
}

impl Rep {
    fn handle(&self) -> u64 {
        match self {
            Rep::Simple { handle, .. } | Rep::Chunk { handle, .. } => *handle,
        }
    }
    /// The error a reply carries (0 for success).
    fn error(&self) -> u32 {
        match self {
            Rep::Simple { error, .. } => *error,
            Rep::Chunk { kind, payload, .. } if kind & 0x8000 != 0 => be32(payload),
            Rep::Chunk { .. } => 0,
        }
    }
    /// Read data (simple data or an OFFSET_DATA chunk's data).
    fn data(&self) -> &[u8] {
        match self {
            Rep::Simple { data, .. } => data,
            Rep::Chunk { kind, payload, .. } if *kind == REPLY_TYPE_OFFSET_DATA => &payload[8..],
            Rep::Chunk { .. } => &[],
        }
    }
}

impl Harness {
    fn feed(&mut self, b: &[u8]) -> usize {
        for h in parse_handles_reads(b) {
            self.reads.insert(h.0, h.1);
        }
        self.tx.on_bytes(b, &mut self.actions)
    }
    /// Submits pending actions to the bdev and feeds completions back, until quiet.
    fn run(&mut self) {
        loop {
            for a in self.actions.drain(..) {
                self.bdev
                    .submit(a.io, Completion::new(self.sink.clone(), a.tag));
            }
            let done: Vec<_> = std::mem::take(&mut *self.sink.0.lock());
            if done.is_empty() {
                break;
            }
            for (tag, io, r) in done {
                self.tx.on_completion(tag, io, r, &mut self.actions);
            }
        }
    }
    fn replies(&mut self) -> Vec<Rep> {
        let out = self.tx.take_output();
        parse(&out, &self.reads)
    }
    fn exchange(&mut self, b: &[u8]) -> Vec<Rep> {
        assert_eq!(self.feed(b), b.len());
        self.run();
        self.replies()
    }
}

/// (handle, length) of the read requests in a byte string of requests.
fn parse_handles_reads(mut b: &[u8]) -> Vec<(u64, u32)> {
    let mut v = Vec::new();
    while b.len() >= REQUEST_LEN && be32(b) == REQUEST_MAGIC {
        let kind = be16(&b[6..]);
        let len = be32(&b[24..]);
        if kind == CMD_READ {
            v.push((be64(&b[8..]), len));
        }
        let skip = REQUEST_LEN + if kind == CMD_WRITE { len as usize } else { 0 };
        b = &b[skip.min(b.len())..];
    }
    v
}

fn parse(mut b: &[u8], reads: &HashMap<u64, u32>) -> Vec<Rep> {
    let mut v = Vec::new();
    while !b.is_empty() {
        match be32(b) {
            SIMPLE_REPLY_MAGIC => {
                let error = be32(&b[4..]);
                let handle = be64(&b[8..]);
                let dlen = if error == 0 {
                    reads.get(&handle).copied().unwrap_or(0) as usize
                } else {
                    0
                };
                v.push(Rep::Simple {
                    handle,
                    error,
                    data: b[16..16 + dlen].to_vec(),
                });
                b = &b[16 + dlen..];
            }
            STRUCTURED_REPLY_MAGIC => {
                let len = be32(&b[16..]) as usize;
                v.push(Rep::Chunk {
                    flags: be16(&b[4..]),
                    kind: be16(&b[6..]),
                    handle: be64(&b[8..]),
                    payload: b[20..20 + len].to_vec(),
                });
                b = &b[20 + len..];
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }
    v
}

fn write_req(handle: u64, offset: u64, data: &[u8], flags: u16) -> Vec<u8> {
    let mut v = req(CMD_WRITE, flags, handle, offset, data.len() as u32);
    v.extend_from_slice(data);
    v
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn write_then_read_simple_and_structured() {
    for structured in [false, true] {
        let mut h = harness(structured);
        let data = pattern(8192, 3);
        let r = h.exchange(&write_req(1, 4096, &data, CMD_FLAG_FUA));
        assert_eq!(
            r,
            vec![Rep::Simple {
                handle: 1,
                error: 0,
                data: vec![]
            }]
        );
        let r = h.exchange(&req(CMD_READ, 0, 2, 4096, 8192));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].handle(), 2);
        assert_eq!(r[0].error(), 0);
        assert_eq!(r[0].data(), &data[..]);
        if structured {
            let Rep::Chunk {
                flags,
                kind,
                payload,
                ..
            } = &r[0]
            else {
                panic!("{:?}", r[0])
            };
            assert_eq!((*flags, *kind), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
            assert_eq!(be64(payload), 4096);
        }
        // Zero-length read and write: answered, never disconnect.
        let r = h.exchange(&[req(CMD_READ, 0, 3, 0, 0), req(CMD_WRITE, 0, 4, 0, 0)].concat());
        assert_eq!(r.iter().map(Rep::error).collect::<Vec<_>>(), vec![0, 0]);
        if structured {
            assert!(matches!(
                r[0],
                Rep::Chunk {
                    kind: REPLY_TYPE_NONE,
                    flags: REPLY_FLAG_DONE,
                    ..
                }
            ));
        }
        let s = h.tx.stats();
        assert_eq!((s.bytes_written, s.bytes_read, s.errors), (8192, 8192, 0));
    }
}

#[test]
fn pipelined_replies_follow_completion_order() {
    let mut h = harness(true);
    let mut b = Vec::new();
    for i in 0..8u64 {
        b.extend(write_req(100 + i, i * 512, &[i as u8; 512], 0));
    }
    for i in 0..8u64 {
        b.extend(req(CMD_READ, 0, 200 + i, i * 512, 512));
    }
    assert_eq!(h.feed(&b), b.len());
    // Writes first, in reverse; then reads, in reverse.
    let mut acts: Vec<Submit> = h.actions.drain(..).collect();
    assert_eq!(acts.len(), 16);
    assert_eq!(h.tx.executing(), 16);
    let reads = acts.split_off(8);
    for a in acts.into_iter().rev().chain(reads.into_iter().rev()) {
        h.bdev.submit(a.io, Completion::new(h.sink.clone(), a.tag));
    }
    let done: Vec<_> = std::mem::take(&mut *h.sink.0.lock());
    for (tag, io, r) in done {
        h.tx.on_completion(tag, io, r, &mut h.actions);
    }
    let r = h.replies();
    let handles: Vec<u64> = r.iter().map(Rep::handle).collect();
    let want: Vec<u64> = (100..108).rev().chain((200..208).rev()).collect();
    assert_eq!(handles, want);
    for rep in &r[8..] {
        let i = rep.handle() - 200;
        assert_eq!(rep.data(), &[i as u8; 512][..]);
    }
    assert_eq!(h.tx.executing(), 0);
}

#[test]
fn bad_requests_get_errors_and_connection_goes_on() {
    for structured in [false, true] {
        let mut h = harness(structured);
        let end = BLOCKS * BS as u64;
        let cases: Vec<(Vec<u8>, Errno)> = vec![
            (req(CMD_READ, 0, 1, end - 512, 1024), Errno::Inval),
            (req(CMD_READ, 0, 2, u64::MAX - 511, 1024), Errno::Inval),
            (write_req(3, end, &[1; 512], 0), Errno::NoSpc),
            (req(CMD_WRITE_ZEROES, 0, 4, end - 512, 1024), Errno::NoSpc),
            (req(CMD_TRIM, 0, 5, end, 512), Errno::Inval),
            (req(CMD_READ, 0, 6, 100, 512), Errno::Inval),
            (req(CMD_READ, 0, 7, 0, 100), Errno::Inval),
            (write_req(8, 1, &[1; 512], 0), Errno::Inval),
            (req(0x1234, 0, 9, 0, 512), Errno::Inval),
            (req(CMD_CACHE, 0, 10, 0, 512), Errno::Inval),
            (req(CMD_READ, CMD_FLAG_NO_HOLE, 11, 0, 512), Errno::Inval),
            (req(CMD_WRITE_ZEROES, 1 << 9, 12, 0, 512), Errno::Inval),
            (
                req(CMD_READ, 0, 13, 0, DEFAULT_MAX_PAYLOAD + 512),
                Errno::Inval,
            ),
            (
                req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 14, 0, 512),
                Errno::NotSup,
            ),
        ];
        for (b, err) in cases {
            let handle = be64(&b[8..]);
            let r = h.exchange(&b);
            assert_eq!(r.len(), 1, "{r:?}");
            assert_eq!(r[0].handle(), handle);
            assert_eq!(r[0].error(), err.code(), "handle {handle}: {r:?}");
            if structured && handle != 13 {
                let Rep::Chunk {
                    kind,
                    flags,
                    payload,
                    ..
                } = &r[0]
                else {
                    panic!("{r:?}")
                };
                assert_eq!((*kind, *flags), (REPLY_TYPE_ERROR, REPLY_FLAG_DONE));
                let mlen = be16(&payload[4..]) as usize;
                assert_eq!(payload.len(), 6 + mlen);
                assert!(mlen > 0);
            }
            assert_eq!(h.tx.mode(), Mode::Running);
        }
        // Block status: without a context (structured=false harness has none) EINVAL.
        if !structured {
            let r = h.exchange(&req(CMD_BLOCK_STATUS, 0, 20, 0, 512));
            assert_eq!(r[0].error(), Errno::Inval.code());
        }
        // Still works.
        let r = h.exchange(&write_req(30, 0, &[9; 1024], 0));
        assert_eq!(r[0].error(), 0);
        let r = h.exchange(&req(CMD_READ, 0, 31, 0, 1024));
        assert_eq!(r[0].data(), &[9; 1024][..]);
        assert_eq!(h.tx.stats().errors, if structured { 14 } else { 15 });
    }
}

#[test]
fn oversized_write_is_skipped_in_pieces() {
    let mut h = harness(true);
    let len = 64u32 << 20; // twice the maximum payload
    let hdr = req(CMD_WRITE, 0, 77, 0, len);
    assert_eq!(h.feed(&hdr), REQUEST_LEN);
    assert!(h.actions.is_empty());
    assert_eq!(h.tx.mem_in_use, 0);
    let chunk = vec![0xEEu8; 1 << 20];
    for _ in 0..64 {
        assert_eq!(
            h.tx.pending_output(),
            0,
            "no reply before the payload is skipped"
        );
        assert_eq!(h.feed(&chunk), chunk.len());
        assert_eq!(h.tx.mem_in_use, 0);
    }
    let r = h.replies();
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].handle(), r[0].error()), (77, Errno::Inval.code()));
    // The skipped bytes were not taken as requests, and the next one works.
    let r = h.exchange(&write_req(78, 512, &[5; 512], 0));
    assert_eq!(r[0].error(), 0);
    let r = h.exchange(&req(CMD_READ, 0, 79, 0, 1024));
    assert_eq!(r[0].data()[..512], [0; 512]);
    assert_eq!(r[0].data()[512..], [5; 512]);
}

#[test]
fn bad_magic_fails_the_connection() {
    let mut h = harness(false);
    let mut b = req(CMD_READ, 0, 1, 0, 512);
    b[0] = 0;
    assert_eq!(h.feed(&b), 0);
    assert!(matches!(h.tx.mode(), Mode::Failed(_)));
    assert!(h.tx.is_finished());
    assert!(!h.tx.wants_input());
}

#[test]
fn io_errors_are_mapped() {
    for (e, want) in [
        (IoError::NoSpace, Errno::NoSpc),
        (IoError::ReadOnly, Errno::Perm),
        (IoError::OutOfRange, Errno::Inval),
        (IoError::Media, Errno::Io),
        (IoError::Removed, Errno::Io),
    ] {
        for structured in [false, true] {
            let mut h = harness_with(
                Arc::new(FailBdev(e.clone())),
                ExportOptions::default(),
                structured,
                false,
            );
            let r =
                h.exchange(&[write_req(1, 0, &[1; 512], 0), req(CMD_READ, 0, 2, 0, 512)].concat());
            assert_eq!(r.len(), 2);
            for rep in &r {
                assert_eq!(rep.error(), want.code(), "{e:?}");
                assert!(rep.data().is_empty());
            }
            if structured {
                let Rep::Chunk { payload, .. } = &r[0] else {
                    panic!()
                };
                let mlen = be16(&payload[4..]) as usize;
                assert_eq!(
                    std::str::from_utf8(&payload[6..6 + mlen]).unwrap(),
                    e.to_string()
                );
            }
            assert_eq!(h.tx.mem_in_use, 0);
        }
    }
}

#[test]
fn trim_zeroes_flush_fua_and_read_only() {
    let mut h = harness(true);
    h.exchange(&write_req(1, 0, &[7; 4096], 0));
    // write-zeroes with FUA: the op, then a flush, then one reply.
    assert_eq!(
        h.feed(&req(
            CMD_WRITE_ZEROES,
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            2,
            0,
            1024
        )),
        28
    );
    assert_eq!(h.actions.len(), 1);
    assert_eq!(h.actions[0].io.kind, IoKind::WriteZeroes);
    let a = h.actions.pop().unwrap();
    h.bdev.submit(a.io, Completion::new(h.sink.clone(), a.tag));
    let (tag, io, r) = h.sink.0.lock().pop().unwrap();
    h.tx.on_completion(tag, io, r, &mut h.actions);
    assert_eq!(h.tx.pending_output(), 0, "no reply before the flush");
    assert_eq!(h.actions.len(), 1);
    assert_eq!(h.actions[0].io.kind, IoKind::Flush);
    h.run();
    assert_eq!(h.replies()[0].error(), 0);
    let r = h.exchange(&[req(CMD_TRIM, 0, 3, 1024, 1024), req(CMD_FLUSH, 0, 4, 0, 0)].concat());
    assert_eq!(r.iter().map(Rep::error).collect::<Vec<_>>(), vec![0, 0]);
    let r = h.exchange(&req(CMD_READ, 0, 5, 0, 4096));
    let d = r[0].data();
    assert!(d[..2048].iter().all(|&b| b == 0));
    assert!(d[2048..].iter().all(|&b| b == 7));

    let ro = ExportOptions {
        read_only: true,
        ..Default::default()
    };
    let mut h = harness_with(malloc(), ro, false, false);
    let r = h.exchange(
        &[
            write_req(1, 0, &[1; 512], 0),
            req(CMD_TRIM, 0, 2, 0, 512),
            req(CMD_WRITE_ZEROES, 0, 3, 0, 512),
            req(CMD_READ, 0, 4, 0, 512),
            req(CMD_FLUSH, 0, 5, 0, 0),
        ]
        .concat(),
    );
    let errs: Vec<u32> = r.iter().map(Rep::error).collect();
    assert_eq!(errs, vec![1, 1, 1, 0, 0]);
    assert_eq!(r[3].data(), &[0; 512][..]);

    // Fast zero on a bdev said to zero fast.
    let fast = ExportOptions {
        fast_zero: true,
        ..Default::default()
    };
    let mut h = harness_with(malloc(), fast, true, false);
    let r = h.exchange(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 1, 0, 1 << 20));
    assert_eq!(r[0].error(), 0);
}

#[test]
fn block_status_reports_allocated_data() {
    let mut h = harness(true);
    for flags in [0, CMD_FLAG_REQ_ONE] {
        let r = h.exchange(&req(CMD_BLOCK_STATUS, flags, 5, 4096, 65536));
        let Rep::Chunk {
            flags,
            kind,
            handle,
            payload,
        } = &r[0]
        else {
            panic!("{r:?}")
        };
        assert_eq!(
            (*flags, *kind, *handle),
            (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 5)
        );
        assert_eq!(payload.len(), 12);
        assert_eq!(be32(payload), BASE_ALLOCATION_ID);
        assert_eq!(be32(&payload[4..]), 65536);
        assert_eq!(be32(&payload[8..]), 0);
    }
    let end = BLOCKS * BS as u64;
    let r = h.exchange(&req(CMD_BLOCK_STATUS, 0, 6, end - 512, 1024));
    assert_eq!(r[0].error(), Errno::Inval.code());
    let r = h.exchange(&req(CMD_BLOCK_STATUS, 0, 7, 0, 0));
    assert_eq!(r[0].error(), Errno::Inval.code());
}

#[test]
fn disconnect_finishes_in_flight_first() {
    let mut h = harness(false);
    let b = [
        req(CMD_READ, 0, 1, 0, 512),
        req(CMD_DISC, 0, 2, 0, 0),
        req(CMD_READ, 0, 3, 0, 512),
    ]
    .concat();
    // Everything after DISC is ignored.
    assert_eq!(h.feed(&b), 2 * REQUEST_LEN);
    assert_eq!(h.tx.mode(), Mode::Disconnecting);
    assert!(!h.tx.is_finished());
    assert!(!h.tx.wants_input());
    h.run();
    assert!(!h.tx.is_finished(), "reply not yet written");
    let r = h.replies();
    assert_eq!(r.len(), 1);
    assert!(h.tx.is_finished());
}

#[test]
fn drain_answers_new_requests_with_eshutdown() {
    let mut h = harness(true);
    assert_eq!(h.feed(&req(CMD_READ, 0, 1, 0, 512)), 28);
    h.tx.drain();
    assert!(!h.tx.is_finished());
    let b = [write_req(2, 0, &[1; 1024], 0), req(CMD_READ, 0, 3, 0, 512)].concat();
    assert_eq!(h.feed(&b), b.len());
    h.run();
    let r = h.replies();
    let got: HashMap<u64, u32> = r.iter().map(|x| (x.handle(), x.error())).collect();
    assert_eq!(got[&1], 0);
    assert_eq!(got[&2], Errno::Shutdown.code());
    assert_eq!(got[&3], Errno::Shutdown.code());
    assert!(h.tx.is_finished());
    // The refused write did not reach the bdev.
    let r = h.exchange(&req(CMD_READ, 0, 4, 0, 512));
    assert_eq!(r[0].error(), Errno::Shutdown.code());
}

#[test]
fn abort_answers_in_flight_with_eio() {
    let mut h = harness(false);
    let b = [req(CMD_READ, 0, 1, 0, 512), write_req(2, 0, &[1; 512], 0)].concat();
    assert_eq!(h.feed(&b), b.len());
    // A write whose payload is half there.
    let w = write_req(3, 512, &[2; 4096], 0);
    assert_eq!(h.feed(&w[..1000]), 1000);
    assert_eq!(h.tx.executing(), 2);
    let held: Vec<Submit> = h.actions.drain(..).collect();
    h.tx.abort();
    assert!(!h.tx.wants_input());
    let r = h.replies();
    let mut got: Vec<(u64, u32)> = r.iter().map(|x| (x.handle(), x.error())).collect();
    got.sort();
    assert_eq!(got, vec![(1, Errno::Io.code()), (2, Errno::Io.code())]);
    assert!(h.tx.is_finished());
    // Late completions are harmless and give the buffers back.
    for a in held {
        h.bdev.submit(a.io, Completion::new(h.sink.clone(), a.tag));
    }
    h.run();
    assert!(h.tx.take_output().is_empty());
    assert_eq!(h.tx.mem_in_use, 0);
    assert_eq!(h.tx.free.len(), h.tx.slots.len());
}

#[test]
fn limits_stall_input_and_resume() {
    let limits = TxLimits {
        max_payload: 1 << 20,
        max_requests: 4,
        buffer_budget: 8192,
    };
    let mut h = harness_limits(malloc(), ExportOptions::default(), false, false, limits);
    let mut b = Vec::new();
    for i in 0..10u64 {
        b.extend(req(CMD_READ, 0, i, 0, 4096));
    }
    // Budget 8 KiB: two 4 KiB reads are admitted.
    let n = h.feed(&b);
    assert_eq!(n, 2 * REQUEST_LEN);
    assert!(!h.tx.wants_input());
    let mut pos = n;
    let mut seen = 0;
    while pos < b.len() || h.tx.executing() > 0 || h.tx.pending_output() > 0 {
        h.run();
        seen += h.replies().len();
        assert!(h.tx.wants_input());
        pos += h.feed(&b[pos..]);
    }
    assert_eq!(seen, 10);
    // A single request larger than the budget still goes through.
    let r = h.exchange(&req(CMD_READ, 0, 50, 0, 65536));
    assert_eq!(r[0].data().len(), 65536);
    // Slot limit: flushes need no buffer, only slots.
    let mut b = Vec::new();
    for i in 0..6u64 {
        b.extend(req(CMD_FLUSH, 0, 100 + i, 0, 0));
    }
    assert_eq!(h.feed(&b), 4 * REQUEST_LEN);
}

#[test]
fn direct_payload_receive() {
    let mut h = harness(false);
    let data = pattern(65536, 9);
    let w = write_req(1, 0, &data, 0);
    // Header and a little payload staged, the rest read "straight from the socket".
    assert_eq!(h.feed(&w[..REQUEST_LEN + 100]), REQUEST_LEN + 100);
    let t = h.tx.payload_target().unwrap();
    assert_eq!(t.len(), 65536 - 100);
    t[..30000].copy_from_slice(&data[100..30100]);
    h.tx.payload_received(30000, &mut h.actions);
    let t = h.tx.payload_target().unwrap();
    t.copy_from_slice(&data[30100..]);
    let n = t.len();
    h.tx.payload_received(n, &mut h.actions);
    assert!(h.tx.payload_target().is_none());
    h.run();
    assert_eq!(h.replies()[0].error(), 0);
    let r = h.exchange(&req(CMD_READ, 0, 2, 0, 65536));
    assert_eq!(r[0].data(), &data[..]);
}

/// A mixed request stream: writes, reads, flushes, bad requests.
fn stream() -> Vec<u8> {
    let mut b = Vec::new();
    for i in 0..20u64 {
        let off = (i * 7 % 30) * 512;
        b.extend(write_req(i, off, &pattern(1024, i as u8), 0));
        b.extend(req(CMD_READ, 0, 1000 + i, off, 2048));
        if i % 5 == 0 {
            b.extend(req(CMD_FLUSH, 0, 2000 + i, 0, 0));
            b.extend(write_req(3000 + i, 3, &[1; 512], 0)); // misaligned
            b.extend(req(99, 0, 4000 + i, 0, 0));
        }
    }
    b
}

/// Replies to the stream, sorted by handle (replies may be reordered: errors
/// found while parsing are answered before bdev completions queued earlier).
fn run_stream(splits: &[usize], structured: bool) -> Vec<Rep> {
    let mut h = harness(structured);
    let input = stream();
    let mut cuts: Vec<usize> = splits.iter().map(|s| s % (input.len() + 1)).collect();
    cuts.push(input.len());
    cuts.sort();
    let mut staged: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut out = Vec::new();
    for cut in cuts {
        staged.extend_from_slice(&input[fed..cut.max(fed)]);
        fed = cut.max(fed);
        let n = h.tx.on_bytes(&staged, &mut h.actions);
        staged.drain(..n);
        h.run();
        out.extend(h.tx.take_output());
    }
    assert!(staged.len() < REQUEST_LEN);
    let reads: HashMap<u64, u32> = parse_handles_reads(&input).into_iter().collect();
    let mut r = parse(&out, &reads);
    r.sort_by_key(Rep::handle);
    r
}

proptest! {
    /// However requests are split across reads, the replies are the same bytes
    /// (malloc completes inline, so completion order is request order).
    #[test]
    fn any_split_gives_same_replies(splits in proptest::collection::vec(0usize..40000, 0..20), structured: bool) {
        let whole = run_stream(&[], structured);
        let split = run_stream(&splits, structured);
        prop_assert_eq!(split.len(), whole.len());
        for (a, b) in split.iter().zip(&whole) {
            prop_assert!(a == b, "handle {}: {} vs {} bytes", a.handle(), a.data().len(), b.data().len());
        }
    }

    /// Random bytes after a valid request never panic and never over-consume.
    #[test]
    fn garbage_is_handled(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut h = harness(true);
        let mut input = req(CMD_READ, 0, 1, 0, 512);
        input.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        input.extend_from_slice(&data);
        let n = h.feed(&input);
        prop_assert!(n <= input.len());
        h.run();
        let _ = h.tx.take_output();
    }
}
