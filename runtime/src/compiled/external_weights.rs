//! The weights ATC writes outside the .om files (`atc --external_weight=1`):
//! one file per distinct constant in `weight/` beside the .om, named
//! `weight_<sha256 of its bytes>` (CANN 8.0.RC2 on), so identical weights of
//! the prefill and decode graphs are one file. `build_om.sh` converts each
//! graph on its own and records the files each one reads in
//! `<graph>.weights` (one name per line), then gathers all of them into
//! `weight/`. Facts: `shared/research/board-memory.md`.
//!
//! From these lists the NPU engine allocates one device buffer per distinct
//! file and registers it for every graph that reads it, and `kiln-run
//! check` reports which bytes the graphs share and which only one of them
//! reads (ATC may lay out a weight differently for T = 1 and T = 64).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The folder ATC writes beside the .om files.
pub const WEIGHT_DIR: &str = "weight";

/// The list of weight files one graph reads.
pub fn list_file(graph: &str) -> String {
    format!("{graph}.weights")
}

/// ACL wants registered weight buffers sized in multiples of 32 bytes.
pub fn registered_size(bytes: u64) -> u64 {
    bytes.div_ceil(32).max(1) * 32
}

#[derive(Debug, thiserror::Error)]
pub enum ExternalWeightsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{list}: `{name}` is not a weight file name ATC writes (letters, digits, `_`, `-`, `.`)"
    )]
    BadName { list: PathBuf, name: String },
    #[error(
        "{list} names {name}, which is not in {dir}: run build_om.sh again (it rewrites both)"
    )]
    Missing {
        list: PathBuf,
        name: String,
        dir: PathBuf,
    },
    #[error(
        "{dir} exists but {list} does not: the .om files were not converted by this Kiln's \
         build_om.sh; run it again"
    )]
    NoList { dir: PathBuf, list: PathBuf },
}

/// One distinct weight file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightFile {
    pub name: String,
    pub bytes: u64,
}

/// The weight files of a compiled directory's graphs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalWeights {
    pub dir: PathBuf,
    /// Every distinct file, by name.
    pub files: Vec<WeightFile>,
    /// For each graph (in the order asked), the indices of the files it reads.
    pub graphs: Vec<(String, Vec<usize>)>,
}

/// Which bytes the graphs share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sharing {
    /// Every distinct file once: what the device holds.
    pub total_bytes: u64,
    /// Files every graph reads.
    pub shared_bytes: u64,
    pub shared_files: usize,
    /// Per graph: the bytes of files only it reads.
    pub own_bytes: Vec<(String, u64)>,
}

fn is_weight_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

