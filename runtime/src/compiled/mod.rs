//! A directory written by `kiln compile`, opened for the reference
//! interpreter: its manifest, IR and reference weights, checked against
//! each other.

pub mod external_weights;
pub mod manifest;
pub mod weights_bin;

use crate::ir::model::ModelIrError;
use crate::ir::{GraphNames, ModelIr};
use crate::om::{OmError, OmFile, OmModelIo};
use crate::weights::{WeightError, WeightStore};
use manifest::{GraphInfo, Manifest, ManifestError};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CompiledError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Ir(#[from] ModelIrError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("{dir}: the manifest and the IR disagree: {what}; recompile the model")]
    Mismatch { dir: PathBuf, what: String },
    #[error(transparent)]
    Om(#[from] OmError),
    #[error("{om}: {problem}")]
    OmMismatch { om: PathBuf, problem: String },
}

/// What checking one graph's .om file found.
pub enum OmCheck {
    /// The .om's inputs and outputs are the manifest's.
    Matches,
    /// No .om yet: build_om.sh has not run here.
    Missing,
    /// The .om does not describe its IO (no MODEL_INOUT_INFO partition);
    /// only ACL can check it, when it loads the model.
    Undescribed,
}

fn acl_dtype_name(dtype: &str) -> Option<i32> {
    match dtype {
        "float32" => Some(0),
        "float16" => Some(1),
        "int64" => Some(9),
        _ => None,
    }
}

/// Compares an .om's description with the manifest's graph, position by
/// position (ATC names outputs after nodes, so only inputs are compared by
/// name).
pub fn check_io(graph: &GraphInfo, io: &OmModelIo, kv_max_len: usize) -> Result<(), String> {
    for (what, expected, actual) in [
        ("inputs", &graph.inputs, &io.inputs),
        ("outputs", &graph.outputs, &io.outputs),
    ] {
        if expected.len() != actual.len() {
            return Err(format!(
                "the .om has {} {what}, manifest.json lists {}",
                actual.len(),
                expected.len()
            ));
        }
        for (e, a) in expected.iter().zip(actual.iter()) {
            if what == "inputs" && e.name != a.name {
                return Err(format!(
                    "input `{}` of the .om is `{}` in manifest.json",
                    a.name, e.name
                ));
            }
            let dims: Vec<i64> = e.shape.iter().map(|&d| d as i64).collect();
            if a.dims != dims {
                let cache = matches!(
                    e.name.as_str(),
                    GraphNames::K_CACHE
                        | GraphNames::V_CACHE
                        | GraphNames::ATTENTION_MASK
                        | GraphNames::ATTENTION_MASK_LOCAL
                );
                let hint = if cache {
                    format!(
                        ": the .om was built for a different KV-cache length than manifest.json's {kv_max_len}; \
                         running them together garbles the output. Rerun build_om.sh in this directory"
                    )
                } else {
                    ". Rerun build_om.sh in this directory".to_string()
                };
                return Err(format!(
                    "{what} `{}` is {:?} in the .om but {:?} in manifest.json{hint}",
                    e.name, a.dims, dims
                ));
            }
            if acl_dtype_name(&e.dtype).is_some_and(|d| d != a.dtype.0) {
                return Err(format!(
                    "{what} `{}` is {} in the .om but {} in manifest.json",
                    e.name, a.dtype, e.dtype
                ));
            }
        }
    }
    Ok(())
}

/// Checks `graph`'s .om in `dir` (when present) against the manifest.
pub fn check_om_file(
    dir: &Path,
    manifest: &Manifest,
    graph: &GraphInfo,
) -> Result<OmCheck, CompiledError> {
    let path = dir.join(&graph.om);
    if !path.is_file() {
        return Ok(OmCheck::Missing);
    }
    let om = OmFile::open(&path)?;
    let Some(io) = om.models.first().and_then(|m| m.io.as_ref()) else {
        return Ok(OmCheck::Undescribed);
    };
    check_io(graph, io, manifest.kv_cache.max_len)
        .map_err(|problem| CompiledError::OmMismatch { om: path, problem })?;
    Ok(OmCheck::Matches)
}

pub struct CompiledModel {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub ir: ModelIr,
    pub weights: WeightStore,
}

impl CompiledModel {
    pub fn open(dir: &Path) -> Result<CompiledModel, CompiledError> {
        let manifest = Manifest::load(dir)?;
        let ir = ModelIr::load_json(&dir.join(&manifest.ir))?;
        let weights = WeightStore::open_files(&[dir.join(&manifest.reference_weights)])?;
        let mismatch = |what: String| CompiledError::Mismatch {
            dir: dir.to_path_buf(),
            what,
        };
        let kv = &manifest.kv_cache;
        let layout = &ir.kv_cache;
        if (kv.layers, kv.kv_heads, kv.max_len, kv.head_dim)
            != (
                layout.layers,
                layout.kv_heads,
                layout.max_len,
                layout.head_dim,
            )
        {
            return Err(mismatch(format!("KV cache {kv:?} vs {layout:?}")));
        }
        if manifest.prefill_len != ir.prefill_len || manifest.vocab_size != ir.info.vocab_size {
            return Err(mismatch("prefill length or vocabulary size".into()));
        }
        for graph in ir.graphs() {
            for (_, tensor) in graph.weights() {
                weights.tensor_type(tensor)?;
            }
            if graph.masks != manifest.mask.inputs {
                return Err(mismatch(format!(
                    "the {} graph's attention masks {:?} vs {:?}",
                    graph.name, graph.masks, manifest.mask.inputs
                )));
            }
        }
        Ok(CompiledModel {
            dir: dir.to_path_buf(),
            manifest,
            ir,
            weights,
        })
    }

    /// Checks each graph's .om (when present) against the manifest.
    pub fn check_om_files(&self) -> Result<Vec<(String, OmCheck)>, CompiledError> {
        self.manifest
            .graphs
            .iter()
            .map(|graph| {
                Ok((
                    graph.om.clone(),
                    check_om_file(&self.dir, &self.manifest, graph)?,
                ))
            })
            .collect()
    }

    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        self.manifest.tokenizer.as_ref().map(|t| self.dir.join(t))
    }
}

