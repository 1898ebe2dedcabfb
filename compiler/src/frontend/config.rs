//! `config.json` of a Hugging Face decoder-only model, in both the form
//! transformers ≥ 5 writes (`rope_parameters`, `dtype`) and the older form
//! hub checkpoints carry (`rope_theta`, `rope_scaling`, `torch_dtype`),
//! normalized into one [`ModelConfig`].

use super::arch::{Architecture, Family, FamilyConfig};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{path}: architecture `{found}` is not supported; Kiln supports {}",
        Architecture::supported_list()
    )]
    Unsupported { path: PathBuf, found: String },
}

/// How RoPE frequencies are rescaled for longer contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// What a layer's attention sees, as `layer_types` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerType {
    /// `full_attention`: every earlier position.
    Full,
    /// `sliding_attention`: the last `sliding_window` positions.
    Sliding,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// `sliding_window`: the window of the layers that slide (which those
    /// are is the family's reading of the config, see
    /// `Family::sliding_layers`).
    pub sliding_window: Option<usize>,
    /// `layer_types`, when the config lists them (one per layer).
    pub layer_types: Option<Vec<LayerType>>,
    /// The dtype the config declares for the weights (`dtype` / `torch_dtype`).
    pub declared_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The file it was read from, for errors about family-specific keys.
    pub path: PathBuf,
    /// The whole config.json object: each family reads its own keys.
    pub json: Map<String, Value>,
}

