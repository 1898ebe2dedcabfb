//! `kiln bundle`: one tar archive holding what a board needs from a compiled
//! directory — the ATC graphs and their weights with `build_om.sh`, the
//! manifest, tokenizer files, the IR and reference weights (for `--backend
//! cpu` and `diff`), `kernels/` when there is one, any .om files already
//! built — plus an aarch64 `kiln-run` when one is given or found, and a
//! `README.txt` with the commands to run there. Left out: what serves ONNX
//! Runtime on the build machine (`*.ort.onnx`, `ort_run.py`), and
//! `weights.bin` unless `kiln compile --store-atc-weights` stored it: its
//! recipe is in the manifest, and build_om.sh has `kiln-run expand-weights`
//! make it on the board.
//!
//! The archive is written to a temporary file beside the target and renamed
//! at the end. Names read from the manifest become archive paths only when
//! they are plain relative paths inside the directory.

use crate::compile::{BUILD_SCRIPT, EXTERNAL_DATA_FILE};
use crate::output::StagedFile;
use kiln_runtime::compiled::external_weights::{list_file, WEIGHT_DIR};
use kiln_runtime::compiled::manifest::{Manifest, ManifestError, MANIFEST_FILE};
use kiln_runtime::engine::npu::OM_SOC_FILE;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

pub const README_FILE: &str = "README.txt";
pub const KILN_RUN: &str = "kiln-run";
/// The boards' Rust target.
pub const CROSS_TARGET: &str = "aarch64-unknown-linux-gnu";

/// Side files of a compiled directory that `kiln-run` reads when present.
const OPTIONAL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    kiln_runtime::generate::chat::TEMPLATE_FILE,
    OM_SOC_FILE,
];

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "{manifest}: `{name}` is not a plain relative path inside the directory (no absolute \
         paths, no `..`); this manifest was not written by kiln compile: recompile the model"
    )]
    BadName { manifest: PathBuf, name: String },
    #[error("{path} is missing ({why}): the directory is incomplete; run kiln compile again")]
    MissingFile { path: PathBuf, why: String },
    #[error("{0} is a directory: give the archive's file name, e.g. {0}/model.tar")]
    OutputIsDir(PathBuf),
    #[error(
        "{0} is not an aarch64 Linux executable: build kiln-run for the board with \
         `cargo build --release -p kiln-runtime --bin kiln-run --target {CROSS_TARGET}`"
    )]
    NotAarch64(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {out} (adding {item}): {source}")]
    Write {
        out: PathBuf,
        item: String,
        #[source]
        source: std::io::Error,
    },
}

/// One entry of the bundle: a file or a folder of the compiled directory.
#[derive(Clone, Debug)]
pub struct BoardFile {
    /// Its path inside the compiled directory (and the archive's folder).
    pub name: String,
    pub path: PathBuf,
    /// Bytes (of every file inside, for a folder).
    pub bytes: u64,
}

/// What a board needs from the compiled directory `dir`, in a fixed order.
pub fn board_files(dir: &Path) -> Result<Vec<BoardFile>, BundleError> {
    let manifest = Manifest::load(dir)?;
    let manifest_path = dir.join(MANIFEST_FILE);
    let mut names: Vec<(String, Need)> = vec![
        (MANIFEST_FILE.into(), Need::Required("the manifest")),
        (
            BUILD_SCRIPT.into(),
            Need::Required("build_om.sh converts the graphs"),
        ),
        (
            manifest.ir.clone(),
            Need::Required("the IR, for --backend cpu and diff"),
        ),
        (
            manifest.reference_weights.clone(),
            Need::Required("the reference weights, for --backend cpu and diff"),
        ),
    ];
    for name in [&manifest.tokenizer, &manifest.tokenizer_config]
        .into_iter()
        .flatten()
    {
        names.push((name.clone(), Need::Required("the manifest names it")));
    }
    if let Some(kernels) = &manifest.kernel_package {
        names.push((
            kernels.dir.clone(),
            Need::Required("the kernel package build_om.sh builds"),
        ));
    }
    for graph in &manifest.graphs {
        names.push((graph.onnx.clone(), Need::Required("a graph for ATC")));
        names.push((graph.om.clone(), Need::IfPresent));
        names.push((list_file(&graph.name), Need::IfPresent));
    }
    names.extend(
        OPTIONAL_FILES
            .iter()
            .map(|n| (n.to_string(), Need::IfPresent)),
    );
    names.push((WEIGHT_DIR.into(), Need::IfPresent));
    // weights.bin goes only when compile stored it (or, from before
    // recipes, wrote it without one): otherwise the board makes it.
    match &manifest.weights_bin {
        Some(recipe) => {
            if recipe.stored {
                names.push((
                    recipe.file.clone(),
                    Need::Required("stored by kiln compile --store-atc-weights"),
                ));
            }
            if let Some(extra) = &recipe.extra_file {
                names.push((
                    extra.clone(),
                    Need::Required("the initializers weights.bin is made with"),
                ));
            }
        }
        None => names.push((EXTERNAL_DATA_FILE.into(), Need::IfPresent)),
    }

    let mut files: Vec<BoardFile> = Vec::new();
    for (name, need) in names {
        if !is_plain_relative(&name) {
            return Err(BundleError::BadName {
                manifest: manifest_path,
                name,
            });
        }
        if files.iter().any(|f| f.name == name) {
            continue;
        }
        let path = dir.join(&name);
        if !path.exists() {
            match need {
                Need::IfPresent => continue,
                Need::Required(why) => {
                    return Err(BundleError::MissingFile {
                        path,
                        why: why.into(),
                    })
                }
            }
        }
        let bytes = tree_bytes(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        files.push(BoardFile { name, path, bytes });
    }
    Ok(files)
}

enum Need {
    Required(&'static str),
    IfPresent,
}

/// A path of normal components only: no root, no `.` or `..`, no empty
/// component, no backslash or NUL.
fn is_plain_relative(name: &str) -> bool {
    !name.contains(['\\', '\0'])
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// The bytes of a file, or of every file under a folder.
fn tree_bytes(path: &Path) -> std::io::Result<u64> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        total += tree_bytes(&entry?.path())?;
    }
    Ok(total)
}

/// Whether `path` is a 64-bit little-endian ELF for aarch64 (`e_machine`
/// 183, EM_AARCH64: https://refspecs.linuxfoundation.org/elf/gabi4+/ch4.eheader.html
/// gives the header's layout, the ARM ELF ABI the number).
pub fn is_aarch64_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut header = [0u8; 20];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header));
    read.is_ok()
        && header[..4] == *b"\x7fELF"
        && header[4] == 2
        && header[5] == 1
        && u16::from_le_bytes([header[18], header[19]]) == 183
}

