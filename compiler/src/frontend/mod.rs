//! The frontend: a Hugging Face model directory (`config.json`,
//! safetensors, `tokenizer.json`) or a llama.cpp GGUF file → Kiln IR.

pub mod arch;
pub mod config;
pub mod decoder;
pub mod gguf;
pub mod rope;

use config::{ConfigError, ModelConfig};
use kiln_runtime::generate::chat::{ChatError, ChatTemplate};
use kiln_runtime::generate::tokenizer::Tokenizer;
use kiln_runtime::ir::model::{ModelInfo, FORMAT_VERSION};
use kiln_runtime::ir::{GraphLayout, IrError, KvCacheLayout, ModelIr};
use kiln_runtime::weights::{QuantTensors, WeightError, WeightStore};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{0} is not a Hugging Face model directory (it has no config.json), nor a .gguf file")]
    NotAModel(PathBuf),
    #[error("{file} is a file; give the model directory that holds it ({dir}), or a .gguf file")]
    FileNotDirectory { file: PathBuf, dir: PathBuf },
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error(transparent)]
    Gguf(#[from] gguf::GgufModelError),
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
    pub layout: GraphLayout,
}

/// Static sizes of the graphs, and which logits they output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphOptions {
    /// Tokens per prefill step; longer prompts run in several steps.
    pub prefill_len: usize,
    /// KV-cache slots: the most positions a conversation can use.
    pub max_seq_len: usize,
    /// One position's logits (what sessions and the backends expect), or
    /// every position's.
    pub logits: decoder::LogitsOutput,
    /// Prefill and decode graphs, or one graph of `prefill_len` tokens.
    pub layout: GraphLayout,
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
            logits: decoder::LogitsOutput::Selected,
            layout: request.layout,
        }
    }

    pub fn check(&self, config: &ModelConfig) -> Result<(), FrontendError> {
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
        Ok(())
    }
}

/// The Hugging Face files beside the weights, held in memory: read from a
/// model directory, or rebuilt from a GGUF file's metadata.
#[derive(Default)]
pub struct SideFiles {
    pub config: Vec<u8>,
    pub tokenizer: Option<Vec<u8>>,
    pub tokenizer_config: Option<Vec<u8>>,
    pub generation_config: Option<Vec<u8>>,
    pub chat_template: Option<Vec<u8>>,
}

impl SideFiles {
    pub const CONFIG: &'static str = "config.json";
    pub const TOKENIZER: &'static str = "tokenizer.json";
    pub const TOKENIZER_CONFIG: &'static str = "tokenizer_config.json";
    pub const GENERATION_CONFIG: &'static str = "generation_config.json";
    pub const CHAT_TEMPLATE: &'static str = kiln_runtime::generate::chat::TEMPLATE_FILE;

    fn read_dir(dir: &Path) -> Result<SideFiles, FrontendError> {
        let read = |name: &str| -> Result<Option<Vec<u8>>, FrontendError> {
            let path = dir.join(name);
            if !path.is_file() {
                return Ok(None);
            }
            std::fs::read(&path)
                .map(Some)
                .map_err(|source| ConfigError::Io { path, source }.into())
        };
        Ok(SideFiles {
            config: read(Self::CONFIG)?.ok_or_else(|| FrontendError::NotAModel(dir.into()))?,
            tokenizer: read(Self::TOKENIZER)?,
            tokenizer_config: read(Self::TOKENIZER_CONFIG)?,
            generation_config: read(Self::GENERATION_CONFIG)?,
            chat_template: read(Self::CHAT_TEMPLATE)?,
        })
    }

    /// Each file present, by its name in a model directory.
    pub fn present(&self) -> Vec<(&'static str, &[u8])> {
        [
            (Self::CONFIG, Some(&self.config)),
            (Self::TOKENIZER, self.tokenizer.as_ref()),
            (Self::TOKENIZER_CONFIG, self.tokenizer_config.as_ref()),
            (Self::GENERATION_CONFIG, self.generation_config.as_ref()),
            (Self::CHAT_TEMPLATE, self.chat_template.as_ref()),
        ]
        .into_iter()
        .filter_map(|(name, bytes)| Some((name, bytes?.as_slice())))
        .collect()
    }
}

/// A model in Hugging Face form, opened and validated: from a model
/// directory, or from a GGUF file dequantized into the same form.
pub struct HfModel {
    /// The directory or .gguf file it was opened from.
    pub source: PathBuf,
    pub config: ModelConfig,
    pub weights: WeightStore,
    pub files: SideFiles,
    /// Why there is no tokenizer, when there is none.
    pub no_tokenizer_reason: Option<String>,
    /// From `generation_config.json` when present, else from `config.json`.
    pub eos_token_ids: Vec<u32>,
    /// Weights stored quantized (a GGUF's blocks), by the float weight's
    /// name: where their tensors are in `weights`. The decoder reads these
    /// through `QuantLinear` / `QuantGather`.
    pub quantized: BTreeMap<String, QuantTensors>,
}

