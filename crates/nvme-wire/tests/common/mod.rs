//! Helpers shared by the integration tests: fixture loading (binary captures and the
//! commented sparse-hex format of the hand-made fixtures), an independent CRC32C,
//! and decode/re-encode checks that every fixture goes through.
#![allow(dead_code)]

use nvme_wire::pdu::{Decoded, Decoder, Encoder, Pdu, PduHeader, CH_LEN};
use nvme_wire::DigestConfig;
use std::path::PathBuf;

/// Path of a file under `tests/fixtures/`.
pub fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Loads a fixture: `.hex` files are parsed with [`parse_hex`], anything else is raw bytes.
pub fn load(rel: &str) -> Vec<u8> {
    let path = fixture_path(rel);
    let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if rel.ends_with(".hex") {
        parse_hex(&String::from_utf8(raw).expect("hex fixture is UTF-8"))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    } else {
        raw
    }
}

/// Parses the sparse, commented hex format of the hand-made fixtures:
///
/// ```text
/// # comment (to the end of the line, outside quotes)
/// size 4096                 # optional: total length; unwritten bytes are zero
/// 0018: 66 44               # "OFFSET:" (hex) moves the cursor; bytes follow it
///       80 00               # a line without an offset continues at the cursor
/// 0004: "CORRAL0001" 20*10  # "ASCII" strings; XX*N repeats byte XX N times
/// ```
///
/// Writing a byte twice is an error, so overlapping fields in a fixture are caught.
pub fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let mut out: Vec<Option<u8>> = Vec::new();
    let mut size: Option<usize> = None;
    let mut cursor = 0usize;
    for (lineno, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}", lineno + 1);
        let line = strip_comment(line);
        let mut rest = line.trim();
        if rest.is_empty() {
            continue;
        }
        if let Some(v) = rest.strip_prefix("size ") {
            size = Some(v.trim().parse().map_err(|e| err(format!("size: {e}")))?);
            continue;
        }
        if let Some((off, tail)) = rest.split_once(':') {
            if !off.contains('"') {
                cursor = usize::from_str_radix(off.trim(), 16)
                    .map_err(|e| err(format!("offset {off:?}: {e}")))?;
                rest = tail.trim();
            }
        }
        let mut bytes = Vec::new();
        while !rest.is_empty() {
            if let Some(s) = rest.strip_prefix('"') {
                let end = s
                    .find('"')
                    .ok_or_else(|| err("unterminated string".into()))?;
                bytes.extend_from_slice(&s.as_bytes()[..end]);
                rest = s[end + 1..].trim_start();
                continue;
            }
            let (tok, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            rest = tail.trim_start();
            let (b, n) = match tok.split_once('*') {
                Some((b, n)) => (
                    b,
                    n.parse::<usize>().map_err(|e| err(format!("{tok}: {e}")))?,
                ),
                None => (tok, 1),
            };
            if b.len() != 2 {
                return Err(err(format!("byte {b:?} is not two hex digits")));
            }
            let b = u8::from_str_radix(b, 16).map_err(|e| err(format!("{tok}: {e}")))?;
            bytes.extend(std::iter::repeat_n(b, n));
        }
        if out.len() < cursor + bytes.len() {
            out.resize(cursor + bytes.len(), None);
        }
        for b in bytes {
            if out[cursor].is_some() {
                return Err(err(format!("byte {cursor:#x} written twice")));
            }
            out[cursor] = Some(b);
            cursor += 1;
        }
    }
    if let Some(n) = size {
        if out.len() > n {
            return Err(format!("{} bytes written past size {n}", out.len() - n));
        }
        out.resize(n, None);
    }
    Ok(out.into_iter().map(|b| b.unwrap_or(0)).collect())
}

fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '#' if !in_str => return &line[..i],
            _ => {}
        }
    }
    line
}

/// CRC32C computed bit by bit from the polynomial (reflected 0x82F63B78), independent
/// of the `crc32c` crate the library uses, so a digest checked against both is right.
pub fn crc32c_reference(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    crc ^ 0xFFFF_FFFF
}

