//! Which ONNX ops, at which opsets, ATC accepts — kept as data
//! (`compiler/data/atc_onnx_ops.json`, gathered from the CANN documentation's
//! "Supported ONNX operators" pages, each entry with its source page).
//!
//! The CANN pages describe one list for the inference products; no
//! separate list for the 310B (Atlas 200/500 A2) is published, so every
//! target uses this one until a product-specific list is recorded.

use super::OnnxError;
use onnx_protobuf::ModelProto;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::OnceLock;

#[derive(Debug, Deserialize)]
pub struct AllowList {
    pub about: String,
    pub sources: Vec<String>,
    pub ops: BTreeMap<String, OpEntry>,
    #[serde(default)]
    pub not_found: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct OpEntry {
    /// Inclusive range of model opsets the op is documented for.
    pub opsets: [i64; 2],
    #[serde(default)]
    pub notes: String,
    #[serde(default)]
    pub source: String,
}

/// Ops that peers found unsupported or slow on the 310B; never in a decode graph.
pub const AVOID: &[(&str, &str)] = &[
    (
        "ScatterElements",
        "has no AI Core kernel on the 310B and falls back to the AI CPU",
    ),
    (
        "ScatterND",
        "writes the cache inside the graph; the host writes new rows instead",
    ),
    (
        "Trilu",
        "only k = 0 is supported; the causal mask is an input instead",
    ),
    (
        "Expand",
        "broadcasting shares KV heads without copying them",
    ),
];

pub fn atc() -> &'static AllowList {
    static LIST: OnceLock<AllowList> = OnceLock::new();
    LIST.get_or_init(|| {
        serde_json::from_str(include_str!("../../../data/atc_onnx_ops.json"))
            .expect("compiler/data/atc_onnx_ops.json is valid (checked by a test)")
    })
}

impl AllowList {
    /// Every node of `model` must be a listed op at the model's opset.
    pub fn check(&self, model: &ModelProto, graph_name: &str) -> Result<(), OnnxError> {
        self.check_with_kernels(model, graph_name, &[])
    }

    /// Like [`Self::check`], but the `ai.kiln` nodes of the op types in
    /// `kernels` (those Kiln generated a kernel package for) are exempt.
    pub fn check_with_kernels(
        &self,
        model: &ModelProto,
        graph_name: &str,
        kernels: &[&str],
    ) -> Result<(), OnnxError> {
        let opset = model.opset_import.first().map(|o| o.version).unwrap_or(0);
        let mut problems = Vec::new();
        for node in &model.graph.node {
            let op = node.op_type.as_str();
            if node.domain == crate::backend::ascendc::ONNX_DOMAIN && kernels.contains(&op) {
                continue;
            }
            if !node.domain.is_empty() {
                problems.push(format!("{}::{op} is not an op ATC knows", node.domain));
                continue;
            }
            match self.ops.get(op) {
                Some(entry) if (entry.opsets[0]..=entry.opsets[1]).contains(&opset) => {}
                Some(entry) => problems.push(format!(
                    "{op} is documented for opsets {}–{}, not {opset}",
                    entry.opsets[0], entry.opsets[1]
                )),
                None => problems.push(format!("{op} is not in ATC's list of supported ONNX ops")),
            }
        }
        problems.sort();
        problems.dedup();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(OnnxError::NotAllowed(format!(
                "the {graph_name} graph uses ops ATC would reject: {}",
                problems.join("; ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_file_parses_and_names_its_sources() {
        let list = atc();
        assert!(list.ops.len() > 30);
        assert!(list.sources.iter().all(|s| s.starts_with("https://")));
        for (op, entry) in &list.ops {
            assert!(entry.opsets[0] <= entry.opsets[1], "{op}");
            assert!(
                entry.source.starts_with("https://"),
                "{op} has no source page"
            );
        }
        assert_eq!(list.ops["ReduceMean"].opsets, [8, 16]);
    }

    #[test]
    fn only_the_kiln_nodes_of_generated_kernels_are_exempt() {
        use onnx_protobuf::{GraphProto, NodeProto, OperatorSetIdProto};
        let node = |domain: &str, op: &str| NodeProto {
            domain: domain.into(),
            op_type: op.into(),
            ..Default::default()
        };
        let model = |nodes: Vec<NodeProto>| ModelProto {
            opset_import: vec![OperatorSetIdProto {
                version: 13,
                ..Default::default()
            }],
            graph: Some(GraphProto {
                node: nodes,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let m = model(vec![node("", "Add"), node("ai.kiln", "KilnRmsNorm")]);
        assert!(atc().check_with_kernels(&m, "g", &["KilnRmsNorm"]).is_ok());
        assert!(atc().check_with_kernels(&m, "g", &["KilnSwiGlu"]).is_err());
        assert!(atc().check(&m, "g").is_err());
        // A standard op type in the custom domain is not ATC's op.
        let m = model(vec![node("ai.kiln", "Add")]);
        assert!(atc().check_with_kernels(&m, "g", &["KilnRmsNorm"]).is_err());
    }
}