/// Reads keys from the config object, naming the file and key in errors.
struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.invalid(format!("\"{key}\" must be a non-negative integer, got {v}"))
            }),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.invalid(format!("missing \"{key}\"")))
    }

    fn positive(&self, key: &str) -> Result<usize, ConfigError> {
        match self.usize(key)? {
            0 => Err(self.invalid(format!("\"{key}\" must be positive"))),
            n => Ok(n),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.invalid(format!("\"{key}\" must be a number, got {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.invalid(format!("\"{key}\" must be true or false, got {v}"))),
        }
    }

    /// A token id or a list of them (`eos_token_id` is either).
    fn token_ids(&self, key: &str) -> Result<Vec<u32>, ConfigError> {
        let bad = || self.invalid(format!("\"{key}\" must be a token id or a list of them"));
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(bad))
                .collect(),
            Some(v) => v.as_u64().map(|n| vec![n as u32]).ok_or_else(bad),
        }
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses config.json's bytes; `path` names them in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<ModelConfig, ConfigError> {
        let json: Value = serde_json::from_slice(bytes).map_err(|source| ConfigError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(path, &json)
    }

    pub fn from_json(path: &Path, json: &Value) -> Result<ModelConfig, ConfigError> {
        let map = json.as_object().ok_or_else(|| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: "the top level must be a JSON object".into(),
        })?;
        let f = Fields { path, map };
        let architecture = Self::architecture(&f)?;

        let hidden_size = f.positive("hidden_size")?;
        let num_heads = f.positive("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(f.invalid(format!(
                "num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(f.invalid(format!(
                    "no \"head_dim\", and hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads})"
                )))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(f.invalid(format!(
                "head_dim must be even and positive for RoPE, got {head_dim}"
            )));
        }
        let num_layers = f.positive("num_hidden_layers")?;
        let max_position_embeddings = f.opt_usize("max_position_embeddings")?.unwrap_or(2048);
        let sliding_window = match f.opt_usize("sliding_window")? {
            Some(0) => return Err(f.invalid("\"sliding_window\" must be positive".into())),
            w => w,
        };
        let layer_types = Self::layer_types(&f, num_layers)?;
        let rope = Self::rope(&f, max_position_embeddings)?;
        let declared_dtype = f
            .get("dtype")
            .or_else(|| f.get("torch_dtype"))
            .and_then(|v| v.as_str())
            .map(str::to_string);

        let config = ModelConfig {
            architecture,
            vocab_size: f.positive("vocab_size")?,
            hidden_size,
            intermediate_size: f.positive("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: match f.opt_f64("rms_norm_eps")? {
                None => 1e-6,
                Some(eps) if eps.is_finite() && eps > 0.0 => eps as f32,
                Some(eps) => {
                    return Err(f.invalid(format!(
                        "\"rms_norm_eps\" must be a positive number, got {eps}"
                    )))
                }
            },
            rope,
            max_position_embeddings,
            tie_word_embeddings: f.bool_or(
                "tie_word_embeddings",
                architecture.ties_embeddings_by_default(),
            )?,
            attention_bias: f.bool_or("attention_bias", false)?,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            sliding_window,
            layer_types,
            declared_dtype,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            path: path.to_path_buf(),
            json: map.clone(),
        };
        // The family's own keys are checked now, naming the file.
        config.family()?;
        Ok(config)
    }

    /// The family's decoder for this config.
    pub fn family(&self) -> Result<Box<dyn Family>, ConfigError> {
        let keys = FamilyConfig {
            path: &self.path,
            json: &self.json,
        };
        self.architecture.family(self, &keys)
    }

    fn architecture(f: &Fields) -> Result<Architecture, ConfigError> {
        let names: Vec<&str> = f
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let model_type = f.get("model_type").and_then(|v| v.as_str());
        if let Some(arch) = names.iter().find_map(|n| Architecture::from_hf_name(n)) {
            return Ok(arch);
        }
        if names.is_empty() {
            if let Some(arch) = model_type.and_then(Architecture::from_model_type) {
                return Ok(arch);
            }
        }
        let found = match (names.first(), model_type) {
            (Some(name), _) => name.to_string(),
            (None, Some(t)) => format!("model_type {t}"),
            (None, None) => "(none: no \"architectures\" or \"model_type\")".to_string(),
        };
        Err(ConfigError::Unsupported {
            path: f.path.to_path_buf(),
            found,
        })
    }

    /// The RoPE base and scaling, from `rope_parameters` (transformers ≥ 5)
    /// or from `rope_theta` + `rope_scaling` (older files).
    fn rope(f: &Fields, max_position_embeddings: usize) -> Result<RopeConfig, ConfigError> {
        let params = f.get("rope_parameters").or_else(|| f.get("rope_scaling"));
        // Per layer type (Gemma 3): the global layers' are the model's RoPE;
        // the family reads the others.
        let params = params.and_then(|p| p.get("full_attention")).or(params);
        let empty = Map::new();
        let params = match params {
            None => &empty,
            Some(Value::Object(m)) => m,
            Some(v) => return Err(f.invalid(format!("rope parameters must be an object, got {v}"))),
        };
        let p = Fields {
            path: f.path,
            map: params,
        };
        let theta = match p.opt_f64("rope_theta")? {
            Some(t) => t,
            None => f.opt_f64("rope_theta")?.unwrap_or(10000.0),
        };
        if !(theta.is_finite() && theta > 0.0) {
            return Err(f.invalid(format!(
                "\"rope_theta\" must be a positive number, got {theta}"
            )));
        }
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let factor = || {
            p.opt_f64("factor")?
                .ok_or_else(|| f.invalid(format!("rope scaling \"{kind}\" needs a \"factor\"")))
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: p.opt_f64("low_freq_factor")?.unwrap_or(1.0),
                high_freq_factor: p.opt_f64("high_freq_factor")?.unwrap_or(4.0),
                original_max_position_embeddings: p
                    .opt_f64("original_max_position_embeddings")?
                    .unwrap_or(max_position_embeddings as f64),
            },
            other => {
                return Err(f.invalid(format!(
                    "rope scaling \"{other}\" is not supported (Kiln supports default, linear and llama3)"
                )))
            }
        };
        if let RopeScaling::Llama3 {
            low_freq_factor,
            high_freq_factor,
            ..
        } = scaling
        {
            if high_freq_factor <= low_freq_factor {
                return Err(f.invalid(
                    "llama3 rope scaling needs high_freq_factor > low_freq_factor".into(),
                ));
            }
        }
        // rope_parameters (transformers ≥ 5) or the top level (older files).
        let partial = match p.opt_f64("partial_rotary_factor")? {
            Some(p) => Some(p),
            None => f.opt_f64("partial_rotary_factor")?,
        };
        if let Some(p) = partial {
            if p != 1.0 {
                return Err(f.invalid(format!(
                    "partial_rotary_factor {p} is not supported (only 1.0)"
                )));
            }
        }
        Ok(RopeConfig { theta, scaling })
    }

    /// `layer_types`: one per layer, each `full_attention` or
    /// `sliding_attention`.
    fn layer_types(f: &Fields, num_layers: usize) -> Result<Option<Vec<LayerType>>, ConfigError> {
        let Some(types) = f.get("layer_types") else {
            return Ok(None);
        };
        let types = types
            .as_array()
            .ok_or_else(|| f.invalid(format!("\"layer_types\" must be a list, got {types}")))?;
        if types.len() != num_layers {
            return Err(f.invalid(format!(
                "\"layer_types\" lists {} layers but num_hidden_layers is {num_layers}",
                types.len()
            )));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(LayerType::Full),
                Some("sliding_attention") => Ok(LayerType::Sliding),
                _ => Err(f.invalid(format!(
                    "layer type {t} is not supported (Kiln supports full_attention and sliding_attention)"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(json: Value) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json(Path::new("config.json"), &json)
    }

    fn llama(extra: Value) -> Value {
        let mut base = json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        });
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        base
    }

    #[test]
    fn reads_both_rope_forms() {
        let new = parse(llama(json!({
            "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        })))
        .unwrap();
        let old = parse(llama(json!({
            "rope_theta": 5e5,
            "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        })))
        .unwrap();
        assert_eq!(new.rope, old.rope);
        assert_eq!(new.rope.theta, 5e5);
        let linear = parse(llama(
            json!({"rope_theta": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ))
        .unwrap();
        assert_eq!(linear.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        let err = parse(llama(
            json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}),
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("\"yarn\" is not supported"),
            "{err}"
        );
    }

    #[test]
    fn derives_head_dim_and_defaults() {
        let c = parse(llama(
            json!({"eos_token_id": [5, 7], "torch_dtype": "bfloat16"}),
        ))
        .unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![5, 7]);
        assert_eq!(c.declared_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(
            c.rope,
            RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::None
            }
        );
        let c = parse(llama(json!({"head_dim": 32}))).unwrap();
        assert_eq!(c.head_dim, 32);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let err = parse(json!({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("GPT2LMHeadModel") && err.contains("LlamaForCausalLM"),
            "{err}"
        );
        let err = parse(llama(json!({"num_key_value_heads": 3})))
            .unwrap_err()
            .to_string();
        assert!(err.contains("multiple of num_key_value_heads"), "{err}");
        let mut missing = llama(json!({}));
        missing.as_object_mut().unwrap().remove("vocab_size");
        assert!(parse(missing)
            .unwrap_err()
            .to_string()
            .contains("missing \"vocab_size\""));
        let err = parse(llama(json!({"hidden_size": "big"})))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"hidden_size\" must be a non-negative integer"),
            "{err}"
        );
    }

    #[test]
    fn reads_layer_types_and_the_window() {
        let c = parse(llama(json!({
            "sliding_window": 4096,
            "layer_types": ["sliding_attention", "full_attention"]
        })))
        .unwrap();
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(
            c.layer_types,
            Some(vec![LayerType::Sliding, LayerType::Full])
        );
        let err = parse(llama(json!({"layer_types": ["full_attention"]}))).unwrap_err();
        assert!(err.to_string().contains("lists 1 layers"), "{err}");
        let err = parse(llama(
            json!({"layer_types": ["chunked_attention", "full_attention"]}),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("\"chunked_attention\""), "{err}");
        let err = parse(llama(json!({"sliding_window": 0}))).unwrap_err();
        assert!(err.to_string().contains("must be positive"), "{err}");
    }
}
