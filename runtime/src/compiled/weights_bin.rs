//! `weights.bin`, the external data of the ONNX graphs (what ATC converts
//! and ONNX Runtime reads), made from the reference weights instead of being
//! stored: every byte of it is a function of `weights.safetensors` and the
//! recipe the manifest records for each initializer (which tensor, cast to
//! the graphs' float type, dequantized, transposed, …). For a quantized
//! model the file is several times the size of the reference weights (the
//! fp16 copy of a 1.5B Q4 model is 3 GB of its 4), so a compiled directory
//! leaves it out and `kiln-run expand-weights` writes it where it is needed.
//!
//! `kiln compile` computes every initializer with [`initializer_bytes`] —
//! the function the expansion runs, here in the runtime so that the aarch64
//! `kiln-run` has it — and records the sha256 of the result, which the
//! expansion checks.

use super::manifest::Manifest;
use crate::ir::quant::WeightQuant;
use crate::ir::DType;
use crate::weights::{QuantTensors, WeightError, WeightStore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The file's name in a compiled directory.
pub const WEIGHTS_BIN: &str = "weights.bin";

/// How a compiled directory's `weights.bin` is made (the manifest's
/// `weights_bin`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightsBin {
    /// The file's name in the directory (`weights.bin`).
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    /// Whether `kiln compile` wrote the file (`--store-atc-weights`);
    /// otherwise it is made from the reference weights when needed.
    pub stored: bool,
    /// f32 tensors the recipes read that are computed from quantized ones
    /// (the weights a quantized matrix stands for: `w = q·scale + min`), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dequantized: BTreeMap<String, DequantizedTensor>,
    /// A file beside it holding, as they are, the initializers no recipe
    /// makes from the reference weights (none for the models Kiln compiles
    /// today; the file exists only when needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_file: Option<String>,
    /// The file's initializers, back to back from offset 0, in order.
    pub tensors: Vec<Initializer>,
}

/// A dequantized matrix: the reference tensors it is computed from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DequantizedTensor {
    pub scheme: WeightQuant,
    pub q: String,
    pub scale: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<String>,
}

impl From<&QuantTensors> for DequantizedTensor {
    fn from(t: &QuantTensors) -> Self {
        DequantizedTensor {
            scheme: t.scheme,
            q: t.q.clone(),
            scale: t.scale.clone(),
            min: t.min.clone(),
        }
    }
}

/// One initializer of `weights.bin`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Initializer {
    /// The initializer's name in the ONNX graphs.
    pub name: String,
    pub offset: u64,
    pub bytes: u64,
    pub recipe: Recipe,
}

/// How one initializer's bytes are made, from tensors of the reference
/// weights (or of [`WeightsBin::dequantized`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recipe {
    /// The tensor of the initializer's own name: floats in the graphs'
    /// float type (f16 rounded to nearest even), i8 and u4 as stored.
    Tensor,
    /// The i8 `[N, K]` tensor `source` transposed to `[K, N]`: the right
    /// operand of an int8 `MatMul`.
    TransposedI8 { source: String },
    /// `AscendDequant`'s uint64 `deq_scale [N]` words (see [`deq_scale`])
    /// from the per-channel scales `scale [N, 1]`, int8 weight offset 0.
    DeqScale { scale: String },
    /// Rows `start..end` of `source` (a column chunk of a wide GEMV's
    /// weights, scales or mins): quantized rows as stored, float ones in the
    /// graphs' float type.
    Rows {
        source: String,
        start: usize,
        end: usize,
    },
    /// Copied from [`WeightsBin::extra_file`] at this offset.
    Stored { offset: u64 },
}

