//! Reading Ascend `.om` model files without ACL: the header, the partition
//! table(s) and the MODEL_INOUT_INFO partition, which names every input and
//! output with its dtype, format and dims. Enough to check a compiled model
//! against its manifest before loading it, and to describe an .om on a
//! machine without CANN.
//!
//! Layout (all little-endian), from the public GE sources' descriptions:
//! a 256-byte header (magic "IMOD"), then per model a partition table and the
//! partitions' data in table order. The table has two forms: with 64-bit
//! offsets and sizes (24-byte entries) when the header's `model_length` is
//! set, else 32-bit ones (12-byte entries).
//!
//! Every length read from the file is checked against what is left of it
//! before anything is allocated or sliced: a corrupt file is an error, never
//! a panic or a huge allocation.

pub mod model_def;

use model_def::OmGraph;
use std::fmt;
use std::path::{Path, PathBuf};

pub const HEADER_LEN: usize = 256;
pub const MAGIC: u32 = 0x444F_4D49; // "IMOD"
const MAX_PARTITIONS: u32 = 8;
const MAX_MODELS: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum OmError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an .om model: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The fields of the 256-byte header that matter here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OmHeader {
    pub version: u32,
    pub length: u32,
    pub is_encrypted: bool,
    pub model_type: u8,
    pub name: String,
    pub model_num: u32,
    pub platform_version: String,
    pub model_length: u64,
    pub is_unknown_shape: bool,
}

/// Partition kinds, by their number in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionKind {
    ModelDef,
    Weights,
    TaskInfo,
    TbeKernels,
    CustomAicpuKernels,
    SoBins,
    ModelInoutInfo,
    Other(u32),
}

impl PartitionKind {
    fn from_u32(v: u32) -> PartitionKind {
        match v {
            0 => PartitionKind::ModelDef,
            1 => PartitionKind::Weights,
            2 => PartitionKind::TaskInfo,
            3 => PartitionKind::TbeKernels,
            4 => PartitionKind::CustomAicpuKernels,
            5 => PartitionKind::SoBins,
            8 => PartitionKind::ModelInoutInfo,
            other => PartitionKind::Other(other),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub kind: PartitionKind,
    /// Absolute byte offset of the partition's data in the file.
    pub start: usize,
    pub size: usize,
}

/// ACL's data type numbers (`aclDataType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AclDataType(pub i32);

impl fmt::Display for AclDataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            0 => "float32",
            1 => "float16",
            2 => "int8",
            3 => "int32",
            4 => "uint8",
            6 => "int16",
            7 => "uint16",
            8 => "uint32",
            9 => "int64",
            10 => "uint64",
            11 => "float64",
            12 => "bool",
            27 => "bfloat16",
            other => return write!(f, "dtype#{other}"),
        };
        f.write_str(name)
    }
}

