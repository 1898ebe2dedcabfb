//! Qwen2 and Qwen2.5: the Llama layout with biases on q, k and v (always,
//! whatever the config says) and none on o or the MLP.

use super::Family;
use crate::frontend::config::ModelConfig;
use crate::frontend::decoder::SelfAttention;

pub const HF_NAME: &str = "Qwen2ForCausalLM";
pub const MODEL_TYPE: &str = "qwen2";

pub struct Qwen2;

impl Family for Qwen2 {
    fn attention(&self, config: &ModelConfig, _layer: usize) -> SelfAttention {
        SelfAttention {
            qkv_bias: true,
            ..SelfAttention::plain(config)
        }
    }
}
