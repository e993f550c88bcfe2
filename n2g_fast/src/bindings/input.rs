//! Conversion of Python inputs (numpy arrays, lists) into core types, with `N2GError`s that say
//! which argument and which position is wrong.

use super::error::bad_input;
use crate::format::token_id;
use numpy::{PyArray1, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use numpy::ndarray::{ArrayView, Dimension};
use pyo3::exceptions::PyMemoryError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

/// Ragged token-id sequences in one buffer: sequence `s` is `ids[offsets[s]..offsets[s + 1]]`.
pub struct TokenSeqs {
    pub ids: Vec<u32>,
    pub offsets: Vec<usize>,
}

impl TokenSeqs {
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }
    pub fn get(&self, s: usize) -> &[u32] {
        &self.ids[self.offsets[s]..self.offsets[s + 1]]
    }
    /// The common length if every sequence has the same one, else the first sequence whose
    /// length differs from sequence 0's, with both lengths.
    pub fn rectangular(&self) -> Result<usize, (usize, usize, usize)> {
        let l0 = if self.len() == 0 { 0 } else { self.get(0).len() };
        match (1..self.len()).find(|&s| self.get(s).len() != l0) {
            None => Ok(l0),
            Some(s) => Err((s, self.get(s).len(), l0)),
        }
    }
}

/// Most token ids (and sequences) one prediction call takes: inputs far beyond memory (a
/// broadcast view, a zero-width array of 2**40 rows) are refused before anything is sized by them.
const MAX_IDS: usize = 1 << 31;

/// Room for `n` more values, or a MemoryError: an array's logical size can be far beyond its
/// memory (broadcast views, zero-width axes), and a failed `reserve` would abort the process.
pub fn reserve<T>(v: &mut Vec<T>, n: usize, what: &str) -> PyResult<()> {
    v.try_reserve(n).map_err(|_| PyMemoryError::new_err(format!("{what}: cannot allocate room for {n} values")))
}

/// A copy of an array view in logical (C) order; a MemoryError when it cannot be allocated.
pub fn copy_array<T: Copy, D: Dimension>(a: ArrayView<'_, T, D>, what: &str) -> PyResult<Vec<T>> {
    let mut out = Vec::new();
    reserve(&mut out, a.len(), what)?;
    out.extend(a.iter().copied());
    Ok(out)
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".to_owned())
}

fn check_vocab(v: u32, vocab_size: Option<u32>, at: impl Fn() -> String) -> PyResult<u32> {
    match vocab_size {
        Some(n) if v >= n => Err(bad_input(format!("token id {v} at {} is out of vocabulary (vocab_size = {n})", at()))),
        _ => Ok(v),
    }
}

/// Appends an integer numpy array's values (any integer dtype, any strides, C order) as u32
/// ids; `at(flat_index)` names a position for messages.
fn push_int_array(arr: &Bound<'_, PyUntypedArray>, name: &str, vocab: Option<u32>, out: &mut Vec<u32>, at: &dyn Fn(usize) -> String) -> PyResult<()> {
    let dtype = arr.dtype();
    let kind = dtype.kind();
    if kind != b'i' && kind != b'u' {
        return Err(bad_input(format!("{name} must hold integer token ids, got dtype {}", dtype.str().map(|s| s.to_string()).unwrap_or_default())));
    }
    if arr.len() > MAX_IDS - out.len() {
        return Err(bad_input(format!("{name} holds {} token ids; at most {MAX_IDS} per call (predict in smaller batches)", arr.len() + out.len())));
    }
    reserve(out, arr.len(), name)?;
    let borrow_err = |e: numpy::BorrowError| bad_input(format!("{name}: cannot read the array ({e})"));
    let mut push = |i: usize, v: i64| -> PyResult<()> {
        let id = token_id(v, || at(i))?;
        out.push(check_vocab(id, vocab, || at(i))?);
        Ok(())
    };
    if kind == b'u' && dtype.itemsize() == 8 {
        // u64 ids above i64::MAX must not wrap into negative ones.
        let a = arr.cast::<numpy::PyArrayDyn<u64>>().map_err(PyErr::from)?.try_readonly().map_err(borrow_err)?;
        for (i, &v) in a.as_array().iter().enumerate() {
            push(i, i64::try_from(v).unwrap_or(i64::MAX))?;
        }
        return Ok(());
    }
    let owned;
    let a64 = match arr.cast::<numpy::PyArrayDyn<i64>>() {
        Ok(a) => a,
        Err(_) => {
            // Narrower integer dtypes convert to int64 exactly.
            owned = arr.call_method1("astype", ("int64",))?;
            owned.cast::<numpy::PyArrayDyn<i64>>().map_err(PyErr::from)?
        }
    };
    let a = a64.try_readonly().map_err(borrow_err)?;
    // `as_slice` also accepts Fortran order, whose memory order is not the logical one.
    match a.as_slice().ok().filter(|_| a64.is_c_contiguous()) {
        Some(s) => {
            for (i, &v) in s.iter().enumerate() {
                push(i, v)?;
            }
        }
        None => {
            for (i, &v) in a.as_array().iter().enumerate() {
                push(i, v)?;
            }
        }
    }
    Ok(())
}

fn vocab_arg(vocab_size: Option<i64>) -> PyResult<Option<u32>> {
    match vocab_size {
        None => Ok(None),
        // Ids are u32: a vocabulary of 2**32 or more holds every one of them.
        Some(v) if v >= 1 => Ok(u32::try_from(v).ok()),
        Some(v) => Err(bad_input(format!("vocab_size must be at least 1, got {v}"))),
    }
}

