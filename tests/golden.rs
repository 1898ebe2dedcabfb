//! `kiln generate --backend cpu` against transformers' own outputs for every
//! fixture model (tests/golden/make_fixtures.py made both).

mod common;
use common::*;

/// Max abs logit error allowed against transformers (f32 on both sides).
const TOLERANCE: f32 = 1e-4;

fn generate_ids(name: &str, extra: &[&str]) -> (Vec<u32>, Vec<Vec<f32>>) {
    let g = golden(name);
    let dir = tempfile::tempdir().unwrap();
    let logits_path = dir.path().join("logits.npy");
    let model = model_dir(name);
    let ids = join_ids(&g.prompt_ids);
    let new_tokens = g.generated_ids.len().to_string();
    let mut args = vec![
        "generate",
        model.to_str().unwrap(),
        "--backend",
        "cpu",
        "--token-ids",
        &ids,
        "--max-new-tokens",
        &new_tokens,
        "--ignore-eos",
        "--save-logits",
        logits_path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = kiln(&args);
    assert!(
        out.status.success(),
        "{name}: kiln failed:\n{}",
        stderr(&out)
    );
    let generated = stdout(&out)
        .trim()
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    (generated, read_rows(&logits_path))
}

#[test]
fn every_fixture_matches_transformers() {
    for name in FIXTURES.iter().chain(&FAMILY_FIXTURES) {
        let g = golden(name);
        let (ids, logits) = generate_ids(name, &[]);
        assert_eq!(ids, g.generated_ids, "{name}: greedy ids differ");
        let err = max_abs_diff(&logits, &g.logits);
        assert!(
            err <= TOLERANCE,
            "{name}: max abs logit error {err:.3e} > {TOLERANCE:.0e}"
        );
        eprintln!("{name}: ids match, max abs logit error {err:.2e}");
    }
}

#[test]
fn chunked_prefill_matches_transformers() {
    // 44 prompt tokens in steps of 16: two full chunks and a padded one;
    // gemma3's sliding window (16) then spans two chunks.
    for name in ["llama-gqa", "gemma3"] {
        let g = golden(name);
        let (ids, logits) = generate_ids(name, &["--prefill-len", "16"]);
        assert_eq!(ids, g.generated_ids, "{name}");
        let err = max_abs_diff(&logits, &g.logits);
        assert!(err <= TOLERANCE, "{name}: max abs logit error {err:.3e}");
    }
}

#[test]
fn results_do_not_depend_on_threads() {
    let name = "qwen3";
    let (ids1, logits1) = generate_ids(name, &["--threads", "1"]);
    let (ids2, logits2) = generate_ids(name, &["--threads", "2"]);
    assert_eq!(ids1, ids2);
    assert_eq!(
        logits1, logits2,
        "logits must be bit-identical across thread counts"
    );
}

#[test]
fn text_prompt_tokenizes_and_decodes_like_transformers() {
    let name = "mistral-sharded";
    let g = golden(name);
    let model = model_dir(name);
    let n = g.generated_ids.len().to_string();
    let out = kiln(&[
        "generate",
        model.to_str().unwrap(),
        "--prompt",
        &g.prompt,
        "--max-new-tokens",
        &n,
        "--ignore-eos",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}\n", g.generated_text));
    let err = stderr(&out);
    assert!(
        err.contains("prefill: 44 tokens") && err.contains("decode:  8 tokens"),
        "{err}"
    );
}

#[test]
fn inspect_prints_the_ir() {
    let model = model_dir("qwen3");
    let out = kiln(&["inspect", model.to_str().unwrap(), "--ir"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("arch       Qwen3ForCausalLM"), "{text}");
    assert!(text.contains("graph decode {"), "{text}");
    assert!(
        text.contains("input  %k_cache : f32[2, 1, 2, 256, 32]"),
        "{text}"
    );
    assert!(
        text.contains("= SwiGlu(%model.layers.0.mlp.gate_proj, %model.layers.0.mlp.up_proj)"),
        "{text}"
    );
    assert!(
        text.contains("= RmsNorm{eps=") && text.contains("@model.layers.1.self_attn.k_norm.weight"),
        "{text}"
    );
}

#[test]
fn saved_ir_reloads_and_runs_identically() {
    use kiln_runtime::engine::CpuSession;
    use kiln_runtime::generate::{generate, GenerationOptions};
    use kiln_runtime::ir::ModelIr;

    let name = "llama3-rope";
    let g = golden(name);
    let (model, ir) = kiln::lower(&model_dir(name), &Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.kiln.json");
    ir.save_json(&path).unwrap();
    let loaded = ModelIr::load_json(&path).unwrap();
    assert_eq!(loaded, ir);
    let options = GenerationOptions {
        max_new_tokens: g.generated_ids.len(),
        eos_token_ids: vec![],
        record_logits: true,
        sampling: Default::default(),
    };
    let mut session = CpuSession::new(&loaded, &model.weights).unwrap();
    let go_on = |_| std::ops::ControlFlow::Continue(());
    let report = generate(&mut session, &g.prompt_ids, &options, go_on).unwrap();
    assert_eq!(report.tokens, g.generated_ids);
    assert!(max_abs_diff(&report.logits, &g.logits) <= TOLERANCE);
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let model = model_dir("llama-gqa");
    let run = |seed: &str| {
        let out = kiln(&[
            "generate",
            model.to_str().unwrap(),
            "--token-ids",
            "5,6,7",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
    let bad = kiln(&[
        "generate",
        model.to_str().unwrap(),
        "--token-ids",
        "5",
        "--top-p",
        "0",
    ]);
    assert_fails_with(&bad, &["--top-p must be in (0, 1]"]);
}
