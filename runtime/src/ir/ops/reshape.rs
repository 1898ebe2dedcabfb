//! `Reshape` to a static shape of the same size. Shares the input's buffer.

use super::{expect_inputs, KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reshape {
    pub shape: Vec<usize>,
}

impl OpSpec for Reshape {
    const NAME: &'static str = "Reshape";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        expect_inputs(inputs, 1..=1)?;
        let x = inputs[0];
        if self.shape.iter().product::<usize>() != x.numel() {
            return Err(format!("cannot reshape {x} to {:?}", self.shape));
        }
        Ok(TensorType::new(x.dtype, self.shape.clone()))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        Ok(inputs[0].reshaped(self.shape.clone()))
    }
}
