//! `forgeline bench sandbox`: trivial programs per second through the sandbox with the
//! default limits, one at a time and at the parallelism limit, started as forgeline starts
//! them (by its launcher) and, in the same run, forked from this process. Python's start-up
//! dominates.
//!
//! While it measures, this process holds `--parent-memory-mb` of memory that a thread keeps
//! writing, as forgeline's engine does with a model loaded. Forking copies the page tables of
//! that memory and makes the writer take copy-on-write faults until each child has exec'd;
//! the writer's rate (pages written per second) shows what that costs the parent.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
    /// Memory (MiB) this process holds and keeps writing while the programs run, standing
    /// in for a loaded model's working memory; 0 for none.
    #[arg(long, default_value_t = 512)]
    pub parent_memory_mb: usize,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One way of starting runs, measured.
struct Measured {
    sequential_per_s: f64,
    concurrent_per_s: f64,
    /// Pages the parent's writer wrote per second meanwhile.
    parent_pages_per_s: f64,
}

pub async fn run(args: BenchSandboxArgs) -> anyhow::Result<ExitCode> {
    if args.programs == 0 {
        return Err(crate::usage("--programs must be at least 1"));
    }
    if args.concurrency == Some(0) {
        return Err(crate::usage("--concurrency must be at least 1"));
    }
    let config = SandboxConfig {
        max_parallel: args.concurrency.unwrap_or(0),
        ..SandboxConfig::default()
    };
    let launched = Sandbox::new(config.clone()).await?;
    let forked = Sandbox::new(SandboxConfig {
        launcher: None,
        ..config
    })
    .await?;
    let writer = Writer::start(args.parent_memory_mb << 20);
    let module = Module::new("trivial", "print('hello')\n")?;
    let launch = measure(&launched, &module, args.programs, &writer).await?;
    let fork = measure(&forked, &module, args.programs, &writer).await?;
    drop(writer);

    let isolation = launched.isolation();
    let level = serde_json::to_value(isolation.level)?;
    let speedup = |a: f64, b: f64| round(a / b.max(1e-9));
    if args.json {
        let value = serde_json::json!({
            "programs": args.programs,
            "concurrency": launched.max_parallel(),
            "parent_memory_mb": args.parent_memory_mb,
            "sequential_per_s": round(launch.sequential_per_s),
            "concurrent_per_s": round(launch.concurrent_per_s),
            "parent_pages_per_s": round(launch.parent_pages_per_s),
            "forked": {
                "sequential_per_s": round(fork.sequential_per_s),
                "concurrent_per_s": round(fork.concurrent_per_s),
                "parent_pages_per_s": round(fork.parent_pages_per_s),
            },
            "launched_over_forked": {
                "sequential": speedup(launch.sequential_per_s, fork.sequential_per_s),
                "concurrent": speedup(launch.concurrent_per_s, fork.concurrent_per_s),
                "parent_pages": speedup(launch.parent_pages_per_s, fork.parent_pages_per_s),
            },
            "isolation": level,
            "python": launched.python().version,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "sandbox, {} trivial programs, Python {}, isolation {}, parent writing {} MiB",
            args.programs,
            launched.python().version,
            level.as_str().unwrap_or("?"),
            args.parent_memory_mb
        );
        println!("                   launched     forked    launched/forked");
        let row = |name: &str, a: f64, b: f64| {
            println!("  {name:<15} {a:>9.1} {b:>10.1}    {:>6.2}", speedup(a, b));
        };
        row(
            "sequential/s",
            launch.sequential_per_s,
            fork.sequential_per_s,
        );
        let concurrent = format!("{} at a time/s", launched.max_parallel());
        row(&concurrent, launch.concurrent_per_s, fork.concurrent_per_s);
        row(
            "parent pages/s",
            launch.parent_pages_per_s,
            fork.parent_pages_per_s,
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn measure(
    sandbox: &Sandbox,
    module: &Module,
    programs: usize,
    writer: &Writer,
) -> anyhow::Result<Measured> {
    // Warm the file-system caches first.
    check(sandbox.run_program(module).await?)?;
    let (started, pages) = (Instant::now(), writer.pages());
    for _ in 0..programs {
        check(sandbox.run_program(module).await?)?;
    }
    let sequential = started.elapsed().as_secs_f64();

    let mut runs = tokio::task::JoinSet::new();
    let concurrent_start = Instant::now();
    for _ in 0..programs {
        let sandbox = sandbox.clone();
        let module = module.clone();
        runs.spawn(async move { sandbox.run_program(&module).await });
    }
    while let Some(joined) = runs.join_next().await {
        check(joined.context("a benchmark run panicked")??)?;
    }
    let concurrent = concurrent_start.elapsed().as_secs_f64();
    let written = (writer.pages() - pages) as f64;
    Ok(Measured {
        sequential_per_s: programs as f64 / sequential,
        concurrent_per_s: programs as f64 / concurrent,
        parent_pages_per_s: written / started.elapsed().as_secs_f64(),
    })
}

/// A thread writing one byte per page over its memory, round after round, until dropped.
struct Writer {
    pages: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(bytes: usize) -> Writer {
        let pages = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = (bytes > 0).then(|| {
            let (pages, stop) = (pages.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut memory = vec![1u8; bytes];
                let mut round = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    round = round.wrapping_add(1);
                    for chunk in memory.chunks_mut(64 << 10) {
                        for page in chunk.chunks_mut(4096) {
                            page[0] = round;
                        }
                        pages.fetch_add(chunk.len().div_ceil(4096) as u64, Ordering::Relaxed);
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                }
                std::hint::black_box(&memory);
            })
        });
        Writer {
            pages,
            stop,
            thread,
        }
    }

    fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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
