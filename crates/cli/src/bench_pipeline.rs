//! `forgeline bench pipeline`: the pipeline against the single-call baseline on a task set
//! (pass@1 of both, measured in the same run), and N jobs run together against the same N
//! jobs one after another.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use forgeline_engine::bench::{run_engine_bench, EngineBenchConfig};
use forgeline_engine::scheduler::{ModelSchedulerStats, Stats};
use forgeline_pipeline::eval::{self, Runner};
use serde_json::json;

use crate::pipeline_setup::PipelineArgs;
use crate::Env;

#[derive(Args, Debug)]
pub struct BenchPipelineArgs {
    /// Task set [default: the repository's tests/data/tasks.jsonl]
    #[arg(long)]
    pub tasks: Option<PathBuf>,
    /// Only the first N tasks for the pass@1 comparison
    #[arg(long)]
    pub limit: Option<usize>,
    /// Tasks run at once in the pass@1 comparison
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Jobs in the together-versus-one-after-another comparison (0 skips it)
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Runs of each half of the jobs comparison, alternating; the best of each is compared
    /// (a shared machine's speed drifts by more than the effect)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeats: u32,
    /// Skip the pass@1 comparison
    #[arg(long)]
    pub skip_pass_rate: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

pub async fn run(a: BenchPipelineArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let path = a.tasks.clone().unwrap_or_else(|| {
        let here = PathBuf::from("tests/data/tasks.jsonl");
        if here.is_file() {
            here
        } else {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/data/tasks.jsonl"
            ))
        }
    });
    let all = eval::read_tasks(&path).map_err(|e| crate::usage(e.to_string()))?;
    let setup = a.pipeline.build(env).await?;
    let quiet = |_: &eval::TaskScore, _: usize, _: usize| {};
    let mut out = json!({"tasks_file": path, "model": setup.client.model_names()[0]});

    if a.jobs > 0 {
        let jobs: Vec<_> = all.iter().take(a.jobs).cloned().collect();
        // Each half on its own engine, so that neither starts with the other's prompts in
        // the prefix cache (the same jobs give the same prompts).
        let half = |concurrency: usize| {
            let jobs = jobs.clone();
            let args = a.pipeline.clone();
            async move {
                let setup = args.build(env).await?;
                let before = setup.client.stats();
                let r = eval::run_eval(
                    Runner::Pipeline(setup.pipeline.clone()),
                    setup.sandbox.clone(),
                    jobs,
                    concurrency,
                    quiet,
                )
                .await;
                let engine = engine_delta(&before, &setup.client.stats());
                anyhow::Ok((r, engine))
            }
        };
        let (mut runs, mut best) = (Vec::new(), [f64::INFINITY; 2]);
        let mut best_together_engine = json!(null);
        let mut best_fit = json!(null);
        for run in 1..=a.repeats {
            eprintln!(
                "{} jobs together (run {run} of {})...",
                jobs.len(),
                a.repeats
            );
            let (together, together_engine) = half(jobs.len()).await?;
            eprintln!(
                "  {:.1} s; the same jobs one after another...",
                together.wall_s
            );
            let (sequential, sequential_engine) = half(1).await?;
            eprintln!("  {:.1} s", sequential.wall_s);
            if together.wall_s < best[0] {
                best[0] = together.wall_s;
                best_together_engine = together_engine.clone();
            }
            best[1] = best[1].min(sequential.wall_s);
            let fit = cost_fit(&sequential_engine, &together_engine, sequential.wall_s);
            if together.wall_s <= best[0] {
                best_fit = fit.clone();
            }
            runs.push(json!({
                "cost_fit": fit,
                "together_s": together.wall_s,
                "one_after_another_s": sequential.wall_s,
                "together_tokens": together.completion_tokens,
                "one_after_another_tokens": sequential.completion_tokens,
                "together_engine": together_engine,
                "one_after_another_engine": sequential_engine,
            }));
        }
        eprintln!("the engine's own rates, for the floor...");
        let rates = engine_rates(env, &setup.client.model_names()[0]).await?;
        let floor = engine_floor_s(&best_together_engine, &rates);
        out["jobs"] = json!({
            "jobs": jobs.len(),
            "together_s": best[0],
            "one_after_another_s": best[1],
            "ratio": best[0] / best[1],
            "target_ratio": 0.6,
            "engine_rates": rates,
            "together_floor_s": floor,
            "floor_ratio": floor / best[1],
            "cost_fit": best_fit,
            "runs": runs,
        });
    }
    if !a.skip_pass_rate {
        let tasks: Vec<_> = all
            .iter()
            .take(a.limit.unwrap_or(all.len()))
            .cloned()
            .collect();
        let progress = |s: &eval::TaskScore, k: usize, n: usize| {
            eprintln!(
                "  [{k}/{n}] {} {}",
                s.task_id,
                if s.passed { "passed" } else { &s.outcome }
            )
        };
        eprintln!("single-call baseline on {} tasks...", tasks.len());
        let single = eval::run_eval(
            Runner::SingleCall {
                llm: Arc::new(setup.client.clone()),
                max_tokens: crate::eval::single_call_tokens(&a.pipeline)?,
            },
            setup.sandbox.clone(),
            tasks.clone(),
            a.concurrency,
            progress,
        )
        .await;
        eprintln!("pipeline on {} tasks...", tasks.len());
        let pipe = eval::run_eval(
            Runner::Pipeline(setup.pipeline.clone()),
            setup.sandbox.clone(),
            tasks,
            a.concurrency,
            progress,
        )
        .await;
        let strip = |r: &eval::EvalReport| {
            json!({"tasks": r.tasks, "passed": r.passed, "pass_at_1": r.pass_at_1, "wall_s": r.wall_s, "completion_tokens": r.completion_tokens,
            "passed_ids": r.per_task.iter().filter(|t| t.passed).map(|t| &t.task_id).collect::<Vec<_>>()})
        };
        out["single_call"] = strip(&single);
        out["pipeline"] = strip(&pipe);
        out["pass_ratio"] = if single.passed > 0 {
            json!(pipe.pass_at_1 / single.pass_at_1)
        } else {
            json!(null)
        };
        out["target_pass_ratio"] = json!(2.0);
    }
    if a.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// The engine's rates on this machine, measured in this run: prompt processing, and decode
