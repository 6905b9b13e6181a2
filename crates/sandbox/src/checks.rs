//! The checks the pipeline asks for, the code and tests they run on, and what a program is
//! given: arguments, stdin, input files.

use crate::error::{FileNameProblem, InputError};
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
    /// Run the module as a program (`__main__`), as `python NAME.py ARGS < STDIN` with the
    /// job's [arguments](Job::with_args), [stdin](Job::with_stdin) and
    /// [input files](Job::with_input_file); exiting with 0 passes, an uncaught exception or
    /// another exit code fails.
    Run,
    /// Run the examples in its docstrings (`>>> f(1)` / `2`).
    Doctest,
    /// Run a test file against it.
    Tests(TestSuite),
}

/// One run: a module, a check, and limits other than the sandbox's defaults if given.
///
/// A program can be run as a user would run it, `python solution.py ARGS < STDIN` beside its
/// input files:
///
/// ```no_run
/// # async fn demo(sandbox: &forgeline_sandbox::Sandbox) -> forgeline_sandbox::Result<()> {
/// use forgeline_sandbox::{Check, Job, Module};
///
/// let module = Module::new("solution", "import sys\nprint(open(sys.argv[1]).read())\n")?;
/// let job = Job::new(module, Check::Run)
///     .with_args(["data.csv"])?
///     .with_input_file("data.csv", "a,b\n1,2\n")?;
/// let report = sandbox.run(job).await?;
/// assert_eq!(report.raw_stdout.bytes, b"a,b\n1,2\n\n");
/// # Ok(()) }
/// ```
///
/// The arguments, stdin and input files go to every check (a test file can read the input
/// files too); their limits are [`Job::MAX_ARGS`], [`Job::MAX_ARG_BYTES`],
/// [`Job::MAX_INPUT_FILES`] and [`Job::MAX_INPUT_BYTES`], and a job beyond them (or with a
/// bad file name) is refused with [`Error::ProgramInput`] when built and again when run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub module: Module,
    pub check: Check,
    pub limits: Option<Limits>,
    /// Extensions (`png`, `csv`) of files the program writes that the report keeps; see
    /// [`Job::keep_files`].
    pub keep: Vec<String>,
    /// The program's command-line arguments, `sys.argv[1:]`; see [`Job::with_args`].
    pub args: Vec<String>,
    /// What the program reads on stdin; `None` is an empty stdin (`/dev/null`). See
    /// [`Job::with_stdin`].
    pub stdin: Option<Vec<u8>>,
    /// Files placed in the run directory before the program starts; see
    /// [`Job::with_input_file`].
    pub input_files: Vec<InputFile>,
}

/// A file placed in the run directory, beside the module, before the program starts: the
/// sample CSV a script is run on, say. The program reads it by its plain name (it runs in
/// that directory), and may change or delete it; it is not returned as a kept file unless
/// the program changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// A plain file name (`data.csv`): no `/`, not `.` or `..`, no NUL or control character.
    pub name: String,
    pub bytes: Vec<u8>,
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

/// Whether a module of this name would replace one the harness imports after loading the
/// code (the standard modules in [`RESERVED`], its own `forgeline_*` modules, `run`).
fn shadows_harness(name: &str) -> bool {
    RESERVED.contains(&name) || name.starts_with("forgeline_") || name == "run"
}

/// The module name an input file could be imported as, when its extension makes it
/// importable (`.py`, `.pyc`, and extension modules `.so`, `.abi3.so`,
/// `.cpython-311-x86_64-linux-gnu.so`): its name up to the first dot.
fn importable_as(file_name: &str) -> Option<&str> {
    [".py", ".pyc", ".so"]
        .iter()
        .any(|ext| file_name.ends_with(ext))
        .then(|| file_name.split('.').next().unwrap_or(file_name))
}

