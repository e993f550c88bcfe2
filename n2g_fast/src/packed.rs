//! The store's compact in-memory form of a graph (a whole model's graphs must fit in memory:
//! 458,752 for Llama-3.1-8B).
//!
//! A graph is one allocation of u32 words, its nodes breadth-first (index 0 = the root), so a
//! node's children are contiguous and one offset per node locates them:
//! ```text
//! sym[m] | value[m] (f32 bits) | end[m] (f32 bits, NaN = no END) | child_start[m + 1]
//! ```
//! (m = nodes + root; node i's children are `child_start[i]..child_start[i + 1]`). A node's
//! label and token-id set are one *symbol*, interned once per store in [`Symbols`]: across a
//! model's graphs the same few thousand (label, ids) pairs repeat. That is 16 bytes per node,
//! against about 88 for a [`NeuronGraph`] node.
//!
//! Prediction walks this form directly: each position's token is mapped once per call to the
//! one symbol holding it (nearly always one), and a step scans the node's contiguous child
//! symbols for it, so walks need no per-graph edge tables.

use crate::format::{RawGraph, RAW_IGNORE};
use crate::trie::{Ids, Label, NeuronGraph, Node, NodeId, FIRING_THRESHOLD, ROOT};
use rustc_hash::{FxBuildHasher, FxHashMap};
use smol_str::SmolStr;
use std::hash::BuildHasher;

/// Symbol of IGNORE nodes (and of the root, which is never matched).
pub const IGNORE_SYM: u32 = u32::MAX;
/// A position whose token no symbol holds: matches no child.
pub const NO_SYM: u32 = u32::MAX - 1;
/// A position whose token several symbols hold (sibling id sets overlap): the slow path.
pub const MULTI_SYM: u32 = u32::MAX - 2;
/// Placeholder while a blob is packed in parallel (see [`PackedGraph::pack_raw`]).
const UNRESOLVED: u32 = u32::MAX - 3;
const MAX_SYMS: usize = (u32::MAX - 4) as usize;
const NONE: u32 = u32::MAX;

/// Store-wide interned labels, (label, token ids) symbols and metadata strings. Entries are
/// never removed (a replaced graph's symbols stay; they are bounded by the vocabulary).
#[derive(Debug, Default)]
pub struct Symbols {
    labels: Vec<SmolStr>,
    label_by_hash: FxHashMap<u64, u32>,
    /// Next label with the same hash (NONE ends the chain).
    label_next: Vec<u32>,
    sym_label: Vec<u32>,
    /// Symbol s's ids are `ids[sym_ids_start[s]..sym_ids_start[s + 1]]`.
    sym_ids_start: Vec<u32>,
    ids: Vec<u32>,
    sym_by_hash: FxHashMap<u64, u32>,
    sym_next: Vec<u32>,
    /// Per label, its first symbol (NONE if none): nearly every node of a label has the same
    /// id set, so this answers most lookups without hashing.
    label_first_sym: Vec<u32>,
    /// Model and hook names.
    strings: Vec<Box<str>>,
    string_ids: FxHashMap<Box<str>, u32>,
}

impl Symbols {
    pub fn n_syms(&self) -> usize {
        self.sym_label.len()
    }
    pub fn label(&self, sym: u32) -> &SmolStr {
        &self.labels[self.sym_label[sym as usize] as usize]
    }
    pub fn ids(&self, sym: u32) -> &[u32] {
        &self.ids[self.sym_ids_start[sym as usize] as usize..self.sym_ids_start[sym as usize + 1] as usize]
    }
    pub fn n_labels(&self) -> usize {
        self.labels.len()
    }
    pub fn n_strings(&self) -> usize {
        self.strings.len()
    }
    pub fn sym_label(&self, sym: u32) -> u32 {
        self.sym_label[sym as usize]
    }
    pub fn label_str(&self, label: u32) -> &str {
        &self.labels[label as usize]
    }
    pub fn string(&self, i: u32) -> &str {
        &self.strings[i as usize]
    }

    pub fn find_string(&self, s: &str) -> Option<u32> {
        self.string_ids.get(s).copied()
    }

