//! The ONNX backend: each IR graph becomes one ONNX model in standard ops
//! that ATC accepts (checked against `allow_list`), with the weights as
//! initializers — inline, or in one external data file both graphs share.
//!
//! Weights are never all in memory at once: the model's small part (nodes,
//! constants, tensor headers) is encoded with onnx-protobuf, and the weight
//! bytes are converted once and streamed into the files one tensor at a time.

pub mod allow_list;
pub mod builder;
mod ops;

use builder::{value_info, FloatType, GraphBuilder};
use kiln_runtime::compiled::weights_bin::{self, Recipe, WeightsBinError};
use kiln_runtime::ir::{DType, Graph, TensorType};
use kiln_runtime::weights::{WeightError, WeightStore};
use onnx_protobuf::tensor_proto::{DataLocation, DataType};
use onnx_protobuf::{
    GraphProto, Message, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
};
use protobuf::Enum;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    #[error("{node}: {what} has no form in ATC's own operators (only --quant w8a8 does)")]
    NoAscendForm { node: String, what: String },
    #[error(transparent)]
    Kernel(#[from] crate::backend::ascendc::AscendcError),
    #[error(
        "{file}: weight `{tensor}` has max |value| {max_abs:e}, outside float16's range (largest \
         finite value 65504): the graphs hold their weights in float16 (--dtype fp16), where it \
         would be inf. Compile with --dtype fp32, or, for a Linear layer's weight, --quant w8a8 (its int8 \
         weights keep float16 scales, up to 127 × 65504)"
    )]
    OutOfHalfRange {
        tensor: String,
        max_abs: f32,
        file: PathBuf,
    },
    #[error(transparent)]
    WeightsBin(WeightsBinError),
    #[error(
        "--residual-dtype f32 cannot be used with --kernels ascendc: the Add + RMSNorm kernel \
         keeps the residual stream in float16 (use --residual-dtype fp16, or --kernels onnx)"
    )]
    ResidualWithKernels,
}

impl From<WeightsBinError> for OnnxError {
    /// The compile's own words for a weight float16 cannot hold.
    fn from(e: WeightsBinError) -> Self {
        match e {
            WeightsBinError::OutOfHalfRange {
                tensor,
                max_abs,
                file,
            } => OnnxError::OutOfHalfRange {
                tensor,
                max_abs,
                file,
            },
            WeightsBinError::Weights(e) => OnnxError::Weights(e),
            e => OnnxError::WeightsBin(e),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct OnnxOptions {
    pub opset: i64,
    pub float: FloatType,
    /// How quantized ops are spelled.
    pub quant_ops: QuantOps,
    /// Lower the nodes that have an Ascend C kernel for this target to
    /// custom-domain nodes (`ai.kiln`) that the generated package serves.
    pub kernels: Option<crate::backend::ascendc::Target>,
    /// The residual stream's type: `F32` keeps it in f32 around the blocks
    /// of an fp16 graph (see `ops/residual.rs`); ignored in an f32 graph.
    pub residual: FloatType,
}

/// The two spellings of a quantized op: one IR node, lowered twice to the
/// same numbers (see `ops/quant.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuantOps {
    /// Standard ONNX (`MatMulInteger`, integer `Div`…), for ONNX Runtime.
    #[default]
    Standard,
    /// ATC's own `AscendQuant` → int8 `MatMul` → `AscendDequant`, for the
    /// graphs ATC converts; only `w8a8` has this form (no stock ATC op keeps
    /// weight-only low-bit weights in device memory on the 310B).
    Ascend,
}

/// A weight initializer the graph holds in another form than the store
/// does, computed from store tensors while the weights are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Derived {
    /// The i8 `[N, K]` store tensor `source` transposed to `[K, N]`: the
    /// right operand of an int8 `MatMul`.
    TransposedI8 { source: String },
    /// `AscendDequant`'s uint64 `deq_scale [N]` from the f16 per-channel
    /// scales `scale [N, 1]` (see [`deq_scale`]), int8 weight offset 0.
    DeqScale { scale: String },
    /// Rows `start..end` of the store tensor `source` (a column chunk of a
    /// wide GEMV's weights, scales or mins), as stored when quantized.
    Rows {
        source: String,
        start: usize,
        end: usize,
    },
}

impl Derived {
    /// The recipe `weights.bin` records for this initializer: the runtime
    /// makes its bytes, at compile time and when the file is expanded.
    pub fn recipe(&self) -> Recipe {
        match self.clone() {
            Derived::TransposedI8 { source } => Recipe::TransposedI8 { source },
            Derived::DeqScale { scale } => Recipe::DeqScale { scale },
            Derived::Rows { source, start, end } => Recipe::Rows { source, start, end },
        }
    }
}

/// The recipe of an initializer that is `derived`, or a store tensor.
pub fn recipe(derived: Option<&Derived>) -> Recipe {
    derived.map_or(Recipe::Tensor, Derived::recipe)
}

/// A lowered graph: everything but the weight bytes.
pub struct OnnxGraph {
    /// The model with the graph's nodes, inputs, outputs and small constants.
    pub model: ModelProto,
    /// The weight initializers the graph reads, by store name (or a name of
    /// `derived`), in a fixed order.
    pub weights: Vec<String>,
    /// The initializers computed from store tensors, by name.
    pub derived: BTreeMap<String, Derived>,
    /// The Ascend C kernel instances the custom-domain nodes call, with
    /// their calls per step (empty without `OnnxOptions::kernels`).
    pub kernels: crate::backend::ascendc::KernelPlan,
}

pub use kiln_runtime::compiled::weights_bin::deq_scale;

/// Whether `deq_scale` keeps `scale` exactly: true of every f16 value (10
/// mantissa bits), which is what the quantizer stores.
pub fn deq_scale_is_exact(scale: f32) -> bool {
    f32::from_bits(deq_scale(scale, 0) as u32).to_bits() == scale.to_bits()
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
    let residual_f32 = options.float == FloatType::F16 && options.residual == FloatType::F32;
    if residual_f32 && options.kernels.is_some() {
        return Err(OnnxError::ResidualWithKernels);
    }
    let mut cx = ops::Cx {
        residual_f32,
        wide: HashSet::new(),
        b: GraphBuilder::default(),
        float: options.float,
        opset: options.opset,
        quant_ops: options.quant_ops,
        weight_tensors: graph
            .weights()
            .map(|(id, tensor)| (graph.value(id).name.clone(), tensor.to_string()))
            .collect(),
        derived: BTreeMap::new(),
    };
    let assigned = match options.kernels {
        Some(target) => ops::kernels::assign(graph, target)?,
        None => ops::kernels::Assigned::none(graph),
    };
    let mut kernels = crate::backend::ascendc::KernelPlan {
        skipped: assigned.skipped.clone(),
        ..Default::default()
    };
    for (index, node) in graph.nodes.iter().enumerate() {
        if assigned.absorbed.contains(&index) {
            continue; // computed by the Add + RMSNorm kernel of a later node
        }
        match &assigned.calls[index] {
            Some(calls) => ops::kernels::lower(&mut cx, graph, index, calls, &mut kernels)?,
            None => ops::lower_node(&mut cx, graph, node)?,
        }
    }
    let io = |ids: &[kiln_runtime::ir::ValueId]| {
        ids.iter()
            .map(|&id| {
                let v = graph.value(id);
                value_info(&v.name, onnx_type(&v.ty, options.float), &v.ty.shape)
            })
            .collect::<Vec<_>>()
    };
    // The weights some node reads (the Ascend form reads some only through
    // a derived initializer), then the derived ones.
    let read: HashSet<&str> =
        cx.b.nodes
            .iter()
            .flat_map(|n| n.input.iter().map(String::as_str))
            .collect();
    let mut weights: Vec<String> = graph
        .weights()
        .filter(|&(id, _)| read.contains(graph.value(id).name.as_str()))
        .map(|(_, tensor)| tensor.to_string())
        .collect();
    weights.extend(cx.derived.keys().cloned());
    let derived = std::mem::take(&mut cx.derived);
    let mut opset_import = vec![OperatorSetIdProto {
        domain: String::new(),
        version: options.opset,
        ..Default::default()
    }];
    if !kernels.requests.is_empty() {
        opset_import.push(OperatorSetIdProto {
            domain: crate::backend::ascendc::ONNX_DOMAIN.into(),
            version: crate::backend::ascendc::ONNX_DOMAIN_VERSION,
            ..Default::default()
        });
    }
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
        opset_import,
        producer_name: "kiln".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph_proto).into(),
        ..Default::default()
    };
    Ok(OnnxGraph {
        model,
        weights,
        derived,
        kernels,
    })
}

