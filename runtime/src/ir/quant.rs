//! Low-bit weights: how a quantized weight matrix is stored, and the one
//! definition of what its numbers mean, shared by the quantizer, the ops
//! that read such weights (`QuantLinear`, `QuantGather`), the interpreter's
//! kernels and every backend.
//!
//! A quantized `W [N, K]` is stored as up to three weight-store tensors:
//!
//! - `q [N, K]`: `i8` (8 bits, signed) or `u4` (4 bits, unsigned 0..=15,
//!   two per byte: element `2j` of a row in the low nibble of byte `j`, as
//!   ONNX packs UINT4);
//! - `scale [N, G]` f16, one per group of `group_size` consecutive weights
//!   of a row along K (`G = ceil(K / group_size)`: the last group of a row
//!   may be shorter; one group of K is per-channel quantization);
//! - `min [N, G]` f16, for schemes with an offset.
//!
//! The weight is `w = q · scale + min` (`min = 0` without one), computed in
//! f32. With f16 scales and at most 8-bit `q` the product is exact in f32,
//! so `w` is rounded once (or not at all): the interpreter, ONNX Runtime's
//! `Mul` + `Add` and ggml's dequantization all get the same bits.

use half::f16;
use serde::{Deserialize, Serialize};

/// How the weights of one matrix are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WeightQuant {
    /// 8 (`q` is i8) or 4 (`q` is u4).
    pub bits: u8,
    /// Weights per scale along K.
    pub group_size: usize,
    /// Whether a `min` tensor follows the scales (`w = q·scale + min`).
    /// Without one, 8-bit `q` is symmetric around 0 and 4-bit `q` around 8
    /// (`min = -8·scale` is then implied: see [`WeightQuant::implied_min`]).
    pub offset: bool,
}

/// What happens to the activations before the product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationQuant {
    /// `x` stays f32: weight-only quantization (`w8a16`, `w4a16`).
    #[default]
    None,
    /// `x` is quantized per token (row) to symmetric int8 and multiplied with
    /// int8 weights in exact integer arithmetic (`w8a8`, what ATC's
    /// AscendQuant → int8 MatMul → AscendDequant runs):
    /// `s_x = max|x| / 127`, `x_q = clip(round_half_even(x / s_x), -128, 127)`
    /// (`x_q = 0` for a row of zeros), `y = f32(Σ x_q·q) · scale · s_x`.
    DynamicInt8PerToken,
}

impl WeightQuant {
    pub fn groups(&self, k: usize) -> usize {
        k.div_ceil(self.group_size)
    }

    /// The largest and smallest stored `q`.
    pub fn q_range(&self) -> (i32, i32) {
        match self.bits {
            8 => (-128, 127),
            _ => (0, 15),
        }
    }

    /// The `min` that a scheme without an offset implies.
    pub fn implied_min(&self, scale: f32) -> f32 {
        match self.bits {
            4 => -8.0 * scale,
            _ => 0.0,
        }
    }

    /// A short name for messages and reports: `int8 per channel`, `int4 g128 asym`.
    pub fn describe(&self, k: usize) -> String {
        let groups = if self.group_size >= k {
            "per channel".to_string()
        } else {
            format!("g{}", self.group_size)
        };
        let kind = if self.offset { " asym" } else { "" };
        format!("int{} {groups}{kind}", self.bits)
    }

