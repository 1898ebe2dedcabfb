//! Per-channel rescaling of a Linear's input before quantization:
//! `x·Wᵀ = (x / s)·(W·diag(s))ᵀ`, exact in real arithmetic, with the `1 / s`
//! folded into the op that makes `x`, so the graphs do not change — only
//! weights of the store do. What `s` is for depends on the scheme:
//!
//! - SmoothQuant (`w8a8`): moves activation outliers into the weights,
//!   `s_j = max|x_j|^α / max|w_j|^(1−α)`, so per-token int8 loses less on
//!   the few channels that would otherwise set every token's scale.
//! - AWQ (`w4a16`, `w8a16`): scales up the input channels that carry the
//!   most activation, searched to minimize the layer's output error (see
//!   [`super::awq`]).
//!
//! `x` can absorb `1 / s` where it is made by an `RmsNorm` (its weight is
//! divided: `q/k/v` and `gate/up` share theirs, so they share one `s`) or by
//! a `SwiGlu`, which is linear in `up` (the rows of `up_proj` are divided:
//! `down_proj`). Other inputs (`o_proj`, after attention) keep `s = 1`.

use kiln_runtime::ir::{Graph, Op, ValueId, ValueSource};
use kiln_runtime::weights::{WeightError, WeightStore};
use std::collections::BTreeMap;

/// Statistics of one Linear input's channels over calibration text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChannelStats {
    /// Input features.
    pub k: usize,
    /// Tokens seen.
    pub tokens: usize,
    /// `max |x_j|` over every token.
    pub absmax: Vec<f32>,
    /// `mean |x_j|` over every token.
    pub mean_abs: Vec<f32>,
    /// `mean x_j²` over every token.
    pub mean_sq: Vec<f32>,
    /// Some of the tokens' rows, `[sample_rows, k]`, spread over the text:
    /// what the searches measure output errors on.
    pub sample: Vec<f32>,
}

impl ChannelStats {
    pub fn sample_rows(&self) -> usize {
        self.sample.len().checked_div(self.k).unwrap_or(0)
    }
}

/// A Linear that reads a group's input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumer {
    pub layer: String,
    pub weight: String,
}

/// Where a group's `1 / s` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Absorber {
    /// An `RmsNorm`'s weight: `g_j / s_j`.
    NormWeight(String),
    /// The Linear that feeds a `SwiGlu`'s `up`: row `j` (and bias `j`) over `s_j`.
    Rows {
        layer: String,
        weight: String,
        bias: Option<String>,
    },
}

/// Linears that read one value and can share one input scale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleGroup {
    /// The IR value they read: what calibration taps.
    pub input: String,
    pub consumers: Vec<Consumer>,
    pub absorber: Absorber,
}

