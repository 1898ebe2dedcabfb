//! A Hugging Face `tokenizer.json` and `tokenizer_config.json` rebuilt from a
//! GGUF's `tokenizer.ggml.*` metadata.
//!
//! The files describe the tokenizer transformers' GGUF loader builds for the
//! same file, so Kiln and transformers encode a prompt to the same ids:
//! - `tokenizer.ggml.model = gpt2`, byte-level BPE (Llama 3, Qwen, SmolLM,
//!   Mistral Nemo…): its `byte_level_tokenizer`, split regexes by
//!   `tokenizer.ggml.pre`;
//! - `llama`, sentencepiece vocabularies (Llama 2, Mistral v0.1, Gemma,
//!   Phi-3): BPE over `▁`-spelled pieces with byte fallback (`<0xNN>`
//!   pieces), merges from the file or rebuilt from the pieces' scores, and
//!   the normalizer, pre-tokenizer and decoder of the class transformers
//!   picks by architecture (`LlamaTokenizer`, `GemmaTokenizer`, Phi-3's).
//!
//! Source: transformers' `integrations/gguf/gguf_tokenizer_mapping.py`,
//! `models/{llama,gemma}/tokenization_*.py` and `generate_merges` in
//! `tokenization_utils_base.py` (5.23), and how the `tokenizers` crate numbers
//! added tokens (`AddedVocabulary::add_tokens`).

use super::reader::{GgufFile, MetaArray, MetaValue};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

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

/// Sentencepiece's word-boundary mark, which stands for a space.
const SPACE_MARK: char = '\u{2581}';

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

/// The `tokenizer.ggml.*` arrays and ids both kinds of vocabulary read.
struct Meta<'a> {
    file: &'a GgufFile,
    tokens: Vec<&'a str>,
    token_types: Vec<i64>,
}

impl<'a> Meta<'a> {
    fn get(&self, key: &str) -> Option<&'a MetaValue> {
        self.file.get(&format!("tokenizer.ggml.{key}"))
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>, String> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let items = value
            .as_array()
            .and_then(MetaArray::strings)
            .ok_or_else(|| format!("tokenizer.ggml.{key} is not an array of strings"))?;
        Ok(Some(items.iter().map(String::as_str).collect()))
    }

    fn flag(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(MetaValue::as_bool)
    }

    /// The token a `*_token_id` key names (checked in range by [`build`]).
    fn token(&self, key: &str) -> Option<&'a str> {
        let id = self.get(key)?.as_u64()?;
        self.tokens.get(id as usize).copied()
    }
}

/// The tokenizer.json parts that differ by vocabulary kind.
struct Built {
    tokenizer: Value,
    add_bos: bool,
    add_eos: bool,
    default_split_for: Option<String>,
}

pub fn build(file: &GgufFile) -> Result<TokenizerFiles, String> {
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .ok_or(
            "it has no tokenizer.ggml.model; Kiln needs the tokenizer in the file \
             (or pass --token-ids)",
        )?;
    if model != "gpt2" && model != "llama" {
        return Err(format!(
            "its tokenizer is `{model}`; Kiln rebuilds byte-level BPE (`gpt2`) and \
             sentencepiece (`llama`) tokenizers from GGUF, not `{model}` yet. Convert the \
             original Hugging Face checkpoint instead"
        ));
    }
    let mut meta = Meta {
        file,
        tokens: Vec::new(),
        token_types: Vec::new(),
    };
    meta.tokens = meta
        .strings("tokens")?
        .ok_or("it has no tokenizer.ggml.tokens array")?;
    meta.token_types = match meta.get("token_type").and_then(MetaValue::as_array) {
        Some(types) => types
            .ints()
            .ok_or("tokenizer.ggml.token_type is not an array of integers")?,
        None => Vec::new(),
    };
    for key in [
        "bos_token_id",
        "eos_token_id",
        "unknown_token_id",
        "padding_token_id",
    ] {
        if let Some(value) = meta.get(key) {
            match value.as_u64() {
                Some(id) if (id as usize) < meta.tokens.len() => {}
                _ => {
                    return Err(format!(
                        "tokenizer.ggml.{key} is {value}, not one of its {} tokens",
                        meta.tokens.len()
                    ))
                }
            }
        }
    }
    let built = match model {
        "gpt2" => byte_level(&meta)?,
        _ => sentencepiece(&meta)?,
    };

    let mut config = Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    config.insert("add_bos_token".into(), json!(built.add_bos));
    config.insert("add_eos_token".into(), json!(built.add_eos));
    for (key, name) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        if let Some(token) = meta.token(name) {
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
        tokenizer_json: serde_json::to_string(&built.tokenizer).expect("JSON values serialize"),
        tokenizer_config_json: serde_json::to_string_pretty(&Value::Object(config))
            .expect("JSON values serialize"),
        default_split_for: built.default_split_for,
    })
}