impl HfModel {
    /// Opens a model directory or a .gguf file, with every weight in float.
    pub fn open(path: &Path) -> Result<HfModel, FrontendError> {
        Self::open_keeping_blocks(path, false)
    }

    /// Opens a model directory or a .gguf file; with `keep_blocks`, a GGUF's
    /// Q8_0, Q4_0, Q4_1, Q5_0, Q4_K and Q6_K matrices stay quantized (see [`Self::quantized`]).
    pub fn open_keeping_blocks(path: &Path, keep_blocks: bool) -> Result<HfModel, FrontendError> {
        let gguf_name = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if path.is_file() && (gguf_name || is_gguf(path)) {
            return Self::open_gguf(path, keep_blocks);
        }
        if !path.exists() {
            return Err(FrontendError::Missing(path.to_path_buf()));
        }
        if path.is_file() {
            // config.json, model.safetensors, …: the directory is meant.
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if dir.join(SideFiles::CONFIG).is_file() {
                return Err(FrontendError::FileNotDirectory {
                    file: path.to_path_buf(),
                    dir,
                });
            }
            return Err(FrontendError::NotAModel(path.to_path_buf()));
        }
        if !path.join(SideFiles::CONFIG).is_file() {
            return Err(FrontendError::NotAModel(path.to_path_buf()));
        }
        let files = SideFiles::read_dir(path)?;
        let config_path = path.join(SideFiles::CONFIG);
        let config = ModelConfig::from_bytes(&config_path, &files.config)?;
        let weights = WeightStore::open_dir(path)?;
        let no_tokenizer_reason = files.tokenizer.is_none().then(|| {
            format!(
                "{} has no tokenizer.json; pass the prompt as --token-ids instead",
                path.display()
            )
        });
        Self::assemble(path, config, weights, files, no_tokenizer_reason)
    }

    /// Whether the model came from a GGUF file.
    pub fn is_gguf(&self) -> bool {
        self.source.is_file()
    }

    fn open_gguf(path: &Path, keep_blocks: bool) -> Result<HfModel, FrontendError> {
        let model = gguf::GgufModel::open(path, keep_blocks)?;
        let config_bytes =
            serde_json::to_vec_pretty(&model.config_json).expect("a JSON value serializes");
        let config = ModelConfig::from_bytes(path, &config_bytes)?;
        let mut weights = WeightStore::default();
        weights.set_owned_origin(path);
        let mut quantized = BTreeMap::new();
        for (name, shape, data) in model.tensors {
            match data {
                gguf::GgufTensor::Float(data) => weights.insert_f32(&name, shape, data),
                gguf::GgufTensor::Quantized(matrix) => {
                    let prefix = name.strip_suffix(".weight").unwrap_or(&name);
                    let tensors = weights.insert_quantized(prefix, matrix);
                    quantized.insert(name, tensors);
                }
            }
        }
        let mut files = SideFiles {
            config: config_bytes,
            ..SideFiles::default()
        };
        let no_tokenizer_reason = match model.tokenizer {
            Ok(t) => {
                files.tokenizer = Some(t.tokenizer_json.into_bytes());
                files.tokenizer_config = Some(t.tokenizer_config_json.into_bytes());
                None
            }
            Err(why) => Some(format!(
                "{}: {why}; pass the prompt as --token-ids instead",
                path.display()
            )),
        };
        let mut model = Self::assemble(path, config, weights, files, no_tokenizer_reason)?;
        model.quantized = quantized;
        Ok(model)
    }

