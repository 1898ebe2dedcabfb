//! The `kiln` command line.

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use kiln::frontend::ShapeRequest;
use kiln_runtime::engine::CpuSession;
use kiln_runtime::generate::run;
use kiln_runtime::ir::GraphLayout;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Compile Hugging Face language models for Ascend NPUs, and run them",
    long_about = "Kiln lowers a Hugging Face decoder-only model (config.json + safetensors + \
                  tokenizer.json, or a llama.cpp .gguf file; Llama, Qwen2/2.5, Qwen3, Mistral, Gemma, \
                  Gemma 2, Gemma 3 text, Phi-3) \
                  into a static-shape IR with a prefill graph and a decode graph over a \
                  fixed-length KV cache, compiles it to ONNX for Huawei's ATC, and runs it on the \
                  reference CPU interpreter.\n\nStart with: kiln generate MODEL --chat --prompt \"…\"; \
                  then kiln compile MODEL -o DIR, and kiln-run on the board."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's configuration and, with --ir, its IR graphs; or an .om
    /// file's partitions, inputs and outputs (read without ACL).
    Inspect(InspectArgs),
    /// Generate text (or token ids) from a prompt.
    Generate(GenerateArgs),
    /// Compile a model into prefill/decode ONNX graphs for ATC, with a
    /// build_om.sh that turns them into .om models and a manifest.
    Compile(CompileArgs),
    /// Pack what a board needs from a compiled directory into one tar
    /// archive: the ATC graphs and weights with build_om.sh, the manifest,
    /// tokenizer, IR and reference weights, kernels/ and any .om files, an
    /// aarch64 kiln-run when one is built, and a README.txt of the commands
    /// to run there.
    Bundle(BundleArgs),
    /// Write a compiled directory's weights.bin from its reference weights,
    /// by the recipe in manifest.json, checking its sha256 (as `kiln-run
    /// expand-weights` does; build_om.sh and kiln diff run it themselves
    /// when the file is missing).
    ExpandWeights {
        /// A directory written by `kiln compile`.
        compiled: PathBuf,
    },
    /// Write a model (a .gguf file, say) as a plain Hugging Face directory:
    /// config.json, model.safetensors, tokenizer.json, tokenizer_config.json.
    Import(ImportArgs),
    /// Print a prompt's token ids (through the chat template with --chat)
    /// without running the model: for checking tokenization and templates.
    Tokenize(TokenizeArgs),
    /// Run the same tokens through two backends of a compiled model and
    /// compare their logits step by step; exits 1 past the thresholds.
    Diff(kiln_runtime::diff::DiffArgs),
    /// Perplexity of a text over strided windows on the reference
    /// interpreter, with the weights as stored; with --quant, of the model
    /// with its weights so (keep: a GGUF's blocks; w8a16, w4a16, w8a8), and
    /// how closely its logits follow the same model in float.
    Eval(EvalArgs),
}

