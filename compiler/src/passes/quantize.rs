//! Weight quantization: every `Linear` whose weight is a float tensor of
//! the store becomes a `QuantLinear` over quantized tensors the pass adds to
//! the store (`<layer>.qweight`, `<layer>.scales`, `<layer>.mins`), by
//! round-to-nearest (see [`kiln_runtime::ir::quant::quantize`]). Both graphs
//! of a model read the same tensors, so each weight is quantized once.
//!
//! Layers whose name matches a `skip` pattern keep their float weights; the
//! LM head is skipped by default (it reads the tied embedding in small
//! models, and it is the layer whose error every token sees).

use kiln_runtime::diff::dump::glob_matches;
use kiln_runtime::ir::ops::QuantLinear;
use kiln_runtime::ir::quant::{quantize, ActivationQuant, WeightQuant};
use kiln_runtime::ir::{Graph, ModelIr, Op, ValueSource};
use kiln_runtime::weights::{QuantTensors, WeightError, WeightStore};
use std::collections::BTreeMap;

/// A quantization scheme as the command line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// int8 weights, one scale per output channel; f32 activations.
    W8A16,
    /// int4 weights in groups along K; f32 activations.
    W4A16 { group_size: usize, asymmetric: bool },
    /// int8 per-channel weights and dynamic per-token int8 activations.
    W8A8,
}

impl Scheme {
    /// The weight format for a layer with `k` input features.
    pub fn weights(self, k: usize) -> WeightQuant {
        match self {
            Scheme::W8A16 | Scheme::W8A8 => WeightQuant {
                bits: 8,
                group_size: k,
                offset: false,
            },
            Scheme::W4A16 {
                group_size,
                asymmetric,
            } => WeightQuant {
                bits: 4,
                group_size: group_size.min(k),
                offset: asymmetric,
            },
        }
    }

    fn activations(self) -> ActivationQuant {
        match self {
            Scheme::W8A8 => ActivationQuant::DynamicInt8PerToken,
            _ => ActivationQuant::None,
        }
    }

    pub fn name(self) -> String {
        match self {
            Scheme::W8A16 => "w8a16".into(),
            Scheme::W8A8 => "w8a8".into(),
            Scheme::W4A16 {
                group_size,
                asymmetric,
            } => format!(
                "w4a16 g{group_size}{}",
                if asymmetric { " asym" } else { "" }
            ),
        }
    }
}

/// Group sizes `w4a16` takes: multiples of the 32-weight blocks that GGUF,
/// ONNX Runtime's and Ascend's int4 kernels work in.
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// The LM head keeps its float weights unless asked otherwise.
pub const DEFAULT_SKIP: &str = "lm_head";

#[derive(Clone, Debug)]
pub struct QuantOptions {
    pub scheme: Scheme,
    /// Glob patterns (`*`, `?`) over layer names, e.g. `model.layers.*.mlp.down_proj`.
    pub skip: Vec<String>,
    /// Weight adjustments from calibration text, made before quantizing.
    pub calibration: Option<CalibrationOptions>,
}

/// What calibration text is used for (see [`crate::calibrate`]).
#[derive(Clone, Debug, PartialEq)]
pub struct CalibrationOptions {
    pub text: std::path::PathBuf,
    /// SmoothQuant's migration strength α (`w8a8`); `None` or 0 migrates nothing.
    pub smooth_alpha: Option<f32>,
    /// AWQ's scale and clipping searches (`w8a16`, `w4a16`).
    pub awq: bool,
}

impl CalibrationOptions {
    /// What the calibration adjusts, if anything: `awq`, `smoothquant α=0.5`.
    pub fn method(&self) -> Option<String> {
        match (self.smooth_alpha, self.awq) {
            (Some(alpha), _) if alpha > 0.0 => Some(format!("smoothquant α={alpha}")),
            (_, true) => Some("awq".into()),
            _ => None,
        }
    }
}

/// SmoothQuant's α when `--calib-text` is given for `w8a8` without `--smooth-alpha`.
pub const DEFAULT_SMOOTH_ALPHA: f32 = 0.5;

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("--group-size {0}: w4a16 groups must be 32, 64 or 128 weights")]
    GroupSize(usize),
    #[error("{layer} cannot be quantized as {scheme}: {why}")]
    Layer {
        layer: String,
        scheme: String,
        why: String,
    },
    #[error("--quant-skip `{0}` matches no layer of the model (the layers are named like `model.layers.0.mlp.down_proj`; `kiln inspect MODEL --ir` lists them)")]
    SkipMatchesNothing(String),
    #[error("{0}")]
    Calibration(String),
    #[error(transparent)]
    Weights(#[from] WeightError),
}

