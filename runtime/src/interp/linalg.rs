//! The interpreter's numeric building blocks: a dot product and
//! `x · Wᵀ` for Hugging Face's `[out, in]` weight layout.
//!
//! A product with a few rows of `x` (a decode step) is bound by reading the
//! weights once: SIMD dot-product tiles do it, parallel over blocks of weight
//! rows. A product with many rows (a prefill chunk) is bound by arithmetic:
//! weight rows are packed into column panels and a register-blocked
//! micro-kernel broadcasts x against them, as BLAS libraries do. (Kiln's own
//! kernels beat the `gemm` crate's on the shapes of small LLMs on these
//! machines; `examples/matmul_probe.rs` measures both.)
//!
//! Either way each output element is reduced in an order that does not
//! depend on the thread count, so results do not depend on `--threads`.

use crate::ir::quant::WeightQuant;
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
    /// Every lane set to `v`.
    fn splat(v: f32) -> Self;
    /// Stores the lanes to the front of `out`.
    fn store(self, out: &mut [f32]);
    /// `self + a·b`
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// `self·b`
    fn mul(self, b: Self) -> Self;
    fn sum(self) -> f32;
    /// `acc + a·b` on scalars, matching `mul_add`'s rounding.
    fn scalar_mul_add(a: f32, b: f32, acc: f32) -> f32;
    /// `N` signed bytes from the front of `q`, as f32 lanes.
    fn load_i8(q: &[u8]) -> Self;
    /// `N` bytes from the front of `q`, each holding two 4-bit values: the
    /// low nibbles and the high nibbles, as f32 lanes.
    fn load_u4(q: &[u8]) -> (Self, Self);
    /// Starts fetching the cache line at `p` towards L2 (a hint: nothing
    /// where the CPU has no such instruction).
    #[inline(always)]
    fn prefetch(_p: *const f32) {}
    /// The same, towards L1.
    #[inline(always)]
    fn prefetch_l1(_p: *const f32) {}
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
    fn splat(v: f32) -> Self {
        Portable([v; LANES])
    }
    #[inline(always)]
    fn store(self, out: &mut [f32]) {
        out[..LANES].copy_from_slice(&self.0);
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        Portable(std::array::from_fn(|l| self.0[l] + a.0[l] * b.0[l]))
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        Portable(std::array::from_fn(|l| self.0[l] * b.0[l]))
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
    #[inline(always)]
    fn load_i8(q: &[u8]) -> Self {
        Portable(std::array::from_fn(|l| q[l] as i8 as f32))
    }
    #[inline(always)]
    fn load_u4(q: &[u8]) -> (Self, Self) {
        (
            Portable(std::array::from_fn(|l| (q[l] & 0x0f) as f32)),
            Portable(std::array::from_fn(|l| (q[l] >> 4) as f32)),
        )
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
        fn splat(v: f32) -> Self {
            unsafe { Avx2Fma(_mm256_set1_ps(v)) }
        }
        #[inline(always)]
        fn store(self, out: &mut [f32]) {
            assert!(out.len() >= LANES);
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { Avx2Fma(_mm256_fmadd_ps(a.0, b.0, self.0)) }
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            unsafe { Avx2Fma(_mm256_mul_ps(self.0, b.0)) }
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
        #[inline(always)]
        fn load_i8(q: &[u8]) -> Self {
            assert!(q.len() >= LANES);
            unsafe {
                let bytes = _mm_loadl_epi64(q.as_ptr().cast());
                Avx2Fma(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)))
            }
        }
        #[inline(always)]
        fn load_u4(q: &[u8]) -> (Self, Self) {
            assert!(q.len() >= LANES);
            unsafe {
                let bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.as_ptr().cast()));
                let low = _mm256_and_si256(bytes, _mm256_set1_epi32(0x0f));
                let high = _mm256_srli_epi32::<4>(bytes);
                (
                    Avx2Fma(_mm256_cvtepi32_ps(low)),
                    Avx2Fma(_mm256_cvtepi32_ps(high)),
                )
            }
        }
        #[inline(always)]
        fn prefetch(p: *const f32) {
            // A prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
        #[inline(always)]
        fn prefetch_l1(p: *const f32) {
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
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
        fn splat(v: f32) -> Self {
            unsafe { Avx512(_mm512_set1_ps(v)) }
        }
        #[inline(always)]
        fn store(self, out: &mut [f32]) {
            assert!(out.len() >= 16);
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { Avx512(_mm512_fmadd_ps(a.0, b.0, self.0)) }
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            unsafe { Avx512(_mm512_mul_ps(self.0, b.0)) }
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
        #[inline(always)]
        fn load_i8(q: &[u8]) -> Self {
            assert!(q.len() >= 16);
            unsafe {
                let bytes = _mm_loadu_si128(q.as_ptr().cast());
                Avx512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)))
            }
        }
        #[inline(always)]
        fn load_u4(q: &[u8]) -> (Self, Self) {
            assert!(q.len() >= 16);
            unsafe {
                let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.as_ptr().cast()));
                let low = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0f));
                let high = _mm512_srli_epi32::<4>(bytes);
                (
                    Avx512(_mm512_cvtepi32_ps(low)),
                    Avx512(_mm512_cvtepi32_ps(high)),
                )
            }
        }
        #[inline(always)]
        fn prefetch(p: *const f32) {
            Avx2Fma::prefetch(p)
        }
        #[inline(always)]
        fn prefetch_l1(p: *const f32) {
            Avx2Fma::prefetch_l1(p)
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
        fn splat(v: f32) -> Self {
            unsafe { Neon(vdupq_n_f32(v), vdupq_n_f32(v)) }
        }
        #[inline(always)]
        fn store(self, out: &mut [f32]) {
            assert!(out.len() >= LANES);
            unsafe {
                vst1q_f32(out.as_mut_ptr(), self.0);
                vst1q_f32(out.as_mut_ptr().add(4), self.1);
            }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { Neon(vfmaq_f32(self.0, a.0, b.0), vfmaq_f32(self.1, a.1, b.1)) }
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            unsafe { Neon(vmulq_f32(self.0, b.0), vmulq_f32(self.1, b.1)) }
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
        #[inline(always)]
        fn load_i8(q: &[u8]) -> Self {
            assert!(q.len() >= LANES);
            unsafe {
                let wide = vmovl_s8(vld1_s8(q.as_ptr().cast()));
                Neon(
                    vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide))),
                    vcvtq_f32_s32(vmovl_high_s16(wide)),
                )
            }
        }
        #[inline(always)]
        fn load_u4(q: &[u8]) -> (Self, Self) {
            assert!(q.len() >= LANES);
            unsafe {
                let bytes = vld1_u8(q.as_ptr());
                let half = |b: uint8x8_t| {
                    let wide = vmovl_u8(b);
                    Neon(
                        vcvtq_f32_u32(vmovl_u16(vget_low_u16(wide))),
                        vcvtq_f32_u32(vmovl_high_u16(wide)),
                    )
                };
                (
                    half(vand_u8(bytes, vdup_n_u8(0x0f))),
                    half(vshr_n_u8::<4>(bytes)),
                )
            }
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

/// `out[j] = x · rows[j]` for consecutive rows of length `x.len()`, rounded
/// exactly as [`dot`] rounds each (attention scores against a run of keys).
pub fn dot_rows(x: &[f32], rows: &[f32], out: &mut [f32]) {
    assert_eq!(rows.len(), out.len() * x.len());
    if !x.is_empty() {
        block_dispatch(x, rows, x.len(), out);
    }
}

/// `out[j·m + i] = x[i] · rows[j]` for the `m` rows of `x` (each `k` long)
/// and consecutive rows of length `k`: several queries' attention scores
/// against a run of keys, each rounded exactly as [`dot`] rounds it.
pub fn dot_rows_of_rows(x: &[f32], rows: &[f32], k: usize, out: &mut [f32]) {
    assert!(k > 0 && x.len().is_multiple_of(k) && rows.len().is_multiple_of(k));
    assert_eq!(out.len(), x.len() / k * (rows.len() / k));
    block_dispatch(x, rows, k, out);
}

/// `out += Σ_j weights[j] · rows[j]` over consecutive rows of `out.len()`
/// values, in order (attention's weighted sum of values).
pub fn add_weighted_rows(weights: &[f32], rows: &[f32], out: &mut [f32]) {
    assert_eq!(rows.len(), weights.len() * out.len());
    #[inline(always)]
    fn body(weights: &[f32], rows: &[f32], out: &mut [f32]) {
        const BLOCK: usize = 64;
        let d = out.len();
        if d == 0 {
            return;
        }
        // Blocks of 64 columns stay in registers over all the rows (a head
        // is 64 or 128 wide), instead of a load and a store per row: the
        // same operations on each element, in the same order.
        let blocks = d / BLOCK * BLOCK;
        for start in (0..blocks).step_by(BLOCK) {
            let out = &mut out[start..start + BLOCK];
            let mut acc: [f32; BLOCK] = (&*out).try_into().expect("a block");
            for (&w, row) in weights.iter().zip(rows.chunks_exact(d)) {
                let row: &[f32; BLOCK] = row[start..start + BLOCK].try_into().expect("a block");
                for (o, &x) in acc.iter_mut().zip(row) {
                    *o += w * x;
                }
            }
            out.copy_from_slice(&acc);
        }
        for (&w, row) in weights.iter().zip(rows.chunks_exact(d)) {
            for (o, &x) in out[blocks..].iter_mut().zip(&row[blocks..]) {
                *o += w * x;
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(weights: &[f32], rows: &[f32], out: &mut [f32]) {
            body(weights, rows, out)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(weights: &[f32], rows: &[f32], out: &mut [f32]) {
            body(weights, rows, out)
        }
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { avx512(weights, rows, out) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { avx2(weights, rows, out) };
        }
    }
    body(weights, rows, out)
}

/// `Σ a[i]·b[i]` over equal-length slices, rounded as the matrix-vector
/// path rounds it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut out = [0f32];
    block_dispatch(a, b, a.len(), &mut out);
    out[0]
}

/// `x [m, k] · w[n, k]ᵀ → [m, n]`, row-major, for weights that are not
/// packed (see [`PackedMatrix`] for the ones that are).
pub fn matmul_transposed(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    if k == 0 {
        return vec![0.0; m * n];
    }
    if m > SMALL_M {
        return PackedMatrix::new(w, n, k).matmul(x, m);
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

/// Widest panel (`NV · lanes` columns) any kernel uses: AVX-512's 3 × 16.
const MAX_WIDTH: usize = 48;

/// The packed kernels: the panel width is `NV` vectors of lanes. AVX-512
/// takes 3 vectors (8 rows × 3 accumulators + 3 panel vectors + 1
/// broadcast of its 32 registers, and 8 rows divide prefill lengths); the
/// 8-lane kernels 2 (6 rows × 2 + 2 + 1 of AVX2's 16 registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "aarch64")]
    Neon,
    #[cfg_attr(target_arch = "aarch64", allow(dead_code))]
    Portable,
}

impl Kernel {
    /// The widest this CPU runs.
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if Kernel::Avx512.supported() {
                return Kernel::Avx512;
            }
            if Kernel::Avx2.supported() {
                return Kernel::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        return Kernel::Neon;
        #[cfg(not(target_arch = "aarch64"))]
        Kernel::Portable
    }

    fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => std::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => true,
            Kernel::Portable => true,
        }
    }

    /// Columns per panel.
    fn width(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => 3 * 16,
            _ => 2 * LANES,
        }
    }
}

/// Whether this CPU's packed kernels round each product-sum once (fused
/// multiply-add), as the quantized ops' scalar references do; only the
/// portable fallback does not.
pub fn kernels_fuse_multiply_add() -> bool {
    Kernel::detect() != Kernel::Portable
}

/// A weight matrix `W [n, k]` rearranged for `x · Wᵀ`: column panels of
/// `width` weight rows, each laid out `[k][width]` (rows past `n` are
/// zero). A micro-kernel then broadcasts one element of x against a whole
/// panel row, reading the panel as one sequential stream; this is how BLAS
/// libraries pack their operands, done once when the weights load.
///
/// The elements are f32, or quantized (see [`crate::ir::quant`]): i8, or u4
/// with rows `k` and `k + 1` of a column in one byte (low nibble first),
/// each group's scales and (where the scheme has an offset) mins beside
/// the panel. A decode step dequantizes a panel row in registers, `w =
/// fma(q, scale, min)`, and uses it as an f32 one: the same sums, reading 1
/// or ½ byte per weight instead of 4. A prefill dequantizes a chunk of a
/// panel once, into L1, for all its rows of x.
///
/// Every output element is a plain sequential sum over `k`, whatever the
/// number of rows of x or threads: prefill and decode agree bit for bit.
pub struct PackedMatrix {
    n: usize,
    k: usize,
    /// The kernel the panels are laid out for (the CPU supports it).
    kernel: Kernel,
    width: usize,
    panels: Panels,
}

enum Panels {
    /// `[panel][k][width]` f32.
    F32(PanelMemory),
    /// `[panel][k][width]` i8 bytes, or `[panel][k / 2][width]` u4 pairs;
    /// `scales` is `[panel][group][scale, min][width]` f32, or
    /// `[panel][group][scale][width]` for a scheme without an offset (see
    /// [`scale_rows`]).
    Quant {
        scheme: WeightQuant,
        q: PanelMemory,
        scales: PanelMemory,
    },
}

/// One panel of a matrix, as a micro-kernel reads it.
#[derive(Clone, Copy)]
enum Panel<'a> {
    /// Past the last panel, or no second matrix.
    None,
    F32(&'a [f32]),
    Quant {
        scheme: WeightQuant,
        q: &'a [u8],
        scales: &'a [f32],
    },
}

impl<'a> Panel<'a> {
    /// The panel's bytes, for prefetching.
    fn bytes(self) -> &'a [u8] {
        match self {
            Panel::None => &[],
            Panel::F32(p) => bytemuck::cast_slice(p),
            Panel::Quant { q, .. } => q,
        }
    }
}

