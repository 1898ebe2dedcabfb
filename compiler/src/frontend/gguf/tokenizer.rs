//! A Hugging Face `tokenizer.json` and `tokenizer_config.json` rebuilt from a
//! GGUF's `tokenizer.ggml.*` metadata.
//!
//! The files describe the tokenizer transformers' GGUF loader builds for the
//! same file (its `byte_level_tokenizer`, special tokens and split regexes),
//! so Kiln and transformers encode a prompt to the same ids. Only byte-level
//! BPE (`tokenizer.ggml.model = gpt2`: Llama 3, Qwen, SmolLM, Mistral Nemo…)
//! is rebuilt; sentencepiece vocabularies are refused by name.

use super::reader::{GgufFile, MetaValue};
use serde_json::{json, Value};

/// Split regexes by `tokenizer.ggml.pre`, for vocabularies whose merges were
/// learned on text split differently from GPT-2's default. The patterns are
/// the published pre-tokenizer regexes of those model families.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" | "pixtral" => {
            Some(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The rebuilt tokenizer files.
pub struct TokenizerFiles {
    pub tokenizer_json: String,
    pub tokenizer_config_json: String,
    /// The pre-tokenizer name when Kiln used GPT-2's default split for it.
    pub default_split_for: Option<String>,
}

/// GPT-2's reversible byte → printable character map, with which byte-level
/// vocabularies spell every byte.
fn byte_alphabet() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
        map[b as usize] = if printable {
            b as char
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("code points 256..=323 are chars")
        };
    }
    map
}

pub fn build(file: &GgufFile) -> Result<TokenizerFiles, String> {
    let meta = |key: &str| file.get(&format!("tokenizer.ggml.{key}"));
    let model = meta("model").and_then(MetaValue::as_str).ok_or(
        "it has no tokenizer.ggml.model; Kiln needs the tokenizer in the file \
         (or pass --token-ids)",
    )?;
    if model != "gpt2" {
        return Err(format!(
            "its tokenizer is `{model}`; Kiln rebuilds byte-level BPE (`gpt2`) tokenizers from \
             GGUF, not `{model}` yet. Convert the original Hugging Face checkpoint instead"
        ));
    }
    let strings = |key: &str| -> Result<Vec<&str>, String> {
        let array = meta(key)
            .and_then(MetaValue::as_array)
            .ok_or_else(|| format!("it has no tokenizer.ggml.{key} array"))?;
        let items = array
            .strings()
            .ok_or_else(|| format!("tokenizer.ggml.{key} is not an array of strings"))?;
        Ok(items.iter().map(String::as_str).collect())
    };
    let tokens = strings("tokens")?;
    let merges = strings("merges")?;
    let token_types: Vec<i64> = match meta("token_type").and_then(MetaValue::as_array) {
        Some(types) => types
            .ints()
            .ok_or("tokenizer.ggml.token_type is not an array of integers")?,
        None => Vec::new(),
    };

    // Byte-level vocabularies spell tokens in the byte alphabet; a token in
    // any other characters (llama.cpp writes some special tokens raw) is
    // respelled byte by byte, as transformers does.
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let spelled = if in_alphabet(token) {
            token.to_string()
        } else {
            token.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(spelled, json!(id));
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| format!("tokenizer.ggml.merges holds `{m}`, not a pair"))?;
            Ok(json!([a, b]))
        })
        .collect::<Result<_, String>>()?;

    // Control tokens stay whole and are skipped when decoding; user-defined
    // ones stay whole but print. A control token spelled outside the byte
    // alphabet is a mislabel transformers skips too.
    let mut added = Vec::new();
    for (id, (token, &ty)) in tokens.iter().zip(&token_types).enumerate() {
        let special = match ty {
            CONTROL if in_alphabet(token) => true,
            USER_DEFINED if vocab.contains_key(*token) => false,
            _ => continue,
        };
        added.push(json!({
            "id": id, "content": token, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": special,
        }));
    }

    let pre = meta("pre").and_then(MetaValue::as_str).unwrap_or("default");
    let (pre_tokenizer, default_split_for) = match split_regex(pre) {
        Some(regex) => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            ]}),
            None,
        ),
        None => (
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
            Some(pre.to_string()),
        ),
    };

    for key in [
        "bos_token_id",
        "eos_token_id",
        "unknown_token_id",
        "padding_token_id",
    ] {
        if let Some(value) = meta(key) {
            match value.as_u64() {
                Some(id) if (id as usize) < tokens.len() => {}
                _ => {
                    return Err(format!(
                        "tokenizer.ggml.{key} is {value}, not one of its {} tokens",
                        tokens.len()
                    ))
                }
            }
        }
    }
    let token_name = |key: &str| -> Option<String> {
        let id = meta(key)?.as_u64()? as usize;
        tokens.get(id).map(|t| t.to_string())
    };
    let special = |key: &str| -> Option<(u64, String)> {
        let id = meta(key)?.as_u64()?;
        Some((id, tokens.get(id as usize)?.to_string()))
    };
    let bos = special("bos_token_id");
    let add_bos = meta("add_bos_token")
        .and_then(MetaValue::as_bool)
        .unwrap_or(false);
    let add_eos = meta("add_eos_token")
        .and_then(MetaValue::as_bool)
        .unwrap_or(false);
    let eos = special("eos_token_id");
    let mut single = Vec::new();
    let mut special_tokens = serde_json::Map::new();
    let mut mark = |name: &Option<(u64, String)>, on: bool, single: &mut Vec<Value>| {
        if let (Some((id, token)), true) = (name, on) {
            single.push(json!({"SpecialToken": {"id": token, "type_id": 0}}));
            special_tokens.insert(
                token.clone(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            );
        }
    };
    mark(&bos, add_bos, &mut single);
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    mark(&eos, add_eos, &mut single);
    let mut pair = single.clone();
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
                           "special_tokens": special_tokens},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });

    let mut config = serde_json::Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    config.insert("add_bos_token".into(), json!(add_bos));
    config.insert("add_eos_token".into(), json!(add_eos));
    for (key, name) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        if let Some(token) = token_name(name) {
            config.insert(key.into(), json!(token));
        }
    }
    if let Some(template) = file
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
    {
        config.insert("chat_template".into(), json!(template));
    }
    Ok(TokenizerFiles {
        tokenizer_json: serde_json::to_string(&tokenizer).expect("JSON values serialize"),
        tokenizer_config_json: serde_json::to_string_pretty(&Value::Object(config))
            .expect("JSON values serialize"),
        default_split_for,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = byte_alphabet();
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'a' as usize], 'a');
        let distinct: std::collections::BTreeSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