    pub fn find_label(&self, s: &str) -> Option<u32> {
        let mut at = self.label_by_hash.get(&FxBuildHasher.hash_one(s)).copied().unwrap_or(NONE);
        while at != NONE {
            if self.labels[at as usize] == s {
                return Some(at);
            }
            at = self.label_next[at as usize];
        }
        None
    }

    #[inline]
    pub fn find_sym(&self, label: u32, ids: &[u32]) -> Option<u32> {
        let first = self.label_first_sym[label as usize];
        if first != NONE && self.ids(first) == ids {
            return Some(first);
        }
        let mut at = self.sym_by_hash.get(&FxBuildHasher.hash_one((label, ids))).copied().unwrap_or(NONE);
        while at != NONE {
            if self.sym_label[at as usize] == label && self.ids(at) == ids {
                return Some(at);
            }
            at = self.sym_next[at as usize];
        }
        None
    }

    pub fn intern_string(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.string_ids.get(s) {
            return i;
        }
        let i = self.strings.len() as u32;
        self.strings.push(s.into());
        self.string_ids.insert(s.into(), i);
        i
    }

    pub fn intern_label(&mut self, s: &str) -> u32 {
        if let Some(l) = self.find_label(s) {
            return l;
        }
        let h = FxBuildHasher.hash_one(s);
        let head = self.label_by_hash.get(&h).copied().unwrap_or(NONE);
        let id = self.labels.len() as u32;
        self.labels.push(SmolStr::new(s));
        self.label_next.push(head);
        self.label_first_sym.push(NONE);
        self.label_by_hash.insert(h, id);
        id
    }

    /// The symbol of (label id, sorted unique ids).
    pub fn intern_sym(&mut self, label: u32, ids: &[u32]) -> u32 {
        if let Some(s) = self.find_sym(label, ids) {
            return s;
        }
        let h = FxBuildHasher.hash_one((label, ids));
        let head = self.sym_by_hash.get(&h).copied().unwrap_or(NONE);
        assert!(self.sym_label.len() < MAX_SYMS, "more than {MAX_SYMS} distinct (label, ids) symbols in one store");
        if self.sym_ids_start.is_empty() {
            self.sym_ids_start.push(0);
        }
        let id = self.sym_label.len() as u32;
        self.sym_label.push(label);
        self.ids.extend_from_slice(ids);
        self.sym_ids_start.push(self.ids.len() as u32);
        self.sym_next.push(head);
        self.sym_by_hash.insert(h, id);
        if self.label_first_sym[label as usize] == NONE {
            self.label_first_sym[label as usize] = id;
        }
        id
    }

    /// Heap bytes held (capacities; hash maps estimated at their entry size).
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let heap_labels: usize = self.labels.iter().filter(|l| l.is_heap_allocated()).map(|l| l.len()).sum();
        self.labels.capacity() * size_of::<SmolStr>()
            + heap_labels
            + (self.label_by_hash.capacity() + self.sym_by_hash.capacity()) * (size_of::<(u64, u32)>() + 1)
            + (self.label_next.capacity() + self.label_first_sym.capacity() + self.sym_label.capacity() + self.sym_ids_start.capacity() + self.ids.capacity() + self.sym_next.capacity()) * 4
            + self.strings.iter().map(|s| 2 * s.len()).sum::<usize>()
            + (self.strings.capacity() + self.string_ids.capacity() * 2) * size_of::<Box<str>>()
    }

    /// token id -> symbols holding it, for prediction.
    pub fn token_index(&self) -> TokenSyms {
        let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(self.ids.len());
        for s in 0..self.n_syms() as u32 {
            pairs.extend(self.ids(s).iter().map(|&t| (t, s)));
        }
        pairs.sort_unstable();
        let max = pairs.last().map_or(0, |p| p.0);
        let mut ts = TokenSyms { tokens: Vec::new(), start: Vec::new(), syms: pairs.iter().map(|p| p.1).collect(), dense: Vec::new() };
        if max < DENSE_LIMIT {
            ts.dense = vec![0u32; max as usize + 2];
            for p in &pairs {
                ts.dense[p.0 as usize + 1] += 1;
            }
            for i in 0..ts.dense.len() - 1 {
                ts.dense[i + 1] += ts.dense[i];
            }
        } else {
            ts.start.push(0);
            for (i, p) in pairs.iter().enumerate() {
                if i + 1 == pairs.len() || pairs[i + 1].0 != p.0 {
                    ts.tokens.push(p.0);
                    ts.start.push(i as u32 + 1);
                }
            }
        }
        ts
    }
}