/// Byte-level BPE, as transformers' `byte_level_tokenizer` and
/// `set_split_regex` build it.
fn byte_level(meta: &Meta) -> Result<Built, String> {
    let tokens = &meta.tokens;
    let merges = meta
        .strings("merges")?
        .ok_or("it has no tokenizer.ggml.merges array")?;

    // Byte-level vocabularies spell tokens in the byte alphabet; a token in
    // any other characters (llama.cpp writes some special tokens raw) is
    // respelled byte by byte, as transformers does.
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let spelled = if in_alphabet(token) {
            token.to_string()
        } else {
            token.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(spelled, json!(id));
    }
    let merges = merge_pairs(&merges)?;

    // Control tokens stay whole and are skipped when decoding; user-defined
    // ones stay whole but print. A control token spelled outside the byte
    // alphabet is a mislabel transformers skips too.
    let mut added = Vec::new();
    for (id, (token, &ty)) in tokens.iter().zip(&meta.token_types).enumerate() {
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

    let pre = meta
        .get("pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
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

    let special = |key: &str| -> Option<(u64, String)> {
        let id = meta.get(key)?.as_u64()?;
        Some((id, tokens.get(id as usize)?.to_string()))
    };
    let bos = special("bos_token_id");
    let add_bos = meta.flag("add_bos_token").unwrap_or(false);
    let add_eos = meta.flag("add_eos_token").unwrap_or(false);
    let eos = special("eos_token_id");
    let mut single = Vec::new();
    let mut special_tokens = Map::new();
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
    Ok(Built {
        tokenizer,
        add_bos,
        add_eos,
        default_split_for,
    })
}

/// `tokenizer.ggml.merges` entries (`"a b"`) as tokenizer.json pairs.
fn merge_pairs(merges: &[&str]) -> Result<Vec<Value>, String> {
    merges
        .iter()
        .map(|m| match m.split(' ').collect::<Vec<_>>()[..] {
            [a, b] => Ok(json!([a, b])),
            _ => Err(format!("tokenizer.ggml.merges holds `{m}`, not a pair")),
        })
        .collect()
}

/// Which transformers class a sentencepiece vocabulary becomes, by
/// architecture (`GGUF_SENTENCEPIECE_BUILDERS`).
#[derive(Clone, Copy, PartialEq)]
enum SpmFlavor {
    /// `LlamaTokenizer`: a `▁` before the first word (Metaspace), stripped
    /// again when decoding.
    Llama,
    /// `GemmaTokenizer`: spaces → `▁` as they are, nothing prepended;
    /// merges ordered by the tokens' order in the file.
    Gemma,
    /// Llama's, with the prefix `▁` from a normalizer, so text starting with
    /// a space gets one more.
    Phi3,
}

impl SpmFlavor {
    fn of(arch: &str) -> SpmFlavor {
        match arch {
            "gemma" | "gemma2" | "gemma3" => SpmFlavor::Gemma,
            "phi3" => SpmFlavor::Phi3,
            _ => SpmFlavor::Llama,
        }
    }

    /// The special tokens the class is built with (its constructor's
    /// defaults), in transformers' attribute order (bos, eos, unk, sep,
    /// pad, cls, mask): they become special added tokens whatever the file.
    fn default_specials(self) -> &'static [&'static str] {
        match self {
            SpmFlavor::Gemma => &["<bos>", "<eos>", "<unk>", "<pad>", "<mask>"],
            SpmFlavor::Llama | SpmFlavor::Phi3 => &["<s>", "</s>", "<unk>"],
        }
    }
}

/// Python's `str.isspace` for one character (Rust's `is_whitespace` plus
/// the four information separators U+001C..U+001F).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A sentencepiece vocabulary as transformers' `sentencepiece_tokenizer`,
/// `gemma_tokenizer` or `phi3_tokenizer` builds it, then
/// `add_gguf_special_tokens` and the tokenizer class's own special tokens.
fn sentencepiece(meta: &Meta) -> Result<Built, String> {
    let arch = meta
        .file
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .unwrap_or("");
    let flavor = SpmFlavor::of(arch);
    let file_tokens = &meta.tokens;
    // Gemma files spell a token of spaces with real spaces; GemmaTokenizer
    // looks it up as `▁`s (its normalizer runs first).
    let tokens: Vec<String> = file_tokens
        .iter()
        .map(|t| {
            let respell =
                flavor == SpmFlavor::Gemma && t.contains(' ') && t.chars().all(py_isspace);
            match respell {
                true => SPACE_MARK.to_string().repeat(t.chars().count()),
                false => t.to_string(),
            }
        })
        .collect();
    // A Python dict: a repeated token keeps its first place, with the id of
    // its last.
    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        if vocab.insert(token, id as u32).is_none() {
            order.push(token);
        }
    }

    let merges = match meta.strings("merges")? {
        Some(merges) => merge_pairs(&merges)?,
        None => {
            // The score each token has decides the merge order, except in
            // Gemma files, whose order of tokens does.
            let scores: HashMap<&str, f64> = match flavor {
                SpmFlavor::Gemma => tokens
                    .iter()
                    .enumerate()
                    .map(|(id, t)| (t.as_str(), -(id as f64)))
                    .collect(),
                _ => {
                    let scores = scores(meta)?;
                    tokens.iter().map(String::as_str).zip(scores).collect()
                }
            };
            generate_merges(&order, &vocab, &scores)
                .into_iter()
                .map(|(a, b)| json!([a, b]))
                .collect()
        }
    };

    let mut added = AddedTokens::new(&vocab);
    added.add(flavor.default_specials().iter().map(|t| (*t, true)));
    // Control tokens are special; user-defined ones (llama.cpp matches them
    // whole) are added tokens that print, if the vocabulary has them as
    // spelled.
    let control: Vec<(&str, bool)> = file_tokens
        .iter()
        .zip(&meta.token_types)
        .filter(|(_, &ty)| ty == CONTROL)
        .map(|(t, _)| (*t, true))
        .collect();
    added.add(control);
    let user: Vec<(&str, bool)> = file_tokens
        .iter()
        .zip(&meta.token_types)
        .filter(|(t, &ty)| ty == USER_DEFINED && added.id_of(t).is_some())
        .map(|(t, _)| (*t, false))
        .collect();
    added.add(user);
    // The loading class adds the file's named tokens it does not have yet
    // (GemmaTokenizer also keeps its `<mask>`).
    let mut named: Vec<&str> = ["bos_token_id", "eos_token_id", "unknown_token_id"]
        .iter()
        .filter_map(|key| meta.token(key))
        .collect();
    named.extend(meta.token("padding_token_id"));
    if flavor == SpmFlavor::Gemma {
        named.push("<mask>");
    }
    let named: Vec<(&str, bool)> = named
        .into_iter()
        .filter(|t| !added.contains(t))
        .map(|t| (t, true))
        .collect();
    added.add(named);

    // transformers' `update_post_processor`: `<bos> $A` (and `<bos> $B` for
    // a pair), `add_bos_token` defaulting to true for these vocabularies as
    // llama.cpp does.
    let bos = meta.token("bos_token_id");
    let eos = meta.token("eos_token_id");
    let add_bos = meta.flag("add_bos_token").unwrap_or(true) && bos.is_some();
    let add_eos = meta.flag("add_eos_token").unwrap_or(false) && eos.is_some();
    let mut special_tokens = Map::new();
    let mut template = |type_id: u32, seq: &str| {
        let mut items = Vec::new();
        let mut mark = |token: Option<&str>, on: bool, items: &mut Vec<Value>| {
            if let (Some(token), true) = (token, on) {
                items.push(json!({"SpecialToken": {"id": token, "type_id": type_id}}));
                let id = added.id_of(token);
                special_tokens.insert(
                    token.to_string(),
                    json!({"id": token, "ids": [id], "tokens": [token]}),
                );
            }
        };
        mark(bos, add_bos, &mut items);
        items.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        mark(eos, add_eos, &mut items);
        items
    };
    let single = template(0, "A");
    let pair: Vec<Value> = single.iter().cloned().chain(template(1, "B")).collect();

    let replace = |from: &str, to: &str| json!({"type": "Replace", "pattern": {"String": from}, "content": to});
    let mark = SPACE_MARK.to_string();
    let mut decoders = vec![
        replace(&mark, " "),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    let (normalizer, pre_tokenizer) = match flavor {
        SpmFlavor::Gemma => (
            replace(" ", &mark),
            json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
        ),
        SpmFlavor::Llama => (
            Value::Null,
            json!({"type": "Metaspace", "replacement": mark, "prepend_scheme": "first", "split": false}),
        ),
        SpmFlavor::Phi3 => (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": mark}, replace(" ", &mark),
            ]}),
            Value::Null,
        ),
    };
    if flavor != SpmFlavor::Gemma {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    // GemmaTokenizer names its unknown token to the model; LlamaTokenizer
    // does not (byte fallback covers every character).
    let unk = match flavor {
        SpmFlavor::Gemma => json!("<unk>"),
        _ => Value::Null,
    };
    let vocab_json: Map<String, Value> = vocab
        .iter()
        .map(|(t, id)| (t.to_string(), json!(id)))
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added.to_json(),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
                           "special_tokens": special_tokens},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab_json, "merges": merges,
        },
    });
    Ok(Built {
        tokenizer,
        add_bos,
        add_eos,
        default_split_for: None,
    })
}

