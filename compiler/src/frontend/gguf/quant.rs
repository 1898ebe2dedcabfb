//! ggml tensor types and their dequantization to f32.
//!
//! Block layouts follow ggml's `ggml-common.h` (all little-endian). Values
//! are computed as ggml's reference `dequantize_row_*` computes them, in
//! f32, so the dequantized weights equal what llama.cpp and transformers'
//! GGUF loader produce.

use half::{bf16, f16};
use kiln_runtime::ir::quant::{QuantizedMatrix, WeightQuant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    /// 32 weights: f16 scale d, 16 bytes of 4-bit q; w = d·(q − 8).
    Q4_0,
    /// 32 weights: f16 scale d, f16 min m, 16 bytes of 4-bit q; w = d·q + m.
    Q4_1,
    /// 32 weights: f16 scale d, 32 × i8 q; w = d·q.
    Q8_0,
    /// 32 weights: f16 scale d, 32 high bits, 16 bytes of low 4 bits;
    /// w = d·(q − 16).
    Q5_0,
    /// 32 weights: f16 scale d, f16 min m, 32 high bits, 16 bytes of low 4
    /// bits; w = d·q + m.
    Q5_1,
    /// 256 weights in 8 sub-blocks of 32 with 6-bit scales and mins.
    Q4K,
    /// 256 weights of 6 bits in 16 sub-blocks of 16 with i8 scales.
    Q6K,
}

impl GgmlType {
    const ALL: [GgmlType; 10] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ];

    /// The type's number in ggml's `enum ggml_type`.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    pub fn name(self) -> &'static str {
        Self::id_name(self.id())
    }

    /// ggml's name for any type number, for messages about the ones Kiln
    /// does not read.
    pub fn id_name(id: u32) -> &'static str {
        const NAMES: [&str; 31] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16",
        ];
        NAMES.get(id as usize).copied().unwrap_or("unknown")
    }

    pub fn supported_names() -> String {
        Self::ALL.map(GgmlType::name).join(", ")
    }

    /// Weights per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q4K => 2 + 2 + 12 + 128,
            GgmlType::Q6K => 128 + 64 + 16 + 2,
        }
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes `bytes` (whole blocks of `ty`, as the reader checked) into `out`,
/// which holds exactly the blocks' weights.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (block_len, block_bytes) = (ty.block_len(), ty.block_bytes());
    debug_assert_eq!(bytes.len() / block_bytes * block_len, out.len());
    let blocks = bytes
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(block_len));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, o)| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, o)| o[0] = f16_at(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, o)| {
            let d = f16_at(b, 0);
            for (i, &q) in b[2..18].iter().enumerate() {
                // Low nibbles are weights 0–15, high nibbles 16–31.
                o[i] = d * ((q & 0xf) as i32 - 8) as f32;
                o[i + 16] = d * ((q >> 4) as i32 - 8) as f32;
            }
        }),
        GgmlType::Q4_1 => blocks.for_each(|(b, o)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (i, &q) in b[4..20].iter().enumerate() {
                o[i] = (q & 0xf) as f32 * d + m;
                o[i + 16] = (q >> 4) as f32 * d + m;
            }
        }),
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| {
            let d = f16_at(b, 0);
            for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                *o = q as i8 as f32 * d;
            }
        }),
        GgmlType::Q5_0 => blocks.for_each(|(b, o)| dequantize_q5(b, o, false)),
        GgmlType::Q5_1 => blocks.for_each(|(b, o)| dequantize_q5(b, o, true)),
        GgmlType::Q4K => blocks.for_each(|(b, o)| dequantize_q4k(b, o)),
        GgmlType::Q6K => blocks.for_each(|(b, o)| dequantize_q6k(b, o)),
    }
}