/// What the pass did, for the compile summary and reports.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct QuantSummary {
    /// Layers quantized, by the format of their weights.
    pub layers: BTreeMap<String, usize>,
    /// Layers kept in float, by name.
    pub skipped: Vec<String>,
    /// Weight bytes of the quantized layers before and after.
    pub float_bytes: u64,
    pub quantized_bytes: u64,
    /// What calibration did first, when asked.
    pub calibration: Option<CalibrationSummary>,
}

/// What the calibration-driven adjustments did.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct CalibrationSummary {
    pub text: String,
    pub tokens: usize,
    /// `smoothquant α=0.5`, `awq`.
    pub method: String,
    /// Groups of Linears whose input channels were rescaled.
    pub rescaled_groups: usize,
    /// Over the searched layers, the sampled output error of the adjusted
    /// weights relative to round-to-nearest's (AWQ; 1 means no gain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_error_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_error_ratio: Option<f64>,
    /// Groups whose range the clip search shrank, of all searched.
    pub clipped_groups: usize,
    pub searched_groups: usize,
}

impl QuantSummary {
    /// One line: `int4 g128: 210 layers; kept in float: lm_head`.
    pub fn describe(&self) -> String {
        let layers: Vec<String> = self
            .layers
            .iter()
            .map(|(format, n)| format!("{format}: {n} layers"))
            .collect();
        let kept = match self.skipped.is_empty() {
            true => "nothing".to_string(),
            false => self.skipped.join(", "),
        };
        let mut line = format!("{}; kept in float: {kept}", layers.join(", "));
        if let Some(c) = &self.calibration {
            line += &format!(
                "; {} from {} tokens of {}: {} input scalings",
                c.method, c.tokens, c.text, c.rescaled_groups
            );
            if let Some(r) = c.scale_error_ratio {
                line += &format!(" (output error ×{r:.3} of round-to-nearest's)");
            }
            if let Some(r) = c.clip_error_ratio {
                line += &format!(
                    ", {} of {} groups clipped (×{r:.3})",
                    c.clipped_groups, c.searched_groups
                );
            }
        }
        line
    }
}

impl QuantOptions {
    /// Plain round-to-nearest under `scheme`, the LM head kept in float.
    pub fn new(scheme: Scheme) -> QuantOptions {
        QuantOptions {
            scheme,
            skip: vec![DEFAULT_SKIP.to_string()],
            calibration: None,
        }
    }

    pub fn check(&self) -> Result<(), QuantError> {
        if let Scheme::W4A16 { group_size, .. } = self.scheme {
            if !GROUP_SIZES.contains(&group_size) {
                return Err(QuantError::GroupSize(group_size));
            }
        }
        let Some(c) = &self.calibration else {
            return Ok(());
        };
        let refuse = |why: String| Err(QuantError::Calibration(why));
        let weight_only = self.scheme != Scheme::W8A8;
        if c.awq && !weight_only {
            return refuse(
                "--awq searches weight scales for the weight-only schemes (w8a16, w4a16); \
                 w8a8 migrates activation outliers with --smooth-alpha instead"
                    .into(),
            );
        }
        match c.smooth_alpha {
            Some(_) if weight_only => refuse(format!(
                "--smooth-alpha is SmoothQuant's, for w8a8's int8 activations; {} keeps its \
                 activations in float (use --awq to adjust its weights from the calibration text)",
                self.scheme.name()
            )),
            Some(a) if !(0.0..=1.0).contains(&a) => refuse(format!(
                "--smooth-alpha {a}: the migration strength must be between 0 and 1"
            )),
            _ => Ok(()),
        }
    }

    /// A name for reports: `w4a16 g128`, `w4a16 g128 awq`, `w8a8 smoothquant α=0.5`.
    pub fn name(&self) -> String {
        match self
            .calibration
            .as_ref()
            .and_then(CalibrationOptions::method)
        {
            Some(method) => format!("{} {method}", self.scheme.name()),
            None => self.scheme.name(),
        }
    }

    /// Whether `layer` stays in float (matches a `skip` pattern).
    pub fn skips(&self, layer: &str) -> bool {
        self.skip.iter().any(|p| glob_matches(p, layer))
    }
}

/// Quantizes the `Linear`s of both graphs; returns what it did.
pub fn quantize_model(
    ir: &mut ModelIr,
    store: &mut WeightStore,
    options: &QuantOptions,
) -> Result<QuantSummary, QuantError> {
    let mut graphs: Vec<&mut Graph> = ir.graphs.iter_mut().collect();
    quantize_graphs(&mut graphs, store, options)
}

