//! `QuantLinear` and `QuantGather` in standard ONNX ops, for ONNX Runtime:
//! the form that lets a system Kiln did not write check the quantized
//! numbers (`*.ort.onnx`). ATC gets other graphs (see `compile.rs`).
//!
//! - Weights stay quantized in the file: `q` as an INT8 initializer, or
//!   UINT8 `[N, K / 2]` for u4 (two per byte, low nibble first), unpacked in
//!   the graph with integer Div/Sub and interleaved with Concat + Reshape.
//! - `w = q·scale + min`: each group's scale and min are widened to `[N, K]`
//!   by a `Gather` along K with a constant group index, then `Mul` and
//!   `Add`. With f16 scales the product is exact in f32, so the one rounding
//!   is the `Add`'s, as in Kiln's `fma`: the same weights, bit for bit.
//! - int8 activations (`w8a8`): `s_x = ReduceMax(|x|) / 127`, `x_q =
//!   Cast<int8>(Clip(Round(x / s_x), -128, 127))`, `MatMulInteger` with the
//!   transposed int8 weight, then `· scale · s_x` in f32.

use super::{linear, Cx, NodeIo};
use crate::backend::onnx::builder::{Attr, FloatType};
use kiln_runtime::ir::ops::{QuantGather, QuantLinear};
use kiln_runtime::ir::quant::{ActivationQuant, WeightQuant};
use kiln_runtime::ir::{DType, TensorType};
use onnx_protobuf::tensor_proto::DataType;

/// `W [n, k]` in the graph's float type, from `q`, `scale` and `min`.
fn dequantized(
    cx: &mut Cx,
    base: &str,
    scheme: WeightQuant,
    q: (&str, &TensorType),
    scale: &str,
    min: Option<&str>,
) -> String {
    let (n, k) = (q.1.shape[0], q.1.shape[1]);
    let float = cx.float.data_type() as i64;
    let to = |t: DataType| vec![("to", Attr::Int(t as i64))];
    let qf = match q.1.dtype {
        DType::U4 => {
            let wide = cx.b.temp("Cast", &[q.0], base, to(DataType::INT64));
            let sixteen = cx.b.const_i64(&format!("{base}/16"), &[], &[16]);
            let high = cx.b.temp("Div", &[&wide, &sixteen], base, vec![]);
            let high16 = cx.b.temp("Mul", &[&high, &sixteen], base, vec![]);
            let low = cx.b.temp("Sub", &[&wide, &high16], base, vec![]);
            let axis = cx.b.const_i64(&format!("{base}/pair_axis"), &[1], &[2]);
            let low = cx.b.temp("Unsqueeze", &[&low, &axis], base, vec![]);
            let high = cx.b.temp("Unsqueeze", &[&high, &axis], base, vec![]);
            let pairs =
                cx.b.temp("Concat", &[&low, &high], base, vec![("axis", Attr::Int(2))]);
            let shape =
                cx.b.const_i64(&format!("{base}/qshape"), &[2], &[n as i64, k as i64]);
            let full = cx.b.temp("Reshape", &[&pairs, &shape], base, vec![]);
            cx.b.temp("Cast", &[&full], base, vec![("to", Attr::Int(float))])
        }
        _ => {
            cx.b.temp("Cast", &[q.0], base, vec![("to", Attr::Int(float))])
        }
    };
    let groups: Vec<i64> = (0..k).map(|kk| (kk / scheme.group_size) as i64).collect();
    let index = cx.b.const_i64(&format!("{base}/group_of_k"), &[k], &groups);
    let gather = |cx: &mut Cx, t: &str| {
        cx.b.temp("Gather", &[t, &index], base, vec![("axis", Attr::Int(1))])
    };
    let scale_full = gather(cx, scale);
    match min {
        Some(min) => {
            let min_full = gather(cx, min);
            let product = cx.b.temp("Mul", &[&qf, &scale_full], base, vec![]);
            cx.b.temp("Add", &[&product, &min_full], base, vec![])
        }
        // 4-bit without a min is centred on 8: w = (q − 8)·scale, exact.
        None if scheme.bits == 4 => {
            let eight =
                cx.b.const_float(&format!("{base}/8"), cx.float.data_type(), &[], &[8.0]);
            let centred = cx.b.temp("Sub", &[&qf, &eight], base, vec![]);
            cx.b.temp("Mul", &[&centred, &scale_full], base, vec![])
        }
        None => cx.b.temp("Mul", &[&qf, &scale_full], base, vec![]),
    }
}

pub fn gather(cx: &mut Cx, io: &NodeIo, op: &QuantGather) {
    let min = op.weights.offset.then(|| io.inputs[2]);
    let table = dequantized(
        cx,
        io.name,
        op.weights,
        (io.inputs[0], io.types[0]),
        io.inputs[1],
        min,
    );
    let ids = io.inputs[io.inputs.len() - 1];
    cx.b.node(
        "Gather",
        &[&table, ids],
        io.output,
        vec![("axis", Attr::Int(0))],
    );
}

