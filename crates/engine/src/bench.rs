//! The engine benchmark: prompt processing, single-stream decode, aggregate decode of several
//! sequences together, and candle-transformers' reference model decoding the same prompt, all
//! measured in one run so that the figures can be read as ratios. The reference needs the
//! `reference-bench` feature (the CLI turns it on), so the library alone does not depend on
//! candle-transformers.

use std::time::Instant;

use serde::Serialize;

use crate::error::{ConfigError, Internal};
use crate::kv_cache::{BlockTable, KvCache, KvCacheType};
use crate::loader::LoadedModel;
use crate::model::SeqInput;
use crate::registry::Format;
use crate::sampling::argmax;
use crate::Result;

#[derive(Clone, Debug)]
pub struct EngineBenchConfig {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub batches: Vec<usize>,
    /// Positions each sequence holds before the decode runs (llama-batched-bench's prompt
    /// length): attention's cost grows with it.
    pub depth: usize,
    /// Whether the batched sequences share one cached prompt (as samples of one request
    /// do; llama-batched-bench's `-pps`) rather than each holding a copy.
    pub shared_prompt: bool,
    pub cache_type: KvCacheType,
    pub repeats: usize,
    pub reference: bool,
}

impl Default for EngineBenchConfig {
    fn default() -> Self {
        Self {
            prompt_tokens: 512,
            decode_tokens: 128,
            batches: vec![1, 2, 4, 8, 16],
            depth: 16,
            shared_prompt: false,
            cache_type: KvCacheType::default(),
            repeats: 3,
            reference: true,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BatchFigure {
    pub batch: usize,
    pub tok_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EngineBenchReport {
    pub model: String,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub reference_decode_tok_s: Option<f64>,
    pub batched: Vec<BatchFigure>,
    pub depth: usize,
    pub shared_prompt: bool,
    pub cache_type: String,
    pub threads: usize,
}

/// Deterministic text, tokenized and cut to exactly `n` tokens.
fn prompt_of(m: &LoadedModel, n: usize) -> Result<Vec<u32>> {
    let para = "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n\n";
    let mut text = String::new();
    let mut ids = Vec::new();
    while ids.len() < n {
        text.push_str(para);
        ids = m.tokenizer.encode(&text, false)?;
    }
    ids.truncate(n);
    Ok(ids)
}

fn best_of<F: FnMut() -> Result<f64>>(repeats: usize, mut f: F) -> Result<f64> {
    let mut best = 0f64;
    for _ in 0..repeats.max(1) {
        best = best.max(f()?);
    }
    Ok(best)
}

/// Prefills `batch` copies of `prompt` (as separate sequences, or with `shared` as
/// sequences sharing the first's cached blocks and each computing only the rest), then
/// decodes `steps` tokens for each, greedily, all in one forward per step. Returns decode
/// tokens per second.
fn batched_decode(
    m: &LoadedModel,
    kv: &mut KvCache,
    prompt: &[u32],
    batch: usize,
    steps: usize,
    shared: bool,
) -> Result<f64> {
    let mut tables = vec![BlockTable::default(); batch];
    let mut run = || -> Result<f64> {
        // Whole blocks only, and never the last prompt token, whose logits each needs.
        let share = if shared {
            (prompt.len() - 1) / kv.block_size() * kv.block_size()
        } else {
            0
        };
        if share > 0 {
            kv.reserve(&mut tables[0], prompt.len() + steps)?;
            m.model.forward(
                &[SeqInput {
                    tokens: &prompt[..share],
                    start_pos: 0,
                    table: &tables[0],
                    logits: false,
                }],
                kv,
            )?;
            for i in 1..batch {
                tables[i] = kv.share_prefix(&tables[0], share / kv.block_size());
            }
        }
        for t in &mut tables {
            kv.reserve(t, prompt.len() + steps)?;
        }
        let inputs: Vec<SeqInput> = tables
            .iter()
            .map(|t| SeqInput {
                tokens: &prompt[share..],
                start_pos: share,
                table: t,
                logits: true,
            })
            .collect();
        let logits = m.model.forward(&inputs, kv)?.to_vec2::<f32>()?;
        let mut last: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        let started = Instant::now();
        for step in 0..steps {
            let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let inputs: Vec<SeqInput> = tables
                .iter()
                .zip(&toks)
                .map(|(t, tok)| SeqInput {
                    tokens: tok,
                    start_pos: prompt.len() + step,
                    table: t,
                    logits: true,
                })
                .collect();
            let logits = m.model.forward(&inputs, kv)?.to_vec2::<f32>()?;
            last = logits.iter().map(|l| argmax(l)).collect();
        }
        Ok((batch * steps) as f64 / started.elapsed().as_secs_f64())
    };
    let r = run();
    for t in &mut tables {
        kv.release(t);
    }
    r
}

pub fn run_engine_bench(
    m: &LoadedModel,
    cfg: &EngineBenchConfig,
    mut progress: impl FnMut(&str),
) -> Result<EngineBenchReport> {
    let mc = m.model.config();
    let max_batch = cfg.batches.iter().copied().max().unwrap_or(1);
    let short = cfg.depth.max(1);
    let need = (cfg.prompt_tokens + 16).max(max_batch * (short + cfg.decode_tokens + 16));
    if cfg.prompt_tokens + 1 > mc.context_length || short + cfg.decode_tokens > mc.context_length {
        return Err(ConfigError::BenchContext {
            needed: (cfg.prompt_tokens + 1).max(short + cfg.decode_tokens),
            context: mc.context_length,
        }
        .into());
    }
    let mut kv = KvCache::new(
        mc,
        KvCache::DEFAULT_BLOCK_SIZE,
        need.div_ceil(KvCache::DEFAULT_BLOCK_SIZE) + max_batch,
        cfg.cache_type.dtype(),
        m.model.device(),
    )?;
    let long = prompt_of(m, cfg.prompt_tokens.max(short))?;
    let prompt = &long[..short];
    let long = &long[..cfg.prompt_tokens];

    progress("prompt processing");
    let prefill_tok_s = best_of(cfg.repeats, || {
        let mut t = BlockTable::default();
        kv.reserve(&mut t, long.len())?;
        let started = Instant::now();
        let r = m
            .model
            .forward(
                &[SeqInput {
                    tokens: long,
                    start_pos: 0,
                    table: &t,
                    logits: true,
                }],
                &kv,
            )
            .and_then(|l| Ok(l.to_vec2::<f32>()?));
        let secs = started.elapsed().as_secs_f64();
        kv.release(&mut t);
        r?;
        Ok(long.len() as f64 / secs)
    })?;

    progress("single-stream decode");
    let decode_tok_s = best_of(cfg.repeats, || {
        batched_decode(m, &mut kv, prompt, 1, cfg.decode_tokens, false)
    })?;

    let mut batched = Vec::new();
    for &b in &cfg.batches {
        progress(&format!("aggregate decode, {b} sequences"));
        let steps = (cfg.decode_tokens / 2).max(8);
        let tok_s = best_of(cfg.repeats.min(2), || {
            batched_decode(m, &mut kv, prompt, b, steps, cfg.shared_prompt)
        })?;
        batched.push(BatchFigure { batch: b, tok_s });
    }

    let reference_decode_tok_s = if cfg.reference && m.info.format == Format::Gguf {
        reference(m, cfg, prompt, &mut progress)?
    } else {
        None
    };
    Ok(EngineBenchReport {
        model: m.info.name.clone(),
        prefill_tok_s,
        decode_tok_s,
        reference_decode_tok_s,
        batched,
        depth: short,
        shared_prompt: cfg.shared_prompt,
        cache_type: cfg.cache_type.to_string(),
        threads: candle_core::utils::get_num_threads(),
    })
}

#[cfg(feature = "reference-bench")]
fn reference(
    m: &LoadedModel,
    cfg: &EngineBenchConfig,
    prompt: &[u32],
    progress: &mut impl FnMut(&str),
) -> Result<Option<f64>> {
    progress("reference (candle-transformers) decode");
    Ok(Some(best_of(cfg.repeats, || {
        reference::decode(m, prompt, cfg.decode_tokens)
    })?))
}

#[cfg(not(feature = "reference-bench"))]
fn reference(
    _: &LoadedModel,
    _: &EngineBenchConfig,
    _: &[u32],
    progress: &mut impl FnMut(&str),
) -> Result<Option<f64>> {
    progress("reference skipped: built without the engine's `reference-bench` feature");
    Ok(None)
}

/// candle-transformers' model, behind the `reference-bench` feature.
#[cfg(feature = "reference-bench")]
mod reference {
    use std::time::Instant;

    use candle_core::{Device, Tensor};

    use crate::loader::LoadedModel;
    use crate::model::Arch;
    use crate::sampling::argmax;
    use crate::{Error, Result};

    /// One forward of a reference model: (tokens [1, n], position) -> logits [1, vocab].
    type ReferenceForward = Box<dyn FnMut(&Tensor, usize) -> candle_core::Result<Tensor>>;

    /// candle-transformers' own quantized model, single stream, same prompt, greedy.
    pub(super) fn decode(m: &LoadedModel, prompt: &[u32], steps: usize) -> Result<f64> {
        use candle_transformers::models::{
            quantized_gemma3, quantized_llama, quantized_qwen2, quantized_qwen3,
        };
        let path = &m.info.path;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f)?;
        let dev = Device::Cpu;
        let mut fwd: ReferenceForward = match m.model.config().arch {
            Arch::Llama => {
                let mut w = quantized_llama::ModelWeights::from_gguf(ct, &mut f, &dev)?;
                Box::new(move |x, p| w.forward(x, p))
            }
            Arch::Qwen2 => {
                let mut w = quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, &dev)?;
                Box::new(move |x, p| w.forward(x, p))
            }
            Arch::Qwen3 => {
                let mut w = quantized_qwen3::ModelWeights::from_gguf(ct, &mut f, &dev)?;
                Box::new(move |x, p| w.forward(x, p))
            }
            // The same work as Gemma 3 (its feed-forward activation is SiLU where Gemma's is
            // GELU: a speed reference, not a correctness one).
            Arch::Gemma3 => {
                let mut w = quantized_gemma3::ModelWeights::from_gguf(ct, &mut f, &dev)?;
                Box::new(move |x, p| w.forward(x, p))
            }
        };
        let x = Tensor::new(prompt, &dev)?.unsqueeze(0)?;
        let logits = fwd(&x, 0)?.squeeze(0)?.to_vec1::<f32>()?;
        let mut tok = argmax(&logits);
        let started = Instant::now();
        for step in 0..steps {
            let x = Tensor::new(&[tok], &dev)?.unsqueeze(0)?;
            let logits = fwd(&x, prompt.len() + step)?.squeeze(0)?.to_vec1::<f32>()?;
            tok = argmax(&logits);
        }
        Ok(steps as f64 / started.elapsed().as_secs_f64())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SchedulerBenchReport {
    pub model: String,
    pub requests: usize,
    pub prefix_tokens: usize,
    pub new_tokens: usize,
    pub sequential_s: f64,
    pub concurrent_s: f64,
    pub speedup: f64,
    /// Share of prompt tokens served from the prefix cache in the concurrent run.
    pub prefix_hit_rate: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p95_ms: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
}

/// The scheduler workload: `requests` chat requests sharing a long system prompt (about
/// `prefix_tokens` tokens) and differing in a short task, `new_tokens` each; run one after
/// another, then all at once, each phase on a fresh client (cold prefix cache).
pub async fn run_scheduler_bench(
    start_client: impl Fn() -> Result<crate::scheduler::LlmClient>,
    requests: usize,
    prefix_tokens: usize,
    new_tokens: usize,
) -> Result<SchedulerBenchReport> {
    use crate::chat::ChatMessage;
    use crate::scheduler::GenerateRequest;

    let client = start_client()?;
    let rule = "Write idiomatic, documented Python 3 with type hints; prefer the standard library; handle edge cases such as empty inputs and invalid arguments; raise ValueError with a clear message for bad input; keep functions small and pure; include a docstring with an example. ";
    let mut system = String::new();
    while client
        .tokenize(&GenerateRequest::chat(
            vec![ChatMessage::system(system.clone())],
            1,
        ))?
        .len()
        < prefix_tokens
    {
        system.push_str(rule);
    }
    let tasks = [
        "reverse a string",
        "sum a list",
        "find the maximum",
        "count vowels",
        "check a palindrome",
        "merge two dicts",
        "flatten a list",
        "deduplicate a list",
    ];
    let reqs: Vec<GenerateRequest> = (0..requests)
        .map(|i| {
            let mut r = GenerateRequest::chat(
                vec![
                    ChatMessage::system(system.clone()),
                    ChatMessage::user(format!(
                        "Task {i}: write a function to {}.",
                        tasks[i % tasks.len()]
                    )),
                ],
                new_tokens,
            );
            r.ignore_eos = true;
            r
        })
        .collect();

    let started = Instant::now();
    for r in &reqs {
        client.complete(r.clone()).await?;
    }
    let sequential_s = started.elapsed().as_secs_f64();
    let model = client.model_names()[0].clone();
    drop(client);

    let client = start_client()?;
    let started = Instant::now();
    let streams = reqs
        .iter()
        .map(|r| client.generate(r.clone()))
        .collect::<Result<Vec<_>>>()?;
    let waits: Vec<_> = streams
        .into_iter()
        .map(|s| {
            tokio::spawn(async move {
                let out = s.collect().await;
                (out, started.elapsed())
            })
        })
        .collect();
    let (mut ttft, mut latency) = (Vec::new(), Vec::new());
    for w in waits {
        let (out, took) = w.await.map_err(Internal::BenchTask)?;
        ttft.push(out?.usage.time_to_first_token.as_secs_f64() * 1e3);
        latency.push(took.as_secs_f64() * 1e3);
    }
    let concurrent_s = started.elapsed().as_secs_f64();
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    Ok(SchedulerBenchReport {
        model,
        requests,
        prefix_tokens,
        new_tokens,
        sequential_s,
        concurrent_s,
        speedup: sequential_s / concurrent_s,
        prefix_hit_rate: client.stats().prefix_hit_rate(),
        ttft_p50_ms: pct(&mut ttft, 0.5),
        ttft_p95_ms: pct(&mut ttft, 0.95),
        latency_p50_ms: pct(&mut latency, 0.5),
        latency_p95_ms: pct(&mut latency, 0.95),
    })
}