/// Quantizes the `Linear`s of graphs over one store (a weight read by several
/// is quantized once); returns what it did, counting the first graph's layers.
pub fn quantize_graphs(
    graphs: &mut [&mut Graph],
    store: &mut WeightStore,
    options: &QuantOptions,
) -> Result<QuantSummary, QuantError> {
    options.check()?;
    let mut summary = QuantSummary::default();
    let mut done: BTreeMap<String, QuantTensors> = BTreeMap::new();
    let mut skip_used = vec![false; options.skip.len()];
    for (number, graph) in graphs.iter_mut().enumerate() {
        let graph: &mut Graph = graph;
        let first = number == 0;
        for index in 0..graph.nodes.len() {
            let node = &graph.nodes[index];
            if !matches!(node.op, Op::Linear(_)) {
                continue;
            }
            let weight_id = node.inputs[1];
            let ValueSource::Weight { tensor } = &graph.value(weight_id).source else {
                continue;
            };
            let (tensor, layer) = (tensor.clone(), node.name.clone());
            let skipped: Vec<usize> = (0..options.skip.len())
                .filter(|&i| glob_matches(&options.skip[i], &layer))
                .collect();
            if !skipped.is_empty() {
                for i in skipped {
                    skip_used[i] = true;
                }
                if first {
                    summary.skipped.push(layer);
                }
                continue;
            }
            let ty = graph.ty(weight_id).clone();
            let (n, k) = (ty.shape[0], ty.shape[1]);
            let scheme = options.scheme.weights(k);
            let fail = |why: String| QuantError::Layer {
                layer: layer.clone(),
                scheme: options.scheme.name(),
                why,
            };
            if scheme.bits == 4 && k % 2 != 0 {
                return Err(fail(format!(
                    "it has {k} input features; 4-bit weights pack two per byte and need an even number"
                )));
            }
            if !done.contains_key(&tensor) {
                let w = store.to_f32_tensor(&tensor)?;
                let q = quantize(w.f32s(), n, k, scheme)
                    .map_err(|why| fail(format!("weight `{tensor}`: {why}")))?;
                summary.float_bytes += ty.size_bytes() as u64;
                summary.quantized_bytes += (q.q.len() + 2 * (q.scale.len() + q.min.len())) as u64;
                let names = store.insert_quantized(&layer, q);
                *summary.layers.entry(scheme.describe(k)).or_default() += 1;
                done.insert(tensor.clone(), names);
            }
            rewrite(
                graph,
                index,
                &done[&tensor],
                options.scheme.activations(),
                store,
            )?;
        }
        crate::passes::dead_code::remove(graph);
        graph.validate().map_err(|e| QuantError::Layer {
            layer: graph.name.clone(),
            scheme: options.scheme.name(),
            why: e.to_string(),
        })?;
    }
    if let Some(unused) = skip_used.iter().position(|&used| !used) {
        return Err(QuantError::SkipMatchesNothing(options.skip[unused].clone()));
    }
    // Float weights no graph reads any more are dropped (GGUF weights and
    // converted checkpoints are held in memory; mapped files cost nothing).
    for name in done.keys() {
        let still_read = graphs.iter().any(|g| g.weights().any(|(_, t)| t == name));
        if !still_read {
            store.remove(name);
        }
    }
    Ok(summary)
}

/// Whether a graph reads quantized weights.
pub fn is_quantized(graph: &Graph) -> bool {
    graph
        .nodes
        .iter()
        .any(|n| matches!(n.op, Op::QuantLinear(_) | Op::QuantGather(_)))
}

/// A copy of `graph` with every `QuantLinear` a `Linear` and every
/// `QuantGather` a `Gather` over the f32 weights the quantized ones stand
/// for, which the store computes when they are read (nothing is held): for
/// backends that cannot keep low-bit weights. Activation quantization is
/// dropped with it. A dequantized weight takes the float weight's name
/// (`<layer>.weight` for `<layer>.qweight`) when the store has no such
/// tensor. `names` remembers the names given, across a model's graphs.
pub fn dequantized(
    graph: &Graph,
    store: &mut WeightStore,
    names: &mut BTreeMap<String, String>,
) -> Result<Graph, QuantError> {
    dequantized_except(graph, store, names, |_| false)
}