impl Recipe {
    /// The tensors the recipe of initializer `name` reads.
    pub fn sources<'a>(&'a self, name: &'a str) -> Vec<&'a str> {
        match self {
            Recipe::Tensor => vec![name],
            Recipe::TransposedI8 { source } | Recipe::Rows { source, .. } => vec![source],
            Recipe::DeqScale { scale } => vec![scale],
            Recipe::Stored { .. } => vec![],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsBinError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(
        "{file}: weight `{tensor}` has max |value| {max_abs:e}, outside float16's range (largest \
         finite value 65504)"
    )]
    OutOfHalfRange {
        tensor: String,
        max_abs: f32,
        file: PathBuf,
    },
    #[error("{file}: `{tensor}` cannot make initializer `{initializer}`: {why}")]
    BadSource {
        initializer: String,
        tensor: String,
        file: PathBuf,
        why: String,
    },
    #[error(
        "{dir}: its manifest records no recipe for {WEIGHTS_BIN} ({why}); there is nothing to \
         write"
    )]
    NoRecipe { dir: PathBuf, why: &'static str },
    #[error("{manifest}: {problem}; recompile the model")]
    BadRecipe { manifest: PathBuf, problem: String },
    #[error(
        "{reference}: weight `{tensor}` has max |value| {max_abs:e}, which float16 cannot hold and \
         kiln compile refuses: these are not the reference weights it wrote; recompile the model \
         (nothing was written)"
    )]
    Corrupt {
        reference: PathBuf,
        tensor: String,
        max_abs: f32,
    },
    #[error(
        "{reference}: initializer `{initializer}` comes out {got} bytes, the manifest records \
         {expected}: these are not the reference weights kiln compile wrote; recompile the model"
    )]
    Length {
        reference: PathBuf,
        initializer: String,
        expected: u64,
        got: u64,
    },
    #[error(
        "{file} made from {reference} has sha256 {got}, but {manifest} records {expected}: the \
         reference weights (or the manifest) are not what kiln compile wrote; recompile the model \
         (nothing was written)"
    )]
    Sha256 {
        file: PathBuf,
        reference: PathBuf,
        manifest: PathBuf,
        expected: String,
        got: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsBinError + '_ {
    move |source| WeightsBinError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `AscendDequant`'s `deq_scale` word for an f32 scale and an int8 weight
/// offset, laid out as ATC's quantization tool (AMCT) writes it: bits 31..0
/// the f32 bit pattern of the scale, of which the hardware reads only the
/// top 19 bits (sign, exponent, 10 mantissa bits: the low 13 are cleared
/// here), bits 47..40 the offset in two's complement, every other bit 0.
pub fn deq_scale(scale: f32, offset: i8) -> u64 {
    let bits = scale.to_bits() & 0xFFFF_E000;
    u64::from(bits) | (u64::from(offset as u8) << 40)
}

/// Little-endian bytes of `values` as `float` (F32, or F16 rounded to
/// nearest even, with F16C when the CPU has it: the same bits either way).
pub fn encode_floats(values: &[f32], float: DType) -> Vec<u8> {
    match float {
        DType::F16 => {
            use half::slice::HalfFloatSliceExt;
            const BLOCK: usize = 1024;
            let mut out = vec![0; values.len() * 2];
            let mut halves = [half::f16::ZERO; BLOCK];
            for (src, dst) in values.chunks(BLOCK).zip(out.chunks_mut(2 * BLOCK)) {
                let halves = &mut halves[..src.len()];
                halves.convert_from_f32_slice(src);
                for (h, d) in halves.iter().zip(dst.chunks_exact_mut(2)) {
                    d.copy_from_slice(&h.to_le_bytes());
                }
            }
            out
        }
        _ => {
            let mut out = vec![0; values.len() * 4];
            for (v, d) in values.iter().zip(out.chunks_exact_mut(4)) {
                d.copy_from_slice(&v.to_le_bytes());
            }
            out
        }
    }
}

/// The graphs' float type from the manifest's `dtype`.
pub fn float_type(dtype: &str) -> Option<DType> {
    match dtype {
        "float16" => Some(DType::F16),
        "float32" => Some(DType::F32),
        _ => None,
    }
}

/// Whether the initializer of store tensor `name` holds its bytes unchanged
/// (so a file that holds the tensor as stored can serve the graph).
pub fn stored_as_is(store: &WeightStore, name: &str, float: DType) -> bool {
    let Ok(ty) = store.tensor_type(name) else {
        return false;
    };
    match ty.dtype {
        DType::I8 | DType::U4 => true,
        DType::F32 | DType::F16 => ty.dtype == float && store.bytes(name).is_ok(),
        _ => false,
    }
}

/// Refuses what float16 cannot hold: a |value| above 65504 (it would be
/// inf, or round to the largest finite value and silently change the
/// model) or one that is not finite.
fn check_half_range(
    store: &WeightStore,
    name: &str,
    values: &[f32],
) -> Result<(), WeightsBinError> {
    let max_abs = values.iter().fold(0f32, |m, v| {
        if m.is_nan() || v.is_nan() {
            f32::NAN
        } else {
            m.max(v.abs())
        }
    });
    // Written so that NaN fails it too.
    if max_abs <= half::f16::MAX.to_f32() {
        return Ok(());
    }
    Err(WeightsBinError::OutOfHalfRange {
        tensor: name.to_string(),
        max_abs,
        file: store.origin(name),
    })
}

/// [`check_half_range`] for a tensor stored as f16: no inf or NaN.
fn check_half_bits(store: &WeightStore, name: &str, bytes: &[u8]) -> Result<(), WeightsBinError> {
    let bad = bytes
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
        .find(|h| !h.is_finite());
    match bad {
        None => Ok(()),
        Some(h) => Err(WeightsBinError::OutOfHalfRange {
            tensor: name.to_string(),
            max_abs: h.to_f32().abs(),
            file: store.origin(name),
        }),
    }
}

/// Floats in the graphs' type, checked against float16's range.
fn encode_checked(
    store: &WeightStore,
    name: &str,
    values: &[f32],
    float: DType,
) -> Result<Vec<u8>, WeightsBinError> {
    if float == DType::F16 {
        check_half_range(store, name, values)?;
    }
    Ok(encode_floats(values, float))
}

/// The bytes of initializer `name` made by `recipe` from `store` in the
/// graphs' float type `float` (F16 or F32), borrowed from the store when
/// they are a tensor as stored. [`Recipe::Stored`] is not made here.
/// The store's pages of a tensor read are released when done.
pub fn initializer_bytes<'s>(
    store: &'s WeightStore,
    name: &str,
    recipe: &Recipe,
    float: DType,
) -> Result<Cow<'s, [u8]>, WeightsBinError> {
    let bad = |tensor: &str, why: String| WeightsBinError::BadSource {
        initializer: name.to_string(),
        tensor: tensor.to_string(),
        file: store.origin(tensor),
        why,
    };
    Ok(match recipe {
        Recipe::Tensor => {
            let ty = store.tensor_type(name)?;
            if stored_as_is(store, name, float) {
                let bytes = store.bytes(name)?;
                if bytes.len() != ty.size_bytes() {
                    return Err(bad(name, format!("{} bytes do not hold {ty}", bytes.len())));
                }
                if ty.dtype == DType::F16 {
                    check_half_bits(store, name, bytes)?;
                }
                Cow::Borrowed(bytes)
            } else {
                let tensor = store.to_f32_tensor(name)?;
                let bytes = encode_checked(store, name, tensor.f32s(), float)?;
                store.release(name);
                Cow::Owned(bytes)
            }
        }
        Recipe::TransposedI8 { source } => {
            let ty = store.tensor_type(source)?;
            let q = store.bytes(source)?;
            let &[n, k] = ty.shape.as_slice() else {
                return Err(bad(source, format!("is {ty}, not a matrix")));
            };
            if ty.dtype != DType::I8 || q.len() != n * k {
                return Err(bad(source, format!("is {ty} in {} bytes, not i8", q.len())));
            }
            let mut out = vec![0u8; n * k];
            // Row blocks of the source keep both sides' accesses local.
            for rows in (0..n).step_by(64) {
                for kk in 0..k {
                    for row in rows..(rows + 64).min(n) {
                        out[kk * n + row] = q[row * k + kk];
                    }
                }
            }
            store.release(source);
            Cow::Owned(out)
        }
        Recipe::DeqScale { scale } => Cow::Owned(
            store
                .to_f32_tensor(scale)?
                .f32s()
                .iter()
                .flat_map(|&s| deq_scale(s, 0).to_le_bytes())
                .collect(),
        ),
        Recipe::Rows { source, start, end } => {
            let ty = store.tensor_type(source)?;
            let rows = ty.shape.first().copied().unwrap_or(0);
            if start > end || *end > rows {
                return Err(bad(
                    source,
                    format!("rows {start}..{end} of a tensor of {rows}"),
                ));
            }
            match ty.dtype {
                _ if rows == 0 => Cow::Owned(Vec::new()),
                DType::I8 | DType::U4 => {
                    let q = store.bytes(source)?;
                    let row = q.len() / rows;
                    Cow::Owned(q[start * row..end * row].to_vec())
                }
                _ => {
                    let t = store.to_f32_tensor(source)?;
                    let row = ty.numel() / rows;
                    let values = &t.f32s()[start * row..end * row];
                    Cow::Owned(encode_checked(store, source, values, float)?)
                }
            }
        }
        Recipe::Stored { .. } => {
            return Err(bad(
                name,
                "is stored in the extra file, not made from the reference weights".into(),
            ))
        }
    })
}

