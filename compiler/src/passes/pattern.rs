//! Small declarative patterns over the IR, for fusions: a pattern is an op
//! kind with patterns for its inputs, or a named capture that matches any
//! value. Matching starts at a node and walks producers backwards.

use kiln_runtime::ir::{Graph, ValueId, ValueSource};
use std::collections::HashMap;

pub enum Pattern {
    /// Matches any value and binds it to the name.
    Capture(&'static str),
    /// Matches a value computed by an op of this kind from inputs matching these patterns.
    Op {
        op: &'static str,
        inputs: Vec<Pattern>,
        /// Try the two inputs in both orders (for commutative ops).
        commutative: bool,
    },
}

pub fn capture(name: &'static str) -> Pattern {
    Pattern::Capture(name)
}

pub fn op(op: &'static str, inputs: Vec<Pattern>) -> Pattern {
    Pattern::Op {
        op,
        inputs,
        commutative: false,
    }
}

pub fn commutative(op: &'static str, a: Pattern, b: Pattern) -> Pattern {
    Pattern::Op {
        op,
        inputs: vec![a, b],
        commutative: true,
    }
}

/// The result of a match: captured values, and the interior nodes the match
/// covered (every matched node but the root), which a fusion makes dead.
#[derive(Default, Debug)]
pub struct Match {
    pub captures: HashMap<&'static str, ValueId>,
    pub interior: Vec<usize>,
}

impl Match {
    pub fn get(&self, name: &str) -> ValueId {
        self.captures[name]
    }
}

/// Matches `pattern` against the node at `root`. Interior nodes must have no
/// other consumer and must not be graph outputs, so fusing them away is safe.
pub fn match_at(graph: &Graph, pattern: &Pattern, root: usize, uses: &[usize]) -> Option<Match> {
    let mut m = Match::default();
    let node = &graph.nodes[root];
    if !match_node(graph, pattern, node.output, uses, &mut m, true) {
        return None;
    }
    Some(m)
}

fn match_node(
    graph: &Graph,
    pattern: &Pattern,
    value: ValueId,
    uses: &[usize],
    m: &mut Match,
    is_root: bool,
) -> bool {
    match pattern {
        Pattern::Capture(name) => match m.captures.get(name) {
            Some(&bound) => bound == value,
            None => {
                m.captures.insert(name, value);
                true
            }
        },
        Pattern::Op {
            op,
            inputs,
            commutative,
        } => {
            let ValueSource::Node { node: index } = graph.value(value).source else {
                return false;
            };
            let node = &graph.nodes[index];
            if node.op.name() != *op || node.inputs.len() != inputs.len() {
                return false;
            }
            if !is_root && (uses[value.index()] != 1 || graph.outputs.contains(&value)) {
                return false;
            }
            let orders: &[[usize; 2]] = if *commutative && inputs.len() == 2 {
                &[[0, 1], [1, 0]]
            } else {
                &[[0, 1]]
            };
            for order in orders {
                let saved_captures = m.captures.clone();
                let saved_interior = m.interior.len();
                let ok = inputs.iter().enumerate().all(|(i, p)| {
                    let input = if inputs.len() == 2 {
                        node.inputs[order[i]]
                    } else {
                        node.inputs[i]
                    };
                    match_node(graph, p, input, uses, m, false)
                });
                if ok {
                    if !is_root {
                        m.interior.push(index);
                    }
                    return true;
                }
                m.captures = saved_captures;
                m.interior.truncate(saved_interior);
            }
            false
        }
    }
}

/// How many node inputs read each value.
pub fn use_counts(graph: &Graph) -> Vec<usize> {
    let mut uses = vec![0; graph.values.len()];
    for node in &graph.nodes {
        for &input in &node.inputs {
            uses[input.index()] += 1;
        }
    }
    uses
}
