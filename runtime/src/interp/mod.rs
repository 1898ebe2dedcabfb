//! The reference CPU interpreter: runs an IR graph in f32, deterministically.
//! It is the ground truth that every backend's numbers are compared with.

mod attention;
pub mod linalg;
pub mod math;
mod plan;
pub mod profile;

use crate::ir::ops::KernelError;
use crate::ir::{DType, Graph, IrError, Op, ValueId, ValueSource};
use crate::tensor::Tensor;
use crate::weights::{WeightError, WeightStore};
use plan::{Job, Step};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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

/// Weights as the interpreter reads them, made once and shared by every
/// graph that uses them (a model's prefill and decode graphs use the same
/// tensors): plain tensors (floats as f32, quantized ones as stored), and
/// the packed matrices of `Linear` and `QuantLinear` nodes.
#[derive(Default)]
pub struct F32Weights {
    tensors: HashMap<String, Tensor>,
    /// By the names of the tensors packed: weight (or q, scale, min).
    matrices: HashMap<Vec<String>, Arc<linalg::PackedMatrix>>,
    int8: HashMap<Vec<String>, Arc<linalg::Int8Matrix>>,
}

impl F32Weights {
    fn tensor(&mut self, store: &WeightStore, name: &str) -> Result<Tensor, WeightError> {
        if let Some(t) = self.tensors.get(name) {
            return Ok(t.clone());
        }
        let t = store.to_tensor(name)?;
        self.tensors.insert(name.to_string(), t.clone());
        Ok(t)
    }

    /// The int8 matrix of a `QuantLinear` node with int8 activations.
    fn int8(
        &mut self,
        store: &WeightStore,
        graph: &Graph,
        node: &crate::ir::Node,
    ) -> Result<Arc<linalg::Int8Matrix>, WeightError> {
        let key = vec![weight_name(graph, node, 1), weight_name(graph, node, 2)];
        if let Some(m) = self.int8.get(&key) {
            return Ok(m.clone());
        }
        let q = store.to_tensor(&key[0])?;
        let scale = store.to_f32_tensor(&key[1])?;
        let (n, k) = (q.shape()[0], q.shape()[1]);
        let matrix = Arc::new(linalg::Int8Matrix::new(
            q.quantized_bytes(),
            scale.f32s(),
            n,
            k,
        ));
        self.int8.insert(key, matrix.clone());
        Ok(matrix)
    }

    /// The packed matrix of a `Linear` or weight-only `QuantLinear` node.
    fn matrix(
        &mut self,
        store: &WeightStore,
        graph: &Graph,
        node: &crate::ir::Node,
    ) -> Result<Arc<linalg::PackedMatrix>, WeightError> {
        let name = |slot: usize| weight_name(graph, node, slot);
        let (key, quant) = match &node.op {
            Op::QuantLinear(op) => {
                let at = op.slots();
                let mut key = vec![name(at.q), name(at.scale)];
                key.extend(at.min.map(name));
                (key, Some(op.weights))
            }
            _ => (vec![name(1)], None),
        };
        if let Some(m) = self.matrices.get(&key) {
            return Ok(m.clone());
        }
        // Read straight from the store: the plain tensors are not kept.
        let matrix = match quant {
            None => {
                let w = store.to_f32_tensor(&key[0])?;
                let (n, k) = (w.shape()[0], w.shape()[1]);
                linalg::PackedMatrix::new(w.f32s(), n, k)
            }
            Some(scheme) => {
                let q = store.to_tensor(&key[0])?;
                let scale = store.to_f32_tensor(&key[1])?;
                let min = key.get(2).map(|m| store.to_f32_tensor(m)).transpose()?;
                let (n, k) = (q.shape()[0], q.shape()[1]);
                let source = linalg::QuantSource {
                    scheme,
                    q: q.quantized_bytes(),
                    scale: scale.f32s(),
                    min: min.as_ref().map(Tensor::f32s),
                };
                linalg::PackedMatrix::quantized(&source, n, k)
            }
        };
        let matrix = Arc::new(matrix);
        self.matrices.insert(key, matrix.clone());
        Ok(matrix)
    }
}

/// The store name of the weight at input `slot` of `node` (the plan
/// checked that it is one).
fn weight_name(graph: &Graph, node: &crate::ir::Node, slot: usize) -> String {
    match &graph.value(node.inputs[slot]).source {
        ValueSource::Weight { tensor } => tensor.clone(),
        _ => unreachable!("only weights are packed"),
    }
}

