//! Perplexity of a text by strided windows (the method of Hugging Face's
//! perplexity guide), and how closely a candidate model's logits follow a
//! reference's (the same model unquantized) at every scored position.
//!
//! Windows of `ctx` tokens advance by `stride`; each window is one run of a
//! graph that outputs every position's logits, from position 0 with an empty
//! KV cache, and scores only the tokens the previous window did not (the
//! first window scores all but its first token). So every token after the
//! first is scored exactly once, each with at least `ctx - stride` tokens of
//! context once the first window is past.

use crate::frontend::decoder::LogitsOutput;
use crate::frontend::{FrontendError, GraphOptions, HfModel};
use kiln_runtime::diff::Closeness;
use kiln_runtime::engine::{check_step, SessionError, StepInputs};
use kiln_runtime::generate::argmax;
use kiln_runtime::interp::{F32Weights, InterpError, Interpreter};
use kiln_runtime::ir::{Graph, GraphLayout, GraphNames, IrError};
use kiln_runtime::tensor::Tensor;
use kiln_runtime::weights::WeightStore;
use serde::Serialize;
use std::fmt;
use std::ops::Range;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{0}")]
    Options(String),
    #[error("the text has too few tokens ({tokens}); perplexity needs at least 2 (one to predict from, one to score)")]
    NothingToScore { tokens: usize },
    #[error(
        "the text has {tokens} tokens, fewer than one window of --ctx {ctx} needs ({ctx}); \
         use a longer text, or --ctx {tokens}"
    )]
    ShorterThanWindow { tokens: usize, ctx: usize },
    #[error(
        "{role}'s logits at token {position} (window {window} of {windows}) hold {value}: \
         the model computes a non-finite value there, so no perplexity can be given"
    )]
    NonFinite {
        role: Role,
        position: usize,
        window: usize,
        windows: usize,
        value: f32,
    },
    #[error("graph `{graph}` cannot score a text: {problem}")]
    Graph { graph: String, problem: String },
    #[error("the reference does not match the model: {0}")]
    ReferenceMismatch(String),
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Ir(#[from] IrError),
    #[error(transparent)]
    Interp(#[from] InterpError),
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// Which of the two evaluated models a figure or an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Model,
    Reference,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Model => "the model",
            Role::Reference => "the reference",
        })
    }
}

/// Window length and advance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalOptions {
    pub ctx: usize,
    pub stride: usize,
}

impl EvalOptions {
    pub const DEFAULT_CTX: usize = 256;

    /// `stride` defaults to half the window.
    pub fn new(ctx: usize, stride: Option<usize>) -> Result<EvalOptions, EvalError> {
        let options = EvalOptions {
            ctx,
            stride: stride.unwrap_or(ctx / 2),
        };
        options.check()?;
        Ok(options)
    }

    fn check(&self) -> Result<(), EvalError> {
        if self.ctx < 2 {
            return Err(EvalError::Options(format!(
                "--ctx {} is too short: a window needs at least 2 tokens to score one",
                self.ctx
            )));
        }
        if self.stride == 0 || self.stride >= self.ctx {
            // With stride = ctx the windows would not overlap and each one's
            // first token, which nothing in its window precedes, would go unscored.
            return Err(EvalError::Options(format!(
                "--stride {} must be from 1 to {} (less than --ctx {}), so that consecutive \
                 windows overlap and every token after the first is scored",
                self.stride,
                self.ctx - 1,
                self.ctx
            )));
        }
        Ok(())
    }
}

/// One window: tokens `start..end` run together; the tokens at
/// `first_scored..end` are scored, each from the logits one position before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub end: usize,
    pub first_scored: usize,
}

impl Window {
    /// The rows of the window's logits that score its tokens: row `r`
    /// predicts the window's token `r + 1`.
    pub fn scored_rows(&self) -> Range<usize> {
        self.first_scored - 1 - self.start..self.end - 1 - self.start
    }
}

