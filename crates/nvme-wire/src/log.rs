//! Log pages: Error Information (0x01), SMART / Health (0x02), Changed Namespace
//! List (0x04) and the Discovery log (0x70), plus Get Log Page command fields.

use crate::le::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use crate::sqe::Sqe;
use crate::status::Status;
use crate::{read_str_field, write_str_field, NQN_FIELD_LEN};

/// Get Log Page command fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetLogPage {
    pub lid: u8,
    pub lsp: u8,
    /// Retain Asynchronous Event.
    pub rae: bool,
    /// Number of bytes requested.
    pub len: usize,
    /// Byte offset into the log.
    pub offset: u64,
}

impl GetLogPage {
    pub fn from_sqe(s: &Sqe) -> Self {
        let c10 = s.cdw(10);
        let numd = ((s.cdw(11) & 0xFFFF) << 16 | (c10 >> 16)) as usize + 1;
        GetLogPage {
            lid: c10 as u8,
            lsp: ((c10 >> 8) & 0xF) as u8,
            rae: c10 & (1 << 15) != 0,
            len: numd * 4,
            offset: s.cdw(12) as u64 | (s.cdw(13) as u64) << 32,
        }
    }
    /// Fills the command dwords of `s` (length must be a multiple of 4, ≥ 4).
    pub fn write_sqe(&self, s: &mut Sqe) {
        let numd = (self.len / 4).saturating_sub(1) as u32;
        s.set_cdw(
            10,
            self.lid as u32 | ((self.lsp as u32 & 0xF) << 8) | (self.rae as u32) << 15 | numd << 16,
        );
        s.set_cdw(11, numd >> 16);
        s.set_cdw(12, self.offset as u32);
        s.set_cdw(13, (self.offset >> 32) as u32);
    }
}

/// One Error Information log entry (64 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ErrorLogEntry {
    pub error_count: u64,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
    pub param_location: u16,
    pub lba: u64,
    pub nsid: u32,
    pub trtype: u8,
}

pub const ERROR_LOG_ENTRY_LEN: usize = 64;

impl ErrorLogEntry {
    pub fn write_to(&self, b: &mut [u8]) {
        put_u64(b, 0, self.error_count);
        put_u16(b, 8, self.sqid);
        put_u16(b, 10, self.cid);
        put_u16(b, 12, self.status.to_field(false));
        put_u16(b, 14, self.param_location);
        put_u64(b, 16, self.lba);
        put_u32(b, 24, self.nsid);
        b[29] = self.trtype;
    }
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < ERROR_LOG_ENTRY_LEN {
            return None;
        }
        Some(ErrorLogEntry {
            error_count: u64_at(b, 0),
            sqid: u16_at(b, 8),
            cid: u16_at(b, 10),
            status: Status::from_field(u16_at(b, 12)),
            param_location: u16_at(b, 14),
            lba: u64_at(b, 16),
            nsid: u32_at(b, 24),
            trtype: b[29],
        })
    }
}

/// SMART / Health Information log (512 bytes). Counters are 128-bit on the wire;
/// corral keeps the low 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmartLog {
    pub critical_warning: u8,
    /// Composite temperature in kelvin.
    pub temperature: u16,
    pub avail_spare: u8,
    pub spare_thresh: u8,
    pub percent_used: u8,
    /// In thousands of 512-byte units.
    pub data_units_read: u64,
    pub data_units_written: u64,
    pub host_reads: u64,
    pub host_writes: u64,
    pub power_cycles: u64,
    pub power_on_hours: u64,
    pub unsafe_shutdowns: u64,
    pub media_errors: u64,
    pub num_err_log_entries: u64,
}

pub const SMART_LOG_LEN: usize = 512;

