//! The checks the pipeline asks for, and the code and tests they run on.

use crate::limits::Limits;
use crate::outcome::RunReport;
use crate::sandbox::Sandbox;
use crate::{Error, Result};

/// Python source under check, with the module name tests import it by (`solution` for
/// `solution.py`: `from solution import add`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    name: String,
    source: Vec<u8>,
}

/// A test file, run against a [`Module`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestSuite {
    file_name: String,
    source: Vec<u8>,
    kind: TestKind,
    entry_point: Option<String>,
}

/// How a test file is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TestKind {
    /// Decided from the file: `check(candidate)` when there is one and an entry point (or no
    /// test functions), pytest when it imports pytest, unittest when it has `TestCase`s,
    /// test functions (with pytest when installed, by the harness otherwise), else a script.
    #[default]
    Auto,
    /// Top-level code with `assert`s, run as `__main__`.
    Script,
    Unittest,
    /// Needs pytest installed; the outcome says so when it is not.
    Pytest,
    /// HumanEval style: the file defines `check(candidate)`, called with the entry point.
    Check,
    /// pytest-style `test_*` functions run by the harness itself, without pytest: no
    /// fixtures, but no pytest start-up either (each function counts in the summary).
    Functions,
}

/// What to do with the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Parse (compile) only; nothing runs.
    Syntax,
    /// Import the module: its top-level code runs, `if __name__ == "__main__"` blocks do not.
    Import,
    /// Run the module as a program (`__main__`); exiting with 0 passes.
    Run,
    /// Run the examples in its docstrings (`>>> f(1)` / `2`).
    Doctest,
    /// Run a test file against it.
    Tests(TestSuite),
}

/// One run: a module, a check, and limits other than the sandbox's defaults if given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub module: Module,
    pub check: Check,
    pub limits: Option<Limits>,
    /// Extensions (`png`, `csv`) of files the program writes that the report keeps; see
    /// [`Job::keep_files`].
    pub keep: Vec<String>,
}

const KEYWORDS: &[&str] = &[
    "False", "None", "True", "and", "as", "assert", "async", "await", "break", "class", "continue",
    "def", "del", "elif", "else", "except", "finally", "for", "from", "global", "if", "import",
    "in", "is", "lambda", "nonlocal", "not", "or", "pass", "raise", "return", "try", "while",
    "with", "yield",
];

/// Standard modules the harness itself imports after loading the code: a module of the
/// same name would replace them.
const RESERVED: &[&str] = &[
    "abc",
    "ast",
    "builtins",
    "codecs",
    "doctest",
    "encodings",
    "importlib",
    "io",
    "linecache",
    "os",
    "posixpath",
    "pytest",
    "re",
    "site",
    "sys",
    "tokenize",
    "traceback",
    "types",
    "unittest",
];

/// Whether `name` can be imported as a module: an ASCII identifier, not a keyword, and not
/// one of the harness's own modules or the standard modules it relies on.
fn check_module_name(name: &str) -> Result<()> {
    if RESERVED.contains(&name) {
        return Err(Error::InvalidInput(format!(
            "{name:?} would shadow the standard module of that name: choose another name"
        )));
    }
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !KEYWORDS.contains(&name)
        && !name.starts_with("forgeline_")
        && name != "run";
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "{name:?} cannot be imported as a Python module: use letters, digits and _ \
             (not starting with a digit, not a keyword)"
        )))
    }
}

fn stem(file_name: &str) -> Result<&str> {
    file_name.strip_suffix(".py").ok_or_else(|| {
        Error::InvalidInput(format!("{file_name:?} is not a Python file name (NAME.py)"))
    })
}

impl Module {
    /// A module named `name` (its file is `name.py`).
    pub fn new(name: &str, source: impl Into<Vec<u8>>) -> Result<Module> {
        check_module_name(name)?;
        Ok(Module {
            name: name.to_string(),
            source: source.into(),
        })
    }

    /// A module from its file name: `solution.py` is module `solution`.
    pub fn from_file_name(file_name: &str, source: impl Into<Vec<u8>>) -> Result<Module> {
        Module::new(stem(file_name)?, source)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn source(&self) -> &[u8] {
        &self.source
    }

    pub fn file_name(&self) -> String {
        format!("{}.py", self.name)
    }
}

impl TestSuite {
    /// A test file named `file_name` (`test_solution.py`), of a kind decided from its content.
    pub fn new(file_name: &str, source: impl Into<Vec<u8>>) -> Result<TestSuite> {
        check_module_name(stem(file_name)?)?;
        Ok(TestSuite {
            file_name: file_name.to_string(),
            source: source.into(),
            kind: TestKind::Auto,
            entry_point: None,
        })
    }

    pub fn with_kind(mut self, kind: TestKind) -> TestSuite {
        self.kind = kind;
        self
    }

