//! Comparing two backends' logits step by step: how close, and where they part.

use crate::compiled::CompiledModel;
use crate::session::{CpuSession, Engine};
use std::path::{Path, PathBuf};

/// A backend a compiled model can run on, for diffs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffBackend {
    /// The reference interpreter on the IR and reference weights.
    Cpu,
    /// ONNX Runtime on the ONNX graphs, through the directory's `ort_run.py`
    /// (needs Python with numpy and onnxruntime: `--python` or `$KILN_PYTHON`).
    Onnxruntime,
    /// The .om files on ACL device 0 ([`crate::npu::NpuSession`]; needs CANN).
    Npu,
}

impl DiffBackend {
    pub fn name(self) -> &'static str {
        match self {
            DiffBackend::Cpu => "cpu",
            DiffBackend::Onnxruntime => "onnxruntime",
            DiffBackend::Npu => "npu",
        }
    }
}

/// Both backends' logits compared, step by step.
pub struct DiffReport {
    /// The tokens both were fed (A's greedy choices).
    pub tokens: Vec<u32>,
    pub steps: Vec<StepDiff>,
}

impl DiffReport {
    pub fn first_failure(&self, t: &Thresholds) -> Option<String> {
        self.steps
            .iter()
            .enumerate()
            .find_map(|(i, d)| d.failure(t).map(|why| format!("step {i}: {why}")))
    }
}

/// Runs `steps` tokens through A greedily, then the same tokens through B.
pub fn diff_backends(
    model: &CompiledModel,
    a: DiffBackend,
    b: DiffBackend,
    prompt: &[u32],
    steps: usize,
    python: Option<&Path>,
) -> Result<DiffReport, String> {
    let (tokens, logits_a) = run_backend(a, model, prompt, steps, None, python)?;
    let (_, logits_b) = run_backend(b, model, prompt, steps, Some(&tokens), python)?;
    if logits_a.len() != logits_b.len() {
        return Err(format!(
            "{} gave {} steps, {} gave {}",
            a.name(),
            logits_a.len(),
            b.name(),
            logits_b.len()
        ));
    }
    let steps = logits_a
        .iter()
        .zip(&logits_b)
        .map(|(x, y)| compare(x, y))
        .collect();
    Ok(DiffReport { tokens, steps })
}

