//! Engines run a model token by token against a KV cache they keep: the
//! host side of the contract in [`KvCacheLayout`] (step inputs, cache rows,
//! the checks every engine makes) lives here; the reference CPU session in
//! [`cpu`], the ACL one in [`npu`]. Neither engine depends on the other.

pub mod cpu;
pub mod npu;

pub use cpu::CpuSession;

use crate::compiled::manifest::Manifest;
use crate::compiled::CompiledModel;
use crate::interp::InterpError;
use crate::ir::model::pick_graph;
use crate::ir::{KvCacheLayout, MaskInput};
use std::ops::Range;
use std::path::Path;

/// Where `kiln-run` runs a compiled model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The reference interpreter on the compiled IR and weights, in f32.
    Cpu,
    /// The .om files on an Ascend NPU through ACL (needs CANN and build_om.sh's output).
    Npu,
}

/// Opens a compiled directory on `backend`: its manifest and an engine at
/// position 0. The NPU runs the .om files; it needs the manifest, not the
/// IR and reference weights the CPU backend loads.
pub fn open(
    dir: &Path,
    backend: Backend,
    device: i32,
) -> Result<(Manifest, Box<dyn Engine>), String> {
    match backend {
        Backend::Cpu => {
            let model = CompiledModel::open(dir).map_err(|e| e.to_string())?;
            let engine = CpuSession::new(&model.ir, &model.weights).map_err(|e| e.to_string())?;
            Ok((model.manifest, Box::new(engine)))
        }
        Backend::Npu => {
            let manifest = Manifest::load(dir).map_err(|e| e.to_string())?;
            let engine = npu::NpuSession::open(dir, &manifest, device).map_err(|e| {
                if e.is_acl_missing() {
                    format!("{e}\nhint: `--backend cpu` runs the model without CANN")
                } else {
                    e.to_string()
                }
            })?;
            crate::note!("kiln-run: {}", engine.allocation().describe());
            Ok((manifest, Box::new(engine)))
        }
    }
}

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
    /// What went wrong on the device behind an engine (ACL, its .om files).
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync>),
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
    /// Keeps the first `len` positions and forgets the rest, so that a
    /// conversation sharing that prefix continues without recomputing it.
    /// A `len` past the current position changes nothing.
    fn truncate(&mut self, len: usize);
    /// Forgets the conversation.
    fn reset(&mut self) {
        self.truncate(0);
    }
    /// A short description of what runs the model, for reports.
    fn device(&self) -> String;
}

/// The inputs of one step of `tokens` graph positions, of which the first
/// `valid` are real: ids, positions, the additive masks and the position
/// whose logits to return.
///
/// Padding rows (a short last prefill chunk) see only themselves, so their
/// softmax stays finite; no real row sees them, and their K/V rows are
/// never written to the cache.
pub struct StepInputs {
    pub input_ids: Vec<i64>,
    pub position_ids: Vec<i64>,
    /// One `[T, L + T]` mask per [`MaskInput`] of the graph, in its order.
    pub masks: Vec<Vec<f32>>,
    pub logits_index: i64,
}

impl StepInputs {
    pub fn new(
        tokens: &[u32],
        graph_tokens: usize,
        past_len: usize,
        cache_len: usize,
        masks: &[MaskInput],
    ) -> StepInputs {
        let valid = tokens.len();
        assert!(valid <= graph_tokens && past_len + valid <= cache_len);
        let mut input_ids = vec![0i64; graph_tokens];
        // Padding takes any in-range position; its row is discarded.
        let mut position_ids = vec![(past_len + valid).saturating_sub(1) as i64; graph_tokens];
        for (t, &id) in tokens.iter().enumerate() {
            input_ids[t] = id as i64;
            position_ids[t] = (past_len + t) as i64;
        }
        StepInputs {
            input_ids,
            position_ids,
            masks: masks
                .iter()
                .map(|m| step_mask(valid, graph_tokens, past_len, cache_len, m.sliding_window))
                .collect(),
            logits_index: valid as i64 - 1,
        }
    }
}