/// What is wrong with an input file's name on its own (not counting the other files).
fn input_file_name_problem(
    name: &str,
    module: &Module,
    tests: Option<&TestSuite>,
) -> Option<FileNameProblem> {
    let importable = importable_as(name);
    Some(if name.is_empty() {
        FileNameProblem::Empty
    } else if name.contains('\0') {
        FileNameProblem::Nul
    } else if name.contains('/') {
        FileNameProblem::Slash
    } else if name == "." || name == ".." {
        FileNameProblem::DotOrDotDot
    } else if name.len() > 255 {
        FileNameProblem::TooLong
    } else if name.chars().any(char::is_control) {
        FileNameProblem::ControlCharacter
    } else if name.starts_with(".forgeline") || name == "tmp" {
        FileNameProblem::ReservedByHarness
    } else if name == module.file_name() || importable == Some(module.name()) {
        FileNameProblem::ClashesWithModule
    } else if tests.is_some_and(|t| {
        name == t.file_name() || (importable.is_some() && importable == stem(t.file_name()).ok())
    }) {
        FileNameProblem::ClashesWithTests
    } else if importable.is_some_and(shadows_harness) {
        FileNameProblem::ShadowsHarnessModule
    } else {
        return None;
    })
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
    /// The most bytes of stdin and input files together: 1 MiB.
    pub const MAX_INPUT_BYTES: u64 = 1 << 20;
    /// The most input files.
    pub const MAX_INPUT_FILES: usize = 64;
    /// The most command-line arguments.
    pub const MAX_ARGS: usize = 256;
    /// The longest command-line argument, in bytes.
    pub const MAX_ARG_BYTES: usize = 4096;

    pub fn new(module: Module, check: Check) -> Job {
        Job {
            module,
            check,
            limits: None,
            keep: Vec::new(),
            args: Vec::new(),
            stdin: None,
            input_files: Vec::new(),
        }
    }

    /// Gives the program these command-line arguments, replacing any given before: it sees
    /// `sys.argv` as after `python solution.py ARGS...` in its directory (`sys.argv[0]` is
    /// the module's file name). At most [`Job::MAX_ARGS`] arguments of at most
    /// [`Job::MAX_ARG_BYTES`] bytes each, without NUL; otherwise [`Error::ProgramInput`].
    pub fn with_args<I, S>(mut self, args: I) -> Result<Job>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = args.into_iter().map(Into::into).collect();
        self.check_input()?;
        Ok(self)
    }

    /// Gives the program these bytes on stdin (a pipe closed after them), replacing any given
    /// before. Without it, stdin is `/dev/null`. Counts towards [`Job::MAX_INPUT_BYTES`].
    pub fn with_stdin(mut self, bytes: impl Into<Vec<u8>>) -> Result<Job> {
        self.stdin = Some(bytes.into());
        self.check_input()?;
        Ok(self)
    }

    /// Places a file in the run directory before the program starts, readable and writable
    /// by the program (written as the module's file is: a new file, no link followed, handed
    /// to the sandbox user). `name` is a plain file name: no `/`, not `.` or `..`, no NUL or
    /// control character, at most 255 bytes, not the module's or the test file's name, not a
    /// name the harness uses (`.forgeline*`, `tmp`), not an importable file (`.py`, `.pyc`,
    /// `.so`) that would replace the module, the tests or a module the harness imports, and
    /// not given twice. At most [`Job::MAX_INPUT_FILES`] files, and [`Job::MAX_INPUT_BYTES`]
    /// with stdin; the files also count against the run's disk quota
    /// ([`Limits::disk_bytes`], [`Limits::disk_inodes`]).
    pub fn with_input_file(mut self, name: &str, bytes: impl Into<Vec<u8>>) -> Result<Job> {
        self.input_files.push(InputFile {
            name: name.to_string(),
            bytes: bytes.into(),
        });
        self.check_input()?;
        Ok(self)
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

    /// Rejects a test file that would overwrite the module, and arguments, stdin or input
    /// files beyond their limits or with bad names.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Check::Tests(tests) = &self.check {
            if tests.file_name == self.module.file_name() {
                return Err(Error::InvalidInput(format!(
                    "the tests and the code are both named {}",
                    tests.file_name
                )));
            }
        }
        self.check_input()?;
        Ok(())
    }

    /// The arguments, stdin and input files against their limits and naming rules.
    fn check_input(&self) -> Result<(), InputError> {
        if self.args.len() > Job::MAX_ARGS {
            return Err(InputError::TooManyArgs {
                count: self.args.len(),
                limit: Job::MAX_ARGS,
            });
        }
        for (i, arg) in self.args.iter().enumerate() {
            if arg.len() > Job::MAX_ARG_BYTES {
                return Err(InputError::ArgTooLong {
                    index: i + 1,
                    bytes: arg.len(),
                    limit: Job::MAX_ARG_BYTES,
                });
            }
            if arg.contains('\0') {
                return Err(InputError::ArgContainsNul { index: i + 1 });
            }
        }
        if self.input_files.len() > Job::MAX_INPUT_FILES {
            return Err(InputError::TooManyFiles {
                count: self.input_files.len(),
                limit: Job::MAX_INPUT_FILES,
            });
        }
        let tests = match &self.check {
            Check::Tests(tests) => Some(tests),
            _ => None,
        };
        for (i, file) in self.input_files.iter().enumerate() {
            let problem = input_file_name_problem(&file.name, &self.module, tests).or_else(|| {
                self.input_files[..i]
                    .iter()
                    .any(|earlier| earlier.name == file.name)
                    .then_some(FileNameProblem::Duplicate)
            });
            if let Some(problem) = problem {
                return Err(InputError::FileName {
                    name: file.name.clone(),
                    problem,
                });
            }
        }
        let bytes = self.stdin.as_ref().map_or(0, Vec::len) as u64
            + self
                .input_files
                .iter()
                .map(|f| f.bytes.len() as u64)
                .sum::<u64>();
        if bytes > Job::MAX_INPUT_BYTES {
            return Err(InputError::TooLarge {
                bytes,
                limit: Job::MAX_INPUT_BYTES,
            });
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

    fn run_job() -> Job {
        Job::new(Module::new("solution", "").unwrap(), Check::Run)
    }

    fn name_problem(job: Job, name: &str) -> Option<FileNameProblem> {
        match job.with_input_file(name, "x") {
            Ok(job) => {
                job.validate().unwrap();
                None
            }
            Err(Error::ProgramInput(InputError::FileName { name: n, problem })) => {
                assert_eq!(n, name);
                Some(problem)
            }
            Err(e) => panic!("{name:?}: {e}"),
        }
    }

    #[test]
    fn input_file_names_are_plain_and_clash_with_nothing() {
        use FileNameProblem::*;
        for good in [
            "data.csv",
            "input.txt",
            ".hidden",
            "..data",
            "a..b",
            "with space.csv",
            "naïve.json",
            "helper.py",
            "solution.csv",
            "os.txt",
            "my-mod.py",
        ] {
            assert_eq!(name_problem(run_job(), good), None, "{good:?} refused");
        }
        let long = "x".repeat(256);
        for (bad, problem) in [
            ("", Empty),
            ("a\0b", Nul),
            ("dir/data.csv", Slash),
            ("/etc/passwd", Slash),
            ("../escape.csv", Slash),
            (".", DotOrDotDot),
            ("..", DotOrDotDot),
            (long.as_str(), TooLong),
            ("line\nbreak", ControlCharacter),
            ("tab\t", ControlCharacter),
            ("solution.py", ClashesWithModule),
            ("solution.pyc", ClashesWithModule),
            (
                "solution.cpython-311-x86_64-linux-gnu.so",
                ClashesWithModule,
            ),
            (".forgeline-result.json", ReservedByHarness),
            (".forgeline-result.json.tmp", ReservedByHarness),
            ("tmp", ReservedByHarness),
            ("traceback.py", ShadowsHarnessModule),
            ("os.pyc", ShadowsHarnessModule),
            ("forgeline_runners.py", ShadowsHarnessModule),
            ("io.abi3.so", ShadowsHarnessModule),
        ] {
            assert_eq!(name_problem(run_job(), bad), Some(problem), "{bad:?}");
        }
        assert_eq!(
            name_problem(
                run_job().with_input_file("data.csv", "").unwrap(),
                "data.csv"
            ),
            Some(Duplicate)
        );
        let tests = TestSuite::new("test_solution.py", "").unwrap();
        let job = || {
            Job::new(
                Module::new("solution", "").unwrap(),
                Check::Tests(tests.clone()),
            )
        };
        assert_eq!(
            name_problem(job(), "test_solution.py"),
            Some(ClashesWithTests)
        );
        assert_eq!(
            name_problem(job(), "test_solution.pyc"),
            Some(ClashesWithTests)
        );
        assert_eq!(name_problem(job(), "test_solution.txt"), None);
        // The error says what is wrong, and with which name.
        let err = run_job()
            .with_input_file("../x", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"../x\"") && err.contains("'/'"), "{err}");
    }

    #[test]
    fn input_sizes_and_arguments_are_capped() {
        let limit = Job::MAX_INPUT_BYTES as usize;
        let job = run_job()
            .with_input_file("a.bin", vec![0u8; limit / 2])
            .unwrap()
            .with_stdin(vec![0u8; limit / 2])
            .unwrap();
        job.validate().unwrap();
        let err = job.clone().with_input_file("b.bin", "x").unwrap_err();
        assert!(
            matches!(
                err,
                Error::ProgramInput(InputError::TooLarge { bytes, limit })
                    if bytes == Job::MAX_INPUT_BYTES + 1 && limit == Job::MAX_INPUT_BYTES
            ),
            "{err}"
        );
        assert!(matches!(
            job.with_stdin(vec![0u8; limit / 2 + 1]),
            Err(Error::ProgramInput(InputError::TooLarge { .. }))
        ));
        let mut many = run_job();
        for i in 0..Job::MAX_INPUT_FILES {
            many = many.with_input_file(&format!("f{i}"), "").unwrap();
        }
        assert!(matches!(
            many.with_input_file("one_more", ""),
            Err(Error::ProgramInput(InputError::TooManyFiles {
                count: 65,
                limit: 64
            }))
        ));

        let args = run_job().with_args(["--in", "data.csv", "", "-"]).unwrap();
        assert_eq!(args.args, ["--in", "data.csv", "", "-"]);
        let too_many = ["a"; Job::MAX_ARGS + 1];
        assert!(matches!(
            run_job().with_args(too_many),
            Err(Error::ProgramInput(InputError::TooManyArgs {
                count: 257,
                limit: 256
            }))
        ));
        assert!(run_job().with_args(["a"; Job::MAX_ARGS]).is_ok());
        let long = "y".repeat(Job::MAX_ARG_BYTES + 1);
        assert!(matches!(
            run_job().with_args(["ok", long.as_str()]),
            Err(Error::ProgramInput(InputError::ArgTooLong { index: 2, .. }))
        ));
        assert!(matches!(
            run_job().with_args(["a\0b"]),
            Err(Error::ProgramInput(InputError::ArgContainsNul { index: 1 }))
        ));
    }

    #[test]
    fn inputs_set_through_the_fields_are_checked_when_run() {
        let mut job = run_job();
        job.input_files.push(InputFile {
            name: "../../etc/cron.d/x".into(),
            bytes: Vec::new(),
        });
        assert!(matches!(
            job.validate(),
            Err(Error::ProgramInput(InputError::FileName {
                problem: FileNameProblem::Slash,
                ..
            }))
        ));
        let mut job = run_job();
        job.stdin = Some(vec![0; Job::MAX_INPUT_BYTES as usize + 1]);
        assert!(job.validate().is_err());
        // A later change of the check can make a file clash.
        let mut job = run_job().with_input_file("test_x.py", "").unwrap();
        job.check = Check::Tests(TestSuite::new("test_x.py", "").unwrap());
        assert!(job.validate().is_err());
    }

    #[test]
    fn tests_may_not_replace_the_module() {
        let module = Module::new("solution", "").unwrap();
        let tests = TestSuite::new("solution.py", "").unwrap();
        let job = Job::new(module, Check::Tests(tests));
        assert!(job.validate().is_err());
    }
}
