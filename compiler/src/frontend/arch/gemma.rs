//! Gemma (the first generation): the Llama layer with
//! - GeGLU: `down(gelu_tanh(gate(h)) · up(h))` (`hidden_act`
//!   `gelu_pytorch_tanh`; the legacy `gelu` means the same, as transformers
//!   reads it);
//! - RMSNorm over `1 + w` (the weights are stored as offsets from 1);
//! - embeddings times √hidden, the factor held in the activation dtype as
//!   transformers does (`GemmaTextScaledWordEmbedding`);
//! - `lm_head` tied to the embeddings unless the config says otherwise.
//!
//! Source: transformers' `models/gemma/modeling_gemma.py`
//! (https://github.com/huggingface/transformers/tree/main/src/transformers/models/gemma).

use super::{Family, FamilyConfig};
use crate::frontend::config::{ConfigError, ModelConfig};
use crate::frontend::decoder::{DecoderBuilder, GateActivation, NormStyle, SelfAttention};
use crate::frontend::FrontendError;
use kiln_runtime::ir::ops::Scale;
use kiln_runtime::ir::ValueId;

pub const HF_NAME: &str = "GemmaForCausalLM";
pub const MODEL_TYPE: &str = "gemma";

pub struct Gemma {
    /// √hidden, rounded to f32 (the IR's activation dtype).
    embed_scale: f32,
}

/// Checks that the MLP activation is GELU's tanh form, which is all Gemma
/// checkpoints use (Gemma 2 builds on [`Gemma::new`], so it checks too).
fn check_gelu_tanh(keys: &FamilyConfig) -> Result<(), ConfigError> {
    let act = keys
        .str("hidden_activation")
        .or_else(|| keys.str("hidden_act"))
        .unwrap_or("gelu_pytorch_tanh");
    match act {
        "gelu_pytorch_tanh" | "gelu" => Ok(()),
        other => Err(keys.invalid(format!(
            "hidden activation \"{other}\" is not supported for Gemma (only gelu_pytorch_tanh)"
        ))),
    }
}

impl Gemma {
    pub fn new(config: &ModelConfig, keys: &FamilyConfig) -> Result<Gemma, ConfigError> {
        check_gelu_tanh(keys)?;
        Ok(Gemma {
            embed_scale: (config.hidden_size as f64).sqrt() as f32,
        })
    }
}

impl Family for Gemma {
    fn norm_style(&self) -> NormStyle {
        NormStyle::UnitOffsetWeight
    }

    fn embed(&self, d: &mut DecoderBuilder, x: ValueId) -> Result<ValueId, FrontendError> {
        let factor = self.embed_scale;
        d.node("embed.scaled", Scale { factor }, &[x])
    }

    fn attention(&self, config: &ModelConfig, _layer: usize) -> SelfAttention {
        SelfAttention::with_config_biases(config)
    }

    fn mlp(
        &self,
        d: &mut DecoderBuilder,
        layer: usize,
        h: ValueId,
    ) -> Result<ValueId, FrontendError> {
        d.gated_mlp(layer, h, GateActivation::GeluTanh, false)
    }
}
