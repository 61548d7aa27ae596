//! Submission queue entries (64 bytes) and SGL descriptors.

use crate::le::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};

/// Length of an SQE on the wire.
pub const SQE_LEN: usize = 64;

/// A 64-byte submission queue entry, kept as bytes with typed accessors so that
/// decoding is a copy and unknown fields survive a round trip.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sqe(pub [u8; SQE_LEN]);

impl Default for Sqe {
    fn default() -> Self {
        Sqe([0; SQE_LEN])
    }
}

impl std::fmt::Debug for Sqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqe")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("cid", &self.cid())
            .field("nsid", &self.nsid())
            .field("fctype", &format_args!("{:#04x}", self.fctype()))
            .field("sgl", &self.sgl())
            .field("cdw10", &format_args!("{:#x}", self.cdw(10)))
            .field("cdw11", &format_args!("{:#x}", self.cdw(11)))
            .field("cdw12", &format_args!("{:#x}", self.cdw(12)))
            .finish()
    }
}

impl Sqe {
    /// Builds an SQE from exactly 64 bytes.
    pub fn from_bytes(b: &[u8; SQE_LEN]) -> Self {
        Sqe(*b)
    }
    /// A new SQE with an opcode and command id; the PSDT bits say "SGL", as fabrics require.
    pub fn new(opcode: u8, cid: u16) -> Self {
        let mut s = Sqe::default();
        s.0[0] = opcode;
        s.0[1] = 0x40; // PSDT = 01b: SGL for data
        s.set_cid(cid);
        s
    }
    pub fn opcode(&self) -> u8 {
        self.0[0]
    }
    /// Fused operation bits 1:0 and PSDT bits 7:6.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn psdt(&self) -> u8 {
        self.0[1] >> 6
    }
    pub fn cid(&self) -> u16 {
        u16_at(&self.0, 2)
    }
    pub fn set_cid(&mut self, cid: u16) {
        put_u16(&mut self.0, 2, cid)
    }
    pub fn nsid(&self) -> u32 {
        u32_at(&self.0, 4)
    }
    pub fn set_nsid(&mut self, nsid: u32) {
        put_u32(&mut self.0, 4, nsid)
    }
    /// Fabrics command type (byte 4 of a fabrics command; overlaps nsid).
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
    pub fn set_fctype(&mut self, t: u8) {
        self.0[4] = t
    }
    pub fn sgl(&self) -> Sgl {
        let mut b = [0u8; 16];
        b.copy_from_slice(&self.0[24..40]);
        Sgl::from_bytes(&b)
    }
    pub fn set_sgl(&mut self, sgl: Sgl) {
        self.0[24..40].copy_from_slice(&sgl.to_bytes())
    }
    /// Command dword `n` (2..=15). Dwords 10..15 carry command parameters.
    pub fn cdw(&self, n: usize) -> u32 {
        u32_at(&self.0, n * 4)
    }
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        put_u32(&mut self.0, n * 4, v)
    }
    pub fn u8_at(&self, off: usize) -> u8 {
        self.0[off]
    }
    pub fn u16_at(&self, off: usize) -> u16 {
        u16_at(&self.0, off)
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32_at(&self.0, off)
    }
    pub fn u64_at(&self, off: usize) -> u64 {
        u64_at(&self.0, off)
    }
    pub fn put_u8(&mut self, off: usize, v: u8) {
        self.0[off] = v
    }
    pub fn put_u16(&mut self, off: usize, v: u16) {
        put_u16(&mut self.0, off, v)
    }
    pub fn put_u32(&mut self, off: usize, v: u32) {
        put_u32(&mut self.0, off, v)
    }
    pub fn put_u64(&mut self, off: usize, v: u64) {
        put_u64(&mut self.0, off, v)
    }

    // NVM I/O command fields.

    /// Starting LBA (cdw10/11) of read, write and write zeroes.
    pub fn slba(&self) -> u64 {
        u64_at(&self.0, 40)
    }
    pub fn set_slba(&mut self, lba: u64) {
        put_u64(&mut self.0, 40, lba)
    }
    /// Number of logical blocks, converted from the 0's based field in cdw12.
    pub fn nlb(&self) -> u32 {
        (self.cdw(12) & 0xFFFF) + 1
    }
    /// Sets NLB (1-based count; stored 0's based) keeping the other cdw12 bits.
    pub fn set_nlb(&mut self, nlb: u32) {
        let v = (self.cdw(12) & !0xFFFF) | (nlb.saturating_sub(1) & 0xFFFF);
        self.set_cdw(12, v)
    }
    /// Force Unit Access (cdw12 bit 30).
    pub fn fua(&self) -> bool {
        self.cdw(12) & (1 << 30) != 0
    }
    pub fn set_fua(&mut self, fua: bool) {
        let v = self.cdw(12) & !(1 << 30) | ((fua as u32) << 30);
        self.set_cdw(12, v)
    }
}

