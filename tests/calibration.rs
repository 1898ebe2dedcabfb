//! Quantization from calibration text, end to end through the binaries:
//! SmoothQuant for `w8a8` (compiled for ATC, checked in ONNX Runtime), AWQ
//! for `w4a16` (through `kiln eval` and `kiln generate`), the
//! `quant_report.json` that `kiln compile` writes, and the mistakes a user
//! can make with the options.

mod common;
use common::*;
use kiln_runtime::compiled::CompiledModel;
use kiln_runtime::diff::{diff_backends, DiffBackend};
use std::path::PathBuf;

/// 418 tokens with the fixtures' byte-level tokenizers: one calibration
/// window of 256.
fn calibration_text() -> PathBuf {
    repo_root().join("tests/fixtures/eval/apache-2.0-head.txt")
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn finite(v: &serde_json::Value) -> f64 {
    let x = v.as_f64().unwrap_or(f64::NAN);
    assert!(x.is_finite(), "{v} is not a finite number");
    x
}

#[test]
fn smoothquant_w8a8_compiles_for_atc_writes_a_report_and_onnx_runtime_agrees() {
    let python = python();
    let tmp = tempfile::tempdir().unwrap();
    let text = calibration_text();
    for name in ["qwen3", "llama-gqa"] {
        let dir = tmp.path().join(name);
        let out = compile_fixture(
            name,
            &dir,
            &[
                "--dtype",
                "fp32",
                "--quant",
                "w8a8",
                "--calib-text",
                text.to_str().unwrap(),
            ],
        );
        let summary = stdout(&out);
        assert!(summary.contains("smoothquant α=0.5"), "{name}: {summary}");
        let manifest = read_json(&dir.join("manifest.json"));
        let quantization = manifest["quantization"].as_str().unwrap();
        assert!(quantization.contains("smoothquant α=0.5"), "{quantization}");
        assert!(
            !quantization.contains(": 0 input scalings"),
            "{name}: SmoothQuant rescaled nothing: {quantization}"
        );

        let report = read_json(&dir.join("quant_report.json"));
        assert_eq!(report["scheme"], "w8a8", "{report}");
        assert_eq!(report["in_sample"], true);
        assert_eq!(report["quantization"]["calibration"]["tokens"], 256);
        let evaluation = &report["evaluation"];
        assert!(finite(&evaluation["ppl"]) > 1.0);
        let agreement = &evaluation["agreement"];
        let ratio = finite(&agreement["ppl_ratio"]);
        assert!((0.5..2.0).contains(&ratio), "{name}: ppl ratio {ratio}");
        assert!(finite(&agreement["mean_cosine"]) > 0.9, "{agreement}");

        // The smoothed weights are what the reference interpreter and ONNX
        // Runtime both run: they agree as for plain w8a8.
        let g = golden(name);
        let model = CompiledModel::open(&dir).unwrap();
        let diff = diff_backends(
            &model,
            DiffBackend::Cpu,
            DiffBackend::Onnxruntime,
            &g.prompt_ids,
            6,
            Some(&python),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (step, d) in diff.steps.iter().enumerate() {
            assert!(
                d.cosine >= 0.99999 && d.top1_agrees,
                "{name} step {step}: cosine {} top-1 {}",
                d.cosine,
                d.top1_agrees
            );
        }
    }
}

#[test]
fn awq_runs_through_eval_and_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("qwen3");
    let model = model.to_str().unwrap();
    let text = calibration_text();
    let text = text.to_str().unwrap();
    let json = tmp.path().join("eval.json");
    let awq = [
        "--quant",
        "w4a16",
        "--group-size",
        "32",
        "--awq",
        "--calib-text",
        text,
    ];
    let eval = kiln(
        &[
            &["eval", model, "--text", text, "--ctx", "64"][..],
            &awq,
            &["--json", json.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(eval.status.success(), "{}", stderr(&eval));
    assert!(
        stderr(&eval).contains("awq from 256 tokens"),
        "{}",
        stderr(&eval)
    );
    let report = read_json(&json);
    assert_eq!(report["quant"], "w4a16 g32 awq");
    let agreement = &report["agreement"];
    let ratio = finite(&agreement["ppl_ratio"]);
    assert!((0.5..2.0).contains(&ratio), "ppl ratio {ratio}");
    let top1 = finite(&agreement["top1_agreement"]);
    assert!(top1 > 0.3, "top-1 agreement {top1}");

    let generate = kiln(
        &[
            &[
                "generate",
                model,
                "--token-ids",
                "1,2,3",
                "--max-new-tokens",
                "4",
            ][..],
            &awq,
        ]
        .concat(),
    );
    assert!(generate.status.success(), "{}", stderr(&generate));
    let ids = stdout(&generate);
    assert!(!ids.trim().is_empty(), "no tokens generated");
}

#[test]
fn calibration_mistakes_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("qwen3");
    let model = model.to_str().unwrap();
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "Too short to calibrate on.").unwrap();
    let short = short.to_str().unwrap();
    let text = calibration_text();
    let text = text.to_str().unwrap();
    let generate = |extra: &[&str]| {
        kiln(
            &[
                &[
                    "generate",
                    model,
                    "--token-ids",
                    "1,2,3",
                    "--max-new-tokens",
                    "1",
                ][..],
                extra,
            ]
            .concat(),
        )
    };
    assert_fails_with(
        &generate(&["--quant", "w8a8", "--calib-text", short]),
        &[short, "too short", "at least 256"],
    );
    assert_fails_with(
        &generate(&["--quant", "w8a8", "--calib-text", "/nonexistent/calib.txt"]),
        &["/nonexistent/calib.txt", "cannot read"],
    );
    assert_fails_with(
        &generate(&["--quant", "w4a16", "--awq"]),
        &["--awq needs calibration text", "--calib-text FILE"],
    );
    assert_fails_with(
        &generate(&[
            "--quant",
            "w4a16",
            "--smooth-alpha",
            "0.5",
            "--calib-text",
            text,
        ]),
        &["--smooth-alpha", "w8a8", "--awq"],
    );
    assert_fails_with(
        &generate(&["--quant", "w8a8", "--awq", "--calib-text", text]),
        &["--awq", "weight-only", "--smooth-alpha"],
    );
    assert_fails_with(
        &generate(&[
            "--quant",
            "w8a8",
            "--smooth-alpha",
            "2",
            "--calib-text",
            text,
        ]),
        &["--smooth-alpha 2", "between 0 and 1"],
    );
    assert_fails_with(
        &generate(&["--calib-text", text]),
        &["--calib-text", "--quant w8a8"],
    );
}
