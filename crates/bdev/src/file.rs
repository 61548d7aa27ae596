//! File bdev: a bdev over a regular file or a block device, with O_DIRECT I/O
//! driven by the io_uring [`Reactor`] (SPDK's `bdev_aio_create` / `bdev_uring_create`).
//!
//! - Reads and writes go straight to the reactor; a FUA write is a write with
//!   `RWF_DSYNC`, flush is `fdatasync`.
//! - Write-zeroes is `fallocate(ZERO_RANGE | KEEP_SIZE)`; where the filesystem
//!   does not support that (tmpfs, ramfs, ...) it falls back, once and for good, to
//!   writing zeroes from a shared zero buffer.
//! - Unmap is `fallocate(PUNCH_HOLE | KEEP_SIZE)`: the range reads back as zeroes
//!   and its space is freed. It is offered only where a probe at open shows the
//!   filesystem (or device) supports it.
//! - When the filesystem refuses O_DIRECT, the file is opened buffered with a
//!   warning: it still works, flush makes it durable, but it is slower and
//!   double-caches.
//!
//! Only the write-zeroes fallback allocates per request; reads, writes, flushes,
//! unmaps and write-zeroes with `ZERO_RANGE` do not.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use crate::buf::IO_BUF_ALIGN;
use crate::uring::{OpKind, Reactor, SharedFd, UringSink};
use crate::{check_range, Bdev, BdevIo, Completion, IoBuf, IoError, IoKind};

/// `BLKGETSIZE64`, `_IOR(0x12, 114, u64)`: not exported by the libc crate.
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: u32 = 0x4008_1272;
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: u32 = 0x8008_1272;

/// Largest block size accepted (as for malloc bdevs).
const MAX_BLOCK_SIZE: u32 = 65536;
/// Size of the shared zero buffer, and of each write in the write-zeroes fallback.
const ZERO_CHUNK: u64 = 1 << 20;
/// Zero-fill writes in flight per write-zeroes request in the fallback.
const FILL_DEPTH: u32 = 4;

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// Why a file bdev could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum FileBdevError {
    #[error("file bdev {name}: cannot open {path}: {source}")]
    Open {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("file bdev {name}: {path} is neither a regular file nor a block device")]
    NotFileOrBlockDevice { name: String, path: PathBuf },
    #[error("file bdev {name}: cannot read the geometry of {path}: {source}")]
    Geometry {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "file bdev {name}: block size {block_size} must be a power of two from {min} \
         (the device's logical block size) to {MAX_BLOCK_SIZE}"
    )]
    BlockSize {
        name: String,
        block_size: u32,
        min: u32,
    },
    #[error("file bdev {name}: {path} ({size} bytes) holds no whole block of {block_size} bytes")]
    TooSmall {
        name: String,
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
}

/// A block device backed by a file or a block device.
pub struct FileBdev {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    path: PathBuf,
    uuid: uuid::Uuid,
    block_size: u32,
    num_blocks: u64,
    logical_block_size: u32,
    fd: SharedFd,
    reactor: Arc<Reactor>,
    direct: bool,
    block_device: bool,
    unmap: bool,
    write_cache: bool,
    /// False once `ZERO_RANGE` was refused: write-zeroes then writes zeroes.
    zero_range: AtomicBool,
    zero_jobs: Mutex<ZeroJobs>,
    zero_buf: OnceLock<IoBuf>,
    /// Handle to ourselves, to pass as the sink of write-zeroes ops.
    me: Weak<Inner>,
}

impl std::fmt::Debug for FileBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.inner;
        f.debug_struct("FileBdev")
            .field("name", &i.name)
            .field("path", &i.path)
            .field("block_size", &i.block_size)
            .field("num_blocks", &i.num_blocks)
            .field("direct", &i.direct)
            .field("block_device", &i.block_device)
            .field("unmap", &i.unmap)
            .finish()
    }
}

/// What open learnt about the backing store.
struct Geometry {
    size: u64,
    logical: u32,
    /// Memory alignment O_DIRECT needs, when the kernel reports it.
    mem_align: u32,
}

