//! The templates, embedded so the binary works from anywhere, and the
//! package they render into.
//!
//! Only generated identifiers (from [`KernelKind`]) and numbers reach the
//! templates; autoescaping is off because the output is C++, not HTML.

use super::{write, AscendcError, KernelKind, Package, ONNX_DOMAIN, ONNX_DOMAIN_VERSION};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

macro_rules! templates {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../../../templates/", $name))),)*]
    };
}

const TEMPLATES: &[(&str, &str)] = templates!(
    "common/kernel_header.tera",
    "common/kernel_helpers.tera",
    "common/kernel_entry.tera",
    "common/op_host.cpp.tera",
    "common/op_host_tiling.h.tera",
    "common/onnx_plugin.cc.tera",
    "project/CMakePresets.json.tera",
    "project/build.sh.tera",
    "rms_norm/op_kernel.cpp.tera",
    "rms_norm/op_host.cpp.tera",
    "rms_norm/op_host_tiling.h.tera",
    "rms_norm/onnx_plugin.cc.tera",
    "swiglu/op_kernel.cpp.tera",
    "swiglu/op_host.cpp.tera",
    "swiglu/op_host_tiling.h.tera",
    "swiglu/onnx_plugin.cc.tera",
    "rope/op_kernel.cpp.tera",
    "rope/op_host.cpp.tera",
    "rope/op_host_tiling.h.tera",
    "rope/onnx_plugin.cc.tera",
    "gemv/op_kernel.cpp.tera",
    "gemv/op_host.cpp.tera",
    "gemv/op_host_tiling.h.tera",
    "gemv/onnx_plugin.cc.tera",
    "emulation/harness.cpp.tera",
);

/// The CPU emulation's headers, as (path, text): written next to a package
/// to compile its kernels with a host compiler.
pub fn emulation_files() -> [(&'static str, &'static str); 2] {
    [
        (
            "kernel_operator.h",
            include_str!("../../../../templates/emulation/kernel_operator.h"),
        ),
        (
            "register/tilingdata_base.h",
            include_str!("../../../../templates/emulation/register/tilingdata_base.h"),
        ),
    ]
}

/// Stand-ins for the CANN host headers the op_host and plugin files include,
/// as (path, text): for a syntax and type check of those files with a host
/// compiler (they are no CANN, and passing them proves no more than that).
pub fn host_stub_files() -> [(&'static str, &'static str); 3] {
    [
        (
            "host/register/op_def_registry.h",
            include_str!("../../../../templates/emulation/host/register/op_def_registry.h"),
        ),
        (
            "host/register/register.h",
            include_str!("../../../../templates/emulation/host/register/register.h"),
        ),
        (
            "host/graph/operator.h",
            include_str!("../../../../templates/emulation/host/graph/operator.h"),
        ),
    ]
}

fn engine() -> Result<tera::Tera, AscendcError> {
    let mut tera = tera::Tera::default();
    tera.autoescape_on(vec![]);
    tera.add_raw_templates(TEMPLATES.iter().copied())
        .map_err(|e| render_error("templates", e))?;
    Ok(tera)
}

fn render_error(template: &str, e: tera::Error) -> AscendcError {
    // tera nests the cause; the innermost message says what went wrong.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    AscendcError::Render {
        template: template.to_string(),
        message,
    }
}

fn render(tera: &tera::Tera, name: &str, context: &impl Serialize) -> Result<String, AscendcError> {
    let context = tera::Context::from_serialize(context).map_err(|e| render_error(name, e))?;
    tera.render(name, &context)
        .map_err(|e| render_error(name, e))
}

#[derive(Serialize)]
struct FieldValue {
    name: &'static str,
    literal: String,
}

#[derive(Serialize)]
struct InstanceContext {
    key: [usize; 3],
    block_dim: u32,
    fields: Vec<FieldValue>,
}

#[derive(Serialize)]
struct FieldDecl {
    name: &'static str,
    c_type: &'static str,
}

/// Everything one op's templates see.
#[derive(Serialize)]
struct KindContext {
    op_type: &'static str,
    kernel: String,
    template_dir: &'static str,
    guard: String,
    target: &'static str,
    soc_version: &'static str,
    aiv_only: bool,
    residual: bool,
    weights: &'static str,
    has_min: bool,
    inputs: &'static [super::Arg],
    outputs: &'static [super::Arg],
    fields: Vec<FieldDecl>,
    instances: Vec<InstanceContext>,
    domain: &'static str,
    domain_version: i64,
}

