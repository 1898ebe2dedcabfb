//! examples/board-check.sh end to end on STAND-INS (no NPU, no CANN here):
//! tests/standin/atc.py plays ATC (it writes .om files with a real GE
//! ModelDef from the ONNX graphs), runtime/tests/acl_double plays ACL, and a
//! script prints npu-smi's table. The report must say so, and hold the
//! numbers each step printed.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../runtime/tests/acl_double/harness.rs"]
mod harness;

/// kiln-run, built beside kiln by `cargo test --workspace` (as .ci/run does).
fn kiln_run() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name("kiln-run");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p kiln-runtime --bin kiln-run` \
         (cargo test --workspace does)",
        path.display()
    );
    path
}

struct StandIns {
    bin: PathBuf,
    acl: PathBuf,
}

fn stand_ins(tmp: &Path) -> StandIns {
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let atc = format!(
        "#!/bin/sh\nexec '{}' '{}' \"$@\"\n",
        python().display(),
        repo_root().join("tests/standin/atc.py").display()
    );
    write_executable(&bin.join("atc"), &atc);
    // npu-smi's summary table as 310B boards print it, naming itself a stand-in.
    let npu_smi = "#!/usr/bin/env bash\n[ \"$1\" = info ] && [ $# -eq 1 ] || exit 1\ncat <<'EOF'\n\
        +--------------------------------------------------------------------------------------------------------+\n\
        | npu-smi stand-in (tests/board_check.rs)          Version: 23.0.0                                       |\n\
        +-------------------------------+-----------------+------------------------------------------------------+\n\
        | NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |\n\
        | Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |\n\
        +===============================+=================+======================================================+\n\
        | 0       310B1                 | OK              | 0.0          55                15    / 15            |\n\
        | 0       0                     | NA              | 42           3628 / 15609                            |\n\
        +===============================+=================+======================================================+\n\
        EOF\n";
    write_executable(&bin.join("npu-smi"), npu_smi);
    let acl = harness::build_double(tmp);
    StandIns { bin, acl }
}

fn board_check(s: &StandIns, dir: &Path, report: &Path, extra: &[&str]) -> Output {
    let path = format!("{}:{}", s.bin.display(), std::env::var("PATH").unwrap());
    Command::new("bash")
        .arg(repo_root().join("examples/board-check.sh"))
        .arg(dir)
        .arg("--report")
        .arg(report)
        .arg("--kiln-run")
        .arg(kiln_run())
        .args(extra)
        .env("PATH", path)
        .env("KILN_ACL_LIB", &s.acl)
        .env_remove("KILN_ACL_DOUBLE_LOG")
        .output()
        .unwrap()
}

/// The row of the report's table that starts with `| {first} |`, split.
fn row<'a>(report: &'a str, first: &str) -> Vec<&'a str> {
    let start = format!("| {first} |");
    let line = report
        .lines()
        .find(|l| l.starts_with(&start))
        .unwrap_or_else(|| panic!("no row {start:?} in\n{report}"));
    line.trim_matches('|').split(" | ").map(str::trim).collect()
}

fn number(text: &str) -> f64 {
    let value: f64 = text
        .parse()
        .unwrap_or_else(|_| panic!("{text:?} is not a number"));
    assert!(value.is_finite() && value > 0.0, "{text}");
    value
}

#[test]
fn board_check_runs_end_to_end_on_the_stand_ins_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qwen3-w8a8");
    compile_fixture("qwen3", &dir, &["--quant", "w8a8"]);
    let s = stand_ins(tmp.path());
    if let Ok(o) = Command::new("shellcheck")
        .arg(repo_root().join("examples/board-check.sh"))
        .output()
    {
        assert!(o.status.success(), "shellcheck:\n{}", stdout(&o));
    }

    let report_path = tmp.path().join("report.md");
    let out = board_check(&s, &dir, &report_path, &[]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let report = std::fs::read_to_string(&report_path).unwrap();
    // build_om.sh made weights.bin with the kiln-run given, and removed it after.
    assert!(
        report.contains("weights.bin: making it from weights.safetensors")
            && report.contains("weights.bin: removed"),
        "{report}"
    );
    // No log folder or temporary report left beside the report.
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    for section in [
        "# Kiln board check: qwen3-w8a8",
        "## Summary",
        "## What ATC built (kiln-run check)",
        "## CPU vs NPU (kiln-run diff, 8 steps each)",
        "## Benchmark",
        "## Memory",
        "## AI Core during the NPU run",
        "## Logs",
    ] {
        assert!(report.contains(section), "{section:?} missing:\n{report}");
    }
    // The disclosure: every stand-in named, and that no NPU computed anything.
    let ran_on = report.lines().find(|l| l.starts_with("**Ran on:")).unwrap();
    for needle in ["STAND-INS, NOT AN NPU", "atc", "ACL test double", "npu-smi"] {
        assert!(ran_on.contains(needle), "{needle:?} not in {ran_on}");
    }
    assert_eq!(row(&report, "SoC (npu-smi)")[1], "310B1");
    assert_eq!(row(&report, ".om built for")[1], "Ascend310B1");
    assert!(row(&report, "kiln-run")[1].starts_with("kiln-run "));
    assert_eq!(row(&report, "build_om.sh")[1], "PASS");
    assert_eq!(row(&report, "kiln-run check")[1], "PASS");
    assert_eq!(row(&report, "AI Core busy (npu-smi)")[1], "PASS");
    // What ATC built, read back from MODEL_DEF: int8 weights, engines.
    assert!(
        report.contains("decode.om: ") && report.contains("int8") && report.contains("AI Core"),
        "{report}"
    );
    assert!(report.contains("No op fell back to the AI CPU"));
    // The diff ran on both prompts and its table was parsed; the double's
    // fake model is not judged.
    for n in [1, 2] {
        let diff = row(&report, &format!("diff cpu vs npu #{n}"));
        assert_eq!(diff[1], "NOT JUDGED", "{diff:?}");
        assert!(diff[2].starts_with("8 steps, max abs "), "{diff:?}");
        let cosine = diff[2].split("min cosine ").nth(1).unwrap();
        let cosine: f64 = cosine.split(',').next().unwrap().parse().unwrap();
        assert!(cosine.abs() <= 1.0, "{cosine}");
    }
    // Benchmark numbers parsed for both backends.
    for backend in ["npu", "cpu (reference interpreter)"] {
        let r = row(&report, backend);
        for value in &r[1..4] {
            number(value);
        }
    }
    let memory = report
        .lines()
        .find(|l| l.starts_with("Allocated by kiln-run on the device: "))
        .unwrap();
    assert!(
        memory.contains("weights")
            && memory.contains("registered once")
            && memory.contains("KV cache"),
        "{memory}"
    );
    let aicore = report
        .lines()
        .find(|l| l.contains("samples over"))
        .unwrap_or_else(|| panic!("no npu-smi samples in\n{report}"));
    assert!(
        aicore.contains("max 42%") && aicore.contains("up to 3628 MB"),
        "{aicore}"
    );

    // `kiln inspect --graph` on what the stand-in atc built.
    let om = dir.join("decode.om");
    let o = kiln(&["inspect", om.to_str().unwrap(), "--graph"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for needle in [
        "soc_version: Ascend310B1",
        "atc_version: stand-in atc",
        "AI Core",
        "no op fell back to the AI CPU",
        "int8 14 tensors",
        "external weight files: ",
        "custom ops: none",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }
    let o = kiln(&["inspect", dir.to_str().unwrap(), "--graph"]);
    assert_fails_with(&o, &["--graph reads an .om file's MODEL_DEF"]);
    let bytes = std::fs::read(&om).unwrap();
    let cut = tmp.path().join("cut.om");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = kiln(&["inspect", cut.to_str().unwrap(), "--graph"]);
    assert_fails_with(&o, &["cut.om", "truncated or corrupt"]);

    // An ATC that made float copies of the int8 weights and put Softmax on
    // the AI CPU (decode.om converted again so, its weight files beside the
    // others): kiln-run check fails, saying what to do, the report flags
    // both, and the script exits 1.
    let stage = tmp.path().join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    // build_om.sh removed the weights.bin it made: atc needs it again.
    assert!(!dir.join("weights.bin").exists());
    expand_weights(&dir);
    let o = Command::new(s.bin.join("atc"))
        .arg(format!("--model={}", dir.join("decode.onnx").display()))
        .arg(format!("--output={}", stage.join("decode").display()))
        .args(["--soc_version=Ascend310B1", "--external_weight=1"])
        .env("KILN_STANDIN_ATC_FLOAT_WEIGHTS", "1")
        .env("KILN_STANDIN_ATC_AICPU", "Softmax")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::rename(stage.join("decode.om"), &om).unwrap();
    for file in std::fs::read_dir(stage.join("weight")).unwrap() {
        let file = file.unwrap();
        std::fs::rename(file.path(), dir.join("weight").join(file.file_name())).unwrap();
    }
    let check = Command::new(kiln_run())
        .arg("check")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!check.status.success());
    let text = format!("{}{}", stdout(&check), stderr(&check));
    assert!(
        text.contains(
            "error: decode.om: manifest.json says the ATC graphs keep int8 matmul weights"
        ) && text.contains("but only 0 of the .om's")
            && text.contains("ATC made float copies")
            && text.contains("warning: decode.om: 2 op(s) fell back to the AI CPU")
            && text.contains("(SoftmaxV2)"),
        "{text}"
    );
    let out = board_check(&s, &dir, &report_path, &["--no-build"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report = std::fs::read_to_string(&report_path).unwrap();
    assert_eq!(row(&report, "kiln-run check")[1], "FAIL");
    assert!(report.contains("**AI CPU FALLBACK:**"), "{report}");
    assert!(row(&report, "kiln-run check")[2].contains("int8 matmul weights"));
}
