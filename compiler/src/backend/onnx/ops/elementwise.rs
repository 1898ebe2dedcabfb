//! Elementwise ops: `Add`, `Mul` as themselves; `Silu` as `x · Sigmoid(x)`;
//! `SwiGlu` as `gate · Sigmoid(gate) · up`.

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