    /// The function `check(candidate)` tests receive, for HumanEval-style tests.
    pub fn with_entry_point(mut self, name: &str) -> Result<TestSuite> {
        check_module_name(name)
            .map_err(|_| Error::InvalidInput(format!("{name:?} is not a Python function name")))?;
        self.entry_point = Some(name.to_string());
        Ok(self)
    }

    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    pub fn source(&self) -> &[u8] {
        &self.source
    }

    pub fn kind(&self) -> TestKind {
        self.kind
    }

    pub fn entry_point(&self) -> Option<&str> {
        self.entry_point.as_deref()
    }
}

impl TestKind {
    /// The harness's name for it.
    pub(crate) fn harness_name(self) -> &'static str {
        match self {
            TestKind::Auto => "auto",
            TestKind::Script => "script",
            TestKind::Unittest => "unittest",
            TestKind::Pytest => "pytest",
            TestKind::Check => "check",
            TestKind::Functions => "functions",
        }
    }
}

impl Check {
    /// The harness's mode for it.
    pub(crate) fn harness_mode(&self) -> &'static str {
        match self {
            Check::Syntax => "syntax",
            Check::Import => "import",
            Check::Run => "run",
            Check::Doctest => "doctest",
            Check::Tests(_) => "tests",
        }
    }
}

impl Job {
    pub fn new(module: Module, check: Check) -> Job {
        Job {
            module,
            check,
            limits: None,
            keep: Vec::new(),
        }
    }

    /// Keeps the files with these extensions that the program writes in its directory (or
    /// one level below), returned in [`RunReport::files`](crate::RunReport::files): the
    /// figures a data-analysis script saves, say. At most 32 files and 16 MiB in all.
    pub fn keep_files(mut self, extensions: &[&str]) -> Job {
        self.keep = extensions.iter().map(|e| e.to_string()).collect();
        self
    }

    pub fn with_limits(mut self, limits: Limits) -> Job {
        self.limits = Some(limits);
        self
    }

    /// Rejects a test file that would overwrite the module.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Check::Tests(tests) = &self.check {
            if tests.file_name == self.module.file_name() {
                return Err(Error::InvalidInput(format!(
                    "the tests and the code are both named {}",
                    tests.file_name
                )));
            }
        }
        Ok(())
    }
}

/// The checks offered to the pipeline, one call each.
impl Sandbox {
    /// Parses the module without running anything.
    pub async fn check_syntax(&self, module: &Module) -> Result<RunReport> {
        self.run(Job::new(module.clone(), Check::Syntax)).await
    }

    /// Imports the module (its top-level code runs).
    pub async fn check_import(&self, module: &Module) -> Result<RunReport> {
        self.run(Job::new(module.clone(), Check::Import)).await
    }

    /// Runs the module as a program.
    pub async fn run_program(&self, module: &Module) -> Result<RunReport> {
        self.run(Job::new(module.clone(), Check::Run)).await
    }

    /// Runs the examples in the module's docstrings.
    pub async fn run_doctests(&self, module: &Module) -> Result<RunReport> {
        self.run(Job::new(module.clone(), Check::Doctest)).await
    }

    /// Runs a test file against the module.
    pub async fn run_tests(&self, module: &Module, tests: &TestSuite) -> Result<RunReport> {
        self.run(Job::new(module.clone(), Check::Tests(tests.clone())))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_must_be_importable() {
        assert_eq!(
            Module::new("solution", "x = 1").unwrap().file_name(),
            "solution.py"
        );
        assert_eq!(
            Module::from_file_name("my_mod.py", "").unwrap().name(),
            "my_mod"
        );
        for bad in [
            "1abc",
            "my-mod",
            "class",
            "",
            "forgeline_harness",
            "naïve",
            "ast",
        ] {
            assert!(Module::new(bad, "").is_err(), "{bad:?} accepted");
        }
        assert!(Module::from_file_name("solution.txt", "").is_err());
    }

    #[test]
    fn test_suites_validate_names_and_entry_points() {
        let suite = TestSuite::new("test_solution.py", "assert True")
            .unwrap()
            .with_kind(TestKind::Check)
            .with_entry_point("add")
            .unwrap();
        assert_eq!(suite.entry_point(), Some("add"));
        assert_eq!(suite.kind().harness_name(), "check");
        assert!(TestSuite::new("tests-1.py", "").is_err());
        assert!(TestSuite::new("t.py", "")
            .unwrap()
            .with_entry_point("not valid")
            .is_err());
    }

    #[test]
    fn tests_may_not_replace_the_module() {
        let module = Module::new("solution", "").unwrap();
        let tests = TestSuite::new("solution.py", "").unwrap();
        let job = Job::new(module, Check::Tests(tests));
        assert!(job.validate().is_err());
    }
}
