//! Qwen3: the Llama layout plus an RMSNorm over each head of q and k
//! (`q_norm`, `k_norm`, weights of shape `[head_dim]`) before RoPE.
//! `attention_bias` adds biases to q, k, v and o, as in Llama. Sliding
//! windows as in Qwen2.

use super::qwen2::QwenWindows;
use super::{Family, FamilyConfig};
use crate::frontend::config::{ConfigError, ModelConfig};
use crate::frontend::decoder::SelfAttention;

pub const HF_NAME: &str = "Qwen3ForCausalLM";
pub const MODEL_TYPE: &str = "qwen3";

pub struct Qwen3 {
    windows: QwenWindows,
}

impl Qwen3 {
    pub fn new(keys: &FamilyConfig) -> Result<Qwen3, ConfigError> {
        Ok(Qwen3 {
            windows: QwenWindows::new(keys)?,
        })
    }
}

impl Family for Qwen3 {
    fn sliding_layers(&self, config: &ModelConfig) -> Vec<bool> {
        self.windows.sliding_layers(config)
    }

    fn attention(&self, config: &ModelConfig, _layer: usize) -> SelfAttention {
        SelfAttention {
            qk_norm: true,
            ..SelfAttention::with_config_biases(config)
        }
    }
}
