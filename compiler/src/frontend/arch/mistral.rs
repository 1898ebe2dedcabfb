//! Mistral: the Llama layout without any biases — every default — with
//! every layer attending over the last `sliding_window` positions when the
//! config sets one (v0.1; later versions set none). transformers reads no
//! `layer_types` for Mistral (models/mistral/modeling_mistral.py).

use super::Family;
use crate::frontend::config::ModelConfig;

pub const HF_NAME: &str = "MistralForCausalLM";
pub const MODEL_TYPE: &str = "mistral";

pub struct Mistral;

impl Family for Mistral {
    fn sliding_layers(&self, config: &ModelConfig) -> Vec<bool> {
        vec![config.sliding_window.is_some(); config.num_layers]
    }
}
