//! Fixtures laid out by hand from the specifications (tests/fixtures/hand/*.hex, one
//! commented line per field; digests computed with an independent CRC32C). Each is
//! decoded and compared with the typed value it describes, and the typed value is
//! encoded and compared with the fixture, byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (docs/HELPERS.md)

mod common;

use common::*;
use nvme_wire::cqe::Cqe;
use nvme_wire::fabrics::{connect_data_offset, connect_invalid_param};
use nvme_wire::identify::{
    IdentifyController, IdentifyNamespace, CNTRLTYPE_IO, ONCS_DSM, ONCS_WRITE_ZEROES,
};
use nvme_wire::log::{self, DiscoveryEntry};
use nvme_wire::pdu::{
    self, DataHdr, Decoded, Encoder, FatalError, IcResp, PduError, PduHeader, R2t, TermReq,
    FLAG_LAST_PDU, FLAG_SUCCESS,
};
use nvme_wire::status::CommandSpecificStatus;
use nvme_wire::{DigestConfig, Status};

/// Encodes `h` with `data` as a peer with these settings would.
fn encode(h: PduHeader, flags: u8, data: &[u8], digest: DigestConfig, pda: u8) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder { digest, pda }.pdu(&h, flags, data, &mut out);
    out
}

#[test]
fn icresp() {
    let b = load("hand/icresp.hex");
    let p = decode_roundtrip(&b, NO_DIGEST, 0);
    let want = IcResp {
        pfv: 0,
        cpda: 1,
        digest: BOTH_DIGESTS,
        maxh2cdata: 131072,
    };
    assert_eq!(p.header, PduHeader::ICResp(want));
    assert_eq!(encode(p.header, 0, &[], NO_DIGEST, 0), b);
    // ICResp never carries digests, even on a connection that has them.
    assert_eq!(encode(p.header, 0, &[], BOTH_DIGESTS, 3), b);
}

#[test]
fn capsule_resp_connect_ok_with_header_digest() {
    let b = load("hand/capsule-resp-connect-ok-hdgst.hex");
    let p = decode_roundtrip(&b, BOTH_DIGESTS, 0);
    check_digests(&b, &p, BOTH_DIGESTS);
    let want = Cqe {
        dw0: 2,
        dw1: 0,
        sqhd: 1,
        sqid: 0,
        cid: 0,
        status: Status::SUCCESS,
    };
    assert_eq!(p.header, PduHeader::CapsuleResp(want));
    assert_eq!(encode(p.header, 0, &[], BOTH_DIGESTS, 0), b);
    // Header digest only: the data digest setting changes nothing without data.
    let hd_only = DigestConfig {
        header: true,
        data: false,
    };
    assert_eq!(encode(p.header, 0, &[], hd_only, 0), b);
}

#[test]
fn capsule_resp_connect_invalid_parameters() {
    let b = load("hand/capsule-resp-connect-invalid.hex");
    let p = decode_roundtrip(&b, NO_DIGEST, 0);
    let status =
        Status::command_specific(CommandSpecificStatus::ConnectInvalidParameters).with_dnr();
    let want = Cqe {
        dw0: connect_invalid_param(connect_data_offset::SUBNQN, true),
        dw1: 0,
        sqhd: 1,
        sqid: 0,
        cid: 7,
        status,
    };
    assert_eq!(p.header, PduHeader::CapsuleResp(want));
    assert_eq!(want.dw0, 0x0001_0100);
    assert_eq!(status.to_field(false), 0x8304);
    assert_eq!(encode(p.header, 0, &[], NO_DIGEST, 0), b);
}

#[test]
fn r2t_with_header_digest() {
    let b = load("hand/r2t-hdgst.hex");
    let p = decode_roundtrip(&b, BOTH_DIGESTS, 0);
    check_digests(&b, &p, BOTH_DIGESTS);
    let want = R2t {
        cccid: 0x11,
        ttag: 3,
        r2to: 8192,
        r2tl: 65536,
    };
    assert_eq!(p.header, PduHeader::R2T(want));
    assert_eq!((p.pdo, p.data_len), (0, 0));
    assert_eq!(encode(p.header, 0, &[], BOTH_DIGESTS, 0), b);
}

