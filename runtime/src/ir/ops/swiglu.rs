//! `SwiGlu`: `silu(gate) · up`, the gated MLP activation. The frontend emits
//! `Mul(Silu(gate), up)`; a fusion pass turns it into this op.

use super::silu::silu;
use super::{expect_f32, expect_inputs, KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Elements per parallel task.
const PARALLEL_CHUNK: usize = 16 * 1024;

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
        // exp dominates: spread large tensors (a prefill chunk) over the threads.
        out.par_chunks_mut(PARALLEL_CHUNK)
            .zip(
                gate.f32s()
                    .par_chunks(PARALLEL_CHUNK)
                    .zip(up.f32s().par_chunks(PARALLEL_CHUNK)),
            )
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = silu(g) * u;
                }
            });
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
