//! Qwen3: the Llama layout plus an RMSNorm over each head of q and k
//! (`q_norm`, `k_norm`, weights of shape `[head_dim]`) before RoPE.
//! `attention_bias` adds biases to q, k, v and o, as in Llama.

use super::Family;
use crate::frontend::config::ModelConfig;
use crate::frontend::decoder::SelfAttention;

pub const HF_NAME: &str = "Qwen3ForCausalLM";
pub const MODEL_TYPE: &str = "qwen3";

pub struct Qwen3;

impl Family for Qwen3 {
    fn attention(&self, config: &ModelConfig, _layer: usize) -> SelfAttention {
        SelfAttention {
            qk_norm: true,
            ..SelfAttention::with_config_biases(config)
        }
    }
}