const DENSE_LIMIT: u32 = 1 << 22;

/// token id -> sorted symbols holding it: a dense offsets array for ids below `DENSE_LIMIT`,
/// else binary search.
#[derive(Debug, Default)]
pub struct TokenSyms {
    tokens: Vec<u32>,
    start: Vec<u32>,
    syms: Vec<u32>,
    dense: Vec<u32>,
}

impl TokenSyms {
    #[inline]
    pub fn get(&self, t: u32) -> &[u32] {
        let (lo, hi) = if !self.dense.is_empty() {
            let t = t as usize;
            if t + 1 >= self.dense.len() {
                return &[];
            }
            (self.dense[t], self.dense[t + 1])
        } else {
            match self.tokens.binary_search(&t) {
                Ok(k) => (self.start[k], self.start[k + 1]),
                Err(_) => return &[],
            }
        };
        &self.syms[lo as usize..hi as usize]
    }

    /// What a walk compares child symbols with at a position holding token `t`.
    #[inline]
    pub fn key(&self, t: u32) -> u32 {
        match self.get(t) {
            [] => NO_SYM,
            [s] => *s,
            _ => MULTI_SYM,
        }
    }
}

/// One graph of the store (always finalized).
#[derive(Debug, Clone)]
pub struct PackedGraph {
    words: Box<[u32]>,
    pub max_activation: f64,
    pub model: u32,
    pub hook: u32,
}

/// Borrowed arrays of a [`PackedGraph`], for walks.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub sym: &'a [u32],
    pub value: &'a [u32],
    pub end: &'a [u32],
    pub child_start: &'a [u32],
}

impl View<'_> {
    #[inline]
    pub fn children(&self, i: u32) -> std::ops::Range<u32> {
        self.child_start[i as usize]..self.child_start[i as usize + 1]
    }
    #[inline]
    pub fn end(&self, i: u32) -> f32 {
        f32::from_bits(self.end[i as usize])
    }
    /// Activating nodes.
    pub fn roots(&self) -> std::ops::Range<u32> {
        self.children(ROOT)
    }
    /// Per node: whether a path through it can fire, as [`NeuronGraph::can_fire`]. Breadth-first
    /// order puts children after their parent, so one backward sweep resolves them first.
    pub fn can_fire(&self) -> Vec<bool> {
        let mut fire: Vec<bool> = (0..self.sym.len() as u32).map(|i| self.end(i) >= FIRING_THRESHOLD).collect();
        for i in (0..self.sym.len() as u32).rev() {
            if !fire[i as usize] && self.children(i).any(|c| fire[c as usize]) {
                fire[i as usize] = true;
            }
        }
        fire
    }
}

impl PackedGraph {
    fn from_parts(sym: &[u32], value: &[f32], end: &[Option<f32>], child_start: &[u32], max_activation: f64, model: u32, hook: u32) -> Self {
        let m = sym.len();
        let mut words = Vec::with_capacity(4 * m + 1);
        words.extend_from_slice(sym);
        words.extend(value.iter().map(|v| v.to_bits()));
        words.extend(end.iter().map(|e| e.unwrap_or(f32::NAN).to_bits()));
        words.extend_from_slice(child_start);
        PackedGraph { words: words.into_boxed_slice(), max_activation, model, hook }
    }

