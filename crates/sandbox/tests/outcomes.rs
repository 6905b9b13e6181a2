//! Each kind of outcome, from real runs: what the validators turn into feedback.

mod common;

use common::*;
use forgeline_sandbox::{Check, Clock, Job, Outcome, TestKind, TestSuite};

#[tokio::test]
async fn a_program_that_prints_passes_with_its_output() {
    let report = run("print('hello')\nimport sys\nprint('oops', file=sys.stderr)\n").await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert_eq!(report.stdout, "hello\n");
    assert_eq!(report.stderr, "oops\n");
    assert!(report.duration.as_secs_f64() > 0.0);
    assert_eq!(report.isolation, *sandbox().await.isolation());
}

#[tokio::test]
async fn runs_in_a_fresh_directory_that_is_removed() {
    // The harness's own dot files (the space reserved for its record) aside.
    let code = "import os, tempfile\nprint(os.getcwd())\nprint(sorted(n for n in os.listdir('.') if not n.startswith('.forgeline')))\nprint(tempfile.gettempdir() == os.path.join(os.getcwd(), 'tmp'))\n";
    let report = run(code).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    let lines: Vec<&str> = report.stdout.lines().collect();
    assert!(lines[0].contains("forgeline-run-"), "{}", report.stdout);
    assert_eq!(lines[1], "['solution.py', 'tmp']");
    assert_eq!(lines[2], "True");
    assert!(
        !std::path::Path::new(lines[0]).exists(),
        "the run directory was left behind"
    );
}

#[tokio::test]
async fn failed_assertion_reports_expression_and_values() {
    let code = "def add(a, b):\n    return a - b\n";
    let tests =
        "from solution import add\n\nassert add(1, 0) == 1\nassert add(2, 2) == 4, 'two and two'\n";
    let report = test(code, tests).await;
    let Outcome::AssertionFailed(failure) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!(failure.file.as_deref(), Some("test_solution.py"));
    assert_eq!(failure.line, Some(4));
    assert_eq!(failure.expression.as_deref(), Some("add(2, 2) == 4"));
    let comparison = failure.comparison.as_ref().unwrap();
    assert_eq!(
        (comparison.left.as_str(), comparison.op.as_str()),
        ("0", "==")
    );
    assert_eq!(comparison.right, "4");
    assert_eq!(failure.message.as_deref(), Some("two and two"));
    let tests = report.tests.unwrap();
    assert_eq!((tests.runner.as_str(), tests.failed), ("script", 1));
}

#[tokio::test]
async fn exception_reports_type_message_line_and_user_frames_only() {
    let code = "def parse(text):\n    return int(text)\n\ndef total(items):\n    return sum(parse(i) for i in items)\n\nprint(total(['1', 'two']))\n";
    let report = run(code).await;
    let Outcome::Exception(exc) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!(exc.exception_type, "ValueError");
    assert_eq!(exc.message, "invalid literal for int() with base 10: 'two'");
    assert_eq!(
        (exc.file.as_deref(), exc.line),
        (Some("solution.py"), Some(2))
    );
    assert!(
        exc.traceback.iter().all(|f| f.file == "solution.py"),
        "{exc:#?}"
    );
    assert_eq!(exc.traceback.first().unwrap().line, 7);
    assert_eq!(
        exc.traceback.last().unwrap().code.as_deref(),
        Some("return int(text)")
    );
    let text = report.outcome.to_string();
    assert!(!text.contains("forgeline"), "sandbox frames leak: {text}");
}

#[tokio::test]
async fn recursion_error_collapses_repeated_frames() {
    let report = run("def f(n):\n    return f(n + 1)\n\nf(0)\n").await;
    let Outcome::Exception(exc) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!(exc.exception_type, "RecursionError");
    assert!(exc.traceback.len() <= 12, "{:#?}", exc.traceback);
    assert!(exc.traceback.iter().any(|f| f.repeat.unwrap_or(0) > 100));
}

#[tokio::test]
async fn syntax_error_reports_line_and_column_without_running() {
    let report = run("print('ran')\ndef f(x)\n    return x\n").await;
    let Outcome::SyntaxError(err) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!((err.file.as_str(), err.line), ("solution.py", Some(2)));
    assert_eq!(err.column, Some(9));
    assert_eq!(err.message, "expected ':'");
    assert_eq!(err.text.as_deref(), Some("def f(x)"));
    assert_eq!(report.stdout, "");
}

