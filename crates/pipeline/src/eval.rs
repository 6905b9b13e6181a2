//! Evaluation on HumanEval-format tasks (`task_id`, `prompt`, `test`, `entry_point`): each
//! task run through the pipeline, through the single-call baseline (one chat call asking
//! for the function, its code block extracted), or through sample-filter (several samples
//! of that call, the first that passes the task's own `>>>` examples kept), then scored by
//! its hidden test in the sandbox. No method ever sees the hidden test: the harness runs it
//! only after a task's method has finished.
//!
//! Besides pass@1 the harness measures how well a method picks among what it wrote: its
//! oracle, whether ANY program it wrote for a task passes the hidden test (for the
//! pipeline: every candidate of every attempt of the primary code subtask, and each
//! synthesis revision's module; for sample-filter: every sample), and the pipeline's
//! pass@1 by the verdict it gave each result.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forgeline_engine::chat::ChatMessage;
use forgeline_engine::scheduler::GenerateRequest;
use forgeline_sandbox::{Check, Limits, Module, Sandbox, TestKind, TestSuite};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::formatter::Format;
use crate::job::{JobFailure, JobOutcome, Pipeline};
use crate::llm::LanguageModel;
use crate::planning::TaskSpec;
use crate::python;
use crate::stage::Stage;
use crate::task::TaskRequest;
use crate::trace::StageRecord;
use crate::verdict::VerdictStatus;
use crate::workers::WorkerKind;
use crate::{Error, Result};

/// Samples sample-filter writes per task unless told (or matched to another method's
/// tokens, as `bench pipeline` does).
pub const DEFAULT_SAMPLES: usize = 4;
/// The most samples a token match asks for.
pub const MAX_MATCHED_SAMPLES: usize = 64;
/// Temperature of sample-filter's samples after the first (greedy) one.
pub const SAMPLE_TEMPERATURE: f32 = 0.8;
/// The module name programs are scored under (the examples test imports it).
const MODULE: &str = "solution";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalTask {
    pub task_id: String,
    pub prompt: String,
    pub test: String,
    pub entry_point: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Pipeline,
    SingleCall,
    SampleFilter,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pipeline => "pipeline",
            Mode::SingleCall => "single-call",
            Mode::SampleFilter => "sample-filter",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TaskScore {
    pub task_id: String,
    pub passed: bool,
    /// The hidden test's outcome (`passed`, `assertion_failed`, ...) or `error`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub completion_tokens: usize,
    /// The method's time and the hidden test of its answer (not the oracle's runs).
    pub wall_s: f64,
    /// Pipeline: what execution proved about the result, as the job said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict_status: Option<VerdictStatus>,
    /// Pipeline: candidates the primary code subtask's worker wrote over all its attempts;
    /// sample-filter: samples written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidates: Option<usize>,
    /// Distinct programs the method wrote that the oracle ran against the hidden test.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_programs: Option<usize>,
    /// How many of them passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_passing: Option<usize>,
    /// Whether any of them passed: what a perfect choice among them would have scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_pass: Option<bool>,
    /// Sample-filter: the sample kept (0 is the greedy one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen: Option<usize>,
    /// Sample-filter: whether the kept sample passed the task's own examples (absent when
    /// the task has none that can be run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub own_examples_passed: Option<bool>,
}

/// Pass@1 of the results that got one verdict status.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StatusPass {
    pub tasks: usize,
    pub passed: usize,
    /// `passed / tasks`; null when no result got this status.
    pub pass_at_1: Option<f64>,
    /// Of these tasks, those where some program the job wrote passes the hidden test.
    pub oracle_passed: usize,
}

/// How well a method chose among the programs it wrote.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OracleSummary {
    /// Tasks where some program the method wrote passes the hidden test.
    pub oracle_passed: usize,
    /// `oracle_passed / tasks`.
    pub oracle_pass_at_k: f64,
    /// `pass_at_1 / oracle_pass_at_k`: the share of the passes within reach that the
    /// method's own choice got; null when nothing was within reach.
    pub selection_efficiency: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub mode: String,
    pub tasks: usize,
    pub passed: usize,
    pub pass_at_1: f64,
    pub wall_s: f64,
    pub completion_tokens: usize,
    /// `completion_tokens / tasks`.
    pub mean_completion_tokens: f64,
    pub concurrency: usize,
    /// Sample-filter: samples per task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<usize>,
    /// Pipeline and sample-filter, when the oracle ran.
    #[serde(flatten)]
    pub oracle: Option<OracleSummary>,
    /// Pipeline: pass@1 by verdict status (`verified`, `consistent`, `unverified`,
    /// `failed`, and `none` for jobs that failed before giving one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass_at_1_by_verdict: Option<BTreeMap<String, StatusPass>>,
    pub per_task: Vec<TaskScore>,
}

/// How a run goes.
#[derive(Clone, Copy, Debug)]
pub struct EvalOptions {
    /// Tasks run at once.
    pub concurrency: usize,
    /// Run the oracle (every distinct program a task's method wrote, against the hidden
    /// test, after the method finished). Off for timing runs.
    pub oracle: bool,
}

impl EvalOptions {
    pub fn new(concurrency: usize) -> Self {
        Self {
            concurrency,
            oracle: true,
        }
    }
}

