//! Pipeline jobs: a bounded table of jobs, each a tokio task running `Pipeline::run`, with
//! its stage events kept for readers that come late and signalled to those who follow.
//! Cancelling a job aborts its task, which drops its LLM calls (freeing their KV) and its
//! queued validations.

mod routes;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use forgeline_pipeline::{EventStatus, Format, JobEvent, JobOutcome, Pipeline, TaskRequest};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

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

/// The job table. Shared by `Arc`.
pub struct Jobs {
    pipeline: Pipeline,
    metrics: Arc<Metrics>,
    limits: JobLimits,
    table: Mutex<Table>,
    serial: AtomicU64,
}

#[derive(Default)]
struct Table {
    jobs: HashMap<String, Arc<Job>>,
    /// Ids oldest first, for eviction.
    order: VecDeque<String>,
}

impl Jobs {
    pub fn new(pipeline: Pipeline, metrics: Arc<Metrics>, limits: JobLimits) -> Self {
        let limits = JobLimits {
            max_running: limits.max_running.max(1),
            max_kept: limits.max_kept.max(limits.max_running.max(1)),
        };
        Self {
            pipeline,
            metrics,
            limits,
            table: Mutex::default(),
            serial: AtomicU64::new(0),
        }
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
        let handle = tokio::spawn(run_job(
            self.clone(),
            job.clone(),
            self.pipeline.clone(),
            task,
            format,
        ));
        if let Ok(mut a) = job.abort.lock() {
            *a = Some(handle.abort_handle());
        }
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
        let cancelled = job.end(JobState::Cancelled, |inner| {
            inner.error = Some(json!({"message": "the job was cancelled"}));
        });
        if cancelled {
            if let Some(a) = job.abort.lock().ok().and_then(|mut a| a.take()) {
                a.abort();
            }
            self.metrics.record_job("cancelled");
        }
        cancelled
    }

    /// Cancels every running job (the end of a shutdown's grace period).
    pub fn cancel_all(&self) {
        let jobs: Vec<Arc<Job>> = self.table().jobs.values().cloned().collect();
        for j in jobs {
            self.cancel(&j);
        }
    }
}

async fn run_job(
    jobs: Arc<Jobs>,
    job: Arc<Job>,
    pipeline: Pipeline,
    task: TaskRequest,
    format: Format,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let run = pipeline.run(task, format, Some(tx));
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
    match outcome {
        Ok(JobOutcome {
            result,
            rendered,
            trace,
        }) => {
            for s in &trace.stages {
                metrics.record_stage_latency(s.stage.name(), Duration::from_millis(s.duration_ms));
            }
            let value = serde_json::to_value(&result).unwrap_or(Value::Null);
            if job.end(JobState::Succeeded, |inner| {
                inner.result = Some(value);
                inner.output = Some(rendered);
            }) {
                metrics.record_job(JobState::Succeeded.name());
            }
        }
        Err(e) => {
            let kind = match e {
                forgeline_pipeline::Error::InvalidTask(_) => "invalid_request_error",
                _ => "server_error",
            };
            let error = json!({"message": e.to_string(), "type": kind});
            if job.end(JobState::Failed, |inner| inner.error = Some(error)) {
                metrics.record_job(JobState::Failed.name());
            }
        }
    }
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