/// Weight values that something other than a packed matrix reads: these
/// are loaded as plain tensors.
fn plainly_read_weights(graph: &Graph, has_matrix: &[bool]) -> Vec<bool> {
    let mut plain = vec![false; graph.values.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        let packed = has_matrix[i] || plan::int8_packable(graph, i);
        let packed_slots: Vec<usize> = match &node.op {
            Op::Linear(_) if packed => vec![1],
            Op::QuantLinear(op) if packed => {
                let at = op.slots();
                [Some(at.q), Some(at.scale), at.min]
                    .into_iter()
                    .flatten()
                    .collect()
            }
            _ => vec![],
        };
        for (slot, &input) in node.inputs.iter().enumerate() {
            if !packed_slots.contains(&slot) {
                plain[input.index()] = true;
            }
        }
    }
    for &out in &graph.outputs {
        plain[out.index()] = true;
    }
    plain
}

/// Intermediate values captured during a run, by IR value name.
pub type Taps = Vec<(String, Tensor)>;

/// The steps that run a graph, and for each value the index of the last
/// step that reads it (or `usize::MAX` for graph outputs), so that
/// intermediates are freed early.
struct Schedule {
    steps: Vec<Step>,
    last_use: Vec<usize>,
}

impl Schedule {
    fn new(graph: &Graph, steps: Vec<Step>) -> Schedule {
        let mut last_use = vec![0usize; graph.values.len()];
        for (i, step) in steps.iter().enumerate() {
            for input in step.inputs(graph) {
                last_use[input.index()] = i;
            }
        }
        for &out in &graph.outputs {
            last_use[out.index()] = usize::MAX;
        }
        Schedule { steps, last_use }
    }
}

thread_local! {
    /// Whether this thread runs a graph or helps one (see [`help_until`]).
    static BUSY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the thread [`BUSY`] while it lives.
struct Busy;

impl Busy {
    fn enter() -> Busy {
        BUSY.set(true);
        Busy
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.set(false);
    }
}

/// Sets the flag when dropped, panics included.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A pool worker's part while another runs a graph: it runs the pool's
/// jobs as they come, until `done`.
///
/// A worker may pick this up while it waits inside a parallel op, with a
/// job below it on its stack that others wait for: then it must not stay.
/// So it returns at once on the thread running the graph or already
/// helping, and elsewhere leaves after a millisecond without work (the
/// time between two parallel ops of a step is well under that).
fn help_until(done: &AtomicBool) {
    const IDLE: std::time::Duration = std::time::Duration::from_millis(1);
    if BUSY.get() {
        return;
    }
    let _busy = Busy::enter();
    let mut idle_since = None;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
            continue;
        }
        let now = std::time::Instant::now();
        if now.duration_since(*idle_since.get_or_insert(now)) > IDLE {
            return;
        }
        // Let the OS run others here (more threads than cores, other
        // processes).
        std::thread::yield_now();
    }
}

/// The visible columns of the attention masks of one run, by mask value
/// and cache length (see [`attention::mask_runs`]).
type MaskRuns = Vec<(ValueId, usize, Vec<Vec<attention::Run>>)>;

/// One graph, ready to run.
pub struct Interpreter {
    graph: Graph,
    weights: Vec<(ValueId, Tensor)>,
    /// The packed matrix of each `Linear` node that has one.
    matrices: Vec<Option<Arc<linalg::PackedMatrix>>>,
    /// The int8 matrix of each `QuantLinear` with int8 activations.
    int8: Vec<Option<Arc<linalg::Int8Matrix>>>,
    /// With `Linear`s fused where possible (see [`plan`]).
    fused: Schedule,
    /// Node by node, for runs that capture intermediate values.
    plain: Schedule,
}

