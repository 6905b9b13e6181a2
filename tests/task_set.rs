//! The task set that `forgeline eval` ships (tests/data/tasks.jsonl, HumanEval format), checked
//! end to end with the real binary's sandbox (`forgeline check`):
//!
//! - every task's canonical solution (`prompt + canonical_completion`, from
//!   tests/data/tasks_solutions.jsonl, which the pipeline never reads) passes the task's hidden
//!   tests (`check(candidate)`) and the examples of its docstring (`--doctest`);
//! - no hidden test is vacuous: a function that returns None fails it, and so does one that
//!   knows the answers of the docstring's examples and nothing else, so every task's hidden
//!   tests go beyond what its prompt shows.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde_json::Value;

const TASKS: &str = include_str!("data/tasks.jsonl");
const SOLUTIONS: &str = include_str!("data/tasks_solutions.jsonl");

/// Sandbox runs at once.
const WORKERS: usize = 4;

struct Task {
    id: String,
    prompt: String,
    entry_point: String,
    test: String,
    difficulty: String,
    completion: String,
}

/// One docstring example: `>>> entry(args)` and the line after it (`None` when the call
/// prints nothing).
struct Example {
    call: String,
    expected: String,
}

fn string(value: &Value, key: &str, line: usize, file: &str) -> String {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{file}:{line}: no string {key:?}"))
        .to_string()
}

fn parse_lines(text: &str, file: &str) -> Vec<Value> {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{file}:{}: {e}", i + 1))
        })
        .collect()
}

/// The tasks joined with their solutions, checking that both files list the same tasks.
fn load() -> Vec<Task> {
    let tasks = parse_lines(TASKS, "tasks.jsonl");
    let solutions = parse_lines(SOLUTIONS, "tasks_solutions.jsonl");
    assert_eq!(
        tasks.len(),
        solutions.len(),
        "tasks.jsonl and tasks_solutions.jsonl differ in length"
    );
    tasks
        .iter()
        .zip(&solutions)
        .enumerate()
        .map(|(i, (task, solution))| {
            let line = i + 1;
            let keys: Vec<&str> = task
                .as_object()
                .unwrap_or_else(|| panic!("tasks.jsonl:{line}: not an object"))
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(
                keys.iter().copied().collect::<HashSet<_>>(),
                HashSet::from(["task_id", "prompt", "entry_point", "test"]),
                "tasks.jsonl:{line}: a task has exactly HumanEval's fields, and no solution"
            );
            let id = string(task, "task_id", line, "tasks.jsonl");
            assert_eq!(
                string(solution, "task_id", line, "tasks_solutions.jsonl"),
                id,
                "tasks_solutions.jsonl:{line}: not the task of the same line of tasks.jsonl"
            );
            Task {
                prompt: string(task, "prompt", line, "tasks.jsonl"),
                entry_point: string(task, "entry_point", line, "tasks.jsonl"),
                test: string(task, "test", line, "tasks.jsonl"),
                difficulty: string(solution, "difficulty", line, "tasks_solutions.jsonl"),
                completion: string(
                    solution,
                    "canonical_completion",
                    line,
                    "tasks_solutions.jsonl",
                ),
                id,
            }
        })
        .collect()
}

fn examples(task: &Task) -> Vec<Example> {
    let lines: Vec<&str> = task.prompt.lines().map(str::trim).collect();
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, line)| {
            let call = line.strip_prefix(">>> ")?;
            let next = lines.get(i + 1).copied().unwrap_or("");
            let expected = if next.is_empty() || next.starts_with(">>>") || next == "\"\"\"" {
                "None".to_string()
            } else {
                next.to_string()
            };
            Some(Example {
                call: call.to_string(),
                expected,
            })
        })
        .collect()
}

fn asserts(test: &str) -> usize {
    test.lines()
        .filter(|line| line.trim_start().starts_with("assert "))
        .count()
}

