//! Choosing among a subtask's candidates by running them, where nothing trusted can tell
//! them apart (no `>>>` example with its output, no supplied tests): MBR-exec with CodeT's
//! dual agreement.
//!
//! Every candidate runs the same calls of the entry point (the *probes*: the task's example
//! calls, the calls generated tests make, and when those are too few, calls built from the
//! signature's annotations) and the generated tests, one by one. Candidates that print the
//! same outputs on every probe form a *group*. A group scores `size × (1 + tests)`, where
//! `tests` counts the generated tests that most of its members pass (CodeT: the consensus
//! set's candidates times the tests they agree on). The best group wins, and in it the
//! candidate with the best verdict score.
//!
//! The pure parts (probes, grouping, scores, the choice) work on plain data; [`select`]
//! runs the candidates in the sandbox (one run each) and hands their outputs to them.

use std::collections::{BTreeMap, HashSet};

use forgeline_sandbox::{Check, Job, Module, TestKind, TestSuite};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::job::JobContext;
use crate::python::{self, Example, Signature};

/// The most probes a candidate runs.
pub const MAX_PROBES: usize = 16;
/// The most generated test functions a candidate runs.
pub const MAX_TESTS: usize = 32;
/// Calls built from the signature's annotations, when the task and the tests give fewer
/// than [`MIN_PROBES`].
pub const TYPED_PROBES: usize = 5;
/// Below this many probes from the task and the tests, typed probes are added.
pub const MIN_PROBES: usize = 3;
/// The longest probe kept, in bytes.
const MAX_PROBE_LEN: usize = 400;
/// What a probe's output starts with when the code raised an exception itself, with a
/// `raise` or `assert` statement (`raise:ValueError`), or ran out of time (`raise:Timeout`).
pub const RAISED: &str = "raise:";
/// What a probe's output starts with when an operation in the code failed (`crash:IndexError`
/// for `xs[0]` on an empty list): a crash rather than a refusal.
pub const CRASHED: &str = "crash:";
/// A probe that ran out of time.
pub const TIMED_OUT: &str = "raise:Timeout";

/// Whether a probe's output is an exception (raised or crashed) rather than a value.
pub fn is_exception(output: &str) -> bool {
    output.starts_with(RAISED) || output.starts_with(CRASHED)
}
/// A probe the run never reported (the whole run was killed first).
pub const NO_RESULT: &str = "raise:NoResult";

// ---------------------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------------------

/// Names a probe may use besides the entry point: keywords that make expressions, and
/// builtins that build values.
const EXPRESSION_NAMES: &[&str] = &[
    "True",
    "False",
    "None",
    "and",
    "or",
    "not",
    "in",
    "is",
    "if",
    "else",
    "for",
    "lambda",
    "int",
    "float",
    "str",
    "bool",
    "list",
    "dict",
    "set",
    "tuple",
    "frozenset",
    "bytes",
    "bytearray",
    "complex",
    "range",
    "len",
    "sorted",
    "reversed",
    "abs",
    "min",
    "max",
    "sum",
    "round",
    "pow",
    "divmod",
    "any",
    "all",
    "enumerate",
    "zip",
    "map",
    "filter",
    "chr",
    "ord",
    "repr",
    "hex",
    "bin",
    "oct",
    "iter",
    "next",
    "isinstance",
    "type",
    "slice",
];

/// Words that make a statement: a probe holding one is not an expression to evaluate.
const STATEMENT_WORDS: &[&str] = &[
    "import", "from", "def", "class", "return", "yield", "await", "async", "del", "global",
    "nonlocal", "assert", "raise", "pass", "while", "with", "try", "except", "finally", "break",
    "continue", "elif",
];

/// Where the string literal opening at `i` (a quote) ends: the index after its closing
/// quote; `None` when it does not close.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let q = b[i];
    let triple = b.len() >= i + 3 && b[i + 1] == q && b[i + 2] == q;
    let mut j = if triple { i + 3 } else { i + 1 };
    while j < b.len() {
        if b[j] == b'\\' {
            j += 2;
            continue;
        }
        if triple {
            if b[j..].starts_with(&[q, q, q]) {
                return Some(j + 3);
            }
        } else if b[j] == q {
            return Some(j + 1);
        } else if b[j] == b'\n' {
            return None;
        }
        j += 1;
    }
    None
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// Where the bracket opening at `open` closes (the index after it), skipping strings;
/// `None` when brackets do not match or a string does not close.
fn bracket_end(b: &[u8], open: usize) -> Option<usize> {
    let mut stack = Vec::new();
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' => {
                i = string_end(b, i)?;
                continue;
            }
            b'#' => return None,
            c @ (b'(' | b'[' | b'{') => stack.push(c),
            c @ (b')' | b']' | b'}') => {
                let want = match c {
                    b')' => b'(',
                    b']' => b'[',
                    _ => b'{',
                };
                if stack.pop() != Some(want) {
                    return None;
                }
                if stack.is_empty() {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The calls of `entry` in `text` (`entry(...)`, outermost only, brackets balanced),
/// outside string literals and comments, and not its own `def`.
pub fn calls_of(entry: &str, text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let e = entry.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' => {
                i = string_end(b, i).unwrap_or(b.len());
                continue;
            }
            b'#' => {
                i = text[i..].find('\n').map_or(b.len(), |n| i + n);
                continue;
            }
            _ => {}
        }
        if is_ident_byte(b[i]) {
            let start = i;
            while i < b.len() && is_ident_byte(b[i]) {
                i += 1;
            }
            let word = &b[start..i];
            let attribute = start > 0 && b[start - 1] == b'.';
            let defined = text[..start].trim_end().ends_with("def");
            if word == e && !attribute && !defined && b.get(i) == Some(&b'(') {
                if let Some(end) = bracket_end(b, i) {
                    out.push(text[start..end].to_string());
                    i = end;
                }
            }
            continue;
        }
        i += 1;
    }
    out
}

/// The probe as it runs: comments dropped, each run of blank space outside strings made
/// one space. `None` when it is not a well-formed call of `entry`: the brackets do not
/// balance, it holds a statement (`;`, `:=`, a statement keyword), or it is too long.
pub fn normalise_call(entry: &str, call: &str) -> Option<String> {
    let s = call.trim();
    if s.len() > 4 * MAX_PROBE_LEN {
        return None;
    }
    let b = s.as_bytes();
    let mut out = String::new();
    let mut space = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            space = true;
            continue;
        }
        if c.is_ascii_whitespace() || c == b'\\' {
            space = true;
            i += 1;
            continue;
        }
        if c == b';' || (c == b':' && b.get(i + 1) == Some(&b'=')) {
            return None;
        }
        let end = if c == b'"' || c == b'\'' {
            string_end(b, i)?
        } else {
            i + s[i..].chars().next().map_or(1, char::len_utf8)
        };
        if space {
            if let Some(prev) = out.as_bytes().last() {
                if !matches!(prev, b'(' | b'[' | b'{') && !matches!(c, b')' | b']' | b'}' | b',') {
                    out.push(' ');
                }
            }
        }
        space = false;
        out.push_str(&s[i..end]);
        i = end;
    }
    let ob = out.as_bytes();
    let open = entry.len();
    let well_formed = out.starts_with(entry)
        && ob.get(open) == Some(&b'(')
        && bracket_end(ob, open) == Some(ob.len())
        && out.len() <= MAX_PROBE_LEN
        && !identifiers(&out)
            .iter()
            .any(|w| STATEMENT_WORDS.contains(&w.name.as_str()));
    well_formed.then_some(out)
}

