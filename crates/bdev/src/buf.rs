//! [`IoBuf`]: a heap buffer aligned to 4096 bytes, so that it can be handed to
//! O_DIRECT reads and writes, with a length that can change within its capacity.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every [`IoBuf`]: enough for O_DIRECT on any sector size.
pub const IO_BUF_ALIGN: usize = 4096;

/// One aligned heap allocation.
struct Alloc {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: Alloc is a plain owned allocation; IoBuf controls all access to it.
unsafe impl Send for Alloc {}
// SAFETY: shared access is read-only (IoBuf copies before writing to a shared Alloc).
unsafe impl Sync for Alloc {}

impl Alloc {
    fn new(cap: usize) -> Self {
        let layout = layout(cap);
        // SAFETY: layout has a non-zero size (callers never ask for 0).
        let p = unsafe { alloc_zeroed(layout) };
        match NonNull::new(p) {
            Some(ptr) => Alloc { ptr, cap },
            None => std::alloc::handle_alloc_error(layout),
        }
    }
}

impl Drop for Alloc {
    fn drop(&mut self) {
        // SAFETY: allocated in Alloc::new with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout(self.cap)) }
    }
}

fn layout(cap: usize) -> Layout {
    match Layout::from_size_align(cap, IO_BUF_ALIGN) {
        Ok(l) => l,
        // cap is a multiple of the alignment and came from a usize: only absurd sizes fail.
        Err(_) => std::alloc::handle_alloc_error(Layout::new::<[u8; IO_BUF_ALIGN]>()),
    }
}

/// A 4096-byte aligned, zero-initialised byte buffer.
///
/// Usually owned by one request. [`IoBuf::share`] hands out more handles to the
/// same bytes (a mirror writing one buffer to several members without copying);
/// writing through a handle while others exist copies first, so shared bytes
/// never change under a reader.
pub struct IoBuf {
    alloc: Option<Arc<Alloc>>,
    len: usize,
}

impl IoBuf {
    /// An empty buffer that does not allocate.
    pub const fn empty() -> Self {
        IoBuf {
            alloc: None,
            len: 0,
        }
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
        IoBuf {
            alloc: Some(Arc::new(Alloc::new(cap))),
            len: 0,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.alloc.as_ref().map_or(0, |a| a.cap)
    }

    /// Another handle to the same bytes (no copy).
    pub fn share(&self) -> IoBuf {
        IoBuf {
            alloc: self.alloc.clone(),
            len: self.len,
        }
    }

    /// Whether other handles to these bytes exist.
    pub fn is_shared(&self) -> bool {
        self.alloc
            .as_ref()
            .is_some_and(|a| Arc::strong_count(a) > 1)
    }

    /// Makes this handle the only owner of its bytes, copying if shared.
    fn make_unique(&mut self) {
        if let Some(a) = self.alloc.as_mut() {
            if Arc::get_mut(a).is_none() {
                let mut n = IoBuf::with_capacity(a.cap);
                n.len = self.len;
                // SAFETY: both allocations hold at least len bytes; they are distinct.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        a.ptr.as_ptr(),
                        n.as_mut_ptr_unchecked(),
                        self.len,
                    )
                };
                *self = n;
            }
        }
    }

    /// Sets the length, growing the capacity if needed. Bytes beyond the previous
    /// length keep whatever the buffer last held (zero when fresh): callers fill them.
    pub fn resize(&mut self, len: usize) {
        if len > self.capacity() {
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
        match &self.alloc {
            // SAFETY: the allocation holds cap >= len initialised bytes; nobody
            // writes to it while shared (make_unique copies first).
            Some(a) => unsafe { std::slice::from_raw_parts(a.ptr.as_ptr(), self.len) },
            None => &[],
        }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.make_unique();
        match &self.alloc {
            // SAFETY: after make_unique this handle is the only owner, and &mut self
            // gives exclusive access.
            Some(a) => unsafe { std::slice::from_raw_parts_mut(a.ptr.as_ptr(), self.len) },
            None => &mut [],
        }
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.alloc
            .as_ref()
            .map_or(NonNull::dangling().as_ptr(), |a| a.ptr.as_ptr())
    }
    /// Pointer for writing (copies first if shared).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.make_unique();
        self.as_mut_ptr_unchecked()
    }
    fn as_mut_ptr_unchecked(&mut self) -> *mut u8 {
        self.alloc
            .as_ref()
            .map_or(NonNull::dangling().as_ptr(), |a| a.ptr.as_ptr())
    }
}

impl Default for IoBuf {
    fn default() -> Self {
        Self::empty()
    }
}

impl Clone for IoBuf {
    /// A deep copy (use [`IoBuf::share`] for another handle to the same bytes).
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
        write!(
            f,
            "IoBuf(len {}, cap {}{})",
            self.len,
            self.capacity(),
            if self.is_shared() { ", shared" } else { "" }
        )
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
        BufPool {
            free: Vec::new(),
            max_keep,
            max_count,
        }
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
        if !b.is_shared()
            && b.capacity() != 0
            && b.capacity() <= self.max_keep
            && self.free.len() < self.max_count
        {
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
    fn shared_handles_copy_on_write() {
        let mut a = IoBuf::from_slice(&[1u8; 512]);
        let b = a.share();
        assert!(a.is_shared());
        assert_eq!(a.as_ptr(), b.as_ptr());
        a.as_mut_slice()[0] = 9;
        assert_ne!(a.as_ptr(), b.as_ptr(), "writing a shared buffer copies");
        assert_eq!(b[0], 1);
        assert_eq!(a[0], 9);
        assert!(!a.is_shared() && !b.is_shared());
        assert_eq!(a.as_ptr() as usize % IO_BUF_ALIGN, 0);
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
