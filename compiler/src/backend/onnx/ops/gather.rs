//! `Gather` → ONNX `Gather` on axis 0 (embedding rows, RoPE table rows).

use super::{Cx, NodeIo};
use crate::backend::onnx::builder::Attr;

pub fn lower(cx: &mut Cx, io: &NodeIo) {
    cx.b.node(
        "Gather",
        &io.inputs,
        io.output,
        vec![("axis", Attr::Int(0))],
    );
}
