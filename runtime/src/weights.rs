//! The weight store: tensors of one or more safetensors files, memory-mapped
//! and validated when opened, plus tensors computed at build time (RoPE
//! tables). The IR names tensors here; nothing is copied until a consumer
//! asks for f32 data, and f32 data in the files is not copied at all.

use crate::ir::quant::{QuantizedMatrix, WeightQuant};
use crate::ir::{DType, TensorType};
use crate::tensor::{Buffer, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

pub const SINGLE_FILE: &str = "model.safetensors";
/// safetensors has no 4-bit type: a `u4 [.., K]` tensor is stored as `U8
/// [.., K / 2]` and listed (a JSON array of names) under this metadata key.
pub const U4_METADATA_KEY: &str = "kiln.u4";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    BadIndex { path: PathBuf, message: String },
    #[error("{dir}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")]
    NoWeights { dir: PathBuf },
    #[error("tensor `{tensor}` is missing from {files}")]
    Missing { tensor: String, files: String },
    #[error("tensor `{tensor}` appears in both {first} and {second}")]
    Duplicate {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{path}: tensor `{tensor}` has dtype {dtype}; Kiln reads F32, F16 and BF16 (and I8, or U8 listed as 4-bit, for quantized weights)")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: tensor `{tensor}` is {dtype}, not a float tensor (a quantized weight read as plain weights)")]
    NotFloat {
        path: PathBuf,
        tensor: String,
        dtype: DType,
    },
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        tensor: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
}

/// Where the tensors of one quantized matrix are in a store.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantTensors {
    pub scheme: WeightQuant,
    pub q: String,
    pub scale: String,
    pub min: Option<String>,
}

#[derive(Clone)]
enum Source {
    /// `len` bytes at absolute byte offset `start` of `files[file]`.
    Mapped {
        file: usize,
        start: usize,
        len: usize,
    },
    /// Computed when the graph was built.
    Owned(Arc<Vec<f32>>),
    /// Quantized or f16 data made by Kiln (a quantizer, a GGUF's blocks),
    /// as stored: the entry's dtype says how to read it.
    OwnedBytes(Arc<Vec<u8>>),
    /// The f32 weights a quantized matrix stands for, computed when read
    /// (for a backend that cannot take the quantized form).
    Dequantized(QuantTensors),
}

#[derive(Clone)]
struct Entry {
    /// `Err(dtype name)` for a dtype Kiln does not read; an error only if someone asks for it.
    dtype: Result<DType, String>,
    shape: Vec<usize>,
    source: Source,
}

