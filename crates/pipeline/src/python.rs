//! Python source as text: code blocks in model answers, top-level statements, function
//! signatures, docstring examples, import merging. Nothing here runs Python (the sandbox
//! does); these are the light structural reads the stages need between sandbox runs.

use std::collections::HashSet;

/// The code a model answered with: the first fenced block (```python or ```), else the
/// whole answer when it looks like code. An unclosed fence (the model ran out of tokens)
/// yields what was written.
pub fn extract_code(answer: &str) -> Option<String> {
    let mut best: Option<String> = None;
    let mut rest = answer;
    while let Some(start) = rest.find("```") {
        let after = &rest[start + 3..];
        let body_start = after.find('\n').map(|i| i + 1).unwrap_or(after.len());
        let lang = after[..body_start].trim();
        let body = &after[body_start..];
        let (code, next) = match body.find("```") {
            Some(end) => (&body[..end], &body[end + 3..]),
            None => (body, ""),
        };
        let is_python = lang.is_empty() || lang.eq_ignore_ascii_case("python") || lang == "py";
        if is_python && !code.trim().is_empty() {
            // Prefer the block that defines something over a usage example.
            let defines = code.contains("def ") || code.contains("class ");
            match &best {
                None => best = Some(code.to_string()),
                Some(b) if defines && !(b.contains("def ") || b.contains("class ")) => {
                    best = Some(code.to_string())
                }
                _ => {}
            }
        }
        rest = next;
    }
    if best.is_some() {
        return best.map(|c| c.trim_end().to_string() + "\n");
    }
    let t = answer.trim();
    let looks_like_code = t.starts_with("def ")
        || t.starts_with("import ")
        || t.starts_with("from ")
        || t.starts_with("class ")
        || t.starts_with('@');
    looks_like_code.then(|| t.to_string() + "\n")
}

/// One top-level statement of a module, with the comments and decorators before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    pub kind: StatementKind,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatementKind {
    Import,
    Def(String),
    Class(String),
    /// `if __name__ == "__main__":` blocks.
    MainGuard,
    Other,
}

/// Splits a module into its top-level statements. Tracks brackets and string literals so
/// that a statement spanning lines stays whole.
pub fn statements(source: &str) -> Vec<Statement> {
    let mut out: Vec<Statement> = Vec::new();
    let mut current = String::new();
    // Blank and comment lines wait here: they belong to what follows them.
    let mut pending = String::new();
    let mut scanner = Scanner::default();
    for line in source.lines() {
        let continuing = scanner.open();
        scanner.feed(line);
        let trimmed = line.trim();
        if !continuing && (trimmed.is_empty() || trimmed.starts_with('#')) {
            pending.push_str(line);
            pending.push('\n');
            continue;
        }
        let starts_statement =
            !continuing && !line.starts_with([' ', '\t']) && !line.starts_with([')', ']', '}']);
        let decorator_only = current.lines().all(|l| {
            let t = l.trim();
            t.is_empty() || t.starts_with('#') || t.starts_with('@') || l.starts_with([' ', '\t'])
        }) && current.contains('@');
        if starts_statement && !decorator_only && !current.trim().is_empty() {
            out.push(classify(std::mem::take(&mut current)));
        }
        if current.is_empty() {
            current.push_str(pending.trim_start_matches(['\n', ' ', '\t']));
        } else {
            current.push_str(&pending);
        }
        pending.clear();
        current.push_str(line);
        current.push('\n');
    }
    current.push_str(&pending);
    if !current.trim().is_empty() {
        out.push(classify(current));
    }
    out
}

