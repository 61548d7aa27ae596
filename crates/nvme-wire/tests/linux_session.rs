//! Whole sessions between the Linux 6.1 NVMe/TCP host (nvme-cli 2.3 `nvme connect`)
//! and the Linux 6.1 target (nvmet-tcp), recorded by a byte relay as raw streams, one
//! file per queue and direction, without and with header and data digests. Every PDU
//! of every stream must decode, pass its digests, re-encode byte for byte, and the
//! two directions must agree with each other (every command completed once, data
//! PDUs matching their commands, the written pattern read back).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (docs/HELPERS.md)

mod common;

use common::*;
use nvme_wire::fabrics::{reg, Cc, ConnectCmd, ConnectData, PropertyCmd};
use nvme_wire::opcode::{AdminOpcode, FabricsType, FeatureId, IoOpcode};
use nvme_wire::pdu::{Decoded, Pdu, PduHeader, PduType};
use nvme_wire::status::GenericStatus;
use nvme_wire::{DigestConfig, Sqe, Status};
use std::collections::HashMap;

const SUBNQN: &str = "nqn.2024-01.io.nvmevm:session";
const VARIANTS: [(&str, DigestConfig); 2] = [("plain", NO_DIGEST), ("hdgst-ddgst", BOTH_DIGESTS)];

/// One PDU of a stream: where it starts, and its decoded form.
struct Item {
    at: usize,
    pdu: Pdu,
}

impl Item {
    fn data<'a>(&self, stream: &'a [u8]) -> &'a [u8] {
        self.pdu.data(&stream[self.at..])
    }
    fn sqe(&self) -> Sqe {
        match self.pdu.header {
            PduHeader::CapsuleCmd(s) => s,
            h => panic!("not a command: {h:?}"),
        }
    }
}

/// Splits a recorded stream into PDUs. The first PDU (ICReq or ICResp) is decoded
/// before negotiation; the rest with the digests it carries.
fn decode_stream(stream: &[u8], want: DigestConfig) -> Vec<Item> {
    let mut items = Vec::new();
    let mut digest = NO_DIGEST;
    let mut at = 0;
    while at < stream.len() {
        let dec = decoder(digest, 0);
        let plen = match dec.decode(&stream[at..]) {
            Ok(Decoded::Pdu(p)) => p.plen,
            other => panic!("PDU at {at}: {other:?}"),
        };
        let bytes = &stream[at..at + plen];
        let pdu = decode_roundtrip(bytes, digest, 0);
        check_digests(bytes, &pdu, digest);
        if items.is_empty() {
            digest = negotiated(&pdu.header);
            assert_eq!(digest, want);
        }
        items.push(Item { at, pdu });
        at += plen;
    }
    assert_eq!(at, stream.len(), "the stream ends on a PDU boundary");
    items
}

fn types(items: &[Item]) -> HashMap<PduType, usize> {
    let mut m = HashMap::new();
    for i in items {
        *m.entry(i.pdu.header.pdu_type()).or_default() += 1;
    }
    m
}

/// Commands and completions of one queue must pair up; data PDUs must belong to an
/// outstanding command and stay inside its SGL length. Returns the completions by cid.
fn pair_up(h2c: &[Item], c2h: &[Item]) -> HashMap<u16, Status> {
    let mut open: HashMap<u16, u32> = HashMap::new();
    for i in &h2c[1..] {
        if let PduHeader::CapsuleCmd(s) = i.pdu.header {
            open.insert(s.cid(), s.sgl().length);
        }
    }
    let mut done = HashMap::new();
    for i in &c2h[1..] {
        match i.pdu.header {
            PduHeader::CapsuleResp(c) => {
                assert!(
                    open.contains_key(&c.cid),
                    "completion for unknown cid {}",
                    c.cid
                );
                assert!(
                    done.insert(c.cid, c.status).is_none(),
                    "cid {} completed twice",
                    c.cid
                );
            }
            PduHeader::C2HData(d) => {
                let len = open[&d.cccid];
                assert!(!done.contains_key(&d.cccid), "data after the completion");
                assert!(
                    d.datao + d.datal <= len,
                    "C2HData inside the command's buffer"
                );
            }
            PduHeader::R2T(r) => {
                assert!(r.r2to + r.r2tl <= open[&r.cccid]);
            }
            h => panic!("unexpected from the controller: {h:?}"),
        }
    }
    assert_eq!(done.len(), open.len(), "every command completed");
    done
}

