//! `forgeline generate`: one task through the whole pipeline. The result (markdown, code or
//! JSON) goes to stdout; on a terminal, live progress per stage goes to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use forgeline_pipeline::formatter::{self, Format};
use forgeline_pipeline::job::MODULE_NAME;
use forgeline_pipeline::verdict::VerdictStatus;
use forgeline_pipeline::{trace_json, ContextFile, EventStatus, JobEvent, TaskRequest};
use serde_json::json;
use tokio::sync::mpsc::unbounded_channel;

use crate::pipeline_setup::PipelineArgs;
use crate::Env;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The task, in words or as a Python stub (a signature and docstring); `-` reads stdin
    pub task: String,
    /// A file the task is about (repeatable); shown to the workers
    #[arg(long = "file", value_name = "CONTEXT.py")]
    pub files: Vec<PathBuf>,
    /// Tests the result must pass (asserts, unittest, pytest or HumanEval `check`)
    #[arg(long, value_name = "TESTS.py")]
    pub tests: Option<PathBuf>,
    /// The function the result must define
    #[arg(long)]
    pub entry_point: Option<String>,
    /// Write the result's files here (never over files already there, unless --force)
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Let --out replace files that this run did not write
    #[arg(long, requires = "out")]
    pub force: bool,
    /// What to print: a markdown report, the code alone, or JSON
    #[arg(long, default_value = "md", value_parser = parse_format)]
    pub format: Format,
    /// Write every stage's input, prompt, output, tokens, timings and verdicts as JSON
    #[arg(long, value_name = "TRACE.json")]
    pub trace: Option<PathBuf>,
    /// The least verdict that exits 0: `verified` (trusted checks ran and passed),
    /// `consistent` (or candidates agree on generated inputs), `any` (any result that did
    /// not fail). Short of it exits 4; a failed result exits 1
    #[arg(long, default_value = "verified", value_parser = parse_require)]
    pub require: Require,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

/// Whether `path` could be written, without changing it: an existing file is opened for
/// appending (never truncated); a new one is created and removed again.
fn check_writable(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(std::io::Error::other("it is a directory")),
        Ok(_) => std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop),
        Err(_) => {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)?;
            std::fs::remove_file(path)
        }
    }
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse()
}

/// What `generate` counts as success (`--require`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Require {
    Verified,
    Consistent,
    Any,
}

fn parse_require(s: &str) -> Result<Require, String> {
    match s {
        "verified" => Ok(Require::Verified),
        "consistent" => Ok(Require::Consistent),
        "any" => Ok(Require::Any),
        _ => Err(format!(
            "unknown requirement `{s}` (verified, consistent, any)"
        )),
    }
}

/// Exit code 4: a result was produced but not verified as far as `--require` asks.
pub const EXIT_NOT_VERIFIED: u8 = 4;

/// The exit code of a result with `status` under `require`: 0 when it meets it, 1 when it
/// failed, 4 when it is short of it.
pub fn exit_code(status: VerdictStatus, require: Require) -> u8 {
    let meets = match require {
        Require::Verified => status == VerdictStatus::Verified,
        Require::Consistent => {
            matches!(status, VerdictStatus::Verified | VerdictStatus::Consistent)
        }
        Require::Any => status != VerdictStatus::Failed,
    };
    if meets {
        0
    } else if status == VerdictStatus::Failed {
        1
    } else {
        EXIT_NOT_VERIFIED
    }
}

fn read_file(path: &PathBuf, what: &str) -> anyhow::Result<ContextFile> {
    let content = std::fs::read_to_string(path)
        .map_err(|e| crate::usage(format!("cannot read {what} {}: {e}", path.display())))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| crate::usage(format!("{} has no file name", path.display())))?;
    Ok(ContextFile::new(name, content))
}