#[test]
fn the_task_set_is_well_formed() {
    let tasks = load();
    assert!(tasks.len() >= 30, "only {} tasks", tasks.len());

    let mut ids = HashSet::new();
    let mut by_difficulty: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, task) in tasks.iter().enumerate() {
        let id = &task.id;
        assert!(ids.insert(id.clone()), "{id}: task_id used twice");
        assert_eq!(
            *id,
            format!("forgeline/{i}"),
            "task ids are forgeline/0, 1, ..."
        );
        *by_difficulty.entry(task.difficulty.as_str()).or_default() += 1;
        assert!(
            ["easy", "medium", "hard"].contains(&task.difficulty.as_str()),
            "{id}: difficulty {:?}",
            task.difficulty
        );

        let entry = &task.entry_point;
        let defs: Vec<&str> = task
            .prompt
            .lines()
            .filter(|line| line.starts_with("def "))
            .collect();
        assert!(
            defs.len() == 1 && defs[0].starts_with(&format!("def {entry}(")),
            "{id}: the prompt defines one function, {entry}: {defs:?}"
        );
        assert!(
            task.prompt.ends_with("    \"\"\"\n"),
            "{id}: the prompt ends with its docstring, as HumanEval's do"
        );
        let examples = examples(task);
        assert!(
            (1..=3).contains(&examples.len()),
            "{id}: {} docstring examples, not 1 to 3",
            examples.len()
        );
        for example in &examples {
            assert!(
                example.call.starts_with(&format!("{entry}(")) && example.call.ends_with(')'),
                "{id}: example {:?} is not one call of {entry}",
                example.call
            );
            assert!(
                !example.call.contains('\\') && !example.expected.contains('\\'),
                "{id}: example {:?} has a backslash: its text would not be what doctest runs",
                example.call
            );
        }

        assert!(
            task.completion.starts_with("    ") && task.completion.ends_with('\n'),
            "{id}: the canonical completion is the indented body that follows the prompt"
        );

        assert!(
            task.test.starts_with("def check(candidate):\n"),
            "{id}: the hidden test is a check(candidate) function"
        );
        let count = asserts(&task.test);
        assert!(count >= 5, "{id}: only {count} asserts in the hidden test");
        assert!(
            !task.prompt.contains("def check(") && !task.prompt.contains(task.test.trim()),
            "{id}: the hidden test shows in the prompt"
        );
        for line in task.test.lines().map(str::trim).filter(|l| l.len() > 8) {
            assert!(
                !task.prompt.contains(line),
                "{id}: the prompt gives away the hidden test's line {line:?}"
            );
        }
    }
    for level in ["easy", "medium", "hard"] {
        let count = by_difficulty.get(level).copied().unwrap_or(0);
        assert!(count >= 8, "only {count} {level} tasks: {by_difficulty:?}");
    }
}

/// A candidate that knows the answers of the docstring's examples and returns None otherwise.
fn memorizer(task: &Task) -> String {
    let entry = &task.entry_point;
    let mut source = format!(
        "def {entry}(*args, **kwargs):\n    def key(*a, **k):\n        \
         return repr((a, sorted(k.items())))\n\n    table = {{}}\n"
    );
    for example in examples(task) {
        let args = &example.call[entry.len()..];
        source.push_str(&format!("    table[key{args}] = {}\n", example.expected));
    }
    source.push_str("    return table.get(key(*args, **kwargs))\n");
    source
}

struct Outcome {
    code: i32,
    json: Value,
    text: String,
}

/// Runs `forgeline check solution.py --tests tests.py --entry-point ENTRY --json [EXTRA]` in a
/// fresh directory.
fn check(task: &Task, solution: &str, extra: &[&str]) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("solution.py"), solution).unwrap();
    std::fs::write(dir.path().join("tests.py"), &task.test).unwrap();
    let mut args = vec![
        "check",
        "solution.py",
        "--tests",
        "tests.py",
        "--test-kind",
        "check",
        "--entry-point",
        &task.entry_point,
        "--json",
    ];
    args.extend_from_slice(extra);
    let output = Command::new(env!("CARGO_BIN_EXE_forgeline"))
        .args(&args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let text = format!(
        "{}: forgeline {}\nexit: {:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}\n\
         --- solution.py ---\n{solution}",
        task.id,
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr),
    );
    Outcome {
        code: output.status.code().unwrap_or(-1),
        json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
        text,
    }
}

/// Every problem with one task, empty when there is none.
fn validate(task: &Task) -> Vec<String> {
    let mut problems = Vec::new();

    let canonical = format!("{}{}", task.prompt, task.completion);
    let run = check(task, &canonical, &["--doctest"]);
    let checks: Vec<(&str, &str)> = run.json["checks"]
        .as_array()
        .map(|checks| {
            checks
                .iter()
                .map(|c| {
                    (
                        c["check"].as_str().unwrap_or(""),
                        c["outcome"]["status"].as_str().unwrap_or(""),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if run.code != 0
        || run.json["passed"] != true
        || checks != [("tests", "passed"), ("doctest", "passed")]
    {
        problems.push(format!(
            "the canonical solution does not pass its hidden tests and doctests\n{}",
            run.text
        ));
    }

    let wrong = [
        (
            "a function that returns None",
            format!(
                "def {}(*args, **kwargs):\n    return None\n",
                task.entry_point
            ),
        ),
        (
            "a function that only knows the docstring's examples",
            memorizer(task),
        ),
    ];
    for (what, source) in wrong {
        let run = check(task, &source, &[]);
        let status = run.json["outcome"]["status"].as_str().unwrap_or("");
        if run.code != 1 || !matches!(status, "assertion_failed" | "exception") {
            problems.push(format!(
                "the hidden tests do not fail {what} (status {status:?})\n{}",
                run.text
            ));
        }
    }
    problems
}

#[test]
fn canonical_solutions_pass_and_wrong_ones_fail() {
    assert!(
        Path::new(env!("CARGO_BIN_EXE_forgeline")).exists(),
        "no forgeline binary"
    );
    let tasks = load();
    let next = AtomicUsize::new(0);
    let problems = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(task) = tasks.get(i) else { break };
                let found = validate(task);
                problems.lock().unwrap().extend(found);
            });
        }
    });
    let problems = problems.into_inner().unwrap();
    assert!(
        problems.is_empty(),
        "{} problems:\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}
