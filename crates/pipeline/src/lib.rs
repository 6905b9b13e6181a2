//! forgeline's pipeline: a Python programming task in, validated code out, through the
//! stages of the founding design. Every LLM call goes through [`LanguageModel`] (the
//! engine's `LlmClient`); every Python run through the sandbox.
//!
//! ```text
//! router -> orchestrator -> planning (DAG) -> dispatcher -> workers -> validation queue
//!   -> validators -> retry manager (back to workers) -> collector -> synthesizer
//!   -> final validator -> synthesizer retry -> formatter
//! ```
//!
//! # Layout
//! - `job`: `Pipeline` (shared by jobs), `JobContext` (one job; its LLM calls and progress),
//!   `run`: passes each stage's typed output to the next and records every stage in the
//!   trace (`JobContext::step`); the stages themselves never write to it.
//! - `task`: what a user asks for (`TaskRequest`, `ContextFile`).
//! - `config`: per-stage model, sampling and token limits; per-job limits (`forgeline.toml`).
//! - `prompts`: the stage templates (`prompts/*.j2`), overridable from a directory.
//! - `llm`: the `LanguageModel` trait, implemented by `LlmClient`.
//! - `router`: stage 1, rules then an LLM classifier.
//! - `orchestrator`: stage 2, the plan as schema-constrained JSON, with a fallback.
//! - `planning`: stage 3, the plan as a repaired DAG of task specs.
//! - `dispatcher`: stage 4, ready subtasks run concurrently.
//! - `workers`: stage 6, the workers; stage 5 (the worker manager) is only their per-kind
//!   figures, kept by the dispatcher for the trace.
//! - `validation`: stage 7, the priority queue of outputs to check.
//! - `validators`: stage 8, sandboxed checks, then the LLM validator.
//! - `smoke`: smoke runs of programs: `--help`, and a run on an input the tests worker
//!   writes.
//! - `verdict`: a validation's checks and judgement, and the status (verified, consistent,
//!   unverified, failed), pass, score and feedback they make; each check's trust.
//! - `retry`: stage 9, attempts with refined instructions; the best is kept.
//! - `selection`: choosing among candidates by running them where nothing trusted can
//!   (MBR-exec: group by outputs on the same calls; CodeT: weigh by generated tests passed).
//! - `collector`: stage 10, outputs with their relationships.
//! - `synthesizer`: stages 11 and 13, integration into files; re-synthesis.
//! - `final_validation`: stages 12 and 13, the whole result checked; bounded retry.
//! - `formatter`: stage 14, markdown, code or JSON; files written out.
//! - `stage`: the stages' names: `Stage` (trace, events, metrics) and `LlmStage` (the
//!   stages that call a model: config keys and template names); `StageOutput`, how a
//!   stage's output shows in the trace and its end event.
//! - `trace`: live `JobEvent`s and the recorded trace.
//! - `prose_examples`: examples a task states in prose (`add(2, 3) returns 5`), read
//!   strictly: literal arguments and a literal result.
//! - `python`: light structural reads of Python source (blocks, signatures, examples).
//! - `eval` (feature `eval`): HumanEval-format evaluation of the pipeline, the single-call
//!   baseline and sample-filter, with the oracle (does any program a job wrote pass).

pub mod collector;
pub mod config;
pub mod constraints;
pub mod dispatcher;
pub mod edge_cases;
#[cfg(feature = "eval")]
pub mod eval;
pub mod final_validation;
pub mod formatter;
pub mod job;
pub mod llm;
pub mod orchestrator;
pub mod planning;
pub mod prompts;
pub mod prose_examples;
pub mod python;
pub mod retry;
pub mod router;
pub mod selection;
pub mod smoke;
pub mod stage;
pub mod synthesizer;
pub mod task;
pub mod trace;
pub mod validation;
pub mod validators;
pub mod verdict;
pub mod workers;

#[cfg(test)]
mod pipeline_tests;
#[cfg(test)]
mod proptests;

/// Cases per property: `PROPTEST_CASES` (scripts/fuzz sets a million), else a few thousand.
#[cfg(test)]
pub(crate) fn proptest_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}
#[cfg(test)]
mod testing;

pub use config::PipelineConfig;
pub use formatter::Format;
pub use job::{trace_json, JobFailure, JobOutcome, JobResult, JobTrace, Pipeline};
pub use llm::LanguageModel;
pub use prompts::Prompts;
pub use stage::{LlmStage, Stage};
pub use task::{ContextFile, TaskProblem, TaskRequest};
pub use trace::{EventStatus, JobEvent};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The task or its files are not usable (user input).
    #[error("invalid task: {0}")]
    InvalidTask(String),
    /// A task request with a field at fault (`TaskRequest::validate`).
    #[error("invalid task: {0}")]
    Task(#[from] TaskProblem),
    /// A line of an evaluation task file that is not a task.
    #[error("invalid task: {}:{line}: {source}", .path.display())]
    TaskLine {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("config: {0}")]
    Config(String),
    /// A prompt template that does not compile or render.
    #[error("prompt: template `{name}`: {source:#}")]
    Template {
        name: String,
        #[source]
        source: minijinja::Error,
    },
    /// A file in a prompts directory that names no template.
    #[error("prompt: {}: no stage is called `{name}` (templates: {})", .path.display(), prompts::template_names().join(", "))]
    UnknownTemplate { path: PathBuf, name: String },
    /// A stage template whose `user` block is missing or empty.
    #[error("prompt: template `{name}` has no (or an empty) `user` block")]
    EmptyPrompt { name: String },
    /// Reading or writing a file.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing the result's files stopped after some were in place.
    #[error("{}: {source} (already written: {})", .path.display(), list_paths(.written, "none"))]
    PartlyWritten {
        path: PathBuf,
        #[source]
        source: std::io::Error,
        written: Vec<PathBuf>,
    },
    /// A file of the result whose name leads outside the output directory.
    #[error("refusing to write `{name}` outside {}", .dir.display())]
    OutsideOutput { name: String, dir: PathBuf },
    /// The result did not serialize as JSON.
    #[error("the result as JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error(transparent)]
    Engine(#[from] forgeline_engine::Error),
    #[error(transparent)]
    Sandbox(#[from] forgeline_sandbox::Error),
    /// Files in the output directory that this run did not write.
    #[error("refusing to overwrite {}: not written by this run (pass --force to replace them)", list_paths(.0, ""))]
    WouldOverwrite(Vec<PathBuf>),
    /// A bug in forgeline stopped the job (a stage panicked); the job fails, nothing else.
    #[error("internal error (a bug in forgeline; the job was stopped): {0}")]
    Internal(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

fn list_paths(paths: &[PathBuf], none: &str) -> String {
    if paths.is_empty() {
        return none.to_string();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub type Result<T> = std::result::Result<T, Error>;

/// What a panic said, for a job's error or a check's failure.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with no message".into()
    }
}

/// Why a spawned task did not return: its panic's message, or that it was cancelled.
pub(crate) fn join_error_message(e: tokio::task::JoinError) -> String {
    if e.is_panic() {
        format!("panicked: {}", panic_message(&*e.into_panic()))
    } else {
        "cancelled".into()
    }
}