    /// Checks `q [N, K]`, `scale [N, G]` and `min [N, G]` shapes against
    /// each other; returns `(N, K)`.
    pub fn check_shapes(
        &self,
        q: &crate::ir::TensorType,
        scale: &crate::ir::TensorType,
        min: Option<&crate::ir::TensorType>,
    ) -> Result<(usize, usize), String> {
        use crate::ir::DType;
        let want = match self.bits {
            8 => DType::I8,
            4 => DType::U4,
            b => return Err(format!("{b}-bit weights are not supported (4 or 8)")),
        };
        if q.dtype != want || q.rank() != 2 {
            return Err(format!(
                "{}-bit weights must be {want} of rank 2, got {q}",
                self.bits
            ));
        }
        if self.group_size == 0 {
            return Err("the group size must be at least 1".into());
        }
        if self.bits == 8 && self.offset {
            return Err("8-bit weights are symmetric: no min".into());
        }
        let (n, k) = (q.shape[0], q.shape[1]);
        if want == DType::U4 && !(k.is_multiple_of(2) && self.group_size.is_multiple_of(2)) {
            return Err(format!(
                "4-bit weights pack two per byte: K and the group size must be even, got {k} and {}",
                self.group_size
            ));
        }
        let expected = [n, self.groups(k)];
        for (what, t) in [("scale", Some(scale)), ("min", min)] {
            let Some(t) = t else { continue };
            if t.dtype != DType::F16 || t.shape != expected {
                return Err(format!(
                    "{what} must be f16{expected:?} for {q} in groups of {}, got {t}",
                    self.group_size
                ));
            }
        }
        Ok((n, k))
    }
}

/// Element `k` of row `row` of a packed u4 matrix with `k_len` columns.
#[inline]
pub fn u4_at(bytes: &[u8], k_len: usize, row: usize, k: usize) -> u8 {
    let byte = bytes[(row * k_len + k) / 2];
    if k.is_multiple_of(2) {
        byte & 0x0f
    } else {
        byte >> 4
    }
}

/// The stored value `q[row, k]` as an integer.
#[inline]
pub fn q_at(bits: u8, bytes: &[u8], k_len: usize, row: usize, k: usize) -> i32 {
    match bits {
        8 => bytes[row * k_len + k] as i8 as i32,
        _ => u4_at(bytes, k_len, row, k) as i32,
    }
}

/// A quantized matrix in memory, as the quantizer makes it and the weight
/// store holds it: `q` bytes as stored, scales and mins as f16.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedMatrix {
    pub scheme: WeightQuant,
    pub n: usize,
    pub k: usize,
    pub q: Vec<u8>,
    pub scale: Vec<f16>,
    /// Empty without an offset.
    pub min: Vec<f16>,
}

impl QuantizedMatrix {
    pub fn dequantize(&self) -> Vec<f32> {
        let f32s = |v: &[f16]| v.iter().map(|h| h.to_f32()).collect::<Vec<f32>>();
        let min = f32s(&self.min);
        dequantize(
            self.scheme,
            &self.q,
            &f32s(&self.scale),
            self.scheme.offset.then_some(&min[..]),
            self.n,
            self.k,
        )
    }
}

/// `W [n, k]` in f32 from its stored form: `w = fma(q, scale, min)`, the
/// one definition every op and backend follows.
pub fn dequantize(
    scheme: WeightQuant,
    q: &[u8],
    scale: &[f32],
    min: Option<&[f32]>,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let groups = scheme.groups(k);
    let mut out = Vec::with_capacity(n * k);
    for row in 0..n {
        out.extend((0..k).map(|kk| {
            let g = row * groups + kk / scheme.group_size;
            let m = min.map_or(scheme.implied_min(scale[g]), |m| m[g]);
            (q_at(scheme.bits, q, k, row, kk) as f32).mul_add(scale[g], m)
        }));
    }
    out
}

