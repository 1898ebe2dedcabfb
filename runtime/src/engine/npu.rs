//! The NPU session: a compiled directory's prefill.om and decode.om run
//! through ACL, with the KV cache kept in device memory across steps.
//!
//! Memory: every input and output buffer is allocated once, when the session
//! opens, and each graph's datasets are bound over them once. The K and V
//! caches are one device buffer each, bound as the `k_cache`/`v_cache` input
//! of both graphs. After a step, the valid rows of `k_new`/`v_new` are copied
//! into the caches: device to device (`aclrtMemcpy` DEVICE_TO_DEVICE) on a
//! host with a card, plain stores in ACL_DEVICE run mode (below). The cache
//! never crosses a bus.
//!
//! Run mode: on the 310B boards (Orange Pi AI Pro) Kiln runs on the board's
//! own CPU, `aclrtGetRunMode` reports ACL_DEVICE, and host and device memory
//! are the same DRAM (`shared/research/acl-and-om.md`, "aclrtGetRunMode").
//! There the step inputs are written straight into their device buffers, the
//! logits read straight out of theirs (as CANN's samples do in that mode) and
//! the new cache rows moved by the CPU: no ACL copy at all. On a host with a PCIe card (ACL_HOST) they go
//! through `aclrtMemcpy`.

use crate::acl::{
    Acl, AclError, AclSetupError, Device, DeviceBuffer, IoBinding, IoDesc, Model, RunMode,
    WeightBinding,
};
use crate::compiled::external_weights::{registered_size, ExternalWeights, ExternalWeightsError};
use crate::compiled::manifest::{GraphInfo, Manifest, TensorInfo};
use crate::compiled::{check_io, check_om_file, CompiledError, OmCheck};
use crate::engine::{check_step, step_chunks, Engine, SessionError, StepInputs};
use crate::ir::{GraphNames, KvCacheLayout, MaskInput};
use crate::om::{OmModelIo, OmTensor};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NpuError {
    /// ACL could not be loaded (no CANN) or initialized.
    #[error(transparent)]
    Setup(#[from] AclSetupError),
    #[error(transparent)]
    Acl(#[from] AclError),
    /// An .om disagrees with manifest.json (e.g. another KV-cache length).
    #[error(transparent)]
    Compiled(#[from] CompiledError),
    #[error(
        "{path} not found: run build_om.sh in the compiled directory on a machine with CANN's atc"
    )]
    MissingOm { path: PathBuf },
    #[error("{om}: as ACL loaded it, {problem}")]
    AclMismatch { om: PathBuf, problem: String },
    #[error("{dir}/manifest.json: {problem}; recompile the model")]
    Manifest { dir: PathBuf, problem: String },
    #[error(transparent)]
    Weights(#[from] ExternalWeightsError),
    #[error(
        "{dir}: the .om files were converted for {built_for} but this NPU is {found}; convert them \
         for it with `{dir}/build_om.sh --soc {found}` (or `--soc auto`), or compile for its board \
         (`kiln compile … --target …`)"
    )]
    WrongChip {
        dir: PathBuf,
        built_for: String,
        found: String,
    },
}

/// What build_om.sh writes: the chip the .om files were converted for.
pub const OM_SOC_FILE: &str = "om_soc.txt";

/// The chip `dir`'s .om files are for: what build_om.sh recorded, else the
/// compile target.
pub fn converted_for(dir: &Path, manifest: &Manifest) -> String {
    std::fs::read_to_string(dir.join(OM_SOC_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| manifest.target.soc_version.clone())
}

/// How the graphs get their weights on the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightLoading {
    /// One buffer per `weight/` file, registered for every graph that reads
    /// it (`aclmdlSetExternalWeightAddress`): each weight once.
    Registered,
    /// One graph, whose weights ACL loads itself (from `weight/` or the .om).
    Single,
    /// Split graphs whose .om files embed their weights (not converted by
    /// this Kiln's build_om.sh): each graph holds its own copy.
    EmbeddedTwice,
    /// Split graphs with external weights, but an ACL that cannot register
    /// buffers (before CANN 8.5): only the decode graph is loaded, so the
    /// weights are held once and the prompt runs token by token.
    DecodeOnly,
}

/// What the session allocated on the device, in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub loading: WeightLoading,
    /// Weight buffers Kiln allocated (registered ones; 0 when ACL loads them).
    pub weights: u64,
    /// How many distinct weight files those are.
    pub weight_files: usize,
    /// K and V caches.
    pub kv_cache: u64,
    /// Every graph's input and output buffers but the caches.
    pub io: u64,
    /// The graphs loaded, by name.
    pub graphs: Vec<String>,
    /// Each graph's work memory as `aclmdlQuerySize` gives it (ACL
    /// allocates it itself), where this ACL reports it.
    pub work: Vec<Option<u64>>,
}

