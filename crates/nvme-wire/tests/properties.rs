//! Property tests: the PDU decoder against arbitrary and mutated input under every
//! digest and alignment setting, encode/decode round trips for arbitrary headers and
//! data, and the structure parsers (Connect data, Identify, log pages) against
//! arbitrary bytes and arbitrary values.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (docs/HELPERS.md)

mod common;

use common::*;
use nvme_wire::cqe::Cqe;
use nvme_wire::fabrics::{Cap, Cc, ConnectCmd, ConnectData, Csts, PropertyCmd};
use nvme_wire::identify::{self, IdentifyController, IdentifyNamespace, NsDescriptor};
use nvme_wire::log::{self, DiscoveryEntry, ErrorLogEntry, GetLogPage, SmartLog};
use nvme_wire::pdu::{
    DataHdr, Decoded, Decoder, Encoder, FatalError, IcReq, IcResp, Pdu, PduError, PduHeader,
    PduType, R2t, TermReq, CH_LEN, FLAG_HDGSTF, FLAG_LAST_PDU, FLAG_SUCCESS,
};
use nvme_wire::{DigestConfig, Sqe, Status};
use proptest::prelude::*;

// ------------------------------------------------------------------ strategies --

fn digest_cfg() -> impl Strategy<Value = DigestConfig> {
    (any::<bool>(), any::<bool>()).prop_map(|(header, data)| DigestConfig { header, data })
}

/// Any decoder configuration, including the absurd (PDA above 31, max_data up to
/// usize::MAX): a misconfigured decoder may reject everything but must not panic.
fn any_decoder() -> impl Strategy<Value = Decoder> {
    let max_data = prop_oneof![0..=70_000usize, Just(usize::MAX), any::<usize>()];
    (digest_cfg(), any::<u8>(), max_data).prop_map(|(digest, pda, max_data)| Decoder {
        digest,
        pda,
        max_data,
    })
}

fn status() -> impl Strategy<Value = Status> {
    (0u8..8, any::<u8>(), 0u8..4, any::<bool>(), any::<bool>()).prop_map(
        |(sct, sc, crd, more, dnr)| Status {
            sct,
            sc,
            crd,
            more,
            dnr,
        },
    )
}

fn cqe() -> impl Strategy<Value = Cqe> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u16>(),
        any::<u16>(),
        any::<u16>(),
        status(),
    )
        .prop_map(|(dw0, dw1, sqhd, sqid, cid, status)| Cqe {
            dw0,
            dw1,
            sqhd,
            sqid,
            cid,
            status,
        })
}

fn sqe() -> impl Strategy<Value = Sqe> {
    proptest::collection::vec(any::<u8>(), 64).prop_map(|v| Sqe(v.try_into().unwrap()))
}

/// A header with the data it may carry and the flags it is sent with.
fn pdu_parts() -> impl Strategy<Value = (PduHeader, u8, Vec<u8>)> {
    let data = |lo: usize, hi: usize| proptest::collection::vec(any::<u8>(), lo..=hi);
    let flags = prop_oneof![
        Just(0u8),
        Just(FLAG_LAST_PDU),
        Just(FLAG_LAST_PDU | FLAG_SUCCESS)
    ];
    prop_oneof![
        (any::<u16>(), any::<u8>(), digest_cfg(), any::<u32>()).prop_map(|(pfv, hpda, d, m)| {
            (
                PduHeader::ICReq(IcReq {
                    pfv,
                    hpda,
                    digest: d,
                    maxr2t: m,
                }),
                0,
                vec![],
            )
        }),
        (any::<u16>(), any::<u8>(), digest_cfg(), any::<u32>()).prop_map(|(pfv, cpda, d, m)| {
            (
                PduHeader::ICResp(IcResp {
                    pfv,
                    cpda,
                    digest: d,
                    maxh2cdata: m,
                }),
                0,
                vec![],
            )
        }),
        (any::<bool>(), any::<u16>(), any::<u32>(), data(0, 128)).prop_map(|(c2h, fes, fei, d)| {
            let t = TermReq { fes, fei };
            let h = if c2h {
                PduHeader::C2HTermReq(t)
            } else {
                PduHeader::H2CTermReq(t)
            };
            (h, 0, d)
        }),
        (sqe(), data(0, 2048)).prop_map(|(s, d)| (PduHeader::CapsuleCmd(s), 0, d)),
        cqe().prop_map(|c| (PduHeader::CapsuleResp(c), 0, vec![])),
        (
            any::<bool>(),
            any::<(u16, u16, u32)>(),
            flags,
            data(1, 2048)
        )
            .prop_map(|(c2h, (cccid, ttag, datao), f, d)| {
                let h = DataHdr {
                    cccid,
                    ttag,
                    datao,
                    datal: d.len() as u32,
                };
                let h = if c2h {
                    PduHeader::C2HData(h)
                } else {
                    PduHeader::H2CData(h)
                };
                (h, f, d)
            }),
        any::<(u16, u16, u32, u32)>().prop_map(|(cccid, ttag, r2to, r2tl)| {
            (
                PduHeader::R2T(R2t {
                    cccid,
                    ttag,
                    r2to,
                    r2tl,
                }),
                0,
                vec![],
            )
        }),
    ]
}

