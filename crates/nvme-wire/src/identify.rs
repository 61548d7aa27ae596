//! Identify data structures: Controller (CNS 1), Namespace (CNS 0), Active
//! Namespace ID list (CNS 2) and Namespace Identification Descriptors (CNS 3).

use crate::le::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use crate::{read_str_field, write_str_field, NQN_FIELD_LEN};

/// Every Identify structure is 4096 bytes.
pub const IDENTIFY_LEN: usize = 4096;

/// Controller type (CNTRLTYPE).
pub const CNTRLTYPE_IO: u8 = 1;
pub const CNTRLTYPE_DISCOVERY: u8 = 2;

/// ONCS bits.
pub const ONCS_DSM: u16 = 1 << 2;
pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;

/// The Identify Controller fields corral sets or reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentifyController {
    pub vid: u16,
    pub ssvid: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub rab: u8,
    pub ieee: [u8; 3],
    pub cmic: u8,
    /// Maximum data transfer size, as a power of two of the minimum page size (0 = none).
    pub mdts: u8,
    pub cntlid: u16,
    pub ver: u32,
    pub oaes: u32,
    pub ctratt: u32,
    pub cntrltype: u8,
    pub oacs: u16,
    pub acl: u8,
    pub aerl: u8,
    pub frmw: u8,
    /// Log page attributes.
    pub lpa: u8,
    /// Error log page entries, 0's based.
    pub elpe: u8,
    /// Keep Alive Support granularity in 100 ms units.
    pub kas: u16,
    pub sqes: u8,
    pub cqes: u8,
    pub maxcmd: u16,
    /// Number of namespaces.
    pub nn: u32,
    pub oncs: u16,
    pub fuses: u16,
    pub fna: u8,
    pub vwc: u8,
    pub awun: u16,
    pub awupf: u16,
    pub acwu: u16,
    pub sgls: u32,
    pub subnqn: String,
    /// I/O queue command capsule supported size, in 16-byte units.
    pub ioccsz: u32,
    /// I/O queue response capsule supported size, in 16-byte units.
    pub iorcsz: u32,
    pub icdoff: u16,
    /// Controller attributes (bit 0: dynamic controller model).
    pub fcatt: u8,
    pub msdbd: u8,
}

impl IdentifyController {
    pub fn to_bytes(&self) -> Box<[u8; IDENTIFY_LEN]> {
        let mut b = Box::new([0u8; IDENTIFY_LEN]);
        put_u16(&mut b[..], 0, self.vid);
        put_u16(&mut b[..], 2, self.ssvid);
        write_str_field(&mut b[4..24], &self.serial, b' ');
        write_str_field(&mut b[24..64], &self.model, b' ');
        write_str_field(&mut b[64..72], &self.firmware, b' ');
        b[72] = self.rab;
        b[73..76].copy_from_slice(&self.ieee);
        b[76] = self.cmic;
        b[77] = self.mdts;
        put_u16(&mut b[..], 78, self.cntlid);
        put_u32(&mut b[..], 80, self.ver);
        put_u32(&mut b[..], 92, self.oaes);
        put_u32(&mut b[..], 96, self.ctratt);
        b[111] = self.cntrltype;
        put_u16(&mut b[..], 256, self.oacs);
        b[258] = self.acl;
        b[259] = self.aerl;
        b[260] = self.frmw;
        b[261] = self.lpa;
        b[262] = self.elpe;
        put_u16(&mut b[..], 320, self.kas);
        b[512] = self.sqes;
        b[513] = self.cqes;
        put_u16(&mut b[..], 514, self.maxcmd);
        put_u32(&mut b[..], 516, self.nn);
        put_u16(&mut b[..], 520, self.oncs);
        put_u16(&mut b[..], 522, self.fuses);
        b[524] = self.fna;
        b[525] = self.vwc;
        put_u16(&mut b[..], 526, self.awun);
        put_u16(&mut b[..], 528, self.awupf);
        put_u16(&mut b[..], 532, self.acwu);
        put_u32(&mut b[..], 536, self.sgls);
        write_str_field(&mut b[768..768 + NQN_FIELD_LEN - 1], &self.subnqn, 0);
        put_u32(&mut b[..], 1792, self.ioccsz);
        put_u32(&mut b[..], 1796, self.iorcsz);
        put_u16(&mut b[..], 1800, self.icdoff);
        b[1802] = self.fcatt;
        b[1803] = self.msdbd;
        b
    }

