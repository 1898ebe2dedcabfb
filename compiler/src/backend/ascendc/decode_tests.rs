//! Whole decode steps of a model with every node that has a kernel run by
//! its generated kernel on the CPU emulation (inputs rounded to fp16, as the
//! NPU graph holds them), the rest by the IR's reference semantics, against
//! the interpreter: logits cosine ≥ 0.9999 at every step and the same
//! greedy ids over 8 steps.

use super::emulation_tests::{halves, harness, Case};
use super::plan::{node_kernel, residual_add, NodeKernel};
use super::{GemvWeights, KernelOp, Target};
use crate::frontend::{GraphOptions, HfModel, ShapeRequest};
use crate::passes::quantize::{quantize_model, QuantOptions, Scheme};
use half::f16;
use kiln_runtime::interp::{F32Weights, Interpreter};
use kiln_runtime::ir::{DType, Graph, GraphNames};
use kiln_runtime::tensor::Tensor;
use kiln_runtime::weights::WeightStore;
use std::path::Path;

fn f16_bytes(t: &Tensor) -> Vec<u8> {
    t.f32s()
        .iter()
        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
        .collect()
}

/// Runs one kernel call through the harness; returns its outputs as f32.
fn call(target: Target, op: &KernelOp, inputs: Vec<Vec<u8>>) -> Vec<Vec<f32>> {
    let kind = op.kind();
    let output_bytes = match op {
        KernelOp::Gemv { n, .. } => vec![n * 2],
        _ => vec![inputs[0].len(); kind.outputs().len()],
    };
    let case = Case {
        kind,
        tiling: op.tiling(target).unwrap(),
        inputs,
        output_bytes,
        ub_bytes: target.ub_budget(),
    };
    let result = harness(target)
        .run(&[case])
        .unwrap_or_else(|e| panic!("{op:?}: {e}"))
        .remove(0);
    assert_eq!(result.rounded_down_copies, 0);
    result.outputs.iter().map(|o| halves(o)).collect()
}

/// The GEMV calls of one node: column chunks of the weights, concatenated.
fn gemv(target: Target, calls: &[KernelOp], args: &[&Tensor]) -> Vec<f32> {
    let x = f16_bytes(args[0]);
    let mut out = Vec::new();
    let mut row = 0;
    for op in calls {
        let KernelOp::Gemv { k, n, weights } = *op else {
            unreachable!()
        };
        let rows = row..row + n;
        let groups = |t: &Tensor| t.shape()[1];
        let slice_f16 = |t: &Tensor| {
            let g = groups(t);
            f16_bytes(&Tensor::from_f32(
                [n, g],
                t.f32s()[rows.start * g..rows.end * g].to_vec(),
            ))
        };
        let mut inputs = vec![x.clone()];
        match weights {
            GemvWeights::Half => {
                inputs.push(f16_bytes(&Tensor::from_f32(
                    [n, k],
                    args[1].f32s()[rows.start * k..rows.end * k].to_vec(),
                )));
            }
            _ => {
                let row_bytes = weights.row_bytes(k);
                let q = args[1].quantized_bytes();
                inputs.push(q[rows.start * row_bytes..rows.end * row_bytes].to_vec());
                inputs.push(slice_f16(args[2]));
                if let GemvWeights::Int4 { offset: true, .. } = weights {
                    inputs.push(slice_f16(args[3]));
                }
            }
        }
        out.extend(call(target, op, inputs).remove(0));
        row += n;
    }
    out
}

