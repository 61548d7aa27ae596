//! PDUs the Linux kernel NVMe/TCP target (nvmet-tcp, 6.1) sent to a small scripted
//! host (tests/fixtures/capture-target.py), with and without digests: ICResp,
//! CapsuleResp, R2T, C2HData carrying Identify Controller, Identify Namespace, a
//! read, and the discovery log page. Each is decoded, checked field by field and
//! re-encoded byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (docs/HELPERS.md)

mod common;

use common::*;
use nvme_wire::cqe::Cqe;
use nvme_wire::identify::{IdentifyController, IdentifyNamespace, CNTRLTYPE_IO, IDENTIFY_LEN};
use nvme_wire::log::{self, DiscoveryEntry};
use nvme_wire::pdu::{DataHdr, IcResp, Pdu, PduHeader, R2t, FLAG_LAST_PDU};
use nvme_wire::{DigestConfig, Status, DISCOVERY_NQN};

const SUBNQN: &str = "nqn.2024-01.io.nvmevm:target";
const VARIANTS: [(&str, DigestConfig); 2] = [("plain", NO_DIGEST), ("hdgst-ddgst", BOTH_DIGESTS)];

fn pdu(variant: &str, digest: DigestConfig, name: &str) -> (Vec<u8>, Pdu) {
    let b = load(&format!("linux-6.1-nvmet/{variant}/{name}.bin"));
    let p = decode_roundtrip(&b, digest, 0);
    check_digests(&b, &p, digest);
    (b, p)
}

fn cqe(variant: &str, digest: DigestConfig, name: &str) -> Cqe {
    let (b, p) = pdu(variant, digest, name);
    assert_eq!(b.len(), 24 + if digest.header { 4 } else { 0 });
    assert_eq!(b[3], 0, "pdo 0: no data");
    match p.header {
        PduHeader::CapsuleResp(c) => c,
        h => panic!("{name}: {h:?}"),
    }
}

/// A C2HData carrying a whole command's data in one PDU, as nvmet sends it.
fn c2h_data(variant: &str, digest: DigestConfig, name: &str, cccid: u16, len: u32) -> Vec<u8> {
    let (b, p) = pdu(variant, digest, name);
    let hd = if digest.header { 4 } else { 0 };
    assert_eq!(b[3] as usize, 24 + hd, "pdo right after the header digest");
    assert_eq!(b[1] & FLAG_LAST_PDU, FLAG_LAST_PDU);
    assert!(
        !p.success(),
        "SUCCESS only when the host disabled SQ flow control"
    );
    assert_eq!(
        p.header,
        PduHeader::C2HData(DataHdr {
            cccid,
            ttag: 0,
            datao: 0,
            datal: len
        })
    );
    assert_eq!(p.data_len, len as usize);
    p.data(&b).to_vec()
}

#[test]
fn icresp_echoes_digests_and_offers_4mib_h2c_data() {
    for (v, dg) in VARIANTS {
        let b = load(&format!("linux-6.1-nvmet/{v}/icresp.bin"));
        assert_eq!(
            &b[..8],
            &[0x01, 0x00, 128, 0, 128, 0, 0, 0],
            "CH: ICResp, no digest flags"
        );
        assert_eq!(le16(&b, 8), 0, "pfv");
        assert_eq!(b[10], 0, "cpda");
        assert_eq!(
            b[11],
            dg.header as u8 | (dg.data as u8) << 1,
            "dgst echoes the ICReq"
        );
        assert_eq!(le32(&b, 12), 0x40_0000, "maxh2cdata: 4 MiB");
        assert!(b[16..].iter().all(|&x| x == 0));
        let p = decode_roundtrip(&b, NO_DIGEST, 0);
        let want = IcResp {
            pfv: 0,
            cpda: 0,
            digest: dg,
            maxh2cdata: 4 << 20,
        };
        assert_eq!(p.header, PduHeader::ICResp(want));
    }
}

