//! Fusions, each a pattern and the op that replaces what it matches. The
//! fused op takes over the root node (same output value), so consumers are
//! untouched; the interior nodes become dead and `dead_code` removes them.

use super::pattern::{capture, commutative, match_at, op, use_counts, Match, Pattern};
use kiln_runtime::ir::ops::SwiGlu;
use kiln_runtime::ir::{Graph, Op};

pub struct Fusion {
    pub name: &'static str,
    pub pattern: fn() -> Pattern,
    /// The fused op and its inputs, from the captures.
    pub rewrite: fn(&Match) -> (Op, Vec<&'static str>),
}

/// `Mul(Silu(gate), up)` → `SwiGlu(gate, up)`: the gated MLP activation.
pub const SWIGLU: Fusion = Fusion {
    name: "swiglu",
    pattern: || commutative("Mul", op("Silu", vec![capture("gate")]), capture("up")),
    rewrite: |_| (SwiGlu.into(), vec!["gate", "up"]),
};

pub const ALL: &[Fusion] = &[SWIGLU];

/// Applies one fusion wherever it matches; returns how many times.
pub fn apply(graph: &mut Graph, fusion: &Fusion) -> usize {
    let pattern = (fusion.pattern)();
    let mut count = 0;
    for root in 0..graph.nodes.len() {
        let uses = use_counts(graph);
        let Some(m) = match_at(graph, &pattern, root, &uses) else {
            continue;
        };
        let (fused, names) = (fusion.rewrite)(&m);
        let node = &mut graph.nodes[root];
        node.op = fused;
        node.inputs = names.iter().map(|n| m.get(n)).collect();
        count += 1;
    }
    count
}

pub fn apply_all(graph: &mut Graph) {
    for fusion in ALL {
        apply(graph, fusion);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::dead_code;
    use kiln_runtime::ir::ops::{Mul, Silu};
    use kiln_runtime::ir::{GraphBuilder, TensorType};

    #[test]
    fn fuses_silu_times_up_in_either_order() {
        for swapped in [false, true] {
            let mut b = GraphBuilder::new("g");
            let gate = b.input("gate", TensorType::f32([2, 3]));
            let up = b.input("up", TensorType::f32([2, 3]));
            let s = b.node("silu", Silu, &[gate]).unwrap();
            let inputs = if swapped { [up, s] } else { [s, up] };
            let y = b.node("mul", Mul, &inputs).unwrap();
            b.output(y, "y");
            let mut g = b.finish().unwrap();
            assert_eq!(apply(&mut g, &SWIGLU), 1);
            dead_code::remove(&mut g);
            g.validate().unwrap();
            assert_eq!(g.op_counts(), vec![("SwiGlu", 1)]);
            assert_eq!(g.nodes[0].inputs, vec![gate, up]);
        }
    }

    #[test]
    fn leaves_a_shared_silu_alone() {
        let mut b = GraphBuilder::new("g");
        let gate = b.input("gate", TensorType::f32([4]));
        let up = b.input("up", TensorType::f32([4]));
        let s = b.node("silu", Silu, &[gate]).unwrap();
        let y = b.node("mul", Mul, &[s, up]).unwrap();
        b.output(y, "y");
        b.output(s, "s");
        let mut g = b.finish().unwrap();
        assert_eq!(apply(&mut g, &SWIGLU), 0);
    }
}
