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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
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
use crate::python;
use crate::task::TaskRequest;
use crate::verdict::VerdictStatus;
use crate::{Error, Result};

mod oracle;

use oracle::{distinct, run_oracle};
pub use oracle::{job_candidates, oracle_summary, pass_by_verdict, JobCandidates};

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
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Tasks run at once.
    pub concurrency: usize,
    /// Run the oracle (every distinct program a task's method wrote, against the hidden
    /// test, after the method finished). Off for timing runs.
    pub oracle: bool,
    /// A directory to keep each task's record in (`keep_record`): the answer, every
    /// program with its hidden test's result, and the pipeline's trace. It must exist.
    pub keep: Option<PathBuf>,
}

impl EvalOptions {
    pub fn new(concurrency: usize) -> Self {
        Self {
            concurrency,
            oracle: true,
            keep: None,
        }
    }
}

/// The file a task's record is kept in: its place in the task file and its id, with every
/// character that could leave the directory or confuse a shell replaced.
pub fn keep_file_name(index: usize, task_id: &str) -> String {
    let safe: String = task_id
        .chars()
        .take(80)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{index:04}-{safe}.json")
}

/// Writes one task's record: its score, the answer scored, each distinct program the
/// method wrote with whether it passes the hidden test (null where the oracle did not
/// run), and the pipeline job's trace.
fn keep_record(
    dir: &Path,
    index: usize,
    score: &TaskScore,
    produced: &Produced,
    passing: Option<&[bool]>,
) {
    let programs: Vec<serde_json::Value> = produced
        .programs
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"program": p, "hidden_passed": passing.and_then(|x| x.get(i))}))
        .collect();
    let record = serde_json::json!({
        "score": score,
        "answer": produced.program,
        "programs": programs,
        "trace": produced.trace,
    });
    let path = dir.join(keep_file_name(index, &score.task_id));
    let written = serde_json::to_vec_pretty(&record)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&path, bytes));
    if let Err(e) = written {
        tracing::warn!("could not keep {}: {e}", path.display());
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
    /// Pipeline: the job's trace, kept only when asked (`EvalOptions::keep`).
    trace: Option<serde_json::Value>,
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

    /// The answer for a task, the completion tokens spent on it and what the oracle needs;
    /// with `keep_trace`, a pipeline job's trace.
    async fn produce(&self, t: &EvalTask, sandbox: &Sandbox, keep_trace: bool) -> Result<Produced> {
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
                        trace: keep_trace
                            .then(|| serde_json::to_value(&out.trace).ok())
                            .flatten(),
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
                        trace: keep_trace
                            .then(|| serde_json::to_value(&f.trace).ok())
                            .flatten(),
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
    let keep = options.keep.clone().map(Arc::new);
    let progress = Arc::new(progress);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    let task_ids: Vec<String> = tasks.iter().map(|t| t.task_id.clone()).collect();
    let mut ids = HashMap::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (runner, sandbox, permits, oracle_permits, progress, done, keep) = (
            runner.clone(),
            sandbox.clone(),
            permits.clone(),
            oracle_permits.clone(),
            progress.clone(),
            done.clone(),
            keep.clone(),
        );
        let handle = set.spawn(async move {
            let permit = permits.acquire_owned().await.expect("never closed");
            let t0 = Instant::now();
            let s = match runner.produce(&t, &sandbox, keep.is_some()).await {
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
                    let passing_count = passing.as_ref().map(|x| x.iter().filter(|&&p| p).count());
                    let s = TaskScore {
                        task_id: t.task_id.clone(),
                        passed,
                        outcome,
                        error: p.error.clone(),
                        completion_tokens: p.tokens,
                        wall_s,
                        verdict_status: p.verdict_status,
                        candidates: p.candidates,
                        oracle_programs: passing.as_ref().map(|_| p.programs.len()),
                        oracle_passing: passing_count,
                        oracle_pass: passing_count.map(|k| k > 0),
                        chosen: p.chosen,
                        own_examples_passed: p.own_examples_passed,
                    };
                    if let Some(dir) = &keep {
                        keep_record(dir, i, &s, &p, passing.as_deref());
                    }
                    s
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
mod tests;
