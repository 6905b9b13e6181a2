//! What a user asks for: the task, the files it is about, tests that must pass.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A file given as context (`--file`) or as tests (`--tests`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextFile {
    /// The file's name, as the generated code would import it (`utils.py`).
    pub name: String,
    pub content: String,
}

impl ContextFile {
    pub fn new(name: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            content: content.into(),
        }
    }

    /// The module name code imports it by (`utils` for `utils.py`).
    pub fn module_name(&self) -> String {
        self.name.trim_end_matches(".py").to_string()
    }
}

/// One job's input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRequest {
    pub task: String,
    #[serde(default)]
    pub files: Vec<ContextFile>,
    /// Tests the result must pass (any kind the sandbox runs: asserts, unittest, pytest,
    /// HumanEval `check`).
    #[serde(default)]
    pub tests: Option<ContextFile>,
    /// The function the result must define, when the caller knows it.
    #[serde(default)]
    pub entry_point: Option<String>,
}

impl TaskRequest {
    pub fn new(task: impl Into<String>) -> Self {
        Self {
            task: task.into(),
            files: Vec::new(),
            tests: None,
            entry_point: None,
        }
    }

    pub fn file_names(&self) -> Vec<&str> {
        self.files.iter().map(|f| f.name.as_str()).collect()
    }

    /// Checks the request, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        self.problem().map_err(Error::Task)
    }

    fn problem(&self) -> std::result::Result<(), TaskProblem> {
        if self.task.trim().is_empty() {
            return Err(TaskProblem::EmptyTask);
        }
        if self.task.len() > MAX_TASK_BYTES {
            return Err(TaskProblem::TaskTooLong {
                bytes: self.task.len(),
            });
        }
        let listed = self.files.iter().map(|f| ("files", f));
        for (field, f) in listed.chain(self.tests.iter().map(|f| ("tests", f))) {
            let ok = !f.name.is_empty()
                && f.name.len() <= 100
                && f.name.ends_with(".py")
                && f.name[..f.name.len() - 3]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !f.name.starts_with(|c: char| c.is_ascii_digit());
            if !ok {
                return Err(TaskProblem::FileName {
                    field,
                    name: f.name.clone(),
                });
            }
            if f.content.len() > MAX_FILE_BYTES {
                return Err(TaskProblem::FileTooLarge {
                    field,
                    name: f.name.clone(),
                    bytes: f.content.len(),
                });
            }
        }
        if let Some(e) = &self.entry_point {
            if e.is_empty() || !e.chars().all(|c| c.is_alphanumeric() || c == '_') {
                return Err(TaskProblem::EntryPoint(e.clone()));
            }
        }
        Ok(())
    }
}

const MAX_TASK_BYTES: usize = 64 * 1024;
const MAX_FILE_BYTES: usize = 256 * 1024;

/// What is wrong with a task request, one variant per field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TaskProblem {
    #[error("`task` is empty")]
    EmptyTask,
    #[error("`task` is {bytes} bytes; the limit is 64 KiB")]
    TaskTooLong { bytes: usize },
    /// `field` is `files` or `tests`.
    #[error(
        "file name `{name}` is not a Python module name (letters, digits, `_`, ending in .py)"
    )]
    FileName { field: &'static str, name: String },
    #[error("file `{name}` is {bytes} bytes; the limit is 256 KiB")]
    FileTooLarge {
        field: &'static str,
        name: String,
        bytes: usize,
    },
    #[error("`entry_point` `{0}` is not a Python name")]
    EntryPoint(String),
}

impl TaskProblem {
    /// The request field at fault, as the HTTP API names it.
    pub fn field(&self) -> &'static str {
        match self {
            TaskProblem::EmptyTask | TaskProblem::TaskTooLong { .. } => "task",
            TaskProblem::FileName { field, .. } | TaskProblem::FileTooLarge { field, .. } => field,
            TaskProblem::EntryPoint(_) => "entry_point",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_name_the_field() {
        assert!(TaskRequest::new("  ")
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`task` is empty"));
        let mut t = TaskRequest::new("x");
        t.files.push(ContextFile::new("../etc/passwd", ""));
        assert!(t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("../etc/passwd"));
        let mut t = TaskRequest::new("x");
        t.entry_point = Some("a b".into());
        assert!(t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("entry_point"));
        let mut t = TaskRequest::new("x");
        t.tests = Some(ContextFile::new("test_x.py", "assert True"));
        t.validate().unwrap();
        assert_eq!(t.tests.as_ref().unwrap().module_name(), "test_x");
        t.tests = Some(ContextFile::new("test x.py", ""));
        assert!(matches!(
            t.validate(),
            Err(Error::Task(ref p @ TaskProblem::FileName { .. })) if p.field() == "tests"
        ));
    }
}
