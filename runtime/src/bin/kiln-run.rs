//! `kiln-run`: the small runtime binary for the board. It runs a directory
//! written by `kiln compile` — no compiler, no original checkpoint — and
//! reads .om files without ACL.

use clap::{Parser, Subcommand};
use kiln_runtime::compiled::CompiledModel;
use kiln_runtime::engine::{self, Backend};
use kiln_runtime::generate::chat::ChatTemplate;
use kiln_runtime::generate::run::{self, GenerationArgs};
use kiln_runtime::generate::tokenizer::Tokenizer;
use kiln_runtime::om::OmFile;
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
        /// Also decode MODEL_DEF: op types and counts, the engine of each
        /// (AI CPU fallbacks flagged), weight dtypes, external weight files,
        /// custom ops, the chip ATC built for.
        #[arg(long)]
        graph: bool,
    },
    /// Run the same tokens through two backends and compare their logits
    /// step by step; exits 1 when a step is past the thresholds.
    Diff(kiln_runtime::diff::DiffArgs),
    /// Check a compiled directory: its manifest, IR and weights agree, and
    /// each .om (once build_om.sh has made it) has the manifest's inputs and
    /// outputs — the check that catches a KV-cache length mismatch.
    Check {
        /// A directory written by `kiln compile`.
        model: PathBuf,
    },
    /// Write a compiled directory's weights.bin from its reference weights,
    /// by the recipe in manifest.json, checking its sha256.
    ///
    /// weights.bin is the ONNX graphs' external data: what build_om.sh gives
    /// ATC, and what ONNX Runtime reads. kiln compile leaves it out to keep
    /// the directory small (a quantized model's fp16 copy is several times
    /// its size) and records how each initializer is made; build_om.sh and
    /// kiln diff run this themselves when the file is missing. The file is
    /// written beside its place and renamed there only once its sha256 is
    /// the recorded one; a file already there is checked, and rewritten if
    /// it differs.
    ExpandWeights {
        /// A directory written by `kiln compile`.
        model: PathBuf,
    },
    /// Serve the model over OpenAI's HTTP API (chat and text completions,
    /// streaming), keeping the last conversation's KV cache for its next turn.
    Serve(kiln_runtime::serve::ServeArgs),
    /// Time prompt processing and token generation as llama-bench does
    /// (ppN / tgN tokens per second, mean ± stddev), as a table or JSON.
    Bench(kiln_runtime::bench::BenchArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A directory written by `kiln compile`.
    model: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// The ACL device id for `--backend npu`.
    #[arg(long, default_value_t = 0)]
    device: i32,
    #[command(flatten)]
    run: GenerationArgs,
}

fn main() {
    let result = match Cli::parse().command {
        Command::Generate(args) => generate(args),
        Command::Inspect { om, graph } => inspect(&om, graph),
        Command::Check { model } => check(&model),
        Command::ExpandWeights { model } => {
            kiln_runtime::compiled::weights_bin::expand_command(&model, "kiln-run")
        }
        Command::Diff(args) => kiln_runtime::diff::diff_command(&args),
        Command::Serve(args) => kiln_runtime::serve::serve(&args),
        Command::Bench(args) => kiln_runtime::bench::bench(&args).map(|report| {
            if args.json {
                let json = serde_json::to_string_pretty(&report).expect("plain data");
                kiln_runtime::say!("{json}");
            } else {
                kiln_runtime::say_raw!("{}", report.table());
            }
        }),
    };
    if let Err(message) = result {
        kiln_runtime::note!("error: {message}");
        std::process::exit(1);
    }
}

fn inspect(path: &std::path::Path, graph: bool) -> Result<(), String> {
    let om = OmFile::open(path).map_err(|e| e.to_string())?;
    kiln_runtime::say_raw!("{om}");
    if graph {
        for graph in om
            .graphs()
            .map_err(|e| format!("{}: {e}", path.display()))?
        {
            kiln_runtime::say_raw!("{graph}");
        }
    }
    Ok(())
}

