//! Mistral: the Llama layout without any biases — every default. Its
//! sliding-window attention only matters when the KV cache is longer than
//! the window, which the frontend refuses (see `GraphOptions::check`).

use super::Family;

pub const HF_NAME: &str = "MistralForCausalLM";
pub const MODEL_TYPE: &str = "mistral";

pub struct Mistral;

impl Family for Mistral {}
