//! `manifest.json`: what `kiln compile` wrote and how to run it. The
//! runtime reads it to check a compiled model before running it (a KV length
//! that disagrees with the .om files is the peers' "garbled output" bug).

use crate::ir::{GraphLayout, MaskInput};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const MANIFEST_FORMAT: u32 = 2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub kiln_version: String,
    pub architecture: String,
    /// SHA-256 of the source `config.json`.
    pub config_sha256: String,
    /// SHA-256 of the converted weight bytes, in the prefill graph's order.
    pub weights_sha256: String,
    pub target: TargetInfo,
    /// `float32` or `float16`: the dtype of weights, activations, float
    /// inputs and outputs.
    pub dtype: String,
    pub opset: i64,
    pub vocab_size: usize,
    pub prefill_len: usize,
    /// `split` (prefill + decode) or `single` (one `step` graph).
    #[serde(default)]
    pub graph_layout: GraphLayout,
    pub kv_cache: KvCacheInfo,
    pub mask: MaskInfo,
    pub graphs: Vec<GraphInfo>,
    /// Kiln IR of both graphs (`model.kiln.json`), for the reference interpreter.
    pub ir: String,
    /// Every tensor the IR reads, in the checkpoint's own dtype (the RoPE
    /// tables in f32): the reference interpreter's weights.
    pub reference_weights: String,
    pub tokenizer: Option<String>,
    pub tokenizer_config: Option<String>,
    pub generation: GenerationInfo,
    /// How the reference IR's weights are quantized (`w4a16 g128`, `GGUF
    /// blocks`, …), when they are; the `.ort.onnx` files then hold the
    /// quantized weights in standard ops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
    /// The device memory the NPU needs for this model (see [`MemoryPlan`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryPlan>,
    /// With `quantization`: what the `.onnx` files for ATC hold, `int8
    /// (AscendQuant → …)` for `w8a8` or `dequantized to float16`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atc_weights: Option<String>,
    /// `ascendc` when the ATC graphs call Kiln's generated Ascend C kernels
    /// (custom `ai.kiln` nodes, package in [`KernelPackageInfo::dir`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernels: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_package: Option<KernelPackageInfo>,
    /// The residual stream's type (`float32` or `float16`): in an fp16 model
    /// `float32` keeps the embedding's output and every residual Add in f32
    /// around the fp16 blocks (`kiln compile --residual-dtype`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_dtype: Option<String>,
    /// How `weights.bin`, the ONNX graphs' external data, is made from the
    /// reference weights (absent when the graphs hold their weights inline,
    /// and in directories from before recipes, which store the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_bin: Option<super::weights_bin::WeightsBin>,
}

/// The generated Ascend C package a compiled directory's graphs call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelPackageInfo {
    /// The package's folder (`kernels`); build_om.sh builds and installs it.
    pub dir: String,
    /// Its own manifest, with every instance's op and source node.
    pub manifest: String,
    /// The Ascend C compute unit (`ascend310b`, `ascend910b`).
    pub target: String,
    /// GM bytes the decode graph's kernels read per token (the other nodes'
    /// reads not counted).
    pub decode_bytes_per_token: u64,
    pub instances: Vec<KernelInstanceInfo>,
}

/// One kernel instance: an op at static shapes, with its tiling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelInstanceInfo {
    pub op_type: String,
    pub kernel: String,
    pub block_dim: u32,
    /// GM bytes one call reads.
    pub bytes_read: u64,
    /// Calls per step, by graph.
    pub calls: std::collections::BTreeMap<String, usize>,
    pub tiling: serde_json::Value,
}

/// Device memory for a model on the NPU, in bytes: what the NPU engine
/// allocates (the weights once for every graph, as external weight files
/// registered with ACL, each rounded up to 32 bytes), plus what ACL needs on
/// top for each .om's work memory, known only after conversion
/// (`aclmdlQuerySize`, which `kiln-run` reports).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// The model's parameters as the .om files hold them.
    pub weights: u64,
    /// How many parameters those are.
    pub parameters: u64,
    /// Kiln's own constants: RoPE tables, shape constants.
    pub tables: u64,
    /// K and V caches.
    pub kv_cache: u64,
    /// Every graph's input and output buffers but the caches.
    pub io: u64,
    /// `weights + tables + kv_cache + io`.
    pub total: u64,
    /// How these were found: from the ONNX graphs, or estimated from
    /// config.json alone (`kiln compile --plan-only`).
    pub source: String,
}

