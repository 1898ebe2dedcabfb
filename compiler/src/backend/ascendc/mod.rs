//! Ascend C kernels for Kiln's fused ops and the decode GEMV, generated from
//! the tera templates under the top-level `templates/` into an msopgen-style
//! custom-op package (op_kernel, op_host tiling/OpDef/InferShape, the ONNX
//! framework plugin, CMakePresets.json and build.sh).
//!
//! The kernel source is what a CANN machine compiles, but it has only run on
//! the CPU, against the project's emulation header
//! (`templates/emulation/kernel_operator.h`), never on an Ascend core.
//!
//! Shapes are static: Rust plans each kernel instance's tiling
//! ([`tiling`]), the host's TilingFunc picks the instance by its input
//! shapes and copies the planned fields, and the manifest (`kernels.json`)
//! records every instance's tiling and the GM bytes a call reads.
//!
//! Nothing from a model file reaches the generated C++ or shell: op types,
//! kernel names and identifiers come from the fixed set in [`KernelKind`],
//! and only numbers from shapes are rendered. A request's `source` (the IR
//! node it was made for) is written to the JSON manifest alone.

pub mod plan;
mod render;
pub mod target;
pub mod tiling;

#[cfg(test)]
mod decode_tests;
#[cfg(test)]
mod emulation_tests;

pub use plan::{plan_kernels, KernelPlan};
pub use render::{emulation_files, harness_source, host_stub_files};
pub use target::Target;
pub use tiling::{GemvTiling, GemvWeights, RmsNormTiling, RopeTiling, SwiGluTiling};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AscendcError {
    #[error("no Ascend C kernel for this: {0}")]
    Unsupported(String),
    #[error("rendering {template}: {message}")]
    Render { template: String, message: String },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The Ascend C op types Kiln generates: each has one op_kernel, op_host
/// and plugin file in a package, serving every instance (shape) of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum KernelKind {
    RmsNorm,
    /// Residual `Add` then RMSNorm: outputs the normalized row and the sum.
    AddRmsNorm,
    SwiGlu,
    Rope,
    /// Decode GEMV over fp16 weights.
    GemvHalf,
    /// Decode GEMV over int8 weights with a scale per output channel (`w8a16`).
    GemvInt8,
    /// Decode GEMV over int4 weights in groups along K, centred on 8 (`w4a16`).
    GemvInt4,
    /// `w4a16` with a min per group (`--asymmetric`).
    GemvInt4Min,
}

/// One kernel argument: its OpDef name and ge dtype.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Arg {
    pub name: &'static str,
    pub dtype: &'static str,
}

const fn arg(name: &'static str, dtype: &'static str) -> Arg {
    Arg { name, dtype }
}

const FP16: &str = "DT_FLOAT16";

impl KernelKind {
    pub const ALL: [KernelKind; 8] = [
        KernelKind::RmsNorm,
        KernelKind::AddRmsNorm,
        KernelKind::SwiGlu,
        KernelKind::Rope,
        KernelKind::GemvHalf,
        KernelKind::GemvInt8,
        KernelKind::GemvInt4,
        KernelKind::GemvInt4Min,
    ];