#[test]
fn admin_queue_session() {
    for (v, dg) in VARIANTS {
        let h2c_bytes = load(&format!("linux-6.1-session/{v}-q0-h2c.bin"));
        let c2h_bytes = load(&format!("linux-6.1-session/{v}-q0-c2h.bin"));
        let h2c = decode_stream(&h2c_bytes, dg);
        let c2h = decode_stream(&c2h_bytes, dg);
        assert_eq!(types(&h2c)[&PduType::CapsuleCmd], 24);
        assert_eq!(types(&c2h)[&PduType::CapsuleResp], 24);
        assert_eq!(types(&c2h)[&PduType::C2HData], 11);

        // Admin Connect: kato 5 s, dynamic cntlid, in-capsule data.
        let connect = &h2c[1];
        let s = connect.sqe();
        assert_eq!(
            (s.opcode(), s.fctype(), s.cid()),
            (0x7f, FabricsType::Connect as u8, 0)
        );
        let c = ConnectCmd::from_sqe(&s);
        assert_eq!(
            c,
            ConnectCmd {
                recfmt: 0,
                qid: 0,
                sqsize: 31,
                cattr: 0,
                kato: 5000
            }
        );
        let data = ConnectData::from_bytes(connect.data(&h2c_bytes)).unwrap();
        assert_eq!((data.cntlid, data.subnqn.as_str()), (0xFFFF, SUBNQN));
        assert!(data.hostnqn.starts_with("nqn.2014-08.org.nvmexpress:uuid:"));

        // The bring-up sequence Linux uses, command by command (opcode, fctype or CNS).
        let seq: Vec<(u8, u8)> = h2c[1..]
            .iter()
            .map(|i| {
                let s = i.sqe();
                let sub = if s.opcode() == 0x7f {
                    s.fctype()
                } else {
                    s.cdw(10) as u8
                };
                (s.opcode(), sub)
            })
            .collect();
        let (fab, id, glp) = (AdminOpcode::Fabrics as u8, 0x06, 0x02);
        let (get, set) = (
            FabricsType::PropertyGet as u8,
            FabricsType::PropertySet as u8,
        );
        let sf = AdminOpcode::SetFeatures as u8;
        #[rustfmt::skip]
        let want = vec![
            (fab, 1), (fab, get), (fab, set), (fab, get), (fab, get), (fab, set), (fab, get),
            (fab, get), (id, 1), (glp, 0x05), (glp, 0x0c), (sf, FeatureId::NumberOfQueues as u8),
            (sf, FeatureId::AsyncEventConfig as u8), (AdminOpcode::AsyncEventRequest as u8, 0),
            (id, 6), (id, 2), (id, 3), (id, 0), (id, 0), (glp, 0x0c), (id, 0), (id, 3),
            (fab, set), (fab, get),
        ];
        assert_eq!(seq, want);

        // Property accesses: CAP (8 bytes), CC disable/enable/shutdown, CSTS, VS.
        let props: Vec<(u8, PropertyCmd)> = h2c[1..]
            .iter()
            .filter(|i| i.sqe().opcode() == 0x7f && i.sqe().fctype() != 1)
            .map(|i| (i.sqe().fctype(), PropertyCmd::from_sqe(&i.sqe())))
            .collect();
        let offsets: Vec<(u8, u32, bool)> =
            props.iter().map(|(t, p)| (*t, p.offset, p.size8)).collect();
        #[rustfmt::skip]
        assert_eq!(offsets, vec![
            (get, reg::CAP, true), (set, reg::CC, false), (get, reg::CC, false),
            (get, reg::CAP, true), (set, reg::CC, false), (get, reg::CSTS, false),
            (get, reg::VS, false), (set, reg::CC, false), (get, reg::CSTS, false),
        ]);
        let cc: Vec<Cc> = props
            .iter()
            .filter(|(t, _)| *t == set)
            .map(|(_, p)| Cc::from_u32(p.value as u32))
            .collect();
        let base = Cc {
            en: false,
            css: 6,
            mps: 0,
            ams: 0,
            shn: 0,
            iosqes: 6,
            iocqes: 4,
        };
        assert_eq!(
            cc,
            vec![
                base,
                Cc { en: true, ..base },
                Cc {
                    en: true,
                    shn: 1,
                    ..base
                }
            ]
        );
        for c in &cc {
            assert_eq!(Cc::from_u32(c.to_u32()), *c);
        }

        // Completions: all succeed except the Async Event Request, which the target
        // aborts at shutdown with Internal Error and DNR.
        let done = pair_up(&h2c, &c2h);
        let aer = h2c
            .iter()
            .find(|i| matches!(i.pdu.header, PduHeader::CapsuleCmd(s) if s.opcode() == 0x0c));
        let aer_cid = aer.unwrap().sqe().cid();
        for (cid, st) in &done {
            if *cid == aer_cid {
                assert_eq!(
                    *st,
                    Status::generic(GenericStatus::InternalError).with_dnr()
                );
            } else {
                assert!(st.is_success(), "cid {cid}: {st}");
            }
        }
    }
}

