//! Serialised forms of a graph: the `n2g.graph/v1` JSON document (for people and other tools)
//! and the versioned, checksummed binary form the workspace and the store file use.
//!
//! JSON document:
//! `{"schema": "n2g.graph/v1", "model", "layer", "neuron", "hook", "max_activation", "roots"}`,
//! node = `{"label", "token_ids", "ignore", "importance", "activation", "end", "children"}`.
//! Roots are the activating tokens (`activation` = number, `importance` = 1.0); context nodes
//! have `activation` = null; IGNORE nodes are `{"label": "<IGNORE>", "token_ids": [],
//! "ignore": true, ...}`. Children are sorted (tokens by label, IGNORE last), so the output is
//! deterministic. On import a root's `importance` is not used (a root's value is its
//! activation), children may come in any order, token ids are sorted and deduplicated, and
//! `"ignore": true` alone makes a node IGNORE: its label may be anything (other tools write their
//! own) and is read as `<IGNORE>`; an IGNORE node still may not carry token ids or an END, nor be
//! a root. Reading re-applies the IGNORE merge (the trie is finalized), so a graph read back is
//! in canonical form: writing it again may differ from the document read (merged paths, the
//! `<IGNORE>` label), and equals what this crate would have written for the same graph.
//!
//! Binary graph (all integers little-endian):
//! ```text
//! header  magic "N2GG" | version u16 = 1 | flags u16 (bit 0: finalized) | body_len u32 | crc u32
//!         (crc = CRC-32 of the 12 header bytes before it followed by the body)
//! body    model str | layer varint | neuron varint | hook str | max_activation f64
//!         n_labels varint | labels str*          (string table)
//!         n_nodes varint | n_roots varint
//!         nodes, breadth-first (the arena order), each:
//!           kind u8 (bit 0 IGNORE, bit 1 has END) | label index varint (not for IGNORE)
//!           value f32 | end f32 (if END) | n_ids varint | ids (first, then gap-1) varint*
//!           n_children varint
//! str     = varint byte length + UTF-8
//! ```
//! Breadth-first order with child counts rebuilds the exact arena, so a round trip is exact.

use crate::error::{corrupt, invalid, N2GError, Result};
use crate::trie::{sorted_unique, Children, Ids, Label, NeuronGraph, Node, NodeId, MAX_PATH_NODES, ROOT};
use smol_str::SmolStr;
use serde::Deserialize;
use std::collections::HashMap;

pub const GRAPH_SCHEMA: &str = "n2g.graph/v1";
pub const GRAPH_MAGIC: &[u8; 4] = b"N2GG";
pub const GRAPH_FORMAT_VERSION: u16 = 1;
const GRAPH_HEADER_LEN: usize = 16;
const FLAG_FINALIZED: u16 = 1;

// ---------------------------------------------------------------------------------------------
// JSON

fn json_value<T: serde::Serialize + ?Sized>(out: &mut String, v: &T) {
    // Serialising a str or a finite float cannot fail.
    out.push_str(&serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned()));
}

