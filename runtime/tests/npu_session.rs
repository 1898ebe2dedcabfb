//! NpuSession against the ACL TEST DOUBLE (tests/acl_double/acl_double.c):
//! a C library that exports ACL's functions, keeps "device memory" on the
//! heap and plays a fake language model (see the file's header). Nothing
//! here runs on an NPU. These tests check Kiln's side: what is loaded,
//! allocated, copied and executed, in which order, and where the KV rows
//! land; and that every failure is a readable error that leaks nothing.
//!
//! The compiled directory is written here: a manifest.json shaped like
//! `kiln compile`'s and .om files (by the documented layout, with
//! MODEL_INOUT_INFO) that the double reads to describe the models.

#[path = "acl_double/harness.rs"]
mod harness;

use harness::{build_double, build_old_cann_double, calls, count, malloc_sizes};
use kiln_runtime::acl::{Acl, Device, Model, RunMode};
use kiln_runtime::compiled::manifest::Manifest;
use kiln_runtime::engine::npu::NpuSession;
use kiln_runtime::engine::npu::WeightLoading;
use kiln_runtime::engine::{Engine, SessionError};
use kiln_runtime::om::writer::{inout_info, om_file, TensorSpec};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

const LAYERS: usize = 2;
const KV_HEADS: usize = 2;
const MAX_LEN: usize = 8;
const HEAD_DIM: usize = 4;
const PREFILL: usize = 4;
const VOCAB: usize = 32;

/// ACL is per process and the double is steered by environment variables:
/// the tests that load it in-process take turns.
fn acl_turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// The double's k_new value for a position, layer, head and element
/// (`kiln_pattern` in acl_double.c); v_new holds its negative.
fn pattern(pos: usize, layer: usize, head: usize, d: usize) -> f32 {
    (((pos * LAYERS + layer) * KV_HEADS + head) * HEAD_DIM + d + 1) as f32
}

/// The double's logits after `token` at `position`.
fn fake_logits(token: u32, position: usize) -> Vec<f32> {
    let target = (7 * token as usize + 3 * position + 1) % VOCAB;
    (0..VOCAB)
        .map(|v| {
            if v == target {
                8.0
            } else {
                -0.25 * (v % 16) as f32
            }
        })
        .collect()
}

fn fake_next(token: u32, position: usize) -> u32 {
    ((7 * token as usize + 3 * position + 1) % VOCAB) as u32
}

/// A compiled directory as `kiln compile` lays it out (manifest only; no
/// IR or weights: the NPU path does not read them), with .om files.
struct CompiledDir {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    lib: PathBuf,
    log: PathBuf,
}

fn tensor(name: &str, dtype: &str, shape: &[usize]) -> serde_json::Value {
    serde_json::json!({ "name": name, "dtype": dtype, "shape": shape })
}

/// The manifest's graph entry; with `local`, the graph also takes
/// `attention_mask_local`.
fn graph(name: &str, tokens: usize, float: &str, local: bool) -> serde_json::Value {
    let cache = [LAYERS, 1, KV_HEADS, MAX_LEN, HEAD_DIM];
    let rows = [LAYERS, 1, KV_HEADS, tokens, HEAD_DIM];
    let mask = [1, 1, tokens, MAX_LEN + tokens];
    let mut inputs = vec![
        tensor("input_ids", "int64", &[1, tokens]),
        tensor("position_ids", "int64", &[1, tokens]),
        tensor("attention_mask", float, &mask),
    ];
    if local {
        inputs.push(tensor("attention_mask_local", float, &mask));
    }
    inputs.extend([
        tensor("logits_index", "int64", &[1, 1]),
        tensor("k_cache", float, &cache),
        tensor("v_cache", float, &cache),
    ]);
    serde_json::json!({
        "name": name,
        "tokens": tokens,
        "onnx": format!("{name}.onnx"),
        "om": format!("{name}.om"),
        "inputs": inputs,
        "outputs": [
            tensor("logits", float, &[1, 1, VOCAB]),
            tensor("k_new", float, &rows),
            tensor("v_new", float, &rows),
        ],
    })
}

/// Writes `graph`'s .om as ATC would describe it, optionally with another
/// KV-cache length.
fn write_om(dir: &Path, manifest: &Manifest, graph: &str, kv_len: Option<i64>) {
    write_om_reading(dir, manifest, graph, kv_len, &[]);
}

