//! `Attention`: scaled dot-product attention of the new tokens' queries over
//! the KV cache followed by the new tokens' own keys and values.
//!
//! Inputs:
//! - `q [1, H, T, D]`, `k [1, G, T, D]`, `v [1, G, T, D]`: the new tokens
//!   (RoPE already applied to `q` and `k`); `G` KV heads serve `H / G` query
//!   heads each (grouped-query attention);
//! - `k_cache [1, G, L, D]`, `v_cache [1, G, L, D]`: the cache before this step;
//! - `mask [1, 1, T, L + T]`: additive, f32; column `j < L` is cache slot `j`,
//!   column `L + c` is new token `c`. `-inf` hides a column. A model's
//!   sliding-window layers read another mask input than its global layers
//!   (see `MaskInput`); the op is the same.
//!
//! Output `[1, H, T, D]`. The cache is not written here: the graph returns the
//! new rows and the host stores them (see `ModelIr::kv_cache`). Keeping the
//! cache and the new rows apart in the scores avoids concatenating the whole
//! cache every step, which is slow on the NPU.

use super::{expect_f32, expect_inputs, KernelError, OpSpec};
use crate::interp::linalg::{add_weighted_rows, dot_rows};
use crate::interp::math::exp;
use crate::ir::TensorType;
use crate::tensor::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attention {
    /// Multiplies `q·k` before the mask; usually `1/sqrt(D)`.
    pub scale: f32,
    /// Gemma 2's attention-logit soft-capping: the scaled scores become
    /// `c · tanh(s / c)` before the mask is added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softcap: Option<f32>,
}

impl Attention {
    /// Plain scaled dot-product attention.
    pub fn scaled(scale: f32) -> Attention {
        Attention {
            scale,
            softcap: None,
        }
    }

    /// One score: `q·k · scale`, soft-capped if the op says so, plus the mask.
    #[inline(always)]
    pub fn logit(&self, dot: f32, mask: f32) -> f32 {
        match self.softcap {
            None => dot * self.scale + mask,
            Some(cap) => super::soft_cap::soft_cap(dot * self.scale, cap) + mask,
        }
    }
}

impl OpSpec for Attention {
    const NAME: &'static str = "Attention";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        expect_inputs(inputs, 6..=6)?;
        let names = ["q", "k", "v", "k_cache", "v_cache", "mask"];
        for (ty, what) in inputs.iter().zip(names) {
            expect_f32(ty, what)?;
            if ty.rank() != 4 || ty.shape[0] != 1 {
                return Err(format!(
                    "{what} must be a rank-4 tensor with batch 1, got {ty}"
                ));
            }
        }
        let [_, heads, tokens, dim] = inputs[0].shape[..] else {
            unreachable!()
        };
        let kv_heads = inputs[1].shape[1];
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(format!(
                "{heads} query heads cannot share {kv_heads} KV heads evenly"
            ));
        }
        let new = [1, kv_heads, tokens, dim];
        if inputs[1].shape != new || inputs[2].shape != new {
            return Err(format!(
                "k {} and v {} must both be {new:?}",
                inputs[1], inputs[2]
            ));
        }
        let cache_len = inputs[3].shape[2];
        let cache = [1, kv_heads, cache_len, dim];
        if inputs[3].shape != cache || inputs[4].shape != cache {
            return Err(format!(
                "k_cache {} and v_cache {} must both be {cache:?}",
                inputs[3], inputs[4]
            ));
        }
        let mask = [1, 1, tokens, cache_len + tokens];
        if let Some(cap) = self.softcap.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(format!("softcap must be a positive number, got {cap}"));
        }
        if inputs[5].shape != mask {
            return Err(format!("mask must be {mask:?}, got {}", inputs[5]));
        }
        Ok(inputs[0].clone())
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        self.eval_with(inputs)
    }
}

