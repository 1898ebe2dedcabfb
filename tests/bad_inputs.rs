//! Bad inputs get a clear error that names the file and the problem, and
//! never a panic. Each test damages a copy of a fixture in a temporary dir.

mod common;
use common::*;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

/// Copies a fixture model into a fresh temporary directory.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn generate(dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "generate",
        dir.to_str().unwrap(),
        "--token-ids",
        "1,2,3",
        "--max-new-tokens",
        "2",
    ];
    args.extend_from_slice(extra);
    kiln(&args)
}

/// Rewrites a safetensors file through `edit(name, shape) -> Option<new shape>`
/// (None drops the tensor).
fn rewrite_tensors(path: &Path, edit: impl Fn(&str, &[usize]) -> Option<Vec<usize>>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let shape = edit(&name, view.shape())?;
            Some((
                name,
                TensorView::new(view.dtype(), shape, view.data()).unwrap(),
            ))
        })
        .collect();
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(path, out).unwrap();
}

/// Edits the JSON header of a safetensors file in place, keeping its length
/// field consistent (padding with spaces) and the data untouched.
fn rewrite_header(path: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_string(&header).unwrap();
    assert!(text.len() <= n, "edited header must not grow");
    text.push_str(&" ".repeat(n - text.len()));
    let mut out = bytes[..8].to_vec();
    out.extend(text.as_bytes());
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn truncated_safetensors() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    let file = dir.join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len / 2).unwrap();
    assert_fails_with(&generate(&dir, &[]), &["model.safetensors", "truncated"]);
    // Cut inside the header itself.
    f.set_len(100).unwrap();
    assert_fails_with(
        &generate(&dir, &[]),
        &["model.safetensors", "runs past the end"],
    );
}

#[test]
fn overlapping_offsets() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    let file = dir.join("model.safetensors");
    rewrite_header(&file, |h| {
        let q = &mut h["model.layers.0.self_attn.q_proj.weight"]["data_offsets"];
        let start = q[0].as_u64().unwrap();
        q[0] = (start - 64).into();
        q[1] = (q[1].as_u64().unwrap() - 64).into();
    });
    assert_fails_with(&generate(&dir, &[]), &["model.safetensors", "overlap"]);
}

#[test]
fn offsets_past_the_end() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    let file = dir.join("model.safetensors");
    rewrite_header(&file, |h| {
        // The tensor stored last (f32) claims 4 more elements than the file holds.
        let last = h
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
            .map(|(k, _)| k.clone())
            .unwrap();
        let t = &mut h[&last];
        let (start, end) = (
            t["data_offsets"][0].as_u64().unwrap(),
            t["data_offsets"][1].as_u64().unwrap(),
        );
        t["data_offsets"][1] = (end + 16).into();
        t["shape"] = serde_json::json!([(end - start) / 4 + 4]);
    });
    assert_fails_with(&generate(&dir, &[]), &["model.safetensors", "past its end"]);
}

#[test]
fn missing_tensor() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    rewrite_tensors(&dir.join("model.safetensors"), |name, shape| {
        (name != "model.layers.1.mlp.up_proj.weight").then(|| shape.to_vec())
    });
    assert_fails_with(
        &generate(&dir, &[]),
        &[
            "`model.layers.1.mlp.up_proj.weight` is missing from",
            "model.safetensors",
        ],
    );
}

#[test]
fn tensor_of_the_wrong_shape() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    rewrite_tensors(&dir.join("model.safetensors"), |name, shape| {
        Some(if name == "model.layers.0.self_attn.q_proj.weight" {
            vec![32, 128]
        } else {
            shape.to_vec()
        })
    });
    assert_fails_with(
        &generate(&dir, &[]),
        &[
            "model.safetensors",
            "`model.layers.0.self_attn.q_proj.weight` has shape [32, 128], expected [64, 64]",
        ],
    );
}

