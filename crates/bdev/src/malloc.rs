//! RAM-backed bdev (SPDK's `bdev_malloc`), for tests and benchmarks.
//!
//! Memory is held in 1 MiB chunks allocated on first write, so a large malloc
//! bdev costs nothing until used, and a chunk fully unmapped is freed. Each chunk
//! has its own lock: concurrent I/O to different chunks never contends, and
//! overlapping I/O is serialised per chunk instead of racing on the bytes.

use parking_lot::RwLock;

use crate::{check_range, Bdev, BdevIo, Completion, IoError, IoKind};

const CHUNK: usize = 1 << 20;

/// One chunk of memory, allocated on first write.
type Chunk = RwLock<Option<Box<[u8]>>>;

/// A RAM-backed block device.
pub struct MallocBdev {
    name: String,
    uuid: uuid::Uuid,
    block_size: u32,
    num_blocks: u64,
    chunks: Box<[Chunk]>,
}

impl std::fmt::Debug for MallocBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MallocBdev")
            .field("name", &self.name)
            .field("block_size", &self.block_size)
            .field("num_blocks", &self.num_blocks)
            .finish()
    }
}

/// Why a malloc bdev could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MallocError {
    #[error(
        "malloc bdev {name}: block size {block_size} must be a power of two from 512 to 65536"
    )]
    BlockSize { name: String, block_size: u32 },
    #[error("malloc bdev {name}: num_blocks must be > 0")]
    Empty { name: String },
}

impl MallocBdev {
    pub fn new(
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: Option<uuid::Uuid>,
    ) -> Result<Self, MallocError> {
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(MallocError::BlockSize {
                name: name.into(),
                block_size,
            });
        }
        if num_blocks == 0 {
            return Err(MallocError::Empty { name: name.into() });
        }
        let bytes = num_blocks * block_size as u64;
        let n = bytes.div_ceil(CHUNK as u64) as usize;
        Ok(MallocBdev {
            name: name.into(),
            uuid: uuid.unwrap_or_else(uuid::Uuid::new_v4),
            block_size,
            num_blocks,
            chunks: (0..n).map(|_| RwLock::new(None)).collect(),
        })
    }

    /// Bytes of RAM currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks.iter().filter(|c| c.read().is_some()).count() as u64 * CHUNK as u64
    }

    /// Calls `f(chunk index, offset in chunk, range in the request)` for each
    /// chunk the byte range touches.
    fn for_each_chunk(
        off: u64,
        len: usize,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>),
    ) {
        let mut done = 0usize;
        while done < len {
            let pos = off + done as u64;
            let ci = (pos / CHUNK as u64) as usize;
            let co = (pos % CHUNK as u64) as usize;
            let n = (CHUNK - co).min(len - done);
            f(ci, co, done..done + n);
            done += n;
        }
    }

    fn execute(&self, io: &mut BdevIo) -> Result<(), IoError> {
        check_range(io, self.block_size, self.num_blocks)?;
        let bs = self.block_size as u64;
        let off = io.offset_blocks * bs;
        let len = (io.num_blocks * bs) as usize;
        match io.kind {
            IoKind::Read => {
                let buf = io.buf.as_mut_slice();
                Self::for_each_chunk(off, len, |ci, co, r| {
                    let n = r.len();
                    match &*self.chunks[ci].read() {
                        Some(c) => buf[r].copy_from_slice(&c[co..co + n]),
                        None => buf[r].fill(0),
                    }
                });
            }
            IoKind::Write => {
                let buf = io.buf.as_slice();
                Self::for_each_chunk(off, len, |ci, co, r| {
                    let n = r.len();
                    let mut g = self.chunks[ci].write();
                    let c = g.get_or_insert_with(|| vec![0u8; CHUNK].into_boxed_slice());
                    c[co..co + n].copy_from_slice(&buf[r]);
                });
            }
            IoKind::WriteZeroes | IoKind::Unmap => {
                Self::for_each_chunk(off, len, |ci, co, r| {
                    let mut g = self.chunks[ci].write();
                    if r.len() == CHUNK {
                        *g = None;
                    } else if let Some(c) = g.as_mut() {
                        c[co..co + r.len()].fill(0);
                    }
                });
            }
            IoKind::Flush => {}
        }
        Ok(())
    }
}

impl Bdev for MallocBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    fn uuid(&self) -> uuid::Uuid {
        self.uuid
    }
    fn product_name(&self) -> &'static str {
        "Malloc disk"
    }
    fn supports(&self, _kind: IoKind) -> bool {
        true
    }
    fn submit(&self, mut io: BdevIo, done: Completion) {
        let r = self.execute(&mut io);
        done.complete(io, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BdevExt;

    #[tokio::test]
    async fn read_write_across_chunks() {
        let b = MallocBdev::new("m0", 8192, 512, None).unwrap(); // 4 MiB
        assert_eq!(b.allocated_bytes(), 0);
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        // 16 blocks straddling the first chunk boundary (block 2048 = 1 MiB)
        b.write_blocks(2040, &data, false).await.unwrap();
        assert_eq!(b.allocated_bytes(), 2 * CHUNK as u64);
        let r = b.read_blocks(2040, 16).await.unwrap();
        assert_eq!(&r[..], &data[..]);
        let z = b.read_blocks(0, 8).await.unwrap();
        assert!(z.iter().all(|&x| x == 0));
        b.write_zeroes(2044, 2).await.unwrap();
        let r = b.read_blocks(2044, 2).await.unwrap();
        assert!(r.iter().all(|&x| x == 0));
        b.unmap(2048, 2048).await.unwrap();
        assert_eq!(b.allocated_bytes(), CHUNK as u64);
        assert_eq!(
            b.read_blocks(8192, 1).await.unwrap_err(),
            IoError::OutOfRange
        );
        assert_eq!(
            b.read_blocks(u64::MAX, 2).await.unwrap_err(),
            IoError::OutOfRange
        );
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(MallocBdev::new("x", 10, 1000, None).is_err());
        assert!(MallocBdev::new("x", 0, 512, None).is_err());
    }
}
