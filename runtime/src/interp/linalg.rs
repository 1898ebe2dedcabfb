//! The interpreter's numeric building blocks: a dot product and
//! `x · Wᵀ` for Hugging Face's `[out, in]` weight layout.
//!
//! A product with a few rows of `x` (a decode step) is bound by reading the
//! weights once: Kiln's own SIMD dot-product tiles do it, parallel over
//! blocks of weight rows. A product with many rows (a prefill chunk) is bound
//! by arithmetic and goes to the `gemm` crate's packed kernels.
//!
//! Either way each output element is reduced in an order that does not
//! depend on the thread count, so results do not depend on `--threads`.

use rayon::prelude::*;

/// SIMD width the kernels are written for (one AVX2 / two NEON registers).
const LANES: usize = 8;

/// Rows of `W` per parallel task: 64 rows of a 4096-wide layer are 1 MiB.
const ROWS_PER_TASK: usize = 64;

/// Up to this many rows of `x`, `x · Wᵀ` takes the matrix-vector path.
const SMALL_M: usize = 4;

/// A vector of f32 lanes and the operations the kernels need. Lane `l`
/// accumulates the products at `k ≡ l (mod N)`; `sum` reduces the lanes in a
/// fixed tree. (The 8-lane implementations share one tree, so they agree
/// bit for bit; AVX-512's 16 lanes round differently, by an ulp or so.)
trait Lanes: Copy {
    const N: usize;
    fn zero() -> Self;
    /// Loads `N` values from the front of `v`.
    fn load(v: &[f32]) -> Self;
    /// `self + a·b`
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn sum(self) -> f32;
    /// `acc + a·b` on scalars, matching `mul_add`'s rounding.
    fn scalar_mul_add(a: f32, b: f32, acc: f32) -> f32;
}

/// Portable fallback: separate multiply and add.
#[derive(Clone, Copy)]
struct Portable([f32; LANES]);

impl Lanes for Portable {
    const N: usize = LANES;
    #[inline(always)]
    fn zero() -> Self {
        Portable([0.0; LANES])
    }
    #[inline(always)]
    fn load(v: &[f32]) -> Self {
        Portable(v[..LANES].try_into().unwrap())
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        Portable(std::array::from_fn(|l| self.0[l] + a.0[l] * b.0[l]))
    }
    #[inline(always)]
    fn sum(self) -> f32 {
        let v = self.0;
        let a = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
        (a[0] + a[2]) + (a[1] + a[3])
    }
    #[inline(always)]
    fn scalar_mul_add(a: f32, b: f32, acc: f32) -> f32 {
        acc + a * b
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Lanes, LANES};
    use std::arch::x86_64::*;

    /// AVX2 + FMA: one 256-bit register. Only constructed inside functions
    /// compiled with those features, after checking the CPU has them.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2Fma(__m256);

