//! The generated kernels, compiled with the host's g++ against the CPU
//! emulation header and run over shape sweeps, against the reference
//! interpreter's ops.
//!
//! One harness binary per target holds every kernel (compiled once, cached
//! by a hash of its sources); shapes are swept at run time through stdin.
//!
//! Tolerances (each check fails on NaN):
//! - fp16 ops: max |y − ref| ≤ 1e-3 × max |ref| (the output's scale).
//! - GEMVs: the kernel dequantizes to exactly the reference's f32 weights
//!   (`q·scale` is exact in f32, one rounding for `+ min`), so what differs
//!   is the order of the f32 sums and the final fp16 rounding:
//!   |y − ref| ≤ 2⁻¹¹·|ref| + 2·K·2⁻²⁴·Σ_k |x_k·w_k| + 2⁻²⁴.

use super::tiling::{GemvWeights, TilingField};
use super::*;
use half::f16;
use kiln_runtime::ir::ops::{Add, Linear, OpSpec, QuantLinear, RmsNorm, Rope, SwiGlu};
use kiln_runtime::ir::quant::{quantize, ActivationQuant, WeightQuant};
use kiln_runtime::ir::DType;
use kiln_runtime::tensor::Tensor;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};

/// A request per kind: the kernel sources do not depend on the instances.
fn one_of_each() -> Vec<KernelRequest> {
    let gemv = |weights| KernelOp::Gemv {
        k: 64,
        n: 16,
        weights,
    };
    [
        KernelOp::RmsNorm {
            rows: 1,
            cols: 64,
            eps: 1e-5,
            residual: false,
        },
        KernelOp::RmsNorm {
            rows: 1,
            cols: 64,
            eps: 1e-5,
            residual: true,
        },
        KernelOp::SwiGlu { len: 64 },
        KernelOp::Rope {
            batch: 1,
            heads: 2,
            tokens: 1,
            dim: 64,
        },
        gemv(GemvWeights::Half),
        gemv(GemvWeights::Int8),
        gemv(GemvWeights::Int4 {
            group_size: 32,
            offset: false,
        }),
        gemv(GemvWeights::Int4 {
            group_size: 32,
            offset: true,
        }),
    ]
    .into_iter()
    .map(|op| KernelRequest {
        op,
        source: "test".into(),
    })
    .collect()
}

fn write_emulation(dir: &Path) {
    for (path, text) in emulation_files() {
        write(&dir.join(path), text).unwrap();
    }
}

fn gxx(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let out = Command::new("g++")
        .args(args)
        .output()
        .expect("g++ must be installed to run the Ascend C emulation tests");
    assert!(
        out.status.success(),
        "g++ failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(super) struct Harness {
    binary: PathBuf,
}

/// The harness for `target`, built on first use; the build is cached in the
/// temp directory under a hash of every source it compiles.
pub(super) fn harness(target: Target) -> &'static Harness {
    static CELLS: [OnceLock<Harness>; 2] = [OnceLock::new(), OnceLock::new()];
    CELLS[target as usize].get_or_init(|| {
        // Kept when g++ fails, to look at.
        let staging = tempfile::tempdir().unwrap().keep();
        let package = staging.as_path().join("package");
        generate_package(&package, target, &one_of_each()).unwrap();
        write_emulation(&package);
        let source = harness_source(target, &KernelKind::ALL).unwrap();
        write(&package.join("harness.cpp"), &source).unwrap();
        let mut hasher = sha2::Sha256::default();
        use sha2::Digest;
        hasher.update(&source);
        for (_, text) in emulation_files() {
            hasher.update(text);
        }
        for kind in KernelKind::ALL {
            let stem = kind.kernel_name();
            for f in [
                format!("op_kernel/{stem}.cpp"),
                format!("op_host/{stem}_tiling.h"),
            ] {
                hasher.update(std::fs::read(package.join(f)).unwrap());
            }
        }
        let hash: String = hasher.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let cache = std::env::temp_dir().join("kiln-ascendc-emulation");
        std::fs::create_dir_all(&cache).unwrap();
        let binary = cache.join(format!("harness-{target}-{hash}"));
        if !binary.exists() {
            let partial = staging.as_path().join("harness");
            let include = |p: &Path| {
                let mut s = std::ffi::OsString::from("-I");
                s.push(p);
                s
            };
            gxx(&[
                "-std=c++17".as_ref(),
                "-O1".as_ref(),
                "-Wall".as_ref(),
                "-Werror".as_ref(),
                "-Wno-unused-variable".as_ref(),
                include(&package).as_os_str(),
                package.join("harness.cpp").as_os_str(),
                "-o".as_ref(),
                partial.as_os_str(),
            ]);
            // Atomic for test processes racing on the same cache.
            let unique = cache.join(format!("harness-{target}-{hash}.{}", std::process::id()));
            std::fs::copy(&partial, &unique).unwrap();
            std::fs::rename(&unique, &binary).unwrap();
        }
        std::fs::remove_dir_all(&staging).unwrap();
        Harness { binary }
    })
}