/// Page-aligned anonymous memory for the panels, on huge pages where the
/// kernel grants them: a decode step streams every weight once, and 2 MiB
/// pages spare it a TLB miss every 4 KiB.
struct PanelMemory {
    map: memmap2::MmapMut,
    len: usize,
}

impl PanelMemory {
    fn zeroed(len: usize) -> PanelMemory {
        let bytes = len.max(1);
        let map = memmap2::MmapOptions::new()
            .len(bytes)
            .map_anon()
            .unwrap_or_else(|e| panic!("cannot allocate {bytes} bytes for packed weights: {e}"));
        #[cfg(target_os = "linux")]
        {
            // Only a hint: without transparent huge pages nothing changes.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        PanelMemory { map, len }
    }

    fn f32s(len: usize) -> PanelMemory {
        PanelMemory::zeroed(len * 4)
    }

    fn as_slice<T: bytemuck::Pod>(&self) -> &[T] {
        bytemuck::cast_slice(&self.map[..self.len])
    }

    fn as_mut_slice<T: bytemuck::Pod>(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.map[..self.len])
    }
}

/// A quantized `[n, k]` matrix as the weight store holds it, to be packed.
pub struct QuantSource<'a> {
    pub scheme: WeightQuant,
    /// `q` as stored: i8 `[n, k]`, or u4 `[n, k]` packed two per byte.
    pub q: &'a [u8],
    /// `[n, groups]`.
    pub scale: &'a [f32],
    /// `[n, groups]` when the scheme has an offset.
    pub min: Option<&'a [f32]>,
}

