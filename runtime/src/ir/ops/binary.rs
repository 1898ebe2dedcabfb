//! Elementwise `Add` and `Mul` with numpy broadcasting, f32.

use super::{expect_f32, expect_inputs, KernelError, OpSpec};
use crate::ir::{broadcast_shapes, TensorType};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Add;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mul;

fn infer_binary(inputs: &[&TensorType]) -> Result<TensorType, String> {
    expect_inputs(inputs, 2..=2)?;
    expect_f32(inputs[0], "lhs")?;
    expect_f32(inputs[1], "rhs")?;
    let shape = broadcast_shapes(&inputs[0].shape, &inputs[1].shape)
        .ok_or_else(|| format!("cannot broadcast {} with {}", inputs[0], inputs[1]))?;
    Ok(TensorType::f32(shape))
}

/// Applies `f` elementwise under broadcasting. The common cases (equal
/// shapes, a trailing vector) take a direct loop; the rest index generally.
fn eval_binary(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> Tensor {
    let shape = broadcast_shapes(a.shape(), b.shape()).expect("types were checked");
    let (x, y) = (a.f32s(), b.f32s());
    let numel: usize = shape.iter().product();
    let out: Vec<f32> = if x.len() == numel && y.len() == numel {
        x.iter().zip(y).map(|(&p, &q)| f(p, q)).collect()
    } else if x.len() == numel && a.shape().ends_with(b.shape()) {
        x.chunks_exact(y.len())
            .flat_map(|row| row.iter().zip(y).map(|(&p, &q)| f(p, q)))
            .collect()
    } else {
        let rank = shape.len();
        let strides = |s: &[usize]| {
            let mut strides = vec![0; rank];
            let mut acc = 1;
            for i in (0..s.len()).rev() {
                strides[rank - s.len() + i] = if s[i] == 1 { 0 } else { acc };
                acc *= s[i];
            }
            strides
        };
        let (sa, sb) = (strides(a.shape()), strides(b.shape()));
        let mut index = vec![0usize; rank];
        let mut out = Vec::with_capacity(numel);
        for _ in 0..numel {
            let ia: usize = index.iter().zip(&sa).map(|(i, s)| i * s).sum();
            let ib: usize = index.iter().zip(&sb).map(|(i, s)| i * s).sum();
            out.push(f(x[ia], y[ib]));
            for axis in (0..rank).rev() {
                index[axis] += 1;
                if index[axis] < shape[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
        out
    };
    Tensor::from_f32(shape, out)
}

impl OpSpec for Add {
    const NAME: &'static str = "Add";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        infer_binary(inputs)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        Ok(eval_binary(inputs[0], inputs[1], |a, b| a + b))
    }
}

impl OpSpec for Mul {
    const NAME: &'static str = "Mul";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        infer_binary(inputs)
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        Ok(eval_binary(inputs[0], inputs[1], |a, b| a * b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasts_like_numpy() {
        let a = Tensor::from_f32([2, 1], vec![1., 2.]);
        let b = Tensor::from_f32([1, 3], vec![10., 20., 30.]);
        let c = Add.eval(&[&a, &b]).unwrap();
        assert_eq!(c.shape(), &[2, 3]);
        assert_eq!(c.f32s(), &[11., 21., 31., 12., 22., 32.]);
        let v = Tensor::from_f32([3], vec![1., 2., 3.]);
        let m = Mul.eval(&[&c, &v]).unwrap();
        assert_eq!(m.f32s(), &[11., 42., 93., 12., 44., 96.]);
    }
}
