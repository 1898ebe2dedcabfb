//! The MODEL_DEF partition of an .om: GE's `ge.proto.ModelDef`, decoded with
//! prost from message definitions written here (no .proto file, no
//! prost-build), holding only the fields Kiln reads. What ATC built is
//! summarized as [`OmGraph`]: every op with its type, the engine GE assigned
//! it, and the weights it holds or reads from an external file.
//!
//! Facts and where they come from (public GE sources, read for field numbers
//! and names only):
//! - Field numbers: `ge_ir.proto`, package `ge.proto`
//!   (<https://github.com/Ascend/metadef/blob/master/proto/ge_ir.proto>, the
//!   same in `graph_metadef/proto/ge_ir.proto` of <https://github.com/hicann/ge>):
//!   ModelDef {name 1, version 2, custom_version 3, graph 7, attr 11};
//!   GraphDef {name 1, input 4, output 5, op 6, attr 11}; OpDef {name 1,
//!   type 2, input 5, attr 10, input_desc 33, output_desc 34}; AttrDef
//!   (a oneof) {list 1, s 2, i 3, f 4, b 5, bt 7, t 12, dt 15};
//!   ListValue {s 2, i 3, f 4, b 5}; TensorDescriptor {name 1, dtype 2,
//!   shape 3, layout 4, size 10, weight_size 11, data_offset 18};
//!   ShapeDef {dim 1}; TensorDef {desc 1, data 2}. `map<string, AttrDef>`
//!   is encoded as repeated entries {key 1, value 2}.
//! - `DataType` numbers: the same file (DT_FLOAT 1, DT_FLOAT16 2, DT_INT8 3,
//!   …, DT_BF16 27, DT_INT4 28 in hicann/ge's copy).
//! - The engine of an op: the op attr `_ge_attr_op_kernel_lib_name`
//!   (`ATTR_NAME_OP_KERNEL_LIB_NAME`, hicann/ge
//!   `graph_metadef/graph/normal_graph/op_desc.cc`), whose values are the
//!   kernel stores: `AIcoreEngine`, `VectorEngine`, `aicpu_ascend_kernel`,
//!   `aicpu_tf_kernel` (AI CPU, `compiler/engines/cpu_engine/common/util/constant.h`),
//!   `DNN_VM_GE_LOCAL_OP_STORE`, `DNN_VM_RTS_OP_STORE`,
//!   `DNN_VM_HOST_CPU_OP_STORE`. Huawei's own model evaluation tool reads the
//!   same attr from `atc --mode=1` JSON and counts any name containing
//!   "aicpu" as AI CPU. Older files record `imply_type` instead
//!   (`ATTR_NAME_IMPLY_TYPE`, Ascend/metadef `graph/ge_attr_define.cc`;
//!   `domi::ImplyType` in `inc/external/graph/types.h`: BUILDIN 0, TVM 1,
//!   CUSTOM 2, AI_CPU 3, CCE 4, GELOCAL 5, HCCL 6).
//! - Weights: `Const`/`Constant` ops hold a TensorDef in the attr `value`
//!   (`ATTR_NAME_WEIGHTS`); `FileConstant` ops (what `atc
//!   --external_weight=1` makes) name their file in `location` or, in older
//!   files, `file_path` (with `file_id`), and the bytes in `offset`/`length`
//!   (`ATTR_NAME_LOCATION`, `ATTR_NAME_FILE_PATH`, … in hicann/ge
//!   `graph_metadef/graph/attr/ge_attr_define.cc`).
//! - The chip: the model attr `soc_version`, which ATC sets and the loader
//!   checks against the device (hicann/ge `compiler/api/generator/ge_generator.cc`,
//!   `base/common/helper/om_file_helper.cc`); `atc_version`, `opp_version`.
//! - Checked by hand (not committed: CANN license) on the .om files GE's own
//!   tests ship (hicann/ge `tests/ge/st/st_run_data/origin_model/*.om`): op
//!   names and types, `aicpu_ascend_kernel` ops, Const weights and the model
//!   attr `opp_version` read back as GE wrote them.
//! - Compressed attr names (`om_compress_version` set): op attr names that
//!   start with a NUL byte are indices into the model attr `attr_name_enum`
//!   (base 127, each digit + 1, least significant first), and the value of
//!   a name flagged in `attrs_use_string_value` is an index into
//!   `attr_value_enum` (hicann/ge `base/common/model/model_compress_manager.cc`,
//!   `graph_metadef/graph/utils/enum_attr_utils.cc`).

use prost::Message;
use std::collections::BTreeMap;
use std::fmt;

/// `ge.proto.ModelDef`.
#[derive(Clone, PartialEq, Message)]
pub struct ModelDef {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub version: u32,
    #[prost(message, repeated, tag = "7")]
    pub graph: Vec<GraphDef>,
    #[prost(message, repeated, tag = "11")]
    pub attr: Vec<AttrEntry>,
}

