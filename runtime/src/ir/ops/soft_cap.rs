//! `SoftCap`: `cap · tanh(x / cap)`, Gemma 2's soft-capping of the final
//! logits (and, inside `Attention`, of the attention scores). Source:
//! transformers' `models/gemma2/modeling_gemma2.py`
//! (https://github.com/huggingface/transformers/tree/main/src/transformers/models/gemma2).

use super::{elementwise_type, map_elements, KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SoftCap {
    pub cap: f32,
}

/// The reference: divide, libm's `tanh`, multiply, as transformers writes it.
#[inline(always)]
pub fn soft_cap(x: f32, cap: f32) -> f32 {
    (x / cap).tanh() * cap
}

impl OpSpec for SoftCap {
    const NAME: &'static str = "SoftCap";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        if !(self.cap.is_finite() && self.cap > 0.0) {
            return Err(format!("cap must be a positive number, got {}", self.cap));
        }
        elementwise_type(inputs)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        Ok(map_elements(inputs[0], |v| soft_cap(v, self.cap)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_smoothly() {
        let x = Tensor::from_f32([4], vec![0.0, 1.0, 30.0, -1000.0]);
        let y = SoftCap { cap: 30.0 }.eval(&[&x]).unwrap();
        let want = [
            0.0,
            30.0 * (1.0f32 / 30.0).tanh(),
            30.0 * 1f32.tanh(),
            -30.0,
        ];
        for (a, b) in y.f32s().iter().zip(want) {
            assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
        }
        assert!(SoftCap { cap: 0.0 }
            .infer(&[&TensorType::f32([1])])
            .unwrap_err()
            .contains("positive"));
    }
}
