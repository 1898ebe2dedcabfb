//! Kiln's compiler: the Hugging Face frontend, the IR passes and the
//! backends (ONNX, ATC). The `kiln` binary in `main.rs` is a thin layer over this.

pub mod backend;
pub mod compile;
pub mod frontend;
pub mod passes;

use frontend::{FrontendError, GraphOptions, HfModel};
use kiln_runtime::ir::ModelIr;
use std::path::Path;

/// Opens a model directory and lowers it to optimized IR. `options` of
/// `None` picks the defaults for the model.
pub fn lower(
    dir: &Path,
    options: Option<GraphOptions>,
) -> Result<(HfModel, ModelIr), FrontendError> {
    let mut model = HfModel::open(dir)?;
    let options = options.unwrap_or_else(|| GraphOptions::defaults_for(&model.config));
    let mut ir = model.build_ir(&options)?;
    passes::optimize(&mut ir)?;
    Ok((model, ir))
}