/// An aarch64 `kiln-run` built beside this `kiln`: `<target>/release/kiln`
/// has `<target>/aarch64-unknown-linux-gnu/release/kiln-run`; else the
/// workspace's `target/` seen from the current directory.
pub fn find_kiln_run() -> Option<PathBuf> {
    let relative = Path::new(CROSS_TARGET).join("release").join(KILN_RUN);
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join(&relative)));
    beside_exe
        .into_iter()
        .chain([Path::new("target").join(&relative)])
        .find(|p| is_aarch64_elf(p))
}

/// What `bundle` wrote.
pub struct BundleReport {
    pub out: PathBuf,
    /// The folder the compiled directory is in, inside the archive.
    pub root: String,
    pub files: Vec<BoardFile>,
    /// The `kiln-run` packed, if any.
    pub kiln_run: Option<PathBuf>,
    pub readme: String,
    /// The archive's size.
    pub bytes: u64,
}

/// Writes `out`, a tar archive of the compiled directory `dir`'s board files
/// under `<dir name>/`, with `kiln_run` (checked to be an aarch64 ELF) as
/// `kiln-run` and a `README.txt` beside it.
pub fn bundle(
    dir: &Path,
    out: &Path,
    kiln_run: Option<&Path>,
) -> Result<BundleReport, BundleError> {
    let files = board_files(dir)?;
    let manifest = Manifest::load(dir)?;
    if out.is_dir() {
        return Err(BundleError::OutputIsDir(out.to_path_buf()));
    }
    if let Some(k) = kiln_run {
        if !k.is_file() {
            return Err(BundleError::Io {
                path: k.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        if !is_aarch64_elf(k) {
            return Err(BundleError::NotAarch64(k.to_path_buf()));
        }
    }
    // The archive's folder: the directory's own name when it is a plain one.
    let root = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| is_plain_relative(n) && !n.contains(char::is_whitespace))
        .unwrap_or_else(|| "model.kiln".to_string());
    let readme = readme(&root, &manifest, &files, kiln_run.is_some());

    let (staged, file) = StagedFile::beside(out).map_err(|source| BundleError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let write_err = |item: &str| {
        let item = item.to_string();
        move |source| BundleError::Write {
            out: out.to_path_buf(),
            item,
            source,
        }
    };
    let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, file));
    // No owners or times: the same directory gives the same archive.
    tar.mode(tar::HeaderMode::Deterministic);
    for f in &files {
        let name = format!("{root}/{}", f.name);
        if f.path.is_dir() {
            tar.append_dir_all(&name, &f.path)
        } else {
            tar.append_path_with_name(&f.path, &name)
        }
        .map_err(write_err(&f.path.display().to_string()))?;
    }
    if let Some(k) = kiln_run {
        tar.append_path_with_name(k, KILN_RUN)
            .map_err(write_err(&k.display().to_string()))?;
    }
    let mut header = tar::Header::new_gnu();
    header.set_size(readme.len() as u64);
    header.set_mode(0o644);
    // The time tar's deterministic mode gives every other entry.
    header.set_mtime(1_153_704_088);
    header.set_cksum();
    tar.append_data(&mut header, README_FILE, readme.as_bytes())
        .map_err(write_err(README_FILE))?;
    let mut writer = tar
        .into_inner()
        .map_err(write_err("the end of the archive"))?;
    writer
        .flush()
        .map_err(write_err("the end of the archive"))?;
    let file = writer
        .into_inner()
        .map_err(|e| write_err("the end of the archive")(e.into_error()))?;
    file.sync_all()
        .map_err(write_err("the end of the archive"))?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    drop(file);
    staged.commit().map_err(|source| BundleError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(BundleReport {
        out: out.to_path_buf(),
        root,
        files,
        kiln_run: kiln_run.map(Path::to_path_buf),
        readme,
        bytes,
    })
}

/// The build commands for an aarch64 `kiln-run`, prerequisites first.
pub fn cross_build_steps() -> [String; 3] {
    [
        format!("rustup target add {CROSS_TARGET}"),
        "sudo apt-get install gcc-aarch64-linux-gnu   # Debian/Ubuntu: the linker, \
         aarch64-linux-gnu-gcc, which the workspace's .cargo/config.toml names"
            .to_string(),
        format!("cargo build --release -p kiln-runtime --bin {KILN_RUN} --target {CROSS_TARGET}"),
    ]
}

fn readme(root: &str, manifest: &Manifest, files: &[BoardFile], with_kiln_run: bool) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let built = manifest
        .graphs
        .iter()
        .all(|g| files.iter().any(|f| f.name == g.om));
    let mut text = format!(
        "Kiln board bundle: {root}/ ({}, {}, compiled for {} / {})\n\n",
        manifest.architecture, manifest.dtype, manifest.target.name, manifest.target.soc_version
    );
    text += "On the board (CANN installed, as on the Orange Pi AI Pro images), in this folder:\n\n";
    let made_on_board = manifest
        .weights_bin
        .as_ref()
        .filter(|w| !w.stored && !files.iter().any(|f| f.name == w.file));
    if built {
        text += &format!(
            "  # the .om files came in the bundle; ./{root}/build_om.sh --soc auto remakes them\n"
        );
    } else {
        if let Some(w) = made_on_board {
            text += &format!(
                "  # build_om.sh first makes {root}/{} ({:.1} MB, the weights ATC converts) from the reference\n\
                 \x20 # weights with `./{KILN_RUN} expand-weights {root}` (sha256 checked), and removes it when done\n",
                w.file,
                mb(w.bytes)
            );
        }
        text += &format!(
            "  ./{root}/build_om.sh --soc auto   # the .om files, for the chip npu-smi reports (atc, a few minutes)\n"
        );
    }
    text += &format!(
        "  ./{KILN_RUN} check {root}          # manifest, IR, weights and .om files against each other\n\
         \x20 ./{KILN_RUN} generate {root} --backend npu --chat --prompt \"What is the capital of France?\"\n\
         \x20 ./{KILN_RUN} diff {root} --a cpu --b npu --prompt \"The capital of France is\"\n\
         \x20 ./{KILN_RUN} generate {root} --backend cpu --chat --prompt \"…\"   # the reference interpreter, no NPU\n\n"
    );
    if !with_kiln_run {
        text += &format!(
            "kiln-run is not in this bundle. Build it for the board on the build machine and copy it here:\n\n  {}\n\n\
             then take target/{CROSS_TARGET}/release/{KILN_RUN} (or rerun kiln bundle with --kiln-run PATH).\n\n",
            cross_build_steps().join("\n  ")
        );
    }
    text += "Files:\n\n";
    for f in files {
        text += &format!("  {root}/{:<28} {:>10.2} MB\n", f.name, mb(f.bytes));
    }
    if with_kiln_run {
        text += &format!("  {KILN_RUN:<33} (aarch64)\n");
    }
    text += "\nThe NPU path (build_om.sh, --backend npu) has been tested against stand-ins for ATC and ACL,\n\
             not yet on a real board.\n";
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_names_become_archive_paths() {
        for good in ["weights.bin", "kernels", "a/b.json", "x..y"] {
            // (weights.bin: a stored one is packed.)
            assert!(is_plain_relative(good), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "./x",
            "a\\..\\b",
            "..",
            "a/./b",
            "a//b",
            "a/",
            "a\0b",
        ] {
            assert!(!is_plain_relative(bad), "{bad}");
        }
    }

    #[test]
    fn an_aarch64_elf_is_told_from_other_files() {
        let tmp = tempfile::tempdir().unwrap();
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18..20].copy_from_slice(&183u16.to_le_bytes());
        let path = tmp.path().join("arm");
        std::fs::write(&path, &elf).unwrap();
        assert!(is_aarch64_elf(&path));
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        std::fs::write(&path, &elf).unwrap();
        assert!(!is_aarch64_elf(&path));
        std::fs::write(&path, b"\x7fELF").unwrap();
        assert!(!is_aarch64_elf(&path));
        assert!(!is_aarch64_elf(&tmp.path().join("absent")));
    }
}
