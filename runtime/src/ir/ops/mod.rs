//! The IR's op set, one file per op. Each file holds everything the IR knows
//! about its op: its attributes, its type rule (`infer`) and its reference
//! semantics (`eval`, run by the CPU interpreter in f32).
//!
//! Backends lower ops in their own per-op files; the reference semantics here
//! is the definition they are checked against.

mod attention;
mod binary;
mod concat;
mod gather;
pub mod gelu_tanh;
mod linear;
mod quant_gather;
mod quant_linear;
mod reshape;
mod rms_norm;
mod rope;
mod scale;
mod silu;
mod slice;
pub mod soft_cap;
mod swiglu;
mod transpose;

pub use attention::Attention;
pub use binary::{Add, Mul};
pub use concat::Concat;
pub use gather::Gather;
pub use gelu_tanh::{gelu_tanh, GeluTanh};
pub use linear::Linear;
pub use quant_gather::QuantGather;
pub use quant_linear::{QuantLinear, QuantLinearInputs};
pub use reshape::Reshape;
pub use rms_norm::RmsNorm;
pub use rope::Rope;
pub use scale::Scale;
pub use silu::Silu;
pub use slice::Slice;
pub use soft_cap::SoftCap;
pub use swiglu::SwiGlu;
pub use transpose::Transpose;

use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// A failure while evaluating an op on concrete data (types were already
/// checked; this is about values, such as an out-of-range token id).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KernelError(pub String);

/// What every op provides.
pub trait OpSpec {
    /// The op's name as dumps and backends print it.
    const NAME: &'static str;

    /// The output type for these input types, or why they are not accepted.
    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String>;

    /// Reference semantics in f32. `inputs` have the types `infer` accepted.
    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError>;
}

macro_rules! op_set {
    ($($variant:ident),* $(,)?) => {
        /// One IR op with its attributes.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "op")]
        pub enum Op {
            $($variant($variant),)*
        }

        impl Op {
            pub fn name(&self) -> &'static str {
                match self {
                    $(Op::$variant(_) => <$variant as OpSpec>::NAME,)*
                }
            }

            pub fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
                match self {
                    $(Op::$variant(op) => op.infer(inputs),)*
                }
            }

            pub fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
                match self {
                    $(Op::$variant(op) => op.eval(inputs),)*
                }
            }
        }

        $(impl From<$variant> for Op {
            fn from(op: $variant) -> Op {
                Op::$variant(op)
            }
        })*
    };
}

op_set!(
    Gather,
    Linear,
    QuantGather,
    QuantLinear,
    Add,
    Mul,
    RmsNorm,
    Rope,
    Attention,
    Silu,
    GeluTanh,
    Scale,
    SoftCap,
    SwiGlu,
    Reshape,
    Transpose,
    Concat,
    Slice
);

/// The row an index picks from a table of `rows` rows, or why it cannot.
pub(crate) fn table_row(index: i64, rows: usize) -> Result<usize, KernelError> {
    usize::try_from(index)
        .ok()
        .filter(|&r| r < rows)
        .ok_or_else(|| KernelError(format!("index {index} is outside the table's {rows} rows")))
}

/// Checks the input count, for `infer` implementations.
pub(crate) fn expect_inputs(
    inputs: &[&TensorType],
    allowed: std::ops::RangeInclusive<usize>,
) -> Result<(), String> {
    if allowed.contains(&inputs.len()) {
        Ok(())
    } else if allowed.start() == allowed.end() {
        Err(format!(
            "takes {} inputs, got {}",
            allowed.start(),
            inputs.len()
        ))
    } else {
        Err(format!(
            "takes {} to {} inputs, got {}",
            allowed.start(),
            allowed.end(),
            inputs.len()
        ))
    }
}

/// Checks that an input is a float tensor of the given rank (`None`: any rank).
pub(crate) fn expect_float(ty: &TensorType, what: &str, rank: Option<usize>) -> Result<(), String> {
    if !ty.dtype.is_float() {
        return Err(format!("{what} must be a float tensor, got {ty}"));
    }
    match rank {
        Some(r) if ty.rank() != r => Err(format!("{what} must have rank {r}, got {ty}")),
        _ => Ok(()),
    }
}

/// Activations are computed in f32 in the IR; weights keep their stored dtype.
pub(crate) fn expect_f32(ty: &TensorType, what: &str) -> Result<(), String> {
    if ty.dtype != crate::ir::DType::F32 {
        return Err(format!("{what} must be f32, got {ty}"));
    }
    Ok(())
}

/// The type rule of an op applied to each element of one f32 tensor: the
/// input's own type.
pub(crate) fn elementwise_type(inputs: &[&TensorType]) -> Result<TensorType, String> {
    expect_inputs(inputs, 1..=1)?;
    expect_f32(inputs[0], "x")?;
    Ok(inputs[0].clone())
}

/// The reference of such an op: `f` on every element.
pub(crate) fn map_elements(x: &Tensor, f: impl Fn(f32) -> f32) -> Tensor {
    Tensor::from_f32(x.shape().to_vec(), x.f32s().iter().map(|&v| f(v)).collect())
}