/// Logits of `steps` tokens: `follow` gives the tokens to feed (so both
/// sides of a diff see the same context); without it, greedy.
fn run_backend(
    backend: DiffBackend,
    model: &CompiledModel,
    prompt: &[u32],
    steps: usize,
    follow: Option<&[u32]>,
    python: Option<&Path>,
) -> Result<(Vec<u32>, Vec<Vec<f32>>), String> {
    match backend {
        DiffBackend::Npu => {
            let mut session = crate::npu::NpuSession::open(&model.dir, &model.manifest, 0)
                .map_err(|e| e.to_string())?;
            let mut logits = session.forward(prompt).map_err(|e| e.to_string())?;
            let (mut tokens, mut rows) = (Vec::new(), Vec::new());
            for step in 0..steps {
                let token = follow
                    .and_then(|f| f.get(step).copied())
                    .unwrap_or_else(|| crate::generate::argmax(&logits));
                rows.push(std::mem::take(&mut logits));
                tokens.push(token);
                if step + 1 < steps {
                    logits = session.forward(&[token]).map_err(|e| e.to_string())?;
                }
            }
            Ok((tokens, rows))
        }
        DiffBackend::Cpu => {
            let mut session =
                CpuSession::new(&model.ir, &model.weights).map_err(|e| e.to_string())?;
            let mut logits = session.forward(prompt).map_err(|e| e.to_string())?;
            let (mut tokens, mut rows) = (Vec::new(), Vec::new());
            for step in 0..steps {
                let token = follow
                    .and_then(|f| f.get(step).copied())
                    .unwrap_or_else(|| crate::generate::argmax(&logits));
                rows.push(std::mem::take(&mut logits));
                tokens.push(token);
                if step + 1 < steps {
                    logits = session.forward(&[token]).map_err(|e| e.to_string())?;
                }
            }
            Ok((tokens, rows))
        }
        DiffBackend::Onnxruntime => {
            let python = python
                .map(Path::to_path_buf)
                .or_else(|| std::env::var_os("KILN_PYTHON").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("python3"));
            let runner = model.dir.join("ort_run.py");
            let logits_path =
                std::env::temp_dir().join(format!("kiln-diff-{}.npy", std::process::id()));
            let join = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            let mut cmd = std::process::Command::new(&python);
            cmd.arg(&runner)
                .arg(&model.dir)
                .args(["--token-ids", &join(prompt)])
                .args([
                    "--max-new-tokens",
                    &steps.to_string(),
                    "--ignore-eos",
                    "--save-logits",
                ])
                .arg(&logits_path);
            if let Some(f) = follow {
                cmd.args(["--follow-ids", &join(f)]);
            }
            let out = cmd.output().map_err(|e| {
                format!("cannot run {} {}: {e}", python.display(), runner.display())
            })?;
            if !out.status.success() {
                return Err(format!(
                    "the onnxruntime backend failed ({} {}):\n{}",
                    python.display(),
                    runner.display(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let tokens = String::from_utf8_lossy(&out.stdout)
                .trim()
                .split(',')
                .map(|t| {
                    t.parse::<u32>()
                        .map_err(|e| format!("ort_run.py printed {t:?}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let array = crate::npy::read(&logits_path).map_err(|e| e.to_string());
            let _ = std::fs::remove_file(&logits_path);
            let crate::npy::NpyArray::F32 { shape, data } = array? else {
                return Err("ort_run.py saved logits that are not f32".into());
            };
            Ok((
                tokens,
                data.chunks(shape[1].max(1)).map(<[f32]>::to_vec).collect(),
            ))
        }
    }
}

/// How two logit rows compare.
#[derive(Clone, Debug, PartialEq)]
pub struct StepDiff {
    pub max_abs: f32,
    pub mean_abs: f32,
    pub cosine: f64,
    pub top1_agrees: bool,
    /// How many of B's top 5 are among A's top 5.
    pub top5_overlap: usize,
}

fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
    idx.truncate(k);
    idx
}

pub fn compare(a: &[f32], b: &[f32]) -> StepDiff {
    assert_eq!(a.len(), b.len(), "logit rows of different vocabularies");
    let (mut max_abs, mut sum_abs, mut dot, mut na, mut nb) = (0f32, 0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = (x - y).abs();
        max_abs = max_abs.max(d);
        sum_abs += d as f64;
        dot += x as f64 * y as f64;
        na += x as f64 * x as f64;
        nb += y as f64 * y as f64;
    }
    let cosine = if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    };
    let (ta, tb) = (top_k(a, 5), top_k(b, 5));
    StepDiff {
        max_abs,
        mean_abs: (sum_abs / a.len().max(1) as f64) as f32,
        cosine,
        top1_agrees: ta.first() == tb.first(),
        top5_overlap: tb.iter().filter(|i| ta.contains(i)).count(),
    }
}

/// Limits past which a diff fails.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    pub min_cosine: f64,
    pub max_abs: f32,
}

impl StepDiff {
    /// Why this step fails the thresholds, if it does.
    pub fn failure(&self, t: &Thresholds) -> Option<String> {
        if self.cosine < t.min_cosine {
            Some(format!("cosine {:.6} < {}", self.cosine, t.min_cosine))
        } else if self.max_abs > t.max_abs {
            Some(format!("max abs {:.3e} > {:.1e}", self.max_abs, t.max_abs))
        } else if !self.top1_agrees {
            Some("the top-1 tokens differ".into())
        } else {
            None
        }
    }
}

// The `diff` command, shared by `kiln diff` and `kiln-run diff`.

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum DiffBackendArg {
    /// The reference interpreter (model.kiln.json + weights.safetensors).
    Cpu,
    /// ONNX Runtime on prefill.onnx / decode.onnx, through the directory's
    /// ort_run.py (needs Python with numpy and onnxruntime).
    Onnxruntime,
    /// prefill.om / decode.om on the NPU through ACL (needs CANN).
    Npu,
}

impl From<DiffBackendArg> for DiffBackend {
    fn from(b: DiffBackendArg) -> DiffBackend {
        match b {
            DiffBackendArg::Cpu => DiffBackend::Cpu,
            DiffBackendArg::Onnxruntime => DiffBackend::Onnxruntime,
            DiffBackendArg::Npu => DiffBackend::Npu,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// A directory written by `kiln compile`.
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    pub a: DiffBackendArg,
    #[arg(long, value_enum, default_value = "onnxruntime")]
    pub b: DiffBackendArg,
    #[command(flatten)]
    pub prompt: crate::run::PromptArgs,
    /// Generated tokens to compare (the first comes from the prefill).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Fail below this cosine similarity of a step's logits.
    #[arg(long, default_value_t = 0.99999)]
    pub min_cosine: f64,
    /// Fail above this max abs difference of a step's logits.
    #[arg(long, default_value_t = 1e-3)]
    pub max_abs: f32,
    /// Python for the onnxruntime backend [default: $KILN_PYTHON, else python3]
    #[arg(long)]
    pub python: Option<PathBuf>,
}

/// Runs the diff and prints its table; `Err` (exit 1) past the thresholds.
pub fn diff_command(args: &DiffArgs) -> Result<(), String> {
    let model = crate::compiled::CompiledModel::open(&args.model).map_err(|e| e.to_string())?;
    let tokenizer = match (&args.prompt.prompt, model.tokenizer_path()) {
        (Some(_), Some(path)) => {
            Some(crate::tokenizer::Tokenizer::from_file(&path).map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    let template = crate::chat::ChatTemplate::from_dir(&model.dir).map_err(|e| e.to_string())?;
    let prompt = args
        .prompt
        .encode(tokenizer.as_ref(), template.as_ref())
        .map_err(|e| e.to_string())?;
    let (a, b) = (DiffBackend::from(args.a), DiffBackend::from(args.b));
    let report = diff_backends(&model, a, b, &prompt, args.steps, args.python.as_deref())?;
    let thresholds = Thresholds {
        min_cosine: args.min_cosine,
        max_abs: args.max_abs,
    };
    println!(
        "{} vs {} on {} prompt tokens (both fed {}'s greedy tokens)",
        a.name(),
        b.name(),
        prompt.len(),
        a.name()
    );
    println!(
        "{:>4} {:>7} {:>11} {:>11} {:>10} {:>5} {:>5}",
        "step", "token", "max abs", "mean abs", "cosine", "top1", "top5"
    );
    for (step, (d, token)) in report.steps.iter().zip(&report.tokens).enumerate() {
        println!(
            "{step:>4} {token:>7} {:>11.3e} {:>11.3e} {:>10.7} {:>5} {:>4}/5",
            d.max_abs,
            d.mean_abs,
            d.cosine,
            if d.top1_agrees { "yes" } else { "NO" },
            d.top5_overlap
        );
    }
    match report.first_failure(&thresholds) {
        None => {
            println!(
                "ok: every step within cosine ≥ {} and max abs ≤ {:.1e}",
                args.min_cosine, args.max_abs
            );
            Ok(())
        }
        Some(why) => Err(format!("{} and {} diverge at {why}", a.name(), b.name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_rows_agree_and_perturbed_ones_do_not() {
        let a = [1.0, 3.0, -2.0, 0.5, 2.0, 0.1];
        let d = compare(&a, &a);
        assert_eq!((d.max_abs, d.top1_agrees, d.top5_overlap), (0.0, true, 5));
        assert!((d.cosine - 1.0).abs() < 1e-12);
        let b = [1.0, 1.0, -2.0, 0.5, 2.5, 0.1];
        let d = compare(&a, &b);
        assert_eq!(d.max_abs, 2.0);
        assert!(!d.top1_agrees);
        let t = Thresholds {
            min_cosine: 0.99999,
            max_abs: 1e-3,
        };
        assert!(d.failure(&t).unwrap().contains("cosine"));
    }
}
