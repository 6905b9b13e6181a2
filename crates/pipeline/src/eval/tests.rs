use std::collections::VecDeque;
use std::sync::Mutex;

use forgeline_engine::scheduler::Completion;
use serde_json::{json, Value};

use super::*;
use std::collections::HashSet;

use crate::config::PipelineConfig;
use crate::llm::BoxFuture;
use crate::planning::TaskSpec;
use crate::stage::Stage;
use crate::testing::{ScriptedModel, TestBed};
use crate::trace::StageRecord;
use crate::workers::Artifact;
use crate::workers::WorkerKind;

fn task() -> EvalTask {
    EvalTask {
        task_id: "t/0".into(),
        prompt:
            "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n"
                .into(),
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
    let keep = tempfile::tempdir().unwrap();
    let r = run_eval(
        Runner::Pipeline(bed.pipeline.clone()),
        sandbox,
        vec![t.clone()],
        EvalOptions {
            keep: Some(keep.path().to_path_buf()),
            ..EvalOptions::new(1)
        },
        |_, _, _| {},
    )
    .await;
    // The task's record: its score, every program with the hidden test's result, the trace.
    let kept = keep.path().join(keep_file_name(0, &t.task_id));
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
    assert_eq!(record["score"]["task_id"], t.task_id.as_str());
    let programs = record["programs"].as_array().unwrap();
    assert!(
        programs.iter().any(|p| p["hidden_passed"] == true),
        "{record:#}"
    );
    assert!(
        programs.iter().any(|p| p["program"] == record["answer"]),
        "{record:#}"
    );
    assert!(record["trace"]["llm_calls"]
        .as_array()
        .is_some_and(|c| !c.is_empty()));
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
        keep: None,
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

#[test]
fn a_kept_record_stays_in_its_directory() {
    assert_eq!(keep_file_name(3, "HumanEval/12"), "0003-HumanEval_12.json");
    assert_eq!(
        keep_file_name(0, "../../etc/passwd"),
        "0000-______etc_passwd.json"
    );
    assert_eq!(keep_file_name(7, "tâche é"), "0007-t_che__.json");
}
