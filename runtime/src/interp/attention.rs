//! The interpreter's kernel for the `Attention` op: the same bits as
//! [`Attention::eval`] (the op's reference semantics, which a test compares
//! it with), computed faster for prefill chunks.
//!
//! The op's definition goes one (head, query row) at a time. Here a task
//! takes a block of query rows of one head: their scores against every key
//! any of them sees come from one call of the dot-product tiles (several
//! rows per tile, each score rounded as alone), and the softmax's
//! exponentials are computed as a vector loop, compiled for the CPU's
//! SIMD, before they are summed in the same order as the op sums them.
//!
//! [`Attention::eval`]: crate::ir::ops::Attention

use super::linalg::{add_weighted_rows, dot_rows_of_rows, SharedOut};
use super::math::exp;
use crate::ir::ops::{Attention, KernelError};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Query rows per task (one AVX-512 vector of lanes in the softmax).
const ROWS: usize = 16;

/// Columns `a..b` of a mask row, all in the cache or all among the new
/// tokens.
pub(super) type Run = (usize, usize);

/// The visible columns of each row of an attention mask `[.., T, L + T]`
/// (`L = cache_len`), as runs, found as the op finds them. Every
/// `Attention` node of a model reads one of its one or two masks (global,
/// sliding-window): the interpreter finds each mask's once per run.
pub(super) fn mask_runs(mask: &Tensor, cache_len: usize) -> Result<Vec<Vec<Run>>, KernelError> {
    let width = *mask.shape().last().expect("rank checked");
    let runs: Vec<Vec<Run>> = mask
        .f32s()
        .chunks_exact(width)
        .map(|row| {
            let mut runs: Vec<Run> = Vec::new();
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
    Ok(runs)
}

/// `Attention { scale }` on the op's inputs `[q, k, v, k_cache, v_cache,
/// mask]`, with `runs` the mask's [`mask_runs`].
pub(super) fn attention<'a>(op: &Attention, inputs: &[&'a Tensor], runs: &[Vec<Run>]) -> Tensor {
    let [_, heads, tokens, dim] = inputs[0].shape().try_into().expect("rank checked");
    let kv_heads = inputs[1].shape()[1];
    let cache_len = inputs[3].shape()[2];
    let group = heads / kv_heads;
    let (q, k, v) = (inputs[0].f32s(), inputs[1].f32s(), inputs[2].f32s());
    let (k_cache, v_cache, mask) = (inputs[3].f32s(), inputs[4].f32s(), inputs[5].f32s());
    let width = cache_len + tokens;
    assert_eq!(runs.len(), tokens);

    let mut out = vec![0f32; heads * tokens * dim];
    if dim == 0 {
        return Tensor::from_f32(inputs[0].shape().to_vec(), out);
    }
    let rows_per_task = ROWS.min(tokens).max(1);
    let tasks: Vec<(usize, usize)> = (0..heads)
        .flat_map(|h| (0..tokens).step_by(rows_per_task).map(move |t0| (h, t0)))
        .collect();
    let shared = SharedOut(out.as_mut_ptr(), out.len());
    let shared = &shared;
    tasks.into_par_iter().for_each(|(h, t0)| {
        let t1 = (t0 + rows_per_task).min(tokens);
        let g = h / group;
        // Rows `a..b` of the concatenation [cache; new] for KV head g (a
        // run never straddles the two).
        let rows = |cache: &'a [f32], new: &'a [f32], (a, b): Run| -> &'a [f32] {
            if b <= cache_len {
                &cache[(g * cache_len + a) * dim..(g * cache_len + b) * dim]
            } else {
                let (a, b) = (a - cache_len, b - cache_len);
                &new[(g * tokens + a) * dim..(g * tokens + b) * dim]
            }
        };
        let union = union(&runs[t0..t1], cache_len);
        let m = t1 - t0;
        let queries = &q[(h * tokens + t0) * dim..(h * tokens + t1) * dim];
        // scores[at·m + i]: row t0 + i against the union's key `at`.
        let total: usize = union.iter().map(|(a, b)| b - a).sum();
        let mut scores = vec![0f32; total * m];
        let mut at = 0;
        for &(a, b) in &union {
            dot_rows_of_rows(
                queries,
                rows(k_cache, k, (a, b)),
                dim,
                &mut scores[at * m..(at + b - a) * m],
            );
            at += b - a;
        }
        // SAFETY: this task alone writes rows t0..t1 of head h.
        let out = unsafe { &mut shared.slice()[(h * tokens + t0) * dim..(h * tokens + t1) * dim] };
        let block = Block {
            scores: &scores,
            union: &union,
            runs: &runs[t0..t1],
            mask: &mask[t0 * width..t1 * width],
            op,
        };
        let values = |run: Run| rows(v_cache, v, run);
        // A decode step's single row takes one lane, not a vector of them.
        if m == 1 {
            block.finish::<1>(&values, out);
        } else {
            block.finish::<ROWS>(&values, out);
        }
    });
    Tensor::from_f32(inputs[0].shape().to_vec(), out)
}

