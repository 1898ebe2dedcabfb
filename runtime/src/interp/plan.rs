//! The order in which the interpreter runs a graph: its nodes one by one,
//! except that every `Linear` (and weight-only `QuantLinear`) runs on its
//! packed matrix, and some are fused with their neighbours into one pass of
//! the packed kernels (see [`linalg::linear_group`]):
//!
//! - `Linear`s of the same input (a layer's q, k and v projections) run as
//!   one group: one parallel pass instead of one per product;
//! - `SwiGlu(Linear(x, G), Linear(x, U))` runs as one pass that applies
//!   the activation to each panel as it is computed, so the gate and up
//!   products are never stored;
//! - `Add(r, Linear(..))` adds the residual `r` as each value is stored;
//!
//! and `Attention` runs on the interpreter's own kernel.
//!
//! Each fused value is computed exactly as the nodes compute it, so a run
//! gives the same bits either way (taps run the plain node order).
//!
//! [`linalg::linear_group`]: super::linalg::linear_group

use crate::ir::quant::ActivationQuant;
use crate::ir::{Graph, Op, ValueId, ValueSource};

/// One `Linear` of a fused step: `output = x · Wᵀ (+ bias) (+ residual)`,
/// with `W` the packed matrix of node `node`.
#[derive(Debug)]
pub(super) struct Job {
    pub node: usize,
    pub bias: Option<ValueId>,
    pub residual: Option<ValueId>,
    pub output: ValueId,
}

/// What a packed product reads: `x`, scaled channel by channel by
/// `input_scale` first when a `QuantLinear` has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ProductInput {
    pub x: ValueId,
    pub input_scale: Option<ValueId>,
}

/// A `Linear` or `QuantLinear` node that runs on a packed matrix
/// (`has_matrix[node]`), as `(its input, a job computing its own output)`.
pub(super) fn packed_linear(
    graph: &Graph,
    has_matrix: &[bool],
    i: usize,
) -> Option<(ProductInput, Job)> {
    let node = &graph.nodes[i];
    if !has_matrix[i] {
        return None;
    }
    let (input_scale, bias) = match &node.op {
        Op::Linear(_) => (None, node.inputs.get(2).copied()),
        Op::QuantLinear(op) => {
            let at = op.slots();
            (
                at.input_scale.map(|s| node.inputs[s]),
                at.bias.map(|b| node.inputs[b]),
            )
        }
        _ => return None,
    };
    let job = Job {
        node: i,
        bias,
        residual: None,
        output: node.output,
    };
    Some((
        ProductInput {
            x: node.inputs[0],
            input_scale,
        },
        job,
    ))
}

/// Whether node `i` can run on a packed matrix: a `Linear` or a weight-only
/// `QuantLinear` whose weight tensors are graph weights.
pub(super) fn int8_packable(graph: &Graph, i: usize) -> bool {
    let node = &graph.nodes[i];
    matches!(&node.op, Op::QuantLinear(op)
        if op.activations == ActivationQuant::DynamicInt8PerToken
            && [1, 2].iter().all(|&s| matches!(graph.value(node.inputs[s]).source, ValueSource::Weight { .. })))
}

pub(super) fn packable(graph: &Graph, i: usize) -> bool {
    let node = &graph.nodes[i];
    let is_weight = |v: ValueId| matches!(graph.value(v).source, ValueSource::Weight { .. });
    match &node.op {
        Op::Linear(_) => is_weight(node.inputs[1]),
        Op::QuantLinear(op) if op.activations == ActivationQuant::None => {
            let at = op.slots();
            [Some(at.q), Some(at.scale), at.min]
                .into_iter()
                .flatten()
                .all(|slot| is_weight(node.inputs[slot]))
        }
        _ => false,
    }
}

#[derive(Debug)]
pub(super) enum Step {
    /// One node, run by its op.
    Node(usize),
    /// An `Attention` node, run by the interpreter's own kernel (the same
    /// bits as the op's evaluation; see `super::attention`).
    Attention(usize),
    /// A `QuantLinear` with int8 activations, on its [`linalg::Int8Matrix`].
    Int8Linear(usize),
    /// `Linear`s of the same input `x`, in one pass.
    Linears { x: ProductInput, jobs: Vec<Job> },
    /// `output = SwiGlu(Linear(x, gate), Linear(x, up))`.
    GatedMlp {
        x: ProductInput,
        gate: Job,
        up: Job,
        output: ValueId,
    },
}

impl Step {
    /// The values the step reads.
    pub fn inputs<'a>(&'a self, graph: &'a Graph) -> Vec<ValueId> {
        let job_inputs = |j: &Job| [j.bias, j.residual];
        let x_inputs = |x: &ProductInput| [Some(x.x), x.input_scale];
        match self {
            Step::Node(i) | Step::Attention(i) | Step::Int8Linear(i) => {
                graph.nodes[*i].inputs.clone()
            }
            Step::Linears { x, jobs } => x_inputs(x)
                .into_iter()
                .chain(jobs.iter().flat_map(job_inputs))
                .flatten()
                .collect(),
            Step::GatedMlp { x, gate, up, .. } => x_inputs(x)
                .into_iter()
                .chain(job_inputs(gate))
                .chain(job_inputs(up))
                .flatten()
                .collect(),
        }
    }

    /// The name the profile lists the step under.
    pub fn profile_name(&self, graph: &Graph) -> &'static str {
        match self {
            Step::Node(i) | Step::Attention(i) => graph.nodes[*i].op.name(),
            Step::Int8Linear(_) => "QuantLinear(int8)",
            Step::Linears { jobs, .. } if jobs.iter().any(|j| j.residual.is_some()) => "Linear+Add",
            Step::Linears { .. } => "Linear",
            Step::GatedMlp { .. } => "Linear+SwiGlu",
        }
    }
}

