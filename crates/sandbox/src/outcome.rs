//! What a run did, as types: the [`Outcome`] of the check and the [`RunReport`] around it.
//!
//! Validators turn outcomes into feedback for a model, so the `Display` forms are short: the
//! failing line, the values compared, the innermost frames, never a sandbox path.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::isolation::IsolationReport;
use crate::limits::secs;

/// How a check ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Everything ran and every check passed.
    Passed,
    /// An `assert` (or a unittest assertion) failed.
    AssertionFailed(AssertionFailure),
    /// An exception escaped the code under test or a test.
    Exception(RaisedException),
    /// The code (or the test file) does not parse.
    SyntaxError(SyntaxErrorInfo),
    /// A docstring example printed something other than what it shows.
    DoctestFailed(DoctestFailure),
    /// The run exceeded its wall-clock or CPU-time limit and was killed.
    Timeout {
        clock: Clock,
        #[serde(with = "secs")]
        limit: Duration,
    },
    /// The run exceeded its memory limit.
    MemoryLimit { limit_bytes: u64 },
    /// A process was killed by a signal (a crash in native code, a stack overflow...).
    KilledBySignal { signal: i32, name: String },
    /// The program exited (`sys.exit`, `os._exit`) with a failure code, or before the checks
    /// were over.
    Exited { code: i32, message: Option<String> },
    /// The tests contain no test.
    NoTests { message: String },
    /// The tests need a runner that is not available, such as pytest when it is not installed.
    RunnerUnavailable { runner: String, message: String },
}

/// Which limit a [`Outcome::Timeout`] hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clock {
    Wall,
    Cpu,
}

/// A failed assertion, with the values compared when the assert was `left <op> right`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssertionFailure {
    /// The test that failed (`test_add`, `TestAdd.test_neg`, `check`), when tests ran.
    pub test: Option<String>,
    /// Where the assertion failed: the innermost frame in the code under test or the tests.
    pub file: Option<String>,
    pub line: Option<u32>,
    /// The asserted condition (`add(2, 2) == 5`), or the failing line for unittest assertions.
    pub expression: Option<String>,
    /// The operands of the comparison, as `repr()` clipped to 200 characters.
    pub comparison: Option<Comparison>,
    /// The assertion's message (`assert x, "message"`, or unittest's `4 != 5`).
    pub message: Option<String>,
    pub traceback: Vec<Frame>,
    #[serde(default)]
    pub frames_omitted: u32,
}

/// The two sides of a failed comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comparison {
    pub left: String,
    pub op: String,
    pub right: String,
}

/// An exception that escaped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RaisedException {
    pub test: Option<String>,
    /// The exception's type, module-qualified unless built in (`ValueError`,
    /// `json.decoder.JSONDecodeError`).
    #[serde(rename = "type")]
    pub exception_type: String,
    pub message: String,
    /// The innermost frame in user code (the code under test or the tests).
    pub file: Option<String>,
    pub line: Option<u32>,
    /// From the first frame of user code on, outermost first; sandbox and test-runner frames
    /// are left out and repeated frames collapsed.
    pub traceback: Vec<Frame>,
    #[serde(default)]
    pub frames_omitted: u32,
}

/// One traceback frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub file: String,
    pub line: u32,
    pub function: String,
    pub code: Option<String>,
    /// How many times this frame repeats in a row (recursion), when more than once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat: Option<u32>,
}

/// Where and why the source does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntaxErrorInfo {
    pub file: String,
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub message: String,
    /// The offending line.
    pub text: Option<String>,
}

/// The first docstring example whose output differed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctestFailure {
    /// The function (or class, or module) whose docstring holds the example.
    pub name: String,
    pub file: String,
    pub line: Option<u32>,
    /// The example's code, without the `>>> ` prompt.
    pub source: String,
    pub expected: String,
    pub got: String,
}

/// How many tests ran, and which runner ran them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestSummary {
    /// `script`, `check`, `unittest`, `pytest`, `functions` (test functions run without
    /// pytest) or `doctest`.
    pub runner: String,
    pub total: u32,
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
}

/// Everything known about one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub outcome: Outcome,
    /// Present when tests or doctests ran.
    pub tests: Option<TestSummary>,
    #[serde(rename = "duration_s", with = "secs")]
    pub duration: Duration,
    /// Captured output as text to read (for people and models): lossy UTF-8, paths in the
    /// run directory made relative, and cut at [`Limits::output_bytes`] with a visible
    /// marker. For comparing runs use [`raw_stdout`](RunReport::raw_stdout).
    ///
    /// [`Limits::output_bytes`]: crate::Limits::output_bytes
    pub stdout: String,
    pub stderr: String,
    /// The same output exactly as the program wrote it, byte for byte up to
    /// [`Limits::output_bytes`](crate::Limits::output_bytes), with whether it was cut there.
    #[serde(default)]
    pub raw_stdout: CapturedOutput,
    #[serde(default)]
    pub raw_stderr: CapturedOutput,
    /// The isolation this run had.
    pub isolation: IsolationReport,
    /// Files the program wrote that the job asked to keep ([`Job::keep_files`](crate::Job::keep_files)).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<KeptFile>,
}

