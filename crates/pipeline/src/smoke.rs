//! Smoke runs: a script or command-line module is run the way a user would run it, not
//! only parsed and imported. `--help` when it parses arguments, then a run on a small input
//! the tests worker writes for the task (arguments, standard input, input files). A crash
//! or a traceback fails the output, with the input in the feedback; a run that ends
//! cleanly proves only that it runs.

use forgeline_sandbox::{Check, Job, Module, Outcome, RunReport};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::job::{JobContext, LlmCall};
use crate::router::{Route, RouteKind};
use crate::stage::LlmStage;
use crate::verdict::{CheckName, CheckResult, Verdict};
use crate::workers::WorkerKind;

/// Most arguments, files and bytes a generated input may have.
const MAX_ARGS: usize = 3;
const MAX_FILES: usize = 3;
const MAX_FILE_BYTES: usize = 2000;

/// One input to run a program on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SmokeInput {
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub stdin: String,
    #[serde(default)]
    pub files: Vec<InputFile>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputFile {
    pub name: String,
    pub content: String,
}

impl SmokeInput {
    /// The command as a user would type it.
    pub fn command(&self, module: &str) -> String {
        let mut cmd = format!("python {module}.py");
        for a in &self.args {
            cmd.push(' ');
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_alphanumeric() || "-_./=,:".contains(c))
            {
                cmd.push_str(a);
            } else {
                cmd.push_str(&format!("'{}'", a.replace('\'', "'\\''")));
            }
        }
        if !self.stdin.is_empty() {
            cmd.push_str(" < stdin.txt");
        }
        cmd
    }

    /// What a sandbox can take: plain file names, bounded sizes. None when part of it is
    /// not (an input missing a file or an argument would make a correct program fail).
    fn sanitized(mut self) -> Option<Self> {
        let ok = self.args.len() <= MAX_ARGS
            && self
                .args
                .iter()
                .all(|a| !a.contains('\0') && a.len() <= 200)
            && self.files.len() <= MAX_FILES
            && self.files.iter().all(|f| plain_name(&f.name));
        if !ok {
            return None;
        }
        for f in &mut self.files {
            if f.content.len() > MAX_FILE_BYTES {
                let mut end = MAX_FILE_BYTES;
                while !f.content.is_char_boundary(end) {
                    end -= 1;
                }
                f.content.truncate(end);
            }
        }
        if self.stdin.len() > MAX_FILE_BYTES {
            self.stdin.clear();
        }
        Some(self)
    }
}

/// A file name with no directory part, no `..`, nothing hidden or odd, and not a name the
/// run uses itself.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.ends_with(".py")
}

/// Whether the task's main output is a program a user runs (a script, a command-line tool),
/// so that it is smoke-run.
pub fn is_program(route: &Route, task: &str) -> bool {
    if route.kind == RouteKind::ModuleOrScript {
        return true;
    }
    let t = task.to_lowercase();
    let phrase = ["command-line", "command line", "standard input", "sys.argv"]
        .iter()
        .any(|p| t.contains(p));
    let word = t
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .any(|w| matches!(w, "script" | "cli" | "stdin" | "argparse"));
    phrase || word
}

/// Whether the code imports an option parser (so that `--help` must work).
pub fn parses_options(code: &str) -> bool {
    code.lines().map(str::trim_start).any(|l| {
        l.starts_with("import argparse")
            || l.starts_with("from argparse ")
            || l.starts_with("import click")
            || l.starts_with("from click ")
    })
}