impl MemoryPlan {
    /// A plan of these parts; `total` is their sum.
    pub fn new(
        weights: u64,
        parameters: u64,
        tables: u64,
        kv_cache: u64,
        io: u64,
        source: &str,
    ) -> MemoryPlan {
        MemoryPlan {
            weights,
            parameters,
            tables,
            kv_cache,
            io,
            total: weights + tables + kv_cache + io,
            source: source.to_string(),
        }
    }

    /// The plan as lines for a summary.
    pub fn lines(&self) -> Vec<String> {
        let mb = |b: u64| b as f64 / 1e6;
        vec![
            format!(
                "weights   {:>10.1} MB  = {} bytes for {} parameters, once for every graph",
                mb(self.weights),
                self.weights,
                self.parameters
            ),
            format!(
                "tables    {:>10.1} MB  = {} bytes (RoPE tables, shape constants)",
                mb(self.tables),
                self.tables
            ),
            format!("KV cache  {:>10.1} MB  = {} bytes", mb(self.kv_cache), self.kv_cache),
            format!(
                "IO        {:>10.1} MB  = {} bytes (step inputs, logits, new K/V rows)",
                mb(self.io),
                self.io
            ),
            format!(
                "total     {:>10.1} MB  = {} bytes, + each .om's ACL work memory (known after conversion)",
                mb(self.total),
                self.total
            ),
        ]
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub name: String,
    pub soc_version: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheInfo {
    pub layers: usize,
    pub kv_heads: usize,
    pub max_len: usize,
    pub head_dim: usize,
    /// Human-readable description of the layout and of the host's update.
    pub layout: String,
    pub update: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaskInfo {
    pub layout: String,
    /// The value that hides a column ("-inf").
    pub hidden: String,
    /// Every graph's mask inputs: what each shows and which layers read it
    /// (`attention_mask`, and `attention_mask_local` for the sliding-window
    /// layers of a model that also has global ones).
    pub inputs: Vec<MaskInput>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GraphInfo {
    /// `prefill`, `decode` or `step`.
    pub name: String,
    /// Tokens per step.
    pub tokens: usize,
    pub onnx: String,
    /// The same graph for ONNX Runtime when it reads quantized weights
    /// (`<name>.ort.onnx`, standard ops): what `ort_run.py` and `diff --b
    /// onnxruntime` run, so the quantized numbers are checked, while
    /// `onnx` is what ATC converts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ort_onnx: Option<String>,
    /// The .om file ATC writes (present once build_om.sh has run).
    pub om: String,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationInfo {
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "{path} is not a `kiln compile` output ({why}); make one with `kiln compile MODEL -o DIR` \
         and pass DIR"
    )]
    NotCompiled { path: PathBuf, why: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a Kiln manifest: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path}: manifest format {found}, this Kiln reads {MANIFEST_FORMAT}; recompile the model"
    )]
    Format { path: PathBuf, found: u32 },
}

impl Manifest {
    pub fn graph(&self, name: &str) -> Option<&GraphInfo> {
        self.graphs.iter().find(|g| g.name == name)
    }

    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        if !dir.is_dir() {
            return Err(ManifestError::NotCompiled {
                path: dir.to_path_buf(),
                why: if dir.exists() {
                    "it is a file, not a directory"
                } else {
                    "it does not exist"
                },
            });
        }
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            return Err(ManifestError::NotCompiled {
                path: dir.to_path_buf(),
                why: "it has no manifest.json",
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Io {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| ManifestError::Parse {
                path: path.clone(),
                source,
            })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format {
                path,
                found: manifest.format,
            });
        }
        Ok(manifest)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("manifests serialize") + "\n"
    }
}
