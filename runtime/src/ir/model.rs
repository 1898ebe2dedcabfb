//! A whole model in IR form: the prefill and decode graphs, the KV-cache
//! contract between them and the host, and what a runtime needs to know
//! about the model without its original checkpoint.

use super::{DType, Graph, IrError, TensorType};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The names every Kiln model graph uses for its inputs and outputs.
pub struct GraphNames;

impl GraphNames {
    /// `[1, T]` i64 token ids.
    pub const INPUT_IDS: &'static str = "input_ids";
    /// `[1, T]` i64 absolute positions.
    pub const POSITION_IDS: &'static str = "position_ids";
    /// `[1, 1, T, L + T]` f32, additive: 0 shows a key, -inf hides it.
    pub const ATTENTION_MASK: &'static str = "attention_mask";
    /// The same for the sliding-window layers of a model that also has
    /// global ones (Gemma 2 and 3); see [`MaskInput`].
    pub const ATTENTION_MASK_LOCAL: &'static str = "attention_mask_local";
    /// `[1, 1]` i64: which of the step's `T` positions to compute logits for
    /// (the last real token; later positions may be padding).
    pub const LOGITS_INDEX: &'static str = "logits_index";
    /// `[layers, 1, kv_heads, L, head_dim]` f32: every layer's keys.
    pub const K_CACHE: &'static str = "k_cache";
    pub const V_CACHE: &'static str = "v_cache";
    /// `[1, 1, vocab]` f32: the logits at `logits_index`.
    pub const LOGITS: &'static str = "logits";
    /// `[layers, 1, kv_heads, T, head_dim]` f32: this step's new keys/values.
    pub const K_NEW: &'static str = "k_new";
    pub const V_NEW: &'static str = "v_new";
}

/// One additive attention-mask input of a step graph: which positions it
/// shows, for the host that fills it, and which layers' attention reads it.
///
/// A model whose layers all see the same positions has one mask,
/// `attention_mask`; one that mixes sliding-window layers with global ones
/// has `attention_mask` for the global layers and `attention_mask_local`
/// for the others. Both follow [`KvCacheLayout`]'s columns; the cache stays
/// one tensor per K and V either way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskInput {
    /// The graph input it fills.
    pub input: String,
    /// `None`: a query at position `p` sees every position `j ≤ p`.
    /// `Some(w)`: only the last `w` of them, its own included
    /// (`p - w < j ≤ p`), as transformers' `sliding_window_overlay` has it
    /// (`kv_idx > q_idx - sliding_window`, src/transformers/masking_utils.py).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// The layers whose attention reads it, ascending.
    pub layers: Vec<usize>,
}

/// How the KV cache is laid out and who writes it.
///
/// The cache holds `max_len` slots per layer. A step of `T` tokens reads the
/// cache (slots `< past_len` visible through the mask) and returns the new
/// rows as `k_new` / `v_new`; the host copies row `t` of each layer into slot
/// `past_len + t`. The graphs never write the cache, so no scatter op is needed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub max_len: usize,
    pub head_dim: usize,
}

impl KvCacheLayout {
    pub fn cache_type(&self) -> TensorType {
        TensorType::f32([self.layers, 1, self.kv_heads, self.max_len, self.head_dim])
    }
}

/// Facts about the model that runtimes and tools need.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The Hugging Face architecture, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The dtype of the checkpoint's weights.
    pub weight_dtype: DType,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelIr {
    /// Bumped whenever the serialized form changes incompatibly.
    pub format_version: u32,
    pub info: ModelInfo,
    pub kv_cache: KvCacheLayout,
    /// Tokens per prefill step: `T` of the longest graph.
    pub prefill_len: usize,
    /// The step graphs, each of its own `T` tokens: `prefill` (T =
    /// `prefill_len`) and `decode` (T = 1) for split graphs, or one `step`
    /// graph serving both. An engine runs each chunk of tokens on the graph
    /// [`pick_graph`] chooses.
    pub graphs: Vec<Graph>,
}

pub const FORMAT_VERSION: u32 = 3;

