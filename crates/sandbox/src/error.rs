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

    /// A program's arguments, stdin or input files were refused ([`Job::with_args`],
    /// [`Job::with_stdin`], [`Job::with_input_file`]).
    ///
    /// [`Job::with_args`]: crate::Job::with_args
    /// [`Job::with_stdin`]: crate::Job::with_stdin
    /// [`Job::with_input_file`]: crate::Job::with_input_file
    #[error("invalid program input: {0}")]
    ProgramInput(#[from] InputError),

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

/// What is wrong with a program's arguments, stdin or input files. The limits are
/// [`Job::MAX_INPUT_BYTES`](crate::Job::MAX_INPUT_BYTES) and its neighbours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("input file {name:?}: {problem}")]
    FileName {
        name: String,
        problem: FileNameProblem,
    },
    #[error("{count} input files; at most {limit} are allowed")]
    TooManyFiles { count: usize, limit: usize },
    #[error("stdin and the input files are {bytes} bytes together; at most {limit} are allowed")]
    TooLarge { bytes: u64, limit: u64 },
    #[error("{count} arguments; at most {limit} are allowed")]
    TooManyArgs { count: usize, limit: usize },
    /// `index` counts from 1, as in `sys.argv`.
    #[error("argument {index} is {bytes} bytes long; at most {limit} are allowed")]
    ArgTooLong {
        index: usize,
        bytes: usize,
        limit: usize,
    },
    #[error("argument {index} contains a NUL byte, which no command line can carry")]
    ArgContainsNul { index: usize },
}

/// Why an input file's name was refused: input files are plain files in the run directory,
/// beside the module, and must not replace or shadow anything there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileNameProblem {
    Empty,
    /// Longer than 255 bytes, the most a file name may have.
    TooLong,
    /// Contains `/`: input files go in the run directory itself, not below or above it.
    Slash,
    /// `.` or `..`.
    DotOrDotDot,
    Nul,
    /// Contains a control character (a newline, a tab...).
    ControlCharacter,
    /// Is the module's file, or an importable file (`.py`, `.pyc`, `.so`) of the same module
    /// name, which would replace it.
    ClashesWithModule,
    /// Is the test file, or an importable file of the same module name.
    ClashesWithTests,
    /// Is one of the harness's own files (`.forgeline-*`, the run's `tmp` directory).
    ReservedByHarness,
    /// An importable file named like a module the harness imports after the code under test
    /// is loaded (`traceback.py`, `forgeline_runners.py`), which would replace it.
    ShadowsHarnessModule,
    /// Another input file has the same name.
    Duplicate,
}

impl std::fmt::Display for FileNameProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileNameProblem::Empty => "the name is empty",
            FileNameProblem::TooLong => "the name is longer than 255 bytes",
            FileNameProblem::Slash => {
                "the name contains '/': give a plain file name, placed in the run directory"
            }
            FileNameProblem::DotOrDotDot => "'.' and '..' are not file names",
            FileNameProblem::Nul => "the name contains a NUL byte",
            FileNameProblem::ControlCharacter => "the name contains a control character",
            FileNameProblem::ClashesWithModule => "it would replace the module under check",
            FileNameProblem::ClashesWithTests => "it would replace the test file",
            FileNameProblem::ReservedByHarness => "the sandbox harness uses that name itself",
            FileNameProblem::ShadowsHarnessModule => {
                "it would shadow a module the sandbox harness imports: choose another name"
            }
            FileNameProblem::Duplicate => "another input file has the same name",
        })
    }
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
