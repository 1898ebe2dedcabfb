//! The ONNX backend: each IR graph becomes one ONNX model in standard ops
//! that ATC accepts (checked against `allow_list`), with the weights as
//! initializers — inline, or in one external data file both graphs share.
//!
//! Weights are never all in memory at once: the model's small part (nodes,
//! constants, tensor headers) is encoded with onnx-protobuf, and the weight
//! bytes are converted and streamed into the file one tensor at a time.

pub mod allow_list;
pub mod builder;
mod ops;

use builder::{value_info, FloatType, GraphBuilder};
use kiln_runtime::ir::{DType, Graph, TensorType};
use kiln_runtime::weights::{WeightError, WeightStore};
use onnx_protobuf::tensor_proto::{DataLocation, DataType};
use onnx_protobuf::{
    GraphProto, Message, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
};
use protobuf::Enum;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MIN_OPSET: i64 = 13;
pub const MAX_OPSET: i64 = 18;
pub const DEFAULT_OPSET: i64 = 13;

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("opset {0} is not supported; Kiln emits opsets {MIN_OPSET} to {MAX_OPSET}")]
    Opset(i64),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding the ONNX model failed: {0}")]
    Encode(#[from] protobuf::Error),
    #[error("{0}")]
    NotAllowed(String),
}

#[derive(Clone, Copy, Debug)]
pub struct OnnxOptions {
    pub opset: i64,
    pub float: FloatType,
}

/// A lowered graph: everything but the weight bytes.
pub struct OnnxGraph {
    /// The model with the graph's nodes, inputs, outputs and small constants.
    pub model: ModelProto,
    /// The weight tensors the graph reads, by store name, in a fixed order.
    pub weights: Vec<String>,
}

impl OnnxGraph {
    pub fn node_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for node in &self.model.graph.node {
            *counts.entry(node.op_type.clone()).or_default() += 1;
        }
        counts
    }

    fn graph(&self) -> &GraphProto {
        self.model
            .graph
            .as_ref()
            .expect("lowered models have a graph")
    }

    /// Inputs or outputs as (name, dtype name, shape).
    pub fn signature(&self, outputs: bool) -> Vec<(String, &'static str, Vec<usize>)> {
        let values = if outputs {
            &self.graph().output
        } else {
            &self.graph().input
        };
        values
            .iter()
            .map(|v| {
                let onnx_protobuf::type_proto::Value::TensorType(t) =
                    v.type_.value.as_ref().expect("typed").clone()
                else {
                    unreachable!("only tensor values")
                };
                let dtype = match DataType::from_i32(t.elem_type) {
                    Some(DataType::INT64) => "int64",
                    Some(DataType::FLOAT16) => "float16",
                    _ => "float32",
                };
                let shape = t
                    .shape
                    .dim
                    .iter()
                    .map(|d| match d.value {
                        Some(onnx_protobuf::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                            v as usize
                        }
                        _ => 0,
                    })
                    .collect();
                (v.name.clone(), dtype, shape)
            })
            .collect()
    }
}

/// The ONNX IR version that goes with an opset (the oldest that allows it,
/// so older ATC releases read the file).
fn ir_version(opset: i64) -> i64 {
    if opset <= 13 {
        7
    } else {
        8
    }
}

fn onnx_type(ty: &TensorType, float: FloatType) -> DataType {
    match ty.dtype {
        DType::I64 => DataType::INT64,
        _ => float.data_type(),
    }
}

/// Lowers one IR graph. Each IR value is held by the ONNX value of the same
/// name (a lowering's temporaries get fresh `<node>/<n>` names), so ONNX
/// Runtime can output any IR value by name: `kiln diff --dump` relies on it.
pub fn lower(graph: &Graph, options: &OnnxOptions) -> Result<OnnxGraph, OnnxError> {
    if !(MIN_OPSET..=MAX_OPSET).contains(&options.opset) {
        return Err(OnnxError::Opset(options.opset));
    }
    let mut cx = ops::Cx {
        b: GraphBuilder::default(),
        float: options.float,
        opset: options.opset,
    };
    for node in &graph.nodes {
        ops::lower_node(&mut cx, graph, node)?;
    }
    let io = |ids: &[kiln_runtime::ir::ValueId]| {
        ids.iter()
            .map(|&id| {
                let v = graph.value(id);
                value_info(&v.name, onnx_type(&v.ty, options.float), &v.ty.shape)
            })
            .collect::<Vec<_>>()
    };
    let weights: Vec<String> = graph
        .weights()
        .map(|(_, tensor)| tensor.to_string())
        .collect();
    let graph_proto = GraphProto {
        name: graph.name.clone(),
        node: cx.b.nodes,
        initializer: cx.b.constants,
        input: io(&graph.inputs),
        output: io(&graph.outputs),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: ir_version(options.opset),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: options.opset,
            ..Default::default()
        }],
        producer_name: "kiln".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph_proto).into(),
        ..Default::default()
    };
    Ok(OnnxGraph { model, weights })
}

