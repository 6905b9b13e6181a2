//! Pipeline jobs: a bounded table of jobs, each a tokio task running `Pipeline::run`, with
//! its stage events kept for readers that come late and signalled to those who follow.
//! Cancelling a job aborts its task, which drops its LLM calls (freeing their KV) and its
//! queued validations.
//!
//! A job never dies silently: its run is a task of its own, watched by a second one that
//! ends the job as failed, with the panic's message as its error, if the run panics (which
//! frees its slot); only cancelling ends a job without a result or an error of its own.
//!
//! With a store (`store`: the `JobStore` seam; `file_store`: plain files in the data
//! directory) the table writes every job through: its request and record when accepted,
//! each event, its end, its removal. On start (`Jobs::restore`) it loads the store's jobs:
//! finished ones are served as before; those that were running when the process stopped run
//! again from the start under the same id, after a `job.requeued` event that says so.
//! Retention (count, age, size) removes the jobs that ended first, at start and as jobs end
//! or come.

pub mod cluster;
mod file_store;
mod routes;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use forgeline_pipeline::llm::BoxFuture;
use forgeline_pipeline::{EventStatus, Format, JobEvent, JobOutcome, Pipeline, TaskRequest};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};

use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;

pub use cluster::{Cluster, ClusterConfig, ClusterError};
pub use file_store::FileStore;
pub use routes::routes;
pub use store::{JobRecord, JobStore, Retention, StoredRequest};

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

/// Starts a job gets: one that was running when the server stopped this many times (a job
/// that brings the server down, say) ends as failed instead of running again.
pub const MAX_RUNS: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
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
    /// Held around the job's store writes, which it keeps in order; true once the job is
    /// removed, after which nothing more is written.
    io: Mutex<bool>,
}

struct JobInner {
    state: JobState,
    /// As the API streams them: JSON objects with `object` (`job.event`, `job.requeued`).
    events: Vec<Value>,
    events_dropped: usize,
    result: Option<Value>,
    output: Option<String>,
    error: Option<Value>,
    runs: u32,
    finished: Option<u64>,
}

impl Job {
    fn new(id: String, created: u64, task: String, inner: JobInner) -> Self {
        Self {
            id,
            created,
            task,
            inner: Mutex::new(inner),
            changed: watch::channel(0).0,
            abort: Mutex::new(None),
            io: Mutex::new(false),
        }
    }

    /// A job read back from a store.
    fn from_record(r: JobRecord, events: Vec<Value>) -> Self {
        let inner = JobInner {
            state: r.state,
            events,
            events_dropped: r.events_dropped,
            result: r.result,
            output: r.output,
            error: r.error,
            runs: r.runs.max(1),
            finished: r.finished,
        };
        Self::new(r.id, r.created, r.task, inner)
    }

    /// The job as a store keeps it.
    fn record(&self) -> JobRecord {
        let inner = self.lock();
        JobRecord {
            id: self.id.clone(),
            created: self.created,
            task: self.task.clone(),
            state: inner.state,
            runs: inner.runs,
            finished: inner.finished,
            result: inner.result.clone(),
            output: inner.output.clone(),
            error: inner.error.clone(),
            events_dropped: inner.events_dropped,
        }
    }

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

    /// Keeps an event (true), or counts it past the cap (false).
    fn push_event(&self, ev: Value) -> bool {
        let kept = {
            let mut inner = self.lock();
            if inner.events.len() < MAX_EVENTS {
                inner.events.push(ev);
                true
            } else {
                inner.events_dropped += 1;
                false
            }
        };
        self.bump();
        kept
    }

