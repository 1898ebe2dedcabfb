//! Qwen3: the Llama layout plus an RMSNorm over each head of q and k
//! (`q_norm`, `k_norm`, weights of shape `[head_dim]`) before RoPE.
//! `attention_bias` adds biases to q, k, v and o, as in Llama.

use crate::frontend::config::ModelConfig;
use crate::frontend::decoder::DecoderSpec;

pub const HF_NAME: &str = "Qwen3ForCausalLM";
pub const MODEL_TYPE: &str = "qwen3";

pub fn decoder_spec(config: &ModelConfig) -> DecoderSpec {
    DecoderSpec {
        qkv_bias: config.attention_bias,
        o_bias: config.attention_bias,
        mlp_bias: false,
        qk_norm: true,
    }
}