/// One entry of a `map<string, AttrDef>` (on the wire, a message of key 1
/// and value 2). The key is kept as bytes: compressed names start with NUL
/// and need not be UTF-8.
#[derive(Clone, PartialEq, Message)]
pub struct AttrEntry {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AttrDef>,
}

impl AttrEntry {
    pub fn new(key: &str, value: AttrValue) -> AttrEntry {
        AttrEntry {
            key: key.as_bytes().to_vec(),
            value: Some(AttrDef { value: Some(value) }),
        }
    }
}

/// `ge.proto.GraphDef`.
#[derive(Clone, PartialEq, Message)]
pub struct GraphDef {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "6")]
    pub op: Vec<OpDef>,
}

/// `ge.proto.OpDef`.
#[derive(Clone, PartialEq, Message)]
pub struct OpDef {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub r#type: String,
    #[prost(string, repeated, tag = "5")]
    pub input: Vec<String>,
    #[prost(message, repeated, tag = "10")]
    pub attr: Vec<AttrEntry>,
    #[prost(message, repeated, tag = "33")]
    pub input_desc: Vec<TensorDescriptor>,
    #[prost(message, repeated, tag = "34")]
    pub output_desc: Vec<TensorDescriptor>,
}

/// `ge.proto.AttrDef`: one of its values.
#[derive(Clone, PartialEq, Message)]
pub struct AttrDef {
    #[prost(oneof = "AttrValue", tags = "1, 2, 3, 4, 5, 12, 15")]
    pub value: Option<AttrValue>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum AttrValue {
    #[prost(message, tag = "1")]
    List(ListValue),
    #[prost(bytes, tag = "2")]
    S(Vec<u8>),
    #[prost(int64, tag = "3")]
    I(i64),
    #[prost(float, tag = "4")]
    F(f32),
    #[prost(bool, tag = "5")]
    B(bool),
    #[prost(message, tag = "12")]
    T(TensorDef),
    /// A `ge::DataType`.
    #[prost(int64, tag = "15")]
    Dt(i64),
}

/// `ge.proto.AttrDef.ListValue`.
#[derive(Clone, PartialEq, Message)]
pub struct ListValue {
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub s: Vec<Vec<u8>>,
    #[prost(int64, repeated, tag = "3")]
    pub i: Vec<i64>,
    #[prost(bool, repeated, tag = "5")]
    pub b: Vec<bool>,
}

/// `ge.proto.TensorDescriptor`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorDescriptor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(int32, tag = "2")]
    pub dtype: i32,
    #[prost(message, optional, tag = "3")]
    pub shape: Option<ShapeDef>,
    #[prost(string, tag = "4")]
    pub layout: String,
    #[prost(int64, tag = "10")]
    pub size: i64,
    #[prost(int64, tag = "11")]
    pub weight_size: i64,
    #[prost(int64, tag = "18")]
    pub data_offset: i64,
}

/// `ge.proto.ShapeDef`.
#[derive(Clone, PartialEq, Message)]
pub struct ShapeDef {
    #[prost(int64, repeated, tag = "1")]
    pub dim: Vec<i64>,
}

/// `ge.proto.TensorDef`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorDef {
    #[prost(message, optional, tag = "1")]
    pub desc: Option<TensorDescriptor>,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
}

/// A `ge::DataType` (GE's own numbering, not ACL's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GeDataType(pub i64);

impl GeDataType {
    pub const FLOAT: GeDataType = GeDataType(1);
    pub const FLOAT16: GeDataType = GeDataType(2);
    pub const INT8: GeDataType = GeDataType(3);
    pub const UINT8: GeDataType = GeDataType(4);
    pub const INT32: GeDataType = GeDataType(7);
    pub const INT64: GeDataType = GeDataType(8);
    pub const UINT64: GeDataType = GeDataType(10);
    pub const BF16: GeDataType = GeDataType(27);
    pub const INT4: GeDataType = GeDataType(28);

    fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            1 => "float32",
            2 => "float16",
            3 => "int8",
            4 => "uint8",
            5 => "int16",
            6 => "uint16",
            7 => "int32",
            8 => "int64",
            9 => "uint32",
            10 => "uint64",
            11 => "bool",
            12 => "float64",
            27 => "bfloat16",
            28 => "int4",
            _ => return None,
        })
    }

    /// Bits per element, for the types a weight can have.
    fn bits(self) -> Option<u64> {
        Some(match self.0 {
            1 | 7 | 9 => 32,
            2 | 5 | 6 | 27 => 16,
            3 | 4 | 11 => 8,
            8 | 10 | 12 => 64,
            28 => 4,
            _ => return None,
        })
    }
}

impl fmt::Display for GeDataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "ge-dtype#{}", self.0),
        }
    }
}

