//! The device memory plan: what a compiled model needs on the NPU, the
//! weights counted once for every graph (they are shared through ATC's
//! external weight files, see `kiln_runtime::compiled::external_weights`).
//!
//! Two ways to the same [`MemoryPlan`]: from the ONNX graphs a compile
//! lowers ([`from_graphs`], what the manifest records), or from config.json
//! alone ([`from_config`], `kiln compile --plan-only`), so a user can ask
//! whether a model fits a board before downloading its weights. A test
//! holds the two equal on the fixtures.

use crate::backend::onnx::builder::FloatType;
use crate::backend::onnx::{self, OnnxError, OnnxGraph};
use crate::frontend::config::ModelConfig;
use crate::frontend::{FrontendError, GraphOptions};
use kiln_runtime::compiled::external_weights::registered_size;
use kiln_runtime::compiled::manifest::{GraphInfo, MemoryPlan};
use kiln_runtime::ir::GraphLayout;
use kiln_runtime::weights::WeightStore;
use std::collections::{BTreeSet, HashSet};

/// Names of Kiln's own store tensors (RoPE tables) start with this.
const KILN_TABLE_PREFIX: &str = "kiln.";

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the model needs {need:.2} GiB of device memory ({detail}) but --device-memory is {have:.2} GiB; \
         try a shorter --max-seq-len, --quant w8a8, or a smaller model"
    )]
    DoesNotFit {
        need: f64,
        have: f64,
        detail: String,
    },
    #[error("--device-memory {0}: expected a size such as 8GiB, 12GB or 8192MiB")]
    BadSize(String),
}

/// Bytes of one element of a manifest dtype.
fn dtype_bytes(dtype: &str) -> u64 {
    match dtype {
        "float32" | "int32" => 4,
        "float16" | "bfloat16" => 2,
        "int64" => 8,
        _ => 1,
    }
}

/// The step inputs and outputs of every graph but the caches, and the caches.
pub fn io_and_kv(graphs: &[GraphInfo]) -> (u64, u64) {
    let bytes = |t: &kiln_runtime::compiled::manifest::TensorInfo| {
        t.shape.iter().map(|&d| d as u64).product::<u64>() * dtype_bytes(&t.dtype)
    };
    let is_cache = |name: &str| name == "k_cache" || name == "v_cache";
    let io = graphs
        .iter()
        .flat_map(|g| g.inputs.iter().chain(&g.outputs))
        .filter(|t| !is_cache(&t.name))
        .map(bytes)
        .sum();
    let kv = graphs
        .first()
        .map(|g| {
            g.inputs
                .iter()
                .filter(|t| is_cache(&t.name))
                .map(bytes)
                .sum()
        })
        .unwrap_or(0);
    (io, kv)
}

/// The plan of a compile, from its lowered ATC graphs and manifest entries:
/// every weight initializer once across graphs (store tensors by name,
/// Kiln's small constants by content), each rounded up as ACL registers it.
pub fn from_graphs(
    lowered: &[&OnnxGraph],
    infos: &[GraphInfo],
    store: &WeightStore,
    float: FloatType,
    parameters: u64,
) -> Result<MemoryPlan, OnnxError> {
    let (mut weights, mut tables) = (0u64, 0u64);
    let mut names = BTreeSet::new();
    let mut constants = HashSet::new();
    for graph in lowered {
        for name in &graph.weights {
            if names.insert(name.as_str()) {
                let bytes =
                    onnx::initializer_layout(name, graph.derived.get(name), store, float)?.1;
                if name.starts_with(KILN_TABLE_PREFIX) {
                    tables += registered_size(bytes);
                } else {
                    weights += registered_size(bytes);
                }
            }
        }
        for constant in &graph.model.graph.initializer {
            // ATC names a weight file by the hash of its bytes alone.
            if constants.insert(constant.raw_data.clone()) {
                tables += registered_size(constant.raw_data.len() as u64);
            }
        }
    }
    let (io, kv_cache) = io_and_kv(infos);
    Ok(MemoryPlan::new(
        weights,
        parameters,
        tables,
        kv_cache,
        io,
        "from the ONNX graphs ATC converts",
    ))
}

/// One weight tensor of a decoder, as the ATC graphs hold it.
struct Tensor {
    elements: u64,
    /// A Linear's weight `[out, in]`, quantized by `w8a8` unless it is
    /// `lm_head` (the bool).
    linear: Option<(u64, u64, bool)>,
}

/// Every parameter tensor of a decoder built from `config`: the weights of
/// its decode graph, built over config.json alone (so each family's own
/// tensors are counted as its decoder reads them).
fn inventory(config: &ModelConfig) -> Result<Vec<Tensor>, FrontendError> {
    let weights = crate::frontend::arch::weight_inventory(config)?;
    Ok(weights
        .into_iter()
        .map(|(name, shape, linear)| Tensor {
            elements: shape.iter().map(|&d| d as u64).product(),
            linear: linear.then(|| {
                (
                    shape[0] as u64,
                    shape[1] as u64,
                    name == "lm_head.weight" || name == "model.embed_tokens.weight",
                )
            }),
        })
        .collect())
}

