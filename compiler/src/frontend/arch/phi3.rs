//! Phi-3 (mini, small, medium): the Llama layout with fused projections,
//! split at load into the tensors the shared pieces read:
//! - `self_attn.qkv_proj.weight [(H + 2G)·D, hidden]` → rows `q_proj`,
//!   `k_proj`, `v_proj`, in that order;
//! - `mlp.gate_up_proj.weight [2·I, hidden]` → rows `gate_proj`, then
//!   `up_proj` (transformers' `chunk(2, dim=-1)`: gate first).
//!
//! No biases. Every layer attends over the last `sliding_window` positions
//! when the config sets one (Phi-3-mini-4k: 2047), as `Phi3Attention`
//! passes it to every layer. What else Phi-3 changes is RoPE, read by the
//! config reader and built by the shared pieces: `longrope` scaling (Phi-3
//! 128k, Phi-3.5, Phi-4-mini; `rope.rs`) and rotation of only the first
//! `partial_rotary_factor · head_dim` dimensions (`decoder.rs`).
//! Source: transformers' `models/phi3/modeling_phi3.py`
//! (https://github.com/huggingface/transformers/tree/main/src/transformers/models/phi3).

use super::Family;
use crate::frontend::config::ModelConfig;
use crate::frontend::FrontendError;
use kiln_runtime::weights::{WeightError, WeightStore};

pub const HF_NAME: &str = "Phi3ForCausalLM";
pub const MODEL_TYPE: &str = "phi3";

pub struct Phi3 {
    layers: usize,
    /// Output rows of q, k and v.
    qkv_rows: [usize; 3],
    intermediate: usize,
    hidden: usize,
}

impl Phi3 {
    pub fn new(config: &ModelConfig) -> Phi3 {
        let d = config.head_dim;
        Phi3 {
            layers: config.num_layers,
            qkv_rows: [
                config.num_heads * d,
                config.num_kv_heads * d,
                config.num_kv_heads * d,
            ],
            intermediate: config.intermediate_size,
            hidden: config.hidden_size,
        }
    }
}

/// Splits the fused matrix `fused [Σ rows, cols]` into consecutive row
/// blocks named `parts`, in its stored dtype (no conversion).
fn split_rows(
    store: &mut WeightStore,
    fused: &str,
    parts: &[(String, usize)],
    cols: usize,
) -> Result<(), WeightError> {
    // Split by an earlier build of this model, or by the GGUF reader when
    // it keeps the blocks (stored as `<prefix>.qweight`, see
    // `WeightStore::insert_quantized`).
    let present = |name: &str| {
        let prefix = name.strip_suffix(".weight").unwrap_or(name);
        store.contains(name) || store.contains(&format!("{prefix}.qweight"))
    };
    if !store.contains(fused) && parts.iter().all(|(name, _)| present(name)) {
        return Ok(());
    }
    let total: usize = parts.iter().map(|(_, rows)| rows).sum();
    let ty = store.expect(fused, &[total, cols])?;
    let row_bytes = ty.size_bytes() / total;
    let bytes = store.bytes(fused)?.to_vec();
    let mut at = 0;
    for (name, rows) in parts {
        let block = bytes[at * row_bytes..(at + rows) * row_bytes].to_vec();
        store.insert_bytes(name, ty.dtype, vec![*rows, cols], block);
        at += rows;
    }
    // Nothing reads the fused tensor now; holding a copy of both would
    // double these matrices' memory.
    store.remove(fused);
    Ok(())
}

impl Family for Phi3 {
    fn sliding_layers(&self, config: &ModelConfig) -> Vec<bool> {
        vec![config.sliding_window.is_some(); config.num_layers]
    }

    fn prepare_weights(&self, store: &mut WeightStore) -> Result<(), FrontendError> {
        for layer in 0..self.layers {
            let p = format!("model.layers.{layer}");
            let [q, k, v] = self.qkv_rows;
            split_rows(
                store,
                &format!("{p}.self_attn.qkv_proj.weight"),
                &[
                    (format!("{p}.self_attn.q_proj.weight"), q),
                    (format!("{p}.self_attn.k_proj.weight"), k),
                    (format!("{p}.self_attn.v_proj.weight"), v),
                ],
                self.hidden,
            )?;
            split_rows(
                store,
                &format!("{p}.mlp.gate_up_proj.weight"),
                &[
                    (format!("{p}.mlp.gate_proj.weight"), self.intermediate),
                    (format!("{p}.mlp.up_proj.weight"), self.intermediate),
                ],
                self.hidden,
            )?;
        }
        Ok(())
    }
}
