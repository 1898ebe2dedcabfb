//! `Rope`: rotary position embedding in the "rotate half" form used by
//! Hugging Face Llama-family models: `x·cos + rotate_half(x)·sin`, where
//! `rotate_half([a, b]) = [-b, a]` on the two halves of the head dimension.
//! Inputs: `x [B, H, T, D]`, `cos [B, T, D]`, `sin [B, T, D]` (already
//! gathered by position; the frontend builds the tables, scaling included).

use super::{expect_f32, expect_inputs, KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rope;

impl OpSpec for Rope {
    const NAME: &'static str = "Rope";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        expect_inputs(inputs, 3..=3)?;
        let (x, cos, sin) = (inputs[0], inputs[1], inputs[2]);
        for (ty, what) in [(x, "x"), (cos, "cos"), (sin, "sin")] {
            expect_f32(ty, what)?;
        }
        if x.rank() != 4 || x.shape[3] % 2 != 0 {
            return Err(format!(
                "x must be [batch, heads, tokens, even head_dim], got {x}"
            ));
        }
        let table = [x.shape[0], x.shape[2], x.shape[3]];
        if cos.shape != table || sin.shape != table {
            return Err(format!(
                "cos {cos} and sin {sin} must be {table:?} to match x {x}"
            ));
        }
        Ok(x.clone())
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        let (x, cos, sin) = (inputs[0], inputs[1].f32s(), inputs[2].f32s());
        let [batch, heads, tokens, dim] = x.shape().try_into().expect("rank checked");
        let half = dim / 2;
        let src = x.f32s();
        let mut out = vec![0f32; src.len()];
        for b in 0..batch {
            for h in 0..heads {
                for t in 0..tokens {
                    let row = ((b * heads + h) * tokens + t) * dim;
                    let table = (b * tokens + t) * dim;
                    let (xs, ys) = (&src[row..row + dim], &mut out[row..row + dim]);
                    let (c, s) = (&cos[table..table + dim], &sin[table..table + dim]);
                    for i in 0..half {
                        ys[i] = xs[i] * c[i] - xs[i + half] * s[i];
                        ys[i + half] = xs[i + half] * c[i + half] + xs[i] * s[i + half];
                    }
                }
            }
        }
        Ok(Tensor::from_f32(x.shape().to_vec(), out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_pairs_of_halves() {
        // One head, one token, dim 4: pairs (x0, x2) and (x1, x3) rotate by the angles.
        let x = Tensor::from_f32([1, 1, 1, 4], vec![1., 2., 3., 4.]);
        let angle = [0.5f32, 1.5, 0.5, 1.5];
        let cos = Tensor::from_f32([1, 1, 4], angle.iter().map(|a| a.cos()).collect());
        let sin = Tensor::from_f32([1, 1, 4], angle.iter().map(|a| a.sin()).collect());
        let y = Rope.eval(&[&x, &cos, &sin]).unwrap();
        let (c0, s0, c1, s1) = (0.5f32.cos(), 0.5f32.sin(), 1.5f32.cos(), 1.5f32.sin());
        let expected = [
            1. * c0 - 3. * s0,
            2. * c1 - 4. * s1,
            3. * c0 + 1. * s0,
            4. * c1 + 2. * s1,
        ];
        for (a, b) in y.f32s().iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