#[test]
fn capsule_responses() {
    for (v, dg) in VARIANTS {
        // Admin Connect: dw0 carries the new cntlid; SQ head moved past the Connect.
        let c = cqe(v, dg, "connect-resp");
        let want = Cqe {
            dw0: 1,
            dw1: 0,
            sqhd: 1,
            sqid: 0,
            cid: 1,
            status: Status::SUCCESS,
        };
        assert_eq!(c, want);
        let c = cqe(v, dg, "identify-ctrl-resp");
        assert_eq!((c.sqid, c.cid, c.status), (0, 4, Status::SUCCESS));
        // I/O queue 1, on its own connection.
        let c = cqe(v, dg, "io-connect-resp");
        assert_eq!(c, Cqe { sqid: 1, ..want });
        let c = cqe(v, dg, "write-resp");
        assert_eq!(
            c,
            Cqe {
                dw0: 0,
                sqhd: 2,
                sqid: 1,
                cid: 2,
                ..want
            }
        );
        let c = cqe(v, dg, "read-resp");
        assert_eq!(
            c,
            Cqe {
                dw0: 0,
                sqhd: 3,
                sqid: 1,
                cid: 3,
                ..want
            }
        );
    }
}

#[test]
fn r2t_asks_for_the_whole_write() {
    for (v, dg) in VARIANTS {
        let (b, p) = pdu(v, dg, "write-r2t");
        assert_eq!(b[0], 0x09);
        assert_eq!(b[3], 0, "pdo 0");
        assert_eq!(le32(&b, 4) as usize, 24 + if dg.header { 4 } else { 0 });
        let want = R2t {
            cccid: 2,
            ttag: 0,
            r2to: 0,
            r2tl: 20480,
        };
        assert_eq!(p.header, PduHeader::R2T(want));
        assert_eq!(p.data_len, 0);
    }
}

#[test]
fn read_data_is_what_was_written() {
    let pattern: Vec<u8> = (0..4096u32).map(|i| ((i * 7 + 1) % 251) as u8).collect();
    for (v, dg) in VARIANTS {
        assert_eq!(c2h_data(v, dg, "read-c2h", 3, 4096), pattern);
    }
}

/// Byte ranges of Identify Controller that `IdentifyController` models.
const CTRL_FIELDS: &[(usize, usize)] = &[
    (0, 4),       // vid, ssvid
    (4, 72),      // sn, mn, fr
    (72, 84),     // rab, ieee, cmic, mdts, cntlid, ver
    (92, 100),    // oaes, ctratt
    (111, 112),   // cntrltype
    (256, 263),   // oacs, acl, aerl, frmw, lpa, elpe
    (320, 322),   // kas
    (512, 530),   // sqes .. awupf
    (532, 534),   // acwu
    (536, 540),   // sgls
    (768, 1024),  // subnqn
    (1792, 1804), // ioccsz, iorcsz, icdoff, fcatt, msdbd
];

#[test]
fn identify_controller() {
    let mut first = None;
    for (v, dg) in VARIANTS {
        let d = c2h_data(v, dg, "identify-ctrl-c2h", 4, 4096);
        // Key offsets, by hand.
        assert_eq!(&d[24..29], b"Linux", "mn");
        assert_eq!(&d[64..72], b"6.1.0-56", "fr");
        assert_eq!(d[111], 1, "cntrltype: I/O controller");
        assert_eq!((d[512], d[513]), (0x66, 0x44), "sqes, cqes");
        assert_eq!(&d[768..796], SUBNQN.as_bytes(), "subnqn");
        assert_eq!(
            le32(&d, 1792),
            1028,
            "ioccsz: 16384 bytes of in-capsule data"
        );
        assert_eq!(le32(&d, 1796), 1, "iorcsz");
        assert_eq!(d[1803], 1, "msdbd");

        let id = IdentifyController::from_bytes(&d).unwrap();
        let want = IdentifyController {
            vid: 0,
            ssvid: 0,
            serial: "53cfbca02ff9b3903fa9".into(),
            model: "Linux".into(),
            firmware: "6.1.0-56".into(),
            rab: 6,
            ieee: [0; 3],
            cmic: 0x0b,
            mdts: 0,
            cntlid: 1,
            ver: 0x0001_0300,
            oaes: 0x900,
            ctratt: 0x41,
            cntrltype: CNTRLTYPE_IO,
            oacs: 0,
            acl: 3,
            aerl: 3,
            frmw: 3,
            lpa: 7,
            elpe: 127,
            kas: 10,
            sqes: 0x66,
            cqes: 0x44,
            maxcmd: 1024,
            nn: 1024,
            oncs: 0x0c,
            fuses: 0,
            fna: 0,
            vwc: 1,
            awun: 0,
            awupf: 0,
            acwu: 0,
            sgls: 0x0010_0001,
            subnqn: SUBNQN.into(),
            ioccsz: 1028,
            iorcsz: 1,
            icdoff: 0,
            fcatt: 0,
            msdbd: 1,
        };
        assert_eq!(id, want);
        // Re-encoding reproduces every modelled byte and nothing else.
        let enc = id.to_bytes();
        let mut modelled = [false; IDENTIFY_LEN];
        for &(a, b) in CTRL_FIELDS {
            assert_eq!(&enc[a..b], &d[a..b], "bytes {a}..{b}");
            modelled[a..b].fill(true);
        }
        for (i, &m) in modelled.iter().enumerate() {
            if !m {
                assert_eq!(enc[i], 0, "byte {i} is not modelled and must stay zero");
            }
        }
        assert_eq!(
            first.get_or_insert_with(|| d.clone()),
            &d,
            "same data with digests"
        );
    }
}

