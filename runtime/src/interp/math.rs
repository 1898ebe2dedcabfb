//! Elementary functions written so that loops over slices vectorize
//! (libm's `expf` is a call per element, which dominated SwiGLU and softmax).

/// `e^x` to about 1 ulp over the range where it is a normal f32 (Cephes'
/// `expf`: a range reduction by ln 2 and a degree-7 polynomial). Inputs
/// below -87.3 give ~1e-38 instead of a subnormal or 0, and inputs above
/// 88.7 give f32::MAX-ish instead of infinity: both are irrelevant where it
/// is used (silu, softmax after subtracting the maximum).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest by the 1.5·2²³ trick: plain adds, which vectorize
    // everywhere (f32::round may become a libm call without SSE4.1).
    const ROUNDER: f32 = 12_582_912.0;
    let t = x * LOG2_E + ROUNDER;
    let n = t - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    // 2^n through the exponent bits; n is in [-126, 128] after the clamp.
    // t = 1.5·2²³ + n has n in its low bits, so integer operations on them
    // give 2^n: unlike `n as i32` (a saturating conversion, which LLVM
    // turns into a scalar instruction per lane), they stay vector code.
    let scale = f32::from_bits(
        t.to_bits()
            .wrapping_sub(ROUNDER.to_bits())
            .wrapping_add(127)
            << 23,
    );
    y * scale
}

/// `x · sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `out[i] = silu(gate[i]) · up[i]`, compiled for the widest SIMD the CPU has.
pub fn swiglu_into(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[inline(always)]
    fn body(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu(g) * u;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
            body(gate, up, out)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
            body(gate, up, out)
        }
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { avx512(gate, up, out) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { avx2(gate, up, out) };
        }
    }
    body(gate, up, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulps_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.00731;
        }
        assert!(worst < 4.0 * f32::EPSILON, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn power_of_two_from_the_rounding_bits_is_the_converted_one() {
        const ROUNDER: f32 = 12_582_912.0;
        for n in -126..=128 {
            let t = n as f32 + ROUNDER;
            let bits = t
                .to_bits()
                .wrapping_sub(ROUNDER.to_bits())
                .wrapping_add(127)
                << 23;
            assert_eq!(bits, ((n + 127) as u32) << 23, "n = {n}");
        }
    }

    #[test]
    fn silu_matches_its_definition() {
        for x in [-20.0f32, -3.5, -0.1, 0.0, 0.7, 4.0, 30.0] {
            let want = x / (1.0 + (-x).exp());
            assert!(
                (silu(x) - want).abs() <= 4.0 * f32::EPSILON * want.abs().max(1e-30),
                "{x}"
            );
        }
    }
}