/// Where GE runs an op.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Engine {
    AiCore,
    VectorCore,
    /// The AI CPU: an op no AI Core kernel took, run by the board's control
    /// CPUs — slow, and a sign the graph holds something ATC could not place.
    AiCpu,
    HostCpu,
    /// GE's own bookkeeping ops (Data, NetOutput, Reshape without a kernel).
    GeLocal,
    Runtime,
    Custom,
    /// A kernel store Kiln does not know, by its name.
    Other(String),
    /// The op records no engine.
    Unknown,
}

impl Engine {
    fn from_kernel_lib(name: &str) -> Engine {
        let lower = name.to_ascii_lowercase();
        match name {
            "AIcoreEngine" => Engine::AiCore,
            "VectorEngine" => Engine::VectorCore,
            "DNN_VM_GE_LOCAL_OP_STORE" => Engine::GeLocal,
            "DNN_VM_RTS_OP_STORE" => Engine::Runtime,
            "DNN_VM_HOST_CPU_OP_STORE" => Engine::HostCpu,
            _ if lower.contains("aicpu") => Engine::AiCpu,
            _ if lower.contains("cust") => Engine::Custom,
            _ if lower.contains("aicore") => Engine::AiCore,
            other => Engine::Other(other.to_string()),
        }
    }

    fn from_imply_type(value: i64) -> Engine {
        match value {
            1 => Engine::AiCore,
            2 => Engine::Custom,
            3 => Engine::AiCpu,
            5 => Engine::GeLocal,
            _ => Engine::Unknown,
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Engine::AiCore => f.write_str("AI Core"),
            Engine::VectorCore => f.write_str("Vector Core"),
            Engine::AiCpu => f.write_str("AI CPU"),
            Engine::HostCpu => f.write_str("host CPU"),
            Engine::GeLocal => f.write_str("GE local"),
            Engine::Runtime => f.write_str("runtime"),
            Engine::Custom => f.write_str("custom"),
            Engine::Other(name) => write!(f, "{name}"),
            Engine::Unknown => f.write_str("not recorded"),
        }
    }
}

/// A weight an op holds (Const) or reads from a file (FileConstant).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OmWeight {
    pub dtype: GeDataType,
    pub dims: Vec<i64>,
    pub bytes: u64,
    /// The external file (FileConstant's `location` or `file_path`).
    pub file: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OmOp {
    pub name: String,
    pub op_type: String,
    pub engine: Engine,
    /// The kernel store as recorded (`_ge_attr_op_kernel_lib_name`).
    pub kernel_lib: Option<String>,
    pub weight: Option<OmWeight>,
    /// The dtypes of the op's inputs, as GE describes them.
    pub input_dtypes: Vec<GeDataType>,
}

/// What MODEL_DEF says ATC built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OmGraph {
    pub model_name: String,
    pub soc_version: Option<String>,
    pub atc_version: Option<String>,
    pub opp_version: Option<String>,
    pub graph_names: Vec<String>,
    /// Every op of every graph, in order.
    pub ops: Vec<OmOp>,
}

const ATTR_KERNEL_LIB: &str = "_ge_attr_op_kernel_lib_name";
const ATTR_IMPLY_TYPE: &str = "imply_type";
const ATTR_WEIGHTS: &str = "value";

/// Op attrs with compressed names resolved (see the module comment).
struct AttrNames {
    names: Vec<String>,
    values: Vec<String>,
    use_string: Vec<bool>,
}

impl AttrNames {
    fn from_model(attrs: &BTreeMap<String, AttrValue>) -> AttrNames {
        let list = |key: &str| match attrs.get(key) {
            Some(AttrValue::List(l)) => l.clone(),
            _ => ListValue::default(),
        };
        let strings =
            |l: ListValue| -> Vec<String> { l.s.iter().map(|s| lossy(s)).collect::<Vec<_>>() };
        AttrNames {
            names: strings(list("attr_name_enum")),
            values: strings(list("attr_value_enum")),
            use_string: list("attrs_use_string_value").b,
        }
    }

