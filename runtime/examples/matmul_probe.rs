//! Times `x · Wᵀ` for one shape, Kiln's kernels against the `gemm` crate,
//! on weights too large to stay in cache (each call reads a cold copy).
//!     cargo run --release -p kiln-runtime --features gemm-probe --example matmul_probe -- 64 576 1536
use kiln_runtime::interp::linalg::{matmul_transposed, PackedMatrix};
use std::time::Instant;

fn gemm_crate(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: buffers of m·n, m·k and n·k elements with matching strides.
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
            par,
        )
    }
    out
}

fn report(name: &str, m: usize, k: usize, n: usize, seconds: f64, err: f32) {
    let gflops = 2.0 * (m * k * n) as f64 / seconds / 1e9;
    println!(
        "{name:>16} m={m} k={k} n={n}: {:.3} ms, {gflops:.1} GFLOP/s (max diff {err:.1e})",
        seconds * 1e3
    );
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let [m, k, n] = args[..] else {
        eprintln!("usage: matmul_probe M K N");
        std::process::exit(2);
    };
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let copies = (512 << 20) / (n * k * 4) + 1;
    let ws: Vec<Vec<f32>> = (0..copies)
        .map(|c| (0..n * k).map(|i| ((i + c) % 5) as f32 * 0.1).collect())
        .collect();
    let reference = gemm_crate(&x, &ws[0], m, k, n);
    // Closeness counts a NaN as an infinite difference (f32::max would drop it).
    let diff = |out: &[f32]| kiln_runtime::diff::Closeness::of(out, &reference).max_abs;

    let packed: Vec<PackedMatrix> = ws.iter().map(|w| PackedMatrix::new(w, n, k)).collect();
    let err = diff(&packed[0].matmul(&x, m));
    let t = Instant::now();
    for p in &packed {
        std::hint::black_box(p.matmul(&x, m));
    }
    report(
        "kiln packed",
        m,
        k,
        n,
        t.elapsed().as_secs_f64() / copies as f64,
        err,
    );
    drop(packed);

    let err = diff(&matmul_transposed(&x, &ws[0], m, k, n));
    let t = Instant::now();
    for w in &ws {
        std::hint::black_box(matmul_transposed(&x, w, m, k, n));
    }
    report(
        "kiln unpacked",
        m,
        k,
        n,
        t.elapsed().as_secs_f64() / copies as f64,
        err,
    );

    let t = Instant::now();
    for w in &ws {
        std::hint::black_box(gemm_crate(&x, w, m, k, n));
    }
    report(
        "gemm crate",
        m,
        k,
        n,
        t.elapsed().as_secs_f64() / copies as f64,
        0.0,
    );
}
