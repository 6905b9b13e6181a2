//! Stage 1, the task router: what kind of task this is, and what is known about it. Rules
//! decide when they are clear; an LLM classifier (JSON constrained to the route names)
//! decides when they are not, with the rules' best guess as the fallback.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::job::{JobContext, LlmCall};
use crate::prose_examples;
use crate::python::{self, Example, Signature};
use crate::stage::{LlmStage, StageOutput};
use crate::task::TaskRequest;
use crate::trace::EventStatus;
use crate::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    NewFunction,
    ModuleOrScript,
    DataAnalysis,
    FixOrRefactor,
    ExplainOrResearch,
}

impl RouteKind {
    pub const ALL: [RouteKind; 5] = [
        RouteKind::NewFunction,
        RouteKind::ModuleOrScript,
        RouteKind::DataAnalysis,
        RouteKind::FixOrRefactor,
        RouteKind::ExplainOrResearch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RouteKind::NewFunction => "new_function",
            RouteKind::ModuleOrScript => "module_or_script",
            RouteKind::DataAnalysis => "data_analysis",
            RouteKind::FixOrRefactor => "fix_or_refactor",
            RouteKind::ExplainOrResearch => "explain_or_research",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// What decided a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecidedBy {
    Rules,
    Llm,
    /// The LLM was asked but its answer was unusable: the rules' best guess stands.
    RulesFallback,
}

impl DecidedBy {
    pub fn name(self) -> &'static str {
        match self {
            DecidedBy::Rules => "rules",
            DecidedBy::Llm => "llm",
            DecidedBy::RulesFallback => "rules_fallback",
        }
    }
}

/// The router's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub kind: RouteKind,
    pub decided_by: DecidedBy,
    /// The function the result must define, when known.
    pub entry_point: Option<String>,
    pub signature: Option<Signature>,
    /// The code given in the task itself (a signature with its docstring), if any.
    pub stub: Option<String>,
    pub tests_supplied: bool,
    pub libraries: Vec<String>,
    /// The task's own examples: `>>>` lines, and calls with their results stated in prose.
    pub examples: Vec<Example>,
    /// The rules' score per route, for the trace.
    pub scores: Vec<(RouteKind, u32)>,
}

/// Libraries the router recognises by name in a task's prose.
const KNOWN_LIBRARIES: &[&str] = &[
    "pandas",
    "numpy",
    "matplotlib",
    "scipy",
    "collections",
    "itertools",
    "functools",
    "datetime",
    "json",
    "csv",
    "re",
    "math",
    "statistics",
    "pathlib",
    "argparse",
    "sqlite3",
    "heapq",
    "bisect",
    "typing",
    "dataclasses",
    "random",
    "string",
    "decimal",
    "fractions",
    "unittest",
    "asyncio",
];

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '_')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// The code part of a task: from the first top-level `def`/`import`/`from`/`class` line on,
/// when the task contains one.
fn stub_of(task: &str) -> Option<String> {
    let mut start = None;
    let mut offset = 0;
    for line in task.split_inclusive('\n') {
        if line.starts_with("def ")
            || line.starts_with("from ")
            || line.starts_with("import ")
            || line.starts_with("class ")
            || line.starts_with("async def ")
        {
            start = Some(offset);
            break;
        }
        offset += line.len();
    }
    let code = &task[start?..];
    python::signature_of(code).map(|_| code.to_string())
}

/// The rules' view of a task.
pub fn route_by_rules(task: &TaskRequest) -> Route {
    let text = &task.task;
    let w = words(text);
    let stub = stub_of(text);
    let scores = rule_scores(&w, stub.is_some(), !task.files.is_empty());
    let mut ranked = scores.clone();
    ranked.sort_by_key(|r| std::cmp::Reverse(r.1));
    let signature = stub.as_deref().and_then(python::signature_of);
    let entry_point = task
        .entry_point
        .clone()
        .or_else(|| signature.as_ref().map(|s| s.name.clone()))
        .or_else(|| named_function(text));
    // The `>>>` examples, then those stated in prose (`add(2, 3) returns 5`).
    let mut examples = python::examples(text);
    if let Some(entry) = &entry_point {
        for e in prose_examples::stated_examples(text, entry) {
            if !examples.iter().any(|x| x.call == e.call) {
                examples.push(e);
            }
        }
    }
    Route {
        kind: ranked[0].0,
        decided_by: DecidedBy::Rules,
        entry_point,
        signature,
        examples,
        stub,
        tests_supplied: task.tests.is_some(),
        libraries: libraries_of(task, &w),
        scores,
    }
}