impl PackedMatrix {
    pub fn new(w: &[f32], n: usize, k: usize) -> PackedMatrix {
        PackedMatrix::for_kernel(w, n, k, Kernel::detect())
    }

    fn for_kernel(w: &[f32], n: usize, k: usize, kernel: Kernel) -> PackedMatrix {
        assert_eq!(w.len(), n * k);
        assert!(
            kernel.supported(),
            "{kernel:?} needs CPU features this one lacks"
        );
        let width = kernel.width();
        let count = n.div_ceil(width);
        let mut panels = PanelMemory::f32s(count * k * width);
        panels
            .as_mut_slice::<f32>()
            .par_chunks_mut(k * width)
            .enumerate()
            .for_each(|(p, panel)| {
                let j0 = p * width;
                for c in 0..width.min(n - j0) {
                    let row = &w[(j0 + c) * k..(j0 + c + 1) * k];
                    for (kk, &v) in row.iter().enumerate() {
                        panel[kk * width + c] = v;
                    }
                }
            });
        PackedMatrix {
            n,
            k,
            kernel,
            width,
            panels: Panels::F32(panels),
        }
    }

    /// Packs a quantized matrix (the weight store's bytes are not kept).
    pub fn quantized(source: &QuantSource, n: usize, k: usize) -> PackedMatrix {
        PackedMatrix::quantized_for_kernel(source, n, k, Kernel::detect())
    }

    fn quantized_for_kernel(
        source: &QuantSource,
        n: usize,
        k: usize,
        kernel: Kernel,
    ) -> PackedMatrix {
        let scheme = source.scheme;
        let groups = scheme.groups(k);
        assert!(kernel.supported());
        assert!(matches!(scheme.bits, 4 | 8));
        assert!(scheme.bits == 8 || (k.is_multiple_of(2) && scheme.group_size.is_multiple_of(2)));
        assert_eq!(source.q.len(), (n * k * scheme.bits as usize).div_ceil(8));
        assert_eq!(source.scale.len(), n * groups);
        assert_eq!(
            source.min.map(<[f32]>::len),
            scheme.offset.then_some(n * groups)
        );
        let width = kernel.width();
        let count = n.div_ceil(width);
        // Rows of a panel: k of them (i8), or k / 2 byte pairs (u4).
        let rows = if scheme.bits == 8 { k } else { k / 2 };
        let mut q = PanelMemory::zeroed(count * rows * width);
        let per_group = scale_rows(scheme) * width;
        let mut scales = PanelMemory::f32s(count * groups * per_group);
        q.as_mut_slice::<u8>()
            .par_chunks_mut(rows * width)
            .zip(
                scales
                    .as_mut_slice::<f32>()
                    .par_chunks_mut(groups * per_group),
            )
            .enumerate()
            .for_each(|(p, (panel, panel_scales))| {
                let j0 = p * width;
                for c in 0..width.min(n - j0) {
                    let j = j0 + c;
                    match scheme.bits {
                        8 => {
                            for (kk, &b) in source.q[j * k..(j + 1) * k].iter().enumerate() {
                                panel[kk * width + c] = b;
                            }
                        }
                        // A stored byte already holds elements 2i and 2i+1 of the row.
                        _ => {
                            for (pair, &b) in
                                source.q[j * k / 2..(j + 1) * k / 2].iter().enumerate()
                            {
                                panel[pair * width + c] = b;
                            }
                        }
                    }
                    for g in 0..groups {
                        panel_scales[g * per_group + c] = source.scale[j * groups + g];
                        if let Some(min) = source.min {
                            panel_scales[g * per_group + width + c] = min[j * groups + g];
                        }
                    }
                }
            });
        PackedMatrix {
            n,
            k,
            kernel,
            width,
            panels: Panels::Quant { scheme, q, scales },
        }
    }

    /// `(n, k)`: the shape of the original `W`.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes the panels occupy (what a decode step reads).
    pub fn size_bytes(&self) -> usize {
        match &self.panels {
            Panels::F32(p) => p.len,
            Panels::Quant { q, scales, .. } => q.len + scales.len,
        }
    }

    /// `x [m, k] · Wᵀ → [m, n]`, row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let job = LinearJob {
            weight: self,
            bias: None,
            residual: None,
        };
        linear_group(x, m, &[job])
            .pop()
            .expect("one job, one output")
    }

    fn panel_count(&self) -> usize {
        self.n.div_ceil(self.width)
    }

    /// Panel `p`, or [`Panel::None`] past the last one.
    fn panel(&self, p: usize) -> Panel<'_> {
        if p >= self.panel_count() {
            return Panel::None;
        }
        match &self.panels {
            Panels::F32(panels) => {
                let size = self.k * self.width;
                Panel::F32(&panels.as_slice::<f32>()[p * size..(p + 1) * size])
            }
            Panels::Quant { scheme, q, scales } => {
                let rows = if scheme.bits == 8 { self.k } else { self.k / 2 };
                let scale_size = scheme.groups(self.k) * scale_rows(*scheme) * self.width;
                Panel::Quant {
                    scheme: *scheme,
                    q: &q.as_slice::<u8>()[p * rows * self.width..(p + 1) * rows * self.width],
                    scales: &scales.as_slice::<f32>()[p * scale_size..(p + 1) * scale_size],
                }
            }
        }
    }
}

/// One `y = x · Wᵀ (+ bias) (+ residual)` of a group that [`linear_group`]
/// computes in one parallel pass.
pub struct LinearJob<'a> {
    pub weight: &'a PackedMatrix,
    /// `[n]`, added to every row: `y = x·Wᵀ + bias`, as `Linear` adds it.
    pub bias: Option<&'a [f32]>,
    /// `[m, n]`, added last: `residual + y`, as an `Add` after the `Linear`
    /// computes it (the same value: float addition commutes).
    pub residual: Option<&'a [f32]>,
}

/// Several products of the same `x [m, k]` (a layer's q, k and v
/// projections, say) in one parallel pass over all their panels: one
/// start and one end of the worker threads instead of one per product, and
/// better balanced. Each output is exactly what [`PackedMatrix::matmul`]
/// followed by the bias and residual additions gives.
pub fn linear_group(x: &[f32], m: usize, jobs: &[LinearJob]) -> Vec<Vec<f32>> {
    run_group(x, m, jobs, false)
}

/// `silu(x·Gᵀ + bg) · (x·Uᵀ + bu)`: a gated MLP's gate and up projections
/// and its activation in one pass, each panel of the activation computed
/// from the two products' panels while they are in registers and cache.
/// Equals `SwiGlu(Linear(x, G), Linear(x, U))` bit for bit.
pub fn linear_swiglu(x: &[f32], m: usize, gate: LinearJob, up: LinearJob) -> Vec<f32> {
    assert_eq!(gate.weight.shape(), up.weight.shape());
    assert!(gate.residual.is_none() && up.residual.is_none());
    run_group(x, m, &[gate, up], true)
        .pop()
        .expect("one output")
}

/// Int8 weights for products with int8 activations (`w8a8`): `q [n, k]`
/// row-major with one f32 scale per row. Sums are exact in i32, so any
/// order gives the bits `QuantLinear`'s reference gives.
pub struct Int8Matrix {
    n: usize,
    k: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
}