/// One output stream of a run, exactly as written: not decoded, no path rewritten, no marker.
/// In JSON only its counts appear (the text is in [`RunReport::stdout`] and `stderr`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturedOutput {
    /// The first [`Limits::output_bytes`](crate::Limits::output_bytes) bytes written.
    #[serde(skip)]
    pub bytes: Vec<u8>,
    /// How many bytes were written in all.
    pub total_bytes: u64,
    /// Whether more was written than [`bytes`](CapturedOutput::bytes) holds (the rest was
    /// dropped): two runs whose output was cut may differ after the cut.
    pub truncated: bool,
}

impl CapturedOutput {
    /// The bytes as text, when they are UTF-8 (a cut may fall inside a character).
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.bytes).ok()
    }
}

/// A file a run wrote, kept after its directory is removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptFile {
    /// Path relative to the run directory.
    pub name: String,
    #[serde(skip)]
    pub bytes: Vec<u8>,
    pub size: u64,
}

impl Outcome {
    pub fn is_passed(&self) -> bool {
        matches!(self, Outcome::Passed)
    }

    /// The outcome's tag, as in JSON (`passed`, `assertion_failed`, ...).
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::AssertionFailed(_) => "assertion_failed",
            Outcome::Exception(_) => "exception",
            Outcome::SyntaxError(_) => "syntax_error",
            Outcome::DoctestFailed(_) => "doctest_failed",
            Outcome::Timeout { .. } => "timeout",
            Outcome::MemoryLimit { .. } => "memory_limit",
            Outcome::KilledBySignal { .. } => "killed_by_signal",
            Outcome::Exited { .. } => "exited",
            Outcome::NoTests { .. } => "no_tests",
            Outcome::RunnerUnavailable { .. } => "runner_unavailable",
        }
    }
}

impl RunReport {
    pub fn passed(&self) -> bool {
        self.outcome.is_passed()
    }
}

fn location(file: &Option<String>, line: Option<u32>) -> Option<String> {
    match (file, line) {
        (Some(f), Some(l)) => Some(format!("{f}:{l}")),
        (Some(f), None) => Some(f.clone()),
        _ => None,
    }
}

fn write_traceback(f: &mut fmt::Formatter<'_>, frames: &[Frame], omitted: u32) -> fmt::Result {
    if frames.len() < 2 {
        return Ok(());
    }
    write!(f, "\nTraceback (most recent call last):")?;
    for (i, frame) in frames.iter().enumerate() {
        if i == 3 && omitted > 0 {
            write!(f, "\n  ... {omitted} more frames ...")?;
        }
        write!(f, "\n  {}:{} in {}", frame.file, frame.line, frame.function)?;
        if let Some(code) = &frame.code {
            write!(f, ": {code}")?;
        }
        if let Some(n) = frame.repeat {
            write!(f, " [{n} times]")?;
        }
    }
    Ok(())
}

