//! The GGUF container: header, typed metadata, tensor infos and the aligned
//! data section, read from a memory map with every length and offset checked
//! against the file before it is used. A hostile file gets an error, never a
//! panic or an allocation larger than the file itself.
//!
//! Layout (llama.cpp's `gguf` spec, version 2 and 3; all little-endian):
//! magic `GGUF`, u32 version, u64 tensor count, u64 metadata count; metadata
//! pairs (string key, u32 type, value); tensor infos (string name, u32 n_dims,
//! n_dims × u64 dims innermost first, u32 ggml type, u64 offset into the data
//! section); padding to `general.alignment` (default 32); the data section.

use super::quant::GgmlType;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays exist in the spec but no model uses more than one level.
const MAX_ARRAY_DEPTH: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (it starts with {found:?}, not \"GGUF\")")]
    BadMagic { path: PathBuf, found: String },
    #[error("{path}: GGUF version {version} is not supported (Kiln reads versions 2 and 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: corrupt or truncated GGUF: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// A metadata value, typed as the file declares it.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(MetaArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// Any integer type that fits, as llama.cpp's writers vary the width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }
}

impl fmt::Display for MetaValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::String(s) if s.chars().count() > 60 => {
                let head: String = s.chars().take(57).collect();
                write!(f, "{head:?}…")
            }
            MetaValue::String(s) => write!(f, "{s:?}"),
            MetaValue::Array(items) => write!(f, "[{} items]", items.len()),
            MetaValue::Bool(v) => write!(f, "{v}"),
            other => match (other.as_i64(), other.as_f64()) {
                (Some(i), _) => write!(f, "{i}"),
                (None, Some(x)) => write!(f, "{x}"),
                _ => write!(f, "{}", other.type_name()),
            },
        }
    }
}

/// An array, stored by item type so that a million u8 items take a
/// megabyte in memory, as in the file.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetaArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl MetaArray {
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn strings(&self) -> Option<&[String]> {
        match self {
            MetaArray::String(v) => Some(v),
            _ => None,
        }
    }

    /// The items as i64, for any integer item type that fits.
    pub fn ints(&self) -> Option<Vec<i64>> {
        fn all<T: Copy>(v: &[T], f: impl Fn(T) -> Option<i64>) -> Option<Vec<i64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            MetaArray::U8(v) => all(v, |x| Some(x.into())),
            MetaArray::I8(v) => all(v, |x| Some(x.into())),
            MetaArray::U16(v) => all(v, |x| Some(x.into())),
            MetaArray::I16(v) => all(v, |x| Some(x.into())),
            MetaArray::U32(v) => all(v, |x| Some(x.into())),
            MetaArray::I32(v) => all(v, |x| Some(x.into())),
            MetaArray::U64(v) => all(v, |x| i64::try_from(x).ok()),
            MetaArray::I64(v) => Some(v.clone()),
            _ => None,
        }
    }
}

/// One tensor's entry in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Outermost first, as Hugging Face and Kiln's IR write shapes (the file
    /// lists them innermost first).
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened GGUF file: metadata and tensor infos parsed, data mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    map: Mmap,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private; Kiln never writes the
        // file. A file truncated by someone else while mapped would fault,
        // which no reader of mapped files can prevent.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (version, metadata, tensors) = parse(&map).map_err(|e| e.at(path))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            map,
        })
    }

    /// The raw bytes of a tensor (bounds were checked when the file was opened).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.start..info.start + info.len]
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
}

/// A parse error before it knows the file's name.
#[derive(Debug)]
enum ParseError {
    BadMagic(String),
    Version(u32),
    Corrupt(String),
}

impl ParseError {
    fn at(self, path: &Path) -> GgufError {
        let path = path.to_path_buf();
        match self {
            ParseError::BadMagic(found) => GgufError::BadMagic { path, found },
            ParseError::Version(version) => GgufError::Version { path, version },
            ParseError::Corrupt(message) => GgufError::Corrupt { path, message },
        }
    }
}

type Parsed = (u32, BTreeMap<String, MetaValue>, Vec<TensorInfo>);

/// Parses a whole GGUF image held in memory (for the fuzz target and tests).
pub fn parse_bytes(bytes: &[u8]) -> Result<Parsed, String> {
    parse(bytes).map_err(|e| match e {
        ParseError::BadMagic(found) => format!("bad magic {found:?}"),
        ParseError::Version(v) => format!("unsupported version {v}"),
        ParseError::Corrupt(m) => m,
    })
}

