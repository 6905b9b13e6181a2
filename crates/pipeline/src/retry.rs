//! Stage 9, the worker retry manager: runs a subtask's attempts. Each attempt's candidates
//! go through the validation queue; a failure becomes refined instructions (the error,
//! the failing test, the trimmed traceback, and the attempt itself) for the next attempt,
//! up to the retry limit. It stops early when an attempt is no better than the one before,
//! and always keeps the best attempt so far.
//!
//! Where nothing trusted can check the primary code (no `>>>` example, no supplied tests),
//! a pass only means that a candidate imports, so the first pass would be a coin toss. There
//! an attempt validates all of its candidates and then chooses among those that passed by
//! running them (see `selection`); elsewhere the first verified pass wins.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::unbounded_channel;

use crate::job::JobContext;
use crate::planning::TaskSpec;
use crate::router::Route;
use crate::selection::{self, ProbePlan, Selection};
use crate::stage::Stage;
use crate::trace::{EventStatus, StageRecord};
use crate::validation::ValidationPriority;
use crate::validators::{self, Evidence, Verdict, VerdictStatus};
use crate::workers::{self, Artifact, Assignment, WorkerKind, WorkerStats};

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
    /// How its output was chosen among its attempt's candidates by running them, where no
    /// trusted check could choose (the attempt whose candidate it kept); `None` where the
    /// first verified pass won, or no choice was needed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selection: Option<Selection>,
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
    /// How `best` was chosen by running the candidates, where it was.
    selection: Option<Selection>,
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
    let mut best_selection: Option<Selection> = None;
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
            best_selection = outcome.selection;
        }
        let (best_artifact, best_verdict) = best.as_ref().expect("set above");
        if sub.done_with(best_verdict) {
            break format!(
                "accepted on attempt {} ({})",
                attempt + 1,
                best_verdict.status
            );
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
    sub.finish(policy, best, best_selection, attempts, stopped)
}

impl Subtask<'_> {
    fn id(&self) -> Option<&str> {
        Some(&self.spec.id)
    }

    /// Whether the subtask's output can be verified: the primary code with an entry point,
    /// and trusted checks to run (the task's examples, supplied tests).
    fn verifies(&self) -> bool {
        self.spec.primary
            && self.spec.kind == WorkerKind::Code
            && self.route.entry_point.is_some()
            && (self.evidence.examples.is_some() || self.evidence.supplied.is_some())
    }

    /// Whether an output ends the search: it is acceptable (no hard check failed) and, where
    /// the output can be verified, verified. Code that passes its examples but crashes on
    /// an empty input is kept as the best so far while the search goes on.
    fn done_with(&self, v: &Verdict) -> bool {
        v.passed && (v.status == VerdictStatus::Verified || !self.verifies())
    }

    /// Whether the attempt's candidates are chosen by running them: the primary code with
    /// an entry point, and nothing trusted to check it (no task examples, no supplied
    /// tests), so a pass only means that a candidate imports.
    fn selects(&self) -> bool {
        needs_selection(self.spec, self.route, &self.evidence)
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
    /// Where the candidates are chosen by running them (`selects`), every candidate is
    /// written and validated, and selection chooses among those that passed.
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
            selection: None,
        };
        let selects = self.selects();
        // Each candidate's verdict, by index (kept for selection).
        let mut received: Vec<Option<Verdict>> = Vec::new();
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
                        format!("candidate {}: {}", i + 1, if v.passed { format!("accepted ({})", v.status) } else { first_line(&v.feedback) }),
                    );
                    out.verdicts.push(json!({"candidate": i + 1, "verdict": v}));
                    let done = self.done_with(&v);
                    if selects {
                        if received.len() <= i {
                            received.resize(i + 1, None);
                        }
                        received[i] = Some(v.clone());
                    }
                    if out.best.as_ref().is_none_or(|(_, b)| better(&v, b)) {
                        out.best = Some((i, v));
                    }
                    if done && !selects {
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
        if selects {
            self.select(attempt, &mut out, &received).await;
        }
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
            json!({"verdicts": out.verdicts, "selection": out.selection}),
        );
        out
    }

    /// Chooses among the attempt's candidates that passed (no hard check failed) by running
    /// them, when there are two or more: the chosen one becomes the attempt's best. When
    /// nothing can be chosen (no probe, no candidate gave an output), the best verdict stays.
    async fn select(&self, attempt: usize, out: &mut AttemptOutcome, verdicts: &[Option<Verdict>]) {
        let candidates: Vec<selection::Candidate> = verdicts
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let v = v.as_ref().filter(|v| v.passed)?;
                Some(selection::Candidate {
                    id: i + 1,
                    code: out.candidates.get(i)?.code.clone()?,
                    verdict_score: v.score,
                })
            })
            .collect();
        if candidates.len() < 2 {
            return;
        }
        let entry = self.route.entry_point.as_deref().unwrap_or_default();
        let plan = ProbePlan::new(
            entry,
            self.route.signature.as_ref(),
            &self.route.examples,
            &self.evidence.generated,
        );
        let sel = selection::select(self.ctx, &self.evidence.module, &plan, &candidates).await;
        let message = match sel.chosen {
            Some(c) => format!(
                "selection: candidate {c} of {} by running {} probe(s) and {} generated \
                 test(s); {} group(s), the best of {}{}",
                candidates.len(),
                sel.probes.len(),
                sel.tests.len(),
                sel.groups.len(),
                sel.best_group().map_or(0, |g| g.members.len()),
                if sel.consistent {
                    ", a consistent majority"
                } else {
                    ""
                }
            ),
            None => format!("selection chose nothing: {}", sel.note),
        };
        self.event(
            Stage::Validation,
            EventStatus::Progress,
            attempt + 1,
            message,
        );
        if let Some(c) = sel.chosen {
            if let Some(v) = verdicts.get(c - 1).cloned().flatten() {
                out.best = Some((c - 1, v));
            }
        }
        out.selection = Some(sel);
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
        selection: Option<Selection>,
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
            selection,
            log: self
                .log
                .lock()
                .map(|mut l| std::mem::take(&mut *l))
                .unwrap_or_default(),
        }
    }
}