/// One run of one kernel.
pub(super) struct Case {
    pub kind: KernelKind,
    pub tiling: Tiling,
    pub inputs: Vec<Vec<u8>>,
    pub output_bytes: Vec<usize>,
    pub ub_bytes: usize,
}

#[derive(Debug)]
pub(super) struct CaseResult {
    pub outputs: Vec<Vec<u8>>,
    pub rounded_down_copies: u64,
    pub gm_bytes_read: u64,
}

impl Harness {
    /// Runs the cases in one process; `Err` holds stderr if it failed.
    pub(super) fn run(&self, cases: &[Case]) -> Result<Vec<CaseResult>, String> {
        let mut input = Vec::new();
        for c in cases {
            let index = KernelKind::ALL.iter().position(|k| *k == c.kind).unwrap();
            let words: Vec<u32> = c
                .tiling
                .fields()
                .iter()
                .map(|f: &TilingField| f.word)
                .collect();
            for v in [
                index as u32,
                c.ub_bytes as u32,
                c.tiling.block_dim(),
                words.len() as u32,
            ]
            .into_iter()
            .chain(words)
            {
                input.extend(v.to_le_bytes());
            }
            for i in &c.inputs {
                input.extend((i.len() as u64).to_le_bytes());
                input.extend(i);
            }
            for &o in &c.output_bytes {
                input.extend((o as u64).to_le_bytes());
            }
        }
        let mut child = Command::new(&self.binary)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            // A harness that faults stops reading: ignore the broken pipe.
            let _ = stdin.write_all(&input);
        });
        let mut stdout = Vec::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_end(&mut stdout)
            .unwrap();
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let mut at = 0;
        let u64_at = |at: &mut usize| {
            let v = u64::from_le_bytes(stdout[*at..*at + 8].try_into().unwrap());
            *at += 8;
            v
        };
        let mut results = Vec::new();
        for c in cases {
            let mut outputs = Vec::new();
            for _ in &c.output_bytes {
                let len = u64_at(&mut at) as usize;
                outputs.push(stdout[at..at + len].to_vec());
                at += len;
            }
            results.push(CaseResult {
                outputs,
                rounded_down_copies: u64_at(&mut at),
                gm_bytes_read: {
                    let v = u64_at(&mut at);
                    u64_at(&mut at); // bytes written
                    v
                },
            });
        }
        Ok(results)
    }
}

/// Deterministic values in [-amp, amp), rounded to f16.
fn random_f16(n: usize, seed: u64, amp: f32) -> Vec<f16> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            f16::from_f32((u * 2.0 - 1.0) * amp)
        })
        .collect()
}

pub(super) fn bytes(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|h| h.to_le_bytes()).collect()
}

fn f32s(v: &[f16]) -> Vec<f32> {
    v.iter().map(|h| h.to_f32()).collect()
}

pub(super) fn halves(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|p| f16::from_le_bytes([p[0], p[1]]).to_f32())
        .collect()
}

/// max |got − want| ≤ 1e-3 × max |want|, failing on NaN on either side.
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tol = 1e-3 * scale;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= tol,
            "{what}: element {i} is {g}, reference {w} (|err| {err} > {tol})"
        );
    }
}