/// An identifier outside string literals, with how it is used.
struct Ident {
    name: String,
    /// Where it starts.
    pos: usize,
    /// `x.name`
    attribute: bool,
    /// `name=value` inside a call
    keyword: bool,
}

fn identifiers(s: &str) -> Vec<Ident> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' {
            i = string_end(b, i).unwrap_or(b.len());
            continue;
        }
        if c.is_ascii_digit() {
            // A number, with its exponent, suffix or base letters.
            while i < b.len() && (is_ident_byte(b[i]) || b[i] == b'.') {
                i += 1;
            }
            continue;
        }
        if is_ident_byte(c) {
            let start = i;
            while i < b.len() && is_ident_byte(b[i]) {
                i += 1;
            }
            // A string prefix (`b'..'`, `rf"..."`) is no name.
            if matches!(b.get(i), Some(b'"' | b'\'')) {
                continue;
            }
            let rest = s[i..].trim_start();
            out.push(Ident {
                name: s[start..i].to_string(),
                pos: start,
                attribute: s[..start].trim_end().ends_with('.'),
                keyword: rest.starts_with('=') && !rest.starts_with("=="),
            });
            continue;
        }
        i += 1;
    }
    out
}

/// Whether the probe uses only names it can have when run alone: `entry`, the builtins and
/// keywords of [`EXPRESSION_NAMES`], `known` (names the setup imports), attributes,
/// keyword arguments, and the names its own comprehensions and lambdas bind.
fn self_contained(probe: &str, entry: &str, known: &HashSet<String>) -> bool {
    let ids = identifiers(probe);
    let mut bound: HashSet<&str> = HashSet::new();
    for (k, id) in ids.iter().enumerate() {
        let rest = ids[k + 1..].iter().filter(|n| !n.attribute);
        match id.name.as_str() {
            // `for a, b in`: the names up to `in`.
            "for" => bound.extend(rest.take_while(|n| n.name != "in").map(|n| n.name.as_str())),
            // `lambda a, b:`: the names up to the colon.
            "lambda" => {
                let colon = probe[id.pos..]
                    .find(':')
                    .map_or(probe.len(), |c| id.pos + c);
                bound.extend(rest.take_while(|n| n.pos < colon).map(|n| n.name.as_str()));
            }
            _ => {}
        }
    }
    ids.iter().all(|id| {
        id.attribute
            || id.keyword
            || id.name == entry
            || bound.contains(id.name.as_str())
            || known.contains(&id.name)
            || EXPRESSION_NAMES.contains(&id.name.as_str())
    })
}

/// The names an import statement binds (`import a.b as c` binds `c`, `import a.b` binds
/// `a`, `from m import x as y, z` binds `y` and `z`).
fn imported_names(stmt: &str) -> Vec<String> {
    let s = stmt.split('#').next().unwrap_or("").trim();
    let s = s.replace(['(', ')', '\\', '\n'], " ");
    let list = match s.strip_prefix("from ") {
        Some(rest) => rest.split_once(" import ").map_or("", |(_, l)| l),
        None => s.strip_prefix("import ").unwrap_or_default(),
    };
    list.split(',')
        .filter_map(|part| {
            let mut words = part.split_whitespace();
            let first = words.next()?;
            let name = match (words.next(), words.next()) {
                (Some("as"), Some(alias)) => alias,
                _ => first.split('.').next().unwrap_or(first),
            };
            (name != "*").then(|| name.to_string())
        })
        .collect()
}

/// Import statements the probes may need, in order, once each: the examples' own
/// (`>>> from math import pi`) and the generated tests' top-level imports.
pub fn probe_setup(examples: &[Example], generated_tests: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let from_examples = examples
        .iter()
        .map(|e| e.call.trim().to_string())
        .filter(|c| c.starts_with("import ") || c.starts_with("from "));
    let from_tests = generated_tests.iter().flat_map(|t| python::imports(t));
    for stmt in from_examples.chain(from_tests) {
        if !out.contains(&stmt) {
            out.push(stmt);
        }
    }
    out
}

/// The calls of `entry_point` to run on every candidate: those in the task's `>>>`
/// examples, then those the generated tests make (`assert f(1, 2) == 3` gives `f(1, 2)`).
/// Only well-formed calls ([`normalise_call`]) that need no variable of their test (only
/// builtins and what the examples and tests import); deduplicated; at most [`MAX_PROBES`].
pub fn probe_inputs(
    entry_point: &str,
    examples: &[Example],
    generated_tests: &[String],
) -> Vec<String> {
    let known: HashSet<String> = probe_setup(examples, generated_tests)
        .iter()
        .flat_map(|s| imported_names(s))
        .collect();
    let texts = examples
        .iter()
        .map(|e| e.call.as_str())
        .chain(generated_tests.iter().map(String::as_str));
    let mut out: Vec<String> = Vec::new();
    for text in texts {
        for call in calls_of(entry_point, text) {
            if out.len() >= MAX_PROBES {
                return out;
            }
            let Some(probe) = normalise_call(entry_point, &call) else {
                continue;
            };
            if self_contained(&probe, entry_point, &known) && !out.contains(&probe) {
                out.push(probe);
            }
        }
    }
    out
}

/// An annotation as the probes read it: no spaces or quotes, `Optional[...]` unwrapped.
pub(crate) fn plain_annotation(annotation: &str) -> String {
    let a: String = annotation.chars().filter(|c| !c.is_whitespace()).collect();
    let mut a = a.trim_matches(|c| c == '"' || c == '\'').to_string();
    while let Some(inner) = a
        .strip_prefix("Optional[")
        .or_else(|| a.strip_prefix("typing.Optional["))
        .and_then(|r| r.strip_suffix(']'))
    {
        a = inner.to_string();
    }
    a
}

/// Typical values of an annotation, most ordinary first (no empty or zero values: a
/// function's answer there is often a matter of taste, and would split candidates that
/// agree elsewhere). `None` for a type it has no values for.
pub(crate) fn values_of(annotation: &str) -> Option<Vec<&'static str>> {
    let a = plain_annotation(annotation);
    let a = a.as_str();
    let list_of = |inner: &str| -> Option<Vec<&'static str>> {
        Some(match inner {
            "" | "int" => vec![
                "[3, 1, 2]",
                "[1, 2, 3, 4]",
                "[5]",
                "[2, 7, 2, 9, 4]",
                "[10, 4]",
            ],
            "float" => vec![
                "[1.5, 2.0, 0.5]",
                "[3.0]",
                "[2.5, 1.0, 4.0, 0.5]",
                "[10.0, 2.0]",
                "[1.0, 2.0, 3.0]",
            ],
            "str" => vec![
                "['abc', 'de']",
                "['hello', 'world', 'a']",
                "['x']",
                "['apple', 'banana', 'cherry']",
                "['ab', 'ba', 'ab']",
            ],
            _ => return None,
        })
    };
    let generic = |prefixes: &[&str]| {
        prefixes.iter().find_map(|p| {
            a.strip_prefix(p)
                .and_then(|r| r.strip_prefix('['))
                .and_then(|r| r.strip_suffix(']'))
        })
    };
    Some(match a {
        "int" => vec!["3", "1", "2", "5", "10", "7"],
        "float" => vec!["1.5", "2.0", "0.5", "3.25", "10.0"],
        "str" => vec![
            "'abc'",
            "'hello world'",
            "'racecar'",
            "'a'",
            "'Mississippi'",
        ],
        "bool" => vec!["True", "False"],
        "list" | "List" | "typing.List" => list_of("")?,
        "dict" | "Dict" | "Dict[str,int]" | "dict[str,int]" => {
            vec!["{'a': 1, 'b': 2}", "{'x': 3}", "{'a': 5, 'c': 1, 'b': 2}"]
        }
        _ => {
            if let Some(inner) = generic(&["List", "list", "typing.List", "Sequence", "Iterable"]) {
                list_of(inner)?
            } else {
                return None;
            }
        }
    })
}