fn parse(bytes: &[u8]) -> Result<Parsed, ParseError> {
    let mut r = Cursor { bytes, pos: 0 };
    let magic = bytes.get(..4).unwrap_or(bytes);
    if magic != MAGIC {
        return Err(ParseError::BadMagic(
            String::from_utf8_lossy(magic).into_owned(),
        ));
    }
    r.pos = 4;
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(ParseError::Version(version));
    }
    let tensor_count = r.u64("the tensor count")?;
    let metadata_count = r.u64("the metadata count")?;
    // Each metadata pair takes at least 12 bytes and each tensor info at
    // least 24: a count beyond what the file can hold is a lie.
    r.check_count(metadata_count, 12, "metadata pairs")?;
    r.check_count(tensor_count, 24, "tensors")?;

    let mut metadata = BTreeMap::new();
    for i in 0..metadata_count {
        let key = r.string(&format!("the key of metadata pair {i}"))?;
        let value_type = r.u32(&format!("the type of `{key}`"))?;
        let value = r.value(value_type, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(ParseError::Corrupt(format!(
                "metadata key `{key}` appears twice"
            )));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
            _ => {
                return Err(ParseError::Corrupt(format!(
                    "general.alignment is {v}; it must be a power of two"
                )))
            }
        },
    };

    struct RawInfo {
        name: String,
        dims: Vec<u64>,
        ggml_type: GgmlType,
        offset: u64,
    }
    let mut raw = Vec::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = r.string(&format!("the name of tensor {i}"))?;
        let n_dims = r.u32(&format!("the rank of `{name}`"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(ParseError::Corrupt(format!(
                "tensor `{name}` has {n_dims} dimensions; ggml tensors have 1 to {MAX_DIMS}"
            )));
        }
        let dims = (0..n_dims)
            .map(|_| r.u64(&format!("the dimensions of `{name}`")))
            .collect::<Result<Vec<_>, _>>()?;
        let type_id = r.u32(&format!("the type of `{name}`"))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            ParseError::Corrupt(format!(
                "tensor `{name}` has ggml type {type_id} ({}), which Kiln cannot read; \
                 it reads {}",
                GgmlType::id_name(type_id),
                GgmlType::supported_names()
            ))
        })?;
        let offset = r.u64(&format!("the offset of `{name}`"))?;
        raw.push(RawInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }

    let data_start = r.pos.next_multiple_of(alignment as usize);
    let file_len = bytes.len();
    let mut tensors = Vec::with_capacity(raw.len());
    let mut names = std::collections::BTreeSet::new();
    for info in raw {
        let name = info.name;
        if !names.insert(name.clone()) {
            return Err(ParseError::Corrupt(format!(
                "tensor `{name}` appears twice"
            )));
        }
        let corrupt = |m: String| ParseError::Corrupt(format!("tensor `{name}`: {m}"));
        // Elements and bytes in u128, checked: four u64 dimensions can
        // still overflow it, and such a tensor cannot fit any file.
        let numel = info
            .dims
            .iter()
            .try_fold(1u128, |n, &d| n.checked_mul(d as u128))
            .filter(|&n| n <= file_len as u128 * 8)
            .ok_or_else(|| {
                corrupt(format!(
                    "its shape {:?} holds more elements than the file could",
                    info.dims
                ))
            })?;
        if numel == 0 {
            return Err(corrupt(format!("has an empty shape {:?}", info.dims)));
        }
        let block = info.ggml_type.block_len() as u128;
        if !(info.dims[0] as u128).is_multiple_of(block) {
            return Err(corrupt(format!(
                "its rows of {} elements are not whole {} blocks of {block}",
                info.dims[0],
                info.ggml_type.name()
            )));
        }
        let len = numel / block * info.ggml_type.block_bytes() as u128;
        if info.offset % alignment != 0 {
            return Err(corrupt(format!(
                "its offset {} is not a multiple of the alignment {alignment}",
                info.offset
            )));
        }
        let start = data_start as u128 + info.offset as u128;
        if start + len > file_len as u128 {
            return Err(corrupt(format!(
                "its {len} bytes at offset {start} run past the end of the file ({file_len} bytes)"
            )));
        }
        tensors.push(TensorInfo {
            name,
            shape: info.dims.iter().rev().map(|&d| d as usize).collect(),
            ggml_type: info.ggml_type,
            start: start as usize,
            len: len as usize,
        });
    }
    // Tensors may not share bytes: otherwise a small file could name the
    // same megabyte a thousand times and dequantize to gigabytes.
    let mut by_start: Vec<&TensorInfo> = tensors.iter().collect();
    by_start.sort_by_key(|t| t.start);
    for pair in by_start.windows(2) {
        if pair[0].start + pair[0].len > pair[1].start {
            return Err(ParseError::Corrupt(format!(
                "tensors `{}` and `{}` overlap in the file",
                pair[0].name, pair[1].name
            )));
        }
    }
    Ok((version, metadata, tensors))
}