    /// Packs a finalized graph (its arena is then breadth-first, but the order is recomputed).
    pub fn pack(g: &NeuronGraph, syms: &mut Symbols) -> Self {
        debug_assert!(g.is_finalized());
        let mut order: Vec<NodeId> = Vec::with_capacity(g.nodes().len());
        order.push(ROOT);
        let mut head = 0;
        while head < order.len() {
            order.extend_from_slice(&g.node(order[head]).children);
            head += 1;
        }
        let m = order.len();
        let (mut sym, mut value, mut end, mut child_start) = (Vec::with_capacity(m), Vec::with_capacity(m), Vec::with_capacity(m), Vec::with_capacity(m + 1));
        let mut next = 1u32;
        for (i, &id) in order.iter().enumerate() {
            let n = g.node(id);
            sym.push(match &n.label {
                _ if i == 0 => IGNORE_SYM,
                Label::Ignore => IGNORE_SYM,
                Label::Token(s) => {
                    let l = syms.intern_label(s);
                    syms.intern_sym(l, &n.token_ids)
                }
            });
            value.push(n.value);
            end.push(n.end);
            child_start.push(next);
            next += n.children.len() as u32;
        }
        child_start.push(next);
        let (model, hook) = (syms.intern_string(&g.model), syms.intern_string(&g.hook));
        Self::from_parts(&sym, &value, &end, &child_start, g.max_activation, model, hook)
    }

    /// Packs a decoded, finalized blob (its nodes are then breadth-first) with read-only
    /// symbols, so blobs can be packed in parallel: labels, symbols and strings not interned
    /// yet are left as `UNRESOLVED` (in `label_map`, the node symbols and model/hook) for
    /// [`PackedGraph::resolve`]. Returns whether anything is left.
    pub(crate) fn pack_raw(raw: &RawGraph, syms: &Symbols, label_map: &mut Vec<u32>) -> (Self, bool) {
        debug_assert!(raw.finalized);
        label_map.clear();
        label_map.extend(raw.labels.iter().map(|l| syms.find_label(l).unwrap_or(UNRESOLVED)));
        let m = raw.nodes.len();
        let mut words = Vec::with_capacity(4 * m + 1);
        words.push(IGNORE_SYM);
        let mut missing = false;
        words.extend(raw.nodes[1..].iter().map(|n| {
            if n.label == RAW_IGNORE {
                return IGNORE_SYM;
            }
            let l = label_map[n.label as usize];
            let s = if l == UNRESOLVED { None } else { syms.find_sym(l, raw.ids_of(n)) };
            missing |= s.is_none();
            s.unwrap_or(UNRESOLVED)
        }));
        words.extend(raw.nodes.iter().map(|n| n.value.to_bits()));
        words.extend(raw.nodes.iter().map(|n| n.end.unwrap_or(f32::NAN).to_bits()));
        let mut next = 1u32;
        for n in &raw.nodes {
            words.push(next);
            next += n.n_children;
        }
        words.push(next);
        let model = syms.find_string(raw.model).unwrap_or(UNRESOLVED);
        let hook = syms.find_string(raw.hook).unwrap_or(UNRESOLVED);
        missing |= model == UNRESOLVED || hook == UNRESOLVED;
        (PackedGraph { words: words.into_boxed_slice(), max_activation: raw.max_activation, model, hook }, missing)
    }

    /// Interns what [`PackedGraph::pack_raw`] left unresolved (`label_map` as it left it).
    pub(crate) fn resolve(&mut self, raw: &RawGraph, syms: &mut Symbols, label_map: &mut [u32]) {
        if self.model == UNRESOLVED {
            self.model = syms.intern_string(raw.model);
        }
        if self.hook == UNRESOLVED {
            self.hook = syms.intern_string(raw.hook);
        }
        for (i, n) in raw.nodes.iter().enumerate().skip(1) {
            if self.words[i] == UNRESOLVED {
                let l = &mut label_map[n.label as usize];
                if *l == UNRESOLVED {
                    *l = syms.intern_label(raw.labels[n.label as usize]);
                }
                self.words[i] = syms.intern_sym(*l, raw.ids_of(n));
            }
        }
    }

    /// From words already checked (see `store`'s file reader).
    pub(crate) fn from_words(words: Box<[u32]>, max_activation: f64, model: u32, hook: u32) -> Self {
        debug_assert!(words.len() % 4 == 1);
        PackedGraph { words, max_activation, model, hook }
    }

    pub fn words(&self) -> &[u32] {
        &self.words
    }

    /// Nodes, the root included.
    pub fn n_nodes(&self) -> usize {
        (self.words.len() - 1) / 4
    }

