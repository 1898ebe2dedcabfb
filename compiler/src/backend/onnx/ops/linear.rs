//! `Linear` → `Gemm(transB=1)` on the flattened rows: the weight stays in
//! Hugging Face's `[out, in]` layout (no transposed copy, and a tied
//! embedding serves both `Gather` and the LM head). A bias is a separate
//! `Add`: ATC's Gemm does not support the `C` input.

use super::{Cx, NodeIo};
use crate::backend::onnx::builder::Attr;

pub fn lower(cx: &mut Cx, io: &NodeIo) {
    let x_shape = &io.types[0].shape;
    let k = *x_shape.last().expect("Linear input has rank ≥ 1");
    let rows: usize = x_shape[..x_shape.len() - 1].iter().product();
    let rows_shape = cx.b.const_i64(
        &format!("{}/rows_shape", io.name),
        &[2],
        &[rows as i64, k as i64],
    );
    let x2 =
        cx.b.temp("Reshape", &[io.inputs[0], &rows_shape], io.name, vec![]);
    let mut y2 = cx.b.temp(
        "Gemm",
        &[&x2, io.inputs[1]],
        io.name,
        vec![("transB", Attr::Int(1))],
    );
    if let Some(bias) = io.inputs.get(2) {
        y2 = cx.b.temp("Add", &[&y2, bias], io.name, vec![]);
    }
    let out_shape: Vec<i64> = io.output_type.shape.iter().map(|&d| d as i64).collect();
    let shape = cx.b.const_i64(
        &format!("{}/out_shape", io.name),
        &[out_shape.len()],
        &out_shape,
    );
    cx.b.node("Reshape", &[&y2, &shape], io.output, vec![]);
}
