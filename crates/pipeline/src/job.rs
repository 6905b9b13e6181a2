//! A pipeline and its jobs: `Pipeline` holds what every job shares (the models, the
//! sandbox, the prompts, the config, the validation queue); `JobContext` is one job's view,
//! through which every stage makes its LLM calls; `Pipeline::run` takes a task through
//! every stage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use forgeline_engine::constraint::Constraint;
use forgeline_engine::scheduler::{Completion, GenerateRequest, Priority, Prompt};
use forgeline_sandbox::Sandbox;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::collector;
use crate::config::PipelineConfig;
use crate::dispatcher;
use crate::final_validation::{self, Checked};
use crate::formatter::{self, Format};
use crate::llm::LanguageModel;
use crate::orchestrator::{self, Plan};
use crate::planning::{self, Dag};
use crate::prompts::{Prompts, RenderedPrompt};
use crate::python;
use crate::retry::SubtaskResult;
use crate::router::{self, Route, RouteKind};
use crate::smoke;
use crate::stage::{LlmStage, Stage, StageOutput};
use crate::synthesizer::{FileRole, OutputFile, Synthesis};
use crate::task::TaskRequest;
use crate::trace::{EventStatus, JobEvent, LlmCallRecord, Recorder, TraceData};
use crate::validation::{QueueStats, ValidationQueue};
use crate::validators::{Evidence, Verdict, VerdictStatus};
use crate::workers::{KindStats, WorkerKind};
use crate::{Error, Result};

/// The name of the module a job writes (`solution.py`).
pub const MODULE_NAME: &str = "solution";

/// Calls in flight per model, to send each call to the least busy model that serves its
/// stage.
#[derive(Default)]
struct ModelLoad(Mutex<HashMap<String, usize>>);

impl ModelLoad {
    fn pick(&self, models: &[String]) -> Option<String> {
        let mut m = self.0.lock().ok()?;
        let name = models
            .iter()
            .min_by_key(|n| m.get(*n).copied().unwrap_or(0))?
            .clone();
        *m.entry(name.clone()).or_default() += 1;
        Some(name)
    }

