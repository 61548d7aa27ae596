//! Completion queue entries (16 bytes).

use crate::le::{put_u16, put_u32, u16_at, u32_at};
use crate::status::Status;

/// Length of a CQE on the wire.
pub const CQE_LEN: usize = 16;

/// A completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cqe {
    /// Command specific result (dword 0).
    pub dw0: u32,
    pub dw1: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

impl Cqe {
    pub fn new(cid: u16, status: Status) -> Self {
        Cqe {
            cid,
            status,
            ..Default::default()
        }
    }
    pub fn from_bytes(b: &[u8; CQE_LEN]) -> Self {
        Cqe {
            dw0: u32_at(b, 0),
            dw1: u32_at(b, 4),
            sqhd: u16_at(b, 8),
            sqid: u16_at(b, 10),
            cid: u16_at(b, 12),
            status: Status::from_field(u16_at(b, 14)),
        }
    }
    /// Encodes the CQE. NVMe/TCP has no phase tag; it is sent as zero.
    pub fn to_bytes(&self) -> [u8; CQE_LEN] {
        let mut b = [0u8; CQE_LEN];
        self.write_to(&mut b);
        b
    }
    pub fn write_to(&self, b: &mut [u8]) {
        put_u32(b, 0, self.dw0);
        put_u32(b, 4, self.dw1);
        put_u16(b, 8, self.sqhd);
        put_u16(b, 10, self.sqid);
        put_u16(b, 12, self.cid);
        put_u16(b, 14, self.status.to_field(false));
    }
    /// 64-bit result (dw0 | dw1 << 32), used by Property Get of 8-byte registers.
    pub fn result_u64(&self) -> u64 {
        self.dw0 as u64 | ((self.dw1 as u64) << 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::GenericStatus;

    #[test]
    fn round_trip() {
        let c = Cqe {
            dw0: 0xdead_beef,
            dw1: 1,
            sqhd: 3,
            sqid: 2,
            cid: 0x1234,
            status: Status::generic(GenericStatus::LbaOutOfRange).with_dnr(),
        };
        let b = c.to_bytes();
        assert_eq!(&b[12..16], &[0x34, 0x12, 0x00, 0x81]);
        assert_eq!(Cqe::from_bytes(&b), c);
    }
}