impl FileBdev {
    /// Opens `path` (an existing regular file or block device) as bdev `name`.
    ///
    /// `block_size` defaults to the device's logical block size (the O_DIRECT
    /// alignment the kernel reports, `BLKSSZGET` for block devices, else 512); a
    /// given one must be a power of two no smaller than that. The size is the
    /// file's size (or `BLKGETSIZE64`) rounded down to whole blocks.
    pub fn open(
        name: &str,
        path: impl AsRef<Path>,
        block_size: Option<u32>,
        uuid: Option<uuid::Uuid>,
        reactor: Arc<Reactor>,
    ) -> Result<FileBdev, FileBdevError> {
        let path = path.as_ref();
        let open_err = |source| FileBdevError::Open {
            name: name.into(),
            path: path.into(),
            source,
        };
        let geo_err = |source| FileBdevError::Geometry {
            name: name.into(),
            path: path.into(),
            source,
        };

        let meta = std::fs::metadata(path).map_err(open_err)?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.file_type().is_file() {
            return Err(FileBdevError::NotFileOrBlockDevice {
                name: name.into(),
                path: path.into(),
            });
        }

        let (mut file, mut direct) = match open_file(path, true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    bdev = name,
                    path = %path.display(),
                    "filesystem refuses O_DIRECT; using buffered I/O (slower, page-cached, \
                     durable only after flush)"
                );
                (open_file(path, false).map_err(open_err)?, false)
            }
            Err(e) => return Err(open_err(e)),
        };
        let mut geo = geometry(&file, block_device).map_err(geo_err)?;
        if direct && geo.mem_align as usize > IO_BUF_ALIGN {
            tracing::warn!(
                bdev = name,
                path = %path.display(),
                mem_align = geo.mem_align,
                "O_DIRECT needs more memory alignment than I/O buffers have; using buffered I/O"
            );
            file = open_file(path, false).map_err(open_err)?;
            direct = false;
            geo = geometry(&file, block_device).map_err(geo_err)?;
        }

        let min = geo.logical.max(512);
        let block_size = block_size.unwrap_or(min);
        if !block_size.is_power_of_two() || block_size < min || block_size > MAX_BLOCK_SIZE {
            return Err(FileBdevError::BlockSize {
                name: name.into(),
                block_size,
                min,
            });
        }
        let num_blocks = geo.size / block_size as u64;
        if num_blocks == 0 {
            return Err(FileBdevError::TooSmall {
                name: name.into(),
                path: path.into(),
                size: geo.size,
                block_size,
            });
        }

        let unmap = probe_punch_hole(&file, &meta, geo.size, block_device);
        let write_cache = !(block_device && direct) || device_write_cache(&meta);
        tracing::info!(
            bdev = name,
            path = %path.display(),
            block_size,
            num_blocks,
            direct,
            unmap,
            "file bdev opened"
        );
        let inner = Arc::new_cyclic(|me| Inner {
            name: name.into(),
            path: path.into(),
            uuid: uuid.unwrap_or_else(uuid::Uuid::new_v4),
            block_size,
            num_blocks,
            logical_block_size: min,
            fd: Arc::new(file),
            reactor,
            direct,
            block_device,
            unmap,
            write_cache,
            zero_range: AtomicBool::new(true),
            zero_jobs: Mutex::new(ZeroJobs::default()),
            zero_buf: OnceLock::new(),
            me: me.clone(),
        });
        Ok(FileBdev { inner })
    }

    /// Whether I/O bypasses the page cache (false after the buffered fallback).
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }
    /// Whether the backing store is a block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.inner.block_device
    }
    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
    /// Whether write-zeroes uses `fallocate(ZERO_RANGE)`; false once the
    /// filesystem refused it and zeroes are written instead.
    pub fn uses_zero_range(&self) -> bool {
        self.inner.zero_range.load(Ordering::Relaxed)
    }
    /// The smallest block size this backing store allows.
    pub fn logical_block_size(&self) -> u32 {
        self.inner.logical_block_size
    }
}

