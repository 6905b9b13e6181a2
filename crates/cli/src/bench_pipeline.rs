//! `forgeline bench pipeline`: the pipeline against the single-call baseline and against
//! sample-filter (samples of the single-call prompt, the first that passes the task's own
//! examples kept, as many as cost about the pipeline's tokens) on a task set: pass@1 and
//! tokens of each, measured in the same run, with the pipeline's oracle and pass@1 by
//! verdict; and N jobs run together against the same N jobs one after another.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use forgeline_engine::bench::{run_engine_bench, EngineBenchConfig};
use forgeline_engine::scheduler::{ModelSchedulerStats, Stats};
use forgeline_pipeline::eval::{self, EvalOptions, Runner};
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
    /// Samples per task of sample-filter [default: as many as cost about the pipeline's
    /// mean completion tokens per task, at the single-call baseline's tokens a sample]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub samples: Option<u32>,
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
                    // Timing only: no oracle runs in the halves' time.
                    EvalOptions {
                        concurrency,
                        oracle: false,
                        keep: None,
                    },
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
            eprintln!("  [{k}/{n}] {}", crate::eval::progress_line(s))
        };
        let max_tokens = crate::eval::single_call_tokens(&a.pipeline, env)?;
        let options = EvalOptions::new(a.concurrency);
        eprintln!("single-call baseline on {} tasks...", tasks.len());
        let single = eval::run_eval(
            Runner::SingleCall {
                llm: Arc::new(setup.client.clone()),
                max_tokens,
            },
            setup.sandbox.clone(),
            tasks.clone(),
            options.clone(),
            progress,
        )
        .await;
        eprintln!("pipeline on {} tasks...", tasks.len());
        let pipe = eval::run_eval(
            Runner::Pipeline(setup.pipeline.clone()),
            setup.sandbox.clone(),
            tasks.clone(),
            options.clone(),
            progress,
        )
        .await;
        let (samples, samples_from) = match a.samples {
            Some(n) => (n as usize, "--samples"),
            None => (
                eval::matched_samples(pipe.mean_completion_tokens, single.mean_completion_tokens),
                "matched",
            ),
        };
        eprintln!(
            "sample-filter ({samples} samples a task) on {} tasks...",
            tasks.len()
        );
        let filter = eval::run_eval(
            Runner::SampleFilter {
                llm: Arc::new(setup.client.clone()),
                max_tokens,
                samples,
            },
            setup.sandbox.clone(),
            tasks,
            options,
            progress,
        )
        .await;
        out["single_call"] = pass_rate_json(&single);
        out["pipeline"] = pass_rate_json(&pipe);
        out["sample_filter"] = pass_rate_json(&filter);
        out["sample_filter"]["samples"] = json!(samples);
        out["sample_filter"]["samples_from"] = json!(samples_from);
        out["pass_ratio"] = ratio(&pipe, &single);
        out["pass_ratio_vs_sample_filter"] = ratio(&pipe, &filter);
        out["target_pass_ratio"] = json!(2.0);
    }
    if a.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// One method's pass-rate figures: pass@1 and tokens, and where the method wrote more than
/// one program, its oracle and selection efficiency; for the pipeline, pass@1 by verdict
/// and each task's verdict and oracle.
fn pass_rate_json(r: &eval::EvalReport) -> serde_json::Value {
    let mut v = json!({
        "tasks": r.tasks,
        "passed": r.passed,
        "pass_at_1": r.pass_at_1,
        "wall_s": r.wall_s,
        "completion_tokens": r.completion_tokens,
        "mean_completion_tokens": r.mean_completion_tokens,
        "passed_ids": r.per_task.iter().filter(|t| t.passed).map(|t| &t.task_id).collect::<Vec<_>>(),
    });
    if let Some(o) = &r.oracle {
        v["oracle_passed"] = json!(o.oracle_passed);
        v["oracle_pass_at_k"] = json!(o.oracle_pass_at_k);
        v["selection_efficiency"] = json!(o.selection_efficiency);
    }
    if let Some(by) = &r.pass_at_1_by_verdict {
        v["pass_at_1_by_verdict"] = json!(by);
        v["per_task"] = r
            .per_task
            .iter()
            .map(|t| {
                json!({"task_id": t.task_id, "passed": t.passed, "verdict_status": t.verdict_status,
                       "oracle_pass": t.oracle_pass, "candidates": t.candidates,
                       "completion_tokens": t.completion_tokens})
            })
            .collect();
    }
    v
}

/// `a`'s pass@1 over `b`'s; null when `b` passed nothing.
fn ratio(a: &eval::EvalReport, b: &eval::EvalReport) -> serde_json::Value {
    if b.passed > 0 {
        json!(a.pass_at_1 / b.pass_at_1)
    } else {
        json!(null)
    }
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

    fn report(mode: &str, passed: usize, oracle: Option<eval::OracleSummary>) -> eval::EvalReport {
        eval::EvalReport {
            mode: mode.into(),
            tasks: 2,
            passed,
            pass_at_1: passed as f64 / 2.0,
            wall_s: 1.0,
            completion_tokens: 300,
            mean_completion_tokens: 150.0,
            concurrency: 1,
            samples: None,
            oracle,
            pass_at_1_by_verdict: None,
            per_task: Vec::new(),
        }
    }

    #[test]
    fn pass_rate_figures_keep_the_old_keys_and_add_the_oracle() {
        let single = pass_rate_json(&report("single-call", 1, None));
        for k in [
            "tasks",
            "passed",
            "pass_at_1",
            "wall_s",
            "completion_tokens",
            "passed_ids",
            "mean_completion_tokens",
        ] {
            assert!(single.get(k).is_some(), "no {k} in {single}");
        }
        assert!(single.get("oracle_pass_at_k").is_none());
        let oracle = eval::OracleSummary {
            oracle_passed: 2,
            oracle_pass_at_k: 1.0,
            selection_efficiency: Some(0.5),
        };
        let mut pipe = report("pipeline", 1, Some(oracle));
        pipe.pass_at_1_by_verdict = Some(eval::pass_by_verdict(&pipe.per_task));
        let v = pass_rate_json(&pipe);
        assert_eq!(v["oracle_pass_at_k"], 1.0);
        assert_eq!(v["selection_efficiency"], 0.5);
        assert_eq!(v["pass_at_1_by_verdict"]["verified"]["tasks"], 0);
        assert_eq!(ratio(&pipe, &report("x", 0, None)), json!(null));
        assert_eq!(ratio(&pipe, &report("x", 2, None)), json!(0.5));
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
