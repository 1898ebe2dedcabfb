//! `kiln compile --kernels ascendc`: the ATC graphs call Kiln's generated
//! Ascend C kernels through custom `ai.kiln` nodes, keep the int4 weights
//! packed, and build_om.sh builds and installs the package before atc.

mod common;

use common::{compile_fixture, python, stderr, stdout};
use std::path::Path;
use std::process::Command;

/// The OriginOpType strings the package's ONNX plugins register.
fn plugin_origin_types(kernels: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let dir = kernels.join("framework/onnx_plugin");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for part in text.split(".OriginOpType({\"").skip(1) {
            found.push(part.split('"').next().unwrap().to_string());
        }
    }
    found.sort();
    found
}

/// For each graph: the custom node types (as `domain::version::type`), the
/// domains declared, whether full_check passes, and the bytes and dtypes of
/// the Linear-weight initializers a kernel reads.
const INSPECT: &str = r#"
import json, sys, onnx
d = sys.argv[1]
out = {}
for g in json.load(open(d + '/manifest.json'))['graphs']:
    m = onnx.load(d + '/' + g['onnx'])
    onnx.checker.check_model(m, full_check=True)
    opsets = {o.domain: o.version for o in m.opset_import}
    inits = {t.name: t for t in m.graph.initializer}
    custom, packed, half = [], 0, 0
    for n in m.graph.node:
        if n.domain:
            custom.append('%s::%d::%s' % (n.domain, opsets[n.domain], n.op_type))
        if n.op_type.startswith('KilnGemv'):
            w = inits[n.input[1]]
            size = 1
            for x in w.dims: size *= x
            if w.data_type == onnx.TensorProto.UINT8: packed += size
        if n.op_type == 'Gemm' and n.input[1] in inits:
            w = inits[n.input[1]]
            size = 1
            for x in w.dims: size *= x
            half += 2 * size
    out[g['name']] = {'custom': sorted(set(custom)), 'opsets': opsets, 'packed_bytes': packed,
                      'gemm_fp16_bytes': half, 'nodes': len(custom)}
print(json.dumps(out))
"#;

