//! The interpreter's numeric building blocks: a dot product and
//! `x · Wᵀ` for Hugging Face's `[out, in]` weight layout.
//!
//! Every output element is reduced in one fixed order whatever the thread
//! count, so the interpreter's results do not depend on `--threads`.

use rayon::prelude::*;

/// Rows of `W` handled by one task in the matrix-vector path.
const ROWS_PER_TASK: usize = 16;

/// Up to this many rows of `x`, `x · Wᵀ` is a few matrix-vector products:
/// each weight row is read once and stays in cache for every row of `x`.
const SMALL_M: usize = 4;

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    // 16 independent partial sums let the compiler keep two SIMD registers
    // of accumulators without reassociating (which it may not do for floats).
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_body, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_body, b_tail) = b.split_at(a_body.len());
    for (ca, cb) in a_body.chunks_exact(LANES).zip(b_body.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in a_tail.iter().zip(b_tail) {
        tail += x * y;
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0] + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// `Σ a[i]·b[i]` over the shorter of the two slices' common length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_lanes(a, b)
}

/// `x [m, k] · w[n, k]ᵀ → [m, n]`, row-major.
pub fn matmul_transposed(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    if m <= SMALL_M {
        // Compute [n, m] (one task per block of weight rows), then transpose.
        let mut out_t = vec![0f32; n * m];
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m)
            .zip(w.par_chunks(ROWS_PER_TASK * k))
            .for_each(|(out_rows, w_rows)| {
                for (out_row, w_row) in out_rows.chunks_exact_mut(m).zip(w_rows.chunks_exact(k)) {
                    for (i, o) in out_row.iter_mut().enumerate() {
                        *o = dot(&x[i * k..(i + 1) * k], w_row);
                    }
                }
            });
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; m * n];
        for (j, row) in out_t.chunks_exact(m).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                out[i * n + j] = v;
            }
        }
        return out;
    }
    let mut out = vec![0f32; m * n];
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the pointers cover m·n, m·k and n·k elements (asserted above),
    // and the strides describe row-major out/x and the transposed view of w.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn both_paths_match_a_naive_product() {
        for &(m, k, n) in &[(1, 37, 50), (3, 64, 17), (9, 70, 33), (64, 128, 96)] {
            let x = pseudo_random(m * k, 1);
            let w = pseudo_random(n * k, 2);
            let got = matmul_transposed(&x, &w, m, k, n);
            let want = naive(&x, &w, m, k, n);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "m={m} k={k} n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (m, k, n) = (40, 96, 130);
        let x = pseudo_random(m * k, 3);
        let w = pseudo_random(n * k, 4);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                (
                    matmul_transposed(&x, &w, m, k, n),
                    matmul_transposed(&x[..k], &w, 1, k, n),
                )
            })
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(3));
    }
}
