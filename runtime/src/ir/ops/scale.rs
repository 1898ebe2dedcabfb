//! `Scale`: `x · factor` for a constant `factor` (Gemma's embeddings times
//! √hidden). Backends hold the factor in the activation dtype.

use super::{elementwise_type, map_elements, KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scale {
    pub factor: f32,
}

impl OpSpec for Scale {
    const NAME: &'static str = "Scale";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        if !self.factor.is_finite() {
            return Err(format!("factor {} is not finite", self.factor));
        }
        elementwise_type(inputs)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        Ok(map_elements(inputs[0], |v| v * self.factor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplies_every_element() {
        let x = Tensor::from_f32([3], vec![1.0, -2.0, 0.5]);
        let y = Scale { factor: 8.0 }.eval(&[&x]).unwrap();
        assert_eq!(y.f32s(), &[8.0, -16.0, 4.0]);
        let bad = Scale { factor: f32::NAN }.infer(&[&TensorType::f32([3])]);
        assert!(bad.unwrap_err().contains("not finite"));
    }
}
