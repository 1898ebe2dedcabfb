//! A small builder over onnx-protobuf's generated types: nodes with unique
//! names, typed values, constant initializers.

use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto::{Tensor as TensorTypeProto, Value as TypeValue};
use onnx_protobuf::{
    attribute_proto::AttributeType, AttributeProto, NodeProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};

/// The floating-point type of the emitted model's activations and weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
}

impl FloatType {
    pub fn data_type(self) -> DataType {
        match self {
            FloatType::F32 => DataType::FLOAT,
            FloatType::F16 => DataType::FLOAT16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 => 2,
        }
    }

    /// The runtime's name for this type.
    pub fn dtype(self) -> kiln_runtime::ir::DType {
        match self {
            FloatType::F32 => kiln_runtime::ir::DType::F32,
            FloatType::F16 => kiln_runtime::ir::DType::F16,
        }
    }

    /// Little-endian bytes of `values` in this type (to f16: rounded to
    /// nearest even, with F16C when the CPU has it).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        kiln_runtime::compiled::weights_bin::encode_floats(values, self.dtype())
    }
}

pub fn value_info(name: &str, data_type: DataType, shape: &[usize]) -> ValueInfoProto {
    let dims = shape
        .iter()
        .map(|&d| Dimension {
            value: Some(dimension::Value::DimValue(d as i64)),
            ..Default::default()
        })
        .collect();
    let tensor = TensorTypeProto {
        elem_type: data_type as i32,
        shape: Some(TensorShapeProto {
            dim: dims,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.to_string(),
        type_: Some(TypeProto {
            value: Some(TypeValue::TensorType(tensor)),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

pub fn tensor(name: &str, data_type: DataType, shape: &[usize], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        data_type: data_type as i32,
        dims: shape.iter().map(|&d| d as i64).collect(),
        raw_data: raw,
        ..Default::default()
    }
}

/// An attribute value for [`GraphBuilder::node`].
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(&'static str),
}

/// Nodes and constants of one ONNX graph under construction.
#[derive(Default)]
pub struct GraphBuilder {
    pub nodes: Vec<NodeProto>,
    pub constants: Vec<TensorProto>,
    counter: usize,
}

impl GraphBuilder {
    /// A fresh value name derived from `base`.
    pub fn fresh(&mut self, base: &str) -> String {
        self.counter += 1;
        format!("{base}/{}", self.counter)
    }

    /// Adds a node computing `output` (or a fresh name under `base` if none).
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        output: &str,
        attrs: Vec<(&str, Attr)>,
    ) -> String {
        let attribute = attrs
            .into_iter()
            .map(|(name, value)| {
                let mut a = AttributeProto {
                    name: name.to_string(),
                    ..Default::default()
                };
                match value {
                    Attr::Int(i) => {
                        a.type_ = AttributeType::INT.into();
                        a.i = i;
                    }
                    Attr::Ints(v) => {
                        a.type_ = AttributeType::INTS.into();
                        a.ints = v;
                    }
                    Attr::Float(f) => {
                        a.type_ = AttributeType::FLOAT.into();
                        a.f = f;
                    }
                    Attr::Str(s) => {
                        a.type_ = AttributeType::STRING.into();
                        a.s = s.as_bytes().to_vec();
                    }
                }
                a
            })
            .collect();
        let name = self.fresh(output);
        self.nodes.push(NodeProto {
            name,
            op_type: op_type.to_string(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            attribute,
            ..Default::default()
        });
        output.to_string()
    }

    /// Adds a node of a custom domain, without attributes, with several outputs.
    pub fn custom(&mut self, domain: &str, op_type: &str, inputs: &[&str], outputs: &[&str]) {
        let name = self.fresh(outputs[0]);
        self.nodes.push(NodeProto {
            name,
            op_type: op_type.to_string(),
            domain: domain.to_string(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
    }

    /// Like [`Self::node`] with a fresh output name under `base`.
    pub fn temp(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        base: &str,
        attrs: Vec<(&str, Attr)>,
    ) -> String {
        let output = self.fresh(base);
        self.node(op_type, inputs, &output, attrs)
    }

    /// A constant i64 tensor (shapes, indices, axes).
    pub fn const_i64(&mut self, base: &str, shape: &[usize], values: &[i64]) -> String {
        let name = self.fresh(base);
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constants
            .push(tensor(&name, DataType::INT64, shape, raw));
        name
    }

    /// A constant float tensor in the given type.
    pub fn const_float(
        &mut self,
        base: &str,
        ty: DataType,
        shape: &[usize],
        values: &[f32],
    ) -> String {
        let name = self.fresh(base);
        let raw = match ty {
            DataType::FLOAT16 => FloatType::F16.encode(values),
            _ => FloatType::F32.encode(values),
        };
        self.constants.push(tensor(&name, ty, shape, raw));
        name
    }
}
