//! The shared pieces every decoder-only family is built from, and the
//! graph around them.
//!
//! [`build_graph`] makes the step inputs (ids, positions, mask, KV cache),
//! the embedding lookup, the RoPE rows, the final norm and the logits; each
//! family (`arch/<family>.rs`, a [`Family`]) says what its embedding
//! scaling, layers and logits post-processing are, from the pieces of
//! [`DecoderBuilder`]: RMSNorm, projections, self-attention over the cache,
//! gated MLPs. The Llama layout is the default of every hook.

use super::arch::Family;
use super::config::{ModelConfig, RopeConfig};
use super::FrontendError;
use kiln_runtime::ir::ops::{
    Add, Attention, Concat, Gather, GeluTanh, Linear, Mul, QuantGather, QuantLinear, Reshape,
    RmsNorm, Rope, Silu, Slice, Transpose,
};
use kiln_runtime::ir::quant::ActivationQuant;
use kiln_runtime::ir::{
    DType, Graph, GraphBuilder, GraphNames, KvCacheLayout, MaskInput, TensorType, ValueId,
};
use kiln_runtime::weights::QuantTensors;
use kiln_runtime::weights::WeightStore;
use std::collections::BTreeMap;

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

/// The RoPE tables of the sliding layers, when their RoPE differs from the
/// model's (Gemma 3).
pub fn local_rope_tables(positions: usize) -> (String, String) {
    (
        format!("kiln.rope{positions}.local.cos"),
        format!("kiln.rope{positions}.local.sin"),
    )
}

/// The RoPE of `family`'s sliding layers when it has some and theirs is
/// not the model's: the graphs then read a second pair of tables.
pub fn local_rope<'a>(family: &'a dyn Family, config: &ModelConfig) -> Option<&'a RopeConfig> {
    family
        .local_rope()
        .filter(|_| family.sliding_layers(config).contains(&true))
}

/// The attention masks of a model whose layers slide where `sliding` says
/// (over `window` positions), over a cache of `max_len` slots: one mask when
/// every layer sees the same positions, else `attention_mask` for the
/// global layers and `attention_mask_local` for the sliding ones. A window
/// at least as long as the cache hides nothing, so it makes no mask of its
/// own.
pub fn attention_masks(sliding: &[bool], window: Option<usize>, max_len: usize) -> Vec<MaskInput> {
    let window = window.filter(|&w| w < max_len);
    let (local, global): (Vec<usize>, Vec<usize>) =
        (0..sliding.len()).partition(|&l| sliding[l] && window.is_some());
    let mask = |input: &str, sliding_window, layers| MaskInput {
        input: input.to_string(),
        sliding_window,
        layers,
    };
    match (global.is_empty(), local.is_empty()) {
        (_, true) => vec![mask(GraphNames::ATTENTION_MASK, None, global)],
        (true, false) => vec![mask(GraphNames::ATTENTION_MASK, window, local)],
        (false, false) => vec![
            mask(GraphNames::ATTENTION_MASK, None, global),
            mask(GraphNames::ATTENTION_MASK_LOCAL, window, local),
        ],
    }
}

/// The weights a graph is built over: the store, and which of its
/// matrices are stored quantized (by the float weight's name).
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    pub store: &'a WeightStore,
    pub quantized: &'a BTreeMap<String, QuantTensors>,
}

/// Where weight types come from: a real store, or config.json alone (every
/// weight takes the shape the decoder asks for, in `dtype`), which is how
/// the memory plan lists the tensors a compile would write.
#[derive(Clone, Copy)]
pub enum WeightSource<'a> {
    Store(Weights<'a>),
    ShapesOnly(DType),
}

/// How a family's RMSNorm applies its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormStyle {
    /// `norm(x) · w` (Llama and most families).
    Weight,
    /// `norm(x) · (1 + w)` (Gemma): the frontend adds `1 + w`, computed in
    /// f32 as transformers does, to the store as [`unit_offset_weight`].
    UnitOffsetWeight,
}