/// What an .om's MODEL_DEF says against what the compiled directory
/// promises: `problems` make `kiln-run check` fail, `warnings` do not.
#[derive(Debug, Default)]
pub struct GraphCheck {
    /// One line on what ATC built.
    pub summary: String,
    pub warnings: Vec<String>,
    pub problems: Vec<String>,
}

/// Compares an .om's MODEL_DEF with the compiled directory: the chip it
/// was built for, no op on the AI CPU, int8 matmul weights where the
/// manifest says the ATC graphs hold int8 (`w8a8`), Kiln's custom kernels
/// present.
pub fn check_graph(
    om_name: &str,
    graph: &crate::om::model_def::OmGraph,
    expected_soc: &str,
    quant_linears: usize,
    manifest: &Manifest,
) -> GraphCheck {
    use crate::om::model_def::{Engine, GeDataType};
    let mut check = GraphCheck::default();
    let mut engines: std::collections::BTreeMap<String, usize> = Default::default();
    for op in &graph.ops {
        *engines.entry(op.engine.to_string()).or_default() += 1;
    }
    let engines: Vec<String> = engines.iter().map(|(e, n)| format!("{e} {n}")).collect();
    let weights: Vec<String> = graph
        .weight_dtypes()
        .iter()
        .map(|(d, (_, bytes))| format!("{d} {:.1} MB", *bytes as f64 / 1e6))
        .collect();
    check.summary = format!(
        "{om_name}: {} ops (engines: {}); weights {}; {} external weight file(s); built for {}",
        graph.ops.len(),
        engines.join(", "),
        if weights.is_empty() {
            "none".to_string()
        } else {
            weights.join(", ")
        },
        graph.external_files().len(),
        graph.soc_version.as_deref().unwrap_or("an unrecorded chip")
    );
    match &graph.soc_version {
        Some(soc) if soc != expected_soc => check.problems.push(format!(
            "{om_name} was built for {soc} but this directory expects {expected_soc} \
             (om_soc.txt, else the compile target): run ./build_om.sh --soc {expected_soc} \
             (or --soc auto on the board)"
        )),
        _ => {}
    }
    let ai_cpu = graph.ai_cpu_ops();
    if !ai_cpu.is_empty() {
        let names: Vec<String> = ai_cpu
            .iter()
            .take(8)
            .map(|op| format!("{} ({})", op.name, op.op_type))
            .collect();
        check.warnings.push(format!(
            "{om_name}: {} op(s) fell back to the AI CPU, which runs them on the board's \
             control cores, far slower than the AI Core: {}{}. See the graph's atc-*.log for \
             why ATC placed them there, and report the op types in a Kiln issue",
            ai_cpu.len(),
            names.join(", "),
            if ai_cpu.len() > names.len() {
                ", …"
            } else {
                ""
            }
        ));
    }
    if manifest
        .atc_weights
        .as_deref()
        .is_some_and(|w| w.starts_with("int8"))
    {
        let matmuls = graph.matmul_weight_dtypes();
        let int8 = matmuls
            .iter()
            .filter(|(_, d)| *d == GeDataType::INT8)
            .count();
        if int8 < quant_linears {
            let mut others: std::collections::BTreeMap<String, usize> = Default::default();
            for (_, d) in matmuls.iter().filter(|(_, d)| *d != GeDataType::INT8) {
                *others.entry(d.to_string()).or_default() += 1;
            }
            let others: Vec<String> = others.iter().map(|(d, n)| format!("{d} ×{n}")).collect();
            check.problems.push(format!(
                "{om_name}: manifest.json says the ATC graphs keep int8 matmul weights ({}), \
                 and the IR has {quant_linears} int8 Linears, but only {int8} of the .om's {} \
                 matmuls read int8 weights (the others: {}): ATC made float copies, so the \
                 model takes more memory and is not computed as checked. Convert again with \
                 this Kiln's build_om.sh and look in atc-*.log for the quantized ops ATC refused",
                manifest.quantization.as_deref().unwrap_or("w8a8"),
                matmuls.len(),
                if others.is_empty() {
                    "none".to_string()
                } else {
                    others.join(", ")
                }
            ));
        }
    }
    if let Some(package) = &manifest.kernel_package {
        let present: std::collections::BTreeSet<&str> =
            graph.ops.iter().map(|op| op.op_type.as_str()).collect();
        let mut missing: Vec<&str> = package
            .instances
            .iter()
            .filter(|k| k.calls.get(graph_name(om_name)).is_some_and(|&n| n > 0))
            .map(|k| k.op_type.as_str())
            .filter(|t| !present.contains(t))
            .collect();
        missing.dedup();
        if !missing.is_empty() {
            check.problems.push(format!(
                "{om_name}: Kiln's Ascend C kernels {} are not in the .om: ATC did not use \
                 the kernel package; rerun build_om.sh and check kernels-build.log",
                missing.join(", ")
            ));
        }
        let on_cpu: Vec<&str> = graph
            .ops
            .iter()
            .filter(|op| op.engine == Engine::AiCpu)
            .filter(|op| package.instances.iter().any(|k| k.op_type == op.op_type))
            .map(|op| op.op_type.as_str())
            .collect();
        if !on_cpu.is_empty() {
            check.problems.push(format!(
                "{om_name}: Kiln's kernels {} run on the AI CPU, not the AI Core",
                on_cpu.join(", ")
            ));
        }
    }
    check
}

