//! Running a model token by token against its KV cache: the host side of the
//! contract in [`KvCacheLayout`], shared by every backend, and the reference
//! CPU session built on the interpreter.

use crate::interp::{F32Weights, InterpError, Interpreter, Taps};
use crate::ir::{GraphNames, KvCacheLayout, ModelIr};
use crate::tensor::Tensor;
use crate::weights::WeightStore;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "the conversation needs {needed} positions but the KV cache holds {capacity}; \
         shorten the prompt or generation, or compile with a larger --max-seq-len"
    )]
    ContextFull { needed: usize, capacity: usize },
    #[error("nothing to run: the token list is empty")]
    Empty,
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    BadToken { id: u32, vocab: usize },
    #[error(transparent)]
    Interp(#[from] InterpError),
    #[error(transparent)]
    Npu(#[from] crate::npu::NpuError),
}

/// Something that turns tokens into next-token logits while keeping its own
/// KV cache: the CPU interpreter here, the NPU elsewhere.
pub trait Engine {
    /// Appends `tokens` at the current position and returns the logits that
    /// follow the last of them.
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SessionError>;
    /// Positions used so far.
    fn position(&self) -> usize;
    /// Positions the KV cache holds.
    fn capacity(&self) -> usize;
    /// Forgets the conversation.
    fn reset(&mut self);
    /// A short description of what runs the model, for reports.
    fn device(&self) -> String;
}

/// The inputs of one step of `tokens` graph positions, of which the first
/// `valid` are real: ids, positions, the additive mask and the position
/// whose logits to return.
///
/// Padding rows (a short last prefill chunk) see only themselves, so their
/// softmax stays finite; no real row sees them, and their K/V rows are
/// never written to the cache.
pub struct StepInputs {
    pub input_ids: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub attention_mask: Vec<f32>,
    pub logits_index: i64,
}

impl StepInputs {
    pub fn new(
        tokens: &[u32],
        graph_tokens: usize,
        past_len: usize,
        cache_len: usize,
    ) -> StepInputs {
        let valid = tokens.len();
        assert!(valid <= graph_tokens && past_len + valid <= cache_len);
        let width = cache_len + graph_tokens;
        let mut input_ids = vec![0i64; graph_tokens];
        let mut position_ids = vec![0i64; graph_tokens];
        let mut attention_mask = vec![f32::NEG_INFINITY; graph_tokens * width];
        for t in 0..graph_tokens {
            let row = &mut attention_mask[t * width..(t + 1) * width];
            if t < valid {
                input_ids[t] = tokens[t] as i64;
                position_ids[t] = (past_len + t) as i64;
                row[..past_len].fill(0.0);
                row[cache_len..=cache_len + t].fill(0.0);
            } else {
                // Any in-range position will do; the row is discarded.
                position_ids[t] = (past_len + valid - 1) as i64;
                row[cache_len + t] = 0.0;
            }
        }
        StepInputs {
            input_ids,
            position_ids,
            attention_mask,
            logits_index: valid as i64 - 1,
        }
    }
}

/// Copies the first `valid` new rows of every layer and KV head into the
/// cache at slot `past_len`.
pub fn write_new_rows(
    cache: &mut [f32],
    new_rows: &[f32],
    layout: &KvCacheLayout,
    graph_tokens: usize,
    valid: usize,
    past_len: usize,
) {
    let d = layout.head_dim;
    let heads = layout.layers * layout.kv_heads;
    for head in 0..heads {
        let src = &new_rows[head * graph_tokens * d..][..valid * d];
        let dst = &mut cache[(head * layout.max_len + past_len) * d..][..valid * d];
        dst.copy_from_slice(src);
    }
}

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

/// What every engine refuses before running a step: no tokens, an id
/// outside the vocabulary, or more positions than the cache holds.
pub fn check_step(
    tokens: &[u32],
    vocab: usize,
    past_len: usize,
    capacity: usize,
) -> Result<(), SessionError> {
    if tokens.is_empty() {
        return Err(SessionError::Empty);
    }
    if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
        return Err(SessionError::BadToken { id, vocab });
    }
    let needed = past_len + tokens.len();
    if needed > capacity {
        return Err(SessionError::ContextFull { needed, capacity });
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_shows_past_slots_and_earlier_tokens_only() {
        let inf = f32::NEG_INFINITY;
        let s = StepInputs::new(&[7, 8], 3, 2, 4);
        assert_eq!(s.input_ids, [7, 8, 0]);
        assert_eq!(s.position_ids, [2, 3, 3]);
        assert_eq!(s.logits_index, 1);
        #[rustfmt::skip]
        assert_eq!(s.attention_mask, [
            0., 0., inf, inf,   0., inf, inf,
            0., 0., inf, inf,   0., 0., inf,
            inf, inf, inf, inf, inf, inf, 0.,
        ]);
    }

    #[test]
    fn new_rows_land_at_the_past_length() {
        let layout = KvCacheLayout {
            layers: 2,
            kv_heads: 1,
            max_len: 3,
            head_dim: 2,
        };
        let mut cache = vec![0.0; 2 * 3 * 2];
        // Two layers, one head, graph of 2 tokens of which 1 is valid.
        let new_rows = [1., 2., 9., 9., 3., 4., 9., 9.];
        write_new_rows(&mut cache, &new_rows, &layout, 2, 1, 1);
        assert_eq!(cache, [0., 0., 1., 2., 0., 0., 0., 0., 3., 4., 0., 0.]);
    }
}
