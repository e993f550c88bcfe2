//! Many neuron graphs keyed by (layer, neuron): batched prediction, search, similarity, and a
//! versioned, checksummed store file.
//!
//! In memory, graphs are held packed (`packed`: 16 bytes per node, labels and id sets interned
//! once per store).
//!
//! Store file (little-endian), header of both versions:
//! ```text
//! magic "N2GSTORE" | version u32 | reserved u32 = 0 | count u64 | payload_len u64
//! | crc u32 (CRC-32 of the 32 header bytes before it, then the payload) | reserved u32 = 0
//! ```
//! Version 2 (written) is the packed form itself, so loading is checking and copying:
//! ```text
//! n_strings u32 | (len u32, UTF-8)*          model and hook names
//! n_labels u32  | (len u32, UTF-8)*
//! n_syms u32 | n_ids u32 | sym_label u32 * n_syms | sym_ids_start u32 * (n_syms + 1) | ids u32 * n_ids
//! count x, sorted by key: layer u32 | neuron u32 | max_activation f64 | model u32 | hook u32
//!                         | m u32 | words u32 * (4m + 1)   (packed layout, symbols of this file)
//! ```
//! Strings, labels and symbols are numbered in order of first use, so the bytes depend only on
//! the graphs. Version 1 (still read): `count x (blob_len u32 | graph_to_bytes blob)`, sorted by
//! key; each blob carries its own checksum too. Every invariant of a graph is checked on load.

use crate::error::{corrupt, invalid, N2GError, Result};
use crate::format::{checksum, decode_raw_into, RawGraph, Reader};
use crate::packed::{PackedGraph, Symbols, TokenSyms, View, Walker, IGNORE_SYM};
use crate::trie::MAX_PATH_NODES;
use crate::parallel;
use crate::predict::Semantics;
use crate::search::{Extract, Key, Role, StoreIndex, Term};
use crate::similarity::{self, Pair};
use crate::trie::NeuronGraph;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

pub const STORE_MAGIC: &[u8; 8] = b"N2GSTORE";
pub const STORE_FORMAT_VERSION: u32 = 2;
/// The blob-list version, still read.
const STORE_FORMAT_V1: u32 = 1;
const STORE_HEADER_LEN: usize = 40;

/// (similar pairs, subset pairs).
pub type PairLists = (Vec<Pair>, Vec<Pair>);

#[derive(Debug, Default)]
pub struct GraphStore {
    graphs: BTreeMap<Key, PackedGraph>,
    syms: Symbols,
    /// token id -> symbols, for prediction; built on first use, dropped by every change.
    token_syms: OnceLock<TokenSyms>,
    /// Search and similarity index over the current graphs; built on first use, dropped by
    /// every change.
    index: OnceLock<StoreIndex>,
    /// Last all-pairs result (threshold bits, (similar, subset)): similar_pairs and
    /// subset_pairs come from one join, so asking for both costs one.
    pairs_cache: Mutex<Option<(u32, Arc<PairLists>)>>,
}

/// Blobs decoded in parallel per chunk before the chunk's new symbols are interned: a small
/// first chunk learns the common symbols; later chunks reuse the scratch graphs.
const FIRST_CHUNK: usize = 256;
const MAX_CHUNK: usize = 2048;

/// Decodes and packs blobs (messages name the blob). Per chunk: decode into reused scratch
/// graphs and pack against the symbols known so far, in parallel; then intern what was new, in
/// order (after the first chunk, little is). The packed graphs are the only allocations left
/// behind, so no freed per-graph garbage inflates the heap.
fn decode_and_pack(blobs: &[&[u8]], syms: &mut Symbols) -> Result<Vec<(Key, PackedGraph)>> {
    let mut scratch: Vec<(RawGraph, Vec<u32>)> = Vec::new();
    let mut out: Vec<(Key, PackedGraph)> = Vec::with_capacity(blobs.len());
    let (mut done, mut size) = (0, FIRST_CHUNK);
    while done < blobs.len() {
        let chunk = &blobs[done..(done + size).min(blobs.len())];
        if scratch.len() < chunk.len() {
            scratch.resize_with(chunk.len(), Default::default);
        }
        let work = &mut scratch[..chunk.len()];
        let known: &Symbols = syms;
        let packed: Vec<Option<(PackedGraph, bool)>> = parallel::install(|| {
            work.par_iter_mut()
                .zip(chunk.par_iter())
                .enumerate()
                .map(|(i, ((raw, label_map), b))| {
                    decode_raw_into(b, raw).map_err(|e| corrupt!("blob {}: {e}", done + i))?;
                    Ok(raw.finalized.then(|| PackedGraph::pack_raw(raw, known, label_map)))
                })
                .collect::<Result<_>>()
        })??;
        for (i, ((raw, label_map), p)) in work.iter_mut().zip(packed).enumerate() {
            let key = (raw.layer, raw.neuron);
            out.push(match p {
                Some((mut p, missing)) => {
                    if missing {
                        p.resolve(raw, syms, label_map);
                    }
                    (key, p)
                }
                None => {
                    let mut g = raw.to_graph();
                    g.finalize().map_err(|e| corrupt!("blob {}: {e}", done + i))?;
                    (key, PackedGraph::pack(&g, syms))
                }
            });
        }
        done += chunk.len();
        size = (size * 2).min(MAX_CHUNK);
    }
    Ok(out)
}

