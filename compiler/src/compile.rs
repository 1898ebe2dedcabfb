//! `kiln compile`: a Hugging Face model directory → a compiled directory
//! with the prefill and decode graphs as ONNX, `build_om.sh` for ATC, the
//! IR, the tokenizer and `manifest.json`. The directory appears whole or not
//! at all: everything is written to a temporary directory beside it, which
//! is renamed at the end.

use crate::backend::atc::{self, AtcJob, Target};
use crate::backend::onnx::allow_list::{self, AVOID};
use crate::backend::onnx::builder::FloatType;
use crate::backend::onnx::{self, OnnxGraph, OnnxOptions, WeightPlacement};
use crate::frontend::{FrontendError, ShapeRequest, SideFiles};
use crate::output::StagedDir;
use crate::passes::quantize;
use kiln_runtime::compiled::manifest::{
    GenerationInfo, GraphInfo, KvCacheInfo, Manifest, MaskInfo, TargetInfo, TensorInfo,
    MANIFEST_FILE, MANIFEST_FORMAT,
};
use kiln_runtime::compiled::weights_bin::{
    self, DequantizedTensor, Initializer, Recipe, WeightsBin,
};
use kiln_runtime::ir::{DType, ModelIr};
use kiln_runtime::weights::WeightStore;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Files inside a compiled directory.
pub const IR_FILE: &str = "model.kiln.json";
pub const EXTERNAL_DATA_FILE: &str = "weights.bin";
pub const BUILD_SCRIPT: &str = "build_om.sh";
pub const REFERENCE_WEIGHTS: &str = "weights.safetensors";
/// The external data of the ONNX Runtime graphs of a quantized model that
/// neither `weights.safetensors` nor `weights.bin` holds as the graphs read
/// it (none, for the models Kiln compiles today: the file is made only if
/// needed).
pub const ORT_EXTERNAL_DATA_FILE: &str = "weights.ort.bin";
/// The initializers of `weights.bin` that no recipe makes from the
/// reference weights, as they are (none for the models Kiln compiles
/// today: the file is made only if needed).
pub const WEIGHTS_EXTRA_FILE: &str = "weights.extra.bin";