/// One additive mask `[graph_tokens, cache_len + graph_tokens]` for a step
/// whose first `valid` tokens are real, at positions `past_len..`: row `t`
/// (position `p = past_len + t`) shows cache slots and earlier new tokens at
/// positions `j ≤ p`, and with a `window` only those with `p - window < j`
/// (see [`MaskInput::sliding_window`]).
pub fn step_mask(
    valid: usize,
    graph_tokens: usize,
    past_len: usize,
    cache_len: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let width = cache_len + graph_tokens;
    let mut mask = vec![f32::NEG_INFINITY; graph_tokens * width];
    for (t, row) in mask.chunks_exact_mut(width).enumerate() {
        if t >= valid {
            row[cache_len + t] = 0.0;
            continue;
        }
        let p = past_len + t;
        // The first position the row sees.
        let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
        row[first.min(past_len)..past_len].fill(0.0);
        row[cache_len + first.saturating_sub(past_len)..=cache_len + t].fill(0.0);
    }
    mask
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

/// How an engine runs `count` tokens on graphs of `graph_tokens[i]` tokens:
/// chunks in order, each with the graph [`pick_graph`] chooses for what is
/// left (full prefill chunks, then the smallest graph that takes the rest).
pub fn step_chunks(graph_tokens: &[usize], count: usize) -> Vec<(usize, Range<usize>)> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < count {
        let which = pick_graph(graph_tokens, count - start);
        let end = count.min(start + graph_tokens[which]);
        chunks.push((which, start..end));
        start = end;
    }
    chunks
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_shows_past_slots_and_earlier_tokens_only() {
        let inf = f32::NEG_INFINITY;
        let global = MaskInput {
            input: "attention_mask".into(),
            sliding_window: None,
            layers: vec![0],
        };
        let s = StepInputs::new(&[7, 8], 3, 2, 4, &[global]);
        assert_eq!(s.input_ids, [7, 8, 0]);
        assert_eq!(s.position_ids, [2, 3, 3]);
        assert_eq!(s.logits_index, 1);
        #[rustfmt::skip]
        assert_eq!(s.masks, [vec![
            0., 0., inf, inf,   0., inf, inf,
            0., 0., inf, inf,   0., 0., inf,
            inf, inf, inf, inf, inf, inf, 0.,
        ]]);
    }

    #[test]
    fn a_sliding_window_shows_the_last_positions_up_to_the_query() {
        let inf = f32::NEG_INFINITY;
        // Window 2: position p sees p - 1 and p. Cache of 4 holding 2 slots
        // (positions 0, 1); new tokens at positions 2, 3; one padding row.
        #[rustfmt::skip]
        assert_eq!(step_mask(2, 3, 2, 4, Some(2)), [
            inf, 0., inf, inf,   0., inf, inf,
            inf, inf, inf, inf,  0., 0., inf,
            inf, inf, inf, inf,  inf, inf, 0.,
        ]);
        // Window 3 from an empty cache: the window slides over the new tokens.
        #[rustfmt::skip]
        assert_eq!(step_mask(4, 4, 0, 1, Some(3)), [
            inf,   0., inf, inf, inf,
            inf,   0., 0., inf, inf,
            inf,   0., 0., 0., inf,
            inf,   inf, 0., 0., 0.,
        ]);
        // A window as long as the cache changes nothing.
        assert_eq!(step_mask(2, 3, 2, 4, Some(4)), step_mask(2, 3, 2, 4, None));
    }

    #[test]
    fn prompts_run_in_full_chunks_then_the_smallest_graph_that_fits() {
        assert_eq!(step_chunks(&[4, 1], 1), [(1, 0..1)]);
        assert_eq!(step_chunks(&[4, 1], 9), [(0, 0..4), (0, 4..8), (1, 8..9)]);
        assert_eq!(step_chunks(&[4, 1], 7), [(0, 0..4), (0, 4..7)]);
        assert_eq!(step_chunks(&[8], 11), [(0, 0..8), (0, 8..11)]);
        assert_eq!(step_chunks(&[8], 0), []);
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
