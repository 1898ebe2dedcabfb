//! Tensors as the reference interpreter holds them: a shape and a shared,
//! immutable buffer. Reshapes and outer-axis slices share the buffer, so
//! selecting one layer's slice of the KV cache copies nothing.

use crate::ir::DType;
use std::sync::Arc;

/// Storage behind a tensor.
pub enum Buffer {
    F32(Vec<f32>),
    I64(Vec<i64>),
    /// f32 data inside memory owned elsewhere (a memory-mapped weight file).
    /// The byte range is 4-byte aligned; [`Buffer::mapped_f32`] checks it.
    MappedF32 {
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        byte_offset: usize,
        len: usize,
    },
    /// Quantized weights (`i8` or `u4`, see [`crate::ir::quant`]) as stored:
    /// `numel` elements in `len` bytes at `byte_offset` of `owner`.
    Quantized {
        dtype: DType,
        numel: usize,
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        byte_offset: usize,
        len: usize,
    },
}

impl Buffer {
    /// Borrows `len` f32 values at `byte_offset` of `owner` without copying,
    /// or returns `None` when the bytes are not aligned for f32 (or out of range).
    pub fn mapped_f32(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        byte_offset: usize,
        len: usize,
    ) -> Option<Buffer> {
        let bytes = (*owner).as_ref().get(byte_offset..byte_offset + len * 4)?;
        if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>()) {
            return None;
        }
        Some(Buffer::MappedF32 {
            owner,
            byte_offset,
            len,
        })
    }

    fn dtype(&self) -> DType {
        match self {
            Buffer::F32(_) | Buffer::MappedF32 { .. } => DType::F32,
            Buffer::I64(_) => DType::I64,
            Buffer::Quantized { dtype, .. } => *dtype,
        }
    }

    fn len(&self) -> usize {
        match self {
            Buffer::F32(v) => v.len(),
            Buffer::I64(v) => v.len(),
            Buffer::MappedF32 { len, .. } => *len,
            Buffer::Quantized { numel, .. } => *numel,
        }
    }

    fn f32s(&self) -> Option<&[f32]> {
        match self {
            Buffer::F32(v) => Some(v),
            Buffer::MappedF32 {
                owner,
                byte_offset,
                len,
            } => {
                let bytes = &(**owner).as_ref()[*byte_offset..*byte_offset + len * 4];
                Some(bytemuck::cast_slice(bytes))
            }
            Buffer::I64(_) | Buffer::Quantized { .. } => None,
        }
    }
}

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    buffer: Arc<Buffer>,
    /// Offset of the first element in the buffer.
    offset: usize,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({}{:?})", self.dtype(), self.shape)
    }
}

