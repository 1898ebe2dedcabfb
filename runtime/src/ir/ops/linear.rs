//! `Linear`: `y = x · Wᵀ (+ b)` with `W` in Hugging Face's `[out, in]` layout.
//! Inputs: `x [..., K]` f32, `W [N, K]`, optional `b [N]`. Output `[..., N]` f32.

use super::{expect_f32, expect_float, expect_inputs, KernelError, OpSpec};
use crate::interp::linalg;
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Linear;

impl OpSpec for Linear {
    const NAME: &'static str = "Linear";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        expect_inputs(inputs, 2..=3)?;
        let (x, w) = (inputs[0], inputs[1]);
        expect_f32(x, "x")?;
        expect_float(w, "weight", Some(2))?;
        let k = *x.shape.last().ok_or("x must have rank ≥ 1")?;
        let (n, wk) = (w.shape[0], w.shape[1]);
        if wk != k {
            return Err(format!(
                "x has {k} features but the weight {w} expects {wk}"
            ));
        }
        if let Some(bias) = inputs.get(2) {
            expect_float(bias, "bias", Some(1))?;
            if bias.shape[0] != n {
                return Err(format!(
                    "bias {bias} does not match the weight's {n} outputs"
                ));
            }
        }
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = n;
        Ok(TensorType::f32(shape))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        let (x, w) = (inputs[0], inputs[1]);
        let (n, k) = (w.shape()[0], w.shape()[1]);
        let m = x.numel() / k;
        let mut out = linalg::matmul_transposed(x.f32s(), w.f32s(), m, k, n);
        if let Some(bias) = inputs.get(2) {
            let bias = bias.f32s();
            for row in out.chunks_exact_mut(n) {
                for (y, b) in row.iter_mut().zip(bias) {
                    *y += b;
                }
            }
        }
        let mut shape = x.shape().to_vec();
        *shape.last_mut().unwrap() = n;
        Ok(Tensor::from_f32(shape, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplies_by_the_transposed_weight_and_adds_bias() {
        let x = Tensor::from_f32([1, 2], vec![1., 2.]);
        let w = Tensor::from_f32([3, 2], vec![1., 0., 0., 1., 1., 1.]);
        let b = Tensor::from_f32([3], vec![0.5, 0., -1.]);
        let y = Linear.eval(&[&x, &w, &b]).unwrap();
        assert_eq!(y.f32s(), &[1.5, 2., 2.]);
    }

    #[test]
    fn rejects_mismatched_features() {
        let x = TensorType::f32([1, 4]);
        let w = TensorType::f32([3, 5]);
        assert!(Linear.infer(&[&x, &w]).unwrap_err().contains("4 features"));
    }
}