/// One step of `graph` with the kernels: the graph's outputs.
fn run_step(
    graph: &Graph,
    store: &WeightStore,
    inputs: &[(&str, Tensor)],
    target: Target,
) -> Vec<Tensor> {
    let mut slots: Vec<Option<Tensor>> = vec![None; graph.values.len()];
    for (id, name) in graph.weights() {
        let t = match graph.ty(id).dtype {
            DType::I8 | DType::U4 => store.to_tensor(name),
            _ => store.to_f32_tensor(name),
        };
        slots[id.index()] = Some(t.unwrap());
    }
    for (name, t) in inputs {
        slots[graph.input(name).unwrap().index()] = Some(t.clone());
    }
    for (index, node) in graph.nodes.iter().enumerate() {
        let args: Vec<&Tensor> = node
            .inputs
            .iter()
            .map(|id| slots[id.index()].as_ref().expect("topological order"))
            .collect();
        let out_shape = graph.ty(node.output).shape.clone();
        let out = match node_kernel(graph, index, target).unwrap() {
            NodeKernel::Calls(calls) => match &calls[0] {
                KernelOp::Gemv { .. } => Tensor::from_f32(out_shape, gemv(target, &calls, &args)),
                KernelOp::RmsNorm { residual: true, .. } => {
                    let add = residual_add(graph, index).unwrap();
                    // The kernel's sum replaces the Add's: nothing read it yet.
                    let sum_id = graph.nodes[add].output;
                    assert!(graph.nodes[add + 1..index]
                        .iter()
                        .all(|n| !n.inputs.contains(&sum_id)));
                    let a = &graph.nodes[add].inputs;
                    let a0 = slots[a[0].index()].clone().unwrap();
                    let a1 = slots[a[1].index()].clone().unwrap();
                    let mut outs = call(
                        target,
                        &calls[0],
                        vec![f16_bytes(&a0), f16_bytes(&a1), f16_bytes(args[1])],
                    );
                    let sum = outs.pop().unwrap();
                    slots[sum_id.index()] = Some(Tensor::from_f32(out_shape.clone(), sum));
                    Tensor::from_f32(out_shape, outs.pop().unwrap())
                }
                op => {
                    let inputs = args.iter().map(|t| f16_bytes(t)).collect();
                    Tensor::from_f32(out_shape, call(target, op, inputs).remove(0))
                }
            },
            _ => node.op.eval(&args).unwrap(),
        };
        slots[node.output.index()] = Some(out);
    }
    graph
        .outputs
        .iter()
        .map(|id| slots[id.index()].clone().unwrap())
        .collect()
}

/// A decode loop's host side: inputs of step `past`, and the cache update.
struct Decoder {
    k_cache: Tensor,
    v_cache: Tensor,
}