    /// The op's attrs by their real names; values stored as indices into
    /// `attr_value_enum` come back as strings.
    fn resolve(&self, op: &OpDef) -> Result<BTreeMap<String, AttrValue>, String> {
        let mut out = BTreeMap::new();
        for entry in &op.attr {
            let key = &entry.key;
            let Some(value) = entry.value.as_ref().and_then(|a| a.value.as_ref()) else {
                continue;
            };
            if key.first() != Some(&0) {
                out.insert(lossy(key), value.clone());
                continue;
            }
            let mut index = 0u64;
            for (i, &digit) in key[1..].iter().enumerate() {
                let digit = u64::from(digit)
                    .checked_sub(1)
                    .filter(|&d| d < 127)
                    .ok_or_else(|| {
                        format!("op `{}`: a compressed attr name is malformed", op.name)
                    })?;
                let weight = u32::try_from(i)
                    .ok()
                    .and_then(|i| 127u64.checked_pow(i))
                    .ok_or_else(|| {
                        format!("op `{}`: a compressed attr name is too long", op.name)
                    })?;
                index = digit
                    .checked_mul(weight)
                    .and_then(|d| index.checked_add(d))
                    .ok_or_else(|| format!("op `{}`: a compressed attr name overflows", op.name))?;
            }
            let at = usize::try_from(index).unwrap_or(usize::MAX);
            let name = self.names.get(at).ok_or_else(|| {
                format!(
                    "op `{}`: compressed attr name #{index}, but the model's attr_name_enum has {}",
                    op.name,
                    self.names.len()
                )
            })?;
            let value = match (self.use_string.get(at), value) {
                (Some(true), AttrValue::I(i)) => {
                    AttrValue::S(self.value(*i, &op.name)?.into_bytes())
                }
                (Some(true), AttrValue::List(l)) => AttrValue::List(ListValue {
                    s: l.i
                        .iter()
                        .map(|&i| self.value(i, &op.name).map(String::into_bytes))
                        .collect::<Result<_, _>>()?,
                    ..ListValue::default()
                }),
                (_, v) => v.clone(),
            };
            out.insert(name.clone(), value);
        }
        Ok(out)
    }

    fn value(&self, index: i64, op: &str) -> Result<String, String> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.values.get(i))
            .cloned()
            .ok_or_else(|| {
                format!(
                    "op `{op}`: compressed attr value #{index}, but the model's attr_value_enum has {}",
                    self.values.len()
                )
            })
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn attr_str(attrs: &BTreeMap<String, AttrValue>, key: &str) -> Option<String> {
    match attrs.get(key) {
        Some(AttrValue::S(s)) => Some(lossy(s)).filter(|s| !s.is_empty()),
        _ => None,
    }
}

fn attr_int(attrs: &BTreeMap<String, AttrValue>, key: &str) -> Option<i64> {
    match attrs.get(key) {
        Some(AttrValue::I(i)) => Some(*i),
        _ => None,
    }
}

/// A model's attrs by name (model attr names are never compressed).
fn plain_attrs(entries: &[AttrEntry]) -> BTreeMap<String, AttrValue> {
    entries
        .iter()
        .filter_map(|e| Some((lossy(&e.key), e.value.as_ref()?.value.clone()?)))
        .collect()
}

/// The bytes of `dims` elements of `dtype`, when both are sane.
fn element_bytes(dtype: GeDataType, dims: &[i64]) -> Option<u64> {
    let mut elements = 1u64;
    for &d in dims {
        elements = elements.checked_mul(u64::try_from(d).ok()?)?;
    }
    elements.checked_mul(dtype.bits()?).map(|b| b.div_ceil(8))
}

fn dims_of(desc: &TensorDescriptor) -> Vec<i64> {
    desc.shape
        .as_ref()
        .map(|s| s.dim.clone())
        .unwrap_or_default()
}

fn weight_of(op: &OpDef, attrs: &BTreeMap<String, AttrValue>) -> Option<OmWeight> {
    match op.r#type.as_str() {
        "Const" | "Constant" => {
            let (desc, data_len) = match attrs.get(ATTR_WEIGHTS) {
                Some(AttrValue::T(t)) => (t.desc.clone(), t.data.len() as u64),
                _ => (None, 0),
            };
            let desc = desc.or_else(|| op.output_desc.first().cloned())?;
            let dtype = GeDataType(i64::from(desc.dtype));
            let dims = dims_of(&desc);
            let bytes = [
                u64::try_from(desc.weight_size).unwrap_or(0),
                data_len,
                element_bytes(dtype, &dims).unwrap_or(0),
            ]
            .into_iter()
            .find(|&b| b > 0)
            .unwrap_or(0);
            Some(OmWeight {
                dtype,
                dims,
                bytes,
                file: None,
            })
        }
        "FileConstant" => {
            let file = attr_str(attrs, "location").or_else(|| attr_str(attrs, "file_path"));
            let desc = op.output_desc.first();
            let dtype = match attrs.get("dtype") {
                Some(AttrValue::Dt(d)) | Some(AttrValue::I(d)) => GeDataType(*d),
                _ => GeDataType(desc.map_or(0, |d| i64::from(d.dtype))),
            };
            let dims = match attrs.get("shape") {
                Some(AttrValue::List(l)) if !l.i.is_empty() => l.i.clone(),
                _ => desc.map(dims_of).unwrap_or_default(),
            };
            let bytes = attr_int(attrs, "length")
                .and_then(|l| u64::try_from(l).ok())
                .filter(|&l| l > 0)
                .or_else(|| element_bytes(dtype, &dims))
                .unwrap_or(0);
            Some(OmWeight {
                dtype,
                dims,
                bytes,
                file: file.or_else(|| attr_str(attrs, "file_id")),
            })
        }
        _ => None,
    }
}

