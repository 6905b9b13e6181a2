//! `forgeline check` end to end: the real binary, in a temporary directory.

use std::path::Path;
use std::process::{Command, Output};

const CODE: &str =
    "def add(a, b):\n    \"\"\"\n    >>> add(2, 3)\n    5\n    \"\"\"\n    return a + b\n";
const BROKEN: &str = "def add(a, b):\n    return a - b\n";
const TESTS: &str = "from solution import add\n\nassert add(1, 0) == 1\nassert add(2, 2) == 4\n";

struct Run {
    command: String,
    dir: tempfile::TempDir,
    output: Output,
}

impl Run {
    fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// Everything needed to understand a failure: the command, its output and the files.
    fn explain(&self) -> String {
        let mut text = format!(
            "command: {}\nexit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.output.status,
            self.stdout(),
            self.stderr()
        );
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let contents = std::fs::read_to_string(entry.path()).unwrap_or_default();
            text.push_str(&format!(
                "\n--- {} ---\n{contents}",
                entry.file_name().to_string_lossy()
            ));
        }
        text
    }
}

/// Writes `files` into a fresh directory and runs `forgeline check ARGS` there.
fn check(files: &[(&str, &str)], args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    for (name, contents) in files {
        std::fs::write(dir.path().join(name), contents).unwrap();
    }
    let output = Command::new(env!("CARGO_BIN_EXE_forgeline"))
        .arg("check")
        .args(args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    Run {
        command: format!("forgeline check {}", args.join(" ")),
        dir,
        output,
    }
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout()).unwrap_or_else(|e| panic!("{e}\n{}", run.explain()))
}

#[test]
fn a_passing_file_exits_0() {
    let run = check(
        &[("solution.py", CODE), ("test_solution.py", TESTS)],
        &["solution.py", "--tests", "test_solution.py"],
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    assert!(run.stdout().contains("passed"), "{}", run.explain());

    let doctest = check(&[("solution.py", CODE)], &["solution.py", "--doctest"]);
    assert_eq!(doctest.code(), 0, "{}", doctest.explain());

    let program = check(&[("hello.py", "print('hi')\n")], &["hello.py"]);
    assert_eq!(program.code(), 0, "{}", program.explain());
}

#[test]
fn a_failing_test_exits_1_and_shows_the_assertion() {
    let run = check(
        &[("solution.py", BROKEN), ("test_solution.py", TESTS)],
        &["solution.py", "--tests", "test_solution.py"],
    );
    assert_eq!(run.code(), 1, "{}", run.explain());
    let stdout = run.stdout();
    assert!(stdout.contains("FAILED"), "{}", run.explain());
    assert!(stdout.contains("test_solution.py:4"), "{}", run.explain());
    assert!(stdout.contains("add(2, 2) == 4"), "{}", run.explain());
}

#[test]
fn a_syntax_error_exits_1_with_its_line() {
    let run = check(
        &[("solution.py", "def add(a, b)\n    return a + b\n")],
        &["solution.py"],
    );
    assert_eq!(run.code(), 1, "{}", run.explain());
    assert!(
        run.stdout().contains("SyntaxError at solution.py:1"),
        "{}",
        run.explain()
    );
}

#[test]
fn json_output_is_the_typed_outcome() {
    let run = check(
        &[("solution.py", BROKEN), ("test_solution.py", TESTS)],
        &[
            "solution.py",
            "--tests",
            "test_solution.py",
            "--json",
            "--timeout",
            "5",
        ],
    );
    assert_eq!(run.code(), 1, "{}", run.explain());
    let value = json(&run);
    assert_eq!(value["passed"], false, "{}", run.explain());
    let outcome = &value["outcome"];
    assert_eq!(outcome["status"], "assertion_failed", "{}", run.explain());
    assert_eq!(outcome["line"], 4);
    assert_eq!(outcome["expression"], "add(2, 2) == 4");
    assert_eq!(outcome["comparison"]["left"], "0");
    assert_eq!(outcome["comparison"]["right"], "4");
    let check = &value["checks"][0];
    assert_eq!(check["check"], "tests");
    assert!(check["duration_s"].as_f64().unwrap() > 0.0);
    assert!(check["isolation"]["level"].is_string());

    let passing = check_json_passing();
    assert_eq!(passing["outcome"]["status"], "passed");
}

fn check_json_passing() -> serde_json::Value {
    let run = check(
        &[("solution.py", CODE)],
        &["solution.py", "--doctest", "--json"],
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    json(&run)
}

#[test]
fn a_missing_file_exits_2_naming_it() {
    let run = check(&[], &["no_such_file.py"]);
    assert_eq!(run.code(), 2, "{}", run.explain());
    assert!(
        run.stderr().contains("no_such_file.py"),
        "{}",
        run.explain()
    );

    let tests = check(
        &[("solution.py", CODE)],
        &["solution.py", "--tests", "missing_tests.py"],
    );
    assert_eq!(tests.code(), 2, "{}", tests.explain());
    assert!(
        tests.stderr().contains("missing_tests.py"),
        "{}",
        tests.explain()
    );
}

#[test]
fn a_timeout_is_reported() {
    let run = check(
        &[("spin.py", "while True:\n    pass\n")],
        &["spin.py", "--timeout", "1", "--json"],
    );
    assert_eq!(run.code(), 1, "{}", run.explain());
    assert_eq!(
        json(&run)["outcome"]["status"],
        "timeout",
        "{}",
        run.explain()
    );
    assert!(Path::new(env!("CARGO_BIN_EXE_forgeline")).exists());
}

/// A timeout no `Duration` can hold (or none at all) is a usage error, not a panic.
#[test]
fn an_impossible_timeout_exits_2_naming_the_flag() {
    for t in ["1e20", "NaN", "inf", "0"] {
        let run = check(&[("ok.py", "x = 1\n")], &["ok.py", "--timeout", t]);
        assert_eq!(run.code(), 2, "{t}: {}", run.explain());
        assert!(run.stderr().contains("--timeout"), "{t}: {}", run.explain());
    }
}