/// One input or output as MODEL_INOUT_INFO describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OmTensor {
    pub name: String,
    pub size_bytes: u64,
    pub format: i32,
    pub dtype: AclDataType,
    pub dims: Vec<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OmModelIo {
    pub inputs: Vec<OmTensor>,
    pub outputs: Vec<OmTensor>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OmModel {
    pub partitions: Vec<Partition>,
    /// `None` when the file has no MODEL_INOUT_INFO partition (older ATC, or
    /// encrypted models): then only ACL can describe the IO.
    pub io: Option<OmModelIo>,
    /// The MODEL_DEF partition decoded (`None` when there is none). A
    /// ModelDef that does not decode is kept as its error, not a failure of
    /// the whole file: the IO checks do not need it.
    pub graph: Option<Result<OmGraph, String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OmFile {
    pub header: OmHeader,
    pub models: Vec<OmModel>,
}

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "{what} needs {n} bytes at offset {} but only {} remain",
                    self.at,
                    self.bytes.len().saturating_sub(self.at)
                )
            })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn i32(&mut self, what: &str) -> Result<i32, String> {
        Ok(i32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl OmFile {
    pub fn open(path: &Path) -> Result<OmFile, OmError> {
        let io = |source| OmError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // Mapped, not read: an .om holds every weight, gigabytes for an LLM,
        // and only the header, the tables and MODEL_INOUT_INFO are touched.
        // SAFETY: read-only map of a file Kiln does not modify.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(&bytes).map_err(|message| OmError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses a whole .om file held in memory.
    pub fn parse(bytes: &[u8]) -> Result<OmFile, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!(
                "the file is {} bytes, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            ));
        }
        let h = &bytes[..HEADER_LEN];
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(format!(
                "bad magic {:?} (expected \"IMOD\")",
                String::from_utf8_lossy(&h[..4])
            ));
        }
        let header = OmHeader {
            version: u32_at(8),
            length: u32_at(76),
            is_encrypted: h[80] != 0,
            model_type: h[82],
            name: c_string(&h[84..116]),
            model_num: u32_at(156),
            platform_version: c_string(&h[160..180]),
            model_length: u64::from_le_bytes(h[184..192].try_into().unwrap()),
            is_unknown_shape: h[193] != 0,
        };
        let data_len = if header.model_length != 0 {
            header.model_length
        } else {
            header.length as u64
        };
        let actual = (bytes.len() - HEADER_LEN) as u64;
        if data_len != actual {
            return Err(format!(
                "the header says {data_len} bytes of model data follow it, but the file has {actual}: it is truncated or corrupt"
            ));
        }
        if header.is_encrypted {
            return Err("the model is encrypted; only ACL can read it".into());
        }
        let wide = header.model_length != 0;
        let model_count = header.model_num.max(1);
        if model_count > MAX_MODELS {
            return Err(format!(
                "the header claims {model_count} models (at most {MAX_MODELS} are plausible)"
            ));
        }
        let mut r = Reader {
            bytes,
            at: HEADER_LEN,
        };
        let mut models = Vec::new();
        for index in 0..model_count {
            if r.remaining() == 0 && index > 0 {
                break;
            }
            models.push(Self::parse_model(&mut r, wide, index)?);
        }
        if r.remaining() != 0 {
            return Err(format!(
                "{} bytes after the last partition are unaccounted for",
                r.remaining()
            ));
        }
        Ok(OmFile { header, models })
    }

    fn parse_model(r: &mut Reader, wide: bool, index: u32) -> Result<OmModel, String> {
        let num = r.u32("the partition count")?;
        if num == 0 || num > MAX_PARTITIONS {
            return Err(format!(
                "model {index}: partition table claims {num} partitions (1 to {MAX_PARTITIONS} are valid)"
            ));
        }
        let mut entries = Vec::with_capacity(num as usize);
        if wide {
            r.take(4, "the partition table's padding")?;
            for _ in 0..num {
                let kind = r.u32("a partition type")?;
                r.take(4, "a partition entry's padding")?;
                let _offset = r.u64("a partition offset")?;
                let size = r.u64("a partition size")?;
                entries.push((kind, size));
            }
        } else {
            for _ in 0..num {
                let kind = r.u32("a partition type")?;
                let _offset = r.u32("a partition offset")?;
                let size = r.u32("a partition size")? as u64;
                entries.push((kind, size));
            }
        }
        let mut partitions = Vec::with_capacity(entries.len());
        let mut io = None;
        let mut graph = None;
        for (kind, size) in entries {
            let kind = PartitionKind::from_u32(kind);
            let size = usize::try_from(size)
                .map_err(|_| format!("partition {kind:?} has an absurd size {size}"))?;
            let start = r.at;
            let data = r
                .take(size, &format!("model {index}'s {kind:?} partition"))
                .map_err(|e| format!("{e}: the partition table points past the end of the file"))?;
            if kind == PartitionKind::ModelInoutInfo {
                io = Some(
                    parse_inout_info(data)
                        .map_err(|e| format!("model {index}: MODEL_INOUT_INFO: {e}"))?,
                );
            }
            if kind == PartitionKind::ModelDef && graph.is_none() {
                graph = Some(OmGraph::decode(data));
            }
            partitions.push(Partition { kind, start, size });
        }
        Ok(OmModel {
            partitions,
            io,
            graph,
        })
    }
}

/// TLV records `{u32 type; u32 length; value}`; type 0 describes the
/// inputs, 1 the outputs; others (dynamic shapes, name order) are skipped.
fn parse_inout_info(data: &[u8]) -> Result<OmModelIo, String> {
    let mut r = Reader { bytes: data, at: 0 };
    let mut io = OmModelIo {
        inputs: Vec::new(),
        outputs: Vec::new(),
    };
    while r.remaining() > 0 {
        let kind = r.u32("a record type")?;
        let len = r.u32("a record length")? as usize;
        let value = r.take(len, &format!("record {kind}"))?;
        match kind {
            0 => io.inputs = parse_tensor_descs(value)?,
            1 => io.outputs = parse_tensor_descs(value)?,
            _ => {}
        }
    }
    Ok(io)
}

fn parse_tensor_descs(value: &[u8]) -> Result<Vec<OmTensor>, String> {
    const DESC_HEAD: usize = 32;
    let mut r = Reader {
        bytes: value,
        at: 0,
    };
    let count = r.u32("the tensor count")? as usize;
    if count > r.remaining() / DESC_HEAD {
        return Err(format!(
            "{count} tensors cannot fit in {} bytes",
            r.remaining()
        ));
    }
    let mut tensors = Vec::with_capacity(count);
    for i in 0..count {
        let what = |field: &str| format!("tensor {i}'s {field}");
        let size_bytes = r.u64(&what("size"))?;
        let format = r.i32(&what("format"))?;
        let dtype = AclDataType(r.i32(&what("dtype"))?);
        let name_len = r.u32(&what("name length"))? as usize;
        let dims_len = r.u32(&what("dims length"))? as usize;
        let dims_v2_len = r.u32(&what("dimsV2 length"))? as usize;
        let ranges_len = r.u32(&what("shape-range length"))? as usize;
        if !dims_len.is_multiple_of(8) {
            return Err(format!(
                "tensor {i}'s dims take {dims_len} bytes, not a multiple of 8"
            ));
        }
        let name = String::from_utf8_lossy(r.take(name_len, &what("name"))?).into_owned();
        let dims = r
            .take(dims_len, &what("dims"))?
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        r.take(dims_v2_len, &what("dimsV2"))?;
        r.take(ranges_len, &what("shape ranges"))?;
        tensors.push(OmTensor {
            name,
            size_bytes,
            format,
            dtype,
            dims,
        });
    }
    Ok(tensors)
}

impl OmFile {
    /// What each model's MODEL_DEF says ATC built (`kiln inspect --graph`):
    /// an error naming the problem when a model has none or it is corrupt.
    pub fn graphs(&self) -> Result<Vec<&OmGraph>, String> {
        self.models
            .iter()
            .enumerate()
            .map(|(i, model)| match &model.graph {
                Some(Ok(graph)) => Ok(graph),
                Some(Err(e)) => Err(format!("model {i}: MODEL_DEF partition: {e}")),
                None => Err(format!(
                    "model {i} has no MODEL_DEF partition: nothing records what ATC built"
                )),
            })
            .collect()
    }
}

impl fmt::Display for OmFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.header;
        writeln!(
            f,
            "om model `{}`: version {:#x}, platform {}, {} model(s){}",
            h.name,
            h.version,
            if h.platform_version.is_empty() {
                "?"
            } else {
                &h.platform_version
            },
            self.models.len(),
            if h.is_unknown_shape {
                ", dynamic shapes"
            } else {
                ""
            }
        )?;
        for (i, model) in self.models.iter().enumerate() {
            let parts: Vec<String> = model
                .partitions
                .iter()
                .map(|p| format!("{:?} {} B", p.kind, p.size))
                .collect();
            writeln!(f, "model {i}: partitions: {}", parts.join(", "))?;
            match &model.io {
                None => writeln!(
                    f,
                    "  no MODEL_INOUT_INFO partition: the inputs and outputs are known only to ACL"
                )?,
                Some(io) => {
                    for (label, list) in [("input ", &io.inputs), ("output", &io.outputs)] {
                        for t in list {
                            writeln!(
                                f,
                                "  {label} {} : {}{:?} ({} bytes, format {})",
                                t.name, t.dtype, t.dims, t.size_bytes, t.format
                            )?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Writes .om files by the documented layout, for tests (Kiln never writes
/// .om files itself; ATC does).
#[cfg(any(test, feature = "om-writer"))]
pub mod writer {
    use super::{HEADER_LEN, MAGIC};

    pub struct TensorSpec<'a> {
        pub name: &'a str,
        pub dtype: i32,
        pub dims: &'a [i64],
    }

    pub fn tensor_descs(tensors: &[TensorSpec]) -> Vec<u8> {
        let mut out = (tensors.len() as u32).to_le_bytes().to_vec();
        for t in tensors {
            let elements: i64 = t.dims.iter().product();
            out.extend((elements as u64 * 2).to_le_bytes());
            out.extend(2i32.to_le_bytes()); // ND
            out.extend(t.dtype.to_le_bytes());
            out.extend((t.name.len() as u32).to_le_bytes());
            out.extend((t.dims.len() as u32 * 8).to_le_bytes());
            out.extend(0u32.to_le_bytes());
            out.extend(0u32.to_le_bytes());
            out.extend(t.name.as_bytes());
            for d in t.dims {
                out.extend(d.to_le_bytes());
            }
        }
        out
    }

    pub fn inout_info(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, list) in [(0u32, inputs), (1u32, outputs)] {
            let value = tensor_descs(list);
            out.extend(kind.to_le_bytes());
            out.extend((value.len() as u32).to_le_bytes());
            out.extend(value);
        }
        // A record Kiln does not read (data name order), to be skipped.
        out.extend(6u32.to_le_bytes());
        out.extend(3u32.to_le_bytes());
        out.extend([1, 2, 3]);
        out
    }

    /// A single-model file; `wide` picks the 64-bit partition table.
    pub fn om_file(name: &str, partitions: &[(u32, Vec<u8>)], wide: bool) -> Vec<u8> {
        let mut body = (partitions.len() as u32).to_le_bytes().to_vec();
        let mut offset = 0u64;
        if wide {
            body.extend(0u32.to_le_bytes());
        }
        for (kind, data) in partitions {
            body.extend(kind.to_le_bytes());
            if wide {
                body.extend(0u32.to_le_bytes());
                body.extend(offset.to_le_bytes());
                body.extend((data.len() as u64).to_le_bytes());
            } else {
                body.extend((offset as u32).to_le_bytes());
                body.extend((data.len() as u32).to_le_bytes());
            }
            offset += data.len() as u64;
        }
        for (_, data) in partitions {
            body.extend(data);
        }
        let mut header = vec![0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        header[4..8].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        header[8..12].copy_from_slice(&0x2000_0000u32.to_le_bytes());
        header[84..84 + name.len().min(31)].copy_from_slice(&name.as_bytes()[..name.len().min(31)]);
        header[156..160].copy_from_slice(&1u32.to_le_bytes());
        header[160..171].copy_from_slice(b"Ascend310B1");
        if wide {
            header[184..192].copy_from_slice(&(body.len() as u64).to_le_bytes());
        } else {
            header[76..80].copy_from_slice(&(body.len() as u32).to_le_bytes());
        }
        header.extend(body);
        header
    }
}

#[cfg(test)]
mod tests {
    use super::model_def::writer::{model_def, OpSpec};
    use super::writer::*;
    use super::*;

    fn sample(wide: bool, with_io: bool) -> Vec<u8> {
        let inputs = [
            TensorSpec {
                name: "input_ids",
                dtype: 9,
                dims: &[1, 1],
            },
            TensorSpec {
                name: "k_cache",
                dtype: 1,
                dims: &[2, 1, 2, 256, 16],
            },
        ];
        let outputs = [TensorSpec {
            name: "logits:0",
            dtype: 1,
            dims: &[1, 1, 320],
        }];
        let mut partitions = vec![
            (0u32, vec![7u8; 40]),
            (1u32, vec![1u8; 100]),
            (2u32, vec![2u8; 12]),
        ];
        if with_io {
            partitions.push((8, inout_info(&inputs, &outputs)));
        }
        om_file("decode", &partitions, wide)
    }

    #[test]
    fn reads_both_table_forms_with_their_io() {
        for wide in [true, false] {
            let om = OmFile::parse(&sample(wide, true)).unwrap();
            assert_eq!(om.header.name, "decode");
            assert_eq!(om.header.platform_version, "Ascend310B1");
            let model = &om.models[0];
            assert_eq!(model.partitions.len(), 4);
            assert_eq!(model.partitions[1].kind, PartitionKind::Weights);
            assert_eq!(model.partitions[1].size, 100);
            let io = model.io.as_ref().unwrap();
            assert_eq!(io.inputs[1].name, "k_cache");
            assert_eq!(io.inputs[1].dims, vec![2, 1, 2, 256, 16]);
            assert_eq!(io.inputs[1].dtype.to_string(), "float16");
            assert_eq!(io.inputs[0].dtype.to_string(), "int64");
            assert_eq!(io.outputs[0].name, "logits:0");
            let text = om.to_string();
            assert!(
                text.contains("input  k_cache : float16[2, 1, 2, 256, 16]"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_file_without_inout_info_says_so() {
        let om = OmFile::parse(&sample(true, false)).unwrap();
        assert!(om.models[0].io.is_none());
        assert!(om.to_string().contains("no MODEL_INOUT_INFO"));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for wide in [true, false] {
            let good = sample(wide, true);
            for len in 0..good.len() {
                assert!(
                    OmFile::parse(&good[..len]).is_err(),
                    "a file cut at {len} bytes was accepted"
                );
            }
        }
    }

    #[test]
    fn corrupt_fields_are_reported() {
        let good = sample(true, true);
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(OmFile::parse(&bad).unwrap_err().contains("bad magic"));
        // A partition count of 200.
        let mut bad = good.clone();
        bad[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&200u32.to_le_bytes());
        assert!(OmFile::parse(&bad).unwrap_err().contains("200 partitions"));
        // A partition that claims more bytes than the file has.
        let mut bad = good.clone();
        let size_at = HEADER_LEN + 8 + 16; // first entry's size
        bad[size_at..size_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(OmFile::parse(&bad).unwrap_err().contains("past the end"));
        // A tensor count far beyond the record (no huge allocation).
        let om = OmFile::parse(&good).unwrap();
        let io = &om.models[0].partitions[3];
        let mut bad = good.clone();
        let count_at = io.start + 8;
        bad[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(OmFile::parse(&bad).unwrap_err().contains("cannot fit"));
        // The header's length disagrees with the file.
        let mut bad = good.clone();
        bad.push(0);
        assert!(OmFile::parse(&bad)
            .unwrap_err()
            .contains("truncated or corrupt"));
    }

    /// A decode graph as ATC would record it: Data inputs, int8 or fp16
    /// weights (embedded Consts or FileConstants), MatMuls on the AI Core,
    /// optionally one op left on the AI CPU.
    fn graph_ops(int8: bool, ai_cpu: bool, external: bool) -> Vec<OpSpec> {
        let local = "DNN_VM_GE_LOCAL_OP_STORE";
        let weight_dtype = if int8 { 3 } else { 2 };
        let mut ops = vec![OpSpec::new("input_ids", "Data", local)];
        for layer in 0..2 {
            let name = format!("w{layer}");
            let dims = vec![64, 96];
            ops.push(if external {
                OpSpec {
                    file_constant: Some((format!("weight_{layer}"), weight_dtype, dims)),
                    ..OpSpec::new(&name, "FileConstant", local)
                }
            } else {
                OpSpec {
                    constant: Some((weight_dtype, dims)),
                    ..OpSpec::new(&name, "Const", local)
                }
            });
            ops.push(OpSpec {
                input_dtypes: vec![if int8 { 3 } else { 2 }, weight_dtype],
                ..OpSpec::new(&format!("mm{layer}"), "MatMulV2", "AIcoreEngine")
            });
        }
        ops.push(OpSpec::new("softmax", "SoftmaxV2", "AIcoreEngine"));
        if ai_cpu {
            ops.push(OpSpec::new("argmax", "ArgMaxV2", "aicpu_ascend_kernel"));
        }
        ops.push(OpSpec::new("out", "NetOutput", local));
        ops
    }

    fn sample_with_graph(ops: &[OpSpec]) -> Vec<u8> {
        let def = model_def("decode", "Ascend310B4", ops);
        om_file("decode", &[(0, def), (1, vec![1u8; 64])], true)
    }

    #[test]
    fn model_def_reads_back_fp16_int8_ai_cpu_and_external_weights() {
        let om = OmFile::parse(&sample_with_graph(&graph_ops(false, false, false))).unwrap();
        let graph = om.graphs().unwrap()[0];
        assert_eq!(graph.soc_version.as_deref(), Some("Ascend310B4"));
        assert_eq!(graph.op_counts()["MatMulV2"], 2);
        assert!(graph.ai_cpu_ops().is_empty());
        assert_eq!(
            graph.weight_dtypes()[&model_def::GeDataType::FLOAT16],
            (2, 2 * 64 * 96 * 2)
        );
        assert!(graph.external_files().is_empty());
        let text = graph.to_string();
        assert!(text.contains("no op fell back to the AI CPU"), "{text}");
        assert!(text.contains("external weight files: none"), "{text}");

        let om = OmFile::parse(&sample_with_graph(&graph_ops(true, false, false))).unwrap();
        let graph = om.graphs().unwrap()[0];
        let matmuls = graph.matmul_weight_dtypes();
        assert_eq!(matmuls.len(), 2);
        assert!(matmuls
            .iter()
            .all(|(_, d)| *d == model_def::GeDataType::INT8));
        assert_eq!(
            graph.weight_dtypes()[&model_def::GeDataType::INT8],
            (2, 2 * 64 * 96)
        );

        let om = OmFile::parse(&sample_with_graph(&graph_ops(false, true, false))).unwrap();
        let graph = om.graphs().unwrap()[0];
        assert_eq!(graph.ai_cpu_ops()[0].name, "argmax");
        assert!(graph
            .to_string()
            .contains("ArgMaxV2                     1  AI CPU   <-- AI CPU FALLBACK"));

        let om = OmFile::parse(&sample_with_graph(&graph_ops(true, false, true))).unwrap();
        let graph = om.graphs().unwrap()[0];
        let files: Vec<(&str, u64)> = graph.external_files().into_iter().collect();
        assert_eq!(files, [("weight_0", 64 * 96), ("weight_1", 64 * 96)]);
    }

    #[test]
    fn a_missing_or_corrupt_model_def_is_a_clear_error() {
        // No MODEL_DEF at all.
        let om = OmFile::parse(&om_file("x", &[(1, vec![0; 8])], true)).unwrap();
        assert!(om.graphs().unwrap_err().contains("no MODEL_DEF partition"));
        // Not protobuf (the old stand-in text).
        let om = OmFile::parse(&sample(true, true)).unwrap();
        let err = om.graphs().unwrap_err();
        assert!(
            err.contains("MODEL_DEF partition: not a GE ModelDef"),
            "{err}"
        );
        // Every truncation of a valid ModelDef, in a well-formed file.
        let def = model_def("decode", "Ascend310B4", &graph_ops(true, true, true));
        for len in 0..def.len() {
            let file = om_file("decode", &[(0, def[..len].to_vec())], true);
            match OmFile::parse(&file).unwrap().graphs() {
                Err(e) => assert!(e.contains("MODEL_DEF partition"), "{e}"),
                // A cut between two complete ops or attrs is itself valid
                // protobuf: then it must describe fewer ops, not garbage.
                Ok(graphs) => assert!(graphs[0].ops.len() <= 9),
            }
        }
    }

    /// Random byte changes and cuts of valid files with a MODEL_DEF: the
    /// reader returns an error or a description, never panics or hangs.
    /// 30 000 corrupted files and every cut, under a second in a test build;
    /// `KILN_OM_FUZZ_ROUNDS=N` runs N rounds instead (a longer fuzz).
    #[test]
    fn random_model_def_corruption_never_panics() {
        let rounds: usize = std::env::var("KILN_OM_FUZZ_ROUNDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(30_000);
        let files = [
            sample_with_graph(&graph_ops(true, true, true)),
            sample_with_graph(&graph_ops(false, false, false)),
        ];
        let mut state = 0x9e37_79b9u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            state
        };
        let mut described = 0;
        for round in 0..rounds {
            let good = &files[round % 2];
            let om = OmFile::parse(good).unwrap();
            let def = &om.models[0].partitions[0];
            let mut bad = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = def.start + (next() as usize >> 4) % def.size;
                bad[at] = (next() >> 11) as u8;
            }
            if let Ok(om) = OmFile::parse(&bad) {
                if let Ok(graphs) = om.graphs() {
                    described += 1;
                    let _ = graphs[0].to_string();
                }
            }
        }
        for good in &files {
            for len in 0..good.len() {
                let _ = OmFile::parse(&good[..len]).map(|om| om.graphs().map(|_| ()));
            }
        }
        // Most single-byte changes land in names or sizes and still decode.
        assert!(described > 1000, "only {described} corrupted files decoded");
    }

    #[test]
    fn random_corruption_never_panics() {
        let good = sample(true, true);
        let mut state = 0x1234_5678u32;
        for _ in 0..20_000 {
            let mut bad = good.clone();
            for _ in 0..3 {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let at = HEADER_LEN + (state as usize >> 8) % (bad.len() - HEADER_LEN);
                bad[at] = (state >> 3) as u8;
            }
            let _ = OmFile::parse(&bad);
        }
    }
}
