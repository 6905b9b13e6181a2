//! Whole jobs on a scripted model: every stage runs, bad answers degrade without panics,
//! and retries carry the failure back to the worker.

use crate::config::PipelineConfig;
use crate::formatter::Format;
use crate::job::JobOutcome;
use crate::task::TaskRequest;
use crate::testing::{ScriptedModel, TestBed};
use crate::trace::Stage;
use crate::verdict::{CheckName, VerdictStatus};

const STUB: &str = "def add(a: int, b: int) -> int:\n    \"\"\"Return the sum of a and b.\n\n    >>> add(2, 3)\n    5\n    \"\"\"\n";
const JUDGE_OK: &str = r#"{"pass": true, "problems": [], "feedback": ""}"#;

fn config(candidates: usize) -> PipelineConfig {
    let mut c = PipelineConfig::default();
    c.limits.candidates = candidates;
    c
}

/// The add stub through a whole job on `model`, with `cfg`.
async fn run_stub(model: &ScriptedModel, cfg: PipelineConfig, format: Format) -> JobOutcome {
    let bed = TestBed::with_config(model.clone(), cfg).await;
    bed.pipeline
        .run(TaskRequest::new(STUB), format, None)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_job_runs_every_stage_and_repairs_a_cyclic_plan() {
    let model = ScriptedModel::new()
        .on(
            "orchestrator",
            r#"{"subtasks": [{"id": "impl", "kind": "code", "description": "add", "depends_on": ["think"], "acceptance": []},
                             {"id": "think", "kind": "reasoning", "description": "plan", "depends_on": ["impl"], "acceptance": []},
                             {"id": "tests", "kind": "tests", "description": "tests", "depends_on": ["impl"], "acceptance": []}]}"#,
        )
        .on("reasoning", "1. Add the two numbers. 2. Return the sum.")
        .on("code", "def add(a, b):\n    return a - b\n```")
        .on("code", "def add(a, b):\n    return a + b\n```")
        .on("tests", "add():\n    assert add(1, 1) == 2\n```")
        .on("validator", JUDGE_OK)
        .on("synthesizer", "add(a, b) returns the sum.")
        .on("final_validator", JUDGE_OK);
    let bed = TestBed::with_config(model.clone(), config(2)).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let out = bed
        .pipeline
        .run(TaskRequest::new(STUB), Format::Md, Some(tx))
        .await
        .unwrap();
    let mut evented = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        evented.push(ev.stage);
    }
    let r = &out.result;
    assert!(r.passed, "{:#?}\n{:#?}", r.verdict, out.trace.subtasks);
    let module = r.module().unwrap();
    assert!(module.contains("return a + b"), "{module}");
    assert!(r.files.iter().any(|f| f.path == "test_solution.py"));
    assert!(
        out.trace
            .dag
            .repairs
            .iter()
            .any(|x| x.starts_with("cycle broken")),
        "{:?}",
        out.trace.dag.repairs
    );
    assert!(r.notes.iter().any(|n| n.contains("cycle broken")));
    for stage in Stage::ALL {
        assert!(
            out.trace.stages.iter().any(|s| s.stage == stage),
            "no {stage:?} in the trace"
        );
        assert!(evented.contains(&stage), "no {stage:?} event");
    }
    // The pipeline records the stages in the order they finished: a subtask's steps
    // before the dispatcher that ran them, the dispatcher before the collector.
    let ends: Vec<u64> = out
        .trace
        .stages
        .iter()
        .map(|s| s.started_ms + s.duration_ms)
        .collect();
    assert!(ends.windows(2).all(|w| w[0] <= w[1]), "{ends:?}");
    let at = |stage| out.trace.stages.iter().position(|s| s.stage == stage);
    assert!(at(Stage::Worker) < at(Stage::Dispatcher));
    assert!(at(Stage::Dispatcher) < at(Stage::Collector));
    assert!(
        out.rendered.contains("## solution.py") && out.rendered.contains("✓ task_examples"),
        "{}",
        out.rendered
    );
    assert!(out.trace.workers.contains_key("code") && out.trace.workers.contains_key("reasoning"));
    // The router needed no LLM: the stub is clear.
    assert!(!model.calls().iter().any(|(s, _)| s == "router"));
}

