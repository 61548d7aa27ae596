//! Fuzzes the NVMe/TCP PDU decoder on a stream of bytes.
//!
//! Input: byte 0 picks the digests (bit 0 header, bit 1 data) and the data limit
//! (bit 2: 64 bytes instead of 8 KiB), byte 1 is the PDA (any value, 0..=31 valid),
//! the rest is the byte stream. Every PDU decoded from the stream must lie inside
//! the buffer and the decoder's bounds, decode the same from exactly its own bytes,
//! and survive an encode/decode round trip of what was decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvme_wire::pdu::{Decoded, Decoder, Encoder};
use nvme_wire::DigestConfig;

fuzz_target!(|input: &[u8]| {
    let [cfg, pda, stream @ ..] = input else {
        return;
    };
    let digest = DigestConfig {
        header: cfg & 1 != 0,
        data: cfg & 2 != 0,
    };
    let max_data = if cfg & 4 != 0 { 64 } else { 8192 };
    let dec = Decoder {
        digest,
        pda: *pda,
        max_data,
    };
    let mut pos = 0;
    while pos < stream.len() {
        let buf = &stream[pos..];
        let p = match dec.decode(buf) {
            Ok(Decoded::Need(n)) => {
                assert!(n > buf.len(), "Need({n}) with {} bytes", buf.len());
                assert!(n <= dec.max_plen());
                return;
            }
            Err(_) => return,
            Ok(Decoded::Pdu(p)) => p,
        };
        assert!(p.plen <= buf.len() && p.plen <= dec.max_plen());
        assert_eq!(p.hlen, p.header.pdu_type().hlen());
        assert!(p.data_offset + p.data_len <= p.plen);
        let data = p.data(buf);
        assert_eq!(
            dec.decode(&buf[..p.plen]),
            Ok(Decoded::Pdu(p)),
            "looked past plen"
        );

        let mut out = Vec::new();
        Encoder { digest, pda: *pda }.pdu(&p.header, p.flags, data, &mut out);
        match dec.decode(&out) {
            Ok(Decoded::Pdu(q)) => {
                assert_eq!(q.header, p.header);
                assert_eq!(q.data(&out), data);
                assert_eq!(q.plen, out.len());
                assert!(q.data_digest_ok);
            }
            other => panic!("re-encoded {:?} does not decode: {other:?}", p.header),
        }
        pos += p.plen;
    }
});
