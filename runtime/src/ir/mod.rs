//! Kiln's intermediate representation: the one contract between the frontend,
//! the compiler passes, every backend and the reference interpreter.
//!
//! A [`Graph`] is a static-shape dataflow graph. Every value has a dtype and a
//! fully known shape; every node computes exactly one value from its inputs.
//! Nodes are kept in topological order (the builder only lets a node use values
//! that already exist), so a backend can walk `nodes` front to back.
//!
//! Weights are not stored in the graph: a weight value carries the name of a
//! tensor in a [`crate::weights::WeightStore`], which memory-maps the files.

mod dump;
pub mod model;
pub mod ops;
pub mod quant;

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;

pub use model::{GraphLayout, GraphNames, KvCacheLayout, MaskInput, ModelIr};
pub use ops::Op;

/// Element types of IR tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    I64,
    /// Quantized weights (see [`quant`]).
    I8,
    /// Unsigned 4-bit quantized weights, two per byte, low nibble first.
    U4,
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub fn bits(self) -> usize {
        match self {
            DType::F32 => 32,
            DType::F16 | DType::BF16 => 16,
            DType::I64 => 64,
            DType::I8 => 8,
            DType::U4 => 4,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I8 => "i8",
            DType::U4 => "u4",
        };
        f.write_str(name)
    }
}

/// The static type of a tensor: element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl Into<Vec<usize>>) -> Self {
        TensorType {
            dtype,
            shape: shape.into(),
        }
    }

    pub fn f32(shape: impl Into<Vec<usize>>) -> Self {
        Self::new(DType::F32, shape)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Bytes in memory (sub-byte types packed, the last byte padded).
    pub fn size_bytes(&self) -> usize {
        (self.numel() * self.dtype.bits()).div_ceil(8)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.dtype, self.shape)
    }
}

/// Index of a value in [`Graph::values`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ValueId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Where a value comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ValueSource {
    /// A graph input, supplied by the caller on every run.
    Input,
    /// A tensor of the weight store, by its name there.
    Weight { tensor: String },
    /// The output of `nodes[node]`.
    Node { node: usize },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Value {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: TensorType,
    pub source: ValueSource,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub output: ValueId,
}

/// An IR graph. Build one with [`GraphBuilder`]; after construction it is
/// only changed by passes, which must call [`Graph::validate`] when done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub name: String,
    pub values: Vec<Value>,
    pub nodes: Vec<Node>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// The inputs that are attention masks, and how the host fills them
    /// (a model's step graphs; none in other graphs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masks: Vec<MaskInput>,
}

#[derive(Debug, thiserror::Error)]
pub enum IrError {
    #[error("node `{node}` ({op}): {message}")]
    Type {
        node: String,
        op: &'static str,
        message: String,
    },
    #[error("graph `{graph}`: {message}")]
    Structure { graph: String, message: String },
    #[error("graph `{graph}` has no {what} named `{name}`")]
    UnknownName {
        graph: String,
        what: &'static str,
        name: String,
    },
}