#[tokio::test]
async fn syntax_check_executes_nothing() {
    let sandbox = sandbox().await;
    let ok = sandbox
        .check_syntax(&module("print('ran')\nraise SystemExit(3)\n"))
        .await
        .unwrap();
    assert_eq!(ok.outcome, Outcome::Passed, "{}", show(&ok));
    assert_eq!(ok.stdout, "");
    let bad = sandbox.check_syntax(&module("x = (1,\n")).await.unwrap();
    assert!(
        matches!(bad.outcome, Outcome::SyntaxError(_)),
        "{}",
        show(&bad)
    );
}

#[tokio::test]
async fn import_check_runs_top_level_code_but_not_main() {
    let sandbox = sandbox().await;
    let code = "import json\nVALUE = 1\nif __name__ == '__main__':\n    raise SystemExit(5)\n";
    let ok = sandbox.check_import(&module(code)).await.unwrap();
    assert_eq!(ok.outcome, Outcome::Passed, "{}", show(&ok));
    let broken = sandbox
        .check_import(&module("import no_such_module_here\n"))
        .await
        .unwrap();
    let Outcome::Exception(exc) = &broken.outcome else {
        panic!("{}", show(&broken))
    };
    assert_eq!(exc.exception_type, "ModuleNotFoundError");
    assert_eq!(exc.line, Some(1));
}