/// Round-to-nearest quantization of `w [n, k]` (row-major f32) under
/// `scheme`: per group, symmetric schemes take `scale = max|w| / qmax`
/// (127 for 8 bits, 7 for 4 bits, whose `q − 8` spans −8..=7); asymmetric
/// ones map `[min, max]` of the group onto 0..=15. `q` is rounded half to
/// even and clamped, from the f16-rounded scale and min, so that `q·scale +
/// min` is the nearest representable weight.
///
/// Fails on a non-finite weight or a scale past f16's range.
pub fn quantize(
    w: &[f32],
    n: usize,
    k: usize,
    scheme: WeightQuant,
) -> Result<QuantizedMatrix, String> {
    assert_eq!(w.len(), n * k);
    if let Some(at) = w.iter().position(|x| !x.is_finite()) {
        return Err(format!("weight [{}, {}] is {}", at / k, at % k, w[at]));
    }
    let g = scheme.group_size;
    let groups = scheme.groups(k);
    let mut scale = Vec::with_capacity(n * groups);
    let mut min = Vec::with_capacity(if scheme.offset { n * groups } else { 0 });
    let mut values = vec![0i32; n * k];
    for row in 0..n {
        for group in 0..groups {
            let range = row * k + group * g..row * k + ((group + 1) * g).min(k);
            let chunk = &w[range.clone()];
            let (s, m) = group_scale_and_min(chunk, scheme);
            let (sf, mf) = match (s.to_f32(), m.to_f32()) {
                (sf, mf) if sf.is_finite() && mf.is_finite() => (sf, mf),
                _ => {
                    return Err(format!(
                    "row {row}, group {group}: the weights (or their range) do not fit f16 scales"
                ))
                }
            };
            let mf = match scheme.offset {
                true => mf,
                false => scheme.implied_min(sf),
            };
            for (q, &x) in values[range].iter_mut().zip(chunk) {
                *q = quantize_value(x, sf, mf, scheme);
            }
            scale.push(s);
            if scheme.offset {
                min.push(m);
            }
        }
    }
    let q = match scheme.bits {
        8 => values.iter().map(|&v| v as i8 as u8).collect(),
        _ => pack_u4(&values),
    };
    Ok(QuantizedMatrix {
        scheme,
        n,
        k,
        q,
        scale,
        min,
    })
}

/// The stored scale and min (zero without an offset) of one group under
/// round-to-nearest (see [`quantize`]).
pub fn group_scale_and_min(chunk: &[f32], scheme: WeightQuant) -> (f16, f16) {
    if scheme.offset {
        let lo = chunk.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (f16::from_f32((hi - lo) / 15.0), f16::from_f32(lo))
    } else {
        let amax = chunk.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let qmax = if scheme.bits == 8 { 127.0 } else { 7.0 };
        (f16::from_f32(amax / qmax), f16::ZERO)
    }
}

/// The `q` of one weight from its group's f32 scale and (implied) min.
#[inline]
pub fn quantize_value(x: f32, scale: f32, min: f32, scheme: WeightQuant) -> i32 {
    let (qlo, qhi) = scheme.q_range();
    if scale > 0.0 {
        (((x - min) / scale).round_ties_even() as i32).clamp(qlo, qhi)
    } else if scheme.offset || scheme.bits == 8 {
        0 // a constant group: w = min (or 0)
    } else {
        8 // an all-zero group: q − 8 = 0
    }
}

/// One group quantized and dequantized again in place, exactly as
/// [`quantize`] then [`dequantize`] would (`q·scale` is exact in f32, so
/// `q·scale + min` rounds once, as `fma` does). For searches that try many
/// candidate weights; `false` if the group does not fit f16 scales.
pub fn round_trip_group(chunk: &mut [f32], scheme: WeightQuant) -> bool {
    let (s, m) = group_scale_and_min(chunk, scheme);
    let (sf, mf) = (s.to_f32(), m.to_f32());
    if !sf.is_finite() || !mf.is_finite() {
        return false;
    }
    let mf = match scheme.offset {
        true => mf,
        false => scheme.implied_min(sf),
    };
    for x in chunk {
        *x = (quantize_value(*x, sf, mf, scheme) as f32) * sf + mf;
    }
    true
}

