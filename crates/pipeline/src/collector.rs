//! Stage 10, the output collector: the subtasks' outputs with their relationships (which
//! subtask, what it depended on, the file it goes to, the tests that cover it), ready for
//! synthesis.

use serde::Serialize;
use serde_json::{json, Value};

use crate::planning::{Dag, TaskSpec};
use crate::retry::SubtaskResult;
use crate::stage::StageOutput;
use crate::trace::EventStatus;
use crate::workers::{Artifact, WorkerKind};

#[derive(Clone, Debug, Serialize)]
pub struct CollectedOutput {
    pub subtask: String,
    pub kind: WorkerKind,
    pub primary: bool,
    pub depends_on: Vec<String>,
    /// Where it goes: a file of the result, or `report` for prose that only the report shows.
    pub target: String,
    /// Tests subtasks whose tests were run against this output (`covering_tests`).
    pub covered_by: Vec<String>,
    pub passed: bool,
    pub artifact: Artifact,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Collected {
    pub outputs: Vec<CollectedOutput>,
    /// Subtasks that produced nothing usable, with why.
    pub missing: Vec<(String, String)>,
}

impl Collected {
    pub fn of_kind(&self, kind: WorkerKind) -> impl Iterator<Item = &CollectedOutput> {
        self.outputs.iter().filter(move |o| o.kind == kind)
    }
}

pub fn target_of(kind: WorkerKind, module: &str) -> String {
    match kind {
        WorkerKind::Code => format!("{module}.py"),
        WorkerKind::Tests => format!("test_{module}.py"),
        WorkerKind::DataAnalysis => "analysis.py".into(),
        WorkerKind::Docs => "README.md".into(),
        WorkerKind::Reasoning | WorkerKind::Research => "report".into(),
    }
}

/// Of a subtask's finished dependencies, the tests subtasks whose tests its validation runs:
/// those that passed, when it is the primary code (generated tests run against it alone).
/// The dispatcher hands these to the validators, and the collector reports them as
/// `covered_by`, so the two cannot disagree.
pub fn covering_tests<'a>(
    spec: &TaskSpec,
    deps: impl IntoIterator<Item = &'a SubtaskResult>,
) -> Vec<&'a SubtaskResult> {
    if !(spec.primary && spec.kind == WorkerKind::Code) {
        return Vec::new();
    }
    deps.into_iter()
        .filter(|d| spec.depends_on.contains(&d.spec.id))
        .filter(|d| d.spec.kind == WorkerKind::Tests && d.passed)
        .filter(|d| d.artifact.as_ref().is_some_and(|a| a.code.is_some()))
        .collect()
}

/// The subtasks' outputs in DAG order, each with what it depended on, its target file and
/// the tests that covered it; the subtasks that produced nothing, with why.
pub fn collect(dag: &Dag, results: &[SubtaskResult], module: &str) -> Collected {
    let mut c = Collected::default();
    for r in results {
        let Some(a) = &r.artifact else {
            c.missing.push((r.spec.id.clone(), r.stopped.clone()));
            continue;
        };
        let spec = dag.get(&r.spec.id).unwrap_or(&r.spec);
        c.outputs.push(CollectedOutput {
            subtask: spec.id.clone(),
            kind: spec.kind,
            primary: spec.primary,
            depends_on: spec.depends_on.clone(),
            target: target_of(spec.kind, module),
            covered_by: covering_tests(spec, results)
                .into_iter()
                .map(|t| t.spec.id.clone())
                .collect(),
            passed: r.passed,
            artifact: a.clone(),
        });
    }
    c
}

/// The collector's input as the trace shows it.
pub fn trace_input(results: &[SubtaskResult]) -> Value {
    json!({"results": results.iter().map(|r| json!({"subtask": r.spec.id, "passed": r.passed, "stopped": r.stopped})).collect::<Vec<_>>()})
}

impl StageOutput for Collected {
    fn trace_output(&self) -> Value {
        json!({"outputs": self.outputs.iter().map(|o| json!({"subtask": o.subtask, "kind": o.kind, "target": o.target, "covered_by": o.covered_by, "passed": o.passed, "depends_on": o.depends_on})).collect::<Vec<_>>(), "missing": self.missing})
    }

    fn outcome(&self) -> (EventStatus, String) {
        let missing = if self.missing.is_empty() {
            String::new()
        } else {
            format!(", {} missing", self.missing.len())
        };
        (
            EventStatus::Finished,
            format!(
                "{} outputs ({} accepted by their checks){missing}",
                self.outputs.len(),
                self.outputs.iter().filter(|o| o.passed).count(),
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: &str, kind: WorkerKind, deps: &[&str], passed: bool) -> SubtaskResult {
        SubtaskResult {
            spec: TaskSpec {
                id: id.into(),
                kind,
                description: String::new(),
                depends_on: deps.iter().map(|d| d.to_string()).collect(),
                acceptance: vec![],
                primary: false,
                critical: false,
            },
            artifact: Some(Artifact {
                subtask: id.into(),
                kind,
                attempt: 0,
                candidate: 0,
                text: String::new(),
                code: Some("x = 1\n".into()),
                files: vec![],
            }),
            verdict: None,
            attempts: vec![],
            passed,
            stopped: String::new(),
            selection: None,
            log: vec![],
        }
    }

    #[test]
    fn an_output_is_covered_only_by_the_tests_run_against_it() {
        let results = vec![
            result("t_used", WorkerKind::Tests, &[], true),
            result("t_other", WorkerKind::Tests, &[], true),
            result("t_failed", WorkerKind::Tests, &[], false),
            result(
                "main",
                WorkerKind::Code,
                &["t_used", "t_failed", "helper"],
                true,
            ),
            result("helper", WorkerKind::Code, &["t_other"], true),
        ];
        let mut main = results[3].spec.clone();
        main.primary = true;
        let ids = |v: Vec<&SubtaskResult>| v.iter().map(|r| r.spec.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(covering_tests(&main, &results)), ["t_used"]);
        // Generated tests run against the primary code only.
        assert!(covering_tests(&results[4].spec, &results).is_empty());
    }
}
