//! What a task forbids the code to use, stated in its words ("Do not use eval().",
//! "without using `sorted`", "don't import the re module"), and whether code uses it. A
//! task's own rule is no model's guess: code that breaks it fails, whatever its outputs.
//!
//! The reading is strict, so that ordinary prose is never taken for a rule: after a
//! forbidding phrase, up to the end of its clause, only names written as code count (in
//! backticks, or followed by `()`), and plain words only when they are builtins a task
//! commonly forbids (`sorted`, `eval`...) and come first after the phrase or after a
//! comma, "or" or "and" (`without using sorted or reversed`). Modules count after "import"
//! phrases and in "the X module".

use std::collections::BTreeSet;

/// Phrases that forbid what follows; `true` for those about imports.
const PHRASES: &[(&str, bool)] = &[
    ("do not use", false),
    ("don't use", false),
    ("dont use", false),
    ("must not use", false),
    ("should not use", false),
    ("cannot use", false),
    ("can't use", false),
    ("never use", false),
    ("not allowed to use", false),
    ("avoid using", false),
    ("without using", false),
    ("without the use of", false),
    ("do not call", false),
    ("without calling", false),
    ("do not import", true),
    ("don't import", true),
    ("must not import", true),
    ("without importing", true),
];

/// Builtins a task forbids by plain name often enough, and rarely means as a word.
const PLAIN: &[&str] = &[
    "eval",
    "exec",
    "sorted",
    "reversed",
    "sum",
    "max",
    "min",
    "abs",
    "pow",
    "round",
    "divmod",
    "zip",
    "enumerate",
    "len",
    "ord",
    "chr",
    "bin",
    "hex",
    "isinstance",
    "compile",
    "__import__",
];

/// Words between a phrase and a plain name that keep it first ("the built-in sorted").
const FILLER: &[&str] = &[
    "the", "built-in", "builtin", "python's", "any", "a", "function",
];

/// Words that may follow a forbidden name.
const LIST_WORDS: &[&str] = &[
    "or",
    "and",
    "nor",
    "function",
    "functions",
    "builtin",
    "built-in",
    "method",
    "module",
    "call",
    "calls",
    "here",
    "anywhere",
    "for",
    "in",
    "at",
    "to",
];

/// Something the task forbids.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Forbidden {
    /// A name: a function, method or builtin (`eval`, `sort`).
    Name(String),
    /// A module that must not be imported.
    Module(String),
}

impl std::fmt::Display for Forbidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Forbidden::Name(n) => write!(f, "`{n}`"),
            Forbidden::Module(m) => write!(f, "the module `{m}`"),
        }
    }
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The clause after a phrase: up to a sentence's end, a semicolon, a colon or a new line.
fn clause(rest: &str) -> &str {
    let mut end = rest.len();
    for (i, c) in rest.char_indices() {
        let next = rest[i + c.len_utf8()..].chars().next();
        let sentence_end = c == '.' && next.is_none_or(char::is_whitespace);
        if sentence_end || matches!(c, ';' | ':' | '\n' | '!' | '?') {
            end = i;
            break;
        }
    }
    &rest[..end]
}

/// A token written as code: `name`, `name()`, `mod.name()`; its last name.
fn code_name(token: &str) -> Option<String> {
    let t = token.trim().trim_end_matches("()").trim_end_matches('(');
    let last = t.rsplit('.').next()?;
    is_ident(last).then(|| last.to_string())
}

/// What `task` forbids.
pub fn forbidden(task: &str) -> Vec<Forbidden> {
    // Only ASCII is read: lower-casing anything else can change its length (`İ`, the
    // Kelvin sign), and the offsets found in the lower-cased text slice the original.
    let task: String = task
        .chars()
        .map(|c| if c.is_ascii() { c } else { ' ' })
        .collect();
    let lower = task.to_ascii_lowercase();
    let mut out = BTreeSet::new();
    for (phrase, imports) in PHRASES {
        let mut from = 0;
        while let Some(at) = lower[from..].find(phrase) {
            let start = from + at + phrase.len();
            from = start;
            let text = clause(&task[start..]);
            read_clause(text, *imports, &mut out);
        }
    }
    out.into_iter().collect()
}

