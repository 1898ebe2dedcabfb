//! Activation-aware weight quantization (after Lin et al., "AWQ", 2023):
//! two searches that use calibration activations to decide how round-to-
//! nearest should see the weights, both measured by the layer's output error
//! `‖X·Wᵀ − X·Ŵᵀ‖²` on sampled calibration rows `X`:
//!
//! - **scales** per input channel, `s = mean|x|^α` for α on a grid (α = 0 is
//!   plain round-to-nearest, so the search never does worse on its sample),
//!   applied through [`super::smooth`]: channels that carry more activation
//!   get finer steps;
//! - **clipping** per group: the group's range shrunk by up to half before
//!   quantizing, when the smaller step serves the outputs better than the
//!   outliers it clips. Clipping is judged by the error weighted by each
//!   channel's `mean x²` (the diagonal of `XᵀX`, as llama.cpp's importance
//!   matrix weighs it): one multiply per weight and candidate, where the
//!   full output error would cost a dot product per sampled token.
//!
//! Both run on float weights; quantization itself stays round-to-nearest
//! on the result ([`kiln_runtime::ir::quant::quantize`]).

use super::smooth::ChannelStats;
use kiln_runtime::ir::quant::{quantize, round_trip_group, WeightQuant};
use rayon::prelude::*;

/// Points of each grid: α in `0, 1/20, …, 19/20`; clip ratios `1, 0.95, …, 0.55`.
pub const GRID: usize = 20;

/// `Σ_r Σ_n (x_r · e_n)²` over the sample rows `x [r, k]` and error rows `e [n, k]`.
fn output_error(x: &[f32], e: &[f32], k: usize) -> f64 {
    e.par_chunks(k)
        .map(|e_row| {
            x.chunks_exact(k)
                .map(|x_row| {
                    let dot = dot(x_row, e_row);
                    (dot as f64) * (dot as f64)
                })
                .sum::<f64>()
        })
        .sum()
}

/// An f32 dot product in eight lanes, which the compiler vectorizes
/// (`mul_add` would not: without FMA in the target it is a libm call).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// What the weights become after quantizing and dequantizing.
fn round_trip(w: &[f32], n: usize, k: usize, scheme: WeightQuant) -> Result<Vec<f32>, String> {
    Ok(quantize(w, n, k, scheme)?.dequantize())
}

/// The result of a scale search over one group of Linears.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleSearch {
    pub scales: Vec<f32>,
    pub alpha: f32,
    /// Output error of round-to-nearest (α = 0) and of the chosen scales.
    pub rtn_error: f64,
    pub error: f64,
}