    fn done(&self, name: &str) {
        if let Ok(mut m) = self.0.lock() {
            if let Some(n) = m.get_mut(name) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

struct Shared {
    llm: Arc<dyn LanguageModel>,
    sandbox: Sandbox,
    prompts: Prompts,
    config: PipelineConfig,
    queue: ValidationQueue,
    load: ModelLoad,
    /// Candidates in flight beyond each job's own few (`shared_candidates_in_flight`).
    candidate_slots: Semaphore,
    next_job: AtomicU64,
}

/// The pipeline: cheap to clone, shared by every job (jobs run concurrently and their
/// LLM calls batch together in the scheduler).
#[derive(Clone)]
pub struct Pipeline {
    shared: Arc<Shared>,
}

/// One LLM call a stage makes.
pub struct LlmCall {
    /// The stage whose settings apply.
    pub stage: LlmStage,
    pub prompt: RenderedPrompt,
    schema: Option<Value>,
    subtask: Option<String>,
    seed: u64,
    temperature: Option<f32>,
    stop: Vec<String>,
    raise_priority: bool,
    max_tokens: Option<usize>,
}

impl LlmCall {
    pub fn new(stage: LlmStage, prompt: RenderedPrompt) -> Self {
        Self {
            stage,
            prompt,
            schema: None,
            subtask: None,
            seed: 0,
            temperature: None,
            stop: Vec::new(),
            raise_priority: false,
            max_tokens: None,
        }
    }

    /// Fewer tokens than the stage allows.
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Constrains the answer to a JSON schema while it is sampled.
    pub fn schema(mut self, schema: Value) -> Self {
        self.schema = Some(schema);
        self
    }

    pub fn subtask(mut self, id: &str) -> Self {
        self.subtask = Some(id.to_string());
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = Some(t);
        self
    }

    pub fn stop(mut self, s: &str) -> Self {
        self.stop.push(s.to_string());
        self
    }

    /// One scheduling class up: work on the job's critical path.
    pub fn raise_priority(mut self) -> Self {
        self.raise_priority = true;
        self
    }
}

/// One job's view of the pipeline: its task, and the pipeline's shared parts (read through
/// `Shared`, the one copy). Stages make their LLM calls through it (each recorded in the
/// trace) and report progress; the trace of the stages themselves is the pipeline's to
/// write (`JobContext::step`). Cheap to clone.
#[derive(Clone)]
pub struct JobContext {
    shared: Arc<Shared>,
    rec: Recorder,
    pub task: Arc<TaskRequest>,
}

impl JobContext {
    /// Milliseconds since the job started.
    pub fn elapsed_ms(&self) -> u64 {
        self.rec.elapsed_ms()
    }

    /// A live progress event (a subtask dispatched, a candidate checked): for a terminal's
    /// progress and the server's event stream, not the trace.
    pub fn progress(
        &self,
        stage: Stage,
        status: EventStatus,
        subtask: Option<&str>,
        attempt: Option<usize>,
        message: impl Into<String>,
    ) {
        self.rec.event(stage, status, subtask, attempt, message);
    }

    /// Runs one stage of the job and records it: a started event, the stage, then its
    /// trace record (the input as given, the output as it shows itself) and its end event.
    async fn step<T: StageOutput>(
        &self,
        stage: Stage,
        attempt: Option<usize>,
        doing: &str,
        input: Value,
        run: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = self.rec.elapsed_ms();
        self.rec
            .event(stage, EventStatus::Started, None, attempt, doing);
        let out = run.await?;
        self.rec
            .stage(stage, None, started, input, out.trace_output());
        let (status, message) = out.outcome();
        self.rec.event(stage, status, None, attempt, message);
        Ok(out)
    }

    /// Records a stage this job does not need, and why.
    fn skip(&self, stage: Stage, input: Value, why: &str) {
        self.rec.stage(
            stage,
            None,
            self.rec.elapsed_ms(),
            input,
            json!({"skipped": why}),
        );
        self.rec.event(stage, EventStatus::Skipped, None, None, why);
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.shared.config
    }

    pub fn prompts(&self) -> &Prompts {
        &self.shared.prompts
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.shared.sandbox
    }

    pub fn queue(&self) -> &ValidationQueue {
        &self.shared.queue
    }

    /// The module name the result is saved and imported as.
    pub fn module_name(&self) -> String {
        MODULE_NAME.into()
    }

    /// Waits until one more of an attempt's candidates may be written: a permit of the
    /// attempt's own (`own`, `job_candidates_in_flight` of them), or else one shared by
    /// every job. Waiters are served in order, so earlier candidates (the greedy ones
    /// first) start first. Dropping the permit lets the next candidate start.
    /// (`None` only if a semaphore were closed, which neither is.)
    pub async fn candidate_permit<'a>(&'a self, own: &'a Semaphore) -> Option<SemaphorePermit<'a>> {
        // Biased: the attempt's own permit first, when both are free.
        tokio::select! {
            biased;
            p = own.acquire() => p.ok(),
            p = self.shared.candidate_slots.acquire() => p.ok(),
        }
    }

    /// Runs an LLM call with its stage's settings on the least busy model of the stage,
    /// and records it in the trace.
    pub async fn llm(&self, call: LlmCall) -> Result<Completion> {
        let settings = self.config().stage(call.stage);
        let llm = &self.shared.llm;
        let model = self.shared.load.pick(&settings.models);
        let _release = ReleaseOnDrop(&self.shared.load, model.clone());
        let prompt = if call.prompt.assistant.is_empty() {
            Prompt::Chat(call.prompt.messages())
        } else {
            Prompt::ChatContinue {
                messages: call.prompt.messages(),
                assistant_prefix: call.prompt.assistant.clone(),
            }
        };
        let max_tokens = call
            .max_tokens
            .map_or(settings.max_tokens, |n| n.min(settings.max_tokens));
        let mut req = GenerateRequest::new(prompt, max_tokens);
        req.model = model.clone();
        // Leave the answer the room the context has (a long task or file eats into it).
        let context = llm.context_length(model.as_deref())?;
        let prompt_len = llm.prompt_tokens(&req)?;
        if prompt_len >= context {
            return Err(Error::InvalidTask(format!(
                "the {} prompt is {prompt_len} tokens; the model's context is {context} (shorten the task or the files)",
                call.stage
            )));
        }
        req.max_tokens = req.max_tokens.min(context - prompt_len);
        req.sampling = settings.sampling(call.seed);
        if let Some(t) = call.temperature {
            req.sampling.temperature = t;
            if req.sampling.top_p >= 1.0 {
                req.sampling.top_p = 0.95;
            }
        }
        req.priority = if call.raise_priority {
            match settings.priority {
                Priority::Low => Priority::Normal,
                Priority::Normal => Priority::High,
                _ => Priority::Critical,
            }
        } else {
            settings.priority
        };
        req.stop_strings = call.stop.clone();
        req.constraint = call.schema.clone().map(Constraint::JsonSchema);
        let started = self.rec.elapsed_ms();
        let out = llm.complete(req).await?;
        self.rec.llm_call(LlmCallRecord {
            stage: call.stage,
            subtask: call.subtask,
            model: model.unwrap_or_else(|| llm.models().first().cloned().unwrap_or_default()),
            prompt: call.prompt,
            constrained: call.schema.is_some(),
            output: out.text.clone(),
            prompt_tokens: out.usage.prompt_tokens,
            cached_prompt_tokens: out.usage.cached_prompt_tokens,
            completion_tokens: out.usage.completion_tokens,
            started_ms: started,
            duration_ms: self.rec.elapsed_ms().saturating_sub(started),
            stop_reason: out.stop_reason,
        });
        Ok(out)
    }
}

struct ReleaseOnDrop<'a>(&'a ModelLoad, Option<String>);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(n) = &self.1 {
            self.0.done(n);
        }
    }
}