/// [`dequantized`] but for the nodes `keep` picks by index (those a backend
/// runs on the low-bit weights itself, such as a generated GEMV kernel).
pub fn dequantized_except(
    graph: &Graph,
    store: &mut WeightStore,
    names: &mut BTreeMap<String, String>,
    keep: impl Fn(usize) -> bool,
) -> Result<Graph, QuantError> {
    use kiln_runtime::ir::ops::{Gather, Linear};
    let mut out = graph.clone();
    for index in 0..out.nodes.len() {
        if keep(index) {
            continue;
        }
        let node = out.nodes[index].clone();
        let (scheme, q_slot, min_slot, rest): (WeightQuant, usize, Option<usize>, Vec<_>) =
            match &node.op {
                Op::QuantLinear(op) => {
                    let at = op.slots();
                    if at.input_scale.is_some() {
                        return Err(QuantError::Layer {
                            layer: node.name.clone(),
                            scheme: "dequantized for ATC".into(),
                            why: "its input scale cannot be folded yet".into(),
                        });
                    }
                    (
                        op.weights,
                        at.q,
                        at.min,
                        at.bias.map(|b| node.inputs[b]).into_iter().collect(),
                    )
                }
                Op::QuantGather(op) => {
                    let ids = node.inputs[node.inputs.len() - 1];
                    (op.weights, 0, op.weights.offset.then_some(2), vec![ids])
                }
                _ => continue,
            };
        let tensor = |slot: usize| match &out.value(node.inputs[slot]).source {
            ValueSource::Weight { tensor } => Ok(tensor.clone()),
            _ => Err(QuantError::Layer {
                layer: node.name.clone(),
                scheme: "dequantized for ATC".into(),
                why: "its quantized weights are not constants".into(),
            }),
        };
        let tensors = QuantTensors {
            scheme,
            q: tensor(q_slot)?,
            scale: tensor(q_slot + 1)?,
            min: min_slot.map(tensor).transpose()?,
        };
        let name = match names.get(&tensors.q) {
            Some(name) => name.clone(),
            None => {
                let name = match tensors.q.strip_suffix(".qweight") {
                    Some(prefix) if !store.contains(&format!("{prefix}.weight")) => {
                        format!("{prefix}.weight")
                    }
                    _ => format!("{}.dequantized", tensors.q),
                };
                store.insert_dequantized(&name, &tensors)?;
                names.insert(tensors.q.clone(), name.clone());
                name
            }
        };
        let w = out.add_weight(&name, store.tensor_type(&name)?);
        let node = &mut out.nodes[index];
        match node.op {
            Op::QuantLinear(_) => {
                node.op = Op::Linear(Linear);
                node.inputs = [node.inputs[0], w].into_iter().chain(rest).collect();
            }
            _ => {
                node.op = Op::Gather(Gather);
                node.inputs = [w].into_iter().chain(rest).collect();
            }
        }
    }
    crate::passes::dead_code::remove(&mut out);
    out.validate().map_err(|e| QuantError::Layer {
        layer: out.name.clone(),
        scheme: "dequantized for ATC".into(),
        why: e.to_string(),
    })?;
    Ok(out)
}

