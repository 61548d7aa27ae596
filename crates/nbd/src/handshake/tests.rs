use std::collections::BTreeMap;

use bdev::malloc::MallocBdev;
use proptest::prelude::*;

use super::*;
use crate::export::ExportOptions;

fn exports() -> BTreeMap<String, Arc<Export>> {
    let mut m = BTreeMap::new();
    for (name, bs, desc) in [("disk", 512u32, Some("the disk")), ("big", 4096, None)] {
        let b = Arc::new(MallocBdev::new(name, 2048, bs, None).unwrap());
        let o = ExportOptions {
            description: desc.map(String::from),
            ..Default::default()
        };
        m.insert(name.to_string(), Arc::new(Export::new(name, b, o).unwrap()));
    }
    m
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Parsed option replies: (option, reply type, data).
fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert_eq!(be64(b), OPT_REPLY_MAGIC);
        let len = be32(&b[16..]) as usize;
        v.push((be32(&b[8..]), be32(&b[12..]), b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    v
}

/// A handshake past the greeting and client flags.
fn started(flags: u32) -> (Handshake, BTreeMap<String, Arc<Export>>) {
    let mut h = Handshake::new(DEFAULT_MAX_PAYLOAD);
    let greeting = h.output().to_vec();
    assert_eq!(greeting.len(), 18);
    assert_eq!(be64(&greeting), NBDMAGIC);
    assert_eq!(be64(&greeting[8..]), IHAVEOPT);
    assert_eq!(be16(&greeting[16..]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    h.consume_output(18);
    let ex = exports();
    let (n, ev) = h.on_bytes(&flags.to_be_bytes(), &ex);
    assert_eq!(n, 4);
    assert!(matches!(ev, HsEvent::Continue));
    (h, ex)
}

fn feed(h: &mut Handshake, ex: &BTreeMap<String, Arc<Export>>, b: &[u8]) -> HsEvent {
    let (n, ev) = h.on_bytes(b, ex);
    assert_eq!(n, b.len(), "whole messages consumed");
    ev
}

fn take(h: &mut Handshake) -> Vec<(u32, u32, Vec<u8>)> {
    let r = replies(h.output());
    let n = h.output().len();
    h.consume_output(n);
    r
}

#[test]
fn unknown_client_flags_close() {
    let mut h = Handshake::new(DEFAULT_MAX_PAYLOAD);
    let (n, ev) = h.on_bytes(&4u32.to_be_bytes(), &exports());
    assert_eq!(n, 4);
    assert!(matches!(ev, HsEvent::Close(CloseReason::Protocol(_))));
}

#[test]
fn bad_option_magic_closes() {
    let (mut h, ex) = started(FLAG_C_FIXED_NEWSTYLE);
    let mut b = opt(OPT_LIST, &[]);
    b[0] ^= 0xff;
    let (_, ev) = h.on_bytes(&b, &ex);
    assert!(matches!(ev, HsEvent::Close(CloseReason::Protocol(_))));
}

#[test]
fn list_and_invalid_list() {
    let (mut h, ex) = started(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    assert!(matches!(
        feed(&mut h, &ex, &opt(OPT_LIST, &[])),
        HsEvent::Continue
    ));
    let r = take(&mut h);
    assert_eq!(r.len(), 3);
    let names: Vec<_> = r[..2]
        .iter()
        .map(|(o, t, d)| {
            assert_eq!((*o, *t), (OPT_LIST, REP_SERVER));
            let n = be32(d) as usize;
            (
                String::from_utf8(d[4..4 + n].to_vec()).unwrap(),
                String::from_utf8(d[4 + n..].to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![
            ("big".to_string(), String::new()),
            ("disk".to_string(), "the disk".to_string())
        ]
    );
    assert_eq!(r[2], (OPT_LIST, REP_ACK, vec![]));
    feed(&mut h, &ex, &opt(OPT_LIST, b"x"));
    assert_eq!(take(&mut h)[0].1, REP_ERR_INVALID);
}

#[test]
fn unknown_options_are_refused_and_skipped() {
    let (mut h, ex) = started(FLAG_C_FIXED_NEWSTYLE);
    let mut b = opt(99, b"some data");
    b.extend(opt(OPT_EXTENDED_HEADERS, &[]));
    b.extend(opt(OPT_STARTTLS, &[]));
    b.extend(opt(OPT_LIST, &[]));
    feed(&mut h, &ex, &b);
    let r = take(&mut h);
    assert_eq!((r[0].0, r[0].1), (99, REP_ERR_UNSUP));
    assert_eq!((r[1].0, r[1].1), (OPT_EXTENDED_HEADERS, REP_ERR_UNSUP));
    assert_eq!((r[2].0, r[2].1), (OPT_STARTTLS, REP_ERR_POLICY));
    assert_eq!(r.last().unwrap().1, REP_ACK);
}

#[test]
fn huge_option_is_skipped_in_pieces() {
    let (mut h, ex) = started(FLAG_C_FIXED_NEWSTYLE);
    // An unknown option of 1 MiB and a known one over the limit: neither is
    // buffered, both are answered, and the session goes on.
    for (option, reply) in [(1234u32, REP_ERR_UNSUP), (OPT_GO, REP_ERR_TOO_BIG)] {
        let len = 1u32 << 20;
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hdr.extend_from_slice(&option.to_be_bytes());
        hdr.extend_from_slice(&len.to_be_bytes());
        assert_eq!(h.on_bytes(&hdr, &ex).0, 16);
        let chunk = vec![7u8; 4096];
        for _ in 0..len / 4096 {
            assert!(h.output().is_empty());
            let (n, ev) = h.on_bytes(&chunk, &ex);
            assert_eq!(n, 4096);
            assert!(matches!(ev, HsEvent::Continue));
        }
        let r = take(&mut h);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].0, r[0].1), (option, reply));
    }
    feed(&mut h, &ex, &opt(OPT_GO, &go_data("disk", &[])));
}

#[test]
fn info_then_go() {
    let (mut h, ex) = started(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let ev = feed(
        &mut h,
        &ex,
        &opt(
            OPT_INFO,
            &go_data("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 77]),
        ),
    );
    assert!(matches!(ev, HsEvent::Continue));
    let r = take(&mut h);
    assert!(r.iter().all(|x| x.0 == OPT_INFO));
    let export = &r[0];
    assert_eq!(export.1, REP_INFO);
    assert_eq!(be16(&export.2), INFO_EXPORT);
    assert_eq!(be64(&export.2[2..]), 2048 * 512);
    let flags = be16(&export.2[10..]);
    assert_eq!(flags & TX_SEND_DF, 0, "no structured replies yet");
    assert_ne!(flags & TX_CAN_MULTI_CONN, 0);
    let bs = &r[1].2;
    assert_eq!(be16(bs), INFO_BLOCK_SIZE);
    assert_eq!(
        (be32(&bs[2..]), be32(&bs[6..]), be32(&bs[10..])),
        (512, 4096, DEFAULT_MAX_PAYLOAD)
    );
    assert_eq!(r[2].2, [&INFO_NAME.to_be_bytes()[..], b"disk"].concat());
    assert_eq!(
        r[3].2,
        [&INFO_DESCRIPTION.to_be_bytes()[..], b"the disk"].concat()
    );
    assert_eq!(r[4].1, REP_ACK);
    assert_eq!(r.len(), 5);

    feed(&mut h, &ex, &opt(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(take(&mut h), vec![(OPT_STRUCTURED_REPLY, REP_ACK, vec![])]);
    let ev = feed(
        &mut h,
        &ex,
        &opt(OPT_GO, &go_data("big", &[INFO_BLOCK_SIZE])),
    );
    let HsEvent::Go(n) = ev else { panic!("{ev:?}") };
    assert_eq!(n.export.name(), "big");
    assert!(n.structured && n.block_size_requested && !n.base_allocation);
    assert_ne!(n.tx_flags & TX_SEND_DF, 0);
    let r = take(&mut h);
    assert_eq!(be16(&r[0].2[10..]), n.tx_flags);
    assert_eq!(be32(&r[1].2[2..]), 4096);
    assert_eq!(r.last().unwrap().1, REP_ACK);
    // Done: later bytes are not the handshake's.
    assert_eq!(h.on_bytes(&[1, 2, 3], &ex).0, 0);
}

#[test]
fn go_errors() {
    let (mut h, ex) = started(FLAG_C_FIXED_NEWSTYLE);
    feed(&mut h, &ex, &opt(OPT_GO, &go_data("nope", &[])));
    let r = take(&mut h);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].2).contains("nope"));
    // Name length beyond the data, request count not matching, trailing bytes.
    let mut bad = go_data("disk", &[]);
    bad[3] = 200;
    let mut trailing = go_data("disk", &[INFO_NAME]);
    trailing.push(0);
    for b in [bad, go_data("disk", &[1])[..10].to_vec(), trailing, vec![]] {
        feed(&mut h, &ex, &opt(OPT_GO, &b));
        assert_eq!(take(&mut h)[0].1, REP_ERR_INVALID);
    }
    // Still negotiating: a good GO works.
    assert!(matches!(
        feed(&mut h, &ex, &opt(OPT_GO, &go_data("disk", &[]))),
        HsEvent::Go(_)
    ));
}

#[test]
fn export_name_old_style() {
    for no_zeroes in [false, true] {
        let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        let (mut h, ex) = started(flags);
        let ev = feed(&mut h, &ex, &opt(OPT_EXPORT_NAME, b"disk"));
        let HsEvent::Go(n) = ev else { panic!("{ev:?}") };
        assert!(!n.block_size_requested && !n.structured);
        let out = h.output();
        assert_eq!(out.len(), if no_zeroes { 10 } else { 134 });
        assert_eq!(be64(out), 2048 * 512);
        assert_eq!(be16(&out[8..]), n.tx_flags);
        assert!(out[10..].iter().all(|&b| b == 0));
    }
    let (mut h, ex) = started(0);
    let ev = feed(&mut h, &ex, &opt(OPT_EXPORT_NAME, b"missing"));
    assert!(matches!(
        ev,
        HsEvent::Close(CloseReason::UnknownExport(ref n)) if n == "missing"
    ));
    assert!(h.output().is_empty());
}

#[test]
fn abort_acks_then_closes() {
    let (mut h, ex) = started(FLAG_C_FIXED_NEWSTYLE);
    let ev = feed(&mut h, &ex, &opt(OPT_ABORT, &[]));
    assert!(matches!(ev, HsEvent::Close(CloseReason::Abort)));
    assert_eq!(take(&mut h), vec![(OPT_ABORT, REP_ACK, vec![])]);
}

#[test]
fn structured_reply_with_data_is_invalid() {
    let (mut h, ex) = started(FLAG_C_FIXED_NEWSTYLE);
    feed(&mut h, &ex, &opt(OPT_STRUCTURED_REPLY, b"x"));
    assert_eq!(take(&mut h)[0].1, REP_ERR_INVALID);
    let HsEvent::Go(n) = feed(&mut h, &ex, &opt(OPT_GO, &go_data("disk", &[]))) else {
        panic!()
    };
    assert!(!n.structured);
}

#[test]
fn meta_contexts() {
    let (mut h, ex) = started(FLAG_C_FIXED_NEWSTYLE);
    // Before structured replies: refused.
    feed(
        &mut h,
        &ex,
        &opt(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
        ),
    );
    assert_eq!(take(&mut h)[0].1, REP_ERR_INVALID);
    feed(&mut h, &ex, &opt(OPT_STRUCTURED_REPLY, &[]));
    take(&mut h);

    let ctx = |id: u32| [&id.to_be_bytes()[..], META_BASE_ALLOCATION.as_bytes()].concat();
    // LIST: no query lists all; "base:" is a wildcard; unknown namespaces ignored.
    for (queries, found) in [
        (vec![], true),
        (vec!["base:"], true),
        (vec!["qemu:dirty-bitmap:x"], false),
        (vec!["x-foo:bar", "base:allocation"], true),
    ] {
        feed(
            &mut h,
            &ex,
            &opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &queries)),
        );
        let r = take(&mut h);
        let mut want = vec![];
        if found {
            want.push((OPT_LIST_META_CONTEXT, REP_META_CONTEXT, ctx(0)));
        }
        want.push((OPT_LIST_META_CONTEXT, REP_ACK, vec![]));
        assert_eq!(r, want, "{queries:?}");
    }
    feed(
        &mut h,
        &ex,
        &opt(OPT_LIST_META_CONTEXT, &meta_data("nope", &[])),
    );
    assert_eq!(take(&mut h)[0].1, REP_ERR_UNKNOWN);
    let mut bad = meta_data("disk", &["base:allocation"]);
    bad.pop();
    feed(&mut h, &ex, &opt(OPT_SET_META_CONTEXT, &bad));
    assert_eq!(take(&mut h)[0].1, REP_ERR_INVALID);

    // SET selects with a nonzero id; "base:" alone selects nothing.
    feed(
        &mut h,
        &ex,
        &opt(OPT_SET_META_CONTEXT, &meta_data("disk", &["base:"])),
    );
    assert_eq!(take(&mut h), vec![(OPT_SET_META_CONTEXT, REP_ACK, vec![])]);
    feed(
        &mut h,
        &ex,
        &opt(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
        ),
    );
    assert_eq!(
        take(&mut h),
        vec![
            (
                OPT_SET_META_CONTEXT,
                REP_META_CONTEXT,
                ctx(BASE_ALLOCATION_ID)
            ),
            (OPT_SET_META_CONTEXT, REP_ACK, vec![]),
        ]
    );
    // Selected for "disk" only.
    let mut h2 = Handshake {
        out: Vec::new(),
        ..clone_state(&h)
    };
    let HsEvent::Go(n) = feed(&mut h2, &ex, &opt(OPT_GO, &go_data("big", &[]))) else {
        panic!()
    };
    assert!(!n.base_allocation);
    let HsEvent::Go(n) = feed(&mut h, &ex, &opt(OPT_GO, &go_data("disk", &[]))) else {
        panic!()
    };
    assert!(n.base_allocation && n.structured);
}

fn clone_state(h: &Handshake) -> Handshake {
    Handshake {
        state: h.state,
        no_zeroes: h.no_zeroes,
        structured: h.structured,
        meta_export: h.meta_export.clone(),
        max_payload: h.max_payload,
        out: h.out.clone(),
    }
}

/// A whole session as one byte string, and the output it produces when fed
/// at once.
fn session() -> Vec<u8> {
    let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    b.extend(opt(OPT_LIST, &[]));
    b.extend(opt(4242, &[9; 100]));
    b.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    b.extend(opt(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    ));
    b.extend(opt(OPT_INFO, &go_data("disk", &[INFO_NAME])));
    b.extend(opt(OPT_GO, &go_data("disk", &[INFO_BLOCK_SIZE])));
    b
}

fn run_split(splits: &[usize]) -> (Vec<u8>, Option<Negotiated>, usize) {
    let ex = exports();
    let mut h = Handshake::new(DEFAULT_MAX_PAYLOAD);
    let input = session();
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut consumed_total = 0;
    let mut cuts: Vec<usize> = splits.iter().map(|s| s % (input.len() + 1)).collect();
    cuts.push(input.len());
    cuts.sort();
    for cut in cuts {
        buf.extend_from_slice(&input[fed..cut.max(fed)]);
        fed = cut.max(fed);
        let (n, ev) = h.on_bytes(&buf, &ex);
        buf.drain(..n);
        consumed_total += n;
        if let HsEvent::Go(neg) = ev {
            return (h.output().to_vec(), Some(neg), consumed_total);
        }
    }
    (h.output().to_vec(), None, consumed_total)
}

proptest! {
    /// However the client's bytes are split, the replies are the same.
    #[test]
    fn any_split_gives_same_output(splits in proptest::collection::vec(0usize..400, 0..12)) {
        let (whole, neg, n) = run_split(&[]);
        prop_assert!(neg.is_some());
        prop_assert_eq!(n, session().len());
        let (out, neg2, n2) = run_split(&splits);
        prop_assert_eq!(out, whole);
        prop_assert_eq!(n2, n);
        let neg2 = neg2.unwrap();
        prop_assert!(neg2.structured && neg2.base_allocation && neg2.block_size_requested);
    }

    /// Garbage never panics and never consumes more than given.
    #[test]
    fn garbage_is_handled(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let ex = exports();
        let mut h = Handshake::new(DEFAULT_MAX_PAYLOAD);
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend_from_slice(&IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&data);
        let (n, _) = h.on_bytes(&input, &ex);
        prop_assert!(n <= input.len());
    }
}
