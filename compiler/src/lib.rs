//! Kiln's compiler: the Hugging Face frontend, the IR passes and the
//! backends (ONNX, ATC), and text evaluation (`eval`). The `kiln` binary in
//! `main.rs` is a thin layer over this.

pub mod backend;
pub mod compile;
pub mod eval;
pub mod frontend;
pub mod import;
pub mod output;
pub mod passes;

use frontend::{FrontendError, GraphOptions, HfModel, ShapeRequest};
use kiln_runtime::ir::ModelIr;
use std::path::Path;

/// Opens a model directory and lowers it to optimized IR, with the static
/// sizes `shape` asks for (the model's defaults for the rest).
pub fn lower(dir: &Path, shape: &ShapeRequest) -> Result<(HfModel, ModelIr), FrontendError> {
    let mut model = HfModel::open(dir)?;
    let options = GraphOptions::resolve(&model.config, shape);
    let mut ir = model.build_ir(&options)?;
    passes::optimize(&mut ir)?;
    Ok((model, ir))
}
