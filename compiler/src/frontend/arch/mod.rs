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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::config::RopeScaling;
    use crate::frontend::decoder::attention_masks;
    use serde_json::json;

    fn config(architecture: &str, layers: usize, extra: Value) -> Result<ModelConfig, ConfigError> {
        let mut json = json!({
            "architectures": [architecture],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        });
        json.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ModelConfig::from_json(Path::new("config.json"), &json)
    }

    fn sliding(architecture: &str, layers: usize, extra: Value) -> Vec<bool> {
        let c = config(architecture, layers, extra).unwrap();
        c.family().unwrap().sliding_layers(&c)
    }

    #[test]
    fn each_family_reads_its_sliding_layers_as_transformers_does() {
        let (t, f) = (true, false);
        assert_eq!(sliding("LlamaForCausalLM", 2, json!({})), [f, f]);
        // Mistral and Phi-3: every layer, when there is a window.
        assert_eq!(
            sliding("MistralForCausalLM", 2, json!({"sliding_window": 8})),
            [t, t]
        );
        assert_eq!(
            sliding("MistralForCausalLM", 2, json!({"sliding_window": null})),
            [f, f]
        );
        assert_eq!(
            sliding("Phi3ForCausalLM", 2, json!({"sliding_window": 8})),
            [t, t]
        );
        // Qwen: only with use_sliding_window, from max_window_layers on.
        let qwen = |extra| sliding("Qwen2ForCausalLM", 3, extra);
        assert_eq!(qwen(json!({"sliding_window": 8})), [f, f, f]);
        assert_eq!(
            qwen(json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 1})),
            [f, t, t]
        );
        assert_eq!(
            qwen(json!({"sliding_window": 8, "use_sliding_window": true,
                "layer_types": ["sliding_attention", "full_attention", "full_attention"]})),
            [t, f, f]
        );
        // Gemma 2: every other layer from layer 0, unless layer_types says.
        assert_eq!(
            sliding("Gemma2ForCausalLM", 3, json!({"sliding_window": 8})),
            [t, f, t]
        );
        assert_eq!(
            sliding(
                "Gemma2ForCausalLM",
                2,
                json!({"sliding_window": 8,
                "layer_types": ["full_attention", "sliding_attention"]})
            ),
            [f, t]
        );
        // Gemma 3: all but every sliding_window_pattern-th (default 6).
        let gemma3 = json!({"sliding_window": 8, "rope_theta": 1e6});
        assert_eq!(
            sliding("Gemma3ForCausalLM", 6, gemma3.clone()),
            [t, t, t, t, t, f]
        );
        let mut pattern = gemma3.clone();
        pattern["sliding_window_pattern"] = 2.into();
        assert_eq!(sliding("Gemma3ForCausalLM", 4, pattern), [t, f, t, f]);
    }

    #[test]
    fn gemma3_reads_both_rope_forms_and_refuses_what_it_cannot_run() {
        let local = |c: &ModelConfig| c.family().unwrap().local_rope().cloned();
        // The hub's form: rope_theta, rope_local_base_freq, rope_scaling.
        let old = config(
            "Gemma3ForCausalLM",
            2,
            json!({"rope_theta": 1e6, "rope_local_base_freq": 1e4,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
        )
        .unwrap();
        assert_eq!(old.rope.theta, 1e6);
        assert_eq!(old.rope.scaling, RopeScaling::Linear { factor: 8.0 });
        let expected = Some(RopeConfig {
            theta: 1e4,
            scaling: RopeScaling::None,
        });
        assert_eq!(local(&old), expected);
        // transformers ≥ 5: rope_parameters per layer type.
        let new = config(
            "Gemma3ForCausalLM",
            2,
            json!({"rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
        )
        .unwrap();
        assert_eq!((&new.rope, local(&new)), (&old.rope, expected));
        // The same base for both: one pair of tables.
        let same = config(
            "Gemma3ForCausalLM",
            2,
            json!({"rope_theta": 1e4, "rope_local_base_freq": 1e4}),
        )
        .unwrap();
        assert_eq!(local(&same), None);
        for (extra, needle) in [
            (json!({}), "needs the global layers' RoPE base"),
            (
                json!({"rope_theta": 1e6, "use_bidirectional_attention": true}),
                "use_bidirectional_attention",
            ),
            (
                json!({"rope_parameters": {"full_attention": {"rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "yarn", "factor": 2.0}}}),
                "\"yarn\" for Gemma 3's sliding layers",
            ),
        ] {
            let err = config("Gemma3ForCausalLM", 2, extra)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle) && err.contains("config.json"), "{err}");
        }
        assert_eq!(
            Architecture::from_model_type("gemma3_text"),
            Some(Architecture::Gemma3)
        );
    }

    #[test]
    fn masks_are_one_per_layer_kind_and_only_where_the_window_hides_something() {
        let names =
            |masks: Vec<kiln_runtime::ir::MaskInput>| -> Vec<(String, Option<usize>, Vec<usize>)> {
                masks
                    .into_iter()
                    .map(|m| (m.input, m.sliding_window, m.layers))
                    .collect()
            };
        let global = "attention_mask".to_string();
        let local = "attention_mask_local".to_string();
        let mixed = [true, false, true];
        assert_eq!(
            names(attention_masks(&mixed, Some(4), 16)),
            [
                (global.clone(), None, vec![1]),
                (local, Some(4), vec![0, 2])
            ]
        );
        // A window as long as the cache hides nothing: one mask.
        assert_eq!(
            names(attention_masks(&mixed, Some(16), 16)),
            [(global.clone(), None, vec![0, 1, 2])]
        );
        // Every layer slides (Mistral v0.1): the one mask is windowed.
        assert_eq!(
            names(attention_masks(&[true, true], Some(4), 16)),
            [(global, Some(4), vec![0, 1])]
        );
    }
}
