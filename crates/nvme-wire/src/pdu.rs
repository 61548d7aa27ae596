//! NVMe/TCP PDUs: the common header, the PDU-specific headers, digests, and a
//! streaming decoder that validates everything a peer can get wrong.
//!
//! Decoding never panics and never reads past the PDU's own `plen`; a PDU whose
//! `plen` exceeds the configured bound is rejected from its first 8 bytes, so a
//! receiver never buffers more than one maximum-sized PDU.

use crate::cqe::{Cqe, CQE_LEN};
use crate::digest::{crc32c, DataDigest, DIGEST_LEN};
use crate::le::{put_u16, put_u32, u16_at, u32_at};
use crate::sqe::{Sqe, SQE_LEN};

/// Length of the common header.
pub const CH_LEN: usize = 8;
/// Header length of ICReq and ICResp (also their whole length).
pub const IC_LEN: usize = 128;
/// Header length of TermReq, CapsuleResp, H2CData, C2HData and R2T.
pub const SHORT_HLEN: usize = 24;
/// Header length of CapsuleCmd.
pub const CMD_HLEN: usize = 72;
/// The most header bytes a TermReq carries back.
pub const TERM_REQ_MAX_DATA: usize = 128;
/// The largest valid HPDA/CPDA: data aligned to at most (31+1)*4 = 128 bytes.
pub const MAX_PDA: u8 = 31;

/// Data alignment in bytes for a PDA. Values above [`MAX_PDA`] are invalid (a
/// connection rejects them in ICReq/ICResp); they are treated as 31 so that the
/// alignment never exceeds what the one-byte PDO and `max_plen` allow for.
fn data_align(pda: u8) -> usize {
    (pda.min(MAX_PDA) as usize + 1) * 4
}

pub const FLAG_HDGSTF: u8 = 1 << 0;
pub const FLAG_DDGSTF: u8 = 1 << 1;
pub const FLAG_LAST_PDU: u8 = 1 << 2;
pub const FLAG_SUCCESS: u8 = 1 << 3;

/// PDU type codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PduType {
    ICReq = 0x00,
    ICResp = 0x01,
    H2CTermReq = 0x02,
    C2HTermReq = 0x03,
    CapsuleCmd = 0x04,
    CapsuleResp = 0x05,
    H2CData = 0x06,
    C2HData = 0x07,
    R2T = 0x09,
}

impl PduType {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x00 => Self::ICReq,
            0x01 => Self::ICResp,
            0x02 => Self::H2CTermReq,
            0x03 => Self::C2HTermReq,
            0x04 => Self::CapsuleCmd,
            0x05 => Self::CapsuleResp,
            0x06 => Self::H2CData,
            0x07 => Self::C2HData,
            0x09 => Self::R2T,
            _ => return None,
        })
    }
    /// The only legal `hlen` for this type.
    pub fn hlen(self) -> usize {
        match self {
            Self::ICReq | Self::ICResp => IC_LEN,
            Self::CapsuleCmd => CMD_HLEN,
            _ => SHORT_HLEN,
        }
    }
    /// Whether PDUs of this type carry digests when they are negotiated.
    pub fn digestible(self) -> bool {
        !matches!(
            self,
            Self::ICReq | Self::ICResp | Self::H2CTermReq | Self::C2HTermReq
        )
    }
}

/// TermReq fatal error status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FatalError {
    InvalidHeaderField = 1,
    PduSequenceError = 2,
    HeaderDigestError = 3,
    DataTransferOutOfRange = 4,
    DataTransferLimitExceeded = 5,
    UnsupportedParameter = 6,
}

impl FatalError {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::InvalidHeaderField,
            2 => Self::PduSequenceError,
            3 => Self::HeaderDigestError,
            4 => Self::DataTransferOutOfRange,
            5 => Self::DataTransferLimitExceeded,
            6 => Self::UnsupportedParameter,
            _ => return None,
        })
    }
}

/// A protocol violation that ends the connection with a TermReq.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (fes {fes:?}, fei {fei})")]
pub struct PduError {
    pub fes: FatalError,
    /// Fatal error information: for an invalid header field, its byte offset.
    pub fei: u32,
    pub reason: &'static str,
}