/// Asks the tests worker for one small input to run the program on. None when the model's
/// answer is unusable (it is an aid, not a requirement).
pub async fn generate(ctx: &JobContext, route: &Route) -> Option<SmokeInput> {
    let stage = LlmStage::Worker(WorkerKind::Tests);
    let schema = json!({
        "type": "object",
        "properties": {
            "args": {"type": "array", "maxItems": MAX_ARGS, "items": {"type": "string", "maxLength": 80}},
            "stdin": {"type": "string", "maxLength": 600},
            "files": {"type": "array", "maxItems": MAX_FILES, "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "content": {"type": "string", "maxLength": 600}
                },
                "required": ["name", "content"],
                "additionalProperties": false
            }}
        },
        "required": ["args", "stdin", "files"],
        "additionalProperties": false
    });
    let prompt = ctx
        .prompts()
        .render(
            stage,
            json!({"mode": "smoke", "task": ctx.task.task, "route": route,
                   "module": ctx.module_name()}),
        )
        .inspect_err(|e| tracing::warn!("no smoke input: {e}"))
        .ok()?;
    let out = ctx
        .llm(
            LlmCall::new(stage, prompt)
                .schema(schema)
                .subtask("smoke_input")
                .max_tokens(400),
        )
        .await
        .inspect_err(|e| tracing::warn!("no smoke input: {e}"))
        .ok()?;
    serde_json::from_str::<SmokeInput>(&out.text)
        .inspect_err(|e| tracing::debug!("the smoke input did not parse: {e}"))
        .ok()?
        .sanitized()
}

/// Whether the code reads standard input (then a run with nothing on it proves nothing).
fn reads_stdin(code: &str) -> bool {
    code.contains("input(") || code.contains("sys.stdin") || code.contains("fileinput")
}

/// A crash, not a refusal: an uncaught exception, a signal, a limit hit. A program that
/// exits with a message and a failure code (a usage error on an input it does not
/// accept) has not crashed.
fn crashed(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Exception(_)
            | Outcome::KilledBySignal { .. }
            | Outcome::MemoryLimit { .. }
            | Outcome::Timeout { .. }
            | Outcome::SyntaxError(_)
    )
}

