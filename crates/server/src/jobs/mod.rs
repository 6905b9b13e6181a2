//! Pipeline jobs: a bounded table of jobs, each a tokio task running `Pipeline::run`, with
//! its stage events kept for readers that come late and signalled to those who follow.
//! Cancelling a job aborts its task, which drops its LLM calls (freeing their KV) and its
//! queued validations.
//!
//! A job never dies silently: its run is a task of its own, watched by a second one that
//! ends the job as failed, with the panic's message as its error, if the run panics (which
//! frees its slot); only cancelling ends a job without a result or an error of its own.

mod routes;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use forgeline_pipeline::llm::BoxFuture;
use forgeline_pipeline::{EventStatus, Format, JobEvent, JobOutcome, Pipeline, TaskRequest};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};

use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;

pub use routes::routes;

/// How many jobs run and are kept.
#[derive(Clone, Debug)]
pub struct JobLimits {
    /// Jobs running at once; a new job past it gets 429.
    pub max_running: usize,
    /// Jobs kept (running and finished); the oldest finished ones go first.
    pub max_kept: usize,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_running: 4,
            max_kept: 256,
        }
    }
}

/// Events kept per job; a job that emits more keeps its first ones and counts the rest.
const MAX_EVENTS: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_done(self) -> bool {
        self != JobState::Running
    }

    fn name(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// One job.
pub struct Job {
    pub id: String,
    created: u64,
    task: String,
    inner: Mutex<JobInner>,
    /// Bumped on every change, for readers of the event stream.
    changed: watch::Sender<u64>,
    abort: Mutex<Option<AbortHandle>>,
}

struct JobInner {
    state: JobState,
    events: Vec<JobEvent>,
    events_dropped: usize,
    result: Option<Value>,
    output: Option<String>,
    error: Option<Value>,
}

impl Job {
    fn lock(&self) -> MutexGuard<'_, JobInner> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn state(&self) -> JobState {
        self.lock().state
    }

    fn push_event(&self, ev: JobEvent) {
        {
            let mut inner = self.lock();
            if inner.events.len() < MAX_EVENTS {
                inner.events.push(ev);
            } else {
                inner.events_dropped += 1;
            }
        }
        self.bump();
    }

    /// Ends the job unless it has ended already (cancelled meanwhile); true if it did.
    fn end(&self, state: JobState, f: impl FnOnce(&mut JobInner)) -> bool {
        let ended = {
            let mut inner = self.lock();
            if inner.state.is_done() {
                false
            } else {
                inner.state = state;
                f(&mut inner);
                true
            }
        };
        if ended {
            self.bump();
        }
        ended
    }

    /// Events from `from` on, and whether the job has ended.
    fn events_since(&self, from: usize) -> (Vec<JobEvent>, JobState) {
        let inner = self.lock();
        let new = inner.events.get(from..).unwrap_or_default().to_vec();
        (new, inner.state)
    }

    /// The job as `GET /v1/jobs/{id}` shows it.
    pub fn to_json(&self) -> Value {
        let inner = self.lock();
        json!({
            "id": self.id,
            "object": "job",
            "created": self.created,
            "state": inner.state,
            "task": self.task,
            "events": inner.events.len() + inner.events_dropped,
            "result": inner.result,
            "output": inner.output,
            "error": inner.error,
        })
    }
}

/// What runs a job's stages: the pipeline; tests put a stand-in behind it.
pub trait JobRunner: Send + Sync + 'static {
    /// The job's run, sending its stage events to `events`. Dropping it cancels the job.
    fn run(
        &self,
        task: TaskRequest,
        format: Format,
        events: mpsc::UnboundedSender<JobEvent>,
    ) -> BoxFuture<'static, forgeline_pipeline::Result<JobOutcome>>;
}

impl JobRunner for Pipeline {
    fn run(
        &self,
        task: TaskRequest,
        format: Format,
        events: mpsc::UnboundedSender<JobEvent>,
    ) -> BoxFuture<'static, forgeline_pipeline::Result<JobOutcome>> {
        let pipeline = self.clone();
        Box::pin(async move { pipeline.run(task, format, Some(events)).await })
    }
}