impl OmGraph {
    /// Decodes a MODEL_DEF partition.
    pub fn decode(bytes: &[u8]) -> Result<OmGraph, String> {
        if bytes.is_empty() {
            return Err("the partition is empty".into());
        }
        let model = ModelDef::decode(bytes)
            .map_err(|e| format!("not a GE ModelDef protobuf ({e}): the partition is corrupt"))?;
        if model.graph.is_empty() {
            return Err("the ModelDef holds no graph".into());
        }
        let model_attrs = plain_attrs(&model.attr);
        let names = AttrNames::from_model(&model_attrs);
        let mut ops = Vec::new();
        for graph in &model.graph {
            for op in &graph.op {
                let attrs = names.resolve(op)?;
                let kernel_lib = attr_str(&attrs, ATTR_KERNEL_LIB);
                let engine = match (&kernel_lib, attr_int(&attrs, ATTR_IMPLY_TYPE)) {
                    (Some(lib), _) => Engine::from_kernel_lib(lib),
                    (None, Some(imply)) => Engine::from_imply_type(imply),
                    (None, None) => Engine::Unknown,
                };
                ops.push(OmOp {
                    name: op.name.clone(),
                    op_type: op.r#type.clone(),
                    engine,
                    kernel_lib,
                    weight: weight_of(op, &attrs),
                    input_dtypes: op
                        .input_desc
                        .iter()
                        .map(|d| GeDataType(i64::from(d.dtype)))
                        .collect(),
                });
            }
        }
        Ok(OmGraph {
            model_name: model.name.clone(),
            soc_version: attr_str(&model_attrs, "soc_version"),
            atc_version: attr_str(&model_attrs, "atc_version"),
            opp_version: attr_str(&model_attrs, "opp_version"),
            graph_names: model.graph.iter().map(|g| g.name.clone()).collect(),
            ops,
        })
    }

    /// Op types with how many ops of each.
    pub fn op_counts(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for op in &self.ops {
            *counts.entry(op.op_type.as_str()).or_insert(0) += 1;
        }
        counts
    }

    /// For each op type, how many of its ops run on each engine.
    pub fn engines_by_type(&self) -> BTreeMap<&str, BTreeMap<&Engine, usize>> {
        let mut out: BTreeMap<&str, BTreeMap<&Engine, usize>> = BTreeMap::new();
        for op in &self.ops {
            *out.entry(op.op_type.as_str())
                .or_default()
                .entry(&op.engine)
                .or_insert(0) += 1;
        }
        out
    }

    /// The ops GE put on the AI CPU.
    pub fn ai_cpu_ops(&self) -> Vec<&OmOp> {
        self.ops
            .iter()
            .filter(|op| op.engine == Engine::AiCpu)
            .collect()
    }

    /// The ops that ran as custom operators.
    pub fn custom_ops(&self) -> Vec<&OmOp> {
        self.ops
            .iter()
            .filter(|op| op.engine == Engine::Custom)
            .collect()
    }

    /// Weight bytes and counts by dtype (embedded and external together).
    pub fn weight_dtypes(&self) -> BTreeMap<GeDataType, (usize, u64)> {
        let mut out = BTreeMap::new();
        for weight in self.ops.iter().filter_map(|op| op.weight.as_ref()) {
            let entry = out.entry(weight.dtype).or_insert((0, 0));
            entry.0 += 1;
            entry.1 += weight.bytes;
        }
        out
    }

    /// External weight files with the bytes the graph reads from each.
    pub fn external_files(&self) -> BTreeMap<&str, u64> {
        let mut out = BTreeMap::new();
        for weight in self.ops.iter().filter_map(|op| op.weight.as_ref()) {
            if let Some(file) = &weight.file {
                *out.entry(file.as_str()).or_insert(0) += weight.bytes;
            }
        }
        out
    }

    /// The weights the matrix multiplications read: for each MatMul-like op,
    /// the dtype of its second input (the weight, `[K, N]` in Kiln's graphs).
    pub fn matmul_weight_dtypes(&self) -> Vec<(&OmOp, GeDataType)> {
        self.ops
            .iter()
            .filter(|op| is_matmul(&op.op_type))
            .filter_map(|op| op.input_dtypes.get(1).map(|&d| (op, d)))
            .collect()
    }
}

