//! The reference CPU session: the model's graphs on the interpreter, with
//! the KV cache in host memory.

use super::{check_step, write_new_rows, Engine, SessionError, StepInputs};
use crate::interp::{F32Weights, InterpError, Interpreter, Taps};
use crate::ir::{GraphNames, KvCacheLayout, ModelIr};
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// The reference CPU session: the model's prefill and decode graphs on the
/// interpreter, with the KV cache in host memory.
pub struct CpuSession {
    prefill: Interpreter,
    decode: Interpreter,
    layout: KvCacheLayout,
    vocab: usize,
    k_cache: Tensor,
    v_cache: Tensor,
    past_len: usize,
    /// IR value names to capture on each graph run (empty: none, at no cost).
    capture: Vec<String>,
    /// What the last graph run captured.
    captured: Taps,
}

impl CpuSession {
    pub fn new(model: &ModelIr, store: &WeightStore) -> Result<CpuSession, SessionError> {
        let mut cache = F32Weights::default();
        let prefill = Interpreter::new(model.prefill.clone(), store, &mut cache)?;
        let decode = Interpreter::new(model.decode.clone(), store, &mut cache)?;
        let layout = model.kv_cache.clone();
        let zeros = || {
            let ty = layout.cache_type();
            Tensor::from_f32(ty.shape.clone(), vec![0.0; ty.numel()])
        };
        Ok(CpuSession {
            k_cache: zeros(),
            v_cache: zeros(),
            prefill,
            decode,
            vocab: model.info.vocab_size,
            layout,
            past_len: 0,
            capture: Vec::new(),
            captured: Vec::new(),
        })
    }

    /// Captures these IR values (by name) on every graph run from now on,
    /// for layer-by-layer comparisons; names a graph lacks are skipped.
    pub fn capture(&mut self, names: Vec<String>) {
        self.capture = names;
    }

    /// The values captured by the last graph run: for a [`Engine::forward`],
    /// the run that produced its logits (a long prompt's last prefill chunk).
    pub fn take_captured(&mut self) -> Taps {
        std::mem::take(&mut self.captured)
    }

    /// Runs one graph step over `tokens` (at most the graph's length).
    fn step(&mut self, use_decode: bool, tokens: &[u32]) -> Result<Vec<f32>, SessionError> {
        let interp = if use_decode {
            &self.decode
        } else {
            &self.prefill
        };
        let graph_tokens = interp
            .graph()
            .ty(interp
                .graph()
                .input(GraphNames::INPUT_IDS)
                .map_err(InterpError::from)?)
            .shape[1];
        let cache_len = self.layout.max_len;
        let inputs = StepInputs::new(tokens, graph_tokens, self.past_len, cache_len);
        let capture: Vec<&str> = self.capture.iter().map(String::as_str).collect();
        let (outputs, captured) = interp.run_with_taps(
            &[
                (
                    GraphNames::INPUT_IDS,
                    Tensor::from_i64([1, graph_tokens], inputs.input_ids),
                ),
                (
                    GraphNames::POSITION_IDS,
                    Tensor::from_i64([1, graph_tokens], inputs.position_ids),
                ),
                (
                    GraphNames::ATTENTION_MASK,
                    Tensor::from_f32(
                        [1, 1, graph_tokens, cache_len + graph_tokens],
                        inputs.attention_mask,
                    ),
                ),
                (
                    GraphNames::LOGITS_INDEX,
                    Tensor::from_i64([1, 1], vec![inputs.logits_index]),
                ),
                (GraphNames::K_CACHE, self.k_cache.clone()),
                (GraphNames::V_CACHE, self.v_cache.clone()),
            ],
            &capture,
        )?;
        self.captured = captured;
        let graph = interp.graph();
        let position = |name: &str| {
            graph
                .outputs
                .iter()
                .position(|&id| graph.value(id).name == name)
        };
        let (Some(logits_at), Some(k_at), Some(v_at)) = (
            position(GraphNames::LOGITS),
            position(GraphNames::K_NEW),
            position(GraphNames::V_NEW),
        ) else {
            unreachable!("model graphs are built with logits, k_new and v_new outputs")
        };
        let valid = tokens.len();
        for (cache, new_rows) in [
            (&mut self.k_cache, &outputs[k_at]),
            (&mut self.v_cache, &outputs[v_at]),
        ] {
            let shape = cache.shape().to_vec();
            // The interpreter has dropped its references: this reuses the buffer.
            let mut data = std::mem::replace(cache, Tensor::from_f32([0], vec![])).into_f32_vec();
            write_new_rows(
                &mut data,
                new_rows.f32s(),
                &self.layout,
                graph_tokens,
                valid,
                self.past_len,
            );
            *cache = Tensor::from_f32(shape, data);
        }
        self.past_len += valid;
        Ok(outputs[logits_at].f32s().to_vec())
    }

    fn prefill_len(&self) -> usize {
        self.prefill
            .graph()
            .ty(self.prefill.graph().inputs[0])
            .shape[1]
    }
}

impl Engine for CpuSession {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SessionError> {
        check_step(tokens, self.vocab, self.past_len, self.layout.max_len)?;
        if tokens.len() == 1 {
            return self.step(true, tokens);
        }
        let mut logits = Vec::new();
        for chunk in tokens.chunks(self.prefill_len()) {
            logits = self.step(false, chunk)?;
        }
        Ok(logits)
    }

    fn position(&self) -> usize {
        self.past_len
    }

    fn capacity(&self) -> usize {
        self.layout.max_len
    }

    fn reset(&mut self) {
        // Stale slots are hidden by the mask; no need to clear them.
        self.past_len = 0;
    }

    fn device(&self) -> String {
        format!(
            "cpu (reference interpreter, {} threads)",
            rayon::current_num_threads()
        )
    }
}
