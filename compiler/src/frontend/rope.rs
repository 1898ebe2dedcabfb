//! RoPE cos/sin tables, computed once at build time for positions
//! `0..max_len` the way transformers computes them, scaling included.

use super::config::{RopeConfig, RopeScaling};

/// LongRoPE's per-frequency divisors for a graph over a KV cache of
/// `max_len` positions. transformers picks `long_factor` once the sequence
/// is longer than `original_max_position_embeddings` and `short_factor`
/// otherwise, per forward call (`longrope_frequency_update` in
/// `modeling_rope_utils.py`; Phi-3's `prepare_inputs_for_generation` even
/// recomputes the cache when a generation crosses that length). A static
/// graph has one table, so the choice is made once, from the cache's
/// length, as llama.cpp does from its context size (`get_rope_factors`:
/// long when `n_ctx_per_seq > n_ctx_orig_yarn`): a cache no longer than the
/// original length is exactly transformers at every step; a longer one is
/// transformers for sequences longer than the original length (the
/// long contexts such a cache is compiled for), and uses the long factors
/// for shorter ones too. `None` for the other scalings.
pub fn factors(rope: &RopeConfig, max_len: usize) -> Option<&[f64]> {
    match &rope.scaling {
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            ..
        } => Some(if max_len as f64 > *original_max_position_embeddings {
            long_factor
        } else {
            short_factor
        }),
        _ => None,
    }
}

/// The factor cos and sin are multiplied by (LongRoPE's attention factor;
/// 1 for the other scalings).
pub fn attention_factor(rope: &RopeConfig) -> f64 {
    match rope.scaling {
        RopeScaling::LongRope {
            attention_factor, ..
        } => attention_factor,
        _ => 1.0,
    }
}

/// Inverse frequencies for the `dim / 2` rotation pairs of the `dim`
/// rotated dimensions, for a graph over `max_len` positions.
pub fn inverse_frequencies(rope: &RopeConfig, dim: usize, max_len: usize) -> Vec<f64> {
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / rope.theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    match rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => {
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        // `1 / (factor · θ^(2i/d))` (`_compute_longrope_parameters`).
        RopeScaling::LongRope { .. } => {
            let divisors = factors(rope, max_len).expect("a longrope config has factors");
            base.iter().zip(divisors).map(|(f, d)| f / d).collect()
        }
    }
}

/// `(cos, sin)`, each `[max_len, dim]` row-major for the `dim` rotated
/// dimensions of a head, with the frequencies repeated over both halves
/// (rotate-half layout) and scaled by the attention factor. Angles are
/// formed in f32 like transformers does, so tables agree to an ulp.
pub fn tables(rope: &RopeConfig, dim: usize, max_len: usize) -> (Vec<f32>, Vec<f32>) {
    let inv_freq: Vec<f32> = inverse_frequencies(rope, dim, max_len)
        .iter()
        .map(|&f| f as f32)
        .collect();
    // transformers multiplies the f32 cos/sin by it.
    let scale = attention_factor(rope) as f32;
    let mut cos = Vec::with_capacity(max_len * dim);
    let mut sin = Vec::with_capacity(max_len * dim);
    for position in 0..max_len {
        for _half in 0..2 {
            for &f in &inv_freq {
                let angle = (position as f32 * f) as f64;
                cos.push(angle.cos() as f32 * scale);
                sin.push(angle.sin() as f32 * scale);
            }
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies_follow_the_base() {
        let rope = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::None,
        };
        let f = inverse_frequencies(&rope, 8, 3);
        assert_eq!(f.len(), 4);
        assert!((f[0] - 1.0).abs() < 1e-12);
        assert!((f[2] - 10000f64.powf(-0.5)).abs() < 1e-12);
        let (cos, sin) = tables(&rope, 8, 3);
        // Position 2, pair 0: angle 2.
        assert!(
            (cos[2 * 8] - 2f32.cos()).abs() < 1e-7 && (sin[2 * 8 + 4] - 2f32.sin()).abs() < 1e-7
        );
    }

    #[test]
    fn llama3_keeps_high_and_divides_low_frequencies() {
        let rope = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let plain = inverse_frequencies(
            &RopeConfig {
                theta: 500000.0,
                scaling: RopeScaling::None,
            },
            128,
            1,
        );
        let scaled = inverse_frequencies(&rope, 128, 1);
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-18);
        // Pair 30 has a wavelength between 2048 and 8192: blended.
        assert!(scaled[30] < plain[30] && scaled[30] > plain[30] / 8.0);
    }

    fn longrope(original: f64) -> RopeConfig {
        RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::LongRope {
                short_factor: vec![1.0, 2.0],
                long_factor: vec![4.0, 8.0],
                original_max_position_embeddings: original,
                attention_factor: 1.5,
            },
        }
    }

    #[test]
    fn longrope_picks_its_factors_by_the_cache_length() {
        let plain = inverse_frequencies(
            &RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::None,
            },
            4,
            1,
        );
        let rope = longrope(32.0);
        // A cache up to the original length: short factors, as transformers
        // uses for every sequence that fits in it.
        let short = inverse_frequencies(&rope, 4, 32);
        assert_eq!(short, vec![plain[0] / 1.0, plain[1] / 2.0]);
        // Longer: the long factors.
        let long = inverse_frequencies(&rope, 4, 33);
        assert_eq!(long, vec![plain[0] / 4.0, plain[1] / 8.0]);
        // cos and sin carry the attention factor: at position 0, cos = 1.5.
        let (cos, sin) = tables(&rope, 4, 40);
        assert_eq!(&cos[..4], &[1.5; 4]);
        assert_eq!(&sin[..4], &[0.0; 4]);
        let angle = 3.0 * (plain[1] / 8.0) as f32;
        assert!((cos[3 * 4 + 1] - (angle as f64).cos() as f32 * 1.5).abs() < 1e-7);
        assert_eq!(attention_factor(&longrope(1e9)), 1.5);
    }
}
