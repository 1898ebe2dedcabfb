//! `Slice`: elements `[start, end)` along one axis (one layer of the KV cache).

use super::{expect_inputs, KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slice {
    pub axis: usize,
    pub start: usize,
    pub end: usize,
}

impl OpSpec for Slice {
    const NAME: &'static str = "Slice";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        expect_inputs(inputs, 1..=1)?;
        let x = inputs[0];
        if self.axis >= x.rank() || self.start >= self.end || self.end > x.shape[self.axis] {
            return Err(format!(
                "range {}..{} on axis {} is not inside {x}",
                self.start, self.end, self.axis
            ));
        }
        let mut shape = x.shape.clone();
        shape[self.axis] = self.end - self.start;
        Ok(TensorType::new(x.dtype, shape))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        Ok(inputs[0].slice(self.axis, self.start, self.end))
    }
}
