//! The neuron trie (n2g-method.md sections 5 and 6).
//!
//! The root's children are *activating tokens*; below an activating node, each level is one
//! position further back in the text (nearest context first). A level holds either a *context
//! token* or an IGNORE element ("some token must stand here, any will do"). END is not a node of
//! its own here: a node that closes a path stores the END value (the normalised activation of the
//! activating token) in [`Node::end`]. "An END node" in the paper's wording is therefore a node
//! with `end.is_some()`.
//!
//! Nodes live in an arena (`Vec<Node>`, index 0 = the root) and every algorithm is iterative, so
//! a deep path cannot overflow the stack.

use crate::error::{invalid, Result};
use smallvec::SmallVec;
use smol_str::SmolStr;

/// Label of IGNORE nodes in exports (JSON, DOT). An IGNORE node is told apart by
/// [`Label::Ignore`], never by this string, so a real token spelled `<IGNORE>` stays distinct.
pub const IGNORE_LABEL: &str = "<IGNORE>";

/// Longest path accepted, in nodes (activating token + context elements after the trailing
/// IGNOREs are cut). Far above any window the pipeline uses (64 to 1024 tokens); it bounds the
/// nesting of the JSON export, whose parser recurses.
pub const MAX_PATH_NODES: usize = 2048;

/// The paper's firing threshold on normalised activations (n2g-method.md, section 2): a path
/// whose END is below it never predicts a fire. Such paths carry a neuron's graded level (its
/// correlation with the prediction); what a graph says the neuron fires on (search, similarity,
/// drawings) leaves them out.
pub const FIRING_THRESHOLD: f32 = 0.5;

/// [`NeuronGraph::finalize`] refuses a merge whose arena would pass this many nodes, or
/// [`FINALIZE_GROWTH`] times the nodes before, whichever is larger (real graphs have at most
/// tens of thousands of nodes, and the merge rarely adds more than a few times what it starts
/// from).
pub const FINALIZE_MIN_BUDGET: usize = 1_000_000;
pub const FINALIZE_GROWTH: usize = 8;

pub type NodeId = u32;
/// Token-id set of a node: inline up to 4 ids (a label rarely has more), so nodes need no
/// allocation of their own; graphs of a 46k-neuron store decode without millions of mallocs.
pub type Ids = SmallVec<[u32; 4]>;
/// Children of a node, inline up to 4.
pub type Children = SmallVec<[NodeId; 4]>;
pub const ROOT: NodeId = 0;

/// A node's key among its siblings. The derived order (every token before IGNORE, tokens by
/// label) is the order children are kept in, so exports and predictions are deterministic.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Label {
    /// Inline up to 23 bytes (nearly every token), so building and decoding tries does not
    /// allocate per label.
    Token(SmolStr),
    Ignore,
}

impl Label {
    /// The label as exported: the token's label, or `<IGNORE>`.
    pub fn as_str(&self) -> &str {
        match self {
            Label::Token(s) => s,
            Label::Ignore => IGNORE_LABEL,
        }
    }
    pub fn is_ignore(&self) -> bool {
        matches!(self, Label::Ignore)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub label: Label,
    /// Every vocabulary id whose normalised label is `label`; sorted, unique. Empty for IGNORE.
    pub token_ids: Ids,
    /// Activation for activating nodes (depth 0), importance for context nodes, 0 for IGNORE.
    /// The maximum of every value inserted at this node.
    pub value: f32,
    /// END value (max of those inserted) when a path closes at this node.
    pub end: Option<f32>,
    /// Sorted by `label`, labels unique.
    pub children: Children,
}

impl Node {
    pub(crate) fn new(label: Label, token_ids: Ids, value: f32, end: Option<f32>) -> Self {
        Node { label, token_ids, value, end, children: Children::new() }
    }
    /// The node the arena keeps at index 0.
    pub(crate) fn root() -> Self {
        Node::new(Label::Token(SmolStr::default()), Ids::new(), 0.0, None)
    }
}

/// One token of a path as given to [`NeuronGraph::add_path`]: its normalised label, every id
/// with that label, and its value (activation for the activating token, importance for context).
#[derive(Clone, Debug, PartialEq)]
pub struct Element {
    pub label: String,
    pub token_ids: Vec<u32>,
    pub value: f32,
}

/// One neuron's graph: metadata plus the trie.
#[derive(Clone, Debug, PartialEq)]
pub struct NeuronGraph {
    pub model: String,
    pub layer: u32,
    pub neuron: u32,
    pub hook: String,
    pub max_activation: f64,
    nodes: Vec<Node>,
    finalized: bool,
}

fn check_finite(what: &str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(invalid!("{what} must be a finite number, got {v}"))
    }
}

