//! Passes over the IR. Each takes a valid graph and leaves a valid graph
//! computing the same outputs; `optimize` runs the default pipeline.

pub mod awq;
pub mod dead_code;
pub mod fusions;
pub mod pattern;
pub mod quantize;
pub mod smooth;

use kiln_runtime::ir::{Graph, IrError, ModelIr};

/// Runs the default passes over both graphs of a model.
pub fn optimize(model: &mut ModelIr) -> Result<(), IrError> {
    for graph in &mut model.graphs {
        optimize_graph(graph)?;
    }
    Ok(())
}

pub fn optimize_graph(graph: &mut Graph) -> Result<(), IrError> {
    fusions::apply_all(graph);
    dead_code::remove(graph);
    graph.validate()
}
