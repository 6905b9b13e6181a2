//! End-to-end tests of `forgeline generate` and `forgeline eval` on the default model: the
//! real binary, the real pipeline, the real sandbox.

use std::path::Path;
use std::process::{Command, Output};

fn forgeline(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forgeline"))
        .args(args)
        .current_dir(dir)
        .env(
            "FORGELINE_MODELS_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/models"),
        )
        .env_remove("RUST_LOG")
        .output()
        .expect("run forgeline")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(args: &[&str], out: &Output, dir: &Path) -> String {
    let files: Vec<String> = walk(dir);
    format!(
        "forgeline {args:?} -> {:?}\nstdout:\n{}\nstderr:\n{}\nfiles: {files:?}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn walk(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                v.extend(walk(&e.path()));
            } else {
                v.push(e.path().display().to_string());
            }
        }
    }
    v
}

/// A smaller job than the defaults, so that the test stays quick; every stage still runs.
const QUICK: &str = "[limits]\ncandidates = 2\nmax_retries = 1\nmax_synthesis_retries = 1\n";

#[test]
fn generate_writes_a_python_file_that_parses_and_a_trace_of_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("quick.toml"), QUICK).unwrap();
    let args = [
        "generate",
        "Write a Python function `is_even(n)` that returns True when the integer n is even and False otherwise.",
        "--out",
        "out",
        "--trace",
        "trace.json",
        "--format",
        "json",
        "--config",
        "quick.toml",
    ];
    let out = forgeline(&args, dir.path());
    let why = show(&args, &out, dir.path());
    // The task states no example and comes with no tests: nothing trusted can check the
    // result, so it is never `verified`, never exits 0 (without `--require`), and nothing
    // says it passed. 1: it failed a check; 4: code that is not verified.
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect(&why);
    let status = result["verdict"]["status"].as_str().expect(&why);
    let want = match status {
        "failed" => 1,
        "unverified" | "consistent" => 4,
        other => panic!("`{other}` with no trusted check\n{why}"),
    };
    assert_eq!(out.status.code(), Some(want), "{why}");
    assert_eq!(result["passed"], false, "{why}");
    // The summary line on stderr names the status, and never says "passed".
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().any(|l| l.starts_with(status)), "{why}");
    assert!(!stderr.contains("passed"), "{why}");
    let evidence = result["verdict"]["evidence"].as_array().expect(&why);
    assert!(evidence.iter().all(|e| e["trust"] != "trusted"), "{why}");

    let module = dir.path().join("out/solution.py");
    assert!(module.is_file(), "{why}");
    let parsed = Command::new("python3")
        .args(["-c", "import ast, sys; ast.parse(open(sys.argv[1]).read())"])
        .arg(&module)
        .output()
        .unwrap();
    assert!(
        parsed.status.success(),
        "solution.py does not parse: {}\n{why}",
        text(&parsed.stderr)
    );

    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("trace.json")).unwrap()).unwrap();
    let seen: Vec<&str> = trace["stages_seen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for stage in [
        "router",
        "orchestrator",
        "planning",
        "dispatcher",
        "worker",
        "validation",
        "retry",
        "collector",
        "synthesizer",
        "final_validator",
        "synthesizer_retry",
        "formatter",
    ] {
        assert!(seen.contains(&stage), "no {stage} in the trace: {seen:?}");
    }
    let calls = trace["llm_calls"].as_array().unwrap();
    assert!(calls
        .iter()
        .any(|c| c["stage"] == "orchestrator" && c["constrained"] == true));
    assert!(calls
        .iter()
        .all(|c| c["prompt"]["user"].as_str().is_some_and(|u| !u.is_empty())));
    assert!(
        trace["workers"]["code"]["calls"].as_u64().unwrap() >= 1,
        "{}",
        trace["workers"]
    );
    // Piped: no progress drawing on stderr.
    assert!(!text(&out.stderr).contains('\r'), "{why}");
}