/// Reads `count` items with `read`, into a vector sized by what the file
/// holds (the caller checked the count against the bytes left).
fn items<T>(
    count: usize,
    mut read: impl FnMut() -> Result<T, ParseError>,
) -> Result<Vec<T>, ParseError> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        out.push(read()?);
    }
    Ok(out)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], ParseError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                ParseError::Corrupt(format!(
                    "the file ends at byte {} while reading {what}",
                    self.bytes.len()
                ))
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ParseError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Refuses `count` items of at least `min_size` bytes each when the rest
    /// of the file cannot hold them, before anything is allocated for them.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), ParseError> {
        let left = (self.bytes.len() - self.pos) as u64;
        if count.saturating_mul(min_size) > left {
            return Err(ParseError::Corrupt(format!(
                "it claims {count} {what}, more than the {left} bytes left can hold"
            )));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, ParseError> {
        let len = self.u64(what)?;
        self.check_count(len, 1, &format!("bytes in {what}"))?;
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| ParseError::Corrupt(format!("{what} is not valid UTF-8")))
    }

    fn array_items(
        &mut self,
        item_type: u32,
        count: usize,
        key: &str,
        depth: usize,
    ) -> Result<MetaArray, ParseError> {
        let what = format!("the items of `{key}`");
        let w = what.as_str();
        Ok(match item_type {
            0 => MetaArray::U8(self.take(count, w)?.to_vec()),
            1 => MetaArray::I8(self.take(count, w)?.iter().map(|&b| b as i8).collect()),
            2 => MetaArray::U16(items(count, || Ok(u16::from_le_bytes(self.array(w)?)))?),
            3 => MetaArray::I16(items(count, || Ok(i16::from_le_bytes(self.array(w)?)))?),
            4 => MetaArray::U32(items(count, || self.u32(w))?),
            5 => MetaArray::I32(items(count, || Ok(i32::from_le_bytes(self.array(w)?)))?),
            6 => MetaArray::F32(items(count, || Ok(f32::from_le_bytes(self.array(w)?)))?),
            7 => MetaArray::Bool(items(count, || match self.value(7, key, depth + 1)? {
                MetaValue::Bool(b) => Ok(b),
                _ => unreachable!("type 7 reads a bool"),
            })?),
            8 => MetaArray::String(items(count, || self.string(w))?),
            9 => MetaArray::Array(items(count, || match self.value(9, key, depth + 1)? {
                MetaValue::Array(a) => Ok(a),
                _ => unreachable!("type 9 reads an array"),
            })?),
            10 => MetaArray::U64(items(count, || self.u64(w))?),
            11 => MetaArray::I64(items(count, || Ok(i64::from_le_bytes(self.array(w)?)))?),
            12 => MetaArray::F64(items(count, || Ok(f64::from_le_bytes(self.array(w)?)))?),
            t => {
                return Err(ParseError::Corrupt(format!(
                    "`{key}` is an array of unknown type {t}"
                )))
            }
        })
    }

    fn value(&mut self, value_type: u32, key: &str, depth: usize) -> Result<MetaValue, ParseError> {
        let what = format!("the value of `{key}`");
        Ok(match value_type {
            0 => MetaValue::U8(self.array::<1>(&what)?[0]),
            1 => MetaValue::I8(self.array::<1>(&what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => MetaValue::U32(self.u32(&what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    return Err(ParseError::Corrupt(format!(
                        "`{key}` is a bool of value {b}"
                    )))
                }
            },
            8 => MetaValue::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(ParseError::Corrupt(format!(
                        "`{key}` nests arrays more than {MAX_ARRAY_DEPTH} deep"
                    )));
                }
                let item_type = self.u32(&what)?;
                let count = self.u64(&what)?;
                let min_size = match item_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => {
                        return Err(ParseError::Corrupt(format!(
                            "`{key}` is an array of unknown type {t}"
                        )))
                    }
                };
                self.check_count(count, min_size, &format!("items in `{key}`"))?;
                MetaValue::Array(self.array_items(item_type, count as usize, key, depth)?)
            }
            10 => MetaValue::U64(self.u64(&what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            t => {
                return Err(ParseError::Corrupt(format!(
                    "`{key}` has unknown value type {t}"
                )))
            }
        })
    }
}

/// Writes GGUF images, for tests.
#[cfg(test)]
pub mod writer {
    use super::{MetaArray, MetaValue};
    use crate::frontend::gguf::quant::GgmlType;

    pub struct TensorSpec {
        pub name: String,
        /// Outermost first.
        pub shape: Vec<usize>,
        pub ggml_type: GgmlType,
        pub data: Vec<u8>,
    }

