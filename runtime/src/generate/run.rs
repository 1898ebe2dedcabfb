//! The generation command both binaries share (`kiln generate` on a Hugging
//! Face directory, `kiln-run generate` on a compiled one): encode the
//! prompt, run, stream text or ids to stdout, report speed to stderr.

use crate::engine::{Engine, SessionError};
use crate::generate::chat::{ChatMessage, ChatTemplate};
use crate::generate::sampling::Sampling;
use crate::generate::tokenizer::{TextStream, Tokenizer, TokenizerError};
use crate::generate::{argmax, generate, GenerationOptions, GenerationReport, StopReason};
use crate::npy::{self, NpyError};
use std::io::Write;
use std::path::Path;

/// The prompt options every generating command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct PromptArgs {
    /// The prompt text (needs the model's tokenizer.json).
    #[arg(
        long,
        conflicts_with = "token_ids",
        required_unless_present = "token_ids"
    )]
    pub prompt: Option<String>,
    /// The prompt as token ids, e.g. 3,17,250 (skips the tokenizer; the
    /// generated ids are printed instead of text).
    #[arg(long, value_delimiter = ',')]
    pub token_ids: Option<Vec<u32>>,
    /// Send --prompt as a user message through the model's chat template
    /// (from tokenizer_config.json, chat_template.jinja or the GGUF), as
    /// transformers' apply_chat_template does: for instruction-tuned models.
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// With --chat: a system message to start the conversation with.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
}

impl PromptArgs {
    pub fn prompt(&self) -> Prompt<'_> {
        match (&self.prompt, &self.token_ids) {
            (Some(text), _) if self.chat => Prompt::Chat {
                system: self.system.as_deref(),
                user: text,
            },
            (Some(text), _) => Prompt::Text(text),
            (None, Some(ids)) => Prompt::Ids(ids),
            (None, None) => unreachable!("clap requires --prompt or --token-ids"),
        }
    }

    /// The prompt's token ids: encoded by `tokenizer`, through `template`
    /// for --chat.
    pub fn encode(
        &self,
        tokenizer: Option<&Tokenizer>,
        template: Option<&ChatTemplate>,
    ) -> Result<Vec<u32>, RunError> {
        self.prompt().encode(tokenizer, template)
    }
}

/// The options of `kiln generate` and `kiln-run generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerationArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// How many tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Do not stop at the model's end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Save the logits as an f32 .npy of shape [new tokens, vocab]: row i
    /// holds the logits the i-th new token was chosen from.
    #[arg(long, value_name = "FILE.npy")]
    pub save_logits: Option<std::path::PathBuf>,
    /// Worker threads for the interpreter [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Untimed passes over the prompt (and two decode steps) before the timed
    /// run, so that benchmarks compare warm caches on every side.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub warmup: usize,
    /// Sample with this temperature; 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// When sampling, keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// When sampling, keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Discourage tokens already in the conversation (> 1), as transformers does.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed for sampling: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl GenerationArgs {
    /// The run options for a model whose end-of-sequence ids are `eos`.
    pub fn options(&self, eos: &[u32], vocab_size: usize) -> RunOptions<'_> {
        RunOptions {
            prompt: self.prompt.prompt(),
            chat_template: None,
            max_new_tokens: self.max_new_tokens,
            eos_token_ids: if self.ignore_eos {
                Vec::new()
            } else {
                eos.to_vec()
            },
            save_logits: self.save_logits.as_deref(),
            warmup: self.warmup,
            vocab_size,
            sampling: Sampling {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
                ..Sampling::default()
            },
        }
    }
}

pub enum Prompt<'a> {
    Text(&'a str),
    /// A user message (after an optional system message) rendered by the
    /// model's chat template.
    Chat {
        system: Option<&'a str>,
        user: &'a str,
    },
    /// Token ids: the output is ids too, comma-separated.
    Ids(&'a [u32]),
}

impl Prompt<'_> {
    pub fn encode(
        &self,
        tokenizer: Option<&Tokenizer>,
        template: Option<&ChatTemplate>,
    ) -> Result<Vec<u32>, RunError> {
        let no_tokenizer = || {
            RunError::Usage(
                "the model has no tokenizer.json; pass the prompt as --token-ids instead".into(),
            )
        };
        match self {
            Prompt::Ids(ids) => Ok(ids.to_vec()),
            Prompt::Text(text) => Ok(tokenizer.ok_or_else(no_tokenizer)?.encode(text)?),
            Prompt::Chat { system, user } => {
                let tokenizer = tokenizer.ok_or_else(no_tokenizer)?;
                let template = template.ok_or_else(|| {
                    RunError::Usage(
                        "the model has no chat template (no chat_template in tokenizer_config.json, \
                         no chat_template.jinja); drop --chat and write the prompt out in full"
                            .into(),
                    )
                })?;
                let mut messages = Vec::new();
                if let Some(system) = system {
                    messages.push(ChatMessage::new("system", system));
                }
                messages.push(ChatMessage::new("user", user));
                let text = template.render(&messages, true)?;
                // The template writes every special token itself, as
                // apply_chat_template's tokenization assumes.
                Ok(tokenizer.encode_plain(&text)?)
            }
        }
    }
}