/// Runs one kernel per case and checks what is common to all: no
/// rounded-down copy, and exactly the GM bytes the tiling says it reads.
fn run_checked(target: Target, cases: Vec<(KernelOp, Vec<Vec<u8>>)>) -> Vec<Vec<Vec<f32>>> {
    let h = harness(target);
    let planned: Vec<_> = cases
        .into_iter()
        .map(|(op, inputs)| {
            let tiling = op.tiling(target).unwrap();
            let kind = op.kind();
            let output_bytes = match &op {
                KernelOp::Gemv { n, .. } => vec![n * 2],
                _ => vec![inputs[0].len(); kind.outputs().len()],
            };
            (
                op,
                Case {
                    kind,
                    tiling,
                    inputs,
                    output_bytes,
                    ub_bytes: target.ub_budget(),
                },
            )
        })
        .collect();
    let cases: Vec<Case> = planned.iter().map(|(_, c)| c.clone()).collect();
    let results = h.run(&cases).unwrap_or_else(|e| panic!("{target}: {e}"));
    planned
        .iter()
        .zip(results)
        .map(|((op, case), r)| {
            assert_eq!(
                r.rounded_down_copies, 0,
                "{target} {op:?}: a DataCopy lost its tail"
            );
            assert_eq!(
                r.gm_bytes_read,
                op.bytes_read(&case.tiling),
                "{target} {op:?}: GM bytes read vs the manifest"
            );
            r.outputs.iter().map(|o| halves(o)).collect()
        })
        .collect()
}

impl Clone for Case {
    fn clone(&self) -> Case {
        Case {
            kind: self.kind,
            tiling: self.tiling.clone(),
            inputs: self.inputs.clone(),
            output_bytes: self.output_bytes.clone(),
            ub_bytes: self.ub_bytes,
        }
    }
}

fn tensor(shape: &[usize], v: &[f16]) -> Tensor {
    Tensor::from_f32(shape.to_vec(), f32s(v))
}

/// rows × cols: one row, odd sizes, 32-byte tails, many rows (910B cores),
/// and rows longer than the UB.
const NORM_SHAPES: [(usize, usize); 6] = [
    (1, 576),
    (3, 577),
    (5, 17),
    (50, 33),
    (7, 1000),
    (2, 20_011),
];

fn rms_norm_sweep(target: Target, residual: bool) {
    let eps = 1e-5;
    let mut cases = Vec::new();
    let mut refs = Vec::new();
    for (i, &(rows, cols)) in NORM_SHAPES.iter().enumerate() {
        let seed = i as u64 * 3;
        let x = random_f16(rows * cols, seed, 2.0);
        let r = random_f16(rows * cols, seed + 1, 2.0);
        let gamma = random_f16(cols, seed + 2, 1.5);
        let xt = tensor(&[rows, cols], &x);
        let gt = tensor(&[cols], &gamma);
        let op = KernelOp::RmsNorm {
            rows,
            cols,
            eps,
            residual,
        };
        if residual {
            let sum = Add.eval(&[&xt, &tensor(&[rows, cols], &r)]).unwrap();
            let y = RmsNorm { eps }.eval(&[&sum, &gt]).unwrap();
            refs.push(vec![y.f32s().to_vec(), sum.f32s().to_vec()]);
            cases.push((op, vec![bytes(&x), bytes(&r), bytes(&gamma)]));
        } else {
            let y = RmsNorm { eps }.eval(&[&xt, &gt]).unwrap();
            refs.push(vec![y.f32s().to_vec()]);
            cases.push((op, vec![bytes(&x), bytes(&gamma)]));
        }
    }
    let got = run_checked(target, cases);
    for ((shape, got), want) in NORM_SHAPES.iter().zip(got).zip(refs) {
        for (o, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_close(&format!("{target} rms_norm {shape:?} output {o}"), g, w);
        }
    }
}

#[test]
fn rms_norm_matches_the_interpreter() {
    for target in Target::ALL {
        rms_norm_sweep(target, false);
    }
}

#[test]
fn add_rms_norm_matches_the_interpreter() {
    for target in Target::ALL {
        rms_norm_sweep(target, true);
    }
}