#[test]
fn h2c_data_with_digests_and_padding() {
    let b = load("hand/h2cdata-hdgst-ddgst-cpda1.hex");
    // The controller decodes with its own CPDA; the host encodes with it too.
    let p = decode_roundtrip(&b, BOTH_DIGESTS, 1);
    check_digests(&b, &p, BOTH_DIGESTS);
    let want = DataHdr {
        cccid: 0x11,
        ttag: 3,
        datao: 8192,
        datal: 5,
    };
    assert_eq!(p.header, PduHeader::H2CData(want));
    assert_eq!((p.pdo, p.data_offset, p.data_len, p.plen), (32, 32, 5, 41));
    assert_eq!(p.data(&b), b"hello");
    assert!(p.last_pdu() && !p.success());
    assert_eq!(&b[28..32], &[0; 4], "padding is zero");
    assert_eq!(
        encode(p.header, FLAG_LAST_PDU, b"hello", BOTH_DIGESTS, 1),
        b
    );
    // The digest is over the zero-padded data; over the bare 5 bytes it would differ.
    assert_eq!(le32(&b, 37), 0x9003_edb3);
    assert_ne!(crc32c_reference(b"hello"), 0x9003_edb3);
    // Without the alignment the same PDU is 4 bytes shorter and still valid...
    let tight = encode(p.header, FLAG_LAST_PDU, b"hello", BOTH_DIGESTS, 0);
    assert_eq!((tight[3], tight.len()), (28, 37));
    // ...but a controller that asked for CPDA 1 rejects it (fes 1, fei 3: PDO).
    let e = decoder(BOTH_DIGESTS, 1).decode(&tight).unwrap_err();
    assert_eq!((e.fes, e.fei), (FatalError::InvalidHeaderField, 3));
}

#[test]
fn c2h_data_success_with_digests_and_padding() {
    let b = load("hand/c2hdata-success-hdgst-ddgst-hpda2.hex");
    let p = decode_roundtrip(&b, BOTH_DIGESTS, 2);
    check_digests(&b, &p, BOTH_DIGESTS);
    let want = DataHdr {
        cccid: 0x21,
        ttag: 0,
        datao: 4096,
        datal: 6,
    };
    assert_eq!(p.header, PduHeader::C2HData(want));
    assert_eq!((p.pdo, p.data_len, p.plen), (36, 6, 46));
    assert_eq!(p.data(&b), b"corral");
    assert!(p.last_pdu() && p.success());
    assert_eq!(
        encode(
            p.header,
            FLAG_LAST_PDU | FLAG_SUCCESS,
            b"corral",
            BOTH_DIGESTS,
            2
        ),
        b
    );
}

#[test]
fn c2h_term_req_carries_the_offending_header() {
    let b = load("hand/c2h-term-req.hex");
    let p = decode_roundtrip(&b, NO_DIGEST, 0);
    assert_eq!(p.header, PduHeader::C2HTermReq(TermReq { fes: 1, fei: 3 }));
    assert_eq!(
        FatalError::from_u16(1),
        Some(FatalError::InvalidHeaderField)
    );
    assert_eq!((p.data_offset, p.data_len), (24, 24));
    // TermReq PDUs have no digests, whatever the connection negotiated.
    let p2 = decode_roundtrip(&b, BOTH_DIGESTS, 3);
    assert_eq!(p2.header, p.header);

    // The carried header is an H2CData whose PDO points inside its header. Decoding
    // it (with its 5 bytes of data) yields exactly this error...
    let mut bad = p.data(&b).to_vec();
    bad.extend_from_slice(b"hello");
    let err = decoder(NO_DIGEST, 0).decode(&bad).unwrap_err();
    assert_eq!((err.fes, err.fei), (FatalError::InvalidHeaderField, 3));
    // ...and the crate's TermReq builder turns it into this fixture.
    let mut out = Vec::new();
    pdu::term_req(&err, &bad, true, &mut out);
    assert_eq!(out, b);
    let err = PduError::new(FatalError::InvalidHeaderField, 3, "pdo");
    let mut out = Vec::new();
    pdu::term_req(&err, &bad, false, &mut out);
    assert_eq!(out[0], 0x02, "H2CTermReq when the host reports it");
    assert_eq!(&out[1..], &b[1..]);
}

