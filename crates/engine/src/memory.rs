//! Large buffers kept out of forked children.
//!
//! The sandbox forks for every Python run (limits, namespaces, Landlock and seccomp are applied
//! between fork and exec, and its supervisor processes never exec), and each fork copies the
//! page tables of everything the parent has touched. With the KV cache, the weights and the
//! embedding table that is hundreds of MB, and in the pipeline bench page-table copying took
//! about a tenth of all CPU time. The children never read these buffers, so they are marked
//! `MADV_DONTFORK` (absent from the child), and offered transparent huge pages (fewer TLB
//! misses in the kernels). The mark is removed when the guard drops, which must be before the
//! buffer returns to the allocator: a guard is declared before the buffer it covers.

use candle_core::{CpuStorage, Storage, Tensor};

/// Keeps the whole pages of one buffer out of forked children until dropped.
pub(crate) struct ForkExcluded {
    start: usize,
    len: usize,
}

impl ForkExcluded {
    /// Covers `len` bytes at `ptr` (the whole pages inside them).
    fn covering(ptr: *const u8, len: usize) -> Self {
        let page = page_size();
        let start = (ptr as usize).next_multiple_of(page);
        let end = (ptr as usize + len) / page * page;
        let guard = Self {
            start,
            len: end.saturating_sub(start),
        };
        #[cfg(target_os = "linux")]
        if guard.len > 0 {
            // SAFETY: the range lies inside a live allocation; advice does not change its
            // contents. Failure only loses the optimisation.
            unsafe {
                libc::madvise(start as *mut _, guard.len, libc::MADV_DONTFORK);
                libc::madvise(start as *mut _, guard.len, libc::MADV_HUGEPAGE);
            }
        }
        guard
    }

    pub(crate) fn slice<T>(buf: &[T]) -> Self {
        Self::covering(buf.as_ptr() as *const u8, std::mem::size_of_val(buf))
    }

    /// A tensor's buffer when it lives in CPU memory (other devices have nothing to exclude).
    pub(crate) fn tensor(t: &Tensor) -> Self {
        let (storage, _) = t.storage_and_layout();
        match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => Self::slice(v),
            Storage::Cpu(CpuStorage::F16(v)) => Self::slice(v),
            Storage::Cpu(CpuStorage::BF16(v)) => Self::slice(v),
            _ => Self { start: 0, len: 0 },
        }
    }
}

impl Drop for ForkExcluded {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if self.len > 0 {
            // SAFETY: as in `covering`; the buffer is still allocated (see the module docs).
            unsafe { libc::madvise(self.start as *mut _, self.len, libc::MADV_DOFORK) };
        }
    }
}

fn page_size() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 {
            return n as usize;
        }
    }
    4096
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// `VmFlags` of the mapping holding `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = (a..b).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_string();
                }
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    #[test]
    fn a_buffer_is_kept_out_of_forks_until_its_guard_drops() {
        let buf = vec![1u8; 8 << 20];
        let guard = ForkExcluded::slice(&buf);
        assert!(guard.len >= (8 << 20) - 2 * page_size());
        let inside = guard.start + page_size();
        assert!(
            vm_flags(inside).split(' ').any(|f| f == "dc"),
            "{}",
            vm_flags(inside)
        );
        drop(guard);
        assert!(!vm_flags(inside).split(' ').any(|f| f == "dc"));
    }
}
