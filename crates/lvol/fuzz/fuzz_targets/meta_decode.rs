//! Fuzzes the lvstore metadata parser, and opening a store whose metadata file
//! holds the input.
//!
//! First byte selects: bit 0 = parse the bytes as a whole file (envelope with
//! checksums) or as the JSON body alone (reaching validation without having to
//! forge CRCs); bit 1 = also open a store on an in-memory directory with those
//! bytes, wrapped in a valid envelope, as its metadata.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use lvol::meta;
use lvol::storage::{Open, Storage};

fn envelope(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&meta::MAGIC);
    out.extend_from_slice(&meta::VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    let h = crc32c::crc32c(&out[..20]);
    out.extend_from_slice(&h.to_le_bytes());
    out.extend_from_slice(body);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let parsed = if mode & 1 == 0 {
        meta::decode(rest)
    } else {
        meta::decode_body(rest)
    };
    if let Ok(m) = &parsed {
        // Whatever is accepted re-encodes to something accepted and equal.
        let again = meta::decode(&meta::encode(m)).expect("re-encoded metadata parses");
        assert_eq!(&again, m);
    }
    if mode & 2 != 0 {
        let bytes = if mode & 1 == 0 {
            rest.to_vec()
        } else {
            envelope(rest)
        };
        let fs = lvol::fault::FaultStorage::new(512);
        let f = fs
            .open(meta::META_FILE, Open::Create, false)
            .expect("in-memory file");
        f.write_at(0, &bytes).expect("in-memory write");
        // Layer files are missing: an accepted metadata must still fail cleanly.
        let _ = lvol::LvStore::open(Arc::new(fs), None);
    }
});