/// The windows over `len` tokens, as the perplexity guide's loop makes them:
/// starts at multiples of `stride`, each `ctx` long or cut at the end, the
/// last the first that reaches the end. Needs `len ≥ 2` and valid options.
pub fn plan_windows(len: usize, options: &EvalOptions) -> Vec<Window> {
    assert!(len >= 2 && options.check().is_ok());
    let mut windows = Vec::with_capacity(len.div_ceil(options.stride));
    let (mut start, mut previous_end) = (0, 0);
    loop {
        let end = (start + options.ctx).min(len);
        windows.push(Window {
            start,
            end,
            first_scored: previous_end.max(start + 1),
        });
        if end == len {
            return windows;
        }
        previous_end = end;
        start += options.stride;
    }
}

/// A graph that outputs every position's logits ([`LogitsOutput::AllPositions`]),
/// ready to run one window at a time with its weights.
pub struct EvalModel {
    interpreter: Interpreter,
    window_len: usize,
    vocab: usize,
    logits_output: usize,
}

impl EvalModel {
    pub fn new(graph: Graph, weights: &WeightStore) -> Result<EvalModel, EvalError> {
        let problem = |problem: String| EvalError::Graph {
            graph: graph.name.clone(),
            problem,
        };
        let ids = graph.ty(graph.input(GraphNames::INPUT_IDS)?);
        let cache = graph.ty(graph.input(GraphNames::K_CACHE)?).clone();
        let logits_id = graph.output(GraphNames::LOGITS)?;
        let logits = graph.ty(logits_id);
        let (window_len, cache_len) = (ids.shape[1], cache.shape[3]);
        let picks_one = graph.input(GraphNames::LOGITS_INDEX).is_ok();
        if picks_one || logits.shape.len() != 3 || logits.shape[1] != window_len {
            return Err(problem(format!(
                "its logits are {logits}, one position's; scoring needs every position's, \
                 [1, {window_len}, vocab] (build it with LogitsOutput::AllPositions)"
            )));
        }
        if cache_len < window_len {
            return Err(problem(format!(
                "its KV cache of {cache_len} positions is shorter than its {window_len}-token window"
            )));
        }
        let vocab = logits.shape[2];
        let logits_output = graph
            .outputs
            .iter()
            .position(|&id| id == logits_id)
            .expect("graph.output found it among the outputs");
        Ok(EvalModel {
            interpreter: Interpreter::new(graph, weights, &mut F32Weights::default())?,
            window_len,
            vocab,
            logits_output,
        })
    }

    /// Tokens per window: the graph's static length.
    pub fn window_len(&self) -> usize {
        self.window_len
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// `[tokens.len(), vocab]` logits of one window run from position 0;
    /// a short last window is padded, and the padding's rows dropped.
    pub fn window_logits(&self, tokens: &[u32]) -> Result<Vec<f32>, EvalError> {
        check_step(tokens, self.vocab, 0, self.window_len)?;
        let inputs = window_inputs(self.interpreter.graph(), tokens)?;
        let mut outputs = self.interpreter.run(&inputs)?;
        let mut logits = outputs.swap_remove(self.logits_output).into_f32_vec();
        logits.truncate(tokens.len() * self.vocab);
        Ok(logits)
    }
}

/// The inputs that run `graph` (a prefill graph) on `tokens` from
/// position 0 over an empty cache; shorter token runs are padded.
pub fn window_inputs<'g>(
    graph: &'g Graph,
    tokens: &[u32],
) -> Result<Vec<(&'g str, Tensor)>, IrError> {
    let t = graph.ty(graph.input(GraphNames::INPUT_IDS)?).shape[1];
    let cache = graph.ty(graph.input(GraphNames::K_CACHE)?).clone();
    let l = cache.shape[3];
    let step = StepInputs::new(tokens, t, 0, l, &graph.masks);
    let empty = || Tensor::from_f32(cache.shape.clone(), vec![0.0; cache.numel()]);
    let mut inputs = vec![
        (
            GraphNames::INPUT_IDS,
            Tensor::from_i64([1, t], step.input_ids),
        ),
        (
            GraphNames::POSITION_IDS,
            Tensor::from_i64([1, t], step.position_ids),
        ),
        (GraphNames::K_CACHE, empty()),
        (GraphNames::V_CACHE, empty()),
    ];
    for (spec, mask) in graph.masks.iter().zip(step.masks) {
        inputs.push((
            spec.input.as_str(),
            Tensor::from_f32([1, 1, t, l + t], mask),
        ));
    }
    if graph.input(GraphNames::LOGITS_INDEX).is_ok() {
        inputs.push((
            GraphNames::LOGITS_INDEX,
            Tensor::from_i64([1, 1], vec![step.logits_index]),
        ));
    }
    Ok(inputs)
}

