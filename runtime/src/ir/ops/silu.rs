//! `Silu`: `x · sigmoid(x)`.

use super::{elementwise_type, map_elements, KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Silu;

pub(super) use crate::interp::math::silu;

impl OpSpec for Silu {
    const NAME: &'static str = "Silu";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        elementwise_type(inputs)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        Ok(map_elements(inputs[0], silu))
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
