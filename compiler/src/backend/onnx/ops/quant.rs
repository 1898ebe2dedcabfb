//! `QuantLinear` and `QuantGather` in standard ONNX ops, for ONNX Runtime:
//! the form that lets a system Kiln did not write check the quantized
//! numbers (`*.ort.onnx`); and `w8a8` in ATC's own ops, for the graphs ATC
//! converts (see `compile.rs` for what ATC gets otherwise).
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
//! - The same for ATC ([`QuantOps::Ascend`]): `s_x` as above, `x / s_x` →
//!   `Clip` → `AscendQuant(scale = 1, offset = 0)` (ATC's round half to
//!   even) → `MatMul` with an int8 `[K, N]` initializer → `AscendDequant`
//!   with `deq_scale[n]` = the f32 bits of `scale[n]` (exact: f16 values fit
//!   the 19 bits the hardware reads) → `· s_x` in f32. The attributes are
//!   those ATC's ONNX parser reads for these ops (CANN's ops-nn
//!   `ascend_quant`/`ascend_dequant` ONNX plugins). The NPU may convert
//!   `x / s_x` to fp16 before rounding, so `x_q` can differ by one step.

use super::{linear, Cx, NodeIo};
use crate::backend::onnx::builder::{Attr, FloatType};
use crate::backend::onnx::{Derived, OnnxError, QuantOps};
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

/// A quantized op that has no form in ATC's own ops.
fn no_ascend_form(io: &NodeIo, what: &str) -> OnnxError {
    OnnxError::NoAscendForm {
        node: io.name.to_string(),
        what: what.to_string(),
    }
}

pub fn gather(cx: &mut Cx, io: &NodeIo, op: &QuantGather) -> Result<(), OnnxError> {
    if cx.quant_ops == QuantOps::Ascend {
        return Err(no_ascend_form(io, "a quantized embedding"));
    }
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
    Ok(())
}

