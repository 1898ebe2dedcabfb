//! Intermediate tensors for a layer-by-layer diff: which IR values to dump,
//! where their .npy files go, and how each backend's pair compares.
//!
//! Both backends name values alike: the ONNX backend gives the ONNX value
//! that holds an IR value the IR value's name, so one name reaches the
//! interpreter's capture and ONNX Runtime's extra graph outputs.
//!
//! Layout: `<dir>/<backend>/step<N>/<file stem of the name>.npy`, holding the
//! value as computed by the graph run that produced step N's logits (a long
//! prompt's last prefill chunk; prefill values include the padding rows past
//! the prompt, which both backends compute alike).

use super::Closeness;
use crate::interp::Taps;
use crate::ir::{Graph, ValueSource};
use crate::npy::{NpyArray, NpyError};
use std::path::{Path, PathBuf};

/// `--dump-layers`: each decoder layer's output (the residual stream after
/// its MLP), as the frontend names it.
pub const LAYER_OUTPUTS: &str = "model.layers.*.mlp_residual";

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("no value of the IR matches `{pattern}`{hint}")]
    NoMatch { pattern: String, hint: String },
    #[error(
        "`{name}` is {what} of graph `{graph}`, not a value the graph computes: \
         only node outputs can be dumped"
    )]
    NotComputed {
        name: String,
        what: &'static str,
        graph: String,
    },
    #[error("`{name}` is computed by graph `{has}` but not by `{lacks}`")]
    NotInEveryGraph {
        name: String,
        has: String,
        lacks: String,
    },
    #[error("`{name}` is {dtype}: only floating-point values can be dumped and compared")]
    NotFloat { name: String, dtype: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error("{path}: expected an f32 array")]
    NotF32 { path: PathBuf },
    #[error("`{name}` at step {step}: {shapes}")]
    Shapes {
        name: String,
        step: usize,
        shapes: String,
    },
}

/// Which values to dump, and where.
#[derive(Clone, Debug)]
pub struct DumpRequest {
    /// IR value names, in graph order.
    pub names: Vec<String>,
    pub dir: PathBuf,
}

/// `*` matches any run of characters (dots too), `?` any one character.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with one backtrack point: the last `*` seen.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Names of the values `graph`'s nodes compute, in node order.
fn computed(graph: &Graph) -> Vec<&str> {
    graph
        .nodes
        .iter()
        .map(|n| graph.value(n.output).name.as_str())
        .collect()
}

/// Expands `--dump` names and patterns against the model's graphs: every
/// result is computed by each graph, is floating point, and appears once,
/// in the first graph's node order.
pub fn expand(graphs: &[&Graph], patterns: &[String]) -> Result<Vec<String>, DumpError> {
    let Some((first, others)) = graphs.split_first() else {
        return Ok(Vec::new());
    };
    let order = computed(first);
    let mut chosen = vec![false; order.len()];
    for pattern in patterns {
        let wild = pattern.contains(['*', '?']);
        let mut found = false;
        for (i, name) in order.iter().enumerate() {
            if (wild && glob_matches(pattern, name)) || (!wild && pattern == name) {
                chosen[i] = true;
                found = true;
            }
        }
        if found {
            continue;
        }
        if !wild {
            if let Some(value) = first.values.iter().find(|v| v.name == *pattern) {
                let what = match value.source {
                    ValueSource::Input => "an input",
                    _ => "a weight",
                };
                return Err(DumpError::NotComputed {
                    name: pattern.clone(),
                    what,
                    graph: first.name.clone(),
                });
            }
        }
        return Err(DumpError::NoMatch {
            pattern: pattern.clone(),
            hint: suggestions(pattern, &order),
        });
    }
    let names: Vec<String> = order
        .iter()
        .zip(&chosen)
        .filter(|(_, &c)| c)
        .map(|(n, _)| n.to_string())
        .collect();
    for name in &names {
        let id = first
            .nodes
            .iter()
            .map(|n| n.output)
            .find(|&id| first.value(id).name == *name)
            .expect("chosen from this graph's node outputs");
        if !first.ty(id).dtype.is_float() {
            return Err(DumpError::NotFloat {
                name: name.clone(),
                dtype: first.ty(id).to_string(),
            });
        }
        if let Some(other) = others
            .iter()
            .find(|g| !computed(g).contains(&name.as_str()))
        {
            return Err(DumpError::NotInEveryGraph {
                name: name.clone(),
                has: first.name.clone(),
                lacks: other.name.clone(),
            });
        }
    }
    Ok(names)
}