    fn assemble(
        source: &Path,
        config: ModelConfig,
        weights: WeightStore,
        files: SideFiles,
        no_tokenizer_reason: Option<String>,
    ) -> Result<HfModel, FrontendError> {
        let generation_path = source.join(SideFiles::GENERATION_CONFIG);
        let eos_token_ids = match files.generation_config.as_deref() {
            Some(bytes) => generation_eos(&generation_path, bytes)?,
            None => None,
        }
        .filter(|ids| !ids.is_empty())
        .unwrap_or_else(|| config.eos_token_ids.clone());
        Ok(HfModel {
            source: source.to_path_buf(),
            config,
            weights,
            files,
            no_tokenizer_reason,
            eos_token_ids,
            quantized: BTreeMap::new(),
        })
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>, ChatError> {
        // A GGUF's files were rebuilt from the GGUF itself: name it in errors.
        let origin = |name: &str| match self.source.is_dir() {
            true => self.source.join(name),
            false => self.source.clone(),
        };
        let (config_path, template_path) = (
            origin(SideFiles::TOKENIZER_CONFIG),
            origin(SideFiles::CHAT_TEMPLATE),
        );
        ChatTemplate::from_files(
            self.files
                .tokenizer_config
                .as_deref()
                .map(|b| (b, config_path.as_path())),
            self.files
                .chat_template
                .as_deref()
                .map(|b| (b, template_path.as_path())),
        )
    }

    /// The model's tokenizer; an error that says what to do when it has none.
    pub fn tokenizer(&self) -> Result<Tokenizer, String> {
        match &self.files.tokenizer {
            Some(bytes) => {
                let origin = self.source.join(SideFiles::TOKENIZER);
                Tokenizer::from_bytes(bytes, &origin).map_err(|e| e.to_string())
            }
            None => Err(self
                .no_tokenizer_reason
                .clone()
                .unwrap_or_else(|| "the model has no tokenizer".into())),
        }
    }

    /// Lowers the model into its prefill and decode graphs. Adds the RoPE
    /// tables to the weight store. With [`decoder::LogitsOutput::AllPositions`]
    /// both graphs output every position's logits and take no `logits_index`:
    /// such a model is for scoring text, not for sessions or compiling.
    pub fn build_ir(&mut self, options: &GraphOptions) -> Result<ModelIr, FrontendError> {
        let c = &self.config;
        options.check(c)?;
        let cache = KvCacheLayout {
            layers: c.num_layers,
            kv_heads: c.num_kv_heads,
            max_len: options.max_seq_len,
            head_dim: c.head_dim,
        };
        // Fused projections are split, 1 + w norms added, before the checks
        // below read the tensors the decoder will.
        let family = c.family()?;
        family.prepare_weights(&mut self.weights)?;
        // The weights must bear out the config's sizes before anything is
        // allocated from them: a config claiming 2^40 layers or a huge head
        // is refused here, naming the tensor, not by the allocator.
        let w = &self.weights;
        let expect = |name: &str, shape: &[usize]| match self.quantized.get(name) {
            Some(q) => w.expect(&q.q, shape),
            None => w.expect(name, shape),
        };
        expect("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let last = c.num_layers - 1;
        expect(
            &format!("model.layers.{last}.input_layernorm.weight"),
            &[c.hidden_size],
        )?;
        expect(
            "model.layers.0.self_attn.q_proj.weight",
            &[c.num_heads * c.head_dim, c.hidden_size],
        )?;
        let local = decoder::local_rope(family.as_ref(), c);
        let tables = [(Some(&c.rope), decoder::rope_tables(cache.max_len))]
            .into_iter()
            .chain([(local, decoder::local_rope_tables(cache.max_len))]);
        for (rope, (cos_name, sin_name)) in tables {
            let Some(rope) = rope else { continue };
            let (cos, sin) = rope::tables(rope, c.rotary_dim, cache.max_len);
            self.weights
                .insert_f32(&cos_name, vec![cache.max_len, c.rotary_dim], cos);
            self.weights
                .insert_f32(&sin_name, vec![cache.max_len, c.rotary_dim], sin);
        }

        let weights = decoder::WeightSource::Store(decoder::Weights {
            store: &self.weights,
            quantized: &self.quantized,
        });
        let graph = |name: &str, tokens: usize| {
            decoder::build_graph(
                name,
                c,
                family.as_ref(),
                weights,
                tokens,
                &cache,
                options.logits,
            )
        };
        let graphs = match options.layout {
            GraphLayout::Split => vec![graph("prefill", options.prefill_len)?, graph("decode", 1)?],
            GraphLayout::Single => vec![graph("step", options.prefill_len)?],
        };
        let embed = "model.embed_tokens.weight";
        let weight_dtype = match self.quantized.get(embed) {
            Some(q) => self.weights.tensor_type(&q.q)?.dtype,
            None => self.weights.tensor_type(embed)?.dtype,
        };
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
            graphs,
        })
    }
}

/// A file to read as GGUF: named .gguf (so a corrupt one gets the GGUF
/// reader's error), or starting with GGUF's magic whatever its name.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    if !path.is_file() {
        return false;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == gguf::reader::MAGIC
}

/// `eos_token_id` from generation_config.json, if it names any.
fn generation_eos(path: &Path, bytes: &[u8]) -> Result<Option<Vec<u32>>, FrontendError> {
    let json: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|source| ConfigError::Json {
            path: path.to_path_buf(),
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