    /// Ends the job unless it has ended already (cancelled meanwhile); true if it did.
    fn end(&self, state: JobState, f: impl FnOnce(&mut JobInner)) -> bool {
        let ended = {
            let mut inner = self.lock();
            if inner.state.is_done() {
                false
            } else {
                inner.state = state;
                inner.finished = Some(unix_now());
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
    fn events_since(&self, from: usize) -> (Vec<Value>, JobState) {
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
            "finished": inner.finished,
            "state": inner.state,
            "runs": inner.runs,
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

/// What a start found in the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Finished jobs kept, served as before.
    pub finished: usize,
    /// Jobs that were running, started again under their ids.
    pub requeued: usize,
    /// Jobs that were running whose request could not be read back, or that had been
    /// started `MAX_RUNS` times: ended as failed.
    pub failed: usize,
    /// Finished jobs removed by retention.
    pub removed: usize,
    /// Jobs the store could not read (each logged), left as they are.
    pub skipped: usize,
}

/// The job table. Shared by `Arc`.
pub struct Jobs {
    runner: Arc<dyn JobRunner>,
    metrics: Arc<Metrics>,
    limits: JobLimits,
    retention: Retention,
    store: Option<Arc<dyn JobStore>>,
    table: Mutex<HashMap<String, Arc<Job>>>,
    serial: AtomicU64,
    /// Jobs that have not ended, or whose end is not yet in the store, for `wait_idle`.
    active: AtomicUsize,
    /// Bumped whenever a job ends, for `wait_idle`.
    ended: watch::Sender<u64>,
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
            retention: Retention::default(),
            store: None,
            table: Mutex::default(),
            serial: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            ended: watch::channel(0).0,
        }
    }

    /// Keeps the jobs in `store` too, within `retention`; `restore` loads what it holds.
    pub fn with_store(mut self, store: Arc<dyn JobStore>, retention: Retention) -> Self {
        self.store = Some(store);
        self.retention = retention;
        self
    }

    /// Loads the store's jobs (on a tokio runtime, before serving): finished ones are kept
    /// within retention; those that were running start again under their ids, after a
    /// `job.requeued` event. An error only when the store cannot be read at all.
    pub fn restore(self: &Arc<Self>) -> std::io::Result<Restored> {
        let Some(store) = self.store.clone() else {
            return Ok(Restored::default());
        };
        let loaded = store.load()?;
        // Age retention runs as jobs end and are submitted, and on a timer for an idle
        // server: every sixteenth of the age kept, from once a second to once in ten minutes.
        if let Some(age) = self.retention.keep_for.filter(|a| !a.is_zero()) {
            let period = (age / 16).clamp(Duration::from_secs(1), Duration::from_secs(600));
            let table = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(jobs) = table.upgrade() else { return };
                    let gone = jobs.sweep();
                    if gone > 0 {
                        tracing::info!(
                            "job store: {gone} finished job(s) past --keep-jobs-for removed"
                        );
                    }
                }
            });
        }
        let mut out = Restored {
            skipped: loaded.skipped,
            ..Restored::default()
        };
        let mut again = Vec::new();
        let victims = {
            let mut table = self.table();
            for stored in loaded.jobs {
                let job = Arc::new(Job::from_record(stored.record, stored.events));
                if table.contains_key(&job.id) {
                    continue;
                }
                if job.state() == JobState::Running {
                    self.active.fetch_add(1, Ordering::SeqCst);
                    again.push((job.clone(), stored.request));
                }
                table.insert(job.id.clone(), job);
            }
            self.take_expired(&mut table, 0)
        };
        out.removed = victims.len();
        self.forget_all(&victims);
        out.finished = self.len() - again.len();
        for (job, request) in again {
            let runs = job.lock().runs;
            let why = match &request {
                None => Some(
                    "the server stopped while the job was running, and its request could not be \
                     read back to run it again"
                        .to_string(),
                ),
                Some(_) if runs >= MAX_RUNS => Some(format!(
                    "the server stopped during each of the job's {runs} runs; it is not run again"
                )),
                Some(_) => None,
            };
            let (Some(request), None) = (request, &why) else {
                out.failed += 1;
                let error = json!({"message": why, "type": "server_error"});
                self.finish(
                    &job,
                    JobState::Failed,
                    |inner| inner.error = Some(error),
                    true,
                );
                continue;
            };
            out.requeued += 1;
            let run = {
                let mut inner = job.lock();
                inner.runs += 1;
                inner.runs
            };
            let ev = json!({
                "object": "job.requeued",
                "id": job.id,
                "run": run,
                "time": unix_now(),
                "message": format!(
                    "the server stopped while the job was running (run {}); it runs again from \
                     the start under the same id",
                    run - 1
                ),
            });
            self.add_event(&job, ev);
            self.persist(&job, "record its new run", |s| s.update(&job.record()));
            self.start(job, request.task, request.format);
        }
        Ok(out)
    }

    /// Where the jobs are stored, if anywhere.
    pub fn store(&self) -> Option<&Arc<dyn JobStore>> {
        self.store.as_ref()
    }

    /// Resolves once no job is running (and every ended job's end is stored).
    pub async fn wait_idle(&self) {
        let mut ended = self.ended.subscribe();
        while self.active.load(Ordering::SeqCst) > 0 {
            if ended.changed().await.is_err() {
                return;
            }
        }
    }

    /// Ends a running job, counting it and (if `durable`) storing its end; false if it had
    /// ended already (cancelled meanwhile).
    fn finish(
        &self,
        job: &Job,
        state: JobState,
        f: impl FnOnce(&mut JobInner),
        durable: bool,
    ) -> bool {
        let ended = job.end(state, f);
        if ended {
            self.metrics.record_job(state.name());
            if durable {
                self.persist(job, "record its end", |s| s.update(&job.record()));
            }
            self.active.fetch_sub(1, Ordering::SeqCst);
            self.ended.send_modify(|n| *n += 1);
            // Not at a shutdown's cancel: those jobs are to run again, not to be removed.
            if durable {
                let victims = self.take_expired(&mut self.table(), 0);
                self.forget_all(&victims);
            }
        }
        ended
    }

    /// Runs `f` on the store for `job`, unless the job is gone; a failure is logged, and the
    /// job goes on in memory.
    fn persist(&self, job: &Job, what: &str, f: impl FnOnce(&dyn JobStore) -> std::io::Result<()>) {
        let Some(store) = &self.store else { return };
        let gone = job.io.lock().unwrap_or_else(|p| p.into_inner());
        if *gone {
            return;
        }
        if let Err(e) = f(store.as_ref()) {
            tracing::warn!(job = %job.id, "job store {}: cannot {what}: {e}", store.describe());
        }
    }

    /// Removes the finished jobs retention no longer keeps (the timer `restore` starts runs
    /// it, so that an idle server forgets old jobs too). How many went.
    pub fn sweep(&self) -> usize {
        let victims = self.take_expired(&mut self.table(), 0);
        self.forget_all(&victims);
        victims.len()
    }

    /// Removes jobs (already out of the table) from the store.
    fn forget_all(&self, jobs: &[Arc<Job>]) {
        for job in jobs {
            let mut gone = job.io.lock().unwrap_or_else(|p| p.into_inner());
            *gone = true;
            if let Some(store) = &self.store {
                if let Err(e) = store.remove(&job.id) {
                    tracing::warn!(job = %job.id, "job store {}: cannot remove the job: {e}", store.describe());
                }
            }
        }
    }

    /// Takes out of the table the finished jobs retention removes, with `room` more to come.
    fn take_expired(&self, table: &mut HashMap<String, Arc<Job>>, room: usize) -> Vec<Arc<Job>> {
        let kept: Vec<store::Kept> = table
            .values()
            .map(|j| store::Kept {
                id: j.id.clone(),
                finished: {
                    let inner = j.lock();
                    inner.finished.filter(|_| inner.state.is_done())
                },
                bytes: self.store.as_ref().map_or(0, |s| s.bytes(&j.id)),
            })
            .collect();
        store::expired(
            &kept,
            unix_now(),
            self.limits.max_kept,
            room,
            &self.retention,
        )
        .iter()
        .filter_map(|id| table.remove(id))
        .collect()
    }

    /// Keeps an event, and stores it.
    fn add_event(&self, job: &Job, ev: Value) {
        if self.store.is_some() {
            if job.push_event(ev.clone()) {
                self.persist(job, "store an event", |s| s.append_event(&job.id, &ev));
            }
        } else {
            job.push_event(ev);
        }
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn running(&self) -> usize {
        self.table()
            .values()
            .filter(|j| j.state() == JobState::Running)
            .count()
    }

    /// Jobs in the table, running and finished.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.table().get(id).cloned()
    }

    /// Starts a job, or refuses it whole (429) when as many as allowed are running; with a
    /// store, the job is stored before this returns (503 if it cannot be).
    pub fn submit(self: &Arc<Self>, task: TaskRequest, format: Format) -> ApiResult<Arc<Job>> {
        for _ in 0..3 {
            let (job, victims) = {
                let mut table = self.table();
                let running = table
                    .values()
                    .filter(|j| j.state() == JobState::Running)
                    .count();
                if running >= self.limits.max_running {
                    return Err(ApiError::overloaded(format!(
                        "{running} jobs are running (limit {}); retry later",
                        self.limits.max_running
                    )));
                }
                let victims = self.take_expired(&mut table, 1);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let id = loop {
                    let serial = self.serial.fetch_add(1, Ordering::Relaxed);
                    let id = format!("job-{:x}{serial:04x}", now.as_millis());
                    if !table.contains_key(&id) {
                        break id;
                    }
                };
                let inner = JobInner {
                    state: JobState::Running,
                    events: Vec::new(),
                    events_dropped: 0,
                    result: None,
                    output: None,
                    error: None,
                    runs: 1,
                    finished: None,
                };
                let task = task.task.chars().take(200).collect();
                let job = Arc::new(Job::new(id, now.as_secs(), task, inner));
                table.insert(job.id.clone(), job.clone());
                self.active.fetch_add(1, Ordering::SeqCst);
                (job, victims)
            };
            self.forget_all(&victims);
            if let Some(store) = &self.store {
                let request = StoredRequest {
                    task: task.clone(),
                    format,
                };
                if let Err(e) = store.create(&job.record(), &request) {
                    self.table().remove(&job.id);
                    self.active.fetch_sub(1, Ordering::SeqCst);
                    self.ended.send_modify(|n| *n += 1);
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        continue;
                    }
                    tracing::error!(job = %job.id, "job store {}: cannot store a new job: {e}", store.describe());
                    return Err(ApiError::unavailable(format!(
                        "the job could not be stored ({e}); retry later"
                    )));
                }
            }
            self.start(job.clone(), task, format);
            return Ok(job);
        }
        Err(ApiError::internal("no free job id"))
    }

    /// Runs a job that is in the table (and counted active) on the runner.
    fn start(self: &Arc<Self>, job: Arc<Job>, task: TaskRequest, format: Format) {
        let (tx, rx) = mpsc::unbounded_channel();
        let run = tokio::spawn(self.runner.run(task, format, tx));
        if let Ok(mut a) = job.abort.lock() {
            *a = Some(run.abort_handle());
        }
        tokio::spawn(watch_job(self.clone(), job, run, rx));
    }

    /// Cancels a running job (true), or removes a finished one from the table and the store
    /// (false).
    pub fn cancel_or_remove(&self, job: &Arc<Job>) -> bool {
        if self.cancel(job) {
            return true;
        }
        let removed = self.table().remove(&job.id);
        if let Some(j) = removed {
            self.forget_all(&[j]);
        }
        false
    }

    fn cancel(&self, job: &Job) -> bool {
        self.cancel_with(job, "the job was cancelled", true)
    }

    fn cancel_with(&self, job: &Job, why: &str, durable: bool) -> bool {
        let cancelled = self.finish(
            job,
            JobState::Cancelled,
            |inner| {
                inner.error = Some(json!({"message": why}));
            },
            durable,
        );
        if cancelled {
            if let Some(a) = job.abort.lock().ok().and_then(|mut a| a.take()) {
                a.abort();
            }
        }
        cancelled
    }

    /// Cancels every running job (the end of a shutdown's grace period); how many it did.
    /// With a store their end is not stored: they run again when the server starts again.
    pub fn cancel_all(&self) -> usize {
        let jobs: Vec<Arc<Job>> = self.table().values().cloned().collect();
        let why = if self.store.is_some() {
            "the server shut down and the job did not finish within the grace period; it runs \
             again when the server starts again on the same data directory"
        } else {
            "the server shut down and the job did not finish within the grace period"
        };
        jobs.iter()
            .filter(|j| self.cancel_with(j, why, false))
            .count()
    }
}