/// Where weight bytes go.
#[derive(Clone, Copy, Debug)]
pub enum WeightPlacement<'a> {
    /// Inside each .onnx file (must stay under protobuf's 2 GiB limit).
    Inline,
    /// In one external data file at this path, which every graph references
    /// by its file name: each tensor is written there once.
    External(&'a Path),
    /// Laid out as [`Self::External`], but the file is not written: its
    /// bytes are only hashed (`kiln-run expand-weights` makes it from the
    /// reference weights by the same recipes).
    Unwritten(&'a Path),
    /// The initializers `existing` names reference those bytes, already in
    /// files beside the graphs; the others go into one external data file at
    /// `rest`, made only when there are any.
    Reuse {
        existing: &'a HashMap<String, StoredBytes>,
        rest: &'a Path,
    },
}

/// Where an initializer's bytes are in an external data file beside the
/// graphs (ONNX's `location`, `offset` and `length`:
/// https://onnx.ai/onnx/repo-docs/ExternalData.html). ONNX Runtime reads
/// unaligned offsets too; it memory-maps only those aligned to the page
/// size, and copies the others (`ModelSavingOptions` in
/// https://github.com/microsoft/onnxruntime/blob/main/include/onnxruntime/core/graph/model_saving_options.h).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBytes {
    /// The file's name, in the graphs' directory.
    pub file: String,
    pub offset: u64,
    pub len: u64,
}

/// What writing the graphs produced.
pub struct Written {
    /// Bytes of converted weights, each tensor counted once.
    pub weight_bytes: u64,
    /// SHA-256 of the converted weight bytes in the order written: the first
    /// graph's weights, then those only later graphs read (with
    /// `WeightPlacement::Reuse`, only those not already stored).
    pub weights_sha256: String,
    /// Each weight's place in the external data (empty when inline).
    pub stored: HashMap<String, StoredBytes>,
    /// The weights converted, in the order written (that of the external
    /// data file).
    pub order: Vec<String>,
}

/// Whether a weight's initializer holds the store tensor's bytes unchanged
/// (so a file that holds the tensor as stored can serve the graph).
pub fn stored_as_is(store: &WeightStore, name: &str, float: FloatType) -> bool {
    weights_bin::stored_as_is(store, name, float.dtype())
}

/// One weight converted to the model's float type (borrowed from the store
/// when it already is), on its way to the sinks.
struct Chunk<'s> {
    name: &'s str,
    bytes: Cow<'s, [u8]>,
    store: &'s WeightStore,
}

impl<'s> Chunk<'s> {
    /// Quantized weights go as stored (their f16 scales were checked when
    /// quantized); so do floats already in the graph's type (unless
    /// computed when read, as dequantized ones are). Whatever becomes fp16
    /// is checked against its range. The bytes come from the runtime's
    /// [`weights_bin::initializer_bytes`], which `kiln-run expand-weights`
    /// runs too.
    fn convert(
        store: &'s WeightStore,
        name: &'s str,
        derived: Option<&Derived>,
        float: FloatType,
    ) -> Result<Self, OnnxError> {
        let bytes = weights_bin::initializer_bytes(store, name, &recipe(derived), float.dtype())?;
        Ok(Chunk { name, bytes, store })
    }
}

/// The bytes of a derived initializer.
#[cfg(test)]
fn derive(store: &WeightStore, derived: &Derived, float: FloatType) -> Result<Vec<u8>, OnnxError> {
    let bytes = weights_bin::initializer_bytes(store, "", &derived.recipe(), float.dtype())?;
    Ok(bytes.into_owned())
}