/// Each route's score from the task's words, whether it holds a stub, and whether it came
/// with code files.
fn rule_scores(w: &[String], has_stub: bool, context_code: bool) -> Vec<(RouteKind, u32)> {
    let has = |ws: &[&str]| ws.iter().filter(|x| w.iter().any(|y| y == *x)).count() as u32;
    let mut scores = vec![
        (RouteKind::NewFunction, 0u32),
        (RouteKind::ModuleOrScript, 0),
        (RouteKind::DataAnalysis, 0),
        (RouteKind::FixOrRefactor, 0),
        (RouteKind::ExplainOrResearch, 0),
    ];
    let mut add = |k: RouteKind, n: u32| {
        if let Some(s) = scores.iter_mut().find(|(r, _)| *r == k) {
            s.1 += n;
        }
    };
    if has_stub {
        add(RouteKind::NewFunction, 3);
    }
    add(
        RouteKind::NewFunction,
        2 * has(&["function", "def", "implement", "return", "returns"]).min(2),
    );
    add(
        RouteKind::ModuleOrScript,
        2 * has(&[
            "script", "module", "class", "program", "cli", "command", "tool", "package", "app",
        ])
        .min(2),
    );
    add(
        RouteKind::DataAnalysis,
        2 * has(&[
            "pandas",
            "dataframe",
            "plot",
            "chart",
            "histogram",
            "matplotlib",
            "visualize",
            "visualise",
            "statistics",
            "analyze",
            "analyse",
            "analysis",
            "dataset",
        ])
        .min(3),
    );
    let fix = has(&[
        "fix", "bug", "broken", "refactor", "debug", "wrong", "failing", "error",
    ]);
    add(
        RouteKind::FixOrRefactor,
        if context_code {
            3 * fix.min(2)
        } else {
            fix.min(2)
        },
    );
    let asks_code = has(&["write", "implement", "create", "build", "generate", "code"]) > 0;
    let explain = has(&[
        "explain",
        "why",
        "what",
        "how",
        "research",
        "compare",
        "difference",
    ]);
    add(
        RouteKind::ExplainOrResearch,
        if asks_code {
            explain.min(1)
        } else {
            2 * explain.min(2)
        },
    );

    scores
}

/// Libraries the task names in prose, or imports in its text or files.
fn libraries_of(task: &TaskRequest, w: &[String]) -> Vec<String> {
    let mut libraries: Vec<String> = KNOWN_LIBRARIES
        .iter()
        .filter(|l| w.iter().any(|x| x == *l))
        .map(|l| l.to_string())
        .collect();
    for source in
        std::iter::once(task.task.as_str()).chain(task.files.iter().map(|f| f.content.as_str()))
    {
        for imp in python::imports(source) {
            if let Some(name) = imp
                .strip_prefix("import ")
                .or_else(|| imp.strip_prefix("from "))
                .and_then(|r| r.split([' ', '.', ',']).next())
            {
                if !libraries.iter().any(|l| l == name) {
                    libraries.push(name.to_string());
                }
            }
        }
    }
    libraries
}

/// A function named in prose: "a function `name`", "called name", "def name(".
fn named_function(text: &str) -> Option<String> {
    let ident = |s: &str| -> Option<String> {
        let n: String = s
            .trim_start_matches(['`', '\'', '"'])
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        (!n.is_empty() && !n.chars().next().is_some_and(|c| c.is_ascii_digit())).then_some(n)
    };
    for pat in [
        "def ",
        "function `",
        "function called ",
        "function named ",
        "called `",
        "named `",
    ] {
        if let Some(i) = text.find(pat) {
            if let Some(n) = ident(&text[i + pat.len()..]) {
                return Some(n);
            }
        }
    }
    // `function add(a, b)`: a name right before its parameters.
    for (i, _) in text.match_indices("function ") {
        let rest = &text[i + "function ".len()..];
        if let Some(n) = ident(rest) {
            if rest[n.len()..].starts_with('(') && !rest.starts_with(['`', '\'', '"']) {
                return Some(n);
            }
        }
    }
    None
}

/// Whether the rules are clear: a winner at least two points ahead.
fn rules_are_clear(route: &Route) -> bool {
    let mut s: Vec<u32> = route.scores.iter().map(|(_, n)| *n).collect();
    s.sort_unstable_by(|a, b| b.cmp(a));
    s[0] >= 2 && s[0] >= s[1] + 2
}