/// The `n2g.graph/v1` document, written iteratively (no recursion on depth).
pub fn graph_to_json(g: &NeuronGraph) -> String {
    let mut out = String::with_capacity(256 + 96 * g.n_nodes());
    out.push_str("{\"schema\":");
    json_value(&mut out, GRAPH_SCHEMA);
    out.push_str(",\"model\":");
    json_value(&mut out, &g.model);
    out.push_str(&format!(",\"layer\":{},\"neuron\":{},\"hook\":", g.layer, g.neuron));
    json_value(&mut out, &g.hook);
    out.push_str(",\"max_activation\":");
    json_value(&mut out, &g.max_activation);
    out.push_str(",\"roots\":[");
    // Stack of (node, is_root, index among siblings); `None` closes a node.
    let mut stack: Vec<Option<(NodeId, bool, usize)>> = g.roots().iter().enumerate().rev().map(|(i, &r)| Some((r, true, i))).collect();
    while let Some(item) = stack.pop() {
        let Some((id, is_root, idx)) = item else {
            out.push_str("]}");
            continue;
        };
        if idx > 0 {
            out.push(',');
        }
        let n = g.node(id);
        out.push_str("{\"label\":");
        json_value(&mut out, n.label.as_str());
        out.push_str(",\"token_ids\":");
        json_value(&mut out, n.token_ids.as_slice());
        out.push_str(&format!(",\"ignore\":{},\"importance\":", n.label.is_ignore()));
        json_value(&mut out, &if is_root { 1.0 } else { n.value });
        out.push_str(",\"activation\":");
        json_value(&mut out, &if is_root { Some(n.value) } else { None });
        out.push_str(",\"end\":");
        json_value(&mut out, &n.end);
        out.push_str(",\"children\":[");
        stack.push(None);
        stack.extend(n.children.iter().enumerate().rev().map(|(i, &c)| Some((c, false, i))));
    }
    out.push_str("]}");
    out
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GraphDoc {
    schema: String,
    model: String,
    layer: u32,
    neuron: u32,
    hook: String,
    max_activation: f64,
    roots: Vec<NodeDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeDoc {
    label: String,
    token_ids: Vec<u32>,
    ignore: bool,
    importance: f32,
    activation: Option<f32>,
    end: Option<f32>,
    children: Vec<NodeDoc>,
}

/// Iterative, so a deep document refused after parsing (or half parsed) is not dropped by a
/// recursion as deep as the document, which overflows small thread stacks.
impl Drop for NodeDoc {
    fn drop(&mut self) {
        let mut stack = std::mem::take(&mut self.children);
        while let Some(mut d) = stack.pop() {
            stack.append(&mut d.children);
        }
    }
}

/// Deepest `[`/`{` nesting of a JSON text (strings skipped). Checked before parsing because the
/// parser recurses once per level.
fn json_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in text.as_bytes() {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Parses and validates an `n2g.graph/v1` document; the result is finalized (see the module
/// doc: IGNORE nodes may carry any label).
pub fn graph_from_json(text: &str) -> Result<NeuronGraph> {
    // graph object + roots array + 2 levels per node.
    let limit = 2 + 2 * MAX_PATH_NODES;
    if json_depth(text) > limit {
        return Err(corrupt!("graph JSON nests deeper than {limit} levels (paths are limited to {MAX_PATH_NODES} nodes)"));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    // The parser recurses per nesting level; serde_stacker grows the stack on demand so a deep
    // (but bounded, see above) document is safe on any thread.
    de.disable_recursion_limit();
    let doc = GraphDoc::deserialize(serde_stacker::Deserializer::new(&mut de))
        .and_then(|d| de.end().map(|_| d))
        .map_err(|e| corrupt!("invalid graph JSON: {e}"))?;
    if doc.schema != GRAPH_SCHEMA {
        return Err(corrupt!("graph JSON has schema '{}', expected '{GRAPH_SCHEMA}'", doc.schema));
    }
    let mut nodes = vec![Node::root()];
    // (doc, parent, path for messages); children docs are moved out so dropping stays shallow.
    let mut stack: Vec<(NodeDoc, NodeId, String)> = Vec::new();
    for (i, r) in doc.roots.into_iter().enumerate().rev() {
        stack.push((r, ROOT, format!("roots[{i}]")));
    }
    while let Some((mut d, parent, path)) = stack.pop() {
        let is_root = parent == ROOT;
        let bad = |msg: &str| corrupt!("graph JSON {path} ('{}'): {msg}", d.label);
        let label = if d.ignore {
            if is_root {
                return Err(bad("an activating token (root) cannot be IGNORE"));
            }
            // The schema marks IGNORE by the flag, not the label: any label is read as <IGNORE>.
            if !d.token_ids.is_empty() || d.end.is_some() {
                return Err(bad("an IGNORE node (\"ignore\": true) must have no token_ids and end null"));
            }
            Label::Ignore
        } else {
            Label::Token(SmolStr::new(&d.label))
        };
        let value = if is_root {
            d.activation.ok_or_else(|| bad("an activating token (root) needs a numeric activation"))?
        } else {
            if d.activation.is_some() {
                return Err(bad("a context node must have activation null"));
            }
            d.importance
        };
        let id = nodes.len() as NodeId;
        nodes.push(Node::new(label, sorted_unique(&d.token_ids), value, d.end));
        nodes[parent as usize].children.push(id);
        for (i, c) in std::mem::take(&mut d.children).into_iter().enumerate().rev() {
            stack.push((c, id, format!("{path}.children[{i}]")));
        }
    }
    // Children may come in any order: sort them the trie's way, then let validation catch
    // repeated labels and the rest.
    for i in 0..nodes.len() {
        let mut ch: Children = std::mem::take(&mut nodes[i].children);
        ch.sort_by(|&a, &b| nodes[a as usize].label.cmp(&nodes[b as usize].label));
        nodes[i].children = ch;
    }
    let mut g = NeuronGraph::from_nodes(doc.model, doc.layer, doc.neuron, doc.hook, doc.max_activation, nodes, false)
        .map_err(|e| corrupt!("invalid graph JSON: {e}"))?;
    g.finalize().map_err(|e| corrupt!("invalid graph JSON: {e}"))?;
    Ok(g)
}

// ---------------------------------------------------------------------------------------------
// Binary

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Bounds-checked reader; every error names what was being read.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }
    #[cold]
    #[inline(never)]
    fn truncated(&self, field: &str) -> N2GError {
        corrupt!("{} is truncated or corrupt: cannot read {field} at byte {}", self.what, self.pos)
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    #[inline]
    pub(crate) fn bytes(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(self.truncated(field));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    #[inline]
    pub(crate) fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, field)?);
        Ok(a)
    }
    #[inline]
    pub(crate) fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }
    #[inline]
    pub(crate) fn u16(&mut self, field: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    #[inline]
    pub(crate) fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    #[inline]
    pub(crate) fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    #[inline]
    fn f32(&mut self, field: &str) -> Result<f32> {
        Ok(f32::from_le_bytes(self.array(field)?))
    }
    #[inline]
    fn f64(&mut self, field: &str) -> Result<f64> {
        Ok(f64::from_le_bytes(self.array(field)?))
    }
    #[inline]
    fn varint(&mut self, field: &str) -> Result<u64> {
        // Fast path: most counts, indices and ids gaps fit one byte.
        if let Some(&b) = self.buf.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(b as u64);
            }
        }
        self.varint_slow(field)
    }
    #[inline(never)]
    fn varint_slow(&mut self, field: &str) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8(field)?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                if shift == 63 && b > 1 {
                    break;
                }
                return Ok(v);
            }
        }
        Err(corrupt!("{} is corrupt: bad varint for {field} at byte {}", self.what, self.pos))
    }
    #[inline]
    fn varint_u32(&mut self, field: &str) -> Result<u32> {
        let v = self.varint(field)?;
        u32::try_from(v).map_err(|_| corrupt!("{} is corrupt: {field} = {v} out of range", self.what))
    }
    /// A count of items that each take at least one byte, so it cannot exceed what is left
    /// (keeps a corrupt count from allocating gigabytes).
    #[inline]
    fn count(&mut self, field: &str) -> Result<usize> {
        let v = self.varint(field)?;
        if v > self.remaining() as u64 {
            return Err(corrupt!("{} is corrupt: {field} = {v} exceeds the data left", self.what));
        }
        Ok(v as usize)
    }
    #[inline]
    fn str(&mut self, field: &str) -> Result<&'a str> {
        let n = self.count(field)?;
        let b = self.bytes(n, field)?;
        std::str::from_utf8(b).map_err(|_| corrupt!("{} is corrupt: {field} is not UTF-8", self.what))
    }
}

