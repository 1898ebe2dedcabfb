//! `kiln import`: any model Kiln reads (a GGUF file, or a Hugging Face
//! directory) written out as a plain Hugging Face directory — config.json,
//! model.safetensors, tokenizer.json, tokenizer_config.json — for tools that
//! read only that form. Written atomically, like `kiln compile`.

use crate::frontend::{FrontendError, HfModel, SideFiles};
use crate::output::StagedDir;
use kiln_runtime::ir::DType;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error("{path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("{0}")]
    Output(String),
}

/// What the weights are stored as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportDType {
    F32,
    F16,
    BF16,
}

pub struct ImportReport {
    pub tensors: usize,
    pub bytes: u64,
    pub files: Vec<&'static str>,
}

pub fn import(
    model: &HfModel,
    out: &Path,
    dtype: ImportDType,
) -> Result<ImportReport, ImportError> {
    // Never replace a directory: any Hugging Face directory has a
    // config.json, so there is no telling an earlier import from a user's
    // model (with its README, license, .git…).
    let empty = std::fs::read_dir(out).map(|mut d| d.next().is_none());
    if out.exists() && !matches!(empty, Ok(true)) {
        return Err(ImportError::Output(format!(
            "{} exists and is not empty; kiln import writes a new directory: choose another \
             path, or remove this one first",
            out.display()
        )));
    }
    let write_err = |path: &Path, message: String| ImportError::Write {
        path: path.to_path_buf(),
        message,
    };
    let stage = StagedDir::beside(out).map_err(|e| write_err(out, e.to_string()))?;

    let mut files = Vec::new();
    for (name, bytes) in model.files.present() {
        let path = stage.path.join(name);
        std::fs::write(&path, bytes).map_err(|e| write_err(&path, e.to_string()))?;
        files.push(name);
    }
    if model.files.generation_config.is_none() && !model.eos_token_ids.is_empty() {
        // The end-of-sequence ids travel with the model, as from the hub.
        let json = serde_json::json!({"eos_token_id": model.eos_token_ids});
        let path = stage.path.join(SideFiles::GENERATION_CONFIG);
        std::fs::write(&path, json.to_string()).map_err(|e| write_err(&path, e.to_string()))?;
        files.push(SideFiles::GENERATION_CONFIG);
    }

    let weights_path = stage.path.join(kiln_runtime::weights::SINGLE_FILE);
    let mut tensors = Vec::new();
    for name in model.weights.names() {
        let ty = model
            .weights
            .tensor_type(name)
            .map_err(FrontendError::from)?;
        let data = model
            .weights
            .to_f32_tensor(name)
            .map_err(FrontendError::from)?;
        let values = data.f32s();
        let (st_dtype, bytes): (safetensors::Dtype, Vec<u8>) = match dtype {
            ImportDType::F32 => (
                safetensors::Dtype::F32,
                values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            ImportDType::F16 => (
                safetensors::Dtype::F16,
                values
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
            ImportDType::BF16 => (
                safetensors::Dtype::BF16,
                values
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
        };
        debug_assert!(matches!(ty.dtype, DType::F32 | DType::F16 | DType::BF16));
        tensors.push((name.to_string(), ty.shape, st_dtype, bytes));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, dtype, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| write_err(&weights_path, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize_to_file(views, None, &weights_path)
        .map_err(|e| write_err(&weights_path, e.to_string()))?;
    files.push(kiln_runtime::weights::SINGLE_FILE);
    let bytes = std::fs::metadata(&weights_path)
        .map(|m| m.len())
        .unwrap_or(0);

    stage.commit().map_err(|e| write_err(out, e.to_string()))?;
    files.sort();
    Ok(ImportReport {
        tensors: tensors.len(),
        bytes,
        files,
    })
}
