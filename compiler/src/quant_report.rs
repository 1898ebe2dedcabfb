//! `quant_report.json`: how closely a model quantized with calibration text
//! follows its float original on that text — perplexity of both, logits
//! cosine and top-1 agreement per position, as `kiln eval` measures them —
//! written by `kiln compile` beside the graphs.
//!
//! The text is the calibration text, which the adjustments were fitted to:
//! the figures are in-sample. `kiln eval MODEL --quant … --text OTHER`
//! gives held-out ones.

use crate::calibrate::{CalibrationText, MAX_CALIBRATION_TOKENS};
use crate::eval::{eval_graph, evaluate, EvalModel, EvalOptions, EvalReport, Progress};
use crate::frontend::HfModel;
use crate::passes::quantize::{QuantOptions, QuantSummary};
use crate::LowerError;
use kiln_runtime::ir::{Graph, GraphNames};
use serde::Serialize;
use std::path::Path;

pub const QUANT_REPORT_FILE: &str = "quant_report.json";

#[derive(Debug, Serialize)]
pub struct QuantReport {
    pub scheme: String,
    pub quantization: QuantSummary,
    /// The text the figures are measured on.
    pub text: String,
    /// Always true here: the text is the calibration text.
    pub in_sample: bool,
    pub evaluation: EvalReport,
}

/// Scores `graph` (every position's logits, over `model`'s quantized
/// weights) against the float model read again from `model_dir`.
pub fn measure(
    model_dir: &Path,
    model: &HfModel,
    graph: Graph,
    options: &QuantOptions,
    summary: &QuantSummary,
    mut progress: impl FnMut(&str),
) -> Result<QuantReport, LowerError> {
    let calibration = options
        .calibration
        .as_ref()
        .expect("a report graph is built only with calibration text");
    let text = CalibrationText::read(model, &calibration.text)?;
    let mut tokens = text.tokens;
    tokens.truncate(MAX_CALIBRATION_TOKENS);
    let ctx = graph
        .ty(graph
            .input(GraphNames::INPUT_IDS)
            .map_err(crate::eval::EvalError::from)?)
        .shape[1];
    let mut float = HfModel::open(model_dir)?;
    let reference_graph = eval_graph(&mut float, ctx)?;
    let reference = EvalModel::new(reference_graph, &float.weights)?;
    let candidate = EvalModel::new(graph, &model.weights)?;
    let evaluation = evaluate(
        &candidate,
        &tokens,
        &EvalOptions::new(ctx, None)?,
        Some(&reference),
        |Progress { window, windows }| {
            progress(&format!(
                "measuring the quantized model on the calibration text: window {window} of {windows}"
            ))
        },
    )?;
    Ok(QuantReport {
        scheme: options.scheme.name(),
        quantization: summary.clone(),
        text: calibration.text.display().to_string(),
        in_sample: true,
        evaluation,
    })
}