/// The binary form (see the module docs).
pub fn graph_to_bytes(g: &NeuronGraph) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + 24 * g.n_nodes());
    put_str(&mut body, &g.model);
    put_varint(&mut body, g.layer as u64);
    put_varint(&mut body, g.neuron as u64);
    put_str(&mut body, &g.hook);
    body.extend_from_slice(&g.max_activation.to_le_bytes());
    // Nodes breadth-first from the root; the arena is already in that order after finalize
    // but may not be before, so the order is recomputed.
    let mut order = Vec::with_capacity(g.n_nodes());
    order.extend_from_slice(g.roots());
    let mut head = 0;
    while head < order.len() {
        order.extend_from_slice(&g.node(order[head]).children);
        head += 1;
    }
    let mut table: HashMap<&str, u32> = HashMap::new();
    let mut labels: Vec<&str> = Vec::new();
    for &id in &order {
        if let Label::Token(s) = &g.node(id).label {
            table.entry(s).or_insert_with(|| {
                labels.push(s);
                labels.len() as u32 - 1
            });
        }
    }
    put_varint(&mut body, labels.len() as u64);
    for l in &labels {
        put_str(&mut body, l);
    }
    put_varint(&mut body, order.len() as u64);
    put_varint(&mut body, g.roots().len() as u64);
    for &id in &order {
        let n = g.node(id);
        let kind = n.label.is_ignore() as u8 | ((n.end.is_some() as u8) << 1);
        body.push(kind);
        if let Label::Token(s) = &n.label {
            put_varint(&mut body, table[&**s] as u64);
        }
        body.extend_from_slice(&n.value.to_le_bytes());
        if let Some(e) = n.end {
            body.extend_from_slice(&e.to_le_bytes());
        }
        put_varint(&mut body, n.token_ids.len() as u64);
        let mut prev: Option<u32> = None;
        for &t in &n.token_ids {
            put_varint(&mut body, prev.map_or(t as u64, |p| (t - p - 1) as u64));
            prev = Some(t);
        }
        put_varint(&mut body, n.children.len() as u64);
    }
    let mut out = Vec::with_capacity(GRAPH_HEADER_LEN + body.len());
    out.extend_from_slice(GRAPH_MAGIC);
    out.extend_from_slice(&GRAPH_FORMAT_VERSION.to_le_bytes());
    let flags = if g.is_finalized() { FLAG_FINALIZED } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let crc = checksum(&out, &body);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// CRC-32 over a header prefix and a body, so flags and lengths are covered too.