/// The dims, byte length and ONNX type of initializer `name` of a graph.
pub fn initializer_layout(
    name: &str,
    derived: Option<&Derived>,
    store: &WeightStore,
    float: FloatType,
) -> Result<(Vec<i64>, u64, DataType), OnnxError> {
    Ok(match derived {
        None => initializer_type(&store.tensor_type(name)?, float),
        Some(Derived::TransposedI8 { source }) => {
            let ty = store.tensor_type(source)?;
            let dims = vec![ty.shape[1] as i64, ty.shape[0] as i64];
            (dims, ty.numel() as u64, DataType::INT8)
        }
        Some(Derived::DeqScale { scale }) => {
            let n = store.tensor_type(scale)?.shape[0];
            (vec![n as i64], 8 * n as u64, DataType::UINT64)
        }
        Some(Derived::Rows { source, start, end }) => {
            let mut ty = store.tensor_type(source)?;
            ty.shape[0] = end - start;
            initializer_type(&ty, float)
        }
    })
}

impl Drop for Chunk<'_> {
    /// The last sink is done with a borrowed tensor: its pages may go.
    fn drop(&mut self) {
        if matches!(self.bytes, Cow::Borrowed(_)) {
            self.store.release(self.name);
        }
    }
}

/// A consumer of the weight stream, on its own thread.
enum Sink<'a> {
    Hash(Sha256),
    /// An .onnx file's initializers: for each weight the graph reads, the
    /// entry's header (ending in the raw-data field's header), then the bytes.
    Inline {
        out: std::io::BufWriter<std::fs::File>,
        path: &'a Path,
        entries: HashMap<&'a str, Vec<u8>>,
    },
    /// The external data file: every weight's bytes, in order.
    External {
        out: std::io::BufWriter<std::fs::File>,
        path: &'a Path,
    },
}

impl Sink<'_> {
    fn take(&mut self, chunk: &Chunk) -> Result<(), OnnxError> {
        match self {
            Sink::Hash(hasher) => hasher.update(&chunk.bytes),
            Sink::Inline { out, path, entries } => {
                if let Some(entry) = entries.get(chunk.name) {
                    out.write_all(entry)
                        .and_then(|()| out.write_all(&chunk.bytes))
                        .map_err(io_err(path))?;
                }
            }
            Sink::External { out, path } => out.write_all(&chunk.bytes).map_err(io_err(path))?,
        }
        Ok(())
    }

    /// Flushes a file; the hash for the hasher.
    fn finish(self) -> Result<Option<String>, OnnxError> {
        match self {
            Sink::Hash(hasher) => Ok(Some(format!("{:x}", hasher.finalize()))),
            Sink::Inline { mut out, path, .. } | Sink::External { mut out, path } => {
                out.flush().map_err(io_err(path))?;
                Ok(None)
            }
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OnnxError + '_ {
    move |source| OnnxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn create(path: &Path) -> Result<std::io::BufWriter<std::fs::File>, OnnxError> {
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    Ok(std::io::BufWriter::with_capacity(1 << 20, file))
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends `tag + length` of a length-delimited protobuf field.
fn field_header(field: u32, len: u64, out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | 2, out);
    varint(len, out);
}

const MODEL_GRAPH_FIELD: u32 = 7;
const GRAPH_INITIALIZER_FIELD: u32 = 5;
const TENSOR_RAW_DATA_FIELD: u32 = 9;

/// Each external weight's file and offset.
type ExternalLayout = HashMap<String, StoredBytes>;

/// A graph's file without the weight bytes.
struct FileLayout<'a> {
    /// The bytes before the first initializer.
    prefix: Vec<u8>,
    /// Each weight's initializer entry but for the raw data (which, inline,
    /// follows the entry).
    entries: HashMap<&'a str, Vec<u8>>,
}

/// Lays out a graph's file.
///
/// The protobuf encoding of a message is the concatenation of its fields in
/// any order, so the file is: the model's other fields, then the graph field
/// whose content is the small graph followed by one initializer entry per
/// weight, in any order. Lengths are known up front from the shapes, so
/// nothing needs buffering.
fn layout<'a>(
    lowered: &'a OnnxGraph,
    shapes: &HashMap<&str, (Vec<i64>, u64, DataType)>,
    external: Option<&ExternalLayout>,
) -> Result<FileLayout<'a>, OnnxError> {
    let mut model = lowered.model.clone();
    let graph = model.graph.take().expect("lowered models have a graph");
    let mut prefix = model.write_to_bytes()?;
    let graph_rest = graph.write_to_bytes()?;

    let mut entries = HashMap::with_capacity(lowered.weights.len());
    let mut graph_len = graph_rest.len() as u64;
    for name in &lowered.weights {
        let (dims, len, data_type) = &shapes[name.as_str()];
        let mut tensor = TensorProto {
            name: name.clone(),
            data_type: *data_type as i32,
            dims: dims.clone(),
            ..Default::default()
        };
        // Inline, the raw-data field follows the header; external, none does.
        let raw_len = match external {
            None => *len,
            Some(external) => {
                tensor.data_location = DataLocation::EXTERNAL.into();
                let stored = &external[name.as_str()];
                debug_assert_eq!(stored.len, *len, "{name}");
                for (key, value) in [
                    ("location", stored.file.clone()),
                    ("offset", stored.offset.to_string()),
                    ("length", len.to_string()),
                ] {
                    tensor.external_data.push(StringStringEntryProto {
                        key: key.into(),
                        value,
                        ..Default::default()
                    });
                }
                0
            }
        };
        let header = tensor.write_to_bytes()?;
        let mut raw_field = Vec::new();
        if raw_len > 0 {
            field_header(TENSOR_RAW_DATA_FIELD, raw_len, &mut raw_field);
        }
        let tensor_len = header.len() as u64 + raw_field.len() as u64 + raw_len;
        let mut entry = Vec::with_capacity(header.len() + raw_field.len() + 10);
        field_header(GRAPH_INITIALIZER_FIELD, tensor_len, &mut entry);
        graph_len += entry.len() as u64 + tensor_len;
        entry.extend_from_slice(&header);
        entry.extend_from_slice(&raw_field);
        entries.insert(name.as_str(), entry);
    }
    field_header(MODEL_GRAPH_FIELD, graph_len, &mut prefix);
    prefix.extend_from_slice(&graph_rest);
    Ok(FileLayout { prefix, entries })
}

