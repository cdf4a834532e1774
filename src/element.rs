//! Element types the ops accept: logits and activations in f32, bf16 or f16
//! (always accumulated in f32), token ids as u32, i32 or i64.

use half::{bf16, f16};

/// The floating-point storage types of logits, hidden states and weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// bfloat16: f32's exponent, 8 bits of mantissa.
    BF16,
    /// IEEE binary16.
    F16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Suffix of the CUDA kernel instantiated for this dtype.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
    impl Sealed for u32 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
}

/// A storage float: converts to and from f32, in bulk where that is faster.
pub trait Float:
    sealed::Sealed + Copy + Default + PartialEq + Send + Sync + std::fmt::Debug + 'static
{
    /// This type's [`DType`].
    const DTYPE: DType;
    /// The largest finite value, as f32: a gradient stored in this type must
    /// not exceed it in magnitude.
    const MAX: f32;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even narrowing from f32.
    fn from_f32(v: f32) -> Self;

    /// `dst[i] = src[i] as f32 * scale`; `dst.len() == src.len()`.
    #[inline]
    fn load_scaled(src: &[Self], scale: f32, dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32() * scale;
        }
    }

    /// `dst[i] = round(src[i])`; `dst.len() == src.len()`.
    #[inline]
    fn store(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(*s);
        }
    }
}

impl Float for f32 {
    const DTYPE: DType = DType::F32;
    const MAX: f32 = f32::MAX;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Float for bf16 {
    const DTYPE: DType = DType::BF16;
    const MAX: f32 = bf16::MAX.to_f32_const();
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32: a shift, which vectorizes.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        // half's bf16::from_f32, bit for bit (round to nearest even, NaN
        // kept quiet), without its branches, so that loops of it vectorize.
        let x = v.to_bits();
        let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
        let quiet_nan = (x >> 16) | 0x40;
        let nan = x & 0x7FFF_FFFF > 0x7F80_0000;
        bf16::from_bits(if nan { quiet_nan } else { rounded } as u16)
    }
}

impl Float for f16 {
    const DTYPE: DType = DType::F16;
    const MAX: f32 = f16::MAX.to_f32_const();
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline]
    fn load_scaled(src: &[Self], scale: f32, dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        // half converts with F16C where the CPU has it.
        src.convert_to_f32_slice(dst);
        for d in dst.iter_mut() {
            *d *= scale;
        }
    }
    #[inline]
    fn store(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

/// Token id types. Negative ids only mean something as an `ignore_index`.
pub trait TokenId: sealed::Sealed + Copy + Send + Sync + std::fmt::Debug + 'static {
    /// Suffix of the CUDA kernel instantiated for this id type.
    const NAME: &'static str;
    /// The id as a signed 64-bit integer.
    fn to_i64(self) -> i64;
}

impl TokenId for u32 {
    const NAME: &'static str = "u32";
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self as i64
    }
}

impl TokenId for i32 {
    const NAME: &'static str = "i32";
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self as i64
    }
}

impl TokenId for i64 {
    const NAME: &'static str = "i64";
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free narrowing against half's, on every f32 whose low 16
    /// bits sit at or around the rounding boundary (ties both ways, the
    /// largest below and smallest above), every 61st other bit pattern, and
    /// the specials: infinities, NaNs (signalling and quiet), the largest
    /// finite values, zeros and subnormals are all among them.
    #[test]
    fn bf16_narrowing_is_halfs_bit_for_bit() {
        let boundaries = (0..=u16::MAX as u32)
            .flat_map(|high| [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF].map(|low| high << 16 | low));
        let strided = (0..=u32::MAX).step_by(61);
        for bits in boundaries.chain(strided) {
            let v = f32::from_bits(bits);
            assert_eq!(
                <bf16 as Float>::from_f32(v).to_bits(),
                bf16::from_f32(v).to_bits(),
                "{bits:#010x}"
            );
        }
    }
}
