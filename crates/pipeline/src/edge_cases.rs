//! The edge-case check: code that passed the task's own examples, run on inputs the
//! examples leave out. A task states two or three examples; code can pass them and still
//! crash on an empty string, or return an example's answer whatever it is given. Either
//! is execution's evidence against the code, so such a result is not called `verified`
//! (see `Verdict::status_from_checks`), and the retry manager keeps looking for a
//! candidate without it.
//!
//! The inputs are built from the signature's annotations: each `str`, list or dict
//! parameter empty in turn (the others ordinary), and the ordinary typed calls selection
//! uses. Only failures that say something are counted:
//! - a *crash*: an operation in the code failed (`xs[0]` on an empty list, a `None` used
//!   as a number). An exception the code raises itself (`raise ValueError(...)`, an
//!   `assert`) is a refusal of the input, which a task may want, and so is a `ValueError`
//!   from Python's own conversions (`int('abc')`: an ordinary value of a type may still be
//!   outside what the task allows); neither counts, nor does a call that ran out of time
//!   (a loaded machine can slow any call);
//! - a *hard-coded answer*: the same value for every ordinary input, which is one of the
//!   examples' answers and not a value a function often returns for many inputs (a bool,
//!   `None`, zero, an empty container).

use crate::python::{self, Example, Signature};
use crate::selection::{self, normalise_output, CRASHED};

/// Ordinary calls built from the signature (as selection builds them).
const ORDINARY: usize = selection::TYPED_PROBES;
/// Fewest ordinary calls with distinct inputs that can show an answer that ignores them.
const MIN_ORDINARY: usize = 3;
/// Crashes named in the detail.
const NAMED: usize = 3;

/// The calls the check makes, in order: the edge calls, the ordinary calls, then the
/// examples' answers (evaluated as literals, to compare with what the code returns).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EdgePlan {
    pub probes: Vec<String>,
    /// How many of `probes` are edge calls (the first ones).
    pub edge: usize,
    /// How many are ordinary calls (after the edge calls).
    pub ordinary: usize,
    /// The examples whose answers follow (their calls, for the detail).
    pub answered: Vec<String>,
}

/// A required parameter as the check fills it: its name when it must be named, an
/// ordinary value, and its empty values.
struct Param {
    keyword: Option<String>,
    ordinary: &'static str,
    empties: &'static [&'static str],
}

/// The empty values of an annotation's type (`str`, lists and sequences, dicts), if any.
fn empties_of(annotation: &str) -> Option<&'static [&'static str]> {
    let a = selection::plain_annotation(annotation);
    let head = a.split('[').next().unwrap_or(&a);
    let head = head.strip_prefix("typing.").unwrap_or(head);
    match head {
        "str" => Some(&["''", "' '"]),
        "list" | "List" | "Sequence" | "Iterable" => Some(&["[]"]),
        "dict" | "Dict" | "Mapping" => Some(&["{}"]),
        _ => None,
    }
}

/// The check's calls for `entry_point`, or None when its signature gives none: every
/// required parameter needs an annotation with ordinary values (`selection::values_of`),
/// and at least one must have an empty value or the ordinary calls must be enough to
/// show a hard-coded answer.
pub fn plan(entry_point: &str, signature: &Signature, examples: &[Example]) -> Option<EdgePlan> {
    let mut params: Vec<Param> = Vec::new();
    for p in python::parameters(signature) {
        if p.stars > 0 || p.default.is_some() {
            continue;
        }
        let annotation = p.annotation.as_deref()?;
        let ordinary = *selection::values_of(annotation)?.first()?;
        params.push(Param {
            keyword: p.keyword_only.then_some(p.name),
            ordinary,
            empties: empties_of(annotation).unwrap_or_default(),
        });
    }
    let call = |args: Vec<String>| format!("{entry_point}({})", args.join(", "));
    let arg = |kw: &Option<String>, v: &str| match kw {
        Some(name) => format!("{name}={v}"),
        None => v.to_string(),
    };
    let mut probes: Vec<String> = Vec::new();
    for (j, p) in params.iter().enumerate() {
        for empty in p.empties {
            let args = params
                .iter()
                .enumerate()
                .map(|(k, q)| arg(&q.keyword, if k == j { empty } else { q.ordinary }))
                .collect();
            let c = call(args);
            if !probes.contains(&c) {
                probes.push(c);
            }
        }
    }
    let edge = probes.len();
    for c in selection::typed_probes(entry_point, signature, ORDINARY) {
        if !probes.contains(&c) {
            probes.push(c);
        }
    }
    let ordinary = probes.len() - edge;
    if edge == 0 && ordinary < MIN_ORDINARY {
        return None;
    }
    let mut answered = Vec::new();
    for e in examples {
        let expected = e.expected.trim();
        if expected.is_empty() || expected.contains('\n') || e.call.contains('\n') {
            continue;
        }
        probes.push(expected.to_string());
        answered.push(e.call.trim().to_string());
    }
    Some(EdgePlan {
        probes,
        edge,
        ordinary,
        answered,
    })
}

