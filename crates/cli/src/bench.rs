//! `forgeline bench engine`.

use std::process::ExitCode;

use clap::Args;
use forgeline_engine::bench::{run_engine_bench, run_scheduler_bench, EngineBenchConfig};
use forgeline_engine::scheduler::LlmClient;

use crate::Env;

#[derive(Args, Debug)]
pub struct BenchEngineArgs {
    /// Model name, path, or Hugging Face repo id [default: smollm2-135m-instruct]
    #[arg(long, conflicts_with = "synthetic")]
    pub model: Option<String>,
    /// Measure a random-weight model of this real shape instead, written to a temporary
    /// directory: smollm2-135m, qwen2.5-coder-0.5b, -1.5b, -3b, -7b, qwen3-0.6b, -1.7b, -4b, -8b
    #[arg(long)]
    pub synthetic: Option<String>,
    /// The synthetic model's quantization (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, Q4_K_M,
    /// Q5_K_M, F16, F32)
    #[arg(long, default_value = "Q4_K_M", requires = "synthetic")]
    pub quant: String,
    /// Tokens of the prompt-processing run
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens decoded in the single-stream run (half as many per sequence in batched runs)
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Batch sizes of the aggregate decode runs
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub batches: Vec<usize>,
    /// Positions each sequence holds before the decode runs (attention's cost grows with it)
    #[arg(long, default_value_t = 16)]
    pub depth: usize,
    /// The batched sequences share one cached prompt of `--depth` positions (as samples of
    /// one request do) instead of each holding a copy
    #[arg(long)]
    pub shared_prompt: bool,
    /// Runs per figure; the best is reported
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Skip candle-transformers' reference model
    #[arg(long)]
    pub no_reference: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchEngineArgs, env: &Env) -> anyhow::Result<ExitCode> {
    if a.batches.contains(&0) || a.prompt_tokens == 0 || a.decode_tokens == 0 {
        return Err(crate::usage(
            "batch sizes, --prompt-tokens and --decode-tokens must be positive",
        ));
    }
    // The synthetic model's directory lives until the bench ends.
    let mut _synthetic_dir = None;
    let model = match &a.synthetic {
        None => a.model.clone(),
        Some(name) => {
            let shape = forgeline_engine::synthetic::preset(name).ok_or_else(|| {
                crate::usage(format!(
                    "unknown --synthetic shape `{name}` (one of: {})",
                    forgeline_engine::synthetic::PRESETS.join(", ")
                ))
            })?;
            if forgeline_engine::synthetic::quant(&a.quant).is_none() {
                return Err(crate::usage(format!(
                    "unknown --quant `{}` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, Q4_K_M, Q5_K_M, F16, F32)",
                    a.quant
                )));
            }
            let dir = tempfile::tempdir()?;
            let path = dir.path().join(format!("{name}-{}.gguf", a.quant));
            if crate::stderr_is_terminal() {
                eprintln!("bench: writing a random-weight {name} in {} ...", a.quant);
            }
            forgeline_engine::synthetic::write_gguf(&shape, &a.quant, 0x5eed, &path)?;
            _synthetic_dir = Some(dir);
            Some(path.display().to_string())
        }
    };
    let m = env.load_model(model.as_deref())?;
    let cfg = EngineBenchConfig {
        prompt_tokens: a.prompt_tokens,
        decode_tokens: a.decode_tokens,
        batches: a.batches,
        depth: a.depth,
        shared_prompt: a.shared_prompt,
        cache_type: env.cache_type,
        repeats: a.repeats,
        reference: !a.no_reference,
    };
    let verbose = crate::stderr_is_terminal();
    let r = run_engine_bench(&m, &cfg, |stage| {
        if verbose {
            eprintln!("bench: {stage} ...");
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "model: {} ({} threads, {} KV cache)",
        r.model, r.threads, r.cache_type
    );
    let ratio = |x: f64| match r.reference_decode_tok_s {
        Some(refr) if refr > 0.0 => format!(" ({:.2}x reference decode)", x / refr),
        _ => String::new(),
    };
    println!(
        "prompt processing ({} tokens): {:.1} tok/s{}",
        cfg.prompt_tokens,
        r.prefill_tok_s,
        ratio(r.prefill_tok_s)
    );
    println!(
        "decode runs start with {} positions in each sequence{}",
        r.depth,
        if r.shared_prompt {
            " (one shared prompt)"
        } else {
            ""
        }
    );
    println!(
        "decode, 1 stream:              {:.1} tok/s{}",
        r.decode_tok_s,
        ratio(r.decode_tok_s)
    );
    for b in &r.batched {
        println!(
            "decode, {:>2} sequences:         {:.1} tok/s{}",
            b.batch,
            b.tok_s,
            ratio(b.tok_s)
        );
    }
    if let Some(x) = r.reference_decode_tok_s {
        println!("reference decode (candle-transformers): {x:.1} tok/s");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct BenchSchedulerArgs {
    /// Model name, path, or Hugging Face repo id [default: smollm2-135m-instruct]
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Tokens of the prompt prefix all requests share
    #[arg(long, default_value_t = 300)]
    pub prefix_tokens: usize,
    /// Tokens generated per request
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run_scheduler(a: BenchSchedulerArgs, env: &Env) -> anyhow::Result<ExitCode> {
    if a.requests == 0 || a.new_tokens == 0 {
        return Err(crate::usage("--requests and --new-tokens must be positive"));
    }
    let loc = env.registry.resolve(
        a.model
            .as_deref()
            .unwrap_or(forgeline_engine::registry::DEFAULT_MODEL),
    )?;
    let device = env.device.open()?;
    let start = || {
        let m = forgeline_engine::loader::load(&loc, &device)?;
        LlmClient::start(vec![m], env.scheduler())
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(run_scheduler_bench(
        start,
        a.requests,
        a.prefix_tokens,
        a.new_tokens,
    ))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "model: {} — {} requests, ~{} shared prompt tokens, {} new tokens each",
        r.model, r.requests, r.prefix_tokens, r.new_tokens
    );
    println!("one after another: {:.2} s", r.sequential_s);
    println!(
        "all at once:       {:.2} s  ({:.2}x)",
        r.concurrent_s, r.speedup
    );
    println!("prefix hit rate:   {:.2}", r.prefix_hit_rate);
    println!(
        "time to first token p50/p95: {:.0} / {:.0} ms",
        r.ttft_p50_ms, r.ttft_p95_ms
    );
    println!(
        "latency p50/p95:             {:.0} / {:.0} ms",
        r.latency_p50_ms, r.latency_p95_ms
    );
    Ok(ExitCode::SUCCESS)
}
