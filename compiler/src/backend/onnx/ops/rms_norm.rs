//! `RmsNorm` → `x / Sqrt(ReduceMean(x·x) + eps) · w`. In an fp16 model the
//! square and the reduction run in f32 (a Cast around them): squares of
//! activations overflow fp16 easily, which is what breaks RMSNorm on NPUs.

use super::{Cx, NodeIo};
use crate::backend::onnx::builder::{Attr, FloatType};
use onnx_protobuf::tensor_proto::DataType;

pub fn lower(cx: &mut Cx, io: &NodeIo, eps: f32) {
    let (x, w) = (io.inputs[0], io.inputs[1]);
    // An f32 residual stream (`--residual-dtype f32`) is read as it is.
    let x32 = match cx.float {
        FloatType::F32 => x.to_string(),
        FloatType::F16 if cx.wide.contains(x) => x.to_string(),
        FloatType::F16 => cx.b.temp(
            "Cast",
            &[x],
            io.name,
            vec![("to", Attr::Int(DataType::FLOAT as i64))],
        ),
    };
    let square = cx.b.temp("Mul", &[&x32, &x32], io.name, vec![]);
    let mean = if cx.opset >= 17 {
        // ATC documents ReduceMean only up to opset 16: sum, then scale.
        let axes = cx.b.const_i64(&format!("{}/axes", io.name), &[1], &[-1]);
        let sum = cx.b.temp(
            "ReduceSum",
            &[&square, &axes],
            io.name,
            vec![("keepdims", Attr::Int(1))],
        );
        let dim = *io.types[0]
            .shape
            .last()
            .expect("RmsNorm input has rank ≥ 1");
        let inv = cx.b.const_float(
            &format!("{}/inv_dim", io.name),
            DataType::FLOAT,
            &[],
            &[1.0 / dim as f32],
        );
        cx.b.temp("Mul", &[&sum, &inv], io.name, vec![])
    } else {
        cx.b.temp(
            "ReduceMean",
            &[&square],
            io.name,
            vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
        )
    };
    let eps =
        cx.b.const_float(&format!("{}/eps", io.name), DataType::FLOAT, &[], &[eps]);
    let shifted = cx.b.temp("Add", &[&mean, &eps], io.name, vec![]);
    let rms = cx.b.temp("Sqrt", &[&shifted], io.name, vec![]);
    let normed = cx.b.temp("Div", &[&x32, &rms], io.name, vec![]);
    let normed = match cx.float {
        FloatType::F32 => normed,
        FloatType::F16 => cx.b.temp(
            "Cast",
            &[&normed],
            io.name,
            vec![("to", Attr::Int(DataType::FLOAT16 as i64))],
        ),
    };
    cx.b.node("Mul", &[&normed, w], io.output, vec![]);
}
