//! Stage 10, the output collector: the subtasks' outputs with their relationships (which
//! subtask, what it depended on, the file it goes to, the tests that cover it), ready for
//! synthesis.

use serde::Serialize;
use serde_json::json;

use crate::job::JobContext;
use crate::planning::Dag;
use crate::retry::SubtaskResult;
use crate::stage::Stage;
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
    /// Subtasks whose tests cover this output.
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

pub fn collect(ctx: &JobContext, dag: &Dag, results: &[SubtaskResult]) -> Collected {
    let started = ctx.rec.elapsed_ms();
    let module = ctx.module_name();
    let tests: Vec<String> = results
        .iter()
        .filter(|r| r.spec.kind == WorkerKind::Tests && r.artifact.is_some())
        .map(|r| r.spec.id.clone())
        .collect();
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
            target: target_of(spec.kind, &module),
            covered_by: if spec.kind == WorkerKind::Code {
                tests.clone()
            } else {
                Vec::new()
            },
            passed: r.passed,
            artifact: a.clone(),
        });
    }
    ctx.rec.stage(
        Stage::Collector,
        None,
        started,
        json!({"results": results.iter().map(|r| json!({"subtask": r.spec.id, "passed": r.passed, "stopped": r.stopped})).collect::<Vec<_>>()}),
        json!({"outputs": c.outputs.iter().map(|o| json!({"subtask": o.subtask, "kind": o.kind, "target": o.target, "covered_by": o.covered_by, "passed": o.passed, "depends_on": o.depends_on})).collect::<Vec<_>>(), "missing": c.missing}),
    );
    ctx.rec.event(
        Stage::Collector,
        EventStatus::Finished,
        None,
        None,
        format!(
            "{} outputs ({} validated){}",
            c.outputs.len(),
            c.outputs.iter().filter(|o| o.passed).count(),
            if c.missing.is_empty() {
                String::new()
            } else {
                format!(", {} missing", c.missing.len())
            }
        ),
    );
    c
}
