//! Prediction (n2g-method.md section 6): a trie compiled into flat arrays and the two walk
//! semantics over token-id sequences.
//!
//! For position i, the walk starts at the activating node(s) whose id set holds token i, then
//! consumes tokens i-1, i-2, ... one trie level each. Both semantics return 0 where no END is
//! reached.
//! - [`Semantics::GreedyDeepest`] (reference code): one walk; at each step the child whose id
//!   set holds the token, else the IGNORE child, else stop; the value of the deepest END met
//!   (END on the activating node included).
//! - [`Semantics::AllPathsMax`] (the paper's text, generalised): every path that matches, taking
//!   at each step every exact child *and* the IGNORE child; the maximum END value met.
//!
//! Ids shared by siblings (not produced by a label function, but not assumed away): greedy takes
//! the first matching sibling in label order, all-paths takes all of them.

use crate::error::{invalid, N2GError, Result};
use crate::trie::{NeuronGraph, NodeId, ROOT};
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Semantics {
    AllPathsMax,
    GreedyDeepest,
}

impl FromStr for Semantics {
    type Err = N2GError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all_paths_max" => Ok(Semantics::AllPathsMax),
            "greedy_deepest" => Ok(Semantics::GreedyDeepest),
            _ => Err(invalid!("semantics must be 'all_paths_max' or 'greedy_deepest', got '{s}'")),
        }
    }
}

const NONE: u32 = u32::MAX;

/// Flat form of a trie. Node k of the arena (k >= 1) is index k-1 here. For each node, its exact
/// edges `(token id, child)` sit in `edge_token/edge_child[edge_start[k]..edge_start[k+1]]`
/// sorted by token id, then by the child's label order, so a binary search finds the first
/// (greedy) or every (all paths) match; a child with several ids has one edge per id.
#[derive(Clone, Debug, Default)]
pub struct CompiledTrie {
    end: Vec<f32>, // NaN = no END (END values are finite by construction)
    ignore_child: Vec<u32>,
    edge_start: Vec<u32>,
    edge_token: Vec<u32>,
    edge_child: Vec<u32>,
    root_token: Vec<u32>,
    root_node: Vec<u32>,
}

/// Pushes `(token, child)` edges for `children` sorted by token then sibling order.
fn push_edges(g: &NeuronGraph, children: &[NodeId], tokens: &mut Vec<u32>, nodes: &mut Vec<u32>) {
    let mut edges: Vec<(u32, u32, u32)> = Vec::new();
    for (rank, &c) in children.iter().enumerate() {
        for &t in &g.node(c).token_ids {
            edges.push((t, rank as u32, c - 1));
        }
    }
    edges.sort_unstable();
    for (t, _, c) in edges {
        tokens.push(t);
        nodes.push(c);
    }
}

impl CompiledTrie {
    pub fn new(g: &NeuronGraph) -> Self {
        let n = g.nodes().len() - 1;
        let mut ct = CompiledTrie {
            end: Vec::with_capacity(n),
            ignore_child: Vec::with_capacity(n),
            edge_start: Vec::with_capacity(n + 1),
            ..Default::default()
        };
        push_edges(g, g.roots(), &mut ct.root_token, &mut ct.root_node);
        ct.edge_start.push(0);
        for node in &g.nodes()[1..] {
            ct.end.push(node.end.unwrap_or(f32::NAN));
            let (exact, ignore) = match node.children.last() {
                Some(&l) if g.node(l).label.is_ignore() => (&node.children[..node.children.len() - 1], l - 1),
                _ => (&node.children[..], NONE),
            };
            ct.ignore_child.push(ignore);
            push_edges(g, exact, &mut ct.edge_token, &mut ct.edge_child);
            ct.edge_start.push(ct.edge_token.len() as u32);
        }
        debug_assert!(g.nodes()[ROOT as usize].children.iter().all(|&c| !g.node(c).label.is_ignore()));
        ct
    }

