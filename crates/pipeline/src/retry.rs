//! Stage 9, the worker retry manager: runs a subtask's attempts. Each attempt's candidates
//! go through the validation queue; a failure becomes refined instructions (the error,
//! the failing test, the trimmed traceback, and the attempt itself) for the next attempt,
//! up to the retry limit. It stops early when an attempt is no better than the one before,
//! and always keeps the best attempt so far.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::unbounded_channel;

use crate::job::JobContext;
use crate::planning::TaskSpec;
use crate::router::Route;
use crate::stage::Stage;
use crate::trace::{EventStatus, StageRecord};
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
    /// Its attempts' records (worker, validation, retry) for the job's trace, in the order
    /// they finished.
    #[serde(skip)]
    pub log: Vec<StageRecord>,
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

/// What one subtask's attempts share.
struct Subtask<'a> {
    ctx: &'a JobContext,
    stats: &'a WorkerStats,
    route: &'a Route,
    spec: &'a TaskSpec,
    deps: &'a [SubtaskResult],
    evidence: Arc<Evidence>,
    log: Mutex<Vec<StageRecord>>,
}

/// One attempt's candidates and the best of their verdicts.
struct AttemptOutcome {
    candidates: Vec<Artifact>,
    /// Verdicts received (each as `{candidate, verdict}`, for the trace).
    verdicts: Vec<serde_json::Value>,
    /// The best candidate's index and verdict.
    best: Option<(usize, Verdict)>,
    worker_error: Option<String>,
}

/// Runs one subtask to its best output: attempts until one passes or the policy stops,
/// each retry told what was wrong with the best attempt so far.
pub async fn run_subtask(
    ctx: &JobContext,
    stats: &WorkerStats,
    route: &Route,
    spec: &TaskSpec,
    deps: &[SubtaskResult],
    evidence: Arc<Evidence>,
) -> SubtaskResult {
    let policy = RetryPolicy {
        max_retries: ctx.config().limits.max_retries,
    };
    let sub = Subtask {
        ctx,
        stats,
        route,
        spec,
        deps,
        evidence,
        log: Mutex::default(),
    };
    let mut best: Option<(Artifact, Verdict)> = None;
    let mut attempts = Vec::new();
    let mut feedback: Option<Feedback> = None;
    let mut previous: Option<f64> = None;
    let mut attempt = 0;
    let stopped = loop {
        let outcome = sub.attempt(attempt, feedback.as_ref()).await;
        if let (Some(e), true) = (&outcome.worker_error, outcome.candidates.is_empty()) {
            break format!("the worker failed: {e}");
        }
        let Some((i, v)) = outcome.best else {
            break "no candidate could be validated".into();
        };
        let score = v.score;
        attempts.push(AttemptRecord {
            attempt: attempt + 1,
            candidates: outcome.candidates.len(),
            validated: outcome.verdicts.len(),
            best_score: score,
            passed: v.passed,
            feedback: v.feedback.clone(),
        });
        let mut artifact = outcome.candidates[i].clone();
        artifact.files = v.files.clone();
        if best.as_ref().is_none_or(|(_, b)| better(&v, b)) {
            best = Some((artifact, v));
        }
        let (best_artifact, best_verdict) = best.as_ref().expect("set above");
        if best_verdict.passed {
            break format!("passed on attempt {}", attempt + 1);
        }
        if let Err(why) = policy.should_retry(attempt, score, previous) {
            sub.event(
                Stage::Retry,
                EventStatus::Finished,
                attempt + 1,
                format!("stopping: {why}; keeping the best attempt"),
            );
            break why;
        }
        previous = Some(score);
        feedback = Some(sub.retry_feedback(attempt, best_artifact, best_verdict));
        attempt += 1;
    };
    sub.finish(policy, best, attempts, stopped)
}