/// Reads a JSONL task file; errors name the line and the field.
pub fn read_tasks(path: &Path) -> Result<Vec<EvalTask>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut tasks = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let t: EvalTask = serde_json::from_str(line).map_err(|source| Error::TaskLine {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?;
        for (field, v) in [
            ("task_id", &t.task_id),
            ("prompt", &t.prompt),
            ("test", &t.test),
            ("entry_point", &t.entry_point),
        ] {
            if v.trim().is_empty() {
                return Err(Error::InvalidTask(format!(
                    "{}:{}: `{field}` is empty",
                    path.display(),
                    i + 1
                )));
            }
        }
        if tasks.iter().any(|x: &EvalTask| x.task_id == t.task_id) {
            return Err(Error::InvalidTask(format!(
                "{}:{}: duplicate task_id `{}`",
                path.display(),
                i + 1,
                t.task_id
            )));
        }
        tasks.push(t);
    }
    if tasks.is_empty() {
        return Err(Error::InvalidTask(format!(
            "{} has no tasks",
            path.display()
        )));
    }
    Ok(tasks)
}

/// The baseline's prompt: the function to complete, answered in one code block.
pub fn single_call_messages(t: &EvalTask) -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("You are an expert Python programmer."),
        ChatMessage::user(format!(
            "Complete the following Python function. Answer with the complete function in one ```python code block.\n\n```python\n{}```",
            t.prompt
        )),
    ]
}

/// Sample `i` of sample-filter: the single-call request itself for the first (greedy,
/// seed 0), then the same prompt at `SAMPLE_TEMPERATURE` with seed `i`.
pub fn sample_request(t: &EvalTask, max_tokens: usize, i: usize) -> GenerateRequest {
    let mut req = GenerateRequest::chat(single_call_messages(t), max_tokens);
    if i > 0 {
        req.sampling.temperature = SAMPLE_TEMPERATURE;
        req.sampling.seed = i as u64;
    }
    req
}

/// Samples that cost about what another method spent per task: its mean completion tokens
/// over one sample's (the single-call baseline's mean), rounded, at least 1 and at most
/// `MAX_MATCHED_SAMPLES`; `DEFAULT_SAMPLES` when either is unknown.
pub fn matched_samples(target_mean_tokens: f64, per_sample_tokens: f64) -> usize {
    if !(per_sample_tokens > 0.0 && target_mean_tokens.is_finite() && target_mean_tokens > 0.0) {
        return DEFAULT_SAMPLES;
    }
    ((target_mean_tokens / per_sample_tokens).round() as usize).clamp(1, MAX_MATCHED_SAMPLES)
}

/// The program scored for an answer: its code block (the task's prompt in front when the
/// answer is only a body), with the task's imports.
pub fn program_from_answer(t: &EvalTask, answer: &str) -> String {
    program_from_code(t, &python::extract_code(answer).unwrap_or_default())
}

/// The program scored for code: the code, the task's prompt in front when it does not
/// define the entry point (a body), with the task's imports.
pub fn program_from_code(t: &EvalTask, code: &str) -> String {
    let code = if python::defines(code, &t.entry_point) {
        code.to_string()
    } else {
        format!("{}{}", t.prompt, code)
    };
    python::ensure_imports(&code, &t.prompt)
}

/// Runs the hidden test against a program.
pub async fn score(sandbox: &Sandbox, t: &EvalTask, program: &str) -> (bool, String) {
    let run = async {
        let module = Module::new(MODULE, program.as_bytes().to_vec())?;
        let tests = TestSuite::new("test_hidden.py", t.test.as_bytes().to_vec())?
            .with_kind(TestKind::Check)
            .with_entry_point(&t.entry_point)?;
        let job = forgeline_sandbox::Job::new(module, Check::Tests(tests))
            .with_limits(Limits::default().with_timeout(Duration::from_secs(10)));
        sandbox.run(job).await
    };
    match run.await {
        Ok(r) => (r.passed(), r.outcome.status().to_string()),
        Err(e) => (false, format!("error: {e}")),
    }
}

/// The test of the task's own `>>>` examples (from its prompt, as the router reads them),
/// None when it has none that can be run.
pub fn own_examples_test(t: &EvalTask) -> Option<String> {
    python::examples_test(MODULE, &python::examples(&t.prompt))
}

/// Whether a program passes the task's own examples test.
async fn passes_own_examples(sandbox: &Sandbox, program: &str, test: &str) -> bool {
    let run = async {
        let module = Module::new(MODULE, program.as_bytes().to_vec())?;
        let tests = TestSuite::new("test_task_examples.py", test.as_bytes().to_vec())?
            .with_kind(TestKind::Functions);
        let job = forgeline_sandbox::Job::new(module, Check::Tests(tests))
            .with_limits(Limits::default().with_timeout(Duration::from_secs(10)));
        sandbox.run(job).await
    };
    matches!(run.await, Ok(r) if r.passed())
}

/// Sample-filter's choice: the first sample that passed the task's own examples, else the
/// first (greedy) sample.
pub fn choose_sample(passed_own_examples: &[bool]) -> usize {
    passed_own_examples.iter().position(|&p| p).unwrap_or(0)
}

/// What a pipeline job wrote for its main result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobCandidates {
    /// Candidates the primary code subtask's worker wrote, over all its attempts.
    pub written: usize,
    /// The distinct programs among them, as scored (`program_from_code`), in the order
    /// written, then each synthesis's module (the first and every revision), then the
    /// final module.
    pub programs: Vec<String>,
}