#[derive(Deserialize)]
struct LlmRoute {
    route: String,
}

/// The router's output: the route, and the classifier's answer when the rules were unsure.
pub struct Routed {
    pub route: Route,
    pub llm_answer: Option<String>,
}

impl StageOutput for Routed {
    fn trace_output(&self) -> Value {
        json!({"route": self.route, "llm_answer": self.llm_answer})
    }

    fn outcome(&self) -> (EventStatus, String) {
        let r = &self.route;
        let entry = r
            .entry_point
            .as_ref()
            .map(|e| format!(", entry point `{e}`"))
            .unwrap_or_default();
        (
            EventStatus::Finished,
            format!("{} (by {}){entry}", r.kind.name(), r.decided_by.name()),
        )
    }
}

/// Routes a task: rules first, the LLM when they are unsure.
pub async fn route(ctx: &JobContext, task: &TaskRequest) -> Result<Routed> {
    let mut route = route_by_rules(task);
    if rules_are_clear(&route) {
        return Ok(Routed {
            route,
            llm_answer: None,
        });
    }
    let names: Vec<&str> = RouteKind::ALL.iter().map(|k| k.name()).collect();
    let schema = json!({
        "type": "object",
        "properties": {"route": {"enum": names}},
        "required": ["route"],
        "additionalProperties": false
    });
    let prompt = ctx.prompts().render(
        LlmStage::Router,
        json!({"task": task.task, "routes": names, "files": task.file_names()}),
    )?;
    let out = ctx
        .llm(LlmCall::new(LlmStage::Router, prompt).schema(schema))
        .await?;
    match serde_json::from_str::<LlmRoute>(&out.text)
        .ok()
        .and_then(|r| RouteKind::from_name(&r.route))
    {
        Some(k) => {
            route.kind = k;
            route.decided_by = DecidedBy::Llm;
        }
        None => route.decided_by = DecidedBy::RulesFallback,
    }
    Ok(Routed {
        route,
        llm_answer: Some(out.text),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_named_before_its_parameters_is_the_entry_point() {
        assert_eq!(
            named_function("Write a Python function add(a, b) that returns a + b."),
            Some("add".into())
        );
        assert_eq!(
            named_function("Write a function that returns (a, b)."),
            None
        );
        let r = route_by_rules(&TaskRequest::new(
            "Write a function add(a, b). For example, add(2, 3) returns 5.",
        ));
        assert_eq!(r.entry_point.as_deref(), Some("add"));
        assert_eq!(r.examples.len(), 1);
        assert_eq!(r.examples[0].expected, "5");
    }
    use crate::task::ContextFile;

    fn task(text: &str) -> TaskRequest {
        TaskRequest::new(text)
    }

    #[test]
    fn a_stub_is_a_new_function_with_its_signature_and_examples() {
        let r = route_by_rules(&task(
            "from typing import List\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\n    >>> total([1, 2])\n    3\n    \"\"\"\n",
        ));
        assert_eq!(r.kind, RouteKind::NewFunction);
        assert!(rules_are_clear(&r));
        assert_eq!(r.entry_point.as_deref(), Some("total"));
        assert_eq!(r.signature.unwrap().params, vec!["xs"]);
        assert_eq!(r.examples.len(), 1);
        assert!(r.stub.unwrap().starts_with("from typing"));
        assert_eq!(r.libraries, vec!["typing"]);
    }

    #[test]
    fn prose_routes() {
        let r = route_by_rules(&task(
            "Load sales.csv with pandas and plot a histogram of prices",
        ));
        assert_eq!(r.kind, RouteKind::DataAnalysis);
        assert!(r.libraries.contains(&"pandas".to_string()));

        let mut t = task("Fix the bug in this code: it crashes on empty input");
        t.files
            .push(ContextFile::new("app.py", "def f(x):\n    return x[0]\n"));
        assert_eq!(route_by_rules(&t).kind, RouteKind::FixOrRefactor);

        let r = route_by_rules(&task(
            "Write a function called `slugify` that returns a URL slug",
        ));
        assert_eq!(r.kind, RouteKind::NewFunction);
        assert_eq!(r.entry_point.as_deref(), Some("slugify"));

        let r = route_by_rules(&task("Explain why dictionaries are fast"));
        assert_eq!(r.kind, RouteKind::ExplainOrResearch);
    }

    #[test]
    fn unclear_tasks_go_to_the_llm() {
        let r = route_by_rules(&task("tic tac toe"));
        assert!(!rules_are_clear(&r));
    }
}
