//! The fixed-newstyle handshake, as a state machine fed bytes.
//!
//! [`Handshake::new`] queues the server greeting; the driver writes
//! [`Handshake::output`], feeds what the client sends to [`Handshake::on_bytes`]
//! (which consumes whole messages and leaves the rest to the caller), and stops
//! when it returns [`HsEvent::Go`] (enter transmission on that export) or
//! [`HsEvent::Close`].
//!
//! Options answered: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (the
//! `base:allocation` context); `STARTTLS` is refused by policy (no TLS) and any
//! other option gets `NBD_REP_ERR_UNSUP`. Option data is bounded: an option
//! longer than [`MAX_OPTION_DATA`] is skipped in pieces, never buffered.

use std::sync::Arc;

use crate::export::{Export, ExportSource};
use crate::proto::*;

/// Longest option data held whole (a GO with a 4096-byte name and many info
/// requests fits easily); longer options are skipped and refused.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Length of an option request header.
pub const OPTION_HEADER_LEN: usize = 16;

/// What the handshake agreed on when the client entered transmission.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub export: Arc<Export>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for this export (block status allowed).
    pub base_allocation: bool,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` in its `NBD_OPT_GO`, and so
    /// promised to honour the constraints.
    pub block_size_requested: bool,
    /// Transmission flags the client was given.
    pub tx_flags: u16,
    /// Export size in bytes the client was given.
    pub size: u64,
}

/// Why a handshake ended without transmission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent `NBD_OPT_ABORT` (answered; flush output, then close).
    Abort,
    /// The client broke the protocol; close at once.
    Protocol(&'static str),
    /// `NBD_OPT_EXPORT_NAME` for an export that does not exist: the protocol
    /// has no way to refuse it but closing.
    UnknownExport(String),
}

/// Result of feeding bytes.
#[derive(Debug, Clone)]
pub enum HsEvent {
    /// More input needed (and maybe output to write).
    Continue,
    /// Enter transmission: write the output first; bytes after the consumed
    /// ones belong to the transmission phase.
    Go(Negotiated),
    Close(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Option,
    /// Skipping `remaining` bytes of an option's data, then replying `reply`.
    Skip {
        option: u32,
        remaining: u32,
        reply: u32,
    },
    Done,
}

/// Server side of one handshake.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    no_zeroes: bool,
    structured: bool,
    /// Export the last `SET_META_CONTEXT` selected `base:allocation` for.
    meta_export: Option<String>,
    max_payload: u32,
    out: Vec<u8>,
}

impl Handshake {
    /// Starts a handshake; the greeting is queued in [`Handshake::output`].
    /// `max_payload` is the largest read or write the server accepts.
    pub fn new(max_payload: u32) -> Self {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Handshake {
            state: State::ClientFlags,
            no_zeroes: false,
            structured: false,
            meta_export: None,
            max_payload,
            out,
        }
    }

    /// Bytes to send to the client.
    pub fn output(&self) -> &[u8] {
        &self.out
    }
    /// Marks `n` bytes of output as sent.
    pub fn consume_output(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    /// Handles the whole messages at the start of `buf`. Returns the bytes
    /// consumed (the caller keeps the rest and calls again with more) and what
    /// happened.
    pub fn on_bytes(&mut self, buf: &[u8], exports: &dyn ExportSource) -> (usize, HsEvent) {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            match self.state {
                State::Done => return (pos, HsEvent::Continue),
                State::ClientFlags => {
                    if rest.len() < 4 {
                        return (pos, HsEvent::Continue);
                    }
                    let flags = be32(rest);
                    pos += 4;
                    // Unknown client flags oblige the server to drop the connection.
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        return self.close(pos, CloseReason::Protocol("unknown client flags"));
                    }
                    // Fixed newstyle is honoured even if the client did not ask:
                    // it only changes how errors are reported.
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::Option;
                }
                State::Skip {
                    option,
                    remaining,
                    reply,
                } => {
                    let n = (remaining as usize).min(rest.len());
                    pos += n;
                    let remaining = remaining - n as u32;
                    if remaining > 0 {
                        self.state = State::Skip {
                            option,
                            remaining,
                            reply,
                        };
                        return (pos, HsEvent::Continue);
                    }
                    let msg = if reply == REP_ERR_UNSUP {
                        "option not supported"
                    } else {
                        "option data too long"
                    };
                    self.reply_msg(option, reply, msg);
                    self.state = State::Option;
                }
                State::Option => {
                    if rest.len() < OPTION_HEADER_LEN {
                        return (pos, HsEvent::Continue);
                    }
                    if be64(rest) != IHAVEOPT {
                        return self.close(pos, CloseReason::Protocol("bad option magic"));
                    }
                    let option = be32(&rest[8..]);
                    let len = be32(&rest[12..]);
                    let known = matches!(
                        option,
                        OPT_EXPORT_NAME
                            | OPT_ABORT
                            | OPT_LIST
                            | OPT_INFO
                            | OPT_GO
                            | OPT_STRUCTURED_REPLY
                            | OPT_LIST_META_CONTEXT
                            | OPT_SET_META_CONTEXT
                            | OPT_STARTTLS
                    );
                    if !known || len > MAX_OPTION_DATA {
                        if option == OPT_EXPORT_NAME {
                            // Cannot be answered with an error; the name is too
                            // long to be any export's.
                            return self.close(
                                pos + OPTION_HEADER_LEN,
                                CloseReason::Protocol("export name too long"),
                            );
                        }
                        pos += OPTION_HEADER_LEN;
                        let reply = if known {
                            REP_ERR_TOO_BIG
                        } else {
                            REP_ERR_UNSUP
                        };
                        self.state = State::Skip {
                            option,
                            remaining: len,
                            reply,
                        };
                        continue;
                    }
                    let total = OPTION_HEADER_LEN + len as usize;
                    if rest.len() < total {
                        return (pos, HsEvent::Continue);
                    }
                    let data = &rest[OPTION_HEADER_LEN..total];
                    pos += total;
                    if let Some(ev) = self.on_option(option, data, exports) {
                        if matches!(ev, HsEvent::Go(_) | HsEvent::Close(_)) {
                            self.state = State::Done;
                        }
                        return (pos, ev);
                    }
                }
            }
        }
    }

    fn close(&mut self, pos: usize, why: CloseReason) -> (usize, HsEvent) {
        self.state = State::Done;
        (pos, HsEvent::Close(why))
    }

    /// Handles one whole option; `Some` ends this round of input.
    fn on_option(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn ExportSource,
    ) -> Option<HsEvent> {
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                let Some(e) = exports.lookup(&name) else {
                    return Some(HsEvent::Close(CloseReason::UnknownExport(name)));
                };
                let flags = e.tx_flags(self.structured);
                let size = e.size();
                self.out.extend_from_slice(&size.to_be_bytes());
                self.out.extend_from_slice(&flags.to_be_bytes());
                if !self.no_zeroes {
                    self.out.extend_from_slice(&[0u8; 124]);
                }
                let base_allocation = self.meta_export.as_deref() == Some(name.as_str());
                Some(HsEvent::Go(Negotiated {
                    export: e,
                    structured: self.structured,
                    base_allocation,
                    block_size_requested: false,
                    tx_flags: flags,
                    size,
                }))
            }
            OPT_ABORT => {
                // Data, if any, is ignored as the spec asks.
                self.reply(option, REP_ACK, &[]);
                Some(HsEvent::Close(CloseReason::Abort))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply_msg(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return None;
                }
                for e in exports.list() {
                    let name = e.name().as_bytes();
                    let desc = e.options().description.as_deref().unwrap_or("");
                    let len = 4 + name.len() + desc.len();
                    opt_reply_header(&mut self.out, option, REP_SERVER, len as u32);
                    self.out
                        .extend_from_slice(&(name.len() as u32).to_be_bytes());
                    self.out.extend_from_slice(name);
                    self.out.extend_from_slice(desc.as_bytes());
                }
                self.reply(option, REP_ACK, &[]);
                None
            }
            OPT_STARTTLS => {
                self.reply_msg(option, REP_ERR_POLICY, "TLS is not offered by this server");
                None
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.reply_msg(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                    return None;
                }
                self.structured = true;
                self.reply(option, REP_ACK, &[]);
                None
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, exports),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, exports);
                None
            }
            _ => {
                self.reply_msg(option, REP_ERR_UNSUP, "option not supported");
                None
            }
        }
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn ExportSource,
    ) -> Option<HsEvent> {
        // name length, name, number of info requests, requests (16 bits each)
        let parsed = (|| {
            let nlen = be32(data.get(..4)?) as usize;
            let name = data.get(4..4 + nlen)?;
            let rest = &data[4 + nlen..];
            let n = be16(rest.get(..2)?) as usize;
            let reqs = rest.get(2..)?;
            (reqs.len() == 2 * n).then_some((name, reqs))
        })();
        let Some((name, reqs)) = parsed else {
            self.reply_msg(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data");
            return None;
        };
        let Ok(name) = std::str::from_utf8(name) else {
            self.reply_msg(option, REP_ERR_INVALID, "export name is not UTF-8");
            return None;
        };
        let (mut want_name, mut want_desc, mut want_bs) = (false, false, false);
        for r in reqs.chunks_exact(2) {
            match be16(r) {
                INFO_NAME => want_name = true,
                INFO_DESCRIPTION => want_desc = true,
                INFO_BLOCK_SIZE => want_bs = true,
                _ => {} // unknown requests are ignored, as the spec asks
            }
        }
        let Some(e) = exports.lookup(name) else {
            let msg = format!("export '{name}' not found");
            self.reply_msg(option, REP_ERR_UNKNOWN, &msg);
            return None;
        };
        let flags = e.tx_flags(self.structured);
        let size = e.size();
        let mut info = [0u8; 12];
        info[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        info[2..10].copy_from_slice(&size.to_be_bytes());
        info[10..].copy_from_slice(&flags.to_be_bytes());
        self.reply(option, REP_INFO, &info);
        // Sent even when not asked for: a client that did not ask may ignore it,
        // and one that did learns the alignment every request must have.
        let (min, pref, max) = e.block_sizes(self.max_payload);
        let mut bs = [0u8; 14];
        bs[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        bs[2..6].copy_from_slice(&min.to_be_bytes());
        bs[6..10].copy_from_slice(&pref.to_be_bytes());
        bs[10..].copy_from_slice(&max.to_be_bytes());
        self.reply(option, REP_INFO, &bs);
        if want_name {
            let n = e.name().as_bytes();
            opt_reply_header(&mut self.out, option, REP_INFO, 2 + n.len() as u32);
            self.out.extend_from_slice(&INFO_NAME.to_be_bytes());
            self.out.extend_from_slice(n);
        }
        if want_desc {
            if let Some(d) = e.options().description.as_deref() {
                opt_reply_header(&mut self.out, option, REP_INFO, 2 + d.len() as u32);
                self.out.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                self.out.extend_from_slice(d.as_bytes());
            }
        }
        self.reply(option, REP_ACK, &[]);
        if option == OPT_INFO {
            return None;
        }
        let base_allocation = self.meta_export.as_deref() == Some(name);
        Some(HsEvent::Go(Negotiated {
            export: e,
            structured: self.structured,
            base_allocation,
            block_size_requested: want_bs,
            tx_flags: flags,
            size,
        }))
    }

    fn meta_context(&mut self, option: u32, data: &[u8], exports: &dyn ExportSource) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.meta_export = None;
        }
        if !self.structured {
            self.reply_msg(
                option,
                REP_ERR_INVALID,
                "negotiate structured replies before metadata contexts",
            );
            return;
        }
        // export name length, name, number of queries, (length, query)*
        let parsed = (|| {
            let nlen = be32(data.get(..4)?) as usize;
            let name = data.get(4..4 + nlen)?;
            let mut rest = data.get(4 + nlen..)?;
            let n = be32(rest.get(..4)?);
            rest = &rest[4..];
            let mut queries = Vec::new();
            for _ in 0..n {
                let qlen = be32(rest.get(..4)?) as usize;
                queries.push(rest.get(4..4 + qlen)?);
                rest = &rest[4 + qlen..];
            }
            rest.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            self.reply_msg(
                option,
                REP_ERR_INVALID,
                "malformed metadata context request",
            );
            return;
        };
        let name = String::from_utf8_lossy(name).into_owned();
        if exports.lookup(&name).is_none() {
            let msg = format!("export '{name}' not found");
            self.reply_msg(option, REP_ERR_UNKNOWN, &msg);
            return;
        }
        let base = META_BASE_ALLOCATION.as_bytes();
        let selected = if set {
            // "base:" alone selects nothing in SET; unknown names are ignored.
            queries.contains(&base)
        } else {
            queries.is_empty() || queries.iter().any(|q| *q == base || *q == b"base:")
        };
        if selected {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut v = Vec::with_capacity(4 + base.len());
            v.extend_from_slice(&id.to_be_bytes());
            v.extend_from_slice(base);
            self.reply(option, REP_META_CONTEXT, &v);
            if set {
                self.meta_export = Some(name);
            }
        }
        self.reply(option, REP_ACK, &[]);
    }

    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        opt_reply_header(&mut self.out, option, reply, data.len() as u32);
        self.out.extend_from_slice(data);
    }

    fn reply_msg(&mut self, option: u32, reply: u32, msg: &str) {
        self.reply(option, reply, msg.as_bytes());
    }
}

#[cfg(test)]
mod tests;