/// A few value names that look like what was asked for, to put in the error.
fn suggestions(pattern: &str, names: &[&str]) -> String {
    // The last dotted component without wildcards: `mlp_out` of `layers.*.mlp_out`.
    let key = pattern
        .rsplit('.')
        .map(|part| part.trim_matches(['*', '?']))
        .find(|part| !part.is_empty())
        .unwrap_or("");
    let mut close: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !key.is_empty() && n.contains(key))
        .take(6)
        .collect();
    if close.is_empty() {
        close = names
            .iter()
            .copied()
            .filter(|n| n.starts_with("model.layers.0."))
            .take(12)
            .collect();
    }
    if close.is_empty() {
        return String::new();
    }
    format!(
        "; names look like: {} (all of them: `kiln inspect <model> --ir`, or the compiled \
         directory's model.kiln.json; `*` matches any run of characters)",
        close.join(", ")
    )
}

/// The file name for a value: the name with anything but `[A-Za-z0-9._-]`
/// replaced by `_` (ort_run.py does the same).
pub fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Where one backend's dumps go (what ort_run.py's `--dump-dir` gets).
pub fn backend_dir(dir: &Path, backend: &str) -> PathBuf {
    dir.join(backend)
}

pub fn dump_path(dir: &Path, backend: &str, step: usize, name: &str) -> PathBuf {
    backend_dir(dir, backend)
        .join(format!("step{step}"))
        .join(format!("{}.npy", file_stem(name)))
}

/// Writes the interpreter's captured values of one step.
pub fn write_taps(dir: &Path, backend: &str, step: usize, taps: &Taps) -> Result<(), DumpError> {
    let step_dir = backend_dir(dir, backend).join(format!("step{step}"));
    std::fs::create_dir_all(&step_dir).map_err(|source| DumpError::Io {
        path: step_dir.clone(),
        source,
    })?;
    for (name, tensor) in taps {
        let path = dump_path(dir, backend, step, name);
        crate::npy::write_f32(&path, tensor.shape(), tensor.f32s())?;
    }
    Ok(())
}

fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>), DumpError> {
    match crate::npy::read(path)? {
        NpyArray::F32 { shape, data } => Ok((shape, data)),
        NpyArray::I64 { .. } => Err(DumpError::NotF32 {
            path: path.to_path_buf(),
        }),
    }
}

/// How one dumped value compares between the backends at one step.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDiff {
    pub step: usize,
    pub name: String,
    pub shape: Vec<usize>,
    pub closeness: Closeness,
}