impl PduError {
    pub fn new(fes: FatalError, fei: u32, reason: &'static str) -> Self {
        PduError { fes, fei, reason }
    }
    fn field(fei: u32, reason: &'static str) -> Self {
        Self::new(FatalError::InvalidHeaderField, fei, reason)
    }
}

/// Which digests were negotiated for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DigestConfig {
    pub header: bool,
    pub data: bool,
}

/// ICReq (host to controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IcReq {
    pub pfv: u16,
    /// Host PDU data alignment (data starts at a multiple of (hpda+1)*4).
    pub hpda: u8,
    pub digest: DigestConfig,
    /// Maximum outstanding R2Ts per command, 0's based.
    pub maxr2t: u32,
}

/// ICResp (controller to host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IcResp {
    pub pfv: u16,
    pub cpda: u8,
    pub digest: DigestConfig,
    pub maxh2cdata: u32,
}

/// H2CTermReq / C2HTermReq header; the data is the offending PDU header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermReq {
    /// Raw fes value (may be a value this crate does not know).
    pub fes: u16,
    pub fei: u32,
}

/// H2CData / C2HData header (`ttag` is reserved in C2HData).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataHdr {
    pub cccid: u16,
    pub ttag: u16,
    pub datao: u32,
    pub datal: u32,
}

/// R2T header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct R2t {
    pub cccid: u16,
    pub ttag: u16,
    pub r2to: u32,
    pub r2tl: u32,
}

/// A decoded PDU-specific header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PduHeader {
    ICReq(IcReq),
    ICResp(IcResp),
    H2CTermReq(TermReq),
    C2HTermReq(TermReq),
    CapsuleCmd(Sqe),
    CapsuleResp(Cqe),
    H2CData(DataHdr),
    C2HData(DataHdr),
    R2T(R2t),
}

impl PduHeader {
    pub fn pdu_type(&self) -> PduType {
        match self {
            Self::ICReq(_) => PduType::ICReq,
            Self::ICResp(_) => PduType::ICResp,
            Self::H2CTermReq(_) => PduType::H2CTermReq,
            Self::C2HTermReq(_) => PduType::C2HTermReq,
            Self::CapsuleCmd(_) => PduType::CapsuleCmd,
            Self::CapsuleResp(_) => PduType::CapsuleResp,
            Self::H2CData(_) => PduType::H2CData,
            Self::C2HData(_) => PduType::C2HData,
            Self::R2T(_) => PduType::R2T,
        }
    }
}

/// A decoded PDU: its header and where its data sits in the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pdu {
    pub header: PduHeader,
    pub flags: u8,
    pub hlen: usize,
    pub pdo: usize,
    /// Total length of the PDU in the buffer (digests and padding included).
    pub plen: usize,
    /// Offset of the data from the start of the PDU.
    pub data_offset: usize,
    pub data_len: usize,
    /// False when a data digest was present and did not match. The command then
    /// fails with Transient Transport Error rather than the connection ending.
    pub data_digest_ok: bool,
}

impl Pdu {
    pub fn data<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.data_offset..self.data_offset + self.data_len]
    }
    pub fn last_pdu(&self) -> bool {
        self.flags & FLAG_LAST_PDU != 0
    }
    pub fn success(&self) -> bool {
        self.flags & FLAG_SUCCESS != 0
    }
}

/// Outcome of feeding bytes to the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// The buffer holds less than a PDU; at least this many bytes (from the PDU
    /// start) are needed. Without a header digest the whole PDU length is known
    /// once the common header is in; with one, the decoder first asks for the
    /// header and its digest, and waits for `plen` bytes only once that matched.
    Need(usize),
    Pdu(Pdu),
}

/// Stateless PDU decoder configured with what the connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoder {
    /// Digests negotiated for this connection (false until ICReq/ICResp).
    pub digest: DigestConfig,
    /// Receiver's data alignment: data must start at a multiple of (pda+1)*4
    /// (0..=31; larger values act as 31).
    pub pda: u8,
    /// Largest data length accepted in one PDU.
    pub max_data: usize,
}