/// A subtask in the result.
#[derive(Clone, Debug, Serialize)]
pub struct SubtaskSummary {
    pub id: String,
    pub kind: String,
    /// What execution proved about its best output (`failed` when it has none).
    pub status: VerdictStatus,
    /// Its best output had no failing hard check, so no retry was needed.
    pub accepted: bool,
    pub attempts: usize,
    pub stopped: String,
}

/// What a job returns.
#[derive(Clone, Debug, Serialize)]
pub struct JobResult {
    pub job: u64,
    /// The result is `verified`: trusted checks ran and passed (`verdict.status` says
    /// what else it can be, and `verdict.evidence` what each check proved).
    pub passed: bool,
    pub route: RouteKind,
    pub entry_point: Option<String>,
    pub files: Vec<OutputFile>,
    pub answer: String,
    pub verdict: Verdict,
    pub notes: Vec<String>,
    pub subtasks: Vec<SubtaskSummary>,
    pub synthesis_revisions: usize,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub llm_calls: usize,
    pub wall_ms: u64,
}

impl JobResult {
    /// The main module's source, if the result has one.
    pub fn module(&self) -> Option<&str> {
        self.files
            .iter()
            .find(|f| f.role == FileRole::Module)
            .map(|f| f.content.as_str())
    }
}

/// Everything a job did, for `--trace`.
#[derive(Clone, Debug, Serialize)]
pub struct JobTrace {
    pub job: u64,
    pub task: TaskRequest,
    pub config: PipelineConfig,
    pub route: Route,
    pub plan: Plan,
    pub dag: Dag,
    pub subtasks: Vec<SubtaskResult>,
    pub workers: std::collections::BTreeMap<String, KindStats>,
    pub validation_queue: QueueStats,
    pub synthesis: Synthesis,
    pub final_verdict: Verdict,
    /// Stages in the order they finished.
    pub stages: Vec<crate::trace::StageRecord>,
    pub llm_calls: Vec<LlmCallRecord>,
    pub result: JobResult,
}

/// A job that failed: the error, the stage it was in (of its latest event), and what its
/// stages recorded until then.
#[derive(Debug)]
pub struct JobFailure {
    pub error: Error,
    pub stage: Option<Stage>,
    pub trace: TraceData,
}

/// A finished job: the result, rendered in the asked format, and its trace.
pub struct JobOutcome {
    pub result: JobResult,
    pub rendered: String,
    pub trace: JobTrace,
}

impl Pipeline {
    /// Must be called inside a tokio runtime (it starts the validation runners).
    pub fn new(
        llm: Arc<dyn LanguageModel>,
        sandbox: Sandbox,
        prompts: Prompts,
        config: PipelineConfig,
    ) -> Self {
        let queue = ValidationQueue::start(config.limits.validators);
        let candidate_slots = Semaphore::new(config.limits.shared_candidates_in_flight);
        Self {
            shared: Arc::new(Shared {
                llm,
                sandbox,
                prompts,
                config,
                queue,
                load: ModelLoad::default(),
                candidate_slots,
                next_job: AtomicU64::new(1),
            }),
        }
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.shared.config
    }

    pub fn validation_stats(&self) -> QueueStats {
        self.shared.queue.stats()
    }

    pub(crate) fn context(
        &self,
        task: TaskRequest,
        events: Option<UnboundedSender<JobEvent>>,
    ) -> JobContext {
        let job = self.shared.next_job.fetch_add(1, Ordering::Relaxed);
        JobContext {
            rec: Recorder::new(job, events),
            task: Arc::new(task),
            shared: self.shared.clone(),
        }
    }