impl Int8Matrix {
    pub fn new(q: &[u8], scale: &[f32], n: usize, k: usize) -> Int8Matrix {
        assert_eq!(q.len(), n * k);
        assert_eq!(scale.len(), n);
        Int8Matrix {
            n,
            k,
            q: bytemuck::cast_slice(q).to_vec(),
            scale: scale.to_vec(),
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `y = (f32(Σ x_q·q) · scale) · s_x` for each of the `m` rows of `x`,
    /// each row quantized per token as [`crate::ir::quant`] defines it.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k);
        let mut xq = vec![0i8; m * k];
        let sx: Vec<f32> = x
            .chunks_exact(k.max(1))
            .zip(xq.chunks_exact_mut(k.max(1)))
            .map(|(row, q)| crate::ir::quant::quantize_activation_row(row, q))
            .collect();
        let mut out_t = vec![0f32; n * m];
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m.max(1))
            .enumerate()
            .for_each(|(task, out)| {
                for (local, column) in out.chunks_exact_mut(m.max(1)).enumerate() {
                    let j = task * ROWS_PER_TASK + local;
                    let w = &self.q[j * k..(j + 1) * k];
                    for (i, y) in column.iter_mut().enumerate() {
                        let acc = dot_i8(&xq[i * k..(i + 1) * k], w);
                        *y = (acc as f32 * self.scale[j]) * sx[i];
                    }
                }
            });
        let mut out = vec![0f32; m * n];
        for (j, column) in out_t.chunks_exact(m.max(1)).enumerate() {
            for (i, &v) in column.iter().enumerate() {
                out[i * n + j] = v;
            }
        }
        out
    }
}

/// `Σ a·b` over i8 vectors, in i32 (exact: |a·b| ≤ 2^14, so K < 2^17 cannot
/// overflow). Written so that the compiler vectorizes it (pmaddwd, sdot).
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[inline(always)]
    fn body(a: &[i8], b: &[i8]) -> i32 {
        let mut lanes = [0i32; 16];
        let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..16 {
                lanes[l] += x[l] as i16 as i32 * y[l] as i16 as i32;
            }
        }
        let tail: i32 = ra.iter().zip(rb).map(|(&x, &y)| x as i32 * y as i32).sum();
        lanes.iter().sum::<i32>() + tail
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(a: &[i8], b: &[i8]) -> i32 {
            body(a, b)
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { avx2(a, b) };
        }
    }
    body(a, b)
}

/// An output buffer that parallel tasks write in disjoint parts.
pub(crate) struct SharedOut(pub(crate) *mut f32, pub(crate) usize);

// SAFETY: see `slice`.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// SAFETY: concurrent callers must write disjoint elements, and the
    /// buffer must outlive every use.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0, self.1)
    }
}

/// What a parallel pass over panels computes (see [`run_group`]).
struct Group<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    jobs: &'a [LinearJob<'a>],
    /// Jobs 0 and 1 are a gate and an up projection, combined into `outs[0]`.
    swiglu: bool,
    outs: Vec<SharedOut>,
}

fn run_group(x: &[f32], m: usize, jobs: &[LinearJob], swiglu: bool) -> Vec<Vec<f32>> {
    let k = jobs.first().map_or(0, |j| j.weight.k);
    assert_eq!(x.len(), m * k);
    for job in jobs {
        let n = job.weight.n;
        assert_eq!(job.weight.k, k);
        assert_eq!(job.weight.kernel, jobs[0].weight.kernel);
        assert!(job.bias.is_none_or(|b| b.len() == n));
        assert!(job.residual.is_none_or(|r| r.len() == m * n));
    }
    let count = if swiglu { 1 } else { jobs.len() };
    let mut outs: Vec<Vec<f32>> = jobs[..count]
        .iter()
        .map(|j| vec![0f32; m * j.weight.n])
        .collect();
    if m == 0 {
        return outs;
    }
    let group = Group {
        x,
        m,
        k,
        jobs,
        swiglu,
        outs: outs
            .iter_mut()
            .map(|o| SharedOut(o.as_mut_ptr(), o.len()))
            .collect(),
    };
    // One task per (output, panel): tasks write disjoint columns. With
    // fewer rows than a 4-row tile, a task takes two panels (a gated MLP's
    // already has two) and computes them in one loop (see `pair_task`).
    let step = if m < PAIR_BELOW_M && !swiglu { 2 } else { 1 };
    let tasks: Vec<(usize, usize)> = (0..count)
        .flat_map(|j| {
            (0..jobs[j].weight.panel_count())
                .step_by(step)
                .map(move |p| (j, p))
        })
        .collect();
    tasks
        .into_par_iter()
        .for_each(|(job, panel)| group_task(&group, job, panel));
    outs
}

/// Below this many rows of x, a task computes two panels side by side:
/// each output is a chain of dependent multiply-adds along k, and one
/// panel's two vectors of chains leave the FMA units idle most of the
/// time (a decode step is bound by that latency, not by memory).
const PAIR_BELOW_M: usize = 4;

