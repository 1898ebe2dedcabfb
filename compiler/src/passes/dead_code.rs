//! Removes nodes whose values no output depends on, and the values only
//! they used, renumbering what remains (order is kept, so the graph stays
//! topologically sorted).

use kiln_runtime::ir::{Graph, ValueId, ValueSource};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};

/// Returns the number of nodes removed.
pub fn remove(graph: &mut Graph) -> usize {
    // A dependency graph over values: an edge from each node input to the
    // node's output. Whatever reaches an output (walking edges backwards) lives.
    let mut deps: DiGraph<(), ()> = DiGraph::with_capacity(graph.values.len(), 0);
    for _ in &graph.values {
        deps.add_node(());
    }
    for node in &graph.nodes {
        for &input in &node.inputs {
            deps.add_edge(
                NodeIndex::new(input.index()),
                NodeIndex::new(node.output.index()),
                (),
            );
        }
    }
    let mut live = vec![false; graph.values.len()];
    let reversed = Reversed(&deps);
    for &out in &graph.outputs {
        let mut dfs = Dfs::new(reversed, NodeIndex::new(out.index()));
        while let Some(v) = dfs.next(reversed) {
            live[v.index()] = true;
        }
    }
    // Inputs are the graph's interface: they stay even when unused.
    for &input in &graph.inputs {
        live[input.index()] = true;
    }

    let before = graph.nodes.len();
    let mut new_id = vec![None; graph.values.len()];
    let mut values = Vec::new();
    for (i, value) in graph.values.iter().enumerate() {
        if live[i] {
            new_id[i] = Some(ValueId(values.len() as u32));
            values.push(value.clone());
        }
    }
    let remap = |id: ValueId| new_id[id.index()].expect("live values only depend on live values");
    let mut nodes = Vec::new();
    for node in &graph.nodes {
        if !live[node.output.index()] {
            continue;
        }
        let mut node = node.clone();
        node.inputs = node.inputs.iter().map(|&i| remap(i)).collect();
        node.output = remap(node.output);
        values[node.output.index()].source = ValueSource::Node { node: nodes.len() };
        nodes.push(node);
    }
    graph.inputs = graph.inputs.iter().map(|&i| remap(i)).collect();
    graph.outputs = graph.outputs.iter().map(|&i| remap(i)).collect();
    graph.values = values;
    graph.nodes = nodes;
    before - graph.nodes.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::ir::ops::{Add, Silu};
    use kiln_runtime::ir::{GraphBuilder, TensorType};

    #[test]
    fn drops_what_no_output_needs() {
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", TensorType::f32([3]));
        let unused_weight = b.weight("w", TensorType::f32([3]));
        let dead = b.node("dead", Add, &[x, unused_weight]).unwrap();
        let _dead2 = b.node("dead2", Silu, &[dead]).unwrap();
        let y = b.node("y", Silu, &[x]).unwrap();
        b.output(y, "y");
        let mut g = b.finish().unwrap();
        assert_eq!(remove(&mut g), 2);
        g.validate().unwrap();
        assert_eq!(g.values.len(), 2);
        assert_eq!(g.weights().count(), 0);
    }
}