impl SmartLog {
    pub fn to_bytes(&self) -> [u8; SMART_LOG_LEN] {
        let mut b = [0u8; SMART_LOG_LEN];
        b[0] = self.critical_warning;
        put_u16(&mut b, 1, self.temperature);
        b[3] = self.avail_spare;
        b[4] = self.spare_thresh;
        b[5] = self.percent_used;
        put_u64(&mut b, 32, self.data_units_read);
        put_u64(&mut b, 48, self.data_units_written);
        put_u64(&mut b, 64, self.host_reads);
        put_u64(&mut b, 80, self.host_writes);
        put_u64(&mut b, 112, self.power_cycles);
        put_u64(&mut b, 128, self.power_on_hours);
        put_u64(&mut b, 144, self.unsafe_shutdowns);
        put_u64(&mut b, 160, self.media_errors);
        put_u64(&mut b, 176, self.num_err_log_entries);
        b
    }
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < SMART_LOG_LEN {
            return None;
        }
        Some(SmartLog {
            critical_warning: b[0],
            temperature: u16_at(b, 1),
            avail_spare: b[3],
            spare_thresh: b[4],
            percent_used: b[5],
            data_units_read: u64_at(b, 32),
            data_units_written: u64_at(b, 48),
            host_reads: u64_at(b, 64),
            host_writes: u64_at(b, 80),
            power_cycles: u64_at(b, 112),
            power_on_hours: u64_at(b, 128),
            unsafe_shutdowns: u64_at(b, 144),
            media_errors: u64_at(b, 160),
            num_err_log_entries: u64_at(b, 176),
        })
    }
}

/// Changed Namespace List log (4096 bytes, up to 1024 NSIDs; 0xFFFFFFFF in the
/// first entry means "more than 1024 changed").
pub fn changed_ns_list(nsids: &[u32]) -> Box<[u8; 4096]> {
    let mut b = Box::new([0u8; 4096]);
    if nsids.len() > 1024 {
        put_u32(&mut b[..], 0, 0xFFFF_FFFF);
    } else {
        for (i, n) in nsids.iter().enumerate() {
            put_u32(&mut b[..], i * 4, *n);
        }
    }
    b
}

/// Discovery log page header length, and the length of each entry.
pub const DISC_HDR_LEN: usize = 1024;
pub const DISC_ENTRY_LEN: usize = 1024;

pub const TRTYPE_TCP: u8 = 3;
pub const ADRFAM_IPV4: u8 = 1;
pub const ADRFAM_IPV6: u8 = 2;
pub const SUBTYPE_DISCOVERY_REFERRAL: u8 = 1;
pub const SUBTYPE_NVME: u8 = 2;
pub const SUBTYPE_CURRENT_DISCOVERY: u8 = 3;
/// TREQ: secure channel not required.
pub const TREQ_NOT_REQUIRED: u8 = 2;
/// TCP TSAS security type: none.
pub const TSAS_SECTYPE_NONE: u8 = 0;

/// One Discovery log page entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiscoveryEntry {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub treq: u8,
    pub portid: u16,
    pub cntlid: u16,
    pub asqsz: u16,
    pub trsvcid: String,
    pub subnqn: String,
    pub traddr: String,
    /// TCP: security type (byte 0 of TSAS).
    pub sectype: u8,
}

impl DiscoveryEntry {
    pub fn write_to(&self, b: &mut [u8]) {
        b[0] = self.trtype;
        b[1] = self.adrfam;
        b[2] = self.subtype;
        b[3] = self.treq;
        put_u16(b, 4, self.portid);
        put_u16(b, 6, self.cntlid);
        put_u16(b, 8, self.asqsz);
        write_str_field(&mut b[32..64], &self.trsvcid, b' ');
        write_str_field(&mut b[256..256 + NQN_FIELD_LEN - 1], &self.subnqn, 0);
        write_str_field(&mut b[512..768], &self.traddr, b' ');
        b[768] = self.sectype;
    }
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < DISC_ENTRY_LEN {
            return None;
        }
        Some(DiscoveryEntry {
            trtype: b[0],
            adrfam: b[1],
            subtype: b[2],
            treq: b[3],
            portid: u16_at(b, 4),
            cntlid: u16_at(b, 6),
            asqsz: u16_at(b, 8),
            trsvcid: read_str_field(&b[32..64]),
            subnqn: read_str_field(&b[256..256 + NQN_FIELD_LEN]),
            traddr: read_str_field(&b[512..768]),
            sectype: b[768],
        })
    }
}