/// The rows of one task after their scores: the softmax and the weighted
/// sum of the values.
struct Block<'a> {
    /// `scores[j·m + i]`: row `i` against the union's key `j`.
    scores: &'a [f32],
    union: &'a [Run],
    /// Each row's visible columns (`m` rows).
    runs: &'a [Vec<Run>],
    /// The rows of the mask.
    mask: &'a [f32],
    op: &'a Attention,
}

impl Block<'_> {
    /// Writes the rows' outputs to `out` (`m` rows); `values(run)` are the
    /// value rows of a run of columns. `L ≥ m` lanes.
    fn finish<'v, const L: usize>(&self, values: &dyn Fn(Run) -> &'v [f32], out: &mut [f32]) {
        let m = self.runs.len();
        let (width, dim) = (self.mask.len() / m, out.len() / m);
        let total = self.scores.len() / m;
        // The rows side by side, a lane each: row i's logit for the union's
        // key j in logits[j][i], if it sees that key.
        let mut logits = vec![[0f32; L]; total];
        let mut keep = vec![[0f32; L]; total];
        // Where each row's runs start among the union's keys.
        let mut offsets: Vec<Vec<usize>> = Vec::with_capacity(m);
        for (i, runs) in self.runs.iter().enumerate() {
            let mask_row = &self.mask[i * width..(i + 1) * width];
            let mut row_offsets = Vec::with_capacity(runs.len());
            let (mut u, mut base) = (0, 0);
            for &(a, b) in runs {
                // The union's run holding this one.
                while self.union[u].1 < b {
                    base += self.union[u].1 - self.union[u].0;
                    u += 1;
                }
                let offset = base + a - self.union[u].0;
                row_offsets.push(offset);
                for (j, &mm) in (offset..offset + b - a).zip(&mask_row[a..b]) {
                    logits[j][i] = self.op.logit(self.scores[j * m + i], mm);
                    keep[j][i] = 1.0;
                }
            }
            offsets.push(row_offsets);
        }
        softmax(&mut logits, &keep);
        let mut weights = Vec::with_capacity(total);
        for (i, (runs, row)) in self.runs.iter().zip(out.chunks_exact_mut(dim)).enumerate() {
            for (&(a, b), &offset) in runs.iter().zip(&offsets[i]) {
                weights.clear();
                weights.extend(logits[offset..offset + b - a].iter().map(|lanes| lanes[i]));
                add_weighted_rows(&weights, values((a, b)), row);
            }
        }
    }
}

/// The sorted union of several rows' runs, as runs that never straddle the
/// cache and the new tokens (each row's runs lie within them).
fn union(rows: &[Vec<Run>], cache_len: usize) -> Vec<Run> {
    let mut all: Vec<Run> = rows.iter().flatten().copied().collect();
    all.sort_unstable();
    let mut union: Vec<Run> = Vec::with_capacity(all.len());
    for (a, b) in all {
        match union.last_mut() {
            Some((_, end)) if a <= *end && (a != cache_len || *end != cache_len) => {
                *end = (*end).max(b)
            }
            _ => union.push((a, b)),
        }
    }
    union
}