impl crate::Server {
    /// Runs pipeline jobs as `with_jobs` does, keeping them in `store` within `limits` and
    /// `retention`: loads what the store holds (on a tokio runtime), and runs again the jobs
    /// that were running when the store's last server stopped. An error only when the store
    /// cannot be read at all.
    pub fn with_stored_jobs(
        mut self,
        pipeline: Pipeline,
        limits: JobLimits,
        store: Arc<dyn JobStore>,
        retention: Retention,
    ) -> std::io::Result<(Self, Restored)> {
        let jobs =
            Jobs::new(pipeline, self.state.metrics.clone(), limits).with_store(store, retention);
        let jobs = Arc::new(jobs);
        let restored = jobs.restore()?;
        self.state.jobs = Some(jobs);
        Ok((self, restored))
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
            Some(ev) = rx.recv() => record(&jobs, &job, ev),
            r = &mut run => break r,
        }
    };
    while let Ok(ev) = rx.try_recv() {
        record(&jobs, &job, ev);
    }
    let metrics = &jobs.metrics;
    let failed = |message: String, kind: &str| {
        let error = json!({"message": message, "type": kind});
        jobs.finish(
            &job,
            JobState::Failed,
            |inner| inner.error = Some(error),
            true,
        );
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
            jobs.finish(
                &job,
                JobState::Succeeded,
                |inner| {
                    inner.result = Some(value);
                    inner.output = Some(rendered);
                },
                true,
            );
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

/// Keeps (and stores) an event as the API streams it, and counts stage verdicts.
fn record(jobs: &Jobs, job: &Job, ev: JobEvent) {
    let v = api_event(&jobs.metrics, &ev);
    jobs.add_event(job, v);
}

/// A stage event as the API streams it (`"object": "job.event"`), its verdict counted in
/// the stage metrics; both job tables (local and cluster) record events through it.
pub(crate) fn api_event(metrics: &Metrics, ev: &JobEvent) -> Value {
    match ev.status {
        EventStatus::Passed => metrics.record_stage_result(ev.stage.name(), true),
        EventStatus::Failed => metrics.record_stage_result(ev.stage.name(), false),
        _ => {}
    }
    let mut v = serde_json::to_value(ev).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut v {
        o.insert("object".into(), json!("job.event"));
    }
    v
}

#[cfg(test)]
mod tests;