impl Graph {
    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.index()]
    }

    pub fn ty(&self, id: ValueId) -> &TensorType {
        &self.values[id.index()].ty
    }

    /// Finds a graph input by name.
    pub fn input(&self, name: &str) -> Result<ValueId, IrError> {
        self.find(&self.inputs, name, "input")
    }

    /// Finds a graph output by name.
    pub fn output(&self, name: &str) -> Result<ValueId, IrError> {
        self.find(&self.outputs, name, "output")
    }

    fn find(&self, ids: &[ValueId], name: &str, what: &'static str) -> Result<ValueId, IrError> {
        ids.iter()
            .copied()
            .find(|&id| self.value(id).name == name)
            .ok_or_else(|| IrError::UnknownName {
                graph: self.name.clone(),
                what,
                name: name.to_string(),
            })
    }

    /// Weight values, in value order.
    pub fn weights(&self) -> impl Iterator<Item = (ValueId, &str)> + '_ {
        self.values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match &v.source {
                ValueSource::Weight { tensor } => Some((ValueId(i as u32), tensor.as_str())),
                _ => None,
            })
    }

    /// The value of weight `tensor`, added if the graph has none (for passes
    /// that give nodes new weights).
    pub fn add_weight(&mut self, tensor: &str, ty: TensorType) -> ValueId {
        if let Some((id, _)) = self.weights().find(|&(_, t)| t == tensor) {
            return id;
        }
        self.values.push(Value {
            name: tensor.to_string(),
            ty,
            source: ValueSource::Weight {
                tensor: tensor.to_string(),
            },
        });
        ValueId(self.values.len() as u32 - 1)
    }

    /// Number of nodes of each op kind, sorted by op name.
    pub fn op_counts(&self) -> Vec<(&'static str, usize)> {
        let mut counts: HashMap<&'static str, usize> = HashMap::new();
        for node in &self.nodes {
            *counts.entry(node.op.name()).or_default() += 1;
        }
        let mut counts: Vec<_> = counts.into_iter().collect();
        counts.sort();
        counts
    }

    /// Checks every structural invariant and re-infers every node's type.
    /// A graph loaded from disk or changed by a pass must pass this before use.
    pub fn validate(&self) -> Result<(), IrError> {
        let fail = |message: String| IrError::Structure {
            graph: self.name.clone(),
            message,
        };
        let n_values = self.values.len();
        let check_id = |id: ValueId, what: &str| {
            if id.index() < n_values {
                Ok(())
            } else {
                Err(fail(format!(
                    "{what} refers to value #{} which does not exist",
                    id.0
                )))
            }
        };
        let mut defined = vec![false; n_values];
        for (i, value) in self.values.iter().enumerate() {
            match value.source {
                ValueSource::Input => {
                    if !self.inputs.contains(&ValueId(i as u32)) {
                        return Err(fail(format!(
                            "value `{}` is an input but not listed as one",
                            value.name
                        )));
                    }
                    defined[i] = true;
                }
                ValueSource::Weight { .. } => defined[i] = true,
                ValueSource::Node { node } => {
                    if self.nodes.get(node).map(|n| n.output) != Some(ValueId(i as u32)) {
                        return Err(fail(format!(
                            "value `{}` names node #{node} which does not produce it",
                            value.name
                        )));
                    }
                }
            }
        }
        for &id in &self.inputs {
            check_id(id, "an input")?;
            if self.value(id).source != ValueSource::Input {
                return Err(fail(format!(
                    "input `{}` is not an input value",
                    self.value(id).name
                )));
            }
        }
        for (index, node) in self.nodes.iter().enumerate() {
            check_id(node.output, &format!("node `{}`", node.name))?;
            let mut input_types = Vec::with_capacity(node.inputs.len());
            for &input in &node.inputs {
                check_id(input, &format!("node `{}`", node.name))?;
                if !defined[input.index()] {
                    return Err(fail(format!(
                        "node `{}` uses `{}` before it is computed",
                        node.name,
                        self.value(input).name
                    )));
                }
                input_types.push(self.ty(input));
            }
            let inferred = node
                .op
                .infer(&input_types)
                .map_err(|message| IrError::Type {
                    node: node.name.clone(),
                    op: node.op.name(),
                    message,
                })?;
            let declared = self.value(node.output);
            if inferred != declared.ty {
                return Err(fail(format!(
                    "node `{}` computes {inferred} but its output `{}` is declared {}",
                    node.name, declared.name, declared.ty
                )));
            }
            if declared.source != (ValueSource::Node { node: index }) {
                return Err(fail(format!(
                    "value `{}` does not name node `{}` as its source",
                    declared.name, node.name
                )));
            }
            defined[node.output.index()] = true;
        }
        for &id in &self.outputs {
            check_id(id, "an output")?;
            if !defined[id.index()] {
                return Err(fail(format!(
                    "output `{}` is never computed",
                    self.value(id).name
                )));
            }
        }
        for mask in &self.masks {
            let ty = self.ty(self.input(&mask.input)?);
            if ty.dtype != DType::F32 || ty.rank() != 4 {
                return Err(fail(format!(
                    "mask input `{}` is {ty}, not a rank-4 f32 tensor",
                    mask.input
                )));
            }
            if mask.sliding_window == Some(0) {
                return Err(fail(format!("mask `{}` has a window of 0", mask.input)));
            }
        }
        Ok(())
    }
}

/// Builds a [`Graph`], checking every node's input types as it is added.
pub struct GraphBuilder {
    graph: Graph,
}

