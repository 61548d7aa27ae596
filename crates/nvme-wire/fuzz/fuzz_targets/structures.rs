//! Fuzzes the structure parsers: Connect data, Identify Controller and Namespace,
//! namespace lists, the discovery, error and SMART log pages, and the command
//! fields read from an SQE. None may panic on any input, and encoding what was
//! parsed reaches a fixed point after one normalisation (trimmed padding, lossy
//! UTF-8): parse(encode(x)) == x for every x that came out of a parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvme_wire::fabrics::{ConnectCmd, ConnectData, PropertyCmd};
use nvme_wire::identify::{self, IdentifyController, IdentifyNamespace};
use nvme_wire::log::{self, DiscoveryEntry, ErrorLogEntry, GetLogPage, SmartLog};
use nvme_wire::Sqe;

fn fixpoint<T: PartialEq + std::fmt::Debug>(
    x: T,
    enc: impl Fn(&T) -> Vec<u8>,
    dec: impl Fn(&[u8]) -> Option<T>,
) {
    let once = dec(&enc(&x)).expect("decodes what it encoded");
    let twice = dec(&enc(&once)).expect("decodes what it encoded");
    assert_eq!(once, twice);
}

fuzz_target!(|b: &[u8]| {
    if let Some(d) = ConnectData::from_bytes(b) {
        fixpoint(d, |d| d.to_bytes().to_vec(), ConnectData::from_bytes);
    }
    if let Some(c) = IdentifyController::from_bytes(b) {
        fixpoint(c, |c| c.to_bytes().to_vec(), IdentifyController::from_bytes);
    }
    if let Some(n) = IdentifyNamespace::from_bytes(b) {
        assert!(n.block_size() >= 1);
        let once = IdentifyNamespace::from_bytes(&n.to_bytes()[..]).expect("4096 bytes");
        assert_eq!(
            once, n,
            "every modelled Identify Namespace field round-trips"
        );
    }
    let ids = identify::parse_active_ns_list(b);
    assert!(ids.len() <= b.len() / 4);
    let descs = identify::parse_ns_descriptor_list(b);
    let enc = identify::ns_descriptor_list(&descs);
    let again = identify::parse_ns_descriptor_list(&enc[..]);
    assert!(again.len() <= descs.len() && descs.starts_with(&again));
    if let Some(e) = DiscoveryEntry::from_bytes(b) {
        fixpoint(
            e,
            |e| {
                let mut v = vec![0u8; log::DISC_ENTRY_LEN];
                e.write_to(&mut v);
                v
            },
            DiscoveryEntry::from_bytes,
        );
    }
    if let Some((genctr, numrec, entries)) = log::parse_discovery_log(b) {
        assert!(entries.len() as u64 <= numrec);
        let page = log::discovery_log(genctr, &entries);
        let (g, n, again) = log::parse_discovery_log(&page).expect("a whole page");
        assert_eq!(
            (g, n as usize, again.len()),
            (genctr, entries.len(), entries.len())
        );
    }
    if let Some(e) = ErrorLogEntry::from_bytes(b) {
        let mut v = [0u8; log::ERROR_LOG_ENTRY_LEN];
        e.write_to(&mut v);
        assert_eq!(ErrorLogEntry::from_bytes(&v), Some(e));
    }
    if let Some(s) = SmartLog::from_bytes(b) {
        assert_eq!(SmartLog::from_bytes(&s.to_bytes()), Some(s));
    }
    if let Ok(raw) = <[u8; 64]>::try_from(b.get(..64).unwrap_or(&[])) {
        let s = Sqe(raw);
        let _ = (
            ConnectCmd::from_sqe(&s),
            PropertyCmd::from_sqe(&s),
            s.sgl(),
            s.nlb(),
            format!("{s:?}"),
        );
        let g = GetLogPage::from_sqe(&s);
        let mut t = Sqe::new(0x02, 0);
        g.write_sqe(&mut t);
        assert_eq!(GetLogPage::from_sqe(&t), g);
    }
});
