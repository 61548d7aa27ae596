//! Byte-level tests of the target connection state machine: a scripted host
//! sends PDUs, the test reads the PDUs the connection answers with.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::malloc::MallocBdev;
use bdev::{BdevIo, Completion, IoError, IoSink};
use nvme_wire::fabrics::{reg, Cc, ConnectCmd, ConnectData, Csts, PropertyCmd};
use nvme_wire::identify::IdentifyController;
use nvme_wire::log::{parse_discovery_log, GetLogPage};
use nvme_wire::pdu::{
    DataHdr, Decoded, Decoder, DigestConfig, Encoder, IcReq, Pdu, PduHeader, FLAG_LAST_PDU,
};
use nvme_wire::status::{CommandSpecificStatus as Cs, GenericStatus as G};
use nvme_wire::{Cqe, Sgl, Sqe, Status};
use parking_lot::Mutex;

use super::*;
use crate::target::{SubsystemConfig, TransportOpts};

const NQN: &str = "nqn.2024-01.io.corral:test";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";

/// Completions delivered synchronously by malloc are collected here.
type Done = (u64, BdevIo, Result<(), IoError>);
#[derive(Default)]
struct Collect(Mutex<Vec<Done>>);
impl IoSink for Collect {
    fn complete(&self, tag: u64, io: BdevIo, r: Result<(), IoError>) {
        self.0.lock().push((tag, io, r));
    }
}

struct H {
    target: Arc<Target>,
    conn: Connection,
    enc: Encoder,
    dec: Decoder,
    sink: Arc<Collect>,
    cid: u16,
}

struct Reply {
    pdus: Vec<(Pdu, Vec<u8>)>,
}

