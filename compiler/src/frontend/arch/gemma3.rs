//! Gemma 3 (text only, `Gemma3ForCausalLM`, model_type `gemma3_text`):
//! Gemma 2's layer (sandwich norms, GeGLU, `query_pre_attn_scalar`,
//! embeddings times √hidden, tied `lm_head`, soft-caps only when the config
//! sets them) with
//! - an RMSNorm over `1 + w` on each head of q and k (`q_norm`, `k_norm`)
//!   before RoPE;
//! - local layers, those `layer_types` marks `sliding_attention` (else all
//!   but every `sliding_window_pattern`-th, default 6), attending over the
//!   last `sliding_window` positions with their own RoPE base
//!   (`rope_parameters.sliding_attention`, or `rope_local_base_freq` in older
//!   files; default 10000);
//! - global layers with the model's RoPE (`rope_parameters.full_attention`,
//!   or `rope_theta` and `rope_scaling`, e.g. linear for the 4B).
//!
//! Source: transformers' `models/gemma3/modeling_gemma3.py` and
//! `configuration_gemma3.py`
//! (https://github.com/huggingface/transformers/tree/main/src/transformers/models/gemma3).

use super::gemma2::{sandwich_layer, Gemma2};
use super::{sliding_by_layer_types, Family, FamilyConfig};
use crate::frontend::config::{ConfigError, ModelConfig, RopeConfig, RopeScaling};
use crate::frontend::decoder::{DecoderBuilder, NormStyle, SelfAttention};
use crate::frontend::FrontendError;
use kiln_runtime::ir::ValueId;
use serde_json::Value;

pub const HF_NAME: &str = "Gemma3ForCausalLM";
pub const MODEL_TYPE: &str = "gemma3_text";

pub struct Gemma3 {
    gemma2: Gemma2,
    /// Every `pattern`-th layer is global when `layer_types` is absent.
    pattern: usize,
    /// The local layers' RoPE, when it differs from the model's.
    local_rope: Option<RopeConfig>,
}

impl Gemma3 {
    pub fn new(config: &ModelConfig, keys: &FamilyConfig) -> Result<Gemma3, ConfigError> {
        if keys.bool("use_bidirectional_attention")? == Some(true) {
            return Err(keys.invalid(
                "use_bidirectional_attention (Gemma 3 as an encoder) is not supported".into(),
            ));
        }
        let pattern = keys.usize("sliding_window_pattern")?.unwrap_or(6);
        if pattern == 0 {
            return Err(keys.invalid("\"sliding_window_pattern\" must be positive".into()));
        }
        // Gemma3TextConfig's default global base (1e6) is not the one the
        // config reader assumes: ask for it rather than guess.
        let per_type = keys.json.get("rope_parameters").and_then(Value::as_object);
        let global_theta = per_type
            .and_then(|p| p.get("full_attention"))
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| keys.json.get("rope_theta"));
        if global_theta.is_none_or(Value::is_null) {
            return Err(keys.invalid(
                "Gemma 3 needs the global layers' RoPE base (\"rope_theta\", or \
                 \"rope_parameters\".\"full_attention\".\"rope_theta\")"
                    .into(),
            ));
        }
        let local = per_type.and_then(|p| p.get("sliding_attention"));
        if let Some(kind) = local
            .and_then(|p| p.get("rope_type"))
            .and_then(Value::as_str)
            .filter(|&k| k != "default")
        {
            return Err(keys.invalid(format!(
                "rope type \"{kind}\" for Gemma 3's sliding layers is not supported (only default)"
            )));
        }
        let theta = match local.and_then(|p| p.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .filter(|t| t.is_finite() && *t > 0.0)
                .ok_or_else(|| {
                    keys.invalid(format!(
                        "the sliding layers' \"rope_theta\" must be positive, got {v}"
                    ))
                })?,
            None => keys
                .positive_f64("rope_local_base_freq")?
                .unwrap_or(10000.0),
        };
        let local_rope = RopeConfig {
            theta,
            scaling: RopeScaling::None,
        };
        Ok(Gemma3 {
            gemma2: Gemma2::with_default_caps(config, keys, None, None)?,
            pattern,
            local_rope: (local_rope != config.rope).then_some(local_rope),
        })
    }
}

impl Family for Gemma3 {
    fn norm_style(&self) -> NormStyle {
        self.gemma2.norm_style()
    }

    fn embed(&self, d: &mut DecoderBuilder, x: ValueId) -> Result<ValueId, FrontendError> {
        self.gemma2.embed(d, x)
    }

    fn sliding_layers(&self, config: &ModelConfig) -> Vec<bool> {
        // Gemma3TextConfig.__post_init__: sliding where (i + 1) % pattern != 0.
        sliding_by_layer_types(config, |layer| (layer + 1) % self.pattern != 0)
    }

    fn local_rope(&self) -> Option<&RopeConfig> {
        self.local_rope.as_ref()
    }

    fn attention(&self, config: &ModelConfig, layer: usize) -> SelfAttention {
        SelfAttention {
            qk_norm: true,
            ..self.gemma2.attention(config, layer)
        }
    }

    fn mlp(
        &self,
        d: &mut DecoderBuilder,
        layer: usize,
        h: ValueId,
    ) -> Result<ValueId, FrontendError> {
        self.gemma2.mlp(d, layer, h)
    }

    fn layer(
        &self,
        d: &mut DecoderBuilder,
        layer: usize,
        x: ValueId,
    ) -> Result<ValueId, FrontendError> {
        sandwich_layer(self, d, layer, x)
    }

    fn logits(&self, d: &mut DecoderBuilder, logits: ValueId) -> Result<ValueId, FrontendError> {
        self.gemma2.logits(d, logits)
    }
}
