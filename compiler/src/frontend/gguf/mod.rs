//! The GGUF frontend: a llama.cpp model file → the same Hugging Face form
//! (config.json, named f32 weights, tokenizer.json) the safetensors frontend
//! reads, so everything after it cannot tell the two apart.
//!
//! - [`reader`] parses the container; [`quant`] dequantizes ggml blocks.
//! - Here: llama.cpp's metadata keys → config.json keys, its tensor names →
//!   transformers' names, the Q/K row order llama.cpp changes for Llama, and
//!   the `1 +` it adds to Gemma's norm weights. Its RoPE factor tensors
//!   (`rope_freqs`, `rope_factors_long/short`) are not weights: they become
//!   config.json's `rope_scaling`.
//! - [`tokenizer`] rebuilds tokenizer.json and tokenizer_config.json.

pub mod quant;
pub mod reader;
pub mod tokenizer;

use kiln_runtime::ir::quant::QuantizedMatrix;
use reader::{GgufError, GgufFile, MetaValue, TensorInfo};
use serde_json::{json, Value};
use std::path::Path;

pub use tokenizer::TokenizerFiles;

#[derive(Debug, thiserror::Error)]
pub enum GgufModelError {
    #[error(transparent)]
    File(#[from] GgufError),
    #[error("{path}: {message}")]
    Unsupported { path: String, message: String },
}

/// llama.cpp architecture name → (transformers class, whether llama.cpp
/// permuted the Q/K rows for its interleaved RoPE).
const ARCHITECTURES: [(&str, &str, bool); 8] = [
    ("llama", "LlamaForCausalLM", true),
    ("mistral", "MistralForCausalLM", true),
    ("qwen2", "Qwen2ForCausalLM", false),
    ("qwen3", "Qwen3ForCausalLM", false),
    ("gemma", "GemmaForCausalLM", false),
    ("gemma2", "Gemma2ForCausalLM", false),
    ("gemma3", "Gemma3ForCausalLM", false),
    // Fused attn_qkv and ffn_up (gate then up) as transformers stores them.
    ("phi3", "Phi3ForCausalLM", false),
];

/// Tensors llama.cpp's converter writes for RoPE: per-frequency divisors,
/// read into config.json rather than loaded as weights.
const ROPE_FREQS: &str = "rope_freqs.weight";
const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";
const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";

/// A weight of a GGUF file: dequantized, or kept in its blocks.
pub enum GgufTensor {
    Float(Vec<f32>),
    /// A Q8_0, Q4_0, Q4_1, Q5_0, Q4_K or Q6_K matrix in Kiln's quantized form (see
    /// [`quant::to_quantized`]).
    Quantized(QuantizedMatrix),
}

/// A GGUF file in Hugging Face form.
pub struct GgufModel {
    /// config.json as transformers would write it for this model.
    pub config_json: Value,
    /// Weights under transformers' names (Q/K rows restored).
    pub tensors: Vec<(String, Vec<usize>, GgufTensor)>,
    pub tokenizer: Result<TokenizerFiles, String>,
    /// The file's metadata for `kiln inspect`: (key, short value).
    pub summary: Vec<(String, String)>,
}

impl GgufModel {
    /// Reads `path`. With `keep_blocks`, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K and Q6_K matrices stay
    /// quantized (see [`quant::to_quantized`]); every other tensor, and all
    /// of them without it, is dequantized to f32.
    pub fn open(path: &Path, keep_blocks: bool) -> Result<GgufModel, GgufModelError> {
        let file = GgufFile::open(path)?;
        let unsupported = |message: String| GgufModelError::Unsupported {
            path: path.display().to_string(),
            message,
        };
        let arch = file
            .get("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| unsupported("it has no general.architecture".into()))?
            .to_string();
        let &(_, class, permuted) = ARCHITECTURES
            .iter()
            .find(|(name, _, _)| *name == arch)
            .ok_or_else(|| {
                let known: Vec<&str> = ARCHITECTURES.iter().map(|a| a.0).collect();
                unsupported(format!(
                    "its architecture `{arch}` is not one Kiln supports ({})",
                    known.join(", ")
                ))
            })?;
        let config_json = config_json(&file, &arch, class).map_err(unsupported)?;
        let heads = config_json["num_attention_heads"].as_u64().unwrap_or(1) as usize;
        let kv_heads = config_json["num_key_value_heads"].as_u64().unwrap_or(1) as usize;
        let head_dim = config_json["head_dim"].as_u64().unwrap_or(0) as usize;
        let intermediate = config_json["intermediate_size"].as_u64().unwrap_or(0) as usize;

        let layers = config_json["num_hidden_layers"].as_u64().unwrap_or(0);
        let mut names = std::collections::BTreeMap::new();
        let mut tensors = Vec::with_capacity(file.tensors.len());
        for info in &file.tensors {
            if [ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT].contains(&info.name.as_str()) {
                continue; // in config_json's rope_scaling
            }
            let name = hf_name(&info.name, &arch).ok_or_else(|| {
                unsupported(format!(
                    "it holds tensor `{}`, which Kiln does not know how to map",
                    info.name
                ))
            })?;
            // Checked before dequantizing: `blk.00` and `blk.0` are one
            // name, and a layer past block_count is one nobody reads.
            if let Some(layer) = layer_of(&name).filter(|&l| l >= layers) {
                return Err(unsupported(format!(
                    "tensor `{}` is for layer {layer}, but {arch}.block_count is {layers}",
                    info.name
                )));
            }
            if let Some(first) = names.insert(name.clone(), info.name.clone()) {
                return Err(unsupported(format!(
                    "tensors `{first}` and `{}` are both `{name}`",
                    info.name
                )));
            }
            let permuted_heads = match permuted {
                true if name.ends_with("self_attn.q_proj.weight")
                    || name.ends_with("q_proj.bias") =>
                {
                    Some(heads)
                }
                true if name.ends_with("self_attn.k_proj.weight")
                    || name.ends_with("k_proj.bias") =>
                {
                    Some(kv_heads)
                }
                _ => None,
            };
            let kept = match (keep_blocks, &info.shape[..]) {
                (true, &[n, k]) => {
                    quant::to_quantized(info.ggml_type, file.tensor_bytes(info), n, k)
                }
                _ => None,
            };
            let data = match kept {
                Some(_) if norm_offset(&arch, &name) != 0.0 => {
                    return Err(unsupported(format!(
                        "norm tensor `{}` is quantized; Kiln reads Gemma norms in float only",
                        info.name
                    )))
                }
                Some(mut q) => {
                    if let Some(heads) = permuted_heads {
                        q.q = unpermute_rows(info, &q.q, heads).map_err(unsupported)?;
                        q.scale = unpermute_rows(info, &q.scale, heads).map_err(unsupported)?;
                        if q.scheme.offset {
                            q.min = unpermute_rows(info, &q.min, heads).map_err(unsupported)?;
                        }
                    }
                    // A fused matrix kept in blocks is split here: the
                    // family splits float weights at load, but not blocks.
                    let parts = fused_parts(&name, heads, kv_heads, head_dim, intermediate);
                    if let Some(parts) = parts {
                        let total: usize = parts.iter().map(|(_, rows)| rows).sum();
                        if total != q.n {
                            return Err(unsupported(format!(
                                "tensor `{}` has {} rows, but the config's heads and sizes need {total}",
                                info.name, q.n
                            )));
                        }
                        let mut at = 0;
                        for (part, rows) in parts {
                            let block = split_quantized(&q, at, rows);
                            at += rows;
                            if let Some(first) = names.insert(part.clone(), info.name.clone()) {
                                return Err(unsupported(format!(
                                    "tensors `{first}` and `{}` are both `{part}`",
                                    info.name
                                )));
                            }
                            tensors.push((part, vec![rows, q.k], GgufTensor::Quantized(block)));
                        }
                        continue;
                    }
                    GgufTensor::Quantized(q)
                }
                None => {
                    let mut data = vec![0f32; info.numel()];
                    quant::dequantize(info.ggml_type, file.tensor_bytes(info), &mut data);
                    if let Some(heads) = permuted_heads {
                        data = unpermute_rows(info, &data, heads).map_err(unsupported)?;
                    }
                    let offset = norm_offset(&arch, &name);
                    if offset != 0.0 {
                        data.iter_mut().for_each(|w| *w -= offset);
                    }
                    GgufTensor::Float(data)
                }
            };
            tensors.push((name, info.shape.clone(), data));
        }
        let summary = file
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        Ok(GgufModel {
            config_json,
            tensors,
            tokenizer: tokenizer::build(&file),
            summary,
        })
    }
}

/// config.json for the file's metadata (keys under `<arch>.`).
fn config_json(file: &GgufFile, arch: &str, class: &str) -> Result<Value, String> {
    let key = |name: &str| file.get(&format!("{arch}.{name}"));
    let uint = |name: &str| -> Result<u64, String> {
        key(name)
            .ok_or_else(|| format!("it has no {arch}.{name}"))?
            .as_u64()
            .ok_or_else(|| format!("{arch}.{name} is not a non-negative integer"))
    };
    let has = |name: &str| file.tensors.iter().any(|t| t.name == name);
    // A number the model divides by or exponentiates: finite and above zero.
    let positive = |name: &str, default: f64| -> Result<f64, String> {
        match key(name) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("{arch}.{name} is {v}; it must be a positive number")),
        }
    };
    let hidden = uint("embedding_length")?;
    let heads = uint("attention.head_count")?;
    let kv_heads = match key("attention.head_count_kv") {
        Some(v) => v.as_u64().ok_or(
            "attention.head_count_kv is not an integer (per-layer counts are not supported)",
        )?,
        None => heads,
    };
    let vocab = match key("vocab_size").and_then(MetaValue::as_u64) {
        Some(v) => v,
        None => file
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
            .map(|t| t.len() as u64)
            .ok_or_else(|| format!("it has neither {arch}.vocab_size nor a token list"))?,
    };
    // Heads can be narrower than hidden / heads (Qwen3): key_length says so.
    let head_dim = key("attention.key_length")
        .and_then(MetaValue::as_u64)
        .unwrap_or(hidden.checked_div(heads).unwrap_or(0));
    let rotary_dim = match key("rope.dimension_count").and_then(MetaValue::as_u64) {
        Some(rot) if rot == 0 || rot > head_dim || rot % 2 == 1 => {
            return Err(format!(
                "{arch}.rope.dimension_count is {rot}; it must be even and at most the head's {head_dim} dimensions"
            ))
        }
        Some(rot) => rot,
        None => head_dim,
    };
    let mut config = json!({
        "architectures": [class],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": uint("feed_forward_length")?,
        "num_hidden_layers": uint("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": uint("context_length")?,
        "rms_norm_eps": positive("attention.layer_norm_rms_epsilon", 1e-5)?,
        "rope_theta": positive("rope.freq_base", 10000.0)?,
        // llama.cpp writes the output projection only when it is not the embedding.
        "tie_word_embeddings": !has("output.weight"),
        "attention_bias": has("blk.0.attn_q.bias"),
        "torch_dtype": "float32",
    });
    arch_config(arch, &mut config, key, positive)?;
    if let Some(kind) = key("rope.scaling.type").and_then(MetaValue::as_str) {
        if kind != "none" {
            let factor = key("rope.scaling.factor").and_then(MetaValue::as_f64);
            config["rope_scaling"] = json!({"rope_type": kind, "factor": factor});
        }
    }
    rope_config(file, arch, &mut config, head_dim, rotary_dim)?;
    for (hf, gguf) in [
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
    ] {
        if let Some(id) = file
            .get(&format!("tokenizer.ggml.{gguf}"))
            .and_then(MetaValue::as_u64)
        {
            config[hf] = json!(id);
        }
    }
    Ok(config)
}

/// config.json keys one architecture adds, from its own metadata keys (or
/// the defaults llama.cpp assumes without them).
fn arch_config<'a>(
    arch: &str,
    config: &mut Value,
    key: impl Fn(&str) -> Option<&'a MetaValue>,
    positive: impl Fn(&str, f64) -> Result<f64, String>,
) -> Result<(), String> {
    match arch {
        "gemma" => config["hidden_act"] = json!("gelu_pytorch_tanh"),
        // llama.cpp's LLM_ARCH_GEMMA2 hyperparameters (src/llama-model.cpp,
        // https://github.com/ggml-org/llama.cpp): every other layer slides,
        // the first included; the caps default to Gemma 2's; and a GGUF
        // carries no query_pre_attn_scalar: the scale is 1/sqrt(key_length),
        // but 1/sqrt(hidden / heads) for the 46-layer 27B.
        "gemma2" => {
            let layers = config["num_hidden_layers"].as_u64().unwrap_or(0);
            let window = match key("attention.sliding_window") {
                None => 4096,
                Some(v) => v.as_u64().filter(|&w| w > 0).ok_or_else(|| {
                    format!("{arch}.attention.sliding_window is {v}; it must be a positive integer")
                })?,
            };
            let scalar = query_pre_attn_scalar(config, 46);
            config["hidden_activation"] = json!("gelu_pytorch_tanh");
            config["attn_logit_softcapping"] = json!(positive("attn_logit_softcapping", 50.0)?);
            config["final_logit_softcapping"] = json!(positive("final_logit_softcapping", 30.0)?);
            config["query_pre_attn_scalar"] = json!(scalar);
            config["sliding_window"] = json!(window);
            config["layer_types"] = (0..layers)
                .map(|l| match l % 2 {
                    0 => "sliding_attention",
                    _ => "full_attention",
                })
                .collect();
        }
        // llama.cpp's LLM_ARCH_GEMMA3 hyperparameters (src/llama-model.cpp):
        // with a sliding window, every sixth layer is global (the file keeps
        // no pattern) and the local layers rotate without scaling, whatever
        // the global layers use, with base 10000 (newer converters write it
        // as `rope.freq_base_swa`); without a window (or 0), every layer is
        // global. The attention scale is 1/sqrt(key_length), but
        // 1/sqrt(hidden / heads) for the 62-layer 27B; no attention soft-cap,
        // the final one only if the file has it.
        "gemma3" => {
            const PATTERN: u64 = 6;
            let layers = config["num_hidden_layers"].as_u64().unwrap_or(0);
            let window = match key("attention.sliding_window") {
                None => 0,
                Some(v) => v.as_u64().ok_or_else(|| {
                    format!(
                        "{arch}.attention.sliding_window is {v}; it must be a non-negative integer"
                    )
                })?,
            };
            let scalar = query_pre_attn_scalar(config, 62);
            let final_cap = match key("final_logit_softcapping") {
                None => Value::Null,
                Some(_) => json!(positive("final_logit_softcapping", 0.0)?),
            };
            config["model_type"] = json!("gemma3_text");
            config["hidden_activation"] = json!("gelu_pytorch_tanh");
            config["attn_logit_softcapping"] = Value::Null;
            config["final_logit_softcapping"] = final_cap;
            config["query_pre_attn_scalar"] = json!(scalar);
            config["rope_local_base_freq"] = json!(positive("rope.freq_base_swa", 10000.0)?);
            config["sliding_window"] = if window == 0 {
                Value::Null
            } else {
                json!(window)
            };
            config["layer_types"] = (0..layers)
                .map(|l| match window > 0 && (l + 1) % PATTERN != 0 {
                    true => "sliding_attention",
                    false => "full_attention",
                })
                .collect();
        }
        _ => {}
    }
    Ok(())
}

