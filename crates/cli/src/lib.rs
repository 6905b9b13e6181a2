//! forgeline's command line. It parses and wires; the crates do the work.
//!
//! # Layout
//! - `prompt`: `forgeline prompt`, one completion streamed to stdout.
//! - `models`: `forgeline models list|show`.
//! - `bench`: `forgeline bench engine` (and the sandbox bench from `bench_sandbox`).
//! - `check`: `forgeline check`, generated Python run in the sandbox.
//! - `serve`: `forgeline serve`, the HTTP API (`bench_serve`: its bench); `ps`: what a
//!   running server is doing, from its API.
//! - `generate`: `forgeline generate`, one task through the pipeline.
//! - `eval`: `forgeline eval`, pass@1 on HumanEval-format tasks (`bench_pipeline`: pipeline
//!   against the single-call baseline, and jobs together against one after another).
//! - `pipeline_setup`: the pipeline flags and the models, sandbox and pipeline they build.
//!
//! Conventions: data on stdout, messages on stderr, `--json` for machine-readable results,
//! `RUST_LOG` filters logs, `NO_COLOR` turns colour off. Exit codes: 0 success (for
//! `generate`: the result is `verified`, or meets `--require`); 1 the code or task failed its
//! checks; 2 bad usage or input (flags, files, unknown or unreadable model); 3 a runtime
//! failure (engine error, out of memory); 4 (`generate`) a result was produced but not
//! verified (`consistent` or `unverified`, short of `--require`).

mod bench;
mod bench_cluster;
mod bench_pipeline;
mod bench_sandbox;
mod bench_serve;
mod check;
mod eval;
mod generate;
mod models;
mod pipeline_setup;
mod prompt;
mod ps;
mod serve;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use forgeline_engine::device::DeviceChoice;
use forgeline_engine::kv_cache::KvCacheType;
use forgeline_engine::loader::LoadedModel;
use forgeline_engine::registry::{Registry, DEFAULT_MODEL};
use forgeline_engine::scheduler::SchedulerConfig;

#[derive(Parser, Debug)]
#[command(
    name = "forgeline",
    version,
    about = "Offline multi-stage Python code generator on local open-weight models"
)]
pub struct Cli {
    /// Directory of model manifests and weights [default: ./models, else the source tree's models/]
    #[arg(long, global = true, env = "FORGELINE_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Device to run models on: cpu, cuda[:N] (feature `cuda`), metal[:N] (feature `metal`)
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// What the KV cache stores K and V as: f16 (half the memory and bandwidth) or f32
    #[arg(
        long,
        global = true,
        default_value = "f16",
        env = "FORGELINE_CACHE_TYPE"
    )]
    cache_type: String,
    /// How log lines are written to stderr: text, or json (one object per line, with a
    /// timestamp). `serve` logs one access line per request at info level
    #[arg(
        long,
        global = true,
        default_value = "text",
        env = "FORGELINE_LOG_FORMAT",
        value_parser = ["text", "json"]
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate validated Python code for a task, through every stage of the pipeline
    Generate(generate::GenerateArgs),
    /// Measure pass@1 on HumanEval-format tasks (pipeline or single-call baseline)
    Eval(eval::EvalArgs),
    /// Complete a prompt (or answer a chat message) and stream the text to stdout
    Prompt(prompt::PromptArgs),
    /// List and describe the models forgeline can load
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Measure throughput and latency
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run a Python file (and its tests) in the sandbox and report what happened
    Check(check::CheckArgs),
    /// Serve an OpenAI-compatible HTTP API (and pipeline jobs) over the loaded models
    Serve(serve::ServeArgs),
    /// What a running server has loaded and is doing: sequences, KV memory, jobs
    Ps(ps::PsArgs),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Pipeline against the single-call baseline (pass@1), and 8 jobs together against one after another
    Pipeline(bench_pipeline::BenchPipelineArgs),
    /// Prompt processing, decode and batched decode against candle-transformers' reference
    Engine(bench::BenchEngineArgs),
    /// 32 requests sharing a long prefix: one after another, then all at once
    Scheduler(bench::BenchSchedulerArgs),
    /// Trivial sandboxed Python programs per second, one at a time and in parallel
    Sandbox(bench_sandbox::BenchSandboxArgs),
    /// Streaming clients over HTTP against the same workload in process
    Serve(bench_serve::BenchServeArgs),
    /// Pipeline jobs on 1, 2, 3 cluster nodes (NATS JetStream) against one server alone
    Cluster(bench_cluster::BenchClusterArgs),
}