impl ExternalWeights {
    /// Reads `dir`'s weight lists for `graphs`. `None` when there is no
    /// `weight/` folder (the .om files embed their weights).
    pub fn read(dir: &Path, graphs: &[&str]) -> Result<Option<Self>, ExternalWeightsError> {
        let folder = dir.join(WEIGHT_DIR);
        if !folder.is_dir() {
            return Ok(None);
        }
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        let mut files = Vec::new();
        let mut lists = Vec::new();
        for &graph in graphs {
            let list = dir.join(list_file(graph));
            if !list.is_file() {
                return Err(ExternalWeightsError::NoList { dir: folder, list });
            }
            let text =
                std::fs::read_to_string(&list).map_err(|source| ExternalWeightsError::Io {
                    path: list.clone(),
                    source,
                })?;
            let mut reads = Vec::new();
            for name in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                if !is_weight_name(name) {
                    return Err(ExternalWeightsError::BadName {
                        list,
                        name: name.to_string(),
                    });
                }
                let at = match index.get(name) {
                    Some(&at) => at,
                    None => {
                        let path = folder.join(name);
                        let bytes = match std::fs::metadata(&path) {
                            Ok(m) if m.is_file() => m.len(),
                            _ => {
                                return Err(ExternalWeightsError::Missing {
                                    list,
                                    name: name.to_string(),
                                    dir: folder,
                                })
                            }
                        };
                        files.push(WeightFile {
                            name: name.to_string(),
                            bytes,
                        });
                        index.insert(name.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if !reads.contains(&at) {
                    reads.push(at);
                }
            }
            lists.push((graph.to_string(), reads));
        }
        Ok(Some(ExternalWeights {
            dir: folder,
            files,
            graphs: lists,
        }))
    }

    pub fn path(&self, file: &WeightFile) -> PathBuf {
        self.dir.join(&file.name)
    }

    pub fn sharing(&self) -> Sharing {
        let readers = |at: usize| self.graphs.iter().filter(|(_, l)| l.contains(&at)).count();
        let shared: Vec<usize> = (0..self.files.len())
            .filter(|&at| readers(at) == self.graphs.len())
            .collect();
        Sharing {
            total_bytes: self.files.iter().map(|f| f.bytes).sum(),
            shared_bytes: shared.iter().map(|&at| self.files[at].bytes).sum(),
            shared_files: shared.len(),
            own_bytes: self
                .graphs
                .iter()
                .map(|(name, list)| {
                    let own = list
                        .iter()
                        .filter(|&&at| readers(at) == 1)
                        .map(|&at| self.files[at].bytes)
                        .sum();
                    (name.clone(), own)
                })
                .collect(),
        }
    }
}

impl Sharing {
    /// One line for `kiln-run check` and the NPU engine's report.
    pub fn describe(&self) -> String {
        let mb = |b: u64| b as f64 / 1e6;
        let mut text = format!(
            "external weights: {:.1} MB on the device, once; {:.1} MB ({} files) shared by every graph",
            mb(self.total_bytes),
            mb(self.shared_bytes),
            self.shared_files
        );
        let own: Vec<String> = self
            .own_bytes
            .iter()
            .filter(|(_, b)| *b > 0)
            .map(|(g, b)| format!("{:.1} MB only in {g}", mb(*b)))
            .collect();
        if !own.is_empty() && self.own_bytes.len() > 1 {
            text.push_str(&format!(
                "; {} (ATC laid these out differently per graph: they are held in addition; \
                 --graphs single avoids it)",
                own.join(", ")
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plant(dir: &Path, lists: &[(&str, &[(&str, usize)])]) {
        std::fs::create_dir_all(dir.join(WEIGHT_DIR)).unwrap();
        for (graph, files) in lists {
            let mut list = String::new();
            for (name, bytes) in *files {
                std::fs::write(dir.join(WEIGHT_DIR).join(name), vec![1u8; *bytes]).unwrap();
                list.push_str(name);
                list.push('\n');
            }
            std::fs::write(dir.join(list_file(graph)), list).unwrap();
        }
    }

    #[test]
    fn shared_and_own_bytes_come_from_the_lists() {
        let tmp = tempfile::tempdir().unwrap();
        plant(
            tmp.path(),
            &[
                (
                    "prefill",
                    &[("weight_aa", 64), ("weight_bb", 100), ("weight_p", 7)],
                ),
                (
                    "decode",
                    &[("weight_aa", 64), ("weight_bb", 100), ("weight_d", 9)],
                ),
            ],
        );
        let w = ExternalWeights::read(tmp.path(), &["prefill", "decode"])
            .unwrap()
            .unwrap();
        assert_eq!(w.files.len(), 4);
        let s = w.sharing();
        assert_eq!(
            (s.total_bytes, s.shared_bytes, s.shared_files),
            (180, 164, 2)
        );
        assert_eq!(
            s.own_bytes,
            [("prefill".to_string(), 7), ("decode".to_string(), 9)]
        );
        let text = s.describe();
        assert!(text.contains("0.0 MB only in prefill"), "{text}");
        assert_eq!(registered_size(100), 128);
        assert_eq!(registered_size(64), 64);
    }

    #[test]
    fn bad_lists_are_refused_with_the_file_named() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(ExternalWeights::read(tmp.path(), &["step"])
            .unwrap()
            .is_none());
        plant(tmp.path(), &[("step", &[("weight_aa", 4)])]);
        std::fs::write(
            tmp.path().join("step.weights"),
            "weight_aa\n../../etc/passwd\n",
        )
        .unwrap();
        let err = ExternalWeights::read(tmp.path(), &["step"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("step.weights") && err.contains("../../etc/passwd"),
            "{err}"
        );
        std::fs::write(tmp.path().join("step.weights"), "weight_gone\n").unwrap();
        let err = ExternalWeights::read(tmp.path(), &["step"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("weight_gone") && err.contains("build_om.sh"),
            "{err}"
        );
        let err = ExternalWeights::read(tmp.path(), &["prefill"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("prefill.weights does not"), "{err}");
    }
}
