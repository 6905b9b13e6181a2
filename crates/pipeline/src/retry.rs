//! Stage 9, the worker retry manager: runs a subtask's attempts. Each attempt's candidates
//! go through the validation queue; a failure becomes refined instructions (the error,
//! the failing test, the trimmed traceback, and the attempt itself) for the next attempt,
//! up to the retry limit. It stops early when an attempt is no better than the one before,
//! and always keeps the best attempt so far.

use std::sync::Arc;

use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc::unbounded_channel;

use crate::job::JobContext;
use crate::planning::TaskSpec;
use crate::router::Route;
use crate::stage::Stage;
use crate::trace::EventStatus;
use crate::validation::ValidationPriority;
use crate::validators::{self, Evidence, Verdict};
use crate::workers::{self, Artifact, Assignment, WorkerStats};

/// What a retry is told.
#[derive(Clone, Debug, Serialize)]
pub struct Feedback {
    /// The best previous output.
    pub previous: String,
    /// What was wrong with it.
    pub problems: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct AttemptRecord {
    pub attempt: usize,
    pub candidates: usize,
    pub validated: usize,
    pub best_score: f64,
    pub passed: bool,
    pub feedback: String,
}

/// A subtask's end: its best output and how it got there.
#[derive(Clone, Debug, Serialize)]
pub struct SubtaskResult {
    pub spec: TaskSpec,
    pub artifact: Option<Artifact>,
    pub verdict: Option<Verdict>,
    pub attempts: Vec<AttemptRecord>,
    pub passed: bool,
    /// Why it stopped.
    pub stopped: String,
}

/// Bounds on a subtask's attempts.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub max_retries: usize,
}

impl RetryPolicy {
    /// Whether another attempt is worth it after `attempt` scored `score` (the previous
    /// attempt `previous`).
    pub fn should_retry(
        &self,
        attempt: usize,
        score: f64,
        previous: Option<f64>,
    ) -> Result<(), String> {
        if attempt >= self.max_retries {
            return Err(format!(
                "retry limit reached ({} retries)",
                self.max_retries
            ));
        }
        if let Some(p) = previous {
            if score <= p {
                return Err(format!(
                    "attempt {} scored {score:.2}, no better than {p:.2}",
                    attempt + 1
                ));
            }
        }
        Ok(())
    }
}

