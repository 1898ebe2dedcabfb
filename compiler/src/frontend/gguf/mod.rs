//! The GGUF frontend: a llama.cpp model file → the same Hugging Face form
//! (config.json, named f32 weights, tokenizer.json) the safetensors frontend
//! reads, so everything after it cannot tell the two apart.
//!
//! - [`reader`] parses the container; [`quant`] dequantizes ggml blocks.
//! - Here: llama.cpp's metadata keys → config.json keys, its tensor names →
//!   transformers' names, the Q/K row order llama.cpp changes for Llama, and
//!   the `1 +` it adds to Gemma's norm weights.
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
const ARCHITECTURES: [(&str, &str, bool); 6] = [
    ("llama", "LlamaForCausalLM", true),
    ("mistral", "MistralForCausalLM", true),
    ("qwen2", "Qwen2ForCausalLM", false),
    ("qwen3", "Qwen3ForCausalLM", false),
    ("gemma", "GemmaForCausalLM", false),
    ("gemma2", "Gemma2ForCausalLM", false),
];

/// A weight of a GGUF file: dequantized, or kept in its blocks.
pub enum GgufTensor {
    Float(Vec<f32>),
    /// A Q8_0, Q4_0 or Q4_1 matrix in Kiln's quantized form (same weights).
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
    /// Reads `path`. With `keep_blocks`, Q8_0, Q4_0 and Q4_1 matrices stay
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

        let layers = config_json["num_hidden_layers"].as_u64().unwrap_or(0);
        let mut names = std::collections::BTreeMap::new();
        let mut tensors = Vec::with_capacity(file.tensors.len());
        for info in &file.tensors {
            let name = arch_hf_name(&arch, &info.name).or_else(|| hf_name(&info.name));
            let name = name.ok_or_else(|| {
                unsupported(format!(
                    "it holds tensor `{}`, which Kiln does not know how to map{}",
                    info.name,
                    if info.name.starts_with("rope_freqs") {
                        " (Llama 3.1-style RoPE frequency factors are not supported from GGUF yet)"
                    } else {
                        ""
                    }
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
    if let Some(rot) = key("rope.dimension_count").and_then(MetaValue::as_u64) {
        if rot != head_dim {
            return Err(format!(
                "it rotates {rot} of each head's {head_dim} dimensions; Kiln supports full-width RoPE only"
            ));
        }
    }
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
            let scalar = if layers == 46 {
                let heads = config["num_attention_heads"].as_u64().unwrap_or(1).max(1);
                config["hidden_size"].as_u64().unwrap_or(0) / heads
            } else {
                config["head_dim"].as_u64().unwrap_or(0)
            };
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
        _ => {}
    }
    Ok(())
}

/// What llama.cpp added to a norm weight of `arch`: Gemma's converters store
/// `1 + w` for the `w` transformers' Gemma RMSNorm multiplies by `1 + w`
/// (convert_hf_to_gguf.py, GemmaModel and Gemma2Model `modify_tensors`), so
/// `hf_name`'s weight gets it taken off again.
fn norm_offset(arch: &str, hf_name: &str) -> f32 {
    match arch {
        "gemma" | "gemma2" if hf_name.ends_with("norm.weight") => 1.0,
        _ => 0.0,
    }
}

/// transformers' name for a tensor whose llama.cpp name means something
/// else in `arch` than in [`hf_name`]'s Llama layout.
fn arch_hf_name(arch: &str, gguf: &str) -> Option<String> {
    let (block, module) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let hf = match (arch, module) {
        // Gemma 2's four norms (gguf's tensor map for MODEL_ARCH.GEMMA2).
        ("gemma2", "post_attention_norm.weight") => "post_attention_layernorm.weight",
        ("gemma2", "ffn_norm.weight") => "pre_feedforward_layernorm.weight",
        ("gemma2", "post_ffw_norm.weight") => "post_feedforward_layernorm.weight",
        _ => return None,
    };
    let layer: usize = block.parse().ok()?;
    Some(format!("model.layers.{layer}.{hf}"))
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

/// transformers' name for a llama.cpp tensor name, or `None` if unknown.
fn hf_name(gguf: &str) -> Option<String> {
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
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
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
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name("blk.3.attn_k_norm.weight").as_deref(),
            Some("model.layers.3.self_attn.k_norm.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.0.attn_q.scale"), None);
    }

    #[test]
    fn maps_gemma2_norms_and_shifts_gemma_norms() {
        let name = |gguf: &str| arch_hf_name("gemma2", gguf).or_else(|| hf_name(gguf));
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
            arch_hf_name("gemma", "blk.0.ffn_norm.weight"),
            None,
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