fn group_task(group: &Group, job: usize, panel: usize) {
    match group.jobs[job].weight.kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: matrices are packed only for kernels the CPU supports.
        Kernel::Avx512 => unsafe { group_task_avx512(group, job, panel) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 => unsafe { group_task_avx2(group, job, panel) },
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon => any_task::<neon::Neon, 2, 6>(group, job, panel),
        Kernel::Portable => any_task::<Portable, 2, 6>(group, job, panel),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn group_task_avx512(group: &Group, job: usize, panel: usize) {
    any_task::<avx2::Avx512, 3, 8>(group, job, panel)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_task_avx2(group: &Group, job: usize, panel: usize) {
    any_task::<avx2::Avx2Fma, 2, 6>(group, job, panel)
}

#[inline(always)]
fn any_task<V: Lanes, const NV: usize, const R: usize>(group: &Group, job: usize, p: usize) {
    if group.m < PAIR_BELOW_M {
        pair_task::<V, NV>(group, job, p)
    } else {
        panel_task::<V, NV, R>(group, job, p)
    }
}

/// The [`Finish`] of panel `p` of output `job` (`second`: the up
/// projection of a gated MLP, whose values come with the first's).
fn finish_for<'a>(group: &'a Group, job: usize, p: usize) -> Finish<'a> {
    let first = &group.jobs[job];
    let second = group.swiglu.then(|| &group.jobs[1]);
    let width = first.weight.width;
    let n = first.weight.n;
    let p0 = p * width;
    let cols = width.min(n - p0);
    // SAFETY: only the task of panel p writes columns p0..p0 + cols of
    // this output, and `run_group` keeps the buffer alive until every task
    // is done.
    let out = unsafe { group.outs[job].slice() };
    Finish {
        out: &mut out[p0..],
        n,
        cols,
        bias: first.bias.map(|b| &b[p0..p0 + cols]),
        second_bias: second.and_then(|s| s.bias).map(|b| &b[p0..p0 + cols]),
        swiglu: second.is_some(),
        residual: first.residual.map(|r| &r[p0..]),
    }
}

/// Panels `p` and `p + 1` of output `job` (a gated MLP: panel `p` of the
/// gate and the up projection) for every row of x, one row at a time, both
/// panels' chains in one loop. Each value is the same sequential sum over
/// k as [`panel_task`] computes.
#[inline(always)]
fn pair_task<V: Lanes, const NV: usize>(group: &Group, job: usize, p: usize) {
    let (x, m, k) = (group.x, group.m, group.k);
    let first = &group.jobs[job];
    let panels = match group.swiglu {
        true => [first.weight.panel(p), group.jobs[1].weight.panel(p)],
        false => [first.weight.panel(p), first.weight.panel(p + 1)],
    };
    let mut finish = [
        Some(finish_for(group, job, p)),
        (!group.swiglu && p + 1 < first.weight.panel_count())
            .then(|| finish_for(group, job, p + 1)),
    ];
    for i in 0..m {
        let row = [&x[i * k..][..k]];
        let mut values = [[[0f32; MAX_WIDTH]; 1]; 2];
        let accs = micro_tile_pair::<V, NV, 1>(row, k, panels);
        for (out, acc) in values.iter_mut().zip(&accs) {
            for (lanes, row) in acc.iter().zip(out.iter_mut()) {
                for (v, lane) in lanes.iter().enumerate() {
                    lane.store(&mut row[v * V::N..]);
                }
            }
        }
        let [[a], [b]] = &mut values;
        match &mut finish {
            [Some(f), _] if group.swiglu => f.row(i, a, b),
            [f0, f1] => {
                for (f, v) in [(f0, a), (f1, b)] {
                    if let Some(f) = f {
                        f.row(i, v, &mut [])
                    }
                }
            }
        }
    }
}

/// The accumulators of two panels of the same kind (or one, the other
/// [`Panel::None`]) over rows `x`: one loop when both are quantized alike
/// or both f32, else one after the other.
#[inline(always)]
fn micro_tile_pair<V: Lanes, const NV: usize, const R: usize>(
    x: [&[f32]; R],
    k: usize,
    panels: [Panel; 2],
) -> [[[V; NV]; R]; 2] {
    match panels {
        [Panel::F32(a), Panel::F32(b)] => stream_tile::<V, NV, R, 2>(x, [a, b], &[]),
        [Panel::Quant {
            scheme,
            q: qa,
            scales: sa,
        }, Panel::Quant {
            scheme: other,
            q: qb,
            scales: sb,
        }] if scheme == other => {
            if scheme.bits == 8 {
                stream_tile_i8::<V, NV, R, 2>(x, k, scheme, [qa, qb], [sa, sb], &[])
            } else {
                stream_tile_u4::<V, NV, R, 2>(x, k, scheme, [qa, qb], [sa, sb], &[])
            }
        }
        [a, b] => [
            micro_tile_one::<V, NV, R>(x, k, a),
            micro_tile_one::<V, NV, R>(x, k, b),
        ],
    }
}

/// The accumulators of one panel (zeros for [`Panel::None`]). A function,
/// not a closure, so that it is compiled with its caller's SIMD features.
#[inline(always)]
fn micro_tile_one<V: Lanes, const NV: usize, const R: usize>(
    x: [&[f32]; R],
    k: usize,
    panel: Panel,
) -> [[V; NV]; R] {
    match panel {
        Panel::None => [[V::zero(); NV]; R],
        Panel::F32(w) => stream_tile::<V, NV, R, 1>(x, [w], &[])[0],
        Panel::Quant { scheme, q, scales } if scheme.bits == 8 => {
            stream_tile_i8::<V, NV, R, 1>(x, k, scheme, [q], [scales], &[])[0]
        }
        Panel::Quant { scheme, q, scales } => {
            stream_tile_u4::<V, NV, R, 1>(x, k, scheme, [q], [scales], &[])[0]
        }
    }
}

/// Columns of panel `p` of output `job`, for every row of x.
#[inline(always)]
fn panel_task<V: Lanes, const NV: usize, const R: usize>(group: &Group, job: usize, p: usize) {
    let (x, m, k) = (group.x, group.m, group.k);
    let first = &group.jobs[job];
    let second = group.swiglu.then(|| &group.jobs[1]);
    let width = NV * V::N;
    debug_assert_eq!(first.weight.width, width);
    let n = first.weight.n;
    let p0 = p * width;
    let cols = width.min(n - p0);
    // SAFETY: only this task writes columns p0..p0 + cols of this output,
    // and `run_group` keeps the buffer alive until every task is done.
    let out = unsafe { group.outs[job].slice() };
    let mut finish = Finish {
        out: &mut out[p0..],
        n,
        cols,
        bias: first.bias.map(|b| &b[p0..p0 + cols]),
        second_bias: second.and_then(|s| s.bias).map(|b| &b[p0..p0 + cols]),
        swiglu: second.is_some(),
        residual: first.residual.map(|r| &r[p0..]),
    };
    let panels = [
        first.weight.panel(p),
        second.map_or(Panel::None, |s| s.weight.panel(p)),
    ];
    // While this panel is computed, the next one of the same matrix is
    // fetched towards L2, spread over the row tiles: its first use would
    // otherwise wait on memory (hardware prefetchers do not run far enough
    // ahead of a compute-bound loop). A decode step (a few rows) streams
    // the weights, which the prefetchers handle alone.
    let ahead = match (m >= R, second) {
        (false, _) => [&[][..], &[][..]],
        (true, None) => [first.weight.panel(p + 1).bytes(), &[][..]],
        (true, Some(s)) => [
            first.weight.panel(p + 1).bytes(),
            s.weight.panel(p + 1).bytes(),
        ],
    };
    // Chunk by chunk of k, each panel's chunk (dequantized once, if
    // quantized) stays in L1 while every row tile of x runs over it; the
    // accumulators wait in memory between chunks. Each output is still the
    // same sequential sum over k.
    let chunk = chunk_rows(width);
    let chunks = k.div_ceil(chunk).max(1);
    let mut accs = [
        vec![0f32; m * width],
        vec![0f32; if second.is_some() { m * width } else { 0 }],
    ];
    let quantized = panels.iter().any(|p| matches!(p, Panel::Quant { .. }));
    let mut dequantized = vec![0f32; if quantized { chunk * width } else { 0 }];
    for (which, acc) in accs.iter_mut().enumerate() {
        if matches!(panels[which], Panel::None) {
            continue;
        }
        let ahead = ahead[which];
        let lines = ahead.len() / CACHE_LINE;
        for c in 0..chunks {
            let (k0, k1) = (c * chunk, ((c + 1) * chunk).min(k));
            let w: &[f32] = match panels[which] {
                Panel::None => unreachable!(),
                Panel::F32(panel) => &panel[k0 * width..k1 * width],
                Panel::Quant { scheme, q, scales } => {
                    dequantize_rows::<V, NV>(scheme, q, scales, k0, k1, &mut dequantized);
                    &dequantized[..(k1 - k0) * width]
                }
            };
            // This tile's share of the next panel's cache lines, by
            // progress through the chunks and rows.
            let share = |i0: usize, rows: usize| {
                let (at, total) = (c * m + i0, chunks * m);
                &ahead
                    [(lines * at / total) * CACHE_LINE..(lines * (at + rows) / total) * CACHE_LINE]
            };
            let mut i = 0;
            while i + R <= m {
                chunk_tile::<V, NV, R>(x, k, k0, k1, i, w, acc, share(i, R));
                i += R;
            }
            while i + 4 <= m {
                chunk_tile::<V, NV, 4>(x, k, k0, k1, i, w, acc, share(i, 4));
                i += 4;
            }
            while i < m {
                chunk_tile::<V, NV, 1>(x, k, k0, k1, i, w, acc, share(i, 1));
                i += 1;
            }
        }
    }
    let [a, b] = &mut accs;
    for i in 0..m {
        let b = if b.is_empty() {
            &mut [][..]
        } else {
            &mut b[i * width..][..width]
        };
        finish.row(i, &mut a[i * width..][..width], b);
    }
}

/// Rows of k per chunk of a prefill's panels: 8 KiB of f32, a quarter of
/// an L1 cache, the rest left to x and the accumulators. (Even: a u4
/// chunk holds whole byte pairs.)
fn chunk_rows(width: usize) -> usize {
    (8192 / (4 * width)) & !1
}

/// Rows `k0..k1` of a quantized panel as f32 rows `[k1 - k0][width]` in
/// `out`: `w = min + q·scale`, exactly as the decode tiles make them.
#[inline(always)]
fn dequantize_rows<V: Lanes, const NV: usize>(
    scheme: WeightQuant,
    q: &[u8],
    scales: &[f32],
    k0: usize,
    k1: usize,
    out: &mut [f32],
) {
    let width = NV * V::N;
    let mut kk = k0;
    while kk < k1 {
        let g = kk / scheme.group_size;
        let end = ((g + 1) * scheme.group_size).min(k1);
        let (scale, min) = group_scales::<V, NV>(scales, g, scheme);
        if scheme.bits == 8 {
            for r in kk..end {
                let row = &q[r * width..][..width];
                let dst = &mut out[(r - k0) * width..][..width];
                for v in 0..NV {
                    let w = min[v].mul_add(V::load_i8(&row[v * V::N..]), scale[v]);
                    w.store(&mut dst[v * V::N..]);
                }
            }
        } else {
            // k0 and the group sizes are even: pairs never straddle either.
            for r in (kk..end).step_by(2) {
                let row = &q[r / 2 * width..][..width];
                let dst = &mut out[(r - k0) * width..][..2 * width];
                for v in 0..NV {
                    let (low, high) = V::load_u4(&row[v * V::N..]);
                    min[v].mul_add(low, scale[v]).store(&mut dst[v * V::N..]);
                    min[v]
                        .mul_add(high, scale[v])
                        .store(&mut dst[width + v * V::N..]);
                }
            }
        }
        kk = end;
    }
}

/// Rows `i0..i0 + R` of x over one chunk `w [k1 - k0][width]` of a panel:
/// `acc[i][c] += Σ_kk x[i][kk] · w[kk][c]` in order of kk, the accumulators
/// `[m][width]` loaded and stored around it; meanwhile prefetches `ahead`,
/// a cache line per step.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn chunk_tile<V: Lanes, const NV: usize, const R: usize>(
    x: &[f32],
    k: usize,
    k0: usize,
    k1: usize,
    i0: usize,
    w: &[f32],
    acc: &mut [f32],
    ahead: &[u8],
) {
    let width = NV * V::N;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[(i0 + r) * k + k0..(i0 + r) * k + k1]);
    let mut lanes = [[V::zero(); NV]; R];
    for r in 0..R {
        for v in 0..NV {
            lanes[r][v] = V::load(&acc[(i0 + r) * width + v * V::N..]);
        }
    }
    for (kk, b) in w.chunks_exact(width).enumerate() {
        prefetch_ahead::<V>(ahead, kk);
        let mut wv = [V::zero(); NV];
        for v in 0..NV {
            wv[v] = V::load(&b[v * V::N..]);
        }
        accumulate(&mut lanes, rows, kk, wv);
    }
    for r in 0..R {
        for v in 0..NV {
            lanes[r][v].store(&mut acc[(i0 + r) * width + v * V::N..]);
        }
    }
}