/// Gemma 2's and 3's `query_pre_attn_scalar` as llama.cpp derives it (a GGUF
/// holds none): the head size, but hidden / heads for the 27B, the model of
/// `layers_of_27b` layers.
fn query_pre_attn_scalar(config: &Value, layers_of_27b: u64) -> u64 {
    if config["num_hidden_layers"].as_u64() == Some(layers_of_27b) {
        let heads = config["num_attention_heads"].as_u64().unwrap_or(1).max(1);
        config["hidden_size"].as_u64().unwrap_or(0) / heads
    } else {
        config["head_dim"].as_u64().unwrap_or(0)
    }
}

/// The RoPE settings beyond the base: partial rotary, Phi-3's original
/// length, sliding window and LongRoPE factors, Llama 3.1's `rope_freqs`.
/// Keys and tensors as llama.cpp's converter writes them
/// (`convert_hf_to_gguf.py`, `LlamaModel.generate_extra_tensors` and
/// `Phi3MiniModel`; https://github.com/ggml-org/llama.cpp).
fn rope_config(
    file: &GgufFile,
    arch: &str,
    config: &mut Value,
    head_dim: u64,
    rotary_dim: u64,
) -> Result<(), String> {
    let key = |name: &str| file.get(&format!("{arch}.{name}"));
    let phi3 = arch == "phi3";
    if rotary_dim != head_dim {
        // Refused by the config reader for families that rotate whole heads.
        let factor = rotary_dim as f64 / head_dim as f64;
        if ((head_dim as f64 * factor) as u64) != rotary_dim {
            return Err(format!(
                "{arch}.rope.dimension_count {rotary_dim} of {head_dim} is no partial_rotary_factor transformers reproduces"
            ));
        }
        config["partial_rotary_factor"] = json!(factor);
    }
    if phi3 {
        if let Some(n) = key("rope.scaling.original_context_length").and_then(MetaValue::as_u64) {
            config["original_max_position_embeddings"] = json!(n);
        }
        // 0: no window (the converter's mark for Phi-4).
        if let Some(w) = key("attention.sliding_window").and_then(MetaValue::as_u64) {
            config["sliding_window"] = if w == 0 { Value::Null } else { json!(w) };
        }
    }
    let long = factor_tensor(file, ROPE_FACTORS_LONG)?;
    let short = factor_tensor(file, ROPE_FACTORS_SHORT)?;
    let freqs = factor_tensor(file, ROPE_FREQS)?;
    match (long, short, freqs) {
        (None, None, None) => {}
        // Phi-3 128k / Phi-3.5 / Phi-4-mini: transformers' `longrope`.
        (Some(long), Some(short), None) => {
            let mut scaling = json!({
                "rope_type": "longrope",
                "short_factor": short,
                "long_factor": long,
            });
            if let Some(a) = key("rope.scaling.attn_factor").and_then(MetaValue::as_f64) {
                scaling["attention_factor"] = json!(a);
            }
            config["rope_scaling"] = scaling;
        }
        // Llama 3.1/3.2: the converter computes transformers' `llama3`
        // scaling as one divisor per frequency, which llama.cpp applies as
        // `theta / freq_factors[i]` (ggml's rope). In transformers' terms
        // that is `longrope` with both sets equal to the divisors and no
        // attention factor, which Kiln and transformers both read.
        (None, None, Some(freqs)) => {
            if freqs.len() as u64 != rotary_dim / 2 {
                return Err(format!(
                    "tensor `{ROPE_FREQS}` has {} factors; {rotary_dim} rotated dimensions need {}",
                    freqs.len(),
                    rotary_dim / 2
                ));
            }
            let linear = match config.get("rope_scaling") {
                None => 1.0,
                Some(s) if s["rope_type"] == "linear" => s["factor"].as_f64().unwrap_or(1.0),
                Some(s) => {
                    return Err(format!(
                        "it has {ROPE_FREQS} and rope scaling {}; Kiln applies {ROPE_FREQS} alone or with linear scaling",
                        s["rope_type"]
                    ))
                }
            };
            let factors: Vec<f64> = freqs.iter().map(|f| f * linear).collect();
            config["rope_scaling"] = json!({
                "rope_type": "longrope",
                "short_factor": factors,
                "long_factor": factors,
                "original_max_position_embeddings": config["max_position_embeddings"],
                "attention_factor": 1.0,
            });
        }
        _ => {
            return Err(format!(
                "it has only some of {ROPE_FACTORS_LONG}, {ROPE_FACTORS_SHORT} and {ROPE_FREQS}; \
                 Kiln reads both LongRoPE factor tensors, or {ROPE_FREQS} alone"
            ))
        }
    }
    Ok(())
}