fn read_clause(text: &str, imports: bool, out: &mut BTreeSet<Forbidden>) {
    let name = |n: String| {
        if imports {
            Forbidden::Module(n)
        } else {
            Forbidden::Name(n)
        }
    };
    // Backticked code.
    let mut parts = text.split('`');
    parts.next();
    while let (Some(code), Some(_)) = (parts.next(), parts.next()) {
        if let Some(n) = code_name(code) {
            out.insert(name(n));
        }
    }
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '`')
        .filter(|w| !w.is_empty())
        .collect();
    let mut first = true;
    for (i, w) in words.iter().enumerate() {
        let lw = w.to_lowercase();
        // A plain word names something only where a list of names could go on after it:
        // "sorted or reversed", not "the sum of squares".
        let listed = words.get(i + 1).is_none_or(|next| {
            LIST_WORDS.contains(&next.to_lowercase().as_str()) || text.contains(&format!("{w},"))
        });
        if w.ends_with("()") {
            if let Some(n) = code_name(w) {
                out.insert(name(n));
            }
        } else if first && listed && !imports && PLAIN.contains(&lw.as_str()) {
            out.insert(Forbidden::Name(lw.clone()));
        } else if first && listed && imports && is_ident(w) && !FILLER.contains(&lw.as_str()) {
            out.insert(Forbidden::Module(w.to_string()));
        }
        if lw == "module" && i > 0 {
            let m = words[i - 1].trim_matches('`');
            if is_ident(m) {
                out.insert(Forbidden::Module(m.to_string()));
            }
        }
        // A plain name is first after the phrase, filler words, or a list's separator.
        first = FILLER.contains(&lw.as_str()) || lw == "or" || lw == "and" || lw == "nor";
        if i + 1 < words.len() && text.contains(&format!("{w},")) {
            first = true;
        }
    }
}