/// Sorted union of two sorted unique id lists.
fn union_sorted(a: &[u32], b: &[u32]) -> Ids {
    let mut out = Ids::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

pub(crate) fn sorted_unique(ids: &[u32]) -> Ids {
    let mut ids = Ids::from_slice(ids);
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn max_opt(a: Option<f32>, b: Option<f32>) -> Option<f32> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

impl NeuronGraph {
    pub fn new(model: String, layer: u32, neuron: u32, hook: String, max_activation: f64) -> Result<Self> {
        check_finite("max_activation", max_activation)?;
        Ok(NeuronGraph {
            model,
            layer,
            neuron,
            hook,
            max_activation,
            nodes: vec![Node::root()],
            finalized: true,
        })
    }

    /// Builds a graph from an arena produced by a decoder, after checking every invariant the
    /// rest of the crate relies on (see [`NeuronGraph::validate`]).
    pub(crate) fn from_nodes(
        model: String,
        layer: u32,
        neuron: u32,
        hook: String,
        max_activation: f64,
        nodes: Vec<Node>,
        finalized: bool,
    ) -> Result<Self> {
        check_finite("max_activation", max_activation)?;
        let g = Self::from_checked_nodes(model, layer, neuron, hook, max_activation, nodes, finalized);
        g.validate()?;
        Ok(g)
    }

    /// For decoders that checked every invariant of [`NeuronGraph::validate`] themselves.
    pub(crate) fn from_checked_nodes(
        model: String,
        layer: u32,
        neuron: u32,
        hook: String,
        max_activation: f64,
        nodes: Vec<Node>,
        finalized: bool,
    ) -> Self {
        NeuronGraph { model, layer, neuron, hook, max_activation, nodes, finalized }
    }

    pub fn key(&self) -> (u32, u32) {
        (self.layer, self.neuron)
    }
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }
    /// Activating nodes, sorted by label.
    pub fn roots(&self) -> &[NodeId] {
        &self.nodes[ROOT as usize].children
    }
    pub fn is_finalized(&self) -> bool {
        self.finalized
    }
    /// Nodes below the root, IGNORE nodes included.
    pub fn n_nodes(&self) -> usize {
        self.nodes.len() - 1
    }
    /// Number of END markers, i.e. distinct paths (a path ending where another passes through
    /// counts once per END).
    pub fn n_paths(&self) -> usize {
        self.nodes.iter().filter(|n| n.end.is_some()).count()
    }

    /// Labels of the activating tokens on paths that can fire ([`Self::can_fire`]), sorted: what
    /// the graph says the neuron fires on (search and similarity count the same).
    pub fn activating_labels(&self) -> Vec<String> {
        self.firing_nodes().0.iter().map(|&r| self.node(r).label.as_str().to_owned()).collect()
    }

    /// Distinct labels of the context tokens on paths that can fire (IGNORE excluded), sorted.
    pub fn context_labels(&self) -> Vec<String> {
        let mut out: Vec<&str> = self.firing_nodes().1.iter().filter_map(|&i| match &self.node(i).label {
            Label::Token(s) => Some(&**s),
            Label::Ignore => None,
        })
        .collect();
        out.sort_unstable();
        out.dedup();
        out.into_iter().map(str::to_owned).collect()
    }

    /// The nodes on paths that can fire: (activating nodes in label order, context and IGNORE
    /// nodes below them in id order).
    pub fn firing_nodes(&self) -> (Vec<NodeId>, Vec<NodeId>) {
        let mut fire = self.can_fire();
        let roots: Vec<NodeId> = self.roots().iter().copied().filter(|&r| fire[r as usize]).collect();
        for &r in self.roots() {
            fire[r as usize] = false; // what is left firing below the root is context
        }
        fire[ROOT as usize] = false;
        let context = (0..self.nodes.len() as NodeId).filter(|&i| fire[i as usize]).collect();
        (roots, context)
    }

    /// Per node id: whether a path through it can fire, i.e. an END >= [`FIRING_THRESHOLD`]
    /// at it or below it.
    pub fn can_fire(&self) -> Vec<bool> {
        let mut fire: Vec<bool> = self.nodes.iter().map(|n| n.end.is_some_and(|e| e >= FIRING_THRESHOLD)).collect();
        // post-order without recursion: children are resolved before their parent
        let mut stack: Vec<(NodeId, bool)> = vec![(ROOT, false)];
        while let Some((id, expanded)) = stack.pop() {
            let children = &self.nodes[id as usize].children;
            if expanded {
                if children.iter().any(|&c| fire[c as usize]) {
                    fire[id as usize] = true;
                }
            } else {
                stack.push((id, true));
                stack.extend(children.iter().map(|&c| (c, false)));
            }
        }
        fire
    }

    fn find_child(&self, parent: NodeId, label: &Label) -> std::result::Result<usize, usize> {
        self.nodes[parent as usize].children.binary_search_by(|&c| self.nodes[c as usize].label.cmp(label))
    }

    /// The child of `parent` with `label`, created if missing; values are folded in with max
    /// (value, end) and union (ids).
    fn upsert_child(&mut self, parent: NodeId, label: &Label, ids: &[u32], value: f32, end: Option<f32>) -> NodeId {
        match self.find_child(parent, label) {
            Ok(pos) => {
                let id = self.nodes[parent as usize].children[pos];
                let n = &mut self.nodes[id as usize];
                n.value = n.value.max(value);
                if !ids.is_empty() {
                    n.token_ids = union_sorted(&n.token_ids, ids);
                }
                n.end = max_opt(n.end, end);
                id
            }
            Err(pos) => {
                let id = self.nodes.len() as NodeId;
                self.nodes.push(Node::new(label.clone(), Ids::from_slice(ids), value, end));
                self.nodes[parent as usize].children.insert(pos, id);
                id
            }
        }
    }

    /// Inserts one path: `activating` (token i), then `context` backwards from token i-1
    /// (`None` = IGNORE). Trailing IGNOREs are cut; the END value goes on the last node kept.
    pub fn add_path(&mut self, activating: &Element, context: &[Option<Element>], end: f32) -> Result<()> {
        check_finite("activation of the activating token", activating.value as f64)?;
        check_finite("end", end as f64)?;
        let kept = context.iter().rposition(|e| e.is_some()).map_or(0, |p| p + 1);
        if kept + 1 > MAX_PATH_NODES {
            return Err(invalid!(
                "path too long: {} context elements after cutting trailing IGNOREs (at most {})",
                kept,
                MAX_PATH_NODES - 1
            ));
        }
        for (j, e) in context[..kept].iter().enumerate() {
            if let Some(e) = e {
                check_finite(&format!("importance of context element {j}"), e.value as f64)?;
            }
        }
        self.finalized = false;
        let ids = sorted_unique(&activating.token_ids);
        let mut cur = self.upsert_child(ROOT, &Label::Token(SmolStr::new(&activating.label)), &ids, activating.value, None);
        for e in &context[..kept] {
            cur = match e {
                Some(e) => {
                    let ids = sorted_unique(&e.token_ids);
                    self.upsert_child(cur, &Label::Token(SmolStr::new(&e.label)), &ids, e.value, None)
                }
                None => self.upsert_child(cur, &Label::Ignore, &[], 0.0, None),
            };
        }
        let n = &mut self.nodes[cur as usize];
        n.end = max_opt(n.end, Some(end));
        Ok(())
    }

    /// Merges `src`'s subtree into `dst_parent`'s children: same label -> same node, values and
    /// END folded with max, id sets unioned. Fails (leaving a partial merge) once the arena holds
    /// more than `budget` nodes.
    fn merge_subtree(&mut self, src: NodeId, dst_parent: NodeId, budget: usize) -> Result<()> {
        let mut stack = vec![(src, dst_parent)];
        while let Some((s, p)) = stack.pop() {
            let sn = &self.nodes[s as usize];
            let (label, ids, value, end) = (sn.label.clone(), sn.token_ids.clone(), sn.value, sn.end);
            let d = self.upsert_child(p, &label, &ids, value, end);
            if self.nodes.len() > budget {
                return Err(invalid!(
                    "finalizing this graph would need more than {budget} nodes: its IGNORE merges multiply paths \
                     (nested IGNORE siblings copy each other's subtrees); graphs of real neurons stay far smaller"
                ));
            }
            for i in 0..self.nodes[s as usize].children.len() {
                stack.push((self.nodes[s as usize].children[i], d));
            }
        }
        Ok(())
    }

    /// n2g-method.md section 5, as the reference code's `merge_ignores` does it, with values
    /// folded by max. Visiting nodes top-down (a node before its descendants), at every node N
    /// that has an IGNORE child G:
    /// 1. for each other child C of N, C's children (with their whole subtrees) are merged into
    ///    G's children (C's own END is not copied: G means "any token", C's END needs C);
    /// 2. each such C that holds no END is dropped (its sub-paths now live under G, and IGNORE
    ///    matches C's token too); C with an END is kept, subtree and all.
    ///
    /// Then the children of N (G included, with what was merged in) are visited in turn. The
    /// arena is compacted afterwards. The result is a fixed point (finalizing again changes
    /// nothing: property-tested), and a flag makes a repeated call free.
    ///
    /// Nested IGNORE siblings can multiply the trie exponentially (a few KB of JSON would need
    /// gigabytes), so the merge is refused once the arena exceeds [`FINALIZE_MIN_BUDGET`] nodes
    /// or [`FINALIZE_GROWTH`] times its size before; the graph is then left as it was.
    pub fn finalize(&mut self) -> Result<()> {
        if self.finalized {
            return Ok(());
        }
        let budget = FINALIZE_MIN_BUDGET.max(FINALIZE_GROWTH.saturating_mul(self.nodes.len()));
        // The merge works in place; a refused one is undone from this copy (compact moves nodes
        // instead of cloning them, which pays for it).
        let before = self.nodes.clone();
        if let Err(e) = self.merge_ignores(budget) {
            self.nodes = before;
            return Err(e);
        }
        drop(before);
        self.compact();
        self.finalized = true;
        Ok(())
    }

    fn merge_ignores(&mut self, budget: usize) -> Result<()> {
        let mut stack = vec![ROOT];
        while let Some(n) = stack.pop() {
            let children: Vec<NodeId> = self.nodes[n as usize].children.to_vec();
            if let Some(&g) = children.last().filter(|&&c| self.nodes[c as usize].label.is_ignore()) {
                for &c in &children[..children.len() - 1] {
                    for i in 0..self.nodes[c as usize].children.len() {
                        let cc = self.nodes[c as usize].children[i];
                        self.merge_subtree(cc, g, budget)?;
                    }
                }
                let nodes = &self.nodes;
                let mut kept: Children = children.iter().copied().collect();
                kept.retain(|c| *c == g || nodes[*c as usize].end.is_some());
                self.nodes[n as usize].children = kept;
            }
            stack.extend(self.nodes[n as usize].children.iter().copied());
        }
        Ok(())
    }

    /// Drops nodes no longer reachable from the root and renumbers breadth-first. Every
    /// reachable node has one parent, so nodes are moved out of the old arena, not cloned.
    fn compact(&mut self) {
        let mut old = std::mem::take(&mut self.nodes);
        let mut nodes = Vec::with_capacity(old.len());
        let mut take = |i: NodeId| {
            let mut node = std::mem::replace(&mut old[i as usize], Node::root());
            let children = std::mem::take(&mut node.children);
            (node, children)
        };
        let (root, root_children) = take(ROOT);
        nodes.push(root);
        let mut queue = std::collections::VecDeque::from([(root_children, ROOT)]);
        while let Some((children, n)) = queue.pop_front() {
            for c in children {
                let nc = nodes.len() as NodeId;
                let (node, grandchildren) = take(c);
                nodes.push(node);
                nodes[n as usize].children.push(nc);
                queue.push_back((grandchildren, nc));
            }
        }
        self.nodes = nodes;
    }

    /// Checks the invariants every decoder must establish: a tree rooted at 0 where every node
    /// is reached once; siblings sorted with unique labels; no IGNORE activating node; IGNORE
    /// nodes without ids or END; finite values; every leaf closes a path (holds an END); depth
    /// at most [`MAX_PATH_NODES`].
    pub(crate) fn validate(&self) -> Result<()> {
        let n = self.nodes.len();
        if n == 0 {
            return Err(invalid!("graph has no root node"));
        }
        let mut seen = vec![false; n];
        seen[0] = true;
        let mut stack: Vec<(NodeId, usize)> = vec![(ROOT, 0)];
        while let Some((id, depth)) = stack.pop() {
            let node = &self.nodes[id as usize];
            let name = |nid: NodeId| format!("node '{}' at depth {}", self.nodes[nid as usize].label.as_str(), depth);
            if id != ROOT {
                if !node.value.is_finite() || node.end.is_some_and(|e| !e.is_finite()) {
                    return Err(invalid!("{} has a non-finite value", name(id)));
                }
                if node.label.is_ignore() && (!node.token_ids.is_empty() || node.end.is_some()) {
                    return Err(invalid!("IGNORE {} must have no token ids and no END", name(id)));
                }
                if node.children.is_empty() && node.end.is_none() {
                    return Err(invalid!("{} is a leaf without END (every path must end with END)", name(id)));
                }
                if node.token_ids.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(invalid!("{} has unsorted or repeated token ids", name(id)));
                }
                if depth > MAX_PATH_NODES {
                    return Err(invalid!("path deeper than {} nodes", MAX_PATH_NODES));
                }
            }
            for (k, &c) in node.children.iter().enumerate() {
                let ci = c as usize;
                if ci >= n || seen[ci] {
                    return Err(invalid!("malformed trie: child index {c} out of range or shared"));
                }
                seen[ci] = true;
                if id == ROOT && self.nodes[ci].label.is_ignore() {
                    return Err(invalid!("an activating token cannot be IGNORE"));
                }
                if k > 0 && self.nodes[node.children[k - 1] as usize].label >= self.nodes[ci].label {
                    return Err(invalid!(
                        "children of {} are not sorted or repeat label '{}'",
                        if id == ROOT { "the root".to_owned() } else { name(id) },
                        self.nodes[ci].label.as_str()
                    ));
                }
                stack.push((c, depth + 1));
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(invalid!("malformed trie: node {i} is not reachable from the root"));
        }
        Ok(())
    }

    /// Depth of every node (root = -1 is stored as 0 here; activating = 1, ...): index = node id.
    /// Used by renderers; depth 1 = activating token.
    pub fn depths(&self) -> Vec<u32> {
        let mut d = vec![0u32; self.nodes.len()];
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            for &c in &self.nodes[id as usize].children {
                d[c as usize] = d[id as usize] + 1;
                stack.push(c);
            }
        }
        d
    }

    /// Every root-to-END path as node ids (activating first), in trie order. For tests and
    /// brute-force references.
    pub fn paths(&self) -> Vec<Vec<NodeId>> {
        let mut out = Vec::new();
        let mut stack: Vec<(NodeId, Vec<NodeId>)> = self.roots().iter().rev().map(|&r| (r, vec![r])).collect();
        while let Some((id, path)) = stack.pop() {
            let node = &self.nodes[id as usize];
            if node.end.is_some() {
                out.push(path.clone());
            }
            for &c in node.children.iter().rev() {
                let mut p = path.clone();
                p.push(c);
                stack.push((c, p));
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn tok(label: &str, ids: &[u32], value: f32) -> Element {
        Element { label: label.to_owned(), token_ids: ids.to_vec(), value }
    }
    pub fn ctx(label: &str, ids: &[u32], value: f32) -> Option<Element> {
        Some(tok(label, ids, value))
    }

    pub fn graph() -> NeuronGraph {
        NeuronGraph::new("m".into(), 1, 2, "blocks.1.mlp.hook_post".into(), 3.5).unwrap()
    }

    /// Labels of a path, for readable assertions.
    pub fn path_labels(g: &NeuronGraph) -> Vec<(String, Option<f32>)> {
        g.paths()
            .into_iter()
            .map(|p| {
                let s: Vec<&str> = p.iter().map(|&i| g.node(i).label.as_str()).collect();
                (s.join(" <- "), g.node(*p.last().unwrap()).end)
            })
            .collect()
    }

    #[test]
    fn insertion_keeps_max_values_and_unions_ids() {
        let mut g = graph();
        g.add_path(&tok("the", &[5], 0.6), &[ctx("of", &[7], 0.8)], 0.6).unwrap();
        g.add_path(&tok("the", &[9], 0.9), &[ctx("of", &[8], 0.7)], 0.9).unwrap();
        g.add_path(&tok("the", &[5], 0.7), &[ctx("of", &[7], 0.95)], 0.5).unwrap();
        assert_eq!(g.n_nodes(), 2);
        let r = g.node(g.roots()[0]);
        assert_eq!((r.token_ids.to_vec(), r.value), (vec![5, 9], 0.9));
        let c = g.node(r.children[0]);
        assert_eq!((c.token_ids.to_vec(), c.value, c.end), (vec![7, 8], 0.95, Some(0.9)));
    }

    #[test]
    fn trailing_ignores_are_cut_and_inner_ignores_kept() {
        let mut g = graph();
        g.add_path(&tok("a", &[1], 1.0), &[None, ctx("b", &[2], 0.9), None, None], 0.8).unwrap();
        assert_eq!(path_labels(&g), vec![("a <- <IGNORE> <- b".to_owned(), Some(0.8))]);
        g.add_path(&tok("a", &[1], 1.0), &[None, None], 0.7).unwrap();
        assert_eq!(g.node(g.roots()[0]).end, Some(0.7));
    }

    #[test]
    fn finalize_merges_siblings_under_ignore_and_drops_non_end_children() {
        // a <- x <- y (END .5);  a <- x (END .6) is NOT given; a <- z <- w (END .4);
        // a <- z (END .3);  a <- IGNORE <- y (END .9)
        let mut g = graph();
        g.add_path(&tok("a", &[1], 1.0), &[ctx("x", &[2], 0.8), ctx("y", &[3], 0.8)], 0.5).unwrap();
        g.add_path(&tok("a", &[1], 1.0), &[ctx("z", &[4], 0.8), ctx("w", &[5], 0.9)], 0.4).unwrap();
        g.add_path(&tok("a", &[1], 1.0), &[ctx("z", &[4], 0.8)], 0.3).unwrap();
        g.add_path(&tok("a", &[1], 1.0), &[None, ctx("y", &[6], 0.7)], 0.9).unwrap();
        g.finalize().unwrap();
        // x had no END: dropped, its sub-path y moved under IGNORE (y ids unioned, max END).
        // z has an END: kept with its subtree; its child w is copied under IGNORE too.
        assert_eq!(
            path_labels(&g),
            vec![
                ("a <- z".to_owned(), Some(0.3)),
                ("a <- z <- w".to_owned(), Some(0.4)),
                ("a <- <IGNORE> <- w".to_owned(), Some(0.4)),
                ("a <- <IGNORE> <- y".to_owned(), Some(0.9)),
            ]
        );
        let ig = g.node(g.node(g.roots()[0]).children[1]);
        let y = g.node(ig.children[1]);
        assert_eq!((y.token_ids.to_vec(), y.value), (vec![3, 6], 0.8));
        let before = g.clone();
        g.finalized = false;
        g.finalize().unwrap();
        assert_eq!(g, before, "finalize is a fixed point");
    }

    #[test]
    fn finalize_recurses_into_merged_content() {
        // Under IGNORE after the first merge: x' (no END) and IGNORE' siblings -> x' dropped.
        let mut g = graph();
        g.add_path(&tok("a", &[1], 1.0), &[ctx("c", &[2], 0.8), ctx("x", &[3], 0.8), ctx("y", &[4], 0.8)], 0.5).unwrap();
        g.add_path(&tok("a", &[1], 1.0), &[None, None, ctx("z", &[5], 0.8)], 0.6).unwrap();
        g.finalize().unwrap();
        assert_eq!(
            path_labels(&g),
            vec![("a <- <IGNORE> <- <IGNORE> <- y".to_owned(), Some(0.5)), ("a <- <IGNORE> <- <IGNORE> <- z".to_owned(), Some(0.6)),]
        );
    }

    #[test]
    fn finalize_refuses_exponential_growth_and_leaves_the_graph_unchanged() {
        // a <- x1 <- ... <- xn, each x_i with an END and an IGNORE sibling leading to y: the
        // merge would make about 3 * 2^n nodes.
        let build = |n: usize| {
            let mut g = graph();
            for i in 1..=n {
                let xs: Vec<Option<Element>> = (1..=i).map(|j| ctx(&format!("x{j}"), &[j as u32], 0.9)).collect();
                g.add_path(&tok("a", &[0], 1.0), &xs, 0.9).unwrap();
                let mut ys = xs[..i - 1].to_vec();
                ys.extend([None, ctx("y", &[999], 0.9)]);
                g.add_path(&tok("a", &[0], 1.0), &ys, 0.8).unwrap();
            }
            g
        };
        let mut small = build(8);
        small.finalize().unwrap();
        assert_eq!(small.n_nodes(), 3 * (1 << 8) - 2);
        let mut g = build(20);
        let before = g.clone();
        let err = g.finalize().unwrap_err().to_string();
        assert!(err.contains("more than 1000000 nodes"), "{err}");
        assert_eq!(g, before, "a refused finalize changes nothing");
    }

    #[test]
    fn labels_and_counts() {
        let mut g = graph();
        g.add_path(&tok("b", &[1], 1.0), &[ctx("x", &[2], 0.8), None, ctx("b", &[1], 0.8)], 0.5).unwrap();
        g.add_path(&tok("a", &[3], 1.0), &[ctx("x", &[2], 0.8)], 0.5).unwrap();
        assert_eq!(g.activating_labels(), vec!["a", "b"]);
        assert_eq!(g.context_labels(), vec!["b", "x"]);
        assert_eq!((g.n_nodes(), g.n_paths()), (6, 2));
    }

    #[test]
    fn rejects_non_finite_and_too_long() {
        let mut g = graph();
        assert!(g.add_path(&tok("a", &[1], f32::NAN), &[], 0.5).is_err());
        assert!(g.add_path(&tok("a", &[1], 1.0), &[], f32::INFINITY).is_err());
        let long: Vec<Option<Element>> = (0..MAX_PATH_NODES).map(|_| ctx("c", &[1], 0.9)).collect();
        assert!(g.add_path(&tok("a", &[1], 1.0), &long, 0.5).is_err());
        assert!(g.add_path(&tok("a", &[1], 1.0), &long[..MAX_PATH_NODES - 1], 0.5).is_ok());
        assert!(NeuronGraph::new("m".into(), 0, 0, "h".into(), f64::NAN).is_err());
    }
}