/// Exit code for an error: 2 for input errors, 3 for runtime failures.
fn exit_code_of(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<forgeline_engine::Error>() {
            return engine_exit_code(f);
        }
        if let Some(f) = cause.downcast_ref::<forgeline_sandbox::Error>() {
            return sandbox_exit_code(f);
        }
        if let Some(f) = cause.downcast_ref::<forgeline_pipeline::Error>() {
            use forgeline_pipeline::Error as P;
            return match f {
                P::InvalidTask(_)
                | P::Task(_)
                | P::TaskLine { .. }
                | P::Config(_)
                | P::Template { .. }
                | P::UnknownTemplate { .. }
                | P::EmptyPrompt { .. }
                | P::Io { .. }
                | P::PartlyWritten { .. }
                | P::OutsideOutput { .. }
                | P::WouldOverwrite(_) => 2,
                P::Engine(e) => engine_exit_code(e),
                P::Sandbox(e) => sandbox_exit_code(e),
                P::Json(_) | P::Internal(_) => 3,
            };
        }
        // Reading the user's files, or a problem with what they asked for.
        if cause.downcast_ref::<UsageError>().is_some()
            || cause.downcast_ref::<std::io::Error>().is_some()
        {
            return 2;
        }
    }
    3
}

fn engine_exit_code(e: &forgeline_engine::Error) -> u8 {
    use forgeline_engine::Error as E;
    // No wildcard: a new variant must be placed on one side or the other.
    match e {
        // What the user gave: a request, a model and its files, a setting such as the device.
        E::Validation(_)
        | E::Config(_)
        | E::ModelNotFound { .. }
        | E::BadModel { .. }
        | E::Io { .. }
        | E::Tokenizer(_)
        | E::Template(_)
        | E::NoChatTemplate(_)
        | E::TemplateOverLimit { .. } => 2,
        // Load, time, and our own failures.
        E::Overloaded { .. }
        | E::OutOfMemory(_)
        | E::Cancelled
        | E::DeadlineExceeded { .. }
        | E::Internal(_)
        | E::Candle(_) => 3,
    }
}

fn sandbox_exit_code(e: &forgeline_sandbox::Error) -> u8 {
    use forgeline_sandbox::Error as S;
    match e {
        S::InvalidLimits(_) | S::InvalidInput(_) => 2,
        _ => 3,
    }
}

/// A problem with what the user asked for (a flag, a file).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::error::Error for UsageError {}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// Logs to stderr, filtered by `RUST_LOG` (warnings by default; a server also logs each
/// request). A server's lines carry timestamps, as JSON lines always do; a command run by
/// hand does without them. Lines are written by a thread of their own, so that a stderr
/// nobody reads (a full pipe) drops log lines instead of stopping the server; the guard
/// flushes them when it is dropped.
fn init_logging(json: bool, server: bool) -> tracing_appender::non_blocking::WorkerGuard {
    let default = if server {
        "warn,forgeline_server::access=info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let base = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match (json, server) {
        (true, _) => base.json().try_init(),
        (false, true) => base.with_ansi(ansi).try_init(),
        (false, false) => base.with_ansi(ansi).without_time().try_init(),
    };
    guard
}

/// Shared state of a command: where models are, which device.
pub(crate) struct Env {
    pub registry: Registry,
    pub device: DeviceChoice,
    pub cache_type: KvCacheType,
}

impl Env {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        let models_dir = cli.models_dir.clone().unwrap_or_else(|| {
            let here = PathBuf::from("models");
            if here.is_dir() {
                here
            } else {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models"))
            }
        });
        let device = cli.device.parse::<DeviceChoice>()?;
        let cache_type = cli
            .cache_type
            .parse::<KvCacheType>()
            .map_err(|e| usage(format!("--cache-type: {e}")))?;
        Ok(Self {
            registry: Registry::new(models_dir),
            device,
            cache_type,
        })
    }

    /// The scheduler settings every command starts from: the engine's defaults with this
    /// command line's KV cache type.
    pub fn scheduler(&self) -> SchedulerConfig {
        SchedulerConfig {
            kv_dtype: self.cache_type.dtype(),
            ..SchedulerConfig::default()
        }
    }

    /// Resolves and loads a model (the default one when `name` is None).
    pub fn load_model(&self, name: Option<&str>) -> anyhow::Result<LoadedModel> {
        let loc = self.registry.resolve(name.unwrap_or(DEFAULT_MODEL))?;
        let device = self.device.open()?;
        Ok(forgeline_engine::loader::load(&loc, &device)?)
    }
}

pub(crate) fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