/// Packs values 0..=15 two per byte, element `2j` in the low nibble.
pub fn pack_u4(values: &[i32]) -> Vec<u8> {
    values
        .chunks(2)
        .map(|pair| (pair[0] as u8 & 0x0f) | ((*pair.get(1).unwrap_or(&0) as u8 & 0x0f) << 4))
        .collect()
}

/// Dynamic per-token int8 quantization of one row of activations, as
/// [`ActivationQuant::DynamicInt8PerToken`] defines it: `(x_q, s_x)`.
pub fn quantize_activation_row(x: &[f32], out: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let s = amax / 127.0;
    for (q, &v) in out.iter_mut().zip(x) {
        *q = if s > 0.0 {
            (v / s).round_ties_even().clamp(-128.0, 127.0) as i8
        } else {
            0
        };
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pseudo_random as random;

    #[test]
    fn round_trips_within_half_a_step() {
        let (n, k) = (5, 70);
        let w = random(n * k, 3);
        for scheme in [
            WeightQuant {
                bits: 8,
                group_size: 70,
                offset: false,
            },
            WeightQuant {
                bits: 8,
                group_size: 32,
                offset: false,
            },
            WeightQuant {
                bits: 4,
                group_size: 32,
                offset: false,
            },
            WeightQuant {
                bits: 4,
                group_size: 64,
                offset: true,
            },
        ] {
            let q = quantize(&w, n, k, scheme).unwrap();
            assert_eq!(q.scale.len(), n * scheme.groups(k));
            let back = q.dequantize();
            for row in 0..n {
                for k0 in 0..k {
                    let g = row * scheme.groups(k) + k0 / scheme.group_size;
                    let step = q.scale[g].to_f32();
                    let err = (back[row * k + k0] - w[row * k + k0]).abs();
                    // Half a step, plus the f16 rounding of scale and min.
                    assert!(
                        err <= 0.5 * step * 1.01 + 1e-3,
                        "{scheme:?}: {err} vs step {step}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_group_round_trip_has_the_bits_of_quantize_then_dequantize() {
        let (n, k) = (3, 70); // a short last group
        let mut w = random(n * k, 9);
        w[5] = 0.0;
        w[64..70].fill(0.0); // an all-zero group
        for (bits, offset) in [(8, false), (4, false), (4, true)] {
            let scheme = WeightQuant {
                bits,
                group_size: 32,
                offset,
            };
            let expected = quantize(&w, n, k, scheme).unwrap().dequantize();
            let mut got = w.clone();
            for row in got.chunks_exact_mut(k) {
                for group in row.chunks_mut(32) {
                    assert!(round_trip_group(group, scheme));
                }
            }
            let same = got
                .iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{scheme:?}");
        }
        assert!(!round_trip_group(
            &mut [1e9, -1e9],
            WeightQuant {
                bits: 4,
                group_size: 2,
                offset: true
            }
        ));
    }

    #[test]
    fn u4_packs_low_nibble_first() {
        let packed = pack_u4(&[1, 2, 15, 0, 7]);
        assert_eq!(packed, vec![0x21, 0x0f, 0x07]);
        assert_eq!(u4_at(&packed, 4, 0, 1), 2);
        assert_eq!(u4_at(&packed, 4, 0, 2), 15);
        assert_eq!(u4_at(&packed, 4, 1, 0), 7);
    }

    #[test]
    fn activation_rows_round_half_to_even_and_survive_zeros() {
        let mut q = [0i8; 4];
        let s = quantize_activation_row(&[1.27, -0.004, 0.016, 0.0], &mut q);
        assert_eq!(s, 1.27 / 127.0);
        assert_eq!(q, [127, 0, 2, 0]);
        assert_eq!(
            quantize_activation_row(&[-127.0, 0.5, 1.5, -2.5], &mut q),
            1.0
        );
        assert_eq!(q, [-127, 0, 2, -2]);
        assert_eq!(quantize_activation_row(&[0.0; 4], &mut q), 0.0);
        assert_eq!(q, [0; 4]);
    }
}
