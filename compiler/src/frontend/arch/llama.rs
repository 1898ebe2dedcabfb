//! Llama (1, 2, 3.x) and the many checkpoints that reuse its layout
//! (TinyLlama, SmolLM2, …): pre-norm decoder, RMSNorm, rotate-half RoPE,
//! SwiGLU MLP. `attention_bias` adds biases to q, k, v *and* o; `mlp_bias`
//! to the three MLP projections.

use crate::frontend::config::ModelConfig;
use crate::frontend::decoder::DecoderSpec;

pub const HF_NAME: &str = "LlamaForCausalLM";
pub const MODEL_TYPE: &str = "llama";

pub fn decoder_spec(config: &ModelConfig) -> DecoderSpec {
    DecoderSpec {
        qkv_bias: config.attention_bias,
        o_bias: config.attention_bias,
        mlp_bias: config.mlp_bias,
        qk_norm: false,
    }
}
