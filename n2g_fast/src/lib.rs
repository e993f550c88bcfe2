//! `n2g_fast`: the Rust core of n2g (n2g-method.md). Pure Rust modules do the work (no PyO3 in
//! them); `bindings` is the thin PyO3 layer, and this file only declares modules and registers
//! the Python classes.

pub mod error;
pub mod format;
pub mod packed;
pub mod parallel;
pub mod predict;
pub mod render;
pub mod search;
pub mod similarity;
pub mod store;
pub mod topk;
pub mod trie;

mod bindings;

use pyo3::prelude::*;

#[pymodule]
fn n2g_fast(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Before any pool exists, so a fork after a batch call gets a fresh pool in the child.
    parallel::register_fork_handler();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("GRAPH_SCHEMA", format::GRAPH_SCHEMA)?;
    m.add("N2GError", m.py().get_type::<bindings::error::N2GError>())?;
    m.add_class::<bindings::topk::PyTopK>()?;
    m.add_class::<bindings::graph::PyNeuronGraph>()?;
    m.add_class::<bindings::store::PyGraphStore>()?;
    m.add_function(wrap_pyfunction!(bindings::graph::visible, m)?)?;
    Ok(())
}