fn file_strs<'a>(r: &mut Reader<'a>, what: &str) -> Result<Vec<&'a str>> {
    let n = r.u32(what)? as usize;
    if n > r.remaining() / 4 {
        return Err(corrupt!("store file is corrupt: {n} {what}s cannot fit the payload"));
    }
    (0..n)
        .map(|_| {
            let len = r.u32(what)? as usize;
            std::str::from_utf8(r.bytes(len, what)?).map_err(|_| corrupt!("store file is corrupt: a {what} is not UTF-8"))
        })
        .collect()
}

fn file_u32s(r: &mut Reader, n: usize, what: &str) -> Result<Vec<u32>> {
    let len = n.checked_mul(4).ok_or_else(|| corrupt!("store file is corrupt: too many {what}"))?;
    Ok(r.bytes(len, what)?.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Checks a version-2 graph's words (file symbols; `sym_rank` = rank of each symbol's label in
/// label order) against every invariant of `NeuronGraph::validate`. `depth` is scratch.
fn check_words(words: &[u32], sym_rank: &[u32], depth: &mut Vec<u32>) -> std::result::Result<(), &'static str> {
    let m = (words.len() - 1) / 4;
    if m == 0 {
        return Err("no root node");
    }
    let (sym, rest) = words.split_at(m);
    let (value, rest) = rest.split_at(m);
    let (end, cs) = rest.split_at(m);
    if sym[0] != IGNORE_SYM || value[0] != 0 || !f32::from_bits(end[0]).is_nan() {
        return Err("the root node is malformed");
    }
    if cs[0] != 1 || cs[m] as usize != m || cs.windows(2).any(|w| w[0] > w[1]) {
        return Err("child ranges do not cover the nodes in order");
    }
    depth.clear();
    depth.resize(m, 0);
    for i in 0..m {
        let (a, b) = (cs[i] as usize, cs[i + 1] as usize);
        if a == b {
            if i > 0 && f32::from_bits(end[i]).is_nan() {
                return Err("a leaf node has no END (every path must end with END)");
            }
            continue;
        }
        // Children after their parent: a tree, no cycles.
        if a <= i {
            return Err("a node's children do not come after it");
        }
        let d = depth[i] + 1;
        if d as usize > MAX_PATH_NODES {
            return Err("a path is deeper than the node limit");
        }
        let mut prev = 0u32;
        for c in a..b {
            depth[c] = d;
            let s = sym[c];
            let rank = if s == IGNORE_SYM {
                if i == 0 {
                    return Err("an activating token cannot be IGNORE");
                }
                u32::MAX
            } else {
                *sym_rank.get(s as usize).ok_or("a symbol is out of range")?
            };
            // Tokens by label, IGNORE last, labels unique.
            if c > a && rank <= prev {
                return Err("children are not sorted or repeat a label");
            }
            prev = rank;
        }
    }
    for i in 1..m {
        let (v, e) = (f32::from_bits(value[i]), f32::from_bits(end[i]));
        if !v.is_finite() || e.is_infinite() {
            return Err("a node has a non-finite value");
        }
        if sym[i] == IGNORE_SYM && !e.is_nan() {
            return Err("an IGNORE node has an END");
        }
    }
    Ok(())
}

/// Reads a version-2 payload (module docs) after the header, checking everything.
fn read_v2(r: &mut Reader, count: usize) -> Result<GraphStore> {
    let mut store = GraphStore::new();
    let strings = file_strs(r, "name")?;
    let str_ids: Vec<u32> = strings.iter().map(|s| store.syms.intern_string(s)).collect();
    let labels = file_strs(r, "label")?;
    let label_ids: Vec<u32> = labels.iter().map(|l| store.syms.intern_label(l)).collect();
    // Rank of each label in label order (equal strings, equal rank), for sibling order checks.
    let mut order: Vec<u32> = (0..labels.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| labels[a as usize].cmp(labels[b as usize]));
    let mut rank = vec![0u32; labels.len()];
    for (i, &l) in order.iter().enumerate() {
        rank[l as usize] = if i == 0 { 0 } else { rank[order[i - 1] as usize] + (labels[order[i - 1] as usize] != labels[l as usize]) as u32 };
    }
    let n_syms = r.u32("the symbol count")? as usize;
    let n_ids = r.u32("the id count")? as usize;
    let sym_label = file_u32s(r, n_syms, "symbol labels")?;
    let starts = file_u32s(r, n_syms + 1, "symbol id ranges")?;
    let ids = file_u32s(r, n_ids, "symbol ids")?;
    if starts[0] != 0 || starts[n_syms] as usize != n_ids || starts.windows(2).any(|w| w[0] > w[1]) {
        return Err(corrupt!("store file is corrupt: symbol id ranges are malformed"));
    }
    let mut sym_map = Vec::with_capacity(n_syms);
    let mut sym_rank = Vec::with_capacity(n_syms);
    for s in 0..n_syms {
        let l = sym_label[s] as usize;
        let sids = &ids[starts[s] as usize..starts[s + 1] as usize];
        if l >= labels.len() || sids.windows(2).any(|w| w[0] >= w[1]) {
            return Err(corrupt!("store file is corrupt: symbol {s} has a bad label or unsorted ids"));
        }
        sym_map.push(store.syms.intern_sym(label_ids[l], sids));
        sym_rank.push(rank[l]);
    }
    struct At<'a> {
        key: Key,
        max_activation: f64,
        model: u32,
        hook: u32,
        words: &'a [u8],
    }
    let mut at: Vec<At> = Vec::with_capacity(count);
    for i in 0..count {
        let key = (r.u32("a graph key")?, r.u32("a graph key")?);
        let max_activation = f64::from_bits(r.u64("max_activation")?);
        let (model, hook) = (r.u32("the model name")?, r.u32("the hook name")?);
        let m = r.u32("the node count")? as usize;
        let words = r.bytes((4 * m + 1) * 4, "a graph's nodes").map_err(|_| corrupt!("store file is corrupt: graph {i} overruns the payload"))?;
        if model as usize >= strings.len() || hook as usize >= strings.len() || !max_activation.is_finite() {
            return Err(corrupt!("store file is corrupt: graph ({}, {}) has a bad name index or max_activation", key.0, key.1));
        }
        if let Some(prev) = at.last() {
            if prev.key >= key {
                return Err(corrupt!("store file is corrupt: key ({}, {}) appears twice or out of order", key.0, key.1));
            }
        }
        at.push(At { key, max_activation, model, hook, words });
    }
    if r.remaining() != 0 {
        return Err(corrupt!("store file is corrupt: {} bytes after the last graph", r.remaining()));
    }
    let packed: Vec<PackedGraph> = parallel::install(|| {
        at.par_iter()
            .map_init(Vec::new, |depth, g| {
                let mut words: Box<[u32]> = g.words.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                check_words(&words, &sym_rank, depth).map_err(|e| corrupt!("store file is corrupt: graph ({}, {}): {e}", g.key.0, g.key.1))?;
                let m = (words.len() - 1) / 4;
                for w in &mut words[1..m] {
                    if *w != IGNORE_SYM {
                        *w = sym_map[*w as usize];
                    }
                }
                Ok(PackedGraph::from_words(words, g.max_activation, str_ids[g.model as usize], str_ids[g.hook as usize]))
            })
            .collect::<Result<_>>()
    })??;
    // Sorted entries built in bulk, so the map's nodes are full.
    store.graphs = at.iter().map(|g| g.key).zip(packed).collect();
    Ok(store)
}

