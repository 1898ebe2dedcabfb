//! Llama (1, 2, 3.x) and the many checkpoints that reuse its layout
//! (TinyLlama, SmolLM2, …): pre-norm decoder, RMSNorm, rotate-half RoPE,
//! SwiGLU MLP — the defaults of every [`Family`] hook. `attention_bias`
//! adds biases to q, k, v *and* o; `mlp_bias` to the three MLP projections.

use super::Family;
use crate::frontend::config::ModelConfig;
use crate::frontend::decoder::{DecoderBuilder, GateActivation, SelfAttention};
use crate::frontend::FrontendError;
use kiln_runtime::ir::ValueId;

pub const HF_NAME: &str = "LlamaForCausalLM";
pub const MODEL_TYPE: &str = "llama";

pub struct Llama {
    mlp_bias: bool,
}

impl Llama {
    pub fn new(config: &ModelConfig) -> Llama {
        Llama {
            mlp_bias: config.mlp_bias,
        }
    }
}

impl Family for Llama {
    fn attention(&self, config: &ModelConfig, _layer: usize) -> SelfAttention {
        SelfAttention::with_config_biases(config)
    }

    fn mlp(
        &self,
        d: &mut DecoderBuilder,
        layer: usize,
        h: ValueId,
    ) -> Result<ValueId, FrontendError> {
        d.gated_mlp(layer, h, GateActivation::Silu, self.mlp_bias)
    }
}