/// Runs one subtask to its best output.
pub async fn run_subtask(
    ctx: &JobContext,
    stats: &WorkerStats,
    route: &Route,
    spec: &TaskSpec,
    deps: &[SubtaskResult],
    evidence: Arc<Evidence>,
) -> SubtaskResult {
    let policy = RetryPolicy {
        max_retries: ctx.config.limits.max_retries,
    };
    let mut best: Option<(Artifact, Verdict)> = None;
    let mut attempts = Vec::new();
    let mut feedback: Option<Feedback> = None;
    let mut previous: Option<f64> = None;
    let id = Some(spec.id.as_str());
    let stopped;
    let mut attempt = 0;
    loop {
        let started = ctx.rec.elapsed_ms();
        ctx.rec.event(
            Stage::Worker,
            EventStatus::Started,
            id,
            Some(attempt + 1),
            format!("{} worker", spec.kind.name()),
        );
        // Candidates are validated as they are written: the first that passes wins, and the
        // rest (written or not) are dropped.
        let (cand_tx, mut cand_rx) = unbounded_channel();
        let assignment = Assignment {
            route,
            spec,
            deps,
            feedback: feedback.as_ref(),
            attempt,
        };
        let produce = stats.attempt(spec.kind, workers::produce(ctx, assignment, &cand_tx));
        let mut produce = Box::pin(produce);
        let (vtx, mut vrx) = unbounded_channel();
        let priority = ValidationPriority {
            critical: spec.critical,
            attempt,
        };
        let mut candidates: Vec<Artifact> = Vec::new();
        let mut attempt_best: Option<(usize, Verdict)> = None;
        let mut verdicts = Vec::new();
        let mut produced = false;
        let mut worker_error = None;
        let v_started = ctx.rec.elapsed_ms();
        loop {
            if produced && verdicts.len() == candidates.len() && cand_rx.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                Some((i, v)) = vrx.recv() => {
                    let v: Verdict = v;
                    ctx.rec.event(
                        Stage::Validation,
                        EventStatus::of(v.passed),
                        id,
                        Some(attempt + 1),
                        format!("candidate {}: {}", i + 1, if v.passed { "passed".to_string() } else { first_line(&v.feedback) }),
                    );
                    verdicts.push(json!({"candidate": i + 1, "verdict": v}));
                    let passed = v.passed;
                    if attempt_best.as_ref().is_none_or(|(_, b)| better(&v, b)) {
                        attempt_best = Some((i, v));
                    }
                    if passed {
                        break;
                    }
                }
                Some(c) = cand_rx.recv() => {
                    let i = candidates.len();
                    let (ctx2, route2, spec2, c2, ev2) = (ctx.clone(), route.clone(), spec.clone(), c.clone(), evidence.clone());
                    ctx.queue.submit(priority, i, vtx.clone(), move || {
                        Box::pin(async move { validators::validate(&ctx2, &route2, &spec2, &c2, &ev2).await })
                    });
                    candidates.push(c);
                }
                r = &mut produce, if !produced => {
                    produced = true;
                    if let Err(e) = r {
                        worker_error = Some(e.to_string());
                    }
                }
            }
        }
        drop(vrx);
        // Candidates still being written are cancelled.
        drop(produce);
        ctx.rec.stage(
            Stage::Worker,
            id,
            started,
            json!({"spec": spec, "attempt": attempt + 1, "feedback": feedback}),
            json!({"candidates": candidates, "error": worker_error}),
        );
        ctx.rec.event(
            Stage::Worker,
            if worker_error.is_some() {
                EventStatus::Failed
            } else {
                EventStatus::Finished
            },
            id,
            Some(attempt + 1),
            match &worker_error {
                Some(e) => e.clone(),
                None => format!("{} candidate(s) written", candidates.len()),
            },
        );
        ctx.rec.stage(
            Stage::Validation,
            id,
            v_started,
            json!({"attempt": attempt + 1, "candidates": candidates.len()}),
            json!({"verdicts": verdicts}),
        );
        if let (Some(e), true) = (&worker_error, candidates.is_empty()) {
            stopped = format!("the worker failed: {e}");
            break;
        }

        let Some((i, v)) = attempt_best else {
            stopped = "no candidate could be validated".into();
            break;
        };
        let score = v.score;
        attempts.push(AttemptRecord {
            attempt: attempt + 1,
            candidates: candidates.len(),
            validated: verdicts.len(),
            best_score: score,
            passed: v.passed,
            feedback: v.feedback.clone(),
        });
        let mut artifact = candidates[i].clone();
        artifact.files = v.files.clone();
        if best.as_ref().is_none_or(|(_, b)| better(&v, b)) {
            best = Some((artifact, v));
        }
        let (best_artifact, best_verdict) = best.as_ref().expect("set above");
        if best_verdict.passed {
            stopped = format!("passed on attempt {}", attempt + 1);
            break;
        }
        if let Err(why) = policy.should_retry(attempt, score, previous) {
            ctx.rec.event(
                Stage::Retry,
                EventStatus::Finished,
                id,
                Some(attempt + 1),
                format!("stopping: {why}; keeping the best attempt"),
            );
            stopped = why;
            break;
        }
        previous = Some(score);
        feedback = Some(Feedback {
            previous: best_artifact
                .code
                .clone()
                .unwrap_or_else(|| best_artifact.text.clone()),
            problems: best_verdict.feedback.clone(),
        });
        ctx.rec.stage(
            Stage::Retry,
            id,
            ctx.rec.elapsed_ms(),
            json!({"attempt": attempt + 1, "verdict": best_verdict}),
            json!({"feedback": feedback}),
        );
        ctx.rec.event(
            Stage::Retry,
            EventStatus::Progress,
            id,
            Some(attempt + 2),
            format!("retrying: {}", first_line(&best_verdict.feedback)),
        );
        attempt += 1;
    }
    let passed = best.as_ref().is_some_and(|(_, v)| v.passed);
    stats.finished(spec.kind, passed);
    ctx.rec.stage(
        Stage::Retry,
        id,
        ctx.rec.elapsed_ms(),
        json!({"max_retries": policy.max_retries}),
        json!({"attempts": attempts, "stopped": stopped, "passed": passed}),
    );
    // Every subtask's retry decision is an event, so that a stream of a job shows the stage
    // even when no retry was needed.
    ctx.rec.event(
        Stage::Retry,
        EventStatus::of(passed),
        id,
        Some(attempts.len()),
        stopped.clone(),
    );
    let (artifact, verdict) = match best {
        Some((a, v)) => (Some(a), Some(v)),
        None => (None, None),
    };
    SubtaskResult {
        spec: spec.clone(),
        artifact,
        verdict,
        attempts,
        passed,
        stopped,
    }
}

/// A passing verdict beats a failing one; then the higher score.
fn better(a: &Verdict, b: &Verdict) -> bool {
    (a.passed, a.score) > (b.passed, b.score)
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("");
    if l.chars().count() > 160 {
        format!("{}…", l.chars().take(160).collect::<String>())
    } else {
        l.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stop_at_the_limit_or_when_nothing_improves() {
        let p = RetryPolicy { max_retries: 2 };
        assert!(p.should_retry(0, 1.0, None).is_ok());
        assert!(p.should_retry(1, 2.0, Some(1.0)).is_ok());
        assert!(p
            .should_retry(1, 1.0, Some(1.0))
            .unwrap_err()
            .contains("no better"));
        assert!(p
            .should_retry(2, 5.0, Some(1.0))
            .unwrap_err()
            .contains("retry limit"));
        assert!(RetryPolicy { max_retries: 0 }
            .should_retry(0, 1.0, None)
            .is_err());
    }
}