/// Bytes that start with a plausible common header (known type, its hlen, random
/// flags, pdo and a small plen), so that random input gets past the first checks.
fn plausible_bytes() -> impl Strategy<Value = Vec<u8>> {
    let ty = prop::sample::select(vec![0u8, 1, 2, 3, 4, 5, 6, 7, 9]);
    (
        ty,
        any::<u8>(),
        any::<u8>(),
        0u32..400,
        proptest::collection::vec(any::<u8>(), 0..400),
    )
        .prop_map(|(t, flags, pdo, plen, rest)| {
            let hlen = PduType::from_u8(t).unwrap().hlen() as u8;
            let mut b = vec![t, flags, hlen, pdo];
            b.extend_from_slice(&plen.to_le_bytes());
            b.extend(rest);
            b
        })
}

/// Only PDUs that carry data and digests: CapsuleCmd with data, H2CData, C2HData.
fn data_pdu_parts() -> impl Strategy<Value = (PduHeader, u8, Vec<u8>)> {
    pdu_parts().prop_map(|(h, f, mut d)| {
        let h = match h {
            h @ (PduHeader::CapsuleCmd(_) | PduHeader::H2CData(_) | PduHeader::C2HData(_)) => h,
            _ => PduHeader::CapsuleCmd(Sqe::new(0x01, 1)),
        };
        if d.is_empty() {
            // Only a CapsuleCmd can come without data; data PDUs already match datal.
            d.push(0x5a);
        }
        (h, f, d)
    })
}

/// Only PDU types that carry digests when negotiated.
fn digestible_parts() -> impl Strategy<Value = (PduHeader, u8, Vec<u8>)> {
    (pdu_parts(), cqe()).prop_map(|((h, f, d), c)| {
        if h.pdu_type().digestible() {
            (h, f, d)
        } else {
            (PduHeader::CapsuleResp(c), 0, vec![])
        }
    })
}

fn encode(enc: Encoder, h: &PduHeader, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    enc.pdu(h, flags, data, &mut out);
    out
}

// ------------------------------------------------------------------ invariants --

/// What must hold for any decode result, whatever the input.
fn check_decode(dec: &Decoder, buf: &[u8]) -> Result<Decoded, PduError> {
    let r = dec.decode(buf);
    match &r {
        Ok(Decoded::Need(n)) => {
            assert!(
                *n > buf.len(),
                "Need({n}) with {} bytes: no progress",
                buf.len()
            );
            assert!(
                *n <= dec.max_plen(),
                "Need({n}) beyond max_plen {}",
                dec.max_plen()
            );
        }
        Ok(Decoded::Pdu(p)) => check_pdu(dec, buf, p),
        Err(e) => {
            if e.fes == FatalError::InvalidHeaderField {
                assert!(e.fei < 24, "fei {} is not a header offset", e.fei);
            }
        }
    }
    // Deterministic, and blind to anything past the PDU.
    assert_eq!(dec.decode(buf), r);
    if let Ok(Decoded::Pdu(p)) = &r {
        assert_eq!(dec.decode(&buf[..p.plen]), r, "looked past plen");
    }
    r
}