/// The job table. Shared by `Arc`.
pub struct Jobs {
    runner: Arc<dyn JobRunner>,
    metrics: Arc<Metrics>,
    limits: JobLimits,
    table: Mutex<Table>,
    serial: AtomicU64,
    /// Bumped whenever a job ends, for `wait_idle`.
    ended: watch::Sender<u64>,
}

#[derive(Default)]
struct Table {
    jobs: HashMap<String, Arc<Job>>,
    /// Ids oldest first, for eviction.
    order: VecDeque<String>,
}

impl Jobs {
    pub fn new(pipeline: Pipeline, metrics: Arc<Metrics>, limits: JobLimits) -> Self {
        Self::with_runner(Arc::new(pipeline), metrics, limits)
    }

    /// Jobs run by `runner` (the pipeline, in `new`).
    pub fn with_runner(
        runner: Arc<dyn JobRunner>,
        metrics: Arc<Metrics>,
        limits: JobLimits,
    ) -> Self {
        let limits = JobLimits {
            max_running: limits.max_running.max(1),
            max_kept: limits.max_kept.max(limits.max_running.max(1)),
        };
        Self {
            runner,
            metrics,
            limits,
            table: Mutex::default(),
            serial: AtomicU64::new(0),
            ended: watch::channel(0).0,
        }
    }

    /// Resolves once no job is running.
    pub async fn wait_idle(&self) {
        let mut ended = self.ended.subscribe();
        while self.running() > 0 {
            if ended.changed().await.is_err() {
                return;
            }
        }
    }