/// Turns `Linear(x, W[, b])` at `index` into `QuantLinear(x, q, scale[, min][, b])`.
pub fn rewrite(
    graph: &mut Graph,
    index: usize,
    tensors: &QuantTensors,
    activations: ActivationQuant,
    store: &WeightStore,
) -> Result<(), QuantError> {
    let mut add = |name: &str| -> Result<_, QuantError> {
        let ty = store.tensor_type(name)?;
        Ok(graph.add_weight(name, ty))
    };
    let q = add(&tensors.q)?;
    let scale = add(&tensors.scale)?;
    let min = tensors.min.as_deref().map(&mut add).transpose()?;
    let node = &mut graph.nodes[index];
    let bias = node.inputs.get(2).copied();
    let mut inputs = vec![node.inputs[0], q, scale];
    inputs.extend(min);
    inputs.extend(bias);
    node.op = Op::QuantLinear(QuantLinear {
        weights: tensors.scheme,
        activations,
        input_scale: false,
        bias: bias.is_some(),
    });
    node.inputs = inputs;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::ir::ops::Linear;
    use kiln_runtime::ir::{DType, GraphBuilder, KvCacheLayout, TensorType};

    fn model() -> (ModelIr, WeightStore) {
        let mut store = WeightStore::default();
        let w: Vec<f32> = (0..8 * 64)
            .map(|i| ((i * 37) % 23) as f32 / 11.0 - 1.0)
            .collect();
        store.insert_f32("a.weight", vec![8, 64], w.clone());
        store.insert_f32("lm_head.weight", vec![8, 64], w);
        let graph = |name: &str| {
            let mut b = GraphBuilder::new(name);
            let x = b.input("x", TensorType::f32([1, 64]));
            let wa = b.weight("a.weight", TensorType::f32([8, 64]));
            let wh = b.weight("lm_head.weight", TensorType::f32([8, 64]));
            let a = b.node("a", Linear, &[x, wa]).unwrap();
            let h = b.node("lm_head", Linear, &[x, wh]).unwrap();
            b.output(a, "a");
            b.output(h, "h");
            b.finish().unwrap()
        };
        let ir = ModelIr {
            format_version: kiln_runtime::ir::model::FORMAT_VERSION,
            info: kiln_runtime::ir::model::ModelInfo {
                architecture: "LlamaForCausalLM".into(),
                vocab_size: 8,
                hidden_size: 64,
                num_layers: 1,
                num_heads: 1,
                num_kv_heads: 1,
                head_dim: 64,
                weight_dtype: DType::F32,
                bos_token_id: None,
                eos_token_ids: vec![],
            },
            kv_cache: KvCacheLayout {
                layers: 1,
                kv_heads: 1,
                max_len: 4,
                head_dim: 64,
            },
            prefill_len: 1,
            graphs: vec![graph("prefill"), graph("decode")],
        };
        (ir, store)
    }

    #[test]
    fn rewrites_linears_once_for_both_graphs_and_skips_the_head() {
        let (mut ir, mut store) = model();
        let options = QuantOptions {
            scheme: Scheme::W4A16 {
                group_size: 32,
                asymmetric: true,
            },
            skip: vec![DEFAULT_SKIP.into()],
            calibration: None,
        };
        let summary = quantize_model(&mut ir, &mut store, &options).unwrap();
        assert_eq!(summary.skipped, ["lm_head"]);
        assert_eq!(summary.layers.get("int4 g32 asym"), Some(&1));
        for graph in ir.graphs() {
            let ops: Vec<&str> = graph.nodes.iter().map(|n| n.op.name()).collect();
            assert_eq!(ops, ["QuantLinear", "Linear"]);
        }
        assert!(!store.contains("a.weight"), "the float weight is dropped");
        assert_eq!(
            store.tensor_type("a.qweight").unwrap(),
            TensorType::new(DType::U4, [8, 64])
        );
        assert_eq!(
            store.tensor_type("a.mins").unwrap(),
            TensorType::new(DType::F16, [8, 2])
        );
    }

    #[test]
    fn bad_options_are_named() {
        let (mut ir, mut store) = model();
        let bad_group = QuantOptions {
            scheme: Scheme::W4A16 {
                group_size: 48,
                asymmetric: false,
            },
            skip: vec![],
            calibration: None,
        };
        let err = quantize_model(&mut ir, &mut store, &bad_group).unwrap_err();
        assert!(err.to_string().contains("--group-size 48"), "{err}");
        let bad_skip = QuantOptions {
            scheme: Scheme::W8A16,
            skip: vec!["model.layers.*.nothing".into()],
            calibration: None,
        };
        let err = quantize_model(&mut ir, &mut store, &bad_skip).unwrap_err();
        assert!(err.to_string().contains("matches no layer"), "{err}");
    }

    #[test]
    fn calibration_options_that_do_not_fit_the_scheme_are_named() {
        let with = |scheme: Scheme, smooth_alpha: Option<f32>, awq: bool| {
            let mut options = QuantOptions::new(scheme);
            options.calibration = Some(CalibrationOptions {
                text: "calib.txt".into(),
                smooth_alpha,
                awq,
            });
            options.check().err().map(|e| e.to_string())
        };
        let int4 = Scheme::W4A16 {
            group_size: 128,
            asymmetric: false,
        };
        assert_eq!(with(int4, None, true), None);
        assert_eq!(with(Scheme::W8A8, Some(0.5), false), None);
        let awq_w8a8 = with(Scheme::W8A8, None, true).unwrap();
        assert!(
            awq_w8a8.contains("--awq") && awq_w8a8.contains("--smooth-alpha"),
            "{awq_w8a8}"
        );
        let smooth_int4 = with(int4, Some(0.5), false).unwrap();
        assert!(
            smooth_int4.contains("w4a16 g128 keeps its activations"),
            "{smooth_int4}"
        );
        let alpha = with(Scheme::W8A8, Some(1.5), false).unwrap();
        assert!(alpha.contains("between 0 and 1"), "{alpha}");
        assert!(
            with(Scheme::W8A8, Some(f32::NAN), false).is_some(),
            "NaN is refused"
        );
    }
}
