//! Which nodes of a decode graph have an Ascend C kernel, at which static
//! shapes, and the GM bytes those kernels read per step.
//!
//! Covered: `RmsNorm` (as the residual `Add` + RMSNorm when its input is an
//! `Add` of two equal shapes), `SwiGlu`, `Rope`, and single-row `Linear` /
//! weight-only `QuantLinear` without bias or input scale (a GEMV; a layer
//! whose weights exceed one call's budget, such as `lm_head`, becomes
//! several column chunks). Everything else stays with the ONNX lowering;
//! `skipped` says why for the candidates that did not fit.

use super::tiling::gemv_column_chunks;
use super::{AscendcError, GemvWeights, KernelOp, KernelRequest, Target};
use kiln_runtime::ir::quant::ActivationQuant;
use kiln_runtime::ir::{Graph, Op, ValueSource};
use serde::{Deserialize, Serialize};

/// The kernels a graph's step runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelPlan {
    /// One request per distinct instance, `source` naming its first node.
    pub requests: Vec<KernelRequest>,
    /// Calls of each request per step (same order).
    pub calls: Vec<usize>,
    /// Nodes that look like candidates but have no kernel, and why.
    pub skipped: Vec<(String, String)>,
}

impl KernelPlan {
    pub fn add(&mut self, op: KernelOp, source: &str) {
        match self.requests.iter().position(|r| r.op == op) {
            Some(i) => self.calls[i] += 1,
            None => {
                self.requests.push(KernelRequest {
                    op,
                    source: source.to_string(),
                });
                self.calls.push(1);
            }
        }
    }

    /// GM bytes the planned kernels read in one step on `target`.
    pub fn bytes_per_step(&self, target: Target) -> Result<u64, AscendcError> {
        let mut total = 0;
        for (r, &calls) in self.requests.iter().zip(&self.calls) {
            let tiling = r.op.tiling(target)?;
            total += r.op.bytes_read(&tiling) * calls as u64;
        }
        Ok(total)
    }
}

/// What a node runs as.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeKernel {
    /// Not an op with a kernel.
    None,
    /// A candidate without one, and why.
    Skipped(String),
    /// The kernel calls that compute the node's output (several column
    /// chunks for a wide GEMV, concatenated along the last axis).
    Calls(Vec<KernelOp>),
}

/// The kernel calls of node `index` of `graph` on `target`.
pub fn node_kernel(
    graph: &Graph,
    index: usize,
    target: Target,
) -> Result<NodeKernel, AscendcError> {
    let node = &graph.nodes[index];
    let ty = |i: usize| graph.ty(node.inputs[i]);
    let op = match &node.op {
        Op::RmsNorm(norm) => {
            let x = ty(0);
            let cols = *x.shape.last().unwrap_or(&1);
            KernelOp::RmsNorm {
                rows: x.numel() / cols.max(1),
                cols,
                eps: norm.eps,
                residual: residual_add(graph, index).is_some(),
            }
        }
        Op::SwiGlu(_) => KernelOp::SwiGlu { len: ty(0).numel() },
        Op::Rope(_) => {
            let s = &ty(0).shape;
            KernelOp::Rope {
                batch: s[0],
                heads: s[1],
                tokens: s[2],
                dim: s[3],
            }
        }
        Op::Linear(_) | Op::QuantLinear(_) => {
            let weights = match &node.op {
                Op::Linear(_) if node.inputs.len() == 2 => GemvWeights::Half,
                Op::Linear(_) => {
                    return Ok(NodeKernel::Skipped("no GEMV kernel for a bias".into()))
                }
                Op::QuantLinear(q) => {
                    let k = ty(1).shape[1];
                    let why = match (q.activations, q.input_scale, q.bias, q.weights.bits) {
                        (ActivationQuant::DynamicInt8PerToken, ..) => "int8 activations",
                        (_, true, ..) => "an input scale",
                        (_, _, true, _) => "a bias",
                        (_, _, _, 8) if q.weights.group_size < k => "int8 groups along K",
                        _ => "",
                    };
                    if !why.is_empty() {
                        return Ok(NodeKernel::Skipped(format!("no GEMV kernel for {why}")));
                    }
                    match q.weights.bits {
                        8 => GemvWeights::Int8,
                        _ => GemvWeights::Int4 {
                            group_size: q.weights.group_size,
                            offset: q.weights.offset,
                        },
                    }
                }
                _ => unreachable!(),
            };
            let (n, k) = (ty(1).shape[0], ty(1).shape[1]);
            let rows = ty(0).numel() / k.max(1);
            if rows != 1 {
                return Ok(NodeKernel::Skipped(format!(
                    "{rows} rows (the GEMV takes one)"
                )));
            }
            let calls: Vec<KernelOp> = match gemv_column_chunks(k, n, weights, target) {
                Ok(chunks) => chunks
                    .into_iter()
                    .map(|c| KernelOp::Gemv {
                        k,
                        n: c.len(),
                        weights,
                    })
                    .collect(),
                Err(e) => return Ok(NodeKernel::Skipped(e.to_string())),
            };
            for call in &calls {
                call.tiling(target)?;
            }
            return Ok(NodeKernel::Calls(calls));
        }
        _ => return Ok(NodeKernel::None),
    };
    Ok(match op.tiling(target) {
        Ok(_) => NodeKernel::Calls(vec![op]),
        Err(e) => NodeKernel::Skipped(e.to_string()),
    })
}