/// The programs a job wrote for its main result, read from its trace's stage records:
/// worker records (`output.candidates`, serialized `workers::Artifact`s) of the primary
/// code subtask (named by `specs`, the job's subtasks: the trace's `dag.specs`, which its
/// `subtasks` results hold; by the records' own `input.spec` when there are none, as in a
/// failed job's trace; every code subtask when none is primary), the synthesizer's and
/// each synthesizer retry's module (`output.synthesis.module`), and `final_module`.
pub fn job_candidates(
    t: &EvalTask,
    stages: &[StageRecord],
    specs: &[TaskSpec],
    final_module: Option<&str>,
) -> JobCandidates {
    let primary = primary_code_subtasks(stages, specs);
    let mut out = JobCandidates::default();
    let mut seen = HashSet::new();
    let mut add = |out: &mut JobCandidates, program: String| {
        if !program.trim().is_empty() && seen.insert(program.clone()) {
            out.programs.push(program);
        }
    };
    for r in stages {
        match r.stage {
            Stage::Worker => {
                let Some(candidates) = r.output["candidates"].as_array() else {
                    continue;
                };
                for c in candidates {
                    let subtask = c["subtask"].as_str().or(r.subtask.as_deref());
                    if c["kind"] != WorkerKind::Code.name()
                        || !subtask.is_some_and(|s| primary.contains(s))
                    {
                        continue;
                    }
                    out.written += 1;
                    let program = match c["code"].as_str() {
                        Some(code) if !code.trim().is_empty() => program_from_code(t, code),
                        _ => program_from_answer(t, c["text"].as_str().unwrap_or_default()),
                    };
                    add(&mut out, program);
                }
            }
            Stage::Synthesizer | Stage::SynthesizerRetry => {
                if let Some(m) = r.output["synthesis"]["module"].as_str() {
                    add(&mut out, m.to_string());
                }
            }
            _ => {}
        }
    }
    if let Some(m) = final_module {
        add(&mut out, m.to_string());
    }
    out
}

/// The ids of the primary code subtasks (every code subtask when none is primary).
fn primary_code_subtasks(stages: &[StageRecord], specs: &[TaskSpec]) -> HashSet<String> {
    let specs: Vec<(String, bool, String)> = if specs.is_empty() {
        stages
            .iter()
            .filter(|r| r.stage == Stage::Worker)
            .filter_map(|r| {
                let s = &r.input["spec"];
                Some((
                    s["id"].as_str()?.to_string(),
                    s["primary"].as_bool().unwrap_or(false),
                    s["kind"].as_str()?.to_string(),
                ))
            })
            .collect()
    } else {
        specs
            .iter()
            .map(|s| (s.id.clone(), s.primary, s.kind.name().into()))
            .collect()
    };
    let code = |k: &str| k == WorkerKind::Code.name();
    let primary: HashSet<String> = specs
        .iter()
        .filter(|(_, p, k)| *p && code(k))
        .map(|(id, ..)| id.clone())
        .collect();
    if !primary.is_empty() {
        return primary;
    }
    specs
        .into_iter()
        .filter(|(_, _, k)| code(k))
        .map(|(id, ..)| id)
        .collect()
}

/// Pass@1 by verdict status: every status, and `none` when some job gave none.
pub fn pass_by_verdict(per_task: &[TaskScore]) -> BTreeMap<String, StatusPass> {
    let mut m: BTreeMap<String, StatusPass> = VerdictStatus::ALL
        .iter()
        .map(|s| (s.name().to_string(), StatusPass::default()))
        .collect();
    for t in per_task {
        let e = m
            .entry(t.verdict_status.map_or("none", VerdictStatus::name).into())
            .or_default();
        e.tasks += 1;
        e.passed += usize::from(t.passed);
        e.oracle_passed += usize::from(t.oracle_pass == Some(true));
    }
    for e in m.values_mut() {
        e.pass_at_1 = (e.tasks > 0).then(|| e.passed as f64 / e.tasks as f64);
    }
    m
}

/// The oracle's figures, None when it ran for no task. A task it did not run for (its
/// method failed) counts as out of reach.
pub fn oracle_summary(per_task: &[TaskScore]) -> Option<OracleSummary> {
    if per_task.iter().all(|t| t.oracle_pass.is_none()) {
        return None;
    }
    let n = per_task.len().max(1) as f64;
    let reach = per_task
        .iter()
        .filter(|t| t.oracle_pass == Some(true))
        .count();
    let passed = per_task.iter().filter(|t| t.passed).count();
    Some(OracleSummary {
        oracle_passed: reach,
        oracle_pass_at_k: reach as f64 / n,
        selection_efficiency: (reach > 0).then(|| passed as f64 / reach as f64),
    })
}

/// What runs each task.
#[derive(Clone)]
pub enum Runner {
    Pipeline(Pipeline),
    SingleCall {
        llm: Arc<dyn LanguageModel>,
        max_tokens: usize,
    },
    /// `samples` samples of the single-call request (`sample_request`); the first that
    /// passes the task's own examples is the answer, else the first.
    SampleFilter {
        llm: Arc<dyn LanguageModel>,
        max_tokens: usize,
        samples: usize,
    },
}

/// What a method made of a task, before the hidden test.
#[derive(Default)]
struct Produced {
    /// The answer scored; None when the method failed (`error`).
    program: Option<String>,
    error: Option<String>,
    tokens: usize,
    verdict_status: Option<VerdictStatus>,
    candidates: Option<usize>,
    /// Distinct programs for the oracle (the answer among them).
    programs: Vec<String>,
    chosen: Option<usize>,
    own_examples_passed: Option<bool>,
}

/// A pipeline job on a task: its prompt and entry point, nothing else.
async fn run_pipeline(p: &Pipeline, t: &EvalTask) -> std::result::Result<JobOutcome, JobFailure> {
    let mut req = TaskRequest::new(t.prompt.clone());
    req.entry_point = Some(t.entry_point.clone());
    p.run_traced(req, Format::Code, None).await
}

impl Runner {
    fn mode(&self) -> Mode {
        match self {
            Runner::Pipeline(_) => Mode::Pipeline,
            Runner::SingleCall { .. } => Mode::SingleCall,
            Runner::SampleFilter { .. } => Mode::SampleFilter,
        }
    }