/// GE's matrix-multiplication op types (ONNX MatMul and Gemm become these).
pub fn is_matmul(op_type: &str) -> bool {
    matches!(
        op_type,
        "MatMul"
            | "MatMulV2"
            | "MatMulV3"
            | "BatchMatMul"
            | "BatchMatMulV2"
            | "BatchMatMulV3"
            | "Gemm"
            | "QuantBatchMatmul"
            | "QuantBatchMatmulV3"
            | "WeightQuantBatchMatmulV2"
    )
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

impl fmt::Display for OmGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "not recorded".into());
        writeln!(
            f,
            "graph: model `{}`, {} graph(s) ({}), {} ops",
            self.model_name,
            self.graph_names.len(),
            self.graph_names.join(", "),
            self.ops.len()
        )?;
        writeln!(f, "  soc_version: {}", or_unknown(&self.soc_version))?;
        if self.atc_version.is_some() || self.opp_version.is_some() {
            writeln!(
                f,
                "  atc_version: {}, opp_version: {}",
                or_unknown(&self.atc_version),
                or_unknown(&self.opp_version)
            )?;
        }
        writeln!(f, "  op types (count, engine):")?;
        let engines = self.engines_by_type();
        for (op_type, count) in self.op_counts() {
            let on: Vec<String> = engines[op_type]
                .iter()
                .map(|(engine, n)| {
                    if *n == count {
                        engine.to_string()
                    } else {
                        format!("{engine} ×{n}")
                    }
                })
                .collect();
            let flag = if engines[op_type].contains_key(&Engine::AiCpu) {
                "   <-- AI CPU FALLBACK"
            } else {
                ""
            };
            writeln!(f, "    {op_type:<24} {count:>5}  {}{flag}", on.join(", "))?;
        }
        let ai_cpu = self.ai_cpu_ops();
        if ai_cpu.is_empty() {
            writeln!(f, "  AI CPU: no op fell back to the AI CPU")?;
        } else {
            writeln!(
                f,
                "  WARNING: {} op(s) fell back to the AI CPU, which is far slower than the AI Core:",
                ai_cpu.len()
            )?;
            for op in ai_cpu.iter().take(20) {
                writeln!(
                    f,
                    "    {} ({}, kernel lib {})",
                    op.name,
                    op.op_type,
                    op.kernel_lib.as_deref().unwrap_or("?")
                )?;
            }
        }
        let weights = self.weight_dtypes();
        if weights.is_empty() {
            writeln!(f, "  weights: none in the graph")?;
        } else {
            let parts: Vec<String> = weights
                .iter()
                .map(|(dtype, (n, bytes))| format!("{dtype} {n} tensors {}", mb(*bytes)))
                .collect();
            writeln!(f, "  weights: {}", parts.join("; "))?;
        }
        let files = self.external_files();
        if files.is_empty() {
            writeln!(
                f,
                "  external weight files: none (weights embedded in the .om)"
            )?;
        } else {
            let total: u64 = files.values().sum();
            writeln!(
                f,
                "  external weight files: {} ({})",
                files.len(),
                mb(total)
            )?;
            const SHOWN: usize = 12;
            for (file, bytes) in files.iter().take(SHOWN) {
                writeln!(f, "    {file} ({bytes} bytes)")?;
            }
            if files.len() > SHOWN {
                writeln!(f, "    … and {} more", files.len() - SHOWN)?;
            }
        }
        let custom = self.custom_ops();
        if custom.is_empty() {
            writeln!(f, "  custom ops: none")?;
        } else {
            let mut types: BTreeMap<&str, usize> = BTreeMap::new();
            for op in custom {
                *types.entry(op.op_type.as_str()).or_insert(0) += 1;
            }
            let parts: Vec<String> = types.iter().map(|(t, n)| format!("{t}×{n}")).collect();
            writeln!(f, "  custom ops: {}", parts.join(" "))?;
        }
        Ok(())
    }
}

/// Encodes ModelDefs with the same structs, for tests (ATC writes real ones).
#[cfg(any(test, feature = "om-writer"))]
pub mod writer {
    use super::*;

    /// One op for [`model_def`].
    #[derive(Clone, Debug, Default)]
    pub struct OpSpec {
        pub name: String,
        pub op_type: String,
        /// `_ge_attr_op_kernel_lib_name`, when set.
        pub kernel_lib: Option<String>,
        /// The dtypes (GE numbering) of the op's inputs.
        pub input_dtypes: Vec<i64>,
        /// A Const's tensor: dtype (GE numbering), dims.
        pub constant: Option<(i64, Vec<i64>)>,
        /// A FileConstant's file, dtype (GE numbering) and dims.
        pub file_constant: Option<(String, i64, Vec<i64>)>,
    }

    impl OpSpec {
        pub fn new(name: &str, op_type: &str, kernel_lib: &str) -> OpSpec {
            OpSpec {
                name: name.into(),
                op_type: op_type.into(),
                kernel_lib: Some(kernel_lib.to_string()).filter(|k| !k.is_empty()),
                ..OpSpec::default()
            }
        }
    }