#[derive(Args)]
struct BundleArgs {
    /// A directory `kiln compile` wrote.
    compiled: PathBuf,
    /// The archive to write (a .tar file; replaced whole if it exists).
    out: PathBuf,
    /// The aarch64 kiln-run to pack [default: the one `cargo build --release
    /// --target aarch64-unknown-linux-gnu` left beside this kiln, if any]
    #[arg(long, value_name = "PATH", conflicts_with = "without_kiln_run")]
    kiln_run: Option<PathBuf>,
    /// Pack no kiln-run, even when one is built.
    #[arg(long)]
    without_kiln_run: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// A Hugging Face model directory or a .gguf file.
    model: PathBuf,
    /// The text to score (UTF-8). It is tokenized as transformers'
    /// `tokenizer(text)` does: with the special tokens the tokenizer's
    /// post-processor adds by default (a BOS for Llama-style tokenizers,
    /// none for GPT-2- and Qwen-style ones) and no others.
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Tokens per window (at most the model's max_position_embeddings).
    #[arg(long, value_name = "N", default_value_t = kiln::eval::EvalOptions::DEFAULT_CTX)]
    ctx: usize,
    /// How far each window advances; only the tokens the previous window did
    /// not score are scored, so every token after the first counts once.
    /// From 1 to --ctx - 1 [default: ctx/2]
    #[arg(long, value_name = "S")]
    stride: Option<usize>,
    /// Score only the text's first M tokens.
    #[arg(long, value_name = "M")]
    max_tokens: Option<usize>,
    // With --quant: the model with its weights so, against the same model in
    // float (reference perplexity, ratio, logits cosine, top-1 agreement).
    #[command(flatten)]
    quant: QuantArgs,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// Worker threads for the interpreter [default: all cores]
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct ImportArgs {
    /// A .gguf file (or a Hugging Face model directory).
    model: PathBuf,
    /// The directory to write.
    output: PathBuf,
    /// How to store the weights (GGUF blocks are dequantized to f32 first).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ImportDTypeArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum ImportDTypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Args)]
struct TokenizeArgs {
    /// A Hugging Face model directory or a .gguf file.
    model: PathBuf,
    /// The text to tokenize.
    #[arg(long)]
    prompt: String,
    /// Render --prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message first.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Also print the tokens decoded back to text (special tokens included) on stderr.
    #[arg(long)]
    show_text: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    /// float16 weights and activations (RMSNorm and softmax reductions in f32): for the NPU.
    Fp16,
    /// float32 throughout: for checking against the reference.
    Fp32,
}

#[derive(Args)]
struct CompileArgs {
    /// A Hugging Face model directory or a .gguf file.
    model: PathBuf,
    /// Where to write the compiled model [default: <model directory name>.kiln]
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The board or chip to compile for (a board name picks its chip;
    /// `build_om.sh --soc auto` on the board converts for the chip it has).
    #[arg(long, default_value = kiln::backend::atc::DEFAULT_TARGET,
          long_help = format!("The board or chip to compile for (a board name picks its chip; `build_om.sh --soc auto` \
              on the board converts for the chip it reports, and kiln-run checks the chip before loading): {}",
              kiln::backend::atc::known_targets()))]
    target: String,
    #[arg(long, value_enum, default_value = "fp16")]
    dtype: DTypeArg,
    /// The residual stream's type in an fp16 model: f32 keeps the embedding's
    /// output and every residual Add in f32 around the fp16 blocks (each
    /// block's output is cast up and added in f32; its RMSNorm reads the f32
    /// stream). Default f32, fp16 with --kernels ascendc
    #[arg(
        long,
        value_enum,
        value_name = "DTYPE",
        long_help = "The residual stream's type in an fp16 model [default: f32; fp16 with --kernels ascendc]. \
              f32 keeps the embedding's output and every residual Add in f32 around the fp16 blocks: each \
              block's output is cast to f32 and added in f32, and each RMSNorm reads the f32 stream \
              (its square and mean already ran in f32). Real models carry outlier activations in a few \
              residual channels that grow layer after layer; in fp16 they pass 65504 and turn into \
              inf, then NaN, with no warning; the 310B even computes in saturation mode, where an \
              overflow silently becomes 65504 (SmolLM2-135M's stream reaches 24,812 from layer 11 \
              on, where one fp16 step is 16). The cost is nil in the graph: as many nodes and Casts (each \
              norm's input Cast becomes one Cast of a block's output, plus one after the embedding), \
              f32 adds of [tokens, hidden] instead of fp16 ones, the same weights, KV cache and inputs; \
              ONNX Runtime decodes SmolLM2 no slower. fp16 is the old behaviour; --kernels ascendc \
              needs it (its Add + RMSNorm kernel works in fp16)"
    )]
    residual_dtype: Option<ResidualArg>,
    /// ONNX opset (13 to 18; 13 is accepted by every ATC from CANN 5 on).
    #[arg(long, default_value_t = kiln::backend::onnx::DEFAULT_OPSET)]
    opset: i64,
    /// Keep the weights inside each .onnx file instead of one weights.bin
    /// beside them that the graphs share (each graph then carries its own
    /// copy; only below 2 GB, protobuf's limit)
    #[arg(long, conflicts_with = "external_data")]
    inline_weights: bool,
    /// One weights.bin shared by the graphs: the default (kept for scripts).
    #[arg(long, hide = true)]
    external_data: bool,
    /// Write weights.bin (the fp16 or fp32 weights ATC converts, or int8 for
    /// w8a8) into the directory, as Kiln did before: for running ATC on a
    /// host without kiln-run or kiln. By default the directory holds only
    /// its recipe, and `kiln-run expand-weights DIR` (which build_om.sh and
    /// kiln diff run when needed) makes it from the reference weights, byte
    /// for byte, checked by sha256
    #[arg(long, conflicts_with = "inline_weights")]
    store_atc_weights: bool,
    /// Do not run ATC even when it is installed.
    #[arg(long)]
    no_atc: bool,
    #[command(flatten)]
    shape: ShapeArgs,
    #[command(flatten)]
    quant: QuantArgs,
    /// With --quant w8a16/w4a16 (or w8a8): let the ATC graphs hold the
    /// weights dequantized to --dtype (no stock ATC operator keeps
    /// weight-only low-bit weights on the 310B; without this flag w8a8 keeps
    /// int8 weights in AscendQuant/AscendDequant); the reference weights and
    /// the .ort.onnx graphs for ONNX Runtime stay quantized. Implied for a
    /// GGUF's own blocks (--quant keep).
    #[arg(long)]
    dequantize_for_atc: bool,
    /// What the ATC graphs are made of: standard ONNX ops, or custom
    /// `ai.kiln` nodes for RMSNorm, Add + RMSNorm, SwiGLU, RoPE and the
    /// decode GEMV (fp16, w8a16, w4a16: the weights stay packed) served by
    /// Ascend C kernels Kiln generates into <output>/kernels/ (build_om.sh
    /// builds and installs them; they have run only on Kiln's CPU emulation)
    #[arg(long, value_enum, default_value = "onnx")]
    kernels: KernelsArg,
    /// The board's memory (e.g. 8GiB): refuse a model whose device memory
    /// plan (weights once, KV cache, IO) does not fit, and warn when it
    /// leaves less than 1 GiB (or a tenth) for Linux, kiln-run and ACL
    #[arg(long, value_name = "SIZE")]
    device_memory: Option<String>,
    /// Print the device memory plan from config.json alone and stop: no
    /// weights are read or needed (MODEL may be a directory holding only
    /// config.json, the config.json itself, or a .gguf)
    #[arg(long)]
    plan_only: bool,
    /// Also write the board bundle (as `kiln bundle` does) to this .tar,
    /// with the aarch64 kiln-run built beside this kiln, if any
    #[arg(long, value_name = "OUT.tar")]
    bundle: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ResidualArg {
    /// The residual stream in f32 around the fp16 blocks.
    F32,
    /// Everything in fp16.
    Fp16,
}

#[derive(Clone, Copy, ValueEnum)]
enum KernelsArg {
    /// Standard ONNX ops only.
    Onnx,
    /// Custom nodes run by Kiln's generated Ascend C kernels.
    Ascendc,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantArg {
    /// Weights as stored: a GGUF's Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K blocks stay quantized, float checkpoints stay float.
    Keep,
    /// Every weight in float (a GGUF's blocks are dequantized).
    None,
    /// int8 weights, one scale per output channel; float activations.
    W8a16,
    /// int4 weights in groups of --group-size along the input; float activations.
    W4a16,
    /// int8 per-channel weights and int8 activations quantized per token, integer products.
    W8a8,
}

#[derive(Args)]
struct QuantArgs {
    /// Weight precision: keep (as stored), none, or quantize the Linear
    /// layers' weights by round-to-nearest as w8a16, w4a16 or w8a8 (from
    /// float; a quantized GGUF is dequantized first) [default: keep]
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
    /// w4a16: weights per scale along the input (32, 64 or 128).
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// w4a16: a min per group as well as a scale (w = q·scale + min), instead of symmetric around 0.
    #[arg(long)]
    asymmetric: bool,
    /// Layers to keep in float, by name with * and ? (e.g. 'model.layers.*.mlp.down_proj');
    /// repeatable [default: lm_head]
    #[arg(long = "quant-skip", value_name = "PATTERN")]
    quant_skip: Vec<String>,
    /// Text to calibrate on (a few thousand tokens of what the model will
    /// see): runs the float model over it and measures every Linear's input
    /// channels, for --awq and w8a8's SmoothQuant.
    #[arg(long, value_name = "FILE")]
    calib_text: Option<PathBuf>,
    /// w8a8 with --calib-text: SmoothQuant's migration strength α, moving
    /// activation outliers into the weights (0 = none) [default: 0.5]
    #[arg(long, value_name = "A")]
    smooth_alpha: Option<f32>,
    /// w8a16/w4a16 with --calib-text: search per-channel input scales and
    /// per-group clipping that minimize each layer's output error (AWQ),
    /// instead of plain round-to-nearest.
    #[arg(long)]
    awq: bool,
}

impl QuantArgs {
    fn mode(&self) -> Result<kiln::QuantMode> {
        use kiln::passes::quantize::{
            CalibrationOptions, QuantOptions, Scheme, DEFAULT_SKIP, DEFAULT_SMOOTH_ALPHA,
        };
        let uses_calibration = self.awq || self.smooth_alpha.is_some() || self.calib_text.is_some();
        let scheme = match self.quant.unwrap_or(QuantArg::Keep) {
            QuantArg::Keep | QuantArg::None if uses_calibration => anyhow::bail!(
                "--calib-text, --awq and --smooth-alpha adjust weights that Kiln quantizes: \
                 add --quant w8a8 (with SmoothQuant) or --quant w4a16/w8a16 --awq"
            ),
            QuantArg::Keep => return Ok(kiln::QuantMode::Keep),
            QuantArg::None => return Ok(kiln::QuantMode::None),
            QuantArg::W8a16 => Scheme::W8A16,
            QuantArg::W8a8 => Scheme::W8A8,
            QuantArg::W4a16 => Scheme::W4A16 {
                group_size: self.group_size,
                asymmetric: self.asymmetric,
            },
        };
        let skip = match self.quant_skip.is_empty() {
            true => vec![DEFAULT_SKIP.to_string()],
            false => self.quant_skip.clone(),
        };
        let calibration = match &self.calib_text {
            Some(text) => Some(CalibrationOptions {
                text: text.clone(),
                smooth_alpha: match (scheme, self.smooth_alpha) {
                    (Scheme::W8A8, None) => Some(DEFAULT_SMOOTH_ALPHA),
                    (_, alpha) => alpha,
                },
                awq: self.awq,
            }),
            None if self.awq || self.smooth_alpha.is_some() => anyhow::bail!(
                "--{} needs calibration text: add --calib-text FILE (a few thousand tokens of \
                 the kind of text the model will see, e.g. a licence under /usr/share/common-licenses)",
                if self.awq { "awq" } else { "smooth-alpha" }
            ),
            None => None,
        };
        let options = QuantOptions {
            scheme,
            skip,
            calibration,
        };
        options.check()?;
        Ok(kiln::QuantMode::Quantize(options))
    }
}

/// Progress lines on stderr, at most one a second (the last of a burst is
/// dropped, not delayed: these only show that long work moves).
fn throttled_progress() -> impl FnMut(&str) {
    let mut last = None::<std::time::Instant>;
    move |step| {
        let now = std::time::Instant::now();
        if last.is_none_or(|then| now - then >= std::time::Duration::from_secs(1)) {
            kiln_runtime::note!("kiln: {step}");
            last = Some(now);
        }
    }
}

/// One line on what quantization did, for stderr.
fn report_quant(summary: &kiln::passes::quantize::QuantSummary) {
    kiln_runtime::note!(
        "kiln: quantized {} ({:.1} MB → {:.1} MB)",
        summary.describe(),
        summary.float_bytes as f64 / 1e6,
        summary.quantized_bytes as f64 / 1e6
    );
}

#[derive(Args)]
struct ShapeArgs {
    /// Tokens per prefill step (the prefill graph's static length) [default: 64]
    #[arg(long, conflicts_with = "step_tokens")]
    prefill_len: Option<usize>,
    /// KV-cache length: the most tokens (prompt + generated) a conversation
    /// can hold [default: 1024, or the model's max_position_embeddings if smaller]
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// `split`: a prefill graph and a decode graph (T = 1), which share one
    /// copy of the weights on the NPU where ACL can register external
    /// weights (CANN 8.5 and later). `single`: one graph of --step-tokens
    /// tokens for prompt chunks and decode alike: one .om, one weight copy
    /// with any CANN, decode a little slower
    #[arg(long, value_enum, default_value_t = GraphsArg::Split)]
    graphs: GraphsArg,
    /// Tokens per step of the single graph (--graphs single) [default: 8]
    #[arg(long)]
    step_tokens: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GraphsArg {
    Split,
    Single,
}

impl ShapeArgs {
    const DEFAULT_STEP_TOKENS: usize = 8;

