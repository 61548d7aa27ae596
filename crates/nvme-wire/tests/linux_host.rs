//! The Linux kernel NVMe/TCP host's ICReq and admin-queue Connect capsule, captured
//! byte for byte (tests/fixtures/README.md says how), decoded with the crate and
//! checked field by field against the raw bytes, then re-encoded byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (docs/HELPERS.md)

mod common;

use common::*;
use nvme_wire::fabrics::{ConnectCmd, ConnectData, CNTLID_DYNAMIC, CONNECT_DATA_LEN};
use nvme_wire::pdu::{FatalError, IcReq, PduHeader, FLAG_DDGSTF, FLAG_HDGSTF};
use nvme_wire::{DigestConfig, Sqe};

const SUBNQN: &str = "nqn.2024-01.io.nvmevm:hosttarget";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:c15f169c-ca69-4aca-874a-ad9d74603fd7";
const HOSTID: [u8; 16] = [
    0xc1, 0x5f, 0x16, 0x9c, 0xca, 0x69, 0x4a, 0xca, 0x87, 0x4a, 0xad, 0x9d, 0x74, 0x60, 0x3f, 0xd7,
];

fn check_icreq(file: &str, dgst: u8) {
    let b = load(file);
    assert_eq!(b.len(), 128);
    // Common header, by hand.
    assert_eq!(b[0], 0x00, "pdu_type ICReq");
    assert_eq!(b[1], 0x00, "flags: ICReq never carries digests");
    assert_eq!(b[2], 128, "hlen");
    assert_eq!(b[3], 0, "pdo");
    assert_eq!(le32(&b, 4), 128, "plen");
    // PDU-specific header, by hand.
    assert_eq!(le16(&b, 8), 0, "pfv");
    assert_eq!(b[10], 0, "hpda: the host wants no data alignment");
    assert_eq!(b[11], dgst, "digest byte: bit0 header, bit1 data");
    assert_eq!(le32(&b, 12), 0, "maxr2t (0's based: one R2T per command)");
    assert!(b[16..].iter().all(|&x| x == 0), "reserved bytes are zero");

    // ICReq precedes negotiation: decode it with a fresh decoder.
    let pdu = decode_roundtrip(&b, NO_DIGEST, 0);
    let want = IcReq {
        pfv: 0,
        hpda: 0,
        digest: DigestConfig {
            header: dgst & 1 != 0,
            data: dgst & 2 != 0,
        },
        maxr2t: 0,
    };
    assert_eq!(pdu.header, PduHeader::ICReq(want));
    assert_eq!(
        (pdu.hlen, pdu.pdo, pdu.plen, pdu.data_len),
        (128, 0, 128, 0)
    );
}

#[test]
fn icreq_without_digests() {
    check_icreq("linux-6.1-host/icreq-plain.bin", 0x00);
}

#[test]
fn icreq_with_header_and_data_digest() {
    check_icreq("linux-6.1-host/icreq-hdgst-ddgst.bin", 0x03);
}