    /// Ends a running job, counting it; false if it had ended already (cancelled meanwhile).
    fn finish(&self, job: &Job, state: JobState, f: impl FnOnce(&mut JobInner)) -> bool {
        let ended = job.end(state, f);
        if ended {
            self.metrics.record_job(state.name());
            self.ended.send_modify(|n| *n += 1);
        }
        ended
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn running(&self) -> usize {
        self.table()
            .jobs
            .values()
            .filter(|j| j.state() == JobState::Running)
            .count()
    }

    /// Jobs in the table, running and finished.
    pub fn len(&self) -> usize {
        self.table().jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.table().jobs.get(id).cloned()
    }

    /// Starts a job, or refuses it whole (429) when as many as allowed are running.
    pub fn submit(self: &Arc<Self>, task: TaskRequest, format: Format) -> ApiResult<Arc<Job>> {
        let job = {
            let mut table = self.table();
            let running = table
                .jobs
                .values()
                .filter(|j| j.state() == JobState::Running)
                .count();
            if running >= self.limits.max_running {
                return Err(ApiError::overloaded(format!(
                    "{running} jobs are running (limit {}); retry later",
                    self.limits.max_running
                )));
            }
            while table.jobs.len() >= self.limits.max_kept {
                let Some(pos) = table
                    .order
                    .iter()
                    .position(|id| table.jobs.get(id).is_some_and(|j| j.state().is_done()))
                else {
                    break;
                };
                if let Some(id) = table.order.remove(pos) {
                    table.jobs.remove(&id);
                }
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let serial = self.serial.fetch_add(1, Ordering::Relaxed);
            let job = Arc::new(Job {
                id: format!("job-{:x}{serial:04x}", now.as_millis()),
                created: now.as_secs(),
                task: task.task.chars().take(200).collect(),
                inner: Mutex::new(JobInner {
                    state: JobState::Running,
                    events: Vec::new(),
                    events_dropped: 0,
                    result: None,
                    output: None,
                    error: None,
                }),
                changed: watch::channel(0).0,
                abort: Mutex::new(None),
            });
            table.order.push_back(job.id.clone());
            table.jobs.insert(job.id.clone(), job.clone());
            job
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let run = tokio::spawn(self.runner.run(task, format, tx));
        if let Ok(mut a) = job.abort.lock() {
            *a = Some(run.abort_handle());
        }
        tokio::spawn(watch_job(self.clone(), job.clone(), run, rx));
        Ok(job)
    }

    /// Cancels a running job (true), or removes a finished one from the table (false).
    pub fn cancel_or_remove(&self, job: &Arc<Job>) -> bool {
        if self.cancel(job) {
            return true;
        }
        let mut table = self.table();
        table.jobs.remove(&job.id);
        table.order.retain(|id| *id != job.id);
        false
    }

    fn cancel(&self, job: &Job) -> bool {
        self.cancel_with(job, "the job was cancelled")
    }

    fn cancel_with(&self, job: &Job, why: &str) -> bool {
        let cancelled = self.finish(job, JobState::Cancelled, |inner| {
            inner.error = Some(json!({"message": why}));
        });
        if cancelled {
            if let Some(a) = job.abort.lock().ok().and_then(|mut a| a.take()) {
                a.abort();
            }
        }
        cancelled
    }

    /// Cancels every running job (the end of a shutdown's grace period); how many it did.
    pub fn cancel_all(&self) -> usize {
        let jobs: Vec<Arc<Job>> = self.table().jobs.values().cloned().collect();
        let why = "the server shut down and the job did not finish within the grace period";
        jobs.iter().filter(|j| self.cancel_with(j, why)).count()
    }
}

/// Records the run's events as they come and ends the job with its outcome: its result, its
/// error, or the panic that ended its task.
async fn watch_job(
    jobs: Arc<Jobs>,
    job: Arc<Job>,
    run: JoinHandle<forgeline_pipeline::Result<JobOutcome>>,
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
) {
    let mut run = std::pin::pin!(run);
    let outcome = loop {
        tokio::select! {
            biased;
            Some(ev) = rx.recv() => record(&jobs.metrics, &job, ev),
            r = &mut run => break r,
        }
    };
    while let Ok(ev) = rx.try_recv() {
        record(&jobs.metrics, &job, ev);
    }
    let metrics = &jobs.metrics;
    let failed = |message: String, kind: &str| {
        let error = json!({"message": message, "type": kind});
        jobs.finish(&job, JobState::Failed, |inner| inner.error = Some(error));
    };
    match outcome {
        Ok(Ok(JobOutcome {
            result,
            rendered,
            trace,
        })) => {
            for s in &trace.stages {
                metrics.record_stage_latency(s.stage.name(), Duration::from_millis(s.duration_ms));
            }
            metrics.record_verdict(result.verdict.status.name());
            let value = serde_json::to_value(&result).unwrap_or(Value::Null);
            jobs.finish(&job, JobState::Succeeded, |inner| {
                inner.result = Some(value);
                inner.output = Some(rendered);
            });
        }
        Ok(Err(e)) => failed(e.to_string(), error_kind(&e)),
        Err(e) if e.is_panic() => {
            let why = panic_message(e.into_panic());
            tracing::error!(job = %job.id, "the job's run panicked: {why}");
            failed(
                format!("internal error: the job's run panicked: {why}"),
                "server_error",
            );
        }
        // Aborted: only `cancel` does that, and it has ended the job already.
        Err(_) => {
            failed("the job's run was stopped".into(), "server_error");
        }
    }
}

/// The text a panic was raised with.
/// OpenAI's error type for a failed job: the task's fault, the engine's answer for an engine
/// error (a prompt too long for the model is the task's, overload is load), else ours.
fn error_kind(e: &forgeline_pipeline::Error) -> &'static str {
    use forgeline_pipeline::Error as P;
    match e {
        P::InvalidTask(_) | P::Task(_) => "invalid_request_error",
        P::Engine(e) => ApiError::from_engine(e, "task").kind,
        _ => "server_error",
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".into())
}

/// Keeps an event and counts stage verdicts.
fn record(metrics: &Metrics, job: &Job, ev: JobEvent) {
    match ev.status {
        EventStatus::Passed => metrics.record_stage_result(ev.stage.name(), true),
        EventStatus::Failed => metrics.record_stage_result(ev.stage.name(), false),
        _ => {}
    }
    job.push_event(ev);
}

#[cfg(test)]
mod tests;