pub(crate) fn checksum(header: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header);
    h.update(body);
    h.finalize()
}

/// Decodes [`graph_to_bytes`] output; refuses a wrong magic, an unknown version, a length
/// mismatch (truncated or trailing bytes), a checksum mismatch or a malformed trie.
pub fn graph_from_bytes(data: &[u8]) -> Result<NeuronGraph> {
    Ok(raw_graph_from_bytes(data)?.to_graph())
}

/// A decoded and fully validated graph blob whose strings still point into the blob: the
/// store packs it without building a [`NeuronGraph`] first (and reuses it for the next blob).
#[derive(Default)]
pub(crate) struct RawGraph<'a> {
    pub model: &'a str,
    pub layer: u32,
    pub neuron: u32,
    pub hook: &'a str,
    pub max_activation: f64,
    pub finalized: bool,
    /// The blob's label table.
    pub labels: Vec<&'a str>,
    /// Index 0 = the root, then breadth-first: node `i`'s children are the `n_children` nodes
    /// after those of every earlier node.
    pub nodes: Vec<RawNode>,
    pub ids: Vec<u32>,
    /// Decoder scratch.
    expected: Vec<(u64, u32)>,
}

#[derive(Clone, Copy)]
pub(crate) struct RawNode {
    /// Index into `labels`, or [`RAW_IGNORE`].
    pub label: u32,
    pub value: f32,
    pub end: Option<f32>,
    /// `ids[ids_start..ids_start + n_ids]`, sorted, unique.
    pub ids_start: u32,
    pub n_ids: u32,
    pub n_children: u32,
}

pub(crate) const RAW_IGNORE: u32 = u32::MAX;