/// Encodes a whole Discovery log page: header and entries.
pub fn discovery_log(genctr: u64, entries: &[DiscoveryEntry]) -> Vec<u8> {
    let mut b = vec![0u8; DISC_HDR_LEN + entries.len() * DISC_ENTRY_LEN];
    put_u64(&mut b, 0, genctr);
    put_u64(&mut b, 8, entries.len() as u64);
    put_u16(&mut b, 16, 0);
    for (i, e) in entries.iter().enumerate() {
        let off = DISC_HDR_LEN + i * DISC_ENTRY_LEN;
        e.write_to(&mut b[off..off + DISC_ENTRY_LEN]);
    }
    b
}

/// Decodes a Discovery log page: (genctr, entries). Entries beyond the buffer are
/// not returned; `numrec` may therefore exceed the entries returned.
pub fn parse_discovery_log(b: &[u8]) -> Option<(u64, u64, Vec<DiscoveryEntry>)> {
    if b.len() < 16 {
        return None;
    }
    let genctr = u64_at(b, 0);
    let numrec = u64_at(b, 8);
    let mut v = Vec::new();
    let mut off = DISC_HDR_LEN;
    while (v.len() as u64) < numrec && off + DISC_ENTRY_LEN <= b.len() {
        v.extend(DiscoveryEntry::from_bytes(&b[off..off + DISC_ENTRY_LEN]));
        off += DISC_ENTRY_LEN;
    }
    Some((genctr, numrec, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::GenericStatus;

    #[test]
    fn get_log_page_fields() {
        let g = GetLogPage {
            lid: 0x70,
            lsp: 0,
            rae: true,
            len: 4096 * 1024,
            offset: 1024,
        };
        let mut s = Sqe::new(0x02, 1);
        g.write_sqe(&mut s);
        assert_eq!(GetLogPage::from_sqe(&s), g);
    }

    #[test]
    fn discovery_round_trip() {
        let e = DiscoveryEntry {
            trtype: TRTYPE_TCP,
            adrfam: ADRFAM_IPV4,
            subtype: SUBTYPE_NVME,
            treq: TREQ_NOT_REQUIRED,
            portid: 1,
            cntlid: 0xFFFF,
            asqsz: 128,
            trsvcid: "4420".into(),
            subnqn: "nqn.2024-01.io.corral:a".into(),
            traddr: "127.0.0.1".into(),
            sectype: 0,
        };
        let b = discovery_log(7, &[e.clone(), e.clone()]);
        assert_eq!(b.len(), 3 * 1024);
        let (g, n, v) = parse_discovery_log(&b).unwrap();
        assert_eq!((g, n), (7, 2));
        assert_eq!(v, vec![e.clone(), e]);
    }

    #[test]
    fn error_and_smart_round_trip() {
        let e = ErrorLogEntry {
            error_count: 3,
            sqid: 1,
            cid: 4,
            status: Status::generic(GenericStatus::LbaOutOfRange),
            lba: 99,
            nsid: 1,
            trtype: TRTYPE_TCP,
            ..Default::default()
        };
        let mut b = [0u8; 64];
        e.write_to(&mut b);
        assert_eq!(ErrorLogEntry::from_bytes(&b).unwrap(), e);
        let s = SmartLog {
            temperature: 300,
            host_reads: 10,
            host_writes: 20,
            ..Default::default()
        };
        assert_eq!(SmartLog::from_bytes(&s.to_bytes()).unwrap(), s);
    }
}
