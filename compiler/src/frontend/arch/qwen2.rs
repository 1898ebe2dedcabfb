//! Qwen2 and Qwen2.5: the Llama layout with biases on q, k and v (always,
//! whatever the config says) and none on o or the MLP.

use crate::frontend::config::ModelConfig;
use crate::frontend::decoder::DecoderSpec;

pub const HF_NAME: &str = "Qwen2ForCausalLM";
pub const MODEL_TYPE: &str = "qwen2";

pub fn decoder_spec(_config: &ModelConfig) -> DecoderSpec {
    DecoderSpec {
        qkv_bias: true,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
    }
}
