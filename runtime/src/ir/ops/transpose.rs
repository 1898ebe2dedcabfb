//! `Transpose`: permutes axes; output axis `i` is input axis `perm[i]`.

use super::{expect_f32, expect_inputs, KernelError, OpSpec};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transpose {
    pub perm: Vec<usize>,
}

impl OpSpec for Transpose {
    const NAME: &'static str = "Transpose";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        expect_inputs(inputs, 1..=1)?;
        let x = inputs[0];
        expect_f32(x, "x")?;
        let mut seen = vec![false; x.rank()];
        for &axis in &self.perm {
            if axis >= x.rank() || std::mem::replace(&mut seen[axis], true) {
                return Err(format!(
                    "{:?} is not a permutation of the axes of {x}",
                    self.perm
                ));
            }
        }
        if self.perm.len() != x.rank() {
            return Err(format!(
                "{:?} is not a permutation of the axes of {x}",
                self.perm
            ));
        }
        Ok(TensorType::f32(
            self.perm.iter().map(|&a| x.shape[a]).collect::<Vec<_>>(),
        ))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        let x = inputs[0];
        let in_shape = x.shape();
        let rank = in_shape.len();
        let out_shape: Vec<usize> = self.perm.iter().map(|&a| in_shape[a]).collect();
        let mut in_strides = vec![1usize; rank];
        for i in (0..rank.saturating_sub(1)).rev() {
            in_strides[i] = in_strides[i + 1] * in_shape[i + 1];
        }
        // Strides of the input, in output axis order; the innermost output
        // axis is copied as a strided run.
        let strides: Vec<usize> = self.perm.iter().map(|&a| in_strides[a]).collect();
        let src = x.f32s();
        let numel = x.numel();
        let mut out = Vec::with_capacity(numel);
        if rank == 0 || numel == 0 {
            return Ok(Tensor::from_f32(out_shape, src.to_vec()));
        }
        let inner = out_shape[rank - 1];
        let inner_stride = strides[rank - 1];
        let mut index = vec![0usize; rank - 1];
        for _ in 0..numel / inner {
            let base: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
            if inner_stride == 1 {
                // The last axis stays last (heads ↔ tokens): whole rows move.
                out.extend_from_slice(&src[base..base + inner]);
            } else {
                out.extend((0..inner).map(|j| src[base + j * inner_stride]));
            }
            for axis in (0..rank - 1).rev() {
                index[axis] += 1;
                if index[axis] < out_shape[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
        Ok(Tensor::from_f32(out_shape, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_middle_axes() {
        // [1, 2, 3, 1] → [1, 3, 2, 1]
        let x = Tensor::from_f32([1, 2, 3, 1], vec![0., 1., 2., 3., 4., 5.]);
        let y = Transpose {
            perm: vec![0, 2, 1, 3],
        }
        .eval(&[&x])
        .unwrap();
        assert_eq!(y.shape(), &[1, 3, 2, 1]);
        assert_eq!(y.f32s(), &[0., 3., 1., 4., 2., 5.]);
    }

    #[test]
    fn rejects_a_bad_permutation() {
        let x = TensorType::f32([2, 3]);
        assert!(Transpose { perm: vec![0, 0] }.infer(&[&x]).is_err());
        assert!(Transpose { perm: vec![0] }.infer(&[&x]).is_err());
    }
}