/// Values a function returns for many inputs without ignoring them.
fn commonplace(output: &str) -> bool {
    matches!(
        output,
        "True" | "False" | "None" | "0" | "0.0" | "''" | "\"\"" | "[]" | "{}" | "()" | "set()"
    )
}

/// What the outputs of `plan`'s calls show: Ok with what ran, or Err with what is wrong.
pub fn assess(plan: &EdgePlan, outputs: &[String]) -> Result<String, String> {
    let out = |i: usize| outputs.get(i).map(String::as_str).unwrap_or_default();
    let crashes: Vec<String> = (0..plan.edge + plan.ordinary)
        .filter_map(|i| {
            let kind = out(i).strip_prefix(CRASHED)?;
            // Python's own refusal of a value (`int('')`): the input's fault, not a bug.
            (kind != "ValueError").then(|| format!("`{}` crashed with {kind}", plan.probes[i]))
        })
        .collect();
    if !crashes.is_empty() {
        let more = crashes.len().saturating_sub(NAMED);
        let mut detail = crashes
            .into_iter()
            .take(NAMED)
            .collect::<Vec<_>>()
            .join("; ");
        if more > 0 {
            detail.push_str(&format!("; and {more} more"));
        }
        return Err(format!(
            "{detail} (inputs the task's examples leave out; an exception the code raises itself would be a refusal, not a crash)"
        ));
    }
    let ordinary: Vec<String> = (plan.edge..plan.edge + plan.ordinary)
        .map(|i| normalise_output(out(i)))
        .collect();
    if ordinary.len() >= MIN_ORDINARY {
        let first = &ordinary[0];
        let constant = !selection::is_exception(first)
            && !commonplace(first)
            && ordinary.iter().all(|o| o == first);
        let start = plan.edge + plan.ordinary;
        let answer_of = (0..plan.answered.len()).find(|&k| {
            !selection::is_exception(out(start + k)) && normalise_output(out(start + k)) == *first
        });
        if let (true, Some(k)) = (constant, answer_of) {
            let calls = plan.probes[plan.edge..start].join(", ");
            return Err(format!(
                "returns {first}, the answer of the example `{}`, whatever its input: {calls}",
                plan.answered[k]
            ));
        }
    }
    Ok(format!(
        "no crash on {} empty input(s); the answer depends on the input over {} ordinary call(s)",
        plan.edge, plan.ordinary
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(text: &str) -> Signature {
        python::signatures(&format!("{text}\n    pass\n"))
            .into_iter()
            .next()
            .expect("a signature")
    }

    fn ex(call: &str, expected: &str) -> Example {
        Example {
            call: call.into(),
            expected: expected.into(),
        }
    }

    #[test]
    fn empty_values_of_each_container_parameter_in_turn() {
        let p = plan(
            "f",
            &sig("def f(text: str, items: list[int], n: int, *, flag: bool, k: int = 3) -> int:"),
            &[ex("f('ab', [1], 2, flag=True)", "7")],
        )
        .expect("a plan");
        assert_eq!(
            &p.probes[..p.edge],
            [
                "f('', [3, 1, 2], 3, flag=True)",
                "f(' ', [3, 1, 2], 3, flag=True)",
                "f('abc', [], 3, flag=True)",
            ]
        );
        assert!(p.ordinary >= MIN_ORDINARY, "{p:?}");
        assert_eq!(p.probes.last().map(String::as_str), Some("7"));
        assert_eq!(p.answered, ["f('ab', [1], 2, flag=True)"]);
        // Optional and typing's spellings have empties too; ints do not.
        let p = plan(
            "g",
            &sig("def g(d: Optional[Dict[str, int]], s: typing.List[str]):"),
            &[],
        )
        .unwrap();
        assert_eq!(
            &p.probes[..p.edge],
            ["g({}, ['abc', 'de'])", "g({'a': 1, 'b': 2}, [])"]
        );
        let p = plan("h", &sig("def h(a: int, b: int) -> int:"), &[]).unwrap();
        assert_eq!(p.edge, 0);
    }

    #[test]
    fn no_plan_without_annotated_values() {
        assert_eq!(plan("f", &sig("def f(x):"), &[]), None);
        assert_eq!(plan("f", &sig("def f(x: Widget, s: str):"), &[]), None);
        // Nothing empty, and too few distinct ordinary calls to show anything.
        assert_eq!(plan("f", &sig("def f(b: bool):"), &[]), None);
    }

    fn outputs(p: &EdgePlan, edge: &[&str], ordinary: &[&str], answers: &[&str]) -> Vec<String> {
        assert_eq!(
            (edge.len(), ordinary.len(), answers.len()),
            (p.edge, p.ordinary, p.answered.len())
        );
        edge.iter()
            .chain(ordinary)
            .chain(answers)
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn a_crash_on_an_empty_input_is_named_and_a_refusal_is_not() {
        let p = plan(
            "f",
            &sig("def f(s: str) -> str:"),
            &[ex("f('swiss')", "'s'")],
        )
        .unwrap();
        let ord = ["'c'", "'d'", "'r'", "'a'", "'i'"];
        let err = assess(
            &p,
            &outputs(&p, &["crash:IndexError", "' '"], &ord, &["'s'"]),
        )
        .unwrap_err();
        assert!(err.starts_with("`f('')` crashed with IndexError"), "{err}");
        // The code's own raise, a call that ran out of time and Python's refusal of a
        // value are not counted; a crash on an ordinary value is.
        let ok = assess(
            &p,
            &outputs(&p, &["raise:ValueError", "raise:Timeout"], &ord, &["'s'"]),
        );
        assert!(ok.is_ok(), "{ok:?}");
        let ok = assess(
            &p,
            &outputs(&p, &["crash:ValueError", "''"], &ord, &["'s'"]),
        );
        assert!(ok.is_ok(), "{ok:?}");
        let ord_crash = ["crash:KeyError", "'d'", "'r'", "'a'", "'i'"];
        let err = assess(&p, &outputs(&p, &["''", "''"], &ord_crash, &["'s'"])).unwrap_err();
        assert!(err.starts_with("`f('abc')` crashed with KeyError"), "{err}");
    }

    #[test]
    fn an_examples_answer_for_every_input_is_hard_coded() {
        let p = plan(
            "rle",
            &sig("def rle(s: str) -> str:"),
            &[ex("rle('aaabcc')", "\"a3b1c2\"")],
        )
        .unwrap();
        let same = ["'a3b1c2'"; 5];
        let err = assess(
            &p,
            &outputs(&p, &["'a3b1c2'", "'a3b1c2'"], &same, &["'a3b1c2'"]),
        )
        .unwrap_err();
        assert!(
            err.contains("the answer of the example `rle('aaabcc')`"),
            "{err}"
        );
        // A value that is no example's answer, a commonplace one, or one that varies: fine.
        assert!(assess(&p, &outputs(&p, &["''", "''"], &["'x'"; 5], &["'a3b1c2'"])).is_ok());
        let p2 = plan(
            "pal",
            &sig("def pal(s: str) -> bool:"),
            &[ex("pal('ab')", "False")],
        )
        .unwrap();
        assert!(assess(
            &p2,
            &outputs(&p2, &["True", "True"], &["False"; 5], &["False"])
        )
        .is_ok());
        let varied = ["'a1b1c1'", "'h1e1'", "'r1a1'", "'a1'", "'M1i1'"];
        assert!(assess(&p, &outputs(&p, &["''", "''"], &varied, &["'a3b1c2'"])).is_ok());
    }

    #[test]
    fn prop_assessing_any_outputs_never_panics() {
        use proptest::prelude::*;
        let config = ProptestConfig::with_cases(crate::proptest_cases());
        let p = plan(
            "f",
            &sig("def f(s: str, xs: list[int]) -> int:"),
            &[ex("f('a', [1])", "1")],
        )
        .unwrap();
        proptest!(config, |(outs in proptest::collection::vec("\\PC{0,20}", 0..12))| {
            let _ = assess(&p, &outs);
        });
    }
}