    /// Takes a task through every stage. Dropping the future cancels the job (its LLM
    /// calls and queued validations are dropped).
    pub async fn run(
        &self,
        task: TaskRequest,
        format: Format,
        events: Option<UnboundedSender<JobEvent>>,
    ) -> Result<JobOutcome> {
        self.run_traced(task, format, events)
            .await
            .map_err(|f| f.error)
    }

    /// [`Pipeline::run`], and on failure what the job's stages recorded until it failed.
    /// A stage that panics (a bug) fails its job with [`Error::Internal`] and nothing
    /// else: the pipeline, its validation runners and other jobs go on.
    pub async fn run_traced(
        &self,
        task: TaskRequest,
        format: Format,
        events: Option<UnboundedSender<JobEvent>>,
    ) -> std::result::Result<JobOutcome, JobFailure> {
        if let Err(error) = task.validate() {
            return Err(JobFailure {
                error,
                stage: None,
                trace: TraceData::default(),
            });
        }
        let ctx = self.context(task, events);
        let run = std::panic::AssertUnwindSafe(self.run_stages(&ctx, format));
        let error = match futures_util::FutureExt::catch_unwind(run).await {
            Ok(Ok(outcome)) => return Ok(outcome),
            Ok(Err(e)) => e,
            Err(panic) => Error::Internal(crate::panic_message(&*panic)),
        };
        let stage = ctx.rec.current_stage();
        ctx.rec.event(
            stage.unwrap_or(Stage::Router),
            EventStatus::Failed,
            None,
            None,
            format!("the job failed: {error}"),
        );
        Err(JobFailure {
            error,
            stage,
            trace: ctx.rec.snapshot(),
        })
    }

    async fn run_stages(&self, ctx: &JobContext, format: Format) -> Result<JobOutcome> {
        let task = ctx.task.clone();
        let limits = &ctx.config().limits;
        let router::Routed { route, .. } = ctx
            .step(
                Stage::Router,
                None,
                "routing the task",
                json!({"task": task.task, "files": task.file_names(), "tests_supplied": task.tests.is_some()}),
                router::route(ctx, &task),
            )
            .await?;
        let orchestrator::Planned { plan, .. } = ctx
            .step(
                Stage::Orchestrator,
                None,
                "planning subtasks",
                json!({"task": task.task, "route": route.kind}),
                orchestrator::plan(ctx, &task, &route),
            )
            .await?;
        let dag = ctx
            .step(
                Stage::Planning,
                None,
                "building the DAG",
                json!({"plan": plan}),
                async { Ok(planning::build_dag(&plan, &route, limits.max_subtasks)) },
            )
            .await?;
        let program = smoke::is_program(&route, &task.task);
        let evidence = Evidence {
            module: ctx.module_name(),
            examples: python::examples_test(&ctx.module_name(), &route.examples),
            supplied: task.tests.clone(),
            generated: Vec::new(),
            program,
            smoke: match program {
                true => smoke::generate(ctx, &route).await,
                false => None,
            },
            agreement: None,
        };
        let dispatched = ctx
            .step(
                Stage::Dispatcher,
                None,
                "dispatching subtasks",
                dispatcher::trace_input(&dag, limits.max_concurrent_workers),
                async {
                    let mut d = dispatcher::dispatch(ctx, &route, &dag, &evidence).await;
                    // The subtasks' own steps, in the order they finished (before the
                    // dispatcher did).
                    let mut steps: Vec<_> = d
                        .results
                        .iter_mut()
                        .flat_map(|r| std::mem::take(&mut r.log))
                        .collect();
                    steps.sort_by_key(|s| s.started_ms + s.duration_ms);
                    ctx.rec.stages(steps);
                    Ok(d)
                },
            )
            .await?;
        let dispatcher::Dispatched {
            results, workers, ..
        } = dispatched;
        let collected = ctx
            .step(
                Stage::Collector,
                None,
                "collecting outputs",
                collector::trace_input(&results),
                async { Ok(collector::collect(&dag, &results, MODULE_NAME)) },
            )
            .await?;
        let synthesis = ctx
            .step(
                Stage::Synthesizer,
                None,
                "integrating outputs",
                json!({"outputs": collected.outputs.iter().map(|o| &o.subtask).collect::<Vec<_>>()}),
                // Code alone shows no prose: none is written for it.
                crate::synthesizer::synthesize(ctx, &route, &collected, format != Format::Code),
            )
            .await?;
        // The candidates' agreement is evidence while the result is the one code output
        // that selection chose.
        let mut final_evidence = evidence.clone();
        if collected.of_kind(WorkerKind::Code).count() == 1 {
            final_evidence.agreement = final_validation::agreement(&results);
        }
        let Checked { synthesis, verdict } = self
            .final_validation(ctx, &route, synthesis, &final_evidence)
            .await?;
        let trace = ctx.rec.snapshot();
        let mut notes: Vec<String> = dag.repairs.iter().map(|r| format!("plan: {r}")).collect();
        if let Some(f) = &plan.fallback {
            notes.insert(0, format!("plan: one-subtask plan ({f})"));
        }
        if let Some(c) = &plan.cut {
            notes.insert(0, format!("plan: the subtasks the model finished ({c})"));
        }
        notes.extend(synthesis.notes.iter().cloned());
        let mut result = JobResult {
            job: ctx.rec.job,
            passed: verdict.status == VerdictStatus::Verified,
            route: route.kind,
            entry_point: route.entry_point.clone(),
            files: synthesis.files(&ctx.module_name()),
            answer: synthesis.answer.clone(),
            verdict: verdict.clone(),
            notes,
            subtasks: results
                .iter()
                .map(|r| SubtaskSummary {
                    id: r.spec.id.clone(),
                    kind: r.spec.kind.name().into(),
                    status: r
                        .verdict
                        .as_ref()
                        .map_or(VerdictStatus::Failed, |v| v.status),
                    accepted: r.passed,
                    attempts: r.attempts.len(),
                    stopped: r.stopped.clone(),
                })
                .collect(),
            synthesis_revisions: synthesis.revision,
            prompt_tokens: trace.llm_calls.iter().map(|c| c.prompt_tokens).sum(),
            completion_tokens: trace.llm_calls.iter().map(|c| c.completion_tokens).sum(),
            llm_calls: trace.llm_calls.len(),
            wall_ms: ctx.rec.elapsed_ms(),
        };
        let rendered = ctx
            .step(
                Stage::Formatter,
                None,
                "rendering the result",
                json!({"format": format}),
                async { formatter::render(ctx, &result, format) },
            )
            .await?
            .text;
        result.wall_ms = ctx.rec.elapsed_ms();
        let TraceData { stages, llm_calls } = ctx.rec.snapshot();
        let trace = JobTrace {
            job: ctx.rec.job,
            task: (*task).clone(),
            config: ctx.config().clone(),
            route,
            plan,
            dag,
            subtasks: results,
            workers,
            validation_queue: self.shared.queue.stats(),
            synthesis,
            final_verdict: verdict,
            stages,
            llm_calls,
            result: result.clone(),
        };
        Ok(JobOutcome {
            result,
            rendered,
            trace,
        })
    }
}