fn classify(text: String) -> Statement {
    let head = text
        .lines()
        .map(str::trim_start)
        .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('@'))
        .unwrap_or("");
    let name_after = |prefix: &str| {
        head.strip_prefix(prefix).map(|r| {
            r.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
    };
    let kind = if head.starts_with("import ") || head.starts_with("from ") {
        StatementKind::Import
    } else if let Some(n) = name_after("def ").or_else(|| name_after("async def ")) {
        StatementKind::Def(n)
    } else if let Some(n) = name_after("class ") {
        StatementKind::Class(n)
    } else if head.starts_with("if __name__") {
        StatementKind::MainGuard
    } else {
        StatementKind::Other
    };
    Statement { kind, text }
}

/// Bracket depth and open triple-quoted strings across lines.
#[derive(Default)]
struct Scanner {
    depth: i32,
    triple: Option<&'static str>,
    backslash: bool,
}

impl Scanner {
    fn open(&self) -> bool {
        self.depth > 0 || self.triple.is_some() || self.backslash
    }

    /// Compares bytes, never slices the line: every delimiter it looks for is ASCII, and no
    /// byte of a multi-byte UTF-8 character is ASCII, so a skip that lands inside one (a
    /// backslash before `≤`) only steps over bytes that cannot match.
    fn feed(&mut self, line: &str) {
        let b = line.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if let Some(q) = self.triple {
                if b[i..].starts_with(q.as_bytes()) {
                    self.triple = None;
                    i += 3;
                } else {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                continue;
            }
            match b[i] {
                b'#' => break,
                b'(' | b'[' | b'{' => self.depth += 1,
                b')' | b']' | b'}' => self.depth = (self.depth - 1).max(0),
                q @ (b'"' | b'\'') => {
                    let triple = if q == b'"' { "\"\"\"" } else { "'''" };
                    if b[i..].starts_with(triple.as_bytes()) {
                        self.triple = Some(triple);
                        i += 3;
                        continue;
                    }
                    // A one-line string: skip to its closing quote.
                    i += 1;
                    while i < b.len() && b[i] != q {
                        i += if b[i] == b'\\' { 2 } else { 1 };
                    }
                }
                _ => {}
            }
            i += 1;
        }
        self.backslash = self.triple.is_none() && line.trim_end().ends_with('\\');
    }
}

/// A function's signature as written: `def name(params) -> ret:`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signature {
    pub name: String,
    /// Parameter names in order (without `self`, `*`, annotations or defaults).
    pub params: Vec<String>,
    /// The `def` line(s) as written.
    pub text: String,
}

/// The signatures of the top-level functions defined in `source`.
pub fn signatures(source: &str) -> Vec<Signature> {
    statements(source)
        .into_iter()
        .filter_map(|s| match &s.kind {
            StatementKind::Def(_) => signature_of(&s.text),
            _ => None,
        })
        .collect()
}

/// The signature of the first `def` in `text`.
pub fn signature_of(text: &str) -> Option<Signature> {
    let start = text.find("def ")?;
    let rest = &text[start..];
    let open = rest.find('(')?;
    let name = rest[4..open].trim().to_string();
    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return None;
    }
    let mut depth = 0;
    let mut close = None;
    for (i, c) in rest[open..].char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(open + i);
                    break;
                }
            }
            _ => {}
        }
    }
    let close = close?;
    let colon = rest[close..].find(':').map(|i| close + i)?;
    let params = split_params(&rest[open + 1..close])
        .into_iter()
        .filter_map(|p| {
            let name: String = p
                .trim()
                .trim_start_matches('*')
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty() && name != "self" && name != "cls").then_some(name)
        })
        .collect();
    Some(Signature {
        name,
        params,
        text: rest[..=colon].to_string(),
    })
}

/// One parameter of a signature, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    /// The annotation's text (`List[int]`), when annotated.
    pub annotation: Option<String>,
    /// The default's text, when it has one.
    pub default: Option<String>,
    /// `*args` (1) or `**kwargs` (2); 0 for a plain parameter.
    pub stars: u8,
    /// It comes after `*` or `*args`: callers must name it.
    pub keyword_only: bool,
}

/// The parameters of a signature (its `text`) with their annotations and defaults; `self`,
/// `cls` and the bare `*` and `/` markers left out.
pub fn parameters(sig: &Signature) -> Vec<Param> {
    let text = &sig.text;
    let Some(open) = text.find('(') else {
        return Vec::new();
    };
    let mut depth = 0;
    let mut close = None;
    for (i, c) in text[open..].char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(open + i);
                    break;
                }
            }
            _ => {}
        }
    }
    let Some(close) = close else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut keyword_only = false;
    for raw in split_params(&text[open + 1..close]) {
        let p = raw.trim();
        let stars = p.chars().take_while(|c| *c == '*').count().min(2) as u8;
        let rest = &p[usize::from(stars)..];
        let (head, default) = match split_top_level(rest, '=') {
            Some((h, d)) => (h, Some(d.trim().to_string())),
            None => (rest, None),
        };
        let (name, annotation) = match split_top_level(head, ':') {
            Some((n, a)) => (n.trim(), Some(a.trim().to_string())),
            None => (head.trim(), None),
        };
        if name.is_empty() {
            // The bare `*` marker: the parameters after it are keyword-only.
            keyword_only |= stars == 1;
            continue;
        }
        if name == "/" || name == "self" || name == "cls" {
            continue;
        }
        if !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        out.push(Param {
            name: name.to_string(),
            annotation,
            default,
            stars,
            keyword_only: keyword_only && stars == 0,
        });
        keyword_only |= stars == 1;
    }
    out
}