impl Reply {
    fn cqe(&self) -> Cqe {
        self.pdus
            .iter()
            .find_map(|(p, _)| match p.header {
                PduHeader::CapsuleResp(c) => Some(c),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no CapsuleResp in {:?}", self.types()))
    }
    fn data(&self) -> Vec<u8> {
        let mut v = Vec::new();
        for (p, raw) in &self.pdus {
            if let PduHeader::C2HData(d) = p.header {
                assert_eq!(d.datao as usize, v.len(), "C2HData in order");
                v.extend_from_slice(p.data(raw));
            }
        }
        v
    }
    fn types(&self) -> Vec<String> {
        self.pdus
            .iter()
            .map(|(p, _)| format!("{:?}", p.header.pdu_type()))
            .collect()
    }
    fn c2h_count(&self) -> usize {
        self.pdus
            .iter()
            .filter(|(p, _)| matches!(p.header, PduHeader::C2HData(_)))
            .count()
    }
}

impl H {
    fn new(opts: TransportOpts) -> Self {
        let target = Target::new(opts);
        let mut cfg = SubsystemConfig::new(NQN);
        cfg.allow_any_host = false;
        let s = target.create_subsystem(cfg).unwrap();
        s.add_host(HOST).unwrap();
        let b = Arc::new(MallocBdev::new("m0", 8192, 512, None).unwrap());
        s.add_namespace(b, None, None, None, false).unwrap();
        let la = ListenAddress::new("127.0.0.1", "4420");
        target.add_listener(NQN, la.clone()).unwrap();
        let conn = Connection::new(target.clone(), la, "test".into());
        H {
            target,
            conn,
            enc: Encoder::default(),
            dec: Decoder::new(1 << 20),
            sink: Arc::new(Collect::default()),
            cid: 0,
        }
    }

    /// Feeds raw bytes, runs submissions to completion, returns the PDUs sent back.
    fn feed(&mut self, bytes: &[u8]) -> Reply {
        let mut actions = Vec::new();
        let used = self.conn.on_bytes(bytes, Instant::now(), &mut actions);
        assert_eq!(used, bytes.len(), "whole PDUs consumed");
        self.run(actions)
    }

    fn run(&mut self, mut actions: Vec<Action>) -> Reply {
        let mut out = Vec::new();
        loop {
            for a in actions.drain(..) {
                let Action::Submit { bdev, io, tag } = a;
                bdev.submit(io, Completion::new(self.sink.clone(), tag));
            }
            let done: Vec<_> = std::mem::take(&mut *self.sink.0.lock());
            for (tag, io, r) in done {
                self.conn.on_completion(tag, io, r, &mut actions);
            }
            out.extend(self.conn.take_output(&mut actions));
            if actions.is_empty() {
                break;
            }
        }
        let mut pdus = Vec::new();
        let mut pos = 0;
        while pos < out.len() {
            match self.dec.decode(&out[pos..]).expect("target output decodes") {
                Decoded::Pdu(p) => {
                    pdus.push((p, out[pos..pos + p.plen].to_vec()));
                    pos += p.plen;
                }
                Decoded::Need(_) => panic!("truncated output"),
            }
        }
        Reply { pdus }
    }

    fn pdu(&mut self, h: PduHeader, flags: u8, data: &[u8]) -> Reply {
        let mut b = Vec::new();
        self.enc.pdu(&h, flags, data, &mut b);
        self.feed(&b)
    }

    fn cmd(&mut self, mut sqe: Sqe, data: &[u8]) -> Reply {
        self.cid = self.cid.wrapping_add(1);
        sqe.set_cid(self.cid);
        self.pdu(PduHeader::CapsuleCmd(sqe), 0, data)
    }

    fn icreq(&mut self, digest: DigestConfig) {
        let r = self.pdu(
            PduHeader::ICReq(IcReq {
                pfv: 0,
                hpda: 0,
                digest,
                maxr2t: 0,
            }),
            0,
            &[],
        );
        match r.pdus[0].0.header {
            PduHeader::ICResp(resp) => {
                assert_eq!(resp.digest, digest, "ICResp echoes the digests asked for");
                assert_eq!(resp.maxh2cdata, 128 * 1024);
            }
            ref h => panic!("expected ICResp, got {h:?}"),
        }
        self.enc = Encoder { digest, pda: 0 };
        self.dec.digest = digest;
    }

    fn connect(&mut self, qid: u16, cntlid: u16, host: &str, subnqn: &str) -> Cqe {
        let c = ConnectCmd {
            recfmt: 0,
            qid,
            sqsize: 31,
            cattr: 0,
            kato: 5000,
        };
        let d = ConnectData {
            hostid: [7; 16],
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: host.into(),
        };
        self.cmd(c.to_sqe(0), &d.to_bytes()).cqe()
    }

    fn prop_get(&mut self, off: u32, size8: bool) -> u64 {
        self.cmd(PropertyCmd::get_sqe(0, off, size8), &[])
            .cqe()
            .result_u64()
    }

    fn enable(&mut self) {
        let cc = Cc {
            en: true,
            iosqes: 6,
            iocqes: 4,
            ..Default::default()
        };
        let cqe = self
            .cmd(
                PropertyCmd::set_sqe(0, reg::CC, cc.to_u32() as u64, false),
                &[],
            )
            .cqe();
        assert!(cqe.status.is_success());
        assert!(Csts::from_u32(self.prop_get(reg::CSTS, false) as u32).rdy);
    }

    /// ICReq, admin Connect and enable: returns cntlid.
    fn admin(opts: TransportOpts) -> (Self, u16) {
        let mut h = H::new(opts);
        h.icreq(DigestConfig::default());
        let cqe = h.connect(0, 0xFFFF, HOST, NQN);
        assert!(cqe.status.is_success(), "{:?}", cqe.status);
        let cntlid = cqe.dw0 as u16;
        h.enable();
        (h, cntlid)
    }

    /// A second connection (I/O queue 1) to the same controller.
    fn io_queue(&self, cntlid: u16, digest: DigestConfig) -> H {
        let la = ListenAddress::new("127.0.0.1", "4420");
        let mut q = H {
            target: self.target.clone(),
            conn: Connection::new(self.target.clone(), la, "io".into()),
            enc: Encoder::default(),
            dec: Decoder::new(1 << 20),
            sink: Arc::new(Collect::default()),
            cid: 0,
        };
        q.icreq(digest);
        let cqe = q.connect(1, cntlid, HOST, NQN);
        assert!(cqe.status.is_success(), "{:?}", cqe.status);
        q
    }
}

fn io_sqe(op: u8, slba: u64, nlb: u32, sgl: Sgl) -> Sqe {
    let mut s = Sqe::new(op, 0);
    s.set_nsid(1);
    s.set_slba(slba);
    s.set_nlb(nlb);
    s.set_sgl(sgl);
    s
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn bring_up_and_identify() {
    let (mut h, cntlid) = H::admin(TransportOpts::default());
    assert!(cntlid >= 1);
    let cap = nvme_wire::fabrics::Cap::from_u64(h.prop_get(reg::CAP, true));
    assert_eq!(cap.mqes, 127);
    assert_eq!(h.prop_get(reg::VS, false), 0x0001_0400);
    let mut s = Sqe::new(0x06, 0);
    s.set_cdw(10, 1);
    s.set_sgl(Sgl::transport(4096));
    let r = h.cmd(s, &[]);
    assert!(r.cqe().status.is_success());
    let id = IdentifyController::from_bytes(&r.data()).unwrap();
    assert_eq!(id.subnqn, NQN);
    assert_eq!(id.cntlid, cntlid);
    assert_eq!(id.ioccsz, 260);
    assert_eq!(id.mdts, 8);
    // Active namespace list.
    let mut s = Sqe::new(0x06, 0);
    s.set_cdw(10, 2);
    s.set_sgl(Sgl::transport(4096));
    let r = h.cmd(s, &[]);
    assert_eq!(
        nvme_wire::identify::parse_active_ns_list(&r.data()),
        vec![1]
    );
    // Number of queues: ask 8, get 8.
    let mut s = Sqe::new(0x09, 0);
    s.set_cdw(10, 0x07);
    s.set_cdw(11, 7 | 7 << 16);
    assert_eq!(h.cmd(s, &[]).cqe().dw0, 7 | 7 << 16);
    // Unknown admin opcode.
    let r = h.cmd(Sqe::new(0x55, 0), &[]);
    assert_eq!(r.cqe().status, Status::generic(G::InvalidOpcode).with_dnr());
    // Create I/O SQ is not a fabrics command.
    let r = h.cmd(Sqe::new(0x01, 0), &[]);
    assert_eq!(r.cqe().status, Status::generic(G::InvalidOpcode).with_dnr());
}

#[test]
fn commands_before_enable_are_sequence_errors() {
    let mut h = H::new(TransportOpts::default());
    h.icreq(DigestConfig::default());
    // A command before Connect.
    let mut s = Sqe::new(0x06, 0);
    s.set_cdw(10, 1);
    assert_eq!(
        h.cmd(s, &[]).cqe().status,
        Status::generic(G::CommandSequenceError)
    );
    assert!(h.connect(0, 0xFFFF, HOST, NQN).status.is_success());
    let mut s = Sqe::new(0x06, 0);
    s.set_cdw(10, 1);
    s.set_sgl(Sgl::transport(4096));
    assert_eq!(
        h.cmd(s, &[]).cqe().status,
        Status::generic(G::CommandSequenceError)
    );
}

#[test]
fn acl_rejects_unknown_host_with_dnr() {
    let mut h = H::new(TransportOpts::default());
    h.icreq(DigestConfig::default());
    let cqe = h.connect(
        0,
        0xFFFF,
        "nqn.2014-08.org.nvmexpress:uuid:99999999-0000-0000-0000-000000000000",
        NQN,
    );
    assert_eq!(
        cqe.status,
        Status::command_specific(Cs::ConnectInvalidHost).with_dnr()
    );
    assert!(h.conn.is_closing());
    assert!(h.target.subsystem(NQN).unwrap().controllers().is_empty());
}

#[test]
fn connect_to_unknown_subsystem_names_the_field() {
    let mut h = H::new(TransportOpts::default());
    h.icreq(DigestConfig::default());
    let cqe = h.connect(0, 0xFFFF, HOST, "nqn.2024-01.io.corral:nope");
    assert_eq!(
        cqe.status,
        Status::command_specific(Cs::ConnectInvalidParameters).with_dnr()
    );
    assert_eq!(cqe.dw0, 256 | 1 << 16, "IPO subnqn, IATTR data");
}

#[test]
fn io_in_capsule_r2t_and_split_reads() {
    for digest in [
        DigestConfig::default(),
        DigestConfig {
            header: true,
            data: true,
        },
    ] {
        let (h, cntlid) = H::admin(TransportOpts::default());
        let mut q = h.io_queue(cntlid, digest);
        // In-capsule write of 8 blocks.
        let d = pattern(4096, 1);
        let r = q.cmd(io_sqe(0x01, 10, 8, Sgl::in_capsule(4096)), &d);
        assert!(r.cqe().status.is_success());
        assert_eq!(r.cqe().sqid, 1);
        // R2T write of 1 MiB in 8 H2CData PDUs of 128 KiB.
        let big = pattern(1 << 20, 2);
        let r = q.cmd(io_sqe(0x01, 100, 2048, Sgl::transport(1 << 20)), &[]);
        let (cid, ttag, r2tl) = match r.pdus[0].0.header {
            PduHeader::R2T(t) => (t.cccid, t.ttag, t.r2tl),
            ref x => panic!("expected R2T, got {x:?}"),
        };
        assert_eq!(r2tl, 1 << 20);
        let mut last = None;
        for (i, chunk) in big.chunks(128 << 10).enumerate() {
            let dh = DataHdr {
                cccid: cid,
                ttag,
                datao: (i * (128 << 10)) as u32,
                datal: chunk.len() as u32,
            };
            let flags = if i == 7 { FLAG_LAST_PDU } else { 0 };
            last = Some(q.pdu(PduHeader::H2CData(dh), flags, chunk));
        }
        assert!(last.unwrap().cqe().status.is_success());
        // Read it back: 8 C2HData PDUs then the response.
        let r = q.cmd(io_sqe(0x02, 100, 2048, Sgl::transport(1 << 20)), &[]);
        assert_eq!(r.c2h_count(), 8);
        assert!(r.cqe().status.is_success());
        assert_eq!(r.data(), big);
        let r = q.cmd(io_sqe(0x02, 10, 8, Sgl::transport(4096)), &[]);
        assert_eq!(r.data(), d);
        // Write zeroes, then deallocate via DSM (one range, in capsule), flush.
        let mut wz = io_sqe(0x08, 10, 4, Sgl::default());
        wz.set_nlb(4);
        assert!(q.cmd(wz, &[]).cqe().status.is_success());
        let r = q.cmd(io_sqe(0x02, 10, 8, Sgl::transport(4096)), &[]);
        assert!(r.data()[..2048].iter().all(|&b| b == 0));
        assert_eq!(&r.data()[2048..], &d[2048..]);
        let mut dsm = Sqe::new(0x09, 0);
        dsm.set_nsid(1);
        dsm.set_cdw(10, 0);
        dsm.set_cdw(11, 1 << 2);
        dsm.set_sgl(Sgl::in_capsule(16));
        let mut range = [0u8; 16];
        range[4..8].copy_from_slice(&2048u32.to_le_bytes());
        range[8..16].copy_from_slice(&100u64.to_le_bytes());
        assert!(q.cmd(dsm, &range).cqe().status.is_success());
        let r = q.cmd(io_sqe(0x02, 100, 8, Sgl::transport(4096)), &[]);
        assert!(r.data().iter().all(|&b| b == 0));
        let mut fl = Sqe::new(0x00, 0);
        fl.set_nsid(1);
        assert!(q.cmd(fl, &[]).cqe().status.is_success());
    }
}

#[test]
fn io_errors_get_nvme_statuses() {
    let (h, cntlid) = H::admin(TransportOpts::default());
    let mut q = h.io_queue(cntlid, DigestConfig::default());
    let r = q.cmd(io_sqe(0x02, 8190, 8, Sgl::transport(4096)), &[]);
    assert_eq!(r.cqe().status, Status::generic(G::LbaOutOfRange).with_dnr());
    let mut s = io_sqe(0x02, 0, 8, Sgl::transport(4096));
    s.set_nsid(9);
    assert_eq!(
        q.cmd(s, &[]).cqe().status,
        Status::generic(G::InvalidNamespaceOrFormat).with_dnr()
    );
    // Oversized transfer (above MDTS).
    let mut s = io_sqe(0x02, 0, 0, Sgl::transport(u32::MAX));
    s.set_cdw(12, 0xFFFF);
    assert_eq!(
        q.cmd(s, &[]).cqe().status,
        Status::generic(G::InvalidField).with_dnr()
    );
    // SGL shorter than the data.
    let r = q.cmd(io_sqe(0x02, 0, 8, Sgl::transport(512)), &[]);
    assert_eq!(
        r.cqe().status,
        Status::generic(G::DataSglLengthInvalid).with_dnr()
    );
    // Unknown I/O opcode.
    let r = q.cmd(io_sqe(0x7E, 0, 1, Sgl::default()), &[]);
    assert_eq!(r.cqe().status, Status::generic(G::InvalidOpcode).with_dnr());
    // In-capsule data whose length disagrees with the SGL.
    let r = q.cmd(io_sqe(0x01, 0, 1, Sgl::in_capsule(512)), &[0u8; 100]);
    assert_eq!(
        r.cqe().status,
        Status::generic(G::DataSglLengthInvalid).with_dnr()
    );
    // The queue still works.
    let r = q.cmd(io_sqe(0x02, 0, 1, Sgl::transport(512)), &[]);
    assert!(r.cqe().status.is_success());
}

#[test]
fn malformed_pdus_get_term_req() {
    // (mutation of a valid CapsuleCmd, expected fes, expected fei)
    type Mutation = fn(&mut Vec<u8>);
    let cases: Vec<(Mutation, u16, u32)> = vec![
        (|b| b[2] = 24, 1, 2),     // wrong hlen
        (|b| b[0] = 0x08, 1, 0),   // unknown PDU type
        (|b| b[72] ^= 0xFF, 3, 0), // header digest mismatch
        (
            |b| b[4..8].copy_from_slice(&(64u32 << 20).to_le_bytes()),
            5,
            0,
        ), // huge plen
    ];
    for (mutate, fes, fei) in cases {
        let mut h = H::new(TransportOpts::default());
        let dg = DigestConfig {
            header: true,
            data: false,
        };
        h.icreq(dg);
        let mut b = Vec::new();
        h.enc
            .pdu(&PduHeader::CapsuleCmd(Sqe::new(0x06, 1)), 0, &[], &mut b);
        mutate(&mut b);
        let mut actions = Vec::new();
        h.conn.on_bytes(&b, Instant::now(), &mut actions);
        let out = h.conn.take_output(&mut actions);
        assert_eq!(out[0], 0x03, "C2HTermReq");
        assert_eq!(u16::from_le_bytes([out[8], out[9]]), fes);
        assert_eq!(
            u32::from_le_bytes([out[10], out[11], out[12], out[13]]),
            fei
        );
        assert!(h.conn.is_closing());
    }
}

#[test]
fn pdus_out_of_sequence_are_fatal() {
    // A capsule before ICReq.
    let mut h = H::new(TransportOpts::default());
    let mut b = Vec::new();
    Encoder::default().pdu(&PduHeader::CapsuleCmd(Sqe::new(0x06, 1)), 0, &[], &mut b);
    let mut a = Vec::new();
    h.conn.on_bytes(&b, Instant::now(), &mut a);
    assert_eq!(h.conn.take_output(&mut a)[0], 0x03);
    // H2CData without an R2T, and data beyond the command.
    let (h, cntlid) = H::admin(TransportOpts::default());
    let mut q = h.io_queue(cntlid, DigestConfig::default());
    let r = q.pdu(
        PduHeader::H2CData(DataHdr {
            cccid: 1,
            ttag: 3,
            datao: 0,
            datal: 4,
        }),
        0,
        &[0; 4],
    );
    assert_eq!(
        r.pdus[0].0.header.pdu_type(),
        nvme_wire::pdu::PduType::C2HTermReq
    );
    let mut q = h.io_queue_again(cntlid);
    let r = q.cmd(io_sqe(0x01, 0, 1, Sgl::transport(512)), &[]);
    let PduHeader::R2T(t) = r.pdus[0].0.header else {
        panic!("R2T")
    };
    let r = q.pdu(
        PduHeader::H2CData(DataHdr {
            cccid: t.cccid,
            ttag: t.ttag,
            datao: 0,
            datal: 1024,
        }),
        0,
        &[0; 1024],
    );
    match r.pdus[0].0.header {
        PduHeader::C2HTermReq(tr) => assert_eq!(tr.fes, 4),
        ref x => panic!("{x:?}"),
    }
}

impl H {
    fn io_queue_again(&self, cntlid: u16) -> H {
        // The earlier I/O queue 1 connection was dropped without on_close; free the qid.
        if let Some(c) = self.target.subsystem(NQN).unwrap().controller(cntlid) {
            c.inner.lock().queues.remove(&1);
        }
        self.io_queue(cntlid, DigestConfig::default())
    }
}

#[test]
fn data_digest_error_fails_the_command_not_the_connection() {
    let (h, cntlid) = H::admin(TransportOpts::default());
    let dg = DigestConfig {
        header: false,
        data: true,
    };
    let mut q = h.io_queue(cntlid, dg);
    let mut b = Vec::new();
    let mut sqe = io_sqe(0x01, 0, 1, Sgl::in_capsule(512));
    sqe.set_cid(77);
    q.enc
        .pdu(&PduHeader::CapsuleCmd(sqe), 0, &[5u8; 512], &mut b);
    let n = b.len();
    b[n - 10] ^= 1;
    let r = q.feed(&b);
    assert_eq!(r.cqe().status, Status::generic(G::TransientTransportError));
    assert!(!q.conn.is_closing());
    let r = q.cmd(io_sqe(0x02, 0, 1, Sgl::transport(512)), &[]);
    assert!(r.cqe().status.is_success());
}

#[test]
fn keep_alive_expiry_closes_every_queue() {
    let (mut h, cntlid) = H::admin(TransportOpts::default());
    let q = h.io_queue(cntlid, DigestConfig::default());
    let c = h.target.subsystem(NQN).unwrap().controller(cntlid).unwrap();
    let now = Instant::now();
    assert_eq!(h.target.check_keep_alive(now), 0);
    // Keep Alive command pushes the deadline.
    h.cmd(Sqe::new(0x18, 0), &[]);
    assert_eq!(
        h.target.check_keep_alive(now + Duration::from_millis(4000)),
        0
    );
    assert_eq!(
        h.target.check_keep_alive(now + Duration::from_millis(6000)),
        1
    );
    assert!(h.conn.queue_ctl().is_closing());
    assert!(q.conn.queue_ctl().is_closing());
    assert_eq!(c.state(), CtrlState::Fatal);
    assert!(Csts::from_u32(h.prop_get(reg::CSTS, false) as u32).cfs);
    h.conn.on_close();
    assert!(h
        .target
        .subsystem(NQN)
        .unwrap()
        .controller(cntlid)
        .is_none());
}

#[test]
fn io_queue_connect_rules() {
    let (h, cntlid) = H::admin(TransportOpts::default());
    let mut q = H {
        target: h.target.clone(),
        conn: Connection::new(
            h.target.clone(),
            ListenAddress::new("127.0.0.1", "4420"),
            "x".into(),
        ),
        enc: Encoder::default(),
        dec: Decoder::new(1 << 20),
        sink: Arc::new(Collect::default()),
        cid: 0,
    };
    q.icreq(DigestConfig::default());
    // Unknown cntlid.
    let cqe = q.connect(1, cntlid + 100, HOST, NQN);
    assert_eq!(cqe.dw0, 16 | 1 << 16);
    let _q1 = h.io_queue(cntlid, DigestConfig::default());
    // Duplicate qid 1.
    let mut q = H {
        target: h.target.clone(),
        conn: Connection::new(
            h.target.clone(),
            ListenAddress::new("127.0.0.1", "4420"),
            "y".into(),
        ),
        enc: Encoder::default(),
        dec: Decoder::new(1 << 20),
        sink: Arc::new(Collect::default()),
        cid: 0,
    };
    q.icreq(DigestConfig::default());
    let cqe = q.connect(1, cntlid, HOST, NQN);
    assert_eq!(
        cqe.status,
        Status::command_specific(Cs::ConnectInvalidParameters).with_dnr()
    );
    assert_eq!(cqe.dw0, 42);
}

#[test]
fn discovery_log_lists_allowed_subsystems() {
    let mut h = H::new(TransportOpts::default());
    let other = h
        .target
        .create_subsystem(SubsystemConfig::new("nqn.2024-01.io.corral:hidden"))
        .unwrap();
    h.target
        .add_listener(&other.nqn, ListenAddress::new("127.0.0.1", "4421"))
        .unwrap();
    h.icreq(DigestConfig::default());
    assert!(h
        .connect(0, 0xFFFF, HOST, nvme_wire::DISCOVERY_NQN)
        .status
        .is_success());
    h.enable();
    let mut s = Sqe::new(0x02, 0);
    GetLogPage {
        lid: 0x70,
        lsp: 0,
        rae: false,
        len: 4096,
        offset: 0,
    }
    .write_sqe(&mut s);
    s.set_sgl(Sgl::transport(4096));
    let r = h.cmd(s, &[]);
    let (_, numrec, entries) = parse_discovery_log(&r.data()).unwrap();
    assert_eq!(
        numrec, 1,
        "the subsystem that does not allow this host is hidden"
    );
    assert_eq!(entries[0].subnqn, NQN);
    assert_eq!(entries[0].trsvcid, "4420");
    // I/O commands do not exist on the discovery controller.
    let r = h.cmd(Sqe::new(0x08, 0), &[]);
    assert_eq!(r.cqe().status, Status::generic(G::InvalidOpcode).with_dnr());
}

#[test]
fn namespace_change_completes_an_aer() {
    let (mut h, _cntlid) = H::admin(TransportOpts::default());
    let mut s = Sqe::new(0x09, 0);
    s.set_cdw(10, 0x0B);
    s.set_cdw(11, 1 << 8);
    assert!(h.cmd(s, &[]).cqe().status.is_success());
    let r = h.cmd(Sqe::new(0x0C, 0), &[]);
    assert!(r.pdus.is_empty(), "AER stays outstanding");
    let aer_cid = h.cid;
    let b = Arc::new(MallocBdev::new("m1", 16, 512, None).unwrap());
    h.target
        .subsystem(NQN)
        .unwrap()
        .add_namespace(b, None, None, None, false)
        .unwrap();
    h.conn.poll_events();
    let r = h.run(Vec::new());
    let cqe = r.cqe();
    assert_eq!(cqe.cid, aer_cid);
    assert_eq!(cqe.dw0, 0x0004_0002);
    let mut s = Sqe::new(0x02, 0);
    GetLogPage {
        lid: 0x04,
        lsp: 0,
        rae: false,
        len: 4096,
        offset: 0,
    }
    .write_sqe(&mut s);
    s.set_sgl(Sgl::transport(4096));
    let data = h.cmd(s, &[]).data();
    assert_eq!(&data[..4], &2u32.to_le_bytes());
}

#[test]
fn buffer_budget_defers_instead_of_allocating() {
    let opts = TransportOpts {
        conn_buffer_budget: 64 * 1024,
        ..Default::default()
    };
    let (h, cntlid) = H::admin(opts);
    let mut q = h.io_queue(cntlid, DigestConfig::default());
    // Two 64 KiB writes: the second waits for the first's buffer.
    let mut actions = Vec::new();
    let mut b = Vec::new();
    for cid in [1u16, 2] {
        let mut s = io_sqe(0x01, cid as u64 * 128, 128, Sgl::transport(64 * 1024));
        s.set_cid(cid);
        q.enc.pdu(&PduHeader::CapsuleCmd(s), 0, &[], &mut b);
    }
    q.conn.on_bytes(&b, Instant::now(), &mut actions);
    let r = q.run(actions);
    assert_eq!(
        r.pdus.len(),
        1,
        "one R2T now, the other command waits: {:?}",
        r.types()
    );
    let PduHeader::R2T(t) = r.pdus[0].0.header else {
        panic!()
    };
    let r = q.pdu(
        PduHeader::H2CData(DataHdr {
            cccid: t.cccid,
            ttag: t.ttag,
            datao: 0,
            datal: 65536,
        }),
        FLAG_LAST_PDU,
        &pattern(65536, 3),
    );
    // The first completes, its buffer frees, and the second's R2T follows.
    assert!(r.types().contains(&"CapsuleResp".to_string()));
    assert!(r.types().contains(&"R2T".to_string()), "{:?}", r.types());
}