    /// Decodes Identify Controller; `None` if fewer than 4096 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < IDENTIFY_LEN {
            return None;
        }
        let mut ieee = [0u8; 3];
        ieee.copy_from_slice(&b[73..76]);
        Some(IdentifyController {
            vid: u16_at(b, 0),
            ssvid: u16_at(b, 2),
            serial: read_str_field(&b[4..24]),
            model: read_str_field(&b[24..64]),
            firmware: read_str_field(&b[64..72]),
            rab: b[72],
            ieee,
            cmic: b[76],
            mdts: b[77],
            cntlid: u16_at(b, 78),
            ver: u32_at(b, 80),
            oaes: u32_at(b, 92),
            ctratt: u32_at(b, 96),
            cntrltype: b[111],
            oacs: u16_at(b, 256),
            acl: b[258],
            aerl: b[259],
            frmw: b[260],
            lpa: b[261],
            elpe: b[262],
            kas: u16_at(b, 320),
            sqes: b[512],
            cqes: b[513],
            maxcmd: u16_at(b, 514),
            nn: u32_at(b, 516),
            oncs: u16_at(b, 520),
            fuses: u16_at(b, 522),
            fna: b[524],
            vwc: b[525],
            awun: u16_at(b, 526),
            awupf: u16_at(b, 528),
            acwu: u16_at(b, 532),
            sgls: u32_at(b, 536),
            subnqn: read_str_field(&b[768..768 + NQN_FIELD_LEN]),
            ioccsz: u32_at(b, 1792),
            iorcsz: u32_at(b, 1796),
            icdoff: u16_at(b, 1800),
            fcatt: b[1802],
            msdbd: b[1803],
        })
    }
}

/// The Identify Namespace fields corral sets or reads (one LBA format).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentifyNamespace {
    /// Namespace size in logical blocks.
    pub nsze: u64,
    pub ncap: u64,
    pub nuse: u64,
    /// Namespace features (bit 0 thin provisioning, bit 2 DAE/deallocated error).
    pub nsfeat: u8,
    /// Number of LBA formats, 0's based.
    pub nlbaf: u8,
    pub flbas: u8,
    /// Deallocate logical block features (bits 2:0 = 1: deallocated blocks read as zeroes).
    pub dlfeat: u8,
    /// Namespace multi-path I/O and sharing capabilities.
    pub nmic: u8,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    /// log2 of the block size of the LBA format FLBAS selects (the only one modelled).
    pub lbads: u8,
}

impl IdentifyNamespace {
    pub fn block_size(&self) -> u64 {
        1u64 << self.lbads.min(63)
    }
    /// Index of the LBA format in use (FLBAS bits 3:0).
    pub fn format_index(&self) -> usize {
        (self.flbas & 0xF) as usize
    }
    pub fn to_bytes(&self) -> Box<[u8; IDENTIFY_LEN]> {
        let mut b = Box::new([0u8; IDENTIFY_LEN]);
        put_u64(&mut b[..], 0, self.nsze);
        put_u64(&mut b[..], 8, self.ncap);
        put_u64(&mut b[..], 16, self.nuse);
        b[24] = self.nsfeat;
        b[25] = self.nlbaf;
        b[26] = self.flbas;
        b[30] = self.nmic;
        b[33] = self.dlfeat;
        b[104..120].copy_from_slice(&self.nguid);
        b[120..128].copy_from_slice(&self.eui64);
        // The format descriptor goes where FLBAS points: a host reads the block size
        // from the selected format, not from format 0.
        put_u32(
            &mut b[..],
            128 + self.format_index() * 4,
            (self.lbads as u32) << 16,
        );
        b
    }
    /// Decodes Identify Namespace, reading the LBA format FLBAS selects.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < IDENTIFY_LEN {
            return None;
        }
        let flbas = b[26];
        let fmt = (flbas & 0xF) as usize;
        let mut nguid = [0u8; 16];
        nguid.copy_from_slice(&b[104..120]);
        let mut eui64 = [0u8; 8];
        eui64.copy_from_slice(&b[120..128]);
        Some(IdentifyNamespace {
            nsze: u64_at(b, 0),
            ncap: u64_at(b, 8),
            nuse: u64_at(b, 16),
            nsfeat: b[24],
            nlbaf: b[25],
            flbas,
            nmic: b[30],
            dlfeat: b[33],
            nguid,
            eui64,
            lbads: ((u32_at(b, 128 + fmt * 4) >> 16) & 0xFF) as u8,
        })
    }
}

/// Active Namespace ID list (CNS 2): NSIDs greater than `after`, ascending.
pub fn active_ns_list(nsids: &[u32], after: u32) -> Box<[u8; IDENTIFY_LEN]> {
    let mut b = Box::new([0u8; IDENTIFY_LEN]);
    let mut sorted: Vec<u32> = nsids.iter().copied().filter(|&n| n > after).collect();
    sorted.sort_unstable();
    for (i, n) in sorted.into_iter().take(IDENTIFY_LEN / 4).enumerate() {
        put_u32(&mut b[..], i * 4, n);
    }
    b
}