#[test]
fn malformed_config() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    std::fs::write(
        dir.join("config.json"),
        "{\"architectures\": [\"LlamaForCausalLM\"], ",
    )
    .unwrap();
    assert_fails_with(&generate(&dir, &[]), &["config.json", "not valid JSON"]);
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}"#,
    )
    .unwrap();
    assert_fails_with(
        &generate(&dir, &[]),
        &["config.json", "missing \"num_attention_heads\""],
    );
}

#[test]
fn unsupported_architecture() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (class, model_type) in [
        ("GPT2LMHeadModel", "gpt2"),
        ("GPTBigCodeForCausalLM", "gpt_bigcode"),
    ] {
        config["architectures"] = serde_json::json!([class]);
        config["model_type"] = model_type.into();
        std::fs::write(&path, config.to_string()).unwrap();
        assert_fails_with(
            &generate(&dir, &[]),
            &[
                "config.json",
                &format!("`{class}` is not supported"),
                "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, Qwen3ForCausalLM, \
                 GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM",
            ],
        );
    }
}

/// A Gemma config whose MLP activation Kiln does not implement is refused
/// by name, not lowered with the wrong function.
#[test]
fn gemma_with_another_activation() {
    let (_tmp, dir) = copy_fixture("gemma");
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["hidden_act"] = "relu".into();
    std::fs::write(&path, config.to_string()).unwrap();
    assert_fails_with(
        &generate(&dir, &[]),
        &[
            "config.json",
            "hidden activation \"relu\" is not supported for Gemma",
        ],
    );
}

#[test]
fn index_pointing_outside_the_model_directory() {
    let (tmp, dir) = copy_fixture("mistral-sharded");
    std::fs::copy(
        dir.join("model-00001-of-00005.safetensors"),
        tmp.path().join("x.safetensors"),
    )
    .unwrap();
    let path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    let first = map.keys().next().unwrap().clone();
    map[&first] = "../x.safetensors".into();
    std::fs::write(&path, index.to_string()).unwrap();
    assert_fails_with(
        &generate(&dir, &[]),
        &[
            "model.safetensors.index.json",
            "`../x.safetensors`",
            "outside the model directory",
        ],
    );
}

#[test]
fn prompt_longer_than_the_kv_cache() {
    let g = golden("llama-gqa");
    let ids = join_ids(&g.prompt_ids);
    let out = kiln(&[
        "generate",
        model_dir("llama-gqa").to_str().unwrap(),
        "--token-ids",
        &ids,
        "--max-seq-len",
        "16",
        "--prefill-len",
        "8",
    ]);
    assert_fails_with(
        &out,
        &[
            "the prompt has 44 tokens but the KV cache holds 16",
            "--max-seq-len",
        ],
    );
}

