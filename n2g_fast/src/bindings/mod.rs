//! The thin PyO3 layer: one small wrapper file per core module. Python-facing types stay here;
//! the core never sees a Python object.

pub mod error;
pub mod graph;
pub mod input;
pub mod store;
pub mod topk;