#[test]
fn swiglu_matches_the_interpreter() {
    const LENS: [usize; 6] = [1, 15, 16, 1000, 8960, 30_001];
    for target in Target::ALL {
        let mut cases = Vec::new();
        let mut refs = Vec::new();
        for (i, &len) in LENS.iter().enumerate() {
            let g = random_f16(len, 10 + i as u64, 6.0);
            let u = random_f16(len, 20 + i as u64, 3.0);
            let y = SwiGlu
                .eval(&[&tensor(&[len], &g), &tensor(&[len], &u)])
                .unwrap();
            refs.push(y.f32s().to_vec());
            cases.push((KernelOp::SwiGlu { len }, vec![bytes(&g), bytes(&u)]));
        }
        for ((len, got), want) in LENS.iter().zip(run_checked(target, cases)).zip(refs) {
            assert_close(&format!("{target} swiglu [{len}]"), &got[0], &want);
        }
    }
}

#[test]
fn rope_matches_the_interpreter() {
    // [batch, heads, tokens, dim]: decode, halves not a multiple of 32 bytes,
    // a tiny head, many heads and tokens.
    const SHAPES: [[usize; 4]; 5] = [
        [1, 9, 1, 64],
        [2, 3, 5, 80],
        [1, 2, 3, 6],
        [1, 14, 7, 128],
        [3, 1, 2, 34],
    ];
    for target in Target::ALL {
        let mut cases = Vec::new();
        let mut refs = Vec::new();
        for (i, &[b, h, t, d]) in SHAPES.iter().enumerate() {
            let x = random_f16(b * h * t * d, 30 + i as u64, 3.0);
            let angles = random_f16(b * t * d, 40 + i as u64, 3.0);
            let cos: Vec<f16> = angles
                .iter()
                .map(|a| f16::from_f32(a.to_f32().cos()))
                .collect();
            let sin: Vec<f16> = angles
                .iter()
                .map(|a| f16::from_f32(a.to_f32().sin()))
                .collect();
            let y = Rope
                .eval(&[
                    &tensor(&[b, h, t, d], &x),
                    &tensor(&[b, t, d], &cos),
                    &tensor(&[b, t, d], &sin),
                ])
                .unwrap();
            refs.push(y.f32s().to_vec());
            let op = KernelOp::Rope {
                batch: b,
                heads: h,
                tokens: t,
                dim: d,
            };
            cases.push((op, vec![bytes(&x), bytes(&cos), bytes(&sin)]));
        }
        for ((shape, got), want) in SHAPES.iter().zip(run_checked(target, cases)).zip(refs) {
            assert_close(&format!("{target} rope {shape:?}"), &got[0], &want);
        }
    }
}

/// The GEMV bound of the module doc, per element.
fn assert_gemv_close(what: &str, got: &[f32], want: &[f32], x: &[f32], w: &[f32], k: usize) {
    assert_close(what, got, want);
    let u = 2f32.powi(-24);
    for (j, (g, r)) in got.iter().zip(want).enumerate() {
        let magnitude: f32 = x
            .iter()
            .zip(&w[j * k..(j + 1) * k])
            .map(|(a, b)| (a * b).abs())
            .sum();
        let tol = r.abs() * 2f32.powi(-11) + 2.0 * k as f32 * u * magnitude + u;
        let err = (g - r).abs();
        assert!(
            err <= tol,
            "{what}: y[{j}] = {g}, reference {r} (|err| {err} > {tol})"
        );
    }
}

/// (k, n, int4 group): a hidden-size layer, odd sizes, a short last group
/// (576 in groups of 128), rows longer than the UB (K chunks), and enough
/// outputs for every 910B core.
const GEMV_SHAPES: [(usize, usize, usize); 6] = [
    (576, 64, 128),
    (160, 33, 32),
    (64, 1, 64),
    (13_312, 20, 64),
    (256, 3000, 32),
    (1536, 17, 128),
];