#[tokio::test]
async fn malformed_json_and_empty_answers_fail_cleanly() {
    let model = ScriptedModel::new()
        .on("orchestrator", "{\"subtasks\": [")
        .on("code", "")
        .on("synthesizer", "")
        .on("final_validator", "not json");
    let out = run_stub(&model, config(2), Format::Json).await;
    let r = &out.result;
    assert!(!r.passed);
    assert!(out
        .trace
        .plan
        .fallback
        .as_deref()
        .unwrap()
        .contains("did not parse"));
    assert!(r.notes[0].contains("one-subtask plan"), "{:?}", r.notes);
    let code = &out.trace.subtasks[0];
    assert!(!code.passed);
    assert!(
        code.stopped.contains("no better") || code.stopped.contains("retry limit"),
        "{}",
        code.stopped
    );
    // Empty answers leave no code, or a bare `def` line that does not parse.
    let f = &r.verdict.feedback;
    assert!(
        f.contains("no Python code") || f.starts_with("syntax:"),
        "{f}"
    );
    let json: serde_json::Value = serde_json::from_str(&out.rendered).unwrap();
    assert_eq!(json["passed"], false);
}

#[tokio::test]
async fn a_retry_is_told_what_failed_and_the_best_attempt_is_kept() {
    let model = ScriptedModel::new()
        .on("orchestrator", r#"{"subtasks": [{"id": "impl", "kind": "code", "description": "add", "depends_on": [], "acceptance": []}]}"#)
        .on("code", "def add(a, b):\n    return a * b\n```")
        .on("code", "def add(a, b):\n    return a + b\n```")
        .on("validator", JUDGE_OK)
        .on("synthesizer", "Adds.")
        .on("final_validator", JUDGE_OK);
    let out = run_stub(&model, config(1), Format::Code).await;
    assert!(out.result.passed, "{:#?}", out.result.verdict);
    assert_eq!(
        out.trace.subtasks[0].attempts.len(),
        2,
        "{:#?}",
        out.trace.subtasks[0].attempts
    );
    let code_prompts: Vec<String> = model
        .calls()
        .into_iter()
        .filter(|(s, _)| s == "code")
        .map(|(_, p)| p)
        .collect();
    assert_eq!(code_prompts.len(), 2);
    assert!(!code_prompts[0].contains("previous answer"));
    assert!(
        code_prompts[1].contains("return a * b") && code_prompts[1].contains("add(2, 3)"),
        "{}",
        code_prompts[1]
    );
    assert!(out.rendered.contains("return a + b"));
}

#[tokio::test]
async fn a_lone_job_writes_its_candidates_at_once_and_a_busy_one_only_those_it_needs() {
    let latency = std::time::Duration::from_millis(300);
    let wrong = "def add(a, b):\n    return a - b\n```";
    let right = "def add(a, b):\n    return a + b\n```";
    let plan = r#"{"subtasks": [{"id": "impl", "kind": "code", "description": "add", "depends_on": [], "acceptance": []}]}"#;

    // Alone, a job's own candidates and the shared ones together: all 16 at once.
    let model = ScriptedModel::new()
        .with_latency(latency)
        .on("orchestrator", plan)
        .on("code", wrong);
    let out = run_stub(&model, config(16), Format::Code).await;
    assert!(!out.result.passed);
    assert_eq!(model.max_in_flight("code"), 16);

    // The shared candidates taken by other jobs: two at a time, and once the second passes
    // the ones not yet started are never written.
    let model = ScriptedModel::new()
        .with_latency(latency)
        .on("orchestrator", plan)
        .on("code", wrong)
        .on("code", right)
        .on("validator", JUDGE_OK)
        .on("synthesizer", "Adds.")
        .on("final_validator", JUDGE_OK);
    let mut cfg = config(16);
    cfg.limits.shared_candidates_in_flight = 0;
    let out = run_stub(&model, cfg, Format::Code).await;
    assert!(out.result.passed);
    assert_eq!(model.max_in_flight("code"), 2);
    let written = model.calls().iter().filter(|(s, _)| s == "code").count();
    assert!(written < 16, "{written} candidates written");
}

/// A stage that panics fails its job with the panic, records where it was, and leaves the
/// pipeline serving the next job.
#[tokio::test]
async fn a_panicking_stage_fails_its_job_and_the_next_job_runs() {
    let model = ScriptedModel::new()
        .on("orchestrator", crate::testing::PANIC)
        .on(
            "orchestrator",
            r#"{"subtasks": [{"id": "impl", "kind": "code", "description": "add", "depends_on": [], "acceptance": []}]}"#,
        )
        .on("code", "def add(a, b):\n    return a + b\n```")
        .on("validator", JUDGE_OK)
        .on("synthesizer", "add(a, b) returns the sum.")
        .on("final_validator", JUDGE_OK);
    let bed = TestBed::with_config(model.clone(), config(1)).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let failure = bed
        .pipeline
        .run_traced(TaskRequest::new(STUB), Format::Md, Some(tx))
        .await
        .err()
        .expect("the job fails");
    assert!(
        matches!(&failure.error, crate::Error::Internal(m) if m.contains("scripted panic")),
        "{:?}",
        failure.error
    );
    assert_eq!(failure.stage, Some(Stage::Orchestrator));
    assert!(failure
        .trace
        .stages
        .iter()
        .any(|s| s.stage == Stage::Router));
    let mut last = None;
    while let Ok(ev) = rx.try_recv() {
        last = Some(ev);
    }
    let last = last.unwrap();
    assert_eq!(last.status, crate::trace::EventStatus::Failed);
    assert!(last.message.contains("scripted panic"), "{}", last.message);

    let out = bed
        .pipeline
        .run(TaskRequest::new(STUB), Format::Md, None)
        .await
        .unwrap();
    assert!(out.result.passed, "{:#?}", out.result.verdict);
}

/// A judge that panics inside a validation runner fails that check only; the runner lives
/// on and the job still ends with a verdict.
#[tokio::test]
async fn a_panicking_check_does_not_take_the_validation_runners_down() {
    let model = ScriptedModel::new()
        .on(
            "orchestrator",
            r#"{"subtasks": [{"id": "impl", "kind": "code", "description": "add", "depends_on": [], "acceptance": []}]}"#,
        )
        .on("code", "def add(a, b):\n    return a + b\n```")
        .on("validator", crate::testing::PANIC)
        .on("synthesizer", "add(a, b) returns the sum.")
        .on("final_validator", crate::testing::PANIC);
    let mut cfg = config(1);
    cfg.limits.validators = 1;
    let bed = TestBed::with_config(model.clone(), cfg).await;
    for _ in 0..2 {
        let out = bed
            .pipeline
            .run(TaskRequest::new(STUB), Format::Md, None)
            .await;
        // Whatever the verdict, the job ends: the panics did not hang or kill it.
        assert!(out.is_ok() || matches!(out, Err(crate::Error::Internal(_))));
    }
    assert!(bed.pipeline.validation_stats().running == 0);
}

/// Non-ASCII text in the task's docstring (HumanEval's `≤`, `➞`) runs through every stage.
#[tokio::test]
async fn non_ascii_task_text_runs_through_the_job() {
    let stub = "def add(a: int, b: int) -> int:\n    \"\"\"Return the sum of a and b, 0 ≤ a ≤ 10 ➞ café.\n\n    >>> add(2, 3)\n    5\n    \"\"\"\n";
    let model = ScriptedModel::new()
        .on(
            "orchestrator",
            r#"{"subtasks": [{"id": "impl", "kind": "code", "description": "add ≤", "depends_on": [], "acceptance": []}]}"#,
        )
        .on("code", "def add(a, b):\n    \"\"\"Sum ≤ café\\é.\"\"\"\n    return a + b\n```")
        .on("validator", JUDGE_OK)
        .on("synthesizer", "add(a, b) returns the sum ≤.")
        .on("final_validator", JUDGE_OK);
    let bed = TestBed::with_config(model.clone(), config(1)).await;
    let out = bed
        .pipeline
        .run(TaskRequest::new(stub), Format::Md, None)
        .await
        .unwrap();
    assert!(out.result.passed, "{:#?}", out.result.verdict);
    assert!(out.result.module().unwrap().contains("café"));
}

const CSV_TASK: &str = "Write a command-line script that reads a CSV file and writes it back without duplicate rows, keeping the first occurrence. Include tests.";
const CSV_PLAN: &str = r#"{"subtasks": [{"id": "impl", "kind": "code", "description": "the script", "depends_on": [], "acceptance": []},
                          {"id": "tests", "kind": "tests", "description": "tests", "depends_on": ["impl"], "acceptance": []}]}"#;
