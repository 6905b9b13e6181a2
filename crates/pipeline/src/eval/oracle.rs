//! The oracle: what a job wrote for its main result (read from its trace), run against the
//! hidden test after the job has ended; and the summaries of pass@1 by verdict and of the
//! oracle's reach.

use std::collections::{BTreeMap, HashSet};

use forgeline_sandbox::Sandbox;
use tokio::sync::Semaphore;

use super::{
    program_from_answer, program_from_code, score, EvalTask, OracleSummary, StatusPass, TaskScore,
};
use crate::planning::TaskSpec;
use crate::stage::Stage;
use crate::trace::StageRecord;
use crate::verdict::VerdictStatus;
use crate::workers::WorkerKind;

/// What a pipeline job wrote for its main result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobCandidates {
    /// Candidates the primary code subtask's worker wrote, over all its attempts.
    pub written: usize,
    /// The distinct programs among them, as scored (`program_from_code`), in the order
    /// written, then each synthesis's module (the first and every revision), then the
    /// final module.
    pub programs: Vec<String>,
}

/// The programs a job wrote for its main result, read from its trace's stage records:
/// worker records (`output.candidates`, serialized `workers::Artifact`s) of the primary
/// code subtask (named by `specs`, the job's subtasks: the trace's `dag.specs`, which its
/// `subtasks` results hold; by the records' own `input.spec` when there are none, as in a
/// failed job's trace; every code subtask when none is primary), the synthesizer's and
/// each synthesizer retry's module (`output.synthesis.module`), and `final_module`.
pub fn job_candidates(
    t: &EvalTask,
    stages: &[StageRecord],
    specs: &[TaskSpec],
    final_module: Option<&str>,
) -> JobCandidates {
    let primary = primary_code_subtasks(stages, specs);
    let mut out = JobCandidates::default();
    let mut seen = HashSet::new();
    let mut add = |out: &mut JobCandidates, program: String| {
        if !program.trim().is_empty() && seen.insert(program.clone()) {
            out.programs.push(program);
        }
    };
    for r in stages {
        match r.stage {
            Stage::Worker => {
                let Some(candidates) = r.output["candidates"].as_array() else {
                    continue;
                };
                for c in candidates {
                    let subtask = c["subtask"].as_str().or(r.subtask.as_deref());
                    if c["kind"] != WorkerKind::Code.name()
                        || !subtask.is_some_and(|s| primary.contains(s))
                    {
                        continue;
                    }
                    out.written += 1;
                    let program = match c["code"].as_str() {
                        Some(code) if !code.trim().is_empty() => program_from_code(t, code),
                        _ => program_from_answer(t, c["text"].as_str().unwrap_or_default()),
                    };
                    add(&mut out, program);
                }
            }
            Stage::Synthesizer | Stage::SynthesizerRetry => {
                if let Some(m) = r.output["synthesis"]["module"].as_str() {
                    add(&mut out, m.to_string());
                }
            }
            _ => {}
        }
    }
    if let Some(m) = final_module {
        add(&mut out, m.to_string());
    }
    out
}

/// The ids of the primary code subtasks (every code subtask when none is primary).
fn primary_code_subtasks(stages: &[StageRecord], specs: &[TaskSpec]) -> HashSet<String> {
    let specs: Vec<(String, bool, String)> = if specs.is_empty() {
        stages
            .iter()
            .filter(|r| r.stage == Stage::Worker)
            .filter_map(|r| {
                let s = &r.input["spec"];
                Some((
                    s["id"].as_str()?.to_string(),
                    s["primary"].as_bool().unwrap_or(false),
                    s["kind"].as_str()?.to_string(),
                ))
            })
            .collect()
    } else {
        specs
            .iter()
            .map(|s| (s.id.clone(), s.primary, s.kind.name().into()))
            .collect()
    };
    let code = |k: &str| k == WorkerKind::Code.name();
    let primary: HashSet<String> = specs
        .iter()
        .filter(|(_, p, k)| *p && code(k))
        .map(|(id, ..)| id.clone())
        .collect();
    if !primary.is_empty() {
        return primary;
    }
    specs
        .into_iter()
        .filter(|(_, _, k)| code(k))
        .map(|(id, ..)| id)
        .collect()
}

/// Pass@1 by verdict status: every status, and `none` when some job gave none.
pub fn pass_by_verdict(per_task: &[TaskScore]) -> BTreeMap<String, StatusPass> {
    let mut m: BTreeMap<String, StatusPass> = VerdictStatus::ALL
        .iter()
        .map(|s| (s.name().to_string(), StatusPass::default()))
        .collect();
    for t in per_task {
        let e = m
            .entry(t.verdict_status.map_or("none", VerdictStatus::name).into())
            .or_default();
        e.tasks += 1;
        e.passed += usize::from(t.passed);
        e.oracle_passed += usize::from(t.oracle_pass == Some(true));
    }
    for e in m.values_mut() {
        e.pass_at_1 = (e.tasks > 0).then(|| e.passed as f64 / e.tasks as f64);
    }
    m
}

/// The oracle's figures, None when it ran for no task. A task it did not run for (its
/// method failed) counts as out of reach.
pub fn oracle_summary(per_task: &[TaskScore]) -> Option<OracleSummary> {
    if per_task.iter().all(|t| t.oracle_pass.is_none()) {
        return None;
    }
    let n = per_task.len().max(1) as f64;
    let reach = per_task
        .iter()
        .filter(|t| t.oracle_pass == Some(true))
        .count();
    let passed = per_task.iter().filter(|t| t.passed).count();
    Some(OracleSummary {
        oracle_passed: reach,
        oracle_pass_at_k: reach as f64 / n,
        selection_efficiency: (reach > 0).then(|| passed as f64 / reach as f64),
    })
}

/// The distinct non-empty texts, in order.
pub(super) fn distinct(texts: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    texts
        .iter()
        .filter(|p| !p.trim().is_empty() && seen.insert(p.as_str()))
        .cloned()
        .collect()
}

/// Runs the hidden test against each program, at most `permits` at once across the run;
/// `known` is one program's result already in hand. Returns each program's result.
pub(super) async fn run_oracle(
    sandbox: &Sandbox,
    t: &EvalTask,
    programs: &[String],
    known: Option<(&str, bool)>,
    permits: &Semaphore,
) -> Vec<bool> {
    let runs = programs.iter().map(|p| async move {
        if let Some((k, passed)) = known {
            if k == p {
                return passed;
            }
        }
        let _permit = permits.acquire().await.expect("never closed");
        score(sandbox, t, p).await.0
    });
    futures_util::future::join_all(runs).await
}