fn gemv_sweep(target: Target, weights_of: impl Fn(usize, usize) -> GemvWeights) {
    let mut cases = Vec::new();
    let mut refs = Vec::new();
    for (i, &(k, n, group)) in GEMV_SHAPES.iter().enumerate() {
        let weights = weights_of(k, group);
        let x = random_f16(k, 50 + i as u64, 1.0);
        let xt = tensor(&[1, k], &x);
        let w = f32s(&random_f16(n * k, 60 + i as u64, 0.2));
        let op = KernelOp::Gemv { k, n, weights };
        let (inputs, y, deq) = match weights {
            GemvWeights::Half => {
                let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                let y = Linear.eval(&[&xt, &tensor(&[n, k], &wh)]).unwrap();
                (vec![bytes(&x), bytes(&wh)], y, f32s(&wh))
            }
            GemvWeights::Int8 | GemvWeights::Int4 { .. } => {
                let scheme = match weights {
                    GemvWeights::Int8 => WeightQuant {
                        bits: 8,
                        group_size: k,
                        offset: false,
                    },
                    GemvWeights::Int4 { group_size, offset } => WeightQuant {
                        bits: 4,
                        group_size,
                        offset,
                    },
                    GemvWeights::Half => unreachable!(),
                };
                let m = quantize(&w, n, k, scheme).unwrap();
                let dtype = if scheme.bits == 8 {
                    DType::I8
                } else {
                    DType::U4
                };
                let len = m.q.len();
                let q = Tensor::quantized(dtype, vec![n, k], Arc::new(m.q.clone()), 0, len);
                let groups = scheme.groups(k);
                let scale = Tensor::from_f32([n, groups], f32s(&m.scale));
                let min = scheme
                    .offset
                    .then(|| Tensor::from_f32([n, groups], f32s(&m.min)));
                let mut args = vec![&xt, &q, &scale];
                let mut inputs = vec![bytes(&x), m.q.clone(), bytes(&m.scale)];
                if let Some(min) = &min {
                    args.push(min);
                    inputs.push(bytes(&m.min));
                }
                let ql = QuantLinear {
                    weights: scheme,
                    activations: ActivationQuant::None,
                    input_scale: false,
                    bias: false,
                };
                let y = ql.eval(&args).unwrap();
                (inputs, y, m.dequantize())
            }
        };
        refs.push((y.f32s().to_vec(), f32s(&x), deq, k));
        cases.push((op, inputs));
    }
    let got = run_checked(target, cases);
    for ((shape, got), (want, x, w, k)) in GEMV_SHAPES.iter().zip(got).zip(refs) {
        let what = format!("{target} gemv {:?} {shape:?}", weights_of(shape.0, shape.2));
        assert_gemv_close(&what, &got[0], &want, &x, &w, k);
    }
}

#[test]
fn fp16_gemv_matches_linear() {
    for target in Target::ALL {
        gemv_sweep(target, |_, _| GemvWeights::Half);
    }
}

#[test]
fn int8_gemv_matches_quant_linear() {
    for target in Target::ALL {
        gemv_sweep(target, |_, _| GemvWeights::Int8);
    }
}

#[test]
fn int4_gemv_matches_quant_linear() {
    for target in Target::ALL {
        for offset in [false, true] {
            gemv_sweep(target, |_, group_size| GemvWeights::Int4 {
                group_size,
                offset,
            });
        }
    }
}

#[test]
fn the_lm_head_runs_in_column_chunks_that_concatenate_to_the_whole() {
    // SmolLM2-135M's lm_head is [49152, 576]: wider than one call's weight budget.
    let (k, n) = (576, 49_152);
    let target = Target::Ascend310b;
    let chunks = tiling::gemv_column_chunks(k, n, GemvWeights::Half, target).unwrap();
    assert!(chunks.len() > 1, "{chunks:?}");
    let x = random_f16(k, 70, 1.0);
    let w = random_f16(n * k, 71, 0.2);
    let cases = chunks
        .iter()
        .map(|c| {
            let op = KernelOp::Gemv {
                k,
                n: c.len(),
                weights: GemvWeights::Half,
            };
            (op, vec![bytes(&x), bytes(&w[c.start * k..c.end * k])])
        })
        .collect();
    let got: Vec<f32> = run_checked(target, cases)
        .into_iter()
        .flat_map(|o| o[0].clone())
        .collect();
    let want = Linear
        .eval(&[&tensor(&[1, k], &x), &tensor(&[n, k], &w)])
        .unwrap();
    assert_gemv_close("lm_head chunks", &got, want.f32s(), &f32s(&x), &f32s(&w), k);
}

