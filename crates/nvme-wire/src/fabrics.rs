//! Fabrics commands (Connect, Property Get/Set, Disconnect), Connect data, and
//! the controller registers a fabrics host reads and writes through properties.

use crate::le::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use crate::opcode::FabricsType;
use crate::sqe::{Sgl, Sqe};
use crate::{read_str_field, write_str_field, NQN_FIELD_LEN};

/// Opcode shared by all fabrics commands.
pub const FABRICS_OPCODE: u8 = 0x7F;
/// Length of the Connect command's data.
pub const CONNECT_DATA_LEN: usize = 1024;
/// cntlid a host passes on the admin Connect to ask for any controller (dynamic model).
pub const CNTLID_DYNAMIC: u16 = 0xFFFF;

/// Register offsets reachable by Property Get/Set.
pub mod reg {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1C;
    pub const NSSR: u32 = 0x20;
}

/// Connect command fields (SQE bytes 40..52).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectCmd {
    pub recfmt: u16,
    /// 0 = admin queue.
    pub qid: u16,
    /// Queue size, 0's based.
    pub sqsize: u16,
    /// Connect attributes; bit 2 = SQ flow control disable.
    pub cattr: u8,
    /// Keep Alive Timeout in milliseconds (admin queue only).
    pub kato: u32,
}

impl ConnectCmd {
    pub fn from_sqe(s: &Sqe) -> Self {
        ConnectCmd {
            recfmt: s.u16_at(40),
            qid: s.u16_at(42),
            sqsize: s.u16_at(44),
            cattr: s.u8_at(46),
            kato: s.u32_at(48),
        }
    }
    /// A Connect SQE with in-capsule Connect data.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut s = Sqe::new(FABRICS_OPCODE, cid);
        s.set_fctype(FabricsType::Connect as u8);
        s.set_sgl(Sgl::in_capsule(CONNECT_DATA_LEN as u32));
        s.put_u16(40, self.recfmt);
        s.put_u16(42, self.qid);
        s.put_u16(44, self.sqsize);
        s.put_u8(46, self.cattr);
        s.put_u32(48, self.kato);
        s
    }
    pub fn sq_flow_control_disabled(&self) -> bool {
        self.cattr & (1 << 2) != 0
    }
}

/// Offsets within the Connect SQE, for the "invalid parameter" IPO of a failed Connect.
pub mod connect_sqe_offset {
    pub const RECFMT: u16 = 40;
    pub const QID: u16 = 42;
    pub const SQSIZE: u16 = 44;
    pub const CATTR: u16 = 46;
    pub const KATO: u16 = 48;
}

/// Offsets within the Connect data, for the IPO of a failed Connect.
pub mod connect_data_offset {
    pub const HOSTID: u16 = 0;
    pub const CNTLID: u16 = 16;
    pub const SUBNQN: u16 = 256;
    pub const HOSTNQN: u16 = 512;
}

/// Connect command data (1024 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

impl ConnectData {
    /// Decodes Connect data; `None` if fewer than 1024 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < CONNECT_DATA_LEN {
            return None;
        }
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[0..16]);
        Some(ConnectData {
            hostid,
            cntlid: u16_at(b, 16),
            subnqn: read_str_field(&b[256..256 + NQN_FIELD_LEN]),
            hostnqn: read_str_field(&b[512..512 + NQN_FIELD_LEN]),
        })
    }
    pub fn to_bytes(&self) -> [u8; CONNECT_DATA_LEN] {
        let mut b = [0u8; CONNECT_DATA_LEN];
        b[0..16].copy_from_slice(&self.hostid);
        put_u16(&mut b, 16, self.cntlid);
        // NQNs are NUL-terminated within their 256 bytes.
        write_str_field(&mut b[256..256 + NQN_FIELD_LEN - 1], &self.subnqn, 0);
        write_str_field(&mut b[512..512 + NQN_FIELD_LEN - 1], &self.hostnqn, 0);
        b
    }
}

/// Connect response dword 0 for "Connect Invalid Parameters".
pub fn connect_invalid_param(ipo: u16, in_data: bool) -> u32 {
    ipo as u32 | ((in_data as u32) << 16)
}

/// Property Get / Set command fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertyCmd {
    /// True for 8-byte access.
    pub size8: bool,
    pub offset: u32,
    /// Value for Property Set.
    pub value: u64,
}

impl PropertyCmd {
    pub fn from_sqe(s: &Sqe) -> Self {
        PropertyCmd {
            size8: s.u8_at(40) & 1 != 0,
            offset: s.u32_at(44),
            value: s.u64_at(48),
        }
    }
    pub fn get_sqe(cid: u16, offset: u32, size8: bool) -> Sqe {
        let mut s = Sqe::new(FABRICS_OPCODE, cid);
        s.set_fctype(FabricsType::PropertyGet as u8);
        s.put_u8(40, size8 as u8);
        s.put_u32(44, offset);
        s
    }
    pub fn set_sqe(cid: u16, offset: u32, value: u64, size8: bool) -> Sqe {
        let mut s = Sqe::new(FABRICS_OPCODE, cid);
        s.set_fctype(FabricsType::PropertySet as u8);
        s.put_u8(40, size8 as u8);
        s.put_u32(44, offset);
        s.put_u64(48, value);
        s
    }
}

/// A Disconnect SQE (NVMe-oF 1.1; tears down the queue it is sent on).
pub fn disconnect_sqe(cid: u16) -> Sqe {
    let mut s = Sqe::new(FABRICS_OPCODE, cid);
    s.set_fctype(FabricsType::Disconnect as u8);
    s
}

