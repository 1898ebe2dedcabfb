//! `QuantGather`: rows of a quantized table picked by integer indices (an
//! embedding stored low-bit, often the same tensors as a tied LM head's
//! `QuantLinear`). Inputs: `q [V, D]`, `scale [V, G]`, `min [V, G]` if
//! `weights.offset`, then `indices` i64. Each row is dequantized as
//! [`crate::ir::quant`] defines it. Output `indices.shape ++ [D]`, f32.

use super::{expect_inputs, KernelError, OpSpec};
use crate::ir::quant::{q_at, WeightQuant};
use crate::ir::{DType, TensorType};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantGather {
    pub weights: WeightQuant,
}

impl OpSpec for QuantGather {
    const NAME: &'static str = "QuantGather";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        let count = if self.weights.offset { 4 } else { 3 };
        expect_inputs(inputs, count..=count)?;
        let min = self.weights.offset.then(|| inputs[2]);
        let (_, d) = self.weights.check_shapes(inputs[0], inputs[1], min)?;
        let indices = inputs[count - 1];
        if indices.dtype != DType::I64 {
            return Err(format!("indices must be i64, got {indices}"));
        }
        let mut shape = indices.shape.clone();
        shape.push(d);
        Ok(TensorType::f32(shape))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        let s = &self.weights;
        let q = inputs[0];
        let (rows, d) = (q.shape()[0], q.shape()[1]);
        let bytes = q.quantized_bytes();
        let scale = inputs[1].f32s();
        let min = s.offset.then(|| inputs[2].f32s());
        let indices = inputs[inputs.len() - 1];
        let groups = s.groups(d);
        let mut out = Vec::with_capacity(indices.numel() * d);
        for &index in indices.i64s() {
            let row = super::table_row(index, rows)?;
            out.extend((0..d).map(|k| {
                let g = row * groups + k / s.group_size;
                let mn = min.map_or(s.implied_min(scale[g]), |m| m[g]);
                (q_at(s.bits, bytes, d, row, k) as f32).mul_add(scale[g], mn)
            }));
        }
        let mut shape = indices.shape().to_vec();
        shape.push(d);
        Ok(Tensor::from_f32(shape, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::quant::quantize;
    use std::sync::Arc;

    #[test]
    fn rows_are_the_dequantized_rows() {
        let (v, d) = (5, 64);
        let w: Vec<f32> = (0..v * d)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let scheme = WeightQuant {
            bits: 4,
            group_size: 32,
            offset: true,
        };
        let m = quantize(&w, v, d, scheme).unwrap();
        let q = Tensor::quantized(DType::U4, vec![v, d], Arc::new(m.q.clone()), 0, m.q.len());
        let f = |x: &[half::f16]| Tensor::from_f32([v, 2], x.iter().map(|h| h.to_f32()).collect());
        let ids = Tensor::from_i64([1, 2], vec![3, 0]);
        let out = QuantGather { weights: scheme }
            .eval(&[&q, &f(&m.scale), &f(&m.min), &ids])
            .unwrap();
        let deq = m.dequantize();
        assert_eq!(out.shape(), &[1, 2, d]);
        assert_eq!(&out.f32s()[..d], &deq[3 * d..4 * d]);
        assert_eq!(&out.f32s()[d..], &deq[..d]);
        let bad = Tensor::from_i64([1], vec![5]);
        assert!(QuantGather { weights: scheme }
            .eval(&[&q, &f(&m.scale), &f(&m.min), &bad])
            .is_err());
    }
}