impl Subtask<'_> {
    fn id(&self) -> Option<&str> {
        Some(&self.spec.id)
    }

    fn event(&self, stage: Stage, status: EventStatus, attempt: usize, msg: String) {
        self.ctx
            .progress(stage, status, self.id(), Some(attempt), msg);
    }

    /// Adds a finished step that started at `started_ms` to the subtask's log.
    fn log(&self, stage: Stage, started_ms: u64, input: Value, output: Value) {
        let rec = StageRecord {
            stage,
            subtask: Some(self.spec.id.clone()),
            started_ms,
            duration_ms: self.ctx.elapsed_ms().saturating_sub(started_ms),
            input,
            output,
        };
        if let Ok(mut log) = self.log.lock() {
            log.push(rec);
        }
    }

    /// One attempt: the worker writes candidates while the validation queue checks them as
    /// they come; the first that passes wins, and the rest (written or not) are dropped.
    async fn attempt(&self, attempt: usize, feedback: Option<&Feedback>) -> AttemptOutcome {
        let (ctx, spec) = (self.ctx, self.spec);
        let started = ctx.elapsed_ms();
        self.event(
            Stage::Worker,
            EventStatus::Started,
            attempt + 1,
            format!("{} worker", spec.kind.name()),
        );
        let (cand_tx, mut cand_rx) = unbounded_channel();
        let assignment = Assignment {
            route: self.route,
            spec,
            deps: self.deps,
            feedback,
            attempt,
        };
        let produce = self
            .stats
            .attempt(spec.kind, workers::produce(ctx, assignment, &cand_tx));
        let mut produce = Box::pin(produce);
        let (vtx, mut vrx) = unbounded_channel();
        let priority = ValidationPriority {
            critical: spec.critical,
            attempt,
        };
        let mut out = AttemptOutcome {
            candidates: Vec::new(),
            verdicts: Vec::new(),
            best: None,
            worker_error: None,
        };
        let mut produced = false;
        let v_started = ctx.elapsed_ms();
        loop {
            if produced && out.verdicts.len() == out.candidates.len() && cand_rx.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                Some((i, v)) = vrx.recv() => {
                    let v: Verdict = v;
                    self.event(
                        Stage::Validation,
                        EventStatus::of(v.passed),
                        attempt + 1,
                        format!("candidate {}: {}", i + 1, if v.passed { "passed".to_string() } else { first_line(&v.feedback) }),
                    );
                    out.verdicts.push(json!({"candidate": i + 1, "verdict": v}));
                    let passed = v.passed;
                    if out.best.as_ref().is_none_or(|(_, b)| better(&v, b)) {
                        out.best = Some((i, v));
                    }
                    if passed {
                        break;
                    }
                }
                Some(c) = cand_rx.recv() => {
                    let i = out.candidates.len();
                    let (ctx2, route2, spec2, c2, ev2) = (ctx.clone(), self.route.clone(), spec.clone(), c.clone(), self.evidence.clone());
                    ctx.queue().submit(priority, i, vtx.clone(), move || {
                        Box::pin(async move { validators::validate(&ctx2, &route2, &spec2, &c2, &ev2).await })
                    });
                    out.candidates.push(c);
                }
                r = &mut produce, if !produced => {
                    produced = true;
                    if let Err(e) = r {
                        out.worker_error = Some(e.to_string());
                    }
                }
            }
        }
        drop(vrx);
        // Candidates still being written are cancelled.
        drop(produce);
        self.log(
            Stage::Worker,
            started,
            json!({"spec": spec, "attempt": attempt + 1, "feedback": feedback}),
            json!({"candidates": out.candidates, "error": out.worker_error}),
        );
        self.event(
            Stage::Worker,
            if out.worker_error.is_some() {
                EventStatus::Failed
            } else {
                EventStatus::Finished
            },
            attempt + 1,
            match &out.worker_error {
                Some(e) => e.clone(),
                None => format!("{} candidate(s) written", out.candidates.len()),
            },
        );
        self.log(
            Stage::Validation,
            v_started,
            json!({"attempt": attempt + 1, "candidates": out.candidates.len()}),
            json!({"verdicts": out.verdicts}),
        );
        out
    }

    /// What the next attempt is told: the best output so far and what was wrong with it.
    fn retry_feedback(&self, attempt: usize, artifact: &Artifact, verdict: &Verdict) -> Feedback {
        let feedback = Feedback {
            previous: artifact
                .code
                .clone()
                .unwrap_or_else(|| artifact.text.clone()),
            problems: verdict.feedback.clone(),
        };
        self.log(
            Stage::Retry,
            self.ctx.elapsed_ms(),
            json!({"attempt": attempt + 1, "verdict": verdict}),
            json!({"feedback": feedback}),
        );
        self.event(
            Stage::Retry,
            EventStatus::Progress,
            attempt + 2,
            format!("retrying: {}", first_line(&verdict.feedback)),
        );
        feedback
    }

    /// The subtask's result, counted and recorded.
    fn finish(
        &self,
        policy: RetryPolicy,
        best: Option<(Artifact, Verdict)>,
        attempts: Vec<AttemptRecord>,
        stopped: String,
    ) -> SubtaskResult {
        let passed = best.as_ref().is_some_and(|(_, v)| v.passed);
        self.stats.finished(self.spec.kind, passed);
        self.log(
            Stage::Retry,
            self.ctx.elapsed_ms(),
            json!({"max_retries": policy.max_retries}),
            json!({"attempts": attempts, "stopped": stopped, "passed": passed}),
        );
        // Every subtask's retry decision is an event, so that a stream of a job shows the
        // stage even when no retry was needed.
        self.event(
            Stage::Retry,
            EventStatus::of(passed),
            attempts.len(),
            stopped.clone(),
        );
        let (artifact, verdict) = best.unzip();
        SubtaskResult {
            spec: self.spec.clone(),
            artifact,
            verdict,
            attempts,
            passed,
            stopped,
            log: self
                .log
                .lock()
                .map(|mut l| std::mem::take(&mut *l))
                .unwrap_or_default(),
        }
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