impl Allocation {
    /// One line for `kiln-run`'s report, with what to do if the weights are
    /// held twice or the prompt runs token by token.
    pub fn describe(&self) -> String {
        let mb = |b: u64| b as f64 / 1e6;
        let weights = match self.loading {
            WeightLoading::Registered => format!(
                "weights {:.1} MB ({} files, registered once for {})",
                mb(self.weights),
                self.weight_files,
                self.graphs.join(" and ")
            ),
            WeightLoading::Single => "weights loaded by ACL for the one graph".into(),
            WeightLoading::EmbeddedTwice => "weights embedded in each .om: held once per graph                  (run this Kiln's build_om.sh again for one shared copy)"
                .into(),
            WeightLoading::DecodeOnly => "weights loaded once, with decode.om only: this ACL                  cannot register weight buffers (aclmdlSetExternalWeightAddress, CANN 8.5 and                  later), so the prompt runs token by token; recompile with --graphs single for                  faster prompts on this CANN"
                .into(),
        };
        let work: Vec<String> = self
            .graphs
            .iter()
            .zip(&self.work)
            .filter_map(|(g, w)| w.map(|w| format!("{g} {:.1} MB", mb(w))))
            .collect();
        let work = if work.is_empty() {
            String::new()
        } else {
            format!("; ACL work memory (aclmdlQuerySize): {}", work.join(", "))
        };
        format!(
            "device memory: {weights}; KV cache {:.1} MB; inputs and outputs {:.1} MB{work}",
            mb(self.kv_cache),
            mb(self.io)
        )
    }
}

impl NpuError {
    /// True when no ACL library was found (no CANN on this machine).
    pub fn is_acl_missing(&self) -> bool {
        matches!(
            self,
            NpuError::Setup(AclSetupError::Load(crate::acl::LoadError::NotFound { .. }))
        )
    }
}

/// An element type the session converts to and from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Element {
    I64,
    I32,
    F32,
    F16,
}

impl Element {
    fn parse(dtype: &str) -> Option<Element> {
        match dtype {
            "int64" => Some(Element::I64),
            "int32" => Some(Element::I32),
            "float32" => Some(Element::F32),
            "float16" => Some(Element::F16),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            Element::I64 => 8,
            Element::I32 | Element::F32 => 4,
            Element::F16 => 2,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Element::F32 | Element::F16)
    }
}

fn encode_ints(values: &[i64], element: Element) -> Vec<u8> {
    match element {
        Element::I64 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Element::I32 => values
            .iter()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect(),
        Element::F32 | Element::F16 => unreachable!("checked at open: integer inputs"),
    }
}

fn encode_floats(values: &[f32], element: Element) -> Vec<u8> {
    match element {
        Element::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        // -inf (the mask's hidden value) is exact in f16.
        Element::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        Element::I64 | Element::I32 => unreachable!("checked at open: float inputs"),
    }
}

fn decode_floats(bytes: &[u8], element: Element) -> Vec<f32> {
    match element {
        Element::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Element::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Element::I64 | Element::I32 => unreachable!("checked at open: float outputs"),
    }
}

/// One byte range to copy from a step's `k_new`/`v_new` into the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowCopy {
    pub src: usize,
    pub dst: usize,
    pub len: usize,
}

/// The copies that put a step's `valid` new rows into the cache at slot
/// `past_len`: per layer and KV head, rows `[0, valid)` of the step's
/// `[T, head_dim]` block go to rows `[past_len, past_len + valid)` of the
/// cache's `[max_len, head_dim]` block (the manifest's layout; the same
/// update as [`crate::engine::write_new_rows`], in bytes).
pub fn cache_row_copies(
    layout: &KvCacheLayout,
    graph_tokens: usize,
    valid: usize,
    past_len: usize,
    element_size: usize,
) -> impl Iterator<Item = RowCopy> {
    let row = layout.head_dim * element_size;
    let (max_len, heads) = (layout.max_len, layout.layers * layout.kv_heads);
    (0..heads).map(move |head| RowCopy {
        src: head * graph_tokens * row,
        dst: (head * max_len + past_len) * row,
        len: valid * row,
    })
}

/// A device buffer and the element type of what it holds.
struct Staged {
    buffer: DeviceBuffer,
    element: Element,
}

