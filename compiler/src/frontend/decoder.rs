//! The decoder-only transformer that every supported architecture is a
//! variant of, lowered into one IR graph of a fixed number of tokens.
//!
//! Per layer: `x += o_proj(attention(rope(q), rope(k), v))` on the
//! RMS-normalized input, then `x += down_proj(silu(gate_proj(h)) · up_proj(h))`
//! on the RMS-normalized result. The KV cache is read through the layer's
//! slice of the shared cache input; the new rows leave as graph outputs.

use super::config::ModelConfig;
use super::FrontendError;
use kiln_runtime::ir::ops::{
    Add, Attention, Concat, Gather, Linear, Mul, QuantGather, QuantLinear, Reshape, RmsNorm, Rope,
    Silu, Slice, Transpose,
};
use kiln_runtime::ir::quant::ActivationQuant;
use kiln_runtime::ir::{
    DType, Graph, GraphBuilder, GraphNames, KvCacheLayout, TensorType, ValueId,
};
use kiln_runtime::weights::QuantTensors;
use kiln_runtime::weights::WeightStore;
use std::collections::BTreeMap;

/// How an architecture's layers differ from the plain Llama layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderSpec {
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// A bias on the output projection.
    pub o_bias: bool,
    /// Biases on the gate, up and down projections.
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
}

/// Which positions' logits a graph outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogitsOutput {
    /// `[1, 1, vocab]` at the position the `logits_index` input names: all
    /// that generation needs, and the default.
    #[default]
    Selected,
    /// `[1, T, vocab]` for every position, with no `logits_index` input:
    /// for scoring a whole text (`kiln eval`).
    AllPositions,
}

/// Names of the RoPE tables (cos, sin) of `positions` rows the frontend
/// adds to the weight store. The length is in the name: graphs of one model
/// built for different lengths (the compiled pair, a calibration or
/// evaluation graph) each read their own.
pub fn rope_tables(positions: usize) -> (String, String) {
    (
        format!("kiln.rope{positions}.cos"),
        format!("kiln.rope{positions}.sin"),
    )
}

/// The weights a graph is built over: the store, and which of its
/// matrices are stored quantized (by the float weight's name).
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    pub store: &'a WeightStore,
    pub quantized: &'a BTreeMap<String, QuantTensors>,
}

/// Builds a graph over the weight store, checking every weight's shape.
struct DecoderBuilder<'a> {
    b: GraphBuilder,
    store: &'a WeightStore,
    quantized: &'a BTreeMap<String, QuantTensors>,
}

impl DecoderBuilder<'_> {
    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<ValueId, FrontendError> {
        let ty = self.store.expect(name, shape)?;
        Ok(self.b.weight(name, ty))
    }

    /// A quantized matrix's tensors as weight values `[q, scale, (min)]`,
    /// checking `q` against the float weight's shape `[n, k]`.
    fn quantized_weight(
        &mut self,
        q: &QuantTensors,
        shape: [usize; 2],
    ) -> Result<Vec<ValueId>, FrontendError> {
        let groups = q.scheme.groups(shape[1]);
        let mut values = vec![
            self.weight(&q.q, &shape)?,
            self.weight(&q.scale, &[shape[0], groups])?,
        ];
        if let Some(min) = &q.min {
            values.push(self.weight(min, &[shape[0], groups])?);
        }
        Ok(values)
    }

    /// `x · Wᵀ` for weight `name [out, in]`: a `Linear`, or a
    /// `QuantLinear` when the weight is stored quantized.
    fn product(
        &mut self,
        node: &str,
        x: ValueId,
        name: &str,
        out: usize,
        bias: Option<ValueId>,
    ) -> Result<ValueId, FrontendError> {
        let features = *self
            .b
            .ty(x)
            .shape
            .last()
            .expect("activations have rank ≥ 1");
        match self.quantized.get(name).cloned() {
            Some(q) => {
                let mut inputs = vec![x];
                inputs.extend(self.quantized_weight(&q, [out, features])?);
                inputs.extend(bias);
                let op = QuantLinear {
                    weights: q.scheme,
                    activations: ActivationQuant::None,
                    input_scale: false,
                    bias: bias.is_some(),
                };
                self.node(node, op, &inputs)
            }
            None => {
                let mut inputs = vec![x, self.weight(name, &[out, features])?];
                inputs.extend(bias);
                self.node(node, Linear, &inputs)
            }
        }
    }

    fn node(
        &mut self,
        name: impl Into<String>,
        op: impl Into<kiln_runtime::ir::Op>,
        inputs: &[ValueId],
    ) -> Result<ValueId, FrontendError> {
        Ok(self.b.node(name, op, inputs)?)
    }

    /// `x · Wᵀ (+ b)` with `W = {prefix}.weight [out, in]` and `{prefix}.bias [out]`.
    fn linear(
        &mut self,
        x: ValueId,
        prefix: &str,
        out: usize,
        bias: bool,
    ) -> Result<ValueId, FrontendError> {
        let bias = match bias {
            true => Some(self.weight(&format!("{prefix}.bias"), &[out])?),
            false => None,
        };
        self.product(prefix, x, &format!("{prefix}.weight"), out, bias)
    }

    fn rms_norm(&mut self, x: ValueId, weight: &str, eps: f32) -> Result<ValueId, FrontendError> {
        let dim = *self
            .b
            .ty(x)
            .shape
            .last()
            .expect("activations have rank ≥ 1");
        let w = self.weight(weight, &[dim])?;
        self.node(weight.trim_end_matches(".weight"), RmsNorm { eps }, &[x, w])
    }
}