/// Controller Capabilities (CAP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cap {
    /// Maximum queue entries supported, 0's based.
    pub mqes: u16,
    pub cqr: bool,
    /// Timeout in 500 ms units (worst-case time to CSTS.RDY).
    pub to: u8,
    pub dstrd: u8,
    pub nssrs: bool,
    /// Command sets supported (bit 0: NVM).
    pub css: u8,
    pub mpsmin: u8,
    pub mpsmax: u8,
}

impl Cap {
    pub fn to_u64(&self) -> u64 {
        self.mqes as u64
            | (self.cqr as u64) << 16
            | (self.to as u64) << 24
            | ((self.dstrd & 0xF) as u64) << 32
            | (self.nssrs as u64) << 36
            | (self.css as u64) << 37
            | ((self.mpsmin & 0xF) as u64) << 48
            | ((self.mpsmax & 0xF) as u64) << 52
    }
    pub fn from_u64(v: u64) -> Self {
        Cap {
            mqes: v as u16,
            cqr: v & (1 << 16) != 0,
            to: (v >> 24) as u8,
            dstrd: ((v >> 32) & 0xF) as u8,
            nssrs: v & (1 << 36) != 0,
            css: (v >> 37) as u8,
            mpsmin: ((v >> 48) & 0xF) as u8,
            mpsmax: ((v >> 52) & 0xF) as u8,
        }
    }
}

/// Controller Configuration (CC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cc {
    pub en: bool,
    pub css: u8,
    pub mps: u8,
    pub ams: u8,
    /// Shutdown notification: 0 none, 1 normal, 2 abrupt.
    pub shn: u8,
    pub iosqes: u8,
    pub iocqes: u8,
}

impl Cc {
    pub fn from_u32(v: u32) -> Self {
        Cc {
            en: v & 1 != 0,
            css: ((v >> 4) & 7) as u8,
            mps: ((v >> 7) & 0xF) as u8,
            ams: ((v >> 11) & 7) as u8,
            shn: ((v >> 14) & 3) as u8,
            iosqes: ((v >> 16) & 0xF) as u8,
            iocqes: ((v >> 20) & 0xF) as u8,
        }
    }
    pub fn to_u32(&self) -> u32 {
        self.en as u32
            | ((self.css & 7) as u32) << 4
            | ((self.mps & 0xF) as u32) << 7
            | ((self.ams & 7) as u32) << 11
            | ((self.shn & 3) as u32) << 14
            | ((self.iosqes & 0xF) as u32) << 16
            | ((self.iocqes & 0xF) as u32) << 20
    }
}

/// Controller Status (CSTS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Csts {
    pub rdy: bool,
    /// Controller Fatal Status.
    pub cfs: bool,
    /// Shutdown status: 0 normal, 1 occurring, 2 complete.
    pub shst: u8,
}

impl Csts {
    pub fn from_u32(v: u32) -> Self {
        Csts {
            rdy: v & 1 != 0,
            cfs: v & 2 != 0,
            shst: ((v >> 2) & 3) as u8,
        }
    }
    pub fn to_u32(&self) -> u32 {
        self.rdy as u32 | (self.cfs as u32) << 1 | ((self.shst & 3) as u32) << 2
    }
}

/// Version register value for NVMe `major.minor.tertiary`.
pub const fn version(major: u16, minor: u8, tertiary: u8) -> u32 {
    (major as u32) << 16 | (minor as u32) << 8 | tertiary as u32
}

/// Get a little-endian u64 from a result pair, for Property Get of CAP.
pub fn u64_from_dw(dw0: u32, dw1: u32) -> u64 {
    dw0 as u64 | (dw1 as u64) << 32
}

/// Helpers for byte buffers holding registers (used by tests and fixtures).
pub fn put_reg(b: &mut [u8], off: usize, v: u64, size8: bool) {
    if size8 {
        put_u64(b, off, v)
    } else {
        put_u32(b, off, v as u32)
    }
}

/// Reads a register-sized value from bytes.
pub fn get_reg(b: &[u8], off: usize, size8: bool) -> u64 {
    if size8 {
        u64_at(b, off)
    } else {
        u32_at(b, off) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_round_trip() {
        let c = ConnectCmd {
            recfmt: 0,
            qid: 1,
            sqsize: 127,
            cattr: 0,
            kato: 0,
        };
        let s = c.to_sqe(5);
        assert_eq!(s.opcode(), 0x7F);
        assert_eq!(s.fctype(), 1);
        assert_eq!(s.0[39], 0x01, "in-capsule SGL");
        assert_eq!(ConnectCmd::from_sqe(&s), c);
        let d = ConnectData {
            hostid: [1; 16],
            cntlid: 0xFFFF,
            subnqn: "nqn.2024-01.io.corral:sub".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".into(),
        };
        let b = d.to_bytes();
        assert_eq!(ConnectData::from_bytes(&b).unwrap(), d);
        assert!(ConnectData::from_bytes(&b[..1000]).is_none());
    }

    #[test]
    fn registers() {
        let cap = Cap {
            mqes: 127,
            cqr: true,
            to: 15,
            css: 1,
            mpsmax: 0,
            ..Default::default()
        };
        assert_eq!(Cap::from_u64(cap.to_u64()), cap);
        let cc = Cc {
            en: true,
            iosqes: 6,
            iocqes: 4,
            ..Default::default()
        };
        assert_eq!(cc.to_u32(), 0x0046_0001);
        assert_eq!(Cc::from_u32(0x0046_0001), cc);
        assert_eq!(
            Csts {
                rdy: true,
                cfs: false,
                shst: 2
            }
            .to_u32(),
            0b1001
        );
        assert_eq!(version(1, 4, 0), 0x0001_0400);
    }
}