impl Interpreter {
    pub fn new(
        graph: Graph,
        store: &WeightStore,
        cache: &mut F32Weights,
    ) -> Result<Interpreter, InterpError> {
        graph.validate()?;
        let has_matrix: Vec<bool> = (0..graph.nodes.len())
            .map(|i| plan::packable(&graph, i))
            .collect();
        let plain = plainly_read_weights(&graph, &has_matrix);
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
            if plain[id.index()] {
                weights.push((id, cache.tensor(store, tensor)?));
            }
        }
        let matrices = graph
            .nodes
            .iter()
            .zip(&has_matrix)
            .map(|(node, &has)| has.then(|| cache.matrix(store, &graph, node)).transpose())
            .collect::<Result<_, _>>()?;
        let int8 = (0..graph.nodes.len())
            .map(|i| {
                plan::int8_packable(&graph, i)
                    .then(|| cache.int8(store, &graph, &graph.nodes[i]))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let fused = Schedule::new(&graph, plan::plan(&graph, &has_matrix));
        let plain = Schedule::new(&graph, plan::unfused(&graph, &has_matrix));
        Ok(Interpreter {
            graph,
            weights,
            matrices,
            int8,
            fused,
            plain,
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
        if rayon::current_thread_index().is_none() {
            // Run the whole graph on a worker of the pool, and keep the other
            // workers looking for work until it is done: each parallel op then
            // starts on a thread that takes part in it and is picked up by
            // the others at once. (Idle rayon workers go to sleep after a few
            // dozen microseconds, about the time between two parallel ops of
            // a small model, and waking them costs more than the op.)
            let done = AtomicBool::new(false);
            return rayon::scope(|scope| {
                let done = &done;
                for _ in 1..rayon::current_num_threads() {
                    scope.spawn(move |_| help_until(done));
                }
                let _busy = Busy::enter();
                let _done = SetOnDrop(done);
                self.run_with_taps(inputs, taps)
            });
        }
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
        // Fused steps compute the same bits, but not the values in between:
        // a run with taps goes node by node.
        let schedule = if taps.is_empty() {
            &self.fused
        } else {
            &self.plain
        };
        let mut tapped = Vec::new();
        let mut masks = MaskRuns::new();
        for (index, step) in schedule.steps.iter().enumerate() {
            let started = profile::start();
            let outputs = self.run_step(step, &slots, &mut masks)?;
            profile::record(step.profile_name(graph), started);
            for (id, out) in outputs {
                if tap_ids.contains(&id) {
                    tapped.push((graph.value(id).name.clone(), out.clone()));
                }
                slots[id.index()] = Some(out);
            }
            for input in step.inputs(graph) {
                if schedule.last_use[input.index()] == index && !graph.inputs.contains(&input) {
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

impl Interpreter {
    /// Runs one step on the values in `slots`; returns what it computes.
    fn run_step(
        &self,
        step: &Step,
        slots: &[Option<Tensor>],
        masks: &mut MaskRuns,
    ) -> Result<Vec<(ValueId, Tensor)>, InterpError> {
        let graph = &self.graph;
        let value = |id: ValueId| {
            slots[id.index()]
                .as_ref()
                .expect("validated graphs define values before use")
        };
        let job = |j: &Job| linalg::LinearJob {
            weight: self.matrices[j.node]
                .as_deref()
                .expect("plans fuse packed Linears only"),
            bias: j.bias.map(|b| value(b).f32s()),
            residual: j.residual.map(|r| value(r).f32s()),
        };
        let tensor =
            |id: ValueId, data: Vec<f32>| (id, Tensor::from_f32(graph.ty(id).shape.clone(), data));
        // A product's input, scaled by its input scale first if it has one.
        let input = |x: &plan::ProductInput| -> std::borrow::Cow<'_, [f32]> {
            let data = value(x.x).f32s();
            match x.input_scale {
                None => std::borrow::Cow::Borrowed(data),
                Some(s) => {
                    let factors = value(s).f32s();
                    let scaled = data
                        .chunks_exact(factors.len())
                        .flat_map(|row| row.iter().zip(factors).map(|(v, f)| v * f))
                        .collect();
                    std::borrow::Cow::Owned(scaled)
                }
            }
        };
        let rows = |x: &[f32], j: &Job| x.len() / self.matrices[j.node].as_ref().unwrap().shape().1;
        match step {
            Step::Node(i) | Step::Attention(i) => {
                let node = &graph.nodes[*i];
                let args: Vec<&Tensor> = node.inputs.iter().map(|&id| value(id)).collect();
                let out = match (step, &node.op) {
                    (Step::Attention(_), Op::Attention(op)) => {
                        let (mask, cache_len) = (node.inputs[5], args[3].shape()[2]);
                        let runs = match masks.iter().position(|m| m.0 == mask && m.1 == cache_len)
                        {
                            Some(at) => Ok(&masks[at].2),
                            None => attention::mask_runs(args[5], cache_len).map(|runs| {
                                masks.push((mask, cache_len, runs));
                                &masks[masks.len() - 1].2
                            }),
                        };
                        runs.map(|runs| attention::attention(op, &args, runs))
                    }
                    _ => node.op.eval(&args),
                };
                let out = out.map_err(|source| InterpError::Kernel {
                    node: node.name.clone(),
                    op: node.op.name(),
                    source,
                })?;
                Ok(vec![(node.output, out)])
            }
            Step::Int8Linear(i) => {
                let node = &graph.nodes[*i];
                let Op::QuantLinear(op) = &node.op else {
                    unreachable!("only QuantLinear runs on an int8 matrix")
                };
                let at = op.slots();
                let x = input(&plan::ProductInput {
                    x: node.inputs[at.x],
                    input_scale: at.input_scale.map(|s| node.inputs[s]),
                });
                let matrix = self.int8[*i].as_deref().expect("planned with its matrix");
                let mut out = matrix.matmul(&x, x.len() / matrix.shape().1);
                if let Some(b) = at.bias {
                    let bias = value(node.inputs[b]).f32s();
                    for row in out.chunks_exact_mut(bias.len()) {
                        for (y, b) in row.iter_mut().zip(bias) {
                            *y += b;
                        }
                    }
                }
                Ok(vec![tensor(node.output, out)])
            }
            Step::Linears { x, jobs } => {
                let x = input(x);
                let specs: Vec<_> = jobs.iter().map(job).collect();
                let outs = linalg::linear_group(&x, rows(&x, &jobs[0]), &specs);
                Ok(jobs
                    .iter()
                    .zip(outs)
                    .map(|(j, out)| tensor(j.output, out))
                    .collect())
            }
            Step::GatedMlp {
                x,
                gate,
                up,
                output,
            } => {
                let x = input(x);
                let out = linalg::linear_swiglu(&x, rows(&x, gate), job(gate), job(up));
                Ok(vec![tensor(*output, out)])
            }
        }
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

    /// A layer's shape: q/k/v projections of one input (v with a bias), a
    /// residual add, a gated MLP and a second residual add.
    fn layer_and_weights() -> (Graph, WeightStore) {
        use crate::ir::ops::{Concat, SwiGlu};
        let (d, f) = (8, 12);
        let mut store = WeightStore::default();
        let mut seed = 1u32;
        let mut random = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        for (name, shape) in [
            ("q", vec![d, d]),
            ("k", vec![4, d]),
            ("v", vec![4, d]),
            ("v.bias", vec![4]),
            ("o", vec![d, d + 8]),
            ("gate", vec![f, d]),
            ("up", vec![f, d]),
            ("down", vec![d, f]),
        ] {
            let len = shape.iter().product();
            store.insert_f32(name, shape, random(len));
        }
        let mut b = GraphBuilder::new("layer");
        let x = b.input("x", TensorType::f32([1, 3, d]));
        let mut w = |name: &str, shape: Vec<usize>| b.weight(name, TensorType::f32(shape));
        let (wq, wk, wv, bv) = (
            w("q", vec![d, d]),
            w("k", vec![4, d]),
            w("v", vec![4, d]),
            w("v.bias", vec![4]),
        );
        let (wo, wg, wu, wd) = (
            w("o", vec![d, d + 8]),
            w("gate", vec![f, d]),
            w("up", vec![f, d]),
            w("down", vec![d, f]),
        );
        let q = b.node("q_proj", Linear, &[x, wq]).unwrap();
        let k = b.node("k_proj", Linear, &[x, wk]).unwrap();
        let v = b.node("v_proj", Linear, &[x, wv, bv]).unwrap();
        let qkv = b.node("qkv", Concat { axis: 2 }, &[q, k, v]).unwrap();
        let o = b.node("o_proj", Linear, &[qkv, wo]).unwrap();
        let h = b.node("attn_residual", Add, &[x, o]).unwrap();
        let g = b.node("gate_proj", Linear, &[h, wg]).unwrap();
        let u = b.node("up_proj", Linear, &[h, wu]).unwrap();
        let a = b.node("gated", SwiGlu, &[g, u]).unwrap();
        let dn = b.node("down_proj", Linear, &[a, wd]).unwrap();
        let y = b.node("mlp_residual", Add, &[dn, h]).unwrap();
        b.output(y, "y");
        b.output(k, "k_new");
        (b.finish().unwrap(), store)
    }

    /// The graph evaluated node by node with each op's own `eval` (the
    /// reference semantics), weights read plainly from the store.
    fn reference_run(graph: &Graph, store: &WeightStore, inputs: &[(&str, Tensor)]) -> Vec<Tensor> {
        let mut slots: Vec<Option<Tensor>> = vec![None; graph.values.len()];
        for (id, name) in graph.weights() {
            slots[id.index()] = Some(store.to_tensor(name).unwrap());
        }
        for (name, t) in inputs {
            slots[graph.input(name).unwrap().index()] = Some(t.clone());
        }
        for node in &graph.nodes {
            let args: Vec<&Tensor> = node
                .inputs
                .iter()
                .map(|i| slots[i.index()].as_ref().unwrap())
                .collect();
            slots[node.output.index()] = Some(node.op.eval(&args).unwrap());
        }
        graph
            .outputs
            .iter()
            .map(|o| slots[o.index()].clone().unwrap())
            .collect()
    }

    #[test]
    fn quantized_layers_run_fused_with_the_reference_bits() {
        use crate::ir::ops::QuantLinear;
        use crate::ir::quant::{quantize, ActivationQuant, WeightQuant};
        let (mut graph, mut store) = layer_and_weights();
        // Every Linear quantized: int4 with mins (k = 8 is one partial group
        // of 32), int8 per channel for the MLP's down projection, and w8a8
        // for the output projection.
        for index in 0..graph.nodes.len() {
            let node = graph.nodes[index].clone();
            if !matches!(node.op, Op::Linear(_)) {
                continue;
            }
            let w = graph.value(node.inputs[1]).name.clone();
            let t = store.to_f32_tensor(&w).unwrap();
            let (n, k) = (t.shape()[0], t.shape()[1]);
            let (scheme, activations) = match node.name.as_str() {
                "down_proj" => (
                    WeightQuant {
                        bits: 8,
                        group_size: k,
                        offset: false,
                    },
                    ActivationQuant::None,
                ),
                "o_proj" => (
                    WeightQuant {
                        bits: 8,
                        group_size: k,
                        offset: false,
                    },
                    ActivationQuant::DynamicInt8PerToken,
                ),
                _ => (
                    WeightQuant {
                        bits: 4,
                        group_size: 32,
                        offset: true,
                    },
                    ActivationQuant::None,
                ),
            };
            let q = quantize(t.f32s(), n, k, scheme).unwrap();
            let names = store.insert_quantized(&node.name, q);
            let mut inputs = vec![node.inputs[0]];
            for name in [Some(&names.q), Some(&names.scale), names.min.as_ref()]
                .into_iter()
                .flatten()
            {
                let ty = store.tensor_type(name).unwrap();
                inputs.push(graph.add_weight(name, ty));
            }
            inputs.extend(node.inputs.get(2));
            let node = &mut graph.nodes[index];
            node.op = Op::QuantLinear(QuantLinear {
                weights: scheme,
                activations,
                input_scale: false,
                bias: node.inputs.len() == 3,
            });
            node.inputs = inputs;
        }
        graph.validate().unwrap();
        let interp = Interpreter::new(graph.clone(), &store, &mut F32Weights::default()).unwrap();
        let names: Vec<&str> = interp
            .fused
            .steps
            .iter()
            .map(|s| s.profile_name(&interp.graph))
            .collect();
        assert_eq!(
            names,
            [
                "Linear",
                "Concat",
                "QuantLinear(int8)",
                "Add",
                "Linear+SwiGlu",
                "Linear+Add"
            ]
        );
        let x = Tensor::from_f32(
            [1, 3, 8],
            (0..24).map(|i| (i as f32 * 0.37).sin()).collect(),
        );
        let fused = interp.run(&[("x", x.clone())]).unwrap();
        let reference = reference_run(&graph, &store, &[("x", x)]);
        for (a, b) in fused.iter().zip(&reference) {
            assert_eq!(a.shape(), b.shape());
            if linalg::kernels_fuse_multiply_add() {
                assert_eq!(
                    a.f32s(),
                    b.f32s(),
                    "fused kernels and op references disagree"
                );
            } else {
                // The portable kernel rounds each product before the add.
                for (p, q) in a.f32s().iter().zip(b.f32s()) {
                    assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{p} vs {q}");
                }
            }
        }
    }

    #[test]
    fn fused_steps_compute_what_the_nodes_compute() {
        let (graph, store) = layer_and_weights();
        let interp = Interpreter::new(graph, &store, &mut F32Weights::default()).unwrap();
        let names: Vec<&str> = interp
            .fused
            .steps
            .iter()
            .map(|s| s.profile_name(&interp.graph))
            .collect();
        assert_eq!(
            names,
            [
                "Linear",
                "Concat",
                "Linear+Add",
                "Linear+SwiGlu",
                "Linear+Add"
            ]
        );
        let x = Tensor::from_f32(
            [1, 3, 8],
            (0..24).map(|i| (i as f32 * 0.37).sin()).collect(),
        );
        let fused = interp.run(&[("x", x.clone())]).unwrap();
        // A tap makes the run go node by node.
        let (plain, taps) = interp.run_with_taps(&[("x", x)], &["gated"]).unwrap();
        assert_eq!(taps.len(), 1);
        for (a, b) in fused.iter().zip(&plain) {
            assert_eq!(a.shape(), b.shape());
            assert_eq!(a.f32s(), b.f32s());
        }
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
