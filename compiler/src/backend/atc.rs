//! The ATC driver: the exact `atc` command for each graph, written to
//! `build_om.sh`, and run when ATC is installed.
//!
//! Nothing from the model's files reaches the script: graph and file names
//! are Kiln's own fixed names, shapes are numbers, and the SoC comes from the
//! table below.

use std::path::{Path, PathBuf};

/// A device Kiln compiles for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    /// Kiln's name (`--target`).
    pub name: &'static str,
    /// ATC's `--soc_version`.
    pub soc_version: &'static str,
    /// What it is.
    pub description: &'static str,
    /// Memory bandwidth range in GB/s, for the decode speed bound.
    pub bandwidth_gbs: (f64, f64),
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "ascend310b1",
        soc_version: "Ascend310B1",
        description: "Ascend 310B1 (Orange Pi AI Pro, Atlas 200I DK A2)",
        bandwidth_gbs: (25.6, 51.2),
    },
    Target {
        name: "ascend310b4",
        soc_version: "Ascend310B4",
        description: "Ascend 310B4 (Orange Pi AI Pro 20T variants)",
        bandwidth_gbs: (25.6, 51.2),
    },
    Target {
        name: "ascend310p3",
        soc_version: "Ascend310P3",
        description: "Ascend 310P3 (Atlas 300I inference cards)",
        bandwidth_gbs: (204.8, 204.8),
    },
    Target {
        name: "ascend910b1",
        soc_version: "Ascend910B1",
        description: "Ascend 910B1",
        bandwidth_gbs: (1600.0, 1600.0),
    },
    Target {
        name: "ascend910b2",
        soc_version: "Ascend910B2",
        description: "Ascend 910B2",
        bandwidth_gbs: (1600.0, 1600.0),
    },
    Target {
        name: "ascend910b3",
        soc_version: "Ascend910B3",
        description: "Ascend 910B3",
        bandwidth_gbs: (1600.0, 1600.0),
    },
    Target {
        name: "ascend910b4",
        soc_version: "Ascend910B4",
        description: "Ascend 910B4",
        bandwidth_gbs: (800.0, 800.0),
    },
];

pub const DEFAULT_TARGET: &str = "ascend310b1";

#[derive(Debug, thiserror::Error)]
pub enum AtcError {
    #[error("unknown target `{name}`; known targets: {known}", known = known_targets())]
    UnknownTarget { name: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("atc failed on {graph} (exit {code:?}); see {log}")]
    Failed {
        graph: String,
        code: Option<i32>,
        log: PathBuf,
    },
}

pub fn known_targets() -> String {
    TARGETS
        .iter()
        .map(|t| t.name)
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn target(name: &str) -> Result<&'static Target, AtcError> {
    let lower = name.to_ascii_lowercase();
    TARGETS
        .iter()
        .find(|t| t.name == lower)
        .ok_or_else(|| AtcError::UnknownTarget {
            name: name.to_string(),
        })
}

/// One graph to convert: its ONNX file (relative to the output directory),
/// the .om base name, and its inputs' static shapes.
pub struct AtcJob {
    pub graph: String,
    pub onnx: String,
    pub om_base: String,
    pub inputs: Vec<(String, Vec<usize>)>,
}

impl AtcJob {
    /// `name:d0,d1;name:d0,…` in the inputs' order.
    pub fn input_shape(&self) -> String {
        self.inputs
            .iter()
            .map(|(name, dims)| {
                let dims: Vec<String> = dims.iter().map(usize::to_string).collect();
                format!("{name}:{}", dims.join(","))
            })
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The atc arguments, in order.
    pub fn args(&self, target: &Target, precision_mode: &str) -> Vec<String> {
        vec![
            "--framework=5".into(),
            format!("--model={}", self.onnx),
            format!("--output={}", self.om_base),
            format!("--soc_version={}", target.soc_version),
            "--input_format=ND".into(),
            format!("--input_shape={}", self.input_shape()),
            format!("--precision_mode={precision_mode}"),
        ]
    }
}

/// Checks that a name is safe to place in a shell script unquoted.
fn shell_safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.,:;=/".contains(c))
}