fn check_pdu(dec: &Decoder, buf: &[u8], p: &Pdu) {
    let ty = p.header.pdu_type();
    assert!(p.plen <= buf.len());
    assert!(
        p.plen <= dec.max_plen(),
        "plen {} > max_plen {}",
        p.plen,
        dec.max_plen()
    );
    assert_eq!(p.hlen, ty.hlen());
    assert!(p.plen >= p.hlen);
    assert!(p.data_offset + p.data_len <= p.plen, "data outside the PDU");
    if p.data_len > 0 {
        assert!(p.data_offset >= p.hlen, "data overlaps the header");
    }
    let _ = p.data(buf);
    match ty {
        PduType::H2CTermReq | PduType::C2HTermReq => assert!(p.data_len <= 128),
        PduType::CapsuleCmd | PduType::H2CData | PduType::C2HData => {
            assert!(p.data_len <= dec.max_data);
            if ty != PduType::CapsuleCmd {
                assert!(p.data_len > 0);
            }
        }
        _ => assert_eq!(p.data_len, 0),
    }
    if ty.digestible() {
        assert_eq!(p.flags & FLAG_HDGSTF != 0, dec.digest.header);
        if dec.digest.header {
            assert_eq!(le32(buf, p.hlen), crc32c_reference(&buf[..p.hlen]), "HDGST");
        }
        if p.data_len > 0 && dec.pda != 0 && dec.pda <= 31 {
            assert_eq!(p.data_offset % ((dec.pda as usize + 1) * 4), 0, "PDA");
        }
    }
}

/// A stream decoder sees bytes arrive in pieces: whatever a prefix decodes to
/// (an error or a PDU) the whole buffer must decode to the same.
fn check_prefix_consistent(dec: &Decoder, buf: &[u8], cut: usize) {
    let cut = cut.min(buf.len());
    let full = dec.decode(buf);
    match check_decode(dec, &buf[..cut]) {
        Ok(Decoded::Need(_)) => {}
        part => assert_eq!(part, full, "prefix of {cut} bytes disagrees"),
    }
}