#[test]
fn generate_refuses_bad_input_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.toml"),
        "[stages.coder]\nmax_tokens = 3\n",
    )
    .unwrap();
    for (args, message) in [
        (vec!["generate", "  "], "`task` is empty"),
        (vec!["generate", "x", "--file", "missing.py"], "missing.py"),
        (
            vec!["generate", "x", "--format", "html"],
            "unknown format `html`",
        ),
        (
            vec!["generate", "x", "--config", "bad.toml"],
            "unknown stage `coder`",
        ),
        (vec!["generate", "x", "--prompts", "nowhere"], "nowhere"),
        (vec!["eval", "missing.jsonl"], "missing.jsonl"),
    ] {
        let out = forgeline(&args, dir.path());
        let why = show(&args, &out, dir.path());
        assert_eq!(out.status.code(), Some(2), "{why}");
        assert!(text(&out.stderr).contains(message), "{why}");
        assert!(out.stdout.is_empty(), "{why}");
    }
}

#[test]
fn eval_scores_tasks_with_their_hidden_tests() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/tasks.jsonl"
    ))
    .unwrap();
    let two: Vec<&str> = tasks.lines().take(2).collect();
    std::fs::write(dir.path().join("two.jsonl"), two.join("\n")).unwrap();
    let args = ["eval", "two.jsonl", "--mode", "single-call", "--json"];
    let out = forgeline(&args, dir.path());
    let why = show(&args, &out, dir.path());
    assert_eq!(out.status.code(), Some(0), "{why}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect(&why);
    assert_eq!(r["mode"], "single-call");
    assert_eq!(r["tasks"], 2);
    let per_task = r["per_task"].as_array().unwrap();
    assert_eq!(per_task.len(), 2);
    let passed = per_task.iter().filter(|t| t["passed"] == true).count();
    assert_eq!(r["passed"], passed);
    assert!((r["pass_at_1"].as_f64().unwrap() - passed as f64 / 2.0).abs() < 1e-9);
    assert!(r["wall_s"].as_f64().unwrap() > 0.0);
    assert!(r["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(per_task[0]["task_id"], "forgeline/0");
}

/// HumanEval's non-ASCII docstrings (`≤`, `➞`, `café`) once panicked every job at its
/// first stage; now every task is scored.
#[test]
fn eval_completes_on_tasks_with_non_ascii_text() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("quick.toml"), QUICK).unwrap();
    let tasks = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/non_ascii_tasks.jsonl"
    );
    let args = [
        "eval",
        tasks,
        "--concurrency",
        "3",
        "--config",
        "quick.toml",
        "--json",
    ];
    let out = forgeline(&args, dir.path());
    let why = show(&args, &out, dir.path());
    assert_eq!(out.status.code(), Some(0), "{why}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect(&why);
    assert_eq!(r["mode"], "pipeline", "{why}");
    let per_task = r["per_task"].as_array().unwrap();
    assert_eq!(per_task.len(), 3, "{why}");
    for t in per_task {
        assert!(t["error"].is_null(), "a task ended in an error: {t}\n{why}");
        assert_ne!(t["outcome"], "error", "{t}\n{why}");
        // The verdict the job gave, what it wrote, and the oracle over what it wrote.
        let status = t["verdict_status"].as_str().expect(&why);
        assert!(
            ["verified", "consistent", "unverified", "failed"].contains(&status),
            "{t}"
        );
        assert!(t["candidates"].as_u64().expect(&why) >= 1, "{t}");
        let oracle = t["oracle_pass"].as_bool().expect(&why);
        // The answer is among the programs the oracle runs.
        assert!(oracle || t["passed"] == false, "{t}");
        assert!(
            t["oracle_passing"].as_u64() <= t["oracle_programs"].as_u64(),
            "{t}"
        );
    }
    let reach = per_task.iter().filter(|t| t["oracle_pass"] == true).count();
    assert_eq!(r["oracle_passed"], reach, "{why}");
    assert!((r["oracle_pass_at_k"].as_f64().unwrap() - reach as f64 / 3.0).abs() < 1e-9);
    let by = r["pass_at_1_by_verdict"].as_object().expect(&why);
    let counted: u64 = by.values().map(|s| s["tasks"].as_u64().unwrap()).sum();
    assert_eq!(counted, 3, "{why}");
    assert!(r["mean_completion_tokens"].as_f64().unwrap() > 0.0, "{why}");
}