/// A `[n, k]` matrix of Q8_0, Q4_0, Q4_1 or Q4_K blocks in Kiln's quantized
/// form (see `kiln_runtime::ir::quant`), without dequantizing: Q8_0 is int8
/// in groups of 32, Q4_0 4-bit around 8 and Q4_1 4-bit with a min, each
/// block's f16 scale (and min) kept as it is: the weights it stands for are
/// exactly the ones [`dequantize`] computes, as are Q5_0's, kept as int8
/// per 32 ([`q5_0_to_quantized`]). Q4_K ([`q4k_to_quantized`]) is 4-bit
/// with a min per 32 too and Q6_K ([`q6k_to_quantized`]) int8 per 16,
/// within a hundredth of a step of them. `None` for the other types (Q5_1,
/// whose min int8 cannot hold), which are dequantized instead.
pub fn to_quantized(ty: GgmlType, bytes: &[u8], n: usize, k: usize) -> Option<QuantizedMatrix> {
    match ty {
        GgmlType::Q4K => return q4k_to_quantized(bytes, n, k),
        GgmlType::Q6K => return q6k_to_quantized(bytes, n, k),
        GgmlType::Q5_0 => return q5_0_to_quantized(bytes, n, k),
        _ => {}
    }
    let offset = match ty {
        GgmlType::Q8_0 | GgmlType::Q4_0 => false,
        GgmlType::Q4_1 => true,
        _ => return None,
    };
    let bits = if ty == GgmlType::Q8_0 { 8 } else { 4 };
    let scheme = WeightQuant {
        bits,
        group_size: 32,
        offset,
    };
    if !k.is_multiple_of(32) || bytes.len() != n * k / 32 * ty.block_bytes() {
        return None;
    }
    let blocks = n * k / 32;
    let mut q = Vec::with_capacity(n * k * bits as usize / 8);
    let mut scale = Vec::with_capacity(blocks);
    let mut min = Vec::with_capacity(if offset { blocks } else { 0 });
    let f16_of = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]);
    for b in bytes.chunks_exact(ty.block_bytes()) {
        scale.push(f16_of(b, 0));
        match ty {
            GgmlType::Q8_0 => q.extend_from_slice(&b[2..34]),
            _ => {
                if offset {
                    min.push(f16_of(b, 2));
                }
                let qs = &b[if offset { 4 } else { 2 }..][..16];
                // ggml: byte j holds weights j (low) and j + 16 (high);
                // Kiln: byte i holds weights 2i (low) and 2i + 1 (high).
                let nibble = |e: usize| match e < 16 {
                    true => qs[e] & 0x0f,
                    false => qs[e - 16] >> 4,
                };
                q.extend((0..16).map(|i| nibble(2 * i) | (nibble(2 * i + 1) << 4)));
            }
        }
    }
    Some(QuantizedMatrix {
        scheme,
        n,
        k,
        q,
        scale,
        min,
    })
}

/// Q4_K blocks as 4-bit groups of 32 with a scale and a min each: a 256
/// block's 8 groups take its 6-bit scale and min codes times `d` and
/// `dmin`, `w = q·(d·sc) − dmin·m`, each product rounded to f16 (Kiln's
/// scales are f16; ggml keeps them in f32). That moves a weight by at most
/// `15 · 2⁻¹¹` of its group's scale plus `2⁻¹¹` of its min: about a
/// hundredth of a quantization step.
fn q4k_to_quantized(bytes: &[u8], n: usize, k: usize) -> Option<QuantizedMatrix> {
    let ty = GgmlType::Q4K;
    if !k.is_multiple_of(256) || bytes.len() != n * k / 256 * ty.block_bytes() {
        return None;
    }
    let groups = n * k / 32;
    let (mut q, mut scale, mut min) = (
        Vec::with_capacity(n * k / 2),
        Vec::with_capacity(groups),
        Vec::with_capacity(groups),
    );
    for b in bytes.chunks_exact(ty.block_bytes()) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, qs) = (&b[4..16], &b[16..144]);
        for group in 0..8 {
            let (sc, m) = q4k_scale_min(group, scales);
            scale.push(f16::from_f32(d * sc as f32));
            min.push(f16::from_f32(-(dmin * m as f32)));
            // Groups 2c and 2c + 1 are the low and the high nibbles of
            // bytes 32c..32c + 32; Kiln packs weights 2i, 2i + 1 per byte.
            let bytes = &qs[group / 2 * 32..][..32];
            let nibble = |l: usize| match group % 2 {
                0 => bytes[l] & 0x0f,
                _ => bytes[l] >> 4,
            };
            q.extend((0..16).map(|i| nibble(2 * i) | (nibble(2 * i + 1) << 4)));
        }
    }
    Some(QuantizedMatrix {
        scheme: WeightQuant {
            bits: 4,
            group_size: 32,
            offset: true,
        },
        n,
        k,
        q,
        scale,
        min,
    })
}