/// Checks a captured admin Connect capsule; returns its SQE and Connect data bytes.
fn check_connect(file: &str, digest: DigestConfig) -> (Sqe, Vec<u8>) {
    let b = load(file);
    let hd = if digest.header { 4 } else { 0 };
    let dd = if digest.data { 4 } else { 0 };
    let pdo = 72 + hd;
    assert_eq!(b.len(), pdo + CONNECT_DATA_LEN + dd);

    // Common header, by hand.
    assert_eq!(b[0], 0x04, "pdu_type CapsuleCmd");
    let flags =
        if digest.header { FLAG_HDGSTF } else { 0 } | if digest.data { FLAG_DDGSTF } else { 0 };
    assert_eq!(b[1], flags);
    assert_eq!(b[2], 72, "hlen");
    assert_eq!(
        b[3] as usize, pdo,
        "pdo: data right after the header (and its digest)"
    );
    assert_eq!(le32(&b, 4) as usize, b.len(), "plen");

    // The SQE at byte 8, by hand.
    let s = &b[8..72];
    assert_eq!(s[0], 0x7f, "opcode: fabrics");
    assert_eq!(s[1], 0x40, "flags: PSDT=01b (SGL), no fused operation");
    assert_eq!(le16(s, 2), 0, "cid: Linux's first admin command is cid 0");
    assert_eq!(s[4], 0x01, "fctype: Connect");
    assert!(s[5..24].iter().all(|&x| x == 0), "reserved");
    assert_eq!(
        le64(s, 24),
        0,
        "SGL1 address: offset 0 into the capsule data"
    );
    assert_eq!(le32(s, 32), 1024, "SGL1 length");
    assert_eq!(&s[36..39], &[0, 0, 0], "SGL1 reserved");
    assert_eq!(
        s[39], 0x01,
        "SGL1 type byte: Data Block (0x0), subtype Offset (0x1)"
    );
    assert_eq!(le16(s, 40), 0, "recfmt");
    assert_eq!(le16(s, 42), 0, "qid: admin queue");
    assert_eq!(
        le16(s, 44),
        31,
        "sqsize: 32 entries, 0's based (NVME_AQ_DEPTH - 1)"
    );
    assert_eq!(s[46], 0, "cattr: SQ flow control stays on");
    assert_eq!(s[47], 0, "reserved");
    // Linux 6.1 sends kato = 5 s (NVME_DEFAULT_KATO * 1000); the "+ 10 s grace"
    // (15000) of older kernels is gone from the Connect it sends.
    assert_eq!(le32(s, 48), 5000, "kato in ms");
    assert!(s[52..].iter().all(|&x| x == 0), "reserved");

    // The Connect data, by hand.
    let d = &b[pdo..pdo + CONNECT_DATA_LEN];
    assert_eq!(&d[0..16], &HOSTID, "hostid");
    assert_eq!(le16(d, 16), 0xFFFF, "cntlid: dynamic controller model");
    assert!(d[18..256].iter().all(|&x| x == 0), "reserved");
    assert_eq!(&d[256..256 + SUBNQN.len()], SUBNQN.as_bytes());
    assert!(
        d[256 + SUBNQN.len()..512].iter().all(|&x| x == 0),
        "subnqn is NUL padded"
    );
    assert_eq!(&d[512..512 + HOSTNQN.len()], HOSTNQN.as_bytes());
    assert!(
        d[512 + HOSTNQN.len()..].iter().all(|&x| x == 0),
        "hostnqn NUL padded, rest reserved"
    );

    // Digests, against the independent CRC32C.
    if digest.header {
        assert_eq!(le32(&b, 72), crc32c_reference(&b[..72]));
    }
    if digest.data {
        assert_eq!(le32(&b, pdo + 1024), crc32c_reference(d));
    }

    // Now the crate.
    let pdu = decode_roundtrip(&b, digest, 0);
    check_digests(&b, &pdu, digest);
    assert_eq!((pdu.hlen, pdu.pdo, pdu.plen), (72, pdo, b.len()));
    assert_eq!((pdu.data_offset, pdu.data_len), (pdo, CONNECT_DATA_LEN));
    let PduHeader::CapsuleCmd(sqe) = pdu.header else {
        panic!("{:?}", pdu.header)
    };
    assert_eq!(sqe.opcode(), 0x7f);
    assert_eq!(sqe.psdt(), 1);
    assert_eq!(sqe.cid(), 0);
    assert_eq!(sqe.fctype(), 1);
    let sgl = sqe.sgl();
    assert!(sgl.is_in_capsule());
    assert_eq!(
        (sgl.address, sgl.length, sgl.sgl_type, sgl.subtype),
        (0, 1024, 0x0, 0x1)
    );
    let cmd = ConnectCmd::from_sqe(&sqe);
    assert_eq!(
        cmd,
        ConnectCmd {
            recfmt: 0,
            qid: 0,
            sqsize: 31,
            cattr: 0,
            kato: 5000
        }
    );
    assert!(!cmd.sq_flow_control_disabled());
    // The crate builds exactly the SQE Linux sends.
    assert_eq!(cmd.to_sqe(0), sqe);

    let data = ConnectData::from_bytes(pdu.data(&b)).unwrap();
    assert_eq!(
        data,
        ConnectData {
            hostid: HOSTID,
            cntlid: CNTLID_DYNAMIC,
            subnqn: SUBNQN.into(),
            hostnqn: HOSTNQN.into(),
        }
    );
    // nvme-cli derives the host NQN from the host ID.
    let uuid: String = HOSTID.iter().map(|b| format!("{b:02x}")).collect();
    assert!(data.hostnqn.replace('-', "").ends_with(&uuid));
    assert_eq!(
        &data.to_bytes()[..],
        d,
        "Connect data re-encodes byte for byte"
    );
    (sqe, d.to_vec())
}

