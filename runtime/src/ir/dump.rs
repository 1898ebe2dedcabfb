//! A readable text form of a graph, for `kiln inspect --ir`.

use super::{Graph, ValueSource};
use std::fmt;

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "graph {} {{", self.name)?;
        for &id in &self.inputs {
            let v = self.value(id);
            writeln!(f, "  input  %{} : {}", v.name, v.ty)?;
        }
        let weights: Vec<_> = self.weights().collect();
        let weight_bytes: usize = weights
            .iter()
            .map(|&(id, _)| self.ty(id).size_bytes())
            .sum();
        writeln!(
            f,
            "  weights: {} tensors, {:.1} MiB",
            weights.len(),
            weight_bytes as f64 / (1 << 20) as f64
        )?;
        for node in &self.nodes {
            let args: Vec<String> = node
                .inputs
                .iter()
                .map(|&id| {
                    let v = self.value(id);
                    match v.source {
                        ValueSource::Weight { .. } => format!("@{}", v.name),
                        _ => format!("%{}", v.name),
                    }
                })
                .collect();
            let out = self.value(node.output);
            let attrs = attributes(&node.op);
            writeln!(
                f,
                "  %{} : {} = {}{}({})",
                out.name,
                out.ty,
                node.op.name(),
                attrs,
                args.join(", ")
            )?;
        }
        for &id in &self.outputs {
            let v = self.value(id);
            writeln!(f, "  output %{} : {}", v.name, v.ty)?;
        }
        write!(f, "}}")
    }
}

/// An op's attributes as `{key=value, …}`, or nothing when it has none.
fn attributes(op: &super::Op) -> String {
    let json = serde_json::to_value(op).expect("ops serialize");
    let fields: Vec<String> = json
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != "op")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if fields.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", fields.join(", "))
    }
}