/// The step for node `i` when no fusion takes it.
fn node_step(graph: &Graph, i: usize) -> Step {
    match graph.nodes[i].op {
        Op::Attention(_) => Step::Attention(i),
        _ if int8_packable(graph, i) => Step::Int8Linear(i),
        _ => Step::Node(i),
    }
}

/// The steps that run `graph` node by node, each packed `Linear` a step
/// of its own (for runs that capture the values between nodes).
pub(super) fn unfused(graph: &Graph, has_matrix: &[bool]) -> Vec<Step> {
    (0..graph.nodes.len())
        .map(|i| match packed_linear(graph, has_matrix, i) {
            Some((x, job)) => Step::Linears { x, jobs: vec![job] },
            None => node_step(graph, i),
        })
        .collect()
}

/// The steps that run `graph`. `has_matrix[node]` tells whether a `Linear`
/// node runs on a packed matrix (only those are fused).
pub(super) fn plan(graph: &Graph, has_matrix: &[bool]) -> Vec<Step> {
    let nodes = &graph.nodes;
    let mut uses = vec![0usize; graph.values.len()];
    let mut consumer = vec![None; graph.values.len()];
    for (i, node) in nodes.iter().enumerate() {
        for &input in &node.inputs {
            uses[input.index()] += 1;
            consumer[input.index()] = Some(i);
        }
    }
    for &out in &graph.outputs {
        uses[out.index()] += 1;
    }
    // The node computing each value (`None` for inputs and weights).
    let mut producer = vec![None; graph.values.len()];
    for (i, node) in nodes.iter().enumerate() {
        producer[node.output.index()] = Some(i);
    }
    // A Linear on a packed weight, as (x, job computing its own output).
    let linear = |i: usize| packed_linear(graph, has_matrix, i);
    // The weight shape of a packed Linear: `[n, k]`.
    let weight_shape = |job: &Job| &graph.ty(nodes[job.node].inputs[1]).shape;
    // The single node reading value `v`, if nothing else does.
    let sole_consumer = |v: ValueId| {
        (uses[v.index()] == 1)
            .then(|| consumer[v.index()])
            .flatten()
    };

    // Fused steps that replace a later node (the SwiGlu or the Add): they
    // run where that node ran, when everything they read exists.
    let mut replaces: Vec<Option<Step>> = (0..nodes.len()).map(|_| None).collect();
    let mut absorbed = vec![false; nodes.len()];
    for i in 0..nodes.len() {
        let Some((x, job)) = linear(i) else { continue };
        let Some(c) = sole_consumer(job.output).filter(|&c| !absorbed[c]) else {
            continue;
        };
        let after = &nodes[c];
        match &after.op {
            Op::SwiGlu(_) if after.inputs[0] == job.output => {
                let up = after.inputs[1];
                let Some(u) = producer[up.index()].filter(|&u| !absorbed[u] && u != i) else {
                    continue;
                };
                let Some((ux, up_job)) = linear(u) else {
                    continue;
                };
                let same_shape = weight_shape(&job) == weight_shape(&up_job);
                if ux != x || !same_shape || sole_consumer(up) != Some(c) {
                    continue;
                }
                absorbed[i] = true;
                absorbed[u] = true;
                replaces[c] = Some(Step::GatedMlp {
                    x,
                    gate: job,
                    up: up_job,
                    output: after.output,
                });
            }
            Op::Add(_) => {
                let [a, b] = after.inputs[..] else { continue };
                let residual = if a == job.output { b } else { a };
                let ty = graph.ty(job.output);
                if residual == job.output
                    || graph.ty(residual) != ty
                    || graph.ty(after.output) != ty
                {
                    continue;
                }
                absorbed[i] = true;
                replaces[c] = Some(Step::Linears {
                    x,
                    jobs: vec![Job {
                        residual: Some(residual),
                        output: after.output,
                        ..job
                    }],
                });
            }
            _ => {}
        }
    }

    // Whether value `v` exists before node `i` runs.
    let ready_before = |v: ValueId, i: usize| match graph.value(v).source {
        ValueSource::Input | ValueSource::Weight { .. } => true,
        _ => producer[v.index()].is_some_and(|p| p < i),
    };
    let mut steps = Vec::new();
    for i in 0..nodes.len() {
        if let Some(step) = replaces[i].take() {
            steps.push(step);
            continue;
        }
        if absorbed[i] {
            continue;
        }
        let Some((x, job)) = linear(i) else {
            steps.push(node_step(graph, i));
            continue;
        };
        // Later Linears of the same x join this one's pass when their bias
        // (if any) already exists here.
        let mut jobs = vec![job];
        for j in i + 1..nodes.len() {
            if absorbed[j] || replaces[j].is_some() {
                continue;
            }
            if let Some((xj, other)) = linear(j) {
                if xj == x && other.bias.is_none_or(|b| ready_before(b, i)) {
                    absorbed[j] = true;
                    jobs.push(other);
                }
            }
        }
        steps.push(Step::Linears { x, jobs });
    }
    steps
}