/// The store name of `1 + w` for norm weight `name` ([`NormStyle::UnitOffsetWeight`]).
pub fn unit_offset_weight(name: &str) -> String {
    format!("{name}.plus_one")
}

/// Adds `1 + w` for every norm weight (`…norm.weight`) in the store.
pub fn add_unit_offset_weights(store: &mut WeightStore) -> Result<(), FrontendError> {
    let names: Vec<String> = store
        .names()
        .filter(|n| n.ends_with("norm.weight"))
        .map(str::to_string)
        .collect();
    for name in names {
        let w = store.to_f32_tensor(&name)?;
        let plus_one = w.f32s().iter().map(|v| 1.0 + v).collect();
        store.insert_f32(&unit_offset_weight(&name), w.shape().to_vec(), plus_one);
    }
    Ok(())
}

/// One layer's self-attention, as a family configures it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SelfAttention {
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// A bias on the output projection.
    pub o_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Multiplies `q·k`; `1/sqrt(head_dim)` unless the family says otherwise.
    pub scale: f32,
    /// Soft-capping of the scaled scores, `c · tanh(s / c)` (Gemma 2).
    pub logit_softcap: Option<f32>,
}

impl SelfAttention {
    /// Llama's: `plain`, with `config.attention_bias` adding biases to q, k,
    /// v *and* o (as Llama, Qwen3 and Gemma read it).
    pub fn with_config_biases(config: &ModelConfig) -> SelfAttention {
        SelfAttention {
            qkv_bias: config.attention_bias,
            o_bias: config.attention_bias,
            ..SelfAttention::plain(config)
        }
    }

    /// No biases, no q/k norms, `1/sqrt(head_dim)`.
    pub fn plain(config: &ModelConfig) -> SelfAttention {
        SelfAttention {
            qkv_bias: false,
            o_bias: false,
            qk_norm: false,
            scale: 1.0 / (config.head_dim as f32).sqrt(),
            logit_softcap: None,
        }
    }
}

/// The activation of a gated MLP, `down(act(gate(h)) · up(h))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateActivation {
    /// SwiGLU (Llama, Qwen, Mistral).
    Silu,
    /// GeGLU with GELU's tanh approximation (Gemma).
    GeluTanh,
}

/// The step inputs every layer reads.
struct StepValues {
    /// Each mask input, with the layers that read it.
    masks: Vec<(ValueId, Vec<usize>)>,
    k_cache: ValueId,
    v_cache: ValueId,
    /// The RoPE rows (cos, sin) of the model, and of its sliding layers
    /// when theirs differ.
    rope: (ValueId, ValueId),
    local_rope: Option<(ValueId, ValueId)>,
}

/// Builds a graph over the weights, checking every weight's shape, and
/// offers the pieces families build their layers from.
pub struct DecoderBuilder<'a> {
    b: GraphBuilder,
    weights: WeightSource<'a>,
    config: &'a ModelConfig,
    tokens: usize,
    cache: &'a KvCacheLayout,
    norm_style: NormStyle,
    /// Which layers slide ([`Family::sliding_layers`]).
    sliding: Vec<bool>,
    step: Option<StepValues>,
    new_keys: Vec<ValueId>,
    new_values: Vec<ValueId>,
}

