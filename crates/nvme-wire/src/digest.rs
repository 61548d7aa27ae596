//! Header and data digests: CRC32C (Castagnoli), stored little-endian.
//!
//! The data digest covers the data zero-padded to a multiple of four bytes.

/// Length of a digest on the wire.
pub const DIGEST_LEN: usize = 4;

/// CRC32C of `buf` (init 0xFFFFFFFF, final xor 0xFFFFFFFF, as the spec requires).
#[inline]
pub fn crc32c(buf: &[u8]) -> u32 {
    crc32c::crc32c(buf)
}

/// Incremental data digest over several slices, with the zero-padding rule.
#[derive(Debug, Clone, Copy, Default)]
pub struct DataDigest {
    crc: u32,
    len: usize,
}

impl DataDigest {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, buf: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, buf);
        self.len += buf.len();
    }
    /// Finishes the digest, appending the zero padding to a multiple of four.
    pub fn finish(mut self) -> u32 {
        let pad = (4 - self.len % 4) % 4;
        if pad != 0 {
            self.crc = crc32c::crc32c_append(self.crc, &[0u8; 3][..pad]);
        }
        self.crc
    }
}

/// Data digest of one contiguous buffer.
pub fn data_digest(buf: &[u8]) -> u32 {
    let mut d = DataDigest::new();
    d.update(buf);
    d.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The CRC-32C check value from the catalogue of parametrised CRCs.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn padding_rule() {
        assert_eq!(data_digest(b"abc"), crc32c(b"abc\0"));
        assert_eq!(data_digest(b"abcd"), crc32c(b"abcd"));
        let mut d = DataDigest::new();
        d.update(b"ab");
        d.update(b"cde");
        assert_eq!(d.finish(), crc32c(b"abcde\0\0\0"));
    }
}