/// Where weight bytes go.
pub enum WeightPlacement<'a> {
    /// Inside the .onnx file (must stay under protobuf's 2 GiB limit).
    Inline,
    /// In a shared external data file, at the offsets recorded by the first
    /// graph written (the second graph reuses them).
    External(&'a mut ExternalData),
}

/// One external data file shared by every graph of a compiled model.
pub struct ExternalData {
    pub path: PathBuf,
    /// File name as written into the models (relative to them).
    pub location: String,
    offsets: BTreeMap<String, (u64, u64)>,
    written: u64,
}

impl ExternalData {
    pub fn new(path: PathBuf) -> ExternalData {
        let location = path
            .file_name()
            .expect("a file path")
            .to_string_lossy()
            .into_owned();
        ExternalData {
            path,
            location,
            offsets: BTreeMap::new(),
            written: 0,
        }
    }
}

/// What writing a graph produced.
pub struct Written {
    pub onnx_bytes: u64,
    pub weight_bytes: u64,
    /// SHA-256 of the converted weight bytes, in the graph's weight order.
    pub weights_sha256: String,
}

/// Converts one weight to the model's float type, as little-endian bytes.
fn weight_bytes(
    store: &WeightStore,
    name: &str,
    float: FloatType,
) -> Result<(TensorType, Vec<u8>), OnnxError> {
    let ty = store.tensor_type(name)?;
    let bytes = match (ty.dtype, float) {
        (DType::F32, FloatType::F32) | (DType::F16, FloatType::F16) => store.bytes(name)?.to_vec(),
        _ => float.encode(store.to_f32_tensor(name)?.f32s()),
    };
    Ok((ty, bytes))
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// `tag + length` of a length-delimited protobuf field.
fn field_header(field: u32, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(((field as u64) << 3) | 2, &mut out);
    varint(len, &mut out);
    out
}

const MODEL_GRAPH_FIELD: u32 = 7;
const GRAPH_INITIALIZER_FIELD: u32 = 5;
const TENSOR_RAW_DATA_FIELD: u32 = 9;

/// Writes a lowered graph to `path` with its weights, streaming them.
///
/// The protobuf encoding of a message is the concatenation of its fields in
/// any order, so the file is: the model's other fields, then the graph field
/// whose content is the small graph followed by one initializer entry per
/// weight — each a tensor header followed by its raw bytes. Lengths are known
/// up front from the shapes, so nothing needs buffering.
pub fn write(
    path: &Path,
    lowered: &OnnxGraph,
    store: &WeightStore,
    float: FloatType,
    mut placement: WeightPlacement,
    mut progress: impl FnMut(usize, usize),
) -> Result<Written, OnnxError> {
    let io = |source| OnnxError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut model = lowered.model.clone();
    let graph = model.graph.take().expect("lowered models have a graph");
    let model_rest = model.write_to_bytes()?;
    let graph_rest = graph.write_to_bytes()?;

    // Tensor headers (everything but raw bytes) and sizes, without data.
    let mut headers = Vec::with_capacity(lowered.weights.len());
    for name in &lowered.weights {
        let ty = store.tensor_type(name)?;
        let len = (ty.numel() * float.size_bytes()) as u64;
        let mut tensor = TensorProto {
            name: name.clone(),
            data_type: float.data_type() as i32,
            dims: ty.shape.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        };
        if let WeightPlacement::External(external) = &placement {
            let offset = external.offsets.get(name).map(|&(o, _)| o);
            let offset = offset.unwrap_or(
                external.written + headers.iter().map(|h: &Header| h.external_len).sum::<u64>(),
            );
            tensor.data_location = DataLocation::EXTERNAL.into();
            for (key, value) in [
                ("location", external.location.clone()),
                ("offset", offset.to_string()),
                ("length", len.to_string()),
            ] {
                tensor.external_data.push(StringStringEntryProto {
                    key: key.into(),
                    value,
                    ..Default::default()
                });
            }
            let new = !external.offsets.contains_key(name);
            headers.push(Header {
                bytes: tensor.write_to_bytes()?,
                raw_len: 0,
                external_len: if new { len } else { 0 },
            });
        } else {
            headers.push(Header {
                bytes: tensor.write_to_bytes()?,
                raw_len: len,
                external_len: 0,
            });
        }
    }
    let entry_len = |h: &Header| {
        let raw_field = if h.raw_len > 0 {
            field_header(TENSOR_RAW_DATA_FIELD, h.raw_len).len() as u64 + h.raw_len
        } else {
            0
        };
        h.bytes.len() as u64 + raw_field
    };
    let graph_len = graph_rest.len() as u64
        + headers
            .iter()
            .map(|h| {
                let len = entry_len(h);
                field_header(GRAPH_INITIALIZER_FIELD, len).len() as u64 + len
            })
            .sum::<u64>();

    let file = std::fs::File::create(path).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&model_rest).map_err(io)?;
    out.write_all(&field_header(MODEL_GRAPH_FIELD, graph_len))
        .map_err(io)?;
    out.write_all(&graph_rest).map_err(io)?;

    let mut external_file = match &mut placement {
        WeightPlacement::External(external) if headers.iter().any(|h| h.external_len > 0) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&external.path)
                .map_err(|source| OnnxError::Io {
                    path: external.path.clone(),
                    source,
                })?;
            Some(std::io::BufWriter::with_capacity(1 << 20, f))
        }
        _ => None,
    };
    let mut hasher = Sha256::new();
    let mut weight_total = 0u64;
    let count = lowered.weights.len();
    for (i, (name, header)) in lowered.weights.iter().zip(&headers).enumerate() {
        progress(i, count);
        let len = entry_len(header);
        out.write_all(&field_header(GRAPH_INITIALIZER_FIELD, len))
            .map_err(io)?;
        out.write_all(&header.bytes).map_err(io)?;
        let (_, bytes) = weight_bytes(store, name, float)?;
        store.release(name);
        hasher.update(&bytes);
        weight_total += bytes.len() as u64;
        if header.raw_len > 0 {
            out.write_all(&field_header(TENSOR_RAW_DATA_FIELD, header.raw_len))
                .map_err(io)?;
            out.write_all(&bytes).map_err(io)?;
        } else if header.external_len > 0 {
            let WeightPlacement::External(external) = &mut placement else {
                unreachable!()
            };
            let file = external_file.as_mut().expect("opened above");
            file.write_all(&bytes).map_err(|source| OnnxError::Io {
                path: external.path.clone(),
                source,
            })?;
            external
                .offsets
                .insert(name.clone(), (external.written, bytes.len() as u64));
            external.written += bytes.len() as u64;
        }
    }
    progress(count, count);
    if let Some(mut f) = external_file {
        f.flush().map_err(io)?;
    }
    out.flush().map_err(io)?;
    let onnx_bytes = std::fs::metadata(path).map_err(io)?.len();
    Ok(Written {
        onnx_bytes,
        weight_bytes: weight_total,
        weights_sha256: format!("{:x}", hasher.finalize()),
    })
}