/// at `FLOOR_BATCH` sequences (the together half's usual batch).
#[derive(Debug, serde::Serialize)]
struct EngineRates {
    prefill_tok_s: f64,
    batch: usize,
    batched_decode_tok_s: f64,
}

const FLOOR_BATCH: usize = 32;

async fn engine_rates(env: &Env, model: &str) -> anyhow::Result<EngineRates> {
    let m = env.load_model(Some(model))?;
    let cfg = EngineBenchConfig {
        prompt_tokens: 256,
        decode_tokens: 64,
        batches: vec![FLOOR_BATCH],
        depth: 256,
        shared_prompt: false,
        cache_type: env.cache_type,
        repeats: 2,
        reference: false,
    };
    let r = tokio::task::spawn_blocking(move || run_engine_bench(&m, &cfg, |_| {})).await??;
    Ok(EngineRates {
        prefill_tok_s: r.prefill_tok_s,
        batch: FLOOR_BATCH,
        batched_decode_tok_s: r.batched.first().map_or(0.0, |b| b.tok_s),
    })
}

/// The least engine time the together half's work could take on this machine: its computed
/// prompt tokens at the prompt-processing rate and its completion tokens at the batched
/// decode rate, as if every forward pass ran at full batch with nothing else on the CPU.
/// The together half cannot finish sooner, whatever the scheduling, unless it does less work.
fn engine_floor_s(engine: &serde_json::Value, r: &EngineRates) -> f64 {
    let tokens = |k: &str| engine[k].as_f64().unwrap_or(0.0);
    tokens("computed_prompt_tokens") / r.prefill_tok_s
        + tokens("completion_tokens") / r.batched_decode_tok_s
}