// ------------------------------------------------------------------ properties --

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decode_arbitrary_bytes(dec in any_decoder(), buf in proptest::collection::vec(any::<u8>(), 0..600), cut in any::<usize>()) {
        let _ = check_decode(&dec, &buf);
        check_prefix_consistent(&dec, &buf, cut % (buf.len() + 1));
    }

    #[test]
    fn decode_plausible_headers(dec in any_decoder(), buf in plausible_bytes(), cut in any::<usize>()) {
        let _ = check_decode(&dec, &buf);
        check_prefix_consistent(&dec, &buf, cut % (buf.len() + 1));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    /// Encode, then decode: the same header, flags and data come back, every strict
    /// prefix asks for more, and a following PDU changes nothing.
    #[test]
    fn encode_decode_round_trip(
        (h, flags, data) in pdu_parts(),
        digest in digest_cfg(),
        pda in 0u8..=31,
        cut in any::<usize>(),
    ) {
        let enc = Encoder { digest, pda };
        let out = encode(enc, &h, flags, &data);
        let dec = Decoder { digest, pda, max_data: data.len() };
        let p = match check_decode(&dec, &out) {
            Ok(Decoded::Pdu(p)) => p,
            other => panic!("{h:?}: {other:?}"),
        };
        prop_assert_eq!(p.header, h);
        prop_assert_eq!(p.plen, out.len());
        prop_assert_eq!(p.data(&out), &data[..]);
        prop_assert!(p.data_digest_ok);
        prop_assert_eq!(p.flags & (FLAG_LAST_PDU | FLAG_SUCCESS), flags);
        let ty = h.pdu_type();
        let hd = if ty.digestible() && digest.header { 4 } else { 0 };
        let dd = if ty.digestible() && digest.data && !data.is_empty() { 4 } else { 0 };
        if data.is_empty() {
            prop_assert_eq!(out.len(), ty.hlen() + hd);
        } else {
            prop_assert_eq!(out.len(), p.data_offset + data.len() + dd);
            check_digests(&out, &p, if ty.digestible() { digest } else { NO_DIGEST });
        }
        // Re-encoding the decoded PDU gives the same bytes.
        prop_assert_eq!(reencode(&p, &out, digest, pda), out.clone());
        // Streaming: a strict prefix needs more; a following PDU is not looked at.
        let k = cut % out.len();
        match dec.decode(&out[..k]) {
            Ok(Decoded::Need(n)) => prop_assert!(n > k && n <= out.len()),
            other => panic!("prefix {k}: {other:?}"),
        }
        let mut two = out.clone();
        two.extend_from_slice(&out);
        prop_assert_eq!(dec.decode(&two), Ok(Decoded::Pdu(p)));
    }

    /// A valid PDU with a few bytes changed, cut or extended: no panic, the usual
    /// invariants, and a consistent answer for every prefix.
    #[test]
    fn decode_mutated_pdus(
        (h, flags, data) in pdu_parts(),
        digest in digest_cfg(),
        pda in 0u8..=31,
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 0..4),
        resize in prop_oneof![Just(None), (any::<usize>()).prop_map(Some)],
        cut in any::<usize>(),
        max_data in prop_oneof![Just(None), (0usize..4096).prop_map(Some)],
    ) {
        let mut b = encode(Encoder { digest, pda }, &h, flags, &data);
        for (at, x) in flips {
            let n = b.len();
            b[at % n] ^= x;
        }
        if let Some(r) = resize {
            b.resize(r % (b.len() + 64), 0xA5);
        }
        let dec = Decoder { digest, pda, max_data: max_data.unwrap_or(data.len()) };
        let _ = check_decode(&dec, &b);
        check_prefix_consistent(&dec, &b, cut % (b.len() + 1));
    }

    /// With a header digest, corrupting any byte after the type and hlen fails as
    /// soon as the header and its digest are in: never a PDU, never "need more".
    #[test]
    fn header_digest_catches_header_corruption(
        (h, flags, data) in digestible_parts(),
        data_digest in any::<bool>(),
        at in any::<usize>(),
        x in 1u8..=255,
    ) {
        let ty = h.pdu_type();
        let digest = DigestConfig { header: true, data: data_digest };
        let mut b = encode(Encoder { digest, pda: 0 }, &h, flags, &data);
        let span = ty.hlen() + 4;
        let i = [1usize, 3].into_iter().chain(4..span).nth(at % (span - 2)).unwrap();
        b[i] ^= x;
        let dec = Decoder { digest, pda: 0, max_data: data.len() };
        let e = dec.decode(&b[..span]).unwrap_err();
        if i == 1 && x & FLAG_HDGSTF != 0 {
            prop_assert_eq!(e.fes, FatalError::InvalidHeaderField);
        } else if (3..8).contains(&i) && e.fes != FatalError::HeaderDigestError {
            // PDO or PLEN pushed out of range fails from the common header.
            prop_assert!(
                (e.fes == FatalError::InvalidHeaderField && (e.fei == 3 || e.fei == 4))
                    || e.fes == FatalError::DataTransferLimitExceeded,
                "byte {} ^ {:#x}: {}", i, x, e
            );
        } else {
            prop_assert_eq!(e.fes, FatalError::HeaderDigestError, "byte {} ^ {:#x}", i, x);
        }
    }

    /// With a data digest, corrupting the data or its digest keeps the PDU but marks it.
    #[test]
    fn data_digest_catches_data_corruption(
        (h, flags, data) in data_pdu_parts(),
        header_digest in any::<bool>(),
        at in any::<usize>(),
        x in 1u8..=255,
    ) {
        let ty = h.pdu_type();
        let digest = DigestConfig { header: header_digest, data: true };
        let mut b = encode(Encoder { digest, pda: 0 }, &h, flags, &data);
        let start = ty.hlen() + if header_digest { 4 } else { 0 };
        let i = start + at % (b.len() - start);
        b[i] ^= x;
        let dec = Decoder { digest, pda: 0, max_data: data.len() };
        match dec.decode(&b) {
            Ok(Decoded::Pdu(p)) => prop_assert!(!p.data_digest_ok),
            other => panic!("{other:?}"),
        }
    }

    /// PDA values above 31 are invalid; encoder and decoder still agree on them and
    /// the PDO never wraps around its byte.
    #[test]
    fn any_pda_round_trips(
        (h, flags, data) in pdu_parts(),
        digest in digest_cfg(),
        pda in any::<u8>(),
    ) {
        let out = encode(Encoder { digest, pda }, &h, flags, &data);
        let dec = Decoder { digest, pda, max_data: data.len() };
        match dec.decode(&out) {
            Ok(Decoded::Pdu(p)) => {
                prop_assert_eq!(p.header, h);
                prop_assert_eq!(p.data(&out), &data[..]);
                prop_assert_eq!(p.plen, out.len());
            }
            other => panic!("pda {pda}: {other:?}"),
        }
    }
}

