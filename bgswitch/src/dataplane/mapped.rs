//! `BPF_F_MMAPABLE` arrays mapped into this process and used through
//! atomics: the `CONTROL` words (a flip is one aligned 32-bit store), the
//! `ADDR_FILTER` words and the `FLOW_GEN` counter.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    sync::atomic::{AtomicU32, Ordering},
};

/// A `BPF_F_MMAPABLE` array of 8-byte slots mapped into this process, read
/// and written through atomics: the `CONTROL` words (a flip is one aligned
/// 32-bit atomic store into the kernel's memory), the `ADDR_FILTER` bitmaps
/// and the `FLOW_GEN` counter.
pub(super) struct MappedArray {
    ptr: *mut u8,
    len: usize,
    entries: u32,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics.
unsafe impl Send for MappedArray {}

/// Array maps lay elements out at a stride of the value size rounded up to
/// 8; every mapped array here has values of at most 8 bytes.
const MAPPED_STRIDE: usize = 8;

impl MappedArray {
    pub(super) fn map(fd: BorrowedFd<'_>, entries: u32) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (entries as usize * MAPPED_STRIDE).div_ceil(page) * page;
        // SAFETY: mapping a BPF_F_MMAPABLE array map fd, shared, read-write.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            entries,
        })
    }

    pub(super) fn word(&self, id: u32) -> &AtomicU32 {
        assert!(id < self.entries, "service id {id} out of range");
        // SAFETY: in bounds (checked), 8-byte aligned (page-aligned base, stride 8),
        // and the mapping lives as long as self.
        unsafe { &*(self.ptr.add(id as usize * MAPPED_STRIDE) as *const AtomicU32) }
    }

    pub(super) fn load(&self, id: u32) -> u32 {
        self.word(id).load(Ordering::SeqCst)
    }

    /// Slot `id` of an array of u64 values.
    pub(super) fn word64(&self, id: u32) -> &std::sync::atomic::AtomicU64 {
        assert!(id < self.entries, "word {id} out of range");
        // SAFETY: in bounds (checked), 8-byte aligned (page-aligned base,
        // stride 8), and the mapping lives as long as self.
        unsafe {
            &*(self.ptr.add(id as usize * MAPPED_STRIDE) as *const std::sync::atomic::AtomicU64)
        }
    }

    pub(super) fn store(&self, id: u32, word: u32) {
        self.word(id).store(word, Ordering::SeqCst);
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