/// What becomes of the values of one panel's columns (`cols` of them) on
/// their way to the output: the additions and activation of the ops fused
/// into the product, in the order those ops apply them. (A method rather
/// than a closure so that it is compiled for the kernel's SIMD features.)
struct Finish<'a> {
    /// The output from the panel's first column on; row `i` at `i · n`.
    out: &'a mut [f32],
    n: usize,
    cols: usize,
    bias: Option<&'a [f32]>,
    second_bias: Option<&'a [f32]>,
    /// `silu(first) · second`, else the first values alone.
    swiglu: bool,
    /// Laid out as `out`.
    residual: Option<&'a [f32]>,
}

impl Finish<'_> {
    /// Row `i`'s values of the first product and (with `swiglu`) the second.
    #[inline(always)]
    fn row(&mut self, i: usize, a: &mut [f32], b: &mut [f32]) {
        let (n, cols) = (self.n, self.cols);
        let a = &mut a[..cols];
        if let Some(bias) = self.bias {
            for (y, b) in a.iter_mut().zip(bias) {
                *y += b;
            }
        }
        let dst = &mut self.out[i * n..][..cols];
        if self.swiglu {
            let b = &mut b[..cols];
            if let Some(bias) = self.second_bias {
                for (y, b) in b.iter_mut().zip(bias) {
                    *y += b;
                }
            }
            for ((d, &g), &u) in dst.iter_mut().zip(&*a).zip(&*b) {
                *d = crate::interp::math::silu(g) * u;
            }
        } else if let Some(residual) = self.residual {
            for ((d, &y), &r) in dst.iter_mut().zip(&*a).zip(&residual[i * n..]) {
                *d = r + y;
            }
        } else {
            dst.copy_from_slice(a);
        }
    }
}

const CACHE_LINE: usize = 64;

/// Steps of k that a micro-tile asks for its panel ahead of use.
const L1_AHEAD: usize = 16;

/// Bytes ahead of its use that a decode step asks for a panel row: about
/// a memory latency's worth of rows. (The hardware prefetchers alone fall
/// behind a stream of short panels.)
const STREAM_AHEAD: usize = 2048;

/// Groups ahead of use that a decode step asks for a panel's scales.
const SCALES_AHEAD: usize = 4;

/// Without `ahead` (a decode step), asks for the panel bytes
/// [`STREAM_AHEAD`] past `row`: past a panel's end, that is the next
/// panel's start (a prefetch never faults, whatever the address).
#[inline(always)]
fn stream_ahead<V: Lanes>(ahead: &[u8], row: *const u8) {
    if ahead.is_empty() {
        V::prefetch_l1(row.wrapping_add(STREAM_AHEAD).cast());
    }
}

/// Asks for line `step` of `ahead` (the next panel), if it has one.
#[inline(always)]
fn prefetch_ahead<V: Lanes>(ahead: &[u8], step: usize) {
    if step < ahead.len() / CACHE_LINE {
        V::prefetch(ahead.as_ptr().wrapping_add(step * CACHE_LINE).cast());
    }
}

/// Rows of per-column values a quantized panel keeps per group: the scale,
/// and the min where the scheme has one. A symmetric scheme's min follows
/// from its scale ([`implied_min`]): computed in registers rather than
/// read, a decode step reads fewer bytes per weight.
fn scale_rows(scheme: WeightQuant) -> usize {
    1 + scheme.offset as usize
}

/// [`WeightQuant::implied_min`] of a vector of scales, bit for bit.
#[inline(always)]
fn implied_min<V: Lanes>(scheme: WeightQuant, scale: V) -> V {
    match scheme.bits {
        4 => V::splat(-8.0).mul(scale),
        _ => V::zero(),
    }
}

/// A group's scales and mins at group `g` (see [`scale_rows`]).
#[inline(always)]
fn group_scales<V: Lanes, const NV: usize>(
    scales: &[f32],
    g: usize,
    scheme: WeightQuant,
) -> ([V; NV], [V; NV]) {
    panels_group_scales::<V, NV, 1>([scales], g, scheme)[0]
}

/// `acc[r][v] += x[r][kk] · w` over one dequantized panel row `w`.
#[inline(always)]
fn accumulate<V: Lanes, const NV: usize, const R: usize>(
    acc: &mut [[V; NV]; R],
    x: [&[f32]; R],
    kk: usize,
    w: [V; NV],
) {
    for r in 0..R {
        let a = V::splat(x[r][kk]);
        for v in 0..NV {
            acc[r][v] = acc[r][v].mul_add(a, w[v]);
        }
    }
}