#[test]
fn admin_connect_without_digests() {
    check_connect("linux-6.1-host/connect-admin-plain.bin", NO_DIGEST);
}

#[test]
fn admin_connect_with_header_and_data_digest() {
    check_connect("linux-6.1-host/connect-admin-hdgst-ddgst.bin", BOTH_DIGESTS);
}

#[test]
fn digests_change_framing_only() {
    let plain = check_connect("linux-6.1-host/connect-admin-plain.bin", NO_DIGEST);
    let dig = check_connect("linux-6.1-host/connect-admin-hdgst-ddgst.bin", BOTH_DIGESTS);
    assert_eq!(plain, dig, "same SQE and Connect data either way");
}

#[test]
fn corrupted_digests_are_detected() {
    let b = load("linux-6.1-host/connect-admin-hdgst-ddgst.bin");
    let dec = decoder(BOTH_DIGESTS, 0);
    // Any bit of the header or of its digest fails at once, never "need more bytes".
    // Type, hlen, HDGSTF and the PDO/PLEN ranges are checked from the common header
    // (a flipped PLEN or PDO bit may fail there, as an invalid field or an oversized
    // PDU); everything else, in-range PLEN/PDO values included, by the header digest.
    // Only the first 76 bytes are offered, as a receiver that has read header and
    // digest would.
    for i in 0..76 {
        for bit in 0..8 {
            let mut x = b.clone();
            x[i] ^= 1 << bit;
            let e = dec.decode(&x[..76]).unwrap_err();
            match (i, bit) {
                (0, _) | (2, _) | (1, 0) => assert_eq!(e.fes, FatalError::InvalidHeaderField),
                (3..=7, _) => assert!(
                    e.fes == FatalError::HeaderDigestError
                        || (e.fes == FatalError::InvalidHeaderField && [3, 4].contains(&e.fei))
                        || e.fes == FatalError::DataTransferLimitExceeded,
                    "byte {i} bit {bit}: {e}"
                ),
                _ => assert_eq!(e.fes, FatalError::HeaderDigestError, "byte {i} bit {bit}"),
            }
        }
    }
    // Any bit of the data or its digest: the PDU decodes, the digest is reported bad.
    for i in (76..b.len()).step_by(97).chain([b.len() - 1]) {
        let mut x = b.clone();
        x[i] ^= 0x01;
        let pdu = dec.decode(&x).unwrap();
        let nvme_wire::pdu::Decoded::Pdu(p) = pdu else {
            panic!("{pdu:?}")
        };
        assert!(!p.data_digest_ok, "byte {i}");
    }
    // A connection that did not negotiate digests rejects the flags (fei 1).
    let e = decoder(NO_DIGEST, 0).decode(&b).unwrap_err();
    assert_eq!((e.fes, e.fei), (FatalError::InvalidHeaderField, 1));
    // And the other way round.
    let plain = load("linux-6.1-host/connect-admin-plain.bin");
    let e = dec.decode(&plain).unwrap_err();
    assert_eq!((e.fes, e.fei), (FatalError::InvalidHeaderField, 1));
}
