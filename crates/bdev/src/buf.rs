//! [`IoBuf`]: a heap buffer aligned to 4096 bytes, so that it can be handed to
//! O_DIRECT reads and writes, with a length that can change within its capacity.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of every [`IoBuf`]: enough for O_DIRECT on any sector size.
pub const IO_BUF_ALIGN: usize = 4096;

/// An owned, 4096-byte aligned, zero-initialised byte buffer.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reads of the owned bytes.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// An empty buffer that does not allocate.
    pub const fn empty() -> Self {
        IoBuf { ptr: NonNull::dangling(), len: 0, cap: 0 }
    }

    /// A zeroed buffer of `len` bytes with capacity rounded up to the alignment.
    pub fn zeroed(len: usize) -> Self {
        let mut b = Self::with_capacity(len);
        b.len = len;
        b
    }

    /// A buffer with at least `cap` bytes of zeroed capacity and length 0.
    pub fn with_capacity(cap: usize) -> Self {
        if cap == 0 {
            return Self::empty();
        }
        let cap = cap.div_ceil(IO_BUF_ALIGN) * IO_BUF_ALIGN;
        let layout = Self::layout(cap);
        // SAFETY: layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let ptr = match NonNull::new(p) {
            Some(p) => p,
            None => std::alloc::handle_alloc_error(layout),
        };
        IoBuf { ptr, len: 0, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    fn layout(cap: usize) -> Layout {
        match Layout::from_size_align(cap, IO_BUF_ALIGN) {
            Ok(l) => l,
            // cap is a multiple of the alignment and came from a usize: only absurd sizes fail.
            Err(_) => std::alloc::handle_alloc_error(Layout::new::<[u8; IO_BUF_ALIGN]>()),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length, growing the capacity if needed. Bytes beyond the previous
    /// length keep whatever the buffer last held (zero when fresh): callers fill them.
    pub fn resize(&mut self, len: usize) {
        if len > self.cap {
            let mut n = IoBuf::with_capacity(len);
            n.len = self.len;
            n.as_mut_slice().copy_from_slice(self.as_slice());
            *self = n;
        }
        self.len = len;
    }

    /// Sets the length and zeroes the whole buffer.
    pub fn resize_zeroed(&mut self, len: usize) {
        self.resize(len);
        self.as_mut_slice().fill(0);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.cap != 0 {
            // SAFETY: allocated in with_capacity with exactly this layout.
            unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
        }
    }
}

impl Default for IoBuf {
    fn default() -> Self {
        Self::empty()
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self.as_slice())
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf(len {}, cap {})", self.len, self.cap)
    }
}

/// A simple free list of buffers, for a consumer that owns it (no locking).
#[derive(Debug, Default)]
pub struct BufPool {
    free: Vec<IoBuf>,
    /// Buffers larger than this are not kept.
    max_keep: usize,
    max_count: usize,
}

impl BufPool {
    pub fn new(max_keep: usize, max_count: usize) -> Self {
        BufPool { free: Vec::new(), max_keep, max_count }
    }
    /// A buffer of exactly `len` bytes (contents unspecified).
    pub fn get(&mut self, len: usize) -> IoBuf {
        if let Some(pos) = self.free.iter().rposition(|b| b.capacity() >= len) {
            let mut b = self.free.swap_remove(pos);
            b.resize(len);
            return b;
        }
        IoBuf::zeroed(len)
    }
    pub fn put(&mut self, mut b: IoBuf) {
        if b.capacity() != 0 && b.capacity() <= self.max_keep && self.free.len() < self.max_count {
            b.clear();
            self.free.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_resizable() {
        let mut b = IoBuf::zeroed(100);
        assert_eq!(b.as_ptr() as usize % IO_BUF_ALIGN, 0);
        assert_eq!(b.capacity(), 4096);
        b[..3].copy_from_slice(b"abc");
        b.resize(10000);
        assert_eq!(&b[..3], b"abc");
        assert_eq!(b.len(), 10000);
        assert_eq!(b.as_ptr() as usize % IO_BUF_ALIGN, 0);
        let e = IoBuf::empty();
        assert!(e.is_empty());
        assert_eq!(e.as_slice(), &[] as &[u8]);
    }

    #[test]
    fn pool_reuses() {
        let mut p = BufPool::new(1 << 20, 4);
        let b = p.get(4096);
        let ptr = b.as_ptr();
        p.put(b);
        let b2 = p.get(512);
        assert_eq!(b2.as_ptr(), ptr);
        assert_eq!(b2.len(), 512);
    }
}
