//! Conversions between f32 and the stored float formats, written as plain integer code the
//! compiler vectorises. Bit-for-bit the same as the `half` crate (round to nearest even, NaN
//! kept quiet), which candle uses, so results do not depend on which path converted them.
//! [`with_encoded`] is the one f32 → storage conversion of every output: the checkpoint
//! writer's shards and the in-memory merge's tensors.

use std::cell::Cell;

use candle_core::{DType, Tensor};

#[cfg(not(target_endian = "little"))]
compile_error!("safetensors is little-endian; reading and writing assume a little-endian host");

/// Whether [`with_encoded`] converts f32 to `dtype` (the float dtypes).
pub fn encodable(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16 | DType::F32 | DType::F64)
}

/// `data` converted to `dtype` and handed to `f` as the little-endian bytes an output stores.
/// Panics unless [`encodable`]`(dtype)`.
pub fn with_encoded<R>(dtype: DType, data: &[f32], f: impl FnOnce(&[u8]) -> R) -> R {
    thread_local! {
        /// A reused buffer for the 16-bit conversions.
        static HALVES: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
    }
    match dtype {
        DType::F32 => f(bytemuck::cast_slice(data)),
        DType::BF16 | DType::F16 => {
            let mut halves = HALVES.with(|b| b.take());
            halves.clear();
            if dtype == DType::BF16 {
                halves.extend(data.iter().map(|v| f32_to_bf16(*v)));
            } else {
                halves.extend(data.iter().map(|v| half::f16::from_f32(*v).to_bits()));
            }
            let result = f(bytemuck::cast_slice(&halves));
            HALVES.with(|b| b.set(halves));
            result
        }
        DType::F64 => {
            let wide: Vec<f64> = data.iter().map(|v| f64::from(*v)).collect();
            f(bytemuck::cast_slice(&wide))
        }
        other => panic!("f32 cannot be encoded as {other:?}"),
    }
}

/// Little-endian bytes of `tensor` converted to `dtype` (any dtype a checkpoint stores), for
/// tensors that are not f32 going to a float dtype: copied tensors (integer buffers).
pub fn tensor_bytes(tensor: &Tensor, dtype: DType) -> candle_core::Result<Vec<u8>> {
    let t = tensor
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(dtype)?
        .flatten_all()?;
    Ok(match dtype {
        DType::F32 => bytemuck::cast_slice(&t.to_vec1::<f32>()?).to_vec(),
        DType::F16 => bytemuck::cast_slice(&t.to_vec1::<half::f16>()?).to_vec(),
        DType::BF16 => bytemuck::cast_slice(&t.to_vec1::<half::bf16>()?).to_vec(),
        DType::F64 => bytemuck::cast_slice(&t.to_vec1::<f64>()?).to_vec(),
        DType::I64 => bytemuck::cast_slice(&t.to_vec1::<i64>()?).to_vec(),
        DType::U32 => bytemuck::cast_slice(&t.to_vec1::<u32>()?).to_vec(),
        DType::U8 => t.to_vec1::<u8>()?,
        other => candle_core::bail!("cannot write dtype {other:?}"),
    })
}

/// bf16 bits to f32 (exact; a NaN gets its quiet bit set, as `half::bf16::to_f32` does).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    let x = u32::from(b) << 16;
    let nan = u32::from(b & 0x7fff > 0x7f80);
    f32::from_bits(x | (nan << 22))
}

/// Each of `values` rounded to bf16 ([`f32_to_bf16`]) and widened back, into `out` (equal
/// lengths): the values a bf16 checkpoint stores, as f32. Eight at a time with AVX2.
pub fn round_through_bf16(values: &[f32], out: &mut [f32]) {
    assert_eq!(values.len(), out.len());
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected just above; equal lengths (asserted).
        done = unsafe { round_through_bf16_avx2(values, out) };
    }
    for (o, &v) in out[done..].iter_mut().zip(&values[done..]) {
        *o = f32::from_bits(u32::from(f32_to_bf16(v)) << 16);
    }
}