fn clip_tail(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

/// A run's check: passes on exit 0; fails hard on a crash, soft on another exit.
fn run_check(name: CheckName, command: &str, r: &RunReport) -> CheckResult {
    let passed = r.passed();
    let detail = if passed {
        let lines = r.stdout.lines().count();
        format!("`{command}` exited 0 ({lines} line(s) of output)")
    } else {
        let stderr = r.stderr.trim();
        format!(
            "`{command}` {}: {}{}",
            if crashed(&r.outcome) {
                "crashed"
            } else {
                "failed"
            },
            r.outcome,
            if stderr.is_empty() {
                String::new()
            } else {
                format!("\nstderr: {}", clip_tail(stderr, 600))
            }
        )
    };
    CheckResult {
        name,
        passed,
        hard: passed || crashed(&r.outcome) || name == CheckName::Help,
        detail,
        tests: None,
    }
}

impl SmokeInput {
    /// A sandbox job running `module` on this input.
    fn job(&self, module: &Module) -> forgeline_sandbox::Result<Job> {
        let mut job = Job::new(module.clone(), Check::Run).with_args(self.args.iter().cloned())?;
        if !self.stdin.is_empty() {
            job = job.with_stdin(self.stdin.as_bytes().to_vec())?;
        }
        for f in &self.files {
            job = job.with_input_file(&f.name, f.content.as_bytes().to_vec())?;
        }
        Ok(job)
    }

    /// What the run was given, for a retry's feedback.
    fn describe(&self, module: &str) -> String {
        let mut s = format!("the command: {}", self.command(module));
        for f in &self.files {
            s.push_str(&format!("\n{}:\n{}", f.name, clip_tail(&f.content, 400)));
        }
        if !self.stdin.is_empty() {
            s.push_str(&format!("\nstdin:\n{}", clip_tail(&self.stdin, 400)));
        }
        s
    }
}

/// Runs a program that imported cleanly as a user would: `--help` when it parses options,
/// then on the tests worker's input (with no input when there is none and it does not read
/// stdin). Whether a run ended without a crash.
pub(crate) async fn check_program(
    ctx: &JobContext,
    module: &Module,
    code: &str,
    input: Option<&SmokeInput>,
    v: &mut Verdict,
) -> bool {
    let name = module.name().to_string();
    let mut ran = false;
    if parses_options(code) {
        let help = SmokeInput {
            args: vec!["--help".into()],
            ..SmokeInput::default()
        };
        let c = run_on(ctx, module, &help, CheckName::Help).await;
        ran |= c.passed;
        let ok = c.passed;
        v.add(c);
        if !ok {
            return ran;
        }
    }
    let (input, given) = match input {
        Some(i) => (i.clone(), true),
        None if reads_stdin(code) => return ran,
        None => (SmokeInput::default(), false),
    };
    let mut c = run_on(ctx, module, &input, CheckName::SmokeRun).await;
    if !c.passed {
        c.detail = format!("{}\n{}", c.detail, input.describe(&name));
        // With no input written for it, or nothing on the stdin it reads, a failure may be
        // the input's fault: it ranks the program lower but does not fail it.
        if !given || (input.stdin.is_empty() && reads_stdin(code)) {
            c.hard = false;
        }
    }
    ran |= c.passed;
    v.add(c);
    ran
}

async fn run_on(
    ctx: &JobContext,
    module: &Module,
    input: &SmokeInput,
    name: CheckName,
) -> CheckResult {
    let command = input.command(module.name());
    let job = match input.job(module) {
        Ok(j) => j,
        Err(e) => {
            return CheckResult {
                name,
                passed: false,
                hard: false,
                detail: format!("`{command}` could not be set up: {e}"),
                tests: None,
            }
        }
    };
    match ctx.sandboxed(job).await {
        Ok(r) => run_check(name, &command, &r),
        Err(e) => CheckResult {
            name,
            passed: false,
            hard: true,
            detail: format!("the sandbox could not run `{command}`: {e}"),
            tests: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_taken_whole_or_not_at_all() {
        let file = |name: &str, content: &str| InputFile {
            name: name.into(),
            content: content.into(),
        };
        let ok = SmokeInput {
            args: vec!["in.csv".into()],
            stdin: String::new(),
            files: vec![file("in.csv", &"é".repeat(MAX_FILE_BYTES))],
        }
        .sanitized()
        .unwrap();
        assert!(ok.files[0].content.len() <= MAX_FILE_BYTES);
        assert!(ok.files[0]
            .content
            .is_char_boundary(ok.files[0].content.len()));
        assert_eq!(ok.command("solution"), "python solution.py in.csv");
        // Dropping a part would leave an argument naming a file that is not there, or
        // shift the arguments: the whole input goes.
        for bad in [
            SmokeInput {
                args: vec!["in.csv".into(), "a\0b".into()],
                ..ok.clone()
            },
            SmokeInput {
                args: vec!["1".into(); MAX_ARGS + 1],
                ..ok.clone()
            },
            SmokeInput {
                files: vec![file("../etc/passwd", "x")],
                ..ok.clone()
            },
            SmokeInput {
                files: vec![file("solution.py", "x")],
                ..ok.clone()
            },
        ] {
            assert_eq!(bad.clone().sanitized(), None, "{bad:?}");
        }
    }

    #[test]
    fn programs_are_told_by_words_not_parts_of_words() {
        let route = crate::router::route_by_rules(&crate::task::TaskRequest::new(
            "Write a function f(x) that returns x.",
        ));
        assert!(!is_program(
            &route,
            "Write f(x); its description is a transcript."
        ));
        assert!(is_program(&route, "Write a script that prints f(1)."));
        assert!(is_program(&route, "Read numbers from standard input."));
        assert!(parses_options("import sys\nimport argparse\n"));
        assert!(!parses_options(
            "# argparse would be overkill\nimport sys\n"
        ));
    }

    #[test]
    fn commands_quote_what_a_shell_would_split() {
        let s = SmokeInput {
            args: vec!["--sep".into(), "a b".into(), "it's".into()],
            stdin: "1\n".into(),
            files: vec![],
        };
        assert_eq!(
            s.command("solution"),
            "python solution.py --sep 'a b' 'it'\\''s' < stdin.txt"
        );
    }
}
