//! Nodes with a generated Ascend C kernel → custom-domain `ai.kiln` nodes
//! whose type is the kernel's OpType (what its ONNX plugin registers), with
//! the kernel's inputs in its OpDef order. The weights a GEMV reads stay as
//! stored (int8, or two int4 per uint8), split by rows into one initializer
//! per column chunk when the layer is wider than one call.

use super::Cx;
use crate::backend::ascendc::plan::{node_kernel, residual_add, NodeKernel};
use crate::backend::ascendc::{KernelOp, KernelPlan, Target, ONNX_DOMAIN};
use crate::backend::onnx::builder::Attr;
use crate::backend::onnx::{Derived, OnnxError};
use kiln_runtime::ir::Graph;
use std::collections::HashSet;

/// Which nodes are lowered to kernel calls.
pub struct Assigned {
    /// By node: the calls that compute it, or `None` for the standard lowering.
    pub calls: Vec<Option<Vec<KernelOp>>>,
    /// `Add` nodes whose sum a later Add + RMSNorm kernel outputs.
    pub absorbed: HashSet<usize>,
    /// Candidates that stay standard ops, and why.
    pub skipped: Vec<(String, String)>,
}

impl Assigned {
    pub fn none(graph: &Graph) -> Assigned {
        Assigned {
            calls: vec![None; graph.nodes.len()],
            absorbed: HashSet::new(),
            skipped: Vec::new(),
        }
    }
}

pub fn assign(graph: &Graph, target: Target) -> Result<Assigned, OnnxError> {
    let mut out = Assigned::none(graph);
    for index in 0..graph.nodes.len() {
        let mut calls = match node_kernel(graph, index, target)? {
            NodeKernel::Calls(calls) => calls,
            NodeKernel::Skipped(why) => {
                out.skipped.push((graph.nodes[index].name.clone(), why));
                continue;
            }
            NodeKernel::None => continue,
        };
        if let KernelOp::RmsNorm { residual, .. } = &mut calls[0] {
            if *residual {
                // The kernel emits the sum where the norm is: only when no
                // node between the Add and the norm reads it (ONNX order).
                let add = residual_add(graph, index).expect("node_kernel found it");
                let sum = graph.nodes[add].output;
                let read_between = graph.nodes[add + 1..index]
                    .iter()
                    .any(|n| n.inputs.contains(&sum));
                if read_between || out.absorbed.contains(&add) {
                    *residual = false;
                } else {
                    out.absorbed.insert(add);
                }
            }
        }
        out.calls[index] = Some(calls);
    }
    Ok(out)
}

/// Lowers node `index` to its kernel calls, recording them in `plan`.
pub fn lower(
    cx: &mut Cx,
    graph: &Graph,
    index: usize,
    calls: &[KernelOp],
    plan: &mut KernelPlan,
) -> Result<(), OnnxError> {
    let node = &graph.nodes[index];
    let name = |id: kiln_runtime::ir::ValueId| graph.value(id).name.as_str();
    let inputs: Vec<&str> = node.inputs.iter().map(|&id| name(id)).collect();
    let output = name(node.output);
    for op in calls {
        plan.add(op.clone(), &node.name);
    }
    let op_type = calls[0].kind().op_type();
    match &calls[0] {
        KernelOp::RmsNorm { residual: true, .. } => {
            let add = &graph.nodes[residual_add(graph, index).expect("assigned")];
            let (a, b) = (name(add.inputs[0]), name(add.inputs[1]));
            let outputs = [output, name(add.output)];
            cx.b.custom(ONNX_DOMAIN, op_type, &[a, b, inputs[1]], &outputs);
        }
        KernelOp::Gemv { .. } if calls.len() == 1 => {
            cx.b.custom(ONNX_DOMAIN, op_type, &inputs, &[output]);
        }
        KernelOp::Gemv { .. } => {
            // Column chunks: each reads its rows of every weight input.
            let mut parts = Vec::with_capacity(calls.len());
            let mut start = 0;
            for op in calls {
                let KernelOp::Gemv { n, .. } = *op else {
                    unreachable!("a GEMV's chunks are GEMVs")
                };
                let mut args = vec![inputs[0].to_string()];
                for &value in &inputs[1..] {
                    let tensor = cx.weight_tensors.get(value).cloned().ok_or_else(|| {
                        OnnxError::NotAllowed(format!(
                            "{}: a GEMV kernel reads constant weights, and {value} is not one",
                            node.name
                        ))
                    })?;
                    let rows = format!("{tensor}/rows_{start}_{}", start + n);
                    cx.derived.insert(
                        rows.clone(),
                        Derived::Rows {
                            source: tensor,
                            start,
                            end: start + n,
                        },
                    );
                    args.push(rows);
                }
                let part = cx.b.fresh(output);
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                cx.b.custom(ONNX_DOMAIN, op_type, &refs, &[&part]);
                parts.push(part);
                start += n;
            }
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            cx.b.node("Concat", &refs, output, vec![("axis", Attr::Int(-1))]);
        }
        _ => cx.b.custom(ONNX_DOMAIN, op_type, &inputs, &[output]),
    }
    Ok(())
}
