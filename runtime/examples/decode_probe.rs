//! Times the products of one decode step (one row of x) of a small
//! quantized decoder, the packed kernels alone: per layer the q/k/v group,
//! the output projection with its residual, the gated MLP and the down
//! projection with its residual; then an i8 LM head. Shapes default to
//! SmolLM2-135M (30 layers, d 576, MLP 1536, k/v 192, vocab 49152), Q4_1
//! layers (u4, groups of 32 with mins) and a Q8_0 head (i8, groups of 32).
//!     cargo run --release -p kiln-runtime --example decode_probe -- [BITS] [REPEATS] [LAYERS] [ROWS]
//! BITS (4, 8, or 32 for f32) is the layers' format; ROWS (1) the rows of x (64: a
//! prefill chunk).
use kiln_runtime::interp::linalg::{
    linear_group, linear_swiglu, LinearJob, PackedMatrix, QuantSource,
};
use kiln_runtime::ir::quant::WeightQuant;
use std::time::Instant;

fn matrix(n: usize, k: usize, bits: u8, seed: usize) -> PackedMatrix {
    if bits == 32 {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 + seed * 11) % 251) as f32 * 1e-3 - 0.12)
            .collect();
        return PackedMatrix::new(&w, n, k);
    }
    let scheme = WeightQuant {
        bits,
        group_size: 32,
        offset: bits == 4,
    };
    let groups = scheme.groups(k);
    let q: Vec<u8> = (0..(n * k * bits as usize).div_ceil(8))
        .map(|i| ((i * 37 + seed * 11) % 251) as u8)
        .collect();
    // f16-representable scales, as a GGUF's are.
    let scale: Vec<f32> = (0..n * groups)
        .map(|i| half::f16::from_f32(0.01 + ((i + seed) % 13) as f32 * 1e-3).to_f32())
        .collect();
    let min: Vec<f32> = scale.iter().map(|s| -8.0 * s).collect();
    let source = QuantSource {
        scheme,
        q: &q,
        scale: &scale,
        min: scheme.offset.then_some(&min[..]),
    };
    PackedMatrix::quantized(&source, n, k)
}

struct Layer {
    q: PackedMatrix,
    k: PackedMatrix,
    v: PackedMatrix,
    o: PackedMatrix,
    gate: PackedMatrix,
    up: PackedMatrix,
    down: PackedMatrix,
}

fn job<'a>(weight: &'a PackedMatrix, residual: Option<&'a [f32]>) -> LinearJob<'a> {
    LinearJob {
        weight,
        bias: None,
        residual,
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let bits = *args.first().unwrap_or(&4) as u8;
    let repeats = *args.get(1).unwrap_or(&20);
    // Fewer layers (and a head cut as much) fit in cache: the kernels' speed
    // without the memory's.
    let layers = *args.get(2).unwrap_or(&30);
    let (d, f, kv, vocab) = (576, 1536, 192, 49152 * layers / 30);
    let model: Vec<Layer> = (0..layers)
        .map(|l| Layer {
            q: matrix(d, d, bits, l * 7),
            k: matrix(kv, d, bits, l * 7 + 1),
            v: matrix(kv, d, bits, l * 7 + 2),
            o: matrix(d, d, bits, l * 7 + 3),
            gate: matrix(f, d, bits, l * 7 + 4),
            up: matrix(f, d, bits, l * 7 + 5),
            down: matrix(d, f, bits, l * 7 + 6),
        })
        .collect();
    let head = matrix(vocab, d, 8, 999);
    let bytes: usize = model
        .iter()
        .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
        .map(PackedMatrix::size_bytes)
        .sum::<usize>()
        + head.size_bytes();
    let m = *args.get(3).unwrap_or(&1);
    let x: Vec<f32> = (0..m * d).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
    if layers == 1 {
        // One 576 × 576 matrix, in L2: the kernel's arithmetic alone.
        let o = &model[0].o;
        let (mut best, runs) = (f64::MAX, 200);
        for _ in 0..repeats {
            let t = Instant::now();
            for _ in 0..runs {
                std::hint::black_box(o.matmul(&x, m));
            }
            best = best.min(t.elapsed().as_secs_f64() / runs as f64);
        }
        println!(
            "hot 576x576 u{bits}: {:.1} us, {:.2} weights/ns",
            best * 1e6,
            (d * d) as f64 / best / 1e9
        );
    }
    let residual = vec![0.5f32; m * d];
    let (mut best_layers, mut best_head) = (f64::MAX, f64::MAX);
    // As the interpreter runs a graph: on a pool worker, the others kept
    // looking for work (no wake-up per parallel op).
    let done = std::sync::atomic::AtomicBool::new(false);
    rayon::scope(|scope| {
        for _ in 1..rayon::current_num_threads() {
            scope.spawn(|_| {
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::thread::yield_now();
                    }
                }
            });
        }
        for _ in 0..repeats {
            let t = Instant::now();
            for l in &model {
                std::hint::black_box(linear_group(
                    &x,
                    m,
                    &[job(&l.q, None), job(&l.k, None), job(&l.v, None)],
                ));
                std::hint::black_box(linear_group(&x, m, &[job(&l.o, Some(&residual))]));
                let a = linear_swiglu(&x, m, job(&l.gate, None), job(&l.up, None));
                std::hint::black_box(linear_group(&a, m, &[job(&l.down, Some(&residual))]));
            }
            best_layers = best_layers.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            std::hint::black_box(head.matmul(&x, m));
            best_head = best_head.min(t.elapsed().as_secs_f64());
        }
        done.store(true, std::sync::atomic::Ordering::Release);
    });
    println!(
        "u{bits} x {m} rows: layers {:.3} ms, i8 head {:.3} ms, total {:.3} ms ({:.1} MB, {:.1} GB/s), {} threads",
        best_layers * 1e3,
        best_head * 1e3,
        (best_layers + best_head) * 1e3,
        bytes as f64 / 1e6,
        bytes as f64 / (best_layers + best_head) / 1e9,
        rayon::current_num_threads()
    );
}