    fn s(value: &str) -> AttrValue {
        AttrValue::S(value.as_bytes().to_vec())
    }

    fn desc(dtype: i64, dims: &[i64]) -> TensorDescriptor {
        TensorDescriptor {
            dtype: dtype as i32,
            shape: Some(ShapeDef { dim: dims.to_vec() }),
            layout: "ND".into(),
            weight_size: element_bytes(GeDataType(dtype), dims).unwrap_or(0) as i64,
            ..TensorDescriptor::default()
        }
    }

    /// A ModelDef whose only ops are FileConstants reading `files`: what
    /// the ACL test double needs to find a model's external weights.
    pub fn file_constants<S: AsRef<str>>(name: &str, files: &[S]) -> Vec<u8> {
        let ops: Vec<OpSpec> = files
            .iter()
            .enumerate()
            .map(|(i, file)| OpSpec {
                file_constant: Some((file.as_ref().to_string(), GeDataType::UINT8.0, vec![1])),
                ..OpSpec::new(
                    &format!("weight_{i}"),
                    "FileConstant",
                    "DNN_VM_GE_LOCAL_OP_STORE",
                )
            })
            .collect();
        model_def(name, "Ascend310B1", &ops)
    }

    /// A ModelDef of one graph holding `ops`, as ATC records it.
    pub fn model_def(name: &str, soc_version: &str, ops: &[OpSpec]) -> Vec<u8> {
        let op = ops
            .iter()
            .map(|spec| {
                let mut attr = Vec::new();
                if let Some(lib) = &spec.kernel_lib {
                    attr.push(AttrEntry::new(ATTR_KERNEL_LIB, s(lib)));
                }
                let mut output_desc = Vec::new();
                if let Some((dtype, dims)) = &spec.constant {
                    let tensor = TensorDef {
                        desc: Some(desc(*dtype, dims)),
                        data: Vec::new(),
                    };
                    attr.push(AttrEntry::new(ATTR_WEIGHTS, AttrValue::T(tensor)));
                    output_desc.push(desc(*dtype, dims));
                }
                if let Some((file, dtype, dims)) = &spec.file_constant {
                    let length = element_bytes(GeDataType(*dtype), dims).unwrap_or(0) as i64;
                    attr.push(AttrEntry::new("location", s(file)));
                    attr.push(AttrEntry::new("offset", AttrValue::I(0)));
                    attr.push(AttrEntry::new("length", AttrValue::I(length)));
                    output_desc.push(desc(*dtype, dims));
                }
                OpDef {
                    name: spec.name.clone(),
                    r#type: spec.op_type.clone(),
                    input: Vec::new(),
                    attr,
                    input_desc: spec.input_dtypes.iter().map(|&d| desc(d, &[])).collect(),
                    output_desc,
                }
            })
            .collect();
        ModelDef {
            name: name.into(),
            version: 1,
            graph: vec![GraphDef {
                name: name.into(),
                op,
            }],
            attr: vec![AttrEntry::new("soc_version", s(soc_version))],
        }
        .encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::writer::*;
    use super::*;

    fn matmul(name: &str, weight_dtype: i64, lib: &str) -> OpSpec {
        OpSpec {
            input_dtypes: vec![2, weight_dtype],
            ..OpSpec::new(name, "MatMulV2", lib)
        }
    }

    #[test]
    fn a_model_def_reads_back_with_engines_weights_and_chip() {
        let ops = vec![
            OpSpec::new("input_ids", "Data", "DNN_VM_GE_LOCAL_OP_STORE"),
            OpSpec {
                constant: Some((3, vec![64, 32])),
                ..OpSpec::new("w0", "Const", "DNN_VM_GE_LOCAL_OP_STORE")
            },
            OpSpec {
                file_constant: Some(("weight_abc".into(), 2, vec![32, 16])),
                ..OpSpec::new("w1", "FileConstant", "DNN_VM_GE_LOCAL_OP_STORE")
            },
            matmul("mm0", 3, "AIcoreEngine"),
            matmul("mm1", 3, "AIcoreEngine"),
            OpSpec::new("topk", "TopKV2", "aicpu_ascend_kernel"),
            OpSpec::new("gemv", "KilnGemvW4", "DNN_VM_CUSTOM_OP_STORE"),
        ];
        let graph = OmGraph::decode(&model_def("decode", "Ascend310B4", &ops)).unwrap();
        assert_eq!(graph.soc_version.as_deref(), Some("Ascend310B4"));
        assert_eq!(graph.ops.len(), 7);
        assert_eq!(graph.op_counts()["MatMulV2"], 2);
        assert_eq!(graph.ops[3].engine, Engine::AiCore);
        assert_eq!(graph.ops[0].engine, Engine::GeLocal);
        let ai_cpu: Vec<&str> = graph.ai_cpu_ops().iter().map(|o| o.name.as_str()).collect();
        assert_eq!(ai_cpu, ["topk"]);
        let custom: Vec<&str> = graph
            .custom_ops()
            .iter()
            .map(|o| o.op_type.as_str())
            .collect();
        assert_eq!(custom, ["KilnGemvW4"]);
        let weights = graph.weight_dtypes();
        assert_eq!(weights[&GeDataType::INT8], (1, 64 * 32));
        assert_eq!(weights[&GeDataType::FLOAT16], (1, 32 * 16 * 2));
        assert_eq!(graph.external_files()["weight_abc"], 32 * 16 * 2);
        assert!(graph
            .matmul_weight_dtypes()
            .iter()
            .all(|(_, d)| *d == GeDataType::INT8));
        let text = graph.to_string();
        for expected in [
            "soc_version: Ascend310B4",
            "MatMulV2                     2  AI Core",
            "TopKV2                       1  AI CPU   <-- AI CPU FALLBACK",
            "WARNING: 1 op(s) fell back to the AI CPU",
            "topk (TopKV2, kernel lib aicpu_ascend_kernel)",
            "weights: float16 1 tensors 0.0 MB; int8 1 tensors 0.0 MB",
            "weight_abc (1024 bytes)",
            "custom ops: KilnGemvW4×1",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
    }

    #[test]
    fn compressed_attr_names_and_values_are_resolved() {
        // An op whose kernel-lib attr is stored as enum name #1 with its
        // value as enum string #130 (two base-127 digits: 130 = 3 + 1·127).
        let list = |s: Vec<&str>, b: Vec<bool>| {
            AttrValue::List(ListValue {
                s: s.into_iter().map(|x| x.as_bytes().to_vec()).collect(),
                i: vec![],
                b,
            })
        };
        let mut values: Vec<String> = (0..131).map(|i| format!("v{i}")).collect();
        values[130] = "aicpu_tf_kernel".into();
        let model_attr = vec![
            AttrEntry::new("om_compress_version", AttrValue::I(1)),
            AttrEntry::new(
                "attr_name_enum",
                list(vec!["other", ATTR_KERNEL_LIB], vec![]),
            ),
            AttrEntry::new(
                "attr_value_enum",
                list(values.iter().map(String::as_str).collect(), vec![]),
            ),
            AttrEntry::new("attrs_use_string_value", list(vec![], vec![false, true])),
        ];
        let compressed = |key: Vec<u8>, value: i64| AttrEntry {
            key,
            value: Some(AttrDef {
                value: Some(AttrValue::I(value)),
            }),
        };
        let bytes = ModelDef {
            name: "m".into(),
            version: 1,
            graph: vec![GraphDef {
                name: "g".into(),
                op: vec![OpDef {
                    name: "where".into(),
                    r#type: "Where".into(),
                    attr: vec![compressed(vec![0, 2], 130)],
                    ..OpDef::default()
                }],
            }],
            attr: model_attr,
        }
        .encode_to_vec();
        let graph = OmGraph::decode(&bytes).unwrap();
        assert_eq!(graph.ops[0].kernel_lib.as_deref(), Some("aicpu_tf_kernel"));
        assert_eq!(graph.ops[0].engine, Engine::AiCpu);
        // Index 130 into a 2-name table: an error naming the op, no panic.
        let mut bad = ModelDef::decode(bytes.as_slice()).unwrap();
        bad.graph[0].op[0].attr = vec![compressed(vec![0, 4, 2], 0)];
        let err = OmGraph::decode(&bad.encode_to_vec()).unwrap_err();
        assert!(
            err.contains("op `where`") && err.contains("attr_name_enum has 2"),
            "{err}"
        );
    }

    #[test]
    fn old_files_give_the_engine_by_imply_type() {
        let attr = vec![AttrEntry::new(ATTR_IMPLY_TYPE, AttrValue::I(3))];
        let bytes = ModelDef {
            graph: vec![GraphDef {
                name: "g".into(),
                op: vec![OpDef {
                    name: "x".into(),
                    r#type: "Cast".into(),
                    attr,
                    ..OpDef::default()
                }],
            }],
            ..ModelDef::default()
        }
        .encode_to_vec();
        assert_eq!(
            OmGraph::decode(&bytes).unwrap().ops[0].engine,
            Engine::AiCpu
        );
    }

    #[test]
    fn garbage_and_empty_partitions_are_errors() {
        assert!(OmGraph::decode(&[]).unwrap_err().contains("empty"));
        let err = OmGraph::decode(b"kiln-double-weights\nweight_1\n").unwrap_err();
        assert!(err.contains("not a GE ModelDef"), "{err}");
        let empty = ModelDef::default().encode_to_vec();
        assert!(OmGraph::decode(&[empty, vec![0x10, 0x01]].concat())
            .unwrap_err()
            .contains("no graph"));
    }
}
