//! `forgeline eval`: pass@1 on HumanEval-format tasks, through the pipeline or the
//! single-call baseline, each scored by its hidden test in the sandbox.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use forgeline_pipeline::eval::{self, EvalReport, Runner};

use crate::pipeline_setup::PipelineArgs;
use crate::Env;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EvalMode {
    Pipeline,
    SingleCall,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// JSONL file of tasks: task_id, prompt, test, entry_point
    pub tasks: PathBuf,
    #[arg(long, value_enum, default_value = "pipeline")]
    pub mode: EvalMode,
    /// Tasks run at once (their LLM calls batch together)
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Only the first N tasks
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print one JSON object instead of a table
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

/// Max tokens of the single-call baseline: the code stage's own limit, so both modes may
/// write answers of the same length.
pub fn single_call_tokens(args: &PipelineArgs) -> anyhow::Result<usize> {
    use forgeline_pipeline::{workers::WorkerKind, LlmStage};
    let code = LlmStage::Worker(WorkerKind::Code);
    Ok(args.config()?.stage(code).max_tokens)
}

pub async fn run(a: EvalArgs, env: &Env) -> anyhow::Result<ExitCode> {
    if a.concurrency == 0 {
        return Err(crate::usage("--concurrency must be at least 1"));
    }
    let mut tasks = eval::read_tasks(&a.tasks).map_err(|e| crate::usage(e.to_string()))?;
    if let Some(n) = a.limit {
        tasks.truncate(n);
    }
    let setup = a.pipeline.build(env).await?;
    let runner = match a.mode {
        EvalMode::Pipeline => Runner::Pipeline(setup.pipeline.clone()),
        EvalMode::SingleCall => Runner::SingleCall {
            llm: Arc::new(setup.client.clone()),
            max_tokens: single_call_tokens(&a.pipeline)?,
        },
    };
    let report = eval::run_eval(
        runner,
        setup.sandbox.clone(),
        tasks,
        a.concurrency,
        |s, k, n| {
            eprintln!(
                "[{k}/{n}] {} {}{}",
                s.task_id,
                if s.passed { "passed" } else { &s.outcome },
                s.error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        },
    )
    .await;
    print_report(&report, a.json)?;
    Ok(ExitCode::SUCCESS)
}

pub fn print_report(r: &EvalReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!(
            "{}: {}/{} passed, pass@1 {:.3}, {} tokens generated, {:.1} s",
            r.mode, r.passed, r.tasks, r.pass_at_1, r.completion_tokens, r.wall_s
        );
        for t in &r.per_task {
            println!(
                "  {:<24} {}",
                t.task_id,
                if t.passed { "passed" } else { &t.outcome }
            );
        }
    }
    Ok(())
}