/// What llama.cpp added to a norm weight of `arch`: Gemma's converters store
/// `1 + w` for the `w` transformers' Gemma RMSNorm multiplies by `1 + w`
/// (convert_hf_to_gguf.py, GemmaModel and Gemma2Model `modify_tensors`,
/// Gemma3Model `norm_shift`: q/k norms included), so
/// `hf_name`'s weight gets it taken off again.
fn norm_offset(arch: &str, hf_name: &str) -> f32 {
    match arch {
        "gemma" | "gemma2" | "gemma3" if hf_name.ends_with("norm.weight") => 1.0,
        _ => 0.0,
    }
}

/// A 1-D RoPE factor tensor's values, if the file has it.
fn factor_tensor(file: &GgufFile, name: &str) -> Result<Option<Vec<f64>>, String> {
    let Some(info) = file.tensors.iter().find(|t| t.name == name) else {
        return Ok(None);
    };
    if info.shape.len() != 1 {
        return Err(format!(
            "tensor `{name}` has shape {:?}; RoPE factors are one number per frequency",
            info.shape
        ));
    }
    let mut values = vec![0f32; info.numel()];
    quant::dequantize(info.ggml_type, file.tensor_bytes(info), &mut values);
    if let Some(bad) = values.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
        return Err(format!(
            "tensor `{name}` holds {bad}; RoPE factors divide frequencies and must be positive"
        ));
    }
    Ok(Some(values.iter().map(|&v| v as f64).collect()))
}

