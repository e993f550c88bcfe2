//! Many neuron graphs keyed by (layer, neuron): batched prediction, search, similarity, and a
//! versioned, checksummed store file.
//!
//! Store file (little-endian):
//! ```text
//! magic "N2GSTORE" | version u32 = 1 | reserved u32 = 0 | count u64 | payload_len u64
//! | crc u32 (CRC-32 of the 32 header bytes before it, then the payload) | reserved u32 = 0
//! payload: count x (blob_len u32 | graph bytes as format::graph_to_bytes), sorted by key
//! ```
//! Each graph blob also carries its own checksum, so a blob taken out of a store is still
//! self-checking. Loading checks the header and the whole-file checksum, then decodes graphs in
//! parallel.

use crate::error::{corrupt, invalid, N2GError, Result};
use crate::format::{checksum, graph_from_bytes, graph_to_bytes, Reader};
use crate::parallel;
use crate::predict::{CompiledTrie, Semantics};
use crate::search::{Key, Role, StoreIndex, Term};
use crate::similarity::{self, Pair};
use crate::trie::NeuronGraph;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

pub const STORE_MAGIC: &[u8; 8] = b"N2GSTORE";
pub const STORE_FORMAT_VERSION: u32 = 1;
const STORE_HEADER_LEN: usize = 40;

/// (similar pairs, subset pairs).
pub type PairLists = (Vec<Pair>, Vec<Pair>);

/// A stored graph (always finalized) with its flat trie, compiled on first prediction.
#[derive(Debug)]
pub struct StoredGraph {
    pub graph: NeuronGraph,
    compiled: OnceLock<CompiledTrie>,
}

impl StoredGraph {
    fn new(mut graph: NeuronGraph) -> Self {
        graph.finalize();
        StoredGraph { graph, compiled: OnceLock::new() }
    }
    pub fn compiled(&self) -> &CompiledTrie {
        self.compiled.get_or_init(|| CompiledTrie::new(&self.graph))
    }
}

#[derive(Debug, Default)]
pub struct GraphStore {
    graphs: BTreeMap<Key, StoredGraph>,
    /// Search and similarity index over the current graphs; built on first use, dropped by
    /// every change.
    index: OnceLock<StoreIndex>,
    /// Last all-pairs result (threshold bits, (similar, subset)): similar_pairs and
    /// subset_pairs come from one join, so asking for both costs one.
    pairs_cache: Mutex<Option<(u32, Arc<PairLists>)>>,
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
    pub fn get(&self, key: Key) -> Result<&NeuronGraph> {
        self.graphs.get(&key).map(|s| &s.graph).ok_or(N2GError::UnknownKey { layer: key.0, neuron: key.1 })
    }