impl Staged {
    /// Puts `bytes` at the start of the buffer: a plain store when the
    /// process runs on the device, else a host-to-device copy.
    fn upload(&mut self, bytes: &[u8]) -> Result<(), AclError> {
        match self.buffer.host_bytes_mut() {
            Some(memory) => {
                memory[..bytes.len()].copy_from_slice(bytes);
                Ok(())
            }
            None => self.buffer.write(bytes),
        }
    }

    /// The first `count` elements, as f32.
    fn download_floats(&self, count: usize) -> Result<Vec<f32>, AclError> {
        let len = count * self.element.size();
        Ok(match self.buffer.host_bytes() {
            Some(memory) => decode_floats(&memory[..len], self.element),
            None => {
                let mut bytes = vec![0u8; len];
                self.buffer.read(&mut bytes)?;
                decode_floats(&bytes, self.element)
            }
        })
    }
}

/// One loaded graph with its buffers. Field order is drop order: the
/// datasets go before the model, the model before the buffers.
struct GraphRun {
    binding: IoBinding,
    model: Model,
    tokens: usize,
    input_ids: Staged,
    position_ids: Staged,
    /// One per mask input, in the manifest's order.
    masks: Vec<Staged>,
    logits_index: Staged,
    logits: Staged,
    k_new: DeviceBuffer,
    v_new: DeviceBuffer,
}

impl GraphRun {
    /// Bytes of this graph's own input and output buffers (not the caches).
    fn io_bytes(&self) -> u64 {
        [
            &self.input_ids.buffer,
            &self.position_ids.buffer,
            &self.logits_index.buffer,
            &self.logits.buffer,
            &self.k_new,
            &self.v_new,
        ]
        .into_iter()
        .chain(self.masks.iter().map(|m| &m.buffer))
        .map(|b| b.size() as u64)
        .sum()
    }
}

/// What the manifest says about one graph, checked before ACL is touched.
struct GraphPlan<'a> {
    info: &'a GraphInfo,
    om: PathBuf,
    elements: Vec<Element>,
    output_elements: Vec<Element>,
}

impl GraphPlan<'_> {
    fn input(&self, name: &str) -> usize {
        self.info
            .inputs
            .iter()
            .position(|t| t.name == name)
            .expect("checked in NpuSession::plan")
    }
}

fn numel(t: &TensorInfo) -> usize {
    t.shape.iter().product()
}

/// The position of the manifest's output named `name`.
fn output_position(info: &GraphInfo, name: &str) -> Option<usize> {
    info.outputs.iter().position(|t| t.name == name)
}

/// ACL's description as the .om reader's, so [`check_io`] judges both alike.
fn as_om_io(model: &Model) -> OmModelIo {
    let convert = |list: &[IoDesc]| {
        list.iter()
            .map(|d| OmTensor {
                name: d.name.clone(),
                size_bytes: d.size as u64,
                // ND; check_io compares names, dims and dtypes only.
                format: 2,
                dtype: d.dtype,
                dims: d.dims.clone(),
            })
            .collect()
    };
    OmModelIo {
        inputs: convert(model.inputs()),
        outputs: convert(model.outputs()),
    }
}

/// Allocates a buffer for `tensor` as ACL sizes it (at least its bytes by
/// the manifest's shape and dtype).
fn alloc_for(
    device: &Device,
    om: &Path,
    desc: &IoDesc,
    tensor: &TensorInfo,
    element: Element,
) -> Result<DeviceBuffer, NpuError> {
    let bytes = numel(tensor) * element.size();
    if desc.size < bytes {
        return Err(NpuError::AclMismatch {
            om: om.to_path_buf(),
            problem: format!(
                "`{}` takes {} bytes but its shape {:?} of {} needs {bytes}",
                tensor.name, desc.size, tensor.shape, tensor.dtype
            ),
        });
    }
    Ok(device.alloc(desc.size)?)
}

/// The reference [`crate::engine::CpuSession`]'s contract, run on the NPU.
pub struct NpuSession {
    // Field order is drop order: graphs (datasets, models, their buffers),
    // then the caches, then the device (stream, context, reset).
    graphs: Vec<GraphRun>,
    /// Tokens per step of each graph.
    graph_tokens: Vec<usize>,
    /// Registered weight buffers: ACL uses them as they are and never frees
    /// them, so they outlive the models (dropped after `graphs`).
    _weights: Vec<DeviceBuffer>,
    k_cache: DeviceBuffer,
    v_cache: DeviceBuffer,
    allocation: Allocation,
    cache_element: Element,
    device: Device,
    layout: KvCacheLayout,
    /// The graphs' mask inputs, as the manifest describes them.
    masks: Vec<MaskInput>,
    vocab: usize,
    past_len: usize,
    description: String,
}