impl Pipeline {
    /// Stages 12 and 13: the final validator on the synthesis, then re-syntheses from the
    /// best revision's feedback while they are allowed and it has not passed.
    async fn final_validation(
        &self,
        ctx: &JobContext,
        route: &Route,
        synthesis: Synthesis,
        evidence: &Evidence,
    ) -> Result<Checked> {
        let revision = synthesis.revision;
        let mut best = ctx
            .step(
                Stage::FinalValidator,
                Some(1),
                "checking the whole result",
                json!({"revision": revision}),
                final_validation::first_check(ctx, route, synthesis, evidence),
            )
            .await?;
        let retries = ctx.config().limits.max_synthesis_retries;
        if let Some(why) = final_validation::no_retry(&best, retries) {
            ctx.skip(
                Stage::SynthesizerRetry,
                json!({"max_retries": retries}),
                why,
            );
            return Ok(best);
        }
        for n in 1..=retries {
            let revision = ctx
                .step(
                    Stage::SynthesizerRetry,
                    Some(n),
                    "re-synthesizing with the final feedback",
                    json!({"feedback": best.verdict.feedback}),
                    final_validation::retry(ctx, route, &best, evidence),
                )
                .await?;
            if let (true, Some(c)) = (revision.kept, revision.checked) {
                best = c;
            }
            if best.verdict.passed {
                break;
            }
        }
        Ok(best)
    }
}

/// The trace as JSON, with the stages it covers listed first.
pub fn trace_json(t: &JobTrace) -> Value {
    let mut seen: Vec<&str> = Vec::new();
    for s in &t.stages {
        let n = s.stage.name();
        if !seen.contains(&n) {
            seen.push(n);
        }
    }
    let mut v = serde_json::to_value(t).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.insert("stages_seen".into(), json!(seen));
    }
    v
}
