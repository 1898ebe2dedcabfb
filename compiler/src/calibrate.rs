//! Calibration: statistics of every Linear input's channels, from running
//! the float model on the reference interpreter over a text (windows of
//! [`CALIBRATION_CTX`] tokens, each from position 0). SmoothQuant and the
//! AWQ search ([`crate::passes::smooth`], [`crate::passes::awq`]) read them.

use crate::eval::window_inputs;
use crate::frontend::decoder::LogitsOutput;
use crate::frontend::{FrontendError, GraphOptions, HfModel};
use crate::passes::awq::{search_clip, search_scales};
use crate::passes::quantize::{CalibrationOptions, CalibrationSummary, QuantOptions};
use crate::passes::smooth::{self, ChannelStats};
use kiln_runtime::interp::{F32Weights, InterpError, Interpreter};
use kiln_runtime::ir::{Graph, GraphLayout, IrError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Tokens per calibration window (fewer if the model's context is shorter).
pub const CALIBRATION_CTX: usize = 256;
/// Tokens of the text used at most: enough for stable channel maxima and
/// means on small models, while calibration stays a minute on a large one.
pub const MAX_CALIBRATION_TOKENS: usize = 4096;
/// Rows kept per input for the searches to measure output errors on.
pub const SAMPLE_ROWS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    #[error("cannot read the calibration text {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot tokenize the calibration text {path}: {why}")]
    Tokenize { path: PathBuf, why: String },
    #[error(
        "the calibration text {path} is too short: {tokens} tokens, and calibration needs at \
         least {needed} (one window of the calibration context); give a longer text \
         (a few thousand tokens of the kind of text the model will see)"
    )]
    TooShort {
        path: PathBuf,
        tokens: usize,
        needed: usize,
    },
    #[error(
        "calibration over {path}: the input of {value} holds {found} at token {token}; \
         the float model computes a non-finite value there"
    )]
    NonFinite {
        path: PathBuf,
        value: String,
        token: usize,
        found: f32,
    },
    #[error("calibration: the model has no value named {0} to measure")]
    UnknownValue(String),
    #[error("{layer}: {why}")]
    Search { layer: String, why: String },
    #[error(transparent)]
    Weights(#[from] kiln_runtime::weights::WeightError),
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Ir(#[from] IrError),
    #[error(transparent)]
    Interp(#[from] InterpError),
}

/// A calibration text, tokenized.
pub struct CalibrationText {
    pub path: PathBuf,
    pub tokens: Vec<u32>,
}

impl CalibrationText {
    /// Reads and tokenizes `path` with the model's tokenizer, as `kiln eval` does.
    pub fn read(model: &HfModel, path: &Path) -> Result<CalibrationText, CalibError> {
        let text = std::fs::read_to_string(path).map_err(|source| CalibError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let tokenize = |why: String| CalibError::Tokenize {
            path: path.to_path_buf(),
            why,
        };
        let tokenizer = model
            .tokenizer()
            .map_err(|why| tokenize(format!("the model has no tokenizer ({why})")))?;
        let tokens = tokenizer
            .encode(&text)
            .map_err(|e| tokenize(e.to_string()))?;
        Ok(CalibrationText {
            path: path.to_path_buf(),
            tokens,
        })
    }
}

/// What calibration measured.
pub struct Calibration {
    /// By IR value name (a Linear's input).
    pub stats: BTreeMap<String, ChannelStats>,
    /// The graph it ran: the structure the statistics' names refer to.
    pub graph: Graph,
    pub tokens: usize,
    pub windows: usize,
}

/// Tokens per calibration window for `model`.
pub fn calibration_ctx(model: &HfModel) -> usize {
    CALIBRATION_CTX.min(model.config.max_position_embeddings)
}

/// The graph calibration runs: `ctx` tokens from position 0, the default
/// passes applied (so value names match the graphs being compiled).
pub fn calibration_graph(model: &mut HfModel, ctx: usize) -> Result<Graph, CalibError> {
    let options = GraphOptions {
        prefill_len: ctx,
        max_seq_len: ctx,
        logits: LogitsOutput::Selected,
        layout: GraphLayout::Split,
    };
    let mut ir = model.build_ir(&options)?;
    let mut graph = ir
        .take_graph("prefill")
        .expect("split models have a prefill graph");
    crate::passes::optimize_graph(&mut graph)?;
    Ok(graph)
}

/// Runs the float model over `text` and measures the channels of each
/// value in `inputs`. `progress(window, windows)` hears of each window.
pub fn collect(
    model: &mut HfModel,
    text: &CalibrationText,
    inputs: impl Fn(&Graph) -> Vec<String>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Calibration, CalibError> {
    let ctx = calibration_ctx(model);
    let usable = text.tokens.len().min(MAX_CALIBRATION_TOKENS);
    let windows = usable / ctx;
    if windows == 0 {
        return Err(CalibError::TooShort {
            path: text.path.clone(),
            tokens: text.tokens.len(),
            needed: ctx,
        });
    }
    let graph = calibration_graph(model, ctx)?;
    let names = inputs(&graph);
    for name in &names {
        if !graph.values.iter().any(|v| &v.name == name) {
            return Err(CalibError::UnknownValue(name.clone()));
        }
    }
    let interpreter = Interpreter::new(graph.clone(), &model.weights, &mut F32Weights::default())?;
    let taps: Vec<&str> = names.iter().map(String::as_str).collect();
    // Every `stride`-th token of the whole run is kept as a sample row.
    let stride = (windows * ctx).div_ceil(SAMPLE_ROWS);
    // Per input: the statistics, and Σ|x| and Σx² in f64.
    type Sums = (ChannelStats, Vec<f64>, Vec<f64>);
    let mut sums: BTreeMap<String, Sums> = BTreeMap::new();
    for window in 0..windows {
        progress(window + 1, windows);
        let tokens = &text.tokens[window * ctx..(window + 1) * ctx];
        let run_inputs = window_inputs(&graph, tokens)?;
        let (_, tapped) = interpreter.run_with_taps(&run_inputs, &taps)?;
        for (name, tensor) in tapped {
            let k = *tensor.shape().last().expect("Linear inputs have rank ≥ 1");
            let (stats, sum_abs, sum_sq) = sums.entry(name.clone()).or_insert_with(|| {
                (
                    ChannelStats {
                        k,
                        absmax: vec![0.0; k],
                        ..Default::default()
                    },
                    vec![0.0; k],
                    vec![0.0; k],
                )
            });
            for (row_index, row) in tensor.f32s().chunks_exact(k).enumerate() {
                let token = window * ctx + row_index;
                if let Some(&found) = row.iter().find(|x| !x.is_finite()) {
                    return Err(CalibError::NonFinite {
                        path: text.path.clone(),
                        value: name,
                        token,
                        found,
                    });
                }
                for (j, &x) in row.iter().enumerate() {
                    stats.absmax[j] = stats.absmax[j].max(x.abs());
                    sum_abs[j] += x.abs() as f64;
                    sum_sq[j] += (x as f64) * (x as f64);
                }
                if token.is_multiple_of(stride) {
                    stats.sample.extend_from_slice(row);
                }
                stats.tokens += 1;
            }
        }
    }
    let stats = sums
        .into_iter()
        .map(|(name, (mut stats, sum_abs, sum_sq))| {
            let n = stats.tokens as f64;
            stats.mean_abs = sum_abs.iter().map(|&s| (s / n) as f32).collect();
            stats.mean_sq = sum_sq.iter().map(|&s| (s / n) as f32).collect();
            (name, stats)
        })
        .collect();
    Ok(Calibration {
        stats,
        graph,
        tokens: windows * ctx,
        windows,
    })
}

/// Calibrates `model` over the text `options` names and adjusts its float
/// weights as they ask — SmoothQuant's migration or AWQ's searches —
/// leaving them ready for round-to-nearest under `quant`.
pub fn adjust_weights(
    model: &mut HfModel,
    quant: &QuantOptions,
    options: &CalibrationOptions,
    mut progress: impl FnMut(&str),
) -> Result<CalibrationSummary, CalibError> {
    let text = CalibrationText::read(model, &options.text)?;
    let rescalable = |layer: &str| !quant.skips(layer);
    let shown = options.text.display().to_string();
    let calibration = collect(
        model,
        &text,
        |graph| {
            let mut inputs: Vec<String> = smooth::linears(graph, rescalable)
                .into_iter()
                .map(|(_, input, _)| input)
                .collect();
            inputs.sort();
            inputs.dedup();
            inputs
        },
        |window, windows| {
            progress(&format!(
                "calibrating over {shown}: window {window} of {windows}"
            ))
        },
    )?;
    let groups = smooth::scale_groups(&calibration.graph, rescalable);
    let store = &mut model.weights;
    let mut summary = CalibrationSummary {
        text: shown.clone(),
        tokens: calibration.tokens,
        method: options.method().unwrap_or_else(|| "statistics only".into()),
        ..Default::default()
    };
    let matrices = |store: &kiln_runtime::weights::WeightStore, group: &smooth::ScaleGroup| {
        group
            .consumers
            .iter()
            .map(|c| smooth::matrix(store, &c.weight).map(|(w, n, _)| (w, n)))
            .collect::<Result<Vec<_>, _>>()
    };
    let search_failed = |layer: &str| {
        let layer = layer.to_string();
        move |why: String| CalibError::Search { layer, why }
    };
    match (options.smooth_alpha, options.awq) {
        (Some(alpha), _) => {
            for group in groups.iter().filter(|_| alpha > 0.0) {
                let weights = matrices(store, group)?;
                let views: Vec<(&[f32], usize)> =
                    weights.iter().map(|(w, n)| (w.as_slice(), *n)).collect();
                let s = smooth::smoothquant_scales(
                    &calibration.stats[&group.input].absmax,
                    &views,
                    alpha,
                );
                smooth::apply(store, group, &s)?;
                summary.rescaled_groups += 1;
            }
        }
        (None, true) => {
            // The input each Linear sees after rescaling: x / s.
            let mut applied: BTreeMap<String, Vec<f32>> = BTreeMap::new();
            let (mut rtn, mut searched) = (0.0, 0.0);
            for (index, group) in groups.iter().enumerate() {
                progress(&format!(
                    "awq: searching input scales of {} ({} of {})",
                    group.input,
                    index + 1,
                    groups.len()
                ));
                let stats = &calibration.stats[&group.input];
                let weights = matrices(store, group)?;
                let views: Vec<(&[f32], usize)> =
                    weights.iter().map(|(w, n)| (w.as_slice(), *n)).collect();
                let found = search_scales(stats, &views, quant.scheme.weights(stats.k))
                    .map_err(search_failed(&group.consumers[0].layer))?;
                rtn += found.rtn_error;
                searched += found.error;
                if found.alpha > 0.0 {
                    smooth::apply(store, group, &found.scales)?;
                    summary.rescaled_groups += 1;
                    applied.insert(group.input.clone(), found.scales);
                }
            }
            summary.scale_error_ratio = (rtn > 0.0).then(|| searched / rtn);
            let (mut rtn, mut clipped) = (0.0, 0.0);
            let linears = smooth::linears(&calibration.graph, rescalable);
            for (index, (layer, input, weight)) in linears.iter().enumerate() {
                // As AWQ does: a query's or key's error reaches the output
                // through a softmax, which the output error does not see.
                if layer.ends_with("q_proj") || layer.ends_with("k_proj") {
                    continue;
                }
                progress(&format!(
                    "awq: searching clipping of {layer} ({} of {})",
                    index + 1,
                    linears.len()
                ));
                let mut stats = calibration.stats[input].clone();
                if let Some(s) = applied.get(input) {
                    stats
                        .mean_sq
                        .iter_mut()
                        .zip(s)
                        .for_each(|(m, s)| *m /= s * s);
                }
                let shape = store.tensor_type(weight)?.shape;
                let (mut w, _, k) = smooth::matrix(store, weight)?;
                let found = search_clip(&stats, &mut w, k, quant.scheme.weights(k))
                    .map_err(search_failed(layer))?;
                rtn += found.rtn_error;
                clipped += found.error;
                summary.clipped_groups += found.clipped_groups;
                summary.searched_groups += found.groups;
                store.insert_f32(weight, shape, w);
            }
            summary.clip_error_ratio = (rtn > 0.0).then(|| clipped / rtn);
        }
        (None, false) => {}
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> HfModel {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models")
            .join(name);
        HfModel::open(&dir).unwrap()
    }

    fn text(tokens: usize) -> CalibrationText {
        CalibrationText {
            path: PathBuf::from("calib.txt"),
            tokens: (0..tokens as u32).map(|i| (i * 37 + 11) % 300).collect(),
        }
    }

    fn linear_inputs(graph: &Graph) -> Vec<String> {
        let mut names: Vec<String> = graph
            .nodes
            .iter()
            .filter(|n| matches!(n.op, kiln_runtime::ir::Op::Linear(_)))
            .map(|n| graph.value(n.inputs[0]).name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn statistics_are_those_of_the_values_the_model_computes() {
        let mut model = fixture("qwen3");
        let ctx = CALIBRATION_CTX.min(model.config.max_position_embeddings);
        let text = text(2 * ctx + 5);
        let mut seen = Vec::new();
        let calibration =
            collect(&mut model, &text, linear_inputs, |w, n| seen.push((w, n))).unwrap();
        assert_eq!(
            seen,
            [(1, 2), (2, 2)],
            "the partial last window is left out"
        );
        assert_eq!(calibration.tokens, 2 * ctx);
        let name = "model.layers.1.post_attention_layernorm";
        let stats = &calibration.stats[name];
        // Recompute from the second window's tapped value directly.
        let interp = Interpreter::new(
            calibration.graph.clone(),
            &model.weights,
            &mut F32Weights::default(),
        )
        .unwrap();
        let mut absmax = vec![0f32; stats.k];
        let mut sum = vec![0f64; stats.k];
        let mut sum_sq = vec![0f64; stats.k];
        for w in 0..2 {
            let inputs =
                window_inputs(&calibration.graph, &text.tokens[w * ctx..(w + 1) * ctx]).unwrap();
            let (_, taps) = interp.run_with_taps(&inputs, &[name]).unwrap();
            for row in taps[0].1.f32s().chunks_exact(stats.k) {
                for j in 0..stats.k {
                    absmax[j] = absmax[j].max(row[j].abs());
                    sum[j] += row[j].abs() as f64;
                    sum_sq[j] += (row[j] as f64).powi(2);
                }
            }
        }
        assert_eq!(stats.absmax, absmax);
        let mean: Vec<f32> = sum.iter().map(|s| (s / (2 * ctx) as f64) as f32).collect();
        assert_eq!(stats.mean_abs, mean);
        let mean_sq: Vec<f32> = sum_sq
            .iter()
            .map(|s| (s / (2 * ctx) as f64) as f32)
            .collect();
        assert_eq!(stats.mean_sq, mean_sq);
        assert_eq!(stats.tokens, 2 * ctx);
        assert!(stats.sample_rows() > 0 && stats.sample_rows() <= SAMPLE_ROWS);
        assert!(stats.absmax.iter().all(|&m| m > 0.0));
        // One entry per distinct Linear input: q/k/v share theirs.
        assert_eq!(
            calibration.stats.len(),
            linear_inputs(&calibration.graph).len()
        );
    }

    #[test]
    fn a_text_shorter_than_a_window_is_refused_with_both_counts() {
        let mut model = fixture("qwen3");
        let ctx = CALIBRATION_CTX.min(model.config.max_position_embeddings);
        let err = collect(&mut model, &text(ctx - 1), linear_inputs, |_, _| {})
            .err()
            .expect("too short");
        let message = err.to_string();
        assert!(message.contains("calib.txt is too short"), "{message}");
        assert!(
            message.contains(&format!("{} tokens", ctx - 1)),
            "{message}"
        );
        assert!(message.contains(&format!("at least {ctx}")), "{message}");
    }
}
