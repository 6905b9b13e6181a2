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
        if self.task.trim().is_empty() {
            return Err(Error::InvalidTask("`task` is empty".into()));
        }
        if self.task.len() > 64 * 1024 {
            return Err(Error::InvalidTask(format!(
                "`task` is {} bytes; the limit is 64 KiB",
                self.task.len()
            )));
        }
        for f in self.files.iter().chain(self.tests.iter()) {
            let ok = !f.name.is_empty()
                && f.name.len() <= 100
                && f.name.ends_with(".py")
                && f.name[..f.name.len() - 3]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !f.name.starts_with(|c: char| c.is_ascii_digit());
            if !ok {
                return Err(Error::InvalidTask(format!(
                    "file name `{}` is not a Python module name (letters, digits, `_`, ending in .py)",
                    f.name
                )));
            }
            if f.content.len() > 256 * 1024 {
                return Err(Error::InvalidTask(format!(
                    "file `{}` is {} bytes; the limit is 256 KiB",
                    f.name,
                    f.content.len()
                )));
            }
        }
        if let Some(e) = &self.entry_point {
            if e.is_empty() || !e.chars().all(|c| c.is_alphanumeric() || c == '_') {
                return Err(Error::InvalidTask(format!(
                    "`entry_point` `{e}` is not a Python name"
                )));
            }
        }
        Ok(())
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
        assert_eq!(t.tests.unwrap().module_name(), "test_x");
    }
}
