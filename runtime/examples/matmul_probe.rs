use kiln_runtime::interp::linalg::matmul_transposed;
use std::time::Instant;
fn gemm_t(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
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
    };
    out
}
fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (m, k, n) = (args[0], args[1], args[2]);
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
    for (name, f) in [
        (
            "kiln",
            matmul_transposed as fn(&[f32], &[f32], usize, usize, usize) -> Vec<f32>,
        ),
        ("gemm", gemm_t),
    ] {
        let _ = f(&x, &w, m, k, n);
        let reps = 20;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(f(&x, &w, m, k, n));
        }
        let dt = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{name} m={m} k={k} n={n}: {:.2} ms, {:.1} GFLOP/s",
            dt * 1e3,
            2.0 * (m * k * n) as f64 / dt / 1e9
        );
    }
}
