use kiln_runtime::interp::linalg::matmul_transposed;
use std::time::Instant;
fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (m, k, n) = (args[0], args[1], args[2]);
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
    let _ = matmul_transposed(&x, &w, m, k, n);
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(matmul_transposed(&x, &w, m, k, n));
    }
    let dt = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "kiln  m={m} k={k} n={n}: {:.2} ms, {:.1} GFLOP/s",
        dt * 1e3,
        2.0 * (m * k * n) as f64 / dt / 1e9
    );
}
