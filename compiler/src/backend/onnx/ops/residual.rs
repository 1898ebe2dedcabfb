//! `--residual-dtype f32` in an fp16 graph: the residual stream stays in f32
//! around the fp16 blocks. Real models carry outlier activations in a few
//! channels of the residual stream that grow layer after layer; in fp16 they
//! pass 65504 and become inf (then NaN in the next RMSNorm) with no warning,
//! while each block's own output stays in range. On the 310B it is worse
//! than NaN: the Atlas 200I/500 A2 products compute only in saturation mode,
//! where an overflow becomes 65504 and a NaN 0, silently
//! (<https://www.hiascend.com/document/detail/zh/CANNCommunityEdition/910beta3/API/runtimeapi/aclcppdevg_03_1389.html>).
//!
//! - the embedding's output is cast to f32;
//! - a residual `Add` (an `Add` with an f32 input) casts its other input, the
//!   block's fp16 output, to f32 and adds in f32;
//! - an `RmsNorm` reads the f32 stream directly: its square and mean run in
//!   f32 anyway (see `rms_norm.rs`), so the stream's Cast moves, none is added;
//! - any other op reading the stream gets it cast to fp16 (none does in the
//!   decoders Kiln builds; the rule keeps every other lowering fp16-only);
//! - a graph output is always in the graph's float type.
//!
//! Every op involved (Cast, Add, and the RMSNorm's f32 part) is on ATC's
//! allow-list with float32 support, so `--precision_mode=must_keep_origin_dtype`
//! keeps them f32 (ATC's Add and Cast pages list float: e.g.
//! <https://www.hiascend.com/document/detail/zh/canncommercial/800/apiref/aolapi/atlasoxol_09_0031.html>).

use super::{lower_io, node_io, Cx, NodeIo};
use crate::backend::onnx::builder::Attr;
use crate::backend::onnx::OnnxError;
use kiln_runtime::ir::{Graph, GraphNames, Node, Op};
use onnx_protobuf::tensor_proto::DataType;

fn cast(cx: &mut Cx, value: &str, base: &str, to: DataType) -> String {
    cx.b.temp("Cast", &[value], base, vec![("to", Attr::Int(to as i64))])
}

/// The embedding lookup: a (quantized) gather of the graph's token ids.
fn is_embedding(graph: &Graph, node: &Node) -> bool {
    matches!(node.op, Op::Gather(_) | Op::QuantGather(_))
        && node.inputs.last().is_some_and(|&id| {
            graph.inputs.contains(&id) && graph.value(id).name == GraphNames::INPUT_IDS
        })
}

pub fn lower_node(cx: &mut Cx, graph: &Graph, node: &Node) -> Result<(), OnnxError> {
    let io = node_io(graph, node);
    let is_output = graph.outputs.contains(&node.output);
    let any_wide = io.inputs.iter().any(|name| cx.wide.contains(*name));
    match &node.op {
        Op::Add(_) if any_wide => {
            let inputs: Vec<String> = io
                .inputs
                .iter()
                .map(|&name| match cx.wide.contains(name) {
                    true => name.to_string(),
                    false => cast(cx, name, io.name, DataType::FLOAT),
                })
                .collect();
            let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            if is_output {
                let sum = cx.b.temp("Add", &inputs, io.name, vec![]);
                let to = vec![("to", Attr::Int(cx.float.data_type() as i64))];
                cx.b.node("Cast", &[&sum], io.output, to);
            } else {
                cx.b.node("Add", &inputs, io.output, vec![]);
                cx.wide.insert(io.output.to_string());
            }
            Ok(())
        }
        // Reads an f32 input as it is (rms_norm.rs checks `cx.wide`).
        Op::RmsNorm(_) => lower_io(cx, node, &io),
        _ if is_embedding(graph, node) && !is_output => {
            let narrow = cx.b.fresh(io.output);
            let lowered = NodeIo {
                output: &narrow,
                ..node_io(graph, node)
            };
            lower_io(cx, node, &lowered)?;
            cx.b.node(
                "Cast",
                &[&narrow],
                io.output,
                vec![("to", Attr::Int(DataType::FLOAT as i64))],
            );
            cx.wide.insert(io.output.to_string());
            Ok(())
        }
        _ if any_wide => {
            let narrow: Vec<String> = io
                .inputs
                .iter()
                .map(|&name| match cx.wide.contains(name) {
                    true => cast(cx, name, io.name, cx.float.data_type()),
                    false => name.to_string(),
                })
                .collect();
            let lowered = NodeIo {
                inputs: narrow.iter().map(String::as_str).collect(),
                ..node_io(graph, node)
            };
            lower_io(cx, node, &lowered)
        }
        _ => lower_io(cx, node, &io),
    }
}
