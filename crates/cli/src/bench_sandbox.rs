//! `forgeline bench sandbox`: trivial programs per second through the sandbox with the
//! default limits, one at a time and at the parallelism limit. Python's start-up dominates.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use forgeline_sandbox::{Module, Sandbox, SandboxConfig};

#[derive(clap::Args, Debug)]
pub struct BenchSandboxArgs {
    /// Programs to run in each measurement.
    #[arg(long, default_value_t = 100)]
    pub programs: usize,
    /// Runs at once in the concurrent measurement (default: one per CPU).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: BenchSandboxArgs) -> anyhow::Result<ExitCode> {
    if args.programs == 0 {
        return Err(crate::usage("--programs must be at least 1"));
    }
    if args.concurrency == Some(0) {
        return Err(crate::usage("--concurrency must be at least 1"));
    }
    let sandbox = Sandbox::new(SandboxConfig {
        max_parallel: args.concurrency.unwrap_or(0),
        ..SandboxConfig::default()
    })
    .await?;
    let module = Module::new("trivial", "print('hello')\n")?;
    // Warm the file-system caches first.
    check(sandbox.run_program(&module).await?)?;

    let started = Instant::now();
    for _ in 0..args.programs {
        check(sandbox.run_program(&module).await?)?;
    }
    let sequential = args.programs as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut runs = tokio::task::JoinSet::new();
    for _ in 0..args.programs {
        let sandbox = sandbox.clone();
        let module = module.clone();
        runs.spawn(async move { sandbox.run_program(&module).await });
    }
    while let Some(joined) = runs.join_next().await {
        check(joined.context("a benchmark run panicked")??)?;
    }
    let concurrent = args.programs as f64 / started.elapsed().as_secs_f64();

    let isolation = sandbox.isolation();
    let level = serde_json::to_value(isolation.level)?;
    if args.json {
        let value = serde_json::json!({
            "programs": args.programs,
            "concurrency": sandbox.max_parallel(),
            "sequential_per_s": round(sequential),
            "concurrent_per_s": round(concurrent),
            "isolation": level,
            "python": sandbox.python().version,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "sandbox, {} trivial programs, Python {}, isolation {}",
            args.programs,
            sandbox.python().version,
            level.as_str().unwrap_or("?")
        );
        println!("  sequential:      {sequential:.1} programs/s");
        println!(
            "  {} at a time:    {concurrent:.1} programs/s",
            sandbox.max_parallel()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn check(report: forgeline_sandbox::RunReport) -> anyhow::Result<()> {
    if !report.passed() {
        bail!("a trivial program did not pass: {}", report.outcome);
    }
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
