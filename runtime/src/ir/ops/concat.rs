//! `Concat` of same-dtype tensors along one axis.

use super::{KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Concat {
    pub axis: usize,
}

impl OpSpec for Concat {
    const NAME: &'static str = "Concat";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        let first = inputs.first().ok_or("takes at least one input")?;
        if self.axis >= first.rank() {
            return Err(format!("axis {} is out of range for {first}", self.axis));
        }
        let mut shape = first.shape.clone();
        shape[self.axis] = 0;
        for ty in inputs {
            let same_elsewhere = ty.rank() == first.rank()
                && ty.dtype == first.dtype
                && (0..ty.rank()).all(|a| a == self.axis || ty.shape[a] == first.shape[a]);
            if !same_elsewhere {
                return Err(format!(
                    "cannot concatenate {ty} with {first} on axis {}",
                    self.axis
                ));
            }
            shape[self.axis] += ty.shape[self.axis];
        }
        Ok(TensorType::new(first.dtype, shape))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        let first = inputs[0];
        let outer: usize = first.shape()[..self.axis].iter().product();
        let mut shape = first.shape().to_vec();
        shape[self.axis] = inputs.iter().map(|t| t.shape()[self.axis]).sum();
        let mut out = Vec::with_capacity(shape.iter().product());
        for o in 0..outer {
            for t in inputs {
                let chunk = t.numel() / outer;
                out.extend_from_slice(&t.f32s()[o * chunk..(o + 1) * chunk]);
            }
        }
        Ok(Tensor::from_f32(shape, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_along_an_inner_axis() {
        let a = Tensor::from_f32([2, 1], vec![1., 2.]);
        let b = Tensor::from_f32([2, 2], vec![3., 4., 5., 6.]);
        let c = Concat { axis: 1 }.eval(&[&a, &b]).unwrap();
        assert_eq!(c.shape(), &[2, 3]);
        assert_eq!(c.f32s(), &[1., 3., 4., 2., 5., 6.]);
    }
}
