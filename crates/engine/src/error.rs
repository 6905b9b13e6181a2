//! The engine's one error type. Every variant names the file or value at fault.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model file that exists but cannot be used: truncated, wrong architecture, missing key,
    /// tensor of the wrong shape.
    #[error("{path}: {msg}")]
    BadModel { path: PathBuf, msg: String },
    #[error("model `{name}` not found: {searched}")]
    ModelNotFound { name: String, searched: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("out of KV cache memory: {0}")]
    OutOfMemory(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn bad_model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadModel {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