    fn request(&self) -> anyhow::Result<ShapeRequest> {
        let (layout, prefill_len) = match self.graphs {
            GraphsArg::Split if self.step_tokens.is_some() => anyhow::bail!(
                "--step-tokens sets the length of the single graph: add --graphs single, or use \
                 --prefill-len for the prefill graph of split graphs"
            ),
            GraphsArg::Split => (GraphLayout::Split, self.prefill_len),
            GraphsArg::Single => (
                GraphLayout::Single,
                Some(self.step_tokens.unwrap_or(Self::DEFAULT_STEP_TOKENS)),
            ),
        };
        Ok(ShapeRequest {
            prefill_len,
            max_seq_len: self.max_seq_len,
            layout,
        })
    }
}

#[derive(Args)]
struct InspectArgs {
    /// A Hugging Face model directory, a .gguf file, or an .om file.
    model: PathBuf,
    /// Print the prefill and decode graphs.
    #[arg(long)]
    ir: bool,
    /// For an .om file: decode its MODEL_DEF (GE's ModelDef) and print the
    /// op types with counts, the engine of each (AI CPU fallbacks flagged),
    /// weight dtypes and bytes, external weight files, custom ops and the
    /// chip ATC built for.
    #[arg(long)]
    graph: bool,
    /// Write the IR as JSON to this file.
    #[arg(long, value_name = "FILE")]
    save_ir: Option<PathBuf>,
    #[command(flatten)]
    shape: ShapeArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// The reference interpreter, in f32 on the CPU.
    Cpu,
}

#[derive(Args)]
struct GenerateArgs {
    /// A Hugging Face model directory or a .gguf file.
    model: PathBuf,
    /// Where to run the model.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    #[command(flatten)]
    run: run::GenerationArgs,
    #[command(flatten)]
    shape: ShapeArgs,
    #[command(flatten)]
    quant: QuantArgs,
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        kiln_runtime::note!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(args) => inspect(args),
        Command::Generate(args) => generate_command(args),
        Command::Tokenize(args) => tokenize_command(args),
        Command::Import(args) => import_command(args),
        Command::Bundle(args) => bundle_command(args),
        Command::ExpandWeights { compiled } => {
            kiln_runtime::compiled::weights_bin::expand_command(&compiled, "kiln")
                .map_err(anyhow::Error::msg)
        }
        Command::Compile(args) => compile_command(args),
        Command::Diff(args) => kiln_runtime::diff::diff_command(&args).map_err(anyhow::Error::msg),
        Command::Eval(args) => eval_command(args),
    }
}

fn eval_command(args: EvalArgs) -> Result<()> {
    use anyhow::Context;
    use kiln::eval::{evaluate, table, EvalModel, EvalOptions, Progress};
    run::init_threads(args.threads).map_err(anyhow::Error::msg)?;
    let options = EvalOptions::new(args.ctx, args.stride)?;
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("cannot read the text {}", args.text.display()))?;
    // The model as --quant asks (as stored without it), and with --quant
    // the same model in float as the reference.
    let mode = args.quant.mode()?;
    let mut model = kiln::frontend::HfModel::open_keeping_blocks(
        &args.model,
        matches!(mode, kiln::QuantMode::Keep),
    )?;
    let tokenizer = model.tokenizer().map_err(|why| {
        anyhow::anyhow!(
            "kiln eval tokenizes --text with the model's tokenizer, and there is none: {why}"
        )
    })?;
    let mut tokens = tokenizer
        .encode(&text)
        .with_context(|| format!("tokenizing {}", args.text.display()))?;
    let whole = tokens.len();
    if let Some(max) = args.max_tokens {
        tokens.truncate(max);
    }
    let mut graph = kiln::eval::eval_graph(&mut model, options.ctx)?;
    if let kiln::QuantMode::Quantize(q) = &mode {
        let summary = kiln::quantize(&mut model, &mut [&mut graph], q, throttled_progress())?;
        report_quant(&summary);
    }
    let reference_model = match args.quant.quant {
        Some(_) => {
            let mut float = kiln::frontend::HfModel::open(&args.model)?;
            let graph = kiln::eval::eval_graph(&mut float, options.ctx)?;
            Some((float, graph))
        }
        None => None,
    };
    let reference = match &reference_model {
        Some((float, graph)) => Some(EvalModel::new(graph.clone(), &float.weights)?),
        None => None,
    };
    let candidate = EvalModel::new(graph, &model.weights)?;
    let started = std::time::Instant::now();
    let mut last_report = None::<std::time::Instant>;
    let report = evaluate(
        &candidate,
        &tokens,
        &options,
        reference.as_ref(),
        |Progress { window, windows }| {
            // At most one line a second, so that long runs show they move.
            let now = std::time::Instant::now();
            let due = match last_report {
                None => true,
                Some(then) => now - then >= std::time::Duration::from_secs(1),
            };
            if due || window == windows {
                kiln_runtime::note!(
                    "kiln: window {window} of {windows} ({:.1} s)",
                    started.elapsed().as_secs_f64()
                );
                last_report = Some(now);
            }
        },
    )
    .with_context(|| match args.max_tokens {
        Some(max) if max < whole => format!(
            "{} ({whole} tokens, cut to --max-tokens {max})",
            args.text.display()
        ),
        _ => args.text.display().to_string(),
    })?;
    kiln_runtime::note!(
        "kiln: {} windows in {:.1} s",
        report.windows,
        started.elapsed().as_secs_f64()
    );
    let quant_name = match &mode {
        kiln::QuantMode::Keep if args.quant.quant.is_none() => None,
        kiln::QuantMode::Keep => Some("keep".to_string()),
        kiln::QuantMode::None => Some("none".to_string()),
        kiln::QuantMode::Quantize(q) => Some(q.name()),
    };
    let quant = quant_name.as_deref();
    kiln_runtime::say_raw!(
        "{}",
        table(&args.model.display().to_string(), quant, &report)
    );
    if let Some(out) = &args.json {
        #[derive(serde::Serialize)]
        struct EvalJson<'a> {
            model: String,
            text: String,
            quant: Option<&'a str>,
            #[serde(flatten)]
            report: &'a kiln::eval::EvalReport,
        }
        let json = EvalJson {
            model: args.model.display().to_string(),
            text: args.text.display().to_string(),
            quant,
            report: &report,
        };
        let bytes = serde_json::to_vec_pretty(&json).expect("the report serializes");
        kiln::output::write_file_atomically(out, &bytes)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

fn compile_command(args: CompileArgs) -> Result<()> {
    use kiln::backend::onnx::builder::FloatType;
    let (target, board) = kiln::backend::atc::resolve_target(&args.target)?;
    let device_memory = args
        .device_memory
        .as_deref()
        .map(kiln::plan::parse_size)
        .transpose()?;
    if args.plan_only {
        return plan_only(&args, target, device_memory);
    }
    let options = kiln::compile::CompileOptions {
        shape: args.shape.request()?,
        target,
        board,
        device_memory,
        float: match args.dtype {
            DTypeArg::Fp16 => FloatType::F16,
            DTypeArg::Fp32 => FloatType::F32,
        },
        opset: args.opset,
        external_data: !args.inline_weights,
        store_atc_weights: args.store_atc_weights,
        skip_atc: args.no_atc,
        quant: args.quant.mode()?,
        dequantize_for_atc: args.dequantize_for_atc,
        kernels: match args.kernels {
            KernelsArg::Onnx => kiln::compile::Kernels::Onnx,
            KernelsArg::Ascendc => kiln::compile::Kernels::Ascendc,
        },
        residual: args.residual_dtype.map(|r| match r {
            ResidualArg::F32 => FloatType::F32,
            ResidualArg::Fp16 => FloatType::F16,
        }),
    };
    let out = match args.output {
        Some(out) => out,
        None => {
            let name = args
                .model
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "model".into());
            PathBuf::from(format!("{name}.kiln"))
        }
    };
    let started = std::time::Instant::now();
    let report = kiln::compile::compile(&args.model, &out, &options, |step| {
        kiln_runtime::note!("kiln: {step}")
    })?;
    let m = &report.manifest;
    kiln_runtime::say!(
        "compiled {} ({}) for {} in {:.1} s",
        args.model.display(),
        m.architecture,
        target.description,
        started.elapsed().as_secs_f64()
    );
    kiln_runtime::say!("  output     {}", report.out.display());
    for (name, size) in &report.files {
        kiln_runtime::say!("    {name:<24} {:>10.2} MB", *size as f64 / 1e6);
    }
    match (&m.residual_dtype, m.dtype.as_str()) {
        (Some(residual), dtype) if residual != dtype => kiln_runtime::say!(
            "  precision  {dtype}, the residual stream in {residual} (--residual-dtype)"
        ),
        (_, dtype) => kiln_runtime::say!("  precision  {dtype}"),
    }
    for (graph, counts) in &report.node_counts {
        let total: usize = counts.values().sum();
        let ops: Vec<String> = counts.iter().map(|(op, n)| format!("{op}×{n}")).collect();
        kiln_runtime::say!("  {graph:<10} {total} nodes: {}", ops.join(" "));
    }
    let bytes = report.decode_bytes_per_token as f64;
    let (low, high) = target.bandwidth_gbs;
    kiln_runtime::say!(
        "  decode     reads {:.1} MB per token (weights + full KV cache): at most {:.1}–{:.1} tok/s at {low}–{high} GB/s",
        bytes / 1e6,
        low * 1e9 / bytes,
        high * 1e9 / bytes
    );
    if let Some(k) = &report.kernels {
        let bytes = k.decode_bytes_per_token as f64;
        println!(
            "  kernels    {} Ascend C kernel instances for {} in {}/kernels (kernels.json: tiling, GM bytes)",
            k.instances,
            k.target,
            report.out.display()
        );
        if bytes > 0.0 {
            println!(
                "  kernels    decode kernels read {:.1} MB per token: at most {:.1}–{:.1} tok/s at {low}–{high} GB/s",
                bytes / 1e6,
                low * 1e9 / bytes,
                high * 1e9 / bytes
            );
        }
        for (node, why) in k.skipped.iter().take(3) {
            println!("  kernels    {node} stays a standard op: {why}");
        }
        if k.skipped.len() > 3 {
            println!(
                "  kernels    ... and {} more standard ops",
                k.skipped.len() - 3
            );
        }
    }
    if let Some(q) = &m.quantization {
        let sizes = report.quant.as_ref().map_or(String::new(), |s| {
            format!(
                " ({:.1} MB → {:.1} MB)",
                s.float_bytes as f64 / 1e6,
                s.quantized_bytes as f64 / 1e6
            )
        });
        kiln_runtime::say!("  weights    quantized: {q}{sizes}");
    }
    if let Some(plan) = &m.memory {
        for (i, line) in plan.lines().iter().enumerate() {
            let label = if i == 0 { "device" } else { "" };
            kiln_runtime::say!("  {label:<10} {line}");
        }
    }
    for note in &report.notes {
        kiln_runtime::say!("  note       {note}");
    }
    if let Some(peak) = run::peak_rss_bytes() {
        kiln_runtime::say!("  memory     peak RSS {:.1} MB", peak as f64 / 1e6);
    }
    if report.kernels.is_some() && report.atc.is_none() {
        println!(
            "  kernels    no CANN here: on a CANN machine (msopgen, atc on PATH) run {}/build_om.sh, which builds \
             kernels/ (kernels/build.sh), installs it into opp/ (custom_opp_*.run --install-path), sets \
             ASCEND_CUSTOM_OPP_PATH and runs atc",
            report.out.display()
        );
    }
    match &report.atc {
        Some(atc) => kiln_runtime::say!("  atc        ran {}; the .om models are in {}", atc.display(), report.out.display()),
        None if args.no_atc => kiln_runtime::say!("  atc        skipped (--no-atc); run {}/build_om.sh on a machine with CANN", report.out.display()),
        None => kiln_runtime::say!(
            "  atc        not found on this machine (PATH, $ASCEND_HOME_PATH, $ASCEND_TOOLKIT_HOME, /usr/local/Ascend); \
             copy {} to a machine with CANN and run its build_om.sh to make the .om models",
            report.out.display()
        ),
    }
    compile_closing(&report.out, &report.files, m)?;
    if let Some(archive) = &args.bundle {
        let bundled = kiln::bundle::bundle(
            &report.out,
            archive,
            kiln::bundle::find_kiln_run().as_deref(),
        )?;
        kiln_runtime::say!(
            "  bundle     {} ({:.1} MB, {}): copy it to the board, tar xf it there and follow its README.txt",
            bundled.out.display(),
            bundled.bytes as f64 / 1e6,
            match &bundled.kiln_run {
                Some(k) => format!("with kiln-run from {}", k.display()),
                None => "no aarch64 kiln-run built yet: see Next above".to_string(),
            }
        );
    }
    Ok(())
}

/// The end of the compile summary: the total, what of it the board needs
/// (and what is made there), and the next commands, the cross-build's
/// prerequisites included.
fn compile_closing(
    out: &std::path::Path,
    files: &[(String, u64)],
    manifest: &kiln_runtime::compiled::manifest::Manifest,
) -> Result<()> {
    let mb = |b: u64| b as f64 / 1e6;
    let total: u64 = files.iter().map(|(_, size)| size).sum();
    let board = kiln::bundle::board_files(out)?;
    let board_bytes: u64 = board.iter().map(|f| f.bytes).sum();
    let names: Vec<&str> = board.iter().map(|f| f.name.as_str()).collect();
    let left: Vec<&str> = files
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !names.contains(n))
        .collect();
    let dir = out.display();
    // weights.bin is made from the reference weights where it is needed.
    let made = manifest
        .weights_bin
        .as_ref()
        .filter(|w| !w.stored && !files.iter().any(|(n, _)| *n == w.file));
    kiln_runtime::say!(
        "  board      {:.1} MB: {} (build_om.sh converts the .onnx files there or on any CANN machine; the IR \
         and {} serve --backend cpu and diff){}",
        mb(board_bytes),
        names.join(", "),
        kiln::compile::REFERENCE_WEIGHTS,
        if left.is_empty() {
            String::new()
        } else {
            format!("; not needed there: {} (ONNX Runtime, for kiln diff --b onnxruntime here)", left.join(", "))
        }
    );
    if let Some(w) = made {
        kiln_runtime::say!(
            "  weights    {} ({:.1} MB, the weights ATC converts) is not stored: build_om.sh and kiln diff make it \
             from {} when they need it (kiln-run expand-weights {dir}, sha256 checked; --store-atc-weights \
             stores it)",
            w.file,
            mb(w.bytes),
            kiln::compile::REFERENCE_WEIGHTS
        );
    }
    kiln_runtime::say!("  total      {:.1} MB in {}", mb(total), out.display());
    let leaf = out.file_name().unwrap_or_default().to_string_lossy();
    let [target, linker, build] = kiln::bundle::cross_build_steps();
    let (diff_note, board_note) = match made {
        Some(w) => (
            format!("writes {} first; ", w.file),
            format!(" (it makes {} with ./kiln-run first)", w.file),
        ),
        None => (String::new(), String::new()),
    };
    let steps = [
        format!("kiln-run generate {dir} --chat --prompt \"What is the capital of France?\"   # on this CPU"),
        format!("kiln diff {dir} --b onnxruntime --prompt \"The capital of France is\"   # {diff_note}needs a Python with onnxruntime (--python)"),
        "# kiln-run for the board (aarch64), once:".to_string(),
        target,
        linker,
        build,
        format!("kiln bundle {dir} {dir}.tar   # the board's files, that kiln-run and a README.txt in one archive"),
        format!("# on the board: tar xf {leaf}.tar; ./{leaf}/build_om.sh --soc auto{board_note}; ./kiln-run check {leaf}"),
        format!("# ./kiln-run generate {leaf} --backend npu --chat --prompt \"…\"   (README.txt in the archive lists them)"),
    ];
    kiln_runtime::say!("Next:");
    for step in steps {
        kiln_runtime::say!("  {step}");
    }
    Ok(())
}

