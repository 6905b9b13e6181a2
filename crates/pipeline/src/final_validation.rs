//! Stages 12 and 13: the final validator runs the whole result in the sandbox (import, the
//! task's examples, supplied tests, generated tests, docstring examples) and asks the LLM
//! for a holistic verdict against the original task; on failure the synthesizer retries
//! with its feedback, a bounded number of times, keeping the best revision.

use serde_json::{json, Value};

use crate::job::JobContext;
use crate::orchestrator::main_kind;
use crate::planning::TaskSpec;
use crate::retry::SubtaskResult;
use crate::router::Route;
use crate::stage::{LlmStage, StageOutput};
use crate::synthesizer::{self, Synthesis};
use crate::trace::EventStatus;
use crate::validators::{self, CheckName, CheckResult, Evidence, Verdict, VerdictStatus};
use crate::workers::{Artifact, WorkerKind};
use crate::Result;

async fn check(ctx: &JobContext, route: &Route, s: &mut Synthesis, evidence: &Evidence) -> Verdict {
    let kind = main_kind(route.kind);
    let spec = TaskSpec {
        id: "final".into(),
        kind,
        description: "the whole result, against the original task".into(),
        depends_on: vec![],
        acceptance: vec![],
        primary: true,
        critical: true,
    };
    let code = match kind {
        WorkerKind::Code => s.module.clone(),
        WorkerKind::DataAnalysis => s.analysis.clone(),
        _ => None,
    };
    let artifact = Artifact {
        subtask: "final".into(),
        kind,
        attempt: s.revision,
        candidate: 0,
        text: s.answer.clone(),
        code,
        files: vec![],
    };
    let mut ev = evidence.clone();
    ev.generated = s.tests.iter().cloned().collect();
    let mut v =
        validators::validate_with(ctx, route, &spec, &artifact, &ev, LlmStage::FinalValidator)
            .await;
    // The candidates' agreement speaks for the first synthesis only (a repair is new code),
    // and not for code that fails the generated tests it is shipped with.
    let fails_generated = v
        .checks
        .iter()
        .any(|c| c.name == CheckName::GeneratedTests && !c.passed);
    if let (Some(a), 0, false) = (&evidence.agreement, s.revision, fails_generated) {
        v.add(a.clone());
        v = v.finish();
    }
    // Generated tests are dropped only when code that passed trusted checks fails them:
    // then the tests are the suspect. Without a trusted check nothing says which is wrong,
    // so they are shipped, with a note.
    let generated_failed = v
        .checks
        .iter()
        .any(|c| c.name == CheckName::GeneratedTests && !c.passed);
    if generated_failed && s.tests.is_some() {
        if v.status == VerdictStatus::Verified {
            s.tests = None;
            s.notes.push(
                "generated tests dropped: they fail code that passes the task's own checks".into(),
            );
        } else {
            s.notes.push(
                "the generated tests fail against the code, and nothing trusted says which of \
                 the two is wrong"
                    .into(),
            );
        }
    }
    v
}

/// The agreement selection found among the primary code's candidates, as evidence for the
/// final verdict: it passes when the chosen candidate's group is a clear majority and the
/// candidate passes the generated tests that group passes (`Selection::consistent`).
pub fn agreement(results: &[SubtaskResult]) -> Option<CheckResult> {
    let sel = results
        .iter()
        .find(|r| r.spec.primary && r.spec.kind == WorkerKind::Code)?
        .selection
        .as_ref()?;
    let best = sel.best_group()?;
    let tests = if sel.tests.is_empty() {
        String::new()
    } else {
        format!(
            "; the group passes {} of {} generated test(s)",
            best.tests_passed,
            sel.tests.len()
        )
    };
    let verdict = match (sel.clear_majority, sel.passes_majority_tests) {
        (true, true) => "a clear majority",
        (false, _) => "not a clear majority",
        (true, false) => "but the chosen one fails a generated test its group passes",
    };
    Some(CheckResult {
        name: CheckName::Agreement,
        passed: sel.consistent,
        hard: false,
        detail: format!(
            "{} of {} candidates that ran compute the same outputs on {} input(s){tests}: {verdict}",
            best.members.len(),
            sel.ran,
            sel.probes.len(),
        ),
        tests: None,
    })
}

/// A synthesis and the final validator's verdict on it.
pub struct Checked {
    pub synthesis: Synthesis,
    pub verdict: Verdict,
}

impl Checked {
    /// Better than `other`: a pass beats a failure, then the higher score.
    fn beats(&self, other: &Checked) -> bool {
        (self.verdict.passed, self.verdict.score) > (other.verdict.passed, other.verdict.score)
    }
}

impl StageOutput for Checked {
    fn trace_output(&self) -> Value {
        json!({"verdict": self.verdict})
    }

    fn outcome(&self) -> (EventStatus, String) {
        let v = &self.verdict;
        let msg = if v.passed {
            v.status.name().to_string()
        } else {
            format!(
                "{}: {}",
                v.status,
                v.feedback.lines().next().unwrap_or("a check failed")
            )
        };
        (EventStatus::of(v.passed), msg)
    }
}

/// The final validator on a synthesis.
pub async fn first_check(
    ctx: &JobContext,
    route: &Route,
    mut synthesis: Synthesis,
    evidence: &Evidence,
) -> Result<Checked> {
    let verdict = check(ctx, route, &mut synthesis, evidence).await;
    Ok(Checked { synthesis, verdict })
}

/// Why no re-synthesis is tried after the first check, if none is.
pub fn no_retry(first: &Checked, retries: usize) -> Option<&'static str> {
    if first.verdict.passed {
        Some("not needed")
    } else if retries == 0 {
        Some("no retries allowed")
    } else if first.synthesis.module.is_none() {
        Some("nothing to re-synthesize")
    } else {
        None
    }
}

/// One re-synthesis and its check.
pub struct Revision {
    /// None when the model answered without code.
    pub checked: Option<Checked>,
    /// It does better than the best revision before it, and replaces it.
    pub kept: bool,
}

impl StageOutput for Revision {
    fn trace_output(&self) -> Value {
        match &self.checked {
            Some(c) => json!({"synthesis": c.synthesis, "verdict": c.verdict, "kept": self.kept}),
            None => json!({"synthesis": null, "kept": false}),
        }
    }

    fn outcome(&self) -> (EventStatus, String) {
        let Some(c) = &self.checked else {
            return (
                EventStatus::Failed,
                "the model answered without code".into(),
            );
        };
        let passed = c.verdict.passed;
        let msg = format!(
            "{}{}",
            c.verdict.status,
            if self.kept {
                "; kept"
            } else {
                "; the previous revision stays"
            }
        );
        (EventStatus::of(passed), msg)
    }
}

/// Re-synthesizes the best revision with its feedback and checks the new one.
pub async fn retry(
    ctx: &JobContext,
    route: &Route,
    best: &Checked,
    evidence: &Evidence,
) -> Result<Revision> {
    let Some(mut next) =
        synthesizer::repair(ctx, route, &best.synthesis, &best.verdict.feedback).await?
    else {
        return Ok(Revision {
            checked: None,
            kept: false,
        });
    };
    let verdict = check(ctx, route, &mut next, evidence).await;
    let checked = Checked {
        synthesis: next,
        verdict,
    };
    let kept = checked.beats(best);
    Ok(Revision {
        checked: Some(checked),
        kept,
    })
}