    pub fn view(&self) -> View<'_> {
        let m = self.n_nodes();
        let (sym, rest) = self.words.split_at(m);
        let (value, rest) = rest.split_at(m);
        let (end, child_start) = rest.split_at(m);
        View { sym, value, end, child_start }
    }

    /// Heap bytes of the node words.
    pub fn heap_bytes(&self) -> usize {
        self.words.len() * 4
    }

    /// The graph as a [`NeuronGraph`] (equal to the one packed).
    pub fn unpack(&self, key: (u32, u32), syms: &Symbols) -> NeuronGraph {
        let v = self.view();
        let nodes: Vec<Node> = (0..self.n_nodes() as u32)
            .map(|i| {
                let mut n = if i == ROOT {
                    Node::root()
                } else {
                    let s = v.sym[i as usize];
                    let (label, ids) = if s == IGNORE_SYM { (Label::Ignore, Ids::new()) } else { (Label::Token(syms.label(s).clone()), Ids::from_slice(syms.ids(s))) };
                    let e = v.end(i);
                    Node::new(label, ids, f32::from_bits(v.value[i as usize]), (!e.is_nan()).then_some(e))
                };
                n.children = v.children(i).collect();
                n
            })
            .collect();
        let g = NeuronGraph::from_checked_nodes(syms.string(self.model).to_owned(), key.0, key.1, syms.string(self.hook).to_owned(), self.max_activation, nodes, true);
        debug_assert!(g.validate().is_ok());
        g
    }
}

/// The walks of `predict` (n2g-method.md section 6) over a packed graph. `keys[j]` is
/// [`TokenSyms::key`] of `seq[j]`.
pub struct Walker<'a> {
    pub tokens: &'a TokenSyms,
}

impl Walker<'_> {
    /// Whether child symbol `s` holds the token at a position (key `k`, token `t`).
    #[inline]
    fn holds(&self, s: u32, k: u32, t: u32) -> bool {
        if k != MULTI_SYM {
            s == k
        } else {
            s != IGNORE_SYM && self.tokens.get(t).binary_search(&s).is_ok()
        }
    }

    /// Greedy walk for position i from activating node `root`: the exact child first (the
    /// first in label order), else IGNORE, else stop; the deepest END's value.
    pub fn greedy_from(&self, g: &View, root: u32, seq: &[u32], keys: &[u32], i: usize) -> f32 {
        let mut node = root;
        let mut best = 0.0;
        let mut j = i;
        loop {
            let e = g.end(node);
            if !e.is_nan() {
                best = e;
            }
            if j == 0 {
                return best;
            }
            j -= 1;
            let r = g.children(node);
            if r.is_empty() {
                return best;
            }
            let kids = &g.sym[r.start as usize..r.end as usize];
            let (k, t) = (keys[j], seq[j]);
            let hit = if k != MULTI_SYM { kids.iter().position(|&s| s == k) } else { kids.iter().position(|&s| self.holds(s, k, t)) };
            node = match hit {
                Some(p) => r.start + p as u32,
                None if kids[kids.len() - 1] == IGNORE_SYM => r.end - 1,
                None => return best,
            };
        }
    }

    /// Every matching path for position i from the activating nodes `roots`, taking at each
    /// step every exact child and the IGNORE child; the max END value, 0 if none.
    pub fn all_paths_from(&self, g: &View, roots: &[u32], seq: &[u32], keys: &[u32], i: usize, stack: &mut Vec<(u32, u32)>) -> f32 {
        if roots.is_empty() {
            return 0.0;
        }
        stack.clear();
        stack.extend(roots.iter().map(|&r| (r, i as u32)));
        let mut best = f32::NEG_INFINITY;
        while let Some((node, j)) = stack.pop() {
            let e = g.end(node);
            if !e.is_nan() && e > best {
                best = e;
            }
            if j == 0 {
                continue;
            }
            let j = j - 1;
            let r = g.children(node);
            let (k, t) = (keys[j as usize], seq[j as usize]);
            for c in r {
                let s = g.sym[c as usize];
                if s == IGNORE_SYM || self.holds(s, k, t) {
                    stack.push((c, j));
                }
            }
        }
        if best == f32::NEG_INFINITY {
            0.0
        } else {
            best
        }
    }
}