fn bundle_command(args: BundleArgs) -> Result<()> {
    let kiln_run = match (&args.kiln_run, args.without_kiln_run) {
        (Some(path), _) => Some(path.clone()),
        (None, true) => None,
        (None, false) => kiln::bundle::find_kiln_run(),
    };
    let report = kiln::bundle::bundle(&args.compiled, &args.out, kiln_run.as_deref())?;
    kiln_runtime::say!(
        "wrote {} ({:.1} MB): {}/ with {} entries{}",
        report.out.display(),
        report.bytes as f64 / 1e6,
        report.root,
        report.files.len(),
        match &report.kiln_run {
            Some(k) => format!(", kiln-run from {}", k.display()),
            None => ", no kiln-run (README.txt says how to build one)".to_string(),
        }
    );
    kiln_runtime::say!(
        "On the board: tar xf {} && cat README.txt\n",
        report.out.file_name().unwrap_or_default().to_string_lossy()
    );
    kiln_runtime::say!("{}", report.readme.trim_end());
    Ok(())
}

/// `kiln compile --plan-only`: the device memory plan from config.json alone.
fn plan_only(
    args: &CompileArgs,
    target: &kiln::backend::atc::Target,
    device_memory: Option<u64>,
) -> Result<()> {
    use kiln::backend::onnx::builder::FloatType;
    use kiln::frontend::config::ModelConfig;
    let config = if kiln::frontend::is_gguf(&args.model) {
        kiln::frontend::HfModel::open(&args.model)?.config
    } else if args.model.is_dir() {
        ModelConfig::from_file(&args.model.join("config.json"))?
    } else {
        ModelConfig::from_file(&args.model)?
    };
    let options = kiln::frontend::GraphOptions::resolve(&config, &args.shape.request()?);
    options.check(&config)?;
    let float = match args.dtype {
        DTypeArg::Fp16 => FloatType::F16,
        DTypeArg::Fp32 => FloatType::F32,
    };
    let int8 = kiln::compile::atc_holds_int8(&args.quant.mode()?, args.dequantize_for_atc)?;
    let plan = kiln::plan::from_config(&config, &options, float, int8)?;
    kiln_runtime::say!(
        "device memory plan for {} ({}, {}{}, {} graphs, {}-token KV cache) on {}:",
        args.model.display(),
        config.architecture.hf_name(),
        float.name(),
        if int8 {
            ", int8 Linear weights (w8a8)"
        } else {
            ""
        },
        options.layout.name(),
        options.max_seq_len,
        target.soc_version
    );
    for line in plan.lines() {
        kiln_runtime::say!("  {line}");
    }
    kiln_runtime::say!("  ({})", plan.source);
    if let Some(memory) = device_memory {
        match kiln::plan::check_fits(&plan, memory)? {
            Some(warning) => kiln_runtime::say!("warning: {warning}"),
            None => kiln_runtime::say!(
                "fits {:.2} GiB, leaving {:.2} GiB for Linux, kiln-run and ACL's work memory",
                memory as f64 / (1u64 << 30) as f64,
                (memory - plan.total) as f64 / (1u64 << 30) as f64
            ),
        }
    }
    Ok(())
}

