//! Mistral: the Llama layout without any biases. Its sliding-window attention
//! only matters when the KV cache is longer than the window, which the
//! frontend refuses (see `GraphOptions::check`).

use crate::frontend::config::ModelConfig;
use crate::frontend::decoder::DecoderSpec;

pub const HF_NAME: &str = "MistralForCausalLM";
pub const MODEL_TYPE: &str = "mistral";

pub fn decoder_spec(_config: &ModelConfig) -> DecoderSpec {
    DecoderSpec {
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
    }
}
