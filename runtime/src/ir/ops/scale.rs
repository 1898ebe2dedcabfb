//! `Scale`: `x · factor` for a constant `factor` (Gemma's embeddings times
//! √hidden). Backends hold the factor in the activation dtype.

use super::{expect_f32, expect_inputs, KernelError, OpSpec};
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
        expect_inputs(inputs, 1..=1)?;
        expect_f32(inputs[0], "x")?;
        if !self.factor.is_finite() {
            return Err(format!("factor {} is not finite", self.factor));
        }
        Ok(inputs[0].clone())
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        let x = inputs[0];
        Ok(Tensor::from_f32(
            x.shape().to_vec(),
            x.f32s().iter().map(|&v| v * self.factor).collect(),
        ))
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
