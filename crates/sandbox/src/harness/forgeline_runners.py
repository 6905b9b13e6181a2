"""Test runners of the harness: assert scripts, HumanEval-style check(candidate), unittest,
pytest (only when installed), pytest-style test functions without pytest, and doctests.

Each returns a passed record or raises CheckFailed with the record of the first failure; both
carry a "tests" summary. The tests import the code under test by its module name, which the
harness has already loaded, as pytest would (`from solution import add`).
"""
import os
import sys

import forgeline_report as report
from forgeline_harness import compile_file, execute
from forgeline_report import CheckFailed


def summary(runner, total, failed, skipped=0):
    return {
        "runner": runner,
        "total": total,
        "passed": max(total - failed - skipped, 0),
        "failed": failed,
        "skipped": skipped,
    }


def _with_summary(record, tests):
    record = dict(record)
    record["tests"] = tests
    return record


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def pytest_available():
    import importlib.util

    return importlib.util.find_spec("pytest") is not None


def tests(ctx, kind, entry_point):
    # Test files nearly always assert: load the rewriter (and ast) before any user module.
    import forgeline_asserts  # noqa: F401

    if kind == "auto":
        kind = detect(ctx, entry_point)
    return RUNNERS[kind](ctx, entry_point)


def detect(ctx, entry_point):
    """Which kind of test file this is, from its top-level definitions and imports."""
    import ast

    compile_file(ctx, ctx.tests_path, rewrite=False)  # reports syntax errors of the test file
    with open(ctx.tests_path, "rb") as f:
        tree = ast.parse(f.read(), ctx.tests_path)
    functions = {
        n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    has_test_functions = any(name.startswith("test") for name in functions) or any(
        c.name.startswith("Test") for c in classes
    )
    if "check" in functions and (entry_point or not has_test_functions):
        return "check"
    if "pytest" in imported:
        return "pytest"
    for cls in classes:
        for base in cls.bases:
            name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
            if name.endswith("TestCase"):
                return "unittest"
    if has_test_functions:
        return "pytest" if pytest_available() else "functions"
    return "script"


def run_script(ctx, _entry_point):
    execute(ctx, ctx.module_path, ctx.module_name)
    try:
        execute(ctx, ctx.tests_path, "__main__", as_main=True)
    except CheckFailed as failed:
        record = failed.record
        if record["status"] == "exit" and record["code"] in (0, None):
            return _with_summary({"status": "passed"}, summary("script", 1, 0))
        raise CheckFailed(_with_summary(record, summary("script", 1, 1)))
    return _with_summary({"status": "passed"}, summary("script", 1, 0))


def _infer_entry_point(module):
    names = [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and callable(value)
        and getattr(value, "__module__", None) == module.__name__
        and not isinstance(value, type)
    ]
    return names[0] if len(names) == 1 else None


def run_check(ctx, entry_point):
    module = execute(ctx, ctx.module_path, ctx.module_name)
    tests_module = execute(ctx, ctx.tests_path, _stem(ctx.tests_path))
    check = getattr(tests_module, "check", None)
    if not callable(check):
        raise CheckFailed(
            {
                "status": "no_tests",
                "message": "%s defines no check(candidate) function" % ctx.short(ctx.tests_path),
            }
        )
    entry_point = entry_point or _infer_entry_point(module)
    if entry_point is None:
        raise CheckFailed(
            {
                "status": "runner_unavailable",
                "runner": "check",
                "message": "check(candidate) tests need the entry point: the name of the "
                "function under test",
            }
        )
    candidate = getattr(module, entry_point, None)
    if candidate is None:
        raise CheckFailed(
            _with_summary(
                {
                    "status": "exception",
                    "type": "NameError",
                    "message": "%s defines no %r, the function the tests call"
                    % (ctx.short(ctx.module_path), entry_point),
                    "test": "check",
                    "file": ctx.short(ctx.module_path),
                    "line": None,
                    "frames": [],
                    "frames_omitted": 0,
                },
                summary("check", 1, 1),
            )
        )
    ctx.last_compare = None
    try:
        check(candidate)
    except BaseException as exc:
        raise CheckFailed(_with_summary(report.failure(ctx, exc, "check"), summary("check", 1, 1)))
    return _with_summary({"status": "passed"}, summary("check", 1, 0))


def _unittest_name(test):
    method = getattr(test, "_testMethodName", None)
    if method:
        return "%s.%s" % (type(test).__name__, method)
    case = getattr(test, "test_case", None)  # a subTest
    if case is not None:
        return "%s %s" % (_unittest_name(case), test._subDescription())
    return getattr(test, "description", None) or str(test)


def run_unittest(ctx, _entry_point):
    import unittest

    class Result(unittest.TestResult):
        def __init__(self):
            super().__init__()
            self.first = None
            self.failed = 0

        def startTest(self, test):
            ctx.last_compare = None
            super().startTest(test)

        def _note(self, test, err):
            self.failed += 1
            if self.first is None:
                exc = err[1]
                if exc.__traceback__ is None:
                    exc = exc.with_traceback(err[2])
                self.first = report.failure(ctx, exc, _unittest_name(test))

        def addError(self, test, err):
            self._note(test, err)
            super().addError(test, err)

        def addFailure(self, test, err):
            self._note(test, err)
            super().addFailure(test, err)

        def addSubTest(self, test, subtest, err):
            if err is not None:
                self._note(subtest, err)
            super().addSubTest(test, subtest, err)

        def addUnexpectedSuccess(self, test):
            self.failed += 1
            if self.first is None:
                self.first = {
                    "status": "assertion_failed",
                    "test": _unittest_name(test),
                    "message": "unexpected success of a test marked expectedFailure",
                    "file": ctx.short(ctx.tests_path),
                    "line": None,
                    "frames": [],
                    "frames_omitted": 0,
                }
            super().addUnexpectedSuccess(test)

    execute(ctx, ctx.module_path, ctx.module_name)
    tests_module = execute(ctx, ctx.tests_path, _stem(ctx.tests_path))
    suite = unittest.TestLoader().loadTestsFromModule(tests_module)
    result = Result()
    suite.run(result)
    counts = summary("unittest", result.testsRun, result.failed, len(result.skipped))
    if result.first is not None:
        raise CheckFailed(_with_summary(result.first, counts))
    if result.testsRun == 0:
        raise CheckFailed(
            {"status": "no_tests", "message": "no test cases in %s" % ctx.short(ctx.tests_path)}
        )
    return _with_summary({"status": "passed"}, counts)


def run_functions(ctx, _entry_point):
    """pytest-style test functions and Test classes, run without pytest (which is not installed)."""
    import types

    execute(ctx, ctx.module_path, ctx.module_name)
    tests_module = execute(ctx, ctx.tests_path, _stem(ctx.tests_path))
    cases = []
    for name, value in list(vars(tests_module).items()):
        if name.startswith("test") and isinstance(value, types.FunctionType):
            if value.__module__ == tests_module.__name__:
                cases.append((name, None, value))
        elif name.startswith("Test") and isinstance(value, type):
            for method_name, method in vars(value).items():
                if method_name.startswith("test") and isinstance(method, types.FunctionType):
                    cases.append(("%s.%s" % (name, method_name), value, method))
    for name, cls, function in cases:
        required = function.__code__.co_argcount - len(function.__defaults__ or ())
        if required > (1 if cls is not None else 0):
            raise CheckFailed(
                {
                    "status": "runner_unavailable",
                    "runner": "pytest",
                    "message": "pytest is not installed, and %s takes arguments (pytest fixtures)"
                    % name,
                }
            )
    failed = 0
    first = None
    for name, cls, function in cases:
        ctx.last_compare = None
        try:
            if cls is None:
                function()
            else:
                instance = cls()
                if hasattr(instance, "setup_method"):
                    instance.setup_method(function)
                function(instance)
        except BaseException as exc:
            failed += 1
            if first is None:
                first = report.failure(ctx, exc, name)
            if isinstance(exc, (MemoryError, SystemExit, KeyboardInterrupt)):
                break
    counts = summary("functions", len(cases), failed)
    if first is not None:
        raise CheckFailed(_with_summary(first, counts))
    if not cases:
        raise CheckFailed(
            {"status": "no_tests", "message": "no test functions in %s" % ctx.short(ctx.tests_path)}
        )
    return _with_summary({"status": "passed"}, counts)


def _pytest_unavailable():
    return CheckFailed(
        {
            "status": "runner_unavailable",
            "runner": "pytest",
            "message": "pytest is not installed for %s; install it to run pytest tests"
            % sys.executable,
        }
    )


def run_pytest(ctx, _entry_point):
    if not pytest_available():
        raise _pytest_unavailable()
    import pytest

    execute(ctx, ctx.module_path, ctx.module_name)
    compile_file(ctx, ctx.tests_path, rewrite=False)

    quiet_exceptions = (pytest.skip.Exception, pytest.xfail.Exception)

    class Collector:
        def __init__(self):
            self.first = None
            self.passed = self.failed = self.skipped = 0
            self.collect_error = None

        def pytest_runtest_makereport(self, item, call):
            excinfo = call.excinfo
            if excinfo is None or self.first is not None:
                return None
            if excinfo.errisinstance(quiet_exceptions) or item.get_closest_marker("xfail"):
                return None
            self.first = report.failure(ctx, excinfo.value, item.nodeid.split("::", 1)[-1])
            return None

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                if report.outcome == "passed":
                    self.passed += 1
                elif report.outcome == "skipped":
                    self.skipped += 1
                else:
                    self.failed += 1

        def pytest_collectreport(self, report):
            if report.failed and self.collect_error is None:
                self.collect_error = str(report.longrepr)

    collector = Collector()
    args = [ctx.tests_path, "-q", "--tb=short", "-p", "no:cacheprovider"]
    args += ["--rootdir", ctx.workdir, "-o", "addopts="]
    code = pytest.main(args, plugins=[collector])
    total = collector.passed + collector.failed + collector.skipped
    counts = summary("pytest", total, collector.failed, collector.skipped)
    if collector.first is not None:
        raise CheckFailed(_with_summary(collector.first, counts))
    if collector.collect_error is not None:
        raise CheckFailed(_with_summary(_collect_error(ctx, collector.collect_error), counts))
    if int(code) == 5 or total == 0:
        raise CheckFailed(
            {"status": "no_tests", "message": "pytest found no tests in %s" % ctx.short(ctx.tests_path)}
        )
    if int(code) != 0:
        raise CheckFailed(
            _with_summary(
                {
                    "status": "exception",
                    "type": "pytest",
                    "message": "pytest exited with code %d" % int(code),
                    "test": None,
                    "file": None,
                    "line": None,
                    "frames": [],
                    "frames_omitted": 0,
                },
                counts,
            )
        )
    return _with_summary({"status": "passed"}, counts)


def _collect_error(ctx, text):
    """The exception of a test file that pytest could not import, from its report text."""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    last = lines[-1] if lines else text.strip().splitlines()[-1]
    kind, _, message = last.partition(": ")
    return {
        "status": "exception",
        "type": kind if kind.isidentifier() or "." in kind else "CollectionError",
        "message": report.clip(ctx.scrub(message or last)),
        "test": None,
        "file": ctx.short(ctx.tests_path),
        "line": None,
        "frames": [],
        "frames_omitted": 0,
    }


def doctests(ctx):
    import doctest

    class Runner(doctest.DocTestRunner):
        first = None

        def _record(self, test, example, got):
            if self.first is None:
                line = None
                if test.lineno is not None and example.lineno is not None:
                    line = test.lineno + example.lineno + 1
                self.first = {
                    "status": "doctest_failed",
                    "name": test.name.split(".", 1)[-1],
                    "file": ctx.short(ctx.module_path),
                    "line": line,
                    "source": report.clip(example.source.rstrip("\n")),
                    "expected": report.clip(example.want.rstrip("\n")),
                    "got": report.clip(ctx.scrub(got.rstrip("\n"))),
                }

        def report_failure(self, out, test, example, got):
            self._record(test, example, got)

        def report_unexpected_exception(self, out, test, example, exc_info):
            exc = exc_info[1]
            got = "Traceback (most recent call last):\n  ...\n%s: %s" % (
                report.type_name(exc),
                report.safe_str(ctx, exc),
            )
            self._record(test, example, got)

    module = execute(ctx, ctx.module_path, ctx.module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = [t for t in finder.find(module, module.__name__) if t.examples]
    found.sort(key=lambda t: (t.lineno or 0, t.name))
    if not found:
        raise CheckFailed(
            {
                "status": "no_tests",
                "message": "no doctest examples (>>> lines) in the docstrings of %s"
                % ctx.short(ctx.module_path),
            }
        )
    runner = Runner(verbose=False)
    for test in found:
        runner.run(test, out=lambda _text: None)
    counts = summary("doctest", runner.tries, runner.failures)
    if runner.first is not None:
        raise CheckFailed(_with_summary(runner.first, counts))
    return _with_summary({"status": "passed"}, counts)


RUNNERS = {
    "script": run_script,
    "check": run_check,
    "unittest": run_unittest,
    "pytest": run_pytest,
    "functions": run_functions,
}