/// Data digest by the reference CRC: data zero-padded to a multiple of four.
pub fn data_digest_reference(data: &[u8]) -> u32 {
    let mut padded = data.to_vec();
    padded.resize(data.len().div_ceil(4) * 4, 0);
    crc32c_reference(&padded)
}

pub fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

pub fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

pub const NO_DIGEST: DigestConfig = DigestConfig {
    header: false,
    data: false,
};
pub const BOTH_DIGESTS: DigestConfig = DigestConfig {
    header: true,
    data: true,
};

/// A decoder as a connection would configure it after ICReq/ICResp.
pub fn decoder(digest: DigestConfig, pda: u8) -> Decoder {
    Decoder {
        digest,
        pda,
        max_data: 1 << 20,
    }
}

/// Decodes `buf`, which must hold exactly one PDU, and checks what every decoded
/// PDU must satisfy: every strict prefix asks for more bytes (never an error),
/// the data range lies inside the PDU, and the data digest (if any) is right.
pub fn decode_exact(dec: &Decoder, buf: &[u8]) -> Pdu {
    let pdu = match dec.decode(buf) {
        Ok(Decoded::Pdu(p)) => p,
        other => panic!("expected a whole PDU, got {other:?}"),
    };
    assert_eq!(pdu.plen, buf.len(), "plen covers the whole fixture");
    assert!(pdu.data_offset + pdu.data_len <= pdu.plen);
    assert!(pdu.data_digest_ok, "data digest");
    for n in 0..buf.len() {
        match dec.decode(&buf[..n]) {
            Ok(Decoded::Need(k)) => assert!(k > n && k <= buf.len(), "prefix {n}: Need({k})"),
            other => panic!("prefix of {n} bytes: {other:?}"),
        }
    }
    // A following PDU in the same buffer changes nothing.
    let mut longer = buf.to_vec();
    longer.extend_from_slice(&[0x05; CH_LEN]);
    assert_eq!(dec.decode(&longer), Ok(Decoded::Pdu(pdu)));
    pdu
}

/// Re-encodes a decoded PDU with the crate's encoder.
pub fn reencode(pdu: &Pdu, buf: &[u8], digest: DigestConfig, pda: u8) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder { digest, pda }.pdu(&pdu.header, pdu.flags, pdu.data(buf), &mut out);
    out
}

/// Decodes one PDU and checks that re-encoding it gives the same bytes.
pub fn decode_roundtrip(buf: &[u8], digest: DigestConfig, pda: u8) -> Pdu {
    let pdu = decode_exact(&decoder(digest, pda), buf);
    assert_eq!(
        reencode(&pdu, buf, digest, pda),
        buf,
        "re-encoding is byte-exact"
    );
    pdu
}

/// Checks the header digest (bytes hlen..hlen+4) and, for PDUs with data, the data
/// digest (the last 4 bytes) against the reference CRC32C.
pub fn check_digests(buf: &[u8], pdu: &Pdu, digest: DigestConfig) {
    let hlen = pdu.hlen;
    if digest.header {
        assert_eq!(le32(buf, hlen), crc32c_reference(&buf[..hlen]), "HDGST");
        assert_eq!(le32(buf, hlen), nvme_wire::digest::crc32c(&buf[..hlen]));
    }
    if digest.data && pdu.data_len > 0 {
        let data = pdu.data(buf);
        let at = pdu.data_offset + pdu.data_len;
        assert_eq!(at + 4, buf.len(), "DDGST is the last 4 bytes");
        assert_eq!(le32(buf, at), data_digest_reference(data), "DDGST");
        assert_eq!(le32(buf, at), nvme_wire::digest::data_digest(data));
    }
}

/// The digests a connection negotiated, from its ICReq/ICResp header.
pub fn negotiated(h: &PduHeader) -> DigestConfig {
    match h {
        PduHeader::ICReq(r) => r.digest,
        PduHeader::ICResp(r) => r.digest,
        other => panic!("not an ICReq/ICResp: {other:?}"),
    }
}