/// Whether a subtask's candidates are chosen by running them (`selection`): it is the
/// primary code with an entry point, and there is no trusted check (the task's examples,
/// supplied tests) to tell a working candidate from one that merely imports.
pub fn needs_selection(spec: &TaskSpec, route: &Route, evidence: &Evidence) -> bool {
    spec.primary
        && spec.kind == WorkerKind::Code
        && route.entry_point.is_some()
        && evidence.examples.is_none()
        && evidence.supplied.is_none()
}

/// A passing verdict beats a failing one; then the stronger status (a verified output
/// beats one that passed its examples but crashed on an edge case); then the higher score.
fn better(a: &Verdict, b: &Verdict) -> bool {
    use std::cmp::Reverse;
    (a.passed, Reverse(a.status), a.score) > (b.passed, Reverse(b.status), b.score)
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
    fn only_primary_code_with_nothing_trusted_is_chosen_by_running_it() {
        let route = crate::router::route_by_rules(&crate::task::TaskRequest::new(
            "def add(a: int, b: int) -> int:\n    \"\"\"Return the sum.\"\"\"\n",
        ));
        let spec = TaskSpec {
            id: "impl".into(),
            kind: WorkerKind::Code,
            description: "add".into(),
            depends_on: vec![],
            acceptance: vec![],
            primary: true,
            critical: true,
        };
        let bare = Evidence {
            module: "solution".into(),
            ..Evidence::default()
        };
        assert!(needs_selection(&spec, &route, &bare));
        // Generated tests are no trusted check: still chosen by running.
        let generated = Evidence {
            generated: vec!["def test_a():\n    pass\n".into()],
            ..bare.clone()
        };
        assert!(needs_selection(&spec, &route, &generated));
        // The task's examples or the user's tests decide: the first verified pass wins.
        let examples = Evidence {
            examples: Some("def test_example_1():\n    assert add(1, 2) == 3\n".into()),
            ..bare.clone()
        };
        assert!(!needs_selection(&spec, &route, &examples));
        let supplied = Evidence {
            supplied: Some(crate::task::ContextFile {
                name: "test_add.py".into(),
                content: "def test_a():\n    pass\n".into(),
            }),
            ..bare.clone()
        };
        assert!(!needs_selection(&spec, &route, &supplied));
        // Not the primary code, not code, or no entry point to call.
        let helper = TaskSpec {
            primary: false,
            ..spec.clone()
        };
        assert!(!needs_selection(&helper, &route, &bare));
        let tests = TaskSpec {
            kind: WorkerKind::Tests,
            ..spec.clone()
        };
        assert!(!needs_selection(&tests, &route, &bare));
        let mut no_entry = route.clone();
        no_entry.entry_point = None;
        assert!(!needs_selection(&spec, &no_entry, &bare));
    }

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