/// `token_id_sequences` as accepted by `predict`: a 2-D integer numpy array `[sequences,
/// tokens]`, or a sequence whose items are 1-D integer arrays or sequences of ints (ragged
/// allowed here; callers decide). Negative, too large or (with `vocab_size`) out-of-vocabulary
/// ids raise `N2GError` naming the sequence and position.
pub fn token_sequences(obj: &Bound<'_, PyAny>, vocab_size: Option<i64>) -> PyResult<TokenSeqs> {
    const NAME: &str = "token_id_sequences";
    let vocab = vocab_arg(vocab_size)?;
    let mut seqs = TokenSeqs { ids: Vec::new(), offsets: vec![0] };
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        if arr.ndim() != 2 {
            return Err(bad_input(format!(
                "{NAME} must be a 2-D array [sequences, tokens], got a {}-D array{}",
                arr.ndim(),
                if arr.ndim() == 1 { " (wrap one sequence in a list: [ids])" } else { "" }
            )));
        }
        let (n, t) = (arr.shape()[0], arr.shape()[1]);
        if n > MAX_IDS {
            return Err(bad_input(format!("{NAME} has {n} sequences; at most {MAX_IDS} per call (predict in smaller batches)")));
        }
        push_int_array(arr, NAME, vocab, &mut seqs.ids, &|i| format!("sequence {}, position {}", i / t.max(1), i % t.max(1)))?;
        reserve(&mut seqs.offsets, n, NAME)?;
        seqs.offsets.extend((1..=n).map(|s| s * t));
        return Ok(seqs);
    }
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(bad_input(format!("{NAME} must be token ids, not a {}; tokenize the text first", type_name(obj))));
    }
    let iter = obj.try_iter().map_err(|_| {
        bad_input(format!("{NAME} must be a 2-D integer numpy array or a list of token id sequences, got {}", type_name(obj)))
    })?;
    for (s, item) in iter.enumerate() {
        let item = item?;
        if let Ok(arr) = item.cast::<PyUntypedArray>() {
            if arr.ndim() != 1 {
                return Err(bad_input(format!("{NAME}[{s}] must be a 1-D array of token ids, got a {}-D array", arr.ndim())));
            }
            push_int_array(arr, &format!("{NAME}[{s}]"), vocab, &mut seqs.ids, &|p| format!("sequence {s}, position {p}"))?;
        } else {
            if item.is_instance_of::<PyString>() {
                return Err(bad_input(format!("{NAME}[{s}] is a str; token ids are ints (tokenize the text first)")));
            }
            let v: Vec<i64> = item
                .extract()
                .map_err(|_| bad_input(format!("{NAME}[{s}] must be a sequence of int token ids, got {}", type_name(&item))))?;
            reserve(&mut seqs.ids, v.len(), NAME)?;
            for (p, x) in v.into_iter().enumerate() {
                let id = token_id(x, || format!("sequence {s}, position {p}"))?;
                seqs.ids.push(check_vocab(id, vocab, || format!("sequence {s}, position {p}"))?);
            }
        }
        seqs.offsets.push(seqs.ids.len());
    }
    Ok(seqs)
}

/// A vector of int64 from a 1-D integer numpy array or a sequence of ints.
pub fn int64_vec(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<i64>> {
    if let Ok(arr) = obj.cast::<PyArray1<i64>>() {
        let a = arr.try_readonly().map_err(|e| bad_input(format!("{name}: cannot read the array ({e})")))?;
        return copy_array(a.as_array(), name);
    }
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        let kind = arr.dtype().kind();
        if arr.ndim() != 1 || (kind != b'i' && kind != b'u') {
            return Err(bad_input(format!("{name} must be a 1-D integer array, got a {}-D array of kind '{}'", arr.ndim(), kind as char)));
        }
        if let Ok(a) = arr.cast::<PyArray1<u64>>() {
            // astype would wrap values >= 2**63 into negative ones.
            let a = a.try_readonly().map_err(|e| bad_input(format!("{name}: cannot read the array ({e})")))?;
            let a = a.as_array();
            let mut out = Vec::new();
            reserve(&mut out, a.len(), name)?;
            for (i, &v) in a.iter().enumerate() {
                out.push(i64::try_from(v).map_err(|_| bad_input(format!("{name}[{i}] = {v} is too large (at most {})", i64::MAX)))?);
            }
            return Ok(out);
        }
        let conv = arr.call_method1("astype", ("int64",))?;
        return int64_vec(&conv, name);
    }
    obj.extract::<Vec<i64>>().map_err(|_| bad_input(format!("{name} must be a 1-D int64 array or a list of ints, got {}", type_name(obj))))
}

/// Token ids given for one element of a path (list or 1-D array of non-negative ints).
pub fn token_ids(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u32>> {
    if obj.is_instance_of::<PyString>() {
        return Err(bad_input(format!("{what} token_ids must be a sequence of ints, got a str")));
    }
    let v = int64_vec(obj, &format!("{what} token_ids"))?;
    v.into_iter().enumerate().map(|(i, x)| token_id(x, || format!("{what} token_ids[{i}]")).map_err(PyErr::from)).collect()
}

/// A non-negative integer that fits u32 (layer, neuron).
pub fn index_u32(v: i64, name: &str) -> PyResult<u32> {
    u32::try_from(v).map_err(|_| bad_input(format!("{name} must be between 0 and {}, got {v}", u32::MAX)))
}