fn graph_name(om_name: &str) -> &str {
    om_name.strip_suffix(".om").unwrap_or(om_name)
}

impl CompiledModel {
    /// Reads back what ATC built for each graph whose .om exists, and checks
    /// it against this directory (see [`check_graph`]). A graph whose .om has
    /// no readable MODEL_DEF gets a warning saying so.
    pub fn check_graphs(&self, expected_soc: &str) -> Result<Vec<GraphCheck>, CompiledError> {
        let mut out = Vec::new();
        for info in &self.manifest.graphs {
            let path = self.dir.join(&info.om);
            if !path.is_file() {
                continue;
            }
            let om = OmFile::open(&path)?;
            let graph = match om.graphs() {
                Ok(graphs) => graphs[0].clone(),
                Err(e) => {
                    out.push(GraphCheck {
                        summary: format!("{}: what ATC built is unknown", info.om),
                        warnings: vec![format!(
                            "{}: {e}; cannot confirm the engines and weight dtypes ATC chose \
                             (`kiln-run inspect {} --graph` shows the partitions)",
                            info.om, info.om
                        )],
                        problems: Vec::new(),
                    });
                    continue;
                }
            };
            let quant_linears = self
                .ir
                .graph(&info.name)
                .map(|g| {
                    g.op_counts()
                        .iter()
                        .filter(|(op, _)| *op == "QuantLinear")
                        .map(|(_, n)| n)
                        .sum()
                })
                .unwrap_or(0);
            out.push(check_graph(
                &info.om,
                &graph,
                expected_soc,
                quant_linears,
                &self.manifest,
            ));
        }
        Ok(out)
    }
}