/// `acc[p][r][v] = Σ_kk x[r][kk] · panels[p][kk][v·N..(v+1)·N]` in order
/// of kk, for a few rows of x (a decode step): `P` panels at once
/// (independent chains for the FMA units), each panel row asked for
/// [`STREAM_AHEAD`] bytes ahead while `ahead` is empty. (A prefill takes
/// [`chunk_tile`]s instead: this form of the loop is slower there.)
#[inline(always)]
fn stream_tile<V: Lanes, const NV: usize, const R: usize, const P: usize>(
    x: [&[f32]; R],
    panels: [&[f32]; P],
    ahead: &[u8],
) -> [[[V; NV]; R]; P] {
    let width = NV * V::N;
    let mut acc = [[[V::zero(); NV]; R]; P];
    let k = panels[0].len() / width;
    for kk in 0..k {
        prefetch_ahead::<V>(ahead, kk);
        for p in 0..P {
            let b = &panels[p][kk * width..][..width];
            // The panel comes from L2 once per row tile: asking for it a few
            // steps ahead hides the latency better than the L1 prefetchers do
            // (5% of a prefill, measured).
            for line in (0..width).step_by(16) {
                V::prefetch_l1(b.as_ptr().wrapping_add(L1_AHEAD * width + line));
            }
            let mut w = [V::zero(); NV];
            for v in 0..NV {
                w[v] = V::load(&b[v * V::N..]);
            }
            accumulate(&mut acc[p], x, kk, w);
        }
    }
    acc
}

/// Each panel's scales and mins of group `g` (see [`scale_rows`]).
/// (Loops, not `array::from_fn`: a closure that the compiler leaves out
/// of line lacks the kernel's SIMD features, and so does everything in it.)
#[inline(always)]
fn panels_group_scales<V: Lanes, const NV: usize, const P: usize>(
    scales: [&[f32]; P],
    g: usize,
    scheme: WeightQuant,
) -> [([V; NV], [V; NV]); P] {
    let width = NV * V::N;
    let per_group = scale_rows(scheme) * width;
    let mut out = [([V::zero(); NV], [V::zero(); NV]); P];
    for p in 0..P {
        let at = &scales[p][g * per_group..];
        for v in 0..NV {
            let scale = V::load(&at[v * V::N..]);
            out[p].0[v] = scale;
            out[p].1[v] = match scheme.offset {
                true => V::load(&at[width + v * V::N..]),
                false => implied_min(scheme, scale),
            };
        }
    }
    out
}

/// Prefetches each panel's scales and mins [`SCALES_AHEAD`] groups past `g`.
#[inline(always)]
fn prefetch_scales<V: Lanes, const NV: usize, const P: usize>(
    scales: [&[f32]; P],
    g: usize,
    scheme: WeightQuant,
) {
    let per_group = scale_rows(scheme) * NV * V::N;
    for panel in scales {
        let at = panel.as_ptr().wrapping_add((g + SCALES_AHEAD) * per_group);
        for line in (0..per_group).step_by(16) {
            V::prefetch_l1(at.wrapping_add(line));
        }
    }
}

/// [`stream_tile`] over i8 panels `[k][width]`: each row is dequantized,
/// `w = min + q·scale` (one fused multiply-add), before it is used.
#[inline(always)]
fn stream_tile_i8<V: Lanes, const NV: usize, const R: usize, const P: usize>(
    x: [&[f32]; R],
    k: usize,
    scheme: WeightQuant,
    q: [&[u8]; P],
    scales: [&[f32]; P],
    ahead: &[u8],
) -> [[[V; NV]; R]; P] {
    let group_size = scheme.group_size;
    let width = NV * V::N;
    let mut acc = [[[V::zero(); NV]; R]; P];
    for (g, k0) in (0..k).step_by(group_size).enumerate() {
        let s = panels_group_scales::<V, NV, P>(scales, g, scheme);
        if ahead.is_empty() {
            prefetch_scales::<V, NV, P>(scales, g, scheme);
        }
        for kk in k0..(k0 + group_size).min(k) {
            prefetch_ahead::<V>(ahead, kk);
            for p in 0..P {
                let (scale, min) = &s[p];
                let row = &q[p][kk * width..][..width];
                stream_ahead::<V>(ahead, row.as_ptr());
                // Each weight used as soon as it is made (see stream_tile_u4).
                for v in 0..NV {
                    let w = min[v].mul_add(V::load_i8(&row[v * V::N..]), scale[v]);
                    for r in 0..R {
                        acc[p][r][v] = acc[p][r][v].mul_add(V::splat(x[r][kk]), w);
                    }
                }
            }
        }
    }
    acc
}