/// Which step graphs a model is compiled into.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphLayout {
    /// `prefill` (T = prefill_len) and `decode` (T = 1): the fastest of
    /// each, but on an NPU both need the weights (shared through ATC's
    /// external weights where ACL can register them).
    #[default]
    Split,
    /// One `step` graph of T tokens serving prefill chunks and decode: one
    /// .om, one copy of the weights with any ACL, prefill T× faster than
    /// token by token, decode a little slower than a T = 1 graph.
    Single,
}

impl GraphLayout {
    pub fn name(self) -> &'static str {
        match self {
            GraphLayout::Split => "split",
            GraphLayout::Single => "single",
        }
    }
}

/// Tokens per step of a step graph (its `input_ids` are `[1, T]`).
pub fn graph_tokens(graph: &Graph) -> usize {
    graph.ty(graph.inputs[0]).shape[1]
}

/// Which graph runs the next chunk when `remaining` tokens are left, for
/// graphs of `tokens[i]` tokens each: the smallest graph that takes them
/// all (decode for one token), else the largest, for a full chunk.
pub fn pick_graph(tokens: &[usize], remaining: usize) -> usize {
    let fitting = (0..tokens.len())
        .filter(|&i| tokens[i] >= remaining)
        .min_by_key(|&i| tokens[i]);
    let largest = (0..tokens.len()).max_by_key(|&i| tokens[i]);
    fitting.or(largest).expect("a model has at least one graph")
}

#[derive(Debug, thiserror::Error)]
pub enum ModelIrError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a Kiln IR file: {source}")]
    Parse {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: IR format version {found}, this Kiln reads version {FORMAT_VERSION}; recompile the model")]
    Version {
        path: std::path::PathBuf,
        found: u32,
    },
    #[error("{path}: {source}")]
    Invalid {
        path: std::path::PathBuf,
        #[source]
        source: IrError,
    },
}

impl ModelIr {
    pub fn graphs(&self) -> &[Graph] {
        &self.graphs
    }

    pub fn graph(&self, name: &str) -> Option<&Graph> {
        self.graphs.iter().find(|g| g.name == name)
    }

    /// Removes and returns the graph called `name`.
    pub fn take_graph(&mut self, name: &str) -> Option<Graph> {
        let at = self.graphs.iter().position(|g| g.name == name)?;
        Some(self.graphs.remove(at))
    }

    /// Tokens per step of each graph, in order.
    pub fn graph_tokens(&self) -> Vec<usize> {
        self.graphs.iter().map(graph_tokens).collect()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the IR always serializes")
    }

    pub fn save_json(&self, path: &Path) -> Result<(), ModelIrError> {
        std::fs::write(path, self.to_json()).map_err(|source| ModelIrError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads an IR file and validates both graphs.
    pub fn load_json(path: &Path) -> Result<ModelIr, ModelIrError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelIrError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let version: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelIrError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        let found = version
            .get("format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as u32;
        if found != FORMAT_VERSION {
            return Err(ModelIrError::Version {
                path: path.to_path_buf(),
                found,
            });
        }
        let model: ModelIr =
            serde_json::from_value(version).map_err(|source| ModelIrError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        if model.graphs.is_empty() {
            return Err(ModelIrError::Invalid {
                path: path.to_path_buf(),
                source: IrError::Structure {
                    graph: "(none)".into(),
                    message: "the model has no graphs".into(),
                },
            });
        }
        for graph in model.graphs() {
            graph.validate().map_err(|source| ModelIrError::Invalid {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(model)
    }
}

#[cfg(test)]
mod graph_choice_tests {
    use super::pick_graph;

    #[test]
    fn chunks_go_to_the_smallest_graph_that_takes_them() {
        // Split graphs: prefill of 64, decode of 1.
        assert_eq!(pick_graph(&[64, 1], 1), 1);
        assert_eq!(pick_graph(&[64, 1], 2), 0);
        assert_eq!(pick_graph(&[64, 1], 64), 0);
        assert_eq!(pick_graph(&[64, 1], 200), 0);
        // One graph of 8 serves everything.
        assert_eq!(pick_graph(&[8], 1), 0);
        assert_eq!(pick_graph(&[8], 30), 0);
    }
}