    /// Adds (or replaces) the graph under its own (layer, neuron); it is finalized.
    /// Drops everything derived from the set of graphs.
    fn changed(&mut self) {
        self.index = OnceLock::new();
        *self.pairs_cache.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn insert(&mut self, graph: NeuronGraph) {
        self.changed();
        self.graphs.insert(graph.key(), StoredGraph::new(graph));
    }

    pub fn extend(&mut self, graphs: Vec<NeuronGraph>) {
        self.changed();
        for g in graphs {
            self.graphs.insert(g.key(), StoredGraph::new(g));
        }
    }

    pub fn remove(&mut self, key: Key) -> Result<NeuronGraph> {
        let g = self.graphs.remove(&key).ok_or(N2GError::UnknownKey { layer: key.0, neuron: key.1 })?;
        self.changed();
        Ok(g.graph)
    }

    /// Decodes many `graph_to_bytes` blobs in parallel (what the workspace keeps per neuron).
    pub fn decode_blobs(blobs: &[&[u8]]) -> Result<Vec<NeuronGraph>> {
        parallel::install(|| {
            blobs
                .par_iter()
                .enumerate()
                .map(|(i, b)| graph_from_bytes(b).map_err(|e| corrupt!("blob {i}: {e}")))
                .collect()
        })
    }

    // --- store file ----------------------------------------------------------------------

    pub fn to_bytes(&self) -> Vec<u8> {
        let blobs: Vec<Vec<u8>> = parallel::install(|| {
            let gs: Vec<&NeuronGraph> = self.graphs.values().map(|s| &s.graph).collect();
            gs.par_iter().map(|g| graph_to_bytes(g)).collect()
        });
        let payload_len: usize = blobs.iter().map(|b| 4 + b.len()).sum();
        let mut out = Vec::with_capacity(STORE_HEADER_LEN + payload_len);
        out.extend_from_slice(STORE_MAGIC);
        out.extend_from_slice(&STORE_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(blobs.len() as u64).to_le_bytes());
        out.extend_from_slice(&(payload_len as u64).to_le_bytes());
        let crc_at = out.len();
        out.extend_from_slice(&[0u8; 8]);
        for b in &blobs {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        let crc = checksum(&out[..crc_at], &out[STORE_HEADER_LEN..]);
        out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn from_bytes(data: &[u8]) -> Result<GraphStore> {
        let mut r = Reader::new(data, "store file");
        let magic = r.array::<8>("the magic")?;
        if &magic != STORE_MAGIC {
            return Err(corrupt!("not an n2g store file (magic {:?}, expected {:?})", String::from_utf8_lossy(&magic), "N2GSTORE"));
        }
        let version = r.u32("the format version")?;
        if version != STORE_FORMAT_VERSION {
            return Err(corrupt!("store file has format version {version}; this build reads version {STORE_FORMAT_VERSION}"));
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
        let mut blobs: Vec<&[u8]> = Vec::with_capacity(count as usize);
        for i in 0..count {
            let n = r.u32("a graph length")? as usize;
            blobs.push(r.bytes(n, "a graph").map_err(|_| corrupt!("store file is corrupt: graph {i} overruns the payload"))?);
        }
        if r.remaining() != 0 {
            return Err(corrupt!("store file is corrupt: {} bytes after the last graph", r.remaining()));
        }
        let graphs = Self::decode_blobs(&blobs).map_err(|e| corrupt!("store file: {e}"))?;
        let mut store = GraphStore::new();
        for g in graphs {
            let key = g.key();
            // Bytes hold finalized graphs; StoredGraph::new is then a no-op finalize.
            if store.graphs.insert(key, StoredGraph::new(g)).is_some() {
                return Err(corrupt!("store file is corrupt: key ({}, {}) appears twice", key.0, key.1));
            }
        }
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
        let graphs: Vec<&CompiledTrie> = keys
            .iter()
            .map(|&k| self.graphs.get(&k).map(|g| g.compiled()).ok_or(N2GError::UnknownKey { layer: k.0, neuron: k.1 }))
            .collect::<Result<_>>()?;
        if out.is_empty() {
            return Ok(());
        }
        let table = RootTable::new(&graphs);
        // 1. Matches (slot, sequence, position, table entry of the slot's first root), per
        //    sequence in parallel.
        let matches: Vec<Match> = parallel::install(|| {
            (0..n_seq)
                .into_par_iter()
                .flat_map_iter(|s| {
                    let seq = &ids[s * tokens..(s + 1) * tokens];
                    let mut found = Vec::new();
                    for (i, &t) in seq.iter().enumerate() {
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
        });
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
        parallel::install(|| {
            out.par_chunks_mut(block).enumerate().for_each_init(
                || (Vec::new(), Vec::new()),
                |(stack, roots), (slot, o)| {
                    let ct = graphs[slot];
                    for m in &by_graph[start[slot] as usize..start[slot + 1] as usize] {
                        let (s, i) = (m.seq as usize, m.pos as usize);
                        let seq = &ids[s * tokens..(s + 1) * tokens];
                        let v = match sem {
                            // Greedy starts from the graph's first matching root only.
                            Semantics::GreedyDeepest => ct.greedy_from(table.node[m.entry as usize], seq, i),
                            Semantics::AllPathsMax => {
                                let (_, end) = table.range(seq[i]);
                                roots.clear();
                                let mut e = m.entry as usize;
                                while e < end && table.slot[e] == m.slot {
                                    roots.push(table.node[e]);
                                    e += 1;
                                }
                                ct.all_paths_from(roots, seq, i, stack)
                            }
                        };
                        if v != 0.0 {
                            o[s * tokens + i] = v;
                        }
                    }
                },
            )
        });
        Ok(())
    }

    // --- search and similarity -----------------------------------------------------------

    pub fn index(&self) -> &StoreIndex {
        self.index.get_or_init(|| StoreIndex::build(self.graphs.iter().map(|(k, s)| (*k, &s.graph))))
    }

    pub fn search(&self, clauses: &[(Term, Role)]) -> Result<Vec<Key>> {
        self.index().search(clauses)
    }

    pub fn in_context_neurons(&self) -> Vec<(Key, Vec<String>, f32)> {
        self.index().in_context()
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
        let res = Arc::new(similarity::all_pairs(self.index(), t));
        *self.pairs_cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((t.to_bits(), res.clone()));
        Ok(res)
    }

    pub fn neighbours(&self, key: Key, k: usize) -> Result<Vec<(Key, f32, f32, f32)>> {
        if k == 0 {
            return Err(invalid!("k must be at least 1"));
        }
        let ix = self.index();
        let g = ix.keys.binary_search(&key).map_err(|_| N2GError::UnknownKey { layer: key.0, neuron: key.1 })?;
        Ok(similarity::neighbours(ix, g, k))
    }
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
    fn new(graphs: &[&CompiledTrie]) -> Self {
        let mut rows: Vec<(u32, u32, u32)> = Vec::new();
        for (slot, ct) in graphs.iter().enumerate() {
            rows.extend(ct.roots().map(|(t, r)| (t, slot as u32, r)));
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
    use crate::search::tests::arb_graphs;
    use proptest::prelude::*;

    fn store(gs: &[NeuronGraph]) -> GraphStore {
        let mut s = GraphStore::new();
        s.extend(gs.to_vec());
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
        s.insert(crate::format::tests::sample());
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
            g2.finalize();
            let want = match sem {
                Semantics::GreedyDeepest => reference::greedy(&g2, &seq),
                Semantics::AllPathsMax => reference::all_paths(&g2, &seq),
            };
            assert_eq!(want, vec![0.0, 0.8, 0.5, 0.0, 0.0]);
            assert_eq!(s.predict(&[g.key(), g.key()], &seq, 1, 5, sem).unwrap(), [want.clone(), want].concat());
        }
    }

    proptest! {
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
                        let want = match sem { Semantics::GreedyDeepest => reference::greedy(g, seq), Semantics::AllPathsMax => reference::all_paths(g, seq) };
                        let at = (gi * seqs.len() + si) * 6;
                        prop_assert_eq!(&out[at..at + 6], &want[..]);
                    }
                }
            }
        }

        #[test]
        fn store_bytes_round_trip(gs in arb_graphs()) {
            let s = store(&gs);
            let b = s.to_bytes();
            let back = GraphStore::from_bytes(&b).unwrap();
            prop_assert_eq!(back.keys(), s.keys());
            for k in s.keys() {
                prop_assert_eq!(back.get(k).unwrap(), s.get(k).unwrap());
            }
            prop_assert_eq!(back.to_bytes(), b);
        }
    }
}
