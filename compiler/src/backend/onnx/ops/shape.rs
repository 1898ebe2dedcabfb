//! Shape ops. A one-element `Slice` (one layer of the KV cache) becomes a
//! `Gather` with a constant index: one cheap op per layer instead of a
//! StridedSlice.

use super::{Cx, NodeIo};
use crate::backend::onnx::builder::Attr;

pub fn reshape(cx: &mut Cx, io: &NodeIo, shape: &[usize]) {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let s =
        cx.b.const_i64(&format!("{}/shape", io.name), &[dims.len()], &dims);
    cx.b.node("Reshape", &[io.inputs[0], &s], io.output, vec![]);
}

pub fn transpose(cx: &mut Cx, io: &NodeIo, perm: &[usize]) {
    let perm = perm.iter().map(|&p| p as i64).collect();
    cx.b.node(
        "Transpose",
        &io.inputs,
        io.output,
        vec![("perm", Attr::Ints(perm))],
    );
}

pub fn concat(cx: &mut Cx, io: &NodeIo, axis: usize) {
    cx.b.node(
        "Concat",
        &io.inputs,
        io.output,
        vec![("axis", Attr::Int(axis as i64))],
    );
}

pub fn slice(cx: &mut Cx, io: &NodeIo, axis: usize, start: usize, end: usize) {
    if end - start == 1 {
        let index =
            cx.b.const_i64(&format!("{}/index", io.name), &[1], &[start as i64]);
        cx.b.node(
            "Gather",
            &[io.inputs[0], &index],
            io.output,
            vec![("axis", Attr::Int(axis as i64))],
        );
        return;
    }
    let starts =
        cx.b.const_i64(&format!("{}/starts", io.name), &[1], &[start as i64]);
    let ends =
        cx.b.const_i64(&format!("{}/ends", io.name), &[1], &[end as i64]);
    let axes =
        cx.b.const_i64(&format!("{}/axes", io.name), &[1], &[axis as i64]);
    cx.b.node(
        "Slice",
        &[io.inputs[0], &starts, &ends, &axes],
        io.output,
        vec![],
    );
}
