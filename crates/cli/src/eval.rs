//! `forgeline eval`: pass@1 on HumanEval-format tasks, through the pipeline, the
//! single-call baseline or sample-filter, each scored by its hidden test in the sandbox;
//! with the oracle (whether any program a method wrote passes) and, for the pipeline,
//! pass@1 by verdict status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use forgeline_pipeline::eval::{self, EvalOptions, EvalReport, Runner, TaskScore};

use crate::pipeline_setup::PipelineArgs;
use crate::Env;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EvalMode {
    Pipeline,
    SingleCall,
    /// N samples of the single-call prompt; the first that passes the task's own `>>>`
    /// examples, else the first
    SampleFilter,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// JSONL file of tasks: task_id, prompt, test, entry_point
    pub tasks: PathBuf,
    #[arg(long, value_enum, default_value = "pipeline")]
    pub mode: EvalMode,
    /// Samples per task of sample-filter [default: 4]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub samples: Option<u32>,
    /// Tasks run at once (their LLM calls batch together)
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Only the first N tasks
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print one JSON object instead of a table
    #[arg(long)]
    pub json: bool,
    /// Keep each task's record in DIR (created if missing): `NNNN-<task id>.json` with the
    /// score, the answer, every program written with its hidden test's result, and the
    /// pipeline job's trace
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

/// Max tokens of the single-call baseline: the code stage's own limit, so both modes may
/// write answers of the same length.
pub fn single_call_tokens(args: &PipelineArgs, env: &Env) -> anyhow::Result<usize> {
    use forgeline_pipeline::{workers::WorkerKind, LlmStage};
    let code = LlmStage::Worker(WorkerKind::Code);
    Ok(args.config(env)?.stage(code).max_tokens)
}

pub async fn run(a: EvalArgs, env: &Env) -> anyhow::Result<ExitCode> {
    if a.concurrency == 0 {
        return Err(crate::usage("--concurrency must be at least 1"));
    }
    if a.samples.is_some() && a.mode != EvalMode::SampleFilter {
        return Err(crate::usage("--samples needs --mode sample-filter"));
    }
    let mut tasks = eval::read_tasks(&a.tasks).map_err(|e| crate::usage(e.to_string()))?;
    if let Some(n) = a.limit {
        tasks.truncate(n);
    }
    if let Some(dir) = &a.keep {
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::usage(format!("--keep: cannot create {}: {e}", dir.display())))?;
    }
    let setup = a.pipeline.build(env).await?;
    let runner = match a.mode {
        EvalMode::Pipeline => Runner::Pipeline(setup.pipeline.clone()),
        EvalMode::SingleCall => Runner::SingleCall {
            llm: Arc::new(setup.client.clone()),
            max_tokens: single_call_tokens(&a.pipeline, env)?,
        },
        EvalMode::SampleFilter => Runner::SampleFilter {
            llm: Arc::new(setup.client.clone()),
            max_tokens: single_call_tokens(&a.pipeline, env)?,
            samples: a.samples.map_or(eval::DEFAULT_SAMPLES, |n| n as usize),
        },
    };
    let report = eval::run_eval(
        runner,
        setup.sandbox.clone(),
        tasks,
        EvalOptions {
            keep: a.keep.clone(),
            ..EvalOptions::new(a.concurrency)
        },
        |s, k, n| eprintln!("[{k}/{n}] {}", progress_line(s)),
    )
    .await;
    print_report(&report, a.json)?;
    Ok(ExitCode::SUCCESS)
}

/// One task's line: its outcome, the verdict the pipeline gave it, the oracle's finding.
pub fn progress_line(s: &TaskScore) -> String {
    let mut line = format!(
        "{} {}",
        s.task_id,
        if s.passed { "passed" } else { &s.outcome }
    );
    let mut notes = Vec::new();
    if let Some(v) = s.verdict_status {
        notes.push(format!("verdict {v}"));
    }
    if let (Some(k), Some(n)) = (s.chosen, s.candidates) {
        notes.push(format!("sample {} of {n}", k + 1));
    }
    if let (Some(p), Some(n)) = (s.oracle_passing, s.oracle_programs) {
        notes.push(format!("{p} of {n} programs pass"));
    }
    if !notes.is_empty() {
        line.push_str(&format!(" ({})", notes.join(", ")));
    }
    if let Some(e) = &s.error {
        line.push_str(&format!(": {e}"));
    }
    line
}

pub fn print_report(r: &EvalReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "{}: {}/{} passed, pass@1 {:.3}, {} tokens generated ({:.0} a task), {:.1} s",
        r.mode,
        r.passed,
        r.tasks,
        r.pass_at_1,
        r.completion_tokens,
        r.mean_completion_tokens,
        r.wall_s
    );
    if let Some(n) = r.samples {
        println!("  {n} samples a task");
    }
    if let Some(o) = &r.oracle {
        println!(
            "  oracle: some program passes on {}/{} (pass@k {:.3}); selection efficiency {}",
            o.oracle_passed,
            r.tasks,
            o.oracle_pass_at_k,
            o.selection_efficiency
                .map_or("-".to_string(), |e| format!("{e:.3}"))
        );
    }
    if let Some(by) = &r.pass_at_1_by_verdict {
        for (status, p) in by {
            println!(
                "  {status:<11} {:>3} tasks, {:>3} passed, pass@1 {}, oracle {}",
                p.tasks,
                p.passed,
                p.pass_at_1.map_or("-".to_string(), |x| format!("{x:.3}")),
                p.oracle_passed
            );
        }
    }
    for t in &r.per_task {
        println!("  {}", progress_line(t));
    }
    Ok(())
}
