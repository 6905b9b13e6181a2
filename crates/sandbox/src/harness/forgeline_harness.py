"""Runs one check of the code under test and writes one record of what happened.

run.py calls main() with the arguments MODE WORKDIR MODULE TESTS_FILE TEST_KIND ENTRY_POINT
ARGS...: MODE is syntax, import, run, doctest or tests; MODULE is the module name of the code
under test (its file is MODULE.py in WORKDIR); TESTS_FILE, TEST_KIND and ENTRY_POINT are used by
`tests`; ARGS are the program's own arguments: it sees sys.argv as after `python MODULE.py ARGS`
in WORKDIR.
The record goes to WORKDIR/.forgeline-result.json (see forgeline_report.py).

Imports are lazy: Python's start-up is most of the cost of a trivial run, and each module
imported here adds to it.
"""
import os
import sys

import forgeline_report as report
from forgeline_report import CheckFailed

try:
    from forgeline_config import SITE_DIRS
except ImportError:
    SITE_DIRS = []

# Released when the code under test exhausts its memory, so that the record can still be written.
_reserve = bytearray(1 << 20)

PASSED = {"status": "passed"}


def main():
    global _reserve
    mode, workdir, module_name, tests_file, test_kind, entry_point = sys.argv[1:7]
    sys.path.insert(0, workdir)
    sys.path.extend(d for d in SITE_DIRS if d not in sys.path)
    ctx = report.Context(workdir, module_name, tests_file)
    report.reserve(ctx)
    sys.argv = [module_name + ".py"] + sys.argv[7:]
    for stream in (sys.stdout, sys.stderr):
        try:
            # Output printed before a hang or a crash then still reaches the captured output.
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    try:
        record = MODES[mode](ctx, test_kind, entry_point)
    except CheckFailed as failed:
        record = failed.record
    except MemoryError:
        _reserve = None
        record = {"status": "memory_error"}
    except BaseException as exc:
        record = internal_error(exc)
    report.write(ctx, record)
    if mode != "run":
        # The checks are over: stray threads or atexit hooks of the code under test must not
        # hold the process. `run` exits as the program would, waiting for its threads.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(0)


def compile_file(ctx, path, rewrite=True):
    """Compiles a user file, with asserts rewritten to report values; errors become CheckFailed."""
    with open(path, "rb") as f:
        source = f.read()
    if b"\0" in source:
        raise CheckFailed(report.nul_byte_error(ctx, path, source))
    try:
        if rewrite and b"assert" in source:
            import forgeline_asserts

            forgeline_asserts.install(ctx)
            return forgeline_asserts.compile_rewritten(source, path)
        return compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise CheckFailed(report.syntax_error(ctx, exc, path))
    except ValueError as exc:
        raise CheckFailed(
            {
                "status": "syntax_error",
                "file": ctx.short(path),
                "line": None,
                "column": None,
                "message": report.clip(str(exc)),
                "text": None,
            }
        )


def execute(ctx, path, name, test=None, as_main=False):
    """Runs a user file as module `name` (or as __main__), as an import would; failures raise
    CheckFailed with their record."""
    code = compile_file(ctx, path)
    module = type(sys)("__main__" if as_main else name)
    module.__file__ = path
    sys.modules[module.__name__] = module
    try:
        exec(code, module.__dict__)
    except BaseException as exc:
        raise CheckFailed(report.failure(ctx, exc, test))
    return module


def check_syntax(ctx, _kind, _entry_point):
    compile_file(ctx, ctx.module_path, rewrite=False)
    return PASSED


def check_import(ctx, _kind, _entry_point):
    execute(ctx, ctx.module_path, ctx.module_name)
    return PASSED


def run_program(ctx, _kind, _entry_point):
    execute(ctx, ctx.module_path, ctx.module_name, as_main=True)
    return PASSED


def run_doctests(ctx, _kind, _entry_point):
    import forgeline_runners

    return forgeline_runners.doctests(ctx)


def run_tests(ctx, kind, entry_point):
    import forgeline_runners

    return forgeline_runners.tests(ctx, kind, entry_point or None)


def internal_error(exc):
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"status": "internal_error", "message": report.clip(text, 4000)}


MODES = {
    "syntax": check_syntax,
    "import": check_import,
    "run": run_program,
    "doctest": run_doctests,
    "tests": run_tests,
}