/// The row blocks a fused Phi-3 matrix holds, under transformers' split
/// names: `qkv_proj` → q, k, v; `gate_up_proj` → gate, up.
fn fused_parts(
    name: &str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
) -> Option<Vec<(String, usize)>> {
    if let Some(prefix) = name.strip_suffix("self_attn.qkv_proj.weight") {
        let part = |p: &str| format!("{prefix}self_attn.{p}_proj.weight");
        return Some(vec![
            (part("q"), heads * head_dim),
            (part("k"), kv_heads * head_dim),
            (part("v"), kv_heads * head_dim),
        ]);
    }
    let prefix = name.strip_suffix("mlp.gate_up_proj.weight")?;
    Some(vec![
        (format!("{prefix}mlp.gate_proj.weight"), intermediate),
        (format!("{prefix}mlp.up_proj.weight"), intermediate),
    ])
}

/// Rows `at..at + rows` of a quantized matrix (its q bytes, scales, mins).
fn split_quantized(m: &QuantizedMatrix, at: usize, rows: usize) -> QuantizedMatrix {
    let part = |len: usize| (at * len / m.n)..((at + rows) * len / m.n);
    QuantizedMatrix {
        scheme: m.scheme,
        n: rows,
        k: m.k,
        q: m.q[part(m.q.len())].to_vec(),
        scale: m.scale[part(m.scale.len())].to_vec(),
        min: m.min[part(m.min.len())].to_vec(),
    }
}

