//! `kiln-run`: the small runtime binary for the board. It runs a directory
//! written by `kiln compile` — no compiler, no original checkpoint — and
//! reads .om files without ACL.

use clap::{Parser, Subcommand, ValueEnum};
use kiln_runtime::compiled::CompiledModel;
use kiln_runtime::diff::DiffBackend;
use kiln_runtime::om::OmFile;
use kiln_runtime::run::{self, GenerationArgs, Prompt, PromptArgs};
use kiln_runtime::session::CpuSession;
use kiln_runtime::tokenizer::Tokenizer;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "kiln-run",
    version,
    about = "Run models compiled by `kiln compile`"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text (or token ids) from a prompt.
    Generate(GenerateArgs),
    /// Print an .om file's partitions, inputs and outputs (read without ACL).
    Inspect {
        /// An .om file.
        om: PathBuf,
    },
    /// Run the same tokens through two backends and compare their logits
    /// step by step; exits 1 when a step is past the thresholds.
    Diff(DiffArgs),
    /// Check a compiled directory: its manifest, IR and weights agree, and
    /// each .om (once build_om.sh has made it) has the manifest's inputs and
    /// outputs — the check that catches a KV-cache length mismatch.
    Check {
        /// A directory written by `kiln compile`.
        model: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// The reference interpreter on the compiled IR and weights, in f32.
    Cpu,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum DiffBackendArg {
    /// The reference interpreter (model.kiln.json + weights.safetensors).
    Cpu,
    /// ONNX Runtime on prefill.onnx / decode.onnx, through the directory's
    /// ort_run.py (needs Python with numpy and onnxruntime).
    Onnxruntime,
}

impl From<DiffBackendArg> for DiffBackend {
    fn from(b: DiffBackendArg) -> DiffBackend {
        match b {
            DiffBackendArg::Cpu => DiffBackend::Cpu,
            DiffBackendArg::Onnxruntime => DiffBackend::Onnxruntime,
        }
    }
}

#[derive(clap::Args)]
struct DiffArgs {
    /// A directory written by `kiln compile`.
    model: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    a: DiffBackendArg,
    #[arg(long, value_enum, default_value = "onnxruntime")]
    b: DiffBackendArg,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Generated tokens to compare (the first comes from the prefill).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Fail below this cosine similarity of a step's logits.
    #[arg(long, default_value_t = 0.99999)]
    min_cosine: f64,
    /// Fail above this max abs difference of a step's logits.
    #[arg(long, default_value_t = 1e-3)]
    max_abs: f32,
    /// Python for the onnxruntime backend [default: $KILN_PYTHON, else python3]
    #[arg(long)]
    python: Option<PathBuf>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A directory written by `kiln compile`.
    model: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    #[command(flatten)]
    run: GenerationArgs,
}

fn main() {
    let result = match Cli::parse().command {
        Command::Generate(args) => generate(args),
        Command::Inspect { om } => OmFile::open(&om)
            .map(|om| print!("{om}"))
            .map_err(|e| e.to_string()),
        Command::Check { model } => check(&model),
        Command::Diff(args) => diff(args),
    };
    if let Err(message) = result {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn check(dir: &std::path::Path) -> Result<(), String> {
    use kiln_runtime::compiled::OmCheck;
    let model = CompiledModel::open(dir).map_err(|e| e.to_string())?;
    println!(
        "{}: manifest, IR and reference weights agree",
        dir.display()
    );
    for (om, status) in model.check_om_files().map_err(|e| e.to_string())? {
        match status {
            OmCheck::Matches => println!("{om}: inputs and outputs match manifest.json"),
            OmCheck::Missing => {
                println!("{om}: not built yet (run build_om.sh on a machine with CANN)")
            }
            OmCheck::Undescribed => {
                println!("{om}: has no MODEL_INOUT_INFO; ACL will check it when it loads")
            }
        }
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<(), String> {
    run::init_threads(args.run.threads)?;
    let model = CompiledModel::open(&args.model).map_err(|e| e.to_string())?;
    let tokenizer = match (&args.run.prompt.prompt, model.tokenizer_path()) {
        (Some(_), Some(path)) => Some(Tokenizer::from_file(&path).map_err(|e| e.to_string())?),
        _ => None,
    };
    let Backend::Cpu = args.backend;
    let mut engine = CpuSession::new(&model.ir, &model.weights).map_err(|e| e.to_string())?;
    let options = args.run.options(
        &model.manifest.generation.eos_token_ids,
        model.manifest.vocab_size,
    );
    run::run_generation(&mut engine, tokenizer.as_ref(), &options)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn diff(args: DiffArgs) -> Result<(), String> {
    use kiln_runtime::diff::{diff_backends, Thresholds};
    let model = CompiledModel::open(&args.model).map_err(|e| e.to_string())?;
    let prompt: Vec<u32> = match args.prompt.prompt() {
        Prompt::Text(text) => {
            let path = model
                .tokenizer_path()
                .ok_or("the compiled directory has no tokenizer.json; use --token-ids")?;
            Tokenizer::from_file(&path)
                .and_then(|t| t.encode(text))
                .map_err(|e| e.to_string())?
        }
        Prompt::Ids(ids) => ids.to_vec(),
    };
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