    /// Range of `tokens` equal to `t` (tokens sorted).
    #[inline]
    fn equal_range(tokens: &[u32], t: u32) -> (usize, usize) {
        let lo = tokens.partition_point(|&x| x < t);
        let mut hi = lo;
        while hi < tokens.len() && tokens[hi] == t {
            hi += 1;
        }
        (lo, hi)
    }

    #[inline]
    fn edges(&self, node: u32) -> (usize, usize) {
        (self.edge_start[node as usize] as usize, self.edge_start[node as usize + 1] as usize)
    }

    /// Activating entries `(token id, node)`, sorted by token then label order.
    pub fn roots(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.root_token.iter().copied().zip(self.root_node.iter().copied())
    }

    fn greedy(&self, seq: &[u32], i: usize) -> f32 {
        let (lo, hi) = Self::equal_range(&self.root_token, seq[i]);
        if lo == hi {
            return 0.0;
        }
        self.greedy_from(self.root_node[lo], seq, i)
    }

    /// The greedy walk for position i from activating node `root` (whose ids hold seq[i]).
    pub fn greedy_from(&self, root: u32, seq: &[u32], i: usize) -> f32 {
        let mut node = root;
        let mut best = 0.0;
        let mut j = i;
        loop {
            let e = self.end[node as usize];
            if !e.is_nan() {
                best = e;
            }
            if j == 0 {
                return best;
            }
            j -= 1;
            let (s, t) = self.edges(node);
            let edges = &self.edge_token[s..t];
            let lo = edges.partition_point(|&x| x < seq[j]);
            node = if lo < edges.len() && edges[lo] == seq[j] {
                self.edge_child[s + lo]
            } else {
                match self.ignore_child[node as usize] {
                    NONE => return best,
                    c => c,
                }
            };
        }
    }

    fn all_paths(&self, seq: &[u32], i: usize, stack: &mut Vec<(u32, u32)>) -> f32 {
        let (lo, hi) = Self::equal_range(&self.root_token, seq[i]);
        self.all_paths_from(&self.root_node[lo..hi], seq, i, stack)
    }

    /// Every matching path for position i from the activating nodes `roots` (all holding
    /// seq[i]); the max END value, 0 if none.
    pub fn all_paths_from(&self, roots: &[u32], seq: &[u32], i: usize, stack: &mut Vec<(u32, u32)>) -> f32 {
        if roots.is_empty() {
            return 0.0;
        }
        stack.clear();
        stack.extend(roots.iter().map(|&r| (r, i as u32)));
        let mut best = f32::NEG_INFINITY;
        while let Some((node, j)) = stack.pop() {
            let e = self.end[node as usize];
            if !e.is_nan() && e > best {
                best = e;
            }
            if j == 0 {
                continue;
            }
            let j = j - 1;
            let (s, t) = self.edges(node);
            let (lo, hi) = Self::equal_range(&self.edge_token[s..t], seq[j as usize]);
            stack.extend(self.edge_child[s + lo..s + hi].iter().map(|&c| (c, j)));
            let ig = self.ignore_child[node as usize];
            if ig != NONE {
                stack.push((ig, j));
            }
        }
        if best == f32::NEG_INFINITY {
            0.0
        } else {
            best
        }
    }

    /// Predictions for every position of `seq` into `out` (same length).
    pub fn predict_into(&self, seq: &[u32], out: &mut [f32], sem: Semantics, stack: &mut Vec<(u32, u32)>) {
        debug_assert_eq!(seq.len(), out.len());
        if self.root_token.is_empty() {
            out.fill(0.0);
            return;
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = match sem {
                Semantics::GreedyDeepest => self.greedy(seq, i),
                Semantics::AllPathsMax => self.all_paths(seq, i, stack),
            };
        }
    }

    pub fn predict(&self, seq: &[u32], sem: Semantics) -> Vec<f32> {
        let mut out = vec![0.0; seq.len()];
        self.predict_into(seq, &mut out, sem, &mut Vec::new());
        out
    }
}