    impl Lanes for Avx2Fma {
        const N: usize = LANES;
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY (all methods): only called from `#[target_feature(enable = "avx2,fma")]` code.
            unsafe { Avx2Fma(_mm256_setzero_ps()) }
        }
        #[inline(always)]
        fn load(v: &[f32]) -> Self {
            assert!(v.len() >= LANES);
            unsafe { Avx2Fma(_mm256_loadu_ps(v.as_ptr())) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { Avx2Fma(_mm256_fmadd_ps(a.0, b.0, self.0)) }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            unsafe {
                // [v0+v4, v1+v5, v2+v6, v3+v7] → (a0+a2, a1+a3) → total
                let a = _mm_add_ps(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps(self.0, 1),
                );
                let b = _mm_add_ps(a, _mm_movehl_ps(a, a));
                _mm_cvtss_f32(_mm_add_ss(b, _mm_shuffle_ps(b, b, 1)))
            }
        }
        #[inline(always)]
        fn scalar_mul_add(a: f32, b: f32, acc: f32) -> f32 {
            unsafe { _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(acc))) }
        }
    }

    /// AVX-512F: one 512-bit register of 16 lanes. Only constructed inside
    /// functions compiled with AVX-512F, after checking the CPU has it.
    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

    impl Lanes for Avx512 {
        const N: usize = 16;
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY (all methods): only called from `#[target_feature(enable = "avx512f,avx2,fma")]` code.
            unsafe { Avx512(_mm512_setzero_ps()) }
        }
        #[inline(always)]
        fn load(v: &[f32]) -> Self {
            assert!(v.len() >= 16);
            unsafe { Avx512(_mm512_loadu_ps(v.as_ptr())) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { Avx512(_mm512_fmadd_ps(a.0, b.0, self.0)) }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            unsafe {
                let lo = _mm512_castps512_ps256(self.0);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(self.0), 1));
                Avx2Fma(_mm256_add_ps(lo, hi)).sum()
            }
        }
        #[inline(always)]
        fn scalar_mul_add(a: f32, b: f32, acc: f32) -> f32 {
            Avx2Fma::scalar_mul_add(a, b, acc)
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{Lanes, LANES};
    use std::arch::aarch64::*;

    /// NEON (baseline on aarch64): two 128-bit registers, lanes 0–3 and 4–7.
    #[derive(Clone, Copy)]
    pub(super) struct Neon(float32x4_t, float32x4_t);

    impl Lanes for Neon {
        const N: usize = LANES;
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY (all methods): NEON is always present on aarch64.
            unsafe { Neon(vdupq_n_f32(0.0), vdupq_n_f32(0.0)) }
        }
        #[inline(always)]
        fn load(v: &[f32]) -> Self {
            assert!(v.len() >= LANES);
            unsafe { Neon(vld1q_f32(v.as_ptr()), vld1q_f32(v.as_ptr().add(4))) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { Neon(vfmaq_f32(self.0, a.0, b.0), vfmaq_f32(self.1, a.1, b.1)) }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            unsafe {
                let a = vaddq_f32(self.0, self.1);
                let (a0, a1, a2, a3) = (
                    vgetq_lane_f32(a, 0),
                    vgetq_lane_f32(a, 1),
                    vgetq_lane_f32(a, 2),
                    vgetq_lane_f32(a, 3),
                );
                (a0 + a2) + (a1 + a3)
            }
        }
        #[inline(always)]
        fn scalar_mul_add(a: f32, b: f32, acc: f32) -> f32 {
            a.mul_add(b, acc)
        }
    }
}

/// Sums the lanes of `acc[i][j]` and adds the products past the last whole
/// vector, completing `x[i] · w[j]`.
#[inline(always)]
fn finish<V: Lanes, const MX: usize, const NW: usize>(
    acc: [[V; NW]; MX],
    x: [&[f32]; MX],
    w: [&[f32]; NW],
) -> [[f32; NW]; MX] {
    let k = x[0].len();
    let body = k / V::N * V::N;
    std::array::from_fn(|i| {
        std::array::from_fn(|j| {
            let mut tail = 0f32;
            for p in body..k {
                tail = V::scalar_mul_add(x[i][p], w[j][p], tail);
            }
            acc[i][j].sum() + tail
        })
    })
}

/// Dot products of `MX` rows of x with `NW` rows of W:
/// `out[i][j] = x[i] · w[j]`, with `MX·NW` vector accumulators.
#[inline(always)]
fn tile<V: Lanes, const MX: usize, const NW: usize>(
    x: [&[f32]; MX],
    w: [&[f32]; NW],
) -> [[f32; NW]; MX] {
    let body = x[0].len() / V::N * V::N;
    let mut acc = [[V::zero(); NW]; MX];
    let mut at = 0;
    while at < body {
        let xs: [V; MX] = std::array::from_fn(|i| V::load(&x[i][at..]));
        for j in 0..NW {
            let wv = V::load(&w[j][at..]);
            for i in 0..MX {
                acc[i][j] = acc[i][j].mul_add(xs[i], wv);
            }
        }
        at += V::N;
    }
    finish(acc, x, w)
}

