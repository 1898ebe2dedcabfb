//! `QuantLinear`: `Linear` over a quantized weight (see [`crate::ir::quant`]).
//!
//! Inputs, in order: `x [..., K]` f32, `q [N, K]`, `scale [N, G]`, then
//! `min [N, G]` if `weights.offset`, `input_scale [K]` if `input_scale`, and
//! `bias [N]` if `bias`. Output `[..., N]` f32.
//!
//! - `input_scale` multiplies `x` first, channel by channel (`x'[k] =
//!   x[k] · input_scale[k]`): the inverse of a per-channel scale that
//!   SmoothQuant or AWQ folded into the weights.
//! - Weight-only (`activations: None`): `y[n] = Σ_k x'[k] · w[n, k]`,
//!   `w = fma(q, scale, min)`, summed in order of k with one fused
//!   multiply-add per term, then `+ bias`. The interpreter's kernels give
//!   these exact bits (FMA kernels; the portable one rounds each product).
//! - `DynamicInt8PerToken`: each row of `x'` is quantized to int8 (see
//!   [`ActivationQuant`]), `y[n] = (f32(Σ_k x_q[k] · q[n, k]) · scale[n]) ·
//!   s_x`, then `+ bias`: exact integer sums, so every order gives the same bits.

use super::{expect_f32, expect_float, expect_inputs, KernelError, OpSpec};
use crate::ir::quant::{q_at, quantize_activation_row, ActivationQuant, WeightQuant};
use crate::ir::TensorType;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantLinear {
    pub weights: WeightQuant,
    #[serde(default)]
    pub activations: ActivationQuant,
    #[serde(default)]
    pub input_scale: bool,
    #[serde(default)]
    pub bias: bool,
}

/// Where each input of a `QuantLinear` is.
#[derive(Clone, Copy, Debug)]
pub struct QuantLinearInputs {
    pub x: usize,
    pub q: usize,
    pub scale: usize,
    pub min: Option<usize>,
    pub input_scale: Option<usize>,
    pub bias: Option<usize>,
    pub count: usize,
}

impl QuantLinear {
    pub fn slots(&self) -> QuantLinearInputs {
        let mut next = 3;
        let mut take = |present: bool| {
            present.then(|| {
                next += 1;
                next - 1
            })
        };
        let min = take(self.weights.offset);
        let input_scale = take(self.input_scale);
        let bias = take(self.bias);
        QuantLinearInputs {
            x: 0,
            q: 1,
            scale: 2,
            min,
            input_scale,
            bias,
            count: next,
        }
    }
}

impl OpSpec for QuantLinear {
    const NAME: &'static str = "QuantLinear";

    fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        let at = self.slots();
        expect_inputs(inputs, at.count..=at.count)?;
        let x = inputs[at.x];
        expect_f32(x, "x")?;
        let (n, k) =
            self.weights
                .check_shapes(inputs[at.q], inputs[at.scale], at.min.map(|i| inputs[i]))?;
        if x.shape.last() != Some(&k) {
            return Err(format!(
                "x {x} does not have the weight's {k} input features"
            ));
        }
        if self.activations == ActivationQuant::DynamicInt8PerToken
            && (self.weights.bits != 8 || self.weights.group_size < k)
        {
            return Err(
                "int8 activations need int8 weights with one scale per output channel".into(),
            );
        }
        if let Some(i) = at.input_scale {
            expect_float(inputs[i], "input_scale", Some(1))?;
            if inputs[i].shape != [k] {
                return Err(format!("input_scale must be [{k}], got {}", inputs[i]));
            }
        }
        if let Some(i) = at.bias {
            expect_float(inputs[i], "bias", Some(1))?;
            if inputs[i].shape != [n] {
                return Err(format!("bias must be [{n}], got {}", inputs[i]));
            }
        }
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = n;
        Ok(TensorType::f32(shape))
    }

    /// The scalar reference, term by term: what the kernels are checked against.
    fn eval(&self, inputs: &[&Tensor]) -> Result<Tensor, KernelError> {
        let at = self.slots();
        let s = &self.weights;
        let q = inputs[at.q];
        let (n, k) = (q.shape()[0], q.shape()[1]);
        let bytes = q.quantized_bytes();
        let scale = inputs[at.scale].f32s();
        let min = at.min.map(|i| inputs[i].f32s());
        let groups = s.groups(k);
        let mut x = inputs[at.x].f32s().to_vec();
        if let Some(i) = at.input_scale {
            let factors = inputs[i].f32s();
            for row in x.chunks_exact_mut(k) {
                for (v, f) in row.iter_mut().zip(factors) {
                    *v *= f;
                }
            }
        }
        let m = x.len() / k.max(1);
        let mut out = vec![0f32; m * n];
        for (row, y) in x.chunks_exact(k.max(1)).zip(out.chunks_exact_mut(n.max(1))) {
            match self.activations {
                ActivationQuant::None => {
                    for (j, y) in y.iter_mut().enumerate() {
                        let mut acc = 0f32;
                        for (kk, &xv) in row.iter().enumerate().take(k) {
                            let g = j * groups + kk / s.group_size;
                            let mn = min.map_or(s.implied_min(scale[g]), |m| m[g]);
                            let w = (q_at(s.bits, bytes, k, j, kk) as f32).mul_add(scale[g], mn);
                            acc = xv.mul_add(w, acc);
                        }
                        *y = acc;
                    }
                }
                ActivationQuant::DynamicInt8PerToken => {
                    let mut xq = vec![0i8; k];
                    let sx = quantize_activation_row(row, &mut xq);
                    for (j, y) in y.iter_mut().enumerate() {
                        let acc: i32 = (0..k)
                            .map(|kk| xq[kk] as i32 * q_at(8, bytes, k, j, kk))
                            .sum();
                        *y = (acc as f32 * scale[j]) * sx;
                    }
                }
            }
        }
        if let Some(i) = at.bias {
            let bias = inputs[i].f32s();
            for row in out.chunks_exact_mut(n) {
                for (y, b) in row.iter_mut().zip(bias) {
                    *y += b;
                }
            }
        }
        let mut shape = inputs[at.x].shape().to_vec();
        *shape.last_mut().unwrap() = n;
        Ok(Tensor::from_f32(shape, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::quant::{quantize, QuantizedMatrix};
    use crate::ir::DType;
    use std::sync::Arc;

    pub(crate) fn tensors(m: &QuantizedMatrix) -> (Tensor, Tensor, Option<Tensor>) {
        let dtype = if m.scheme.bits == 8 {
            DType::I8
        } else {
            DType::U4
        };
        let len = m.q.len();
        let q = Tensor::quantized(dtype, vec![m.n, m.k], Arc::new(m.q.clone()), 0, len);
        let groups = m.scheme.groups(m.k);
        let f = |v: &[half::f16]| {
            Tensor::from_f32([m.n, groups], v.iter().map(|h| h.to_f32()).collect())
        };
        let min = m.scheme.offset.then(|| f(&m.min));
        (q, f(&m.scale), min)
    }

    #[test]
    fn weight_only_equals_linear_over_the_dequantized_weights() {
        let (n, k) = (3, 40);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 97) as f32 / 50.0 - 1.0)
            .collect();
        let x = Tensor::from_f32([2, k], (0..2 * k).map(|i| (i as f32 * 0.3).sin()).collect());
        for scheme in [
            WeightQuant {
                bits: 8,
                group_size: k,
                offset: false,
            },
            WeightQuant {
                bits: 4,
                group_size: 32,
                offset: true,
            },
            WeightQuant {
                bits: 4,
                group_size: 32,
                offset: false,
            },
        ] {
            let m = quantize(&w, n, k, scheme).unwrap();
            let (q, scale, min) = tensors(&m);
            let mut args = vec![&x, &q, &scale];
            if let Some(min) = &min {
                args.push(min);
            }
            let op = QuantLinear {
                weights: scheme,
                activations: ActivationQuant::None,
                input_scale: false,
                bias: false,
            };
            let y = op.eval(&args).unwrap();
            let deq = m.dequantize();
            for (i, row) in x.f32s().chunks(k).enumerate() {
                for j in 0..n {
                    let want = (0..k).fold(0f32, |acc, kk| row[kk].mul_add(deq[j * k + kk], acc));
                    assert_eq!(y.f32s()[i * n + j], want);
                }
            }
        }
    }

    #[test]
    fn int8_activations_are_exact_integer_products() {
        let (n, k) = (2, 4);
        let scheme = WeightQuant {
            bits: 8,
            group_size: k,
            offset: false,
        };
        let m = quantize(&[1.0, -1.0, 0.5, 0.25, 2.0, 0.0, -2.0, 1.0], n, k, scheme).unwrap();
        let (q, scale, _) = tensors(&m);
        let x = Tensor::from_f32([1, k], vec![1.27, 0.0, -0.6, 0.127]);
        let op = QuantLinear {
            weights: scheme,
            activations: ActivationQuant::DynamicInt8PerToken,
            input_scale: false,
            bias: false,
        };
        let y = op.eval(&[&x, &q, &scale]).unwrap();
        // x_q = [127, 0, -60, 13]; q row 0 = [127, -127, 64, 32]
        let sx = 1.27f32 / 127.0;
        let acc0 = 127 * 127 - 60 * 64 + 13 * 32;
        assert_eq!(y.f32s()[0], (acc0 as f32 * scale.f32s()[0]) * sx);
    }

    #[test]
    fn type_rule_checks_shapes_and_scheme() {
        let x = TensorType::f32([1, 64]);
        let q = TensorType::new(DType::U4, [8, 64]);
        let scale = TensorType::new(DType::F16, [8, 2]);
        let op = QuantLinear {
            weights: WeightQuant {
                bits: 4,
                group_size: 32,
                offset: false,
            },
            activations: ActivationQuant::None,
            input_scale: false,
            bias: false,
        };
        assert_eq!(
            op.infer(&[&x, &q, &scale]).unwrap(),
            TensorType::f32([1, 8])
        );
        let bad_scale = TensorType::new(DType::F16, [8, 3]);
        assert!(op
            .infer(&[&x, &q, &bad_scale])
            .unwrap_err()
            .contains("scale must be"));
        let i8q = TensorType::new(DType::I8, [8, 64]);
        assert!(op
            .infer(&[&x, &i8q, &scale])
            .unwrap_err()
            .contains("must be u4"));
        let w8a8 = QuantLinear {
            weights: WeightQuant {
                bits: 8,
                group_size: 32,
                offset: false,
            },
            activations: ActivationQuant::DynamicInt8PerToken,
            ..op.clone()
        };
        assert!(w8a8
            .infer(&[&x, &i8q, &scale])
            .unwrap_err()
            .contains("per output channel"));
    }
}