/// Reads both backends' dumps of every name and step and compares them.
pub fn compare_dumps(
    request: &DumpRequest,
    a: &str,
    b: &str,
    steps: usize,
) -> Result<Vec<TensorDiff>, DumpError> {
    let mut diffs = Vec::new();
    for step in 0..steps {
        for name in &request.names {
            let (shape_a, data_a) = read_f32(&dump_path(&request.dir, a, step, name))?;
            let (shape_b, data_b) = read_f32(&dump_path(&request.dir, b, step, name))?;
            if shape_a != shape_b {
                return Err(DumpError::Shapes {
                    name: name.clone(),
                    step,
                    shapes: format!("{a} dumped shape {shape_a:?}, {b} dumped {shape_b:?}"),
                });
            }
            diffs.push(TensorDiff {
                step,
                name: name.clone(),
                shape: shape_a,
                closeness: Closeness::of(&data_a, &data_b),
            });
        }
    }
    Ok(diffs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ops::{Add, Linear, Reshape};
    use crate::ir::{DType, GraphBuilder, TensorType};

    fn layered(name: &str, layers: usize) -> Graph {
        let mut b = GraphBuilder::new(name);
        let ids = b.input("input_ids", TensorType::new(DType::I64, [1, 2]));
        let mut x = b.input("x", TensorType::f32([1, 2, 4]));
        for layer in 0..layers {
            let w = b.weight(
                &format!("model.layers.{layer}.mlp.down_proj.weight"),
                TensorType::f32([4, 4]),
            );
            let y = b
                .node(
                    format!("model.layers.{layer}.mlp.down_proj"),
                    Linear,
                    &[x, w],
                )
                .unwrap();
            x = b
                .node(format!("model.layers.{layer}.mlp_residual"), Add, &[x, y])
                .unwrap();
        }
        let flat = b.node("flat", Reshape { shape: vec![2, 4] }, &[x]).unwrap();
        b.output(flat, "logits");
        let shape = b
            .node("ids.flat", Reshape { shape: vec![2] }, &[ids])
            .unwrap();
        b.output(shape, "ids_out");
        b.finish().unwrap()
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_matches(
            "model.layers.*.mlp_residual",
            "model.layers.12.mlp_residual"
        ));
        assert!(glob_matches("*_residual", "model.layers.0.attn_residual"));
        assert!(glob_matches(
            "model.layers.?.mlp*",
            "model.layers.3.mlp.down_proj"
        ));
        assert!(!glob_matches("model.layers.?.mlp*", "model.layers.13.mlp"));
        assert!(!glob_matches(
            "model.layers.*.mlp",
            "model.layers.1.mlp_residual"
        ));
        assert!(glob_matches("*", ""));
        assert!(glob_matches("a*b*c", "a.x.b.y.c"));
        assert!(!glob_matches("a*b*c", "a.x.b.y.d"));
    }

    #[test]
    fn patterns_expand_in_graph_order_once() {
        let (prefill, decode) = (layered("prefill", 3), layered("decode", 3));
        let graphs = [&prefill, &decode];
        let names = expand(
            &graphs,
            &[
                "logits".to_string(),
                LAYER_OUTPUTS.to_string(),
                "model.layers.1.mlp_residual".to_string(),
                "model.layers.0.*".to_string(),
            ],
        )
        .unwrap();
        assert_eq!(
            names,
            [
                "model.layers.0.mlp.down_proj",
                "model.layers.0.mlp_residual",
                "model.layers.1.mlp_residual",
                "model.layers.2.mlp_residual",
                "logits",
            ]
        );
    }

    #[test]
    fn bad_names_are_explained() {
        let (prefill, decode) = (layered("prefill", 2), layered("decode", 1));
        let graphs = [&prefill, &decode];
        let err = |p: &str| expand(&graphs, &[p.to_string()]).unwrap_err().to_string();
        let e = err("layers.*.mlp_out");
        assert!(
            e.contains("no value of the IR matches `layers.*.mlp_out`")
                && e.contains("model.layers.0.mlp_residual"),
            "{e}"
        );
        let e = err("model.layers.0.mlp.down_proj.weight");
        assert!(e.contains("is a weight"), "{e}");
        let e = err("x");
        assert!(e.contains("is an input"), "{e}");
        let e = err("ids_out");
        assert!(e.contains("floating-point"), "{e}");
        let e = err("model.layers.1.mlp_residual");
        assert!(e.contains("not by `decode`"), "{e}");
    }

    #[test]
    fn file_names_keep_safe_characters_only() {
        assert_eq!(
            file_stem("model.layers.0.mlp_residual"),
            "model.layers.0.mlp_residual"
        );
        assert_eq!(file_stem("a/b c<d>"), "a_b_c_d_");
        let p = dump_path(Path::new("d"), "cpu", 3, "x/y");
        assert_eq!(p, Path::new("d/cpu/step3/x_y.npy"));
    }

    #[test]
    fn written_taps_read_back_and_compare() {
        let dir = tempfile::tempdir().unwrap();
        let t = |v: Vec<f32>| crate::tensor::Tensor::from_f32([2, 2], v);
        let request = DumpRequest {
            names: vec!["h".into()],
            dir: dir.path().to_path_buf(),
        };
        write_taps(
            dir.path(),
            "cpu",
            0,
            &vec![("h".into(), t(vec![1., 2., 3., 4.]))],
        )
        .unwrap();
        write_taps(
            dir.path(),
            "ort",
            0,
            &vec![("h".into(), t(vec![1., 2., 3., 4.5]))],
        )
        .unwrap();
        let diffs = compare_dumps(&request, "cpu", "ort", 1).unwrap();
        assert_eq!(diffs.len(), 1);
        assert_eq!(diffs[0].shape, [2, 2]);
        assert_eq!(diffs[0].closeness.max_abs, 0.5);
        assert_eq!(diffs[0].closeness.mean_abs, 0.125);
        // A missing dump names its file.
        let err = compare_dumps(&request, "cpu", "ort", 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("step1"), "{err}");
    }
}