/// The store the recipes read: the directory's reference weights, plus the
/// dequantized tensors computed from them, each checked to be what its
/// scheme reads (so a damaged manifest is an error, never a panic).
pub fn sources(
    dir: &Path,
    manifest: &Manifest,
    recipe: &WeightsBin,
) -> Result<WeightStore, WeightsBinError> {
    let reference = dir.join(&manifest.reference_weights);
    let mut store = WeightStore::open_files(std::slice::from_ref(&reference))?;
    let bad = |problem: String| WeightsBinError::BadRecipe {
        manifest: dir.join(super::manifest::MANIFEST_FILE),
        problem,
    };
    for (name, t) in &recipe.dequantized {
        if store.contains(name) {
            return Err(bad(format!(
                "dequantized tensor `{name}` is also a reference tensor"
            )));
        }
        let q = store.tensor_type(&t.q)?;
        let want = if t.scheme.bits == 8 {
            DType::I8
        } else {
            DType::U4
        };
        let &[n, k] = q.shape.as_slice() else {
            return Err(bad(format!("`{}` of `{name}` is {q}, not a matrix", t.q)));
        };
        if q.dtype != want || t.scheme.group_size == 0 || !matches!(t.scheme.bits, 4 | 8) {
            return Err(bad(format!(
                "`{}` of `{name}` is {q}, which {}-bit groups of {} cannot read",
                t.q, t.scheme.bits, t.scheme.group_size
            )));
        }
        let groups = [n, t.scheme.groups(k)];
        for part in std::iter::once(&t.scale).chain(t.min.as_ref()) {
            let ty = store.tensor_type(part)?;
            if !ty.dtype.is_float() || ty.shape != groups {
                return Err(bad(format!(
                    "`{part}` of `{name}` is {ty}, not a float tensor of shape {groups:?}"
                )));
            }
        }
        if t.min.is_some() != t.scheme.offset {
            return Err(bad(format!(
                "`{name}`: a min tensor goes with an offset scheme only"
            )));
        }
        let tensors = QuantTensors {
            scheme: t.scheme,
            q: t.q.clone(),
            scale: t.scale.clone(),
            min: t.min.clone(),
        };
        store.insert_dequantized(name, &tensors)?;
    }
    Ok(store)
}

