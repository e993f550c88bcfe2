//! Python wrapper of `crate::trie::NeuronGraph` (plus its prediction, formats and rendering).

use super::error::bad_input;
use super::input::{index_u32, token_ids, token_sequences};
use crate::format;
use crate::parallel;
use crate::predict::{CompiledTrie, Semantics};
use crate::render;
use crate::trie::{Element, NeuronGraph};
use numpy::PyArray1;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use rayon::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyList, PyTuple};
use std::sync::Arc;

#[pyclass(name = "NeuronGraph", module = "n2g_fast")]
pub struct PyNeuronGraph {
    pub(crate) inner: NeuronGraph,
    /// Flat trie for prediction; dropped whenever the trie changes.
    compiled: Option<Arc<CompiledTrie>>,
}

impl PyNeuronGraph {
    pub(crate) fn wrap(inner: NeuronGraph) -> Self {
        PyNeuronGraph { inner, compiled: None }
    }

    /// The finalized trie (finalizing on first use after a change; an N2GError, with the graph
    /// unchanged, when the merge would grow it past the limit of `NeuronGraph::finalize`).
    pub(crate) fn finalized(&mut self) -> PyResult<&NeuronGraph> {
        if !self.inner.is_finalized() {
            self.compiled = None;
            self.inner.finalize()?;
        }
        Ok(&self.inner)
    }

    fn compiled(&mut self) -> PyResult<Arc<CompiledTrie>> {
        self.finalized()?;
        Ok(self.compiled.get_or_insert_with(|| Arc::new(CompiledTrie::new(&self.inner))).clone())
    }
}

/// The graph is borrowed by another call. Arguments are converted before borrowing, so this
/// needs two threads inside the core at once (free-threaded Python); a clean error, not a panic.
fn busy<E>(_: E) -> PyErr {
    PyRuntimeError::new_err("the NeuronGraph is being used by another call (another thread); try again")
}

fn element(obj: &Bound<'_, PyAny>, what: &str, value_name: &str) -> PyResult<Element> {
    let t = obj
        .cast::<PyTuple>()
        .ok()
        .filter(|t| t.len() == 3)
        .ok_or_else(|| bad_input(format!("{what} must be a (label, token_ids, {value_name}) tuple, got {obj}")))?;
    let item = t.get_item(0)?;
    let label: String = item.extract().map_err(|e| {
        if item.is_instance_of::<pyo3::types::PyString>() {
            bad_input(format!("{what} label is not valid Unicode text ({e}): e.g. a lone surrogate"))
        } else {
            bad_input(format!("{what} label must be a str"))
        }
    })?;
    let ids = token_ids(&t.get_item(1)?, what)?;
    let value: f64 = t.get_item(2)?.extract().map_err(|_| bad_input(format!("{what} {value_name} must be a number")))?;
    Ok(Element { label, token_ids: ids, value: value as f32 })
}

// `to_*` take `&mut self`: reading the trie finalizes it first (the documented contract).
#[allow(clippy::wrong_self_convention)]
#[pymethods]
impl PyNeuronGraph {
    #[new]
    fn new(model: String, layer: i64, neuron: i64, hook: String, max_activation: f64) -> PyResult<Self> {
        let g = NeuronGraph::new(model, index_u32(layer, "layer")?, index_u32(neuron, "neuron")?, hook, max_activation)?;
        Ok(Self::wrap(g))
    }

    #[getter]
    fn model(&self) -> &str {
        &self.inner.model
    }
    #[setter]
    fn set_model(&mut self, v: String) {
        self.inner.model = v;
    }
    #[getter]
    fn layer(&self) -> u32 {
        self.inner.layer
    }
    #[setter]
    fn set_layer(&mut self, v: i64) -> PyResult<()> {
        self.inner.layer = index_u32(v, "layer")?;
        Ok(())
    }
    #[getter]
    fn neuron(&self) -> u32 {
        self.inner.neuron
    }
    #[setter]
    fn set_neuron(&mut self, v: i64) -> PyResult<()> {
        self.inner.neuron = index_u32(v, "neuron")?;
        Ok(())
    }
    #[getter]
    fn hook(&self) -> &str {
        &self.inner.hook
    }
    #[setter]
    fn set_hook(&mut self, v: String) {
        self.inner.hook = v;
    }
    #[getter]
    fn max_activation(&self) -> f64 {
        self.inner.max_activation
    }
    #[setter]
    fn set_max_activation(&mut self, v: f64) -> PyResult<()> {
        if !v.is_finite() {
            return Err(bad_input(format!("max_activation must be a finite number, got {v}")));
        }
        self.inner.max_activation = v;
        Ok(())
    }

