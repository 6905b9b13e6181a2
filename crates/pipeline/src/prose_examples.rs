//! Examples a task states in its prose rather than as `>>>` lines: `add(2, 3) returns 5`,
//! `` `add(2, 3)` should return `5` ``, `add(2, 3) == 5`, `add(2, 3) ➞ 5`. They are the
//! task's own examples (trusted checks), so they are read strictly: the call must be of the
//! entry point with literal arguments, and the result a Python literal. Anything looser
//! (`add(a, b) returns the sum`) is not an example.

use crate::python::Example;

/// Words and arrows that put a call and its result side by side, longest first.
const CONNECTORS: &[&str] = &[
    "should return",
    "must return",
    "will return",
    "evaluates to",
    "returns",
    "gives",
    "yields",
    "==",
    "->",
    "=>",
    "➞",
    "→",
    "⇒",
];

/// The examples of `entry`'s calls stated in `text`, in order, without repeats.
pub fn stated_examples(text: &str, entry: &str) -> Vec<Example> {
    let text = text.replace('`', "");
    let mut out: Vec<Example> = Vec::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find(entry) {
        let start = from + pos;
        from = start + entry.len();
        // A whole name: not the tail of a longer one (`my_add(`) or an attribute.
        let before = text[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
            continue;
        }
        let Some(call_end) = call_end(&text, from) else {
            continue;
        };
        let args = &text[from + 1..call_end - 1];
        if !is_literal_list(args) {
            continue;
        }
        let Some((expected, end)) = result_after(&text, call_end) else {
            continue;
        };
        from = end;
        let call = format!("{entry}({})", args.trim());
        if !out.iter().any(|e| e.call == call) {
            out.push(Example { call, expected });
        }
    }
    out
}

/// Where the call whose `(` is at `open` ends (just past its `)`), with brackets balanced
/// and strings skipped; None if it is not a call or never closes on the line.
fn call_end(text: &str, open: usize) -> Option<usize> {
    if !text[open..].starts_with('(') {
        return None;
    }
    literal_end(text, open)
}

/// The end of the bracketed or quoted literal that starts at `start` (brackets matched by
/// kind, strings skipped, all on one line).
fn literal_end(text: &str, start: usize) -> Option<usize> {
    let mut open: Vec<char> = Vec::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in text[start..].char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
                if open.is_empty() {
                    return Some(start + i + c.len_utf8());
                }
            } else if c == '\n' {
                return None;
            }
            continue;
        }
        match c {
            '\'' | '"' => quote = Some(c),
            '(' => open.push(')'),
            '[' => open.push(']'),
            '{' => open.push('}'),
            ')' | ']' | '}' => {
                if open.pop() != Some(c) {
                    return None;
                }
                if open.is_empty() {
                    return Some(start + i + 1);
                }
            }
            '\n' => return None,
            _ => {}
        }
    }
    None
}

/// After a call: optional spaces, a connector, spaces, then a literal. The literal's text
/// and where it ends.
fn result_after(text: &str, call_end: usize) -> Option<(String, usize)> {
    let rest = &text[call_end..];
    let trimmed = rest.trim_start_matches([' ', '\t']);
    let skipped = rest.len() - trimmed.len();
    let conn = CONNECTORS.iter().find(|c| trimmed.starts_with(**c))?;
    let after = &trimmed[conn.len()..];
    let value = after.trim_start_matches([' ', '\t', ':']);
    let value_start = call_end + skipped + conn.len() + (after.len() - value.len());
    let end = value_start + literal_len(value)?;
    let literal = text[value_start..end].trim().to_string();
    Some((literal, end))
}

/// The length of the Python literal at the start of `s`: a number, a string, `True`,
/// `False`, `None`, or a bracketed literal of those.
fn literal_len(s: &str) -> Option<usize> {
    let first = s.chars().next()?;
    let n = match first {
        '\'' | '"' => literal_end(s, 0)?,
        '[' | '(' | '{' => {
            let end = literal_end(s, 0)?;
            is_literal_list(&s[1..end - 1]).then_some(end)?
        }
        _ => {
            for word in ["True", "False", "None"] {
                if s.starts_with(word) && !continues_name(&s[word.len()..]) {
                    return Some(word.len());
                }
            }
            number_len(s)?
        }
    };
    Some(n)
}

