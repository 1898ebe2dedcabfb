//! One lowering per IR op: how it is spelled in standard ONNX ops that ATC
//! accepts and that run well on the 310B.

mod attention;
mod elementwise;
mod gather;
pub mod kernels;
mod linear;
mod quant;
mod residual;
mod rms_norm;
mod rope;
mod shape;

use super::builder::{FloatType, GraphBuilder};
use super::{Derived, OnnxError, QuantOps};
use kiln_runtime::ir::{Graph, Node, Op, TensorType};
use std::collections::{BTreeMap, HashMap, HashSet};

/// What a lowering needs: the graph under construction and the target.
pub struct Cx {
    pub b: GraphBuilder,
    pub float: FloatType,
    pub opset: i64,
    pub quant_ops: QuantOps,
    /// The store tensor of each weight value, by value name.
    pub weight_tensors: HashMap<String, String>,
    /// Initializers the lowerings asked for that the store does not hold.
    pub derived: BTreeMap<String, Derived>,
    /// Keep the residual stream in f32 in an fp16 graph (see `residual.rs`).
    pub residual_f32: bool,
    /// The values held in f32 although the graph's float type is fp16: the
    /// residual stream with `residual_f32`.
    pub wide: HashSet<String>,
}

/// One IR node's inputs and output, by ONNX value name, with their IR types.
pub struct NodeIo<'a> {
    pub name: &'a str,
    pub inputs: Vec<&'a str>,
    pub types: Vec<&'a TensorType>,
    pub output: &'a str,
    pub output_type: &'a TensorType,
}

pub fn lower_node(cx: &mut Cx, graph: &Graph, node: &Node) -> Result<(), OnnxError> {
    if cx.residual_f32 {
        return residual::lower_node(cx, graph, node);
    }
    let io = node_io(graph, node);
    lower_io(cx, node, &io)
}

/// A node's inputs and output by their own names.
fn node_io<'a>(graph: &'a Graph, node: &'a Node) -> NodeIo<'a> {
    NodeIo {
        name: &node.name,
        inputs: node
            .inputs
            .iter()
            .map(|&id| graph.value(id).name.as_str())
            .collect(),
        types: node.inputs.iter().map(|&id| graph.ty(id)).collect(),
        output: &graph.value(node.output).name,
        output_type: graph.ty(node.output),
    }
}

/// Lowers `node` with the values `io` names.
fn lower_io(cx: &mut Cx, node: &Node, io: &NodeIo) -> Result<(), OnnxError> {
    match &node.op {
        Op::Gather(_) => gather::lower(cx, io),
        Op::Linear(_) => linear::lower(cx, io),
        Op::Add(_) => elementwise::binary(cx, io, "Add"),
        Op::Mul(_) => elementwise::binary(cx, io, "Mul"),
        Op::Silu(_) => elementwise::silu(cx, io),
        Op::SwiGlu(_) => elementwise::swiglu(cx, io),
        Op::GeluTanh(_) => elementwise::gelu_tanh(cx, io),
        Op::Scale(op) => elementwise::scale(cx, io, op.factor),
        Op::SoftCap(op) => {
            elementwise::soft_cap_of(cx, io.inputs[0], io.name, op.cap, Some(io.output));
        }
        Op::RmsNorm(op) => rms_norm::lower(cx, io, op.eps),
        Op::Rope(_) => rope::lower(cx, io),
        Op::Attention(op) => attention::lower(cx, io, op.scale, op.softcap),
        Op::Reshape(op) => shape::reshape(cx, io, &op.shape),
        Op::Transpose(op) => shape::transpose(cx, io, &op.perm),
        Op::Concat(op) => shape::concat(cx, io, op.axis),
        Op::Slice(op) => shape::slice(cx, io, op.axis, op.start, op.end),
        Op::QuantLinear(op) => quant::linear(cx, io, op)?,
        Op::QuantGather(op) => quant::gather(cx, io, op)?,
    }
    Ok(())
}
