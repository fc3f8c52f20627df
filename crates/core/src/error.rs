//! Errors of the engine. Every variant that concerns a file names it, so that the one place
//! that prints errors (the CLI, the app) can tell the user which file is wrong and how.

use std::path::{Path, PathBuf};

/// The engine's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is wrong (bad JSON, bad safetensors header, ...).
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    /// A file the model directory needs is not there.
    #[error("{path}: missing file ({what})")]
    Missing { path: PathBuf, what: String },
    /// Invalid input that is not tied to a file (options, shapes, arguments).
    #[error("{0}")]
    Invalid(String),
    /// An error from the tensor library.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// An error from a decomposition.
    #[error(transparent)]
    Decomp(#[from] compactor_decomp::DecompError),
    /// The user asked to stop.
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn bad(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::BadFile { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn missing(path: impl AsRef<Path>, what: impl Into<String>) -> Self {
        Error::Missing { path: path.as_ref().to_path_buf(), what: what.into() }
    }
}
