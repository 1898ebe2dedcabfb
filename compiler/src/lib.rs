//! Kiln's compiler: the Hugging Face frontend, the IR passes and the
//! backends (ONNX, ATC), and text evaluation (`eval`). The `kiln` binary in
//! `main.rs` is a thin layer over this.

pub mod backend;
pub mod bundle;
pub mod calibrate;
pub mod compile;
pub mod eval;
pub mod frontend;
pub mod import;
pub mod output;
pub mod passes;
pub mod plan;
pub mod quant_report;

use frontend::{FrontendError, GraphOptions, HfModel, ShapeRequest};
use kiln_runtime::ir::{Graph, ModelIr};
use passes::quantize::{QuantError, QuantOptions, QuantSummary};
use std::path::Path;

/// What becomes of the weights' precision.
#[derive(Clone, Debug, Default)]
pub enum QuantMode {
    /// As stored: a GGUF's Q8_0/Q4_0/Q4_1 blocks stay quantized, float
    /// checkpoints stay float.
    #[default]
    Keep,
    /// Everything in float (a GGUF's blocks are dequantized).
    None,
    /// Linear weights quantized by Kiln (from float; a GGUF is dequantized first).
    Quantize(QuantOptions),
}

#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Calibration(#[from] calibrate::CalibError),
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
}

/// A model lowered to optimized IR.
pub struct Lowered {
    pub model: HfModel,
    pub ir: ModelIr,
    /// What quantization did, when Kiln quantized.
    pub quant: Option<QuantSummary>,
    /// With calibration text: a graph that scores windows of text (every
    /// position's logits) over the quantized weights, for `quant_report.json`.
    pub report_graph: Option<kiln_runtime::ir::Graph>,
}

/// Opens a model directory or GGUF file and lowers it to optimized IR, with
/// the static sizes `shape` asks for (the model's defaults for the rest)
/// and the weights as stored (see [`QuantMode::Keep`]).
pub fn lower(dir: &Path, shape: &ShapeRequest) -> Result<(HfModel, ModelIr), LowerError> {
    let lowered = lower_with(dir, shape, &QuantMode::Keep, |_| {})?;
    Ok((lowered.model, lowered.ir))
}

/// [`lower`], with the weights' precision as `quant` says; `progress`
/// hears of long steps (calibration).
pub fn lower_with(
    dir: &Path,
    shape: &ShapeRequest,
    quant: &QuantMode,
    progress: impl FnMut(&str),
) -> Result<Lowered, LowerError> {
    if let QuantMode::Quantize(options) = quant {
        // Bad options fail before a large model is read.
        options.check()?;
    }
    let keep_blocks = matches!(quant, QuantMode::Keep);
    let mut model = HfModel::open_keeping_blocks(dir, keep_blocks)?;
    let options = GraphOptions::resolve(&model.config, shape);
    let mut ir = model.build_ir(&options)?;
    passes::optimize(&mut ir).map_err(FrontendError::from)?;
    let mut report_graph = match quant {
        QuantMode::Quantize(QuantOptions {
            calibration: Some(_),
            ..
        }) => {
            let ctx = calibrate::calibration_ctx(&model);
            Some(eval::eval_graph(&mut model, ctx)?)
        }
        _ => None,
    };
    let summary = match quant {
        QuantMode::Quantize(options) => {
            let mut graphs: Vec<&mut Graph> = ir.graphs.iter_mut().collect();
            graphs.extend(report_graph.as_mut());
            Some(quantize(&mut model, &mut graphs, options, progress)?)
        }
        _ => None,
    };
    Ok(Lowered {
        model,
        ir,
        quant: summary,
        report_graph,
    })
}

/// Quantizes the Linears of `graphs` (built from `model`), first adjusting
/// the float weights from calibration text when `options` asks.
pub fn quantize(
    model: &mut HfModel,
    graphs: &mut [&mut kiln_runtime::ir::Graph],
    options: &QuantOptions,
    progress: impl FnMut(&str),
) -> Result<QuantSummary, LowerError> {
    options.check()?;
    let calibration = match &options.calibration {
        Some(c) => Some(calibrate::adjust_weights(model, options, c, progress)?),
        None => None,
    };
    for graph in graphs.iter_mut() {
        passes::smooth::sync_weight_types(graph, &model.weights).map_err(QuantError::from)?;
    }
    let mut summary = passes::quantize::quantize_graphs(graphs, &mut model.weights, options)?;
    summary.calibration = calibration;
    Ok(summary)
}