impl RawGraph<'_> {
    pub fn ids_of(&self, n: &RawNode) -> &[u32] {
        &self.ids[n.ids_start as usize..(n.ids_start + n.n_ids) as usize]
    }

    pub fn to_graph(&self) -> NeuronGraph {
        let labels: Vec<SmolStr> = self.labels.iter().map(|l| SmolStr::new(l)).collect();
        let mut nodes: Vec<Node> = Vec::with_capacity(self.nodes.len());
        let mut next_child = 1u32;
        for (i, n) in self.nodes.iter().enumerate() {
            let mut node = if i == 0 {
                Node::root()
            } else {
                let label = if n.label == RAW_IGNORE { Label::Ignore } else { Label::Token(labels[n.label as usize].clone()) };
                Node::new(label, Ids::from_slice(self.ids_of(n)), n.value, n.end)
            };
            node.children = (next_child..next_child + n.n_children).collect();
            next_child += n.n_children;
            nodes.push(node);
        }
        let g = NeuronGraph::from_checked_nodes(self.model.to_owned(), self.layer, self.neuron, self.hook.to_owned(), self.max_activation, nodes, self.finalized);
        debug_assert!(g.validate().is_ok());
        g
    }
}

/// [`graph_from_bytes`] up to the raw form.
pub(crate) fn raw_graph_from_bytes(data: &[u8]) -> Result<RawGraph<'_>> {
    let mut g = RawGraph::default();
    decode_raw_into(data, &mut g)?;
    Ok(g)
}

/// [`raw_graph_from_bytes`] into `out`, reusing its buffers.
pub(crate) fn decode_raw_into<'a>(data: &'a [u8], out: &mut RawGraph<'a>) -> Result<()> {
    let mut r = Reader::new(data, "graph bytes");
    let magic = r.array::<4>("the magic")?;
    if &magic != GRAPH_MAGIC {
        return Err(corrupt!("not n2g graph bytes: magic is {magic:?}, expected {:?}", GRAPH_MAGIC));
    }
    let version = r.u16("the format version")?;
    if version != GRAPH_FORMAT_VERSION {
        return Err(corrupt!("graph bytes have format version {version}; this build reads version {GRAPH_FORMAT_VERSION}"));
    }
    let flags = r.u16("the flags")?;
    if flags & !FLAG_FINALIZED != 0 {
        return Err(corrupt!("graph bytes are corrupt or newer: unknown flags {flags:#x}"));
    }
    let body_len = r.u32("the body length")? as usize;
    let crc = r.u32("the checksum")?;
    if r.remaining() != body_len {
        return Err(corrupt!(
            "graph bytes are {}: header says {body_len} body bytes, {} present",
            if r.remaining() < body_len { "truncated" } else { "followed by extra bytes" },
            r.remaining()
        ));
    }
    let body = r.bytes(body_len, "the body")?;
    if checksum(&data[..12], body) != crc {
        return Err(corrupt!("graph bytes are corrupt: checksum mismatch"));
    }
    decode_body(body, flags & FLAG_FINALIZED != 0, out)
}

