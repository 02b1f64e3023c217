//! A stored tensor read straight from its file, a range of elements at a time.

use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use candle_core::DType;
use memmap2::{Mmap, UncheckedAdvice};

use super::convert;

/// A floating-point tensor's bytes in a safetensors file. Reading converts a range of
/// elements to f32 into a caller's buffer: `pread` into a reused per-thread byte buffer (from
/// the page cache: no page mapped into the process, no page fault, no tensor-sized copy), then
/// a vectorised conversion.
#[derive(Clone, Copy)]
pub struct MappedTensor<'a> {
    pub(super) file: &'a File,
    pub(super) path: &'a Path,
    /// Byte range in the file.
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) dtype: DType,
}

impl std::fmt::Debug for MappedTensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedTensor({:?}, {} elements)", self.dtype, self.len())
    }
}

impl MappedTensor<'_> {
    /// Whether tensors of `dtype` can be read this way (the floating dtypes).
    pub fn readable(dtype: DType) -> bool {
        matches!(dtype, DType::BF16 | DType::F16 | DType::F32 | DType::F64)
    }

    /// Storage dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        (self.end - self.start) / self.dtype.size_in_bytes()
    }

    /// Whether the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Ask the kernel to start reading the whole tensor into the page cache now, in the
    /// background, so chunk reads overlap with disk reads instead of waiting for them. A
    /// hint: nothing happens on error, and nothing when the pages are cached already.
    pub fn prefetch(&self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on an open descriptor; it only schedules readahead.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    self.start as libc::off_t,
                    (self.end - self.start) as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
    }

    /// Elements `first .. first + out.len()` as f32, into `out`.
    ///
    /// Panics if the range is out of bounds.
    pub fn read_f32(&self, first: usize, out: &mut [f32]) -> std::io::Result<()> {
        let size = self.dtype.size_in_bytes();
        let a = self.start + first * size;
        let b = a + out.len() * size;
        assert!(b <= self.end, "read past the end of a mapped tensor");
        let read = |buf: &mut [u8]| {
            self.file
                .read_exact_at(buf, a as u64)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
        };
        if self.dtype == DType::F32 {
            return read(bytemuck::cast_slice_mut(out));
        }
        if size == 2 {
            // Read as u16 words (aligned, so the conversion loop vectorises).
            thread_local! {
                static HALVES: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
            }
            let mut halves = HALVES.with(|b| b.take());
            halves.resize(out.len(), 0);
            let result = read(bytemuck::cast_slice_mut(&mut halves));
            if result.is_ok() {
                if self.dtype == DType::BF16 {
                    for (o, h) in out.iter_mut().zip(&halves) {
                        *o = convert::bf16_to_f32(*h);
                    }
                } else {
                    for (o, h) in out.iter_mut().zip(&halves) {
                        *o = half::f16::from_bits(*h).to_f32();
                    }
                }
            }
            HALVES.with(|b| b.set(halves));
            return result;
        }
        // f64 (rare): through a byte buffer.
        let mut bytes = vec![0u8; b - a];
        read(&mut bytes)?;
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut v = [0u8; 8];
            v.copy_from_slice(c);
            *o = f64::from_le_bytes(v) as f32;
        }
        Ok(())
    }
}

/// Release the mapped pages that overlap bytes `a..b` (page-aligned outwards: a neighbouring
/// reader that still needs a page faults it back in from the page cache).
pub(super) fn drop_pages(mmap: &Mmap, a: usize, b: usize) {
    const PAGE: usize = 4096;
    let start = a / PAGE * PAGE;
    let end = b.div_ceil(PAGE).saturating_mul(PAGE).min(mmap.len());
    if end > start {
        // SAFETY: the mapping is read-only and file-backed; after MADV_DONTNEED its pages are
        // read back from the file on the next access, so no data visible to Rust changes
        // (other threads reading the same pages meanwhile see the same bytes).
        let _ =
            unsafe { mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
    }
}