/// `source` with its comments and the contents of its string literals blanked, so that a
/// name in a docstring or a comment is not taken for a use.
fn code_only(source: &str) -> String {
    let b = source.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    out.push(b' ');
                    i += 1;
                }
            }
            q @ (b'\'' | b'"') => {
                let triple = b.len() >= i + 3 && b[i + 1] == q && b[i + 2] == q;
                let close: &[u8] = if triple { &[q, q, q] } else { &[q] };
                out.extend_from_slice(close);
                i += close.len();
                while i < b.len() && !b[i..].starts_with(close) && (triple || b[i] != b'\n') {
                    let skip = if b[i] == b'\\' { 2 } else { 1 };
                    for _ in 0..skip.min(b.len() - i) {
                        out.push(if b[i] == b'\n' { b'\n' } else { b' ' });
                        i += 1;
                    }
                }
                if b[i..].starts_with(close) {
                    out.extend_from_slice(close);
                    i += close.len();
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    // Only ASCII bytes were replaced, by ASCII bytes: still UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// The identifiers of `code` (already `code_only`), each with the word before it.
fn identifiers(code: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut prev = "";
    let mut i = 0;
    let b = code.as_bytes();
    while i < b.len() {
        if b[i].is_ascii_alphabetic() || b[i] == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let word = &code[start..i];
            out.push((prev, word));
            prev = word;
        } else {
            if !b[i].is_ascii_whitespace() {
                prev = "";
            }
            i += 1;
        }
    }
    out
}

/// The top-level names of the modules `code` (already `code_only`) imports: `a` of
/// `import a.b, c as d` and of `from a.b import x`, wherever the statement is.
fn imported(code: &str) -> impl Iterator<Item = &str> {
    code.lines().flat_map(|line| {
        let t = line.trim_start();
        let names: Vec<&str> = if let Some(rest) = t.strip_prefix("import ") {
            rest.split(',').collect()
        } else if let Some(rest) = t.strip_prefix("from ") {
            rest.split_whitespace().take(1).collect()
        } else {
            Vec::new()
        };
        names.into_iter().filter_map(|n| {
            let first = n.split_whitespace().next()?;
            first.split('.').next()
        })
    })
}

/// What of `forbidden` the code uses: a name anywhere in its code (not as the name it
/// defines), a module in an import.
pub fn violations(code: &str, forbidden: &[Forbidden]) -> Vec<Forbidden> {
    let code = code_only(code);
    let ids = identifiers(&code);
    forbidden
        .iter()
        .filter(|f| match f {
            Forbidden::Name(n) => ids
                .iter()
                .any(|(prev, w)| w == n && !matches!(*prev, "def" | "class")),
            Forbidden::Module(m) => imported(&code).any(|i| i == m),
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(task: &str) -> Vec<String> {
        forbidden(task).iter().map(|f| f.to_string()).collect()
    }

    #[test]
    fn rules_in_a_tasks_words() {
        assert_eq!(names("\u{130}\u{212a} Do not use eval()."), ["`eval`"]);
        assert_eq!(
            names("The expression is always well formed. Do not use eval()."),
            ["`eval`"]
        );
        assert_eq!(
            names("Sort the list without using sorted or reversed, and return it."),
            ["`reversed`", "`sorted`"]
        );
        assert_eq!(names("Don't use the built-in `sum` function"), ["`sum`"]);
        assert_eq!(
            names("do not use `list.sort()`; write it yourself"),
            ["`sort`"]
        );
        assert_eq!(
            names("Parse it by hand: do not import the re module."),
            ["the module `re`"]
        );
        assert_eq!(
            names("Without importing `itertools`, ..."),
            ["the module `itertools`"]
        );
    }

    #[test]
    fn ordinary_prose_is_no_rule() {
        for task in [
            "Do not use more than one loop.",
            "Write it without using recursion, and do not use global state.",
            "You can use sorted() freely.",
            "Return the max of the list; do not use a set",
            "Do not use the sum of squares formula.",
            "",
            "do not use",
            "without using `` or ``()",
            "\u{130}\u{212a} do not use \u{130}\u{130}\u{212a}",
        ] {
            assert_eq!(names(task), Vec::<String>::new(), "{task}");
        }
    }

    #[test]
    fn uses_in_code_not_in_strings_comments_or_definitions() {
        let eval = [Forbidden::Name("eval".into())];
        assert_eq!(violations("def f(s):\n    return eval(s)\n", &eval), eval);
        assert_eq!(
            violations("import builtins\nf = builtins.eval\n", &eval),
            eval
        );
        for clean in [
            "def f(s):\n    \"\"\"Do not eval(s).\"\"\"\n    return int(s)  # no eval here\n",
            "def eval(s):\n    return 1\n",
            "x = 'eval(1)'\ny = \"it's eval\"\n",
            "def evaluate(s):\n    return s\n",
        ] {
            assert_eq!(violations(clean, &eval), Vec::new(), "{clean}");
        }
        let re = [Forbidden::Module("re".into())];
        assert_eq!(violations("import re\n", &re), re);
        assert_eq!(violations("from re import sub\n", &re), re);
        assert_eq!(violations("import os, re.sub as s\n", &re), re);
        assert_eq!(violations("import os, sys\nx = re\n", &re), Vec::new());
    }

    #[test]
    fn prop_any_text_reads_without_panic() {
        use proptest::prelude::*;
        let config = ProptestConfig::with_cases(crate::proptest_cases());
        proptest!(config, |(task in "(do not use |without using |import |`|\\(\\)|\\PC){0,40}", code in "\\PC{0,80}")| {
            let f = forbidden(&task);
            let _ = violations(&code, &f);
        });
    }
}
