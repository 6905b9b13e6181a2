//! The crate's one error type: what kept a check from running at all. A check that ran and
//! failed is not an error but an [`Outcome`](crate::Outcome).

use std::path::PathBuf;

/// Why a check could not be run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("python3 was not found (looked for {looked_for}); install Python 3.9 or newer")]
    PythonNotFound { looked_for: String },

    #[error("{path} is Python {found}; forgeline needs Python 3.9 or newer", path = path.display())]
    PythonTooOld { path: PathBuf, found: String },

    #[error("could not ask {path} for its version and paths: {detail}", path = path.display())]
    PythonProbe { path: PathBuf, detail: String },

    #[error(
        "full isolation is required but not available here: {missing} \
         (run without requiring isolation to accept less)"
    )]
    IsolationUnavailable { missing: String },

    #[error("invalid limits: {0}")]
    InvalidLimits(String),

    #[error("invalid input: {0}")]
    InvalidInput(String),

    #[error("could not {action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },

    #[error("could not start the sandboxed Python process: {0}")]
    Spawn(#[source] std::io::Error),

    #[error("the sandbox harness failed (a bug in forgeline-sandbox): {0}")]
    Harness(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            action: action.into(),
            source,
        }
    }
}