fn signal_description(name: &str) -> &'static str {
    match name {
        "SIGSEGV" => "segmentation fault; a stack overflow from deep recursion causes it too",
        "SIGABRT" => "aborted",
        "SIGKILL" => "killed",
        "SIGBUS" => "bus error",
        "SIGFPE" => "arithmetic error",
        "SIGILL" => "illegal instruction",
        "SIGTERM" => "terminated",
        "SIGPIPE" => "broken pipe",
        "SIGXFSZ" => "file size limit exceeded",
        _ => "",
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Passed => write!(f, "passed"),
            Outcome::AssertionFailed(a) => {
                write!(f, "AssertionError")?;
                if let Some(at) = location(&a.file, a.line) {
                    write!(f, " at {at}")?;
                }
                if let Some(test) = &a.test {
                    write!(f, " (in {test})")?;
                }
                if let Some(expression) = &a.expression {
                    write!(f, ": {expression}")?;
                }
                if let Some(c) = &a.comparison {
                    write!(f, "\n  left:  {}\n  right: {}", c.left, c.right)?;
                }
                if let Some(message) = &a.message {
                    write!(f, "\n  message: {message}")?;
                }
                write_traceback(f, &a.traceback, a.frames_omitted)
            }
            Outcome::Exception(e) => {
                write!(f, "{}: {}", e.exception_type, e.message)?;
                if let Some(at) = location(&e.file, e.line) {
                    write!(f, "\n  at {at}")?;
                    if let Some(test) = &e.test {
                        write!(f, " (in {test})")?;
                    }
                } else if let Some(test) = &e.test {
                    write!(f, "\n  in {test}")?;
                }
                write_traceback(f, &e.traceback, e.frames_omitted)
            }
            Outcome::SyntaxError(s) => {
                write!(f, "SyntaxError at {}", s.file)?;
                if let Some(line) = s.line {
                    write!(f, ":{line}")?;
                    if let Some(column) = s.column {
                        write!(f, ":{column}")?;
                    }
                }
                write!(f, ": {}", s.message)?;
                if let Some(text) = &s.text {
                    write!(f, "\n    {}", text.trim_end())?;
                    if let Some(column) = s.column.filter(|c| *c > 0) {
                        let indent = text.len() - text.trim_start().len();
                        let caret = (column as usize - 1).saturating_sub(indent);
                        write!(f, "\n    {}^", " ".repeat(caret))?;
                    }
                }
                Ok(())
            }
            Outcome::DoctestFailed(d) => {
                write!(f, "doctest of {} failed", d.name)?;
                if let Some(at) = location(&Some(d.file.clone()), d.line) {
                    write!(f, " at {at}")?;
                }
                write!(f, "\n>>> {}\nexpected:\n", d.source.replace('\n', "\n... "))?;
                for line in d.expected.lines() {
                    writeln!(f, "    {line}")?;
                }
                write!(f, "got:")?;
                for line in d.got.lines() {
                    write!(f, "\n    {line}")?;
                }
                Ok(())
            }
            Outcome::Timeout { clock, limit } => {
                let which = match clock {
                    Clock::Wall => "wall-clock",
                    Clock::Cpu => "CPU-time",
                };
                write!(
                    f,
                    "timed out: exceeded the {} s {which} limit (an endless loop, or too slow)",
                    limit.as_secs_f64()
                )
            }
            Outcome::MemoryLimit { limit_bytes } => write!(
                f,
                "ran out of memory: exceeded the {} MiB memory limit",
                limit_bytes >> 20
            ),
            Outcome::KilledBySignal { name, .. } => {
                write!(f, "killed by signal {name}")?;
                match signal_description(name) {
                    "" => Ok(()),
                    description => write!(f, " ({description})"),
                }
            }
            Outcome::Exited { code, message } => {
                if *code == 0 {
                    write!(f, "exited with code 0 before the checks finished")?;
                } else {
                    write!(f, "exited with code {code}")?;
                }
                if let Some(message) = message {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            Outcome::NoTests { message } => write!(f, "no tests ran: {message}"),
            Outcome::RunnerUnavailable { message, .. } => {
                write!(f, "the tests could not run: {message}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(file: &str, line: u32, function: &str, code: &str) -> Frame {
        Frame {
            file: file.into(),
            line,
            function: function.into(),
            code: Some(code.into()),
            repeat: None,
        }
    }

    #[test]
    fn assertion_shows_expression_and_values() {
        let outcome = Outcome::AssertionFailed(AssertionFailure {
            test: Some("test_add".into()),
            file: Some("test_solution.py".into()),
            line: Some(4),
            expression: Some("add(2, 2) == 5".into()),
            comparison: Some(Comparison {
                left: "4".into(),
                op: "==".into(),
                right: "5".into(),
            }),
            message: None,
            traceback: vec![frame(
                "test_solution.py",
                4,
                "test_add",
                "assert add(2, 2) == 5",
            )],
            frames_omitted: 0,
        });
        assert_eq!(
            outcome.to_string(),
            "AssertionError at test_solution.py:4 (in test_add): add(2, 2) == 5\n  left:  4\n  right: 5"
        );
    }

    #[test]
    fn exception_shows_location_and_traceback() {
        let outcome = Outcome::Exception(RaisedException {
            test: None,
            exception_type: "ZeroDivisionError".into(),
            message: "division by zero".into(),
            file: Some("solution.py".into()),
            line: Some(5),
            traceback: vec![
                frame("solution.py", 7, "<module>", "print(f(0))"),
                frame("solution.py", 5, "f", "return 1 / x"),
            ],
            frames_omitted: 0,
        });
        let text = outcome.to_string();
        assert!(text.starts_with("ZeroDivisionError: division by zero\n  at solution.py:5"));
        assert!(text.contains("solution.py:5 in f: return 1 / x"), "{text}");
    }

    #[test]
    fn syntax_error_points_at_the_column() {
        let outcome = Outcome::SyntaxError(SyntaxErrorInfo {
            file: "solution.py".into(),
            line: Some(1),
            column: Some(7),
            message: "invalid syntax".into(),
            text: Some("def f(:".into()),
        });
        assert_eq!(
            outcome.to_string(),
            "SyntaxError at solution.py:1:7: invalid syntax\n    def f(:\n          ^"
        );
    }

    #[test]
    fn serializes_with_a_status_tag() {
        let outcome = Outcome::Timeout {
            clock: Clock::Wall,
            limit: Duration::from_millis(1500),
        };
        let json = serde_json::to_value(&outcome).unwrap();
        assert_eq!(json["status"], "timeout");
        assert_eq!(json["clock"], "wall");
        assert_eq!(json["limit"], 1.5);
        let back: Outcome = serde_json::from_value(json).unwrap();
        assert_eq!(back, outcome);
        assert_eq!(outcome.status(), "timeout");
        let passed = serde_json::to_value(Outcome::Passed).unwrap();
        assert_eq!(passed, serde_json::json!({"status": "passed"}));
    }

    #[test]
    fn signal_outcome_explains_common_signals() {
        let outcome = Outcome::KilledBySignal {
            signal: 11,
            name: "SIGSEGV".into(),
        };
        assert!(outcome.to_string().contains("deep recursion"));
    }
}