fn kind_context(package: &Package, kind: KernelKind) -> KindContext {
    let instances: Vec<_> = package
        .kernels
        .iter()
        .filter(|k| k.op.kind() == kind)
        .collect();
    let fields = instances[0]
        .tiling
        .fields()
        .into_iter()
        .map(|f| FieldDecl {
            name: f.name,
            c_type: f.c_type,
        })
        .collect();
    let weights = match kind {
        KernelKind::GemvHalf => "half",
        KernelKind::GemvInt8 => "int8",
        KernelKind::GemvInt4 | KernelKind::GemvInt4Min => "int4",
        _ => "",
    };
    KindContext {
        op_type: kind.op_type(),
        kernel: kind.kernel_name(),
        template_dir: kind.template_dir(),
        guard: format!("{}_TILING_H", kind.kernel_name().to_ascii_uppercase()),
        target: package.target.compute_unit(),
        soc_version: package.target.soc_version(),
        aiv_only: package.target.aiv_only(),
        residual: kind == KernelKind::AddRmsNorm,
        weights,
        has_min: kind == KernelKind::GemvInt4Min,
        inputs: kind.inputs(),
        outputs: kind.outputs(),
        fields,
        instances: instances
            .iter()
            .map(|k| InstanceContext {
                key: k.op.shape_key(),
                block_dim: k.block_dim,
                fields: k
                    .tiling
                    .fields()
                    .into_iter()
                    .map(|f| FieldValue {
                        name: f.name,
                        literal: f.literal,
                    })
                    .collect(),
            })
            .collect(),
        domain: ONNX_DOMAIN,
        domain_version: ONNX_DOMAIN_VERSION,
    }
}

/// The kinds a package holds, in a stable order.
pub(super) fn kinds(package: &Package) -> Vec<KernelKind> {
    let mut kinds: Vec<_> = package.kernels.iter().map(|k| k.op.kind()).collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

/// The msopgen op description (`msopgen gen -i`): each op's arguments.
fn op_json(kinds: &[KernelKind]) -> serde_json::Value {
    let desc = |args: &[super::Arg]| -> Vec<serde_json::Value> {
        args.iter()
            .map(|a| {
                let ty = match a.dtype {
                    "DT_INT8" => "int8",
                    "DT_UINT8" => "uint8",
                    _ => "fp16",
                };
                serde_json::json!({
                    "name": a.name,
                    "param_type": "required",
                    "format": ["ND"],
                    "type": [ty],
                })
            })
            .collect()
    };
    serde_json::Value::Array(
        kinds
            .iter()
            .map(|k| {
                serde_json::json!({
                    "op": k.op_type(),
                    "language": "cpp",
                    "input_desc": desc(k.inputs()),
                    "output_desc": desc(k.outputs()),
                })
            })
            .collect(),
    )
}

/// Writes the package's files under `dir`.
pub(super) fn write_package(dir: &Path, package: &Package) -> Result<(), AscendcError> {
    let tera = engine()?;
    for kind in kinds(package) {
        let cx = kind_context(package, kind);
        let stem = kind.kernel_name();
        let folder = kind.template_dir();
        let files = [
            ("op_kernel.cpp.tera", format!("op_kernel/{stem}.cpp")),
            ("op_host.cpp.tera", format!("op_host/{stem}.cpp")),
            ("op_host_tiling.h.tera", format!("op_host/{stem}_tiling.h")),
            (
                "onnx_plugin.cc.tera",
                format!("framework/onnx_plugin/{stem}_plugin.cc"),
            ),
        ];
        for (template, path) in files {
            let text = render(&tera, &format!("{folder}/{template}"), &cx)?;
            write(&dir.join(path), &text)?;
        }
    }
    let project = BTreeMap::from([
        ("target", package.target.compute_unit()),
        ("soc_version", package.target.soc_version()),
        ("vendor", package.vendor.as_str()),
    ]);
    write(
        &dir.join("CMakePresets.json"),
        &render(&tera, "project/CMakePresets.json.tera", &project)?,
    )?;
    let build = dir.join("build.sh");
    write(&build, &render(&tera, "project/build.sh.tera", &project)?)?;
    make_executable(&build)?;
    let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("JSON values print");
    write(&dir.join("op.json"), &json(&op_json(&kinds(package))))?;
    write(
        &dir.join("kernels.json"),
        &json(&serde_json::to_value(package).expect("the manifest serializes")),
    )?;
    Ok(())
}

#[cfg(unix)]
fn make_executable(path: &Path) -> Result<(), AscendcError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|source| {
        AscendcError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(not(unix))]
fn make_executable(_: &Path) -> Result<(), AscendcError> {
    Ok(())
}

#[derive(Serialize)]
struct HarnessKernel {
    op_type: &'static str,
    kernel: String,
    inputs: usize,
    outputs: usize,
    args: usize,
}

/// The emulation harness over `kinds` (their index in the slice is the
/// kernel index a case names).
pub fn harness_source(target: super::Target, kinds: &[KernelKind]) -> Result<String, AscendcError> {
    #[derive(Serialize)]
    struct Cx {
        target: &'static str,
        is_310b: bool,
        kernels: Vec<HarnessKernel>,
    }
    let cx = Cx {
        target: target.compute_unit(),
        is_310b: target == super::Target::Ascend310b,
        kernels: kinds
            .iter()
            .map(|k| HarnessKernel {
                op_type: k.op_type(),
                kernel: k.kernel_name(),
                inputs: k.inputs().len(),
                outputs: k.outputs().len(),
                args: k.inputs().len() + k.outputs().len(),
            })
            .collect(),
    };
    render(&engine()?, "emulation/harness.cpp.tera", &cx)
}
