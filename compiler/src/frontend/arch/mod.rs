//! The architectures Kiln can lower, one file each. Every file says what
//! its decoder is, as a [`Family`]: hooks over the shared pieces of
//! `decoder.rs`, whose defaults are the Llama layout.

mod gemma;
mod gemma2;
mod gemma3;
mod llama;
mod mistral;
mod phi3;
mod qwen2;
mod qwen3;

use super::config::{ConfigError, LayerType, ModelConfig, RopeConfig};
use super::decoder::{
    self, DecoderBuilder, GateActivation, NormStyle, SelfAttention, WeightSource,
};
use super::FrontendError;
use kiln_runtime::ir::ValueId;
use kiln_runtime::weights::WeightStore;
use serde_json::{Map, Value};
use std::path::Path;

/// What one family's decoder is. Each hook gets the builder of shared
/// pieces; a family overrides only where it differs from Llama.
pub trait Family {
    /// How RMSNorm applies its weight, in every norm of the model.
    fn norm_style(&self) -> NormStyle {
        NormStyle::Weight
    }

    /// Weights derived at load, before any graph is built (`1 + w` norms,
    /// split fused projections).
    fn prepare_weights(&self, store: &mut WeightStore) -> Result<(), FrontendError> {
        if self.norm_style() == NormStyle::UnitOffsetWeight {
            decoder::add_unit_offset_weights(store)?;
        }
        Ok(())
    }

    /// The embedding rows `x [1, T, hidden]` → the first layer's input.
    fn embed(&self, _d: &mut DecoderBuilder, x: ValueId) -> Result<ValueId, FrontendError> {
        Ok(x)
    }

    /// Which layers attend over the last `config.sliding_window` positions
    /// only; the others see every earlier position. None, unless the family
    /// says otherwise.
    fn sliding_layers(&self, config: &ModelConfig) -> Vec<bool> {
        vec![false; config.num_layers]
    }

    /// The RoPE of the sliding layers, when it is not the model's own
    /// (Gemma 3's local base).
    fn local_rope(&self) -> Option<&RopeConfig> {
        None
    }

    /// Layer `layer`'s self-attention.
    fn attention(&self, config: &ModelConfig, _layer: usize) -> SelfAttention {
        SelfAttention::plain(config)
    }

    /// Layer `layer`'s MLP on the normalized hidden states `h`.
    fn mlp(
        &self,
        d: &mut DecoderBuilder,
        layer: usize,
        h: ValueId,
    ) -> Result<ValueId, FrontendError> {
        d.gated_mlp(layer, h, GateActivation::Silu, false)
    }

    /// One decoder layer: the residual stream in, the residual stream out.
    fn layer(
        &self,
        d: &mut DecoderBuilder,
        layer: usize,
        x: ValueId,
    ) -> Result<ValueId, FrontendError> {
        decoder::pre_norm_layer(self, d, layer, x)
    }

    /// The `lm_head` output → the logits the graph returns.
    fn logits(&self, _d: &mut DecoderBuilder, logits: ValueId) -> Result<ValueId, FrontendError> {
        Ok(logits)
    }
}

/// The sliding layers as `layer_types` lists them, else as `default(layer)`
/// says; none without a `sliding_window`.
pub fn sliding_by_layer_types(config: &ModelConfig, default: impl Fn(usize) -> bool) -> Vec<bool> {
    (0..config.num_layers)
        .map(|layer| {
            config.sliding_window.is_some()
                && match &config.layer_types {
                    Some(types) => types[layer] == LayerType::Sliding,
                    None => default(layer),
                }
        })
        .collect()
}

/// The family-specific keys of config.json, for a family's constructor.
pub struct FamilyConfig<'a> {
    pub path: &'a Path,
    pub json: &'a Map<String, Value>,
}