/// The groups of `graph` whose input can absorb a scale, over Linears that
/// `rescalable` accepts (those about to be quantized). A weight read by
/// anything else (a tied embedding, say) is never rescaled.
pub fn scale_groups(graph: &Graph, rescalable: impl Fn(&str) -> bool) -> Vec<ScaleGroup> {
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); graph.values.len()];
    for (index, node) in graph.nodes.iter().enumerate() {
        for &input in &node.inputs {
            readers[input.index()].push(index);
        }
    }
    let tensor_reads = tensor_reads(graph);
    let read_once = |id: ValueId| -> Option<String> {
        match &graph.value(id).source {
            ValueSource::Weight { tensor } if tensor_reads.get(tensor.as_str()) == Some(&1) => {
                Some(tensor.clone())
            }
            _ => None,
        }
    };
    let producer = |id: ValueId| graph.nodes.iter().position(|n| n.output == id);
    let mut groups = Vec::new();
    for node in &graph.nodes {
        let absorber = match &node.op {
            Op::RmsNorm(_) if node.inputs.len() == 2 => match read_once(node.inputs[1]) {
                Some(weight) => Absorber::NormWeight(weight),
                None => continue,
            },
            Op::SwiGlu(_) => {
                let up = node.inputs[1];
                let Some(up_node) = producer(up).map(|i| &graph.nodes[i]) else {
                    continue;
                };
                let only_this_reads_it = readers[up.index()].len() == 1;
                if !matches!(up_node.op, Op::Linear(_)) || !only_this_reads_it {
                    continue;
                }
                let (Some(weight), bias) = (
                    read_once(up_node.inputs[1]),
                    up_node.inputs.get(2).map(|&b| read_once(b)),
                ) else {
                    continue;
                };
                if bias == Some(None) || !rescalable(&up_node.name) {
                    continue;
                }
                Absorber::Rows {
                    layer: up_node.name.clone(),
                    weight,
                    bias: bias.flatten(),
                }
            }
            _ => continue,
        };
        let consumers: Option<Vec<Consumer>> = readers[node.output.index()]
            .iter()
            .map(|&i| {
                let reader = &graph.nodes[i];
                let is_x_only = reader.inputs[0] == node.output
                    && reader.inputs[1..].iter().all(|&v| v != node.output);
                match (&reader.op, is_x_only, rescalable(&reader.name)) {
                    (Op::Linear(_), true, true) => {
                        read_once(reader.inputs[1]).map(|weight| Consumer {
                            layer: reader.name.clone(),
                            weight,
                        })
                    }
                    _ => None,
                }
            })
            .collect();
        let is_output = graph.outputs.contains(&node.output);
        match consumers {
            Some(consumers) if !consumers.is_empty() && !is_output => groups.push(ScaleGroup {
                input: graph.value(node.output).name.clone(),
                consumers,
                absorber,
            }),
            _ => {}
        }
    }
    // Rows first: a `down_proj` group rescales `up_proj`, which its own
    // (`gate/up`) group then searches in its final form.
    groups.sort_by_key(|g| !matches!(g.absorber, Absorber::Rows { .. }));
    groups
}

/// How many node inputs of `graph` read each weight tensor (a tensor may
/// stand behind several values).
fn tensor_reads(graph: &Graph) -> BTreeMap<&str, usize> {
    let mut reads: BTreeMap<&str, usize> = BTreeMap::new();
    for node in &graph.nodes {
        for &input in &node.inputs {
            if let ValueSource::Weight { tensor } = &graph.value(input).source {
                *reads.entry(tensor).or_default() += 1;
            }
        }
    }
    reads
}

/// The Linears of `graph` that `rescalable` accepts and whose weight
/// nothing else reads: `(layer, input value, weight tensor)`.
pub fn linears(graph: &Graph, rescalable: impl Fn(&str) -> bool) -> Vec<(String, String, String)> {
    let tensor_reads = tensor_reads(graph);
    graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Linear(_)) && rescalable(&n.name))
        .filter_map(|n| match &graph.value(n.inputs[1]).source {
            ValueSource::Weight { tensor } if tensor_reads[tensor.as_str()] == 1 => Some((
                n.name.clone(),
                graph.value(n.inputs[0]).name.clone(),
                tensor.clone(),
            )),
            _ => None,
        })
        .collect()
}

/// A weight matrix `[n, k]` in f32, from the store.
pub fn matrix(store: &WeightStore, name: &str) -> Result<(Vec<f32>, usize, usize), WeightError> {
    let t = store.to_f32_tensor(name)?;
    let [n, k] = t.shape()[..] else {
        unreachable!("Linear weights are [N, K]: the type rule checked it")
    };
    Ok((t.into_f32_vec(), n, k))
}

