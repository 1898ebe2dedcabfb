//! `Silu`: `x · sigmoid(x)`.

use super::{expect_f32, expect_inputs, KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Silu;

pub(super) use crate::interp::math::silu;

impl OpSpec for Silu {
    const NAME: &'static str = "Silu";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        expect_inputs(inputs, 1..=1)?;
        expect_f32(inputs[0], "x")?;
        Ok(inputs[0].clone())
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        let x = inputs[0];
        Ok(Tensor::from_f32(
            x.shape().to_vec(),
            x.f32s().iter().map(|&v| silu(v)).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition() {
        let y = Silu
            .eval(&[&Tensor::from_f32([3], vec![0., 1., -2.])])
            .unwrap();
        let expected = [0., 1. / (1. + (-1f32).exp()), -2. / (1. + 2f32.exp())];
        for (a, b) in y.f32s().iter().zip(expected) {
            assert!((a - b).abs() < 1e-7);
        }
    }
}
