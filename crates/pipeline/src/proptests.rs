//! Property tests over what models write that the pipeline parses: plans (whole, cut off,
//! or any JSON at all), the DAG built from them, and reviews. Whatever the text, parsing
//! returns a value or nothing, never panics, and a DAG keeps its invariants. (Python
//! source scanning has its own in `python`.) `scripts/fuzz` runs each for a million cases.

use std::collections::HashSet;

use proptest::prelude::*;

use crate::orchestrator::{finished_subtasks, Plan, PlannedSubtask};
use crate::planning::build_dag;
use crate::router::route_by_rules;
use crate::task::TaskRequest;
use crate::validators::{cut_judgement, Judgement};
use crate::workers::WorkerKind;

/// JSON-shaped text: the plan's and the review's keys and delimiters, cut anywhere, with
/// arbitrary Unicode between.
fn jsonish() -> impl Strategy<Value = String> {
    let fixed = [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"",
        "\\",
        "\\\"",
        "\\u00e9",
        "\\ud800",
        "\"subtasks\"",
        "\"id\"",
        "\"kind\"",
        "\"code\"",
        "\"tests\"",
        "\"depends_on\"",
        "\"description\"",
        "\"acceptance\"",
        "\"pass\"",
        "true",
        "false",
        "null",
        "\"problems\"",
        "\"feedback\"",
        "1e999",
        "-0",
        " ",
        "\n",
        "≤",
        "➞",
    ];
    let piece = prop_oneof![
        prop::sample::select(fixed.to_vec()).prop_map(String::from),
        "\\PC{0,4}",
    ];
    prop::collection::vec(piece, 0..60).prop_map(|v| v.concat())
}

fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["impl", "tests", "a", "a_2", "", "x y", "≤", "impl "])
            .prop_map(String::from),
        "\\PC{0,6}",
    ]
}

fn subtask() -> impl Strategy<Value = PlannedSubtask> {
    let kinds: Vec<String> = WorkerKind::ALL
        .iter()
        .map(|k| k.name().to_string())
        .chain(["", "coder", "≤"].map(String::from))
        .collect();
    (
        id(),
        prop::sample::select(kinds),
        "\\PC{0,20}",
        prop::collection::vec(id(), 0..4),
        prop::collection::vec("\\PC{0,10}", 0..3),
    )
        .prop_map(
            |(id, kind, description, depends_on, acceptance)| PlannedSubtask {
                id,
                kind: kind.into(),
                description,
                depends_on,
                acceptance,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases()))]

    /// Any answer, whole or cut: parsing gives a plan or nothing, and a cut plan holds only
    /// subtasks that were finished.
    #[test]
    fn prop_plan_text_parses_or_not_without_panic(text in jsonish()) {
        let _ = serde_json::from_str::<Plan>(&text);
        if let Some(p) = finished_subtasks(&text) {
            prop_assert!(!p.subtasks.is_empty());
        }
    }

    /// Whatever plan a model sends, the DAG has unique ids, known dependencies that come
    /// before their dependants, at most `max` specs, and exactly one primary.
    #[test]
    fn prop_dag_keeps_its_invariants(
        subs in prop::collection::vec(subtask(), 0..10),
        max in 1usize..8,
        task in prop::sample::select(vec![
            "def f(x):\n    \"\"\"0 ≤ x\"\"\"\n",
            "Plot the data in a.csv",
            "Explain how dict works",
        ]),
    ) {
        let route = route_by_rules(&TaskRequest::new(task));
        let plan = Plan { subtasks: subs, fallback: None, cut: None };
        let dag = build_dag(&plan, &route, max);
        prop_assert!(!dag.specs.is_empty() && dag.specs.len() <= max.max(1));
        let mut seen = HashSet::new();
        for s in &dag.specs {
            for d in &s.depends_on {
                prop_assert!(seen.contains(d), "{} depends on {} which is not before it", s.id, d);
            }
            prop_assert!(seen.insert(s.id.clone()), "duplicate id {}", s.id);
        }
        prop_assert_eq!(dag.specs.iter().filter(|s| s.primary).count(), 1);
    }

    /// A review, whole or cut: a judgement or nothing, never a panic; a cut one keeps the
    /// verdict it began with.
    #[test]
    fn prop_review_text_parses_or_not_without_panic(text in jsonish()) {
        let _ = serde_json::from_str::<Judgement>(&text);
        if let Some(j) = cut_judgement(&text) {
            let head: String = text.chars().filter(|c| !c.is_whitespace()).take(12).collect();
            prop_assert_eq!(j.pass, head.starts_with("{\"pass\":true"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases()))]

    /// The router reads every task: rules, entry point, signature, examples and libraries
    /// from any text, stub-shaped or not.
    #[test]
    fn prop_router_rules_read_any_task(
        head in prop::sample::select(vec!["", "def f(x):\n    \"\"\"", "Fix this: ", "plot ", ">>> "]),
        body in "\\PC{0,200}",
        tail in prop::sample::select(vec!["", "\"\"\"\n", "\n>>> f(1)\n1\n", "`g(x)`"]),
    ) {
        let route = route_by_rules(&TaskRequest::new(format!("{head}{body}{tail}")));
        if let Some(e) = &route.entry_point {
            prop_assert!(!e.is_empty());
        }
    }
}
