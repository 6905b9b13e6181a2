//! Stages 12 and 13: the final validator runs the whole result in the sandbox (import, the
//! task's examples, supplied tests, generated tests, docstring examples) and asks the LLM
//! for a holistic verdict against the original task; on failure the synthesizer retries
//! with its feedback, a bounded number of times, keeping the best revision.

use serde_json::{json, Value};

use crate::job::JobContext;
use crate::orchestrator::main_kind;
use crate::planning::TaskSpec;
use crate::router::Route;
use crate::stage::{LlmStage, StageOutput};
use crate::synthesizer::{self, Synthesis};
use crate::trace::EventStatus;
use crate::validators::{self, CheckName, Evidence, Verdict};
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
    let v = validators::validate_with(ctx, route, &spec, &artifact, &ev, LlmStage::FinalValidator)
        .await;
    // Generated tests that fail code which passes the task's own checks are suspect: they
    // are not shipped.
    let generated_failed = v
        .checks
        .iter()
        .any(|c| c.name == CheckName::GeneratedTests && !c.passed);
    if v.passed && generated_failed && s.tests.take().is_some() {
        s.notes.push(
            "generated tests dropped: they fail code that passes the task's own checks".into(),
        );
    }
    v
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
            "passed".to_string()
        } else {
            v.feedback.lines().next().unwrap_or("failed").to_string()
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
            if passed { "passed" } else { "failed" },
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