#[test]
fn a_ub_overflow_fails_loudly() {
    // The RMSNorm of a long row planned for the whole budget, run with a
    // quarter of it: the kernel's InitBuffer calls exceed the UB.
    let target = Target::Ascend310b;
    let op = KernelOp::RmsNorm {
        rows: 1,
        cols: 20_000,
        eps: 1e-5,
        residual: false,
    };
    let tiling = op.tiling(target).unwrap();
    let case = Case {
        kind: op.kind(),
        tiling,
        inputs: vec![vec![0; 40_000], vec![0; 40_000]],
        output_bytes: vec![40_000],
        ub_bytes: target.ub_budget() / 4,
    };
    let err = harness(target).run(&[case]).unwrap_err();
    assert!(err.contains("KILN_EMU_FAULT: UB overflow"), "{err}");
}

/// Compiles and runs a small program against the emulation header.
fn run_emulated_program(body: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    write_emulation(dir.path());
    let source = dir.path().join("program.cpp");
    let program = format!(
        "#include \"kernel_operator.h\"\nusing namespace AscendC;\nint main()\n{{\n    kiln_emu::BeginCore(0, 1, 4096, true);\n{body}\n    return 0;\n}}\n"
    );
    std::fs::write(&source, program).unwrap();
    let binary = dir.path().join("program");
    let mut include = std::ffi::OsString::from("-I");
    include.push(dir.path());
    gxx(&[
        "-std=c++17".as_ref(),
        include.as_os_str(),
        source.as_os_str(),
        "-o".as_ref(),
        binary.as_os_str(),
    ]);
    Command::new(&binary).output().unwrap()
}