    // `slf`, not `&mut self`: converting the arguments runs Python code (iterators, __float__,
    // __index__) that may use this graph (another thread, or re-entrantly), so the graph is
    // borrowed only once they are Rust values.
    fn add_path(slf: &Bound<'_, Self>, activating: &Bound<'_, PyAny>, context: &Bound<'_, PyAny>, end: f64) -> PyResult<()> {
        let act = element(activating, "activating", "activation")?;
        let mut ctx = Vec::new();
        let iter = context
            .try_iter()
            .map_err(|_| bad_input("context must be a sequence of (label, token_ids, importance) tuples or None"))?;
        for (j, e) in iter.enumerate() {
            let e = e?;
            ctx.push(if e.is_none() { None } else { Some(element(&e, &format!("context[{j}]"), "importance")?) });
        }
        let mut this = slf.try_borrow_mut().map_err(busy)?;
        this.inner.add_path(&act, &ctx, end as f32)?;
        this.compiled = None;
        Ok(())
    }

    fn finalize(&mut self) -> PyResult<()> {
        self.finalized()?;
        Ok(())
    }

    #[pyo3(signature = (token_id_sequences, semantics = "all_paths_max", *, vocab_size = None))]
    fn predict<'py>(
        slf: &Bound<'py, Self>,
        token_id_sequences: &Bound<'py, PyAny>,
        semantics: &str,
        vocab_size: Option<i64>,
    ) -> PyResult<Bound<'py, PyList>> {
        let py = slf.py();
        let sem: Semantics = semantics.parse()?;
        let seqs = token_sequences(token_id_sequences, vocab_size)?;
        // Borrow only long enough to get the compiled trie, so other threads can use the
        // graph while this one predicts without the GIL.
        let ct = slf.try_borrow_mut().map_err(busy)?.compiled()?;
        let outs: Vec<Vec<f32>> = py.detach(|| {
            parallel::install(|| {
                (0..seqs.len())
                    .into_par_iter()
                    .map_init(Vec::new, |stack, s| {
                        let seq = seqs.get(s);
                        let mut out = vec![0.0f32; seq.len()];
                        ct.predict_into(seq, &mut out, sem, stack);
                        out
                    })
                    .collect()
            })
        })?;
        PyList::new(py, outs.into_iter().map(|v| PyArray1::from_vec(py, v)))
    }

    fn activating_labels(&mut self) -> PyResult<Vec<String>> {
        Ok(self.finalized()?.activating_labels())
    }

    fn context_labels(&mut self) -> PyResult<Vec<String>> {
        Ok(self.finalized()?.context_labels())
    }

    #[getter]
    fn n_nodes(&mut self) -> PyResult<usize> {
        Ok(self.finalized()?.n_nodes())
    }

    #[getter]
    fn n_paths(&mut self) -> PyResult<usize> {
        Ok(self.finalized()?.n_paths())
    }

    fn to_json(&mut self) -> PyResult<String> {
        Ok(format::graph_to_json(self.finalized()?))
    }

    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        Ok(Self::wrap(format::graph_from_json(text)?))
    }

    fn to_bytes<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, &format::graph_to_bytes(self.finalized()?)))
    }

    #[staticmethod]
    fn from_bytes(data: PyBackedBytes) -> PyResult<Self> {
        Ok(Self::wrap(format::graph_from_bytes(&data)?))
    }

    fn to_dot(&mut self) -> PyResult<String> {
        Ok(render::to_dot(self.finalized()?))
    }

    fn to_svg(&mut self) -> PyResult<String> {
        Ok(render::to_svg(self.finalized()?))
    }

    /// Same metadata and same finalized trie.
    fn __eq__(slf: &Bound<'_, Self>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        if slf.is(other) {
            return Ok(true);
        }
        let Ok(other) = other.cast::<PyNeuronGraph>() else { return Ok(false) };
        let (mut a, mut b) = (slf.try_borrow_mut().map_err(busy)?, other.try_borrow_mut().map_err(busy)?);
        Ok(a.finalized()? == b.finalized()?)
    }

    /// Pickles through the binary form (so graphs cross `multiprocessing` boundaries).
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let py = slf.py();
        let ctor = py.get_type::<PyNeuronGraph>().getattr("from_bytes")?;
        let bytes = slf.try_borrow_mut().map_err(busy)?.to_bytes(py)?;
        Ok((ctor, (bytes,)))
    }

    fn __repr__(&mut self) -> PyResult<String> {
        let g = self.finalized()?;
        Ok(format!(
            "NeuronGraph(model={:?}, layer={}, neuron={}, hook={:?}, max_activation={}, n_nodes={}, n_paths={})",
            g.model,
            g.layer,
            g.neuron,
            g.hook,
            g.max_activation,
            g.n_nodes(),
            g.n_paths()
        ))
    }
}


/// The label as the drawings show it (see `render::visible`): the report shows tokens the same
/// way, so both agree on every character.
#[pyfunction]
pub fn visible(label: &str) -> String {
    render::visible(label)
}