/// Calls of `entry_point` built from its signature's annotations: up to `n`, each
/// parameter's values taken in turn. Parameters with defaults and `*args`/`**kwargs` are
/// left out; an unannotated required parameter, or one of a type with no values here,
/// makes none.
pub fn typed_probes(entry_point: &str, signature: &Signature, n: usize) -> Vec<String> {
    let mut args: Vec<(Option<String>, Vec<&'static str>)> = Vec::new();
    for p in python::parameters(signature) {
        if p.stars > 0 || p.default.is_some() {
            continue;
        }
        let Some(values) = p.annotation.as_deref().and_then(values_of) else {
            return Vec::new();
        };
        args.push((p.keyword_only.then_some(p.name), values));
    }
    let mut out: Vec<String> = Vec::new();
    let most = if args.is_empty() { 1 } else { n };
    for k in 0..most {
        let parts: Vec<String> = args
            .iter()
            .enumerate()
            .map(|(j, (kw, values))| {
                let v = values[(k + j * (k + 1)) % values.len()];
                match kw {
                    Some(name) => format!("{name}={v}"),
                    None => v.to_string(),
                }
            })
            .collect();
        let call = format!("{entry_point}({})", parts.join(", "));
        if !out.contains(&call) {
            out.push(call);
        }
    }
    out
}

/// One generated test a candidate runs: a test function of a generated test file, or the
/// file itself when it has none (top-level asserts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GeneratedTest {
    /// `g1::test_sum`, or `g2` for a whole file.
    pub id: String,
    #[serde(skip)]
    pub file: usize,
    #[serde(skip)]
    pub function: Option<String>,
}

/// The generated tests as runnable units, at most [`MAX_TESTS`].
pub fn generated_tests(sources: &[String]) -> Vec<GeneratedTest> {
    let mut out = Vec::new();
    for (f, src) in sources.iter().enumerate() {
        let functions: Vec<String> = python::statements(src)
            .into_iter()
            .filter_map(|s| match s.kind {
                python::StatementKind::Def(n) if n.starts_with("test") => Some(n),
                _ => None,
            })
            .collect();
        if functions.is_empty() {
            out.push(GeneratedTest {
                id: format!("g{}", f + 1),
                file: f,
                function: None,
            });
        }
        for name in functions {
            out.push(GeneratedTest {
                id: format!("g{}::{name}", f + 1),
                file: f,
                function: Some(name),
            });
        }
    }
    out.truncate(MAX_TESTS);
    out
}

/// What every candidate runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbePlan {
    pub probes: Vec<String>,
    /// Import statements run before the probes (each may fail alone).
    pub setup: Vec<String>,
    pub tests: Vec<GeneratedTest>,
    /// The generated test files.
    pub sources: Vec<String>,
    /// How many probes came from the signature's annotations.
    pub typed: usize,
}