impl GraphStore {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn len(&self) -> usize {
        self.graphs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.graphs.is_empty()
    }
    pub fn contains(&self, key: Key) -> bool {
        self.graphs.contains_key(&key)
    }
    /// Sorted keys.
    pub fn keys(&self) -> Vec<Key> {
        self.graphs.keys().copied().collect()
    }
    /// A copy of the graph under `key` (built from the packed form).
    pub fn get(&self, key: Key) -> Result<NeuronGraph> {
        self.graphs.get(&key).map(|p| p.unpack(key, &self.syms)).ok_or(N2GError::UnknownKey { layer: key.0, neuron: key.1 })
    }

    /// Drops everything derived from the set of graphs.
    fn changed(&mut self) {
        self.index = OnceLock::new();
        self.token_syms = OnceLock::new();
        *self.pairs_cache.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Adds (or replaces) the graph under its own (layer, neuron); it is finalized (an error,
    /// and nothing changes, when finalizing is refused).
    pub fn insert(&mut self, mut graph: NeuronGraph) -> Result<()> {
        graph.finalize()?;
        self.changed();
        let p = PackedGraph::pack(&graph, &mut self.syms);
        self.graphs.insert(graph.key(), p);
        Ok(())
    }

    pub fn extend(&mut self, graphs: Vec<NeuronGraph>) -> Result<()> {
        for g in graphs {
            self.insert(g)?;
        }
        Ok(())
    }

    pub fn remove(&mut self, key: Key) -> Result<NeuronGraph> {
        let g = self.get(key)?;
        self.graphs.remove(&key);
        self.changed();
        Ok(g)
    }

    /// Adds many `graph_to_bytes` blobs (what the workspace keeps per neuron), decoded in
    /// parallel; all or nothing (a bad blob is named and nothing is added). A later blob
    /// replaces an earlier one of the same key.
    pub fn add_blobs(&mut self, blobs: &[&[u8]]) -> Result<()> {
        // A failure leaves only unused symbols behind.
        let packed = decode_and_pack(blobs, &mut self.syms)?;
        self.changed();
        if self.graphs.is_empty() && packed.windows(2).all(|w| w[0].0 < w[1].0) {
            self.graphs = packed.into_iter().collect();
        } else {
            self.graphs.extend(packed);
        }
        Ok(())
    }

    /// Heap bytes the graphs hold: packed nodes, the map's entries and the shared symbol
    /// tables (lazily built indexes and allocator overhead not counted).
    pub fn heap_bytes(&self) -> usize {
        let per_entry = std::mem::size_of::<(Key, PackedGraph)>();
        self.graphs.values().map(|p| p.heap_bytes() + per_entry).sum::<usize>() + self.syms.heap_bytes()
    }

    // --- store file ----------------------------------------------------------------------

    pub fn to_bytes(&self) -> Vec<u8> {
        let payload = self.payload_v2();
        let mut out = Vec::with_capacity(STORE_HEADER_LEN + payload.len());
        out.extend_from_slice(STORE_MAGIC);
        out.extend_from_slice(&STORE_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.graphs.len() as u64).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let crc = checksum(&out, &payload);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Version-2 payload (module docs), symbols renumbered in order of first use.
    fn payload_v2(&self) -> Vec<u8> {
        const NEW: u32 = u32::MAX;
        let sy = &self.syms;
        let (mut sym_map, mut label_map, mut str_map) = (vec![NEW; sy.n_syms()], vec![NEW; sy.n_labels()], vec![NEW; sy.n_strings()]);
        let (mut syms, mut labels, mut strings): (Vec<u32>, Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new(), Vec::new());
        let number = |map: &mut Vec<u32>, used: &mut Vec<u32>, x: u32| {
            if map[x as usize] == NEW {
                map[x as usize] = used.len() as u32;
                used.push(x);
            }
        };
        let mut words_len = 0;
        for p in self.graphs.values() {
            number(&mut str_map, &mut strings, p.model);
            number(&mut str_map, &mut strings, p.hook);
            for &s in &p.view().sym[1..] {
                if s != IGNORE_SYM && sym_map[s as usize] == NEW {
                    number(&mut sym_map, &mut syms, s);
                    number(&mut label_map, &mut labels, sy.sym_label(s));
                }
            }
            words_len += p.words().len();
        }
        let n_ids: usize = syms.iter().map(|&s| sy.ids(s).len()).sum();
        let mut out: Vec<u8> = Vec::with_capacity(64 + 4 * (words_len + 2 * syms.len() + n_ids) + 32 * self.graphs.len());
        let put = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_le_bytes());
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        put(&mut out, strings.len() as u32);
        strings.iter().for_each(|&i| put_str(&mut out, sy.string(i)));
        put(&mut out, labels.len() as u32);
        labels.iter().for_each(|&l| put_str(&mut out, sy.label_str(l)));
        put(&mut out, syms.len() as u32);
        put(&mut out, n_ids as u32);
        syms.iter().for_each(|&s| put(&mut out, label_map[sy.sym_label(s) as usize]));
        let mut start = 0u32;
        put(&mut out, 0);
        for &s in &syms {
            start += sy.ids(s).len() as u32;
            put(&mut out, start);
        }
        syms.iter().for_each(|&s| sy.ids(s).iter().for_each(|&t| put(&mut out, t)));
        for (k, p) in &self.graphs {
            put(&mut out, k.0);
            put(&mut out, k.1);
            out.extend_from_slice(&p.max_activation.to_le_bytes());
            put(&mut out, str_map[p.model as usize]);
            put(&mut out, str_map[p.hook as usize]);
            let m = p.n_nodes();
            put(&mut out, m as u32);
            let w = p.words();
            w[..m].iter().for_each(|&s| put(&mut out, if s == IGNORE_SYM { s } else { sym_map[s as usize] }));
            w[m..].iter().for_each(|&x| put(&mut out, x));
        }
        out
    }

    pub fn from_bytes(data: &[u8]) -> Result<GraphStore> {
        let mut r = Reader::new(data, "store file");
        let magic = r.array::<8>("the magic")?;
        if &magic != STORE_MAGIC {
            return Err(corrupt!("not an n2g store file (magic {:?}, expected {:?})", String::from_utf8_lossy(&magic), "N2GSTORE"));
        }
        let version = r.u32("the format version")?;
        if version != STORE_FORMAT_VERSION && version != STORE_FORMAT_V1 {
            return Err(corrupt!("store file has format version {version}; this build reads versions {STORE_FORMAT_V1} and {STORE_FORMAT_VERSION}"));
        }
        let reserved = r.u32("the header")?;
        let count = r.u64("the graph count")?;
        let payload_len = r.u64("the payload length")?;
        let crc = r.u32("the checksum")?;
        if reserved != 0 || r.u32("the header")? != 0 {
            return Err(corrupt!("store file is corrupt or newer: reserved header fields are not zero"));
        }
        if r.remaining() as u64 != payload_len {
            return Err(corrupt!(
                "store file is {}: header says {payload_len} payload bytes, {} present",
                if (r.remaining() as u64) < payload_len { "truncated" } else { "followed by extra bytes" },
                r.remaining()
            ));
        }
        if checksum(&data[..32], &data[STORE_HEADER_LEN..]) != crc {
            return Err(corrupt!("store file is corrupt: checksum mismatch"));
        }
        if count > payload_len / 4 {
            return Err(corrupt!("store file is corrupt: {count} graphs cannot fit {payload_len} bytes"));
        }
        if version == STORE_FORMAT_VERSION {
            return read_v2(&mut r, count as usize);
        }
        let mut blobs: Vec<&[u8]> = Vec::with_capacity(count as usize);
        for i in 0..count {
            let n = r.u32("a graph length")? as usize;
            blobs.push(r.bytes(n, "a graph").map_err(|_| corrupt!("store file is corrupt: graph {i} overruns the payload"))?);
        }
        if r.remaining() != 0 {
            return Err(corrupt!("store file is corrupt: {} bytes after the last graph", r.remaining()));
        }
        let mut store = GraphStore::new();
        let mut packed = decode_and_pack(&blobs, &mut store.syms).map_err(|e| corrupt!("store file: {e}"))?;
        // Files are written sorted; sorting again (stable) costs little and finds repeats.
        packed.sort_by_key(|p| p.0);
        if let Some(w) = packed.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(corrupt!("store file is corrupt: key ({}, {}) appears twice", w[0].0 .0, w[0].0 .1));
        }
        // Built from sorted entries in bulk, so the map's nodes are full.
        store.graphs = packed.into_iter().collect();
        Ok(store)
    }

    /// Writes the store file atomically (a temporary file renamed over `path`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let data = self.to_bytes();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let io = |e: std::io::Error| N2GError::Io(format!("cannot write store file {}: {e}", path.display()));
        std::fs::write(&tmp, &data).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    pub fn load(path: &Path) -> Result<GraphStore> {
        let data = std::fs::read(path).map_err(|e| N2GError::Io(format!("cannot read store file {}: {e}", path.display())))?;
        Self::from_bytes(&data).map_err(|e| match e {
            N2GError::Format(m) => N2GError::Format(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    // --- prediction ----------------------------------------------------------------------

    /// Predictions `[keys, sequences, tokens]` (row-major) for `n_seq` sequences of `tokens`
    /// ids each, laid out row-major in `ids`.
    pub fn predict(&self, keys: &[Key], ids: &[u32], n_seq: usize, tokens: usize, sem: Semantics) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; keys.len() * n_seq * tokens];
        self.predict_into(keys, ids, n_seq, tokens, sem, &mut out)?;
        Ok(out)
    }

    /// [`GraphStore::predict`] into `out`, which must hold `keys.len() * n_seq * tokens` zeros
    /// (only non-zero predictions are written, so a lazily zeroed buffer stays mostly
    /// untouched).
    ///
    /// Token first, not neuron first: in text, a neuron's activating tokens are rare, so walking
    /// every (neuron, position) would spend nearly all its time finding nothing. Instead the
    /// activating entries of the requested graphs are merged into one table (token id ->
    /// (graph slot, activating nodes)); each position looks its token up once, and only the
    /// matches are walked, grouped by graph so each trie stays in cache.
    pub fn predict_into(&self, keys: &[Key], ids: &[u32], n_seq: usize, tokens: usize, sem: Semantics, out: &mut [f32]) -> Result<()> {
        if ids.len() != n_seq * tokens {
            return Err(invalid!("{} token ids given for {n_seq} sequences of {tokens} tokens", ids.len()));
        }
        if out.len() != keys.len() * n_seq * tokens {
            return Err(invalid!("output holds {} values, expected {}", out.len(), keys.len() * n_seq * tokens));
        }
        let graphs: Vec<View> = keys
            .iter()
            .map(|&k| self.graphs.get(&k).map(|g| g.view()).ok_or(N2GError::UnknownKey { layer: k.0, neuron: k.1 }))
            .collect::<Result<_>>()?;
        if out.is_empty() {
            return Ok(());
        }
        let token_syms = self.token_syms.get_or_init(|| self.syms.token_index());
        let walker = Walker { tokens: token_syms };
        let table = RootTable::new(&graphs, &self.syms, ids);
        // 1. Per position, the symbol its token matches (walk steps compare child symbols with
        //    it), and the matches (slot, sequence, position, table entry of the slot's first
        //    root); per sequence in parallel.
        let mut sym_keys = vec![0u32; ids.len()];
        let matches: Vec<Match> = parallel::install(|| {
            sym_keys
                .par_chunks_mut(tokens)
                .enumerate()
                .flat_map_iter(|(s, keys)| {
                    let seq = &ids[s * tokens..(s + 1) * tokens];
                    let mut found = Vec::new();
                    for (i, &t) in seq.iter().enumerate() {
                        keys[i] = token_syms.key(t);
                        let (mut e, end) = table.range(t);
                        while e < end {
                            let slot = table.slot[e];
                            found.push(Match { slot, seq: s as u32, pos: i as u32, entry: e as u32 });
                            while e < end && table.slot[e] == slot {
                                e += 1;
                            }
                        }
                    }
                    found
                })
                .collect()
        })?;
        // 2. Bucket by graph (counting sort), then walk graph by graph in parallel.
        let mut start = vec![0u32; graphs.len() + 1];
        for m in &matches {
            start[m.slot as usize + 1] += 1;
        }
        for i in 0..graphs.len() {
            start[i + 1] += start[i];
        }
        let mut by_graph = vec![Match::default(); matches.len()];
        let mut fill = start.clone();
        for m in matches {
            by_graph[fill[m.slot as usize] as usize] = m;
            fill[m.slot as usize] += 1;
        }
        // Each graph's output block [n_seq, tokens] is written by the task walking that graph's
        // matches, so first touches of the (lazily zeroed) output pages are spread over cores.
        let block = n_seq * tokens;
        let sym_keys = &sym_keys;
        parallel::install(|| {
            out.par_chunks_mut(block).enumerate().for_each_init(
                || (Vec::new(), Vec::new()),
                |(stack, roots), (slot, o)| {
                    let g = &graphs[slot];
                    for m in &by_graph[start[slot] as usize..start[slot + 1] as usize] {
                        let (s, i) = (m.seq as usize, m.pos as usize);
                        let seq = &ids[s * tokens..(s + 1) * tokens];
                        let keys = &sym_keys[s * tokens..(s + 1) * tokens];
                        let v = match sem {
                            // Greedy starts from the graph's first matching root only.
                            Semantics::GreedyDeepest => walker.greedy_from(g, table.node[m.entry as usize], seq, keys, i),
                            Semantics::AllPathsMax => {
                                let (_, end) = table.range(seq[i]);
                                roots.clear();
                                let mut e = m.entry as usize;
                                while e < end && table.slot[e] == m.slot {
                                    roots.push(table.node[e]);
                                    e += 1;
                                }
                                walker.all_paths_from(g, roots, seq, keys, i, stack)
                            }
                        };
                        if v != 0.0 {
                            o[s * tokens + i] = v;
                        }
                    }
                },
            )
        })
    }

    // --- search and similarity -----------------------------------------------------------

    /// The search and similarity index, built on first use (an error only when the crate's
    /// thread pool cannot start; nothing is cached then).
    pub fn index(&self) -> Result<&StoreIndex> {
        if let Some(ix) = self.index.get() {
            return Ok(ix);
        }
        let entries: Vec<(&Key, &PackedGraph)> = self.graphs.iter().collect();
        let extracted: Vec<Extract> = parallel::install(|| entries.par_iter().map(|(_, p)| extract(&p.view(), &self.syms)).collect())?;
        // A concurrent caller may have set it first; both built the same index.
        Ok(self.index.get_or_init(|| StoreIndex::build_extracted(entries.iter().map(|e| *e.0).collect(), extracted)))
    }

    pub fn search(&self, clauses: &[(Term, Role)]) -> Result<Vec<Key>> {
        self.index()?.search(clauses)
    }

    pub fn in_context_neurons(&self) -> Result<Vec<(Key, Vec<String>, f32)>> {
        Ok(self.index()?.in_context())
    }

    /// (similar pairs, subset pairs); see `similarity`. The last result is cached.
    pub fn pairs(&self, threshold: f64) -> Result<Arc<PairLists>> {
        let t = similarity::check_threshold(threshold)?;
        if let Some((bits, res)) = self.pairs_cache.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if *bits == t.to_bits() {
                return Ok(res.clone());
            }
        }
        // Computed outside the lock: concurrent callers may both compute, none waits.
        let res = Arc::new(similarity::all_pairs(self.index()?, t)?);
        *self.pairs_cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((t.to_bits(), res.clone()));
        Ok(res)
    }

    pub fn neighbours(&self, key: Key, k: usize) -> Result<Vec<(Key, f32, f32, f32)>> {
        if k == 0 {
            return Err(invalid!("k must be at least 1"));
        }
        let ix = self.index()?;
        let g = ix.keys.binary_search(&key).map_err(|_| N2GError::UnknownKey { layer: key.0, neuron: key.1 })?;
        Ok(similarity::neighbours(ix, g, k))
    }
}

/// Labels and token ids of a packed graph's activating and context nodes on paths that can
/// fire, for the index (as `search::extract` for an unpacked graph).
fn extract<'a>(g: &View, syms: &'a Symbols) -> Extract<'a> {
    let mut e = Extract { act_labels: Vec::new(), ctx_labels: Vec::new(), act_tokens: Vec::new(), ctx_tokens: Vec::new() };
    let roots = g.roots();
    let fire = g.can_fire();
    // Breadth-first: the activating nodes come first, every later node is context or IGNORE.
    for (i, &s) in g.sym.iter().enumerate().skip(1) {
        if s == IGNORE_SYM || !fire[i] {
            continue;
        }
        let (labels, tokens) = if roots.contains(&(i as u32)) { (&mut e.act_labels, &mut e.act_tokens) } else { (&mut e.ctx_labels, &mut e.ctx_tokens) };
        labels.push(syms.label(s));
        tokens.extend_from_slice(syms.ids(s));
    }
    for v in [&mut e.act_tokens, &mut e.ctx_tokens] {
        v.sort_unstable();
        v.dedup();
    }
    e
}