/// The pattern the guest wrote (tests/fixtures/guest-session.sh).
fn pattern() -> Vec<u8> {
    let mut p = Vec::new();
    for i in 0..640 {
        p.extend_from_slice(format!("corral nvme-wire fixture block {i} ").as_bytes());
    }
    p.truncate(20480);
    p
}

#[test]
fn io_queue_session_writes_with_r2t_and_reads_back() {
    for (v, dg) in VARIANTS {
        let h2c_bytes = load(&format!("linux-6.1-session/{v}-q1-h2c.bin"));
        let c2h_bytes = load(&format!("linux-6.1-session/{v}-q1-c2h.bin"));
        let h2c = decode_stream(&h2c_bytes, dg);
        let c2h = decode_stream(&c2h_bytes, dg);

        // I/O queue Connect: qid 1, 128 entries, the cntlid the admin queue got.
        let s = h2c[1].sqe();
        let c = ConnectCmd::from_sqe(&s);
        assert_eq!(
            c,
            ConnectCmd {
                recfmt: 0,
                qid: 1,
                sqsize: 127,
                cattr: 0,
                kato: 0
            }
        );
        assert_eq!(
            ConnectData::from_bytes(h2c[1].data(&h2c_bytes))
                .unwrap()
                .cntlid,
            1
        );

        // Then: read of LBA 0 (partition scan), the 20 KiB write, the 20 KiB read.
        let cmds: Vec<Sqe> = h2c[2..]
            .iter()
            .filter(|i| matches!(i.pdu.header, PduHeader::CapsuleCmd(_)))
            .map(Item::sqe)
            .collect();
        let ops: Vec<(u8, u64, u32, u32)> = cmds
            .iter()
            .map(|s| (s.opcode(), s.slba(), s.nlb(), s.sgl().length))
            .collect();
        let (r, w) = (IoOpcode::Read as u8, IoOpcode::Write as u8);
        assert_eq!(
            ops,
            vec![(r, 0, 8, 4096), (w, 0, 40, 20480), (r, 0, 40, 20480)]
        );
        for s in &cmds {
            assert!(
                s.sgl().is_transport(),
                "Linux sends data by R2T when over 16 KiB in-capsule"
            );
            assert_eq!(s.nsid(), 1);
        }
        let write_cid = cmds[1].cid();

        // R2T for the whole write; one H2CData answers it, with the pattern.
        let r2t: Vec<_> = c2h
            .iter()
            .filter_map(|i| match i.pdu.header {
                PduHeader::R2T(r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(r2t.len(), 1);
        assert_eq!(
            (r2t[0].cccid, r2t[0].r2to, r2t[0].r2tl),
            (write_cid, 0, 20480)
        );
        let h2c_data: Vec<&Item> = h2c
            .iter()
            .filter(|i| matches!(i.pdu.header, PduHeader::H2CData(_)))
            .collect();
        assert_eq!(h2c_data.len(), 1);
        let PduHeader::H2CData(d) = h2c_data[0].pdu.header else {
            unreachable!()
        };
        assert_eq!(
            (d.cccid, d.ttag, d.datao, d.datal),
            (write_cid, r2t[0].ttag, 0, 20480)
        );
        assert!(h2c_data[0].pdu.last_pdu());
        assert_eq!(h2c_data[0].data(&h2c_bytes), pattern());

        // The read returns it.
        let read = c2h
            .iter()
            .rev()
            .find(|i| matches!(i.pdu.header, PduHeader::C2HData(_)))
            .unwrap();
        assert_eq!(read.data(&c2h_bytes), pattern());

        let done = pair_up(&h2c, &c2h);
        assert!(done.values().all(Status::is_success));
    }
}