/// `s` split at the first `sep` outside brackets and string literals.
fn split_top_level(s: &str, sep: char) -> Option<(&str, &str)> {
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            c if c == sep && depth == 0 => return Some((&s[..i], &s[i + c.len_utf8()..])),
            _ => {}
        }
    }
    None
}

fn split_params(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !s[start..].trim().is_empty() {
        out.push(&s[start..]);
    }
    out
}

/// The prose of the first docstring in `text` (a stub's): the lines before its first `>>>`
/// example, one paragraph per block of lines between blank lines. `None` when there is no
/// docstring or it has no prose.
pub fn docstring_prose(text: &str) -> Option<String> {
    let (start, quote) = ["\"\"\"", "'''"]
        .iter()
        .filter_map(|q| text.find(q).map(|i| (i, *q)))
        .min()?;
    let body = &text[start + 3..];
    let body = &body[..body.find(quote).unwrap_or(body.len())];
    let mut paragraphs = vec![String::new()];
    for line in body.lines().map(str::trim) {
        if line.starts_with(">>>") {
            break;
        }
        let last = paragraphs.last_mut().expect("never empty");
        if line.is_empty() {
            if !last.is_empty() {
                paragraphs.push(String::new());
            }
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(line);
        }
    }
    let prose: Vec<String> = paragraphs
        .into_iter()
        .filter(|p| !p.is_empty() && !p.eq_ignore_ascii_case("examples:"))
        .collect();
    (!prose.is_empty()).then(|| prose.join("\n\n"))
}

/// A docstring example: `>>> call` and the output shown after it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub call: String,
    /// The printed output; empty when the call shows nothing (it returns None).
    pub expected: String,
}

/// The `>>>` examples in a text (a docstring, a task description).
pub fn examples(text: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let Some(call) = lines[i].trim_start().strip_prefix(">>>") else {
            i += 1;
            continue;
        };
        let mut call = call.trim().to_string();
        i += 1;
        while i < lines.len() {
            match lines[i].trim_start().strip_prefix("...") {
                Some(more) => {
                    call.push('\n');
                    call.push_str(more.strip_prefix(' ').unwrap_or(more));
                    i += 1;
                }
                None => break,
            }
        }
        let mut expected = Vec::new();
        while i < lines.len() {
            let l = lines[i].trim();
            if l.is_empty() || l.starts_with(">>>") || l.starts_with("\"\"\"") || l == "'''" {
                break;
            }
            expected.push(l);
            i += 1;
        }
        if !call.is_empty() {
            out.push(Example {
                call,
                expected: expected.join("\n"),
            });
        }
    }
    out
}

/// A test file that checks the examples against `module`'s code, one test function each
/// (run with `TestKind::Functions`, so the summary counts how many pass and a failure
/// reports the call, the expected and the actual value). Examples whose output is not a
/// Python value (printed text, tracebacks) are left out.
pub fn examples_test(module: &str, examples: &[Example]) -> Option<String> {
    let mut setup = String::new();
    let mut tests = String::new();
    let mut n = 0;
    for e in examples {
        if e.call.contains('\n') || e.expected.starts_with("Traceback") || e.expected.contains('\n')
        {
            continue;
        }
        if e.call.starts_with("import ") || e.call.starts_with("from ") {
            setup.push_str(&e.call);
            setup.push('\n');
            continue;
        }
        n += 1;
        let check = if e.expected.is_empty() {
            format!("assert ({}) is None", e.call)
        } else {
            format!("assert ({}) == ({})", e.call, e.expected)
        };
        tests.push_str(&format!("\ndef test_example_{n}():\n    {check}\n"));
    }
    (n > 0).then(|| format!("from {module} import *\n{setup}\n{tests}"))
}

/// The import statements of `source`, as written.
pub fn imports(source: &str) -> Vec<String> {
    statements(source)
        .into_iter()
        .filter(|s| s.kind == StatementKind::Import)
        .map(|s| s.text.trim().to_string())
        .collect()
}

/// `code` with the imports of `header` it lacks added at the top (a task's `from typing
/// import List` that the model did not repeat).
pub fn ensure_imports(code: &str, header: &str) -> String {
    let have: HashSet<String> = imports(code).into_iter().collect();
    let missing: Vec<String> = imports(header)
        .into_iter()
        .filter(|i| !have.contains(i))
        .collect();
    if missing.is_empty() {
        return code.to_string();
    }
    format!("{}\n\n{}", missing.join("\n"), code.trim_start())
}

