//! What a job did, for people and programs: live `JobEvent`s (progress on a terminal, SSE
//! on the server) and the `Trace` written with `--trace`: every stage's input, prompt,
//! output, tokens, timings, attempts and verdicts.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use forgeline_engine::stop::StopReason;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use crate::prompts::RenderedPrompt;
pub use crate::stage::{LlmStage, Stage};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    Started,
    Progress,
    Passed,
    Failed,
    /// Done, with no pass/fail meaning (a plan made, files written).
    Finished,
    /// Not needed for this job (no retry after a pass).
    Skipped,
}

impl EventStatus {
    /// Passed or Failed.
    pub fn of(passed: bool) -> Self {
        if passed {
            Self::Passed
        } else {
            Self::Failed
        }
    }
}

/// One step of a job, as it happens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job: u64,
    pub stage: Stage,
    pub status: EventStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtask: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<usize>,
    pub message: String,
    pub elapsed_ms: u64,
}

/// One stage's record.
#[derive(Clone, Debug, Serialize)]
pub struct StageRecord {
    pub stage: Stage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtask: Option<String>,
    pub started_ms: u64,
    pub duration_ms: u64,
    pub input: Value,
    pub output: Value,
}

/// One LLM call.
#[derive(Clone, Debug, Serialize)]
pub struct LlmCallRecord {
    pub stage: LlmStage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtask: Option<String>,
    pub model: String,
    pub prompt: RenderedPrompt,
    pub constrained: bool,
    pub output: String,
    pub prompt_tokens: usize,
    pub cached_prompt_tokens: usize,
    pub completion_tokens: usize,
    pub started_ms: u64,
    pub duration_ms: u64,
    /// Written by its Rust name (`MaxTokens`), as traces always have.
    #[serde(serialize_with = "stop_reason_name")]
    pub stop_reason: StopReason,
}

fn stop_reason_name<S: serde::Serializer>(r: &StopReason, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{r:?}"))
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TraceData {
    pub stages: Vec<StageRecord>,
    pub llm_calls: Vec<LlmCallRecord>,
}

/// The live record of one job, shared by its stages.
#[derive(Clone)]
pub struct Recorder {
    pub job: u64,
    started: Instant,
    data: Arc<Mutex<TraceData>>,
    events: Option<UnboundedSender<JobEvent>>,
    /// The stage of the latest event: where a job that fails was.
    current: Arc<Mutex<Option<Stage>>>,
}

impl Recorder {
    pub fn new(job: u64, events: Option<UnboundedSender<JobEvent>>) -> Self {
        Self {
            job,
            started: Instant::now(),
            data: Arc::default(),
            events,
            current: Arc::default(),
        }
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn event(
        &self,
        stage: Stage,
        status: EventStatus,
        subtask: Option<&str>,
        attempt: Option<usize>,
        message: impl Into<String>,
    ) {
        let ev = JobEvent {
            job: self.job,
            stage,
            status,
            subtask: subtask.map(str::to_string),
            attempt,
            message: message.into(),
            elapsed_ms: self.elapsed_ms(),
        };
        tracing::debug!(job = ev.job, stage = stage.name(), status = ?status, "{}", ev.message);
        if let Ok(mut c) = self.current.lock() {
            *c = Some(stage);
        }
        if let Some(tx) = &self.events {
            let _ = tx.send(ev);
        }
    }

    /// Records a finished stage that started at `started_ms`.
    pub fn stage(
        &self,
        stage: Stage,
        subtask: Option<&str>,
        started_ms: u64,
        input: Value,
        output: Value,
    ) {
        let rec = StageRecord {
            stage,
            subtask: subtask.map(str::to_string),
            started_ms,
            duration_ms: self.elapsed_ms().saturating_sub(started_ms),
            input,
            output,
        };
        if let Ok(mut d) = self.data.lock() {
            d.stages.push(rec);
        }
    }

    /// Records finished stages (a subtask's attempts, kept in its result until then).
    pub fn stages(&self, recs: Vec<StageRecord>) {
        if let Ok(mut d) = self.data.lock() {
            d.stages.extend(recs);
        }
    }

    pub fn llm_call(&self, rec: LlmCallRecord) {
        if let Ok(mut d) = self.data.lock() {
            d.llm_calls.push(rec);
        }
    }

    /// The stage of the latest event, if any.
    pub fn current_stage(&self) -> Option<Stage> {
        self.current.lock().ok().and_then(|c| *c)
    }

    pub fn snapshot(&self) -> TraceData {
        self.data.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Completion tokens of every call so far.
    pub fn completion_tokens(&self) -> usize {
        self.data
            .lock()
            .map(|d| d.llm_calls.iter().map(|c| c.completion_tokens).sum())
            .unwrap_or(0)
    }
}