impl Tensor {
    pub fn from_buffer(shape: Vec<usize>, buffer: Arc<Buffer>) -> Tensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            buffer.len(),
            "tensor shape {shape:?} does not match its buffer"
        );
        Tensor {
            shape,
            buffer,
            offset: 0,
        }
    }

    pub fn from_f32(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Tensor {
        Self::from_buffer(shape.into(), Arc::new(Buffer::F32(data)))
    }

    pub fn from_i64(shape: impl Into<Vec<usize>>, data: Vec<i64>) -> Tensor {
        Self::from_buffer(shape.into(), Arc::new(Buffer::I64(data)))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        self.buffer.dtype()
    }

    /// The f32 elements. Calling this on an i64 or quantized tensor is a bug
    /// in a kernel (graph validation guarantees the dtypes), hence the panic.
    pub fn f32s(&self) -> &[f32] {
        let all = self
            .buffer
            .f32s()
            .expect("kernel read an i64 or quantized tensor as plain f32");
        &all[self.offset..self.offset + self.numel()]
    }

    /// A quantized tensor built from its stored bytes (`i8` or `u4`).
    pub fn quantized(
        dtype: DType,
        shape: Vec<usize>,
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        byte_offset: usize,
        len: usize,
    ) -> Tensor {
        assert!(matches!(dtype, DType::I8 | DType::U4));
        let numel = shape.iter().product::<usize>();
        assert_eq!((numel * dtype.bits()).div_ceil(8), len);
        assert!((*owner).as_ref().len() >= byte_offset + len);
        Self::from_buffer(
            shape,
            Arc::new(Buffer::Quantized {
                dtype,
                numel,
                owner,
                byte_offset,
                len,
            }),
        )
    }

    /// The stored bytes of a whole quantized tensor. Like [`Self::f32s`],
    /// calling it on another kind of tensor is a bug in a kernel.
    pub fn quantized_bytes(&self) -> &[u8] {
        match &*self.buffer {
            Buffer::Quantized {
                owner,
                byte_offset,
                len,
                ..
            } if self.offset == 0 => &(**owner).as_ref()[*byte_offset..*byte_offset + *len],
            _ => panic!("kernel read a non-quantized tensor (or a slice of one) as quantized"),
        }
    }

    pub fn i64s(&self) -> &[i64] {
        match &*self.buffer {
            Buffer::I64(v) => &v[self.offset..self.offset + self.numel()],
            _ => panic!("kernel read an f32 tensor as i64"),
        }
    }

    /// The same elements under another shape of equal size.
    pub fn reshaped(&self, shape: Vec<usize>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), self.numel());
        Tensor {
            shape,
            buffer: self.buffer.clone(),
            offset: self.offset,
        }
    }

    /// Elements `[start, end)` along `axis`. Shares the buffer when every axis
    /// before `axis` has size 1 (the slice is then contiguous), else copies.
    pub fn slice(&self, axis: usize, start: usize, end: usize) -> Tensor {
        let mut shape = self.shape.clone();
        shape[axis] = end - start;
        let inner: usize = self.shape[axis + 1..].iter().product();
        if self.shape[..axis].iter().all(|&d| d == 1) {
            return Tensor {
                shape,
                buffer: self.buffer.clone(),
                offset: self.offset + start * inner,
            };
        }
        let outer: usize = self.shape[..axis].iter().product();
        let stride = self.shape[axis] * inner;
        let chunk = (end - start) * inner;
        match self.dtype() {
            DType::I64 => {
                let src = self.i64s();
                let mut out = Vec::with_capacity(outer * chunk);
                for o in 0..outer {
                    out.extend_from_slice(&src[o * stride + start * inner..][..chunk]);
                }
                Tensor::from_i64(shape, out)
            }
            _ => {
                let src = self.f32s();
                let mut out = Vec::with_capacity(outer * chunk);
                for o in 0..outer {
                    out.extend_from_slice(&src[o * stride + start * inner..][..chunk]);
                }
                Tensor::from_f32(shape, out)
            }
        }
    }

    /// Gives back the buffer for writing when this tensor is its only user
    /// and covers all of it (the session uses this to update the KV cache in place).
    /// Whether another tensor holds this one's buffer (then
    /// [`into_f32_vec`](Self::into_f32_vec) copies it).
    pub fn shares_buffer(&self) -> bool {
        Arc::strong_count(&self.buffer) > 1
    }

    pub fn into_f32_vec(self) -> Vec<f32> {
        let whole = self.offset == 0 && self.numel() == self.buffer.len();
        match Arc::try_unwrap(self.buffer) {
            Ok(Buffer::F32(v)) if whole => v,
            Ok(buffer) => {
                let all = buffer.f32s().expect("into_f32_vec on an i64 tensor");
                all[self.offset..self.offset + self.shape.iter().product::<usize>()].to_vec()
            }
            Err(shared) => {
                let all = shared.f32s().expect("into_f32_vec on an i64 tensor");
                all[self.offset..self.offset + self.shape.iter().product::<usize>()].to_vec()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outer_slices_share_and_inner_slices_copy() {
        let t = Tensor::from_f32([2, 3], (0..6).map(|x| x as f32).collect());
        let row = t.slice(0, 1, 2);
        assert_eq!(row.f32s(), &[3.0, 4.0, 5.0]);
        assert!(Arc::ptr_eq(&row.buffer, &t.buffer));
        let col = t.slice(1, 1, 3);
        assert_eq!(col.shape(), &[2, 2]);
        assert_eq!(col.f32s(), &[1.0, 2.0, 4.0, 5.0]);
    }

    #[test]
    fn into_f32_vec_reuses_an_unshared_buffer() {
        let t = Tensor::from_f32([4], vec![1.0, 2.0, 3.0, 4.0]);
        let ptr = t.f32s().as_ptr();
        let v = t.into_f32_vec();
        assert_eq!(v.as_ptr(), ptr);
    }
}