/// Folds `s` into the group: every consumer's column `j` times `s_j`, the
/// absorber over `s_j`.
pub fn apply(store: &mut WeightStore, group: &ScaleGroup, s: &[f32]) -> Result<(), WeightError> {
    for consumer in &group.consumers {
        let (mut w, n, k) = matrix(store, &consumer.weight)?;
        assert_eq!(k, s.len(), "{} reads {k} features", consumer.layer);
        for row in w.chunks_exact_mut(k) {
            for (x, &sj) in row.iter_mut().zip(s) {
                *x *= sj;
            }
        }
        store.insert_f32(&consumer.weight, vec![n, k], w);
    }
    let divide_rows = |store: &mut WeightStore, name: &str| -> Result<(), WeightError> {
        let shape = store.tensor_type(name)?.shape;
        let mut w = store.to_f32_tensor(name)?.into_f32_vec();
        // `[n, k]` rows or a `[n]` vector, one entry of `s` per row.
        let per_row = w.len() / s.len();
        assert_eq!(per_row * s.len(), w.len(), "{name} has one row per scale");
        for (row, &sj) in w.chunks_exact_mut(per_row).zip(s) {
            for x in row {
                *x /= sj;
            }
        }
        store.insert_f32(name, shape, w);
        Ok(())
    };
    match &group.absorber {
        Absorber::NormWeight(weight) => divide_rows(store, weight)?,
        Absorber::Rows { weight, bias, .. } => {
            divide_rows(store, weight)?;
            if let Some(bias) = bias {
                divide_rows(store, bias)?;
            }
        }
    }
    Ok(())
}

/// Declares each weight of `graph` with the dtype the store now holds it in:
/// a rescaled bf16 or f16 weight is kept in f32 (rounding it back would undo
/// part of the equivalence).
pub fn sync_weight_types(graph: &mut Graph, store: &WeightStore) -> Result<(), WeightError> {
    for value in &mut graph.values {
        if let ValueSource::Weight { tensor } = &value.source {
            let stored = store.tensor_type(tensor)?;
            if stored.dtype != value.ty.dtype
                && stored.dtype.is_float()
                && value.ty.dtype.is_float()
            {
                value.ty.dtype = stored.dtype;
            }
        }
    }
    Ok(())
}

