//! RoPE cos/sin tables, computed once at build time for positions
//! `0..max_len` the way transformers computes them, scaling included.

use super::config::{RopeConfig, RopeScaling};

/// Inverse frequencies for the `head_dim / 2` rotation pairs.
pub fn inverse_frequencies(rope: &RopeConfig, head_dim: usize) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / rope.theta.powf((2 * i) as f64 / head_dim as f64))
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
    }
}

/// `(cos, sin)`, each `[max_len, head_dim]` row-major, with the frequencies
/// repeated over both halves of the head dimension (rotate-half layout).
/// Angles are formed in f32 like transformers does, so tables agree to an ulp.
pub fn tables(rope: &RopeConfig, head_dim: usize, max_len: usize) -> (Vec<f32>, Vec<f32>) {
    let inv_freq: Vec<f32> = inverse_frequencies(rope, head_dim)
        .iter()
        .map(|&f| f as f32)
        .collect();
    let mut cos = Vec::with_capacity(max_len * head_dim);
    let mut sin = Vec::with_capacity(max_len * head_dim);
    for position in 0..max_len {
        for _half in 0..2 {
            for &f in &inv_freq {
                let angle = (position as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
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
        let f = inverse_frequencies(&rope, 8);
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
        );
        let scaled = inverse_frequencies(&rope, 128);
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-18);
        // Pair 30 has a wavelength between 2048 and 8192: blended.
        assert!(scaled[30] < plain[30] && scaled[30] > plain[30] / 8.0);
    }
}
