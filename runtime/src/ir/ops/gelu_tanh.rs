//! `GeluTanh`: GELU in its tanh approximation (PyTorch's
//! `gelu(approximate="tanh")`, transformers' `gelu_pytorch_tanh`):
//! `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))`.
//! Source: https://pytorch.org/docs/stable/generated/torch.nn.GELU.html

use super::{elementwise_type, map_elements, KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GeluTanh;

/// `√(2/π)`.
pub const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic term's coefficient.
pub const CUBIC: f32 = 0.044_715;

/// The reference: the formula as PyTorch writes it, with libm's `tanh`.
pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + CUBIC * x * x * x)).tanh())
}

impl OpSpec for GeluTanh {
    const NAME: &'static str = "GeluTanh";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        elementwise_type(inputs)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        Ok(map_elements(inputs[0], gelu_tanh))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_pytorch_values() {
        // torch.nn.functional.gelu(torch.tensor([...]), approximate="tanh")
        // (torch 2.15, float64, rounded to f32).
        let x = [-3.0f32, -1.0, -0.1, 0.0, 0.5, 2.0, 10.0];
        let want = [
            -0.003_637_392,
            -0.158_808,
            -0.046_017_25,
            0.0,
            0.345_714,
            1.954_597_7,
            10.0,
        ];
        let y = GeluTanh
            .eval(&[&Tensor::from_f32([7], x.to_vec())])
            .unwrap();
        for ((a, b), x) in y.f32s().iter().zip(want).zip(x) {
            assert!((a - b).abs() <= 1e-6, "gelu_tanh({x}) = {a}, PyTorch {b}");
        }
        assert!(gelu_tanh(f32::NAN).is_nan());
    }
}