impl Decoder {
    pub fn new(max_data: usize) -> Self {
        Decoder {
            digest: DigestConfig::default(),
            pda: 0,
            max_data,
        }
    }

    /// The largest `plen` this decoder accepts: what a receive buffer must hold.
    pub fn max_plen(&self) -> usize {
        // Saturating: max_data is configuration, and usize::MAX means "no limit".
        (CMD_HLEN + DIGEST_LEN + 128 + DIGEST_LEN)
            .saturating_add(self.max_data)
            .max(IC_LEN)
    }

    /// Decodes one PDU at the start of `buf`.
    pub fn decode(&self, buf: &[u8]) -> Result<Decoded, PduError> {
        if buf.len() < CH_LEN {
            return Ok(Decoded::Need(CH_LEN));
        }
        let ty = PduType::from_u8(buf[0]).ok_or(PduError::field(0, "unknown PDU type"))?;
        let flags = buf[1];
        let hlen = buf[2] as usize;
        let pdo = buf[3] as usize;
        let plen = u32_at(buf, 4) as usize;
        if hlen != ty.hlen() {
            return Err(PduError::field(2, "hlen does not match the PDU type"));
        }
        let hd = if ty.digestible() && self.digest.header {
            DIGEST_LEN
        } else {
            0
        };
        if ty.digestible() && (flags & FLAG_HDGSTF != 0) != self.digest.header {
            return Err(PduError::field(
                1,
                "HDGSTF does not match the negotiated header digest",
            ));
        }
        let min = hlen + hd;
        match ty {
            PduType::ICReq | PduType::ICResp => {
                if plen != IC_LEN {
                    return Err(PduError::field(4, "ICReq/ICResp plen must be 128"));
                }
                if pdo != 0 {
                    return Err(PduError::field(3, "ICReq/ICResp pdo must be 0"));
                }
            }
            PduType::H2CTermReq | PduType::C2HTermReq => {
                if !(SHORT_HLEN..=SHORT_HLEN + TERM_REQ_MAX_DATA).contains(&plen) {
                    return Err(PduError::field(4, "TermReq plen out of range"));
                }
            }
            PduType::CapsuleResp | PduType::R2T => {
                if plen != min {
                    return Err(PduError::field(4, "plen does not match a PDU without data"));
                }
            }
            PduType::CapsuleCmd | PduType::H2CData | PduType::C2HData => {
                if plen < min {
                    return Err(PduError::field(4, "plen shorter than the header"));
                }
                if plen > self.max_plen() {
                    return Err(PduError::new(
                        FatalError::DataTransferLimitExceeded,
                        0,
                        "PDU larger than the negotiated limit",
                    ));
                }
                if plen > min && (pdo < min || pdo > plen) {
                    return Err(PduError::field(3, "pdo outside the PDU"));
                }
            }
        }
        if hd != 0 {
            // Verify the header digest as soon as the header is in, before waiting
            // for the rest of the PDU: a plen corrupted within the range checked
            // above must fail as a digest error, not leave the receiver waiting for
            // bytes that never come (Linux and SPDK also read header and digest
            // first). Limits that the common header alone breaks fail before this.
            if buf.len() < min {
                return Ok(Decoded::Need(min));
            }
            if u32_at(buf, hlen) != crc32c(&buf[..hlen]) {
                return Err(PduError::new(
                    FatalError::HeaderDigestError,
                    0,
                    "header digest",
                ));
            }
        }
        if buf.len() < plen.max(min) {
            return Ok(Decoded::Need(plen.max(min)));
        }
        // Data section of PDUs that may carry data.
        let (mut data_offset, mut data_len, mut data_digest_ok) = (0, 0, true);
        if matches!(
            ty,
            PduType::CapsuleCmd | PduType::H2CData | PduType::C2HData
        ) && plen > min
        {
            if self.pda != 0 && pdo % data_align(self.pda) != 0 {
                return Err(PduError::field(
                    3,
                    "pdo violates the negotiated data alignment",
                ));
            }
            let dd = if self.digest.data { DIGEST_LEN } else { 0 };
            if (flags & FLAG_DDGSTF != 0) != self.digest.data {
                return Err(PduError::field(
                    1,
                    "DDGSTF does not match the negotiated data digest",
                ));
            }
            if plen < pdo + dd + 1 {
                return Err(PduError::field(4, "plen leaves no room for the data"));
            }
            data_offset = pdo;
            data_len = plen - pdo - dd;
            if data_len > self.max_data {
                return Err(PduError::new(
                    FatalError::DataTransferLimitExceeded,
                    0,
                    "PDU data larger than the negotiated limit",
                ));
            }
            if dd != 0 {
                let mut d = DataDigest::new();
                d.update(&buf[pdo..pdo + data_len]);
                data_digest_ok = u32_at(buf, pdo + data_len) == d.finish();
            }
        }
        let h = &buf[..hlen];
        let header = match ty {
            PduType::ICReq | PduType::ICResp => {
                let pfv = u16_at(h, 8);
                let pda = h[10];
                let digest = DigestConfig {
                    header: h[11] & 1 != 0,
                    data: h[11] & 2 != 0,
                };
                let v = u32_at(h, 12);
                if ty == PduType::ICReq {
                    PduHeader::ICReq(IcReq {
                        pfv,
                        hpda: pda,
                        digest,
                        maxr2t: v,
                    })
                } else {
                    PduHeader::ICResp(IcResp {
                        pfv,
                        cpda: pda,
                        digest,
                        maxh2cdata: v,
                    })
                }
            }
            PduType::H2CTermReq | PduType::C2HTermReq => {
                data_offset = SHORT_HLEN;
                data_len = plen - SHORT_HLEN;
                let t = TermReq {
                    fes: u16_at(h, 8),
                    fei: u32_at(h, 10),
                };
                if ty == PduType::H2CTermReq {
                    PduHeader::H2CTermReq(t)
                } else {
                    PduHeader::C2HTermReq(t)
                }
            }
            PduType::CapsuleCmd => {
                let mut s = [0u8; SQE_LEN];
                s.copy_from_slice(&h[8..8 + SQE_LEN]);
                PduHeader::CapsuleCmd(Sqe(s))
            }
            PduType::CapsuleResp => {
                let mut c = [0u8; CQE_LEN];
                c.copy_from_slice(&h[8..8 + CQE_LEN]);
                PduHeader::CapsuleResp(Cqe::from_bytes(&c))
            }
            PduType::H2CData | PduType::C2HData => {
                let d = DataHdr {
                    cccid: u16_at(h, 8),
                    ttag: u16_at(h, 10),
                    datao: u32_at(h, 12),
                    datal: u32_at(h, 16),
                };
                if d.datal as usize != data_len {
                    return Err(PduError::field(16, "datal does not match the PDU's data"));
                }
                if data_len == 0 {
                    return Err(PduError::field(16, "data PDU without data"));
                }
                if ty == PduType::H2CData {
                    PduHeader::H2CData(d)
                } else {
                    PduHeader::C2HData(d)
                }
            }
            PduType::R2T => PduHeader::R2T(R2t {
                cccid: u16_at(h, 8),
                ttag: u16_at(h, 10),
                r2to: u32_at(h, 12),
                r2tl: u32_at(h, 16),
            }),
        };
        Ok(Decoded::Pdu(Pdu {
            header,
            flags,
            hlen,
            pdo,
            plen,
            data_offset,
            data_len,
            data_digest_ok,
        }))
    }
}