const CSV_INPUT: &str = r#"{"args": ["data.csv"], "stdin": "", "files": [{"name": "data.csv", "content": "a,b\n1,2\n1,2\n3,4\n"}]}"#;
/// The code from the issue: it imports, and crashes as soon as it runs.
const CSV_CRASHING: &str = "import csv\nimport sys\n\n\ndef dedupe(path):\n    seen = set()\n    writer = csv.writer(None)\n    with open(path) as f:\n        for row in csv.reader(f):\n            if tuple(row) not in seen:\n                seen.add(tuple(row))\n                writer.writerow(row)\n    print(undefined_name)\n\n\nif __name__ == \"__main__\":\n    dedupe(sys.argv[1])\n```";
const CSV_WORKING: &str = "import csv\nimport sys\n\n\ndef dedupe(path):\n    seen = set()\n    writer = csv.writer(sys.stdout)\n    with open(path, newline=\"\") as f:\n        for row in csv.reader(f):\n            if tuple(row) not in seen:\n                seen.add(tuple(row))\n                writer.writerow(row)\n\n\nif __name__ == \"__main__\":\n    dedupe(sys.argv[1])\n```";

/// A whole job on `task`, `candidates` code candidates an attempt.
async fn run_task(
    model: &ScriptedModel,
    candidates: usize,
    task: &str,
    format: Format,
) -> JobOutcome {
    let bed = TestBed::with_config(model.clone(), config(candidates)).await;
    bed.pipeline
        .run(TaskRequest::new(task), format, None)
        .await
        .unwrap()
}