#[test]
fn identify_namespace() {
    for (v, dg) in VARIANTS {
        let d = c2h_data(v, dg, "identify-ns-c2h", 5, 4096);
        assert_eq!(le64(&d, 0), 131072, "nsze: 64 MiB of 512-byte blocks");
        assert_eq!(le64(&d, 8), 131072, "ncap");
        assert_eq!(le64(&d, 16), 131072, "nuse");
        assert_eq!(d[25], 0, "nlbaf: one format");
        assert_eq!(d[26], 0, "flbas: format 0");
        assert_eq!(le32(&d, 128), 9 << 16, "lbaf0: lbads 9, no metadata");
        let ns = IdentifyNamespace::from_bytes(&d).unwrap();
        let want = IdentifyNamespace {
            nsze: 131072,
            ncap: 131072,
            nuse: 131072,
            nsfeat: 0x12,
            nlbaf: 0,
            flbas: 0,
            dlfeat: 0,
            nmic: 1,
            nguid: [0; 16],
            eui64: [0; 8],
            lbads: 9,
        };
        assert_eq!(ns, want);
        assert_eq!(ns.block_size(), 512);
        let enc = ns.to_bytes();
        for (a, b) in [(0, 27), (30, 31), (33, 34), (104, 132)] {
            assert_eq!(&enc[a..b], &d[a..b], "bytes {a}..{b}");
        }
    }
}

#[test]
fn discovery_log_page() {
    for (v, dg) in VARIANTS {
        let d = c2h_data(v, dg, "discovery-log-c2h", 4, 3072);
        // Header, by hand.
        assert_eq!(le64(&d, 0), 2, "genctr");
        assert_eq!(le64(&d, 8), 2, "numrec");
        assert_eq!(le16(&d, 16), 0, "recfmt");
        // First entry, by hand.
        let e = &d[1024..2048];
        assert_eq!(&e[..10], &[3, 1, 3, 4, 1, 0, 0xff, 0xff, 32, 0]);
        assert_eq!(&e[32..37], b"4420\0", "trsvcid, NUL padded by Linux");
        assert_eq!(&e[512..522], b"10.0.2.15\0", "traddr");

        let (genctr, numrec, entries) = log::parse_discovery_log(&d).unwrap();
        assert_eq!((genctr, numrec), (2, 2));
        let base = DiscoveryEntry {
            trtype: log::TRTYPE_TCP,
            adrfam: log::ADRFAM_IPV4,
            subtype: log::SUBTYPE_CURRENT_DISCOVERY,
            // bits 1:0 = 0 secure channel not specified; bit 2: SQ flow control
            // disable supported.
            treq: 0x04,
            portid: 1,
            cntlid: 0xFFFF,
            asqsz: 32,
            trsvcid: "4420".into(),
            subnqn: DISCOVERY_NQN.into(),
            traddr: "10.0.2.15".into(),
            sectype: log::TSAS_SECTYPE_NONE,
        };
        let nvm = DiscoveryEntry {
            subtype: log::SUBTYPE_NVME,
            subnqn: SUBNQN.into(),
            ..base.clone()
        };
        assert_eq!(entries, vec![base, nvm]);

        // Re-encoded, the page differs only where corral pads TRSVCID and TRADDR with
        // spaces (as SPDK does) and Linux with NULs; both decode the same.
        let enc = log::discovery_log(genctr, &entries);
        assert_eq!(enc.len(), d.len());
        for (i, (&a, &b)) in enc.iter().zip(&d).enumerate() {
            if a != b {
                let in_entry = (i - 1024) % 1024;
                let padded = (32..64).contains(&in_entry) || (512..768).contains(&in_entry);
                assert!(
                    i >= 1024 && padded && a == b' ' && b == 0,
                    "byte {i}: {a:#x} vs {b:#x}"
                );
            }
        }
        assert_eq!(log::parse_discovery_log(&enc).unwrap().2, entries);
    }
}