/// Above this many weight bytes the ONNX files keep their weights in an
/// external data file (protobuf messages are limited to 2 GiB).
const INLINE_LIMIT: u64 = 1900 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Onnx(#[from] onnx::OnnxError),
    #[error(transparent)]
    Atc(#[from] atc::AtcError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} exists and is not a Kiln output directory (it has no {MANIFEST_FILE}); choose another --output")]
    OutputExists(PathBuf),
    #[error(transparent)]
    Lower(#[from] crate::LowerError),
    #[error("{0}")]
    QuantForAtc(String),
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    #[error(transparent)]
    Kernel(#[from] crate::backend::ascendc::AscendcError),
    #[error("--kernels ascendc: {0}")]
    Kernels(String),
    #[error("the {graph} graph contains {op}, which {why}")]
    Avoided {
        graph: String,
        op: &'static str,
        why: &'static str,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CompileError + '_ {
    move |source| CompileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the ATC graphs are made of (`--kernels`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// Standard ONNX ops only.
    #[default]
    Onnx,
    /// Custom `ai.kiln` nodes for the ops Kiln generates Ascend C kernels
    /// for, with the package in `kernels/`.
    Ascendc,
}

/// The kernel package's folder inside a compiled directory.
pub const KERNELS_DIR: &str = "kernels";

pub struct CompileOptions {
    pub shape: ShapeRequest,
    pub target: &'static Target,
    /// The board named with `--target`, if one was.
    pub board: Option<&'static atc::Board>,
    pub float: FloatType,
    pub opset: i64,
    /// Weights in one `weights.bin` the graphs share (else inline in each
    /// .onnx while below protobuf's 2 GB).
    pub external_data: bool,
    /// Write `weights.bin` too (`--store-atc-weights`): otherwise the
    /// manifest records how to make it from the reference weights, and
    /// `kiln-run expand-weights` (or build_om.sh) makes it where needed.
    pub store_atc_weights: bool,
    /// Do not run ATC even when it is installed.
    pub skip_atc: bool,
    /// The weights' precision.
    pub quant: crate::QuantMode,
    /// The board's memory: refuse a model whose plan does not fit.
    pub device_memory: Option<u64>,
    /// Let the ATC graphs hold the dequantized (fp16) weights of a
    /// quantized model, which no stock ATC op keeps low-bit on the 310B
    /// (but for `w8a8`, which is lowered to AscendQuant/AscendDequant).
    pub dequantize_for_atc: bool,
    pub kernels: Kernels,
    /// The residual stream's type in an fp16 model (`--residual-dtype`);
    /// `None` for the default, [`default_residual`].
    pub residual: Option<FloatType>,
}

/// The residual stream's type when none is asked for: f32 in an fp16 model
/// (outlier activations in the residual stream pass fp16's 65504 in real
/// models; keeping it in f32 costs one Cast per graph and f32 adds, see
/// `backend/onnx/ops/residual.rs`), but fp16 with `--kernels ascendc`, whose
/// Add + RMSNorm kernel computes in fp16. An f32 model is f32 throughout.
pub fn default_residual(float: FloatType, kernels: Kernels) -> FloatType {
    match (float, kernels) {
        (FloatType::F32, _) => FloatType::F32,
        (FloatType::F16, Kernels::Ascendc) => FloatType::F16,
        (FloatType::F16, Kernels::Onnx) => FloatType::F32,
    }
}

/// The Ascend C family a target's chip belongs to.
pub fn kernel_target(target: &Target) -> Result<crate::backend::ascendc::Target, CompileError> {
    use crate::backend::ascendc::Target as K;
    let soc = target.soc_version;
    if soc.starts_with("Ascend310B") {
        Ok(K::Ascend310b)
    } else if soc.starts_with("Ascend910B") {
        Ok(K::Ascend910b)
    } else {
        Err(CompileError::Kernels(format!(
            "Kiln generates Ascend C for the 310B (ascend310b1, ascend310b4) and 910B families, not {soc}; \
             use --kernels onnx for this target"
        )))
    }
}

/// What `--kernels ascendc` generated, for the summary.
pub struct KernelsReport {
    pub target: crate::backend::ascendc::Target,
    /// Distinct kernel instances in the package.
    pub instances: usize,
    /// GM bytes the decode graph's kernels read per token.
    pub decode_bytes_per_token: u64,
    /// Decode nodes with a kernel candidate that stayed standard ops, and why.
    pub skipped: Vec<(String, String)>,
}

/// What a compile produced, for the closing summary.
pub struct CompileReport {
    pub out: PathBuf,
    pub manifest: Manifest,
    pub files: Vec<(String, u64)>,
    pub node_counts: Vec<(String, std::collections::BTreeMap<String, usize>)>,
    /// Bytes a decode step reads: every weight once, plus the whole KV cache.
    pub decode_bytes_per_token: u64,
    /// `Some(path)` when ATC was found and run.
    pub atc: Option<PathBuf>,
    /// What quantization did, when Kiln quantized.
    pub quant: Option<crate::passes::quantize::QuantSummary>,
    /// Notes for the summary (e.g. that the .om files hold fp16 weights).
    pub notes: Vec<String>,
    pub kernels: Option<KernelsReport>,
}

pub fn compile(
    model_dir: &Path,
    out: &Path,
    options: &CompileOptions,
    mut progress: impl FnMut(&str),
) -> Result<CompileReport, CompileError> {
    if crate::output::check_replaceable(out, MANIFEST_FILE).is_err() {
        return Err(CompileError::OutputExists(out.to_path_buf()));
    }
    // A scheme ATC cannot take is refused before a large model is read.
    let kernel_target = match options.kernels {
        Kernels::Onnx => None,
        Kernels::Ascendc => {
            if options.float != FloatType::F16 {
                return Err(CompileError::Kernels(
                    "the kernels compute in float16; use --dtype fp16".into(),
                ));
            }
            Some(kernel_target(options.target)?)
        }
    };
    atc_form(
        true,
        &options.quant,
        options.dequantize_for_atc,
        options.kernels,
    )?;
    let residual = match (options.float, options.residual) {
        (FloatType::F32, _) => FloatType::F32,
        (FloatType::F16, Some(FloatType::F32)) if options.kernels == Kernels::Ascendc => {
            return Err(onnx::OnnxError::ResidualWithKernels.into());
        }
        (FloatType::F16, Some(asked)) => asked,
        (FloatType::F16, None) => default_residual(options.float, options.kernels),
    };
    progress("reading the model");
    let crate::Lowered {
        mut model,
        ir,
        quant,
        report_graph,
    } = crate::lower_with(model_dir, &options.shape, &options.quant, &mut progress)?;
    let mut notes = Vec::new();
    // ATC's graphs: the IR itself (float, or w8a8 in ATC's own quantization
    // ops), or the same over dequantized weights.
    let quantized = ir.graphs().iter().any(quantize::is_quantized);
    let atc_form = atc_form(
        quantized,
        &options.quant,
        options.dequantize_for_atc,
        options.kernels,
    )?;
    let atc_quant_ops = match atc_form {
        AtcForm::Int8 => onnx::QuantOps::Ascend,
        _ => onnx::QuantOps::Standard,
    };
    let atc_graphs: Vec<kiln_runtime::ir::Graph> = match atc_form {
        AtcForm::Dequantized => {
            notes.push(format!(
                "the ATC graphs (prefill.onnx, decode.onnx) hold the dequantized weights in {}: the .om \
                 files will not keep them low-bit; the reference weights and the .ort.onnx graphs keep \
                 them quantized",
                options.float.name()
            ));
            let mut names = Default::default();
            ir.graphs()
                .iter()
                .map(|g| quantize::dequantized(g, &mut model.weights, &mut names))
                .collect::<Result<_, _>>()
                .map_err(crate::LowerError::from)?
        }
        AtcForm::Int8 => {
            notes.push(
                "the ATC graphs (prefill.onnx, decode.onnx) keep the int8 weights: each quantized \
                 layer is AscendQuant → int8 MatMul → AscendDequant, with the activations quantized \
                 per token in the graph (not yet run on an NPU)"
                    .to_string(),
            );
            ir.graphs().to_vec()
        }
        AtcForm::Kernels => {
            let target = kernel_target.expect("AtcForm::Kernels comes with --kernels ascendc");
            // The GEMV kernels read the packed weights; every other quantized
            // node (a prefill Linear of T > 1 rows: the GEMV is M = 1 only,
            // or a quantized embedding) gets dequantized weights.
            let mut names = Default::default();
            let mut graphs = Vec::new();
            for g in ir.graphs() {
                let keep: Vec<bool> = (0..g.nodes.len())
                    .map(|i| {
                        let kernel = crate::backend::ascendc::plan::node_kernel(g, i, target)?;
                        Ok(
                            matches!(g.nodes[i].op, kiln_runtime::ir::Op::QuantLinear(_))
                                && matches!(
                                    kernel,
                                    crate::backend::ascendc::plan::NodeKernel::Calls(_)
                                ),
                        )
                    })
                    .collect::<Result<_, CompileError>>()?;
                let quant_nodes = g
                    .nodes
                    .iter()
                    .filter(|n| {
                        matches!(
                            n.op,
                            kiln_runtime::ir::Op::QuantLinear(_)
                                | kiln_runtime::ir::Op::QuantGather(_)
                        )
                    })
                    .count();
                let kept = keep.iter().filter(|&&k| k).count();
                if quant_nodes > kept {
                    notes.push(format!(
                        "{}.onnx: {} of {quant_nodes} quantized layers keep their packed weights in \
                         GEMV kernels; the other {} (the GEMV takes one row: prefill Linears, \
                         embeddings) hold weights dequantized to {}",
                        g.name,
                        kept,
                        quant_nodes - kept,
                        options.float.name()
                    ));
                }
                graphs.push(
                    quantize::dequantized_except(g, &mut model.weights, &mut names, |i| keep[i])
                        .map_err(crate::LowerError::from)?,
                );
            }
            graphs
        }
        AtcForm::Float => ir.graphs().to_vec(),
    };
    let onnx_options = OnnxOptions {
        opset: options.opset,
        float: options.float,
        quant_ops: onnx::QuantOps::Standard,
        kernels: None,
        residual,
    };
    let onnx_options = OnnxOptions {
        kernels: None,
        ..onnx_options
    };
    let atc_options = OnnxOptions {
        quant_ops: atc_quant_ops,
        kernels: kernel_target,
        ..onnx_options
    };
    progress("lowering to ONNX");
    let mut lowered = Vec::new();
    for graph in &atc_graphs {
        let onnx = onnx::lower(graph, &atc_options)?;
        let kernel_ops: Vec<&str> = onnx
            .kernels
            .requests
            .iter()
            .map(|r| r.op.kind().op_type())
            .collect();
        allow_list::atc().check_with_kernels(&onnx.model, &graph.name, &kernel_ops)?;
        for node in &onnx.model.graph.node {
            if let Some(&(op, why)) = AVOID.iter().find(|(op, _)| *op == node.op_type) {
                return Err(CompileError::Avoided {
                    graph: graph.name.clone(),
                    op,
                    why,
                });
            }
        }
        lowered.push((graph.name.clone(), onnx));
    }

    // The device memory plan, checked before anything is written.
    // The manifest's graph entries, which the plan's IO sizes come from too.
    let plan_infos: Vec<GraphInfo> = graph_infos(&lowered, &ir);
    let plan = crate::plan::from_graphs(
        &lowered.iter().map(|(_, g)| g).collect::<Vec<_>>(),
        &plan_infos,
        &model.weights,
        options.float,
        crate::plan::parameters(&model.config)?,
    )?;
    if let Some(memory) = options.device_memory {
        if let Some(warning) = crate::plan::check_fits(&plan, memory)? {
            notes.push(format!("warning: {warning}"));
        }
    }

    // A temporary directory beside the target, renamed into place at the end.
    let tmp = StagedDir::beside(out).map_err(io_err(out))?;

    let weight_bytes = initializer_bytes(&lowered[0].1, &model.weights, options.float)?;
    let external = options.external_data || weight_bytes > INLINE_LIMIT;
    let external_path = tmp.path.join(EXTERNAL_DATA_FILE);
    let placement = match (external, options.store_atc_weights) {
        (false, _) => WeightPlacement::Inline,
        (true, true) => WeightPlacement::External(&external_path),
        (true, false) => WeightPlacement::Unwritten(&external_path),
    };
    let derived_bin = external && !options.store_atc_weights;
    let names: Vec<String> = lowered.iter().map(|(n, _)| format!("{n}.onnx")).collect();
    let paths: Vec<PathBuf> = names.iter().map(|name| tmp.path.join(name)).collect();
    let graphs: Vec<(&Path, &OnnxGraph)> = paths
        .iter()
        .zip(&lowered)
        .map(|(path, (_, graph))| (path.as_path(), graph))
        .collect();
    // Report the start, and every tenth of the tensors for large models.
    let mut last_tenth = 0;
    let report = |done: usize, total: usize| {
        let tenth = (done * 10).checked_div(total).unwrap_or(10);
        if done == 0 {
            let mb = weight_bytes as f64 / 1e6;
            progress(&if derived_bin {
                format!(
                    "writing {} and {REFERENCE_WEIGHTS}, and the recipe of {EXTERNAL_DATA_FILE} ({total} weight \
                     tensors, {mb:.1} MB, made from {REFERENCE_WEIGHTS} when needed)",
                    names.join(", ")
                )
            } else if external {
                format!(
                    "writing {}, {EXTERNAL_DATA_FILE} ({total} weight tensors, {mb:.1} MB) and {REFERENCE_WEIGHTS}",
                    names.join(", ")
                )
            } else {
                format!(
                    "writing {} ({total} weight tensors, {mb:.1} MB each) and {REFERENCE_WEIGHTS}",
                    names.join(", ")
                )
            });
        } else if weight_bytes > 100 << 20 && tenth != last_tenth {
            last_tenth = tenth;
            progress(&format!("writing the weights: {}%", tenth * 10));
        }
    };
    // The reference weights are copied from the checkpoint meanwhile.
    let reference_path = tmp.path.join(REFERENCE_WEIGHTS);
    let mut reference_names: Vec<&str> = ir
        .graphs()
        .iter()
        .flat_map(|g| g.weights().map(|(_, t)| t))
        .collect();
    reference_names.sort();
    reference_names.dedup();
    let (written, reference) = std::thread::scope(|s| {
        let reference =
            s.spawn(|| write_reference_weights(&reference_names, &model.weights, &reference_path));
        let written = onnx::write(&graphs, &model.weights, options.float, placement, report);
        let reference = reference
            .join()
            .expect("the reference weights writer panicked");
        (written, reference)
    });
    let written = written?;
    let weights_sha256 = written.weights_sha256.clone();
    let reference = reference?;
    // How weights.bin is made from the reference weights: recorded whether
    // or not the file is written, so that either can be checked.
    let weights_bin = if external {
        let (mut recipe, extra) = weights_bin_recipe(
            &written,
            &lowered,
            &model.weights,
            &reference_names,
            options.float,
        )?;
        recipe.stored = options.store_atc_weights;
        if !extra.is_empty() {
            let path = tmp.path.join(WEIGHTS_EXTRA_FILE);
            write_extra(&path, &extra, &model.weights, options.float)?;
            recipe.extra_file = Some(WEIGHTS_EXTRA_FILE.to_string());
        }
        Some(recipe)
    } else {
        None
    };

    // ONNX Runtime's graphs over the quantized weights, beside ATC's.
    let mut ort_names = Vec::new();
    if quantized {
        progress("writing the quantized graphs for ONNX Runtime");
        let ort: Vec<(String, OnnxGraph)> = ir
            .graphs()
            .iter()
            .map(|g| {
                Ok((
                    format!("{}.ort.onnx", g.name),
                    onnx::lower(g, &onnx_options)?,
                ))
            })
            .collect::<Result<_, CompileError>>()?;
        let ort_bytes = initializer_bytes(&ort[0].1, &model.weights, options.float)?;
        let ort_external = tmp.path.join(ORT_EXTERNAL_DATA_FILE);
        // Their weights are already written: the quantized tensors as stored
        // in the reference weights, the float ones (norms, tables) as ATC's
        // graphs read them in weights.bin. The graphs point at those bytes.
        let existing = stored_elsewhere(
            &ort,
            &lowered,
            &written.stored,
            &reference,
            &model.weights,
            options.float,
        )?;
        let placement = if external || ort_bytes > INLINE_LIMIT {
            WeightPlacement::Reuse {
                existing: &existing,
                rest: &ort_external,
            }
        } else {
            WeightPlacement::Inline
        };
        let paths: Vec<PathBuf> = ort.iter().map(|(n, _)| tmp.path.join(n)).collect();
        let graphs: Vec<(&Path, &OnnxGraph)> = paths
            .iter()
            .zip(&ort)
            .map(|(p, (_, g))| (p.as_path(), g))
            .collect();
        onnx::write(&graphs, &model.weights, options.float, placement, |_, _| {})?;
        ort_names = ort.into_iter().map(|(n, _)| n).collect();
    }

    progress("writing the manifest, IR, tokenizer and build_om.sh");
    let ir_path = tmp.path.join(IR_FILE);
    ir.save_json(&ir_path).map_err(|e| CompileError::Io {
        path: ir_path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    // config.json, tokenizer.json, tokenizer_config.json and
    // generation_config.json, as read (or rebuilt from a GGUF).
    let mut side_files = Vec::new();
    for (name, bytes) in model.files.present() {
        let dst = tmp.path.join(name);
        std::fs::write(&dst, bytes).map_err(io_err(&dst))?;
        side_files.push(name);
    }
    let has = |name: &str| side_files.contains(&name).then(|| name.to_string());
    let tokenizer = has(SideFiles::TOKENIZER);
    let tokenizer_config = has(SideFiles::TOKENIZER_CONFIG);
    // The ONNX Runtime runner travels with the model, for `kiln-run diff`.
    let runner = tmp.path.join("ort_run.py");
    std::fs::write(&runner, include_str!("../../examples/ort_run.py")).map_err(io_err(&runner))?;

    let config_bytes = &model.files.config;
    let mut manifest = manifest(
        &ir,
        plan_infos,
        options,
        format!("{:x}", Sha256::digest(config_bytes)),
        weights_sha256,
        tokenizer,
        tokenizer_config,
    );
    manifest.memory = Some(plan);
    manifest.weights_bin = weights_bin;
    manifest.residual_dtype = Some(residual.name().to_string());
    for (graph, ort) in manifest.graphs.iter_mut().zip(&ort_names) {
        graph.ort_onnx = Some(ort.clone());
    }
    if quantized {
        manifest.quantization = Some(match &quant {
            Some(summary) => summary.describe(),
            None => "as stored in the GGUF file (Q8_0/Q4_0/Q4_1 blocks)".to_string(),
        });
        manifest.atc_weights = Some(match atc_form {
            AtcForm::Int8 => "int8 (AscendQuant → int8 MatMul → AscendDequant)".to_string(),
            AtcForm::Kernels => format!(
                "packed as quantized where a GEMV kernel reads them (KilnGemvByte: int8, \
                 KilnGemvNibble/KilnGemvNibbleMin: two int4 per uint8, fp16 scales/mins); \
                 dequantized to {} elsewhere",
                options.float.name()
            ),
            _ => format!("dequantized to {}", options.float.name()),
        });
    }
    let mut kernels_report = None;
    if let Some(target) = kernel_target {
        progress("generating the Ascend C kernel package");
        let (_, report, info) = kernel_package(&lowered, target, &tmp.path)?;
        manifest.kernels = Some("ascendc".to_string());
        manifest.kernel_package = Some(info);
        kernels_report = Some(report);
    }
    if let (Some(graph), Some(summary), crate::QuantMode::Quantize(q)) =
        (report_graph, &quant, &options.quant)
    {
        let report =
            crate::quant_report::measure(model_dir, &model, graph, q, summary, &mut progress)?;
        let path = tmp.path.join(crate::quant_report::QUANT_REPORT_FILE);
        let json = serde_json::to_vec_pretty(&report).expect("the report serializes");
        std::fs::write(&path, json).map_err(io_err(&path))?;
        if let Some(a) = &report.evaluation.agreement {
            notes.push(format!(
                "{}: on the calibration text (in-sample), perplexity {:.3} against the float \
                 model's {:.3} (×{:.4}), top-1 agreement {:.1}%",
                crate::quant_report::QUANT_REPORT_FILE,
                report.evaluation.ppl,
                a.reference_ppl,
                a.ppl_ratio,
                100.0 * a.top1_agreement
            ));
        }
    }
    let manifest_path = tmp.path.join(MANIFEST_FILE);
    std::fs::write(&manifest_path, manifest.to_json()).map_err(io_err(&manifest_path))?;

    let precision_mode = match options.float {
        FloatType::F16 => "must_keep_origin_dtype",
        FloatType::F32 => "allow_fp32_to_fp16",
    };
    let jobs: Vec<AtcJob> = manifest
        .graphs
        .iter()
        .map(|g| AtcJob {
            graph: g.name.clone(),
            onnx: g.onnx.clone(),
            om_base: g.om.trim_end_matches(".om").to_string(),
            inputs: g
                .inputs
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect(),
        })
        .collect();
    let script_path = tmp.path.join(BUILD_SCRIPT);
    let external_data = manifest
        .weights_bin
        .as_ref()
        .map(|w| (w.file.as_str(), w.bytes));
    std::fs::write(
        &script_path,
        atc::script(&jobs, options.target, precision_mode, external_data),
    )
    .map_err(io_err(&script_path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script_path, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err(&script_path))?;
    }

    // Swap the finished directory into place.
    tmp.commit().map_err(io_err(out))?;

    let atc_path = if options.skip_atc {
        None
    } else {
        atc::find_atc()
    };
    if let Some(atc) = &atc_path {
        // ATC reads weights.bin: made here first, as build_om.sh would.
        let made = weights_bin::ensure(out, &manifest, |done, total| {
            if done == 0 {
                progress(&format!(
                    "writing {EXTERNAL_DATA_FILE} ({:.1} MB) from {REFERENCE_WEIGHTS} for ATC",
                    total as f64 / 1e6
                ));
            }
        });
        made.map_err(onnx::OnnxError::from)?;
        progress(&format!("running ATC ({})", atc.display()));
        atc::run_script(out, atc, |line| progress(line))?;
    }

    let mut files: Vec<(String, u64)> = std::fs::read_dir(out)
        .map_err(io_err(out))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            Some((
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().ok()?.len(),
            ))
        })
        .collect();
    files.sort();
    // The graph a token runs reads its own weights (with --kernels ascendc
    // the decode graph's are packed where prefill's are dequantized).
    let decode_graph = lowered
        .iter()
        .find(|(n, _)| n == "decode")
        .unwrap_or(&lowered[0]);
    let decode_weight_bytes = initializer_bytes(&decode_graph.1, &model.weights, options.float)?;
    let kv = &manifest.kv_cache;
    let kv_bytes =
        2 * kv.layers * kv.kv_heads * kv.max_len * kv.head_dim * options.float.size_bytes();
    Ok(CompileReport {
        out: out.to_path_buf(),
        files,
        node_counts: lowered
            .iter()
            .map(|(n, g)| (n.clone(), g.node_counts()))
            .collect(),
        decode_bytes_per_token: decode_weight_bytes + kv_bytes as u64,
        manifest,
        atc: atc_path,
        quant,
        notes,
        kernels: kernels_report,
    })
}

/// Writes `<dir>/kernels/`: the package serving every graph's custom nodes.
fn kernel_package(
    lowered: &[(String, OnnxGraph)],
    target: crate::backend::ascendc::Target,
    dir: &Path,
) -> Result<
    (
        crate::backend::ascendc::Package,
        KernelsReport,
        kiln_runtime::compiled::manifest::KernelPackageInfo,
    ),
    CompileError,
> {
    use kiln_runtime::compiled::manifest::{KernelInstanceInfo, KernelPackageInfo};
    let mut requests: Vec<crate::backend::ascendc::KernelRequest> = Vec::new();
    for (_, g) in lowered {
        for r in &g.kernels.requests {
            if !requests.iter().any(|have| have.op == r.op) {
                requests.push(r.clone());
            }
        }
    }
    let package =
        crate::backend::ascendc::generate_package(&dir.join(KERNELS_DIR), target, &requests)?;
    // The graph a decode token runs: `decode`, or the single `step` graph.
    let decode = lowered
        .iter()
        .find(|(n, _)| n == "decode")
        .or_else(|| lowered.last())
        .map(|(_, g)| &g.kernels);
    let decode_bytes = match decode {
        Some(plan) => plan.bytes_per_step(target)?,
        None => 0,
    };
    let instances = package
        .kernels
        .iter()
        .map(|k| KernelInstanceInfo {
            op_type: k.op_type.clone(),
            kernel: k.kernel.clone(),
            block_dim: k.block_dim,
            bytes_read: k.bytes_read,
            calls: lowered
                .iter()
                .filter_map(|(name, g)| {
                    let i = g.kernels.requests.iter().position(|r| r.op == k.op)?;
                    Some((name.clone(), g.kernels.calls[i]))
                })
                .collect(),
            tiling: serde_json::to_value(&k.tiling).expect("tilings serialize"),
        })
        .collect();
    let info = KernelPackageInfo {
        dir: KERNELS_DIR.to_string(),
        manifest: format!("{KERNELS_DIR}/kernels.json"),
        target: target.compute_unit().to_string(),
        decode_bytes_per_token: decode_bytes,
        instances,
    };
    let report = KernelsReport {
        target,
        instances: package.kernels.len(),
        decode_bytes_per_token: decode_bytes,
        skipped: decode.map(|p| p.skipped.clone()).unwrap_or_default(),
    };
    Ok((package, report, info))
}

/// What the ATC graphs make of a model's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AtcForm {
    /// Not quantized: as they are.
    Float,
    /// `w8a8`: int8, in ATC's own quantization ops.
    Int8,
    /// Quantized weights dequantized to the graph's float type.
    Dequantized,
    /// Weight-only low-bit weights kept packed for the generated GEMV
    /// kernels (`--kernels ascendc`), dequantized where no kernel reads them.
    Kernels,
}

/// Whether the ATC graphs of a model quantized as `quant` hold int8
/// weights (`w8a8`), or float ones; `Err` with the refusal a compile gives.
pub fn atc_holds_int8(
    quant: &crate::QuantMode,
    dequantize_for_atc: bool,
) -> Result<bool, CompileError> {
    let quantized = matches!(quant, crate::QuantMode::Quantize(_));
    Ok(atc_form(quantized, quant, dequantize_for_atc, Kernels::Onnx)? == AtcForm::Int8)
}

/// How the ATC graphs hold a model's weights, or why they cannot. The 310B
/// runs `w8a8` natively; weight-only schemes need Kiln's generated kernels
/// (`--kernels ascendc`), or dequantized weights (asked for, or implied for a
/// GGUF's own blocks, which no ATC op reads).
fn atc_form(
    quantized: bool,
    quant: &crate::QuantMode,
    dequantize_for_atc: bool,
    kernels: Kernels,
) -> Result<AtcForm, CompileError> {
    use crate::passes::quantize::Scheme;
    if !quantized {
        return Ok(AtcForm::Float);
    }
    match quant {
        _ if dequantize_for_atc => Ok(AtcForm::Dequantized),
        crate::QuantMode::Quantize(q) if q.scheme == Scheme::W8A8 => Ok(AtcForm::Int8),
        crate::QuantMode::Quantize(_) if kernels == Kernels::Ascendc => Ok(AtcForm::Kernels),
        crate::QuantMode::Quantize(q) => Err(CompileError::QuantForAtc(format!(
            "--quant {}: no stock ATC operator keeps weight-only low-bit weights in device memory \
             on the Ascend 310B. Use --quant w8a8 (int8 weights and activations, which ATC runs \
             natively), add --kernels ascendc (Kiln's generated GEMV kernels read these weights), or add \
             --dequantize-for-atc (the .om files then hold fp16 weights, fp32 with --dtype fp32; the \
             reference weights and the ONNX Runtime graphs stay quantized)",
            q.scheme.name()
        ))),
        _ => Ok(AtcForm::Dequantized),
    }
}

/// The bytes of a lowered graph's weight initializers.
fn initializer_bytes(
    graph: &OnnxGraph,
    store: &WeightStore,
    float: FloatType,
) -> Result<u64, CompileError> {
    let mut bytes = 0;
    for name in &graph.weights {
        bytes += onnx::initializer_layout(name, graph.derived.get(name), store, float)?.1;
    }
    Ok(bytes)
}

fn manifest(
    ir: &ModelIr,
    graphs: Vec<GraphInfo>,
    options: &CompileOptions,
    config_sha256: String,
    weights_sha256: String,
    tokenizer: Option<String>,
    tokenizer_config: Option<String>,
) -> Manifest {
    let kv = &ir.kv_cache;
    Manifest {
        format: MANIFEST_FORMAT,
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        architecture: ir.info.architecture.clone(),
        config_sha256,
        weights_sha256,
        target: TargetInfo {
            name: options.board.map_or(options.target.name, |b| b.name).to_string(),
            soc_version: options.target.soc_version.to_string(),
        },
        dtype: options.float.name().to_string(),
        opset: options.opset,
        vocab_size: ir.info.vocab_size,
        prefill_len: ir.prefill_len,
        graph_layout: options.shape.layout,
        kv_cache: KvCacheInfo {
            layers: kv.layers,
            kv_heads: kv.kv_heads,
            max_len: kv.max_len,
            head_dim: kv.head_dim,
            layout: "k_cache and v_cache: [layers, 1, kv_heads, max_len, head_dim], one tensor each for all layers".into(),
            update: "a step of T tokens returns k_new/v_new [layers, 1, kv_heads, T, head_dim]; the host copies \
                     row t of every layer and head into slot past_len + t (real tokens only), then past_len += real tokens"
                .into(),
        },
        mask: MaskInfo {
            layout: "each mask input [1, 1, T, max_len + T] is added to the scores of the layers it lists: column \
                     j < max_len is cache slot j (position j), column max_len + c is this step's token c; 0 shows a \
                     column. A query at position p sees positions j <= p, and with a sliding_window w only those with \
                     j > p - w. attention_mask_local, when present, serves the sliding-window layers"
                .into(),
            hidden: "-inf".into(),
            // Every step graph of a model reads the same masks.
            inputs: ir.graphs[0].masks.clone(),
        },
        graphs,
        ir: IR_FILE.to_string(),
        reference_weights: REFERENCE_WEIGHTS.to_string(),
        tokenizer,
        tokenizer_config,
        generation: GenerationInfo {
            bos_token_id: ir.info.bos_token_id,
            eos_token_ids: ir.info.eos_token_ids.clone(),
        },
        quantization: None,
        memory: None,
        atc_weights: None,
        kernels: None,
        kernel_package: None,
        residual_dtype: None,
        weights_bin: None,
    }
}

/// For each weight of the ONNX Runtime graphs `ort`, where the same bytes
/// already are: in the reference weights when the initializer is the store
/// tensor unchanged, else in ATC's external data when ATC's graphs hold the
/// same initializer (same name, same derivation, same float type).
fn stored_elsewhere(
    ort: &[(String, OnnxGraph)],
    atc: &[(String, OnnxGraph)],
    atc_stored: &std::collections::HashMap<String, onnx::StoredBytes>,
    reference: &std::collections::HashMap<String, onnx::StoredBytes>,
    store: &WeightStore,
    float: FloatType,
) -> Result<std::collections::HashMap<String, onnx::StoredBytes>, CompileError> {
    let mut existing = std::collections::HashMap::new();
    for (_, graph) in ort {
        for name in &graph.weights {
            let derived = graph.derived.get(name);
            let len = onnx::initializer_layout(name, derived, store, float)?.1;
            let as_stored = derived.is_none() && onnx::stored_as_is(store, name, float);
            let same_in_atc = atc.iter().all(|(_, g)| g.derived.get(name) == derived);
            let place = match (reference.get(name), atc_stored.get(name)) {
                (Some(r), _) if as_stored => Some(r),
                (_, Some(a)) if same_in_atc => Some(a),
                _ => None,
            };
            if let Some(place) = place.filter(|p| p.len == len) {
                existing.insert(name.clone(), place.clone());
            }
        }
    }
    Ok(existing)
}

/// The recipe of `weights.bin` as `written` laid it out: each initializer
/// made from the tensors of the reference weights (`reference`) or from
/// dequantized tensors computed from them. An initializer that reads
/// anything else is stored as it is in the extra file instead: those are
/// returned, with their recipes over the compile's store, to be written there.
fn weights_bin_recipe(
    written: &onnx::Written,
    lowered: &[(String, OnnxGraph)],
    store: &WeightStore,
    reference: &[&str],
    float: FloatType,
) -> Result<(WeightsBin, Vec<(String, Recipe)>), CompileError> {
    let reference: std::collections::HashSet<&str> = reference.iter().copied().collect();
    let mut dequantized = std::collections::BTreeMap::new();
    let mut derivable = |name: &str| -> bool {
        if reference.contains(name) {
            return true;
        }
        match store.dequantized_source(name) {
            Some(t)
                if std::iter::once(&t.q)
                    .chain([&t.scale])
                    .chain(&t.min)
                    .all(|part| reference.contains(part.as_str())) =>
            {
                dequantized.insert(name.to_string(), DequantizedTensor::from(t));
                true
            }
            _ => false,
        }
    };
    let mut tensors = Vec::with_capacity(written.order.len());
    let mut extra = Vec::new();
    let mut extra_bytes = 0;
    let mut offset = 0;
    for name in &written.order {
        let derived = lowered.iter().find_map(|(_, g)| g.derived.get(name));
        let bytes = onnx::initializer_layout(name, derived, store, float)?.1;
        debug_assert_eq!(written.stored[name].offset, offset, "{name}");
        let mut recipe = onnx::recipe(derived);
        if !recipe.sources(name).into_iter().all(&mut derivable) {
            extra.push((name.clone(), recipe));
            recipe = Recipe::Stored {
                offset: extra_bytes,
            };
            extra_bytes += bytes;
        }
        tensors.push(Initializer {
            name: name.clone(),
            offset,
            bytes,
            recipe,
        });
        offset += bytes;
    }
    let recipe = WeightsBin {
        file: EXTERNAL_DATA_FILE.to_string(),
        bytes: written.weight_bytes,
        sha256: written.weights_sha256.clone(),
        stored: false,
        dequantized,
        extra_file: None,
        tensors,
    };
    Ok((recipe, extra))
}

/// Writes the initializers no recipe makes from the reference weights, back
/// to back, by the same function that makes the others.
fn write_extra(
    path: &Path,
    extra: &[(String, Recipe)],
    store: &WeightStore,
    float: FloatType,
) -> Result<(), CompileError> {
    use std::io::Write;
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut out = std::io::BufWriter::new(file);
    for (name, recipe) in extra {
        let bytes = weights_bin::initializer_bytes(store, name, recipe, float.dtype())
            .map_err(onnx::OnnxError::from)?;
        out.write_all(&bytes).map_err(io_err(path))?;
    }
    out.flush().map_err(io_err(path))
}

/// The manifest's entry for each lowered graph.
fn graph_infos(lowered: &[(String, OnnxGraph)], ir: &ModelIr) -> Vec<GraphInfo> {
    let tensors = |sig: Vec<(String, &'static str, Vec<usize>)>| {
        sig.into_iter()
            .map(|(name, dtype, shape)| TensorInfo {
                name,
                dtype: dtype.to_string(),
                shape,
            })
            .collect()
    };
    lowered
        .iter()
        .zip(ir.graphs())
        .map(|((name, onnx), graph)| GraphInfo {
            name: name.clone(),
            tokens: graph.ty(graph.inputs[0]).shape[1],
            onnx: format!("{name}.onnx"),
            ort_onnx: None,
            om: format!("{name}.om"),
            inputs: tensors(onnx.signature(false)),
            outputs: tensors(onnx.signature(true)),
        })
        .collect()
}

/// Every tensor the graphs read, as stored (so the reference interpreter
/// upcasts exactly what it would have upcast from the checkpoint), laid out
/// as `safetensors::serialize` would. Tensors read from a checkpoint are
/// copied from its file inside the kernel (`copy_file_range`: the bytes never
/// pass through this process); tensors Kiln computed are written from memory.
/// Returns where each tensor's bytes are in the file.
fn write_reference_weights(
    names: &[&str],
    store: &WeightStore,
    path: &Path,
) -> Result<std::collections::HashMap<String, onnx::StoredBytes>, CompileError> {
    use safetensors::tensor::{Metadata, TensorInfo};
    use safetensors::Dtype;
    use std::io::{Read, Seek, Write};
    let io = |source| CompileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tensors = Vec::with_capacity(names.len());
    let mut u4_names = Vec::new();
    for &name in names {
        let ty = store.tensor_type(name).map_err(FrontendError::from)?;
        let dtype = match ty.dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::I64 => Dtype::I64,
            DType::I8 => Dtype::I8,
            // safetensors has no 4-bit type: two per byte, listed in the metadata.
            DType::U4 => Dtype::U8,
        };
        let len = store.bytes(name).map_err(FrontendError::from)?.len();
        let mut shape = ty.shape.clone();
        if ty.dtype == DType::U4 {
            u4_names.push(name.to_string());
            if let Some(last) = shape.last_mut() {
                *last /= 2;
            }
        }
        if len != shape.iter().product::<usize>() * dtype.bitsize() / 8 {
            return Err(io(std::io::Error::other(format!(
                "tensor `{name}`: {len} bytes for shape {:?} of {dtype:?}",
                ty.shape
            ))));
        }
        tensors.push((name, dtype, shape, len));
    }
    // safetensors' order: by descending dtype alignment, then by name.
    tensors.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0;
    for &(name, dtype, ref shape, len) in &tensors {
        let info = TensorInfo {
            dtype,
            shape: shape.clone(),
            data_offsets: (offset, offset + len),
        };
        infos.push((name.to_string(), info));
        offset += len;
    }
    let extra = (!u4_names.is_empty()).then(|| {
        let list = serde_json::to_string(&u4_names).expect("names serialize");
        std::collections::HashMap::from([(
            kiln_runtime::weights::U4_METADATA_KEY.to_string(),
            list,
        )])
    });
    let metadata = Metadata::new(extra, infos).map_err(|e| io(std::io::Error::other(e)))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| io(e.into()))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let data_start = 8 + header.len() as u64;
    let file_name = path
        .file_name()
        .expect("a file path")
        .to_string_lossy()
        .into_owned();
    let places = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (start, end) = info.data_offsets;
            let place = onnx::StoredBytes {
                file: file_name.clone(),
                offset: data_start + start as u64,
                len: (end - start) as u64,
            };
            (name, place)
        })
        .collect();

    let sources = checkpoint_offsets(store, tensors.iter().map(|t| t.0));
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|()| out.write_all(&header))
        .map_err(io_err(path))?;
    for &(name, _, _, len) in &tensors {
        match sources.get(name) {
            Some(&(ref source, start)) => {
                out.flush().map_err(io_err(path))?;
                let mut source: &std::fs::File = source;
                source
                    .seek(std::io::SeekFrom::Start(start))
                    .map_err(io_err(&store.origin(name)))?;
                let copied = std::io::copy(&mut source.take(len as u64), out.get_mut())
                    .map_err(io_err(path))?;
                if copied != len as u64 {
                    return Err(io(std::io::Error::other(format!(
                        "{}: tensor `{name}` ends early",
                        store.origin(name).display()
                    ))));
                }
            }
            None => out
                .write_all(store.bytes(name).map_err(FrontendError::from)?)
                .map_err(io_err(path))?,
        }
    }
    out.flush().map_err(io_err(path))?;
    Ok(places)
}

