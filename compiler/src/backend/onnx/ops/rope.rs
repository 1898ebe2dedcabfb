//! `Rope` → `x·cos + (x·R)·sin`, where `R` is the constant `[D, D]` matrix
//! of `rotate_half` (`[a, b] ↦ [-b, a]`). One small MatMul replaces the
//! Slice/Neg/Concat chain, which ATC turns into slow StridedSlices; every
//! product with R has one ±1 term, so it is exact in any precision.

use super::{Cx, NodeIo};

pub fn lower(cx: &mut Cx, io: &NodeIo) {
    let (x, cos, sin) = (io.inputs[0], io.inputs[1], io.inputs[2]);
    let [batch, _heads, tokens, dim] = io.types[0].shape[..] else {
        unreachable!("Rope input is rank 4 (checked by the IR)")
    };
    let half = dim / 2;
    let mut rotate = vec![0f32; dim * dim];
    for i in 0..half {
        rotate[(i + half) * dim + i] = -1.0; // out[i] = -x[i + half]
        rotate[i * dim + i + half] = 1.0; // out[i + half] = x[i]
    }
    let r = cx.b.const_float(
        &format!("{}/rotate_half", io.name),
        cx.float.data_type(),
        &[dim, dim],
        &rotate,
    );
    let table_shape = cx.b.const_i64(
        &format!("{}/table_shape", io.name),
        &[4],
        &[batch as i64, 1, tokens as i64, dim as i64],
    );
    let cos4 = cx.b.temp("Reshape", &[cos, &table_shape], io.name, vec![]);
    let sin4 = cx.b.temp("Reshape", &[sin, &table_shape], io.name, vec![]);
    let rotated = cx.b.temp("MatMul", &[x, &r], io.name, vec![]);
    let a = cx.b.temp("Mul", &[x, &cos4], io.name, vec![]);
    let b = cx.b.temp("Mul", &[&rotated, &sin4], io.name, vec![]);
    cx.b.node("Add", &[&a, &b], io.output, vec![]);
}