#[test]
fn w4a16_compiles_to_kiln_nodes_over_packed_weights_with_their_package() {
    let py = python();
    let tmp = tempfile::tempdir().unwrap();
    let quant = ["--quant", "w4a16", "--group-size", "32"];
    // Without --kernels ascendc (or --dequantize-for-atc), w4a16 is refused.
    let refused = common::kiln(&[
        "compile",
        common::model_dir("qwen3").to_str().unwrap(),
        "-o",
        tmp.path().join("refused").to_str().unwrap(),
        "--no-atc",
        "--quant",
        "w4a16",
        "--group-size",
        "32",
    ]);
    common::assert_fails_with(&refused, &["--kernels ascendc"]);

    let dir = tmp.path().join("q4");
    let o = compile_fixture(
        "qwen3",
        &dir,
        &[&quant[..], &["--kernels", "ascendc"]].concat(),
    );
    let summary = stdout(&o);
    assert!(summary.contains("per token"), "{summary}");
    assert!(summary.contains("on a CANN machine"), "{summary}");

    common::expand_weights(&dir);
    let out = Command::new(&py)
        .args(["-c", INSPECT])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let graphs: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();

    // Every custom node type is one a plugin registers, and each plugin's
    // type appears in some graph.
    let kernels = dir.join("kernels");
    let registered = plugin_origin_types(&kernels);
    let mut used: Vec<String> = Vec::new();
    for (name, g) in graphs.as_object().unwrap() {
        assert_eq!(g["opsets"]["ai.kiln"], 1, "{name}: domain not declared");
        for t in g["custom"].as_array().unwrap() {
            used.push(t.as_str().unwrap().to_string());
        }
    }
    used.sort();
    used.dedup();
    assert_eq!(used, registered);
    assert!(used.iter().any(|t| t == "ai.kiln::1::KilnGemvNibble"));
    assert!(used.iter().any(|t| t == "ai.kiln::1::KilnAddRmsNorm"));

    // The decode graph's Linears are GEMV kernels over uint8-packed int4
    // (half a byte a weight); prefill (T > 1 rows) keeps fp16 Gemms.
    let decode = &graphs["decode"];
    let packed = decode["packed_bytes"].as_u64().unwrap();
    assert_eq!(decode["gemm_fp16_bytes"], 0, "decode keeps a Gemm");
    let prefill_fp16 = graphs["prefill"]["gemm_fp16_bytes"].as_u64().unwrap();
    assert_eq!(graphs["prefill"]["packed_bytes"], 0);
    // The same Linears: fp16 is four times the packed bytes (tied lm_head
    // included in both).
    assert!(
        packed > 0 && prefill_fp16 == 4 * packed,
        "{packed} vs {prefill_fp16}"
    );

    // The msopgen layout, for the 310B.
    for path in [
        "build.sh",
        "CMakePresets.json",
        "op_host/kiln_gemv_nibble.cpp",
        "op_kernel/kiln_gemv_nibble.cpp",
        "framework/onnx_plugin/kiln_gemv_nibble_plugin.cc",
        "kernels.json",
    ] {
        assert!(kernels.join(path).is_file(), "kernels/{path} missing");
    }
    let presets = std::fs::read_to_string(kernels.join("CMakePresets.json")).unwrap();
    assert!(presets.contains("ascend310b"));

    // The manifest records the kernels, their tiling and the GM bytes.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["kernels"], "ascendc");
    let package = &manifest["kernel_package"];
    assert_eq!(package["target"], "ascend310b");
    let instances = package["instances"].as_array().unwrap();
    assert!(instances.iter().all(|i| i["tiling"].is_object()));
    let decode_bytes: u64 = instances
        .iter()
        .map(|i| i["bytes_read"].as_u64().unwrap() * i["calls"]["decode"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        package["decode_bytes_per_token"].as_u64(),
        Some(decode_bytes)
    );
    // The GEMVs read at least the packed weights once per token.
    assert!(decode_bytes >= packed, "{decode_bytes} < {packed}");
}

#[test]
fn build_om_builds_and_installs_the_package_then_runs_atc_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fp16");
    compile_fixture("llama-gqa", &dir, &["--kernels", "ascendc"]);
    let log = tmp.path().join("log.txt");
    // Stand-ins (test doubles, not CANN): kernels/build.sh leaves a
    // custom_opp_*.run that "installs" a vendor folder with set_env.bash;
    // atc records ASCEND_CUSTOM_OPP_PATH.
    let installer = format!(
        "#!/usr/bin/env bash\nset -e\necho \"install $*\" >> '{log}'\n\
         for a in \"$@\"; do case \"$a\" in --install-path=*) p=${{a#--install-path=}} ;; esac; done\n\
         mkdir -p \"$p/vendors/kiln/bin\"\n\
         echo 'export ASCEND_CUSTOM_OPP_PATH=\"'\"$p\"'/vendors/kiln:${{ASCEND_CUSTOM_OPP_PATH}}\"' > \"$p/vendors/kiln/bin/set_env.bash\"\n",
        log = log.display()
    );
    let build = format!(
        "#!/usr/bin/env bash\nset -e\ncd \"$(dirname \"$0\")\"\necho build >> '{log}'\n\
         mkdir -p build_out\ncat > build_out/custom_opp_ubuntu_x86_64.run <<'EOF'\n{installer}EOF\n",
        log = log.display()
    );
    std::fs::write(dir.join("kernels/build.sh"), build).unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let atc = format!(
        "#!/usr/bin/env bash\necho \"atc ASCEND_CUSTOM_OPP_PATH=$ASCEND_CUSTOM_OPP_PATH\" >> '{log}'\n\
         for a in \"$@\"; do case \"$a\" in --output=*) out=${{a#--output=}} ;; esac; done\n\
         echo om > \"$out.om\"\n",
        log = log.display()
    );
    common::write_executable(&bin.join("atc"), &atc);
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = Command::new("bash")
        .arg(dir.join("build_om.sh"))
        .env("PATH", path)
        .env("KILN_RUN", common::kiln_run_binary())
        .env_remove("ASCEND_CUSTOM_OPP_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let opp = dir.canonicalize().unwrap().join("opp");
    assert_eq!(lines[0], "build");
    assert_eq!(
        lines[1],
        format!("install --install-path={}", opp.display())
    );
    // Then atc, once per graph, with the installed vendor path first.
    let atc_lines = &lines[2..];
    assert_eq!(atc_lines.len(), 2, "{lines:?}");
    for l in atc_lines {
        let want = format!("atc ASCEND_CUSTOM_OPP_PATH={}/vendors/kiln", opp.display());
        assert!(l.starts_with(&want), "{l}");
    }
    assert!(dir.join("decode.om").is_file() && dir.join("prefill.om").is_file());
}

#[test]
fn w8a16_for_a_910b_and_refusals_of_fp32_and_chips_without_a_family() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::model_dir("llama-gqa");
    let run = |extra: &[&str]| {
        let out = tmp.path().join("x");
        let mut args = vec![
            "compile",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--no-atc",
            "--kernels",
            "ascendc",
        ];
        args.extend_from_slice(extra);
        common::kiln(&args)
    };
    // w8a16 for a 910B chip: the int8 GEMV, in a package for ascend910b.
    let dir = tmp.path().join("w8");
    compile_fixture(
        "llama-gqa",
        &dir,
        &[
            "--kernels",
            "ascendc",
            "--quant",
            "w8a16",
            "--target",
            "ascend910b1",
        ],
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["kernel_package"]["target"], "ascend910b");
    let types: Vec<&str> = manifest["kernel_package"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["op_type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"KilnGemvByte"), "{types:?}");
    let presets = std::fs::read_to_string(dir.join("kernels/CMakePresets.json")).unwrap();
    assert!(presets.contains("ascend910b"));

    common::assert_fails_with(&run(&["--dtype", "fp32"]), &["--dtype fp16"]);
    common::assert_fails_with(&run(&["--target", "ascend310p3"]), &["Ascend310P3"]);
    assert!(!tmp.path().join("x").exists());
}