/// [`round_through_bf16`] over the first multiple of eight values; returns how many it did.
/// The same arithmetic as [`f32_to_bf16`], lane by lane.
///
/// # Safety
/// The CPU must support AVX2; `values` and `out` have equal lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_through_bf16_avx2(values: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let whole = values.len() - values.len() % 8;
    let magnitude = _mm256_set1_epi32(0x7fff_ffff);
    let infinity = _mm256_set1_epi32(0x7f80_0000);
    let round_bit = _mm256_set1_epi32(0x8000);
    let sticky = _mm256_set1_epi32(3 * 0x8000 - 1);
    let zero = _mm256_setzero_si256();
    let low_half = _mm256_set1_epi32(0xffff);
    let quiet = _mm256_set1_epi32(0x40);
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= whole <= both lengths.
        let x = unsafe { _mm256_loadu_si256(values.as_ptr().add(i).cast()) };
        let nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, magnitude), infinity);
        // Round up where the round bit is set and anything else below or the lowest kept bit
        // is: adding the all-ones mask subtracts one, so subtract it instead.
        let has_round = _mm256_xor_si256(
            _mm256_cmpeq_epi32(_mm256_and_si256(x, round_bit), zero),
            _mm256_set1_epi32(-1),
        );
        let has_sticky = _mm256_xor_si256(
            _mm256_cmpeq_epi32(_mm256_and_si256(x, sticky), zero),
            _mm256_set1_epi32(-1),
        );
        let up = _mm256_and_si256(has_round, has_sticky);
        let high = _mm256_srli_epi32::<16>(x);
        let rounded = _mm256_and_si256(_mm256_sub_epi32(high, up), low_half);
        let quieted = _mm256_or_si256(high, quiet);
        let bits = _mm256_blendv_epi8(rounded, quieted, nan);
        // SAFETY: as above.
        unsafe {
            _mm256_storeu_si256(
                out.as_mut_ptr().add(i).cast(),
                _mm256_slli_epi32::<16>(bits),
            )
        };
    }
    whole
}

/// f32 to bf16 bits, rounding to nearest even (a NaN stays a quiet NaN), as
/// `half::bf16::from_f32` does.
#[inline]
pub fn f32_to_bf16(v: f32) -> u16 {
    let x = v.to_bits();
    let nan = x & 0x7fff_ffff > 0x7f80_0000;
    let round_bit = 0x0000_8000u32;
    let round_up = (x & round_bit) != 0 && (x & (3 * round_bit - 1)) != 0;
    let rounded = ((x >> 16) as u16).wrapping_add(u16::from(round_up));
    if nan {
        ((x >> 16) | 0x0040) as u16
    } else {
        rounded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_conversions_match_half() {
        // Every bf16 bit pattern round-trips like half's.
        for b in 0..=u16::MAX {
            let ours = bf16_to_f32(b).to_bits();
            let theirs = half::bf16::from_bits(b).to_f32().to_bits();
            assert_eq!(ours, theirs, "bf16 {b:#06x}");
        }
        // f32 → bf16 over patterns that hit every rounding case, NaNs and infinities.
        let mut x: u32 = 0x1234_5678;
        let specials = [
            0u32,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001,
            0xffff_ffff,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x7f7f_ffff,
            0x0000_8000,
            0x0001_8000,
        ];
        for i in 0..2_000_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let bits = if (i as usize) < specials.len() {
                specials[i as usize]
            } else {
                x
            };
            let v = f32::from_bits(bits);
            assert_eq!(
                f32_to_bf16(v),
                half::bf16::from_f32(v).to_bits(),
                "f32 {bits:#010x}"
            );
        }
    }

    /// Rounding through bf16 in registers gives the scalar conversion's bits: every upper
    /// half (signs, exponents, infinities, NaNs) with every lower half that decides the
    /// rounding (halfway, just above and below it, ties to even and odd, carries into the
    /// exponent).
    #[test]
    fn rounding_through_bf16_matches_the_scalar_conversion() {
        let lows = [
            0u32, 1, 0x3fff, 0x7fff, 0x8000, 0x8001, 0xbfff, 0xc000, 0xfffe, 0xffff,
        ];
        let values: Vec<f32> = (0..=0xffffu32)
            .flat_map(|h| lows.iter().map(move |&l| f32::from_bits(h << 16 | l)))
            .chain([1.0, -3.5, f32::MAX, f32::MIN_POSITIVE])
            .collect();
        let mut out = vec![0f32; values.len()];
        round_through_bf16(&values, &mut out);
        for (v, o) in values.iter().zip(&out) {
            let want = u32::from(f32_to_bf16(*v)) << 16;
            assert_eq!(o.to_bits(), want, "{:#010x}", v.to_bits());
        }
    }
}
