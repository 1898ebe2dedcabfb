//! The architectures Kiln can lower, one file each. Every file says how its
//! architecture differs from the shared decoder (see `decoder.rs`).

mod llama;
mod mistral;
mod qwen2;
mod qwen3;

use super::config::ModelConfig;
use super::decoder::DecoderSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Mistral,
    Qwen3,
}

impl Architecture {
    pub const ALL: [Architecture; 4] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Mistral,
        Architecture::Qwen3,
    ];

    /// The class name in `config.json`'s `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => llama::HF_NAME,
            Architecture::Qwen2 => qwen2::HF_NAME,
            Architecture::Mistral => mistral::HF_NAME,
            Architecture::Qwen3 => qwen3::HF_NAME,
        }
    }

    /// The `model_type` in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => llama::MODEL_TYPE,
            Architecture::Qwen2 => qwen2::MODEL_TYPE,
            Architecture::Mistral => mistral::MODEL_TYPE,
            Architecture::Qwen3 => qwen3::MODEL_TYPE,
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Architecture> {
        Self::ALL.into_iter().find(|a| a.hf_name() == name)
    }

    pub fn from_model_type(model_type: &str) -> Option<Architecture> {
        Self::ALL.into_iter().find(|a| a.model_type() == model_type)
    }

    pub fn supported_list() -> String {
        Self::ALL.map(|a| a.hf_name()).join(", ")
    }

    /// How this architecture's layers differ from the shared decoder.
    pub fn decoder_spec(self, config: &ModelConfig) -> DecoderSpec {
        match self {
            Architecture::Llama => llama::decoder_spec(config),
            Architecture::Qwen2 => qwen2::decoder_spec(config),
            Architecture::Mistral => mistral::decoder_spec(config),
            Architecture::Qwen3 => qwen3::decoder_spec(config),
        }
    }
}