/// Checks that the recipe's initializers lie back to back and add up to
/// its size, and that every source is in `store`.
fn check_layout(
    manifest_path: &Path,
    recipe: &WeightsBin,
    store: &WeightStore,
) -> Result<(), WeightsBinError> {
    let bad = |problem: String| WeightsBinError::BadRecipe {
        manifest: manifest_path.to_path_buf(),
        problem,
    };
    let mut offset = 0u64;
    let mut names = BTreeSet::new();
    for t in &recipe.tensors {
        if t.offset != offset {
            return Err(bad(format!(
                "initializer `{}` is at offset {}, where {offset} was expected",
                t.name, t.offset
            )));
        }
        if !names.insert(t.name.as_str()) {
            return Err(bad(format!("initializer `{}` is listed twice", t.name)));
        }
        for source in t.recipe.sources(&t.name) {
            if !store.contains(source) {
                return Err(bad(format!(
                    "initializer `{}` reads `{source}`, which the reference weights do not hold",
                    t.name
                )));
            }
        }
        if matches!(t.recipe, Recipe::Stored { .. }) && recipe.extra_file.is_none() {
            return Err(bad(format!(
                "initializer `{}` is stored in an extra file the manifest does not name",
                t.name
            )));
        }
        offset += t.bytes;
    }
    if offset != recipe.bytes {
        return Err(bad(format!(
            "the initializers add up to {offset} bytes, not the {} recorded",
            recipe.bytes
        )));
    }
    Ok(())
}

/// A plain file name inside the directory.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

/// The recipe of a compiled directory, or why it has none.
pub fn recipe_of<'m>(
    dir: &Path,
    manifest: &'m Manifest,
) -> Result<&'m WeightsBin, WeightsBinError> {
    let recipe = manifest
        .weights_bin
        .as_ref()
        .ok_or_else(|| WeightsBinError::NoRecipe {
            dir: dir.to_path_buf(),
            why: if dir.join(WEIGHTS_BIN).is_file() {
                "kiln compile stored the file itself"
            } else {
                "the graphs hold their weights inline (kiln compile --inline-weights)"
            },
        })?;
    for name in std::iter::once(&recipe.file).chain(&recipe.extra_file) {
        if !plain_name(name) {
            return Err(WeightsBinError::BadRecipe {
                manifest: dir.join(super::manifest::MANIFEST_FILE),
                problem: format!("`{name}` is not a plain file name"),
            });
        }
    }
    Ok(recipe)
}