/// [`write_om`] for a model whose constants are the external weight files
/// `weights` (GE's FileConstants in MODEL_DEF, which the double reads).
fn write_om_reading(
    dir: &Path,
    manifest: &Manifest,
    graph: &str,
    kv_len: Option<i64>,
    weights: &[&str],
) {
    let info = manifest.graph(graph).unwrap();
    let acl_dtype = |dtype: &str| match dtype {
        "int64" => 9,
        "float16" => 1,
        _ => 0,
    };
    let described: Vec<(String, i32, Vec<i64>)> = info
        .inputs
        .iter()
        .map(|t| (t.name.clone(), t))
        // ATC names outputs after their node and index.
        .chain(info.outputs.iter().map(|t| (format!("{}:0", t.name), t)))
        .map(|(name, t)| {
            let mut dims: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            if let (Some(len), "k_cache" | "v_cache") = (kv_len, t.name.as_str()) {
                dims[3] = len;
            }
            (name, acl_dtype(&t.dtype), dims)
        })
        .collect();
    let specs: Vec<TensorSpec> = described
        .iter()
        .map(|(name, dtype, dims)| TensorSpec {
            name,
            dtype: *dtype,
            dims,
        })
        .collect();
    let (inputs, outputs) = specs.split_at(info.inputs.len());
    let model_def = if weights.is_empty() {
        vec![0; 8]
    } else {
        kiln_runtime::om::model_def::writer::file_constants(graph, weights)
    };
    let bytes = om_file(
        graph,
        &[(0, model_def), (8, inout_info(inputs, outputs))],
        true,
    );
    std::fs::write(dir.join(&info.om), bytes).unwrap();
}

fn compiled_dir(float: &str) -> CompiledDir {
    compiled_dir_with(float, &[("prefill", PREFILL), ("decode", 1)])
}

/// A compiled directory with these graphs (name, tokens per step).
fn compiled_dir_with(float: &str, graphs: &[(&str, usize)]) -> CompiledDir {
    compiled_dir_masked(float, graphs, None)
}

