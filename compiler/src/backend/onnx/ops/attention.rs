//! `Attention` → MatMul + mask Add + Softmax + MatMul, without touching the
//! cache's layout:
//! - grouped-query attention by broadcasting: q is viewed as
//!   `[1, G, H/G, T, D]` and each KV head as `[1, G, 1, ·, D]`, so MatMul's
//!   batch broadcasting shares it (no Expand, no repeated KV heads);
//! - the scores against the cache and against the new tokens are computed
//!   apart and concatenated (`[.., L + T]` columns, small), never the cache
//!   itself; the probabilities are split the same way for the values;
//! - the softmax runs in f32 in an fp16 model.

use super::{Cx, NodeIo};
use crate::backend::onnx::builder::{Attr, FloatType};
use onnx_protobuf::tensor_proto::DataType;

pub fn lower(cx: &mut Cx, io: &NodeIo, scale: f32, softcap: Option<f32>) {
    let [q, k, v, k_cache, v_cache, mask] = io.inputs[..] else {
        unreachable!("Attention has 6 inputs (checked by the IR)")
    };
    let [_, heads, tokens, dim] = io.types[0].shape[..] else {
        unreachable!()
    };
    let groups = io.types[1].shape[1];
    let cache_len = io.types[3].shape[2];
    let (h, g, r, t, d, l) = (
        heads as i64,
        groups as i64,
        (heads / groups) as i64,
        tokens as i64,
        dim as i64,
        cache_len as i64,
    );
    let name = io.name;
    let mut shape = |cx: &mut Cx, dims: &[i64]| {
        cx.b.const_i64(&format!("{name}/shape"), &[dims.len()], dims)
    };

    let scale = cx.b.const_float(
        &format!("{name}/scale"),
        cx.float.data_type(),
        &[],
        &[scale],
    );
    let q = cx.b.temp("Mul", &[q, &scale], name, vec![]);
    let q5_shape = shape(cx, &[1, g, r, t, d]);
    let q5 = cx.b.temp("Reshape", &[&q, &q5_shape], name, vec![]);

    // Keys as [1, G, 1, D, ·] for q5 · kᵀ.
    let keys_t =
        |cx: &mut Cx, keys: &str, len: i64, shape: &mut dyn FnMut(&mut Cx, &[i64]) -> String| {
            let kt = cx.b.temp(
                "Transpose",
                &[keys],
                name,
                vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))],
            );
            let s = shape(cx, &[1, g, 1, d, len]);
            cx.b.temp("Reshape", &[&kt, &s], name, vec![])
        };
    let kc_t = keys_t(cx, k_cache, l, &mut shape);
    let k_t = keys_t(cx, k, t, &mut shape);
    let scores_cache = cx.b.temp("MatMul", &[&q5, &kc_t], name, vec![]);
    let scores_new = cx.b.temp("MatMul", &[&q5, &k_t], name, vec![]);
    let scores = cx.b.temp(
        "Concat",
        &[&scores_cache, &scores_new],
        name,
        vec![("axis", Attr::Int(4))],
    );
    let scores = match softcap {
        None => scores,
        Some(cap) => super::elementwise::soft_cap_of(cx, &scores, name, cap, None),
    };
    let mask5_shape = shape(cx, &[1, 1, 1, t, l + t]);
    let mask5 = cx.b.temp("Reshape", &[mask, &mask5_shape], name, vec![]);
    let scores = cx.b.temp("Add", &[&scores, &mask5], name, vec![]);
    let probs = match cx.float {
        FloatType::F32 => {
            cx.b.temp("Softmax", &[&scores], name, vec![("axis", Attr::Int(-1))])
        }
        FloatType::F16 => {
            let s32 = cx.b.temp(
                "Cast",
                &[&scores],
                name,
                vec![("to", Attr::Int(DataType::FLOAT as i64))],
            );
            let p32 =
                cx.b.temp("Softmax", &[&s32], name, vec![("axis", Attr::Int(-1))]);
            cx.b.temp(
                "Cast",
                &[&p32],
                name,
                vec![("to", Attr::Int(DataType::FLOAT16 as i64))],
            )
        }
    };
    let part = |cx: &mut Cx, start: i64, end: i64| {
        let starts = cx.b.const_i64(&format!("{name}/starts"), &[1], &[start]);
        let ends = cx.b.const_i64(&format!("{name}/ends"), &[1], &[end]);
        let axes = cx.b.const_i64(&format!("{name}/axes"), &[1], &[4]);
        cx.b.temp("Slice", &[&probs, &starts, &ends, &axes], name, vec![])
    };
    let probs_cache = part(cx, 0, l);
    let probs_new = part(cx, l, l + t);
    let vc5_shape = shape(cx, &[1, g, 1, l, d]);
    let vc5 = cx.b.temp("Reshape", &[v_cache, &vc5_shape], name, vec![]);
    let v5_shape = shape(cx, &[1, g, 1, t, d]);
    let v5 = cx.b.temp("Reshape", &[v, &v5_shape], name, vec![]);
    let out_cache = cx.b.temp("MatMul", &[&probs_cache, &vc5], name, vec![]);
    let out_new = cx.b.temp("MatMul", &[&probs_new, &v5], name, vec![]);
    let out = cx.b.temp("Add", &[&out_cache, &out_new], name, vec![]);
    let out_shape = shape(cx, &[1, h, t, d]);
    cx.b.node("Reshape", &[&out, &out_shape], io.output, vec![]);
}