/// Lowers the model into a graph over `tokens` positions per step.
pub fn build_graph(
    name: &str,
    config: &ModelConfig,
    spec: DecoderSpec,
    weights: Weights,
    tokens: usize,
    cache: &KvCacheLayout,
    logits_output: LogitsOutput,
) -> Result<Graph, FrontendError> {
    let c = config;
    let (heads, kv_heads, head_dim, hidden) =
        (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size);
    let mut d = DecoderBuilder {
        b: GraphBuilder::new(name),
        store: weights.store,
        quantized: weights.quantized,
    };

    let ids = d.b.input(
        GraphNames::INPUT_IDS,
        TensorType::new(DType::I64, [1, tokens]),
    );
    let positions = d.b.input(
        GraphNames::POSITION_IDS,
        TensorType::new(DType::I64, [1, tokens]),
    );
    let mask = d.b.input(
        GraphNames::ATTENTION_MASK,
        TensorType::f32([1, 1, tokens, cache.max_len + tokens]),
    );
    let logits_index = (logits_output == LogitsOutput::Selected).then(|| {
        d.b.input(
            GraphNames::LOGITS_INDEX,
            TensorType::new(DType::I64, [1, 1]),
        )
    });
    let k_cache = d.b.input(GraphNames::K_CACHE, cache.cache_type());
    let v_cache = d.b.input(GraphNames::V_CACHE, cache.cache_type());

    let embed_name = "model.embed_tokens.weight";
    let mut x = match weights.quantized.get(embed_name) {
        Some(q) => {
            let mut inputs = d.quantized_weight(q, [c.vocab_size, hidden])?;
            inputs.push(ids);
            d.node("embed", QuantGather { weights: q.scheme }, &inputs)?
        }
        None => {
            let embed = d.weight(embed_name, &[c.vocab_size, hidden])?;
            d.node("embed", Gather, &[embed, ids])?
        }
    };

    let (cos_name, sin_name) = rope_tables(cache.max_len);
    let cos_table = d.weight(&cos_name, &[cache.max_len, head_dim])?;
    let sin_table = d.weight(&sin_name, &[cache.max_len, head_dim])?;
    let cos = d.node("rope.cos", Gather, &[cos_table, positions])?;
    let sin = d.node("rope.sin", Gather, &[sin_table, positions])?;

    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut new_keys = Vec::with_capacity(c.num_layers);
    let mut new_values = Vec::with_capacity(c.num_layers);
    for layer in 0..c.num_layers {
        let p = format!("model.layers.{layer}");
        let h = d.rms_norm(x, &format!("{p}.input_layernorm.weight"), c.rms_norm_eps)?;

        // [1, T, n·D] → [1, T, n, D] (→ per-head norm) → [1, n, T, D] (→ RoPE)
        let project = |d: &mut DecoderBuilder,
                       what: &str,
                       n: usize,
                       rotate: bool|
         -> Result<ValueId, FrontendError> {
            let proj = format!("{p}.self_attn.{what}_proj");
            let y = d.linear(h, &proj, n * head_dim, spec.qkv_bias)?;
            let mut y = d.node(
                format!("{proj}.heads"),
                Reshape {
                    shape: vec![1, tokens, n, head_dim],
                },
                &[y],
            )?;
            if spec.qk_norm && rotate {
                y = d.rms_norm(
                    y,
                    &format!("{p}.self_attn.{what}_norm.weight"),
                    c.rms_norm_eps,
                )?;
            }
            let y = d.node(
                format!("{proj}.transposed"),
                Transpose {
                    perm: vec![0, 2, 1, 3],
                },
                &[y],
            )?;
            if rotate {
                d.node(format!("{proj}.rope"), Rope, &[y, cos, sin])
            } else {
                Ok(y)
            }
        };
        let q = project(&mut d, "q", heads, true)?;
        let k = project(&mut d, "k", kv_heads, true)?;
        let v = project(&mut d, "v", kv_heads, false)?;

        let cache_shape = vec![1, kv_heads, cache.max_len, head_dim];
        let layer_cache = |d: &mut DecoderBuilder,
                           which: ValueId,
                           what: &str|
         -> Result<ValueId, FrontendError> {
            let slice = d.node(
                format!("{p}.{what}_cache"),
                Slice {
                    axis: 0,
                    start: layer,
                    end: layer + 1,
                },
                &[which],
            )?;
            d.node(
                format!("{p}.{what}_cache.heads"),
                Reshape {
                    shape: cache_shape.clone(),
                },
                &[slice],
            )
        };
        let kc = layer_cache(&mut d, k_cache, "k")?;
        let vc = layer_cache(&mut d, v_cache, "v")?;
        let attn = d.node(
            format!("{p}.self_attn"),
            Attention { scale },
            &[q, k, v, kc, vc, mask],
        )?;
        let attn = d.node(
            format!("{p}.self_attn.merged"),
            Transpose {
                perm: vec![0, 2, 1, 3],
            },
            &[attn],
        )?;
        let attn = d.node(
            format!("{p}.self_attn.flat"),
            Reshape {
                shape: vec![1, tokens, heads * head_dim],
            },
            &[attn],
        )?;
        let o = d.linear(attn, &format!("{p}.self_attn.o_proj"), hidden, spec.o_bias)?;
        x = d.node(format!("{p}.attn_residual"), Add, &[x, o])?;

        let h = d.rms_norm(
            x,
            &format!("{p}.post_attention_layernorm.weight"),
            c.rms_norm_eps,
        )?;
        let gate = d.linear(
            h,
            &format!("{p}.mlp.gate_proj"),
            c.intermediate_size,
            spec.mlp_bias,
        )?;
        let up = d.linear(
            h,
            &format!("{p}.mlp.up_proj"),
            c.intermediate_size,
            spec.mlp_bias,
        )?;
        let act = d.node(format!("{p}.mlp.act"), Silu, &[gate])?;
        let act = d.node(format!("{p}.mlp.gated"), Mul, &[act, up])?;
        let down = d.linear(act, &format!("{p}.mlp.down_proj"), hidden, spec.mlp_bias)?;
        x = d.node(format!("{p}.mlp_residual"), Add, &[x, down])?;

        let rows = vec![1, 1, kv_heads, tokens, head_dim];
        new_keys.push(d.node(
            format!("{p}.k_new"),
            Reshape {
                shape: rows.clone(),
            },
            &[k],
        )?);
        new_values.push(d.node(format!("{p}.v_new"), Reshape { shape: rows }, &[v])?);
    }

    let mut x = d.rms_norm(x, "model.norm.weight", c.rms_norm_eps)?;
    if let Some(logits_index) = logits_index {
        // Only one position's logits are needed per step: pick its hidden
        // state before the (large) vocabulary projection.
        x = d.node(
            "final_hidden",
            Reshape {
                shape: vec![tokens, hidden],
            },
            &[x],
        )?;
        x = d.node("final_hidden.picked", Gather, &[x, logits_index])?;
    }
    let lm_head = if c.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let logits = d.product("lm_head", x, lm_head, c.vocab_size, None)?;
    let k_new = d.node("k_new.all", Concat { axis: 0 }, &new_keys)?;
    let v_new = d.node("v_new.all", Concat { axis: 0 }, &new_values)?;
    d.b.output(logits, GraphNames::LOGITS);
    d.b.output(k_new, GraphNames::K_NEW);
    d.b.output(v_new, GraphNames::V_NEW);
    Ok(d.b.finish()?)
}