fn open_file(path: &Path, direct: bool) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

fn geometry(file: &std::fs::File, block_device: bool) -> std::io::Result<Geometry> {
    let fd = file.as_raw_fd();
    let (mut mem_align, mut logical) = (0u32, 0u32);
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open, the path is an empty C string used with AT_EMPTY_PATH,
    // and stx is a valid, writable statx.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        // Zero means the filesystem does not say; other sources decide then.
        mem_align = stx.stx_dio_mem_align;
        logical = stx.stx_dio_offset_align;
    }
    let size = if block_device {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        if unsafe { libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer.
        if unsafe { libc::ioctl(fd, libc::BLKSSZGET as _, &mut ssz as *mut libc::c_int) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        logical = logical.max(ssz.max(0) as u32);
        size
    } else {
        file.metadata()?.len()
    };
    Ok(Geometry {
        size,
        logical: if logical == 0 { 512 } else { logical },
        mem_align,
    })
}

/// Whether `fallocate(PUNCH_HOLE | KEEP_SIZE)` works here, tried where it can do
/// no harm: past the end of a file, where only the mode is checked.
fn probe_punch_hole(
    file: &std::fs::File,
    meta: &std::fs::Metadata,
    size: u64,
    block_device: bool,
) -> bool {
    let off = size.next_multiple_of(65536);
    // SAFETY: plain syscall on an open fd; KEEP_SIZE and the range past the end
    // leave data and size untouched.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), PUNCH, off as libc::off_t, 65536) };
    let err = std::io::Error::last_os_error().raw_os_error();
    if block_device {
        // A block device checks the mode first, then refuses the range (EINVAL);
        // whether the device can zero without writing is in sysfs.
        let mode_ok = rc == 0 || err == Some(libc::EINVAL);
        mode_ok && sysfs_queue(meta, "write_zeroes_max_bytes").is_none_or(|v| v.trim() != "0")
    } else {
        rc == 0
    }
}

/// Reads `queue/<attr>` of a block device (or of the disk of a partition).
fn sysfs_queue(meta: &std::fs::Metadata, attr: &str) -> Option<String> {
    let rdev = meta.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let base = format!("/sys/dev/block/{maj}:{min}");
    std::fs::read_to_string(format!("{base}/queue/{attr}"))
        .or_else(|_| std::fs::read_to_string(format!("{base}/../queue/{attr}")))
        .ok()
}

/// Whether a block device has a volatile write cache; assumed when unknown.
fn device_write_cache(meta: &std::fs::Metadata) -> bool {
    sysfs_queue(meta, "write_cache").is_none_or(|v| v.trim() != "write through")
}

impl Bdev for FileBdev {
    fn name(&self) -> &str {
        &self.inner.name
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks
    }
    fn uuid(&self) -> uuid::Uuid {
        self.inner.uuid
    }
    /// SPDK's name for its aio bdevs, which tools look for.
    fn product_name(&self) -> &'static str {
        "AIO disk"
    }
    fn supports(&self, kind: IoKind) -> bool {
        match kind {
            IoKind::Unmap => self.inner.unmap,
            IoKind::Read | IoKind::Write | IoKind::Flush | IoKind::WriteZeroes => true,
        }
    }
    fn write_cache(&self) -> bool {
        self.inner.write_cache
    }

    fn submit(&self, io: BdevIo, done: Completion) {
        let i = &self.inner;
        if let Err(e) = check_range(&io, i.block_size, i.num_blocks) {
            done.complete(io, Err(e));
            return;
        }
        if io.kind == IoKind::Flush {
            // Its range means nothing (and is not checked): the whole file is synced.
            i.reactor
                .submit_io(&i.fd, OpKind::Fsync { datasync: true }, io, done);
            return;
        }
        // In range, so these fit: the end is at most the backing store's size.
        let offset = io.offset_blocks * i.block_size as u64;
        let len = io.num_blocks * i.block_size as u64;
        match io.kind {
            IoKind::Read => i
                .reactor
                .submit_io(&i.fd, OpKind::Read { offset }, io, done),
            IoKind::Write => {
                let rw_flags = if io.fua { libc::RWF_DSYNC } else { 0 };
                i.reactor
                    .submit_io(&i.fd, OpKind::Write { offset, rw_flags }, io, done)
            }
            IoKind::Flush => i
                .reactor
                .submit_io(&i.fd, OpKind::Fsync { datasync: true }, io, done),
            IoKind::Unmap if !i.unmap => done.complete(io, Err(IoError::NotSupported)),
            // fallocate refuses an empty range; an empty request has nothing to do.
            IoKind::Unmap | IoKind::WriteZeroes if len == 0 => done.complete(io, Ok(())),
            IoKind::Unmap => i.reactor.submit_io(
                &i.fd,
                OpKind::Fallocate {
                    offset,
                    len,
                    mode: PUNCH,
                },
                io,
                done,
            ),
            IoKind::WriteZeroes => i.write_zeroes(offset, len, io, done),
        }
    }
}