/// A minimal manifest of the current format, for tests to edit.
#[cfg(test)]
pub(crate) fn test_manifest_json() -> serde_json::Value {
    serde_json::json!({
        "format": 2, "kiln_version": "test", "architecture": "TestForCausalLM",
        "config_sha256": "", "weights_sha256": "",
        "target": { "name": "310b", "soc_version": "Ascend310B1" },
        "dtype": "float16", "opset": 17, "vocab_size": 8, "prefill_len": 4,
        "kv_cache": { "layers": 1, "kv_heads": 1, "max_len": 8, "head_dim": 4,
                      "layout": "", "update": "" },
        "mask": { "layout": "", "hidden": "-inf", "inputs": [] },
        "graphs": [], "ir": "model.kiln.json", "reference_weights": "w.safetensors",
        "tokenizer": null, "tokenizer_config": null,
        "generation": { "bos_token_id": null, "eos_token_ids": [] },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::om::model_def::writer::{model_def, OpSpec};
    use crate::om::model_def::OmGraph;

    fn manifest(atc_weights: Option<&str>, kernel: Option<&str>) -> Manifest {
        let mut m = test_manifest_json();
        if let Some(w) = atc_weights {
            m["quantization"] = "w8a8".into();
            m["atc_weights"] = w.into();
        }
        if let Some(op) = kernel {
            m["kernels"] = "ascendc".into();
            m["kernel_package"] = serde_json::json!({
                "dir": "kernels", "manifest": "kernels/kernels.json", "target": "ascend310b",
                "decode_bytes_per_token": 0,
                "instances": [{ "op_type": op, "kernel": "k", "block_dim": 1, "bytes_read": 0,
                                "calls": { "decode": 2 }, "tiling": {} }],
            });
        }
        serde_json::from_value(m).unwrap()
    }

    fn graph(weight_dtype: i64, extra: &[OpSpec]) -> OmGraph {
        let mut ops: Vec<OpSpec> = (0..2)
            .map(|i| OpSpec {
                input_dtypes: vec![weight_dtype, weight_dtype],
                ..OpSpec::new(&format!("mm{i}"), "MatMulV2", "AIcoreEngine")
            })
            .collect();
        ops.extend_from_slice(extra);
        OmGraph::decode(&model_def("decode", "Ascend310B1", &ops)).unwrap()
    }

    #[test]
    fn int8_chip_ai_cpu_and_kernels_are_checked() {
        let w8a8 = manifest(
            Some("int8 (AscendQuant → int8 MatMul → AscendDequant)"),
            None,
        );
        let ok = check_graph("decode.om", &graph(3, &[]), "Ascend310B1", 2, &w8a8);
        assert!(ok.problems.is_empty() && ok.warnings.is_empty(), "{ok:?}");
        assert!(
            ok.summary.contains("built for Ascend310B1"),
            "{}",
            ok.summary
        );

        // fp16 copies of int8 weights.
        let copies = check_graph("decode.om", &graph(2, &[]), "Ascend310B1", 2, &w8a8);
        assert!(
            copies.problems[0].contains("only 0 of the .om's 2 matmuls read int8 weights")
                && copies.problems[0].contains("float16 ×2"),
            "{copies:?}"
        );
        // Not w8a8: float matmuls are what is expected.
        let plain = check_graph(
            "decode.om",
            &graph(2, &[]),
            "Ascend310B1",
            0,
            &manifest(None, None),
        );
        assert!(plain.problems.is_empty(), "{plain:?}");

        // Another chip, and an op on the AI CPU.
        let cpu = [OpSpec::new("argmax", "ArgMaxV2", "aicpu_tf_kernel")];
        let c = check_graph("decode.om", &graph(3, &cpu), "Ascend310B4", 2, &w8a8);
        assert!(
            c.problems[0].contains("built for Ascend310B1 but this directory expects Ascend310B4")
        );
        assert!(c.problems[0].contains("./build_om.sh --soc Ascend310B4"));
        assert!(
            c.warnings[0].contains("1 op(s) fell back to the AI CPU")
                && c.warnings[0].contains("argmax (ArgMaxV2)")
        );

        // Kiln's kernel missing from the .om, then present but on the AI CPU.
        let kernels = manifest(None, Some("KilnGemvByte"));
        let missing = check_graph("decode.om", &graph(2, &[]), "Ascend310B1", 0, &kernels);
        assert!(
            missing.problems[0].contains("KilnGemvByte are not in the .om"),
            "{missing:?}"
        );
        let on_cpu = [OpSpec::new("gemv", "KilnGemvByte", "aicpu_ascend_kernel")];
        let c = check_graph("decode.om", &graph(2, &on_cpu), "Ascend310B1", 0, &kernels);
        assert_eq!(c.problems.len(), 1, "{c:?}");
        assert!(c.problems[0].contains("KilnGemvByte run on the AI CPU"));
    }
}