/// The check of that name in a verdict; the test fails if it did not run.
fn check_named(v: &crate::verdict::Verdict, name: CheckName) -> &crate::verdict::CheckResult {
    v.checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name} check in {v:#?}"))
}

/// The report states `status`, and never says the result passed.
fn assert_reported(out: &JobOutcome, status: &str) {
    assert!(
        out.rendered.contains(&format!("**Status:** {status}")),
        "{}",
        out.rendered
    );
    assert!(!out.rendered.contains("passed the"), "{}", out.rendered);
}

async fn run_csv(model: &ScriptedModel) -> JobOutcome {
    let bed = TestBed::with_config(model.clone(), config(1)).await;
    bed.pipeline
        .run(TaskRequest::new(CSV_TASK), Format::Md, None)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_script_that_crashes_on_its_smoke_run_fails_whatever_the_reviewer_says() {
    let model = ScriptedModel::new()
        .on("orchestrator", CSV_PLAN)
        .on("smoke_input", CSV_INPUT)
        .on("code", CSV_CRASHING)
        // Tests with a syntax error, as in the issue.
        .on("tests", "dedupe(:\n    assert True\n```")
        .on("validator", JUDGE_OK)
        .on("synthesizer", "A script that removes duplicate rows.")
        .on("final_validator", JUDGE_OK);
    let out = run_csv(&model).await;
    let r = &out.result;
    assert_eq!(r.verdict.status, VerdictStatus::Failed, "{:#?}", r.verdict);
    assert!(!r.passed);
    let smoke = check_named(&r.verdict, CheckName::SmokeRun);
    assert!(!smoke.passed && smoke.hard, "{smoke:?}");
    assert!(
        smoke.detail.contains("python solution.py data.csv"),
        "{}",
        smoke.detail
    );
    // The retry was told what crashed, on which input.
    let code_prompts: Vec<String> = model
        .calls()
        .into_iter()
        .filter(|(s, _)| s == "code")
        .map(|(_, p)| p)
        .collect();
    assert!(code_prompts.len() >= 2, "no retry");
    assert!(
        code_prompts[1].contains("smoke_run") && code_prompts[1].contains("data.csv"),
        "{}",
        code_prompts[1]
    );
    // No LLM opinion is called a pass, and the report never says "passed".
    assert!(!r
        .verdict
        .checks
        .iter()
        .any(|c| c.name == CheckName::Reviewer));
    assert_reported(&out, "failed");
    // Each piece of evidence on a line of its own.
    for item in [
        "- ✓ import (execution): ok (proves the module loads",
        "- ✗ smoke_run (execution): `python solution.py data.csv` crashed",
    ] {
        assert!(
            out.rendered.lines().any(|l| l.starts_with(item)),
            "{item}\n{}",
            out.rendered
        );
    }
}

#[tokio::test]
async fn a_script_that_runs_but_has_no_trusted_check_is_unverified() {
    let model = ScriptedModel::new()
        .on("orchestrator", CSV_PLAN)
        .on("smoke_input", CSV_INPUT)
        .on("code", CSV_CRASHING)
        .on("code", CSV_WORKING)
        .on("tests", "dedupe(:\n    assert True\n```")
        .on("validator", JUDGE_OK)
        .on("synthesizer", "A script that removes duplicate rows.")
        .on("final_validator", JUDGE_OK);
    let out = run_csv(&model).await;
    let r = &out.result;
    assert_eq!(
        r.verdict.status,
        VerdictStatus::Unverified,
        "{:#?}",
        r.verdict
    );
    assert!(!r.passed);
    assert!(r.module().unwrap().contains("csv.writer(sys.stdout)"));
    let smoke = check_named(&r.verdict, CheckName::SmokeRun);
    assert!(smoke.passed, "{smoke:?}");
    // The run decided, so no reviewer was asked: it could only have changed a score.
    assert!(!model.calls().iter().any(|(s, _)| s == "final_validator"));
    assert_reported(&out, "unverified");
}

#[tokio::test]
async fn an_unusable_review_is_no_approval() {
    // A prose answer has nothing to run: the reviewer decides, and an answer that does
    // not parse is no review at all (it used to count as a pass).
    let model = ScriptedModel::new()
        .on("validator", "not json at all")
        .on("final_validator", "not json at all");
    let bed = TestBed::new(model.clone()).await;
    let ctx = bed.ctx();
    let route = crate::router::route_by_rules(&ctx.task);
    let spec = crate::planning::TaskSpec {
        id: "why".into(),
        kind: crate::workers::WorkerKind::Reasoning,
        description: "explain".into(),
        depends_on: vec![],
        acceptance: vec![],
        primary: true,
        critical: true,
    };
    let artifact = crate::workers::Artifact {
        subtask: "why".into(),
        kind: crate::workers::WorkerKind::Reasoning,
        attempt: 1,
        candidate: 1,
        text: "Adding two numbers gives their sum, as arithmetic says.".into(),
        code: None,
        files: vec![],
    };
    let v = crate::validators::validate(
        &ctx,
        &route,
        &spec,
        &artifact,
        &crate::validators::Evidence::default(),
    )
    .await;
    assert!(model.calls().iter().any(|(s, _)| s == "validator"));
    assert!(v.judge.is_none(), "{v:?}");
    assert!(!v.checks.iter().any(|c| c.name == CheckName::Reviewer));
    assert_eq!(v.status, VerdictStatus::Unverified);
}

/// A stub with no example: nothing trusted can check it.
const BARE_STUB: &str =
    "def add(a: int, b: int) -> int:\n    \"\"\"Return the sum of a and b.\"\"\"\n";

/// One code subtask whose candidates define `add` to return each expression in turn; every
/// review approves.
fn add_model(bodies: &[&str]) -> ScriptedModel {
    let mut model = ScriptedModel::new().on("orchestrator", ONE_CODE_PLAN);
    for body in bodies {
        model = model.on("code", &format!("def add(a, b):\n    return {body}\n```"));
    }
    model
        .on("validator", JUDGE_OK)
        .on("synthesizer", "Adds.")
        .on("final_validator", JUDGE_OK)
}

const ONE_CODE_PLAN: &str = r#"{"subtasks": [{"id": "impl", "kind": "code", "description": "add", "depends_on": [], "acceptance": []}]}"#;

async fn run_bare(model: &ScriptedModel) -> JobOutcome {
    let bed = TestBed::with_config(model.clone(), config(3)).await;
    bed.pipeline
        .run(TaskRequest::new(BARE_STUB), Format::Md, None)
        .await
        .unwrap()
}

#[tokio::test]
async fn candidates_that_agree_make_a_result_consistent_never_verified() {
    let model = add_model(&["a + b", "a - b", "b + a"]);
    let out = run_bare(&model).await;
    let r = &out.result;
    assert_eq!(
        r.verdict.status,
        VerdictStatus::Consistent,
        "{:#?}",
        r.verdict
    );
    assert!(!r.passed);
    let module = r.module().unwrap();
    assert!(!module.contains("a - b"), "{module}");
    let agreement = check_named(&r.verdict, CheckName::Agreement);
    assert!(
        agreement.passed && agreement.detail.contains("2 of 3"),
        "{agreement:?}"
    );
    // Execution chose among the candidates: no reviewer was asked about each.
    assert!(!model.calls().iter().any(|(s, _)| s == "validator"));
    assert_reported(&out, "consistent");
}

#[tokio::test]
async fn candidates_that_all_disagree_leave_a_result_unverified() {
    let model = add_model(&["a + b", "a - b", "a * b"]);
    let out = run_bare(&model).await;
    let r = &out.result;
    assert_eq!(
        r.verdict.status,
        VerdictStatus::Unverified,
        "{:#?}",
        r.verdict
    );
    assert_reported(&out, "unverified");
}

#[tokio::test]
async fn agreement_does_not_speak_for_code_that_fails_its_generated_tests() {
    let model = ScriptedModel::new()
        .on("orchestrator", r#"{"subtasks": [{"id": "impl", "kind": "code", "description": "add", "depends_on": [], "acceptance": []},
                                              {"id": "tests", "kind": "tests", "description": "tests", "depends_on": [], "acceptance": []}]}"#)
        .on("code", "def add(a, b):\n    return a + b\n```")
        .on("code", "def add(a, b):\n    return a - b\n```")
        .on("code", "def add(a, b):\n    return b + a\n```")
        .on("tests", "add():\n    from solution import add\n    assert add(1, 1) == 3\n```")
        .on("validator", JUDGE_OK)
        .on("synthesizer", "Adds.")
        .on("final_validator", JUDGE_OK);
    let out = run_bare(&model).await;
    let v = &out.result.verdict;
    assert!(
        v.checks
            .iter()
            .any(|c| c.name == CheckName::GeneratedTests && !c.passed),
        "{v:#?}"
    );
    assert_ne!(v.status, VerdictStatus::Consistent, "{v:#?}");
    assert!(!v.checks.iter().any(|c| c.name == CheckName::Agreement));
}

