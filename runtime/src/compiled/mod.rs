//! A directory written by `kiln compile`, opened for the reference
//! interpreter: its manifest, IR and reference weights, checked against
//! each other.

pub mod external_weights;
pub mod manifest;

use crate::ir::model::ModelIrError;
use crate::ir::ModelIr;
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
                let cache = matches!(e.name.as_str(), "k_cache" | "v_cache" | "attention_mask");
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