pub async fn run(a: GenerateArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let text = if a.task == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        a.task.clone()
    };
    let mut task = TaskRequest::new(text);
    for f in &a.files {
        task.files.push(read_file(f, "context file")?);
    }
    if let Some(t) = &a.tests {
        task.tests = Some(read_file(t, "tests")?);
    }
    task.entry_point = a.entry_point.clone();
    task.validate().map_err(|e| crate::usage(e.to_string()))?;
    // Fail before the work, not after it, and change nothing yet.
    if let Some(t) = &a.trace {
        check_writable(t)
            .map_err(|e| crate::usage(format!("cannot write the trace to {}: {e}", t.display())))?;
    }
    if let (Some(dir), false) = (&a.out, a.force) {
        let taken = formatter::existing(dir, &formatter::output_names(MODULE_NAME));
        if !taken.is_empty() {
            return Err(forgeline_pipeline::Error::WouldOverwrite(taken).into());
        }
    }

    let setup = a.pipeline.build(env).await?;
    let (tx, rx) = unbounded_channel();
    let progress = crate::stderr_is_terminal().then(|| tokio::spawn(show_progress(rx)));
    let outcome = setup.pipeline.run_traced(task, a.format, Some(tx)).await;
    if let Some(p) = progress {
        // Events still queued are drawn; then the line is cleared.
        tokio::time::sleep(Duration::from_millis(150)).await;
        p.abort();
        eprint!("\r\x1b[2K");
    }
    let outcome = match outcome {
        Ok(o) => o,
        Err(failure) => {
            // What the stages did until the failure is kept: the trace says where it was.
            if let Some(t) = &a.trace {
                let json = json!({
                    "error": failure.error.to_string(),
                    "failed_in": failure.stage.map(|s| s.name()),
                    "stages": failure.trace.stages,
                    "llm_calls": failure.trace.llm_calls,
                });
                match formatter::write_atomically(
                    t,
                    (serde_json::to_string_pretty(&json)? + "\n").as_bytes(),
                ) {
                    Ok(()) => eprintln!("wrote the trace of the failed job to {}", t.display()),
                    Err(e) => eprintln!("cannot write the trace to {}: {e}", t.display()),
                }
            }
            return Err(failure.error.into());
        }
    };
    let r = &outcome.result;
    // The result goes out first: a file that cannot be written loses nothing.
    let mut out = std::io::stdout().lock();
    out.write_all(outcome.rendered.as_bytes())?;
    out.flush()?;
    if let Some(t) = &a.trace {
        let json = serde_json::to_string_pretty(&trace_json(&outcome.trace))?;
        formatter::write_atomically(t, (json + "\n").as_bytes())
            .map_err(|e| crate::usage(format!("cannot write the trace to {}: {e}", t.display())))?;
    }
    if let Some(dir) = &a.out {
        let written = formatter::write_files(r, dir, a.force)?;
        for p in written {
            eprintln!("wrote {}", p.display());
        }
    }
    let status = r.verdict.status;
    eprintln!(
        "{} · {} LLM calls, {} tokens generated, {:.1} s",
        match status {
            VerdictStatus::Verified => "verified: the task's own checks ran and passed",
            VerdictStatus::Consistent =>
                "consistent: candidates agree on generated inputs; nothing in the task verified it",
            VerdictStatus::Unverified =>
                "unverified: nothing in the task could check it; review it before use",
            VerdictStatus::Failed => "failed its checks",
        },
        r.llm_calls,
        r.completion_tokens,
        r.wall_ms as f64 / 1000.0
    );
    Ok(ExitCode::from(exit_code(status, a.require)))
}

/// Live progress on a terminal: finished steps as lines, the running one with a spinner.
async fn show_progress(mut rx: tokio::sync::mpsc::UnboundedReceiver<JobEvent>) {
    let color = std::env::var_os("NO_COLOR").is_none();
    let paint = |code: &str, s: &str| {
        if color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    };
    let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let mut current = String::from("starting");
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut i = 0;
    let mut err = std::io::stderr();
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                let who = match (&ev.subtask, ev.attempt) {
                    (Some(s), Some(n)) => format!("{} [{s}, attempt {n}]", ev.stage.name()),
                    (Some(s), None) => format!("{} [{s}]", ev.stage.name()),
                    (None, Some(n)) if n > 1 => format!("{} [attempt {n}]", ev.stage.name()),
                    _ => ev.stage.name().to_string(),
                };
                let mark = match ev.status {
                    EventStatus::Started | EventStatus::Progress => {
                        current = format!("{who}: {}", ev.message);
                        None
                    }
                    EventStatus::Passed => Some(paint("32", "✓")),
                    EventStatus::Failed => Some(paint("31", "✗")),
                    EventStatus::Finished => Some(paint("32", "•")),
                    EventStatus::Skipped => Some(paint("2", "–")),
                };
                if let Some(m) = mark {
                    let _ = write!(err, "\r\x1b[2K{m} {who}: {} {}\n", ev.message, paint("2", &format!("({:.1}s)", ev.elapsed_ms as f64 / 1000.0)));
                }
            }
            _ = tick.tick() => {
                i = (i + 1) % frames.len();
                let line: String = current.chars().take(100).collect();
                let _ = write!(err, "\r\x1b[2K{} {line}", paint("36", &frames[i].to_string()));
                let _ = err.flush();
            }
        }
    }
    let _ = write!(err, "\r\x1b[2K");
    let _ = err.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_verdict_and_the_requirement() {
        use VerdictStatus::*;
        let table = [
            (Verified, Require::Verified, 0),
            (Consistent, Require::Verified, 4),
            (Unverified, Require::Verified, 4),
            (Failed, Require::Verified, 1),
            (Consistent, Require::Consistent, 0),
            (Unverified, Require::Consistent, 4),
            (Unverified, Require::Any, 0),
            (Failed, Require::Any, 1),
        ];
        for (status, require, code) in table {
            assert_eq!(
                exit_code(status, require),
                code,
                "{status} under {require:?}"
            );
        }
        assert!(parse_require("passed")
            .unwrap_err()
            .contains("verified, consistent, any"));
    }
}
