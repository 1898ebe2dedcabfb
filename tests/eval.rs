//! `kiln eval` against transformers' strided perplexity of the same text
//! (tests/golden/make_eval_goldens.py recorded it), and its refusals.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The fixtures make_eval_goldens.py scored.
const EVAL_FIXTURES: [&str; 2] = ["llama-bf16-tied", "qwen3"];

/// Relative perplexity error allowed against transformers (f32 on both sides).
const TOLERANCE: f64 = 1e-4;

fn eval_golden(name: &str) -> Value {
    let path = repo_root()
        .join("tests/fixtures/golden")
        .join(name)
        .join("eval.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn text_path(golden: &Value) -> PathBuf {
    repo_root().join(golden["text"].as_str().unwrap())
}

/// Runs `kiln eval` with `--json`, asserting success; the JSON and the stdout.
fn eval_json(model: &Path, text: &Path, extra: &[&str]) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eval.json");
    let mut args = vec![
        "eval",
        model.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--json",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = kiln(&args);
    assert!(o.status.success(), "kiln eval failed:\n{}", stderr(&o));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["eval.json"], "only the JSON is left beside it");
    let json = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    (json, stdout(&o))
}

#[test]
fn perplexity_matches_transformers() {
    for name in EVAL_FIXTURES {
        let golden = eval_golden(name);
        let model = model_dir(name);
        let text = text_path(&golden);
        // Both sides must score the same ids.
        let expected_ids: Vec<u32> = golden["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let content = std::fs::read_to_string(&text).unwrap();
        let o = kiln(&["tokenize", model.to_str().unwrap(), "--prompt", &content]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            stdout(&o).trim(),
            join_ids(&expected_ids),
            "{name}: tokens differ"
        );

        for run in golden["runs"].as_array().unwrap() {
            let (ctx, stride) = (run["ctx"].to_string(), run["stride"].to_string());
            let mut extra = vec!["--ctx", ctx.as_str()];
            if !run["stride_is_default"].as_bool().unwrap() {
                extra.extend(["--stride", stride.as_str()]);
            }
            let max_tokens = run["max_tokens"].to_string();
            if !run["max_tokens"].is_null() {
                extra.extend(["--max-tokens", max_tokens.as_str()]);
            }
            let (json, table) = eval_json(&model, &text, &extra);
            for key in ["tokens", "ctx", "stride", "windows", "scored_tokens"] {
                assert_eq!(json[key], run[key], "{name} {extra:?}: {key}");
            }
            // A NaN or an infinity is written as null and fails here.
            let ppl = json["ppl"].as_f64().expect("a finite perplexity");
            let expected = run["ppl"].as_f64().unwrap();
            let error = (ppl - expected).abs() / expected;
            assert!(
                ppl.is_finite() && error <= TOLERANCE,
                "{name} {extra:?}: ppl {ppl} vs transformers' {expected} (relative error {error:.2e})"
            );
            assert!(
                table.contains(&format!("{ppl:.4}")),
                "the table shows it:\n{table}"
            );
            eprintln!("{name} {extra:?}: ppl {ppl:.6}, relative error {error:.2e}");
        }
    }
}

#[test]
fn quant_none_agrees_with_the_reference_exactly() {
    let name = "qwen3";
    let golden = eval_golden(name);
    let (json, table) = eval_json(
        &model_dir(name),
        &text_path(&golden),
        &["--ctx", "48", "--quant", "none", "--threads", "1"],
    );
    assert_eq!(json["quant"], "none");
    let a = &json["agreement"];
    assert_eq!(a["ppl_ratio"].as_f64(), Some(1.0), "{json}");
    assert_eq!(a["top1_agreement"].as_f64(), Some(1.0));
    assert_eq!(a["reference_ppl"], json["ppl"]);
    for key in ["mean_cosine", "min_cosine"] {
        assert!(1.0 - a[key].as_f64().unwrap() < 1e-12, "{key}: {json}");
    }
    let header = table.lines().next().unwrap();
    for column in [
        "model",
        "ppl",
        "quant",
        "ref ppl",
        "ppl ratio",
        "min cos",
        "top-1",
    ] {
        assert!(header.contains(column), "{table}");
    }
    // Without --quant there is no reference and no agreement.
    let (json, table) = eval_json(&model_dir(name), &text_path(&golden), &["--ctx", "48"]);
    assert!(json.get("agreement").is_none() && !table.contains("cos"));
}

#[test]
fn bad_texts_and_windows_are_refused_by_name() {
    let model = model_dir("llama-gqa");
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-text.txt");
    let o = kiln(&["eval", model, "--text", missing.to_str().unwrap()]);
    assert_fails_with(&o, &["no-such-text.txt", "cannot read"]);

    let short = dir.path().join("short.txt");
    std::fs::write(&short, "Kiln compiles").unwrap();
    let o = kiln(&[
        "eval",
        model,
        "--text",
        short.to_str().unwrap(),
        "--ctx",
        "64",
    ]);
    assert_fails_with(
        &o,
        &["short.txt", "fewer than one window of --ctx 64 needs (64)"],
    );

    let text = text_path(&eval_golden("qwen3"));
    let text = text.to_str().unwrap();
    let o = kiln(&[
        "eval",
        model,
        "--text",
        text,
        "--ctx",
        "64",
        "--max-tokens",
        "20",
    ]);
    assert_fails_with(
        &o,
        &[
            "cut to --max-tokens 20",
            "the text has 20 tokens, fewer than",
        ],
    );
    let o = kiln(&[
        "eval", model, "--text", text, "--ctx", "64", "--stride", "64",
    ]);
    assert_fails_with(&o, &["--stride 64 must be from 1 to 63"]);
    let o = kiln(&["eval", model, "--text", text, "--ctx", "512"]);
    assert_fails_with(
        &o,
        &["--ctx 512 exceeds the model's max_position_embeddings (256)"],
    );
}