/// [`stream_tile`] over u4 panels `[k / 2][width]` (rows `2i` and `2i + 1`
/// in one byte per column), dequantized as in [`stream_tile_i8`].
#[inline(always)]
fn stream_tile_u4<V: Lanes, const NV: usize, const R: usize, const P: usize>(
    x: [&[f32]; R],
    k: usize,
    scheme: WeightQuant,
    q: [&[u8]; P],
    scales: [&[f32]; P],
    ahead: &[u8],
) -> [[[V; NV]; R]; P] {
    let group_size = scheme.group_size;
    let width = NV * V::N;
    let mut acc = [[[V::zero(); NV]; R]; P];
    for (g, k0) in (0..k).step_by(group_size).enumerate() {
        let s = panels_group_scales::<V, NV, P>(scales, g, scheme);
        if ahead.is_empty() {
            prefetch_scales::<V, NV, P>(scales, g, scheme);
        }
        // Group sizes and k are even: pairs never straddle a group.
        for kk in (k0..(k0 + group_size).min(k)).step_by(2) {
            prefetch_ahead::<V>(ahead, kk / 2);
            for p in 0..P {
                let (scale, min) = &s[p];
                let row = &q[p][kk / 2 * width..][..width];
                stream_ahead::<V>(ahead, row.as_ptr());
                // Vector by vector, each weight used as soon as it is made:
                // fewer live registers (a spilled accumulator would put a
                // store and a load into its chain).
                for v in 0..NV {
                    let (low, high) = V::load_u4(&row[v * V::N..]);
                    let even = min[v].mul_add(low, scale[v]);
                    for r in 0..R {
                        acc[p][r][v] = acc[p][r][v].mul_add(V::splat(x[r][kk]), even);
                    }
                    let odd = min[v].mul_add(high, scale[v]);
                    for r in 0..R {
                        acc[p][r][v] = acc[p][r][v].mul_add(V::splat(x[r][kk + 1]), odd);
                    }
                }
            }
        }
    }
    acc
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

    use crate::test_util::pseudo_random;

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
    fn packed_rows_agree_bit_for_bit_whatever_the_batch() {
        // A token's logits must not depend on whether it ran in a prefill
        // chunk (many rows, wide tiles) or a decode step (one row).
        let (k, n) = (200, 77);
        let w = pseudo_random(n * k, 5);
        for kernel in kernels() {
            let packed = PackedMatrix::for_kernel(&w, n, k, kernel);
            for m in [1, 4, 5, 13, 29] {
                let x = pseudo_random(m * k, 6);
                let all = packed.matmul(&x, m);
                for i in 0..m {
                    let single = packed.matmul(&x[i * k..(i + 1) * k], 1);
                    assert_eq!(single, &all[i * n..(i + 1) * n], "{kernel:?} m={m} row {i}");
                }
                let want = naive(&x, &w, m, k, n);
                for (a, b) in all.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{kernel:?}");
                }
            }
        }
    }

    /// Every packed kernel this CPU can run (the tests cover the narrower
    /// ones too, not only the one `PackedMatrix::new` picks).
    fn kernels() -> Vec<Kernel> {
        #[cfg(target_arch = "x86_64")]
        let all = [Kernel::Avx512, Kernel::Avx2, Kernel::Portable];
        #[cfg(target_arch = "aarch64")]
        let all = [Kernel::Neon, Kernel::Portable];
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let all = [Kernel::Portable];
        all.into_iter().filter(|k| k.supported()).collect()
    }

    #[test]
    fn fused_products_equal_the_separate_ops() {
        use crate::interp::math::silu;
        // Two row counts (tiles of every height, and a decode step), widths
        // with a partial last panel, k over two of a prefill's chunks.
        for (m, kernel) in [1, 21]
            .into_iter()
            .flat_map(|m| kernels().into_iter().map(move |k| (m, k)))
        {
            let (k, n) = (140, 70);
            let x = pseudo_random(m * k, 7);
            let [g, u, v] = [8, 9, 10].map(|seed| pseudo_random(n * k, seed));
            let [pg, pu, pv] = [&g, &u, &v].map(|w| PackedMatrix::for_kernel(w, n, k, kernel));
            let bias = pseudo_random(n, 11);
            let residual = pseudo_random(m * n, 12);
            let plain = |p: &PackedMatrix| p.matmul(&x, m);
            let job = |w, bias, residual| LinearJob {
                weight: w,
                bias,
                residual,
            };
            let outs = linear_group(
                &x,
                m,
                &[
                    job(&pg, None, None),
                    job(&pu, Some(&bias), None),
                    job(&pv, Some(&bias), Some(&residual)),
                ],
            );
            assert_eq!(outs[0], plain(&pg));
            let biased: Vec<f32> = plain(&pu)
                .chunks_exact(n)
                .flat_map(|row| row.iter().zip(&bias).map(|(y, b)| y + b))
                .collect();
            assert_eq!(outs[1], biased);
            let with_residual: Vec<f32> = plain(&pv)
                .chunks_exact(n)
                .flat_map(|row| row.iter().zip(&bias).map(|(y, b)| y + b))
                .zip(&residual)
                .map(|(y, r)| r + y)
                .collect();
            assert_eq!(outs[2], with_residual);
            let gated = linear_swiglu(&x, m, job(&pg, None, None), job(&pu, Some(&bias), None));
            let want: Vec<f32> = plain(&pg)
                .iter()
                .zip(&biased)
                .map(|(&g, &u)| silu(g) * u)
                .collect();
            assert_eq!(gated, want);
        }
    }

    /// The scalar `QuantLinear` reference on `x [m, k]` and a quantized matrix.
    fn quant_reference(x: &[f32], m: usize, q: &crate::ir::quant::QuantizedMatrix) -> Vec<f32> {
        use crate::ir::ops::{OpSpec, QuantLinear};
        use crate::ir::DType;
        use crate::tensor::Tensor;
        let dtype = if q.scheme.bits == 8 {
            DType::I8
        } else {
            DType::U4
        };
        let qt = Tensor::quantized(
            dtype,
            vec![q.n, q.k],
            std::sync::Arc::new(q.q.clone()),
            0,
            q.q.len(),
        );
        let groups = q.scheme.groups(q.k);
        let f = |v: &[half::f16]| {
            Tensor::from_f32([q.n, groups], v.iter().map(|h| h.to_f32()).collect())
        };
        let scale = f(&q.scale);
        let min = q.scheme.offset.then(|| f(&q.min));
        let xt = Tensor::from_f32([m, q.k], x.to_vec());
        let mut args = vec![&xt, &qt, &scale];
        args.extend(min.as_ref());
        let op = QuantLinear {
            weights: q.scheme,
            activations: Default::default(),
            input_scale: false,
            bias: false,
        };
        op.eval(&args).unwrap().f32s().to_vec()
    }

    #[test]
    fn quantized_panels_equal_the_scalar_reference() {
        use crate::ir::quant::{quantize, QuantizedMatrix, WeightQuant};
        let schemes = |k: usize| {
            [
                WeightQuant {
                    bits: 8,
                    group_size: k,
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
                // Groups that straddle a prefill's chunks of k.
                WeightQuant {
                    bits: 4,
                    group_size: 48,
                    offset: true,
                },
                WeightQuant {
                    bits: 8,
                    group_size: 48,
                    offset: false,
                },
            ]
        };
        // K past the last whole group, N odd and below a panel, one row and
        // many, K over several of a prefill's chunks.
        for &(m, k, n) in &[
            (1, 70, 17),
            (5, 96, 50),
            (13, 64, 1),
            (1, 200, 77),
            (3, 64, 40),
            (29, 40, 49),
            (7, 300, 33),
            (24, 260, 40),
        ] {
            let x = pseudo_random(m * k, 21);
            let w = pseudo_random(n * k, 22);
            for scheme in schemes(k) {
                let q: QuantizedMatrix = quantize(&w, n, k, scheme).unwrap();
                let scale: Vec<f32> = q.scale.iter().map(|h| h.to_f32()).collect();
                let min: Vec<f32> = q.min.iter().map(|h| h.to_f32()).collect();
                let source = QuantSource {
                    scheme,
                    q: &q.q,
                    scale: &scale,
                    min: scheme.offset.then_some(&min[..]),
                };
                let want = quant_reference(&x, m, &q);
                for kernel in kernels() {
                    let packed = PackedMatrix::quantized_for_kernel(&source, n, k, kernel);
                    let got = packed.matmul(&x, m);
                    if kernel == Kernel::Portable {
                        // Products rounded before the add: within k roundings
                        // of the sum of |terms|.
                        let deq = q.dequantize();
                        for i in 0..m {
                            for j in 0..n {
                                let bound: f32 = (0..k)
                                    .map(|p| (x[i * k + p] * deq[j * k + p]).abs())
                                    .sum::<f32>()
                                    * k as f32
                                    * f32::EPSILON;
                                let (a, b) = (got[i * n + j], want[i * n + j]);
                                assert!(
                                    (a - b).abs() <= bound,
                                    "{kernel:?} {scheme:?}: {a} vs {b}"
                                );
                            }
                        }
                    } else {
                        assert_eq!(got, want, "{kernel:?} {scheme:?} m={m} k={k} n={n}");
                    }
                }
            }
        }
    }

    #[test]
    fn int8_products_equal_the_scalar_reference_bit_for_bit() {
        use crate::ir::ops::{OpSpec, QuantLinear};
        use crate::ir::quant::{quantize, ActivationQuant, WeightQuant};
        use crate::ir::DType;
        use crate::tensor::Tensor;
        for &(m, k, n) in &[(1, 70, 17), (9, 96, 130), (3, 1, 2)] {
            let scheme = WeightQuant {
                bits: 8,
                group_size: k,
                offset: false,
            };
            let q = quantize(&pseudo_random(n * k, 31), n, k, scheme).unwrap();
            let mut x = pseudo_random(m * k, 32);
            x[..k].iter_mut().for_each(|v| *v = 0.0); // a row of zeros
            let scale: Vec<f32> = q.scale.iter().map(|h| h.to_f32()).collect();
            let got = Int8Matrix::new(&q.q, &scale, n, k).matmul(&x, m);
            let op = QuantLinear {
                weights: scheme,
                activations: ActivationQuant::DynamicInt8PerToken,
                input_scale: false,
                bias: false,
            };
            let qt = Tensor::quantized(
                DType::I8,
                vec![n, k],
                std::sync::Arc::new(q.q.clone()),
                0,
                q.q.len(),
            );
            let want = op
                .eval(&[
                    &Tensor::from_f32([m, k], x.clone()),
                    &qt,
                    &Tensor::from_f32([n, 1], scale.clone()),
                ])
                .unwrap();
            assert_eq!(got, want.f32s(), "m={m} k={k} n={n}");
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
