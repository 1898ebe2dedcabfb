//! Elementwise ops: `Add`, `Mul` as themselves; `Silu` as `x · Sigmoid(x)`;
//! `SwiGlu` as `gate · Sigmoid(gate) · up`; `GeluTanh` and `Scale` below.

use super::{Cx, NodeIo};

pub fn binary(cx: &mut Cx, io: &NodeIo, op_type: &str) {
    cx.b.node(op_type, &io.inputs, io.output, vec![]);
}

pub fn silu(cx: &mut Cx, io: &NodeIo) {
    let x = io.inputs[0];
    let s = cx.b.temp("Sigmoid", &[x], io.name, vec![]);
    cx.b.node("Mul", &[x, &s], io.output, vec![]);
}

pub fn swiglu(cx: &mut Cx, io: &NodeIo) {
    let (gate, up) = (io.inputs[0], io.inputs[1]);
    let s = cx.b.temp("Sigmoid", &[gate], io.name, vec![]);
    let act = cx.b.temp("Mul", &[gate, &s], io.name, vec![]);
    cx.b.node("Mul", &[&act, up], io.output, vec![]);
}

/// `GeluTanh` as `x · Sigmoid(2√(2/π) · (x + 0.044715 · x³))`: the tanh
/// form is `0.5 · x · (1 + tanh(u))`, and `0.5 · (1 + tanh(u)) =
/// sigmoid(2u)` exactly, so no Tanh (which ATC's list lacks) is needed.
pub fn gelu_tanh(cx: &mut Cx, io: &NodeIo) {
    use kiln_runtime::ir::ops::gelu_tanh::{CUBIC, SQRT_2_OVER_PI};
    let x = io.inputs[0];
    let dt = cx.float.data_type();
    let cubic =
        cx.b.const_float(&format!("{}/cubic", io.name), dt, &[], &[CUBIC]);
    let slope = cx.b.const_float(
        &format!("{}/slope", io.name),
        dt,
        &[],
        &[2.0 * SQRT_2_OVER_PI],
    );
    let x2 = cx.b.temp("Mul", &[x, x], io.name, vec![]);
    let x3 = cx.b.temp("Mul", &[&x2, x], io.name, vec![]);
    let term = cx.b.temp("Mul", &[&x3, &cubic], io.name, vec![]);
    let inner = cx.b.temp("Add", &[x, &term], io.name, vec![]);
    let u = cx.b.temp("Mul", &[&inner, &slope], io.name, vec![]);
    let s = cx.b.temp("Sigmoid", &[&u], io.name, vec![]);
    cx.b.node("Mul", &[x, &s], io.output, vec![]);
}

/// `Scale` as `Mul` by a scalar in the graph's float type (so an fp16 graph
/// rounds the factor to fp16, as transformers does in half precision).
pub fn scale(cx: &mut Cx, io: &NodeIo, factor: f32) {
    let dt = cx.float.data_type();
    let f =
        cx.b.const_float(&format!("{}/factor", io.name), dt, &[], &[factor]);
    cx.b.node("Mul", &[io.inputs[0], &f], io.output, vec![]);
}

/// `cap · tanh(x / cap)` as `cap · (2 · Sigmoid(2x / cap) − 1)`
/// (`tanh(u) = 2 · sigmoid(2u) − 1`; ATC's list has no Tanh), written to
/// `output` or to a fresh value. Returns the result's name.
pub fn soft_cap_of(cx: &mut Cx, x: &str, base: &str, cap: f32, output: Option<&str>) -> String {
    let dt = cx.float.data_type();
    let into =
        cx.b.const_float(&format!("{base}/cap_in"), dt, &[], &[2.0 / cap]);
    let out =
        cx.b.const_float(&format!("{base}/cap_out"), dt, &[], &[2.0 * cap]);
    let shift =
        cx.b.const_float(&format!("{base}/cap_shift"), dt, &[], &[cap]);
    let u = cx.b.temp("Mul", &[x, &into], base, vec![]);
    let s = cx.b.temp("Sigmoid", &[&u], base, vec![]);
    let y = cx.b.temp("Mul", &[&s, &out], base, vec![]);
    match output {
        Some(out) => {
            cx.b.node("Sub", &[&y, &shift], out, vec![]);
            out.to_string()
        }
        None => cx.b.temp("Sub", &[&y, &shift], base, vec![]),
    }
}
