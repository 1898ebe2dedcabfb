//! Comparing two backends' logits step by step: how close, and where they
//! part; optionally intermediate values too ([`dump`]), and a plot ([`plot`]).

pub mod dump;
pub mod plot;

use crate::compiled::CompiledModel;
use crate::engine::{CpuSession, Engine};
use dump::{DumpRequest, TensorDiff};
use std::path::{Path, PathBuf};

/// A backend a compiled model can run on, for diffs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffBackend {
    /// The reference interpreter on the IR and reference weights.
    Cpu,
    /// ONNX Runtime on the ONNX graphs, through the directory's `ort_run.py`
    /// (needs Python with numpy and onnxruntime: `--python` or `$KILN_PYTHON`).
    Onnxruntime,
    /// The .om files on ACL device 0 ([`crate::engine::npu::NpuSession`]; needs CANN).
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

    /// Whether the backend can dump intermediate values: not compiled .om
    /// graphs, whose outputs ATC fixed when it built them.
    pub fn supports_dumps(self) -> bool {
        matches!(self, DiffBackend::Cpu | DiffBackend::Onnxruntime)
    }
}

/// Both backends' logits compared, step by step.
pub struct DiffReport {
    /// The tokens both were fed (A's greedy choices).
    pub tokens: Vec<u32>,
    pub steps: Vec<StepDiff>,
    /// Dumped intermediate values compared, step by step in graph order
    /// (empty without dumps).
    pub tensors: Vec<TensorDiff>,
}

impl DiffReport {
    pub fn first_failure(&self, t: &Thresholds) -> Option<String> {
        self.steps
            .iter()
            .enumerate()
            .find_map(|(i, d)| d.failure(t).map(|why| format!("step {i}: {why}")))
    }