/// Whether `source` defines `name` at the top level.
pub fn defines(source: &str, name: &str) -> bool {
    statements(source).iter().any(|s| match &s.kind {
        StatementKind::Def(n) | StatementKind::Class(n) => n == name,
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docstring_prose_is_the_text_before_the_examples() {
        let stub = "def f(x: int) -> int:\n    \"\"\"Return x doubled,\n    or 0.\n\n    Never negative.\n\n    >>> f(2)\n    4\n    \"\"\"\n";
        assert_eq!(
            docstring_prose(stub).as_deref(),
            Some("Return x doubled, or 0.\n\nNever negative.")
        );
        assert_eq!(docstring_prose("def f():\n    pass\n"), None);
        assert_eq!(
            docstring_prose("def f():\n    '''\n    >>> f()\n    '''\n"),
            None
        );
    }

    #[test]
    fn extracts_the_defining_block() {
        let a =
            "Here:\n```python\nprint(f(1))\n```\nand\n```python\ndef f(x):\n    return x\n```\n";
        assert_eq!(extract_code(a).unwrap(), "def f(x):\n    return x\n");
        assert_eq!(
            extract_code("```py\ndef g(): pass").unwrap(),
            "def g(): pass\n"
        );
        assert_eq!(
            extract_code("def h():\n    return 1").unwrap(),
            "def h():\n    return 1\n"
        );
        assert_eq!(extract_code("I cannot help with that."), None);
        assert_eq!(extract_code(""), None);
    }

    #[test]
    fn splits_top_level_statements() {
        let src = "import os\nfrom typing import (\n    List,\n)\n\n# helper\n@cache\ndef f(x):\n    s = \"\"\"\ndef not_top():\n\"\"\"\n    return x\n\nclass A:\n    pass\nX = [\n1]\nif __name__ == \"__main__\":\n    f(1)\n";
        let kinds: Vec<_> = statements(src).into_iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            vec![
                StatementKind::Import,
                StatementKind::Import,
                StatementKind::Def("f".into()),
                StatementKind::Class("A".into()),
                StatementKind::Other,
                StatementKind::MainGuard
            ]
        );
        let f = &statements(src)[2];
        assert!(f.text.starts_with("# helper\n@cache\ndef f"), "{}", f.text);
    }

    #[test]
    fn reads_signatures() {
        let s = signature_of("def clamp(value: int, low: int = 0, *args, high: Dict[str, int] = {}, **kw) -> int:\n    pass").unwrap();
        assert_eq!(s.name, "clamp");
        assert_eq!(s.params, vec!["value", "low", "args", "high", "kw"]);
        assert!(s.text.ends_with("-> int:"));
        assert_eq!(signature_of("x = 1"), None);
        let sigs =
            signatures("def a(x):\n    def inner(y):\n        pass\n\ndef b(self, z):\n    pass\n");
        assert_eq!(sigs.len(), 2);
        assert_eq!(sigs[1].params, vec!["z"]);
    }

    #[test]
    fn reads_parameters_with_annotations_and_defaults() {
        let s = signature_of(
            "def f(self, a: int, b: Dict[str, int] = {'x': 1}, *args, c: str = 'a=b', d, **kw) -> int:",
        )
        .unwrap();
        let ps = parameters(&s);
        let view: Vec<_> = ps
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.annotation.as_deref(),
                    p.default.as_deref(),
                    p.stars,
                    p.keyword_only,
                )
            })
            .collect();
        assert_eq!(
            view,
            vec![
                ("a", Some("int"), None, 0, false),
                ("b", Some("Dict[str, int]"), Some("{'x': 1}"), 0, false),
                ("args", None, None, 1, false),
                ("c", Some("str"), Some("'a=b'"), 0, true),
                ("d", None, None, 0, true),
                ("kw", None, None, 2, false),
            ]
        );
        let s = signature_of("def g(x, /, *, y: float):").unwrap();
        let ps = parameters(&s);
        assert_eq!(ps.len(), 2);
        assert!(!ps[0].keyword_only && ps[1].keyword_only);
        assert_eq!(ps[1].annotation.as_deref(), Some("float"));
    }

    #[test]
    fn reads_examples_and_writes_asserts() {
        let doc = "    >>> clamp(5, 1, 10)\n    5\n    >>> largest([1, 3])\n    >>> f(\n    ...   2)\n    'a b'\n    \"\"\"\n";
        let ex = examples(doc);
        assert_eq!(ex.len(), 3);
        assert_eq!(ex[1].expected, "");
        assert_eq!(ex[2].call, "f(\n  2)");
        let t = examples_test("solution", &ex).unwrap();
        assert_eq!(
            t,
            "from solution import *\n\n\ndef test_example_1():\n    assert (clamp(5, 1, 10)) == (5)\n\ndef test_example_2():\n    assert (largest([1, 3])) is None\n"
        );
        assert_eq!(examples_test("solution", &[]), None);
    }

    #[test]
    fn non_ascii_text_in_strings_and_comments() {
        // Seen on HumanEval tasks: each panicked the scanner, which sliced inside a character.
        let src = "def any_int(x, y, z):\n    \"\"\"Constraints: 0 ≤ N ≤ 10000\n    any_int(5, 2, 7) ➞ True\n    \"\"\"\n    s = 'café\\é'  # été\n    return \"\"\"Returns café\\≤\"\"\"\n\ndef g():\n    pass\n";
        let kinds: Vec<_> = statements(src).into_iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            vec![
                StatementKind::Def("any_int".into()),
                StatementKind::Def("g".into())
            ]
        );
        assert_eq!(signatures(src)[0].params, vec!["x", "y", "z"]);
        assert!(docstring_prose(src).unwrap().contains("0 ≤ N"));
        assert_eq!(statements("def f():\n    '''é\\≤'''\nx = 1\n").len(), 2);
    }

    #[test]
    fn adds_missing_imports_once() {
        let header = "from typing import List\nimport math\n\ndef f(x: List[int]) -> int:\n    \"\"\"doc\"\"\"\n";
        let code = "import math\n\ndef f(x):\n    return 1\n";
        let fixed = ensure_imports(code, header);
        assert_eq!(
            fixed,
            "from typing import List\n\nimport math\n\ndef f(x):\n    return 1\n"
        );
        assert_eq!(ensure_imports(&fixed, header), fixed);
        assert!(defines(&fixed, "f"));
        assert!(!defines(&fixed, "g"));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Python-shaped text: the delimiters the scanner tracks, keywords it classifies,
        /// and arbitrary Unicode (multi-byte characters next to quotes and backslashes).
        fn pythonish() -> impl Strategy<Value = String> {
            let fixed = [
                "\"\"\"",
                "'''",
                "\"",
                "'",
                "\\",
                "#",
                "\n",
                "\r\n",
                "    ",
                "\t",
                "(",
                ")",
                "[",
                "}",
                "def f(a, b=(1, 2)) -> int:",
                "def ≤(",
                "class A:",
                "import os",
                "from x import (y,",
                "@dec",
                "if __name__ == '__main__':",
                ">>> f(1)",
                "... 2",
                "```python\n",
                "```",
                "≤➞é😀",
            ];
            let piece = prop_oneof![
                prop::sample::select(fixed.to_vec()).prop_map(String::from),
                any::<char>().prop_map(String::from),
                "\\PC{0,6}",
            ];
            prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
        }

        fn no_space(s: &str) -> String {
            s.chars().filter(|c| !c.is_whitespace()).collect()
        }

        fn all_reads(src: &str) {
            for s in signatures(src) {
                assert!(src.contains(&s.text), "{s:?}");
                assert!(!s.name.is_empty());
            }
            if let Some(s) = signature_of(src) {
                assert!(src.contains(&s.text), "{s:?}");
            }
            let _ = docstring_prose(src);
            let _ = examples_test("solution", &examples(src));
            let _ = extract_code(src);
            let fixed = ensure_imports(src, src);
            assert_eq!(ensure_imports(&fixed, src), fixed);
            let _ = defines(src, "f");
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases()))]

            /// Splitting never panics and loses nothing but blank space.
            #[test]
            fn prop_statements_keep_every_character(src in pythonish()) {
                let joined: String = statements(&src).iter().map(|s| s.text.as_str()).collect();
                prop_assert_eq!(no_space(&joined), no_space(&src));
            }

            #[test]
            fn prop_python_reads_never_panic(src in pythonish()) {
                all_reads(&src);
            }

            #[test]
            fn prop_python_reads_on_arbitrary_unicode(src in "\\PC{0,200}") {
                let joined: String = statements(&src).iter().map(|s| s.text.as_str()).collect();
                prop_assert_eq!(no_space(&joined), no_space(&src));
                all_reads(&src);
            }
        }
    }
}
