//! Helpers shared by the end-to-end tests: running the `kiln` binary and
//! reading the committed fixtures and goldens.
#![allow(dead_code)]

use kiln_runtime::npy::{self, NpyArray};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const FIXTURES: [&str; 6] = [
    "llama-gqa",
    "llama-bf16-tied",
    "llama3-rope",
    "qwen2-old-config",
    "mistral-sharded",
    "qwen3",
];

/// Fixtures of the families added after the first four, and of the layouts
/// those brought (sliding windows): checked against
/// transformers by the interpreter and by ONNX Runtime (fp32 and fp16), but
/// left out of the per-fixture compile matrix to keep CI's time.
pub const FAMILY_FIXTURES: [&str; 8] = [
    "gemma",
    "phi3",
    "gemma2",
    "gemma3",
    "phi3-longrope",
    "gemma3-pattern6",
    "mistral-window",
    "phi3-window",
];

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn model_dir(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/models").join(name)
}

pub struct Golden {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub generated_text: String,
    /// `[generated tokens][vocab]`
    pub logits: Vec<Vec<f32>>,
}

pub fn golden(name: &str) -> Golden {
    let dir = repo_root().join("tests/fixtures/golden").join(name);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        json[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    Golden {
        prompt: json["prompt"].as_str().unwrap().to_string(),
        prompt_ids: ids("prompt_ids"),
        generated_ids: ids("generated_ids"),
        generated_text: json["generated_text"].as_str().unwrap().to_string(),
        logits: read_rows(&dir.join("logits.npy")),
    }
}

/// A 2-D f32 .npy as rows.
pub fn read_rows(path: &Path) -> Vec<Vec<f32>> {
    match npy::read(path).unwrap() {
        NpyArray::F32 { shape, data } => {
            assert_eq!(shape.len(), 2, "{}: expected a 2-D array", path.display());
            data.chunks(shape[1]).map(<[f32]>::to_vec).collect()
        }
        other => panic!("{}: expected f32, got {other:?}", path.display()),
    }
}

pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: exit code 1, a message containing every needle,
/// and no panic.
pub fn assert_fails_with(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected failure, got {:?}\nstderr: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "kiln panicked:\n{err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
}

pub fn join_ids(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// The largest |a − b| over all rows; NaN if any difference is NaN, so that
/// every `err <= tolerance` check fails on NaN.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row counts differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row lengths differ");
            max_abs(x, y)
        })
        .fold(0.0, nan_max)
}

/// The largest |a − b|; NaN if any difference is NaN.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, nan_max)
}

/// `max` that propagates NaN (`f32::max` drops it).
pub fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// Cosine similarity of two vectors (NaN in, NaN out).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// `max |x|`, the scale a relative tolerance is taken of; NaN if any `x` is.
pub fn max_magnitude(a: &[f32]) -> f32 {
    a.iter().map(|x| x.abs()).fold(0.0, nan_max)
}

#[test]
fn nan_fails_every_tolerance_helper() {
    let rows = |v: f32| vec![vec![0.0, v, 1.0]];
    // The checks are written `err <= tolerance` / `cos >= min`: NaN fails both.
    let within = |err: f32| err <= 1.0;
    let close = |cos: f64| cos >= 0.5;
    for nan in [f32::NAN, -f32::NAN] {
        // On either side, and wherever it is in the row.
        assert!(!within(max_abs_diff(&rows(nan), &rows(0.0))));
        assert!(!within(max_abs_diff(&rows(0.0), &rows(nan))));
        assert!(!within(max_abs(&[nan], &[0.0])));
        assert!(!within(max_abs(&[0.0, 0.0], &[0.0, nan])));
        assert!(!within(max_abs(&[nan, 0.0], &[0.0, 0.0])));
        assert!(!close(cosine(&[nan, 1.0], &[1.0, 1.0])));
        assert!(!close(cosine(&[1.0, 1.0], &[1.0, nan])));
        // A relative bound `err <= k · scale` fails too when only the
        // expected side holds the NaN.
        let (got, want) = ([0.5f32, 1.0], [nan, 1.0]);
        let relative = |err: f32, scale: f32| err <= 1e-3 * scale;
        assert!(!relative(max_abs(&got, &want), max_magnitude(&want)));
        assert!(max_magnitude(&[1.0, nan]).is_nan());
    }
    // And the helpers still measure what they should.
    assert_eq!(max_abs_diff(&rows(1.0), &rows(0.5)), 0.5);
    assert_eq!(max_abs(&[1.0, -2.0], &[1.0, 2.0]), 4.0);
    assert_eq!(max_magnitude(&[1.0, -3.0]), 3.0);
    assert!(close(cosine(&[1.0, 2.0], &[2.0, 4.0])));
    assert!(!within(max_abs(&[f32::INFINITY], &[0.0])));
}

/// The Python that has onnx, onnxruntime and numpy: `$KILN_PYTHON`, else the
/// repository's `.venv` (which `.ci/run` creates). Missing is a failure, not
/// a skip: these checks are the truth for the ONNX Kiln writes.
pub fn python() -> PathBuf {
    let candidate = std::env::var_os("KILN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    let ok = Command::new(&candidate)
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{} cannot import onnx, onnxruntime and numpy: run `bash .ci/run` once (it creates .venv), \
         or set KILN_PYTHON to a Python that has tests/requirements.txt installed",
        candidate.display()
    );
    candidate
}

/// Runs `kiln compile` on a fixture into `out`, asserting success.
pub fn compile_fixture(name: &str, out: &Path, extra: &[&str]) -> Output {
    let model = model_dir(name);
    let mut args = vec![
        "compile",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-atc",
    ];
    args.extend_from_slice(extra);
    let o = kiln(&args);
    assert!(
        o.status.success(),
        "{name}: kiln compile failed:\n{}",
        stderr(&o)
    );
    o
}

/// Makes a compiled directory's weights.bin (kiln compile records how to
/// make it from the reference weights instead of storing it), as `kiln-run
/// expand-weights` does: for the Python tools that read the ONNX graphs'
/// external data. Nothing happens when it is there or not needed.
pub fn expand_weights(dir: &Path) {
    let manifest = kiln_runtime::compiled::manifest::Manifest::load(dir).unwrap();
    kiln_runtime::compiled::weights_bin::ensure(dir, &manifest, |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Writes a stand-in tool (a test double: atc, npu-smi, …) as an executable script.
pub fn write_executable(path: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, script).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The x86_64 `kiln-run` beside the `kiln` binary: `cargo test --workspace`
/// builds it; `cargo test -p kiln` does not, so it is built here then.
pub fn kiln_run_binary() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name("kiln-run");
    if !exe.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "kiln-runtime", "--bin", "kiln-run"])
            .current_dir(repo_root())
            .status()
            .expect("cargo runs");
        assert!(
            status.success() && exe.is_file(),
            "building kiln-run failed"
        );
    }
    exe
}