fn inspect(args: InspectArgs) -> Result<()> {
    if args.model.is_file() && !kiln::frontend::is_gguf(&args.model) {
        let om = kiln_runtime::om::OmFile::open(&args.model)?;
        kiln_runtime::say_raw!("{om}");
        if args.graph {
            let graphs = om
                .graphs()
                .map_err(|e| anyhow::anyhow!("{}: {e}", args.model.display()))?;
            for graph in graphs {
                kiln_runtime::say_raw!("{graph}");
            }
        }
        return Ok(());
    }
    if args.graph {
        anyhow::bail!(
            "--graph reads an .om file's MODEL_DEF; {} is a model (use --ir for Kiln's graphs)",
            args.model.display()
        );
    }
    let (model, ir) = kiln::lower(&args.model, &args.shape.request()?)?;
    let c = &model.config;
    kiln_runtime::say!("model      {}", model.source.display());
    kiln_runtime::say!("arch       {}", ir.info.architecture);
    kiln_runtime::say!(
        "shape      {} layers, hidden {}, {} heads ({} KV heads) of {}, MLP {}, vocab {}",
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size
    );
    match model.weights.files().count() {
        0 => kiln_runtime::say!(
            "weights    {} (dequantized from the GGUF file)",
            ir.info.weight_dtype
        ),
        n => kiln_runtime::say!("weights    {} ({n} files)", ir.info.weight_dtype),
    }
    kiln_runtime::say!(
        "rope       theta {}, {}, {} of {} dimensions rotated",
        c.rope.theta,
        c.rope.scaling.describe(),
        c.rotary_dim,
        c.head_dim
    );
    kiln_runtime::say!(
        "graphs     prefill {} tokens/step, decode 1 token/step, KV cache {} positions",
        ir.prefill_len,
        ir.kv_cache.max_len
    );
    for graph in ir.graphs() {
        let ops: Vec<String> = graph
            .op_counts()
            .iter()
            .map(|(op, n)| format!("{op}×{n}"))
            .collect();
        kiln_runtime::say!(
            "{:<10} {} nodes: {}",
            graph.name,
            graph.nodes.len(),
            ops.join(" ")
        );
    }
    if args.ir {
        for graph in ir.graphs() {
            kiln_runtime::say!("\n{graph}");
        }
    }
    if let Some(path) = args.save_ir {
        ir.save_json(&path)?;
        kiln_runtime::say!("IR written to {}", path.display());
    }
    Ok(())
}