#[test]
fn identify_controller() {
    let b = load("hand/identify-ctrl.hex");
    let id = IdentifyController::from_bytes(&b).unwrap();
    let want = IdentifyController {
        vid: 0x1234,
        ssvid: 0x5678,
        serial: "CORRAL-0000001".into(),
        model: "corral volume".into(),
        firmware: "0.1.0".into(),
        rab: 6,
        ieee: [0x0a, 0x0b, 0x0c],
        cmic: 0x02,
        mdts: 5,
        cntlid: 3,
        ver: 0x0001_0400,
        oaes: 1 << 8,
        ctratt: 1,
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
        maxcmd: 128,
        nn: 32,
        oncs: ONCS_DSM | ONCS_WRITE_ZEROES,
        fuses: 0,
        fna: 0,
        vwc: 1,
        awun: 0,
        awupf: 0,
        acwu: 0,
        sgls: 0x0010_0001,
        subnqn: "nqn.2024-01.io.corral:vol1".into(),
        ioccsz: 260,
        iorcsz: 1,
        icdoff: 0,
        fcatt: 1,
        msdbd: 1,
    };
    assert_eq!(id, want);
    assert_eq!(&want.to_bytes()[..], &b[..]);
    assert!(IdentifyController::from_bytes(&b[..4095]).is_none());
}

#[test]
fn identify_namespace_uses_the_format_flbas_selects() {
    let b = load("hand/identify-ns.hex");
    let ns = IdentifyNamespace::from_bytes(&b).unwrap();
    let want = IdentifyNamespace {
        nsze: 262144,
        ncap: 262144,
        nuse: 4096,
        nsfeat: 1,
        nlbaf: 1,
        flbas: 1,
        dlfeat: 9,
        nmic: 1,
        nguid: core::array::from_fn(|i| 0x10 + i as u8),
        eui64: core::array::from_fn(|i| 0x20 + i as u8),
        lbads: 12,
    };
    assert_eq!(ns, want);
    assert_eq!(ns.block_size(), 4096);
    // The encoder writes the one format it models where FLBAS points; format 0
    // (512 bytes) is not modelled.
    let enc = want.to_bytes();
    assert_eq!(&enc[..128], &b[..128]);
    assert_eq!(&enc[128..132], &[0; 4]);
    assert_eq!(&enc[132..], &b[132..]);
    assert_eq!(IdentifyNamespace::from_bytes(&enc[..]).unwrap(), want);
}

#[test]
fn discovery_log_page() {
    let b = load("hand/discovery-log.hex");
    let (genctr, numrec, entries) = log::parse_discovery_log(&b).unwrap();
    assert_eq!((genctr, numrec), (7, 1));
    let want = DiscoveryEntry {
        trtype: log::TRTYPE_TCP,
        adrfam: log::ADRFAM_IPV4,
        subtype: log::SUBTYPE_NVME,
        treq: log::TREQ_NOT_REQUIRED,
        portid: 1,
        cntlid: 0xFFFF,
        asqsz: 32,
        trsvcid: "4420".into(),
        subnqn: "nqn.2024-01.io.corral:vol1".into(),
        traddr: "127.0.0.1".into(),
        sectype: log::TSAS_SECTYPE_NONE,
    };
    assert_eq!(entries, vec![want.clone()]);
    assert_eq!(log::discovery_log(7, &[want]), b);
    // A host reading only the header learns how much to fetch.
    let (_, n, e) = log::parse_discovery_log(&b[..1024]).unwrap();
    assert_eq!((n, e.len()), (1, 0));
}

#[test]
fn hex_format_rejects_overlaps() {
    assert!(parse_hex("0000: 01 02\n0001: 03").is_err());
    assert!(parse_hex("size 2\n0000: 01 02 03").is_err());
    assert_eq!(
        parse_hex("0002: \"ab\" 20*2 # x\nff").unwrap(),
        b"\0\0ab  \xff"
    );
    // The decoder sees a truncated fixture as incomplete, not as an error.
    let b = load("hand/r2t-hdgst.hex");
    assert_eq!(
        decoder(BOTH_DIGESTS, 0).decode(&b[..27]),
        Ok(Decoded::Need(28))
    );
}