/// `tokenizer.ggml.scores`, one finite number per token.
fn scores(meta: &Meta) -> Result<Vec<f64>, String> {
    let values: Vec<f64> = match meta.get("scores").and_then(MetaValue::as_array) {
        Some(MetaArray::F32(v)) => v.iter().map(|&x| x as f64).collect(),
        Some(MetaArray::F64(v)) => v.clone(),
        Some(_) => return Err("tokenizer.ggml.scores is not an array of floats".into()),
        None => {
            return Err(
                "it has neither tokenizer.ggml.merges nor tokenizer.ggml.scores, so the \
                 sentencepiece merges cannot be rebuilt"
                    .into(),
            )
        }
    };
    if values.len() != meta.tokens.len() {
        return Err(format!(
            "tokenizer.ggml.scores has {} entries for {} tokens",
            values.len(),
            meta.tokens.len()
        ));
    }
    if let Some(i) = values.iter().position(|x| x.is_nan()) {
        return Err(format!("tokenizer.ggml.scores[{i}] is NaN"));
    }
    Ok(values)
}

/// transformers' `generate_merges` with scores: every split of a token into
/// two tokens of the vocabulary, best-scored token first, then longer left
/// and longer right pieces; a token's own splits in vocabulary-id order.
/// `order` lists each token once, in the order it first appears.
fn generate_merges<'a>(
    order: &[&'a str],
    vocab: &HashMap<&str, u32>,
    scores: &HashMap<&str, f64>,
) -> Vec<(&'a str, &'a str)> {
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for &token in order {
        let score = scores[token];
        let mut local: Vec<(&str, &str, f64)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    // Python's stable sort with reverse=True: descending, ties kept in order
    // (and -0.0 ties with 0.0, as Python compares them; no score is NaN).
    let key = |(l, r, s): &(&str, &str, f64)| (*s, l.chars().count(), r.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.partial_cmp(&ka.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

/// Added tokens numbered as the `tokenizers` crate numbers them: a token the
/// vocabulary has keeps its id; a new one goes after the vocabulary (or after
/// the highest added id, if that is past it). Adding a token again replaces
/// its flags.
struct AddedTokens<'v> {
    vocab: &'v HashMap<&'v str, u32>,
    /// content → (id, special), and the contents by id for the JSON.
    tokens: HashMap<String, (u32, bool)>,
}

impl<'v> AddedTokens<'v> {
    fn new(vocab: &'v HashMap<&'v str, u32>) -> Self {
        AddedTokens {
            vocab,
            tokens: HashMap::new(),
        }
    }

    fn contains(&self, token: &str) -> bool {
        self.tokens.contains_key(token)
    }

    fn id_of(&self, token: &str) -> Option<u32> {
        self.tokens
            .get(token)
            .map(|t| t.0)
            .or_else(|| self.vocab.get(token).copied())
    }

    /// One `add_tokens` call.
    fn add<'t>(&mut self, batch: impl IntoIterator<Item = (&'t str, bool)>) {
        let size = self.vocab.len() as u32;
        let mut next = match self.tokens.values().map(|t| t.0).max() {
            Some(max) if max >= size || size == 0 => max + 1,
            _ => size,
        };
        for (content, special) in batch {
            if content.is_empty() {
                continue;
            }
            let id = self.id_of(content).unwrap_or_else(|| {
                next += 1;
                next - 1
            });
            self.tokens.insert(content.to_string(), (id, special));
        }
    }

    fn to_json(&self) -> Vec<Value> {
        let mut items: Vec<(&String, &(u32, bool))> = self.tokens.iter().collect();
        items.sort_by_key(|(_, (id, _))| *id);
        items
            .into_iter()
            .map(|(content, (id, special))| {
                json!({
                    "id": id, "content": content, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special,
                })
            })
            .collect()
    }
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

    /// The order transformers' `generate_merges` gives for the same input
    /// (checked with transformers 5.23): higher score first, then longer
    /// left and right pieces.
    #[test]
    fn merges_follow_scores_then_piece_lengths() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let vocab: HashMap<&str, u32> = tokens.iter().zip(0..).map(|(t, i)| (*t, i)).collect();
        let scores: HashMap<&str, f64> = [
            ("a", 0.0),
            ("b", 0.0),
            ("c", 0.0),
            ("ab", -1.0),
            ("bc", -2.0),
            ("abc", -1.0),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            generate_merges(&tokens, &vocab, &scores),
            [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]
        );
    }

    #[test]
    fn new_added_tokens_go_after_the_vocabulary() {
        let vocab: HashMap<&str, u32> = [("a", 0), ("<unk>", 1)].into_iter().collect();
        let mut added = AddedTokens::new(&vocab);
        added.add([("<s>", true), ("</s>", true), ("<unk>", true)]);
        added.add([("<mask>", true), ("a", false)]);
        assert_eq!(added.id_of("<s>"), Some(2));
        assert_eq!(added.id_of("</s>"), Some(3));
        assert_eq!(added.id_of("<unk>"), Some(1));
        assert_eq!(added.id_of("<mask>"), Some(4));
        assert_eq!(added.tokens["a"], (0, false));
    }
}