/// Each lane's softmax over its logits where `keep` is 1 (0 elsewhere),
/// rounded as the op rounds a row's: the exponentials are independent, and
/// each lane's sum goes in key order (adding the zeros changes nothing).
/// Vector operations across the lanes (or the keys, with one lane),
/// compiled for the CPU's SIMD.
fn softmax<const L: usize>(logits: &mut [[f32; L]], keep: &[[f32; L]]) {
    #[inline(always)]
    fn body<const L: usize>(logits: &mut [[f32; L]], keep: &[[f32; L]]) {
        let mut max = [f32::NEG_INFINITY; L];
        for (l, k) in logits.iter().zip(keep) {
            for i in 0..L {
                let x = if k[i] != 0.0 { l[i] } else { f32::NEG_INFINITY };
                max[i] = max[i].max(x);
            }
        }
        for (l, k) in logits.iter_mut().zip(keep) {
            for i in 0..L {
                // × 1 is exact; × 0 clears a hidden key (exp is finite).
                l[i] = exp(l[i] - max[i]) * k[i];
            }
        }
        let mut sum = [0f32; L];
        for l in logits.iter() {
            for i in 0..L {
                sum[i] += l[i];
            }
        }
        for l in logits.iter_mut() {
            for i in 0..L {
                l[i] /= sum[i];
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512<const L: usize>(logits: &mut [[f32; L]], keep: &[[f32; L]]) {
            body(logits, keep)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<const L: usize>(logits: &mut [[f32; L]], keep: &[[f32; L]]) {
            body(logits, keep)
        }
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { avx512(logits, keep) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { avx2(logits, keep) };
        }
    }
    body(logits, keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ops::OpSpec;

    fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// Runs both on random q/k/v/caches with `mask` (`[tokens, cache + tokens]`).
    fn same_bits(heads: usize, kv_heads: usize, dim: usize, cache: usize, mask: Vec<f32>) {
        let tokens = (0..).find(|t| t * (cache + t) >= mask.len()).unwrap();
        assert_eq!(tokens * (cache + tokens), mask.len());
        let t = |shape: [usize; 4], seed| {
            Tensor::from_f32(shape, pseudo_random(shape.iter().product(), seed))
        };
        let inputs = [
            t([1, heads, tokens, dim], 1),
            t([1, kv_heads, tokens, dim], 2),
            t([1, kv_heads, tokens, dim], 3),
            t([1, kv_heads, cache, dim], 4),
            t([1, kv_heads, cache, dim], 5),
            Tensor::from_f32([1, 1, tokens, cache + tokens], mask),
        ];
        let args: Vec<&Tensor> = inputs.iter().collect();
        let scale = 0.37;
        let op = Attention::scaled(scale);
        let want = op.eval(&args).unwrap();
        let runs = mask_runs(&inputs[5], cache).unwrap();
        let got = attention(&op, &args, &runs);
        assert_eq!(got.shape(), want.shape());
        assert_eq!(
            got.f32s(),
            want.f32s(),
            "heads {heads}/{kv_heads}, dim {dim}, cache {cache}, tokens {tokens}"
        );
    }

    /// The session's mask: `past` cache slots, causal new tokens, the rows
    /// past `valid` padding that see only themselves.
    fn causal(cache: usize, tokens: usize, past: usize, valid: usize) -> Vec<f32> {
        let width = cache + tokens;
        let mut mask = vec![f32::NEG_INFINITY; tokens * width];
        for t in 0..tokens {
            let row = &mut mask[t * width..(t + 1) * width];
            if t < valid {
                row[..past].fill(0.0);
                row[cache..=cache + t].fill(0.0);
            } else {
                row[cache + t] = 0.0;
            }
        }
        mask
    }

    #[test]
    fn equals_the_ops_evaluation() {
        // Prefill chunks (more rows than a task takes, padding), a decode
        // step, head sizes with and without a tail past whole vectors.
        same_bits(4, 2, 64, 12, causal(12, 19, 5, 17));
        same_bits(3, 1, 20, 30, causal(30, 7, 0, 7));
        same_bits(6, 3, 80, 40, causal(40, 1, 33, 1));
        same_bits(2, 2, 16, 0, causal(0, 33, 0, 33));
        // Any mask: holes, finite additive values, keys seen by later rows only.
        let (cache, tokens) = (9, 18);
        let mut mask = pseudo_random(tokens * (cache + tokens), 9);
        for (i, m) in mask.iter_mut().enumerate() {
            if (i * 7) % 5 == 0 || (i % (cache + tokens) > cache + i / (cache + tokens)) {
                *m = f32::NEG_INFINITY;
            }
        }
        same_bits(4, 4, 32, cache, mask);
    }

    #[test]
    fn a_fully_hidden_row_is_an_error() {
        let mask = Tensor::from_f32([1, 1, 2, 3], {
            let inf = f32::NEG_INFINITY;
            vec![0.0, inf, inf, inf, inf, inf]
        });
        let err = mask_runs(&mask, 1).unwrap_err();
        assert!(err.0.contains("mask row 1 hides every key"), "{err}");
    }
}
