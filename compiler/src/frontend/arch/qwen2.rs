//! Qwen2 and Qwen2.5: the Llama layout with biases on q, k and v (always,
//! whatever the config says) and none on o or the MLP.
//!
//! Sliding windows only with `use_sliding_window` (off by default), on the
//! layers `layer_types` marks, else on layers from `max_window_layers` on
//! (transformers' `Qwen2Config.__post_init__`, models/qwen2/configuration_qwen2.py).

use super::{sliding_by_layer_types, Family, FamilyConfig};
use crate::frontend::config::{ConfigError, ModelConfig};
use crate::frontend::decoder::SelfAttention;

pub const HF_NAME: &str = "Qwen2ForCausalLM";
pub const MODEL_TYPE: &str = "qwen2";

/// Which layers of a Qwen2 or Qwen3 config slide.
pub struct QwenWindows {
    use_sliding_window: bool,
    max_window_layers: usize,
}

impl QwenWindows {
    pub fn new(keys: &FamilyConfig) -> Result<QwenWindows, ConfigError> {
        // transformers' defaults.
        Ok(QwenWindows {
            use_sliding_window: keys.bool("use_sliding_window")?.unwrap_or(false),
            max_window_layers: keys.usize("max_window_layers")?.unwrap_or(28),
        })
    }

    pub fn sliding_layers(&self, config: &ModelConfig) -> Vec<bool> {
        if !self.use_sliding_window {
            return vec![false; config.num_layers];
        }
        sliding_by_layer_types(config, |layer| layer >= self.max_window_layers)
    }
}

pub struct Qwen2 {
    windows: QwenWindows,
}

impl Qwen2 {
    pub fn new(keys: &FamilyConfig) -> Result<Qwen2, ConfigError> {
        Ok(Qwen2 {
            windows: QwenWindows::new(keys)?,
        })
    }
}

impl Family for Qwen2 {
    fn sliding_layers(&self, config: &ModelConfig) -> Vec<bool> {
        self.windows.sliding_layers(config)
    }

    fn attention(&self, config: &ModelConfig, _layer: usize) -> SelfAttention {
        SelfAttention {
            qkv_bias: true,
            ..SelfAttention::plain(config)
        }
    }
}
