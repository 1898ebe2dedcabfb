//! The ATC driver: the exact `atc` command for each graph, written to
//! `build_om.sh`, and run when ATC is installed.
//!
//! Nothing from the model's files reaches the script: graph and file names
//! are Kiln's own fixed names, shapes are numbers, and the SoC comes from the
//! table below.

use std::path::{Path, PathBuf};

/// A chip Kiln compiles for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    /// Kiln's name (`--target`).
    pub name: &'static str,
    /// ATC's `--soc_version`, as `aclrtGetSocName()` reports it on the chip.
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
        description: "Ascend 310B1, 20 TOPS (Orange Pi AI Pro 20T, Atlas 200I A2 20T modules)",
        bandwidth_gbs: (25.6, 51.2),
    },
    Target {
        name: "ascend310b4",
        soc_version: "Ascend310B4",
        description: "Ascend 310B4, 8 TOPS (Orange Pi AI Pro 8T, Atlas 200I DK A2)",
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

/// A board, by the name its users know, and its chip. From public sources:
/// Huawei's npu-smi reference for the Atlas 200I A2 family (310B1 is the
/// 20 TOPS chip, 310B4 the 8 TOPS one), llama.cpp issue #11978 (an Orange Pi
/// AI Pro 20T auto-detected as Ascend310B1), `npu-smi` tables published by
/// 8T owners (310B4), the Atlas 200I DK A2 spec page (8 TOPS). A DK A2 takes
/// swappable modules, so `build_om.sh --soc auto` on the board is the final
/// word, and `kiln-run` checks the chip before loading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Board {
    pub name: &'static str,
    /// Kiln's chip name ([`Target::name`]).
    pub chip: &'static str,
    pub description: &'static str,
}

pub const BOARDS: &[Board] = &[
    Board {
        name: "orangepi-aipro-8t",
        chip: "ascend310b4",
        description: "Orange Pi AI Pro 8T (8 or 16 GB)",
    },
    Board {
        name: "orangepi-aipro-20t",
        chip: "ascend310b1",
        description: "Orange Pi AI Pro 20T (12 or 24 GB)",
    },
    Board {
        name: "atlas-200i-dk-a2",
        chip: "ascend310b4",
        description: "Atlas 200I DK A2 (its stock 8 TOPS module)",
    },
];

pub const DEFAULT_TARGET: &str = "ascend310b1";

#[derive(Debug, thiserror::Error)]
pub enum AtcError {
    #[error("unknown target `{name}`; boards: {boards}; chips: {chips}", boards = known_boards(), chips = known_chips())]
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

fn known_chips() -> String {
    TARGETS
        .iter()
        .map(|t| t.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn known_boards() -> String {
    BOARDS.iter().map(|b| b.name).collect::<Vec<_>>().join(", ")
}

/// Every accepted `--target`, boards first, with what each is.
pub fn known_targets() -> String {
    let boards = BOARDS.iter().map(|b| {
        let chip = TARGETS
            .iter()
            .find(|t| t.name == b.chip)
            .expect("boards name known chips");
        format!("{} ({}: {})", b.name, b.description, chip.soc_version)
    });
    let chips = TARGETS
        .iter()
        .map(|t| format!("{} ({})", t.name, t.description));
    boards.chain(chips).collect::<Vec<_>>().join(", ")
}

/// A board or chip name → the chip, and the board when one was named.
pub fn resolve_target(name: &str) -> Result<(&'static Target, Option<&'static Board>), AtcError> {
    let lower = name.to_ascii_lowercase();
    let board = BOARDS.iter().find(|b| b.name == lower);
    let chip = board.map_or(lower.as_str(), |b| b.chip);
    TARGETS
        .iter()
        .find(|t| t.name == chip)
        .map(|t| (t, board))
        .ok_or_else(|| AtcError::UnknownTarget {
            name: name.to_string(),
        })
}

/// The chip a board or chip name stands for.
pub fn target(name: &str) -> Result<&'static Target, AtcError> {
    resolve_target(name).map(|(t, _)| t)
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

    /// The atc arguments, in order, but for `--output`, `--soc_version`
    /// and `--external_weight`, which build_om.sh adds.
    pub fn args(&self, precision_mode: &str) -> Vec<String> {
        vec![
            "--framework=5".into(),
            format!("--model={}", self.onnx),
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

/// The `build_om.sh` script: converts every graph with atc into the
/// directory the script is in, with external weights, logging each to
/// `atc-<graph>.log` (see `build_om.sh` beside this file for the rest).
/// `weights_bin` is the graphs' external data file and its size, made
/// first when it is missing.
pub fn script(
    jobs: &[AtcJob],
    target: &Target,
    precision_mode: &str,
    weights_bin: Option<(&str, u64)>,
) -> String {
    let mut conversions = String::new();
    for job in jobs {
        let args = job.args(precision_mode);
        for arg in args.iter().chain([&job.graph, &job.om_base]) {
            assert!(shell_safe(arg), "unsafe text in an atc argument: {arg:?}");
        }
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        conversions.push_str(&format!(
            "convert '{}' '{}' {}\n",
            job.graph,
            job.om_base,
            quoted.join(" ")
        ));
    }
    let graphs: Vec<String> = jobs.iter().map(|j| format!("'{}'", j.graph)).collect();
    assert!(shell_safe(target.soc_version));
    let (file, bytes) = weights_bin.unwrap_or(("", 0));
    assert!(file.is_empty() || shell_safe(file));
    include_str!("build_om.sh")
        .replace("@WEIGHTS_BIN@", &format!("'{file}'"))
        .replace("@WEIGHTS_BIN_BYTES@", &bytes.to_string())
        .replace("@VENDOR@", crate::backend::ascendc::VENDOR)
        .replace("@COMPILED_SOC@", target.soc_version)
        .replace("@GRAPHS@", &graphs.join(" "))
        .replace("@CONVERSIONS@\n", &conversions)
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
            err.contains("unknown target `ascend999`")
                && err.contains("ascend310b4")
                && err.contains("orangepi-aipro-8t"),
            "{err}"
        );
        let (chip, board) = resolve_target("OrangePi-AIpro-8T").unwrap();
        assert_eq!(
            (chip.soc_version, board.unwrap().name),
            ("Ascend310B4", "orangepi-aipro-8t")
        );
        assert_eq!(
            target("orangepi-aipro-20t").unwrap().soc_version,
            "Ascend310B1"
        );
        assert!(resolve_target("ascend310b1").unwrap().1.is_none());
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
            Some(("weights.bin", 1234)),
        );
        assert!(
            script.contains("'--input_shape=input_ids:1,1;k_cache:2,1,2,16,8'"),
            "{script}"
        );
        assert!(script.contains("compiled_soc=Ascend310B1\n"), "{script}");
        assert!(
            script.contains("weights_bin='weights.bin'\nweights_bin_bytes=1234\n"),
            "{script}"
        );
        assert!(
            script.contains("convert 'decode' 'decode' '--framework=5'"),
            "{script}"
        );
        assert!(
            !script.contains("@COMPILED_SOC@")
                && !script.contains("@GRAPHS@")
                && !script.contains("@CONVERSIONS@")
                && !script.contains("@WEIGHTS_BIN"),
            "{script}"
        );
    }
}