/// For each named tensor the store maps from a safetensors file: that file,
/// open, and where the tensor's bytes start in it (read from the file's own
/// header). Tensors this cannot place are left out, and written from memory.
/// Like the store's mapping, this assumes nobody rewrites the checkpoint
/// while Kiln reads it.
fn checkpoint_offsets<'a>(
    store: &WeightStore,
    names: impl Iterator<Item = &'a str>,
) -> std::collections::HashMap<&'a str, (std::sync::Arc<std::fs::File>, u64)> {
    use std::io::Read;
    let mut headers: std::collections::HashMap<PathBuf, Option<_>> = Default::default();
    let mut placed = std::collections::HashMap::new();
    let files: Vec<&Path> = store.files().collect();
    for name in names {
        let origin = store.origin(name);
        if !files.contains(&origin.as_path()) {
            continue; // computed by Kiln
        }
        let header = headers.entry(origin.clone()).or_insert_with(|| {
            let mut file = std::fs::File::open(&origin).ok()?;
            let mut n = [0; 8];
            file.read_exact(&mut n).ok()?;
            // The store checked this header; a file that changed since may not be.
            let n = usize::try_from(u64::from_le_bytes(n)).ok()?;
            if n > 100 << 20 {
                return None;
            }
            let mut json = vec![0; n];
            file.read_exact(&mut json).ok()?;
            let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&json).ok()?;
            Some((std::sync::Arc::new(file), 8 + n as u64, metadata))
        });
        let Some((file, data_start, metadata)) = header else {
            continue;
        };
        let Some(info) = metadata.info(name) else {
            continue;
        };
        let (start, end) = info.data_offsets;
        let len = store.bytes(name).map(<[u8]>::len).ok();
        if len == Some(end - start) {
            placed.insert(name, (file.clone(), *data_start + start as u64));
        }
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;

    /// The reference weights are what `safetensors::serialize` makes of the
    /// tensors as stored: copied from two checkpoint files (f32, bf16, f16,
    /// sizes that leave odd offsets), or computed (added, or replacing a
    /// stored one).
    #[test]
    fn reference_weights_are_safetensors_own_serialization() {
        let tmp = tempfile::tempdir().unwrap();
        let f32s = |n: usize, k: f32| -> Vec<u8> {
            (0..n).flat_map(|i| (i as f32 * k).to_le_bytes()).collect()
        };
        let halves: Vec<u8> = (0..7u16).flat_map(|i| (i * 999).to_le_bytes()).collect();
        let (a, b, c, d) = (f32s(5, 0.5), f32s(12, -1.5), f32s(3, 2.0), halves.clone());
        let shard1 = [
            ("a", TensorView::new(Dtype::F32, vec![5], &a).unwrap()),
            ("h", TensorView::new(Dtype::F16, vec![7], &d).unwrap()),
            (
                "replaced",
                TensorView::new(Dtype::F32, vec![3], &c).unwrap(),
            ),
            ("unused", TensorView::new(Dtype::F32, vec![3], &c).unwrap()),
        ];
        let shard2 = [
            ("b", TensorView::new(Dtype::F32, vec![3, 4], &b).unwrap()),
            (
                "bf",
                TensorView::new(Dtype::BF16, vec![7], &halves).unwrap(),
            ),
        ];
        let paths = [
            tmp.path().join("1.safetensors"),
            tmp.path().join("2.safetensors"),
        ];
        std::fs::write(&paths[0], safetensors::serialize(shard1, None).unwrap()).unwrap();
        std::fs::write(&paths[1], safetensors::serialize(shard2, None).unwrap()).unwrap();
        let mut store = WeightStore::open_files(&paths).unwrap();
        store.insert_f32("computed", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        store.insert_f32("replaced", vec![3], vec![7.0, 8.0, 9.0]);

        let names = ["a", "b", "bf", "computed", "h", "replaced"];
        let path = tmp.path().join("weights.safetensors");
        let places = write_reference_weights(&names, &store, &path).unwrap();
        // Each tensor's place in the file holds its bytes (the ONNX Runtime
        // graphs read them there).
        let file = std::fs::read(&path).unwrap();
        for name in names {
            let p = &places[name];
            let at = p.offset as usize..(p.offset + p.len) as usize;
            assert!(p.file == "weights.safetensors" && file[at] == *store.bytes(name).unwrap());
        }
        let views: Vec<(&str, TensorView)> = names
            .iter()
            .map(|&name| {
                let ty = store.tensor_type(name).unwrap();
                let dtype = match ty.dtype {
                    DType::F32 => Dtype::F32,
                    DType::F16 => Dtype::F16,
                    DType::BF16 => Dtype::BF16,
                    DType::I64 => Dtype::I64,
                    DType::I8 | DType::U4 => unreachable!("only floats above"),
                };
                let view = TensorView::new(dtype, ty.shape, store.bytes(name).unwrap());
                (name, view.unwrap())
            })
            .collect();
        let expected = safetensors::serialize(views, None).unwrap();
        assert!(std::fs::read(&path).unwrap() == expected);
        assert!(checkpoint_offsets(&store, names.into_iter()).len() == 4);

        // Quantized tensors come back as they went: i8, and u4 (stored as
        // U8 with half the last axis, listed in the metadata).
        store.insert_bytes("q8", DType::I8, vec![2, 3], vec![1, 255, 3, 4, 5, 128]);
        store.insert_bytes("q4", DType::U4, vec![2, 4], vec![0x21, 0x43, 0x65, 0x87]);
        let quantized = tmp.path().join("quantized.safetensors");
        write_reference_weights(&["a", "q4", "q8"], &store, &quantized).unwrap();
        let back = WeightStore::open_files(&[quantized]).unwrap();
        for name in ["a", "q4", "q8"] {
            assert_eq!(
                back.tensor_type(name).unwrap(),
                store.tensor_type(name).unwrap()
            );
            assert_eq!(back.bytes(name).unwrap(), store.bytes(name).unwrap());
        }
    }

    /// Each initializer gets the recipe that makes it from the reference
    /// weights (a dequantized one is listed with the tensors it reads);
    /// one that reads anything else is stored as it is in the extra file,
    /// by the same function.
    #[test]
    fn initializers_no_recipe_makes_go_to_the_extra_file() {
        use kiln_runtime::ir::quant::{quantize, WeightQuant};
        let mut store = WeightStore::default();
        store.insert_f32("a", vec![2], vec![1.0, 2.0]);
        store.insert_f32("b", vec![3], vec![3.0, 4.0, 5.0]);
        let scheme = WeightQuant {
            bits: 8,
            group_size: 4,
            offset: false,
        };
        let w: Vec<f32> = (0..8).map(|i| i as f32 / 4.0 - 1.0).collect();
        let tensors = store.insert_quantized("l", quantize(&w, 2, 4, scheme).unwrap());
        store.insert_dequantized("l.weight", &tensors).unwrap();
        let order = ["a", "b", "l.weight"];
        let lens = [4u64, 6, 16];
        let mut stored = std::collections::HashMap::new();
        let mut offset = 0;
        for (name, len) in order.iter().zip(lens) {
            let place = onnx::StoredBytes {
                file: EXTERNAL_DATA_FILE.into(),
                offset,
                len,
            };
            stored.insert(name.to_string(), place);
            offset += len;
        }
        let written = onnx::Written {
            weight_bytes: offset,
            weights_sha256: "hash".into(),
            stored,
            order: order.iter().map(|n| n.to_string()).collect(),
        };
        let reference = ["a", "l.qweight", "l.scales"];
        let (recipe, extra) =
            weights_bin_recipe(&written, &[], &store, &reference, FloatType::F16).unwrap();
        let recipes: Vec<(&str, u64, &Recipe)> = recipe
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.offset, &t.recipe))
            .collect();
        assert_eq!(
            recipes,
            [
                ("a", 0, &Recipe::Tensor),
                ("b", 4, &Recipe::Stored { offset: 0 }),
                ("l.weight", 10, &Recipe::Tensor),
            ]
        );
        assert_eq!(recipe.dequantized.keys().collect::<Vec<_>>(), ["l.weight"]);
        assert_eq!(recipe.dequantized["l.weight"].q, "l.qweight");
        assert_eq!((recipe.bytes, recipe.sha256.as_str()), (26, "hash"));
        assert_eq!(extra, [("b".to_string(), Recipe::Tensor)]);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(WEIGHTS_EXTRA_FILE);
        write_extra(&path, &extra, &store, FloatType::F16).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            FloatType::F16.encode(&[3.0, 4.0, 5.0])
        );
    }
}