/// Builds the graph `kiln eval` runs: windows of `ctx` tokens over a KV
/// cache of `ctx` slots (which only supplies RoPE positions up to `ctx`: it
/// stays hidden), every position's logits, the default passes applied.
pub fn eval_graph(model: &mut HfModel, ctx: usize) -> Result<Graph, EvalError> {
    let limit = model.config.max_position_embeddings;
    if ctx > limit {
        return Err(EvalError::Options(format!(
            "--ctx {ctx} exceeds the model's max_position_embeddings ({limit})"
        )));
    }
    let options = GraphOptions {
        prefill_len: ctx,
        max_seq_len: ctx,
        logits: LogitsOutput::AllPositions,
        layout: GraphLayout::Split,
    };
    let mut ir = model.build_ir(&options)?;
    let mut graph = ir
        .take_graph("prefill")
        .expect("split models have a prefill graph");
    crate::passes::optimize_graph(&mut graph)?;
    Ok(graph)
}

/// Where the evaluation is: about to run window `window` (from 1) of `windows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub window: usize,
    pub windows: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    /// Tokens evaluated.
    pub tokens: usize,
    pub ctx: usize,
    pub stride: usize,
    pub windows: usize,
    /// Tokens whose negative log-likelihood counts: all but the first.
    pub scored_tokens: usize,
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub ppl: f64,
    /// With a reference model: how closely the model follows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<Agreement>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Agreement {
    pub reference_mean_nll: f64,
    pub reference_ppl: f64,
    /// `ppl / reference_ppl`: 1 when the model is as good as its reference.
    pub ppl_ratio: f64,
    /// Cosine similarity of the two models' logits, over scored positions.
    pub mean_cosine: f64,
    pub min_cosine: f64,
    /// The share of scored positions where both models' likeliest next
    /// token is the same.
    pub top1_agreement: f64,
}

/// Scores `tokens` with `model` and, when given, compares its logits with
/// `reference`'s at every scored position. `progress` hears of each window
/// before it runs. Holds one window's logits per model at a time.
pub fn evaluate(
    model: &EvalModel,
    tokens: &[u32],
    options: &EvalOptions,
    reference: Option<&EvalModel>,
    mut progress: impl FnMut(Progress),
) -> Result<EvalReport, EvalError> {
    options.check()?;
    if model.window_len() != options.ctx {
        return Err(EvalError::Options(format!(
            "the model's graph runs windows of {} tokens, not --ctx {}",
            model.window_len(),
            options.ctx
        )));
    }
    if let Some(reference) = reference {
        let (ours, theirs) = (
            (model.window_len(), model.vocab()),
            (reference.window_len(), reference.vocab()),
        );
        if ours != theirs {
            return Err(EvalError::ReferenceMismatch(format!(
                "windows of {} tokens over {} logits against {} over {}",
                ours.0, ours.1, theirs.0, theirs.1
            )));
        }
    }
    if tokens.len() < 2 {
        return Err(EvalError::NothingToScore {
            tokens: tokens.len(),
        });
    }
    if tokens.len() < options.ctx {
        return Err(EvalError::ShorterThanWindow {
            tokens: tokens.len(),
            ctx: options.ctx,
        });
    }
    let windows = plan_windows(tokens.len(), options);
    let vocab = model.vocab();
    let mut nll = NllSum::default();
    let mut reference_nll = NllSum::default();
    let mut closeness = ClosenessSum::default();
    for (index, window) in windows.iter().enumerate() {
        let at = Progress {
            window: index + 1,
            windows: windows.len(),
        };
        progress(at);
        let window_tokens = &tokens[window.start..window.end];
        let run = |m: &EvalModel, role: Role| -> Result<Vec<f32>, EvalError> {
            let logits = m.window_logits(window_tokens)?;
            check_finite(&logits, vocab, role, window, at)?;
            Ok(logits)
        };
        let logits = run(model, Role::Model)?;
        nll.add(&logits, vocab, window_tokens, window.scored_rows());
        if let Some(reference) = reference {
            let expected = run(reference, Role::Reference)?;
            reference_nll.add(&expected, vocab, window_tokens, window.scored_rows());
            closeness.add(&logits, &expected, vocab, window.scored_rows());
        }
    }
    let agreement = reference.map(|_| Agreement {
        reference_mean_nll: reference_nll.mean(),
        reference_ppl: reference_nll.mean().exp(),
        ppl_ratio: (nll.mean() - reference_nll.mean()).exp(),
        mean_cosine: closeness.cosine_sum / closeness.rows as f64,
        min_cosine: closeness.min_cosine,
        top1_agreement: closeness.top1_agreeing as f64 / closeness.rows as f64,
    });
    Ok(EvalReport {
        tokens: tokens.len(),
        ctx: options.ctx,
        stride: options.stride,
        windows: windows.len(),
        scored_tokens: nll.count,
        mean_nll: nll.mean(),
        ppl: nll.mean().exp(),
        agreement,
    })
}