    /// The first dumped value past the thresholds, in step then graph order:
    /// where the backends start to part.
    pub fn first_tensor_failure(&self, t: &Thresholds) -> Option<(&TensorDiff, String)> {
        self.tensors
            .iter()
            .find_map(|d| d.closeness.failure(t).map(|why| (d, why)))
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
    diff_backends_dumping(model, a, b, prompt, steps, python, None)
}

/// Like [`diff_backends`], and both backends dump the requested values
/// (see [`dump`] for the layout), which are then compared.
pub fn diff_backends_dumping(
    model: &CompiledModel,
    a: DiffBackend,
    b: DiffBackend,
    prompt: &[u32],
    steps: usize,
    python: Option<&Path>,
    dumps: Option<&DumpRequest>,
) -> Result<DiffReport, String> {
    if dumps.is_some() {
        check_dump_backends(a, b)?;
    }
    let (tokens, logits_a) = run_backend(a, model, prompt, steps, None, python, dumps)?;
    let (_, logits_b) = run_backend(b, model, prompt, steps, Some(&tokens), python, dumps)?;
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
    let tensors = match dumps {
        Some(request) => dump::compare_dumps(request, a.name(), b.name(), logits_a.len())
            .map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    Ok(DiffReport {
        tokens,
        steps,
        tensors,
    })
}

/// Whether `a` and `b` can dump values for a comparison.
fn check_dump_backends(a: DiffBackend, b: DiffBackend) -> Result<(), String> {
    if let Some(backend) = [a, b].into_iter().find(|x| !x.supports_dumps()) {
        return Err(no_dumps_on(backend));
    }
    if a == b {
        // Each backend's dumps go to a directory named after it.
        return Err(format!(
            "dumps compare two backends; --a and --b are both {}",
            a.name()
        ));
    }
    Ok(())
}

fn no_dumps_on(backend: DiffBackend) -> String {
    format!(
        "the {} backend cannot dump intermediate values: it runs .om graphs, whose outputs \
         ATC fixed when it compiled them, so dumping one would mean recompiling the model \
         with it as an extra output. Compare layer by layer with --a cpu --b onnxruntime, \
         and compare {} with the others by logits only (without --dump)",
        backend.name(),
        backend.name()
    )
}

/// Runs `prompt` and then `steps - 1` single tokens through `session`: the
/// tokens `follow` gives, or greedy choices without it. `after` sees the
/// session after the forward that made step `i`'s logits.
fn drive<E: Engine>(
    session: &mut E,
    prompt: &[u32],
    steps: usize,
    follow: Option<&[u32]>,
    mut after: impl FnMut(&mut E, usize) -> Result<(), String>,
) -> Result<(Vec<u32>, Vec<Vec<f32>>), String> {
    let mut logits = session.forward(prompt).map_err(|e| e.to_string())?;
    after(session, 0)?;
    let (mut tokens, mut rows) = (Vec::new(), Vec::new());
    for step in 0..steps {
        let token = follow
            .and_then(|f| f.get(step).copied())
            .unwrap_or_else(|| crate::generate::argmax(&logits));
        rows.push(std::mem::take(&mut logits));
        tokens.push(token);
        if step + 1 < steps {
            logits = session.forward(&[token]).map_err(|e| e.to_string())?;
            after(session, step + 1)?;
        }
    }
    Ok((tokens, rows))
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
    dumps: Option<&DumpRequest>,
) -> Result<(Vec<u32>, Vec<Vec<f32>>), String> {
    match backend {
        DiffBackend::Npu => {
            let mut session = crate::engine::npu::NpuSession::open(&model.dir, &model.manifest, 0)
                .map_err(|e| e.to_string())?;
            drive(&mut session, prompt, steps, follow, |_, _| Ok(()))
        }
        DiffBackend::Cpu => {
            let mut session =
                CpuSession::new(&model.ir, &model.weights).map_err(|e| e.to_string())?;
            if let Some(request) = dumps {
                session.capture(request.names.clone());
            }
            // Step `step`'s values come from the forward that made its logits.
            let save = |session: &mut CpuSession, step: usize| match dumps {
                Some(request) => {
                    dump::write_taps(&request.dir, backend.name(), step, &session.take_captured())
                        .map_err(|e| e.to_string())
                }
                None => Ok(()),
            };
            drive(&mut session, prompt, steps, follow, save)
        }
        DiffBackend::Onnxruntime => {
            let python = python
                .map(Path::to_path_buf)
                .or_else(|| std::env::var_os("KILN_PYTHON").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("python3"));
            check_python(&python, dumps.is_some())?;
            ensure_weights_bin(model)?;
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
            if let Some(request) = dumps {
                check_runner_dumps(&runner)?;
                cmd.arg("--dump")
                    .arg(request.names.join(","))
                    .arg("--dump-dir")
                    .arg(dump::backend_dir(&request.dir, backend.name()));
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

/// ONNX Runtime reads the graphs' weights.bin: made from the reference
/// weights first when the directory does not store it, saying so.
fn ensure_weights_bin(model: &CompiledModel) -> Result<(), String> {
    use crate::compiled::weights_bin::{self, State};
    if weights_bin::state(&model.dir, &model.manifest) != State::Missing {
        return Ok(());
    }
    let recipe = weights_bin::recipe_of(&model.dir, &model.manifest).map_err(|e| e.to_string())?;
    crate::note!(
        "note: {} is not stored in {}: writing it ({:.1} MB) from {} for ONNX Runtime, as \
         `kiln-run expand-weights {}` does",
        recipe.file,
        model.dir.display(),
        recipe.bytes as f64 / 1e6,
        model.manifest.reference_weights,
        model.dir.display()
    );
    let made = weights_bin::expand(
        &model.dir,
        &model.manifest,
        weights_bin::tenths("note", &recipe.file),
    )
    .map_err(|e| e.to_string())?;
    crate::note!(
        "note: wrote {} in {:.1} s (sha256 as the manifest records)",
        made.path.display(),
        made.seconds
    );
    Ok(())
}

/// Refuses, with what to do, a Python that cannot run ort_run.py: rather
/// than its traceback after the CPU side has run.
fn check_python(python: &Path, dumps: bool) -> Result<(), String> {
    let modules = if dumps {
        "numpy, onnxruntime, onnx"
    } else {
        "numpy, onnxruntime"
    };
    let ok = std::process::Command::new(python)
        .args(["-c", &format!("import {modules}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Ok(());
    }
    Err(format!(
        "`--b onnxruntime` needs a Python with {modules}, and {} cannot import them (or does not \
         run). Install them (`{} -m pip install numpy onnxruntime onnx`), or point --python or \
         $KILN_PYTHON at a Python that has them",
        python.display(),
        python.display()
    ))
}

/// Compiled directories from before `--dump` carry an ort_run.py without it.
fn check_runner_dumps(runner: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(runner)
        .map_err(|e| format!("cannot read {}: {e}", runner.display()))?;
    if text.contains("--dump-dir") {
        Ok(())
    } else {
        Err(format!(
            "{} predates --dump: recompile the model, or copy examples/ort_run.py over it",
            runner.display()
        ))
    }
}

/// How close two arrays are: the metrics every compared pair gets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Closeness {
    /// Infinite when either side holds a NaN, so a NaN never passes for
    /// agreement.
    pub max_abs: f32,
    pub mean_abs: f32,
    pub cosine: f64,
    /// `max |a|`: the scale a relative `--max-abs` is taken of.
    pub scale: f32,
}

impl Closeness {
    pub fn of(a: &[f32], b: &[f32]) -> Closeness {
        assert_eq!(a.len(), b.len(), "compared arrays differ in length");
        let (mut max_abs, mut sum_abs, mut dot, mut na, mut nb) = (0f32, 0f64, 0f64, 0f64, 0f64);
        let mut scale = 0f32;
        for (&x, &y) in a.iter().zip(b) {
            scale = scale.max(x.abs());
            let d = (x - y).abs();
            // f32::max ignores NaN: count it as the worst difference instead.
            let d = if d.is_nan() { f32::INFINITY } else { d };
            max_abs = max_abs.max(d);
            sum_abs += d as f64;
            dot += x as f64 * y as f64;
            na += x as f64 * x as f64;
            nb += y as f64 * y as f64;
        }
        let cosine = if na == 0.0 && nb == 0.0 {
            1.0
        } else if na == 0.0 || nb == 0.0 {
            0.0
        } else {
            dot / (na.sqrt() * nb.sqrt())
        };
        Closeness {
            max_abs,
            mean_abs: (sum_abs / a.len().max(1) as f64) as f32,
            cosine,
            scale,
        }
    }

    /// Why this pair fails the thresholds, if it does (NaN fails).
    pub fn failure(&self, t: &Thresholds) -> Option<String> {
        let limit = t.max_abs.limit(self.scale);
        if self.cosine.is_nan() || self.cosine < t.min_cosine {
            Some(format!("cosine {:.6} < {}", self.cosine, t.min_cosine))
        } else if self.max_abs.is_nan() || limit.is_nan() || self.max_abs > limit {
            Some(format!(
                "max abs {:.3e} > {limit:.3e} ({})",
                self.max_abs, t.max_abs
            ))
        } else {
            None
        }
    }
}

/// How two logit rows compare.
#[derive(Clone, Debug, PartialEq)]
pub struct StepDiff {
    pub max_abs: f32,
    pub mean_abs: f32,
    pub cosine: f64,
    /// `max |a|` of A's logits.
    pub scale: f32,
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
    let Closeness {
        max_abs,
        mean_abs,
        cosine,
        scale,
    } = Closeness::of(a, b);
    let (ta, tb) = (top_k(a, 5), top_k(b, 5));
    StepDiff {
        max_abs,
        mean_abs,
        cosine,
        scale,
        top1_agrees: ta.first() == tb.first(),
        top5_overlap: tb.iter().filter(|i| ta.contains(i)).count(),
    }
}

/// Limits past which a diff fails.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    pub min_cosine: f64,
    pub max_abs: MaxAbs,
}

/// The largest difference allowed between two arrays.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaxAbs {
    Absolute(f32),
    /// A fraction of `max |a|` (fp16 logits carry a relative error).
    OfScale(f32),
}

impl MaxAbs {
    pub fn limit(self, scale: f32) -> f32 {
        match self {
            MaxAbs::Absolute(limit) => limit,
            MaxAbs::OfScale(fraction) => fraction * scale,
        }
    }
}

impl std::fmt::Display for MaxAbs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaxAbs::Absolute(limit) => write!(f, "{limit:.1e}"),
            MaxAbs::OfScale(fraction) => write!(f, "{fraction:.1e} × max|logits|"),
        }
    }
}

impl Thresholds {
    /// fp32 graphs compute what the interpreter computes up to f32
    /// reordering: tight limits.
    pub const FLOAT32: Thresholds = Thresholds {
        min_cosine: 0.99999,
        max_abs: MaxAbs::Absolute(1e-3),
    };
    /// fp16 graphs round every activation to 11 bits: logits differ by a
    /// few thousandths of their scale (measured: 1.2e-2 on a fixture,
    /// 4.5e-2 on SmolLM2, cosine ≥ 0.9999994, every top-1 equal).
    pub const FLOAT16: Thresholds = Thresholds {
        min_cosine: 0.9999,
        max_abs: MaxAbs::OfScale(1e-2),
    };

    /// The defaults for a compiled model: by the dtype of its graphs
    /// (quantized weights are the same on both sides of a diff, so only the
    /// activations' precision matters).
    pub fn for_dtype(dtype: &str) -> Thresholds {
        match dtype {
            "float16" => Thresholds::FLOAT16,
            _ => Thresholds::FLOAT32,
        }
    }
}

impl StepDiff {
    /// Why this step fails the thresholds, if it does.
    pub fn failure(&self, t: &Thresholds) -> Option<String> {
        let closeness = Closeness {
            max_abs: self.max_abs,
            mean_abs: self.mean_abs,
            cosine: self.cosine,
            scale: self.scale,
        };
        closeness
            .failure(t)
            .or_else(|| (!self.top1_agrees).then(|| "the top-1 tokens differ".to_string()))
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
    pub prompt: crate::generate::run::PromptArgs,
    /// Generated tokens to compare (the first comes from the prefill).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Fail below this cosine similarity of a step's logits [default: by
    /// the compiled dtype: 0.99999 for float32, 0.9999 for float16]
    #[arg(long)]
    pub min_cosine: Option<f64>,
    /// Fail above this max abs difference of a step's logits [default: by
    /// the compiled dtype: 1e-3 for float32; for float16 1e-2 × the largest
    /// |logit| of A's step]
    #[arg(long)]
    pub max_abs: Option<f32>,
    /// Python for the onnxruntime backend [default: $KILN_PYTHON, else python3]
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Also dump these intermediate values, by IR value name, from both
    /// backends to .npy and compare them step by step, layer by layer.
    #[arg(
        long,
        value_name = "NAME[,NAME…]",
        value_delimiter = ',',
        long_help = "Also dump these intermediate values from both backends to .npy \
                     (see --dump-dir) and compare them step by step, layer by layer. Names \
                     are the IR's value names (`kiln inspect <model> --ir`, or \
                     model.kiln.json), which the ONNX graphs share; `*` matches any run of \
                     characters and `?` one: `model.layers.*.mlp_residual` is every \
                     layer's output, `model.layers.*_residual` each half-layer's. \
                     cpu and onnxruntime only: an .om's outputs are fixed when ATC \
                     compiles it, so the npu backend cannot dump without recompiling."
    )]
    pub dump: Vec<String>,
    /// Dump each layer's output (`--dump 'model.layers.*.mlp_residual'`).
    #[arg(long)]
    pub dump_layers: bool,
    /// Where dumps go, as <backend>/step<N>/<name>.npy
    /// [default: <compiled-dir>-diff-dump beside the compiled directory]
    #[arg(long, value_name = "DIR")]
    pub dump_dir: Option<PathBuf>,
    /// Write an SVG plot of the max abs difference: per dumped value and
    /// step (one line per step, the logits last), or per step without dumps.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

impl DiffArgs {
    /// The `--dump` names and patterns, with `--dump-layers`'s.
    fn dump_patterns(&self) -> Vec<String> {
        let mut patterns = self.dump.clone();
        if self.dump_layers {
            patterns.push(dump::LAYER_OUTPUTS.to_string());
        }
        patterns.retain(|p| !p.trim().is_empty());
        patterns
    }

    fn default_dump_dir(&self) -> PathBuf {
        match self.model.file_name() {
            Some(name) => self
                .model
                .with_file_name(format!("{}-diff-dump", name.to_string_lossy())),
            None => PathBuf::from("kiln-diff-dump"),
        }
    }
}

/// Runs the diff and prints its table; `Err` (exit 1) past the thresholds.
pub fn diff_command(args: &DiffArgs) -> Result<(), String> {
    let model = crate::compiled::CompiledModel::open(&args.model).map_err(|e| e.to_string())?;
    let tokenizer = match (&args.prompt.prompt, model.tokenizer_path()) {
        (Some(_), Some(path)) => Some(
            crate::generate::tokenizer::Tokenizer::from_file(&path).map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    let template = match args.prompt.chat {
        true => {
            crate::generate::chat::ChatTemplate::from_dir(&model.dir).map_err(|e| e.to_string())?
        }
        false => None,
    };
    let prompt = args
        .prompt
        .encode(tokenizer.as_ref(), template.as_ref())
        .map_err(|e| e.to_string())?;
    let (a, b) = (DiffBackend::from(args.a), DiffBackend::from(args.b));
    let patterns = args.dump_patterns();
    let dumps = if patterns.is_empty() {
        None
    } else {
        check_dump_backends(a, b)?;
        let graphs: Vec<&crate::ir::Graph> = model.ir.graphs().iter().collect();
        let names = dump::expand(&graphs, &patterns).map_err(|e| e.to_string())?;
        let dir = args
            .dump_dir
            .clone()
            .unwrap_or_else(|| args.default_dump_dir());
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Some(DumpRequest { names, dir })
    };
    let report = diff_backends_dumping(
        &model,
        a,
        b,
        &prompt,
        args.steps,
        args.python.as_deref(),
        dumps.as_ref(),
    )?;
    let defaults = Thresholds::for_dtype(&model.manifest.dtype);
    let thresholds = Thresholds {
        min_cosine: args.min_cosine.unwrap_or(defaults.min_cosine),
        max_abs: args.max_abs.map_or(defaults.max_abs, MaxAbs::Absolute),
    };
    let source = match (args.min_cosine, args.max_abs) {
        (None, None) => format!("{}'s defaults", model.manifest.dtype),
        (Some(_), Some(_)) => "as given".to_string(),
        _ => format!("as given, else {}'s defaults", model.manifest.dtype),
    };
    crate::say!(
        "{} vs {} on {} prompt tokens (both fed {}'s greedy tokens)",
        a.name(),
        b.name(),
        prompt.len(),
        a.name()
    );
    crate::say!(
        "{:>4} {:>7} {:>11} {:>11} {:>10} {:>5} {:>5}",
        "step",
        "token",
        "max abs",
        "mean abs",
        "cosine",
        "top1",
        "top5"
    );
    for (step, (d, token)) in report.steps.iter().zip(&report.tokens).enumerate() {
        crate::say!(
            "{step:>4} {token:>7} {:>11.3e} {:>11.3e} {:>10.7} {:>5} {:>4}/5",
            d.max_abs,
            d.mean_abs,
            d.cosine,
            if d.top1_agrees { "yes" } else { "NO" },
            d.top5_overlap
        );
    }
    if let Some(request) = &dumps {
        print_tensor_table(&report, request, a, b, &thresholds);
    }
    if let Some(path) = &args.plot {
        let scale = report.steps.iter().fold(0f32, |m, d| m.max(d.scale));
        let svg =
            plot::error_plot(&report, a.name(), b.name(), thresholds.max_abs.limit(scale)).to_svg();
        std::fs::write(path, svg).map_err(|e| format!("{}: {e}", path.display()))?;
        crate::say!("plot: {}", path.display());
    }
    match report.first_failure(&thresholds) {
        None => {
            crate::say!(
                "ok: every step within cosine ≥ {} and max abs ≤ {} ({source}; --min-cosine and --max-abs override)",
                thresholds.min_cosine, thresholds.max_abs
            );
            Ok(())
        }
        Some(why) => Err(format!(
            "{} and {} diverge at {why}; thresholds: {source}",
            a.name(),
            b.name()
        )),
    }
}

fn print_tensor_table(
    report: &DiffReport,
    request: &DumpRequest,
    a: DiffBackend,
    b: DiffBackend,
    thresholds: &Thresholds,
) {
    let width = request
        .names
        .iter()
        .map(|n| n.len())
        .max()
        .unwrap_or(0)
        .max(5);
    crate::say!();
    crate::say!(
        "dumped values, {} vs {} (.npy in {}):",
        a.name(),
        b.name(),
        request.dir.display()
    );
    crate::say!(
        "{:>4} {:<width$} {:<18} {:>11} {:>11} {:>10}",
        "step",
        "value",
        "shape",
        "max abs",
        "mean abs",
        "cosine"
    );
    for d in &report.tensors {
        let c = &d.closeness;
        crate::say!(
            "{:>4} {:<width$} {:<18} {:>11.3e} {:>11.3e} {:>10.7}",
            d.step,
            d.name,
            format!("{:?}", d.shape),
            c.max_abs,
            c.mean_abs,
            c.cosine
        );
    }
    match report.first_tensor_failure(thresholds) {
        Some((d, why)) => crate::say!(
            "first dumped value past the thresholds: step {} {} ({why})",
            d.step,
            d.name
        ),
        None => crate::say!("every dumped value within the thresholds"),
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
        assert!(d.failure(&Thresholds::FLOAT32).unwrap().contains("cosine"));
    }

    #[test]
    fn float16_limits_scale_with_the_logits_and_float32_ones_do_not() {
        assert_eq!(Thresholds::for_dtype("float32"), Thresholds::FLOAT32);
        assert_eq!(Thresholds::for_dtype("float16"), Thresholds::FLOAT16);
        // Logits around 20 with an fp16-sized error of 0.05 at the top one.
        let a: Vec<f32> = (0..64).map(|i| 20.0 - i as f32 * 0.3).collect();
        let mut b = a.clone();
        b[0] -= 0.05;
        let d = compare(&a, &b);
        assert!(d.top1_agrees && d.cosine > 0.9999);
        assert_eq!(d.failure(&Thresholds::FLOAT16), None);
        let strict = d.failure(&Thresholds::FLOAT32).unwrap();
        assert!(strict.contains("max abs 5.000e-2 > 1.000e-3"), "{strict}");
        // Ten times that is past the fp16 limit, 1e-2 × 20.
        b[0] -= 0.45;
        let loose = compare(&a, &b).failure(&Thresholds::FLOAT16).unwrap();
        assert!(
            loose.contains("> 2.000e-1 (1.0e-2 × max|logits|)"),
            "{loose}"
        );
    }

    #[test]
    fn a_nan_never_passes_and_zeros_agree() {
        for t in [
            Thresholds {
                min_cosine: 0.99,
                max_abs: MaxAbs::Absolute(1.0),
            },
            Thresholds::FLOAT16,
        ] {
            let c = Closeness::of(&[1.0, f32::NAN, 2.0], &[1.0, 0.5, 2.0]);
            assert!(c.failure(&t).is_some(), "{t:?}");
            let c = Closeness::of(&[1.0, 2.0], &[1.0, f32::NAN]);
            assert!(c.failure(&t).is_some(), "{t:?}");
        }
        let t = Thresholds {
            min_cosine: 0.99,
            max_abs: MaxAbs::Absolute(1.0),
        };
        let c = Closeness::of(&[1.0, f32::NAN, 2.0], &[1.0, 0.5, 2.0]);
        assert_eq!(c.max_abs, f32::INFINITY);
        assert!(c.failure(&t).is_some());
        // NaN on both sides is no agreement either.
        let c = Closeness::of(&[f32::NAN], &[f32::NAN]);
        assert!(c.failure(&t).is_some());
        let c = Closeness::of(&[0.0; 4], &[0.0; 4]);
        assert_eq!((c.max_abs, c.cosine), (0.0, 1.0));
        assert_eq!(c.failure(&t), None);
    }
}