    /// The OpType: the ONNX node type in Kiln's custom domain too. Digit-free,
    /// so msopgen's CamelCase → snake_case kernel name is unambiguous.
    pub fn op_type(self) -> &'static str {
        match self {
            KernelKind::RmsNorm => "KilnRmsNorm",
            KernelKind::AddRmsNorm => "KilnAddRmsNorm",
            KernelKind::SwiGlu => "KilnSwiGlu",
            KernelKind::Rope => "KilnRope",
            KernelKind::GemvHalf => "KilnGemvHalf",
            KernelKind::GemvInt8 => "KilnGemvByte",
            KernelKind::GemvInt4 => "KilnGemvNibble",
            KernelKind::GemvInt4Min => "KilnGemvNibbleMin",
        }
    }

    /// The kernel entry point and file stem (msopgen's snake_case of the OpType).
    pub fn kernel_name(self) -> String {
        let mut out = String::new();
        for (i, c) in self.op_type().chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        }
        out
    }

    /// The folder under `templates/`.
    fn template_dir(self) -> &'static str {
        match self {
            KernelKind::RmsNorm | KernelKind::AddRmsNorm => "rms_norm",
            KernelKind::SwiGlu => "swiglu",
            KernelKind::Rope => "rope",
            _ => "gemv",
        }
    }

    pub fn inputs(self) -> &'static [Arg] {
        const RMS: &[Arg] = &[arg("x", FP16), arg("gamma", FP16)];
        const ADD_RMS: &[Arg] = &[arg("x", FP16), arg("residual", FP16), arg("gamma", FP16)];
        const SWIGLU: &[Arg] = &[arg("gate", FP16), arg("up", FP16)];
        const ROPE: &[Arg] = &[arg("x", FP16), arg("cos", FP16), arg("sin", FP16)];
        const HALF: &[Arg] = &[arg("x", FP16), arg("weight", FP16)];
        const INT8: &[Arg] = &[
            arg("x", FP16),
            arg("qweight", "DT_INT8"),
            arg("scale", FP16),
        ];
        const INT4: &[Arg] = &[
            arg("x", FP16),
            arg("qweight", "DT_UINT8"),
            arg("scale", FP16),
        ];
        const INT4_MIN: &[Arg] = &[
            arg("x", FP16),
            arg("qweight", "DT_UINT8"),
            arg("scale", FP16),
            arg("min", FP16),
        ];
        match self {
            KernelKind::RmsNorm => RMS,
            KernelKind::AddRmsNorm => ADD_RMS,
            KernelKind::SwiGlu => SWIGLU,
            KernelKind::Rope => ROPE,
            KernelKind::GemvHalf => HALF,
            KernelKind::GemvInt8 => INT8,
            KernelKind::GemvInt4 => INT4,
            KernelKind::GemvInt4Min => INT4_MIN,
        }
    }

    pub fn outputs(self) -> &'static [Arg] {
        const Y: &[Arg] = &[arg("y", FP16)];
        const Y_AND_SUM: &[Arg] = &[arg("y", FP16), arg("sum", FP16)];
        match self {
            KernelKind::AddRmsNorm => Y_AND_SUM,
            _ => Y,
        }
    }

    pub fn gemv_weights(self, group_size: usize) -> Option<GemvWeights> {
        match self {
            KernelKind::GemvHalf => Some(GemvWeights::Half),
            KernelKind::GemvInt8 => Some(GemvWeights::Int8),
            KernelKind::GemvInt4 | KernelKind::GemvInt4Min => Some(GemvWeights::Int4 {
                group_size,
                offset: self == KernelKind::GemvInt4Min,
            }),
            _ => None,
        }
    }
}

/// One kernel instance a package must serve: an op at static shapes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum KernelOp {
    /// RMSNorm over `rows` rows of `cols`; with `residual`, of `x + residual`.
    RmsNorm {
        rows: usize,
        cols: usize,
        eps: f32,
        residual: bool,
    },
    SwiGlu {
        len: usize,
    },
    Rope {
        batch: usize,
        heads: usize,
        tokens: usize,
        dim: usize,
    },
    /// `y [n] = W [n, k] · x [k]` (one call; see [`tiling::gemv_column_chunks`]).
    Gemv {
        k: usize,
        n: usize,
        weights: GemvWeights,
    },
}

/// A kernel instance's tiling, by op.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Tiling {
    RmsNorm(RmsNormTiling),
    SwiGlu(SwiGluTiling),
    Rope(RopeTiling),
    Gemv(GemvTiling),
}

impl Tiling {
    pub fn fields(&self) -> Vec<tiling::TilingField> {
        match self {
            Tiling::RmsNorm(t) => t.fields(),
            Tiling::SwiGlu(t) => t.fields(),
            Tiling::Rope(t) => t.fields(),
            Tiling::Gemv(t) => t.fields(),
        }
    }

    pub fn block_dim(&self) -> u32 {
        match self {
            Tiling::RmsNorm(t) => t.block_dim,
            Tiling::SwiGlu(t) => t.block_dim,
            Tiling::Rope(t) => t.block_dim,
            Tiling::Gemv(t) => t.block_dim,
        }
    }
}

impl KernelOp {
    pub fn kind(&self) -> KernelKind {
        match self {
            KernelOp::RmsNorm {
                residual: false, ..
            } => KernelKind::RmsNorm,
            KernelOp::RmsNorm { residual: true, .. } => KernelKind::AddRmsNorm,
            KernelOp::SwiGlu { .. } => KernelKind::SwiGlu,
            KernelOp::Rope { .. } => KernelKind::Rope,
            KernelOp::Gemv { weights, .. } => match weights {
                GemvWeights::Half => KernelKind::GemvHalf,
                GemvWeights::Int8 => KernelKind::GemvInt8,
                GemvWeights::Int4 { offset: false, .. } => KernelKind::GemvInt4,
                GemvWeights::Int4 { offset: true, .. } => KernelKind::GemvInt4Min,
            },
        }
    }

