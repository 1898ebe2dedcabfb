//! The reference CPU interpreter: runs an IR graph in f32, deterministically.
//! It is the ground truth that every backend's numbers are compared with.

pub mod linalg;
pub mod math;
pub mod profile;

use crate::ir::ops::KernelError;
use crate::ir::{DType, Graph, IrError, ValueId, ValueSource};
use crate::tensor::Tensor;
use crate::weights::{WeightError, WeightStore};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum InterpError {
    #[error(transparent)]
    Graph(#[from] IrError),
    #[error(transparent)]
    Weight(#[from] WeightError),
    #[error("graph `{graph}` needs input `{name}`")]
    MissingInput { graph: String, name: String },
    #[error("graph `{graph}` has no input `{name}`")]
    UnknownInput { graph: String, name: String },
    #[error("input `{name}` of graph `{graph}` must be {expected}, got {got}")]
    InputType {
        graph: String,
        name: String,
        expected: String,
        got: String,
    },
    #[error("node `{node}` ({op}) failed: {source}")]
    Kernel {
        node: String,
        op: &'static str,
        #[source]
        source: KernelError,
    },
}

/// Weights converted to f32 (and packed, for `Linear`) once and shared by
/// every graph that uses them (a model's prefill and decode graphs use the
/// same tensors).
#[derive(Default)]
pub struct F32Weights {
    tensors: HashMap<(String, bool), Tensor>,
}

impl F32Weights {
    fn get(
        &mut self,
        store: &WeightStore,
        name: &str,
        packed: bool,
    ) -> Result<Tensor, WeightError> {
        let key = (name.to_string(), packed);
        if let Some(t) = self.tensors.get(&key) {
            return Ok(t.clone());
        }
        let plain = store.to_f32_tensor(name)?;
        let t = if packed {
            let (n, k) = (plain.shape()[0], plain.shape()[1]);
            let matrix = linalg::PackedMatrix::new(plain.f32s(), n, k);
            Tensor::from_buffer(
                plain.shape().to_vec(),
                std::sync::Arc::new(crate::tensor::Buffer::Packed(matrix)),
            )
        } else {
            plain
        };
        self.tensors.insert(key, t.clone());
        Ok(t)
    }
}

/// Weights that only ever serve as a `Linear` weight (input 1) in `graph`:
/// these are packed for the matmul kernels.
fn linear_only_weights(graph: &Graph) -> Vec<bool> {
    let mut linear_only = vec![true; graph.values.len()];
    for node in &graph.nodes {
        for (slot, &input) in node.inputs.iter().enumerate() {
            if !(matches!(node.op, crate::ir::Op::Linear(_)) && slot == 1) {
                linear_only[input.index()] = false;
            }
        }
    }
    for &out in &graph.outputs {
        linear_only[out.index()] = false;
    }
    linear_only
}

/// Intermediate values captured during a run, by IR value name.
pub type Taps = Vec<(String, Tensor)>;

/// One graph, ready to run.
pub struct Interpreter {
    graph: Graph,
    weights: Vec<(ValueId, Tensor)>,
    /// For each value, the index of the last node that reads it (or
    /// `usize::MAX` for graph outputs), so intermediates are freed early.
    last_use: Vec<usize>,
}

impl Interpreter {
    pub fn new(
        graph: Graph,
        store: &WeightStore,
        cache: &mut F32Weights,
    ) -> Result<Interpreter, InterpError> {
        graph.validate()?;
        let linear_only = linear_only_weights(&graph);
        let mut weights = Vec::new();
        for (id, tensor) in graph.weights() {
            let declared = graph.ty(id);
            let stored = store.tensor_type(tensor)?;
            if stored != *declared {
                return Err(InterpError::Graph(IrError::Structure {
                    graph: graph.name.clone(),
                    message: format!(
                        "weight `{tensor}` is declared {declared} but {} holds {stored}",
                        store.origin(tensor).display()
                    ),
                }));
            }
            weights.push((id, cache.get(store, tensor, linear_only[id.index()])?));
        }
        let mut last_use = vec![0usize; graph.values.len()];
        for (i, node) in graph.nodes.iter().enumerate() {
            for &input in &node.inputs {
                last_use[input.index()] = i;
            }
        }
        for &out in &graph.outputs {
            last_use[out.index()] = usize::MAX;
        }
        Ok(Interpreter {
            graph,
            weights,
            last_use,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs the graph. Every input must be given, with its declared type.
    /// Returns the outputs in the graph's output order.
    pub fn run(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<Tensor>, InterpError> {
        self.run_with_taps(inputs, &[]).map(|(outputs, _)| outputs)
    }

    /// Like [`Self::run`], and also returns the named intermediate values
    /// (by IR value name), for layer-by-layer comparisons.
    pub fn run_with_taps(
        &self,
        inputs: &[(&str, Tensor)],
        taps: &[&str],
    ) -> Result<(Vec<Tensor>, Taps), InterpError> {
        let graph = &self.graph;
        let mut slots: Vec<Option<Tensor>> = vec![None; graph.values.len()];
        for (id, tensor) in &self.weights {
            slots[id.index()] = Some(tensor.clone());
        }
        for &(name, ref tensor) in inputs {
            let id = graph.input(name).map_err(|_| InterpError::UnknownInput {
                graph: graph.name.clone(),
                name: name.to_string(),
            })?;
            let expected = graph.ty(id);
            let matches = tensor.shape() == expected.shape.as_slice()
                && (tensor.dtype() == expected.dtype
                    || (expected.dtype.is_float() && tensor.dtype() == DType::F32));
            if !matches {
                return Err(InterpError::InputType {
                    graph: graph.name.clone(),
                    name: name.to_string(),
                    expected: expected.to_string(),
                    got: format!("{}{:?}", tensor.dtype(), tensor.shape()),
                });
            }
            slots[id.index()] = Some(tensor.clone());
        }
        for &id in &graph.inputs {
            if slots[id.index()].is_none() {
                return Err(InterpError::MissingInput {
                    graph: graph.name.clone(),
                    name: graph.value(id).name.clone(),
                });
            }
        }
        let tap_ids: Vec<ValueId> = taps
            .iter()
            .filter_map(|name| {
                graph
                    .values
                    .iter()
                    .position(|v| {
                        v.name == *name && !matches!(v.source, ValueSource::Weight { .. })
                    })
                    .map(|i| ValueId(i as u32))
            })
            .collect();
        let mut tapped = Vec::new();
        for (index, node) in graph.nodes.iter().enumerate() {
            let args: Vec<&Tensor> = node
                .inputs
                .iter()
                .map(|id| {
                    slots[id.index()]
                        .as_ref()
                        .expect("validated graphs define values before use")
                })
                .collect();
            let started = profile::start();
            let out = node.op.eval(&args).map_err(|source| InterpError::Kernel {
                node: node.name.clone(),
                op: node.op.name(),
                source,
            })?;
            profile::record(node.op.name(), started);
            if tap_ids.contains(&node.output) {
                tapped.push((graph.value(node.output).name.clone(), out.clone()));
            }
            slots[node.output.index()] = Some(out);
            for &input in &node.inputs {
                if self.last_use[input.index()] == index && !graph.inputs.contains(&input) {
                    slots[input.index()] = None;
                }
            }
        }
        let outputs = graph
            .outputs
            .iter()
            .map(|id| {
                slots[id.index()]
                    .take()
                    .expect("validated graphs compute their outputs")
            })
            .collect();
        Ok((outputs, tapped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ops::{Add, Linear, RmsNorm};
    use crate::ir::{GraphBuilder, TensorType};

    /// `logits = Linear(RmsNorm(x) + x)`: a value in the middle, one at the end.
    fn graph_and_weights() -> (Graph, WeightStore) {
        let mut store = WeightStore::default();
        store.insert_f32("norm", vec![4], vec![1.0, 0.5, 2.0, 1.5]);
        store.insert_f32(
            "head",
            vec![3, 4],
            (0..12).map(|i| i as f32 * 0.25 - 1.0).collect(),
        );
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", TensorType::f32([1, 2, 4]));
        let norm = b.weight("norm", TensorType::f32([4]));
        let head = b.weight("head", TensorType::f32([3, 4]));
        let h = b.node("hidden", RmsNorm { eps: 1e-6 }, &[x, norm]).unwrap();
        let r = b.node("residual", Add, &[h, x]).unwrap();
        let y = b.node("lm_head", Linear, &[r, head]).unwrap();
        b.output(y, "logits");
        (b.finish().unwrap(), store)
    }

    #[test]
    fn captured_values_are_the_computed_ones() {
        let (graph, store) = graph_and_weights();
        let interp = Interpreter::new(graph, &store, &mut F32Weights::default()).unwrap();
        let x = Tensor::from_f32([1, 2, 4], vec![1., -2., 3., 0.5, 0.25, 4., -1., 2.]);
        let plain = interp.run(&[("x", x.clone())]).unwrap();
        let (outputs, taps) = interp
            .run_with_taps(
                &[("x", x.clone())],
                &["logits", "residual", "norm", "no-such-value"],
            )
            .unwrap();
        // Capturing changes nothing, and the captured logits are the output's numbers.
        assert_eq!(outputs[0].f32s(), plain[0].f32s());
        let names: Vec<&str> = taps.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["residual", "logits"],
            "graph order; weights and unknown names skipped"
        );
        assert_eq!(taps[1].1.shape(), [1, 2, 3]);
        assert_eq!(taps[1].1.f32s(), plain[0].f32s());
        // The intermediate value is what the graph up to it computes.
        let mut b = GraphBuilder::new("prefix");
        let xi = b.input("x", TensorType::f32([1, 2, 4]));
        let norm = b.weight("norm", TensorType::f32([4]));
        let h = b
            .node("hidden", RmsNorm { eps: 1e-6 }, &[xi, norm])
            .unwrap();
        let r = b.node("residual", Add, &[h, xi]).unwrap();
        b.output(r, "residual");
        let (_, store) = graph_and_weights();
        let prefix =
            Interpreter::new(b.finish().unwrap(), &store, &mut F32Weights::default()).unwrap();
        let expected = prefix.run(&[("x", x)]).unwrap();
        assert_eq!(taps[0].1.f32s(), expected[0].f32s());
    }
}