#[tokio::test]
async fn doctests_pass_and_fail_with_expected_and_got() {
    let sandbox = sandbox().await;
    let good =
        "def square(x):\n    \"\"\"\n    >>> square(3)\n    9\n    \"\"\"\n    return x * x\n";
    let report = sandbox.run_doctests(&module(good)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert_eq!(report.tests.unwrap().total, 1);

    let bad = "def square(x):\n    \"\"\"\n    >>> square(3)\n    9\n    >>> square(-2)\n    4\n    \"\"\"\n    return x * abs(x)\n";
    let report = sandbox.run_doctests(&module(bad)).await.unwrap();
    let Outcome::DoctestFailed(failure) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!(failure.name, "square");
    assert_eq!(failure.line, Some(5));
    assert_eq!(failure.source, "square(-2)");
    assert_eq!(
        (failure.expected.as_str(), failure.got.as_str()),
        ("4", "-4")
    );

    let none = sandbox
        .run_doctests(&module("def f():\n    return 1\n"))
        .await
        .unwrap();
    assert!(
        matches!(none.outcome, Outcome::NoTests { .. }),
        "{}",
        show(&none)
    );
}

#[tokio::test]
async fn unittest_files_report_the_failing_test() {
    let code = "def add(a, b):\n    return a + b + (a < 0)\n";
    let tests = "import unittest\nfrom solution import add\n\nclass TestAdd(unittest.TestCase):\n    def test_pos(self):\n        self.assertEqual(add(1, 2), 3)\n\n    def test_neg(self):\n        self.assertEqual(add(-1, -2), -3)\n";
    let report = test(code, tests).await;
    let Outcome::AssertionFailed(failure) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!(failure.test.as_deref(), Some("TestAdd.test_neg"));
    assert_eq!(failure.line, Some(9));
    assert_eq!(failure.message.as_deref(), Some("-2 != -3"));
    let tests = report.tests.unwrap();
    assert_eq!(
        (tests.runner.as_str(), tests.total, tests.failed),
        ("unittest", 2, 1)
    );
}

#[tokio::test]
async fn humaneval_check_gets_the_entry_point() {
    let code = "def incr_list(l):\n    return [x + 1 for x in l]\n";
    let tests = "METADATA = {}\n\ndef check(candidate):\n    assert candidate([]) == []\n    assert candidate([1, 2]) == [2, 3]\n";
    let suite = TestSuite::new("test_solution.py", tests)
        .unwrap()
        .with_entry_point("incr_list")
        .unwrap();
    let sandbox = sandbox().await;
    let report = sandbox.run_tests(&module(code), &suite).await.unwrap();
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert_eq!(report.tests.unwrap().runner, "check");

    let wrong = "def incr_list(l):\n    return [x + 2 for x in l]\n";
    let report = sandbox.run_tests(&module(wrong), &suite).await.unwrap();
    let Outcome::AssertionFailed(failure) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!(failure.test.as_deref(), Some("check"));
    let comparison = failure.comparison.as_ref().unwrap();
    assert_eq!(
        (comparison.left.as_str(), comparison.right.as_str()),
        ("[3, 4]", "[2, 3]")
    );

    let missing = suite.clone().with_entry_point("other").unwrap();
    let report = sandbox.run_tests(&module(code), &missing).await.unwrap();
    let Outcome::Exception(exc) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert!(exc.message.contains("'other'"), "{}", show(&report));
}

#[tokio::test]
async fn test_functions_run_with_pytest_or_without_it() {
    let code = "def div(a, b):\n    return a / b\n";
    let tests = "from solution import div\n\ndef test_div():\n    assert div(4, 2) == 2\n\ndef test_zero():\n    assert div(1, 0) == 0\n";
    let report = test(code, tests).await;
    let Outcome::Exception(exc) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!(exc.exception_type, "ZeroDivisionError");
    assert_eq!(
        (exc.file.as_deref(), exc.line),
        (Some("solution.py"), Some(2))
    );
    assert_eq!(exc.test.as_deref(), Some("test_zero"));
    let tests = report.tests.unwrap();
    let expected = if sandbox().await.python().pytest {
        "pytest"
    } else {
        "functions"
    };
    assert_eq!(
        (tests.runner.as_str(), tests.total, tests.failed),
        (expected, 2, 1)
    );
}

#[tokio::test]
async fn pytest_files_say_when_pytest_is_missing() {
    let code = "def add(a, b):\n    return a + b\n";
    let tests = "import pytest\nfrom solution import add\n\n@pytest.mark.parametrize('a,b,c', [(1, 2, 3), (2, 2, 4)])\ndef test_add(a, b, c):\n    assert add(a, b) == c\n";
    let report = test(code, tests).await;
    if sandbox().await.python().pytest {
        assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
        assert_eq!(report.tests.unwrap().total, 2);
    } else {
        let Outcome::RunnerUnavailable { runner, message } = &report.outcome else {
            panic!("{}", show(&report))
        };
        assert_eq!(runner, "pytest");
        assert!(message.contains("pytest is not installed"), "{message}");
    }
}

#[tokio::test]
async fn explicit_test_kinds_are_honoured() {
    let suite = TestSuite::new(
        "test_solution.py",
        "from solution import X\nassert X == 1\n",
    )
    .unwrap()
    .with_kind(TestKind::Script);
    let report = sandbox()
        .await
        .run_tests(&module("X = 1\n"), &suite)
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    let pytest = suite.with_kind(TestKind::Pytest);
    let report = sandbox()
        .await
        .run_tests(&module("X = 1\n"), &pytest)
        .await
        .unwrap();
    if !sandbox().await.python().pytest {
        assert!(matches!(report.outcome, Outcome::RunnerUnavailable { .. }));
    }
}

#[tokio::test]
async fn tests_that_import_a_missing_name_say_which() {
    let report = test(
        "def add(a, b):\n    return a + b\n",
        "from solution import sub\nassert sub(1, 1) == 0\n",
    )
    .await;
    let Outcome::Exception(exc) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!(exc.exception_type, "ImportError");
    assert!(
        exc.message.contains("cannot import name 'sub'"),
        "{}",
        exc.message
    );
    assert_eq!(
        (exc.file.as_deref(), exc.line),
        (Some("test_solution.py"), Some(1))
    );
}

#[tokio::test]
async fn wall_and_cpu_timeouts_are_told_apart() {
    let sleeping = run("import time\ntime.sleep(60)\n").await;
    assert!(
        matches!(
            sleeping.outcome,
            Outcome::Timeout {
                clock: Clock::Wall,
                ..
            }
        ),
        "{}",
        show(&sleeping)
    );
    let limits = forgeline_sandbox::Limits {
        cpu_time: std::time::Duration::from_secs(1),
        ..test_limits()
    };
    let job = Job::new(module("while True:\n    pass\n"), Check::Run).with_limits(limits);
    let spinning = sandbox().await.run(job).await.unwrap();
    assert!(
        matches!(
            spinning.outcome,
            Outcome::Timeout {
                clock: Clock::Cpu,
                ..
            }
        ),
        "{}",
        show(&spinning)
    );
    assert!(
        spinning.duration.as_secs_f64() < 5.0,
        "{:?}",
        spinning.duration
    );
}

#[tokio::test]
async fn output_printed_before_a_hang_is_kept() {
    let report = run("print('before the loop')\nwhile True:\n    pass\n").await;
    assert!(matches!(report.outcome, Outcome::Timeout { .. }));
    assert_eq!(report.stdout, "before the loop\n");
}
