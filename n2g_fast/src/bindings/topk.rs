//! Python wrapper of `crate::topk::TopK`.

use super::error::bad_input;
use super::input::{copy_array, int64_vec};
use crate::topk::{Batch, TopK};
use numpy::{PyArray1, PyArray2, PyArray3, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::borrow::Cow;

/// (window ids, scores), both [n_neurons, k].
type TopArrays<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>);

#[pyclass(name = "TopK", module = "n2g_fast")]
pub struct PyTopK {
    inner: TopK,
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!("a {}-D array of dtype {}", a.ndim(), a.dtype().str().map(|s| s.to_string()).unwrap_or_default()),
        Err(_) => obj.get_type().name().map(|n| n.to_string()).unwrap_or_default(),
    }
}

#[pymethods]
impl PyTopK {
    #[new]
    #[pyo3(signature = (n_neurons, k = 20))]
    fn new(n_neurons: i64, k: i64) -> PyResult<Self> {
        let n = usize::try_from(n_neurons).map_err(|_| bad_input(format!("n_neurons must be at least 1, got {n_neurons}")))?;
        let k = usize::try_from(k).map_err(|_| bad_input(format!("k must be at least 1, got {k}")))?;
        Ok(PyTopK { inner: TopK::new(n, k)? })
    }

    #[getter]
    fn n_neurons(&self) -> usize {
        self.inner.n_neurons()
    }

    #[getter]
    fn k(&self) -> usize {
        self.inner.k()
    }

