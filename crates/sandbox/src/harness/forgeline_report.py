"""Describes what happened to the code under test as small JSON records, and writes them.

The records are read by crates/sandbox/src/record.rs: change both together. They are feedback
for a language model, so every text in them is short: messages and values are clipped, frames
of the harness and of test runners are dropped, and repeated frames are collapsed.
"""
import os
import sys

MAX_TEXT = 500
MAX_REPR = 200
MAX_FRAMES = 12
RESULT_NAME = ".forgeline-result.json"

# Bound before the code under test runs, which may replace them.
_open, _write, _close, _replace = os.open, os.write, os.close, os.replace
_fallocate = getattr(os, "posix_fallocate", lambda fd, offset, size: None)
_ftruncate = os.ftruncate
_HARNESS_DIR = os.path.dirname(os.path.abspath(__file__))


class CheckFailed(Exception):
    """Carries the record of a check that ended before all of it ran."""

    def __init__(self, record):
        super().__init__(record.get("status"))
        self.record = record


class Context:
    """What a check knows about the files under test."""

    def __init__(self, workdir, module_name, tests_file):
        self.workdir = workdir
        self.module_name = module_name
        self.module_path = os.path.join(workdir, module_name + ".py")
        self.tests_path = os.path.join(workdir, tests_file) if tests_file else None
        self.user_files = {self.module_path}
        if self.tests_path:
            self.user_files.add(self.tests_path)
        self.result_path = os.path.join(workdir, RESULT_NAME)
        self.last_compare = None
        self._texts = {}
        self._prefixes = sorted(
            (p.rstrip("/") + "/" for p in sys.path if p and p != workdir), key=len, reverse=True
        )

    def short(self, path):
        """A file name as the model should see it: relative to the work directory or sys.path."""
        if not path:
            return path
        if path.startswith(self.workdir + "/"):
            return path[len(self.workdir) + 1 :]
        for prefix in self._prefixes:
            if path.startswith(prefix):
                return path[len(prefix) :]
        return path

    def text(self, path):
        if path not in self._texts:
            try:
                with open(path, "rb") as f:
                    self._texts[path] = f.read().decode("utf-8", "replace")
            except OSError:
                self._texts[path] = ""
        return self._texts[path]

    def code_line(self, path, lineno):
        if not lineno:
            return None
        if path in self.user_files:
            lines = self.text(path).splitlines()
            line = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
        else:
            import linecache

            line = linecache.getline(path, lineno)
        return clip(line.strip()) or None

    def scrub(self, text):
        """Work-directory paths in messages become relative: shorter, and the same on every run."""
        return text.replace(self.workdir + "/", "")


def clip(text, limit=MAX_TEXT):
    if len(text) <= limit:
        return text
    return text[: limit - 1] + "\u2026"


def safe_repr(value):
    try:
        text = repr(value)
    except BaseException as exc:  # a broken __repr__ must not hide the failure being reported
        text = "<%s object; repr() raised %s>" % (type(value).__name__, type(exc).__name__)
    return clip(text, MAX_REPR)


def safe_str(ctx, exc):
    try:
        text = str(exc)
    except BaseException:
        text = "<str() of the exception raised>"
    return clip(ctx.scrub(text))


def type_name(exc):
    cls = type(exc)
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return "%s.%s" % (cls.__module__, cls.__qualname__)


def _hidden(frame):
    # unittest marks its modules with __unittest, pytest its helpers with __tracebackhide__.
    if "__unittest" in frame.f_globals or frame.f_globals.get("__tracebackhide__"):
        return True
    try:
        return bool(frame.f_locals.get("__tracebackhide__"))
    except Exception:
        return False


def frames(ctx, tb):
    """The traceback from the first frame of user code on, without sandbox or runner frames."""
    raw = []
    while tb is not None:
        frame = tb.tb_frame
        if not _hidden(frame):
            raw.append((frame.f_code.co_filename, tb.tb_lineno, frame.f_code.co_name))
        tb = tb.tb_next
    start = next((i for i, f in enumerate(raw) if f[0] in ctx.user_files), len(raw))
    kept = [
        f
        for f in raw[start:]
        if not f[0].startswith(_HARNESS_DIR) and not f[0].startswith("<frozen importlib")
    ]
    collapsed = []
    for f in kept:
        if collapsed and collapsed[-1][0] == f:
            collapsed[-1][1] += 1
        else:
            collapsed.append([f, 1])
    omitted = 0
    if len(collapsed) > MAX_FRAMES:
        omitted = sum(n for _, n in collapsed[3 : len(collapsed) - (MAX_FRAMES - 3)])
        collapsed = collapsed[:3] + collapsed[len(collapsed) - (MAX_FRAMES - 3) :]
    out = []
    for (path, line, function), repeat in collapsed:
        entry = {
            "file": ctx.short(path),
            "line": line,
            "function": function,
            "code": ctx.code_line(path, line),
        }
        if repeat > 1:
            entry["repeat"] = repeat
        out.append(entry)
    return out, omitted