struct Header {
    bytes: Vec<u8>,
    /// Bytes of inline raw data to follow the header (0 when external).
    raw_len: u64,
    /// Bytes this tensor adds to the external file (0 if inline or already there).
    external_len: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::ir::ops::{Add, Linear, RmsNorm, Silu};
    use kiln_runtime::ir::GraphBuilder;

    #[test]
    fn every_ir_value_keeps_its_name_in_onnx() {
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", TensorType::f32([1, 2, 8]));
        let norm = b.weight("norm.weight", TensorType::f32([8]));
        let w = b.weight("proj.weight", TensorType::f32([8, 8]));
        let h = b.node("norm", RmsNorm { eps: 1e-6 }, &[x, norm]).unwrap();
        let p = b.node("proj", Linear, &[h, w]).unwrap();
        let a = b.node("act", Silu, &[p]).unwrap();
        let r = b.node("residual", Add, &[x, a]).unwrap();
        b.output(r, "out");
        let graph = b.finish().unwrap();
        for float in [FloatType::F32, FloatType::F16] {
            let lowered = lower(&graph, &OnnxOptions { opset: 13, float }).unwrap();
            let outputs: Vec<&str> = lowered
                .graph()
                .node
                .iter()
                .flat_map(|n| n.output.iter().map(String::as_str))
                .collect();
            for node in &graph.nodes {
                let name = graph.value(node.output).name.as_str();
                assert_eq!(
                    outputs.iter().filter(|&&o| o == name).count(),
                    1,
                    "{name} in {outputs:?}"
                );
            }
        }
    }
}