/// A write-zeroes request in progress.
struct ZeroJob {
    io: BdevIo,
    done: Completion,
    /// Writing zeroes (fallback) rather than waiting for `ZERO_RANGE`.
    filling: bool,
    /// Next byte to zero, and the end of the range.
    next: u64,
    end: u64,
    /// Fallback writes in flight.
    pending: u32,
    error: Option<IoError>,
}

/// Write-zeroes requests in flight, by tag (slot index); slots are reused.
#[derive(Default)]
struct ZeroJobs {
    slots: Vec<Option<ZeroJob>>,
    free: Vec<usize>,
}

impl ZeroJobs {
    fn insert(&mut self, job: ZeroJob) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(job);
                i as u64
            }
            None => {
                self.slots.push(Some(job));
                (self.slots.len() - 1) as u64
            }
        }
    }
    fn get_mut(&mut self, tag: u64) -> Option<&mut ZeroJob> {
        self.slots.get_mut(tag as usize).and_then(|s| s.as_mut())
    }
    fn remove(&mut self, tag: u64) -> Option<ZeroJob> {
        let job = self.slots.get_mut(tag as usize)?.take()?;
        self.free.push(tag as usize);
        Some(job)
    }
}

impl Inner {
    fn sink(&self) -> Option<Arc<dyn UringSink>> {
        self.me.upgrade().map(|a| a as Arc<dyn UringSink>)
    }

    fn write_zeroes(&self, offset: u64, len: u64, io: BdevIo, done: Completion) {
        let Some(sink) = self.sink() else {
            done.complete(io, Err(IoError::Removed));
            return;
        };
        let filling = !self.zero_range.load(Ordering::Relaxed);
        let job = ZeroJob {
            io,
            done,
            filling,
            next: offset,
            end: offset + len,
            pending: 0,
            error: None,
        };
        let tag = self.zero_jobs.lock().insert(job);
        if filling {
            self.pump(tag);
        } else {
            self.reactor.submit(
                &self.fd,
                OpKind::Fallocate {
                    offset,
                    len,
                    mode: ZERO_RANGE,
                },
                IoBuf::empty(),
                sink,
                tag,
            );
        }
    }

    /// Starts more zero-fill writes for job `tag`, or finishes it when all are done.
    /// Never submits while holding the job lock: a submit may complete at once.
    fn pump(&self, tag: u64) {
        let mut todo = [(0u64, 0usize); FILL_DEPTH as usize];
        let mut n = 0;
        let finished = {
            let mut jobs = self.zero_jobs.lock();
            let Some(job) = jobs.get_mut(tag) else { return };
            while job.error.is_none() && job.pending < FILL_DEPTH && job.next < job.end {
                let chunk = (job.end - job.next).min(ZERO_CHUNK);
                todo[n] = (job.next, chunk as usize);
                n += 1;
                job.pending += 1;
                job.next += chunk;
            }
            if job.pending == 0 {
                jobs.remove(tag)
            } else {
                None
            }
        };
        if let Some(job) = finished {
            job.done.complete(job.io, job.error.map_or(Ok(()), Err));
            return;
        }
        let zero = self
            .zero_buf
            .get_or_init(|| IoBuf::zeroed(ZERO_CHUNK as usize));
        for &(offset, len) in &todo[..n] {
            let Some(sink) = self.sink() else { return };
            // SAFETY: the zero buffer lives in `self`, which the sink (an Arc of
            // `self`) keeps alive until the write completes; writes only read it
            // and nothing ever writes it. len <= ZERO_CHUNK, its length.
            unsafe {
                self.reactor.submit_raw(
                    &self.fd,
                    OpKind::Write {
                        offset,
                        rw_flags: 0,
                    },
                    zero.as_ptr().cast_mut(),
                    len,
                    sink,
                    tag,
                )
            };
        }
    }
}