/// How a weight is stored as an initializer: dims, bytes, type. Floats take
/// the graph's type; i8 is INT8; u4 is UINT8 with two values per byte along
/// the last axis (ONNX's own UINT4 needs opset 21, which ATC does not read).
pub fn initializer_type(ty: &TensorType, float: FloatType) -> (Vec<i64>, u64, DataType) {
    let mut dims: Vec<i64> = ty.shape.iter().map(|&d| d as i64).collect();
    match ty.dtype {
        DType::I8 => (dims, ty.size_bytes() as u64, DataType::INT8),
        DType::U4 => {
            if let Some(last) = dims.last_mut() {
                *last /= 2;
            }
            (dims, ty.size_bytes() as u64, DataType::UINT8)
        }
        _ => (
            dims,
            (ty.numel() * float.size_bytes()) as u64,
            float.data_type(),
        ),
    }
}

/// Writes lowered graphs, each to its path, with their weights.
///
/// Weights are never all in memory: one pass over them converts each tensor
/// once and hands it to one thread per file it goes to (every .onnx file when
/// inline, the external data file otherwise) and one that hashes it; the
/// channels between hold a few tensors at most.
pub fn write(
    graphs: &[(&Path, &OnnxGraph)],
    store: &WeightStore,
    float: FloatType,
    placement: WeightPlacement,
    mut progress: impl FnMut(usize, usize),
) -> Result<Written, OnnxError> {
    let mut order: Vec<&str> = Vec::new();
    let mut seen = HashSet::new();
    let mut derived: HashMap<&str, &Derived> = HashMap::new();
    for (_, graph) in graphs {
        for name in &graph.weights {
            if seen.insert(name.as_str()) {
                order.push(name);
            }
        }
        derived.extend(graph.derived.iter().map(|(n, d)| (n.as_str(), d)));
    }
    // Each weight's dims, converted length and ONNX type.
    let mut shapes = HashMap::with_capacity(order.len());
    for &name in &order {
        let layout = initializer_layout(name, derived.get(name).copied(), store, float)?;
        shapes.insert(name, layout);
    }
    // The external data: weights already stored elsewhere keep their place;
    // the others (the ones streamed below) follow each other in one file.
    let (external_file, existing) = match placement {
        WeightPlacement::Inline => (None, None),
        WeightPlacement::External(path) | WeightPlacement::Unwritten(path) => (Some(path), None),
        WeightPlacement::Reuse { existing, rest } => (Some(rest), Some(existing)),
    };
    if let Some(existing) = existing {
        for &name in &order {
            if let Some(stored) = existing.get(name) {
                if stored.len != shapes[name].1 {
                    return Err(OnnxError::Io {
                        path: PathBuf::from(&stored.file),
                        source: std::io::Error::other(format!(
                            "`{name}` is stored as {} bytes, its initializer has {}",
                            stored.len, shapes[name].1
                        )),
                    });
                }
            }
        }
        order.retain(|name| !existing.contains_key(*name));
    }
    let external: Option<ExternalLayout> = external_file.map(|path| {
        let file = path
            .file_name()
            .expect("a file path")
            .to_string_lossy()
            .into_owned();
        let mut layout = existing.cloned().unwrap_or_default();
        let mut offset = 0;
        for &name in &order {
            let len = shapes[name].1;
            let stored = StoredBytes {
                file: file.clone(),
                offset,
                len,
            };
            layout.insert(name.to_string(), stored);
            offset += len;
        }
        layout
    });

    let mut sinks = vec![Sink::Hash(Sha256::new())];
    for &(path, graph) in graphs {
        let FileLayout { prefix, entries } = layout(graph, &shapes, external.as_ref())?;
        let mut out = create(path)?;
        out.write_all(&prefix).map_err(io_err(path))?;
        match placement {
            WeightPlacement::Inline => sinks.push(Sink::Inline { out, path, entries }),
            WeightPlacement::External(_)
            | WeightPlacement::Unwritten(_)
            | WeightPlacement::Reuse { .. } => {
                for name in &graph.weights {
                    out.write_all(&entries[name.as_str()])
                        .map_err(io_err(path))?;
                }
                Sink::Inline { out, path, entries }.finish()?;
            }
        }
    }
    let unwritten = matches!(placement, WeightPlacement::Unwritten(_));
    if let Some(path) = external_file.filter(|_| !order.is_empty() && !unwritten) {
        sinks.push(Sink::External {
            out: create(path)?,
            path,
        });
    }

    let count = order.len();
    let weights_sha256 = std::thread::scope(|s| {
        let mut senders = Vec::with_capacity(sinks.len());
        let mut threads = Vec::with_capacity(sinks.len());
        for mut sink in sinks {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Chunk>>(4);
            senders.push(tx);
            threads.push(s.spawn(move || {
                for chunk in rx {
                    sink.take(&chunk)?;
                }
                sink.finish()
            }));
        }
        let mut converted = Ok(());
        for (i, &name) in order.iter().enumerate() {
            progress(i, count);
            match Chunk::convert(store, name, derived.get(name).copied(), float) {
                Ok(chunk) => {
                    let chunk = Arc::new(chunk);
                    // A sink that hung up failed: its error is returned below.
                    if senders.iter().any(|tx| tx.send(chunk.clone()).is_err()) {
                        break;
                    }
                }
                Err(e) => {
                    converted = Err(e);
                    break;
                }
            }
        }
        drop(senders);
        let mut hash = None;
        for thread in threads {
            let finished = thread.join().expect("a weight writer panicked")?;
            hash = hash.or(finished);
        }
        converted?;
        progress(count, count);
        Ok::<_, OnnxError>(hash.expect("the hasher finishes with a hash"))
    })?;
    Ok(Written {
        weight_bytes: order.iter().map(|name| shapes[name].1).sum(),
        weights_sha256,
        stored: external.unwrap_or_default(),
        order: order.iter().map(|n| n.to_string()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::ir::ops::{Add, Linear, RmsNorm, Silu};
    use kiln_runtime::ir::GraphBuilder;

    /// A `w8a8` layer with an input scale and a bias, in both spellings:
    /// the Ascend form scales `x` before quantizing it, reads the weight and
    /// scales only through derived initializers, and passes the ATC list at
    /// opset 13 (not at 17, past AscendDequant's documented range).
    #[test]
    fn w8a8_has_an_ascend_form_and_weight_only_has_none() {
        use kiln_runtime::ir::ops::QuantLinear;
        use kiln_runtime::ir::quant::{ActivationQuant, WeightQuant};
        let graph = |activations: ActivationQuant| {
            let mut b = GraphBuilder::new("g");
            let x = b.input("x", TensorType::f32([1, 2, 64]));
            let q = b.weight("q", TensorType::new(DType::I8, [8, 64]));
            let s = b.weight("s", TensorType::new(DType::F16, [8, 1]));
            let smooth = b.weight("smooth", TensorType::f32([64]));
            let bias = b.weight("bias", TensorType::f32([8]));
            let op = QuantLinear {
                weights: WeightQuant {
                    bits: 8,
                    group_size: 64,
                    offset: false,
                },
                activations,
                input_scale: true,
                bias: true,
            };
            let y = b.node("proj", op, &[x, q, s, smooth, bias]).unwrap();
            b.output(y, "y");
            b.finish().unwrap()
        };
        let options = |opset, quant_ops| OnnxOptions {
            opset,
            float: FloatType::F16,
            quant_ops,
            kernels: None,
            residual: FloatType::F32,
        };
        let w8a8 = graph(ActivationQuant::DynamicInt8PerToken);
        let ascend = lower(&w8a8, &options(13, QuantOps::Ascend)).unwrap();
        let nodes = &ascend.graph().node;
        assert_eq!(nodes[0].op_type, "Mul");
        assert_eq!(nodes[0].input, ["x", "smooth"]);
        let ops: Vec<&str> = nodes.iter().map(|n| n.op_type.as_str()).collect();
        let at = |op: &str| ops.iter().position(|&o| o == op).unwrap();
        assert!(at("AscendQuant") < at("MatMul") && at("MatMul") < at("AscendDequant"));
        assert!(!ops.contains(&"MatMulInteger"), "{ops:?}");
        assert_eq!(
            ascend.derived,
            BTreeMap::from([
                (
                    "q.transposed".to_string(),
                    Derived::TransposedI8 { source: "q".into() }
                ),
                (
                    "s.deq_scale".to_string(),
                    Derived::DeqScale { scale: "s".into() }
                ),
            ])
        );
        assert_eq!(
            ascend.weights,
            ["smooth", "bias", "q.transposed", "s.deq_scale"]
        );
        allow_list::atc().check(&ascend.model, "g").unwrap();
        let at_17 = lower(&w8a8, &options(17, QuantOps::Ascend)).unwrap();
        let err = allow_list::atc().check(&at_17.model, "g").unwrap_err();
        assert!(err.to_string().contains("AscendDequant"), "{err}");

        let standard = lower(&w8a8, &options(13, QuantOps::Standard)).unwrap();
        assert!(standard.derived.is_empty());
        assert_eq!(standard.weights, ["q", "s", "smooth", "bias"]);
        let ops: Vec<&str> = standard
            .graph()
            .node
            .iter()
            .map(|n| n.op_type.as_str())
            .collect();
        assert!(ops.contains(&"MatMulInteger") && !ops.contains(&"AscendQuant"));

        let weight_only = graph(ActivationQuant::None);
        let err = lower(&weight_only, &options(13, QuantOps::Ascend))
            .err()
            .expect("weight-only has no Ascend form");
        assert!(matches!(err, OnnxError::NoAscendForm { .. }), "{err}");
    }

    /// The layout AMCT documents, on words worked out by hand.
    #[test]
    fn deq_scale_words_follow_the_documented_bit_layout() {
        // 1.0f32 = 0x3F800000: the low word; no offset.
        assert_eq!(deq_scale(1.0, 0), 0x0000_0000_3F80_0000);
        // -2.5 = 0xC0200000; offset -3 = 0xFD in bits 47..40.
        assert_eq!(deq_scale(-2.5, -3), 0x0000_FD00_C020_0000);
        assert_eq!(deq_scale(1.0, 127), 0x0000_7F00_3F80_0000);
        assert_eq!(deq_scale(1.0, -128), 0x0000_8000_3F80_0000);
        // The low 13 mantissa bits are dropped (the hardware reads 19 bits).
        assert_eq!(deq_scale(f32::from_bits(0x3F80_1FFF), 0), 0x3F80_0000);
        assert_eq!(deq_scale(f32::from_bits(0x3F80_2001), 0), 0x3F80_2000);
        assert!(!deq_scale_is_exact(f32::from_bits(0x3F80_0001)));
        assert!(deq_scale_is_exact(1.0));
    }

    /// Every f16 value (normal or subnormal) is exact in a deq_scale word:
    /// so ATC's AscendDequant and ONNX Runtime's `Mul` use the same scale.
    #[test]
    fn every_f16_scale_survives_the_deq_scale_encoding() {
        let mut checked = 0;
        for bits in 0..=u16::MAX {
            let h = half::f16::from_bits(bits);
            if h.is_finite() {
                assert!(deq_scale_is_exact(h.to_f32()), "{h} ({bits:#06x})");
                checked += 1;
            }
        }
        // All but the infinities and NaNs (exponent all ones).
        assert_eq!(checked, 65536 - 2 * 1024);
        // What the quantizer stores for w8a8, tiny rows (f16 subnormal
        // scales) included.
        let (n, k) = (6, 48);
        let mut w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 211) as f32 / 97.0 - 1.0)
            .collect();
        for (row, factor) in [(3, 1e-3), (4, 1e-5), (5, 0.0)] {
            for v in &mut w[row * k..(row + 1) * k] {
                *v *= factor;
            }
        }
        let scheme = kiln_runtime::ir::quant::WeightQuant {
            bits: 8,
            group_size: k,
            offset: false,
        };
        let m = kiln_runtime::ir::quant::quantize(&w, n, k, scheme).unwrap();
        for s in &m.scale[3..5] {
            assert!(!s.is_normal() && s.to_f32() > 0.0, "{s} is not subnormal");
        }
        for s in &m.scale {
            assert!(deq_scale_is_exact(s.to_f32()), "{s}");
        }
    }

    /// The derived initializers' bytes: the i8 matrix transposed (sizes
    /// that are not multiples of the block), the scales as deq_scale words.
    #[test]
    fn derived_initializers_are_the_transpose_and_the_words() {
        let (n, k) = (70, 3);
        let q: Vec<u8> = (0..n * k).map(|i| (i * 37 % 251) as u8).collect();
        let scales: Vec<half::f16> = (0..n)
            .map(|i| half::f16::from_f32(0.01 * (i as f32 + 1.0)))
            .collect();
        let mut store = WeightStore::default();
        store.insert_bytes("q", DType::I8, vec![n, k], q.clone());
        let scale_bytes = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        store.insert_bytes("s", DType::F16, vec![n, 1], scale_bytes);
        let t = Derived::TransposedI8 { source: "q".into() };
        let bytes = derive(&store, &t, FloatType::F16).unwrap();
        for row in 0..n {
            for kk in 0..k {
                assert_eq!(bytes[kk * n + row], q[row * k + kk]);
            }
        }
        let layout = initializer_layout("q.t", Some(&t), &store, FloatType::F16).unwrap();
        assert_eq!(
            layout,
            (vec![k as i64, n as i64], (n * k) as u64, DataType::INT8)
        );
        let d = Derived::DeqScale { scale: "s".into() };
        let words = derive(&store, &d, FloatType::F16).unwrap();
        assert_eq!(words.len(), 8 * n);
        for (word, s) in words.chunks_exact(8).zip(&scales) {
            let word = u64::from_le_bytes(word.try_into().unwrap());
            assert_eq!(word, u64::from(s.to_f32().to_bits()));
        }
        let layout = initializer_layout("s.d", Some(&d), &store, FloatType::F16).unwrap();
        assert_eq!(layout, (vec![n as i64], 8 * n as u64, DataType::UINT64));
    }

    #[test]
    fn row_chunks_keep_packed_weights_as_stored() {
        let (n, k) = (6, 8);
        let q: Vec<u8> = (0..n * k / 2).map(|i| i as u8).collect();
        let mut store = WeightStore::default();
        store.insert_bytes("q", DType::U4, vec![n, k], q.clone());
        store.insert_f32("s", vec![n, 2], (0..2 * n).map(|i| i as f32).collect());
        let rows = |source: &str| Derived::Rows {
            source: source.into(),
            start: 2,
            end: 5,
        };
        let bytes = derive(&store, &rows("q"), FloatType::F16).unwrap();
        assert_eq!(bytes, q[2 * k / 2..5 * k / 2]);
        let layout = initializer_layout("q.r", Some(&rows("q")), &store, FloatType::F16).unwrap();
        assert_eq!(layout, (vec![3, k as i64 / 2], 12, DataType::UINT8));
        let scales = derive(&store, &rows("s"), FloatType::F16).unwrap();
        assert_eq!(
            scales,
            FloatType::F16.encode(&[4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
        );
    }

    #[test]
    fn a_wide_gemv_is_column_chunks_concatenated() {
        use crate::backend::ascendc::{KernelOp, Target};
        // 34 MB of fp16 weights: over one call's 32 MB, so two chunks.
        let (k, n) = (4096, 4200);
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", TensorType::f32([1, 1, k]));
        let w = b.weight("lm_head.weight", TensorType::f32([n, k]));
        let y = b.node("lm_head", Linear, &[x, w]).unwrap();
        b.output(y, "logits");
        let graph = b.finish().unwrap();
        let lowered = lower(
            &graph,
            &OnnxOptions {
                opset: 13,
                float: FloatType::F16,
                quant_ops: QuantOps::Standard,
                kernels: Some(Target::Ascend310b),
                residual: FloatType::F16,
            },
        )
        .unwrap();
        let nodes = &lowered.graph().node;
        let gemvs: Vec<_> = nodes
            .iter()
            .filter(|n| n.op_type == "KilnGemvHalf")
            .collect();
        assert!(gemvs.len() >= 2, "{}", gemvs.len());
        assert!(gemvs.iter().all(|n| n.domain == "ai.kiln"));
        let concat = nodes.iter().find(|n| n.op_type == "Concat").unwrap();
        assert_eq!(concat.output, ["logits"]);
        assert_eq!(concat.input.len(), gemvs.len());
        // The chunks' rows tile the weight, in order.
        let mut next = 0;
        for g in &gemvs {
            let Derived::Rows { source, start, end } = &lowered.derived[&g.input[1]] else {
                panic!("{} is not a row chunk", g.input[1]);
            };
            assert_eq!((source.as_str(), *start), ("lm_head.weight", next));
            next = *end;
        }
        assert_eq!(next, n);
        assert!(!lowered.weights.contains(&"lm_head.weight".to_string()));
        let calls: usize = lowered.kernels.calls.iter().sum();
        assert_eq!(calls, gemvs.len());
        assert!(lowered
            .kernels
            .requests
            .iter()
            .all(|r| matches!(r.op, KernelOp::Gemv { k: 4096, .. })));
        assert_eq!(lowered.model.opset_import[1].domain, "ai.kiln");
    }

    /// `--residual-dtype f32`: the embedding's output is cast up, the
    /// residual Add adds the block's output cast up, the norms read the
    /// stream without a Cast, and the graph output stays fp16.
    #[test]
    fn an_f32_residual_stream_is_cast_around_the_blocks() {
        use kiln_runtime::ir::ops::Gather;
        let mut b = GraphBuilder::new("g");
        let ids = b.input("input_ids", TensorType::new(DType::I64, [1, 2]));
        let table = b.weight("embed", TensorType::f32([10, 8]));
        let norm = b.weight("norm.weight", TensorType::f32([8]));
        let w = b.weight("proj.weight", TensorType::f32([8, 8]));
        let x = b.node("embed", Gather, &[table, ids]).unwrap();
        let h = b.node("norm", RmsNorm { eps: 1e-6 }, &[x, norm]).unwrap();
        let p = b.node("proj", Linear, &[h, w]).unwrap();
        let r = b.node("residual", Add, &[x, p]).unwrap();
        let out = b
            .node("final_norm", RmsNorm { eps: 1e-6 }, &[r, norm])
            .unwrap();
        b.output(out, "out");
        let graph = b.finish().unwrap();
        let lower_with = |residual| {
            let options = OnnxOptions {
                opset: 13,
                float: FloatType::F16,
                quant_ops: QuantOps::Standard,
                kernels: None,
                residual,
            };
            lower(&graph, &options).unwrap().graph().node.clone()
        };
        let casts_to = |nodes: &[onnx_protobuf::NodeProto], to: DataType| {
            nodes
                .iter()
                .filter(|n| n.op_type == "Cast" && n.attribute[0].i == to as i64)
                .map(|n| n.input[0].clone())
                .collect::<Vec<_>>()
        };
        let wide = lower_with(FloatType::F32);
        let producer = |name: &str| {
            wide.iter()
                .find(|n| n.output.contains(&name.to_string()))
                .unwrap()
        };
        assert_eq!(producer("embed").op_type, "Cast");
        let add = producer("residual");
        assert_eq!(add.op_type, "Add");
        assert_eq!(add.input[0], "embed");
        assert_eq!(producer(&add.input[1]).op_type, "Cast");
        assert_eq!(producer(&add.input[1]).input, ["proj"]);
        // Up-casts: the embedding's gather and the block's output only.
        let up = casts_to(&wide, DataType::FLOAT);
        assert_eq!(up.len(), 2, "{up:?}");
        assert!(up.contains(&"proj".to_string()), "{up:?}");
        // The old form casts each norm's input instead: as many Casts.
        let narrow = lower_with(FloatType::F16);
        assert_eq!(
            casts_to(&narrow, DataType::FLOAT),
            ["embed".to_string(), "residual".to_string()]
        );
        assert_eq!(wide.len(), narrow.len());
        assert_eq!(
            casts_to(&wide, DataType::FLOAT16).len(),
            casts_to(&narrow, DataType::FLOAT16).len()
        );
    }

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
            let lowered = lower(
                &graph,
                &OnnxOptions {
                    opset: 13,
                    float,
                    quant_ops: QuantOps::Standard,
                    kernels: None,
                    residual: FloatType::F32,
                },
            )
            .unwrap();
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

    /// Two graphs, the second reading a weight the first does not: inline,
    /// each file holds exactly its weights; external, one file holds each
    /// weight once at the offsets both graphs give. The hash covers every
    /// weight once, the first graph's first.
    #[test]
    fn weights_are_written_once_per_file_that_reads_them() {
        let graph = |with_proj: bool| {
            let mut b = GraphBuilder::new(if with_proj { "two" } else { "one" });
            let x = b.input("x", TensorType::f32([1, 2, 8]));
            let mut h = x;
            if with_proj {
                let w = b.weight("proj.weight", TensorType::f32([8, 8]));
                h = b.node("proj", Linear, &[h, w]).unwrap();
            }
            let norm = b.weight("norm.weight", TensorType::f32([8]));
            let out = b.node("norm", RmsNorm { eps: 1e-6 }, &[h, norm]).unwrap();
            b.output(out, "out");
            b.finish().unwrap()
        };
        let mut store = WeightStore::default();
        let proj: Vec<f32> = (0..64).map(|i| i as f32 / 7.0 - 3.0).collect();
        let norm: Vec<f32> = (0..8).map(|i| 1.0 + i as f32 / 3.0).collect();
        store.insert_f32("proj.weight", vec![8, 8], proj.clone());
        store.insert_f32("norm.weight", vec![8], norm.clone());
        let tmp = tempfile::tempdir().unwrap();
        for float in [FloatType::F32, FloatType::F16] {
            let options = OnnxOptions {
                opset: 13,
                float,
                quant_ops: QuantOps::Standard,
                kernels: None,
                residual: FloatType::F32,
            };
            let lowered = [
                lower(&graph(false), &options).unwrap(),
                lower(&graph(true), &options).unwrap(),
            ];
            let expected = BTreeMap::from([
                ("norm.weight".to_string(), float.encode(&norm)),
                ("proj.weight".to_string(), float.encode(&proj)),
            ]);
            let hash = format!(
                "{:x}",
                Sha256::new()
                    .chain_update(&expected["norm.weight"])
                    .chain_update(&expected["proj.weight"])
                    .finalize()
            );
            let external = tmp.path().join("weights.bin");
            for placement in [
                WeightPlacement::Inline,
                WeightPlacement::External(&external),
            ] {
                let paths = [tmp.path().join("one.onnx"), tmp.path().join("two.onnx")];
                let graphs = [
                    (paths[0].as_path(), &lowered[0]),
                    (paths[1].as_path(), &lowered[1]),
                ];
                let written = write(&graphs, &store, float, placement, |_, _| {}).unwrap();
                assert_eq!(written.weights_sha256, hash);
                assert_eq!(written.weight_bytes, 72 * float.size_bytes() as u64);
                let data = std::fs::read(&external).unwrap_or_default();
                for (path, graph) in graphs {
                    let model =
                        ModelProto::parse_from_bytes(&std::fs::read(path).unwrap()).unwrap();
                    let parsed = model.graph.as_ref().unwrap();
                    assert_eq!(parsed.node, graph.graph().node);
                    let mut weights = BTreeMap::new();
                    for t in &parsed.initializer {
                        if !expected.contains_key(&t.name) {
                            continue; // a constant of the lowering
                        }
                        let bytes = match placement {
                            WeightPlacement::Inline => t.raw_data.clone(),
                            WeightPlacement::External(_)
                            | WeightPlacement::Unwritten(_)
                            | WeightPlacement::Reuse { .. } => {
                                let field = |key: &str| -> usize {
                                    let e = t.external_data.iter().find(|e| e.key == key);
                                    e.unwrap().value.parse().unwrap()
                                };
                                let offset = field("offset");
                                data[offset..offset + field("length")].to_vec()
                            }
                        };
                        assert_eq!(t.data_type, float.data_type() as i32);
                        weights.insert(t.name.clone(), bytes);
                    }
                    let mut wanted = expected.clone();
                    wanted.retain(|name, _| graph.weights.contains(name));
                    assert_eq!(weights, wanted, "{}", path.display());
                }
                if let WeightPlacement::External(_) = placement {
                    assert_eq!(data.len() as u64, written.weight_bytes);
                }
            }
            // Unwritten: the same graphs, layout and hash, and no data file.
            let external_written = std::fs::read(&external).unwrap();
            let graphs_written: Vec<Vec<u8>> = ["one.onnx", "two.onnx"]
                .iter()
                .map(|f| std::fs::read(tmp.path().join(f)).unwrap())
                .collect();
            std::fs::remove_file(&external).unwrap();
            let paths = [tmp.path().join("one.onnx"), tmp.path().join("two.onnx")];
            let graphs = [
                (paths[0].as_path(), &lowered[0]),
                (paths[1].as_path(), &lowered[1]),
            ];
            let placement = WeightPlacement::Unwritten(&external);
            let written = write(&graphs, &store, float, placement, |_, _| {}).unwrap();
            assert_eq!(written.weights_sha256, hash);
            assert_eq!(written.order, ["norm.weight", "proj.weight"]);
            assert!(!external.exists());
            for (path, bytes) in paths.iter().zip(&graphs_written) {
                assert!(std::fs::read(path).unwrap() == *bytes, "{}", path.display());
            }
            assert_eq!(external_written.len() as u64, written.weight_bytes);
        }
    }

    /// Weights already in another file are referenced where they are; only
    /// the others go to the rest file, which is not made when none do.
    #[test]
    fn reused_weights_point_into_their_file_and_only_the_rest_is_written() {
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", TensorType::f32([1, 2, 8]));
        let w = b.weight("proj.weight", TensorType::f32([8, 8]));
        let h = b.node("proj", Linear, &[x, w]).unwrap();
        let norm = b.weight("norm.weight", TensorType::f32([8]));
        let out = b.node("norm", RmsNorm { eps: 1e-6 }, &[h, norm]).unwrap();
        b.output(out, "out");
        let graph = b.finish().unwrap();
        let mut store = WeightStore::default();
        let proj: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
        let norm: Vec<f32> = (0..8).map(|i| 0.5 + i as f32).collect();
        store.insert_f32("proj.weight", vec![8, 8], proj.clone());
        store.insert_f32("norm.weight", vec![8], norm.clone());
        let options = OnnxOptions {
            opset: 13,
            float: FloatType::F32,
            quant_ops: QuantOps::Standard,
            kernels: None,
            residual: FloatType::F32,
        };
        let lowered = lower(&graph, &options).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        // proj.weight's bytes, 3 bytes into another file.
        let mut other = vec![7u8; 3];
        other.extend(FloatType::F32.encode(&proj));
        std::fs::write(tmp.path().join("other.bin"), &other).unwrap();
        let stored = StoredBytes {
            file: "other.bin".into(),
            offset: 3,
            len: 256,
        };
        let path = tmp.path().join("g.onnx");
        let rest = tmp.path().join("rest.bin");
        let read = |name: &str| {
            let model = ModelProto::parse_from_bytes(&std::fs::read(&path).unwrap()).unwrap();
            let t = model
                .graph
                .initializer
                .iter()
                .find(|t| t.name == name)
                .unwrap()
                .clone();
            let field = |key: &str| {
                t.external_data
                    .iter()
                    .find(|e| e.key == key)
                    .unwrap()
                    .value
                    .clone()
            };
            let (offset, len): (usize, usize) = (
                field("offset").parse().unwrap(),
                field("length").parse().unwrap(),
            );
            let data = std::fs::read(tmp.path().join(field("location"))).unwrap();
            data[offset..offset + len].to_vec()
        };
        let mut existing = HashMap::from([("proj.weight".to_string(), stored.clone())]);
        let placement = WeightPlacement::Reuse {
            existing: &existing,
            rest: &rest,
        };
        let written = write(
            &[(&path, &lowered)],
            &store,
            FloatType::F32,
            placement,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(read("proj.weight"), FloatType::F32.encode(&proj));
        assert_eq!(read("norm.weight"), FloatType::F32.encode(&norm));
        assert_eq!(std::fs::read(&rest).unwrap(), FloatType::F32.encode(&norm));
        assert_eq!(written.weight_bytes, 32);
        assert_eq!(written.stored["proj.weight"], stored);

        // Everything stored already: no rest file.
        std::fs::remove_file(&rest).unwrap();
        other.extend(FloatType::F32.encode(&norm));
        std::fs::write(tmp.path().join("other.bin"), &other).unwrap();
        existing.insert(
            "norm.weight".into(),
            StoredBytes {
                file: "other.bin".into(),
                offset: 259,
                len: 32,
            },
        );
        let placement = WeightPlacement::Reuse {
            existing: &existing,
            rest: &rest,
        };
        write(
            &[(&path, &lowered)],
            &store,
            FloatType::F32,
            placement,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(read("norm.weight"), FloatType::F32.encode(&norm));
        assert!(!rest.exists());

        // A stored length that is not the initializer's is refused.
        existing.get_mut("norm.weight").unwrap().len = 16;
        let placement = WeightPlacement::Reuse {
            existing: &existing,
            rest: &rest,
        };
        let err = write(
            &[(&path, &lowered)],
            &store,
            FloatType::F32,
            placement,
            |_, _| {},
        );
        assert!(err
            .err()
            .unwrap()
            .to_string()
            .contains("`norm.weight` is stored as 16 bytes"));
    }
}
