//! NBD wire constants and encoders, from the protocol document
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>).
//! Everything on the wire is big-endian. No I/O here.

use bdev::IoError;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended-header request (`NBD_OPT_EXTENDED_HEADERS`, not offered).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (16 bits).
pub const TX_HAS_FLAGS: u16 = 1 << 0;
pub const TX_READ_ONLY: u16 = 1 << 1;
pub const TX_SEND_FLUSH: u16 = 1 << 2;
pub const TX_SEND_FUA: u16 = 1 << 3;
pub const TX_ROTATIONAL: u16 = 1 << 4;
pub const TX_SEND_TRIM: u16 = 1 << 5;
pub const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TX_SEND_DF: u16 = 1 << 7;
pub const TX_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TX_SEND_CACHE: u16 = 1 << 10;
pub const TX_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option types.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

/// The one metadata context offered, and the id it gets when selected.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// The default maximum payload that clients honour without negotiation (32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;
/// Longest string (export name, description) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// The error values NBD defines for replies. Anything else a server meets is
/// mapped onto these in [`Errno::from_io_error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The value a client sees for a failed bdev I/O: the one place where bdev
    /// errors meet NBD error codes.
    pub fn from_io_error(e: &IoError) -> Errno {
        match e {
            IoError::NoSpace => Errno::NoSpc,
            // The spec asks for EFBIG (and EDQUOT, which from_errno already folds
            // into NoSpace) to be reported as ENOSPC.
            IoError::Errno(e) if *e == libc::EFBIG => Errno::NoSpc,
            IoError::ReadOnly => Errno::Perm,
            IoError::OutOfRange => Errno::Inval,
            IoError::InvalidBuffer
            | IoError::NotSupported
            | IoError::Removed
            | IoError::Aborted
            | IoError::Timeout
            | IoError::NoPath
            | IoError::Media
            | IoError::Errno(_)
            | IoError::Remote(_) => Errno::Io,
        }
    }

    /// Decodes a reply's error field (for tests and tools).
    pub fn from_code(c: u32) -> Option<Errno> {
        Some(match c {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            22 => Errno::Inval,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => return None,
        })
    }
}

/// One transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a request header could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

impl Request {
    /// Decodes a request header from exactly [`REQUEST_LEN`] bytes.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, RequestError> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(RequestError::BadMagic(magic));
        }
        Ok(Request {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            handle: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }

    /// Encodes the header (clients and tests).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.kind.to_be_bytes());
        out.extend_from_slice(&self.handle.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub(crate) fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Appends a simple reply header.
pub fn simple_reply(out: &mut Vec<u8>, handle: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// Appends a structured reply chunk header announcing `len` payload bytes.
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a final `NBD_REPLY_TYPE_ERROR` chunk with a message for humans.
pub fn error_chunk(out: &mut Vec<u8>, handle: u64, error: Errno, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
    chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.code().to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Appends an option reply header with `len` bytes of data to follow.
pub fn opt_reply_header(out: &mut Vec<u8>, option: u32, reply: u32, len: u32) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let mut v = Vec::new();
        r.encode(&mut v);
        assert_eq!(v.len(), REQUEST_LEN);
        let arr: [u8; REQUEST_LEN] = v.clone().try_into().unwrap();
        assert_eq!(Request::decode(&arr), Ok(r));
        let mut bad = arr;
        bad[0] ^= 1;
        assert!(matches!(
            Request::decode(&bad),
            Err(RequestError::BadMagic(_))
        ));
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(Errno::from_io_error(&IoError::NoSpace), Errno::NoSpc);
        assert_eq!(Errno::from_io_error(&IoError::ReadOnly), Errno::Perm);
        assert_eq!(Errno::from_io_error(&IoError::OutOfRange), Errno::Inval);
        assert_eq!(
            Errno::from_io_error(&IoError::Errno(libc::EFBIG)),
            Errno::NoSpc
        );
        assert_eq!(Errno::from_io_error(&IoError::Removed), Errno::Io);
        assert_eq!(Errno::from_io_error(&IoError::Media), Errno::Io);
        assert_eq!(
            Errno::from_io_error(&IoError::Errno(libc::EINVAL)),
            Errno::Io
        );
        for e in [1, 5, 12, 22, 28, 75, 95, 108] {
            assert_eq!(Errno::from_code(e).unwrap().code(), e);
        }
        assert_eq!(Errno::from_code(2), None);
    }

    #[test]
    fn error_chunk_layout() {
        let mut v = Vec::new();
        error_chunk(&mut v, 7, Errno::Inval, "bad");
        assert_eq!(v.len(), CHUNK_HEADER_LEN + 6 + 3);
        assert_eq!(be32(&v[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&v[4..6]), REPLY_FLAG_DONE);
        assert_eq!(be16(&v[6..8]), REPLY_TYPE_ERROR);
        assert_eq!(be64(&v[8..16]), 7);
        assert_eq!(be32(&v[16..20]), 9);
        assert_eq!(be32(&v[20..24]), 22);
        assert_eq!(be16(&v[24..26]), 3);
        assert_eq!(&v[26..], b"bad");
    }
}
