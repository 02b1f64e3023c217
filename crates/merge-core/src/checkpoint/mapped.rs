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
    /// The whole file, mapped.
    pub(super) map: &'a [u8],
    /// Read from `map` instead of with `pread` ([`super::Checkpoint::read_mapped`]).
    pub(super) from_map: bool,
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
        if self.from_map {
            convert_bytes(&self.map[a..b], self.dtype, out);
            return Ok(());
        }
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
                widen_halves(&halves, self.dtype, out);
            }
            HALVES.with(|b| b.set(halves));
            return result;
        }
        // f64 (rare): through a byte buffer.
        let mut bytes = vec![0u8; b - a];
        read(&mut bytes)?;
        widen_f64(&bytes, out);
        Ok(())
    }
}

/// `bytes` (little-endian elements of `dtype`: bf16, f16, f32 or f64) as f32 into `out`.
fn convert_bytes(bytes: &[u8], dtype: DType, out: &mut [f32]) {
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(v) => out.copy_from_slice(v),
            Err(_) => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        },
        // Aligned (safetensors data is) the halves are read in place.
        DType::BF16 | DType::F16 => match bytemuck::try_cast_slice::<u8, u16>(bytes) {
            Ok(halves) => widen_halves(halves, dtype, out),
            Err(_) => {
                let halves: Vec<u16> = bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                widen_halves(&halves, dtype, out)
            }
        },
        _ => widen_f64(bytes, out),
    }
}

/// bf16 or f16 (`dtype`) bit patterns as f32 into `out`. A merge reads every input through
/// here: with AVX2 (bf16) or F16C (f16) sixteen or eight at a time, else a loop that
/// vectorises for the baseline CPU. Every path gives the same bits.
fn widen_halves(halves: &[u16], dtype: DType, out: &mut [f32]) {
    let n = halves.len().min(out.len());
    let (halves, out) = (&halves[..n], &mut out[..n]);
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if dtype == DType::BF16 && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected just above.
            done = unsafe { widen_bf16_avx2(halves, out) };
        } else if dtype == DType::F16
            && std::arch::is_x86_feature_detected!("avx")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: AVX and F16C were detected just above.
            done = unsafe { widen_f16_f16c(halves, out) };
        }
    }
    let (halves, out) = (&halves[done..], &mut out[done..]);
    if dtype == DType::BF16 {
        for (o, &h) in out.iter_mut().zip(halves) {
            *o = convert::bf16_to_f32(h);
        }
    } else {
        for (o, &h) in out.iter_mut().zip(halves) {
            *o = half::f16::from_bits(h).to_f32();
        }
    }
}

/// [`widen_halves`] for bf16 over the first multiple of sixteen elements (equal lengths);
/// returns how many it covered. A block holding a NaN goes through the scalar conversion,
/// which sets the NaN's quiet bit.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_bf16_avx2(halves: &[u16], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    debug_assert_eq!(halves.len(), out.len());
    let whole = halves.len() - halves.len() % 16;
    let magnitude = _mm256_set1_epi16(0x7fff);
    let infinity = _mm256_set1_epi16(0x7f80);
    for i in (0..whole).step_by(16) {
        // SAFETY: i + 16 <= whole <= the length of both slices.
        unsafe {
            let v = _mm256_loadu_si256(halves.as_ptr().add(i).cast());
            let nan = _mm256_cmpgt_epi16(_mm256_and_si256(v, magnitude), infinity);
            if _mm256_testz_si256(nan, nan) == 0 {
                for j in i..i + 16 {
                    out[j] = convert::bf16_to_f32(halves[j]);
                }
                continue;
            }
            let low = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(v));
            let high = _mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(v));
            let o = out.as_mut_ptr().add(i);
            _mm256_storeu_si256(o.cast(), _mm256_slli_epi32::<16>(low));
            _mm256_storeu_si256(o.add(8).cast(), _mm256_slli_epi32::<16>(high));
        }
    }
    whole
}

/// [`widen_halves`] for f16 over the first multiple of eight elements (equal lengths), by the
/// instruction `half` itself converts with where the CPU has it; returns how many it covered.
///
/// # Safety
/// The CPU must support AVX and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16_f16c(halves: &[u16], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    debug_assert_eq!(halves.len(), out.len());
    let whole = halves.len() - halves.len() % 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= whole <= the length of both slices.
        unsafe {
            let v = _mm_loadu_si128(halves.as_ptr().add(i).cast());
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(v));
        }
    }
    whole
}

/// Little-endian f64 `bytes` as f32 into `out`.
fn widen_f64(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut v = [0u8; 8];
        v.copy_from_slice(c);
        *o = f64::from_le_bytes(v) as f32;
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, Tensor};

    use super::super::safetensors_file::SafetensorsFile;
    use super::super::Shard;
    use super::*;

    /// Reading from the mapped pages gives every element bit for bit as `pread` does, for each
    /// float dtype and ranges starting and ending anywhere.
    #[test]
    fn mapped_reads_equal_pread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let values: Vec<f32> = (0..1037).map(|i| (i as f32 * 0.731).sin() * 7.3).collect();
        let base = Tensor::from_vec(values, 1037, &Device::Cpu).unwrap();
        let dtypes = [DType::BF16, DType::F16, DType::F32, DType::F64];
        let tensors: HashMap<String, Tensor> = dtypes
            .iter()
            .map(|&d| (format!("{d:?}"), base.to_dtype(d).unwrap()))
            .collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        for d in dtypes {
            let plain = file.mapped(&format!("{d:?}")).unwrap();
            let mapped = MappedTensor {
                from_map: true,
                ..plain
            };
            for (first, len) in [(0, 1037), (1, 5), (3, 1000), (1030, 7), (512, 0)] {
                let (mut a, mut b) = (vec![0f32; len], vec![1f32; len]);
                plain.read_f32(first, &mut a).unwrap();
                mapped.read_f32(first, &mut b).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "{d:?} {first}+{len}");
            }
        }
    }

    /// Every bf16 and f16 bit pattern (NaNs and infinities included, a ragged tail after the
    /// vector blocks) widens to the bits the scalar conversions give.
    #[test]
    fn widening_every_half_matches_the_scalar_conversion() {
        let all: Vec<u16> = (0..=u16::MAX)
            .chain([0x7fc1, 0xffff, 0x3f80, 0x8001, 0x7f81])
            .collect();
        for dtype in [DType::BF16, DType::F16] {
            let mut out = vec![f32::NAN; all.len()];
            widen_halves(&all, dtype, &mut out);
            for (&h, o) in all.iter().zip(&out) {
                let want = match dtype {
                    DType::BF16 => half::bf16::from_bits(h).to_f32(),
                    _ => half::f16::from_bits(h).to_f32(),
                };
                assert_eq!(o.to_bits(), want.to_bits(), "{dtype:?} {h:#06x}");
            }
        }
    }
}
