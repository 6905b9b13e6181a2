//! `forgeline bench serve`: streaming clients over HTTP against the same workload run in
//! process (the work is in `forgeline_server::bench`).

use std::process::ExitCode;

use clap::Args;
use forgeline_engine::scheduler::{LlmClient, SchedulerConfig};
use forgeline_server::bench::{run, BenchConfig, PassReport};
use forgeline_server::ModelCard;

use crate::Env;

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// Model name, path, or Hugging Face repo id [default: smollm2-135m-instruct]
    #[arg(long)]
    pub model: Option<String>,
    /// Concurrent streaming clients
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Requests per pass, shared among the clients
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Tokens per answer
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Passes of each kind (HTTP and in-process), alternating which goes first
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Also compare one request for N choices (`n`) with N separate requests sent at once,
    /// on one long prompt (0: skip)
    #[arg(long, default_value_t = 0)]
    pub choices: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run_bench(a: BenchServeArgs, env: &Env) -> anyhow::Result<ExitCode> {
    if a.clients == 0 || a.requests == 0 || a.max_tokens == 0 || a.rounds == 0 {
        return Err(crate::usage(
            "--clients, --requests, --max-tokens and --rounds must be at least 1",
        ));
    }
    let m = env.load_model(a.model.as_deref())?;
    let card = ModelCard::of(&m);
    let client = LlmClient::start(
        vec![m],
        SchedulerConfig {
            // Every client's request is admitted: the bench measures HTTP, not the queue bound.
            max_waiting: a.requests.max(256),
            ..env.scheduler()
        },
    )?;
    let cfg = BenchConfig {
        clients: a.clients,
        requests: a.requests,
        max_tokens: a.max_tokens,
        rounds: a.rounds,
        choices: a.choices,
    };
    if crate::stderr_is_terminal() {
        eprintln!(
            "bench serve: {} requests of {} tokens, {} clients, over HTTP and in process ...",
            a.requests, a.max_tokens, a.clients
        );
    }
    let r = crate::runtime()?
        .block_on(run(client, card, cfg))
        .map_err(anyhow::Error::msg)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "model: {} — {} clients, {} requests x {} tokens, {} round(s)",
        r.model, r.clients, r.requests, r.max_tokens, r.rounds
    );
    let line = |name: &str, p: &PassReport| {
        println!(
            "{name:<11} {:>7.1} tok/s   TTFT p50/p90/p99 {:.0}/{:.0}/{:.0} ms   latency p50/p90/p99 {:.0}/{:.0}/{:.0} ms",
            p.throughput_tok_s,
            p.ttft_ms.p50,
            p.ttft_ms.p90,
            p.ttft_ms.p99,
            p.latency_ms.p50,
            p.latency_ms.p90,
            p.latency_ms.p99
        );
    };
    line("HTTP", &r.http);
    line("in-process", &r.inprocess);
    let rounds: Vec<String> = r
        .http_overhead_by_round
        .iter()
        .map(|o| format!("{:.1}%", o * 100.0))
        .collect();
    println!(
        "HTTP overhead: {:.1}% (by round: {})",
        r.http_overhead * 100.0,
        rounds.join(", ")
    );
    if let Some(c) = &r.choices {
        println!(
            "n={} on a {}-token prompt: one request {:.2} s ({:.0} prompt tokens computed), {} separate requests {:.2} s ({:.0}): {:.2}x",
            c.choices,
            c.prompt_tokens,
            c.shared.wall_s,
            c.shared.prefilled_tokens_per_pass,
            c.choices,
            c.separate.wall_s,
            c.separate.prefilled_tokens_per_pass,
            c.speedup
        );
    }
    Ok(ExitCode::SUCCESS)
}