/// Q6_K blocks as int8 groups of 16, symmetric: `q − 32` (−32..=31) and
/// each group's `d · scale` rounded to f16, which moves a weight by at most
/// `32 · 2⁻¹¹` of its group's scale.
fn q6k_to_quantized(bytes: &[u8], n: usize, k: usize) -> Option<QuantizedMatrix> {
    let ty = GgmlType::Q6K;
    if !k.is_multiple_of(256) || bytes.len() != n * k / 256 * ty.block_bytes() {
        return None;
    }
    let (mut q, mut scale) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k / 16));
    for b in bytes.chunks_exact(ty.block_bytes()) {
        let d = f16_at(b, 208);
        for half in 0..2 {
            let ql = &b[half * 64..][..64];
            let qh = &b[128 + half * 32..][..32];
            let sc = &b[192 + half * 8..][..8];
            // Weight j of the half: its low 4 bits from ql, high 2 from qh,
            // in the order dequantize_q6k writes them.
            let q6 = |j: usize| -> u8 {
                let (quarter, l) = (j / 32, j % 32);
                let low = match quarter {
                    0 => ql[l] & 0xf,
                    1 => ql[l + 32] & 0xf,
                    2 => ql[l] >> 4,
                    _ => ql[l + 32] >> 4,
                };
                low | (((qh[l] >> (2 * quarter)) & 3) << 4)
            };
            q.extend((0..128).map(|j| (q6(j) as i8 - 32) as u8));
            scale.extend(sc.iter().map(|&s| f16::from_f32(d * (s as i8) as f32)));
        }
    }
    Some(QuantizedMatrix {
        scheme: WeightQuant {
            bits: 8,
            group_size: 16,
            offset: false,
        },
        n,
        k,
        q,
        scale,
        min: Vec::new(),
    })
}

/// Q5_0 blocks as int8 groups of 32, symmetric: `q − 16` (−16..=15) with
/// the block's own f16 scale, so the same weights exactly. (llama.cpp writes
/// Q5_0 where a Q4_K_M file's rows are not whole 256-blocks.)
fn q5_0_to_quantized(bytes: &[u8], n: usize, k: usize) -> Option<QuantizedMatrix> {
    let ty = GgmlType::Q5_0;
    if !k.is_multiple_of(32) || bytes.len() != n * k / 32 * ty.block_bytes() {
        return None;
    }
    let (mut q, mut scale) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k / 32));
    for b in bytes.chunks_exact(ty.block_bytes()) {
        scale.push(f16::from_le_bytes([b[0], b[1]]));
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        q.extend((0..32).map(|e| (q5_code(qh, &b[6..22], e) as i8 - 16) as u8));
    }
    Some(QuantizedMatrix {
        scheme: WeightQuant {
            bits: 8,
            group_size: 32,
            offset: false,
        },
        n,
        k,
        q,
        scale,
        min: Vec::new(),
    })
}

/// Weight `e` (0..32) of a Q5_0/Q5_1 block as its 5-bit code: the low 4
/// bits from byte `e % 16` of `qs` (low nibble for the first 16), the fifth
/// from bit `e` of `qh`.
fn q5_code(qh: u32, qs: &[u8], e: usize) -> u8 {
    let low = match e < 16 {
        true => qs[e] & 0x0f,
        false => qs[e - 16] >> 4,
    };
    low | ((((qh >> e) & 1) as u8) << 4)
}

/// Q5_0: w = d·(q − 16); Q5_1 (`with_min`): w = d·q + m.
fn dequantize_q5(b: &[u8], o: &mut [f32], with_min: bool) {
    let d = f16_at(b, 0);
    let (m, at) = if with_min {
        (f16_at(b, 2), 4)
    } else {
        (0.0, 2)
    };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let qs = &b[at + 4..at + 20];
    for (e, out) in o.iter_mut().enumerate().take(32) {
        let q = q5_code(qh, qs, e);
        *out = match with_min {
            true => d * q as f32 + m,
            false => (q as i32 - 16) as f32 * d,
        };
    }
}