/// Searches input-channel scales for Linears that share the input `stats`
/// describes; `weights` are their `[n, k]` matrices, quantized under `scheme`.
pub fn search_scales(
    stats: &ChannelStats,
    weights: &[(&[f32], usize)],
    scheme: WeightQuant,
) -> Result<ScaleSearch, String> {
    let k = stats.k;
    let x = &stats.sample;
    let mut best: Option<ScaleSearch> = None;
    let mut rtn_error = f64::NAN;
    for step in 0..GRID {
        let alpha = step as f32 / GRID as f32;
        // Channels that never carry a value would get a zero scale.
        let mut s: Vec<f32> = stats
            .mean_abs
            .iter()
            .map(|&m| m.max(1e-4).powf(alpha))
            .collect();
        let (lo, hi) = s
            .iter()
            .fold((f32::INFINITY, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let norm = (lo * hi).sqrt();
        s.iter_mut().for_each(|v| *v /= norm);
        let mut error = 0.0;
        for &(w, n) in weights {
            let scaled: Vec<f32> = w
                .chunks_exact(k)
                .flat_map(|row| row.iter().zip(&s).map(|(x, sj)| x * sj))
                .collect();
            let q = round_trip(&scaled, n, k, scheme)?;
            let e: Vec<f32> = w
                .chunks_exact(k)
                .zip(q.chunks_exact(k))
                .flat_map(|(row, q_row)| {
                    row.iter().zip(q_row).zip(&s).map(|((w, q), sj)| w - q / sj)
                })
                .collect();
            error += output_error(x, &e, k);
        }
        if step == 0 {
            rtn_error = error;
        }
        // A non-finite error (a NaN in the sample) is never chosen.
        if error.is_finite() && best.as_ref().is_none_or(|b| error < b.error) {
            best = Some(ScaleSearch {
                scales: s,
                alpha,
                rtn_error: f64::NAN, // known once α = 0 has run: set below
                error,
            });
        }
    }
    let best = best.ok_or("every candidate scale gave a non-finite error")?;
    Ok(ScaleSearch { rtn_error, ..best })
}

/// The result of a clip search over one matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipSearch {
    /// Groups whose range was shrunk.
    pub clipped_groups: usize,
    pub groups: usize,
    /// `Σ mean(x_j²)·(w_j − ŵ_j)²` over the matrix, before and after.
    pub rtn_error: f64,
    pub error: f64,
}

/// Clamps each group of `w [n, k]` to the fraction of its range (1, 0.95,
/// …, 0.55) whose round-to-nearest quantization gives the smallest error
/// `Σ_j mean(x_j²)·(w_j − ŵ_j)²`; `w` is changed in place.
pub fn search_clip(
    stats: &ChannelStats,
    w: &mut [f32],
    k: usize,
    scheme: WeightQuant,
) -> Result<ClipSearch, String> {
    let importance = &stats.mean_sq;
    assert_eq!(importance.len(), k);
    let g = scheme.group_size.min(k);
    let groups_per_row = k.div_ceil(g);
    let per_row: Vec<Result<(usize, f64, f64), String>> = w
        .par_chunks_mut(k)
        .map(|row| {
            let (mut clipped, mut rtn, mut best_total) = (0, 0.0, 0.0);
            for group in 0..groups_per_row {
                let range = group * g..((group + 1) * g).min(k);
                let original = row[range.clone()].to_vec();
                let lo = original.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = original.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let amax = lo.abs().max(hi.abs());
                // The clamp of a range shrunk to `ratio` of the group's.
                let bounds = |ratio: f32| match scheme.offset {
                    true => (lo * ratio, hi * ratio),
                    false => (-amax * ratio, amax * ratio),
                };
                let mut best = (f64::INFINITY, 1.0f32);
                let mut q = vec![0f32; original.len()];
                for step in 0..GRID / 2 {
                    let ratio = 1.0 - step as f32 / GRID as f32;
                    let (cl, ch) = bounds(ratio);
                    q.iter_mut()
                        .zip(&original)
                        .for_each(|(q, v)| *q = v.clamp(cl, ch));
                    if !round_trip_group(&mut q, scheme) {
                        return Err(format!(
                            "row group {group}: the weights do not fit f16 scales"
                        ));
                    }
                    let error: f64 = original
                        .iter()
                        .zip(&q)
                        .zip(&importance[range.clone()])
                        .map(|((a, b), m)| (((a - b) as f64).powi(2)) * *m as f64)
                        .sum();
                    if step == 0 {
                        rtn += error;
                    }
                    if error < best.0 {
                        best = (error, ratio);
                    }
                }
                if !best.0.is_finite() {
                    return Err(format!("group {group}: every clip gave a non-finite error"));
                }
                if best.1 < 1.0 {
                    clipped += 1;
                    let (cl, ch) = bounds(best.1);
                    row[range].iter_mut().for_each(|v| *v = v.clamp(cl, ch));
                }
                best_total += best.0;
            }
            Ok((clipped, rtn, best_total))
        })
        .collect();
    let mut result = ClipSearch {
        clipped_groups: 0,
        groups: groups_per_row * (w.len() / k),
        rtn_error: 0.0,
        error: 0.0,
    };
    for row in per_row {
        let (clipped, rtn, best) = row?;
        result.clipped_groups += clipped;
        result.rtn_error += rtn;
        result.error += best;
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Activations where a few channels are much larger than the rest, as
    /// in real models, and weights with no structure.
    fn outlier_stats(k: usize, rows: usize) -> ChannelStats {
        let mut sample = Vec::with_capacity(rows * k);
        for r in 0..rows {
            for j in 0..k {
                let base = ((r * 31 + j * 17) % 23) as f32 / 23.0 - 0.5;
                let big = if j % 16 == 3 { 40.0 } else { 1.0 };
                sample.push(base * big);
            }
        }
        let mut absmax = vec![0f32; k];
        let mut mean_abs = vec![0f32; k];
        let mut mean_sq = vec![0f32; k];
        for row in sample.chunks_exact(k) {
            for j in 0..k {
                absmax[j] = absmax[j].max(row[j].abs());
                mean_abs[j] += row[j].abs() / rows as f32;
                mean_sq[j] += row[j] * row[j] / rows as f32;
            }
        }
        ChannelStats {
            k,
            tokens: rows,
            absmax,
            mean_abs,
            mean_sq,
            sample,
        }
    }

    fn weights(n: usize, k: usize, seed: usize) -> Vec<f32> {
        (0..n * k)
            .map(|i| {
                let v = ((i * 7919 + seed * 104729) % 1000) as f32 / 1000.0 - 0.5;
                // A heavy tail: a few large weights, as trained matrices have.
                if i % 97 == 0 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect()
    }

    const INT4_G32: WeightQuant = WeightQuant {
        bits: 4,
        group_size: 32,
        offset: false,
    };

    #[test]
    fn scales_favour_the_channels_that_carry_activation() {
        let (n, k) = (24, 96);
        let stats = outlier_stats(k, 40);
        let (a, b) = (weights(n, k, 1), weights(n, k, 2));
        let found = search_scales(&stats, &[(&a, n), (&b, n)], INT4_G32).unwrap();
        assert!(found.alpha > 0.0, "{found:?}");
        assert!(found.error < 0.9 * found.rtn_error, "{found:?}");
        assert!(
            found.scales[3] > found.scales[4],
            "the outlier channel gets a larger scale"
        );
        // The error it reports is the error of its scales, recomputed here.
        let mut e = Vec::new();
        for w in [&a, &b] {
            let scaled: Vec<f32> = w
                .chunks_exact(k)
                .flat_map(|row| row.iter().zip(&found.scales).map(|(x, s)| x * s))
                .collect();
            let q = round_trip(&scaled, n, k, INT4_G32).unwrap();
            for (i, (w, q)) in w.iter().zip(&q).enumerate() {
                e.push(w - q / found.scales[i % k]);
            }
        }
        let error = output_error(&stats.sample, &e, k);
        assert!(
            (error - found.error).abs() <= 1e-9 * error.max(1.0),
            "{error} vs {found:?}"
        );
    }

    #[test]
    fn clipping_never_raises_the_sample_error_and_changes_only_clipped_groups() {
        let (n, k) = (16, 80); // K not a multiple of the group: a short last group.
        let stats = outlier_stats(k, 32);
        let original = weights(n, k, 3);
        let mut w = original.clone();
        let found = search_clip(&stats, &mut w, k, INT4_G32).unwrap();
        assert_eq!(found.groups, n * 3);
        assert!(found.clipped_groups > 0, "{found:?}");
        assert!(
            found.error <= found.rtn_error && found.error < found.rtn_error,
            "{found:?}"
        );
        // Its error is the importance-weighted squared error of the result.
        let q = round_trip(&w, n, k, INT4_G32).unwrap();
        let recomputed: f64 = (0..n * k)
            .map(|i| ((original[i] - q[i]) as f64).powi(2) * stats.mean_sq[i % k] as f64)
            .sum();
        assert!(
            (recomputed - found.error).abs() <= 1e-6 * recomputed,
            "{recomputed} vs {found:?}"
        );
        for (a, b) in original.iter().zip(&w) {
            assert!(b.abs() <= a.abs(), "clipping only shrinks weights");
        }
    }

    #[test]
    fn a_nan_in_the_activations_is_never_chosen() {
        let (n, k) = (4, 32);
        let mut stats = outlier_stats(k, 8);
        stats.sample[5] = f32::NAN;
        let w = weights(n, k, 4);
        assert!(search_scales(&stats, &[(&w, n)], INT4_G32).is_err());
    }
}
