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
    /// LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): every frequency divided
    /// by its own factor, `short_factor` for sequences up to
    /// `original_max_position_embeddings` and `long_factor` beyond, and cos
    /// and sin multiplied by `attention_factor`. Which set a static graph
    /// uses is decided by its KV-cache length (see `rope::factors`).
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: f64,
        attention_factor: f64,
    },
}

impl RopeScaling {
    /// A one-line summary (the factor lists of `longrope` are long).
    pub fn describe(&self) -> String {
        match self {
            RopeScaling::None => "default".into(),
            RopeScaling::Linear { factor } => format!("linear ×{factor}"),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => format!(
                "llama3 ×{factor} (low {low_freq_factor}, high {high_freq_factor}, original {original_max_position_embeddings})"
            ),
            RopeScaling::LongRope {
                short_factor,
                original_max_position_embeddings,
                attention_factor,
                ..
            } => format!(
                "longrope, {} factors per set, original {original_max_position_embeddings}, attention ×{attention_factor}",
                short_factor.len()
            ),
        }
    }
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
    /// The leading dimensions of each head that RoPE rotates (`head_dim`
    /// unless Phi-3's `partial_rotary_factor` < 1); the rest pass through.
    pub rotary_dim: usize,
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
        let (rope, rotary_dim) = Self::rope(&f, architecture, head_dim, max_position_embeddings)?;
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
            rotary_dim,
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
    /// or from `rope_theta` + `rope_scaling` (older files), and how many of
    /// each head's dimensions it rotates. Read as transformers' config
    /// classes read them (`modeling_rope_utils.py`: `standardize_rope_params`,
    /// `_compute_*_parameters`; `models/phi3/configuration_phi3.py`).
    fn rope(
        f: &Fields,
        architecture: Architecture,
        head_dim: usize,
        max_position_embeddings: usize,
    ) -> Result<(RopeConfig, usize), ConfigError> {
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
        let phi3 = architecture == Architecture::Phi3;
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        // Phi3Config renames the types early Phi-3 files used.
        let kind = match kind {
            "su" | "yarn" if phi3 => "longrope",
            other => other,
        };
        let factor = || {
            p.opt_f64("factor")?
                .ok_or_else(|| f.invalid(format!("rope scaling \"{kind}\" needs a \"factor\"")))
        };
        // The pretraining length: a top-level key wins over the rope
        // parameters' (and Phi3Config always has one, 4096 by default).
        let original = || -> Result<f64, ConfigError> {
            let top = match f.opt_f64("original_max_position_embeddings")? {
                None if phi3 => Some(4096.0),
                top => top,
            };
            let value = match top {
                Some(v) => v,
                None => p
                    .opt_f64("original_max_position_embeddings")?
                    .unwrap_or(max_position_embeddings as f64),
            };
            if !(value.is_finite() && value >= 1.0) {
                return Err(f.invalid(format!(
                    "\"original_max_position_embeddings\" must be a positive number, got {value}"
                )));
            }
            Ok(value)
        };
        // rope_parameters (transformers ≥ 5) or the top level (older files).
        let partial = match p.opt_f64("partial_rotary_factor")? {
            Some(p) => Some(p),
            None => f.opt_f64("partial_rotary_factor")?,
        };
        let rotary_dim = match partial {
            None => head_dim,
            Some(1.0) => head_dim,
            Some(r) if phi3 && r > 0.0 && r < 1.0 => {
                // transformers: `int(head_dim * partial_rotary_factor)`.
                let dims = (head_dim as f64 * r) as usize;
                if dims % 2 == 1 {
                    // transformers would rotate dims + 1 of them with
                    // frequencies spaced for dims: no model is made so.
                    return Err(f.invalid(format!(
                        "partial_rotary_factor {r} rotates an odd {dims} of the {head_dim} dimensions of a head; RoPE rotates pairs"
                    )));
                }
                dims
            }
            Some(r) if phi3 => {
                return Err(f.invalid(format!(
                    "partial_rotary_factor must be in (0, 1], got {r}"
                )))
            }
            Some(r) => {
                return Err(f.invalid(format!(
                    "partial_rotary_factor {r} is not supported for {} (only Phi3ForCausalLM rotates part of a head)",
                    architecture.hf_name()
                )))
            }
        };
        if rotary_dim == 0 {
            return Err(f.invalid(format!(
                "partial_rotary_factor {} leaves no dimension of the {head_dim} to rotate",
                partial.unwrap_or(1.0)
            )));
        }
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: p.opt_f64("low_freq_factor")?.unwrap_or(1.0),
                high_freq_factor: p.opt_f64("high_freq_factor")?.unwrap_or(4.0),
                original_max_position_embeddings: original()?,
            },
            "longrope" => {
                let original = original()?;
                let factors = |key: &str| -> Result<Vec<f64>, ConfigError> {
                    let list = p
                        .get(key)
                        .and_then(Value::as_array)
                        .ok_or_else(|| f.invalid(format!("rope scaling \"longrope\" needs a \"{key}\" list")))?;
                    let values: Option<Vec<f64>> = list.iter().map(Value::as_f64).collect();
                    let values = values
                        .filter(|v| v.iter().all(|x| x.is_finite() && *x > 0.0))
                        .ok_or_else(|| f.invalid(format!("\"{key}\" must be a list of positive numbers")))?;
                    if values.len() != rotary_dim / 2 {
                        return Err(f.invalid(format!(
                            "\"{key}\" has {} factors; the {rotary_dim} rotated dimensions need {}",
                            values.len(),
                            rotary_dim / 2
                        )));
                    }
                    Ok(values)
                };
                // `factor` defaults to the ratio of the two lengths, and the
                // attention factor to LongRoPE's sqrt(1 + ln s / ln L).
                let factor = p
                    .opt_f64("factor")?
                    .unwrap_or(max_position_embeddings as f64 / original);
                let attention_factor = match p.opt_f64("attention_factor")? {
                    Some(a) if a.is_finite() && a > 0.0 => a,
                    Some(a) => {
                        return Err(f.invalid(format!(
                            "\"attention_factor\" must be a positive number, got {a}"
                        )))
                    }
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / original.ln()).sqrt(),
                };
                if !attention_factor.is_finite() {
                    return Err(f.invalid(format!(
                        "longrope's attention factor sqrt(1 + ln {factor} / ln {original}) is not finite; give \"attention_factor\""
                    )));
                }
                RopeScaling::LongRope {
                    short_factor: factors("short_factor")?,
                    long_factor: factors("long_factor")?,
                    original_max_position_embeddings: original,
                    attention_factor,
                }
            }
            other => {
                return Err(f.invalid(format!(
                    "rope scaling \"{other}\" is not supported (Kiln supports default, linear, llama3 and longrope)"
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
        Ok((RopeConfig { theta, scaling }, rotary_dim))
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

    fn phi3(extra: Value) -> Value {
        let mut base = llama(json!({"architectures": ["Phi3ForCausalLM"]}));
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        base
    }

    #[test]
    fn reads_longrope_as_phi3config_does() {
        // Phi-3-mini-128k's form: the old "su" name, the original length at
        // the top level, the attention factor left to its default.
        let short: Vec<f64> = (0..8).map(|i| 1.0 + i as f64 / 10.0).collect();
        let long: Vec<f64> = (0..8).map(|i| 2.0 + i as f64).collect();
        let c = parse(phi3(json!({
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "su", "short_factor": short, "long_factor": long},
        })))
        .unwrap();
        let expected = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
        assert_eq!(
            c.rope.scaling,
            RopeScaling::LongRope {
                short_factor: short.clone(),
                long_factor: long.clone(),
                original_max_position_embeddings: 4096.0,
                attention_factor: expected,
            }
        );
        assert_eq!(c.rotary_dim, 16);
        // Phi3Config's own original length (4096 unless the top level says
        // otherwise) wins over one inside the rope parameters; an explicit
        // attention factor is kept.
        let c = parse(phi3(json!({
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "longrope", "short_factor": short, "long_factor": long,
                "original_max_position_embeddings": 2048, "attention_factor": 1.25},
        })))
        .unwrap();
        let RopeScaling::LongRope {
            original_max_position_embeddings,
            attention_factor,
            ..
        } = c.rope.scaling
        else {
            panic!("{:?}", c.rope.scaling)
        };
        assert_eq!(
            (original_max_position_embeddings, attention_factor),
            (4096.0, 1.25)
        );
        // Factors must match the rotated dimensions.
        let err = parse(phi3(json!({
            "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": long},
        })))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("\"short_factor\" has 1 factors") && err.contains("need 8"),
            "{err}"
        );
    }

    #[test]
    fn partial_rotary_is_phi3s() {
        let c = parse(phi3(json!({
            "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.75},
        })))
        .unwrap();
        assert_eq!((c.head_dim, c.rotary_dim), (16, 12));
        // Older files: at the top level; transformers truncates (16 · 0.3).
        let c = parse(phi3(json!({"partial_rotary_factor": 0.3}))).unwrap();
        assert_eq!(c.rotary_dim, 4);
        let err = parse(phi3(json!({"partial_rotary_factor": 0.35})))
            .unwrap_err()
            .to_string();
        assert!(err.contains("odd 5 of the 16"), "{err}");
        let err = parse(llama(json!({"partial_rotary_factor": 0.5})))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("partial_rotary_factor 0.5") && err.contains("LlamaForCausalLM"),
            "{err}"
        );
        let err = parse(phi3(json!({"partial_rotary_factor": 0.01})))
            .unwrap_err()
            .to_string();
        assert!(err.contains("leaves no dimension"), "{err}");
    }

    #[test]
    fn a_top_level_original_length_wins_for_llama3() {
        let c = parse(llama(json!({
            "original_max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                "original_max_position_embeddings": 8192},
        })))
        .unwrap();
        let RopeScaling::Llama3 {
            original_max_position_embeddings,
            ..
        } = c.rope.scaling
        else {
            panic!()
        };
        assert_eq!(original_max_position_embeddings, 1024.0);
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