/// SmoothQuant's scales: `s_j = max|x_j|^α / max|w_j|^(1−α)`, where
/// `max|w_j|` is over every consumer's column `j`. Channels that never
/// carry a value (or whose weights are all zero) keep `s_j = 1`.
pub fn smoothquant_scales(x_absmax: &[f32], weights: &[(&[f32], usize)], alpha: f32) -> Vec<f32> {
    let k = x_absmax.len();
    let mut w_absmax = vec![0f32; k];
    for &(w, _n) in weights {
        for row in w.chunks_exact(k) {
            for (m, &x) in w_absmax.iter_mut().zip(row) {
                *m = m.max(x.abs());
            }
        }
    }
    x_absmax
        .iter()
        .zip(&w_absmax)
        .map(|(&x, &w)| {
            let s = x.powf(alpha) / w.powf(1.0 - alpha);
            match x > 0.0 && w > 0.0 && s.is_finite() {
                true => s.clamp(1e-5, 1e5),
                false => 1.0,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::{GraphOptions, HfModel, ShapeRequest};
    use kiln_runtime::interp::{F32Weights, Interpreter};
    use std::path::Path;

    fn fixture(name: &str) -> (HfModel, Graph) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models")
            .join(name);
        let mut model = HfModel::open(&dir).unwrap();
        let options = GraphOptions::resolve(&model.config, &ShapeRequest::default());
        let mut ir = model.build_ir(&options).unwrap();
        crate::passes::optimize(&mut ir).unwrap();
        (model, ir.take_graph("prefill").unwrap())
    }

    #[test]
    fn groups_of_a_decoder_layer() {
        let (_, graph) = fixture("qwen3");
        let groups = scale_groups(&graph, |layer| layer != "lm_head");
        let names = |g: &ScaleGroup| -> Vec<String> {
            g.consumers.iter().map(|c| c.layer.clone()).collect()
        };
        let layer0: Vec<&ScaleGroup> = groups
            .iter()
            .filter(|g| g.input.starts_with("model.layers.0."))
            .collect();
        assert_eq!(layer0.len(), 3, "{layer0:#?}");
        let p = "model.layers.0";
        assert_eq!(
            names(layer0[0]),
            [format!("{p}.mlp.down_proj")],
            "rows absorbers come first"
        );
        assert_eq!(
            layer0[0].absorber,
            Absorber::Rows {
                layer: format!("{p}.mlp.up_proj"),
                weight: format!("{p}.mlp.up_proj.weight"),
                bias: None
            }
        );
        let qkv = layer0
            .iter()
            .find(|g| g.input == format!("{p}.input_layernorm"))
            .unwrap();
        assert_eq!(
            names(qkv),
            ["q_proj", "k_proj", "v_proj"].map(|l| format!("{p}.self_attn.{l}"))
        );
        assert_eq!(
            qkv.absorber,
            Absorber::NormWeight(format!("{p}.input_layernorm.weight"))
        );
        // The final norm feeds lm_head, which is not rescalable; q_norm and
        // k_norm feed attention, not Linears.
        assert!(groups.iter().all(|g| g.input != "model.norm"));
        assert!(groups.iter().all(|g| !g.input.contains("q_norm")));
    }

    #[test]
    fn a_tied_head_is_never_rescaled() {
        let (_, graph) = fixture("llama-bf16-tied");
        let groups = scale_groups(&graph, |_| true);
        assert!(!groups.is_empty());
        for g in &groups {
            assert!(g.consumers.iter().all(|c| c.layer != "lm_head"), "{g:?}");
        }
    }

    /// Rescaling with any positive `s` leaves the model's logits as they
    /// were, to f32 rounding: the folding is an equivalence.
    #[test]
    fn rescaling_every_group_keeps_the_logits() {
        for name in ["qwen3", "llama-bf16-tied", "qwen2-old-config"] {
            let (mut model, mut graph) = fixture(name);
            let run = |graph: &Graph, store: &WeightStore| {
                let interp =
                    Interpreter::new(graph.clone(), store, &mut F32Weights::default()).unwrap();
                let inputs = crate::eval::window_inputs(graph, &[3, 1, 4, 1, 5]).unwrap();
                interp.run(&inputs).unwrap()[0].clone().into_f32_vec()
            };
            let before = run(&graph, &model.weights);
            let store = &mut model.weights;
            let groups = scale_groups(&graph, |layer| layer != "lm_head");
            assert!(groups.len() >= 4, "{name}: {} groups", groups.len());
            for (i, g) in groups.iter().enumerate() {
                let k = matrix(store, &g.consumers[0].weight).unwrap().2;
                let s: Vec<f32> = (0..k)
                    .map(|j| 0.25 + ((i * 7 + j * 13) % 17) as f32 / 4.0)
                    .collect();
                apply(store, g, &s).unwrap();
            }
            sync_weight_types(&mut graph, &model.weights).unwrap();
            let after = run(&graph, &model.weights);
            let scale = before.iter().fold(0f32, |m, x| m.max(x.abs()));
            // NaN-propagating: a NaN anywhere fails the bound.
            let diff = before
                .iter()
                .zip(&after)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, |m, d| {
                    if d.is_nan() || m.is_nan() {
                        f32::NAN
                    } else {
                        m.max(d)
                    }
                });
            assert!(
                diff <= 1e-4 * scale,
                "{name}: logits moved by {diff} (scale {scale})"
            );
            assert!(before != after, "{name}: the rescaling changed nothing");
        }
    }

    #[test]
    fn smoothquant_balances_activation_and_weight_maxima() {
        // Channel 0: activations 100× larger; channel 1: equal; channel 2: never active.
        let x = [100.0, 1.0, 0.0];
        let w = [0.5, 1.0, 2.0, 0.25, -2.0, 1.0];
        let s = smoothquant_scales(&x, &[(&w, 2)], 0.5);
        assert!((s[0] - (100f32 / 0.5).sqrt()).abs() < 1e-4, "{s:?}");
        assert!((s[1] - (1f32 / 2.0).sqrt()).abs() < 1e-6, "{s:?}");
        assert_eq!(s[2], 1.0);
        // After smoothing, both sides of channel 0 have the same maximum.
        assert!((x[0] / s[0] - 0.5 * s[0]).abs() < 1e-3);
        let nan = smoothquant_scales(&[f32::NAN], &[(&[1.0], 1)], 0.5);
        assert_eq!(nan, [1.0], "a NaN statistic leaves the channel alone");
    }
}