impl GraphBuilder {
    pub fn new(name: impl Into<String>) -> Self {
        GraphBuilder {
            graph: Graph {
                name: name.into(),
                values: Vec::new(),
                nodes: Vec::new(),
                inputs: Vec::new(),
                outputs: Vec::new(),
                masks: Vec::new(),
            },
        }
    }

    fn push_value(&mut self, name: String, ty: TensorType, source: ValueSource) -> ValueId {
        let id = ValueId(self.graph.values.len() as u32);
        self.graph.values.push(Value { name, ty, source });
        id
    }

    pub fn input(&mut self, name: impl Into<String>, ty: TensorType) -> ValueId {
        let id = self.push_value(name.into(), ty, ValueSource::Input);
        self.graph.inputs.push(id);
        id
    }

    /// An attention-mask input `[1, 1, tokens, width]`, described for the host.
    pub fn mask_input(&mut self, mask: MaskInput, tokens: usize, width: usize) -> ValueId {
        let id = self.input(mask.input.clone(), TensorType::f32([1, 1, tokens, width]));
        self.graph.masks.push(mask);
        id
    }

    /// A weight value. The same tensor used twice (tied embeddings) is one value.
    pub fn weight(&mut self, tensor: &str, ty: TensorType) -> ValueId {
        let existing = self
            .graph
            .weights()
            .find(|&(_, t)| t == tensor)
            .map(|(id, _)| id);
        if let Some(id) = existing {
            return id;
        }
        self.push_value(
            tensor.to_string(),
            ty,
            ValueSource::Weight {
                tensor: tensor.to_string(),
            },
        )
    }

    pub fn ty(&self, id: ValueId) -> &TensorType {
        self.graph.ty(id)
    }

    /// Adds a node; its output type is inferred, and bad input types are an error.
    pub fn node(
        &mut self,
        name: impl Into<String>,
        op: impl Into<Op>,
        inputs: &[ValueId],
    ) -> Result<ValueId, IrError> {
        let name = name.into();
        let op = op.into();
        let input_types: Vec<&TensorType> = inputs.iter().map(|&id| self.graph.ty(id)).collect();
        let ty = op.infer(&input_types).map_err(|message| IrError::Type {
            node: name.clone(),
            op: op.name(),
            message,
        })?;
        let node_index = self.graph.nodes.len();
        let output = self.push_value(name.clone(), ty, ValueSource::Node { node: node_index });
        self.graph.nodes.push(Node {
            name,
            op,
            inputs: inputs.to_vec(),
            output,
        });
        Ok(output)
    }

    /// Marks a value as a graph output under the given name.
    pub fn output(&mut self, id: ValueId, name: impl Into<String>) {
        self.graph.values[id.index()].name = name.into();
        self.graph.outputs.push(id);
    }

    pub fn finish(self) -> Result<Graph, IrError> {
        self.graph.validate()?;
        Ok(self.graph)
    }
}

/// Numpy-style broadcasting of two shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ops::{Add, Linear};

    #[test]
    fn builder_infers_and_checks_types() {
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", TensorType::f32([1, 3, 4]));
        let w = b.weight("w", TensorType::f32([5, 4]));
        let y = b.node("y", Linear, &[x, w]).unwrap();
        assert_eq!(b.ty(y), &TensorType::f32([1, 3, 5]));
        let err = b.node("bad", Add, &[x, y]).unwrap_err();
        assert!(err.to_string().contains("cannot broadcast"), "{err}");
        b.output(y, "out");
        let g = b.finish().unwrap();
        assert_eq!(g.output("out").unwrap(), y);
    }

    #[test]
    fn validate_catches_a_wrong_declared_type() {
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", TensorType::f32([2, 4]));
        let w = b.weight("w", TensorType::f32([3, 4]));
        let y = b.node("y", Linear, &[x, w]).unwrap();
        b.output(y, "y");
        let mut g = b.finish().unwrap();
        g.values[y.index()].ty = TensorType::f32([2, 2]);
        let err = g.validate().unwrap_err().to_string();
        assert!(err.contains("declared f32[2, 2]"), "{err}");
    }

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast_shapes(&[1, 3, 4], &[4]), Some(vec![1, 3, 4]));
        assert_eq!(broadcast_shapes(&[2, 1], &[1, 5]), Some(vec![2, 5]));
        assert_eq!(broadcast_shapes(&[2, 3], &[4]), None);
    }
}
