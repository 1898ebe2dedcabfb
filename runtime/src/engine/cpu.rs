//! The reference CPU session: the model's graphs on the interpreter, with
//! the KV cache in host memory.

use super::{check_step, step_chunks, write_new_rows, Engine, SessionError, StepInputs};
use crate::interp::{F32Weights, Interpreter, Taps};
use crate::ir::model::graph_tokens;
use crate::ir::{GraphNames, KvCacheLayout, ModelIr};
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// The reference CPU session: the model's step graphs (prefill and decode,
/// or one of T tokens) on the interpreter, with the KV cache in host memory.
pub struct CpuSession {
    graphs: Vec<Interpreter>,
    /// Tokens per step of each graph.
    graph_tokens: Vec<usize>,
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
        let graphs = model
            .graphs
            .iter()
            .map(|g| Interpreter::new(g.clone(), store, &mut cache))
            .collect::<Result<Vec<_>, _>>()?;
        let layout = model.kv_cache.clone();
        let zeros = || {
            let ty = layout.cache_type();
            Tensor::from_f32(ty.shape.clone(), vec![0.0; ty.numel()])
        };
        Ok(CpuSession {
            k_cache: zeros(),
            v_cache: zeros(),
            graph_tokens: model.graph_tokens(),
            graphs,
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

    /// Runs graph `which` over `tokens` (at most the graph's length).
    fn step(&mut self, which: usize, tokens: &[u32]) -> Result<Vec<f32>, SessionError> {
        let interp = &self.graphs[which];
        let graph_tokens = graph_tokens(interp.graph());
        let cache_len = self.layout.max_len;
        let graph = interp.graph();
        let inputs = StepInputs::new(tokens, graph_tokens, self.past_len, cache_len, &graph.masks);
        let capture: Vec<&str> = self.capture.iter().map(String::as_str).collect();
        let mut feeds = vec![
            (
                GraphNames::INPUT_IDS,
                Tensor::from_i64([1, graph_tokens], inputs.input_ids),
            ),
            (
                GraphNames::POSITION_IDS,
                Tensor::from_i64([1, graph_tokens], inputs.position_ids),
            ),
            (
                GraphNames::LOGITS_INDEX,
                Tensor::from_i64([1, 1], vec![inputs.logits_index]),
            ),
            (GraphNames::K_CACHE, self.k_cache.clone()),
            (GraphNames::V_CACHE, self.v_cache.clone()),
        ];
        for (spec, mask) in graph.masks.iter().zip(inputs.masks) {
            feeds.push((
                spec.input.as_str(),
                Tensor::from_f32([1, 1, graph_tokens, cache_len + graph_tokens], mask),
            ));
        }
        let (outputs, captured) = interp.run_with_taps(&feeds, &capture)?;
        // The feeds hold the caches too: dropped, the caches' buffers are
        // unshared again and take the new rows in place (else every step
        // would copy the whole KV cache).
        drop(feeds);
        self.captured = captured;
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
            // The interpreter has dropped its references: this reuses the
            // buffer (unless a capture keeps a view of the cache).
            debug_assert!(
                !cache.shares_buffer() || !self.capture.is_empty(),
                "the KV cache is still shared: every step would copy it whole"
            );
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
}

impl Engine for CpuSession {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SessionError> {
        check_step(tokens, self.vocab, self.past_len, self.layout.max_len)?;
        let mut logits = Vec::new();
        for (which, range) in step_chunks(&self.graph_tokens, tokens.len()) {
            logits = self.step(which, &tokens[range])?;
        }
        Ok(logits)
    }

    fn position(&self) -> usize {
        self.past_len
    }

    fn capacity(&self) -> usize {
        self.layout.max_len
    }

    fn truncate(&mut self, len: usize) {
        // Stale slots are hidden by the mask and overwritten by the next
        // steps; no need to clear them.
        self.past_len = self.past_len.min(len);
    }

    fn device(&self) -> String {
        format!(
            "cpu (reference interpreter, {} threads)",
            rayon::current_num_threads()
        )
    }
}