def _innermost_user_frame(ctx, tb):
    where = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename in ctx.user_files:
            where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return where


def failure(ctx, exc, test=None):
    """The record for an exception that escaped the code under test or a test."""
    if isinstance(exc, MemoryError):
        return {"status": "memory_error", "test": test}
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None or isinstance(code, int):
            return {"status": "exit", "code": int(code or 0), "message": None, "test": test}
        return {"status": "exit", "code": 1, "message": safe_str(ctx, code), "test": test}
    trace, omitted = frames(ctx, exc.__traceback__)
    where = _innermost_user_frame(ctx, exc.__traceback__)
    record = {
        "test": test,
        "file": ctx.short(where[0]) if where else None,
        "line": where[1] if where else None,
        "frames": trace,
        "frames_omitted": omitted,
    }
    message = safe_str(ctx, exc)
    if isinstance(exc, AssertionError):
        record["status"] = "assertion_failed"
        record["message"] = message or None
        if where:
            record["expression"] = assert_expression(ctx, *where) or ctx.code_line(*where)
            compare = ctx.last_compare
            if compare and compare[0] == where[0] and compare[1] == where[1]:
                record["left"] = safe_repr(compare[3])
                record["op"] = compare[2]
                record["right"] = safe_repr(compare[4])
        return record
    record["status"] = "exception"
    record["type"] = type_name(exc)
    record["message"] = message
    return record


def assert_expression(ctx, path, lineno):
    """The source of the condition of the assert statement at path:lineno, if there is one."""
    if "assert" not in (ctx.code_line(path, lineno) or ""):
        return None
    import ast

    text = ctx.text(path)
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert) and node.lineno <= lineno <= (node.end_lineno or lineno):
            source = ast.get_source_segment(text, node.test) or ast.unparse(node.test)
            return clip(" ".join(source.split()))
    return None


def syntax_error(ctx, exc, path):
    text = (exc.text or "").rstrip("\n")
    return {
        "status": "syntax_error",
        "file": ctx.short(exc.filename if exc.filename and exc.filename != "<unknown>" else path),
        "line": exc.lineno,
        "column": exc.offset,
        "message": clip(exc.msg or str(exc)),
        "text": clip(text) if text else None,
    }


def nul_byte_error(ctx, path, source):
    at = source.index(b"\0")
    line = source.count(b"\n", 0, at) + 1
    column = at - (source.rfind(b"\n", 0, at) + 1) + 1
    return {
        "status": "syntax_error",
        "file": ctx.short(path),
        "line": line,
        "column": column,
        "message": "source code cannot contain null bytes",
        "text": None,
    }


# Room claimed for the record before the checked code runs, so that a program filling the
# run directory's quota (bytes or inodes) cannot keep the record from being written.
RESERVE = 256 << 10


def reserve(ctx):
    try:
        fd = _open(ctx.result_path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _fallocate(fd, 0, RESERVE)
        finally:
            _close(fd)
    except OSError:
        pass


def write(ctx, record):
    data = encode(record).encode("utf-8")
    tmp = ctx.result_path + ".tmp"
    # Into the reserved file, then cut to size: no new blocks or inode needed.
    fd = _open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[_write(fd, view) :]
        _ftruncate(fd, len(data))
    finally:
        _close(fd)
    _replace(tmp, ctx.result_path)


def encode(value):
    """JSON without the json module, whose import costs more than a trivial run."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if value == value and value not in (float("inf"), float("-inf")) else "null"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(encode(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(_quote(str(k)) + ":" + encode(v) for k, v in value.items()) + "}"
    return _quote(safe_repr(value))


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(text):
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append("\\u%04x" % code)
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")  # a lone surrogate (from undecodable bytes) is not valid JSON
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
