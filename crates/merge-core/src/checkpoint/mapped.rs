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
            // SAFETY: any bytes are a valid f32; the slice covers exactly `out`'s memory.
            #[cfg(target_endian = "little")]
            return read(unsafe {
                std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, out.len() * 4)
            });
        }
        thread_local! {
            static BYTES: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
        }
        let mut bytes = BYTES.with(|b| b.take());
        bytes.resize(b - a, 0);
        let result = read(&mut bytes);
        if result.is_ok() {
            match self.dtype {
                DType::BF16 => convert::half_bytes_to_f32(&bytes, out, true),
                DType::F16 => convert::half_bytes_to_f32(&bytes, out, false),
                DType::F32 => {
                    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
                DType::F64 => {
                    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                        let mut v = [0u8; 8];
                        v.copy_from_slice(c);
                        *o = f64::from_le_bytes(v) as f32;
                    }
                }
                other => unreachable!("MappedTensor of non-float dtype {other:?}"),
            }
        }
        BYTES.with(|b| b.set(bytes));
        result
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