#[tokio::test]
async fn examples_stated_in_prose_verify_and_fail() {
    const TASK: &str = "Write a Python function add(a, b) that returns the sum of a and b. For example, add(2, 3) returns 5 and add(-1, 1) should return 0.";
    for (code, want) in [
        (
            "def add(a, b):\n    return a + b\n```",
            VerdictStatus::Verified,
        ),
        (
            "def add(a, b):\n    return a * b\n```",
            VerdictStatus::Failed,
        ),
    ] {
        let model = ScriptedModel::new()
            .on("orchestrator", ONE_CODE_PLAN)
            .on("code", code)
            .on("synthesizer", "Adds.")
            .on("final_validator", JUDGE_OK);
        let out = run_task(&model, 1, TASK, Format::Json).await;
        let v = &out.result.verdict;
        assert_eq!(v.status, want, "{v:#?}");
        let examples = v
            .checks
            .iter()
            .find(|c| c.name == CheckName::TaskExamples)
            .unwrap();
        assert_eq!(examples.tests.map(|t| t.1), Some(2), "{examples:?}");
        assert_eq!(out.result.passed, want == VerdictStatus::Verified);
    }
}

/// A stub whose example leaves out the empty string.
const LAST_STUB: &str = r#"def last_char(text: str) -> str:
    """Return the last character of text; "" when text is empty.

    >>> last_char("abc")
    'c'
    """
