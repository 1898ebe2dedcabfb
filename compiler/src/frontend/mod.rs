//! The Hugging Face frontend: a model directory (`config.json`,
//! safetensors, `tokenizer.json`) → Kiln IR.

pub mod arch;
pub mod config;
pub mod decoder;
pub mod rope;

use config::{ConfigError, ModelConfig};
use kiln_runtime::ir::model::{ModelInfo, FORMAT_VERSION};
use kiln_runtime::ir::{IrError, KvCacheLayout, ModelIr};
use kiln_runtime::weights::{WeightError, WeightStore};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{0} is not a Hugging Face model directory (it has no config.json)")]
    NotAModel(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("building the IR failed: {0}")]
    Ir(#[from] IrError),
    #[error("{0}")]
    Options(String),
}

/// Static sizes the user asked for; `None` takes the model's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShapeRequest {
    pub prefill_len: Option<usize>,
    pub max_seq_len: Option<usize>,
}

/// Static sizes of the graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphOptions {
    /// Tokens per prefill step; longer prompts run in several steps.
    pub prefill_len: usize,
    /// KV-cache slots: the most positions a conversation can use.
    pub max_seq_len: usize,
}

impl GraphOptions {
    pub const DEFAULT_PREFILL_LEN: usize = 64;
    pub const DEFAULT_MAX_SEQ_LEN: usize = 1024;

    /// What the user asked for, with defaults (limited by what the model
    /// supports) for what they did not.
    pub fn resolve(config: &ModelConfig, request: &ShapeRequest) -> GraphOptions {
        let max_seq_len = request
            .max_seq_len
            .unwrap_or(Self::DEFAULT_MAX_SEQ_LEN.min(config.max_position_embeddings));
        GraphOptions {
            prefill_len: request
                .prefill_len
                .unwrap_or(Self::DEFAULT_PREFILL_LEN.min(max_seq_len)),
            max_seq_len,
        }
    }

    fn check(&self, config: &ModelConfig) -> Result<(), FrontendError> {
        let fail = |m: String| Err(FrontendError::Options(m));
        if self.prefill_len == 0 || self.max_seq_len == 0 {
            return fail("--prefill-len and --max-seq-len must be at least 1".into());
        }
        if self.prefill_len > self.max_seq_len {
            return fail(format!(
                "--prefill-len {} is longer than --max-seq-len {}",
                self.prefill_len, self.max_seq_len
            ));
        }
        if self.max_seq_len > config.max_position_embeddings {
            return fail(format!(
                "--max-seq-len {} exceeds the model's max_position_embeddings ({})",
                self.max_seq_len, config.max_position_embeddings
            ));
        }
        if let Some(window) = config.sliding_window.filter(|&w| w < self.max_seq_len) {
            return fail(format!(
                "this model uses sliding-window attention over {window} tokens, which Kiln does not \
                 implement; use --max-seq-len {window} or less, where the window changes nothing"
            ));
        }
        Ok(())
    }
}

/// A Hugging Face model directory, opened and validated.
pub struct HfModel {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub weights: WeightStore,
    /// `tokenizer.json`, when the directory has one.
    pub tokenizer: Option<PathBuf>,
    /// From `generation_config.json` when present, else from `config.json`.
    pub eos_token_ids: Vec<u32>,
}

impl HfModel {
    pub fn open(dir: &Path) -> Result<HfModel, FrontendError> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(FrontendError::NotAModel(dir.to_path_buf()));
        }
        let config = ModelConfig::from_file(&config_path)?;
        let weights = WeightStore::open_dir(dir)?;
        let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
        let eos_token_ids = match Self::generation_eos(dir)? {
            Some(ids) if !ids.is_empty() => ids,
            _ => config.eos_token_ids.clone(),
        };
        Ok(HfModel {
            dir: dir.to_path_buf(),
            config,
            weights,
            tokenizer,
            eos_token_ids,
        })
    }

    fn generation_eos(dir: &Path) -> Result<Option<Vec<u32>>, FrontendError> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ConfigError::Json {
                path: path.clone(),
                source,
            })?;
        let ids = match json.get("eos_token_id") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        };
        Ok(Some(ids))
    }

    /// Lowers the model into its prefill and decode graphs. Adds the RoPE
    /// tables to the weight store.
    pub fn build_ir(&mut self, options: &GraphOptions) -> Result<ModelIr, FrontendError> {
        let c = &self.config;
        options.check(c)?;
        let cache = KvCacheLayout {
            layers: c.num_layers,
            kv_heads: c.num_kv_heads,
            max_len: options.max_seq_len,
            head_dim: c.head_dim,
        };
        let (cos, sin) = rope::tables(&c.rope, c.head_dim, cache.max_len);
        self.weights
            .insert_f32(decoder::ROPE_COS, vec![cache.max_len, c.head_dim], cos);
        self.weights
            .insert_f32(decoder::ROPE_SIN, vec![cache.max_len, c.head_dim], sin);

        let spec = c.architecture.decoder_spec(c);
        let prefill = decoder::build_graph(
            "prefill",
            c,
            spec,
            &self.weights,
            options.prefill_len,
            &cache,
        )?;
        let decode = decoder::build_graph("decode", c, spec, &self.weights, 1, &cache)?;
        let weight_dtype = self.weights.tensor_type("model.embed_tokens.weight")?.dtype;
        Ok(ModelIr {
            format_version: FORMAT_VERSION,
            info: ModelInfo {
                architecture: c.architecture.hf_name().to_string(),
                vocab_size: c.vocab_size,
                hidden_size: c.hidden_size,
                num_layers: c.num_layers,
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                weight_dtype,
                bos_token_id: c.bos_token_id,
                eos_token_ids: self.eos_token_ids.clone(),
            },
            kv_cache: cache,
            prefill_len: options.prefill_len,
            prefill,
            decode,
        })
    }
}