#[derive(Clone, Copy, Default)]
struct Match {
    slot: u32,
    seq: u32,
    pos: u32,
    entry: u32,
}

/// Activating entries of the graphs of one prediction call, grouped by token id, then graph
/// slot, then label order (greedy takes a graph's first root). Lookup is direct for token ids
/// below `DENSE_LIMIT` (one offsets array), binary search above.
struct RootTable {
    token: Vec<u32>,
    slot: Vec<u32>,
    node: Vec<u32>,
    dense: Vec<u32>,
}

const DENSE_LIMIT: u32 = 1 << 22;

impl RootTable {
    /// The entries of the token ids that occur in `ids` (the call's input) only: a whole model's
    /// graded token paths hold millions of entries a short input never looks up.
    fn new(graphs: &[View], syms: &Symbols, ids: &[u32]) -> Self {
        // a flag a token id up to DENSE_LIMIT, a sorted list beyond (an id near 2^32 must not
        // allocate 4 GiB)
        let max = ids.iter().max().map_or(0, |&m| m);
        let (mut present, mut sorted) = (Vec::new(), Vec::new());
        if max < DENSE_LIMIT {
            present = vec![false; max as usize + 1];
            for &t in ids {
                present[t as usize] = true;
            }
        } else {
            sorted = ids.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
        }
        let wanted = |t: u32| {
            if max < DENSE_LIMIT {
                present.get(t as usize).copied().unwrap_or(false)
            } else {
                sorted.binary_search(&t).is_ok()
            }
        };
        let mut rows: Vec<(u32, u32, u32)> = Vec::new();
        for (slot, g) in graphs.iter().enumerate() {
            for r in g.roots() {
                rows.extend(syms.ids(g.sym[r as usize]).iter().filter(|&&t| wanted(t)).map(|&t| (t, slot as u32, r)));
            }
        }
        // Stable: keeps each graph's label order within a token.
        rows.sort_by_key(|&(t, slot, _)| (t, slot));
        let max = rows.last().map_or(0, |r| r.0);
        let mut dense = Vec::new();
        if max < DENSE_LIMIT {
            dense = vec![0u32; max as usize + 2];
            for r in &rows {
                dense[r.0 as usize + 1] += 1;
            }
            for i in 0..dense.len() - 1 {
                dense[i + 1] += dense[i];
            }
        }
        RootTable {
            token: rows.iter().map(|r| r.0).collect(),
            slot: rows.iter().map(|r| r.1).collect(),
            node: rows.iter().map(|r| r.2).collect(),
            dense,
        }
    }