impl<'a> DecoderBuilder<'a> {
    pub fn config(&self) -> &'a ModelConfig {
        self.config
    }

    /// Tokens per step of the graph being built.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    fn quantized(&self, name: &str) -> Option<QuantTensors> {
        match self.weights {
            WeightSource::Store(w) => w.quantized.get(name).cloned(),
            WeightSource::ShapesOnly(_) => None,
        }
    }

    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<ValueId, FrontendError> {
        let ty = match self.weights {
            WeightSource::Store(w) => w.store.expect(name, shape)?,
            WeightSource::ShapesOnly(dtype) => TensorType::new(dtype, shape.to_vec()),
        };
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

    fn features(&self, x: ValueId) -> usize {
        *self
            .b
            .ty(x)
            .shape
            .last()
            .expect("activations have rank ≥ 1")
    }

    /// `x · Wᵀ` for weight `name [out, in]`: a `Linear`, or a
    /// `QuantLinear` when the weight is stored quantized.
    pub fn product(
        &mut self,
        node: &str,
        x: ValueId,
        name: &str,
        out: usize,
        bias: Option<ValueId>,
    ) -> Result<ValueId, FrontendError> {
        let features = self.features(x);
        match self.quantized(name) {
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

    pub fn node(
        &mut self,
        name: impl Into<String>,
        op: impl Into<kiln_runtime::ir::Op>,
        inputs: &[ValueId],
    ) -> Result<ValueId, FrontendError> {
        Ok(self.b.node(name, op, inputs)?)
    }

    /// `x · Wᵀ (+ b)` with `W = {prefix}.weight [out, in]` and `{prefix}.bias [out]`.
    pub fn linear(
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

    /// RMSNorm over the last axis with norm weight `weight`, applied in the
    /// family's [`NormStyle`]. The node is named after the weight.
    pub fn rms_norm(&mut self, x: ValueId, weight: &str) -> Result<ValueId, FrontendError> {
        let dim = self.features(x);
        let stored = match self.norm_style {
            NormStyle::Weight => weight.to_string(),
            NormStyle::UnitOffsetWeight => unit_offset_weight(weight),
        };
        let w = self.weight(&stored, &[dim])?;
        let eps = self.config.rms_norm_eps;
        self.node(weight.trim_end_matches(".weight"), RmsNorm { eps }, &[x, w])
    }

    /// `x + y`, named `name`.
    pub fn residual(
        &mut self,
        name: impl Into<String>,
        x: ValueId,
        y: ValueId,
    ) -> Result<ValueId, FrontendError> {
        self.node(name, Add, &[x, y])
    }

    fn step(&self) -> &StepValues {
        self.step
            .as_ref()
            .expect("the step inputs exist before any layer")
    }

    /// Layer `layer`'s self-attention on the normalized hidden states `h`,
    /// output projection included: `o_proj(attention(rope(q), rope(k), v))`
    /// over the layer's slice of the KV cache followed by the new tokens.
    /// The new K/V rows become the graph's `k_new`/`v_new` outputs.
    pub fn self_attention(
        &mut self,
        layer: usize,
        h: ValueId,
        spec: &SelfAttention,
    ) -> Result<ValueId, FrontendError> {
        let c = self.config;
        let tokens = self.tokens;
        let (heads, kv_heads, head_dim, hidden) =
            (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size);
        let rotary_dim = c.rotary_dim;
        let p = format!("model.layers.{layer}");
        let (cos, sin) = match self.step().local_rope {
            Some(local) if self.sliding[layer] => local,
            _ => self.step().rope,
        };

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
                y = d.rms_norm(y, &format!("{p}.self_attn.{what}_norm.weight"))?;
            }
            let y = d.node(
                format!("{proj}.transposed"),
                Transpose {
                    perm: vec![0, 2, 1, 3],
                },
                &[y],
            )?;
            match rotate {
                false => Ok(y),
                true if rotary_dim == head_dim => {
                    d.node(format!("{proj}.rope"), Rope, &[y, cos, sin])
                }
                // Partial rotary (Phi-3's `partial_rotary_factor`): the
                // first `rotary_dim` dimensions rotate (rotate-half among
                // themselves), the rest pass through, as transformers'
                // `apply_rotary_pos_emb` in models/phi3/modeling_phi3.py.
                true => {
                    let part = |d: &mut DecoderBuilder, what: &str, start, end| {
                        d.node(
                            format!("{proj}.{what}"),
                            Slice {
                                axis: 3,
                                start,
                                end,
                            },
                            &[y],
                        )
                    };
                    let rot = part(d, "rotary", 0, rotary_dim)?;
                    let pass = part(d, "pass", rotary_dim, head_dim)?;
                    let rot = d.node(format!("{proj}.rope"), Rope, &[rot, cos, sin])?;
                    d.node(
                        format!("{proj}.rope.joined"),
                        Concat { axis: 3 },
                        &[rot, pass],
                    )
                }
            }
        };
        let q = project(self, "q", heads, true)?;
        let k = project(self, "k", kv_heads, true)?;
        let v = project(self, "v", kv_heads, false)?;

        let cache_shape = vec![1, kv_heads, self.cache.max_len, head_dim];
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
        let step = self.step();
        let (k_cache, v_cache) = (step.k_cache, step.v_cache);
        let mask = step
            .masks
            .iter()
            .find(|(_, layers)| layers.contains(&layer))
            .map(|&(mask, _)| mask)
            .expect("every layer reads a mask");
        let kc = layer_cache(self, k_cache, "k")?;
        let vc = layer_cache(self, v_cache, "v")?;
        let attn = self.node(
            format!("{p}.self_attn"),
            Attention {
                scale: spec.scale,
                softcap: spec.logit_softcap,
            },
            &[q, k, v, kc, vc, mask],
        )?;
        let attn = self.node(
            format!("{p}.self_attn.merged"),
            Transpose {
                perm: vec![0, 2, 1, 3],
            },
            &[attn],
        )?;
        let attn = self.node(
            format!("{p}.self_attn.flat"),
            Reshape {
                shape: vec![1, tokens, heads * head_dim],
            },
            &[attn],
        )?;
        let o = self.linear(attn, &format!("{p}.self_attn.o_proj"), hidden, spec.o_bias)?;

        let rows = vec![1, 1, kv_heads, tokens, head_dim];
        let k_new = self.node(
            format!("{p}.k_new"),
            Reshape {
                shape: rows.clone(),
            },
            &[k],
        )?;
        let v_new = self.node(format!("{p}.v_new"), Reshape { shape: rows }, &[v])?;
        self.new_keys.push(k_new);
        self.new_values.push(v_new);
        Ok(o)
    }

    /// Layer `layer`'s gated MLP on `h`:
    /// `down_proj(act(gate_proj(h)) · up_proj(h))`.
    pub fn gated_mlp(
        &mut self,
        layer: usize,
        h: ValueId,
        activation: GateActivation,
        bias: bool,
    ) -> Result<ValueId, FrontendError> {
        let c = self.config;
        let p = format!("model.layers.{layer}.mlp");
        let gate = self.linear(h, &format!("{p}.gate_proj"), c.intermediate_size, bias)?;
        let up = self.linear(h, &format!("{p}.up_proj"), c.intermediate_size, bias)?;
        let act = match activation {
            GateActivation::Silu => self.node(format!("{p}.act"), Silu, &[gate])?,
            GateActivation::GeluTanh => self.node(format!("{p}.act"), GeluTanh, &[gate])?,
        };
        let act = self.node(format!("{p}.gated"), Mul, &[act, up])?;
        self.linear(act, &format!("{p}.down_proj"), c.hidden_size, bias)
    }
}

/// The Llama layer, which most families keep: pre-norm attention and MLP,
/// each added to the residual stream.
pub fn pre_norm_layer(
    family: &(impl Family + ?Sized),
    d: &mut DecoderBuilder,
    layer: usize,
    x: ValueId,
) -> Result<ValueId, FrontendError> {
    let p = format!("model.layers.{layer}");
    let h = d.rms_norm(x, &format!("{p}.input_layernorm.weight"))?;
    let o = d.self_attention(layer, h, &family.attention(d.config(), layer))?;
    let x = d.residual(format!("{p}.attn_residual"), x, o)?;
    let h = d.rms_norm(x, &format!("{p}.post_attention_layernorm.weight"))?;
    let down = family.mlp(d, layer, h)?;
    d.residual(format!("{p}.mlp_residual"), x, down)
}

/// Lowers the model into a graph over `tokens` positions per step.
pub fn build_graph(
    name: &str,
    config: &ModelConfig,
    family: &dyn Family,
    weights: WeightSource,
    tokens: usize,
    cache: &KvCacheLayout,
    logits_output: LogitsOutput,
) -> Result<Graph, FrontendError> {
    let c = config;
    let hidden = c.hidden_size;
    let mut d = DecoderBuilder {
        b: GraphBuilder::new(name),
        weights,
        config,
        tokens,
        cache,
        norm_style: family.norm_style(),
        sliding: family.sliding_layers(config),
        step: None,
        new_keys: Vec::with_capacity(c.num_layers),
        new_values: Vec::with_capacity(c.num_layers),
    };

    let ids = d.b.input(
        GraphNames::INPUT_IDS,
        TensorType::new(DType::I64, [1, tokens]),
    );
    let positions = d.b.input(
        GraphNames::POSITION_IDS,
        TensorType::new(DType::I64, [1, tokens]),
    );
    let masks: Vec<(ValueId, Vec<usize>)> =
        attention_masks(&d.sliding, c.sliding_window, cache.max_len)
            .into_iter()
            .map(|m| {
                let layers = m.layers.clone();
                (d.b.mask_input(m, tokens, cache.max_len + tokens), layers)
            })
            .collect();
    let logits_index = (logits_output == LogitsOutput::Selected).then(|| {
        d.b.input(
            GraphNames::LOGITS_INDEX,
            TensorType::new(DType::I64, [1, 1]),
        )
    });
    let k_cache = d.b.input(GraphNames::K_CACHE, cache.cache_type());
    let v_cache = d.b.input(GraphNames::V_CACHE, cache.cache_type());

    let embed_name = "model.embed_tokens.weight";
    let x = match d.quantized(embed_name) {
        Some(q) => {
            let mut inputs = d.quantized_weight(&q, [c.vocab_size, hidden])?;
            inputs.push(ids);
            d.node("embed", QuantGather { weights: q.scheme }, &inputs)?
        }
        None => {
            let embed = d.weight(embed_name, &[c.vocab_size, hidden])?;
            d.node("embed", Gather, &[embed, ids])?
        }
    };
    let mut x = family.embed(&mut d, x)?;

    let rope_rows = |d: &mut DecoderBuilder,
                     (cos_name, sin_name): (String, String),
                     node: &str|
     -> Result<(ValueId, ValueId), FrontendError> {
        let cos_table = d.weight(&cos_name, &[cache.max_len, c.rotary_dim])?;
        let sin_table = d.weight(&sin_name, &[cache.max_len, c.rotary_dim])?;
        let cos = d.node(format!("{node}.cos"), Gather, &[cos_table, positions])?;
        let sin = d.node(format!("{node}.sin"), Gather, &[sin_table, positions])?;
        Ok((cos, sin))
    };
    let rope = rope_rows(&mut d, rope_tables(cache.max_len), "rope")?;
    let local_rope = match local_rope(family, config) {
        Some(_) => Some(rope_rows(
            &mut d,
            local_rope_tables(cache.max_len),
            "rope.local",
        )?),
        None => None,
    };
    d.step = Some(StepValues {
        masks,
        k_cache,
        v_cache,
        rope,
        local_rope,
    });

    for layer in 0..c.num_layers {
        x = family.layer(&mut d, layer, x)?;
    }

    let mut x = d.rms_norm(x, "model.norm.weight")?;
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
    let logits = family.logits(&mut d, logits)?;
    if d.new_keys.len() != c.num_layers {
        return Err(FrontendError::Options(format!(
            "the {} decoder made {} attention layers for {} layers",
            c.architecture.hf_name(),
            d.new_keys.len(),
            c.num_layers
        )));
    }
    let new_keys = std::mem::take(&mut d.new_keys);
    let new_values = std::mem::take(&mut d.new_values);
    let k_new = d.node("k_new.all", Concat { axis: 0 }, &new_keys)?;
    let v_new = d.node("v_new.all", Concat { axis: 0 }, &new_values)?;
    d.b.output(logits, GraphNames::LOGITS);
    d.b.output(k_new, GraphNames::K_NEW);
    d.b.output(v_new, GraphNames::V_NEW);
    Ok(d.b.finish()?)
}