fn generate_command(args: GenerateArgs) -> Result<()> {
    run::init_threads(args.run.threads).map_err(anyhow::Error::msg)?;
    let lowered = kiln::lower_with(
        &args.model,
        &args.shape.request()?,
        &args.quant.mode()?,
        throttled_progress(),
    )?;
    if let Some(summary) = &lowered.quant {
        report_quant(summary);
    }
    let (model, ir) = (lowered.model, lowered.ir);
    let tokenizer = match &args.run.prompt.prompt {
        Some(_) => Some(model.tokenizer().map_err(anyhow::Error::msg)?),
        None => None,
    };
    let template = if args.run.prompt.chat {
        model.chat_template()?
    } else {
        None
    };
    let Backend::Cpu = args.backend;
    let mut engine = CpuSession::new(&ir, &model.weights)?;
    let mut options = args.run.options(&model.eos_token_ids, ir.info.vocab_size);
    options.chat_template = template.as_ref();
    run::run_generation(&mut engine, tokenizer.as_ref(), &options)?;
    Ok(())
}

fn tokenize_command(args: TokenizeArgs) -> Result<()> {
    let model = kiln::frontend::HfModel::open(&args.model)?;
    let tokenizer = model.tokenizer().map_err(anyhow::Error::msg)?;
    let template = if args.chat {
        model.chat_template()?
    } else {
        None
    };
    let prompt = if args.chat {
        run::Prompt::Chat {
            system: args.system.as_deref(),
            user: &args.prompt,
        }
    } else {
        run::Prompt::Text(&args.prompt)
    };
    let ids = prompt.encode(Some(&tokenizer), template.as_ref())?;
    if args.show_text {
        kiln_runtime::note!("{}", tokenizer.decode_all(&ids)?);
    }
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    kiln_runtime::say!("{}", ids.join(","));
    Ok(())
}

fn import_command(args: ImportArgs) -> Result<()> {
    use kiln::import::{import, ImportDType};
    let model = kiln::frontend::HfModel::open(&args.model)?;
    let dtype = match args.dtype {
        ImportDTypeArg::F32 => ImportDType::F32,
        ImportDTypeArg::F16 => ImportDType::F16,
        ImportDTypeArg::Bf16 => ImportDType::BF16,
    };
    let report = import(&model, &args.output, dtype)?;
    kiln_runtime::say!(
        "wrote {} ({} tensors, {:.1} MB of weights): {}",
        args.output.display(),
        report.tensors,
        report.bytes as f64 / 1e6,
        report.files.join(", ")
    );
    if let Some(why) = &model.no_tokenizer_reason {
        kiln_runtime::say!("note: no tokenizer was written: {why}");
    }
    Ok(())
}