impl NpuSession {
    /// Opens `dir`'s prefill and decode .om files on ACL device `device_id`,
    /// after checking them against `manifest` (a KV length that disagrees
    /// is refused before anything is loaded).
    pub fn open(dir: &Path, manifest: &Manifest, device_id: i32) -> Result<NpuSession, NpuError> {
        // No CANN on this machine is the first thing to say, before any
        // complaint about the .om files it could not use anyway.
        let acl = Acl::init()?;
        let kv = &manifest.kv_cache;
        let layout = KvCacheLayout {
            layers: kv.layers,
            kv_heads: kv.kv_heads,
            max_len: kv.max_len,
            head_dim: kv.head_dim,
        };
        if manifest.graphs.is_empty() {
            return Err(NpuError::Manifest {
                dir: dir.to_path_buf(),
                problem: "it lists no graphs".into(),
            });
        }
        let mut plans = manifest
            .graphs
            .iter()
            .map(|g| Self::plan(dir, manifest, &g.name, &layout))
            .collect::<Result<Vec<_>, _>>()?;
        let names: Vec<&str> = manifest.graphs.iter().map(|g| g.name.as_str()).collect();
        let external = ExternalWeights::read(dir, &names)?;
        let first = &plans[0];
        let cache_element = first.elements[first.input(GraphNames::K_CACHE)];
        for plan in &plans {
            for name in [GraphNames::K_CACHE, GraphNames::V_CACHE] {
                if plan.elements[plan.input(name)] != cache_element {
                    return Err(NpuError::Manifest {
                        dir: dir.to_path_buf(),
                        problem: format!(
                            "`{name}` of the {} graph has another dtype than the {} graph's k_cache",
                            plan.info.name, first.info.name
                        ),
                    });
                }
            }
        }

        let built_for = converted_for(dir, manifest);
        if let Some(found) = acl.soc_name() {
            if !found.eq_ignore_ascii_case(&built_for) {
                return Err(NpuError::WrongChip {
                    dir: dir.to_path_buf(),
                    built_for,
                    found,
                });
            }
        }
        let device = Device::open(&acl, device_id)?;
        let loading = match (&external, plans.len()) {
            (_, 1) => WeightLoading::Single,
            (Some(_), _) if acl.can_register_weights() => WeightLoading::Registered,
            (Some(_), _) => WeightLoading::DecodeOnly,
            (None, _) => WeightLoading::EmbeddedTwice,
        };
        if loading == WeightLoading::DecodeOnly {
            // Never two copies: the graph of fewest tokens runs everything.
            let keep = (0..plans.len())
                .min_by_key(|&i| plans[i].info.tokens)
                .expect("at least one graph");
            plans = vec![plans.swap_remove(keep)];
        }
        let mut weight_buffers = Vec::new();
        let mut models = Vec::with_capacity(plans.len());
        match (&loading, &external) {
            (WeightLoading::Registered, Some(external)) => {
                weight_buffers = Self::upload_weights(&device, external)?;
                for plan in &plans {
                    let (_, reads) = external
                        .graphs
                        .iter()
                        .find(|(g, _)| *g == plan.info.name)
                        .expect("read for every graph");
                    let bindings: Vec<WeightBinding> = reads
                        .iter()
                        .map(|&at| WeightBinding {
                            file: &external.files[at].name,
                            buffer: &weight_buffers[at],
                        })
                        .collect();
                    let model = Model::load_with_weights(&device, &plan.om, &bindings)?;
                    models.push(Self::check_loaded(manifest, plan, model)?);
                }
            }
            _ => {
                for plan in &plans {
                    models.push(Self::load(&device, manifest, plan)?);
                }
            }
        }

        // One cache buffer per K and V, as large as any graph wants.
        let cache_bytes = models
            .iter()
            .zip(&plans)
            .flat_map(|(model, plan)| {
                [GraphNames::K_CACHE, GraphNames::V_CACHE]
                    .map(|name| model.inputs()[plan.input(name)].size)
            })
            .chain([layout.cache_type().numel() * cache_element.size()])
            .max()
            .unwrap_or(0);
        let mut k_cache = device.alloc(cache_bytes)?;
        let mut v_cache = device.alloc(cache_bytes)?;
        // Zeros, not whatever the memory held: a NaN in an unused slot would
        // survive the additive mask (NaN + -inf is NaN).
        for cache in [&mut k_cache, &mut v_cache] {
            match cache.host_bytes_mut() {
                Some(memory) => memory.fill(0),
                None => {
                    const CHUNK: usize = 1 << 20;
                    let zeros = vec![0u8; CHUNK.min(cache_bytes)];
                    for offset in (0..cache_bytes).step_by(CHUNK) {
                        let len = CHUNK.min(cache_bytes - offset);
                        cache.write_at(offset, &zeros[..len])?;
                    }
                }
            }
        }

        let graphs = models
            .into_iter()
            .zip(&plans)
            .map(|(model, plan)| {
                Self::prepare(
                    &device,
                    model,
                    plan,
                    &k_cache,
                    &v_cache,
                    &manifest.mask.inputs,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let allocation = Allocation {
            loading,
            weights: weight_buffers.iter().map(|b| b.size() as u64).sum(),
            weight_files: weight_buffers.len(),
            kv_cache: (k_cache.size() + v_cache.size()) as u64,
            io: graphs.iter().map(GraphRun::io_bytes).sum(),
            graphs: plans.iter().map(|p| p.info.name.clone()).collect(),
            work: plans
                .iter()
                .map(|p| acl.query_size(&p.om).map(|(work, _)| work as u64))
                .collect(),
        };
        let description = Self::describe(&device, manifest);
        Ok(NpuSession {
            graph_tokens: graphs.iter().map(|g| g.tokens).collect(),
            graphs,
            _weights: weight_buffers,
            allocation,
            k_cache,
            v_cache,
            cache_element,
            device,
            layout,
            masks: manifest.mask.inputs.clone(),
            vocab: manifest.vocab_size,
            past_len: 0,
            description,
        })
    }

    /// Checks one graph's manifest entry and .om file without ACL.
    fn plan<'a>(
        dir: &Path,
        manifest: &'a Manifest,
        name: &str,
        layout: &KvCacheLayout,
    ) -> Result<GraphPlan<'a>, NpuError> {
        let bad = |problem: String| NpuError::Manifest {
            dir: dir.to_path_buf(),
            problem,
        };
        let info = manifest
            .graph(name)
            .ok_or_else(|| bad(format!("there is no `{name}` graph")))?;
        let t = info.tokens;
        let cache = vec![
            layout.layers,
            1,
            layout.kv_heads,
            layout.max_len,
            layout.head_dim,
        ];
        let new_rows = vec![layout.layers, 1, layout.kv_heads, t, layout.head_dim];
        let mut want_inputs = vec![
            (GraphNames::INPUT_IDS, vec![1, t], false),
            (GraphNames::POSITION_IDS, vec![1, t], false),
            (GraphNames::LOGITS_INDEX, vec![1, 1], false),
            (GraphNames::K_CACHE, cache.clone(), true),
            (GraphNames::V_CACHE, cache, true),
        ];
        // The masks the manifest describes, which the session fills: Kiln's
        // names, each once, at least the global one.
        let masks = &manifest.mask.inputs;
        for (i, mask) in masks.iter().enumerate() {
            let known = [GraphNames::ATTENTION_MASK, GraphNames::ATTENTION_MASK_LOCAL]
                .into_iter()
                .find(|&n| n == mask.input)
                .ok_or_else(|| bad(format!("mask input `{}` is not one of Kiln's", mask.input)))?;
            if masks[..i].iter().any(|m| m.input == mask.input) || mask.sliding_window == Some(0) {
                return Err(bad(format!(
                    "mask input `{}` is described twice or with a window of 0",
                    mask.input
                )));
            }
            want_inputs.push((known, vec![1, 1, t, layout.max_len + t], true));
        }
        if !masks.iter().any(|m| m.input == GraphNames::ATTENTION_MASK) {
            return Err(bad(format!(
                "the manifest describes no `{}` input",
                GraphNames::ATTENTION_MASK
            )));
        }
        let want_outputs = [
            (GraphNames::LOGITS, vec![1, 1, manifest.vocab_size]),
            (GraphNames::K_NEW, new_rows.clone()),
            (GraphNames::V_NEW, new_rows),
        ];
        if info.inputs.len() != want_inputs.len() || info.outputs.len() != want_outputs.len() {
            return Err(bad(format!(
                "the {name} graph has {} inputs and {} outputs; a Kiln graph has {} and {}",
                info.inputs.len(),
                info.outputs.len(),
                want_inputs.len(),
                want_outputs.len()
            )));
        }
        let element = |t: &TensorInfo, float: bool| {
            Element::parse(&t.dtype)
                .filter(|e| e.is_float() == float)
                .ok_or_else(|| {
                    bad(format!(
                        "`{}` of the {name} graph is {}, which the NPU session does not handle here",
                        t.name, t.dtype
                    ))
                })
        };
        for (input, shape, float) in &want_inputs {
            let tensor = info
                .inputs
                .iter()
                .find(|x| x.name == *input)
                .ok_or_else(|| bad(format!("the {name} graph has no input `{input}`")))?;
            if tensor.shape != *shape {
                return Err(bad(format!(
                    "`{input}` of the {name} graph is {:?}, the KV-cache layout makes it {shape:?}",
                    tensor.shape
                )));
            }
            element(tensor, *float)?;
        }
        for (output, shape) in &want_outputs {
            let at = output_position(info, output)
                .ok_or_else(|| bad(format!("the {name} graph has no output `{output}`")))?;
            if info.outputs[at].shape != *shape {
                return Err(bad(format!(
                    "`{output}` of the {name} graph is {:?}, expected {shape:?}",
                    info.outputs[at].shape
                )));
            }
        }
        let elements = info
            .inputs
            .iter()
            .map(|t| element(t, t.dtype.starts_with("float")))
            .collect::<Result<Vec<_>, _>>()?;
        let output_elements = info
            .outputs
            .iter()
            .map(|t| element(t, true))
            .collect::<Result<Vec<_>, _>>()?;
        let element_of_input = |name: &str| {
            info.inputs
                .iter()
                .position(|t| t.name == name)
                .map(|at| elements[at])
        };
        let element_of_output =
            |name: &str| output_position(info, name).map(|at| output_elements[at]);
        if element_of_output(GraphNames::K_NEW) != element_of_input(GraphNames::K_CACHE)
            || element_of_output(GraphNames::V_NEW) != element_of_input(GraphNames::V_CACHE)
        {
            return Err(bad(format!(
                "the new K/V rows of the {name} graph differ in dtype from its caches; rows are copied as they are"
            )));
        }

        let om = dir.join(&info.om);
        match check_om_file(dir, manifest, info)? {
            OmCheck::Missing => return Err(NpuError::MissingOm { path: om }),
            // ACL describes it once loaded; that is checked then.
            OmCheck::Matches | OmCheck::Undescribed => {}
        }
        Ok(GraphPlan {
            info,
            om,
            elements,
            output_elements,
        })
    }

    /// One device buffer per distinct weight file, holding its bytes.
    fn upload_weights(
        device: &Device,
        external: &ExternalWeights,
    ) -> Result<Vec<DeviceBuffer>, NpuError> {
        use std::io::Read;
        let mut buffers = Vec::with_capacity(external.files.len());
        for file in &external.files {
            let path = external.path(file);
            let io = |source| {
                NpuError::Weights(ExternalWeightsError::Io {
                    path: path.clone(),
                    source,
                })
            };
            let mut buffer = device.alloc(registered_size(file.bytes) as usize)?;
            let mut reader = std::fs::File::open(&path).map_err(io)?;
            let len = file.bytes as usize;
            match buffer.host_bytes_mut() {
                // On the board: straight from the file into the device's DRAM.
                Some(memory) => reader.read_exact(&mut memory[..len]).map_err(io)?,
                None => {
                    const CHUNK: usize = 8 << 20;
                    let mut chunk = vec![0u8; CHUNK.min(len)];
                    for offset in (0..len).step_by(CHUNK) {
                        let n = CHUNK.min(len - offset);
                        reader.read_exact(&mut chunk[..n]).map_err(io)?;
                        buffer.write_at(offset, &chunk[..n])?;
                    }
                }
            }
            buffers.push(buffer);
        }
        Ok(buffers)
    }

    /// Loads one .om and checks ACL's description of it against the manifest.
    fn load(device: &Device, manifest: &Manifest, plan: &GraphPlan) -> Result<Model, NpuError> {
        let model = Model::load(device, &plan.om)?;
        Self::check_loaded(manifest, plan, model)
    }

    fn check_loaded(
        manifest: &Manifest,
        plan: &GraphPlan,
        model: Model,
    ) -> Result<Model, NpuError> {
        check_io(plan.info, &as_om_io(&model), manifest.kv_cache.max_len).map_err(|problem| {
            NpuError::AclMismatch {
                om: plan.om.clone(),
                problem,
            }
        })?;
        Ok(model)
    }

    /// Allocates a graph's own buffers and binds its datasets over them and
    /// the shared caches.
    fn prepare(
        device: &Device,
        model: Model,
        plan: &GraphPlan,
        k_cache: &DeviceBuffer,
        v_cache: &DeviceBuffer,
        masks_in: &[MaskInput],
    ) -> Result<GraphRun, NpuError> {
        let staged = |name: &str| -> Result<Staged, NpuError> {
            let at = plan.input(name);
            Ok(Staged {
                buffer: alloc_for(
                    device,
                    &plan.om,
                    &model.inputs()[at],
                    &plan.info.inputs[at],
                    plan.elements[at],
                )?,
                element: plan.elements[at],
            })
        };
        let output = |name: &str| -> Result<Staged, NpuError> {
            let at = output_position(plan.info, name).expect("checked in plan");
            Ok(Staged {
                buffer: alloc_for(
                    device,
                    &plan.om,
                    &model.outputs()[at],
                    &plan.info.outputs[at],
                    plan.output_elements[at],
                )?,
                element: plan.output_elements[at],
            })
        };
        let input_ids = staged(GraphNames::INPUT_IDS)?;
        let position_ids = staged(GraphNames::POSITION_IDS)?;
        let masks = masks_in
            .iter()
            .map(|m| staged(&m.input))
            .collect::<Result<Vec<_>, _>>()?;
        let logits_index = staged(GraphNames::LOGITS_INDEX)?;
        let logits = output(GraphNames::LOGITS)?;
        let k_new = output(GraphNames::K_NEW)?.buffer;
        let v_new = output(GraphNames::V_NEW)?.buffer;

        let inputs: Vec<&DeviceBuffer> = plan
            .info
            .inputs
            .iter()
            .map(|t| match t.name.as_str() {
                GraphNames::INPUT_IDS => &input_ids.buffer,
                GraphNames::POSITION_IDS => &position_ids.buffer,
                GraphNames::LOGITS_INDEX => &logits_index.buffer,
                GraphNames::K_CACHE => k_cache,
                GraphNames::V_CACHE => v_cache,
                mask => match masks_in.iter().position(|m| m.input == mask) {
                    Some(at) => &masks[at].buffer,
                    None => unreachable!("plan admits only Kiln's inputs, not {mask}"),
                },
            })
            .collect();
        let outputs: Vec<&DeviceBuffer> = plan
            .info
            .outputs
            .iter()
            .map(|t| match t.name.as_str() {
                GraphNames::LOGITS => &logits.buffer,
                GraphNames::K_NEW => &k_new,
                GraphNames::V_NEW => &v_new,
                other => unreachable!("plan admits only Kiln's outputs, not {other}"),
            })
            .collect();
        // SAFETY: every buffer bound here lives in the NpuSession alongside
        // the binding, and the session drops the binding first.
        let binding = unsafe { model.bind(&inputs, &outputs) }?;
        Ok(GraphRun {
            binding,
            model,
            tokens: plan.info.tokens,
            input_ids,
            position_ids,
            masks,
            logits_index,
            logits,
            k_new,
            v_new,
        })
    }

    fn describe(device: &Device, manifest: &Manifest) -> String {
        let acl = device.acl();
        let version = acl.version().map(|v| format!(" {v}")).unwrap_or_default();
        let soc = match acl.soc_name() {
            Some(soc) => format!("soc {soc}"),
            None => format!(
                "soc not reported; the model was built for {}",
                manifest.target.soc_version
            ),
        };
        let mode = match device.run_mode() {
            RunMode::Device => "runs on the device: inputs and logits without host copies",
            RunMode::Host => "runs on a host: inputs and logits copied over the bus",
        };
        format!(
            "NPU (Ascend via ACL{version}, device {}, {soc}, {mode}; {})",
            device.id(),
            acl.library()
        )
    }

    /// What the session allocated on the device.
    pub fn allocation(&self) -> &Allocation {
        &self.allocation
    }

    /// Where this process runs relative to the NPU.
    pub fn run_mode(&self) -> RunMode {
        self.device.run_mode()
    }

    /// Both caches copied to the host as f32, `[layers, 1, kv_heads,
    /// max_len, head_dim]` each: for checks and dumps, not for stepping.
    pub fn read_kv_cache(&self) -> Result<(Vec<f32>, Vec<f32>), NpuError> {
        let count = self.layout.cache_type().numel();
        let read = |cache: &DeviceBuffer| -> Result<Vec<f32>, AclError> {
            let len = count * self.cache_element.size();
            Ok(match cache.host_bytes() {
                Some(memory) => decode_floats(&memory[..len], self.cache_element),
                None => {
                    let mut bytes = vec![0u8; len];
                    cache.read(&mut bytes)?;
                    decode_floats(&bytes, self.cache_element)
                }
            })
        };
        Ok((read(&self.k_cache)?, read(&self.v_cache)?))
    }

    /// Runs graph `which` over `tokens` (at most the graph's length).
    fn step(&mut self, which: usize, tokens: &[u32]) -> Result<Vec<f32>, NpuError> {
        let graph = &mut self.graphs[which];
        let inputs = StepInputs::new(
            tokens,
            graph.tokens,
            self.past_len,
            self.layout.max_len,
            &self.masks,
        );
        graph
            .input_ids
            .upload(&encode_ints(&inputs.input_ids, graph.input_ids.element))?;
        graph.position_ids.upload(&encode_ints(
            &inputs.position_ids,
            graph.position_ids.element,
        ))?;
        for (staged, mask) in graph.masks.iter_mut().zip(&inputs.masks) {
            staged.upload(&encode_floats(mask, staged.element))?;
        }
        graph.logits_index.upload(&encode_ints(
            &[inputs.logits_index],
            graph.logits_index.element,
        ))?;
        graph.model.execute_bound(&graph.binding)?;
        let valid = tokens.len();
        let element_size = self.cache_element.size();
        for (cache, new_rows) in [
            (&mut self.k_cache, &graph.k_new),
            (&mut self.v_cache, &graph.v_new),
        ] {
            let copies = cache_row_copies(
                &self.layout,
                graph.tokens,
                valid,
                self.past_len,
                element_size,
            );
            match (new_rows.host_bytes(), cache.host_bytes_mut()) {
                // On the board (ACL_DEVICE) both are the process's own
                // memory: plain copies, not 2 × layers × KV heads ACL calls
                // per step (aclrtMemcpy2d, which could batch them, is not
                // available in the 310B's RC form).
                (Some(src), Some(dst)) => {
                    for c in copies {
                        dst[c.dst..c.dst + c.len].copy_from_slice(&src[c.src..c.src + c.len]);
                    }
                }
                _ => {
                    for c in copies {
                        cache.copy_from_device(c.dst, new_rows, c.src, c.len)?;
                    }
                }
            }
        }
        self.past_len += valid;
        Ok(graph.logits.download_floats(self.vocab)?)
    }

    fn run(&mut self, tokens: &[u32]) -> Result<Vec<f32>, NpuError> {
        // ACL contexts are per thread: this may not be the opening thread.
        self.device.bind()?;
        let mut logits = Vec::new();
        for (which, range) in step_chunks(&self.graph_tokens, tokens.len()) {
            logits = self.step(which, &tokens[range])?;
        }
        Ok(logits)
    }
}

impl Engine for NpuSession {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SessionError> {
        check_step(tokens, self.vocab, self.past_len, self.layout.max_len)?;
        let start = self.past_len;
        self.run(tokens).map_err(|e| {
            // A half-done prefill leaves rows the mask will hide again.
            self.past_len = start;
            SessionError::Device(Box::new(e))
        })
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
        self.description.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::write_new_rows;