impl ProbePlan {
    /// The probes from the examples and the tests, topped up with typed probes when fewer
    /// than [`MIN_PROBES`]; the generated tests.
    pub fn new(
        entry_point: &str,
        signature: Option<&Signature>,
        examples: &[Example],
        generated: &[String],
    ) -> Self {
        let mut probes = probe_inputs(entry_point, examples, generated);
        let mut typed = 0;
        if probes.len() < MIN_PROBES {
            if let Some(sig) = signature.filter(|s| s.name == entry_point) {
                for p in typed_probes(entry_point, sig, TYPED_PROBES) {
                    if probes.len() < MAX_PROBES && !probes.contains(&p) {
                        probes.push(p);
                        typed += 1;
                    }
                }
            }
        }
        Self {
            probes,
            setup: probe_setup(examples, generated),
            tests: generated_tests(generated),
            sources: generated.to_vec(),
            typed,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The run's harness and its report
// ---------------------------------------------------------------------------------------

/// `s` as a Python string literal.
pub fn py_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_ascii() => out.push(c),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('\'');
    out
}

/// What starts each line the harness reports on.
const MARK: &str = "@forgeline-selection@ ";

const HARNESS: &str = r#"import contextlib as _cl
import hashlib as _hl
import importlib as _il
import io as _io
import itertools as _it
import json as _json
import linecache as _lc
import signal as _sig
import sys as _sys
import types as _types

_OUT = _sys.stdout
_MARK = @MARK@
_MODULE = @MODULE@
_PER_CALL = @PER_CALL@
# Imports and test modules may load libraries: slower than a call.
_SLOW = max(_PER_CALL, 1.0)
_PROBES = [@PROBES@]
_SETUP = [@SETUP@]
_SOURCES = [@SOURCES@]
_TESTS = [@TESTS@]


def _emit(**kw):
    _OUT.write(_MARK + _json.dumps(kw) + "\n")
    _OUT.flush()


class _Timeout(BaseException):
    pass


def _alarm(_signum, _frame):
    raise _Timeout()


_sig.signal(_sig.SIGALRM, _alarm)


_FILE = [None]


def _deliberate(exc):
    """Whether the code raised exc itself: the innermost frame is the module's own `raise`
    or `assert` line (not an operation that failed, as `xs[0]` on an empty list)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or _FILE[0] is None or tb.tb_frame.f_code.co_filename != _FILE[0]:
        return False
    line = _lc.getline(_FILE[0], tb.tb_lineno).strip()
    return line.startswith("raise") or line.startswith("assert")


def _guard(fn, limit=None):
    """Runs fn under a time limit (the per-call one unless given), its output swallowed:
    (True, value), or (False, "raise:Type") for an exception the code raised itself and
    (False, "crash:Type") for any other (a timeout is "raise:Timeout")."""
    sink = _io.StringIO()
    try:
        try:
            _sig.setitimer(_sig.ITIMER_REAL, _PER_CALL if limit is None else limit)
            with _cl.redirect_stdout(sink), _cl.redirect_stderr(sink):
                value = fn()
        finally:
            _sig.setitimer(_sig.ITIMER_REAL, 0)
        return True, value
    except _Timeout:
        return False, "raise:Timeout"
    except BaseException as exc:
        return False, ("raise:" if _deliberate(exc) else "crash:") + type(exc).__name__


def _canon(x, depth=0):
    """repr(x), the same whatever the hash seed and float rounding: sets and dicts sorted,
    floats to 12 significant digits, iterators as the items they yield."""
    if depth > 50:
        return repr(x)
    t = type(x)
    if t is float:
        if x != x or x in (float("inf"), float("-inf")):
            return repr(x)
        if x == 0:
            return "0.0"
        r = format(x, ".12g")
        return r if any(c in r for c in ".en") else r + ".0"
    if t is list:
        return "[" + ", ".join(_canon(i, depth + 1) for i in x) + "]"
    if t is tuple:
        items = [_canon(i, depth + 1) for i in x]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if t is set or t is frozenset:
        items = sorted(_canon(i, depth + 1) for i in x)
        if t is set:
            return "{" + ", ".join(items) + "}" if items else "set()"
        return "frozenset({" + ", ".join(items) + "})" if items else "frozenset()"
    if isinstance(x, dict):
        items = sorted(_canon(k, depth + 1) + ": " + _canon(v, depth + 1) for k, v in x.items())
        body = "{" + ", ".join(items) + "}"
        return body if t is dict else t.__name__ + "(" + body + ")"
    if isinstance(x, _types.GeneratorType) or (
        t.__module__ == "builtins" and hasattr(t, "__next__")
    ):
        return "iter:" + _canon(list(_it.islice(x, 1000)), depth + 1)
    return repr(x)


def _value(code, ns):
    s = _canon(eval(compile(code, "<probe>", "eval"), ns))
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(s) > 1000:
        s = s[:200] + "...#" + _hl.sha256(s.encode("utf-8")).hexdigest()[:16]
    return s


def _main():
    ok, mod = _guard(lambda: _il.import_module(_MODULE), _SLOW)
    if not ok:
        _emit(imported=False, error=mod.split(":", 1)[-1])
        return
    _FILE[0] = getattr(mod, "__file__", None)
    ns = dict(vars(mod))
    for line in _SETUP:
        _guard(lambda: exec(line, ns), _SLOW)
    for i, code in enumerate(_PROBES):
        ok, v = _guard(lambda: _value(code, ns))
        _emit(p=i, o=v)
    loaded = {}
    for k, (f, name) in enumerate(_TESTS):
        if f not in loaded:
            tns = {"__name__": "generated_tests_%d" % (f + 1)}
            name_f = "test_generated_%d.py" % (f + 1)
            run = lambda: exec(compile(_SOURCES[f], name_f, "exec"), tns)  # noqa: E731
            loaded[f] = (_guard(run, _SLOW)[0], tns)
        ok, tns = loaded[f]
        if name is not None:
            fn = tns.get(name)
            ok = ok and callable(fn) and _guard(fn)[0]
        _emit(t=k, ok=bool(ok))
    _emit(done=True)


_main()
"#;

/// The test file that runs `plan` on the module `module`: it imports the module, runs the
/// setup, evaluates each probe under a per-call time limit (`per_call_s`) with the
/// candidate's own output swallowed, then each generated test, printing one JSON line per
/// probe (`{"p": i, "o": repr, "raise:Type" or "crash:Type"}`) and per test (`{"t": k, "ok": bool}`).
pub fn harness(module: &str, plan: &ProbePlan, per_call_s: f64) -> String {
    let list = |items: &mut dyn Iterator<Item = String>| items.collect::<Vec<_>>().join(", ");
    let tests = list(&mut plan.tests.iter().map(|t| {
        format!(
            "({}, {})",
            t.file,
            t.function.as_deref().map_or("None".to_string(), py_str)
        )
    }));
    HARNESS
        .replace("@MARK@", &py_str(MARK))
        .replace("@MODULE@", &py_str(module))
        .replace("@PER_CALL@", &format!("{per_call_s:.3}"))
        .replace(
            "@PROBES@",
            &list(&mut plan.probes.iter().map(|p| py_str(p))),
        )
        .replace("@SETUP@", &list(&mut plan.setup.iter().map(|p| py_str(p))))
        .replace(
            "@SOURCES@",
            &list(&mut plan.sources.iter().map(|p| py_str(p))),
        )
        .replace("@TESTS@", &tests)
}

/// What one candidate's run reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbeRun {
    /// Each probe's output (`repr`, `raise:Type` or `crash:Type`); `None` when the candidate could not
    /// run (it did not import, the sandbox failed).
    pub outputs: Option<Vec<String>>,
    /// Each generated test: passed.
    pub tests: Vec<bool>,
    /// Why it could not run, or what cut it short.
    pub note: Option<String>,
}

/// Reads a run's stdout: the harness's lines among whatever else was printed. Probes it
/// never reported are [`NO_RESULT`]; tests it never reported failed.
pub fn parse_run(stdout: &str, probes: usize, tests: usize) -> ProbeRun {
    let mut outputs: Vec<Option<String>> = vec![None; probes];
    let mut passed = vec![false; tests];
    let (mut any, mut done, mut import_error) = (false, false, None);
    for line in stdout.lines() {
        let Some(json) = line.strip_prefix(MARK) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
            continue;
        };
        any = true;
        if v.get("imported") == Some(&serde_json::Value::Bool(false)) {
            import_error = Some(v["error"].as_str().unwrap_or("?").to_string());
        } else if let (Some(i), Some(o)) = (v["p"].as_u64(), v["o"].as_str()) {
            if let Some(slot) = outputs.get_mut(i as usize) {
                *slot = Some(o.to_string());
            }
        } else if let (Some(k), Some(ok)) = (v["t"].as_u64(), v["ok"].as_bool()) {
            if let Some(slot) = passed.get_mut(k as usize) {
                *slot = ok;
            }
        } else if v["done"].as_bool() == Some(true) {
            done = true;
        }
    }
    if let Some(e) = import_error {
        return ProbeRun {
            outputs: None,
            tests: passed,
            note: Some(format!("did not import ({e})")),
        };
    }
    if !any {
        return ProbeRun {
            outputs: None,
            tests: passed,
            note: Some("reported nothing".into()),
        };
    }
    ProbeRun {
        outputs: Some(
            outputs
                .into_iter()
                .map(|o| o.unwrap_or_else(|| NO_RESULT.to_string()))
                .collect(),
        ),
        tests: passed,
        note: (!done).then(|| "cut short".to_string()),
    }
}

// ---------------------------------------------------------------------------------------
// Grouping, scores and the choice
// ---------------------------------------------------------------------------------------

/// A candidate as selection sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CandidateRun {
    /// The caller's number for it (the retry manager's: its place in the attempt, from 1).
    pub id: usize,
    /// Its verdict's score: breaks ties inside a group.
    pub verdict_score: f64,
    pub run: ProbeRun,
}

/// `0x7f3a2c1b5e50`-style addresses (6 hex digits or more) as `0x…`: object reprs differ by
/// address from run to run, and must not split candidates that agree.
pub fn normalise_output(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut last = 0;
    while i + 1 < b.len() {
        let boundary = i == 0 || !is_ident_byte(b[i - 1]);
        if boundary && b[i] == b'0' && (b[i + 1] == b'x' || b[i + 1] == b'X') {
            let digits = b[i + 2..]
                .iter()
                .take_while(|c| c.is_ascii_hexdigit())
                .count();
            if digits >= 6 {
                out.push_str(&s[last..i]);
                out.push_str("0x…");
                i += 2 + digits;
                last = i;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&s[last..]);
    out
}

/// Candidates that printed the same (normalised) outputs on every probe.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Group {
    /// Its candidates' ids, in the order given.
    pub members: Vec<usize>,
    /// The outputs, short: the first ones and a hash of them all.
    pub signature: String,
    /// The generated tests most of its members pass.
    pub tests_passed: usize,
    /// `size × (1 + tests_passed)`.
    pub score: f64,
    /// Which generated tests most of its members pass.
    #[serde(skip)]
    pub passes: Vec<bool>,
    #[serde(skip)]
    pub outputs: Vec<String>,
}

/// A candidate in no group, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ungrouped {
    pub candidate: usize,
    pub why: String,
}

/// CodeT's score of a group that agrees on its outputs: its size times one more than the
/// generated tests it passes (a group that passes none still counts by its size).
pub fn codet_score(size: usize, tests_passed: usize) -> f64 {
    size as f64 * (1.0 + tests_passed as f64)
}

/// A clear majority: the group holds at least 2 candidates and more than half of all the
/// candidates given (`ran`; one whose run gave no output, or raised on every probe,
/// disagrees with every group). One candidate alone agrees with nobody, so it is never a
/// majority.
pub fn clear_majority(group_size: usize, ran: usize) -> bool {
    group_size >= 2 && 2 * group_size > ran
}

fn fnv1a(parts: &[String]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn signature_of(outputs: &[String]) -> String {
    let mut s = String::new();
    for o in outputs {
        if !s.is_empty() {
            s.push_str(" | ");
        }
        s.push_str(o);
        if s.chars().count() > 100 {
            s = s.chars().take(100).collect::<String>() + "…";
            break;
        }
    }
    format!("{s} #{:08x}", fnv1a(outputs) as u32)
}

/// The candidates' groups, best first (score, then size, then the best verdict score of a
/// member, then the earliest member), and the candidates in none: those that could not run
/// and those that raised on every probe.
pub fn group(runs: &[CandidateRun]) -> (Vec<Group>, Vec<Ungrouped>) {
    let mut keyed: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    let mut groups: Vec<Group> = Vec::new();
    let mut ungrouped = Vec::new();
    let mut best_verdict: Vec<f64> = Vec::new();
    for r in runs {
        let Some(outputs) = &r.run.outputs else {
            ungrouped.push(Ungrouped {
                candidate: r.id,
                why: r.run.note.clone().unwrap_or_else(|| "could not run".into()),
            });
            continue;
        };
        if outputs.iter().all(|o| is_exception(o)) {
            ungrouped.push(Ungrouped {
                candidate: r.id,
                why: "raised on every probe".into(),
            });
            continue;
        }
        let key: Vec<String> = outputs.iter().map(|o| normalise_output(o)).collect();
        let g = *keyed.entry(key.clone()).or_insert_with(|| {
            groups.push(Group {
                members: Vec::new(),
                signature: signature_of(&key),
                tests_passed: 0,
                score: 0.0,
                passes: Vec::new(),
                outputs: key,
            });
            best_verdict.push(f64::NEG_INFINITY);
            groups.len() - 1
        });
        groups[g].members.push(r.id);
        best_verdict[g] = best_verdict[g].max(r.verdict_score);
    }
    let n_tests = runs.iter().map(|r| r.run.tests.len()).max().unwrap_or(0);
    for g in &mut groups {
        g.passes = (0..n_tests)
            .map(|t| {
                let n = g
                    .members
                    .iter()
                    .filter(|id| {
                        runs.iter()
                            .find(|r| r.id == **id)
                            .is_some_and(|r| r.run.tests.get(t) == Some(&true))
                    })
                    .count();
                2 * n > g.members.len()
            })
            .collect();
        g.tests_passed = g.passes.iter().filter(|p| **p).count();
        g.score = codet_score(g.members.len(), g.tests_passed);
    }
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by(|&a, &b| {
        let (ga, gb) = (&groups[a], &groups[b]);
        gb.score
            .total_cmp(&ga.score)
            .then(gb.members.len().cmp(&ga.members.len()))
            .then(best_verdict[b].total_cmp(&best_verdict[a]))
            .then(ga.members[0].cmp(&gb.members[0]))
    });
    let mut slots: Vec<Option<Group>> = groups.into_iter().map(Some).collect();
    let sorted = order.into_iter().filter_map(|i| slots[i].take()).collect();
    (sorted, ungrouped)
}

/// What selection did: the trace's record, and what the pipeline needs to call the result
/// `consistent`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Selection {
    /// The calls every candidate ran.
    pub probes: Vec<String>,
    /// How many of them came from the signature's annotations (the last ones).
    pub typed_probes: usize,
    /// The generated tests every candidate ran.
    pub tests: Vec<String>,
    /// Candidates given to selection.
    pub candidates: usize,
    /// Candidates whose run reported outputs.
    pub ran: usize,
    /// Best first.
    pub groups: Vec<Group>,
    pub ungrouped: Vec<Ungrouped>,
    /// The chosen candidate's id; `None` when no candidate is in a group.
    pub chosen: Option<usize>,
    /// The chosen group holds a clear majority ([`clear_majority`]).
    pub clear_majority: bool,
    /// The chosen candidate passes every generated test its group mostly passes (true when
    /// there are none).
    pub passes_majority_tests: bool,
    /// Both of the above: execution agrees on the chosen candidate, though nothing trusted
    /// checked it.
    pub consistent: bool,
    /// Why nothing was chosen, or anything else worth knowing.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl Selection {
    /// No selection was possible, for `why`.
    pub fn none(plan: &ProbePlan, candidates: usize, why: impl Into<String>) -> Self {
        Self {
            probes: plan.probes.clone(),
            typed_probes: plan.typed,
            tests: plan.tests.iter().map(|t| t.id.clone()).collect(),
            candidates,
            note: why.into(),
            ..Self::default()
        }
    }

    /// The best group, if any.
    pub fn best_group(&self) -> Option<&Group> {
        self.groups.first()
    }
}

/// Chooses among `runs` (pure): groups them, takes the best group, and in it the candidate
/// with the best verdict score (then the most generated tests passed, then the earliest).
pub fn choose(plan: &ProbePlan, runs: &[CandidateRun]) -> Selection {
    let mut sel = Selection::none(plan, runs.len(), "");
    let (groups, ungrouped) = group(runs);
    sel.ran = runs.iter().filter(|r| r.run.outputs.is_some()).count();
    sel.groups = groups;
    sel.ungrouped = ungrouped;
    let Some(best) = sel.groups.first() else {
        sel.note = "no candidate gave an output on any probe".into();
        return sel;
    };
    let member = |id: &usize| runs.iter().find(|r| r.id == *id);
    let Some(chosen) = best.members.iter().filter_map(member).max_by(|a, b| {
        let passed = |r: &CandidateRun| r.run.tests.iter().filter(|t| **t).count();
        a.verdict_score
            .total_cmp(&b.verdict_score)
            .then(passed(a).cmp(&passed(b)))
            .then(b.id.cmp(&a.id))
    }) else {
        sel.note = "the best group's members are not among the runs".into();
        return sel;
    };
    sel.chosen = Some(chosen.id);
    // Every candidate given counts: one whose run gave no output (it did not import in
    // time, it raised everywhere) disagrees with the group.
    sel.clear_majority = clear_majority(best.members.len(), runs.len());
    sel.passes_majority_tests = best
        .passes
        .iter()
        .enumerate()
        .all(|(t, needed)| !needed || chosen.run.tests.get(t) == Some(&true));
    sel.consistent = sel.clear_majority && sel.passes_majority_tests;
    sel
}

// ---------------------------------------------------------------------------------------
// The runs
// ---------------------------------------------------------------------------------------

/// A candidate to run: the caller's id, its code, its verdict's score.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub id: usize,
    pub code: String,
    pub verdict_score: f64,
}

/// The time each call gets: the run's limit shared among the calls, between 50 ms and 1 s.
fn per_call_s(timeout: std::time::Duration, calls: usize) -> f64 {
    (timeout.as_secs_f64() * 0.6 / calls.max(1) as f64).clamp(0.05, 1.0)
}

/// Runs `plan` on one candidate, imported as `module`, in one sandbox run with the job's
/// configured timeout.
pub async fn run_candidate(
    ctx: &JobContext,
    module: &str,
    code: &str,
    plan: &ProbePlan,
) -> ProbeRun {
    let timeout = ctx.config().limits.sandbox_timeout();
    let script = harness(
        module,
        plan,
        per_call_s(timeout, plan.probes.len() + plan.tests.len()),
    );
    let job = Module::new(module, code.as_bytes().to_vec()).and_then(|m| {
        let suite =
            TestSuite::new("selection_probes.py", script.into_bytes())?.with_kind(TestKind::Script);
        let limits = ctx.sandbox().limits().clone().with_timeout(timeout);
        Ok(Job::new(m, Check::Tests(suite)).with_limits(limits))
    });
    let report = match job {
        Ok(job) => ctx.sandbox().run(job).await,
        Err(e) => Err(e),
    };
    match report {
        Ok(r) => {
            let mut run = parse_run(&r.stdout, plan.probes.len(), plan.tests.len());
            if run.outputs.is_none() && run.note.as_deref() == Some("reported nothing") {
                run.note = Some(format!("reported nothing ({})", r.outcome));
            }
            run
        }
        Err(e) => ProbeRun {
            outputs: None,
            tests: vec![false; plan.tests.len()],
            note: Some(format!("the sandbox could not run it: {e}")),
        },
    }
}

/// Runs every candidate on the same probes and generated tests (at most `limits.validators`
/// runs at once), then [`choose`]s.
pub async fn select(
    ctx: &JobContext,
    module: &str,
    plan: &ProbePlan,
    candidates: &[Candidate],
) -> Selection {
    if plan.probes.is_empty() {
        return Selection::none(
            plan,
            candidates.len(),
            "no call of the entry point to run: the task has no examples, the tests make no \
             self-contained call, and the signature's types give none",
        );
    }
    let permits = Semaphore::new(ctx.config().limits.validators.max(1));
    let runs = candidates.iter().map(|c| {
        let permits = &permits;
        async move {
            let _permit = permits.acquire().await;
            CandidateRun {
                id: c.id,
                verdict_score: c.verdict_score,
                run: run_candidate(ctx, module, &c.code, plan).await,
            }
        }
    });
    let runs = futures_util::future::join_all(runs).await;
    choose(plan, &runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prop_reading_model_text_never_panics() {
        use proptest::prelude::*;
        let config = ProptestConfig::with_cases(crate::proptest_cases());
        let text = "[ -~\n\t]{0,120}|\\PC{0,60}";
        proptest!(config, |(a in text, b in text, out in "\\PC{0,200}")| {
            let tests = vec![format!("def test_x():\n    assert f({a}) == {b}\n"), a.clone()];
            let examples = [Example { call: format!("f({b}"), expected: a.clone() }];
            let _ = probe_inputs("f", &examples, &tests);
            let _ = calls_of("f", &a);
            let _ = generated_tests(&tests);
            let _ = parse_run(&out, 3, 2);
            let _ = normalise_output(&out);
        });
    }

    fn ex(call: &str) -> Example {
        Example {
            call: call.into(),
            expected: String::new(),
        }
    }

    fn run(id: usize, score: f64, outputs: &[&str], tests: &[bool]) -> CandidateRun {
        CandidateRun {
            id,
            verdict_score: score,
            run: ProbeRun {
                outputs: Some(outputs.iter().map(|s| s.to_string()).collect()),
                tests: tests.to_vec(),
                note: None,
            },
        }
    }

    fn plan(probes: usize, tests: usize) -> ProbePlan {
        ProbePlan {
            probes: (0..probes).map(|i| format!("f({i})")).collect(),
            tests: (0..tests)
                .map(|i| GeneratedTest {
                    id: format!("g1::test_{i}"),
                    file: 0,
                    function: Some(format!("test_{i}")),
                })
                .collect(),
            ..ProbePlan::default()
        }
    }

    #[test]
    fn probes_are_the_calls_of_the_entry_point_in_examples_and_tests() {
        let tests = [
            "from solution import f\nimport math\n\ndef test_a():\n    assert f(1, 2) == 3\n    assert f(1,  2) == 3  # again\n    x = [1]\n    assert f(x, 2) == 0\n\ndef test_b():\n    assert sorted(f([3, 1], key=len)) == [1]\n    assert f(math.pi, 'f(9)') > 0\n    assert obj.f(5) == 1\n    assert g(f(7)) and f(8\n".to_string(),
            "def test_c():\n    assert f([i * 2 for i in range(3)], (lambda y: y)(1)) == 0\n    assert f(1, 2); f(3)\n".to_string(),
        ];
        let examples = [ex("f(0, 0)"), ex("print(f(  'a b',\n  1))"), ex("f(1, 2)")];
        let probes = probe_inputs("f", &examples, &tests);
        assert_eq!(
            probes,
            vec![
                "f(0, 0)",
                "f('a b', 1)",
                "f(1, 2)",
                "f([3, 1], key=len)",
                "f(math.pi, 'f(9)')",
                "f(7)",
                "f([i * 2 for i in range(3)], (lambda y: y)(1))",
                "f(3)",
            ]
        );
        // `x` is the test's own variable; `obj.f` is a method; `f(8` never closes.
        assert!(!probes
            .iter()
            .any(|p| p.contains('x') || p.contains('8') || p.contains('5')));
    }

    #[test]
    fn probes_are_capped_and_reject_statements() {
        let many: String = (0..40).map(|i| format!("assert f({i}) == {i}\n")).collect();
        assert_eq!(probe_inputs("f", &[], &[many]).len(), MAX_PROBES);
        for bad in [
            "f(x := 1)",
            "f(1); import os",
            "f(1))",
            "f((1)",
            "f(\"a)",
            "f(yield)",
        ] {
            assert_eq!(normalise_call("f", bad), None, "{bad}");
        }
        assert_eq!(
            normalise_call("f", "f(  1, # one\n  2 )").as_deref(),
            Some("f(1, 2)")
        );
        // A lambda binds its own parameters, not the names after its colon.
        assert!(probe_inputs("f", &[], &["assert f(lambda y: y, x)\n".into()]).is_empty());
        assert_eq!(
            probe_inputs("f", &[], &["assert f(lambda y: y + 1, 2)\n".into()]),
            ["f(lambda y: y + 1, 2)"]
        );
        assert_eq!(normalise_call("f", "g(1)"), None);
        assert_eq!(normalise_call("f", "f(1) + 1"), None);
        // The entry point's own definition is not a call.
        assert!(calls_of("f", "def f(a, b):\n    return f(a - 1, b)\n") == ["f(a - 1, b)"]);
    }

    #[test]
    fn typed_probes_follow_the_annotations() {
        let sig = python::signature_of(
            "def f(xs: List[int], n: int, sep: str = ',', *rest, flag: bool) -> int:",
        )
        .unwrap();
        let p = typed_probes("f", &sig, 3);
        assert_eq!(
            p,
            vec![
                "f([3, 1, 2], 1, flag=True)",
                "f([1, 2, 3, 4], 5, flag=False)",
                "f([5], 7, flag=True)"
            ]
        );
        let untyped = python::signature_of("def f(a, b: int):").unwrap();
        assert!(typed_probes("f", &untyped, 3).is_empty());
        let none = python::signature_of("def f() -> int:").unwrap();
        assert_eq!(typed_probes("f", &none, 3), vec!["f()"]);
        // Typed probes top up a plan with too few.
        let sig = python::signature_of("def add(a: int, b: int) -> int:").unwrap();
        let plan = ProbePlan::new("add", Some(&sig), &[ex("add(2, 3)")], &[]);
        assert_eq!(plan.probes[0], "add(2, 3)");
        assert_eq!(plan.typed, TYPED_PROBES);
        assert_eq!(plan.probes.len(), 1 + TYPED_PROBES);
    }

    #[test]
    fn generated_tests_are_functions_or_whole_files() {
        let t = generated_tests(&[
            "def test_a():\n    pass\n\ndef helper():\n    pass\n\ndef test_b():\n    pass\n"
                .into(),
            "assert True\n".into(),
        ]);
        let ids: Vec<_> = t.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["g1::test_a", "g1::test_b", "g2"]);
        assert_eq!(t[2].function, None);
    }

    #[test]
    fn python_literals_escape_everything() {
        assert_eq!(
            py_str("a'b\\c\n\u{1}é😀"),
            "'a\\'b\\\\c\\n\\x01\\u00e9\\U0001f600'"
        );
    }

    #[test]
    fn the_report_is_read_among_other_output() {
        let out = format!(
            "hello\n{MARK}{{\"p\": 0, \"o\": \"3\"}}\nnoise {MARK}\n{MARK}{{\"p\": 2, \"o\": \"raise:ValueError\"}}\n{MARK}{{\"t\": 1, \"ok\": true}}\n{MARK}{{\"done\": true}}\n"
        );
        let r = parse_run(&out, 3, 2);
        assert_eq!(r.outputs.unwrap(), vec!["3", NO_RESULT, "raise:ValueError"]);
        assert_eq!(r.tests, vec![false, true]);
        assert_eq!(r.note, None);
        let r = parse_run(
            &format!("{MARK}{{\"imported\": false, \"error\": \"ImportError\"}}\n"),
            3,
            0,
        );
        assert_eq!(r.outputs, None);
        assert!(r.note.unwrap().contains("ImportError"));
        assert_eq!(parse_run("Traceback...", 2, 0).outputs, None);
        assert_eq!(
            parse_run(&format!("{MARK}{{\"p\": 0, \"o\": \"1\"}}\n"), 1, 0)
                .note
                .as_deref(),
            Some("cut short")
        );
    }

    #[test]
    fn addresses_do_not_split_groups() {
        assert_eq!(
            normalise_output("<solution.Box object at 0x7f3a2c1b5e50>"),
            "<solution.Box object at 0x…>"
        );
        // Short hex (a value) stays; so does hex inside a word.
        assert_eq!(normalise_output("'0x1f' ab0x123456"), "'0x1f' ab0x123456");
        let runs = [
            run(1, 1.0, &["<Box object at 0x7f00aa11bb22>", "2"], &[]),
            run(2, 1.0, &["<Box object at 0x7f00cc33dd44>", "2"], &[]),
            run(3, 1.0, &["<Box object at 0x7f00cc33dd44>", "3"], &[]),
        ];
        let (groups, _) = group(&runs);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].members, vec![1, 2]);
        assert!(
            groups[0].signature.starts_with("<Box object at 0x…> | 2 #"),
            "{}",
            groups[0].signature
        );
    }

    #[test]
    fn candidates_that_always_raise_or_never_ran_form_no_group() {
        let mut broken = run(4, 1.0, &[], &[]);
        broken.run.outputs = None;
        broken.run.note = Some("did not import (ImportError)".into());
        let runs = [
            run(1, 1.0, &["1", "raise:ValueError"], &[]),
            run(2, 1.0, &["raise:TypeError", "raise:TypeError"], &[]),
            run(3, 1.0, &["1", "raise:ValueError"], &[]),
            broken,
        ];
        let (groups, ungrouped) = group(&runs);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].members, vec![1, 3]);
        assert_eq!(
            ungrouped,
            vec![
                Ungrouped {
                    candidate: 2,
                    why: "raised on every probe".into()
                },
                Ungrouped {
                    candidate: 4,
                    why: "did not import (ImportError)".into()
                },
            ]
        );
        // Ran: 3 (the one that raised everywhere ran); but all 4 were candidates, and the
        // one that did not import disagrees too: 2 of 4 is no clear majority.
        let sel = choose(&plan(2, 0), &runs);
        assert_eq!(sel.ran, 3);
        assert!(!sel.clear_majority && !sel.consistent);
        let sel = choose(&plan(2, 0), &runs[..3]);
        assert!(sel.clear_majority && sel.consistent);
    }

    #[test]
    fn codet_scores_weigh_agreement_by_the_tests_passed() {
        assert_eq!(codet_score(3, 0), 3.0);
        assert_eq!(codet_score(2, 2), 6.0);
        // Three agree but pass no test; two agree and pass both: the two win.
        let runs = [
            run(1, 1.0, &["1"], &[false, false]),
            run(2, 1.0, &["1"], &[false, false]),
            run(3, 1.0, &["1"], &[false, true]),
            run(4, 1.0, &["2"], &[true, true]),
            run(5, 1.0, &["2"], &[true, true]),
        ];
        let (groups, _) = group(&runs);
        assert_eq!(groups[0].members, vec![4, 5]);
        assert_eq!((groups[0].tests_passed, groups[0].score), (2, 6.0));
        // Test 2 is passed by one member of three: not by the group.
        assert_eq!((groups[1].tests_passed, groups[1].score), (0, 3.0));
        let sel = choose(&plan(1, 2), &runs);
        assert_eq!(sel.chosen, Some(4));
        // 2 of 5 ran: the best group is no majority.
        assert!(!sel.clear_majority && !sel.consistent);
    }

    #[test]
    fn a_clear_majority_is_more_than_half_and_at_least_two() {
        assert!(clear_majority(2, 3));
        assert!(clear_majority(3, 4));
        assert!(!clear_majority(2, 4));
        assert!(!clear_majority(1, 1));
        assert!(clear_majority(2, 2));
        assert!(!clear_majority(0, 0));
    }

    #[test]
    fn the_choice_is_the_best_scored_member_of_the_best_group() {
        let runs = [
            run(1, 5.0, &["9"], &[true, false]),
            run(2, 2.0, &["1"], &[true, true]),
            run(3, 3.0, &["1"], &[true, false]),
            run(4, 3.0, &["1"], &[true, true]),
        ];
        let sel = choose(&plan(1, 2), &runs);
        assert_eq!(sel.groups[0].members, vec![2, 3, 4]);
        // 3 and 4 tie on the verdict score; 4 passes more tests.
        assert_eq!(sel.chosen, Some(4));
        assert!(sel.clear_majority);
        // The group mostly passes both tests (3 of 3, 2 of 3); 4 passes both.
        assert!(sel.passes_majority_tests && sel.consistent);

        // The best verdict score fails a test the majority passes: chosen, but not
        // consistent.
        let runs = [
            run(1, 9.0, &["1"], &[false]),
            run(2, 2.0, &["1"], &[true]),
            run(3, 2.0, &["1"], &[true]),
        ];
        let sel = choose(&plan(1, 1), &runs);
        assert_eq!(sel.chosen, Some(1));
        assert!(sel.clear_majority && !sel.passes_majority_tests && !sel.consistent);

        // Nothing to choose.
        let sel = choose(&plan(1, 0), &[run(1, 1.0, &["raise:E"], &[])]);
        assert_eq!(sel.chosen, None);
        assert!(!sel.consistent && !sel.note.is_empty());
    }

    #[test]
    fn ties_go_to_the_larger_group_then_the_better_verdict() {
        // Equal scores (2 × 1 and 1 × 2): the larger group.
        let runs = [
            run(1, 1.0, &["a"], &[false]),
            run(2, 1.0, &["a"], &[false]),
            run(3, 1.0, &["b"], &[true]),
        ];
        assert_eq!(choose(&plan(1, 1), &runs).groups[0].members, vec![1, 2]);
        // Equal groups: the one with the better verdict.
        let runs = [run(1, 1.0, &["a"], &[]), run(2, 2.0, &["b"], &[])];
        let sel = choose(&plan(1, 0), &runs);
        assert_eq!(sel.chosen, Some(2));
        assert!(!sel.clear_majority);
    }

    /// The harness on the real sandbox: outputs as `repr`, exceptions by type (raised by the
    /// code or crashed), a loop cut by
    /// the per-call limit, the candidate's own printing ignored, each generated test alone.
    #[tokio::test]
    async fn the_run_reports_each_probe_and_test() {
        use crate::testing::{ScriptedModel, TestBed};
        let bed = TestBed::new(ScriptedModel::new()).await;
        let ctx = bed.ctx();
        let code = "class Box:\n    pass\n\ndef f(x):\n    print('noise')\n    if x == 0:\n        raise ValueError('zero')\n    if x == 1:\n        return Box()\n    if x == 2:\n        return {'b', 'a', 'c'}\n    if x == 3:\n        return 0.1 + 0.2\n    if x == 4:\n        while True:\n            pass\n    if x == 5:\n        return (i for i in range(3))\n    if x == 7:\n        return [][0]\n    return x\n";
        let tests = vec![
            "from solution import f\n\ndef test_ok():\n    assert f(6) == 6\n\ndef test_bad():\n    assert f(6) == 7\n".to_string(),
            "def test_broken(:\n    pass\n".to_string(),
        ];
        let plan = ProbePlan::new("f", None, &[], &{
            let mut t = tests.clone();
            t.push((0..8).map(|i| format!("f({i})\n")).collect());
            t
        });
        assert_eq!(plan.probes.len(), 8, "{:?}", plan.probes);
        let run = run_candidate(&ctx, "solution", code, &plan).await;
        let outputs: Vec<String> = run
            .outputs
            .clone()
            .unwrap_or_else(|| panic!("{run:?}"))
            .iter()
            .map(|o| normalise_output(o))
            .collect();
        let by_probe: Vec<(&str, &str)> = plan
            .probes
            .iter()
            .map(String::as_str)
            .zip(outputs.iter().map(String::as_str))
            .collect();
        for want in [
            ("f(0)", "raise:ValueError"),
            ("f(1)", "<solution.Box object at 0x…>"),
            ("f(2)", "{'a', 'b', 'c'}"),
            ("f(3)", "0.3"),
            ("f(4)", "raise:Timeout"),
            ("f(5)", "iter:[0, 1, 2]"),
            ("f(6)", "6"),
            // An operation that failed, not a `raise` of the code's own.
            ("f(7)", "crash:IndexError"),
        ] {
            assert!(by_probe.contains(&want), "{want:?} not in {by_probe:?}");
        }
        let ids: Vec<&str> = plan.tests.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(
            ids,
            ["g1::test_ok", "g1::test_bad", "g2::test_broken", "g3"]
        );
        // The third file (bare calls, f(0) raises) fails as a whole.
        assert_eq!(run.tests, vec![true, false, false, false], "{run:?}");
        assert_eq!(run.note, None);

        // A candidate that does not import is no candidate.
        let run = run_candidate(&ctx, "solution", "import no_such_module\n", &plan).await;
        assert_eq!(run.outputs, None, "{run:?}");
    }

    /// A whole job on a stub with no examples: three candidates, two agreeing (right) and
    /// one not. The job keeps one of the two, and says that they are a clear majority.
    #[tokio::test]
    async fn a_job_without_examples_keeps_the_candidate_the_majority_agrees_on() {
        use crate::formatter::Format;
        use crate::task::TaskRequest;
        use crate::testing::{ScriptedModel, TestBed};
        const JUDGE_OK: &str = r#"{"pass": true, "problems": [], "feedback": ""}"#;
        let stub = "def add(a: int, b: int) -> int:\n    \"\"\"Return the sum of a and b.\"\"\"\n";
        let model = ScriptedModel::new()
            .on(
                "orchestrator",
                r#"{"subtasks": [{"id": "impl", "kind": "code", "description": "add", "depends_on": [], "acceptance": []}]}"#,
            )
            .on("code", "def add(a, b):\n    return a - b\n```")
            .on("code", "def add(a, b):\n    return a + b\n```")
            .on("code", "def add(a, b):\n    total = b + a\n    return total\n```")
            .on("validator", JUDGE_OK)
            .on("synthesizer", "add(a, b) returns the sum.")
            .on("final_validator", JUDGE_OK);
        let mut cfg = crate::config::PipelineConfig::default();
        cfg.limits.candidates = 3;
        let bed = TestBed::with_config(model.clone(), cfg).await;
        let out = bed
            .pipeline
            .run(TaskRequest::new(stub), Format::Json, None)
            .await
            .unwrap();
        let sub = &out.trace.subtasks[0];
        let sel = sub
            .selection
            .as_ref()
            .unwrap_or_else(|| panic!("no selection: {sub:#?}"));
        let kept = sub.artifact.as_ref().unwrap().code.as_deref().unwrap();
        assert!(
            kept.contains("a + b") || kept.contains("b + a"),
            "{kept}\n{sel:#?}"
        );
        assert_eq!(sel.candidates, 3, "{sel:#?}");
        assert_eq!(sel.ran, 3, "{sel:#?}");
        assert_eq!(sel.typed_probes, TYPED_PROBES);
        let sizes: Vec<usize> = sel.groups.iter().map(|g| g.members.len()).collect();
        assert_eq!(sizes, [2, 1], "{sel:#?}");
        assert!(sel.groups[0].members.contains(&sel.chosen.unwrap()));
        assert!(sel.clear_majority && sel.passes_majority_tests && sel.consistent);
        assert!(out.result.module().unwrap().contains('+'));
        // The trace carries it.
        let trace = crate::job::trace_json(&out.trace);
        assert_eq!(trace["subtasks"][0]["selection"]["clear_majority"], true);
        assert_eq!(
            trace["subtasks"][0]["selection"]["groups"][0]["members"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