/// Refuses NaN and infinities anywhere in a window's logits (before any is
/// used, so none can slip into a figure), naming the token where it is.
fn check_finite(
    logits: &[f32],
    vocab: usize,
    role: Role,
    window: &Window,
    at: Progress,
) -> Result<(), EvalError> {
    match logits.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(EvalError::NonFinite {
            role,
            position: window.start + i / vocab,
            window: at.window,
            windows: at.windows,
            value: logits[i],
        }),
    }
}

/// Negative log-likelihoods summed in f64.
#[derive(Default)]
struct NllSum {
    sum: f64,
    count: usize,
}

impl NllSum {
    fn add(&mut self, logits: &[f32], vocab: usize, window_tokens: &[u32], rows: Range<usize>) {
        for row in rows {
            let target = window_tokens[row + 1] as usize;
            self.sum += negative_log_likelihood(&logits[row * vocab..][..vocab], target);
            self.count += 1;
        }
    }

    fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// `-log softmax(row)[target]`, computed in f64 with the maximum taken out.
fn negative_log_likelihood(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - row[target] as f64
}

struct ClosenessSum {
    cosine_sum: f64,
    min_cosine: f64,
    top1_agreeing: usize,
    rows: usize,
}

impl Default for ClosenessSum {
    fn default() -> Self {
        ClosenessSum {
            cosine_sum: 0.0,
            min_cosine: f64::INFINITY,
            top1_agreeing: 0,
            rows: 0,
        }
    }
}

impl ClosenessSum {
    fn add(&mut self, logits: &[f32], expected: &[f32], vocab: usize, rows: Range<usize>) {
        for row in rows {
            let (a, b) = (
                &logits[row * vocab..][..vocab],
                &expected[row * vocab..][..vocab],
            );
            let cosine = Closeness::of(a, b).cosine;
            self.cosine_sum += cosine;
            // `f64::min` would drop a NaN: keep it, so that it shows.
            if cosine.is_nan() || cosine < self.min_cosine {
                self.min_cosine = cosine;
            }
            self.top1_agreeing += usize::from(argmax(a) == argmax(b));
            self.rows += 1;
        }
    }
}

/// The report as a table of one row, with the agreement columns when there
/// is a reference.
pub fn table(model: &str, quant: Option<&str>, report: &EvalReport) -> String {
    let mut columns: Vec<(&str, String)> = vec![
        ("model", model.to_string()),
        ("tokens", report.tokens.to_string()),
        ("ctx", report.ctx.to_string()),
        ("stride", report.stride.to_string()),
        ("windows", report.windows.to_string()),
        ("scored", report.scored_tokens.to_string()),
        ("ppl", format!("{:.4}", report.ppl)),
    ];
    if let Some(a) = &report.agreement {
        columns.extend([
            ("quant", quant.unwrap_or("-").to_string()),
            ("ref ppl", format!("{:.4}", a.reference_ppl)),
            ("ppl ratio", format!("{:.6}", a.ppl_ratio)),
            ("mean cos", format!("{:.6}", a.mean_cosine)),
            ("min cos", format!("{:.6}", a.min_cosine)),
            ("top-1", format!("{:.2}%", 100.0 * a.top1_agreement)),
        ]);
    }
    // The model's name reads best on the left; numbers line up on the right.
    let ((name, model), numbers) = columns.split_first().expect("the model column is first");
    let width = name.len().max(model.chars().count());
    let mut header = format!("{name:<width$}");
    let mut row = format!("{model:<width$}");
    for (name, value) in numbers {
        let width = name.len().max(value.len());
        header += &format!("  {name:>width$}");
        row += &format!("  {value:>width$}");
    }
    format!("{header}\n{row}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guide's loop, written as it reads: which tokens each window
    /// scores (`-100` labels are the ones it does not).
    fn guide_windows(len: usize, ctx: usize, stride: usize) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut prev_end = 0;
        for begin in (0..len).step_by(stride) {
            let end = (begin + ctx).min(len);
            let target_len = end - prev_end;
            // Labels before the last target_len are ignored; the label shift
            // drops the window's first token as well.
            let first = (end - target_len).max(begin + 1);
            out.push((begin, end, first));
            prev_end = end;
            if end == len {
                break;
            }
        }
        out
    }

    #[test]
    fn every_token_after_the_first_is_scored_exactly_once() {
        for len in 2..70 {
            for ctx in 2..14 {
                for stride in 1..ctx {
                    let options = EvalOptions { ctx, stride };
                    let windows = plan_windows(len, &options);
                    let mut scored = vec![0; len];
                    for (i, w) in windows.iter().enumerate() {
                        assert_eq!(w.start, i * stride);
                        assert!(w.end - w.start <= ctx && w.start < w.first_scored);
                        assert!(w.first_scored < w.end, "window {i} scores nothing");
                        for count in &mut scored[w.first_scored..w.end] {
                            *count += 1;
                        }
                        let rows = w.scored_rows();
                        assert_eq!(rows.len(), w.end - w.first_scored);
                        assert_eq!(w.start + rows.start + 1, w.first_scored);
                    }
                    assert_eq!(scored[0], 0, "len {len} ctx {ctx} stride {stride}");
                    assert!(
                        scored[1..].iter().all(|&n| n == 1),
                        "len {len} ctx {ctx} stride {stride}: {scored:?}"
                    );
                    assert_eq!(windows.last().unwrap().end, len);
                    let ours: Vec<_> = windows
                        .iter()
                        .map(|w| (w.start, w.end, w.first_scored))
                        .collect();
                    assert_eq!(ours, guide_windows(len, ctx, stride));
                }
            }
        }
    }

    #[test]
    fn windows_of_a_typical_run() {
        let options = EvalOptions::new(64, None).unwrap();
        assert_eq!(options.stride, 32);
        let windows = plan_windows(300, &options);
        // Starts 0, 32, …, 256; the one at 256 is the first to reach the end.
        assert_eq!(windows.len(), 9);
        assert_eq!(
            windows[0],
            Window {
                start: 0,
                end: 64,
                first_scored: 1
            }
        );
        assert_eq!(
            windows[1],
            Window {
                start: 32,
                end: 96,
                first_scored: 64
            }
        );
        assert_eq!(
            windows[8],
            Window {
                start: 256,
                end: 300,
                first_scored: 288
            }
        );
    }

    #[test]
    fn options_refuse_windows_that_would_leave_tokens_unscored() {
        assert!(EvalOptions::new(1, None).is_err());
        assert!(EvalOptions::new(2, None).is_ok());
        for stride in [0, 8, 9] {
            let err = EvalOptions::new(8, Some(stride)).unwrap_err().to_string();
            assert!(
                err.contains(&format!("--stride {stride} must be from 1 to 7")),
                "{err}"
            );
        }
    }

    #[test]
    fn negative_log_likelihood_is_that_of_the_softmax() {
        let row = [1.0f32, 2.0, 3.0];
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        for target in 0..3 {
            let expected = -((row[target] as f64).exp() / z).ln();
            assert!((negative_log_likelihood(&row, target) - expected).abs() < 1e-12);
        }
        // Large logits do not overflow.
        let nll = negative_log_likelihood(&[1000.0, 1000.0], 0);
        assert!((nll - 2f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn a_nan_or_infinity_in_any_row_is_an_error_naming_its_token() {
        let window = Window {
            start: 10,
            end: 13,
            first_scored: 12,
        };
        let at = Progress {
            window: 2,
            windows: 5,
        };
        let mut logits = vec![0.5f32; 3 * 4];
        assert!(check_finite(&logits, 4, Role::Model, &window, at).is_ok());
        // Row 0 is not scored in this window: still refused.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            logits[2] = bad;
            let err = check_finite(&logits, 4, Role::Reference, &window, at).unwrap_err();
            assert!(matches!(
                err,
                EvalError::NonFinite {
                    role: Role::Reference,
                    position: 10,
                    window: 2,
                    windows: 5,
                    ..
                }
            ));
            assert!(
                err.to_string().contains("at token 10 (window 2 of 5)"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_nan_cosine_is_the_minimum() {
        let mut sum = ClosenessSum::default();
        sum.add(&[1.0, 2.0], &[1.0, 2.0], 2, 0..1);
        sum.add(&[f32::NAN, 2.0], &[1.0, 2.0], 2, 0..1);
        sum.add(&[1.0, 2.0], &[2.0, 1.0], 2, 0..1);
        assert!(sum.min_cosine.is_nan() && sum.cosine_sum.is_nan());
    }

    #[test]
    fn the_table_has_agreement_columns_only_with_a_reference() {
        let mut report = EvalReport {
            tokens: 300,
            ctx: 64,
            stride: 32,
            windows: 9,
            scored_tokens: 299,
            mean_nll: 1.0,
            ppl: 1f64.exp(),
            agreement: None,
        };
        let text = table("m", None, &report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("model  tokens  ctx  stride  windows  scored"));
        assert!(lines[1].ends_with("2.7183") && !text.contains("cos"));
        report.agreement = Some(Agreement {
            reference_mean_nll: 1.0,
            reference_ppl: 1f64.exp(),
            ppl_ratio: 1.0,
            mean_cosine: 1.0,
            min_cosine: 1.0,
            top1_agreement: 1.0,
        });
        let text = table("m", Some("none"), &report);
        assert!(
            text.contains("min cos") && text.contains("100.00%"),
            "{text}"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0].len(), lines[1].len());
    }

    /// The fixture models are in the repository's tests/ (random weights).
    fn fixture(name: &str) -> HfModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models")
            .join(name);
        HfModel::open(&dir).unwrap()
    }

    fn tokens(len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| (i * 37 + 11) % 320).collect()
    }

    #[test]
    fn every_positions_logits_are_what_generation_sees_there() {
        use kiln_runtime::engine::{CpuSession, Engine};
        let mut model = fixture("llama-gqa");
        let graph = eval_graph(&mut model, 16).unwrap();
        assert!(graph.input(GraphNames::LOGITS_INDEX).is_err());
        let eval = EvalModel::new(graph, &model.weights).unwrap();
        let ids = tokens(11);
        // A short window: padded to 16, the padding's rows dropped.
        let all = eval.window_logits(&ids).unwrap();
        assert_eq!(all.len(), 11 * 320);
        let (generating, ir) = crate::lower(&model.source, &Default::default()).unwrap();
        let mut session = CpuSession::new(&ir, &generating.weights).unwrap();
        for t in [0, 5, 10] {
            session.reset();
            let picked = session.forward(&ids[..=t]).unwrap();
            let row = &all[t * 320..][..320];
            // Closeness counts a NaN as an infinite difference.
            let err = kiln_runtime::diff::Closeness::of(row, &picked).max_abs;
            kiln_runtime::note!("position {t}: max abs difference {err:.2e}");
            assert!(err < 1e-5, "position {t}: max abs difference {err:.2e}");
        }
    }

    #[test]
    fn a_model_against_itself_agrees_exactly_and_against_another_does_not() {
        let options = EvalOptions::new(16, Some(6)).unwrap();
        let mut model = fixture("llama-gqa");
        let graph = eval_graph(&mut model, 16).unwrap();
        let candidate = EvalModel::new(graph.clone(), &model.weights).unwrap();
        let same = EvalModel::new(graph, &model.weights).unwrap();
        let ids = tokens(40);
        let mut seen = Vec::new();
        let report = evaluate(&candidate, &ids, &options, Some(&same), |p| seen.push(p)).unwrap();
        assert_eq!((report.windows, report.scored_tokens), (5, 39));
        assert_eq!(
            seen.iter()
                .map(|p| (p.window, p.windows))
                .collect::<Vec<_>>(),
            [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
        );
        assert!(report.ppl.is_finite() && report.ppl > 1.0);
        let a = report.agreement.unwrap();
        // The same bits on both sides; the cosine only rounds.
        assert_eq!((a.ppl_ratio, a.top1_agreement), (1.0, 1.0));
        assert_eq!(a.reference_ppl, report.ppl);
        assert!(1.0 - a.min_cosine < 1e-12 && a.min_cosine <= a.mean_cosine);

        // Same shapes, other weights.
        let mut other = fixture("llama3-rope");
        let other_graph = eval_graph(&mut other, 16).unwrap();
        let other = EvalModel::new(other_graph, &other.weights).unwrap();
        let report = evaluate(&candidate, &ids, &options, Some(&other), |_| {}).unwrap();
        let a = report.agreement.unwrap();
        assert!(a.ppl_ratio != 1.0 && a.min_cosine < a.mean_cosine && a.mean_cosine < 1.0);
        assert!((a.ppl_ratio - report.ppl / a.reference_ppl).abs() < 1e-9);
    }

    #[test]
    fn a_nan_in_the_weights_is_an_error_not_a_perplexity() {
        let mut model = fixture("llama-gqa");
        // Token 7's embedding row becomes NaN: every position from its first
        // occurrence on sees it through attention.
        let mut embed = model
            .weights
            .to_f32_tensor("model.embed_tokens.weight")
            .unwrap()
            .into_f32_vec();
        embed[7 * 64] = f32::NAN;
        model
            .weights
            .insert_f32("model.embed_tokens.weight", vec![320, 64], embed);
        let graph = eval_graph(&mut model, 8).unwrap();
        let eval = EvalModel::new(graph, &model.weights).unwrap();
        let mut ids = tokens(30);
        ids[20] = 7;
        let options = EvalOptions::new(8, Some(4)).unwrap();
        let err = evaluate(&eval, &ids, &options, None, |_| {}).unwrap_err();
        // Windows start at multiples of 4: the one starting at 16 is the first to see token 20.
        assert!(
            matches!(
                err,
                EvalError::NonFinite {
                    role: Role::Model,
                    position: 20,
                    window: 5,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn texts_shorter_than_a_window_are_refused_with_both_counts() {
        let mut model = fixture("qwen3");
        let graph = eval_graph(&mut model, 8).unwrap();
        let eval = EvalModel::new(graph, &model.weights).unwrap();
        let options = EvalOptions::new(8, None).unwrap();
        let err = evaluate(&eval, &tokens(5), &options, None, |_| {}).unwrap_err();
        assert!(
            err.to_string()
                .contains("the text has 5 tokens, fewer than one window of --ctx 8 needs (8)"),
            "{err}"
        );
        let err = evaluate(&eval, &tokens(1), &options, None, |_| {}).unwrap_err();
        assert!(err
            .to_string()
            .contains("too few tokens (1); perplexity needs at least 2"));
        let err = eval_graph(&mut model, 257).unwrap_err().to_string();
        assert!(err.contains("--ctx 257 exceeds the model's max_position_embeddings (256)"));
    }

    #[test]
    fn a_graph_with_one_positions_logits_is_refused() {
        let (model, ir) = crate::lower(
            &fixture("qwen3").source,
            &crate::frontend::ShapeRequest {
                prefill_len: Some(8),
                max_seq_len: Some(8),
                ..Default::default()
            },
        )
        .unwrap();
        let err = EvalModel::new(ir.graph("prefill").unwrap().clone(), &model.weights)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("one position's"), "{err}");
    }
}