fn decode_body<'a>(body: &'a [u8], finalized: bool, out: &mut RawGraph<'a>) -> Result<()> {
    let mut r = Reader::new(body, "graph bytes");
    let model = r.str("model")?;
    let layer = r.varint_u32("layer")?;
    let neuron = r.varint_u32("neuron")?;
    let hook = r.str("hook")?;
    let max_activation = r.f64("max_activation")?;
    let n_labels = r.count("label count")?;
    let mut labels = std::mem::take(&mut out.labels);
    labels.clear();
    labels.reserve(n_labels);
    for _ in 0..n_labels {
        labels.push(r.str("label")?);
    }
    let n_nodes = r.count("node count")?;
    let n_roots = r.varint("root count")?;
    let root = RawNode { label: RAW_IGNORE, value: 0.0, end: None, ids_start: 0, n_ids: 0, n_children: 0 };
    let (mut nodes, mut ids) = (std::mem::take(&mut out.nodes), std::mem::take(&mut out.ids));
    nodes.clear();
    nodes.reserve(n_nodes + 1);
    nodes.push(root);
    ids.clear();
    ids.reserve(2 * n_nodes);
    // Breadth-first: each node's children are the next `n_children` nodes not yet placed, so
    // the shape is a tree by construction; the other invariants of `NeuronGraph::validate` are
    // checked inline (this is the store's load path). Per node: (expected children, depth);
    // `placed` counts the children placed under `parent` so far.
    let mut expected = std::mem::take(&mut out.expected);
    expected.clear();
    expected.reserve(n_nodes + 1);
    expected.push((n_roots, 0));
    let (mut parent, mut placed) = (0usize, 0u64);
    let bad = |what: &str| corrupt!("graph bytes are corrupt: {what}");
    for _ in 0..n_nodes {
        while parent < expected.len() && expected[parent].0 == placed {
            parent += 1;
            placed = 0;
        }
        if parent >= expected.len() {
            return Err(bad("more nodes than the child counts place"));
        }
        let kind = r.u8("node kind")?;
        if kind > 3 {
            return Err(bad(&format!("unknown node kind {kind}")));
        }
        let label = if kind & 1 != 0 {
            if parent == 0 {
                return Err(bad("an activating token cannot be IGNORE"));
            }
            RAW_IGNORE
        } else {
            let i = r.varint("label index")? as usize;
            if i >= labels.len() {
                return Err(bad(&format!("label index {i} out of range")));
            }
            i as u32
        };
        // Siblings sit next to each other: the previous node is the previous sibling. Order:
        // tokens by label, IGNORE last (as `Label`'s derived order).
        if placed > 0 {
            let prev = nodes[nodes.len() - 1].label;
            if prev == RAW_IGNORE || (label != RAW_IGNORE && labels[prev as usize] >= labels[label as usize]) {
                return Err(bad("children are not sorted or repeat a label"));
            }
        }
        let value = r.f32("node value")?;
        let end = if kind & 2 != 0 { Some(r.f32("end value")?) } else { None };
        if !value.is_finite() || end.is_some_and(|e| !e.is_finite()) {
            return Err(bad("a node has a non-finite value"));
        }
        let n_ids = r.count("token id count")?;
        if label == RAW_IGNORE && (n_ids != 0 || end.is_some()) {
            return Err(bad("an IGNORE node has token ids or an END"));
        }
        let ids_start = ids.len() as u32;
        let mut prev = 0u32;
        for k in 0..n_ids {
            let v = r.varint_u32("token id")?;
            // Gaps are stored minus one, so ids come out strictly increasing.
            let t = if k == 0 { Some(v) } else { prev.checked_add(v).and_then(|x| x.checked_add(1)) }.ok_or_else(|| bad("token id overflow"))?;
            ids.push(t);
            prev = t;
        }
        let n_children = r.varint("child count")?;
        let depth = expected[parent].1 + 1;
        if depth as usize > MAX_PATH_NODES {
            return Err(bad(&format!("path deeper than {MAX_PATH_NODES} nodes")));
        }
        placed += 1;
        nodes[parent].n_children += 1;
        nodes.push(RawNode { label, value, end, ids_start, n_ids: n_ids as u32, n_children: 0 });
        expected.push((n_children, depth));
    }
    for (i, (&(e, _), n)) in expected.iter().zip(&nodes).enumerate() {
        if e != n.n_children as u64 {
            return Err(bad("child counts do not match the node count"));
        }
        if i > 0 && e == 0 && n.end.is_none() {
            return Err(bad("a leaf node has no END (every path must end with END)"));
        }
    }
    if r.remaining() != 0 {
        return Err(bad(&format!("{} unread bytes after the nodes", r.remaining())));
    }
    check_finite_meta(max_activation)?;
    *out = RawGraph { model, layer, neuron, hook, max_activation, finalized, labels, nodes, ids, expected };
    Ok(())
}

fn check_finite_meta(max_activation: f64) -> Result<()> {
    if max_activation.is_finite() {
        Ok(())
    } else {
        Err(corrupt!("graph bytes are corrupt: max_activation is not finite"))
    }
}

