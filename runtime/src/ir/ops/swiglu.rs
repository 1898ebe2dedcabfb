//! `SwiGlu`: `silu(gate) · up`, the gated MLP activation. The frontend emits
//! `Mul(Silu(gate), up)`; a fusion pass turns it into this op.

use super::{expect_f32, expect_inputs, KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwiGlu;

impl OpSpec for SwiGlu {
    const NAME: &'static str = "SwiGlu";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        expect_inputs(inputs, 2..=2)?;
        expect_f32(inputs[0], "gate")?;
        expect_f32(inputs[1], "up")?;
        if inputs[0].shape != inputs[1].shape {
            return Err(format!(
                "gate {} and up {} differ in shape",
                inputs[0], inputs[1]
            ));
        }
        Ok(inputs[0].clone())
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        let (gate, up) = (inputs[0], inputs[1]);
        let mut out = vec![0f32; gate.numel()];
        // Vectorized, it is cheaper than waking the worker threads.
        crate::interp::math::swiglu_into(gate.f32s(), up.f32s(), &mut out);
        Ok(Tensor::from_f32(gate.shape().to_vec(), out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ops::{Mul, Silu};

    #[test]
    fn equals_mul_of_silu() {
        let g = Tensor::from_f32([4], vec![-1.5, 0.2, 3.0, -0.1]);
        let u = Tensor::from_f32([4], vec![2.0, -1.0, 0.5, 4.0]);
        let fused = SwiGlu.eval(&[&g, &u]).unwrap();
        let s = Silu.eval(&[&g]).unwrap();
        let unfused = Mul.eval(&[&s, &u]).unwrap();
        assert_eq!(fused.f32s(), unfused.f32s());
    }
}