fn check(dir: &std::path::Path) -> Result<(), String> {
    use kiln_runtime::compiled::external_weights::ExternalWeights;
    use kiln_runtime::compiled::OmCheck;
    let model = CompiledModel::open(dir).map_err(|e| e.to_string())?;
    kiln_runtime::say!(
        "{}: manifest, IR and reference weights agree",
        dir.display()
    );
    if let Some(recipe) = &model.manifest.weights_bin {
        use kiln_runtime::compiled::weights_bin::{self, State};
        let mb = |b: u64| b as f64 / 1e6;
        weights_bin::check_recipe(dir, &model.manifest).map_err(|e| e.to_string())?;
        if weights_bin::state(dir, &model.manifest) == State::Present {
            kiln_runtime::say!(
                "{}: present ({:.1} MB), for build_om.sh",
                recipe.file,
                mb(recipe.bytes)
            );
        } else {
            kiln_runtime::say!(
                "{}: not stored ({:.1} MB, its recipe checked): build_om.sh makes it from {} \
                 (kiln-run expand-weights {})",
                recipe.file,
                mb(recipe.bytes),
                model.manifest.reference_weights,
                dir.display()
            );
        }
    }
    let mut built = 0;
    for (om, status) in model.check_om_files().map_err(|e| e.to_string())? {
        match status {
            OmCheck::Matches => kiln_runtime::say!("{om}: inputs and outputs match manifest.json"),
            OmCheck::Missing => {
                kiln_runtime::say!("{om}: not built yet (run build_om.sh on a machine with CANN)")
            }
            OmCheck::Undescribed => {
                kiln_runtime::say!("{om}: has no MODEL_INOUT_INFO; ACL will check it when it loads")
            }
        }
        built += usize::from(!matches!(status, OmCheck::Missing));
    }
    let graphs: Vec<&str> = model
        .manifest
        .graphs
        .iter()
        .map(|g| g.name.as_str())
        .collect();
    match ExternalWeights::read(dir, &graphs).map_err(|e| e.to_string())? {
        Some(weights) => kiln_runtime::say!("{}", weights.sharing().describe()),
        None if built > 1 => kiln_runtime::say!(
            "weights: embedded in each .om, so the NPU holds them once per graph; run this \
             Kiln's build_om.sh again (atc --external_weight=1) for one shared copy"
        ),
        None => {}
    }
    // What ATC built, read back from each .om's MODEL_DEF.
    let expected_soc = kiln_runtime::engine::npu::converted_for(dir, &model.manifest);
    let mut problems = Vec::new();
    for graph in model
        .check_graphs(&expected_soc)
        .map_err(|e| e.to_string())?
    {
        kiln_runtime::say!("{}", graph.summary);
        for warning in &graph.warnings {
            kiln_runtime::say!("warning: {warning}");
        }
        for problem in &graph.problems {
            kiln_runtime::say!("error: {problem}");
        }
        problems.extend(graph.problems);
    }
    if !problems.is_empty() {
        return Err(format!(
            "{}: {} problem(s) in what ATC built (above)",
            dir.display(),
            problems.len()
        ));
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<(), String> {
    run::init_threads(args.run.threads)?;
    let (manifest, mut engine) = engine::open(&args.model, args.backend, args.device)?;
    let tokenizer = match (&args.run.prompt.prompt, &manifest.tokenizer) {
        (Some(_), Some(file)) => {
            Some(Tokenizer::from_file(&args.model.join(file)).map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    let template = if args.run.prompt.chat {
        ChatTemplate::from_dir(&args.model).map_err(|e| e.to_string())?
    } else {
        None
    };
    let mut options = args
        .run
        .options(&manifest.generation.eos_token_ids, manifest.vocab_size);
    options.chat_template = template.as_ref();
    run::run_generation(engine.as_mut(), tokenizer.as_ref(), &options)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