    /// Entry range of token `t`.
    #[inline]
    fn range(&self, t: u32) -> (usize, usize) {
        if !self.dense.is_empty() {
            let t = t as usize;
            if t + 1 >= self.dense.len() {
                return (0, 0);
            }
            return (self.dense[t] as usize, self.dense[t + 1] as usize);
        }
        let lo = self.token.partition_point(|&x| x < t);
        let hi = lo + self.token[lo..].partition_point(|&x| x == t);
        (lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::reference;
    use crate::predict::tests_support::arb_graph;
    use crate::search::tests::arb_graphs;
    use proptest::prelude::*;

    fn store(gs: &[NeuronGraph]) -> GraphStore {
        let mut s = GraphStore::new();
        s.extend(gs.to_vec()).unwrap();
        s
    }

    #[test]
    fn unknown_keys_and_empty_predict() {
        let mut s = GraphStore::new();
        assert!(matches!(s.remove((1, 2)), Err(N2GError::UnknownKey { .. })));
        assert!(s.predict(&[(0, 0)], &[1], 1, 1, Semantics::AllPathsMax).is_err());
        assert_eq!(s.predict(&[], &[], 0, 0, Semantics::AllPathsMax).unwrap(), Vec::<f32>::new());
        assert!(s.neighbours((0, 0), 3).is_err());
        assert!(s.pairs(0.0).is_err());
        assert!(s.predict(&[], &[1, 2], 1, 1, Semantics::AllPathsMax).is_err());
        let s2 = GraphStore::from_bytes(&s.to_bytes()).unwrap();
        assert!(s2.is_empty());
    }

    #[test]
    fn save_load_file_and_refusals() {
        let mut s = GraphStore::new();
        s.insert(crate::format::tests::sample()).unwrap();
        let dir = std::env::temp_dir().join(format!("n2g_store_test_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.n2gstore");
        s.save(&p).unwrap();
        let back = GraphStore::load(&p).unwrap();
        assert_eq!(back.keys(), s.keys());
        assert_eq!(back.get((1, 2)).unwrap(), s.get((1, 2)).unwrap());
        let data = std::fs::read(&p).unwrap();
        for n in [0, 7, 39, 40, data.len() - 1] {
            assert!(GraphStore::from_bytes(&data[..n]).is_err(), "truncated at {n}");
        }
        for i in 0..data.len() {
            let mut c = data.clone();
            c[i] ^= 0x01;
            assert!(GraphStore::from_bytes(&c).is_err(), "flip at {i}");
        }
        assert!(GraphStore::load(&dir.join("missing")).unwrap_err().to_string().contains("cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn predict_with_huge_token_ids_uses_the_sparse_table() {
        use crate::trie::tests::{ctx, graph, tok};
        let mut g = graph();
        g.add_path(&tok("a", &[4_000_000_000, 3], 0.9), &[ctx("b", &[7], 0.9)], 0.8).unwrap();
        g.add_path(&tok("c", &[9], 0.9), &[], 0.5).unwrap();
        let s = store(&[g.clone()]);
        let seq = [7, 4_000_000_000, 9, 3, 4_000_000_001];
        for sem in [Semantics::GreedyDeepest, Semantics::AllPathsMax] {
            let mut g2 = g.clone();
            g2.finalize().unwrap();
            let want = match sem {
                Semantics::GreedyDeepest => reference::greedy(&g2, &seq),
                Semantics::AllPathsMax => reference::all_paths(&g2, &seq),
            };
            assert_eq!(want, vec![0.0, 0.8, 0.5, 0.0, 0.0]);
            assert_eq!(s.predict(&[g.key(), g.key()], &seq, 1, 5, sem).unwrap(), [want.clone(), want].concat());
        }
    }

    /// A version-1 file (blob list) of `gs`, as earlier builds wrote it.
    fn v1_file(gs: &[NeuronGraph]) -> Vec<u8> {
        let mut gs: Vec<&NeuronGraph> = gs.iter().collect();
        gs.sort_by_key(|g| g.key());
        let mut payload = Vec::new();
        for g in &gs {
            let b = crate::format::graph_to_bytes(g);
            payload.extend_from_slice(&(b.len() as u32).to_le_bytes());
            payload.extend_from_slice(&b);
        }
        let mut out = STORE_MAGIC.to_vec();
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(gs.len() as u64).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let crc = checksum(&out, &payload);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// `data` with its checksum recomputed (to get past it to the structural checks).
    fn reseal(mut data: Vec<u8>) -> Vec<u8> {
        let crc = checksum(&data[..32], &data[STORE_HEADER_LEN..]);
        data[32..36].copy_from_slice(&crc.to_le_bytes());
        data
    }

    #[test]
    fn version_2_refuses_structural_damage_with_a_valid_checksum() {
        let mut s = GraphStore::new();
        s.insert(crate::format::tests::sample()).unwrap();
        let data = s.to_bytes();
        // Last graph's last word is child_start[m] (= m): any other value breaks the tree.
        let mut d = data.clone();
        let n = d.len();
        d[n - 4] ^= 1;
        assert!(GraphStore::from_bytes(&reseal(d)).unwrap_err().to_string().contains("child ranges"));
        // A second copy of the graph under the same key.
        let m = s.graphs.values().next().unwrap().n_nodes();
        let g0 = data.len() - (28 + (4 * m + 1) * 4);
        assert_eq!(&data[g0..g0 + 8], &[1, 0, 0, 0, 2, 0, 0, 0]);
        let mut d = data.clone();
        d.extend_from_slice(&data[g0..]);
        let payload_len = (d.len() - STORE_HEADER_LEN) as u64;
        d[16..24].copy_from_slice(&2u64.to_le_bytes());
        d[24..32].copy_from_slice(&payload_len.to_le_bytes());
        assert!(GraphStore::from_bytes(&reseal(d)).unwrap_err().to_string().contains("appears twice"));
    }

    proptest! {
        #[test]
        fn version_1_files_still_load(gs in arb_graphs()) {
            let s = store(&gs);
            let back = GraphStore::from_bytes(&v1_file(&gs)).unwrap();
            prop_assert_eq!(back.keys(), s.keys());
            for g in &gs {
                prop_assert_eq!(&back.get(g.key()).unwrap(), g);
            }
            prop_assert_eq!(back.to_bytes(), s.to_bytes());
        }

        /// Damage behind a valid checksum never panics, and whatever loads is a valid store.
        #[test]
        fn damaged_version_2_is_refused_or_valid(gs in arb_graphs(), flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)) {
            let mut d = store(&gs).to_bytes();
            let len = d.len() - STORE_HEADER_LEN;
            prop_assume!(len > 0);
            for (at, x) in flips {
                d[STORE_HEADER_LEN + at.index(len)] ^= x;
            }
            if let Ok(back) = GraphStore::from_bytes(&reseal(d)) {
                for k in back.keys() {
                    prop_assert!(back.get(k).unwrap().validate().is_ok());
                }
                let seq: Vec<u32> = (0..30).collect();
                back.predict(&back.keys(), &seq, 1, 30, Semantics::AllPathsMax).unwrap();
            }
        }

        #[test]
        fn predict_equals_reference_walks(gs in arb_graphs(), seqs in prop::collection::vec(prop::collection::vec(0u32..30, 6), 1..4)) {
            let s = store(&gs);
            let keys = s.keys();
            let ids: Vec<u32> = seqs.concat();
            for sem in [Semantics::GreedyDeepest, Semantics::AllPathsMax] {
                let out = s.predict(&keys, &ids, seqs.len(), 6, sem).unwrap();
                for (gi, k) in keys.iter().enumerate() {
                    for (si, seq) in seqs.iter().enumerate() {
                        let g = s.get(*k).unwrap();
                        let want = match sem { Semantics::GreedyDeepest => reference::greedy(&g, seq), Semantics::AllPathsMax => reference::all_paths(&g, seq) };
                        let at = (gi * seqs.len() + si) * 6;
                        prop_assert_eq!(&out[at..at + 6], &want[..]);
                    }
                }
            }
        }

        /// Graphs whose sibling id sets overlap and whose labels carry different id sets in
        /// different graphs (so a token maps to several symbols): the packed walks still equal
        /// the reference walks over each graph, and `get` gives back the graph added.
        #[test]
        fn packed_walks_equal_reference_with_overlapping_ids(
            gs in prop::collection::vec(arb_graph(), 1..5),
            seqs in prop::collection::vec(prop::collection::vec(0u32..20, 7), 1..4),
        ) {
            let mut s = GraphStore::new();
            let mut want_graphs = Vec::new();
            for (i, mut g) in gs.into_iter().enumerate() {
                g.neuron = i as u32;
                s.insert(g.clone()).unwrap();
                g.finalize().unwrap();
                want_graphs.push(g);
            }
            let keys = s.keys();
            for (k, g) in keys.iter().zip(&want_graphs) {
                prop_assert_eq!(&s.get(*k).unwrap(), g);
            }
            let ids: Vec<u32> = seqs.concat();
            for sem in [Semantics::GreedyDeepest, Semantics::AllPathsMax] {
                let out = s.predict(&keys, &ids, seqs.len(), 7, sem).unwrap();
                for (gi, g) in want_graphs.iter().enumerate() {
                    for (si, seq) in seqs.iter().enumerate() {
                        let want = match sem { Semantics::GreedyDeepest => reference::greedy(g, seq), Semantics::AllPathsMax => reference::all_paths(g, seq) };
                        let at = (gi * seqs.len() + si) * 7;
                        prop_assert_eq!(&out[at..at + 7], &want[..]);
                    }
                }
            }
            // Replacing every graph keeps answers right (symbols of the old graphs stay).
            let mut s2 = GraphStore::from_bytes(&s.to_bytes()).unwrap();
            for g in want_graphs.iter().rev() {
                let mut g2 = g.clone();
                g2.neuron = want_graphs.len() as u32 - 1 - g.neuron;
                s2.insert(g2).unwrap();
            }
            for (k, g) in keys.iter().zip(want_graphs.iter().rev()) {
                let mut g2 = g.clone();
                g2.neuron = k.1;
                prop_assert_eq!(s2.get(*k).unwrap(), g2);
            }
        }

        #[test]
        fn store_bytes_round_trip(gs in arb_graphs()) {
            let s = store(&gs);
            let b = s.to_bytes();
            let back = GraphStore::from_bytes(&b).unwrap();
            prop_assert_eq!(back.keys(), s.keys());
            for g in &gs {
                prop_assert_eq!(&back.get(g.key()).unwrap(), g);
            }
            prop_assert_eq!(back.to_bytes(), b);
        }

        #[test]
        fn packed_index_equals_the_graphs_index(gs in arb_graphs()) {
            // the store indexes packed graphs; it must see what the unpacked graphs' index sees
            // (paths below the firing threshold included in arb_graphs, and left out by both)
            let s = store(&gs);
            let want = StoreIndex::build(gs.iter().map(|g| (g.key(), g))).unwrap();
            let got = s.index().unwrap();
            prop_assert_eq!(&got.keys, &want.keys);
            let names = |ix: &StoreIndex, sets: &Vec<Vec<u32>>| -> Vec<Vec<String>> {
                sets.iter().map(|v| { let mut n: Vec<String> = v.iter().map(|&l| ix.label_names[l as usize].to_string()).collect(); n.sort(); n }).collect()
            };
            prop_assert_eq!(names(got, &got.act_sets), names(&want, &want.act_sets));
            prop_assert_eq!(names(got, &got.ctx_sets), names(&want, &want.ctx_sets));
            for t in 0u32..30 {
                for r in [Role::Activating, Role::Context] {
                    prop_assert_eq!(s.search(&[(Term::Token(t), r)]).unwrap(), want.search(&[(Term::Token(t), r)]).unwrap());
                }
            }
        }
    }
}