"#;

async fn run_last(model: &ScriptedModel, candidates: usize) -> JobOutcome {
    run_task(model, candidates, LAST_STUB, Format::Md).await
}

fn last_model(bodies: &[&str]) -> ScriptedModel {
    let mut model = ScriptedModel::new().on("orchestrator", ONE_CODE_PLAN);
    for body in bodies {
        model = model.on("code", &format!("def last_char(text):\n{body}\n```"));
    }
    model
        .on("synthesizer", "Returns the last character.")
        .on("final_validator", JUDGE_OK)
}

#[tokio::test]
async fn code_that_passes_its_examples_but_crashes_on_an_empty_input_is_not_verified() {
    for (body, detail) in [
        (
            "    return text[-1]",
            "`last_char('')` crashed with IndexError",
        ),
        // An example's answer whatever the input: hard-coded.
        (
            "    return 'c'",
            "returns 'c', the answer of the example `last_char(\"abc\")`",
        ),
    ] {
        let model = last_model(&[body]);
        let out = run_last(&model, 1).await;
        let v = &out.result.verdict;
        assert_eq!(v.status, VerdictStatus::Unverified, "{v:#?}");
        assert!(check_named(v, CheckName::TaskExamples).passed, "{v:#?}");
        let edge = check_named(v, CheckName::EdgeCases);
        assert!(!edge.passed && edge.detail.contains(detail), "{edge:?}");
        assert!(!out.result.passed);
        assert_reported(&out, "unverified");
        // The search went on, and the retry was told what was found.
        let code_calls: Vec<String> = model
            .calls()
            .into_iter()
            .filter(|(s, _)| s == "code")
            .map(|(_, text)| text)
            .collect();
        assert!(code_calls.len() > 1, "{code_calls:?}");
        assert!(
            code_calls.iter().skip(1).any(|t| t.contains(detail)),
            "{code_calls:#?}"
        );
    }
}