    fn samples(&self) -> Option<usize> {
        match self {
            Runner::SampleFilter { samples, .. } => Some((*samples).max(1)),
            _ => None,
        }
    }

    /// The answer for a task, the completion tokens spent on it and what the oracle needs.
    async fn produce(&self, t: &EvalTask, sandbox: &Sandbox) -> Result<Produced> {
        match self {
            Runner::Pipeline(p) => Ok(match run_pipeline(p, t).await {
                Ok(out) => {
                    let module = out.result.module().map(str::to_string);
                    let c = job_candidates(
                        t,
                        &out.trace.stages,
                        &out.trace.dag.specs,
                        module.as_deref(),
                    );
                    Produced {
                        program: Some(module.unwrap_or_default()),
                        tokens: out.result.completion_tokens,
                        verdict_status: Some(out.result.verdict.status),
                        candidates: Some(c.written),
                        programs: c.programs,
                        ..Produced::default()
                    }
                }
                // What it wrote before it failed still counts for the oracle.
                Err(f) => {
                    let c = job_candidates(t, &f.trace.stages, &[], None);
                    Produced {
                        error: Some(f.error.to_string()),
                        tokens: f.trace.llm_calls.iter().map(|c| c.completion_tokens).sum(),
                        candidates: Some(c.written),
                        programs: c.programs,
                        ..Produced::default()
                    }
                }
            }),
            Runner::SingleCall { llm, max_tokens } => {
                let req = GenerateRequest::chat(single_call_messages(t), *max_tokens);
                let c = llm.complete(req).await?;
                Ok(Produced {
                    program: Some(program_from_answer(t, &c.text)),
                    tokens: c.usage.completion_tokens,
                    ..Produced::default()
                })
            }
            Runner::SampleFilter {
                llm, max_tokens, ..
            } => {
                let n = self.samples().unwrap_or(1);
                // Requested together, so that they batch in the scheduler.
                let calls = (0..n).map(|i| llm.complete(sample_request(t, *max_tokens, i)));
                let mut tokens = 0;
                let mut samples = Vec::with_capacity(n);
                for c in futures_util::future::join_all(calls).await {
                    let c = c?;
                    tokens += c.usage.completion_tokens;
                    samples.push(program_from_answer(t, &c.text));
                }
                let programs = distinct(&samples);
                let test = own_examples_test(t);
                let passed: Vec<bool> = match &test {
                    None => vec![false; n],
                    Some(test) => {
                        let runs = programs
                            .iter()
                            .map(|p| passes_own_examples(sandbox, p, test));
                        let by_program: HashMap<&String, bool> = programs
                            .iter()
                            .zip(futures_util::future::join_all(runs).await)
                            .collect();
                        samples
                            .iter()
                            .map(|s| by_program.get(s).copied().unwrap_or(false))
                            .collect()
                    }
                };
                let chosen = choose_sample(&passed);
                Ok(Produced {
                    program: Some(samples[chosen].clone()),
                    tokens,
                    candidates: Some(n),
                    programs,
                    chosen: Some(chosen),
                    own_examples_passed: test.map(|_| passed[chosen]),
                    ..Produced::default()
                })
            }
        }
    }
}

/// The distinct non-empty texts, in order.
fn distinct(texts: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    texts
        .iter()
        .filter(|p| !p.trim().is_empty() && seen.insert(p.as_str()))
        .cloned()
        .collect()
}

/// Runs the hidden test against each program, at most `permits` at once across the run;
/// `known` is one program's result already in hand. Returns how many passed.
async fn run_oracle(
    sandbox: &Sandbox,
    t: &EvalTask,
    programs: &[String],
    known: Option<(&str, bool)>,
    permits: &Semaphore,
) -> usize {
    let runs = programs.iter().map(|p| async move {
        if let Some((k, passed)) = known {
            if k == p {
                return passed;
            }
        }
        let _permit = permits.acquire().await.expect("never closed");
        score(sandbox, t, p).await.0
    });
    futures_util::future::join_all(runs)
        .await
        .into_iter()
        .filter(|&p| p)
        .count()
}