    #[test]
    fn row_copies_match_the_host_cache_update() {
        let layout = KvCacheLayout {
            layers: 2,
            kv_heads: 3,
            max_len: 7,
            head_dim: 4,
        };
        let graph_tokens = 3;
        let new_rows: Vec<f32> = (0..2 * 3 * graph_tokens * 4)
            .map(|i| i as f32 + 1.0)
            .collect();
        for (valid, past) in [(3, 0), (2, 3), (1, 6)] {
            let mut expected = vec![0f32; 2 * 3 * 7 * 4];
            write_new_rows(&mut expected, &new_rows, &layout, graph_tokens, valid, past);
            let mut cache = vec![0f32; expected.len()];
            let copies: Vec<RowCopy> =
                cache_row_copies(&layout, graph_tokens, valid, past, 4).collect();
            assert_eq!(copies.len(), 6, "one copy per layer and KV head");
            for c in copies {
                let (src, dst, len) = (c.src / 4, c.dst / 4, c.len / 4);
                cache[dst..dst + len].copy_from_slice(&new_rows[src..src + len]);
            }
            assert_eq!(cache, expected, "valid {valid}, past {past}");
        }
    }

    #[test]
    fn floats_round_trip_through_f16_including_the_mask_value() {
        let values = [0.0, -0.25, 3.5, f32::NEG_INFINITY, 1000.0];
        let bytes = encode_floats(&values, Element::F16);
        assert_eq!(bytes.len(), 10);
        assert_eq!(decode_floats(&bytes, Element::F16), values);
        assert_eq!(
            decode_floats(&encode_floats(&values, Element::F32), Element::F32),
            values
        );
        assert_eq!(
            encode_ints(&[-2, 5], Element::I32),
            [254, 255, 255, 255, 5, 0, 0, 0]
        );
    }
}