/// `out[j·m + i] = x[i] · w[j]` for `w` holding whole rows of length `k`
/// (output transposed: one contiguous run of `m` values per weight row).
/// `MX × NW` is the register tile: 3 × 4 accumulators + 3 x vectors + 1 w
/// vector fill AVX2's 16 registers; AVX-512 has 32.
#[inline(always)]
fn block<V: Lanes, const MX: usize, const NW: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let m = x.len() / k;
    let n = w.len() / k;
    let xr = |i: usize| &x[i * k..(i + 1) * k];
    let wr = |j: usize| &w[j * k..(j + 1) * k];
    let mut store = |i: usize, j: usize, values: &[f32]| {
        for (dj, &v) in values.iter().enumerate() {
            out[(j + dj) * m + i] = v;
        }
    };
    let (full_m, full_n) = (m / MX * MX, n / NW * NW);
    for j in (0..full_n).step_by(NW) {
        let ws: [&[f32]; NW] = std::array::from_fn(|d| wr(j + d));
        for i in (0..full_m).step_by(MX) {
            let t = tile::<V, MX, NW>(std::array::from_fn(|d| xr(i + d)), ws);
            for (di, row) in t.iter().enumerate() {
                store(i + di, j, row);
            }
        }
        for i in full_m..m {
            store(i, j, &tile::<V, 1, NW>([xr(i)], ws)[0]);
        }
    }
    for j in full_n..n {
        for i in 0..m {
            store(i, j, &tile::<V, 1, 1>([xr(i)], [wr(j)])[0]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2_fma(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    block::<avx2::Avx2Fma, 3, 4>(x, w, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block_avx512(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    block::<avx2::Avx512, 4, 4>(x, w, k, out)
}

fn block_dispatch(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (and so AVX2 and FMA).
            return unsafe { block_avx512(x, w, k, out) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { block_avx2_fma(x, w, k, out) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        block::<neon::Neon, 3, 4>(x, w, k, out)
    }
    #[cfg(not(target_arch = "aarch64"))]
    block::<Portable, 3, 4>(x, w, k, out)
}

/// `Σ a[i]·b[i]` over equal-length slices, with the same kernel as the matmuls.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut out = [0f32];
    block_dispatch(a, b, a.len(), &mut out);
    out[0]
}

/// `x [m, k] · w[n, k]ᵀ → [m, n]`, row-major.
pub fn matmul_transposed(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    if k == 0 {
        return vec![0.0; m * n];
    }
    if m > SMALL_M {
        return gemm_transposed(x, w, m, k, n);
    }
    // Compute [n, m], one task per block of weight rows, so each weight row
    // is read from memory once; then transpose.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .zip(w.par_chunks(ROWS_PER_TASK * k))
        .for_each(|(out_rows, w_rows)| block_dispatch(x, w_rows, k, out_rows));
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for (j, row) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

fn gemm_transposed(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the pointers cover m·n, m·k and n·k elements (asserted by the
    // caller), and the strides describe row-major out and x and the
    // transposed view of row-major w.
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
    fn every_tile_shape_matches_a_naive_product() {
        for &(m, k, n) in &[
            (1, 37, 50),
            (3, 64, 17),
            (9, 70, 33),
            (64, 128, 131),
            (5, 3, 1),
        ] {
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
        let (m, k, n) = (13, 96, 300);
        let x = pseudo_random(m * k, 3);
        let w = pseudo_random(n * k, 4);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| matmul_transposed(&x, &w, m, k, n))
        };
        let all = run(1);
        assert_eq!(all, run(2));
        assert_eq!(all, run(3));
        // The matrix-vector path too, and `dot` agrees with it bit for bit.
        let row = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| matmul_transposed(&x[5 * k..6 * k], &w, 1, k, n))
        };
        let single = row(1);
        assert_eq!(single, row(2));
        assert_eq!(dot(&x[5 * k..6 * k], &w[7 * k..8 * k]), single[7]);
    }
}
