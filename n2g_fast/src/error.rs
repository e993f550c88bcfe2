//! The one error type of the core. Every variant carries a message that says what to fix; the
//! binding layer turns all of them into the Python exception `N2GError` in one place
//! (`bindings::error`).

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum N2GError {
    /// A caller passed something the core cannot use (bad shape, negative id, unknown role...).
    #[error("{0}")]
    InvalidInput(String),
    /// Serialised data (JSON, bytes, store file) is malformed, truncated, corrupt or of an
    /// unsupported version.
    #[error("{0}")]
    Format(String),
    /// A (layer, neuron) key that is not in the store.
    #[error("no graph for key (layer={layer}, neuron={neuron}) in the store")]
    UnknownKey { layer: u32, neuron: u32 },
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(String),
    /// The system refused a resource the core needs (the threads of its pool).
    #[error("{0}")]
    Resource(String),
}

pub type Result<T> = std::result::Result<T, N2GError>;

/// Shorthand for an `InvalidInput` error built with `format!` arguments.
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::error::N2GError::InvalidInput(format!($($arg)*)) };
}

/// Shorthand for a `Format` error built with `format!` arguments.
macro_rules! corrupt {
    ($($arg:tt)*) => { $crate::error::N2GError::Format(format!($($arg)*)) };
}

pub(crate) use corrupt;
pub(crate) use invalid;
