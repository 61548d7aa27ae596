//! NVMe and NVMe/TCP wire formats, with no I/O.
//!
//! Everything here turns bytes into typed values and back: the NVMe/TCP PDUs
//! ([`pdu`]), submission and completion queue entries ([`sqe`], [`cqe`]), status
//! codes ([`status`]), fabrics commands and controller registers ([`fabrics`]),
//! Identify data ([`identify`]) and log pages ([`log`]). Decoders never panic on
//! input and never allocate more than the input bounds; every decoder that reads
//! the network is fuzzed (`fuzz/`) and property-tested.
//!
//! All integers are little-endian and all structures packed, as in the NVM Express
//! Base and NVMe/TCP Transport specifications.

pub mod cqe;
pub mod digest;
pub mod fabrics;
pub mod identify;
pub mod le;
pub mod log;
pub mod opcode;
pub mod pdu;
pub mod sqe;
pub mod status;

pub use cqe::Cqe;
pub use pdu::{DigestConfig, Pdu, PduError, PduHeader, PduType};
pub use sqe::{Sgl, Sqe};
pub use status::Status;

/// The well-known NQN of the discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Size of an NQN field on the wire (Connect data, Identify Controller, discovery log).
pub const NQN_FIELD_LEN: usize = 256;

/// Reads a NUL-padded ASCII string field (NQN, serial, model), trimming NULs and spaces.
pub fn read_str_field(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end])
        .trim_end()
        .to_string()
}

/// Writes `s` into `field`, truncating, padding the rest with `pad` (0 for NQNs,
/// b' ' for serial/model/firmware fields as the spec requires).
pub fn write_str_field(field: &mut [u8], s: &str, pad: u8) {
    let b = s.as_bytes();
    let n = b.len().min(field.len());
    field[..n].copy_from_slice(&b[..n]);
    field[n..].fill(pad);
}