fn continues_name(rest: &str) -> bool {
    rest.chars()
        .next()
        .is_some_and(|c| c.is_alphanumeric() || c == '_')
}

/// `-12`, `3.5`, `1e-3`; a trailing `.` ends a sentence, not the number.
fn number_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let from = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > from
    };
    if !digits(&mut i) {
        return None;
    }
    let mut j = i;
    if b.get(j) == Some(&b'.') {
        j += 1;
        if digits(&mut j) {
            i = j;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut k = i + 1;
        if matches!(b.get(k), Some(b'-' | b'+')) {
            k += 1;
        }
        if digits(&mut k) {
            i = k;
        }
    }
    (!continues_name(&s[i..])).then_some(i)
}

/// Whether `s` is a comma-separated list of literals (a call's arguments, a list's items,
/// a dict's `key: value` pairs), keyword arguments allowed: nothing a name could stand in.
fn is_literal_list(s: &str) -> bool {
    let mut rest = s.trim();
    while !rest.is_empty() {
        // `key=value` in a call.
        if let Some(eq) = rest.find('=') {
            let name = &rest[..eq];
            if !name.is_empty()
                && name.trim().chars().all(|c| c.is_alphanumeric() || c == '_')
                && !rest[eq..].starts_with("==")
            {
                rest = rest[eq + 1..].trim_start();
            }
        }
        let Some(n) = literal_len(rest) else {
            return false;
        };
        rest = rest[n..].trim_start();
        match rest.chars().next() {
            None => break,
            Some(',' | ':') => rest = rest[1..].trim_start(),
            Some(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str, entry: &str) -> Vec<(String, String)> {
        stated_examples(text, entry)
            .into_iter()
            .map(|e| (e.call, e.expected))
            .collect()
    }

    #[test]
    fn examples_in_prose_are_read() {
        let t = "Write add(a, b). For example, add(2, 3) returns 5, and `add(-1, 1)` should return `0`.\n\
                 add(1.5, 2) == 3.5\nadd('a', 'b') ➞ 'ab'\nadd([1], [2]) -> [1, 2].";
        assert_eq!(
            pairs(t, "add"),
            [
                ("add(2, 3)", "5"),
                ("add(-1, 1)", "0"),
                ("add(1.5, 2)", "3.5"),
                ("add('a', 'b')", "'ab'"),
                ("add([1], [2])", "[1, 2]"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }

    #[test]
    fn prose_that_is_not_an_example_is_left_alone() {
        for t in [
            "add(a, b) returns the sum of a and b.",
            "add(2, 3) is 5",
            "my_add(2, 3) returns 5",
            "x.add(2, 3) returns 5",
            "add(2, 3) returns five",
            "add(2, 3) returns 5x",
            "add(len(x), 3) returns 5",
            "add(2, 3 returns 5",
            "add(\"a) returns 5",
            "add(2, 3) returns [1, x]",
            "add(2, 3) returns",
            "add(1]) returns 5",
        ] {
            assert!(pairs(t, "add").is_empty(), "{t}: {:?}", pairs(t, "add"));
        }
    }

    #[test]
    fn literals_keep_their_own_brackets_and_strings() {
        let t = "f('a, b)') returns {'k': (1, 2), \"v\": None} and f(x=1) gives True.";
        assert_eq!(
            pairs(t, "f"),
            [
                ("f('a, b)')", "{'k': (1, 2), \"v\": None}"),
                ("f(x=1)", "True"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }

    #[test]
    fn prop_stated_examples_never_panic() {
        use proptest::prelude::*;
        let config = ProptestConfig::with_cases(crate::proptest_cases());
        proptest!(config, |(s in "\\PC{0,80}", tail in "[(),'\"\\[\\]{}=:➞ 0-9a-z.-]{0,40}")| {
            let _ = stated_examples(&s, "f");
            let _ = stated_examples(&format!("f({tail}"), "f");
            let _ = stated_examples(&format!("f(1) returns {tail}"), "f");
        });
    }
}
