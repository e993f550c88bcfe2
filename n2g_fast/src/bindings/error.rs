//! The one place where core errors become Python exceptions: every `crate::error::N2GError`
//! turns into `n2g_fast.N2GError` (a `ValueError` subclass), so `?` in a binding is enough.

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::PyErr;

create_exception!(
    n2g_fast,
    N2GError,
    PyValueError,
    "Raised for every bad input or bad data the n2g_fast core refuses; the message says what to fix."
);

impl From<crate::error::N2GError> for PyErr {
    fn from(e: crate::error::N2GError) -> PyErr {
        N2GError::new_err(e.to_string())
    }
}

/// An `N2GError` with `msg`, for checks done in the binding layer itself (Python types).
pub fn bad_input(msg: impl Into<String>) -> PyErr {
    N2GError::new_err(msg.into())
}
