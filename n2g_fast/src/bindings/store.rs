//! Python wrapper of `crate::store::GraphStore`.
//!
//! The store sits behind a `RwLock` in a frozen class: queries share it and run with the GIL
//! released (so several threads can query at once), changes take it exclusively, also without
//! the GIL so a long query never blocks the interpreter.

use super::error::bad_input;
use super::graph::PyNeuronGraph;
use super::input::{index_u32, token_sequences};
use crate::predict::Semantics;
use crate::search::{Key, Role, Term};
use crate::similarity::Pair;
use crate::store::GraphStore;
use numpy::{PyArray3, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBool, PyBytes, PyInt, PyString};
use std::path::PathBuf;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

#[pyclass(name = "GraphStore", module = "n2g_fast", frozen)]
pub struct PyGraphStore {
    inner: RwLock<GraphStore>,
}

impl PyGraphStore {
    fn wrap(store: GraphStore) -> Self {
        PyGraphStore { inner: RwLock::new(store) }
    }
    // A poisoned lock can only come from a panic in the core, which validates instead of
    // panicking; the data is still consistent (every change is a single map operation).
    fn read(&self) -> RwLockReadGuard<'_, GraphStore> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, GraphStore> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// A `(layer, neuron)` key from Python.
pub fn key(obj: &Bound<'_, PyAny>) -> PyResult<Key> {
    let (l, n): (i64, i64) = obj
        .extract()
        .map_err(|_| bad_input(format!("a key must be a (layer, neuron) pair of ints, got {obj}")))?;
    Ok((index_u32(l, "layer")?, index_u32(n, "neuron")?))
}

fn keys(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Key>> {
    let iter = obj.try_iter().map_err(|_| bad_input("keys must be a sequence of (layer, neuron) pairs"))?;
    iter.map(|k| key(&k?)).collect()
}

/// Largest output `GraphStore.predict` makes: 2**31 float32 values (8 GiB).
const MAX_PREDICT_VALUES: usize = 1 << 31;

type PairOut = ((u32, u32), (u32, u32), f32, f32);

fn pairs_out(p: &[Pair]) -> Vec<PairOut> {
    p.iter().map(|p| (p.a, p.b, p.activating, p.context)).collect()
}

fn blobs(obj: &Bound<'_, PyAny>) -> PyResult<Vec<PyBackedBytes>> {
    if obj.is_instance_of::<PyBytes>() {
        return Err(bad_input("blobs must be a sequence of bytes objects, got one bytes object (wrap it in a list)"));
    }
    let iter = obj.try_iter().map_err(|_| bad_input("blobs must be a sequence of bytes objects"))?;
    iter.enumerate()
        .map(|(i, b)| b?.extract::<PyBackedBytes>().map_err(|_| bad_input(format!("blobs[{i}] is not bytes"))))
        .collect()
}

#[pymethods]
impl PyGraphStore {
    #[new]
    fn new() -> Self {
        Self::wrap(GraphStore::new())
    }

    fn __len__(&self) -> usize {
        self.read().len()
    }

    fn __contains__(&self, k: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.read().contains(key(k)?))
    }

    /// Sorted `(layer, neuron)` keys.
    fn keys(&self) -> Vec<Key> {
        self.read().keys()
    }

    /// Adds a copy of `graph` (finalized) under (graph.layer, graph.neuron), replacing any
    /// graph already there. Later changes to `graph` do not reach the store.
    fn add(&self, py: Python<'_>, graph: &Bound<'_, PyNeuronGraph>) -> PyResult<()> {
        let g = {
            let mut pg = graph.try_borrow_mut()?;
            pg.finalized()?.clone()
        };
        py.detach(|| self.write().insert(g))?;
        Ok(())
    }

    /// Adds many graphs given as `NeuronGraph.to_bytes()` blobs, decoded in parallel without
    /// the GIL. All or nothing: one bad blob raises N2GError naming it and adds none.
    fn add_bytes(&self, py: Python<'_>, blobs: &Bound<'_, PyAny>) -> PyResult<()> {
        let owned = self::blobs(blobs)?;
        py.detach(|| {
            let slices: Vec<&[u8]> = owned.iter().map(|b| &**b).collect();
            self.write().add_blobs(&slices)
        })?;
        Ok(())
    }

    /// A new store from `NeuronGraph.to_bytes()` blobs (see add_bytes).
    #[staticmethod]
    fn from_bytes_list(py: Python<'_>, blobs: &Bound<'_, PyAny>) -> PyResult<Self> {
        let s = Self::new();
        s.add_bytes(py, blobs)?;
        Ok(s)
    }

    fn remove(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<()> {
        let k = self::key(key)?;
        py.detach(|| self.write().remove(k))?;
        Ok(())
    }

    /// A copy of the graph stored under `key`.
    fn get(&self, key: &Bound<'_, PyAny>) -> PyResult<PyNeuronGraph> {
        let k = self::key(key)?;
        Ok(PyNeuronGraph::wrap(self.read().get(k)?))
    }

    /// Bytes the graphs hold in memory (see `GraphStore::heap_bytes`).
    fn heap_bytes(&self) -> usize {
        self.read().heap_bytes()
    }

    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.read().save(&path))?;
        Ok(())
    }

    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        Ok(Self::wrap(py.detach(|| GraphStore::load(&path))?))
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let data = py.detach(|| self.read().to_bytes());
        PyBytes::new(py, &data)
    }

    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: PyBackedBytes) -> PyResult<Self> {
        Ok(Self::wrap(py.detach(|| GraphStore::from_bytes(&data))?))
    }

    /// float32 `[len(keys), n_sequences, n_tokens]`. Sequences must all have the same length
    /// (a 2-D integer array, or equal-length lists / 1-D arrays); ragged or empty input raises.
    #[pyo3(signature = (keys, token_id_sequences, semantics = "all_paths_max", *, vocab_size = None))]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
        token_id_sequences: &Bound<'py, PyAny>,
        semantics: &str,
        vocab_size: Option<i64>,
    ) -> PyResult<Bound<'py, PyArray3<f32>>> {
        let sem: Semantics = semantics.parse()?;
        let ks = self::keys(keys)?;
        if ks.is_empty() {
            return Err(bad_input("keys is empty: give at least one (layer, neuron)"));
        }
        let seqs = token_sequences(token_id_sequences, vocab_size)?;
        if seqs.len() == 0 {
            return Err(bad_input("token_id_sequences is empty: give at least one sequence"));
        }
        let t = seqs.rectangular().map_err(|(s, len, l0)| {
            bad_input(format!(
                "token_id_sequences is ragged: sequence {s} has {len} tokens, sequence 0 has {l0}; pad them to one length (predictions at padding are meaningless but harmless) or call per length"
            ))
        })?;
        if t == 0 {
            return Err(bad_input("token_id_sequences has sequences of 0 tokens"));
        }
        let n = seqs.len();
        // Keys may repeat, so a small request can ask for terabytes: refuse before allocating.
        let total = ks.len().checked_mul(n).and_then(|x| x.checked_mul(t)).filter(|&x| x <= MAX_PREDICT_VALUES);
        if total.is_none() {
            return Err(bad_input(format!(
                "the output [len(keys), sequences, tokens] = [{}, {n}, {t}] would hold more than {MAX_PREDICT_VALUES} values; predict in smaller batches",
                ks.len()
            )));
        }
        // numpy's zeros: lazily zeroed and (on Linux) backed by huge pages, so the mostly-zero
        // output costs little; the core writes only the non-zero predictions. Called through
        // Python so a failed allocation is a MemoryError (rust-numpy's `zeros` panics).
        let out = py.import("numpy")?.getattr("zeros")?.call1(((ks.len(), n, t), "float32"))?.cast_into::<PyArray3<f32>>()?;
        // SAFETY: the array was just created here and is not visible to Python yet, so this is
        // the only reference to its (C-contiguous) data.
        let slice = unsafe { out.as_slice_mut() }.map_err(|e| bad_input(format!("cannot write the output array: {e}")))?;
        py.detach(|| self.read().predict_into(&ks, &seqs.ids, n, t, sem, slice))?;
        Ok(out)
    }

    /// Keys of graphs matching every `(token_id_or_label, role)` clause, sorted. An int matches
    /// nodes whose token-id set holds it; a str matches node labels exactly (normalised
    /// labels). Roles: "activating", "context", "either".
    fn search(&self, py: Python<'_>, clauses: &Bound<'_, PyAny>) -> PyResult<Vec<Key>> {
        let iter = clauses.try_iter().map_err(|_| bad_input("clauses must be a sequence of (token_id_or_label, role) pairs"))?;
        let mut parsed = Vec::new();
        for (i, c) in iter.enumerate() {
            let c = c?;
            let (term, role): (Bound<'_, PyAny>, String) = c
                .extract()
                .map_err(|_| bad_input(format!("clauses[{i}] must be a (token_id_or_label, role) pair, got {c}")))?;
            let term = if term.is_instance_of::<PyString>() {
                Term::Label(term.extract()?)
            } else if term.is_instance_of::<PyInt>() && !term.is_instance_of::<PyBool>() {
                let v: i64 = term.extract().map_err(|_| bad_input(format!("clauses[{i}]: token id {term} is out of range")))?;
                Term::Token(crate::format::token_id(v, || format!("clauses[{i}]"))?)
            } else {
                return Err(bad_input(format!("clauses[{i}]: the term must be a token id (int) or a label (str), got {term}")));
            };
            parsed.push((term, role.parse::<Role>().map_err(|e| bad_input(format!("clauses[{i}]: {e}")))?));
        }
        Ok(py.detach(|| self.read().search(&parsed))?)
    }

    /// Graphs whose activating labels also appear among their own context labels (the paper's
    /// in-context / repeated-token neurons): `[(key, shared labels, fraction)]` with fraction =
    /// shared / activating labels, ranked by number shared, then fraction, then key.
    #[pyo3(signature = (limit = None))]
    fn in_context_neurons(&self, py: Python<'_>, limit: Option<usize>) -> PyResult<Vec<(Key, Vec<String>, f32)>> {
        let mut v = py.detach(|| self.read().in_context_neurons())?;
        if let Some(l) = limit {
            v.truncate(l);
        }
        Ok(v)
    }

    /// `[(key_a, key_b, activating_overlap, context_overlap)]`, key_a < key_b, overlaps by max.
    #[pyo3(signature = (threshold = 0.9))]
    fn similar_pairs(&self, py: Python<'_>, threshold: f64) -> PyResult<Vec<PairOut>> {
        Ok(pairs_out(&py.detach(|| self.read().pairs(threshold))?.0))
    }

    /// `[(subset_key, superset_key, activating_overlap, context_overlap)]`, overlaps by min;
    /// pairs that are similar are not repeated here.
    #[pyo3(signature = (threshold = 0.9))]
    fn subset_pairs(&self, py: Python<'_>, threshold: f64) -> PyResult<Vec<PairOut>> {
        Ok(pairs_out(&py.detach(|| self.read().pairs(threshold))?.1))
    }

    /// Up to k graphs sharing a label with `key`'s graph: `[(key, score, activating_overlap,
    /// context_overlap)]`, score = mean of the two max-normalised overlaps, best first.
    #[pyo3(signature = (key, k = 10))]
    fn neighbours(&self, py: Python<'_>, key: &Bound<'_, PyAny>, k: i64) -> PyResult<Vec<(Key, f32, f32, f32)>> {
        let kk = self::key(key)?;
        let k = usize::try_from(k).map_err(|_| bad_input(format!("k must be at least 1, got {k}")))?;
        Ok(py.detach(|| self.read().neighbours(kk, k))?)
    }

    fn __repr__(&self) -> String {
        format!("GraphStore(n_graphs={})", self.read().len())
    }
}
