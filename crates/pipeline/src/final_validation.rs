//! Stages 12 and 13: the final validator runs the whole result in the sandbox (import, the
//! task's examples, supplied tests, generated tests, docstring examples) and asks the LLM
//! for a holistic verdict against the original task; on failure the synthesizer retries
//! with its feedback, a bounded number of times, keeping the best revision.

use serde_json::json;

use crate::job::JobContext;
use crate::orchestrator::main_kind;
use crate::planning::TaskSpec;
use crate::router::Route;
use crate::stage::{LlmStage, Stage};
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

/// Validates the synthesis, re-synthesizing on failure; returns the best revision.
pub async fn validate_and_retry(
    ctx: &JobContext,
    route: &Route,
    s: Synthesis,
    evidence: &Evidence,
) -> Result<(Synthesis, Verdict)> {
    let mut best = first_check(ctx, route, s, evidence).await;
    let retries = ctx.config().limits.max_synthesis_retries;
    if let Some(why) = no_retry(&best, retries) {
        ctx.rec.stage(
            Stage::SynthesizerRetry,
            None,
            ctx.rec.elapsed_ms(),
            json!({"max_retries": retries}),
            json!({"skipped": why}),
        );
        ctx.rec.event(
            Stage::SynthesizerRetry,
            EventStatus::Skipped,
            None,
            None,
            why,
        );
        return Ok(best);
    }
    for r in 0..retries {
        retry(ctx, route, &mut best, evidence, r + 1).await?;
        if best.1.passed {
            break;
        }
    }
    Ok(best)
}

/// The final validator on the first synthesis.
async fn first_check(
    ctx: &JobContext,
    route: &Route,
    mut s: Synthesis,
    evidence: &Evidence,
) -> (Synthesis, Verdict) {
    let started = ctx.rec.elapsed_ms();
    ctx.rec.event(
        Stage::FinalValidator,
        EventStatus::Started,
        None,
        None,
        "checking the whole result",
    );
    let v = check(ctx, route, &mut s, evidence).await;
    ctx.rec.stage(
        Stage::FinalValidator,
        None,
        started,
        json!({"revision": s.revision}),
        json!({"verdict": v}),
    );
    ctx.rec.event(
        Stage::FinalValidator,
        EventStatus::of(v.passed),
        None,
        Some(1),
        if v.passed {
            "passed".to_string()
        } else {
            v.feedback.lines().next().unwrap_or("failed").to_string()
        },
    );
    (s, v)
}

/// Why no re-synthesis is tried, if none is.
fn no_retry(first: &(Synthesis, Verdict), retries: usize) -> Option<&'static str> {
    if first.1.passed {
        Some("not needed")
    } else if retries == 0 {
        Some("no retries allowed")
    } else if first.0.module.is_none() {
        Some("nothing to re-synthesize")
    } else {
        None
    }
}

/// Re-synthesis number `n` from the best revision's feedback; kept if it does better.
async fn retry(
    ctx: &JobContext,
    route: &Route,
    best: &mut (Synthesis, Verdict),
    evidence: &Evidence,
    n: usize,
) -> Result<()> {
    let started = ctx.rec.elapsed_ms();
    ctx.rec.event(
        Stage::SynthesizerRetry,
        EventStatus::Started,
        None,
        Some(n),
        "re-synthesizing with the final feedback",
    );
    let Some(mut next) = synthesizer::repair(ctx, route, &best.0, &best.1.feedback).await? else {
        ctx.rec.event(
            Stage::SynthesizerRetry,
            EventStatus::Failed,
            None,
            Some(n),
            "the model answered without code",
        );
        return Ok(());
    };
    let v = check(ctx, route, &mut next, evidence).await;
    let improved = (v.passed, v.score) > (best.1.passed, best.1.score);
    ctx.rec.stage(
        Stage::SynthesizerRetry,
        None,
        started,
        json!({"feedback": best.1.feedback}),
        json!({"synthesis": next, "verdict": v, "kept": improved}),
    );
    ctx.rec.event(
        Stage::SynthesizerRetry,
        EventStatus::of(v.passed),
        None,
        Some(n),
        format!(
            "{}{}",
            if v.passed { "passed" } else { "failed" },
            if improved {
                "; kept"
            } else {
                "; the previous revision stays"
            }
        ),
    );
    if improved {
        *best = (next, v);
    }
    Ok(())
}