pub fn linear(cx: &mut Cx, io: &NodeIo, op: &QuantLinear) {
    let at = op.slots();
    let mut x = io.inputs[at.x].to_string();
    if let Some(s) = at.input_scale {
        x = cx.b.temp("Mul", &[&x, io.inputs[s]], io.name, vec![]);
    }
    let bias = at.bias.map(|b| io.inputs[b]);
    match op.activations {
        ActivationQuant::None => {
            let w = dequantized(
                cx,
                io.name,
                op.weights,
                (io.inputs[at.q], io.types[at.q]),
                io.inputs[at.scale],
                at.min.map(|m| io.inputs[m]),
            );
            let mut inputs = vec![x.as_str(), w.as_str()];
            inputs.extend(bias);
            let plain = NodeIo {
                name: io.name,
                inputs,
                types: vec![io.types[at.x]],
                output: io.output,
                output_type: io.output_type,
            };
            linear::lower(cx, &plain);
        }
        ActivationQuant::DynamicInt8PerToken => int8_linear(cx, io, op, &x, bias),
    }
}

/// The `w8a8` product; the quantization of `x` and the scaling run in f32
/// whatever the graph's float type (an int32 sum overflows fp16).
fn int8_linear(cx: &mut Cx, io: &NodeIo, op: &QuantLinear, x: &str, bias: Option<&str>) {
    let at = op.slots();
    let base = io.name;
    let x_shape = &io.types[at.x].shape;
    let k = *x_shape.last().expect("rank ≥ 1");
    let rows: usize = x_shape[..x_shape.len() - 1].iter().product();
    let n = io.types[at.q].shape[0];
    let f32_attr = || vec![("to", Attr::Int(DataType::FLOAT as i64))];
    let rows_shape = cx.b.const_i64(
        &format!("{base}/rows_shape"),
        &[2],
        &[rows as i64, k as i64],
    );
    let mut x2 = cx.b.temp("Reshape", &[x, &rows_shape], base, vec![]);
    if cx.float == FloatType::F16 {
        x2 = cx.b.temp("Cast", &[&x2], base, f32_attr());
    }
    let abs = cx.b.temp("Abs", &[&x2], base, vec![]);
    let amax = if cx.opset >= 18 {
        let axes = cx.b.const_i64(&format!("{base}/axes"), &[1], &[-1]);
        cx.b.temp(
            "ReduceMax",
            &[&abs, &axes],
            base,
            vec![("keepdims", Attr::Int(1))],
        )
    } else {
        cx.b.temp(
            "ReduceMax",
            &[&abs],
            base,
            vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
        )
    };
    let c127 =
        cx.b.const_float(&format!("{base}/127"), DataType::FLOAT, &[], &[127.0]);
    let sx = cx.b.temp("Div", &[&amax, &c127], base, vec![]);
    // A row of zeros: any positive divisor gives x_q = 0, as the IR defines it.
    let tiny =
        cx.b.const_float(&format!("{base}/tiny"), DataType::FLOAT, &[], &[1e-30]);
    let divisor = cx.b.temp("Max", &[&sx, &tiny], base, vec![]);
    let scaled = cx.b.temp("Div", &[&x2, &divisor], base, vec![]);
    let rounded = cx.b.temp("Round", &[&scaled], base, vec![]);
    let lo =
        cx.b.const_float(&format!("{base}/lo"), DataType::FLOAT, &[], &[-128.0]);
    let hi =
        cx.b.const_float(&format!("{base}/hi"), DataType::FLOAT, &[], &[127.0]);
    let clipped = cx.b.temp("Clip", &[&rounded, &lo, &hi], base, vec![]);
    let xq = cx.b.temp(
        "Cast",
        &[&clipped],
        base,
        vec![("to", Attr::Int(DataType::INT8 as i64))],
    );
    let wt = cx.b.temp(
        "Transpose",
        &[io.inputs[at.q]],
        base,
        vec![("perm", Attr::Ints(vec![1, 0]))],
    );
    let acc = cx.b.temp("MatMulInteger", &[&xq, &wt], base, vec![]);
    let acc = cx.b.temp("Cast", &[&acc], base, f32_attr());
    let n_shape =
        cx.b.const_i64(&format!("{base}/n_shape"), &[1], &[n as i64]);
    let mut scale =
        cx.b.temp("Reshape", &[io.inputs[at.scale], &n_shape], base, vec![]);
    if cx.float == FloatType::F16 {
        scale = cx.b.temp("Cast", &[&scale], base, f32_attr());
    }
    let y = cx.b.temp("Mul", &[&acc, &scale], base, vec![]);
    let mut y = cx.b.temp("Mul", &[&y, &sx], base, vec![]);
    if cx.float == FloatType::F16 {
        y = cx.b.temp(
            "Cast",
            &[&y],
            base,
            vec![("to", Attr::Int(cx.float.data_type() as i64))],
        );
    }
    if let Some(bias) = bias {
        y = cx.b.temp("Add", &[&y, bias], base, vec![]);
    }
    let out_shape: Vec<i64> = io.output_type.shape.iter().map(|&d| d as i64).collect();
    let shape =
        cx.b.const_i64(&format!("{base}/out_shape"), &[out_shape.len()], &out_shape);
    cx.b.node("Reshape", &[&y, &shape], io.output, vec![]);
}