pub fn linear(cx: &mut Cx, io: &NodeIo, op: &QuantLinear) -> Result<(), OnnxError> {
    let at = op.slots();
    let mut x = io.inputs[at.x].to_string();
    if let Some(s) = at.input_scale {
        x = cx.b.temp("Mul", &[&x, io.inputs[s]], io.name, vec![]);
    }
    let bias = at.bias.map(|b| io.inputs[b]);
    match (op.activations, cx.quant_ops) {
        (ActivationQuant::None, QuantOps::Ascend) => {
            return Err(no_ascend_form(io, "a weight-only quantized linear layer"));
        }
        (ActivationQuant::None, QuantOps::Standard) => {
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
        (ActivationQuant::DynamicInt8PerToken, QuantOps::Standard) => {
            int8_linear(cx, io, op, &x, bias)
        }
        (ActivationQuant::DynamicInt8PerToken, QuantOps::Ascend) => {
            ascend_int8_linear(cx, io, op, &x, bias)?
        }
    }
    Ok(())
}

/// The rows of `x` as `[rows, K]` f32, their scales `s_x [rows, 1]` and
/// `x / s_x`, as both forms of the `w8a8` product compute them.
fn token_scales(cx: &mut Cx, io: &NodeIo, op: &QuantLinear, x: &str) -> (String, String) {
    let at = op.slots();
    let base = io.name;
    let x_shape = &io.types[at.x].shape;
    let k = *x_shape.last().expect("rank ≥ 1");
    let rows: usize = x_shape[..x_shape.len() - 1].iter().product();
    let rows_shape = cx.b.const_i64(
        &format!("{base}/rows_shape"),
        &[2],
        &[rows as i64, k as i64],
    );
    let mut x2 = cx.b.temp("Reshape", &[x, &rows_shape], base, vec![]);
    if cx.float == FloatType::F16 {
        x2 = cx.b.temp("Cast", &[&x2], base, to(DataType::FLOAT));
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
    (sx, scaled)
}

fn to(t: DataType) -> Vec<(&'static str, Attr)> {
    vec![("to", Attr::Int(t as i64))]
}

/// `Clip(v, -128, 127)` in f32.
fn clip_int8(cx: &mut Cx, base: &str, v: &str) -> String {
    let lo =
        cx.b.const_float(&format!("{base}/lo"), DataType::FLOAT, &[], &[-128.0]);
    let hi =
        cx.b.const_float(&format!("{base}/hi"), DataType::FLOAT, &[], &[127.0]);
    cx.b.temp("Clip", &[v, &lo, &hi], base, vec![])
}

/// `y · s_x` (f32 `[rows, N]`) in the graph's float type, `+ bias`, in the
/// output's shape.
fn finish(cx: &mut Cx, io: &NodeIo, y: &str, sx: &str, bias: Option<&str>) {
    let base = io.name;
    let mut y = cx.b.temp("Mul", &[y, sx], base, vec![]);
    if cx.float == FloatType::F16 {
        y = cx.b.temp("Cast", &[&y], base, to(cx.float.data_type()));
    }
    if let Some(bias) = bias {
        y = cx.b.temp("Add", &[&y, bias], base, vec![]);
    }
    let out_shape: Vec<i64> = io.output_type.shape.iter().map(|&d| d as i64).collect();
    let shape =
        cx.b.const_i64(&format!("{base}/out_shape"), &[out_shape.len()], &out_shape);
    cx.b.node("Reshape", &[&y, &shape], io.output, vec![]);
}

/// The `w8a8` product in standard ops; the quantization of `x` and the
/// scaling run in f32 whatever the graph's float type (an int32 sum
/// overflows fp16).
fn int8_linear(cx: &mut Cx, io: &NodeIo, op: &QuantLinear, x: &str, bias: Option<&str>) {
    let at = op.slots();
    let base = io.name;
    let n = io.types[at.q].shape[0];
    let (sx, scaled) = token_scales(cx, io, op, x);
    let rounded = cx.b.temp("Round", &[&scaled], base, vec![]);
    let clipped = clip_int8(cx, base, &rounded);
    let xq = cx.b.temp("Cast", &[&clipped], base, to(DataType::INT8));
    let wt = cx.b.temp(
        "Transpose",
        &[io.inputs[at.q]],
        base,
        vec![("perm", Attr::Ints(vec![1, 0]))],
    );
    let acc = cx.b.temp("MatMulInteger", &[&xq, &wt], base, vec![]);
    let acc = cx.b.temp("Cast", &[&acc], base, to(DataType::FLOAT));
    let n_shape =
        cx.b.const_i64(&format!("{base}/n_shape"), &[1], &[n as i64]);
    let mut scale =
        cx.b.temp("Reshape", &[io.inputs[at.scale], &n_shape], base, vec![]);
    if cx.float == FloatType::F16 {
        scale = cx.b.temp("Cast", &[&scale], base, to(DataType::FLOAT));
    }
    let y = cx.b.temp("Mul", &[&acc, &scale], base, vec![]);
    finish(cx, io, &y, &sx, bias);
}

/// The `w8a8` product in ATC's ops (see the module's notes). Clipping
/// before AscendQuant's rounding equals clipping after it (the bounds are
/// integers), so both forms quantize `x` alike.
fn ascend_int8_linear(
    cx: &mut Cx,
    io: &NodeIo,
    op: &QuantLinear,
    x: &str,
    bias: Option<&str>,
) -> Result<(), OnnxError> {
    let at = op.slots();
    let base = io.name;
    let tensor = |cx: &Cx, slot: usize| {
        cx.weight_tensors
            .get(io.inputs[slot])
            .cloned()
            .ok_or_else(|| {
                no_ascend_form(io, "a linear layer whose int8 weights are not constants")
            })
    };
    let (q, scale) = (tensor(cx, at.q)?, tensor(cx, at.scale)?);
    let (sx, scaled) = token_scales(cx, io, op, x);
    let clipped = clip_int8(cx, base, &scaled);
    let xq = cx.b.temp(
        "AscendQuant",
        &[&clipped],
        base,
        vec![
            ("scale", Attr::Float(1.0)),
            ("offset", Attr::Float(0.0)),
            ("sqrt_mode", Attr::Int(0)),
            ("round_mode", Attr::Str("Round")),
            ("dst_type", Attr::Str("INT8")),
        ],
    );
    let wt = format!("{q}.transposed");
    cx.derived
        .insert(wt.clone(), Derived::TransposedI8 { source: q });
    let deq = format!("{scale}.deq_scale");
    cx.derived.insert(deq.clone(), Derived::DeqScale { scale });
    let acc = cx.b.temp("MatMul", &[&xq, &wt], base, vec![]);
    let y = cx.b.temp(
        "AscendDequant",
        &[&acc, &deq],
        base,
        vec![
            ("dtype", Attr::Int(0)),
            ("sqrt_mode", Attr::Int(0)),
            ("relu_flag", Attr::Int(0)),
        ],
    );
    finish(cx, io, &y, &sx, bias);
    Ok(())
}