pub struct RunOptions<'a> {
    pub prompt: Prompt<'a>,
    /// The model's chat template, for [`Prompt::Chat`].
    pub chat_template: Option<&'a ChatTemplate>,
    pub max_new_tokens: usize,
    pub eos_token_ids: Vec<u32>,
    pub save_logits: Option<&'a Path>,
    /// Untimed passes first, for benchmarks.
    pub warmup: usize,
    pub vocab_size: usize,
    pub sampling: Sampling,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error(transparent)]
    Chat(#[from] crate::generate::chat::ChatError),
    #[error("cannot write to stdout: {0}")]
    Stdout(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
}

pub fn run_generation(
    engine: &mut dyn Engine,
    tokenizer: Option<&Tokenizer>,
    options: &RunOptions,
) -> Result<GenerationReport, RunError> {
    let prompt = options.prompt.encode(tokenizer, options.chat_template)?;
    if prompt.is_empty() {
        return Err(RunError::Usage("the prompt is empty".into()));
    }
    options.sampling.check().map_err(RunError::Usage)?;
    if prompt.len() > engine.capacity() {
        return Err(RunError::Usage(format!(
            "the prompt has {} tokens but the KV cache holds {} (--max-seq-len); shorten the prompt, \
             or use (compile) the model with a larger --max-seq-len",
            prompt.len(),
            engine.capacity()
        )));
    }
    for _ in 0..options.warmup {
        let logits = engine.forward(&prompt)?;
        if engine.position() + 2 <= engine.capacity() {
            let token = argmax(&logits);
            engine.forward(&[token])?;
            engine.forward(&[token])?;
        }
        engine.reset();
    }
    let gen_options = GenerationOptions {
        max_new_tokens: options.max_new_tokens,
        eos_token_ids: options.eos_token_ids.clone(),
        record_logits: options.save_logits.is_some(),
        sampling: options.sampling.clone(),
    };
    let text_output = !matches!(options.prompt, Prompt::Ids(_));
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut stream = tokenizer.filter(|_| text_output).map(TextStream::new);
    let mut first = true;
    let mut write_error = None;
    let report = generate(engine, &prompt, &gen_options, |token| {
        let piece = match stream.as_mut() {
            Some(stream) => stream.push(token).unwrap_or_default(),
            None if first => token.to_string(),
            None => format!(",{token}"),
        };
        first = false;
        match out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
            Ok(()) => std::ops::ControlFlow::Continue(()),
            // Nobody reads the rest (a closed pipe): stop generating it.
            Err(e) => {
                write_error.get_or_insert(e);
                std::ops::ControlFlow::Break(())
            }
        }
    })?;
    if let Some(rest) = stream.as_mut().map(TextStream::finish).transpose()? {
        write!(out, "{rest}")?;
    }
    writeln!(out)?;
    if let Some(e) = write_error {
        return Err(RunError::Stdout(e));
    }
    if let Some(path) = options.save_logits {
        let rows = report.logits.len();
        npy::write_f32(path, &[rows, options.vocab_size], &report.logits.concat())?;
    }
    crate::note!(
        "first token after {:.1} ms",
        report.prefill_time.as_secs_f64() * 1e3
    );
    crate::note!(
        "prefill: {} tokens in {:.1} ms ({:.1} tok/s)",
        report.prompt_tokens,
        report.prefill_time.as_secs_f64() * 1e3,
        report.prefill_tokens_per_second()
    );
    if let Some(rate) = report.decode_tokens_per_second() {
        crate::note!(
            "decode:  {} tokens in {:.1} ms ({rate:.1} tok/s)",
            report.tokens.len() - 1,
            report.decode_time.as_secs_f64() * 1e3
        );
    }
    crate::note!("device:  {}", engine.device());
    crate::note_raw!("{}", crate::interp::profile::report());
    if report.stop == StopReason::ContextFull {
        crate::note!(
            "note: stopped because the KV cache is full ({} positions); use a larger --max-seq-len for longer output",
            engine.capacity()
        );
    }
    Ok(report)
}

/// Sets the worker-thread count for the interpreter (all cores by default).
pub fn init_threads(threads: Option<usize>) -> Result<(), String> {
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| format!("cannot start the worker threads: {e}"))
}

/// This process's peak resident memory (Linux's `VmHWM`), for summaries;
/// `None` where the kernel does not say.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