/// The `Add` node whose output node `index` (an `RmsNorm`) normalizes, when
/// its two inputs have one shape: the residual Add + RMSNorm kernel
/// computes both.
pub fn residual_add(graph: &Graph, index: usize) -> Option<usize> {
    let node = &graph.nodes[index];
    let ValueSource::Node { node: producer } = graph.value(*node.inputs.first()?).source else {
        return None;
    };
    let p = &graph.nodes[producer];
    (matches!(p.op, Op::Add(_)) && graph.ty(p.inputs[0]) == graph.ty(p.inputs[1]))
        .then_some(producer)
}

/// Plans `graph`'s kernels for `target` (tiling is checked for each).
pub fn plan_kernels(graph: &Graph, target: Target) -> Result<KernelPlan, AscendcError> {
    let mut plan = KernelPlan::default();
    for (index, node) in graph.nodes.iter().enumerate() {
        match node_kernel(graph, index, target)? {
            NodeKernel::None => {}
            NodeKernel::Skipped(why) => plan.skipped.push((node.name.clone(), why)),
            NodeKernel::Calls(calls) => {
                for op in calls {
                    plan.add(op, &node.name);
                }
            }
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::{GraphOptions, HfModel, ShapeRequest};
    use std::path::Path;

    fn decode_graph(quant: Option<crate::passes::quantize::Scheme>) -> Graph {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/qwen3");
        let mut model = HfModel::open(&dir).unwrap();
        let options = GraphOptions::resolve(&model.config, &ShapeRequest::default());
        let mut ir = model.build_ir(&options).unwrap();
        crate::passes::optimize(&mut ir).unwrap();
        if let Some(scheme) = quant {
            let options = crate::passes::quantize::QuantOptions::new(scheme);
            crate::passes::quantize::quantize_model(&mut ir, &mut model.weights, &options).unwrap();
        }
        ir.take_graph("decode").unwrap()
    }

    #[test]
    fn every_norm_activation_rope_and_linear_of_a_decode_step_has_a_kernel() {
        let graph = decode_graph(None);
        let counts: std::collections::HashMap<_, _> = graph.op_counts().into_iter().collect();
        for target in Target::ALL {
            let plan = plan_kernels(&graph, target).unwrap();
            assert!(plan.skipped.is_empty(), "{:?}", plan.skipped);
            let calls = |f: fn(&KernelOp) -> bool| -> usize {
                plan.requests
                    .iter()
                    .zip(&plan.calls)
                    .filter(|(r, _)| f(&r.op))
                    .map(|(_, c)| c)
                    .sum()
            };
            assert_eq!(
                calls(|o| matches!(o, KernelOp::RmsNorm { .. })),
                counts["RmsNorm"]
            );
            assert_eq!(
                calls(|o| matches!(o, KernelOp::SwiGlu { .. })),
                counts["SwiGlu"]
            );
            assert_eq!(
                calls(|o| matches!(o, KernelOp::Rope { .. })),
                counts["Rope"]
            );
            assert!(calls(|o| matches!(o, KernelOp::Gemv { .. })) >= counts["Linear"]);
            // After the first layer, every norm's input is a residual Add.
            assert!(calls(|o| matches!(o, KernelOp::RmsNorm { residual: true, .. })) > 0);
            assert!(plan.bytes_per_step(target).unwrap() > 0);
        }
    }

    #[test]
    fn quantized_layers_get_the_matching_gemv() {
        use crate::passes::quantize::Scheme;
        let graph = decode_graph(Some(Scheme::W4A16 {
            group_size: 32,
            asymmetric: true,
        }));
        let plan = plan_kernels(&graph, Target::Ascend310b).unwrap();
        assert!(plan.requests.iter().any(|r| matches!(
            r.op,
            KernelOp::Gemv {
                weights: GemvWeights::Int4 {
                    group_size: 32,
                    offset: true
                },
                ..
            }
        )));
        let graph = decode_graph(Some(Scheme::W8A8));
        let plan = plan_kernels(&graph, Target::Ascend310b).unwrap();
        assert!(plan
            .skipped
            .iter()
            .any(|(_, why)| why.contains("int8 activations")));
    }

    #[test]
    fn hostile_node_and_tensor_names_stay_out_of_the_package() {
        let mut graph = decode_graph(None);
        let evil = "\"); system(\"x\"); /* $(evil) `evil` */ #define evil";
        for (i, node) in graph.nodes.iter_mut().enumerate() {
            node.name = format!("{evil}{i}");
        }
        for (i, value) in graph.values.iter_mut().enumerate() {
            value.name = format!("{evil}{i}");
        }
        let plan = plan_kernels(&graph, Target::Ascend310b).unwrap();
        let dir = tempfile::tempdir().unwrap();
        super::super::generate_package(dir.path(), Target::Ascend310b, &plan.requests).unwrap();
        let mut stack = vec![dir.path().to_path_buf()];
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else if !p.ends_with("kernels.json") {
                let text = std::fs::read_to_string(&p).unwrap();
                assert!(!text.contains("evil"), "{} holds a model name", p.display());
            }
        }
    }
}
