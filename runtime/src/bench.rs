//! `kiln-run bench`: prompt processing and token generation speeds in
//! llama-bench's terms, so that Kiln's numbers sit beside llama.cpp's.
//!
//! As llama-bench measures them: `ppN` runs an N-token prompt from an
//! empty cache (tokens per second of the prefill; its time is the time to
//! first token); `tgN` generates N tokens one step at a time after a
//! one-token prompt (tokens per second of the decode steps alone). Each
//! test repeats `-r` times after one untimed warm-up run; the table shows
//! mean ± standard deviation of the per-run rates.

use crate::engine::{self, Backend, Engine, SessionError};
use crate::generate::run::{init_threads, peak_rss_bytes};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A directory written by `kiln compile`.
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Backend,
    /// The ACL device id for `--backend npu`.
    #[arg(long, default_value_t = 0)]
    pub device: i32,
    /// Prompt lengths to time (comma-separated); 0 skips prompt tests.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "64,512"
    )]
    pub prompt: Vec<usize>,
    /// Generation lengths to time (comma-separated); 0 skips generation tests.
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "32,128"
    )]
    pub generate: Vec<usize>,
    /// Timed repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5)]
    pub repetitions: usize,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Worker threads for the interpreter [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
}

/// One test's timings.
#[derive(Debug, serde::Serialize)]
pub struct TestResult {
    /// `pp64`, `tg32`, …
    pub test: String,
    pub n_prompt: usize,
    pub n_gen: usize,
    /// Tokens per second of each repetition.
    pub samples_ts: Vec<f64>,
    pub avg_ts: f64,
    pub stddev_ts: f64,
    /// For prompt tests: milliseconds from the prompt to its logits (the
    /// first token), mean over repetitions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    pub architecture: String,
    pub dtype: String,
    pub backend: String,
    pub device: String,
    pub threads: usize,
    pub kv_cache_positions: usize,
    /// The process's peak resident memory (host side; the device's own
    /// allocation is printed when the NPU engine opens).
    pub peak_rss_bytes: Option<u64>,
    pub results: Vec<TestResult>,
}

fn mean_and_stddev(samples: &[f64]) -> (f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = if samples.len() > 1 {
        samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// A prompt of `n` ids below `vocab`, the same every run (the speed of a
/// static graph does not depend on which ids it reads).
fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn time_prompt(engine: &mut dyn Engine, prompt: &[u32]) -> Result<f64, SessionError> {
    engine.reset();
    let start = Instant::now();
    engine.forward(prompt)?;
    Ok(start.elapsed().as_secs_f64())
}

fn time_generation(engine: &mut dyn Engine, n: usize, vocab: usize) -> Result<f64, SessionError> {
    engine.reset();
    let mut token = prompt_ids(1, vocab)[0];
    let logits = engine.forward(&[token])?;
    token = crate::generate::argmax(&logits);
    let start = Instant::now();
    for _ in 0..n {
        let logits = engine.forward(&[token])?;
        token = crate::generate::argmax(&logits);
    }
    Ok(start.elapsed().as_secs_f64())
}

pub fn bench(args: &BenchArgs) -> Result<BenchReport, String> {
    if args.repetitions == 0 {
        return Err("-r must be at least 1".into());
    }
    init_threads(args.threads)?;
    let (manifest, mut engine) = engine::open(&args.model, args.backend, args.device)?;
    let capacity = engine.capacity();
    let vocab = manifest.vocab_size;
    let tests: Vec<(usize, usize)> = args
        .prompt
        .iter()
        .filter(|&&p| p > 0)
        .map(|&p| (p, 0))
        .chain(args.generate.iter().filter(|&&n| n > 0).map(|&n| (0, n)))
        .collect();
    if tests.is_empty() {
        return Err("nothing to time: give -p or -n lengths above 0".into());
    }
    for &(p, n) in &tests {
        // A generation test holds its one-token prompt and n steps.
        let needed = p.max(n + 1);
        if needed > capacity {
            return Err(format!(
                "{}: needs {needed} positions but the model's KV cache holds {capacity}; use \
                 shorter tests (-p/-n) or compile with a larger --max-seq-len",
                test_name(p, n)
            ));
        }
    }
    let mut results = Vec::new();
    for (p, n) in tests {
        let name = test_name(p, n);
        crate::note!(
            "kiln-run bench: {name} ({} runs after a warm-up)",
            args.repetitions
        );
        let mut seconds = Vec::new();
        let run = |engine: &mut dyn Engine| -> Result<f64, String> {
            let result = if p > 0 {
                time_prompt(engine, &prompt_ids(p, vocab))
            } else {
                time_generation(engine, n, vocab)
            };
            result.map_err(|e| format!("{name}: {e}"))
        };
        run(engine.as_mut())?;
        for _ in 0..args.repetitions {
            seconds.push(run(engine.as_mut())?);
        }
        let tokens = (p + n) as f64;
        let samples_ts: Vec<f64> = seconds.iter().map(|s| tokens / s.max(1e-9)).collect();
        let (avg_ts, stddev_ts) = mean_and_stddev(&samples_ts);
        results.push(TestResult {
            test: name,
            n_prompt: p,
            n_gen: n,
            avg_ts,
            stddev_ts,
            ttft_ms: (p > 0).then(|| mean_and_stddev(&seconds).0 * 1e3),
            samples_ts,
        });
    }
    let model = args
        .model
        .canonicalize()
        .unwrap_or_else(|_| args.model.clone());
    Ok(BenchReport {
        model: model.file_name().map_or_else(
            || model.display().to_string(),
            |n| n.to_string_lossy().into(),
        ),
        architecture: manifest.architecture.clone(),
        dtype: manifest.dtype.clone(),
        backend: match args.backend {
            Backend::Cpu => "CPU".into(),
            Backend::Npu => "NPU".into(),
        },
        device: engine.device(),
        threads: rayon::current_num_threads(),
        kv_cache_positions: capacity,
        peak_rss_bytes: peak_rss_bytes(),
        results,
    })
}

fn test_name(p: usize, n: usize) -> String {
    if p > 0 {
        format!("pp{p}")
    } else {
        format!("tg{n}")
    }
}

impl BenchReport {
    /// The table, in llama-bench's markdown layout plus a time-to-first-token column.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let memory = self.peak_rss_bytes.map_or("?".into(), |b| {
            format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
        });
        out += "| model | dtype | backend | threads | test | t/s | ttft ms |\n";
        out += "| ----- | ----- | ------- | ------: | ---: | --: | ------: |\n";
        for r in &self.results {
            let ttft = r.ttft_ms.map_or(String::new(), |t| format!("{t:.1}"));
            out += &format!(
                "| {} | {} | {} | {} | {} | {:.2} ± {:.2} | {} |\n",
                self.model,
                self.dtype,
                self.backend,
                self.threads,
                r.test,
                r.avg_ts,
                r.stddev_ts,
                ttft
            );
        }
        out += &format!(
            "\n{} ({}), {} KV positions; peak host memory {memory}\n",
            self.architecture, self.device, self.kv_cache_positions
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_and_prompts() {
        let (mean, sd) = mean_and_stddev(&[2.0, 4.0, 6.0]);
        assert_eq!((mean, sd), (4.0, 2.0));
        assert_eq!(mean_and_stddev(&[5.0]), (5.0, 0.0));
        let ids = prompt_ids(100, 50);
        assert_eq!(ids.len(), 100);
        assert!(ids.iter().all(|&t| t < 50));
        assert_eq!(
            (test_name(64, 0), test_name(0, 32)),
            ("pp64".into(), "tg32".into())
        );
    }
}