/// The `build_om.sh` script: converts every graph with atc, from the
/// directory the script is in, logging each to `atc-<graph>.log`.
pub fn script(jobs: &[AtcJob], target: &Target, precision_mode: &str) -> String {
    let mut s = String::from(
        "#!/usr/bin/env bash\n\
         # Converts Kiln's ONNX graphs into .om models with Huawei's ATC (CANN).\n\
         # Written by `kiln compile`; run it on a machine with CANN installed.\n\
         set -euo pipefail\n\
         cd \"$(dirname \"$0\")\"\n\
         if ! command -v atc >/dev/null 2>&1; then\n\
         \x20   for env in \"${ASCEND_HOME_PATH:-}/../set_env.sh\" \"${ASCEND_TOOLKIT_HOME:-}/../set_env.sh\" \\\n\
         \x20              /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/cann/set_env.sh; do\n\
         \x20       if [ -f \"$env\" ]; then . \"$env\"; break; fi\n\
         \x20   done\n\
         fi\n\
         command -v atc >/dev/null 2>&1 || { echo \"atc not found: install CANN and source its set_env.sh\" >&2; exit 127; }\n",
    );
    for job in jobs {
        let args = job.args(target, precision_mode);
        for arg in &args {
            assert!(shell_safe(arg), "unsafe text in an atc argument: {arg:?}");
        }
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        s.push_str(&format!(
            "echo \"atc: {graph} ({onnx} -> {om}.om), log in atc-{graph}.log\"\n\
             atc {args} > 'atc-{graph}.log' 2>&1 || {{ echo \"atc failed on {graph}; see atc-{graph}.log\" >&2; tail -n 20 'atc-{graph}.log' >&2; exit 1; }}\n",
            graph = job.graph,
            onnx = job.onnx,
            om = job.om_base,
            args = quoted.join(" "),
        ));
    }
    s.push_str("echo \"done: .om models written\"\n");
    s
}

/// Finds `atc`: on PATH, then under the CANN environment variables and the
/// default install locations.
pub fn find_atc() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("atc")));
    }
    for var in ["ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"] {
        if let Some(home) = std::env::var_os(var) {
            candidates.push(Path::new(&home).join("bin/atc"));
        }
    }
    candidates.push("/usr/local/Ascend/ascend-toolkit/latest/bin/atc".into());
    candidates.push("/usr/local/Ascend/cann/bin/atc".into());
    candidates.into_iter().find(|p| p.is_file())
}

/// Runs `build_om.sh` in `dir`, reporting each graph as it starts.
pub fn run_script(dir: &Path, atc: &Path, mut progress: impl FnMut(&str)) -> Result<(), AtcError> {
    let script = dir.join("build_om.sh");
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(bin) = atc.parent() {
        let mut dirs = vec![bin.to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        path = std::env::join_paths(dirs).unwrap_or(path);
    }
    let mut child = std::process::Command::new("bash")
        .arg(&script)
        .env("PATH", path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| AtcError::Io {
            path: script.clone(),
            source,
        })?;
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            progress(&line);
        }
    }
    let status = child.wait().map_err(|source| AtcError::Io {
        path: script.clone(),
        source,
    })?;
    if !status.success() {
        return Err(AtcError::Failed {
            graph: "the model".into(),
            code: status.code(),
            log: dir.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_map_to_soc_versions() {
        assert_eq!(target("ascend310b1").unwrap().soc_version, "Ascend310B1");
        assert_eq!(target("Ascend910B4").unwrap().soc_version, "Ascend910B4");
        let err = target("ascend999").unwrap_err().to_string();
        assert!(
            err.contains("unknown target `ascend999`") && err.contains("ascend310b4"),
            "{err}"
        );
    }

    #[test]
    fn shape_strings_follow_the_inputs() {
        let job = AtcJob {
            graph: "decode".into(),
            onnx: "decode.onnx".into(),
            om_base: "decode".into(),
            inputs: vec![
                ("input_ids".into(), vec![1, 1]),
                ("k_cache".into(), vec![2, 1, 2, 16, 8]),
            ],
        };
        assert_eq!(job.input_shape(), "input_ids:1,1;k_cache:2,1,2,16,8");
        let script = script(
            &[job],
            target("ascend310b1").unwrap(),
            "must_keep_origin_dtype",
        );
        assert!(
            script.contains("'--input_shape=input_ids:1,1;k_cache:2,1,2,16,8'"),
            "{script}"
        );
        assert!(script.contains("'--soc_version=Ascend310B1'"));
    }
}