/// Encoder settings: what was negotiated, and the peer's data alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Encoder {
    pub digest: DigestConfig,
    /// The receiver's PDA: data we send starts at a multiple of (pda+1)*4
    /// (0..=31; larger values act as 31, so the PDO always fits its byte).
    pub pda: u8,
}

impl Encoder {
    /// Appends the header of a PDU that will carry `data_len` bytes of data,
    /// with header digest and padding up to the data. The caller appends (or
    /// sends with a vectored write) the data and then [`Encoder::data_digest_len`]
    /// bytes of data digest. Returns the header length written (= pdo, or plen
    /// for PDUs without data).
    pub fn header(&self, h: &PduHeader, flags: u8, data_len: usize, out: &mut Vec<u8>) -> usize {
        let ty = h.pdu_type();
        let hlen = ty.hlen();
        let dig = ty.digestible();
        let hd = if dig && self.digest.header {
            DIGEST_LEN
        } else {
            0
        };
        let dd = if dig && self.digest.data && data_len > 0 {
            DIGEST_LEN
        } else {
            0
        };
        let mut pdo = 0usize;
        let mut plen = hlen + hd;
        if data_len > 0 {
            pdo = hlen + hd;
            if dig && self.pda != 0 {
                let a = data_align(self.pda);
                pdo = pdo.div_ceil(a) * a;
            }
            plen = pdo + data_len + dd;
        }
        let mut f = flags & !(FLAG_HDGSTF | FLAG_DDGSTF);
        if hd != 0 {
            f |= FLAG_HDGSTF;
        }
        if dd != 0 {
            f |= FLAG_DDGSTF;
        }
        if matches!(ty, PduType::H2CTermReq | PduType::C2HTermReq) {
            // TermReq data follows the header directly; pdo stays 0 as Linux and SPDK send it.
            pdo = 0;
            plen = hlen + data_len;
        }
        let start = out.len();
        out.resize(start + hlen, 0);
        let b = &mut out[start..];
        b[0] = ty as u8;
        b[1] = f;
        b[2] = hlen as u8;
        b[3] = pdo as u8;
        put_u32(b, 4, plen as u32);
        match h {
            PduHeader::ICReq(r) => {
                put_u16(b, 8, r.pfv);
                b[10] = r.hpda;
                b[11] = r.digest.header as u8 | (r.digest.data as u8) << 1;
                put_u32(b, 12, r.maxr2t);
            }
            PduHeader::ICResp(r) => {
                put_u16(b, 8, r.pfv);
                b[10] = r.cpda;
                b[11] = r.digest.header as u8 | (r.digest.data as u8) << 1;
                put_u32(b, 12, r.maxh2cdata);
            }
            PduHeader::H2CTermReq(t) | PduHeader::C2HTermReq(t) => {
                put_u16(b, 8, t.fes);
                put_u32(b, 10, t.fei);
            }
            PduHeader::CapsuleCmd(s) => b[8..8 + SQE_LEN].copy_from_slice(&s.0),
            PduHeader::CapsuleResp(c) => c.write_to(&mut b[8..8 + CQE_LEN]),
            PduHeader::H2CData(d) | PduHeader::C2HData(d) => {
                put_u16(b, 8, d.cccid);
                put_u16(b, 10, d.ttag);
                put_u32(b, 12, d.datao);
                put_u32(b, 16, d.datal);
            }
            PduHeader::R2T(r) => {
                put_u16(b, 8, r.cccid);
                put_u16(b, 10, r.ttag);
                put_u32(b, 12, r.r2to);
                put_u32(b, 16, r.r2tl);
            }
        }
        if hd != 0 {
            let d = crc32c(&out[start..start + hlen]);
            out.extend_from_slice(&d.to_le_bytes());
        }
        if data_len > 0 && pdo > hlen + hd {
            out.resize(start + pdo, 0);
        }
        out.len() - start
    }