// ------------------------------------------------------- structure parsers --

fn nqn() -> impl Strategy<Value = String> {
    "[a-z0-9.:-]{0,223}"
}

fn ascii(max: usize) -> impl Strategy<Value = String> {
    // Printable, no trailing space (the field readers trim padding).
    proptest::string::string_regex(&format!("([!-~]([ -~]{{0,{}}}[!-~])?)?", max - 2)).unwrap()
}

fn identify_controller() -> impl Strategy<Value = IdentifyController> {
    let a = (
        any::<(u16, u16, u8, [u8; 3], u8, u8, u16, u32)>(),
        ascii(20),
        ascii(40),
        ascii(8),
    );
    let b = any::<(u32, u32, u8, u16, u8, u8, u8, u8, u8, u16)>();
    let c = (
        any::<(u8, u8, u16, u32, u16, u16)>(),
        any::<(u8, u8, u16, u16, u16, u32)>(),
    );
    let d = (nqn(), any::<(u32, u32, u16, u8, u8)>());
    (a, b, c, d).prop_map(|(a, b, c, d)| {
        let ((vid, ssvid, rab, ieee, cmic, mdts, cntlid, ver), serial, model, firmware) = a;
        let (oaes, ctratt, cntrltype, oacs, acl, aerl, frmw, lpa, elpe, kas) = b;
        let ((sqes, cqes, maxcmd, nn, oncs, fuses), (fna, vwc, awun, awupf, acwu, sgls)) = c;
        let (subnqn, (ioccsz, iorcsz, icdoff, fcatt, msdbd)) = d;
        IdentifyController {
            vid,
            ssvid,
            serial,
            model,
            firmware,
            rab,
            ieee,
            cmic,
            mdts,
            cntlid,
            ver,
            oaes,
            ctratt,
            cntrltype,
            oacs,
            acl,
            aerl,
            frmw,
            lpa,
            elpe,
            kas,
            sqes,
            cqes,
            maxcmd,
            nn,
            oncs,
            fuses,
            fna,
            vwc,
            awun,
            awupf,
            acwu,
            sgls,
            subnqn,
            ioccsz,
            iorcsz,
            icdoff,
            fcatt,
            msdbd,
        }
    })
}

fn identify_namespace() -> impl Strategy<Value = IdentifyNamespace> {
    (
        any::<(u64, u64, u64, u8, u8, u8, u8, u8)>(),
        any::<[u8; 16]>(),
        any::<[u8; 8]>(),
        any::<u8>(),
    )
        .prop_map(
            |((nsze, ncap, nuse, nsfeat, nlbaf, flbas, dlfeat, nmic), nguid, eui64, lbads)| {
                IdentifyNamespace {
                    nsze,
                    ncap,
                    nuse,
                    nsfeat,
                    nlbaf,
                    flbas,
                    dlfeat,
                    nmic,
                    nguid,
                    eui64,
                    lbads,
                }
            },
        )
}