/// Parses an Active Namespace ID list (stops at the first zero).
pub fn parse_active_ns_list(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&n| n != 0)
        .collect()
}

/// Namespace Identification Descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NsDescriptor {
    Eui64([u8; 8]),
    Nguid([u8; 16]),
    Uuid([u8; 16]),
    /// Command Set Identifier.
    Csi(u8),
}

impl NsDescriptor {
    fn nidt(&self) -> u8 {
        match self {
            Self::Eui64(_) => 1,
            Self::Nguid(_) => 2,
            Self::Uuid(_) => 3,
            Self::Csi(_) => 4,
        }
    }
    fn value(&self) -> &[u8] {
        match self {
            Self::Eui64(v) => v,
            Self::Nguid(v) | Self::Uuid(v) => v,
            Self::Csi(v) => std::slice::from_ref(v),
        }
    }
}

/// Encodes a Namespace Identification Descriptor list (CNS 3).
pub fn ns_descriptor_list(d: &[NsDescriptor]) -> Box<[u8; IDENTIFY_LEN]> {
    let mut b = Box::new([0u8; IDENTIFY_LEN]);
    let mut off = 0;
    for x in d {
        let v = x.value();
        if off + 4 + v.len() > IDENTIFY_LEN {
            break;
        }
        b[off] = x.nidt();
        b[off + 1] = v.len() as u8;
        b[off + 4..off + 4 + v.len()].copy_from_slice(v);
        off += 4 + v.len();
    }
    b
}

/// Parses a Namespace Identification Descriptor list; unknown types are skipped,
/// a malformed entry ends the list.
pub fn parse_ns_descriptor_list(b: &[u8]) -> Vec<NsDescriptor> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= b.len() {
        let (t, l) = (b[off], b[off + 1] as usize);
        if t == 0 || off + 4 + l > b.len() {
            break;
        }
        let v = &b[off + 4..off + 4 + l];
        match (t, l) {
            (1, 8) => out.push(NsDescriptor::Eui64(v.try_into().unwrap_or([0; 8]))),
            (2, 16) => out.push(NsDescriptor::Nguid(v.try_into().unwrap_or([0; 16]))),
            (3, 16) => out.push(NsDescriptor::Uuid(v.try_into().unwrap_or([0; 16]))),
            (4, 1) => out.push(NsDescriptor::Csi(v[0])),
            _ => {}
        }
        off += 4 + l;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_round_trip_and_offsets() {
        let c = IdentifyController {
            vid: 0x1d0f,
            serial: "CORRAL0001".into(),
            model: "corral".into(),
            firmware: "0.1".into(),
            mdts: 5,
            cntlid: 3,
            ver: 0x0001_0400,
            cntrltype: CNTRLTYPE_IO,
            kas: 100,
            sqes: 0x66,
            cqes: 0x44,
            nn: 32,
            oncs: ONCS_DSM | ONCS_WRITE_ZEROES,
            sgls: 1 | (1 << 20),
            subnqn: "nqn.2024-01.io.corral:x".into(),
            ioccsz: 260,
            iorcsz: 1,
            fcatt: 1,
            msdbd: 1,
            ..Default::default()
        };
        let b = c.to_bytes();
        assert_eq!(&b[24..30], b"corral");
        assert_eq!(b[30], b' ', "model is space padded");
        assert_eq!(b[512], 0x66);
        assert_eq!(u32_at(&b[..], 1792), 260);
        assert_eq!(&b[768..791], b"nqn.2024-01.io.corral:x");
        assert_eq!(IdentifyController::from_bytes(&b[..]).unwrap(), c);
    }

    #[test]
    fn namespace_round_trip() {
        let n = IdentifyNamespace {
            nsze: 1 << 20,
            ncap: 1 << 20,
            nuse: 0,
            nsfeat: 1,
            dlfeat: 1,
            nguid: [9; 16],
            lbads: 9,
            ..Default::default()
        };
        let b = n.to_bytes();
        assert_eq!(b[130], 9);
        let back = IdentifyNamespace::from_bytes(&b[..]).unwrap();
        assert_eq!(back, n);
        assert_eq!(back.block_size(), 512);
    }

    #[test]
    fn lists() {
        let b = active_ns_list(&[3, 1, 2], 1);
        assert_eq!(parse_active_ns_list(&b[..]), vec![2, 3]);
        let d = vec![
            NsDescriptor::Nguid([1; 16]),
            NsDescriptor::Uuid([2; 16]),
            NsDescriptor::Csi(0),
        ];
        let b = ns_descriptor_list(&d);
        assert_eq!(&b[0..4], &[2, 16, 0, 0]);
        assert_eq!(parse_ns_descriptor_list(&b[..]), d);
    }
}