    /// Length of the data digest that follows `data_len` bytes of data in a PDU of type `ty`.
    pub fn data_digest_len(&self, ty: PduType, data_len: usize) -> usize {
        if ty.digestible() && self.digest.data && data_len > 0 {
            DIGEST_LEN
        } else {
            0
        }
    }

    /// Appends a whole PDU (header, data, digests) to `out`.
    pub fn pdu(&self, h: &PduHeader, flags: u8, data: &[u8], out: &mut Vec<u8>) {
        self.header(h, flags, data.len(), out);
        out.extend_from_slice(data);
        if self.data_digest_len(h.pdu_type(), data.len()) != 0 {
            let mut d = DataDigest::new();
            d.update(data);
            out.extend_from_slice(&d.finish().to_le_bytes());
        }
    }
}

/// Builds the TermReq a receiver sends for `err` about the PDU header in `bad`
/// (the first up to 128 bytes of the offending PDU's header).
pub fn term_req(err: &PduError, bad: &[u8], to_host: bool, out: &mut Vec<u8>) {
    let t = TermReq {
        fes: err.fes as u16,
        fei: err.fei,
    };
    let h = if to_host {
        PduHeader::C2HTermReq(t)
    } else {
        PduHeader::H2CTermReq(t)
    };
    let hlen = if bad.len() >= 3 {
        (bad[2] as usize).clamp(CH_LEN, TERM_REQ_MAX_DATA)
    } else {
        0
    };
    let n = hlen.min(bad.len());
    Encoder::default().pdu(&h, 0, &bad[..n], out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Status;

    fn roundtrip(enc: Encoder, h: PduHeader, flags: u8, data: &[u8]) -> (Vec<u8>, Pdu) {
        let mut out = Vec::new();
        enc.pdu(&h, flags, data, &mut out);
        let dec = Decoder {
            digest: enc.digest,
            pda: enc.pda,
            max_data: 1 << 20,
        };
        match dec.decode(&out).unwrap() {
            Decoded::Pdu(p) => {
                assert_eq!(p.header, h);
                assert_eq!(p.plen, out.len());
                assert_eq!(p.data(&out), data);
                assert!(p.data_digest_ok);
                (out, p)
            }
            d => panic!("incomplete: {d:?}"),
        }
    }

    fn all_digest_configs() -> [DigestConfig; 4] {
        [
            DigestConfig {
                header: false,
                data: false,
            },
            DigestConfig {
                header: true,
                data: false,
            },
            DigestConfig {
                header: false,
                data: true,
            },
            DigestConfig {
                header: true,
                data: true,
            },
        ]
    }

    #[test]
    fn round_trip_every_pdu_type() {
        let mut sqe = Sqe::new(0x01, 9);
        sqe.set_nsid(1);
        for dg in all_digest_configs() {
            for pda in [0u8, 3] {
                let e = Encoder { digest: dg, pda };
                roundtrip(e, PduHeader::CapsuleCmd(sqe), 0, &[]);
                roundtrip(e, PduHeader::CapsuleCmd(sqe), 0, &[7u8; 4096]);
                roundtrip(
                    e,
                    PduHeader::CapsuleResp(Cqe::new(9, Status::SUCCESS)),
                    0,
                    &[],
                );
                let d = DataHdr {
                    cccid: 9,
                    ttag: 3,
                    datao: 512,
                    datal: 13,
                };
                let (_, p) = roundtrip(e, PduHeader::H2CData(d), FLAG_LAST_PDU, &[1u8; 13]);
                assert!(p.last_pdu());
                let d = DataHdr {
                    cccid: 9,
                    ttag: 0,
                    datao: 0,
                    datal: 5,
                };
                roundtrip(
                    e,
                    PduHeader::C2HData(d),
                    FLAG_LAST_PDU | FLAG_SUCCESS,
                    &[2u8; 5],
                );
                let r = R2t {
                    cccid: 9,
                    ttag: 1,
                    r2to: 0,
                    r2tl: 65536,
                };
                roundtrip(e, PduHeader::R2T(r), 0, &[]);
            }
        }
        let e = Encoder::default();
        let ic = IcReq {
            pfv: 0,
            hpda: 0,
            digest: DigestConfig {
                header: true,
                data: true,
            },
            maxr2t: 0,
        };
        roundtrip(e, PduHeader::ICReq(ic), 0, &[]);
        let ic = IcResp {
            pfv: 0,
            cpda: 0,
            digest: DigestConfig::default(),
            maxh2cdata: 131072,
        };
        roundtrip(e, PduHeader::ICResp(ic), 0, &[]);
        roundtrip(
            e,
            PduHeader::C2HTermReq(TermReq { fes: 1, fei: 2 }),
            0,
            &[0u8; 24],
        );
    }

    #[test]
    fn digests_are_where_the_spec_says() {
        let e = Encoder {
            digest: DigestConfig {
                header: true,
                data: true,
            },
            pda: 0,
        };
        let mut out = Vec::new();
        let d = DataHdr {
            cccid: 1,
            ttag: 0,
            datao: 0,
            datal: 3,
        };
        e.pdu(&PduHeader::C2HData(d), FLAG_LAST_PDU, b"abc", &mut out);
        // 24 header + 4 hdgst + 3 data + 4 ddgst
        assert_eq!(out.len(), 35);
        assert_eq!(out[1], FLAG_HDGSTF | FLAG_DDGSTF | FLAG_LAST_PDU);
        assert_eq!(out[3], 28);
        assert_eq!(u32_at(&out, 24), crc32c(&out[..24]));
        assert_eq!(u32_at(&out, 31), crc32c(b"abc\0"));
    }

    #[test]
    fn incomplete_reports_need() {
        let mut out = Vec::new();
        Encoder::default().pdu(
            &PduHeader::CapsuleCmd(Sqe::new(1, 1)),
            0,
            &[0u8; 100],
            &mut out,
        );
        let dec = Decoder::new(8192);
        assert_eq!(dec.decode(&out[..3]).unwrap(), Decoded::Need(8));
        assert_eq!(dec.decode(&out[..80]).unwrap(), Decoded::Need(172));
    }

    #[test]
    fn bad_headers_get_fes_and_fei() {
        let dec = Decoder::new(8192);
        let mut out = Vec::new();
        Encoder::default().pdu(&PduHeader::CapsuleCmd(Sqe::new(1, 1)), 0, &[], &mut out);
        let mut b = out.clone();
        b[0] = 0x08;
        assert_eq!(dec.decode(&b).unwrap_err().fei, 0);
        let mut b = out.clone();
        b[2] = 24;
        assert_eq!(dec.decode(&b).unwrap_err().fei, 2);
        let mut b = out.clone();
        b[1] = FLAG_HDGSTF;
        assert_eq!(dec.decode(&b).unwrap_err().fei, 1);
        let mut b = out.clone();
        put_u32(&mut b, 4, 10);
        assert_eq!(dec.decode(&b).unwrap_err().fei, 4);
        let mut b = out.clone();
        put_u32(&mut b, 4, 1 << 30);
        assert_eq!(
            dec.decode(&b).unwrap_err().fes,
            FatalError::DataTransferLimitExceeded
        );
    }

    #[test]
    fn header_digest_mismatch_is_fatal_data_digest_is_not() {
        let dg = DigestConfig {
            header: true,
            data: true,
        };
        let e = Encoder { digest: dg, pda: 0 };
        let dec = Decoder {
            digest: dg,
            pda: 0,
            max_data: 8192,
        };
        let mut out = Vec::new();
        e.pdu(
            &PduHeader::CapsuleCmd(Sqe::new(1, 1)),
            0,
            &[5u8; 16],
            &mut out,
        );
        let mut b = out.clone();
        b[72] ^= 1;
        assert_eq!(
            dec.decode(&b).unwrap_err().fes,
            FatalError::HeaderDigestError
        );
        let mut b = out.clone();
        let n = b.len();
        b[n - 5] ^= 1; // a data byte
        match dec.decode(&b).unwrap() {
            Decoded::Pdu(p) => assert!(!p.data_digest_ok),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn term_req_carries_offending_header() {
        let mut bad = Vec::new();
        Encoder::default().pdu(&PduHeader::CapsuleCmd(Sqe::new(1, 1)), 0, &[], &mut bad);
        let err = PduError::new(FatalError::InvalidHeaderField, 2, "x");
        let mut out = Vec::new();
        term_req(&err, &bad, true, &mut out);
        assert_eq!(out.len(), 24 + 72);
        assert_eq!(out[0], PduType::C2HTermReq as u8);
        assert_eq!(u16_at(&out, 8), 1);
        assert_eq!(u32_at(&out, 10), 2);
        assert_eq!(&out[24..], &bad[..]);
    }
}
