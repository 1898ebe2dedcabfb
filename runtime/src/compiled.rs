//! A directory written by `kiln compile`, opened for the reference
//! interpreter: its manifest, IR and reference weights, checked against
//! each other.

use crate::ir::model::ModelIrError;
use crate::ir::ModelIr;
use crate::manifest::{Manifest, ManifestError};
use crate::weights::{WeightError, WeightStore};
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

    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        self.manifest.tokenizer.as_ref().map(|t| self.dir.join(t))
    }
}