/// Straightforward references over the un-compiled trie, for tests: recursion over the node
/// structure and linear scans, nothing shared with the compiled walk.
#[cfg(test)]
pub(crate) mod reference {
    use super::*;

    fn matching(g: &NeuronGraph, parent: NodeId, t: u32) -> Vec<NodeId> {
        g.node(parent).children.iter().copied().filter(|&c| g.node(c).token_ids.contains(&t)).collect()
    }
    fn ignore(g: &NeuronGraph, parent: NodeId) -> Option<NodeId> {
        g.node(parent).children.iter().copied().find(|&c| g.node(c).label.is_ignore())
    }

    pub fn greedy(g: &NeuronGraph, seq: &[u32]) -> Vec<f32> {
        (0..seq.len())
            .map(|i| {
                let Some(&r) = matching(g, ROOT, seq[i]).first() else { return 0.0 };
                let mut node = r;
                let mut best = g.node(r).end.unwrap_or(0.0);
                for j in (0..i).rev() {
                    node = match matching(g, node, seq[j]).first().copied().or_else(|| ignore(g, node)) {
                        Some(c) => c,
                        None => break,
                    };
                    if let Some(e) = g.node(node).end {
                        best = e;
                    }
                }
                best
            })
            .collect()
    }

    fn all_rec(g: &NeuronGraph, node: NodeId, seq: &[u32], j: usize, acc: &mut Vec<f32>) {
        if let Some(e) = g.node(node).end {
            acc.push(e);
        }
        if j == 0 {
            return;
        }
        let mut next = matching(g, node, seq[j - 1]);
        next.extend(ignore(g, node));
        for c in next {
            all_rec(g, c, seq, j - 1, acc);
        }
    }

    pub fn all_paths(g: &NeuronGraph, seq: &[u32]) -> Vec<f32> {
        (0..seq.len())
            .map(|i| {
                let mut acc = Vec::new();
                for r in matching(g, ROOT, seq[i]) {
                    all_rec(g, r, seq, i, &mut acc);
                }
                acc.into_iter().reduce(f32::max).unwrap_or(0.0)
            })
            .collect()
    }
}


/// Random graphs for property tests across modules.
#[cfg(test)]
pub(crate) mod tests_support {
    use crate::trie::tests::graph;
    use crate::trie::{Element, NeuronGraph};
    use proptest::prelude::*;