impl UringSink for Inner {
    fn complete(&self, tag: u64, result: Result<usize, i32>, _buf: IoBuf) {
        let mut jobs = self.zero_jobs.lock();
        let Some(job) = jobs.get_mut(tag) else { return };
        if job.filling {
            job.pending = job.pending.saturating_sub(1);
            if let Err(e) = result {
                job.error.get_or_insert(IoError::from_errno(e));
            }
            drop(jobs);
            self.pump(tag);
            return;
        }
        match result {
            Err(libc::EOPNOTSUPP) => {
                if self.zero_range.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        bdev = %self.name,
                        "fallocate(ZERO_RANGE) not supported here; write-zeroes writes zeroes"
                    );
                }
                job.filling = true;
                drop(jobs);
                self.pump(tag);
            }
            r => {
                let job = jobs.remove(tag);
                drop(jobs);
                if let Some(job) = job {
                    job.done
                        .complete(job.io, r.map(|_| ()).map_err(IoError::from_errno));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BdevExt;

    fn temp_file(tag: &str, len: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("corral-file-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    #[tokio::test]
    async fn open_validates_geometry() {
        let r = Arc::new(Reactor::new("t-file-geo").unwrap());
        let p = temp_file("geo", 1 << 20);
        for bs in [0, 100, 256, 3000, 131072] {
            let e = FileBdev::open("g", &p, Some(bs), None, r.clone()).unwrap_err();
            assert!(matches!(e, FileBdevError::BlockSize { .. }), "{bs}: {e}");
        }
        let b = FileBdev::open("g", &p, Some(4096), None, r.clone()).unwrap();
        assert_eq!(b.num_blocks(), 256);
        assert!(b.write_cache());
        assert_eq!(b.product_name(), "AIO disk");
        // A tail shorter than a block is not part of the device.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len((1 << 20) + 1000)
            .unwrap();
        let b = FileBdev::open("g", &p, Some(4096), None, r.clone()).unwrap();
        assert_eq!(b.num_blocks(), 256);
        assert_eq!(
            b.read_blocks(256, 1).await.unwrap_err(),
            IoError::OutOfRange
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(100)
            .unwrap();
        assert!(matches!(
            FileBdev::open("g", &p, None, None, r.clone()),
            Err(FileBdevError::TooSmall { .. })
        ));
        let dir = p.parent().unwrap().to_path_buf();
        assert!(matches!(
            FileBdev::open("g", &dir, None, None, r.clone()),
            Err(FileBdevError::NotFileOrBlockDevice { .. })
        ));
        assert!(matches!(
            FileBdev::open("g", dir.join("missing"), None, None, r.clone()),
            Err(FileBdevError::Open { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn zero_length_requests_complete() {
        let r = Arc::new(Reactor::new("t-file-zero").unwrap());
        let p = temp_file("zerolen", 1 << 20);
        let b = FileBdev::open("z", &p, None, None, r).unwrap();
        assert_eq!(b.read_blocks(0, 0).await.unwrap().len(), 0);
        b.write_blocks(0, &[], false).await.unwrap();
        b.write_zeroes(5, 0).await.unwrap();
        if b.supports(IoKind::Unmap) {
            b.unmap(5, 0).await.unwrap();
        }
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
    }
}
