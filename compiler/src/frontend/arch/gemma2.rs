//! Gemma 2: Gemma's pieces (GeGLU with tanh GELU, RMSNorm over `1 + w`,
//! embeddings times √hidden, tied `lm_head`) in a "sandwich" layer —
//!
//! ```text
//! x += post_attention_layernorm(attention(input_layernorm(x)))
//! x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))
//! ```
//!
//! — with attention scores scaled by `query_pre_attn_scalar^-1/2` and
//! soft-capped (`attn_logit_softcapping`), and the final logits soft-capped
//! (`final_logit_softcapping`), each `c · tanh(x / c)`.
//!
//! The layers `layer_types` marks `sliding_attention` (by default every
//! other one, from layer 0) attend over the last `sliding_window`
//! positions: they read the graphs' second mask (`attention_mask_local`).
//! Source: transformers' `models/gemma2/modeling_gemma2.py`
//! (https://github.com/huggingface/transformers/tree/main/src/transformers/models/gemma2).

use super::gemma::Gemma;
use super::{sliding_by_layer_types, Family, FamilyConfig};
use crate::frontend::config::{ConfigError, ModelConfig};
use crate::frontend::decoder::{DecoderBuilder, NormStyle, SelfAttention};
use crate::frontend::FrontendError;
use kiln_runtime::ir::ops::SoftCap;
use kiln_runtime::ir::ValueId;

pub const HF_NAME: &str = "Gemma2ForCausalLM";
pub const MODEL_TYPE: &str = "gemma2";

/// Gemma, with what the second generation changes.
pub struct Gemma2 {
    gemma: Gemma,
    attention_scale: f32,
    attention_softcap: Option<f32>,
    final_softcap: Option<f32>,
}

impl Gemma2 {
    pub fn new(config: &ModelConfig, keys: &FamilyConfig) -> Result<Gemma2, ConfigError> {
        // transformers' Gemma2Config defaults.
        Self::with_default_caps(config, keys, Some(50.0), Some(30.0))
    }

    /// Gemma 2's pieces with soft-caps that default (when the key is absent;
    /// `null` means none) to these.
    pub fn with_default_caps(
        config: &ModelConfig,
        keys: &FamilyConfig,
        attention: Option<f64>,
        last: Option<f64>,
    ) -> Result<Gemma2, ConfigError> {
        let scalar = keys.positive_f64("query_pre_attn_scalar")?.unwrap_or(256.0);
        let cap = |key: &str, default: Option<f64>| -> Result<Option<f32>, ConfigError> {
            let value = match keys.json.get(key) {
                None => default,
                Some(_) => keys.positive_f64(key)?,
            };
            Ok(value.map(|c| c as f32))
        };
        Ok(Gemma2 {
            gemma: Gemma::new(config, keys)?,
            attention_scale: scalar.powf(-0.5) as f32,
            attention_softcap: cap("attn_logit_softcapping", attention)?,
            final_softcap: cap("final_logit_softcapping", last)?,
        })
    }
}

impl Family for Gemma2 {
    fn norm_style(&self) -> NormStyle {
        self.gemma.norm_style()
    }

    fn embed(&self, d: &mut DecoderBuilder, x: ValueId) -> Result<ValueId, FrontendError> {
        self.gemma.embed(d, x)
    }

    fn sliding_layers(&self, config: &ModelConfig) -> Vec<bool> {
        // Gemma2Config.__post_init__: sliding where (i + 1) % 2 != 0.
        sliding_by_layer_types(config, |layer| layer % 2 == 0)
    }

    fn attention(&self, config: &ModelConfig, layer: usize) -> SelfAttention {
        SelfAttention {
            scale: self.attention_scale,
            logit_softcap: self.attention_softcap,
            ..self.gemma.attention(config, layer)
        }
    }

    fn mlp(
        &self,
        d: &mut DecoderBuilder,
        layer: usize,
        h: ValueId,
    ) -> Result<ValueId, FrontendError> {
        self.gemma.mlp(d, layer, h)
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
        match self.final_softcap {
            Some(cap) => d.node("logits.capped", SoftCap { cap }, &[logits]),
            None => Ok(logits),
        }
    }
}

/// Gemma 2's layer, which Gemma 3 keeps: every block between a pre- and a
/// post-norm.
pub fn sandwich_layer(
    family: &(impl Family + ?Sized),
    d: &mut DecoderBuilder,
    layer: usize,
    x: ValueId,
) -> Result<ValueId, FrontendError> {
    let p = format!("model.layers.{layer}");
    let h = d.rms_norm(x, &format!("{p}.input_layernorm.weight"))?;
    let o = d.self_attention(layer, h, &family.attention(d.config(), layer))?;
    let o = d.rms_norm(o, &format!("{p}.post_attention_layernorm.weight"))?;
    let x = d.residual(format!("{p}.attn_residual"), x, o)?;
    let h = d.rms_norm(x, &format!("{p}.pre_feedforward_layernorm.weight"))?;
    let m = family.mlp(d, layer, h)?;
    let m = d.rms_norm(m, &format!("{p}.post_feedforward_layernorm.weight"))?;
    d.residual(format!("{p}.mlp_residual"), x, m)
}