#[test]
fn an_unaligned_data_copy_is_rounded_down_and_counted() {
    let out = run_emulated_program(
        r#"
    TPipe pipe;
    TBuf<TPosition::VECCALC> buf;
    pipe.InitBuffer(buf, 64);
    half src[17];
    for (int i = 0; i < 17; ++i) {
        src[i] = static_cast<half>(i + 1);
    }
    GlobalTensor<half> gm;
    gm.SetGlobalBuffer(src, 17);
    LocalTensor<half> ub = buf.Get<half>();
    DataCopy(ub, gm, 17); // 34 bytes: the hardware moves 32
    std::printf("%llu %g %d\n", (unsigned long long)kiln_emu::S().roundedDownCopies,
        static_cast<float>(ub.GetValue(15)), std::isnan(static_cast<float>(ub.GetValue(16))) ? 1 : 0);
    std::fflush(stdout);
    TBuf<TPosition::VECCALC> big;
    pipe.InitBuffer(big, 8192); // past the 4096-byte UB of this run
    std::printf("not reached\n");"#,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 16 elements arrived, the 17th is still the UB's poison, and it was counted.
    assert_eq!(stdout.lines().next(), Some("1 16 1"), "{stdout}{stderr}");
    assert!(
        !out.status.success() && stderr.contains("UB overflow"),
        "{stderr}"
    );
    assert!(!stdout.contains("not reached"));
}

#[test]
fn the_package_has_the_msopgen_layout() {
    for target in Target::ALL {
        let dir = tempfile::tempdir().unwrap();
        let package = generate_package(dir.path(), target, &one_of_each()).unwrap();
        let file = |p: &str| {
            std::fs::read_to_string(dir.path().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
        };
        for kind in KernelKind::ALL {
            let stem = kind.kernel_name();
            let kernel = file(&format!("op_kernel/{stem}.cpp"));
            assert!(kernel.contains(&format!(
                "extern \"C\" __global__ __aicore__ void {stem}(GM_ADDR"
            )));
            assert_eq!(kernel.contains("KERNEL_TYPE_AIV_ONLY"), target.aiv_only());
            let host = file(&format!("op_host/{stem}.cpp"));
            assert!(host.contains(&format!("AddConfig(\"{}\")", target.compute_unit())));
            assert!(host.contains("SetInferShape") && host.contains("SetTiling"));
            assert!(file(&format!("op_host/{stem}_tiling.h")).contains(&format!(
                "BEGIN_TILING_DATA_DEF({}TilingData)",
                kind.op_type()
            )));
            let plugin = file(&format!("framework/onnx_plugin/{stem}_plugin.cc"));
            let origin = format!(
                "OriginOpType({{\"{ONNX_DOMAIN}::{ONNX_DOMAIN_VERSION}::{}\"}})",
                kind.op_type()
            );
            assert!(
                plugin.contains("FrameworkType(ONNX)") && plugin.contains(&origin),
                "{plugin}"
            );
        }
        let presets: serde_json::Value = serde_json::from_str(&file("CMakePresets.json")).unwrap();
        let vars = &presets["configurePresets"][0]["cacheVariables"];
        assert_eq!(vars["ASCEND_COMPUTE_UNIT"]["value"], target.compute_unit());
        assert_eq!(vars["vendor_name"]["value"], VENDOR);
        assert!(file("build.sh").contains(&format!("ai_core-{}", target.soc_version())));
        let ops: serde_json::Value = serde_json::from_str(&file("op.json")).unwrap();
        assert_eq!(ops.as_array().unwrap().len(), KernelKind::ALL.len());
        let manifest: Package = serde_json::from_str(&file("kernels.json")).unwrap();
        assert_eq!(manifest, package);
        assert!(manifest.kernels.iter().all(|k| k.bytes_read > 0));
    }
}

#[test]
fn the_host_side_files_are_well_formed_cpp() {
    // Against stand-ins of the CANN host headers: a syntax and type check,
    // not a CANN build.
    for target in Target::ALL {
        let dir = tempfile::tempdir().unwrap();
        generate_package(dir.path(), target, &one_of_each()).unwrap();
        write_emulation(dir.path());
        for (path, text) in host_stub_files() {
            write(&dir.path().join(path), text).unwrap();
        }
        let include = |p: PathBuf| {
            let mut s = std::ffi::OsString::from("-I");
            s.push(p);
            s
        };
        let mut args: Vec<std::ffi::OsString> = ["-std=c++17", "-fsyntax-only", "-Wall", "-Werror"]
            .map(Into::into)
            .to_vec();
        args.push(include(dir.path().join("host")));
        args.push(include(dir.path().to_path_buf()));
        for kind in KernelKind::ALL {
            let stem = kind.kernel_name();
            args.push(dir.path().join(format!("op_host/{stem}.cpp")).into());
            // The plugins do not depend on the target.
            if target == Target::Ascend310b {
                args.push(
                    dir.path()
                        .join(format!("framework/onnx_plugin/{stem}_plugin.cc"))
                        .into(),
                );
            }
        }
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        gxx(&refs);
    }
}

#[test]
fn names_from_model_files_never_reach_generated_code() {
    let hostile = [
        "model.layers.0\"); system(\"rm -rf /\"); //",
        "*/ #include </etc/passwd> /*",
        "$(touch /tmp/pwned)`id`",
        "name\nwith\nnewlines\\",
        "{{ op_type }}{% raw %}",
    ];
    let requests: Vec<KernelRequest> = one_of_each()
        .into_iter()
        .zip(hostile.iter().cycle())
        .map(|(r, name)| KernelRequest {
            source: name.to_string(),
            ..r
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    generate_package(dir.path(), Target::Ascend310b, &requests).unwrap();
    let mut checked = 0;
    for entry in walk(dir.path()) {
        let text = std::fs::read_to_string(&entry).unwrap();
        let is_manifest = entry.ends_with("kernels.json");
        for name in hostile {
            for marker in ["system(", "/etc/passwd", "pwned", "newlines", "{% raw"] {
                if name.contains(marker) {
                    assert!(
                        is_manifest || !text.contains(marker),
                        "{} holds {marker:?}",
                        entry.display()
                    );
                }
            }
        }
        checked += 1;
    }
    assert!(checked >= 4 * KernelKind::ALL.len() + 4);
    // The manifest keeps the names as JSON strings, intact.
    let manifest: Package =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("kernels.json")).unwrap())
            .unwrap();
    assert_eq!(manifest.kernels[0].source, hostile[0]);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