    pub fn tiling(&self, target: Target) -> Result<Tiling, AscendcError> {
        Ok(match *self {
            KernelOp::RmsNorm {
                rows,
                cols,
                eps,
                residual,
            } => Tiling::RmsNorm(RmsNormTiling::plan(rows, cols, eps, residual, target)?),
            KernelOp::SwiGlu { len } => Tiling::SwiGlu(SwiGluTiling::plan(len, target)?),
            KernelOp::Rope {
                batch,
                heads,
                tokens,
                dim,
            } => Tiling::Rope(RopeTiling::plan(batch, heads, tokens, dim, target)?),
            KernelOp::Gemv { k, n, weights } => {
                Tiling::Gemv(GemvTiling::plan(k, n, weights, target)?)
            }
        })
    }

    /// GM bytes one call reads under `tiling` (what the decode bytes per
    /// token add up from).
    pub fn bytes_read(&self, tiling: &Tiling) -> u64 {
        match (self, tiling) {
            (KernelOp::RmsNorm { residual, .. }, Tiling::RmsNorm(t)) => t.bytes_read(*residual),
            (KernelOp::SwiGlu { .. }, Tiling::SwiGlu(t)) => t.bytes_read(),
            (KernelOp::Rope { .. }, Tiling::Rope(t)) => t.bytes_read(),
            (KernelOp::Gemv { weights, .. }, Tiling::Gemv(t)) => t.bytes_read(*weights),
            _ => unreachable!("a tiling is planned for its own op"),
        }
    }

    /// What the host's TilingFunc matches an instance by: the element counts
    /// of inputs 0 and 1 and the last dimension of input 0.
    fn shape_key(&self) -> [usize; 3] {
        match *self {
            // Input 1 is gamma, or with the residual Add the residual itself.
            KernelOp::RmsNorm {
                rows,
                cols,
                residual,
                ..
            } => [rows * cols, cols, if residual { rows * cols } else { cols }],
            KernelOp::SwiGlu { len } => [len, 0, len],
            KernelOp::Rope {
                batch,
                heads,
                tokens,
                dim,
            } => [batch * heads * tokens * dim, dim, batch * tokens * dim],
            KernelOp::Gemv { k, n, weights } => {
                let elem = if weights == GemvWeights::Half { 2 } else { 1 };
                [k, k, n * weights.row_bytes(k) / elem]
            }
        }
    }
}

/// A kernel instance to generate, with the IR node it serves (manifest only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelRequest {
    pub op: KernelOp,
    pub source: String,
}

/// One instance as packaged: what `kernels.json` lists.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackagedKernel {
    pub op_type: String,
    pub kernel: String,
    pub op: KernelOp,
    pub tiling: Tiling,
    pub block_dim: u32,
    pub bytes_read: u64,
    pub source: String,
}

/// A generated package: its directory and instances.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Package {
    pub target: Target,
    pub vendor: String,
    pub kernels: Vec<PackagedKernel>,
}

/// The vendor name the package installs under (`vendors/<name>`).
pub const VENDOR: &str = "kiln";

/// The ONNX domain of Kiln's custom nodes and its opset version.
pub const ONNX_DOMAIN: &str = "ai.kiln";
pub const ONNX_DOMAIN_VERSION: i64 = 1;

/// Plans every request's tiling and writes the package into `dir`.
pub fn generate_package(
    dir: &Path,
    target: Target,
    requests: &[KernelRequest],
) -> Result<Package, AscendcError> {
    let mut kernels = Vec::with_capacity(requests.len());
    for r in requests {
        let tiling = r.op.tiling(target)?;
        let kind = r.op.kind();
        kernels.push(PackagedKernel {
            op_type: kind.op_type().to_string(),
            kernel: kind.kernel_name(),
            block_dim: tiling.block_dim(),
            bytes_read: r.op.bytes_read(&tiling),
            op: r.op.clone(),
            tiling,
            source: r.source.clone(),
        });
    }
    let package = Package {
        target,
        vendor: VENDOR.to_string(),
        kernels,
    };
    render::write_package(dir, &package)?;
    Ok(package)
}

fn write(path: &Path, text: &str) -> Result<(), AscendcError> {
    let io = |source| AscendcError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, text).map_err(io)
}