fn discovery_entry() -> impl Strategy<Value = DiscoveryEntry> {
    (
        any::<(u8, u8, u8, u8, u16, u16, u16, u8)>(),
        ascii(32),
        nqn(),
        ascii(256),
    )
        .prop_map(
            |(
                (trtype, adrfam, subtype, treq, portid, cntlid, asqsz, sectype),
                trsvcid,
                subnqn,
                traddr,
            )| {
                DiscoveryEntry {
                    trtype,
                    adrfam,
                    subtype,
                    treq,
                    portid,
                    cntlid,
                    asqsz,
                    trsvcid,
                    subnqn,
                    traddr,
                    sectype,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    /// Every parser takes any bytes, of any length, without panicking.
    #[test]
    fn parsers_take_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..5000), s in sqe()) {
        let _ = ConnectData::from_bytes(&b);
        let _ = IdentifyController::from_bytes(&b);
        let _ = IdentifyNamespace::from_bytes(&b);
        let _ = identify::parse_active_ns_list(&b);
        let _ = identify::parse_ns_descriptor_list(&b);
        let _ = DiscoveryEntry::from_bytes(&b);
        if let Some((_, numrec, v)) = log::parse_discovery_log(&b) {
            prop_assert!(v.len() as u64 <= numrec);
            prop_assert!(v.len() <= b.len().saturating_sub(1024) / 1024);
        }
        let _ = ErrorLogEntry::from_bytes(&b);
        let _ = SmartLog::from_bytes(&b);
        let _ = ConnectCmd::from_sqe(&s);
        let _ = PropertyCmd::from_sqe(&s);
        let _ = GetLogPage::from_sqe(&s);
        let _ = (s.sgl(), s.nlb(), s.slba(), format!("{s:?}"));
    }

    /// Byte-level round trips: what decodes re-encodes to the same bytes.
    #[test]
    fn cqe_and_status_bytes_round_trip(b in any::<[u8; 16]>()) {
        let c = Cqe::from_bytes(&b);
        let mut want = b;
        want[14] &= !1; // the phase bit is not NVMe/TCP's
        prop_assert_eq!(c.to_bytes(), want);
        let f = u16::from_le_bytes([b[14], b[15]]);
        prop_assert_eq!(Status::from_field(f).to_field(f & 1 != 0), f);
    }

    #[test]
    fn connect_data_round_trip(hostid in any::<[u8; 16]>(), cntlid in any::<u16>(), subnqn in nqn(), hostnqn in nqn()) {
        let d = ConnectData { hostid, cntlid, subnqn, hostnqn };
        let b = d.to_bytes();
        prop_assert_eq!(b[255], 0);
        prop_assert_eq!(b[767], 0);
        prop_assert_eq!(ConnectData::from_bytes(&b), Some(d));
    }

    #[test]
    fn connect_cmd_round_trip(c in any::<(u16, u16, u16, u8, u32)>(), cid in any::<u16>()) {
        let c = ConnectCmd { recfmt: c.0, qid: c.1, sqsize: c.2, cattr: c.3, kato: c.4 };
        let s = c.to_sqe(cid);
        prop_assert_eq!((s.opcode(), s.fctype(), s.cid(), s.0[39]), (0x7f, 1, cid, 0x01));
        prop_assert_eq!(ConnectCmd::from_sqe(&s), c);
    }

    #[test]
    fn identify_controller_round_trip(c in identify_controller()) {
        let b = c.to_bytes();
        prop_assert_eq!(IdentifyController::from_bytes(&b[..]), Some(c));
    }

    #[test]
    fn identify_namespace_round_trip(n in identify_namespace()) {
        let b = n.to_bytes();
        prop_assert_eq!(IdentifyNamespace::from_bytes(&b[..]), Some(n));
    }

    #[test]
    fn discovery_log_round_trip(genctr in any::<u64>(), entries in proptest::collection::vec(discovery_entry(), 0..4)) {
        let b = log::discovery_log(genctr, &entries);
        prop_assert_eq!(b.len(), 1024 * (1 + entries.len()));
        let (g, n, v) = log::parse_discovery_log(&b).unwrap();
        prop_assert_eq!((g, n), (genctr, entries.len() as u64));
        prop_assert_eq!(v, entries);
    }

    #[test]
    fn ns_lists_round_trip(
        nsids in proptest::collection::vec(1u32.., 0..100),
        after in any::<u32>(),
        descs in proptest::collection::vec(prop_oneof![
            any::<[u8; 8]>().prop_map(NsDescriptor::Eui64),
            any::<[u8; 16]>().prop_map(NsDescriptor::Nguid),
            any::<[u8; 16]>().prop_map(NsDescriptor::Uuid),
            any::<u8>().prop_map(NsDescriptor::Csi),
        ], 0..20),
    ) {
        let mut want: Vec<u32> = nsids.iter().copied().filter(|&n| n > after).collect();
        want.sort_unstable();
        prop_assert_eq!(identify::parse_active_ns_list(&identify::active_ns_list(&nsids, after)[..]), want);
        prop_assert_eq!(identify::parse_ns_descriptor_list(&identify::ns_descriptor_list(&descs)[..]), descs);
    }

    #[test]
    fn log_structures_round_trip(
        lid in any::<u8>(), lsp in 0u8..16, rae in any::<bool>(), numd in any::<u32>(), offset in any::<u64>(),
        e in any::<(u64, u16, u16, u16, u64, u32, u8)>(), st in status(),
        s in any::<(u8, u16, u8, u8, u8, [u64; 9])>(),
    ) {
        let g = GetLogPage { lid, lsp, rae, len: (numd as usize + 1) * 4, offset };
        let mut sqe = Sqe::new(0x02, 1);
        g.write_sqe(&mut sqe);
        prop_assert_eq!(GetLogPage::from_sqe(&sqe), g);
        let el = ErrorLogEntry { error_count: e.0, sqid: e.1, cid: e.2, status: st, param_location: e.3, lba: e.4, nsid: e.5, trtype: e.6 };
        let mut b = [0u8; 64];
        el.write_to(&mut b);
        prop_assert_eq!(ErrorLogEntry::from_bytes(&b), Some(el));
        let (critical_warning, temperature, avail_spare, spare_thresh, percent_used, c) = s;
        let sl = SmartLog {
            critical_warning, temperature, avail_spare, spare_thresh, percent_used,
            data_units_read: c[0], data_units_written: c[1], host_reads: c[2], host_writes: c[3],
            power_cycles: c[4], power_on_hours: c[5], unsafe_shutdowns: c[6], media_errors: c[7],
            num_err_log_entries: c[8],
        };
        prop_assert_eq!(SmartLog::from_bytes(&sl.to_bytes()), Some(sl));
    }

    #[test]
    fn registers_round_trip(
        cap in any::<(u16, bool, u8, u8, bool, u8, u8, u8)>(),
        cc in any::<(bool, u8, u8, u8, u8, u8, u8)>(),
        csts in any::<(bool, bool, u8)>(),
        size8 in any::<bool>(), off in any::<u32>(), val in any::<u64>(), cid in any::<u16>(),
    ) {
        let cap = Cap { mqes: cap.0, cqr: cap.1, to: cap.2, dstrd: cap.3 & 0xF, nssrs: cap.4, css: cap.5, mpsmin: cap.6 & 0xF, mpsmax: cap.7 & 0xF };
        prop_assert_eq!(Cap::from_u64(cap.to_u64()), cap);
        let cc = Cc { en: cc.0, css: cc.1 & 7, mps: cc.2 & 0xF, ams: cc.3 & 7, shn: cc.4 & 3, iosqes: cc.5 & 0xF, iocqes: cc.6 & 0xF };
        prop_assert_eq!(Cc::from_u32(cc.to_u32()), cc);
        let csts = Csts { rdy: csts.0, cfs: csts.1, shst: csts.2 & 3 };
        prop_assert_eq!(Csts::from_u32(csts.to_u32()), csts);
        let set = PropertyCmd::from_sqe(&PropertyCmd::set_sqe(cid, off, val, size8));
        prop_assert_eq!(set, PropertyCmd { size8, offset: off, value: val });
        let get = PropertyCmd::from_sqe(&PropertyCmd::get_sqe(cid, off, size8));
        prop_assert_eq!(get, PropertyCmd { size8, offset: off, value: 0 });
    }
}

#[test]
fn max_plen_bounds_what_a_receiver_buffers() {
    for max_data in [0, 4096, 1 << 20, usize::MAX] {
        let dec = Decoder {
            digest: BOTH_DIGESTS,
            pda: 31,
            max_data,
        };
        assert!(dec.max_plen() >= 128);
        // The largest CapsuleCmd a peer honouring PDA 31 sends: header and HDGST
        // padded to 128 bytes, data, DDGST.
        assert!(dec.max_plen() >= (128 + 4usize).saturating_add(max_data));
    }
    let _ = CH_LEN;
}