/// [`compiled_dir_with`]; with `local_window`, layer 0 reads
/// `attention_mask_local` over that window, layer 1 `attention_mask`.
fn compiled_dir_masked(
    float: &str,
    graphs: &[(&str, usize)],
    local_window: Option<usize>,
) -> CompiledDir {
    let masks = match local_window {
        None => serde_json::json!([
            { "input": "attention_mask", "layers": (0..LAYERS).collect::<Vec<_>>() }
        ]),
        Some(w) => serde_json::json!([
            { "input": "attention_mask", "layers": [1] },
            { "input": "attention_mask_local", "sliding_window": w, "layers": [0] },
        ]),
    };
    let local = local_window.is_some();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    let manifest = serde_json::json!({
        "format": 2,
        "kiln_version": "test",
        "architecture": "TestForCausalLM",
        "config_sha256": "",
        "weights_sha256": "",
        "target": { "name": "310b", "soc_version": "Ascend310B1" },
        "dtype": float,
        "opset": 17,
        "vocab_size": VOCAB,
        "prefill_len": graphs.iter().map(|g| g.1).max().unwrap(),
        "kv_cache": {
            "layers": LAYERS, "kv_heads": KV_HEADS, "max_len": MAX_LEN, "head_dim": HEAD_DIM,
            "layout": "", "update": "",
        },
        "mask": { "layout": "", "hidden": "-inf", "inputs": masks },
        "graph_layout": if graphs.len() == 1 { "single" } else { "split" },
        "graphs": graphs.iter().map(|&(name, t)| graph(name, t, float, local)).collect::<Vec<_>>(),
        "ir": "model.kiln.json",
        "reference_weights": "weights.safetensors",
        "tokenizer": null,
        "tokenizer_config": null,
        "generation": { "bos_token_id": null, "eos_token_ids": [] },
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let manifest = Manifest::load(&dir).unwrap();
    for (name, _) in graphs {
        write_om(&dir, &manifest, name, None);
    }
    let lib = build_double(tmp.path());
    let log = tmp.path().join("calls.log");
    CompiledDir {
        _tmp: tmp,
        dir,
        lib,
        log,
    }
}

/// Points ACL at the double, logging to `log`, in the given run mode.
fn use_double(lib: &Path, log: &Path, run_mode: &str) {
    std::env::set_var("KILN_ACL_LIB", lib);
    std::env::set_var("KILN_ACL_DOUBLE_LOG", log);
    std::env::set_var("KILN_ACL_DOUBLE_RUN_MODE", run_mode);
    std::env::remove_var("KILN_ACL_DOUBLE_FAIL_EXECUTE");
    std::env::remove_var("KILN_ACL_DOUBLE_FAIL_LOAD");
    std::env::remove_var("KILN_ACL_DOUBLE_SOC");
    std::env::remove_var("ASCEND_HOME_PATH");
    std::env::remove_var("ASCEND_TOOLKIT_HOME");
}

/// Cache slot `slot` of layer `layer`, head `head` in a host copy.
fn slot(cache: &[f32], layer: usize, head: usize, slot: usize) -> &[f32] {
    let at = ((layer * KV_HEADS + head) * MAX_LEN + slot) * HEAD_DIM;
    &cache[at..at + HEAD_DIM]
}

/// Slots `< written` hold the pattern of their position, the rest zeros.
fn assert_cache(session: &NpuSession, written: usize) {
    let (k, v) = session.read_kv_cache().unwrap();
    assert_eq!(k.len(), LAYERS * KV_HEADS * MAX_LEN * HEAD_DIM);
    for layer in 0..LAYERS {
        for head in 0..KV_HEADS {
            for s in 0..MAX_LEN {
                let want: Vec<f32> = (0..HEAD_DIM)
                    .map(|d| {
                        if s < written {
                            pattern(s, layer, head, d)
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let negated: Vec<f32> = want.iter().map(|x| -x).collect();
                assert_eq!(
                    slot(&k, layer, head, s),
                    want,
                    "k layer {layer} head {head} slot {s}"
                );
                assert_eq!(
                    slot(&v, layer, head, s),
                    negated,
                    "v layer {layer} head {head} slot {s}"
                );
            }
        }
    }
}

fn executed(calls: &[String]) -> Vec<&str> {
    calls
        .iter()
        .filter(|c| c.starts_with("executed "))
        .map(String::as_str)
        .collect()
}

#[test]
fn device_run_mode_session_against_the_test_double() {
    let _turn = acl_turn();
    let c = compiled_dir("float32");
    use_double(&c.lib, &c.log, "device");
    let manifest = Manifest::load(&c.dir).unwrap();
    let mut session = NpuSession::open(&c.dir, &manifest, 0).unwrap();

    // Load and describe both models, then allocate: 7 buffers per graph
    // (4 inputs, 3 outputs) and one K and one V cache shared by both.
    let opened = calls(&c.log);
    let loading: Vec<&str> = opened
        .iter()
        .map(String::as_str)
        .filter(|c| c.starts_with("aclmdl"))
        .collect();
    assert_eq!(
        loading,
        [
            "aclmdlLoadFromFile prefill.om",
            "aclmdlGetDesc",
            "aclmdlLoadFromFile decode.om",
            "aclmdlGetDesc"
        ]
    );
    assert_eq!(count(&opened, "aclrtMalloc"), 16);
    // Device run mode: the caches are zeroed in place, not copied to.
    assert!(!opened.iter().any(|c| c.starts_with("aclrtMemcpy")));
    assert_eq!(session.run_mode(), RunMode::Device);
    let device = session.device();
    assert!(
        device.starts_with("NPU (Ascend via ACL 0.0.0, device 0, soc Ascend310B1")
            && device.contains("runs on the device")
            && device.contains("libacl_test_double.so"),
        "{device}"
    );
    assert_cache(&session, 0);

    // Six prompt tokens: two prefill steps of four, the second padded.
    let prompt = [3, 1, 4, 1, 5, 9];
    let logits = session.forward(&prompt).unwrap();
    assert_eq!(logits, fake_logits(9, 5));
    assert_eq!(session.position(), 6);
    // Rows 0..6 came from k_new/v_new; the padding rows were not written.
    assert_cache(&session, 6);

    // Decode: one token a step; the double checks each step sees the cache
    // slots the mask shows filled as the earlier steps left them.
    let mut token = fake_next(9, 5);
    for position in 6..8 {
        let logits = session.forward(&[token]).unwrap();
        assert_eq!(logits, fake_logits(token, position));
        token = fake_next(token, position);
    }
    assert_cache(&session, 8);
    let full = session.forward(&[token]).unwrap_err();
    assert!(
        matches!(
            full,
            SessionError::ContextFull {
                needed: 9,
                capacity: 8
            }
        ),
        "{full}"
    );
    assert!(matches!(session.forward(&[]), Err(SessionError::Empty)));
    assert!(matches!(
        session.forward(&[VOCAB as u32]),
        Err(SessionError::BadToken { id: 32, .. })
    ));

    let stepped = calls(&c.log);
    assert_eq!(
        executed(&stepped),
        [
            "executed prefill.om past=0",
            "executed prefill.om past=4",
            "executed decode.om past=6",
            "executed decode.om past=7",
        ]
    );
    // No buffer was allocated after open, and in device run mode nothing
    // is copied through ACL: inputs, logits and the cache rows are plain
    // stores into the shared memory (the fake model checked the cache).
    assert_eq!(count(&stepped, "aclrtMalloc"), 16);
    let copies = stepped.iter().filter(|c| c.starts_with("aclrtMemcpy"));
    assert_eq!(copies.count(), 0);

    // A new conversation reuses the cache; stale slots are masked.
    session.reset();
    assert_eq!(session.position(), 0);
    assert_eq!(session.forward(&[2, 7]).unwrap(), fake_logits(7, 1));
    assert_eq!(session.forward(&[11]).unwrap(), fake_logits(11, 2));

    // A failing execute is a readable error; the position stays, and the
    // next step runs on (the double again checks the cache it sees).
    std::env::set_var("KILN_ACL_DOUBLE_FAIL_EXECUTE", "1");
    let err = session.forward(&[5, 6, 7]).unwrap_err().to_string();
    std::env::remove_var("KILN_ACL_DOUBLE_FAIL_EXECUTE");
    assert_eq!(
        err,
        "aclmdlExecute failed with ACL error 507011 (a runtime (aclrt) error): test double: execute failed as the test asked"
    );
    assert_eq!(session.position(), 3);
    assert_eq!(session.forward(&[5, 6]).unwrap(), fake_logits(6, 4));
    assert_eq!(session.position(), 5);
    drop(session);

    // Everything released, in order: each graph's datasets and model, then
    // its buffers, then the caches, the stream, context and device.
    let all = calls(&c.log);
    assert_eq!(count(&all, "aclrtFree"), 16);
    assert_eq!(all.last().unwrap(), "live objects at finalize: 0");
    let teardown: Vec<&str> = all
        .iter()
        .skip_while(|c| !c.starts_with("aclmdlUnload"))
        .map(String::as_str)
        .filter(|c| *c != "aclrtFree")
        .collect();
    assert_eq!(
        teardown,
        [
            "aclmdlUnload prefill.om",
            "aclmdlUnload decode.om",
            "aclrtDestroyStream",
            "aclrtDestroyContext",
            "aclrtResetDevice",
            "aclFinalize",
            "live objects at finalize: 0",
        ]
    );
}

/// A model with sliding-window layers: the session fills both masks the
/// manifest describes, each step, and the double sees the local one show
/// only the window's slots (recorded as `local=first..end`).
#[test]
fn both_masks_are_fed_to_a_sliding_window_model() {
    let _turn = acl_turn();
    let c = compiled_dir_masked("float16", &[("prefill", PREFILL), ("decode", 1)], Some(3));
    use_double(&c.lib, &c.log, "host");
    let manifest = Manifest::load(&c.dir).unwrap();
    let mut session = NpuSession::open(&c.dir, &manifest, 0).unwrap();
    // 8 buffers per graph (5 inputs, 3 outputs), K and V caches.
    assert_eq!(count(&calls(&c.log), "aclrtMalloc"), 18);
    let prompt = [3, 1, 4, 1, 5, 9];
    assert_eq!(session.forward(&prompt).unwrap(), fake_logits(9, 5));
    let mut token = fake_next(9, 5);
    for position in 6..8 {
        assert_eq!(
            session.forward(&[token]).unwrap(),
            fake_logits(token, position)
        );
        token = fake_next(token, position);
    }
    assert_cache(&session, 8);
    // Row 0 of each step (position p = past): the window of 3 shows cache
    // slots p - 2 and p - 1.
    assert_eq!(
        executed(&calls(&c.log)),
        [
            "executed prefill.om past=0 local=0..0",
            "executed prefill.om past=4 local=2..4",
            "executed decode.om past=6 local=4..6",
            "executed decode.om past=7 local=5..7",
        ]
    );
    drop(session);

    // A manifest whose masks the graphs do not take is refused by name.
    let mut bad: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.join("manifest.json")).unwrap())
            .unwrap();
    bad["mask"]["inputs"][1]["input"] = "attention_mask_global".into();
    std::fs::write(c.dir.join("manifest.json"), bad.to_string()).unwrap();
    let manifest = Manifest::load(&c.dir).unwrap();
    let err = NpuSession::open(&c.dir, &manifest, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("mask input `attention_mask_global` is not one of Kiln's"),
        "{err}"
    );
}

#[test]
fn host_run_mode_copies_inputs_and_logits_in_float16() {
    let _turn = acl_turn();
    let c = compiled_dir("float16");
    use_double(&c.lib, &c.log, "host");
    let manifest = Manifest::load(&c.dir).unwrap();
    let mut session = NpuSession::open(&c.dir, &manifest, 0).unwrap();
    assert_eq!(session.run_mode(), RunMode::Host);
    assert!(session.device().contains("runs on a host"));
    let opened = calls(&c.log);
    // The caches are zeroed from the host: one write each.
    assert_eq!(count(&opened, "aclrtMemcpy host_to_device"), 2);

    // Three tokens: one prefill step; f16 mask in, f16 logits and rows out.
    assert_eq!(session.forward(&[4, 8, 15]).unwrap(), fake_logits(15, 2));
    assert_eq!(session.forward(&[16]).unwrap(), fake_logits(16, 3));
    assert_cache(&session, 4);

    let stepped: Vec<String> = calls(&c.log).split_off(opened.len());
    // Per step: four inputs written, the logits read, the cache rows moved
    // device to device (the cache itself never crosses to the host).
    assert_eq!(count(&stepped, "aclrtMemcpy host_to_device"), 2 * 4);
    let cache_reads = 2; // assert_cache reads K and V once
    assert_eq!(
        count(&stepped, "aclrtMemcpy device_to_host"),
        2 + cache_reads
    );
    assert_eq!(
        count(&stepped, "aclrtMemcpy device_to_device"),
        2 * 2 * LAYERS * KV_HEADS
    );
    assert_eq!(count(&stepped, "aclrtMalloc"), 0);
    drop(session);
    assert_eq!(calls(&c.log).last().unwrap(), "live objects at finalize: 0");
}

#[test]
fn the_double_rejects_a_cache_the_steps_did_not_fill() {
    // Shows the double's cache check is not vacuous: a prefill.om executed
    // directly, with a mask showing one past slot that nobody wrote.
    let _turn = acl_turn();
    let c = compiled_dir("float32");
    use_double(&c.lib, &c.log, "device");
    let acl = Acl::init().unwrap();
    let device = Device::open(&acl, 0).unwrap();
    let model = Model::load(&device, &c.dir.join("prefill.om")).unwrap();
    let mut inputs: Vec<_> = model
        .inputs()
        .iter()
        .map(|d| device.alloc(d.size).unwrap())
        .collect();
    let mut outputs: Vec<_> = model
        .outputs()
        .iter()
        .map(|d| device.alloc(d.size).unwrap())
        .collect();
    let width = MAX_LEN + PREFILL;
    let mut mask = vec![f32::NEG_INFINITY; PREFILL * width];
    mask[0] = 0.0; // slot 0 shown
    mask[MAX_LEN] = 0.0;
    let bytes: Vec<u8> = mask.iter().flat_map(|x| x.to_le_bytes()).collect();
    inputs[2].write(&bytes).unwrap();
    inputs[1].write(&1i64.to_le_bytes()).unwrap(); // position 1 follows slot 0
    let ins: Vec<_> = inputs.iter().collect();
    let mut outs: Vec<_> = outputs.iter_mut().collect();
    let err = model.execute(&ins, &mut outs).unwrap_err();
    assert_eq!(
        err.message,
        "test double: k_cache layer 0 head 0 slot 0 holds 0, expected 1"
    );
}

#[test]
fn refusals_are_explained_and_leak_nothing() {
    let _turn = acl_turn();
    let c = compiled_dir("float32");
    let manifest = Manifest::load(&c.dir).unwrap();

    // No ACL anywhere: the error says where it looked.
    use_double(&c.lib, &c.log, "device");
    std::env::set_var("KILN_ACL_LIB", c.dir.join("missing/libascendcl.so"));
    let err = NpuSession::open(&c.dir, &manifest, 0).err().unwrap();
    assert!(err.is_acl_missing());
    let text = err.to_string();
    assert!(
        text.starts_with("ACL not found; looked in: ")
            && text.contains("missing/libascendcl.so")
            && text.contains("/usr/local/Ascend"),
        "{text}"
    );

    // An .om built for another KV length: refused before ACL loads any
    // model or memory (ACL itself is initialized first, so that a machine
    // without CANN says so before anything else).
    use_double(&c.lib, &c.log, "device");
    write_om(&c.dir, &manifest, "decode", Some(16));
    let err = NpuSession::open(&c.dir, &manifest, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("decode.om")
            && err.contains("`k_cache` is [2, 1, 2, 16, 4] in the .om but [2, 1, 2, 8, 4]")
            && err.contains("different KV-cache length than manifest.json's 8"),
        "{err}"
    );
    let touched = calls(&c.log);
    assert!(
        !touched
            .iter()
            .any(|c| c.starts_with("aclmdl") || c.starts_with("aclrt")),
        "{touched:?}"
    );
    write_om(&c.dir, &manifest, "decode", None);

    // No .om yet.
    std::fs::rename(c.dir.join("prefill.om"), c.dir.join("prefill.om.bak")).unwrap();
    let err = NpuSession::open(&c.dir, &manifest, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("prefill.om not found: run build_om.sh"),
        "{err}"
    );
    std::fs::rename(c.dir.join("prefill.om.bak"), c.dir.join("prefill.om")).unwrap();

    // decode.om fails to load: prefill.om, already loaded, is unloaded.
    std::env::set_var("KILN_ACL_DOUBLE_FAIL_LOAD", "decode.om");
    let err = NpuSession::open(&c.dir, &manifest, 0)
        .err()
        .unwrap()
        .to_string();
    std::env::remove_var("KILN_ACL_DOUBLE_FAIL_LOAD");
    assert!(
        err.starts_with(
            "aclmdlLoadFromFile failed with ACL error 100014 (ACL_ERROR_READ_MODEL_FAILURE)"
        ) && err.contains("loading decode.om failed as the test asked"),
        "{err}"
    );
    let log = calls(&c.log);
    assert_eq!(count(&log, "aclmdlUnload prefill.om"), 1);
    assert_eq!(log.last().unwrap(), "live objects at finalize: 0");

    // A device that does not exist.
    let err = NpuSession::open(&c.dir, &manifest, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("aclrtSetDevice failed with ACL error 107001"),
        "{err}"
    );
    assert_eq!(calls(&c.log).last().unwrap(), "live objects at finalize: 0");
}

fn kiln_run(c: &CompiledDir, lib: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln-run"))
        .arg("generate")
        .arg(&c.dir)
        .args(extra)
        .env("KILN_ACL_LIB", lib)
        .env("KILN_ACL_DOUBLE_LOG", &c.log)
        .env_remove("KILN_ACL_DOUBLE_RUN_MODE")
        .env_remove("ASCEND_HOME_PATH")
        .env_remove("ASCEND_TOOLKIT_HOME")
        .output()
        .unwrap()
}

#[test]
fn kiln_run_generate_with_backend_npu() {
    let c = compiled_dir("float16");
    let args = [
        "--backend",
        "npu",
        "--token-ids",
        "3,1,4,1,5",
        "--max-new-tokens",
        "3",
    ];
    let out = kiln_run(&c, &c.lib, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Greedy through the fake model: each token follows from the last.
    let first = fake_next(5, 4);
    let second = fake_next(first, 5);
    let third = fake_next(second, 6);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{first},{second},{third}")
    );
    assert!(
        stderr.contains("device:  NPU (Ascend via ACL 0.0.0, device 0, soc Ascend310B1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("kiln-run: device memory: weights embedded in each .om"),
        "{stderr}"
    );
    // A 5-token prompt: one full prefill chunk, the last token on decode.
    assert_eq!(
        executed(&calls(&c.log)),
        [
            "executed prefill.om past=0",
            "executed decode.om past=4",
            "executed decode.om past=5",
            "executed decode.om past=6",
        ]
    );

    // Without ACL: where it looked, and the way out.
    let out = kiln_run(&c, &c.dir.join("no/libascendcl.so"), &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.starts_with("error: ACL not found; looked in: ")
            && stderr.contains("no/libascendcl.so")
            && stderr.contains("--backend cpu"),
        "{stderr}"
    );
}

/// Plants external weights as build_om.sh leaves them: `weight/` with every
/// file, `<graph>.weights` listing what each graph reads, and .om files whose
/// (stand-in) FileConstants name them. Returns each file's size.
fn plant_external_weights(
    c: &CompiledDir,
    reads: &[(&str, &[(&str, usize)])],
) -> Vec<(String, usize)> {
    let manifest = Manifest::load(&c.dir).unwrap();
    std::fs::create_dir_all(c.dir.join("weight")).unwrap();
    let mut files = Vec::new();
    for (graph, list) in reads {
        for (name, bytes) in *list {
            // Bytes that differ per file, so a buffer holding another
            // file's bytes is caught by the double.
            let content: Vec<u8> = (0..*bytes).map(|i| (i * 7 + name.len()) as u8).collect();
            std::fs::write(c.dir.join("weight").join(name), content).unwrap();
            if !files.iter().any(|(n, _)| n == name) {
                files.push((name.to_string(), *bytes));
            }
        }
        let names: Vec<&str> = list.iter().map(|(n, _)| *n).collect();
        std::fs::write(
            c.dir.join(format!("{graph}.weights")),
            names.join("\n") + "\n",
        )
        .unwrap();
        write_om_reading(&c.dir, &manifest, graph, None, &names);
    }
    files
}

#[test]
fn external_weights_are_allocated_once_and_registered_for_both_graphs() {
    let _turn = acl_turn();
    let c = compiled_dir("float32");
    let files = plant_external_weights(
        &c,
        &[
            (
                "prefill",
                &[("weight_aa", 100), ("weight_bb", 64), ("weight_p", 40)],
            ),
            (
                "decode",
                &[("weight_aa", 100), ("weight_bb", 64), ("weight_d", 8)],
            ),
        ],
    );
    use_double(&c.lib, &c.log, "device");
    let manifest = Manifest::load(&c.dir).unwrap();
    let mut session = NpuSession::open(&c.dir, &manifest, 0).unwrap();
    let calls_after_open = calls(&c.log);

    // One buffer per distinct file, sized up to a multiple of 32, allocated
    // before anything else; their sum is what the session reports.
    let rounded: Vec<usize> = files.iter().map(|(_, b)| b.div_ceil(32) * 32).collect();
    assert_eq!(malloc_sizes(&calls_after_open)[..files.len()], rounded[..]);
    let allocation = session.allocation().clone();
    assert_eq!(allocation.loading, WeightLoading::Registered);
    assert_eq!(allocation.weights, rounded.iter().sum::<usize>() as u64);
    assert_eq!(allocation.weight_files, 4);
    // The caches and IO buffers: as many as without external weights.
    let kv = 2 * LAYERS * KV_HEADS * MAX_LEN * HEAD_DIM * 4;
    assert_eq!(allocation.kv_cache, kv as u64);
    let sizes = malloc_sizes(&calls_after_open);
    assert_eq!(
        sizes.iter().sum::<usize>() as u64,
        allocation.weights + allocation.kv_cache + allocation.io
    );

    // Both models load through a config handle with every file they read
    // registered; the loader copies nothing itself.
    let registered: Vec<&str> = calls_after_open
        .iter()
        .map(String::as_str)
        .filter(|c| c.starts_with("aclmdlSetExternalWeightAddress") || c.starts_with("aclmdlLoad"))
        .collect();
    assert_eq!(
        registered,
        [
            // The same block (pointer) for a file both graphs read.
            "aclmdlSetExternalWeightAddress weight_aa 128 block 0",
            "aclmdlSetExternalWeightAddress weight_bb 64 block 1",
            "aclmdlSetExternalWeightAddress weight_p 64 block 2",
            "aclmdlLoadWithConfig prefill.om",
            "aclmdlSetExternalWeightAddress weight_aa 128 block 0",
            "aclmdlSetExternalWeightAddress weight_bb 64 block 1",
            "aclmdlSetExternalWeightAddress weight_d 32 block 3",
            "aclmdlLoadWithConfig decode.om",
        ]
    );
    for graph in ["prefill.om", "decode.om"] {
        for file in ["weight_aa", "weight_bb"] {
            let line = format!("weight {file} registered for {graph}");
            assert_eq!(count(&calls_after_open, &line), 1, "{line}");
        }
    }
    assert!(
        !calls_after_open
            .iter()
            .any(|c| c.contains("read by the loader")),
        "{calls_after_open:?}"
    );
    assert!(allocation
        .describe()
        .contains("registered once for prefill and decode"));

    // It still generates: prefill then decode.
    let prompt = [3, 1, 4, 1, 5, 9];
    let logits = session.forward(&prompt).unwrap();
    assert_eq!(kiln_runtime::generate::argmax(&logits), fake_next(9, 5));
    session.forward(&[fake_next(9, 5)]).unwrap();
    drop(session);
    let all = calls(&c.log);
    assert_eq!(
        executed(&all),
        [
            "executed prefill.om past=0",
            "executed prefill.om past=4",
            "executed decode.om past=6"
        ]
    );
    assert_eq!(all.last().unwrap(), "live objects at finalize: 0");
}

#[test]
fn without_weight_registration_a_split_model_runs_on_decode_alone() {
    let _turn = acl_turn();
    let c = compiled_dir("float32");
    plant_external_weights(
        &c,
        &[
            ("prefill", &[("weight_aa", 64)]),
            ("decode", &[("weight_aa", 64)]),
        ],
    );
    let old = build_old_cann_double(c.lib.parent().unwrap());
    use_double(&old, &c.log, "device");
    let manifest = Manifest::load(&c.dir).unwrap();
    let mut session = NpuSession::open(&c.dir, &manifest, 0).unwrap();
    let allocation = session.allocation().clone();
    assert_eq!(allocation.loading, WeightLoading::DecodeOnly);
    assert_eq!(allocation.graphs, ["decode"]);
    let text = allocation.describe();
    assert!(
        text.contains("--graphs single") && text.contains("token by token"),
        "{text}"
    );
    let prompt = [3, 1, 4];
    let logits = session.forward(&prompt).unwrap();
    assert_eq!(kiln_runtime::generate::argmax(&logits), fake_next(4, 2));
    drop(session);
    let all = calls(&c.log);
    // prefill.om is never loaded: one copy of the weights, read by ACL.
    assert!(!all.iter().any(|c| c.contains("prefill.om")), "{all:?}");
    assert_eq!(
        count(
            &all,
            "weight weight_aa read by the loader for decode.om: 64 bytes"
        ),
        1
    );
    assert_eq!(
        executed(&all),
        [
            "executed decode.om past=0",
            "executed decode.om past=1",
            "executed decode.om past=2"
        ]
    );
}

#[test]
fn a_single_step_graph_serves_prompt_and_decode_on_the_double() {
    let _turn = acl_turn();
    let c = compiled_dir_with("float32", &[("step", 3)]);
    plant_external_weights(&c, &[("step", &[("weight_aa", 96)])]);
    use_double(&c.lib, &c.log, "device");
    let manifest = Manifest::load(&c.dir).unwrap();
    let mut session = NpuSession::open(&c.dir, &manifest, 0).unwrap();
    assert_eq!(session.allocation().loading, WeightLoading::Single);
    let prompt = [2, 7, 1, 8, 2];
    let mut token = kiln_runtime::generate::argmax(&session.forward(&prompt).unwrap());
    assert_eq!(token, fake_next(2, 4));
    for position in 5..7 {
        let next = kiln_runtime::generate::argmax(&session.forward(&[token]).unwrap());
        assert_eq!(next, fake_next(token, position));
        token = next;
    }
    assert_cache(&session, 7);
    drop(session);
    let all = calls(&c.log);
    assert_eq!(
        executed(&all),
        [
            "executed step.om past=0",
            "executed step.om past=3",
            "executed step.om past=5",
            "executed step.om past=6",
        ]
    );
    assert_eq!(
        count(
            &all,
            "weight weight_aa read by the loader for step.om: 96 bytes"
        ),
        1
    );
}

#[test]
fn split_graphs_with_embedded_weights_say_they_hold_them_twice() {
    let _turn = acl_turn();
    let c = compiled_dir("float32");
    use_double(&c.lib, &c.log, "device");
    let manifest = Manifest::load(&c.dir).unwrap();
    let session = NpuSession::open(&c.dir, &manifest, 0).unwrap();
    assert_eq!(session.allocation().loading, WeightLoading::EmbeddedTwice);
    assert!(session.allocation().describe().contains("build_om.sh"));
}

#[test]
fn another_chip_is_refused_with_the_command_that_converts_for_it() {
    let _turn = acl_turn();
    let c = compiled_dir("float32");
    use_double(&c.lib, &c.log, "device");
    std::env::set_var("KILN_ACL_DOUBLE_SOC", "Ascend310B4");
    let manifest = Manifest::load(&c.dir).unwrap();
    let err = NpuSession::open(&c.dir, &manifest, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("converted for Ascend310B1 but this NPU is Ascend310B4")
            && err.contains("build_om.sh --soc Ascend310B4"),
        "{err}"
    );
    // Nothing was loaded.
    assert!(!calls(&c.log).iter().any(|c| c.starts_with("aclmdlLoad")));
    // Converted for that chip (build_om.sh records it), it loads.
    std::fs::write(c.dir.join("om_soc.txt"), "Ascend310B4\n").unwrap();
    NpuSession::open(&c.dir, &manifest, 0).unwrap();
    std::env::remove_var("KILN_ACL_DOUBLE_SOC");
}

#[test]
fn without_cann_that_comes_first_even_before_missing_om_files() {
    let _turn = acl_turn();
    let c = compiled_dir("float32");
    for graph in ["prefill", "decode"] {
        std::fs::remove_file(c.dir.join(format!("{graph}.om"))).unwrap();
    }
    use_double(&c.lib, &c.log, "device");
    std::env::set_var("KILN_ACL_LIB", c.dir.join("missing/libascendcl.so"));
    let manifest = Manifest::load(&c.dir).unwrap();
    let err = NpuSession::open(&c.dir, &manifest, 0).err().unwrap();
    assert!(err.is_acl_missing(), "{err}");
    assert!(!err.to_string().contains(".om"), "{err}");
}

/// A word-level tokenizer for the double's vocabulary: token i is `t{i}`.
fn write_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB)
        .map(|i| (format!("t{i}"), serde_json::json!(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": { "type": "WhitespaceSplit" },
        "post_processor": null,
        "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "t0" },
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    manifest["tokenizer"] = serde_json::json!("tokenizer.json");
    std::fs::write(&path, manifest.to_string()).unwrap();
}

/// One POST over a fresh connection; the reply's status and JSON body.
fn post(port: u16, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let body = body.to_string();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

#[test]
fn kiln_run_serve_with_backend_npu_reuses_the_device_kv_cache() {
    let c = compiled_dir("float16");
    write_tokenizer(&c.dir);
    let stderr_path = c.dir.join("serve.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-run"))
        .args([
            "serve",
            c.dir.to_str().unwrap(),
            "--backend",
            "npu",
            "--port",
            "0",
        ])
        .env("KILN_ACL_LIB", &c.lib)
        .env("KILN_ACL_DOUBLE_LOG", &c.log)
        .env_remove("KILN_ACL_DOUBLE_RUN_MODE")
        .env_remove("ASCEND_HOME_PATH")
        .env_remove("ASCEND_TOOLKIT_HOME")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let marker = "listening on http://127.0.0.1:";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let port: u16 = loop {
        let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        if let Some(at) = log.find(marker) {
            let digits: String = log[at + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            break digits.parse().unwrap();
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("kiln-run serve exited ({status}):\n{log}");
        }
        assert!(std::time::Instant::now() < deadline, "no server:\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let greedy = |prompt: &[u32], n: usize| serde_json::json!({ "prompt": prompt, "max_tokens": n, "temperature": 0 });
    // Three prompt tokens on prefill.om, then decode.om, through the fake model.
    let (status, reply) = post(port, "/v1/completions", &greedy(&[3, 1, 4], 2));
    let first = fake_next(4, 2);
    let second = fake_next(first, 3);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["text"], format!("t{first} t{second}"));
    // The next request extends that conversation: only its new token runs.
    let (status, reply) = post(
        port,
        "/v1/completions",
        &greedy(&[3, 1, 4, first, second, 7], 1),
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["usage"]["prompt_tokens_details"]["cached_tokens"], 5);
    assert_eq!(reply["choices"][0]["text"], format!("t{}", fake_next(7, 5)));
    // The reply's last token is fed after the reply is sent: wait for it
    // before stopping the server.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while executed(&calls(&c.log)).len() < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        executed(&calls(&c.log)),
        [
            "executed prefill.om past=0",
            "executed decode.om past=3",
            // The reply's last token, fed once the reply is out.
            "executed decode.om past=4",
            "executed decode.om past=5",
            "executed decode.om past=6",
        ]
    );
}