pub fn main() -> ExitCode {
    // Started as the sandbox's launcher, this applies a run's setup and becomes Python;
    // otherwise every sandbox of this process starts its runs through this program.
    forgeline_sandbox::launcher::run_if_requested();
    // A closed pipe (`forgeline ... | head`) ends the process quietly, as in other Unix tools.
    // SAFETY: called first thing, before any other thread exists.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let cli = Cli::parse();
    let _logs = init_logging(
        cli.log_format == "json",
        matches!(cli.command, Command::Serve(_)),
    );
    let result = Env::new(&cli).and_then(|env| run(cli.command, env));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code_of(&e))
        }
    }
}

fn run(command: Command, env: Env) -> anyhow::Result<ExitCode> {
    match command {
        Command::Prompt(a) => prompt::run(a, &env),
        Command::Generate(a) => runtime()?.block_on(generate::run(a, &env)),
        Command::Eval(a) => runtime()?.block_on(eval::run(a, &env)),
        Command::Bench(BenchCommand::Pipeline(a)) => {
            runtime()?.block_on(bench_pipeline::run(a, &env))
        }
        Command::Models(c) => models::run(c, &env),
        Command::Bench(BenchCommand::Engine(a)) => bench::run(a, &env),
        Command::Bench(BenchCommand::Scheduler(a)) => bench::run_scheduler(a, &env),
        Command::Bench(BenchCommand::Sandbox(a)) => runtime()?.block_on(bench_sandbox::run(a)),
        Command::Check(a) => runtime()?.block_on(check::run(a)),
        Command::Serve(a) => serve::run(a, &env),
        Command::Ps(a) => runtime()?.block_on(ps::run(a)),
        Command::Bench(BenchCommand::Serve(a)) => bench_serve::run_bench(a, &env),
        Command::Bench(BenchCommand::Cluster(a)) => bench_cluster::run(a, &env),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use forgeline_engine::error::{ConfigError, Internal, KvShortage, Validation};
    use forgeline_engine::Error as E;
    use std::sync::Arc;
    use std::time::Duration;

    fn code(e: E) -> u8 {
        exit_code_of(&anyhow::Error::new(e))
    }

    #[test]
    fn the_users_mistakes_are_exit_2() {
        let input: Vec<E> = vec![
            Validation::MaxTokensZero.into(),
            Validation::UnknownModel {
                name: "x".into(),
                loaded: vec![],
            }
            .into(),
            ConfigError::UnknownDevice("tpu".into()).into(),
            ConfigError::NotBuiltWith("cuda").into(),
            E::ModelNotFound {
                name: "x".into(),
                searched: "models/".into(),
            },
            E::bad_model("/m.gguf", "truncated"),
            E::io("/m.gguf", std::io::Error::other("denied")),
            E::Tokenizer("encode".into()),
            E::Template("syntax".into()),
        ];
        for e in input {
            let text = e.to_string();
            assert_eq!(code(e), 2, "{text}");
        }
    }

    #[test]
    fn load_time_and_our_failures_are_exit_3() {
        let runtime: Vec<E> = vec![
            E::Overloaded {
                waiting: 3,
                limit: 2,
            },
            KvShortage::Prompt {
                tokens: 300,
                needed_blocks: 19,
                cache_blocks: 16,
                block_size: 16,
            }
            .into(),
            KvShortage::Sequence {
                tokens: 300,
                needed_blocks: 19,
                cache_blocks: 16,
                block_size: 16,
            }
            .into(),
            E::Cancelled,
            E::DeadlineExceeded {
                after: Duration::from_secs(1),
            },
            // A forward pass that failed is ours even when its cause reads like bad input.
            Internal::ForwardPass(Arc::new(E::bad_model("/m.gguf", "x"))).into(),
            Internal::EngineThreadStopped.into(),
            Internal::LockPoisoned.into(),
        ];
        for e in runtime {
            let text = e.to_string();
            assert_eq!(code(e), 3, "{text}");
        }
    }

    #[test]
    fn the_code_is_found_through_context_and_the_pipeline() {
        let e = anyhow::Error::new(E::from(Validation::TopP(2.0))).context("generating");
        assert_eq!(exit_code_of(&e), 2);
        let e = forgeline_pipeline::Error::Engine(Internal::StreamEnded.into());
        assert_eq!(exit_code_of(&anyhow::Error::new(e)), 3);
        let e = forgeline_pipeline::Error::Engine(Validation::EmptyPrompt.into());
        assert_eq!(exit_code_of(&anyhow::Error::new(e)), 2);
    }
}
