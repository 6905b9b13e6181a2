//! Evaluation on HumanEval-format tasks (`task_id`, `prompt`, `test`, `entry_point`): each
//! task run through the pipeline, or through the single-call baseline (one chat call
//! asking for the function, its code block extracted), then scored by its hidden test in
//! the sandbox. The pipeline never sees the test.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forgeline_engine::chat::ChatMessage;
use forgeline_engine::scheduler::GenerateRequest;
use forgeline_sandbox::{Limits, Module, Sandbox, TestKind, TestSuite};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::formatter::Format;
use crate::job::Pipeline;
use crate::llm::LanguageModel;
use crate::python;
use crate::task::TaskRequest;
use crate::{Error, Result};

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
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pipeline => "pipeline",
            Mode::SingleCall => "single-call",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TaskScore {
    pub task_id: String,
    pub passed: bool,
    /// The hidden test's outcome (`passed`, `assertion_failed`, ...) or `error`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub completion_tokens: usize,
    pub wall_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub mode: String,
    pub tasks: usize,
    pub passed: usize,
    pub pass_at_1: f64,
    pub wall_s: f64,
    pub completion_tokens: usize,
    pub concurrency: usize,
    pub per_task: Vec<TaskScore>,
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

/// The program scored for an answer: its code block (the task's prompt in front when the
/// answer is only a body), with the task's imports.
pub fn program_from_answer(t: &EvalTask, answer: &str) -> String {
    let code = python::extract_code(answer).unwrap_or_default();
    let code = if python::defines(&code, &t.entry_point) {
        code
    } else {
        format!("{}{}", t.prompt, code)
    };
    python::ensure_imports(&code, &t.prompt)
}

/// Runs the hidden test against a program.
pub async fn score(sandbox: &Sandbox, t: &EvalTask, program: &str) -> (bool, String) {
    let run = async {
        let module = Module::new("solution", program.as_bytes().to_vec())?;
        let tests = TestSuite::new("test_hidden.py", t.test.as_bytes().to_vec())?
            .with_kind(TestKind::Check)
            .with_entry_point(&t.entry_point)?;
        let job = forgeline_sandbox::Job::new(module, forgeline_sandbox::Check::Tests(tests))
            .with_limits(Limits::default().with_timeout(Duration::from_secs(10)));
        sandbox.run(job).await
    };
    match run.await {
        Ok(r) => (r.passed(), r.outcome.status().to_string()),
        Err(e) => (false, format!("error: {e}")),
    }
}

/// What runs each task.
#[derive(Clone)]
pub enum Runner {
    Pipeline(Pipeline),
    SingleCall {
        llm: Arc<dyn LanguageModel>,
        max_tokens: usize,
    },
}

impl Runner {
    fn mode(&self) -> Mode {
        match self {
            Runner::Pipeline(_) => Mode::Pipeline,
            Runner::SingleCall { .. } => Mode::SingleCall,
        }
    }

    /// The program for a task, and the completion tokens spent on it.
    async fn program(&self, t: &EvalTask) -> Result<(String, usize)> {
        match self {
            Runner::Pipeline(p) => {
                let mut req = TaskRequest::new(t.prompt.clone());
                req.entry_point = Some(t.entry_point.clone());
                let out = p.run(req, Format::Code, None).await?;
                let program = out.result.module().unwrap_or_default().to_string();
                Ok((program, out.result.completion_tokens))
            }
            Runner::SingleCall { llm, max_tokens } => {
                let req = GenerateRequest::chat(single_call_messages(t), *max_tokens);
                let c = llm.complete(req).await?;
                Ok((program_from_answer(t, &c.text), c.usage.completion_tokens))
            }
        }
    }
}

/// Runs every task, `concurrency` at a time; `progress` sees each score as it comes.
pub async fn run_eval(
    runner: Runner,
    sandbox: Sandbox,
    tasks: Vec<EvalTask>,
    concurrency: usize,
    progress: impl Fn(&TaskScore, usize, usize) + Send + Sync + 'static,
) -> EvalReport {
    let started = Instant::now();
    let n = tasks.len();
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let progress = Arc::new(progress);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    let task_ids: Vec<String> = tasks.iter().map(|t| t.task_id.clone()).collect();
    let mut ids = std::collections::HashMap::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (runner, sandbox, permits, progress, done) = (
            runner.clone(),
            sandbox.clone(),
            permits.clone(),
            progress.clone(),
            done.clone(),
        );
        let handle = set.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("never closed");
            let t0 = Instant::now();
            let s = match runner.program(&t).await {
                Ok((program, tokens)) => {
                    let (passed, outcome) = score(&sandbox, &t, &program).await;
                    TaskScore {
                        task_id: t.task_id.clone(),
                        passed,
                        outcome,
                        error: None,
                        completion_tokens: tokens,
                        wall_s: t0.elapsed().as_secs_f64(),
                    }
                }
                Err(e) => TaskScore {
                    task_id: t.task_id.clone(),
                    passed: false,
                    outcome: "error".into(),
                    error: Some(e.to_string()),
                    completion_tokens: 0,
                    wall_s: t0.elapsed().as_secs_f64(),
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
                        completion_tokens: 0,
                        wall_s: 0.0,
                    },
                ));
            }
        }
    }
    per_task.sort_by_key(|(i, _)| *i);
    let per_task: Vec<TaskScore> = per_task.into_iter().map(|(_, s)| s).collect();
    let passed = per_task.iter().filter(|s| s.passed).count();
    EvalReport {
        mode: runner.mode().name().into(),
        tasks: n,
        passed,
        pass_at_1: passed as f64 / n.max(1) as f64,
        wall_s: started.elapsed().as_secs_f64(),
        completion_tokens: per_task.iter().map(|s| s.completion_tokens).sum(),
        concurrency,
        per_task,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> EvalTask {
        EvalTask {
            task_id: "t/0".into(),
            prompt: "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n".into(),
            test: "def check(candidate):\n    assert candidate([1, 2]) == 3\n".into(),
            entry_point: "total".into(),
        }
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
}
