//! `RmsNorm`: `x / sqrt(mean(x², last axis) + eps) · w`, as Llama-family
//! models define it. Inputs `x [..., D]` f32 and `w [D]`.

use super::{expect_f32, expect_float, expect_inputs, KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RmsNorm {
    pub eps: f32,
}

impl OpSpec for RmsNorm {
    const NAME: &'static str = "RmsNorm";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        expect_inputs(inputs, 2..=2)?;
        let (x, w) = (inputs[0], inputs[1]);
        expect_f32(x, "x")?;
        expect_float(w, "weight", Some(1))?;
        if x.shape.last() != Some(&w.shape[0]) {
            return Err(format!("weight {w} does not match the last axis of {x}"));
        }
        Ok(x.clone())
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        let (x, w) = (inputs[0], inputs[1]);
        let w = w.f32s();
        let d = w.len();
        let mut out = Vec::with_capacity(x.numel());
        for row in x.f32s().chunks_exact(d) {
            // The SIMD dot product: lane-split sums, as precise as a plain loop and faster.
            let mean_square = crate::interp::linalg::dot(row, row) / d as f32;
            let scale = 1.0 / (mean_square + self.eps).sqrt();
            out.extend(row.iter().zip(w).map(|(v, g)| v * scale * g));
        }
        Ok(Tensor::from_f32(x.shape().to_vec(), out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_each_row() {
        let x = Tensor::from_f32([2, 2], vec![3., 4., 1., 1.]);
        let w = Tensor::from_f32([2], vec![1., 2.]);
        let y = RmsNorm { eps: 0.0 }.eval(&[&x, &w]).unwrap();
        let r = (12.5f32).sqrt();
        let expected = [3. / r, 8. / r, 1., 2.];
        for (a, b) in y.f32s().iter().zip(expected) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