/// Sample-filter: two samples of the single-call prompt, the one kept chosen by the task's
/// own examples, scored by the hidden test; its oracle covers both.
#[test]
fn eval_sample_filter_chooses_by_the_tasks_own_examples() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tasks.jsonl");
    let args = [
        "eval",
        tasks,
        "--mode",
        "sample-filter",
        "--samples",
        "2",
        "--limit",
        "1",
        "--json",
    ];
    let out = forgeline(&args, dir.path());
    let why = show(&args, &out, dir.path());
    assert_eq!(out.status.code(), Some(0), "{why}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect(&why);
    assert_eq!(r["mode"], "sample-filter", "{why}");
    assert_eq!(r["samples"], 2, "{why}");
    assert_eq!(r["tasks"], 1, "{why}");
    let t = &r["per_task"][0];
    assert_eq!(t["task_id"], "forgeline/0", "{why}");
    assert!(t["error"].is_null(), "{why}");
    assert_eq!(t["candidates"], 2, "{why}");
    assert!(t["chosen"].as_u64().expect(&why) < 2, "{why}");
    // forgeline/0 has `>>>` examples, so whether the kept sample passed them is known.
    assert!(t["own_examples_passed"].is_boolean(), "{why}");
    let programs = t["oracle_programs"].as_u64().expect(&why);
    assert!((1..=2).contains(&programs), "{why}");
    let oracle = t["oracle_pass"].as_bool().expect(&why);
    assert!(oracle || t["passed"] == false, "{why}");
    assert_eq!(r["oracle_passed"], u64::from(oracle), "{why}");
    assert!(r["oracle_pass_at_k"].is_number(), "{why}");
    assert!(r.get("selection_efficiency").is_some(), "{why}");
    assert!(r.get("pass_at_1_by_verdict").is_none(), "{why}");
    assert!(t.get("verdict_status").is_none(), "{why}");
    assert!(r["completion_tokens"].as_u64().unwrap() > 0, "{why}");
    assert_eq!(
        r["completion_tokens"].as_f64().unwrap(),
        r["mean_completion_tokens"].as_f64().unwrap(),
        "{why}"
    );
    // --samples belongs to sample-filter.
    let args = ["eval", tasks, "--samples", "2", "--limit", "1"];
    let out = forgeline(&args, dir.path());
    let why = show(&args, &out, dir.path());
    assert_eq!(out.status.code(), Some(2), "{why}");
    assert!(
        text(&out.stderr).contains("--samples needs --mode sample-filter"),
        "{why}"
    );
}

/// `--out` never replaces files it did not write, and a refused run changes nothing: not
/// the files, not the trace, and no work starts.
#[test]
fn generate_refuses_to_overwrite_files_and_keeps_the_old_trace() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    std::fs::write(dir.path().join("out/README.md"), "the project's own").unwrap();
    std::fs::write(dir.path().join("trace.json"), "old trace").unwrap();
    let args = [
        "generate",
        "Write a function f() that returns 1.",
        "--out",
        "out",
        "--trace",
        "trace.json",
        "--model",
        "no-such-model",
    ];
    let out = forgeline(&args, dir.path());
    let why = show(&args, &out, dir.path());
    assert_eq!(out.status.code(), Some(2), "{why}");
    let err = text(&out.stderr);
    assert!(
        err.contains("README.md") && err.contains("--force"),
        "{why}"
    );
    // Refused before the model was even looked up.
    assert!(!err.contains("no-such-model"), "{why}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out/README.md")).unwrap(),
        "the project's own"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("trace.json")).unwrap(),
        "old trace"
    );
    // --force needs --out; a trace path that is a directory is refused up front.
    for (args, message) in [
        (vec!["generate", "x", "--force"], "--out"),
        (vec!["generate", "x", "--trace", "out"], "directory"),
    ] {
        let out = forgeline(&args, dir.path());
        let why = show(&args, &out, dir.path());
        assert_eq!(out.status.code(), Some(2), "{why}");
        assert!(text(&out.stderr).contains(message), "{why}");
    }
}