    /// Folds one batch in; releases the GIL and runs in parallel over neurons.
    #[pyo3(signature = (activations, window_ids, token_mask = None))]
    fn update(&mut self, py: Python<'_>, activations: &Bound<'_, PyAny>, window_ids: &Bound<'_, PyAny>, token_mask: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let acts = activations.cast::<PyArray3<f32>>().map_err(|_| {
            bad_input(format!(
                "activations must be a float32 numpy array [batch, tokens, n_neurons], got {} (use .astype(np.float32))",
                describe(activations)
            ))
        })?;
        let shape = acts.shape().to_vec();
        let (b, t, n) = (shape[0], shape[1], shape[2]);
        if n != self.inner.n_neurons() {
            return Err(bad_input(format!(
                "activations have {n} neurons on axis 2 (shape {shape:?}); this TopK holds {}",
                self.inner.n_neurons()
            )));
        }
        let ro = acts.try_readonly().map_err(|e| bad_input(format!("activations: cannot read the array ({e})")))?;
        // Non C-contiguous input (a transposed view, a slice) is copied once into C order.
        let data: Cow<[f32]> = match ro.as_slice().ok().filter(|_| acts.is_c_contiguous()) {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(copy_array(ro.as_array(), "activations")?),
        };
        let ids = int64_vec(window_ids, "window_ids")?;
        if ids.len() != b {
            return Err(bad_input(format!("window_ids has {} entries; activations have batch size {b}", ids.len())));
        }
        let mask_ro;
        let mask: Option<Cow<[bool]>> = match token_mask {
            None => None,
            Some(m) if m.is_none() => None,
            Some(m) => {
                let arr = m
                    .cast::<PyArray2<bool>>()
                    .map_err(|_| bad_input(format!("token_mask must be a bool numpy array [batch, tokens], got {}", describe(m))))?;
                if arr.shape() != [b, t] {
                    return Err(bad_input(format!("token_mask has shape {:?}; activations need [{b}, {t}]", arr.shape())));
                }
                mask_ro = arr.try_readonly().map_err(|e| bad_input(format!("token_mask: cannot read the array ({e})")))?;
                Some(match mask_ro.as_slice().ok().filter(|_| arr.is_c_contiguous()) {
                    Some(s) => Cow::Borrowed(s),
                    None => Cow::Owned(copy_array(mask_ro.as_array(), "token_mask")?),
                })
            }
        };
        let batch = Batch { activations: &data, batch: b, tokens: t, window_ids: &ids, token_mask: mask.as_deref() };
        let inner = &mut self.inner;
        py.detach(|| inner.update(&batch))?;
        Ok(())
    }

    /// Folds in window scores reduced elsewhere (e.g. on the GPU): `[batch, n_neurons]`.
    fn update_window_max(&mut self, py: Python<'_>, window_max: &Bound<'_, PyAny>, window_ids: &Bound<'_, PyAny>) -> PyResult<()> {
        let arr = window_max.cast::<PyArray2<f32>>().map_err(|_| {
            bad_input(format!(
                "window_max must be a float32 numpy array [batch, n_neurons], got {} (use .astype(np.float32))",
                describe(window_max)
            ))
        })?;
        let (b, n) = (arr.shape()[0], arr.shape()[1]);
        if n != self.inner.n_neurons() {
            return Err(bad_input(format!("window_max has {n} neurons on axis 1; this TopK holds {}", self.inner.n_neurons())));
        }
        let ids = int64_vec(window_ids, "window_ids")?;
        if ids.len() != b {
            return Err(bad_input(format!("window_ids has {} entries; window_max has {b} rows", ids.len())));
        }
        let ro = arr.try_readonly().map_err(|e| bad_input(format!("window_max: cannot read the array ({e})")))?;
        let data: Cow<[f32]> = match ro.as_slice().ok().filter(|_| arr.is_c_contiguous()) {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(copy_array(ro.as_array(), "window_max")?),
        };
        let inner = &mut self.inner;
        py.detach(|| inner.update_window_max(&data, &ids))?;
        Ok(())
    }

    /// `[n_neurons]` float32; -inf for a neuron that saw no token.
    fn max_activation<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_slice(py, self.inner.max_activation())
    }

    /// `(window_ids [n_neurons, k] int64, scores [n_neurons, k] float32)`, best first.
    fn top<'py>(&self, py: Python<'py>) -> PyResult<TopArrays<'py>> {
        let (ids, scores) = self.inner.top();
        let shape = [self.inner.n_neurons(), self.inner.k()];
        Ok((PyArray1::from_slice(py, ids).reshape(shape)?, PyArray1::from_slice(py, scores).reshape(shape)?))
    }

    /// Folds in `other`'s result (a shard of the same scan, disjoint windows); exact.
    fn merge(&mut self, py: Python<'_>, other: PyRef<'_, PyTopK>) -> PyResult<()> {
        let (inner, o) = (&mut self.inner, &other.inner);
        py.detach(|| inner.merge(o))?;
        Ok(())
    }

    /// The versioned, checksummed binary form; `TopK.from_bytes` reads it back exactly.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        Ok(PyTopK { inner: py.detach(|| TopK::from_bytes(data))? })
    }

    /// Rebuilds an accumulator from `top()` and `max_activation()` arrays.
    #[staticmethod]
    fn from_arrays(window_ids: &Bound<'_, PyAny>, scores: &Bound<'_, PyAny>, max_activation: &Bound<'_, PyAny>) -> PyResult<Self> {
        let ids = window_ids
            .cast::<PyArray2<i64>>()
            .map_err(|_| bad_input(format!("window_ids must be an int64 numpy array [n_neurons, k], got {}", describe(window_ids))))?;
        let sc = scores
            .cast::<PyArray2<f32>>()
            .map_err(|_| bad_input(format!("scores must be a float32 numpy array [n_neurons, k], got {}", describe(scores))))?;
        let am = max_activation
            .cast::<PyArray1<f32>>()
            .map_err(|_| bad_input(format!("max_activation must be a float32 numpy array [n_neurons], got {}", describe(max_activation))))?;
        if ids.shape() != sc.shape() {
            return Err(bad_input(format!("window_ids has shape {:?} and scores {:?}; they must match", ids.shape(), sc.shape())));
        }
        let (n, k) = (ids.shape()[0], ids.shape()[1]);
        if am.len() != n {
            return Err(bad_input(format!("max_activation has {} values; window_ids has {n} rows", am.len())));
        }
        let read = |e: numpy::BorrowError| bad_input(format!("cannot read the array ({e})"));
        let ids = copy_array(ids.try_readonly().map_err(read)?.as_array(), "window_ids")?;
        let sc = copy_array(sc.try_readonly().map_err(read)?.as_array(), "scores")?;
        let am = copy_array(am.try_readonly().map_err(read)?.as_array(), "max_activation")?;
        Ok(PyTopK { inner: TopK::from_parts(n, k, ids, sc, am)? })
    }

    // Pickle (Ray ships accumulators between processes): rebuilt as TopK(n_neurons, k), then
    // the state is the binary form.
    fn __getnewargs__(&self) -> (usize, usize) {
        (self.inner.n_neurons(), self.inner.k())
    }

    fn __getstate__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        self.to_bytes(py)
    }

    fn __setstate__(&mut self, state: &[u8]) -> PyResult<()> {
        self.inner = TopK::from_bytes(state)?;
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("TopK(n_neurons={}, k={})", self.inner.n_neurons(), self.inner.k())
    }
}