#[test]
fn generation_stops_cleanly_when_the_cache_fills() {
    let g = golden("llama-gqa");
    let ids = join_ids(&g.prompt_ids);
    let out = kiln(&[
        "generate",
        model_dir("llama-gqa").to_str().unwrap(),
        "--token-ids",
        &ids,
        "--max-seq-len",
        "48",
        "--max-new-tokens",
        "20",
        "--ignore-eos",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // 44 prompt tokens + 4 fed back fill 48 slots; the 5th new token still comes from the last logits.
    let text = stdout(&out);
    let generated: Vec<&str> = text.trim().split(',').map(str::trim).collect();
    assert_eq!(generated.len(), 5, "{generated:?}");
    assert_eq!(generated.join(","), join_ids(&g.generated_ids[..5]));
    assert!(
        stderr(&out).contains("the KV cache is full (48 positions)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn not_a_model_directory_and_bad_token_ids() {
    let tmp = tempfile::tempdir().unwrap();
    assert_fails_with(
        &generate(tmp.path(), &[]),
        &["is not a Hugging Face model directory", "config.json"],
    );
    let out = kiln(&[
        "generate",
        model_dir("llama-gqa").to_str().unwrap(),
        "--token-ids",
        "5,99999",
    ]);
    assert_fails_with(
        &out,
        &["token id 99999 is outside the vocabulary of 320 tokens"],
    );
}

#[test]
fn inspect_reads_an_om_file_and_refuses_a_corrupt_one() {
    use kiln_runtime::om::writer::{inout_info, om_file, TensorSpec};
    let tmp = tempfile::tempdir().unwrap();
    let inputs = [TensorSpec {
        name: "input_ids",
        dtype: 9,
        dims: &[1, 1],
    }];
    let outputs = [TensorSpec {
        name: "logits:0",
        dtype: 1,
        dims: &[1, 1, 320],
    }];
    let bytes = om_file(
        "decode",
        &[(0, vec![0; 16]), (8, inout_info(&inputs, &outputs))],
        true,
    );
    let path = tmp.path().join("decode.om");
    std::fs::write(&path, &bytes).unwrap();
    let out = kiln(&["inspect", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("input  input_ids : int64[1, 1]")
            && text.contains("output logits:0 : float16[1, 1, 320]"),
        "{text}"
    );
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    assert_fails_with(
        &kiln(&["inspect", path.to_str().unwrap()]),
        &["decode.om", "truncated or corrupt"],
    );
}

/// The newcomer's stumbles of issue #16: each says what it is and what to do.
#[test]
fn a_file_where_a_directory_is_meant_and_a_directory_that_is_not_a_compile_output() {
    let tmp = tempfile::tempdir().unwrap();
    let config = model_dir("qwen3").join("config.json");
    let out = tmp.path().join("out");
    let o = kiln(&[
        "compile",
        config.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-atc",
    ]);
    assert_fails_with(
        &o,
        &["config.json is a file; give the model directory that holds it"],
    );
    assert!(!out.exists());

    // A model directory (not a compile output) where a compiled one is meant.
    let model = model_dir("qwen3");
    let o = kiln(&["diff", model.to_str().unwrap(), "--token-ids", "1,2"]);
    assert_fails_with(
        &o,
        &[
            "is not a `kiln compile` output (it has no manifest.json)",
            "kiln compile MODEL -o DIR",
        ],
    );
    let o = kiln(&["diff", config.to_str().unwrap(), "--token-ids", "1,2"]);
    assert_fails_with(
        &o,
        &["is not a `kiln compile` output (it is a file, not a directory)"],
    );
}

#[test]
fn diff_without_a_usable_python_says_how_to_get_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qwen3");
    compile_fixture("qwen3", &dir, &[]);
    let o = kiln(&[
        "diff",
        dir.to_str().unwrap(),
        "--token-ids",
        "1,2",
        "--b",
        "onnxruntime",
        "--python",
        "/nonexistent/python3",
    ]);
    assert_fails_with(
        &o,
        &[
            "`--b onnxruntime` needs a Python with numpy, onnxruntime",
            "-m pip install numpy onnxruntime onnx",
            "--python or $KILN_PYTHON",
        ],
    );
    assert!(!stderr(&o).contains("Traceback"));
}

/// `kiln compile … 2>&1 | head -1`: the reader leaves after one line. The
/// compile still finishes whole, quietly, with no panic.
#[test]
fn a_closed_pipe_ends_quietly_with_the_work_done() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let script = format!(
        "'{kiln}' compile '{model}' -o '{out}' --no-atc 2>&1 | head -1; echo \"exit=${{PIPESTATUS[0]}}\"",
        kiln = env!("CARGO_BIN_EXE_kiln"),
        model = model_dir("qwen3").display(),
        out = out.display()
    );
    let o = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    let text = stdout(&o);
    assert!(text.starts_with("kiln: reading the model\n"), "{text}");
    assert!(text.contains("exit=0"), "{text}");
    assert!(
        !text.contains("panicked") && !stderr(&o).contains("panicked"),
        "{text}"
    );
    assert!(out.join("manifest.json").is_file() && out.join("build_om.sh").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["out"], "no staging directory left behind");
}