    /// Random graphs over a small vocabulary so that paths overlap and IGNOREs meet.
    pub fn arb_graph() -> impl Strategy<Value = NeuronGraph> {
        let label = 0u32..6;
        let elem = prop_oneof![1 => Just(None), 2 => label.clone().prop_map(Some)];
        let path = (label, prop::collection::vec(elem, 0..5), 0.0f32..1.0, 0.0f32..1.0);
        (prop::collection::vec(path, 0..12), any::<bool>()).prop_map(|(paths, overlap)| {
            let mut g = graph();
            // label k has ids {k, k+10}; with `overlap`, label 0 also claims id 1.
            let ids = |k: u32| if overlap && k == 0 { vec![0, 1, 10] } else { vec![k, k + 10] };
            for (a, ctxs, act, end) in paths {
                let c: Vec<Option<Element>> = ctxs
                    .iter()
                    .map(|e| e.map(|k| Element { label: format!("t{k}"), token_ids: ids(k), value: 0.5 + act / 2.0 }))
                    .collect();
                g.add_path(&Element { label: format!("t{a}"), token_ids: ids(a), value: act }, &c, end).unwrap();
            }
            g
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::tests_support::arb_graph;
    use crate::trie::tests::{ctx, graph, tok};
    use crate::trie::NeuronGraph;
    use proptest::prelude::*;

    /// Trie where the two semantics differ:
    ///   a(1)                         END 0.2
    ///   a <- b(2)                    END 0.3   (exact child taken greedily)
    ///   a <- IGNORE <- c(3)          END 0.9   (only all-paths explores IGNORE past b)
    fn differing() -> NeuronGraph {
        let mut g = graph();
        g.add_path(&tok("a", &[1], 1.0), &[], 0.2).unwrap();
        g.add_path(&tok("a", &[1], 1.0), &[ctx("b", &[2], 0.9)], 0.3).unwrap();
        g.add_path(&tok("a", &[1], 1.0), &[None, ctx("c", &[3], 0.9)], 0.9).unwrap();
        g.finalize().unwrap();
        g
    }

    #[test]
    fn semantics_differ_where_greedy_prefers_the_exact_child() {
        let g = differing();
        let ct = CompiledTrie::new(&g);
        let seq = [3, 2, 1, 7, 1];
        // pos 2: a, back b (exact, END .3), then 3: b has no child -> greedy .3; all-paths also
        // tries IGNORE then c -> .9. pos 4: a (END .2), back 7: IGNORE, back 1: no c -> .2.
        assert_eq!(ct.predict(&seq, Semantics::GreedyDeepest), vec![0.0, 0.0, 0.3, 0.0, 0.2]);
        assert_eq!(ct.predict(&seq, Semantics::AllPathsMax), vec![0.0, 0.0, 0.9, 0.0, 0.2]);
        assert_eq!(reference::greedy(&g, &seq), vec![0.0, 0.0, 0.3, 0.0, 0.2]);
        assert_eq!(reference::all_paths(&g, &seq), vec![0.0, 0.0, 0.9, 0.0, 0.2]);
    }

    #[test]
    fn greedy_returns_deepest_not_largest() {
        let mut g = graph();
        g.add_path(&tok("a", &[1], 1.0), &[], 0.9).unwrap();
        g.add_path(&tok("a", &[1], 1.0), &[ctx("b", &[2], 0.9)], 0.4).unwrap();
        g.finalize().unwrap();
        let ct = CompiledTrie::new(&g);
        assert_eq!(ct.predict(&[2, 1], Semantics::GreedyDeepest), vec![0.0, 0.4]);
        assert_eq!(ct.predict(&[2, 1], Semantics::AllPathsMax), vec![0.0, 0.9]);
    }

    #[test]
    fn overlapping_sibling_ids_first_for_greedy_all_for_all_paths() {
        let mut g = graph();
        g.add_path(&tok("x", &[1], 1.0), &[], 0.1).unwrap();
        g.add_path(&tok("y", &[1, 4], 1.0), &[ctx("q", &[5], 0.9)], 0.8).unwrap();
        g.finalize().unwrap();
        let ct = CompiledTrie::new(&g);
        assert_eq!(ct.predict(&[5, 1], Semantics::GreedyDeepest), vec![0.0, 0.1]);
        assert_eq!(ct.predict(&[5, 1], Semantics::AllPathsMax), vec![0.0, 0.8]);
    }

    #[test]
    fn semantics_parse() {
        assert_eq!("greedy_deepest".parse::<Semantics>().unwrap(), Semantics::GreedyDeepest);
        assert!("max".parse::<Semantics>().is_err());
    }

    proptest! {
        #[test]
        fn compiled_walk_equals_reference(g in arb_graph(), seq in prop::collection::vec(0u32..20, 0..24), finalize in any::<bool>()) {
            let mut g = g;
            if finalize { g.finalize().unwrap(); }
            let ct = CompiledTrie::new(&g);
            prop_assert_eq!(ct.predict(&seq, Semantics::GreedyDeepest), reference::greedy(&g, &seq));
            prop_assert_eq!(ct.predict(&seq, Semantics::AllPathsMax), reference::all_paths(&g, &seq));
        }

        #[test]
        fn finalize_is_a_fixed_point(g in arb_graph()) {
            let mut g = g;
            g.finalize().unwrap();
            let once = g.clone();
            let mut again = NeuronGraph::from_nodes(g.model.clone(), g.layer, g.neuron, g.hook.clone(), g.max_activation, g.nodes().to_vec(), false).unwrap();
            again.finalize().unwrap();
            prop_assert_eq!(again, once);
        }
    }
}