/// Raises `InvalidInput` for an id that does not fit the core's u32 ids.
pub fn token_id(v: i64, at: impl FnOnce() -> String) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        if v < 0 {
            invalid!("negative token id {v} at {}", at())
        } else {
            invalid!("token id {v} at {} is too large (at most {})", at(), u32::MAX)
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::predict::tests_support::arb_graph;
    use crate::trie::tests::{ctx, graph, tok};
    use proptest::prelude::*;

    pub fn sample() -> NeuronGraph {
        let mut g = graph();
        g.add_path(&tok(" the\"q\\", &[5, 9], 0.75), &[ctx("of", &[7], 0.8), None, ctx("é\n", &[70000], 0.9)], 0.7).unwrap();
        g.add_path(&tok(" the\"q\\", &[5], 0.9), &[None, ctx("x", &[1], 0.95)], 0.9).unwrap();
        g.add_path(&tok("a", &[], 0.6), &[], 0.6).unwrap();
        g.finalize().unwrap();
        g
    }

    #[test]
    fn json_round_trip_and_shape() {
        let g = sample();
        let text = graph_to_json(&g);
        let back = graph_from_json(&text).unwrap();
        assert_eq!(back, g);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["schema"], "n2g.graph/v1");
        assert_eq!(v["roots"][1]["label"], "a");
        assert_eq!(v["roots"][0]["importance"], 1.0);
        assert_eq!(v["roots"][0]["activation"], 0.9);
        // "of" had no END: finalize dropped it after copying its sub-path under IGNORE.
        let ig = &v["roots"][0]["children"][0];
        assert_eq!((ig["label"].as_str(), ig["ignore"].as_bool(), ig["activation"].is_null()), (Some("<IGNORE>"), Some(true), true));
        assert_eq!(graph_to_json(&back), text, "deterministic");
    }

    #[test]
    fn json_ignore_node_may_carry_any_label() {
        let text = graph_to_json(&sample());
        assert!(text.contains("\"label\":\"<IGNORE>\",\"token_ids\":[],\"ignore\":true"), "{text}");
        for other in ["*", "", "IGNORE", "of"] {
            let relabelled = text.replace("\"label\":\"<IGNORE>\"", &format!("\"label\":{}", serde_json::to_string(other).unwrap()));
            let back = graph_from_json(&relabelled).unwrap_or_else(|e| panic!("label {other:?}: {e}"));
            assert_eq!(back, sample(), "label {other:?}");
            assert_eq!(graph_to_json(&back), text, "label {other:?} is read as <IGNORE>");
        }
        // The flag still forbids token ids and an END whatever the label, and IGNORE roots.
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (field, value, at_root) in [("token_ids", serde_json::json!([3]), false), ("end", serde_json::json!(0.5), false), ("ignore", serde_json::json!(true), true)] {
            for label in ["<IGNORE>", "*"] {
                let mut bad = doc.clone();
                let node = if at_root { &mut bad["roots"][0] } else { &mut bad["roots"][0]["children"][0] };
                assert!(at_root || node["ignore"] == true);
                node[field] = value.clone();
                node["label"] = label.into();
                let err = graph_from_json(&bad.to_string()).unwrap_err().to_string();
                let needle = if at_root { "cannot be IGNORE" } else { "must have no token_ids and end null" };
                assert!(err.contains(needle), "{field} {label}: {err}");
            }
        }
    }

    #[test]
    fn json_reading_reapplies_the_ignore_merge() {
        // a <- b <- c and a <- IGNORE <- d: finalize copies c under the IGNORE and drops b (no
        // END). A document with b kept and c not copied (another tool's output) is read into
        // that canonical graph.
        let mut g = graph();
        g.add_path(&tok("a", &[1], 0.9), &[ctx("b", &[2], 0.8), ctx("c", &[3], 0.95)], 0.7).unwrap();
        g.add_path(&tok("a", &[1], 0.9), &[None, ctx("d", &[4], 0.95)], 0.6).unwrap();
        g.finalize().unwrap();
        let text = graph_to_json(&g);
        let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let children = doc["roots"][0]["children"].as_array_mut().unwrap();
        assert_eq!((children.len(), &children[0]["ignore"]), (1, &serde_json::Value::Bool(true)));
        let c = children[0]["children"].as_array_mut().unwrap().remove(0);
        assert_eq!(c["label"], "c");
        children.push(serde_json::json!({"label": "b", "token_ids": [2], "ignore": false, "importance": 0.8,
            "activation": null, "end": null, "children": [c]}));
        let back = graph_from_json(&doc.to_string()).unwrap();
        assert_eq!(back, g);
        assert_eq!(graph_to_json(&back), text);
    }

    #[test]
    fn json_refusals() {
        let text = graph_to_json(&sample());
        for (bad, needle) in [
            (text.replace("n2g.graph/v1", "n2g.graph/v9"), "schema"),
            (text.replace("\"hook\"", "\"hooky\""), "unknown field"),
            (text.replacen("\"activation\":0.9", "\"activation\":null", 1), "numeric activation"),
            (text.replacen("\"activation\":null", "\"activation\":0.5", 1), "activation null"),
            (text.replacen("[5,9]", "[-5,9]", 1), "invalid value"),
            (text[..text.len() - 3].to_owned(), "invalid graph JSON"),
            ("[".repeat(10_000), "nests deeper"),
        ] {
            let err = graph_from_json(&bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        // Repeated sibling labels.
        let dup = text.replacen("{\"label\":\"a\"", "{\"label\":\" the\\\"q\\\\\"", 1);
        assert!(graph_from_json(&dup).unwrap_err().to_string().contains("repeat label"));
    }

    #[test]
    fn deepest_path_round_trips_through_json_on_a_small_stack() {
        let mut g = graph();
        let c: Vec<_> = (0..MAX_PATH_NODES - 1).map(|i| ctx(&format!("c{i}"), &[i as u32], 0.9)).collect();
        g.add_path(&tok("a", &[1], 1.0), &c, 0.5).unwrap();
        g.finalize().unwrap();
        let h = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let back = graph_from_json(&graph_to_json(&g)).unwrap();
                assert_eq!(back, g);
                assert_eq!(graph_from_bytes(&graph_to_bytes(&g)).unwrap(), g);
            })
            .unwrap();
        h.join().unwrap();
    }

    #[test]
    fn bytes_refuse_corruption() {
        let b = graph_to_bytes(&sample());
        assert_eq!(graph_from_bytes(&b).unwrap(), sample());
        for n in 0..b.len() {
            assert!(graph_from_bytes(&b[..n]).is_err(), "truncated at {n}");
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(graph_from_bytes(&c).is_err(), "flip at {i}");
        }
        let mut v = b.clone();
        v[4] = 2;
        assert!(graph_from_bytes(&v).unwrap_err().to_string().contains("version 2"));
        let mut extra = b.clone();
        extra.push(0);
        assert!(graph_from_bytes(&extra).unwrap_err().to_string().contains("extra bytes"));
    }

    proptest! {
        #[test]
        fn round_trips(g in arb_graph(), finalize in any::<bool>()) {
            let mut g = g;
            if finalize { g.finalize().unwrap(); }
            let b = graph_to_bytes(&g);
            let back = graph_from_bytes(&b).unwrap();
            // Bytes keep the arena exactly when it is breadth-first (always after finalize).
            if finalize { prop_assert_eq!(&back, &g); }
            prop_assert_eq!(graph_to_bytes(&back), b);
            g.finalize().unwrap();
            prop_assert_eq!(graph_from_json(&graph_to_json(&g)).unwrap(), g);
        }

        #[test]
        fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = graph_from_bytes(&data);
            let mut d = GRAPH_MAGIC.to_vec();
            d.extend_from_slice(&1u16.to_le_bytes());
            d.extend_from_slice(&0u16.to_le_bytes());
            d.extend_from_slice(&(data.len() as u32).to_le_bytes());
            let crc = checksum(&d, &data);
            d.extend_from_slice(&crc.to_le_bytes());
            d.extend_from_slice(&data);
            let _ = graph_from_bytes(&d);
        }
    }
}