/// SGL descriptor type (byte 15 bits 7:4).
pub const SGL_TYPE_DATA_BLOCK: u8 = 0x0;
pub const SGL_TYPE_TRANSPORT_DATA_BLOCK: u8 = 0x5;
/// SGL descriptor subtype (byte 15 bits 3:0).
pub const SGL_SUBTYPE_ADDRESS: u8 = 0x0;
pub const SGL_SUBTYPE_OFFSET: u8 = 0x1;
pub const SGL_SUBTYPE_TRANSPORT: u8 = 0xA;

/// A 16-byte SGL descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sgl {
    pub address: u64,
    pub length: u32,
    pub sgl_type: u8,
    pub subtype: u8,
}

impl Sgl {
    /// In-capsule data: Data Block descriptor, Offset subtype, address 0.
    pub fn in_capsule(length: u32) -> Self {
        Sgl {
            address: 0,
            length,
            sgl_type: SGL_TYPE_DATA_BLOCK,
            subtype: SGL_SUBTYPE_OFFSET,
        }
    }
    /// Data moved by the transport (R2T/H2CData or C2HData).
    pub fn transport(length: u32) -> Self {
        Sgl {
            address: 0,
            length,
            sgl_type: SGL_TYPE_TRANSPORT_DATA_BLOCK,
            subtype: SGL_SUBTYPE_TRANSPORT,
        }
    }
    pub fn is_in_capsule(&self) -> bool {
        self.sgl_type == SGL_TYPE_DATA_BLOCK && self.subtype == SGL_SUBTYPE_OFFSET
    }
    pub fn is_transport(&self) -> bool {
        self.sgl_type == SGL_TYPE_TRANSPORT_DATA_BLOCK && self.subtype == SGL_SUBTYPE_TRANSPORT
    }
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Sgl {
            address: u64_at(b, 0),
            length: u32_at(b, 8),
            sgl_type: b[15] >> 4,
            subtype: b[15] & 0xF,
        }
    }
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put_u64(&mut b, 0, self.address);
        put_u32(&mut b, 8, self.length);
        b[15] = (self.sgl_type << 4) | (self.subtype & 0xF);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_fields() {
        let mut s = Sqe::new(0x02, 7);
        s.set_nsid(1);
        s.set_slba(0x1_0000_0002);
        s.set_nlb(8);
        s.set_fua(true);
        s.set_sgl(Sgl::transport(4096));
        assert_eq!(s.opcode(), 2);
        assert_eq!(s.cid(), 7);
        assert_eq!(s.slba(), 0x1_0000_0002);
        assert_eq!(s.cdw(12), (1 << 30) | 7);
        assert_eq!(s.nlb(), 8);
        assert!(s.fua());
        assert_eq!(s.0[39], 0x5A);
        assert_eq!(s.sgl().length, 4096);
        assert!(s.sgl().is_transport());
    }

    #[test]
    fn sgl_in_capsule_byte() {
        assert_eq!(Sgl::in_capsule(1024).to_bytes()[15], 0x01);
    }
}
