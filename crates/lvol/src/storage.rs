//! The store's view of its directory: a handful of file and directory operations,
//! behind a trait so that tests can swap the real filesystem for
//! [`crate::fault::FaultStorage`], which loses unsynced writes on a simulated
//! power failure.
//!
//! Every method is synchronous. The data path of a real directory additionally
//! uses io_uring on the file descriptors that [`StoreFile::shared_fd`] exposes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::os::fd::AsRawFd;

/// How [`Storage::open`] treats a missing or existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// The file must exist.
    Existing,
    /// Create it if missing; keep its contents if present.
    Create,
    /// Create it if missing; cut it to length 0 if present.
    Truncate,
}

/// Total and free bytes of the filesystem holding the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub total: u64,
    pub free: u64,
}

/// A directory holding one lvstore. Names are plain file names (no '/').
pub trait Storage: Send + Sync + std::fmt::Debug + 'static {
    /// Where the directory is, for messages.
    fn root(&self) -> &Path;
    /// Opens a file; `direct` asks for O_DIRECT (data files), which needs
    /// block-aligned offsets, lengths and buffers.
    fn open(&self, name: &str, how: Open, direct: bool) -> io::Result<Arc<dyn StoreFile>>;
    /// Atomically replaces `to` with `from` (rename(2)); durable after [`Storage::sync_dir`].
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes a file; a missing file is not an error.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals so far durable (fsync of the directory).
    fn sync_dir(&self) -> io::Result<()>;
    /// The names of the files in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    fn exists(&self, name: &str) -> io::Result<bool>;
    fn space(&self) -> io::Result<Space>;
    /// Smallest block size for which data files can use O_DIRECT (the device's
    /// logical block size); `usize::MAX` when the filesystem refuses O_DIRECT.
    fn direct_min(&self) -> usize {
        512
    }
}

/// One open file of the store.
#[allow(clippy::len_without_is_empty)] // `len` is a file's size, not a collection's
pub trait StoreFile: Send + Sync + std::fmt::Debug + 'static {
    /// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as zero.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `off`, extending the file if needed.
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()>;
    /// Deallocates a range (it reads as zeroes and stops using space where the
    /// filesystem can punch holes). Does not change the length.
    fn punch(&self, off: u64, len: u64) -> io::Result<()>;
    /// Makes a range read as zeroes while keeping it allocated, so that a later
    /// write there cannot fail for lack of space. Does not change the length.
    fn zero(&self, off: u64, len: u64) -> io::Result<()>;
    /// Reserves space for a range without changing its contents or the length.
    fn allocate(&self, off: u64, len: u64) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Makes everything written so far durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Bytes the file occupies on disk (holes excluded).
    fn allocated_bytes(&self) -> io::Result<u64>;
    /// The descriptor, for io_uring; `None` for files that are not real files.
    fn shared_fd(&self) -> Option<Arc<File>> {
        None
    }
}

/// A real directory on a local filesystem.
#[derive(Debug, Clone)]
pub struct DirStorage {
    root: PathBuf,
    /// Smallest aligned O_DIRECT transfer the filesystem accepted (512 or
    /// 4096), `usize::MAX` if none (tmpfs): see [`DirStorage::new`].
    direct_min: usize,
}

impl DirStorage {
    /// A store directory at `root` (created if missing). Probes whether the
    /// filesystem accepts O_DIRECT; where it does not (tmpfs), data files are
    /// opened without it.
    pub fn new(root: &Path) -> io::Result<DirStorage> {
        std::fs::create_dir_all(root)?;
        let probe = root.join(".corral-odirect-probe");
        let direct_min = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
        {
            Err(_) => usize::MAX,
            Ok(f) => {
                let buf = bdev::IoBuf::zeroed(4096);
                if f.write_all_at(&buf[..512], 512).is_ok() {
                    512
                } else if f.write_all_at(&buf, 4096).is_ok() {
                    4096
                } else {
                    usize::MAX
                }
            }
        };
        let _ = std::fs::remove_file(&probe);
        Ok(DirStorage {
            root: root.to_path_buf(),
            direct_min,
        })
    }

    fn path(&self, name: &str) -> io::Result<PathBuf> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad file name"));
        }
        Ok(self.root.join(name))
    }
}

impl Storage for DirStorage {
    fn root(&self) -> &Path {
        &self.root
    }

    fn open(&self, name: &str, how: Open, direct: bool) -> io::Result<Arc<dyn StoreFile>> {
        let path = self.path(name)?;
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        match how {
            Open::Existing => {}
            Open::Create => {
                o.create(true);
            }
            Open::Truncate => {
                o.create(true).truncate(true);
            }
        }
        let flags = libc::O_CLOEXEC
            | if direct && self.direct_min != usize::MAX {
                libc::O_DIRECT
            } else {
                0
            };
        o.custom_flags(flags);
        let f = o.open(&path)?;
        Ok(Arc::new(RealFile { file: Arc::new(f) }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path(from)?, self.path(to)?)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path(name)?) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.root)?.sync_all()
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.root)? {
            let e = e?;
            if let Ok(s) = std::str::from_utf8(e.file_name().as_bytes()) {
                v.push(s.to_string());
            }
        }
        Ok(v)
    }

    fn exists(&self, name: &str) -> io::Result<bool> {
        self.path(name)?.try_exists()
    }

    fn direct_min(&self) -> usize {
        self.direct_min
    }

    fn space(&self) -> io::Result<Space> {
        let c = std::ffi::CString::new(self.root.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: statvfs is plain old data; zeroed is a valid initial value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: c is a valid NUL-terminated path and st a valid out pointer.
        let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let frsize = st.f_frsize as u64;
        Ok(Space {
            total: st.f_blocks as u64 * frsize,
            free: st.f_bavail as u64 * frsize,
        })
    }
}

/// A file of a [`DirStorage`].
#[derive(Debug)]
struct RealFile {
    file: Arc<File>,
}

impl RealFile {
    fn fallocate(&self, mode: i32, off: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: plain syscall on a descriptor we own; arguments are integers.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Writes zeroes through an aligned buffer: the fallback where fallocate modes
    /// are unsupported.
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zero = bdev::IoBuf::zeroed(CHUNK.min(len) as usize);
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            self.write_at(off + done, &zero[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

impl StoreFile for RealFile {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.write_zeroes(off, len),
            r => r,
        }
    }

    fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.write_zeroes(off, len),
            r => r,
        }
    }

    fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        match self.fallocate(libc::FALLOC_FL_KEEP_SIZE, off, len) {
            // Without preallocation a later write may hit ENOSPC; that is still correct.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn shared_fd(&self) -> Option<Arc<File>> {
        Some(self.file.clone())
    }
}