/// Runs every task, `options.concurrency` at a time; `progress` sees each score as it
/// comes. With `options.oracle`, each task's programs then go through the hidden test
/// (pipeline and sample-filter), after its method finished and outside its slot.
pub async fn run_eval(
    runner: Runner,
    sandbox: Sandbox,
    tasks: Vec<EvalTask>,
    options: EvalOptions,
    progress: impl Fn(&TaskScore, usize, usize) + Send + Sync + 'static,
) -> EvalReport {
    let started = Instant::now();
    let n = tasks.len();
    let concurrency = options.concurrency.max(1);
    let permits = Arc::new(Semaphore::new(concurrency));
    // The oracle's runs share the sandbox with the jobs still running: half of it.
    let oracle_permits = Arc::new(Semaphore::new((sandbox.max_parallel() / 2).max(1)));
    let oracle = options.oracle && runner.mode() != Mode::SingleCall;
    let progress = Arc::new(progress);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    let task_ids: Vec<String> = tasks.iter().map(|t| t.task_id.clone()).collect();
    let mut ids = HashMap::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (runner, sandbox, permits, oracle_permits, progress, done) = (
            runner.clone(),
            sandbox.clone(),
            permits.clone(),
            oracle_permits.clone(),
            progress.clone(),
            done.clone(),
        );
        let handle = set.spawn(async move {
            let permit = permits.acquire_owned().await.expect("never closed");
            let t0 = Instant::now();
            let s = match runner.produce(&t, &sandbox).await {
                Ok(p) => {
                    let (passed, outcome) = match &p.program {
                        Some(program) => score(&sandbox, &t, program).await,
                        None => (false, "error".into()),
                    };
                    let wall_s = t0.elapsed().as_secs_f64();
                    drop(permit);
                    let passing = if oracle {
                        let known = p.program.as_deref().map(|x| (x, passed));
                        Some(run_oracle(&sandbox, &t, &p.programs, known, &oracle_permits).await)
                    } else {
                        None
                    };
                    TaskScore {
                        task_id: t.task_id.clone(),
                        passed,
                        outcome,
                        error: p.error,
                        completion_tokens: p.tokens,
                        wall_s,
                        verdict_status: p.verdict_status,
                        candidates: p.candidates,
                        oracle_programs: passing.map(|_| p.programs.len()),
                        oracle_passing: passing,
                        oracle_pass: passing.map(|k| k > 0),
                        chosen: p.chosen,
                        own_examples_passed: p.own_examples_passed,
                    }
                }
                Err(e) => TaskScore {
                    task_id: t.task_id.clone(),
                    passed: false,
                    outcome: "error".into(),
                    error: Some(e.to_string()),
                    wall_s: t0.elapsed().as_secs_f64(),
                    ..TaskScore::default()
                },
            };
            let k = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            progress(&s, k, n);
            (i, s)
        });
        ids.insert(handle.id(), i);
    }
    let mut per_task: Vec<(usize, TaskScore)> = Vec::with_capacity(n);
    while let Some(r) = set.join_next_with_id().await {
        match r {
            Ok((_, x)) => per_task.push(x),
            // A task that panicked is scored as failed with the panic, never left out.
            Err(e) => {
                let i = ids.get(&e.id()).copied().unwrap_or(usize::MAX);
                let task_id = task_ids.get(i).cloned().unwrap_or_default();
                per_task.push((
                    i,
                    TaskScore {
                        task_id,
                        passed: false,
                        outcome: "error".into(),
                        error: Some(format!("internal error: {}", crate::join_error_message(e))),
                        ..TaskScore::default()
                    },
                ));
            }
        }
    }
    per_task.sort_by_key(|(i, _)| *i);
    let per_task: Vec<TaskScore> = per_task.into_iter().map(|(_, s)| s).collect();
    let passed = per_task.iter().filter(|s| s.passed).count();
    let completion_tokens: usize = per_task.iter().map(|s| s.completion_tokens).sum();
    let mode = runner.mode();
    EvalReport {
        mode: mode.name().into(),
        tasks: n,
        passed,
        pass_at_1: passed as f64 / n.max(1) as f64,
        wall_s: started.elapsed().as_secs_f64(),
        completion_tokens,
        mean_completion_tokens: completion_tokens as f64 / n.max(1) as f64,
        concurrency,
        samples: runner.samples(),
        oracle: if oracle {
            oracle_summary(&per_task)
        } else {
            None
        },
        pass_at_1_by_verdict: (mode == Mode::Pipeline).then(|| pass_by_verdict(&per_task)),
        per_task,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use forgeline_engine::scheduler::Completion;
    use serde_json::{json, Value};

    use super::*;
    use crate::config::PipelineConfig;
    use crate::llm::BoxFuture;
    use crate::testing::{ScriptedModel, TestBed};
    use crate::workers::Artifact;

    fn task() -> EvalTask {
        EvalTask {
            task_id: "t/0".into(),
            prompt: "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n".into(),
            test: "def check(candidate):\n    assert candidate([1, 2]) == 3\n".into(),
            entry_point: "total".into(),
        }
    }

    /// A task with a `>>>` example, and a hidden test that checks more than it.
    fn task_with_examples() -> EvalTask {
        EvalTask {
            task_id: "t/1".into(),
            prompt: "def total(xs: list) -> int:\n    \"\"\"Return the sum of xs.\n\n    >>> total([1, 2])\n    3\n    \"\"\"\n".into(),
            test: "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([40, 2]) == 42  # hidden only\n    assert candidate([]) == 0\n".into(),
            entry_point: "total".into(),
        }
    }

    /// The hidden test's lines, each of which no prompt may hold.
    fn hidden_lines(t: &EvalTask) -> Vec<&str> {
        t.test
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn answer(code: &str) -> String {
        format!("```python\n{code}```")
    }

    #[test]
    fn programs_from_whole_functions_and_bodies() {
        let t = task();
        let whole = program_from_answer(&t, "```python\ndef total(xs):\n    return sum(xs)\n```");
        assert!(whole.starts_with("from typing import List"), "{whole}");
        assert!(whole.contains("return sum(xs)"));
        let body = program_from_answer(&t, "```python\n    return sum(xs)\n```");
        assert!(
            body.contains("def total(xs: List[int]) -> int:") && body.contains("return sum(xs)"),
            "{body}"
        );
    }

    #[test]
    fn task_files_are_checked_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        let good = serde_json::to_string(&task()).unwrap();
        std::fs::write(&p, format!("{good}\n\n{good}\n")).unwrap();
        assert!(read_tasks(&p)
            .unwrap_err()
            .to_string()
            .contains(":3: duplicate task_id"));
        std::fs::write(&p, "{\"task_id\": \"a\"}\n").unwrap();
        assert!(read_tasks(&p)
            .unwrap_err()
            .to_string()
            .contains(":1: missing field"));
        std::fs::write(&p, format!("{}\n", good.replace("\"total\"}", "\"\"}"))).unwrap();
        assert!(read_tasks(&p)
            .unwrap_err()
            .to_string()
            .contains("`entry_point` is empty"));
        std::fs::write(&p, format!("{good}\n")).unwrap();
        assert_eq!(read_tasks(&p).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_hidden_test_scores_a_program() {
        let sandbox = Sandbox::new(Default::default()).await.unwrap();
        let t = task();
        assert_eq!(
            score(&sandbox, &t, "def total(xs):\n    return sum(xs)\n").await,
            (true, "passed".into())
        );
        let (ok, outcome) = score(&sandbox, &t, "def total(xs):\n    return 0\n").await;
        assert!(!ok);
        assert_eq!(outcome, "assertion_failed");
    }

    fn spec(id: &str, kind: WorkerKind, primary: bool) -> TaskSpec {
        TaskSpec {
            id: id.into(),
            kind,
            description: String::new(),
            depends_on: Vec::new(),
            acceptance: Vec::new(),
            primary,
            critical: primary,
        }
    }

    fn record(stage: Stage, subtask: Option<&str>, input: Value, output: Value) -> StageRecord {
        StageRecord {
            stage,
            subtask: subtask.map(str::to_string),
            started_ms: 0,
            duration_ms: 0,
            input,
            output,
        }
    }

    /// A worker's record of one attempt, as the retry manager writes it.
    fn worker(spec: &TaskSpec, attempt: usize, candidates: &[(&str, Option<&str>)]) -> StageRecord {
        let candidates: Vec<Artifact> = candidates
            .iter()
            .enumerate()
            .map(|(i, (text, code))| Artifact {
                subtask: spec.id.clone(),
                kind: spec.kind,
                attempt,
                candidate: i,
                text: text.to_string(),
                code: code.map(str::to_string),
                files: Vec::new(),
            })
            .collect();
        record(
            Stage::Worker,
            Some(&spec.id),
            json!({"spec": spec, "attempt": attempt + 1, "feedback": null}),
            json!({"candidates": candidates, "error": null}),
        )
    }

    #[test]
    fn a_jobs_candidates_are_its_primary_code_attempts_and_its_syntheses() {
        let t = task();
        let (main, helper, tests) = (
            spec("impl", WorkerKind::Code, true),
            spec("helper", WorkerKind::Code, false),
            spec("tests", WorkerKind::Tests, false),
        );
        let a = "def total(xs):\n    return sum(xs)\n";
        let body = "    return 0\n";
        let from_text = "def total(xs):\n    return xs[0] + xs[1]\n";
        let m0 = "def total(xs):\n    return sum(xs)  # synthesized\n";
        let m1 = "def total(xs):\n    return sum(list(xs))\n";
        let stages = vec![
            record(Stage::Router, None, json!({}), json!({})),
            worker(&helper, 0, &[("helper", Some("def helper():\n    pass\n"))]),
            worker(&main, 0, &[(a, Some(a)), (body, Some(body)), (a, Some(a))]),
            record(
                Stage::Validation,
                Some("impl"),
                json!({}),
                json!({"verdicts": []}),
            ),
            worker(
                &tests,
                0,
                &[("t", Some("def test_total():\n    assert total([]) == 0\n"))],
            ),
            worker(&main, 1, &[(&answer(from_text), None)]),
            record(
                Stage::Synthesizer,
                None,
                json!({}),
                json!({"synthesis": {"module": m0, "revision": 0}}),
            ),
            record(
                Stage::SynthesizerRetry,
                None,
                json!({}),
                json!({"synthesis": {"module": m1}, "kept": true}),
            ),
            record(
                Stage::SynthesizerRetry,
                None,
                json!({}),
                json!({"synthesis": null, "kept": false}),
            ),
        ];
        let specs = vec![main.clone(), helper.clone(), tests.clone()];
        let want = JobCandidates {
            written: 4,
            programs: vec![
                program_from_code(&t, a),
                program_from_code(&t, body),
                program_from_code(&t, from_text),
                m0.to_string(),
                m1.to_string(),
            ],
        };
        // The body is completed with the task's prompt; the whole function gets its imports.
        assert!(want.programs[0].starts_with("from typing import List"));
        assert!(want.programs[1].contains("def total(xs: List[int]) -> int:"));
        // The final module is the last revision: counted once.
        assert_eq!(job_candidates(&t, &stages, &specs, Some(m1)), want);
        // A failed job's trace has no DAG: the records' own specs say which.
        assert_eq!(job_candidates(&t, &stages, &[], Some(m1)), want);
        // With no primary code subtask, every code subtask's candidates count.
        let mut unmarked = specs.clone();
        for s in &mut unmarked {
            s.primary = false;
        }
        let all = job_candidates(&t, &stages, &unmarked, None);
        assert_eq!(all.written, 5);
        assert_eq!(all.programs.len(), 6, "{:#?}", all.programs);
        // Nothing written, nothing to score.
        assert_eq!(job_candidates(&t, &[], &[], None), JobCandidates::default());
    }

    fn scored(status: Option<VerdictStatus>, passed: bool, oracle: Option<bool>) -> TaskScore {
        TaskScore {
            passed,
            verdict_status: status,
            oracle_pass: oracle,
            ..TaskScore::default()
        }
    }

    #[test]
    fn pass_at_1_is_counted_by_verdict_and_against_the_oracle() {
        use VerdictStatus::*;
        let per_task = vec![
            scored(Some(Verified), true, Some(true)),
            scored(Some(Verified), false, Some(true)),
            scored(Some(Failed), false, Some(true)),
            scored(Some(Unverified), false, Some(false)),
            // A job that failed: no verdict, and (its method failed) no oracle.
            scored(None, false, None),
        ];
        let by = pass_by_verdict(&per_task);
        let row = |tasks, passed, pass_at_1, oracle_passed| StatusPass {
            tasks,
            passed,
            pass_at_1,
            oracle_passed,
        };
        assert_eq!(by["verified"], row(2, 1, Some(0.5), 2));
        assert_eq!(by["consistent"], row(0, 0, None, 0));
        assert_eq!(by["unverified"], row(1, 0, Some(0.0), 0));
        assert_eq!(by["failed"], row(1, 0, Some(0.0), 1));
        assert_eq!(by["none"], row(1, 0, Some(0.0), 0));
        assert_eq!(by.len(), 5);
        // Every status is there even when no task got it, and `none` only when needed.
        let by = pass_by_verdict(&per_task[..1]);
        assert_eq!(by.len(), 4);
        assert_eq!(by["failed"].pass_at_1, None);

        let o = oracle_summary(&per_task).unwrap();
        assert_eq!(o.oracle_passed, 3);
        assert!((o.oracle_pass_at_k - 0.6).abs() < 1e-9);
        assert!((o.selection_efficiency.unwrap() - 1.0 / 3.0).abs() < 1e-9);
        // Nothing within reach: no efficiency to speak of; no oracle run: no figures.
        let none_in_reach = [scored(Some(Failed), false, Some(false))];
        assert_eq!(
            oracle_summary(&none_in_reach).unwrap().selection_efficiency,
            None
        );
        assert_eq!(oracle_summary(&per_task[4..]), None);
    }

    #[test]
    fn samples_are_matched_to_tokens_within_bounds() {
        assert_eq!(matched_samples(1000.0, 250.0), 4);
        assert_eq!(matched_samples(1100.0, 100.0), 11);
        assert_eq!(matched_samples(10.0, 100.0), 1);
        assert_eq!(matched_samples(1e9, 1.0), MAX_MATCHED_SAMPLES);
        assert_eq!(matched_samples(1000.0, 0.0), DEFAULT_SAMPLES);
        assert_eq!(matched_samples(0.0, 100.0), DEFAULT_SAMPLES);
        assert_eq!(matched_samples(f64::NAN, 100.0), DEFAULT_SAMPLES);
    }

    #[test]
    fn sample_filter_keeps_the_first_sample_that_passes_its_examples_else_the_first() {
        assert_eq!(choose_sample(&[false, true, true]), 1);
        assert_eq!(choose_sample(&[true, false]), 0);
        assert_eq!(choose_sample(&[false, false]), 0);
        assert_eq!(choose_sample(&[]), 0);
        let t = task_with_examples();
        let r = sample_request(&t, 64, 0);
        assert_eq!((r.sampling.temperature, r.sampling.seed), (0.0, 0));
        let r = sample_request(&t, 64, 3);
        assert_eq!(
            (r.sampling.temperature, r.sampling.seed),
            (SAMPLE_TEMPERATURE, 3)
        );
        // The greedy sample is the single-call baseline's own request.
        assert_eq!(
            format!("{:?}", sample_request(&t, 64, 0).prompt),
            format!(
                "{:?}",
                GenerateRequest::chat(single_call_messages(&t), 64).prompt
            )
        );
    }

    /// Answers in the order asked, one word a token; keeps each request.
    #[derive(Default)]
    struct Queue {
        answers: Mutex<VecDeque<String>>,
        requests: Mutex<Vec<GenerateRequest>>,
    }

    impl Queue {
        fn new(answers: &[String]) -> Self {
            Self {
                answers: Mutex::new(answers.iter().cloned().collect()),
                requests: Mutex::default(),
            }
        }
    }

    impl LanguageModel for Queue {
        fn complete(
            &self,
            req: GenerateRequest,
        ) -> BoxFuture<'_, forgeline_engine::Result<Completion>> {
            self.requests.lock().unwrap().push(req);
            let text = self.answers.lock().unwrap().pop_front().unwrap_or_default();
            Box::pin(async move {
                let mut c = Completion::default();
                c.usage.completion_tokens = text.split_whitespace().count();
                c.text = text;
                Ok(c)
            })
        }

        fn models(&self) -> Vec<String> {
            vec!["queue".into()]
        }

        fn context_length(&self, _model: Option<&str>) -> forgeline_engine::Result<usize> {
            Ok(8192)
        }

        fn prompt_tokens(&self, _req: &GenerateRequest) -> forgeline_engine::Result<usize> {
            Ok(0)
        }
    }

    async fn sample_filter(t: &EvalTask, answers: &[String]) -> (EvalReport, Arc<Queue>) {
        let sandbox = Sandbox::new(Default::default()).await.unwrap();
        let q = Arc::new(Queue::new(answers));
        let runner = Runner::SampleFilter {
            llm: q.clone(),
            max_tokens: 64,
            samples: answers.len(),
        };
        let r = run_eval(
            runner,
            sandbox,
            vec![t.clone()],
            EvalOptions::new(1),
            |_, _, _| {},
        )
        .await;
        (r, q)
    }

    #[tokio::test]
    async fn sample_filter_chooses_by_the_tasks_own_examples_and_scores_by_the_hidden_test() {
        let t = task_with_examples();
        let wrong = answer("def total(xs):\n    return 0\n");
        // Passes the example, fails the hidden test.
        let fits_the_example = answer("def total(xs):\n    return 3\n");
        let right = answer("def total(xs):\n    return sum(xs)\n");
        let (r, q) = sample_filter(
            &t,
            &[
                wrong.clone(),
                fits_the_example,
                right.clone(),
                right.clone(),
            ],
        )
        .await;
        let s = &r.per_task[0];
        assert_eq!(r.mode, "sample-filter");
        assert_eq!(r.samples, Some(4));
        assert_eq!(s.chosen, Some(1), "{s:?}");
        assert_eq!(s.own_examples_passed, Some(true));
        assert!(!s.passed, "{s:?}");
        assert_eq!(s.candidates, Some(4));
        // Three distinct programs, one of which passes the hidden test.
        assert_eq!(
            (s.oracle_programs, s.oracle_passing, s.oracle_pass),
            (Some(3), Some(1), Some(true))
        );
        assert_eq!(s.completion_tokens, r.completion_tokens);
        assert!(s.completion_tokens > 0);
        let o = r.oracle.clone().unwrap();
        assert_eq!((o.oracle_passed, o.oracle_pass_at_k), (1, 1.0));
        assert_eq!(o.selection_efficiency, Some(0.0));
        assert_eq!(r.pass_at_1_by_verdict, None);
        // The first sample greedy, the rest sampled with distinct seeds; no prompt holds
        // the hidden test.
        let reqs = q.requests.lock().unwrap().clone();
        assert_eq!(reqs.len(), 4);
        assert_eq!(reqs[0].sampling.temperature, 0.0);
        let seeds: HashSet<u64> = reqs.iter().map(|r| r.sampling.seed).collect();
        assert_eq!(seeds.len(), 4);
        for r in &reqs[1..] {
            assert_eq!(r.sampling.temperature, SAMPLE_TEMPERATURE);
        }
        for r in reqs.iter() {
            let prompt = format!("{:?}", r.prompt);
            for line in hidden_lines(&t) {
                assert!(!prompt.contains(line), "{line:?} in {prompt}");
            }
        }

        // None passes the examples: the first (greedy) sample is kept.
        let (r, _) = sample_filter(
            &t,
            &[wrong.clone(), answer("def total(xs):\n    return 1\n")],
        )
        .await;
        let s = &r.per_task[0];
        assert_eq!(
            (s.chosen, s.own_examples_passed, s.passed),
            (Some(0), Some(false), false)
        );
        assert_eq!(s.oracle_pass, Some(false));
        assert_eq!(r.oracle.clone().unwrap().selection_efficiency, None);

        // A task without examples keeps the first sample, which is scored as it is.
        let (r, _) = sample_filter(&task(), &[right.clone(), wrong]).await;
        let s = &r.per_task[0];
        assert_eq!(
            (s.chosen, s.own_examples_passed, s.passed),
            (Some(0), None, true)
        );
        assert_eq!(r.oracle.unwrap().selection_efficiency, Some(1.0));
    }

    /// The pipeline on a task: the job gets the prompt and the entry point, never the
    /// hidden test (no rendered prompt, no model call holds any of its lines), and the
    /// harness still finds the job's candidates for the oracle afterwards.
    #[tokio::test]
    async fn the_hidden_test_never_reaches_the_job() {
        let t = task_with_examples();
        let model = ScriptedModel::new()
            .on("code", "def total(xs):\n    return sum(xs)\n```")
            .on(
                "validator",
                r#"{"pass": true, "problems": [], "feedback": ""}"#,
            )
            .on("synthesizer", "total(xs) returns the sum.")
            .on(
                "final_validator",
                r#"{"pass": true, "problems": [], "feedback": ""}"#,
            );
        let mut cfg = PipelineConfig::default();
        cfg.limits.candidates = 2;
        let bed = TestBed::with_config(model.clone(), cfg).await;
        let out = run_pipeline(&bed.pipeline, &t).await.unwrap();
        assert!(out.trace.task.tests.is_none());
        assert!(!out.trace.llm_calls.is_empty());
        for call in &out.trace.llm_calls {
            let p = &call.prompt;
            let prompt = format!("{}\n{}\n{}", p.system, p.user, p.assistant);
            for line in hidden_lines(&t) {
                assert!(
                    !prompt.contains(line),
                    "{line:?} in a {:?} prompt",
                    call.stage
                );
            }
        }
        let c = job_candidates(
            &t,
            &out.trace.stages,
            &out.trace.dag.specs,
            out.result.module(),
        );
        assert!(c.written >= 1, "{c:?}");

        let sandbox = Sandbox::new(Default::default()).await.unwrap();
        let r = run_eval(
            Runner::Pipeline(bed.pipeline.clone()),
            sandbox,
            vec![t.clone()],
            EvalOptions::new(1),
            |_, _, _| {},
        )
        .await;
        for (stage, text) in model.calls() {
            for line in hidden_lines(&t) {
                assert!(
                    !text.contains(line),
                    "{line:?} reached the {stage} model call"
                );
            }
        }
        let s = &r.per_task[0];
        assert!(s.passed, "{s:?}");
        assert!(s.verdict_status.is_some(), "{s:?}");
        assert!(s.candidates.unwrap_or(0) >= 1, "{s:?}");
        assert_eq!(s.oracle_pass, Some(true), "{s:?}");
        assert!(s.oracle_passing.unwrap_or(0) >= 1, "{s:?}");
        assert!(s.completion_tokens > 0);
        let by = r.pass_at_1_by_verdict.as_ref().unwrap();
        assert_eq!(by.values().map(|b| b.tasks).sum::<usize>(), 1);
        assert_eq!(r.oracle.as_ref().unwrap().selection_efficiency, Some(1.0));
        // A timing run leaves the oracle out.
        let model2 = ScriptedModel::new().on("code", "def total(xs):\n    return 0\n```");
        let bed2 = TestBed::new(model2).await;
        let sandbox = Sandbox::new(Default::default()).await.unwrap();
        let options = EvalOptions {
            concurrency: 1,
            oracle: false,
        };
        let r = run_eval(
            Runner::Pipeline(bed2.pipeline.clone()),
            sandbox,
            vec![t],
            options,
            |_, _, _| {},
        )
        .await;
        assert_eq!(r.oracle, None);
        assert_eq!(r.per_task[0].oracle_pass, None);
    }
}
