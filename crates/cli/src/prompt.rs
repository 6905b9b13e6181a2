//! `forgeline prompt`: one completion, streamed to stdout; timings and counts on stderr.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use forgeline_engine::chat::ChatMessage;
use forgeline_engine::kv_cache::KvCache;
use forgeline_engine::sampling::{SamplingDefaults, SamplingParams};
use forgeline_engine::scheduler::{
    Completion, Event, GenerateRequest, LlmClient, Prompt, SchedulerConfig,
};

use crate::Env;

#[derive(Args, Debug)]
pub struct PromptArgs {
    /// The prompt text (a chat message with --chat)
    pub text: String,
    /// Model name, path, or Hugging Face repo id [default: smollm2-135m-instruct]
    #[arg(long)]
    pub model: Option<String>,
    /// Wrap the text as a user message in the model's chat template
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat)
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Sampling temperature; 0 is greedy [default: the model's recipe, else 0]
    #[arg(long)]
    pub temperature: Option<f32>,
    /// [default: the model's recipe, else 0: no cut]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// [default: the model's recipe, else 1]
    #[arg(long)]
    pub top_p: Option<f32>,
    /// [default: the model's recipe, else 0]
    #[arg(long)]
    pub min_p: Option<f32>,
    /// [default: the model's recipe, else 1]
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// DRY repetition penalty (as llama.cpp's): 0 is off; 0.8 is a usual strength [default: the model's recipe, else 0]
    #[arg(long, allow_negative_numbers = true)]
    pub dry_multiplier: Option<f32>,
    /// [default: the model's recipe, else 1.75]
    #[arg(long)]
    pub dry_base: Option<f32>,
    /// Repeats shorter than this go unpenalised [default: the model's recipe, else 2]
    #[arg(long)]
    pub dry_allowed_length: Option<usize>,
    /// Last tokens searched for repeats: -1 all, 0 off [default: the model's recipe, else -1]
    #[arg(long, allow_negative_numbers = true)]
    pub dry_penalty_last_n: Option<i64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens to generate (capped by the context left after the prompt)
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop when this text appears (repeatable)
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object with the text, counts and timings instead of streaming
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PromptArgs, env: &Env) -> anyhow::Result<ExitCode> {
    if a.max_tokens == 0 {
        return Err(crate::usage("--max-tokens must be at least 1"));
    }
    let loaded_at = std::time::Instant::now();
    let m = env.load_model(a.model.as_deref())?;
    let load_s = loaded_at.elapsed().as_secs_f64();
    // The flags given, over the model's recipe, over the defaults.
    let flags = SamplingDefaults {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        dry_multiplier: a.dry_multiplier,
        dry_base: a.dry_base,
        dry_allowed_length: a.dry_allowed_length,
        dry_penalty_last_n: a.dry_penalty_last_n,
    };
    let sampling = flags.over(m.recipe.sampling.over(SamplingParams {
        seed: a.seed,
        ..SamplingParams::default()
    }));
    sampling.validate()?;
    let name = m.info.name.clone();
    let ctx = m.model.config().context_length;
    // One request: a cache for the whole context is enough.
    let kv_bytes = KvCache::bytes_per_token(m.model.config(), env.cache_type.dtype()) * ctx;
    let client = LlmClient::start(
        vec![m],
        SchedulerConfig {
            kv_budget_bytes: Some(kv_bytes),
            ..env.scheduler()
        },
    )?;
    let prompt = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::system(s.clone()));
        }
        msgs.push(ChatMessage::user(a.text.clone()));
        Prompt::Chat(msgs)
    } else {
        Prompt::Text(a.text.clone())
    };
    let mut req = GenerateRequest::new(prompt, a.max_tokens);
    let prompt_tokens = client.tokenize(&req)?.len();
    req.max_tokens = a.max_tokens.min(ctx.saturating_sub(prompt_tokens));
    if req.max_tokens == 0 {
        return Err(crate::usage(format!(
            "the prompt has {prompt_tokens} tokens; the model's context holds {ctx}"
        )));
    }
    req.sampling = sampling;
    req.stop_strings = a.stop.clone();

    let mut stream = client.generate(req)?;
    let mut stdout = std::io::stdout().lock();
    let mut out = Completion::default();
    while let Some(ev) = stream.blocking_next() {
        let ev = ev?;
        if let (Event::Delta { text, .. }, false) = (&ev, a.json) {
            stdout.write_all(text.as_bytes())?;
            stdout.flush()?;
        }
        if out.absorb(ev) {
            break;
        }
    }
    let u = &out.usage;
    let prefill_s = (u.time_to_first_token - u.queue_time).as_secs_f64();
    let prefill_tok_s = u.prompt_tokens as f64 / prefill_s.max(1e-9);
    let decode_tok_s = if u.completion_tokens > 1 {
        (u.completion_tokens - 1) as f64 / u.decode_time.as_secs_f64().max(1e-9)
    } else {
        0.0
    };
    if a.json {
        let v = serde_json::json!({
            "model": name,
            "text": out.text,
            "stop_reason": out.stop_reason,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "load_s": load_s,
            "time_to_first_token_ms": u.time_to_first_token.as_secs_f64() * 1e3,
            "prefill_tok_s": prefill_tok_s,
            "decode_tok_s": decode_tok_s,
        });
        writeln!(stdout, "{v}")?;
    } else {
        if !out.text.ends_with('\n') {
            writeln!(stdout)?;
        }
        eprintln!(
            "[{name}] prompt {} tokens ({prefill_tok_s:.0} tok/s), completion {} tokens ({decode_tok_s:.1} tok/s), stop: {:?}, load {load_s:.2}s",
            u.prompt_tokens, u.completion_tokens, out.stop_reason,
        );
    }
    Ok(ExitCode::SUCCESS)
}