#[tokio::test]
async fn a_candidate_without_the_crash_is_chosen_and_a_refusal_is_no_crash() {
    let model = last_model(&["    return text[-1]", "    return text[-1:]"]);
    let out = run_last(&model, 2).await;
    let v = &out.result.verdict;
    assert_eq!(v.status, VerdictStatus::Verified, "{v:#?}");
    assert!(check_named(v, CheckName::EdgeCases).passed, "{v:#?}");
    let module = out.result.module().unwrap();
    assert!(module.contains("text[-1:]"), "{module}");
    // Raising an exception of its own on an empty input is a choice, not a crash.
    let model = last_model(&[
        "    if not text:\n        raise ValueError('empty text')\n    return text[-1]",
    ]);
    let out = run_last(&model, 1).await;
    assert_eq!(
        out.result.verdict.status,
        VerdictStatus::Verified,
        "{:#?}",
        out.result.verdict
    );
}

#[tokio::test]
async fn code_that_uses_what_the_task_forbids_fails() {
    const TASK: &str = r#"def evaluate(expression: str) -> int:
    """Evaluate a sum of non-negative integers such as "1 + 2". Do not use eval().

    >>> evaluate("2 + 3")
    5
    """
"#;
    let evals = "def evaluate(expression):\n    return eval(expression)\n```";
    let sums =
        "def evaluate(expression):\n    return sum(int(p) for p in expression.split('+'))\n```";
    for (candidates, want) in [
        (vec![evals], VerdictStatus::Failed),
        (vec![evals, sums], VerdictStatus::Verified),
    ] {
        let mut model = ScriptedModel::new().on("orchestrator", ONE_CODE_PLAN);
        for c in &candidates {
            model = model.on("code", c);
        }
        let model = model
            .on("synthesizer", "Evaluates.")
            .on("final_validator", JUDGE_OK);
        let out = run_task(&model, candidates.len(), TASK, Format::Json).await;
        let v = &out.result.verdict;
        assert_eq!(v.status, want, "{v:#?}");
        let rule = check_named(v, CheckName::TaskConstraints);
        assert_eq!(rule.passed, want == VerdictStatus::Verified, "{rule:?}");
        if !rule.passed {
            assert!(
                rule.detail.contains("uses `eval`, which the task forbids"),
                "{rule:?}"
            );
        }
    }
}

#[tokio::test]
async fn code_alone_is_written_without_a_summary_nobody_reads() {
    let model = ScriptedModel::new()
        .on("orchestrator", ONE_CODE_PLAN)
        .on("code", "def add(a, b):\n    return a + b\n```")
        .on("synthesizer", "Adds two numbers.")
        .on("final_validator", JUDGE_OK);
    let summaries =
        |m: &ScriptedModel| m.calls().iter().filter(|(s, _)| s == "synthesizer").count();
    let out = run_task(&model, 1, STUB, Format::Code).await;
    assert!(out.rendered.contains("return a + b"), "{}", out.rendered);
    assert_eq!(summaries(&model), 0);
    let out = run_task(&model, 1, STUB, Format::Md).await;
    assert!(
        out.rendered.contains("Adds two numbers."),
        "{}",
        out.rendered
    );
    assert_eq!(summaries(&model), 1);
}