struct MappedFile {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// Named tensors from safetensors files and from the builder.
#[derive(Default)]
pub struct WeightStore {
    files: Vec<MappedFile>,
    entries: BTreeMap<String, Entry>,
    /// The file owned tensors were read from (a GGUF), for messages.
    owned_from: Option<PathBuf>,
}

impl WeightStore {
    /// Opens the weights of a Hugging Face model directory: `model.safetensors`,
    /// or the shards listed by `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<WeightStore, WeightError> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(dir, &index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        Err(WeightError::NoWeights {
            dir: dir.to_path_buf(),
        })
    }

    fn open_index(dir: &Path, index: &Path) -> Result<WeightStore, WeightError> {
        let bad = |message: String| WeightError::BadIndex {
            path: index.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(index).map_err(|source| WeightError::Io {
            path: index.to_path_buf(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("has no \"weight_map\" object".into()))?;
        let canonical_dir = dir.canonicalize().map_err(|source| WeightError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut shard_names: Vec<&str> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                bad(format!(
                    "weight_map entry for `{tensor}` is not a file name"
                ))
            })?;
            if !shard_names.contains(&file) {
                shard_names.push(file);
            }
        }
        let mut paths = Vec::new();
        for name in &shard_names {
            // Only plain names inside the model directory: an index must not
            // make Kiln read (or later copy out) files from anywhere else.
            let relative = Path::new(name);
            let plain = !name.is_empty()
                && relative
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)));
            let path = dir.join(relative);
            let inside = plain
                && path
                    .canonicalize()
                    .map(|p| p.starts_with(&canonical_dir))
                    .unwrap_or(true);
            if !inside {
                return Err(bad(format!(
                    "weight_map names `{name}`, which is outside the model directory"
                )));
            }
            paths.push(path);
        }
        let store = Self::open_files(&paths)?;
        for (tensor, file) in map {
            let expected = dir.join(file.as_str().unwrap_or_default());
            match store.entries.get(tensor) {
                Some(Entry {
                    source: Source::Mapped { file, .. },
                    ..
                }) if store.files[*file].path == expected => {}
                _ => {
                    return Err(bad(format!(
                        "weight_map puts `{tensor}` in {}, which does not contain it",
                        expected.display()
                    )))
                }
            }
        }
        Ok(store)
    }

    /// Opens and validates safetensors files. Tensor names must be unique across them.
    pub fn open_files(paths: &[PathBuf]) -> Result<WeightStore, WeightError> {
        let mut store = WeightStore::default();
        for path in paths {
            store.add_file(path)?;
        }
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<(), WeightError> {
        let io = |source| WeightError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; Kiln does not modify weight files while
        // running, and a file changed underneath by someone else is outside
        // what any memory-mapping reader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| WeightError::BadFile {
                path: path.to_path_buf(),
                message: describe_safetensors_error(&e, map.len()),
            })?;
        let data_start = 8 + header_len;
        let file_index = self.files.len();
        let u4_names: Vec<String> = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(U4_METADATA_KEY))
            .map(|list| {
                serde_json::from_str(list).map_err(|e| WeightError::BadFile {
                    path: path.to_path_buf(),
                    message: format!("metadata `{U4_METADATA_KEY}` is not a list of names: {e}"),
                })
            })
            .transpose()?
            .unwrap_or_default();
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            let mut shape = info.shape.clone();
            let mut dtype = convert_dtype(info.dtype);
            if u4_names.contains(&name) {
                if info.dtype != StDtype::U8 || shape.is_empty() {
                    return Err(WeightError::BadFile {
                        path: path.to_path_buf(),
                        message: format!("`{name}` is listed as 4-bit but is not a U8 tensor"),
                    });
                }
                *shape.last_mut().unwrap() *= 2;
                dtype = Ok(DType::U4);
            }
            let entry = Entry {
                dtype,
                shape,
                source: Source::Mapped {
                    file: file_index,
                    start: data_start + start,
                    len: end - start,
                },
            };
            if let Some(Entry {
                source: Source::Mapped { file, .. },
                ..
            }) = self.entries.get(&name)
            {
                return Err(WeightError::Duplicate {
                    tensor: name,
                    first: self.files[*file].path.clone(),
                    second: path.to_path_buf(),
                });
            }
            self.entries.insert(name, entry);
        }
        self.files.push(MappedFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
        });
        Ok(())
    }

    /// Adds a tensor computed at build time (replacing one of the same name).
    pub fn insert_f32(&mut self, name: &str, shape: Vec<usize>, data: Vec<f32>) {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        self.entries.insert(
            name.to_string(),
            Entry {
                dtype: Ok(DType::F32),
                shape,
                source: Source::Owned(Arc::new(data)),
            },
        );
    }

    /// Adds a tensor of stored bytes made at build time (quantized weights,
    /// f16 scales), replacing one of the same name.
    pub fn insert_bytes(&mut self, name: &str, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) {
        let ty = TensorType::new(dtype, shape);
        assert_eq!(
            ty.size_bytes(),
            bytes.len(),
            "`{name}`: {ty} in {} bytes",
            bytes.len()
        );
        self.entries.insert(
            name.to_string(),
            Entry {
                dtype: Ok(dtype),
                shape: ty.shape,
                source: Source::OwnedBytes(Arc::new(bytes)),
            },
        );
    }

    /// Adds a quantized matrix as its tensors `<prefix>.qweight` (i8 or u4),
    /// `<prefix>.scales` and, with an offset, `<prefix>.mins` (f16).
    pub fn insert_quantized(&mut self, prefix: &str, m: QuantizedMatrix) -> QuantTensors {
        let s = m.scheme;
        let names = QuantTensors {
            scheme: s,
            q: format!("{prefix}.qweight"),
            scale: format!("{prefix}.scales"),
            min: s.offset.then(|| format!("{prefix}.mins")),
        };
        let q_dtype = if s.bits == 8 { DType::I8 } else { DType::U4 };
        let groups = vec![m.n, s.groups(m.k)];
        let halves = |v: &[half::f16]| -> Vec<u8> { bytemuck::cast_slice(v).to_vec() };
        self.insert_bytes(&names.q, q_dtype, vec![m.n, m.k], m.q);
        self.insert_bytes(&names.scale, DType::F16, groups.clone(), halves(&m.scale));
        if let Some(min) = &names.min {
            self.insert_bytes(min, DType::F16, groups, halves(&m.min));
        }
        names
    }

    /// Adds `name`, an f32 tensor holding the weights the quantized matrix
    /// `tensors` stands for, computed whenever it is read (nothing is held).
    pub fn insert_dequantized(
        &mut self,
        name: &str,
        tensors: &QuantTensors,
    ) -> Result<(), WeightError> {
        let shape = self.tensor_type(&tensors.q)?.shape;
        self.entries.insert(
            name.to_string(),
            Entry {
                dtype: Ok(DType::F32),
                shape,
                source: Source::Dequantized(tensors.clone()),
            },
        );
        Ok(())
    }

    /// The quantized tensors a dequantized tensor (see
    /// [`Self::insert_dequantized`]) is computed from; `None` for any other.
    pub fn dequantized_source(&self, name: &str) -> Option<&QuantTensors> {
        match self.entries.get(name).map(|e| &e.source) {
            Some(Source::Dequantized(t)) => Some(t),
            _ => None,
        }
    }

    /// Removes a tensor (one a pass replaced by others). Mapped bytes stay
    /// mapped; owned ones are freed.
    pub fn remove(&mut self, name: &str) {
        self.entries.remove(name);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The files this store reads, in the order they were opened.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    fn entry(&self, name: &str) -> Result<&Entry, WeightError> {
        self.entries.get(name).ok_or_else(|| WeightError::Missing {
            tensor: name.to_string(),
            files: self.describe_files(),
        })
    }

    /// Names `path` as where the owned tensors came from (a GGUF file the
    /// frontend dequantized), so errors point at it.
    pub fn set_owned_origin(&mut self, path: &Path) {
        self.owned_from = Some(path.to_path_buf());
    }

    fn describe_files(&self) -> String {
        match self.files.len() {
            0 => match &self.owned_from {
                Some(path) => path.display().to_string(),
                None => "the weight store".to_string(),
            },
            1 => self.files[0].path.display().to_string(),
            n => format!(
                "the {n} weight files in {}",
                self.files[0]
                    .path
                    .parent()
                    .unwrap_or(Path::new("."))
                    .display()
            ),
        }
    }

    /// Where a tensor comes from, for error messages.
    pub fn origin(&self, name: &str) -> PathBuf {
        match self.entries.get(name).map(|e| &e.source) {
            Some(Source::Mapped { file, .. }) => self.files[*file].path.clone(),
            _ => self
                .owned_from
                .clone()
                .unwrap_or_else(|| PathBuf::from("<computed by kiln>")),
        }
    }

    /// A tensor's type; an error if it is missing or of an unreadable dtype.
    pub fn tensor_type(&self, name: &str) -> Result<TensorType, WeightError> {
        let entry = self.entry(name)?;
        let dtype = entry
            .dtype
            .clone()
            .map_err(|dtype| WeightError::UnsupportedDtype {
                path: self.origin(name),
                tensor: name.to_string(),
                dtype,
            })?;
        Ok(TensorType::new(dtype, entry.shape.clone()))
    }

    /// Like [`Self::tensor_type`], and checks the shape.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<TensorType, WeightError> {
        let ty = self.tensor_type(name)?;
        if ty.shape != shape {
            return Err(WeightError::WrongShape {
                path: self.origin(name),
                tensor: name.to_string(),
                actual: ty.shape,
                expected: shape.to_vec(),
            });
        }
        Ok(ty)
    }

    /// The tensor's raw little-endian bytes, as stored (owned tensors: f32 bytes).
    pub fn bytes(&self, name: &str) -> Result<&[u8], WeightError> {
        Ok(match &self.entry(name)?.source {
            Source::Mapped { file, start, len } => &self.files[*file].map[*start..*start + *len],
            Source::Owned(data) => bytemuck::cast_slice(data.as_slice()),
            Source::OwnedBytes(data) => data.as_slice(),
            Source::Dequantized(_) => {
                return Err(WeightError::BadFile {
                    path: self.origin(name),
                    message: format!(
                        "tensor `{name}` is computed when read and has no stored bytes"
                    ),
                })
            }
        })
    }

    /// The tensor as the interpreter reads it: floats as f32 (see
    /// [`Self::to_f32_tensor`]), quantized tensors as their stored bytes,
    /// borrowed from the file or the store without a copy.
    pub fn to_tensor(&self, name: &str) -> Result<Tensor, WeightError> {
        let ty = self.tensor_type(name)?;
        if ty.dtype.is_float() {
            return self.to_f32_tensor(name);
        }
        let entry = self.entry(name)?;
        let (owner, start, len): (Arc<dyn AsRef<[u8]> + Send + Sync>, usize, usize) = match &entry
            .source
        {
            Source::Mapped { file, start, len } => (self.files[*file].map.clone(), *start, *len),
            Source::OwnedBytes(data) => (data.clone(), 0, data.len()),
            Source::Owned(_) | Source::Dequantized(_) => unreachable!("these are f32"),
        };
        if ty.size_bytes() != len || !matches!(ty.dtype, DType::I8 | DType::U4) {
            return Err(WeightError::BadFile {
                path: self.origin(name),
                message: format!("tensor `{name}`: {len} bytes do not hold {ty}"),
            });
        }
        Ok(Tensor::quantized(ty.dtype, ty.shape, owner, start, len))
    }

    /// Tells the kernel this process is done with a tensor's pages for now,
    /// so streaming every weight once (as `kiln compile` does) keeps only a
    /// tensor's worth of the files resident. Reading it again still works:
    /// the pages come back from the file.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(Entry {
            source: Source::Mapped { file, start, len },
            ..
        }) = self.entries.get(name)
        {
            let map = &self.files[*file].map;
            // madvise works on whole pages: release only those inside the tensor.
            let page = 4096;
            let first = start.div_ceil(page) * page;
            let last = (start + len) / page * page;
            if last > first {
                // SAFETY: the mapping is private and read-only, backed by a file
                // Kiln does not modify; MADV_DONTNEED only drops the resident
                // copies, and later reads fault the same bytes back in from the file.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        first,
                        last - first,
                    )
                };
            }
        }
    }

    /// The tensor as f32: borrowed from the mapped file when it is stored as
    /// aligned f32, converted otherwise.
    pub fn to_f32_tensor(&self, name: &str) -> Result<Tensor, WeightError> {
        let ty = self.tensor_type(name)?;
        let entry = self.entry(name)?;
        let numel = ty.numel();
        if !ty.dtype.is_float() {
            return Err(WeightError::NotFloat {
                path: self.origin(name),
                tensor: name.to_string(),
                dtype: ty.dtype,
            });
        }
        if let Source::Dequantized(t) = &entry.source {
            let q = self.to_tensor(&t.q)?;
            let scale = self.to_f32_tensor(&t.scale)?;
            let min = t
                .min
                .as_deref()
                .map(|m| self.to_f32_tensor(m))
                .transpose()?;
            let (n, k) = (ty.shape[0], ty.shape[1]);
            let w = crate::ir::quant::dequantize(
                t.scheme,
                q.quantized_bytes(),
                scale.f32s(),
                min.as_ref().map(Tensor::f32s),
                n,
                k,
            );
            return Ok(Tensor::from_f32(ty.shape, w));
        }
        if let Source::Owned(data) = &entry.source {
            return Ok(Tensor::from_f32(ty.shape, data.as_ref().clone()));
        }
        if let (DType::F32, Source::Mapped { file, start, .. }) = (ty.dtype, &entry.source) {
            let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = self.files[*file].map.clone();
            if let Some(buffer) = Buffer::mapped_f32(owner, *start, numel) {
                return Ok(Tensor::from_buffer(ty.shape, Arc::new(buffer)));
            }
        }
        let bytes = self.bytes(name)?;
        let data: Vec<f32> = match ty.dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::I64 | DType::I8 | DType::U4 => unreachable!("checked above"),
        };
        Ok(Tensor::from_f32(ty.shape, data))
    }
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field(
                "files",
                &self.files.iter().map(|m| &m.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn convert_dtype(dtype: StDtype) -> Result<DType, String> {
    match dtype {
        StDtype::F32 => Ok(DType::F32),
        StDtype::F16 => Ok(DType::F16),
        StDtype::BF16 => Ok(DType::BF16),
        StDtype::I8 => Ok(DType::I8),
        other => Err(format!("{other:?}")),
    }
}

/// Turns the safetensors crate's terse errors into what went wrong with the file.
fn describe_safetensors_error(error: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match error {
        E::HeaderTooSmall => format!("the file is {file_len} bytes, too short to hold the 8-byte header length"),
        E::InvalidHeaderLength => {
            format!("the header length runs past the end of the file ({file_len} bytes): the file is truncated or not safetensors")
        }
        E::HeaderTooLarge => "the header length is absurdly large: the file is not safetensors".to_string(),
        E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) => format!("the header is not valid JSON ({error})"),
        E::InvalidOffset(name) => format!(
            "the data offsets of tensor `{name}` overlap another tensor or leave a gap (the header is corrupt)"
        ),
        E::TensorInvalidInfo => "a tensor's byte range does not match its dtype and shape".to_string(),
        E::MetadataIncompleteBuffer => format!(
            "the tensors' data does not end where the file ends ({file_len} bytes): the file is truncated or the offsets run past its end"
        ),
        E::ValidationOverflow => "a tensor's shape is too large to address".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_safetensors(path: &Path, header: &str, data: &[u8]) {
        let mut f = File::create(path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(data).unwrap();
    }

    fn good_header() -> &'static str {
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]}}"#
    }

    fn good_data() -> Vec<u8> {
        let mut data = Vec::new();
        data.extend(1.5f32.to_le_bytes());
        data.extend((-2.0f32).to_le_bytes());
        data.extend(half::bf16::from_f32(3.0).to_le_bytes());
        data.extend(half::bf16::from_f32(0.25).to_le_bytes());
        data
    }

    fn open_err(header: &str, data: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_safetensors(&path, header, data);
        match WeightStore::open_dir(dir.path()) {
            Ok(_) => panic!("opened a bad file"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn reads_f32_and_bf16() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join("model.safetensors"),
            good_header(),
            &good_data(),
        );
        let store = WeightStore::open_dir(dir.path()).unwrap();
        assert_eq!(store.to_f32_tensor("a").unwrap().f32s(), &[1.5, -2.0]);
        assert_eq!(store.to_f32_tensor("b").unwrap().f32s(), &[3.0, 0.25]);
        assert_eq!(
            store.tensor_type("b").unwrap(),
            TensorType::new(DType::BF16, [2])
        );
    }

    #[test]
    fn truncated_files_are_refused_with_the_file_named() {
        let data = good_data();
        let err = open_err(good_header(), &data[..10]);
        assert!(
            err.contains("model.safetensors") && err.contains("truncated"),
            "{err}"
        );
        // A header length that runs past the end.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
        let err = WeightStore::open_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("runs past the end"), "{err}");
        std::fs::write(&path, [1u8, 2]).unwrap();
        let err = WeightStore::open_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
    }

    #[test]
    fn overlapping_or_overlong_offsets_are_refused() {
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]}}"#;
        let err = open_err(overlap, &good_data()[..8]);
        assert!(err.contains("overlap"), "{err}");
        let past_end = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]}}"#;
        let err = open_err(past_end, &good_data()[..10]);
        assert!(
            err.contains("past its end") || err.contains("truncated"),
            "{err}"
        );
        let lying_size = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let err = open_err(lying_size, &good_data()[..8]);
        assert!(err.contains("does not match its dtype and shape"), "{err}");
    }

    #[test]
    fn missing_and_misshapen_tensors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join("model.safetensors"),
            good_header(),
            &good_data(),
        );
        let store = WeightStore::open_dir(dir.path()).unwrap();
        let err = store.tensor_type("nope").unwrap_err().to_string();
        assert!(
            err.contains("`nope` is missing from") && err.contains("model.safetensors"),
            "{err}"
        );
        let err = store.expect("a", &[3]).unwrap_err().to_string();
        assert!(
            err.contains("has shape [2], expected [3]") && err.contains("model.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn an_index_may_not_point_outside_the_model_directory() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("model");
        std::fs::create_dir(&model).unwrap();
        write_safetensors(
            &root.path().join("x.safetensors"),
            good_header(),
            &good_data(),
        );
        std::fs::write(
            model.join(INDEX_FILE),
            r#"{"weight_map":{"a":"../x.safetensors","b":"../x.safetensors"}}"#,
        )
        .unwrap();
        let err = WeightStore::open_dir(&model).unwrap_err().to_string();
        assert!(
            err.contains("outside the model directory") && err.contains(INDEX_FILE),
            "{err}"
        );
        std::fs::write(
            model.join(INDEX_FILE),
            r#"{"weight_map":{"a":"/etc/passwd"}}"#,
        )
        .unwrap();
        let err = WeightStore::open_dir(&model).unwrap_err().to_string();
        assert!(err.contains("outside the model directory"), "{err}");
    }

    #[test]
    fn an_index_must_agree_with_its_shards() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join("s1.safetensors"),
            good_header(),
            &good_data(),
        );
        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"weight_map":{"a":"s1.safetensors","zzz":"s1.safetensors"}}"#,
        )
        .unwrap();
        let err = WeightStore::open_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("`zzz`") && err.contains("does not contain it"),
            "{err}"
        );
    }
}