impl Attention {
    fn eval_with<'a>(&self, inputs: &[&'a Tensor]) -> Result<Tensor, KernelError> {
        let [_, heads, tokens, dim] = inputs[0].shape().try_into().expect("rank checked");
        let kv_heads = inputs[1].shape()[1];
        let cache_len = inputs[3].shape()[2];
        let group = heads / kv_heads;
        let (q, k, v) = (inputs[0].f32s(), inputs[1].f32s(), inputs[2].f32s());
        let (k_cache, v_cache, mask) = (inputs[3].f32s(), inputs[4].f32s(), inputs[5].f32s());
        let width = cache_len + tokens;

        // The visible columns of each query row, found once for all heads, as
        // runs of consecutive columns that lie all in the cache or all among
        // the new tokens (so each run's keys and values are consecutive rows).
        // A -inf column contributes exp(-inf) = 0 exactly: skipping it is exact.
        let runs: Vec<Vec<(usize, usize)>> = mask
            .chunks_exact(width)
            .map(|row| {
                let mut runs: Vec<(usize, usize)> = Vec::new();
                for (j, &m) in row.iter().enumerate() {
                    if m == f32::NEG_INFINITY {
                        continue;
                    }
                    match runs.last_mut() {
                        Some((_, end)) if *end == j && j != cache_len => *end += 1,
                        _ => runs.push((j, j + 1)),
                    }
                }
                runs
            })
            .collect();
        if let Some(t) = runs.iter().position(Vec::is_empty) {
            return Err(KernelError(format!("mask row {t} hides every key")));
        }

        // Parallel over (head, query row), a few rows per task: a prefill
        // chunk has plenty, and a decode step still spreads its heads.
        let mut out = vec![0f32; heads * tokens * dim];
        out.par_chunks_mut(dim)
            .enumerate()
            .with_min_len(4)
            .for_each(|(row_index, row)| {
                let (h, t) = (row_index / tokens, row_index % tokens);
                let g = h / group;
                // Rows `a..b` of the concatenation [cache; new] for KV head g
                // (a run never straddles the two).
                let rows =
                    |cache: &'a [f32], new: &'a [f32], (a, b): (usize, usize)| -> &'a [f32] {
                        if b <= cache_len {
                            &cache[(g * cache_len + a) * dim..(g * cache_len + b) * dim]
                        } else {
                            let (a, b) = (a - cache_len, b - cache_len);
                            &new[(g * tokens + a) * dim..(g * tokens + b) * dim]
                        }
                    };
                let query = &q[(h * tokens + t) * dim..][..dim];
                let mask_row = &mask[t * width..(t + 1) * width];
                let total: usize = runs[t].iter().map(|(a, b)| b - a).sum();
                let mut scores = vec![0f32; total];
                let mut at = 0;
                for &(a, b) in &runs[t] {
                    let run = &mut scores[at..at + b - a];
                    dot_rows(query, rows(k_cache, k, (a, b)), run);
                    for (s, &m) in run.iter_mut().zip(&mask_row[a..b]) {
                        *s = self.logit(*s, m);
                    }
                    at += b - a;
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = exp(*s - max);
                    sum += *s;
                }
                for s in scores.iter_mut() {
                    *s /= sum;
                }
                let mut at = 0;
                for &(a, b) in &runs[t] {
                    add_weighted_rows(&scores[at..at + b - a], rows(v_cache, v, (a, b)), row);
                    at += b - a;
                }
            });
        Ok(Tensor::from_f32(inputs[0].shape().to_vec(), out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive attention over explicit key/value lists, for comparison.
    fn reference(q: &[f32], keys: &[&[f32]], values: &[&[f32]], scale: f32) -> Vec<f32> {
        let scores: Vec<f32> = keys
            .iter()
            .map(|k| q.iter().zip(*k).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let max = scores.iter().cloned().fold(f32::MIN, f32::max);
        let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let mut out = vec![0.0; q.len()];
        for (e, v) in exps.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(*v) {
                *o += e / sum * x;
            }
        }
        out
    }

    #[test]
    fn attends_to_valid_cache_slots_and_earlier_new_tokens() {
        // 2 query heads sharing 1 KV head; cache of 3 slots with 2 filled; 2 new tokens.
        let dim = 2;
        let q = Tensor::from_f32([1, 2, 2, dim], vec![1., 0., 0., 1., 0.5, 0.5, -1., 2.]);
        let k = Tensor::from_f32([1, 1, 2, dim], vec![0.3, -0.2, 1.0, 1.0]);
        let v = Tensor::from_f32([1, 1, 2, dim], vec![5., 6., 7., 8.]);
        let kc = Tensor::from_f32([1, 1, 3, dim], vec![1., 2., -1., 0.5, 9., 9.]);
        let vc = Tensor::from_f32([1, 1, 3, dim], vec![1., 1., 2., 3., 99., 99.]);
        let inf = f32::NEG_INFINITY;
        #[rustfmt::skip]
        let mask = Tensor::from_f32([1, 1, 2, 5], vec![
            0., 0., inf, 0., inf,
            0., 0., inf, 0., 0.,
        ]);
        let scale = 0.7;
        let out = Attention::scaled(scale)
            .eval(&[&q, &k, &v, &kc, &vc, &mask])
            .unwrap();
        let qs = q.f32s();
        let (k0, k1, kc0, kc1) = (
            &[0.3f32, -0.2][..],
            &[1.0f32, 1.0][..],
            &[1f32, 2.][..],
            &[-1f32, 0.5][..],
        );
        let (v0, v1, vc0, vc1) = (
            &[5f32, 6.][..],
            &[7f32, 8.][..],
            &[1f32, 1.][..],
            &[2f32, 3.][..],
        );
        for h in 0..2 {
            for t in 0..2 {
                let query = &qs[(h * 2 + t) * dim..][..dim];
                let (keys, values): (Vec<&[f32]>, Vec<&[f32]>) = if t == 0 {
                    (vec![kc0, kc1, k0], vec![vc0, vc1, v0])
                } else {
                    (vec![kc0, kc1, k0, k1], vec![vc0, vc1, v0, v1])
                };
                let expected = reference(query, &keys, &values, scale);
                let got = &out.f32s()[(h * 2 + t) * dim..][..dim];
                for (a, b) in got.iter().zip(&expected) {
                    assert!(
                        (a - b).abs() < 1e-6,
                        "head {h} token {t}: {got:?} vs {expected:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_fully_hidden_row_is_an_error() {
        let t = |shape: [usize; 4]| Tensor::from_f32(shape, vec![0.0; shape.iter().product()]);
        let mask = Tensor::from_f32([1, 1, 1, 2], vec![f32::NEG_INFINITY; 2]);
        let err = Attention::scaled(1.0)
            .eval(&[
                &t([1, 1, 1, 2]),
                &t([1, 1, 1, 2]),
                &t([1, 1, 1, 2]),
                &t([1, 1, 1, 2]),
                &t([1, 1, 1, 2]),
                &mask,
            ])
            .unwrap_err();
        assert!(err.0.contains("hides every key"));
    }
}