    pub fn write(metadata: &[(&str, MetaValue)], tensors: &[TensorSpec]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(super::MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            string(&mut out, key);
            out.extend_from_slice(&type_id(value).to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in tensors {
            string(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                out.extend_from_slice(&(d as u64).to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(32);
        }
        let data_start = out.len().next_multiple_of(32);
        out.resize(data_start, 0);
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize(data_start + off as usize, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    fn write_value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.push(*x as u8),
            MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(*x as u8),
            MetaValue::String(s) => string(out, s),
            MetaValue::Array(items) => {
                let item_type: u32 = match items {
                    MetaArray::U8(_) => 0,
                    MetaArray::I32(_) => 5,
                    MetaArray::String(_) => 8,
                    _ => unimplemented!("the test writer writes u8, i32 and string arrays"),
                };
                out.extend_from_slice(&item_type.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                match items {
                    MetaArray::U8(v) => out.extend_from_slice(v),
                    MetaArray::I32(v) => v
                        .iter()
                        .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                    MetaArray::String(v) => v.iter().for_each(|x| string(out, x)),
                    _ => unreachable!(),
                }
            }
            MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{write, TensorSpec};
    use super::*;

    fn sample() -> Vec<u8> {
        write(
            &[
                ("general.architecture", MetaValue::String("llama".into())),
                ("llama.block_count", MetaValue::U32(2)),
                (
                    "tokenizer.ggml.tokens",
                    MetaValue::Array(MetaArray::String(vec!["a".into(), "b".into()])),
                ),
            ],
            &[
                TensorSpec {
                    name: "w".into(),
                    shape: vec![3, 2],
                    ggml_type: GgmlType::F32,
                    data: [1f32, 2., 3., 4., 5., 6.]
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                },
                TensorSpec {
                    name: "v".into(),
                    shape: vec![2],
                    ggml_type: GgmlType::F16,
                    data: vec![0, 0x3c, 0, 0x40],
                },
            ],
        )
    }

    #[test]
    fn reads_metadata_and_tensor_infos() {
        let (version, meta, tensors) = parse_bytes(&sample()).unwrap();
        assert_eq!(version, 3);
        assert_eq!(meta["general.architecture"].as_str(), Some("llama"));
        assert_eq!(meta["llama.block_count"].as_u64(), Some(2));
        assert_eq!(meta["tokenizer.ggml.tokens"].as_array().unwrap().len(), 2);
        assert_eq!(tensors[0].shape, vec![3, 2]);
        assert_eq!(tensors[0].len, 24);
        assert_eq!(tensors[1].ggml_type, GgmlType::F16);
        assert_eq!(tensors[1].start % 32, 0);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            assert!(parse_bytes(&bytes[..cut]).is_err(), "cut at {cut} parsed");
        }
    }

    #[test]
    fn lies_in_counts_and_offsets_are_refused() {
        let bad_magic = parse_bytes(b"GGML\x03\0\0\0").unwrap_err();
        assert!(bad_magic.contains("magic"), "{bad_magic}");

        let mut huge_count = sample();
        huge_count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = parse_bytes(&huge_count).unwrap_err();
        assert!(err.contains("claims"), "{err}");

        let mut huge_meta = sample();
        huge_meta[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = parse_bytes(&huge_meta).unwrap_err();
        assert!(err.contains("metadata pairs"), "{err}");

        // The F16 tensor's offset, pointed past the end of the file.
        let bytes = sample();
        let (_, _, tensors) = parse_bytes(&bytes).unwrap();
        let v_offset_pos = {
            // name "v": u64 len 1, "v", u32 n_dims 1, u64 dim 2, u32 type, u64 offset
            let needle = [1u8, 0, 0, 0, 0, 0, 0, 0, b'v'];
            let p = bytes
                .windows(needle.len())
                .position(|w| w == needle)
                .unwrap();
            p + needle.len() + 4 + 8 + 4
        };
        let mut past_end = bytes.clone();
        past_end[v_offset_pos..v_offset_pos + 8].copy_from_slice(&(1u64 << 32).to_le_bytes());
        let err = parse_bytes(&past_end).unwrap_err();
        assert!(err.contains("run past the end"), "{err}");
        assert_eq!(tensors.len(), 2);

        // Four huge dimensions overflow even u128 (found by the fuzzer).
        let dims_at = v_offset_pos - 4 - 8;
        let mut huge_dims = bytes.clone();
        huge_dims[dims_at..dims_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = parse_bytes(&huge_dims).unwrap_err();
        assert!(err.contains("more elements than the file"), "{err}");

        let mut unknown_type = bytes.clone();
        unknown_type[v_offset_pos - 4..v_offset_pos].copy_from_slice(&99u32.to_le_bytes());
        let err = parse_bytes(&unknown_type).unwrap_err();
        assert!(err.contains("ggml type 99"), "{err}");
    }
}