/// The layer a transformers tensor name belongs to.
fn layer_of(hf_name: &str) -> Option<u64> {
    hf_name
        .strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// transformers' name for a llama.cpp tensor name of architecture `arch`,
/// or `None` if unknown.
fn hf_name(gguf: &str, arch: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let sandwich = matches!(arch, "gemma2" | "gemma3");
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        // Gemma 2's and 3's four norms (gguf's tensor map for
        // MODEL_ARCH.GEMMA2 and GEMMA3).
        "post_attention_norm" if sandwich => "post_attention_layernorm",
        "ffn_norm" if sandwich => "pre_feedforward_layernorm",
        "post_ffw_norm" if sandwich => "post_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_qkv" if arch == "phi3" => "self_attn.qkv_proj",
        "ffn_gate" => "mlp.gate_proj",
        // Phi-3 has no ffn_gate: its ffn_up is transformers' gate_up_proj.
        "ffn_up" if arch == "phi3" => "mlp.gate_up_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{param}"))
}

/// Undoes llama.cpp's Q/K row permutation. Its converter reorders each
/// head's rows from (half, i) to (i, half) so that its RoPE can rotate
/// adjacent pairs; transformers rotates halves, so the rows go back. `data`
/// holds `info.shape[0]` equal rows of anything (weights, quantized bytes,
/// block scales).
fn unpermute_rows<T: Copy + Default>(
    info: &TensorInfo,
    data: &[T],
    heads: usize,
) -> Result<Vec<T>, String> {
    let rows = info.shape[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(format!(
            "tensor `{}` has {rows} rows, not a whole number of {heads} heads",
            info.name
        ));
    }
    let row_len = data.len() / rows;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..heads {
        for i in 0..half {
            for side in 0..2 {
                let from = h * head_dim + 2 * i + side;
                let to = h * head_dim + side * half + i;
                out[to * row_len..(to + 1) * row_len]
                    .copy_from_slice(&data[from * row_len..(from + 1) * row_len]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_llama_cpp_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight", "llama").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight", "llama").as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name("blk.3.attn_k_norm.weight", "qwen3").as_deref(),
            Some("model.layers.3.self_attn.k_norm.weight")
        );
        assert_eq!(
            hf_name("output.weight", "llama").as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight", "llama"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight", "llama"), None);
        assert_eq!(hf_name("blk.0.attn_q.scale", "llama"), None);
        // Phi-3's fused tensors keep transformers' fused names.
        assert_eq!(
            hf_name("blk.1.attn_qkv.weight", "phi3").as_deref(),
            Some("model.layers.1.self_attn.qkv_proj.weight")
        );
        assert_eq!(
            hf_name("blk.1.ffn_up.weight", "phi3").as_deref(),
            Some("model.layers.1.mlp.gate_up_proj.weight")
        );
        assert_eq!(hf_name("blk.1.attn_qkv.weight", "llama"), None);
    }

    /// A fused matrix kept in blocks splits into row blocks that stand
    /// for the same rows of the dequantized whole.
    #[test]
    fn quantized_rows_split_like_the_dequantized_matrix() {
        let parts = fused_parts("model.layers.3.self_attn.qkv_proj.weight", 2, 1, 2, 0).unwrap();
        let rows: Vec<usize> = parts.iter().map(|p| p.1).collect();
        assert_eq!(parts[1].0, "model.layers.3.self_attn.k_proj.weight");
        assert_eq!(rows, [4, 2, 2]);
        let up = fused_parts("model.layers.0.mlp.gate_up_proj.weight", 1, 1, 1, 3).unwrap();
        assert_eq!(
            up[0],
            ("model.layers.0.mlp.gate_proj.weight".to_string(), 3)
        );
        assert!(fused_parts("model.layers.0.mlp.down_proj.weight", 1, 1, 1, 3).is_none());

        // Q4_1 (scales and mins), 8 rows of 64: 2 blocks of 20 bytes a row.
        let (n, k) = (8, 64);
        let mut bytes = Vec::new();
        for b in 0..n * k / 32 {
            bytes.extend(half::f16::from_f32(0.01 * (b + 1) as f32).to_le_bytes());
            bytes.extend(half::f16::from_f32(-0.1 * b as f32).to_le_bytes());
            bytes.extend((0..16).map(|i| (b * 7 + i * 13) as u8));
        }
        let whole = quant::to_quantized(quant::GgmlType::Q4_1, &bytes, n, k).unwrap();
        let full = whole.dequantize();
        let mut at = 0;
        for rows in rows {
            let part = split_quantized(&whole, at, rows);
            assert_eq!((part.n, part.k), (rows, k));
            assert_eq!(part.dequantize(), full[at * k..(at + rows) * k]);
            at += rows;
        }
    }

    #[test]
    fn maps_gemma2_norms_and_shifts_gemma_norms() {
        let name = |gguf: &str| hf_name(gguf, "gemma2");
        assert_eq!(
            name("blk.1.ffn_norm.weight").as_deref(),
            Some("model.layers.1.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            name("blk.1.post_ffw_norm.weight").as_deref(),
            Some("model.layers.1.post_feedforward_layernorm.weight")
        );
        assert_eq!(
            name("blk.0.post_attention_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight", "gemma").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight"),
            "Gemma 1 keeps Llama's names"
        );
        assert_eq!(norm_offset("gemma", "model.norm.weight"), 1.0);
        assert_eq!(
            norm_offset("gemma2", "model.layers.0.post_feedforward_layernorm.weight"),
            1.0
        );
        assert_eq!(
            norm_offset("gemma2", "model.layers.0.mlp.up_proj.weight"),
            0.0
        );
        assert_eq!(norm_offset("llama", "model.norm.weight"), 0.0);
    }

    /// Gemma 3's keys as llama.cpp reads them: every sixth layer global when
    /// the file has a window, none sliding without one; the local base from
    /// `rope.freq_base_swa` or 10000; the 27B's attention scale.
    #[test]
    fn gemma3_keys_follow_llama_cpp() {
        let run = |layers: u64, meta: &[(&str, MetaValue)]| {
            let mut config = json!({
                "num_hidden_layers": layers, "head_dim": 256,
                "hidden_size": 5376, "num_attention_heads": 32,
            });
            let meta: std::collections::BTreeMap<String, MetaValue> = meta
                .iter()
                .map(|(k, v)| (format!("gemma3.{k}"), v.clone()))
                .collect();
            let key = |name: &str| meta.get(&format!("gemma3.{name}"));
            let positive = |name: &str, default: f64| -> Result<f64, String> {
                Ok(key(name).and_then(MetaValue::as_f64).unwrap_or(default))
            };
            arch_config("gemma3", &mut config, key, positive).map(|()| config)
        };
        let c = run(7, &[("attention.sliding_window", MetaValue::U32(512))]).unwrap();
        let types: Vec<&str> = c["layer_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(
            types[4..],
            ["sliding_attention", "full_attention", "sliding_attention"]
        );
        assert_eq!(c["sliding_window"], 512);
        assert_eq!(c["model_type"], "gemma3_text");
        assert_eq!(c["query_pre_attn_scalar"], 256);
        assert_eq!(c["rope_local_base_freq"], 10000.0);
        assert_eq!(c["final_logit_softcapping"], Value::Null);

        let c = run(
            62,
            &[
                ("rope.freq_base_swa", MetaValue::F32(20000.0)),
                ("final_logit_softcapping", MetaValue::F32(30.0)),
            ],
        )
        .unwrap();
        assert_eq!(c["sliding_window"], Value::Null);
        assert!(c["layer_types"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t == "full_attention"));
        assert_eq!(c["query_pre_attn_scalar"], 5376 / 32);
        assert_eq!(c["rope_local_base_freq"], 20000.0);
        assert_eq!(c["final_logit_softcapping"], 30.0);

        let err = run(6, &[("attention.sliding_window", MetaValue::F32(1.5))]).unwrap_err();
        assert!(err.contains("gemma3.attention.sliding_window"), "{err}");
        assert_eq!(
            hf_name("blk.5.attn_q_norm.weight", "gemma3").as_deref(),
            Some("model.layers.5.self_attn.q_norm.weight")
        );
        assert_eq!(
            hf_name("blk.5.ffn_norm.weight", "gemma3").as_deref(),
            Some("model.layers.5.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            norm_offset("gemma3", "model.layers.5.self_attn.k_norm.weight"),
            1.0
        );
    }

    /// llama.cpp's permutation, written as its converter does it (reshape to
    /// heads × 2 × half, swap the last two axes), must be undone exactly.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, head_dim, cols) = (3, 8, 2);
        let rows = heads * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut permuted = vec![0f32; hf.len()];
        for h in 0..heads {
            for side in 0..2 {
                for i in 0..head_dim / 2 {
                    let src = h * head_dim + side * head_dim / 2 + i;
                    let dst = h * head_dim + i * 2 + side;
                    permuted[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(permuted, hf);
        let info = TensorInfo {
            name: "blk.0.attn_q.weight".into(),
            shape: vec![rows, cols],
            ggml_type: quant::GgmlType::F32,
            start: 0,
            len: 0,
        };
        assert_eq!(unpermute_rows(&info, &permuted, heads).unwrap(), hf);
    }
}