/// The plan from config.json alone: the same tensors the compile would
/// write (`int8_linears`: `w8a8`'s int8 weights and per-channel
/// `deq_scale` words for every Linear but `lm_head`), Kiln's RoPE tables,
/// and the graphs' inputs and outputs. Kiln's small shape constants (a few
/// kilobytes) are not counted.
pub fn from_config(
    config: &ModelConfig,
    options: &GraphOptions,
    float: FloatType,
    int8_linears: bool,
) -> Result<MemoryPlan, FrontendError> {
    let f = float.size_bytes() as u64;
    let tensors = inventory(config)?;
    let parameters = tensors.iter().map(|t| t.elements).sum();
    let weights = tensors
        .iter()
        .map(|t| match t.linear {
            Some((out, input, false)) if int8_linears => {
                // The int8 [in, out] weight and one u64 deq_scale per output.
                registered_size(out * input) + registered_size(out * 8)
            }
            _ => registered_size(t.elements * f),
        })
        .sum();
    let l = options.max_seq_len as u64;
    let d = config.head_dim as u64;
    let family = config.family()?;
    // cos and sin, [max_len, rotary_dim] each, in the graphs' float type; a
    // second pair for sliding layers with a RoPE of their own.
    let rope_pairs =
        1 + crate::frontend::decoder::local_rope(family.as_ref(), config).is_some() as u64;
    let tables = 2 * rope_pairs * registered_size(l * config.rotary_dim as u64 * f);
    let masks = crate::frontend::decoder::attention_masks(
        &family.sliding_layers(config),
        config.sliding_window,
        options.max_seq_len,
    )
    .len() as u64;
    let graphs: Vec<u64> = match options.layout {
        GraphLayout::Split => vec![options.prefill_len as u64, 1],
        GraphLayout::Single => vec![options.prefill_len as u64],
    };
    let rows = config.num_layers as u64 * config.num_kv_heads as u64 * d;
    let io = graphs
        .iter()
        .map(|&t| {
            // ids, positions, logits_index (int64); masks; logits; new K/V rows.
            (2 * t + 1) * 8
                + masks * t * (l + t) * f
                + config.vocab_size as u64 * f
                + 2 * rows * t * f
        })
        .sum();
    let kv_cache = 2 * rows * l * f;
    Ok(MemoryPlan::new(
        weights,
        parameters,
        tables,
        kv_cache,
        io,
        "estimated from config.json alone",
    ))
}

/// The model's parameter count, for the manifest's plan.
pub fn parameters(config: &ModelConfig) -> Result<u64, FrontendError> {
    Ok(inventory(config)?.iter().map(|t| t.elements).sum())
}

/// What the board's Linux, kiln-run and ACL's work memory need besides
/// the plan: 1 GiB or a tenth of the memory, whichever is more.
pub fn headroom(device_memory: u64) -> u64 {
    (1u64 << 30).max(device_memory / 10)
}

/// Refuses a plan larger than the device; `Some(warning)` when it leaves
/// less than [`headroom`].
pub fn check_fits(plan: &MemoryPlan, device_memory: u64) -> Result<Option<String>, PlanError> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let detail = format!(
        "weights {:.2} GiB, KV cache {:.2} GiB, tables and IO {:.2} GiB",
        gib(plan.weights),
        gib(plan.kv_cache),
        gib(plan.tables + plan.io)
    );
    if plan.total > device_memory {
        return Err(PlanError::DoesNotFit {
            need: gib(plan.total),
            have: gib(device_memory),
            detail,
        });
    }
    let room = headroom(device_memory);
    Ok((plan.total + room > device_memory).then(|| {
        format!(
            "the model needs {:.2} GiB of the {:.2} GiB, leaving less than the {:.2} GiB that \
             Linux, kiln-run and ACL's work memory need: expect it not to load; a shorter \
             --max-seq-len or --quant w8a8 makes room",
            gib(plan.total),
            gib(device_memory),
            gib(room)
        )
    }))
}

/// `8GiB`, `12GB`, `8192MiB`, `8g`, `512k`: bytes (GB and GiB both mean 2^30 here,
/// as boards are sold by binary size).
pub fn parse_size(text: &str) -> Result<u64, PlanError> {
    let t = text.trim();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let value: f64 = number
        .parse()
        .map_err(|_| PlanError::BadSize(text.to_string()))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "g" | "gb" | "gib" => 1u64 << 30,
        "m" | "mb" | "mib" => 1 << 20,
        "k" | "kb" | "kib" => 1 << 10,
        "" | "b" => 1,
        _ => return Err(PlanError::BadSize(text.to_string())),
    };
    let bytes = value * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(PlanError::BadSize(text.to_string()));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("12GB").unwrap(), 12 << 30);
        assert_eq!(parse_size("8192MiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        for bad in ["", "eight", "8TB", "-1G", "0"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_plan_larger_than_the_device_is_refused_and_a_tight_one_warned() {
        let plan = |total| MemoryPlan {
            weights: total,
            parameters: 0,
            tables: 0,
            kv_cache: 0,
            io: 0,
            total,
            source: String::new(),
        };
        let eight = 8u64 << 30;
        let err = check_fits(&plan(9 << 30), eight).unwrap_err().to_string();
        assert!(
            err.contains("9.00 GiB") && err.contains("8.00 GiB"),
            "{err}"
        );
        assert!(check_fits(&plan(15 << 29), eight).unwrap().is_some());
        assert!(check_fits(&plan(6 << 30), eight).unwrap().is_none());
    }
}