/// Checks, without making anything, that the directory's recipe reads only
/// what its reference weights hold, laid out back to back.
pub fn check_recipe(dir: &Path, manifest: &Manifest) -> Result<(), WeightsBinError> {
    let recipe = recipe_of(dir, manifest)?;
    float_type(&manifest.dtype).ok_or_else(|| WeightsBinError::BadRecipe {
        manifest: dir.join(super::manifest::MANIFEST_FILE),
        problem: format!("dtype `{}` is not float16 or float32", manifest.dtype),
    })?;
    let store = sources(dir, manifest, recipe)?;
    check_layout(&dir.join(super::manifest::MANIFEST_FILE), recipe, &store)
}

/// What an expansion did.
#[derive(Clone, Debug)]
pub struct Expanded {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub seconds: f64,
}

/// A temporary file beside its target, removed unless renamed over it.
struct Staged {
    path: PathBuf,
    done: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes the directory's `weights.bin` from its reference weights as the
/// manifest records, into a temporary file beside it renamed over it only
/// once its sha256 is the recorded one. `progress(done, total)` is called
/// after each initializer, in bytes.
pub fn expand(
    dir: &Path,
    manifest: &Manifest,
    mut progress: impl FnMut(u64, u64),
) -> Result<Expanded, WeightsBinError> {
    let started = std::time::Instant::now();
    let recipe = recipe_of(dir, manifest)?;
    let manifest_path = dir.join(super::manifest::MANIFEST_FILE);
    let reference = dir.join(&manifest.reference_weights);
    let float = float_type(&manifest.dtype).ok_or_else(|| WeightsBinError::BadRecipe {
        manifest: manifest_path.clone(),
        problem: format!("dtype `{}` is not float16 or float32", manifest.dtype),
    })?;
    let store = sources(dir, manifest, recipe)?;
    check_layout(&manifest_path, recipe, &store)?;
    let extra = match &recipe.extra_file {
        Some(name) => {
            let path = dir.join(name);
            Some((std::fs::read(&path).map_err(io_err(&path))?, path))
        }
        None => None,
    };

    let target = dir.join(&recipe.file);
    let mut staged = Staged {
        path: dir.join(format!(".{}.kiln-tmp-{}", recipe.file, std::process::id())),
        done: false,
    };
    let file = std::fs::File::create(&staged.path).map_err(io_err(&staged.path))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    progress(0, recipe.bytes);
    for t in &recipe.tensors {
        let bytes: Cow<[u8]> = match (&t.recipe, &extra) {
            (Recipe::Stored { offset }, Some((data, path))) => {
                let range = usize::try_from(*offset)
                    .ok()
                    .and_then(|at| Some(at..at.checked_add(usize::try_from(t.bytes).ok()?)?))
                    .filter(|r| r.end <= data.len());
                let Some(range) = range else {
                    return Err(WeightsBinError::Length {
                        reference: path.clone(),
                        initializer: t.name.clone(),
                        expected: t.bytes,
                        got: data.len().saturating_sub(*offset as usize) as u64,
                    });
                };
                Cow::Borrowed(&data[range])
            }
            _ => initializer_bytes(&store, &t.name, &t.recipe, float).map_err(|e| match e {
                WeightsBinError::OutOfHalfRange {
                    tensor, max_abs, ..
                } => WeightsBinError::Corrupt {
                    reference: reference.clone(),
                    tensor,
                    max_abs,
                },
                e => e,
            })?,
        };
        if bytes.len() as u64 != t.bytes {
            return Err(WeightsBinError::Length {
                reference: reference.clone(),
                initializer: t.name.clone(),
                expected: t.bytes,
                got: bytes.len() as u64,
            });
        }
        hasher.update(&bytes);
        out.write_all(&bytes).map_err(io_err(&staged.path))?;
        done += t.bytes;
        progress(done, recipe.bytes);
    }
    let file = out
        .into_inner()
        .map_err(|e| io_err(&staged.path)(e.into_error()))?;
    file.sync_all().map_err(io_err(&staged.path))?;
    drop(file);
    let sha256 = format!("{:x}", hasher.finalize());
    if sha256 != recipe.sha256 {
        return Err(WeightsBinError::Sha256 {
            file: target,
            reference,
            manifest: manifest_path,
            expected: recipe.sha256.clone(),
            got: sha256,
        });
    }
    std::fs::rename(&staged.path, &target).map_err(io_err(&target))?;
    staged.done = true;
    Ok(Expanded {
        path: target,
        bytes: done,
        sha256,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The sha256 of a file, read in large blocks.
pub fn file_sha256(path: &Path) -> Result<String, WeightsBinError> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// What the directory's `weights.bin` is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// No recipe: the file is stored (or the graphs hold their weights inline).
    NoRecipe,
    /// The file is there, of the recorded size.
    Present,
    /// The file is missing (or of another size): it must be made.
    Missing,
}

/// Where the directory's `weights.bin` stands.
pub fn state(dir: &Path, manifest: &Manifest) -> State {
    let Some(recipe) = &manifest.weights_bin else {
        return State::NoRecipe;
    };
    match std::fs::metadata(dir.join(&recipe.file)) {
        Ok(m) if m.is_file() && m.len() == recipe.bytes => State::Present,
        _ => State::Missing,
    }
}

/// Makes `weights.bin` when the directory has a recipe and the file is
/// missing (what the ONNX graphs need before anything reads them); `None`
/// when there was nothing to do.
pub fn ensure(
    dir: &Path,
    manifest: &Manifest,
    progress: impl FnMut(u64, u64),
) -> Result<Option<Expanded>, WeightsBinError> {
    match state(dir, manifest) {
        State::NoRecipe | State::Present => Ok(None),
        State::Missing => expand(dir, manifest, progress).map(Some),
    }
}

/// A progress callback that prints `<prefix>: <file>: N% (a of b MB)` on
/// stderr at every tenth, for files of 100 MB or more.
pub fn tenths(prefix: &str, file: &str) -> impl FnMut(u64, u64) {
    let (prefix, file) = (prefix.to_string(), file.to_string());
    let mut last = None;
    move |done, total| {
        let tenth = (done * 10).checked_div(total).unwrap_or(10);
        if total >= 100_000_000 && last != Some(tenth) {
            last = Some(tenth);
            crate::note!(
                "{prefix}: {file}: {:>3}% ({:.1} of {:.1} MB)",
                tenth * 10,
                done as f64 / 1e6,
                total as f64 / 1e6
            );
        }
    }
}

/// `kiln-run expand-weights DIR` (and `kiln expand-weights`): makes the
/// directory's `weights.bin`, or says why nothing needs making; `program`
/// prefixes the progress lines.
pub fn expand_command(dir: &Path, program: &str) -> Result<(), String> {
    let manifest = Manifest::load(dir).map_err(|e| e.to_string())?;
    let mb = |b: u64| b as f64 / 1e6;
    let recipe = match recipe_of(dir, &manifest) {
        Ok(recipe) => recipe,
        Err(WeightsBinError::NoRecipe { why, .. }) => {
            crate::say!("{}: nothing to write: {why}", dir.display());
            return Ok(());
        }
        Err(e) => return Err(e.to_string()),
    };
    let target = dir.join(&recipe.file);
    if state(dir, &manifest) == State::Present {
        let sha256 = file_sha256(&target).map_err(|e| e.to_string())?;
        if sha256 == recipe.sha256 {
            crate::say!(
                "{}: already there ({:.1} MB, its sha256 is the manifest's)",
                target.display(),
                mb(recipe.bytes)
            );
            return Ok(());
        }
        crate::note!(
            "{program}: {} is not what the manifest records (sha256 {sha256}): writing it again",
            target.display()
        );
    }
    crate::note!(
        "{program}: writing {} ({:.1} MB) from {}",
        target.display(),
        mb(recipe.bytes),
        manifest.reference_weights
    );
    let made = expand(dir, &manifest, tenths(program, &recipe.file)).map_err(|e| e.to_string())?;
    crate::say!(
        "wrote {} ({:.1} MB, sha256 {} as the manifest records) from {} in {:.1} s",
        made.path.display(),
        mb(made.bytes),
        made.sha256,
        manifest.reference_weights,
        made.seconds
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_serialize_as_plain_json() {
        let recipes = [
            Recipe::Tensor,
            Recipe::TransposedI8 { source: "q".into() },
            Recipe::DeqScale { scale: "s".into() },
            Recipe::Rows {
                source: "w".into(),
                start: 2,
                end: 5,
            },
            Recipe::Stored { offset: 8 },
        ];
        let json = serde_json::to_string(&recipes).unwrap();
        assert_eq!(
            json,
            r#"["tensor",{"transposed_i8":{"source":"q"}},{"deq_scale":{"scale":"s"}},{"rows":{"source":"w","start":2,"end":5}},{"stored":{"offset":8}}]"#
        );
        let back: Vec<Recipe> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, recipes);
    }

    #[test]
    fn floats_are_cast_and_checked_and_quantized_rows_kept() {
        let mut store = WeightStore::default();
        store.insert_f32("w", vec![3, 2], vec![1.0, -2.0, 0.5, 3.0, 4.0, 1e-8]);
        store.insert_bytes("q", DType::I8, vec![2, 3], vec![1, 2, 3, 4, 5, 6]);
        store.insert_f32("big", vec![1], vec![7e4]);
        let f16 = initializer_bytes(&store, "w", &Recipe::Tensor, DType::F16).unwrap();
        assert_eq!(
            *f16,
            encode_floats(&[1.0, -2.0, 0.5, 3.0, 4.0, 1e-8], DType::F16)
        );
        let f32 = initializer_bytes(&store, "w", &Recipe::Tensor, DType::F32).unwrap();
        assert!(matches!(f32, Cow::Borrowed(_)));
        let rows = Recipe::Rows {
            source: "w".into(),
            start: 1,
            end: 3,
        };
        let bytes = initializer_bytes(&store, "w.r", &rows, DType::F16).unwrap();
        assert_eq!(*bytes, encode_floats(&[0.5, 3.0, 4.0, 1e-8], DType::F16));
        let t = Recipe::TransposedI8 { source: "q".into() };
        let bytes = initializer_bytes(&store, "q.t", &t, DType::F16).unwrap();
        assert_eq!(*bytes, [1, 4, 2, 5, 3, 6]);
        let err = initializer_bytes(&store, "big", &Recipe::Tensor, DType::F16).unwrap_err();
        assert!(err.to_string().contains("outside float16's range"), "{err}");
        // Out-of-range rows and a float source of a transpose are errors, not panics.
        let rows = Recipe::Rows {
            source: "q".into(),
            start: 1,
            end: 3,
        };
        let err = initializer_bytes(&store, "x", &rows, DType::F16).unwrap_err();
        assert!(
            err.to_string().contains("rows 1..3 of a tensor of 2"),
            "{err}"
        );
        let t = Recipe::TransposedI8 { source: "w".into() };
        let err = initializer_bytes(&store, "x", &t, DType::F16).unwrap_err();
        assert!(err.to_string().contains("not i8"), "{err}");
    }

    /// A directory with every kind of recipe: a u4 matrix dequantized
    /// (asymmetric, groups of 32), a bf16 norm cast, w8a8's transposed
    /// int8 weights and deq_scale words, and bytes from the extra file;
    /// values chosen so that the expected bytes are known by hand.
    fn planted(dir: &Path) -> Manifest {
        use safetensors::tensor::TensorView;
        use safetensors::Dtype;
        let halves = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect()
        };
        let q = vec![0x33u8; 2 * 32]; // q = 3 everywhere, [2, 64] as u4
        let (scale, min) = (halves(&[0.5; 4]), halves(&[1.0; 4]));
        let norm: Vec<u8> = [1.0f32, 2.0, -0.5, 4.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let q8 = vec![1u8, 2, 3, 4, 5, 6];
        let s8 = halves(&[0.25, 1.0, 2.0]);
        let views = [
            ("q", TensorView::new(Dtype::U8, vec![2, 32], &q).unwrap()),
            (
                "s",
                TensorView::new(Dtype::F16, vec![2, 2], &scale).unwrap(),
            ),
            ("m", TensorView::new(Dtype::F16, vec![2, 2], &min).unwrap()),
            (
                "norm",
                TensorView::new(Dtype::BF16, vec![4], &norm).unwrap(),
            ),
            ("q8", TensorView::new(Dtype::I8, vec![3, 2], &q8).unwrap()),
            ("s8", TensorView::new(Dtype::F16, vec![3, 1], &s8).unwrap()),
        ];
        let metadata = std::collections::HashMap::from([(
            crate::weights::U4_METADATA_KEY.to_string(),
            r#"["q"]"#.to_string(),
        )]);
        let bytes = safetensors::serialize(views, Some(metadata)).unwrap();
        std::fs::write(dir.join("w.safetensors"), bytes).unwrap();
        std::fs::write(dir.join("weights.extra.bin"), b"xyzEXTRA").unwrap();

        let mut expected = halves(&[2.5; 128]); // 3 · 0.5 + 1
        expected.extend(halves(&[1.0, 2.0, -0.5, 4.0]));
        expected.extend([1, 3, 5, 2, 4, 6]);
        for s in [0.25f32, 1.0, 2.0] {
            expected.extend(deq_scale(s, 0).to_le_bytes());
        }
        expected.extend(b"EXTRA");
        let entry = |name: &str, offset: u64, bytes: u64, recipe: Recipe| Initializer {
            name: name.into(),
            offset,
            bytes,
            recipe,
        };
        let recipe = WeightsBin {
            file: WEIGHTS_BIN.into(),
            bytes: expected.len() as u64,
            sha256: format!("{:x}", Sha256::digest(&expected)),
            stored: false,
            dequantized: BTreeMap::from([(
                "w".to_string(),
                DequantizedTensor {
                    scheme: WeightQuant {
                        bits: 4,
                        group_size: 32,
                        offset: true,
                    },
                    q: "q".into(),
                    scale: "s".into(),
                    min: Some("m".into()),
                },
            )]),
            extra_file: Some("weights.extra.bin".into()),
            tensors: vec![
                entry("w", 0, 256, Recipe::Tensor),
                entry("norm", 256, 8, Recipe::Tensor),
                entry(
                    "q8.t",
                    264,
                    6,
                    Recipe::TransposedI8 {
                        source: "q8".into(),
                    },
                ),
                entry("s8.d", 270, 24, Recipe::DeqScale { scale: "s8".into() }),
                entry("x", 294, 5, Recipe::Stored { offset: 3 }),
            ],
        };
        let mut m = crate::compiled::test_manifest_json();
        m["weights_bin"] = serde_json::to_value(&recipe).unwrap();
        std::fs::write(dir.join("expected.bin"), &expected).unwrap();
        serde_json::from_value(m).unwrap()
    }

    #[test]
    fn every_recipe_expands_to_its_bytes_and_bad_recipes_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let manifest = planted(dir);
        let expected = std::fs::read(dir.join("expected.bin")).unwrap();
        assert_eq!(state(dir, &manifest), State::Missing);
        check_recipe(dir, &manifest).unwrap();
        let mut calls = Vec::new();
        let made = ensure(dir, &manifest, |done, total| calls.push((done, total)))
            .unwrap()
            .unwrap();
        assert_eq!(std::fs::read(&made.path).unwrap(), expected);
        assert_eq!(calls.first(), Some(&(0, 299)));
        assert_eq!(calls.last(), Some(&(299, 299)));
        assert_eq!(state(dir, &manifest), State::Present);
        assert!(ensure(dir, &manifest, |_, _| {}).unwrap().is_none());
        std::fs::remove_file(&made.path).unwrap();
        let left = |dir: &Path| -> Vec<String> {
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.') || n == WEIGHTS_BIN)
                .collect()
        };

        let broken = |change: &dyn Fn(&mut WeightsBin)| {
            let mut m = manifest.clone();
            change(m.weights_bin.as_mut().unwrap());
            let err = expand(dir, &m, |_, _| {}).unwrap_err().to_string();
            assert!(left(dir).is_empty(), "{err}: {:?}", left(dir));
            err
        };
        let err = broken(&|r| r.sha256 = "0".repeat(64));
        assert!(
            err.contains("records 0000")
                && err.contains("w.safetensors")
                && err.contains("nothing was written"),
            "{err}"
        );
        let err = broken(&|r| r.tensors[1].offset = 255);
        assert!(
            err.contains("manifest.json") && err.contains("`norm` is at offset 255"),
            "{err}"
        );
        let err = broken(&|r| {
            r.tensors[2].recipe = Recipe::TransposedI8 {
                source: "gone".into(),
            }
        });
        assert!(err.contains("reads `gone`"), "{err}");
        let err = broken(&|r| r.bytes = 300);
        assert!(err.contains("add up to 299 bytes, not the 300"), "{err}");
        let err = broken(&|r| {
            r.tensors[0].bytes = 255;
            r.tensors[1].offset = 255;
            r.tensors[2].offset = 263;
            r.tensors[3].offset = 269;
            r.tensors[4].offset = 293;
            r.bytes = 298;
        });
        assert!(
            err.contains("`w` comes out 256 bytes, the manifest records 255"),
            "{err}"
        );
        let err = broken(&|r| r.dequantized.get_mut("w").unwrap().scale = "m8".into());
        assert!(err.contains("m8"), "{err}");
        let err = broken(&|r| r.dequantized.get_mut("w").unwrap().scale = "norm".into());
        assert!(err.contains("`norm` of `w` is bf16"), "{err}");
        let err = broken(&|r| r.dequantized.get_mut("w").unwrap().scheme.bits = 8);
        assert!(err.contains("8-bit groups of 32 cannot read"), "{err}");
        let err = broken(&|r| r.tensors[4].recipe = Recipe::Stored { offset: 5 });
        assert!(err.contains("weights.extra.bin"), "{err}");
        let err = broken(&|r| r.extra_file = Some("../x".into()));
        assert!(err.contains("`../x` is not a plain file name"), "{err}");
        let mut m = manifest.clone();
        m.weights_bin = None;
        let err = expand(dir, &m, |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("inline"), "{err}");
    }
}
