//! Conversions between f32 and the 16-bit float formats, written as plain integer code the
//! compiler vectorises. Bit-for-bit the same as the `half` crate (round to nearest even, NaN
//! kept quiet), which candle uses, so results do not depend on which path converted them.

/// bf16 bits to f32 (exact; a NaN gets its quiet bit set, as `half::bf16::to_f32` does).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    let x = u32::from(b) << 16;
    let nan = u32::from(b & 0x7fff > 0x7f80);
    f32::from_bits(x | (nan << 22))
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
}