/// The j-th 6-bit (scale, min) pair of a Q4_K block's 12 packed bytes.
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K: d, dmin (f16), 12 bytes of scales/mins, 128 bytes of nibbles. Each
/// 64 weights share 32 bytes: low nibbles first (scale pair 2i), then high
/// nibbles (pair 2i+1); w = d·scale·q − dmin·min.
fn dequantize_q4k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = q4k_scale_min(2 * chunk, scales);
        let (sc2, m2) = q4k_scale_min(2 * chunk + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let out = &mut o[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0xf) as f32 - min1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 i8
/// scales, f16 d. Each half of 128 weights uses 64 low bytes, 32 high bytes
/// and 8 scales; w = d·scale·(q − 32).
fn dequantize_q6k(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let out = &mut o[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_numbers_round_trip_and_unknown_ones_are_named() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
        assert_eq!(GgmlType::from_id(13), None);
        assert_eq!(GgmlType::id_name(13), "Q5_K");
        assert_eq!(GgmlType::id_name(1000), "unknown");
    }

    #[test]
    fn q4_1_uses_low_nibbles_first() {
        // d = 2, m = -1; byte i holds q = i (low) and 15 - i (high).
        let mut block = Vec::new();
        block.extend_from_slice(&f16::from_f32(2.0).to_le_bytes());
        block.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_1, &block, &mut out);
        for i in 0..16 {
            assert_eq!(out[i], 2.0 * i as f32 - 1.0);
            assert_eq!(out[i + 16], 2.0 * (15 - i) as f32 - 1.0);
        }
    }

    #[test]
    fn kept_blocks_stand_for_the_dequantized_weights() {
        let (n, k) = (3, 64);
        let mut seed = 7u32;
        let mut byte = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 24) as u8
        };
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
        ] {
            let mut bytes = Vec::new();
            for _ in 0..n * k / 32 {
                // Small f16 scales and mins (exponent bits kept low), random q.
                let mut block: Vec<u8> = (0..ty.block_bytes()).map(|_| byte()).collect();
                block[1] = 0x2c;
                if ty == GgmlType::Q4_1 {
                    block[3] = 0xac;
                }
                bytes.extend(block);
            }
            let mut want = vec![0f32; n * k];
            dequantize(ty, &bytes, &mut want);
            let kept = to_quantized(ty, &bytes, n, k).unwrap();
            assert_eq!(kept.dequantize(), want, "{ty:?}");
        }
        assert!(to_quantized(GgmlType::F16, &[], 0, 256).is_none());
        assert!(
            to_quantized(GgmlType::Q5_1, &[0; 24], 1, 32).is_none(),
            "Q5_1 is dequantized"
        );
    }

    /// Kept Q4_K and Q6_K blocks stand for ggml's weights within their f16
    /// scales' rounding: at most 15 · 2⁻¹¹ of a group's scale plus 2⁻¹¹ of
    /// its min (Q4_K), 32 · 2⁻¹¹ of its scale (Q6_K).
    #[test]
    fn kept_k_quant_blocks_are_ggmls_weights_within_f16_scales() {
        let (n, k) = (2, 512);
        let mut seed = 11u32;
        let mut byte = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 24) as u8
        };
        for ty in [GgmlType::Q4K, GgmlType::Q6K] {
            let mut bytes = Vec::new();
            for _ in 0..n * k / 256 {
                let mut block: Vec<u8> = (0..ty.block_bytes()).map(|_| byte()).collect();
                // d (and dmin): small positive f16s with random mantissas.
                match ty {
                    GgmlType::Q4K => (block[1], block[3]) = (0x1c, 0x1c),
                    _ => block[209] = 0x1c,
                }
                bytes.extend(block);
            }
            let mut want = vec![0f32; n * k];
            dequantize(ty, &bytes, &mut want);
            let kept = to_quantized(ty, &bytes, n, k).unwrap();
            let group = kept.scheme.group_size;
            assert_eq!(kept.scale.len(), n * k / group, "{ty:?}");
            let got = kept.dequantize();
            let mut moved = 0usize;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let s = kept.scale[i / group].to_f32().abs();
                let bound = match ty {
                    GgmlType::Q4K => 15.0 * s + kept.min[i / group].to_f32().abs(),
                    _ => 32.0 * s,
                } / 2048.0
                    + 1e-6 * w.abs();
                assert!(
                    (g - w).abs() <= bound,
                    "{ty:?} weight {i}: {g} vs ggml's {w}"
                );
                moved += usize::from(g != w);
            }
            assert!(moved > 0, "{ty:?}: f16 scales should move some weights");
            assert!(
                to_quantized(ty, &bytes, n, 256).is_none(),
                "{ty:?}: wrong length"
            );
        }
    }

    #[test]
    fn q8_0_and_q4_0_are_signed() {
        let mut q8 = f16::from_f32(0.5).to_le_bytes().to_vec();
        q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q8_0, &q8, &mut out);
        assert_eq!(out[0], -8.0);
        assert_eq!(out[31], 7.5);

        let mut q4 = f16::from_f32(1.0).to_le_bytes().to_vec();
        q4.extend([0x0fu8; 16]);
        dequantize(GgmlType::Q4_0, &q4, &mut out);
        assert_eq!(out[0], 7.0);
        assert_eq!(out[16], -8.0);
    }
}
