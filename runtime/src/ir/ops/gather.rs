//! `Gather`: rows of a table picked by integer indices (embedding lookup,
//! RoPE cos/sin tables by position). Output: `indices.shape ++ table.shape[1..]`, f32.

use super::{expect_inputs, KernelError, OpSpec};
use crate::ir::{DType, TensorType};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gather;

impl OpSpec for Gather {
    const NAME: &'static str = "Gather";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        expect_inputs(inputs, 2..=2)?;
        let (table, indices) = (inputs[0], inputs[1]);
        if !table.dtype.is_float() || table.rank() < 1 {
            return Err(format!(
                "table must be a float tensor of rank ≥ 1, got {table}"
            ));
        }
        if indices.dtype != DType::I64 {
            return Err(format!("indices must be i64, got {indices}"));
        }
        let mut shape = indices.shape.clone();
        shape.extend_from_slice(&table.shape[1..]);
        Ok(TensorType::f32(shape))
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        let (table, indices) = (inputs[0], inputs[1]);
        let rows = table.shape()[0];
        let row_len: usize = table.shape()[1..].iter().product();
        let data = table.f32s();
        let mut out = Vec::with_capacity(indices.numel() * row_len);
        for &index in indices.i64s() {
            let row = super::table_row(index, rows)?;
            out.extend_from_slice(&data[row * row_len..(row + 1) * row_len]);
        }
        let mut shape = indices.shape().to_vec();
        shape.extend_from_slice(&table.shape()[1..]);
        Ok(Tensor::from_f32(shape, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_rows_and_rejects_out_of_range() {
        let table = Tensor::from_f32([3, 2], vec![0., 1., 10., 11., 20., 21.]);
        let ids = Tensor::from_i64([1, 2], vec![2, 0]);
        let out = Gather.eval(&[&table, &ids]).unwrap();
        assert_eq!(out.shape(), &[1, 2, 2]);
        assert_eq!(out.f32s(), &[20., 21., 0., 1.]);
        let bad = Tensor::from_i64([1], vec![3]);
        assert!(Gather
            .eval(&[&table, &bad])
            .unwrap_err()
            .0
            .contains("outside"));
        let neg = Tensor::from_i64([1], vec![-1]);
        assert!(Gather.eval(&[&table, &neg]).is_err());
    }
}