/// The engine's cost per forward pass (`a`) and per computed token (`c`), fitted to a run's
/// two halves: each half's busy time is `passes * a + tokens * c`, two equations in two
/// unknowns. Batching across jobs saves only `a` (the together half makes a quarter of the
/// passes), so `ratio_bound`, the together half's tokens at `c` over the one-after-another
/// wall time, is the least ratio this machine allows for this work even if the together
/// half's passes cost nothing more than their tokens. Null when the halves do not determine
/// a positive fit.
fn cost_fit(
    sequential: &serde_json::Value,
    together: &serde_json::Value,
    sequential_wall_s: f64,
) -> serde_json::Value {
    let figures = |e: &serde_json::Value| {
        let get = |k: &str| e[k].as_f64();
        Some((
            get("steps")?,
            get("computed_prompt_tokens")? + get("completion_tokens")?,
            get("busy_s")?,
        ))
    };
    let (Some((s1, n1, b1)), Some((s2, n2, b2))) = (figures(sequential), figures(together)) else {
        return json!(null);
    };
    let det = s1 * n2 - s2 * n1;
    if det.abs() < 1e-9 {
        return json!(null);
    }
    let a = (b1 * n2 - b2 * n1) / det;
    let c = (s1 * b2 - s2 * b1) / det;
    if a <= 0.0 || c <= 0.0 || sequential_wall_s <= 0.0 {
        return json!(null);
    }
    json!({
        "per_forward_ms": a * 1e3,
        "per_token_ms": c * 1e3,
        "ratio_bound": n2 * c / sequential_wall_s,
    })
}

/// What the engine did between two snapshots: forward passes, busy time, tokens, prefix
/// hits, preemptions, batch sizes.
fn engine_delta(a: &Stats, b: &Stats) -> serde_json::Value {
    let Some(b) = b.models.first() else {
        return json!(null);
    };
    // Before the first request the engine has no figures yet: count from zero.
    let zero = ModelSchedulerStats::new(&b.model, b.kv_budget_bytes);
    let a = a.models.first().unwrap_or(&zero);
    let prompt = b.prompt_tokens - a.prompt_tokens;
    let cached = b.cached_prompt_tokens - a.cached_prompt_tokens;
    let steps = b.steps - a.steps;
    let busy = b.busy_s - a.busy_s;
    json!({
        "steps": steps,
        "busy_s": busy,
        "prompt_tokens": prompt,
        "computed_prompt_tokens": prompt - cached,
        "prefix_hit_rate": if prompt > 0 { cached as f64 / prompt as f64 } else { 0.0 },
        "completion_tokens": b.completion_tokens - a.completion_tokens,
        "preemptions": b.preemptions - a.preemptions,
        "cancelled": b.cancelled - a.cancelled,
        "batch_histogram": b.batch_histogram.iter().zip(&a.batch_histogram).map(|(x, y)| x - y).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cost_fit_solves_both_halves() {
        // 5 ms a pass and 2 ms a token: 1000 passes and 10000 tokens, then 200 and 9000.
        let sequential = json!({"steps": 1000, "computed_prompt_tokens": 4000, "completion_tokens": 6000, "busy_s": 25.0});
        let together = json!({"steps": 200, "computed_prompt_tokens": 4000, "completion_tokens": 5000, "busy_s": 19.0});
        let fit = cost_fit(&sequential, &together, 25.0);
        let close = |k: &str, v: f64| (fit[k].as_f64().unwrap() - v).abs() < 1e-9;
        assert!(close("per_forward_ms", 5.0), "{fit}");
        assert!(close("per_token_ms", 2.0), "{fit}");
        // 9000 tokens at 2 ms over 25 s.
        assert!(close("ratio_bound", 0.72), "{fit}");
        // Halves that cannot be told apart, or missing figures, give no fit.
        assert_eq!(cost_fit(&sequential, &sequential, 25.0), json!(null));
        assert_eq!(cost_fit(&json!(null), &together, 25.0), json!(null));
    }

    #[test]
    fn the_floor_is_the_work_at_the_engines_rates() {
        let engine = json!({"computed_prompt_tokens": 1000, "completion_tokens": 900});
        let rates = EngineRates {
            prefill_tok_s: 500.0,
            batch: FLOOR_BATCH,
            batched_decode_tok_s: 300.0,
        };
        assert!((engine_floor_s(&engine, &rates) - 5.0).abs() < 1e-9);
        // A half with no figures has no floor to speak of.
        assert_eq!(engine_floor_s(&json!(null), &rates), 0.0);
    }
}