impl FamilyConfig<'_> {
    pub fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            message,
        }
    }

    /// An optional positive number.
    pub fn positive_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.json.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                _ => Err(self.invalid(format!("\"{key}\" must be a positive number, got {v}"))),
            },
        }
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.json.get(key).and_then(Value::as_str)
    }

    /// An optional true or false.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.json.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.invalid(format!("\"{key}\" must be true or false, got {v}"))),
        }
    }

    /// An optional non-negative integer.
    pub fn usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.json.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.invalid(format!("\"{key}\" must be a non-negative integer, got {v}"))
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Mistral,
    Qwen3,
    Gemma,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Architecture {
    pub const ALL: [Architecture; 8] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Mistral,
        Architecture::Qwen3,
        Architecture::Gemma,
        Architecture::Gemma2,
        Architecture::Gemma3,
        Architecture::Phi3,
    ];

    /// The class name in `config.json`'s `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => llama::HF_NAME,
            Architecture::Qwen2 => qwen2::HF_NAME,
            Architecture::Mistral => mistral::HF_NAME,
            Architecture::Qwen3 => qwen3::HF_NAME,
            Architecture::Gemma => gemma::HF_NAME,
            Architecture::Gemma2 => gemma2::HF_NAME,
            Architecture::Gemma3 => gemma3::HF_NAME,
            Architecture::Phi3 => phi3::HF_NAME,
        }
    }

    /// The `model_type` in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => llama::MODEL_TYPE,
            Architecture::Qwen2 => qwen2::MODEL_TYPE,
            Architecture::Mistral => mistral::MODEL_TYPE,
            Architecture::Qwen3 => qwen3::MODEL_TYPE,
            Architecture::Gemma => gemma::MODEL_TYPE,
            Architecture::Gemma2 => gemma2::MODEL_TYPE,
            Architecture::Gemma3 => gemma3::MODEL_TYPE,
            Architecture::Phi3 => phi3::MODEL_TYPE,
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Architecture> {
        Self::ALL.into_iter().find(|a| a.hf_name() == name)
    }

    pub fn from_model_type(model_type: &str) -> Option<Architecture> {
        Self::ALL.into_iter().find(|a| a.model_type() == model_type)
    }

    pub fn supported_list() -> String {
        Self::ALL.map(|a| a.hf_name()).join(", ")
    }

    /// `tie_word_embeddings` when config.json leaves it out (transformers'
    /// default for the class).
    pub fn ties_embeddings_by_default(self) -> bool {
        matches!(
            self,
            Architecture::Gemma | Architecture::Gemma2 | Architecture::Gemma3
        )
    }

    /// The family's decoder, from the parsed config and the family's own
    /// keys of config.json (checked here, so bad values name the file).
    pub fn family(
        self,
        config: &ModelConfig,
        keys: &FamilyConfig,
    ) -> Result<Box<dyn Family>, ConfigError> {
        Ok(match self {
            Architecture::Llama => Box::new(llama::Llama::new(config)),
            Architecture::Qwen2 => Box::new(qwen2::Qwen2::new(keys)?),
            Architecture::Mistral => Box::new(mistral::Mistral),
            Architecture::Qwen3 => Box::new(qwen3::Qwen3::new(keys)?),
            Architecture::Gemma => Box::new(gemma::Gemma::new(config, keys)?),
            Architecture::Gemma2 => Box::new(gemma2::Gemma2::new(config, keys)?),
            Architecture::Gemma3 => Box::new(gemma3::Gemma3::new(config, keys)?),
            Architecture::Phi3 => Box::new(phi3::Phi3::new(config)),
        })
    }
}

/// The tensors a compile writes for `config`, as (name, shape, whether it
/// is a Linear's weight), from a decode graph built over config.json
/// alone; Kiln's RoPE tables are left out.
pub fn weight_inventory(
    config: &ModelConfig,
) -> Result<Vec<(String, Vec<usize>, bool)>, FrontendError> {
    let family = config.family()?;
    let cache = kiln_runtime::ir::KvCacheLayout {
        layers: config.num_layers,
        kv_heads: config.num_kv_heads,
        max_len: 1,
        head_dim: config.head_dim,
    };
    let graph = decoder::build_graph(
        "inventory",
        config,
        family.as_ref(),
        WeightSource::ShapesOnly(kiln_runtime::ir::DType::F32),
        1,
        &cache,
        decoder::LogitsOutput::Selected,
    )?;
    let linear_weights: std::collections::HashSet<ValueId> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, kiln_runtime::ir::Op::Linear(_)))
        .map(|n| n.inputs[1])
        .collect();
    Ok(graph
        .weights()
        .filter(|(_, tensor)| !tensor.starts_with("kiln.rope"))
        .map(|(id, tensor)| {
            (
                tensor.to_string(),
                graph.ty(id).shape.clone(),
                linear_weights.contains(&id),
            )
        })
        .collect())
}