impl Decoder {
    fn inputs(&self, graph: &Graph, token: i64, past: usize) -> Vec<(&'static str, Tensor)> {
        let mask_ty = graph.ty(graph.input(GraphNames::ATTENTION_MASK).unwrap());
        let cols = *mask_ty.shape.last().unwrap();
        let slots = cols - 1;
        let mask = (0..cols)
            .map(|c| {
                if c < past || c == slots {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mut inputs = vec![
            (GraphNames::INPUT_IDS, Tensor::from_i64([1, 1], vec![token])),
            (
                GraphNames::POSITION_IDS,
                Tensor::from_i64([1, 1], vec![past as i64]),
            ),
            (
                GraphNames::ATTENTION_MASK,
                Tensor::from_f32(mask_ty.shape.clone(), mask),
            ),
            (GraphNames::K_CACHE, self.k_cache.clone()),
            (GraphNames::V_CACHE, self.v_cache.clone()),
        ];
        if graph.input(GraphNames::LOGITS_INDEX).is_ok() {
            inputs.push((GraphNames::LOGITS_INDEX, Tensor::from_i64([1, 1], vec![0])));
        }
        inputs
    }

    /// Copies the step's new keys and values into slot `past`.
    fn update(&mut self, k_new: &Tensor, v_new: &Tensor, past: usize) {
        for (cache, new) in [(&mut self.k_cache, k_new), (&mut self.v_cache, v_new)] {
            let [layers, _, heads, slots, dim] = cache.shape().try_into().unwrap();
            let mut data = cache.f32s().to_vec();
            for row in 0..layers * heads {
                let at = (row * slots + past) * dim;
                data[at..at + dim].copy_from_slice(&new.f32s()[row * dim..(row + 1) * dim]);
            }
            *cache = Tensor::from_f32([layers, 1, heads, slots, dim], data);
        }
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

fn decode_with_kernels(fixture: &str, scheme: Option<Scheme>, target: Target) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(fixture);
    decode_model_with_kernels(&dir, scheme, target);
}

fn decode_model_with_kernels(dir: &Path, scheme: Option<Scheme>, target: Target) {
    let fixture = dir.display();
    let mut model = HfModel::open(dir).unwrap();
    let options = GraphOptions::resolve(&model.config, &ShapeRequest::default());
    let mut ir = model.build_ir(&options).unwrap();
    crate::passes::optimize(&mut ir).unwrap();
    if let Some(scheme) = scheme {
        quantize_model(&mut ir, &mut model.weights, &QuantOptions::new(scheme)).unwrap();
    }
    let graph = ir.graph("decode").unwrap();
    let kernels = (0..graph.nodes.len())
        .filter(|&i| matches!(node_kernel(graph, i, target).unwrap(), NodeKernel::Calls(_)))
        .count();
    assert!(kernels > 0);
    let interp =
        Interpreter::new(graph.clone(), &model.weights, &mut F32Weights::default()).unwrap();
    let out = |name: &str| {
        graph
            .outputs
            .iter()
            .position(|&id| graph.value(id).name == name)
            .unwrap()
    };
    let (logits_at, k_at, v_at) = (
        out(GraphNames::LOGITS),
        out(GraphNames::K_NEW),
        out(GraphNames::V_NEW),
    );
    let cache = ir.kv_cache.cache_type();
    let zeros = || Tensor::from_f32(cache.shape.clone(), vec![0.0; cache.numel()]);
    let mut with_kernels = Decoder {
        k_cache: zeros(),
        v_cache: zeros(),
    };
    let mut reference = Decoder {
        k_cache: zeros(),
        v_cache: zeros(),
    };
    let (mut token_k, mut token_r) = (1i64, 1i64);
    for past in 0..8 {
        let got = run_step(
            graph,
            &model.weights,
            &with_kernels.inputs(graph, token_k, past),
            target,
        );
        let want = interp.run(&reference.inputs(graph, token_r, past)).unwrap();
        let (g, w) = (got[logits_at].f32s(), want[logits_at].f32s());
        let cos = cosine(g, w);
        assert!(
            cos >= 0.9999,
            "{fixture} {scheme:?} {target} step {past}: logits cosine {cos}"
        );
        token_k = argmax(g) as i64;
        token_r = argmax(w) as i64;
        assert_eq!(
            token_k, token_r,
            "{fixture} {scheme:?} {target} step {past}: greedy ids differ"
        );
        with_kernels.update(&got[k_at], &got[v_at], past);
        reference.update(&want[k_at], &want[v_at], past);
    }
}

/// The qwen3 fixture at w4a16 g32 with mins; or, with
/// `$KILN_KERNEL_TEST_MODEL` naming a model (SmolLM2's GGUF, say), that
/// model at `--quant w4a16`'s default (g128, symmetric).
#[test]
fn a_w4a16_decode_loop_on_the_310b_kernels_matches_the_interpreter() {
    match std::env::var_os("KILN_KERNEL_TEST_MODEL") {
        Some(model) => decode_model_with_kernels(
            Path::new(&model),
            Some(Scheme::W4A16 {
                group_size: 128,
                asymmetric: false,
            }),
            Target::Ascend310b,
        ),
        None => decode_with_kernels(
            "qwen3",
            Some(Scheme::W4A16 {
                group_size: 32,
                asymmetric: true,
            }),
            Target::Ascend310b,
        ),
    }
}

#[test]
fn a_w8a16_decode_loop_on_the_910b_kernels_matches_the_interpreter() {
    decode_with_kernels("qwen3", Some(Scheme::W8A16), Target::Ascend910b);
}

#[test]
fn an_fp16_decode_loop_on_the_310b_kernels_matches_the_interpreter() {
    decode_with_kernels("llama-gqa", None, Target::Ascend310b);
}
